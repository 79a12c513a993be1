// runmilter over the wire: a Base subclass (test/fixtures/base/milter.cjs)
// served in a child process, on the real libmilter and on the TypeScript
// engine. Drain on SIGTERM/SIGINT, exit by itself, socket permissions
// (umask), socket clean-up, stale sockets and paths that are not sockets.
import { spawn } from 'node:child_process';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { afterEach, describe, expect, it } from 'vitest';

import { MilterClient } from '../src/testing/client';
import { ENGINES, engineEnv, startProcess, stopAll, tmpDir, tmpSocketSpec, waitForSocket, type StartOptions } from './helpers';
import { BASE_FIXTURE, events, reportFixtures, startBase as startFixture, waitFor } from './fixtures/base/harness';

afterEach(async (ctx) => {
  reportFixtures(ctx.task.result?.state === 'fail');
  await stopAll();
});

const MESSAGE = {
  client: { hostname: 'client.example.org', family: 'inet' as const, address: '192.0.2.7', port: 40001 },
  helo: 'client.example.org',
  from: '<alice@example.org>',
  rcpt: ['<bob@example.net>'],
  headers: [['Subject', 'hello']] as [string, string][],
  body: 'body\r\n',
};

const socketPath = (spec: string) => spec.replace(/^unix:/, '');

