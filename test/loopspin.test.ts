// The event-loop spin after a reply (src/loopspin.ts): the LoopSpin unit with
// its conditions (the spin time, one CPU, as many sessions as CPUs), and the
// TypeScript engine using it. The libmilter engine's JavaScript side is
// tested in native-core.test.ts beside its workers' spin. Whether a spin
// pays is measured in bench/ (docs/performance.md), not here.
import * as os from 'node:os';
import { afterEach, describe, expect, it } from 'vitest';

import * as C from '../src/constants';
import { serve, type MilterServer } from '../src/engine';
import { InvalidArgumentError } from '../src/errors';
import { LoopSpin, spinUsFromEnv } from '../src/loopspin';
import { MilterClient } from '../src/testing/client';
import type { MilterContext } from '../src/types';
import { tmpSocketSpec } from './helpers';

/** Set NODEMILTER_SPIN_US, or unset it for `undefined`. */
function setSpinEnv(v: string | undefined): void {
  if (v === undefined) delete process.env.NODEMILTER_SPIN_US;
  else process.env.NODEMILTER_SPIN_US = v;
}
const savedSpinEnv = process.env.NODEMILTER_SPIN_US;

/** Resolves after a timer of `ms` and one more turn of the loop (a spin's last pending turn ran by then). */
const after = (ms: number) => new Promise<void>((r) => setTimeout(() => setImmediate(r), ms));

describe('LoopSpin', () => {
  it('keeps the loop turning after a kick for at most the spin time, then stops; a kick while spinning extends the same spin', async () => {
    const spin = new LoopSpin(200, () => 1, 2);
    expect(spin.us).toBe(200);
    spin.kick();
    spin.kick();
    expect(spin.counters.spins).toBe(1);
    await after(10);
    const turns = spin.counters.turns;
    // 200 us of turns: at least one, and it ended long before the 10 ms timer.
    expect(turns).toBeGreaterThan(0);
    await after(10);
    expect(spin.counters.turns).toBe(turns);
    spin.kick();
    expect(spin.counters.spins).toBe(2);
  });

  it('does not spin with 0 us, on one CPU, or with as many sessions open as CPUs', async () => {
    let sessions = 2;
    const cases = [new LoopSpin(0, () => 1, 4), new LoopSpin(50, () => 0, 1), new LoopSpin(50, () => sessions, 2)];
    expect(cases.map((s) => s.us)).toEqual([0, 0, 50]);
    for (const s of cases) s.kick();
    await after(5);
    for (const s of cases) expect(s.counters).toEqual({ spins: 0, turns: 0 });
    // A spin stops as soon as the sessions reach the CPUs, however long it had left.
    sessions = 1;
    const long = new LoopSpin(1000, () => sessions, 2);
    long.kick();
    sessions = 2;
    await after(5);
    expect(long.counters.spins).toBe(1);
    expect(long.counters.turns).toBe(1);
  });

  it('reads NODEMILTER_SPIN_US: 50 when unset or empty, a whole number from 0 to 1000, else an InvalidArgumentError naming the value', () => {
    try {
      setSpinEnv(undefined);
      expect(spinUsFromEnv()).toBe(50);
      setSpinEnv('');
      expect(spinUsFromEnv()).toBe(50);
      for (const ok of ['0', '7', '1000']) {
        setSpinEnv(ok);
        expect(spinUsFromEnv()).toBe(Number(ok));
      }
      for (const bad of ['abc', '-1', '1001', '20us', '1.5']) {
        setSpinEnv(bad);
        expect(() => spinUsFromEnv()).toThrow(InvalidArgumentError);
        expect(() => spinUsFromEnv()).toThrow(`NODEMILTER_SPIN_US must be a whole number of microseconds from 0 to 1000, got '${bad}'`);
      }
    } finally {
      setSpinEnv(savedSpinEnv);
    }
  });
});

describe('the TypeScript engine spins its loop after replies', () => {
  const servers: MilterServer[] = [];
  afterEach(async () => {
    setSpinEnv(savedSpinEnv);
    await Promise.all(servers.splice(0).map((s) => s.close()));
  });

  async function run(env: string | undefined): Promise<ReturnType<MilterServer['getdiag']>> {
    setSpinEnv(env);
    const socket = tmpSocketSpec();
    const s = await serve(
      {
        name: 'spin',
        callbacks: {
          eom(ctx: MilterContext) {
            ctx.addheader('X-Spin', 'yes');
            return C.CONTINUE;
          },
        },
      },
      { socket },
    );
    servers.push(s);
    const c = await MilterClient.connect(socket);
    for (let i = 0; i < 5; i++) {
      const r = await c.sendMessage({ from: '<a@example.org>', rcpt: ['<b@example.net>'], headers: [['Subject', 'hi']], body: 'x\r\n' });
      expect(r.decision).toBe('continue');
      expect(r.actions).toContainEqual(expect.objectContaining({ type: 'addheader', name: 'X-Spin' }));
    }
    await c.close();
    return s.getdiag();
  }

  it('by default (50 us, one session on more than one CPU), and not with NODEMILTER_SPIN_US=0', async () => {
    const on = await run(undefined);
    if (os.availableParallelism() > 1) {
      expect(on.spinUs).toBe(50);
      // Negotiation and five eoms were answered with one session open: each reply kicked the spin.
      expect(on.loopSpins).toBeGreaterThan(0);
      expect(on.loopSpins).toBeLessThanOrEqual(6);
      expect(on.loopSpinTurns).toBeGreaterThanOrEqual(on.loopSpins);
    } else {
      expect(on.spinUs).toBe(0);
      expect(on.loopSpins).toBe(0);
    }
    const off = await run('0');
    expect(off.spinUs).toBe(0);
    expect(off.loopSpins).toBe(0);
    expect(off.loopSpinTurns).toBe(0);
  });

  it('refuses a bad NODEMILTER_SPIN_US when the server is built', async () => {
    setSpinEnv('fast');
    await expect(serve({ name: 'spin', callbacks: { eom: () => C.CONTINUE } }, { socket: tmpSocketSpec() })).rejects.toThrow(
      "NODEMILTER_SPIN_US must be a whole number of microseconds from 0 to 1000, got 'fast'",
    );
  });
});
