/**
 * nodemilter/mta's Milters chain against real milters: the e2e nodemilter
 * milter (test/fixtures/e2e/milter.cjs) on both engines, two of them in one
 * chain, OpenDKIM signing in front of it; and against scripted fake milters
 * for timeouts, default actions, failed dials, connection limits and reuse.
 */
import * as path from 'path';
import { afterAll, afterEach, beforeAll, describe, expect, it } from 'vitest';
import { Milters, HeaderList, readMessage } from '../../src/mta';
import { MilterTimeoutError } from '../../src/errors';
import { ENGINES, FIXTURES, checkEngine, engineEnv, freeInetSpec, freePort, startProcess, type RunningProcess } from '../helpers';
import { fakeMilter, packet, politeExcept, type Fake } from './fake-milter';
import { dkimResults, makeDkimKey, realMiltersUnavailable, startOpenDKIM, type DkimKey, type RealMilter } from './real-milters';

const E2E_MILTER = path.join(FIXTURES, 'e2e', 'milter.cjs');
// eslint-disable-next-line @typescript-eslint/no-var-requires
const { RCPT_TEXT, REJECT_TEXT, ADDED_RCPT } = require(E2E_MILTER);

function message(subject: string, body = 'Hello Bob.\r\n'): string {
  return [
    'From: Alice <alice@example.com>',
    'To: bob@example.org',
    `Subject: ${subject}`,
    'Date: Tue, 01 Dec 2026 20:00:00 +0000',
    'Message-ID: <chain-test@example.com>',
    'X-Folded: first',
    '\tsecond',
    '',
    body,
  ].join('\r\n');
}

async function startE2E(engine: string): Promise<RunningProcess> {
  const spec = await freeInetSpec();
  const p = await startProcess(process.execPath, { args: [E2E_MILTER, spec], env: engineEnv(engine as 'node'), socket: spec, stopSignal: 'SIGKILL' });
  checkEngine(p.pid, engine as 'node');
  return p;
}

/** The e2e milter's JSON event lines. */
function events(p: RunningProcess): Record<string, any>[] {
  return p.stdout
    .split('\n')
    .filter((l) => l.startsWith('{'))
    .map((l) => JSON.parse(l));
}