// drain and the unix socket: every test once per engine (NODEMILTER_ENGINE in
// the fixture's environment; startBase checks the process is on it).
describe.each(ENGINES)('%s engine', (engine) => {
  const startBase = (cfg: Record<string, unknown>, opts: StartOptions = {}) => startFixture(cfg, { ...opts, engine });

  describe('drain', () => {
    for (const signal of ['SIGTERM', 'SIGINT'] as const) {
      it(`${signal} during a slow eom: it finishes, a new connection gets 421, the process exits 0 and removes its socket`, async () => {
        const p = await startBase({
          milter: 'Actions',
          eomSleep: 1500,
          actions: [['addheader', 'X-Drained', 'yes']],
          run: { drain: 10_000 },
        });
        const file = socketPath(p.spec);
        expect(fs.lstatSync(file).isSocket()).toBe(true);
        const c1 = await MilterClient.connect(p.spec);
        const inflight = c1.sendMessage(MESSAGE);
        await waitFor(p, (e) => e.ev === 'eom');
        const t0 = Date.now();
        process.kill(p.pid, signal);
        await waitFor(p, (e) => e.ev === 'log' && /draining/.test(e.msg));

        // New sessions are refused while draining: TEMPFAIL with 421 at connect.
        const c2 = await MilterClient.connect(p.spec);
        const refused = await c2.connect('late.example', 'inet', '192.0.2.9', 1);
        expect(refused.status).toBe('tempfail');
        expect(refused.reply?.rcode).toBe('421');
        expect(refused.reply?.xcode).toBe('4.3.2');
        await c2.close();

        const r = await inflight;
        expect(r.decision).toBe('continue');
        expect(r.actions.map((a) => [a.type, (a as { name?: string }).name])).toEqual([['addheader', 'X-Drained']]);
        await c1.quit();

        const exit = await p.exited;
        expect(exit).toEqual({ code: 0, signal: null });
        // Well under the 10 s drain budget: it stopped as soon as the session ended.
        expect(Date.now() - t0).toBeLessThan(8000);
        expect(fs.existsSync(file)).toBe(false);
        const evs = events(p);
        expect(evs.some((e) => e.ev === 'stopped')).toBe(true);
        expect(evs.filter((e) => e.ev === 'eom-done')).toHaveLength(1);
        expect(evs.find((e) => e.ev === 'log' && /draining/.test(e.msg))!.msg).toMatch(new RegExp(`${signal}: draining open sessions for up to 10000 ms`));
      });
    }

    it('a session slower than the drain budget: runmilter resolves after the budget, the handler is not cut off', async () => {
      const p = await startBase({ milter: 'Actions', eomSleep: 4000, actions: [['addheader', 'X-Late', 'yes']], run: { drain: 300 } });
      const c1 = await MilterClient.connect(p.spec);
      const inflight = c1.sendMessage(MESSAGE);
      await waitFor(p, (e) => e.ev === 'eom');
      const t0 = Date.now();
      process.kill(p.pid, 'SIGTERM');
      await waitFor(p, (e) => e.ev === 'stopped');
      const stoppedAfter = Date.now() - t0;
      expect(stoppedAfter).toBeLessThan(3500); // the 300 ms budget, not the 4 s eom
      expect(fs.existsSync(socketPath(p.spec))).toBe(false);
      expect(events(p).some((e) => e.ev === 'eom-done')).toBe(false);
      // The pending handler keeps the process alive until it ends, and its
      // session, parked inside eom, still answers the MTA (on both engines).
      const reply = await inflight;
      expect(reply.decision).toBe('continue');
      expect(reply.actions).toHaveLength(1);
      expect(await p.exited).toEqual({ code: 0, signal: null });
      const names = events(p).map((e) => e.ev);
      expect(names.indexOf('stopped')).toBeLessThan(names.indexOf('eom-done'));
      expect(events(p).find((e) => e.ev === 'action')!).toMatchObject({ method: 'addheader', ok: true });
      c1.destroy();
    });
  });

  describe('the unix socket', () => {
    it('is created with the umask option and the process umask is restored after', async () => {
      const p = await startBase({ milter: 'EomOnly', run: { umask: 0o077 } });
      expect(fs.statSync(socketPath(p.spec)).mode & 0o777).toBe(0o700);
      const q = await startBase({ milter: 'EomOnly', run: { umask: 0o002 } });
      expect(fs.statSync(socketPath(q.spec)).mode & 0o777).toBe(0o775);
      const mine = process.umask();
      await waitFor(p, (e) => e.ev === 'ready');
      await waitFor(q, (e) => e.ev === 'ready');
      expect(events(p).find((e) => e.ev === 'ready')!.umask).toBe(mine);
      expect(events(q).find((e) => e.ev === 'ready')!.umask).toBe(mine);
    });

    it('is owner- and group-only by default, whatever the process umask', async () => {
      const p = await startBase({ milter: 'EomOnly', run: {} });
      expect(fs.statSync(socketPath(p.spec)).mode & 0o777).toBe(0o770);
    });

    it('a stale socket left by a dead process is replaced', async () => {
      const spec = tmpSocketSpec();
      const file = socketPath(spec);
      // A listener killed with SIGKILL leaves its socket file behind.
      const dead = spawn(process.execPath, ['-e', `require('net').createServer().listen(${JSON.stringify(file)}, () => process.kill(process.pid, 'SIGKILL'))`]);
      await new Promise((r) => dead.on('exit', r));
      expect(fs.lstatSync(file).isSocket()).toBe(true);
      await expect(MilterClient.connect(spec, { timeout: 2000 })).rejects.toThrow(/ECONNREFUSED/);

      const p = await startBase({ milter: 'EomOnly', socket: spec });
      const c = await MilterClient.connect(spec);
      const r = await c.sendMessage({ ...MESSAGE, quit: true });
      expect(r.decision).toBe('continue');
      await waitFor(p, (e) => e.ev === 'eom');
    });

    it('a regular file at the path is not removed: runmilter rejects with InvalidSocketError naming it', async () => {
      const dir = tmpDir('nmr-');
      const file = path.join(dir, 'milter.sock');
      fs.writeFileSync(file, 'not a socket\n');
      const p = await startProcess(process.execPath, {
        args: [BASE_FIXTURE],
        env: { BASE_CONFIG: JSON.stringify({ milter: 'EomOnly', socket: `unix:${file}` }), ...engineEnv(engine) },
      });
      const exit = await p.exited;
      expect(exit.code).toBe(3);
      const err = events(p).find((e) => e.ev === 'run-error')!.error;
      expect(err.name).toBe('InvalidSocketError');
      expect(err.code).toBe('ERR_MILTER_INVALID_SOCKET');
      expect(err.message).toContain(file);
      expect(err.message).toMatch(/is a regular file/);
      expect(fs.readFileSync(file, 'utf8')).toBe('not a socket\n');
      expect(events(p).some((e) => e.ev === 'ready')).toBe(false);
    });

    it('a directory at the path is refused the same way', async () => {
      const dir = tmpDir('nmr-');
      const sub = path.join(dir, 'milter.sock');
      fs.mkdirSync(sub);
      const p = await startProcess(process.execPath, {
        args: [BASE_FIXTURE],
        env: { BASE_CONFIG: JSON.stringify({ milter: 'EomOnly', socket: `unix:${sub}` }), ...engineEnv(engine) },
      });
      expect((await p.exited).code).toBe(3);
      expect(events(p).find((e) => e.ev === 'run-error')!.error.message).toMatch(/is a directory/);
      expect(fs.statSync(sub).isDirectory()).toBe(true);
    });

    it('an inet socket serves and stops the same way (nothing to remove)', async () => {
      const { freeInetSpec } = await import('./helpers');
      const spec = await freeInetSpec();
      const p = await startBase({ milter: 'EomOnly', socket: spec });
      await waitForSocket(spec);
      const c = await MilterClient.connect(spec);
      expect((await c.sendMessage({ ...MESSAGE, quit: true })).decision).toBe('continue');
      process.kill(p.pid, 'SIGTERM');
      expect((await p.exited).code).toBe(0);
      expect(events(p).some((e) => e.ev === 'stopped')).toBe(true);
    });
  });
});

