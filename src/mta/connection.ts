/**
 * One connection to a milter, from the MTA side: the milter protocol
 * (versions 2 to 6) as sendmail and Postfix speak it, one step at a time.
 * {@link Milters} and the `nodemilter/testing` `MilterClient` are built on it.
 *
 * @module
 */
import * as net from 'net';
import {
  MAX_DATA_SIZE,
  P_HDR_LEADSPC,
  P_NOBODY,
  P_NOCONNECT,
  P_NODATA,
  P_NOEOH,
  P_NOHDRS,
  P_NOHELO,
  P_NOMAIL,
  P_NORCPT,
  P_NOUNKNOWN,
  P_NR_BODY,
  P_NR_CONN,
  P_NR_DATA,
  P_NR_EOH,
  P_NR_HDR,
  P_NR_HELO,
  P_NR_MAIL,
  P_NR_RCPT,
  P_NR_UNKN,
  P_SKIP,
  SMFI_CURR_PROT,
  SMFIF_ALL,
  type MacroStage,
} from '../constants';
import { InvalidArgumentError, MilterStateError, MilterTimeoutError, ProtocolError } from '../errors';
import { parseSocketSpec } from '../socketspec';
import type { Bytes, Family } from '../types';

/* ------------------------------------------------------------------ */
/* Wire constants                                                      */

/** MTA → milter command characters (SMFIC_*). */
export const Command = {
  ABORT: 'A',
  BODY: 'B',
  CONNECT: 'C',
  MACRO: 'D',
  BODYEOB: 'E',
  HELO: 'H',
  QUIT_NC: 'K',
  HEADER: 'L',
  MAIL: 'M',
  EOH: 'N',
  OPTNEG: 'O',
  QUIT: 'Q',
  RCPT: 'R',
  DATA: 'T',
  UNKNOWN: 'U',
} as const;

/** Milter → MTA reply characters (SMFIR_*). */
export const Reply = {
  ADDRCPT: '+',
  DELRCPT: '-',
  ADDRCPT_PAR: '2',
  SHUTDOWN: '4',
  ACCEPT: 'a',
  REPLBODY: 'b',
  CONTINUE: 'c',
  DISCARD: 'd',
  CHGFROM: 'e',
  CONN_FAIL: 'f',
  ADDHEADER: 'h',
  INSHEADER: 'i',
  SETSYMLIST: 'l',
  CHGHEADER: 'm',
  PROGRESS: 'p',
  QUARANTINE: 'q',
  REJECT: 'r',
  SKIP: 's',
  TEMPFAIL: 't',
  REPLYCODE: 'y',
  OPTNEG: 'O',
} as const;

/** The protocol version this client speaks and offers by default. */
export const CLIENT_PROTOCOL_VERSION = 6;
/** Default per-reply timeout, in milliseconds (sendmail's read timeout). */
export const DEFAULT_TIMEOUT = 10_000;
/** Default end-of-message timeout, in milliseconds (sendmail's: 5 minutes). Each progress reply restarts it. */
export const DEFAULT_EOM_TIMEOUT = 300_000;

const SMFIP_MDS_256K = 0x10000000;
const SMFIP_MDS_1M = 0x20000000;

/* ------------------------------------------------------------------ */
/* Public types                                                        */

/** One framed packet: the command or reply character and its data. */
export interface Packet {
  /** The command/reply character, e.g. `'c'`. */
  cmd: string;
  /** The data after the command byte (may be empty). */
  data: Buffer;
}

/** Options of {@link MilterConnection.connect}. */
export interface ConnectionOptions {
  /** Milliseconds to wait for each reply (and for the TCP/unix connection, unless `connectTimeout` is given). Default {@link DEFAULT_TIMEOUT} (10 s). */
  timeout?: number;
  /** Milliseconds to wait for the TCP/unix connection. Default: `timeout`. */
  connectTimeout?: number;
  /** Milliseconds to wait for each reply during end-of-message; a progress reply restarts it. Default {@link DEFAULT_EOM_TIMEOUT} (5 min). */
  eomTimeout?: number;
  /** Protocol version offered in SMFIC_OPTNEG. Default 6. */
  version?: number;
  /** Action flags (SMFIF_*) offered. Default `SMFIF_ALL` (0x1ff: every version 6 action). */
  actions?: number;
  /**
   * Protocol steps (SMFIP_*) offered. Default `SMFI_CURR_PROT` (0x1fffff:
   * every NO*, NR_*, SKIP, RCPT_REJ and HDR_LEADSPC bit of version 6, like
   * a current sendmail; the MDS size bits are not offered).
   */
  steps?: number;
  /** Negotiate inside {@link MilterConnection.connect}. Default true. */
  negotiate?: boolean;
  /**
   * Send events even when the milter negotiated them away (SMFIP_NO*), for
   * protocol tests. A reply is then awaited unless the step is no-reply.
   * Default false.
   */
  sendAll?: boolean;
  /**
   * Send only the macros the milter asked for with setsymlist (at stages
   * where it asked), like an MTA does. Default false: every macro given is
   * sent.
   */
  filterMacros?: boolean;
  /** Largest reply data accepted, in bytes. Default 65535 (raised to 256K/1M when SMFIP_MDS_* was negotiated). */
  maxDataSize?: number;
  /**
   * Largest replacement body (all SMFIR_REPLBODY data of one end of
   * message) accepted, in bytes; more is a ProtocolError (`oversize`) and the
   * connection is closed. Default: no limit.
   */
  maxReplacedBody?: number;
  /** Body chunk size for {@link MilterConnection.body}, at most 65535. Default 65535. */
  chunkSize?: number;
}

/** The outcome of option negotiation (the milter's SMFIC_OPTNEG reply). */
export interface Negotiation {
  /** Protocol version the milter replied with. */
  version: number;
  /** Action flags (SMFIF_*) the milter asked for. */
  actions: number;
  /** Protocol steps (SMFIP_*) the milter asked for. */
  steps: number;
  /** Macro lists the milter asked for (smfi_setsymlist), per stage (SMFIM_*). */
  symlists: Partial<Record<MacroStage, string[]>>;
  /** What this client offered. */
  offered: { version: number; actions: number; steps: number };
  /** The reply's data, as received. */
  raw: Buffer;
}

/** An SMTP reply set by the milter (smfi_setreply / smfi_setmlreply), from an SMFIR_REPLYCODE packet. */
export interface SmtpReply {
  /** The three-digit reply code, e.g. `"550"`. */
  rcode: string;
  /** The enhanced status code of the first line, e.g. `"5.7.1"`, if any. */
  xcode?: string;
  /** The text of every line, without codes, joined with `"\n"`. */
  text: string;
  /** The text of each line, without codes. */
  lines: string[];
  /** The reply exactly as sent (lines separated by CRLF), without the NUL. */
  raw: string;
}

