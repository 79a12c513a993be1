// Smoke test of the benchmark tools (correctness only, nothing here depends
// on timing): the C load generator, with both of its clients, drives
// messages through the C and the nodemilter milters, and every message comes
// back with its added header; the replies the negotiated steps need are
// counted exactly; the publish check and the native floor are computed
// right; the runner records the machine's state and writes the table.
import { afterAll, describe, expect, it } from 'vitest';
import { execFile, spawn } from 'node:child_process';
import * as fs from 'node:fs';
import { createRequire } from 'node:module';
import * as os from 'node:os';
import * as path from 'node:path';

type Verdict = { ok: boolean; reasons: string[] };
type Mark = {
  t: number;
  sys: { busy: number; steal: number };
  bench: number;
  kernel?: Map<number, { ticks: number; start: number }>;
  procs: Map<number, { comm: string; ticks: number; start: number }>;
};
const bench = createRequire(__filename)('../bench/lib.cjs') as {
  startMilter(impl: string, shape: string, socket: string): Promise<{ stop(): Promise<void>; socket: string; alive(): boolean }>;
  runLoadgen(socket: string, o: Record<string, unknown>): Promise<Record<string, any>>;
  socketFor(name: string): string;
  loadgenPath(): string;
  killAll(): void;
  PUBLISH_LIMITS: { otherPct: number; otherCellPct: number; canaryPct: number };
  publishVerdict(state: Record<string, any>, limits?: Record<string, number>): Verdict;
  betweenReason(start: number, entry: { afterRound: number; rate: number; rates: number[] }, runs: number, limits?: Record<string, number>): string | null;
  publishTable(file: string, block: string, verdict: Verdict): { written: boolean; message: string };
  nativeFloor(cRate: number, replied: number, handoffUs: number): number;
  cpuBetween(a: Mark, b: Mark): { wallS: number; otherS: number; otherCorePct: number; stealS: number; kernelS: number; top: { comm: string; s: number }[] };
  cpuMark(): Mark;
  clkTck(): number;
  readOptions(argv: string[], spec: Record<string, [string, string] | [string, string, string[]]>, script: string): Record<string, unknown>;
  OptionError: new (message: string) => Error;
  errorText(err: unknown): string;
};

afterAll(() => bench.killAll());

const ROOT = path.join(__dirname, '..');

/** A scratch directory for one run of the runner: a doc with the table's markers (its text in `before`) and where --json goes. */
function scratchRun(prefix: string) {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), prefix));
  const doc = path.join(dir, 'perf.md');
  const json = path.join(dir, 'run.json');
  const before = '# x\n<!-- bench:table:begin -->\nold\n<!-- bench:table:end -->\n';
  fs.writeFileSync(doc, before);
  return { dir, doc, json, before };
}

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

  // Postfix's smtpd polls before each read and write of a milter connection
  // (timed_read, timed_write); a thread asleep in read() itself would be woken
  // by every read of the milter's (which frees space in the client's socket).
  it('threads client: polls for POLLIN before every read and for POLLOUT before every write, as Postfix does', async () => {
    const m = await bench.startMilter('c', 's1', bench.socketFor(`smoke-poll-${process.pid}`));
    const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'nm-lg-strace-'));
    try {
      const trace = path.join(dir, 'trace.txt');
      const args = ['-f', '-o', trace, '-e', 'trace=poll,read,write', bench.loadgenPath(), '-s', m.socket, '-c', '2', '-m', '3', '-n', '6', '-T', '-t', '20'];
      const r = await new Promise<{ code: number | null; stdout: string }>((resolve) =>
        execFile('strace', args, { timeout: 30_000 }, (err, stdout) => resolve({ code: err ? Number((err as { code?: number }).code ?? 1) : 0, stdout })),
      );
      expect(r.code).toBe(0);
      const result = JSON.parse(r.stdout.trim().split('\n').pop()!);
      expect([result.messages, result.errors, result.headers]).toEqual([6, 0, 6]);
      // Per thread, the system call before each read or write of a socket is a poll of that socket for that event.
      const last = new Map<string, string>();
      const seen = { read: 0, write: 0 };
      const pollers = new Set<string>();
      const lines = fs.readFileSync(trace, 'utf8').split('\n').filter(Boolean);
      for (const line of lines) {
        const mm = /^(\d+)\s+(poll|read|write)\((?:\[\{fd=)?(\d+)(?:, events=(\w+))?/.exec(line);
        if (!mm) continue;
        const [, pid, call, fd, events] = mm;
        if (call === 'poll') pollers.add(pid);
        else if (pollers.has(pid)) {
          // a client thread (the main thread polls nothing: its reads and writes are its own files and the result line)
          expect(`${pid} ${last.get(pid)}`).toBe(`${pid} poll ${fd} ${call === 'read' ? 'POLLIN' : 'POLLOUT'}`);
          seen[call as 'read' | 'write']++;
        }
        last.set(pid, call === 'poll' ? `poll ${fd} ${events}` : `${call} ${fd}`);
      }
      expect(pollers.size).toBe(2); // one per client thread
      // 2 connections x (OPTNEG, CONNECT, HELO) + 6 messages x 14 replied steps at least: one write and one read each
      expect(seen.write).toBeGreaterThanOrEqual(6 + 6 * 14);
      expect(seen.read).toBeGreaterThanOrEqual(6 + 6 * 14);
    } finally {
      fs.rmSync(dir, { recursive: true, force: true });
      await m.stop();
    }
  }, 60_000);

  it('threads client: a milter that never answers is reported as no progress after -t seconds', async () => {
    const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'nm-lg-silent-'));
    const sock = path.join(dir, 'silent.sock');
    const net = await import('node:net');
    const held: import('node:net').Socket[] = [];
    const server = net.createServer((c) => {
      held.push(c);
      c.on('data', () => {}); // reads everything, answers nothing
    });
    await new Promise<void>((resolve) => server.listen(sock, resolve));
    try {
      const t0 = Date.now();
      const r = await bench.runLoadgen(`unix:${sock}`, { conc: 1, perConn: 1, messages: 1, timeout: 0.5, client: 'threads' });
      const elapsed = Date.now() - t0;
      expect(r.first_error).toBe('no progress: timed out');
      expect(r.errors).toBeGreaterThanOrEqual(1);
      expect(r.messages).toBe(0);
      expect(elapsed).toBeLessThan(10_000); // 0.5 s of poll, not the 30 s default nor a hang
    } finally {
      for (const c of held) c.destroy();
      await new Promise<void>((resolve) => server.close(() => resolve()));
      fs.rmSync(dir, { recursive: true, force: true });
    }
  }, 30_000);

  it('refuses an unknown client and the barrier with the threads client', async () => {
    await expect(bench.runLoadgen('unix:/nonexistent', { messages: 1, client: 'forks' })).rejects.toThrow(/unknown client forks: expected epoll or threads/);
    await expect(bench.runLoadgen('unix:/nonexistent', { messages: 1, client: 'threads', barrier: true })).rejects.toThrow(/-B \(barrier\) works with the epoll client only/);
  });
});

