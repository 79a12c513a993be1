// Shared by the test/runtime tests (and test/reliability/workers-postfix):
// start test/runtime/milter.cjs (runmilter, with or without workers) in a
// child process, read its JSON lines, send messages with the MTA-side client.
import * as path from 'node:path';

import { MilterClient } from '../../src/testing/client';
import { engineEnv, startProcess, type Engine, type RunningProcess } from '../helpers';
import { lines as jsonLines } from '../reliability/lib';

export const FIXTURE = path.join(__dirname, 'milter.cjs');

export interface Line {
  ev: string;
  pid: number;
  worker?: number;
  gen?: number;
  level?: string;
  msg?: string;
  [k: string]: unknown;
}

export type Runtime = RunningProcess & { spec: string };

/** Start the fixture (RUNTIME_CONFIG = cfg) on `engine`; resolves once its socket accepts connections. */
export async function startRuntime(engine: Engine, cfg: Record<string, unknown> & { socket: string }, opts: { wait?: boolean } = {}): Promise<Runtime> {
  const p = await startProcess(process.execPath, {
    args: [FIXTURE],
    env: { ...engineEnv(engine), RUNTIME_CONFIG: JSON.stringify(cfg) },
    socket: opts.wait === false ? undefined : cfg.socket,
    readyTimeout: 30_000,
    stopSignal: 'SIGKILL',
  });
  started.add(p);
  return Object.assign(p, { spec: cfg.socket });
}

const started = new Set<RunningProcess>();

/**
 * SIGKILL every runtime started here and its workers (killing only the
 * supervisor would leave the workers to notice and drain by themselves).
 */
export async function stopRuntimes(): Promise<void> {
  for (const p of started) {
    for (const pid of p.hasExited ? [] : workerPids(p.pid)) {
      try {
        process.kill(pid, 'SIGKILL');
      } catch {
        /* gone */
      }
    }
  }
  await Promise.all([...started].map((p) => p.stop('SIGKILL')));
  started.clear();
}

/** The fixture's JSON lines (the reliability fixture prints the same way). */
export const lines = (p: RunningProcess): Line[] => jsonLines(p) as unknown as Line[];

export const logs = (p: RunningProcess) => lines(p).filter((l) => l.ev === 'log').map((l) => `${l.level}: ${l.msg}`);

export const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

/** Wait until a line satisfies `ok` (given the line and its index), polling every `every` ms. */
export async function waitLine(p: RunningProcess, ok: (l: Line, i: number) => boolean, timeout = 20_000, every = 25): Promise<Line> {
  const until = Date.now() + timeout;
  for (;;) {
    const l = lines(p).find(ok);
    if (l) return l;
    if (p.hasExited) throw new Error(`the milter exited before the line; log:\n${logs(p).join('\n')}\n${p.stderr}`);
    if (Date.now() > until) throw new Error(`no such line within ${timeout} ms; log:\n${logs(p).join('\n')}`);
    await sleep(every);
  }
}

/** The worker pids the supervisor's children are now (from /proc). */
export function workerPids(supervisorPid: number): number[] {
  const fs = require('node:fs') as typeof import('node:fs');
  try {
    const kids = fs.readFileSync(`/proc/${supervisorPid}/task/${supervisorPid}/children`, 'utf8').trim();
    return kids ? kids.split(/\s+/).map(Number) : [];
  } catch {
    return [];
  }
}

export interface Sent {
  decision: string;
  stamp?: string;
  reply?: string;
  error?: string;
}

/** One message over a new connection; a connection that fails or closes is reported, not thrown. */
export async function sendOne(spec: string, n = 0): Promise<Sent> {
  let c: MilterClient | undefined;
  try {
    c = await MilterClient.connect(spec, { timeout: 15_000 });
    const r = await c.sendMessage({
      client: { hostname: 'mx.example.org', family: 'inet', address: '192.0.2.9', port: 40000 + (n % 20000) },
      helo: 'mx.example.org',
      from: '<a@example.org>',
      rcpt: ['<b@example.net>'],
      headers: [['Subject', `runtime ${n}`]],
      body: 'body\r\n',
    });
    const stamp = r.actions.find((a) => a.type === 'addheader' && (a as { name?: string }).name === 'X-Stamp') as { value?: string } | undefined;
    await c.quit().catch(() => undefined);
    const reply = r.eom?.reply ?? r.connect?.reply;
    return { decision: r.decision, stamp: stamp?.value, reply: reply ? `${reply.rcode} ${reply.xcode} ${reply.text}` : undefined };
  } catch (err) {
    c?.destroy();
    return { decision: 'error', error: (err as Error).message };
  }
}
