/**
 * The milter protocol engine in TypeScript: a `net` server that speaks the
 * milter protocol (version 6, and the option negotiation of versions 2-5)
 * to the MTA and runs a {@link MilterDescription}'s callbacks through the
 * shared dispatcher, with libmilter's rules for states, replies and
 * negotiation. One event loop, no worker threads, no libmilter.
 *
 * @internal
 * @module
 */
import { isAscii } from 'node:buffer';
import { EventEmitter } from 'node:events';
import * as fs from 'node:fs';
import * as net from 'node:net';

import * as C from '../constants';
import { InvalidArgumentError, MilterError, MilterStateError, ActionNotAllowedError, ContextClosedError } from '../errors';
import { LoopSpin, spinUsFromEnv } from '../loopspin';
import { parseSocketSpec, refuseNonSocket, removeUnixSocket } from '../socketspec';
import type { Bytes, EngineCounters, Logger, MilterDescription } from '../types';
import type { Reply } from '../validate';
import {
  Dispatcher,
  EVENT_NAMES,
  Ev,
  decodeText,
  NOT_PARKED_MESSAGE,
  NO_BIT,
  NR_BIT,
  SessionCore,
  checkBacklog,
  checkCallbacks,
  checkDrain,
  checkExceptionPolicy,
  checkIntOption,
  checkMilterName,
  checkMs,
  checkSessionCap,
  checkTimeout,
  deadlineArray,
  eventMasks,
  progressMs,
  reportHandlerError,
  symlistStrings,
  type Deadlines,
  type HandlerErrorInfo,
  type MessageLimits,
  type SessionCapOptions,
} from './dispatch';
import { Cmd, FrameReader, FrameWriter, MIN_PROTOCOL_VERSION, PROTOCOL_VERSION, Rep, asciiStringsIn, cstr, rawStringsIn, rawText, rawTextIn, splitStrings, u32 } from './protocol';

/* ---- libmilter's session states and their allowed successors. */

const ST = { INIT: 0, OPTS: 1, CONN: 2, HELO: 3, MAIL: 4, RCPT: 5, DATA: 6, HDRS: 7, EOHS: 8, BODY: 9, ENDM: 10, QUIT: 11, ABRT: 12, UNKN: 13, Q_NC: 14 } as const;
const M = (...states: number[]) => states.reduce((a, s) => a | (1 << s), 0);
const NEXT: readonly number[] = [
  /* INIT */ M(ST.OPTS),
  /* OPTS */ M(ST.CONN, ST.UNKN),
  /* CONN */ M(ST.HELO, ST.MAIL, ST.UNKN, ST.QUIT),
  /* HELO */ M(ST.HELO, ST.MAIL, ST.UNKN, ST.QUIT),
  /* MAIL */ M(ST.RCPT, ST.ABRT, ST.UNKN),
  /* RCPT */ M(ST.HDRS, ST.EOHS, ST.DATA, ST.BODY, ST.ENDM, ST.RCPT, ST.ABRT, ST.UNKN),
  /* DATA */ M(ST.EOHS, ST.HDRS, ST.ABRT),
  /* HDRS */ M(ST.EOHS, ST.HDRS, ST.ABRT),
  /* EOHS */ M(ST.BODY, ST.ENDM, ST.ABRT),
  /* BODY */ M(ST.ENDM, ST.BODY, ST.ABRT),
  /* ENDM */ M(ST.QUIT, ST.MAIL, ST.UNKN, ST.Q_NC),
  /* QUIT */ 0,
  /* ABRT */ 0,
  /* UNKN */ M(ST.HELO, ST.MAIL, ST.RCPT, ST.DATA, ST.HDRS, ST.EOHS, ST.BODY, ST.ENDM, ST.QUIT, ST.ABRT, ST.UNKN, ST.Q_NC),
  /* Q_NC */ M(ST.CONN, ST.UNKN),
];
/** States a session may pass over when their step was negotiated away (SMFIP_NO*). */
const SKIPPABLE: [number, number][] = [
  [ST.CONN, C.P_NOCONNECT], [ST.HELO, C.P_NOHELO], [ST.MAIL, C.P_NOMAIL], [ST.RCPT, C.P_NORCPT],
  [ST.HDRS, C.P_NOHDRS], [ST.EOHS, C.P_NOEOH], [ST.BODY, C.P_NOBODY], [ST.DATA, C.P_NODATA],
];
/** SMFIP_NR_* of each state (0: none). */
const STATE_NR: Record<number, number> = {
  [ST.CONN]: C.P_NR_CONN, [ST.HELO]: C.P_NR_HELO, [ST.MAIL]: C.P_NR_MAIL, [ST.RCPT]: C.P_NR_RCPT, [ST.DATA]: C.P_NR_DATA,
  [ST.UNKN]: C.P_NR_UNKN, [ST.HDRS]: C.P_NR_HDR, [ST.EOHS]: C.P_NR_EOH, [ST.BODY]: C.P_NR_BODY,
};

/** Macro stage per SMFIC_MACRO stage character, in libmilter's slot order. */
const MACRO_SLOT: Record<number, number> = {
  [Cmd.CONNECT]: C.M_CONNECT, [Cmd.HELO]: C.M_HELO, [Cmd.MAIL]: C.M_ENVFROM, [Cmd.RCPT]: C.M_ENVRCPT,
  [Cmd.DATA]: C.M_DATA, [Cmd.BODYEOB]: C.M_EOM, [Cmd.EOH]: C.M_EOH,
};

interface CommandSpec {
  state: number;
  /** A failure status keeps the state (RCPT, UNKNOWN). */
  ignoreFailure: boolean;
  /** Macro slot whose later slots are cleared when this command arrives (MAIL, RCPT), or -1. */
  slot: number;
}
const COMMANDS: Record<number, CommandSpec> = {
  [Cmd.ABORT]: { state: ST.ABRT, ignoreFailure: false, slot: -1 },
  [Cmd.BODY]: { state: ST.BODY, ignoreFailure: false, slot: -1 },
  [Cmd.CONNECT]: { state: ST.CONN, ignoreFailure: false, slot: -1 },
  [Cmd.BODYEOB]: { state: ST.ENDM, ignoreFailure: false, slot: -1 },
  [Cmd.HELO]: { state: ST.HELO, ignoreFailure: false, slot: -1 },
  [Cmd.HEADER]: { state: ST.HDRS, ignoreFailure: false, slot: -1 },
  [Cmd.MAIL]: { state: ST.MAIL, ignoreFailure: false, slot: C.M_ENVFROM },
  [Cmd.OPTNEG]: { state: ST.OPTS, ignoreFailure: false, slot: -1 },
  [Cmd.EOH]: { state: ST.EOHS, ignoreFailure: false, slot: -1 },
  [Cmd.QUIT]: { state: ST.QUIT, ignoreFailure: false, slot: -1 },
  [Cmd.DATA]: { state: ST.DATA, ignoreFailure: false, slot: -1 },
  [Cmd.RCPT]: { state: ST.RCPT, ignoreFailure: true, slot: C.M_ENVRCPT },
  [Cmd.UNKNOWN]: { state: ST.UNKN, ignoreFailure: true, slot: -1 },
  [Cmd.QUIT_NC]: { state: ST.Q_NC, ignoreFailure: false, slot: -1 },
};

type MacroTable = (readonly string[] | undefined)[];

/* ---- Options and the server. */

const DEFAULT_BACKLOG = 4096;
const DEFAULT_MAX_SESSIONS = 1000;
/** File descriptors kept free under a small limit when maxSessions is the default. */
const FD_RESERVE = 64;
const DEFAULT_NEGOTIATION_TIMEOUT = 30_000;
const DEFAULT_FRAME_TIMEOUT = 30_000;
const DEFAULT_WRITE_TIMEOUT = 60_000;
const DEFAULT_MAX_OUTPUT = 128 * 1024 * 1024;
/**
 * Bytes of no-reply events (body chunks, headers) that may wait behind a
 * pending handler before the session stops reading from the MTA.
 */
export const QUEUE_HIGH_WATER = 1024 * 1024;

/**
 * How the TypeScript engine bounds what one MTA connection may cost
 * (docs/reliability.md, section 7): the admission options of both engines,
 * plus timeouts and an output cap of its own.
 */
