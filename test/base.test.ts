import { describe as suite, it, expect, vi } from 'vitest';
import {
  Base, Milter, describe, decorate, noreply, nocallback, param2dict, protocolSteps, CONTINUE, REJECT, TEMPFAIL, ACCEPT, DISCARD, P_NOMAIL, P_NR_MAIL,
  ADDHDRS, CHGHDRS, ADDRCPT, ADDRCPT_PAR, CHGFROM, DELRCPT, QUARANTINE, CHGBODY, SMFI_CURR_ACTS, SMFI_CURR_PROT,
  DisabledActionError, ActionNotAllowedError, InvalidReplyError, InvalidArgumentError,
} from '../src/index';
import type { Logger, MilterContext } from '../src/index';
import { TestCtx } from '../src/testing/testctx';

function memoryLogger() {
  const lines: { level: string; message: string }[] = [];
  const logger: Logger = {
    info: (message) => void lines.push({ level: 'info', message }),
    warn: (message) => void lines.push({ level: 'warn', message }),
    error: (message) => void lines.push({ level: 'error', message }),
  };
  return { lines, logger };
}

suite('per-message and per-connection state', () => {
  const events: string[] = [];
  class Counting extends Base<{ rcpts: string[]; id: number }> {
    static created = 0;
    static messages = 0;
    readonly serial = ++Counting.created;
    heloName = '';
    messagesSeen = 0;
    protected override newMessage() {
      return { rcpts: [] as string[], id: ++Counting.messages };
    }
    override hello(name: string) {
      this.heloName = name;
      return CONTINUE;
    }
    override envrcpt(to: string) {
      this.message.rcpts.push(to);
      return CONTINUE;
    }
    override async eom() {
      await new Promise((r) => setTimeout(r, 1));
      this.messagesSeen++;
      events.push(`eom#${this.serial} msg${this.message.id} ${this.message.rcpts.join(',')} helo=${this.heloName}`);
      return CONTINUE;
    }
    override abort() {
      events.push(`abort#${this.serial} msg${this.message.id} ${this.message.rcpts.join(',')}`);
    }
  }

  it('two messages and an abort on one connection: message state starts clean, connection state stays', async () => {
    const t = new TestCtx(Counting);
    await t.connect();
    await t.helo('client.example');
    expect(await t.feedMessage('Subject: one\r\n\r\nbody\r\n', { rcpts: ['<a@x>', '<b@x>'] })).toBe(CONTINUE);
    // second message aborted after a recipient
    await t.envfrom('<s@x>');
    await t.envrcpt('<c@x>');
    await t.abort();
    expect(await t.feedMessage('Subject: three\r\n\r\nbody\r\n', { rcpts: ['<d@x>'] })).toBe(CONTINUE);
    const inst = t.milter as Counting;
    await t.close();
    expect(events).toEqual([
      'eom#1 msg1 <a@x>,<b@x> helo=client.example',
      'abort#1 msg2 <c@x>',
      'eom#1 msg3 <d@x> helo=client.example',
    ]);
    expect(inst.messagesSeen).toBe(2);
    expect(Counting.created).toBe(1);
  });

  it('envfrom starts a fresh message even when the previous one got neither eom nor abort', () => {
    const sizes: number[] = [];
    class Fresh extends Base<{ rcpts: string[] }> {
      protected override newMessage() {
        return { rcpts: [] };
      }
      override envfrom() {
        return CONTINUE;
      }
      override envrcpt(to: string) {
        this.message.rcpts.push(to);
        sizes.push(this.message.rcpts.length);
        return REJECT;
      }
    }
    const d = describe(Fresh);
    const ctx = { id: 901, actions: 0, steps: 0 } as unknown as MilterContext;
    d.callbacks.envfrom!(ctx, '<a@x>');
    d.callbacks.envrcpt!(ctx, '<b@x>');
    d.callbacks.envrcpt!(ctx, '<c@x>');
    d.callbacks.envfrom!(ctx, '<a@x>'); // no abort in between
    d.callbacks.envrcpt!(ctx, '<d@x>');
    expect(sizes).toEqual([1, 2, 1]);
  });

  it('TestCtx aborts an unfinished message at the next envfrom, as an MTA does', async () => {
    const sizes: number[] = [];
    let aborts = 0;
    class NoEnvfrom extends Base<{ rcpts: string[] }> {
      protected override newMessage() {
        return { rcpts: [] };
      }
      override envrcpt(to: string) {
        this.message.rcpts.push(to);
        sizes.push(this.message.rcpts.length);
        return REJECT;
      }
      override abort() {
        aborts++;
      }
    }
    const t = new TestCtx(NoEnvfrom);
    await t.envfrom('<a@x>');
    await t.envrcpt('<b@x>');
    await t.envrcpt('<c@x>');
    await t.envfrom('<a@x>');
    await t.envrcpt('<d@x>');
    expect(sizes).toEqual([1, 2, 1]);
    expect(aborts).toBe(1);
  });

  it('message state is created lazily when envfrom is negotiated away, and dropped after eom', async () => {
    const seen: unknown[] = [];
    class NoEnvfrom extends Base<{ n: number }> {
      protected override newMessage() {
        return { n: 0 };
      }
      override header() {
        this.message.n++;
        return CONTINUE;
      }
      override eom() {
        seen.push(this.message.n);
        return CONTINUE;
      }
    }
    const t = new TestCtx(NoEnvfrom);
    await t.feedMessage('A: 1\r\nB: 2\r\n\r\n');
    await t.feedMessage('A: 1\r\n\r\n');
    expect(seen).toEqual([2, 1]);
    expect(t.resultsOf('envfrom')[0].called).toBe(false);
  });

  it('a new connection gets a new instance; the old one is dropped at close', async () => {
    const instances: Base[] = [];
    class Track extends Base {
      constructor() {
        super();
        instances.push(this);
      }
      override envfrom() {
        return CONTINUE;
      }
    }
    const desc = describe(Track);
    const ctx = (id: number): MilterContext =>
      ({ id, actions: 0, steps: 0, closed: false, getpriv: () => undefined, setpriv() {} }) as unknown as MilterContext;
    const a = ctx(1);
    const b = ctx(2);
    desc.callbacks.envfrom!(a, '<x@y>');
    desc.callbacks.envfrom!(b, '<x@y>');
    desc.callbacks.envfrom!(a, '<x@y>');
    expect(instances.length).toBe(2);
    desc.callbacks.close!(a);
    desc.callbacks.envfrom!(a, '<x@y>'); // same id reused by a later connection
    expect(instances.length).toBe(3);
    // close without any event does not create an instance
    expect(desc.callbacks.close!(ctx(3))).toBe(CONTINUE);
    expect(instances.length).toBe(3);
  });
});

