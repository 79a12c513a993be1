/**
 * The rules for what a milter may hand to the MTA: SMTP replies, header
 * names and values, addresses, macro lists and callback statuses. One place,
 * used by Base, the test harness and the engines, so every layer rejects the
 * same values with the same message before libmilter silently would.
 *
 * Every function throws an {@link InvalidArgumentError} (or a subclass) that
 * names the bad value and says what was expected.
 *
 * @module
 */
import { ALL_OPTS, CONTINUE, NOREPLY, SKIP, STATUSES, P_SKIP, statusName } from './constants';
import type { MacroStage } from './constants';
import { InvalidArgumentError, InvalidReplyError, InvalidStatusError } from './errors';
import type { Bytes, CallbackName } from './types';
import { STEP_BITS } from './negotiation';

/** The longest reply line libmilter accepts (MAXREPLYLEN), counted in bytes with its codes. */
export const MAX_REPLY_LINE = 980;
/** The most lines a multi-line reply may have (MAXREPLIES). */
export const MAX_REPLY_LINES = 32;

/** A reply that passed {@link validateReply}. */
export interface Reply {
  rcode: string;
  /** The extended status code, or `null` for none. */
  xcode: string | null;
  lines: string[];
}

function show(value: unknown): string {
  if (Buffer.isBuffer(value)) return `<Buffer ${JSON.stringify(value.toString('latin1'))}>`;
  return typeof value === 'string' ? JSON.stringify(value) : String(value);
}

/**
 * Check an SMTP reply for setreply.
 *
 * - `rcode`: three digits starting with 4 or 5 (`"550"`).
 * - `xcode`: `null`, `undefined` or `""` for none, else `class.subject.detail`
 *   (`"5.7.1"`) whose class digit equals rcode's first digit.
 * - each line: no CR, LF or NUL; at most {@link MAX_REPLY_LINES} lines; each
 *   line as sent (`rcode-xcode text`) at most {@link MAX_REPLY_LINE} bytes.
 * - `%`: libmilter formats the text, so a `%` must be written `%%`. A lone
 *   `%` (any odd run of them) is rejected rather than escaped, because MTAs
 *   differ in whether they show the doubled form, and silently changing the
 *   text would hide that. Write `"100%% sure"` for "100% sure".
 *
 * @returns the reply with `xcode` normalised to `null` when absent.
 * @throws InvalidReplyError naming the bad part.
 */
export function validateReply(rcode: string, xcode: string | null | undefined, lines: readonly string[]): Reply {
  if (typeof rcode !== 'string' || !/^[45][0-9][0-9]$/.test(rcode)) {
    throw new InvalidReplyError(`reply code ${show(rcode)} is invalid: expected three digits starting with 4 or 5, like "550"`);
  }
  let x: string | null = null;
  if (xcode !== undefined && xcode !== null && xcode !== '') {
    if (typeof xcode !== 'string' || !/^[245]\.[0-9]{1,3}\.[0-9]{1,3}$/.test(xcode)) {
      throw new InvalidReplyError(`extended code ${show(xcode)} is invalid: expected class.subject.detail like "5.7.1"`);
    }
    if (xcode[0] !== rcode[0]) {
      throw new InvalidReplyError(`extended code ${show(xcode)} does not match reply code ${show(rcode)}: its first digit must be ${rcode[0]}`);
    }
    x = xcode;
  }
  if (lines.length > MAX_REPLY_LINES) {
    throw new InvalidReplyError(`reply has ${lines.length} lines: at most ${MAX_REPLY_LINES} are allowed`);
  }
  const prefix = rcode.length + 1 + (x ? x.length + 1 : 0);
  lines.forEach((line, i) => {
    const where = lines.length > 1 ? `reply line ${i + 1}` : 'reply text';
    if (typeof line !== 'string') throw new InvalidReplyError(`${where} ${show(line)} is not a string`);
    if (/[\r\n\0]/.test(line)) {
      throw new InvalidReplyError(`${where} ${show(line)} contains CR, LF or NUL: give each line as a separate argument`);
    }
    for (const run of line.match(/%+/g) ?? []) {
      if (run.length % 2 === 1) {
        throw new InvalidReplyError(`${where} ${show(line)} has a lone "%": libmilter needs every "%" doubled ("%%")`);
      }
    }
    const size = prefix + Buffer.byteLength(line);
    if (size > MAX_REPLY_LINE) {
      throw new InvalidReplyError(`${where} is ${size} bytes with its codes: at most ${MAX_REPLY_LINE} are allowed`);
    }
  });
  return { rcode, xcode: x, lines: [...lines] };
}

