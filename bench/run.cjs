// npm run bench [-- --quick] [-- --rounds N --seconds S --shapes s1,s2 --conc 1,8,64 --modes many,one --impls c,py,node,ts
//                 --clients epoll,threads --json FILE --doc [--doc-file FILE] --plan --remeasure N --quiet-wait S
//                 --canary-runs N --canary-seconds S --canary-between N --keep-going]
// npm run bench -- --render FILE [--doc [--doc-file FILE]]
// Runs the milter implementations (C libmilter, pymilter, nodemilter on
// libmilter, nodemilter's TypeScript engine) of each shape interleaved:
// every round starts one milter per implementation, then runs each cell
// (concurrency x messages per connection x load-generator client) against
// them in a rotating order. Prints ratios (the main figure), medians over
// the rounds, and the machine's state: load average, what other processes
// used, a canary (C on libmilter on one fixed cell at the start and at the
// end, the median of --canary-runs runs of --canary-seconds each) and the
// thread hand-off round trip, from which it computes the native engine's
// floor at concurrency 1. The canary runs between rounds too (--canary-between
// N runs, default as many as at the ends; 0 leaves it out), so that a host that
// changed speed during the run and changed back is seen.
// --doc rewrites the table in docs/performance.md (or --doc-file), and
// refuses (exit 3, nothing written) when the machine was busy or the canary
// moved: see PUBLISH_LIMITS in lib.cjs and docs/performance.md. A --doc run
// whose canary between two rounds already bars it stops there (exit 3,
// nothing written, no --json) unless --keep-going is given.
// --max-other PCT, --max-other-cell PCT, --max-canary PCT change those
// limits (the published header states the limits used). --plan prints the
// plan and its estimated time, and runs nothing.
// A round of a cell during which other processes (or the hypervisor's steal)
// took more than the per-cell limit is measured again after the last round,
// all implementations in the same order, each warmed by one unmeasured run of
// the cell, once the machine has been quiet for 5 s (waiting at most
// --quiet-wait S seconds, default 600): up to --remeasure N passes (default
// 2, 0 turns it off). The discarded rows and why stay in the state, --json
// and the table's header; the whole-run limit and the canary count all of it.
// Below the table: the ranking of the implementations under each client, and
// per cell the cores each milter and the load generator used and the
// milter's CPU per message, all from the same runs.
// --render FILE prints a run saved by --json again, with this script's
// tables and its publishing rules applied to the saved state, and with
// --doc writes it; it measures nothing, and says in the header that it was
// rendered again.
'use strict';
const fs = require('node:fs');
const path = require('node:path');
const L = require('./lib.cjs');

/** The options, read by L.readOptions: option -> [key, kind]. */
const OPTIONS = {
  '--quick': ['quick', 'flag'],
  '--doc': ['doc', 'flag'],
  '--plan': ['planOnly', 'flag'],
  '--keep-going': ['keepGoing', 'flag'],
  '--doc-file': ['docFile', 'text'],
  '--render': ['render', 'text'],
  '--json': ['json', 'text'],
  '--rounds': ['rounds', 'whole >= 1'],
  '--seconds': ['seconds', 'number > 0'],
  '--warmup': ['warmup', 'number >= 0'],
  '--canary-seconds': ['canarySeconds', 'number > 0'],
  '--canary-runs': ['canaryRuns', 'whole >= 1'],
  '--canary-between': ['canaryBetween', 'whole >= 0'],
  '--handoff': ['handoff', 'whole >= 1'],
  '--shapes': ['shapes', 'list', L.SHAPES],
  '--conc': ['conc', 'wholes >= 1'],
  '--modes': ['modes', 'list', ['many', 'one']],
  '--impls': ['impls', 'list', L.IMPLS],
  '--clients': ['clients', 'list', L.CLIENTS],
  '--max-other': ['otherPct', 'number >= 0'],
  '--max-other-cell': ['otherCellPct', 'number >= 0'],
  '--max-canary': ['canaryPct', 'number >= 0'],
  '--remeasure': ['remeasure', 'whole >= 0'],
  '--quiet-wait': ['quietWaitS', 'number >= 0'],
};
/** The keys of OPTIONS that are publishing limits: they go to o.limits, over PUBLISH_LIMITS. */
const LIMIT_KEYS = ['otherPct', 'otherCellPct', 'canaryPct'];

