/**
 * The low-level `milter` module: libmilter, one-to-one, as pymilter's C
 * module `milter` exposes it to Python. No policy and no magic: register
 * callbacks, say where to listen, run, stop.
 *
 * Callbacks run on the Node event loop. Each may return a status or a
 * Promise of one; the libmilter thread serving that SMTP session waits for
 * the answer (up to a deadline), while other sessions go on. Per session,
 * callbacks run one at a time and in protocol order, also when they are
 * async.
 *
 * @example
 * ```ts
 * import * as milter from 'nodemilter/milter';
 *
 * milter.register('hello', {
 *   async envfrom(ctx, from) {
 *     return from === '<>' ? milter.CONTINUE : milter.CONTINUE;
 *   },
 *   eom(ctx) {
 *     ctx.addheader('X-Checked', 'yes');
 *     return milter.ACCEPT;
 *   },
 * });
 * milter.setconn('inet:8894@127.0.0.1');
 * await milter.main(); // resolves once stop() has finished
 * ```
 *
 * @module nodemilter/milter
 */
import { EventEmitter } from 'node:events';
import * as net from 'node:net';
import * as os from 'node:os';
import { isMainThread } from 'node:worker_threads';

import * as C from './constants';
import {
  COMMON_MACROS,
  Dispatcher,
  decodeText,
  resolveLimits,
  EVENT_NAMES,
  NOT_PARKED_MESSAGE,
  SessionCore,
  reportHandlerError,
  checkBacklog,
  checkCallbacks,
  checkDrain,
  checkExceptionPolicy,
  checkIntOption,
  checkMilterName,
  checkTimeout,
  deadlineArray,
  eventMasks,
  progressMs,
  symlistStrings,
  type Deadlines,
  type MessageLimits,
} from './engine/dispatch';
import {
  ActionFailedError,
  ActionNotAllowedError,
  ContextClosedError,
  InvalidArgumentError,
  MilterError,
  MilterStateError,
} from './errors';
import type { MilterMetrics } from './metrics';
import { LoopSpin, spinUsFromEnv } from './loopspin';
import { ActionCode, ConnHandle, Ev, NativeBinding, loadNative } from './native';
import { parseSocketSpec } from './socketspec';
import type { Bytes, CallbackName, Callbacks, EngineCounters, Logger, MilterDescription } from './types';
import type { Reply } from './validate';

export * from './constants';
export type { EngineCounters, Callbacks, MilterContext, MilterDescription, NegotiateOffer, NegotiateResult, Family, HostAddr } from './types';

/* ------------------------------------------------------------------------ */
/* Configuration                                                            */

export type { Deadlines, MessageLimits };

/** Options of {@link register} beyond the callbacks. */
export interface RegisterOptions {
  /** Action flags (SMFIF_*) to ask for; default: whatever the MTA offers. */
  actions?: number;
  /** Protocol steps (SMFIP_*) to ask for; default: derived from the callbacks. */
  steps?: number;
  /** Callbacks the MTA does not wait for (SMFIP_NR_* where offered). */
  noreply?: readonly CallbackName[];
  /** Macros per stage (SMFIM_* → names), sent with the negotiation reply. */
  symlists?: MilterDescription['symlists'];
  /** Strings (default) or raw Buffers for the values of these callbacks. */
  decode?: MilterDescription['decode'];
  /**
   * How long libmilter waits for a callback's answer before it answers the
   * fallback status (TEMPFAIL, with a 451 4.3.0 reply) itself. A number
   * sets the default; an object sets callbacks one by one. Defaults: 8 s
   * (below sendmail's 10 s and Postfix's 30 s command timeouts) and 240 s
   * for eom, during which progress is sent every `progressInterval`.
   */
  deadline?: number | Deadlines;
  /** Milliseconds between progress messages while eom is pending (default 4000; 0: never). */
  progressInterval?: number;
  /**
   * Per-message limits on headers and body: past one, the callback is not
   * called for the rest of the message and the MTA gets REJECT `552 5.3.4`
   * (or TEMPFAIL `452 4.3.4` with `status: TEMPFAIL`). Defaults: 10 000
   * headers, 8 MiB of headers, no body limit. See docs/reliability.md.
   *
   * @example
   * ```ts
   * milter.register('m', callbacks, { limits: { maxHeaders: 500, maxBodyBytes: 50 * 2 ** 20 } });
   * ```
   */
  limits?: MessageLimits;
  /**
   * Sessions served at once (default 1000; 0: no cap). A session past the
   * cap is refused by the addon at negotiation, before any libmilter worker
   * waits for JavaScript on its behalf, and counted in
   * {@link getdiag}`().sessionsRefused`. See `sessionCapAction`.
   */
  maxSessions?: number;
  /**
   * What a session past `maxSessions` gets: `'tempfail'` (default; the MTA
   * gets `421 4.3.2 Mail filter is busy` at connect) or `'close'` (libmilter
   * drops the connection at negotiation; the MTA applies its failure
   * action, Postfix's `milter_default_action`).
   */
  sessionCapAction?: 'tempfail' | 'close';
}

