/**
 * {@link RedisStore}: greylist records and address-cache entries in Redis,
 * shared by every milter host of a fleet, through the optional peer
 * dependency `ioredis`.
 *
 * @module
 */
import type { Redis, RedisOptions } from 'ioredis';

import { InvalidArgumentError, MissingDependencyError } from '../errors';
import { checkName, tripletKey } from './store';
import type { CacheEntry, GreylistCheck, GreylistOutcome, GreylistRecord, GreylistTiming, Store } from './store';

type RedisCtor = new (...args: any[]) => Redis;
let loaded: RedisCtor | undefined;

function loadIoredis(): RedisCtor {
  if (!loaded) {
    try {
      // eslint-disable-next-line @typescript-eslint/no-require-imports
      const mod = require('ioredis');
      loaded = (mod.Redis ?? mod.default ?? mod) as RedisCtor;
    } catch (err) {
      throw new MissingDependencyError('ioredis', 'RedisStore', err);
    }
  }
  return loaded;
}

/**
 * The greylisting rule of `decideGreylist`, run inside Redis so a check is
 * one atomic step however many hosts check the same triplet at once. Times
 * travel as strings and are stored as given, so no precision is lost in
 * Lua's number formatting.
 *
 * KEYS[1] the record; ARGV: ip, from, to, now, greyTime, greyExpire,
 * greyRetain, ttl (ms). Returns {outcome, firstSeen, lastSeen, count}.
 */
const CHECK_LUA = `
local key = KEYS[1]
local now = tonumber(ARGV[4])
local greyTime, greyExpire, greyRetain = tonumber(ARGV[5]), tonumber(ARGV[6]), tonumber(ARGV[7])
local r = redis.call('HMGET', key, 'first', 'last', 'cnt')
local first, last, cnt = r[1], r[2], tonumber(r[3])
local outcome
if not first or not last or not cnt then
  outcome = 'new'
elseif now > tonumber(last) + greyRetain then
  outcome = 'expired'
elseif now < tonumber(first) + greyTime then
  outcome = 'early'
elseif cnt > 0 or now < tonumber(first) + greyExpire then
  outcome = 'pass'
  cnt = cnt + 1
else
  outcome = 'late'
end
if outcome == 'new' or outcome == 'expired' or outcome == 'late' then
  first = ARGV[4]
  cnt = 0
end
redis.call('HSET', key, 'ip', ARGV[1], 'from', ARGV[2], 'to', ARGV[3], 'first', first, 'last', ARGV[4], 'cnt', cnt)
redis.call('PEXPIRE', key, ARGV[8])
return {outcome, first, ARGV[4], cnt}
`;

/** Delete a record only if it is still older than the cut-off (another host may have just refreshed it). */
const CLEAN_LUA = `
local last = redis.call('HGET', KEYS[1], 'last')
if last and tonumber(last) < tonumber(ARGV[1]) then
  redis.call('DEL', KEYS[1])
  return 1
end
return 0
`;

/** Options of {@link RedisStore}. */
export interface RedisStoreOptions {
  /**
   * An ioredis client to use (the store does not close it). Without it the
   * store connects itself to `url` and closes that connection on close().
   */
  client?: Redis;
  /** Where to connect when no client is given: `redis://host:port/db` (default `redis://127.0.0.1:6379`). */
  url?: string;
  /** Further ioredis options for the store's own connection. */
  redisOptions?: RedisOptions;
  /**
   * The prefix of every key the store writes. Default `nodemilter:`. Give
   * each independent greylist its own prefix when several share a Redis.
   */
  prefix?: string;
}

function globEscape(s: string): string {
  return s.replace(/[*?[\]\\]/g, (c) => '\\' + c);
}

function ttlMs(seconds: number): number {
  return Math.max(1, Math.ceil(seconds * 1000));
}

/**
 * The fleet store: every milter host points at one Redis, so a retry that
 * lands on another MX finds the triplet the first MX recorded.
 *
 * - A greylist check is one Lua script (atomic in Redis): concurrent checks
 *   of one triplet from any number of hosts are each counted exactly once.
 * - Expiry is Redis's: each record's time to live is set to the retain time
 *   at every check, each cache entry's to its expiry. clean() only removes
 *   records whose time to live was set for a different clock (imports).
 * - Times come from the checking host's clock: keep the fleet on NTP.
 *
 * `ioredis` is an optional peer dependency, loaded when the first
 * RedisStore is made; without it the constructor throws
 * {@link MissingDependencyError}.
 *
 * @example
 * ```ts
 * import { Greylist, RedisStore } from 'nodemilter/greylist';
 * const store = new RedisStore({ url: 'redis://redis.internal:6379/2', prefix: 'mx:' });
 * const grey = new Greylist(store);
 * ```
 */
export class RedisStore implements Store {
  /** The key prefix. */
  readonly prefix: string;
  readonly #redis: Redis;
  readonly #owned: boolean;

  constructor(options: RedisStoreOptions = {}) {
    this.prefix = checkName('RedisStore prefix', options.prefix ?? 'nodemilter:');
    if (options.client) {
      if (typeof (options.client as any).defineCommand !== 'function') {
        throw new InvalidArgumentError('RedisStore client must be an ioredis client (it has no defineCommand())');
      }
      this.#redis = options.client;
      this.#owned = false;
    } else {
      const Ctor = loadIoredis();
      const url = options.url ?? 'redis://127.0.0.1:6379';
      if (typeof url !== 'string' || !/^rediss?:\/\//.test(url)) {
        throw new InvalidArgumentError(`RedisStore url must look like redis://host:port/db, got ${JSON.stringify(url)}`);
      }
      // A milter must answer the MTA in time: fail a command rather than queue it forever while Redis is down.
      this.#redis = new Ctor(url, { maxRetriesPerRequest: 1, commandTimeout: 5000, connectTimeout: 5000, ...options.redisOptions });
      this.#owned = true;
    }
    this.#redis.defineCommand('nodemilterGreyCheck', { numberOfKeys: 1, lua: CHECK_LUA });
    this.#redis.defineCommand('nodemilterGreyClean', { numberOfKeys: 1, lua: CLEAN_LUA });
  }

