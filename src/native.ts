/**
 * The native addon's interface, declared in one place. Internal: the public
 * surface is `nodemilter/milter`. Every function here maps onto
 * native/*.cc; see the comments there for the threading rules.
 *
 * @internal
 * @module
 */
import * as fs from 'node:fs';
import * as path from 'node:path';
import { NativeLoadError } from './errors';
import type { EngineCounters } from './types';

/** Event numbers shared with native/engine.h (EventType). */
export const Ev = {
  NEGOTIATE: 0,
  CONNECT: 1,
  HELO: 2,
  ENVFROM: 3,
  ENVRCPT: 4,
  DATA: 5,
  HEADER: 6,
  EOH: 7,
  BODY: 8,
  EOM: 9,
  ABORT: 10,
  CLOSE: 11,
  UNKNOWN: 12,
  COUNT: 13,
  STOPPED: 100,
  /** A session's worker could not write the actions JavaScript recorded (native/context.cc WriteActions). */
  ACTION_FAILED: 101,
  /** A notice for the logger (native/guard.cc: the macro guard is off). */
  WARNING: 102,
} as const;

/** Result codes of the context actions (native/context.cc ActionCode). */
export const ActionCode = {
  OK: 0,
  CLOSED: 1,
  NOT_PARKED: 2,
  NOT_IN_EOM: 3,
  FAILURE: 4,
  NOT_IN_NEGOTIATE: 5,
  BAD_ARGUMENT: 6,
} as const;

/** An opaque handle on a native session. */
export type ConnHandle = object & { readonly __conn: unique symbol };

/** What register() hands to the addon. */
export interface NativeRegistration {
  name: string;
  actions: number;
  steps: number;
  handled: number;
  noreply: number;
  dynamicNegotiate: boolean;
  symlists: string[];
  deadlines: number[];
  progressMs: number;
  fallbackStatus: number;
  watch: string[];
  /** Sessions served at once; 0: no cap. */
  maxSessions: number;
  /** Over the cap: drop the connection (true) or answer TEMPFAIL at connect (false). */
  sessionCapClose: boolean;
  /** Run on smfi_main when libmilter lacks mi_listener (its signal thread then takes TERM, INT, HUP). */
  allowSmfiMain: boolean;
  /** How long a lone waiting worker spins for its answer, in microseconds (0: never; the addon ignores it on one CPU). */
  spinUs: number;
  /**
   * The CPUs the process may run on (os.availableParallelism()): no spin on
   * one, and none once as many sessions are open. Without it the addon
   * counts the machine's CPUs.
   */
  cpus?: number;
}

/** Counters kept by the addon: every engine's, and the addon's own. */
export interface NativeDiag extends EngineCounters {
  /** Sessions not yet closed, less those refused while draining (drain waits for 0). */
  serving: number;
  /** stopAccepting() took effect: this process accepts no new connection. */
  acceptingStopped: boolean;
  /** The real-time signal that wakes libmilter's listener at stop ('SIGRTMIN+4' unless taken), '' if none was free, absent in an older addon. */
  wakeSignal?: string;
  usedSmfiMain: boolean;
  /** Macro stages found in libmilter's context (guard against malformed macro lists); -1 unknown, -2 not yet. */
  macroLayout: number;
  /** Which macro guard is active: 'patched libmilter', 'layout', 'not calibrated', or 'off: <why>'. */
  macroGuard: string;
  /** Sessions refused because `maxSessions` were being served. */
  sessionsRefused: number;
  /** Recorded actions a session's worker could not write to the MTA. */
  actionsFailed: number;
  /** Times a worker waited for room in the event queue (the bound on queued no-reply events). */
  queueWaits: number;
  /** The most bytes of no-reply events queued for JavaScript at once. */
  queuePeakBytes: number;
  /** Threads the addon could not create. */
  threadsFailed: number;
  /** How long a lone waiting worker spins for its answer, in microseconds (0: never). */
  spinUs?: number;
  /** Replied steps answered while their worker spun. */
  spinHits?: number;
  /** Replied steps whose worker spun, then slept. */
  spinMisses?: number;
  /** Which load of the addon owns libmilter: this one, another (a worker, a reloaded module) or none yet. */
  owner: 'this' | 'other' | 'none';
}

export type EventHandler = (
  type: number,
  connId: number,
  seq: number,
  handle: ConnHandle | undefined,
  a0: any,
  a1: any,
  a2: any,
  a3: any,
  macros: string[] | undefined,
) => void;

/** The addon's crash handler for fatal signals (native/crash.cc). */
export interface NativeCrashHandler {
  /** `installed`, `off: NODEMILTER_CRASH_HANDLER=0`, `installed by another copy of the addon in this process`, or `failed: <why>`. */
  state: string;
  /** SIGSEGVs handed to V8 that V8 handled as WebAssembly traps. */
  wasmTraps: number;
  /** Size of the alternate signal stack given to each addon and libmilter thread (0 when not installed). */
  altStackBytes: number;
}