/**
 * What a step ended with:
 * `continue`, `accept`, `reject`, `tempfail`, `discard`, `skip` (body only),
 * `connfail` (SMFIR_CONN_FAIL), `shutdown` (SMFIR_SHUTDOWN, 421);
 * `noreply` when the milter negotiated no reply for the step (SMFIP_NR_*)
 * and none was awaited; `notsent` when it negotiated the step away
 * (SMFIP_NO*) and the event was not sent.
 */
export type ReplyStatus =
  | 'continue'
  | 'accept'
  | 'reject'
  | 'tempfail'
  | 'discard'
  | 'skip'
  | 'connfail'
  | 'shutdown'
  | 'noreply'
  | 'notsent';

/** The name of a protocol step. */
export type StepName = 'connect' | 'helo' | 'envfrom' | 'envrcpt' | 'data' | 'header' | 'eoh' | 'body' | 'eom' | 'unknown';

/** The milter's answer to one step. */
export interface StepResult {
  /** The step. */
  step: StepName;
  /** The outcome. */
  status: ReplyStatus;
  /** The reply character received (`'c'`, `'y'`...), absent for `noreply`/`notsent`. */
  code?: string;
  /** The SMTP reply, when the milter answered with SMFIR_REPLYCODE. */
  reply?: SmtpReply;
  /** How many progress (SMFIR_PROGRESS) packets came before the answer. */
  progress: number;
}

/** The answer to {@link MilterConnection.body}. */
export interface BodyResult extends StepResult {
  step: 'body';
  /** How many chunks were sent. */
  chunksSent: number;
  /** How many chunks the body made. Fewer were sent when the milter answered SKIP or a final status. */
  chunksTotal: number;
}

/** A modification the milter asked for during end-of-message. Every one carries its packet data in `raw`. */
export type EomAction =
  | { type: 'addrcpt'; rcpt: string; raw: Buffer }
  | { type: 'addrcpt_par'; rcpt: string; params: string | undefined; raw: Buffer }
  | { type: 'delrcpt'; rcpt: string; raw: Buffer }
  | { type: 'chgfrom'; sender: string; params: string | undefined; raw: Buffer }
  | { type: 'addheader'; name: string; value: string; valueBytes: Buffer; raw: Buffer }
  | { type: 'insheader'; index: number; name: string; value: string; valueBytes: Buffer; raw: Buffer }
  | { type: 'chgheader'; index: number; name: string; value: string; valueBytes: Buffer; raw: Buffer }
  | { type: 'replbody'; chunk: Buffer; raw: Buffer }
  | { type: 'quarantine'; reason: string; raw: Buffer };

/** The answer to {@link MilterConnection.eom}. */
export interface EomResult extends StepResult {
  step: 'eom';
  /** The final decision (same as `status`). */
  decision: ReplyStatus;
  /** Every modification, in the order received. */
  actions: EomAction[];
  /** The new body (all SMFIR_REPLBODY chunks concatenated), if the milter replaced it. */
  replacedBody?: Buffer;
}

/** The SMTP client's address, for SMFIC_CONNECT. */
export type FamilyArg = Family | '4' | '6' | 'L' | 'U';

/** Macro stage: an SMFIM_* number, a command character (`'C'`, `'H'`, `'M'`, `'R'`, `'T'`, `'N'`, `'E'`...) or a step name. */
export type MacroStageArg = MacroStage | 'connect' | 'helo' | 'envfrom' | 'envrcpt' | 'data' | 'eoh' | 'eom' | string;

/** A whole SMTP transaction for {@link MilterConnection.sendMessage}. */
export interface MessageSpec {
  /**
   * The SMTP client, for SMFIC_CONNECT. Omitted: connect as
   * `localhost [127.0.0.1]:54321` unless this session already sent CONNECT.
   * `null`: do not send CONNECT.
   */
  client?: { hostname?: string; family?: FamilyArg; address?: string; port?: number } | null;
  /** HELO name. Omitted: `localhost` unless HELO was already sent. `null`: do not send HELO. */
  helo?: string | null;
  /** Envelope sender and ESMTP parameters, e.g. `'<a@example.com>'` or `['<a@example.com>', 'SIZE=100']`. */
  from: Bytes | readonly Bytes[];
  /** Recipients, each an address or `[address, ...params]`. */
  rcpt: readonly (Bytes | readonly Bytes[])[];
  /** Headers as the MTA sends them (name, value). Ignored when `message` is given. */
  headers?: readonly (readonly [string, Bytes])[];
  /** Body bytes (CRLF line ends, as an MTA sends). Ignored when `message` is given. */
  body?: Bytes;
  /** A whole RFC 5322 message; split with {@link parseMessage} into headers and a CRLF body. */
  message?: Bytes;
  /** Macros to send before each stage's command (keys: step names, command characters or SMFIM_* numbers). */
  macros?: Partial<Record<string, Record<string, Bytes>>>;
  /** Send SMFIC_QUIT and close at the end. Default false. */
  quit?: boolean;
}

/** What {@link MilterConnection.sendMessage} saw. */
export interface MessageResult {
  /** The negotiation in force. */
  negotiation: Negotiation;
  connect?: StepResult;
  helo?: StepResult;
  envfrom?: StepResult;
  envrcpt: StepResult[];
  data?: StepResult;
  headers: StepResult[];
  eoh?: StepResult;
  body?: BodyResult;
  eom?: EomResult;
  /** The transaction's outcome: the EOM decision, or the status that ended it early (`continue` if it ended by nothing). */
  decision: ReplyStatus;
  /** The step whose answer ended the transaction early, if any. */
  stoppedAt?: StepName;
  /** Whether SMFIC_ABORT was sent because the transaction ended early. */
  aborted: boolean;
  /** The EOM modifications (empty if EOM was not reached). */
  actions: EomAction[];
  /** The replaced body, if any. */
  replacedBody?: Buffer;
}

/* ------------------------------------------------------------------ */
/* Helpers                                                             */

function toBuf(b: Bytes): Buffer {
  if (Buffer.isBuffer(b)) return b;
  if (typeof b === 'string') return Buffer.from(b, 'utf8');
  throw new InvalidArgumentError(`expected a string or Buffer, got ${typeof b}`);
}

function cstr(b: Bytes, what: string): Buffer {
  const buf = toBuf(b);
  if (buf.includes(0)) throw new InvalidArgumentError(`${what} must not contain a NUL byte`);
  return Buffer.concat([buf, Buffer.from([0])]);
}

