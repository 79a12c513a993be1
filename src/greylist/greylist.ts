/**
 * {@link Greylist}: pymilter's greylisting (`Milter.greylist`,
 * `Milter.greysql`) on a pluggable {@link Store}.
 *
 * @module
 */
import * as ipaddr from 'ipaddr.js';

import { InvalidArgumentError } from '../errors';
import { checkSeconds } from './store';
import type { GreylistOutcome, GreylistRecord, GreylistTiming, Store } from './store';
import { SqliteStore } from './sqlite';

/** Options of {@link Greylist}. Times are in seconds. */
export interface GreylistOptions {
  /**
   * How long a new triplet is refused (SMTP 451) before a retry is let
   * through. Default 600 (10 minutes). pymilter's `grey_time` is in
   * minutes and waits 5 seconds more: pymilter's `grey_time=10` is
   * `greyTime: 605` here.
   */
  greyTime?: number;
  /**
   * How long after the first attempt a retry still passes; a retry after
   * that starts over. Default 14400 (4 hours; pymilter's `grey_expire`, in hours).
   */
  greyExpire?: number;
  /**
   * How long a triplet is kept after it was last seen; once it has passed,
   * every message within this time passes at once. Default 3110400
   * (36 days; pymilter's `grey_retain`, in days).
   */
  greyRetain?: number;
  /**
   * Greylist IPv4 clients by network of this prefix length: 32 (the
   * default, as pymilter) uses the exact address; 24 lets a sender's retry
   * come from a neighbouring host of its pool.
   */
  ipv4Prefix?: number;
  /** The same for IPv6. Default 64: one site's /64 counts as one client. */
  ipv6Prefix?: number;
  /** The current time in Unix seconds (default: the system clock). For tests and replays. */
  clock?: () => number;
}

/** What {@link Greylist.evaluate} found. */
export interface GreylistVerdict {
  /** How many times this triplet was allowed through, this attempt included; 0 means greylisted. */
  count: number;
  /** What the check found (see {@link GreylistOutcome}). */
  outcome: GreylistOutcome;
  /** Seconds until a retry will pass (0 once passed). */
  retryAfter: number;
  /** The stored record after the check. */
  record: GreylistRecord;
}

const DEFAULTS = { greyTime: 600, greyExpire: 4 * 3600, greyRetain: 36 * 86400 };

/**
 * The form in which an address is greylisted: angle brackets and
 * surrounding space removed, lower-cased (a retry that changes case is the
 * same sender). The null sender `<>` becomes the empty string.
 */
export function normalizeAddress(address: string | Buffer): string {
  const s = (Buffer.isBuffer(address) ? address.toString('latin1') : String(address)).trim();
  const m = /^<(.*)>$/s.exec(s);
  return (m ? m[1] : s).trim().toLowerCase();
}

function checkPrefix(name: string, value: number, max: number): number {
  if (!Number.isInteger(value) || value < 0 || value > max) {
    throw new InvalidArgumentError(`${name} must be an integer from 0 to ${max}, got ${String(value)}`);
  }
  return value;
}

/**
 * Greylisting: refuse the first delivery attempt of an unknown
 * (client IP, sender, recipient) triplet with a temporary failure, and let
 * a retry through once `greyTime` has passed (real MTAs retry; most spam
 * engines do not). Triplets that passed stay trusted for `greyRetain`
 * after they were last seen.
 *
 * The state lives in a {@link Store}: a file path gives the embedded
 * {@link SqliteStore}; a `RedisStore` shares the state across a fleet of
 * MX hosts; {@link MemoryStore} is for tests.
 *
 * @example
 * ```ts
 * import { Greylist } from 'nodemilter/greylist';
 *
 * const grey = new Greylist('/var/lib/milter/greylist.db', { greyTime: 300 });
 * const allowed = await grey.check('192.0.2.7', '<alice@example.org>', '<bob@example.net>');
 * if (allowed === 0) {
 *   // first attempt, or retried too early: answer 451 4.7.1
 * }
 * ```
 */
