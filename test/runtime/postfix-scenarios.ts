// Workers behind a real Postfix (test/helpers/postfix.ts, milter_default_action
// = tempfail), shared by the short runs in test/runtime/postfix.test.ts (npm
// test) and the long ones in test/reliability/workers-postfix.test.ts (npm run
// reliability). The SMTP clients here act as a sending MTA would: a message
// answered 4xx (or whose connection closed before the final answer) was not
// accepted and is retried; one answered 250 must be delivered, once, with the
// milter's X-Stamp. reloadUnderSmtpSource drives the same Postfix with its
// own C load generator, smtp-source, instead.
import { execFile } from 'node:child_process';

import { afterEach, expect } from 'vitest';

import { freeInetSpec, stopAll, type Engine } from '../helpers';
import { countDeliveries, mayskipPostfix, postfixUnavailable, startPostfix, stopAllPostfix, type PostfixInstance, type SmtpTranscript } from '../helpers/postfix';
import { lines, logs, sleep, startRuntime, stopRuntimes, waitLine, workerPids, type Runtime } from './lib';

/** Why Postfix cannot run (a test throws it), whether the suite may skip, and the clean-up after each test. */
export function postfixSuite(): { unavailable: string | undefined; skip: boolean } {
  const unavailable = postfixUnavailable();
  afterEach(async () => {
    await stopAllPostfix();
    await stopRuntimes();
    await stopAll();
  });
  return { unavailable, skip: unavailable !== undefined && mayskipPostfix() };
}

interface Outcome {
  accepted: { id: number; t: SmtpTranscript }[];
  /** First answers that were not the milter's verdict: 4xx or a closed connection. */
  notMilter: { id: number; what: string }[];
  pending: number[];
}

async function setUp(engine: Engine, cfg: Record<string, unknown>): Promise<{ m: Runtime; pf: PostfixInstance }> {
  const spec = await freeInetSpec();
  const m = await startRuntime(engine, { socket: spec, workers: 2, eomSleep: 100, drain: 10_000, restart: { initialDelay: 200 }, ...cfg });
  await waitLine(m, (l) => l.ev === 'listening' && l.worker === undefined);
  const pf = await startPostfix({
    milter: spec,
    main: { milter_default_action: 'tempfail', milter_connect_timeout: '2s', milter_command_timeout: '10s', milter_content_timeout: '20s' },
  });
  return { m, pf };
}

function message(id: number): { from: string; rcpts: string[]; message: string } {
  return {
    from: '<sender@example.org>',
    rcpts: ['<rcpt@example.net>'],
    message: `From: sender@example.org\r\nTo: rcpt@example.net\r\nSubject: workers ${id}\r\nMessage-ID: <workers-${id}@example.org>\r\n\r\nmessage ${id}\r\n`,
  };
}

async function submit(pf: PostfixInstance, id: number, o: Outcome, first: boolean): Promise<void> {
  let t: SmtpTranscript;
  try {
    t = await pf.send(message(id));
  } catch (err) {
    if (first) o.notMilter.push({ id, what: `connection closed: ${(err as Error).message.slice(0, 80)}` });
    o.pending.push(id);
    return;
  }
  const code = t.end?.code ?? (t.mail.code !== 250 ? t.mail.code : !t.rcpt.some((r) => r.code === 250) ? t.rcpt[0]?.code : t.data?.code);
  if (code === 250) o.accepted.push({ id, t });
  else if (code !== undefined && code >= 400 && code < 500) {
    if (first) o.notMilter.push({ id, what: `${code} ${(t.end ?? t.data ?? t.mail).raw.slice(0, 80)}` });
    o.pending.push(id);
  } else throw new Error(`message ${id}: unexpected answer ${JSON.stringify(t)}`);
}

/** Retry what was not accepted, then check every accepted message was delivered once, stamped. */
async function settle(pf: PostfixInstance, o: Outcome, n: number): Promise<{ stamped: number; unstamped: number }> {
  for (let round = 0; round < 5 && o.pending.length > 0; round++) {
    const again = o.pending.splice(0);
    for (const id of again) await submit(pf, id, o, false);
  }
  expect(o.pending).toEqual([]);
  const { stamped, unstamped, twice } = await countDeliveries(pf, o.accepted, /^X-Stamp: \d+ g\d+/m);
  expect(new Set(o.accepted.map((a) => a.id)).size).toBe(n);
  // Each accepted message was delivered once.
  expect(twice, `delivered more than once:\n${twice.join('\n')}\nmail log:\n${twice.length ? pf.log() : ''}`).toEqual([]);
  return { stamped, unstamped };
}

/** Senders back to back until `stop()` says so; returns the ids sent. */
function load(pf: PostfixInstance, o: Outcome, senders: number, stop: () => boolean, pause = 0): Promise<number> {
  let next = 0;
  return Promise.all(
    Array.from({ length: senders }, async () => {
      while (!stop()) {
        await submit(pf, next++, o, true);
        if (pause) await sleep(pause);
      }
    }),
  ).then(() => next);
}