/** The default of {@link RegisterOptions.maxSessions}. */
export const DEFAULT_MAX_SESSIONS = 1000;


/** A logger: console fits, and so does pino. */
export type MilterLogger = Logger;

export type { HandlerErrorInfo } from './engine/dispatch';

/**
 * Errors and notices from the engine. `handlerError` (err, info): a handler
 * threw, rejected or returned something that is not a status; the exception
 * policy answered for it. `stopped` (): libmilter has returned.
 * `limitExceeded` ({connection, limit, value}): a message went past one of
 * the `limits` of {@link register} and was answered by their policy. When
 * nobody listens to `handlerError`, the error goes to the logger.
 */
export const events = new EventEmitter();

interface Registered {
  name: string;
  callbacks: Callbacks;
  options: RegisterOptions;
  flags?: number;
}

let native: NativeBinding | undefined;
let registered: Registered | undefined;
let committed = false;
let connSpec: string | undefined;
let started = false;
let logger: MilterLogger = console;
let exceptionStatus: number = C.TEMPFAIL;
let stopPromise: Promise<void> | undefined;
let mainPromise: Promise<void> | undefined;
let resolveMain: (() => void) | undefined;
let rejectMain: ((err: Error) => void) | undefined;

function addon(): NativeBinding {
  if (!native) native = loadNative();
  return native;
}

function mainThreadOnly(what: string): void {
  if (!isMainThread) {
    throw new MilterStateError(`${what}: libmilter keeps one milter per process; run it on the main thread, not in a worker`);
  }
}

/** The calls that configure or run libmilter: refused when another load of the addon (a reload) runs it. */
function ownerOnly(what: string): void {
  mainThreadOnly(what);
  if (addon().getdiag().owner === 'other') {
    throw new MilterStateError(
      `${what}: libmilter is already configured by another load of nodemilter in this process (a second load after require.cache was cleared); libmilter runs one milter per process, use the module that started it`,
    );
  }
}

function notStarted(what: string): void {
  if (started) throw new MilterStateError(`${what} after main(): libmilter runs one milter per process and cannot be reconfigured while running`);
}

/** Where {@link events} sends errors nobody listens for; console by default. */
export function setLogger(l: MilterLogger): void {
  logger = l;
}

let metrics: MilterMetrics | undefined;

/**
 * Count and time this milter's callbacks in `m` (see `nodemilter/metrics`),
 * and let it read {@link getdiag}'s engine counters. Call before
 * {@link main} (or runmilter); `undefined` turns it off.
 *
 * @example
 * ```ts
 * const metrics = new MilterMetrics();
 * milter.setMetrics(metrics);
 * await runmilter('mymilter', 'inet:8894@127.0.0.1', { factory: MyMilter });
 * ```
 */
export function setMetrics(m: MilterMetrics | undefined): void {
  notStarted('setMetrics()');
  if (committed) throw new MilterStateError('setMetrics() after opensocket(): the callbacks are already with libmilter');
  metrics?.setEngine(undefined);
  metrics = m;
  m?.setEngine(() => getdiag());
}

/**
 * Register the milter's callbacks (smfi_register). Callbacks left out are
 * negotiated away (the MTA does not send those events). Call once, before
 * {@link main}.
 */
