// npm run bench:milter -- SHAPE SOCKET
// Serves our (nodemilter) benchmark milter of one shape on its own, in the
// foreground: s1, s2, s3, s4 or big. See bench/milters/node.cjs.
'use strict';
const [shape, socket] = process.argv.slice(2);
if (!['s1', 's2', 's3', 's4', 'big'].includes(shape) || !socket) {
  console.error('usage: npm run bench:milter -- s1|s2|s3|s4|big SOCKET   (e.g. unix:/tmp/bench.sock or inet:8894@127.0.0.1)');
  process.exit(2);
}
require('./milters/node.cjs');
