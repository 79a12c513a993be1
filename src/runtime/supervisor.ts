/**
 * The supervisor of runmilter's `workers`: it opens the listening socket
 * once, starts N worker processes that each serve that descriptor (the
 * kernel's accept spreads the connections), replaces a worker that dies
 * (exponential backoff, crash-loop limit), reloads without closing the
 * socket (new workers from the code on disk first, then the old ones
 * drain), and serves the workers' metrics merged.
 *
 * A worker is this script run again (`process.execArgv`, `process.argv`)
 * with {@link WORKER_ENV} set and the socket on descriptor {@link WORKER_FD}:
 * its runmilter call sees the variable and serves `fd:3` instead of
 * supervising.
 *
 * @internal
 * @module
 */
import { spawn, type ChildProcess } from 'node:child_process';
import * as dns from 'node:dns';
import * as net from 'node:net';
import * as os from 'node:os';
import { getSystemErrorName } from 'node:util';

import { InvalidArgumentError, InvalidSocketError, MilterStateError, WorkerCrashLoopError } from '../errors';
import { formatPrometheus, mergeSnapshots, metricFamilies, type MetricFamily, type MetricsSnapshot } from '../metrics';
import { parseSocketSpec, removeUnixSocket } from '../socketspec';
import type { Logger } from '../types';
import { serveMetrics, type MetricsEndpoint } from './metrics-http';
import { notifyReady } from './notify';
import { WORKER_ENV, WORKER_FD, type FromWorker, type ToWorker, type WorkerInfo } from './protocol';

/** How the supervisor replaces workers that die. */
export interface RestartPolicy {
  /** Milliseconds before the first restart after a failure (default 500); doubled for each failure in a row. */
  initialDelay?: number;
  /** The longest wait between restarts (default 30000). */
  maxDelay?: number;
  /** Failures in a row after which the supervisor gives up and stops (default 5). */
  limit?: number;
  /** A worker that served this many ms ends the run of failures (default 10000). */
  stableAfter?: number;
  /** Milliseconds a new worker has to start serving before it counts as failed (default 30000). */
  readyTimeout?: number;
}

/** The number of workers `option` asks for, or undefined for none. @internal */
export function checkWorkers(option: unknown): number | undefined {
  if (option === undefined) return undefined;
  if (option === 'auto') return Math.max(1, os.availableParallelism?.() ?? os.cpus().length);
  if (typeof option !== 'number' || !Number.isInteger(option) || option < 1 || option > 1024) {
    throw new InvalidArgumentError(`workers must be an integer 1-1024 or 'auto', got ${JSON.stringify(option)}`);
  }
  return option;
}

function checkPolicy(p: RestartPolicy | undefined): Required<RestartPolicy> {
  const r = { initialDelay: 500, maxDelay: 30_000, limit: 5, stableAfter: 10_000, readyTimeout: 30_000, ...p };
  for (const [k, v] of Object.entries(r)) {
    if (typeof v !== 'number' || !Number.isFinite(v) || v < 0 || (k === 'limit' && (!Number.isInteger(v) || v < 1))) {
      throw new InvalidArgumentError(`restart.${k} must be a ${k === 'limit' ? 'positive integer' : 'number of ms >= 0'}, got ${JSON.stringify(v)}`);
    }
  }
  return r;
}

/** Options of {@link Supervisor}. */
export interface SupervisorOptions {
  name: string;
  socket: string;
  workers: number;
  engine: 'libmilter' | 'node';
  drain: number;
  logger: Logger;
  signals: readonly NodeJS.Signals[];
  reloadSignal: NodeJS.Signals | null;
  umask: number;
  backlog?: number;
  restart?: RestartPolicy;
  metricsListen?: string;
  /** Whether workers keep metrics (for metricsListen, or a metrics object in the worker's options). */
  metrics: boolean;
  onListening?: () => void;
  /** The worker's command line after the node binary (default: this process's execArgv and argv). */
  workerArgs?: readonly string[];
}