export function register(name: string, callbacks: Callbacks, options?: RegisterOptions): void;
/** Register an engine-neutral description (what `Base` builds). */
export function register(description: MilterDescription, options?: RegisterOptions): void;
export function register(a: string | MilterDescription, b?: Callbacks | RegisterOptions, c?: RegisterOptions): void {
  mainThreadOnly('register()');
  notStarted('register()');
  if (committed) throw new MilterStateError('register() after opensocket(): the registration is already with libmilter');
  let name: string;
  let callbacks: Callbacks;
  let options: RegisterOptions;
  if (typeof a === 'string') {
    name = a;
    callbacks = (b ?? {}) as Callbacks;
    options = c ?? {};
  } else {
    if (!a || typeof a !== 'object') throw new InvalidArgumentError('register() takes a name and callbacks, or a MilterDescription');
    name = a.name;
    callbacks = a.callbacks;
    options = { actions: a.actions, steps: a.steps, noreply: a.noreply, symlists: a.symlists, decode: a.decode, ...(b as RegisterOptions) };
  }
  checkMilterName(name);
  checkCallbacks(callbacks, options.noreply);
  checkIntOption('actions', options.actions);
  checkIntOption('steps', options.steps);
  checkSessionCap(options.maxSessions, options.sessionCapAction);
  resolveLimits(options.limits);
  registered = { name, callbacks, options, flags: registered?.flags };
}

function checkSessionCap(max: unknown, action: unknown): void {
  if (max !== undefined && (typeof max !== 'number' || !Number.isInteger(max) || max < 0 || max > 0x7fffffff)) {
    throw new InvalidArgumentError(`maxSessions must be an integer from 0 (no cap) to 2147483647, got ${String(max)}`);
  }
  if (action !== undefined && action !== 'tempfail' && action !== 'close') {
    throw new InvalidArgumentError(`sessionCapAction must be 'tempfail' or 'close', got ${JSON.stringify(action)}`);
  }
}

/** Set the action flags (SMFIF_*) the milter asks for, as pymilter's set_flags. */
export function set_flags(flags: number): void {
  notStarted('set_flags()');
  checkIntOption('flags', flags);
  if (committed) throw new MilterStateError('set_flags() after opensocket()');
  if (registered) registered.flags = flags;
  else registered = { name: '', callbacks: {}, options: {}, flags };
}

/**
 * Where to listen (smfi_setconn): `unix:/path` or `local:/path`,
 * `inet:PORT@HOST`, `inet6:PORT@HOST`, or `fd:N` for an inherited socket.
 * Throws InvalidSocketError for a malformed spec.
 */
export function setconn(spec: string): void {
  ownerOnly('setconn()');
  notStarted('setconn()');
  parseSocketSpec(spec);
  if (socketOpen) throw new MilterStateError(`setconn() after opensocket(): the listening socket is already open on ${connSpec}; libmilter keeps it`);
  addon().setconn(spec);
  connSpec = spec;
}

/** Seconds an idle session may wait for the MTA before libmilter closes it (default 7210). */
export function settimeout(seconds: number): void {
  checkTimeout(seconds);
  notStarted('settimeout()');
  addon().settimeout(seconds);
}

/** The listen backlog (smfi_setbacklog). */
export function setbacklog(backlog: number): void {
  checkBacklog(backlog);
  notStarted('setbacklog()');
  addon().setbacklog(backlog);
}

/** libmilter's debug level (smfi_setdbg); its output goes to syslog. */
export function setdbg(level: number): void {
  if (!Number.isInteger(level) || level < 0) throw new InvalidArgumentError(`debug level must be an integer >= 0, got ${level}`);
  addon().setdbg(level);
}

/**
 * Open the listening socket now (smfi_opensocket), so errors show before
 * main(). With `rmsocket`, a stale unix socket is removed first (only if it
 * is a socket). Needs register() and setconn() first.
 */
export function opensocket(rmsocket = false): void {
  ownerOnly('opensocket()');
  notStarted('opensocket()');
  if (!connSpec) throw new MilterStateError('opensocket() needs setconn() first');
  commit();
  addon().opensocket(rmsocket);
  socketOpen = true;
  tuneSocket();
}

let socketOpen = false;

