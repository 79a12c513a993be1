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

const loadgenPath = () => buildC('loadgen.c');
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

/** Run the load generator; resolves with its JSON result (plus `exitCode`, `stderr`). */
function runLoadgen(socket, o) {
  const args = ['-s', socket, '-c', String(o.conc ?? 1), '-m', String(o.perConn ?? 100), '-b', String(o.body ?? 2048)];
  if (o.messages) args.push('-n', String(o.messages));
  if (o.seconds) args.push('-d', String(o.seconds));
  if (o.warmup) args.push('-w', String(o.warmup));
  if (o.minHeaders !== undefined) args.push('-H', String(o.minHeaders));
  if (o.checkReplacedBody) args.push('-R');
  if (o.barrier) args.push('-B');
  args.push('-t', String(o.timeout ?? 30));
  return new Promise((resolve, reject) => {
    const child = spawn(loadgenPath(), args, { stdio: ['ignore', 'pipe', 'pipe'] });
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

/** CPU seconds (user + system) a process used so far, all threads. */
function cpuSeconds(pid) {
  const stat = fs.readFileSync(`/proc/${pid}/stat`, 'utf8');
  const f = stat.slice(stat.lastIndexOf(')') + 2).split(' ');
  return (Number(f[11]) + Number(f[12])) / clkTck();
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

module.exports = {
  BENCH, ROOT, PYTHON, IMPLS, availableImpls, nodemilterDist, SHAPES, buildC, loadgenPath, cMilterPath, milterCommand, socketFor, startMilter, runLoadgen,
  procStatus, resetPeak, cpuSeconds, threads, median, machine, sleep, killAll,
};