describe.each(ENGINES)('a chain with the e2e milter (%s engine)', (engine) => {
  let a: RunningProcess;
  let b: RunningProcess;
  beforeAll(async () => {
    a = await startE2E(engine);
    b = await startE2E(engine);
  }, 30_000);
  afterAll(async () => {
    await a?.stop();
    await b?.stop();
  });

  it('sends every step with Postfix macros, applies the edits, and reuses the session for a second message', async () => {
    const milters = new Milters([{ socket: a.socket!, name: 'e2e' }]);
    const s = await milters.session({ address: '192.0.2.7', port: 4567, hostname: 'client.example.net' }, { j: 'mx.test.example', '{daemon_name}': 'mx', v: 'nodemilter' });
    expect((await s.connect()).action).toBe('continue');
    expect((await s.helo('client.example.net')).action).toBe('continue');
    s.macros.i = 'QID1';
    expect((await s.mail('<alice@example.com>', ['SIZE=100'])).action).toBe('continue');
    expect((await s.rcpt('<bob@example.org>')).action).toBe('continue');
    const refused = await s.rcpt('<refused@example.org>');
    expect(refused).toMatchObject({ action: 'reject', milter: 'e2e', reply: { code: 550, xcode: '5.7.1', lines: [RCPT_TEXT] } });
    const out = await s.message(message('[tag] [addrcpt] one'));
    expect(out.verdict.action).toBe('continue');
    expect(out.envelope.recipients.map((r) => r.address)).toEqual(['<bob@example.org>', ADDED_RCPT]);
    const text = (await out.toBuffer()).toString('latin1');
    expect(text).toContain('\r\nSubject: [e2e] [tag] [addrcpt] one\r\n');
    expect(text).toContain('\r\nX-E2E: seen 6 headers\r\n');
    expect(text).toContain('X-Folded: first\r\n\tsecond\r\n');
    expect(text.endsWith('\r\n\r\nHello Bob.\r\n')).toBe(true);

    // second message, same milter connection
    s.macros.i = 'QID2';
    expect((await s.mail('<carol@example.com>')).action).toBe('continue');
    expect((await s.rcpt('<dave@example.org>')).action).toBe('continue');
    const out2 = await s.message(message('[reject] two'));
    expect(out2.verdict).toMatchObject({ action: 'reject', milter: 'e2e', reply: { code: 550, xcode: '5.7.1', lines: [REJECT_TEXT] } });
    await s.close();
    await milters.close();

    const ev = events(a).filter((e) => e.conn !== undefined && e.ev !== 'close' && e.ev !== 'abort');
    const conns = new Set(ev.map((e) => e.conn));
    expect(conns.size).toBe(1);
    const connect = ev.find((e) => e.ev === 'connect')!;
    expect(connect).toMatchObject({ hostname: 'client.example.net', hostaddr: { address: '192.0.2.7', port: 4567 } });
    expect(connect.macros).toMatchObject({ j: 'mx.test.example', '{daemon_name}': 'mx', v: 'nodemilter', _: 'client.example.net [192.0.2.7]' });
    const mails = ev.filter((e) => e.ev === 'envfrom');
    expect(mails.map((e) => e.args)).toEqual([['<alice@example.com>', 'SIZE=100'], ['<carol@example.com>']]);
    expect(mails[0].macros).toMatchObject({ i: 'QID1', '{mail_addr}': 'alice@example.com', '{mail_host}': 'example.com', '{mail_mailer}': 'smtp' });
    expect(mails[1].macros).toMatchObject({ i: 'QID2', '{mail_addr}': 'carol@example.com' });
    expect(ev.filter((e) => e.ev === 'envrcpt')[0].macros).toMatchObject({ i: 'QID1', '{rcpt_addr}': 'bob@example.org', '{rcpt_host}': 'example.org' });
    expect(ev.filter((e) => e.ev === 'eom').map((e) => e.macros.i)).toEqual(['QID1', 'QID2']);
    // Postfix sends no {client_addr} by default: the connect list is j {daemon_name} {daemon_addr} v _
    expect(connect.macros['{client_addr}']).toBeUndefined();
  });

  it('two milters: the second sees the first one\'s edits; a reject at RCPT is not shown to the second', async () => {
    const milters = new Milters([{ socket: a.socket!, name: 'first' }, { socket: b.socket!, name: 'second' }]);
    const s = await milters.session({ address: '127.0.0.1', port: 1 });
    await s.connect();
    await s.helo('h');
    await s.mail('<x@example.com>');
    expect((await s.rcpt('<refused-2@example.org>')).milter).toBe('first');
    await s.rcpt('<y@example.org>');
    const out = await s.message(message('[tag] chained'));
    expect(out.verdict.action).toBe('continue');
    const text = (await out.toBuffer()).toString('latin1');
    // the second milter saw the first one's Subject and X-E2E: 7 headers, and tagged again
    expect(text).toContain('\r\nSubject: [e2e] [e2e] [tag] chained\r\n');
    expect(text).toMatch(/X-E2E: seen 6 headers\r\nX-E2E: seen 7 headers\r\n/);
    expect(out.edits.map((e) => e.milter)).toEqual(['first', 'second']);
    await s.close();
    await milters.close();
    const rcptsSecond = events(b).filter((e) => e.ev === 'envrcpt').map((e) => e.args[0]);
    expect(rcptsSecond).toContain('<y@example.org>');
    expect(rcptsSecond).not.toContain('<refused-2@example.org>');
  });

  it('streams a 3 MiB body through a disk spool and a reused (QUIT_NC) connection', async () => {
    const milters = new Milters([{ socket: a.socket!, reuse: true, maxConnections: 1 }], { spool: { memoryLimit: 64 * 1024 } });
    const big = 'x'.repeat(998) + '\r\n';
    const body = big.repeat(3 * 1024);
    const before = events(a).filter((e) => e.ev === 'body').length;
    for (let round = 0; round < 2; round++) {
      const s = await milters.session();
      await s.connect();
      await s.helo('h');
      await s.mail('<x@example.com>');
      await s.rcpt('<y@example.org>');
      const out = await s.message(
        (async function* () {
          const m = Buffer.from(message('big', body));
          for (let off = 0; off < m.length; off += 10_000) yield m.subarray(off, off + 10_000);
        })(),
      );
      expect(out.verdict.action).toBe('continue');
      expect(out.body.onDisk).toBe(true);
      expect(out.body.length).toBe(body.length);
      expect((await out.body.toBuffer()).equals(Buffer.from(body))).toBe(true);
      await s.close();
    }
    expect(milters.pools[0].stats).toMatchObject({ opened: 1, reused: 1, idle: 1 });
    await milters.close();
    expect(milters.pools[0].stats.open).toBe(0);
    const chunks = events(a).filter((e) => e.ev === 'body').slice(before);
    expect(chunks.reduce((n, e) => n + e.length, 0)).toBe(2 * body.length);
    expect(Math.max(...chunks.map((e) => e.length))).toBeLessThanOrEqual(65535);
  });
});

