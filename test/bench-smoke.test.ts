// Smoke test of the benchmark tools (correctness only, nothing here depends
// on timing): the C load generator, with both of its clients, drives
// messages through the C and the nodemilter milters, and every message comes
// back with its added header; the replies the negotiated steps need are
// counted exactly; the publish check and the native floor are computed
// right; the runner records the machine's state and writes the table.
import { afterAll, describe, expect, it } from 'vitest';
import { execFile } from 'node:child_process';
import * as fs from 'node:fs';
import { createRequire } from 'node:module';
import * as os from 'node:os';
import * as path from 'node:path';

type Verdict = { ok: boolean; reasons: string[] };
type Mark = { t: number; sys: { busy: number; steal: number }; bench: number; procs: Map<number, { comm: string; ticks: number; start: number }> };
const bench = createRequire(__filename)('../bench/lib.cjs') as {
  startMilter(impl: string, shape: string, socket: string): Promise<{ stop(): Promise<void>; socket: string; alive(): boolean }>;
  runLoadgen(socket: string, o: Record<string, unknown>): Promise<Record<string, any>>;
  socketFor(name: string): string;
  killAll(): void;
  PUBLISH_LIMITS: { otherPct: number; otherCellPct: number; canaryPct: number };
  publishVerdict(state: Record<string, any>, limits?: Record<string, number>): Verdict;
  publishTable(file: string, block: string, verdict: Verdict): { written: boolean; message: string };
  nativeFloor(cRate: number, replied: number, handoffUs: number): number;
  cpuBetween(a: Mark, b: Mark): { wallS: number; otherS: number; otherCorePct: number; stealS: number; top: { comm: string; s: number }[] };
  cpuMark(): Mark;
  clkTck(): number;
};

afterAll(() => bench.killAll());

const ROOT = path.join(__dirname, '..');

function runNode(args: string[], timeout: number) {
  return new Promise<{ code: number; stdout: string; stderr: string }>((resolve) =>
    execFile(process.execPath, args, { timeout }, (err, stdout, stderr) =>
      resolve({ code: err ? Number((err as { code?: number }).code ?? 1) : 0, stdout, stderr }),
    ),
  );
}

describe('bench load generator', () => {
  for (const client of ['epoll', 'threads']) {
    for (const impl of ['c', 'node', 'ts']) {
      it(`${client} client: sends 200 messages through the ${impl} S3 milter, each gets its header`, async () => {
        const m = await bench.startMilter(impl, 's3', bench.socketFor(`smoke-${impl}-${client}-${process.pid}`));
        try {
          const r = await bench.runLoadgen(m.socket, { conc: 4, perConn: 25, messages: 200, timeout: 20, client });
          expect(r.first_error).toBe('');
          expect(r.errors).toBe(0);
          expect(r.bad).toBe(0);
          expect(r.messages).toBe(200);
          expect(r.headers).toBe(200);
          expect(r.connections).toBeGreaterThanOrEqual(8); // 25 per connection; the last ones may be split
          expect(r.client).toBe(client);
          expect(r.replied_msg).toBe(1); // EOM only
          expect(r.replied_conn).toBe(0);
          expect(r.exitCode).toBe(0);
          expect(m.alive()).toBe(true);
        } finally {
          await m.stop();
        }
      });
    }
  }

  // S1 answers every step: MAIL, RCPT, DATA, 10 headers, EOH, one body chunk and EOM per message, CONNECT and HELO per connection.
  // S2 answers EOM only. Both clients count the same, for C and for node.
  for (const [shape, msg, conn] of [['s1', 16, 2], ['s2', 1, 0]] as const) {
    for (const impl of ['c', 'node']) {
      it(`counts ${msg} replied steps per message and ${conn} per connection for the ${impl} ${shape.toUpperCase()} milter, with either client`, async () => {
        const m = await bench.startMilter(impl, shape, bench.socketFor(`smoke-${impl}-${shape}-${process.pid}`));
        try {
          for (const client of ['epoll', 'threads']) {
            const r = await bench.runLoadgen(m.socket, { conc: 2, perConn: 10, messages: 40, timeout: 20, client });
            expect(r.first_error).toBe('');
            expect(r.messages).toBe(40);
            expect(r.headers).toBe(40);
            expect([r.client, r.replied_msg, r.replied_conn]).toEqual([client, msg, conn]);
          }
        } finally {
          await m.stop();
        }
      });
    }
  }

  it('refuses an unknown client and the barrier with the threads client', async () => {
    await expect(bench.runLoadgen('unix:/nonexistent', { messages: 1, client: 'forks' })).rejects.toThrow(/unknown client forks: expected epoll or threads/);
    await expect(bench.runLoadgen('unix:/nonexistent', { messages: 1, client: 'threads', barrier: true })).rejects.toThrow(/-B \(barrier\) works with the epoll client only/);
  });
});

