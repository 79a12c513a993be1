// Socket security: what libmilter's smfi_opensocket(rmsocket=true) does to
// things at the path that are not sockets, the permissions the unix socket
// gets, and a milter serving as an unprivileged user. Needs root (the
// parts that change user are skipped otherwise).
import { execFileSync } from 'node:child_process';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { afterEach, describe, expect, it, onTestFinished } from 'vitest';

import { MilterClient } from '../../src/testing/client';
import { startProcess, stopAll } from '../helpers';
import { canRead, readableCopy } from '../helpers/readable';
import { FIXTURE, MESSAGE, ROOT } from './lib';

afterEach(() => stopAll());

const OPEN = path.join(__dirname, 'opensocket.cjs');
const isRoot = process.getuid?.() === 0;
const NOBODY = 65534;

function tmpdir(): string {
  const d = fs.mkdtempSync(path.join(os.tmpdir(), 'nm-sock-'));
  fs.chmodSync(d, 0o755);
  return d;
}

function opensocket(p: string, rm: boolean): { ok?: boolean; error?: string } {
  return JSON.parse(execFileSync(process.execPath, [OPEN, p, rm ? '1' : '0'], { encoding: 'utf8' }).trim());
}

/** Try to connect to a unix socket as user nobody; the error code or 'connected'. */
function connectAsNobody(sock: string): string {
  const js = `require('net').connect(${JSON.stringify(sock)}).on('connect',()=>{console.log('connected');process.exit(0)}).on('error',(e)=>{console.log(e.code);process.exit(0)})`;
  return execFileSync('runuser', ['-u', 'nobody', '--', process.execPath, '-e', js], { encoding: 'utf8' }).trim();
}

describe("libmilter's opensocket(rmsocket = true) on a path that is not a socket", () => {
  it('leaves a regular file, a directory and a symlink in place and fails', () => {
    const d = tmpdir();
    const file = path.join(d, 'file');
    fs.writeFileSync(file, 'precious');
    const dir = path.join(d, 'dir');
    fs.mkdirSync(dir);
    const link = path.join(d, 'link');
    fs.symlinkSync(file, link);
    for (const p of [file, dir, link]) {
      const r = opensocket(p, true);
      expect(r.error, p).toMatch(/could not open the milter socket/);
    }
    expect(fs.readFileSync(file, 'utf8')).toBe('precious');
    expect(fs.statSync(dir).isDirectory()).toBe(true);
    expect(fs.lstatSync(link).isSymbolicLink()).toBe(true);
    fs.rmSync(d, { recursive: true });
  });

  it('replaces a stale socket with rmsocket, and fails on it without', async () => {
    const d = tmpdir();
    const sock = path.join(d, 's');
    // A stale socket: bound by a process that is gone.
    execFileSync(process.execPath, ['-e', `const s=require('net').createServer().listen(${JSON.stringify(sock)},()=>process.exit(0))`]);
    expect(fs.lstatSync(sock).isSocket()).toBe(true);
    expect(opensocket(sock, false).error).toMatch(/could not open the milter socket/);
    expect(opensocket(sock, true).ok).toBe(true);
    fs.rmSync(d, { recursive: true });
  });
});

describe('unix socket permissions', () => {
  async function serve(umask: string): Promise<string> {
    const d = tmpdir();
    const sock = path.join(d, 'milter.sock');
    await startProcess('/bin/sh', {
      args: ['-c', `umask ${umask}; exec "${process.execPath}" "${FIXTURE}"`],
      env: { RELIABILITY_CONFIG: JSON.stringify({ socket: `unix:${sock}`, quiet: true }) },
      socket: `unix:${sock}`,
      stopSignal: 'SIGKILL',
    });
    return sock;
  }

  it.runIf(isRoot)('with umask 022 only the owner may connect; with 000 anyone may (the check can fail)', async () => {
    const tight = await serve('022');
    expect(fs.statSync(tight).mode & 0o777).toBe(0o755);
    expect(connectAsNobody(tight)).toBe('EACCES');
    const open = await serve('000');
    expect(fs.statSync(open).mode & 0o777).toBe(0o777);
    expect(connectAsNobody(open)).toBe('connected');
  }, 30_000);

  it.runIf(isRoot)('a milter runs as an unprivileged user and serves mail', async (ctx) => {
    // nobody may not be able to enter the checkout (a private parent
    // directory): it runs a world-readable copy of what the milter needs.
    const files = readableCopy([path.relative(ROOT, FIXTURE)]);
    const fixture = files.at(path.relative(ROOT, FIXTURE));
    const unreadable = !canRead('nobody', process.execPath)
      ? `user nobody cannot run ${process.execPath}`
      : !canRead('nobody', fixture)
        ? `user nobody cannot read ${fixture}: a directory above ${os.tmpdir()} is closed to it`
        : undefined;
    if (unreadable) {
      files.remove(); // a skipped test runs no onTestFinished hook
      ctx.skip(unreadable);
    }
    onTestFinished(() => files.remove());
    const d = tmpdir();
    fs.chownSync(d, NOBODY, NOBODY);
    const sock = path.join(d, 'milter.sock');
    // setpriv execs (runuser would fork, and killing it would leave the milter running).
    const p = await startProcess('setpriv', {
      args: ['--reuid=nobody', '--regid=nogroup', '--clear-groups', '--', '/bin/sh', '-c', `umask 007; exec "${process.execPath}" "${fixture}"`],
      env: { RELIABILITY_CONFIG: JSON.stringify({ socket: `unix:${sock}`, quiet: true }) },
      socket: `unix:${sock}`,
      stopSignal: 'SIGKILL',
    });
    const st = fs.statSync(sock);
    expect(st.uid).toBe(NOBODY);
    expect(st.mode & 0o777).toBe(0o770);
    await p.waitForOutput('"ev":"ready"');
    const pid = Number(/"pid":(\d+)/.exec(p.stdout)![1]);
    expect(pid).toBe(p.pid);
    expect(fs.readFileSync(`/proc/${pid}/status`, 'utf8')).toMatch(/^Uid:\s+65534\s/m);
    const c = await MilterClient.connect(`unix:${sock}`);
    const r = await c.sendMessage({ ...MESSAGE, quit: true });
    c.destroy();
    expect(r.decision).toBe('continue');
    expect(r.actions.some((a) => a.type === 'addheader' && a.name === 'X-Reliability')).toBe(true);
  }, 30_000);
});
