/**
 * runmilter: serve a {@link Base} subclass on the libmilter engine, the way
 * pymilter's `Milter.runmilter` does, plus what a deployment needs: socket
 * permissions, a graceful drain on SIGTERM/SIGINT, and clean-up of the unix
 * socket.
 *
 * @module
 */
import { describe as describeMilter, type MilterFactory } from './base';
import { InvalidArgumentError, NativeLoadError } from './errors';
import { checkDrain, checkSessionCap, type SessionCapOptions } from './engine/dispatch';
import type { FlowOptions } from './engine/server';
import { loadNative } from './native';
import * as milter from './milter';
import { runOnNodeEngine } from './engine/run';
import { parseSocketSpec, refuseNonSocket, removeUnixSocket } from './socketspec';
import type { Logger } from './types';

/** The engines {@link runmilter} can serve on. */
export type EngineName = 'libmilter' | 'node' | 'auto';

const ENGINES: readonly EngineName[] = ['libmilter', 'node', 'auto'];

/**
 * The engine `options.engine` (or `NODEMILTER_ENGINE`) asks for, checked.
 * @internal
 */
export function chooseEngine(option: unknown): EngineName {
  const env = process.env.NODEMILTER_ENGINE || undefined;
  const engine = option ?? env;
  if (engine === undefined) return 'libmilter';
  if (!ENGINES.includes(engine as EngineName)) {
    const from = option !== undefined ? 'engine' : 'NODEMILTER_ENGINE';
    throw new InvalidArgumentError(`${from} must be 'libmilter', 'node' or 'auto', got ${JSON.stringify(engine)}`);
  }
  return engine as EngineName;
}

/**
 * Options of {@link runmilter}. The admission options (`maxSessions`,
 * `sessionCapAction`) apply on both engines; the other {@link FlowOptions}
 * (negotiation, frame and write timeouts, the output cap, event-loop
 * shedding) on the TypeScript engine (docs/reliability.md).
 */
export interface RunmilterOptions extends FlowOptions {
  /** The milter: a Base subclass (one instance per connection) or a function returning an instance. */
  factory: MilterFactory;
  /** Seconds an idle MTA connection may wait (smfi_settimeout; default libmilter's 7210). */
  timeout?: number;
  /** Listen backlog (smfi_setbacklog). */
  backlog?: number;
  /**
   * The umask while the unix socket is created. Default `0o007`: the socket
   * is usable by its owner and group only (put the MTA's user in the
   * milter's group, e.g. `postfix`), whatever the process umask is.
   */
  umask?: number;
  /** Per-message limits on headers and body, as in `milter.register` (defaults there). */
  limits?: milter.RegisterOptions['limits'];
  /** Milliseconds to let open sessions finish after SIGTERM/SIGINT before stopping (default 30000). */
  drain?: number;
  /** Signals that stop the milter gracefully (default SIGTERM and SIGINT). `[]`: install no handler. */
  signals?: NodeJS.Signals[];
  /** Where to log (console by default; pino fits). */
  logger?: Logger;
  /** Per-callback deadlines, as in `milter.register`. */
  deadline?: milter.RegisterOptions['deadline'];
  /** Progress interval during a pending eom, as in `milter.register`. */
  progressInterval?: number;
  /** What to answer when a handler fails: TEMPFAIL (default), REJECT, CONTINUE or ACCEPT. */
  exceptionPolicy?: number;
  /** Called once the socket is open and the milter serves. */
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
}

/**
 * Register `factory` as milter `name`, listen on `socket` (`unix:/path`,
 * `inet:PORT@HOST`, `inet6:PORT@HOST`, `fd:N`), and serve until a stop
 * signal: then drain open sessions (new ones get TEMPFAIL) for up to
 * `drain` ms, stop libmilter, and remove the unix socket. Resolves when
 * stopped. One milter per process.
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
  if (spec.kind === 'unix') refuseNonSocket(spec.path, socket);
  const description = describeMilter(options.factory, { name });
  let engine = chooseEngine(options.engine);
  if (engine !== 'node') {
    try {
      loadNative();
      engine = 'libmilter';
    } catch (err) {
      if (!(err instanceof NativeLoadError)) throw err;
      if (engine === 'libmilter') throw err; // its message offers the TypeScript engine
      const cut = err.message.indexOf(' The TypeScript engine serves');
      const why = cut >= 0 ? err.message.slice(0, cut) : err.message;
      log.warn(`${name}: the native addon did not load (${why}); serving on the TypeScript engine instead (engine 'auto')`);
      engine = 'node';
    }
  }
  if (engine === 'node') return runOnNodeEngine(name, socket, description, { ...options, drain, logger: log });

  milter.setLogger(log);
  const onHandlerError = (err: Error, info: milter.HandlerErrorInfo) => {
    log.error(`${name}: ${info.callback} failed on connection ${info.connection}: ${err.message}`, err);
  };
  milter.events.on('handlerError', onHandlerError);
  if (options.exceptionPolicy !== undefined) milter.set_exception_policy(options.exceptionPolicy);
  const registerOptions: milter.RegisterOptions & SessionCapOptions = {
    deadline: options.deadline,
    progressInterval: options.progressInterval,
    limits: options.limits,
    maxSessions: options.maxSessions,
    sessionCapAction: options.sessionCapAction,
  };
  milter.register(description, registerOptions);
  milter.setconn(socket);
  if (options.timeout !== undefined) milter.settimeout(options.timeout);
  if (options.backlog !== undefined) milter.setbacklog(options.backlog);

  // Signal handlers go in before the socket opens: a client (or a test) may
  // signal the moment it can connect. A signal before main() is kept and
  // acted on as soon as the milter runs.
  const signals = options.signals ?? ['SIGTERM', 'SIGINT'];
  let stopping = false;
  let serving = false;
  let early: NodeJS.Signals | undefined;
  const beginStop = (sig: NodeJS.Signals) => {
    // Refuse new sessions first, then say so: whoever reads the log line may connect at once.
    const stopped = milter.stop({ drain });
    log.info(`${name}: ${sig}: draining open sessions for up to ${drain} ms, then stopping`);
    stopped.catch((err: Error) => log.error(`${name}: stop failed: ${err.message}`, err));
  };
  const onSignal = (sig: NodeJS.Signals) => {
    if (stopping) {
      log.warn(`${name}: ${sig} again, still draining`);
      return;
    }
    stopping = true;
    if (serving) beginStop(sig);
    else early = sig;
  };
  for (const s of signals) process.on(s, onSignal);

  const oldMask = spec.kind === 'unix' ? process.umask(options.umask ?? 0o007) : undefined;
  try {
    // Removes a stale unix socket, and only if it is a socket.
    milter.opensocket(true);
  } catch (err) {
    for (const s of signals) process.removeListener(s, onSignal);
    milter.events.removeListener('handlerError', onHandlerError);
    throw err;
  } finally {
    if (oldMask !== undefined) process.umask(oldMask);
  }

  const running = milter.main();
  serving = true;
  log.info(`${name}: listening on ${socket}`);
  if (early) beginStop(early);
  options.onListening?.();
  try {
    await running;
  } finally {
    for (const s of signals) process.removeListener(s, onSignal);
    milter.events.removeListener('handlerError', onHandlerError);
    if (spec.kind === 'unix') {
      const err = removeUnixSocket(spec.path);
      if (err) log.warn(`could not remove socket ${spec.path}: ${err.message}`);
    }
    log.info(`${name}: stopped`);
  }
}
