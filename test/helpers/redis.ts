/**
 * A throw-away redis-server for tests: its own loopback port, a temporary
 * directory, no persistence. Started through startProcess, so afterEach
 * stopAll() stops it with the test's other processes.
 *
 * When redis-server is not installed the tests fail loudly, unless
 * NODEMILTER_SKIP_REDIS=1 is set: then {@link REDIS_AVAILABLE} is false and
 * the Redis tests are skipped (use `describe.skipIf(!REDIS_AVAILABLE)`).
 */
import { spawnSync } from 'node:child_process';

import { freePort, startProcess, tmpDir, type RunningProcess } from './process';

function findRedisServer(): string | undefined {
  for (const p of ['/usr/bin/redis-server', '/usr/local/bin/redis-server']) {
    if (spawnSync(p, ['--version']).status === 0) return p;
  }
  const r = spawnSync('redis-server', ['--version']);
  return r.status === 0 ? 'redis-server' : undefined;
}

/** The redis-server binary, or undefined if none is installed. */
export const REDIS_SERVER = findRedisServer();
/** Whether the Redis tests run: redis-server is installed (or they are not skipped on purpose). */
export const REDIS_AVAILABLE = REDIS_SERVER !== undefined || process.env.NODEMILTER_SKIP_REDIS !== '1';

/** A running test Redis. */
export interface TestRedis {
  /** `redis://127.0.0.1:PORT`. */
  url: string;
  port: number;
  process: RunningProcess;
}

/** Start a redis-server on a free loopback port with a temporary directory and no persistence. */
export async function startRedis(): Promise<TestRedis> {
  if (!REDIS_SERVER) {
    throw new Error(
      'redis-server is not installed: the Redis store tests need it (Debian: apt-get install redis-server). ' +
        'Set NODEMILTER_SKIP_REDIS=1 to skip them.',
    );
  }
  const port = await freePort();
  const dir = tmpDir('nm-redis-');
  const proc = await startProcess(REDIS_SERVER, {
    args: [
      '--port', String(port), '--bind', '127.0.0.1', '--dir', dir,
      '--save', '', '--appendonly', 'no', '--daemonize', 'no', '--protected-mode', 'yes', '--loglevel', 'warning',
    ],
    socket: `inet:${port}@127.0.0.1`,
    readyTimeout: 30_000,
    stopSignal: 'SIGTERM',
  });
  return { url: `redis://127.0.0.1:${port}`, port, process: proc };
}
