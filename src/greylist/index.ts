/**
 * `nodemilter/greylist`: greylisting with pymilter's semantics on a
 * pluggable store: {@link SqliteStore} for one host (embedded, persistent),
 * {@link RedisStore} for a fleet of MX hosts sharing state,
 * {@link MemoryStore} for tests. The same stores back the address cache
 * (`nodemilter/cache`).
 *
 * @example
 * ```ts
 * import { Greylist, RedisStore } from 'nodemilter/greylist';
 * const grey = new Greylist(new RedisStore({ url: 'redis://10.0.0.5:6379' }), { greyTime: 300 });
 * if ((await grey.check(ip, from, rcpt)) === 0) {
 *   // greylisted: setreply('451', '4.7.1', ...) and TEMPFAIL
 * }
 * ```
 *
 * @module nodemilter/greylist
 */
export { Greylist, normalizeAddress } from './greylist';
export type { GreylistOptions, GreylistVerdict } from './greylist';
export { MemoryStore, decideGreylist, tripletKey } from './store';
export type { Store, GreylistRecord, GreylistTiming, GreylistOutcome, GreylistCheck, CacheEntry } from './store';
export { SqliteStore } from './sqlite';
export type { SqliteStoreOptions } from './sqlite';
export { RedisStore } from './redis';
export type { RedisStoreOptions } from './redis';
