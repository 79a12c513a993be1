/**
 * Wiring a {@link Milters} chain into the `smtp-server` package (an
 * optional peer dependency; this module does not load it): the hooks
 * `onConnect`, `onMailFrom`, `onRcptTo`, `onData` and `onClose`, with SMTP
 * replies as Postfix gives them.
 *
 * @module
 */
import * as os from 'os';
import { randomBytes } from 'crypto';
import type { Readable } from 'stream';
import type { ChainSession, MessageOutcome, Milters, Verdict } from './chain';

/** The parts of an `smtp-server` session object the hooks read. */
export interface SmtpServerSession {
  id: string;
  remoteAddress: string;
  remotePort: number;
  clientHostname?: string;
  hostNameAppearsAs?: string;
  localAddress?: string;
  localPort?: number;
  user?: unknown;
  transmissionType?: string;
  secure?: boolean;
  tlsOptions?: { name?: string; standardName?: string; version?: string } | false;
  envelope?: { mailFrom: unknown; rcptTo: unknown[] };
}

/** An `smtp-server` address object (MAIL FROM / RCPT TO). */
export interface SmtpServerAddress {
  address: string;
  args?: Record<string, string | boolean> | false;
}

/** The error an `smtp-server` hook passes to its callback: the text, and the reply code in `responseCode`. */
export interface SmtpReplyError extends Error {
  responseCode: number;
}

/** An `smtp-server` hook's callback: an error refuses the command, a message goes into the success reply. */
export type SmtpServerCallback = (err?: Error | null, message?: string) => void;
type Callback = SmtpServerCallback;

/**
 * The hooks for `new SMTPServer({ ...hooks, ... })`, and
 * `hideENHANCEDSTATUSCODES: true`: the replies carry the milter's own
 * enhanced status code (or Postfix's), which smtp-server must not prefix
 * with one of its own.
 */
export interface SmtpServerHooks {
  /** smtp-server must not add enhanced status codes of its own. */
  hideENHANCEDSTATUSCODES: true;
  /** A new SMTP session: connect to the milters, SMFIC_CONNECT. */
  onConnect(session: SmtpServerSession, callback: SmtpServerCallback): void;
  /** SMFIC_HELO (when the HELO name is new) and SMFIC_MAIL. */
  onMailFrom(address: SmtpServerAddress, session: SmtpServerSession, callback: SmtpServerCallback): void;
  /** SMFIC_RCPT. */
  onRcptTo(address: SmtpServerAddress, session: SmtpServerSession, callback: SmtpServerCallback): void;
  /** The message through the chain, then `deliver`. */
  onData(stream: Readable, session: SmtpServerSession, callback: SmtpServerCallback): void;
  /** The end of the SMTP session: SMFIC_QUIT (or QUIT_NC with reuse). */
  onClose(session: SmtpServerSession): void;
}

/** What {@link smtpServerHooks} does with the mail. */
export interface SmtpServerMilterOptions {
  /**
   * Called for each message the chain lets through (verdict `continue`),
   * with the final envelope and message; quarantined messages come with a
   * non-empty `outcome.quarantine` and are the callee's to hold. Resolve to
   * accept (the string, if any, goes into the 250 reply); throw to refuse
   * (an {@link SmtpReplyError}'s code is used, otherwise 451).
   */
  deliver(outcome: MessageOutcome, session: SmtpServerSession, queueId: string): Promise<string | void>;
  /** This server's name: the `j` macro and the Received header's `by`. Default `os.hostname()`. */
  hostname?: string;
  /** More macro values (`{daemon_name}`, `v`...), sent to milters that ask for them. */
  macros?: Record<string, string>;
  /** Put a Received header first, as Postfix does before its milters see the message. Default true. */
  received?: boolean;
  /** A new queue id (the `i` macro), per message. Default: 10 random hex digits. */
  queueId?: () => string;
  /** Called when a session's chain work fails unexpectedly (the client gets a 451). Default: nothing. */
  onError?: (err: Error, session: SmtpServerSession) => void;
}

