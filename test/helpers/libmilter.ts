/** Which libmilter an addon file is linked with, read from its dynamic symbols. */
import { execFileSync } from 'node:child_process';
import * as fs from 'node:fs';

import { nativeCandidates } from '../../src/native';

/** The addon file a milter child process will load (the same search as src/native.ts). */
export function addonFile(): string | undefined {
  return nativeCandidates().find((p) => fs.existsSync(p));
}

/**
 * Whether the addon defines mi_macros_paired, the marker of a libmilter built
 * with native/libmilter/odd-macros.patch (scripts/build-libmilter.sh).
 */
export function linksPatchedLibmilter(file: string): boolean {
  const syms = execFileSync('readelf', ['--dyn-syms', '-W', file], { encoding: 'utf8' });
  return /\sOBJECT\s+GLOBAL\s+DEFAULT\s+\d+\s+mi_macros_paired$/m.test(syms);
}