describe('bench publish check', () => {
  const quiet = {
    canary: { start: 18000, end: 17500 },
    other: { otherCorePct: 1.2, otherS: 4.1, wallS: 340, top: [] },
    cellMax: { otherCorePct: 9, cell: 'c s2 c1 100/conn epoll (round 1)' },
    errors: 0,
  };

  it('publishes a quiet run whose canary held', () => {
    expect(bench.publishVerdict(quiet)).toEqual({ ok: true, reasons: [] });
    expect(bench.PUBLISH_LIMITS).toEqual({ otherPct: 5, otherCellPct: 10, canaryPct: 10 });
  });

  it('refuses when the canary had fewer undisturbed runs than asked, at either end', () => {
    const canary = { start: 18000, end: 17900, runs: 11, startRates: Array(11).fill(18000), endRates: Array(11).fill(17900) };
    expect(bench.publishVerdict({ ...quiet, canary }).ok).toBe(true);
    const v = bench.publishVerdict({ ...quiet, canary: { ...canary, endRates: Array(10).fill(17900) } });
    expect(v.reasons).toEqual(['the canary was disturbed: 11 of 11 runs at the start and 10 of 11 at the end had other processes and steal at or under 10 % of a core']);
    // every run at the start dropped: the median is 0, and the reason is the disturbance, not "did not run"
    const none = bench.publishVerdict({ ...quiet, canary: { ...canary, start: 0, startRates: [] } });
    expect(none.reasons).toEqual(['the canary was disturbed: 0 of 11 runs at the start and 11 of 11 at the end had other processes and steal at or under 10 % of a core']);
  });

  it('refuses when the canary between two rounds moved by more than 10 % from the start or was disturbed, even when the end came back', () => {
    const at = (afterRound: number, rate: number, n = 11) => ({ afterRound, rate, rates: Array(n).fill(rate), dropped: [] });
    const canary = { start: 18000, end: 17800, runs: 11, startRates: Array(11).fill(18000), endRates: Array(11).fill(17800), betweenRuns: 11 };
    expect(bench.publishVerdict({ ...quiet, canary: { ...canary, between: [at(1, 16300), at(2, 19700)] } })).toEqual({ ok: true, reasons: [] }); // -9.4 %, +9.4 %
    // the host slowed down by a fifth in the middle of the run and came back: start and end agree, the rounds between do not
    const v = bench.publishVerdict({ ...quiet, canary: { ...canary, between: [at(1, 17900), at(2, 14200), at(3, 21000), at(4, 17400)] } });
    expect(v.reasons).toEqual([
      'the canary moved by -21.1 % between rounds 2 and 3 (18000 msg/s at the start, 14200 then; limit 10 %)',
      'the canary moved by 16.7 % between rounds 3 and 4 (18000 msg/s at the start, 21000 then; limit 10 %)',
    ]);
    const disturbed = bench.publishVerdict({ ...quiet, canary: { ...canary, between: [at(1, 18000, 9)] } });
    expect(disturbed.reasons).toEqual(['the canary was disturbed between rounds 1 and 2: 9 of 11 runs had other processes and steal at or under 10 % of a core']);
    // the runner asks the same question after each round
    expect(bench.betweenReason(18000, at(1, 16000), 11)).toBe('the canary moved by -11.1 % between rounds 1 and 2 (18000 msg/s at the start, 16000 then; limit 10 %)');
    expect(bench.betweenReason(18000, at(1, 16000), 11, { ...bench.PUBLISH_LIMITS, canaryPct: 12 })).toBeNull();
    // no canary at the start: the start's reason says so, and the rounds between add none of their own
    expect(bench.betweenReason(0, at(1, 16000), 11)).toBeNull();
    // a run saved before the canary ran between rounds is judged by its ends alone
    expect(bench.publishVerdict({ ...quiet, canary }).ok).toBe(true);
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
    const busyRun = bench.publishVerdict({ ...quiet, other: { otherCorePct: 42.5, otherS: 144, wallS: 340, stealS: 0, top: [{ comm: 'vitest', s: 120 }] } });
    expect(busyRun.ok).toBe(false);
    expect(busyRun.reasons).toEqual([
      'the machine was busy: other processes and steal used 42.5 % of one core over the run (144 CPU s in 340 s; limit 5 %) (most: vitest 120 s)',
    ]);
    // steal with no other process to name: the sentence says how much of it was steal
    const stolen = bench.publishVerdict({ ...quiet, other: { otherCorePct: 7.1, otherS: 24.1, wallS: 340, stealS: 24.1, top: [] } });
    expect(stolen.reasons).toEqual(['the machine was busy: other processes and steal used 7.1 % of one core over the run (24.1 CPU s in 340 s, of which steal 24.1 s; limit 5 %)']);
    const busyCell = bench.publishVerdict({ ...quiet, cellMax: { otherCorePct: 31, cell: 'node s1 c8 100/conn threads (round 2)' } });
    expect(busyCell.reasons).toEqual(['the machine was busy: other processes and steal used 31 % of one core during node s1 c8 100/conn threads (round 2) (limit 10 % in any cell)']);
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
    expect(d).toEqual({ wallS: 2, otherS: 0.5, otherCorePct: 25, stealS: 0.1, kernelS: 0, top: [{ comm: 'fuzz', s: 0.3 }, { comm: 'vitest', s: 0.2 }, { comm: 'cc1', s: 0.1 }] });
    // the kernel threads' time is left out: kworker +0.1 s, a new ksoftirqd 0.1 s, a kworker whose pid was reused counts from 0
    const kernel = (entries: [number, number, number][]) => new Map(entries.map(([pid, ticks, start]) => [pid, { ticks, start }]));
    const ka = { ...a, kernel: kernel([[2, 5, 0], [30, 40, 3], [31, 70, 4]]) };
    const kb = { ...b, kernel: kernel([[2, 5, 0], [30, 40 + 0.1 * hz, 3], [31, 0.05 * hz, 50], [32, 0.1 * hz, 60]]) };
    expect(bench.cpuBetween(ka, kb)).toMatchObject({ otherS: 0.25, otherCorePct: 12.5, kernelS: 0.25 });
    // a real mark leaves out this process: its own work is not "other"
    const m = bench.cpuMark();
    expect(m.procs.has(process.pid)).toBe(false);
    expect(m.bench).toBeGreaterThan(0);
    expect(m.kernel!.has(2)).toBe(true); // kthreadd
    for (const pid of m.kernel!.keys()) expect(fs.readFileSync(`/proc/${pid}/stat`, 'utf8').split(') ')[1].split(' ')[1]).toMatch(/^[02]$/); // pid 2 or its children
  });

  it("computes the native floor: C's time per message plus one hand-off per replied step", () => {
    // the figures: C 18,595 msg/s on S2 and 53,376 on S3 at concurrency 1, 12 us per hand-off, EOM the only replied step
    expect(bench.nativeFloor(18595, 1, 12) / 18595).toBeCloseTo(0.818, 3);
    expect(bench.nativeFloor(53376, 1, 12) / 53376).toBeCloseTo(0.61, 2);
    expect(bench.nativeFloor(1000, 0, 12)).toBe(1000);
    expect(bench.nativeFloor(1000, 100, 10)).toBeCloseTo(500, 6); // 1 ms + 100 x 10 us
  });
});