export interface FlowOptions extends SessionCapOptions {
  /**
   * Milliseconds the MTA has after connecting to send its option
   * negotiation (a connection refused over `maxSessions`: to get its
   * answer); past it the connection is closed and counted in
   * `negotiationTimeouts`. Default 30000; 0: no limit.
   */
  negotiationTimeout?: number;
  /**
   * Milliseconds one command frame may take from the moment the engine
   * first holds part of it until its last byte. More bytes do not restart
   * the clock, so a connection that trickles a frame is closed once this
   * passes (`frameTimeouts`). Default 30000; 0: no limit.
   */
  frameTimeout?: number;
  /**
   * Milliseconds queued output may go without any of it being taken by the
   * MTA before the session is ended (`writeStalls`). Default 60000; 0: no
   * limit (then only the session timeout ends it).
   */
  writeTimeout?: number;
  /**
   * Most bytes of output queued for one session and not yet taken by the
   * MTA. An action that would pass it throws a MilterError with code
   * `ERR_MILTER_OUTPUT_LIMIT` (the handler's failure is answered by the
   * exception policy) and is counted in `outputLimited`. Default 128 MiB.
   */
  maxOutputBytes?: number;
  /**
   * Event-loop lag in milliseconds (sampled every 50 ms) past which new
   * connections are shed: answered as over `maxSessions` and counted in
   * `sessionsShed`. Default 0: never.
   */
  maxEventLoopLag?: number;
}

/** Options of {@link serve}. */
export interface ServeOptions extends FlowOptions {
  /** Where to listen: `unix:/path`, `local:/path`, `inet:PORT@HOST`, `inet6:PORT@HOST`, or `fd:N` (an open listening socket). */
  socket: string;
  /** Per-callback deadlines in ms, as in `milter.register` (default 8 s, eom 240 s). */
  deadline?: number | Deadlines;
  /** Milliseconds between progress messages while eom is pending (default 4000; 0: never). */
  progressInterval?: number;
  /** What to answer when a handler fails: TEMPFAIL (default), REJECT, CONTINUE or ACCEPT. */
  exceptionPolicy?: number;
  /** Seconds a session may wait for the MTA's next command before it is closed (default 7210, as libmilter). */
  timeout?: number;
  /**
   * Listen backlog. Default 4096, the `SOMAXCONN` libmilter uses on Linux
   * (the kernel caps it at net.core.somaxconn): a burst of connections
   * waits instead of being refused. Node's own default, 511, refused 201
   * of 1000 simultaneous connects in the benchmark.
   */
  backlog?: number;
  /** Remove a stale unix socket (only if it is a socket) before listening. Default true. */
  rmsocket?: boolean;
  /** The umask while the unix socket is created. Default: the process umask. */
  umask?: number;
  /** Where handler errors go when nobody listens to `handlerError` (default console). */
  logger?: Logger;
  /**
   * Per-message limits on headers and body, the same as `milter.register`'s
   * on the libmilter engine (defaults there). Past a limit the handlers see
   * no more of the message and the MTA gets the limit's status; the server
   * emits `limitExceeded` ({connection, limit, value}).
   */
  limits?: MessageLimits;
}

/** What a {@link MilterServer} emits with `handlerError`. */
export type EngineHandlerErrorInfo = HandlerErrorInfo;

/** Counters of a {@link MilterServer}. */
export interface EngineDiag extends EngineCounters {
  /** MTA connections accepted. */
  connections: number;
  /** Connections over `maxSessions`, answered as `sessionCapAction` says. */
  sessionsRefused: number;
  /** Connections shed because the event loop lagged past `maxEventLoopLag`. */
  sessionsShed: number;
  /** Connections closed because the MTA did not negotiate within `negotiationTimeout`. */
  negotiationTimeouts: number;
  /** Connections closed because a frame did not complete within `frameTimeout`. */
  frameTimeouts: number;
  /** Sessions ended because their output made no progress for `writeTimeout`. */
  writeStalls: number;
  /** Actions refused because the session's output would pass `maxOutputBytes`. */
  outputLimited: number;
  /** Times the process ran out of file descriptors (new connections were lost meanwhile). */
  fdExhausted: number;
  /** Microseconds the event loop keeps polling after each reply (NODEMILTER_SPIN_US; 0: off, also on one CPU). */
  spinUs: number;
  /** Spins of the event loop started after a reply (only while fewer sessions than CPUs are open). */
  loopSpins: number;
  /** Event-loop turns those spins took. */
  loopSpinTurns: number;
}

/** Options of {@link MilterServer.close}. */
export interface CloseOptions {
  /**
   * Milliseconds to let open sessions finish (new ones get 421 4.3.2) before
   * closing them. A session counts as open while it is in a message, waits
   * for a handler, or has output the MTA has not taken yet. Default 0.
   */
  drain?: number;
}

let nextSessionId = 1;

/**
 * A milter served by the TypeScript engine. Several servers may run in one
 * process (unlike libmilter). Events: `handlerError` (err, info),
 * `limitExceeded` ({connection, limit, value}: a message went past one of
 * the `limits`), `close` (the server has stopped).
 */
export class MilterServer extends EventEmitter {
  readonly name: string;
  private readonly server: net.Server;
  private readonly dispatcher: Dispatcher;
  private readonly conns = new Set<Connection>();
  /** @internal */ get connectionCount(): number { return this.conns.size; }
  private listening = false;
  private draining = false;
  private closing: Promise<void> | undefined;
  private readonly logger: Logger;
  private exceptionStatus: number;
  /** @internal */ readonly cfg: EngineConfig;
  /** @internal */ readonly diag = {
    connections: 0, created: 0, deleted: 0, deadlineExpired: 0, progressSent: 0, lateAnswers: 0, drainRefused: 0,
    sessionsRefused: 0, sessionsShed: 0, negotiationTimeouts: 0, frameTimeouts: 0, writeStalls: 0, outputLimited: 0, fdExhausted: 0,
  };
  /** Connections being refused (over maxSessions or shed): answered, then closed. */
  private refusing = 0;
  /** The soft file-descriptor limit, where the OS tells it (Linux), else 0. */
  private readonly fdLimit = softFdLimit();
  private fdLow = false;
  private fdWatch: NodeJS.Timeout | undefined;
  /** Event-loop lag measured by the sampler (maxEventLoopLag), in ms. */
  private lag = 0;
  private lagWatch: NodeJS.Timeout | undefined;
  /** Connections with replies queued for the next flush (see Connection.write). */
  private dirty: Connection[] = [];
  private readonly flushAll = (): void => {
    const list = this.dirty;
    this.dirty = [];
    for (const c of list) c.flush();
  };
  /** @internal The event-loop spin after each reply (src/loopspin.ts; NODEMILTER_SPIN_US). */
  readonly spin: LoopSpin;

  /** Build a server for `description`; {@link listen} starts it. Prefer {@link serve}. */
  constructor(description: MilterDescription, readonly options: ServeOptions) {
    super();
    if (!description || typeof description !== 'object') throw new InvalidArgumentError('serve() takes a MilterDescription (what describe() or Base builds)');
    checkMilterName(description.name);
    if (!options || typeof options.socket !== 'string') throw new InvalidArgumentError('serve() needs options.socket, e.g. "inet:8894@127.0.0.1"');
    parseSocketSpec(options.socket);
    const cb = description.callbacks;
    checkCallbacks(cb, description.noreply);
    checkIntOption('actions', description.actions);
    checkIntOption('steps', description.steps);
    const policy = checkExceptionPolicy(options.exceptionPolicy ?? C.TEMPFAIL);
    const progress = progressMs(options.progressInterval);
    const timeout = checkTimeout(options.timeout ?? 7210);
    if (options.backlog !== undefined) checkBacklog(options.backlog);
    checkSessionCap(options);
    const maxSessions = options.maxSessions ?? defaultMaxSessions(this.fdLimit);
    this.spin = new LoopSpin(spinUsFromEnv(), () => this.connectionCount);
    this.name = description.name;
    this.logger = options.logger ?? console;
    this.exceptionStatus = policy;
    const masks = eventMasks(cb, description.noreply);
    const symlists = symlistStrings(description.symlists);
    this.cfg = {
      actions: description.actions,
      steps: description.steps,
      ...masks,
      dynamicNegotiate: typeof cb.negotiate === 'function',
      symlists,
      deadlines: deadlineArray(options.deadline),
      progressMs: progress,
      timeoutMs: timeout * 1000,
      maxSessions,
      capAction: options.sessionCapAction ?? 'tempfail',
      negotiationMs: checkMs('negotiationTimeout', options.negotiationTimeout, DEFAULT_NEGOTIATION_TIMEOUT),
      frameMs: checkMs('frameTimeout', options.frameTimeout, DEFAULT_FRAME_TIMEOUT),
      writeMs: checkMs('writeTimeout', options.writeTimeout, DEFAULT_WRITE_TIMEOUT),
      maxOutput: checkPositive('maxOutputBytes', options.maxOutputBytes, DEFAULT_MAX_OUTPUT),
      maxLagMs: checkMs('maxEventLoopLag', options.maxEventLoopLag, 0),
      wantSteps: staticSteps(description.steps, masks.handled, masks.noreply),
      anySymlist: symlists.some((l) => l),
    };
    this.dispatcher = new Dispatcher(
      cb,
      { ...description.decode },
      {
        exceptionStatus: () => this.exceptionStatus,
        report: (err, s, type, answered) => reportHandlerError(this, this.logger, err, s, type, answered),
        limitExceeded: (s, what, limit) => this.emit('limitExceeded', { connection: s.id, limit: what, value: limit }),
        drained: (s) => (s as NodeSession).queueDrained(),
      },
      options.limits,
    );
    // Half-open: an MTA that shuts down its side after a command still gets the answer, as from libmilter.
    this.server = net.createServer({ allowHalfOpen: true, noDelay: true } as net.ServerOpts, (sock) => this.accept(sock));
  }