/** Nagle off for TCP listeners: see native/listener.cc NoDelay. */
function tuneSocket(): void {
  const spec = parseSocketSpec(connSpec!);
  if (spec.kind === 'inet' || spec.kind === 'inet6') addon().nodelay(spec.port);
}

/**
 * What to answer when a handler throws, rejects or returns a non-status:
 * TEMPFAIL (default; 451 4.3.0), REJECT (554 5.3.0), CONTINUE or ACCEPT.
 */
export function set_exception_policy(status: number): void {
  exceptionStatus = checkExceptionPolicy(status);
}

/** libmilter's version as [major, minor, patchlevel] (smfi_version). */
export function getversion(): [number, number, number] {
  return addon().version();
}

/** Counters: sessions created and deleted, deadlines expired, and more. */
export interface Diag extends EngineCounters {
  /** Sessions in JavaScript's hands (with state kept in this module). */
  jsSessions: number;
  /**
   * Macro stages found in libmilter's context by the guard that keeps a
   * malformed macro list from crashing smfi_getsymval (7 with sendmail
   * 8.17); -1 when the layout was not recognised (macros are then not read
   * from libmilter), -2 before the first session or with a patched
   * libmilter (see {@link Diag.macroGuard}).
   */
  macroLayout: number;
  /**
   * Which guard keeps malformed macro lists from crashing libmilter:
   * `'patched libmilter'` (the addon is linked with a libmilter built with
   * native/libmilter/odd-macros.patch, which keeps its macro lists in pairs
   * itself: no guard is needed, so `macroLayout` stays -2),
   * `'layout'` (libmilter's context layout was recognised and checked),
   * `'not calibrated'` (before the first session), or `'off: <why>'` (not
   * recognised: macros are not read from libmilter; a warning went to the
   * logger once).
   */
  macroGuard: string;
  /** Sessions refused because {@link RegisterOptions.maxSessions} were being served. */
  sessionsRefused: number;
  /** Recorded actions that libmilter could not write to the MTA (reported as `handlerError` with an ActionFailedError). */
  actionsFailed: number;
  /** Times a libmilter worker waited for room in the event queue (see docs/native.md, "Bounded memory"). */
  queueWaits: number;
  /** The most bytes of no-reply events queued for JavaScript at once. */
  queuePeakBytes: number;
  /**
   * How long a libmilter worker that is the only one waiting for JavaScript
   * spins for its answer before it sleeps, in microseconds (docs/native.md,
   * "The spin"): 50 by default, `NODEMILTER_SPIN_US` at start, 0 on one CPU
   * (and from an addon built before the spin).
   */
  spinUs: number;
  /** Replied steps answered while their worker spun (no sleep, no wake-up). */
  spinHits: number;
  /** Replied steps whose worker spun, then slept until the answer came. */
  spinMisses: number;
  /**
   * Spins of the JavaScript thread's event loop after a reply, for the next
   * event (src/loopspin.ts: the same NODEMILTER_SPIN_US, only while fewer
   * sessions than CPUs are open).
   */
  loopSpins: number;
  /** Event-loop turns those spins took. */
  loopSpinTurns: number;
  /** {@link stopAccepting} took effect: this process accepts no new connection. */
  acceptingStopped: boolean;
  /**
   * The real-time signal the addon sends libmilter's listener thread so that
   * a stop does not wait out its 5 s poll (docs/native.md, "Stop, drain,
   * exit"): `'SIGRTMIN+4'`, or the next one nobody handles if something else
   * handles that; `''` when none was free or before main() (a stop may then
   * take up to 5 s).
   */
  wakeSignal: string;
  /**
   * The addon's crash report for fatal signals (docs/reliability.md,
   * "Crashes"): `'installed'`, `'off: NODEMILTER_CRASH_HANDLER=0'`,
   * `'installed by another copy of the addon in this process'`,
   * `'failed: <why>'`, or `'none in this build of the addon'` (an addon
   * built before the crash handler existed). `'installed'` is followed by
   * `'; handled elsewhere now: SIGSEGV ...'` when another handler has taken
   * one of the signals since.
   */
  crashHandler: string;
}

