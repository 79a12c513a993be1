/**
 * MilterClient against real milters: a C milter on the system libmilter and
 * a pymilter milter (test/fixtures), over unix, inet and inet6 sockets;
 * plus protocol-violation tests against a scripted fake milter, and unit
 * tests of the socket-spec, message and reply parsers.
 */
import * as net from 'net';
import * as path from 'path';
import { afterEach, beforeAll, describe, expect, it } from 'vitest';
import * as C from '../src/constants';
import { InvalidSocketError, MilterTimeoutError, ProtocolError } from '../src/errors';
import { parseSocketSpec, formatSocketSpec } from '../src/socketspec';
import { MilterClient, parseMessage, parseSmtpReply, type MilterClientOptions } from '../src/testing';
import {
  buildC,
  C_TESTMILTER_SRC,
  eventStrings,
  freeInet6Spec,
  freeInetSpec,
  PY_TESTMILTER,
  startProcess,
  stopAll,
  SYSTEM_PYTHON,
  tmpDir,
  tmpSocketSpec,
  type RunningProcess,
} from './helpers';

let cBin = '';
beforeAll(async () => {
  cBin = await buildC(C_TESTMILTER_SRC);
}, 60_000);
afterEach(() => stopAll());

type Impl = 'c' | 'py';
type Transport = 'unix' | 'inet' | 'inet6';

/** Start a fixture milter and wait until it listens (and, for C, has logged the probe connection's close). */
async function startMilter(impl: Impl, env: Record<string, string> = {}, transport: Transport = 'unix'): Promise<{ proc: RunningProcess; spec: string }> {
  const spec = transport === 'unix' ? tmpSocketSpec() : transport === 'inet' ? await freeInetSpec() : (await freeInet6Spec())!;
  const [cmd, args] = impl === 'c' ? [cBin, [spec]] : [SYSTEM_PYTHON, [PY_TESTMILTER, spec]];
  const proc = await startProcess(cmd, { args, env, socket: spec, stopSignal: 'SIGKILL' });
  // libmilter runs xxfi_close for the readiness probe; pymilter skips it (no private data).
  if (impl === 'c') await proc.waitForOutput(/^EV\tclose$/m);
  return { proc, spec };
}

/** The events of the sessions that start at the first negotiate. */
function events(proc: RunningProcess, kinds: string[] = ['EV']): string[] {
  const out = proc.stdout;
  const at = out.indexOf('EV\tnegotiate');
  return eventStrings(at < 0 ? '' : out.slice(at), kinds);
}

async function waitClose(proc: RunningProcess, count = 1): Promise<void> {
  const re = new RegExp(`(?:^EV\\tclose$[^]*){${count}}`, 'm');
  const at = proc.stdout.indexOf('EV\tnegotiate');
  await proc.waitForOutput(re, { from: Math.max(at, 0) });
}

const EOM_SCRIPT = [
  'addheader\tX-Added\tadded value',
  'insheader\t0\tX-First\tfirst',
  'chgheader\tSubject\t1\tnew subject',
  'chgheader\tX-Folded\t1',
  'addrcpt\t<new@example.net>',
  'addrcpt_par\t<par@example.net>\tNOTIFY=NEVER',
  'delrcpt\t<carol@example.org>',
  'chgfrom\t<bounce@example.com>\tSIZE=200',
  'replacebody\tnew body\\r\\n',
  'quarantine\tsuspicious',
].join('\n');

const MESSAGE = Buffer.concat([
  Buffer.from('Subject: hi there\r\nX-Folded: a\r\n\tb\r\nX-8bit: caf'),
  Buffer.from([0xe9]),
  Buffer.from('\r\n\r\nline1\nline2\r\n'),
]);