describe('bench options (lib.cjs readOptions), the one reader of every bench script', () => {
  const spec: Record<string, [string, string] | [string, string, string[]]> = {
    '--quick': ['quick', 'flag'],
    '--json': ['json', 'text'],
    '--shapes': ['shapes', 'list'],
    '--rounds': ['rounds', 'whole >= 1'],
    '--seconds': ['seconds', 'number > 0'],
    '--warmup': ['warmup', 'number >= 0'],
    '--conc': ['conc', 'wholes >= 1'],
    '--client': ['client', 'text', ['epoll', 'threads']],
    '--impls': ['impls', 'list', ['c', 'py']],
  };
  const read = (...argv: string[]) => bench.readOptions(argv, spec, 'bench/x.cjs');

  it('reads flags, text, lists and bounded numbers, and returns only what was given', () => {
    expect(read()).toEqual({});
    expect(read('--quick', '--json', 'out.json', '--shapes', 's1,s3', '--rounds', '3', '--seconds', '0.5', '--warmup', '0', '--conc', '1,8,64')).toEqual({
      quick: true, json: 'out.json', shapes: ['s1', 's3'], rounds: 3, seconds: 0.5, warmup: 0, conc: [1, 8, 64],
    });
    expect(read('--rounds', '2', '--rounds', '4')).toEqual({ rounds: 4 });
    expect(read('--client', 'threads', '--impls', 'py,c')).toEqual({ client: 'threads', impls: ['py', 'c'] });
  });

  it('refuses, by name and with what it got, every value it cannot use', () => {
    const cases: [string[], string][] = [
      [['--fast'], 'unknown option --fast; see the comment at the top of bench/x.cjs'],
      [['--rounds'], '--rounds needs a value'],
      [['--json', '--quick'], '--json needs a value'],
      [['--json', ''], '--json needs a value, got ""'],
      [['--rounds', ''], '--rounds needs a whole number >= 1, got ""'],
      [['--rounds', 'x'], '--rounds needs a whole number >= 1, got x'],
      [['--rounds', '2.5'], '--rounds needs a whole number >= 1, got 2.5'],
      [['--rounds', '0'], '--rounds needs a whole number >= 1, got 0'],
      [['--seconds', '0'], '--seconds needs a number > 0, got 0'],
      [['--seconds', 'Infinity'], '--seconds needs a number > 0, got Infinity'],
      [['--warmup', '-1'], '--warmup needs a number >= 0, got -1'],
      [['--conc', '1,0'], '--conc needs whole numbers >= 1, got "0" in 1,0'],
      [['--conc', '1,,8'], '--conc needs whole numbers >= 1, got "" in 1,,8'],
      [['--shapes', 's1,'], '--shapes needs a comma-separated list without empty items, got "s1,"'],
      [['--client', 'forks'], '--client forks: expected one of epoll, threads'],
      [['--impls', 'c,go'], '--impls go: expected one of c, py'],
    ];
    for (const [argv, message] of cases) {
      let err: unknown;
      try {
        read(...argv);
      } catch (e) {
        err = e;
      }
      expect(err, argv.join(' ')).toBeInstanceOf(bench.OptionError);
      expect((err as Error).message).toBe(message);
      expect((err as { code?: string }).code).toBe('ERR_BENCH_OPTION');
      expect(bench.errorText(err)).toBe(message);
    }
    expect(() => bench.readOptions(['--x', '1'], { '--x': ['x', 'count'] }, 'bench/x.cjs')).toThrow(TypeError);
    const other = new Error('boom');
    expect(bench.errorText(other)).toBe(other.stack);
  });

  it('every bench script refuses a bad option with its message alone, exit 1, before it measures anything', async () => {
    const cases: [string[], string][] = [
      [['bench/run.cjs', '--rounds', '0'], '--rounds needs a whole number >= 1, got 0'],
      [['bench/run.cjs', '--conc', '1,x'], '--conc needs whole numbers >= 1, got "x" in 1,x'],
      [['bench/profile.cjs', '--seconds', '0'], '--seconds needs a number > 0, got 0'],
      [['bench/workers.cjs', '--workers', '1,0'], '--workers needs whole numbers >= 1, got "0" in 1,0'],
      [['bench/workers.cjs', '--workers', '0'], '--workers needs whole numbers >= 1, got 0'],
      [['bench/sign.cjs', '--conc', '8,'], '--conc needs whole numbers >= 1, got "" in 8,'],
      [['bench/ceiling/run.cjs', '--seconds', 'abc'], '--seconds needs a number > 0, got abc'],
      [['bench/scale.cjs', 'conns', '--conns', 'many'], '--conns needs a whole number >= 1, got many'],
      [['bench/scale.cjs', 'soak', '--shape', 's9'], '--shape s9: expected one of s1, s2, s3, s4'],
      [['bench/scale.cjs', 'bigbody', '--conns', '5'], 'unknown option --conns; see the comment at the top of bench/scale.cjs'],
      [['bench/mta.cjs', '--size', '-5'], 'bench/mta: --size needs a whole number >= 1, got -5'],
      [['bench/mta.cjs', '--rows', 'postfix,smtp'], 'bench/mta: --rows smtp: expected one of postfix, mta, mta-reuse, chain'],
      [['bench/mta.cjs', '--transport', 'tcp'], 'bench/mta: --transport tcp: expected one of unix, inet'],
      [['bench/run.cjs', '--modes', 'many,few'], '--modes few: expected one of many, one'],
      [['bench/workers.cjs', '--engines', 'node,rust'], '--engines rust: expected one of libmilter, node'],
      [['bench/sign.cjs', '--impls', 'opendkim,dkimpy'], '--impls dkimpy: expected one of node, ts, opendkim'],
    ];
    for (const [[script, ...args], message] of cases) {
      const r = await runNode([path.join(ROOT, script), ...args], 20_000);
      expect(r.code, `${script} ${args.join(' ')}: ${r.stderr}`).toBe(1);
      expect(r.stderr.trim()).toBe(message);
      expect(r.stdout).toBe('');
    }
  }, 60_000);
});

