/**
 * Acceptance: one milter (test/fixtures/e2e/milter.cjs) and the same
 * messages through the three layers of the testing toolkit give the same
 * decisions and the same resulting message:
 *   1. TestCtx (in process, no socket),
 *   2. MilterClient against the milter served by runmilter, plus applyActions,
 *   3. a real Postfix delivering to smtp-sink,
 * modulo the headers the MTA adds (Received...). A last case records a
 * known difference (insheader's index under Postfix). 2 and 3 run once per
 * engine: libmilter and the TypeScript engine.
 *
 * Needs Postfix like test/postfix.test.ts (NODEMILTER_SKIP_POSTFIX=1 skips
 * outside CI).
 */
import * as path from 'path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { P_HDR_LEADSPC } from '../src/constants';
import { applyActions, MilterClient } from '../src/testing';
import { ENGINES, FIXTURES, checkEngine, engineEnv, freeInetSpec, startProcess, type RunningProcess } from './helpers';
import { mayskipPostfix, postfixUnavailable, startPostfix, type PostfixInstance } from './helpers/postfix';

const E2E_MILTER = path.join(FIXTURES, 'e2e', 'milter.cjs');
// The fixture extends dist's Base, so it is driven by dist's TestCtx (built by `npm test`).
const { E2EMilter, REJECT_TEXT, ADDED_RCPT } = require(E2E_MILTER);
const { TestCtx } = require('../dist/src/testing/index.js');
const { CONTINUE, REJECT } = require('../dist/src/index.js');

const unavailable = postfixUnavailable();
const skip = unavailable !== undefined && mayskipPostfix();

const FROM = '<alice@client.example>';
const RCPTS = ['<bob@sink.example>'];
const HELO = 'client.test.example';

function message(subject: string): string {
  return [
    'From: Alice <alice@client.example>',
    'To: bob@sink.example',
    `Subject:  ${subject}`, // two spaces: the milter sees one
    'Date: Sun, 29 Nov 2026 04:00:00 +0000',
    'Message-ID: <acceptance-1@client.example>',
    'X-Folded: first line',
    '\tsecond line',
    'X-Tight:no space',
    'X-Tab:\ttab',
    '',
    'Hello Bob.',
    '',
    'Regards.',
    '',
  ].join('\r\n');
}

const MTA_HEADERS = /^(Received|Return-Path|Delivered-To|X-Original-To):/i;

/** Drop the header fields an MTA adds (with their continuation lines). */
function withoutMtaHeaders(msg: string): string {
  const at = msg.indexOf('\r\n\r\n');
  const lines = msg.slice(0, at).split('\r\n');
  const kept: string[] = [];
  let dropping = false;
  for (const l of lines) {
    if (/^[ \t]/.test(l)) {
      if (!dropping) kept.push(l);
      continue;
    }
    dropping = MTA_HEADERS.test(l);
    if (!dropping) kept.push(l);
  }
  return `${kept.join('\r\n')}\r\n${msg.slice(at + 2)}`;
}

interface Outcome {
  decision: 'continue' | 'reject';
  reply?: string;
  message?: string;
  recipients?: string[];
}

async function viaTestCtx(subject: string): Promise<Outcome> {
  const t = new TestCtx(E2EMilter);
  const status = await t.feedMessage(message(subject), { from: FROM, rcpts: RCPTS, helo: HELO, hostname: 'localhost' });
  await t.close();
  if (status === REJECT) return { decision: 'reject', reply: `${t.reply.rcode} ${t.reply.xcode} ${t.reply.lines.join(' ')}` };
  expect(status).toBe(CONTINUE);
  return { decision: 'continue', message: t.resultMessage().toString('latin1'), recipients: t.resultEnvelope().recipients.sort() };
}

async function viaClient(spec: string, subject: string): Promise<Outcome> {
  const c = await MilterClient.connect(spec);
  const msg = message(subject);
  const r = await c.sendMessage({ client: { hostname: 'localhost' }, helo: HELO, from: FROM, rcpt: RCPTS, message: msg, quit: true });
  if (r.decision === 'reject') return { decision: 'reject', reply: r.eom?.reply?.raw };
  expect(r.decision).toBe('continue');
  const out = applyActions(msg, r.actions, { sender: FROM, recipients: RCPTS }, { leadingSpace: (r.negotiation.steps & P_HDR_LEADSPC) !== 0 });
  return { decision: 'continue', message: out.message.toString('latin1'), recipients: out.envelope.recipients.sort() };
}

