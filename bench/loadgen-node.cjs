// A lean Node load generator, kept only to compare with bench/loadgen.c
// (`node bench/loadgen-node.cjs -s SOCKET -c CONC -m PER_CONN -d SECONDS`):
// the same message, the same negotiation-driven script, packets encoded
// once, everything up to the next reply written at once (cork/uncork).
// Prints the same JSON fields as loadgen.c that matter for the comparison.
'use strict';
const net = require('node:net');

const P = { NOCONNECT: 0x1, NOHELO: 0x2, NOMAIL: 0x4, NORCPT: 0x8, NOBODY: 0x10, NOHDRS: 0x20, NOEOH: 0x40, NR_HDR: 0x80,
  NODATA: 0x200, NR_CONN: 0x1000, NR_HELO: 0x2000, NR_MAIL: 0x4000, NR_RCPT: 0x8000, NR_DATA: 0x10000, NR_EOH: 0x40000, NR_BODY: 0x80000 };

const args = Object.fromEntries(
  process.argv.slice(2).reduce((acc, a, i, all) => (a.startsWith('-') ? [...acc, [a.slice(1), all[i + 1]]] : acc), []),
);
const socket = args.s;
const conc = Number(args.c ?? 1);
const perConn = Number(args.m ?? 100);
const seconds = Number(args.d ?? 3);
const bodyBytes = Number(args.b ?? 2048);

function pkt(cmd, ...parts) {
  const data = Buffer.concat(parts.map((p) => (Buffer.isBuffer(p) ? p : Buffer.from(p + '\0', 'latin1'))));
  const b = Buffer.allocUnsafe(5 + data.length);
  b.writeUInt32BE(data.length + 1, 0);
  b[4] = cmd.charCodeAt(0);
  data.copy(b, 5);
  return b;
}
const macros = (stage, ...kv) => pkt('D', Buffer.from(stage, 'latin1'), ...kv);

// Segments: [bytes, expect] with expect 0 none, 1 one reply, 2 EOM.
function build(proto) {
  const conn = [];
  const msg = [];
  let pend = [];
  const seg = (list, expect) => {
    list.push([Buffer.concat(pend), expect]);
    pend = [];
  };
  if (!(proto & P.NOCONNECT)) {
    pend.push(macros('C', 'j', 'mx.example.org', '_', 'client.example.net [192.0.2.7]', '{daemon_name}', 'smtpd', '{client_addr}', '192.0.2.7', '{client_name}', 'client.example.net'));
    pend.push(pkt('C', 'client.example.net', Buffer.from([0x34, 25000 >> 8, 25000 & 0xff]), '192.0.2.7'));
    if (!(proto & P.NR_CONN)) seg(conn, 1);
  }
  if (!(proto & P.NOHELO)) {
    pend.push(pkt('H', 'client.example.net'));
    if (!(proto & P.NR_HELO)) seg(conn, 1);
  }
  if (pend.length) seg(conn, 0);
  if (!(proto & P.NOMAIL)) {
    pend.push(macros('M', '{mail_addr}', 'sender@example.net', '{mail_mailer}', 'smtp', '{mail_host}', 'example.net'));
    pend.push(pkt('M', '<sender@example.net>', 'SIZE=2400'));
    if (!(proto & P.NR_MAIL)) seg(msg, 1);
  }
  if (!(proto & P.NORCPT)) {
    pend.push(pkt('R', '<rcpt@example.org>'));
    if (!(proto & P.NR_RCPT)) seg(msg, 1);
  }
  if (!(proto & P.NODATA)) {
    pend.push(pkt('T'));
    if (!(proto & P.NR_DATA)) seg(msg, 1);
  }
  if (!(proto & P.NOHDRS)) {
    const h = [['Received', 'from client.example.net (client.example.net [192.0.2.7]) by mx.example.org'], ['From', 'Sender <sender@example.net>'],
      ['To', 'Recipient <rcpt@example.org>'], ['Subject', 'Benchmark message for the milter load generator'], ['Date', 'Sun, 29 Nov 2026 04:00:00 +0000'],
      ['Message-ID', '<bench.0123456789@example.net>'], ['MIME-Version', '1.0'], ['Content-Type', 'text/plain; charset=us-ascii'], ['X-Mailer', 'loadgen'],
      ['Reply-To', 'sender@example.net']];
    for (const [n, v] of h) {
      pend.push(pkt('L', n, v));
      if (!(proto & P.NR_HDR)) seg(msg, 1);
    }
  }
  if (!(proto & P.NOEOH)) {
    pend.push(pkt('N'));
    if (!(proto & P.NR_EOH)) seg(msg, 1);
  }
  if (!(proto & P.NOBODY)) {
    const body = Buffer.alloc(bodyBytes, 'x');
    for (let off = 0; off < bodyBytes; off += 65535) {
      pend.push(pkt('B', body.subarray(off, off + 65535)));
      if (!(proto & P.NR_BODY)) seg(msg, 1);
    }
  }
  pend.push(pkt('E'));
  seg(msg, 2);
  return { conn, msg };
}

