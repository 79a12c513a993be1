/**
 * runmilter: serve a {@link Base} subclass the way pymilter's
 * `Milter.runmilter` does, plus what a deployment needs: socket
 * permissions, a graceful drain on SIGTERM/SIGINT, clean-up of the unix
 * socket, metrics, and optionally several worker processes on one socket
 * under a supervisor (crash isolation, zero-downtime reload). One life
 * cycle (src/runtime/lifecycle.ts) over either engine.
 *
 * @module
 */
import { describe as describeMilter } from './base';
import type { MilterFactory } from './base';
import { InvalidArgumentError, MilterStateError } from './errors';
import { checkDrain, checkSessionCap } from './engine/dispatch';
import { MilterMetrics } from './metrics';
import { parseSocketSpec, refuseNonSocket } from './socketspec';
import type { Logger, MilterDescription } from './types';
import { chooseEngine, resolveEngine, type EngineName, type EngineOptions, type EngineSetup, type MilterEngine } from './runtime/engine';
import { serveEngine } from './runtime/lifecycle';
import { serveMetrics } from './runtime/metrics-http';
import { WORKER_FD, workerInfo } from './runtime/protocol';
import { Supervisor, checkWorkers, type RestartPolicy } from './runtime/supervisor';

export { chooseEngine };
export type { EngineName };

/** Options of {@link runmilter}: the engine's settings ({@link EngineOptions}) and the life cycle's. */
export interface RunmilterOptions extends EngineOptions {
  /** The milter: a Base subclass (one instance per connection) or a function returning an instance. */
  factory: MilterFactory;
  /** Milliseconds to let open sessions finish after SIGTERM/SIGINT before stopping (default 30000). */
  drain?: number;
  /** Signals that stop the milter gracefully (default SIGTERM and SIGINT). `[]`: install no handler. */
  signals?: NodeJS.Signals[];
  /** Where to log (console by default; pino fits). */
  logger?: Logger;
  /** Called once the socket is open and the milter serves (with workers: once every worker serves). */
  onListening?: () => void;
  /**
   * Which engine serves: `'libmilter'` (the native addon on libmilter),
   * `'node'` (the milter protocol in TypeScript, `nodemilter/engine`; no
   * addon or libmilter needed), or `'auto'` (libmilter when the addon
   * loads; otherwise say so once and serve on `'node'`). Default: the
   * `NODEMILTER_ENGINE` environment variable if set, else `'libmilter'`,
   * which rejects with a {@link NativeLoadError} naming the other engines
   * when the addon cannot load. See docs/engine.md.
   */
  engine?: EngineName;
  /**
   * Count and time the callbacks, and read the engine's counters, in this
   * {@link MilterMetrics} (either engine, the same way). With `workers`,
   * each worker keeps its own and the supervisor merges them.
   */
  metrics?: MilterMetrics;
  /**
   * Serve the metrics in Prometheus' text format over HTTP at
   * `http://HOST:PORT/metrics`: `'PORT'`, `'HOST:PORT'` or `'[v6]:PORT'`.
   * Without `metrics`, a {@link MilterMetrics} is made. With `workers`, the
   * supervisor serves the sum over its workers.
   */
  metricsListen?: string;
  /**
   * Serve with N worker processes (`'auto'`: one per CPU) under a
   * supervisor that opens the socket once and hands it to each worker; the
   * kernel spreads connections among them. A worker that dies is replaced
   * (with backoff, up to the `restart` limit); SIGHUP (`reloadSignal`) or
   * {@link reload} starts new workers from the code on disk and then drains
   * the old ones, without closing the socket. Each worker runs this script
   * again (`process.argv`), so everything up to this call runs in every
   * worker (and `onListening` in each worker as well as in the
   * supervisor). Default: the `NODEMILTER_WORKERS` environment variable if
   * set, else no workers: one process, as before. See docs/service.md.
   */
  workers?: number | 'auto';
  /** With `workers`: the signal that reloads (default `'SIGHUP'`; `null`: none). */
  reloadSignal?: NodeJS.Signals | null;
  /** With `workers`: how dead workers are replaced. */
  restart?: RestartPolicy;
}

/** The supervisor of the {@link runmilter} call running in this process, if it has workers. */
let supervisor: Supervisor | undefined;

/**
 * Register `factory` as milter `name`, listen on `socket` (`unix:/path`,
 * `inet:PORT@HOST`, `inet6:PORT@HOST`, `fd:N`), and serve until a stop
 * signal: then drain open sessions (new ones get TEMPFAIL) for up to
 * `drain` ms, stop the engine, and remove the unix socket. Resolves when
 * stopped. One milter per process; with `workers`, one per worker process.
 *
 * A stale unix socket at the path (left by a milter that died) is
 * replaced; anything else there (a regular file, a directory) is left
 * untouched and the call rejects with InvalidSocketError naming it.
 *
 * @example
 * ```ts
 * import { Base, runmilter, CONTINUE } from 'nodemilter';
 * class Hello extends Base {
 *   override eom() { this.addheader('X-Hello', 'world'); return CONTINUE; }
 * }
 * await runmilter('hello', 'inet:8894@127.0.0.1', { factory: Hello });
 * // or, on every core, reloadable with SIGHUP:
 * await runmilter('hello', 'inet:8894@127.0.0.1', { factory: Hello, workers: 'auto' });
 * ```
 */