  /** Start listening; resolves once the socket accepts connections. */
  listen(): Promise<void> {
    if (this.listening || this.closing) return Promise.reject(new MilterStateError('listen(): the server was already started'));
    const spec = parseSocketSpec(this.options.socket);
    const backlog = this.options.backlog ?? DEFAULT_BACKLOG;
    return new Promise<void>((resolve, reject) => {
      const onError = (err: Error) => reject(err);
      this.server.once('error', onError);
      const done = () => {
        this.server.removeListener('error', onError);
        this.server.on('error', (err: NodeJS.ErrnoException) => {
          if (err.code === 'EMFILE' || err.code === 'ENFILE') this.fdExhaustion(`accept failed with ${err.code}`);
          else this.logger.error(`${this.name}: server error: ${err.message}`, err);
        });
        this.listening = true;
        this.startWatches();
        resolve();
      };
      if (spec.kind === 'unix') {
        try {
          refuseNonSocket(spec.path, this.options.socket);
        } catch (err) {
          this.server.removeListener('error', onError);
          reject(err);
          return;
        }
        if (this.options.rmsocket !== false) removeUnixSocket(spec.path);
        const old = this.options.umask !== undefined ? process.umask(this.options.umask) : undefined;
        try {
          this.server.listen({ path: spec.path, backlog }, done);
        } finally {
          if (old !== undefined) process.umask(old);
        }
      } else if (spec.kind === 'fd') {
        this.server.listen({ fd: spec.fd, backlog } as net.ListenOptions, done);
      } else {
        const any = !spec.host || spec.host === 'INADDR_ANY';
        const host = any ? (spec.kind === 'inet6' ? '::' : '0.0.0.0') : spec.host;
        this.server.listen({ port: spec.port, host, backlog, ipv6Only: spec.kind === 'inet6' }, done);
      }
    });
  }

  /** The bound address (for `inet:0@...`, the port chosen). */
  address(): net.AddressInfo | string | null {
    return this.server.address();
  }

  /**
   * Watch what libuv hides: when the process is out of file descriptors it
   * accepts and closes new connections silently (its EMFILE trick), so the
   * descriptors in use are counted every second against the limit, and the
   * event loop's lag is sampled when `maxEventLoopLag` is set.
   */
  private startWatches(): void {
    if (this.fdLimit > 0) {
      this.fdWatch = setInterval(() => {
        let used: number;
        try {
          used = fs.readdirSync('/proc/self/fd').length;
        } catch (err) {
          const code = (err as NodeJS.ErrnoException).code;
          if (code === 'EMFILE' || code === 'ENFILE') this.fdExhaustion(`${code} while counting them`);
          return;
        }
        if (used >= this.fdLimit - 4) this.fdExhaustion(`${used} of ${this.fdLimit} in use`);
        else if (this.fdLow && used < this.fdLimit - FD_RESERVE / 2) {
          this.fdLow = false;
          this.logger.warn(`${this.name}: file descriptors available again (${used} of ${this.fdLimit} in use)`);
        }
      }, 1000).unref();
    }
    const maxLag = this.cfg.maxLagMs;
    if (maxLag > 0) {
      const every = 50;
      let last = performance.now();
      this.lagWatch = setInterval(() => {
        const now = performance.now();
        this.lag = Math.max(0, now - last - every);
        last = now;
      }, every).unref();
    }
  }

  private fdExhaustion(what: string): void {
    if (this.fdLow) return;
    this.fdLow = true;
    this.diag.fdExhausted++;
    this.logger.error(
      `${this.name}: out of file descriptors (${what}): new MTA connections are lost until some close; ` +
        `${this.conns.size} connections are open. Lower maxSessions (now ${this.cfg.maxSessions}) or raise the limit (ulimit -n, LimitNOFILE=)`,
    );
  }

  /** The server's counters. */
  getdiag(): EngineDiag {
    const spin = this.spin.counters;
    return { ...this.diag, active: this.diag.created - this.diag.deleted, running: this.listening, spinUs: this.spin.us, loopSpins: spin.spins, loopSpinTurns: spin.turns };
  }

  /** Set the exception policy (TEMPFAIL, REJECT, CONTINUE or ACCEPT). */
  setExceptionPolicy(status: number): void {
    this.exceptionStatus = checkExceptionPolicy(status);
  }

  /** Let the process exit while the server listens. */
  unref(): this {
    this.server.unref();
    return this;
  }

  /** Keep the process alive while the server listens (the default). */
  ref(): this {
    this.server.ref();
    return this;
  }

  /** Whether new sessions are refused (during a drain). @internal */
  get isDraining(): boolean {
    return this.draining;
  }

  /**
   * Stop accepting new connections, at once, and keep serving the open
   * ones; {@link close} later drains and stops. This process's listening
   * handle closes, so on a socket shared with other processes (an
   * inherited `fd:`, as runmilter's workers have) the connections that
   * arrive stay in the kernel's queue for the others; the socket stays
   * open in them. A unix socket path this server created is removed (as
   * {@link close} would). The libmilter engine's counterpart is
   * `milter.stopAccepting()`. Calling it again, or before {@link listen}
   * has resolved, does nothing.
   *
   * @example
   * ```ts
   * process.on('SIGTERM', () => {
   *   server.stopAccepting(); // the other workers take the new connections
   *   void server.close({ drain: 30_000 });
   * });
   * ```
   */
  stopAccepting(): void {
    if (!this.listening || this.acceptingStopped) return;
    this.acceptingStopped = true;
    this.server.close();
  }

  private acceptingStopped = false;

  /**
   * Stop: stop accepting, let open sessions finish for up to `drain` ms
   * (new sessions on still-open connections get 421 4.3.2), then end every
   * session (abort and close callbacks run) and remove a unix socket. As on
   * libmilter, a session whose MTA is waiting for a handler when the budget
   * is over is not cut off: the handler's answer (or its deadline's) is
   * written, then that session ends. The Promise settles when the listener
   * is closed and every other session has ended, without waiting for those;
   * calling again returns it.
   */
  close(options: CloseOptions = {}): Promise<void> {
    if (this.closing) return this.closing;
    const drain = options.drain ?? 0;
    checkDrain(drain);
    this.closing = (async () => {
      if (drain > 0 && this.listening) {
        // Keep accepting, so new sessions get 421 4.3.2 rather than a refused connection.
        this.draining = true;
        const until = Date.now() + drain;
        while ([...this.conns].some((c) => c.inMessage()) && Date.now() < until) await new Promise((r) => setTimeout(r, 25));
      }
      clearInterval(this.fdWatch);
      clearInterval(this.lagWatch);
      const closed = new Promise<void>((r) => this.server.close(() => r()));
      // As libmilter does when it stops: idle sessions end now; a session
      // whose MTA waits for a handler still gets that handler's answer (or
      // the deadline's), then ends. The stop does not wait for those. The
      // drain budget is spent here, so output the MTA has not taken is dropped.
      let lingering = false;
      for (const c of [...this.conns]) if (c.stop()) lingering = true;
      if (!lingering) await closed;
      this.listening = false;
      const spec = parseSocketSpec(this.options.socket);
      if (spec.kind === 'unix') removeUnixSocket(spec.path);
      this.emit('close');
    })();
    return this.closing;
  }