function parseArgs(argv) {
  const given = L.readOptions(argv, OPTIONS, 'bench/run.cjs');
  const o = { quick: false, doc: false, limits: { ...L.PUBLISH_LIMITS } };
  for (const [k, v] of Object.entries(given)) {
    if (LIMIT_KEYS.includes(k)) o.limits[k] = v;
    else o[k] = v;
  }
  if (o.render) {
    const other = argv.filter((a) => a.startsWith('--') && !['--render', '--doc', '--doc-file'].includes(a));
    if (other.length) throw new L.OptionError(`--render takes only --doc and --doc-file (the rest comes from the saved run), got ${other.join(' ')}`);
    return o;
  }
  o.rounds ??= o.quick ? 3 : 5;
  o.seconds ??= o.quick ? 1 : 3;
  o.warmup ??= o.quick ? 0.2 : 0.3;
  o.canarySeconds ??= o.quick ? 1 : 2;
  o.canaryRuns ??= o.quick ? 5 : 11;
  o.canaryBetween ??= o.canaryRuns;
  o.handoff ??= o.quick ? 10000 : 20000;
  o.shapes ??= L.SHAPES;
  o.conc ??= [1, 8, 64];
  o.modes ??= o.quick ? ['many'] : ['many', 'one'];
  o.impls ??= L.availableImpls();
  o.clients ??= CLIENTS;
  o.remeasure ??= 2;
  o.quietWaitS ??= 600;
  if (o.keepGoing && !o.doc) throw new L.OptionError('--keep-going needs --doc: only a --doc run stops early');
  return o;
}

const PER_CONN = { many: 100, one: 1 };
const CLIENTS = L.CLIENTS;

/**
 * The clients a cell runs with. --quick runs S4 with the epoll client only:
 * its 2 ms wait in EOM dominates every implementation alike, and that keeps
 * the quick run near 6 minutes.
 */
function clientsFor(o, shape) {
  return o.quick && shape === 's4' && o.clients.length > 1 ? o.clients.filter((c) => c === 'epoll') : o.clients;
}

// The canary: C on libmilter on a fixed cell (S2, concurrency 1, 100
// messages per connection, epoll client), the cell that an interfering load
// depressed most, measured at the start and at the end of the run: the
// median of `runs` runs (--canary-runs, default 11; 5 with --quick). The
// cell is noisy on its own (on the quiet host of 2026-12-03, 25 runs of 2 s
// spread from 15,592 to 20,565 msg/s, 8 % standard deviation, no steal), so
// the median of three moved by 11 to 15 % between the ends of clean runs;
// the median of 11 has a standard error near 3 %. It is also the most
// sensitive cell: a process beside it that took 4 % of a core cut it by 7 %,
// 7 % by 21 %, 12 % by 42 %. A canary run during which other processes or
// steal took more than the per-cell limit is dropped and run again, at most
// `runs` times in all, and the dropped runs are counted in the state.
const CANARY = { shape: 's2', conc: 1, perConn: 100, client: 'epoll' };

async function canary(o) {
  const m = await L.startMilter('c', CANARY.shape, L.socketFor(`canary-${process.pid}`));
  try {
    const rates = [];
    const dropped = [];
    while (rates.length < o.canaryRuns && dropped.length < o.canaryRuns) {
      const before = L.cpuMark({ procs: false });
      const r = await L.runLoadgen(m.socket, { conc: CANARY.conc, perConn: CANARY.perConn, client: CANARY.client, seconds: o.canarySeconds, warmup: o.warmup });
      const other = L.cpuBetween(before, L.cpuMark({ procs: false }));
      if (r.errors || r.bad) throw new Error(`canary: ${r.errors} errors, ${r.bad} bad (${r.first_error})`);
      if (other.otherCorePct > o.limits.otherCellPct) dropped.push({ rate: r.rate, otherCorePct: other.otherCorePct });
      else rates.push(r.rate);
    }
    return { rates, dropped, rate: rates.length ? L.median(rates) : 0 };
  } finally {
    await m.stop();
  }
}

/** One reading of the canary (and the hand-off beside it, at the ends), on stderr as the run goes. */
function logCanary(when, c, handoff) {
  const dropped = c.dropped.length ? ` (${c.dropped.length} runs dropped)` : '';
  process.stderr.write(`canary ${when}: ${c.rates.map((r) => r.toFixed(0)).join(', ')} msg/s${dropped}${handoff ? `; hand-off ${handoff.handoff_us} us` : ''}\n`);
}

/** A change in per cent with its sign: '+2.8 %', '-16.7 %'. */
const signedPct = (x) => `${x >= 0 ? '+' : ''}${x.toFixed(1)} %`;

/** The canary between rounds in one sentence and a space ('' when it did not run). */
function betweenText(c, limits) {
  if (!c.between || !c.between.length) return '';
  const items = c.between.map((b) => {
    if (!b.rates.length) return `after round ${b.afterRound} no undisturbed run`;
    const notes = [];
    if (c.start > 0) notes.push(signedPct((b.rate / c.start - 1) * 100));
    if (b.dropped.length) notes.push(`${b.dropped.length} runs dropped`);
    return `after round ${b.afterRound} ${Math.round(b.rate)}${notes.length ? ` (${notes.join(', ')})` : ''}`;
  });
  return `Canary between rounds (median of ${c.betweenRuns} x ${c.seconds} s, against the start; limit ${limits.canaryPct} %): ${items.join(', ')}. `;
}