function u32(n: number): Buffer {
  const b = Buffer.alloc(4);
  b.writeUInt32BE(n >>> 0);
  return b;
}

/** Split NUL-terminated strings; throws on a missing final NUL. */
function splitNul(data: Buffer, what: string): Buffer[] {
  if (data.length === 0 || data[data.length - 1] !== 0) {
    throw new ProtocolError(`${what}: data is not NUL-terminated`, 'truncated');
  }
  const out: Buffer[] = [];
  let start = 0;
  for (let i = 0; i < data.length; i++) {
    if (data[i] === 0) {
      out.push(data.subarray(start, i));
      start = i + 1;
    }
  }
  return out;
}

const STAGE_CHARS: Record<number, string> = { 0: 'C', 1: 'H', 2: 'M', 3: 'R', 4: 'T', 5: 'E', 6: 'N' };
const CHAR_STAGES: Record<string, MacroStage> = { C: 0, H: 1, M: 2, R: 3, T: 4, E: 5, N: 6 };
const NAME_CHARS: Record<string, string> = {
  connect: 'C',
  helo: 'H',
  envfrom: 'M',
  mail: 'M',
  envrcpt: 'R',
  rcpt: 'R',
  data: 'T',
  eoh: 'N',
  eom: 'E',
  body: 'B',
  header: 'L',
  unknown: 'U',
};

function stageChar(stage: MacroStageArg): string {
  if (typeof stage === 'number') {
    const c = STAGE_CHARS[stage];
    if (!c) throw new InvalidArgumentError(`unknown macro stage ${stage}`);
    return c;
  }
  if (/^[0-6]$/.test(stage)) return STAGE_CHARS[Number(stage)];
  if (NAME_CHARS[stage]) return NAME_CHARS[stage];
  if (stage.length === 1) return stage;
  throw new InvalidArgumentError(`unknown macro stage ${JSON.stringify(stage)}`);
}

function stripBraces(name: string): string {
  return name.startsWith('{') && name.endsWith('}') ? name.slice(1, -1) : name;
}

const FAMILY_CHARS: Record<string, string> = {
  inet: '4',
  inet6: '6',
  unix: 'L',
  unknown: 'U',
  '4': '4',
  '6': '6',
  L: 'L',
  U: 'U',
};

/**
 * Parse an SMFIR_REPLYCODE text (`"550 5.7.1 go away"`, or several
 * CRLF-separated lines `"550-5.7.1 a\r\n550 5.7.1 b"`).
 */
export function parseSmtpReply(raw: string): SmtpReply {
  const lineTexts = raw.split('\r\n');
  const lines: string[] = [];
  let rcode = '';
  let xcode: string | undefined;
  lineTexts.forEach((line, i) => {
    const m = /^([0-9]{3})([ -]?)(.*)$/s.exec(line);
    if (!m) throw new ProtocolError(`reply line ${JSON.stringify(line)} does not start with a 3-digit code`, 'malformed');
    if (i === 0) rcode = m[1];
    let text = m[3];
    const x = /^([245]\.[0-9]{1,3}\.[0-9]{1,3})(?: |$)(.*)$/s.exec(text);
    if (x) {
      if (i === 0) xcode = x[1];
      text = x[2];
    }
    lines.push(text);
  });
  const r: SmtpReply = { rcode, text: lines.join('\n'), lines, raw };
  if (xcode !== undefined) r.xcode = xcode;
  return r;
}

/** A header as an MTA sends it: name, and value bytes. */
export type ParsedHeader = [name: string, value: Buffer];

/**
 * Split an RFC 5322 message into headers and body the way an MTA hands them
 * to a milter: the name without trailing blanks; the value is the text after
 * the colon with one leading space (not a tab) removed, as both sendmail and
 * Postfix do (unless `leadingSpace` is true, as with SMFIP_HDR_LEADSPC), folded lines joined with `"\n"` (the continuation
 * lines keep their leading whitespace), and the body with CRLF line ends.
 * Bytes are kept as they are (no charset decoding). The headers end at the
 * first empty line, or at the first line that is neither a header nor a
 * continuation (which then starts the body).
 */
export function parseMessage(message: Bytes, leadingSpace = false): { headers: ParsedHeader[]; body: Buffer } {
  const text = toBuf(message).toString('latin1');
  const headers: [string, string][] = [];
  let pos = 0;
  let bodyStart = text.length;
  while (pos < text.length) {
    let eol = text.indexOf('\n', pos);
    const next = eol < 0 ? text.length : eol + 1;
    if (eol < 0) eol = text.length;
    let line = text.slice(pos, eol);
    if (line.endsWith('\r')) line = line.slice(0, -1);
    if (line === '') {
      bodyStart = next;
      break;
    }
    if ((line[0] === ' ' || line[0] === '\t') && headers.length > 0) {
      headers[headers.length - 1][1] += '\n' + line;
    } else {
      const colon = line.indexOf(':');
      if (colon <= 0 || /[\s]/.test(line.slice(0, colon).trimEnd()) || line[0] === ' ' || line[0] === '\t') {
        bodyStart = pos;
        break;
      }
      headers.push([line.slice(0, colon).trimEnd(), line.slice(colon + 1)]);
    }
    pos = next;
    bodyStart = text.length;
  }
  const body = text.slice(bodyStart).replace(/\r?\n/g, '\r\n');
  return {
    headers: headers.map(([n, v]) => [n, Buffer.from(!leadingSpace && v.startsWith(' ') ? v.slice(1) : v, 'latin1')]),
    body: Buffer.from(body, 'latin1'),
  };
}

const FINAL: Record<string, ReplyStatus> = {
  c: 'continue',
  a: 'accept',
  r: 'reject',
  t: 'tempfail',
  d: 'discard',
  s: 'skip',
  f: 'connfail',
  '4': 'shutdown',
};

const ACTION_CODES = new Set(['+', '2', '-', 'e', 'h', 'i', 'm', 'b', 'q']);

