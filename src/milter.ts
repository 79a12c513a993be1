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
 * @module
 */
import { EventEmitter } from 'node:events';
import * as net from 'node:net';
import { isUtf8 } from 'node:buffer';
import { isMainThread } from 'node:worker_threads';

import * as C from './constants';
import {
  ActionFailedError,
  ActionNotAllowedError,
  ContextClosedError,
  DisabledActionError,
  InvalidArgumentError,
  InvalidStatusError,
  MilterError,
  MilterStateError,
} from './errors';
import { ActionCode, ConnHandle, Ev, NativeBinding, loadNative } from './native';
import { parseSocketSpec } from './socketspec';
import type {
  Bytes,
  CallbackName,
  Callbacks,
  DecodableCallback,
  Decoding,
  Family,
  HostAddr,
  Logger,
  MilterContext,
  MilterDescription,
  NegotiateResult,
} from './types';
import {
  normalizeSymlist,
  validateEnvelope,
  validateHeaderIndex,
  validateHeaderName,
  validateHeaderValue,
  validateQuarantineReason,
  validateReply,
} from './validate';

export * from './constants';
export type { Callbacks, MilterContext, MilterDescription, NegotiateOffer, NegotiateResult, Family, HostAddr } from './types';

/* ------------------------------------------------------------------------ */
/* Configuration                                                            */

/** Per-callback deadlines in milliseconds; `default` applies to the rest. */
export type Deadlines = Partial<Record<CallbackName | 'default', number>>;

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
}

const DEFAULT_DEADLINE = 8_000;
const DEFAULT_EOM_DEADLINE = 240_000;
const DEFAULT_PROGRESS = 4_000;

/** Macros remembered for callbacks that run without a parked libmilter thread. */
const COMMON_MACROS = [
  'j', '_', 'i', 'v', '{daemon_name}', '{daemon_addr}', '{if_name}', '{if_addr}', '{client_addr}',
  '{client_port}', '{client_name}', '{client_ptr}', '{client_resolve}', '{auth_type}', '{auth_authen}',
  '{auth_author}', '{auth_ssf}', '{mail_mailer}', '{mail_host}', '{mail_addr}', '{rcpt_mailer}',
  '{rcpt_host}', '{rcpt_addr}', '{tls_version}', '{cipher}', '{cipher_bits}', '{cert_subject}',
  '{cert_issuer}', '{verify}',
];

const CALLBACK_EVENT: Record<CallbackName, number> = {
  negotiate: Ev.NEGOTIATE,
  connect: Ev.CONNECT,
  helo: Ev.HELO,
  envfrom: Ev.ENVFROM,
  envrcpt: Ev.ENVRCPT,
  data: Ev.DATA,
  header: Ev.HEADER,
  eoh: Ev.EOH,
  body: Ev.BODY,
  eom: Ev.EOM,
  abort: Ev.ABORT,
  close: Ev.CLOSE,
  unknown: Ev.UNKNOWN,
};
const EVENT_NAMES: CallbackName[] = [
  'negotiate', 'connect', 'helo', 'envfrom', 'envrcpt', 'data', 'header', 'eoh', 'body', 'eom', 'abort', 'close', 'unknown',
];
const CALLBACK_NAMES = new Set<string>(EVENT_NAMES);
/** SMFIP_NR_* per event (0: the step always needs an answer). */
const NR_BIT = [0, C.P_NR_CONN, C.P_NR_HELO, C.P_NR_MAIL, C.P_NR_RCPT, C.P_NR_DATA, C.P_NR_HDR, C.P_NR_EOH, C.P_NR_BODY, 0, 0, 0, C.P_NR_UNKN];

/** A logger: console fits, and so does pino. */
export type MilterLogger = Logger;

/** What {@link events} reports when a handler fails. */
export interface HandlerErrorInfo {
  /** The callback that failed. */
  callback: CallbackName;
  /** The session. */
  connection: number;
  /** The status answered instead (undefined for steps nobody waits for). */
  answered?: number;
}

