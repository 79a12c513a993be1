// The TypeScript engine in-process (several servers per process are
// possible): sockets, deadlines and progress, the session timeout, drain,
// typed action errors, runmilter({ engine: 'node' }), and the divergence
// from the libmilter engine kept on purpose (QUIT_NC keeps the negotiated
// actions). Byte-for-byte comparison with libmilter: engine-diff.test.ts.
import { spawn } from 'node:child_process';
import * as fs from 'node:fs';
import * as net from 'node:net';
import * as os from 'node:os';
import * as path from 'node:path';
import { afterEach, describe, expect, it } from 'vitest';

import { Base } from '../src/base';
import * as C from '../src/constants';
import { serve, type MilterServer } from '../src/engine';
import { InvalidArgumentError, InvalidSocketError } from '../src/errors';
import { runmilter } from '../src/runmilter';
import { MilterClient } from '../src/testing/client';
import type { Callbacks, MilterContext } from '../src/types';
import { freeInet6Spec, freeInetSpec, tmpSocketSpec } from './helpers';

const servers: MilterServer[] = [];
const clients: MilterClient[] = [];

afterEach(async () => {
  for (const c of clients.splice(0)) c.destroy();
  await Promise.all(servers.splice(0).map((s) => s.close()));
});

async function start(callbacks: Callbacks, opts: Partial<Parameters<typeof serve>[1]> & { socket?: string } = {}, extra = {}): Promise<MilterServer> {
  const socket = opts.socket ?? (await freeInetSpec());
  const s = await serve({ name: 'test', callbacks, ...extra }, { ...opts, socket });
  servers.push(s);
  return s;
}

async function client(spec: string, opts = {}): Promise<MilterClient> {
  const c = await MilterClient.connect(spec, opts);
  clients.push(c);
  return c;
}

const MSG = { from: '<a@example.org>', rcpt: ['<b@example.net>'], headers: [['Subject', 'hi']] as [string, string][], body: 'hello\r\n' };

describe('sockets', () => {
  it('serves two milters in one process, on unix, inet and inet6 sockets', async () => {
    const unix = tmpSocketSpec();
    const inet = await freeInetSpec();
    const inet6 = await freeInet6Spec();
    const mk = (tag: string) => ({
      eom(ctx: MilterContext) {
        ctx.addheader('X-Served-By', tag);
        return C.CONTINUE;
      },
    });
    const a = await start(mk('a'), { socket: unix });
    const b = await start(mk('b'), { socket: inet });
    expect(a.getdiag().running).toBe(true);
    const specs: [string, string][] = [[unix, 'a'], [inet, 'b']];
    if (inet6) {
      await start(mk('c'), { socket: inet6 });
      specs.push([inet6, 'c']);
    }
    for (const [spec, tag] of specs) {
      const c = await client(spec);
      const r = await c.sendMessage(MSG);
      expect(r.eom.actions).toContainEqual(expect.objectContaining({ type: 'addheader', name: 'X-Served-By' }));
      expect(JSON.stringify(r.eom.actions)).toContain(tag);
      await c.quit();
    }
    expect(b.getdiag().created).toBe(1);
    await a.close();
    expect(fs.existsSync(unix.slice(5))).toBe(false);
  });

  it('serves on an already-open listening socket (fd:N), as with socket activation', async () => {
    const listener = net.createServer();
    await new Promise<void>((r) => listener.listen(0, '127.0.0.1', () => r()));
    const port = (listener.address() as net.AddressInfo).port;
    const script = `const { serve } = require(${JSON.stringify(path.resolve(__dirname, '../dist/src/engine/index.js'))});
      serve({ name: 'fd', callbacks: { helo: () => 1 } }, { socket: 'fd:3' }).then(() => console.log('ready'));`;
    const fd = (listener as unknown as { _handle: { fd: number } })._handle.fd;
    const child = spawn(process.execPath, ['-e', script], { stdio: ['ignore', 'pipe', 'inherit', fd] });
    try {
      await new Promise<void>((r) => child.stdout!.once('data', () => r()));
      listener.close();
      const c = await client(`inet:${port}@127.0.0.1`);
      await c.connect('h');
      expect((await c.helo('x')).status).toBe('reject');
    } finally {
      child.kill('SIGKILL');
    }
  });

  it('rejects bad arguments with typed errors naming the value', async () => {
    await expect(serve({ name: '', callbacks: {} }, { socket: 'inet:1@127.0.0.1' })).rejects.toThrow(InvalidArgumentError);
    await expect(serve({ name: 'x', callbacks: { nope: () => 0 } as Callbacks }, { socket: 'inet:1@127.0.0.1' })).rejects.toThrow(/unknown callback "nope"/);
    await expect(serve({ name: 'x', callbacks: {} }, { socket: 'inet:1@127.0.0.1', exceptionPolicy: 99 })).rejects.toThrow(/exception policy/);
    await expect(serve({ name: 'x', callbacks: {} }, { socket: 'inet:port@host' })).rejects.toThrow(/"port" is not a number/);
  });

  it('refuses a unix path that is not a socket with InvalidSocketError, and leaves the file alone', async () => {
    const file = tmpSocketSpec().slice(5);
    fs.writeFileSync(file, 'keep me\n');
    const err = await serve({ name: 'x', callbacks: {} }, { socket: `unix:${file}` }).then(
      () => undefined,
      (e: Error) => e,
    );
    expect(err).toBeInstanceOf(InvalidSocketError);
    expect(err!.message).toBe(`cannot listen on unix:${file}: ${file} exists and is a regular file; expected a unix socket or nothing there (it was left untouched)`);
    expect(fs.readFileSync(file, 'utf8')).toBe('keep me\n');
  });

  it('accepts 1000 simultaneous connects with the default backlog', async () => {
    const spec = tmpSocketSpec();
    await start({ helo: () => C.REJECT }, { socket: spec });
    const socks = await Promise.all(
      Array.from({ length: 1000 }, () =>
        new Promise<net.Socket | Error>((resolve) => {
          const s = net.connect(spec.slice(5));
          s.once('connect', () => resolve(s));
          s.once('error', (e) => resolve(e));
        }),
      ),
    );
    const failed = socks.filter((s) => s instanceof Error);
    for (const s of socks) if (!(s instanceof Error)) s.destroy();
    expect(failed.map((e) => (e as Error).message).slice(0, 3)).toEqual([]);
  });
});