describe.each([
  ['c', 'unix'],
  ['c', 'inet'],
  ['py', 'unix'],
  ['py', 'inet'],
] as [Impl, Transport][])('full transaction: %s milter over %s', (impl, transport) => {
  it('delivers every event and collects every modification', async () => {
    const { proc, spec } = await startMilter(impl, { TM_MACROS: 'j {client_addr} {mail_addr} i', TM_EOM: EOM_SCRIPT, TM_RET_eom: 'accept' }, transport);
    const c = await MilterClient.connect(spec, { timeout: 5000 });
    expect(c.negotiation).toMatchObject({ version: 6, actions: 0x1ff, steps: C.P_SKIP, symlists: {} });
    const r = await c.sendMessage({
      client: { hostname: 'client.example.com', family: 'inet', address: '192.0.2.1', port: 4567 },
      helo: 'client.example.com',
      from: ['<alice@example.com>', 'SIZE=100'],
      rcpt: [['<bob@example.org>', 'NOTIFY=NEVER'], '<carol@example.org>'],
      message: MESSAGE,
      macros: {
        connect: { j: 'mx.example.org', '{client_addr}': '192.0.2.1' },
        envfrom: { '{mail_addr}': 'alice@example.com' },
        eom: { i: 'ABC123' },
      },
      quit: true,
    });
    await waitClose(proc);

    expect(r.decision).toBe('accept');
    expect(r.stoppedAt).toBeUndefined();
    for (const s of [r.connect, r.helo, r.envfrom, ...r.envrcpt, r.data, ...r.headers, r.eoh, r.body]) {
      expect(s).toMatchObject({ status: 'continue', code: 'c' });
    }
    expect(r.body).toMatchObject({ chunksSent: 1, chunksTotal: 1 });
    const strip = r.actions.map(({ raw, ...a }) => {
      void raw;
      return 'valueBytes' in a ? { ...a, valueBytes: a.valueBytes.toString('latin1') } : a;
    });
    expect(strip).toEqual([
      { type: 'addheader', name: 'X-Added', value: 'added value', valueBytes: 'added value' },
      { type: 'insheader', index: 0, name: 'X-First', value: 'first', valueBytes: 'first' },
      { type: 'chgheader', index: 1, name: 'Subject', value: 'new subject', valueBytes: 'new subject' },
      { type: 'chgheader', index: 1, name: 'X-Folded', value: '', valueBytes: '' },
      { type: 'addrcpt', rcpt: '<new@example.net>' },
      { type: 'addrcpt_par', rcpt: '<par@example.net>', params: 'NOTIFY=NEVER' },
      { type: 'delrcpt', rcpt: '<carol@example.org>' },
      { type: 'chgfrom', sender: '<bounce@example.com>', params: 'SIZE=200' },
      { type: 'replbody', chunk: Buffer.from('new body\r\n') },
      { type: 'quarantine', reason: 'suspicious' },
    ]);
    expect(r.replacedBody?.toString()).toBe('new body\r\n');

    expect(events(proc).slice(1)).toEqual([
      'connect client.example.com inet 192.0.2.1 4567',
      'helo client.example.com',
      'envfrom <alice@example.com> SIZE=100',
      'envrcpt <bob@example.org> NOTIFY=NEVER',
      'envrcpt <carol@example.org>',
      'data',
      'header Subject hi there',
      'header X-Folded a\n\tb',
      'header X-8bit caf\xe9',
      'eoh',
      'body 14 line1\r\nline2\r\n',
      'eom',
      'close',
    ]);
    const macros = events(proc, ['MACRO']);
    expect(macros).toContain('MACRO connect j mx.example.org');
    expect(macros).toContain('MACRO connect {client_addr} 192.0.2.1');
    expect(macros).toContain('MACRO connect {mail_addr} (null)');
    expect(macros).toContain('MACRO envfrom {mail_addr} alice@example.com');
    expect(macros).toContain('MACRO eoh i (null)');
    expect(macros).toContain('MACRO eom i ABC123');
    // connect-stage macros stay visible at later stages
    expect(macros).toContain('MACRO eom j mx.example.org');
    expect(events(proc, ['ACT']).every((a) => a.endsWith(' 0'))).toBe(true);
  });
});

