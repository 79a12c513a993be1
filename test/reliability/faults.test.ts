// Faults on the libmilter engine: the MTA dropping the connection mid-way,
// handlers that hang, throw or block the event loop, and SIGTERM under load.
// The milter is scripts/reliability/milter.cjs in a child process, driven
// by the MTA-side MilterClient over a real socket.
import { afterEach, describe, expect, it } from 'vitest';

import { MilterClient, type MessageResult } from '../../src/testing/client';
import { stopAll } from '../helpers';
import { MESSAGE, dropAt, lines, settle, sleep, startMilter, stats, type Stats } from './lib';

afterEach(() => stopAll());

const balanced = (s: Stats) => s.diag.active === 0 && s.diag.held === 0 && s.live === 0;

/** Run `n` jobs with at most `width` at once. */
async function pool(n: number, width: number, job: (i: number) => Promise<void>): Promise<void> {
  let next = 0;
  await Promise.all(
    Array.from({ length: width }, async () => {
      while (next < n) await job(next++);
    }),
  );
}

async function send(spec: string, helo = MESSAGE.helo, opts: { eomTimeout?: number; timeout?: number } = {}): Promise<MessageResult> {
  const c = await MilterClient.connect(spec, { timeout: opts.timeout ?? 15_000, eomTimeout: opts.eomTimeout });
  try {
    return await c.sendMessage({ ...MESSAGE, helo, quit: true });
  } finally {
    c.destroy();
  }
}

