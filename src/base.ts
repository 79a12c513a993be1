/**
 * The Milter layer: {@link Base}, a class with one instance per SMTP
 * connection whose methods are the milter callbacks (pymilter's names), and
 * {@link describe}, which turns a Base subclass into the engine-neutral
 * {@link MilterDescription} any engine serves.
 *
 * Nothing here knows libmilter: Base speaks to the connection only through
 * its {@link MilterContext}.
 *
 * @module
 */
import {
  ACCEPT, ADDHDRS, ADDRCPT, ADDRCPT_PAR, CHGBODY, CHGFROM, CHGHDRS, CONTINUE, DELRCPT, DISCARD, NOREPLY, QUARANTINE, REJECT,
  SETSYMLIST, TEMPFAIL, P_HDR_LEADSPC, P_RCPT_REJ, P_SKIP,
} from './constants';
import type { MacroStage } from './constants';
import { ActionNotAllowedError, DisabledActionError, InvalidArgumentError } from './errors';
import type {
  Bytes, CallbackName, Callbacks, DecodableCallback, Decoding, Family, HostAddr, Logger, MilterContext,
  MilterDescription, NegotiateOffer, NegotiateResult, StatusLike,
} from './types';
import { decorate, methodTags, noreply, OPTIONAL_METHODS, SYMLIST_METHODS, DECODABLE_METHODS } from './decorators';
import { MACRO_STAGE_OF, resolveNegotiation, STEP_BITS } from './negotiation';
import type { OptionalCallback } from './negotiation';
import {
  describeStatus, normalizeSymlist, validateEnvelope, validateHeaderIndex, validateHeaderName, validateHeaderValue,
  validateQuarantineReason, validateReply,
} from './validate';

/** A Base method that is a callback, by its pymilter name. */
export type CallbackMethod =
  | 'negotiate' | 'connect' | 'hello' | 'envfrom' | 'envrcpt' | 'data' | 'header' | 'eoh' | 'body' | 'eom' | 'abort' | 'close' | 'unknown';

/** The protocol callback name of each Base method (only `hello` differs: the callback is `helo`). */
export const CALLBACK_OF: Readonly<Record<CallbackMethod, CallbackName>> = {
  negotiate: 'negotiate', connect: 'connect', hello: 'helo', envfrom: 'envfrom', envrcpt: 'envrcpt', data: 'data',
  header: 'header', eoh: 'eoh', body: 'body', eom: 'eom', abort: 'abort', close: 'close', unknown: 'unknown',
};
const METHOD_OF = Object.fromEntries(Object.entries(CALLBACK_OF).map(([m, cb]) => [cb, m])) as Record<CallbackName, CallbackMethod>;

/** The callbacks that belong to a message: the first one seen opens the transaction. */
const IN_MESSAGE: ReadonlySet<CallbackName> = new Set(['envfrom', 'envrcpt', 'data', 'header', 'eoh', 'body']);

/**
 * Whether a callback's status ends the message for the milter, so that a
 * later ABORT is not an abort of an open transaction: REJECT or TEMPFAIL of
 * MAIL refuses the transaction; ACCEPT or DISCARD anywhere ends the milter's
 * part in it (no further callbacks for this message); REJECT or TEMPFAIL
 * from DATA, a header, EOH or the body refuses the message. At RCPT, REJECT
 * and TEMPFAIL refuse that recipient only.
 */
function endsMessage(cb: CallbackName, status: unknown): boolean {
  if (status === ACCEPT || status === DISCARD) return IN_MESSAGE.has(cb);
  if (status === REJECT || status === TEMPFAIL) return IN_MESSAGE.has(cb) && cb !== 'envrcpt';
  return false;
}

const FLAG_NAMES: Record<number, string> = {
  [ADDHDRS]: 'ADDHDRS', [CHGBODY]: 'CHGBODY', [ADDRCPT]: 'ADDRCPT', [DELRCPT]: 'DELRCPT', [CHGHDRS]: 'CHGHDRS',
  [QUARANTINE]: 'QUARANTINE', [CHGFROM]: 'CHGFROM', [ADDRCPT_PAR]: 'ADDRCPT_PAR', [SETSYMLIST]: 'SETSYMLIST',
};

/**
 * A Base subclass that {@link describe} can instantiate (no constructor
 * arguments), with its class switches.
 */
