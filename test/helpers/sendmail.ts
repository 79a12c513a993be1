/**
 * A private sendmail for end-to-end tests, run from Debian's packages
 * unpacked by scripts/fetch-sendmail.sh (sendmail-bin conflicts with postfix,
 * so it is never installed). sendmail.cf is built here with m4 from
 * sendmail-cf's files: INPUT_MAIL_FILTER pointing at the milter, the daemon
 * on a free loopback port, queue, pid and status files under a temporary
 * directory, and everything relayed (SMART_HOST, relay mailer on the sink's
 * port) to an `smtp-sink` (from postfix) that dumps each message to a file.
 *
 * sendmail sleeps a minute at start when the host name has no dot; it runs
 * under `unshare -u` with its own UTS namespace and host name
 * mta.test.example, which also makes $j independent of the machine.
 * Needs root.
 *
 * @example
 * ```ts
 * const sm = await startSendmail({ milter: 'inet:9999@127.0.0.1' });
 * try {
 *   const t = await sm.send({ from: '<a@x>', rcpts: ['<b@y>'], message: 'Subject: hi\r\n\r\nbody\r\n' });
 *   const [msg] = await sm.waitDelivered(t.queueId!);
 * } finally {
 *   await sm.stop();
 * }
 * ```
 */
import { execFile, execFileSync } from 'child_process';
import * as fs from 'fs';
import * as os from 'os';
import * as path from 'path';
import { promisify } from 'util';

import { SMTP_SINK_BIN, hasQueueId, readSink, smtpSend, type DeliveredMessage, type SmtpTranscript } from './postfix';
import { freePort, startProcess, waitForSocket, type RunningProcess } from './process';

const run = promisify(execFile);
const REPO = path.resolve(__dirname, '..', '..');

/** Where scripts/fetch-sendmail.sh unpacks the packages. */
export const SENDMAIL_DIR = process.env.NODEMILTER_SENDMAIL_DIR ?? path.join(os.tmpdir(), 'nodemilter-sendmail');
const ROOT = path.join(SENDMAIL_DIR, 'root');
export const SENDMAIL_BIN = path.join(ROOT, 'usr', 'libexec', 'sendmail', 'sendmail');
const M4_BIN = path.join(ROOT, 'usr', 'bin', 'm4');
const CF_DIR = path.join(ROOT, 'usr', 'share', 'sendmail', 'cf');
const LIB_DIR = path.join(ROOT, 'usr', 'lib', 'x86_64-linux-gnu');

/** The MTA's host name inside its UTS namespace ($j). */
export const SENDMAIL_HOSTNAME = 'mta.test.example';

/**
 * Why sendmail cannot run here, or undefined if it can. Unpacks the packages
 * (scripts/fetch-sendmail.sh) when they are missing.
 */
export function sendmailUnavailable(): string | undefined {
  if (process.getuid?.() !== 0) return 'the sendmail tests must run as root';
  if (!fs.existsSync(SMTP_SINK_BIN)) return `${SMTP_SINK_BIN} is missing: install Debian's postfix package`;
  if (!fs.existsSync(path.join(ROOT, '.complete'))) {
    try {
      execFileSync('bash', [path.join(REPO, 'scripts', 'fetch-sendmail.sh'), SENDMAIL_DIR], { stdio: ['ignore', 'ignore', 'pipe'], timeout: 120_000 });
    } catch (e) {
      return `could not fetch sendmail with scripts/fetch-sendmail.sh (apt-get update first?): ${(e as { stderr?: Buffer }).stderr?.toString().trim() ?? (e as Error).message}`;
    }
  }
  try {
    execFileSync('unshare', ['-u', 'true'], { stdio: 'ignore' });
  } catch {
    return 'unshare -u (a private host name for sendmail) is not permitted here';
  }
  return undefined;
}

/** Whether the sendmail tests may be skipped: NODEMILTER_SKIP_SENDMAIL=1 outside CI. In CI they never are. */
export function mayskipSendmail(): boolean {
  return process.env.NODEMILTER_SKIP_SENDMAIL === '1' && !process.env.CI;
}

/** Options of {@link startSendmail}. */
export interface SendmailOptions {
  /** The milter socket, as libmilter spells it: `inet:PORT@127.0.0.1` or `unix:/path`. */
  milter: string;
  /** INPUT_MAIL_FILTER flags: `T` tempfails mail when the milter is unavailable, `R` rejects; '' accepts. Default `T`. */
  flags?: string;
  /** INPUT_MAIL_FILTER timeouts. Default `C:5s;S:10s;R:10s;E:1m`. */
  timeouts?: string;
  /** Relay to this port of 127.0.0.1 (the caller's server, e.g. test/helpers/rawsink.ts) instead of a private smtp-sink; waitDelivered then finds nothing. */
  relayPort?: number;
}