/** The engine's counters (pymilter's getdiag gives the context counts). */
export function getdiag(): Diag {
  const d = addon().getdiag();
  return {
    created: d.created,
    deleted: d.deleted,
    active: d.active,
    deadlineExpired: d.deadlineExpired,
    progressSent: d.progressSent,
    lateAnswers: d.lateAnswers,
    drainRefused: d.drainRefused,
    jsSessions: sessions.size,
    running: d.running,
    macroLayout: d.macroLayout,
    macroGuard: d.macroGuard,
    sessionsRefused: d.sessionsRefused,
    actionsFailed: d.actionsFailed,
    queueWaits: d.queueWaits,
    queuePeakBytes: d.queuePeakBytes,
    spinUs: d.spinUs ?? 0,
    spinHits: d.spinHits ?? 0,
    spinMisses: d.spinMisses ?? 0,
    loopSpins: loopSpin?.counters.spins ?? 0,
    loopSpinTurns: loopSpin?.counters.turns ?? 0,
    acceptingStopped: d.acceptingStopped,
    wakeSignal: d.wakeSignal ?? '',
    // An addon built before the crash handler (an old prebuild, NODEMILTER_ADDON) has no such call.
    crashHandler: addon().crashHandler?.().state ?? 'none in this build of the addon',
  };
}

function commit(): void {
  if (committed) return;
  if (!registered || !registered.name) throw new MilterStateError('register() must be called first');
  const spin = spinUsFromEnv();
  // One count of the CPUs the process may run on, for both spins (the workers' and the event loop's).
  const cpus = os.availableParallelism();
  const { name, callbacks, options } = registered;
  const { handled, noreply } = eventMasks(callbacks, options.noreply);
  const symlists = symlistStrings(options.symlists);
  const watch = new Set(COMMON_MACROS);
  for (const list of symlists) for (const m of list.split(' ')) if (m) watch.add(m);
  const actions = registered.flags ?? options.actions;
  const progress = progressMs(options.progressInterval);
  const limits = resolveLimits(options.limits);
  dispatcher = new Dispatcher(metrics ? metrics.instrument(callbacks) : callbacks, { ...options.decode }, {
    exceptionStatus: () => exceptionStatus,
    report,
    closed: (s) => sessions.delete(s.id),
    limitExceeded: (s, what, limit) => events.emit('limitExceeded', { connection: s.id, limit: what, value: limit }),
  }, limits);
  addon().register({
    name,
    actions: actions ?? -1,
    steps: options.steps ?? -1,
    handled,
    noreply,
    dynamicNegotiate: typeof callbacks.negotiate === 'function',
    symlists,
    deadlines: deadlineArray(options.deadline),
    progressMs: progress,
    fallbackStatus: C.TEMPFAIL,
    watch: [...watch],
    maxSessions: options.maxSessions ?? DEFAULT_MAX_SESSIONS,
    sessionCapClose: options.sessionCapAction === 'close',
    allowSmfiMain: process.env.NODEMILTER_ALLOW_SMFI_MAIN === '1',
    spinUs: spin,
    cpus,
  });
  loopSpin = new LoopSpin(spin, () => sessions.size, cpus);
  committed = true;
}

/**
 * Start serving (smfi_main). Returns at once with a Promise that resolves
 * when the milter has stopped, or rejects if libmilter could not serve
 * (socket in use, permissions) or returned without stop(). libmilter runs
 * once per process: a second main() throws MilterStateError.
 */
export function main(): Promise<void> {
  ownerOnly('main()');
  if (started) throw new MilterStateError('main() was already called: libmilter runs once per process and cannot be restarted');
  if (!connSpec) throw new MilterStateError('main() needs setconn() first');
  commit();
  const n = addon();
  if (!socketOpen) {
    // Open it here rather than on the listener thread, so that a socket
    // error throws from main() and the socket can be tuned.
    n.opensocket(false);
    socketOpen = true;
    tuneSocket();
  }
  mainPromise = new Promise<void>((resolve, reject) => {
    resolveMain = resolve;
    rejectMain = reject;
  });
  n.openChannel(onEvent);
  n.main();
  started = true;
  return mainPromise;
}

