// npm run bench:timer [-- --n N --ms MS --chains K --wake-us U]
// How long a wait of MS milliseconds (default 2, S4's wait in EOM) really
// takes: Node's setTimeout, which the S4 milter of both nodemilter engines
// awaits, against Python's time.sleep, which pymilter's S4 calls on
// libmilter's worker (the C milter's nanosleep is the same system call,
// clock_nanosleep). K chains (default 1) of N waits each (default 500), a
// chain's waits one after another; the chains start MS / K apart, so K
// waits are in flight at once, staggered, as in S4 at K connections: in
// Node K chains of timers on one event loop, in Python K threads (as
// libmilter runs one worker per connection). Prints the median, the 10th
// and 90th percentiles and the mean of the real delay in us, and Node's
// median over Python's. --wake-us U also wakes Node's event loop by I/O
// every U us (a child process writes a byte to a pipe it reads), as a
// milter's loop is woken by its other connections between its timers;
// Python's sleeping threads are not affected by I/O elsewhere, so only
// Node's side has it. Run it on a quiet machine, like the other benchmarks.
'use strict';
const { execFileSync, spawn } = require('node:child_process');
const L = require('./lib.cjs');

/** The options, read by L.readOptions: option -> [key, kind]. --wake-us 0, the default: no waking. */
const OPTIONS = {
  '--n': ['n', 'whole >= 1'],
  '--ms': ['ms', 'number > 0'],
  '--chains': ['chains', 'whole >= 1'],
  '--wake-us': ['wakeUs', 'number >= 0'],
};

function parseArgs(argv) {
  return { n: 500, ms: 2, chains: 1, wakeUs: 0, ...L.readOptions(argv, OPTIONS, 'bench/timer.cjs') };
}

const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

/** Real delays of `chains` chains of n awaited setTimeout(ms) each, the chains started ms / chains apart, in us; the loop woken by I/O every wakeUs us when > 0. */
async function nodeDelays(n, ms, chains, wakeUs) {
  const out = [];
  const chain = async (k) => {
    const start = process.hrtime.bigint() + BigInt(Math.round(((k * ms) / chains) * 1e6));
    // stagger the chains by turns of the event loop (each turn updates the loop's clock, which a timer starts from)
    while (process.hrtime.bigint() < start) await new Promise((resolve) => setImmediate(resolve));
    for (let i = 0; i < n; i++) {
      const t0 = process.hrtime.bigint();
      await sleep(ms);
      out.push(Number(process.hrtime.bigint() - t0) / 1000);
    }
  };
  const waker = wakeUs > 0 ? wake(wakeUs) : null;
  try {
    const running = [];
    for (let k = 0; k < chains; k++) running.push(chain(k));
    await Promise.all(running);
  } finally {
    if (waker) waker.kill('SIGKILL');
  }
  return out;
}

/** A child that writes a byte every `us` microseconds to a pipe this process reads: I/O that wakes the event loop. */
function wake(us) {
  const child = spawn(L.PYTHON, ['-c', 'import os, sys, time\ns = float(sys.argv[1]) / 1e6\nwhile True:\n    os.write(1, b"x")\n    time.sleep(s)\n', String(us)], {
    stdio: ['ignore', 'pipe', 'inherit'],
  });
  child.stdout.on('data', () => {});
  child.on('error', () => {});
  return child;
}

/** The same in Python: `chains` threads, each n time.sleep(ms / 1000), started ms / chains apart, in us. */
function pythonDelays(n, ms, chains) {
  const src =
    'import sys, time, json, threading\n' +
    'n, s, k = int(sys.argv[1]), float(sys.argv[2]) / 1000, int(sys.argv[3])\n' +
    'out = []\n' +
    'lock = threading.Lock()\n' +
    'def chain(j):\n' +
    '    start = time.perf_counter() + j * s / k\n' +
    '    while time.perf_counter() < start: pass\n' +
    '    mine = []\n' +
    '    for _ in range(n):\n' +
    '        t0 = time.perf_counter_ns()\n' +
    '        time.sleep(s)\n' +
    '        mine.append((time.perf_counter_ns() - t0) / 1000)\n' +
    '    with lock: out.extend(mine)\n' +
    'ts = [threading.Thread(target=chain, args=(j,)) for j in range(k)]\n' +
    'for t in ts: t.start()\n' +
    'for t in ts: t.join()\n' +
    'print(json.dumps(out))\n';
  return JSON.parse(execFileSync(L.PYTHON, ['-c', src, String(n), String(ms), String(chains)], { encoding: 'utf8', maxBuffer: 64 << 20 }));
}

function quantile(xs, q) {
  const s = [...xs].sort((a, b) => a - b);
  return s[Math.min(s.length - 1, Math.max(0, Math.round(q * (s.length - 1))))];
}

function stats(xs) {
  return { median: L.median(xs), p10: quantile(xs, 0.1), p90: quantile(xs, 0.9), mean: xs.reduce((a, b) => a + b, 0) / xs.length, n: xs.length };
}

async function main() {
  const o = parseArgs(process.argv.slice(2));
  const node = stats(await nodeDelays(o.n, o.ms, o.chains, o.wakeUs));
  const py = stats(pythonDelays(o.n, o.ms, o.chains));
  const row = (name, s) => `| ${name} | ${s.n} | ${s.median.toFixed(0)} | ${s.p10.toFixed(0)} | ${s.p90.toFixed(0)} | ${s.mean.toFixed(0)} |`;
  const chains =
    (o.chains > 1 ? `, ${o.chains} chains started ${((o.ms / o.chains) * 1000).toFixed(0)} us apart` : '') +
    (o.wakeUs > 0 ? `, Node's loop woken by I/O every ${o.wakeUs} us` : '');
  console.log(`A wait of ${o.ms} ms, real delay in us (${new Date().toISOString().slice(0, 16)}Z, Node ${process.version}${chains}):\n`);
  console.log('| wait | n | median | p10 | p90 | mean |');
  console.log('|---|---|---|---|---|---|');
  console.log(row(`Node setTimeout(${o.ms})`, node));
  console.log(row(`Python time.sleep(${o.ms / 1000})`, py));
  const d = node.median - py.median;
  console.log(`\nNode's median over Python's: ${(node.median / py.median).toFixed(3)} (${Math.abs(d).toFixed(0)} us ${d >= 0 ? 'longer' : 'shorter'} per wait).`);
  return { node, py };
}

module.exports = { parseArgs, stats };

if (require.main === module)
  main().then(
    () => process.exit(0),
    (err) => {
      console.error(L.errorText(err));
      process.exit(1);
    },
  );
