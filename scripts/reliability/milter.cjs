// The milter the reliability scenarios run (tests, fuzzer, valgrind, the
// Postfix no-lost-mail run): the low-level `milter` module on libmilter, in a
// process of its own, or with `engine: 'node'` the same callbacks as a
// MilterDescription served by the TypeScript engine (`nodemilter/engine`). It stamps every message it passes with
// `X-Reliability: passed <conn>` at eom and keeps counts a test can check:
// abort and close per session (a second one is a bug and is printed as a
// "dup" event), handler failures, and on SIGUSR2 one "stats" line with the
// process's RSS, V8 heap and getdiag() (after a forced GC when started with
// --expose-gc).
//
// Configured by RELIABILITY_CONFIG (JSON):
//   socket          where to listen (required)
//   engine          'libmilter' (default: the milter module) or 'node' (serve())
//   quiet           print only ready/stats/dup/stopped lines (default false)
//   hangIn          callback whose handler never settles
//   throwIn         callback names whose handler throws ...
//   throwRate       ... with this probability (default 1)
//   blockIn         callback whose handler blocks the event loop ...
//   blockMs         ... for this many ms (busy loop), once per session whose
//                   HELO name is "block"
//   eomSleep        ms eom waits (async) before answering
//   eomProgress     call ctx.progress() every this many ms while eom sleeps
//   deadline, progressInterval, limits, noreply   register options (serve
//                   options on the TypeScript engine)
//   policy          exception policy status name
//   drain           ms to drain on SIGTERM (default 0)
//   oneMessage      sessions carry one message: a second abort is a dup
//   maxBuffered     bytes of body kept per message, counted (to show what
//                   a buffering milter holds); default 0: nothing kept
'use strict';
const path = require('node:path');
const dist = path.join(__dirname, '..', '..', 'dist', 'src');

const cfg = JSON.parse(process.env.RELIABILITY_CONFIG || '{}');
const engine = cfg.engine ?? 'libmilter';
if (engine !== 'libmilter' && engine !== 'node') {
  process.stderr.write(`RELIABILITY_CONFIG.engine must be 'libmilter' or 'node', got ${JSON.stringify(engine)}\n`);
  process.exit(64);
}
// The node engine never loads the native addon: status codes come from the
// engine-neutral constants (the same numbers the milter module exports).
const milter = engine === 'libmilter' ? require(path.join(dist, 'milter.js')) : require(path.join(dist, 'constants.js'));
const out = (o) => process.stdout.write(JSON.stringify(o) + '\n');
const say = cfg.quiet ? () => undefined : out;

const counts = { connects: 0, eomsStarted: 0, eoms: 0, aborts: 0, closes: 0, dupAborts: 0, dupCloses: 0, handlerErrors: 0, hung: 0, blocked: 0, headers: 0, bodyBytes: 0 };
// Per live session: its abort count and flags. A closed session's id goes
// into a bounded set, so a second close for it is seen and counted.
const live = new Map();
const closedRing = new Set();
const RING = 10000;

function sess(ctx) {
  let s = live.get(ctx.id);
  if (!s) {
    s = { aborts: 0, block: false, kept: 0 };
    live.set(ctx.id, s);
  }
  return s;
}

function maybeFail(name) {
  const t = cfg.throwIn;
  if (!t) return;
  const names = Array.isArray(t) ? t : [t];
  if (names.includes(name) && Math.random() < (cfg.throwRate ?? 1)) throw new Error(`storm in ${name}`);
}

function wrap(name, fn) {
  return function (ctx, ...args) {
    if (cfg.hangIn === name) {
      counts.hung++;
      say({ ev: 'hung', conn: ctx.id, in: name });
      return new Promise(() => undefined);
    }
    maybeFail(name);
    const s = sess(ctx);
    if (cfg.blockIn === name && s.block) {
      counts.blocked++;
      say({ ev: 'block-start', conn: ctx.id, at: Date.now() });
      const until = Date.now() + (cfg.blockMs ?? 2000);
      while (Date.now() < until) {
        /* the event loop is blocked on purpose */
      }
      say({ ev: 'block-end', conn: ctx.id, at: Date.now() });
    }
    return fn ? fn(ctx, s, ...args) : milter.CONTINUE;
  };
}

