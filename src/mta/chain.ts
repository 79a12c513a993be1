/**
 * A chain of milters run the way Postfix runs `smtpd_milters`: each SMTP
 * event goes to every milter in order until one answers with anything but
 * continue; the message content goes to each milter in turn, with the
 * previous milters' modifications applied first; one verdict comes out,
 * with the final envelope and message.
 *
 * @module
 */
import { Readable } from 'stream';
import { P_HDR_LEADSPC } from '../constants';
import { InvalidArgumentError, MilterError, MilterStateError } from '../errors';
import type { Bytes, Family } from '../types';
import type { EomAction, MilterConnection, SmtpReply, StepResult } from './connection';
import { HeaderList, applyModifications, readMessage, stripBrackets as strip, type BodySpool, type ChainEnvelope, type ReadMessageOptions } from './message';
import { MACRO_STAGE_CHARS, MACRO_STAGE_NUMBERS, MilterPool, goesOn, type MacroStageName, type MilterOptions } from './milter';

/** What the chain decided about a command or a message. */
export type VerdictAction = 'continue' | 'reject' | 'tempfail' | 'discard' | 'shutdown';

/** The chain's answer to one SMTP step. */
export interface Verdict {
  /**
   * `continue`: go on (at end of message: deliver). `reject` / `tempfail`:
   * refuse the command (5xx / 4xx; at RCPT only that recipient).
   * `discard`: accept the message and drop it. `shutdown`: answer 421 and
   * close the SMTP connection (SMFIR_SHUTDOWN, SMFIR_CONN_FAIL).
   */
  action: VerdictAction;
  /** The SMTP reply to give: the milter's own (smfi_setreply) or Postfix's default for the action. */
  reply: { code: number; xcode?: string; lines: string[] };
  /** The milter that decided, when one did. */
  milter?: string;
  /** Set when the decision is a milter's default action after a failure: the failure. */
  error?: Error;
}

/** The SMTP client, for SMFIC_CONNECT. */
export interface ClientInfo {
  /** Its address (or a unix socket path). */
  address?: string;
  /** Its port. */
  port?: number;
  /** Its host name (`unknown` or `[address]` when it has none). */
  hostname?: string;
  /** Address family. Default `inet` (`inet6` when the address has a colon). */
  family?: Family;
}

/** What {@link ChainSession.message} produced. */
export interface MessageOutcome {
  /** The decision about the message. */
  verdict: Verdict;
  /** The envelope after chgfrom, addrcpt and delrcpt. */
  envelope: ChainEnvelope;
  /** The headers after every milter's edits. */
  headers: HeaderList;
  /** The body (a milter's replacement, if one replaced it). Disposed by {@link ChainSession.close} or the next message. */
  body: BodySpool;
  /** Quarantine reasons (SMFIR_QUARANTINE, or a milter's `quarantine` default action). A quarantined message is held, not delivered. */
  quarantine: string[];
  /** Every milter's modifications, in order. */
  edits: { milter: string; actions: EomAction[] }[];
  /** The whole message as it would be delivered (headers, empty line, body), as a stream. */
  stream(): Readable;
  /** The whole message as one Buffer. */
  toBuffer(): Promise<Buffer>;
}

/** Options of {@link Milters}. */
export interface MiltersOptions {
  /** Where and how message bodies are spooled between milters, and the header size limit. */
  spool?: ReadMessageOptions;
}

const DEFAULT_REPLIES: Record<Exclude<VerdictAction, 'continue' | 'discard'>, { code: number; xcode: string; lines: string[] }> = {
  reject: { code: 550, xcode: '5.7.1', lines: ['Command rejected'] },
  tempfail: { code: 451, xcode: '4.7.1', lines: ['Service unavailable - try again later'] },
  shutdown: { code: 421, xcode: '4.7.0', lines: ['Server closing connection'] },
};

function verdict(action: VerdictAction, reply?: SmtpReply, milter?: string, error?: Error): Verdict {
  let r: Verdict['reply'];
  if (action === 'continue' || action === 'discard') r = { code: 250, xcode: '2.0.0', lines: ['Ok'] };
  else if (reply && (action === 'reject' || action === 'tempfail')) {
    r = { code: Number(reply.rcode), lines: reply.lines };
    if (reply.xcode) r.xcode = reply.xcode;
  } else r = { ...DEFAULT_REPLIES[action], lines: [...DEFAULT_REPLIES[action].lines] };
  const v: Verdict = { action, reply: r };
  if (milter !== undefined) v.milter = milter;
  if (error) v.error = error;
  return v;
}

const CONTINUE = (): Verdict => verdict('continue');

