// The patched static libmilter (scripts/build-libmilter.sh, native/libmilter/
// odd-macros.patch): built from Debian's sendmail source, checked against
// the system's archive (without the patch, its code is byte for byte
// Debian's), shown under AddressSanitizer to fix the odd macro
// list at its root (Debian's libmilter as is, the control, reads past it),
// and linked into a prebuild that the odd-macro tests of milter.test.ts pass
// against. Long (source download, four libmilter builds, an addon build):
// run with `npm run test:libmilter`; the default suite skips it. Without a
// directory of source files in NODEMILTER_SENDMAIL_SRC it fetches the source
// with apt, and skips, saying so, when apt cannot.
import { execFile, execFileSync } from 'node:child_process';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { promisify } from 'node:util';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';

import { MilterClient } from '../src/testing/client';
import { C_TESTMILTER_SRC, CC, freeInetSpec, linksPatchedLibmilter, startProcess, stopAll, tmpDir, type RunningProcess } from './helpers';

const run = promisify(execFile);
const ROOT = path.resolve(__dirname, '..');
const SCRIPT = path.join(ROOT, 'scripts', 'build-libmilter.sh');
const ASAN = ['-fsanitize=address', '-fno-omit-frame-pointer'];
const enabled = process.env.NODEMILTER_TEST_LIBMILTER === '1';

let work = '';
/** Why the tests cannot run (the source could not be had), or '' when they can. */
let unavailable = '';

async function buildArchive(out: string, env: Record<string, string> = {}): Promise<void> {
  try {
    await run('bash', [SCRIPT, process.env.NODEMILTER_SENDMAIL_SRC ?? '', out], { env: { ...process.env, ...env }, maxBuffer: 1 << 24 });
  } catch (e: any) {
    if (e.code === 2) {
      unavailable = `Debian's sendmail source could not be had (${String(e.stderr).trim().split('\n').pop()})`;
      return;
    }
    throw new Error(`build-libmilter.sh failed:\n${e.stdout}\n${e.stderr}`);
  }
}

async function startC(bin: string, env: Record<string, string>): Promise<{ spec: string; proc: RunningProcess }> {
  const spec = await freeInetSpec();
  const proc = await startProcess(bin, { args: [spec], env, socket: spec, stopSignal: 'SIGKILL' });
  await proc.waitForOutput(/^EV\tclose$/m); // the readiness probe's session
  return { spec, proc };
}

