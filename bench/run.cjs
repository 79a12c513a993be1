// npm run bench [-- --quick] [-- --rounds N --seconds S --shapes s1,s2 --conc 1,8,64 --modes many,one --impls c,py,node
//                 --json FILE --doc]
// Runs the milter implementations (C libmilter, pymilter, nodemilter) of
// each shape interleaved: every round starts one milter per implementation,
// then runs each cell (concurrency x messages per connection) against the
// three in a rotating order. Prints medians over the rounds and the ratios.
// --doc rewrites the table in docs/performance.md.
'use strict';
const fs = require('node:fs');
const path = require('node:path');
const L = require('./lib.cjs');

function parseArgs(argv) {
  const o = { quick: false, doc: false };
  for (let i = 0; i < argv.length; i++) {
    const a = argv[i];
    const val = () => {
      if (i + 1 >= argv.length) throw new Error(`${a} needs a value`);
      return argv[++i];
    };
    if (a === '--quick') o.quick = true;
    else if (a === '--doc') o.doc = true;
    else if (a === '--rounds') o.rounds = Number(val());
    else if (a === '--seconds') o.seconds = Number(val());
    else if (a === '--shapes') o.shapes = val().split(',');
    else if (a === '--conc') o.conc = val().split(',').map(Number);
    else if (a === '--modes') o.modes = val().split(',');
    else if (a === '--impls') o.impls = val().split(',');
    else if (a === '--json') o.json = val();
    else throw new Error(`unknown option ${a}; see the comment at the top of bench/run.cjs`);
  }
  o.rounds ??= o.quick ? 3 : 5;
  o.seconds ??= o.quick ? 1.2 : 3;
  o.shapes ??= L.SHAPES;
  o.conc ??= [1, 8, 64];
  o.modes ??= o.quick ? ['many'] : ['many', 'one'];
  o.impls ??= L.availableImpls();
  for (const s of o.shapes) if (!L.SHAPES.includes(s)) throw new Error(`unknown shape ${s}: expected ${L.SHAPES.join(', ')}`);
  for (const m of o.modes) if (m !== 'many' && m !== 'one') throw new Error(`unknown mode ${m}: expected many or one`);
  for (const i of o.impls) if (!L.IMPLS.includes(i)) throw new Error(`unknown implementation ${i}: expected ${L.IMPLS.join(', ')}`);
  return o;
}

const PER_CONN = { many: 100, one: 1 };

// Targets of issue 7: node/C at least this much (concurrency 1; 8 and 64).
const TARGET_C = { s1: [0.6, 0.6], s2: [0.9, 0.8], s3: [0.9, 0.8], s4: [null, null] };
function targetC(shape, conc) {
  if (shape === 's4') return conc === 64 ? 0.9 : null;
  return TARGET_C[shape][conc === 1 ? 0 : 1];
}

async function main() {
  const o = parseArgs(process.argv.slice(2));
  L.loadgenPath();
  L.cMilterPath();
  const started = Date.now();
  const results = []; // one per (round, shape, conc, mode, impl)
  for (let round = 0; round < o.rounds; round++) {
    for (const shape of o.shapes) {
      const milters = {};
      for (const impl of o.impls) milters[impl] = await L.startMilter(impl, shape, L.socketFor(`${impl}-${shape}`));
      let turn = round;
      for (const conc of o.conc) {
        for (const mode of o.modes) {
          const order = o.impls.map((_, k) => o.impls[(k + turn) % o.impls.length]);
          turn++;
          for (const impl of order) {
            const m = milters[impl];
            if (!m.alive()) throw new Error(`${impl} ${shape} milter died:\n${m.stderr()}`);
            L.resetPeak(m.pid);
            const cpu0 = L.cpuSeconds(m.pid);
            const r = await L.runLoadgen(m.socket, { conc, perConn: PER_CONN[mode], seconds: o.seconds, warmup: 0.3 });
            const cpu = L.cpuSeconds(m.pid) - cpu0;
            const st = L.procStatus(m.pid);
            const row = { round, shape, conc, mode, impl, ...r, peakRssKiB: st.VmHWM, milterCpuS: cpu, threads: L.threads(m.pid) };
            if (r.errors || r.bad) {
              console.error(`! ${impl} ${shape} c${conc} ${mode}: ${r.errors} errors, ${r.bad} bad (${r.first_error})`);
            }
            results.push(row);
            process.stderr.write(
              `round ${round + 1}/${o.rounds} ${shape} c${conc} ${mode.padEnd(4)} ${impl.padEnd(4)} ${r.rate.toFixed(0).padStart(6)} msg/s ` +
                `p50 ${(r.p50_us / 1000).toFixed(2)} ms p99 ${(r.p99_us / 1000).toFixed(2)} ms rss ${(st.VmHWM / 1024).toFixed(0)} MB ` +
                `cpu ${((cpu / Math.max(r.messages, 1)) * 1e6).toFixed(0)} us/msg loadgen ${((r.loadgen_cpu_s / (o.seconds + 0.3)) * 100).toFixed(0)}%\n`,
            );
          }
        }
      }
      for (const impl of o.impls) await milters[impl].stop();
    }
  }
  const table = summarize(results, o);
  const elapsed = (Date.now() - started) / 1000;
  const mach = L.machine();
  const header =
    `Machine: ${mach.cpu}, ${mach.cores} cores, ${mach.memGiB} GiB, Linux ${mach.kernel}; Node ${mach.node}; ` +
    `Python ${mach.python.replace(' ', ', pymilter ')}; libmilter ${mach.libmilter}.\n` +
    `Run: ${new Date().toISOString().slice(0, 16)}Z, ${o.rounds} interleaved rounds of ${o.seconds} s per cell (+0.3 s warm-up), ` +
    `${elapsed.toFixed(0)} s in all${o.quick ? ' (--quick)' : ''}. Medians over rounds; ratios are medians of the per-round ratios.\n`;
  console.log(header);
  console.log(table.text);
  if (o.json) fs.writeFileSync(o.json, JSON.stringify({ machine: mach, options: o, results }, null, 1));
  if (o.doc) writeDoc(header + '\n' + table.text);
}