function parseAction(p: Packet): EomAction {
  const what = `SMFIR '${p.cmd}'`;
  const s = (b: Buffer) => b.toString('utf8');
  switch (p.cmd) {
    case '+': {
      const [r] = splitNul(p.data, what);
      return { type: 'addrcpt', rcpt: s(r), raw: p.data };
    }
    case '2': {
      const [r, params] = splitNul(p.data, what);
      return { type: 'addrcpt_par', rcpt: s(r), params: params === undefined ? undefined : s(params), raw: p.data };
    }
    case '-': {
      const [r] = splitNul(p.data, what);
      return { type: 'delrcpt', rcpt: s(r), raw: p.data };
    }
    case 'e': {
      const [f, params] = splitNul(p.data, what);
      return { type: 'chgfrom', sender: s(f), params: params === undefined ? undefined : s(params), raw: p.data };
    }
    case 'h': {
      const parts = splitNul(p.data, what);
      if (parts.length < 2) throw new ProtocolError(`${what}: expected name and value`, 'truncated');
      return { type: 'addheader', name: s(parts[0]), value: s(parts[1]), valueBytes: parts[1], raw: p.data };
    }
    case 'i':
    case 'm': {
      if (p.data.length < 4) throw new ProtocolError(`${what}: missing index`, 'truncated');
      const index = p.data.readUInt32BE(0);
      const parts = splitNul(p.data.subarray(4), what);
      if (parts.length < 2) throw new ProtocolError(`${what}: expected index, name and value`, 'truncated');
      return {
        type: p.cmd === 'i' ? 'insheader' : 'chgheader',
        index,
        name: s(parts[0]),
        value: s(parts[1]),
        valueBytes: parts[1],
        raw: p.data,
      };
    }
    case 'b':
      return { type: 'replbody', chunk: p.data, raw: p.data };
    case 'q': {
      const [r] = splitNul(p.data, what);
      return { type: 'quarantine', reason: s(r), raw: p.data };
    }
    default:
      throw new ProtocolError(`${what} is not a modification`, 'unknown-reply');
  }
}

interface Waiter {
  resolve(p: Packet): void;
  reject(e: Error): void;
  timer: NodeJS.Timeout;
}

/**
 * Open a stream to a milter at a socket spec, or fail with
 * MilterTimeoutError after `timeout` ms, or with the socket's own error
 * (ECONNREFUSED, ENOENT...).
 */
export async function dial(spec: string, timeout: number): Promise<net.Socket> {
  const s = parseSocketSpec(spec);
  let target: net.NetConnectOpts;
  if (s.kind === 'unix') target = { path: s.path };
  else if (s.kind === 'fd') throw new InvalidArgumentError(`cannot connect to ${spec}: fd: specs are for listeners only`);
  else {
    if (s.port === 0) throw new InvalidArgumentError(`cannot connect to ${spec}: port 0`);
    target = { port: s.port, host: s.host ?? (s.kind === 'inet6' ? '::1' : '127.0.0.1'), family: s.kind === 'inet6' ? 6 : 4 };
  }
  const sock = await new Promise<net.Socket>((resolve, reject) => {
    const so = net.createConnection(target);
    const timer = setTimeout(() => {
      so.destroy();
      reject(new MilterTimeoutError(`connecting to ${spec} took longer than ${timeout} ms`, timeout));
    }, timeout);
    so.once('connect', () => {
      clearTimeout(timer);
      so.removeAllListeners('error');
      resolve(so);
    });
    so.once('error', (e) => {
      clearTimeout(timer);
      reject(e);
    });
  });
  sock.setNoDelay(true);
  return sock;
}

/* ------------------------------------------------------------------ */
/* The client                                                          */

/**
 * The MTA side of the milter protocol, versions 2 to 6: connects to a milter,
 * negotiates, sends SMTP events and collects the replies and end-of-message
 * modifications. Works with any milter (libmilter, pymilter, nodemilter).
 *
 * Steps the milter negotiated away (SMFIP_NO*) are not sent (status
 * `notsent`) unless `sendAll` is set; steps it negotiated as no-reply
 * (SMFIP_NR_*) are sent without waiting (status `noreply`). Every method
 * waits for the reply before resolving; calls must not overlap.
 *
 * @example
 * ```ts
 * import { MilterConnection } from 'nodemilter/mta';
 *
 * const c = await MilterConnection.connect('inet:8894@127.0.0.1', { timeout: 5000 });
 * console.log(c.negotiation?.actions.toString(16));
 * await c.macro('connect', { j: 'mx.example.org', '{daemon_name}': 'MTA' });
 * await c.connect('client.example.com', 'inet', '192.0.2.1', 4567);
 * await c.helo('client.example.com');
 * await c.envfrom('<alice@example.com>', 'SIZE=1234');
 * const r = await c.envrcpt('<bob@example.org>');
 * if (r.status === 'reject') console.log(r.reply?.text);
 * await c.data();
 * await c.header('Subject', 'hello');
 * await c.eoh();
 * await c.body('Hi Bob\r\n');
 * const eom = await c.eom();
 * console.log(eom.decision, eom.actions);
 * await c.quit();
 *
 * // or a whole transaction at once, on a new connection:
 * const c2 = await MilterConnection.connect('unix:/run/milter.sock');
 * const res = await c2.sendMessage({
 *   client: { hostname: 'client.example.com', address: '192.0.2.1', port: 4567 },
 *   from: '<a@x>',
 *   rcpt: ['<b@y>'],
 *   message: 'Subject: hi\r\n\r\nbody\r\n',
 *   macros: { connect: { j: 'mx.example.org' }, eom: { i: 'QID123' } },
 *   quit: true,
 * });
 * console.log(res.decision, res.actions, res.replacedBody?.toString());
 * ```
 */
export class MilterConnection {
  /** The negotiated options, once {@link negotiate} has run. */
  negotiation?: Negotiation;
  /** Send events the milter negotiated away (see {@link ConnectionOptions.sendAll}). */
  sendAll: boolean;
  /** Send only macros the milter asked for (see {@link ConnectionOptions.filterMacros}). */
  filterMacros: boolean;
  /** Per-reply timeout in milliseconds. */
  timeout: number;
  /** End-of-message per-reply timeout in milliseconds. */
  eomTimeout: number;

  private readonly sock: net.Socket;
  private readonly opts: Required<Pick<ConnectionOptions, 'version' | 'actions' | 'steps' | 'chunkSize' | 'maxReplacedBody'>>;
  private maxDataSize: number;
  private explicitMaxDataSize: boolean;
  private inbuf: Buffer = Buffer.alloc(0);
  private queue: Packet[] = [];
  private waiter: Waiter | null = null;
  private failure: Error | null = null;
  private ended = false;
  private closeWaiters: (() => void)[] = [];
  private sentConnect = false;
  private sentHelo = false;