export type MilterClass = (new () => Base<any>) & ClassSwitches;

/**
 * The class-level switches of a milter, declared as static properties of the
 * Base subclass. Subclasses inherit them and may override them.
 *
 * @example
 * ```ts
 * class Tagger extends Base {
 *   static override flags = ADDHDRS | CHGHDRS;   // pymilter: set_flags(ADDHDRS | CHGHDRS)
 *   static override rejectedRecipients = true;   // see recipients the MTA rejected
 *   static override headerLeadingSpace = true;   // raw header values
 * }
 * ```
 */
export interface ClassSwitches {
  /**
   * The action flags (SMFIF_*) the milter needs, like pymilter's
   * `set_flags`. `undefined` (the default) takes whatever the MTA offers.
   * An action whose flag is missing throws DisabledActionError.
   */
  flags?: number;
  /** Ask for SMFIP_RCPT_REJ: envrcpt also sees recipients the MTA already rejected. Default false. */
  rejectedRecipients?: boolean;
  /** Ask for SMFIP_HDR_LEADSPC: header values are sent and added byte for byte, leading space included. Default false. */
  headerLeadingSpace?: boolean;
  /** Ask for SMFIP_SKIP, so body() may return SKIP. Default true (as pymilter and libmilter do). */
  skip?: boolean;
  /** Any further SMFIP_* bits to ask for, OR-ed into the computed steps. Default 0. */
  extraSteps?: number;
  /** Where the instances log (see {@link Logger}). Default `console`. */
  logger?: Logger;
}

/** What {@link describe} accepts: a Base subclass, or a function returning a new instance per connection. */
export type MilterFactory = MilterClass | (() => Base<any>);

/** Options of {@link describe}. */
export interface DescribeOptions {
  /** The milter's name (default: the class name). */
  name?: string;
  /**
   * The class a factory function returns, so negotiation, `noreply` and
   * `decode` can be computed once. Without it a factory function is
   * negotiated per connection (see {@link describe}).
   */
  class?: MilterClass;
}

type CallbackRunner = (inst: Base<any>, ctx: MilterContext, cb: CallbackName, args: unknown[]) => unknown;
let runCallback: CallbackRunner;

function isThenable(value: unknown): value is PromiseLike<unknown> {
  return value !== null && (typeof value === 'object' || typeof value === 'function') && typeof (value as any).then === 'function';
}

function formatAddr(family: Family, hostaddr: HostAddr): string {
  if (!hostaddr) return family;
  if ('path' in hostaddr) return hostaddr.path;
  return family === 'inet6' ? `[${hostaddr.address}]:${hostaddr.port}` : `${hostaddr.address}:${hostaddr.port}`;
}

/**
 * A milter: subclass it and override the callbacks you need. {@link describe}
 * (or `runmilter`) creates a new instance for each SMTP connection, at its
 * first event, and drops it after close().
 *
 * **Negotiation is automatic.** A callback the class does not override is
 * negotiated away (SMFIP_NO*), so the MTA never sends it and no JavaScript
 * runs. `@noreply`, `@nocallback`, `@symlist` and `@decode` refine that per
 * method; the static {@link ClassSwitches} refine it per class. Override
 * {@link Base.negotiate} only to take full control.
 *
 * **State.** The instance lives as long as the connection: ordinary fields
 * are per-connection state. Several messages may pass on one connection,
 * and ABORT ends a message but not the connection, so keep per-message state
 * in {@link Base.message}: a fresh object (from {@link Base.newMessage}) at
 * each envfrom, dropped after eom and abort.
 *
 * **Callbacks** may be `async`; the engine awaits them in protocol order.
 * Each returns a status (CONTINUE, REJECT, TEMPFAIL, ACCEPT, DISCARD, and
 * SKIP from body). **Actions** (setreply, addheader, chgheader, ...) delegate
 * to the connection's context after validation. Modifications work only
 * inside eom() and only when their action flag was negotiated.
 *
 * @typeParam M the type of the per-message state object {@link Base.message}.
 *
 * @example
 * ```ts
 * import { Base, CONTINUE, REJECT, ADDHDRS, symlist } from 'nodemilter';
 *
 * class Example extends Base<{ rcpts: string[] }> {
 *   static override flags = ADDHDRS;
 *   helo = '';                                     // per connection
 *   protected override newMessage() { return { rcpts: [] }; }
 *
 *   override hello(name: string) { this.helo = name; return CONTINUE; }
 *   override envrcpt(to: string) {
 *     this.message.rcpts.push(to);                 // per message
 *     return CONTINUE;
 *   }
 *   override async eom() {
 *     this.addheader('X-Rcpt-Count', String(this.message.rcpts.length));
 *     return CONTINUE;
 *   }
 * }
 * ```
 */
