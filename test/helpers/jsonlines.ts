/**
 * Reading the JSON-lines output of the Node fixture milters
 * (test/fixtures/node/*.cjs print one `{"ev": name, ...}` object per line).
 */
import { freeInetSpec, startProcess, type RunningProcess } from './process';

/** One event line a fixture printed. */
export interface JsonEvent {
  ev: string;
  conn?: number;
  [k: string]: any;
}

/** Every event line printed so far (the helper reads output as latin1; the fixtures write UTF-8). */
export function jsonEvents(p: RunningProcess): JsonEvent[] {
  return Buffer.from(p.stdout, 'latin1')
    .toString('utf8')
    .split('\n')
    .filter((l) => l.startsWith('{'))
    .map((l) => JSON.parse(l) as JsonEvent);
}

/** The first event called `name`, waiting up to `timeout` ms for it. */
export async function waitJsonEvent(p: RunningProcess, name: string, timeout = 5000): Promise<JsonEvent> {
  await p.waitForOutput(`"ev":"${name}"`, { timeout });
  return jsonEvents(p).find((e) => e.ev === name)!;
}

/**
 * Start a Node fixture milter (`node FIXTURE`) configured by MILTER_CONFIG
 * (`cfg` plus `socket`: `cfg.socket` or a free inet spec), and resolve once
 * its socket accepts connections. Under scripts/test-asan.sh the sanitizer
 * runtime (NODEMILTER_CHILD_PRELOAD) goes into the milter process only.
 */
export async function startFixtureMilter(
  fixture: string,
  cfg: Record<string, unknown>,
  opts: {
    env?: Record<string, string | undefined>;
    readyTimeout?: number;
    /** A command to run the fixture under, such as ['taskset', '-c', '0'] (default: none). */
    wrap?: string[];
  } = {},
): Promise<RunningProcess & { spec: string }> {
  const spec = (cfg.socket as string) ?? (await freeInetSpec());
  const [command, ...args] = [...(opts.wrap ?? []), process.execPath, fixture];
  const p = await startProcess(command, {
    args,
    env: {
      MILTER_CONFIG: JSON.stringify({ ...cfg, socket: spec }),
      LD_PRELOAD: process.env.NODEMILTER_CHILD_PRELOAD ?? process.env.LD_PRELOAD,
      ...opts.env,
    },
    socket: spec,
    readyTimeout: opts.readyTimeout,
  });
  return Object.assign(p, { spec });
}
