// Scale and stamina, against each implementation (default: c, py, node):
//   npm run bench:scale   -- [--impls all|c,py,node,ts] [--conns 1000] [--shape s4]
//       CONNS connections each hold one message in flight at once: every
//       connection stops before EOM until all have arrived, then all send
//       EOM. Reports failures, time, peak RSS and threads.
//   npm run bench:soak    -- [--impls node] [--messages 200000] [--shape s2] [--conc 8] [--phases 10]
//       MESSAGES in a row in PHASES load generator runs; RSS after the first
//       (warm-up) phase vs at the end (< 10% growth wanted), and after each phase.
//   npm run bench:bigbody -- [--impls all|c,py,node,ts] [--mb 10] [--count 5]
//       a body of MB megabytes through the `big` shape (body no-reply,
//       EOM replaces it with the same bytes and adds a header); MB/s.
'use strict';
const L = require('./lib.cjs');

/** Options every command takes, read by L.readOptions. */
const COMMON = { '--impls': ['impls', 'list', [...L.IMPLS, 'all']], '--rounds': ['rounds', 'whole >= 1'] };
/** Each command's own options. */
const OPTIONS = {
  conns: { ...COMMON, '--conns': ['conns', 'whole >= 1'], '--shape': ['shape', 'text', L.SHAPES] },
  soak: { ...COMMON, '--messages': ['messages', 'whole >= 1'], '--shape': ['shape', 'text', L.SHAPES], '--conc': ['conc', 'whole >= 1'], '--phases': ['phases', 'whole >= 1'] },
  bigbody: { ...COMMON, '--mb': ['mb', 'number > 0'], '--count': ['count', 'whole >= 1'] },
};

/** A command's options over its defaults; --impls all: every implementation available here. */
function opts(cmd, argv, defaults) {
  const o = { ...defaults, ...L.readOptions(argv, OPTIONS[cmd], 'bench/scale.cjs') };
  if (o.impls.includes('all')) o.impls = L.availableImpls();
  return o;
}

async function conns(argv) {
  const o = opts('conns', argv, { impls: ['all'], conns: 1000, shape: 's4', rounds: 1 });
  console.log(`${o.conns} connections, each with one message in flight at once (barrier before EOM), shape ${o.shape}`);
  for (let round = 0; round < o.rounds; round++) {
    for (const impl of o.impls) {
      const m = await L.startMilter(impl, o.shape, L.socketFor(`scale-${impl}`));
      let maxThreads = 0;
      const t = setInterval(() => {
        try {
          maxThreads = Math.max(maxThreads, L.threads(m.pid));
        } catch {}
      }, 20);
      const r = await L.runLoadgen(m.socket, { conc: o.conns, perConn: 1, messages: o.conns, barrier: true, timeout: 120 });
      clearInterval(t);
      const st = L.procStatus(m.pid);
      const ok = r.errors === 0 && r.bad === 0 && r.headers === o.conns && m.alive();
      console.log(
        `${impl.padEnd(4)} ${ok ? 'ok  ' : 'FAIL'} messages ${r.messages}/${o.conns}, headers ${r.headers}, errors ${r.errors}` +
          `${r.first_error ? ` (${r.first_error})` : ''}, ${(r.seconds * 1000).toFixed(0)} ms, p50 ${(r.p50_us / 1000).toFixed(1)} ms, ` +
          `p99 ${(r.p99_us / 1000).toFixed(1)} ms, peak RSS ${(st.VmHWM / 1024).toFixed(0)} MB, threads up to ${maxThreads}, connect retries ${r.connect_retries}`,
      );
      await m.stop();
    }
  }
}