/**
 * Errors and notices from the engine. `handlerError` (err, info): a handler
 * threw, rejected or returned something that is not a status; the exception
 * policy answered for it. `stopped` (): libmilter has returned. When nobody
 * listens to `handlerError`, the error goes to the logger.
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
let decodeOf: Partial<Record<DecodableCallback, Decoding>> = {};

function addon(): NativeBinding {
  if (!native) native = loadNative();
  return native;
}

function mainThreadOnly(what: string): void {
  if (!isMainThread) {
    throw new MilterStateError(`${what}: libmilter keeps one milter per process; run it on the main thread, not in a worker`);
  }
}

function notStarted(what: string): void {
  if (started) throw new MilterStateError(`${what} after main(): libmilter runs one milter per process and cannot be reconfigured while running`);
}

/** Where {@link events} sends errors nobody listens for; console by default. */
export function setLogger(l: MilterLogger): void {
  logger = l;
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
  if (typeof name !== 'string' || name.length === 0 || name.includes('\0')) {
    throw new InvalidArgumentError(`milter name must be a non-empty string without NUL, got ${JSON.stringify(name)}`);
  }
  if (!callbacks || typeof callbacks !== 'object') throw new InvalidArgumentError('callbacks must be an object of functions');
  for (const [key, fn] of Object.entries(callbacks)) {
    if (!CALLBACK_NAMES.has(key)) throw new InvalidArgumentError(`unknown callback "${key}"; expected one of ${EVENT_NAMES.join(', ')}`);
    if (fn !== undefined && typeof fn !== 'function') throw new InvalidArgumentError(`callback "${key}" must be a function, got ${typeof fn}`);
  }
  for (const n of options.noreply ?? []) {
    if (!CALLBACK_NAMES.has(n) || NR_BIT[CALLBACK_EVENT[n]] === 0 && n !== 'abort' && n !== 'close') {
      throw new InvalidArgumentError(`"${n}" cannot be a no-reply callback; expected one of connect, helo, envfrom, envrcpt, data, header, eoh, body, unknown`);
    }
  }
  checkIntOption('actions', options.actions);
  checkIntOption('steps', options.steps);
  registered = { name, callbacks, options, flags: registered?.flags };
}

function checkIntOption(what: string, v: number | undefined): void {
  if (v !== undefined && (!Number.isInteger(v) || v < 0 || v > 0xffffffff)) {
    throw new InvalidArgumentError(`${what} must be a 32-bit flag mask, got ${String(v)}`);
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
  mainThreadOnly('setconn()');
  notStarted('setconn()');
  parseSocketSpec(spec);
  addon().setconn(spec);
  connSpec = spec;
}

/** Seconds an idle session may wait for the MTA before libmilter closes it (default 7210). */
export function settimeout(seconds: number): void {
  if (!Number.isInteger(seconds) || seconds < 0) throw new InvalidArgumentError(`timeout must be whole seconds >= 0, got ${seconds}`);
  notStarted('settimeout()');
  addon().settimeout(seconds);
}

/** The listen backlog (smfi_setbacklog). */
export function setbacklog(backlog: number): void {
  if (!Number.isInteger(backlog) || backlog <= 0) throw new InvalidArgumentError(`backlog must be a positive integer, got ${backlog}`);
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
  mainThreadOnly('opensocket()');
  notStarted('opensocket()');
  if (!connSpec) throw new MilterStateError('opensocket() needs setconn() first');
  commit();
  addon().opensocket(rmsocket);
}

/**
 * What to answer when a handler throws, rejects or returns a non-status:
 * TEMPFAIL (default; 451 4.3.0), REJECT (554 5.3.0), CONTINUE or ACCEPT.
 */
export function set_exception_policy(status: number): void {
  if (![C.TEMPFAIL, C.REJECT, C.CONTINUE, C.ACCEPT].includes(status)) {
    throw new InvalidArgumentError(`exception policy must be TEMPFAIL, REJECT, CONTINUE or ACCEPT, got ${String(status)}`);
  }
  exceptionStatus = status;
}

/** libmilter's version as [major, minor, patchlevel] (smfi_version). */
export function getversion(): [number, number, number] {
  return addon().version();
}

/** Counters: sessions created and deleted, deadlines expired, and more. */
export interface Diag {
  /** Sessions (contexts) libmilter has created. */
  created: number;
  /** Sessions libmilter has closed. */
  deleted: number;
  /** created - deleted. */
  active: number;
  /** Callbacks answered by the fallback because JavaScript was too slow. */
  deadlineExpired: number;
  /** Progress messages sent during eom. */
  progressSent: number;
  /** Answers that arrived after their deadline and were ignored. */
  lateAnswers: number;
  /** Sessions refused with TEMPFAIL while draining. */
  drainRefused: number;
  /** Sessions in JavaScript's hands (with state kept in this module). */
  jsSessions: number;
  /** Whether libmilter is serving. */
  running: boolean;
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
  };
}

