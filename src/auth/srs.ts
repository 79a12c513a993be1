/**
 * The Sender Rewriting Scheme (SRS0 and SRS1, as Shevek's SRS paper and
 * libsrs2 define them, with postsrsd's configuration): a forwarding host
 * rewrites the envelope sender so that SPF passes for it, and bounces to the
 * rewritten address find their way back.
 *
 * Forward: `user@origin.example` becomes `SRS0=HHHH=TT=origin.example=user@srs.example`
 * (HHHH: the first 4 characters of the base64 HMAC-SHA1, keyed with the
 * secret, of the lower-cased `TT`, domain and user; TT: the day number
 * mod 1024 in two base32 characters). An SRS0 address forwarded again
 * becomes SRS1 (`SRS1=HHHH=first.example==HHHH=TT=origin.example=user@srs2.example`).
 *
 * @module
 */
import { createHmac } from 'node:crypto';

import { InvalidArgumentError, MilterError } from '../errors';

/** Why an address could not be reversed. */
export type SrsErrorReason = 'not-srs' | 'bad-format' | 'bad-hash' | 'expired' | 'bad-timestamp';

/** An SRS address that cannot be reversed; `reason` says why. */
export class SrsError extends MilterError {
  /** Why, as a stable word. */
  readonly reason: SrsErrorReason;
  constructor(message: string, reason: SrsErrorReason) {
    super(message, 'ERR_MILTER_SRS');
    this.reason = reason;
  }
}

/** Options of {@link Srs} (postsrsd's names in parentheses). */
export interface SrsOptions {
  /** The domain of rewritten addresses (SRS_DOMAIN). */
  domain: string;
  /**
   * Secrets (the lines of SRS_SECRET's file): the first signs, all verify,
   * so a new secret is put first and the old one kept until its addresses
   * expired.
   */
  secrets: string[];
  /** Domains never rewritten (SRS_EXCLUDE_DOMAINS); a leading dot (`.example.com`) covers the subdomains. */
  excludeDomains?: string[];
  /** The separator after SRS0/SRS1 (SRS_SEPARATOR): `=` (default), `+` or `-`. */
  separator?: '=' | '+' | '-';
  /** Days a rewritten address stays valid (default 21). */
  maxAge?: number;
  /** Hash characters written (default 4). */
  hashLength?: number;
  /** Fewest hash characters accepted (default `hashLength`). */
  hashMin?: number;
  /** The clock (milliseconds), for tests. */
  now?: () => number;
}

const SEPARATORS = '=+-';
const BASE32 = 'ABCDEFGHIJKLMNOPQRSTUVWXYZ234567';
const DAY = 86400;
const SLOTS = 1024;

function splitAddress(address: string): [string, string] | undefined {
  const a = address.trim().replace(/^<|>$/g, '');
  const at = a.lastIndexOf('@');
  if (at <= 0 || at === a.length - 1) return undefined;
  return [a.slice(0, at), a.slice(at + 1)];
}

function isTag(local: string, tag: 'SRS0' | 'SRS1'): boolean {
  return local.length > 4 && local.slice(0, 4).toUpperCase() === tag && SEPARATORS.includes(local[4]);
}

/**
 * SRS forward and reverse rewriting with postsrsd's settings.
 *
 * @example
 * ```ts
 * const srs = new Srs({ domain: 'fwd.example.org', secrets: ['s3cret'], excludeDomains: ['example.org'] });
 * srs.forward('bob@example.org') === undefined; // true (an excluded domain is not rewritten)
 * const rewritten = srs.forward('alice@example.com')!;   // SRS0=<hash>=<time>=example.com=alice@fwd.example.org
 * /^SRS0=[^=]+=[^=]+=example\.com=alice@fwd\.example\.org$/.test(rewritten); // true
 * srs.reverse(rewritten); // 'alice@example.com'
 * ```
 */
export class Srs {
  readonly domain: string;
  readonly separator: '=' | '+' | '-';
  readonly maxAge: number;
  readonly hashLength: number;
  readonly hashMin: number;
  readonly #secrets: string[];
  readonly #exclude: string[];
  readonly #now: () => number;

