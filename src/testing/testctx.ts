/**
 * TestCtx: an in-process harness that plays the MTA (and the engine) for a
 * milter, with no socket and no libmilter. It negotiates, sends the events
 * of one SMTP connection, records every action the milter takes, and builds
 * the message as an MTA would deliver it after those modifications.
 *
 * @module
 */
import { readFileSync } from 'node:fs';
import {
  ACCEPT, ADDHDRS, ADDRCPT, ADDRCPT_PAR, ALL_OPTS, CHGBODY, CHGFROM, CHGHDRS, CONTINUE, DELRCPT, DISCARD,
  MAX_DATA_SIZE, QUARANTINE, REJECT, SETSYMLIST, SKIP, SMFI_CURR_ACTS, SMFI_CURR_PROT, TEMPFAIL, P_HDR_LEADSPC,
  P_SKIP, M_CONNECT, M_DATA, M_ENVFROM, M_ENVRCPT, M_EOH, M_EOM, M_HELO,
} from '../constants';
import type { MacroStage } from '../constants';
import {
  ActionNotAllowedError, ContextClosedError, DisabledActionError, InvalidArgumentError, MilterError, MilterStateError,
} from '../errors';
import type {
  Bytes, CallbackName, DecodableCallback, Family, HostAddr, MilterContext, MilterDescription, NegotiateOffer,
  NegotiateResult,
} from '../types';
import { Base, describe } from '../base';
import type { MilterFactory } from '../base';
import { MACRO_STAGE_OF, OPTIONAL_CALLBACKS, resolveNegotiation, STEP_BITS } from '../negotiation';
import type { OptionalCallback } from '../negotiation';
import {
  checkStatus, describeStatus, normalizeSymlist, validateEnvelope, validateHeaderIndex, validateHeaderName,
  validateHeaderValue, validateQuarantineReason, validateReply,
} from '../validate';
import type { Reply } from '../validate';
import { applyEnvelopeChanges, applyHeaderEdits, buildMessage } from './apply';
import type { HeaderEdit, RawHeader } from './apply';

/** One step TestCtx sent (or skipped), in order. */
export interface TestStepResult {
  step: CallbackName;
  /** What the MTA acts on: CONTINUE for a step negotiated away or not waited for (no-reply). */
  status: number;
  /** What the callback returned, when it ran. */
  returned?: unknown;
  /** Whether the milter's callback ran. */
  called: boolean;
}

/** A header modification, in the order the milter made it. */
export type HeaderChange =
  | { op: 'add'; name: string; value: string }
  | { op: 'insert'; name: string; value: string; index: number }
  | { op: 'change'; name: string; value: string; index: number }
  | { op: 'delete'; name: string; index: number };

/** A recipient added with addrcpt (params as one string, if any). */
export interface AddedRecipient {
  rcpt: string;
  params?: string;
}

/** Options for a {@link TestCtx}. */
export interface TestCtxOptions {
  /** What the MTA offers at negotiation (default: every action and step). */
  offer?: Partial<NegotiateOffer>;
  /** Macros the MTA knows, per stage (SMFIM_*); see {@link TestCtx.setmacros}. */
  macros?: Partial<Record<MacroStage, Record<string, string>>>;
  /** The milter's name when a factory is given. */
  name?: string;
}

/** Options for {@link TestCtx.feedMessage}. */
export interface FeedOptions {
  /** MAIL FROM, with angle brackets (default `<sender@example.com>`). */
  from?: string;
  /** ESMTP parameters of MAIL FROM. */
  fromParams?: string[];
  /** RCPT TO addresses, with angle brackets (default `['<rcpt@example.com>']`). */
  rcpts?: string[];
  /** Largest body chunk sent to body() (default 65535, as the MTA). */
  chunkSize?: number;
  /** Used if the connection has not been opened yet. */
  hostname?: string;
  family?: Family;
  hostaddr?: HostAddr;
  /** HELO name, used if the connection has not been opened yet. */
  helo?: string;
}

type StoredHeader = RawHeader;
type HeaderOp = HeaderEdit;

