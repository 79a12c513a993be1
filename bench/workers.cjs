// node bench/workers.cjs [--rounds N] [--seconds S] [--shapes s2,s3] [--conc 64] [--workers 1,2]
//                        [--engines libmilter,node] [--json FILE] [--quick]
// runmilter's `workers` in one run: the nodemilter milter of each shape
// (bench/milters/node.cjs, served by runmilter with NODEMILTER_WORKERS=N) on
// each engine (NODEMILTER_ENGINE) with 1 and 2 workers, beside the C milter
// on libmilter, under the C load generator at concurrency 64. Rounds are
// interleaved, the order rotating per round; prints medians over the rounds,
// the ratio workers=2 / workers=1 per engine, and node/C. CPU is summed over
// the supervisor and its workers.
'use strict';
const fs = require('node:fs');
const L = require('./lib.cjs');

/** The options, read by L.readOptions: option -> [key, kind]. */
const OPTIONS = {
  '--quick': ['quick', 'flag'],
  '--rounds': ['rounds', 'whole >= 1'],
  '--seconds': ['seconds', 'number > 0'],
  '--shapes': ['shapes', 'list', L.SHAPES],
  '--conc': ['conc', 'wholes >= 1'],
  '--workers': ['workers', 'wholes >= 1'],
  '--engines': ['engines', 'list', ['libmilter', 'node']],
  '--json': ['json', 'text'],
};

function parseArgs(argv) {
  const o = L.readOptions(argv, OPTIONS, 'bench/workers.cjs');
  o.rounds ??= o.quick ? 1 : 5;
  o.seconds ??= o.quick ? 1 : 4;
  o.shapes ??= ['s2', 's3'];
  o.conc ??= [64];
  o.workers ??= [1, 2];
  o.engines ??= ['libmilter', 'node'];
  return o;
}

/** The supervisor's worker pids (its children). */
function children(pid) {
  try {
    const t = fs.readFileSync(`/proc/${pid}/task/${pid}/children`, 'utf8').trim();
    return t ? t.split(/\s+/).map(Number) : [];
  } catch {
    return [];
  }
}

const cpuOf = (pids) => pids.reduce((s, p) => {
  try {
    return s + L.cpuSeconds(p);
  } catch {
    return s; // gone
  }
}, 0);

/** One milter to measure: C, or nodemilter on an engine with N workers. */
async function start(cell, shape) {
  const socket = L.socketFor(`${cell.name}-${shape}`);
  if (cell.impl === 'c') return { ...(await L.startMilter('c', shape, socket)), pids: (m) => [m.pid] };
  const m = await L.startMilter('node', shape, socket, { NODEMILTER_WORKERS: String(cell.workers), NODEMILTER_ENGINE: cell.engine });
  // The socket accepts once the first worker listens: wait for all of them.
  const until = Date.now() + 20_000;
  while (children(m.pid).length < cell.workers) {
    if (Date.now() > until) throw new Error(`${cell.name} ${shape}: ${children(m.pid).length} of ${cell.workers} workers after 20 s:\n${m.stderr()}`);
    await L.sleep(50);
  }
  await L.sleep(1000);
  return { ...m, pids: () => [m.pid, ...children(m.pid)] };
}

async function main() {
  const o = parseArgs(process.argv.slice(2));
  L.loadgenPath();
  L.cMilterPath();
  const cells = [{ name: 'c', impl: 'c' }];
  for (const engine of o.engines) for (const workers of o.workers) cells.push({ name: `${engine === 'node' ? 'ts' : 'node'}-w${workers}`, impl: 'node', engine, workers });
  const results = [];
  const started = Date.now();
  for (let round = 0; round < o.rounds; round++) {
    for (const shape of o.shapes) {
      let turn = round;
      for (const conc of o.conc) {
        const order = cells.map((_, k) => cells[(k + turn) % cells.length]);
        turn++;
        for (const cell of order) {
          // One milter at a time: workers=2 must have both cores to itself.
          const m = await start(cell, shape);
          try {
            const pids = m.pids(m);
            const cpu0 = cpuOf(pids);
            const t0 = process.hrtime.bigint();
            const r = await L.runLoadgen(m.socket, { conc, perConn: 100, seconds: o.seconds, warmup: 0.3 });
            const cpu = cpuOf(pids) - cpu0;
            const wallS = Number(process.hrtime.bigint() - t0) / 1e9;
            if (r.errors || r.bad) console.error(`! ${cell.name} ${shape} c${conc}: ${r.errors} errors, ${r.bad} bad (${r.first_error})`);
            // wallS and both CPU figures cover the warm-up too.
            results.push({ round, shape, conc, cell: cell.name, ...r, milterCpuS: cpu, wallS });
            process.stderr.write(
              `round ${round + 1}/${o.rounds} ${shape} c${conc} ${cell.name.padEnd(7)} ${r.rate.toFixed(0).padStart(6)} msg/s ` +
                `p50 ${(r.p50_us / 1000).toFixed(2)} ms p99 ${(r.p99_us / 1000).toFixed(2)} ms cpu ${((cpu / Math.max(r.messages, 1)) * 1e6).toFixed(0)} us/msg\n`,
            );
          } finally {
            const workers = children(m.pid);
            await m.stop();
            for (const p of workers) {
              try {
                process.kill(p, 'SIGKILL');
              } catch {
                /* gone */
              }
            }
          }
        }
      }
    }
  }
  const mach = L.machine();
  console.log(
    `Machine: ${mach.cpu}, ${mach.cores} cores, Linux ${mach.kernel}; Node ${mach.node}; libmilter ${mach.libmilter}.\n` +
      `Run: ${new Date().toISOString().slice(0, 16)}Z, ${o.rounds} rounds of ${o.seconds} s per cell (+0.3 s warm-up), ` +
      `${((Date.now() - started) / 1000).toFixed(0)} s in all. Medians over rounds; ratios are medians of per-round ratios.\n`,
  );
  console.log(summarize(results, cells, o));
  if (o.json) fs.writeFileSync(o.json, JSON.stringify({ machine: mach, options: o, results }, null, 1));
}