describe('bench:timer', () => {
  it("measures Node's setTimeout and Python's time.sleep, and refuses a bad option", async () => {
    const { code, stdout, stderr } = await runNode([path.join(ROOT, 'bench/timer.cjs'), '--n', '5', '--ms', '2'], 30_000);
    expect(code, stderr).toBe(0);
    const rows = stdout.split('\n').filter((l) => /^\| (Node|Python) /.test(l));
    expect(rows.map((l) => l.split('|')[1].trim())).toEqual(['Node setTimeout(2)', 'Python time.sleep(0.002)']);
    for (const l of rows) {
      const [n, median, p10, p90] = l.split('|').slice(2, 6).map((x) => Number(x.trim()));
      expect(n).toBe(5);
      // libuv's clock counts whole milliseconds, so a 2 ms timer can fire up to 1 ms early; a sleep never does
      expect(median).toBeGreaterThanOrEqual(l.includes('Python') ? 2000 : 1000);
      expect(p10).toBeLessThanOrEqual(median);
      expect(p90).toBeGreaterThanOrEqual(median);
    }
    expect(stdout).toMatch(/^Node's median over Python's: \d+\.\d{3} \(\d+ us (longer|shorter) per wait\)\.$/m);
    // two chains in flight, the loop woken by I/O: twice the waits, the header says so
    const two = await runNode([path.join(ROOT, 'bench/timer.cjs'), '--n', '5', '--chains', '2', '--wake-us', '500'], 30_000);
    expect(two.code, two.stderr).toBe(0);
    expect(two.stdout).toMatch(/, 2 chains started 1000 us apart, Node's loop woken by I\/O every 500 us\):/);
    expect(two.stdout.split('\n').filter((l) => /^\| (Node|Python) /.test(l)).map((l) => Number(l.split('|')[2]))).toEqual([10, 10]);
    for (const [args, message] of [
      [['--n', '2.5'], '--n needs a whole number >= 1, got 2.5'],
      [['--chains', '0'], '--chains needs a whole number >= 1, got 0'],
      [['--wake-us', '-1'], '--wake-us needs a number >= 0, got -1'],
      [['--seconds', '1'], 'unknown option --seconds'],
    ]) {
      const bad = await runNode([path.join(ROOT, 'bench/timer.cjs'), ...args], 10_000);
      expect(bad.code).toBe(1);
      expect(bad.stderr).toContain(message);
      expect(bad.stderr, 'an option error prints its message, not a stack').not.toMatch(/\n\s+at /);
    }
  });
});

describe('bench runner', () => {
  it('records the machine state, runs both clients, puts ratios and the floor first, and writes the table with --doc', async () => {
    const { dir, doc, json } = scratchRun('bench-run-');
    try {
      // limits this loose pass on any machine: this checks the plumbing, not the machine
      const { code, stdout, stderr } = await runNode(
        [path.join(ROOT, 'bench/run.cjs'), '--rounds', '1', '--seconds', '0.3', '--warmup', '0.1', '--shapes', 's3', '--conc', '1', '--modes', 'many', '--impls', 'c,node',
          '--canary-seconds', '0.3', '--canary-runs', '3', '--handoff', '500', '--json', json, '--doc', '--doc-file', doc, '--max-other', '1000000', '--max-other-cell', '1000000',
          '--max-canary', '1000000'],
        120_000,
      );
      expect(code, stderr).toBe(0);
      expect(stderr).toMatch(/^plan: 4 runs of 0\.3 s \(\+0\.1 s warm-up\), 2 milter starts: about [\d.]+ min; rounds disturbed by other processes are measured again on top of that \(up to 2 passes, each after waiting up to 600 s for a quiet machine\)$/m);
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
        expect(text).toMatch(
          /^State: load average \(1\/5\/15 min\) [\d.]+ \/ [\d.]+ \/ [\d.]+ before, .* Canary \(C on libmilter, S2, concurrency 1, 100\/conn, epoll client, median of 3 x 0.3 s\): \d+ msg\/s at the start \(runs \d+ to \d+\), \d+ at the end \(runs \d+ to \d+\): [-+]\d+\.\d %, limit 1000000 %\. Hand-off round trip [\d.]+ us/m,
        );
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
        expect(text).toMatch(/^Ranking up to the noise between rounds: the clients contradict each other in [01] of 1 cells[.:]/m);
        // the CPU table: cores of the milter + the client, and CPU per message, for C / node in both clients' rows
        const cpu = text.split('\n').filter((l) => /^\| S3 c1 100\/conn (epoll|threads) \|/.test(l));
        expect(cpu).toHaveLength(2);
        for (const l of cpu) {
          const [cores, us] = l.split('|').slice(2, 4).map((x) => x.trim());
          const c = cores.split(' / ').map((x) => x.split(' + ').map(Number));
          expect(c).toHaveLength(2);
          for (const [milter, client] of c) {
            expect(milter).toBeGreaterThan(0);
            expect(client).toBeGreaterThan(0);
            expect(milter).toBeLessThan(os.availableParallelism() + 0.5);
          }
          for (const x of us.split(' / ').map(Number)) expect(x).toBeGreaterThan(0);
        }
      }
      // --render prints the saved run again: the same block, with a line that says so, and --doc writes it
      const again = path.join(dir, 'again.md');
      fs.writeFileSync(again, '# y\n<!-- bench:table:begin -->\nold\n<!-- bench:table:end -->\n');
      const r = await runNode([path.join(ROOT, 'bench/run.cjs'), '--render', json, '--doc', '--doc-file', again], 30_000);
      expect(r.code, r.stderr).toBe(0);
      const mark = / Rendered again from run\.json \(--render\) on \d{4}-\d\d-\d\dT\d\d:\d\dZ: the measurements are that run's\./;
      expect(r.stdout).toMatch(mark);
      expect(r.stdout.replace(mark, '')).toBe(stdout);
      expect(fs.readFileSync(again, 'utf8')).toContain(r.stdout.trim());
      // limits in the saved options come with it: the same state refused under the default limits is refused again
      const strict = JSON.parse(fs.readFileSync(json, 'utf8'));
      strict.options.limits = { ...bench.PUBLISH_LIMITS, canaryPct: -1 };
      const strictFile = path.join(dir, 'strict.json');
      fs.writeFileSync(strictFile, JSON.stringify(strict));
      const refused = await runNode([path.join(ROOT, 'bench/run.cjs'), '--render', strictFile, '--doc', '--doc-file', again], 30_000);
      expect(refused.code).toBe(3);
      expect(refused.stderr).toContain('--doc refused');
      expect(refused.stdout).toMatch(/^Publishable: NO: /m);
    } finally {
      fs.rmSync(dir, { recursive: true, force: true });
    }
  }, 150_000);
});