suite('actions', () => {
  it('modifications outside eom throw ActionNotAllowedError naming the callback', async () => {
    let error: unknown;
    class Early extends Base {
      override envrcpt() {
        try {
          this.addheader('X-Early', 'yes');
        } catch (e) {
          error = e;
        }
        return CONTINUE;
      }
    }
    const t = new TestCtx(Early);
    await t.envfrom('<a@b>');
    await t.envrcpt('<c@d>');
    expect(error).toBeInstanceOf(ActionNotAllowedError);
    expect((error as Error).message).toBe('addheader() is allowed only inside eom(), not inside envrcpt()');
  });

  it('a modification after eom resolved (unawaited promise) is refused', async () => {
    let later: Promise<unknown> | undefined;
    class Leaky extends Base {
      override eom() {
        later = new Promise((r) => setTimeout(r, 5)).then(() => this.addheader('X-Late', 'x'));
        return CONTINUE;
      }
    }
    const t = new TestCtx(Leaky);
    await t.feedMessage('A: b\r\n\r\n');
    await expect(later).rejects.toThrow(/allowed only inside eom\(\), not between callbacks \(was a promise left unawaited\?\)/);
    expect(t.headerChanges).toEqual([]);
  });

  it('actions whose flag is not negotiated throw DisabledActionError with the flag', async () => {
    const errors: DisabledActionError[] = [];
    class Flags extends Base {
      static override flags = ADDHDRS;
      override eom() {
        for (const f of [
          () => this.chgheader('Subject', 1, 'x'),
          () => this.addrcpt('<n@x>'),
          () => this.delrcpt('<n@x>'),
          () => this.chgfrom('<n@x>'),
          () => this.quarantine('why'),
          () => this.replacebody('b'),
        ]) {
          try {
            f();
          } catch (e) {
            errors.push(e as DisabledActionError);
          }
        }
        this.addheader('X-Ok', '1');
        return CONTINUE;
      }
    }
    const t = new TestCtx(Flags);
    await t.feedMessage('A: b\r\n\r\n');
    expect(t.actions).toBe(ADDHDRS);
    expect(errors.map((e) => e.flag)).toEqual([CHGHDRS, ADDRCPT, DELRCPT, CHGFROM, QUARANTINE, CHGBODY]);
    expect(errors.every((e) => e instanceof DisabledActionError)).toBe(true);
    expect(errors[0].message).toBe('chgheader() needs the CHGHDRS action flag, not negotiated for this connection (add CHGHDRS to static flags)');
    expect(t.headerChanges).toEqual([{ op: 'add', name: 'X-Ok', value: '1' }]);
  });

  it('addrcpt with params needs ADDRCPT_PAR; the hint says the MTA did not offer it', async () => {
    let err: any;
    class Par extends Base {
      override eom() {
        try {
          this.addrcpt('<n@x>', ['NOTIFY=NEVER']);
        } catch (e) {
          err = e;
        }
        this.addrcpt('<m@x>');
        return CONTINUE;
      }
    }
    const t = new TestCtx(Par, { offer: { actions: SMFI_CURR_ACTS & ~ADDRCPT_PAR } });
    await t.feedMessage('A: b\r\n\r\n');
    expect(err).toBeInstanceOf(DisabledActionError);
    expect(err.flag).toBe(ADDRCPT_PAR);
    expect(err.message).toMatch(/the MTA did not offer it/);
    expect(t.addedRecipients).toEqual([{ rcpt: '<m@x>' }]);
  });

  it('setreply validates before reaching the context', async () => {
    class Reply extends Base {
      override envrcpt(to: string) {
        if (to === '<bad@x>') this.setreply('550', '5.7.1', '100% wrong');
        this.setreply('550', '5.1.1', 'No such user', 'really');
        return REJECT;
      }
    }
    const t = new TestCtx(Reply);
    await t.envfrom('<a@b>');
    await expect(t.envrcpt('<bad@x>')).rejects.toThrow(InvalidReplyError);
    expect(await t.envrcpt('<ok@x>')).toBe(REJECT);
    expect(t.reply).toEqual({ rcode: '550', xcode: '5.1.1', lines: ['No such user', 'really'] });
  });

  it('addheader/chgheader validate names and indices', async () => {
    const errs: string[] = [];
    class Bad extends Base {
      override eom() {
        for (const f of [() => this.addheader('Bad Name', 'x'), () => this.chgheader('X', 0, 'x'), () => this.addheader('X', 'a\0b')]) {
          try {
            f();
          } catch (e) {
            errs.push((e as Error).message);
          }
        }
        return CONTINUE;
      }
    }
    await new TestCtx(Bad).feedMessage('A: b\r\n\r\n');
    expect(errs).toEqual([
      'header name "Bad Name" is invalid: expected printable ASCII without ":", spaces or control characters',
      'header index 0 is invalid: expected an integer >= 1 (it counts from 1 among headers of that name)',
      'value of header "X" contains NUL: "a\\u0000b"',
    ]);
  });

  it('setsymlist only inside negotiate; progress only inside eom', async () => {
    const errs: string[] = [];
    class Misuse extends Base {
      override connect() {
        try {
          this.setsymlist(0, 'j');
        } catch (e) {
          errs.push((e as Error).message);
        }
        try {
          this.progress();
        } catch (e) {
          errs.push((e as Error).message);
        }
        return CONTINUE;
      }
      override eom() {
        this.progress();
        this.progress();
        return CONTINUE;
      }
    }
    const t = new TestCtx(Misuse);
    await t.connect();
    await t.feedMessage('A: b\r\n\r\n');
    expect(errs).toEqual([
      'setsymlist() is allowed only inside negotiate(), not inside connect()',
      'progress() is allowed only inside eom(), not inside connect()',
    ]);
    expect(t.progressCount).toBe(2);
  });

  it('actions before any event say so', () => {
    const m = new Base();
    expect(() => m.getsymval('i')).toThrow(/getsymval\(\) needs a connection/);
    expect(m.actions).toBe(0);
    expect(m.running).toBeUndefined();
  });
});

