#!/usr/bin/env node
// Hostile input on the milter socket. Starts scripts/reliability/milter.cjs
// (every callback registered; on the libmilter engine, or with --engine node
// on the TypeScript engine) on a private unix socket
// and, for the given time, has several connections at once send it random
// and mutated milter packets: lengths past the 64 KB limit (up to 4 GiB),
// truncated packets, zero lengths, unknown commands, malformed macros,
// commands out of order, missing or extra NULs, valid transactions with
// bytes flipped, and plain garbage. Every few seconds a well-formed message
// checks that the milter still serves. The milter's RSS is sampled from
// /proc once a second, and once per tenth of the run the milter (started
// with --expose-gc) is sent SIGUSR2: it runs a full GC and reports its RSS,
// V8 heap used, external and ArrayBuffer memory, the sessions it holds and
// the engine's counters (the summary's `mem` rows).
//
//   node scripts/reliability/fuzz.cjs [--minutes M | --seconds S] [--conns N]
//        [--engine libmilter|node] [--seed N] [--max-growth-mib N]
//        [--snapshots DIR]
//
// --snapshots DIR: the milter also gets --heapsnapshot-signal=SIGUSR1 and
// runs in DIR; a heap snapshot is written after the first tenth and at the
// end (each after a GC), to diff in Chrome DevTools' Memory tab.
//
// Exits 0 when the milter never crashed, every liveness probe passed and
// its RSS after the first tenth of the run grew by less than
// --max-growth-mib (default 64). Prints a JSON summary as its last line.
'use strict';
const fs = require('node:fs');
const net = require('node:net');
const os = require('node:os');
const path = require('node:path');
const { spawn } = require('node:child_process');

const root = path.join(__dirname, '..', '..');
const { MilterClient } = require(path.join(root, 'dist', 'src', 'testing', 'index.js'));

function arg(name, dflt) {
  const i = process.argv.indexOf(`--${name}`);
  if (i < 0) return dflt;
  const v = process.argv[i + 1];
  return v === undefined || v.startsWith('--') ? true : v;
}
const seconds = arg('minutes') ? Number(arg('minutes')) * 60 : Number(arg('seconds', 60));
const conns = Number(arg('conns', 8));
let seed = Number(arg('seed', Date.now() % 2 ** 31));
const firstSeed = seed;
const maxGrowth = Number(arg('max-growth-mib', 64)) * 2 ** 20;
const engine = arg('engine', 'libmilter');
const snapshots = arg('snapshots', undefined);
if (!(seconds > 0) || !(conns > 0) || (engine !== 'libmilter' && engine !== 'node') || snapshots === true) {
  console.error('usage: fuzz.cjs [--minutes M | --seconds S] [--conns N] [--engine libmilter|node] [--seed N] [--max-growth-mib N] [--snapshots DIR]');
  process.exit(64);
}

// A small seeded PRNG (mulberry32), so a failing run can be replayed with --seed.
function rnd() {
  seed = (seed + 0x6d2b79f5) | 0;
  let t = seed;
  t = Math.imul(t ^ (t >>> 15), t | 1);
  t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
  return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
}
const int = (n) => Math.floor(rnd() * n);
const pick = (a) => a[int(a.length)];
const bytes = (n) => Buffer.from(Array.from({ length: n }, () => int(256)));

function frame(cmd, data = Buffer.alloc(0)) {
  const b = Buffer.alloc(5 + data.length);
  b.writeUInt32BE(data.length + 1, 0);
  b[4] = typeof cmd === 'string' ? cmd.charCodeAt(0) : cmd;
  data.copy(b, 5);
  return b;
}
const z = (s) => Buffer.concat([Buffer.from(s, 'latin1'), Buffer.from([0])]);
const u32 = (n) => {
  const b = Buffer.alloc(4);
  b.writeUInt32BE(n >>> 0);
  return b;
};

function optneg() {
  return frame('O', Buffer.concat([u32(pick([6, 6, 6, 2, 0, 1, 7, 0xffffffff])), u32(pick([0x1ff, 0, 0xffffffff, int(2 ** 32)])), u32(pick([0x1fffff, 0, 0xffffffff, int(2 ** 32)]))]));
}