  protected constructor(sock: net.Socket, options: ConnectionOptions) {
    this.sock = sock;
    this.timeout = options.timeout ?? DEFAULT_TIMEOUT;
    this.eomTimeout = options.eomTimeout ?? DEFAULT_EOM_TIMEOUT;
    this.sendAll = options.sendAll ?? false;
    this.filterMacros = options.filterMacros ?? false;
    this.explicitMaxDataSize = options.maxDataSize !== undefined;
    this.maxDataSize = options.maxDataSize ?? MAX_DATA_SIZE;
    const chunkSize = options.chunkSize ?? MAX_DATA_SIZE;
    if (!Number.isInteger(chunkSize) || chunkSize < 1 || chunkSize > MAX_DATA_SIZE) {
      throw new InvalidArgumentError(`chunkSize must be 1..${MAX_DATA_SIZE}`);
    }
    this.opts = {
      version: options.version ?? CLIENT_PROTOCOL_VERSION,
      actions: options.actions ?? SMFIF_ALL,
      steps: options.steps ?? SMFI_CURR_PROT,
      chunkSize,
      maxReplacedBody: options.maxReplacedBody ?? Infinity,
    };
    sock.on('data', (d: Buffer) => this.onData(d));
    sock.on('error', (e) => this.fail(new ProtocolError(`connection error: ${e.message}`, 'closed')));
    sock.on('close', () => this.onClose());
  }

  /**
   * Connect to a milter at a socket spec (`unix:/path`, `local:/path`,
   * `inet:PORT@HOST`, `inet:PORT` (127.0.0.1), `inet6:PORT@HOST`,
   * `inet6:PORT` (::1)) and, unless `options.negotiate` is false,
   * negotiate options.
   *
   * @throws InvalidSocketError for a malformed spec, MilterTimeoutError if
   *   the connection is not made in time, the socket's own error (e.g.
   *   ECONNREFUSED) if it fails, ProtocolError if negotiation breaks the protocol.
   */
  static async connect(spec: string, options: ConnectionOptions = {}): Promise<MilterConnection> {
    return MilterConnection.open(spec, options, (sock) => new MilterConnection(sock, options));
  }

  /**
   * Dial `spec` (within `options.connectTimeout`, else `options.timeout`),
   * wrap the socket with `make` and negotiate unless `options.negotiate` is
   * false. Subclasses' `connect` use it.
   */
  protected static async open<T extends MilterConnection>(
    spec: string,
    options: ConnectionOptions,
    make: (sock: net.Socket) => T,
  ): Promise<T> {
    const sock = await dial(spec, options.connectTimeout ?? options.timeout ?? DEFAULT_TIMEOUT);
    const c = make(sock);
    if (options.negotiate !== false) {
      try {
        await c.negotiate();
      } catch (e) {
        c.destroy();
        throw e;
      }
    }
    return c;
  }

  /* ---------------- low level ---------------- */

  /** Whether the connection is closed (by either side). */
  get closed(): boolean {
    return this.ended;
  }

  /** How many received packets wait to be read with {@link readReply}. */
  get pendingReplies(): number {
    return this.queue.length;
  }

  /**
   * Send one packet: 4-byte big-endian length, the command byte, the data.
   * No checks: for protocol tests.
   */
  sendRaw(cmd: string | number, data: Bytes = Buffer.alloc(0)): void {
    const c = typeof cmd === 'number' ? cmd : cmd.charCodeAt(0);
    const d = toBuf(data);
    this.writeFrame(Buffer.concat([u32(d.length + 1), Buffer.from([c & 0xff]), d]));
  }

  /**
   * Write bytes to the socket exactly as given (no framing): for protocol
   * tests that need malformed frames.
   */
  sendBytes(bytes: Buffer): void {
    this.writeFrame(bytes);
  }

  /**
   * Read the next packet the milter sent, whatever it is (progress
   * included), waiting up to `timeout` ms (default: the client's timeout).
   *
   * @throws MilterTimeoutError, or ProtocolError if the connection closed
   *   or a frame was malformed.
   */
  readReply(timeout: number = this.timeout): Promise<Packet> {
    const p = this.queue.shift();
    if (p) return Promise.resolve(p);
    if (this.failure) return Promise.reject(this.failure);
    if (this.waiter) return Promise.reject(new MilterStateError('readReply: a read is already waiting'));
    return new Promise<Packet>((resolve, reject) => {
      const timer = setTimeout(() => {
        this.waiter = null;
        reject(new MilterTimeoutError(`no reply from the milter within ${timeout} ms`, timeout));
      }, timeout);
      this.waiter = { resolve, reject, timer };
    });
  }

  /** Resolve when the connection has closed, or reject with MilterTimeoutError after `timeout` ms. */
  waitClosed(timeout: number = this.timeout): Promise<void> {
    if (this.ended) return Promise.resolve();
    return new Promise<void>((resolve, reject) => {
      const timer = setTimeout(() => {
        this.closeWaiters = this.closeWaiters.filter((f) => f !== done);
        reject(new MilterTimeoutError(`the milter did not close the connection within ${timeout} ms`, timeout));
      }, timeout);
      const done = () => {
        clearTimeout(timer);
        resolve();
      };
      this.closeWaiters.push(done);
    });
  }

  /** Close the socket at once, without SMFIC_QUIT. */
  destroy(): void {
    this.sock.destroy();
  }

  private writeFrame(b: Buffer): void {
    if (this.ended || this.sock.destroyed) {
      throw new ProtocolError('cannot send: the connection is closed', 'closed');
    }
    this.sock.write(b);
  }

  private onData(d: Buffer): void {
    this.inbuf = this.inbuf.length ? Buffer.concat([this.inbuf, d]) : d;
    while (this.inbuf.length >= 4 && !this.failure) {
      const len = this.inbuf.readUInt32BE(0);
      if (len === 0) {
        this.fatal(new ProtocolError('the milter sent a packet of length 0 (no command byte)', 'malformed'));
        return;
      }
      if (len - 1 > this.maxDataSize) {
        this.fatal(
          new ProtocolError(`the milter sent a packet of ${len - 1} data bytes, more than the limit ${this.maxDataSize}`, 'oversize'),
        );
        return;
      }
      if (this.inbuf.length < 4 + len) break;
      const pkt: Packet = {
        cmd: String.fromCharCode(this.inbuf[4]),
        data: Buffer.from(this.inbuf.subarray(5, 4 + len)),
      };
      this.inbuf = this.inbuf.subarray(4 + len);
      this.deliver(pkt);
    }
  }

  private deliver(p: Packet): void {
    const w = this.waiter;
    if (w) {
      this.waiter = null;
      clearTimeout(w.timer);
      w.resolve(p);
    } else this.queue.push(p);
  }

  /** A framing error: the stream cannot be resynchronised. */
  private fatal(e: Error): void {
    this.fail(e);
    this.sock.destroy();
  }

  private fail(e: Error): void {
    if (!this.failure) this.failure = e;
    const w = this.waiter;
    if (w) {
      this.waiter = null;
      clearTimeout(w.timer);
      w.reject(this.failure);
    }
  }