let nextId = 1;

/** Macro stages searched by getsymval, latest first. */
const SEARCH_ORDER: MacroStage[] = [M_EOM, M_EOH, M_DATA, M_ENVRCPT, M_ENVFROM, M_HELO, M_CONNECT];
/** Stages whose macros are forgotten when a new message starts (as libmilter does at MAIL). */
const MESSAGE_STAGES: MacroStage[] = [M_ENVFROM, M_ENVRCPT, M_DATA, M_EOH, M_EOM];

const macroKey = (name: string) => (/^\{.+\}$/.test(name) ? name.slice(1, -1) : name);
const text = (value: Bytes) => (typeof value === 'string' ? value : value.toString('utf8'));
const bytes = (value: Bytes) => (typeof value === 'string' ? Buffer.from(value, 'utf8') : Buffer.from(value));

/**
 * An in-process MTA for one SMTP connection. Give it a Base subclass (or a
 * factory, or any {@link MilterDescription}); drive it step by step or feed
 * a whole message; then assert on what it recorded.
 *
 * It behaves as an engine and an MTA would: negotiation follows the
 * description (or its negotiate callback) against the `offer`; steps
 * negotiated away are not sent; no-reply steps run but count as CONTINUE;
 * SKIP from body goes on to eom; getsymval sees only the macros of stages
 * reached so far, filtered by the symlists negotiated; modifications are
 * allowed only inside eom and with their action flag (the same errors as the
 * engines); callback statuses are checked (an invalid one rejects).
 *
 * Recorded per message (reset at each envfrom): {@link headerChanges},
 * {@link addedRecipients}, {@link deletedRecipients}, {@link newSender},
 * {@link replacedBody}, {@link quarantineReason}, {@link progressCount};
 * per connection: {@link results}, {@link reply}, {@link symlists}.
 *
 * @example
 * ```ts
 * const t = new TestCtx(MyMilter);
 * const status = await t.feedMessage('Subject: hi\r\n\r\nbody\r\n', { rcpts: ['<a@example.com>'] });
 * expect(status).toBe(CONTINUE);
 * expect(t.headerChanges).toEqual([{ op: 'add', name: 'X-Seen', value: 'yes' }]);
 * expect(t.resultMessage().toString()).toContain('X-Seen: yes\r\n');
 * await t.close();
 * ```
 */
export class TestCtx implements MilterContext {
  readonly id = nextId++;
  /** The description being driven. */
  readonly description: MilterDescription;
  /** The Base instance serving this connection, once created (when built from a class or factory). */
  milter: Base<any> | undefined;

  actions = 0;
  steps = 0;
  closed = false;

  /** Every step sent, in order, with its status (whole connection). */
  results: TestStepResult[] = [];
  /** The last reply set with setreply. */
  reply: Reply | undefined;
  /** The macro lists in force per stage, after negotiation. */
  symlists: Partial<Record<MacroStage, string[]>> = {};
  /** The status negotiate answered (CONTINUE, ALL_OPTS or REJECT), once negotiated. */
  negotiateStatus: number | undefined;

  /** Header modifications of the current message, in order. */
  headerChanges: HeaderChange[] = [];
  /** Recipients added in the current message. */
  addedRecipients: AddedRecipient[] = [];
  /** Recipients deleted in the current message. */
  deletedRecipients: string[] = [];
  /** The new envelope sender, if chgfrom was called. */
  newSender: { sender: string; params?: string } | undefined;
  /** The replacement body (all replacebody chunks), if any. */
  replacedBody: Buffer | undefined;
  /** The quarantine reason, if quarantine was called. */
  quarantineReason: string | undefined;
  /** How many times progress was called in the current message. */
  progressCount = 0;

  /** The envelope sender of the current message, as sent. */
  sender: string | undefined;
  /** The recipients the milter accepted (envrcpt answered CONTINUE, or was not sent), as sent. */
  recipients: string[] = [];