  /** @internal Queue `c` for the flush after this turn of the event loop. */
  scheduleFlush(c: Connection): void {
    if (this.dirty.push(c) === 1) setImmediate(this.flushAll);
  }

  private accept(sock: net.Socket): void {
    this.diag.connections++;
    const cfg = this.cfg;
    let refuse = false;
    if (this.conns.size - this.refusing >= cfg.maxSessions) {
      this.diag.sessionsRefused++;
      refuse = true;
    } else if (cfg.maxLagMs > 0 && this.lag > cfg.maxLagMs) {
      this.diag.sessionsShed++;
      refuse = true;
    }
    // Refusals answered in full are few at a time; past that, or when asked to, close at once.
    if (refuse && (cfg.capAction === 'close' || this.refusing >= Math.max(16, Math.min(cfg.maxSessions, 1024) >> 3))) {
      sock.destroy();
      return;
    }
    this.conns.add(new Connection(this, sock, this.dispatcher, refuse));
    if (refuse) this.refusing++;
  }

  /** @internal A connection's socket closed (after the connection ended): it no longer counts. */
  forget(c: Connection, refused: boolean): void {
    if (this.conns.delete(c) && refused) this.refusing--;
  }

}

/** The statuses a step negotiated as no-reply does not send (libmilter's sendreply). */
const ANSWERS_DROPPED_NR: readonly number[] = [C.CONTINUE, C.TEMPFAIL, C.REJECT, C.DISCARD, C.ACCEPT, C.SKIP];

/** Monotonic milliseconds: the clock of deadlines and timeouts (immune to wall-clock changes). */
const now = (): number => performance.now();

/** The soft limit on open files (RLIMIT_NOFILE) as Linux reports it; 0 where unknown. */
function softFdLimit(): number {
  try {
    const m = /^Max open files\s+(\d+)/m.exec(fs.readFileSync('/proc/self/limits', 'latin1'));
    return m ? Number(m[1]) : 0;
  } catch {
    return 0;
  }
}

/** The default maxSessions: 1000, or fewer when the file-descriptor limit would not leave FD_RESERVE free. */
function defaultMaxSessions(fdLimit: number): number {
  return fdLimit > 0 ? Math.max(1, Math.min(DEFAULT_MAX_SESSIONS, fdLimit - FD_RESERVE)) : DEFAULT_MAX_SESSIONS;
}

function checkPositive(what: string, v: number | undefined, dflt: number): number {
  if (v === undefined) return dflt;
  if (!Number.isInteger(v) || v <= 0) throw new InvalidArgumentError(`${what} must be a positive integer, got ${String(v)}`);
  return v;
}

/** @internal */
export interface EngineConfig {
  actions?: number;
  steps?: number;
  handled: number;
  noreply: number;
  dynamicNegotiate: boolean;
  symlists: string[];
  deadlines: number[];
  progressMs: number;
  timeoutMs: number;
  maxSessions: number;
  capAction: 'tempfail' | 'close';
  negotiationMs: number;
  frameMs: number;
  writeMs: number;
  maxOutput: number;
  maxLagMs: number;
  /** The steps (SMFIP_*) a negotiation without a negotiate callback asks for, before the MTA's offer is applied. */
  wantSteps: number;
  /** Whether any stage has a symbol list to request. */
  anySymlist: boolean;
}

/** The steps a static negotiation asks for: `steps` as given, else no-step bits for what has no callback and no-reply bits for @noreply. */
function staticSteps(steps: number | undefined, handled: number, noreply: number): number {
  if (steps !== undefined) return steps;
  let want = 0;
  for (let t = 0; t < Ev.COUNT; t++) {
    if (!(handled & (1 << t))) want |= NO_BIT[t];
    else if (noreply & (1 << t)) want |= NR_BIT[t];
  }
  if (handled & (1 << Ev.BODY)) want |= C.P_SKIP;
  return want;
}

/** The step the MTA waits for while JavaScript works on it. */
interface Waiting {
  seq: number;
  type: number;
  session: NodeSession;
  /** When the handler's deadline passes ({@link now}, ms). */
  deadlineAt: number;
  /** When the next PROGRESS is due (eom only, else Infinity). */
  progressAt: number;
  /** What to do with the answer. */
  done(status: number, actions?: number, steps?: number): void;
}

/**
 * One MTA connection: reads commands, keeps libmilter's state machine,
 * writes replies. A session (what callbacks see as ctx) lives from the
 * first command after negotiation until QUIT, QUIT_NC or the end of the
 * connection.
 */
class Connection {
  private readonly reader = new FrameReader();
  /** Reply frames built and not yet handed to the socket (see write). */
  private readonly writer = new FrameWriter();
  /** 0: nothing to flush; 1: flush when the current batch ends; 2: a flush is scheduled. */
  private flushState = 0;
  /** Work in progress (pump, settle) whose frames leave together at its end. */
  private batching = 0;
  private state: number = ST.INIT;
  private waiting: Waiting | undefined;
  private pumping = false;
  private ended = false;
  /** The server stopped while a handler ran: end once it is answered. */
  private stopping = false;
  /** The MTA shut down its side: answer what it sent, then end. */
  private peerEnded = false;
  /** Reading from the MTA is paused (see hold). */
  private paused = false;
  /** The socket holds more output than its high-water mark: no next command until it drains. */
  private blocked = false;
  /** No-reply events past QUEUE_HIGH_WATER wait behind a handler: no next command until they ran. */
  private queueFull = false;
  private idleTimer: NodeJS.Timeout | undefined;
  /** When the last command came ({@link now}): the idle timeout counts from it. */
  private lastCommandAt = 0;
  /**
   * The step clock: one timer for the waiting step's deadline and PROGRESS
   * ticks, armed for `clockAt` and left running between steps (see
   * {@link armClock}).
   */
  private clock: NodeJS.Timeout | undefined;
  private clockAt = Infinity;
  /** The time read once for the batch of work in progress (see {@link stamp}); -1 when not read yet. */
  private stampAt = -1;
  private negotiationTimer: NodeJS.Timeout | undefined;
  private frameTimer: NodeJS.Timeout | undefined;
  private stallTimer: NodeJS.Timeout | undefined;
  private seq = 0;
  private session: NodeSession | undefined;
  /** The session JavaScript has seen (close is delivered only to those). */
  private attached = false;
  /** Macros per slot (name, value, name, value ...). Slots are replaced, never changed in place. */
  macros: MacroTable = [];
  /** A copy of {@link macros} that events share until the macros change (see macroView). */
  private view: MacroTable | undefined;
  /** The reply text stored by setreply, used by the next matching REJECT/TEMPFAIL. */
  reply: Buffer | undefined;
  mtaVersion = 0;
  mtaActions = 0;
  mtaSteps = 0;
  actions = 0;
  steps = 0;
  negotiated = false;
  private skipMask = 0;
  private refusedForDrain = false;
  private symlists: (string | undefined)[] = [];

  constructor(
    readonly server: MilterServer,
    readonly sock: net.Socket,
    readonly dispatcher: Dispatcher,
    /** Over maxSessions (or shed): negotiate, answer connect with 421 4.3.2, close. */
    private readonly refusedBusy = false,
  ) {
    sock.setNoDelay(true);
    sock.on('data', (d: Buffer) => {
      if (this.ended) return; // lingering to deliver output: nothing more is read
      this.reader.push(d);
      if (this.waiting || this.blocked || this.queueFull) this.hold();
      else this.pump();
    });
    sock.on('end', () => {
      this.peerEnded = true;
      this.pump();
    });
    sock.on('drain', () => this.drained());
    sock.on('error', () => this.end('connection error', true));
    sock.on('close', () => {
      this.end('connection closed', true);
      server.forget(this, refusedBusy);
    });
    const cfg = server.cfg;
    if (cfg.timeoutMs > 0) {
      this.lastCommandAt = now();
      this.idleTimer = setTimeout(this.idleCheck, cfg.timeoutMs).unref();
    }
    if (cfg.negotiationMs > 0) {
      this.negotiationTimer = setTimeout(() => {
        this.server.diag.negotiationTimeouts++;
        this.end(`no option negotiation within ${cfg.negotiationMs} ms`, true);
      }, cfg.negotiationMs).unref();
    }
  }