  private onClose(): void {
    this.ended = true;
    if (this.inbuf.length > 0 && !this.failure) {
      this.fail(new ProtocolError(`the connection closed in the middle of a packet (${this.inbuf.length} bytes pending)`, 'truncated'));
    }
    this.fail(new ProtocolError('the milter closed the connection', 'closed'));
    for (const f of this.closeWaiters.splice(0)) f();
  }

  /* ---------------- replies ---------------- */

  /**
   * Wait for a final reply, counting progress packets (each restarts the
   * timer) and collecting modifications when `actions` is given.
   */
  private async awaitFinal(step: StepName, timeout: number, actions?: EomAction[]): Promise<StepResult> {
    let progress = 0;
    let replaced = 0;
    for (;;) {
      let p: Packet;
      try {
        p = await this.readReply(timeout);
      } catch (e) {
        if (e instanceof MilterTimeoutError) {
          throw new MilterTimeoutError(`no reply to ${step} within ${timeout} ms`, timeout);
        }
        if (e instanceof ProtocolError && e.reason === 'closed') {
          throw new ProtocolError(`the milter closed the connection while ${step} awaited a reply`, 'closed');
        }
        throw e;
      }
      if (p.cmd === Reply.PROGRESS) {
        progress++;
        continue;
      }
      if (ACTION_CODES.has(p.cmd)) {
        if (!actions) {
          throw new ProtocolError(`modification '${p.cmd}' received in reply to ${step}, outside end-of-message`, 'unexpected-reply');
        }
        if (p.cmd === Reply.REPLBODY && (replaced += p.data.length) > this.opts.maxReplacedBody) {
          const e = new ProtocolError(`the replacement body is longer than maxReplacedBody (${this.opts.maxReplacedBody} bytes)`, 'oversize');
          this.fatal(e);
          throw e;
        }
        actions.push(parseAction(p));
        continue;
      }
      if (p.cmd === Reply.REPLYCODE) {
        const parts = splitNul(p.data, `SMFIR_REPLYCODE to ${step}`);
        const reply = parseSmtpReply(parts[0].toString('utf8'));
        const status: ReplyStatus | undefined = reply.rcode[0] === '4' ? 'tempfail' : reply.rcode[0] === '5' ? 'reject' : undefined;
        if (!status) throw new ProtocolError(`reply code ${reply.rcode} to ${step} is neither 4xx nor 5xx`, 'malformed');
        return { step, status, code: p.cmd, reply, progress };
      }
      const status = FINAL[p.cmd];
      if (!status) {
        throw new ProtocolError(
          `unknown reply '${p.cmd}' (0x${p.cmd.charCodeAt(0).toString(16)}) to ${step}`,
          'unknown-reply',
        );
      }
      if (status === 'skip' && step !== 'body') {
        throw new ProtocolError(`SMFIR_SKIP in reply to ${step} (only valid for body chunks)`, 'unexpected-reply');
      }
      return { step, status, code: p.cmd, progress };
    }
  }

  /** Decide whether to send a step and whether to wait. */
  private gate(noBit: number, nrBit: number): { send: boolean; wait: boolean } {
    const steps = this.negotiation?.steps ?? 0;
    return { send: this.sendAll || (steps & noBit) === 0, wait: (steps & nrBit) === 0 };
  }

  private async step(step: StepName, noBit: number, nrBit: number, cmd: string, data: Buffer): Promise<StepResult> {
    const g = this.gate(noBit, nrBit);
    if (!g.send) return { step, status: 'notsent', progress: 0 };
    this.sendRaw(cmd, data);
    if (!g.wait) return { step, status: 'noreply', progress: 0 };
    return this.awaitFinal(step, this.timeout);
  }

  /* ---------------- high level ---------------- */

  /**
   * Send SMFIC_OPTNEG (version, actions and steps from the options, or the
   * arguments) and read the milter's answer, including any macro lists it
   * appended. {@link connect} calls this unless `negotiate: false`.
   *
   * @throws ProtocolError when the reply is not SMFIC_OPTNEG, is short, or
   *   asks for actions or steps that were not offered (sendmail refuses
   *   such a milter too).
   */
  async negotiate(offer: { version?: number; actions?: number; steps?: number } = {}): Promise<Negotiation> {
    const offered = {
      version: offer.version ?? this.opts.version,
      actions: offer.actions ?? this.opts.actions,
      steps: offer.steps ?? this.opts.steps,
    };
    this.sendRaw(Command.OPTNEG, Buffer.concat([u32(offered.version), u32(offered.actions), u32(offered.steps)]));
    let p: Packet;
    try {
      p = await this.readReply(this.timeout);
    } catch (e) {
      if (e instanceof ProtocolError && e.reason === 'closed') {
        throw new ProtocolError('the milter closed the connection during option negotiation', 'closed');
      }
      throw e;
    }
    if (p.cmd !== Command.OPTNEG) {
      throw new ProtocolError(`expected an SMFIC_OPTNEG reply, got '${p.cmd}'`, 'unexpected-reply');
    }
    if (p.data.length < 12) throw new ProtocolError(`SMFIC_OPTNEG reply of ${p.data.length} bytes, expected at least 12`, 'truncated');
    const version = p.data.readUInt32BE(0);
    const actions = p.data.readUInt32BE(4);
    const steps = p.data.readUInt32BE(8);
    const symlists: Partial<Record<MacroStage, string[]>> = {};
    let off = 12;
    while (off < p.data.length) {
      if (off + 4 > p.data.length) throw new ProtocolError('SMFIC_OPTNEG reply: truncated macro list stage', 'truncated');
      const stage = p.data.readUInt32BE(off);
      off += 4;
      const nul = p.data.indexOf(0, off);
      if (nul < 0) throw new ProtocolError('SMFIC_OPTNEG reply: macro list is not NUL-terminated', 'truncated');
      const list = p.data.toString('utf8', off, nul).split(' ').filter((x) => x.length > 0);
      off = nul + 1;
      if (stage > 6) throw new ProtocolError(`SMFIC_OPTNEG reply: unknown macro stage ${stage}`, 'malformed');
      symlists[stage as MacroStage] = list;
    }
    if (version < 2 || version > offered.version) {
      throw new ProtocolError(`the milter answered protocol version ${version}, expected 2..${offered.version}`, 'negotiation');
    }
    if (actions & ~offered.actions) {
      throw new ProtocolError(
        `the milter asked for actions 0x${actions.toString(16)}, not all offered (0x${offered.actions.toString(16)})`,
        'negotiation',
      );
    }
    if (steps & ~offered.steps) {
      throw new ProtocolError(
        `the milter asked for steps 0x${steps.toString(16)}, not all offered (0x${offered.steps.toString(16)})`,
        'negotiation',
      );
    }
    if (!this.explicitMaxDataSize) {
      this.maxDataSize = steps & SMFIP_MDS_1M ? 1024 * 1024 - 1 : steps & SMFIP_MDS_256K ? 256 * 1024 - 1 : MAX_DATA_SIZE;
    }
    this.negotiation = { version, actions, steps, symlists, offered, raw: p.data };
    return this.negotiation;
  }

