// Shared pieces of the benchmarks: build the C load generator and the C
// milters with cc, start a milter of some implementation and shape, run the
// load generator, read a process's memory and CPU from /proc.
'use strict';
const { spawn, execFileSync } = require('node:child_process');
const crypto = require('node:crypto');
const fs = require('node:fs');
const net = require('node:net');
const os = require('node:os');
const path = require('node:path');

const BENCH = __dirname;
const ROOT = path.join(BENCH, '..');
const PYTHON = '/usr/bin/python3'; // Debian's, which can import Milter
// c: libmilter; py: pymilter; node: nodemilter on libmilter (the default
// engine, the one the targets are for); ts: nodemilter on its TypeScript
// engine (nodemilter/engine), when the build has it.
const IMPLS = ['c', 'py', 'node', 'ts'];
// The load generator's clients: epoll (one thread, every connection
// non-blocking) and threads (one blocking connection per thread, as
// Postfix's smtpd and cleanup processes).
const CLIENTS = ['epoll', 'threads'];

function nodemilterDist() {
  return process.env.NODEMILTER_DIST || path.join(ROOT, 'dist');
}

/** The implementations this build can run (ts only if dist has the TypeScript engine). */
function availableImpls() {
  return IMPLS.filter((i) => i !== 'ts' || fs.existsSync(path.join(nodemilterDist(), 'src/engine/index.js')));
}
const SHAPES = ['s1', 's2', 's3', 's4'];

/** Compile a C file with cc -O2 into a cache dir keyed by source and flags; returns the binary. */
function buildC(rel, libs = []) {
  const src = path.join(BENCH, rel);
  const cc = process.env.CC || 'cc';
  const flags = ['-O2', '-Wall'];
  const hash = crypto.createHash('sha256').update(fs.readFileSync(src)).update(JSON.stringify([cc, flags, libs])).digest('hex').slice(0, 16);
  const dir = path.join(os.tmpdir(), 'nodemilter-bench', hash);
  const out = path.join(dir, path.basename(src, '.c'));
  if (fs.existsSync(out)) return out;
  fs.mkdirSync(dir, { recursive: true });
  const tmp = `${out}.${process.pid}.tmp`;
  execFileSync(cc, [...flags, '-o', tmp, src, ...libs], { stdio: ['ignore', 'inherit', 'inherit'] });
  fs.renameSync(tmp, out);
  return out;
}

const loadgenPath = () => buildC('loadgen.c', ['-pthread']);
const cMilterPath = () => buildC('milters/milter.c', ['-lmilter', '-lpthread']);

function milterCommand(impl, shape, socket) {
  switch (impl) {
    case 'c':
      return [cMilterPath(), [shape, socket]];
    case 'py':
      return [PYTHON, [path.join(BENCH, 'milters/pymilter_bench.py'), shape, socket]];
    case 'node':
      return [process.execPath, [path.join(BENCH, 'milters/node.cjs'), shape, socket, 'libmilter']];
    case 'ts':
      return [process.execPath, [path.join(BENCH, 'milters/node.cjs'), shape, socket, 'ts']];
    default:
      throw new Error(`unknown implementation ${impl}: expected ${IMPLS.join(', ')}`);
  }
}

let tmpRoot;
function socketFor(name) {
  tmpRoot ??= fs.mkdtempSync(path.join(os.tmpdir(), 'nmbench-'));
  return `unix:${path.join(tmpRoot, `${name}.sock`)}`;
}

const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

function canConnect(p) {
  return new Promise((resolve) => {
    const s = net.connect(p);
    s.once('connect', () => {
      s.destroy();
      resolve(true);
    });
    s.once('error', () => resolve(false));
  });
}

const running = new Set();
function killAll() {
  for (const c of running) {
    try {
      c.kill('SIGKILL');
    } catch {}
  }
}
process.on('exit', killAll);
for (const sig of ['SIGINT', 'SIGTERM']) process.on(sig, () => process.exit(130));

/**
 * Start a milter and wait for its socket. No readiness probe connection is
 * made (it would count as a session); we wait for the socket file, then
 * give the listener a moment.
 */
