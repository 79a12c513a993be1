// npm run bench:mta -- [--messages N] [--concurrency C] [--rows a,b,c] [--size BYTES] [--transport unix|inet]
//
// The client-side benchmark: messages per second through a chain of two
// milters (two instances of the C libmilter bench milter, shape s1: every
// step replied, EOM adds a header), on the same host, with smtp-source
// (Postfix's load generator) submitting the same message:
//   postfix    a private Postfix, smtpd_milters = both, delivery to discard:
//   mta        nodemilter/mta in smtp-server (smtpServerHooks), a milter
//              connection per SMTP session as Postfix does, message dropped
//   mta-reuse  the same, with connections reused across sessions (QUIT_NC)
//   chain      nodemilter/mta's Milters alone, no SMTP
// smtp-server waits 100 ms after accepting each connection before its
// greeting (its early-talker check, not configurable), so the mta rows are
// bounded by concurrency x 10 sessions/s.
// --transport: how the MTA side reaches the milters, unix sockets (default)
// or TCP on 127.0.0.1. Over TCP, libmilter writes each action and the final
// reply of EOM as a write of its own, and Nagle's algorithm holds the reply
// until the MTA's delayed ACK (40 ms on Linux): measured 49.7 ms per message
// through one C milter over TCP, 5.6 ms over a unix socket. That delay is
// the same for Postfix and for nodemilter/mta, and hides what the client
// side costs, so the rows use unix sockets unless told.
// Prints one JSON line per row. Needs root, Debian's postfix and
// libmilter-dev, `npm run build:ts` and the smtp-server devDependency.
'use strict';
const { execFileSync, spawn } = require('node:child_process');
const crypto = require('node:crypto');
const fs = require('node:fs');
const net = require('node:net');
const os = require('node:os');
const path = require('node:path');

const ROOT = path.join(__dirname, '..');
const L = require('./lib.cjs');

/** The options, read by L.readOptions: option -> [key, kind]. */
const ROW_NAMES = ['postfix', 'mta', 'mta-reuse', 'chain'];
const OPTIONS = {
  '--messages': ['messages', 'whole >= 1'],
  '--concurrency': ['concurrency', 'whole >= 1'],
  '--rows': ['rows', 'list', ROW_NAMES],
  '--size': ['size', 'whole >= 1'],
  '--transport': ['transport', 'text', ['unix', 'inet']],
};
let opts;
try {
  opts = { messages: 2000, concurrency: 8, rows: ROW_NAMES, size: 4096, transport: 'unix', ...L.readOptions(process.argv.slice(2), OPTIONS, 'bench/mta.cjs') };
} catch (err) {
  console.error(`bench/mta: ${L.errorText(err)}`);
  process.exit(1);
}
const { messages: MESSAGES, concurrency: CONCURRENCY, rows: ROWS, size: SIZE, transport: TRANSPORT } = opts;
// after the options, so that a bad option is told without a build
const mta = require(path.join(process.env.NODEMILTER_DIST || path.join(ROOT, 'dist'), 'src/mta/index.js'));

const children = new Set();
process.on('exit', () => {
  for (const c of children) {
    try {
      c.kill('SIGKILL');
    } catch {
      /* gone */
    }
  }
});

function freePort() {
  return new Promise((resolve, reject) => {
    const s = net.createServer();
    s.once('error', reject);
    s.listen(0, '127.0.0.1', () => {
      const { port } = s.address();
      s.close(() => resolve(port));
    });
  });
}

async function waitPort(port, ms = 15000) {
  const until = Date.now() + ms;
  for (;;) {
    const ok = await new Promise((r) => {
      const s = net.createConnection({ port, host: '127.0.0.1' });
      s.once('connect', () => (s.destroy(), r(true)));
      s.once('error', () => r(false));
    });
    if (ok) return;
    if (Date.now() > until) throw new Error(`nothing listens on 127.0.0.1:${port}`);
    await new Promise((r) => setTimeout(r, 50));
  }
}

function cMilter() {
  const src = path.join(__dirname, 'milters', 'milter.c');
  const hash = crypto.createHash('sha256').update(fs.readFileSync(src)).digest('hex').slice(0, 16);
  const out = path.join(os.tmpdir(), 'nodemilter-bench-mta', hash, 'milter');
  if (!fs.existsSync(out)) {
    fs.mkdirSync(path.dirname(out), { recursive: true });
    execFileSync(process.env.CC || 'cc', ['-O2', '-o', `${out}.${process.pid}`, src, '-lmilter', '-lpthread'], { stdio: 'inherit' });
    fs.renameSync(`${out}.${process.pid}`, out);
  }
  return out;
}