/** The median over rounds of cell a's msg/s over cell b's in the same round. */
function roundRatio(cell, a, b) {
  return L.median(
    [...new Set(cell.map((r) => r.round))].map((round) => {
      const x = cell.find((r) => r.round === round && r.cell === a);
      const y = cell.find((r) => r.round === round && r.cell === b);
      return x && y ? x.rate / y.rate : NaN;
    }),
  );
}

function summarize(results, cells, o) {
  const lines = [];
  const names = cells.map((c) => c.name);
  const ratioCols = o.engines.flatMap((e) => {
    const pre = e === 'node' ? 'ts' : 'node';
    const ws = o.workers.filter((w) => w !== 1);
    return [...ws.map((w) => [`${pre}-w${w}`, `${pre}-w1`]), ...o.workers.map((w) => [`${pre}-w${w}`, 'c'])];
  });
  lines.push(`| shape | conc | ${names.map((n) => `${n} msg/s`).join(' | ')} | ${ratioCols.map(([a, b]) => `${a}/${b}`).join(' | ')} | p99 ms ${names.join(' / ')} |`);
  lines.push(`|${'---|'.repeat(2 + names.length + ratioCols.length + 1)}`);
  for (const shape of o.shapes) {
    for (const conc of o.conc) {
      const cell = results.filter((r) => r.shape === shape && r.conc === conc);
      const med = (name, f) => L.median(cell.filter((r) => r.cell === name).map(f));
      const ratio = (a, b) => roundRatio(cell, a, b);
      lines.push(
        `| ${shape} | ${conc} | ${names.map((n) => med(n, (r) => r.rate).toFixed(0)).join(' | ')} | ` +
          `${ratioCols.map(([a, b]) => ratio(a, b).toFixed(2)).join(' | ')} | ${names.map((n) => (med(n, (r) => r.p99_us) / 1000).toFixed(1)).join(' / ')} |`,
      );
    }
  }
  // The most a second worker can give on this machine: with workers=1 the
  // milter and the load generator together use some share of the cores; at
  // the same CPU per message (milter and load generator), workers=2 can at
  // best fill all of them. (The cost per message rises with more processes
  // on the same cores, so the real bound is lower.)
  const cores = L.machine().cores;
  lines.push('');
  lines.push(`| shape | conc | engine | w1: milter cores | w1: load generator cores | w2/w1 at most on ${cores} cores | w2/w1 measured |`);
  lines.push('|---|---|---|---|---|---|---|');
  for (const shape of o.shapes) {
    for (const conc of o.conc) {
      const cell = results.filter((r) => r.shape === shape && r.conc === conc);
      for (const e of o.engines) {
        const pre = e === 'node' ? 'ts' : 'node';
        const w1 = cell.filter((r) => r.cell === `${pre}-w1`);
        if (!w1.length || !o.workers.includes(2)) continue;
        const milter = L.median(w1.map((r) => r.milterCpuS / r.wallS));
        const lg = L.median(w1.map((r) => r.loadgen_cpu_s / r.wallS));
        const measured = roundRatio(cell, `${pre}-w2`, `${pre}-w1`);
        lines.push(`| ${shape} | ${conc} | ${pre} | ${milter.toFixed(2)} | ${lg.toFixed(2)} | ${(cores / (milter + lg)).toFixed(2)} | ${measured.toFixed(2)} |`);
      }
    }
  }
  return lines.join('\n');
}

main().catch((err) => {
  console.error(L.errorText(err));
  process.exitCode = 1;
});
