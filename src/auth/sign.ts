/**
 * DKIM signing (RFC 6376; rsa-sha256, and ed25519-sha256 per RFC 8463) over
 * the message bytes as the MTA will deliver them. The body is hashed as it
 * arrives; the signature itself is made on libuv's thread pool
 * (`crypto.sign` with a callback), so one milter process keeps serving its
 * other sessions while a key signs.
 *
 * @module
 */
import { createHash, createPrivateKey, sign as cryptoSign } from 'node:crypto';
import type { KeyObject } from 'node:crypto';
import { domainToASCII } from 'node:url';

import { InvalidArgumentError, MilterError } from '../errors';
import type { Bytes } from '../types';
import { BodyHasher, canonicalHeader, parseCanonicalization } from './canon';
import type { CanonAlgorithm, Canonicalization } from './canon';
import { headerFields } from './headers';
import type { HeaderField } from './headers';
import type { SigningKey } from './keys';
import type { MessageInput } from './mailauth';

/** Options of {@link dkimSign} and {@link DkimSigner}. */
export interface DkimSignOptions {
  /** `header/body` canonicalization: `relaxed/relaxed` (default), `simple/simple`, `relaxed/simple`, `simple/relaxed` (a lone `simple` or `relaxed` has a simple body). */
  canonicalization?: string;
  /**
   * Header field names to sign (case does not matter; must include From).
   * Every field of a listed name that the message has is signed, the lowest
   * first; a name the message lacks is not listed in `h=` (no oversigning).
   * Default {@link DEFAULT_SIGNED_HEADERS}, which never includes Received.
   */
  headerList?: string[];
  /**
   * Header field names to list once more in `h=` than the message has them
   * (OpenDKIM's OversignHeaders, e.g. `['From']`): the extra entry signs
   * "no such field", so a field of that name added later, above the signed
   * ones, breaks the signature (RFC 6376 §5.4.2, §8.15). The fields of these
   * names are signed too, listed in `headerList` or not. Default none.
   */
  oversign?: string[];
  /** The `t=` time (default: when {@link DkimSigner.sign} runs). */
  signTime?: Date;
  /** Seconds until the signature expires (`x=`); default none. */
  expireAfter?: number;
}

/**
 * The header fields signed by default (mailauth's default list, which this
 * module used before it signed by itself): the originator and recipient
 * fields, Subject, Date, Message-ID, the MIME fields, the Resent-* fields,
 * threading and List-* fields, BIMI-Selector. Never Received, which
 * every hop adds.
 */
export const DEFAULT_SIGNED_HEADERS: readonly string[] = Object.freeze([
  'From', 'Sender', 'Reply-To', 'Subject', 'Date', 'Message-ID', 'To', 'Cc', 'MIME-Version', 'Content-Type',
  'Content-Transfer-Encoding', 'Content-ID', 'Content-Description', 'Resent-Date', 'Resent-From', 'Resent-Sender',
  'Resent-To', 'Resent-Cc', 'Resent-Message-ID', 'In-Reply-To', 'References', 'List-Id', 'List-Help',
  'List-Unsubscribe', 'List-Subscribe', 'List-Post', 'List-Owner', 'List-Archive', 'BIMI-Selector',
]);

/** A signing failure for one key (a bad key, an unusable message). */
export class DkimSignError extends MilterError {
  constructor(message: string) {
    super(message, 'ERR_MILTER_DKIM_SIGN');
  }
}

/** Longest folded line of a DKIM-Signature we write (RFC 5322 recommends 78). */
const LINE = 78;
const HEADER_NAME = /^[\x21-\x39\x3b-\x7e]+$/;

/**
 * Where the header block of `head` ends: [end of the last field's line
 * (after its LF), start of the body], or undefined while no blank line has
 * come. Searches from `from` (a blank line can span two pieces).
 */
function headerEnd(head: string, from: number): [number, number] | undefined {
  if (head.startsWith('\n')) return [0, 1];
  if (head.startsWith('\r\n')) return [0, 2];
  const lf = head.indexOf('\n\n', from);
  const crlf = head.indexOf('\n\r\n', from);
  if (lf >= 0 && (crlf < 0 || lf < crlf)) return [lf + 1, lf + 2];
  if (crlf >= 0) return [crlf + 1, crlf + 3];
  return undefined;
}

