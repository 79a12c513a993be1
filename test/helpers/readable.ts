/**
 * For tests that run a process as another user (nobody, say): a copy of
 * what that process needs from this checkout, in a directory any user can
 * enter. The checkout itself may sit below a directory only its owner can
 * enter (a `mktemp -d` directory, a private home), so running files from it
 * as another user fails for a reason that has nothing to do with the code.
 */
import { spawnSync } from 'node:child_process';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';

const ROOT = path.resolve(__dirname, '..', '..');

/** The runtime dependencies (not dev) that package-lock.json installs at the top of node_modules. */
function runtimeModules(): string[] {
  const lock = JSON.parse(fs.readFileSync(path.join(ROOT, 'package-lock.json'), 'utf8')) as {
    packages: Record<string, { dev?: boolean }>;
  };
  return Object.entries(lock.packages)
    .filter(([key, meta]) => key.startsWith('node_modules/') && !meta.dev)
    .map(([key]) => key);
}

/** Directories 0755, files 0644 (0755 where executable), all the way down. */
function openUp(p: string): void {
  const st = fs.lstatSync(p);
  if (st.isSymbolicLink()) return;
  if (st.isDirectory()) {
    fs.chmodSync(p, 0o755);
    for (const e of fs.readdirSync(p)) openUp(path.join(p, e));
  } else {
    fs.chmodSync(p, st.mode & 0o111 ? 0o755 : 0o644);
  }
}

/** Whether `user` can read `file` (every directory above it searchable), asked as that user. */
export function canRead(user: string, file: string): boolean {
  const r = spawnSync('runuser', ['-u', user, '--', 'test', '-r', file]);
  return r.status === 0;
}

export interface ReadableCopy {
  /** The copy's root: stands for the checkout (same relative paths). */
  root: string;
  /** The copy of `rel` (a path relative to the checkout). */
  at(rel: string): string;
  remove(): void;
}

/**
 * Copies package.json, dist/, the built addon (build/Release, prebuilds/),
 * the runtime node_modules and the extra files named (relative to the
 * checkout) into a new directory under the system temp directory, readable
 * by every user. Throws when the checkout has not been built.
 */
export function readableCopy(extra: string[]): ReadableCopy {
  if (!fs.existsSync(path.join(ROOT, 'dist', 'src'))) throw new Error('dist/ is not built: run `npm run build:ts` first (npm test does)');
  const root = fs.mkdtempSync(path.join(os.tmpdir(), 'nm-readable-'));
  const copy = (rel: string) => {
    const from = path.join(ROOT, rel);
    if (!fs.existsSync(from)) return;
    fs.mkdirSync(path.dirname(path.join(root, rel)), { recursive: true });
    fs.cpSync(from, path.join(root, rel), { recursive: true, dereference: true });
  };
  for (const rel of ['package.json', 'dist', path.join('build', 'Release', 'nodemilter.node'), 'prebuilds', ...runtimeModules(), ...extra]) copy(rel);
  openUp(root);
  return {
    root,
    at: (rel) => path.join(root, rel),
    remove: () => fs.rmSync(root, { recursive: true, force: true }),
  };
}