describe('negotiation', () => {
  it('libmilter: NULL callbacks are negotiated away and not sent; sendAll sends them anyway', async () => {
    const { proc, spec } = await startMilter('c', { TM_NULL_CB: 'helo,data,unknown' });
    const c = await MilterClient.connect(spec, { timeout: 5000 });
    expect(c.negotiation!.steps).toBe(C.P_NOHELO | C.P_NODATA | C.P_NOUNKNOWN | C.P_SKIP);
    await c.connect('h', 'unix', '/tmp/client.sock');
    expect(await c.helo('x')).toEqual({ step: 'helo', status: 'notsent', progress: 0 });
    await c.envfrom('<a@b>');
    await c.envrcpt('<c@d>');
    expect((await c.data()).status).toBe('notsent');
    expect((await c.unknown('XFOO bar')).status).toBe('notsent');
    c.sendAll = true;
    // libmilter answers an event whose callback is NULL with continue
    expect(await c.data()).toMatchObject({ status: 'continue', code: 'c' });
    expect(await c.helo('sent anyway')).toMatchObject({ status: 'continue', code: 'c' });
    await c.quit();
    await waitClose(proc);
    // a HELO in the middle of a transaction makes libmilter abort it
    expect(events(proc).slice(1)).toEqual(['connect h unix /tmp/client.sock', 'envfrom <a@b>', 'envrcpt <c@d>', 'abort', 'close']);
    // what libmilter pre-filled for the negotiate callback
    expect(events(proc)[0]).toBe(`negotiate 1ff 1fffff 0 0 1ff ${(C.P_NOHELO | C.P_NODATA | C.P_NOUNKNOWN | C.P_SKIP).toString(16)}`);
  });

  it.each(['c', 'py'] as Impl[])('%s: symlists from setsymlist are exposed and filterMacros honours them', async (impl) => {
    const { proc, spec } = await startMilter(impl, { TM_SYMLIST: '0={client_addr} j;2={mail_addr};5=i', TM_MACROS: 'j {client_addr} {daemon_name} {mail_addr} i' });
    const c = await MilterClient.connect(spec, { timeout: 5000, filterMacros: true });
    expect(c.negotiation!.symlists).toEqual({ 0: ['{client_addr}', 'j'], 2: ['{mail_addr}'], 5: ['i'] });
    await c.macro(C.SMFIM_CONNECT, { j: 'mx', '{client_addr}': '10.0.0.1', '{daemon_name}': 'dropped' });
    await c.connect('h', 'inet', '10.0.0.1', 25);
    // filterMacros matches names with or without braces, but sends them as given
    await c.macro('M', { '{mail_addr}': 'a@b', mail_addr: 'no braces', '{auth_authen}': 'dropped' });
    await c.envfrom('<a@b>');
    await c.quit();
    await waitClose(proc);
    const m = events(proc, ['MACRO']);
    expect(m).toContain('MACRO connect j mx');
    expect(m).toContain('MACRO connect {client_addr} 10.0.0.1');
    expect(m).toContain('MACRO connect {daemon_name} (null)');
    expect(m).toContain('MACRO envfrom {mail_addr} a@b');
  });

  it('py: pymilter asks for SKIP only and keeps every step with a reply', async () => {
    const { proc, spec } = await startMilter('py');
    const c = await MilterClient.connect(spec, { timeout: 5000 });
    expect(c.negotiation).toMatchObject({ version: 6, actions: 0x1ff, steps: C.P_SKIP });
    await c.close();
    expect(events(proc)[0]).toBe('negotiate 1ff 1fffff 0 0');
  });

  it.each(['c', 'py'] as Impl[])('%s: a smaller offer is respected (actions, steps, version 2)', async (impl) => {
    const { proc, spec } = await startMilter(impl, { TM_NEG: 'allopts' });
    const c = await MilterClient.connect(spec, { timeout: 5000, actions: C.ADDHDRS | C.CHGBODY, steps: C.P_NOHELO | C.P_SKIP });
    expect(c.negotiation!.offered).toEqual({ version: 6, actions: 3, steps: C.P_NOHELO | C.P_SKIP });
    expect(c.negotiation!.actions & ~3).toBe(0);
    expect(c.negotiation!.steps & ~(C.P_NOHELO | C.P_SKIP)).toBe(0);
    await c.close();
    void proc;
  });

  it('libmilter: a milter refusing in negotiate closes the connection', async () => {
    const { spec } = await startMilter('c', { TM_NEG: 'reject' });
    const err = await MilterClient.connect(spec, { timeout: 3000 }).catch((e) => e);
    expect(err).toBeInstanceOf(ProtocolError);
    expect(err.reason).toBe('closed');
  });
});

const ALL_NR = C.SMFIP_NR_ALL;

describe.each(['c', 'py'] as Impl[])('no-reply steps: %s', (impl) => {
  it('sends NR steps without waiting and still gets the EOM answer', async () => {
    const { proc, spec } = await startMilter(impl, { TM_STEPS_ADD: ALL_NR.toString(16), TM_EOM: 'addheader\tX-NR\tyes' });
    const c = await MilterClient.connect(spec, { timeout: 3000 });
    expect(c.negotiation!.steps).toBe(ALL_NR | C.P_SKIP);
    const r = await c.sendMessage({ from: '<a@b>', rcpt: ['<c@d>'], headers: [['Subject', 'x']], body: 'b\r\n' });
    for (const s of [r.connect, r.helo, r.envfrom, r.envrcpt[0], r.data, r.headers[0], r.eoh, r.body]) {
      expect(s!.status).toBe('noreply');
      expect(s!.code).toBeUndefined();
    }
    expect((await c.unknown('XCMD')).status).toBe('noreply');
    expect(r.eom).toMatchObject({ status: 'continue', actions: [{ type: 'addheader', name: 'X-NR', value: 'yes' }] });
    expect(c.pendingReplies).toBe(0);
    await c.quit();
    await waitClose(proc);
    expect(events(proc).slice(1)).toEqual([
      'connect localhost inet 127.0.0.1 54321',
      'helo localhost',
      'envfrom <a@b>',
      'envrcpt <c@d>',
      'data',
      'header Subject x',
      'eoh',
      'body 3 b\r\n',
      'eom',
      'unknown XCMD',
      'close',
    ]);
  });
});

