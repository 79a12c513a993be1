/**
 * One milter as an MTA configures it (Postfix's `smtpd_milters` entry and
 * its `milter_*` settings): where it listens, its timeouts, its default
 * action, the macros it gets at each stage, and a limit on and optional
 * reuse of its connections. {@link Milters} chains several.
 *
 * @module
 */
import {
  SMFIF_ALL,
  SMFI_CURR_PROT,
  type MacroStage,
} from '../constants';
import { InvalidArgumentError, MilterError, MilterTimeoutError } from '../errors';
import { MilterConnection, type ConnectionOptions, type StepResult } from './connection';

/** What happens when a milter cannot be reached or fails (timeout, protocol error, closed connection): Postfix's `milter_default_action`. */
export type DefaultAction = 'accept' | 'reject' | 'tempfail' | 'quarantine';

/** The stages Postfix sends macros at (`milter_<stage>_macros`). */
export type MacroStageName = 'connect' | 'helo' | 'mail' | 'rcpt' | 'data' | 'eoh' | 'eom' | 'unknown';

/** Stage name to SMFIM_* number (`unknown` has none: Postfix sends its macros with the command character). */
export const MACRO_STAGE_NUMBERS: Record<Exclude<MacroStageName, 'unknown'>, MacroStage> = {
  connect: 0,
  helo: 1,
  mail: 2,
  rcpt: 3,
  data: 4,
  eom: 5,
  eoh: 6,
};

/** The macro command character of each stage. */
export const MACRO_STAGE_CHARS: Record<MacroStageName, string> = {
  connect: 'C',
  helo: 'H',
  mail: 'M',
  rcpt: 'R',
  data: 'T',
  eoh: 'N',
  eom: 'E',
  unknown: 'U',
};

/** Postfix's default `milter_*_macros` (Postfix 3.7). */
export const POSTFIX_MACROS: Readonly<Record<MacroStageName, readonly string[]>> = {
  connect: ['j', '{daemon_name}', '{daemon_addr}', 'v', '_'],
  helo: ['{tls_version}', '{cipher}', '{cipher_bits}', '{cert_subject}', '{cert_issuer}'],
  mail: ['i', '{auth_type}', '{auth_authen}', '{auth_author}', '{mail_addr}', '{mail_host}', '{mail_mailer}'],
  rcpt: ['i', '{rcpt_addr}', '{rcpt_host}', '{rcpt_mailer}'],
  data: ['i'],
  eoh: ['i'],
  eom: ['i'],
  unknown: [],
};

/** Postfix's `milter_connect_timeout`: 30 s. */
export const DEFAULT_CONNECT_TIMEOUT = 30_000;
/** Postfix's `milter_command_timeout`: 30 s. */
export const DEFAULT_COMMAND_TIMEOUT = 30_000;
/** Postfix's `milter_content_timeout`: 300 s. */
export const DEFAULT_CONTENT_TIMEOUT = 300_000;

/**
 * The actions (SMFIF_*) and steps (SMFIP_*) offered at each protocol
 * version, as Postfix masks them: version 2 knows the seven NO* steps and
 * the first six actions, 3 adds NOUNKNOWN (and NR_HDR), 4 adds NODATA, 6
 * adds the rest (SKIP, RCPT_REJ, NR_*, HDR_LEADSPC; CHGFROM, ADDRCPT_PAR,
 * SETSYMLIST).
 */
export const PROTOCOL_MASKS: Readonly<Record<2 | 3 | 4 | 6, { actions: number; steps: number }>> = {
  2: { actions: 0x3f, steps: 0x7f },
  3: { actions: 0x3f, steps: 0x1ff },
  4: { actions: 0x3f, steps: 0x3ff },
  6: { actions: SMFIF_ALL, steps: SMFI_CURR_PROT },
};

