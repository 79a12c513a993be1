/**
 * The engine-neutral half of serving a milter: how a session's events reach
 * the callbacks and how their results become answers. Both engines use it:
 * the libmilter engine (`nodemilter/milter`, events from the native addon)
 * and the protocol engine in TypeScript (`nodemilter/engine`, events read
 * off the socket). An engine supplies a {@link SessionCore} subclass that
 * knows how to answer the MTA and perform the actions; everything else
 * (per-session serialization of async handlers, no-reply steps, the
 * exception policy, status checks, argument decoding, action validation)
 * lives here, once.
 *
 * @internal
 * @module
 */
import { isUtf8 } from 'node:buffer';
import type { EventEmitter } from 'node:events';

import * as C from '../constants';
import {
  ActionNotAllowedError,
  ContextClosedError,
  DisabledActionError,
  InvalidArgumentError,
  InvalidStatusError,
  MilterError,
} from '../errors';
import { Ev } from '../native';
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
  NegotiateResult,
} from '../types';
import {
  normalizeSymlist,
  validateEnvelope,
  validateHeaderIndex,
  validateHeaderName,
  validateHeaderValue,
  validateQuarantineReason,
  validateReply,
  type Reply,
} from '../validate';

export { Ev };

/** Callback names in event-number order. */
export const EVENT_NAMES: CallbackName[] = [
  'negotiate', 'connect', 'helo', 'envfrom', 'envrcpt', 'data', 'header', 'eoh', 'body', 'eom', 'abort', 'close', 'unknown',
];
/** Event number of each callback. */
export const CALLBACK_EVENT = Object.fromEntries(EVENT_NAMES.map((n, i) => [n, i])) as Record<CallbackName, number>;
export const CALLBACK_NAMES = new Set<string>(EVENT_NAMES);
/** SMFIP_NR_* per event (0: the step always needs an answer). */
export const NR_BIT = [0, C.P_NR_CONN, C.P_NR_HELO, C.P_NR_MAIL, C.P_NR_RCPT, C.P_NR_DATA, C.P_NR_HDR, C.P_NR_EOH, C.P_NR_BODY, 0, 0, 0, C.P_NR_UNKN];
/** SMFIP_NO* per event (0: the step cannot be negotiated away). */
export const NO_BIT = [0, C.P_NOCONNECT, C.P_NOHELO, C.P_NOMAIL, C.P_NORCPT, C.P_NODATA, C.P_NOHDRS, C.P_NOEOH, C.P_NOBODY, 0, 0, 0, C.P_NOUNKNOWN];

/** Per-callback deadlines in milliseconds; `default` applies to the rest. */
export type Deadlines = Partial<Record<CallbackName | 'default', number>>;

export const DEFAULT_DEADLINE = 8_000;
export const DEFAULT_EOM_DEADLINE = 240_000;
export const DEFAULT_PROGRESS = 4_000;

/**
 * Per-message limits the dispatcher enforces before a header or body
 * callback runs. Past a limit the handler is not called for the rest of the
 * message; the step is answered with `status` and an SMTP reply
 * (REJECT: `552 5.3.4`, TEMPFAIL: `452 4.3.4`), so a hostile or broken
 * client cannot make a milter that keeps headers or body chunks grow
 * without bound. For a no-reply step the answer goes to the next step the
 * MTA waits for.
 */
export interface MessageLimits {
  /** Most headers per message (default 10 000). */
  maxHeaders?: number;
  /** Most bytes of header names and values per message (default 8 MiB). */
  maxHeaderBytes?: number;
  /** Most body bytes per message delivered to the body callback (default: no limit). */
  maxBodyBytes?: number;
  /** REJECT (default) or TEMPFAIL. */
  status?: number;
}

/** The defaults of {@link MessageLimits}. */
export const DEFAULT_LIMITS = { maxHeaders: 10_000, maxHeaderBytes: 8 * 1024 * 1024, maxBodyBytes: Infinity, status: C.REJECT } as const;