const LABEL = { c: 'C', py: 'py', node: 'node', ts: 'node/ts' };

function summarize(results, o) {
  const impls = o.impls;
  const has = (i) => impls.includes(i);
  // ratios of the nodemilter builds to C and to pymilter
  const pairs = ['node', 'ts'].filter(has).flatMap((n) => ['c', 'py'].filter(has).map((b) => [n, b]));
  const names = impls.map((i) => LABEL[i]).join(' / ');
  const lines = [];
  lines.push(
    `| shape | conc | msgs/conn | ${impls.map((i) => `${LABEL[i]} msg/s`).join(' | ')} | ` +
      `${pairs.map(([a, b]) => `${LABEL[a]}/${LABEL[b]}`).join(' | ')} | p50 ms ${names} | p99 ms ${names} | ` +
      `peak RSS MB ${names} | target node/C | met |`,
  );
  lines.push(`|${'---|'.repeat(3 + impls.length + pairs.length + 5)}`);
  const misses = [];
  for (const shape of o.shapes) {
    for (const conc of o.conc) {
      for (const mode of o.modes) {
        const cell = results.filter((r) => r.shape === shape && r.conc === conc && r.mode === mode);
        const by = (impl, f) => L.median(cell.filter((r) => r.impl === impl).map(f));
        const ratio = (a, b) =>
          L.median(
            [...new Set(cell.map((r) => r.round))].map((round) => {
              const x = cell.find((r) => r.round === round && r.impl === a);
              const y = cell.find((r) => r.round === round && r.impl === b);
              return x && y && y.rate ? x.rate / y.rate : NaN;
            }),
          );
        const fmt = (x, d) => (Number.isNaN(x) ? '-' : x.toFixed(d));
        const nc = has('node') && has('c') ? ratio('node', 'c') : NaN;
        const np = has('node') && has('py') ? ratio('node', 'py') : NaN;
        const t = targetC(shape, conc);
        const okC = t === null || !(nc < t);
        const okP = !(np < 1);
        const met = Number.isNaN(nc) && Number.isNaN(np) ? '-' : okC && okP ? 'yes' : 'NO';
        if (met === 'NO') misses.push(`${shape} c${conc} ${PER_CONN[mode]}/conn`);
        lines.push(
          `| ${shape.toUpperCase()} | ${conc} | ${PER_CONN[mode]} | ` +
            `${impls.map((i) => fmt(by(i, (r) => r.rate), 0)).join(' | ')} | ` +
            `${pairs.map(([a, b]) => fmt(ratio(a, b), 2)).join(' | ')} | ` +
            `${impls.map((i) => fmt(by(i, (r) => r.p50_us) / 1000, 2)).join(' / ')} | ` +
            `${impls.map((i) => fmt(by(i, (r) => r.p99_us) / 1000, 2)).join(' / ')} | ` +
            `${impls.map((i) => fmt(by(i, (r) => r.peakRssKiB) / 1024, 0)).join(' / ')} | ` +
            `${t === null ? '>= py' : `>= ${t}, >= py`} | ${met} |`,
        );
      }
    }
  }
  const errs = results.filter((r) => r.errors || r.bad);
  let text = lines.join('\n') + '\n';
  text += `\nTargets (for node, nodemilter on libmilter) missed: ${misses.length ? misses.join(', ') : 'none'}.`;
  text += `\nRuns with errors: ${errs.length ? errs.map((r) => `${r.impl} ${r.shape} c${r.conc} ${r.mode}: ${r.first_error}`).join('; ') : 'none'}.\n`;
  return { text, misses };
}

function writeDoc(block) {
  const doc = path.join(L.ROOT, 'docs/performance.md');
  const begin = '<!-- bench:table:begin -->';
  const end = '<!-- bench:table:end -->';
  const text = fs.readFileSync(doc, 'utf8');
  const a = text.indexOf(begin);
  const b = text.indexOf(end);
  if (a < 0 || b < a) throw new Error(`docs/performance.md lacks the ${begin} ... ${end} markers`);
  fs.writeFileSync(doc, text.slice(0, a + begin.length) + '\n' + block + text.slice(b));
  console.error(`updated ${doc}`);
}

main().then(
  () => process.exit(0),
  (err) => {
    console.error(err.stack || String(err));
    process.exit(1);
  },
);
