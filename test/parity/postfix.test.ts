/**
 * Two MTA-correctness defects, checked behind a real Postfix on both engines
 * (issue 18, items 1 and 2):
 *
 * - A header value folded with CRLF (`"one\r\n\ttwo"`) must not reach the
 *   recipient as a bare CR: nodemilter sends it as LF, which Postfix writes
 *   as CRLF. TestCtx and MilterClient (with applyActions) render exactly the
 *   bytes Postfix delivered.
 * - Postfix sends SMFIC_ABORT outside transactions (after a delivered
 *   message, at the end of a session); Base.abort() must run only for a
 *   transaction that was really aborted (here: one RSET after RCPT).
 *
 * The milter is test/fixtures/parity/mta-milter.cjs. Postfix relays to
 * test/helpers/rawsink.ts, which keeps every byte (smtp-sink's dump drops
 * CRs, so it cannot show a bare CR). Without Postfix (or root) this file
 * fails, unless NODEMILTER_SKIP_POSTFIX=1 is set outside CI.
 */
import * as path from 'path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { ENGINES, FIXTURES, buildC, C_TESTMILTER_SRC, checkEngine, engineEnv, freeInetSpec, splitMessage, startProcess, type Engine, type RunningProcess } from '../helpers';
import { mayskipPostfix, postfixUnavailable, smtpDialog, startPostfix, type PostfixInstance } from '../helpers/postfix';
import { startRawSink, type RawSink } from '../helpers/rawsink';
import { foldedFields, mtaMessage } from './helpers';
import type * as Testing from '../../src/testing';

const MILTER = path.join(FIXTURES, 'parity', 'mta-milter.cjs');
// The fixture milter extends dist's Base, so TestCtx comes from dist too.
// eslint-disable-next-line @typescript-eslint/no-var-requires
const KINDS = require(MILTER);
// eslint-disable-next-line @typescript-eslint/no-var-requires
const { MilterClient, TestCtx, applyActions } = require('../../dist/src/testing/index.js') as typeof Testing;

const unavailable = postfixUnavailable();
const skip = unavailable !== undefined && mayskipPostfix();

interface Ev {
  conn: number;
  ev: string;
}
const events = (p: RunningProcess): Ev[] =>
  p.stdout
    .split('\n')
    .filter((l) => l.startsWith('{'))
    .map((l) => JSON.parse(l) as Ev)
    .filter((e) => e.conn !== undefined);

async function startMilter(engine: Engine, kind: string): Promise<{ milter: RunningProcess; spec: string }> {
  const spec = await freeInetSpec();
  const milter = await startProcess(process.execPath, { args: [MILTER, spec, kind], env: engineEnv(engine), socket: spec, stopSignal: 'SIGKILL' });
  checkEngine(milter.pid, engine);
  return { milter, spec };
}

