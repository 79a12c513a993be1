/**
 * Header values folded with CRLF behind a real sendmail 8.17 (issue 18,
 * item 1), on both engines: nodemilter sends them folded with LF, and
 * sendmail delivers them folded with CRLF, without a bare CR, byte for byte
 * as Postfix does (test/parity/postfix.test.ts) and as TestCtx renders them.
 * sendmail relays to test/helpers/rawsink.ts, which keeps every byte.
 *
 * Without root or the packages this file fails, unless
 * NODEMILTER_SKIP_SENDMAIL=1 is set outside CI.
 */
import * as path from 'path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { ENGINES, FIXTURES, checkEngine, engineEnv, freeInetSpec, splitMessage, startProcess, type RunningProcess } from '../helpers';
import { mayskipSendmail, sendmailUnavailable, startSendmail, type SendmailInstance } from '../helpers/sendmail';
import { startRawSink, type RawSink } from '../helpers/rawsink';
import { foldedFields, mtaMessage } from './helpers';
import type * as Testing from '../../src/testing';

const MILTER = path.join(FIXTURES, 'parity', 'mta-milter.cjs');
// eslint-disable-next-line @typescript-eslint/no-var-requires
const KINDS = require(MILTER);
// eslint-disable-next-line @typescript-eslint/no-var-requires
const { TestCtx } = require('../../dist/src/testing/index.js') as typeof Testing;

const unavailable = sendmailUnavailable();
const skip = unavailable !== undefined && mayskipSendmail();

const MESSAGE = mtaMessage('crlf folding');

describe.skipIf(skip).each(ENGINES)('behind sendmail (%s engine)', (engine) => {
  let sm: SendmailInstance | undefined;
  let milter: RunningProcess | undefined;
  let raw: RawSink | undefined;

  beforeAll(async () => {
    if (unavailable) return;
    const spec = await freeInetSpec();
    milter = await startProcess(process.execPath, { args: [MILTER, spec, 'fold'], env: engineEnv(engine), socket: spec, stopSignal: 'SIGKILL' });
    checkEngine(milter.pid, engine);
    raw = await startRawSink();
    sm = await startSendmail({ milter: spec, relayPort: raw.port });
  }, 60_000);

  afterAll(async () => {
    await sm?.stop();
    await raw?.stop();
    await milter?.stop();
  }, 20_000);

  it('sendmail is unpacked and we are root (set NODEMILTER_SKIP_SENDMAIL=1 to skip outside CI)', () => {
    expect(unavailable).toBeUndefined();
  });

  it('delivers CRLF-folded header values folded with CRLF, no bare CR, as TestCtx renders them', async () => {
    const t = await sm!.send({ from: '<alice@client.example>', rcpts: ['<bob@sink.example>'], message: MESSAGE });
    expect(t.end?.code).toBe(250);
    const d = (await raw!.waitFor(` id ${t.sendmailId}`)).data.toString('latin1');
    expect(d).not.toMatch(/\r(?!\n)/);
    const [head] = splitMessage(d);
    const delivered = foldedFields(head);
    expect(delivered.sort()).toEqual(['Subject: changed\r\n folded', 'X-Fold: one\r\n\ttwo', 'X-Ins: first\r\n\tsecond\r\n third']);
    const ctx = new TestCtx(KINDS.fold);
    await ctx.feedMessage(MESSAGE, { from: '<alice@client.example>', rcpts: ['<bob@sink.example>'] });
    expect(foldedFields(splitMessage(ctx.resultMessage().toString('latin1'))[0]).sort()).toEqual(delivered);
  }, 60_000);
});