  /**
   * The idle timeout. Only commands restart it (see command): macros alone
   * do not keep a session open. A command only records its time; the timer
   * is armed again, for what is left, when it fires (one timer per timeout
   * period instead of a re-arm per command).
   */
  private readonly idleCheck = (): void => {
    this.idleTimer = undefined;
    if (this.ended) return;
    const ms = this.server.cfg.timeoutMs;
    const left = this.lastCommandAt + ms - now();
    if (left <= 0 && !this.waiting && !this.blocked) {
      this.end('session timeout');
      return;
    }
    this.idleTimer = setTimeout(this.idleCheck, left > 0 ? Math.ceil(left) : ms).unref();
  };

  /**
   * See that the step clock fires by `at`. A clock armed for earlier stays:
   * it finds the step's later time when it fires and arms itself for that.
   * So a step costs no timer call in the common case (deadlines in seconds,
   * answers in microseconds), instead of a setTimeout and a clearTimeout.
   */
  private armClock(at: number): void {
    if (this.clock && this.clockAt <= at) return;
    clearTimeout(this.clock);
    this.clockAt = at;
    this.clock = setTimeout(this.clockFired, Math.max(1, Math.ceil(at - now())));
  }

  private readonly clockFired = (): void => {
    this.clock = undefined;
    this.clockAt = Infinity;
    const w = this.waiting;
    if (!w || this.ended) return;
    const t = now();
    if (t >= w.deadlineAt) {
      this.expire(w);
      return;
    }
    if (t >= w.progressAt) {
      this.write(Rep.PROGRESS);
      this.server.diag.progressSent++;
      w.progressAt = t + this.server.cfg.progressMs;
    }
    this.armClock(Math.min(w.deadlineAt, w.progressAt));
  };

  /** Whether the session is still working: in a message, waiting for a handler, or with output the MTA has not taken. */
  inMessage(): boolean {
    if (!this.sock.destroyed && (this.sock.writableLength > 0 || this.writer.pending > 0)) return true;
    return !this.ended && ((this.state >= ST.MAIL && this.state < ST.ENDM) || this.waiting !== undefined);
  }

  /* ---- flow control */

  /** Stop reading from the MTA until {@link release}: the socket's own buffer then fills and TCP pushes back. */
  private hold(): void {
    if (!this.paused && !this.ended) {
      this.paused = true;
      this.sock.pause();
    }
  }

  /** What held reading is over: read again and work through what is buffered. */
  private release(): void {
    if (this.paused && !this.waiting && !this.blocked && !this.queueFull) {
      this.paused = false;
      this.sock.resume();
    }
    this.pump();
  }

  /** The socket took its queued output. */
  private drained(): void {
    if (!this.blocked) return;
    this.blocked = false;
    if (this.ended) return; // lingering: the stall watch stays until the socket is gone
    clearInterval(this.stallTimer);
    this.stallTimer = undefined;
    this.release();
  }

  /** The session's no-reply events ran (Dispatcher's drained hook). */
  queueDrained(): void {
    if (!this.queueFull) return;
    this.queueFull = false;
    this.release();
  }

  /**
   * End the session when its output makes no progress (the MTA stopped
   * reading) for writeTimeout: checked four times per period.
   */
  private watchStall(): void {
    const ms = this.server.cfg.writeMs || this.server.cfg.timeoutMs;
    if (this.stallTimer || ms <= 0) return;
    // writableLength drops only when a whole write request completes, and
    // one corked writev is one request: libuv's own queue size (the
    // handle's writeQueueSize) drops with every partial write.
    const sock = this.sock;
    const inLibuv = () => (sock as unknown as { _handle?: { writeQueueSize?: number } })._handle?.writeQueueSize ?? 0;
    let left = sock.writableLength;
    let queued = inLibuv();
    let since = Date.now();
    this.stallTimer = setInterval(() => {
      const now = Date.now();
      const len = sock.writableLength;
      const q = inLibuv();
      if (len === 0 || len < left || q < queued) {
        left = len;
        queued = q;
        since = now;
      } else if (now - since >= ms) {
        this.server.diag.writeStalls++;
        this.end(`no output taken for ${ms} ms`, true);
      }
    }, Math.max(10, ms >> 2)).unref();
  }

  /** Throw when `n` more bytes would take this session's queued output past maxOutputBytes. */
  room(what: string, n: number): void {
    const queued = this.writer.pending + this.sock.writableLength;
    const max = this.server.cfg.maxOutput;
    if (queued + n > max) {
      this.server.diag.outputLimited++;
      throw new MilterError(
        `${what}: ${n} more bytes would take connection output to ${queued + n} bytes, past maxOutputBytes (${max}); the MTA has not taken ${queued} bytes yet`,
        'ERR_MILTER_OUTPUT_LIMIT',
      );
    }
  }

  /* ---- output */

  /**
   * A reply frame was built (into {@link writer}): see that it leaves.
   * Frames leave together, one write per batch: the actions and the reply
   * of an eom in one buffer, one wake-up of the MTA instead of one per
   * frame. With several MTA connections open, they leave in the check
   * phase of the same loop turn, after every connection's input of this
   * turn was worked through (S3 at 8 and 64 connections: 1.2-1.6x the
   * messages per second of writing each packet at once). With one
   * connection they leave at the end of the work that made them (the
   * commands read, the handler's answer), or in a microtask when a
   * handler acts on its own (docs/performance.md).
   */
  private queued(): void {
    if (this.flushState !== 0) return;
    if (this.server.connectionCount > 1) {
      this.flushState = 2;
      this.server.scheduleFlush(this);
    } else if (this.batching > 0) {
      this.flushState = 1;
    } else {
      this.flushState = 2;
      queueMicrotask(() => this.flushState === 2 && this.flush());
    }
  }

  private beginBatch(): void {
    this.batching++;
  }

  private endBatch(): void {
    if (--this.batching === 0) {
      this.stampAt = -1;
      if (this.flushState === 1) this.flush();
    }
  }

  /**
   * The time a command came, for the idle timeout: read once per batch (the
   * commands of one read, or one answer), since reading the clock costs as
   * much as a small no-reply step. The idle timeout may so count from the
   * start of the batch, earlier than the command: a session is never kept
   * longer for it. A step's deadline reads the clock itself (see await).
   */
  private stamp(): number {
    if (this.batching === 0) return now();
    return this.stampAt >= 0 ? this.stampAt : (this.stampAt = now());
  }

  /** Whether reply frames may still be written. */
  private get writable(): boolean {
    return !this.ended && !this.sock.destroyed;
  }

  /** A frame without data (CONTINUE, ACCEPT, PROGRESS ...). */
  write(cmd: number): void {
    if (!this.writable) return;
    this.writer.empty(cmd);
    this.queued();
  }

  /** A frame of NUL-terminated strings, after a 32-bit number when `n` is given. */
  writeStrings(cmd: number, n: number | undefined, a: string | Buffer, b?: string | Buffer): void {
    if (!this.writable) return;
    this.writer.strings(cmd, n, a, b);
    this.queued();
  }

  /** A frame of three 32-bit numbers (the OPTNEG reply without symbol lists). */
  writeWords(cmd: number, w0: number, w1: number, w2: number): void {
    if (!this.writable) return;
    this.writer.words(cmd, w0, w1, w2);
    this.queued();
  }

  /** A frame whose data is `data` (then a NUL when `nul`). */
  writeRaw(cmd: number, data: Buffer, nul = false): void {
    if (!this.writable) return;
    this.writer.raw(cmd, data, nul);
    this.queued();
  }

  /**
   * Hand the built frames to the socket: one buffer when they fit one
   * block, else corked (writev, no copy). When the socket is past its
   * high-water mark, no next command is read until it drains.
   */
  flush(): void {
    this.flushState = 0;
    if (this.writer.pending === 0) return;
    const out = this.writer.take();
    const sock = this.sock;
    if (sock.destroyed) return;
    let ok = true;
    if (out.length === 1) {
      ok = sock.write(out[0]);
    } else {
      sock.cork();
      for (const b of out) ok = sock.write(b);
      sock.uncork();
    }
    if (!ok && !this.blocked) {
      this.blocked = true;
      this.watchStall();
    }
    this.server.spin.kick();
  }

