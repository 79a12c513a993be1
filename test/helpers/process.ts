/**
 * Generic helpers to run a server process (a milter, an MTA...) for a test:
 * start any command, wait until its socket accepts connections, watch its
 * output, stop it and collect what it printed. Every process started here is
 * killed when the test process exits, even if a test forgot to stop it.
 */
import { spawn, type ChildProcess } from 'child_process';
import * as fs from 'fs';
import * as net from 'net';
import * as os from 'os';
import * as path from 'path';
import { parseSocketSpec } from '../../src/socketspec';

/** How a process ended. */
export interface ExitInfo {
  code: number | null;
  signal: NodeJS.Signals | null;
}

/** What {@link RunningProcess.stop} returns. */
export interface StopResult extends ExitInfo {
  stdout: string;
  stderr: string;
}

/** Options of {@link startProcess}. */
export interface StartOptions {
  /** Arguments. */
  args?: readonly string[];
  /** Extra environment variables (merged over process.env; `undefined` removes one). */
  env?: Record<string, string | undefined>;
  /** Working directory. */
  cwd?: string;
  /** A socket spec (`unix:/p`, `inet:PORT@HOST`, `inet6:PORT@HOST`) to wait for before resolving. */
  socket?: string;
  /** Milliseconds to wait for the socket. Default 10 000. */
  readyTimeout?: number;
  /** Milliseconds between the stop signal and SIGKILL in stop(). Default 1500. */
  killGrace?: number;
  /**
   * The signal stop() sends first. Default SIGTERM. A libmilter process
   * takes ~4.5 s to leave smfi_main after SIGTERM (smfi_stop waits for the
   * listener's poll), so tests that do not care use SIGKILL.
   */
  stopSignal?: NodeJS.Signals;
}

/** A started process. */
export interface RunningProcess {
  readonly child: ChildProcess;
  readonly pid: number;
  /** The socket spec waited for, if any. */
  readonly socket?: string;
  /** Everything printed on stdout so far (latin1, so bytes map 1:1 to chars). */
  readonly stdout: string;
  /** Everything printed on stderr so far. */
  readonly stderr: string;
  /** Resolves when the process has exited. */
  readonly exited: Promise<ExitInfo>;
  /** Whether the process has exited. */
  readonly hasExited: boolean;
  /**
   * Wait until stdout (or `stream`) matches `pattern`, searching from
   * character `from` (default 0). Rejects after `timeout` ms (default 5000)
   * or if the process exits first.
   */
  waitForOutput(
    pattern: RegExp | string,
    opts?: { timeout?: number; stream?: 'stdout' | 'stderr'; from?: number },
  ): Promise<RegExpExecArray>;
  /** SIGTERM, then SIGKILL after `killGrace` ms; resolves with exit status and output. */
  stop(signal?: NodeJS.Signals): Promise<StopResult>;
}

const running = new Set<ChildProcess>();
function killRunning(): void {
  for (const c of running) {
    try {
      c.kill('SIGKILL');
    } catch {
      /* gone */
    }
  }
}
process.on('exit', killRunning);
// A test worker ended by a signal runs no 'exit' handlers: kill the children
// first, then let the signal do what it would have done.
for (const sig of ['SIGTERM', 'SIGINT', 'SIGHUP'] as const) {
  process.once(sig, () => {
    killRunning();
    if (process.listenerCount(sig) === 0) process.kill(process.pid, sig);
  });
}

const live = new Set<RunningProcess>();

/** Stop every process started by {@link startProcess} that was not stopped yet (e.g. in afterEach). */
export async function stopAll(): Promise<void> {
  await Promise.all([...live].map((p) => p.stop()));
}