describe.each(['c', 'py'] as Impl[])('replies: %s', (impl) => {
  it('reject with setreply on a recipient, tempfail with a multi-line reply, skip, progress', async () => {
    const { proc, spec } = await startMilter(impl, {
      TM_RCPT_REJECT: 'bad',
      TM_REPLY_envrcpt: '550|5.1.1|no such user',
      TM_SKIP_AFTER: '1',
      TM_EOM: 'progress\t3\t120',
      TM_RET_eom: 'tempfail',
      TM_REPLY_eom: '451|4.7.1|try|again|later',
    });
    const c = await MilterClient.connect(spec, { timeout: 3000, eomTimeout: 400 });
    const r = await c.sendMessage({
      from: '<a@b>',
      rcpt: ['<bad@x>', '<good@x>'],
      headers: [['Subject', 's']],
      body: Buffer.alloc(70000 * 2, 0x61),
    });
    expect(r.envrcpt[0]).toMatchObject({
      status: 'reject',
      code: 'y',
      reply: { rcode: '550', xcode: '5.1.1', text: 'no such user', raw: '550 5.1.1 no such user' },
    });
    // the reply text is set at every RCPT; with continue it is kept but not sent
    expect(r.envrcpt[1]).toMatchObject({ status: 'continue', code: 'c' });
    expect(r.body).toMatchObject({ status: 'skip', code: 's', chunksSent: 1, chunksTotal: 3 });
    expect(r.eom).toMatchObject({
      status: 'tempfail',
      decision: 'tempfail',
      code: 'y',
      progress: 3,
      reply: { rcode: '451', xcode: '4.7.1', lines: ['try', 'again', 'later'], raw: '451-4.7.1 try\r\n451-4.7.1 again\r\n451 4.7.1 later' },
    });
    expect(r.decision).toBe('tempfail');
    await c.quit();
    await waitClose(proc);
    expect(events(proc).filter((e) => e.startsWith('body'))).toEqual(['body 65535 (long)']);
  });

  it('reject at MAIL stops the transaction and aborts; the next message on the connection works', async () => {
    const { proc, spec } = await startMilter(impl, { TM_RET_envfrom: 'reject' });
    const c = await MilterClient.connect(spec, { timeout: 3000 });
    const r = await c.sendMessage({ from: '<spam@x>', rcpt: ['<a@b>'], body: 'x\r\n' });
    expect(r).toMatchObject({ decision: 'reject', stoppedAt: 'envfrom', aborted: true, envrcpt: [] });
    const r2 = await c.sendMessage({ from: '<ok@x>', rcpt: ['<a@b>'] });
    expect(r2.connect).toBeUndefined();
    expect(r2.envfrom!.status).toBe('reject');
    expect(r.envfrom).toMatchObject({ status: 'reject', code: 'r' });
    expect(r.envfrom!.reply).toBeUndefined();
    await c.quit();
    await waitClose(proc);
    // both libmilter and pymilter skip xxfi_abort here: no message is in progress after a MAIL reject
    expect(events(proc).slice(1)).toEqual(['connect localhost inet 127.0.0.1 54321', 'helo localhost', 'envfrom <spam@x>', 'envfrom <ok@x>', 'close']);
  });

  it('setreply without an xcode', async () => {
    const { spec } = await startMilter(impl, { TM_RET_helo: 'reject', TM_REPLY_helo: '554||go away' });
    const c = await MilterClient.connect(spec, { timeout: 3000 });
    await c.connect('h', 'unknown');
    const r = await c.helo('spammer');
    expect(r).toMatchObject({ status: 'reject', code: 'y', reply: { rcode: '554', text: 'go away', raw: '554 go away' } });
    expect(r.reply!.xcode).toBeUndefined();
    await c.close();
  });
});