describe('bench runner: the canary between rounds', () => {
  it('stops a --doc run whose canary between rounds bars it, unless --keep-going, which records every reading and refuses at the end', async () => {
    const { dir, doc, json, before } = scratchRun('bench-between-');
    try {
      // --max-canary 0: any move at all bars the run, so the canary after round 1 (a real measurement, never exactly the start's) stops it
      const args = [path.join(ROOT, 'bench/run.cjs'), '--rounds', '3', '--seconds', '0.2', '--warmup', '0.1', '--shapes', 's3', '--conc', '1', '--modes', 'many', '--impls', 'c',
        '--clients', 'epoll', '--canary-seconds', '0.2', '--canary-runs', '3', '--canary-between', '2', '--handoff', '500', '--json', json, '--doc', '--doc-file', doc,
        '--max-other', '1000000', '--max-other-cell', '1000000', '--max-canary', '0'];
      const stopped = await runNode(args, 120_000);
      expect(stopped.code, stopped.stderr).toBe(3);
      expect(stopped.stderr).toMatch(/^canary after round 1: \d+, \d+ msg\/s$/m);
      expect(stopped.stderr).toMatch(
        /^bench: --doc stopped after round 1 of 3, nothing written: the canary moved by -?\d+\.\d % between rounds 1 and 2 \(\d+ msg\/s at the start, \d+ then; limit 0 %\)\. --keep-going runs it to the end\.$/m,
      );
      expect(stopped.stderr).not.toMatch(/canary after round 2/);
      expect(stopped.stdout).toBe('');
      expect(fs.readFileSync(doc, 'utf8')).toBe(before);
      expect(fs.existsSync(json)).toBe(false);

      const kept = await runNode([...args, '--keep-going'], 120_000);
      expect(kept.code, kept.stderr).toBe(3);
      expect(kept.stderr).toMatch(/^canary after round 2: /m);
      expect(kept.stderr).toContain('--doc refused');
      expect(fs.readFileSync(doc, 'utf8')).toBe(before);
      const out = JSON.parse(fs.readFileSync(json, 'utf8'));
      const c = out.state.canary;
      expect(c.betweenRuns).toBe(2);
      expect(c.between.map((b: any) => [b.afterRound, b.rates.length])).toEqual([[1, 2], [2, 2]]);
      for (const b of c.between) expect(b.rate).toBeGreaterThan(0);
      expect(out.verdict.reasons.filter((r: string) => / between rounds [12] and [23] /.test(r))).toHaveLength(2);
      expect(kept.stdout).toMatch(/ Canary between rounds \(median of 2 x 0\.2 s, against the start; limit 0 %\): after round 1 \d+ \([-+]\d+\.\d %\), after round 2 \d+ \([-+]\d+\.\d %\)\. Hand-off round trip /);
    } finally {
      fs.rmSync(dir, { recursive: true, force: true });
    }
  }, 150_000);
});