/** `crypto.sign` on the thread pool. */
function signAsync(algorithm: string | null, data: Buffer, key: KeyObject): Promise<Buffer> {
  return new Promise((resolve, reject) => cryptoSign(algorithm, data, key, (err, sig) => (err ? reject(err) : resolve(sig))));
}

/**
 * The `b=` value (base64) for a signature: `signedFields` are the signed
 * header fields already canonicalized (each with its CRLF, in `h=` order),
 * `unsigned` the DKIM-Signature field as it will be written but with an
 * empty `b=` (folded, no final CRLF). rsa-sha256 signs the data with
 * SHA-256; ed25519-sha256 signs its SHA-256 digest (RFC 8463 §3). Runs on
 * the thread pool.
 */
export async function signHeaderBlock(signedFields: string, unsigned: string, canon: CanonAlgorithm, type: 'rsa' | 'ed25519', key: KeyObject): Promise<string> {
  // The signature field is hashed last, canonicalized, without its CRLF (RFC 6376 §3.7).
  const data = Buffer.from(signedFields + canonicalHeader(unsigned, canon).slice(0, -2), 'latin1');
  const sig = type === 'rsa' ? await signAsync('sha256', data, key) : await signAsync(null, createHash('sha256').update(data).digest(), key);
  return sig.toString('base64');
}

/**
 * Signs one message, fed as it arrives: header fields with {@link header}
 * (a milter's header callback) or the raw message with {@link write}; body
 * pieces with {@link body}; then {@link sign} once with the keys. Only the
 * header fields are kept; the body is hashed piece by piece, so a signing
 * milter needs no copy of the message. A bad header line is reported by
 * {@link sign}, which rejects with a {@link DkimSignError} naming it.
 *
 * @example
 * ```ts
 * // envfrom: this.message.signer = new DkimSigner({ canonicalization: 'relaxed/simple' });
 * // header(name, value): this.message.signer.header(name, value, (this.steps & P_HDR_LEADSPC) !== 0);
 * // body(chunk): this.message.signer.body(chunk);
 * // eom:
 * insertOnTop(this, await this.message.signer.sign(table.keysFor(from)));
 * ```
 */
export class DkimSigner {
  readonly #canon: Canonicalization;
  readonly #c: string;
  readonly #names: Set<string>;
  readonly #oversign: string[];
  readonly #signTime: Date | undefined;
  readonly #expireAfter: number | undefined;
  readonly #bodyHash: BodyHasher;
  /** Header fields as delivered (`Name: value`, CRLF folds, no final CRLF). */
  readonly #fields: string[] = [];
  /** write(): the header block so far, until its blank line (then undefined). */
  #head: string | undefined = '';
  /** The first bad header line, reported by sign(). */
  #error: DkimSignError | undefined;
  #signed = false;

