// runmilter with `workers`, on both engines, over real sockets: a supervisor
// opens the socket once, N worker processes serve it; a worker killed with
// SIGKILL is replaced and costs only its own sessions; SIGHUP reloads from
// the code on disk without a refused connection; a worker that dies at
// start-up is retried with backoff until the supervisor gives up; SIGTERM
// drains and removes the socket.
import * as fs from 'node:fs';
import * as path from 'node:path';
import { afterEach, describe, expect, it } from 'vitest';

import { ENGINES, checkEngine, engineEnv, freeInet6Spec, freeInetSpec, startProcess, stopAll, waitForSocket, tmpDir, tmpSocketSpec } from '../helpers';
import { FIXTURE, lines, logs, sendOne, sleep, startRuntime, stopRuntimes, waitLine, workerPids, type Sent } from './lib';

afterEach(async () => {
  await stopRuntimes();
  await stopAll();
});

const stampPid = (s: Sent) => (s.stamp ? Number(s.stamp.split(' ')[0]) : undefined);

describe.each(ENGINES)('workers (%s engine)', (engine) => {
  it('two workers serve one socket: the kernel spreads the sessions, each worker is on the engine, the socket is owner- and group-only', async () => {
    const spec = tmpSocketSpec();
    const p = await startRuntime(engine, { socket: spec, workers: 2, eomSleep: 150 });
    await waitLine(p, (l) => l.ev === 'listening' && l.worker === undefined);
    const pids = workerPids(p.pid);
    expect(pids).toHaveLength(2);
    for (const pid of pids) checkEngine(pid, engine);
    // The supervisor never loads the milter's engine to serve: it holds the socket only.
    expect((fs.statSync(spec.slice(5)).mode & 0o777).toString(8)).toBe('770');
    // The kernel decides which worker accepts: a burst may all land on one
    // (libmilter's listener accepts faster than a session ends), so bursts
    // go on until both served one, or 10 bursts did not spread.
    const by = new Set<number | undefined>();
    for (let burst = 0; burst < 10 && by.size < 2; burst++) {
      const sent = await Promise.all(Array.from({ length: 24 }, (_, i) => sendOne(spec, burst * 24 + i)));
      expect(sent.map((s) => s.decision)).toEqual(sent.map(() => 'continue'));
      for (const s of sent) by.add(stampPid(s));
    }
    expect([...by].sort()).toEqual([...pids].sort());
    expect(logs(p).filter((l) => /listening on .*fd 3 from the supervisor/.test(l))).toHaveLength(2);
    // A SIGHUP that reaches a worker (a terminal hanging up on the process group) is the supervisor's to act on.
    process.kill(pids[0], 'SIGHUP');
    await sleep(300);
    expect(workerPids(p.pid).sort()).toEqual([...pids].sort());
  });

  it('kill -9 of one worker: its open session fails, the others finish, a new worker replaces it (logged with why)', async () => {
    const spec = tmpSocketSpec();
    const p = await startRuntime(engine, { socket: spec, workers: 2, eomSleep: 1500, restart: { initialDelay: 200 } });
    await waitLine(p, (l) => l.ev === 'listening' && l.worker === undefined);
    const pids = workerPids(p.pid);
    // Sessions until both workers hold some in their 1.5 s eom (the kernel picks who accepts).
    const inflight: Promise<Sent>[] = [];
    const eoms = () => lines(p).filter((l) => l.ev === 'eom');
    for (let i = 0; i < 40 && new Set(eoms().map((l) => l.pid)).size < 2; i++) {
      inflight.push(sendOne(spec, i));
      await sleep(60);
    }
    await sleep(200);
    const holding = new Set(eoms().map((l) => l.pid));
    expect([...holding].sort()).toEqual([...pids].sort());
    const [victim, survivor] = pids;
    process.kill(victim, 'SIGKILL');
    const sent = await Promise.all(inflight);
    const ok = sent.filter((s) => s.decision === 'continue');
    const failed = sent.filter((s) => s.decision !== 'continue');
    // Only the victim's sessions failed (the connection closed under them); every other one was answered by the survivor.
    expect(failed.length).toBeGreaterThan(0);
    expect(ok.length).toBeGreaterThan(0);
    for (const s of ok) expect(stampPid(s)).toBe(survivor);
    for (const s of failed) expect(s.decision).toBe('error');
    await waitLine(p, (l) => /worker \d \(pid \d+\) was killed by SIGKILL .* after serving .*; starting a new worker \d in 200 ms/.test(l.msg ?? ''));
    await waitLine(p, (l) => /serving again/.test(l.msg ?? ''));
    const now = workerPids(p.pid);
    expect(now).toHaveLength(2);
    expect(now).toContain(survivor);
    expect(now).not.toContain(victim);
    const after = await Promise.all(Array.from({ length: 12 }, (_, i) => sendOne(spec, 100 + i)));
    expect(after.map((s) => s.decision)).toEqual(after.map(() => 'continue'));
    for (const s of after) expect(now).toContain(stampPid(s));
  });

  it('SIGHUP reloads from the code on disk under load: new workers serve before the old drain, no connection refused, the socket never closes', async () => {
    const dir = tmpDir();
    const verdictFile = path.join(dir, 'verdict');
    const spec = tmpSocketSpec();
    const p = await startRuntime(engine, { socket: spec, workers: 2, eomSleep: 300, verdictFile, drain: 10_000 });
    await waitLine(p, (l) => l.ev === 'listening' && l.worker === undefined);
    const old = workerPids(p.pid);
    const sock = fs.statSync(spec.slice(5)).ino;
    // Load: 6 senders back to back over new connections while the code changes and SIGHUP reloads.
    let stop = false;
    const results: Sent[] = [];
    const senders = Array.from({ length: 6 }, async (_, k) => {
      for (let i = 0; !stop; i++) results.push(await sendOne(spec, k * 1000 + i));
    });
    await sleep(500);
    fs.writeFileSync(verdictFile, 'reject');
    process.kill(p.pid, 'SIGHUP');
    await waitLine(p, (l) => /reload done/.test(l.msg ?? ''), 30_000);
    await sleep(500);
    stop = true;
    await Promise.all(senders);
    const now = workerPids(p.pid);
    expect(now).toHaveLength(2);
    for (const pid of old) expect(now).not.toContain(pid);
    expect(fs.statSync(spec.slice(5)).ino).toBe(sock);
    // Every session was answered by a milter: old code (continue, stamped) or new (reject 550 from a new pid).
    const errors = results.filter((r) => r.decision === 'error');
    const tempfails = results.filter((r) => r.decision === 'tempfail');
    const rejects = results.filter((r) => r.decision === 'reject');
    // On either engine a draining old worker stops accepting (libmilter:
    // milter.stopAccepting) and the new ones take every new connection.
    expect(errors).toEqual([]);
    expect(tempfails).toEqual([]);
    expect(rejects.length).toBeGreaterThan(0);
    for (const r of rejects) expect(r.reply).toMatch(new RegExp(`^550 5\\.7\\.1 rejected by (${now.join('|')})$`));
    for (const r of results.filter((x) => x.decision === 'continue')) expect(old).toContain(stampPid(r));
    expect(logs(p).some((l) => /reload: 2 new workers \(generation 2\) serving; draining 2 old/.test(l))).toBe(true);
  }, 60_000);

  it('reload() from code whose new workers cannot start rejects naming why, and the old workers keep serving', async () => {
    const spec = tmpSocketSpec();
    const p = await startRuntime(engine, { socket: spec, workers: 2, crash: 'reload' });
    await waitLine(p, (l) => l.ev === 'listening' && l.worker === undefined);
    const old = workerPids(p.pid).sort();
    process.kill(p.pid, 'SIGUSR2');
    const r = await waitLine(p, (l) => l.ev === 'reload');
    expect(r).toMatchObject({ ok: false, name: 'MilterStateError' });
    expect(r.message).toMatch(/^reload failed: worker \d \(pid \d+\) exited with code 3; its stderr said: Error: the new code does not start \(test fixture\) before it served; the old workers keep serving$/);
    expect(workerPids(p.pid).sort()).toEqual(old);
    const sent = await Promise.all(Array.from({ length: 6 }, (_, i) => sendOne(spec, i)));
    expect(sent.map((s) => s.decision)).toEqual(sent.map(() => 'continue'));
    for (const s of sent) expect(old).toContain(stampPid(s));
    // No restart was scheduled for the reload's workers.
    expect(logs(p).filter((l) => /starting a new worker/.test(l))).toEqual([]);
  });

  it('the supervisor killed with SIGKILL: its workers notice the channel close, drain and exit by themselves', async () => {
    const spec = tmpSocketSpec();
    const p = await startRuntime(engine, { socket: spec, workers: 2 });
    await waitLine(p, (l) => l.ev === 'listening' && l.worker === undefined);
    const pids = workerPids(p.pid);
    expect((await sendOne(spec, 1)).decision).toBe('continue');
    process.kill(p.pid, 'SIGKILL');
    // p.exited waits for the workers too: they hold its stdout.
    await p.exited;
    // Gone, or a zombie waiting for whoever inherited it (this container's init may not reap).
    const state = (pid: number) => (fs.existsSync(`/proc/${pid}/status`) ? /State:\s+(\S)/.exec(fs.readFileSync(`/proc/${pid}/status`, 'utf8'))![1] : 'gone');
    for (const pid of pids) expect(['gone', 'Z']).toContain(state(pid));
    expect(logs(p).filter((l) => /\[worker \d\]: the supervisor went away: draining open sessions/.test(l))).toHaveLength(2);
    expect(logs(p).filter((l) => /\[worker \d\]: stopped$/.test(l))).toHaveLength(2);
  });

  it('a worker that dies at start-up is retried with exponential backoff, then the supervisor gives up with a clear message', async () => {
    const spec = tmpSocketSpec();
    const p = await startRuntime(engine, { socket: spec, workers: 1, crash: 'start', restart: { initialDelay: 100, limit: 3 } }, { wait: false });
    const exit = await p.exited;
    expect(exit.code).toBe(1);
    const err = lines(p).find((l) => l.ev === 'error');
    expect(err).toMatchObject({ name: 'WorkerCrashLoopError', code: 'ERR_MILTER_CRASH_LOOP' });
    expect(err!.message).toMatch(/giving up: workers failed 4 times in a row, none serving 10000 ms \(restart\.limit 3\); last: worker 1 \(pid \d+\) exited with code 3; its stderr said: Error: the worker cannot start \(test fixture\) before it served/);
    const delays = logs(p).flatMap((l) => /starting a new worker 1 in (\d+) ms \(failure (\d) of at most 3/.exec(l)?.slice(1, 3).map(Number) ?? []);
    expect(delays).toEqual([100, 1, 200, 2, 400, 3]);
    expect(fs.existsSync(spec.slice(5))).toBe(false);
  });

  it('a worker that crashes once at start-up is replaced and the milter serves; SIGTERM then drains every worker and removes the socket', async () => {
    const dir = tmpDir();
    const spec = tmpSocketSpec();
    const p = await startRuntime(engine, { socket: spec, workers: 2, crash: 'start-once', crashMark: path.join(dir, 'mark'), restart: { initialDelay: 100 } }, { wait: false });
    await waitLine(p, (l) => /serving again/.test(l.msg ?? ''));
    // "Serving" (onListening, READY=1) waits for both slots, the replacement included.
    await waitLine(p, (l) => l.ev === 'listening' && l.worker === undefined);
    expect(logs(p).filter((l) => /: 2 workers serving$/.test(l))).toHaveLength(1);
    const sent = await Promise.all(Array.from({ length: 6 }, (_, i) => sendOne(spec, i)));
    expect(sent.map((s) => s.decision)).toEqual(sent.map(() => 'continue'));
    // reload() from code: resolves once the new workers serve and the old ones are gone.
    const before = workerPids(p.pid);
    process.kill(p.pid, 'SIGUSR2');
    expect(await waitLine(p, (l) => l.ev === 'reload')).toMatchObject({ ok: true });
    const after = workerPids(p.pid);
    expect(after).toHaveLength(2);
    for (const pid of before) expect(after).not.toContain(pid);
    expect((await sendOne(spec, 99)).stamp).toMatch(/ g2$/);
    process.kill(p.pid, 'SIGTERM');
    expect(await p.exited).toEqual({ code: 0, signal: null });
    expect(fs.existsSync(spec.slice(5))).toBe(false);
    // Two workers drained by the reload, two by the SIGTERM, then the supervisor.
    expect(logs(p).filter((l) => /\[worker \d\]: stopped/.test(l))).toHaveLength(4);
    expect(lines(p).filter((l) => l.ev === 'done').length).toBe(5);
  });
});

describe('workers: a worker that faults', () => {
  it('a SIGSEGV in a libmilter-engine worker: the supervisor logs the signal and thread from the addon\'s crash report, and replaces it', async () => {
    const spec = tmpSocketSpec();
    const p = await startRuntime('libmilter', { socket: spec, workers: 2, restart: { initialDelay: 200 } });
    await waitLine(p, (l) => l.ev === 'listening' && l.worker === undefined);
    const [victim] = workerPids(p.pid);
    process.kill(victim, 'SIGSEGV');
    const line = await waitLine(p, (l) => new RegExp(`\\(pid ${victim}\\) was killed by SIGSEGV`).test(l.msg ?? ''));
    // Not the report's banner: its signal line (sent by kill() from this pid) and its thread line.
    expect(line.msg).toMatch(new RegExp(`was killed by SIGSEGV; its crash report said: signal 11 SIGSEGV, [^;]*from pid ${process.pid}; thread \\d+ "[^"]*": [^;]+ after serving`));
    await waitLine(p, (l) => /serving again/.test(l.msg ?? ''));
    const after = await Promise.all(Array.from({ length: 4 }, (_, i) => sendOne(spec, i)));
    expect(after.map((s) => s.decision)).toEqual(after.map(() => 'continue'));
  });
});

describe('workers: reload requests', () => {
  it('a SIGHUP while a reload runs is not folded into it: one more reload follows and serves the code changed meanwhile', async () => {
    const dir = tmpDir();
    const verdictFile = path.join(dir, 'verdict');
    const spec = tmpSocketSpec();
    const p = await startRuntime('node', { socket: spec, workers: 1, eomSleep: 1500, verdictFile, drain: 10_000 });
    await waitLine(p, (l) => l.ev === 'listening' && l.worker === undefined);
    // A session in its 1.5 s eom keeps the first reload draining.
    const held = sendOne(spec, 1);
    await waitLine(p, (l) => l.ev === 'eom');
    process.kill(p.pid, 'SIGHUP');
    await waitLine(p, (l) => /reload: 1 new worker \(generation 2\) serving; draining 1 old/.test(l.msg ?? ''));
    // The code changes while the first reload drains, and the operator reloads again.
    fs.writeFileSync(verdictFile, 'reject');
    process.kill(p.pid, 'SIGHUP');
    await waitLine(p, (l) => /reload: one is running; another follows it/.test(l.msg ?? ''));
    expect((await held).decision).toBe('continue');
    await waitLine(p, (l) => /reload: 1 new worker \(generation 3\) serving/.test(l.msg ?? ''), 30_000);
    await waitLine(p, () => logs(p).filter((l) => /reload done/.test(l)).length === 2, 30_000);
    const r = await sendOne(spec, 2);
    expect(r.decision).toBe('reject');
  }, 60_000);
});

describe('workers: sockets and settings', () => {
  it('fd:3 from systemd-socket-activate: the supervisor hands the inherited socket to its workers; systemd hears READY=1 once all serve', async () => {
    const spec = await freeInetSpec();
    const port = /^inet:(\d+)@/.exec(spec)![1];
    const dir = tmpDir();
    // systemd's NOTIFY_SOCKET, played by a datagram socket that prints what it gets.
    const notify = path.join(dir, 'notify');
    const listener = await startProcess('/usr/bin/python3', {
      args: ['-u', '-c', `import socket\ns=socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)\ns.bind(${JSON.stringify(notify)})\nprint("bound", flush=True)\nwhile True:\n  print(repr(s.recv(4096).decode()), flush=True)`],
    });
    await listener.waitForOutput(/bound/);
    const p = await startProcess('systemd-socket-activate', {
      // It passes on only the environment named with -E.
      args: ['-l', `127.0.0.1:${port}`, '-E', 'NODEMILTER_ENGINE', '-E', 'NOTIFY_SOCKET', '-E', 'RUNTIME_CONFIG', process.execPath, FIXTURE],
      env: { ...engineEnv('node'), NOTIFY_SOCKET: notify, RUNTIME_CONFIG: JSON.stringify({ socket: 'fd:3', workers: 2, eomSleep: 100 }) },
      stopSignal: 'SIGKILL',
    });
    // systemd-socket-activate starts the milter when the first connection waits (the probe).
    await waitForSocket(spec, { timeout: 10_000 });
    const sent = await Promise.all(Array.from({ length: 8 }, (_, i) => sendOne(spec, i)));
    expect(sent.map((s) => s.decision)).toEqual(sent.map(() => 'continue'));
    await waitLine(p, (l) => l.ev === 'listening' && l.worker === undefined);
    const supervisor = lines(p).find((l) => /supervisor \(pid \d+\) listening on fd:3/.test(l.msg ?? ''))!.pid;
    expect(new Set(sent.map(stampPid)).size).toBeGreaterThanOrEqual(1);
    for (const s of sent) expect(workerPids(supervisor)).toContain(stampPid(s));
    await listener.waitForOutput(/READY=1/, { timeout: 10_000 });
    // From the supervisor only: the workers do not see NOTIFY_SOCKET.
    expect(listener.stdout.match(/READY=1/g)).toHaveLength(1);
    expect(listener.stdout).toMatch(new RegExp(`MAINPID=${supervisor}|STATUS=2 workers serving fd:3`));
    process.kill(supervisor, 'SIGTERM');
    await waitLine(p, (l) => l.ev === 'done' && l.worker === undefined);
  });

  it('inet6 and inet:0 sockets; a path that is not a socket is refused before any worker starts', async () => {
    const v6 = await freeInet6Spec();
    const specs = [v6, 'inet:0@127.0.0.1'].filter((x): x is string => x !== undefined);
    if (!v6) console.log('[runtime] no IPv6 loopback here: inet6 not tested');
    for (const socket of specs) {
      const p = await startRuntime('node', { socket, workers: 2 }, { wait: false });
      const l = await waitLine(p, (x) => /supervisor \(pid \d+\) listening on/.test(x.msg ?? ''));
      await waitLine(p, (x) => x.ev === 'listening' && x.worker === undefined);
      const port = socket === 'inet:0@127.0.0.1' ? /\(port (\d+)\)/.exec(l.msg!)![1] : undefined;
      const target = port ? `inet:${port}@127.0.0.1` : socket;
      const sent = await Promise.all(Array.from({ length: 4 }, (_, i) => sendOne(target, i)));
      expect(sent.map((s) => s.decision)).toEqual(sent.map(() => 'continue'));
      for (const s of sent) expect(workerPids(p.pid)).toContain(stampPid(s));
    }
    const dir = tmpDir();
    const file = path.join(dir, 'not-a-socket');
    fs.writeFileSync(file, 'keep me');
    const bad = await startRuntime('node', { socket: `unix:${file}`, workers: 2 }, { wait: false });
    expect(await bad.exited).toEqual({ code: 1, signal: null });
    expect(lines(bad).find((l) => l.ev === 'error')).toMatchObject({ name: 'InvalidSocketError' });
    expect(fs.readFileSync(file, 'utf8')).toBe('keep me');
    expect(lines(bad).some((l) => l.worker !== undefined)).toBe(false);
  });

  it('NODEMILTER_WORKERS is the default of workers; bad values are refused by name', async () => {
    const spec = tmpSocketSpec();
    const p = await startProcess(process.execPath, {
      args: [FIXTURE],
      env: { ...engineEnv('node'), NODEMILTER_WORKERS: '2', RUNTIME_CONFIG: JSON.stringify({ socket: spec }) },
      socket: spec,
      stopSignal: 'SIGKILL',
    });
    await waitLine(p, (l) => l.ev === 'listening' && l.worker === undefined);
    expect(workerPids(p.pid)).toHaveLength(2);
    process.kill(p.pid, 'SIGTERM');
    expect(await p.exited).toEqual({ code: 0, signal: null });
    for (const [env, cfg, message] of [
      [{ NODEMILTER_WORKERS: 'many' }, {}, `NODEMILTER_WORKERS must be 'auto' or a number of workers, got "many"`],
      [{}, { workers: 0 }, `workers must be an integer 1-1024 or 'auto', got 0`],
      [{}, { workers: 2, restart: { limit: 0 } }, 'restart.limit must be a positive integer, got 0'],
      [{}, { restart: { limit: 2 } }, 'runmilter: restart needs the workers option'],
      [{ NODEMILTER_WORKER: '{"id":1}' }, {}, 'NODEMILTER_WORKER is set ({"id":1}) but this process is not a worker started by a runmilter supervisor'],
    ] as const) {
      const bad = await startProcess(process.execPath, {
        args: [FIXTURE],
        env: { ...engineEnv('node'), ...env, RUNTIME_CONFIG: JSON.stringify({ socket: tmpSocketSpec(), ...cfg }) },
      });
      expect(await bad.exited).toEqual({ code: 1, signal: null });
      expect(lines(bad).find((l) => l.ev === 'error')).toMatchObject({ name: 'InvalidArgumentError', message });
    }
  });
});