describe('libmilter specifics', () => {
  it('body chunking, a big replacement body, 8-bit header bytes, HDR_LEADSPC', async () => {
    const { proc, spec } = await startMilter('c', { TM_STEPS_ADD: C.P_HDR_LEADSPC.toString(16), TM_EOM: 'replacebody_n\t150000\tz' });
    const c = await MilterClient.connect(spec, { timeout: 3000 });
    expect(c.negotiation!.steps & C.P_HDR_LEADSPC).toBeTruthy();
    const r = await c.sendMessage({
      client: { hostname: '[2001:db8::1]', family: 'inet6', address: '2001:db8::1', port: 2525 },
      from: '<a@b>',
      rcpt: ['<c@d>'],
      message: Buffer.concat([Buffer.from('Subject:  two spaces\r\nX-Raw: '), Buffer.from([0xff, 0x01, 0x7f]), Buffer.from('\r\n\r\n'), Buffer.alloc(140000, 0x62)]),
    });
    expect(r.eom!.actions.map((a) => a.type)).toEqual(['replbody', 'replbody', 'replbody']);
    expect(r.eom!.actions.map((a) => (a as { chunk: Buffer }).chunk.length)).toEqual([65535, 65535, 150000 - 2 * 65535]);
    expect(r.replacedBody!.equals(Buffer.alloc(150000, 0x7a))).toBe(true);
    await c.quit();
    await waitClose(proc);
    const evs = events(proc);
    expect(evs).toContain('connect [2001:db8::1] inet6 2001:db8::1 2525');
    // with HDR_LEADSPC the value keeps its leading space(s)
    expect(evs).toContain('header Subject   two spaces');
    expect(evs).toContain('header X-Raw  \xff\x01\x7f');
    expect(evs.filter((e) => e.startsWith('body'))).toEqual(['body 65535 (long)', 'body 65535 (long)', `body ${140000 - 2 * 65535} (long)`]);
  });

  it('abort, a second message, QUIT_NC with a new session, unknown command', async () => {
    const { proc, spec } = await startMilter('c');
    const c = await MilterClient.connect(spec, { timeout: 3000 });
    await c.connect('one', 'inet', '192.0.2.1', 1);
    await c.envfrom('<m1@x>');
    await c.abort();
    await c.envfrom('<m2@x>');
    await c.envrcpt('<r@x>');
    expect((await c.unknown('XYZZY plugh')).status).toBe('continue');
    await c.data();
    await c.eoh();
    expect((await c.eom()).decision).toBe('continue');
    await c.quitNc();
    const r = await c.sendMessage({ client: { hostname: 'two', address: '192.0.2.2', port: 2 }, helo: null, from: '<m3@x>', rcpt: ['<r@x>'] });
    expect(r.decision).toBe('continue');
    expect(r.helo).toBeUndefined();
    await c.quit();
    await waitClose(proc, 2);
    expect(events(proc).slice(1)).toEqual([
      'connect one inet 192.0.2.1 1',
      'envfrom <m1@x>',
      'abort',
      'envfrom <m2@x>',
      'envrcpt <r@x>',
      'unknown XYZZY plugh',
      'data',
      'eoh',
      'eom',
      'close',
      'connect two inet 192.0.2.2 2',
      'envfrom <m3@x>',
      'envrcpt <r@x>',
      'data',
      'eoh',
      'eom',
      'close',
    ]);
  });

  it('accept at CONNECT ends the session early; discard at EOH aborts', async () => {
    const { spec } = await startMilter('c', { TM_RET_connect: 'accept' });
    const c = await MilterClient.connect(spec, { timeout: 3000 });
    const r = await c.sendMessage({ from: '<a@b>', rcpt: ['<c@d>'] });
    expect(r).toMatchObject({ decision: 'accept', stoppedAt: 'connect', aborted: false });
    expect(r.helo).toBeUndefined();
    await c.close();

    const m2 = await startMilter('c', { TM_RET_eoh: 'discard' });
    const c2 = await MilterClient.connect(m2.spec, { timeout: 3000 });
    const r2 = await c2.sendMessage({ from: '<a@b>', rcpt: ['<c@d>'], headers: [['A', 'b']], body: 'x' });
    expect(r2).toMatchObject({ decision: 'discard', stoppedAt: 'eoh', aborted: true });
    expect(r2.body).toBeUndefined();
    await c2.close();
  });

  it('progress restarts the EOM timer; a silent milter times out', async () => {
    const { spec } = await startMilter('c', { TM_EOM: 'progress\t4\t150\nsleep\t600' });
    const c = await MilterClient.connect(spec, { timeout: 3000, eomTimeout: 300 });
    await c.connect('h', 'unknown');
    await c.envfrom('<a@b>');
    await c.envrcpt('<c@d>');
    const t0 = Date.now();
    const err = await c.eom().catch((e) => e);
    expect(err).toBeInstanceOf(MilterTimeoutError);
    expect(err.code).toBe('ERR_MILTER_TIMEOUT');
    expect(err.timeout).toBe(300);
    // 4 progress replies 150 ms apart kept it alive past 300 ms
    expect(Date.now() - t0).toBeGreaterThanOrEqual(700);
    c.destroy();
  });

  it('libmilter ignores a command out of sequence without replying (the MTA times out)', async () => {
    const { proc, spec } = await startMilter('c');
    const c = await MilterClient.connect(spec, { timeout: 300, eomTimeout: 300 });
    await c.connect('h', 'unknown');
    await c.envfrom('<a@b>');
    // DATA needs a recipient first: libmilter aborts the transaction (xxfi_abort)
    // and drops the command without a reply
    await expect(c.data()).rejects.toBeInstanceOf(MilterTimeoutError);
    // ...so a RCPT now is out of sequence too
    await expect(c.envrcpt('<c@d>')).rejects.toBeInstanceOf(MilterTimeoutError);
    // a new MAIL starts over
    expect((await c.envfrom('<b@b>')).status).toBe('continue');
    expect((await c.envrcpt('<c@d>')).status).toBe('continue');
    expect((await c.eom()).decision).toBe('continue');
    expect(c.pendingReplies).toBe(0);
    await c.quit();
    await waitClose(proc);
    expect(events(proc).slice(1)).toEqual(['connect h null', 'envfrom <a@b>', 'abort', 'envfrom <b@b>', 'envrcpt <c@d>', 'eom', 'close']);
  });

  it('works over inet6 when ::1 is available', async () => {
    const spec6 = await freeInet6Spec();
    if (!spec6) return;
    const { proc, spec } = await startMilter('c', {}, 'inet6');
    const c = await MilterClient.connect(spec, { timeout: 3000 });
    expect(c.negotiation!.version).toBe(6);
    await c.connect('v6', 'inet6', '::1', 1);
    await c.quit();
    await waitClose(proc);
    expect(events(proc)).toContain('connect v6 inet6 ::1 1');
  });
});