export interface NativeBinding {
  version(): [number, number, number];
  /** The crash handler, installed once per process when the addon first loads (absent from addons built before it). */
  crashHandler?(): NativeCrashHandler;
  setconn(spec: string): void;
  settimeout(seconds: number): void;
  setbacklog(backlog: number): void;
  setdbg(level: number): void;
  opensocket(rmsocket: boolean): void;
  register(reg: NativeRegistration): void;
  main(): void;
  stop(): void;
  setDraining(on: boolean): void;
  /** Accept no new connection in this process; the sessions open run on (native/listener.cc StopAccepting). */
  stopAccepting(): void;
  /** Interrupt the listener's poll so that a requested stop is seen now; false when there is no listener to wake. */
  wake(): boolean;
  nodelay(port: number): number;
  getdiag(): NativeDiag;
  constants: Record<string, number>;
  hasListener: boolean;
  openChannel(onEvent: EventHandler): void;
  refChannel(ref: boolean): void;
  reply(conn: ConnHandle, seq: number, status: number, actions?: number, steps?: number): boolean;
  getsymval(conn: ConnHandle, seq: number, name: string): string | Buffer | null | undefined;
  setreply(conn: ConnHandle, seq: number, rcode: string, xcode: string | null, lines: string[]): number;
  setsymlist(conn: ConnHandle, seq: number, stage: number, macros: string): number;
  addheader(conn: ConnHandle, seq: number, name: string, value: string | Buffer): number;
  insheader(conn: ConnHandle, seq: number, index: number, name: string, value: string | Buffer): number;
  chgheader(conn: ConnHandle, seq: number, name: string, index: number, value: string | Buffer | null): number;
  addrcpt(conn: ConnHandle, seq: number, rcpt: string | Buffer, params: string | Buffer | null): number;
  delrcpt(conn: ConnHandle, seq: number, rcpt: string | Buffer): number;
  replacebody(conn: ConnHandle, seq: number, chunk: Buffer): number;
  chgfrom(conn: ConnHandle, seq: number, sender: string | Buffer, params: string | Buffer | null): number;
  quarantine(conn: ConnHandle, seq: number, reason: string): number;
  progress(conn: ConnHandle, seq: number): number;
  negotiated(conn: ConnHandle): [number, number, boolean] | undefined;
}

let binding: NativeBinding | undefined;
let bindingPath: string | undefined;

function packageRoot(): string {
  let dir = __dirname;
  for (;;) {
    const pkg = path.join(dir, 'package.json');
    if (fs.existsSync(pkg) && JSON.parse(fs.readFileSync(pkg, 'utf8')).name === 'nodemilter') return dir;
    const up = path.dirname(dir);
    if (up === dir) return path.resolve(__dirname, '..');
    dir = up;
  }
}

/**
 * The prebuilds/ directory name for this process: `linux-x64` (glibc),
 * `linux-x64-musl`, `darwin-arm64`... Same rule as scripts/prebuild.js.
 */
export function prebuildPlatform(): string {
  let libc = '';
  if (process.platform === 'linux') {
    const header = (process.report?.getReport() as { header?: { glibcVersionRuntime?: string } } | undefined)?.header;
    if (!header?.glibcVersionRuntime) libc = '-musl';
  }
  return `${process.platform}-${process.arch}${libc}`;
}

/**
 * Where the addon may be, in the order tried: `NODEMILTER_ADDON`, a local
 * build (build/Release, build/Debug: a source build wins over the prebuild),
 * then the prebuilt binary shipped for this platform.
 */
export function nativeCandidates(): string[] {
  const root = packageRoot();
  return [
    process.env.NODEMILTER_ADDON,
    path.join(root, 'build', 'Release', 'nodemilter.node'),
    path.join(root, 'build', 'Debug', 'nodemilter.node'),
    path.join(root, 'prebuilds', prebuildPlatform(), 'nodemilter.node'),
  ].filter((p): p is string => !!p);
}

/** The file the addon was loaded from (undefined before the first load). */
export function nativePath(): string | undefined {
  return bindingPath;
}

/** What a NativeLoadError offers instead of the addon. */
const TS_ENGINE_OFFER =
  "The TypeScript engine serves the same milter without the addon: runmilter(..., { engine: 'node' }) or NODEMILTER_ENGINE=node " +
  "(engine 'auto' falls back to it by itself), or serve() from nodemilter/engine; see docs/engine.md.";

/** Load the addon once; a clear NativeLoadError says what to do when that fails. */
export function loadNative(): NativeBinding {
  if (binding) return binding;
  const candidates = nativeCandidates();
  if (!candidates.some((p) => fs.existsSync(p))) {
    throw new NativeLoadError(
      `nodemilter's native addon was not found (looked in ${candidates.join(', ')}). ` +
        `There is no prebuilt binary for ${prebuildPlatform()}: build it from source with libmilter's headers ` +
        '(Debian/Ubuntu: apt-get install libmilter-dev g++ make python3; Fedora: dnf install sendmail-milter-devel gcc-c++ make) ' +
        'and `npm rebuild nodemilter` (or `npm run build:native` in a checkout). ' +
        TS_ENGINE_OFFER,
    );
  }
  // A stale or broken local build (say, linked to a libmilter.so that is gone)
  // must not hide a working prebuild: try every file that exists, in order;
  // an explicit NODEMILTER_ADDON is never second-guessed.
  const failures: string[] = [];
  for (const p of candidates) {
    if (!fs.existsSync(p)) continue;
    try {
      // eslint-disable-next-line @typescript-eslint/no-require-imports
      binding = require(p) as NativeBinding;
      bindingPath = p;
      return binding;
    } catch (err) {
      failures.push(`${p}: ${(err as Error).message}`);
      if (p === process.env.NODEMILTER_ADDON) break;
    }
  }
  throw new NativeLoadError(`could not load nodemilter's native addon: ${failures.join('; ')}. ${TS_ENGINE_OFFER}`);
}