type WorkerState = 'starting' | 'serving' | 'draining' | 'exited';

interface Worker {
  id: number;
  generation: number;
  child: ChildProcess;
  pid: number;
  state: WorkerState;
  startedAt: number;
  servingAt?: number;
  /** Set when the supervisor asked it to stop: its exit is no failure. */
  retiring: boolean;
  /** Started by a reload that has not committed: if it dies, the reload fails (no restart). */
  candidate: boolean;
  exited: Promise<void>;
  ready: Promise<boolean>;
  stderrTail: string;
  /** The start of the last crash report of the addon on its stderr (its backtrace can push the start out of stderrTail). */
  crashReport?: string;
  snapshot?: MetricsSnapshot;
}

/** An open listening socket held by the supervisor (never accepted on here). */
interface Listener {
  fd: number;
  /** The TCP port bound (for `inet:0`). */
  port?: number;
  close(): void;
}

/** The supervisor: {@link run} resolves when it has stopped. */
export class Supervisor {
  private readonly o: SupervisorOptions;
  private readonly policy: Required<RestartPolicy>;
  private readonly log: Logger;
  private listener: Listener | undefined;
  private readonly workers = new Set<Worker>();
  private generation = 0;
  private failures = 0;
  private lastFailure = '';
  private restarts = 0;
  private reloads = 0;
  private stopping: Promise<void> | undefined;
  /** Why the supervisor gave up, once it has. */
  private failed: Error | undefined;
  private reloading: Promise<void> | undefined;
  /** The reload asked for while one ran: it starts when that one ends. */
  private reloadAgain: Promise<void> | undefined;
  private readonly timers = new Set<NodeJS.Timeout>();
  private announced = false;
  /** What the workers that are gone had counted (sessions open in them: none). */
  private retired: MetricsSnapshot | undefined;
  private metricsSeq = 0;
  private endpoint: MetricsEndpoint | undefined;
  private finish!: (err?: Error) => void;
  private readonly done: Promise<void>;

  constructor(options: SupervisorOptions) {
    this.o = options;
    this.policy = checkPolicy(options.restart);
    this.log = options.logger;
    this.done = new Promise<void>((resolve, reject) => {
      this.finish = (err) => (err ? reject(err) : resolve());
    });
    if (options.workerArgs === undefined && !process.argv[1]) {
      throw new MilterStateError('runmilter workers run this script again, but the process has no script (process.argv[1]); use a file, not node -e');
    }
  }

  /** Open the socket, start the workers, serve until stopped; rejects when it gives up on a crash loop. */
  async run(): Promise<void> {
    const { name } = this.o;
    const onStop = (sig: NodeJS.Signals) => {
      if (this.stopping) {
        this.log.warn(`${name}: ${sig} again, still draining`);
        return;
      }
      void this.stop(`${sig}`);
    };
    const onReload = (sig: NodeJS.Signals) => {
      this.log.info(`${name}: ${sig}: reloading the workers`);
      this.reload().catch(() => undefined); // reload() logs its failure
    };
    for (const s of this.o.signals) process.on(s, onStop);
    if (this.o.reloadSignal) process.on(this.o.reloadSignal, onReload);
    try {
      this.listener = await openListener(this.o.socket, this.o.umask);
      this.log.info(`${name}: supervisor (pid ${process.pid}) listening on ${this.o.socket}${this.listener.port !== undefined && /^inet6?:0(@|$)/i.test(this.o.socket) ? ` (port ${this.listener.port})` : ''}; starting ${this.o.workers} worker${this.o.workers === 1 ? '' : 's'} on the ${this.o.engine} engine`);
      if (this.o.metricsListen !== undefined) this.endpoint = await serveMetrics(this.o.metricsListen, () => this.prometheus(), this.log, name);
      this.generation = 1;
      for (let i = 1; i <= this.o.workers; i++) this.startWorker(i, 1);
      await this.done;
    } finally {
      for (const s of this.o.signals) process.removeListener(s, onStop);
      if (this.o.reloadSignal) process.removeListener(this.o.reloadSignal, onReload);
    }
  }

