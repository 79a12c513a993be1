// Admission control on the TypeScript engine (issue 17): sessions over
// maxSessions get the documented answer while legitimate sessions flow,
// new sessions are shed while the event loop lags, and running out of file
// descriptors is survived and logged. Half-close is checked on both engines.
import * as path from 'node:path';
import { afterEach, describe, expect, it } from 'vitest';

import * as C from '../../src/constants';
import { serve, type MilterServer } from '../../src/engine';
import { MilterClient } from '../../src/testing/client';
import type { MilterContext } from '../../src/types';
import { ENGINES, startProcess, tmpSocketSpec, type RunningProcess } from '../helpers';
import { startMilter as startReliabilityMilter } from './lib';
import { RawMta, connectCmd, frame, optneg, preamble } from './rawmta';

const FIXTURE = path.join(__dirname, 'pressure-milter.cjs');
const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));
const servers: MilterServer[] = [];
const mtas: RawMta[] = [];
const procs: RunningProcess[] = [];

afterEach(async () => {
  for (const m of mtas.splice(0)) m.sock.destroy();
  await Promise.all(servers.splice(0).map((s) => s.close()));
  await Promise.all(procs.splice(0).map((p) => p.stop()));
});

async function mta(spec: string): Promise<RawMta> {
  const m = await RawMta.open(spec);
  mtas.push(m);
  return m;
}

/** A junk MTA connection: negotiates, then holds its session doing nothing. */
async function junk(spec: string): Promise<RawMta> {
  const m = await mta(spec);
  m.sock.write(optneg());
  await m.until(() => (m.count.O ?? 0) === 1 || m.closed, 5000, 'the negotiation reply');
  return m;
}

const MSG = { from: '<a@example.org>', rcpt: ['<b@example.net>'], headers: [['Subject', 'admission']] as [string, string][], body: 'hello\r\n' };

/** One legitimate session: its latency in ms and its decision (`continue`, `tempfail` ..., or the error). */
async function legit(spec: string): Promise<{ ms: number; status: string }> {
  const t0 = performance.now();
  let c: MilterClient | undefined;
  try {
    c = await MilterClient.connect(spec, { timeout: 5000 });
    const r = await c.sendMessage(MSG);
    return { ms: performance.now() - t0, status: r.decision };
  } catch (e) {
    return { ms: performance.now() - t0, status: `error: ${(e as Error).message}` };
  } finally {
    c?.destroy();
  }
}

function p99(xs: number[]): number {
  const s = [...xs].sort((a, b) => a - b);
  return s[Math.min(s.length - 1, Math.ceil(s.length * 0.99) - 1)];
}