/** One end of the canary in words: its runs' range and what was dropped. */
function canaryEndText(rates, dropped, limitPct) {
  if (!rates.length) return `no undisturbed run (${dropped.length} over ${limitPct} %)`;
  const lo = Math.round(Math.min(...rates));
  const hi = Math.round(Math.max(...rates));
  return `runs ${lo} to ${hi}${dropped.length ? `, ${dropped.length} more dropped (others over ${limitPct} %: ${dropped.map((d) => d.otherCorePct).join(', ')} %)` : ''}`;
}

/** How many runs and milter starts a plan has, and about how long it takes. */
function plan(o) {
  let runs = 0;
  for (const shape of o.shapes) runs += o.conc.length * o.modes.length * clientsFor(o, shape).length * o.impls.length;
  runs *= o.rounds;
  const starts = o.rounds * o.shapes.length * o.impls.length;
  // Measured on the shared 2-core machine (load average 11): ~0.06 s per run
  // to start and stop the load generator, ~0.45 s per milter start; the
  // hand-off measurement is 15 x N round trips of ~14 us, twice.
  const canaryRuns = 2 * o.canaryRuns + (o.rounds - 1) * o.canaryBetween;
  const canaryStarts = 2 + (o.canaryBetween > 0 ? o.rounds - 1 : 0);
  const s = runs * (o.seconds + o.warmup + 0.06) + (starts + canaryStarts) * 0.45 + canaryRuns * (o.canarySeconds + o.warmup + 0.06) + 2 + o.handoff * 2 * 15 * 14e-6;
  return { runs, starts, seconds: s };
}

async function main() {
  const o = parseArgs(process.argv.slice(2));
  if (o.render) return renderSaved(o.render, o);
  L.loadgenPath();
  L.cMilterPath();
  const p = plan(o);
  const again = o.remeasure > 0 ? `; rounds disturbed by other processes are measured again on top of that (up to ${o.remeasure} passes, each after waiting up to ${o.quietWaitS} s for a quiet machine)` : '';
  process.stderr.write(`plan: ${p.runs} runs of ${o.seconds} s (+${o.warmup} s warm-up), ${p.starts} milter starts: about ${(p.seconds / 60).toFixed(1)} min${again}\n`);
  if (o.planOnly) return;
  const started = Date.now();
  const loadBefore = L.loadAverage();
  const mark0 = L.cpuMark({ procs: false });
  const tally = L.procTally();
  const handoff0 = L.measureHandoff(o.handoff);
  const canary0 = await canary(o);
  logCanary('at the start', canary0, handoff0);
  const results = []; // one per (round, shape, conc, mode, client, impl)
  const between = []; // the canary between rounds
  for (let round = 0; round < o.rounds; round++) {
    for (const shape of o.shapes) {
      const milters = await startShape(o, shape);
      let turn = round;
      for (const conc of o.conc) {
        for (const mode of o.modes) {
          for (const client of clientsFor(o, shape)) {
            const order = o.impls.map((_, k) => o.impls[(k + turn) % o.impls.length]);
            turn++;
            results.push(...(await measureCell(o, milters, { round, shape, conc, mode, client }, order)));
          }
        }
      }
      for (const impl of o.impls) await milters[impl].stop();
      tally.scan();
    }
    if (round < o.rounds - 1 && o.canaryBetween > 0) {
      const c = await canary({ ...o, canaryRuns: o.canaryBetween });
      const entry = { afterRound: round + 1, rate: c.rate, rates: c.rates, dropped: c.dropped };
      between.push(entry);
      logCanary(`after round ${round + 1}`, c);
      const why = L.betweenReason(canary0.rate, entry, o.canaryBetween, o.limits);
      if (why && o.doc && !o.keepGoing) {
        console.error(`bench: --doc stopped after round ${round + 1} of ${o.rounds}, nothing written: ${why}. --keep-going runs it to the end.`);
        process.exitCode = 3;
        return;
      }
    }
  }
  const remeasured = await remeasureDisturbed(o, results);
  tally.scan();
  const canary1 = await canary(o);
  const handoff1 = L.measureHandoff(o.handoff);
  const other = { ...L.cpuBetween(mark0, L.cpuMark({ procs: false })), top: (tally.scan(), tally.top()) };
  const loadAfter = L.loadAverage();
  logCanary('at the end', canary1, handoff1);
  const worst = results.reduce((w, r) => (!w || r.other.otherCorePct > w.other.otherCorePct ? r : w), null);
  const state = {
    loadBefore,
    loadAfter,
    other,
    cellMax: worst && { otherCorePct: worst.other.otherCorePct, cell: `${worst.impl} ${worst.shape} c${worst.conc} ${PER_CONN[worst.mode]}/conn ${worst.client} (round ${worst.round + 1}${worst.remeasured ? ', measured again' : ''})` },
    canary: {
      ...CANARY,
      runs: o.canaryRuns,
      seconds: o.canarySeconds,
      start: canary0.rate,
      end: canary1.rate,
      startRates: canary0.rates,
      endRates: canary1.rates,
      startDropped: canary0.dropped,
      endDropped: canary1.dropped,
      betweenRuns: o.canaryBetween,
      between,
    },
    handoff: { start: handoff0, end: handoff1, us: Number(((handoff0.handoff_us + handoff1.handoff_us) / 2).toFixed(2)) },
    errors: results.filter((r) => r.errors || r.bad).length,
    remeasured,
  };
  const run = { machine: L.machine(), options: o, state, results, runAt: new Date().toISOString(), elapsedS: Number(((Date.now() - started) / 1000).toFixed(1)) };
  const { verdict, block } = render(run);
  console.log(block);
  if (o.json) fs.writeFileSync(o.json, JSON.stringify({ ...run, verdict }, null, 1));
  if (o.doc) publish(o, block, verdict);
}

