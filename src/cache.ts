/**
 * `nodemilter/cache`: {@link AddrCache}, an expiring cache of email
 * addresses and domains (auto-whitelists, blacklists, callback results),
 * like pymilter's `Milter.cache.AddrCache`, on the same stores as the
 * greylist: memory, SQLite (one host) or Redis (a fleet).
 *
 * @module nodemilter/cache
 */
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
 * if (await whitelist.has('<Alice@Example.org>')) { ... }
 * ```
 */
export class AddrCache<V extends CacheValue = CacheValue> {
  /** The store holding the entries. */
  readonly store: Store;
  /** The namespace inside the store. */
  readonly namespace: string;
  /** Seconds an entry lives. */
  readonly ttl: number;
  readonly #clock: () => number;

  constructor(options: AddrCacheOptions = {}) {
    this.store = options.store ?? new MemoryStore();
    this.namespace = checkName('AddrCache namespace', options.namespace ?? 'addr');
    this.ttl = checkSeconds('AddrCache ttl', options.ttl ?? 7 * 86400);
    this.#clock = options.clock ?? (() => Date.now() / 1000);
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

  /** Cache a value (default null) for an address or domain; it expires after `ttl` seconds (default: the cache's). */
  async set(key: string, value: V | null = null, ttl: number = this.ttl): Promise<void> {
    checkSeconds('ttl', ttl);
    const now = this.#clock();
    await this.store.cacheSet(this.namespace, normalizeKey(key), { value: JSON.stringify(value), expires: now + ttl }, now);
  }

  /** Cache a value (default null) that never expires (pymilter's `addperm`). */
  async setPermanent(key: string, value: V | null = null): Promise<void> {
    await this.store.cacheSet(this.namespace, normalizeKey(key), { value: JSON.stringify(value), expires: null }, this.#clock());
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
