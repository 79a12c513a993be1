/**
 * `nodemilter/cache`: {@link AddrCache}, an expiring cache of email
 * addresses and domains (auto-whitelists, blacklists, callback results),
 * like pymilter's `Milter.cache.AddrCache`, on the same stores as the
 * greylist: memory, SQLite (one host) or Redis (a fleet).
 *
 * @module nodemilter/cache
 */
import { promises as fsp } from 'node:fs';
import { InvalidArgumentError } from './errors';
import { checkName, checkSeconds, MemoryStore } from './greylist/store';
import type { Store } from './greylist/store';

/** Options of {@link AddrCache}. */
export interface AddrCacheOptions {
  /** Where entries live. Default: a new {@link MemoryStore} (this process only). */
  store?: Store;
  /**
   * The cache's name inside the store, so several caches (say `whitelist`
   * and `cbv`) share one store. Default `addr`.
   */
  namespace?: string;
  /** How long an entry lives, in seconds. Default 7 days (pymilter's `renew=7`, in days). */
  ttl?: number;
  /** The current time in Unix seconds (default: the system clock). */
  clock?: () => number;
  /**
   * A file to append entries to in pymilter's format (see
   * {@link AddrCache.load}): `set(key)` without a value writes
   * `key timestamp`, `setPermanent(key)` without a value writes `key`.
   * Entries with a value are not written, as in pymilter. Default: none.
   */
  file?: string;
}

const MONTHS = ['Jan', 'Feb', 'Mar', 'Apr', 'May', 'Jun', 'Jul', 'Aug', 'Sep', 'Oct', 'Nov', 'Dec'];
const pad = (n: number) => String(n).padStart(2, '0');

/**
 * A time as pymilter's AddrCache writes it (Python's `%Y%b%d %H:%M:%S %Z`,
 * local time), e.g. `2026Dec01 20:35:00 UTC`.
 */
function formatStamp(unixSeconds: number): string {
  const d = new Date(unixSeconds * 1000);
  const zone = new Intl.DateTimeFormat('en-US', { timeZoneName: 'short' }).formatToParts(d).find((p) => p.type === 'timeZoneName')?.value ?? 'UTC';
  return `${d.getFullYear()}${MONTHS[d.getMonth()]}${pad(d.getDate())} ${pad(d.getHours())}:${pad(d.getMinutes())}:${pad(d.getSeconds())} ${zone}`;
}

/** The Unix time of a pymilter timestamp (read as local time, like Python's mktime), or undefined if it is not one. */
function parseStamp(s: string): number | undefined {
  const m = /^(\d{4})([A-Za-z]{3})(\d{2}) (\d{2}):(\d{2}):(\d{2})(?: \S+)?$/.exec(s.trim());
  if (!m) return undefined;
  const month = MONTHS.findIndex((x) => x.toLowerCase() === m[2].toLowerCase());
  if (month < 0) return undefined;
  const t = new Date(Number(m[1]), month, Number(m[3]), Number(m[4]), Number(m[5]), Number(m[6])).getTime();
  return Number.isFinite(t) ? t / 1000 : undefined;
}

/** What {@link AddrCache.load} did. */
export interface AddrCacheLoadResult {
  /** Entries loaded. */
  loaded: number;
  /** Lines dropped: older than the age, or with a timestamp that does not parse. */
  dropped: number;
}

/** A cached value: any JSON value; `null` is pymilter's `None` ("present, nothing more to say"). */
export type CacheValue = string | number | boolean | null | CacheValue[] | { [key: string]: CacheValue };

/** What {@link AddrCache.lookup} found. */
export interface CacheHit<V> {
  /** The key that matched: the address itself or its domain. */
  key: string;
  /** The cached value. */
  value: V;
  /** When the entry expires (Unix seconds), or null for a permanent entry. */
  expires: number | null;
}

