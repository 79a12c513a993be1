import { describe as suite, it, expect } from 'vitest';
import {
  Base, Milter, CONTINUE, describe, protocolSteps, decorate, noreply, nocallback, symlist, decode, methodTags,
  resolveNegotiation, defaultSteps,
  P_NOCONNECT, P_NOHELO, P_NOMAIL, P_NORCPT, P_NOBODY, P_NOHDRS, P_NOEOH, P_NOUNKNOWN, P_NODATA, P_SKIP,
  P_RCPT_REJ, P_HDR_LEADSPC, P_NR_CONN, P_NR_HELO, P_NR_MAIL, P_NR_RCPT, P_NR_DATA, P_NR_HDR, P_NR_EOH,
  P_NR_UNKN, P_NR_BODY, SMFIP_NO_ALL, ADDHDRS, CHGHDRS, SETSYMLIST, SMFI_CURR_ACTS, SMFI_CURR_PROT,
  M_CONNECT, M_ENVFROM, M_EOM, InvalidArgumentError,
} from '../src/index';
import type { MilterClass } from '../src/index';
import { compileMilter } from './helpers/compile';

const ALL_NO = P_NOCONNECT | P_NOHELO | P_NOMAIL | P_NORCPT | P_NOBODY | P_NOHDRS | P_NOEOH | P_NOUNKNOWN | P_NODATA;

class OnlyRcpt extends Base {
  override envrcpt() { return CONTINUE; }
}
class RcptAndHeader extends OnlyRcpt {
  override header() { return CONTINUE; }
}
class QuietHeader extends Base {
  override header() { return CONTINUE; }
}
decorate(QuietHeader, 'header', noreply);
class LoudAgain extends QuietHeader {
  override header() { return CONTINUE; }
}
class InheritsQuiet extends QuietHeader {
  override body() { return CONTINUE; }
}
class NoCallbackRcpt extends OnlyRcpt {
  override envrcpt() { return CONTINUE; }
}
decorate(NoCallbackRcpt, 'envrcpt', nocallback);
class ReEnabled extends NoCallbackRcpt {
  override envrcpt() { return CONTINUE; }
}
class Switches extends OnlyRcpt {
  static override rejectedRecipients = true;
  static override headerLeadingSpace = true;
}
class NoSkip extends Base {
  static override skip = false;
}
class Extra extends NoSkip {
  static override extraSteps = P_NR_BODY;
}
class HelloUnknown extends Base {
  override hello() { return CONTINUE; }
  override unknown() { return CONTINUE; }
}
class EomOnly extends Base {
  override eom() { return CONTINUE; }
}

const table: [string, MilterClass, number][] = [
  ['Base itself: every step negotiated away, SKIP kept', Base, ALL_NO | P_SKIP],
  ['eom/abort/close have no step bits', EomOnly, ALL_NO | P_SKIP],
  ['overriding envrcpt keeps RCPT', OnlyRcpt, (ALL_NO & ~P_NORCPT) | P_SKIP],
  ['subclass adds header to its parent', RcptAndHeader, (ALL_NO & ~P_NORCPT & ~P_NOHDRS) | P_SKIP],
  ['hello maps to NOHELO, unknown to NOUNKNOWN', HelloUnknown, (ALL_NO & ~P_NOHELO & ~P_NOUNKNOWN) | P_SKIP],
  ['@noreply header', QuietHeader, (ALL_NO & ~P_NOHDRS) | P_NR_HDR | P_SKIP],
  ['override of a @noreply method replies again', LoudAgain, (ALL_NO & ~P_NOHDRS) | P_SKIP],
  ['inherited @noreply method stays no-reply', InheritsQuiet, (ALL_NO & ~P_NOHDRS & ~P_NOBODY) | P_NR_HDR | P_SKIP],
  ['@nocallback negotiates a defined method away', NoCallbackRcpt, ALL_NO | P_SKIP],
  ['override of a @nocallback method gets the step back', ReEnabled, (ALL_NO & ~P_NORCPT) | P_SKIP],
  ['class switches RCPT_REJ and HDR_LEADSPC', Switches, (ALL_NO & ~P_NORCPT) | P_SKIP | P_RCPT_REJ | P_HDR_LEADSPC],
  ['skip = false drops SKIP', NoSkip, ALL_NO],
  ['extraSteps are OR-ed in', Extra, ALL_NO | P_NR_BODY],
  [
    'Milter: logging callbacks are @noreply, body negotiated away',
    Milter,
    P_NOBODY | P_SKIP | P_NR_CONN | P_NR_HELO | P_NR_MAIL | P_NR_RCPT | P_NR_DATA | P_NR_HDR | P_NR_EOH | P_NR_UNKN,
  ],
];