let socketDir;
async function startMilter(bin) {
  if (TRANSPORT === 'inet') {
    const port = await freePort();
    const c = spawn(bin, ['s1', `inet:${port}@127.0.0.1`], { stdio: 'ignore' });
    children.add(c);
    await waitPort(port);
    return { postfix: `inet:127.0.0.1:${port}`, spec: `inet:${port}@127.0.0.1`, stop: () => (c.kill('SIGKILL'), children.delete(c)) };
  }
  // Postfix's smtpd (user postfix, not chrooted here) must reach the socket: a
  // world-searchable directory, and the milter started with umask 0 so its
  // socket is writable by others.
  socketDir ??= fs.mkdtempSync('/tmp/nm-bench-mta-');
  fs.chmodSync(socketDir, 0o755);
  const file = path.join(socketDir, `milter-${children.size}.sock`);
  const c = spawn('/bin/sh', ['-c', 'umask 0 && exec "$0" s1 "$1"', bin, `unix:${file}`], { stdio: 'ignore' });
  children.add(c);
  const until = Date.now() + 10000;
  while (!fs.existsSync(file)) {
    if (Date.now() > until) throw new Error(`the C milter did not create ${file}`);
    await new Promise((r) => setTimeout(r, 20));
  }
  return { postfix: `unix:${file}`, spec: `unix:${file}`, stop: () => (c.kill('SIGKILL'), children.delete(c)) };
}

/**
 * smtp-source: MESSAGES messages, CONCURRENCY sessions at once, one message
 * per session; resolves with the seconds taken. Asynchronous: the mta rows
 * serve SMTP in this process.
 */
function smtpSource(port) {
  const t0 = process.hrtime.bigint();
  const args = ['-s', String(CONCURRENCY), '-m', String(MESSAGES), '-l', String(SIZE), '-f', 'sender@example.com', '-t', 'rcpt@example.org', `127.0.0.1:${port}`];
  const c = spawn('/usr/sbin/smtp-source', args, { stdio: ['ignore', 'ignore', 'inherit'] });
  children.add(c);
  return new Promise((resolve, reject) => {
    c.on('error', reject);
    c.on('exit', (code) => {
      children.delete(c);
      if (code !== 0) reject(new Error(`smtp-source exited with ${code}`));
      else resolve(Number(process.hrtime.bigint() - t0) / 1e9);
    });
  });
}

const MASTER_CF = (port) => `127.0.0.1:${port} inet n - n - - smtpd
pickup unix n - n 60 1 pickup
cleanup unix n - n - 0 cleanup
qmgr unix n - n 300 1 qmgr
rewrite unix - - n - - trivial-rewrite
bounce unix - - n - 0 bounce
defer unix - - n - 0 bounce
trace unix - - n - 0 bounce
verify unix - - n - 1 verify
flush unix n - n 1000? 0 flush
proxymap unix - - n - - proxymap
showq unix n - n - - showq
error unix - - n - - error
retry unix - - n - - error
discard unix - - n - - discard
anvil unix - - n - 1 anvil
scache unix - - n - 1 scache
postlog unix-dgram n - n - 1 postlogd
`;

async function startPostfix(milters) {
  const dir = fs.mkdtempSync('/tmp/nm-bench-postfix-');
  fs.chmodSync(dir, 0o755);
  const conf = path.join(dir, 'etc');
  const queue = path.join(dir, 'spool');
  const data = path.join(dir, 'data');
  for (const d of [conf, queue, data]) fs.mkdirSync(d);
  execFileSync('chown', ['postfix', data]);
  const port = await freePort();
  const main = {
    compatibility_level: '3.6',
    queue_directory: queue,
    data_directory: data,
    command_directory: '/usr/sbin',
    daemon_directory: '/usr/lib/postfix/sbin',
    meta_directory: '/etc/postfix',
    shlib_directory: '/usr/lib/postfix',
    mail_owner: 'postfix',
    setgid_group: 'postdrop',
    myhostname: 'mta.bench.example',
    mydestination: '',
    inet_interfaces: 'loopback-only',
    inet_protocols: 'ipv4',
    mynetworks: '127.0.0.0/8',
    default_transport: 'discard',
    relay_transport: 'discard',
    maillog_file: path.join(dir, 'maillog'),
    maillog_file_prefixes: dir,
    alias_maps: '',
    alias_database: '',
    local_recipient_maps: '',
    smtpd_milters: milters.map((m) => m.postfix).join(', '),
    milter_default_action: 'tempfail',
    smtpd_client_connection_count_limit: '0',
    smtpd_client_connection_rate_limit: '0',
    smtpd_client_message_rate_limit: '0',
    default_process_limit: '200',
  };
  fs.writeFileSync(path.join(conf, 'main.cf'), Object.entries(main).map(([k, v]) => `${k} = ${v}\n`).join(''));
  fs.writeFileSync(path.join(conf, 'master.cf'), MASTER_CF(port));
  for (const d of ['active', 'bounce', 'corrupt', 'defer', 'deferred', 'flush', 'hold', 'incoming', 'private', 'saved', 'trace']) {
    fs.mkdirSync(path.join(queue, d), { mode: 0o700 });
    execFileSync('chown', ['postfix:root', path.join(queue, d)]);
  }
  fs.mkdirSync(path.join(queue, 'maildrop'), { mode: 0o730 });
  execFileSync('chown', ['postfix:postdrop', path.join(queue, 'maildrop')]);
  fs.mkdirSync(path.join(queue, 'public'), { mode: 0o710 });
  execFileSync('chown', ['postfix:postdrop', path.join(queue, 'public')]);
  fs.mkdirSync(path.join(queue, 'pid'), { mode: 0o755 });
  execFileSync('/usr/lib/postfix/sbin/master', ['-c', conf, '-w']);
  await waitPort(port);
  return {
    port,
    log: () => (fs.existsSync(main.maillog_file) ? fs.readFileSync(main.maillog_file, 'utf8') : ''),
    stop() {
      try {
        execFileSync('/usr/sbin/postfix', ['-c', conf, 'abort'], { stdio: 'ignore' });
      } catch {
        /* not running */
      }
      fs.rmSync(dir, { recursive: true, force: true });
    },
  };
}

