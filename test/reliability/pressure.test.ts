// The TypeScript engine under a flooding, stalling or trickling MTA (issue
// 17): each finding of the review is a scenario here with its bound
// asserted. The milter runs in a process of its own (pressure-milter.cjs)
// where memory is measured; the MTA is RawMta, which floods, stops reading
// or half-closes as told.
import * as path from 'node:path';
import { afterEach, describe, expect, it } from 'vitest';

import { startProcess, tmpSocketSpec, type RunningProcess } from '../helpers';
import { RawMta, frame, optneg, preamble } from './rawmta';

const FIXTURE = path.join(__dirname, 'pressure-milter.cjs');
const MiB = 1024 * 1024;
const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

interface Stats {
  now: { rss: number; arrayBuffers: number };
  peak: { rss: number; arrayBuffers: number; retained?: number };
  counts: { bodyChunks: number; bodyBytes: number; eoms: number; errors: number };
  diag: Record<string, number>;
  open: number;
}

type Milter = RunningProcess & { spec: string };
const running: Milter[] = [];
const mtas: RawMta[] = [];

afterEach(async () => {
  for (const m of mtas.splice(0)) m.sock.destroy();
  await Promise.all(running.splice(0).map((p) => p.stop()));
});

async function startMilter(cfg: Record<string, unknown>, fdLimit?: number): Promise<Milter> {
  const spec = tmpSocketSpec();
  const env = { PRESSURE_CONFIG: JSON.stringify({ ...cfg, socket: spec }) };
  const node = [process.execPath, '--expose-gc', FIXTURE];
  const p = fdLimit
    ? await startProcess('/bin/sh', { args: ['-c', `ulimit -n ${fdLimit} && exec "$@"`, 'sh', ...node], env, socket: spec, stopSignal: 'SIGKILL' })
    : await startProcess(node[0], { args: node.slice(1), env, socket: spec, stopSignal: 'SIGKILL' });
  const m = Object.assign(p, { spec });
  running.push(m);
  return m;
}

function events(p: RunningProcess): Record<string, any>[] {
  return p.stdout.split('\n').filter((l) => l.startsWith('{')).map((l) => JSON.parse(l));
}

async function signal(p: RunningProcess, sig: 'SIGUSR1' | 'SIGUSR2', ev: string): Promise<Record<string, any>> {
  const before = events(p).filter((e) => e.ev === ev).length;
  p.child.kill(sig);
  const until = Date.now() + 10_000;
  for (;;) {
    const all = events(p).filter((e) => e.ev === ev);
    if (all.length > before) return all[all.length - 1];
    if (Date.now() > until) throw new Error(`no ${ev} line from the milter: ${p.stderr}`);
    await sleep(10);
  }
}

const stats = (p: RunningProcess) => signal(p, 'SIGUSR2', 'stats') as Promise<unknown> as Promise<Stats>;
const resetPeaks = (p: RunningProcess) => signal(p, 'SIGUSR1', 'reset');

async function mta(spec: string, keep = true): Promise<RawMta> {
  const m = await RawMta.open(spec, keep);
  mtas.push(m);
  return m;
}

/** An MTA that negotiated and sent a message up to its body. */
async function inBody(spec: string, keep = true): Promise<RawMta> {
  const m = await mta(spec, keep);
  m.sock.write(optneg());
  await m.until(() => (m.count.O ?? 0) === 1, 5000, 'the negotiation reply');
  m.sock.write(preamble());
  return m;
}

describe('reads are paused: a flooding MTA costs a bounded amount', () => {
  for (const noreply of [false, true]) {
    it(`95 MiB of 64 KiB body frames pipelined to a body() of 10 ms per chunk${noreply ? ' (body no-reply)' : ''}`, async () => {
      const p = await startMilter({ mode: 'body', bodyMs: 10, gcEvery: 100, noreply: noreply ? ['body'] : undefined });
      await resetPeaks(p);
      const base = (await stats(p)).peak;
      const m = await inBody(p.spec, false);
      const chunk = frame('B', Buffer.alloc(65535, 0x62));
      let written = 0;
      const end = Date.now() + 2500;
      // The MTA writes as fast as the milter lets it, for 2.5 s or 95 MiB.
      while (Date.now() < end && written < 95 * MiB && !m.closed) {
        await m.write(chunk);
        written += chunk.length;
      }
      const s = await stats(p);
      const retained = s.peak.retained! - base.arrayBuffers;
      const ahead = written - s.counts.bodyBytes;
      console.log(
        `flood${noreply ? ' (no-reply)' : ''}: MTA wrote ${(written / MiB).toFixed(1)} MiB, handler saw ${(s.counts.bodyBytes / MiB).toFixed(1)} MiB; ` +
          `arrayBuffers held after GC at most +${(retained / MiB).toFixed(1)} MiB, peak with garbage +${((s.peak.arrayBuffers - base.arrayBuffers) / MiB).toFixed(1)} MiB, rss peak +${((s.peak.rss - base.rss) / MiB).toFixed(1)} MiB`,
      );
      expect(s.counts.bodyChunks).toBeGreaterThan(20);
      // What the MTA got ahead of the handler sits in socket buffers and the engine's bounded queue (1 MiB).
      expect(ahead).toBeLessThan(4 * MiB);
      expect(retained).toBeLessThan(4 * MiB);
      expect(s.peak.rss - base.rss).toBeLessThan(64 * MiB);
    });
  }
});

