/**
 * The store interface shared by {@link Greylist} and {@link AddrCache}, the
 * greylisting decision every store applies, and {@link MemoryStore}, a store
 * that lives in one process only.
 *
 * A store keeps two kinds of state: greylist records (one per
 * IP/sender/recipient triplet) and address-cache entries (a value per key,
 * in a namespace, with an optional expiry). Every method is async so a
 * networked store (Redis) fits the same shape as an embedded one (SQLite).
 *
 * @module
 */
import { InvalidArgumentError } from '../errors';

/** One greylist triplet and what is known about it. Times are Unix seconds (fractions allowed). */
export interface GreylistRecord {
  /** The client IP (or network, see {@link GreylistOptions.ipv4Prefix}) as stored. */
  ip: string;
  /** The envelope sender as stored (see {@link normalizeAddress}). */
  from: string;
  /** The envelope recipient as stored. */
  to: string;
  /** When the triplet was first seen (in the current greylisting round). */
  firstSeen: number;
  /** When it was last seen. */
  lastSeen: number;
  /** How many times a retry was allowed through (0 while still greylisted). */
  count: number;
}

/** The greylisting timing, in seconds. See {@link GreylistOptions} for the meaning. */
export interface GreylistTiming {
  /** Seconds a new triplet is refused. */
  greyTime: number;
  /** Seconds after the first attempt during which a retry passes. */
  greyExpire: number;
  /** Seconds a triplet is kept after it was last seen. */
  greyRetain: number;
}

/**
 * What a check found:
 * `new` (first sight), `early` (retried before the grey time passed),
 * `pass` (allowed: within the window after the grey time, or already passed
 * before), `late` (retried after the window closed: starts over),
 * `expired` (not seen for longer than the retain time: starts over).
 */
export type GreylistOutcome = 'new' | 'early' | 'pass' | 'late' | 'expired';

/** The record after a check, and what the check found. */
export interface GreylistCheck {
  /** The record as stored after the check. */
  record: GreylistRecord;
  /** What the check found. */
  outcome: GreylistOutcome;
}

/** An address-cache entry as a store keeps it. */
export interface CacheEntry {
  /** The value, JSON-encoded. */
  value: string;
  /** When the entry expires (Unix seconds), or null for a permanent entry. */
  expires: number | null;
}

/**
 * Where greylist records and address-cache entries live. {@link MemoryStore}
 * (one process), `SqliteStore` (one host, survives restarts) and
 * `RedisStore` (a fleet of hosts) implement it; a custom store must apply
 * {@link decideGreylist} atomically per triplet.
 */
export interface Store {
  /**
   * Apply one greylist check to the triplet at time `now`, atomically (two
   * concurrent checks of one triplet must both be counted), and return the
   * updated record. The record's retain time starts again at `now`.
   */
  greylistCheck(ip: string, from: string, to: string, now: number, timing: GreylistTiming): Promise<GreylistCheck>;
  /** Delete the records last seen before `before` (Unix seconds); resolves to how many were deleted. */
  greylistClean(before: number): Promise<number>;
  /** Every record, in no particular order. */
  greylistExport(): AsyncIterable<GreylistRecord>;
  /** Store records as given (replacing existing ones of the same triplet); resolves to how many. `retain` (seconds) lets an expiring store set each record's time to live from `now`. */
  greylistImport(records: Iterable<GreylistRecord> | AsyncIterable<GreylistRecord>, retain: number, now: number): Promise<number>;

  /** The entry under `key` in `namespace` unless it has expired at `now`. */
  cacheGet(namespace: string, key: string, now: number): Promise<CacheEntry | undefined>;
  /** Store an entry (replacing any). `now` lets an expiring store set the time to live (`entry.expires - now`). */
  cacheSet(namespace: string, key: string, entry: CacheEntry, now: number): Promise<void>;
  /** Delete an entry; resolves to whether one existed. */
  cacheDelete(namespace: string, key: string): Promise<boolean>;
  /** Delete the entries of `namespace` expired at `now`; resolves to how many. */
  cacheClean(namespace: string, now: number): Promise<number>;

  /** Release connections and files. The store is unusable afterwards. */
  close(): Promise<void>;
}

/**
 * The greylisting decision, pymilter's (`Milter.greysql`) with its fixed
 * 5-second slack folded into `greyTime`: given the stored record (or none)
 * and the time, the record to store and what happened.
 *
 * - no record: a new one, count 0 (`new`);
 * - not seen for more than `greyRetain`: start over (`expired`);
 * - before `firstSeen + greyTime`: still greylisted, only lastSeen moves (`early`);
 * - already passed once, or before `firstSeen + greyExpire`: count + 1 (`pass`);
 * - otherwise the retry came too late: start over (`late`).
 *
 * Every store applies exactly this rule (the Redis store in a Lua script
 * that mirrors it).
 */
