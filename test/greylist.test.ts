// Greylist semantics on every store (memory, SQLite, a real redis-server),
// compared with pymilter's Milter.greysql; persistence; CSV export/import
// shared with pymilter; Redis atomicity and expiry; the optional-peer error.
import { spawnSync } from 'node:child_process';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { Redis } from 'ioredis';
import { afterEach, describe, expect, it } from 'vitest';

import { InvalidArgumentError, MissingDependencyError } from '../src/errors';
import { Greylist, MemoryStore, RedisStore, SqliteStore, decideGreylist, normalizeAddress } from '../src/greylist/index';
import type { Store } from '../src/greylist/index';
import { stopAll, SYSTEM_PYTHON, tmpDir } from './helpers';
import { REDIS_AVAILABLE, startRedis } from './helpers/redis';

const ROOT = path.resolve(__dirname, '..');

afterEach(async () => {
  await stopAll();
});

/** A clock the test moves by hand (Unix seconds). */
function manualClock(start = 1_700_000_000) {
  const c = { now: start, fn: () => c.now };
  return c;
}

type StoreKind = 'memory' | 'sqlite' | 'redis';
const KINDS: StoreKind[] = ['memory', 'sqlite', ...(REDIS_AVAILABLE ? (['redis'] as const) : [])];

async function makeStore(kind: StoreKind): Promise<{ store: Store; redis?: Redis; close: () => Promise<void> }> {
  if (kind === 'memory') {
    const store = new MemoryStore();
    return { store, close: () => store.close() };
  }
  if (kind === 'sqlite') {
    const store = new SqliteStore(path.join(tmpDir('nm-grey-'), 'grey.db'));
    return { store, close: () => store.close() };
  }
  const r = await startRedis();
  const store = new RedisStore({ url: r.url, prefix: 't:' });
  const redis = new Redis(r.url);
  return {
    store,
    redis,
    close: async () => {
      await store.close();
      redis.disconnect();
    },
  };
}

describe.each(KINDS)('greylist semantics on the %s store', (kind) => {
  it('greylists, passes after greyTime, counts, restarts late or expired triplets', async () => {
    const { store, close } = await makeStore(kind);
    const clock = manualClock();
    const g = new Greylist(store, { greyTime: 600, greyExpire: 4 * 3600, greyRetain: 36 * 86400, clock: clock.fn });
    try {
      const T = ['192.0.2.7', '<alice@example.org>', '<bob@example.net>'] as const;
      let v = await g.evaluate(...T);
      expect([v.outcome, v.count, v.retryAfter]).toEqual(['new', 0, 600]);
      clock.now += 300;
      v = await g.evaluate(...T);
      expect([v.outcome, v.count, v.retryAfter]).toEqual(['early', 0, 300]);
      clock.now += 301; // 601 s after the first attempt
      v = await g.evaluate(...T);
      expect([v.outcome, v.count, v.retryAfter]).toEqual(['pass', 1, 0]);
      clock.now += 86400; // a day later: already passed, passes at once
      expect(await g.check(...T)).toBe(2);
      // Case and brackets do not make a new triplet.
      expect(await g.check('192.0.2.7', 'ALICE@example.org', 'Bob@Example.NET')).toBe(3);
      expect(v.record.firstSeen).toBe(1_700_000_000);

      // A second triplet whose retry comes after greyExpire starts over.
      const U = ['192.0.2.8', '<carol@example.org>', '<bob@example.net>'] as const;
      expect((await g.evaluate(...U)).outcome).toBe('new');
      clock.now += 5 * 3600;
      v = await g.evaluate(...U);
      expect([v.outcome, v.count, v.record.firstSeen]).toEqual(['late', 0, clock.now]);

      // Not seen for longer than greyRetain: forgotten, greylisted again.
      clock.now += 37 * 86400;
      v = await g.evaluate(...T);
      expect([v.outcome, v.count]).toEqual(['expired', 0]);
    } finally {
      await close();
    }
  });

  it('clean() deletes only records past the retain time; export skips them', async () => {
    const { store, close } = await makeStore(kind);
    const clock = manualClock();
    const g = new Greylist(store, { greyTime: 60, greyExpire: 3600, greyRetain: 86400, clock: clock.fn });
    try {
      await g.check('192.0.2.1', 'a@x.example', 'b@y.example');
      clock.now += 80000;
      await g.check('192.0.2.2', 'a@x.example', 'b@y.example');
      clock.now += 10000; // the first is 90000 s old, the second 10000 s
      const exported = [];
      for await (const r of g.export()) exported.push(r.ip);
      expect(exported).toEqual(['192.0.2.2']);
      expect(await g.clean()).toBe(1);
      const all = [];
      for await (const r of store.greylistExport()) all.push(r.ip);
      expect(all).toEqual(['192.0.2.2']);
    } finally {
      await close();
    }
  });

  it('exportCsv/importCsv round-trips records, including addresses with commas and quotes', async () => {
    const a = await makeStore(kind);
    const b = await makeStore('memory');
    const clock = manualClock();
    try {
      const g1 = new Greylist(a.store, { clock: clock.fn });
      const g2 = new Greylist(b.store, { clock: clock.fn });
      await g1.check('2001:db8:1:2::7', '"odd,name"@example.org', 'x@example.net');
      await g1.check('198.51.100.9', '', 'postmaster@example.net');
      clock.now += 700;
      await g1.check('198.51.100.9', '<>', '<postmaster@example.net>');
      const csv = await g1.exportCsv();
      expect(csv).toContain('"""odd,name""@example.org"');
      expect(await g2.importCsv(csv)).toBe(2);
      const recs = [];
      for await (const r of g2.export()) recs.push(r);
      recs.sort((x, y) => x.ip.localeCompare(y.ip));
      expect(recs).toEqual([
        { ip: '198.51.100.9', from: '', to: 'postmaster@example.net', firstSeen: clock.now - 700, lastSeen: clock.now, count: 1 },
        { ip: '2001:db8:1:2::/64', from: '"odd,name"@example.org', to: 'x@example.net', firstSeen: clock.now - 700, lastSeen: clock.now - 700, count: 0 },
      ]);
    } finally {
      await a.close();
      await b.close();
    }
  });
});