async function startMilter(impl, shape, socket, env = {}) {
  const [cmd, args] = milterCommand(impl, shape, socket);
  const p = socket.replace(/^unix:/, '');
  try {
    fs.unlinkSync(p);
  } catch {}
  const child = spawn(cmd, args, { stdio: ['ignore', 'ignore', 'pipe'], env: { ...process.env, ...env } });
  running.add(child);
  let stderr = '';
  child.stderr.on('data', (d) => (stderr += d));
  let exited = false;
  child.once('exit', () => {
    exited = true;
    running.delete(child);
  });
  const deadline = Date.now() + 15_000;
  while (!fs.existsSync(p) || !(await canConnect(p))) {
    if (exited) throw new Error(`${impl} ${shape} milter exited before listening:\n${stderr}`);
    if (Date.now() > deadline) throw new Error(`${impl} ${shape} milter did not listen on ${socket}:\n${stderr}`);
    await sleep(50);
  }
  await sleep(100);
  return {
    impl,
    shape,
    socket,
    pid: child.pid,
    child,
    stderr: () => stderr,
    alive: () => !exited,
    async stop() {
      if (exited) return;
      child.kill('SIGKILL'); // libmilter takes ~5 s to leave smfi_main after SIGTERM
      await new Promise((r) => (exited ? r() : child.once('exit', r)));
      try {
        fs.unlinkSync(p);
      } catch {}
    },
  };
}

/**
 * Run the load generator; resolves with its JSON result (plus `exitCode`, `stderr`).
 * `client`: 'epoll' (default: one thread, non-blocking) or 'threads' (one
 * blocking connection per thread, as Postfix's processes).
 */
function runLoadgen(socket, o) {
  const args = ['-s', socket, '-c', String(o.conc ?? 1), '-m', String(o.perConn ?? 100), '-b', String(o.body ?? 2048)];
  if (o.messages) args.push('-n', String(o.messages));
  if (o.seconds) args.push('-d', String(o.seconds));
  if (o.warmup) args.push('-w', String(o.warmup));
  if (o.minHeaders !== undefined) args.push('-H', String(o.minHeaders));
  if (o.checkReplacedBody) args.push('-R');
  if (o.barrier) args.push('-B');
  if (o.client === 'threads') args.push('-T');
  else if (o.client !== undefined && o.client !== 'epoll') return Promise.reject(new Error(`unknown client ${o.client}: expected ${CLIENTS.join(' or ')}`));
  args.push('-t', String(o.timeout ?? 30));
  return new Promise((resolve, reject) => {
    // o.cpus: the CPUs the load generator may run on (taskset's list, e.g. '1')
    const argv = o.cpus === undefined ? [loadgenPath(), ...args] : ['taskset', '-c', String(o.cpus), loadgenPath(), ...args];
    const child = spawn(argv[0], argv.slice(1), { stdio: ['ignore', 'pipe', 'pipe'] });
    running.add(child);
    let out = '';
    let err = '';
    child.stdout.on('data', (d) => (out += d));
    child.stderr.on('data', (d) => (err += d));
    child.once('exit', (code) => {
      running.delete(child);
      const line = out.trim().split('\n').pop();
      try {
        resolve({ ...JSON.parse(line), exitCode: code, stderr: err });
      } catch {
        reject(new Error(`loadgen failed (exit ${code}): ${err || out}`));
      }
    });
  });
}

/**
 * Pin every thread of a running process to `cpus` (taskset's list, e.g.
 * '0'); threads it starts later inherit that. Returns the process's
 * Cpus_allowed_list as the kernel then reports it.
 */
function pinProcess(pid, cpus) {
  execFileSync('taskset', ['-a', '-p', '-c', String(cpus), String(pid)], { stdio: ['ignore', 'ignore', 'pipe'] });
  const m = /^Cpus_allowed_list:\s*(\S+)/m.exec(fs.readFileSync(`/proc/${pid}/status`, 'utf8'));
  return m ? m[1] : '';
}

