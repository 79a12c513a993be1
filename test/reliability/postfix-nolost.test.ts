// No lost mail, end to end: a private Postfix (test/helpers/postfix.ts) with
// `milter_default_action = tempfail` in front of scripts/reliability/milter.cjs,
// which stamps every message it passes with X-Reliability. Messages are
// submitted while the milter is SIGKILLed and restarted, and while it is
// stopped with drain (SIGTERM) and restarted. A submission Postfix answers
// 4xx was not accepted and stays with the sender, who retries it here (as an
// SMTP client's queue would). Afterwards: every message was delivered once
// Postfix accepted it, none was delivered without the milter's stamp, none
// was refused permanently.
import { afterEach, describe, expect, it } from 'vitest';

import { freeInetSpec, stopAll } from '../helpers';
import { countDeliveries, mayskipPostfix, postfixUnavailable, startPostfix, stopAllPostfix, type SmtpTranscript } from '../helpers/postfix';
import { sleep, startMilter, type Milter } from './lib';

const unavailable = postfixUnavailable();
const skip = unavailable !== undefined && mayskipPostfix();

afterEach(async () => {
  await stopAllPostfix();
  await stopAll();
});

describe.skipIf(skip).each(['libmilter', 'node'] as const)('no lost mail behind Postfix, %s engine', (engine) => {
  it('milter killed and restarted, then drained and restarted: every message delivered stamped or retried, none unstamped', async () => {
    if (unavailable) throw new Error(unavailable);
    const spec = await freeInetSpec();
    const cfg = { engine, socket: spec, quiet: true, eomSleep: 100, drain: 10_000 };
    let m: Milter = await startMilter(cfg);
    const pf = await startPostfix({
      milter: spec,
      main: { milter_default_action: 'tempfail', milter_connect_timeout: '2s', milter_command_timeout: '10s', milter_content_timeout: '20s' },
    });
    const N = 60;
    const outcome: { id: number; t: SmtpTranscript; tries: number }[] = [];
    const pending: number[] = [];
    let dropped = 0;
    const submit = async (id: number, tries: number) => {
      let t: SmtpTranscript;
      try {
        t = await pf.send({
        from: '<sender@example.org>',
        rcpts: ['<rcpt@example.net>'],
          message: `From: sender@example.org\r\nTo: rcpt@example.net\r\nSubject: nolost ${id}\r\nMessage-ID: <nolost-${id}@example.org>\r\n\r\nmessage ${id}\r\n`,
        });
      } catch {
        // The connection closed before a final answer: not accepted, the sender retries.
        dropped++;
        pending.push(id);
        return;
      }
      const code = t.end?.code ?? (t.mail.code !== 250 ? t.mail.code : !t.rcpt.some((r) => r.code === 250) ? t.rcpt[0]?.code : t.data?.code);
      if (code === 250) outcome.push({ id, t, tries });
      else if (code !== undefined && code >= 400 && code < 500) pending.push(id);
      else throw new Error(`message ${id}: unexpected answer ${JSON.stringify(t)}`);
    };
    const wave = async (ids: number[], during: () => Promise<void>) => {
      let next = 0;
      const senders = Array.from({ length: 4 }, async () => {
        while (next < ids.length) {
          await submit(ids[next++], 1);
          await sleep(150);
        }
      });
      await Promise.all([...senders, during()]);
    };
    const ids = Array.from({ length: N }, (_, i) => i);
    // Wave 1: SIGKILL mid-flight, back after 1 s.
    let killed = 0;
    await wave(ids.slice(0, N / 2), async () => {
      await sleep(400);
      m.child.kill('SIGKILL');
      killed++;
      await m.exited;
      await sleep(1000);
      m = await startMilter(cfg);
    });
    // Wave 2: SIGTERM with drain mid-flight, back after it has stopped.
    let drained = 0;
    await wave(ids.slice(N / 2), async () => {
      await sleep(400);
      m.child.kill('SIGTERM');
      drained++;
      await m.exited;
      m = await startMilter(cfg);
    });
    const firstTryTempfail = pending.length;
    // The senders retry what was not accepted, with the milter up.
    for (let round = 0; round < 5 && pending.length > 0; round++) {
      const again = pending.splice(0);
      for (const id of again) await submit(id, round + 2);
    }
    expect(pending).toEqual([]);
    // Everything Postfix accepted is delivered, each with the milter's stamp.
    const { stamped, unstamped, twice } = await countDeliveries(pf, outcome, /^X-Reliability: passed \d+/m);
    const delivered = outcome.length;
    console.log(
      `[reliability] postfix no-lost-mail: N=${N}, milter SIGKILLed ${killed}x and drained ${drained}x; ` +
        `accepted first try ${N - firstTryTempfail}, 4xx first try ${firstTryTempfail} (all accepted on retry), ` +
        `connections closed without an answer ${dropped}, delivered ${delivered}, stamped ${stamped}, unstamped ${unstamped}, still queued ${(await pf.heldQueueIds()).length} held`,
    );
    const warnings = pf.log().split('\n').filter((l) => /warning|fatal|panic/.test(l));
    console.log(`[reliability] postfix log warnings (${warnings.length}):\n${[...new Set(warnings.map((l) => l.replace(/^.*?(warning|fatal|panic)/, '$1')))].slice(0, 8).join('\n')}`);
    expect(new Set(outcome.map((o) => o.id)).size).toBe(N);
    expect(delivered).toBe(N);
    // Each accepted message was delivered once.
    expect(twice, `delivered more than once:\n${twice.join('\n')}\nmail log:\n${twice.length ? pf.log() : ''}`).toEqual([]);
    expect(stamped).toBe(N);
    expect(unstamped).toBe(0);
    // The faults did bite: some submissions were refused while the milter was down.
    expect(firstTryTempfail).toBeGreaterThan(0);
  }, 240_000);
});