describe('Greylist options and input', () => {
  it('normalizes addresses and IPs (IPv4-mapped, prefixes)', () => {
    expect(normalizeAddress(' <Alice@Example.ORG> ')).toBe('alice@example.org');
    expect(normalizeAddress('<>')).toBe('');
    const g = new Greylist(new MemoryStore());
    expect(g.normalizeIp('::ffff:192.0.2.7')).toBe('192.0.2.7');
    expect(g.normalizeIp('2001:db8:1:2:3:4:5:6')).toBe('2001:db8:1:2::/64');
    const g24 = new Greylist(new MemoryStore(), { ipv4Prefix: 24, ipv6Prefix: 128 });
    expect(g24.normalizeIp('192.0.2.77')).toBe('192.0.2.0/24');
    expect(g24.normalizeIp('2001:db8::1')).toBe('2001:db8::1');
  });

  it('a /24 greylist lets the retry come from a neighbouring address', async () => {
    const clock = manualClock();
    const g = new Greylist(new MemoryStore(), { ipv4Prefix: 24, greyTime: 60, clock: clock.fn });
    expect(await g.check('192.0.2.10', 'a@x.example', 'b@y.example')).toBe(0);
    clock.now += 61;
    expect(await g.check('192.0.2.11', 'a@x.example', 'b@y.example')).toBe(1);
  });

  it('rejects bad options and addresses with typed errors naming the value', async () => {
    const s = new MemoryStore();
    expect(() => new Greylist(s, { greyTime: -1 })).toThrow(/greyTime must be a finite number of seconds >= 0, got -1/);
    expect(() => new Greylist(s, { greyTime: 600, greyExpire: 600 })).toThrow(InvalidArgumentError);
    expect(() => new Greylist(s, { greyExpire: 7200, greyRetain: 3600 })).toThrow(/greyRetain \(3600 s\) must be at least greyExpire/);
    expect(() => new Greylist(s, { ipv4Prefix: 33 })).toThrow(/ipv4Prefix must be an integer from 0 to 32, got 33/);
    expect(() => new Greylist({} as Store)).toThrow(/needs a Store or a SQLite file path/);
    await expect(new Greylist(s).check('not-an-ip', 'a@b', 'c@d')).rejects.toThrow(/not an IP address: "not-an-ip"/);
    await expect(new Greylist(s).importCsv('1.2.3.4,a,b,x,2,3,\r\n')).rejects.toThrow(/line 1: firstseen, lastseen and cnt must be numbers/);
    expect(() => new SqliteStore('')).toThrow(InvalidArgumentError);
  });

  it('decideGreylist is the one rule: boundaries are exact', () => {
    const t = { greyTime: 600, greyExpire: 3600, greyRetain: 7200 };
    const rec = { ip: 'i', from: 'f', to: 't', firstSeen: 1000, lastSeen: 1000, count: 0 };
    expect(decideGreylist(rec, 'i', 'f', 't', 1599.999, t).outcome).toBe('early');
    expect(decideGreylist(rec, 'i', 'f', 't', 1600, t).outcome).toBe('pass');
    expect(decideGreylist(rec, 'i', 'f', 't', 4599.999, t).outcome).toBe('pass');
    expect(decideGreylist(rec, 'i', 'f', 't', 4600, t).outcome).toBe('late');
    expect(decideGreylist({ ...rec, count: 3 }, 'i', 'f', 't', 8200, t).outcome).toBe('pass');
    expect(decideGreylist({ ...rec, count: 3 }, 'i', 'f', 't', 8200.001, t).outcome).toBe('expired');
  });
});