  /**
   * Send macros (SMFIC_MACRO) for a stage. No reply is expected. With
   * `filterMacros`, names the milter did not ask for at that stage are
   * dropped (matching `{name}` and `name` alike).
   */
  async macro(stage: MacroStageArg, macros: Record<string, Bytes>): Promise<void> {
    const c = stageChar(stage);
    let entries = Object.entries(macros);
    const st = CHAR_STAGES[c];
    const wanted = st === undefined ? undefined : this.negotiation?.symlists[st];
    if (this.filterMacros && wanted) {
      const set = new Set(wanted.map(stripBraces));
      entries = entries.filter(([n]) => set.has(stripBraces(n)));
    }
    const parts: Buffer[] = [Buffer.from(c, 'latin1')];
    for (const [n, v] of entries) {
      parts.push(cstr(n, 'macro name'), cstr(v, `macro ${n}`));
    }
    this.sendRaw(Command.MACRO, Buffer.concat(parts));
  }

  /**
   * SMFIC_CONNECT: the SMTP client connected. `family` is `inet`/`4`,
   * `inet6`/`6`, `unix`/`L` (address = socket path) or `unknown`/`U` (no
   * address or port sent).
   */
  async connect(hostname: string, family: FamilyArg = 'inet', address = '127.0.0.1', port = 0): Promise<StepResult> {
    const f = FAMILY_CHARS[family];
    if (!f) throw new InvalidArgumentError(`unknown address family ${JSON.stringify(family)}`);
    if (!Number.isInteger(port) || port < 0 || port > 65535) throw new InvalidArgumentError(`bad port ${port}`);
    const parts = [cstr(hostname, 'hostname'), Buffer.from(f, 'latin1')];
    if (f !== 'U') {
      const pb = Buffer.alloc(2);
      pb.writeUInt16BE(port);
      parts.push(pb, cstr(address, 'address'));
    }
    this.sentConnect = true;
    return this.step('connect', P_NOCONNECT, P_NR_CONN, Command.CONNECT, Buffer.concat(parts));
  }

  /** SMFIC_HELO with the HELO/EHLO argument. */
  async helo(name: Bytes): Promise<StepResult> {
    this.sentHelo = true;
    return this.step('helo', P_NOHELO, P_NR_HELO, Command.HELO, cstr(name, 'helo name'));
  }

  /** SMFIC_MAIL: the sender (with angle brackets, as in SMTP) and ESMTP parameters. */
  async envfrom(sender: Bytes, ...params: Bytes[]): Promise<StepResult> {
    const d = Buffer.concat([sender, ...params].map((a) => cstr(a, 'MAIL argument')));
    return this.step('envfrom', P_NOMAIL, P_NR_MAIL, Command.MAIL, d);
  }

  /** SMFIC_RCPT: one recipient (with angle brackets) and ESMTP parameters. */
  async envrcpt(rcpt: Bytes, ...params: Bytes[]): Promise<StepResult> {
    const d = Buffer.concat([rcpt, ...params].map((a) => cstr(a, 'RCPT argument')));
    return this.step('envrcpt', P_NORCPT, P_NR_RCPT, Command.RCPT, d);
  }

  /** SMFIC_DATA. */
  async data(): Promise<StepResult> {
    if (!this.sendAll && (this.negotiation?.version ?? 6) < 4) return { step: 'data', status: 'notsent', progress: 0 };
    return this.step('data', P_NODATA, P_NR_DATA, Command.DATA, Buffer.alloc(0));
  }

  /** SMFIC_HEADER: one header; the value's bytes go through untouched. */
  async header(name: string, value: Bytes): Promise<StepResult> {
    const d = Buffer.concat([cstr(name, 'header name'), cstr(value, 'header value')]);
    return this.step('header', P_NOHDRS, P_NR_HDR, Command.HEADER, d);
  }

  /** SMFIC_EOH: end of headers. */
  async eoh(): Promise<StepResult> {
    return this.step('eoh', P_NOEOH, P_NR_EOH, Command.EOH, Buffer.alloc(0));
  }

  /**
   * SMFIC_BODY: the body, in chunks of at most `chunkSize` (65535) bytes.
   * Sending stops at the first chunk answered with anything but continue:
   * `skip` (SMFIP_SKIP) or a final status. An empty body sends nothing.
   */
  async body(body: Bytes): Promise<BodyResult> {
    const buf = toBuf(body);
    const size = this.opts.chunkSize;
    const total = Math.ceil(buf.length / size);
    const g = this.gate(P_NOBODY, P_NR_BODY);
    if (!g.send) return { step: 'body', status: 'notsent', progress: 0, chunksSent: 0, chunksTotal: total };
    let last: StepResult = { step: 'body', status: g.wait ? 'continue' : 'noreply', progress: 0 };
    let sent = 0;
    let progress = 0;
    for (let off = 0; off < buf.length; off += size) {
      this.sendRaw(Command.BODY, buf.subarray(off, off + size));
      sent++;
      if (!g.wait) continue;
      last = await this.awaitFinal('body', this.timeout);
      progress += last.progress;
      if (last.status !== 'continue') break;
    }
    return { ...last, step: 'body', progress, chunksSent: sent, chunksTotal: total };
  }

  /**
   * One SMFIC_BODY packet of at most `chunkSize` bytes, for callers that
   * stream a body: the milter's answer (`continue`, `skip`, a final status),
   * `noreply` under SMFIP_NR_BODY, `notsent` under SMFIP_NOBODY.
   */
  async bodyChunk(chunk: Bytes): Promise<StepResult> {
    const buf = toBuf(chunk);
    if (buf.length > this.opts.chunkSize) {
      throw new InvalidArgumentError(`body chunk of ${buf.length} bytes, more than chunkSize ${this.opts.chunkSize}`);
    }
    return this.step('body', P_NOBODY, P_NR_BODY, Command.BODY, buf);
  }