/** --doc: the block into docs/performance.md (or --doc-file), or exit 3 when the verdict refuses it. */
function publish(o, block, verdict) {
  const file = o.docFile ?? path.join(L.ROOT, 'docs/performance.md');
  const { written, message } = L.publishTable(file, block, verdict);
  console.error(message);
  if (!written) process.exitCode = 3;
}

/**
 * The header and the tables of a run ({ machine, options, state, results,
 * runAt, elapsedS }, as --json saves it), and the verdict on publishing it,
 * taken again from its state with today's rules. `renderedFrom` names the
 * file when --render re-renders a saved run.
 */
function render(run, renderedFrom) {
  const { machine: mach, options: o, state, results } = run;
  if (!run.runAt || !Number.isFinite(run.elapsedS))
    throw new Error(`${renderedFrom ?? 'the run'} has no runAt or elapsedS: it was saved by an older bench/run.cjs, which did not record when it ran`);
  const verdict = L.publishVerdict(state, o.limits);
  const table = summarize(results, o, state.handoff.us);
  const header =
    `Machine: ${mach.cpu}, ${mach.cores} cores, ${mach.memGiB} GiB, Linux ${mach.kernel}; Node ${mach.node}; ` +
    `Python ${mach.python.replace(' ', ', pymilter ')}; libmilter ${mach.libmilter}.\n` +
    `Run: ${run.runAt.slice(0, 16)}Z, ${o.rounds} interleaved rounds of ${o.seconds} s per cell (+${o.warmup} s warm-up), ` +
    `clients ${o.clients.join(' and ')}${o.quick && o.shapes.includes('s4') && o.clients.length > 1 ? ' (S4: epoll only)' : ''}, ` +
    `${run.elapsedS.toFixed(0)} s in all${o.quick ? ' (--quick)' : ''}. Medians over rounds; ratios are medians of the per-round ratios.` +
    `${renderedFrom ? ` Rendered again from ${path.basename(renderedFrom)} (--render) on ${new Date().toISOString().slice(0, 16)}Z: the measurements are that run's.` : ''}\n` +
    stateText(state, o.limits) +
    `\nPublishable: ${verdict.ok ? 'yes' : `NO: ${verdict.reasons.join('; ')}`}.\n`;
  return { verdict, block: header + '\n' + table.text + cpuTable(results, o, mach.cores) };
}

/** --render FILE: print (and with --doc publish) a run saved by --json again, with today's tables. */
function renderSaved(file, o) {
  let run;
  try {
    run = JSON.parse(fs.readFileSync(file, 'utf8'));
  } catch (err) {
    throw new Error(`--render ${file}: ${err.code === 'ENOENT' ? 'no such file' : `not a run saved by --json (${err.message})`}`);
  }
  for (const k of ['machine', 'options', 'state', 'results'])
    if (!run || typeof run !== 'object' || !(k in run)) throw new Error(`--render ${file}: not a run saved by --json (no "${k}")`);
  const { verdict, block } = render(run, file);
  console.log(block);
  if (o.doc) publish(o, block, verdict);
}

async function startShape(o, shape) {
  const milters = {};
  for (const impl of o.impls) milters[impl] = await L.startMilter(impl, shape, L.socketFor(`${impl}-${shape}`));
  return milters;
}

const cellLabel = (r) => `${r.shape} c${r.conc} ${PER_CONN[r.mode]}/conn ${r.client}`;

/** One round of one cell: every implementation in `order`, one run each. Returns the rows. */
async function measureCell(o, milters, cell, order, { log = true } = {}) {
  const { round, shape, conc, mode, client } = cell;
  const rows = [];
  for (const impl of order) {
    const m = milters[impl];
    if (!m.alive()) throw new Error(`${impl} ${shape} milter died:\n${m.stderr()}`);
    L.resetPeak(m.pid);
    const cpu0 = L.cpuSeconds(m.pid);
    const before = L.cpuMark({ procs: false });
    const r = await L.runLoadgen(m.socket, { conc, perConn: PER_CONN[mode], client, seconds: o.seconds, warmup: o.warmup });
    const other = L.cpuBetween(before, L.cpuMark({ procs: false }));
    const cpu = L.cpuSeconds(m.pid) - cpu0;
    const st = L.procStatus(m.pid);
    const row = { round, shape, conc, mode, client, impl, ...r, peakRssKiB: st.VmHWM, milterCpuS: cpu, threads: L.threads(m.pid), other };
    if (r.errors || r.bad) console.error(`! ${impl} ${shape} c${conc} ${mode} ${client}: ${r.errors} errors, ${r.bad} bad (${r.first_error})`);
    rows.push(row);
    if (log)
      process.stderr.write(
        `round ${round + 1}/${o.rounds} ${shape} c${conc} ${mode.padEnd(4)} ${client.padEnd(7)} ${impl.padEnd(4)} ${r.rate.toFixed(0).padStart(6)} msg/s ` +
          `p50 ${(r.p50_us / 1000).toFixed(2)} ms p99 ${(r.p99_us / 1000).toFixed(2)} ms rss ${(st.VmHWM / 1024).toFixed(0)} MB ` +
          `cpu ${((cpu / Math.max(r.messages, 1)) * 1e6).toFixed(0)} us/msg loadgen ${((r.loadgen_cpu_s / (o.seconds + o.warmup)) * 100).toFixed(0)}% ` +
          `others ${other.otherCorePct}%\n`,
      );
  }
  return rows;
}