describe('maxSessions', () => {
  it("answers sessions over the cap with TEMPFAIL at connect while legitimate sessions flow", async () => {
    const spec = tmpSocketSpec();
    // Each message takes its eom 100 ms, so sessions overlap.
    const eom = async (ctx: MilterContext) => {
      await sleep(100);
      ctx.addheader('X-Cap', 'ok');
      return C.CONTINUE;
    };
    const s = await serve({ name: 'cap', callbacks: { eom } }, { socket: spec, maxSessions: 30 });
    servers.push(s);
    // 24 junk sessions hold their slots; 3 MTA processes send mail one session after another. A worker's
    // previous connection can still be open on the server's side when its next one arrives, so the
    // workers can hold 6 connections for a moment: 24 + 6 stays under the cap of 30 outside the surge.
    await Promise.all(Array.from({ length: 24 }, () => junk(spec)));
    const phase: Record<'before' | 'surge' | 'after', { ms: number; status: string }[]> = { before: [], surge: [], after: [] };
    let now: keyof typeof phase = 'before';
    let stop = false;
    const workers = Array.from({ length: 3 }, async () => {
      while (!stop) {
        const at = now;
        const r = await legit(spec);
        phase[at === 'surge' || now === 'surge' ? 'surge' : at].push(r);
      }
    });
    await sleep(600);
    // A surge of 40 more sessions at once: 3 slots are free.
    now = 'surge';
    phase.surge.push(...(await Promise.all(Array.from({ length: 40 }, () => legit(spec)))));
    // The surge's clients have closed their ends; the 'after' phase begins once the server has seen them
    // close (24 junk and one connection per worker left), or a worker's next session could still be over
    // the cap by the server's count (a dry run of CI with 25 junk sessions saw one 'after' session
    // refused: 222 refused, 221 of them in the surge).
    const settle = Date.now() + 5000;
    while (s.connectionCount > 24 + 3 && Date.now() < settle) await sleep(5);
    expect(s.connectionCount).toBeLessThanOrEqual(24 + 3);
    now = 'after';
    await sleep(600);
    stop = true;
    await Promise.all(workers);
    const all = [...phase.before, ...phase.surge, ...phase.after];
    const delivered = all.filter((r) => r.status === 'continue');
    const refused = all.filter((r) => r.status === 'tempfail');
    const lat = delivered.map((r) => r.ms);
    console.log(
      `maxSessions 30 with 24 held: ${phase.before.length} sessions before the surge, ${phase.surge.length} during it ` +
        `(${phase.surge.filter((r) => r.status === 'tempfail').length} refused with TEMPFAIL), ${phase.after.length} after; ` +
        `delivered ${delivered.length}, p99 ${p99(lat).toFixed(1)} ms; sessionsRefused ${s.getdiag().sessionsRefused}`,
    );
    // Every session was served or told to come back: none hung, none was dropped unanswered.
    for (const r of all) expect(['continue', 'tempfail']).toContain(r.status);
    expect(phase.before.length).toBeGreaterThanOrEqual(6);
    expect(phase.before.every((r) => r.status === 'continue')).toBe(true);
    expect(phase.after.length).toBeGreaterThanOrEqual(6);
    expect(phase.after.every((r) => r.status === 'continue')).toBe(true);
    expect(phase.surge.filter((r) => r.status === 'tempfail').length).toBeGreaterThanOrEqual(30);
    expect(refused.length).toBe(s.getdiag().sessionsRefused);
    expect(p99(lat)).toBeLessThan(1000);
  });

  it('says why: 421 4.3.2 Mail filter busy at connect, then the connection closes', async () => {
    const spec = tmpSocketSpec();
    const s = await serve({ name: 'cap', callbacks: { connect: () => C.CONTINUE } }, { socket: spec, maxSessions: 1 });
    servers.push(s);
    await junk(spec);
    const m = await mta(spec);
    m.sock.write(Buffer.concat([optneg(), connectCmd()]));
    await m.until(() => m.closed, 2000, 'the refused connection to close');
    expect(m.frames.map((f) => [f.cmd, f.cmd === 'y' ? f.data.toString('latin1') : ''])).toEqual([['O', ''], ['y', '421 4.3.2 Mail filter busy, try again later\0']]);
    expect(s.getdiag().sessionsRefused).toBe(1);
    expect(s.getdiag().created).toBe(0);
  });

  it("closes a connection over the cap at once with sessionCapAction 'close'", async () => {
    const spec = tmpSocketSpec();
    const s = await serve({ name: 'cap', callbacks: {} }, { socket: spec, maxSessions: 2, sessionCapAction: 'close' });
    servers.push(s);
    await junk(spec);
    await junk(spec);
    const third = await mta(spec);
    third.sock.write(optneg());
    await third.until(() => third.closed, 2000, 'the third connection to be closed');
    expect(third.frames).toEqual([]);
    expect(s.getdiag().sessionsRefused).toBe(1);
    expect((await legit(spec)).status).toMatch(/^error/);
  });

  it('rejects a bad maxSessions or sessionCapAction with a typed error naming it', async () => {
    await expect(serve({ name: 'x', callbacks: {} }, { socket: tmpSocketSpec(), maxSessions: 0 })).rejects.toThrow(/maxSessions must be a positive integer/);
    await expect(serve({ name: 'x', callbacks: {} }, { socket: tmpSocketSpec(), sessionCapAction: 'drop' as 'close' })).rejects.toThrow(/sessionCapAction must be 'tempfail' or 'close', got "drop"/);
    await expect(serve({ name: 'x', callbacks: {} }, { socket: tmpSocketSpec(), frameTimeout: -1 })).rejects.toThrow(/frameTimeout must be a number of milliseconds/);
  });
});

