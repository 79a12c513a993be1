import { describe as suite, it, expect } from 'vitest';
import { mkdtempSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import {
  Base, decorate, noreply, symlist, decode, CONTINUE, REJECT, TEMPFAIL, ACCEPT, SKIP, NOREPLY, ALL_OPTS, DISCARD,
  ADDHDRS, CHGHDRS, SETSYMLIST, SMFI_CURR_ACTS, SMFI_CURR_PROT, SMFIP_NO_ALL, P_SKIP, P_NR_HDR, P_NOHDRS, P_NOBODY,
  P_HDR_LEADSPC, P_RCPT_REJ, M_CONNECT, M_ENVFROM, M_ENVRCPT, M_EOM, InvalidStatusError, ContextClosedError,
  ActionNotAllowedError,
} from '../src/index';
import type { MilterDescription, NegotiateOffer } from '../src/index';
import { TestCtx } from '../src/testing/testctx';

const MESSAGE = [
  'From: Alice <alice@example.com>',
  'To: bob@example.com',
  'Subject: hello',
  '  world',
  'Received: from a',
  'Received: from b',
  '',
  'line one',
  'line two',
  '',
].join('\n'); // LF on purpose: the harness delivers CRLF as SMTP does

class Editor extends Base {
  override async eom() {
    this.addheader('X-Added', 'end');
    this.addheader('X-First', 'top', 0);
    this.chgheader('Received', 2, 'from changed');
    this.chgheader('Subject', 1, '');
    this.chgheader('X-Missing', 1, 'appended because absent');
    this.addheader('X-Folded', 'a\n\tb');
    this.addrcpt('<carol@example.com>');
    this.addrcpt('<dave@example.com>', 'NOTIFY=NEVER');
    this.delrcpt('<bob@example.com>');
    this.chgfrom('<bounce@example.com>', ['RET=HDRS']);
    this.replacebody('new body\r\n');
    this.replacebody('second part\r\n');
    this.quarantine('looks odd');
    this.progress();
    return CONTINUE;
  }
}

suite('TestCtx records modifications and builds the resulting message', () => {
  it('applies header, recipient, sender and body changes as an MTA would', async () => {
    const t = new TestCtx(Editor);
    const status = await t.feedMessage(MESSAGE, { from: '<alice@example.com>', rcpts: ['<bob@example.com>', '<eve@example.com>'] });
    expect(status).toBe(CONTINUE);
    expect(t.headerChanges).toEqual([
      { op: 'add', name: 'X-Added', value: 'end' },
      { op: 'insert', name: 'X-First', value: 'top', index: 0 },
      { op: 'change', name: 'Received', value: 'from changed', index: 2 },
      { op: 'delete', name: 'Subject', index: 1 },
      { op: 'change', name: 'X-Missing', value: 'appended because absent', index: 1 },
      { op: 'add', name: 'X-Folded', value: 'a\n\tb' },
    ]);
    expect(t.addedRecipients).toEqual([{ rcpt: '<carol@example.com>' }, { rcpt: '<dave@example.com>', params: 'NOTIFY=NEVER' }]);
    expect(t.deletedRecipients).toEqual(['<bob@example.com>']);
    expect(t.newSender).toEqual({ sender: '<bounce@example.com>', params: 'RET=HDRS' });
    expect(t.replacedBody?.toString()).toBe('new body\r\nsecond part\r\n');
    expect(t.quarantineReason).toBe('looks odd');
    expect(t.progressCount).toBe(1);
    expect(t.resultEnvelope()).toEqual({
      sender: '<bounce@example.com>',
      recipients: ['<eve@example.com>', '<carol@example.com>', '<dave@example.com>'],
    });
    expect(t.resultMessage().toString()).toBe(
      [
        'X-First: top',
        'From: Alice <alice@example.com>',
        'To: bob@example.com',
        'Received: from a',
        'Received: from changed',
        'X-Added: end',
        'X-Missing: appended because absent',
        'X-Folded: a',
        '\tb',
        '',
        'new body',
        'second part',
        '',
      ].join('\r\n'),
    );
  });

  it('keeps the original body and folded headers byte for byte when nothing changes', async () => {
    const t = new TestCtx(class extends Base {});
    await t.feedMessage(MESSAGE);
    expect(t.resultMessage().toString()).toBe(MESSAGE.replace(/\n/g, '\r\n'));
  });

  it('header values arrive without the leading space, folded with LF', async () => {
    const seen: [string, string][] = [];
    class Hdr extends Base {
      override header(name: string, value: string) {
        seen.push([name, value]);
        return CONTINUE;
      }
    }
    const t = new TestCtx(Hdr);
    await t.feedMessage(MESSAGE);
    expect(seen.slice(0, 3)).toEqual([
      ['From', 'Alice <alice@example.com>'],
      ['To', 'bob@example.com'],
      ['Subject', 'hello\n  world'],
    ]);
  });

  it('with HDR_LEADSPC values arrive and are added raw', async () => {
    const seen: string[] = [];
    class Lead extends Base {
      static override headerLeadingSpace = true;
      override header(_name: string, value: string) {
        seen.push(value);
        return CONTINUE;
      }
      override eom() {
        this.addheader('X-Raw', '\tindented');
        this.chgheader('To', 1, ' carol@example.com');
        return CONTINUE;
      }
    }
    const t = new TestCtx(Lead);
    await t.feedMessage('To: bob@example.com\r\n\r\nx\r\n');
    expect(t.steps & P_HDR_LEADSPC).toBe(P_HDR_LEADSPC);
    expect(seen).toEqual([' bob@example.com']);
    expect(t.resultMessage().toString()).toBe('To: carol@example.com\r\nX-Raw:\tindented\r\n\r\nx\r\n');
  });

  it('@decode("bytes") delivers Buffers, 8-bit bytes intact', async () => {
    const seen: unknown[] = [];
    class Raw extends Base {
      override envfrom(from: Buffer) {
        seen.push(from);
        return CONTINUE;
      }
      override header(_n: string, value: Buffer) {
        seen.push(value);
        return CONTINUE;
      }
    }
    decorate(Raw, 'envfrom', decode('bytes'));
    decorate(Raw, 'header', decode('bytes'));
    const t = new TestCtx(Raw);
    await t.feedMessage(Buffer.concat([Buffer.from('Subject: caf'), Buffer.from([0xe9]), Buffer.from('\r\n\r\n')]), { from: '<a@b>' });
    expect(seen[0]).toEqual(Buffer.from('<a@b>'));
    expect(seen[1]).toEqual(Buffer.from([0x63, 0x61, 0x66, 0xe9]));
  });

  it('reads a message from a path', async () => {
    const dir = mkdtempSync(join(tmpdir(), 'testctx-'));
    const file = join(dir, 'msg.eml');
    writeFileSync(file, 'From x@y Mon Jan  1 00:00:00 2024\nSubject: file\n\nfrom disk\n');
    const t = new TestCtx(class extends Base {});
    expect(await t.feedMessage({ path: file })).toBe(CONTINUE);
    expect(t.resultMessage().toString()).toBe('Subject: file\r\n\r\nfrom disk\r\n');
  });
});

suite('TestCtx honours negotiation', () => {
  it('steps negotiated away are not called; eom always is', async () => {
    const called: string[] = [];
    class Few extends Base {
      override envrcpt() {
        called.push('envrcpt');
        return CONTINUE;
      }
      override eom() {
        called.push('eom');
        return CONTINUE;
      }
    }
    const t = new TestCtx(Few);
    await t.feedMessage('A: b\r\n\r\nbody\r\n');
    expect(called).toEqual(['envrcpt', 'eom']);
    expect(t.results.map((r) => `${r.step}:${r.called}`)).toEqual([
      'negotiate:false', 'connect:false', 'helo:false', 'envfrom:false', 'envrcpt:true', 'data:false', 'header:false',
      'eoh:false', 'body:false', 'eom:true',
    ]);
  });

  it('SKIP from body stops the body but still reaches eom, and the rest is delivered', async () => {
    const chunks: string[] = [];
    class Skipper extends Base {
      override body(chunk: Buffer) {
        chunks.push(chunk.toString());
        return SKIP;
      }
      override eom() {
        return ACCEPT;
      }
    }
    const t = new TestCtx(Skipper);
    expect(await t.feedMessage('A: b\r\n\r\n0123456789', { chunkSize: 4 })).toBe(ACCEPT);
    expect(chunks).toEqual(['0123']);
    expect(t.resultsOf('eom')[0].status).toBe(ACCEPT);
    expect(t.resultMessage().toString()).toBe('A: b\r\n\r\n0123456789');
  });

  it('SKIP without SMFIP_SKIP negotiated is an invalid status', async () => {
    class Skipper extends Base {
      static override skip = false;
      override body() {
        return SKIP;
      }
    }
    const t = new TestCtx(Skipper);
    await expect(t.feedMessage('A: b\r\n\r\nbody')).rejects.toThrow(/body returned SKIP but SMFIP_SKIP was not negotiated/);
  });

  it('no-reply steps count as CONTINUE even when the MTA did not offer NR', async () => {
    class Q extends Base {
      override header() {
        return CONTINUE;
      }
    }
    decorate(Q, 'header', noreply);
    const t = new TestCtx(Q, { offer: { steps: SMFIP_NO_ALL | P_SKIP } });
    await t.feedMessage('A: b\r\n\r\n');
    expect(t.steps & P_NR_HDR).toBe(0);
    expect(t.resultsOf('header')[0]).toEqual({ step: 'header', status: CONTINUE, returned: CONTINUE, called: true });
  });

  it('a plain description: NOREPLY allowed only where NR was negotiated; a lost REJECT becomes CONTINUE', async () => {
    const desc: MilterDescription = {
      name: 'plain',
      callbacks: { header: (_c, name) => (name === 'Reject' ? REJECT : NOREPLY), eom: () => CONTINUE },
      steps: P_NR_HDR | P_SKIP | (SMFIP_NO_ALL & ~P_NOHDRS),
    };
    const t = new TestCtx(desc);
    expect(await t.feedMessage('Reject: me\r\nOther: x\r\n\r\n')).toBe(CONTINUE);
    expect(t.resultsOf('header').map((r) => r.status)).toEqual([CONTINUE, CONTINUE]);

    const bad = new TestCtx({ ...desc, steps: SMFIP_NO_ALL & ~P_NOHDRS });
    await expect(bad.feedMessage('X: y\r\n\r\n')).rejects.toThrow(InvalidStatusError);
  });

  it('getsymval sees macros of stages reached, filtered by the negotiated symlists', async () => {
    const seen: Record<string, unknown> = {};
    class Macros extends Base {
      override connect() {
        seen.connect = [this.getsymval('j'), this.getsymval('{daemon_name}'), this.getsymval('i')];
        return CONTINUE;
      }
      override envfrom() {
        seen.envfrom = [this.getsymval('{auth_authen}'), this.getsymval('auth_type'), this.getsymval('i')];
        return CONTINUE;
      }
      override eom() {
        seen.eom = [this.getsymval('i'), this.getsymval('j'), this.getsymval('{auth_authen}')];
        return CONTINUE;
      }
    }
    decorate(Macros, 'connect', symlist('j'));
    decorate(Macros, 'envfrom', symlist('{auth_authen}'));
    const t = new TestCtx(Macros, {
      macros: {
        [M_CONNECT]: { j: 'mx.example', '{daemon_name}': 'MTA' },
        [M_ENVFROM]: { '{auth_authen}': 'alice', '{auth_type}': 'PLAIN' },
        [M_EOM]: { i: 'QUEUEID1' },
      },
    });
    await t.feedMessage('A: b\r\n\r\n');
    expect(t.symlists).toEqual({ [M_CONNECT]: ['j'], [M_ENVFROM]: ['{auth_authen}'] });
    expect(t.actions & SETSYMLIST).toBe(SETSYMLIST);
    expect(seen).toEqual({
      connect: ['mx.example', undefined, undefined],
      envfrom: ['alice', undefined, undefined],
      eom: ['QUEUEID1', 'mx.example', 'alice'],
    });
  });

  it('a new message forgets the previous message macros but keeps connection ones', async () => {
    const seen: unknown[] = [];
    class M extends Base {
      override envrcpt() {
        seen.push([this.getsymval('j'), this.getsymval('{rcpt_addr}')]);
        return CONTINUE;
      }
      override envfrom() {
        seen.push(this.getsymval('{rcpt_addr}'));
        return CONTINUE;
      }
    }
    const t = new TestCtx(M, { macros: { [M_CONNECT]: { j: 'mx' } } });
    t.setmacros(M_ENVRCPT, { '{rcpt_addr}': 'bob' });
    await t.feedMessage('A: b\r\n\r\n');
    await t.feedMessage('A: b\r\n\r\n');
    expect(seen).toEqual([undefined, ['mx', 'bob'], undefined, ['mx', 'bob']]);
  });

  it('an overridden negotiate decides; REJECT refuses the connection', async () => {
    const offers: NegotiateOffer[] = [];
    class Picky extends Base {
      override negotiate(offer: NegotiateOffer) {
        offers.push(offer);
        return { status: offer.actions & CHGHDRS ? CONTINUE : REJECT, actions: ADDHDRS, steps: SMFIP_NO_ALL };
      }
    }
    const ok = new TestCtx(Picky);
    expect(await ok.negotiate()).toBe(CONTINUE);
    expect([ok.actions, ok.steps]).toEqual([ADDHDRS, SMFIP_NO_ALL]);
    expect(offers[0]).toEqual({ actions: SMFI_CURR_ACTS, steps: SMFI_CURR_PROT });

    const refused = new TestCtx(Picky, { offer: { actions: ADDHDRS } });
    expect(await refused.negotiate()).toBe(REJECT);
    expect(refused.closed).toBe(true);
    await expect(refused.connect()).rejects.toThrow(ContextClosedError);
  });

  it('ALL_OPTS takes the defaults; asking for unoffered bits aborts', async () => {
    class All extends Base {
      override envrcpt() {
        return CONTINUE;
      }
      override negotiate() {
        return { status: ALL_OPTS };
      }
    }
    const t = new TestCtx(All);
    expect(await t.negotiate()).toBe(ALL_OPTS);
    expect(t.steps & P_NOHDRS).toBe(P_NOHDRS);
    expect(t.actions).toBe(SMFI_CURR_ACTS);

    class Greedy extends Base {
      override negotiate() {
        return { status: CONTINUE, actions: 0, steps: P_RCPT_REJ };
      }
    }
    const g = new TestCtx(Greedy, { offer: { steps: SMFIP_NO_ALL } });
    await expect(g.negotiate()).rejects.toThrow(/did not offer: the MTA aborts the session/);
  });
});

suite('TestCtx message flow', () => {
  it('a rejected recipient is refused alone; with none left the message is aborted', async () => {
    const calls: string[] = [];
    class Rcpt extends Base {
      override envrcpt(to: string) {
        calls.push(to);
        return to.startsWith('<bad') ? REJECT : CONTINUE;
      }
      override data() {
        calls.push('data');
        return CONTINUE;
      }
      override abort() {
        calls.push('abort');
      }
    }
    const t = new TestCtx(Rcpt);
    expect(await t.feedMessage('A: b\r\n\r\n', { rcpts: ['<bad1@x>', '<good@x>'] })).toBe(CONTINUE);
    expect(t.recipients).toEqual(['<good@x>']);
    expect(await t.feedMessage('A: b\r\n\r\n', { rcpts: ['<bad2@x>'] })).toBe(REJECT);
    expect(calls).toEqual(['<bad1@x>', '<good@x>', 'data', '<bad2@x>', 'abort']);
  });

  it('a message-ending status before eom aborts the message; Base does not call abort() for a message the milter ended itself (as libmilter)', async () => {
    const calls: string[] = [];
    class Ender extends Base {
      override header(name: string) {
        calls.push(name);
        return name === 'Stop' ? DISCARD : CONTINUE;
      }
      override eom() {
        calls.push('eom');
        return CONTINUE;
      }
      override abort() {
        calls.push('abort');
      }
    }
    const t = new TestCtx(Ender);
    expect(await t.feedMessage('Go: 1\r\nStop: 2\r\nNever: 3\r\n\r\n')).toBe(DISCARD);
    expect(t.resultsOf('abort')).toHaveLength(1); // TestCtx sent ABORT, as the MTA does
    expect(calls).toEqual(['Go', 'Stop']);
  });

  it('a connect refusal stops the feed', async () => {
    class NoConn extends Base {
      override connect() {
        this.setreply('421', '4.7.0', 'Try again later');
        return TEMPFAIL;
      }
    }
    const t = new TestCtx(NoConn);
    expect(await t.feedMessage('A: b\r\n\r\n')).toBe(TEMPFAIL);
    expect(t.reply).toEqual({ rcode: '421', xcode: '4.7.0', lines: ['Try again later'] });
    expect(t.resultsOf('envfrom')).toEqual([]);
  });

  it('the context refuses modifications outside eom and after close', async () => {
    const t = new TestCtx(class extends Base {});
    await t.negotiate();
    expect(() => t.addheader('X', 'y')).toThrow(ActionNotAllowedError);
    await t.close();
    expect(() => t.getsymval('j')).toThrow(ContextClosedError);
  });

  it('manual stepping with header() builds the message too', async () => {
    class Tag extends Base {
      override eom() {
        this.chgheader('X-Tag', 2, 'second');
        return CONTINUE;
      }
    }
    const t = new TestCtx(Tag);
    await t.envfrom('<a@b>');
    await t.envrcpt('<c@d>');
    await t.data();
    await t.header('X-Tag', 'first');
    await t.header('x-tag', 'other');
    await t.eoh();
    await t.body('hi\r\n');
    expect(await t.eom()).toBe(CONTINUE);
    expect(t.resultMessage().toString()).toBe('X-Tag: first\r\nx-tag: second\r\n\r\nhi\r\n');
  });
});