  #offer: NegotiateOffer;
  #running: CallbackName | undefined;
  #negotiated = false;
  #connected = false;
  #inMessage = false;
  #priv: unknown;
  #macros: Partial<Record<MacroStage, Record<string, string>>> = {};
  #received: Partial<Record<MacroStage, Record<string, string>>> = {};
  #pendingSymlists: Partial<Record<MacroStage, string[]>> = {};
  #headers: StoredHeader[] = [];
  #body: Buffer[] = [];
  #ops: HeaderOp[] = [];

  /**
   * @param milter a Base subclass, a factory function, or a description
   * @param options offer, macros, name
   */
  constructor(milter: MilterFactory | MilterDescription, options: TestCtxOptions = {}) {
    this.#offer = { actions: options.offer?.actions ?? SMFI_CURR_ACTS, steps: options.offer?.steps ?? SMFI_CURR_PROT };
    for (const [stage, values] of Object.entries(options.macros ?? {})) this.setmacros(Number(stage) as MacroStage, values);
    if (typeof milter === 'function') {
      const cls = milter === Base || milter.prototype instanceof Base ? (milter as new () => Base<any>) : undefined;
      const make = cls ? () => new cls() : (milter as () => Base<any>);
      const factory = () => (this.milter = make());
      this.description = describe(factory, { name: options.name ?? milter.name, class: cls as any });
    } else {
      this.description = milter;
    }
  }

  /* ------------------------------------------------------------ test set-up */