async function viaPostfix(pf: PostfixInstance, subject: string): Promise<Outcome & { raw?: string }> {
  const t = await pf.send({ from: FROM, rcpts: RCPTS, message: message(subject), helo: HELO });
  if (t.end!.code !== 250) return { decision: t.end!.code >= 500 ? 'reject' : ('tempfail' as any), reply: t.end!.raw };
  const found = await pf.waitDelivered(t.queueId!);
  expect(found).toHaveLength(1);
  return {
    decision: 'continue',
    raw: found[0].message,
    message: withoutMtaHeaders(found[0].message),
    recipients: found[0].rcptArgs.map((a) => a.split(' ')[0]).sort(),
  };
}

describe.skipIf(skip).each(ENGINES)('acceptance: TestCtx, MilterClient and Postfix agree (%s engine)', (engine) => {
  let pf: PostfixInstance | undefined;
  let milter: RunningProcess | undefined;
  let spec = '';

  beforeAll(async () => {
    spec = await freeInetSpec();
    milter = await startProcess(process.execPath, { args: [E2E_MILTER, spec], env: engineEnv(engine), socket: spec, stopSignal: 'SIGKILL' });
    checkEngine(milter.pid, engine);
    if (!unavailable) pf = await startPostfix({ milter: spec });
  }, 30_000);

  afterAll(async () => {
    await pf?.stop();
    await milter?.stop();
  }, 20_000);

  it('Postfix is installed and we are root (set NODEMILTER_SKIP_POSTFIX=1 to skip outside CI)', () => {
    expect(unavailable).toBeUndefined();
  });

  it('header add + header change + body replace + recipient add: same decision, message and recipients', async () => {
    const subject = '[tag] [replace] [addrcpt] accepted';
    const a = await viaTestCtx(subject);
    const b = await viaClient(spec, subject);
    const c = await viaPostfix(pf!, subject);
    expect(a.decision).toBe('continue');
    expect(a.recipients).toEqual([ADDED_RCPT, ...RCPTS].sort());
    expect(a.message).toContain('\r\nSubject: [e2e]  [tag] [replace] [addrcpt] accepted\r\n');
    expect(a.message).toMatch(/\r\nX-E2E: seen 8 headers\r\n\r\nThis body was replaced/);
    expect(a.message).toContain('\r\nX-Tight:no space\r\nX-Tab:\ttab\r\n');
    expect(b).toEqual(a);
    expect({ decision: c.decision, message: c.message, recipients: c.recipients }).toEqual(a);
    // What was taken away from Postfix's copy: its Received header only.
    expect(c.raw!.split('\r\n').filter((l) => /^[A-Za-z-]+:/.test(l) && MTA_HEADERS.test(l)).map((l) => l.split(':')[0])).toEqual(['Received']);
  });

  it('a message the milter rejects: same decision and the same reply text', async () => {
    const subject = '[reject] this one';
    const a = await viaTestCtx(subject);
    const b = await viaClient(spec, subject);
    const c = await viaPostfix(pf!, subject);
    expect(a).toEqual({ decision: 'reject', reply: `550 5.7.1 ${REJECT_TEXT}` });
    expect(b).toEqual(a);
    expect(c).toEqual(a);
  });

  it('known difference: Postfix counts its own Received header in insheader\'s index', async () => {
    const subject = '[insert] where does it go';
    const a = await viaTestCtx(subject);
    const b = await viaClient(spec, subject);
    const c = await viaPostfix(pf!, subject);
    expect(b).toEqual(a);
    // TestCtx and applyActions: index 1 among the headers the milter saw = after From.
    expect(a.message).toMatch(/^From: [^\r]*\r\nX-Inserted: at index 1\r\nTo: /);
    // Postfix: index 1 counts its Received header (which the milter never saw) = before From.
    expect(c.raw).toMatch(/^Received: [^]*?\r\nX-Inserted: at index 1\r\nFrom: /);
  });
});