describe.each(['libmilter', 'node'] as const)('%s engine', (engine) => {
describe('the MTA disconnects', () => {
  it('in the middle of headers, body and EOM: abort and close reach JS at most and exactly once, sessions balance, RSS stays bounded', async () => {
    const m = await startMilter({ engine, quiet: true, oneMessage: true, eomSleep: 20 }, ['--expose-gc']);
    const kinds = ['header', 'body', 'eom'] as const;
    // Warm up (JIT, allocator pools), then measure over many more sessions.
    await pool(150, 10, (i) => dropAt(m.spec, kinds[i % 3]));
    const warm = await settle(m, balanced);
    expect(balanced(warm)).toBe(true);
    const N = 1500;
    await pool(N, 10, (i) => dropAt(m.spec, kinds[i % 3]));
    const s = await settle(m, balanced);
    const total = 150 + N;
    console.log(
      `[reliability] disconnects: ${total} sessions; created ${s.diag.created} deleted ${s.diag.deleted}; ` +
        `closes ${s.counts.closes} aborts ${s.counts.aborts} eoms ${s.counts.eoms}; ` +
        `rss ${(warm.rss / 2 ** 20).toFixed(1)} -> ${(s.rss / 2 ** 20).toFixed(1)} MiB, heap ${(warm.heapUsed / 2 ** 20).toFixed(1)} -> ${(s.heapUsed / 2 ** 20).toFixed(1)} MiB`,
    );
    expect(s.diag.created).toBe(total);
    expect(s.diag.deleted).toBe(total);
    expect(s.diag.held).toBe(0);
    // close: exactly once per session; abort: never twice for one session.
    expect(s.counts.closes).toBe(total);
    expect(s.counts.dupCloses).toBe(0);
    expect(s.counts.dupAborts).toBe(0);
    // A drop inside headers or body aborts the transaction (libmilter calls
    // xxfi_abort). A drop right after EOM usually does not (the eom ran and
    // was answered), but on a slow machine (ASan) libmilter sometimes sees
    // the EOF first and aborts: 91 of 550 in one ASan run.
    const dropsInMessage = kinds.slice(0, 2).reduce((n, _k, j) => n + Math.ceil((total - j) / 3), 0);
    expect(s.counts.aborts).toBeGreaterThanOrEqual(dropsInMessage);
    expect(s.counts.aborts).toBeLessThanOrEqual(total);
    // An eom whose connection is already gone may fail its addheader
    // (MI_FAILURE: libmilter could not write); nothing else may fail.
    expect(s.counts.handlerErrors).toBeLessThanOrEqual(Math.ceil(total / 3));
    expect(lines(m).filter((l) => l.ev === 'handlerError' && l.callback !== 'eom')).toEqual([]);
    // Generous bound: 1500 sessions of state would be far more than this if
    // kept. Not under ASan, whose quarantine holds freed memory on purpose.
    if (!process.env.NODEMILTER_CHILD_PRELOAD) expect(s.rss - warm.rss).toBeLessThan(24 * 2 ** 20);
    expect(s.heapUsed - warm.heapUsed).toBeLessThan(8 * 2 ** 20);
    expect(m.hasExited).toBe(false);
  }, 120_000);
});

describe('a handler hangs', () => {
  it('the deadline answers TEMPFAIL 451 4.3.0, other sessions are served meanwhile', async () => {
    const m = await startMilter({ engine, hangIn: 'envrcpt', deadline: { default: 1000 } });
    const t0 = Date.now();
    const [hung, other] = await Promise.all([
      send(m.spec).then((r) => Object.assign(r, { doneAt: Date.now() })),
      (async () => {
        await sleep(100);
        const c = await MilterClient.connect(m.spec);
        try {
          const t = Date.now();
          const r = await c.connect('other.example', 'inet', '192.0.2.1', 1);
          return { status: r.status, ms: Date.now() - t, doneAt: Date.now() };
        } finally {
          c.destroy();
        }
      })(),
    ]);
    const ms = Date.now() - t0;
    expect(hung.decision).toBe('tempfail');
    expect(hung.stoppedAt).toBe('envrcpt');
    expect(hung.envrcpt[0].reply?.rcode).toBe('451');
    expect(hung.envrcpt[0].reply?.xcode).toBe('4.3.0');
    expect(ms).toBeGreaterThanOrEqual(900);
    expect(ms).toBeLessThan(6000);
    expect(other.status).toBe('continue');
    // Served while the hung session still waited for its deadline.
    expect(other.doneAt).toBeLessThan(hung.doneAt);
    const s = await settle(m, (x) => x.diag.active === 0);
    expect(s.diag.deadlineExpired).toBe(1);
    expect(s.diag.created).toBe(s.diag.deleted);
    // The hung handler's promise never settles, and a session's callbacks run
    // in order: its abort and close callbacks stay queued behind it. The
    // engine still forgets the session when libmilter closes it, so a hung
    // handler does not keep its session until exit.
    console.log(`[reliability] hang: answered after ${ms} ms; sessions held ${s.diag.held}, closes seen ${s.counts.closes}`);
    expect(s.diag.held).toBe(0);
    expect(s.counts.closes).toBe(1); // the other session's; the hung one's waits behind its handler
  }, 30_000);

  it('a slow eom stays alive through progress while the MTA would time out without it', async () => {
    const m = await startMilter({ engine, eomSleep: 5000, progressInterval: 1000 });
    const t0 = Date.now();
    // The client gives up after 2.5 s without a packet; each progress restarts that.
    const r = await send(m.spec, MESSAGE.helo, { eomTimeout: 2500 });
    const ms = Date.now() - t0;
    expect(r.decision).toBe('continue');
    expect(r.eom?.progress).toBeGreaterThanOrEqual(3);
    expect(r.actions.some((a) => a.type === 'addheader' && a.name === 'X-Reliability')).toBe(true);
    expect(ms).toBeGreaterThanOrEqual(4900);
    const s = await stats(m);
    expect(s.diag.deadlineExpired).toBe(0);
    expect(s.diag.progressSent).toBeGreaterThanOrEqual(3);
  }, 30_000);

  it('an eom that hangs past its own deadline is answered TEMPFAIL, with progress until then', async () => {
    const m = await startMilter({ engine, hangIn: 'eom', deadline: { eom: 3000 }, progressInterval: 1000 });
    const r = await send(m.spec, MESSAGE.helo, { eomTimeout: 2500 });
    expect(r.decision).toBe('tempfail');
    expect(r.eom?.reply?.rcode).toBe('451');
    expect(r.eom?.progress).toBeGreaterThanOrEqual(1);
    const s = await stats(m);
    expect(s.diag.deadlineExpired).toBe(1);
  }, 30_000);
});

describe('a storm of throwing handlers', () => {
  it('every failure is answered by the policy (451 4.3.0), reported once, and the milter keeps serving', async () => {
    const m = await startMilter({ engine, throwIn: ['connect', 'helo', 'envfrom', 'envrcpt', 'header', 'eoh', 'body', 'eom', 'close'], throwRate: 0.15 });
    const N = 400;
    const results: MessageResult[] = [];
    await pool(N, 10, async () => {
      results.push(await send(m.spec));
    });
    const s = await settle(m, balanced);
    const tempfail = results.filter((r) => r.decision === 'tempfail');
    const passed = results.filter((r) => r.decision === 'continue');
    const errs = lines(m).filter((l) => l.ev === 'handlerError');
    const errsWaited = errs.filter((e) => e.callback !== 'close');
    console.log(`[reliability] throw storm: ${N} sessions, ${tempfail.length} tempfail, ${passed.length} passed, ${errs.length} handler errors (${errs.length - errsWaited.length} in close)`);
    expect(tempfail.length + passed.length).toBe(N);
    expect(tempfail.length).toBeGreaterThan(N / 4);
    expect(passed.length).toBeGreaterThan(10);
    // One reported error per failed step the MTA waited for, one per failing close.
    expect(errsWaited.length).toBe(tempfail.length);
    for (const r of tempfail) {
      const step = r.stoppedAt === 'envrcpt' ? r.envrcpt[0] : r.stoppedAt === 'header' ? r.headers[r.headers.length - 1] : r[r.stoppedAt ?? 'eom'] as { reply?: { rcode: string; xcode?: string } };
      expect(step?.reply?.rcode).toBe('451');
      expect(step?.reply?.xcode).toBe('4.3.0');
    }
    expect(s.diag.created).toBe(N);
    expect(s.diag.deleted).toBe(N);
    expect(s.diag.held).toBe(0);
    expect(errs.length - errsWaited.length).toBeGreaterThan(10);
    expect(s.counts.handlerErrors).toBe(errs.length);
    expect(m.hasExited).toBe(false);
  }, 120_000);
});

describe('a synchronous handler blocks the event loop for 2 s', () => {
  it('other sessions wait and resume when it ends; nothing deadlocks or expires', async () => {
    const m = await startMilter({ engine, blockIn: 'envfrom', blockMs: 2000 });
    const t0 = Date.now();
    const blocked = send(m.spec, 'block');
    await sleep(300);
    const others = Array.from({ length: 5 }, () => send(m.spec).then((r) => ({ r, at: Date.now() - t0 })));
    const [b, ...rest] = await Promise.all([blocked.then((r) => ({ r, at: Date.now() - t0 })), ...others]);
    const evs = lines(m);
    const start = evs.find((e) => e.ev === 'block-start')!.at as number;
    const end = evs.find((e) => e.ev === 'block-end')!.at as number;
    console.log(`[reliability] sync block: blocked ${end - start} ms; blocked session done at ${b.at} ms, others at ${rest.map((x) => x.at).join(', ')} ms`);
    expect(end - start).toBeGreaterThanOrEqual(2000);
    expect(b.r.decision).toBe('continue');
    for (const o of rest) {
      expect(o.r.decision).toBe('continue');
      expect(o.r.actions.some((a) => a.type === 'addheader' && a.name === 'X-Reliability')).toBe(true);
      // They could not finish while the loop was blocked, and did soon after.
      expect(o.at).toBeGreaterThanOrEqual(2000);
      expect(o.at).toBeLessThan(7000);
    }
    const s = await settle(m, balanced);
    expect(s.diag.deadlineExpired).toBe(0);
    expect(s.diag.created).toBe(6);
    expect(s.diag.deleted).toBe(6);
  }, 30_000);
});

describe('SIGTERM under load', () => {
  it('with drain: sessions in flight finish with their header, new ones get 421, the process exits 0', async () => {
    // eom takes 4 s so the late connection lands inside the drain window even on a loaded machine.
    // Debian's libmilter pool runs slow callbacks in waves: a session that
    // becomes ready while a worker is idle is handed to that worker, and
    // several handed to one idle worker wait until a worker finishes (seen
    // here: 20 eoms of 4 s answered at about 4, 8 and 12 s, 6-7 at a time).
    // So on libmilter not all 20 sessions are in flight when SIGTERM comes:
    // the ones its pool has not started yet begin after the drain began and
    // are refused like any new session (421). The TypeScript engine starts
    // them all at once.
    const m = await startMilter({ engine, eomSleep: 4000, drain: 40_000 });
    const N = 20;
    // Settled into values at once, so a failure is reported by the assertions below.
    const inflight = Array.from({ length: N }, () => send(m.spec).catch((e: Error) => e));
    // Let the first sessions get into their eom (none can finish for 4 s).
    const until = Date.now() + 10_000;
    let s0 = await stats(m);
    while (s0.counts.eomsStarted === 0 && Date.now() < until) {
      await sleep(20);
      s0 = await stats(m);
    }
    await sleep(500);
    s0 = await stats(m);
    // In eom when the signal comes (an eom lasts 4 s: none has finished yet).
    const eomsBefore = s0.counts.eomsStarted - s0.counts.eoms;
    expect(eomsBefore).toBeGreaterThan(0);
    m.child.kill('SIGTERM');
    await m.waitForOutput('"ev":"sigterm"');
    const late = await MilterClient.connect(m.spec);
    const refused = await late.connect('late.example', 'inet', '192.0.2.2', 2);
    late.destroy();
    const results = await Promise.all(inflight);
    const exit = await m.exited;
    const stopped = lines(m).find((l) => l.ev === 'stopped') as unknown as Stats & { ms: number };
    let finished = 0;
    let refusedNew = 0;
    for (const r of results) {
      if (r instanceof Error) throw r;
      if (r.decision === 'continue') {
        finished++;
        expect(r.actions.some((a) => a.type === 'addheader' && a.name === 'X-Reliability')).toBe(true);
      } else {
        // Not started before the drain began: refused at connect, as a new session.
        refusedNew++;
        expect(r).toMatchObject({ decision: 'tempfail', stoppedAt: 'connect' });
        expect(r.connect?.reply?.rcode).toBe('421');
      }
    }
    console.log(
      `[reliability] SIGTERM with drain (${engine}): ${eomsBefore} in eom at the signal, ${finished}/${N} finished with their header, ` +
        `${refusedNew} not yet started and refused 421; late session ${refused.status} ${refused.reply?.rcode}, stopped after ${stopped.ms} ms, exit ${exit.code}`,
    );
    expect(refused.status).toBe('tempfail');
    expect(refused.reply?.rcode).toBe('421');
    // Every session in eom when the signal came finished, and every eom that ran answered continue.
    expect(finished).toBeGreaterThanOrEqual(eomsBefore);
    expect(stopped.counts.eoms).toBe(finished);
    if (engine === 'node') expect(finished).toBe(N);
    expect(exit.code).toBe(0);
    expect(stopped.diag.created).toBe(stopped.diag.deleted);
  }, 90_000);
});
});