suite('@noreply and @nocallback results', () => {
  it('a @noreply method returning REJECT is logged as an error and CONTINUE stands', async () => {
    const { lines, logger } = memoryLogger();
    class Quiet extends Base {
      static override logger = logger;
      order: string[] = [];
      override async header(name: string) {
        await new Promise((r) => setTimeout(r, 1));
        this.order.push(name);
        return name === 'Bad' ? REJECT : CONTINUE;
      }
      override eoh() {
        this.order.push('eoh');
        return CONTINUE;
      }
    }
    decorate(Quiet, 'header', noreply);
    const t = new TestCtx(Quiet);
    expect(await t.feedMessage('Good: 1\r\nBad: 2\r\n\r\n')).toBe(CONTINUE);
    expect((t.milter as Quiet).order).toEqual(['Good', 'Bad', 'eoh']); // handler still runs, in order
    expect(t.resultsOf('header').map((r) => [r.status, r.returned])).toEqual([
      [CONTINUE, CONTINUE],
      [CONTINUE, CONTINUE],
    ]);
    expect(lines).toEqual([
      { level: 'error', message: 'Quiet.header() is @noreply but returned REJECT; the MTA does not wait for it, so CONTINUE stands' },
    ]);
  });

  it('a @nocallback method called anyway (no negotiation support) is checked too', async () => {
    const { lines, logger } = memoryLogger();
    class NC extends Base {
      static override logger = logger;
      override envrcpt() {
        return TEMPFAIL;
      }
    }
    decorate(NC, 'envrcpt', nocallback);
    const desc = describe(() => new NC()); // per-connection path: every callback present
    const ctx = { id: 77, actions: 0, steps: 0 } as unknown as MilterContext;
    expect(desc.callbacks.envrcpt!(ctx, '<a@b>')).toBe(CONTINUE);
    expect(lines[0].message).toMatch(/NC\.envrcpt\(\) is @nocallback but returned TEMPFAIL/);
  });
});