  constructor(options: SrsOptions) {
    if (!options || typeof options.domain !== 'string' || !/^[a-z0-9.-]+\.[a-z0-9-]+$/i.test(options.domain)) {
      throw new InvalidArgumentError(`SRS domain ${JSON.stringify(options?.domain)} is invalid: expected a domain name such as fwd.example.org`);
    }
    if (!Array.isArray(options.secrets) || options.secrets.length === 0 || options.secrets.some((s) => typeof s !== 'string' || s === '')) {
      throw new InvalidArgumentError('SRS secrets must be a non-empty list of non-empty strings (the first signs, all verify)');
    }
    const sep = options.separator ?? '=';
    if (!SEPARATORS.includes(sep) || sep.length !== 1) throw new InvalidArgumentError(`SRS separator ${JSON.stringify(sep)} is invalid: expected "=", "+" or "-"`);
    const int = (name: string, v: number | undefined, dflt: number, min: number, max: number) => {
      if (v === undefined) return dflt;
      if (!Number.isInteger(v) || v < min || v > max) throw new InvalidArgumentError(`SRS ${name} ${JSON.stringify(v)} is invalid: expected a whole number from ${min} to ${max}`);
      return v;
    };
    this.domain = options.domain.toLowerCase();
    this.separator = sep;
    this.maxAge = int('maxAge', options.maxAge, 21, 1, SLOTS - 1);
    this.hashLength = int('hashLength', options.hashLength, 4, 1, 27);
    this.hashMin = int('hashMin', options.hashMin, this.hashLength, 1, this.hashLength);
    this.#secrets = [...options.secrets];
    this.#exclude = (options.excludeDomains ?? []).map((d) => d.trim().toLowerCase()).filter(Boolean);
    this.#now = options.now ?? Date.now;
  }