  /**
   * SMFIC_BODYEOB: end of message (with an optional last body chunk, empty
   * by default as MTAs send it). Collects every modification in order until
   * the final decision; each progress reply restarts the `eomTimeout` timer.
   */
  async eom(lastChunk: Bytes = Buffer.alloc(0)): Promise<EomResult> {
    this.sendRaw(Command.BODYEOB, toBuf(lastChunk));
    const actions: EomAction[] = [];
    const r = await this.awaitFinal('eom', this.eomTimeout, actions);
    const bodies = actions.filter((a): a is Extract<EomAction, { type: 'replbody' }> => a.type === 'replbody');
    const res: EomResult = { ...r, step: 'eom', decision: r.status, actions };
    if (bodies.length) res.replacedBody = Buffer.concat(bodies.map((b) => b.chunk));
    return res;
  }

  /** SMFIC_UNKNOWN: an SMTP command the MTA did not know. */
  async unknown(command: Bytes): Promise<StepResult> {
    if (!this.sendAll && (this.negotiation?.version ?? 6) < 3) return { step: 'unknown', status: 'notsent', progress: 0 };
    return this.step('unknown', P_NOUNKNOWN, P_NR_UNKN, Command.UNKNOWN, cstr(command, 'unknown command'));
  }

  /** SMFIC_ABORT: the current message is abandoned (no reply is expected). */
  async abort(): Promise<void> {
    this.sendRaw(Command.ABORT);
  }

  /**
   * SMFIC_QUIT_NC: this SMTP session ends but the milter connection is kept
   * for a new one, which starts again with {@link connect} (no new
   * negotiation). No reply is expected.
   */
  async quitNc(): Promise<void> {
    this.sendRaw(Command.QUIT_NC);
    this.sentConnect = false;
    this.sentHelo = false;
  }

  /**
   * SMFIC_QUIT, then wait (up to the timeout) for the milter to close the
   * connection, and close our end.
   */
  async quit(): Promise<void> {
    if (this.ended) return;
    this.sendRaw(Command.QUIT);
    this.sock.end();
    try {
      await this.waitClosed(this.timeout);
    } finally {
      this.sock.destroy();
    }
  }

  /** Quit if the connection is still open (ignoring errors), then close. Safe to call twice. */
  async close(): Promise<void> {
    if (!this.ended && !this.failure) {
      try {
        await this.quit();
      } catch {
        /* closing anyway */
      }
    }
    this.sock.destroy();
  }

  /**
   * Run a whole SMTP transaction as an MTA would: macros before each stage,
   * CONNECT and HELO (unless already sent or `null`), MAIL, each RCPT,
   * DATA, every header, EOH, the body and end of message. It ends early
   * like an MTA: a non-continue answer to CONNECT/HELO stops; one to MAIL,
   * DATA, a header, EOH or the body stops and sends SMFIC_ABORT; a
   * reject/tempfail of a recipient only drops that recipient (the
   * transaction stops if none is left), while accept/discard/connfail/
   * shutdown from a recipient stop it.
   */
  async sendMessage(msg: MessageSpec): Promise<MessageResult> {
    const negotiation = this.negotiation ?? (await this.negotiate());
    const result: MessageResult = { negotiation, envrcpt: [], headers: [], decision: 'continue', aborted: false, actions: [] };
    const macrosFor = async (stage: string, num: number, ch: string) => {
      const m = msg.macros?.[stage] ?? msg.macros?.[String(num)] ?? msg.macros?.[ch];
      if (m) await this.macro(ch, m);
    };
    const ok = (r: StepResult) => r.status === 'continue' || r.status === 'noreply' || r.status === 'notsent';
    const stop = async (r: StepResult, abort: boolean) => {
      result.decision = r.status;
      result.stoppedAt = r.step;
      if (abort && !this.ended) {
        await this.abort();
        result.aborted = true;
      }
      if (msg.quit) await this.close();
      return result;
    };

    if (msg.client !== null && (msg.client !== undefined || !this.sentConnect)) {
      const cl = msg.client ?? {};
      await macrosFor('connect', 0, 'C');
      result.connect = await this.connect(cl.hostname ?? 'localhost', cl.family ?? 'inet', cl.address ?? '127.0.0.1', cl.port ?? 54321);
      if (!ok(result.connect)) return stop(result.connect, false);
    }
    if (msg.helo !== null && (msg.helo !== undefined || !this.sentHelo)) {
      await macrosFor('helo', 1, 'H');
      result.helo = await this.helo(msg.helo ?? 'localhost');
      if (!ok(result.helo)) return stop(result.helo, false);
    }
    const from = Array.isArray(msg.from) ? (msg.from as Bytes[]) : [msg.from as Bytes];
    await macrosFor('envfrom', 2, 'M');
    result.envfrom = await this.envfrom(from[0], ...from.slice(1));
    if (!ok(result.envfrom)) return stop(result.envfrom, true);
    let accepted = 0;
    let lastRcpt: StepResult | undefined;
    for (const r of msg.rcpt) {
      const args = Array.isArray(r) ? (r as Bytes[]) : [r as Bytes];
      await macrosFor('envrcpt', 3, 'R');
      const res = await this.envrcpt(args[0], ...args.slice(1));
      result.envrcpt.push(res);
      lastRcpt = res;
      if (ok(res)) accepted++;
      else if (res.status !== 'reject' && res.status !== 'tempfail') return stop(res, true);
    }
    if (accepted === 0 && lastRcpt) return stop(lastRcpt, true);

    let headers: (readonly [string, Bytes])[];
    let body: Buffer;
    if (msg.message !== undefined) {
      const parsed = parseMessage(msg.message, (negotiation.steps & P_HDR_LEADSPC) !== 0);
      headers = parsed.headers;
      body = parsed.body;
    } else {
      headers = [...(msg.headers ?? [])];
      body = toBuf(msg.body ?? Buffer.alloc(0));
    }
    await macrosFor('data', 4, 'T');
    result.data = await this.data();
    if (!ok(result.data)) return stop(result.data, true);
    for (const [n, v] of headers) {
      const h = await this.header(n, v);
      result.headers.push(h);
      if (!ok(h)) return stop(h, true);
    }
    await macrosFor('eoh', 6, 'N');
    result.eoh = await this.eoh();
    if (!ok(result.eoh)) return stop(result.eoh, true);
    if (body.length > 0) {
      result.body = await this.body(body);
      if (!ok(result.body) && result.body.status !== 'skip') return stop(result.body, true);
    }
    await macrosFor('eom', 5, 'E');
    result.eom = await this.eom();
    result.decision = result.eom.decision;
    result.actions = result.eom.actions;
    if (result.eom.replacedBody) result.replacedBody = result.eom.replacedBody;
    if (msg.quit) await this.close();
    return result;
  }
}
