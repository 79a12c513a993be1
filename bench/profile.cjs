// npm run bench:profile -- --impl ts --shape s3 [--conc 8 --per-conn 1 --client epoll|threads
//                          --rounds 3 --seconds 3 --warmup 0.3 --cpu-prof FILE --syscalls --pin --top 25 --json FILE]
// One cell of the benchmark, one implementation, looked into: the rate, and
// the milter's CPU per message (user and system, all threads, from
// /proc/PID/stat) in each round. With --cpu-prof (node and ts only) V8's CPU
// profiler runs in the milter from its start to its end and the functions
// with the most samples are printed, by self and by inclusive time, with the
// profile written to FILE (.cpuprofile, for Chrome DevTools too). --pin
// puts every thread of the milter on CPU 0 and the load generator on CPU 1
// (taskset), where the benchmark leaves both free. With --syscalls, one
// more round runs under `strace -c -f` and the system calls per message
// are printed (strace slows the milter down: read the counts, not the
// rate); with --cpu-prof too, that round runs on a second milter
// without the profiler, whose signal per sample would count as the milter's
// system calls. Under --cpu-prof the rounds' rates and CPU include the
// profiler's cost. This is the tool behind the profiles in docs/performance.md.
// Use it on a quiet machine, as the benchmark; it publishes nothing.
'use strict';
const fs = require('node:fs');
const os = require('node:os');
const path = require('node:path');
const { spawn } = require('node:child_process');
const L = require('./lib.cjs');

/** The options, read by L.readOptions: option -> [key, kind]. */
const OPTIONS = {
  '--impl': ['impl', 'text', L.IMPLS],
  '--shape': ['shape', 'text', L.SHAPES],
  '--conc': ['conc', 'whole >= 1'],
  '--per-conn': ['perConn', 'whole >= 1'],
  '--client': ['client', 'text', L.CLIENTS],
  '--rounds': ['rounds', 'whole >= 1'],
  '--seconds': ['seconds', 'number > 0'],
  '--warmup': ['warmup', 'number >= 0'],
  '--top': ['top', 'whole >= 1'],
  '--cpu-prof': ['cpuProf', 'text'],
  '--syscalls': ['syscalls', 'flag'],
  '--pin': ['pin', 'flag'],
  '--json': ['json', 'text'],
};

function parseArgs(argv) {
  const o = { impl: 'ts', shape: 's3', conc: 8, perConn: 1, client: 'epoll', rounds: 3, seconds: 3, warmup: 0.3, top: 25, syscalls: false };
  Object.assign(o, L.readOptions(argv, OPTIONS, 'bench/profile.cjs'));
  if (o.cpuProf) o.cpuProf = path.resolve(o.cpuProf);
  if (o.json) o.json = path.resolve(o.json);
  if (o.cpuProf && o.impl !== 'node' && o.impl !== 'ts') throw new L.OptionError(`--cpu-prof profiles JavaScript: --impl must be node or ts, not ${o.impl}`);
  if (o.pin && os.availableParallelism() < 2) throw new L.OptionError(`--pin puts the milter and the load generator on CPUs of their own: it needs 2 CPUs, this process may use ${os.availableParallelism()}`);
  return o;
}

/**
 * Sum a V8 CPU profile by function: self samples, and inclusive samples
 * (each sample counted once per function on its stack, however deep the
 * recursion). Percentages are of all samples; `(idle)`, `(program)` and
 * `(garbage collector)` are V8's own nodes and are listed too. `(idle)` is
 * whatever the thread did between libuv's prepare and check phases outside
 * JavaScript (Node marks the isolate idle there while profiling): the wait
 * in epoll_wait, and also the read system calls and the C++ of the I/O
 * callbacks. On a busy milter it was 55 to 68 % of the samples while
 * /proc showed the thread 94 % busy, so it measures no idleness.
 */
function summarizeProfile(profile, top = 25) {
  const byId = new Map(profile.nodes.map((n) => [n.id, n]));
  const parent = new Map();
  for (const n of profile.nodes) for (const c of n.children ?? []) parent.set(c, n.id);
  const hits = new Map();
  for (const id of profile.samples) hits.set(id, (hits.get(id) ?? 0) + 1);
  const name = (n) => {
    const f = n.callFrame;
    const where = f.url ? ` ${f.url.replace(/^file:\/\//, '').replace(/^.*\/(dist|node_modules)\//, '$1/')}:${f.lineNumber + 1}` : '';
    return `${f.functionName || '(anonymous)'}${where}`;
  };
  const self = new Map();
  const inclusive = new Map();
  for (const [id, count] of hits) {
    const k = name(byId.get(id));
    self.set(k, (self.get(k) ?? 0) + count);
    const seen = new Set();
    for (let x = id; x !== undefined; x = parent.get(x)) {
      const kx = name(byId.get(x));
      if (seen.has(kx)) continue;
      seen.add(kx);
      inclusive.set(kx, (inclusive.get(kx) ?? 0) + count);
    }
  }
  const total = profile.samples.length;
  const pick = (m) =>
    [...m]
      .sort((a, b) => b[1] - a[1])
      .slice(0, top)
      .map(([fn, n]) => ({ fn, samples: n, pct: total ? (100 * n) / total : 0 }));
  const share = (k) => (total ? (100 * (self.get(k) ?? 0)) / total : 0);
  const spanUs = profile.endTime - profile.startTime;
  return {
    samples: total,
    intervalUs: total ? spanUs / total : 0,
    idlePct: share('(idle)'),
    gcPct: share('(garbage collector)'),
    self: pick(self),
    inclusive: pick(inclusive).filter((r) => r.fn !== '(root)'),
  };
}