  /** Once, when N workers serve for the first time (some may be replacements of workers that died starting). */
  private announce(): void {
    if (this.announced || this.stopping) return;
    if ([...this.workers].filter((w) => w.state === 'serving').length < this.o.workers) return;
    this.announced = true;
    const { name } = this.o;
    this.log.info(`${name}: ${this.o.workers} worker${this.o.workers === 1 ? '' : 's'} serving`);
    notifyReady(`${this.o.workers} workers serving ${this.o.socket}`, this.log, name);
    this.o.onListening?.();
  }

  /**
   * New workers from the code on disk; once all serve, the old ones drain
   * (SIGTERM: they stop accepting, finish their sessions, exit). A call
   * while one runs asks for one more after it: the running one's workers may
   * have loaded the code before the change that prompted the call. Calls
   * meanwhile share that one.
   */
  reload(): Promise<void> {
    if (this.stopping) return Promise.reject(new MilterStateError('reload(): the milter is stopping'));
    if (!this.reloading) {
      this.reloading = this.doReload().finally(() => {
        this.reloading = undefined;
      });
      return this.reloading;
    }
    if (!this.reloadAgain) {
      this.log.info(`${this.o.name}: reload: one is running; another follows it`);
      this.reloadAgain = this.reloading
        .catch(() => undefined)
        .then(() => {
          this.reloadAgain = undefined;
          return this.reload();
        });
    }
    return this.reloadAgain;
  }

  private async doReload(): Promise<void> {
    const { name } = this.o;
    const old = [...this.workers].filter((w) => w.state !== 'exited');
    const gen = ++this.generation;
    const fresh = Array.from({ length: this.o.workers }, (_, i) => this.startWorker(i + 1, gen));
    for (const w of fresh) w.candidate = true;
    const ok = await Promise.all(fresh.map((w) => w.ready));
    for (const w of fresh) w.candidate = false;
    if (!ok.every(Boolean) || this.stopping) {
      const err = new MilterStateError(`reload failed: ${this.lastFailure || 'the new workers did not start'}; the old workers keep serving`);
      this.log.error(`${name}: ${err.message}`);
      for (const w of fresh) this.retire(w, 'reload failed');
      // The old workers are the current generation again: their crashes are replaced as before.
      this.generation = old.length ? Math.max(...old.map((w) => w.generation)) : gen;
      throw err;
    }
    this.reloads++;
    this.log.info(`${name}: reload: ${fresh.length} new worker${fresh.length === 1 ? '' : 's'} (generation ${gen}) serving; draining ${old.length} old`);
    for (const w of old) this.retire(w, `replaced by generation ${gen}`, 'SIGTERM');
    await Promise.all(old.map((w) => w.exited));
    this.log.info(`${name}: reload done`);
  }

  /** Stop every worker (new sessions refused, open ones drained), then close the socket. */
  stop(why: string): Promise<void> {
    if (this.stopping) return this.stopping;
    this.stopping = (async () => {
      const { name } = this.o;
      for (const t of this.timers) clearTimeout(t);
      this.timers.clear();
      const live = [...this.workers].filter((w) => w.state !== 'exited');
      this.log.info(`${name}: ${why}: stopping ${live.length} worker${live.length === 1 ? '' : 's'} (each drains for up to ${this.o.drain} ms)`);
      for (const w of live) this.retire(w, why);
      await Promise.all(live.map((w) => w.exited));
      this.listener?.close();
      const spec = parseSocketSpec(this.o.socket);
      if (spec.kind === 'unix') {
        const err = removeUnixSocket(spec.path);
        if (err) this.log.warn(`could not remove socket ${spec.path}: ${err.message}`);
      }
      await this.endpoint?.close();
      this.log.info(`${name}: stopped`);
      this.finish(this.failed);
    })();
    return this.stopping;
  }