  /** libmilter's sendreply: the status of a step as the MTA sees it. */
  private sendreply(status: number): void {
    const bit = STATE_NR[this.state] ?? 0;
    if (bit && this.steps & bit && status !== C.NOREPLY) {
      if (ANSWERS_DROPPED_NR.includes(status)) status = C.NOREPLY;
    }
    switch (status) {
      case C.CONTINUE:
        this.write(Rep.CONTINUE);
        break;
      case C.TEMPFAIL:
      case C.REJECT: {
        const r = this.reply;
        if (r && r[0] === (status === C.TEMPFAIL ? 0x34 : 0x35)) {
          this.reply = undefined;
          this.writeRaw(Rep.REPLYCODE, r, true);
        } else {
          this.write(status === C.TEMPFAIL ? Rep.TEMPFAIL : Rep.REJECT);
        }
        break;
      }
      case C.DISCARD:
        this.write(Rep.DISCARD);
        break;
      case C.ACCEPT:
        this.write(Rep.ACCEPT);
        break;
      case C.SKIP:
        this.write(Rep.SKIP);
        break;
      case C.NOREPLY:
        // The milter may not answer, but an MTA that did not offer the bit waits: emulate it.
        if (bit && this.steps & bit && !(this.mtaSteps & bit)) this.write(Rep.CONTINUE);
        break;
      default:
        break;
    }
  }

  /* ---- input */

  /**
   * Work through the commands read, until one waits for a handler, the
   * socket holds too much output, or too many no-reply events wait: then
   * reading is held until that is over (backpressure to the MTA).
   */
  private pump(): void {
    if (this.pumping) return;
    this.pumping = true;
    this.beginBatch();
    try {
      while (!this.waiting && !this.ended && !this.blocked && !this.queueFull) {
        const r = this.reader.next();
        if (!r) {
          if (this.reader.buffered > 0 && !this.frameTimer) this.armFrameTimer();
          break;
        }
        if (this.frameTimer) {
          clearTimeout(this.frameTimer);
          this.frameTimer = undefined;
        }
        if ('tooBig' in r) {
          this.end(`command of ${r.tooBig} bytes is larger than ${this.reader.maxData}`);
          break;
        }
        this.command(r.cmd, r.data, r.owned);
      }
      if (this.peerEnded && !this.waiting && !this.queueFull && !this.blocked) this.end('the MTA closed the connection');
    } finally {
      this.pumping = false;
      this.endBatch();
    }
  }

  /** A frame has begun and not completed: it has frameTimeout to, however its bytes come. */
  private armFrameTimer(): void {
    const ms = this.server.cfg.frameMs;
    if (ms <= 0) return;
    this.frameTimer = setTimeout(() => {
      this.server.diag.frameTimeouts++;
      this.end(`a frame did not complete within ${ms} ms (${this.reader.buffered} bytes of it came)`, true);
    }, ms).unref();
  }

  private transOk(from: number, to: number): boolean {
    let s = from;
    for (;;) {
      if (s >= NEXT.length) return false;
      if (NEXT[s] & (1 << to)) return true;
      const n = s + 1;
      if (n >= NEXT.length || !(this.skipMask & (1 << n))) return false;
      s = n;
    }
  }

  private clearMacros(from: number): void {
    const m = this.macros;
    for (let i = from; i < 7; i++) {
      if (m[i] !== undefined) {
        m[i] = undefined;
        this.view = undefined;
      }
    }
  }

  private command(cmd: number, data: Buffer, owned: boolean): void {
    if (cmd === Cmd.MACRO) {
      this.storeMacros(data);
      return;
    }
    if (cmd !== Cmd.ABORT && this.idleTimer) this.lastCommandAt = this.stamp();
    const spec = COMMANDS[cmd];
    if (!spec) {
      this.end(`unknown command 0x${cmd.toString(16)}`);
      return;
    }
    // A one-string command (HELO, UNKNOWN) whose string is not NUL-terminated is dropped unanswered.
    if ((cmd === Cmd.HELO || cmd === Cmd.UNKNOWN) && data.indexOf(0) < 0) return;
    // An empty MAIL or RCPT: libmilter closes the connection, unanswered and without abort.
    if ((cmd === Cmd.MAIL || cmd === Cmd.RCPT) && data.length === 0) {
      this.end(`${cmd === Cmd.MAIL ? 'MAIL' : 'RCPT'} command without arguments`);
      return;
    }
    if (!this.transOk(this.state, spec.state)) {
      if (this.state >= ST.MAIL && this.state < ST.ENDM) this.abortEvent();
      this.state = ST.HELO;
      if (!this.transOk(this.state, spec.state)) return; // out of order: ignored
    }
    this.state = spec.state;
    if (spec.slot >= 0) this.clearMacros(spec.slot + 1);
    const step = (status: number) => this.stepDone(spec, status);
    switch (cmd) {
      case Cmd.OPTNEG:
        // A refused connection keeps the clock: it has negotiationTimeout to get its answer and go.
        if (!this.refusedBusy) clearTimeout(this.negotiationTimer);
        this.optneg(data);
        return;
      case Cmd.CONNECT:
        this.connect(data, step);
        return;
      case Cmd.HELO:
        this.event(Ev.HELO, step, rawText(splitStrings(data)[0] ?? Buffer.alloc(0)));
        return;
      case Cmd.MAIL:
      case Cmd.RCPT: {
        // Arguments without a NUL at all: libmilter closes the connection
        // unanswered (the message counts as begun: abort runs). A last
        // argument without its NUL is dropped, as libmilter does.
        const last = data.lastIndexOf(0);
        if (last < 0) {
          this.end(`${cmd === Cmd.MAIL ? 'MAIL' : 'RCPT'} command without a NUL-terminated argument`);
          return;
        }
        this.event(cmd === Cmd.MAIL ? Ev.ENVFROM : Ev.ENVRCPT, step, rawStringsIn(data, 0, last + 1));
        return;
      }
      case Cmd.DATA:
        this.event(Ev.DATA, step);
        return;
      case Cmd.HEADER: {
        const nul = data.indexOf(0);
        if (nul < 0) {
          this.end('header command without NUL');
          return;
        }
        const end = data.indexOf(0, nul + 1);
        if (end < 0) {
          this.end('header value without NUL');
          return;
        }
        this.event(Ev.HEADER, step, rawTextIn(data, 0, nul), rawTextIn(data, nul + 1, end));
        return;
      }
      case Cmd.EOH:
        this.event(Ev.EOH, step);
        return;
      case Cmd.BODY:
        // A view into a read chunk is copied: the handler may keep it.
        this.event(Ev.BODY, step, owned ? data : Buffer.from(data));
        return;
      case Cmd.BODYEOB:
        this.eom(data, owned, step);
        return;
      case Cmd.UNKNOWN:
        this.event(Ev.UNKNOWN, step, rawText(splitStrings(data)[0] ?? Buffer.alloc(0)));
        return;
      case Cmd.ABORT:
        this.abortEvent();
        return;
      case Cmd.QUIT:
        this.closeSession();
        this.end('quit');
        return;
      case Cmd.QUIT_NC:
        this.closeSession();
        this.macros = [];
        this.view = undefined;
        return;
    }
  }

  private stepDone(spec: CommandSpec, status: number): void {
    this.sendreply(status);
    if (status === C.ACCEPT) this.state = ST.HELO;
    else if ((status === C.REJECT || status === C.DISCARD || status === C.TEMPFAIL) && !spec.ignoreFailure) this.state = ST.HELO;
  }

  private storeMacros(data: Buffer): void {
    if (data.length < 1) {
      // No stage byte: libmilter closes the connection.
      this.end('macro command without a stage');
      return;
    }
    const slot = MACRO_SLOT[data[0]];
    if (slot === undefined) return; // an unknown stage is ignored
    // As header values: UTF-8 when valid, else latin1 (one character per byte), the same on both engines.
    // One decode for the whole frame when it is ASCII (the usual case).
    this.view = undefined;
    this.macros[slot] = isAscii(data) ? asciiStringsIn(data, 1, data.length) : splitStrings(data.subarray(1)).map((b) => decodeText(b, 'string') as string);
  }

  private sessionFor(): NodeSession {
    if (!this.session) {
      this.session = new NodeSession(nextSessionId++, this);
      this.attached = false;
      this.server.diag.created++;
    }
    return this.session;
  }

  /**
   * The macros as they are now, for an event to keep (getsymval after the
   * step was answered). One copy serves every event until the macros
   * change: the ten header events of a message share one.
   */
  private macroView(): MacroTable {
    return (this.view ??= this.macros.slice());
  }