describe('bench publish check', () => {
  const quiet = {
    canary: { start: 18000, end: 17500 },
    other: { otherCorePct: 1.2, otherS: 4.1, wallS: 340, top: [] },
    cellMax: { otherCorePct: 12, cell: 'c s2 c1 100/conn epoll (round 1)' },
    errors: 0,
  };

  it('publishes a quiet run whose canary held', () => {
    expect(bench.publishVerdict(quiet)).toEqual({ ok: true, reasons: [] });
    expect(bench.PUBLISH_LIMITS).toEqual({ otherPct: 5, otherCellPct: 30, canaryPct: 10 });
  });

  it('refuses when the canary moved by more than 10 %, either way', () => {
    for (const end of [16100, 19900]) {
      const v = bench.publishVerdict({ ...quiet, canary: { start: 18000, end } });
      expect(v.ok).toBe(false);
      expect(v.reasons).toHaveLength(1);
      expect(v.reasons[0]).toMatch(/^the canary moved by [-+]?\d+\.\d % \(18000 msg\/s at the start, \d+ at the end; limit 10 %\)$/);
    }
    expect(bench.publishVerdict({ ...quiet, canary: { start: 18000, end: 16300 } }).ok).toBe(true); // -9.4 %
    expect(bench.publishVerdict({ ...quiet, canary: { start: 18000, end: 0 } }).reasons[0]).toMatch(/the canary did not run/);
  });

  it('refuses a busy machine, over the run or in one cell, and names what ran', () => {
    const busyRun = bench.publishVerdict({ ...quiet, other: { otherCorePct: 42.5, otherS: 144, wallS: 340, top: [{ comm: 'vitest', s: 120 }] } });
    expect(busyRun.ok).toBe(false);
    expect(busyRun.reasons).toEqual([
      'the machine was busy: other processes used 42.5 % of one core over the run (144 CPU s in 340 s; limit 5 %) (most: vitest 120 s)',
    ]);
    const busyCell = bench.publishVerdict({ ...quiet, cellMax: { otherCorePct: 31, cell: 'node s1 c8 100/conn threads (round 2)' } });
    expect(busyCell.reasons).toEqual(['the machine was busy: other processes used 31 % of one core during node s1 c8 100/conn threads (round 2) (limit 30 % in any cell)']);
    expect(bench.publishVerdict({ ...quiet, errors: 2 }).reasons).toEqual(['2 runs had errors']);
    expect(bench.publishVerdict(quiet, { otherPct: 1, otherCellPct: 30, canaryPct: 10 }).ok).toBe(false);
  });

  it('writes the table only when allowed, and says why not', () => {
    const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'bench-doc-'));
    try {
      const file = path.join(dir, 'perf.md');
      const doc = 'before\n<!-- bench:table:begin -->\nold table\n<!-- bench:table:end -->\nafter\n';
      fs.writeFileSync(file, doc);
      const refused = bench.publishTable(file, 'new table\n', { ok: false, reasons: ['the canary moved by -60.9 %', 'the machine was busy'] });
      expect(refused.written).toBe(false);
      expect(refused.message).toBe(`bench: --doc refused, ${file} left as it was:\n  - the canary moved by -60.9 %\n  - the machine was busy\nRun it again on a quiet machine.`);
      expect(fs.readFileSync(file, 'utf8')).toBe(doc);
      expect(bench.publishTable(file, 'new table\n', { ok: true, reasons: [] }).written).toBe(true);
      expect(fs.readFileSync(file, 'utf8')).toBe('before\n<!-- bench:table:begin -->\nnew table\n<!-- bench:table:end -->\nafter\n');
      fs.writeFileSync(file, 'no markers\n');
      expect(() => bench.publishTable(file, 'x', { ok: true, reasons: [] })).toThrow(/lacks the <!-- bench:table:begin --> \.\.\. <!-- bench:table:end --> markers/);
    } finally {
      fs.rmSync(dir, { recursive: true, force: true });
    }
  });

  it("counts other processes' CPU from the machine's busy time minus the benchmark's own", () => {
    const hz = bench.clkTck();
    const procs = (entries: [number, string, number, number][]) => new Map(entries.map(([pid, comm, ticks, start]) => [pid, { comm, ticks, start }]));
    const a: Mark = { t: 0, sys: { busy: 1000, steal: 5 }, bench: 300, procs: procs([[10, 'fuzz', 50, 1], [11, 'cc1', 20, 2]]) };
    // 2 s later: the machine was busy 3 s, the benchmark used 2.5 s; fuzz +0.3 s, cc1 replaced by a new process (pid reused), a new vitest
    const b: Mark = {
      t: 2000,
      sys: { busy: 1000 + 3 * hz, steal: 5 + hz / 10 },
      bench: 300 + 2.5 * hz,
      procs: procs([[10, 'fuzz', 50 + 0.3 * hz, 1], [11, 'cc1', 0.1 * hz, 99], [12, 'vitest', 0.2 * hz, 100]]),
    };
    const d = bench.cpuBetween(a, b);
    expect(d).toEqual({ wallS: 2, otherS: 0.5, otherCorePct: 25, stealS: 0.1, top: [{ comm: 'fuzz', s: 0.3 }, { comm: 'vitest', s: 0.2 }, { comm: 'cc1', s: 0.1 }] });
    // a real mark leaves out this process: its own work is not "other"
    const m = bench.cpuMark();
    expect(m.procs.has(process.pid)).toBe(false);
    expect(m.bench).toBeGreaterThan(0);
  });

  it("computes the native floor: C's time per message plus one hand-off per replied step", () => {
    // the figures: C 18,595 msg/s on S2 and 53,376 on S3 at concurrency 1, 12 us per hand-off, EOM the only replied step
    expect(bench.nativeFloor(18595, 1, 12) / 18595).toBeCloseTo(0.818, 3);
    expect(bench.nativeFloor(53376, 1, 12) / 53376).toBeCloseTo(0.61, 2);
    expect(bench.nativeFloor(1000, 0, 12)).toBe(1000);
    expect(bench.nativeFloor(1000, 100, 10)).toBeCloseTo(500, 6); // 1 ms + 100 x 10 us
  });
});