  /** Ask `w` to stop: by IPC (mode refuse: the socket goes away with us) or SIGTERM (hand off to the other workers). */
  private retire(w: Worker, reason: string, how: 'ipc' | 'SIGTERM' = 'ipc'): void {
    if (w.state === 'exited' || w.retiring) return;
    w.retiring = true;
    if (w.state !== 'serving') {
      w.child.kill('SIGKILL'); // not serving yet: no session to drain
      return;
    }
    w.state = 'draining';
    if (how === 'SIGTERM') w.child.kill('SIGTERM');
    else sendTo(w, { type: 'stop', mode: 'refuse', reason });
    // A worker whose script keeps running after runmilter returned, or that hangs.
    const t = setTimeout(() => {
      if (w.state === 'exited') return;
      this.log.warn(`${this.o.name}: worker ${w.id} (pid ${w.pid}) still running ${this.o.drain + 10_000} ms after it was asked to stop; killing it`);
      w.child.kill('SIGKILL');
    }, this.o.drain + 10_000);
    t.unref();
  }

  private startWorker(id: number, generation: number): Worker {
    const info: WorkerInfo = { id, generation, engine: this.o.engine, socket: this.o.socket, metrics: this.o.metrics };
    const args = this.o.workerArgs ?? [...process.execArgv, ...process.argv.slice(1)];
    const child = spawn(process.execPath, args, {
      stdio: ['ignore', 'inherit', 'pipe', this.listener!.fd, 'ipc'],
      // NOTIFY_SOCKET: systemd hears from the supervisor only.
      env: { ...process.env, NOTIFY_SOCKET: undefined, [WORKER_ENV]: JSON.stringify(info) },
    });
    let markReady!: (ok: boolean) => void;
    let markExited!: () => void;
    const w: Worker = {
      id,
      generation,
      child,
      pid: child.pid ?? -1,
      state: 'starting',
      startedAt: Date.now(),
      retiring: false,
      candidate: false,
      stderrTail: '',
      ready: new Promise<boolean>((r) => (markReady = r)),
      exited: new Promise<void>((r) => (markExited = r)),
    };
    this.workers.add(w);
    child.stderr!.on('data', (d: Buffer) => {
      process.stderr.write(d);
      const text = d.toString('utf8');
      const joined = w.stderrTail + text;
      const at = joined.lastIndexOf(CRASH_BANNER);
      if (at >= 0 && at >= joined.length - text.length - CRASH_BANNER.length) w.crashReport = joined.slice(at, at + 2000);
      else if (w.crashReport !== undefined && w.crashReport.length < 2000) w.crashReport = (w.crashReport + text).slice(0, 2000);
      w.stderrTail = joined.slice(-4000);
    });
    const readyTimer = setTimeout(() => {
      if (w.state !== 'starting') return;
      this.lastFailure = `worker ${id} (pid ${w.pid}) did not serve within ${this.policy.readyTimeout} ms`;
      this.log.error(`${this.o.name}: ${this.lastFailure}; killing it`);
      child.kill('SIGKILL');
    }, this.policy.readyTimeout);
    child.on('message', (m: FromWorker) => {
      if (!m || typeof m !== 'object') return;
      if (m.type === 'ready' && w.state === 'starting') {
        clearTimeout(readyTimer);
        w.state = 'serving';
        w.servingAt = Date.now();
        markReady(true);
        this.announce();
      } else if (m.type === 'metrics' || m.type === 'stopped') {
        if (m.snapshot) w.snapshot = m.snapshot;
        if (m.type === 'metrics') this.pending.get(m.seq)?.(w);
      }
    });
    child.on('error', (err) => this.log.error(`${this.o.name}: worker ${id}: ${err.message}`, err));
    child.on('exit', (code, signal) => {
      clearTimeout(readyTimer);
      const wasServing = w.servingAt !== undefined;
      const served = wasServing ? Date.now() - w.servingAt! : 0;
      w.state = 'exited';
      this.workers.delete(w);
      if (w.snapshot) {
        const gone = w.snapshot.engine ? { ...w.snapshot, engine: { ...w.snapshot.engine, active: 0 } } : w.snapshot;
        this.retired = mergeSnapshots(this.retired ? [this.retired, gone] : [gone]);
      }
      markReady(false);
      markExited();
      if (w.retiring) return;
      const why = exitReason(code, signal, w.stderrTail, w.crashReport);
      const when = wasServing ? `after serving ${(served / 1000).toFixed(1)} s` : 'before it served';
      this.lastFailure = `worker ${id} (pid ${w.pid}) ${why} ${when}`;
      if (this.stopping) return;
      if (w.candidate) {
        this.log.error(`${this.o.name}: reload: ${this.lastFailure}`);
        return;
      }
      if (wasServing && served >= this.policy.stableAfter) this.failures = 0;
      this.failures++;
      if (generation !== this.generation) {
        // A worker of a reload in progress (the reload sees it fail) or of an old generation being replaced.
        this.log.error(`${this.o.name}: ${this.lastFailure}`);
        return;
      }
      if (this.failures > this.policy.limit) {
        const err = new WorkerCrashLoopError(
          `${this.o.name}: giving up: workers failed ${this.failures} times in a row, none serving ${this.policy.stableAfter} ms (restart.limit ${this.policy.limit}); last: ${this.lastFailure}`,
          this.failures,
        );
        this.log.error(err.message);
        this.failed = err;
        void this.stop('crash loop');
        return;
      }
      const delay = Math.min(this.policy.maxDelay, this.policy.initialDelay * 2 ** (this.failures - 1));
      this.log.error(`${this.o.name}: ${this.lastFailure}; starting a new worker ${id} in ${delay} ms (failure ${this.failures} of at most ${this.policy.limit} in a row)`);
      const t = setTimeout(() => {
        this.timers.delete(t);
        if (this.stopping || generation !== this.generation) return;
        this.restarts++;
        const nw = this.startWorker(id, generation);
        void nw.ready.then((ok) => {
          if (ok) this.log.info(`${this.o.name}: worker ${id} (pid ${nw.pid}) serving again`);
        });
      }, delay);
      this.timers.add(t);
    });
    return w;
  }