function deadlineArray(opt: RegisterOptions['deadline']): number[] {
  const out: number[] = [];
  const obj: Deadlines = typeof opt === 'number' ? { default: opt } : opt ?? {};
  for (const [k, v] of Object.entries(obj)) {
    if (k !== 'default' && !CALLBACK_NAMES.has(k)) throw new InvalidArgumentError(`deadline for unknown callback "${k}"`);
    if (typeof v !== 'number' || !(v > 0) || !Number.isFinite(v)) throw new InvalidArgumentError(`deadline "${k}" must be a positive number of milliseconds, got ${String(v)}`);
  }
  const dflt = obj.default ?? DEFAULT_DEADLINE;
  for (let i = 0; i < Ev.COUNT; i++) {
    const name = EVENT_NAMES[i];
    out.push(Math.round(obj[name] ?? (name === 'eom' ? Math.max(dflt, DEFAULT_EOM_DEADLINE) : dflt)));
  }
  return out;
}

function commit(): void {
  if (committed) return;
  if (!registered || !registered.name) throw new MilterStateError('register() must be called first');
  const { name, callbacks, options } = registered;
  let handled = 0;
  let noreply = 0;
  for (const n of EVENT_NAMES) if (typeof callbacks[n] === 'function') handled |= 1 << CALLBACK_EVENT[n];
  // abort and close never make the MTA wait.
  noreply |= (1 << Ev.ABORT) | (1 << Ev.CLOSE);
  for (const n of options.noreply ?? []) noreply |= 1 << CALLBACK_EVENT[n];
  const symlists: string[] = [];
  const watch = new Set(COMMON_MACROS);
  for (let stage = 0; stage < 7; stage++) {
    const list = options.symlists?.[stage as C.MacroStage] ?? [];
    for (const m of list) {
      if (typeof m !== 'string' || !m || /[\s\0]/.test(m)) throw new InvalidArgumentError(`bad macro name ${JSON.stringify(m)} in symlist`);
      watch.add(m);
    }
    symlists.push(list.join(' '));
  }
  const actions = registered.flags ?? options.actions;
  const progress = options.progressInterval ?? DEFAULT_PROGRESS;
  if (!(progress >= 0)) throw new InvalidArgumentError(`progressInterval must be >= 0 ms, got ${progress}`);
  decodeOf = { ...options.decode };
  dispatcher = new Dispatcher(callbacks);
  addon().register({
    name,
    actions: actions ?? -1,
    steps: options.steps ?? -1,
    handled,
    noreply,
    dynamicNegotiate: typeof callbacks.negotiate === 'function',
    symlists,
    deadlines: deadlineArray(options.deadline),
    progressMs: Math.round(progress),
    fallbackStatus: C.TEMPFAIL,
    watch: [...watch],
  });
  committed = true;
}

/**
 * Start serving (smfi_main). Returns at once with a Promise that resolves
 * when the milter has stopped, or rejects if libmilter could not serve
 * (socket in use, permissions) or returned without stop(). libmilter runs
 * once per process: a second main() throws MilterStateError.
 */