  /** Hand an event to JavaScript; `done` gets the status for the MTA. */
  private event(type: number, done: (status: number) => void, a0?: unknown, a1?: unknown, a2?: unknown, a3?: unknown): void {
    const cfg = this.server.cfg;
    if (!(cfg.handled & (1 << type))) {
      done(C.CONTINUE);
      return;
    }
    const s = this.sessionFor();
    this.attached = true;
    const view = this.macroView();
    if (cfg.noreply & (1 << type)) {
      const nr = NR_BIT[type];
      done(nr && this.steps & nr ? C.NOREPLY : C.CONTINUE);
      this.dispatcher.deliver(s, type, 0, a0, a1, a2, a3, view);
      if (s.queuedBytes > QUEUE_HIGH_WATER) this.queueFull = true;
      return;
    }
    this.await(s, type, done, view, a0, a1, a2, a3);
  }

  private await(s: NodeSession, type: number, done: Waiting['done'], view: MacroTable, a0?: unknown, a1?: unknown, a2?: unknown, a3?: unknown): void {
    const cfg = this.server.cfg;
    this.seq = (this.seq + 1) >>> 0 || 1;
    const t = now();
    if (this.batching > 0) this.stampAt = t;
    const w: Waiting = {
      seq: this.seq,
      type,
      session: s,
      deadlineAt: t + cfg.deadlines[type],
      progressAt: type === Ev.EOM && cfg.progressMs > 0 ? t + cfg.progressMs : Infinity,
      done,
    };
    this.waiting = w;
    this.armClock(Math.min(w.deadlineAt, w.progressAt));
    this.dispatcher.deliver(s, type, w.seq, a0, a1, a2, a3, view);
  }

  private expire(w: Waiting): void {
    if (this.waiting !== w) return;
    this.server.diag.deadlineExpired++;
    this.storeReply('451', '4.3.0', ['Mail filter did not answer in time']);
    this.settle(w, C.TEMPFAIL);
  }

  /** JavaScript's answer for step `seq`; false when it came too late. */
  answer(seq: number, status: number, actions?: number, steps?: number): boolean {
    const w = this.waiting;
    if (!w || w.seq !== seq || this.ended) {
      this.server.diag.lateAnswers++;
      return false;
    }
    this.settle(w, status, actions, steps);
    return true;
  }

  private settle(w: Waiting, status: number, actions?: number, steps?: number): void {
    this.waiting = undefined;
    this.beginBatch();
    try {
      w.done(status, actions, steps);
      if (this.stopping) this.end('server stopped');
      else this.release();
    } finally {
      this.endBatch();
    }
  }

  /**
   * The server stops: end now, or, when the MTA waits for a handler, after
   * its answer is written. Returns true in the second case.
   */
  stop(): boolean {
    if (this.waiting && !this.ended) {
      this.stopping = true;
      return true;
    }
    this.end('server stopped', true);
    return false;
  }

  /** The step JavaScript may act on now (seq), or undefined. */
  parked(seq: number): Waiting | undefined {
    const w = this.waiting;
    return w && w.seq === seq && !this.ended ? w : undefined;
  }

  private optneg(data: Buffer): void {
    if (data.length < 12) {
      this.end('option negotiation shorter than 12 bytes');
      return;
    }
    const version = data.readUInt32BE(0);
    if (version < MIN_PROTOCOL_VERSION) {
      this.end(`MTA protocol version ${version} is older than ${MIN_PROTOCOL_VERSION}`);
      return;
    }
    this.mtaVersion = version;
    this.mtaActions = data.readUInt32BE(4) || C.SMFI_V1_ACTS;
    this.mtaSteps = data.readUInt32BE(8) || 0x3f;
    const f0 = this.mtaActions;
    const f1 = (this.mtaSteps | C.SMFIP_NR_ALL) >>> 0;
    const cfg = this.server.cfg;
    if (this.refusedBusy) {
      this.finishNegotiation(0, 0);
      return;
    }
    if (this.server.isDraining) {
      this.refusedForDrain = true;
      this.server.diag.drainRefused++;
      this.finishNegotiation(0, 0);
      return;
    }
    if (cfg.dynamicNegotiate) {
      const s = this.sessionFor();
      this.attached = true;
      this.await(s, Ev.NEGOTIATE, (status, actions = 0, steps = 0) => {
        if (status === C.CONTINUE) this.finishNegotiation(actions & f0, steps & f1);
        else if (status === C.ALL_OPTS) this.finishNegotiation(f0 & C.SMFIF_ALL, 0);
        else this.end('negotiate refused the connection');
      }, [], f0, f1);
      return;
    }
    let actions = cfg.actions === undefined ? f0 : cfg.actions & f0;
    if (cfg.anySymlist && f0 & C.SETSYMLIST) actions |= C.SETSYMLIST;
    if (actions & C.SETSYMLIST) cfg.symlists.forEach((l, i) => (this.symlists[i] = l || undefined));
    this.finishNegotiation(actions >>> 0, (cfg.wantSteps & f1) >>> 0);
  }

  private finishNegotiation(actions: number, steps: number): void {
    this.actions = actions;
    this.steps = steps;
    this.negotiated = true;
    this.skipMask = 0;
    for (const [state, bit] of SKIPPABLE) if (steps & bit) this.skipMask |= 1 << state;
    // NR_* bits the MTA did not offer are emulated here, not sent.
    const toMta = (steps & ~(C.SMFIP_NR_ALL & ~this.mtaSteps)) >>> 0;
    const version = Math.min(PROTOCOL_VERSION, this.mtaVersion);
    if (!this.symlists.some((l) => l)) {
      // The common reply, three numbers, built in place.
      this.writeWords(Rep.OPTNEG, version, actions, toMta);
      return;
    }
    const parts = [u32(version), u32(actions), u32(toMta)];
    this.symlists.forEach((l, i) => {
      if (l) parts.push(u32(i), cstr(l));
    });
    this.writeRaw(Rep.OPTNEG, Buffer.concat(parts));
  }

  /** setsymlist inside negotiate. */
  setSymlist(stage: number, list: string): boolean {
    if (this.symlists[stage] !== undefined) return false;
    this.symlists[stage] = list;
    return true;
  }

  private connect(data: Buffer, done: (status: number) => void): void {
    const nul = data.indexOf(0);
    if (nul < 0 || nul + 1 >= data.length) {
      this.end('malformed connect command');
      return;
    }
    const hostname = rawText(data.subarray(0, nul));
    const fam = data[nul + 1];
    let family = 0;
    let address: string | Buffer = '';
    let port = 0;
    if (fam !== 0x55 && fam !== 0x34 && fam !== 0x36 && fam !== 0x4c) {
      // Not SMFIA_UNKNOWN, INET, INET6 or UNIX: libmilter closes the connection unanswered.
      this.end(`connect command with unknown address family 0x${fam.toString(16)}`);
      return;
    }
    if (fam === 0x34 || fam === 0x36 || fam === 0x4c) {
      const rest = data.subarray(nul + 2);
      if (rest.length < 2) {
        this.end('malformed connect command');
        return;
      }
      port = rest.readUInt16BE(0);
      const end = rest.indexOf(0, 2);
      address = rawText(rest.subarray(2, end < 0 ? rest.length : end));
      family = fam === 0x34 ? 4 : fam === 0x36 ? 6 : 1;
      if (family === 1) port = 0;
    }
    if (this.refusedForDrain) {
      this.storeReply('421', '4.3.2', ['Mail filter is shutting down, try again later']);
      done(C.TEMPFAIL);
      return;
    }
    if (this.refusedBusy) {
      this.storeReply('421', '4.3.2', ['Mail filter busy, try again later']);
      done(C.TEMPFAIL);
      this.end('over maxSessions');
      return;
    }
    this.event(Ev.CONNECT, done, hostname, family, address, port);
  }

  private eom(data: Buffer, owned: boolean, done: (status: number) => void): void {
    const cfg = this.server.cfg;
    if (data.length > 0 && cfg.handled & (1 << Ev.BODY)) {
      // The last body chunk comes with end of message: body first, and eom only if it continues.
      this.event(Ev.BODY, (status) => {
        if (status !== C.CONTINUE) {
          this.sendreply(status);
          done(status);
          return;
        }
        this.event(Ev.EOM, done);
      }, owned ? data : Buffer.from(data));
      return;
    }
    this.event(Ev.EOM, done);
  }