describe('bench runner: disturbed rounds measured again', () => {
  const run = createRequire(__filename)('../bench/run.cjs') as {
    disturbedCellRounds(results: any[], limitPct: number): { round: number; shape: string; order: string[]; rows: any[] }[];
    replaceCellRound(results: any[], rows: any[]): any[];
    remeasuredText(list: any[], limits: { otherCellPct: number }): string;
    parseArgs(argv: string[]): Record<string, any>;
    canaryEndText(rates: number[], dropped: { rate: number; otherCorePct: number }[], limitPct: number): string;
    betweenText(canary: Record<string, any>, limits: { canaryPct: number }): string;
    plan(o: Record<string, any>): { runs: number; starts: number; seconds: number };
    rankings(results: any[], o: Record<string, any>): { compared: number; differ: string[]; contradict: string[] };
  };

  it('--render takes a run saved by --json and nothing that would change what was measured', async () => {
    expect(run.parseArgs(['--render', 'x.json', '--doc']).render).toBe('x.json');
    expect(() => run.parseArgs(['--render', 'x.json', '--rounds', '3'])).toThrow('--render takes only --doc and --doc-file (the rest comes from the saved run), got --rounds');
    const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'bench-render-'));
    try {
      const cases: [string, string | null, RegExp][] = [
        ['missing.json', null, /--render .*missing\.json: no such file/],
        ['text.json', 'not json', /--render .*text\.json: not a run saved by --json \(/],
        ['other.json', '{"results": []}', /--render .*other\.json: not a run saved by --json \(no "machine"\)/],
        ['old.json', JSON.stringify({ machine: {}, options: {}, state: {}, results: [] }), /old\.json has no runAt or elapsedS: it was saved by an older bench\/run\.cjs/],
      ];
      for (const [name, body, message] of cases) {
        const file = path.join(dir, name);
        if (body !== null) fs.writeFileSync(file, body);
        const r = await runNode([path.join(ROOT, 'bench/run.cjs'), '--render', file], 30_000);
        expect(r.code, name).toBe(1);
        expect(r.stderr).toMatch(message);
        expect(r.stdout).toBe('');
      }
    } finally {
      fs.rmSync(dir, { recursive: true, force: true });
    }
  });

  it('tells an order the clients contradict each other on from one that noise swapped', () => {
    // one cell, three rounds: ts beats C in every epoll round, and the threads client's median has C ahead; py and C swap places, but neither client puts them in one order in every round
    const rates: Record<string, Record<string, number[]>> = {
      epoll: { c: [100, 100, 100], py: [101, 99, 102], ts: [110, 120, 105] },
      threads: { c: [100, 100, 100], py: [94, 101, 96], ts: [95, 102, 97] },
    };
    const results = Object.entries(rates).flatMap(([client, byImpl]) =>
      Object.entries(byImpl).flatMap(([impl, rs]) => rs.map((rate, round) => ({ round, shape: 's3', conc: 8, mode: 'many', client, impl, rate }))),
    );
    const o = { shapes: ['s3'], conc: [8], modes: ['many'], impls: ['c', 'py', 'ts'], clients: ['epoll', 'threads'], quick: false };
    const rank = run.rankings(results, o);
    expect(rank.compared).toBe(1);
    expect(rank.differ).toEqual(['S3 c8 100/conn (epoll ts > py > C; threads C > ts > py)']);
    expect(rank.contradict).toEqual([
      'S3 c8 100/conn (C/ts epoll 0.91 (0.83 to 0.95, every round below 1), threads 1.03 (0.98 to 1.05))',
    ]);
    // the same ratios with the threads client's ts in every round under C: still a contradiction, now stated for both
    rates.threads.ts = [95, 97, 98];
    const again = run.rankings(
      Object.entries(rates).flatMap(([client, byImpl]) =>
        Object.entries(byImpl).flatMap(([impl, rs]) => rs.map((rate, round) => ({ round, shape: 's3', conc: 8, mode: 'many', client, impl, rate }))),
      ),
      o,
    );
    expect(again.contradict).toEqual(['S3 c8 100/conn (C/ts epoll 0.91 (0.83 to 0.95, every round below 1), threads 1.03 (1.02 to 1.05, every round above 1))']);
    // a pair on the same side under both clients is no contradiction, however far apart
    rates.threads.ts = [150, 160, 170];
    const same = run.rankings(
      Object.entries(rates).flatMap(([client, byImpl]) =>
        Object.entries(byImpl).flatMap(([impl, rs]) => rs.map((rate, round) => ({ round, shape: 's3', conc: 8, mode: 'many', client, impl, rate }))),
      ),
      o,
    );
    expect(same.contradict).toEqual([]);
  });

  it('takes the canary from 11 runs (5 with --quick), and says which runs it dropped', () => {
    expect(run.parseArgs([]).canaryRuns).toBe(11);
    expect(run.parseArgs(['--quick']).canaryRuns).toBe(5);
    expect(run.parseArgs(['--canary-runs', '7']).canaryRuns).toBe(7);
    for (const bad of ['0', '2.5']) expect(() => run.parseArgs(['--canary-runs', bad])).toThrow(`--canary-runs needs a whole number >= 1, got ${bad}`);
    expect(() => run.parseArgs(['--canary-runs', 'x'])).toThrow('--canary-runs needs a whole number >= 1, got x');
    expect(run.canaryEndText([17000.4, 15592, 20565.2], [], 10)).toBe('runs 15592 to 20565');
    expect(run.canaryEndText([17000], [{ rate: 9000, otherCorePct: 12.4 }, { rate: 8000, otherCorePct: 30 }], 10)).toBe(
      'runs 17000 to 17000, 2 more dropped (others over 10 %: 12.4, 30 %)',
    );
    expect(run.canaryEndText([], [{ rate: 9000, otherCorePct: 12.4 }], 10)).toBe('no undisturbed run (1 over 10 %)');
  });
  it('runs the canary between rounds as often as at the ends unless told, counts it in the plan, and says what it found', () => {
    expect(run.parseArgs([]).canaryBetween).toBe(11);
    expect(run.parseArgs(['--quick']).canaryBetween).toBe(5);
    expect(run.parseArgs(['--canary-runs', '7']).canaryBetween).toBe(7);
    expect(run.parseArgs(['--canary-between', '0']).canaryBetween).toBe(0);
    expect(() => run.parseArgs(['--canary-between', '1.5'])).toThrow('--canary-between needs a whole number >= 0, got 1.5');
    expect(() => run.parseArgs(['--keep-going'])).toThrow('--keep-going needs --doc: only a --doc run stops early');
    expect(run.parseArgs(['--keep-going', '--doc']).keepGoing).toBe(true);
    // 4 gaps between 5 rounds, 11 runs of 2 s (+0.3 s warm-up, +0.06 s) each, and a milter start each
    const full = run.plan(run.parseArgs([]));
    const none = run.plan(run.parseArgs(['--canary-between', '0']));
    expect(full.runs).toBe(none.runs);
    expect(full.seconds - none.seconds).toBeCloseTo(4 * 11 * 2.36 + 4 * 0.45, 6);
    const c = { start: 18000, seconds: 2, betweenRuns: 11 };
    expect(run.betweenText({ ...c, between: [] }, { canaryPct: 10 })).toBe('');
    expect(run.betweenText(c, { canaryPct: 10 })).toBe(''); // a run saved before there was a canary between rounds
    const between = [
      { afterRound: 1, rate: 18500.4, rates: Array(11).fill(18500), dropped: [] },
      { afterRound: 2, rate: 15000, rates: Array(10).fill(15000), dropped: [{ rate: 9000, otherCorePct: 14 }] },
      { afterRound: 3, rate: 0, rates: [], dropped: [] },
    ];
    expect(run.betweenText({ ...c, between }, { canaryPct: 10 })).toBe(
      'Canary between rounds (median of 11 x 2 s, against the start; limit 10 %): after round 1 18500 (+2.8 %), after round 2 15000 (-16.7 %, 1 runs dropped), after round 3 no undisturbed run. ',
    );
  });

  const row = (round: number, client: string, impl: string, otherCorePct: number, rate = 1) => ({ round, shape: 's2', conc: 1, mode: 'many', client, impl, rate, other: { otherCorePct } });

  it('finds the rounds of cells where any one run was over the limit, with the order they ran in', () => {
    const results = [row(0, 'epoll', 'ts', 0), row(0, 'epoll', 'c', 31), row(0, 'threads', 'c', 30), row(0, 'threads', 'ts', 2), row(1, 'epoll', 'c', 0), row(1, 'epoll', 'ts', 0)];
    const d = run.disturbedCellRounds(results, 30);
    expect(d.map((g) => [g.round, g.order])).toEqual([[0, ['ts', 'c']]]); // 30 is not over 30
    expect(run.disturbedCellRounds(results, 31)).toEqual([]);
  });

  it('puts the new rows in place of the old ones and returns the old ones', () => {
    const results = [row(0, 'epoll', 'ts', 0), row(0, 'epoll', 'c', 80), row(0, 'threads', 'c', 0), row(1, 'epoll', 'c', 0)];
    const fresh = [row(0, 'epoll', 'ts', 1, 7), row(0, 'epoll', 'c', 2, 8)];
    const old = run.replaceCellRound(results, fresh);
    expect(old.map((r) => r.other.otherCorePct)).toEqual([0, 80]);
    expect(results.map((r) => `${r.round} ${r.client} ${r.impl} ${r.rate}`)).toEqual(['0 epoll ts 7', '0 epoll c 8', '0 threads c 1', '1 epoll c 1']);
    expect(() => run.replaceCellRound(results, [row(5, 'epoll', 'c', 0)])).toThrow(/no round 6 of s2 c1 100\/conn epoll to replace/);
  });

  it('says what was measured again, and nothing when nothing was', () => {
    expect(run.remeasuredText([], { otherCellPct: 30 })).toBe('');
    expect(run.remeasuredText([{ cell: 's2 c1 1/conn epoll', round: 5, pass: 1, otherBefore: 90.7, otherAfter: 0.4 }], { otherCellPct: 30 })).toBe(
      ' Measured again, because other processes or steal took more than 30 % of a core during a run of theirs (the first measurement is discarded; ' +
        'highest share of a core before -> after): 1 rounds of cells: s2 c1 1/conn epoll round 5 (90.7 -> 0.4 %).',
    );
  });

  it('measures a round disturbed by a process beside it again once that process is gone, and records the discarded rows', async () => {
    const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'bench-again-'));
    // One core kept busy beside the run: every run of the cell sees far more than 20 % of a core used by others.
    const burner = spawn(process.execPath, ['-e', 'for (;;);'], { stdio: 'ignore' });
    try {
      const json = path.join(dir, 'run.json');
      const child = spawn(process.execPath, [
        path.join(ROOT, 'bench/run.cjs'), '--rounds', '1', '--seconds', '0.3', '--warmup', '0.1', '--shapes', 's2', '--conc', '1', '--modes', 'many',
        '--impls', 'c,ts', '--clients', 'epoll', '--canary-seconds', '0.3', '--canary-runs', '1', '--handoff', '500', '--json', json,
        '--max-other', '1000000', '--max-other-cell', '20', '--max-canary', '1000000', '--remeasure', '1', '--quiet-wait', '60',
      ], { stdio: ['ignore', 'pipe', 'pipe'] });
      let stdout = '';
      let stderr = '';
      child.stdout.on('data', (d) => (stdout += d));
      child.stderr.on('data', (d) => {
        stderr += d;
        if (/waiting for a quiet machine/.test(stderr)) burner.kill('SIGKILL');
      });
      const code = await new Promise<number | null>((resolve) => child.once('exit', resolve));
      expect(code, stderr).toBe(0);
      expect(stderr).toMatch(/^pass 1: 1 rounds of cells were disturbed \(over 20 % of a core\); waiting for a quiet machine$/m);
      expect(stderr).toMatch(/^ {2}quiet after \d+ s/m);
      const out = JSON.parse(fs.readFileSync(json, 'utf8'));
      expect(out.results.map((r: any) => [r.impl, r.remeasured])).toHaveLength(2);
      for (const r of out.results) expect(r.remeasured).toBe(1);
      expect(out.state.remeasured).toHaveLength(1);
      const again = out.state.remeasured[0];
      expect(again).toMatchObject({ cell: 's2 c1 100/conn epoll', round: 1, pass: 1 });
      expect(again.otherBefore).toBeGreaterThan(20);
      expect(again.discarded.map((r: any) => r.impl).sort()).toEqual(['c', 'ts']);
      for (const r of again.discarded) expect(r.remeasured).toBeUndefined();
      expect(stdout).toMatch(/Measured again, because other processes or steal took more than 20 % of a core .*: 1 rounds of cells: s2 c1 100\/conn epoll round 1 \([\d.]+ -> [\d.]+ %\)\./);
      // the burner ran through the canary at the start: its one run was dropped; the end's ran on a quiet machine
      const c = out.state.canary;
      expect([c.runs, c.startRates.length, c.startDropped.length, c.endRates.length, c.endDropped.length]).toEqual([1, 0, 1, 1, 0]);
      expect(c.startDropped[0].otherCorePct).toBeGreaterThan(20);
      expect(out.verdict.reasons).toContain('the canary was disturbed: 0 of 1 runs at the start and 1 of 1 at the end had other processes and steal at or under 20 % of a core');
      expect(stdout).toMatch(/0 msg\/s at the start \(no undisturbed run \(1 over 20 %\)\), \d+ at the end \(runs \d+ to \d+\): /);
    } finally {
      burner.kill('SIGKILL');
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

  it('--per-conn 1 runs one message per connection, says so, and gives ts/bare from the same rounds', async () => {
    const script = path.join(ROOT, 'bench', 'ceiling', 'run.cjs');
    const { code, stdout, stderr } = await runNode([script, '--rounds', '1', '--seconds', '0.3', '--conc', '2', '--per-conn', '1', '--handoff', '200'], 60_000);
    expect(stderr).toBe('');
    expect(code).toBe(0);
    expect(stdout).toContain('S3, 1 message per connection, medians.');
    expect(stdout).toContain('| ts/C | ts/bare |');
    const [row] = stdout.split('\n').filter((l) => /^\| \d+ \|/.test(l));
    const cells = row.split('|').slice(1, -1).map((x) => Number(x.trim()));
    // conc, 4 rates, ceiling/C, bare/C, ts/C, ts/bare: with one round, ts/bare is ts over bare of that round.
    expect(cells).toHaveLength(9);
    const [, , , bare, ts] = cells;
    expect(cells[8]).toBeCloseTo(ts / bare, 2);
    const bad = await runNode([script, '--per-conn', '0'], 10_000);
    expect(bad.code).toBe(1);
    expect(bad.stderr.trim()).toBe('--per-conn needs a whole number >= 1, got 0');
  }, 90_000);

  it('stops its milters cleanly round after round: no exit listener left behind (warned from 6 rounds before)', async () => {
    const script = path.join(ROOT, 'bench', 'ceiling', 'run.cjs');
    const { code, stderr } = await runNode([script, '--rounds', '6', '--seconds', '0.1', '--conc', '1', '--handoff', '100'], 90_000);
    expect(stderr).toBe('');
    expect(code).toBe(0);
  }, 120_000);
});