describe('bench runner', () => {
  it('records the machine state, runs both clients, puts ratios and the floor first, and writes the table with --doc', async () => {
    const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'bench-run-'));
    try {
      const doc = path.join(dir, 'perf.md');
      const json = path.join(dir, 'run.json');
      fs.writeFileSync(doc, '# x\n<!-- bench:table:begin -->\nold\n<!-- bench:table:end -->\n');
      // limits this loose pass on any machine: this checks the plumbing, not the machine
      const { code, stdout, stderr } = await runNode(
        [path.join(ROOT, 'bench/run.cjs'), '--rounds', '1', '--seconds', '0.3', '--warmup', '0.1', '--shapes', 's3', '--conc', '1', '--modes', 'many', '--impls', 'c,node',
          '--canary-seconds', '0.3', '--handoff', '500', '--json', json, '--doc', '--doc-file', doc, '--max-other', '1000000', '--max-other-cell', '1000000',
          '--max-canary', '1000000'],
        120_000,
      );
      expect(code, stderr).toBe(0);
      expect(stderr).toMatch(/^plan: 4 runs of 0\.3 s \(\+0\.1 s warm-up\), 2 milter starts: about [\d.]+ min$/m);
      expect(stderr).toContain(`updated ${doc}`);
      const out = JSON.parse(fs.readFileSync(json, 'utf8'));
      expect(out.verdict).toEqual({ ok: true, reasons: [] });
      const s = out.state;
      for (const la of [...s.loadBefore, ...s.loadAfter]) expect(la).toBeGreaterThanOrEqual(0);
      expect(s.loadBefore).toHaveLength(3);
      expect(s.other.wallS).toBeGreaterThan(0);
      expect(s.other.otherCorePct).toBeGreaterThanOrEqual(0);
      expect(s.canary).toMatchObject({ shape: 's2', conc: 1, perConn: 100, client: 'epoll', runs: 3, seconds: 0.3 });
      expect(s.canary.startRates).toHaveLength(3);
      expect(s.canary.endRates).toHaveLength(3);
      expect(s.canary.start).toBeGreaterThan(0);
      expect(s.canary.end).toBeGreaterThan(0);
      expect(s.handoff.us).toBeGreaterThan(0);
      expect(s.handoff.start.roundTrips).toBe(500);
      expect(out.machine.cpu).toBeTruthy();
      expect(out.results.map((r: any) => `${r.impl} ${r.client}`).sort()).toEqual(['c epoll', 'c threads', 'node epoll', 'node threads']);
      for (const r of out.results) {
        expect([r.errors, r.bad, r.replied_msg, r.replied_conn]).toEqual([0, 0, 1, 0]);
        expect(r.other.otherCorePct).toBeGreaterThanOrEqual(0);
      }
      for (const text of [stdout, fs.readFileSync(doc, 'utf8')]) {
        expect(text).toMatch(/^State: load average \(1\/5\/15 min\) [\d.]+ \/ [\d.]+ \/ [\d.]+ before, .* Canary \(C on libmilter, S2, concurrency 1, 100\/conn, epoll client, median of 3 x 0.3 s\): \d+ msg\/s at the start, \d+ at the end .* Hand-off round trip [\d.]+ us/m);
        expect(text).toMatch(/^Publishable: yes\.$/m);
        expect(text).toMatch(/^Ranking \(implementations by median msg\/s\): the two clients agree in [01] of 1 cells(\.|; they differ in S3 c1 100\/conn \(epoll .+; threads .+\)\.)$/m);
        const head = text.split('\n').find((l) => l.startsWith('| shape |'))!;
        expect(head.split('|').map((c) => c.trim()).slice(1, 8)).toEqual(['shape', 'conc', 'msgs/conn', 'client', 'node/C', 'node/floor', 'floor/C']);
        const rows = text.split('\n').filter((l) => /^\| S3 \|/.test(l));
        expect(rows.map((r) => r.split('|')[4].trim())).toEqual(['epoll', 'threads']);
        for (const r of rows) {
          const [nodeC, nodeFloor, floorC] = r.split('|').slice(5, 8).map((x) => Number(x.trim()));
          for (const x of [nodeC, nodeFloor, floorC]) expect(x).toBeGreaterThan(0);
          expect(floorC).toBeLessThan(1); // a hand-off costs something
        }
      }
    } finally {
      fs.rmSync(dir, { recursive: true, force: true });
    }
  }, 150_000);
});

