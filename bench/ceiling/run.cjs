// npm run bench:ceiling [-- --rounds N --seconds S --conc 1,8,64 --per-conn N --handoff ROUND_TRIPS]
// What bounds the S3 cells of the benchmark: runs, interleaved, C on
// libmilter (the reference), ceiling.c (the least work an S3 milter can do:
// one thread, epoll, no library), bare.cjs (the same in Node: net.Server and
// framing only) and nodemilter's TypeScript engine, and prints msg/s with
// each one's ratio to C, and the TypeScript engine's to bare.cjs. No engine
// in Node can beat bare.cjs, and no milter at all can beat ceiling.c with
// this load generator on this machine. --per-conn (messages per connection,
// default 100; 1 is the benchmark's 1/conn mode) weighs the cost of a
// connection: accepting, negotiating and closing it.
// Then handoff.c: what one round trip between two threads costs here (the
// libmilter engine pays one per replied callback: worker -> JS -> worker).
'use strict';
const fs = require('node:fs');
const path = require('node:path');
const { spawn } = require('node:child_process');
const L = require('../lib.cjs');

/** The options, read by L.readOptions: option -> [key, kind]. */
const OPTIONS = {
  '--rounds': ['rounds', 'whole >= 1'],
  '--seconds': ['seconds', 'number > 0'],
  '--conc': ['conc', 'wholes >= 1'],
  '--per-conn': ['perConn', 'whole >= 1'],
  '--handoff': ['handoff', 'whole >= 1'],
};

function args() {
  return { rounds: 3, seconds: 1.5, conc: [1, 8, 64], perConn: 100, handoff: 20000, ...L.readOptions(process.argv.slice(2), OPTIONS, 'bench/ceiling/run.cjs') };
}

async function startRaw(name, cmd, argv, socket) {
  const p = socket.replace(/^unix:/, '');
  const child = spawn(cmd, [...argv, p], { stdio: ['ignore', 'ignore', 'inherit'] });
  const kill = () => child.kill('SIGKILL');
  process.once('exit', kill); // also when a cell fails
  const until = Date.now() + 10_000;
  while (!fs.existsSync(p)) {
    if (Date.now() > until) throw new Error(`${name} did not listen`);
    await L.sleep(20);
  }
  await L.sleep(100);
  return {
    impl: name,
    socket,
    stop: async () => {
      process.off('exit', kill);
      kill();
    },
  };
}

async function main() {
  const o = args();
  const ceiling = L.buildC('ceiling/ceiling.c');
  const impls = ['c', 'ceiling', 'bare', 'ts'];
  const rates = {}; // impl -> conc -> [rate]
  for (let round = 0; round < o.rounds; round++) {
    const milters = [
      await L.startMilter('c', 's3', L.socketFor('ceil-c')),
      await startRaw('ceiling', ceiling, [], L.socketFor('ceil-ceiling')),
      await startRaw('bare', process.execPath, [path.join(__dirname, 'bare.cjs')], L.socketFor('ceil-bare')),
      await L.startMilter('ts', 's3', L.socketFor('ceil-ts')),
    ];
    for (const conc of o.conc) {
      // Rotate the order per round so no implementation always runs first.
      const order = milters.map((_, i) => milters[(i + round) % milters.length]);
      for (const m of order) {
        const r = await L.runLoadgen(m.socket, { conc, perConn: o.perConn, seconds: o.seconds, warmup: 0.3 });
        if (r.errors || r.bad) throw new Error(`${m.impl} c${conc}: ${r.errors} errors, ${r.bad} bad (${r.first_error})`);
        ((rates[m.impl] ??= {})[conc] ??= []).push(r.rate);
      }
    }
    for (const m of milters) await m.stop();
  }
  const mc = L.machine();
  console.log(`Machine: ${mc.cpu}, ${mc.cores} cores; Node ${mc.node}; libmilter ${mc.libmilter}. ${o.rounds} interleaved rounds of ${o.seconds} s per cell, S3, ${o.perConn} message${o.perConn === 1 ? '' : 's'} per connection, medians.`);
  console.log('');
  console.log(`| conc | ${impls.map((i) => `${i} msg/s`).join(' | ')} | ${impls.slice(1).map((i) => `${i}/C`).join(' | ')} | ts/bare |`);
  console.log(`|---|${impls.map(() => '---').join('|')}|${impls.slice(1).map(() => '---').join('|')}|---|`);
  for (const conc of o.conc) {
    const med = (i) => L.median(rates[i][conc]);
    // Medians of the per-round ratios: both sides of a ratio ran in the same round.
    const ratio = (i, ref = 'c') => L.median(rates[i][conc].map((r, k) => r / rates[ref][conc][k]));
    console.log(
      `| ${conc} | ${impls.map((i) => Math.round(med(i))).join(' | ')} | ${impls.slice(1).map((i) => ratio(i).toFixed(2)).join(' | ')} | ${ratio('ts', 'bare').toFixed(2)} |`,
    );
  }
  const h = L.measureHandoff(o.handoff);
  console.log('');
  console.log(
    `Thread hand-off, median round trip of ${h.roundTrips} (handoff.c): condition variable ${h.condvar_us} us, ` +
      `eventfd + epoll ${h.eventfd_epoll_us} us, unix socket pair ${h.socketpair_us} us; ` +
      `the libmilter engine's per replied step (mean of the first two) ${h.handoff_us} us.`,
  );
}

main().then(
  () => process.exit(0),
  (err) => {
    console.error(L.errorText(err));
    process.exit(1);
  },
);