/** Options of one milter (see docs/mta.md for Postfix's names). */
export interface MilterOptions {
  /** Where it listens: `inet:PORT@HOST`, `inet6:PORT@HOST`, `unix:/path`. */
  socket: string;
  /** A name for logs and verdicts. Default: the socket spec. */
  name?: string;
  /** Milliseconds to connect and to wait for a free connection slot (`milter_connect_timeout`). Default 30 s. */
  connectTimeout?: number;
  /** Milliseconds to wait for the reply to negotiation, CONNECT, HELO, MAIL, RCPT, DATA and unknown commands (`milter_command_timeout`). Default 30 s. */
  commandTimeout?: number;
  /**
   * Milliseconds to wait for the reply to each header, end of headers, body
   * chunk and end of message (`milter_content_timeout`); each progress
   * reply restarts it. Default 300 s.
   */
  contentTimeout?: number;
  /** What a failure of this milter means for the mail (`milter_default_action`). Default `tempfail`. */
  defaultAction?: DefaultAction;
  /** The protocol version offered (`milter_protocol`): 2, 3, 4 or 6. Default 6. */
  protocol?: 2 | 3 | 4 | 6;
  /**
   * Macros sent at each stage (`milter_<stage>_macros`), merged over
   * {@link POSTFIX_MACROS}. A milter's own list (smfi_setsymlist) wins for
   * its stage, as in Postfix. A macro is sent only when it has a value.
   */
  macros?: Partial<Record<MacroStageName, readonly string[]>>;
  /** Actions (SMFIF_*) offered. Default: every action of the protocol version. */
  actions?: number;
  /** Steps (SMFIP_*) offered. Default: every step of the protocol version. */
  steps?: number;
  /** At most this many connections to the milter at once; a session beyond waits up to `connectTimeout` for one. Default: no limit. */
  maxConnections?: number;
  /**
   * Keep the connection at the end of an SMTP session (SMFIC_QUIT_NC) and
   * hand it to the next session without a new negotiation, as libmilter
   * allows since protocol 6. Postfix and sendmail open a connection per SMTP
   * session; this is off by default.
   */
  reuse?: boolean;
  /** How many idle connections `reuse` keeps. Default 8. */
  maxIdle?: number;
  /**
   * Largest replacement body this milter may send, in bytes (Postfix bounds
   * it by `message_size_limit`); more is a failure and gets the default
   * action. The replacement arrives in memory before it is spooled, so this
   * bounds that memory. Default 10240000 (Postfix's `message_size_limit`).
   */
  maxReplacedBody?: number;
}

function checkMs(v: number | undefined, what: string): void {
  if (v !== undefined && (!Number.isFinite(v) || v <= 0)) throw new InvalidArgumentError(`${what} must be a positive number of milliseconds, got ${v}`);
}

/** A milter's options with every default filled in. */
export interface ResolvedMilterOptions {
  socket: string;
  name: string;
  connectTimeout: number;
  commandTimeout: number;
  contentTimeout: number;
  defaultAction: DefaultAction;
  protocol: 2 | 3 | 4 | 6;
  macros: Record<MacroStageName, readonly string[]>;
  actions: number;
  steps: number;
  maxConnections: number;
  reuse: boolean;
  maxIdle: number;
  maxReplacedBody: number;
}

/** Postfix's default `message_size_limit`, the default {@link MilterOptions.maxReplacedBody}. */
export const DEFAULT_MAX_REPLACED_BODY = 10_240_000;

/** Check a milter's options and fill in the defaults. @throws InvalidArgumentError naming the bad option. */
export function resolveMilterOptions(o: MilterOptions | string): ResolvedMilterOptions {
  const opts: MilterOptions = typeof o === 'string' ? { socket: o } : o;
  if (typeof opts.socket !== 'string' || opts.socket === '') throw new InvalidArgumentError('a milter needs a socket spec (inet:PORT@HOST or unix:/path)');
  checkMs(opts.connectTimeout, 'connectTimeout');
  checkMs(opts.commandTimeout, 'commandTimeout');
  checkMs(opts.contentTimeout, 'contentTimeout');
  const defaultAction = opts.defaultAction ?? 'tempfail';
  if (!['accept', 'reject', 'tempfail', 'quarantine'].includes(defaultAction)) {
    throw new InvalidArgumentError(`defaultAction must be accept, reject, tempfail or quarantine, got ${JSON.stringify(defaultAction)}`);
  }
  const protocol = opts.protocol ?? 6;
  const mask = PROTOCOL_MASKS[protocol];
  if (!mask) throw new InvalidArgumentError(`protocol must be 2, 3, 4 or 6, got ${JSON.stringify(protocol)}`);
  const maxConnections = opts.maxConnections ?? Infinity;
  if (maxConnections !== Infinity && (!Number.isInteger(maxConnections) || maxConnections < 1)) {
    throw new InvalidArgumentError(`maxConnections must be a whole number >= 1, got ${maxConnections}`);
  }
  const maxReplacedBody = opts.maxReplacedBody ?? DEFAULT_MAX_REPLACED_BODY;
  if (!Number.isInteger(maxReplacedBody) || maxReplacedBody < 0) throw new InvalidArgumentError(`maxReplacedBody must be a whole number of bytes >= 0, got ${opts.maxReplacedBody}`);
  const maxIdle = opts.maxIdle ?? 8;
  if (!Number.isInteger(maxIdle) || maxIdle < 0) throw new InvalidArgumentError(`maxIdle must be a whole number >= 0, got ${maxIdle}`);
  const macros = { ...POSTFIX_MACROS } as Record<MacroStageName, readonly string[]>;
  for (const [stage, list] of Object.entries(opts.macros ?? {})) {
    if (!(stage in POSTFIX_MACROS)) throw new InvalidArgumentError(`unknown macro stage ${JSON.stringify(stage)} (expected ${Object.keys(POSTFIX_MACROS).join(', ')})`);
    if (!Array.isArray(list) || list.some((n) => typeof n !== 'string' || n === '')) {
      throw new InvalidArgumentError(`macros.${stage} must be a list of macro names`);
    }
    macros[stage as MacroStageName] = [...list];
  }
  return {
    socket: opts.socket,
    name: opts.name ?? opts.socket,
    connectTimeout: opts.connectTimeout ?? DEFAULT_CONNECT_TIMEOUT,
    commandTimeout: opts.commandTimeout ?? DEFAULT_COMMAND_TIMEOUT,
    contentTimeout: opts.contentTimeout ?? DEFAULT_CONTENT_TIMEOUT,
    defaultAction,
    protocol,
    macros,
    actions: (opts.actions ?? mask.actions) & mask.actions,
    steps: (opts.steps ?? mask.steps) & mask.steps,
    maxConnections,
    reuse: opts.reuse ?? false,
    maxIdle,
    maxReplacedBody,
  };
}

