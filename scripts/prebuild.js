#!/usr/bin/env node
// Builds the prebuilt addon shipped in prebuilds/<platform>-<arch>/: the
// same sources as `npm run build:native`, linked against libmilter's
// position-independent static archive (binding.gyp, NODEMILTER_STATIC=1), so
// the result needs neither libmilter.so nor a compiler on the user's machine.
//
//   npm run build:prebuild          build and replace prebuilds/linux-x64/
//   node scripts/prebuild.js --hash print the hash of the native sources
//
// The build runs in a scratch copy of native/ + binding.gyp, so a
// development build in build/ is left alone. Beside the binary it writes
// nodemilter.json: the hash of the sources it was built from (test/packaging
// checks it against native/ so a stale prebuild fails the tests), the
// Node-API version, the libmilter version and the newest glibc symbol
// version the binary needs.
//
// libmilter: the archive scripts/build-libmilter.sh builds from Debian's
// source with native/libmilter/odd-macros.patch (libmilter-build/, or the
// path in NODEMILTER_LIBMILTER_A) when it is there, else Debian's
// libmilter-dev as is. Which one is recorded in nodemilter.json. Set
// NODEMILTER_PREBUILD_OUT to write the binary and its JSON to another
// directory (a scratch build to test) instead of prebuilds/.
'use strict';
const crypto = require('node:crypto');
const fs = require('node:fs');
const os = require('node:os');
const path = require('node:path');
const { execFileSync } = require('node:child_process');

const root = path.resolve(__dirname, '..');

/** Files whose content decides the binary (sorted, hashed by name and content). */
function sourceFiles() {
  const native = fs
    .readdirSync(path.join(root, 'native'))
    .filter((f) => /\.(cc|h)$/.test(f))
    .sort()
    .map((f) => `native/${f}`);
  // The patch is in the binary when the patched libmilter is linked.
  return [...native, 'native/libmilter/odd-macros.patch', 'binding.gyp'];
}

function sourcesHash() {
  const h = crypto.createHash('sha256');
  for (const f of sourceFiles()) {
    h.update(`${f}\0`);
    h.update(fs.readFileSync(path.join(root, f)));
    h.update('\0');
  }
  return h.digest('hex');
}

function platformDir() {
  const glibc = process.platform === 'linux' && !!process.report?.getReport()?.header?.glibcVersionRuntime;
  const libc = process.platform === 'linux' && !glibc ? '-musl' : '';
  return `${process.platform}-${process.arch}${libc}`;
}

function sh(cmd, args, opts = {}) {
  return execFileSync(cmd, args, { encoding: 'utf8', stdio: ['ignore', 'pipe', 'inherit'], ...opts });
}

/** The patched static libmilter to link, with its version line, or null for Debian's. */
function patchedLibmilter() {
  const archive = process.env.NODEMILTER_LIBMILTER_A || path.join(root, 'libmilter-build', 'libmilter.a');
  if (!fs.existsSync(archive)) {
    if (process.env.NODEMILTER_LIBMILTER_A) throw new Error(`NODEMILTER_LIBMILTER_A: no file ${archive}`);
    return null;
  }
  const versionFile = path.join(path.dirname(archive), 'VERSION');
  const version = fs.existsSync(versionFile) ? fs.readFileSync(versionFile, 'utf8').trim() : '';
  if (!version) throw new Error(`${archive} has no VERSION beside it: rebuild it with scripts/build-libmilter.sh`);
  return { archive: path.resolve(archive), version };
}