const callbacks = {
  connect: wrap('connect', (ctx) => {
    counts.connects++;
    return milter.CONTINUE;
  }),
  helo: wrap('helo', (ctx, s, name) => {
    if (name === 'block') s.block = true;
    return milter.CONTINUE;
  }),
  envfrom: wrap('envfrom'),
  envrcpt: wrap('envrcpt'),
  data: wrap('data'),
  header: wrap('header', () => {
    counts.headers++;
    return milter.CONTINUE;
  }),
  eoh: wrap('eoh'),
  body: wrap('body', (ctx, s, chunk) => {
    counts.bodyBytes += chunk.length;
    if (cfg.maxBuffered) s.kept = Math.min(cfg.maxBuffered, s.kept + chunk.length);
    return milter.CONTINUE;
  }),
  unknown: wrap('unknown'),
  eom: wrap('eom', async (ctx, s) => {
    counts.eomsStarted++;
    if (cfg.eomSleep) {
      let timer;
      if (cfg.eomProgress) timer = setInterval(() => { try { ctx.progress(); } catch { /* answered */ } }, cfg.eomProgress);
      await new Promise((r) => setTimeout(r, cfg.eomSleep));
      if (timer) clearInterval(timer);
    }
    ctx.addheader('X-Reliability', `passed ${ctx.id}`);
    counts.eoms++;
    say({ ev: 'eom', conn: ctx.id });
    return milter.CONTINUE;
  }),
  abort(ctx) {
    counts.aborts++;
    const s = sess(ctx);
    s.aborts++;
    if (cfg.oneMessage && s.aborts > 1) {
      counts.dupAborts++;
      out({ ev: 'dup', what: 'abort', conn: ctx.id });
    }
    say({ ev: 'abort', conn: ctx.id });
  },
  close(ctx) {
    if (closedRing.has(ctx.id)) {
      counts.dupCloses++;
      out({ ev: 'dup', what: 'close', conn: ctx.id });
      return;
    }
    counts.closes++;
    closedRing.add(ctx.id);
    if (closedRing.size > RING) closedRing.delete(closedRing.values().next().value);
    live.delete(ctx.id);
    say({ ev: 'close', conn: ctx.id });
    maybeFail('close');
  },
};

function onLimit(info) {
  counts.limitExceeded = (counts.limitExceeded ?? 0) + 1;
  say({ ev: 'limitExceeded', ...info });
}
function onHandlerError(err, info) {
  counts.handlerErrors++;
  // Even when quiet: the first 50, so a run shows what failed.
  (counts.handlerErrors <= 50 ? out : say)({ ev: 'handlerError', message: err.message, callback: info.callback, conn: info.connection });
}

const opts = { deadline: cfg.deadline, progressInterval: cfg.progressInterval, noreply: cfg.noreply };
if (cfg.limits) opts.limits = cfg.limits;

// The engine's counters. created/deleted/active: engine sessions begun and
// ended (the libmilter engine: libmilter's contexts; the TypeScript engine:
// one per MTA session that reached a handled callback). `held`: the
// per-session objects the engine keeps in JavaScript (libmilter: its JS
// session records, `jsSessions`; node: the Connection objects in the
// server's set, one per open MTA connection). Once every MTA connection has
// gone, created = deleted and held = 0 on both.
let server;
function diag() {
  if (engine === 'libmilter') {
    const d = milter.getdiag();
    return { ...d, held: d.jsSessions };
  }
  if (!server) return undefined;
  return { ...server.getdiag(), held: server.connectionCount };
}

function stats() {
  const m = process.memoryUsage();
  return { ev: 'stats', engine, gc: !!global.gc, rss: m.rss, heapUsed: m.heapUsed, heapTotal: m.heapTotal, external: m.external, arrayBuffers: m.arrayBuffers, live: live.size, closedRing: closedRing.size, counts: { ...counts }, diag: diag() };
}
process.on('SIGUSR2', () => {
  if (global.gc) global.gc();
  out(stats());
});
process.on('SIGTERM', () => {
  const t0 = Date.now();
  const drain = cfg.drain ?? 0;
  // Draining starts inside stop()/close(); report it only then, since tests connect on seeing it.
  const stopping = engine === 'libmilter' ? milter.stop({ drain }) : server ? server.close({ drain }) : Promise.resolve();
  stopping.then(() => {
    out({ ...stats(), ev: 'stopped', ms: Date.now() - t0 });
  });
  out({ ev: 'sigterm', drain });
});

if (engine === 'libmilter') {
  milter.events.on('limitExceeded', onLimit);
  milter.events.on('handlerError', onHandlerError);
  if (cfg.policy) milter.set_exception_policy(milter[cfg.policy]);
  milter.register('reliability', callbacks, opts);
  // Signal handlers are in place before the socket accepts connections.
  milter.setconn(cfg.socket);
  milter.opensocket(true);
  milter.main().then(
    () => out({ ev: 'main-resolved' }),
    (err) => {
      out({ ev: 'main-rejected', message: err.message });
      process.exitCode = 2;
    },
  );
  out({ ev: 'ready', pid: process.pid });
} else {
  const { serve } = require(path.join(dist, 'engine', 'index.js'));
  const description = { name: 'reliability', callbacks, noreply: cfg.noreply };
  serve(description, {
    socket: cfg.socket,
    deadline: cfg.deadline,
    progressInterval: cfg.progressInterval,
    exceptionPolicy: cfg.policy ? milter[cfg.policy] : undefined,
    limits: cfg.limits,
  }).then(
    (s) => {
      server = s;
      s.on('handlerError', onHandlerError);
      s.on('limitExceeded', onLimit);
      s.on('close', () => out({ ev: 'main-resolved' }));
      out({ ev: 'ready', pid: process.pid, engine });
    },
    (err) => {
      out({ ev: 'main-rejected', message: err.message });
      process.exitCode = 2;
    },
  );
}