/**
 * Check a header field name: non-empty printable US-ASCII without `:` or
 * whitespace (RFC 5322 `ftext`).
 */
export function validateHeaderName(name: string): void {
  if (typeof name !== 'string' || name.length === 0) {
    throw new InvalidArgumentError(`header name ${show(name)} is invalid: expected a non-empty string`);
  }
  if (!/^[\x21-\x39\x3b-\x7e]+$/.test(name)) {
    throw new InvalidArgumentError(
      `header name ${show(name)} is invalid: expected printable ASCII without ":", spaces or control characters`,
    );
  }
}

/**
 * Check a header value for addheader, insheader and chgheader, and return it
 * as the MTA must receive it. Both engines, the `nodemilter/milter` module
 * and TestCtx send header values through this one function.
 *
 * - A string or Buffer without NUL.
 * - Folding: milter header values fold with LF alone (`"one\n\ttwo"`); the
 *   MTA turns each LF into CRLF when it writes the message. A CRLF, as
 *   RFC 5322 spells folding, is turned into LF here: Postfix would deliver
 *   it as a bare CR followed by CRLF (`"one\r\r\n\ttwo"`), which breaks the
 *   message and DKIM.
 * - Every line break must be followed by a space or a tab (a folded
 *   continuation): a line that does not start with whitespace would be a
 *   header of its own (header injection), and a trailing line break an empty
 *   line that ends the header section. A CR not followed by LF is rejected
 *   too: no MTA makes a well-formed message of it.
 *
 * @returns the value to send: the input itself when it has no CRLF, else a
 *   copy (of the same type) with each CRLF replaced by LF.
 * @throws InvalidArgumentError naming the header and the bad value.
 */
export function validateHeaderValue<V extends Bytes>(name: string, value: V): V {
  let text: string;
  if (typeof value === 'string') text = value;
  else if (Buffer.isBuffer(value)) text = value.toString('latin1');
  else throw new InvalidArgumentError(`value of header ${show(name)} is ${show(value)}: expected a string or Buffer`);
  if (text.includes('\0')) throw new InvalidArgumentError(`value of header ${show(name)} contains NUL: ${show(value)}`);
  if (!text.includes('\r') && !text.includes('\n')) return value;
  const folded = text.replace(/\r\n/g, '\n');
  if (folded.includes('\r')) {
    throw new InvalidArgumentError(`value of header ${show(name)} contains a CR not followed by LF: ${show(value)}; fold with "\\n\\t"`);
  }
  if (/\n(?![ \t])/.test(folded)) {
    throw new InvalidArgumentError(
      `value of header ${show(name)} has a line break not followed by a space or tab: ${show(value)}; ` +
        'a folded line must start with whitespace, and a value must not end with a line break',
    );
  }
  if (folded === text) return value;
  return (typeof value === 'string' ? folded : Buffer.from(folded, 'latin1')) as V;
}

/**
 * Check a header index: for `change` (chgheader) an integer from 1 (the
 * n-th header of that name); for `insert` (addheader with index) an integer
 * from 0 (position among all headers).
 */
export function validateHeaderIndex(index: number, kind: 'change' | 'insert'): void {
  const min = kind === 'change' ? 1 : 0;
  if (!Number.isInteger(index) || index < min || index > 0x7fffffff) {
    const what = kind === 'change' ? 'counts from 1 among headers of that name' : 'counts from 0 among all headers';
    throw new InvalidArgumentError(`header index ${show(index)} is invalid: expected an integer >= ${min} (it ${what})`);
  }
}