const braces = (n: string) => (n.startsWith('{') && n.endsWith('}') ? n.slice(1, -1) : n);

/**
 * A chain of milters, each with its own pool of connections. One
 * {@link ChainSession} per SMTP session.
 *
 * @example
 * ```ts
 * import { Milters } from 'nodemilter/mta';
 *
 * const milters = new Milters([
 *   { socket: 'inet:8891@127.0.0.1', name: 'opendkim', defaultAction: 'accept' },
 *   { socket: 'unix:/run/nodemilter.sock', commandTimeout: 10_000 },
 * ]);
 * const s = await milters.session({ address: '192.0.2.1', port: 4567, hostname: 'client.example.com' }, { j: 'mx.example.org' });
 * let v = await s.connect();
 * if (v.action === 'continue') v = await s.helo('client.example.com');
 * if (v.action === 'continue') v = await s.mail('<alice@example.com>');
 * if (v.action === 'continue') v = await s.rcpt('<bob@example.org>');
 * if (v.action === 'continue') {
 *   const out = await s.message('Subject: hi\r\n\r\nHello\r\n');
 *   if (out.verdict.action === 'continue') console.log((await out.toBuffer()).toString());
 * }
 * await s.close();
 * await milters.close();
 * ```
 */
export class Milters {
  /** One pool per milter, in chain order. */
  readonly pools: readonly MilterPool[];
  private readonly options: MiltersOptions;

  constructor(milters: readonly (MilterOptions | string)[], options: MiltersOptions = {}) {
    if (!Array.isArray(milters)) throw new InvalidArgumentError('Milters expects a list of milters');
    this.pools = milters.map((m) => new MilterPool(m));
    this.options = options;
  }

  /**
   * Start an SMTP session: connect to every milter (a failed dial applies
   * that milter's default action at {@link ChainSession.connect}).
   * `macros` are the values the chain can send (`j`, `{daemon_name}`,
   * `{daemon_addr}`, `v`, `{auth_authen}`...); the session fills in
   * `_`, `{client_addr}`, `{client_name}`, `{mail_addr}`, `{rcpt_addr}` and
   * the like, and the caller may change {@link ChainSession.macros} at any
   * time (e.g. `i`, the queue id, before each message).
   */
  async session(client: ClientInfo = {}, macros: Record<string, string> = {}): Promise<ChainSession> {
    const s = new ChainSession(this.pools, client, macros, this.options);
    await s.open();
    return s;
  }

  /** Close every idle connection; sessions in progress keep theirs. */
  async close(): Promise<void> {
    await Promise.all(this.pools.map((p) => p.close()));
  }
}

/** A milter's state in a session: `open`, `accepted` (done for this session) or `failed` (its default action applies). */
export type MemberState = 'open' | 'accepted' | 'failed';

class Member {
  conn: MilterConnection | undefined;
  state: MemberState = 'open';
  /** Accepted (or failed with accept) for the current message only. */
  messageDone = false;
  /** MAIL was sent and the message has not ended (EOM or ABORT). */
  inMessage = false;
  error: Error | undefined;
  constructor(readonly pool: MilterPool) {}
  get name(): string {
    return this.pool.options.name;
  }
  get leadingSpace(): boolean {
    return ((this.conn?.negotiation?.steps ?? 0) & P_HDR_LEADSPC) !== 0;
  }
}

/**
 * One SMTP session through a {@link Milters} chain. Methods follow the SMTP
 * dialogue and must not overlap; each resolves with the chain's
 * {@link Verdict} (the message step with a {@link MessageOutcome}).
 * Failures (dial, timeout, protocol) become the failing milter's default
 * action: `accept` drops that milter for the rest of the session, `reject`
 * and `tempfail` answer every later command that way (as Postfix does),
 * `quarantine` lets mail through held.
 */
export class ChainSession {
  /** Macro values sent to the milters that ask for them. Change them at will between steps. */
  readonly macros: Record<string, string>;
  private readonly members: Member[];
  private readonly client: ClientInfo;
  private readonly spool: ReadMessageOptions;
  private envelope: ChainEnvelope | undefined;
  private lastBody: BodySpool | undefined;
  private sessionVerdict: Verdict | undefined;
  /** A discard at MAIL or RCPT: the message is accepted and dropped, whatever comes next. */
  private discarded: Verdict | undefined;
  private quarantined: string[] = [];
  private closed = false;

