/**
 * Delivery status notifications (bounces): compose an RFC 3464
 * `multipart/report; report-type=delivery-status` message, to be sent with
 * the null sender `MAIL FROM:<>` to the original envelope sender, e.g.
 * after a failed callback check or to tell a sender what happened to a
 * quarantined message.
 *
 * @module
 */
import { randomBytes } from 'node:crypto';

import { InvalidArgumentError } from '../errors';
import type { Bytes } from '../types';

/** What happened to one recipient (RFC 3464 `Action`). */
export type DsnAction = 'failed' | 'delayed' | 'delivered' | 'relayed' | 'expanded';

/** One per-recipient block of the report. */
export interface DsnRecipient {
  /** The recipient address the report is about (`Final-Recipient: rfc822; ...`). */
  recipient: string;
  /** The recipient as originally given, if it differs (`Original-Recipient`). */
  originalRecipient?: string;
  /** What happened to the message for this recipient (`Action`). */
  action: DsnAction;
  /** The enhanced status code, e.g. `5.1.1` (`Status`). */
  status: string;
  /** The remote server's answer, e.g. `550 5.1.1 No such user` (`Diagnostic-Code: smtp; ...`). */
  diagnostic?: string;
  /** The server that gave it (`Remote-MTA: dns; ...`). */
  remoteMta?: string;
  /** When the last attempt was made. */
  lastAttempt?: Date;
}

/** Options of {@link createDsn}. */
export interface DsnOptions {
  /** This MTA's host name (`Reporting-MTA: dns; ...`); also the default From domain. */
  reportingMta: string;
  /** The original envelope sender: the DSN's `To`. DSNs go only to the MAIL FROM address. */
  sender: string;
  /** The DSN's From. Default `MAILER-DAEMON@<reportingMta>`. */
  from?: string;
  /** The recipients the report is about (at least one). */
  recipients: readonly DsnRecipient[];
  /** Default: `Undelivered Mail Returned to Sender` (or `Delayed Mail` when no recipient failed). */
  subject?: string;
  /** The human-readable first part. Default: a short text listing the recipients and statuses. */
  explanation?: string;
  /** When the original message arrived (`Arrival-Date`). */
  arrivalDate?: Date;
  /** The original ENVID (`Original-Envelope-Id`). */
  envelopeId?: string;
  /** The original message (or only its header section), as a string (UTF-8) or bytes. */
  original?: Bytes;
  /** Return the original's `headers` (text/rfc822-headers, the default) or the `full` message (message/rfc822). */
  returnContent?: 'headers' | 'full';
  /** The DSN's Date (default now). */
  date?: Date;
  /** The DSN's Message-ID (default a random one at reportingMta). */
  messageId?: string;
}

const DAYS = ['Sun', 'Mon', 'Tue', 'Wed', 'Thu', 'Fri', 'Sat'];
const MONTHS = ['Jan', 'Feb', 'Mar', 'Apr', 'May', 'Jun', 'Jul', 'Aug', 'Sep', 'Oct', 'Nov', 'Dec'];

/** An RFC 5322 date in UTC: `Sun, 29 Nov 2026 04:10:00 +0000`. */
export function rfc5322Date(d: Date): string {
  const p = (n: number) => String(n).padStart(2, '0');
  return `${DAYS[d.getUTCDay()]}, ${d.getUTCDate()} ${MONTHS[d.getUTCMonth()]} ${d.getUTCFullYear()} ${p(d.getUTCHours())}:${p(d.getUTCMinutes())}:${p(d.getUTCSeconds())} +0000`;
}

function field(name: string, value: string): string {
  if (/[\r\n]/.test(value)) throw new InvalidArgumentError(`DSN ${name} must be one line, got ${JSON.stringify(value)}`);
  return `${name}: ${value}`;
}

function bareAddress(a: string, what: string): string {
  const s = a.trim().replace(/^<(.*)>$/s, '$1');
  if (s === '' || /[\s<>]/.test(s)) throw new InvalidArgumentError(`DSN ${what} must be an email address, got ${JSON.stringify(a)}`);
  return s;
}

function headerSection(original: Buffer): Buffer {
  const crlf = original.indexOf('\r\n\r\n');
  const lf = original.indexOf('\n\n');
  // Keep the empty line that ends the header section: the CRLF before the
  // next boundary belongs to the boundary, so the last header keeps its own.
  if (crlf >= 0 && (lf < 0 || crlf <= lf)) return original.subarray(0, crlf + 4);
  if (lf >= 0) return original.subarray(0, lf + 2);
  return Buffer.concat([original, Buffer.from('\r\n\r\n')]);
}

function toCrlf(b: Buffer): Buffer {
  return Buffer.from(b.toString('latin1').replace(/\r?\n/g, '\r\n'), 'latin1');
}

/**
 * Compose a DSN (RFC 3464): headers, then a multipart/report with a
 * human-readable text part, the machine-readable `message/delivery-status`
 * part and the original headers (or message). Line ends are CRLF. Send it
 * with `MAIL FROM:<>` to `sender` only.
 *
 * @example
 * ```ts
 * const msg = createDsn({
 *   reportingMta: 'mx1.example.net',
 *   sender: 'alice@example.org',
 *   recipients: [{ recipient: 'bob@example.net', action: 'failed', status: '5.1.1', diagnostic: '550 5.1.1 No such user' }],
 *   original: originalHeaders,
 * });
 * ```
 */