function build() {
  const patched = patchedLibmilter();
  const scratch = fs.mkdtempSync(path.join(os.tmpdir(), 'nodemilter-prebuild-'));
  try {
    fs.cpSync(path.join(root, 'native'), path.join(scratch, 'native'), { recursive: true });
    fs.copyFileSync(path.join(root, 'binding.gyp'), path.join(scratch, 'binding.gyp'));
    fs.symlinkSync(path.join(root, 'node_modules'), path.join(scratch, 'node_modules'));
    const gyp = process.env.npm_config_node_gyp || require.resolve('node-gyp/bin/node-gyp.js');
    const args = [gyp, 'rebuild', '--release'];
    // Outside `npm run`, node-gyp does not see npm's nodedir setting.
    if (!process.env.npm_config_nodedir && fs.existsSync('/usr/include/node/node_api.h')) args.push('--nodedir=/usr');
    execFileSync(process.execPath, args, {
      cwd: scratch,
      stdio: ['ignore', 'ignore', 'inherit'],
      env: { ...process.env, NODEMILTER_STATIC: '1', NODEMILTER_SANITIZE: '0', NODEMILTER_LIBMILTER_A: patched ? patched.archive : '' },
    });
    const built = path.join(scratch, 'build', 'Release', 'nodemilter.node');
    const outDir = process.env.NODEMILTER_PREBUILD_OUT ? path.resolve(process.env.NODEMILTER_PREBUILD_OUT) : path.join(root, 'prebuilds', platformDir());
    fs.mkdirSync(outDir, { recursive: true });
    const out = path.join(outDir, 'nodemilter.node');
    sh('strip', ['--strip-unneeded', '-o', out, built]);

    // The point of the static link: no libmilter.so at run time, and
    // mi_listener still visible to dlsym(RTLD_DEFAULT) from inside the addon.
    const dyn = sh('readelf', ['-d', out]);
    const needed = [...dyn.matchAll(/\(NEEDED\)\s+Shared library: \[([^\]]+)\]/g)].map((m) => m[1]);
    if (needed.some((n) => n.startsWith('libmilter'))) throw new Error(`prebuild still needs ${needed.join(', ')}`);
    const syms = sh('readelf', ['--dyn-syms', '-W', out]);
    if (!/\sFUNC\s+GLOBAL\s+DEFAULT\s+\d+\s+mi_listener$/m.test(syms)) throw new Error('mi_listener is not a defined dynamic symbol of the prebuild');
    // The patch's marker, defined in the binary exactly when the patched archive was linked.
    const marker = /\sOBJECT\s+GLOBAL\s+DEFAULT\s+\d+\s+mi_macros_paired$/m.test(syms);
    if (marker !== !!patched) throw new Error(`mi_macros_paired is ${marker ? '' : 'not '}defined in the prebuild, linked with ${patched ? patched.archive : "Debian's libmilter.a"}`);
    const glibc = [...syms.matchAll(/@GLIBC_(\d+)\.(\d+)(?:\.(\d+))?/g)]
      .map((m) => [Number(m[1]), Number(m[2]), Number(m[3] ?? 0)])
      .sort((a, b) => a[0] - b[0] || a[1] - b[1] || a[2] - b[2])
      .pop();
    let libmilter = patched ? patched.version : 'unknown';
    if (!patched) {
      try {
        libmilter = `libmilter-dev ${sh('dpkg-query', ['-W', '-f=${Version}', 'libmilter-dev'], { stdio: ['ignore', 'pipe', 'ignore'] })}`;
      } catch {
        // not a Debian system: the version stays unknown
      }
    }
    const meta = {
      sourcesHash: sourcesHash(),
      napiVersion: 8,
      libmilter,
      needed,
      minGlibc: glibc ? glibc.filter((x, i) => i < 2 || x).join('.') : null,
      builtWith: `node ${process.version}`,
    };
    fs.writeFileSync(path.join(outDir, 'nodemilter.json'), JSON.stringify(meta, null, 2) + '\n');
    process.stdout.write(`prebuilt ${path.relative(root, out)} (${fs.statSync(out).size} bytes)\n${JSON.stringify(meta, null, 2)}\n`);
  } finally {
    fs.rmSync(scratch, { recursive: true, force: true });
  }
}

if (require.main === module) {
  if (process.argv.includes('--hash')) process.stdout.write(`${sourcesHash()}\n`);
  else build();
}

module.exports = { sourcesHash, sourceFiles, platformDir, patchedLibmilter };