export function decideGreylist(
  existing: GreylistRecord | undefined,
  ip: string,
  from: string,
  to: string,
  now: number,
  timing: GreylistTiming,
): GreylistCheck {
  const fresh = (): GreylistRecord => ({ ip, from, to, firstSeen: now, lastSeen: now, count: 0 });
  if (!existing) return { record: fresh(), outcome: 'new' };
  if (now > existing.lastSeen + timing.greyRetain) return { record: fresh(), outcome: 'expired' };
  if (now < existing.firstSeen + timing.greyTime) return { record: { ...existing, lastSeen: now }, outcome: 'early' };
  if (existing.count > 0 || now < existing.firstSeen + timing.greyExpire) {
    return { record: { ...existing, lastSeen: now, count: existing.count + 1 }, outcome: 'pass' };
  }
  return { record: fresh(), outcome: 'late' };
}

/** Check a number option: finite and >= 0. */
export function checkSeconds(name: string, value: unknown): number {
  if (typeof value !== 'number' || !Number.isFinite(value) || value < 0) {
    throw new InvalidArgumentError(`${name} must be a finite number of seconds >= 0, got ${String(value)}`);
  }
  return value;
}

/** Check a store namespace/prefix-like name: a non-empty string. */
export function checkName(what: string, value: unknown): string {
  if (typeof value !== 'string' || value.length === 0) {
    throw new InvalidArgumentError(`${what} must be a non-empty string, got ${JSON.stringify(value)}`);
  }
  return value;
}

/** The key that identifies a triplet inside a store: unambiguous whatever the addresses contain. */
export function tripletKey(ip: string, from: string, to: string): string {
  return JSON.stringify([ip, from, to]);
}

/**
 * A store in this process's memory: for tests and for a single milter
 * process that may forget its state on restart. Not shared between
 * processes.
 *
 * @example
 * ```ts
 * const grey = new Greylist(new MemoryStore());
 * ```
 */
export class MemoryStore implements Store {
  readonly #grey = new Map<string, GreylistRecord>();
  readonly #cache = new Map<string, Map<string, CacheEntry>>();

  async greylistCheck(ip: string, from: string, to: string, now: number, timing: GreylistTiming): Promise<GreylistCheck> {
    const key = tripletKey(ip, from, to);
    const result = decideGreylist(this.#grey.get(key), ip, from, to, now, timing);
    this.#grey.set(key, result.record);
    return { record: { ...result.record }, outcome: result.outcome };
  }

  async greylistClean(before: number): Promise<number> {
    let n = 0;
    for (const [key, r] of this.#grey) {
      if (r.lastSeen < before) {
        this.#grey.delete(key);
        n++;
      }
    }
    return n;
  }

  async *greylistExport(): AsyncIterable<GreylistRecord> {
    for (const r of [...this.#grey.values()]) yield { ...r };
  }

  async greylistImport(records: Iterable<GreylistRecord> | AsyncIterable<GreylistRecord>): Promise<number> {
    let n = 0;
    for await (const r of records) {
      this.#grey.set(tripletKey(r.ip, r.from, r.to), { ...r });
      n++;
    }
    return n;
  }

  #ns(namespace: string): Map<string, CacheEntry> {
    let m = this.#cache.get(namespace);
    if (!m) this.#cache.set(namespace, (m = new Map()));
    return m;
  }

  async cacheGet(namespace: string, key: string, now: number): Promise<CacheEntry | undefined> {
    const m = this.#ns(namespace);
    const e = m.get(key);
    if (e && e.expires !== null && e.expires <= now) {
      m.delete(key);
      return undefined;
    }
    return e && { ...e };
  }

  async cacheSet(namespace: string, key: string, entry: CacheEntry): Promise<void> {
    this.#ns(namespace).set(key, { ...entry });
  }

  async cacheDelete(namespace: string, key: string): Promise<boolean> {
    return this.#ns(namespace).delete(key);
  }

  async cacheClean(namespace: string, now: number): Promise<number> {
    const m = this.#ns(namespace);
    let n = 0;
    for (const [k, e] of m) {
      if (e.expires !== null && e.expires <= now) {
        m.delete(k);
        n++;
      }
    }
    return n;
  }

  async close(): Promise<void> {
    this.#grey.clear();
    this.#cache.clear();
  }
}