export function main(): Promise<void> {
  mainThreadOnly('main()');
  if (started) throw new MilterStateError('main() was already called: libmilter runs once per process and cannot be restarted');
  if (!connSpec) throw new MilterStateError('main() needs setconn() first');
  commit();
  const n = addon();
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
   * (421 4.3.2) while open ones finish; then libmilter stops. 0 (default):
   * stop at once (sessions parked between commands are abandoned and the
   * MTA applies its failure action).
   */
  drain?: number;
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
  if (!(drain >= 0)) throw new InvalidArgumentError(`drain must be >= 0 ms, got ${drain}`);
  const n = addon();
  stopPromise = (async () => {
    if (drain > 0) {
      n.setDraining(true);
      const until = Date.now() + drain;
      while (n.getdiag().serving > 0 && Date.now() < until) await new Promise((r) => setTimeout(r, 25));
    }
    n.stop();
    // smfi_stop sets its flag from another thread; poke until the listener has returned.
    const poke = setInterval(wakeListener, 50);
    wakeListener();
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
let dispatcher: Dispatcher | undefined;

type Pending = [number, number, any, any, any, any];

/** The status a step may answer, beyond the common ones. */
function checkStatus(type: number, status: unknown, steps: number): number {
  if (typeof status !== 'number' || !Number.isInteger(status)) {
    throw new InvalidStatusError(`${EVENT_NAMES[type]} returned ${describe(status)}, expected a status such as CONTINUE, REJECT, TEMPFAIL, ACCEPT or DISCARD`);
  }
  switch (status) {
    case C.CONTINUE:
    case C.REJECT:
    case C.DISCARD:
    case C.ACCEPT:
    case C.TEMPFAIL:
      return status;
    case C.SKIP:
      if (type === Ev.BODY && steps & C.P_SKIP) return status;
      throw new InvalidStatusError(`${EVENT_NAMES[type]} returned SKIP, which is only valid from body when SMFIP_SKIP was negotiated`);
    case C.NOREPLY:
      if (NR_BIT[type] && steps & NR_BIT[type]) return status;
      throw new InvalidStatusError(`${EVENT_NAMES[type]} returned NOREPLY, but no-reply was not negotiated for it (the MTA would wait and time out)`);
    default:
      throw new InvalidStatusError(`${EVENT_NAMES[type]} returned ${describe(status)}, which is not a valid status here`);
  }
}

function describe(v: unknown): string {
  if (v === undefined) return 'undefined';
  if (typeof v === 'number') return C.statusName(v) ?? String(v);
  if (typeof v === 'string') return JSON.stringify(v);
  return typeof v === 'object' ? (v === null ? 'null' : 'an object') : typeof v;
}

function decodeText(v: string | Buffer, how: Decoding | undefined): string | Buffer {
  if (how === 'bytes') return typeof v === 'string' ? Buffer.from(v, 'latin1') : v;
  if (typeof v === 'string') return v;
  return isUtf8(v) ? v.toString('utf8') : v.toString('latin1');
}

const FAMILIES: Record<number, Family> = { 0: 'unknown', 1: 'unix', 4: 'inet', 6: 'inet6' };

class Dispatcher {
  constructor(readonly cb: Callbacks) {}

  /** Run one event's callback; returns its result (maybe a promise). */
  invoke(s: Session, type: number, a0: any, a1: any, a2: any, a3: any): unknown {
    const cb = this.cb;
    switch (type) {
      case Ev.NEGOTIATE:
        return cb.negotiate!(s, { actions: a0, steps: a1 });
      case Ev.CONNECT: {
        const family = FAMILIES[a1] ?? 'unknown';
        const where = typeof a2 === 'string' ? a2 : (a2 as Buffer).toString('utf8');
        const hostaddr: HostAddr = family === 'inet' || family === 'inet6' ? { address: where, port: a3 } : family === 'unix' ? { path: where } : null;
        return cb.connect!(s, decodeText(a0, decodeOf.connect) as string, family, hostaddr);
      }
      case Ev.HELO:
        return cb.helo!(s, decodeText(a0, decodeOf.helo) as string);
      case Ev.ENVFROM:
        return cb.envfrom!(s, ...(a0 as (string | Buffer)[]).map((v) => decodeText(v, decodeOf.envfrom)));
      case Ev.ENVRCPT:
        return cb.envrcpt!(s, ...(a0 as (string | Buffer)[]).map((v) => decodeText(v, decodeOf.envrcpt)));
      case Ev.DATA:
        return cb.data!(s);
      case Ev.HEADER:
        return cb.header!(s, decodeText(a0, 'string') as string, decodeText(a1, decodeOf.header));
      case Ev.EOH:
        return cb.eoh!(s);
      case Ev.BODY:
        return cb.body!(s, a0 as Buffer);
      case Ev.EOM:
        return cb.eom!(s);
      case Ev.ABORT:
        return cb.abort!(s);
      case Ev.CLOSE:
        return cb.close?.(s);
      case Ev.UNKNOWN:
        return cb.unknown!(s, decodeText(a0, decodeOf.unknown));
      default:
        return undefined;
    }
  }
}

function report(err: unknown, s: Session, type: number, answered?: number): void {
  const error = err instanceof Error ? err : new MilterError(`handler threw a non-Error value: ${describe(err)}`, 'ERR_MILTER_HANDLER');
  const info: HandlerErrorInfo = { callback: EVENT_NAMES[type], connection: s.id, answered };
  if (events.listenerCount('handlerError') > 0) {
    try {
      events.emit('handlerError', error, info);
      return;
    } catch (e) {
      logger.error('nodemilter: handlerError listener threw', e);
    }
  }
  logger.error(`nodemilter: ${info.callback} handler failed on connection ${s.id}:`, error);
}

/** The per-session context handed to every callback. */
class Session implements MilterContext {
  /** Current callback's sequence number when libmilter is parked on it, else 0. */
  seq = 0;
  type = -1;
  busy = false;
  closed = false;
  failed = false;
  queue: Pending[] | undefined;
  macros: Map<string, string> | undefined;
  private priv: unknown;
  private flags: [number, number] | undefined;

  constructor(readonly id: number, readonly handle: ConnHandle) {}

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

  getpriv<T = unknown>(): T | undefined {
    return this.priv as T | undefined;
  }

  setpriv(value: unknown): void {
    this.priv = value;
  }

  getsymval(name: string): string | undefined {
    if (typeof name !== 'string' || !name) throw new InvalidArgumentError(`macro name must be a non-empty string, got ${describe(name)}`);
    if (this.seq && !this.closed) {
      const v = addon().getsymval(this.handle, this.seq, name);
      if (v !== undefined) return v ?? undefined;
    }
    const m = this.macros;
    if (!m) return undefined;
    const bare = name.startsWith('{') && name.endsWith('}') ? name.slice(1, -1) : name;
    return m.get(name) ?? m.get(bare) ?? m.get(`{${bare}}`);
  }

  private check(code: number, what: string): void {
    switch (code) {
      case ActionCode.OK:
        return;
      case ActionCode.CLOSED:
        throw new ContextClosedError(`${what}: connection ${this.id} is closed`);
      case ActionCode.NOT_PARKED:
        throw new ActionNotAllowedError(
          `${what}: the MTA is not waiting for this callback any more (it returned, its deadline passed, or it is a no-reply step); call actions before the handler's result settles`,
        );
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

  private ready(what: string, flag: number, eom = true): void {
    if (this.closed) throw new ContextClosedError(`${what}: connection ${this.id} is closed`);
    if (eom && this.type !== Ev.EOM) throw new ActionNotAllowedError(`${what} is only allowed in eom, not in ${EVENT_NAMES[this.type] ?? 'this callback'}`);
    if (flag && !(this.actions & flag)) {
      const name = Object.entries(C).find(([k, v]) => k.startsWith('SMFIF_') && v === flag)?.[0] ?? String(flag);
      throw new DisabledActionError(`${what} needs the ${name} action flag, which was not negotiated with the MTA`, flag);
    }
  }

  setreply(rcode: string, xcode?: string | null, ...lines: string[]): void {
    if (this.closed) throw new ContextClosedError(`setreply: connection ${this.id} is closed`);
    const r = validateReply(rcode, xcode, lines);
    this.check(addon().setreply(this.handle, this.seq, r.rcode, r.xcode, r.lines), 'setreply');
  }

  setsymlist(stage: C.MacroStage, macros: string | readonly string[]): void {
    this.ready('setsymlist', 0, false);
    const list = normalizeSymlist(stage, macros);
    this.check(addon().setsymlist(this.handle, this.seq, stage, list.join(' ')), 'setsymlist');
  }

  addheader(name: string, value: Bytes, index = -1): void {
    this.ready('addheader', C.ADDHDRS);
    validateHeaderName(name);
    validateHeaderValue(name, value);
    if (index !== -1) validateHeaderIndex(index, 'insert');
    const code = index >= 0 ? addon().insheader(this.handle, this.seq, index, name, value) : addon().addheader(this.handle, this.seq, name, value);
    this.check(code, index >= 0 ? 'insheader' : 'addheader');
  }

  chgheader(name: string, index: number, value: Bytes | null): void {
    this.ready('chgheader', C.CHGHDRS);
    validateHeaderName(name);
    validateHeaderIndex(index, 'change');
    if (value !== null && value !== undefined) validateHeaderValue(name, value);
    const v = value === null || value === undefined || value.length === 0 ? null : value;
    this.check(addon().chgheader(this.handle, this.seq, name, index, v), 'chgheader');
  }

  addrcpt(rcpt: Bytes, params?: Bytes | null): void {
    const withParams = params !== undefined && params !== null;
    this.ready('addrcpt', withParams ? C.ADDRCPT_PAR : C.ADDRCPT);
    validateEnvelope('recipient', rcpt);
    if (withParams) validateEnvelope('ESMTP parameters', params!, true);
    this.check(addon().addrcpt(this.handle, this.seq, rcpt, withParams ? params : null), 'addrcpt');
  }

  delrcpt(rcpt: Bytes): void {
    this.ready('delrcpt', C.DELRCPT);
    validateEnvelope('recipient', rcpt);
    this.check(addon().delrcpt(this.handle, this.seq, rcpt), 'delrcpt');
  }

  replacebody(chunk: Bytes): void {
    this.ready('replacebody', C.CHGBODY);
    if (typeof chunk !== 'string' && !Buffer.isBuffer(chunk)) throw new InvalidArgumentError(`replacebody takes a Buffer or string, got ${describe(chunk)}`);
    const buf = typeof chunk === 'string' ? Buffer.from(chunk, 'utf8') : chunk;
    this.check(addon().replacebody(this.handle, this.seq, buf), 'replacebody');
  }

  chgfrom(sender: Bytes, params?: Bytes | null): void {
    this.ready('chgfrom', C.CHGFROM);
    validateEnvelope('sender', sender);
    const withParams = params !== undefined && params !== null;
    if (withParams) validateEnvelope('ESMTP parameters', params!, true);
    this.check(addon().chgfrom(this.handle, this.seq, sender, withParams ? params : null), 'chgfrom');
  }

  quarantine(reason: string): void {
    this.ready('quarantine', C.QUARANTINE);
    validateQuarantineReason(reason);
    this.check(addon().quarantine(this.handle, this.seq, reason), 'quarantine');
  }

  progress(): void {
    this.ready('progress', 0);
    this.check(addon().progress(this.handle, this.seq), 'progress');
  }
}

function onEvent(type: number, connId: number, seq: number, handle: ConnHandle | undefined, a0: any, a1: any, a2: any, a3: any, macros: string[] | undefined): void {
  if (type === Ev.STOPPED) {
    onStopped(a0 as string);
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
    for (let i = 0; i + 1 < macros.length; i += 2) m.set(macros[i], macros[i + 1]);
  }
  if (type === Ev.CLOSE) s.closed = true;
  if (s.busy) {
    (s.queue ??= []).push([type, seq, a0, a1, a2, a3]);
    return;
  }
  run(s, type, seq, a0, a1, a2, a3);
  pump(s);
}

function pump(s: Session): void {
  const q = s.queue;
  while (!s.busy && q && q.length > 0) {
    const [type, seq, a0, a1, a2, a3] = q.shift()!;
    run(s, type, seq, a0, a1, a2, a3);
  }
}

function run(s: Session, type: number, seq: number, a0: any, a1: any, a2: any, a3: any): void {
  if (type === Ev.CLOSE) {
    sessions.delete(s.id);
    if (!dispatcher!.cb.close) return;
  }
  if (seq > 0 && s.failed) {
    // An earlier no-reply step failed: nothing is accepted silently.
    s.failed = false;
    s.seq = seq;
    s.type = type;
    answerFailure(s, type, seq);
    return;
  }
  s.seq = seq;
  s.type = type;
  let result: unknown;
  try {
    result = dispatcher!.invoke(s, type, a0, a1, a2, a3);
  } catch (err) {
    failed(s, type, seq, err);
    return;
  }
  if (result !== null && typeof result === 'object' && typeof (result as PromiseLike<unknown>).then === 'function') {
    s.busy = true;
    (result as PromiseLike<unknown>).then(
      (v) => {
        finish(s, type, seq, v);
        s.busy = false;
        pump(s);
      },
      (err) => {
        failed(s, type, seq, err);
        s.busy = false;
        pump(s);
      },
    );
    return;
  }
  finish(s, type, seq, result);
}

function finish(s: Session, type: number, seq: number, result: unknown): void {
  if (type === Ev.ABORT || type === Ev.CLOSE) {
    s.seq = 0;
    return;
  }
  if (type === Ev.NEGOTIATE) {
    finishNegotiate(s, seq, result);
    return;
  }
  if (seq === 0) {
    s.seq = 0;
    // No-reply step: the MTA was answered already.
    if (result !== C.CONTINUE && result !== C.NOREPLY) {
      report(
        new InvalidStatusError(`${EVENT_NAMES[type]} is a no-reply step but its handler returned ${describe(result)}; only CONTINUE is possible there and the result is lost`),
        s,
        type,
      );
      if (result !== undefined && result !== C.ACCEPT) s.failed = true;
    }
    return;
  }
  let status: number;
  try {
    status = checkStatus(type, result, s.steps);
  } catch (err) {
    failed(s, type, seq, err);
    return;
  }
  s.seq = 0;
  addon().reply(s.handle, seq, status);
}

function finishNegotiate(s: Session, seq: number, result: unknown): void {
  let status: number;
  let actions = 0;
  let steps = 0;
  if (typeof result === 'number') {
    status = result;
  } else if (result && typeof result === 'object' && typeof (result as NegotiateResult).status === 'number') {
    const r = result as NegotiateResult;
    status = r.status;
    actions = r.actions ?? 0;
    steps = r.steps ?? 0;
  } else {
    failed(s, Ev.NEGOTIATE, seq, new InvalidStatusError(`negotiate returned ${describe(result)}, expected ALL_OPTS, CONTINUE with {actions, steps}, or REJECT`));
    return;
  }
  if (![C.ALL_OPTS, C.CONTINUE, C.REJECT, C.TEMPFAIL].includes(status)) {
    failed(s, Ev.NEGOTIATE, seq, new InvalidStatusError(`negotiate returned status ${describe(status)}, expected ALL_OPTS, CONTINUE or REJECT`));
    return;
  }
  s.seq = 0;
  addon().reply(s.handle, seq, status, actions >>> 0, steps >>> 0);
}

function failed(s: Session, type: number, seq: number, err: unknown): void {
  if (seq === 0 || type === Ev.ABORT || type === Ev.CLOSE) {
    s.seq = 0;
    report(err, s, type);
    if (type !== Ev.ABORT && type !== Ev.CLOSE && exceptionStatus !== C.CONTINUE && exceptionStatus !== C.ACCEPT) s.failed = true;
    return;
  }
  report(err, s, type, type === Ev.NEGOTIATE ? C.ALL_OPTS : exceptionStatus);
  answerFailure(s, type, seq);
}

function answerFailure(s: Session, type: number, seq: number): void {
  const n = addon();
  if (type === Ev.NEGOTIATE) {
    s.seq = 0;
    n.reply(s.handle, seq, C.ALL_OPTS);
    return;
  }
  let status = exceptionStatus;
  if (status === C.TEMPFAIL) n.setreply(s.handle, seq, '451', '4.3.0', ['Temporary failure in mail filter']);
  else if (status === C.REJECT) n.setreply(s.handle, seq, '554', '5.3.0', ['Mail filter failed']);
  else if (status === C.ACCEPT && type === Ev.EOM) status = C.CONTINUE;
  s.seq = 0;
  n.reply(s.handle, seq, status);
}

function onStopped(error: string): void {
  const res = resolveMain;
  const rej = rejectMain;
  resolveMain = rejectMain = undefined;
  for (const s of sessions.values()) s.closed = true;
  events.emit('stopped');
  if (error && !stopPromise) rej?.(new MilterError(error, 'ERR_MILTER_STOPPED'));
  else res?.();
}

/** Internal hooks for the test suite and runmilter. @internal */
export const _internal = {
  isStarted: (): boolean => started,
  native: addon,
};