  /** @internal use {@link Milters.session} */
  constructor(pools: readonly MilterPool[], client: ClientInfo, macros: Record<string, string>, spool: MiltersOptions) {
    this.members = pools.map((p) => new Member(p));
    this.client = client;
    this.spool = spool.spool ?? {};
    const addr = client.address ?? '127.0.0.1';
    const name = client.hostname ?? `[${addr}]`;
    this.macros = {
      _: `${name} [${addr}]`,
      '{client_addr}': addr,
      '{client_name}': name,
      ...(client.port !== undefined ? { '{client_port}': String(client.port) } : {}),
      ...macros,
    };
  }

  /** @internal */
  async open(): Promise<void> {
    await Promise.all(
      this.members.map(async (m) => {
        try {
          m.conn = await m.pool.acquire();
        } catch (e) {
          m.error = e as Error;
        }
      }),
    );
  }

  /** The milters' names and states: `open`, `accepted` (done for this session) or `failed`. */
  get states(): { milter: string; state: MemberState; error?: Error }[] {
    return this.members.map((m) => (m.error ? { milter: m.name, state: m.state, error: m.error } : { milter: m.name, state: m.state }));
  }

  /** SMFIC_CONNECT to every milter (and the failures of {@link Milters.session}'s dials). A non-continue verdict holds for the whole session. */
  async connect(): Promise<Verdict> {
    this.check();
    const addr = this.client.address ?? '127.0.0.1';
    const family = this.client.family ?? (addr.includes(':') ? 'inet6' : addr.startsWith('/') ? 'unix' : 'inet');
    const v = await this.event('connect', 'session', (c) => c.connect(this.macros['{client_name}'], family, addr, this.client.port ?? 0));
    if (v.action !== 'continue') this.sessionVerdict = v;
    return v;
  }

  /** SMFIC_HELO. */
  async helo(name: string): Promise<Verdict> {
    this.check();
    if (this.sessionVerdict) return this.sessionVerdict;
    return this.event('helo', 'session', (c) => c.helo(name));
  }

  /** SMFIC_MAIL: a new message (any unfinished one is aborted first). `sender` with angle brackets. */
  async mail(sender: string, params: readonly string[] = []): Promise<Verdict> {
    this.check();
    if (this.sessionVerdict) return this.sessionVerdict;
    await this.abort();
    this.quarantined = [];
    this.discarded = undefined;
    for (const m of this.members) m.messageDone = false;
    const addr = strip(sender);
    this.macros['{mail_addr}'] = addr;
    this.macros['{mail_host}'] = addr.includes('@') ? addr.slice(addr.lastIndexOf('@') + 1) : '';
    this.macros['{mail_mailer}'] ??= 'smtp';
    this.envelope = { sender, senderParams: [...params], recipients: [] };
    const v = await this.event('mail', 'message', (c, m) => {
      m.inMessage = true;
      return c.envfrom(sender, ...params);
    });
    if (v.action !== 'continue') await this.abort();
    if (v.action === 'discard') this.discarded = v;
    return v;
  }

  /**
   * SMFIC_RCPT: one recipient. A reject or tempfail refuses only this
   * recipient; later milters do not see it. A discard (here or at MAIL)
   * accepts this and later recipients and makes the message a discard
   * without sending it to any milter, as Postfix does.
   */
  async rcpt(address: string, params: readonly string[] = []): Promise<Verdict> {
    this.check();
    if (this.sessionVerdict) return this.sessionVerdict;
    if (!this.envelope) throw new MilterStateError('rcpt() before mail()');
    const addr = strip(address);
    this.macros['{rcpt_addr}'] = addr;
    this.macros['{rcpt_host}'] = addr.includes('@') ? addr.slice(addr.lastIndexOf('@') + 1) : '';
    this.macros['{rcpt_mailer}'] ??= 'smtp';
    if (this.discarded) {
      this.envelope.recipients.push({ address, params: [...params] });
      return this.discarded;
    }
    const v = await this.event('rcpt', 'message', (c) => c.envrcpt(address, ...params));
    if (v.action === 'continue' || v.action === 'discard') this.envelope.recipients.push({ address, params: [...params] });
    if (v.action === 'discard') {
      this.discarded = v;
      await this.abort();
    }
    return v;
  }

  /** SMFIC_UNKNOWN: an SMTP command the server does not know. */
  async unknown(command: string): Promise<Verdict> {
    this.check();
    if (this.sessionVerdict) return this.sessionVerdict;
    return this.event('unknown', 'session', (c) => c.unknown(command));
  }