describe('event-loop lag', () => {
  it('sheds new sessions while the loop lags past maxEventLoopLag, and serves again after', async () => {
    const spec = tmpSocketSpec();
    const s = await serve({ name: 'lag', callbacks: {} }, { socket: spec, maxEventLoopLag: 100 });
    servers.push(s);
    expect((await legit(spec)).status).toBe('continue');
    const until = Date.now() + 300;
    while (Date.now() < until) {
      /* the event loop is blocked on purpose */
    }
    const shed = await legit(spec);
    expect(shed.status).toBe('tempfail');
    expect(s.getdiag().sessionsShed).toBe(1);
    await sleep(200);
    expect((await legit(spec)).status).toBe('continue');
  });
});

describe('file descriptors', () => {
  async function start(cfg: Record<string, unknown>, fdLimit: number): Promise<RunningProcess & { spec: string }> {
    const spec = tmpSocketSpec();
    const env = { PRESSURE_CONFIG: JSON.stringify({ ...cfg, socket: spec }) };
    const p = await startProcess('/bin/sh', { args: ['-c', `ulimit -n ${fdLimit} && exec "$@"`, 'sh', process.execPath, FIXTURE], env, socket: spec, stopSignal: 'SIGKILL' });
    procs.push(p);
    return Object.assign(p, { spec });
  }
  const logs = (p: RunningProcess) => p.stdout.split('\n').filter((l) => l.startsWith('{"ev":"log"')).map((l) => JSON.parse(l).m as string);

  it('survives running out of descriptors (EMFILE), says so in the log, and serves again once they free', async () => {
    // No cap to speak of: the junk connections take every descriptor.
    const p = await start({ serve: { maxSessions: 10_000, negotiationTimeout: 2500 } }, 128);
    const held = await Promise.all(Array.from({ length: 160 }, () => mta(p.spec).catch(() => undefined)));
    const t0 = Date.now();
    while (!logs(p).some((l) => l.includes('out of file descriptors')) && Date.now() - t0 < 5000) await sleep(50);
    const during = await legit(p.spec);
    // The negotiation timeout frees the junk's descriptors; the milter serves again.
    let after = await legit(p.spec);
    for (let i = 0; i < 40 && after.status !== 'continue'; i++) {
      await sleep(100);
      after = await legit(p.spec);
    }
    console.log(`EMFILE: ${held.filter(Boolean).length} junk connections; during: ${during.status}; after: ${after.status}; log: ${JSON.stringify(logs(p))}`);
    expect(logs(p).some((l) => /out of file descriptors \(.*\): new MTA connections are lost until some close/.test(l))).toBe(true);
    expect(after.status).toBe('continue');
    expect(p.hasExited).toBe(false);
  });

  it('with the default maxSessions under a small limit, refuses the junk instead of running out', async () => {
    const p = await start({ serve: { negotiationTimeout: 2500 } }, 128);
    await Promise.all(Array.from({ length: 160 }, () => mta(p.spec).catch(() => undefined)));
    await sleep(1500);
    const during = await legit(p.spec);
    let after = await legit(p.spec);
    for (let i = 0; i < 40 && after.status !== 'continue'; i++) {
      await sleep(100);
      after = await legit(p.spec);
    }
    console.log(`default cap at ulimit -n 128: during the junk: ${during.status}; after: ${after.status}; log: ${JSON.stringify(logs(p))}`);
    expect(logs(p).filter((l) => l.includes('out of file descriptors'))).toEqual([]);
    expect(during.status).toMatch(/^(tempfail|error)/);
    expect(after.status).toBe('continue');
  });
});

describe('half-close after eom', () => {
  for (const engine of ENGINES) {
    it(`${engine}: the MTA that shuts down its side after EOM still gets the eom's actions and reply`, async () => {
      const p = await startReliabilityMilter({ engine, eomSleep: 20, quiet: true });
      procs.push(p);
      let answered = 0;
      for (let i = 0; i < 20; i++) {
        const m = await mta(p.spec);
        m.sock.write(optneg());
        await m.until(() => (m.count.O ?? 0) === 1, 5000, 'the negotiation reply');
        m.sock.write(Buffer.concat([preamble(), frame('E')]));
        m.sock.end();
        await m.until(() => m.closed || (m.count.c ?? 0) >= 7, 5000, 'the eom reply');
        if (m.frames.some((f) => f.cmd === 'h' && f.data.toString('latin1').startsWith('X-Reliability'))) answered++;
        m.sock.destroy();
      }
      expect(answered).toBe(20);
    });
  }
});