// A well-formed transaction, as packets.
function transaction() {
  const p = [optneg()];
  p.push(frame('D', Buffer.concat([Buffer.from('C'), z('j'), z('mx.example'), z('{daemon_name}'), z('fuzz')])));
  p.push(frame('C', Buffer.concat([z('client.example'), Buffer.from('4'), Buffer.from([0x9c, 0x40]), z('192.0.2.1')])));
  p.push(frame('H', z('client.example')));
  p.push(frame('M', Buffer.concat([z('<a@example.org>'), z('SIZE=10')])));
  p.push(frame('R', z('<b@example.net>')));
  p.push(frame('T'));
  for (let i = 0; i < 1 + int(4); i++) p.push(frame('L', Buffer.concat([z(`X-H${i}`), z('value ' + 'v'.repeat(int(200)))])));
  p.push(frame('N'));
  p.push(frame('B', Buffer.from('body line\r\n'.repeat(1 + int(50)))));
  p.push(frame('E'));
  if (rnd() < 0.5) p.push(frame('A'));
  p.push(frame('Q'));
  return p;
}

const hostile = {
  // Valid sequence with some packets mutated.
  mutated() {
    const p = transaction();
    for (let k = 0; k < 1 + int(4); k++) {
      const i = int(p.length);
      const b = Buffer.from(p[i]);
      const what = int(5);
      if (what === 0) b[int(b.length)] = int(256);
      else if (what === 1 && b.length > 5) b[4 + int(b.length - 4)] = 0;
      else if (what === 2) p[i] = b.subarray(0, int(b.length));
      else if (what === 3) p.splice(i, 1);
      else p.splice(i, 0, p[int(p.length)]);
      if (what < 2) p[i] = b;
    }
    return p;
  },
  // Lengths past the 64 KB limit, some with data following, some not.
  hugeLength() {
    const len = pick([65536, 65537, 65540, 262145, 1048577, 0x7fffffff, 0x80000000, 0xffffffff, 65535 + int(2 ** 20)]);
    const head = Buffer.alloc(5);
    head.writeUInt32BE(len >>> 0, 0);
    head[4] = pick(['B', 'L', 'D', 'M', 'O', 'C', 'X']).charCodeAt(0);
    const p = rnd() < 0.5 ? [optneg()] : [];
    p.push(head);
    if (rnd() < 0.5) p.push(Buffer.alloc(Math.min(len, 70000 + int(200000)), 0x41));
    return p;
  },
  // A packet cut short, or a length of zero.
  truncated() {
    const p = transaction().slice(0, 1 + int(6));
    const last = p[p.length - 1];
    p[p.length - 1] = last.subarray(0, int(last.length));
    if (rnd() < 0.3) p.push(Buffer.from([0, 0, 0, 0]));
    return p;
  },
  unknownCommand() {
    const p = rnd() < 0.7 ? [optneg()] : [];
    for (let i = 0; i < 1 + int(10); i++) {
      let c = int(256);
      while ('ABCDEHKLMNOQRTU'.includes(String.fromCharCode(c))) c = int(256);
      p.push(frame(c, bytes(int(100))));
    }
    return p;
  },
  badMacros() {
    const p = [optneg()];
    for (let i = 0; i < 1 + int(6); i++) {
      const what = int(6);
      let d;
      if (what === 0) d = Buffer.alloc(0);
      else if (what === 1) d = Buffer.from('C'); // stage, no names
      else if (what === 2) d = Buffer.concat([Buffer.from('C'), z('j')]); // odd count
      else if (what === 3) d = Buffer.concat([Buffer.from(String.fromCharCode(int(256))), z('{x}'), z('y')]); // unknown stage
      else if (what === 4) d = Buffer.concat([Buffer.from('M'), Buffer.from('no nul at all')]);
      else d = Buffer.concat([Buffer.from('R'), ...Array.from({ length: 200 + int(2000) }, (_, k) => z(`{m${k}}`))]);
      p.push(frame('D', d));
      if (rnd() < 0.5) p.push(frame(pick(['C', 'H', 'M', 'R']), z('x')));
    }
    return p;
  },
  outOfOrder() {
    const p = transaction();
    for (let i = p.length - 1; i > 0; i--) {
      const j = int(i + 1);
      [p[i], p[j]] = [p[j], p[i]];
    }
    if (rnd() < 0.5) p.shift();
    return p;
  },
  nulsInStrings() {
    const p = [optneg()];
    const s = () => pick([Buffer.from([0]), Buffer.from('a\0b\0c'), Buffer.from('no terminator'), Buffer.alloc(0), Buffer.alloc(300, 0), z('\0\0')]);
    p.push(frame('C', Buffer.concat([s(), Buffer.from(pick(['4', '6', 'L', 'U', 'Z'])), Buffer.from([0, 25]), s()])));
    p.push(frame('H', s()));
    p.push(frame('M', s()));
    p.push(frame('R', s()));
    p.push(frame('T'));
    p.push(frame('L', s()));
    p.push(frame('L', Buffer.concat([z('Name'), s()])));
    p.push(frame('N'));
    p.push(frame('E'));
    return p;
  },
  garbage() {
    return [bytes(1 + int(5000))];
  },
};
const kinds = Object.keys(hostile);