/**
 * The rounds of cells during which other processes took more than `limitPct`
 * of a core in any one run: [{ round, shape, conc, mode, client, order, rows }],
 * `order` the implementations in the order they ran.
 */
function disturbedCellRounds(results, limitPct) {
  const groups = new Map();
  for (const r of results) {
    const k = `${r.round} ${r.shape} ${r.conc} ${r.mode} ${r.client}`;
    if (!groups.has(k)) groups.set(k, { round: r.round, shape: r.shape, conc: r.conc, mode: r.mode, client: r.client, order: [], rows: [] });
    const g = groups.get(k);
    g.order.push(r.impl);
    g.rows.push(r);
  }
  return [...groups.values()].filter((g) => g.rows.some((r) => r.other.otherCorePct > limitPct));
}

/** Put `rows` (one round of one cell, measured again) in place of that round's rows in `results`. */
function replaceCellRound(results, rows) {
  const { round, shape, conc, mode, client } = rows[0];
  const same = (r) => r.round === round && r.shape === shape && r.conc === conc && r.mode === mode && r.client === client;
  const at = results.findIndex(same);
  if (at < 0) throw new Error(`no round ${round + 1} of ${cellLabel(rows[0])} to replace`);
  const old = results.filter(same);
  const kept = results.filter((r) => !same(r));
  results.length = 0;
  results.push(...kept.slice(0, at), ...rows, ...kept.slice(at));
  return old;
}

/** Wait until other processes used at most `pct` % of a core over 5 s, or `maxS` seconds passed. Returns the seconds waited and the last window's share. */
async function waitQuiet(pct, maxS) {
  const t0 = Date.now();
  for (;;) {
    const a = L.cpuMark({ procs: false });
    await L.sleep(5000);
    const w = L.cpuBetween(a, L.cpuMark({ procs: false }));
    const waited = (Date.now() - t0) / 1000;
    if (w.otherCorePct <= pct || waited >= maxS) return { waitedS: Number(waited.toFixed(0)), otherCorePct: w.otherCorePct, quiet: w.otherCorePct <= pct };
  }
}

/**
 * Measure the disturbed rounds of cells again (see the comment at the top),
 * in up to o.remeasure passes. Returns [{ cell, round, pass, otherBefore,
 * otherAfter, discarded }] (`discarded`: the rows measured first).
 */
async function remeasureDisturbed(o, results) {
  const out = [];
  for (let pass = 1; pass <= o.remeasure; pass++) {
    const todo = disturbedCellRounds(results, o.limits.otherCellPct);
    if (!todo.length) break;
    process.stderr.write(`pass ${pass}: ${todo.length} rounds of cells were disturbed (over ${o.limits.otherCellPct} % of a core); waiting for a quiet machine\n`);
    const q = await waitQuiet(o.limits.otherPct, o.quietWaitS);
    process.stderr.write(`  ${q.quiet ? 'quiet' : 'still busy'} after ${q.waitedS} s (${q.otherCorePct} % of a core over the last 5 s); measuring them again\n`);
    for (const shape of o.shapes) {
      const mine = todo.filter((g) => g.shape === shape);
      if (!mine.length) continue;
      const milters = await startShape(o, shape);
      try {
        for (const g of mine) {
          await measureCell(o, milters, g, g.order, { log: false }); // warm-up, not kept
          const rows = (await measureCell(o, milters, g, g.order, { log: false })).map((r) => ({ ...r, remeasured: pass }));
          for (const r of rows) {
            process.stderr.write(
              `again ${g.round + 1}/${o.rounds} ${cellLabel(r)} ${r.impl.padEnd(4)} ${r.rate.toFixed(0).padStart(6)} msg/s others ${r.other.otherCorePct}% ` +
                `(was ${g.rows.find((x) => x.impl === r.impl).other.otherCorePct}%)\n`,
            );
          }
          const discarded = replaceCellRound(results, rows);
          out.push({
            cell: cellLabel(g),
            round: g.round + 1,
            pass,
            otherBefore: Math.max(...discarded.map((r) => r.other.otherCorePct)),
            otherAfter: Math.max(...rows.map((r) => r.other.otherCorePct)),
            discarded,
          });
        }
      } finally {
        for (const impl of o.impls) await milters[impl].stop();
      }
    }
  }
  return out;
}

