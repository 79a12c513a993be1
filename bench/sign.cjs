// node bench/sign.cjs [--seconds S] [--conc 1,8,64] [--impls node,ts,opendkim] [--rounds N] [--json FILE]
// The `sign` shape: DKIM-sign every message at EOM (RSA-2048, relaxed/simple,
// one signature, the load generator's 10 headers and a 2 KiB body), with
// examples/dkim-sign.ts on nodemilter's two engines and with Debian's
// OpenDKIM (Mode s) on the same key and the same load. Prints messages per
// second and latency per cell; the load generator checks every EOM added the
// header. Needs `npm run build:ts` and the opendkim package (skipped if absent).
// relaxed/simple, not relaxed/relaxed: OpenDKIM 2.11 adds no signature with a
// relaxed body when the body's last line has no CRLF, as the load generator's
// 2 KiB body does (measured here: every EOM came back without the header).
'use strict';
const { spawn } = require('node:child_process');
const crypto = require('node:crypto');
const fs = require('node:fs');
const os = require('node:os');
const path = require('node:path');
const L = require('./lib.cjs');

const OPENDKIM = '/usr/sbin/opendkim';
const IMPLS = ['node', 'ts', 'opendkim'];

/** The options, read by L.readOptions: option -> [key, kind]. */
const OPTIONS = {
  '--seconds': ['seconds', 'number > 0'],
  '--conc': ['conc', 'wholes >= 1'],
  '--impls': ['impls', 'list', IMPLS],
  '--rounds': ['rounds', 'whole >= 1'],
  '--json': ['json', 'text'],
};

function parseArgs(argv) {
  const o = L.readOptions(argv, OPTIONS, 'bench/sign.cjs');
  o.seconds ??= 3;
  o.conc ??= [1, 8, 64];
  o.rounds ??= 3;
  o.impls ??= IMPLS.filter((i) => i !== 'opendkim' || fs.existsSync(OPENDKIM));
  return o;
}

/** A key pair and an OpenDKIM config in a private directory (OpenDKIM refuses keys under /tmp unless told). */
function setup() {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'nmbench-sign-'));
  const { privateKey } = crypto.generateKeyPairSync('rsa', { modulusLength: 2048 });
  const key = path.join(dir, 'bench.private');
  fs.writeFileSync(key, privateKey.export({ type: 'pkcs1', format: 'pem' }), { mode: 0o600 });
  return { dir, key };
}

const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

async function start(impl, socket, s) {
  const p = socket.replace(/^unix:/, '');
  let cmd;
  let args;
  let env = process.env;
  if (impl === 'opendkim') {
    const conf = path.join(s.dir, 'opendkim.conf');
    fs.writeFileSync(
      conf,
      [`Mode s`, `Socket local:${p}`, 'Domain example.net', 'Selector bench', `KeyFile ${s.key}`, 'Canonicalization relaxed/simple',
        'InternalHosts 192.0.2.0/24', 'Background no', 'Syslog no', 'RequireSafeKeys false'].join('\n') + '\n',
    );
    [cmd, args] = [OPENDKIM, ['-f', '-x', conf]];
  } else {
    [cmd, args] = [process.execPath, [path.join(L.nodemilterDist(), 'examples', 'dkim-sign.js'), socket]];
    env = {
      ...process.env,
      NODEMILTER_ENGINE: impl === 'ts' ? 'node' : 'libmilter',
      DKIM_DOMAIN: 'example.net',
      DKIM_SELECTOR: 'bench',
      DKIM_KEYFILE: s.key,
      DKIM_INTERNAL_HOSTS: '192.0.2.0/24',
      DKIM_CANONICALIZATION: 'relaxed/simple',
    };
  }
  try {
    fs.unlinkSync(p);
  } catch {}
  const child = spawn(cmd, args, { stdio: ['ignore', 'ignore', 'pipe'], env });
  let stderr = '';
  child.stderr.on('data', (d) => (stderr += d));
  let exited = false;
  child.once('exit', () => (exited = true));
  const deadline = Date.now() + 15_000;
  while (!fs.existsSync(p)) {
    if (exited) throw new Error(`${impl} exited before listening:\n${stderr}`);
    if (Date.now() > deadline) throw new Error(`${impl} did not listen on ${socket}:\n${stderr}`);
    await sleep(50);
  }
  await sleep(200);
  return {
    async stop() {
      if (!exited) {
        child.kill('SIGKILL');
        await new Promise((r) => (exited ? r() : child.once('exit', r)));
      }
      try {
        fs.unlinkSync(p);
      } catch {}
    },
  };
}

function median(xs) {
  const s = [...xs].sort((a, b) => a - b);
  return s.length ? s[Math.floor(s.length / 2)] : NaN;
}

async function main() {
  const o = parseArgs(process.argv.slice(2));
  L.loadgenPath();
  const s = setup();
  const rows = [];
  try {
    for (let round = 0; round < o.rounds; round++) {
      for (const impl of o.impls) {
        const socket = `unix:${path.join(s.dir, `${impl}.sock`)}`;
        const m = await start(impl, socket, s);
        try {
          for (const conc of o.conc) {
            const r = await L.runLoadgen(socket, { conc, perConn: 100, body: 2048, seconds: o.seconds, warmup: Math.min(1, o.seconds / 3), minHeaders: 1 });
            if (r.errors || r.bad) throw new Error(`${impl} conc ${conc}: ${r.errors} errors, ${r.bad} bad replies (first: ${r.first_error})\n${r.stderr.slice(0, 2000)}`);
            rows.push({ round, impl, conc, ...r });
          }
        } finally {
          await m.stop();
        }
      }
    }
  } finally {
    fs.rmSync(s.dir, { recursive: true, force: true });
  }
  console.log('impl      conc  msgs/s   p50 ms  p99 ms   (medians over rounds)');
  for (const impl of o.impls) {
    for (const conc of o.conc) {
      const cell = rows.filter((r) => r.impl === impl && r.conc === conc);
      const f = (k) => median(cell.map((r) => r[k]));
      console.log(`${impl.padEnd(9)} ${String(conc).padStart(4)}  ${f('rate').toFixed(0).padStart(6)}  ${(f('p50_us') / 1000).toFixed(2).padStart(7)} ${(f('p99_us') / 1000).toFixed(2).padStart(7)}`);
    }
  }
  if (o.json) fs.writeFileSync(o.json, JSON.stringify(rows, null, 2));
}

main().catch((err) => {
  console.error(L.errorText(err));
  process.exit(1);
});
