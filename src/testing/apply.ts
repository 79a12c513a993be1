/**
 * Applying a milter's end-of-message modifications to a message and its
 * envelope, as an MTA does. One implementation serves {@link TestCtx}
 * (`resultMessage`, `resultEnvelope`), the `milter-test` CLI and tests that
 * drive a milter with {@link MilterClient}.
 *
 * @module
 */
import { InvalidArgumentError } from '../errors';
import type { Bytes } from '../types';
import type { EomAction } from './client';
import { parseMessage } from './client';

/** A header as it stands in a message: its name, and every byte after the colon (leading space and CRLF folding kept). */
export interface RawHeader {
  name: string;
  raw: Buffer;
}

/**
 * A header modification as the milter sent it. `value` is the value's bytes
 * as given to addheader/insheader/chgheader (folded lines joined with LF).
 */
export type HeaderEdit =
  | { op: 'add'; name: string; value: Buffer }
  | { op: 'insert'; name: string; value: Buffer; index: number }
  | { op: 'change'; name: string; value: Buffer; index: number }
  | { op: 'delete'; name: string; index: number };

/** Options of {@link applyHeaderEdits} and {@link applyActions}. */
export interface ApplyOptions {
  /**
   * Whether SMFIP_HDR_LEADSPC was negotiated: then values are put after the
   * colon exactly as given. Without it (the default) the MTA puts one space
   * after the colon, as sendmail and Postfix do.
   */
  leadingSpace?: boolean;
}

/** An envelope: the sender and the recipients, with angle brackets as in SMTP. */
export interface Envelope {
  sender: string | undefined;
  recipients: string[];
}

/** Envelope changes made at end of message. */
export interface EnvelopeChanges {
  /** The new sender (chgfrom). */
  newSender?: { sender: string; params?: string };
  /** Recipients added (addrcpt / addrcpt_par). */
  added?: readonly { rcpt: string; params?: string }[];
  /** Recipients deleted (delrcpt). */
  deleted?: readonly string[];
}

/** What {@link applyActions} produced. */
export interface AppliedMessage {
  /** The whole message after the modifications, CRLF line ends. */
  message: Buffer;
  /** Its headers. */
  headers: RawHeader[];
  /** Its body (the replaced body, if the milter replaced it). */
  body: Buffer;
  /** The envelope after chgfrom/addrcpt/delrcpt. */
  envelope: Envelope;
  /** The header edits, in order. */
  headerEdits: HeaderEdit[];
  /** The quarantine reason, if the milter quarantined the message. */
  quarantine?: string;
}

const toBuf = (b: Bytes) => (typeof b === 'string' ? Buffer.from(b, 'utf8') : Buffer.from(b));
const crlf = (b: Buffer) => Buffer.from(b.toString('latin1').replace(/\r?\n/g, '\r\n'), 'latin1');
/**
 * A header value from a milter as Postfix 3.7 (and sendmail 8.17) writes it,
 * measured behind both: each LF becomes CRLF and nothing else is removed, so
 * a CRLF the milter sent comes out as CR CR LF and a bare CR stays; a line
 * break not followed by a space or tab gets a tab after it (Postfix's
 * choice; sendmail puts a space), so the next line stays a continuation.
 * nodemilter's own milters send neither: validateHeaderValue turns CRLF into
 * LF and refuses the rest.
 */
const asPostfixWrites = (b: Buffer) => Buffer.from(b.toString('latin1').replace(/\n(?![ \t])/g, '\n\t').replace(/\n/g, '\r\n'), 'latin1');

/**
 * Split a message into {@link RawHeader}s and a CRLF body with the same rules
 * as {@link parseMessage} (what {@link MilterClient.sendMessage} sends), but
 * keeping each header's raw bytes after the colon.
 */
export function splitRawMessage(message: Bytes): { headers: RawHeader[]; body: Buffer } {
  const { headers, body } = parseMessage(message, true);
  return { headers: headers.map(([name, value]) => ({ name, raw: crlf(value) })), body };
}

/**
 * Apply header edits in order, as an MTA does: `add` appends; `insert`
 * puts the header at `index` counting from 0 among all headers (at the end
 * if there are fewer); `change` replaces the `index`-th (from 1) header of
 * that name, case-insensitively, or appends the header when there are fewer;
 * `delete` removes it (nothing when there are fewer). Values are written as
 * Postfix writes them: each LF becomes CRLF (a CRLF in the value becomes
 * CR CR LF, as Postfix delivers it), and a line break not followed by a
 * space or tab gets a tab; without `leadingSpace` a space is put before each
 * new value.
 * Returns new headers; the input is not changed.
 */
export function applyHeaderEdits(headers: readonly RawHeader[], edits: readonly HeaderEdit[], options: ApplyOptions = {}): RawHeader[] {
  const out = headers.map((h) => ({ ...h }));
  const rawOf = (value: Buffer) => (options.leadingSpace ? asPostfixWrites(value) : Buffer.concat([Buffer.from(' '), asPostfixWrites(value)]));
  const nth = (name: string, index: number) => {
    let seen = 0;
    const lower = name.toLowerCase();
    return out.findIndex((h) => h.name.toLowerCase() === lower && ++seen === index);
  };
  for (const e of edits) {
    if (e.op === 'add') out.push({ name: e.name, raw: rawOf(e.value) });
    else if (e.op === 'insert') out.splice(Math.min(e.index, out.length), 0, { name: e.name, raw: rawOf(e.value) });
    else {
      const at = nth(e.name, e.index);
      if (e.op === 'delete') {
        if (at >= 0) out.splice(at, 1);
      } else if (at >= 0) out[at] = { name: out[at].name, raw: rawOf(e.value) };
      else out.push({ name: e.name, raw: rawOf(e.value) });
    }
  }
  return out;
}

