// libmilter's own smfi_opensocket(rmsocket) through milter.opensocket, on
// whatever is at a unix socket path: prints {"ok":true} or {"error":"..."}.
//   node opensocket.cjs /path/to/sock [rm: 1|0]
'use strict';
const path = require('node:path');
const milter = require(path.join(__dirname, '..', '..', 'dist', 'src', 'milter.js'));
const [sock, rm] = process.argv.slice(2);
try {
  milter.register('opensocket-probe', { connect: () => milter.CONTINUE });
  milter.setconn(`unix:${sock}`);
  milter.opensocket(rm === '1');
  console.log(JSON.stringify({ ok: true }));
} catch (err) {
  console.log(JSON.stringify({ error: err.message }));
}
process.exit(0);