/* ------------------------------------------------------------------ */
/* A scripted fake milter for protocol violations                       */

interface Fake {
  spec: string;
  server: net.Server;
  close(): Promise<void>;
}

/** A unix-socket server; `onPacket` answers each packet (after OPTNEG, which gets a plain reply unless `optneg` is given). */
async function fakeMilter(
  onPacket: (cmd: string, data: Buffer, sock: net.Socket) => void,
  optneg: (sock: net.Socket) => void = (sock) => send(sock, 'O', Buffer.from([0, 0, 0, 6, 0, 0, 1, 0xff, 0, 0, 0, 0])),
): Promise<Fake> {
  const p = path.join(tmpDir('nmf-'), 'fake.sock');
  const server = net.createServer((sock) => {
    let buf = Buffer.alloc(0);
    sock.on('error', () => undefined);
    sock.on('data', (d) => {
      buf = Buffer.concat([buf, d]);
      while (buf.length >= 4 && buf.length >= 4 + buf.readUInt32BE(0)) {
        const len = buf.readUInt32BE(0);
        const cmd = String.fromCharCode(buf[4]);
        const data = buf.subarray(5, 4 + len);
        buf = buf.subarray(4 + len);
        if (cmd === 'O') optneg(sock);
        else onPacket(cmd, data, sock);
      }
    });
  });
  await new Promise<void>((r) => server.listen(p, r));
  return { spec: `unix:${p}`, server, close: () => new Promise<void>((r) => server.close(() => r())) };
}

function frame(cmd: string, data: Buffer = Buffer.alloc(0)): Buffer {
  const h = Buffer.alloc(5);
  h.writeUInt32BE(data.length + 1);
  h[4] = cmd.charCodeAt(0);
  return Buffer.concat([h, data]);
}
function send(sock: net.Socket, cmd: string, data?: Buffer) {
  sock.write(frame(cmd, data));
}