/** The machine's state in sentences, for the table's header. */
function stateText(s, limits) {
  const f = (xs) => xs.map((x) => x.toFixed(2)).join(' / ');
  const h = s.handoff;
  const drift = (s.canary.end / s.canary.start - 1) * 100;
  return (
    `State: load average (1/5/15 min) ${f(s.loadBefore)} before, ${f(s.loadAfter)} after. ` +
    `Other processes: ${s.other.otherCorePct} % of one core over the run (${s.other.otherS} CPU s in ${s.other.wallS} s, steal ${s.other.stealS} s; limit ${limits.otherPct} %), ` +
    `at most ${s.cellMax ? s.cellMax.otherCorePct : 0} % during one cell${s.cellMax ? ` (${s.cellMax.cell})` : ''} (limit ${limits.otherCellPct} %). ` +
    `Canary (C on libmilter, ${s.canary.shape.toUpperCase()}, concurrency ${s.canary.conc}, ${s.canary.perConn}/conn, ${s.canary.client} client, median of ${s.canary.runs} x ${s.canary.seconds} s): ` +
    `${Math.round(s.canary.start)} msg/s at the start (${canaryEndText(s.canary.startRates, s.canary.startDropped ?? [], limits.otherCellPct)}), ` +
    `${Math.round(s.canary.end)} at the end (${canaryEndText(s.canary.endRates, s.canary.endDropped ?? [], limits.otherCellPct)}): ` +
    `${Number.isFinite(drift) ? signedPct(drift) : 'no move measured'}, limit ${limits.canaryPct} %. ` +
    betweenText(s.canary, limits) +
    `Hand-off round trip ${h.us} us (start ${h.start.handoff_us}, end ${h.end.handoff_us}; mean of condition variable ${h.start.condvar_us} / ${h.end.condvar_us} ` +
    `and eventfd + epoll ${h.start.eventfd_epoll_us} / ${h.end.eventfd_epoll_us} us).` +
    remeasuredText(s.remeasured, limits)
  );
}

/** The rounds of cells measured again, in one sentence ('' when none). */
function remeasuredText(list, limits) {
  if (!list || !list.length) return '';
  const items = list.map((x) => `${x.cell} round ${x.round} (${x.otherBefore} -> ${x.otherAfter} %${x.pass > 1 ? `, pass ${x.pass}` : ''})`);
  return (
    ` Measured again, because other processes or steal took more than ${limits.otherCellPct} % of a core during a run of theirs ` +
    `(the first measurement is discarded; highest share of a core before -> after): ${list.length} rounds of cells: ${items.join(', ')}.`
  );
}

const LABEL = { c: 'C', py: 'py', node: 'node', ts: 'ts' };