/**
 * Under load, SIGKILL the worker holding sessions: every message is then
 * delivered stamped or answered 4xx and retried until delivered.
 */
export async function crashUnderLoad(engine: Engine, seconds: number): Promise<void> {
  // A long eom: the worker killed is almost surely in one.
  const { m, pf } = await setUp(engine, { eomSleep: 400 });
  const o: Outcome = { accepted: [], notMilter: [], pending: [] };
  const started = Date.now();
  const stop = () => Date.now() - started > seconds * 1000;
  const sending = load(pf, o, 4, stop, 50);
  await sleep(Math.min(1500, (seconds * 1000) / 3));
  // Kill the worker of the next eom to start, as soon as its line is seen:
  // it is then 400 ms from answering, so a session of its is in flight.
  // (The pid of the last eom line seen before was not enough: that eom could
  // have ended, and that worker be between sessions, when the kill came.)
  const pids = workerPids(m.pid);
  const seen = lines(m).length;
  const next = await waitLine(m, (l, i) => i >= seen && l.ev === 'eom' && pids.includes(l.pid), 10_000, 5);
  const victim = next.pid;
  process.kill(victim, 'SIGKILL');
  await waitLine(m, (l) => /serving again/.test(l.msg ?? ''), 30_000);
  const n = await sending;
  const { stamped, unstamped } = await settle(pf, o, n);
  console.log(
    `[runtime] ${engine}: kill -9 of 1 of 2 workers under load for ${seconds} s through Postfix: ${n} messages, ` +
      `first answers not the milter's ${o.notMilter.length} (${[...new Set(o.notMilter.map((x) => x.what.slice(0, 40)))].join('; ')}), all retried; ` +
      `delivered ${o.accepted.length}, stamped ${stamped}, unstamped ${unstamped}`,
  );
  expect(logs(m).some((l) => new RegExp(`worker \\d \\(pid ${victim}\\) was killed by SIGKILL`).test(l))).toBe(true);
  expect(stamped).toBe(n);
  expect(unstamped).toBe(0);
  // The kill did bite: sessions of the killed worker were answered 4xx (and retried).
  expect(o.notMilter.length).toBeGreaterThan(0);
  await pf.stop();
}

/** `reloads` SIGHUPs spread evenly over `seconds` from `started`, each awaited until the supervisor logs it done; returns how many were done. */
async function reloadsDuring(m: Runtime, started: number, seconds: number, reloads: number): Promise<number> {
  const every = (seconds * 1000) / (reloads + 1);
  let done = 0;
  for (let i = 1; i <= reloads; i++) {
    await sleep(Math.max(0, started + i * every - Date.now()));
    const before = logs(m).filter((l) => /reload done/.test(l)).length;
    process.kill(m.pid, 'SIGHUP');
    await waitLine(m, () => logs(m).filter((l) => /reload done/.test(l)).length > before, 30_000);
    done++;
  }
  return done;
}

/** What reloads must leave behind, whatever the client: no milter warning in Postfix's log, every old worker drained by stopping accepting, more than one generation served. */
function reloadEvidence(m: Runtime, pf: PostfixInstance): { gens: number; milterWarnings: string[]; handedOff: number } {
  return {
    gens: new Set(lines(m).filter((l) => l.ev === 'eom').map((l) => l.gen)).size,
    milterWarnings: pf.log().split('\n').filter((l) => /warning: .*milter/i.test(l)),
    handedOff: logs(m).filter((l) => /stopped accepting; draining/.test(l)).length,
  };
}

function expectCleanReloads(e: ReturnType<typeof reloadEvidence>, done: number, reloads: number): void {
  expect(done).toBe(reloads);
  expect(e.gens).toBeGreaterThan(1);
  // Every old worker drained by handing off, none by refusing (2 per reload).
  expect(e.handedOff).toBe(2 * reloads);
  // No milter connection refused, timed out or cut on Postfix's side.
  expect(e.milterWarnings).toEqual([]);
}

/**
 * `reloads` SIGHUPs spread over `seconds` of load through Postfix, on
 * either engine: no message answered by anything but the milter (no 4xx,
 * no dropped connection), and no milter connection refused, timed out or
 * broken on Postfix's side (its log has no milter warning): a retiring
 * worker stops accepting and finishes its sessions, the new generation
 * takes the new connections (docs/service.md).
 */