/* ------------------------------------------------------------ pymilter */

const PY_GREYSQL = `
import sys, json, time
from Milter.greysql import Greylist
db, gt, ge, gr = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
g = Greylist(db, gt, ge, gr)
out = []
for line in sys.stdin:
    op = json.loads(line)
    if op[0] == 'check':
        out.append(g.check(op[1], op[2], op[3], timeinc=op[4]))
    elif op[0] == 'import':
        g.import_csv(open(op[1]))
    elif op[0] == 'clean':
        out.append(g.clean(timeinc=op[1]))
g.close()
print(json.dumps(out))
`;

function runPymilter(db: string, ops: unknown[][], minutes = 10, hours = 4, days = 36): number[] {
  const r = spawnSync(SYSTEM_PYTHON, ['-c', PY_GREYSQL, db, String(minutes), String(hours), String(days)], {
    input: ops.map((o) => JSON.stringify(o)).join('\n') + '\n',
    encoding: 'utf8',
  });
  if (r.status !== 0) throw new Error(`pymilter greysql failed: ${r.stderr}`);
  return JSON.parse(r.stdout) as number[];
}

describe('compatibility with pymilter (Milter.greysql)', () => {
  // Offsets in seconds from "now", kept well away from the boundaries so the
  // real time that passes while Python runs does not matter.
  const SCENARIO: [string, string, string, number][] = [
    ['192.0.2.7', 'alice@example.org', 'bob@example.net', 0],
    ['192.0.2.7', 'alice@example.org', 'bob@example.net', 300], // early
    ['192.0.2.7', 'alice@example.org', 'bob@example.net', 900], // pass 1
    ['192.0.2.7', 'alice@example.org', 'bob@example.net', 5 * 86400], // pass 2
    ['192.0.2.8', 'carol@example.org', 'bob@example.net', 100],
    ['192.0.2.8', 'carol@example.org', 'bob@example.net', 6 * 3600], // late
    ['192.0.2.8', 'carol@example.org', 'bob@example.net', 6 * 3600 + 700], // pass 1 of the new round
    ['192.0.2.7', 'alice@example.org', 'bob@example.net', 50 * 86400], // expired
  ];

  it('gives the same counts as pymilter for the same attempts (grey_time=10 min is greyTime 605 s)', async () => {
    const start = Date.now() / 1000;
    const py = runPymilter(path.join(tmpDir('nm-py-'), 'grey.db'), SCENARIO.map(([ip, f, t, dt]) => ['check', ip, f, t, dt]));
    let now = start;
    const g = new Greylist(new MemoryStore(), { greyTime: 605, greyExpire: 4 * 3600, greyRetain: 36 * 86400, clock: () => now });
    const ours = [];
    for (const [ip, f, t, dt] of SCENARIO) {
      now = start + dt;
      ours.push(await g.check(ip, f, t));
    }
    expect(ours).toEqual([0, 0, 1, 2, 0, 0, 1, 0]);
    expect(py).toEqual(ours);
  });

  it('opens a database pymilter wrote, and pymilter opens ours', async () => {
    const db = path.join(tmpDir('nm-py-'), 'shared.db');
    // pymilter records the first attempt...
    expect(runPymilter(db, [['check', '192.0.2.9', 'dave@example.org', 'bob@example.net', 0]])).toEqual([0]);
    // ...we let the retry through 11 minutes later...
    const store = new SqliteStore(db);
    const g = new Greylist(store, { greyTime: 605, clock: () => Date.now() / 1000 + 660 });
    expect(await g.check('192.0.2.9', 'dave@example.org', 'bob@example.net')).toBe(1);
    await store.close();
    // ...and pymilter counts on from there.
    expect(runPymilter(db, [['check', '192.0.2.9', 'dave@example.org', 'bob@example.net', 720]])).toEqual([2]);
  });

  it('pymilter imports our CSV export (import_csv)', async () => {
    const dir = tmpDir('nm-py-');
    const now = Date.now() / 1000;
    const g = new Greylist(new MemoryStore(), { greyTime: 605, clock: () => now - 3600 });
    await g.check('192.0.2.10', 'erin@example.org', 'bob@example.net');
    const g2 = new Greylist(g.store, { greyTime: 605, clock: () => now - 2900 });
    expect(await g2.check('192.0.2.10', 'erin@example.org', 'bob@example.net')).toBe(1);
    fs.writeFileSync(path.join(dir, 'grey.csv'), await g2.exportCsv());
    const out = runPymilter(path.join(dir, 'py.db'), [
      ['import', path.join(dir, 'grey.csv')],
      ['check', '192.0.2.10', 'erin@example.org', 'bob@example.net', 0],
    ]);
    expect(out).toEqual([2]);
  });
});