export async function runmilter(name: string, socket: string, options: RunmilterOptions): Promise<void> {
  if (!options || typeof options.factory !== 'function') {
    throw new InvalidArgumentError('runmilter needs options.factory: a Base subclass or a function returning an instance');
  }
  const log: Logger = options.logger ?? console;
  const drain = options.drain ?? 30_000;
  checkDrain(drain);
  checkSessionCap(options);
  const spec = parseSocketSpec(socket);
  const description = describeMilter(options.factory, { name });
  const worker = workerInfo();
  const workersOption = options.workers ?? workersFromEnv();
  const workers = worker ? undefined : checkWorkers(workersOption);
  if (workers === undefined && workersOption === undefined) {
    for (const o of ['reloadSignal', 'restart'] as const) {
      if (options[o] !== undefined) throw new InvalidArgumentError(`runmilter: ${o} needs the workers option`);
    }
  }
  if (spec.kind === 'unix' && !worker) refuseNonSocket(spec.path, socket);
  const kind = worker ? worker.engine : resolveEngine(chooseEngine(options.engine), name, log);

  if (workers !== undefined) {
    if (supervisor) throw new MilterStateError('runmilter with workers is already running in this process');
    const sup = new Supervisor({
      name,
      socket,
      workers,
      engine: kind,
      drain,
      logger: log,
      signals: options.signals ?? ['SIGTERM', 'SIGINT'],
      reloadSignal: options.reloadSignal === undefined ? 'SIGHUP' : options.reloadSignal,
      umask: options.umask ?? 0o007,
      backlog: options.backlog,
      restart: options.restart,
      metricsListen: options.metricsListen,
      metrics: options.metrics !== undefined || options.metricsListen !== undefined,
      onListening: options.onListening,
    });
    supervisor = sup;
    try {
      await sup.run();
    } finally {
      supervisor = undefined;
    }
    return;
  }

  const metrics = options.metrics ?? (options.metricsListen !== undefined || worker?.metrics ? new MilterMetrics() : undefined);
  const served: MilterDescription = metrics ? { ...description, callbacks: metrics.instrument(description.callbacks) } : description;
  const { factory: _f, drain: _d, signals: _s, logger: _l, onListening: _o, engine: _e, metrics: _m, metricsListen: _ml, workers: _w, reloadSignal: _r, restart: _rs, ...engineOptions } = options;
  const setup: EngineSetup = {
    description: served,
    socket: worker ? `fd:${WORKER_FD}` : socket,
    umask: options.umask ?? 0o007, // runmilter's default, on both engines
    logger: log,
    options: engineOptions,
  };
  const engine = await createEngine(kind, setup);
  metrics?.setEngine(() => engine.diag());
  const http = options.metricsListen !== undefined && !worker ? await serveMetrics(options.metricsListen, async () => metrics!.prometheus(), log, name) : undefined;
  try {
    await serveEngine(engine, {
      name,
      socket: worker ? `${socket} (fd ${WORKER_FD} from the supervisor)` : socket,
      unixPath: spec.kind === 'unix' && !worker ? spec.path : undefined,
      drain,
      // A worker always answers the supervisor's SIGTERM.
      signals: worker ? [...new Set<NodeJS.Signals>(['SIGTERM', 'SIGINT', ...(options.signals ?? [])])] : (options.signals ?? ['SIGTERM', 'SIGINT']),
      logger: log,
      onListening: options.onListening,
      worker: worker
        ? { id: worker.id, snapshot: metrics ? () => metrics.snapshot() : undefined, reloadSignal: options.reloadSignal === undefined ? 'SIGHUP' : options.reloadSignal }
        : undefined,
    });
  } finally {
    metrics?.setEngine(undefined);
    await http?.close();
  }
}

/** `NODEMILTER_WORKERS` (`'auto'` or a number), the default of the `workers` option. */
function workersFromEnv(): number | 'auto' | undefined {
  const env = process.env.NODEMILTER_WORKERS;
  if (env === undefined || env === '') return undefined;
  if (env === 'auto') return 'auto';
  if (!/^[0-9]+$/.test(env)) throw new InvalidArgumentError(`NODEMILTER_WORKERS must be 'auto' or a number of workers, got ${JSON.stringify(env)}`);
  return Number(env);
}

/** The engine adapter for `kind`; the libmilter one is loaded only when it serves. */
async function createEngine(kind: 'libmilter' | 'node', setup: EngineSetup): Promise<MilterEngine> {
  if (kind === 'libmilter') {
    const { LibmilterEngine } = await import('./runtime/libmilter');
    return new LibmilterEngine(setup);
  }
  const { NodeEngine } = await import('./runtime/node');
  return new NodeEngine(setup);
}

/**
 * Reload the workers of the {@link runmilter} call running in this process,
 * as its reload signal (SIGHUP) does: start new workers from the code on
 * disk, and once every one of them serves, drain the old ones. The socket
 * stays open throughout. Resolves once the old workers have stopped;
 * rejects (and keeps the old workers) if the new ones do not come up.
 *
 * @throws MilterStateError when runmilter is not running with `workers` here.
 */
export function reload(): Promise<void> {
  if (!supervisor) return Promise.reject(new MilterStateError('reload(): runmilter is not running with workers in this process'));
  return supervisor.reload();
}