suite('protocolSteps', () => {
  it.each(table)('%s', (_name, cls, expected) => {
    expect(protocolSteps(cls).toString(16)).toBe(expected.toString(16));
  });

  it('computes per class, not cached from the parent (pymilter cache bug)', () => {
    class Parent extends Base {}
    class Child extends Parent {
      override eoh() { return CONTINUE; }
    }
    expect(protocolSteps(Parent) & P_NOEOH).toBe(P_NOEOH); // parent first, as pymilter's cache would then serve
    expect(protocolSteps(Child) & P_NOEOH).toBe(0);
    expect(protocolSteps(Parent) & P_NOEOH).toBe(P_NOEOH);
  });

  it('a switch changed on a subclass does not affect the parent', () => {
    class P extends OnlyRcpt {}
    class C extends P {
      static override rejectedRecipients = true;
    }
    expect(protocolSteps(C) & P_RCPT_REJ).toBe(P_RCPT_REJ);
    expect(protocolSteps(P) & P_RCPT_REJ).toBe(0);
  });
});

suite('describe()', () => {
  it('gives callbacks only for handled steps, plus eom/abort/close', () => {
    const d = describe(RcptAndHeader);
    expect(Object.keys(d.callbacks).sort()).toEqual(['abort', 'close', 'envrcpt', 'eom', 'header']);
    expect(d.name).toBe('RcptAndHeader');
    expect(d.steps).toBe(protocolSteps(RcptAndHeader));
    expect(d.actions).toBeUndefined();
    expect(d.noreply).toEqual([]);
  });

  it('lists @noreply callbacks and uses the protocol name helo', () => {
    const d = describe(Milter, 'logger');
    expect(d.name).toBe('logger');
    expect([...d.noreply!].sort()).toEqual(['connect', 'data', 'envfrom', 'envrcpt', 'eoh', 'header', 'helo', 'unknown']);
    expect(d.callbacks.helo).toBeTypeOf('function');
    expect(d.callbacks.body).toBeUndefined();
  });

  it('has a negotiate callback only when the class overrides negotiate', () => {
    class Neg extends Base {
      override negotiate(offer: any) { return super.negotiate(offer); }
    }
    expect(describe(OnlyRcpt).callbacks.negotiate).toBeUndefined();
    expect(describe(Neg).callbacks.negotiate).toBeTypeOf('function');
  });

  it('collects @symlist per stage and @decode, adding SETSYMLIST to declared flags', () => {
    class S extends Base {
      static override flags = ADDHDRS;
      override connect() { return CONTINUE; }
      override envfrom() { return CONTINUE; }
      override header() { return CONTINUE; }
      override eom() { return CONTINUE; }
    }
    decorate(S, 'connect', symlist('j', '{daemon_name}'));
    decorate(S, 'envfrom', symlist('i {auth_authen}'), decode('bytes'));
    decorate(S, 'eom', symlist('{msg_id}'));
    decorate(S, 'header', decode('bytes'));
    const d = describe(S);
    expect(d.symlists).toEqual({ [M_CONNECT]: ['j', '{daemon_name}'], [M_ENVFROM]: ['i', '{auth_authen}'], [M_EOM]: ['{msg_id}'] });
    expect(d.decode).toEqual({ envfrom: 'bytes', header: 'bytes' });
    expect(d.actions).toBe(ADDHDRS | SETSYMLIST);
  });

  it('with a bare factory function negotiates per connection', () => {
    const d = describe(() => new OnlyRcpt());
    expect(d.callbacks.negotiate).toBeTypeOf('function');
    expect(d.callbacks.header).toBeTypeOf('function');
    expect(d.steps).toBeUndefined();
    const d2 = describe(() => new OnlyRcpt(), { class: OnlyRcpt, name: 'x' });
    expect(d2.callbacks.negotiate).toBeUndefined();
    expect(d2.steps).toBe(protocolSteps(OnlyRcpt));
  });
});