/** Fields of /proc/PID/status in kB (VmRSS, VmHWM...). */
function procStatus(pid) {
  const out = {};
  for (const line of fs.readFileSync(`/proc/${pid}/status`, 'utf8').split('\n')) {
    const m = /^(\w+):\s+(\d+) kB/.exec(line);
    if (m) out[m[1]] = Number(m[2]);
  }
  return out;
}

/** Reset the peak RSS (VmHWM) of a process (Linux >= 4.0). Returns false if not allowed. */
function resetPeak(pid) {
  try {
    fs.writeFileSync(`/proc/${pid}/clear_refs`, '5');
    return true;
  } catch {
    return false;
  }
}

/**
 * CPU seconds (user, system) a process used so far, all threads; with
 * `tid`, only that thread's (the JavaScript thread of a Node process is
 * the one whose id is the process id).
 */
function cpuTimes(pid, tid) {
  const stat = fs.readFileSync(tid === undefined ? `/proc/${pid}/stat` : `/proc/${pid}/task/${tid}/stat`, 'utf8');
  const f = stat.slice(stat.lastIndexOf(')') + 2).split(' ');
  return { user: Number(f[11]) / clkTck(), sys: Number(f[12]) / clkTck() };
}

/** CPU seconds (user + system) a process used so far, all threads. */
function cpuSeconds(pid) {
  const t = cpuTimes(pid);
  return t.user + t.sys;
}
let tck;
function clkTck() {
  if (!tck) {
    try {
      tck = Number(execFileSync('getconf', ['CLK_TCK']).toString().trim()) || 100;
    } catch {
      tck = 100;
    }
  }
  return tck;
}

/** Thread count of a process. */
function threads(pid) {
  return Number(/Threads:\s+(\d+)/.exec(fs.readFileSync(`/proc/${pid}/status`, 'utf8'))[1]);
}

function median(xs) {
  const s = xs.filter((x) => Number.isFinite(x)).sort((a, b) => a - b);
  if (!s.length) return NaN;
  const m = s.length >> 1;
  return s.length % 2 ? s[m] : (s[m - 1] + s[m]) / 2;
}

function machine() {
  const cpus = os.cpus();
  return {
    cpu: cpus[0]?.model?.trim() ?? 'unknown',
    cores: cpus.length,
    memGiB: Math.round(os.totalmem() / 2 ** 30),
    kernel: os.release(),
    node: process.version,
    python: execFileSync(PYTHON, ['-c', 'import sys, Milter; print(sys.version.split()[0], Milter.__version__)']).toString().trim(),
    libmilter: (() => {
      try {
        return execFileSync('dpkg-query', ['-W', '-f', '${Version}', 'libmilter1.0.1']).toString().trim();
      } catch {
        return 'unknown';
      }
    })(),
  };
}

// ---- the machine's state during a run

/** CPU ticks of the whole machine from /proc/stat: busy (everything but idle and iowait), steal. */
function systemTicks() {
  const f = fs.readFileSync('/proc/stat', 'utf8').split('\n', 1)[0].trim().split(/\s+/).slice(1).map(Number);
  const [user, nice, system, , , irq, softirq, steal = 0] = f; // guest time is already in user
  return { busy: user + nice + system + irq + softirq + steal, steal };
}

/** utime + stime (+ cutime + cstime with `children`) of a /proc/PID/stat line, in ticks, and its comm, ppid, start. */
function parseStat(text) {
  const close = text.lastIndexOf(')');
  const comm = text.slice(text.indexOf('(') + 1, close);
  const f = text.slice(close + 2).split(' ');
  // f[0] is field 3 (state): utime is field 14 -> f[11]
  return { comm, ppid: Number(f[1]), own: Number(f[11]) + Number(f[12]), children: Number(f[13]) + Number(f[14]), start: Number(f[19]) };
}

/**
 * Ticks used by the benchmark itself: this process with every child it has
 * reaped (cutime, cstime: the load generators and milters already stopped),
 * plus the children still running (the milters).
 */