export class Base<M extends object = Record<string, any>> {
  /** See {@link ClassSwitches.flags}. */
  static flags: number | undefined = undefined;
  /** See {@link ClassSwitches.rejectedRecipients}. */
  static rejectedRecipients = false;
  /** See {@link ClassSwitches.headerLeadingSpace}. */
  static headerLeadingSpace = false;
  /** See {@link ClassSwitches.skip}. */
  static skip = true;
  /** See {@link ClassSwitches.extraSteps}. */
  static extraSteps = 0;
  /** See {@link ClassSwitches.logger}. */
  static logger: Logger = console;

  /** Where this instance logs; starts as the class's `logger`. Assign a per-connection child logger if you like. */
  logger: Logger = (this.constructor as typeof Base).logger ?? console;

  #ctx: MilterContext | undefined;
  #running: CallbackName | undefined;
  #message: M | undefined;
  #offer: NegotiateOffer | undefined;
  /** A message is open: MAIL (or a later message event) was seen, and neither eom, abort nor an ending status came since. */
  #inMessage = false;

  static {
    runCallback = (inst, ctx, cb, args) => inst.#run(ctx, cb, args);
  }

  #run(ctx: MilterContext, cb: CallbackName, args: unknown[]): unknown {
    this.#ctx = ctx;
    if (cb === 'abort' && !this.#inMessage) {
      // Postfix sends ABORT outside a transaction too (after a delivered
      // message, before the next MAIL, at the end of the session): nothing
      // was aborted, so abort() does not run.
      this.#message = undefined;
      return CONTINUE;
    }
    if (cb === 'negotiate') this.#offer = args[0] as NegotiateOffer;
    if (cb === 'envfrom') this.#message = this.newMessage();
    if (IN_MESSAGE.has(cb)) this.#inMessage = true;
    const method = METHOD_OF[cb];
    const fn = (this as any)[method] as (...a: unknown[]) => unknown;
    const tags = methodTags(fn);
    // envfrom negotiated only so Base sees MAIL (see watchesMail): a @nocallback envfrom still does not run.
    if (cb === 'envfrom' && tags.nocallback) return CONTINUE;
    const quiet = tags.noreply ? '@noreply' : tags.nocallback ? '@nocallback' : undefined;
    this.#running = cb;
    let result: unknown;
    try {
      result = fn.apply(this, args);
    } catch (err) {
      this.#end(cb);
      throw err;
    }
    if (isThenable(result)) {
      return Promise.resolve(result).then(
        (value) => this.#finish(cb, method, quiet, value),
        (err) => {
          this.#end(cb);
          throw err;
        },
      );
    }
    // A synchronous handler (the common case) is finished without a closure.
    return this.#finish(cb, method, quiet, result);
  }

  /** A callback returned `value`: the status the engine gets. */
  #finish(cb: CallbackName, method: string, quiet: string | undefined, value: unknown): unknown {
    this.#end(cb);
    if (!quiet && endsMessage(cb, value)) this.#inMessage = false;
    if (quiet && value !== CONTINUE && value !== NOREPLY) {
      this.logger.error(
        `${this.constructor.name}.${method}() is ${quiet} but returned ${describeStatus(value)}; the MTA does not wait for it, so CONTINUE stands`,
      );
    }
    return quiet ? CONTINUE : value;
  }

  #end(cb: CallbackName): void {
    this.#running = undefined;
    if (cb === 'negotiate') this.#offer = undefined;
    if (cb === 'eom' || cb === 'abort' || cb === 'close') {
      this.#message = undefined;
      this.#inMessage = false;
    }
  }

  /* ------------------------------------------------------------ state */

  /**
   * Per-message state: a fresh object from {@link newMessage} at each
   * envfrom (or at first use in a message, if envfrom is not negotiated),
   * dropped after eom() and abort(). Use it for anything that must not leak
   * from one message into the next on the same connection.
   */
  get message(): M {
    return (this.#message ??= this.newMessage());
  }

  /**
   * Make the per-message state object. Override it to give {@link message}
   * its shape. Called at most once per message; it is a factory, not a reset
   * hook.
   */
  protected newMessage(): M {
    return {} as M;
  }

  /** The callback running now (`'eom'`, `'helo'`...), or undefined between callbacks. */
  get running(): CallbackName | undefined {
    return this.#running;
  }

  /** The connection's context, for what Base does not wrap (getpriv/setpriv). Throws before the first event. */
  protected get context(): MilterContext {
    return this.#attached('context');
  }

  /** The connection's id (unique within the process). */
  get id(): number {
    return this.#attached('id').id;
  }

  /** The action flags (SMFIF_*) negotiated for this connection; pymilter's `_actions`. */
  get actions(): number {
    return this.#ctx?.actions ?? 0;
  }

  /** The protocol steps (SMFIP_*) negotiated for this connection; pymilter's `_protocol`. */
  get steps(): number {
    return this.#ctx?.steps ?? 0;
  }

  /** Log a line at info level: the arguments joined by spaces. */
  log(...parts: unknown[]): void {
    this.logger.info(parts.map((p) => (typeof p === 'string' ? p : Buffer.isBuffer(p) ? p.toString() : JSON.stringify(p) ?? String(p))).join(' '));
  }

  /* ------------------------------------------------------------ callbacks */

  /**
   * Option negotiation. The default asks for what the class declares (see
   * {@link protocolSteps}, {@link ClassSwitches}) limited to the `offer`,
   * and sends the `@symlist` macro lists. Override it only to decide per
   * connection; `super.negotiate(offer)` gives the default answer to adjust.
   * Only an overriding class gets a negotiate callback in its description.
   */
  negotiate(offer: NegotiateOffer): NegotiateResult | Promise<NegotiateResult> {
    const desc = describeClass(this.constructor as MilterClass);
    const negotiated = resolveNegotiation(desc, offer);
    for (const [stage, macros] of Object.entries(negotiated.symlists)) {
      this.setsymlist(Number(stage) as MacroStage, ...(macros as string[]));
    }
    return { status: CONTINUE, actions: negotiated.actions, steps: negotiated.steps };
  }

  /**
   * A client connected. `hostname` is its PTR name or `[address]`;
   * `hostaddr` is `{address, port}` for inet/inet6, `{path}` for unix, null
   * when unknown.
   */
  connect(hostname: Bytes, family: Family, hostaddr: HostAddr): StatusLike {
    return CONTINUE;
  }

  /** The client said HELO/EHLO. */
  hello(heloname: Bytes): StatusLike {
    return CONTINUE;
  }

  /** MAIL FROM: the sender with angle brackets, then ESMTP parameters (see {@link nodemilter!param2dict}). Starts a message. */
  envfrom(from: Bytes, ...params: Bytes[]): StatusLike {
    return CONTINUE;
  }

  /** RCPT TO: the recipient with angle brackets, then ESMTP parameters. REJECT refuses this recipient only. */
  envrcpt(to: Bytes, ...params: Bytes[]): StatusLike {
    return CONTINUE;
  }

  /** The client said DATA. */
  data(): StatusLike {
    return CONTINUE;
  }

  /** One header field. Without `headerLeadingSpace` the value has no leading space; folded lines are joined by LF. */
  header(name: string, value: Bytes): StatusLike {
    return CONTINUE;
  }

  /** End of headers. */
  eoh(): StatusLike {
    return CONTINUE;
  }

  /** A piece of the body (CRLF line ends, up to 64 KiB). */
  body(chunk: Buffer): StatusLike {
    return CONTINUE;
  }

  /** End of message: the only place for modifications (addheader, chgheader, addrcpt, replacebody...). */
  eom(): StatusLike {
    return CONTINUE;
  }

  /**
   * The current message was aborted (RSET, client gone...); the connection
   * may go on. Its return value is ignored.
   *
   * Base calls it only for an open transaction: after envfrom (or the first
   * later message event) and before eom() ended. The MTA also sends ABORT
   * outside a transaction (Postfix does after every delivered message and at
   * the end of the session); Base drops those, so abort() means that a
   * message really was aborted. A class that overrides abort() but not
   * envfrom() gets a `@noreply` envfrom negotiated, so Base can see the
   * transaction start. The one-to-one `nodemilter/milter` module passes
   * every ABORT on, as libmilter does.
   */
  abort(): void | StatusLike {
    return CONTINUE;
  }

  /** The connection closed; release resources here. Its return value is ignored. */
  close(): void | StatusLike {
    return CONTINUE;
  }

  /** An SMTP command the MTA does not know. */
  unknown(cmd: Bytes): StatusLike {
    return CONTINUE;
  }

  /* ------------------------------------------------------------ actions */

  #attached(action: string): MilterContext {
    if (!this.#ctx) {
      throw new ActionNotAllowedError(`${action} needs a connection: this milter has not received any event yet`);
    }
    return this.#ctx;
  }

  #where(): string {
    return this.#running ? `inside ${METHOD_OF[this.#running]}()` : 'between callbacks (was a promise left unawaited?)';
  }

  #modification(action: string, flag: number): MilterContext {
    const ctx = this.#attached(`${action}()`);
    if (!(ctx.actions & flag)) {
      const declared = (this.constructor as typeof Base).flags;
      const hint = declared !== undefined && !(declared & flag) ? `add ${FLAG_NAMES[flag]} to static flags` : 'the MTA did not offer it';
      throw new DisabledActionError(`${action}() needs the ${FLAG_NAMES[flag]} action flag, not negotiated for this connection (${hint})`, flag);
    }
    if (this.#running !== 'eom') {
      throw new ActionNotAllowedError(`${action}() is allowed only inside eom(), not ${this.#where()}`);
    }
    return ctx;
  }

  /** The value of a macro (`'i'`, `'{auth_authen}'`, `'j'`...), or undefined if the MTA did not send it. */
  getsymval(name: string): string | undefined {
    return this.#attached('getsymval()').getsymval(name);
  }

  /**
   * Set the SMTP reply for the next REJECT (rcode 5xx) or TEMPFAIL (4xx).
   * Several lines make a multi-line reply. See {@link validateReply} for
   * the rules, notably: every `%` must be written `%%`.
   *
   * @example
   * ```ts
   * this.setreply('550', '5.7.1', 'Message refused', 'see https://example.com/policy');
   * return REJECT;
   * ```
   */
  setreply(rcode: string, xcode?: string | null, ...lines: string[]): void {
    const reply = validateReply(rcode, xcode, lines);
    this.#attached('setreply()').setreply(reply.rcode, reply.xcode, ...reply.lines);
  }

  /**
   * Ask for exactly these macros at a stage (SMFIM_*). Only inside
   * negotiate(); the `@symlist` decorator is the usual way.
   */
  setsymlist(stage: MacroStage, ...macros: string[]): void {
    const ctx = this.#attached('setsymlist()');
    if (this.#running !== 'negotiate') {
      throw new ActionNotAllowedError(`setsymlist() is allowed only inside negotiate(), not ${this.#where()}`);
    }
    if (this.#offer && !(this.#offer.actions & SETSYMLIST)) {
      throw new DisabledActionError('setsymlist() needs the SETSYMLIST action flag, which the MTA did not offer', SETSYMLIST);
    }
    ctx.setsymlist(stage, normalizeSymlist(stage, macros));
  }

  /**
   * Add a header at the end, or insert it at `index` (0 = before the first
   * header; the MTA counts its own headers too). Needs ADDHDRS; eom only.
   * Fold a long value with `"\n\t"`; a CRLF is sent as LF (see
   * {@link nodemilter!validateHeaderValue}).
   */
  addheader(name: string, value: Bytes, index?: number): void {
    validateHeaderName(name);
    const sent = validateHeaderValue(name, value);
    if (index !== undefined && index !== -1) validateHeaderIndex(index, 'insert');
    this.#modification('addheader', ADDHDRS).addheader(name, sent, index === -1 ? undefined : index);
  }

  /**
   * Change the `index`-th (from 1) header called `name`; a null or empty
   * value deletes it. Needs CHGHDRS; eom only.
   */
  chgheader(name: string, index: number, value: Bytes | null): void {
    validateHeaderName(name);
    validateHeaderIndex(index, 'change');
    const sent = value === null ? null : validateHeaderValue(name, value);
    this.#modification('chgheader', CHGHDRS).chgheader(name, index, sent);
  }

  /**
   * Add a recipient (`'<user@example.com>'`). With ESMTP `params` (a string
   * or a list joined by spaces) it needs ADDRCPT_PAR, else ADDRCPT; eom only.
   */
  addrcpt(rcpt: Bytes, params?: Bytes | readonly string[] | null): void {
    validateEnvelope('recipient', rcpt);
    const p = Array.isArray(params) ? params.join(' ') : (params as Bytes | null | undefined);
    if (p !== undefined && p !== null && p.length > 0) {
      validateEnvelope('recipient parameters', p);
      this.#modification('addrcpt', ADDRCPT_PAR).addrcpt(rcpt, p);
    } else {
      this.#modification('addrcpt', ADDRCPT).addrcpt(rcpt);
    }
  }

  /** Delete a recipient, exactly as envrcpt received it. Needs DELRCPT; eom only. */
  delrcpt(rcpt: Bytes): void {
    validateEnvelope('recipient', rcpt);
    this.#modification('delrcpt', DELRCPT).delrcpt(rcpt);
  }

  /** Replace the body; call repeatedly to append (CRLF line ends). Needs CHGBODY; eom only. */
  replacebody(chunk: Bytes): void {
    if (typeof chunk !== 'string' && !Buffer.isBuffer(chunk)) {
      throw new InvalidArgumentError(`replacebody() takes a string or Buffer, not ${typeof chunk}`);
    }
    this.#modification('replacebody', CHGBODY).replacebody(chunk);
  }

  /** Change the envelope sender (`'<user@example.com>'`), with ESMTP params if given. Needs CHGFROM; eom only. */
  chgfrom(sender: Bytes, params?: Bytes | readonly string[] | null): void {
    validateEnvelope('sender', sender, true);
    const p = Array.isArray(params) ? params.join(' ') : (params as Bytes | null | undefined);
    if (p !== undefined && p !== null && p.length > 0) validateEnvelope('sender parameters', p);
    this.#modification('chgfrom', CHGFROM).chgfrom(sender, p || undefined);
  }

  /** Quarantine the message with a reason. Needs QUARANTINE; eom only. */
  quarantine(reason: string): void {
    validateQuarantineReason(reason);
    this.#modification('quarantine', QUARANTINE).quarantine(reason);
  }

  /** Tell the MTA we are still working (resets its timeout). eom only. */
  progress(): void {
    const ctx = this.#attached('progress()');
    if (this.#running !== 'eom') throw new ActionNotAllowedError(`progress() is allowed only inside eom(), not ${this.#where()}`);
    ctx.progress();
  }
}