describe('protocol violations (fake milter)', () => {
  const opts: MilterClientOptions = { timeout: 1000 };

  it('unknown reply code', async () => {
    const f = await fakeMilter((_c, _d, s) => send(s, 'Z'));
    const c = await MilterClient.connect(f.spec, opts);
    const err = await c.helo('x').catch((e) => e);
    expect(err).toBeInstanceOf(ProtocolError);
    expect(err).toMatchObject({ reason: 'unknown-reply', code: 'ERR_MILTER_PROTOCOL' });
    expect(err.message).toMatch(/unknown reply 'Z'.*helo/);
    c.destroy();
    await f.close();
  });

  it('modification outside end-of-message, SKIP outside body', async () => {
    const f = await fakeMilter((cmd, _d, s) => (cmd === 'H' ? send(s, 'h', Buffer.from('X\0y\0')) : send(s, 's')));
    const c = await MilterClient.connect(f.spec, opts);
    await expect(c.helo('x')).rejects.toMatchObject({ reason: 'unexpected-reply' });
    await expect(c.envfrom('<a@b>')).rejects.toMatchObject({ reason: 'unexpected-reply', message: /SKIP/ });
    c.destroy();
    await f.close();
  });

  it('truncated packet, then the connection closes', async () => {
    const f = await fakeMilter((_c, _d, s) => {
      s.write(frame('c').subarray(0, 3));
      s.end();
    });
    const c = await MilterClient.connect(f.spec, opts);
    await expect(c.helo('x')).rejects.toMatchObject({ reason: 'truncated' });
    expect(c.closed).toBe(true);
    await f.close();
  });

  it('oversize packet and zero-length packet', async () => {
    const f = await fakeMilter((cmd, _d, s) => {
      const h = Buffer.alloc(5);
      h.writeUInt32BE(cmd === 'H' ? 65537 + 1 : 0);
      h[4] = 0x63;
      s.write(h);
    });
    const c = await MilterClient.connect(f.spec, opts);
    await expect(c.helo('x')).rejects.toMatchObject({ reason: 'oversize' });
    const c2 = await MilterClient.connect(f.spec, opts);
    await expect(c2.envfrom('<x>')).rejects.toMatchObject({ reason: 'malformed' });
    await f.close();
  });

  it('connection closed while waiting; timeout while waiting', async () => {
    const f = await fakeMilter((cmd, _d, s) => {
      if (cmd === 'H') s.destroy();
    });
    const c = await MilterClient.connect(f.spec, opts);
    await expect(c.helo('x')).rejects.toMatchObject({ reason: 'closed' });
    await expect(c.helo('x')).rejects.toBeInstanceOf(ProtocolError);
    const c2 = await MilterClient.connect(f.spec, { timeout: 150 });
    const err = await c2.envfrom('<a@b>').catch((e) => e);
    expect(err).toBeInstanceOf(MilterTimeoutError);
    expect(err.message).toMatch(/envfrom/);
    c2.destroy();
    await f.close();
  });

  it('bad OPTNEG replies: short, wrong command, asks for more than offered, truncated symlist', async () => {
    const replies = [
      Buffer.from([0, 0, 0, 6]),
      null,
      Buffer.from([0, 0, 0, 6, 0, 0, 0, 0xff, 0, 0, 0, 0]),
      Buffer.from([0, 0, 0, 6, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0x6a]),
    ];
    const reasons = ['truncated', 'unexpected-reply', 'negotiation', 'truncated'];
    for (let i = 0; i < replies.length; i++) {
      const f = await fakeMilter(
        () => undefined,
        (s) => (replies[i] ? send(s, 'O', replies[i]!) : send(s, 'c')),
      );
      const err = await MilterClient.connect(f.spec, { timeout: 1000, actions: 0x0f }).catch((e) => e);
      expect(err, `reply ${i}`).toBeInstanceOf(ProtocolError);
      expect(err.reason, `reply ${i}`).toBe(reasons[i]);
      await f.close();
    }
  });

  it('sendRaw / readReply see packets as they are, progress included', async () => {
    const seen: string[] = [];
    const f = await fakeMilter((cmd, data, s) => {
      seen.push(cmd + data.toString('latin1'));
      s.write(Buffer.concat([frame('p'), frame('p'), frame('y', Buffer.from('421 4.3.0 bye\0'))]));
    });
    const c = await MilterClient.connect(f.spec, opts);
    c.sendRaw('X', 'anything\0');
    expect(await c.readReply()).toEqual({ cmd: 'p', data: Buffer.alloc(0) });
    expect(await c.readReply()).toEqual({ cmd: 'p', data: Buffer.alloc(0) });
    expect(await c.readReply()).toEqual({ cmd: 'y', data: Buffer.from('421 4.3.0 bye\0') });
    await expect(c.readReply(50)).rejects.toBeInstanceOf(MilterTimeoutError);
    // high level: progress is counted, a 4xx reply code means tempfail
    expect(await c.data()).toMatchObject({ status: 'tempfail', progress: 2, reply: { rcode: '421', xcode: '4.3.0', text: 'bye' } });
    expect(seen).toEqual(['Xanything\0', 'T']);
    c.destroy();
    await f.close();
  });
});

/* ------------------------------------------------------------------ */
/* Unit tests                                                           */