/** An error carrying an SMTP reply code for an `smtp-server` callback. */
export function smtpError(code: number, text: string): SmtpReplyError {
  const e = new Error(text) as SmtpReplyError;
  e.responseCode = code;
  return e;
}

/**
 * The verdict as an `smtp-server` callback error: the code, the enhanced
 * status code and the text; a multi-line reply keeps its last line (the
 * hooks' callbacks carry one line).
 */
export function verdictError(v: Verdict): SmtpReplyError {
  const text = v.reply.lines.length > 1 ? v.reply.lines.join(' ') : (v.reply.lines[0] ?? '');
  return smtpError(v.reply.code, v.reply.xcode ? `${v.reply.xcode} ${text}` : text);
}

function params(a: SmtpServerAddress): string[] {
  if (!a.args) return [];
  return Object.entries(a.args).map(([k, v]) => (v === true ? k : `${k}=${v}`));
}

function rfc2822Date(d: Date): string {
  const days = ['Sun', 'Mon', 'Tue', 'Wed', 'Thu', 'Fri', 'Sat'];
  const months = ['Jan', 'Feb', 'Mar', 'Apr', 'May', 'Jun', 'Jul', 'Aug', 'Sep', 'Oct', 'Nov', 'Dec'];
  const p = (n: number) => String(n).padStart(2, '0');
  return `${days[d.getUTCDay()]}, ${p(d.getUTCDate())} ${months[d.getUTCMonth()]} ${d.getUTCFullYear()} ${p(d.getUTCHours())}:${p(d.getUTCMinutes())}:${p(d.getUTCSeconds())} +0000 (UTC)`;
}

/**
 * Hooks that run every SMTP session of an `smtp-server` through a milter
 * chain: CONNECT at `onConnect`, HELO and MAIL at `onMailFrom` (smtp-server
 * has no HELO hook, so a HELO verdict shows at MAIL FROM), RCPT at
 * `onRcptTo`, the message at `onData`, QUIT at `onClose`. Replies follow
 * Postfix: a milter's own reply when it set one, else `550 5.7.1 Command
 * rejected` or `451 4.7.1 Service unavailable - try again later`; a
 * discarded message gets a 250 and is dropped; shutdown answers 421.
 *
 * @example
 * ```ts
 * import * as fs from 'node:fs';
 * import { SMTPServer } from 'smtp-server';
 * import { Milters, smtpServerHooks } from 'nodemilter/mta';
 *
 * const milters = new Milters([{ socket: 'inet:8891@127.0.0.1', defaultAction: 'accept' }]);
 * const server = new SMTPServer({
 *   authOptional: true,
 *   ...smtpServerHooks(milters, {
 *     hostname: 'mx.example.org',
 *     async deliver(outcome, session, id) {
 *       await fs.promises.writeFile(`/var/mail/new/${id}.eml`, await outcome.toBuffer());
 *     },
 *   }),
 * });
 * server.listen(2525);
 * ```
 */