// hungUpByMilter: per kind, the connections the milter closed before the
// fuzzer hung up or gave up waiting.
const stats = { connections: 0, packets: 0, bytes: 0, byKind: {}, hungUpByMilter: {}, probesOk: 0, probesFailed: 0, probeErrors: [] };

function runHostile(spec) {
  const kind = pick(kinds);
  stats.byKind[kind] = (stats.byKind[kind] ?? 0) + 1;
  const packets = hostile[kind]();
  return new Promise((resolve) => {
    const sock = net.connect(spec);
    stats.connections++;
    let done = false;
    let ours = false;
    const end = (why) => {
      if (done) return;
      done = true;
      if (why === 'milter' && !ours) stats.hungUpByMilter[kind] = (stats.hungUpByMilter[kind] ?? 0) + 1;
      clearTimeout(timer);
      sock.destroy();
      resolve();
    };
    const timer = setTimeout(end, 200 + int(2000));
    sock.on('data', () => undefined);
    sock.on('error', () => end('milter'));
    sock.on('close', () => end('milter'));
    sock.on('connect', async () => {
      for (const p of packets) {
        if (done) return;
        stats.packets++;
        stats.bytes += p.length;
        sock.write(p);
        if (rnd() < 0.3) await new Promise((r) => setTimeout(r, int(20)));
      }
      // Sometimes hang up at once, sometimes leave it open until the timer.
      if (rnd() < 0.5) {
        ours = true;
        sock.end();
      }
    });
  });
}

async function probe(spec) {
  let c;
  try {
    c = await MilterClient.connect(spec, { timeout: 10_000 });
    const r = await c.sendMessage({
      from: '<probe@example.org>',
      rcpt: ['<x@example.net>'],
      headers: [['Subject', 'probe']],
      body: 'probe\r\n',
      quit: true,
    });
    const stamped = r.actions.some((a) => a.type === 'addheader' && a.name === 'X-Reliability');
    if (r.decision === 'continue' && stamped) stats.probesOk++;
    else {
      stats.probesFailed++;
      stats.probeErrors.push(`decision ${r.decision}`);
    }
  } catch (err) {
    stats.probesFailed++;
    stats.probeErrors.push(err.message);
  } finally {
    c?.destroy();
  }
}

function rssOf(pid) {
  try {
    const m = /VmRSS:\s+(\d+) kB/.exec(fs.readFileSync(`/proc/${pid}/status`, 'utf8'));
    return m ? Number(m[1]) * 1024 : undefined;
  } catch {
    return undefined;
  }
}

let started = Date.now();

// Ask the milter for a stats line (it runs gc() first) and wait for it.
async function askStats(child, statsLines, timeoutMs = 10_000) {
  const n = statsLines.length;
  try {
    child.kill('SIGUSR2');
  } catch {
    return undefined;
  }
  const t = Date.now();
  while (statsLines.length === n && Date.now() - t < timeoutMs) await new Promise((r) => setTimeout(r, 20));
  return statsLines[n];
}

