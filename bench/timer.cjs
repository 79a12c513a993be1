// npm run bench:timer [-- --n N --ms MS]
// How long a wait of MS milliseconds (default 2, S4's wait in EOM) really
// takes: Node's setTimeout, which the S4 milter of both nodemilter engines
// awaits, against Python's time.sleep, which pymilter's S4 calls on
// libmilter's worker (the C milter's nanosleep is the same system call,
// clock_nanosleep). N waits each (default 500), one after another, on an
// otherwise idle process; prints the median, the 10th and 90th percentiles
// and the mean of the real delay in us, and Node's median over Python's.
// Run it on a quiet machine, like the other benchmarks.
'use strict';
const { execFileSync } = require('node:child_process');
const L = require('./lib.cjs');

function parseArgs(argv) {
  const o = { n: 500, ms: 2 };
  for (let i = 0; i < argv.length; i++) {
    const a = argv[i];
    const v = Number(argv[++i]);
    if (a !== '--n' && a !== '--ms') throw new Error(`unknown option ${a}; see the comment at the top of bench/timer.cjs`);
    if (!Number.isFinite(v) || v <= 0 || (a === '--n' && !Number.isInteger(v))) throw new Error(`${a} needs a ${a === '--n' ? 'whole ' : ''}number > 0, got ${argv[i]}`);
    o[a.slice(2)] = v;
  }
  return o;
}

/** Real delays of n awaited setTimeout(ms), in us. */
async function nodeDelays(n, ms) {
  const out = [];
  for (let i = 0; i < n; i++) {
    const t0 = process.hrtime.bigint();
    await new Promise((resolve) => setTimeout(resolve, ms));
    out.push(Number(process.hrtime.bigint() - t0) / 1000);
  }
  return out;
}

/** Real delays of n time.sleep(ms / 1000) in Python, in us. */
function pythonDelays(n, ms) {
  const src =
    'import sys, time, json\n' +
    'n, s = int(sys.argv[1]), float(sys.argv[2]) / 1000\n' +
    'out = []\n' +
    'for _ in range(n):\n' +
    '    t0 = time.perf_counter_ns()\n' +
    '    time.sleep(s)\n' +
    '    out.append((time.perf_counter_ns() - t0) / 1000)\n' +
    'print(json.dumps(out))\n';
  return JSON.parse(execFileSync(L.PYTHON, ['-c', src, String(n), String(ms)], { encoding: 'utf8' }));
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
  const node = stats(await nodeDelays(o.n, o.ms));
  const py = stats(pythonDelays(o.n, o.ms));
  const row = (name, s) => `| ${name} | ${s.n} | ${s.median.toFixed(0)} | ${s.p10.toFixed(0)} | ${s.p90.toFixed(0)} | ${s.mean.toFixed(0)} |`;
  console.log(`A wait of ${o.ms} ms, real delay in us (${new Date().toISOString().slice(0, 16)}Z, Node ${process.version}):\n`);
  console.log('| wait | n | median | p10 | p90 | mean |');
  console.log('|---|---|---|---|---|---|');
  console.log(row(`Node setTimeout(${o.ms})`, node));
  console.log(row(`Python time.sleep(${o.ms / 1000})`, py));
  console.log(`\nNode's median over Python's: ${(node.median / py.median).toFixed(3)} (${(node.median - py.median).toFixed(0)} us more per wait).`);
  return { node, py };
}

module.exports = { parseArgs, stats };

if (require.main === module)
  main().then(
    () => process.exit(0),
    (err) => {
      console.error(err.stack || String(err));
      process.exit(1);
    },
  );