describe('bench:profile', () => {
  const prof = createRequire(__filename)('../bench/profile.cjs') as {
    parseArgs(argv: string[]): Record<string, unknown>;
    parseStraceSummary(text: string): { syscall: string; calls: number; errors: number }[];
    summarizeProfile(p: unknown, top?: number): {
      samples: number;
      idlePct: number;
      gcPct: number;
      self: { fn: string; samples: number; pct: number }[];
      inclusive: { fn: string; samples: number; pct: number }[];
    };
  };

  it('refuses options it cannot honour, by name', () => {
    expect(() => prof.parseArgs(['--impl', 'c', '--cpu-prof', '/tmp/x'])).toThrow(/--cpu-prof profiles JavaScript: --impl must be node or ts, not c/);
    expect(() => prof.parseArgs(['--shape', 's9'])).toThrow(/--shape s9: expected one of s1, s2, s3, s4/);
    expect(() => prof.parseArgs(['--conc', '0'])).toThrow('--conc needs a whole number >= 1, got 0');
    expect(() => prof.parseArgs(['--rounds'])).toThrow(/--rounds needs a value/);
    expect(() => prof.parseArgs(['--fast'])).toThrow(/unknown option --fast/);
    expect(prof.parseArgs(['--impl', 'node', '--conc', '64', '--client', 'threads'])).toMatchObject({ impl: 'node', conc: 64, client: 'threads', shape: 's3', perConn: 1 });
  });

  it('--pin puts the milter on CPU 0 and says so', async () => {
    const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'nm-profile-pin-'));
    try {
      const json = path.join(dir, 'out.json');
      const args = ['--impl', 'c', '--conc', '2', '--per-conn', '5', '--rounds', '1', '--seconds', '0.3', '--warmup', '0.1', '--pin', '--json', json];
      const { code, stdout, stderr } = await runNode([path.join(ROOT, 'bench', 'profile.cjs'), ...args], 60_000);
      if (os.availableParallelism() < 2) {
        expect(code).toBe(1);
        expect(stderr.trim()).toBe(`--pin puts the milter and the load generator on CPUs of their own: it needs 2 CPUs, this process may use ${os.availableParallelism()}`);
        return;
      }
      expect(stderr).toBe('');
      expect(code).toBe(0);
      const r = JSON.parse(fs.readFileSync(json, 'utf8'));
      expect(r.pinned).toEqual({ milter: '0', loadGenerator: '1' });
      expect(r.rounds[0].messages).toBeGreaterThan(0);
      expect(stdout).toContain('c s3 c2 5/conn epoll: pinned (taskset): every thread of the milter to CPU 0, the load generator to CPU 1');
    } finally {
      fs.rmSync(dir, { recursive: true, force: true });
    }
  }, 90_000);

  it("reads strace -c's table, with and without the errors column, and refuses text without one", () => {
    const text = [
      '% time     seconds  usecs/call     calls    errors syscall',
      '------ ----------- ----------- --------- --------- ----------------',
      ' 90.23    6.998222       12959       540        43 futex',
      '  4.63    0.359432          17     20215           write',
      '  0.04    0.002964          14       206           close',
      '------ ----------- ----------- --------- --------- ----------------',
      '100.00    7.756219         173     20961        43 total',
    ].join('\n');
    expect(prof.parseStraceSummary(text)).toEqual([
      { syscall: 'write', calls: 20215, errors: 0 },
      { syscall: 'futex', calls: 540, errors: 43 },
      { syscall: 'close', calls: 206, errors: 0 },
    ]);
    expect(() => prof.parseStraceSummary('strace: attach: ptrace(PTRACE_SEIZE, 1): Operation not permitted\n')).toThrow(/strace -c wrote no table/);
  });

  it('sums a CPU profile by self and inclusive samples, counting a recursive function once per sample', () => {
    const frame = (functionName: string, url = '') => ({ functionName, url, lineNumber: 0, columnNumber: 0, scriptId: '0' });
    const profile = {
      nodes: [
        { id: 1, callFrame: frame('(root)'), children: [2, 5] },
        { id: 2, callFrame: frame('dispatch', 'file:///x/dist/src/engine/conn.js'), children: [3] },
        { id: 3, callFrame: frame('dispatch', 'file:///x/dist/src/engine/conn.js'), children: [4] },
        { id: 4, callFrame: frame('write', 'node:net'), children: [] },
        { id: 5, callFrame: frame('(idle)'), children: [] },
      ],
      samples: [4, 4, 3, 5, 5, 5, 2, 4, 5, 5],
      startTime: 0,
      endTime: 1000,
    };
    const s = prof.summarizeProfile(profile);
    expect(s.samples).toBe(10);
    expect(s.idlePct).toBe(50);
    expect(s.gcPct).toBe(0);
    expect(s.self.map((r) => [r.fn, r.samples])).toEqual([
      ['(idle)', 5],
      ['write node:net:1', 3],
      ['dispatch dist/src/engine/conn.js:1', 2],
    ]);
    const incl = new Map(s.inclusive.map((r) => [r.fn, r.samples]));
    expect(incl.get('dispatch dist/src/engine/conn.js:1')).toBe(5); // not 8: nodes 2 and 3 are one function
    expect(incl.has('(root)')).toBe(false);
  });

  it('measures one cell of the TypeScript engine with its CPU profile and its system calls per message', async () => {
    const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'nm-profile-'));
    try {
      const json = path.join(dir, 'out.json');
      const cpuprofile = path.join(dir, 'ts.cpuprofile');
      const script = path.join(ROOT, 'bench', 'profile.cjs');
      const args = ['--impl', 'ts', '--conc', '2', '--per-conn', '5', '--rounds', '2', '--seconds', '0.4', '--warmup', '0.1', '--cpu-prof', cpuprofile, '--syscalls', '--json', json];
      const { code, stdout, stderr } = await runNode([script, ...args], 60_000);
      expect(stderr).toBe('');
      expect(code).toBe(0);
      const r = JSON.parse(fs.readFileSync(json, 'utf8'));
      expect(r.cell).toBe('ts s3 c2 5/conn epoll');
      expect(r.rounds).toHaveLength(2);
      for (const round of r.rounds) {
        expect(round.messages).toBeGreaterThan(0);
        expect(round.userUsPerMsg + round.sysUsPerMsg).toBeGreaterThan(0);
        // the JavaScript thread's share of the round: it did the work, and no thread is more than busy
        expect(round.mainThreadPct).toBeGreaterThan(0);
        expect(round.mainThreadPct).toBeLessThanOrEqual(105);
      }
      expect(stdout).toMatch(/main thread busy \d+ % of the round/);
      expect(stdout).toMatch(/V8's "\(idle\)" is the event loop's poll phase outside JavaScript/);
      // Every message is at least one read and one write; 5 per connection is at least one accept per 5.
      const calls = new Map<string, number>(r.syscalls.perMessage.map((s: { syscall: string; perMsg: number }) => [s.syscall, s.perMsg]));
      expect(calls.get('read')).toBeGreaterThanOrEqual(1);
      expect(calls.get('write')! + (calls.get('writev') ?? 0)).toBeGreaterThanOrEqual(1);
      expect(calls.get('accept4')).toBeGreaterThanOrEqual(0.19);
      // counted on a second milter without the profiler: none of the profiler's signal per sample (tgkill, rt_sigreturn)
      expect(r.syscalls.separateMilter).toBe(true);
      expect(calls.has('tgkill')).toBe(false);
      expect(calls.has('rt_sigreturn')).toBe(false);
      expect(stdout).toContain('under strace -c -f (a second milter, without the profiler)');
      expect(stdout).toContain("V8's profiler samples the milter from its start, so the rounds' msg/s and CPU below include its cost");
      // The profile is V8's, of the milter process, and its samples reach the engine's code.
      const written = JSON.parse(fs.readFileSync(cpuprofile, 'utf8'));
      expect(written.samples.length).toBe(r.profile.samples);
      expect(r.profile.samples).toBeGreaterThan(100);
      expect(r.profile.inclusive.some((x: { fn: string }) => x.fn.includes('dist/src/engine/'))).toBe(true);
      expect(stdout).toMatch(/system calls per message:/);
      expect(stdout).toMatch(/-- inclusive, % of all samples/);
    } finally {
      fs.rmSync(dir, { recursive: true, force: true });
    }
  }, 90_000);
});
