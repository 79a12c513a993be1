/**
 * {@link SqliteStore}: greylist records and address-cache entries in one
 * SQLite file, through the optional peer dependency `better-sqlite3`.
 *
 * @module
 */
import type BetterSqlite3 from 'better-sqlite3';

import { InvalidArgumentError, MissingDependencyError } from '../errors';
import { checkSeconds, decideGreylist } from './store';
import type { CacheEntry, GreylistCheck, GreylistRecord, GreylistTiming, Store } from './store';

type DatabaseCtor = typeof BetterSqlite3;
let loaded: DatabaseCtor | undefined;

function loadSqlite(): DatabaseCtor {
  if (!loaded) {
    try {
      // eslint-disable-next-line @typescript-eslint/no-require-imports
      loaded = require('better-sqlite3') as DatabaseCtor;
    } catch (err) {
      throw new MissingDependencyError('better-sqlite3', 'SqliteStore', err);
    }
  }
  return loaded;
}

/** Options of {@link SqliteStore}. */
export interface SqliteStoreOptions {
  /**
   * Milliseconds to wait for another process's write lock before failing
   * (SQLite's busy timeout). Default 5000.
   */
  busyTimeout?: number;
  /** Open the file read-only (export and lookups only). Default false. */
  readonly?: boolean;
}

interface GreyRow {
  ip: string;
  sender: string;
  recipient: string;
  firstseen: number;
  lastseen: number;
  cnt: number;
}

interface Statements {
  get: BetterSqlite3.Statement<[string, string, string], GreyRow>;
  put: BetterSqlite3.Statement<[string, string, string, number, number, number]>;
  clean: BetterSqlite3.Statement<[number]>;
  all: BetterSqlite3.Statement<[], GreyRow>;
  cacheGet: BetterSqlite3.Statement<[string, string], { value: string; expires: number | null }>;
  cacheSet: BetterSqlite3.Statement<[string, string, string, number | null]>;
  cacheDelete: BetterSqlite3.Statement<[string, string]>;
  cacheClean: BetterSqlite3.Statement<[string, number]>;
}

function toRecord(r: GreyRow): GreylistRecord {
  return { ip: r.ip, from: r.sender, to: r.recipient, firstSeen: Number(r.firstseen), lastSeen: Number(r.lastseen), count: Number(r.cnt) };
}

/**
 * The embedded store: one SQLite file, no server, persistent across
 * restarts. Several milter processes on one host may share the file: every
 * check runs in an immediate (write-locking) transaction, so concurrent
 * checks are counted exactly. For several hosts use `RedisStore`.
 *
 * The greylist table has the same layout as pymilter's `Milter.greysql`
 * (`greylist(ip, sender, recipient, firstseen, lastseen, cnt, umis)`), so
 * a pymilter greylist database can be opened as it is.
 *
 * `better-sqlite3` is an optional peer dependency, loaded when the first
 * SqliteStore is made; without it the constructor throws
 * {@link MissingDependencyError}.
 *
 * @example
 * ```ts
 * import { Greylist, SqliteStore } from 'nodemilter/greylist';
 * const grey = new Greylist(new SqliteStore('/var/lib/milter/greylist.db'));
 * ```
 */
export class SqliteStore implements Store {
  /** The database file (or `:memory:`). */
  readonly path: string;
  readonly #db: BetterSqlite3.Database;
  readonly #stmt: Statements;
  readonly #check: (ip: string, from: string, to: string, now: number, timing: GreylistTiming) => GreylistCheck;