  #hash(secret: string, parts: string[]): string {
    const h = createHmac('sha1', secret);
    for (const p of parts) h.update(p.toLowerCase(), 'latin1');
    return h.digest('base64').slice(0, this.hashLength);
  }

  #checkHash(hash: string, parts: string[], address: string): void {
    if (hash.length < this.hashMin) throw new SrsError(`SRS address ${address}: the hash is too short`, 'bad-hash');
    // Compared without case, as libsrs2 does: some MTAs lower-case local parts.
    const want = hash.toLowerCase();
    for (const s of this.#secrets) if (this.#hash(s, parts).slice(0, hash.length).toLowerCase() === want) return;
    throw new SrsError(`SRS address ${address}: the hash does not match (forged, or signed with a secret no longer configured)`, 'bad-hash');
  }

  /** The day stamp (two base32 characters) for a time in milliseconds. */
  timestamp(ms = this.#now()): string {
    const day = Math.floor(ms / 1000 / DAY) % SLOTS;
    return BASE32[(day >> 5) & 31] + BASE32[day & 31];
  }

  #checkTimestamp(stamp: string, address: string): void {
    const s = stamp.toUpperCase();
    if (s.length !== 2 || !BASE32.includes(s[0]) || !BASE32.includes(s[1])) throw new SrsError(`SRS address ${address}: ${JSON.stringify(stamp)} is not a timestamp`, 'bad-timestamp');
    const then = (BASE32.indexOf(s[0]) << 5) | BASE32.indexOf(s[1]);
    let now = Math.floor(this.#now() / 1000 / DAY) % SLOTS;
    while (now < then) now += SLOTS;
    if (now > then + this.maxAge) throw new SrsError(`SRS address ${address}: expired (older than ${this.maxAge} days)`, 'expired');
  }

  /** Whether mail from `domain` keeps its sender: our SRS domain and the excluded domains. */
  isExcluded(domain: string): boolean {
    const d = domain.toLowerCase().replace(/\.$/, '');
    if (d === this.domain) return true;
    return this.#exclude.some((e) => (e.startsWith('.') ? d.endsWith(e) || d === e.slice(1) : d === e));
  }

  /**
   * The rewritten sender, or undefined when it stays as it is (the null
   * sender, an address without a domain, an excluded domain, one of our own
   * SRS addresses, a malformed SRS1 address). An SRS0 or SRS1 address of
   * another forwarder becomes SRS1.
   */
  forward(address: string): string | undefined {
    const parts = splitAddress(address);
    if (!parts) return undefined;
    const [local, host] = parts;
    if (this.isExcluded(host)) return undefined;
    if (isTag(local, 'SRS0') || isTag(local, 'SRS1')) {
      // One of ours already (any domain), as postsrsd says: "Already rewritten".
      try {
        this.#reverseLocal(local, host, address);
        return undefined;
      } catch {
        /* another forwarder's: wrap it */
      }
    }
    const secret = this.#secrets[0];
    const sep = this.separator;
    if (isTag(local, 'SRS1')) {
      // SRS1<sep>HASH=host==rest: keep the first forwarder's host and rest, hash again.
      const body = local.slice(5);
      const a = body.indexOf('=');
      const b = a < 0 ? -1 : body.indexOf('=', a + 1);
      // Malformed (no host or no user part): left alone, as postsrsd does ("No host in SRS1 address").
      if (a < 0 || b < 0) return undefined;
      const srsHost = body.slice(a + 1, b);
      const srsUser = body.slice(b + 1);
      return `SRS1${sep}${this.#hash(secret, [srsHost, srsUser])}=${srsHost}=${srsUser}@${this.domain}`;
    }
    if (isTag(local, 'SRS0')) {
      const srsUser = local.slice(4); // with the original separator
      return `SRS1${sep}${this.#hash(secret, [host, srsUser])}=${host}=${srsUser}@${this.domain}`;
    }
    return this.#srs0(secret, local, host);
  }

  #srs0(secret: string, local: string, host: string): string {
    const stamp = this.timestamp();
    return `SRS0${this.separator}${this.#hash(secret, [stamp, host, local])}=${stamp}=${host}=${local}@${this.domain}`;
  }

  /** Whether `address` is an SRS address at our domain (so {@link reverse} applies). */
  isSrs(address: string): boolean {
    const parts = splitAddress(address);
    return !!parts && parts[1].toLowerCase() === this.domain && (isTag(parts[0], 'SRS0') || isTag(parts[0], 'SRS1'));
  }

  /**
   * The address an SRS address stands for: the original sender for SRS0,
   * the first forwarder's SRS0 address for SRS1. Throws {@link SrsError}
   * (reason `not-srs`, `bad-format`, `bad-hash`, `expired`, `bad-timestamp`).
   */
  reverse(address: string): string {
    const parts = splitAddress(address);
    if (!parts || !(isTag(parts[0], 'SRS0') || isTag(parts[0], 'SRS1'))) throw new SrsError(`${JSON.stringify(address)} is not an SRS address`, 'not-srs');
    return this.#reverseLocal(parts[0], parts[1], address);
  }

  #reverseLocal(local: string, _host: string, address: string): string {
    const fields = local.slice(5).split('=');
    if (isTag(local, 'SRS1')) {
      // HASH=host=<rest, which starts with the SRS0 separator>
      const body = local.slice(5);
      const a = body.indexOf('=');
      const b = a < 0 ? -1 : body.indexOf('=', a + 1);
      if (a <= 0 || b < 0 || b === a + 1 || b === body.length - 1) throw new SrsError(`SRS1 address ${address} is malformed: expected SRS1=HASH=HOST=<SRS0 part>`, 'bad-format');
      const hash = body.slice(0, a);
      const srsHost = body.slice(a + 1, b);
      const srsUser = body.slice(b + 1);
      this.#checkHash(hash, [srsHost, srsUser], address);
      return `SRS0${srsUser}@${srsHost}`;
    }
    if (fields.length < 4 || fields.slice(0, 3).some((f) => f === '')) {
      throw new SrsError(`SRS0 address ${address} is malformed: expected SRS0=HASH=TT=DOMAIN=USER`, 'bad-format');
    }
    const [hash, stamp, host] = fields;
    const user = fields.slice(3).join('=');
    if (user === '') throw new SrsError(`SRS0 address ${address} is malformed: the user part is empty`, 'bad-format');
    this.#checkTimestamp(stamp, address);
    this.#checkHash(hash, [stamp, host, user], address);
    return `${user}@${host}`;
  }
}