  private abortEvent(): void {
    if (this.server.cfg.handled & (1 << Ev.ABORT) && this.session) {
      this.attached = true;
      this.dispatcher.deliver(this.session, Ev.ABORT, 0, undefined, undefined, undefined, undefined, this.macroView());
    }
  }

  private closeSession(): void {
    const s = this.session;
    if (!s) return;
    this.session = undefined;
    this.server.diag.deleted++;
    if (this.attached) this.dispatcher.deliver(s, Ev.CLOSE, 0);
    else s.closed = true;
    this.attached = false;
  }

  /** Store a reply as smfi_setreply/smfi_setmlreply format it. */
  storeReply(rcode: string, xcode: string | null, lines: string[]): void {
    const x = xcode ?? `${rcode[0]}.0.0`;
    let text: string;
    if (lines.length <= 1) text = `${rcode} ${x} ${lines[0] ?? ''}`;
    else text = lines.map((l, i) => `${rcode}${i === lines.length - 1 ? ' ' : '-'}${x} ${l}`).join('\r\n');
    this.reply = Buffer.from(text, 'utf8');
  }

  /**
   * End the connection: abort an open message, close the session, close
   * the socket. Output the MTA has not taken yet is still delivered (end,
   * then destroy once written; the stall watch ends a reader that stopped),
   * unless `hard`: the connection failed, stalled or broke a bound.
   */
  end(_why: string, hard = false): void {
    const sock = this.sock;
    if (this.ended) {
      if (hard) sock.destroy();
      return;
    }
    this.waiting = undefined;
    clearTimeout(this.clock);
    this.clock = undefined;
    if (this.state >= ST.MAIL && this.state < ST.ENDM) this.abortEvent();
    this.closeSession();
    this.flush();
    this.ended = true;
    clearTimeout(this.idleTimer);
    clearTimeout(this.negotiationTimer);
    clearTimeout(this.frameTimer);
    if (hard || sock.destroyed || sock.writableLength === 0) {
      clearInterval(this.stallTimer);
      sock.destroy();
      return;
    }
    sock.once('finish', () => sock.destroy());
    sock.end();
    this.watchStall();
  }
}

/** A session on the TypeScript engine: actions become reply packets on the connection. */
class NodeSession extends SessionCore {
  constructor(id: number, private readonly conn: Connection) {
    super(id);
  }

  /** The no-reply events queued behind a handler ran. */
  queueDrained(): void {
    this.conn.queueDrained();
  }

  get actions(): number {
    return this.conn.negotiated ? this.conn.actions : 0;
  }

  get steps(): number {
    return this.conn.negotiated ? this.conn.steps : 0;
  }

  getsymval(name: string): string | undefined {
    this.checkMacroName(name);
    const table = (this.eventData as MacroTable | undefined) ?? this.conn.macros;
    const one = name.length === 3 && name[0] === '{' && name[2] === '}' ? name[1] : undefined;
    const braced = name.length === 1 ? `{${name}}` : undefined;
    for (let i = 6; i >= 0; i--) {
      const list = table[i];
      if (!list) continue;
      for (let j = 0; j + 1 < list.length; j += 2) {
        const n = list[j];
        if (n === name || n === one || n === braced) return list[j + 1];
      }
    }
    return undefined;
  }

  answer(seq: number, status: number, actions?: number, steps?: number): void {
    this.conn.answer(seq, status, actions, steps);
  }

  fallbackReply(seq: number, rcode: string, xcode: string, text: string): void {
    if (this.conn.parked(seq)) this.conn.storeReply(rcode, xcode, [text]);
  }

  /** The step this callback belongs to, or a typed error. */
  private parked(what: string, need?: number): void {
    if (this.closed) throw new ContextClosedError(`${what}: connection ${this.id} is closed`);
    const w = this.seq ? this.conn.parked(this.seq) : undefined;
    if (!w || w.session !== this) throw new ActionNotAllowedError(`${what}: ${NOT_PARKED_MESSAGE}`);
    if (need === Ev.EOM && w.type !== Ev.EOM) throw new ActionNotAllowedError(`${what} is only allowed in eom, not in ${EVENT_NAMES[w.type]}`);
    if (need === Ev.NEGOTIATE && w.type !== Ev.NEGOTIATE) throw new ActionNotAllowedError(`${what} is only allowed in negotiate`);
  }

  protected doSetreply(r: Reply): void {
    this.parked('setreply');
    this.conn.storeReply(r.rcode, r.xcode, r.lines);
  }

  protected doSetsymlist(stage: C.MacroStage, list: string[]): void {
    this.parked('setsymlist', Ev.NEGOTIATE);
    if (!this.conn.setSymlist(stage, list.join(' '))) throw new MilterError(`setsymlist: the list for stage ${stage} was already set`, 'ERR_MILTER_ACTION_FAILED');
  }

  protected doAddheader(name: string, value: Bytes, index: number): void {
    const what = index >= 0 ? 'insheader' : 'addheader';
    this.parked(what, Ev.EOM);
    this.conn.room(what, 16 + name.length * 3 + value.length * 3);
    if (index >= 0) this.conn.writeStrings(Rep.INSHEADER, index, name, value);
    else this.conn.writeStrings(Rep.ADDHEADER, undefined, name, value);
  }

  protected doChgheader(name: string, index: number, value: Bytes | null): void {
    this.parked('chgheader', Ev.EOM);
    this.conn.room('chgheader', 16 + name.length * 3 + (value?.length ?? 0) * 3);
    this.conn.writeStrings(Rep.CHGHEADER, index, name, value ?? '');
  }

  protected doAddrcpt(rcpt: Bytes, params: Bytes | null): void {
    this.parked('addrcpt', Ev.EOM);
    this.conn.room('addrcpt', 16 + rcpt.length * 3 + (params?.length ?? 0) * 3);
    if (params === null) this.conn.writeStrings(Rep.ADDRCPT, undefined, rcpt);
    else this.conn.writeStrings(Rep.ADDRCPT_PAR, undefined, rcpt, params);
  }

  protected doDelrcpt(rcpt: Bytes): void {
    this.parked('delrcpt', Ev.EOM);
    this.conn.room('delrcpt', 16 + rcpt.length * 3);
    this.conn.writeStrings(Rep.DELRCPT, undefined, rcpt);
  }

  protected doReplacebody(chunk: Buffer): void {
    this.parked('replacebody', Ev.EOM);
    this.conn.room('replacebody', chunk.length + 5 * Math.ceil(chunk.length / C.MAX_DATA_SIZE));
    // Large chunks go out by reference (FrameWriter): the Buffer is read until the MTA took it.
    for (let off = 0; off < chunk.length; off += C.MAX_DATA_SIZE) {
      this.conn.writeRaw(Rep.REPLBODY, chunk.subarray(off, Math.min(chunk.length, off + C.MAX_DATA_SIZE)));
    }
  }

  protected doChgfrom(sender: Bytes, params: Bytes | null): void {
    this.parked('chgfrom', Ev.EOM);
    this.conn.room('chgfrom', 16 + sender.length * 3 + (params?.length ?? 0) * 3);
    if (params === null) this.conn.writeStrings(Rep.CHGFROM, undefined, sender);
    else this.conn.writeStrings(Rep.CHGFROM, undefined, sender, params);
  }

  protected doQuarantine(reason: string): void {
    this.parked('quarantine', Ev.EOM);
    this.conn.room('quarantine', 16 + reason.length * 3);
    this.conn.writeStrings(Rep.QUARANTINE, undefined, reason);
  }

  protected doProgress(): void {
    this.parked('progress', Ev.EOM);
    this.conn.write(Rep.PROGRESS);
    this.conn.server.diag.progressSent++;
  }
}

/**
 * Serve `description` on the TypeScript engine: listen on `options.socket`
 * and resolve with the running {@link MilterServer} once it accepts
 * connections. Stop it with `server.close({ drain })`.
 *
 * @example
 * ```ts
 * import { describe } from 'nodemilter';
 * import { serve } from 'nodemilter/engine';
 * const server = await serve(describe(MyMilter, { name: 'mine' }), { socket: 'inet:8894@127.0.0.1' });
 * process.on('SIGTERM', () => server.close({ drain: 30_000 }));
 * ```
 */
export async function serve(description: MilterDescription, options: ServeOptions): Promise<MilterServer> {
  const server = new MilterServer(description, options);
  await server.listen();
  return server;
}
