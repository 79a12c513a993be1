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
import { EventEmitter } from 'node:events';
import * as net from 'node:net';

import * as C from '../constants';
import { InvalidArgumentError, MilterError, MilterStateError, ActionNotAllowedError, ContextClosedError } from '../errors';
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
  checkTimeout,
  deadlineArray,
  eventMasks,
  progressMs,
  reportHandlerError,
  symlistStrings,
  type Deadlines,
  type HandlerErrorInfo,
  type MessageLimits,
} from './dispatch';
import { Cmd, FrameReader, MIN_PROTOCOL_VERSION, PROTOCOL_VERSION, Rep, cstr, frame, rawText, splitStrings, u32 } from './protocol';

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

/** Options of {@link serve}. */
export interface ServeOptions {
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
}

/** Options of {@link MilterServer.close}. */
export interface CloseOptions {
  /** Milliseconds to let open sessions finish (new ones get 421 4.3.2) before closing them. Default 0. */
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
  /** @internal */ readonly diag = { connections: 0, created: 0, deleted: 0, deadlineExpired: 0, progressSent: 0, lateAnswers: 0, drainRefused: 0 };
  /** Connections with replies queued for the next flush (see Connection.write). */
  private dirty: Connection[] = [];
  private readonly flushAll = (): void => {
    const list = this.dirty;
    this.dirty = [];
    for (const c of list) c.flush();
  };

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
    this.name = description.name;
    this.logger = options.logger ?? console;
    this.exceptionStatus = policy;
    this.cfg = {
      actions: description.actions,
      steps: description.steps,
      ...eventMasks(cb, description.noreply),
      dynamicNegotiate: typeof cb.negotiate === 'function',
      symlists: symlistStrings(description.symlists),
      deadlines: deadlineArray(options.deadline),
      progressMs: progress,
      timeoutMs: timeout * 1000,
    };
    this.dispatcher = new Dispatcher(
      cb,
      { ...description.decode },
      {
        exceptionStatus: () => this.exceptionStatus,
        report: (err, s, type, answered) => reportHandlerError(this, this.logger, err, s, type, answered),
        limitExceeded: (s, what, limit) => this.emit('limitExceeded', { connection: s.id, limit: what, value: limit }),
      },
      options.limits,
    );
    this.server = net.createServer({ allowHalfOpen: false, noDelay: true } as net.ServerOpts, (sock) => this.accept(sock));
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
        this.server.on('error', (err) => this.logger.error(`${this.name}: server error: ${err.message}`, err));
        this.listening = true;
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

  /** The server's counters. */
  getdiag(): EngineDiag {
    return { ...this.diag, active: this.diag.created - this.diag.deleted, running: this.listening };
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
      const closed = new Promise<void>((r) => this.server.close(() => r()));
      // As libmilter does when it stops: idle sessions end now; a session
      // whose MTA waits for a handler still gets that handler's answer (or
      // the deadline's), then ends. The stop does not wait for those.
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
    const c = new Connection(this, sock, this.dispatcher);
    this.conns.add(c);
    sock.once('close', () => this.conns.delete(c));
  }

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
}

