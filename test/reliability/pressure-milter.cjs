// A milter on the TypeScript engine for the flow-control tests
// (pressure.test.ts), in a process of its own so that its memory is
// measured apart from the test's. Samples process.memoryUsage() every 10 ms
// and keeps the peaks; prints one JSON line per event:
//   {"ev":"ready"}                      listening
//   {"ev":"stats", ...}                 on SIGUSR2 (after a GC with --expose-gc):
//                                       now, peak since the last SIGUSR1, counters
// SIGUSR1 resets the peaks (after a GC). Configured by PRESSURE_CONFIG (JSON):
//   socket        where to listen
//   mode          'body'        body() waits bodyMs (default 10) per chunk
//                 'replacebody' eom replaces the body with replaceBytes bytes
//                 'addheader'   eom adds `headers` headers
//   gcEvery       ms between forced GCs; the stats' peak.retained is the most held after one
//   noreply       no-reply callbacks (e.g. ["body"])
//   serve         more serve() options (maxSessions, writeTimeout ...)
'use strict';
const path = require('node:path');
const dist = path.join(__dirname, '..', '..', 'dist', 'src');
const { serve } = require(path.join(dist, 'engine', 'index.js'));
const C = require(path.join(dist, 'constants.js'));

const cfg = JSON.parse(process.env.PRESSURE_CONFIG || '{}');
const out = (o) => process.stdout.write(JSON.stringify(o) + '\n');
const counts = { bodyChunks: 0, bodyBytes: 0, eoms: 0, errors: 0 };
const peak = { rss: 0, arrayBuffers: 0, external: 0 };
const sample = () => {
  // memoryUsage() reads /proc: it throws EMFILE when the process is out of descriptors.
  let m;
  try {
    m = process.memoryUsage();
  } catch {
    return { rss: 0, arrayBuffers: 0, external: 0 };
  }
  peak.rss = Math.max(peak.rss, m.rss);
  peak.arrayBuffers = Math.max(peak.arrayBuffers, m.arrayBuffers);
  peak.external = Math.max(peak.external, m.external);
  return m;
};
setInterval(sample, 10).unref();
// With gcEvery: a GC that often, and the peak of what is still held after it
// (retained memory, apart from garbage not yet collected).
if (cfg.gcEvery && global.gc) {
  setInterval(() => {
    global.gc();
    const m = process.memoryUsage();
    peak.retained = Math.max(peak.retained ?? 0, m.arrayBuffers);
  }, cfg.gcEvery).unref();
}

const callbacks = {
  connect: () => C.CONTINUE,
  eom(ctx) {
    counts.eoms++;
    if (cfg.mode === 'replacebody') {
      ctx.replacebody(Buffer.alloc(cfg.replaceBytes, 0x61));
    } else if (cfg.mode === 'addheader') {
      const value = 'v'.repeat(cfg.headerValue ?? 100);
      for (let i = 0; i < cfg.headers; i++) ctx.addheader(`X-Pressure-${i}`, value);
    }
    return C.CONTINUE;
  },
};
if (cfg.mode === 'body') {
  callbacks.body = async (ctx, chunk) => {
    counts.bodyChunks++;
    counts.bodyBytes += chunk.length;
    await new Promise((r) => setTimeout(r, cfg.bodyMs ?? 10));
    return C.CONTINUE;
  };
}

let server;
process.on('SIGUSR1', () => {
  if (global.gc) global.gc();
  const m = sample();
  peak.rss = m.rss;
  peak.arrayBuffers = m.arrayBuffers;
  peak.external = m.external;
  peak.retained = m.arrayBuffers;
  out({ ev: 'reset' });
});
process.on('SIGUSR2', () => {
  const before = sample();
  if (global.gc) global.gc();
  const m = process.memoryUsage();
  out({ ev: 'stats', now: { rss: m.rss, arrayBuffers: m.arrayBuffers }, before: { rss: before.rss, arrayBuffers: before.arrayBuffers }, peak: { ...peak }, counts, diag: server.getdiag(), open: server.connectionCount });
});

serve({ name: 'pressure', callbacks, noreply: cfg.noreply }, { socket: cfg.socket, logger: { info() {}, warn: (m) => out({ ev: 'log', level: 'warn', m }), error: (m) => out({ ev: 'log', level: 'error', m }), debug() {} }, ...cfg.serve }).then(
  (s) => {
    server = s;
    s.on('handlerError', (err) => {
      counts.errors++;
      out({ ev: 'handlerError', message: err.message, code: err.code });
    });
    out({ ev: 'ready', pid: process.pid });
  },
  (err) => {
    out({ ev: 'failed', message: err.message });
    process.exit(2);
  },
);