suite('errors and dispatch', () => {
  it('errors thrown by a method reach the engine (here TestCtx) and state is released', async () => {
    class Throws extends Base {
      override async envrcpt() {
        throw new Error('boom');
      }
    }
    const t = new TestCtx(Throws);
    await t.envfrom('<a@b>');
    await expect(t.envrcpt('<c@d>')).rejects.toThrow('boom');
    expect(t.milter!.running).toBeUndefined();
  });

  it('a factory function with options.class is described statically', async () => {
    class Cfg extends Base {
      constructor(readonly verdict: number) {
        super();
      }
      override envfrom() {
        return this.verdict;
      }
    }
    const t = new TestCtx(describe(() => new Cfg(ACCEPT), { class: Cfg as any }));
    expect(await t.envfrom('<a@b>')).toBe(ACCEPT);
    expect(t.resultsOf('helo')).toEqual([]);
  });

  it('a factory returning something else is an error', () => {
    const desc = describe((() => ({})) as any);
    expect(() => desc.callbacks.connect!({ id: 5 } as any, 'h', 'inet', null)).toThrow(InvalidArgumentError);
  });
});

suite('Milter (logging subclass)', () => {
  it('logs every callback and keeps no-reply steps at CONTINUE', async () => {
    const { lines, logger } = memoryLogger();
    class Logged extends Milter {
      static override logger = logger;
    }
    const t = new TestCtx(Logged);
    await t.connect('mx.example', 'inet6', { address: '2001:db8::1', port: 25 });
    await t.helo('helo.example');
    await t.feedMessage('Subject: hi\r\n\r\nbody\r\n', { from: '<s@x>', fromParams: ['SIZE=10'], rcpts: ['<r@x>'] });
    await t.close();
    expect(lines.map((l) => l.message)).toEqual([
      'connect from mx.example at [2001:db8::1]:25',
      'hello from helo.example',
      'mail from <s@x> SIZE=10',
      'rcpt to <r@x>',
      'data',
      'Subject: hi',
      'eoh',
      'eom',
      'close',
    ]);
    expect(t.resultsOf('body')[0].called).toBe(false);
  });
});