export function smtpServerHooks(milters: Milters, options: SmtpServerMilterOptions): SmtpServerHooks {
  const hostname = options.hostname ?? os.hostname();
  const newId = options.queueId ?? (() => randomBytes(5).toString('hex').toUpperCase());
  const sessions = new Map<string, { chain: Promise<ChainSession>; helo?: string; queueId: string }>();
  const fail = (e: unknown, session: SmtpServerSession, cb: Callback) => {
    options.onError?.(e as Error, session);
    cb(smtpError(451, '4.3.0 Error: milter chain failure'));
  };
  const chainOf = (session: SmtpServerSession) => {
    const s = sessions.get(session.id);
    if (!s) throw new Error(`no milter session for SMTP session ${session.id}`);
    return s;
  };
  const reply = (v: Verdict, cb: Callback) => (v.action === 'continue' || v.action === 'discard' ? cb() : cb(verdictError(v)));

  return {
    hideENHANCEDSTATUSCODES: true,
    onConnect(session, cb) {
      const macros: Record<string, string> = {
        j: hostname,
        '{daemon_name}': hostname,
        v: 'nodemilter',
        ...(session.localAddress ? { '{daemon_addr}': session.localAddress } : {}),
        ...(options.macros ?? {}),
      };
      const chain = milters.session(
        { address: session.remoteAddress, port: session.remotePort, hostname: session.clientHostname ?? `[${session.remoteAddress}]` },
        macros,
      );
      sessions.set(session.id, { chain, queueId: newId() });
      chain
        .then((c) => c.connect())
        .then((v) => reply(v, cb))
        .catch((e) => fail(e, session, cb));
    },

    onMailFrom(address, session, cb) {
      (async () => {
        const s = chainOf(session);
        const c = await s.chain;
        const helo = session.hostNameAppearsAs ?? session.clientHostname ?? '';
        if (s.helo !== helo) {
          s.helo = helo;
          const tls = session.tlsOptions;
          if (tls) {
            if (tls.version) c.macros['{tls_version}'] = tls.version;
            if (tls.standardName ?? tls.name) c.macros['{cipher}'] = (tls.standardName ?? tls.name)!;
          }
          const hv = await c.helo(helo);
          if (hv.action !== 'continue') return reply(hv, cb);
        }
        s.queueId = newId();
        c.macros.i = s.queueId;
        if (session.user !== undefined && session.user !== null) {
          c.macros['{auth_authen}'] = String(session.user);
          c.macros['{auth_type}'] ??= 'PLAIN';
        }
        reply(await c.mail(`<${address.address}>`, params(address)), cb);
      })().catch((e) => fail(e, session, cb));
    },

    onRcptTo(address, session, cb) {
      (async () => {
        const c = await chainOf(session).chain;
        reply(await c.rcpt(`<${address.address}>`, params(address)), cb);
      })().catch((e) => fail(e, session, cb));
    },

    onData(stream, session, cb) {
      (async () => {
        const s = chainOf(session);
        const c = await s.chain;
        const rcpts = (session.envelope?.rcptTo ?? []) as SmtpServerAddress[];
        const prepend =
          options.received === false
            ? []
            : [
                {
                  name: 'Received',
                  value:
                    `from ${s.helo || 'unknown'} (${session.clientHostname ?? 'unknown'} [${session.remoteAddress}])\n` +
                    `\tby ${hostname} (nodemilter) with ${session.transmissionType ?? 'ESMTP'} id ${s.queueId}` +
                    (rcpts.length === 1 ? `\n\tfor <${rcpts[0].address}>` : '') +
                    `; ${rfc2822Date(new Date())}`,
                },
              ];
        const out = await c.message(stream, prepend);
        if ((stream as Readable & { sizeExceeded?: boolean }).sizeExceeded) return cb(smtpError(552, '5.3.4 Error: message file too big'));
        if (out.verdict.action === 'discard') return cb(null, `Ok: queued as ${s.queueId}`);
        if (out.verdict.action !== 'continue') return cb(verdictError(out.verdict));
        try {
          const msg = await options.deliver(out, session, s.queueId);
          cb(null, msg || `Ok: queued as ${s.queueId}`);
        } catch (e) {
          const code = (e as SmtpReplyError).responseCode;
          cb(code ? (e as Error) : smtpError(451, `4.3.0 Error: ${(e as Error).message}`));
        }
      })().catch((e) => {
        stream.resume();
        fail(e, session, cb);
      });
    },

    onClose(session) {
      const s = sessions.get(session.id);
      sessions.delete(session.id);
      s?.chain.then((c) => c.close()).catch((e) => options.onError?.(e as Error, session));
    },
  };
}