  /** The ioredis client in use. */
  get client(): Redis {
    return this.#redis;
  }

  #greyKey(ip: string, from: string, to: string): string {
    return `${this.prefix}grey:${tripletKey(ip, from, to)}`;
  }

  #cacheKey(namespace: string, key: string): string {
    return `${this.prefix}cache:${namespace}:${key}`;
  }

  async greylistCheck(ip: string, from: string, to: string, now: number, timing: GreylistTiming): Promise<GreylistCheck> {
    const reply = (await (this.#redis as any).nodemilterGreyCheck(
      this.#greyKey(ip, from, to),
      ip, from, to,
      String(now), String(timing.greyTime), String(timing.greyExpire), String(timing.greyRetain),
      String(ttlMs(timing.greyRetain)),
    )) as [GreylistOutcome, string, string, number];
    const [outcome, first, last, count] = reply;
    return { outcome, record: { ip, from, to, firstSeen: Number(first), lastSeen: Number(last), count: Number(count) } };
  }

  async *#scan(match: string): AsyncIterable<string[]> {
    let cursor = '0';
    do {
      const [next, keys] = await this.#redis.scan(cursor, 'MATCH', match, 'COUNT', 500);
      cursor = next;
      if (keys.length) yield keys;
    } while (cursor !== '0');
  }

  async greylistClean(before: number): Promise<number> {
    let n = 0;
    for await (const keys of this.#scan(`${globEscape(this.prefix)}grey:*`)) {
      for (const key of keys) n += Number(await (this.#redis as any).nodemilterGreyClean(key, String(before)));
    }
    return n;
  }

  async *greylistExport(): AsyncIterable<GreylistRecord> {
    for await (const keys of this.#scan(`${globEscape(this.prefix)}grey:*`)) {
      const pipe = this.#redis.pipeline();
      for (const key of keys) pipe.hgetall(key);
      const replies = (await pipe.exec()) ?? [];
      for (const [err, h] of replies) {
        const f = h as Record<string, string> | null;
        if (err || !f || f.first === undefined) continue; // expired between SCAN and HGETALL
        yield { ip: f.ip, from: f.from, to: f.to, firstSeen: Number(f.first), lastSeen: Number(f.last), count: Number(f.cnt) };
      }
    }
  }

  async greylistImport(records: Iterable<GreylistRecord> | AsyncIterable<GreylistRecord>, retain: number, now: number): Promise<number> {
    let n = 0;
    let pipe = this.#redis.pipeline();
    for await (const r of records) {
      const left = r.lastSeen + retain - now;
      if (left <= 0) continue; // would be expired already
      const key = this.#greyKey(r.ip, r.from, r.to);
      pipe.del(key);
      pipe.hset(key, 'ip', r.ip, 'from', r.from, 'to', r.to, 'first', String(r.firstSeen), 'last', String(r.lastSeen), 'cnt', String(r.count));
      pipe.pexpire(key, ttlMs(left));
      n++;
      if (pipe.length >= 3000) {
        await this.#exec(pipe);
        pipe = this.#redis.pipeline();
      }
    }
    await this.#exec(pipe);
    return n;
  }

  async #exec(pipe: ReturnType<Redis['pipeline']>): Promise<void> {
    for (const [err] of (await pipe.exec()) ?? []) if (err) throw err;
  }

  async cacheGet(namespace: string, key: string, now: number): Promise<CacheEntry | undefined> {
    const [value, expires] = await this.#redis.hmget(this.#cacheKey(namespace, key), 'value', 'expires');
    if (value === null) return undefined;
    const exp = expires === null || expires === '' ? null : Number(expires);
    if (exp !== null && exp <= now) return undefined;
    return { value, expires: exp };
  }

  async cacheSet(namespace: string, key: string, entry: CacheEntry, now: number): Promise<void> {
    const k = this.#cacheKey(namespace, key);
    const pipe = this.#redis.multi();
    pipe.del(k);
    pipe.hset(k, 'value', entry.value, 'expires', entry.expires === null ? '' : String(entry.expires));
    if (entry.expires !== null) pipe.pexpire(k, ttlMs(entry.expires - now));
    await this.#exec(pipe);
  }

  async cacheDelete(namespace: string, key: string): Promise<boolean> {
    return (await this.#redis.del(this.#cacheKey(namespace, key))) > 0;
  }

  async cacheClean(namespace: string, now: number): Promise<number> {
    // Redis expires entries itself; this removes only those whose expiry was judged by another clock.
    let n = 0;
    for await (const keys of this.#scan(`${globEscape(this.#cacheKey(namespace, ''))}*`)) {
      for (const key of keys) {
        const expires = await this.#redis.hget(key, 'expires');
        if (expires && Number(expires) <= now) n += await this.#redis.del(key);
      }
    }
    return n;
  }

  async close(): Promise<void> {
    if (!this.#owned) return;
    try {
      await this.#redis.quit();
    } catch {
      this.#redis.disconnect();
    }
  }
}
