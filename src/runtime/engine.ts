/**
 * The one shape both engines have for runmilter's life cycle: listen,
 * close with drain, counters, events. `runmilter` (src/runmilter.ts) and
 * the worker supervisor (src/runtime/supervisor.ts) are written once over
 * it; src/runtime/libmilter.ts and src/runtime/node.ts are the thin
 * adapters over the libmilter module and the TypeScript engine's server.
 *
 * Engine-specific settings travel in one {@link EngineOptions} object,
 * handed whole to the engine: an option both engines understand is added
 * here and read in both adapters, and the life cycle does not change.
 *
 * @internal
 * @module
 */
import type { EventEmitter } from 'node:events';

import { InvalidArgumentError, NativeLoadError } from '../errors';
import type { Deadlines, MessageLimits } from '../engine/dispatch';
import type { FlowOptions } from '../engine/server';
import { loadNative } from '../native';
import type { EngineCounters, Logger, MilterDescription } from '../types';

/** The engines runmilter can serve on. */
export type EngineName = 'libmilter' | 'node' | 'auto';

const ENGINES: readonly EngineName[] = ['libmilter', 'node', 'auto'];

/**
 * The engine `option` (or `NODEMILTER_ENGINE`) asks for, checked.
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
 * Resolve `'auto'` (and check `'libmilter'`): the engine that will serve.
 * `'libmilter'` rethrows the NativeLoadError (its message names the other
 * engine); `'auto'` says once why the addon did not load and picks `'node'`.
 * @internal
 */
export function resolveEngine(engine: EngineName, name: string, log: Logger): 'libmilter' | 'node' {
  if (engine === 'node') return 'node';
  try {
    loadNative();
    return 'libmilter';
  } catch (err) {
    if (!(err instanceof NativeLoadError)) throw err;
    if (engine === 'libmilter') throw err; // its message offers the TypeScript engine
    const cut = err.message.indexOf(' The TypeScript engine serves');
    const why = cut >= 0 ? err.message.slice(0, cut) : err.message;
    log.warn(`${name}: the native addon did not load (${why}); serving on the TypeScript engine instead (engine 'auto')`);
    return 'node';
  }
}

/**
 * Settings both engines take, handed whole to the engine that serves.
 * (runmilter's options extend these.)
 */
/**
 * The admission options of {@link FlowOptions} (`maxSessions`,
 * `sessionCapAction`) apply on both engines; the others (negotiation,
 * frame and write timeouts, the output cap, event-loop shedding) on the
 * TypeScript engine (docs/reliability.md).
 */
export interface EngineOptions extends FlowOptions {
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
  limits?: MessageLimits;
  /** Per-callback deadlines, as in `milter.register`. */
  deadline?: number | Deadlines;
  /** Progress interval during a pending eom, as in `milter.register`. */
  progressInterval?: number;
  /** What to answer when a handler fails: TEMPFAIL (default), REJECT, CONTINUE or ACCEPT. */
  exceptionPolicy?: number;
}

/** What an engine adapter is built from. @internal */
export interface EngineSetup {
  /** The milter (callbacks already instrumented when metrics are on). */
  description: MilterDescription;
  /** Where to listen: a socket spec, `fd:N` for an inherited descriptor. */
  socket: string;
  /** The umask while a unix socket is created (runmilter's default applied). */
  umask: number;
  /** Where the engine's own errors and notices go. */
  logger: Logger;
  /** Everything else, as the caller gave it. */
  options: EngineOptions;
}

/** How new connections are treated while {@link MilterEngine.close} drains. */
export type DrainMode =
  /** Keep accepting and answer new sessions TEMPFAIL (421 4.3.2): one process alone on its socket. */
  | 'refuse'
  /**
   * Stop accepting at once and let open sessions finish: the socket is
   * shared with other workers, which take the new connections. Both
   * engines can (libmilter through `milter.stopAccepting()`); where the
   * libmilter one cannot (its listening descriptor not found, or on the
   * smfi_main fallback) it says so and falls back to `'refuse'` (see
   * {@link MilterEngine.canStopAccepting}).
   */
  | 'handoff';

/**
 * One engine serving one milter: what runmilter's life cycle needs and no
 * more. Events on {@link events}: `handlerError` (err, {callback,
 * connection}), `limitExceeded` ({connection, limit, value}).
 * @internal
 */
export interface MilterEngine {
  /** Which engine this is. */
  readonly kind: 'libmilter' | 'node';
  /** Whether `close(drain, 'handoff')` stops accepting before the drain (else it refuses, as `'refuse'`). */
  readonly canStopAccepting: boolean;
  /** Open the socket (or take the inherited `fd:N`) and serve; resolves once it accepts connections. */
  listen(): Promise<void>;
  /** Settles once the engine has stopped (after {@link close}, or on its own failure: rejects then). */
  readonly stopped: Promise<void>;
  /** Stop: new sessions are refused (or left to other workers), open ones get up to `drain` ms, then the engine stops. */
  close(drain: number, mode?: DrainMode): Promise<void>;
  /** The engine's counters now. */
  diag(): EngineCounters;
  /** `handlerError`, `limitExceeded`. */
  readonly events: EventEmitter;
}