/** The rows of `strace -c` output: syscall, calls, errors. Throws if there are none. */
function parseStraceSummary(text) {
  const rows = [];
  for (const line of text.split('\n')) {
    const f = line.trim().split(/\s+/);
    // % time, seconds, usecs/call, calls, [errors,] syscall
    if ((f.length === 5 || f.length === 6) && /^\d+\.\d+$/.test(f[0]) && /^\d+$/.test(f[3]) && f[f.length - 1] !== 'total') {
      rows.push({ syscall: f[f.length - 1], calls: Number(f[3]), errors: f.length === 6 ? Number(f[4]) : 0 });
    }
  }
  if (!rows.length) throw new Error(`strace -c wrote no table:\n${text.slice(0, 500)}`);
  return rows.sort((a, b) => b.calls - a.calls);
}

function loadOpts(o, extra = {}) {
  return { conc: o.conc, perConn: o.perConn, client: o.client, ...(o.pin ? { cpus: LOADGEN_CPU } : {}), ...extra };
}

/** --pin: the milter's CPU and the load generator's. */
const MILTER_CPU = '0';
const LOADGEN_CPU = '1';

function checkRun(r, what) {
  if (r.errors || r.bad || !r.messages || r.exitCode !== 0) {
    throw new Error(`${what}: the load generator reported ${r.errors} errors, ${r.bad} bad replies, ${r.messages} messages (exit ${r.exitCode}): ${r.first_error || r.stderr}`);
  }
}

async function underStrace(m, o) {
  const out = `${L.socketFor(`strace-${o.impl}`).replace(/^unix:/, '')}.txt`;
  const st = spawn('strace', ['-c', '-f', '-p', String(m.pid), '-o', out], { stdio: ['ignore', 'ignore', 'pipe'] });
  let err = '';
  st.stderr.on('data', (d) => (err += d));
  const started = await new Promise((resolve) => {
    st.once('error', (e) => resolve(e));
    setTimeout(() => resolve(null), 500); // strace attaches to every thread
  });
  if (started) throw new Error(`strace did not start (${started.message}); apt-get install strace`);
  if (st.exitCode !== null) throw new Error(`strace exited at once: ${err}`);
  const r = await L.runLoadgen(m.socket, loadOpts(o, { seconds: o.seconds, timeout: 60 }));
  st.kill('SIGINT');
  await new Promise((resolve) => (st.exitCode !== null ? resolve() : st.once('exit', resolve)));
  checkRun(r, 'the round under strace');
  const rows = parseStraceSummary(fs.readFileSync(out, 'utf8'));
  fs.rmSync(out, { force: true });
  return { messages: r.messages, rate: r.rate, perMessage: rows.map((x) => ({ ...x, perMsg: x.calls / r.messages })) };
}

async function stopProfiled(m, file) {
  fs.rmSync(file, { force: true });
  const exited = new Promise((resolve) => (m.alive() ? m.child.once('exit', resolve) : resolve()));
  m.child.kill('SIGUSR2');
  let timer;
  await Promise.race([exited, new Promise((resolve) => (timer = setTimeout(resolve, 30_000)))]);
  clearTimeout(timer);
  if (!fs.existsSync(file)) throw new Error(`the milter wrote no CPU profile to ${file}: ${m.stderr()}`);
  return JSON.parse(fs.readFileSync(file, 'utf8'));
}