(enabled ? describe : describe.skip)('patched libmilter (npm run test:libmilter)', () => {
  beforeAll(async () => {
    work = tmpDir('nm-libmilter-');
    await buildArchive(path.join(work, 'patched'));
    if (unavailable) return;
    // Without the patch, to compare with Debian's archive.
    await buildArchive(path.join(work, 'plain'), { NODEMILTER_LIBMILTER_NOPATCH: '1' });
    // The same source under AddressSanitizer, with and without the patch.
    const asan = { NODEMILTER_LIBMILTER_CFLAGS: ASAN.join(' ') };
    await buildArchive(path.join(work, 'asan-patched'), asan);
    await buildArchive(path.join(work, 'asan-plain'), { ...asan, NODEMILTER_LIBMILTER_NOPATCH: '1' });
    for (const v of ['patched', 'plain']) {
      await run(CC, ['-O1', '-g', ...ASAN, '-o', path.join(work, `testmilter-${v}`), C_TESTMILTER_SRC, path.join(work, `asan-${v}`, 'libmilter.a'), '-lpthread']);
    }
  }, 600_000);

  afterAll(async () => {
    await stopAll();
    if (work) fs.rmSync(work, { recursive: true, force: true });
  });

  it("builds Debian's libmilter symbols plus the patch's marker, and says which it is", (ctx) => {
    if (unavailable) return ctx.skip(unavailable);
    const archive = path.join(work, 'patched', 'libmilter.a');
    const nm = execFileSync('nm', ['-g', '--defined-only', archive], { encoding: 'utf8', stdio: ['ignore', 'pipe', 'ignore'] });
    expect(nm).toMatch(/ T mi_listener$/m);
    expect(nm).toMatch(/ T smfi_getsymval$/m);
    expect(nm).toMatch(/ R mi_macros_paired$/m);
    // The control build has no marker.
    const plain = execFileSync('nm', ['-g', '--defined-only', path.join(work, 'asan-plain', 'libmilter.a')], { encoding: 'utf8', stdio: ['ignore', 'pipe', 'ignore'] });
    expect(plain).not.toMatch(/ mi_macros_paired$/m);
    expect(fs.readFileSync(path.join(work, 'patched', 'VERSION'), 'utf8').trim()).toMatch(/^8\.\d+\.\d+\.\d+-\S+ \+ native\/libmilter\/odd-macros\.patch$/);
  });

  it("compiles Debian's libmilter.a exactly: without the patch every object's code is the system archive's", (ctx) => {
    if (unavailable) return ctx.skip(unavailable);
    const system = '/usr/lib/x86_64-linux-gnu/libmilter.a';
    if (!fs.existsSync(system)) return ctx.skip(`no ${system} (libmilter-dev) to compare with`);
    const installed = execFileSync('dpkg-query', ['-W', '-f=${Version}', 'libmilter-dev'], { encoding: 'utf8' });
    const built = fs.readFileSync(path.join(work, 'plain', 'VERSION'), 'utf8').split(' ')[0];
    if (installed !== built) return ctx.skip(`libmilter-dev ${installed} is installed, the source is ${built}`);
    const unpack = (archive: string, dir: string) => {
      fs.mkdirSync(dir);
      execFileSync('ar', ['x', archive], { cwd: dir });
      return fs.readdirSync(dir).sort();
    };
    const objs = unpack(system, path.join(work, 'cmp-system'));
    expect(unpack(path.join(work, 'plain', 'libmilter.a'), path.join(work, 'cmp-plain'))).toEqual(objs);
    // To a file: objcopy replaces its output by renaming a temporary file onto it.
    const text = (file: string) => {
      const out = `${file}.text`;
      execFileSync('objcopy', ['-O', 'binary', '--only-section=.text', file, out]);
      return fs.readFileSync(out);
    };
    for (const o of objs) {
      expect(text(path.join(work, 'cmp-plain', o)).equals(text(path.join(work, 'cmp-system', o))), o).toBe(true);
    }
    expect(objs).toContain('engine.o');
  });

  for (const v of ['plain', 'patched'] as const) {
    it(`${v === 'plain' ? "Debian's libmilter as is reads past" : 'the patched libmilter answers right after'} an odd macro list (AddressSanitizer)`, async (ctx) => {
      if (unavailable) return ctx.skip(unavailable);
      const { spec, proc } = await startC(path.join(work, `testmilter-${v}`), {
        TM_MACROS: 'j k zz',
        ASAN_OPTIONS: 'detect_leaks=0:halt_on_error=1',
      });
      const c = await MilterClient.connect(spec);
      // Name, value, name: the last name has no value. "zz" is in no list,
      // so smfi_getsymval walks the whole list looking for it.
      c.sendRaw('D', Buffer.from('Cj\0mx.example\0k\0', 'latin1'));
      if (v === 'plain') {
        await c.connect('h.example', 'inet', '192.0.2.1', 25).catch(() => undefined);
        await proc.exited;
        expect(proc.stderr).toMatch(/ERROR: AddressSanitizer: heap-buffer-overflow/);
        expect(proc.stderr).toMatch(/smfi_getsymval/);
        return;
      }
      expect((await c.connect('h.example', 'inet', '192.0.2.1', 25)).status).toBe('continue');
      await c.close();
      await proc.waitForOutput(/^MACRO\tconnect\tzz\t/m);
      const lines = proc.stdout.split('\n').filter((l) => l.startsWith('MACRO\tconnect\t'));
      expect(lines).toEqual(['MACRO\tconnect\tj\tmx.example', 'MACRO\tconnect\tk\t(null)', 'MACRO\tconnect\tzz\t(null)']);
      expect(proc.stderr).not.toMatch(/AddressSanitizer/);
      expect(proc.hasExited).toBe(false);
    });
  }

  it('links into a prebuild that records it, and the odd-macro tests pass against that addon', async (ctx) => {
    if (unavailable) return ctx.skip(unavailable);
    const out = path.join(work, 'prebuild');
    await run(process.execPath, [path.join(ROOT, 'scripts', 'prebuild.js')], {
      cwd: ROOT,
      env: { ...process.env, NODEMILTER_LIBMILTER_A: path.join(work, 'patched', 'libmilter.a'), NODEMILTER_PREBUILD_OUT: out },
      maxBuffer: 1 << 24,
    });
    const addon = path.join(out, 'nodemilter.node');
    const meta = JSON.parse(fs.readFileSync(path.join(out, 'nodemilter.json'), 'utf8'));
    expect(meta.libmilter).toBe(fs.readFileSync(path.join(work, 'patched', 'VERSION'), 'utf8').trim());
    expect(meta.needed.some((n: string) => n.startsWith('libmilter'))).toBe(false);
    expect(linksPatchedLibmilter(addon)).toBe(true);
    const r = await run(process.execPath, [path.join(ROOT, 'node_modules', 'vitest', 'vitest.mjs'), 'run', 'test/milter.test.ts', '-t', 'odd', '--reporter=verbose'], {
      cwd: ROOT,
      env: { ...process.env, NODEMILTER_ADDON: addon, NODEMILTER_TEST_LIBMILTER: '' },
      maxBuffer: 1 << 24,
    }).catch((e) => e);
    const output = `${r.stdout}\n${r.stderr}`;
    expect(r.code ?? 0, output).toBe(0);
    expect(output).toMatch(/Tests\s+.*2 passed/);
  }, 300_000);
});