/** Options of {@link stop}. */
export interface StopOptions {
  /**
   * Milliseconds to drain first: new sessions are refused with TEMPFAIL
   * (421 4.3.2) while open ones finish; then libmilter stops. After
   * {@link stopAccepting} nothing new arrives, so nothing is refused: the
   * open sessions get the budget to end. 0 (default): stop at once
   * (sessions parked between commands are abandoned and the MTA applies
   * its failure action).
   */
  drain?: number;
}

/**
 * How long a drain after {@link stopAccepting} waits at least: a
 * connection libmilter accepted just before is counted as a session once
 * its first command (the MTA sends it at once) reaches a callback.
 */
const ACCEPT_SETTLE_MS = 250;

let acceptingStoppedAt: number | undefined;

/**
 * Stop accepting new connections in this process, at once, while the
 * sessions already open run on undisturbed; then {@link stop} with a
 * `drain` waits for them to end (refusing nobody) and stops.
 *
 * Meant for a listening socket shared by several processes (runmilter's
 * workers serve the supervisor's `fd:`; systemd socket activation): the
 * connections that arrive meanwhile stay in the kernel's listen queue and
 * the other processes accept them. Nothing is done to the socket that the
 * other processes could see: this process stops polling it (see
 * native/listener.cc, StopAccepting, for how and why that is safe with
 * libmilter). A process alone on its socket should rather drain with
 * `stop({ drain })`, which keeps accepting and answers new sessions 421:
 * connections left in the queue of a socket nobody accepts on wait there
 * until the MTA's connect timeout, then are reset when it closes.
 *
 * Calling it again does nothing. Throws MilterStateError before
 * {@link main}, after {@link stop}, or when this libmilter cannot (run on
 * smfi_main, or its listening descriptor was not found).
 *
 * @example
 * ```ts
 * import * as milter from 'nodemilter/milter';
 *
 * process.on('SIGTERM', () => {
 *   milter.stopAccepting(); // the other workers take the new connections
 *   void milter.stop({ drain: 30_000 });
 * });
 * ```
 */
export function stopAccepting(): void {
  ownerOnly('stopAccepting()');
  if (!started) throw new MilterStateError('stopAccepting() before main(): the milter is not running');
  if (stopPromise) throw new MilterStateError('stopAccepting() after stop(): the milter is stopping');
  if (acceptingStoppedAt !== undefined) return;
  try {
    addon().stopAccepting();
  } catch (err) {
    throw new MilterStateError((err as Error).message);
  }
  acceptingStoppedAt = Date.now();
}

/**
 * Stop the milter (smfi_stop). Never blocks the event loop; the Promise
 * settles when libmilter has returned. Calling it again returns the same
 * Promise.
 */
export function stop(options: StopOptions = {}): Promise<void> {
  if (!started) throw new MilterStateError('stop() before main(): the milter is not running');
  if (stopPromise) return stopPromise;
  const drain = options.drain ?? 0;
  checkDrain(drain);
  const n = addon();
  const handedOff = acceptingStoppedAt !== undefined;
  stopPromise = (async () => {
    if (drain > 0) {
      const until = Date.now() + drain;
      // Refuse new sessions, unless no new one can arrive.
      if (!handedOff) n.setDraining(true);
      const settled = handedOff ? Math.min(until, acceptingStoppedAt! + ACCEPT_SETTLE_MS) : 0;
      while ((n.getdiag().serving > 0 || Date.now() < settled) && Date.now() < until) await new Promise((r) => setTimeout(r, 25));
    }
    n.stop();
    // smfi_stop sets its flag from another thread, then waits for the
    // listener's poll: poke until the listener has returned. The signal
    // (wake) ends the poll; without it, a connection does, but not after
    // stopAccepting(): the socket libmilter polls then takes none.
    const wake = () => {
      n.wake();
      if (!handedOff) wakeListener();
    };
    const poke = setInterval(wake, 50);
    wake();
    try {
      await mainPromise!.catch(() => undefined);
    } finally {
      clearInterval(poke);
    }
  })();
  return stopPromise;
}

/**
 * libmilter's listener notices a stop only when its poll() returns, which
 * without traffic takes up to five seconds. One connection that is closed at
 * once wakes it; libmilter sees the stop flag before serving it.
 */
