/**
 * Conformance of nodemilter/mta with Postfix: the same scripted mail goes
 * through (a) a private Postfix with `smtpd_milters` set to a chain, relaying
 * to smtp-sink, and (b) a nodemilter/mta `Milters` chain over the same
 * milter processes, and, for a nodemilter milter alone, (c) TestCtx. The
 * delivered bytes, the envelope and the verdicts must match.
 *
 * Milters: OpenDKIM (signing; verifying with TestPublicKeys), OpenDMARC,
 * spamass-milter with spamd (local tests only), the e2e nodemilter milter
 * and a milter that adds CRLF-folded values, on both engines.
 *
 * The one normalisation: OpenDKIM's `t=` (signing time) and the `b=` it
 * changes. Postfix's own Received header is taken from what it delivered and
 * put first in (b) and (c), as Postfix shows it to its milters.
 */
import { execFileSync } from 'child_process';
import * as path from 'path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { Milters, type MessageOutcome } from '../../src/mta';
import { ENGINES, FIXTURES, checkEngine, engineEnv, freeInetSpec, startProcess, type RunningProcess } from '../helpers';
import { mayskipPostfix, postfixUnavailable, startPostfix as startPostfixSink, type PostfixInstance } from '../helpers/postfix';
import { startCaptureSink, type CaptureSink } from './capture-sink';
import { dist } from '../examples/common';
import { makeDkimKey, realMiltersUnavailable, rspamdUnavailable, startOpenDKIM, startOpenDMARC, startRspamd, startSpamassMilter, type DkimKey, type RealMilter } from './real-milters';

const unavailable = postfixUnavailable() ?? realMiltersUnavailable();
const skip = unavailable !== undefined && mayskipPostfix();

const E2E_MILTER = path.join(FIXTURES, 'e2e', 'milter.cjs');
const CRLF_MILTER = path.join(__dirname, 'fixtures', 'crlf-milter.cjs');
const POSTFIX_V = () => `Postfix ${execFileSync('postconf', ['-d', '-h', 'mail_version']).toString().trim()}`;

function message(subject: string, extra: string[] = []): string {
  return [
    'From: Alice <alice@example.com>',
    'To: Bob <bob@example.org>',
    `Subject: ${subject}`,
    'Date: Tue, 01 Dec 2026 20:00:00 +0000',
    `Message-ID: <${subject.replace(/[^a-z0-9]/gi, '')}.${Math.random().toString(36).slice(2)}@example.com>`,
    'X-Folded: first',
    '\tsecond',
    ...extra,
    '',
    'Hello Bob.',
    '.a line starting with a dot',
    '',
  ].join('\r\n');
}

/** OpenDKIM's signing time and the signature that depends on it. */
function normalise(m: string): string {
  return m.replace(/\bt=\d+;/g, 't=T;').replace(/\bb=[A-Za-z0-9+/=\s]+?(;|\r\n(?![ \t]))/g, (_x, end) => `b=B${end}`);
}

/** Postfix's own Received header, whole, with its CRLF. */
const RECEIVED_RE = /^Received: from [^\r\n]*\r\n\tby mta\.test\.example \(Postfix\)[^\r\n]*(\r\n[ \t][^\r\n]*)*\r\n/m;

/** Postfix's own Received header (`by mta.test.example (Postfix)`), as name and value (LF folding). */
function postfixReceived(delivered: string): { name: string; value: string } {
  const m = /^Received:((?: from [^\r\n]*)\r\n[ \t]by mta\.test\.example \(Postfix\)[^\r\n]*(?:\r\n[ \t][^\r\n]*)*)\r\n/m.exec(delivered);
  if (!m) throw new Error(`no Received header of Postfix's in ${JSON.stringify(delivered.slice(0, 400))}`);
  return { name: 'Received', value: m[1].replace(/^ /, '').replace(/\r\n/g, '\n') };
}

/** A private Postfix relaying to a capture sink (exact bytes); `sink` is where its mail lands. */
type Pf = PostfixInstance & { sink: CaptureSink };
async function startPostfix(opts: { milter: string; main?: Record<string, string> }): Promise<Pf> {
  const sink = await startCaptureSink();
  const pf = await startPostfixSink({ milter: opts.milter, main: { ...(opts.main ?? {}), relayhost: `[127.0.0.1]:${sink.port}` } }).catch(async (e) => {
    await sink.close();
    throw e;
  });
  const stop = pf.stop.bind(pf);
  return Object.assign(pf, {
    sink,
    stop: async () => {
      await stop();
      await sink.close();
    },
  });
}