/** Start a command; when `opts.socket` is given, resolve only once it accepts connections. */
export async function startProcess(command: string, opts: StartOptions = {}): Promise<RunningProcess> {
  const env: Record<string, string> = {};
  for (const [k, v] of Object.entries({ ...process.env, ...(opts.env ?? {}) })) if (v !== undefined) env[k] = v;
  const child = spawn(command, [...(opts.args ?? [])], { cwd: opts.cwd, env, stdio: ['ignore', 'pipe', 'pipe'] });
  running.add(child);
  let stdout = '';
  let stderr = '';
  let exitInfo: ExitInfo | undefined;
  const listeners = new Set<() => void>();
  const notify = () => listeners.forEach((f) => f());
  child.stdout!.setEncoding('latin1');
  child.stderr!.setEncoding('latin1');
  child.stdout!.on('data', (d: string) => {
    stdout += d;
    notify();
  });
  child.stderr!.on('data', (d: string) => {
    stderr += d;
    notify();
  });
  const exited = new Promise<ExitInfo>((resolve) => {
    child.once('error', (e) => {
      stderr += `\n[spawn error] ${e.message}\n`;
      exitInfo = { code: -1, signal: null };
      running.delete(child);
      notify();
      resolve(exitInfo);
    });
    child.once('close', (code, signal) => {
      exitInfo = { code, signal };
      running.delete(child);
      notify();
      resolve(exitInfo);
    });
  });
  const grace = opts.killGrace ?? 1500;
  const proc: RunningProcess = {
    child,
    pid: child.pid ?? -1,
    socket: opts.socket,
    get stdout() {
      return stdout;
    },
    get stderr() {
      return stderr;
    },
    get hasExited() {
      return exitInfo !== undefined;
    },
    exited,
    waitForOutput(pattern, o = {}) {
      const timeout = o.timeout ?? 5000;
      const re = typeof pattern === 'string' ? new RegExp(pattern.replace(/[.*+?^${}()|[\]\\]/g, '\\$&')) : pattern;
      return new Promise<RegExpExecArray>((resolve, reject) => {
        const check = () => {
          const text = (o.stream === 'stderr' ? stderr : stdout).slice(o.from ?? 0);
          re.lastIndex = 0;
          const m = re.exec(text);
          if (m) {
            done();
            resolve(m);
          } else if (exitInfo) {
            done();
            reject(new Error(`${command} exited (${JSON.stringify(exitInfo)}) before printing ${re}\nstdout:\n${stdout}\nstderr:\n${stderr}`));
          }
        };
        const timer = setTimeout(() => {
          done();
          reject(new Error(`${command} did not print ${re} within ${timeout} ms\nstdout:\n${stdout}\nstderr:\n${stderr}`));
        }, timeout);
        const done = () => {
          clearTimeout(timer);
          listeners.delete(check);
        };
        listeners.add(check);
        check();
      });
    },
    async stop(signal: NodeJS.Signals = opts.stopSignal ?? 'SIGTERM') {
      live.delete(proc);
      if (!exitInfo) {
        child.kill(signal);
        const timer = setTimeout(() => child.kill('SIGKILL'), grace);
        await exited;
        clearTimeout(timer);
      }
      return { ...exitInfo!, stdout, stderr };
    },
  };
  live.add(proc);
  if (opts.socket) {
    try {
      await waitForSocket(opts.socket, { timeout: opts.readyTimeout ?? 10_000, process: proc });
    } catch (e) {
      await proc.stop('SIGKILL');
      throw e;
    }
  }
  return proc;
}

/**
 * Poll until a socket spec accepts a connection (the probe connection is
 * closed at once). Fails early if `process` exits.
 */
export async function waitForSocket(spec: string, opts: { timeout?: number; process?: RunningProcess } = {}): Promise<void> {
  const s = parseSocketSpec(spec);
  if (s.kind === 'fd') throw new Error(`cannot wait for ${spec}`);
  const target: net.NetConnectOpts =
    s.kind === 'unix' ? { path: s.path } : { port: s.port, host: s.host ?? (s.kind === 'inet6' ? '::1' : '127.0.0.1') };
  const deadline = Date.now() + (opts.timeout ?? 10_000);
  let lastErr = '';
  for (;;) {
    if (opts.process?.hasExited) {
      throw new Error(`process exited before ${spec} was ready\nstdout:\n${opts.process.stdout}\nstderr:\n${opts.process.stderr}`);
    }
    const ok = await new Promise<boolean>((resolve) => {
      const so = net.createConnection(target);
      so.once('connect', () => {
        so.destroy();
        resolve(true);
      });
      so.once('error', (e) => {
        lastErr = e.message;
        so.destroy();
        resolve(false);
      });
    });
    if (ok) return;
    if (Date.now() > deadline) {
      throw new Error(
        `${spec} not accepting connections (${lastErr})` + (opts.process ? `\nstderr:\n${opts.process.stderr}` : ''),
      );
    }
    await new Promise((r) => setTimeout(r, 25));
  }
}

// The temporary directories of this test file, removed at process exit by
// one listener (a listener per directory passed Node's limit of 10 in a file
// that makes many, and printed MaxListenersExceededWarning).
const tmpDirs = new Set<string>();
process.on('exit', () => {
  for (const dir of tmpDirs) fs.rmSync(dir, { recursive: true, force: true });
});

/** A fresh temporary directory (removed at process exit). */
export function tmpDir(prefix = 'nm-'): string {
  // /tmp rather than os.tmpdir() when possible: unix socket paths must stay short.
  const base = fs.existsSync('/tmp') ? '/tmp' : os.tmpdir();
  const dir = fs.mkdtempSync(path.join(base, prefix));
  tmpDirs.add(dir);
  return dir;
}

/** A `unix:` socket spec in a fresh temporary directory. */
export function tmpSocketSpec(name = 'milter.sock'): string {
  return `unix:${path.join(tmpDir('nms-'), name)}`;
}

/** A TCP port free on `host` right now (there is a small race until it is bound again). */
export function freePort(host = '127.0.0.1'): Promise<number> {
  return new Promise((resolve, reject) => {
    const srv = net.createServer();
    srv.once('error', reject);
    srv.listen(0, host, () => {
      const port = (srv.address() as net.AddressInfo).port;
      srv.close(() => resolve(port));
    });
  });
}

/** An `inet:PORT@127.0.0.1` spec on a free port. */
export async function freeInetSpec(): Promise<string> {
  return `inet:${await freePort('127.0.0.1')}@127.0.0.1`;
}

/** An `inet6:PORT@::1` spec on a free port, or undefined if ::1 is unavailable. */
export async function freeInet6Spec(): Promise<string | undefined> {
  try {
    return `inet6:${await freePort('::1')}@::1`;
  } catch {
    return undefined;
  }
}