/* ---------------------------------------------------------------- Milter */

/**
 * pymilter's `Milter.Milter`, kept for compatibility: a Base that logs every
 * callback through its logger. connect, hello, envfrom, envrcpt, data,
 * header, eoh and unknown are `@noreply`; body is not overridden (so it is
 * negotiated away); eom, abort and close log and return CONTINUE. Subclass
 * it and override what you need.
 */
export class Milter<M extends object = Record<string, any>> extends Base<M> {
  override connect(hostname: Bytes, family: Family, hostaddr: HostAddr): StatusLike {
    this.log('connect from', hostname, 'at', formatAddr(family, hostaddr));
    return CONTINUE;
  }
  override hello(heloname: Bytes): StatusLike {
    this.log('hello from', heloname);
    return CONTINUE;
  }
  override envfrom(from: Bytes, ...params: Bytes[]): StatusLike {
    this.log('mail from', from, ...params);
    return CONTINUE;
  }
  override envrcpt(to: Bytes, ...params: Bytes[]): StatusLike {
    this.log('rcpt to', to, ...params);
    return CONTINUE;
  }
  override data(): StatusLike {
    this.log('data');
    return CONTINUE;
  }
  override header(name: string, value: Bytes): StatusLike {
    this.log(`${name}: ${value}`);
    return CONTINUE;
  }
  override eoh(): StatusLike {
    this.log('eoh');
    return CONTINUE;
  }
  override unknown(cmd: Bytes): StatusLike {
    this.log('unknown command', cmd);
    return CONTINUE;
  }
  override eom(): StatusLike {
    this.log('eom');
    return CONTINUE;
  }
  override abort(): StatusLike {
    this.log('abort');
    return CONTINUE;
  }
  override close(): StatusLike {
    this.log('close');
    return CONTINUE;
  }
}
// Applied by name so this module has no decorator syntax to compile.
for (const m of ['connect', 'hello', 'envfrom', 'envrcpt', 'data', 'header', 'eoh', 'unknown']) decorate(Milter, m, noreply);