function wakeListener(): void {
  if (!connSpec) return;
  let target: net.NetConnectOpts;
  const spec = parseSocketSpec(connSpec);
  if (spec.kind === 'unix') target = { path: spec.path };
  else if (spec.kind === 'inet' || spec.kind === 'inet6') {
    const any = !spec.host || spec.host === '0.0.0.0' || spec.host === '::' || spec.host === 'INADDR_ANY';
    target = { port: spec.port, host: any ? (spec.kind === 'inet' ? '127.0.0.1' : '::1') : spec.host };
  } else return;
  const sock = net.connect(target);
  sock.on('connect', () => sock.destroy());
  sock.on('error', () => undefined);
  sock.setTimeout(1000, () => sock.destroy());
  sock.unref();
}

/** Let a running milter keep the process alive (the default). */
export function ref(): void {
  if (started) addon().refChannel(true);
}

/** Let the process exit even while the milter runs. */
export function unref(): void {
  if (started) addon().refChannel(false);
}

/* ------------------------------------------------------------------------ */
/* Sessions and dispatch                                                    */

const sessions = new Map<number, Session>();
/** The event loop's spin after each reply (made at register, from NODEMILTER_SPIN_US). */
let loopSpin: LoopSpin | undefined;
let dispatcher: Dispatcher | undefined;

function report(error: Error, s: SessionCore, type: number, answered?: number): void {
  reportHandlerError(events, logger, error, s, type, answered);
}

/** A libmilter session: the actions go to the native addon, checked against the parked callback. */
class Session extends SessionCore {
  macros: Map<string, string> | undefined;
  private flags: [number, number] | undefined;

  constructor(id: number, readonly handle: ConnHandle) {
    super(id);
  }

  get actions(): number {
    return this.negotiated()[0];
  }

  get steps(): number {
    return this.negotiated()[1];
  }

  private negotiated(): [number, number] {
    if (this.flags) return this.flags;
    const n = addon().negotiated(this.handle);
    if (!n) return [0, 0];
    if (n[2]) this.flags = [n[0], n[1]];
    return [n[0], n[1]];
  }

  getsymval(name: string): string | undefined {
    this.checkMacroName(name);
    if (this.seq && !this.closed) {
      const v = addon().getsymval(this.handle, this.seq, name);
      if (v !== undefined) return v === null ? undefined : (decodeText(v, 'string') as string);
    }
    const m = this.macros;
    if (!m) return undefined;
    const bare = name.startsWith('{') && name.endsWith('}') ? name.slice(1, -1) : name;
    return m.get(name) ?? m.get(bare) ?? m.get(`{${bare}}`);
  }

  answer(seq: number, status: number, actions?: number, steps?: number): void {
    if (actions === undefined) addon().reply(this.handle, seq, status);
    else addon().reply(this.handle, seq, status, actions, steps ?? 0);
    loopSpin?.kick();
  }

  fallbackReply(seq: number, rcode: string, xcode: string, text: string): void {
    addon().setreply(this.handle, seq, rcode, xcode, [text]);
  }

  private check(code: number, what: string): void {
    switch (code) {
      case ActionCode.OK:
        return;
      case ActionCode.CLOSED:
        throw new ContextClosedError(`${what}: connection ${this.id} is closed`);
      case ActionCode.NOT_PARKED:
        throw new ActionNotAllowedError(`${what}: ${NOT_PARKED_MESSAGE}`);
      case ActionCode.NOT_IN_EOM:
        throw new ActionNotAllowedError(`${what} is only allowed in eom, not in ${EVENT_NAMES[this.type] ?? 'this callback'}`);
      case ActionCode.NOT_IN_NEGOTIATE:
        throw new ActionNotAllowedError(`${what} is only allowed in negotiate`);
      case ActionCode.FAILURE:
        throw new ActionFailedError(`${what}: libmilter refused it (MI_FAILURE); the action flag may not be negotiated or the MTA connection failed`);
      default:
        throw new InvalidArgumentError(`${what}: invalid argument`);
    }
  }

  protected doSetreply(r: Reply): void {
    this.check(addon().setreply(this.handle, this.seq, r.rcode, r.xcode, r.lines), 'setreply');
  }