async function main() {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'nm-fuzz-'));
  const sockPath = path.join(dir, 'milter.sock');
  const spec = `unix:${sockPath}`;
  const nodeArgs = ['--expose-gc'];
  if (snapshots) {
    fs.mkdirSync(snapshots, { recursive: true });
    nodeArgs.push('--heapsnapshot-signal=SIGUSR1');
  }
  const child = spawn(process.execPath, [...nodeArgs, path.join(__dirname, 'milter.cjs')], {
    env: { ...process.env, RELIABILITY_CONFIG: JSON.stringify({ socket: spec, quiet: true, deadline: { default: 3000 }, engine }) },
    stdio: ['ignore', 'pipe', 'pipe'],
    cwd: snapshots ? path.resolve(snapshots) : undefined,
  });
  let out = '';
  let err = '';
  // The milter's stats lines (one per SIGUSR2), parsed as they arrive.
  const statsLines = [];
  let partial = '';
  child.stdout.setEncoding('utf8').on('data', (d) => {
    out += d;
    const lines = (partial + d).split('\n');
    partial = lines.pop();
    for (const l of lines) if (l.includes('"ev":"stats"')) statsLines.push({ t: Date.now() - started, ...JSON.parse(l) });
  });
  child.stderr.setEncoding('utf8').on('data', (d) => (err = (err + d).slice(-20000)));
  let exit;
  child.on('exit', (code, signal) => (exit = { code, signal }));
  const t0 = Date.now();
  while (!fs.existsSync(sockPath)) {
    if (exit || Date.now() - t0 > 10_000) throw new Error(`milter did not start: ${err}`);
    await new Promise((r) => setTimeout(r, 20));
  }
  started = Date.now();
  const until = started + seconds * 1000;
  const samples = [];
  const sampler = setInterval(() => {
    const r = rssOf(child.pid);
    if (r) samples.push([Date.now() - started, r]);
  }, 1000);
  const probes = setInterval(() => { if (!exit) probe(spec); }, 3000);
  // Once per tenth of the run: a GC'd memory sample (and, with --snapshots,
  // a heap snapshot after the first tenth).
  let tenth = 0;
  const memTimer = setInterval(async () => {
    if (exit || ++tenth > 9) return;
    await askStats(child, statsLines);
    if (snapshots && tenth === 1 && !exit) child.kill('SIGUSR1');
  }, seconds * 100);
  await Promise.all(
    Array.from({ length: conns }, async () => {
      while (Date.now() < until && !exit) await runHostile(sockPath);
    }),
  );
  clearInterval(probes);
  clearInterval(memTimer);
  await probe(spec);
  clearInterval(sampler);
  // Final counters from the milter (its stats line, after a GC), then stop it.
  let final;
  if (!exit) {
    // Let the engine see the last hang-ups before it is asked.
    await new Promise((r) => setTimeout(r, 200));
    final = await askStats(child, statsLines);
    if (snapshots && !exit) {
      const before = new Set(fs.readdirSync(snapshots));
      child.kill('SIGUSR1');
      const t = Date.now();
      // The snapshot is complete when the file stops growing.
      let last = -1;
      while (Date.now() - t < 60_000) {
        await new Promise((r) => setTimeout(r, 500));
        const f = fs.readdirSync(snapshots).find((n) => !before.has(n) && n.endsWith('.heapsnapshot'));
        const size = f ? fs.statSync(path.join(snapshots, f)).size : -1;
        if (size > 0 && size === last) break;
        last = size;
      }
    }
  }
  const crashed = !!exit;
  child.kill('SIGKILL');
  fs.rmSync(dir, { recursive: true, force: true });

  const afterWarmup = samples.filter(([t]) => t >= seconds * 100);
  const base = (afterWarmup[0] ?? samples[0] ?? [0, 0])[1];
  const max = Math.max(0, ...samples.map(([, r]) => r));
  const mib = (n) => Math.round((n / 2 ** 20) * 10) / 10;
  const summary = {
    engine,
    seconds,
    conns,
    seed: firstSeed,
    ...stats,
    probeErrors: stats.probeErrors.slice(0, 5),
    crashed,
    exit,
    stderrTail: crashed ? err.slice(-2000) : undefined,
    rssFirstMiB: mib(samples[0]?.[1] ?? 0),
    rssBaseMiB: mib(base),
    rssMaxMiB: mib(max),
    rssEndMiB: mib(samples[samples.length - 1]?.[1] ?? 0),
    // One sample per tenth of the run, to see whether RSS levels off.
    rssTrendMiB: Array.from({ length: 10 }, (_, k) => samples.find(([t]) => t >= (k + 1) * seconds * 100)?.[1]).filter(Boolean).map(mib),
    // After a forced GC, once per tenth and at the end: RSS, V8 heap used,
    // (and the heap V8 has committed), external and ArrayBuffer memory (MiB),
    // the sessions milter.cjs holds (live), what the engine holds in
    // JavaScript (held: libmilter's JS session records, the node engine's
    // Connection objects), and sessions created/deleted so far.
    mem: statsLines.map((m) => ({ t: Math.round(m.t / 1000), rss: mib(m.rss), heap: mib(m.heapUsed), heapTotal: mib(m.heapTotal), ext: mib(m.external), ab: mib(m.arrayBuffers), live: m.live, held: m.diag?.held, created: m.diag?.created, deleted: m.diag?.deleted })),
    handlerErrors: [...new Set(out.split('\n').filter((l) => l.includes('"ev":"handlerError"')).map((l) => { const e = JSON.parse(l); return `${e.callback}: ${e.message}`; }))].slice(0, 10),
    diag: final?.diag,
    counts: final?.counts,
  };
  const ok = !crashed && stats.probesFailed === 0 && stats.probesOk > 0 && max - base < maxGrowth;
  summary.ok = ok;
  console.log(JSON.stringify(summary));
  process.exit(ok ? 0 : 1);
}

main().catch((e) => {
  console.error(e);
  process.exit(2);
});