/* ---------------------------------------------------------------- negotiation from the class */

function isMilterClass(f: unknown): f is MilterClass {
  return typeof f === 'function' && (f === Base || f.prototype instanceof Base);
}

function baseMethod(name: string): unknown {
  return (Base.prototype as any)[name];
}

/**
 * Whether a class handles an optional callback: it overrides the method
 * (somewhere below Base) and the method is not `@nocallback`.
 */
function handles(cls: MilterClass, method: (typeof OPTIONAL_METHODS)[number]): boolean {
  const fn = (cls.prototype as any)[method];
  return fn !== baseMethod(method) && !methodTags(fn).nocallback;
}

/**
 * Whether Base must see MAIL for a class that does not handle it itself:
 * the class overrides abort(), which Base runs only inside a transaction.
 * envfrom is then negotiated as `@noreply` (the MTA does not wait for it).
 */
function watchesMail(cls: MilterClass): boolean {
  return (cls.prototype as any).abort !== baseMethod('abort') && !handles(cls, 'envfrom');
}

/**
 * The protocol steps (SMFIP_*) a class asks for, computed afresh from the
 * class itself (a subclass that overrides a method gets that step even if
 * its parent had negotiated it away):
 *
 * - SMFIP_NO* for each optional callback not overridden, or `@nocallback`;
 * - SMFIP_NR_* for each `@noreply` callback;
 * - SMFIP_NR_MAIL instead of SMFIP_NOMAIL for a class that overrides abort()
 *   but not envfrom() (Base needs MAIL to know a transaction is open; see
 *   {@link Base.abort});
 * - SMFIP_SKIP if `skip` (default), SMFIP_RCPT_REJ if `rejectedRecipients`,
 *   SMFIP_HDR_LEADSPC if `headerLeadingSpace`, and `extraSteps`.
 *
 * eom, abort and close have no step bits.
 *
 * @example
 * ```ts
 * class OnlyRcpt extends Base { override envrcpt() { return CONTINUE; } }
 * protocolSteps(OnlyRcpt) & P_NORCPT; // 0: envrcpt is wanted
 * protocolSteps(OnlyRcpt) & P_NOHDRS; // P_NOHDRS: headers are not
 * ```
 */