export class Greylist {
  /** The store holding the records. */
  readonly store: Store;
  /** The timing in force (seconds). */
  readonly timing: Readonly<GreylistTiming>;
  readonly #ipv4Prefix: number;
  readonly #ipv6Prefix: number;
  readonly #clock: () => number;

  /** `store`: a {@link Store}, or the path of a SQLite database file (then {@link SqliteStore} is used). */
  constructor(store: Store | string, options: GreylistOptions = {}) {
    if (typeof store === 'string') {
      this.store = new SqliteStore(store);
    } else if (store && typeof store === 'object' && typeof (store as Store).greylistCheck === 'function') {
      this.store = store;
    } else {
      throw new InvalidArgumentError(`Greylist needs a Store or a SQLite file path, got ${String(store)}`);
    }
    const timing = {
      greyTime: checkSeconds('greyTime', options.greyTime ?? DEFAULTS.greyTime),
      greyExpire: checkSeconds('greyExpire', options.greyExpire ?? DEFAULTS.greyExpire),
      greyRetain: checkSeconds('greyRetain', options.greyRetain ?? DEFAULTS.greyRetain),
    };
    if (timing.greyExpire <= timing.greyTime) {
      throw new InvalidArgumentError(
        `greyExpire (${timing.greyExpire} s) must be longer than greyTime (${timing.greyTime} s), or no retry could ever pass`,
      );
    }
    if (timing.greyRetain < timing.greyExpire) {
      throw new InvalidArgumentError(`greyRetain (${timing.greyRetain} s) must be at least greyExpire (${timing.greyExpire} s)`);
    }
    this.timing = Object.freeze(timing);
    this.#ipv4Prefix = checkPrefix('ipv4Prefix', options.ipv4Prefix ?? 32, 32);
    this.#ipv6Prefix = checkPrefix('ipv6Prefix', options.ipv6Prefix ?? 64, 128);
    if (options.clock !== undefined && typeof options.clock !== 'function') {
      throw new InvalidArgumentError(`clock must be a function returning Unix seconds, got ${typeof options.clock}`);
    }
    this.#clock = options.clock ?? (() => Date.now() / 1000);
  }

  /**
   * The form in which a client IP is greylisted: IPv4-mapped IPv6 becomes
   * IPv4; with a prefix shorter than the address, the network
   * (`192.0.2.0/24`, `2001:db8:1:2::/64`).
   */
  normalizeIp(ip: string): string {
    let addr: ipaddr.IPv4 | ipaddr.IPv6;
    try {
      addr = ipaddr.process(String(ip).replace(/^\[|\]$/g, '').replace(/^IPv6:/i, ''));
    } catch {
      throw new InvalidArgumentError(`greylist: not an IP address: ${JSON.stringify(ip)}`);
    }
    if (addr.kind() === 'ipv4') {
      const p = this.#ipv4Prefix;
      return p === 32 ? addr.toString() : `${ipaddr.IPv4.networkAddressFromCIDR(`${addr.toString()}/${p}`).toString()}/${p}`;
    }
    const p = this.#ipv6Prefix;
    return p === 128 ? addr.toString() : `${ipaddr.IPv6.networkAddressFromCIDR(`${addr.toString()}/${p}`).toString()}/${p}`;
  }

  /**
   * Record a delivery attempt and return how many times this triplet was
   * allowed through, this attempt included: 0 means greylisted (answer
   * TEMPFAIL), 1 the first accepted retry, more a known sender. Addresses
   * may keep their angle brackets (see {@link normalizeAddress}).
   */
  async check(ip: string, from: string | Buffer, to: string | Buffer): Promise<number> {
    return (await this.evaluate(ip, from, to)).count;
  }

  /** Like {@link Greylist.check}, with the details: outcome, seconds until a retry passes, the record. */
  async evaluate(ip: string, from: string | Buffer, to: string | Buffer): Promise<GreylistVerdict> {
    const now = this.#clock();
    const { record, outcome } = await this.store.greylistCheck(this.normalizeIp(ip), normalizeAddress(from), normalizeAddress(to), now, this.timing);
    const retryAfter = record.count > 0 ? 0 : Math.max(0, record.firstSeen + this.timing.greyTime - now);
    return { count: record.count, outcome, retryAfter, record };
  }

