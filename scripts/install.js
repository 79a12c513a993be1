#!/usr/bin/env node
// npm's install step for nodemilter. The package ships a prebuilt addon
// (prebuilds/<platform>-<arch>/, libmilter linked in statically), so on those
// platforms there is nothing to do and the package works just as well when
// installed with --ignore-scripts. Elsewhere, or with
// NODEMILTER_BUILD_FROM_SOURCE=1, or in a git checkout (unless
// NODEMILTER_BUILD_FROM_SOURCE=0), it builds the addon from source with
// node-gyp (needs libmilter's headers and a C++ compiler); the loader
// (src/native.ts) prefers that local build over the prebuild.
'use strict';
const fs = require('node:fs');
const path = require('node:path');
const { spawnSync } = require('node:child_process');

const root = path.resolve(__dirname, '..');

function platformDir() {
  const glibc = process.platform === 'linux' && !!process.report?.getReport()?.header?.glibcVersionRuntime;
  return `${process.platform}-${process.arch}${process.platform === 'linux' && !glibc ? '-musl' : ''}`;
}

function prebuildWorks() {
  const file = path.join(root, 'prebuilds', platformDir(), 'nodemilter.node');
  if (!fs.existsSync(file)) return { ok: false, why: `no prebuilt addon for ${platformDir()}` };
  // Load it in a child, so a binary that does not fit this system (an older
  // glibc, say) is noticed here and not at the user's first require().
  const r = spawnSync(process.execPath, ['-e', `require(${JSON.stringify(file)})`], { encoding: 'utf8' });
  if (r.status !== 0) return { ok: false, why: `the prebuilt addon does not load here: ${(r.stderr || '').trim().split('\n').pop()}` };
  return { ok: true, file };
}

function buildFromSource(why) {
  process.stderr.write(`nodemilter: ${why}; building the addon from source with node-gyp\n`);
  const check = spawnSync(process.execPath, [path.join(__dirname, 'check-libmilter.js')], { stdio: 'inherit' });
  if (check.status !== 0) process.exit(check.status ?? 1);
  // npm tells lifecycle scripts where its bundled node-gyp is.
  const gyp = process.env.npm_config_node_gyp;
  const r = gyp
    ? spawnSync(process.execPath, [gyp, 'rebuild'], { cwd: root, stdio: 'inherit' })
    : spawnSync('node-gyp', ['rebuild'], { cwd: root, stdio: 'inherit' });
  if (r.error) {
    process.stderr.write(`nodemilter: could not run node-gyp: ${r.error.message}\n`);
    process.exit(1);
  }
  process.exit(r.status ?? 1);
}

if (process.env.NODEMILTER_BUILD_FROM_SOURCE === '1') {
  buildFromSource('NODEMILTER_BUILD_FROM_SOURCE=1');
} else if (fs.existsSync(path.join(root, '.git')) && process.env.NODEMILTER_BUILD_FROM_SOURCE !== '0') {
  // A development checkout (`npm ci` in the repository): native/ may be
  // newer than the committed prebuild, so build it as before.
  buildFromSource('a development checkout');
} else {
  const p = prebuildWorks();
  if (p.ok) process.stdout.write(`nodemilter: using the prebuilt addon ${path.relative(root, p.file)}\n`);
  else buildFromSource(p.why);
}