interface PathResult {
  /** 250 (delivered) or the SMTP code of the refusal. */
  code: number;
  /** The reply text after the code (for refusals). */
  text?: string;
  message?: string;
  recipients?: string[];
  sender?: string;
}

/** Run one message through Postfix and then through a nodemilter/mta chain over the same milters. */
async function bothPaths(
  pf: Pf,
  specs: string[],
  msg: string,
  rcpts: string[] = ['<bob@example.org>'],
): Promise<{ postfix: PathResult; mta: PathResult; received?: { name: string; value: string }; queueId?: string }> {
  const t = await pf.send({ from: '<alice@example.com>', rcpts, message: msg, helo: 'client.test.example' });
  let postfix: PathResult;
  let received: { name: string; value: string } | undefined;
  let queueId: string | undefined;
  if (t.end?.code === 250 && t.queueId) {
    queueId = t.queueId;
    const d = await pf.sink.waitFor(` id ${t.queueId}`);
    received = postfixReceived(d.message);
    postfix = { code: 250, message: d.message, recipients: d.rcptTo.map((r) => r.split(' ')[0]).sort(), sender: d.mailFrom.split(' ')[0] };
  } else {
    const last = t.end ?? t.rcpt.find((r) => r.code !== 250) ?? t.mail;
    postfix = { code: last.code, text: last.lines.join('\n') };
  }

  const milters = new Milters(specs.map((socket) => ({ socket, commandTimeout: 30_000 })));
  const s = await milters.session(
    { address: '127.0.0.1', port: 54321, hostname: 'localhost' },
    { j: 'mta.test.example', '{daemon_name}': 'mta.test.example', '{daemon_addr}': '127.0.0.1', v: POSTFIX_V() },
  );
  let mta: PathResult;
  try {
    let v = await s.connect();
    if (v.action === 'continue') v = await s.helo('client.test.example');
    s.macros.i = queueId ?? 'NOQUEUE';
    if (v.action === 'continue') v = await s.mail('<alice@example.com>');
    let accepted = 0;
    for (const r of rcpts) {
      if (v.action !== 'continue') break;
      const rv = await s.rcpt(r);
      if (rv.action === 'continue') accepted++;
      else if (accepted === 0) v = rv;
    }
    if (v.action !== 'continue') mta = { code: v.reply.code, text: [v.reply.xcode, ...v.reply.lines].filter(Boolean).join(' ') };
    else {
      const out: MessageOutcome = await s.message(msg, received ? [received] : []);
      if (out.verdict.action === 'continue') {
        mta = {
          code: 250,
          message: (await out.toBuffer()).toString('latin1'),
          recipients: out.envelope.recipients.map((r) => r.address).sort(),
          sender: out.envelope.sender,
        };
      } else mta = { code: out.verdict.reply.code, text: [out.verdict.reply.xcode, ...out.verdict.reply.lines].filter(Boolean).join(' ') };
    }
  } finally {
    await s.close();
    await milters.close();
  }
  if (postfix.code !== 250 && postfix.text) postfix.text = postfix.text.replace(/\n/g, ' ');
  return { postfix, mta, received, queueId };
}

function expectSame(r: { postfix: PathResult; mta: PathResult }): void {
  expect(r.mta.code).toBe(r.postfix.code);
  if (r.postfix.code === 250) {
    expect(normalise(r.mta.message!)).toBe(normalise(r.postfix.message!));
    expect(r.mta.recipients).toEqual(r.postfix.recipients);
    expect(r.mta.sender).toBe(r.postfix.sender);
  } else expect(r.mta.text).toBe(r.postfix.text);
}

async function startNodeMilter(script: string, engine: string): Promise<RunningProcess> {
  const spec = await freeInetSpec();
  const p = await startProcess(process.execPath, { args: [script, spec], env: engineEnv(engine as 'node'), socket: spec, stopSignal: 'SIGKILL' });
  checkEngine(p.pid, engine as 'node');
  return p;
}

