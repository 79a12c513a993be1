/**
 * Engine-neutral types: what a milter session looks like to code above the
 * engine (Base, decorators, TestCtx, examples). Nothing here knows libmilter;
 * the libmilter engine (`nodemilter/milter`), a protocol engine in TypeScript
 * and the test harness all implement these shapes.
 *
 * @module
 */
import type { MacroStage, Status } from './constants';

/** The address family of the SMTP client, as the MTA reported it. */
export type Family = 'inet' | 'inet6' | 'unix' | 'unknown';

/** An IPv4 or IPv6 client address. */
export interface InetAddress {
  /** Printable address, e.g. `192.0.2.1` or `2001:db8::1`. */
  address: string;
  /** The client's TCP port (0 if the MTA did not say). */
  port: number;
}

/** A unix-domain client address. */
export interface UnixAddress {
  /** The socket path. */
  path: string;
}

/** The client address given to connect(): `null` when the family is `unknown`. */
export type HostAddr = InetAddress | UnixAddress | null;

/** A value handed to an action: a string is sent as UTF-8, a Buffer byte for byte. */
export type Bytes = string | Buffer;

/** What a handler may return: a status, or a promise of one. */
export type StatusLike = Status | number | Promise<Status | number>;

/**
 * The per-connection handle every callback receives: macros, reply text and
 * the end-of-message modifications. Modifications are allowed only inside
 * eom and only when their action flag was negotiated; otherwise the call
 * throws ({@link ActionNotAllowedError}, {@link DisabledActionError}).
 */
export interface MilterContext {
  /** A number that identifies this connection within the process. */
  readonly id: number;
  /** The action flags (SMFIF_*) in force for this connection (0 before negotiation). */
  readonly actions: number;
  /** The protocol steps (SMFIP_*) in force for this connection (0 before negotiation). */
  readonly steps: number;
  /** Whether the connection has closed; every action then throws ContextClosedError. */
  readonly closed: boolean;

  /** The value of a macro (`i`, `{auth_authen}`, `j`...), or `undefined` if the MTA did not send it. */
  getsymval(name: string): string | undefined;
  /**
   * Set the SMTP reply used with the next REJECT (rcode 5xx) or TEMPFAIL
   * (rcode 4xx). Several `lines` give a multi-line reply (at most 32).
   */
  setreply(rcode: string, xcode?: string | null, ...lines: string[]): void;
  /** Ask for exactly these macros at a stage. Only inside negotiate. */
  setsymlist(stage: MacroStage, macros: string | readonly string[]): void;
  /**
   * Add a header at the end, or insert it at `index` (0 = first) when
   * index >= 0. Needs ADDHDRS. Fold a value with LF (`"one\n\ttwo"`): a
   * CRLF is sent as LF, a bare CR or a line break without a space or tab
   * after it throws (see {@link nodemilter!validateHeaderValue}); both engines and the
   * `nodemilter/milter` module apply that rule.
   */
  addheader(name: string, value: Bytes, index?: number): void;
  /** Change the `index`-th (from 1) header called `name`; a null or empty value deletes it. Needs CHGHDRS. The value folds as in {@link MilterContext.addheader}. */
  chgheader(name: string, index: number, value: Bytes | null): void;
  /** Add a recipient, with ESMTP parameters if given (then ADDRCPT_PAR, else ADDRCPT). */
  addrcpt(rcpt: Bytes, params?: Bytes | null): void;
  /** Delete a recipient (exactly as the MTA gave it). Needs DELRCPT. */
  delrcpt(rcpt: Bytes): void;
  /** Replace the body; call repeatedly to append; any size. Needs CHGBODY. */
  replacebody(chunk: Bytes): void;
  /** Change the envelope sender, with ESMTP parameters if given. Needs CHGFROM. */
  chgfrom(sender: Bytes, params?: Bytes | null): void;
  /** Put the message in the MTA's quarantine (hold queue) with a reason. Needs QUARANTINE. */
  quarantine(reason: string): void;
  /** Tell the MTA we are still working (resets its timeout). Only inside eom. */
  progress(): void;
  /** Private data attached to this connection. */
  getpriv<T = unknown>(): T | undefined;
  /** Attach private data to this connection. */
  setpriv(value: unknown): void;
}

/** The options the MTA offered, given to a negotiate callback. */
export interface NegotiateOffer {
  /** Action flags (SMFIF_*) the MTA offers. */
  actions: number;
  /** Protocol steps (SMFIP_*) the MTA offers (plus the NR_* bits the engine can emulate). */
  steps: number;
}

/** What a negotiate callback answers: the status and the options it asks for. */
export interface NegotiateResult {
  /** CONTINUE (use exactly `actions`/`steps`), ALL_OPTS (defaults), REJECT (refuse the connection). */
  status: Status | number;
  actions?: number;
  steps?: number;
}