describe('deadlines, progress and timeouts', () => {
  it('answers TEMPFAIL 451 4.3.0 when eom misses its deadline, with progress meanwhile, and ignores the late answer', async () => {
    const s = await start({ eom: () => new Promise((r) => setTimeout(() => r(C.ACCEPT), 900)) }, { deadline: { eom: 500 }, progressInterval: 150 });
    const c = await client(`${s.options.socket}`);
    await c.connect('h');
    await c.envfrom('<a@x>');
    await c.envrcpt('<b@y>');
    c.sendRaw('E');
    const packets = [];
    for (;;) {
      const p = await c.readReply(3000);
      packets.push(p);
      if (p.cmd !== 'p') break;
    }
    expect(packets.filter((p) => p.cmd === 'p').length).toBeGreaterThanOrEqual(2);
    const last = packets[packets.length - 1];
    expect(last.cmd).toBe('y');
    expect(last.data.toString('latin1')).toBe('451 4.3.0 Mail filter did not answer in time\0');
    await new Promise((r) => setTimeout(r, 600));
    expect(s.getdiag().deadlineExpired).toBe(1);
    expect(s.getdiag().lateAnswers).toBe(1);
  });

  it('closes a session idle past the timeout, calling abort and close', async () => {
    const seen: string[] = [];
    const s = await start({ envfrom: () => C.CONTINUE, abort: () => void seen.push('abort'), close: () => void seen.push('close') }, { timeout: 1 });
    const c = await client(`${s.options.socket}`);
    await c.connect('h');
    await c.envfrom('<a@x>');
    await c.waitClosed(5000);
    await new Promise((r) => setTimeout(r, 20));
    expect(seen).toEqual(['abort', 'close']);
  });
});

describe('actions and their errors', () => {
  it('throws typed errors for actions outside eom, without their flag, and after close', async () => {
    const errors: string[] = [];
    let saved: MilterContext | undefined;
    const s = await start(
      {
        envfrom(ctx) {
          try {
            ctx.addheader('X', 'y');
          } catch (e) {
            errors.push((e as Error).name);
          }
          return C.CONTINUE;
        },
        eom(ctx) {
          saved = ctx;
          try {
            ctx.chgfrom('<x@y>');
          } catch (e) {
            errors.push((e as Error).name);
          }
          return C.CONTINUE;
        },
      },
      {},
      { actions: C.ADDHDRS },
    );
    const c = await client(`${s.options.socket}`);
    await c.sendMessage(MSG);
    await c.quit();
    await new Promise((r) => setTimeout(r, 20));
    expect(() => saved!.addheader('X', 'y')).toThrow(expect.objectContaining({ name: 'ContextClosedError' }));
    expect(errors).toEqual(['ActionNotAllowedError', 'DisabledActionError']);
  });
});