describe.skipIf(skip)('conformance with Postfix: third-party milters', () => {
  let key: DkimKey | undefined;
  let sign: RealMilter | undefined;
  let verify: RealMilter | undefined;
  let dmarc: RealMilter | undefined;
  let spamass: RealMilter | undefined;
  beforeAll(async () => {
    if (unavailable) return;
    key = makeDkimKey('example.com', 'sel');
    [sign, verify, dmarc, spamass] = await Promise.all([startOpenDKIM(key!, 'sign'), startOpenDKIM(key!, 'verify'), startOpenDMARC(), startSpamassMilter()]);
  }, 90_000);
  afterAll(async () => {
    await Promise.all([sign, verify, dmarc, spamass].map((m) => m?.stop()));
    key?.remove();
  });

  it('Postfix and the real milters are installed and we are root (set NODEMILTER_SKIP_POSTFIX=1 to skip outside CI)', () => {
    expect(unavailable).toBeUndefined();
  });

  it('OpenDKIM signing, then OpenDKIM verifying the signed message: same bytes, same Authentication-Results', async () => {
    const pf = await startPostfix({ milter: sign!.spec });
    let signed: string;
    try {
      const r = await bothPaths(pf, [sign!.spec], message('dkim sign'));
      expectSame(r);
      expect(r.postfix.message).toMatch(/^DKIM-Signature: v=1; a=rsa-sha256; c=relaxed\/relaxed; d=example.com; s=sel;/m);
      // the signed message without Postfix's Received, for the verifier
      signed = r.postfix.message!.replace(RECEIVED_RE, '');
    } finally {
      await pf.stop();
    }
    const pv = await startPostfix({ milter: verify!.spec });
    try {
      const r = await bothPaths(pv, [verify!.spec], signed);
      expectSame(r);
      expect(r.postfix.message).toMatch(/^Authentication-Results: mta.test.example;\r\n\tdkim=pass \(1024-bit key\) header.d=example.com /m);
    } finally {
      await pv.stop();
    }
  }, 90_000);

  it('OpenDMARC and spamass-milter in one chain', async () => {
    const pf = await startPostfix({ milter: dmarc!.spec, main: { smtpd_milters: [dmarc!.spec, spamass!.spec].map(pfSpec).join(', ') } });
    try {
      const r = await bothPaths(pf, [dmarc!.spec, spamass!.spec], message('dmarc and spamassassin'));
      expectSame(r);
      expect(r.postfix.message).toMatch(/^Authentication-Results: mta.test.example; dmarc=none \(p=none dis=none\) header.from=example.com\r\n/m);
      expect(r.postfix.message).toMatch(/\r\nX-Spam-Status: No, score=-?[0-9.]+ required=5.0 tests=/);
    } finally {
      await pf.stop();
    }
  }, 90_000);
});