  /**
   * Open (creating if needed) the database at `path`; `':memory:'` gives a
   * private in-memory database.
   */
  constructor(path: string, options: SqliteStoreOptions = {}) {
    if (typeof path !== 'string' || path.length === 0) {
      throw new InvalidArgumentError(`SqliteStore needs a database file path (or ':memory:'), got ${JSON.stringify(path)}`);
    }
    const busyTimeout = options.busyTimeout ?? 5000;
    checkSeconds('busyTimeout', busyTimeout);
    const Database = loadSqlite();
    this.path = path;
    const db = new Database(path, { timeout: busyTimeout, readonly: options.readonly ?? false });
    this.#db = db;
    if (!options.readonly) {
      if (path !== ':memory:') db.pragma('journal_mode = WAL');
      db.exec(`
        CREATE TABLE IF NOT EXISTS greylist(
          ip text, sender text, recipient text,
          firstseen timestamp, lastseen timestamp, cnt integer, umis text,
          primary key (ip, sender, recipient));
        CREATE INDEX IF NOT EXISTS greylist_lastseen ON greylist(lastseen);
        CREATE TABLE IF NOT EXISTS addrcache(
          ns text, key text, value text, expires real,
          primary key (ns, key));`);
    }
    this.#stmt = {
      get: db.prepare('SELECT ip, sender, recipient, firstseen, lastseen, cnt FROM greylist WHERE ip = ? AND sender = ? AND recipient = ?'),
      put: db.prepare(
        'INSERT OR REPLACE INTO greylist(ip, sender, recipient, firstseen, lastseen, cnt, umis) VALUES (?, ?, ?, ?, ?, ?, NULL)',
      ),
      clean: db.prepare('DELETE FROM greylist WHERE lastseen < ?'),
      all: db.prepare('SELECT ip, sender, recipient, firstseen, lastseen, cnt FROM greylist'),
      cacheGet: db.prepare('SELECT value, expires FROM addrcache WHERE ns = ? AND key = ?'),
      cacheSet: db.prepare('INSERT OR REPLACE INTO addrcache(ns, key, value, expires) VALUES (?, ?, ?, ?)'),
      cacheDelete: db.prepare('DELETE FROM addrcache WHERE ns = ? AND key = ?'),
      cacheClean: db.prepare('DELETE FROM addrcache WHERE ns = ? AND expires IS NOT NULL AND expires <= ?'),
    };
    const check = db.transaction((ip: string, from: string, to: string, now: number, timing: GreylistTiming) => {
      const row = this.#stmt.get.get(ip, from, to);
      const result = decideGreylist(row && toRecord(row), ip, from, to, now, timing);
      const r = result.record;
      this.#stmt.put.run(r.ip, r.from, r.to, r.firstSeen, r.lastSeen, r.count);
      return result;
    });
    // IMMEDIATE takes the write lock before the read, so two processes
    // cannot both read the same count and write the same increment.
    this.#check = (...args) => check.immediate(...args);
  }

  async greylistCheck(ip: string, from: string, to: string, now: number, timing: GreylistTiming): Promise<GreylistCheck> {
    return this.#check(ip, from, to, now, timing);
  }

  async greylistClean(before: number): Promise<number> {
    return this.#stmt.clean.run(before).changes;
  }

  async *greylistExport(): AsyncIterable<GreylistRecord> {
    // Read everything first: iterate() would hold the statement open while the caller awaits.
    for (const row of this.#stmt.all.all()) yield toRecord(row);
  }

  async greylistImport(records: Iterable<GreylistRecord> | AsyncIterable<GreylistRecord>): Promise<number> {
    const batch: GreylistRecord[] = [];
    for await (const r of records) batch.push(r);
    const put = this.#db.transaction((rs: GreylistRecord[]) => {
      for (const r of rs) this.#stmt.put.run(r.ip, r.from, r.to, r.firstSeen, r.lastSeen, r.count);
    });
    put.immediate(batch);
    return batch.length;
  }

  async cacheGet(namespace: string, key: string, now: number): Promise<CacheEntry | undefined> {
    const row = this.#stmt.cacheGet.get(namespace, key);
    if (!row) return undefined;
    const expires = row.expires === null ? null : Number(row.expires);
    if (expires !== null && expires <= now) {
      this.#stmt.cacheDelete.run(namespace, key);
      return undefined;
    }
    return { value: row.value, expires };
  }

  async cacheSet(namespace: string, key: string, entry: CacheEntry, _now?: number): Promise<void> {
    this.#stmt.cacheSet.run(namespace, key, entry.value, entry.expires);
  }

  async cacheDelete(namespace: string, key: string): Promise<boolean> {
    return this.#stmt.cacheDelete.run(namespace, key).changes > 0;
  }

  async cacheClean(namespace: string, now: number): Promise<number> {
    return this.#stmt.cacheClean.run(namespace, now).changes;
  }

  async close(): Promise<void> {
    if (this.#db.open) this.#db.close();
  }
}
