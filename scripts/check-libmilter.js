#!/usr/bin/env node
// Stops the native build early, with one clear message, when libmilter's
// headers or library are missing (instead of a wall of compiler errors).
'use strict';
const fs = require('fs');

const headerDirs = ['/usr/include', '/usr/local/include'];
const header = headerDirs.map((d) => `${d}/libmilter/mfapi.h`).find((p) => fs.existsSync(p));
const libDirs = ['/usr/lib/x86_64-linux-gnu', '/usr/lib/aarch64-linux-gnu', '/usr/lib64', '/usr/lib', '/usr/local/lib'];
const lib = libDirs
  .flatMap((d) => [`${d}/libmilter.so`, `${d}/libmilter.a`])
  .find((p) => fs.existsSync(p));

if (!header || !lib) {
  const missing = [!header && 'the header libmilter/mfapi.h', !lib && 'the library libmilter.so'].filter(Boolean).join(' and ');
  process.stderr.write(
    `\nnodemilter: cannot build the native addon: ${missing} not found.\n` +
      `Install sendmail's libmilter development package first:\n` +
      `  Debian/Ubuntu:  sudo apt-get install libmilter-dev\n` +
      `  Fedora/RHEL:    sudo dnf install sendmail-milter-devel\n\n`,
  );
  process.exit(1);
}

// The addon serves through libmilter's mi_listener(), which Debian exports
// but upstream keeps internal (native/listener.cc declares it weak). Without
// it, main() refuses unless NODEMILTER_ALLOW_SMFI_MAIN=1: say so now, at
// build time, rather than at the first main().
const { spawnSync } = require('child_process');
const nm = spawnSync('nm', lib.endsWith('.a') ? [lib] : ['-D', '--defined-only', lib], { encoding: 'utf8' });
if (nm.status === 0 && !/\sT mi_listener$/m.test(nm.stdout)) {
  process.stderr.write(
    `\nnodemilter: WARNING: ${lib} does not export mi_listener.\n` +
      `The addon builds, but main() will refuse to run: the only other way in, smfi_main(),\n` +
      `starts a thread that takes SIGTERM, SIGINT and SIGHUP from Node. Set\n` +
      `NODEMILTER_ALLOW_SMFI_MAIN=1 to accept that, or use the TypeScript engine (docs/native.md).\n\n`,
  );
}