/** The step the MTA waits for while JavaScript works on it. */
interface Waiting {
  seq: number;
  type: number;
  session: NodeSession;
  deadline?: NodeJS.Timeout;
  progress?: NodeJS.Timeout;
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
  /** Reply packets not yet written (see write). */
  private out: Buffer[] = [];
  private state: number = ST.INIT;
  private waiting: Waiting | undefined;
  private pumping = false;
  private ended = false;
  /** The server stopped while a handler ran: end once it is answered. */
  private stopping = false;
  private seq = 0;
  private session: NodeSession | undefined;
  /** The session JavaScript has seen (close is delivered only to those). */
  private attached = false;
  /** Macros per slot (name, value, name, value ...). */
  macros: MacroTable = [];
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
  ) {
    sock.setNoDelay(true);
    sock.on('data', (d: Buffer) => {
      this.reader.push(d);
      this.pump();
    });
    sock.on('end', () => this.end('the MTA closed the connection'));
    sock.on('error', () => this.end('connection error'));
    sock.on('close', () => this.end('connection closed'));
    if (server.cfg.timeoutMs > 0) {
      sock.setTimeout(server.cfg.timeoutMs, () => {
        if (!this.waiting) this.end('session timeout');
      });
    }
  }

  inMessage(): boolean {
    return !this.ended && ((this.state >= ST.MAIL && this.state < ST.ENDM) || this.waiting !== undefined);
  }

  /* ---- output */

  /**
   * Send one reply packet. With several MTA connections open, packets
   * are queued and leave in the check phase of the same loop turn, after
   * every connection's input of this turn was worked through: the EOM
   * actions and the final reply in one write, one wake-up of the MTA
   * instead of one per packet (S3 at 8 and 64 connections: 1.2-1.6x the
   * messages per second of writing each packet at once). With one
   * connection open each packet is written at once: there is nothing to
   * batch with, and the MTA can read the first packets while the later
   * ones are made (docs/performance.md).
   */
  write(cmd: number, ...parts: Buffer[]): void {
    if (this.ended || this.sock.destroyed) return;
    if (this.out.length === 0 && this.server.connectionCount <= 1) {
      this.sock.write(frame(cmd, ...parts));
      return;
    }
    if (this.out.push(frame(cmd, ...parts)) === 1) this.server.scheduleFlush(this);
  }

  /** Write the queued packets: one buffer when small, else corked (writev, no copy). */
  flush(): void {
    const out = this.out;
    if (out.length === 0) return;
    this.out = [];
    if (this.sock.destroyed) return;
    if (out.length === 1) {
      this.sock.write(out[0]);
      return;
    }
    let size = 0;
    for (const b of out) size += b.length;
    if (size <= 65536) {
      this.sock.write(Buffer.concat(out, size));
      return;
    }
    this.sock.cork();
    for (const b of out) this.sock.write(b);
    this.sock.uncork();
  }

  /** libmilter's sendreply: the status of a step as the MTA sees it. */
  private sendreply(status: number): void {
    const bit = STATE_NR[this.state] ?? 0;
    if (bit && this.steps & bit && status !== C.NOREPLY) {
      if ([C.CONTINUE, C.TEMPFAIL, C.REJECT, C.DISCARD, C.ACCEPT, C.SKIP].includes(status)) status = C.NOREPLY;
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
          this.write(Rep.REPLYCODE, r, Buffer.from([0]));
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

  private pump(): void {
    if (this.pumping) return;
    this.pumping = true;
    try {
      while (!this.waiting && !this.ended) {
        const r = this.reader.next();
        if (!r) break;
        if ('tooBig' in r) {
          this.end(`command of ${r.tooBig} bytes is larger than ${this.reader.maxData}`);
          break;
        }
        this.command(r.cmd, r.data);
      }
    } finally {
      this.pumping = false;
    }
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
    for (let i = from; i < 7; i++) this.macros[i] = undefined;
  }

  private command(cmd: number, data: Buffer): void {
    if (cmd === Cmd.MACRO) {
      this.storeMacros(data);
      return;
    }
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
        this.event(cmd === Cmd.MAIL ? Ev.ENVFROM : Ev.ENVRCPT, step, splitStrings(data.subarray(0, last + 1)).map(rawText));
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
        this.event(Ev.HEADER, step, rawText(data.subarray(0, nul)), rawText(data.subarray(nul + 1, end)));
        return;
      }
      case Cmd.EOH:
        this.event(Ev.EOH, step);
        return;
      case Cmd.BODY:
        this.event(Ev.BODY, step, Buffer.from(data));
        return;
      case Cmd.BODYEOB:
        this.eom(data, step);
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
    this.macros[slot] = splitStrings(data.subarray(1)).map((b) => decodeText(b, 'string') as string);
  }

  private sessionFor(): NodeSession {
    if (!this.session) {
      this.session = new NodeSession(nextSessionId++, this);
      this.attached = false;
      this.server.diag.created++;
    }
    return this.session;
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
    const view = this.macros.slice();
    if (cfg.noreply & (1 << type)) {
      const nr = NR_BIT[type];
      done(nr && this.steps & nr ? C.NOREPLY : C.CONTINUE);
      this.dispatcher.deliver(s, type, 0, a0, a1, a2, a3, view);
      return;
    }
    this.await(s, type, done, view, a0, a1, a2, a3);
  }

  private await(s: NodeSession, type: number, done: Waiting['done'], view: MacroTable, a0?: unknown, a1?: unknown, a2?: unknown, a3?: unknown): void {
    const cfg = this.server.cfg;
    this.seq = (this.seq + 1) >>> 0 || 1;
    const w: Waiting = { seq: this.seq, type, session: s, done };
    this.waiting = w;
    w.deadline = setTimeout(() => this.expire(w), cfg.deadlines[type]);
    if (type === Ev.EOM && cfg.progressMs > 0) {
      const tick = () => {
        this.write(Rep.PROGRESS);
        this.server.diag.progressSent++;
        w.progress = setTimeout(tick, cfg.progressMs);
      };
      w.progress = setTimeout(tick, cfg.progressMs);
    }
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
    clearTimeout(w.deadline);
    clearTimeout(w.progress);
    this.waiting = undefined;
    w.done(status, actions, steps);
    if (this.stopping) {
      this.end('server stopped');
      return;
    }
    this.pump();
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
    this.end('server stopped');
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
    if (cfg.symlists.some((l) => l) && f0 & C.SETSYMLIST) actions |= C.SETSYMLIST;
    let want: number;
    if (cfg.steps !== undefined) {
      want = cfg.steps;
    } else {
      want = 0;
      for (let t = 0; t < Ev.COUNT; t++) {
        if (!(cfg.handled & (1 << t))) want |= NO_BIT[t];
        else if (cfg.noreply & (1 << t)) want |= NR_BIT[t];
      }
      if (cfg.handled & (1 << Ev.BODY)) want |= C.P_SKIP;
    }
    if (actions & C.SETSYMLIST) cfg.symlists.forEach((l, i) => (this.symlists[i] = l || undefined));
    this.finishNegotiation(actions >>> 0, (want & f1) >>> 0);
  }

  private finishNegotiation(actions: number, steps: number): void {
    this.actions = actions;
    this.steps = steps;
    this.negotiated = true;
    this.skipMask = 0;
    for (const [state, bit] of SKIPPABLE) if (steps & bit) this.skipMask |= 1 << state;
    // NR_* bits the MTA did not offer are emulated here, not sent.
    const toMta = (steps & ~(C.SMFIP_NR_ALL & ~this.mtaSteps)) >>> 0;
    const parts = [u32(Math.min(PROTOCOL_VERSION, this.mtaVersion)), u32(actions), u32(toMta)];
    this.symlists.forEach((l, i) => {
      if (l) parts.push(u32(i), cstr(l));
    });
    this.write(Rep.OPTNEG, ...parts);
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
    this.event(Ev.CONNECT, done, hostname, family, address, port);
  }

  private eom(data: Buffer, done: (status: number) => void): void {
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
      }, Buffer.from(data));
      return;
    }
    this.event(Ev.EOM, done);
  }

  private abortEvent(): void {
    if (this.server.cfg.handled & (1 << Ev.ABORT) && this.session) {
      this.attached = true;
      this.dispatcher.deliver(this.session, Ev.ABORT, 0, undefined, undefined, undefined, undefined, this.macros.slice());
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

  /** End the connection: abort an open message, close the session, close the socket. */
  end(_why: string): void {
    if (this.ended) return;
    if (this.waiting) {
      clearTimeout(this.waiting.deadline);
      clearTimeout(this.waiting.progress);
      this.waiting = undefined;
    }
    if (this.state >= ST.MAIL && this.state < ST.ENDM) this.abortEvent();
    this.closeSession();
    this.flush();
    this.ended = true;
    this.sock.destroy();
  }
}

/** A session on the TypeScript engine: actions become reply packets on the connection. */
class NodeSession extends SessionCore {
  constructor(id: number, private readonly conn: Connection) {
    super(id);
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
    this.parked(index >= 0 ? 'insheader' : 'addheader', Ev.EOM);
    if (index >= 0) this.conn.write(Rep.INSHEADER, u32(index), cstr(name), cstr(value));
    else this.conn.write(Rep.ADDHEADER, cstr(name), cstr(value));
  }

  protected doChgheader(name: string, index: number, value: Bytes | null): void {
    this.parked('chgheader', Ev.EOM);
    this.conn.write(Rep.CHGHEADER, u32(index), cstr(name), cstr(value ?? ''));
  }

  protected doAddrcpt(rcpt: Bytes, params: Bytes | null): void {
    this.parked('addrcpt', Ev.EOM);
    if (params === null) this.conn.write(Rep.ADDRCPT, cstr(rcpt));
    else this.conn.write(Rep.ADDRCPT_PAR, cstr(rcpt), cstr(params));
  }

  protected doDelrcpt(rcpt: Bytes): void {
    this.parked('delrcpt', Ev.EOM);
    this.conn.write(Rep.DELRCPT, cstr(rcpt));
  }

  protected doReplacebody(chunk: Buffer): void {
    this.parked('replacebody', Ev.EOM);
    for (let off = 0; off < chunk.length; off += C.MAX_DATA_SIZE) {
      this.conn.write(Rep.REPLBODY, chunk.subarray(off, Math.min(chunk.length, off + C.MAX_DATA_SIZE)));
    }
  }

  protected doChgfrom(sender: Bytes, params: Bytes | null): void {
    this.parked('chgfrom', Ev.EOM);
    if (params === null) this.conn.write(Rep.CHGFROM, cstr(sender));
    else this.conn.write(Rep.CHGFROM, cstr(sender), cstr(params));
  }

  protected doQuarantine(reason: string): void {
    this.parked('quarantine', Ev.EOM);
    this.conn.write(Rep.QUARANTINE, cstr(reason));
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
