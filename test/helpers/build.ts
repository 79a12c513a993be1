/**
 * Build C fixtures (milters on the system libmilter) into a cache directory
 * keyed by the source's content, so parallel test files and reruns share
 * one build.
 */
import { execFile } from 'child_process';
import * as crypto from 'crypto';
import * as fs from 'fs';
import * as os from 'os';
import * as path from 'path';
import { promisify } from 'util';

const run = promisify(execFile);

/** The C compiler used (`$CC` or `cc`). */
export const CC = process.env.CC || 'cc';

/** Options of {@link buildC}. */
export interface BuildOptions {
  /** Extra compiler flags (e.g. `-fsanitize=address`). */
  cflags?: readonly string[];
  /** Libraries; default `-lmilter -lpthread`. */
  libs?: readonly string[];
}

/**
 * Compile one C source file into an executable and return its path:
 * `cc -O1 -g -Wall <cflags> -o OUT SRC <libs>`. Cached under
 * `$TMPDIR/nodemilter-fixtures/<hash>/` (hash of source, flags and compiler).
 */
export async function buildC(source: string, opts: BuildOptions = {}): Promise<string> {
  const src = path.resolve(source);
  const cflags = ['-O1', '-g', '-Wall', ...(opts.cflags ?? [])];
  const libs = [...(opts.libs ?? ['-lmilter', '-lpthread'])];
  const hash = crypto
    .createHash('sha256')
    .update(fs.readFileSync(src))
    .update(JSON.stringify([CC, cflags, libs]))
    .digest('hex')
    .slice(0, 16);
  const dir = path.join(os.tmpdir(), 'nodemilter-fixtures', hash);
  const out = path.join(dir, path.basename(src, '.c'));
  if (fs.existsSync(out)) return out;
  fs.mkdirSync(dir, { recursive: true });
  const tmp = `${out}.${process.pid}.tmp`;
  try {
    await run(CC, [...cflags, '-o', tmp, src, ...libs]);
  } catch (e: any) {
    throw new Error(`building ${src} failed:\n${e.stderr ?? e.message}`);
  }
  fs.renameSync(tmp, out); // atomic: a concurrent build just replaces it with the same binary
  return out;
}
