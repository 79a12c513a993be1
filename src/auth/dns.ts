/**
 * The one DNS resolver behind SPF, DKIM, DMARC and ARC: a per-lookup
 * timeout, a bounded cache, in-flight sharing, and a metric of lookup
 * latency and failures (DNS is where these milters stall).
 *
 * @module
 */
import { promises as dnsPromises } from 'node:dns';

import { InvalidArgumentError } from '../errors';
import { DEFAULT_BUCKETS } from '../metrics';
import type { Histogram } from '../metrics';

/**
 * A DNS lookup shaped like Node's `dns.promises.resolve(name, rrtype)`, as
 * mailauth calls it: TXT answers are arrays of chunks, others arrays of
 * strings (or records, for MX). Failures reject with an error whose `code`
 * is Node's (`ENOTFOUND`, `ENODATA`, `ETIMEOUT`, `ESERVFAIL`...).
 */
export type DnsResolve = (name: string, rrtype: string) => Promise<any>;

/** How a lookup ended, as counted by {@link DnsMetrics}. */
export type DnsOutcome = 'ok' | 'nxdomain' | 'nodata' | 'timeout' | 'error';

/** What {@link DnsMetrics.snapshot} returns. */
export interface DnsMetricsSnapshot {
  /** Lookups sent to the upstream resolver, per record type and outcome. */
  lookups: Record<string, Partial<Record<DnsOutcome, number>>>;
  /** Answers (or negative answers) served from the cache. */
  cacheHits: number;
  /** Lookups that joined one already in flight for the same name and type. */
  shared: number;
  /** Upstream lookup latency (seconds), all types together. */
  latency: Histogram;
}

/**
 * Counters of the DNS lookups a {@link createResolver} resolver made:
 * latency histogram, outcomes per record type, cache hits. Rendered as
 * Prometheus text by {@link prometheus}, next to
 * `MilterMetrics.prometheus()`.
 *
 * @example
 * ```ts
 * import * as http from 'node:http';
 * const metrics = new MilterMetrics();   // runmilter(..., { metrics })
 * const dnsMetrics = new DnsMetrics();
 * const resolver = createResolver({ timeout: 3000, metrics: dnsMetrics });
 * http.createServer((req, res) => res.end(metrics.prometheus() + dnsMetrics.prometheus())).listen(9464, '127.0.0.1');
 * ```
 */
export class DnsMetrics {
  readonly #lookups = new Map<string, Map<DnsOutcome, number>>();
  #cacheHits = 0;
  #shared = 0;
  readonly #latency: Histogram;

  /** @param options.buckets histogram upper bounds in seconds, ascending (default: those of MilterMetrics). */
  constructor(options: { buckets?: readonly number[] } = {}) {
    const b = options.buckets ?? DEFAULT_BUCKETS;
    if (!Array.isArray(b) || b.length === 0 || b.some((x, i) => !(typeof x === 'number' && x > 0 && Number.isFinite(x)) || (i > 0 && x <= b[i - 1]))) {
      throw new InvalidArgumentError(`DnsMetrics buckets must be ascending positive finite seconds, got ${JSON.stringify(b)}`);
    }
    this.#latency = { buckets: [...b], counts: b.map(() => 0), count: 0, sum: 0 };
  }

  /** Record one upstream lookup. */
  observe(rrtype: string, outcome: DnsOutcome, seconds: number): void {
    let by = this.#lookups.get(rrtype);
    if (!by) this.#lookups.set(rrtype, (by = new Map()));
    by.set(outcome, (by.get(outcome) ?? 0) + 1);
    const h = this.#latency;
    for (let i = 0; i < h.buckets.length; i++) if (seconds <= h.buckets[i]) h.counts[i]++;
    h.count++;
    h.sum += seconds;
  }

  /** Record an answer served from the cache. */
  cacheHit(): void {
    this.#cacheHits++;
  }

  /** Record a lookup that joined one in flight. */
  sharedLookup(): void {
    this.#shared++;
  }