const reply = (c: string) => packet(c);

describe('timeouts and default actions', () => {
  const fakes: Fake[] = [];
  afterEach(async () => {
    await Promise.all(fakes.splice(0).map((f) => f.close()));
  });

  it('a silent milter times out after commandTimeout; tempfail holds for every later command, as in Postfix', async () => {
    const f = await fakeMilter(politeExcept('M'));
    fakes.push(f);
    const milters = new Milters([{ socket: f.spec, name: 'silent', commandTimeout: 300 }]);
    const s = await milters.session();
    expect((await s.connect()).action).toBe('continue');
    await s.helo('h');
    const t0 = Date.now();
    const v = await s.mail('<a@example.com>');
    const took = Date.now() - t0;
    expect(v).toMatchObject({ action: 'tempfail', milter: 'silent', reply: { code: 451, xcode: '4.7.1', lines: ['Service unavailable - try again later'] } });
    expect(v.error).toBeInstanceOf(MilterTimeoutError);
    expect(took).toBeGreaterThanOrEqual(290);
    expect(took).toBeLessThan(3000);
    expect((await s.mail('<b@example.com>')).action).toBe('tempfail');
    expect(s.states[0].state).toBe('failed');
    await s.close();
    await milters.close();
  });

  it('contentTimeout bounds end of message; defaultAction accept lets mail through without the milter', async () => {
    const f = await fakeMilter(politeExcept('E'));
    fakes.push(f);
    const milters = new Milters([{ socket: f.spec, name: 'slow-eom', contentTimeout: 300, defaultAction: 'accept' }]);
    const s = await milters.session();
    await s.connect();
    await s.helo('h');
    await s.mail('<a@example.com>');
    await s.rcpt('<b@example.org>');
    const t0 = Date.now();
    const out = await s.message('Subject: x\r\n\r\nbody\r\n');
    expect(Date.now() - t0).toBeGreaterThanOrEqual(290);
    expect(out.verdict.action).toBe('continue');
    expect(s.states[0]).toMatchObject({ state: 'failed' });
    expect(s.states[0].error).toBeInstanceOf(MilterTimeoutError);
    // the next message does not touch the failed milter
    const n = f.commands.length;
    await s.mail('<c@example.com>');
    expect(f.commands.length).toBe(n);
    await s.close();
    await milters.close();
  });

  it('a failed dial gets the default action: reject, accept, quarantine', async () => {
    const port = await freePort();
    const dead = `inet:${port}@127.0.0.1`;
    for (const [defaultAction, want] of [
      ['reject', 'reject'],
      ['accept', 'continue'],
      ['quarantine', 'continue'],
    ] as const) {
      const milters = new Milters([{ socket: dead, defaultAction }]);
      const s = await milters.session();
      const v = await s.connect();
      expect(v.action).toBe(want);
      if (defaultAction === 'reject') {
        expect(v.reply).toEqual({ code: 550, xcode: '5.7.1', lines: ['Command rejected'] });
        expect((v.error as NodeJS.ErrnoException).code).toBe('ECONNREFUSED');
      } else {
        await s.helo('h');
        await s.mail('<a@example.com>');
        await s.rcpt('<b@example.org>');
        const out = await s.message('Subject: x\r\n\r\nbody\r\n');
        expect(out.verdict.action).toBe('continue');
        expect(out.quarantine.length).toBe(defaultAction === 'quarantine' ? 1 : 0);
      }
      await s.close();
      await milters.close();
    }
  });

  it('a connect that hangs is bounded by connectTimeout', async () => {
    // a listener with a full backlog never completes the handshake: use a non-routable address instead
    const milters = new Milters([{ socket: 'inet:9@192.0.2.1', connectTimeout: 300, defaultAction: 'tempfail' }]);
    const t0 = Date.now();
    const s = await milters.session();
    const v = await s.connect();
    expect(Date.now() - t0).toBeLessThan(3000);
    expect(v.action).toBe('tempfail');
    expect(v.error).toBeDefined();
    await s.close();
  });

  it('maxConnections: a second session waits for the slot and times out after connectTimeout', async () => {
    const f = await fakeMilter(politeExcept(''));
    fakes.push(f);
    const milters = new Milters([{ socket: f.spec, maxConnections: 1, connectTimeout: 300 }]);
    const s1 = await milters.session();
    expect(milters.pools[0].stats).toMatchObject({ busy: 1 });
    const s2 = await milters.session();
    const v = await s2.connect();
    expect(v.action).toBe('tempfail');
    expect(v.error).toBeInstanceOf(MilterTimeoutError);
    await s2.close();
    // released by s1: the next session gets it
    const p3 = milters.session();
    await new Promise((r) => setTimeout(r, 50));
    expect(milters.pools[0].stats.waiting).toBe(1);
    await s1.close();
    const s3 = await p3;
    expect((await s3.connect()).action).toBe('continue');
    await s3.close();
    await milters.close();
  });

  it('a milter that breaks the protocol at EOM gets its default action', async () => {
    const f = await fakeMilter((cmd) => ('DAKQ'.includes(cmd) ? undefined : cmd === 'E' ? reply('Z') : reply('c')));
    fakes.push(f);
    const milters = new Milters([{ socket: f.spec, defaultAction: 'reject' }]);
    const s = await milters.session();
    await s.connect();
    await s.helo('h');
    await s.mail('<a@example.com>');
    await s.rcpt('<b@example.org>');
    const out = await s.message('Subject: x\r\n\r\nbody\r\n');
    expect(out.verdict.action).toBe('reject');
    expect(out.verdict.error?.message).toMatch(/unknown reply 'Z'/);
    await s.close();
  });
});