describe('writes wait for the MTA: a stalled reader costs a bounded amount for a bounded time', () => {
  it('a 64 MiB replacebody to an MTA that stops reading is held once, then dropped after writeTimeout', async () => {
    const p = await startMilter({ mode: 'replacebody', replaceBytes: 64 * MiB, serve: { writeTimeout: 1500 } });
    await resetPeaks(p);
    const base = (await stats(p)).now;
    const m = await inBody(p.spec, false);
    await m.until(() => (m.count.c ?? 0) >= 6, 5000, 'replies to the preamble');
    m.sock.pause(); // the MTA stops reading
    m.sock.write(frame('E'));
    const t0 = Date.now();
    let s = await stats(p);
    while (s.diag.writeStalls === 0 && Date.now() - t0 < 6000) {
      await sleep(100);
      s = await stats(p);
    }
    const took = Date.now() - t0;
    await sleep(200);
    s = await stats(p);
    console.log(`stalled replacebody: peak arrayBuffers +${((s.peak.arrayBuffers - base.arrayBuffers) / MiB).toFixed(1)} MiB, ended after ${took} ms, now +${((s.now.arrayBuffers - base.arrayBuffers) / MiB).toFixed(1)} MiB`);
    expect(s.diag.writeStalls).toBe(1);
    expect(took).toBeLessThan(1500 + 1500);
    // The handler's 64 MiB buffer, sent by reference: no second copy.
    expect(s.peak.arrayBuffers - base.arrayBuffers).toBeLessThan(64 * MiB + 8 * MiB);
    expect(s.now.arrayBuffers - base.arrayBuffers).toBeLessThan(4 * MiB);
    expect(s.open).toBe(0);
  });

  it('two sessions adding 300,000 headers each hold what goes on the wire, not a pool slab per frame', async () => {
    const n = 300_000;
    const p = await startMilter({ mode: 'addheader', headers: n, headerValue: 100, serve: { writeTimeout: 1500 } });
    await resetPeaks(p);
    const base = (await stats(p)).now;
    const both = await Promise.all([inBody(p.spec, false), inBody(p.spec, false)]);
    for (const m of both) await m.until(() => (m.count.c ?? 0) >= 6, 5000, 'replies to the preamble');
    for (const m of both) {
      m.sock.pause();
      m.sock.write(frame('E'));
    }
    let s = await stats(p);
    const t0 = Date.now();
    while (s.diag.writeStalls < 2 && Date.now() - t0 < 10_000) {
      await sleep(100);
      s = await stats(p);
    }
    // Per header: 5 bytes of head, "X-Pressure-N\0" and 100 bytes of value with its NUL.
    const wire = 2 * (n * (5 + 1 + 100 + 1) + [...Array(n).keys()].reduce((a, i) => a + `X-Pressure-${i}`.length, 0));
    // The sockets are gone a moment after the stall watch destroyed them; then their output is freed.
    for (let i = 0; i < 20 && s.open > 0; i++) {
      await sleep(100);
      s = await stats(p);
    }
    await sleep(100);
    s = await stats(p);
    const grew = s.peak.arrayBuffers - base.arrayBuffers;
    console.log(`300k addheader x2: ${(wire / MiB).toFixed(1)} MiB on the wire, arrayBuffers peak +${(grew / MiB).toFixed(1)} MiB, ${s.diag.writeStalls} ended by the stall watch`);
    expect(s.counts.eoms).toBe(2);
    expect(grew).toBeLessThan(wire * 1.25 + 8 * MiB);
    expect(s.diag.writeStalls).toBe(2);
    expect(s.now.arrayBuffers - base.arrayBuffers).toBeLessThan(4 * MiB);
  });
});