  /** The counters now, as plain data (copies). */
  snapshot(): DnsMetricsSnapshot {
    return {
      lookups: Object.fromEntries([...this.#lookups].map(([t, m]) => [t, Object.fromEntries(m)])),
      cacheHits: this.#cacheHits,
      shared: this.#shared,
      latency: { ...this.#latency, counts: [...this.#latency.counts] },
    };
  }

  /** The counters in Prometheus' text format, names prefixed with `prefix` (default `nodemilter`). */
  prometheus(prefix = 'nodemilter'): string {
    if (!/^[a-zA-Z_:][a-zA-Z0-9_:]*$/.test(prefix)) throw new InvalidArgumentError(`metric prefix must match [a-zA-Z_:][a-zA-Z0-9_:]*, got ${JSON.stringify(prefix)}`);
    const s = this.snapshot();
    const num = (v: number) => (Number.isInteger(v) ? String(v) : v.toPrecision(9).replace(/\.?0+$/, ''));
    const lines = [
      `# HELP ${prefix}_dns_lookups_total DNS lookups sent upstream, per record type and outcome.`,
      `# TYPE ${prefix}_dns_lookups_total counter`,
    ];
    for (const [t, by] of Object.entries(s.lookups)) for (const [o, n] of Object.entries(by)) lines.push(`${prefix}_dns_lookups_total{type="${t}",outcome="${o}"} ${n}`);
    lines.push(`# HELP ${prefix}_dns_cache_hits_total DNS answers served from the cache.`, `# TYPE ${prefix}_dns_cache_hits_total counter`, `${prefix}_dns_cache_hits_total ${s.cacheHits}`);
    lines.push(`# HELP ${prefix}_dns_shared_total DNS lookups that joined one in flight.`, `# TYPE ${prefix}_dns_shared_total counter`, `${prefix}_dns_shared_total ${s.shared}`);
    lines.push(`# HELP ${prefix}_dns_lookup_duration_seconds Upstream DNS lookup latency.`, `# TYPE ${prefix}_dns_lookup_duration_seconds histogram`);
    s.latency.buckets.forEach((b, i) => lines.push(`${prefix}_dns_lookup_duration_seconds_bucket{le="${num(b)}"} ${s.latency.counts[i]}`));
    lines.push(
      `${prefix}_dns_lookup_duration_seconds_bucket{le="+Inf"} ${s.latency.count}`,
      `${prefix}_dns_lookup_duration_seconds_sum ${num(s.latency.sum)}`,
      `${prefix}_dns_lookup_duration_seconds_count ${s.latency.count}`,
    );
    return lines.join('\n') + '\n';
  }
}

/** Options of {@link createResolver}. */
export interface ResolverOptions {
  /**
   * The upstream lookup (default: a `dns.promises.Resolver` with one try per
   * lookup, on the system's servers or {@link servers}).
   */
  resolve?: DnsResolve;
  /** DNS servers for the default upstream (`['127.0.0.1', '[::1]:5353']`); ignored with `resolve`. */
  servers?: string[];
  /** Milliseconds one lookup may take before it fails with `ETIMEOUT` (a temperror). Default 5000. */
  timeout?: number;
  /** Cache entries kept (least recently used dropped first); 0 disables the cache. Default 10000. */
  cacheSize?: number;
  /** Seconds an answer stays cached (Node's resolver does not give TTLs). Default 300. */
  cacheTtl?: number;
  /** Seconds a negative answer (ENOTFOUND, ENODATA) stays cached. Default 60. Timeouts and server failures are never cached. */
  negativeTtl?: number;
  /** Where lookups are counted. */
  metrics?: DnsMetrics;
  /** The clock, for tests (milliseconds). Default `Date.now`. */
  now?: () => number;
}

interface CacheEntry {
  expires: number;
  value?: unknown;
  error?: NodeJS.ErrnoException;
}

const NEGATIVE = new Set(['ENOTFOUND', 'ENODATA']);

function outcomeOf(err: NodeJS.ErrnoException | undefined): DnsOutcome {
  if (!err) return 'ok';
  if (err.code === 'ENOTFOUND') return 'nxdomain';
  if (err.code === 'ENODATA') return 'nodata';
  if (err.code === 'ETIMEOUT') return 'timeout';
  return 'error';
}

function checkNumber(name: string, v: unknown, min: number): number | undefined {
  if (v === undefined) return undefined;
  if (typeof v !== 'number' || !Number.isFinite(v) || v < min) {
    throw new InvalidArgumentError(`resolver option ${name} ${JSON.stringify(v)} is invalid: expected a number >= ${min}`);
  }
  return v;
}

/**
 * A resolver for mailauth (and anything else shaped like
 * `dns.promises.resolve`) with a per-lookup timeout, a cache and metrics.
 * A lookup that takes longer than `timeout` rejects with code `ETIMEOUT`,
 * which SPF, DKIM, DMARC and ARC report as `temperror`; nothing throws past
 * the checks. Concurrent lookups of the same name and type share one
 * upstream query.
 *
 * @example
 * ```ts
 * const resolver = createResolver({ timeout: 3000, servers: ['127.0.0.1'], metrics: new DnsMetrics() });
 * const v = await verifyMessage(message, { ip, helo, sender, authservId: 'mx.example.org', resolver });
 * ```
 */
export function createResolver(options: ResolverOptions = {}): DnsResolve {
  const timeout = checkNumber('timeout', options.timeout, 1) ?? 5000;
  const cacheSize = checkNumber('cacheSize', options.cacheSize, 0) ?? 10_000;
  const cacheTtl = (checkNumber('cacheTtl', options.cacheTtl, 0) ?? 300) * 1000;
  const negativeTtl = (checkNumber('negativeTtl', options.negativeTtl, 0) ?? 60) * 1000;
  const now = options.now ?? Date.now;
  const metrics = options.metrics;
  let upstream = options.resolve;
  if (upstream !== undefined && typeof upstream !== 'function') {
    throw new InvalidArgumentError(`resolver option resolve must be a function (name, rrtype) => Promise, got ${typeof upstream}`);
  }
  if (!upstream) {
    // One try per lookup and our own deadline on top: c-ares would otherwise retry for tries * timeout.
    const r = new dnsPromises.Resolver({ timeout, tries: 1 });
    if (options.servers) r.setServers(options.servers);
    upstream = (name, rrtype) => r.resolve(name, rrtype as 'TXT');
  }
  const resolve = upstream;
  const cache = new Map<string, CacheEntry>();
  const inflight = new Map<string, Promise<unknown>>();

  const lookup = async (name: string, rrtype: string): Promise<unknown> => {
    const start = process.hrtime.bigint();
    let timer: NodeJS.Timeout | undefined;
    try {
      const value = await Promise.race([
        resolve(name, rrtype),
        new Promise<never>((_, reject) => {
          timer = setTimeout(() => {
            const err: NodeJS.ErrnoException = new Error(`DNS ${rrtype} ${name}: no answer within ${timeout} ms`);
            err.code = 'ETIMEOUT';
            reject(err);
          }, timeout);
        }),
      ]);
      metrics?.observe(rrtype, 'ok', Number(process.hrtime.bigint() - start) / 1e9);
      if (cacheSize > 0 && cacheTtl > 0) store(`${name} ${rrtype}`, { expires: now() + cacheTtl, value });
      return value;
    } catch (e) {
      const err = (e instanceof Error ? e : new Error(String(e))) as NodeJS.ErrnoException;
      metrics?.observe(rrtype, outcomeOf(err), Number(process.hrtime.bigint() - start) / 1e9);
      if (cacheSize > 0 && negativeTtl > 0 && NEGATIVE.has(err.code ?? '')) store(`${name} ${rrtype}`, { expires: now() + negativeTtl, error: err });
      throw err;
    } finally {
      clearTimeout(timer);
    }
  };

  const store = (key: string, entry: CacheEntry) => {
    cache.delete(key);
    cache.set(key, entry);
    while (cache.size > cacheSize) cache.delete(cache.keys().next().value as string);
  };

  return (rawName: string, rawType: string) => {
    if (typeof rawName !== 'string' || typeof rawType !== 'string') {
      return Promise.reject(new InvalidArgumentError(`DNS lookup needs a name and a record type (strings), got ${JSON.stringify(rawName)} ${JSON.stringify(rawType)}`));
    }
    const name = rawName.toLowerCase().replace(/\.$/, '');
    const rrtype = rawType.toUpperCase();
    const key = `${name} ${rrtype}`;
    const hit = cache.get(key);
    if (hit) {
      if (hit.expires > now()) {
        cache.delete(key); // refresh its place in the LRU order
        cache.set(key, hit);
        metrics?.cacheHit();
        return hit.error ? Promise.reject(hit.error) : Promise.resolve(hit.value);
      }
      cache.delete(key);
    }
    const running = inflight.get(key);
    if (running) {
      metrics?.sharedLookup();
      return running;
    }
    const p = lookup(name, rrtype).finally(() => inflight.delete(key));
    inflight.set(key, p);
    return p;
  };
}

/**
 * A resolver over fixed records, for tests and offline runs. Keys are
 * `"name TYPE"` (`"example.org TXT"`); TXT values are strings (one chunk
 * each). A name with no entry fails like Node's resolver does for a missing
 * name (`ENOTFOUND`), and a name with other types only gives `ENODATA`.
 *
 * @example
 * ```ts
 * const resolver = staticResolver({ 'example.org TXT': ['v=spf1 ip4:192.0.2.0/24 -all'] });
 * ```
 */
export function staticResolver(records: Record<string, string[]>): DnsResolve {
  const keyOf = (name: string, rrtype: string) => `${name.toLowerCase().replace(/\.$/, '')} ${rrtype.toUpperCase()}`;
  const zone = new Map<string, string[]>();
  for (const [key, values] of Object.entries(records)) {
    const m = /^(\S+)\s+([A-Za-z]+)$/.exec(key.trim());
    if (!m) throw new InvalidArgumentError(`staticResolver: record key ${JSON.stringify(key)} is invalid: expected "name TYPE", e.g. "example.org TXT"`);
    if (!Array.isArray(values) || values.some((v) => typeof v !== 'string')) {
      throw new InvalidArgumentError(`staticResolver: record ${JSON.stringify(key)} must be an array of strings`);
    }
    zone.set(keyOf(m[1], m[2]), values);
  }
  return async (name: string, rrtype: string) => {
    const found = zone.get(keyOf(name, rrtype));
    if (found) return rrtype.toUpperCase() === 'TXT' ? found.map((s) => [s]) : found;
    const known = [...zone.keys()].some((k) => k.startsWith(`${name.toLowerCase().replace(/\.$/, '')} `));
    const err: NodeJS.ErrnoException = new Error(`${rrtype} ${name}: ${known ? 'no data' : 'not found'}`);
    err.code = known ? 'ENODATA' : 'ENOTFOUND';
    throw err;
  };
}