async function soak(argv) {
  const o = opts('soak', argv, { impls: ['node'], messages: 200000, shape: 's2', conc: 8, phases: 10 });
  console.log(
    `${o.messages} messages in a row, shape ${o.shape}, concurrency ${o.conc}, 100 per connection, in ${o.phases} phases; ` +
      'the first phase is the warm-up',
  );
  for (const impl of o.impls) {
    const m = await L.startMilter(impl, o.shape, L.socketFor(`soak-${impl}`));
    const per = Math.round(o.messages / o.phases);
    const rss = [];
    let total = 0;
    let bad = 0;
    const t0 = Date.now();
    for (let i = 0; i < o.phases; i++) {
      const r = await L.runLoadgen(m.socket, { conc: o.conc, perConn: 100, messages: per, timeout: 60 });
      total += r.messages;
      bad += r.errors + r.bad;
      rss.push(L.procStatus(m.pid).VmRSS);
    }
    const secs = (Date.now() - t0) / 1000;
    const growth = (rss[rss.length - 1] - rss[0]) / rss[0];
    console.log(
      `${impl.padEnd(4)} ${bad === 0 && m.alive() ? 'ok  ' : 'FAIL'} ${total} messages, ${(total / secs).toFixed(0)} msg/s; RSS after warm-up ` +
        `${(rss[0] / 1024).toFixed(1)} MB, at the end ${(rss[rss.length - 1] / 1024).toFixed(1)} MB (${(growth * 100).toFixed(1)}%, ` +
        `${growth < 0.1 ? 'under' : 'OVER'} the 10% limit); after each phase: ${rss.map((k) => (k / 1024).toFixed(1)).join(' ')} MB`,
    );
    await m.stop();
  }
}

async function bigbody(argv) {
  const o = opts('bigbody', argv, { impls: ['all'], mb: 10, count: 5, rounds: 3 });
  const bytes = Math.round(o.mb * 1024 * 1024);
  console.log(`${o.mb} MB body through the big shape (replacebody of the same size), ${o.count} messages on one connection, ${o.rounds} rounds`);
  const rates = {};
  for (let round = 0; round < o.rounds; round++) {
    for (const impl of o.impls) {
      const m = await L.startMilter(impl, 'big', L.socketFor(`big-${impl}`));
      L.resetPeak(m.pid);
      const r = await L.runLoadgen(m.socket, { conc: 1, perConn: o.count, messages: o.count, body: bytes, checkReplacedBody: true, timeout: 120 });
      const st = L.procStatus(m.pid);
      // MB/s of message body: each message carries the body in and the replaced body out.
      const mbps = (r.counted * o.mb) / r.seconds;
      (rates[impl] ??= []).push(mbps);
      const ok = r.errors === 0 && r.bad === 0;
      console.log(
        `round ${round + 1} ${impl.padEnd(4)} ${ok ? 'ok  ' : 'FAIL'} ${mbps.toFixed(1)} MB/s (${(r.p50_us / 1000).toFixed(0)} ms per message), ` +
          `replaced ${(r.replbody_bytes / 2 ** 20).toFixed(0)} MB, peak RSS ${(st.VmHWM / 1024).toFixed(0)} MB${r.first_error ? ` (${r.first_error})` : ''}`,
      );
      await m.stop();
    }
  }
  const med = Object.fromEntries(Object.entries(rates).map(([k, v]) => [k, L.median(v)]));
  console.log(`medians: ${Object.entries(med).map(([k, v]) => `${k} ${v.toFixed(1)} MB/s`).join(', ')}` +
    (med.node && med.c ? `; node/C ${(med.node / med.c).toFixed(2)}` : '') + (med.node && med.py ? `; node/py ${(med.node / med.py).toFixed(2)}` : ''));
}

const [cmd, ...rest] = process.argv.slice(2);
const cmds = { conns, soak, bigbody };
if (!cmds[cmd]) {
  console.error('usage: node bench/scale.cjs conns|soak|bigbody [--option value ...]');
  process.exit(2);
}
cmds[cmd](rest).then(
  () => process.exit(0),
  (err) => {
    console.error(L.errorText(err));
    process.exit(1);
  },
);