/** Check and complete a limits option; throws InvalidArgumentError naming the bad value. */
export function resolveLimits(l: MessageLimits | undefined): Required<MessageLimits> {
  if (l !== undefined && (l === null || typeof l !== 'object')) throw new InvalidArgumentError(`limits must be an object, got ${describeValue(l)}`);
  const out = { ...DEFAULT_LIMITS, ...l } as Required<MessageLimits>;
  for (const k of ['maxHeaders', 'maxHeaderBytes', 'maxBodyBytes'] as const) {
    const v = out[k];
    if (typeof v !== 'number' || !(v > 0) || (Number.isFinite(v) && !Number.isInteger(v))) {
      throw new InvalidArgumentError(`limits.${k} must be a positive integer (or Infinity), got ${describeValue(v)}`);
    }
  }
  if (out.status !== C.REJECT && out.status !== C.TEMPFAIL) throw new InvalidArgumentError(`limits.status must be REJECT or TEMPFAIL, got ${describeValue(out.status)}`);
  return out;
}

/** Macros remembered for callbacks that run after their command was answered. */
export const COMMON_MACROS = [
  'j', '_', 'i', 'v', '{daemon_name}', '{daemon_addr}', '{if_name}', '{if_addr}', '{client_addr}',
  '{client_port}', '{client_name}', '{client_ptr}', '{client_resolve}', '{auth_type}', '{auth_authen}',
  '{auth_author}', '{auth_ssf}', '{mail_mailer}', '{mail_host}', '{mail_addr}', '{rcpt_mailer}',
  '{rcpt_host}', '{rcpt_addr}', '{tls_version}', '{cipher}', '{cipher_bits}', '{cert_subject}',
  '{cert_issuer}', '{verify}',
];

/** Check a callbacks object and a no-reply list; throws InvalidArgumentError. */
export function checkCallbacks(callbacks: Callbacks, noreply: readonly CallbackName[] | undefined): void {
  if (!callbacks || typeof callbacks !== 'object') throw new InvalidArgumentError('callbacks must be an object of functions');
  for (const [key, fn] of Object.entries(callbacks)) {
    if (!CALLBACK_NAMES.has(key)) throw new InvalidArgumentError(`unknown callback "${key}"; expected one of ${EVENT_NAMES.join(', ')}`);
    if (fn !== undefined && typeof fn !== 'function') throw new InvalidArgumentError(`callback "${key}" must be a function, got ${typeof fn}`);
  }
  for (const n of noreply ?? []) {
    if (!CALLBACK_NAMES.has(n) || (NR_BIT[CALLBACK_EVENT[n]] === 0 && n !== 'abort' && n !== 'close')) {
      throw new InvalidArgumentError(`"${n}" cannot be a no-reply callback; expected one of connect, helo, envfrom, envrcpt, data, header, eoh, body, unknown`);
    }
  }
}

/** Check a 32-bit flag option. */
export function checkIntOption(what: string, v: number | undefined): void {
  if (v !== undefined && (!Number.isInteger(v) || v < 0 || v > 0xffffffff)) {
    throw new InvalidArgumentError(`${what} must be a 32-bit flag mask, got ${String(v)}`);
  }
}

