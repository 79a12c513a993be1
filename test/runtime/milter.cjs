// A Base subclass served by runmilter with `workers` (test/runtime/*.test.ts,
// bench/workers.cjs). Every message gets `X-Stamp: <worker pid> g<generation>`
// at eom. Prints one JSON line per thing it sees: {"ev":"log",...} for the
// logger, {"ev":"listening"} from onListening, {"ev":"done"} or
// {"ev":"error",...} when runmilter settles.
//
// RUNTIME_CONFIG (JSON):
//   socket        where to listen (required)
//   workers       number or 'auto' (absent: one process, no supervisor)
//   drain         runmilter's drain (default 5000)
//   eomSleep      ms eom waits before answering (default 0)
//   restart       runmilter's restart policy
//   metricsListen runmilter's metricsListen
//   crash         'start': a worker exits with code 3 before runmilter;
//                 'start-once': only the first worker of generation 1 does
//   verdictFile   reading this file's content at eom ('reject' rejects): lets a
//                 test change the "code on disk" for a reload
//   dieAfter      a worker exits (process.exit(7)) after this many messages
//   crash: 'reload'  workers of generation 2 and later exit with code 3 at start-up
// SIGUSR2 to the supervisor calls reload() and prints {"ev":"reload","ok":...}.
'use strict';
const fs = require('node:fs');
const nm = require('../../dist/src/index.js');

const { Base, CONTINUE, REJECT, runmilter } = nm;
const cfg = JSON.parse(process.env.RUNTIME_CONFIG || '{}');
const worker = process.env.NODEMILTER_WORKER ? JSON.parse(process.env.NODEMILTER_WORKER) : undefined;
const out = (o) => process.stdout.write(JSON.stringify({ pid: process.pid, worker: worker?.id, gen: worker?.generation, ...o }) + '\n');
const logger = {
  info: (msg) => out({ ev: 'log', level: 'info', msg }),
  warn: (msg) => out({ ev: 'log', level: 'warn', msg }),
  error: (msg, err) => out({ ev: 'log', level: 'error', msg, err: err && err.message }),
};

if (worker && cfg.crash === 'reload' && worker.generation >= 2) {
  process.stderr.write('Error: the new code does not start (test fixture)\n');
  process.exit(3);
}
if (!worker) {
  process.on('SIGUSR2', () => {
    nm.reload().then(
      () => out({ ev: 'reload', ok: true }),
      (err) => out({ ev: 'reload', ok: false, name: err.name, message: err.message }),
    );
  });
}
if (worker && (cfg.crash === 'start' || (cfg.crash === 'start-once' && worker.generation === 1 && worker.id === 1 && !fs.existsSync(cfg.crashMark)))) {
  if (cfg.crashMark) fs.writeFileSync(cfg.crashMark, 'crashed');
  process.stderr.write('Error: the worker cannot start (test fixture)\n');
  process.exit(3);
}

// The "code on disk": read once when the process starts, as a module would be.
const verdict = cfg.verdictFile && fs.existsSync(cfg.verdictFile) ? fs.readFileSync(cfg.verdictFile, 'utf8').trim() : 'continue';
let messages = 0;

class Stamp extends Base {
  async eom() {
    out({ ev: 'eom', conn: this.id });
    if (cfg.eomSleep) await new Promise((r) => setTimeout(r, cfg.eomSleep));
    messages++;
    if (cfg.dieAfter && messages >= cfg.dieAfter) setImmediate(() => process.exit(7));
    if (verdict === 'reject') {
      this.setreply('550', '5.7.1', `rejected by ${process.pid}`);
      return REJECT;
    }
    this.addheader('X-Stamp', `${process.pid} g${worker?.generation ?? 0}`);
    return CONTINUE;
  }
}

runmilter('stamp', cfg.socket, {
  factory: Stamp,
  workers: cfg.workers,
  drain: cfg.drain ?? 5000,
  restart: cfg.restart,
  metricsListen: cfg.metricsListen,
  logger,
  onListening: () => out({ ev: 'listening' }),
}).then(
  () => out({ ev: 'done' }),
  (err) => {
    out({ ev: 'error', name: err.name, code: err.code, message: err.message });
    process.exitCode = 1;
  },
);