  /**
   * Set macros the MTA knows at a stage (SMFIM_*). They reach the milter when
   * that stage's event is sent, filtered by the symlist for the stage if one
   * was negotiated; a new message forgets the message stages' macros, as
   * libmilter does. Braces are optional: `'{auth_authen}'` and
   * `'auth_authen'` are the same macro.
   */
  setmacros(stage: MacroStage, values: Record<string, string>): void {
    const cur = (this.#macros[stage] ??= {});
    for (const [k, v] of Object.entries(values)) cur[macroKey(k)] = v;
  }

  /* ------------------------------------------------------------ driving */

  /**
   * Negotiate (done automatically before the first step if not called).
   * `offer` overrides the constructor's. Returns the negotiate status: with
   * REJECT the connection is closed. Asking for actions or steps the MTA did
   * not offer throws, as the MTA would abort the session.
   */
  async negotiate(offer?: Partial<NegotiateOffer>): Promise<number> {
    this.#open('negotiate');
    if (this.#negotiated) throw new MilterStateError('negotiate: this connection has already negotiated');
    const o: NegotiateOffer = { actions: offer?.actions ?? this.#offer.actions, steps: offer?.steps ?? this.#offer.steps };
    this.#offer = o;
    const desc = this.description;
    let status: number = CONTINUE;
    let actions: number;
    let steps: number;
    if (desc.callbacks.negotiate) {
      let answer: NegotiateResult | number;
      this.#running = 'negotiate';
      try {
        answer = (await desc.callbacks.negotiate(this, { ...o })) as NegotiateResult | number;
      } finally {
        this.#running = undefined;
      }
      const res: NegotiateResult = typeof answer === 'number' ? { status: answer } : answer;
      status = res.status;
      if (status === ALL_OPTS) {
        actions = o.actions;
        steps = P_SKIP;
        for (const cb of OPTIONAL_CALLBACKS) if (!desc.callbacks[cb]) steps |= STEP_BITS[cb].no;
        steps &= o.steps;
      } else if (status === CONTINUE) {
        actions = res.actions ?? o.actions;
        steps = res.steps ?? 0;
        if (actions & ~o.actions || steps & ~o.steps) {
          this.closed = true;
          throw new MilterError(
            `negotiate asked for actions 0x${(actions & ~o.actions).toString(16)} / steps 0x${(steps & ~o.steps).toString(16)} the MTA did not offer: the MTA aborts the session`,
            'ERR_MILTER_NEGOTIATION',
          );
        }
      } else {
        this.negotiateStatus = status;
        this.results.push({ step: 'negotiate', status, returned: answer, called: true });
        this.closed = true;
        return status;
      }
    } else {
      const n = resolveNegotiation(desc, o);
      actions = n.actions;
      steps = n.steps;
      this.#pendingSymlists = Object.fromEntries(Object.entries(n.symlists).map(([k, v]) => [k, [...v!]]));
    }
    this.actions = actions;
    this.steps = steps;
    this.symlists = actions & SETSYMLIST ? this.#pendingSymlists : {};
    this.#negotiated = true;
    this.negotiateStatus = status;
    this.results.push({ step: 'negotiate', status, called: !!desc.callbacks.negotiate });
    return status;
  }

  /** Send connect. Defaults: `localhost`, inet, 127.0.0.1 port 0. */
  connect(hostname = 'localhost', family: Family = 'inet', hostaddr: HostAddr = { address: '127.0.0.1', port: 0 }): Promise<number> {
    this.#connected = true;
    return this.#step('connect', [this.#decoded('connect', hostname), family, hostaddr]);
  }

  /** Send HELO/EHLO. */
  helo(heloname = 'client.example.com'): Promise<number> {
    return this.#step('helo', [this.#decoded('helo', heloname)]);
  }

  /**
   * Send MAIL FROM (starts a message: the per-message records are reset).
   * If the previous message got neither eom nor abort, abort is sent first,
   * as an MTA does when a transaction is reset.
   */
  async envfrom(from: string, ...params: string[]): Promise<number> {
    if (this.#inMessage) await this.abort();
    this.#startMessage();
    this.#inMessage = true;
    this.sender = from;
    return this.#step('envfrom', [from, ...params].map((a) => this.#decoded('envfrom', a)));
  }

  /** Send RCPT TO. A recipient the milter does not reject is kept in {@link recipients}. */
  async envrcpt(to: string, ...params: string[]): Promise<number> {
    const status = await this.#step('envrcpt', [to, ...params].map((a) => this.#decoded('envrcpt', a)));
    if (status !== REJECT && status !== TEMPFAIL) this.recipients.push(to);
    return status;
  }

  /** Send DATA. */
  data(): Promise<number> {
    return this.#step('data', []);
  }

  /**
   * Send one header, as the line `name: value` would arrive (one space after
   * the colon, which the milter sees only with HDR_LEADSPC). Fold with
   * `\n` plus a space or tab. The header becomes part of the message that
   * {@link resultMessage} builds.
   */
  header(name: string, value: Bytes): Promise<number> {
    const raw = Buffer.concat([Buffer.from(' '), bytes(value)]);
    return this.#sendHeader({ name, raw: Buffer.from(raw.toString('latin1').replace(/\r?\n/g, '\r\n'), 'latin1') });
  }

  /** Send end of headers. */
  eoh(): Promise<number> {
    return this.#step('eoh', []);
  }

  /** Send a piece of the body (give CRLF line ends; it becomes part of the message). */
  body(chunk: Bytes): Promise<number> {
    const b = bytes(chunk);
    this.#body.push(b);
    return this.#step('body', [b]);
  }

  /** Send end of message, where the milter may modify it. */
  eom(): Promise<number> {
    this.#inMessage = false;
    return this.#step('eom', []);
  }

  /** Abort the current message (the connection stays open). */
  async abort(): Promise<void> {
    this.#inMessage = false;
    await this.#step('abort', []);
  }

  /** Close the connection: calls close, then every action throws ContextClosedError. */
  async close(): Promise<void> {
    if (this.closed) return;
    try {
      await this.#step('close', []);
    } finally {
      this.closed = true;
    }
  }

  /** Send an unknown SMTP command. */
  unknown(cmd: string): Promise<number> {
    return this.#step('unknown', [this.#decoded('unknown', cmd)]);
  }

  /**
   * Feed a whole RFC 5322 message (a path, a Buffer or a string) as the MTA
   * would: connect and helo if the connection is not open yet, then
   * envfrom, envrcpt per recipient, data, each header, eoh, the body in
   * chunks and eom. Bare LF line ends become CRLF (SMTP delivers CRLF); a
   * leading mbox `From ` line is dropped.
   *
   * Like an MTA it stops at the first status other than CONTINUE and then
   * aborts the message (as sendmail and Postfix do when a transaction ends
   * early), except that a REJECT or TEMPFAIL from envrcpt only refuses that
   * recipient (with no recipient left the message is aborted), and SKIP from
   * body goes on to eom.
   *
   * @returns the status that decided the message (eom's if it got there).
   */
  async feedMessage(message: string | Buffer | { path: string }, options: FeedOptions = {}): Promise<number> {
    const raw = typeof message === 'string' ? Buffer.from(message, 'utf8') : Buffer.isBuffer(message) ? message : readFileSync(message.path);
    const { headers, body } = parseMessage(raw);
    if (!this.#negotiated) {
      const st = await this.negotiate();
      if (st !== CONTINUE && st !== ALL_OPTS) return st;
    }
    if (!this.#connected) {
      let st = await this.connect(options.hostname, options.family, options.hostaddr);
      if (st !== CONTINUE) return st;
      st = await this.helo(options.helo);
      if (st !== CONTINUE) return st;
    }
    const end = async (status: number) => {
      await this.abort();
      return status;
    };
    let st = await this.envfrom(options.from ?? '<sender@example.com>', ...(options.fromParams ?? []));
    if (st !== CONTINUE) return end(st);
    let last = CONTINUE;
    for (const rcpt of options.rcpts ?? ['<rcpt@example.com>']) {
      last = await this.envrcpt(rcpt);
      if (last === ACCEPT || last === DISCARD) return end(last);
    }
    if (this.recipients.length === 0) return end(last);
    if ((st = await this.data()) !== CONTINUE) return end(st);
    for (const h of headers) {
      if ((st = await this.#sendHeader(h)) !== CONTINUE) return end(st);
    }
    if ((st = await this.eoh()) !== CONTINUE) return end(st);
    const size = options.chunkSize ?? MAX_DATA_SIZE;
    for (let off = 0; off < body.length; off += size) {
      st = await this.body(body.subarray(off, off + size));
      if (st === SKIP) {
        this.#body.push(body.subarray(off + size)); // the MTA still delivers the rest
        break;
      }
      if (st !== CONTINUE) return end(st);
    }
    return this.eom();
  }

  /* ------------------------------------------------------------ results */

  /**
   * The message as the MTA would deliver it after the milter's
   * modifications, with CRLF line ends: header changes applied in call order
   * (addheader appends; an index inserts at that position counting from 0
   * among all headers; chgheader's index counts from 1 among headers of that
   * name, deletes with an empty value, and adds the header when there are
   * fewer), then the replaced body if any, else the original. Without
   * HDR_LEADSPC a space is put after the colon of headers the milter added or
   * changed, as the MTA does; with it the value is used as given.
   */
  resultMessage(): Buffer {
    const headers = applyHeaderEdits(this.#headers, this.#ops, { leadingSpace: (this.steps & P_HDR_LEADSPC) !== 0 });
    return buildMessage(headers, this.replacedBody ?? Buffer.concat(this.#body));
  }

  /** The envelope after the milter's changes: the sender (chgfrom's if called) and the recipients, minus deleted, plus added. */
  resultEnvelope(): { sender: string | undefined; recipients: string[] } {
    return applyEnvelopeChanges(
      { sender: this.sender, recipients: this.recipients },
      { newSender: this.newSender, added: this.addedRecipients, deleted: this.deletedRecipients },
    );
  }

  /** The results of one step, in order (e.g. every envrcpt). */
  resultsOf(step: CallbackName): TestStepResult[] {
    return this.results.filter((r) => r.step === step);
  }

  /* ------------------------------------------------------------ MilterContext */

  getsymval(name: string): string | undefined {
    this.#open('getsymval');
    const key = macroKey(name);
    for (const stage of SEARCH_ORDER) {
      const v = this.#received[stage]?.[key];
      if (v !== undefined) return v;
    }
    return undefined;
  }

  setreply(rcode: string, xcode?: string | null, ...lines: string[]): void {
    this.#open('setreply');
    this.reply = validateReply(rcode, xcode, lines);
  }

  setsymlist(stage: MacroStage, macros: string | readonly string[]): void {
    this.#open('setsymlist');
    if (this.#running !== 'negotiate') throw new ActionNotAllowedError('setsymlist is allowed only inside negotiate');
    const names = normalizeSymlist(stage, macros);
    if (this.#pendingSymlists[stage]) throw new InvalidArgumentError(`setsymlist: stage ${stage} already has a macro list`);
    this.#pendingSymlists[stage] = names;
  }

  addheader(name: string, given: Bytes, index?: number): void {
    this.#modify('addheader', ADDHDRS);
    validateHeaderName(name);
    const value = validateHeaderValue(name, given);
    if (index === undefined || index < 0) {
      this.#ops.push({ op: 'add', name, value: bytes(value) });
      this.headerChanges.push({ op: 'add', name, value: text(value) });
    } else {
      validateHeaderIndex(index, 'insert');
      this.#ops.push({ op: 'insert', name, value: bytes(value), index });
      this.headerChanges.push({ op: 'insert', name, value: text(value), index });
    }
  }

  chgheader(name: string, index: number, given: Bytes | null): void {
    this.#modify('chgheader', CHGHDRS);
    validateHeaderName(name);
    validateHeaderIndex(index, 'change');
    if (given === null || given.length === 0) {
      this.#ops.push({ op: 'delete', name, index });
      this.headerChanges.push({ op: 'delete', name, index });
    } else {
      const value = validateHeaderValue(name, given);
      this.#ops.push({ op: 'change', name, value: bytes(value), index });
      this.headerChanges.push({ op: 'change', name, value: text(value), index });
    }
  }

  addrcpt(rcpt: Bytes, params?: Bytes | null): void {
    const withParams = params !== undefined && params !== null && params.length > 0;
    this.#modify('addrcpt', withParams ? ADDRCPT_PAR : ADDRCPT);
    validateEnvelope('recipient', rcpt);
    this.addedRecipients.push(withParams ? { rcpt: text(rcpt), params: text(params) } : { rcpt: text(rcpt) });
  }

  delrcpt(rcpt: Bytes): void {
    this.#modify('delrcpt', DELRCPT);
    validateEnvelope('recipient', rcpt);
    this.deletedRecipients.push(text(rcpt));
  }

  replacebody(chunk: Bytes): void {
    this.#modify('replacebody', CHGBODY);
    this.replacedBody = Buffer.concat([this.replacedBody ?? Buffer.alloc(0), bytes(chunk)]);
  }

  chgfrom(sender: Bytes, params?: Bytes | null): void {
    this.#modify('chgfrom', CHGFROM);
    validateEnvelope('sender', sender, true);
    this.newSender = params ? { sender: text(sender), params: text(params) } : { sender: text(sender) };
  }

  quarantine(reason: string): void {
    this.#modify('quarantine', QUARANTINE);
    validateQuarantineReason(reason);
    this.quarantineReason = reason;
  }

  progress(): void {
    this.#open('progress');
    if (this.#running !== 'eom') throw new ActionNotAllowedError('progress is allowed only inside eom');
    this.progressCount++;
  }

  getpriv<T = unknown>(): T | undefined {
    return this.#priv as T | undefined;
  }

  setpriv(value: unknown): void {
    this.#priv = value;
  }

  /* ------------------------------------------------------------ internals */

  #open(action: string): void {
    if (this.closed) throw new ContextClosedError(`${action}: the connection is closed`);
  }

  #modify(action: string, flag: number): void {
    this.#open(action);
    if (!(this.actions & flag)) {
      throw new DisabledActionError(`${action}: action flag 0x${flag.toString(16)} was not negotiated`, flag);
    }
    if (this.#running !== 'eom') {
      throw new ActionNotAllowedError(`${action} is allowed only inside eom, not ${this.#running ?? 'between callbacks'}`);
    }
  }

  #decoded(cb: DecodableCallback, value: string): Bytes {
    return this.description.decode?.[cb] === 'bytes' ? Buffer.from(value, 'utf8') : value;
  }

  #startMessage(): void {
    this.headerChanges = [];
    this.addedRecipients = [];
    this.deletedRecipients = [];
    this.newSender = undefined;
    this.replacedBody = undefined;
    this.quarantineReason = undefined;
    this.progressCount = 0;
    this.sender = undefined;
    this.recipients = [];
    this.#headers = [];
    this.#body = [];
    this.#ops = [];
    for (const stage of MESSAGE_STAGES) delete this.#received[stage];
  }

  #sendHeader(h: StoredHeader): Promise<number> {
    validateHeaderName(h.name);
    this.#headers.push(h);
    let value = h.raw.toString('latin1').replace(/\r\n/g, '\n');
    if (!(this.steps & P_HDR_LEADSPC) && value.startsWith(' ')) value = value.slice(1);
    const buf = Buffer.from(value, 'latin1');
    return this.#step('header', [h.name, this.description.decode?.header === 'bytes' ? buf : buf.toString('utf8')]);
  }

  async #step(cb: CallbackName, args: unknown[]): Promise<number> {
    this.#open(cb);
    if (!this.#negotiated) {
      const st = await this.negotiate();
      if (st !== CONTINUE && st !== ALL_OPTS) throw new MilterStateError(`${cb}: negotiation answered ${describeStatus(st)}, the connection is refused`);
    }
    const stage = MACRO_STAGE_OF[cb];
    if (stage !== undefined) {
      const all = this.#macros[stage] ?? {};
      const wanted = this.symlists[stage]?.map(macroKey);
      this.#received[stage] = wanted ? Object.fromEntries(Object.entries(all).filter(([k]) => wanted.includes(k))) : { ...all };
    }
    const fn = this.description.callbacks[cb] as ((ctx: MilterContext, ...a: unknown[]) => unknown) | undefined;
    const bits = STEP_BITS[cb as OptionalCallback];
    if (!fn || (bits && this.steps & bits.no)) {
      this.results.push({ step: cb, status: CONTINUE, called: false });
      return CONTINUE;
    }
    this.#running = cb;
    let returned: unknown;
    try {
      returned = await fn(this, ...args);
    } finally {
      this.#running = undefined;
    }
    const noreply = this.description.noreply?.includes(cb) || (bits !== undefined && (this.steps & bits.nr) !== 0);
    const status = noreply ? CONTINUE : checkStatus(cb, returned, this.steps);
    this.results.push({ step: cb, status, returned, called: true });
    return status;
  }
}

/** Split a raw message into headers (name + raw value after the colon) and body, with CRLF line ends. */
function parseMessage(raw: Buffer): { headers: StoredHeader[]; body: Buffer } {
  let s = raw.toString('latin1').replace(/\r?\n/g, '\r\n');
  if (s.startsWith('From ')) s = s.slice(s.indexOf('\r\n') + 2);
  let head: string;
  let body: string;
  if (s.startsWith('\r\n')) {
    head = '';
    body = s.slice(2);
  } else {
    const end = s.indexOf('\r\n\r\n');
    head = end < 0 ? s : s.slice(0, end + 2);
    body = end < 0 ? '' : s.slice(end + 4);
  }
  const headers: StoredHeader[] = [];
  for (const line of head.split('\r\n')) {
    if (line === '') continue;
    if ((line[0] === ' ' || line[0] === '\t') && headers.length > 0) {
      const last = headers[headers.length - 1];
      last.raw = Buffer.concat([last.raw, Buffer.from(`\r\n${line}`, 'latin1')]);
      continue;
    }
    const colon = line.indexOf(':');
    if (colon <= 0) throw new InvalidArgumentError(`feedMessage: header line ${JSON.stringify(line)} has no "name:"`);
    headers.push({ name: line.slice(0, colon).trimEnd(), raw: Buffer.from(line.slice(colon + 1), 'latin1') });
  }
  return { headers, body: Buffer.from(body, 'latin1') };
}
