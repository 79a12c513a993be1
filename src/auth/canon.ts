/**
 * DKIM canonicalization (RFC 6376 §3.4): `simple` and `relaxed` for header
 * fields and for the body. The body is canonicalized as it arrives, chunk by
 * chunk, holding back at most a few bytes and a count of trailing empty
 * lines, so a signer never needs the whole body at once.
 *
 * Strings here are byte strings (latin1: one character per byte), as mail
 * headers are bytes, not text.
 *
 * @module
 */
import { createHash } from 'node:crypto';
import type { Hash } from 'node:crypto';

import { InvalidArgumentError } from '../errors';

/** One of the two canonicalization algorithms. */
export type CanonAlgorithm = 'simple' | 'relaxed';

/** A `c=` value split: header and body algorithms. */
export interface Canonicalization {
  header: CanonAlgorithm;
  body: CanonAlgorithm;
}

const CANON = /^(simple|relaxed)(?:\/(simple|relaxed))?$/;

/**
 * Parse a `c=` value (`relaxed/relaxed`, `simple`, ...). A missing body part
 * is `simple`, as RFC 6376 §3.5 says. Throws {@link InvalidArgumentError}
 * for anything else.
 */
export function parseCanonicalization(text: string): Canonicalization {
  const m = CANON.exec(text);
  if (!m) throw new InvalidArgumentError(`DKIM canonicalization ${JSON.stringify(text)} is invalid: expected simple or relaxed, e.g. "relaxed/relaxed"`);
  return { header: m[1] as CanonAlgorithm, body: (m[2] ?? 'simple') as CanonAlgorithm };
}

/**
 * One header field canonicalized, with its CRLF: `field` is the field as
 * delivered (`Name: value`, folds as CRLF + WSP, no final CRLF).
 *
 * - simple: unchanged.
 * - relaxed: the name lower-cased, folds unfolded, WSP runs one space, no
 *   WSP at the end of the value or around the colon.
 */
export function canonicalHeader(field: string, algorithm: CanonAlgorithm): string {
  if (algorithm === 'simple') return `${field}\r\n`;
  const colon = field.indexOf(':');
  const name = field.slice(0, colon).replace(/[ \t]+$/, '').toLowerCase();
  const value = field
    .slice(colon + 1)
    .replace(/\r\n(?=[ \t])/g, '')
    .replace(/[ \t]+/g, ' ')
    .replace(/^ | $/g, '');
  return `${name}:${value}\r\n`;
}

/** Where canonical body bytes go (a hash, or a test collecting them). */
export type BodySink = (bytes: string) => void;

/**
 * A body canonicalizer fed in pieces: {@link update} with each chunk, then
 * {@link end} once. The canonical bytes go to the sink as they become final.
 *
 * Both algorithms drop the empty lines at the end of the body. `simple` ends
 * every body with exactly one CRLF (an empty body is CRLF); `relaxed` also
 * drops WSP at line ends and turns WSP runs into one space, and leaves an
 * empty body empty (RFC 6376 §3.4.3, §3.4.4).
 */
export class BodyCanonicalizer {
  readonly algorithm: CanonAlgorithm;
  readonly #sink: BodySink;
  /** CRLFs seen at the end so far: written only if content follows. */
  #pendingCrlf = 0;
  /** The last piece's final CR (it may start a CRLF) and, relaxed, a space before it or at the end (trailing WSP if a CRLF follows): at most 2 bytes. */
  #carry = '';
  /** Whether any content (anything but trailing CRLFs) was written. */
  #content = false;
  #ended = false;

  constructor(algorithm: CanonAlgorithm, sink: BodySink) {
    this.algorithm = algorithm;
    this.#sink = sink;
  }

  /** Canonicalize the next piece of the body. */
  update(chunk: Buffer | string): void {
    if (this.#ended) throw new InvalidArgumentError('BodyCanonicalizer.update after end()');
    let s = this.#carry + (typeof chunk === 'string' ? chunk : chunk.toString('latin1'));
    // WSP runs to one space (single spaces, the common case, are left alone: twice as fast), then none before CRLF.
    if (this.algorithm === 'relaxed') s = s.replace(/\t[ \t]*| [ \t]+/g, ' ').replace(/ \r\n/g, '\r\n');
    let hold = '';
    if (s.endsWith('\r')) hold = '\r';
    if (this.algorithm === 'relaxed' && s.endsWith(' ', s.length - hold.length)) hold = ` ${hold}`;
    this.#carry = hold;
    this.#trailing(s.slice(0, s.length - hold.length));
  }

  #write(content: string): void {
    if (!content.length) return;
    if (this.#pendingCrlf) {
      this.#sink('\r\n'.repeat(this.#pendingCrlf));
      this.#pendingCrlf = 0;
    }
    this.#sink(content);
    this.#content = true;
  }

  /** Write `s`, holding back its trailing CRLFs until content follows. */
  #trailing(s: string): void {
    let end = s.length;
    let crlfs = 0;
    while (end >= 2 && s.charCodeAt(end - 2) === 0x0d && s.charCodeAt(end - 1) === 0x0a) {
      end -= 2;
      crlfs++;
    }
    if (end > 0) {
      this.#write(s.slice(0, end));
      this.#pendingCrlf = crlfs;
    } else {
      this.#pendingCrlf += crlfs;
    }
  }

  /** Finish: write what the algorithm puts at the end. */
  end(): void {
    if (this.#ended) return;
    this.#ended = true;
    // A bare CR at the very end is content (with a space before it); a space at the very end is trailing WSP.
    this.#write(this.#carry === ' ' ? '' : this.#carry);
    this.#carry = '';
    this.#pendingCrlf = 0;
    if (this.algorithm === 'simple' || this.#content) this.#sink('\r\n');
  }
}

/**
 * The body hash (`bh=`, SHA-256, base64) computed as the body arrives.
 *
 * @example
 * ```ts
 * const bh = new BodyHasher('relaxed');
 * bh.update(Buffer.from('Hi. \r\n\r\n'));   // canonical: "Hi.\r\n"
 * bh.digest();   // 'UrA8rmgY3eNBotmDWtzAmHyn5RyZv8Gea45sNGsP0zw='
 * ```
 */
export class BodyHasher {
  readonly #hash: Hash = createHash('sha256');
  readonly #canon: BodyCanonicalizer;
  #digest: string | undefined;
  /** Bytes fed in. */
  bytes = 0;

  constructor(algorithm: CanonAlgorithm) {
    this.#canon = new BodyCanonicalizer(algorithm, (b) => this.#hash.update(b, 'latin1'));
  }

  /** Hash the next piece of the body. */
  update(chunk: Buffer | string): void {
    if (this.#digest !== undefined) throw new InvalidArgumentError('BodyHasher.update after digest()');
    this.bytes += chunk.length;
    this.#canon.update(chunk);
  }

  /** The base64 SHA-256 of the canonical body (the same on every call). */
  digest(): string {
    if (this.#digest === undefined) {
      this.#canon.end();
      this.#digest = this.#hash.digest('base64');
    }
    return this.#digest;
  }
}

/** The whole canonical body of `body` (for tests and tools; signers use {@link BodyHasher}). */
export function canonicalBody(body: Buffer | string, algorithm: CanonAlgorithm): string {
  const out: string[] = [];
  const c = new BodyCanonicalizer(algorithm, (b) => out.push(b));
  c.update(body);
  c.end();
  return out.join('');
}