/* ------------------------------------------------------------ SQLite */

describe('SqliteStore', () => {
  it('keeps its state across a restart (close and reopen the file)', async () => {
    const file = path.join(tmpDir('nm-grey-'), 'persist.db');
    const clock = manualClock();
    let g = new Greylist(file, { greyTime: 60, clock: clock.fn });
    expect(await g.check('192.0.2.1', 'a@x.example', 'b@y.example')).toBe(0);
    await g.close();
    clock.now += 61;
    g = new Greylist(file, { greyTime: 60, clock: clock.fn });
    expect(await g.check('192.0.2.1', 'a@x.example', 'b@y.example')).toBe(1);
    await g.close();
  });

  it('counts exactly when several processes check one triplet in the same file', async () => {
    const file = path.join(tmpDir('nm-grey-'), 'multi.db');
    const seed = new SqliteStore(file);
    const t = { greyTime: 0, greyExpire: 3600, greyRetain: 86400 };
    await seed.greylistCheck('192.0.2.1', 'a@x', 'b@y', 1000, t);
    await seed.close();
    const script = `
      const { SqliteStore } = require(${JSON.stringify(path.join(ROOT, 'dist/src/greylist/index.js'))});
      const s = new SqliteStore(process.argv[1]);
      (async () => {
        const counts = [];
        for (let i = 0; i < 50; i++) counts.push((await s.greylistCheck('192.0.2.1', 'a@x', 'b@y', 1001, ${JSON.stringify(t)})).record.count);
        await s.close();
        console.log(JSON.stringify(counts));
      })();`;
    const { spawn } = await import('node:child_process');
    const run = () =>
      new Promise<number[]>((resolve, reject) => {
        const c = spawn(process.execPath, ['-e', script, file], { stdio: ['ignore', 'pipe', 'pipe'] });
        let out = '';
        let err = '';
        c.stdout.on('data', (d) => (out += d));
        c.stderr.on('data', (d) => (err += d));
        c.on('exit', (code) => (code === 0 ? resolve(JSON.parse(out)) : reject(new Error(err))));
      });
    const results = await Promise.all([run(), run(), run(), run()]);
    const all = results.flat().sort((a, b) => a - b);
    expect(all).toEqual(Array.from({ length: 200 }, (_, i) => i + 1));
  });

  it('says which package to install when better-sqlite3 (or ioredis) is missing', () => {
    const script = `
      const Module = require('module');
      const orig = Module._resolveFilename;
      Module._resolveFilename = function (req, ...rest) {
        if (req === 'better-sqlite3' || req === 'ioredis') { const e = new Error("Cannot find module '" + req + "'"); e.code = 'MODULE_NOT_FOUND'; throw e; }
        return orig.call(this, req, ...rest);
      };
      const g = require(${JSON.stringify(path.join(ROOT, 'dist/src/greylist/index.js'))});
      const out = [];
      for (const make of [() => new g.SqliteStore(':memory:'), () => new g.RedisStore(), () => new g.Greylist('/tmp/x.db')]) {
        try { make(); out.push('no error'); } catch (e) { out.push([e.name, e.code, e.packageName, e.message]); }
      }
      console.log(JSON.stringify(out));`;
    const r = spawnSync(process.execPath, ['-e', script], { encoding: 'utf8' });
    expect(r.stderr).toBe('');
    const out = JSON.parse(r.stdout);
    expect(out[0].slice(0, 3)).toEqual(['MissingDependencyError', 'ERR_MILTER_MISSING_DEPENDENCY', 'better-sqlite3']);
    expect(out[0][3]).toMatch(/npm install better-sqlite3/);
    expect(out[1].slice(0, 3)).toEqual(['MissingDependencyError', 'ERR_MILTER_MISSING_DEPENDENCY', 'ioredis']);
    expect(out[2][2]).toBe('better-sqlite3');
    expect(new MissingDependencyError('x', 'y')).toBeInstanceOf(Error);
  });
});