describe.skipIf(skip).each(ENGINES)('behind Postfix (%s engine)', (engine) => {
  it('Postfix is installed and we are root (set NODEMILTER_SKIP_POSTFIX=1 to skip outside CI)', () => {
    expect(unavailable).toBeUndefined();
  });

  describe('header values folded with CRLF', () => {
    let pf: PostfixInstance | undefined;
    let milter: RunningProcess | undefined;
    let raw: RawSink | undefined;
    let spec = '';

    beforeAll(async () => {
      if (unavailable) return;
      ({ milter, spec } = await startMilter(engine, 'fold'));
      raw = await startRawSink();
      pf = await startPostfix({ milter: spec, main: { relayhost: `[127.0.0.1]:${raw.port}` } });
    }, 30_000);

    afterAll(async () => {
      await pf?.stop();
      await raw?.stop();
      await milter?.stop();
    }, 20_000);

    it('are delivered folded with CRLF, no bare CR anywhere, exactly as TestCtx and MilterClient render them', async () => {
      const msg = mtaMessage('crlf folding');
      const t = await pf!.send({ from: '<alice@client.example>', rcpts: ['<bob@sink.example>'], message: msg });
      expect(t.end?.code).toBe(250);
      const d = (await raw!.waitFor(` id ${t.queueId}`)).data.toString('latin1');
      expect(d).not.toMatch(/\r(?!\n)/);
      const [head] = splitMessage(d);
      const delivered = foldedFields(head);
      expect(delivered).toEqual(['X-Ins: first\r\n\tsecond\r\n third', 'Subject: changed\r\n folded', 'X-Fold: one\r\n\ttwo']);

      // TestCtx, with the same milter class in this process.
      const ctx = new TestCtx(KINDS.fold);
      await ctx.feedMessage(msg, { from: '<alice@client.example>', rcpts: ['<bob@sink.example>'] });
      expect(foldedFields(splitMessage(ctx.resultMessage().toString('latin1'))[0])).toEqual(delivered);

      // MilterClient, against the same milter process Postfix talks to.
      const client = await MilterClient.connect(spec);
      try {
        const r = await client.sendMessage({ from: '<alice@client.example>', rcpt: ['<bob@sink.example>'], message: msg, quit: true });
        expect(r.decision).toBe('continue');
        const applied = applyActions(Buffer.from(msg, 'latin1'), r.actions);
        expect(foldedFields(splitMessage(applied.message.toString('latin1'))[0])).toEqual(delivered);
        // What went over the wire: LF folding only.
        expect(r.actions.filter((a) => a.type === 'addheader' || a.type === 'insheader' || a.type === 'chgheader').map((a: any) => a.value)).toEqual([
          'one\n\ttwo',
          'changed\n folded',
          'first\n\tsecond\n third',
        ]);
      } finally {
        client.destroy();
      }
    });
  });

  describe('MilterClient renders what Postfix delivers for a milter that sends CRLF (a C libmilter milter)', () => {
    it('CR CR LF for CRLF, a bare CR kept, a tab after a line break without whitespace', async () => {
      if (unavailable) return;
      // The C milter is the same for both engine rounds: only this test's Postfix differs.
      const cBin = await buildC(C_TESTMILTER_SRC);
      const spec = await freeInetSpec();
      const script = 'addheader\tX-Raw\tone\\r\\n\\ttwo\naddheader\tX-Cr\ta\\rb\naddheader\tX-Nows\tc\\nD: e\naddheader\tX-Trail\tf\\n';
      const c = await startProcess(cBin, { args: [spec], env: { TM_EOM: script }, socket: spec, stopSignal: 'SIGKILL' });
      const raw = await startRawSink();
      const pf = await startPostfix({ milter: spec, main: { relayhost: `[127.0.0.1]:${raw.port}` } });
      try {
        const msg = mtaMessage(`foreign ${engine}`);
        const t = await pf.send({ from: '<alice@client.example>', rcpts: ['<bob@sink.example>'], message: msg });
        expect(t.end?.code).toBe(250);
        const [head] = splitMessage((await raw.waitFor(` id ${t.queueId}`)).data.toString('latin1'));
        const added = head.split(/\r\n(?![ \t])/).filter((h) => h.startsWith('X-'));
        // Measured: Postfix 3.7 keeps the CR (a bare CR reaches the recipient).
        expect(added).toEqual(['X-Raw: one\r\r\n\ttwo', 'X-Cr: a\rb', 'X-Nows: c\r\n\tD: e', 'X-Trail: f\r\n\t']);
        const client = await MilterClient.connect(spec);
        try {
          const r = await client.sendMessage({ from: '<alice@client.example>', rcpt: ['<bob@sink.example>'], message: msg, quit: true });
          const applied = splitMessage(applyActions(Buffer.from(msg, 'latin1'), r.actions).message.toString('latin1'))[0];
          expect(applied.split(/\r\n(?![ \t])/).filter((h) => h.startsWith('X-'))).toEqual(added);
        } finally {
          client.destroy();
        }
      } finally {
        await pf.stop();
        await raw.stop();
        await c.stop();
      }
    }, 60_000);
  });

  describe('Base.abort() counts only transactions that were aborted', () => {
    for (const kind of ['fold', 'aborts'] as const) {
      it(`${kind === 'fold' ? 'a milter with envfrom' : 'a milter overriding only connect, abort and eom'}: two delivered messages and one RSET after RCPT make one abort`, async () => {
        if (unavailable) return;
        const { milter, spec } = await startMilter(engine, kind);
        const pf = await startPostfix({ milter: spec });
        try {
          // Two messages on two connections, one message each.
          for (const n of [1, 2]) {
            const t = await pf.send({ from: '<alice@client.example>', rcpts: ['<bob@sink.example>'], message: mtaMessage(`one of two ${n}`) });
            expect(t.end?.code).toBe(250);
          }
          // One session: a delivered message, then a transaction reset after RCPT.
          const replies = await smtpDialog(pf.smtpPort, [
            'EHLO client.test.example',
            'MAIL FROM:<alice@client.example>',
            'RCPT TO:<bob@sink.example>',
            'DATA',
            { message: mtaMessage('then a reset') },
            'MAIL FROM:<alice@client.example>',
            'RCPT TO:<bob@sink.example>',
            'RSET',
            'QUIT',
          ]);
          expect(replies.map((r) => r.code)).toEqual([220, 250, 250, 250, 354, 250, 250, 250, 250, 221]);
          // Wait until the milter saw the end of all three sessions.
          let evs: Ev[] = [];
          for (let i = 0; i < 100; i++) {
            evs = events(milter);
            if (new Set(evs.filter((e) => e.ev === 'connect').map((e) => e.conn)).size >= 3 && evs.filter((e) => e.ev === 'eom').length >= 3) {
              if (kind === 'aborts' || evs.filter((e) => e.ev === 'close').length >= 3) break;
            }
            await new Promise((r) => setTimeout(r, 100));
          }
          // Give a late (wrong) abort time to arrive before counting.
          await new Promise((r) => setTimeout(r, 500));
          evs = events(milter);
          expect(evs.filter((e) => e.ev === 'eom')).toHaveLength(3);
          const aborts = evs.filter((e) => e.ev === 'abort');
          expect(aborts).toHaveLength(1);
          // The abort belongs to the third session, after its second MAIL.
          const third = evs.filter((e) => e.conn === aborts[0].conn).map((e) => e.ev);
          expect(third.filter((e) => e === 'eom')).toHaveLength(1);
          if (kind === 'fold') expect(third.filter((e) => e !== 'close')).toEqual(['connect', 'envfrom', 'eom', 'envfrom', 'abort']);
        } finally {
          await pf.stop();
          await milter.stop();
        }
      }, 60_000);
    }
  });
});