function normalizeKey(address: string): string {
  if (typeof address !== 'string') throw new InvalidArgumentError(`AddrCache key must be a string, got ${typeof address}`);
  const s = address.trim();
  const m = /^<(.*)>$/s.exec(s);
  const key = (m ? m[1] : s).trim().toLowerCase();
  if (key.length === 0) throw new InvalidArgumentError(`AddrCache key must be an address or a domain, got ${JSON.stringify(address)}`);
  return key;
}

/** The domain of an address (after the last `@`), or undefined for a bare domain. */
function domainOf(key: string): string | undefined {
  const at = key.lastIndexOf('@');
  return at >= 0 && at < key.length - 1 ? key.slice(at + 1) : undefined;
}

/**
 * An expiring address cache: per address, falling back to the domain. An
 * entry stored for `example.com` answers for every `user@example.com`
 * that has no entry of its own. Keys are lower-cased; angle brackets are
 * dropped. Entries expire `ttl` seconds after they were set, unless set
 * with {@link AddrCache.setPermanent}.
 *
 * @example
 * ```ts
 * import { AddrCache } from 'nodemilter/cache';
 * import { RedisStore } from 'nodemilter/greylist';
 *
 * const whitelist = new AddrCache({ store: new RedisStore({ url }), namespace: 'autowhite', ttl: 30 * 86400 });
 * await whitelist.set('alice@example.org');        // seen a good message from alice
 * await whitelist.setPermanent('partner.example'); // a whole domain, no expiry
 * if (await whitelist.has('<Alice@Example.org>')) {
 *   // a known sender: skip the expensive checks
 * }
 * ```
 */
export class AddrCache<V extends CacheValue = CacheValue> {
  /** The store holding the entries. */
  readonly store: Store;
  /** The namespace inside the store. */
  readonly namespace: string;
  /** Seconds an entry lives. */
  readonly ttl: number;
  /** The file entries are appended to (see {@link AddrCacheOptions.file}), if any. */
  file: string | undefined;
  readonly #clock: () => number;

  constructor(options: AddrCacheOptions = {}) {
    this.store = options.store ?? new MemoryStore();
    this.namespace = checkName('AddrCache namespace', options.namespace ?? 'addr');
    this.ttl = checkSeconds('AddrCache ttl', options.ttl ?? 7 * 86400);
    this.#clock = options.clock ?? (() => Date.now() / 1000);
    if (options.file !== undefined && (typeof options.file !== 'string' || options.file === '')) {
      throw new InvalidArgumentError(`AddrCache file must be a non-empty path, got ${JSON.stringify(options.file)}`);
    }
    this.file = options.file;
  }

  /**
   * Load entries from a file in pymilter's AddrCache format, and use it
   * from now on (as {@link AddrCacheOptions.file}). Each line is
   * `address timestamp` (an entry set at that time, local time as
   * `2026Dec01 20:35:00 UTC`), or a bare `address` or domain (a plain list,
   * or an entry from {@link AddrCache.setPermanent}). A missing file loads
   * nothing.
   *
   * Timestamped entries older than `ageDays` (default: the cache's ttl) are
   * dropped, as are lines whose timestamp does not parse; the others expire
   * `ttl` seconds after their timestamp. When lines were dropped, the file
   * is rewritten without them (via a temporary file and a rename), as
   * pymilter does. Bare lines are permanent here; pymilter keeps them for
   * its `renew` days after each load (see docs/pymilter-migration.md).
   */
  async load(file: string, ageDays?: number): Promise<AddrCacheLoadResult> {
    if (typeof file !== 'string' || file === '') throw new InvalidArgumentError(`AddrCache.load: expected a file name, got ${JSON.stringify(file)}`);
    const age = ageDays === undefined ? this.ttl : checkSeconds('AddrCache.load ageDays', ageDays * 86400);
    this.file = file;
    let text: string;
    try {
      text = await fsp.readFile(file, 'utf8');
    } catch (err) {
      if ((err as NodeJS.ErrnoException).code === 'ENOENT') return { loaded: 0, dropped: 0 };
      throw err;
    }
    const now = this.#clock();
    const kept: string[] = [];
    let loaded = 0;
    let dropped = 0;
    for (const line of text.split('\n')) {
      const l = line.trim();
      if (l === '') continue;
      const sp = l.search(/\s/);
      if (sp < 0) {
        await this.store.cacheSet(this.namespace, normalizeKey(l), { value: 'null', expires: null }, now);
      } else {
        const t = parseStamp(l.slice(sp + 1));
        if (t === undefined || t < now - age) {
          dropped++;
          continue;
        }
        await this.store.cacheSet(this.namespace, normalizeKey(l.slice(0, sp)), { value: 'null', expires: t + this.ttl }, now);
      }
      kept.push(line.replace(/\r$/, ''));
      loaded++;
    }
    if (dropped > 0) {
      const tmp = `${file}.${process.pid}.tmp`;
      await fsp.writeFile(tmp, kept.map((l) => l + '\n').join(''));
      await fsp.rename(tmp, file);
    }
    return { loaded, dropped };
  }