async function main() {
  const o = parseArgs(process.argv.slice(2));
  const env = {};
  if (o.cpuProf) {
    env.NODE_OPTIONS = [process.env.NODE_OPTIONS, `--require ${path.join(__dirname, 'profile-preload.cjs')}`].filter(Boolean).join(' ');
    env.NODEMILTER_CPU_PROFILE = o.cpuProf;
  }
  const cell = `${o.impl} ${o.shape} c${o.conc} ${o.perConn}/conn ${o.client}`;
  const m = await L.startMilter(o.impl, o.shape, L.socketFor(`profile-${o.impl}-${o.shape}`), env);
  const result = { cell, options: { ...o }, machine: L.machine(), rounds: [] };
  if (o.pin) {
    result.pinned = { milter: L.pinProcess(m.pid, MILTER_CPU), loadGenerator: LOADGEN_CPU };
    console.log(`${cell}: pinned (taskset): every thread of the milter to CPU ${result.pinned.milter}, the load generator to CPU ${LOADGEN_CPU}`);
  }
  if (o.cpuProf) console.log(`${cell}: V8's profiler samples the milter from its start, so the rounds' msg/s and CPU below include its cost (a signal per sample); for the milter's own figures run without --cpu-prof`);
  try {
    for (let i = 0; i < o.rounds; i++) {
      const c0 = L.cpuTimes(m.pid);
      const j0 = L.cpuTimes(m.pid, m.pid);
      const t0 = performance.now();
      const r = await L.runLoadgen(m.socket, loadOpts(o, { seconds: o.seconds, warmup: o.warmup }));
      const wallS = (performance.now() - t0) / 1000;
      const c1 = L.cpuTimes(m.pid);
      const j1 = L.cpuTimes(m.pid, m.pid);
      checkRun(r, `round ${i + 1}`);
      const round = {
        rate: r.rate,
        messages: r.messages,
        p50Us: r.p50_us,
        userUsPerMsg: ((c1.user - c0.user) / r.messages) * 1e6,
        sysUsPerMsg: ((c1.sys - c0.sys) / r.messages) * 1e6,
        threads: L.threads(m.pid),
        // The main thread's CPU over the round (warm-up included) as a share
        // of the round's wall time: for node and ts, the JavaScript thread.
        mainThreadPct: ((j1.user + j1.sys - j0.user - j0.sys) / wallS) * 100,
      };
      result.rounds.push(round);
      console.log(
        `${cell} round ${i + 1}: ${r.rate.toFixed(0)} msg/s, cpu ${(round.userUsPerMsg + round.sysUsPerMsg).toFixed(1)} us/msg ` +
          `(user ${round.userUsPerMsg.toFixed(1)}, system ${round.sysUsPerMsg.toFixed(1)}), p50 ${(r.p50_us / 1000).toFixed(2)} ms, ${round.threads} threads, ` +
          `main thread busy ${round.mainThreadPct.toFixed(0)} % of the round`,
      );
    }
    if (o.cpuProf) {
      const sum = summarizeProfile(await stopProfiled(m, o.cpuProf), o.top);
      result.profile = { file: o.cpuProf, ...sum };
      console.log(
        `${cell} CPU profile of the JavaScript thread, whole run (${sum.samples} samples, one per ${sum.intervalUs.toFixed(0)} us on average): ` +
          `(idle) ${sum.idlePct.toFixed(1)} %, garbage collector ${sum.gcPct.toFixed(1)} %; written to ${o.cpuProf}`,
      );
      console.log(
        `  (V8's "(idle)" is the event loop's poll phase outside JavaScript: epoll_wait, but also the reads and libuv's and ` +
          `Node's C++ work before a callback. It is not idleness: the main thread's busy share per round is above.)`,
      );
      for (const [title, rows] of [['self', sum.self], ['inclusive', sum.inclusive]]) {
        console.log(`  -- ${title}, % of all samples`);
        for (const r of rows) console.log(`  ${r.pct.toFixed(1).padStart(5)}  ${r.fn}`);
      }
    }
    if (o.syscalls) {
      // Under --cpu-prof the milter takes a signal per sample (tgkill,
      // rt_sigreturn, rt_sigprocmask, getpid and futex calls in strace's
      // count), which are the profiler's, not the milter's: count on a
      // second milter without the profiler, warmed by one unmeasured run.
      const separate = Boolean(o.cpuProf);
      const traced = separate ? await L.startMilter(o.impl, o.shape, L.socketFor(`profile-plain-${o.impl}-${o.shape}`)) : m;
      try {
        if (separate) {
          if (o.pin) L.pinProcess(traced.pid, MILTER_CPU);
          checkRun(await L.runLoadgen(traced.socket, loadOpts(o, { seconds: 1, warmup: o.warmup })), 'the warm-up of the milter for strace');
        }
        result.syscalls = { ...(await underStrace(traced, o)), separateMilter: separate };
      } finally {
        if (separate) await traced.stop();
      }
      console.log(
        `${cell} under strace -c -f${separate ? ' (a second milter, without the profiler)' : ''}: ${result.syscalls.messages} messages ` +
          `(${result.syscalls.rate.toFixed(0)} msg/s, slowed by strace); system calls per message:`,
      );
      for (const s of result.syscalls.perMessage.slice(0, o.top)) {
        console.log(`  ${s.syscall.padEnd(16)} ${s.perMsg.toFixed(2).padStart(8)}${s.errors ? `  (${s.errors} failed)` : ''}`);
      }
      const all = result.syscalls.perMessage.reduce((a, s) => a + s.perMsg, 0);
      console.log(`  ${'all'.padEnd(16)} ${all.toFixed(2).padStart(8)}`);
    }
  } finally {
    await m.stop();
  }
  if (o.json) fs.writeFileSync(o.json, `${JSON.stringify(result, null, 2)}\n`);
}

module.exports = { parseArgs, summarizeProfile, parseStraceSummary };

if (require.main === module) {
  main().then(
    () => process.exit(0),
    (err) => {
      console.error(L.errorText(err));
      process.exit(1);
    },
  );
}