suite('decorators', () => {
  it('only tag the method, leaving it callable as written', () => {
    class T extends Base {
      override header() { return CONTINUE; }
    }
    const before = T.prototype.header;
    decorate(T, 'header', noreply, decode('string'));
    expect(T.prototype.header).toBe(before);
    expect(methodTags(T.prototype.header)).toEqual({ noreply: true, decode: 'string' });
  });

  it.each([
    ['noreply on eom', 'eom', noreply],
    ['nocallback on close', 'close', nocallback],
    ['symlist on header', 'header', symlist('i')],
    ['decode on body', 'body', decode('bytes')],
  ] as const)('reject %s at definition', (_n, method, dec) => {
    class T extends Base {
      override eom() { return CONTINUE; }
      override close() { return CONTINUE; }
      override header() { return CONTINUE; }
      override body() { return CONTINUE; }
    }
    expect(() => decorate(T, method, dec as any)).toThrow(InvalidArgumentError);
  });

  it('reject bad arguments', () => {
    expect(() => symlist()).toThrow(/at least one macro/);
    expect(() => decode('latin1' as any)).toThrow(/expected 'string' or 'bytes'/);
    class T extends OnlyRcpt {}
    expect(() => decorate(T, 'envrcpt', noreply)).toThrow(/does not define a method "envrcpt" itself/);
  });

  it('work with real decorator syntax compiled by TypeScript (experimentalDecorators off)', () => {
    const { Fixture, Child } = compileMilter(`
      import { Base, CONTINUE, noreply, nocallback, symlist, decode } from 'nodemilter';
      export class Fixture extends Base {
        @noreply @symlist('{auth_authen}')
        override envfrom(from: string) { return CONTINUE; }
        @decode('bytes')
        override header(name: string, value: Buffer) { return CONTINUE; }
        @nocallback
        override body() { return CONTINUE; }
      }
      export class Child extends Fixture {
        override body() { return CONTINUE; }
      }
    `);
    const steps = protocolSteps(Fixture);
    expect(steps & (P_NR_MAIL | P_NOMAIL)).toBe(P_NR_MAIL);
    expect(steps & P_NOBODY).toBe(P_NOBODY);
    expect(steps & P_NOHDRS).toBe(0);
    expect(protocolSteps(Child) & P_NOBODY).toBe(0);
    const d = describe(Fixture);
    expect(d.noreply).toEqual(['envfrom']);
    expect(d.symlists).toEqual({ [M_ENVFROM]: ['{auth_authen}'] });
    expect(d.decode).toEqual({ header: 'bytes' });
  });

  it('reject a misplaced decorator at class definition with real syntax', () => {
    expect(() =>
      compileMilter(`
        import { Base, CONTINUE, noreply } from 'nodemilter';
        export class Bad extends Base { @noreply override eom() { return CONTINUE; } }
      `),
    ).toThrow(/@noreply cannot apply to eom\(\)/);
  });
});

suite('resolveNegotiation', () => {
  const offer = { actions: SMFI_CURR_ACTS, steps: SMFI_CURR_PROT };

  it('takes every offered action when flags are undefined and drops unoffered steps', () => {
    const d = describe(Switches);
    const n = resolveNegotiation(d, { actions: ADDHDRS | CHGHDRS, steps: SMFIP_NO_ALL | P_SKIP });
    expect(n.actions).toBe(ADDHDRS | CHGHDRS);
    expect(n.steps).toBe((ALL_NO & ~P_NORCPT) | P_SKIP); // RCPT_REJ, HDR_LEADSPC not offered
  });

  it('limits actions to the declared flags', () => {
    class F extends Base {
      static override flags = ADDHDRS;
    }
    expect(resolveNegotiation(describe(F), offer).actions).toBe(ADDHDRS);
  });

  it('sends symlists only when SETSYMLIST is offered', () => {
    class S extends Base {
      override envfrom() { return CONTINUE; }
    }
    decorate(S, 'envfrom', symlist('i'));
    const d = describe(S);
    expect(resolveNegotiation(d, offer).symlists).toEqual({ [M_ENVFROM]: ['i'] });
    const without = resolveNegotiation(d, { actions: ADDHDRS, steps: SMFI_CURR_PROT });
    expect(without.symlists).toEqual({});
    expect(without.actions).toBe(ADDHDRS);
  });

  it('defaultSteps derives NO*/NR* from a plain description', () => {
    const steps = defaultSteps({ callbacks: { envrcpt: () => CONTINUE, header: () => CONTINUE }, noreply: ['header'] });
    expect(steps).toBe((ALL_NO & ~P_NORCPT & ~P_NOHDRS) | P_NR_HDR | P_SKIP);
  });

  it('Base.negotiate answers the same as the static description', async () => {
    class Neg extends QuietHeader {
      override negotiate(o: any) { return super.negotiate(o); }
    }
    const { TestCtx } = await import('../src/testing/testctx');
    const t = new TestCtx(Neg);
    await t.negotiate({ actions: SMFI_CURR_ACTS, steps: SMFI_CURR_PROT });
    expect(t.steps).toBe(protocolSteps(Neg));
    expect(t.actions).toBe(SMFI_CURR_ACTS);
  });
});