  protected doSetsymlist(stage: C.MacroStage, list: string[]): void {
    this.check(addon().setsymlist(this.handle, this.seq, stage, list.join(' ')), 'setsymlist');
  }

  protected doAddheader(name: string, value: Bytes, index: number): void {
    const code = index >= 0 ? addon().insheader(this.handle, this.seq, index, name, value) : addon().addheader(this.handle, this.seq, name, value);
    this.check(code, index >= 0 ? 'insheader' : 'addheader');
  }

  protected doChgheader(name: string, index: number, value: Bytes | null): void {
    this.check(addon().chgheader(this.handle, this.seq, name, index, value), 'chgheader');
  }

  protected doAddrcpt(rcpt: Bytes, params: Bytes | null): void {
    this.check(addon().addrcpt(this.handle, this.seq, rcpt, params), 'addrcpt');
  }

  protected doDelrcpt(rcpt: Bytes): void {
    this.check(addon().delrcpt(this.handle, this.seq, rcpt), 'delrcpt');
  }

  protected doReplacebody(chunk: Buffer): void {
    this.check(addon().replacebody(this.handle, this.seq, chunk), 'replacebody');
  }

  protected doChgfrom(sender: Bytes, params: Bytes | null): void {
    this.check(addon().chgfrom(this.handle, this.seq, sender, params), 'chgfrom');
  }

  protected doQuarantine(reason: string): void {
    this.check(addon().quarantine(this.handle, this.seq, reason), 'quarantine');
  }

  protected doProgress(): void {
    this.check(addon().progress(this.handle, this.seq), 'progress');
  }
}

function onEvent(type: number, connId: number, seq: number, handle: ConnHandle | undefined, a0: any, a1: any, a2: any, a3: any, macros: (string | Buffer)[] | undefined): void {
  if (type === Ev.STOPPED) {
    onStopped(a0 as string);
    return;
  }
  if (type === Ev.WARNING) {
    logger.warn(`nodemilter: ${a0 as string}`);
    return;
  }
  if (type === Ev.ACTION_FAILED) {
    onActionFailed(connId, a0 as string, a1 as string, a2 as number);
    return;
  }
  let s = sessions.get(connId);
  if (!s) {
    if (!handle) return; // a session JavaScript never saw
    s = new Session(connId, handle);
    sessions.set(connId, s);
  }
  if (macros) {
    const m = (s.macros ??= new Map());
    // Values with 8-bit bytes come as Buffers: decoded as header values are (UTF-8 when valid, else latin1).
    for (let i = 0; i + 1 < macros.length; i += 2) m.set(decodeText(macros[i], 'string') as string, decodeText(macros[i + 1], 'string') as string);
  }
  dispatcher!.deliver(s, type, seq, a0, a1, a2, a3);
}

/**
 * A session's libmilter worker could not write the actions its eom recorded
 * (the MTA stopped reading, or the connection broke): the step was answered
 * with the fallback (TEMPFAIL, 451 4.3.0) instead of the handler's status,
 * unless that was a rejection. Reported like a failed handler.
 */
function onActionFailed(connId: number, action: string, why: string, unsent: number): void {
  const err = new ActionFailedError(
    `${action}: libmilter could not write it to the MTA (${why})` + (unsent > 0 ? `; ${unsent} later action(s) not sent` : '') +
      '; the message was answered with TEMPFAIL instead',
  );
  const s = sessions.get(connId);
  if (s) report(err, s, Ev.EOM, C.TEMPFAIL);
  else logger.error(`nodemilter: eom on connection ${connId}: ${err.message}`, err);
}

function onStopped(error: string): void {
  const res = resolveMain;
  const rej = rejectMain;
  resolveMain = rejectMain = undefined;
  // Sessions parked between commands are abandoned by libmilter (no close):
  // mark them closed. A session parked inside a callback (seq > 0) is still
  // alive: its answer and its eom modifications still reach the MTA.
  for (const s of sessions.values()) if (!s.seq) s.closed = true;
  events.emit('stopped');
  if (error && !stopPromise) rej?.(new MilterError(error, 'ERR_MILTER_STOPPED'));
  else res?.();
}

/** Internal hooks for the test suite and runmilter. @internal */
export const _internal = {
  isStarted: (): boolean => started,
  native: addon,
};