  /**
   * DATA and the message: SMFIC_DATA to every milter, then the headers,
   * body and end of message to each milter in turn, each seeing the
   * message with the previous milters' modifications applied. The input is
   * read once (bodies beyond the spool's memory limit go to a temporary
   * file). `prepend` headers (a Received: line) go before the message's
   * and, like Postfix's own Received header, are not sent to the milters but
   * count in header indexes (insheader 0 goes before them).
   */
  async message(input: AsyncIterable<Buffer | string> | Bytes, prepend: readonly { name: string; value: string }[] = []): Promise<MessageOutcome> {
    this.check();
    if (!this.envelope) throw new MilterStateError('message() before mail()');
    const envelope = this.envelope;
    this.lastBody?.dispose();
    const read = await readMessage(input, this.spool);
    const headers = new HeaderList([...prepend.map((h) => ({ name: h.name, value: Buffer.from(' ' + h.value, 'latin1'), hidden: true })), ...read.headers.headers]);
    let body: BodySpool = read.body;
    this.lastBody = body;
    const edits: { milter: string; actions: EomAction[] }[] = [];
    const done = (v: Verdict): MessageOutcome => this.outcome(v, envelope, headers, body, edits);
    if (this.sessionVerdict) return done(this.sessionVerdict);
    if (this.discarded) return done(this.discarded);

    let v = await this.event('data', 'message', (c) => c.data());
    if (v.action !== 'continue') {
      await this.abort();
      return done(v);
    }
    for (const m of this.members) {
      if (!this.usable(m, 'message')) continue;
      const c = m.conn!;
      const o = m.pool.options;
      try {
        c.timeout = o.contentTimeout;
        const r = await this.content(m, c, headers, body);
        c.timeout = o.commandTimeout;
        if (r.kind === 'stop') {
          v = this.answer(m, r.result, 'message');
          if (v.action !== 'continue') {
            await this.abort();
            return done(v);
          }
          continue;
        }
        m.inMessage = false;
        const eom = r.result;
        edits.push({ milter: m.name, actions: eom.actions });
        const { replacedBody: replaced, quarantine } = applyModifications(eom.actions, headers, envelope, { leadingSpace: m.leadingSpace, spool: this.spool });
        this.quarantined.push(...quarantine);
        if (replaced) {
          body = replaced;
          this.lastBody.dispose();
          this.lastBody = body;
        }
        v = this.answer(m, eom, 'message');
        if (v.action !== 'continue') {
          await this.abort();
          return done(v);
        }
      } catch (e) {
        const f = this.failed(m, e as Error);
        if (f) {
          await this.abort();
          return done(f);
        }
      }
    }
    return done(CONTINUE());
  }

  /** SMFIC_ABORT to every milter inside a message (RSET, or a message refused before its end). */
  async abort(): Promise<void> {
    for (const m of this.members) {
      if (!m.inMessage) continue;
      m.inMessage = false;
      if (m.conn && m.state !== 'failed' && !m.conn.closed) {
        try {
          await m.conn.abort();
        } catch (e) {
          this.failed(m, e as Error);
        }
      }
    }
  }

  /**
   * End the SMTP session: SMFIC_QUIT (or SMFIC_QUIT_NC and back to the
   * pool with `reuse`), and remove the spooled body. Safe to call twice.
   */
  async close(): Promise<void> {
    if (this.closed) return;
    await this.abort().catch(() => undefined);
    this.closed = true;
    this.lastBody?.dispose();
    await Promise.all(
      this.members.map(async (m) => {
        const c = m.conn;
        m.conn = undefined;
        if (c) await m.pool.giveBack(c, m.state !== 'failed').catch(() => undefined);
      }),
    );
  }

  /* ------------------------------------------------------------ internals */

  private check(): void {
    if (this.closed) throw new MilterStateError('the chain session is closed');
  }

  private usable(m: Member, scope: 'session' | 'message'): boolean {
    if (m.state !== 'open' || !m.conn) return false;
    return scope === 'session' || !m.messageDone;
  }

  /** Send one event to each milter in turn until one stops it. */
  private async event(stage: MacroStageName, scope: 'session' | 'message', send: (c: MilterConnection, m: Member) => Promise<StepResult>): Promise<Verdict> {
    for (const m of this.members) {
      if (m.state === 'failed' && m.pool.options.defaultAction !== 'accept' && m.pool.options.defaultAction !== 'quarantine') {
        return this.defaultVerdict(m);
      }
      if (m.state === 'open' && !m.conn && m.error) {
        const f = this.failed(m, m.error);
        if (f) return f;
        continue;
      }
      if (!this.usable(m, scope)) continue;
      try {
        await this.sendMacros(m, stage);
        const r = await send(m.conn!, m);
        const v = this.answer(m, r, stage === 'connect' || stage === 'helo' ? 'session' : 'message');
        if (v.action !== 'continue') return v;
      } catch (e) {
        const f = this.failed(m, e as Error);
        if (f) return f;
      }
    }
    return CONTINUE();
  }

