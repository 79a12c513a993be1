// AddrCache: per-address entries with domain fallback and expiry, on the
// memory, SQLite and (real) Redis stores; shared between processes/hosts.
import * as path from 'node:path';
import { afterEach, describe, expect, it } from 'vitest';

import { AddrCache } from '../src/cache';
import { InvalidArgumentError } from '../src/errors';
import { MemoryStore, RedisStore, SqliteStore } from '../src/greylist/index';
import type { Store } from '../src/greylist/index';
import { stopAll, tmpDir } from './helpers';
import { REDIS_AVAILABLE, startRedis } from './helpers/redis';

afterEach(async () => {
  await stopAll();
});

type Kind = 'memory' | 'sqlite' | 'redis';
const KINDS: Kind[] = ['memory', 'sqlite', ...(REDIS_AVAILABLE ? (['redis'] as const) : [])];

async function makeStores(kind: Kind, n = 1): Promise<Store[]> {
  if (kind === 'memory') {
    const s = new MemoryStore();
    return Array(n).fill(s);
  }
  if (kind === 'sqlite') {
    const file = path.join(tmpDir('nm-cache-'), 'cache.db');
    return Array.from({ length: n }, () => new SqliteStore(file));
  }
  const r = await startRedis();
  return Array.from({ length: n }, () => new RedisStore({ url: r.url }));
}

describe.each(KINDS)('AddrCache on the %s store', (kind) => {
  it('answers per address, falls back to the domain, expires, and keeps permanent entries', async () => {
    const [store] = await makeStores(kind);
    const clock = { now: 1_700_000_000 };
    const cache = new AddrCache<string | null>({ store, namespace: 'white', ttl: 7 * 86400, clock: () => clock.now });
    try {
      await cache.set('<Alice@Example.org>');
      await cache.set('partner.example', 'domain-ok');
      await cache.setPermanent('boss@example.org', 'vip');

      expect(await cache.has('alice@example.org')).toBe(true);
      expect(await cache.get('ALICE@example.org')).toBe(null);
      expect(await cache.hasPrecise('alice@example.org')).toBe(true);
      expect(await cache.hasPrecise('example.org')).toBe(false);
      expect(await cache.lookup('anyone@partner.example')).toEqual({ key: 'partner.example', value: 'domain-ok', expires: clock.now + 7 * 86400 });
      expect(await cache.has('anyone@other.example')).toBe(false);
      expect(await cache.get('anyone@other.example')).toBeUndefined();

      clock.now += 7 * 86400 + 1;
      expect(await cache.has('alice@example.org')).toBe(false);
      expect(await cache.has('x@partner.example')).toBe(false);
      expect(await cache.lookup('boss@example.org')).toEqual({ key: 'boss@example.org', value: 'vip', expires: null });

      // A per-address entry wins over the domain's.
      await cache.set('example.org', 'domain');
      await cache.set('eve@example.org', 'eve');
      expect(await cache.get('eve@example.org')).toBe('eve');
      expect(await cache.get('zed@example.org')).toBe('domain');
      expect(await cache.delete('eve@example.org')).toBe(true);
      expect(await cache.delete('eve@example.org')).toBe(false);
      expect(await cache.get('eve@example.org')).toBe('domain');

      // Namespaces are separate caches in one store.
      const black = new AddrCache({ store, namespace: 'black', clock: () => clock.now });
      expect(await black.has('boss@example.org')).toBe(false);
    } finally {
      await store.close();
    }
  });

  it('clean() drops entries expired at the cache clock and keeps the others', async () => {
    const [store] = await makeStores(kind);
    const clock = { now: Date.now() / 1000 };
    const cache = new AddrCache({ store, namespace: 'c', ttl: 3600, clock: () => clock.now });
    try {
      await cache.set('old@example.org', { n: 1 });
      clock.now += 1800;
      await cache.set('new@example.org', [1, 'two']);
      clock.now += 1900;
      expect(await cache.clean()).toBe(1);
      expect(await cache.has('old@example.org')).toBe(false);
      expect(await cache.get('new@example.org')).toEqual([1, 'two']);
    } finally {
      await store.close();
    }
  });

  it.skipIf(kind === 'memory')('two store connections (two hosts) share the entries', async () => {
    const [s1, s2] = await makeStores(kind, 2);
    try {
      await new AddrCache({ store: s1, namespace: 'shared' }).set('carol@example.org', 'cbv-ok');
      expect(await new AddrCache({ store: s2, namespace: 'shared' }).get('carol@example.org')).toBe('cbv-ok');
    } finally {
      await s1.close();
      await s2.close();
    }
  });
});

describe.skipIf(!REDIS_AVAILABLE)('AddrCache on Redis', () => {
  it('lets Redis expire entries (TTL)', async () => {
    const r = await startRedis();
    const store = new RedisStore({ url: r.url, prefix: 'x:' });
    try {
      const cache = new AddrCache({ store, namespace: 'ttl', ttl: 0.5 });
      await cache.set('a@example.org');
      await cache.setPermanent('b@example.org');
      expect(await store.client.pttl('x:cache:ttl:a@example.org')).toBeGreaterThan(0);
      expect(await store.client.pttl('x:cache:ttl:b@example.org')).toBe(-1);
      await new Promise((res) => setTimeout(res, 1000));
      expect(await store.client.exists('x:cache:ttl:a@example.org')).toBe(0);
      expect(await cache.has('b@example.org')).toBe(true);
    } finally {
      await store.close();
    }
  });
});

describe('AddrCache input', () => {
  it('rejects empty keys and bad options with typed errors', async () => {
    const cache = new AddrCache();
    await expect(cache.set('<>')).rejects.toThrow(/AddrCache key must be an address or a domain, got "<>"/);
    await expect(cache.set('a@b', null, -5)).rejects.toThrow(InvalidArgumentError);
    expect(() => new AddrCache({ namespace: '' })).toThrow(/namespace must be a non-empty string/);
    expect(() => new AddrCache({ ttl: Number.NaN })).toThrow(/ttl must be a finite number of seconds/);
  });
});