const optneg = Buffer.alloc(17);
optneg.writeUInt32BE(13, 0);
optneg[4] = 0x4f;
optneg.writeUInt32BE(6, 5);
optneg.writeUInt32BE(0x1ff, 9);
optneg.writeUInt32BE(0x1fffff, 13);
const quit = pkt('Q');

let scripts;
let done = 0;
let counted = 0;
let headers = 0;
let errors = 0;
let stopping = false;
let open = 0;
const lat = [];
const t0 = performance.now();
let tCount0 = 0;
let tEnd = 0;
const warm = 300;

function connection() {
  open++;
  const s = net.connect(socket.replace(/^unix:/, ''));
  s.setNoDelay?.(true);
  let buf = Buffer.alloc(0);
  let script = null;
  let segIdx = 0;
  let expect = 3; // 3 = OPTNEG
  let msgs = 0;
  let hdrs = 0;
  let tMsg = performance.now();
  const advance = () => {
    for (;;) {
      if (segIdx >= script.length) {
        if (script === scripts.conn) {
          script = scripts.msg;
          segIdx = 0;
          continue;
        }
        return;
      }
      const [bytes, exp] = script[segIdx++];
      if (script === scripts.msg && segIdx === 1) tMsg = performance.now();
      s.write(bytes);
      if (exp) {
        expect = exp;
        hdrs = 0;
        return;
      }
    }
  };
  s.on('connect', () => s.write(optneg));
  s.on('data', (d) => {
    buf = buf.length ? Buffer.concat([buf, d]) : d;
    let p = 0;
    while (buf.length - p >= 5) {
      const len = buf.readUInt32BE(p);
      if (buf.length - p < 4 + len) break;
      const cmd = String.fromCharCode(buf[p + 4]);
      if (expect === 3) {
        const proto = buf.readUInt32BE(p + 13);
        scripts ??= build(proto);
        script = scripts.conn;
        segIdx = 0;
        expect = 0;
      } else if (expect === 1) {
        expect = 0;
      } else if (expect === 2) {
        if (cmd === 'h') hdrs++;
        else if (cmd === 'c' || cmd === 'a') {
          expect = 0;
          done++;
          headers += hdrs;
          const t = performance.now();
          if (!tCount0 && t - t0 >= warm) tCount0 = t;
          else if (tCount0 && !stopping) {
            counted++;
            lat.push(t - tMsg);
          }
          msgs++;
          if (msgs >= perConn || stopping) {
            s.end(quit);
            p = buf.length;
            break;
          }
          script = scripts.msg;
          segIdx = 0;
        }
      }
      p += 4 + len;
    }
    buf = buf.subarray(p);
    if (expect === 0 && script) {
      s.cork();
      advance();
      s.uncork();
    }
  });
  s.on('error', () => errors++);
  s.on('close', () => {
    open--;
    if (!stopping) connection();
    else if (open === 0) finish();
  });
}

function finish() {
  const secs = (tEnd - tCount0) / 1000;
  lat.sort((a, b) => a - b);
  const cpu = process.cpuUsage();
  console.log(JSON.stringify({
    messages: done, counted, seconds: secs, rate: counted / secs, p50_us: Math.round((lat[lat.length >> 1] ?? 0) * 1000),
    p99_us: Math.round((lat[Math.floor(lat.length * 0.99)] ?? 0) * 1000), errors, headers, loadgen_cpu_s: (cpu.user + cpu.system) / 1e6,
  }));
}

for (let i = 0; i < conc; i++) connection();
const timer = setInterval(() => {
  if (tCount0 && performance.now() - tCount0 >= seconds * 1000) {
    stopping = true;
    tEnd = performance.now();
    clearInterval(timer);
  }
}, 10);