  private readonly pending = new Map<number, (w: Worker) => void>();

  /** Every serving worker's snapshot, asked for now (the last one known after 1 s), plus those of workers gone. */
  private async prometheus(): Promise<string> {
    const live = [...this.workers].filter((w) => w.state === 'serving' || w.state === 'draining');
    if (this.o.metrics) {
      const seq = ++this.metricsSeq;
      await new Promise<void>((resolve) => {
        const waiting = new Set(live);
        const t = setTimeout(done, 1000);
        function done() {
          clearTimeout(t);
          resolve();
        }
        this.pending.set(seq, (w) => {
          waiting.delete(w);
          if (waiting.size === 0) done();
        });
        if (waiting.size === 0) done();
        for (const w of live) sendTo(w, { type: 'metrics', seq });
      });
      this.pending.delete(seq);
    }
    const merged = mergeSnapshots([...(this.retired ? [this.retired] : []), ...live.flatMap((w) => (w.snapshot ? [w.snapshot] : []))]);
    return formatPrometheus([...metricFamilies(merged), ...this.families()]);
  }

  /** The supervisor's own metrics. */
  private families(): MetricFamily[] {
    const count = (st: WorkerState) => [...this.workers].filter((w) => w.state === st).length;
    return [
      {
        name: 'nodemilter_workers',
        help: 'Worker processes by state.',
        type: 'gauge',
        values: (['starting', 'serving', 'draining'] as const).map((state) => ({ labels: { state }, value: count(state) })),
      },
      { name: 'nodemilter_worker_restarts_total', help: 'Workers started again after one died.', type: 'counter', values: [{ labels: {}, value: this.restarts }] },
      { name: 'nodemilter_reloads_total', help: 'Reloads completed (new workers serving, old ones drained).', type: 'counter', values: [{ labels: {}, value: this.reloads }] },
    ];
  }

}