async function startMtaServer(milters, reuse) {
  const { SMTPServer } = require('smtp-server');
  const chain = new mta.Milters(milters.map((m) => ({ socket: m.spec, reuse, maxIdle: CONCURRENCY * 2 })));
  let delivered = 0;
  const server = new SMTPServer({
    authOptional: true,
    disabledCommands: ['AUTH', 'STARTTLS'],
    logger: false,
    maxClients: 1000,
    // no reverse DNS of the client: the bench measures the milters, not the resolver
    disableReverseLookup: true,
    ...mta.smtpServerHooks(chain, {
      hostname: 'mta.bench.example',
      async deliver(outcome) {
        if (outcome.edits.length !== milters.length) throw new Error(`only ${outcome.edits.length} milters edited the message`);
        delivered++;
      },
    }),
  });
  const port = await freePort();
  await new Promise((r) => server.listen(port, '127.0.0.1', r));
  return { port, delivered: () => delivered, close: async () => (await new Promise((r) => server.close(r)), await chain.close()) };
}

async function chainOnly(milters) {
  const chain = new mta.Milters(milters.map((m) => ({ socket: m.spec })));
  const body = `${'x'.repeat(76)}\r\n`.repeat(Math.max(1, Math.floor(SIZE / 78)));
  const msg = `From: sender@example.com\r\nTo: rcpt@example.org\r\nSubject: bench\r\n\r\n${body}`;
  let next = 0;
  let ok = 0;
  const t0 = process.hrtime.bigint();
  await Promise.all(
    Array.from({ length: CONCURRENCY }, async () => {
      while (next++ < MESSAGES) {
        const s = await chain.session({ address: '127.0.0.1', port: 1, hostname: 'localhost' });
        await s.connect();
        await s.helo('localhost');
        await s.mail('<sender@example.com>');
        await s.rcpt('<rcpt@example.org>');
        const out = await s.message(msg);
        if (out.verdict.action === 'continue' && out.edits.length === milters.length) ok++;
        await s.close();
      }
    }),
  );
  const seconds = Number(process.hrtime.bigint() - t0) / 1e9;
  await chain.close();
  return { seconds, ok };
}

async function main() {
  if (process.getuid() !== 0) throw new Error('run as root (Postfix drops privileges)');
  const bin = cMilter();
  const milters = [await startMilter(bin), await startMilter(bin)];
  const common = { milters: 2, milter: 'c s1', transport: TRANSPORT, messages: MESSAGES, concurrency: CONCURRENCY, size: SIZE, host: os.hostname(), cpus: os.cpus().length };
  try {
    for (const row of ROWS) {
      if (row === 'postfix') {
        const pf = await startPostfix(milters);
        try {
          const seconds = await smtpSource(pf.port);
          // wait until the queue manager has handed every message to discard
          const until = Date.now() + 60000;
          while ((pf.log().match(/status=sent \(/g) ?? []).length < MESSAGES && Date.now() < until) await new Promise((r) => setTimeout(r, 100));
          const sent = (pf.log().match(/status=sent \(/g) ?? []).length;
          const milterErrors = (pf.log().match(/milter.*(error|timeout)/gi) ?? []).length;
          console.log(JSON.stringify({ row, ...common, seconds: +seconds.toFixed(3), perSecond: +(MESSAGES / seconds).toFixed(1), delivered: sent, milterErrors }));
        } finally {
          pf.stop();
        }
      } else if (row === 'mta' || row === 'mta-reuse') {
        const srv = await startMtaServer(milters, row === 'mta-reuse');
        try {
          const seconds = await smtpSource(srv.port);
          console.log(JSON.stringify({ row, ...common, seconds: +seconds.toFixed(3), perSecond: +(MESSAGES / seconds).toFixed(1), delivered: srv.delivered() }));
        } finally {
          await srv.close();
        }
      } else if (row === 'chain') {
        const { seconds, ok } = await chainOnly(milters);
        console.log(JSON.stringify({ row, ...common, seconds: +seconds.toFixed(3), perSecond: +(MESSAGES / seconds).toFixed(1), delivered: ok }));
      } else throw new Error(`unknown row ${row}: expected postfix, mta, mta-reuse, chain`);
    }
  } finally {
    for (const m of milters) m.stop();
    if (socketDir) fs.rmSync(socketDir, { recursive: true, force: true });
  }
}

main().then(
  () => process.exit(0),
  (e) => {
    console.error(`bench/mta: ${L.errorText(e)}`);
    process.exit(1);
  },
);