function benchTicks() {
  const self = parseStat(fs.readFileSync('/proc/self/stat', 'utf8'));
  let t = self.own + self.children;
  for (const c of running) {
    try {
      t += parseStat(fs.readFileSync(`/proc/${c.pid}/stat`, 'utf8')).own;
    } catch {} // gone between its exit and the reap: counted in cutime once reaped
  }
  return t;
}

/** Every process on the machine, one walk of /proc: pid -> parseStat of its stat line. */
function allProcesses() {
  const out = new Map();
  for (const name of fs.readdirSync('/proc')) {
    if (!/^\d+$/.test(name)) continue;
    try {
      out.set(Number(name), parseStat(fs.readFileSync(`/proc/${name}/stat`, 'utf8')));
    } catch {} // gone between the readdir and the read
  }
  return out;
}

/** Every other process: pid -> { comm, ticks, start }, leaving out this process and its children. */
function otherProcesses(all = allProcesses()) {
  const ours = new Set([process.pid, ...[...running].map((c) => c.pid)]);
  const out = new Map();
  for (const [pid, st] of all) if (!ours.has(pid) && !ours.has(st.ppid)) out.set(pid, { comm: st.comm, ticks: st.own, start: st.start });
  return out;
}

/** Kernel threads (kthreadd, pid 2, and its children): pid -> { ticks, start }. */
function kernelThreads(all = allProcesses()) {
  const out = new Map();
  for (const [pid, st] of all) if (pid === 2 || st.ppid === 2) out.set(pid, { ticks: st.own, start: st.start });
  return out;
}

/** Ticks process `now` used since the scan that saw it as `before` (a process new since then, or a reused pid, counts in full). */
function ticksSince(before, now) {
  return before && before.start === now.start ? now.ticks - before.ticks : now.ticks;
}

/** Ticks the kernel threads of mark `b` used since mark `a`. */
function kernelTicksBetween(a, b) {
  let t = 0;
  for (const [pid, k] of b) t += ticksSince(a.get(pid), k);
  return t;
}

/**
 * A mark of the machine's CPU accounting; two marks give what others used in
 * between (cpuBetween). `procs`: also scan every other process by command
 * (for the report of who used the most). The kernel threads are read at
 * every mark (about 1.3 ms on the quiet 2-core machine).
 */
function cpuMark({ procs = true } = {}) {
  const all = allProcesses();
  return { t: performance.now(), sys: systemTicks(), bench: benchTicks(), kernel: kernelThreads(all), procs: procs ? otherProcesses(all) : null };
}

/** CPU seconds per command name between two process scans (pid reuse counts as a new process). */
function procDelta(a, b, into = new Map()) {
  const hz = clkTck();
  for (const [pid, p] of b) {
    const d = ticksSince(a.get(pid), p);
    if (d > 0) into.set(p.comm, (into.get(p.comm) ?? 0) + d / hz);
  }
  return into;
}

/** The commands that used the most, [{ comm, s }], from a procDelta map. */
function topOf(byComm, n = 5) {
  return [...byComm].sort((x, y) => y[1] - x[1]).slice(0, n).map(([comm, s]) => ({ comm, s: Number(s.toFixed(2)) }));
}

/**
 * What the rest of the machine used between two marks: `otherS` CPU seconds
 * (the machine's busy time, steal included, minus the benchmark's own and
 * minus the kernel threads'), `otherCorePct` the same as a share of one core
 * over the wall time, `stealS`, `kernelS` (the kernel threads: ksoftirqd,
 * kworker, rcu, which during a run mostly do the benchmark's own work: a C
 * milter at 64 one-message connections made them use 4 % of a core, about
 * half of what the busy time then showed beyond the benchmark's processes),
 * and `top`: the other processes that used the most (by command name;
 * processes that lived across both marks or started after the first; empty
 * unless both marks scanned the processes).
 */