describe('parseSocketSpec', () => {
  it.each([
    ['unix:/var/run/m.sock', { kind: 'unix', path: '/var/run/m.sock' }],
    ['local:/var/run/m.sock', { kind: 'unix', path: '/var/run/m.sock' }],
    ['UNIX:rel/m.sock', { kind: 'unix', path: 'rel/m.sock' }],
    ['/abs/path', { kind: 'unix', path: '/abs/path' }],
    [':/abs/path', { kind: 'unix', path: '/abs/path' }],
    ['inet:8894', { kind: 'inet', port: 8894, host: undefined }],
    ['inet:8894@127.0.0.1', { kind: 'inet', port: 8894, host: '127.0.0.1' }],
    ['inet:25@mail.example.com', { kind: 'inet', port: 25, host: 'mail.example.com' }],
    ['inet:25@[192.0.2.1]', { kind: 'inet', port: 25, host: '192.0.2.1' }],
    ['inet6:8894@::1', { kind: 'inet6', port: 8894, host: '::1' }],
    ['inet6:8894@[2001:db8::1]', { kind: 'inet6', port: 8894, host: '2001:db8::1' }],
    ['inet6:0', { kind: 'inet6', port: 0, host: undefined }],
    ['fd:3', { kind: 'fd', fd: 3 }],
  ])('%s', (spec, want) => {
    expect(parseSocketSpec(spec)).toEqual(want);
    expect(parseSocketSpec(formatSocketSpec(parseSocketSpec(spec)))).toEqual(want);
  });

  it.each([
    ['', /empty/],
    ['unix:', /missing socket path/],
    ['tcp:25', /unknown socket type "tcp"/],
    ['inet:', /port "" is not a number/],
    ['inet:http@localhost', /port "http" is not a number/],
    ['inet:70000', /out of range/],
    ['inet:25@', /empty host/],
    ['inet:25@::1', /inet6/],
    ['fd:x', /descriptor/],
    ['fd:-1', /descriptor/],
    [`unix:/${'x'.repeat(120)}`, /longer than 107/],
  ])('rejects %j', (spec, msg) => {
    let err: unknown;
    try {
      parseSocketSpec(spec);
    } catch (e) {
      err = e;
    }
    expect(err).toBeInstanceOf(InvalidSocketError);
    expect((err as Error).message).toMatch(msg);
    expect((err as Error).message).toContain(JSON.stringify(spec));
    expect((err as Error).message).toMatch(/expected unix:\/path/);
  });

  it('MilterClient.connect rejects bad specs with InvalidSocketError', async () => {
    await expect(MilterClient.connect('nope:1')).rejects.toBeInstanceOf(InvalidSocketError);
  });
});

describe('parseMessage / parseSmtpReply', () => {
  it('splits headers like an MTA: one leading space dropped, folds joined with LF, CRLF body', () => {
    const m = parseMessage('Subject: hi\r\nX-Two:  two\nX-Fold: a\r\n  b\r\n\tc\r\nX-None:\r\n\r\nbody\nmore\r\n\r\n');
    expect(m.headers.map(([n, v]) => [n, v.toString()])).toEqual([
      ['Subject', 'hi'],
      ['X-Two', ' two'],
      ['X-Fold', 'a\n  b\n\tc'],
      ['X-None', ''],
    ]);
    expect(m.body.toString()).toBe('body\r\nmore\r\n\r\n');
    expect(parseMessage('A: b\r\n', true)).toEqual({ headers: [['A', Buffer.from(' b')]], body: Buffer.alloc(0) });
    // blanks before the colon go; a tab after it stays (Postfix and sendmail eat one space only)
    expect(parseMessage('X-Sp : v\r\nX-Tab:\tw\r\n\r\n').headers.map(([n, v]) => [n, v.toString()])).toEqual([
      ['X-Sp', 'v'],
      ['X-Tab', '\tw'],
    ]);
    // 8-bit bytes survive
    const raw = parseMessage(Buffer.from([0x58, 0x3a, 0x20, 0xe9, 0x0d, 0x0a, 0x0d, 0x0a, 0xff]));
    expect(raw.headers[0][1]).toEqual(Buffer.from([0xe9]));
    expect(raw.body).toEqual(Buffer.from([0xff]));
    // a line that is not a header starts the body
    expect(parseMessage('A: b\r\nnot a header\r\n').body.toString()).toBe('not a header\r\n');
  });

  it('parses single and multi-line replies', () => {
    expect(parseSmtpReply('550 5.7.1 Go away')).toEqual({ rcode: '550', xcode: '5.7.1', text: 'Go away', lines: ['Go away'], raw: '550 5.7.1 Go away' });
    expect(parseSmtpReply('421 closing')).toEqual({ rcode: '421', text: 'closing', lines: ['closing'], raw: '421 closing' });
    expect(parseSmtpReply('550-5.7.1 a\r\n550 5.7.1 b').lines).toEqual(['a', 'b']);
    expect(() => parseSmtpReply('oops')).toThrow(ProtocolError);
  });
});