/** The callbacks a milter may give. Each gets the context first, then pymilter's arguments. */
export interface Callbacks {
  /** Option negotiation, once per connection before connect: answer with the actions and steps to use. */
  negotiate?(ctx: MilterContext, offer: NegotiateOffer): NegotiateResult | Status | number | Promise<NegotiateResult | Status | number>;
  /** A client connected: its host name (or `[address]`), address family and address. */
  connect?(ctx: MilterContext, hostname: string, family: Family, hostaddr: HostAddr): StatusLike;
  /** The client said HELO or EHLO. */
  helo?(ctx: MilterContext, heloname: string): StatusLike;
  /** `args[0]` is the sender as the MTA gave it (with angle brackets), the rest ESMTP parameters. */
  envfrom?(ctx: MilterContext, ...args: any[]): StatusLike;
  /** `args[0]` is the recipient (with angle brackets), the rest ESMTP parameters. */
  envrcpt?(ctx: MilterContext, ...args: any[]): StatusLike;
  /** The client said DATA. */
  data?(ctx: MilterContext): StatusLike;
  /** One header field: its name and value (a string, or a Buffer with `decode: 'bytes'`). */
  header?(ctx: MilterContext, name: string, value: any): StatusLike;
  /** End of headers. */
  eoh?(ctx: MilterContext): StatusLike;
  /** A piece of the body (CRLF line ends, up to 64 KiB). */
  body?(ctx: MilterContext, chunk: Buffer): StatusLike;
  /** End of message: the only place for modifications. */
  eom?(ctx: MilterContext): StatusLike;
  /** The current message was aborted; the connection may go on. The result is ignored. */
  abort?(ctx: MilterContext): void | Promise<void> | StatusLike;
  /** The connection closed. The result is ignored. */
  close?(ctx: MilterContext): void | Promise<void> | StatusLike;
  /** An SMTP command the MTA does not know. */
  unknown?(ctx: MilterContext, cmd: any): StatusLike;
}

/** The name of a callback. */
export type CallbackName = keyof Callbacks;

/** How header values, envelope arguments and unknown commands reach a callback. */
export type Decoding = 'string' | 'bytes';

/** Callbacks whose string arguments may be delivered as Buffers instead. */
export type DecodableCallback = 'helo' | 'envfrom' | 'envrcpt' | 'header' | 'unknown' | 'connect';

/**
 * Everything an engine needs to serve a milter, decided once per milter
 * (not per connection). Base derives it from a class; the low-level
 * `milter.register` builds it from plain callbacks.
 */
export interface MilterDescription {
  /** The milter's name (for logs and the MTA's configuration). */
  name: string;
  /** The callbacks; a missing one is negotiated away (SMFIP_NO*) when `steps` is not given. */
  callbacks: Callbacks;
  /**
   * Action flags (SMFIF_*) the milter asks for. `undefined` takes whatever
   * the MTA offers. Flags the MTA does not offer are dropped, and the actions
   * that need them then throw DisabledActionError.
   */
  actions?: number;
  /**
   * Protocol steps (SMFIP_*) to request when negotiate is not a callback:
   * NO* for unused events, NR_* for no-reply events, SKIP, RCPT_REJ,
   * HDR_LEADSPC. `undefined`: NO* for every missing callback and NR_* for
   * every `noreply` callback. Bits the MTA does not offer are dropped.
   */
  steps?: number;
  /** Callbacks whose result the MTA does not wait for (CONTINUE is answered at once, or nothing on NR_*). */
  noreply?: readonly CallbackName[];
  /** Macros to ask for per stage (SMFIM_* → names), sent with the negotiation reply. */
  symlists?: Partial<Record<MacroStage, readonly string[]>>;
  /** Per callback, whether values arrive as strings (default) or raw Buffers. */
  decode?: Partial<Record<DecodableCallback, Decoding>>;
}

/**
 * Where nodemilter reports what it does and what went wrong. Any object with
 * these three methods fits: `console` (the default) or a pino logger.
 * Messages come fully formatted; an Error, when there is one, follows as the
 * second argument.
 *
 * @example
 * ```ts
 * import pino from 'pino';
 * class MyMilter extends Base {
 *   static override logger: Logger = pino({ name: 'mymilter' });
 * }
 * ```
 */
export interface Logger {
  /** What the milter does: listening, stopping, draining. */
  info(message: string, ...args: unknown[]): void;
  /** Something odd that did not stop anything. */
  warn(message: string, ...args: unknown[]): void;
  /** A failure: a handler threw, a stop failed. */
  error(message: string, ...args: unknown[]): void;
}

/** Counters every engine keeps (libmilter's `milter.getdiag()`, the TypeScript engine's `server.getdiag()`). */
export interface EngineCounters {
  /** Milter sessions started (a QUIT_NC starts another one on the same connection). */
  created: number;
  /** Sessions ended. */
  deleted: number;
  /** Sessions open now (created - deleted). */
  active: number;
  /** Callbacks answered by the fallback because JavaScript was too slow. */
  deadlineExpired: number;
  /** Progress messages sent during eom. */
  progressSent: number;
  /** Answers that arrived after their deadline and were ignored. */
  lateAnswers: number;
  /** Sessions refused with TEMPFAIL while draining. */
  drainRefused: number;
  /** Whether the engine is serving. */
  running: boolean;
}