export async function reloadUnderLoad(engine: Engine, seconds: number, reloads: number): Promise<void> {
  const { m, pf } = await setUp(engine, {});
  const o: Outcome = { accepted: [], notMilter: [], pending: [] };
  const started = Date.now();
  const stop = () => Date.now() - started > seconds * 1000;
  const sending = load(pf, o, 6, stop);
  const done = await reloadsDuring(m, started, seconds, reloads);
  const n = await sending;
  const { stamped, unstamped } = await settle(pf, o, n);
  const e = reloadEvidence(m, pf);
  console.log(
    `[runtime] ${engine}: ${done} reloads in ${seconds} s of load through Postfix (6 SMTP clients): ${n} messages over ${e.gens} worker generations, ` +
      `answered by something else than the milter ${o.notMilter.length}${o.notMilter.length ? ` (${[...new Set(o.notMilter.map((x) => x.what.slice(0, 50)))].join('; ')})` : ''}; ` +
      `Postfix milter warnings ${e.milterWarnings.length}${e.milterWarnings.length ? ` (${e.milterWarnings[0].slice(0, 160)})` : ''}; ` +
      `old workers that stopped accepting ${e.handedOff}; delivered ${o.accepted.length}, stamped ${stamped}, unstamped ${unstamped}`,
  );
  expectCleanReloads(e, done, reloads);
  expect(stamped).toBe(n);
  expect(unstamped).toBe(0);
  expect(o.notMilter).toEqual([]);
  await pf.stop();
}

export const SMTP_SOURCE_BIN = '/usr/sbin/smtp-source';

interface Batch {
  id: number;
  messages: number;
  code: number | null;
  stderr: string;
}

/** One run of smtp-source: `messages` messages over `sessions` parallel sessions, a connection each, subject "reload batch ID", recipients numbered from 0 (-N). */
function smtpSource(port: number, id: number, messages: number, sessions: number): Promise<Batch> {
  const args = ['-N', '-s', String(sessions), '-m', String(messages), '-l', '512', '-f', 'sender@example.org', '-t', 'rcpt@example.net', '-S', `reload batch ${id}`, `127.0.0.1:${port}`];
  return new Promise((resolve) => {
    execFile(SMTP_SOURCE_BIN, args, { timeout: 60_000 }, (err, _stdout, stderr) => {
      const code = err ? (typeof (err as { code?: unknown }).code === 'number' ? ((err as { code: number }).code) : null) : 0;
      resolve({ id, messages, code, stderr: String(stderr) });
    });
  });
}

/**
 * The reload run of issue 20 with a C load generator: Postfix's own
 * smtp-source submits through Postfix in batches of `batch` messages over
 * `sessions` parallel SMTP sessions (a new SMTP connection, and so a new
 * milter connection, per message), back to back for `seconds`, while the
 * supervisor is reloaded `reloads` times. smtp-source aborts at the first
 * reply that is not the positive one it expects (it runs without -A): with
 * milter_default_action = tempfail, a batch that exits 0 with nothing on
 * stderr had every message answered by the milter and accepted. Then every
 * message submitted (batch subject and numbered recipient) must reach the
 * sink exactly once, stamped.
 */
export async function reloadUnderSmtpSource(engine: Engine, seconds: number, reloads: number, sessions = 8, batch = 48): Promise<void> {
  const { m, pf } = await setUp(engine, {});
  const batches: Batch[] = [];
  const started = Date.now();
  const sending = (async () => {
    for (let id = 0; Date.now() - started < seconds * 1000; id++) batches.push(await smtpSource(pf.smtpPort, id, batch, sessions));
  })();
  const done = await reloadsDuring(m, started, seconds, reloads);
  await sending;
  const failed = batches.filter((b) => b.code !== 0 || b.stderr.trim() !== '');
  const submitted = batches.reduce((n, b) => n + b.messages, 0);
  // Wait for Postfix to relay every accepted message to the sink.
  const ours = () => pf.delivered().filter((d) => /^Subject: reload batch \d+$/m.test(d.message));
  const until = Date.now() + 60_000;
  while (ours().length < submitted && Date.now() < until) await sleep(200);
  await sleep(1000); // time for a duplicate to show up
  const got = ours();
  const seen = new Map<string, number>();
  let stamped = 0;
  for (const d of got) {
    const key = `${/^Subject: reload batch (\d+)$/m.exec(d.message)![1]}/${d.rcptArgs.join(',')}`;
    seen.set(key, (seen.get(key) ?? 0) + 1);
    if (/^X-Stamp: \d+ g\d+/m.test(d.message)) stamped++;
  }
  const duplicates = [...seen.values()].filter((c) => c > 1).length;
  const e = reloadEvidence(m, pf);
  console.log(
    `[runtime] ${engine}: ${done} reloads in ${seconds} s of smtp-source through Postfix (${sessions} sessions): ${batches.length} batches, ${submitted} messages over ${e.gens} worker generations; ` +
      `batches failed ${failed.length}${failed.length ? ` (${failed[0].stderr.trim().slice(0, 160)})` : ''}; Postfix milter warnings ${e.milterWarnings.length}${e.milterWarnings.length ? ` (${e.milterWarnings[0].slice(0, 160)})` : ''}; ` +
      `old workers that stopped accepting ${e.handedOff}; delivered ${got.length} (${seen.size} distinct, ${duplicates} twice or more), stamped ${stamped}`,
  );
  expect(failed).toEqual([]);
  expectCleanReloads(e, done, reloads);
  expect(seen.size).toBe(submitted);
  expect(duplicates).toBe(0);
  expect(got.length).toBe(submitted);
  expect(stamped).toBe(submitted);
  await pf.stop();
}