suite('param2dict', () => {
  it.each([
    [['SIZE=1024', 'BODY=8BITMIME'], { SIZE: '1024', BODY: '8BITMIME' }],
    [['smtputf8'], { SMTPUTF8: true }],
    [['ORCPT=rfc822;a+2Bb@x=y'], { ORCPT: 'rfc822;a+2Bb@x=y' }],
    [['', '=nokey', 'RET=hdrs', 'ret=FULL'], { RET: 'FULL' }],
    [[Buffer.from('ENVID=abc')], { ENVID: 'abc' }],
    [['AUTH='], { AUTH: '' }],
  ] as const)('%j', (params, expected) => {
    expect(param2dict(params as any)).toEqual(expected);
  });
});

suite('abort() only for an open transaction', () => {
  class Watch extends Base {
    static override flags = ADDHDRS;
    seen: string[] = [];
    override envfrom(from: string) {
      this.seen.push(`envfrom ${from}`);
      return from === '<refused@x>' ? REJECT : CONTINUE;
    }
    override header(name: string) {
      this.seen.push(`header ${name}`);
      return name === 'Stop' ? DISCARD : CONTINUE;
    }
    override eom() {
      this.seen.push('eom');
      return CONTINUE;
    }
    override abort() {
      this.seen.push('abort');
    }
  }

  it('runs for RSET after RCPT; not after eom, not before MAIL, not after MAIL was refused or a header DISCARD ended the message', async () => {
    const t = new TestCtx(Watch);
    await t.connect();
    await t.helo();
    await t.abort(); // before any MAIL
    await t.envfrom('<a@x>');
    await t.envrcpt('<b@y>');
    await t.abort(); // RSET after RCPT: a real abort
    expect(await t.feedMessage('A: 1\r\n\r\nbody\r\n')).toBe(CONTINUE);
    await t.abort(); // after a delivered message (Postfix sends this)
    await t.abort();
    await t.envfrom('<refused@x>');
    await t.abort(); // after MAIL was refused
    expect(await t.feedMessage('Stop: 1\r\n\r\n')).toBe(DISCARD); // TestCtx aborts after DISCARD, as the MTA does
    const m = t.milter as Watch;
    expect(m.seen).toEqual(['envfrom <a@x>', 'abort', 'envfrom <sender@example.com>', 'header A', 'eom', 'envfrom <refused@x>', 'envfrom <sender@example.com>', 'header Stop']);
    expect(t.resultsOf('abort').length).toBe(6); // every ABORT TestCtx sent, as an MTA would
    await t.close();
  });

  it('a class that overrides abort() but not envfrom() gets envfrom as @noreply, so Base sees MAIL', () => {
    class OnlyAbort extends Base {
      override abort() {}
    }
    class Neither extends Base {}
    expect(protocolSteps(OnlyAbort) & P_NOMAIL).toBe(0);
    expect(protocolSteps(OnlyAbort) & P_NR_MAIL).toBe(P_NR_MAIL);
    expect(protocolSteps(Neither) & P_NOMAIL).toBe(P_NOMAIL);
    expect(describe(OnlyAbort).noreply).toContain('envfrom');
  });

  it('a @nocallback envfrom with an abort() still does not run', async () => {
    const seen: string[] = [];
    class Quiet extends Base {
      override envfrom() {
        seen.push('envfrom');
        return CONTINUE;
      }
      override abort() {
        seen.push('abort');
      }
    }
    decorate(Quiet, 'envfrom', nocallback);
    expect(protocolSteps(Quiet) & P_NR_MAIL).toBe(P_NR_MAIL);
    const t = new TestCtx(Quiet);
    await t.connect();
    await t.envfrom('<a@x>');
    await t.abort();
    expect(seen).toEqual(['abort']);
    await t.close();
  });

  it('an abort() that only overrides abort still runs for a real abort (TestCtx, MTA offering NR_MAIL)', async () => {
    const seen: string[] = [];
    class OnlyAbort extends Base {
      override abort() {
        seen.push('abort');
      }
    }
    const t = new TestCtx(OnlyAbort);
    await t.connect();
    await t.abort();
    await t.envfrom('<a@x>');
    await t.abort();
    await t.abort();
    expect(seen).toEqual(['abort']);
    await t.close();
  });
});