/** Put headers and a body together: `name:raw` CRLF per header, an empty line, the body. */
export function buildMessage(headers: readonly RawHeader[], body: Bytes): Buffer {
  const parts: Buffer[] = [];
  for (const h of headers) parts.push(Buffer.from(`${h.name}:`, 'latin1'), h.raw, Buffer.from('\r\n'));
  parts.push(Buffer.from('\r\n'), toBuf(body));
  return Buffer.concat(parts);
}

/**
 * The envelope after end-of-message changes: chgfrom's sender if any; the
 * recipients minus the deleted ones (compared exactly, as sent), plus the added ones.
 */
export function applyEnvelopeChanges(envelope: Envelope, changes: EnvelopeChanges): Envelope {
  const deleted = new Set(changes.deleted ?? []);
  return {
    sender: changes.newSender?.sender ?? envelope.sender,
    recipients: [...envelope.recipients.filter((r) => !deleted.has(r)), ...(changes.added ?? []).map((a) => a.rcpt)],
  };
}

/** The header edits among {@link MilterClient} end-of-message actions (chgheader with an empty value is a delete). */
export function headerEditsOf(actions: readonly EomAction[]): HeaderEdit[] {
  const edits: HeaderEdit[] = [];
  for (const a of actions) {
    if (a.type === 'addheader') edits.push({ op: 'add', name: a.name, value: a.valueBytes });
    else if (a.type === 'insheader') edits.push({ op: 'insert', name: a.name, value: a.valueBytes, index: a.index });
    else if (a.type === 'chgheader') {
      edits.push(a.valueBytes.length === 0 ? { op: 'delete', name: a.name, index: a.index } : { op: 'change', name: a.name, value: a.valueBytes, index: a.index });
    }
  }
  return edits;
}

/**
 * Apply {@link MilterClient} end-of-message actions (`EomResult.actions`) to
 * the message that was sent and its envelope, as the MTA would deliver it.
 *
 * @param message the whole message as sent (split with the rules of {@link parseMessage})
 * @param actions the modifications, in the order received
 * @param envelope the envelope as the milter accepted it (recipients it rejected left out)
 *
 * @example
 * ```ts
 * import { P_HDR_LEADSPC } from 'nodemilter';
 * import { MilterClient, applyActions } from 'nodemilter/testing';
 *
 * const c = await MilterClient.connect('inet:8894@127.0.0.1');
 * const message = 'Subject: hi\r\n\r\nbody\r\n';
 * const r = await c.sendMessage({ from: '<a@example.com>', rcpt: ['<b@example.org>'], message, quit: true });
 * const out = applyActions(message, r.actions, { sender: '<a@example.com>', recipients: ['<b@example.org>'] }, {
 *   leadingSpace: (r.negotiation.steps & P_HDR_LEADSPC) !== 0,
 * });
 * console.log(out.message.toString(), out.envelope.recipients);
 * ```
 */
export function applyActions(
  message: Bytes,
  actions: readonly EomAction[],
  envelope: Envelope = { sender: undefined, recipients: [] },
  options: ApplyOptions = {},
): AppliedMessage {
  const { headers, body } = splitRawMessage(message);
  const headerEdits = headerEditsOf(actions);
  const changes: { newSender?: { sender: string; params?: string }; added: { rcpt: string; params?: string }[]; deleted: string[] } = {
    added: [],
    deleted: [],
  };
  let replaced: Buffer[] | undefined;
  let quarantine: string | undefined;
  for (const a of actions) {
    switch (a.type) {
      case 'addrcpt':
        changes.added.push({ rcpt: a.rcpt });
        break;
      case 'addrcpt_par':
        changes.added.push(a.params ? { rcpt: a.rcpt, params: a.params } : { rcpt: a.rcpt });
        break;
      case 'delrcpt':
        changes.deleted.push(a.rcpt);
        break;
      case 'chgfrom':
        changes.newSender = a.params ? { sender: a.sender, params: a.params } : { sender: a.sender };
        break;
      case 'replbody':
        (replaced ??= []).push(a.chunk);
        break;
      case 'quarantine':
        quarantine = a.reason;
        break;
      case 'addheader':
      case 'insheader':
      case 'chgheader':
        break;
      default:
        throw new InvalidArgumentError(`applyActions: unknown action ${JSON.stringify((a as { type: unknown }).type)}`);
    }
  }
  const outHeaders = applyHeaderEdits(headers, headerEdits, options);
  const outBody = replaced ? Buffer.concat(replaced) : body;
  const result: AppliedMessage = {
    message: buildMessage(outHeaders, outBody),
    headers: outHeaders,
    body: outBody,
    envelope: applyEnvelopeChanges(envelope, changes),
    headerEdits,
  };
  if (quarantine !== undefined) result.quarantine = quarantine;
  return result;
}