/** Medians and ratios per cell; the ratios come first. `handoffUs` gives the native floor at concurrency 1. */
function summarize(results, o, handoffUs) {
  const impls = o.impls;
  const has = (i) => impls.includes(i);
  const pairs = ['node', 'ts'].filter(has).flatMap((n) => ['c', 'py'].filter(has).map((b) => [n, b]));
  const floorCols = has('node') && has('c');
  const names = impls.map((i) => LABEL[i]).join(' / ');
  const lines = [];
  const cols = [
    'shape', 'conc', 'msgs/conn', 'client',
    ...pairs.map(([a, b]) => `${LABEL[a]}/${LABEL[b]}`),
    ...(floorCols ? ['node/floor', 'floor/C'] : []),
    ...impls.map((i) => `${LABEL[i]} msg/s`),
    `p50 ms ${names}`, `p99 ms ${names}`, `peak RSS MB ${names}`, 'others % core', 'node met', 'ts met',
  ];
  lines.push(`| ${cols.join(' | ')} |`);
  lines.push(`|${'---|'.repeat(cols.length)}`);
  const misses = { node: [], ts: [] };
  const fmt = (x, d) => (Number.isFinite(x) ? x.toFixed(d) : '-');
  for (const shape of o.shapes) {
    for (const conc of o.conc) {
      for (const mode of o.modes) {
        for (const client of clientsFor(o, shape)) {
          const cell = results.filter((r) => r.shape === shape && r.conc === conc && r.mode === mode && r.client === client);
          const rounds = [...new Set(cell.map((r) => r.round))];
          const get = (round, impl) => cell.find((r) => r.round === round && r.impl === impl);
          const by = (impl, f) => L.median(cell.filter((r) => r.impl === impl).map(f));
          const perRound = (f) => L.median(rounds.map(f));
          const ratio = (a, b) =>
            perRound((round) => {
              const x = get(round, a);
              const y = get(round, b);
              return x && y && y.rate ? x.rate / y.rate : NaN;
            });
          // The native floor: C's time per message plus one hand-off per replied step (concurrency 1 only).
          const floorOf = (round) => {
            const n = get(round, 'node');
            const c = get(round, 'c');
            return n && c && c.rate ? L.nativeFloor(c.rate, n.replied_msg + n.replied_conn / PER_CONN[mode], handoffUs) : NaN;
          };
          const nodeFloor = floorCols && conc === 1 ? perRound((round) => (get(round, 'node')?.rate ?? NaN) / floorOf(round)) : NaN;
          const floorC = floorCols && conc === 1 ? perRound((round) => floorOf(round) / (get(round, 'c')?.rate ?? NaN)) : NaN;
          const label = `${shape} c${conc} ${PER_CONN[mode]}/conn ${client}`;
          // Targets of issue 19. node: within 10 % of its floor at concurrency 1, at least pymilter at 8 and 64.
          let nodeMet = '-';
          if (has('node')) {
            const ok = conc === 1 ? (Number.isFinite(nodeFloor) ? nodeFloor >= 0.9 : null) : has('py') ? ratio('node', 'py') >= 1 : null;
            nodeMet = ok === null ? '-' : ok ? 'yes' : 'NO';
            if (ok === false) misses.node.push(label);
          }
          // ts: at least pymilter in every cell, at least C at 8 and 64.
          let tsMet = '-';
          const tsChecks = has('ts') ? [has('py') ? ratio('ts', 'py') >= 1 : null, conc > 1 && has('c') ? ratio('ts', 'c') >= 1 : null].filter((x) => x !== null) : [];
          if (tsChecks.length) {
            tsMet = tsChecks.every(Boolean) ? 'yes' : 'NO';
            if (tsMet === 'NO') misses.ts.push(label);
          }
          const row = [
            shape.toUpperCase(), conc, PER_CONN[mode], client,
            ...pairs.map(([a, b]) => fmt(ratio(a, b), 2)),
            ...(floorCols ? [fmt(nodeFloor, 2), fmt(floorC, 2)] : []),
            ...impls.map((i) => fmt(by(i, (r) => r.rate), 0)),
            impls.map((i) => fmt(by(i, (r) => r.p50_us) / 1000, 2)).join(' / '),
            impls.map((i) => fmt(by(i, (r) => r.p99_us) / 1000, 2)).join(' / '),
            impls.map((i) => fmt(by(i, (r) => r.peakRssKiB) / 1024, 0)).join(' / '),
            fmt(Math.max(...cell.map((r) => r.other.otherCorePct)), 0),
            nodeMet, tsMet,
          ];
          lines.push(`| ${row.join(' | ')} |`);
        }
      }
    }
  }
  const errs = results.filter((r) => r.errors || r.bad);
  let text = lines.join('\n') + '\n';
  const rank = rankings(results, o);
  if (rank.compared)
    text +=
      `\nRanking (implementations by median msg/s): the two clients agree in ${rank.compared - rank.differ.length} of ${rank.compared} cells` +
      `${rank.differ.length ? `; they differ in ${rank.differ.join(', ')}` : ''}.` +
      `\nRanking up to the noise between rounds: the clients contradict each other in ${rank.contradict.length} of ${rank.compared} cells` +
      `${rank.contradict.length ? `: ${rank.contradict.join(', ')}` : ''}. (They contradict each other on a pair of implementations when one client ` +
      `put the pair in one order in every round and the other's median of the per-round ratios puts it in the other; a pair's ratio is its first over its second.)`;
  text +=
    `\nnode/floor: node's msg/s over its floor at concurrency 1, C's time per message plus one hand-off round trip (${handoffUs} us here) per replied step ` +
    `(the load generator counts the replies the negotiated steps need). others % core: the most other processes used during one run of the cell.`;
  text += `\nTargets (issue 19): node within 10 % of its floor at concurrency 1 and at least py at 8 and 64; ts at least py everywhere and at least C at 8 and 64.`;
  text += `\nMissed by node: ${misses.node.length ? misses.node.join(', ') : 'none'}.`;
  text += `\nMissed by ts: ${misses.ts.length ? misses.ts.join(', ') : 'none'}.`;
  text += `\nRuns with errors: ${errs.length ? errs.map((r) => `${r.impl} ${r.shape} c${r.conc} ${r.mode} ${r.client}: ${r.first_error}`).join('; ') : 'none'}.\n`;
  return { text, misses };
}

/**
 * Per cell run with both clients: the order of the implementations by median
 * msg/s under each, and where the orders differ (`differ`). Two
 * implementations a few per cent apart swap places from round to round, so
 * an order can differ by noise alone. `contradict` lists the cells where the
 * clients contradict each other: on a pair of implementations that one
 * client put in one order in every round (its rate above the other's in
 * each round, where the two run back to back) while the other client's
 * median of the per-round ratios puts them the other way round.
 */