export function protocolSteps(cls: MilterClass): number {
  let steps = 0;
  for (const method of OPTIONAL_METHODS) {
    const bits = STEP_BITS[CALLBACK_OF[method] as OptionalCallback];
    if (method === 'envfrom' && watchesMail(cls)) steps |= bits.nr;
    else if (!handles(cls, method)) steps |= bits.no;
    else if (methodTags((cls.prototype as any)[method]).noreply) steps |= bits.nr;
  }
  if (cls.skip ?? true) steps |= P_SKIP;
  if (cls.rejectedRecipients) steps |= P_RCPT_REJ;
  if (cls.headerLeadingSpace) steps |= P_HDR_LEADSPC;
  return steps | (cls.extraSteps ?? 0);
}

/**
 * Everything static about a class's negotiation, as a description without
 * callbacks: actions, steps, noreply, symlists and decode.
 */
function describeClass(cls: MilterClass): MilterDescription {
  const proto = cls.prototype as any;
  const noreply: CallbackName[] = [];
  const callbacks: Callbacks = {};
  for (const method of OPTIONAL_METHODS) {
    const watched = method === 'envfrom' && watchesMail(cls);
    if (!watched && !handles(cls, method)) continue;
    const cb = CALLBACK_OF[method];
    (callbacks as any)[cb] = true;
    if (watched || methodTags(proto[method]).noreply) noreply.push(cb);
  }
  const symlists: Partial<Record<MacroStage, readonly string[]>> = {};
  for (const method of SYMLIST_METHODS) {
    const list = methodTags(proto[method]).symlist;
    if (list) symlists[MACRO_STAGE_OF[CALLBACK_OF[method]]!] = list;
  }
  const decode: Partial<Record<DecodableCallback, Decoding>> = {};
  for (const method of DECODABLE_METHODS) {
    const d = methodTags(proto[method]).decode;
    if (d) decode[CALLBACK_OF[method] as DecodableCallback] = d;
  }
  let actions = cls.flags;
  if (actions !== undefined && Object.keys(symlists).length > 0) actions |= SETSYMLIST;
  return { name: cls.name, callbacks, actions, steps: protocolSteps(cls), noreply, symlists, decode };
}