/** Deadlines per event number, in ms, from the register option. */
export function deadlineArray(opt: number | Deadlines | undefined): number[] {
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

/**
 * The events a milter handles (a callback is defined) and the events the
 * MTA is not kept waiting for (its `noreply` callbacks, and abort and close,
 * which never make the MTA wait), as bit masks by event number.
 */
export function eventMasks(callbacks: Callbacks, noreply: readonly CallbackName[] | undefined): { handled: number; noreply: number } {
  let handled = 0;
  let nr = (1 << Ev.ABORT) | (1 << Ev.CLOSE);
  for (const n of EVENT_NAMES) if (typeof callbacks[n] === 'function') handled |= 1 << CALLBACK_EVENT[n];
  for (const n of noreply ?? []) nr |= 1 << CALLBACK_EVENT[n];
  return { handled, noreply: nr };
}

/** The progress interval in whole ms (default 4 s); throws for a negative one. */
export function progressMs(interval: number | undefined): number {
  const progress = interval ?? DEFAULT_PROGRESS;
  if (!(progress >= 0)) throw new InvalidArgumentError(`progressInterval must be >= 0 ms, got ${progress}`);
  return Math.round(progress);
}

/** A milter name, checked: a non-empty string without NUL. */
export function checkMilterName(name: unknown): string {
  if (typeof name !== 'string' || name.length === 0 || name.includes('\0')) {
    throw new InvalidArgumentError(`milter name must be a non-empty string without NUL, got ${JSON.stringify(name)}`);
  }
  return name;
}

/** An idle-session timeout, checked: whole seconds >= 0. */
export function checkTimeout(seconds: number): number {
  if (!Number.isInteger(seconds) || seconds < 0) throw new InvalidArgumentError(`timeout must be whole seconds >= 0, got ${seconds}`);
  return seconds;
}

/** A listen backlog, checked: a positive integer. */
export function checkBacklog(backlog: number): number {
  if (!Number.isInteger(backlog) || backlog <= 0) throw new InvalidArgumentError(`backlog must be a positive integer, got ${backlog}`);
  return backlog;
}

/** A drain budget, checked: ms >= 0. */
export function checkDrain(ms: number): number {
  if (!(ms >= 0)) throw new InvalidArgumentError(`drain must be >= 0 ms, got ${ms}`);
  return ms;
}

/**
 * Admission control, the same options on both engines (`serve()`,
 * `milter.register`, `runmilter`).
 */
export interface SessionCapOptions {
  /**
   * Most MTA sessions served at once. A connection over the cap is answered
   * as `sessionCapAction` says and counted in `getdiag().sessionsRefused`.
   * Default on the TypeScript engine: 1000, lowered under a small
   * file-descriptor limit so that 64 descriptors stay free
   * (docs/reliability.md).
   */
  maxSessions?: number;
  /**
   * What a connection over `maxSessions` gets. `'tempfail'` (default): the
   * negotiation is answered, then the connect step with TEMPFAIL
   * `421 4.3.2 Mail filter busy, try again later`, and the connection is
   * closed; the client is told to come back. `'close'`: the connection is
   * closed at once, and the MTA's `milter_default_action` (Postfix) or the
   * filter's `F=` flags (sendmail) decide what happens to the mail.
   */
  sessionCapAction?: 'tempfail' | 'close';
}

/** Check the admission options; throws InvalidArgumentError naming the bad value. */
export function checkSessionCap(o: SessionCapOptions): void {
  const n = o.maxSessions;
  if (n !== undefined && !(Number.isInteger(n) && n > 0) && n !== Infinity) {
    throw new InvalidArgumentError(`maxSessions must be a positive integer (or Infinity), got ${describeValue(n)}`);
  }
  const a = o.sessionCapAction;
  if (a !== undefined && a !== 'tempfail' && a !== 'close') {
    throw new InvalidArgumentError(`sessionCapAction must be 'tempfail' or 'close', got ${describeValue(a)}`);
  }
}

/** A millisecond option, checked: a finite number >= 0 (0: off). */
export function checkMs(what: string, v: number | undefined, dflt: number): number {
  if (v === undefined) return dflt;
  if (typeof v !== 'number' || !(v >= 0) || !Number.isFinite(v)) throw new InvalidArgumentError(`${what} must be a number of milliseconds >= 0 (0: off), got ${describeValue(v)}`);
  return Math.round(v);
}

/** An exception policy, checked: TEMPFAIL, REJECT, CONTINUE or ACCEPT. */
export function checkExceptionPolicy(status: number): number {
  if (![C.TEMPFAIL, C.REJECT, C.CONTINUE, C.ACCEPT].includes(status)) {
    throw new InvalidArgumentError(`exception policy must be TEMPFAIL, REJECT, CONTINUE or ACCEPT, got ${String(status)}`);
  }
  return status;
}

/** The symlists as one space-separated string per stage (0..6); throws for a bad macro name. */
export function symlistStrings(symlists: Partial<Record<C.MacroStage, readonly string[]>> | undefined): string[] {
  const out: string[] = [];
  for (let stage = 0; stage < 7; stage++) {
    const list = symlists?.[stage as C.MacroStage] ?? [];
    for (const m of list) {
      if (typeof m !== 'string' || !m || /[\s\0]/.test(m)) throw new InvalidArgumentError(`bad macro name ${JSON.stringify(m)} in symlist`);
    }
    out.push(list.join(' '));
  }
  return out;
}

/** A value's short description for error messages. */
export function describeValue(v: unknown): string {
  if (v === undefined) return 'undefined';
  if (typeof v === 'number') return C.statusName(v) ?? String(v);
  if (typeof v === 'string') return JSON.stringify(v);
  return typeof v === 'object' ? (v === null ? 'null' : 'an object') : typeof v;
}

/**
 * A string or Buffer from the MTA, as the callback asked: 'bytes' gives a
 * Buffer; otherwise a string, UTF-8 when valid, else latin1 (nothing lost).
 */
export function decodeText(v: string | Buffer, how: Decoding | undefined): string | Buffer {
  if (how === 'bytes') return typeof v === 'string' ? Buffer.from(v, 'latin1') : v;
  if (typeof v === 'string') return v;
  return isUtf8(v) ? v.toString('utf8') : v.toString('latin1');
}

/** The status a step may answer, beyond the common ones. */
export function checkStatus(type: number, status: unknown, steps: number): number {
  if (typeof status !== 'number' || !Number.isInteger(status)) {
    throw new InvalidStatusError(`${EVENT_NAMES[type]} returned ${describeValue(status)}, expected a status such as CONTINUE, REJECT, TEMPFAIL, ACCEPT or DISCARD`);
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
      throw new InvalidStatusError(`${EVENT_NAMES[type]} returned ${describeValue(status)}, which is not a valid status here`);
  }
}

const FAMILIES: Record<number, Family> = { 0: 'unknown', 1: 'unix', 4: 'inet', 6: 'inet6' };

const FLAG_NAMES: Record<number, string> = {
  [C.ADDHDRS]: 'SMFIF_ADDHDRS',
  [C.CHGBODY]: 'SMFIF_CHGBODY',
  [C.ADDRCPT]: 'SMFIF_ADDRCPT',
  [C.DELRCPT]: 'SMFIF_DELRCPT',
  [C.CHGHDRS]: 'SMFIF_CHGHDRS',
  [C.QUARANTINE]: 'SMFIF_QUARANTINE',
  [C.CHGFROM]: 'SMFIF_CHGFROM',
  [C.ADDRCPT_PAR]: 'SMFIF_ADDRCPT_PAR',
  [C.SETSYMLIST]: 'SMFIF_SETSYMLIST',
};

/** The message of the error thrown for an action whose callback was already answered. */
export const NOT_PARKED_MESSAGE =
  'the MTA is not waiting for this callback any more (it returned, its deadline passed, or it is a no-reply step); call actions before the handler\'s result settles';

/** What an engine emits with `handlerError` when a handler fails. */
export interface HandlerErrorInfo {
  /** The callback that failed. */
  callback: CallbackName;
  /** The session. */
  connection: number;
  /** The status answered instead (undefined for steps nobody waits for). */
  answered?: number;
}

/**
 * Report a failed handler: emit `handlerError` (err, info) on `emitter`, or,
 * when nobody listens (or the listener throws), log it. Both engines use it.
 */
export function reportHandlerError(emitter: EventEmitter, logger: Logger, error: Error, s: SessionCore, type: number, answered?: number): void {
  const info: HandlerErrorInfo = { callback: EVENT_NAMES[type], connection: s.id, answered };
  if (emitter.listenerCount('handlerError') > 0) {
    try {
      emitter.emit('handlerError', error, info);
      return;
    } catch (e) {
      logger.error('nodemilter: handlerError listener threw', e);
    }
  }
  logger.error(`nodemilter: ${info.callback} handler failed on connection ${s.id}: ${error.message}`, error);
}

/**
 * The per-session context handed to every callback, engine-neutral: the
 * dispatcher's bookkeeping, private data and the validation of every
 * action. An engine implements the `do*` primitives (the values are
 * validated already) and {@link answer}.
 */
export abstract class SessionCore implements MilterContext {
  /** The sequence number of the step the MTA waits for, while its callback runs; else 0. */
  seq = 0;
  /** The event type of the callback running (or last run). */
  type = -1;
  busy = false;
  closed = false;
  failed = false;
  queue: Pending[] | undefined;
  /** Bytes of event data waiting in `queue` (what {@link queueCost} counts). */
  queuedBytes = 0;
  /** This message's header count, header bytes and body bytes, for the limits. */
  msgHeaders = 0;
  msgHeaderBytes = 0;
  msgBodyBytes = 0;
  /** Set when this message went past a limit: the reply to give. */
  overLimit: [status: number, rcode: string, xcode: string, text: string] | undefined;
  /** Engine data that came with the event being run (e.g. the macros of that moment). */
  eventData: unknown;
  private priv: unknown;

  constructor(readonly id: number) {}

  abstract get actions(): number;
  abstract get steps(): number;
  abstract getsymval(name: string): string | undefined;

  /**
   * Answer the step `seq` with `status` (and, for negotiate, the options).
   * A late answer (deadline passed) is dropped by the engine.
   */
  abstract answer(seq: number, status: number, actions?: number, steps?: number): void;
  /** Store the reply text the fallback status uses (for step `seq`). */
  abstract fallbackReply(seq: number, rcode: string, xcode: string, text: string): void;

  protected abstract doSetreply(r: Reply): void;
  protected abstract doSetsymlist(stage: C.MacroStage, list: string[]): void;
  protected abstract doAddheader(name: string, value: Bytes, index: number): void;
  protected abstract doChgheader(name: string, index: number, value: Bytes | null): void;
  protected abstract doAddrcpt(rcpt: Bytes, params: Bytes | null): void;
  protected abstract doDelrcpt(rcpt: Bytes): void;
  protected abstract doReplacebody(chunk: Buffer): void;
  protected abstract doChgfrom(sender: Bytes, params: Bytes | null): void;
  protected abstract doQuarantine(reason: string): void;
  protected abstract doProgress(): void;

  getpriv<T = unknown>(): T | undefined {
    return this.priv as T | undefined;
  }

  setpriv(value: unknown): void {
    this.priv = value;
  }

  protected checkMacroName(name: string): void {
    if (typeof name !== 'string' || !name) throw new InvalidArgumentError(`macro name must be a non-empty string, got ${describeValue(name)}`);
  }

  private ready(what: string, flag: number, eom = true): void {
    if (this.closed) throw new ContextClosedError(`${what}: connection ${this.id} is closed`);
    if (eom && this.type !== Ev.EOM) throw new ActionNotAllowedError(`${what} is only allowed in eom, not in ${EVENT_NAMES[this.type] ?? 'this callback'}`);
    if (flag && !(this.actions & flag)) {
      throw new DisabledActionError(`${what} needs the ${FLAG_NAMES[flag] ?? String(flag)} action flag, which was not negotiated with the MTA`, flag);
    }
  }

  setreply(rcode: string, xcode?: string | null, ...lines: string[]): void {
    if (this.closed) throw new ContextClosedError(`setreply: connection ${this.id} is closed`);
    this.doSetreply(validateReply(rcode, xcode, lines));
  }

  setsymlist(stage: C.MacroStage, macros: string | readonly string[]): void {
    this.ready('setsymlist', 0, false);
    this.doSetsymlist(stage, normalizeSymlist(stage, macros));
  }

  addheader(name: string, value: Bytes, index = -1): void {
    this.ready('addheader', C.ADDHDRS);
    validateHeaderName(name);
    const sent = validateHeaderValue(name, value);
    if (index !== -1) validateHeaderIndex(index, 'insert');
    this.doAddheader(name, sent, index);
  }

  chgheader(name: string, index: number, value: Bytes | null): void {
    this.ready('chgheader', C.CHGHDRS);
    validateHeaderName(name);
    validateHeaderIndex(index, 'change');
    const sent = value === null || value === undefined ? value : validateHeaderValue(name, value);
    this.doChgheader(name, index, sent === null || sent === undefined || sent.length === 0 ? null : sent);
  }

  addrcpt(rcpt: Bytes, params?: Bytes | null): void {
    const withParams = params !== undefined && params !== null;
    this.ready('addrcpt', withParams ? C.ADDRCPT_PAR : C.ADDRCPT);
    validateEnvelope('recipient', rcpt);
    if (withParams) validateEnvelope('ESMTP parameters', params!, true);
    this.doAddrcpt(rcpt, withParams ? params! : null);
  }

  delrcpt(rcpt: Bytes): void {
    this.ready('delrcpt', C.DELRCPT);
    validateEnvelope('recipient', rcpt);
    this.doDelrcpt(rcpt);
  }

  replacebody(chunk: Bytes): void {
    this.ready('replacebody', C.CHGBODY);
    if (typeof chunk !== 'string' && !Buffer.isBuffer(chunk)) throw new InvalidArgumentError(`replacebody takes a Buffer or string, got ${describeValue(chunk)}`);
    this.doReplacebody(typeof chunk === 'string' ? Buffer.from(chunk, 'utf8') : chunk);
  }

  chgfrom(sender: Bytes, params?: Bytes | null): void {
    this.ready('chgfrom', C.CHGFROM);
    validateEnvelope('sender', sender);
    const withParams = params !== undefined && params !== null;
    if (withParams) validateEnvelope('ESMTP parameters', params!, true);
    this.doChgfrom(sender, withParams ? params! : null);
  }

  quarantine(reason: string): void {
    this.ready('quarantine', C.QUARANTINE);
    validateQuarantineReason(reason);
    this.doQuarantine(reason);
  }

  progress(): void {
    this.ready('progress', 0);
    this.doProgress();
  }
}

/** A queued event: type, seq, up to four raw arguments, the engine's event data and its {@link queueCost}. */
export type Pending = [number, number, any, any, any, any, unknown, number];

/** Bytes a queued event holds, roughly: its Buffer or string arguments, plus a fixed 64 for the entry. */
export function queueCost(a0: any, a1: any): number {
  return 64 + (typeof a0 === 'string' || Buffer.isBuffer(a0) ? a0.length : 0) + (typeof a1 === 'string' || Buffer.isBuffer(a1) ? a1.length : 0);
}

/** What the {@link Dispatcher} needs from its engine. */
export interface DispatchHooks {
  /** The status answered when a handler fails (TEMPFAIL, REJECT, CONTINUE or ACCEPT). */
  exceptionStatus(): number;
  /** A handler failed; `answered` is the status sent instead (undefined for no-reply steps). */
  report(err: Error, s: SessionCore, type: number, answered?: number): void;
  /** The close event is being run: forget the session. */
  closed?(s: SessionCore): void;
  /** A message went past a limit (`what`: maxHeaders, maxHeaderBytes or maxBodyBytes). */
  limitExceeded?(s: SessionCore, what: keyof MessageLimits, limit: number): void;
  /** Events had queued behind a pending handler and the queue is now empty (the engine may read again). */
  drained?(s: SessionCore): void;
}

/**
 * Runs one milter's callbacks for every session of an engine. Events arrive
 * with raw arguments (`a0..a3`, the native addon's shape):
 * connect (hostname, family 0/1/4/6, address or path, port), helo (name),
 * envfrom/envrcpt (array of args), header (name, value), body (Buffer),
 * unknown (command), negotiate (actions, steps). Strings may be given as
 * Buffers when they hold 8-bit bytes. `seq` > 0: the MTA waits for the
 * answer; 0: it does not (no-reply step, abort, close).
 */
export class Dispatcher {
  readonly limits: Required<MessageLimits>;

  constructor(
    readonly cb: Callbacks,
    readonly decodeOf: Partial<Record<DecodableCallback, Decoding>>,
    readonly hooks: DispatchHooks,
    limits?: MessageLimits,
  ) {
    this.limits = resolveLimits(limits);
  }

  /** Count a header or body chunk; true when this message is (now) past a limit. */
  private overLimit(s: SessionCore, type: number, a0: any, a1: any): boolean {
    if (s.overLimit) return true;
    const l = this.limits;
    let what: 'maxHeaders' | 'maxHeaderBytes' | 'maxBodyBytes' | undefined;
    if (type === Ev.HEADER) {
      s.msgHeaders += 1;
      s.msgHeaderBytes += (a0?.length ?? 0) + (a1?.length ?? 0);
      if (s.msgHeaders > l.maxHeaders) what = 'maxHeaders';
      else if (s.msgHeaderBytes > l.maxHeaderBytes) what = 'maxHeaderBytes';
    } else {
      s.msgBodyBytes += a0?.length ?? 0;
      if (s.msgBodyBytes > l.maxBodyBytes) what = 'maxBodyBytes';
    }
    if (!what) return false;
    const limit = l[what];
    const text = what === 'maxHeaders' ? `Too many header fields (the mail filter's limit is ${limit})`
      : what === 'maxHeaderBytes' ? `Message header too large (the mail filter's limit is ${limit} bytes)`
      : `Message too large (the mail filter's limit is ${limit} bytes)`;
    s.overLimit = l.status === C.TEMPFAIL ? [C.TEMPFAIL, '452', '4.3.4', text] : [C.REJECT, '552', '5.3.4', text];
    this.hooks.limitExceeded?.(s, what, limit);
    return true;
  }

  private answerOverLimit(s: SessionCore, type: number, seq: number): void {
    const [status, rcode, xcode, text] = s.overLimit!;
    s.seq = seq;
    s.type = type;
    s.fallbackReply(seq, rcode, xcode, text);
    s.seq = 0;
    s.answer(seq, status);
  }

  /** Hand one event to its session: run it now, or queue it behind a pending async handler. */
  deliver(s: SessionCore, type: number, seq: number, a0?: any, a1?: any, a2?: any, a3?: any, data?: unknown): void {
    if (type === Ev.CLOSE) {
      s.closed = true;
      // The engine forgets the session now, even if a handler that never
      // settles keeps its close queued: otherwise one hung handler would
      // keep its session in memory until exit. The close callback still
      // runs in order, after the pending handler.
      if (s.busy) this.hooks.closed?.(s);
    }
    if (s.busy) {
      const cost = queueCost(a0, a1);
      s.queuedBytes += cost;
      (s.queue ??= []).push([type, seq, a0, a1, a2, a3, data, cost]);
      return;
    }
    this.run(s, type, seq, a0, a1, a2, a3, data);
    this.pump(s);
  }

  private pump(s: SessionCore): void {
    const q = s.queue;
    if (!q || q.length === 0) return;
    while (!s.busy && q.length > 0) {
      const [type, seq, a0, a1, a2, a3, data, cost] = q.shift()!;
      s.queuedBytes -= cost;
      this.run(s, type, seq, a0, a1, a2, a3, data);
    }
    if (q.length === 0) this.hooks.drained?.(s);
  }

  /** Run one event's callback; returns its result (maybe a promise). */
  private invoke(s: SessionCore, type: number, a0: any, a1: any, a2: any, a3: any): unknown {
    const cb = this.cb;
    const d = this.decodeOf;
    switch (type) {
      case Ev.NEGOTIATE:
        return cb.negotiate!(s, { actions: a0, steps: a1 });
      case Ev.CONNECT: {
        const family = FAMILIES[a1] ?? 'unknown';
        const where = typeof a2 === 'string' ? a2 : (a2 as Buffer).toString('utf8');
        const hostaddr: HostAddr = family === 'inet' || family === 'inet6' ? { address: where, port: a3 } : family === 'unix' ? { path: where } : null;
        return cb.connect!(s, decodeText(a0, d.connect) as string, family, hostaddr);
      }
      case Ev.HELO:
        return cb.helo!(s, decodeText(a0, d.helo) as string);
      case Ev.ENVFROM:
        return cb.envfrom!(s, ...(a0 as (string | Buffer)[]).map((v) => decodeText(v, d.envfrom)));
      case Ev.ENVRCPT:
        return cb.envrcpt!(s, ...(a0 as (string | Buffer)[]).map((v) => decodeText(v, d.envrcpt)));
      case Ev.DATA:
        return cb.data!(s);
      case Ev.HEADER:
        return cb.header!(s, decodeText(a0, 'string') as string, decodeText(a1, d.header));
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
        return cb.unknown!(s, decodeText(a0, d.unknown));
      default:
        return undefined;
    }
  }

  private run(s: SessionCore, type: number, seq: number, a0: any, a1: any, a2: any, a3: any, data: unknown): void {
    s.eventData = data;
    if (type === Ev.CLOSE) {
      this.hooks.closed?.(s);
      if (!this.cb.close) return;
    }
    // Limits: count each message's headers and body; past a limit the
    // handler does not see the rest of the message. The counts start again
    // at MAIL, abort and end of message (when the milter handles those).
    if (type === Ev.HEADER || type === Ev.BODY) {
      if (this.overLimit(s, type, a0, a1)) {
        if (seq > 0) this.answerOverLimit(s, type, seq);
        return;
      }
    } else if (type === Ev.ENVFROM || type === Ev.ABORT || type === Ev.EOM) {
      const over = s.overLimit;
      s.msgHeaders = s.msgHeaderBytes = s.msgBodyBytes = 0;
      s.overLimit = undefined;
      if (over && seq > 0 && type === Ev.EOM) {
        // A no-reply header or body step went past the limit: answer here.
        s.overLimit = over;
        this.answerOverLimit(s, type, seq);
        s.overLimit = undefined;
        return;
      }
    } else if (seq > 0 && s.overLimit && (type === Ev.EOH || type === Ev.DATA || type === Ev.UNKNOWN)) {
      this.answerOverLimit(s, type, seq);
      return;
    }
    if (seq > 0 && s.failed) {
      // An earlier no-reply step failed: nothing is accepted silently.
      s.failed = false;
      s.seq = seq;
      s.type = type;
      this.answerFailure(s, type, seq);
      return;
    }
    s.seq = seq;
    s.type = type;
    let result: unknown;
    try {
      result = this.invoke(s, type, a0, a1, a2, a3);
    } catch (err) {
      this.failed(s, type, seq, err);
      return;
    }
    if (result !== null && typeof result === 'object' && typeof (result as PromiseLike<unknown>).then === 'function') {
      s.busy = true;
      (result as PromiseLike<unknown>).then(
        (v) => {
          this.finish(s, type, seq, v);
          s.busy = false;
          this.pump(s);
        },
        (err) => {
          this.failed(s, type, seq, err);
          s.busy = false;
          this.pump(s);
        },
      );
      return;
    }
    this.finish(s, type, seq, result);
  }

  private finish(s: SessionCore, type: number, seq: number, result: unknown): void {
    if (type === Ev.ABORT || type === Ev.CLOSE) {
      s.seq = 0;
      return;
    }
    if (type === Ev.NEGOTIATE) {
      this.finishNegotiate(s, seq, result);
      return;
    }
    if (seq === 0) {
      s.seq = 0;
      // No-reply step: the MTA was answered already.
      if (result !== C.CONTINUE && result !== C.NOREPLY) {
        this.report(
          new InvalidStatusError(`${EVENT_NAMES[type]} is a no-reply step but its handler returned ${describeValue(result)}; only CONTINUE is possible there and the result is lost`),
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
      this.failed(s, type, seq, err);
      return;
    }
    s.seq = 0;
    s.answer(seq, status);
  }

  private finishNegotiate(s: SessionCore, seq: number, result: unknown): void {
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
      this.failed(s, Ev.NEGOTIATE, seq, new InvalidStatusError(`negotiate returned ${describeValue(result)}, expected ALL_OPTS, CONTINUE with {actions, steps}, or REJECT`));
      return;
    }
    if (![C.ALL_OPTS, C.CONTINUE, C.REJECT, C.TEMPFAIL].includes(status)) {
      this.failed(s, Ev.NEGOTIATE, seq, new InvalidStatusError(`negotiate returned status ${describeValue(status)}, expected ALL_OPTS, CONTINUE or REJECT`));
      return;
    }
    s.seq = 0;
    s.answer(seq, status, actions >>> 0, steps >>> 0);
  }

  private report(err: unknown, s: SessionCore, type: number, answered?: number): void {
    const error = err instanceof Error ? err : new MilterError(`handler threw a non-Error value: ${describeValue(err)}`, 'ERR_MILTER_HANDLER');
    this.hooks.report(error, s, type, answered);
  }

  private failed(s: SessionCore, type: number, seq: number, err: unknown): void {
    const policy = this.hooks.exceptionStatus();
    if (seq === 0 || type === Ev.ABORT || type === Ev.CLOSE) {
      s.seq = 0;
      this.report(err, s, type);
      if (type !== Ev.ABORT && type !== Ev.CLOSE && policy !== C.CONTINUE && policy !== C.ACCEPT) s.failed = true;
      return;
    }
    this.report(err, s, type, type === Ev.NEGOTIATE ? C.ALL_OPTS : policy);
    this.answerFailure(s, type, seq);
  }

  private answerFailure(s: SessionCore, type: number, seq: number): void {
    if (type === Ev.NEGOTIATE) {
      s.seq = 0;
      s.answer(seq, C.ALL_OPTS);
      return;
    }
    let status = this.hooks.exceptionStatus();
    if (status === C.TEMPFAIL) s.fallbackReply(seq, '451', '4.3.0', 'Temporary failure in mail filter');
    else if (status === C.REJECT) s.fallbackReply(seq, '554', '5.3.0', 'Mail filter failed');
    else if (status === C.ACCEPT && type === Ev.EOM) status = C.CONTINUE;
    s.seq = 0;
    s.answer(seq, status);
  }
}