function cpuBetween(a, b) {
  const hz = clkTck();
  const wallS = (b.t - a.t) / 1000;
  const kernel = a.kernel && b.kernel ? kernelTicksBetween(a.kernel, b.kernel) : 0;
  const otherS = Math.max(0, b.sys.busy - a.sys.busy - (b.bench - a.bench) - kernel) / hz;
  return {
    wallS: Number(wallS.toFixed(3)),
    otherS: Number(otherS.toFixed(2)),
    otherCorePct: wallS > 0 ? Number(((otherS / wallS) * 100).toFixed(1)) : 0,
    stealS: Number(((b.sys.steal - a.sys.steal) / hz).toFixed(2)),
    kernelS: Number((kernel / hz).toFixed(2)),
    top: a.procs && b.procs ? topOf(procDelta(a.procs, b.procs)) : [],
  };
}

/**
 * Which other commands used CPU over a run: scan() at the start, now and
 * then (between groups of cells) and at the end; top() sums the deltas of
 * consecutive scans, so it also sees processes that came and went between
 * the first and the last scan, if they lived across one scan.
 */
function procTally() {
  let last = otherProcesses();
  const byComm = new Map();
  return {
    scan() {
      const now = otherProcesses();
      procDelta(last, now, byComm);
      last = now;
    },
    top: (n) => topOf(byComm, n),
  };
}

/**
 * Limits for publishing a table (`--doc`). The machine counts as busy when
 * other processes used more than `otherPct` % of one core averaged over the
 * whole run, or more than `otherCellPct` % during any one cell; the canary
 * (C on libmilter, one fixed cell, measured at the start and at the end)
 * must not move by more than `canaryPct` %. The per-cell limit was 30 %
 * until 2026-12-03, when a duty-cycle burner beside the canary's cell showed
 * what a neighbour costs a cell at concurrency 1: 4 % of a core took 7 % of
 * its rate, 7 % took 21 %, 12 % took 42 % (docs/performance.md). It is 10 %,
 * not lower, because cells that open and close 64 connections at a time
 * show 2 to 6 % with nothing else running, beyond the kernel threads that
 * cpuBetween leaves out.
 */
const PUBLISH_LIMITS = { otherPct: 5, otherCellPct: 10, canaryPct: 10 };

/**
 * Why the canary measured between two rounds bars publishing, or null: it
 * had fewer undisturbed runs than asked, or its median is more than
 * `limits.canaryPct` % from the canary at the start. `entry`: { afterRound,
 * rate, rates } as the runner records it, `runs`: how many it asked for.
 * The runner also asks this after each round, to stop a --doc run early
 * that can no longer be published.
 */
function betweenReason(start, entry, runs, limits = PUBLISH_LIMITS) {
  const where = `between rounds ${entry.afterRound} and ${entry.afterRound + 1}`;
  if (entry.rates.length < runs)
    return `the canary was disturbed ${where}: ${entry.rates.length} of ${runs} runs had other processes and steal at or under ${limits.otherCellPct} % of a core`;
  if (!(start > 0)) return null; // the start's own reason says why
  const move = (entry.rate / start - 1) * 100;
  if (Math.abs(move) > limits.canaryPct)
    return `the canary moved by ${move.toFixed(1)} % ${where} (${Math.round(start)} msg/s at the start, ${Math.round(entry.rate)} then; limit ${limits.canaryPct} %)`;
  return null;
}

/**
 * May a run be published? `state`: { canary: { start, end } (msg/s, the
 * medians), and optionally runs, startRates, endRates (the undisturbed runs
 * at each end), between: [{ afterRound, rate, rates }] with betweenRuns (the
 * canary between rounds), other: { otherCorePct, top }, cellMax: {
 * otherCorePct, cell }, errors }. Returns { ok, reasons: [sentence, ...] }.
 */