function sendTo(w: Worker, m: ToWorker): void {
  if (w.child.connected) w.child.send(m, undefined, undefined, () => undefined);
}

const CRASH_BANNER = '==== nodemilter crash report';

/**
 * Why a worker ended, in words: from the addon's crash report if it wrote
 * one (its signal and thread lines say what happened where), else with the
 * last line of its stderr that looks like an error.
 */
function exitReason(code: number | null, signal: NodeJS.Signals | null, stderr: string, crashReport?: string): string {
  let why: string;
  if (signal === 'SIGKILL') why = 'was killed by SIGKILL (kill -9, or the kernel out of memory)';
  else if (signal) why = `was killed by ${signal}`;
  else if (code === 0) why = 'exited with code 0 without being asked to (process.exit?)';
  else if (code === 134) why = 'exited with code 134 (aborted: out of heap memory?)';
  else why = `exited with code ${code}`;
  if (crashReport) {
    const report = crashReport.split('\n').map((l) => l.trim());
    const said = ['nodemilter: signal ', 'nodemilter: thread '].flatMap((p) => report.find((l) => l.startsWith(p))?.slice('nodemilter: '.length) ?? []);
    if (said.length) return `${why}; its crash report said: ${said.join('; ').slice(0, 300)}`;
  }
  const lines = stderr.split('\n').map((l) => l.trim()).filter(Boolean);
  const last = [...lines].reverse().find((l) => /error|fatal|abort|heap/i.test(l)) ?? lines[lines.length - 1];
  return last ? `${why}; its stderr said: ${last.slice(0, 300)}` : why;
}

type ServerHandle = { fd: number; close(): void };
type CreateServerHandle = (address: string | null, port: number, addressType: number, fd?: number, flags?: number) => ServerHandle | number;

/**
 * Open the socket for the workers: bound, and not accepted on here. Node's
 * net.Server would accept in this process too, so the handle comes from
 * `net._createServerHandle` (what the cluster module uses): bound, not yet
 * listening; the first worker's listen() makes it listen for all of them.
 */
async function openListener(socket: string, umask: number): Promise<Listener> {
  const spec = parseSocketSpec(socket);
  if (spec.kind === 'fd') return { fd: spec.fd, close: () => undefined };
  const create = (net as unknown as { _createServerHandle?: CreateServerHandle })._createServerHandle;
  if (typeof create !== 'function') throw new MilterStateError(`workers need net._createServerHandle, which this Node (${process.version}) lacks`);
  let handle: ServerHandle | number;
  if (spec.kind === 'unix') {
    removeUnixSocket(spec.path);
    const old = process.umask(umask);
    try {
      handle = create(spec.path, -1, -1);
    } finally {
      process.umask(old);
    }
  } else {
    const family = spec.kind === 'inet6' ? 6 : 4;
    let host = !spec.host || spec.host === 'INADDR_ANY' ? (family === 6 ? '::' : '0.0.0.0') : spec.host;
    if (net.isIP(host) !== family) host = (await dns.promises.lookup(host, { family })).address;
    // 1: UV_TCP_IPV6ONLY, as the TypeScript engine listens on inet6 (ipv6Only).
    handle = create(host, spec.port, family, undefined, family === 6 ? 1 : 0);
  }
  if (typeof handle === 'number') {
    throw new InvalidSocketError(`cannot listen on ${socket}: ${getSystemErrorName(handle)}`);
  }
  const h = handle;
  const bound: { port?: number } = {};
  (h as unknown as { getsockname?: (o: object) => number }).getsockname?.(bound);
  return { fd: h.fd, port: bound.port, close: () => h.close() };
}