  /** Delete the records not seen for longer than the retain time; resolves to how many were deleted. */
  async clean(): Promise<number> {
    return this.store.greylistClean(this.#clock() - this.timing.greyRetain);
  }

  /** Every record still within the retain time. */
  async *export(): AsyncIterable<GreylistRecord> {
    const cutoff = this.#clock() - this.timing.greyRetain;
    for await (const r of this.store.greylistExport()) if (r.lastSeen >= cutoff) yield r;
  }

  /** Store records (from {@link Greylist.export} of another store, or a CSV); resolves to how many were stored. */
  async import(records: Iterable<GreylistRecord> | AsyncIterable<GreylistRecord>): Promise<number> {
    return this.store.greylistImport(records, this.timing.greyRetain, this.#clock());
  }

  /**
   * The records within the retain time as CSV, in the column order of
   * pymilter's `export_csv` and `import_csv`:
   * `ip,sender,recipient,firstseen,lastseen,cnt,umis` (umis empty), CRLF
   * line ends, no header line.
   */
  async exportCsv(): Promise<string> {
    let out = '';
    for await (const r of this.export()) {
      out += [r.ip, r.from, r.to, String(r.firstSeen), String(r.lastSeen), String(r.count), ''].map(csvField).join(',') + '\r\n';
    }
    return out;
  }

  /** Import CSV as written by {@link Greylist.exportCsv} or pymilter's `export_csv`; resolves to how many records were stored. */
  async importCsv(text: string): Promise<number> {
    const records: GreylistRecord[] = [];
    parseCsv(text).forEach((row, i) => {
      if (row.length < 6) {
        throw new InvalidArgumentError(`greylist CSV line ${i + 1}: expected ip,sender,recipient,firstseen,lastseen,cnt[,umis], got ${row.length} fields`);
      }
      const [ip, from, to, first, last, cnt] = row;
      const nums = [Number(first), Number(last), Number(cnt)];
      if (first === '' || last === '' || cnt === '' || nums.some((n) => !Number.isFinite(n))) {
        throw new InvalidArgumentError(`greylist CSV line ${i + 1}: firstseen, lastseen and cnt must be numbers, got ${JSON.stringify([first, last, cnt])}`);
      }
      records.push({ ip, from, to, firstSeen: nums[0], lastSeen: nums[1], count: nums[2] });
    });
    return this.import(records);
  }

  /** Close the store. */
  async close(): Promise<void> {
    await this.store.close();
  }
}

function csvField(s: string): string {
  return /[",\r\n]/.test(s) ? `"${s.replace(/"/g, '""')}"` : s;
}

/** RFC 4180 CSV (as Python's csv module writes it): quoted fields, doubled quotes, CRLF or LF. Blank lines are skipped. */
function parseCsv(text: string): string[][] {
  const rows: string[][] = [];
  let row: string[] = [];
  let field = '';
  let quoted = false;
  let i = 0;
  const endRow = () => {
    row.push(field);
    if (!(row.length === 1 && row[0] === '')) rows.push(row);
    row = [];
    field = '';
  };
  while (i < text.length) {
    const c = text[i];
    if (quoted) {
      if (c === '"') {
        if (text[i + 1] === '"') {
          field += '"';
          i++;
        } else quoted = false;
      } else field += c;
    } else if (c === '"') quoted = true;
    else if (c === ',') {
      row.push(field);
      field = '';
    } else if (c === '\n' || c === '\r') {
      if (c === '\r' && text[i + 1] === '\n') i++;
      endRow();
    } else field += c;
    i++;
  }
  if (quoted) throw new InvalidArgumentError('greylist CSV: a quoted field is not closed at the end of the text');
  if (field !== '' || row.length) endRow();
  return rows;
}