describe('message model', () => {
  it('header edits as Postfix applies them, and CR kept before LF as Postfix delivers it', async () => {
    const { headers, body } = await readMessage('A: 1\r\nB: 2\r\nb: 3\r\nC:\r\n x\r\n\r\nbody\nline\r\n');
    expect(await body.toBuffer()).toEqual(Buffer.from('body\r\nline\r\n'));
    const h = new HeaderList(headers.headers);
    const raw = (value: string) => Buffer.from(value);
    h.apply({ type: 'chgheader', name: 'B', index: 2, value: 'new', valueBytes: raw('new'), raw: raw('') });
    h.apply({ type: 'insheader', index: 0, name: 'First', value: 'f', valueBytes: raw('f'), raw: raw('') });
    h.apply({ type: 'insheader', index: 99, name: 'Last', value: 'l', valueBytes: raw('l'), raw: raw('') });
    h.apply({ type: 'chgheader', name: 'A', index: 1, value: '', valueBytes: raw(''), raw: raw('') });
    h.apply({ type: 'chgheader', name: 'Missing', index: 3, value: 'm', valueBytes: raw('m'), raw: raw('') });
    h.apply({ type: 'addheader', name: 'X-CR', value: 'one\r\n\ttwo', valueBytes: raw('one\r\n\ttwo'), raw: raw('') });
    expect(h.toBuffer().toString()).toBe('First: f\r\nB: 2\r\nb: new\r\nC:\r\n x\r\nLast: l\r\nMissing: m\r\nX-CR: one\r\r\n\ttwo\r\n');
  });

  it('a hidden header (the MTA\'s Received) counts for insheader, not for chgheader', () => {
    const b = (v: string) => Buffer.from(v);
    const h = new HeaderList([
      { name: 'Received', value: b(' by us'), hidden: true },
      { name: 'Received', value: b(' by them') },
    ]);
    h.apply({ type: 'chgheader', name: 'Received', index: 1, value: 'x', valueBytes: b('x'), raw: b('') });
    h.apply({ type: 'insheader', index: 0, name: 'First', value: 'f', valueBytes: b('f'), raw: b('') });
    expect(h.toBuffer().toString()).toBe('First: f\r\nReceived: by us\r\nReceived: x\r\n');
  });

  it('refuses a header section over maxHeaderBytes with a typed error', async () => {
    await expect(readMessage('A: ' + 'x'.repeat(2000) + '\r\n\r\n', { maxHeaderBytes: 1000 })).rejects.toMatchObject({ reason: 'oversize' });
  });
});