/** Counters of a {@link MilterPool}. */
export interface PoolStats {
  /** Connections open now (in use or idle). */
  open: number;
  /** Connections in use by a session. */
  busy: number;
  /** Idle connections kept for reuse. */
  idle: number;
  /** Sessions waiting for a slot. */
  waiting: number;
  /** Connections opened so far. */
  opened: number;
  /** Sessions that got a reused connection. */
  reused: number;
}

/**
 * The connections to one milter: opens them (dial and negotiate within the
 * milter's timeouts), limits them to `maxConnections`, and with `reuse`
 * keeps the ones handed back for the next session.
 */
export class MilterPool {
  /** The milter's resolved options. */
  readonly options: ResolvedMilterOptions;
  private idle: MilterConnection[] = [];
  private busy = 0;
  private opened = 0;
  private reused = 0;
  private waiters: { resolve: () => void; reject: (e: Error) => void; timer: NodeJS.Timeout }[] = [];
  private closed = false;

  constructor(options: MilterOptions | string) {
    this.options = resolveMilterOptions(options);
  }

  /** The pool's counters. */
  get stats(): PoolStats {
    return { open: this.busy + this.idle.length, busy: this.busy, idle: this.idle.length, waiting: this.waiters.length, opened: this.opened, reused: this.reused };
  }

  /**
   * A negotiated connection for one SMTP session: an idle one (with
   * `reuse`) or a new one, once fewer than `maxConnections` are busy.
   *
   * @throws MilterTimeoutError when no slot frees up or the dial takes longer
   *   than `connectTimeout`; the dial's or the negotiation's error.
   */
  async acquire(): Promise<MilterConnection> {
    if (this.closed) throw new MilterError(`milter ${this.options.name}: the pool is closed`);
    const start = Date.now();
    if (this.busy >= this.options.maxConnections) {
      await new Promise<void>((resolve, reject) => {
        const timer = setTimeout(() => {
          this.waiters = this.waiters.filter((w) => w.timer !== timer);
          reject(new MilterTimeoutError(`milter ${this.options.name}: no free connection within ${this.options.connectTimeout} ms (maxConnections ${this.options.maxConnections})`, this.options.connectTimeout));
        }, this.options.connectTimeout);
        this.waiters.push({ resolve, reject, timer });
      });
    }
    this.busy++;
    try {
      for (let c = this.idle.pop(); c; c = this.idle.pop()) {
        if (!c.closed) {
          this.reused++;
          return c;
        }
      }
      const o = this.options;
      const copts: ConnectionOptions = {
        connectTimeout: Math.max(1, o.connectTimeout - (Date.now() - start)),
        timeout: o.commandTimeout,
        eomTimeout: o.contentTimeout,
        version: o.protocol,
        actions: o.actions,
        steps: o.steps,
        maxReplacedBody: o.maxReplacedBody,
      };
      const c = await MilterConnection.connect(o.socket, copts);
      this.opened++;
      return c;
    } catch (e) {
      this.release();
      throw e;
    }
  }

  /**
   * Hand a connection back at the end of an SMTP session: with `reuse`, a
   * healthy one is told SMFIC_QUIT_NC and kept; otherwise it gets SMFIC_QUIT
   * and is closed.
   */
  async giveBack(c: MilterConnection, healthy: boolean): Promise<void> {
    this.release();
    if (healthy && this.options.reuse && !this.closed && !c.closed && this.idle.length < this.options.maxIdle) {
      try {
        await c.quitNc();
        this.idle.push(c);
        return;
      } catch {
        /* closed meanwhile: fall through */
      }
    }
    if (healthy) await c.close();
    else c.destroy();
  }

  private release(): void {
    this.busy--;
    const w = this.waiters.shift();
    if (w) {
      clearTimeout(w.timer);
      w.resolve();
    }
  }

  /** Close the idle connections and refuse new sessions. Sessions in progress keep theirs. */
  async close(): Promise<void> {
    this.closed = true;
    for (const w of this.waiters.splice(0)) {
      clearTimeout(w.timer);
      w.reject(new MilterError(`milter ${this.options.name}: the pool was closed`));
    }
    await Promise.all(this.idle.splice(0).map((c) => c.close()));
  }
}

/** Whether a step's answer lets the mail go on to the next step or milter. */
export function goesOn(r: StepResult): boolean {
  return r.status === 'continue' || r.status === 'noreply' || r.status === 'notsent' || r.status === 'skip';
}