/* ------------------------------------------------------------ Redis */

describe.skipIf(!REDIS_AVAILABLE)('RedisStore on a real redis-server', () => {
  it('counts concurrent checks of one triplet from many connections exactly once each', async () => {
    const r = await startRedis();
    const N = 40;
    const stores = Array.from({ length: N }, () => new RedisStore({ url: r.url, prefix: 'conc:' }));
    try {
      const t = { greyTime: 10, greyExpire: 3600, greyRetain: 86400 };
      expect((await stores[0].greylistCheck('192.0.2.1', 'a@x', 'b@y', 1000, t)).outcome).toBe('new');
      await Promise.all(stores.map((s) => s.client.ping()));
      const results = await Promise.all(stores.map((s) => s.greylistCheck('192.0.2.1', 'a@x', 'b@y', 1011, t)));
      expect(results.map((x) => x.record.count).sort((a, b) => a - b)).toEqual(Array.from({ length: N }, (_, i) => i + 1));
      expect(results.every((x) => x.outcome === 'pass' && x.record.firstSeen === 1000)).toBe(true);
      const recs = [];
      for await (const rec of stores[0].greylistExport()) recs.push(rec);
      expect(recs).toEqual([{ ip: '192.0.2.1', from: 'a@x', to: 'b@y', firstSeen: 1000, lastSeen: 1011, count: N }]);
    } finally {
      await Promise.all(stores.map((s) => s.close()));
    }
  });

  it('lets Redis expire records after the retain time (TTL), and keeps fractional times exact', async () => {
    const r = await startRedis();
    const store = new RedisStore({ url: r.url, prefix: 'ttl:' });
    try {
      const g = new Greylist(store, { greyTime: 0.2, greyExpire: 0.5, greyRetain: 1 });
      const v = await g.evaluate('192.0.2.1', 'a@x.example', 'b@y.example');
      const keys = await store.client.keys('ttl:grey:*');
      expect(keys).toEqual(['ttl:grey:["192.0.2.1","a@x.example","b@y.example"]']);
      const pttl = await store.client.pttl(keys[0]);
      expect(pttl).toBeGreaterThan(0);
      expect(pttl).toBeLessThanOrEqual(1000);
      expect(Number(await store.client.hget(keys[0], 'first'))).toBe(v.record.firstSeen);
      await new Promise((res) => setTimeout(res, 1600));
      expect(await store.client.exists(keys[0])).toBe(0);
      expect((await g.evaluate('192.0.2.1', 'a@x.example', 'b@y.example')).outcome).toBe('new');
    } finally {
      await store.close();
    }
  });

  it('uses a caller-provided client without closing it, and rejects a non-ioredis client', async () => {
    const r = await startRedis();
    const client = new Redis(r.url);
    try {
      const store = new RedisStore({ client, prefix: 'own:' });
      await new Greylist(store).check('192.0.2.1', 'a@b.example', 'c@d.example');
      await store.close();
      expect(await client.ping()).toBe('PONG');
      expect(await client.exists('own:grey:["192.0.2.1","a@b.example","c@d.example"]')).toBe(1);
      expect(() => new RedisStore({ client: {} as Redis })).toThrow(/must be an ioredis client/);
      expect(() => new RedisStore({ url: 'http://x' })).toThrow(/url must look like redis:\/\/host:port\/db, got "http:\/\/x"/);
    } finally {
      client.disconnect();
    }
  });
});