  /** Throws InvalidArgumentError on bad options. */
  constructor(options: DkimSignOptions = {}) {
    this.#c = options.canonicalization ?? 'relaxed/relaxed';
    this.#canon = parseCanonicalization(this.#c);
    if (options.expireAfter !== undefined && !(Number.isInteger(options.expireAfter) && options.expireAfter > 0)) {
      throw new InvalidArgumentError(`DKIM expireAfter ${JSON.stringify(options.expireAfter)} is invalid: expected whole seconds > 0`);
    }
    this.#expireAfter = options.expireAfter;
    const list = options.headerList ?? DEFAULT_SIGNED_HEADERS;
    const over = options.oversign ?? [];
    for (const [what, names] of [['headerList', list], ['oversign', over]] as const) {
      for (const n of names) if (!HEADER_NAME.test(n)) throw new InvalidArgumentError(`DKIM ${what} entry ${JSON.stringify(n)} is not a header field name`);
    }
    this.#names = new Set(list.map((n) => n.toLowerCase()));
    if (!this.#names.has('from')) throw new InvalidArgumentError(`DKIM headerList ${JSON.stringify(list)} lacks From, which every signature must cover (RFC 6376 §5.4)`);
    this.#oversign = over.filter((n, i) => over.findIndex((m) => m.toLowerCase() === n.toLowerCase()) === i);
    for (const n of this.#oversign) this.#names.add(n.toLowerCase());
    this.#signTime = options.signTime;
    if (this.#signTime && Number.isNaN(this.#signTime.getTime())) throw new InvalidArgumentError('DKIM signTime is an invalid Date');
    this.#bodyHash = new BodyHasher(this.#canon.body);
  }

  #check(what: string): void {
    if (this.#signed) throw new DkimSignError(`DkimSigner.${what} after sign()`);
  }

  /**
   * One header field as a milter's header callback got it: folds as LF or
   * CRLF; with `leadingSpace` (SMFIP_HDR_LEADSPC negotiated) the value is
   * what follows the colon, else the MTA puts one space after it.
   */
  header(name: string, value: Bytes, leadingSpace = false): void {
    this.#check('header');
    if (!HEADER_NAME.test(name)) this.#error ??= new DkimSignError(`header field name ${JSON.stringify(name)} is invalid: expected printable ASCII without a colon`);
    const v = (typeof value === 'string' ? Buffer.from(value, 'utf8') : Buffer.from(value)).toString('latin1').replace(/\r?\n/g, '\r\n');
    this.#fields.push(`${name}:${leadingSpace ? '' : ' '}${v}`);
  }

  /** A piece of the body (after the header block). */
  body(chunk: Buffer | string): void {
    this.#check('body');
    this.#bodyHash.update(chunk);
  }

  /** A piece of the raw message (header fields, blank line, body), for a message that was not split into callbacks. */
  write(chunk: Buffer | string): void {
    this.#check('write');
    if (this.#head === undefined) return this.body(chunk);
    const from = Math.max(0, this.#head.length - 2);
    this.#head += typeof chunk === 'string' ? Buffer.from(chunk, 'utf8').toString('latin1') : chunk.toString('latin1');
    const end = headerEnd(this.#head, from);
    if (!end) return;
    const head = this.#head;
    this.#head = undefined;
    this.#parseHead(head.slice(0, end[0]));
    if (end[1] < head.length) this.#bodyHash.update(head.slice(end[1]));
  }

  #parseHead(text: string): void {
    for (const line of text.split(/\r?\n/)) {
      if (line === '') continue;
      if (line.charCodeAt(0) === 0x20 || line.charCodeAt(0) === 0x09) {
        if (this.#fields.length) this.#fields[this.#fields.length - 1] += `\r\n${line}`;
        else this.#error ??= new DkimSignError(`the message starts with a continuation line: ${JSON.stringify(line.slice(0, 40))}`);
        continue;
      }
      const colon = line.indexOf(':');
      if (colon > 0 && HEADER_NAME.test(line.slice(0, colon).replace(/[ \t]+$/, ''))) this.#fields.push(line);
      else this.#error ??= new DkimSignError(`not a header field: ${JSON.stringify(line.slice(0, 60))}`);
    }
  }

  /**
   * The DKIM-Signature header text, one signature per key in key order
   * (`DKIM-Signature: ...\r\n` each, folded with CRLF), or `''` without
   * keys. Rejects with {@link DkimSignError} when a header line was bad,
   * the message has no From field, or a key cannot sign.
   */
  async sign(keys: readonly SigningKey[]): Promise<string> {
    this.#check('sign');
    if (this.#head !== undefined && this.#head !== '') {
      // write() never saw the blank line: it was all header.
      const head = this.#head;
      this.#head = undefined;
      this.#parseHead(head);
    }
    this.#signed = true;
    if (this.#error) throw this.#error;
    if (!keys.length) return '';
    const signed: string[] = [];
    const names: string[] = [];
    for (let i = this.#fields.length - 1; i >= 0; i--) {
      const f = this.#fields[i];
      const name = f.slice(0, f.indexOf(':')).replace(/[ \t]+$/, '');
      if (!this.#names.has(name.toLowerCase())) continue;
      signed.push(canonicalHeader(f, this.#canon.header));
      names.push(name);
    }
    if (!names.some((n) => n.toLowerCase() === 'from')) throw new DkimSignError('the message has no From header field, which a DKIM signature must cover (RFC 6376 §5.4)');
    // An oversigned name adds nothing to the hashed data: the verifier finds no field for it.
    names.push(...this.#oversign);
    const bh = this.#bodyHash.digest();
    const t = Math.floor((this.#signTime ?? new Date()).getTime() / 1000);
    const headerData = signed.join('');
    const sigs = await Promise.all(keys.map((k) => this.#signOne(k, names, bh, t, headerData)));
    return sigs.map((s) => `${s}\r\n`).join('');
  }

  async #signOne(key: SigningKey, names: string[], bh: string, t: number, headerData: string): Promise<string> {
    const where = `${key.selector}._domainkey.${key.domain}`;
    const d = domainToASCII(key.domain);
    if (!d) throw new DkimSignError(`DKIM signing with ${where} failed: the domain is not a valid domain name`);
    let keyObject: KeyObject;
    try {
      keyObject = key.keyObject ?? createPrivateKey(key.privateKey);
    } catch (err) {
      throw new DkimSignError(`DKIM signing with ${where} failed: ${(err as Error).message}`);
    }
    const type = key.algorithm === 'rsa-sha256' ? 'rsa' : key.algorithm === 'ed25519-sha256' ? 'ed25519' : undefined;
    if (!type) throw new DkimSignError(`DKIM signing with ${where} failed: algorithm ${JSON.stringify(key.algorithm)} is not rsa-sha256 or ed25519-sha256`);
    if (keyObject.asymmetricKeyType !== type) throw new DkimSignError(`DKIM signing with ${where} failed: a ${keyObject.asymmetricKeyType} key cannot sign ${key.algorithm}`);

    const lines = [`DKIM-Signature: v=1; a=${key.algorithm}; c=${this.#c}; d=${d};`];
    const add = (piece: string, sep = ' ') => {
      const last = lines[lines.length - 1];
      if (last.length + sep.length + piece.length <= LINE) lines[lines.length - 1] = last + sep + piece;
      else lines.push(` ${piece}`);
    };
    // h= starts the second line (the first is the same for every message), folded after a colon when long.
    lines.push(' h=');
    names.forEach((n, i) => add(`${n}${i < names.length - 1 ? ':' : ';'}`, ''));
    add('q=dns/txt;');
    add(`s=${key.selector};`);
    add(`t=${t};`);
    if (this.#expireAfter) add(`x=${t + this.#expireAfter};`);
    add(`bh=${bh};`);
    add('b=');
    let b: string;
    try {
      b = await signHeaderBlock(headerData, lines.join('\r\n'), this.#canon.header, type, keyObject);
    } catch (err) {
      throw new DkimSignError(`DKIM signing with ${where} failed: ${(err as Error).message}`);
    }
    // Fold b= in pieces: whitespace inside it is not part of the value (RFC 6376 §3.5).
    let rest = b;
    let room = LINE - lines[lines.length - 1].length;
    while (rest.length) {
      if (room <= 0) {
        lines.push(' ');
        room = LINE - 1;
      }
      lines[lines.length - 1] += rest.slice(0, room);
      rest = rest.slice(room);
      room = 0;
    }
    return lines.join('\r\n');
  }
}

/** Feed `message` (bytes or a stream of them) to `signer` as a raw message. */
async function writeMessage(signer: DkimSigner, message: MessageInput): Promise<void> {
  if (typeof message === 'string' || Buffer.isBuffer(message)) return signer.write(message);
  for await (const chunk of message) signer.write(chunk as Buffer | string);
}

/**
 * DKIM-Signature header text for `message` (headers, blank line, body,
 * CRLF), one signature per key, in key order, as `DKIM-Signature: ...\r\n`
 * lines folded with CRLF. The message must be byte for byte what the
 * recipient will see for the signed fields and the body; a milter gets
 * that with `headerLeadingSpace` and a `CollectingMilter` (nodemilter/mime),
 * or signs as the message arrives with a {@link DkimSigner}.
 * Rejects with {@link DkimSignError} when a key cannot sign or the message
 * has no From field, and with InvalidArgumentError on bad options.
 *
 * @example
 * ```ts
 * const text = await dkimSign(await collected.buffer(), table.keysFor(fromAddress));
 * insertOnTop(this, text);
 * ```
 */
export async function dkimSign(message: MessageInput, keys: readonly SigningKey[], options: DkimSignOptions = {}): Promise<string> {
  if (!keys.length) return '';
  const signer = new DkimSigner(options);
  await writeMessage(signer, message);
  return signer.sign(keys);
}

/** {@link dkimSign}'s text as header fields for addheader (see {@link headerFields}). */
export async function dkimSignatureFields(message: MessageInput, keys: readonly SigningKey[], leadingSpace: boolean, options: DkimSignOptions = {}): Promise<HeaderField[]> {
  return headerFields(await dkimSign(message, keys, options), leadingSpace);
}