export function createDsn(options: DsnOptions): Buffer {
  const host = options.reportingMta?.trim();
  if (!host || /[\s<>@]/.test(host)) throw new InvalidArgumentError(`DSN reportingMta must be a host name, got ${JSON.stringify(options.reportingMta)}`);
  const sender = bareAddress(options.sender ?? '', 'sender');
  const from = options.from ? bareAddress(options.from, 'from') : `MAILER-DAEMON@${host}`;
  if (!Array.isArray(options.recipients) || options.recipients.length === 0) {
    throw new InvalidArgumentError('DSN needs at least one recipient');
  }
  const actions: DsnAction[] = ['failed', 'delayed', 'delivered', 'relayed', 'expanded'];
  for (const r of options.recipients) {
    if (!actions.includes(r.action)) throw new InvalidArgumentError(`DSN action must be one of ${actions.join(', ')}, got ${JSON.stringify(r.action)}`);
    if (!/^[245]\.\d{1,3}\.\d{1,3}$/.test(r.status)) throw new InvalidArgumentError(`DSN status must look like 5.1.1, got ${JSON.stringify(r.status)}`);
  }
  const anyFailed = options.recipients.some((r) => r.action === 'failed');
  const date = options.date ?? new Date();
  const boundary = `dsn=${randomBytes(12).toString('hex')}/${host}`;
  const messageId = options.messageId ?? `<${Date.now().toString(36)}.${randomBytes(6).toString('hex')}@${host}>`;

  const explanation =
    options.explanation ??
    [
      `This is the mail system at host ${host}.`,
      '',
      anyFailed
        ? 'Your message could not be delivered to one or more recipients.'
        : 'Delivery of your message to one or more recipients is delayed; no action is needed yet.',
      '',
      ...options.recipients.map((r) => `<${bareAddress(r.recipient, 'recipient')}>: ${r.action} (${r.status})${r.diagnostic ? `: ${r.diagnostic}` : ''}`),
    ].join('\n');

  const perMessage = [field('Reporting-MTA', `dns; ${host}`)];
  if (options.envelopeId) perMessage.push(field('Original-Envelope-Id', options.envelopeId));
  if (options.arrivalDate) perMessage.push(field('Arrival-Date', rfc5322Date(options.arrivalDate)));
  const blocks = options.recipients.map((r) => {
    const lines = [];
    if (r.originalRecipient) lines.push(field('Original-Recipient', `rfc822; ${bareAddress(r.originalRecipient, 'originalRecipient')}`));
    lines.push(field('Final-Recipient', `rfc822; ${bareAddress(r.recipient, 'recipient')}`));
    lines.push(field('Action', r.action));
    lines.push(field('Status', r.status));
    if (r.remoteMta) lines.push(field('Remote-MTA', `dns; ${r.remoteMta}`));
    if (r.diagnostic) lines.push(field('Diagnostic-Code', /^[\w-]+;/.test(r.diagnostic) ? r.diagnostic : `smtp; ${r.diagnostic}`));
    if (r.lastAttempt) lines.push(field('Last-Attempt-Date', rfc5322Date(r.lastAttempt)));
    return lines.join('\r\n');
  });

  const text = explanation.replace(/\r?\n/g, '\r\n');
  // eslint-disable-next-line no-control-regex
  const eightBit = /[^\x00-\x7f]/.test(text);
  const headers = [
    field('From', `Mail Delivery System <${from}>`),
    field('To', `<${sender}>`),
    field('Subject', options.subject ?? (anyFailed ? 'Undelivered Mail Returned to Sender' : 'Delayed Mail (still being retried)')),
    field('Date', rfc5322Date(date)),
    field('Message-ID', messageId),
    'Auto-Submitted: auto-replied',
    'MIME-Version: 1.0',
    `Content-Type: multipart/report; report-type=delivery-status;\r\n\tboundary="${boundary}"`,
    '',
    'This is a MIME-encapsulated message.',
    '',
  ];
  const parts: Buffer[] = [
    Buffer.from(headers.join('\r\n') + '\r\n'),
    Buffer.from(
      `--${boundary}\r\nContent-Type: text/plain; charset=utf-8\r\n` +
        `Content-Transfer-Encoding: ${eightBit ? '8bit' : '7bit'}\r\nContent-Description: Notification\r\n\r\n${text}\r\n\r\n`,
      'utf8',
    ),
    Buffer.from(
      `--${boundary}\r\nContent-Type: message/delivery-status\r\nContent-Description: Delivery report\r\n\r\n` +
        `${perMessage.join('\r\n')}\r\n\r\n${blocks.join('\r\n\r\n')}\r\n\r\n`,
    ),
  ];
  if (options.original !== undefined) {
    const orig = toCrlf(Buffer.isBuffer(options.original) ? options.original : Buffer.from(options.original, 'utf8'));
    const full = options.returnContent === 'full';
    const body = full ? orig : headerSection(orig);
    parts.push(
      Buffer.from(
        `--${boundary}\r\nContent-Type: ${full ? 'message/rfc822' : 'text/rfc822-headers'}\r\n` +
          (body.some((b) => b > 0x7f) ? 'Content-Transfer-Encoding: 8bit\r\n' : '') +
          `Content-Description: ${full ? 'Undelivered message' : 'Undelivered message headers'}\r\n\r\n`,
      ),
      body,
      Buffer.from(body.subarray(-2).toString() === '\r\n' ? '' : '\r\n'),
    );
  }
  parts.push(Buffer.from(`--${boundary}--\r\n`));
  return Buffer.concat(parts);
}