/* ------------------------------------------------------------ OpenDKIM */

const realWhy = realMiltersUnavailable();

describe.skipIf(realWhy !== undefined && process.env.NODEMILTER_SKIP_REAL_MILTERS === '1')('OpenDKIM in a chain', () => {
  let dkim: RealMilter | undefined;
  let e2e: RunningProcess | undefined;
  let key: DkimKey | undefined;
  beforeAll(async () => {
    if (realWhy) return;
    key = makeDkimKey('example.com', 'sel');
    dkim = await startOpenDKIM(key!, 'sign');
    e2e = await startE2E('node');
  }, 30_000);
  afterAll(async () => {
    await dkim?.stop();
    key?.remove();
    await e2e?.stop();
  });

  it('real milters are installed and we are root (set NODEMILTER_SKIP_REAL_MILTERS=1 to skip)', () => {
    expect(realWhy).toBeUndefined();
  });

  it('signs after the nodemilter milter tagged the subject; the result verifies with mailauth', async () => {
    const milters = new Milters([
      { socket: e2e!.socket!, name: 'e2e' },
      { socket: dkim!.spec, name: 'opendkim' },
    ]);
    const s = await milters.session({ address: '127.0.0.1', port: 2525, hostname: 'localhost' }, { j: 'mta.test.example', '{daemon_name}': 'mta' });
    expect((await s.connect()).action).toBe('continue');
    await s.helo('localhost');
    s.macros.i = 'DKIM1';
    await s.mail('<alice@example.com>');
    await s.rcpt('<bob@example.org>');
    const out = await s.message(message('[tag] signed'));
    expect(out.verdict.action).toBe('continue');
    const signed = await out.toBuffer();
    await s.close();
    await milters.close();
    const text = signed.toString('latin1');
    expect(text).toMatch(/^DKIM-Signature: v=1; a=rsa-sha256; c=relaxed\/relaxed; d=example.com; s=sel;\r\n\t/);
    expect(text).toContain('Subject: [e2e] [tag] signed');
    expect(await dkimResults(signed, key!)).toEqual(['pass']);
    // the check can fail: one changed byte in a signed header breaks it
    expect(await dkimResults(Buffer.from(text.replace('[tag] signed', '[tag] signeD'), 'latin1'), key!)).toEqual(['fail']);
  });
});