describe('bench:ceiling', () => {
  it('runs C, ceiling.c, bare.cjs and the TypeScript engine without an error, one row per concurrency, then the hand-off costs', async () => {
    const script = path.join(ROOT, 'bench', 'ceiling', 'run.cjs');
    const { code, stdout, stderr } = await runNode([script, '--rounds', '1', '--seconds', '0.3', '--conc', '1,4', '--handoff', '500'], 60_000);
    expect(stderr).toBe('');
    expect(code).toBe(0);
    const rows = stdout.split('\n').filter((l) => /^\| \d+ \|/.test(l));
    expect(rows.map((r) => r.split('|')[1].trim())).toEqual(['1', '4']);
    for (const r of rows) {
      const rates = r.split('|').slice(2, 6).map((x) => Number(x.trim()));
      for (const rate of rates) expect(rate).toBeGreaterThan(0);
    }
    const handoff = /condition variable ([\d.]+) us, eventfd \+ epoll ([\d.]+) us, unix socket pair ([\d.]+) us; the libmilter engine's per replied step \(mean of the first two\) ([\d.]+) us/.exec(stdout);
    expect(handoff, stdout).not.toBeNull();
    for (const us of handoff!.slice(1)) expect(Number(us)).toBeGreaterThan(0);
    expect(Number(handoff![4])).toBeCloseTo((Number(handoff![1]) + Number(handoff![2])) / 2, 1);
  }, 90_000);
});
