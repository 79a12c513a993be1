// The least an S3 milter can do in Node: net.Server, framing, and the
// ADDHEADER + CONTINUE answer to each EOM in one write. No nodemilter, no
// state machine, no callbacks. bench/ceiling/run.cjs measures it beside the
// TypeScript engine: the gap between the two is what the engine costs, the
// gap between this and ceiling.c is what Node's event loop and sockets cost.
// Usage: node bench/ceiling/bare.cjs /path/to.sock
'use strict';
const fs = require('node:fs');
const net = require('node:net');

const sockPath = process.argv[2];
if (!sockPath) {
  console.error('usage: node bench/ceiling/bare.cjs SOCKET_PATH');
  process.exit(2);
}
try {
  fs.unlinkSync(sockPath);
} catch {}

function frame(cmd, data = Buffer.alloc(0)) {
  const b = Buffer.alloc(5 + data.length);
  b.writeUInt32BE(data.length + 1, 0);
  b[4] = cmd.charCodeAt(0);
  data.copy(b, 5);
  return b;
}
const u32 = (n) => {
  const b = Buffer.alloc(4);
  b.writeUInt32BE(n);
  return b;
};
// Version 6, ADDHDRS, S3's protocol bits (only EOM is sent), as ceiling.c.
const OPTNEG = frame('O', Buffer.concat([u32(6), u32(0x01), u32(0x77f)]));
const EOM_ANSWER = Buffer.concat([frame('h', Buffer.from('X-Bench\0bare\0', 'latin1')), frame('c')]);

net
  .createServer({ noDelay: true }, (sock) => {
    let buf = Buffer.alloc(0);
    sock.on('data', (d) => {
      buf = buf.length ? Buffer.concat([buf, d]) : d;
      let off = 0;
      while (buf.length - off >= 5) {
        const n = buf.readUInt32BE(off);
        if (buf.length - off < 4 + n) break;
        const cmd = buf[off + 4];
        if (cmd === 0x4f) sock.write(OPTNEG);
        else if (cmd === 0x45) sock.write(EOM_ANSWER);
        else if (cmd === 0x51) sock.end();
        off += 4 + n;
      }
      buf = buf.subarray(off);
    });
    sock.on('error', () => {});
  })
  .listen({ path: sockPath, backlog: 4096 });
