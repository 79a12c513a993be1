// Shared by the reliability tests: start scripts/reliability/milter.cjs in a
// child process, read its JSON lines, ask it for stats (SIGUSR2).
import * as path from 'node:path';

import { MilterClient } from '../../src/testing/client';
import { startProcess, tmpSocketSpec, type RunningProcess } from '../helpers';

export const ROOT = path.join(__dirname, '..', '..');
export const FIXTURE = path.join(ROOT, 'scripts', 'reliability', 'milter.cjs');

export interface Line {
  ev: string;
  conn?: number;
  [k: string]: unknown;
}

export interface Stats {
  ev: 'stats' | 'stopped';
  rss: number;
  heapUsed: number;
  external: number;
  live: number;
  counts: Record<string, number>;
  diag: { created: number; deleted: number; active: number; deadlineExpired: number; progressSent: number; lateAnswers: number; drainRefused: number; jsSessions?: number; held: number; running: boolean };
}

export type Milter = RunningProcess & { spec: string };

export async function startMilter(cfg: Record<string, unknown>, extraArgs: string[] = []): Promise<Milter> {
  // A unix socket of its own: an inet port picked free can be taken by a
  // concurrent test run before the milter binds it.
  const spec = (cfg.socket as string) ?? tmpSocketSpec();
  const p = await startProcess(process.execPath, {
    args: [...extraArgs, FIXTURE],
    env: {
      RELIABILITY_CONFIG: JSON.stringify({ ...cfg, socket: spec }),
      // scripts/test-asan.sh: the sanitizer runtime goes into the milter process only.
      LD_PRELOAD: process.env.NODEMILTER_CHILD_PRELOAD ?? process.env.LD_PRELOAD,
    },
    socket: spec,
    stopSignal: 'SIGKILL',
    // Under ASan (scripts/test-asan.sh) a milter takes seconds to start.
    readyTimeout: 30_000,
  });
  return Object.assign(p, { spec });
}

export function lines(p: RunningProcess): Line[] {
  return Buffer.from(p.stdout, 'latin1')
    .toString('utf8')
    .split('\n')
    .filter((l) => l.startsWith('{'))
    .map((l) => JSON.parse(l) as Line);
}

export const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

/** Ask the milter for its stats line (after a GC when run with --expose-gc). */
export async function stats(p: RunningProcess): Promise<Stats> {
  const before = lines(p).filter((l) => l.ev === 'stats').length;
  p.child.kill('SIGUSR2');
  const until = Date.now() + 10_000;
  for (;;) {
    const all = lines(p).filter((l) => l.ev === 'stats');
    if (all.length > before) return all[all.length - 1] as unknown as Stats;
    if (Date.now() > until) throw new Error('no stats line from the milter');
    if (p.hasExited) throw new Error(`milter exited: ${p.stderr}`);
    await sleep(20);
  }
}

/** Poll stats until `ok` holds (sessions still closing), or give up after `timeout` and return the last. */
export async function settle(p: RunningProcess, ok: (s: Stats) => boolean, timeout = 10_000): Promise<Stats> {
  const until = Date.now() + timeout;
  let s = await stats(p);
  while (!ok(s) && Date.now() < until) {
    await sleep(100);
    s = await stats(p);
  }
  return s;
}

export const MESSAGE = {
  client: { hostname: 'mx.example.org', family: 'inet' as const, address: '192.0.2.9', port: 40000 },
  helo: 'mx.example.org',
  from: '<a@example.org>',
  rcpt: ['<b@example.net>'],
  headers: [
    ['From', 'a@example.org'],
    ['To', 'b@example.net'],
    ['Subject', 'reliability'],
  ] as [string, string][],
  body: 'line one\r\nline two\r\n',
};

/** Run one session up to `until` and then drop the connection without QUIT. */
export async function dropAt(spec: string, until: 'header' | 'body' | 'eom'): Promise<void> {
  const c = await MilterClient.connect(spec, { timeout: 10_000 });
  try {
    await c.connect(MESSAGE.client.hostname, 'inet', MESSAGE.client.address, MESSAGE.client.port);
    await c.helo(MESSAGE.helo);
    await c.envfrom(MESSAGE.from);
    await c.envrcpt(MESSAGE.rcpt[0]);
    await c.header('From', 'a@example.org');
    await c.header('Subject', 'half');
    if (until === 'header') return;
    await c.eoh();
    await c.body('some body\r\n'.repeat(100));
    if (until === 'body') return;
    // Send EOM and leave while the milter is working on it.
    c.eom().catch(() => undefined);
    await sleep(1);
  } finally {
    c.destroy();
  }
}
