import * as fs from 'fs';

/**
 * The engines the integration suite runs on. A test that starts a milter
 * through runmilter (a fixture or an example in a child process) runs once
 * per engine: `describe.each(ENGINES)('... (%s engine)', (engine) => ...)`,
 * and passes `engineEnv(engine)` in the child's environment, where runmilter
 * reads NODEMILTER_ENGINE (no `engine` option given).
 */

/** libmilter (the native addon, the reference) and the TypeScript protocol engine. */
export const ENGINES = ['libmilter', 'node'] as const;

/** One of {@link ENGINES}. */
export type Engine = (typeof ENGINES)[number];

/** The environment that makes runmilter in a child process serve on `engine`. */
export function engineEnv(engine: Engine): { NODEMILTER_ENGINE: Engine } {
  return { NODEMILTER_ENGINE: engine };
}

/** Whether process `pid` has the native addon (nodemilter.node) or libmilter mapped (Linux /proc). */
export function hasNativeEngine(pid: number): boolean {
  const maps = fs.readFileSync(`/proc/${pid}/maps`, 'latin1');
  return /(?:nodemilter[^/\n]*\.node|libmilter[^/\n]*)$/m.test(maps);
}

/**
 * Throw unless the milter process `pid` (already listening) serves on
 * `engine`: the libmilter engine has the addon and libmilter mapped, the
 * TypeScript engine never loads them. Guards against an environment that
 * did not reach the child (both runs would then test libmilter).
 */
export function checkEngine(pid: number, engine: Engine): void {
  const native = hasNativeEngine(pid);
  if (native !== (engine === 'libmilter')) {
    throw new Error(`process ${pid} should serve on the ${engine} engine, but the native addon is ${native ? '' : 'not '}loaded`);
  }
}