/** A message smtp-sink received from sendmail. */
export type SinkMessage = DeliveredMessage;

/** A message in sendmail's quarantine (an `hf` queue file). */
export interface QuarantinedMessage {
  queueId: string;
  /** The quarantine reason (the queue file's `q` line). */
  reason: string;
}

/** A running private sendmail. */
export interface SendmailInstance {
  readonly dir: string;
  readonly queueDir: string;
  readonly smtpPort: number;
  readonly sinkPort: number;
  /** The .mc the sendmail.cf was built from. */
  readonly mc: string;
  /** The generated sendmail.cf. */
  readonly cf: string;
  send(msg: { from: string; rcpts: string[]; message: string | Buffer; helo?: string }): Promise<SmtpTranscript & { sendmailId?: string }>;
  /** Wait until the sink holds the message with this queue id (sendmail's Received header names it). */
  waitDelivered(queueId: string, timeout?: number): Promise<SinkMessage[]>;
  /** Messages in the quarantine queue. */
  quarantined(): QuarantinedMessage[];
  /** Stop sendmail and the sink and remove the directory. */
  stop(): Promise<void>;
}

/** The .mc for a private instance: everything it needs, nothing from /etc/mail. */
export function sendmailMc(o: { dir: string; smtpPort: number; sinkPort: number; milter: string; flags: string; timeouts: string }): string {
  const q = (s: string) => `\`${s}'`;
  return [
    'divert(-1)',
    'divert(0)dnl',
    `OSTYPE(${q('linux')})dnl`,
    `define(${q('confDOMAIN_NAME')}, ${q(SENDMAIL_HOSTNAME)})dnl`,
    `define(${q('QUEUE_DIR')}, ${q(path.join(o.dir, 'mqueue'))})dnl`,
    `define(${q('confPID_FILE')}, ${q(path.join(o.dir, 'sendmail.pid'))})dnl`,
    `define(${q('STATUS_FILE')}, ${q(path.join(o.dir, 'statistics'))})dnl`,
    `define(${q('ALIAS_FILE')}, ${q(path.join(o.dir, 'aliases'))})dnl`,
    `define(${q('confHELP_FILE')}, ${q(path.join(o.dir, 'helpfile'))})dnl`,
    `define(${q('confCW_FILE')}, ${q(path.join(o.dir, 'local-host-names'))})dnl`,
    `define(${q('confSERVICE_SWITCH_FILE')}, ${q(path.join(o.dir, 'service.switch'))})dnl`,
    `define(${q('confHOSTS_FILE')}, ${q(path.join(o.dir, 'hosts'))})dnl`,
    `define(${q('confDONT_BLAME_SENDMAIL')}, ${q('GroupWritableDirPathSafe')})dnl`,
    `define(${q('confDONT_PROBE_INTERFACES')}, ${q('True')})dnl`,
    `define(${q('confTO_IDENT')}, ${q('0')})dnl`,
    `define(${q('confDELIVERY_MODE')}, ${q('background')})dnl`,
    `define(${q('SMART_HOST')}, ${q('relay:[127.0.0.1]')})dnl`,
    `define(${q('RELAY_MAILER_ARGS')}, ${q(`TCP $h ${o.sinkPort}`)})dnl`,
    `FEATURE(${q('nocanonify')})dnl`,
    `FEATURE(${q('accept_unresolvable_domains')})dnl`,
    `FEATURE(${q('no_default_msa')})dnl`,
    `DAEMON_OPTIONS(${q(`Port=${o.smtpPort}, Addr=127.0.0.1, Name=MTA`)})dnl`,
    `INPUT_MAIL_FILTER(${q('nodemilter')}, ${q(`S=${o.milter}, F=${o.flags}, T=${o.timeouts}`)})dnl`,
    `MAILER(${q('smtp')})dnl`,
    '',
  ].join('\n');
}

const live = new Set<SendmailInstance>();

/** Stop every instance still running (for afterAll). */
export async function stopAllSendmail(): Promise<void> {
  await Promise.all([...live].map((s) => s.stop()));
}

