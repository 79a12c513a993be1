/**
 * Shared by the example tests. The examples use decorator syntax, which
 * vitest's transformer cannot compile, so the tests load what tsc built in
 * dist/ (`npm test` runs build:ts first): the example module for TestCtx
 * tests (it exports its class and starts nothing when required), and
 * `node dist/examples/NAME.js SOCKET` in a child process for the wire tests.
 * TestCtx and the constants come from dist too, so that the example's Base
 * and TestCtx's Base are the same class. The wire tests run once per engine
 * (`describe.each(ENGINES)`, `startExample(..., { engine })`).
 */
import * as path from 'node:path';

import { checkEngine, engineEnv, startProcess, type Engine, type RunningProcess } from '../helpers';

export const ROOT = path.resolve(__dirname, '..', '..');
export const FIXTURES = path.join(ROOT, 'test', 'fixtures', 'examples');

/** Load a compiled module from dist (`'examples/sample'`, `'src/index'`...). */
export function dist<T = any>(module: string): T {
  return require(path.join(ROOT, 'dist', `${module}.js`)) as T;
}

export const api = dist<typeof import('../../src/index')>('src/index');
export const testing = dist<typeof import('../../src/testing/index')>('src/testing/index');

/** A logger that keeps the lines, for a milter class's static `logger`. */
export function memoryLogger(): { lines: string[]; info(m: string): void; warn(m: string): void; error(m: string): void } {
  const lines: string[] = [];
  return { lines, info: (m) => lines.push(m), warn: (m) => lines.push(`WARN ${m}`), error: (m) => lines.push(`ERROR ${m}`) };
}

/**
 * Start `node dist/examples/NAME.js SOCKET` (or another script) and wait until
 * it accepts connections. With `engine`, runmilter in it serves on that
 * engine (NODEMILTER_ENGINE), and the process is checked to be on it.
 */
export async function startExample(
  name: string,
  socket: string,
  opts: { env?: Record<string, string>; script?: string; stopSignal?: NodeJS.Signals; engine?: Engine } = {},
): Promise<RunningProcess> {
  const script = opts.script ?? path.join(ROOT, 'dist', 'examples', `${name}.js`);
  const p = await startProcess(process.execPath, {
    args: [script, socket],
    env: { ...(opts.engine ? engineEnv(opts.engine) : {}), ...opts.env },
    socket,
    readyTimeout: 20_000,
    stopSignal: opts.stopSignal ?? 'SIGKILL',
  });
  if (opts.engine) checkEngine(p.pid, opts.engine);
  return p;
}