/**
 * Build the engine-neutral description of a milter from a Base subclass
 * (or a factory function), for an engine to serve or for TestCtx.
 *
 * The callbacks create an instance at the first event of each connection
 * (keyed by `ctx.id`), run the matching method with the connection's
 * context attached, and drop the instance after close. Only the optional
 * callbacks the class handles are present (the rest are negotiated away);
 * eom, abort and close are always present, because Base needs them to end
 * per-message state and to drop the instance. negotiate is present only when
 * the class overrides it.
 *
 * With a factory function and no `options.class`, the class is only known
 * per connection: every callback is present, negotiate is always present
 * (it calls the instance's negotiate), and `noreply`/`decode` are left
 * empty. Give `options.class` to avoid that.
 *
 * Errors thrown (or promises rejected) by a method reach the engine, which
 * applies its exception policy.
 *
 * @param factory a Base subclass with a no-argument constructor, or a function returning a new instance
 * @param options the milter name, or {@link DescribeOptions}
 *
 * @example
 * ```ts
 * const desc = describe(MyMilter, 'my-milter');
 * // desc.steps: SMFIP_* bits, desc.callbacks.envrcpt(ctx, '<a@b>') ...
 * ```
 */
export function describe(factory: MilterFactory, options?: string | DescribeOptions): MilterDescription {
  const opts: DescribeOptions = typeof options === 'string' ? { name: options } : options ?? {};
  const cls = opts.class ?? (isMilterClass(factory) ? factory : undefined);
  if (opts.class !== undefined && !isMilterClass(opts.class)) {
    throw new InvalidArgumentError(`describe: options.class must be a subclass of Base`);
  }
  if (typeof factory !== 'function') throw new InvalidArgumentError(`describe: expected a Base subclass or a factory function, not ${typeof factory}`);
  const create: () => Base<any> = isMilterClass(factory) ? () => new factory() : (factory as () => Base<any>);
  const instances = new Map<number, Base<any>>();

  const instanceFor = (ctx: MilterContext): Base<any> => {
    let inst = instances.get(ctx.id);
    if (!inst) {
      inst = create();
      if (!(inst instanceof Base)) throw new InvalidArgumentError('describe: the factory must return an instance of Base');
      instances.set(ctx.id, inst);
    }
    return inst;
  };
  const forward = (cb: CallbackName) => (ctx: MilterContext, ...args: unknown[]) => runCallback(instanceFor(ctx), ctx, cb, args);
  const ending = (cb: 'abort' | 'close') => (ctx: MilterContext) => {
    const inst = instances.get(ctx.id);
    if (!inst) return CONTINUE; // nothing was started on this connection
    if (cb !== 'close') return runCallback(inst, ctx, cb, []);
    const drop = () => instances.delete(ctx.id);
    let result: unknown;
    try {
      result = runCallback(inst, ctx, cb, []);
    } catch (err) {
      drop();
      throw err;
    }
    if (isThenable(result)) return Promise.resolve(result).finally(drop);
    drop();
    return result;
  };

  const static_ = cls ? describeClass(cls) : undefined;
  const callbacks: Callbacks = {};
  for (const method of OPTIONAL_METHODS) {
    const cb = CALLBACK_OF[method];
    if (!static_ || (static_.callbacks as any)[cb]) (callbacks as any)[cb] = forward(cb);
  }
  callbacks.eom = forward('eom') as Callbacks['eom'];
  callbacks.abort = ending('abort') as Callbacks['abort'];
  callbacks.close = ending('close') as Callbacks['close'];
  if (!cls || cls.prototype.negotiate !== Base.prototype.negotiate) {
    callbacks.negotiate = forward('negotiate') as Callbacks['negotiate'];
  }
  return {
    name: opts.name ?? cls?.name ?? (factory.name || 'nodemilter'),
    callbacks,
    actions: static_?.actions,
    steps: static_?.steps,
    noreply: static_?.noreply ?? [],
    symlists: static_?.symlists ?? {},
    decode: static_?.decode ?? {},
  };
}