function rankings(results, o) {
  const differ = [];
  const contradict = [];
  let compared = 0;
  for (const shape of o.shapes) {
    const clients = clientsFor(o, shape);
    if (clients.length < 2) continue;
    for (const conc of o.conc) {
      for (const mode of o.modes) {
        const rows = (client, impl) => results.filter((r) => r.shape === shape && r.conc === conc && r.mode === mode && r.client === client && r.impl === impl);
        const order = (client) =>
          o.impls
            .map((impl) => [impl, L.median(rows(client, impl).map((r) => r.rate))])
            .sort((a, b) => b[1] - a[1])
            .map(([impl]) => LABEL[impl])
            .join(' > ');
        const [a, b] = clients.map(order);
        const name = `${shape.toUpperCase()} c${conc} ${PER_CONN[mode]}/conn`;
        compared++;
        if (a !== b) differ.push(`${name} (epoll ${a}; threads ${b})`);
        const clashes = [];
        for (let i = 0; i < o.impls.length; i++) {
          for (let j = i + 1; j < o.impls.length; j++) {
            const [x, y] = [o.impls[i], o.impls[j]];
            const views = clients.map((client) => pairView(rows(client, x), rows(client, y)));
            if (contradicts(views[0], views[1]))
              clashes.push(`${LABEL[x]}/${LABEL[y]} ${clients.map((c, k) => `${c} ${viewText(views[k])}`).join(', ')}`);
          }
        }
        if (clashes.length) contradict.push(`${name} (${clashes.join('; ')})`);
      }
    }
  }
  return { compared, differ, contradict };
}

/** Per-round ratios of x's rate over y's (rounds where both ran): their median, range, and the side of 1 all of them are on (0 when not all on one). */
function pairView(xs, ys) {
  const q = xs.map((x) => [x, ys.find((y) => y.round === x.round)]).filter(([, y]) => y && y.rate > 0).map(([x, y]) => x.rate / y.rate);
  const every = q.length && q.every((v) => v > 1) ? 1 : q.length && q.every((v) => v < 1) ? -1 : 0;
  return { median: L.median(q), lo: Math.min(...q), hi: Math.max(...q), every, rounds: q.length };
}

/** Whether two clients' views of a pair contradict each other: opposite medians, and one of them on its side in every round. */
function contradicts(a, b) {
  const side = (v) => (Number.isFinite(v.median) ? Math.sign(v.median - 1) : 0);
  return side(a) * side(b) < 0 && ((a.every !== 0 && a.every === side(a)) || (b.every !== 0 && b.every === side(b)));
}

const viewText = (v) => `${v.median.toFixed(2)} (${v.lo.toFixed(2)} to ${v.hi.toFixed(2)}${v.every ? `, every round ${v.every > 0 ? 'above' : 'below'} 1` : ''})`;

/**
 * Per cell, what the machine did during each implementation's runs: the
 * cores its milter used and the cores the load generator used, and the
 * milter's CPU per message; medians over the rounds. Both CPU figures span
 * the whole run of the load generator (warm-up included), so the cores are
 * CPU seconds over seconds + warm-up, and the CPU per message divides by
 * the messages the measured rate would have served in that span.
 */
function cpuTable(results, o, cores) {
  if (!results.length || !results.every((r) => Number.isFinite(r.milterCpuS) && Number.isFinite(r.loadgen_cpu_s))) return '';
  const span = o.seconds + o.warmup;
  const names = o.impls.map((i) => LABEL[i]).join(' / ');
  const fmt = (x, d) => (Number.isFinite(x) ? x.toFixed(d) : '-');
  const lines = [
    '',
    `CPU, per cell and implementation (medians over rounds): the cores its milter used + the cores the load generator used, out of ${cores}; and the milter's CPU per message.`,
    '',
    `| cell | cores, milter + client: ${names} | CPU per message, us: ${names} |`,
    '|---|---|---|',
  ];
  for (const shape of o.shapes)
    for (const conc of o.conc)
      for (const mode of o.modes)
        for (const client of clientsFor(o, shape)) {
          const cell = results.filter((r) => r.shape === shape && r.conc === conc && r.mode === mode && r.client === client);
          const of = (impl, f) => L.median(cell.filter((r) => r.impl === impl).map(f));
          const cores = o.impls.map((i) => `${fmt(of(i, (r) => r.milterCpuS / span), 2)} + ${fmt(of(i, (r) => r.loadgen_cpu_s / span), 2)}`);
          const us = o.impls.map((i) => of(i, (r) => (r.rate > 0 ? (r.milterCpuS / (r.rate * span)) * 1e6 : NaN))).map((x) => fmt(x, x < 100 ? 1 : 0));
          lines.push(`| ${shape.toUpperCase()} c${conc} ${PER_CONN[mode]}/conn ${client} | ${cores.join(' / ')} | ${us.join(' / ')} |`);
        }
  return lines.join('\n') + '\n';
}

module.exports = { parseArgs, disturbedCellRounds, replaceCellRound, remeasuredText, canaryEndText, betweenText, rankings, plan };

if (require.main === module)
  main().then(
    () => process.exit(process.exitCode ?? 0),
    (err) => {
      console.error(L.errorText(err));
      process.exit(1);
    },
  );
