#!/usr/bin/env node
// npm run example -- NAME [SOCKET]: run examples/NAME.ts (compiled to dist/examples/NAME.js).
'use strict';
const fs = require('fs');
const path = require('path');

const dir = path.join(__dirname, '..', 'dist', 'examples');
const available = fs.existsSync(dir) ? fs.readdirSync(dir).filter((f) => f.endsWith('.js')).map((f) => f.slice(0, -3)) : [];
const [name, socket] = process.argv.slice(2);
if (!name || !available.includes(name)) {
  process.stderr.write(
    (name ? `no example called "${name}". ` : 'usage: npm run example -- NAME [SOCKET]\n') +
      (available.length ? `Examples: ${available.join(', ')}\n` : 'No examples built: run `npm run build:ts` first.\n'),
  );
  process.exit(2);
}
// Run it as the main module (require.main === module inside it), as `node FILE SOCKET` would.
process.argv = [process.argv[0], path.join(dir, `${name}.js`), ...(socket ? [socket] : [])];
require('module').runMain();