describe('drain and stop', () => {
  it('lets an open message finish and refuses a new session with 421 4.3.2 while draining', async () => {
    const s = await start({ envrcpt: () => C.CONTINUE, eom: () => new Promise((r) => setTimeout(() => r(C.CONTINUE), 300)) });
    const c1 = await client(`${s.options.socket}`);
    await c1.connect('h');
    await c1.envfrom('<a@x>');
    await c1.envrcpt('<b@y>');
    const eom = c1.eom();
    const closing = s.close({ drain: 5000 });
    await new Promise((r) => setTimeout(r, 50));
    const c2 = await client(`${s.options.socket}`);
    const refused = await c2.connect('h');
    expect(refused.status).toBe('tempfail');
    expect(JSON.stringify(refused.reply)).toMatch(/421.*4\.3\.2|4\.3\.2.*421/);
    expect((await eom).status).toBe('continue');
    await closing;
    expect(s.getdiag().drainRefused).toBe(1);
  });

  it('stopAccepting(): no new connection is accepted, the open session is answered in full, close({ drain }) then settles', async () => {
    const s = await start({ envrcpt: () => C.CONTINUE, eom: (ctx) => (ctx.addheader('X-Open', 'yes'), C.CONTINUE) });
    const c1 = await client(`${s.options.socket}`);
    await c1.connect('h');
    s.stopAccepting();
    s.stopAccepting(); // again: nothing more
    // Alone on its socket, this process closed its listener: the connection is refused.
    await expect(MilterClient.connect(`${s.options.socket}`, { timeout: 2000 })).rejects.toThrow(/ECONNREFUSED/);
    const r = await c1.sendMessage({ from: '<a@x>', rcpt: ['<b@y>'], message: 'Subject: s\r\n\r\nbody\r\n' });
    expect(r.decision).toBe('continue');
    expect(r.actions).toEqual([expect.objectContaining({ type: 'addheader', name: 'X-Open' })]);
    await c1.quit();
    await s.close({ drain: 5000 });
    expect(s.getdiag().drainRefused).toBe(0);
    expect(s.getdiag().running).toBe(false);
  });
});

describe('runmilter({ engine: "node" })', () => {
  it('serves a Base subclass without libmilter and stops on its signal', async () => {
    class Hello extends Base {
      override eom() {
        this.addheader('X-Hello', 'node');
        return C.CONTINUE;
      }
    }
    const socket = `unix:${path.join(fs.mkdtempSync(path.join(os.tmpdir(), 'nm-eng-')), 's.sock')}`;
    let listening!: () => void;
    const ready = new Promise<void>((r) => (listening = r));
    const quiet = { info: () => undefined, warn: () => undefined, error: () => undefined };
    const done = runmilter('hello', socket, { factory: Hello, engine: 'node', signals: ['SIGUSR2'], drain: 100, logger: quiet, onListening: () => listening() });
    await ready;
    const c = await client(socket);
    const r = await c.sendMessage(MSG);
    expect(r.eom.actions).toContainEqual(expect.objectContaining({ type: 'addheader', name: 'X-Hello' }));
    await c.quit();
    process.emit('SIGUSR2', 'SIGUSR2');
    await done;
    expect(fs.existsSync(socket.slice(5))).toBe(false);
  });

  it('refuses an unknown engine', async () => {
    await expect(runmilter('x', 'inet:1@127.0.0.1', { factory: Base, engine: 'other' as 'node' })).rejects.toThrow(/engine must be/);
  });
});

describe('divergence kept on purpose', () => {
  it('keeps the negotiated actions for the session after QUIT_NC (the libmilter engine loses them)', async () => {
    const s = await start({
      eom(ctx) {
        ctx.addheader('X-Session', String(ctx.id));
        return C.CONTINUE;
      },
    });
    const c = await client(`${s.options.socket}`);
    const first = await c.sendMessage(MSG);
    await c.quitNc();
    const second = await c.sendMessage(MSG);
    for (const r of [first, second]) expect(r.eom.actions).toContainEqual(expect.objectContaining({ type: 'addheader', name: 'X-Session' }));
    expect(s.getdiag().created).toBe(2);
  });
});