  /** One milter's answer as a chain verdict; accept takes the milter out for the session or the message. */
  private answer(m: Member, r: StepResult, scope: 'session' | 'message'): Verdict {
    if (goesOn(r)) return CONTINUE();
    switch (r.status) {
      case 'accept':
        if (scope === 'session') m.state = 'accepted';
        else {
          m.messageDone = true;
          if (m.inMessage) {
            m.inMessage = false;
            m.conn?.abort().catch(() => undefined);
          }
        }
        return CONTINUE();
      case 'reject':
      case 'tempfail':
      case 'discard':
        return verdict(r.status, r.reply, m.name);
      case 'shutdown':
      case 'connfail':
        return verdict('shutdown', undefined, m.name);
      default:
        throw new MilterError(`milter ${m.name}: unexpected answer ${r.status}`);
    }
  }

  /** A milter failed: close its connection and apply its default action. Undefined means go on without it. */
  private failed(m: Member, e: Error): Verdict | undefined {
    m.error = e;
    m.state = 'failed';
    m.inMessage = false;
    m.conn?.destroy();
    const a = m.pool.options.defaultAction;
    if (a === 'accept') return undefined;
    if (a === 'quarantine') return undefined;
    return this.defaultVerdict(m);
  }

  private defaultVerdict(m: Member): Verdict {
    return verdict(m.pool.options.defaultAction as 'reject' | 'tempfail', undefined, m.name, m.error);
  }

  /** The macros a milter gets at a stage: its own list (setsymlist) or the configured one, those with a value. */
  private async sendMacros(m: Member, stage: MacroStageName): Promise<void> {
    const c = m.conn!;
    const num = stage === 'unknown' ? undefined : MACRO_STAGE_NUMBERS[stage];
    const asked = num === undefined ? undefined : c.negotiation?.symlists[num];
    const names = asked ?? m.pool.options.macros[stage];
    if (names.length === 0) return;
    const byName = new Map(Object.entries(this.macros).map(([k, v]) => [braces(k), v]));
    const out: Record<string, string> = {};
    for (const n of names) {
      const v = byName.get(braces(n));
      if (v !== undefined) out[n.length > 1 && !n.startsWith('{') ? `{${n}}` : n] = v;
    }
    if (Object.keys(out).length > 0) await c.macro(MACRO_STAGE_CHARS[stage], out);
  }

  /** Headers, end of headers, body and end of message to one milter. */
  private async content(
    m: Member,
    c: MilterConnection,
    headers: HeaderList,
    body: BodySpool,
  ): Promise<{ kind: 'stop'; result: StepResult } | { kind: 'eom'; result: Awaited<ReturnType<MilterConnection['eom']>> }> {
    const lead = m.leadingSpace;
    for (const h of headers.headers) {
      if (h.hidden) continue;
      const r = await c.header(h.name, HeaderList.milterValue(h, lead));
      if (!goesOn(r) || r.status === 'skip') return { kind: 'stop', result: r };
    }
    await this.sendMacros(m, 'eoh');
    const eoh = await c.eoh();
    if (!goesOn(eoh)) return { kind: 'stop', result: eoh };
    for await (const chunk of body.chunksOf(65535)) {
      const r = await c.bodyChunk(chunk);
      if (r.status === 'skip' || r.status === 'notsent') break;
      if (!goesOn(r)) return { kind: 'stop', result: r };
    }
    await this.sendMacros(m, 'eom');
    return { kind: 'eom', result: await c.eom() };
  }

  private outcome(v: Verdict, envelope: ChainEnvelope, headers: HeaderList, body: BodySpool, edits: { milter: string; actions: EomAction[] }[]): MessageOutcome {
    // A milter that failed with defaultAction quarantine holds every later message of the session.
    const failed = this.members.filter((m) => m.state === 'failed' && m.pool.options.defaultAction === 'quarantine');
    const quarantine = [...this.quarantined, ...failed.map((m) => `milter ${m.name} failed: ${m.error?.message ?? 'unknown error'}`)];
    return {
      verdict: v,
      envelope: { sender: envelope.sender, senderParams: [...envelope.senderParams], recipients: envelope.recipients.map((r) => ({ ...r })) },
      headers,
      body,
      quarantine,
      edits,
      stream: () => Readable.from((async function* () {
        yield headers.toBuffer();
        yield Buffer.from('\r\n');
        yield* body.chunksOf(65536);
      })()),
      async toBuffer() {
        return Buffer.concat([headers.toBuffer(), Buffer.from('\r\n'), await body.toBuffer()]);
      },
    };
  }
}