  async #append(line: string): Promise<void> {
    if (this.file !== undefined) await fsp.appendFile(this.file, line + '\n');
  }

  /** Whether exactly this key (address or domain) is cached, without the domain fallback. */
  async hasPrecise(key: string): Promise<boolean> {
    return (await this.store.cacheGet(this.namespace, normalizeKey(key), this.#clock())) !== undefined;
  }

  /** Whether the address, or failing that its domain, is cached. */
  async has(address: string): Promise<boolean> {
    return (await this.lookup(address)) !== undefined;
  }

  /**
   * The value cached for the address, or failing that for its domain;
   * undefined if neither is cached.
   */
  async get(address: string): Promise<V | undefined> {
    return (await this.lookup(address))?.value;
  }

  /** Like {@link AddrCache.get}, also telling which key matched and when it expires (null: permanent). */
  async lookup(address: string): Promise<CacheHit<V> | undefined> {
    const key = normalizeKey(address);
    const now = this.#clock();
    for (const k of [key, domainOf(key)]) {
      if (k === undefined) continue;
      const e = await this.store.cacheGet(this.namespace, k, now);
      if (e) return { key: k, value: JSON.parse(e.value) as V, expires: e.expires };
    }
    return undefined;
  }

  /**
   * Cache a value (default null) for an address or domain; it expires after
   * `ttl` seconds (default: the cache's). Without a value, and with a
   * {@link AddrCache.file}, the line `key timestamp` is appended to it.
   */
  async set(key: string, value: V | null = null, ttl: number = this.ttl): Promise<void> {
    checkSeconds('ttl', ttl);
    const now = this.#clock();
    const k = normalizeKey(key);
    await this.store.cacheSet(this.namespace, k, { value: JSON.stringify(value), expires: now + ttl }, now);
    if (value === null) await this.#append(`${k} ${formatStamp(now)}`);
  }

  /**
   * Cache a value (default null) that never expires (pymilter's `addperm`).
   * Without a value, and with a {@link AddrCache.file}, the line `key` is
   * appended to it (unless the key was permanent already).
   */
  async setPermanent(key: string, value: V | null = null): Promise<void> {
    const k = normalizeKey(key);
    const now = this.#clock();
    const before = await this.store.cacheGet(this.namespace, k, now);
    await this.store.cacheSet(this.namespace, k, { value: JSON.stringify(value), expires: null }, now);
    if (value === null && !(before && before.expires === null)) await this.#append(k);
  }

  /** Remove exactly this key; resolves to whether it was cached. */
  async delete(key: string): Promise<boolean> {
    return this.store.cacheDelete(this.namespace, normalizeKey(key));
  }

  /** Drop expired entries (stores that expire entries themselves, like Redis, have little to do). Resolves to how many. */
  async clean(): Promise<number> {
    return this.store.cacheClean(this.namespace, this.#clock());
  }
}