describe('choosing the engine', () => {
  // An addon file that exists but is not a shared object: what a broken
  // install looks like to the loader.
  function brokenAddon(): string {
    const f = path.join(tmpDir('nmr-'), 'nodemilter.node');
    fs.writeFileSync(f, 'not an ELF file\n');
    return f;
  }

  it("engine 'auto' (NODEMILTER_ENGINE=auto) with an addon that cannot load: warns once and serves on the TypeScript engine", async () => {
    const spec = tmpSocketSpec();
    const p = await startProcess(process.execPath, {
      args: [BASE_FIXTURE],
      env: { BASE_CONFIG: JSON.stringify({ milter: 'EomOnly', socket: spec }), NODEMILTER_ENGINE: 'auto', NODEMILTER_ADDON: brokenAddon() },
      socket: spec,
      stopSignal: 'SIGKILL',
    });
    await waitFor(p, (e) => e.ev === 'ready');
    const c = await MilterClient.connect(spec);
    const r = await c.sendMessage({ ...MESSAGE, quit: true });
    expect(r.decision).toBe('continue');
    await waitFor(p, (e) => e.ev === 'eom');
    const logs = events(p).filter((e) => e.ev === 'log');
    const warnings = logs.filter((e) => e.level === 'warn');
    expect(warnings).toHaveLength(1);
    expect(warnings[0].msg).toMatch(/native addon did not load .*serving on the TypeScript engine/);
    expect(logs.some((e) => /listening on .*\(node engine\)/.test(e.msg))).toBe(true);
  });

  it('the default engine with an addon that cannot load: rejects with NativeLoadError offering the TypeScript engine, no socket', async () => {
    const spec = tmpSocketSpec();
    const p = await startProcess(process.execPath, {
      args: [BASE_FIXTURE],
      env: { BASE_CONFIG: JSON.stringify({ milter: 'EomOnly', socket: spec }), NODEMILTER_ENGINE: undefined, NODEMILTER_ADDON: brokenAddon() },
    });
    expect((await p.exited).code).toBe(3);
    const err = events(p).find((e) => e.ev === 'run-error')!.error;
    expect(err.name).toBe('NativeLoadError');
    expect(err.code).toBe('ERR_MILTER_NATIVE_LOAD');
    expect(err.message).toContain('could not load');
    expect(err.message).toContain("engine: 'node'");
    expect(err.message).toContain('NODEMILTER_ENGINE=node');
    expect(fs.existsSync(socketPath(spec))).toBe(false);
  });

  it('an unknown NODEMILTER_ENGINE is refused by name', async () => {
    const spec = tmpSocketSpec();
    const p = await startProcess(process.execPath, {
      args: [BASE_FIXTURE],
      env: { BASE_CONFIG: JSON.stringify({ milter: 'EomOnly', socket: spec }), NODEMILTER_ENGINE: 'postfix' },
    });
    expect((await p.exited).code).toBe(3);
    const err = events(p).find((e) => e.ev === 'run-error')!.error;
    expect(err.name).toBe('InvalidArgumentError');
    expect(err.message).toBe(`NODEMILTER_ENGINE must be 'libmilter', 'node' or 'auto', got "postfix"`);
  });
});