function publishVerdict(state, limits = PUBLISH_LIMITS) {
  const reasons = [];
  const { start, end, runs, startRates, endRates } = state.canary;
  const disturbed = runs > 0 && startRates && endRates && (startRates.length < runs || endRates.length < runs);
  if (disturbed)
    reasons.push(
      `the canary was disturbed: ${startRates.length} of ${runs} runs at the start and ${endRates.length} of ${runs} at the end ` +
        `had other processes and steal at or under ${limits.otherCellPct} % of a core`,
    );
  if (!(start > 0) || !(end > 0)) {
    if (!disturbed) reasons.push(`the canary did not run (start ${start}, end ${end} msg/s)`);
  } else {
    const drift = (end / start - 1) * 100;
    if (Math.abs(drift) > limits.canaryPct)
      reasons.push(
        `the canary moved by ${drift.toFixed(1)} % (${Math.round(start)} msg/s at the start, ${Math.round(end)} at the end; limit ${limits.canaryPct} %)`,
      );
  }
  for (const entry of state.canary.between ?? []) {
    const r = betweenReason(start, entry, state.canary.betweenRuns, limits);
    if (r) reasons.push(r);
  }
  const tops = (t) => (t && t.length ? ` (most: ${t.map((p) => `${p.comm} ${p.s} s`).join(', ')})` : '');
  if (state.other.otherCorePct > limits.otherPct)
    reasons.push(
      `the machine was busy: other processes and steal used ${state.other.otherCorePct} % of one core over the run ` +
        `(${state.other.otherS} CPU s in ${state.other.wallS} s${state.other.stealS > 0 ? `, of which steal ${state.other.stealS} s` : ''}; ` +
        `limit ${limits.otherPct} %)${tops(state.other.top)}`,
    );
  if (state.cellMax && state.cellMax.otherCorePct > limits.otherCellPct)
    reasons.push(
      `the machine was busy: other processes and steal used ${state.cellMax.otherCorePct} % of one core during ${state.cellMax.cell} ` +
        `(limit ${limits.otherCellPct} % in any cell)`,
    );
  if (state.errors) reasons.push(`${state.errors} runs had errors`);
  return { ok: reasons.length === 0, reasons };
}

/**
 * Write `block` between the bench:table markers of `file`, but only if the
 * verdict allows it. Returns { written, message }: the message says why not.
 */
function publishTable(file, block, verdict) {
  if (!verdict.ok)
    return {
      written: false,
      message: `bench: --doc refused, ${file} left as it was:\n${verdict.reasons.map((r) => `  - ${r}`).join('\n')}\nRun it again on a quiet machine.`,
    };
  const begin = '<!-- bench:table:begin -->';
  const end = '<!-- bench:table:end -->';
  const text = fs.readFileSync(file, 'utf8');
  const a = text.indexOf(begin);
  const b = text.indexOf(end);
  if (a < 0 || b < a) throw new Error(`${file} lacks the ${begin} ... ${end} markers`);
  fs.writeFileSync(file, text.slice(0, a + begin.length) + '\n' + block + text.slice(b));
  return { written: true, message: `updated ${file}` };
}

/** Load averages (1, 5, 15 minutes) from /proc/loadavg. */
function loadAverage() {
  return fs.readFileSync('/proc/loadavg', 'utf8').split(' ').slice(0, 3).map(Number);
}

/**
 * One thread hand-off round trip here (bench/ceiling/handoff.c), in us:
 * condvar, eventfd + epoll, and `handoff`, the one the libmilter engine
 * pays per replied step: worker -> JS thread by eventfd, JS thread ->
 * worker by condition variable, so the mean of the two round trips.
 */
function measureHandoff(roundTrips = 20000) {
  const bin = buildC('ceiling/handoff.c', ['-pthread']);
  const h = JSON.parse(execFileSync(bin, [String(roundTrips)]).toString());
  return { ...h, handoff_us: Number(((h.condvar_us + h.eventfd_epoll_us) / 2).toFixed(2)) };
}

/**
 * The native engine's floor at concurrency 1: C's time per message plus one
 * hand-off per replied step. `cRate` msg/s, `replied` replied steps per
 * message, `handoffUs` one round trip. Returns msg/s.
 */
function nativeFloor(cRate, replied, handoffUs) {
  return 1 / (1 / cRate + replied * handoffUs * 1e-6);
}

/** A command-line option that is unknown, lacks its value or has a bad one (code ERR_BENCH_OPTION): the scripts print its message, not a stack. */
class OptionError extends Error {
  constructor(message) {
    super(message);
    this.name = 'OptionError';
    this.code = 'ERR_BENCH_OPTION';
  }
}