describe.skipIf(skip)('conformance with Postfix: rspamd (proxy worker in milter mode)', () => {
  const why = rspamdUnavailable();
  let rspamd: RealMilter | undefined;
  beforeAll(async () => {
    if (why) return;
    rspamd = await startRspamd();
  }, 200_000);
  afterAll(async () => {
    await rspamd?.stop();
  }, 20_000);

  it('rspamd is installed (apt-get install rspamd)', () => {
    expect(why).toBeUndefined();
  });

  it('same bytes and headers as Postfix', async () => {
    const pf = await startPostfix({ milter: rspamd!.spec });
    try {
      const r = await bothPaths(pf, [rspamd!.spec], message('rspamd'));
      expectSame(r);
      expect(r.postfix.message).toMatch(/\r\nX-Spamd-Result: default: False \[/);
      expect(r.postfix.message).toContain(`\r\nX-Rspamd-Queue-Id: ${r.queueId}\r\n`);
      // no symbol from a DNS lookup (their timeouts vary from run to run)
      expect(r.postfix.message).not.toMatch(/_FAIL\(/);
    } finally {
      await pf.stop();
    }
  }, 90_000);
});

function pfSpec(spec: string): string {
  const m = /^inet:(\d+)@(.+)$/.exec(spec)!;
  return `inet:${m[2]}:${m[1]}`;
}

describe.skipIf(skip).each(ENGINES)('conformance with Postfix and TestCtx: nodemilter milters (%s engine)', (engine) => {
  let e2e: RunningProcess | undefined;
  let crlf: RunningProcess | undefined;
  let sign: RealMilter | undefined;
  let pf: Pf | undefined;
  let pfChain: Pf | undefined;
  let key: DkimKey | undefined;
  beforeAll(async () => {
    if (unavailable) return;
    key = makeDkimKey('example.com', 'sel');
    [e2e, crlf, sign] = await Promise.all([startNodeMilter(E2E_MILTER, engine), startNodeMilter(CRLF_MILTER, engine), startOpenDKIM(key!, 'sign')]);
    pf = await startPostfix({ milter: e2e.socket! });
    pfChain = await startPostfix({ milter: crlf.socket!, main: { smtpd_milters: [crlf.socket!, e2e.socket!, sign.spec].map(pfSpec).join(', ') } });
  }, 60_000);
  afterAll(async () => {
    await pf?.stop();
    await pfChain?.stop();
    await Promise.all([e2e?.stop(), crlf?.stop(), sign?.stop()]);
    key?.remove();
  });

  it('the e2e milter alone: every edit, three paths, same bytes and envelope', async () => {
    const msg = message('[tag] [insert] [addrcpt] [replace] edits');
    const r = await bothPaths(pf!, [e2e!.socket!], msg);
    expectSame(r);
    expect(r.postfix.recipients).toEqual(['<added@sink.example>', '<bob@example.org>']);

    // TestCtx, from dist (the fixture's Base is dist's). TestCtx has no MTA
    // Received header, which Postfix hides from milters but counts in
    // insheader indexes: compare without [insert], and without Postfix's header.
    const plain = message('[tag] [addrcpt] [replace] testctx');
    const r2 = await bothPaths(pf!, [e2e!.socket!], plain);
    expectSame(r2);
    const { TestCtx } = dist('src/testing/index');
    const { E2EMilter } = require(E2E_MILTER);
    const t = new TestCtx(E2EMilter);
    await t.feedMessage(plain, { from: '<alice@example.com>', rcpts: ['<bob@example.org>'] });
    expect(t.resultMessage().toString('latin1')).toBe(r2.postfix.message!.replace(RECEIVED_RE, ''));
    expect([...t.resultEnvelope().recipients].sort()).toEqual(r2.postfix.recipients);
    await t.close();
  }, 60_000);

  it('the e2e milter rejecting at RCPT and at end of message: same SMTP replies', async () => {
    expectSame(await bothPaths(pf!, [e2e!.socket!], message('refused'), ['<refused@example.org>']));
    const r = await bothPaths(pf!, [e2e!.socket!], message('[reject] me'));
    expect(r.postfix.code).toBe(550);
    expectSame(r);
  }, 60_000);

  it('chgheader Received 1: which Received header Postfix means', async () => {
    const pfCrlf = await startPostfix({ milter: crlf!.socket! });
    try {
      const r = await bothPaths(pfCrlf, [crlf!.socket!], message('[received]', ['Received: from outside.example by client.test.example']));
      expectSame(r);
      expect(r.postfix.message).toContain('changed by the crlf milter');
    } finally {
      await pfCrlf.stop();
    }
  }, 60_000);

  it('envelope changes and header deletion at an index beyond the end: same envelope and bytes', async () => {
    const pfCrlf = await startPostfix({ milter: crlf!.socket! });
    try {
      const r = await bothPaths(pfCrlf, [crlf!.socket!], message('[envelope]'), ['<bob@example.org>', '<carol@example.org>']);
      expectSame(r);
      expect(r.postfix.sender).toBe('<bounce@example.com>');
      expect(r.postfix.recipients).toEqual(['<carol@example.org>', '<new@example.net>', '<par@example.net>']);
      expect(r.postfix.message).not.toContain('X-Folded');
    } finally {
      await pfCrlf.stop();
    }
  }, 60_000);

  it('a chain of three: CRLF in values, index semantics, the e2e milter, OpenDKIM signing the result', async () => {
    const r = await bothPaths(pfChain!, [crlf!.socket!, e2e!.socket!, sign!.spec], message('[tag] chain'));
    expectSame(r);
    const m = r.postfix.message!;
    // The crlf milter is a nodemilter milter: its addheader('X-Crlf', 'one\r\n\ttwo')
    // is sent folded with LF (src/validate.ts), so Postfix delivers no bare CR;
    // a foreign milter's CRLF (test/mta/protocol.test.ts, test/parity/postfix.test.ts) does give one.
    expect(m).toContain('\r\nX-Crlf: one\r\n\ttwo\r\n');
    expect(m).not.toMatch(/\r(?!\n)/);
    expect(m).toContain('\r\nX-Lf: three\r\n\tfour\r\n');
    expect(m).toContain('\r\nSubject: a second subject\r\n');
    // the e2e milter saw the crlf milter's four headers but not Postfix's Received (6 + 4),
    // which counts for insheader's index all the same (X-Inserted goes right after it)
    expect(m).toContain('\r\nX-E2E: seen 10 headers\r\n');
    expect(m).toMatch(/\(Postfix\)[^\r\n]*\r\n\tfor <bob@example.org>; [^\r\n]*\r\nX-Inserted: at index 1\r\nFrom: /);
  }, 60_000);
});
