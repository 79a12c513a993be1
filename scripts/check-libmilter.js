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