/** Start a private sendmail relaying to a fresh smtp-sink, with the milter as INPUT_MAIL_FILTER. */
export async function startSendmail(opts: SendmailOptions): Promise<SendmailInstance> {
  const why = sendmailUnavailable();
  if (why) throw new Error(why);
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'nm-sendmail-'));
  const queueDir = path.join(dir, 'mqueue');
  const sinkDir = path.join(dir, 'sink');
  fs.chmodSync(dir, 0o755); // smtp-sink runs as postfix and must reach sink/
  fs.mkdirSync(queueDir, { mode: 0o700 });
  fs.mkdirSync(sinkDir);
  fs.chownSync(sinkDir, Number(execFileSync('id', ['-u', 'postfix'], { encoding: 'utf8' })), 0); // smtp-sink -u postfix writes here
  fs.writeFileSync(path.join(dir, 'aliases'), '');
  fs.writeFileSync(path.join(dir, 'helpfile'), '');
  fs.writeFileSync(path.join(dir, 'local-host-names'), '');
  fs.writeFileSync(path.join(dir, 'service.switch'), 'hosts files\naliases files\n');
  fs.writeFileSync(path.join(dir, 'hosts'), `127.0.0.1 ${SENDMAIL_HOSTNAME} localhost\n`);
  const smtpPort = await freePort();
  const sinkPort = opts.relayPort ?? (await freePort());
  const mc = sendmailMc({ dir, smtpPort, sinkPort, milter: opts.milter, flags: opts.flags ?? 'T', timeouts: opts.timeouts ?? 'C:5s;S:10s;R:10s;E:1m' });
  fs.writeFileSync(path.join(dir, 'sendmail.mc'), mc);
  const { stdout: cf } = await run(M4_BIN, [`-D_CF_DIR_=${CF_DIR}/`, path.join(CF_DIR, 'm4', 'cf.m4'), path.join(dir, 'sendmail.mc')], { maxBuffer: 8 << 20 });
  const cfFile = path.join(dir, 'sendmail.cf');
  fs.writeFileSync(cfFile, cf);

  let sink: RunningProcess | undefined;
  let mta: RunningProcess | undefined;
  let stopped = false;
  const instance: SendmailInstance = {
    dir,
    queueDir,
    smtpPort,
    sinkPort,
    mc,
    cf,
    async send(msg) {
      const t: SmtpTranscript & { sendmailId?: string } = await smtpSend(smtpPort, msg);
      // "250 2.0.0 6AT51Zv6012314 Message accepted for delivery"
      const m = /^250 2\.0\.0 ([0-9A-Za-z]+) Message accepted/.exec(t.end?.raw ?? '');
      if (m) t.queueId = t.sendmailId = m[1];
      return t;
    },
    async waitDelivered(queueId, timeout = 20_000) {
      const until = Date.now() + timeout;
      for (;;) {
        const found = readSink(sinkDir).filter((d) => hasQueueId(d.message, queueId));
        if (found.length > 0) return found;
        if (Date.now() > until) {
          const qf = path.join(queueDir, `qf${queueId}`);
          const status = fs.existsSync(qf) ? fs.readFileSync(qf, 'latin1').split('\n').filter((l) => l.startsWith('M')).join('; ') : 'no queue file';
          throw new Error(`${queueId} was not delivered within ${timeout} ms; queue: ${fs.readdirSync(queueDir).join(' ')}; its status: ${status}; sendmail said: ${mta?.stderr ?? ''}`);
        }
        await new Promise((r) => setTimeout(r, 100));
      }
    },
    quarantined() {
      return fs
        .readdirSync(queueDir)
        .filter((f) => f.startsWith('hf'))
        .map((f) => {
          const text = fs.readFileSync(path.join(queueDir, f), 'latin1');
          return { queueId: f.slice(2), reason: /^q(.*)$/m.exec(text)?.[1] ?? '' };
        });
    },
    async stop() {
      if (stopped) return;
      stopped = true;
      live.delete(instance);
      try {
        await mta?.stop();
        await sink?.stop();
      } finally {
        fs.rmSync(dir, { recursive: true, force: true });
      }
    },
  };
  live.add(instance);
  try {
    if (opts.relayPort === undefined) {
      sink = await startProcess(SMTP_SINK_BIN, {
        args: ['-u', 'postfix', '-d', `${sinkDir}/%H%M%S.`, `127.0.0.1:${sinkPort}`, '100'],
        socket: `inet:${sinkPort}@127.0.0.1`,
        stopSignal: 'SIGKILL',
      });
    }
    // -bD: the daemon in the foreground (it still forks per connection and
    // per background delivery).
    mta = await startProcess('unshare', {
      args: ['-u', 'sh', '-c', `hostname ${SENDMAIL_HOSTNAME} && exec "$0" -bD -C "$1"`, SENDMAIL_BIN, cfFile],
      env: { LD_LIBRARY_PATH: LIB_DIR },
      stopSignal: 'SIGTERM',
      killGrace: 2000,
    });
    await waitForSocket(`inet:${smtpPort}@127.0.0.1`, { timeout: 15_000, process: mta });
  } catch (e) {
    await instance.stop();
    throw e;
  }
  return instance;
}