/** Check an envelope address or ESMTP parameter string: non-empty for addresses, no CR, LF or NUL. */
export function validateEnvelope(what: string, value: Bytes, allowEmpty = false): void {
  const text = typeof value === 'string' ? value : Buffer.isBuffer(value) ? value.toString('latin1') : undefined;
  if (text === undefined) throw new InvalidArgumentError(`${what} ${show(value)} is invalid: expected a string or Buffer`);
  if (!allowEmpty && text.length === 0) throw new InvalidArgumentError(`${what} is empty: expected an address like "<user@example.com>"`);
  if (/[\r\n\0]/.test(text)) throw new InvalidArgumentError(`${what} ${show(value)} contains CR, LF or NUL`);
}

/** Check a quarantine reason: non-empty, no CR, LF or NUL. */
export function validateQuarantineReason(reason: string): void {
  if (typeof reason !== 'string' || reason.length === 0 || /[\r\n\0]/.test(reason)) {
    throw new InvalidArgumentError(`quarantine reason ${show(reason)} is invalid: expected a non-empty single line`);
  }
}

/**
 * Check and normalise a macro list for setsymlist: accepts names and
 * space-separated groups of names (`"i {auth_authen}"`), returns one name
 * per element. Rejects an empty list and names with control characters.
 */
export function normalizeSymlist(stage: MacroStage, macros: string | readonly string[]): string[] {
  if (!Number.isInteger(stage) || stage < 0 || stage > 6) {
    throw new InvalidArgumentError(`macro stage ${show(stage)} is invalid: expected one of the SMFIM_* constants (0 to 6)`);
  }
  const names = (typeof macros === 'string' ? [macros] : [...macros]).flatMap((m) => {
    if (typeof m !== 'string') throw new InvalidArgumentError(`macro name ${show(m)} is not a string`);
    return m.split(/\s+/).filter((s) => s.length > 0);
  });
  if (names.length === 0) throw new InvalidArgumentError(`macro list for stage ${stage} is empty: expected at least one name`);
  for (const n of names) {
    if (/[\x00-\x1f\x7f]/.test(n)) throw new InvalidArgumentError(`macro name ${show(n)} contains a control character`);
  }
  return names;
}

/**
 * Check what a callback returned, given the protocol steps in force, and
 * return it as a status number. Engines and the test harness call this
 * before answering the MTA.
 *
 * - abort and close: the value is ignored (CONTINUE is returned).
 * - a callback whose SMFIP_NR_* bit is in `steps` may return anything; the
 *   answer is NOREPLY.
 * - otherwise the value must be a status; SKIP only from body with
 *   SMFIP_SKIP; NOREPLY only with the NR bit; ALL_OPTS never (negotiate
 *   answers are checked by the engine).
 *
 * @throws InvalidStatusError naming the callback and the value.
 */
export function checkStatus(callback: CallbackName, value: unknown, steps: number): number {
  if (callback === 'abort' || callback === 'close') return CONTINUE;
  const bits = STEP_BITS[callback as keyof typeof STEP_BITS];
  if (bits && steps & bits.nr) return NOREPLY;
  if (typeof value !== 'number' || !STATUSES.includes(value)) {
    throw new InvalidStatusError(`${callback} returned ${show(value)}: expected a status such as CONTINUE, REJECT, TEMPFAIL, ACCEPT or DISCARD`);
  }
  if (value === ALL_OPTS) {
    throw new InvalidStatusError(`${callback} returned ALL_OPTS: only negotiate may return it`);
  }
  if (value === SKIP && (callback !== 'body' || !(steps & P_SKIP))) {
    throw new InvalidStatusError(
      callback === 'body'
        ? 'body returned SKIP but SMFIP_SKIP was not negotiated'
        : `${callback} returned SKIP: only body may return it`,
    );
  }
  if (value === NOREPLY) {
    throw new InvalidStatusError(`${callback} returned NOREPLY but its SMFIP_NR_* step was not negotiated: the MTA would wait forever`);
  }
  return value;
}

/** The name of a status for messages: `REJECT`, or the number if unknown. */
export function describeStatus(value: unknown): string {
  return typeof value === 'number' ? statusName(value) ?? String(value) : show(value);
}