/** What a bench script prints when it fails: an option error's message alone, any other error's stack. */
function errorText(err) {
  return err instanceof OptionError ? err.message : err?.stack || String(err);
}

/**
 * The command-line options of a bench script, read by one rule for all of
 * them. `spec` maps each option to [key, kind]: 'flag' (no value), 'text',
 * 'list' (comma-separated, no empty item), or a number with its bound,
 * 'number > 0', 'whole >= 1', and their lists 'numbers >= 0', 'wholes >= 1'.
 * A 'text' or 'list' entry may name its choices, [key, kind, choices]: then
 * the value (or each item) must be one of them.
 * A value that is missing, empty, not a number, a fraction where a whole
 * number is due, or out of bounds is an error that names the option, what
 * it needs and what it got; so is an option not in `spec` (naming `script`,
 * whose top comment lists the options). A value may not start with `--`:
 * `--json --doc` is a missing value, not a file named --doc. Returns the
 * keys given, and nothing for options not given (the caller's defaults).
 */
function readOptions(argv, spec, script) {
  const o = {};
  for (let i = 0; i < argv.length; i++) {
    const a = argv[i];
    const s = Object.hasOwn(spec, a) ? spec[a] : undefined;
    if (!s) throw new OptionError(`unknown option ${a}; see the comment at the top of ${script}`);
    const [key, kind, choices] = s;
    if (kind === 'flag') {
      o[key] = true;
      continue;
    }
    const v = argv[i + 1];
    if (v === undefined || v.startsWith('--')) throw new OptionError(`${a} needs a value`);
    i++;
    o[key] = optionValue(a, kind, v);
    if (choices) for (const x of kind === 'list' ? o[key] : [o[key]]) if (!choices.includes(x)) throw new OptionError(`${a} ${x}: expected one of ${choices.join(', ')}`);
  }
  return o;
}

function optionValue(a, kind, v) {
  if (kind === 'text') {
    if (v === '') throw new OptionError(`${a} needs a value, got ""`);
    return v;
  }
  if (kind === 'list') {
    const items = v.split(',');
    if (items.some((x) => x === '')) throw new OptionError(`${a} needs a comma-separated list without empty items, got ${JSON.stringify(v)}`);
    return items;
  }
  const m = /^(number|whole|numbers|wholes) (>=|>) (-?\d+(?:\.\d+)?)$/.exec(kind);
  if (!m) throw new TypeError(`readOptions: ${a} has an unknown kind ${JSON.stringify(kind)}`);
  const [, type, op, bound] = m;
  const whole = type.startsWith('whole');
  const many = type.endsWith('s');
  const min = Number(bound);
  const what = many ? `${whole ? 'whole ' : ''}numbers ${op} ${bound}` : `a ${whole ? 'whole ' : ''}number ${op} ${bound}`;
  const one = (x) => {
    const n = x.trim() === '' ? NaN : Number(x);
    const ok = Number.isFinite(n) && (op === '>' ? n > min : n >= min) && (!whole || Number.isInteger(n));
    if (!ok) throw new OptionError(`${a} needs ${what}, got ${many && x !== v ? `${JSON.stringify(x)} in ${v}` : v === '' ? '""' : v}`);
    return n;
  };
  return many ? v.split(',').map(one) : one(v);
}

module.exports = {
  systemTicks, benchTicks, otherProcesses, cpuMark, cpuBetween, procTally, PUBLISH_LIMITS, publishVerdict, betweenReason, publishTable, loadAverage, clkTck, measureHandoff, nativeFloor,
  BENCH, ROOT, PYTHON, IMPLS, CLIENTS, availableImpls, nodemilterDist, SHAPES, buildC, loadgenPath, cMilterPath, milterCommand, socketFor, startMilter, runLoadgen,
  procStatus, resetPeak, cpuTimes, cpuSeconds, threads, median, machine, sleep, killAll, readOptions, OptionError, errorText, pinProcess,
};
