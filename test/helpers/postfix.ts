/**
 * A private Postfix instance for end-to-end tests: its own config_directory,
 * queue_directory and data_directory under a temporary directory, smtpd on a
 * free loopback port (chroot off), `smtpd_milters` pointing at a milter, and
 * delivery by relay to an `smtp-sink` (started here) that dumps each message
 * to a file. Needs root and Debian's `postfix` package.
 *
 * @example
 * ```ts
 * const pf = await startPostfix({ milter: 'inet:9999@127.0.0.1' });
 * try {
 *   const t = await pf.send({ from: '<a@x>', rcpts: ['<b@y>'], message: 'Subject: hi\r\n\r\nbody\r\n' });
 *   const [msg] = await pf.waitDelivered(t.queueId!);
 * } finally {
 *   await pf.stop();
 * }
 * ```
 */
import { execFile, execFileSync } from 'child_process';
import * as fs from 'fs';
import * as net from 'net';
import * as path from 'path';
import { promisify } from 'util';
import { freePort, startProcess, waitForSocket, type RunningProcess } from './process';

const run = promisify(execFile);

/** Where Debian installs the programs the harness runs. */
export const POSTFIX_BIN = '/usr/sbin/postfix';
export const SMTP_SINK_BIN = '/usr/sbin/smtp-sink';
export const POSTQUEUE_BIN = '/usr/sbin/postqueue';
export const MASTER_BIN = '/usr/lib/postfix/sbin/master';

/**
 * Why Postfix cannot run here, or undefined if it can: the programs must be
 * installed and the tests must run as root (Postfix's master and smtp-sink
 * drop privileges to the `postfix` user).
 */
export function postfixUnavailable(): string | undefined {
  for (const bin of [POSTFIX_BIN, SMTP_SINK_BIN, POSTQUEUE_BIN, MASTER_BIN]) {
    if (!fs.existsSync(bin)) return `${bin} is missing: install Debian's postfix package (apt-get install postfix)`;
  }
  if (process.getuid?.() !== 0) return 'the Postfix tests must run as root';
  try {
    execFileSync('id', ['postfix'], { stdio: 'ignore' });
  } catch {
    return 'there is no postfix user (install Debian\'s postfix package)';
  }
  return undefined;
}

/** Whether the Postfix tests may be skipped: NODEMILTER_SKIP_POSTFIX=1 outside CI. In CI they never are. */
export function mayskipPostfix(): boolean {
  return process.env.NODEMILTER_SKIP_POSTFIX === '1' && !process.env.CI;
}

/** Options of {@link startPostfix}. */
export interface PostfixOptions {
  /** The milter socket for smtpd_milters, e.g. `inet:PORT@127.0.0.1` (Postfix is told `inet:127.0.0.1:PORT`). */
  milter: string;
  /** Extra main.cf settings (override the defaults below). */
  main?: Record<string, string>;
}

/** One SMTP reply: the code and the text lines (without codes). */
export interface SmtpReplyLine {
  code: number;
  lines: string[];
  /** The reply as received, lines joined with "\n". */
  raw: string;
}

/** What {@link PostfixInstance.send} saw. */
export interface SmtpTranscript {
  greeting: SmtpReplyLine;
  ehlo: SmtpReplyLine;
  mail: SmtpReplyLine;
  rcpt: SmtpReplyLine[];
  /** The answer to DATA (354), if DATA was sent (at least one recipient accepted). */
  data?: SmtpReplyLine;
  /** The answer after the message's final dot. */
  end?: SmtpReplyLine;
  /** The queue id from "250 2.0.0 Ok: queued as ID". */
  queueId?: string;
}

/** A message smtp-sink received. */
export interface DeliveredMessage {
  file: string;
  /** MAIL FROM argument as smtp-sink logged it (X-Mail-Args). */
  mailArgs: string;
  /** RCPT TO arguments (X-Rcpt-Args), one per recipient. */
  rcptArgs: string[];
  /** The message as the MTA relayed it (smtp-sink's own X-* and Received lines removed), CRLF line ends. */
  message: string;
}

/** A running private Postfix. */
export interface PostfixInstance {
  /** The temporary directory holding everything (removed by stop). */
  readonly dir: string;
  readonly configDir: string;
  readonly queueDir: string;
  /** smtpd's port on 127.0.0.1. */
  readonly smtpPort: number;
  /** smtp-sink's port on 127.0.0.1. */
  readonly sinkPort: number;
  /** Submit one message over SMTP (EHLO, MAIL, RCPT..., DATA, QUIT). */
  send(msg: { from: string; rcpts: string[]; message: string | Buffer; helo?: string }): Promise<SmtpTranscript>;
  /** Wait until Postfix logged delivery of `queueId` to the sink and the sink's dump holds it; resolves with the dumps (one per relay transaction). */
  waitDelivered(queueId: string, timeout?: number): Promise<DeliveredMessage[]>;
  /** Queue ids in the hold queue (`postqueue -p` marks them with "!"). */
  heldQueueIds(): Promise<string[]>;
  /** Everything smtp-sink has received so far, in file-name order. */
  delivered(): DeliveredMessage[];
  /** The mail log so far. */
  log(): string;
  /** Stop Postfix and smtp-sink and remove the directory. Safe to call twice. */
  stop(): Promise<void>;
}

const MASTER_CF = (port: number) => `# private test instance: no chroot anywhere
127.0.0.1:${port} inet n - n - - smtpd
pickup    unix  n       -       n       60      1       pickup
cleanup   unix  n       -       n       -       0       cleanup
qmgr      unix  n       -       n       300     1       qmgr
rewrite   unix  -       -       n       -       -       trivial-rewrite
bounce    unix  -       -       n       -       0       bounce
defer     unix  -       -       n       -       0       bounce
trace     unix  -       -       n       -       0       bounce
verify    unix  -       -       n       -       1       verify
flush     unix  n       -       n       1000?   0       flush
proxymap  unix  -       -       n       -       -       proxymap
smtp      unix  -       -       n       -       -       smtp
relay     unix  -       -       n       -       -       smtp
showq     unix  n       -       n       -       -       showq
error     unix  -       -       n       -       -       error
retry     unix  -       -       n       -       -       error
discard   unix  -       -       n       -       -       discard
anvil     unix  -       -       n       -       1       anvil
scache    unix  -       -       n       -       1       scache
postlog   unix-dgram n  -       n       -       1       postlogd
`;

/** `inet:PORT@HOST` (our spec) as Postfix writes it: `inet:HOST:PORT`. */
function postfixMilterSpec(spec: string): string {
  const m = /^inet:(\d+)@(.+)$/.exec(spec);
  if (m) return `inet:${m[2]}:${m[1]}`;
  throw new Error(`startPostfix: milter ${JSON.stringify(spec)}: use inet:PORT@HOST (smtpd runs as postfix and cannot reach a root-owned unix socket)`);
}

const live = new Set<PostfixInstance>();
process.on('exit', () => {
  for (const pf of live) {
    try {
      execFileSync(POSTFIX_BIN, ['-c', pf.configDir, 'abort'], { stdio: 'ignore' });
    } catch {
      /* not running */
    }
    fs.rmSync(pf.dir, { recursive: true, force: true });
  }
});

/** Stop every Postfix started by {@link startPostfix} that is still running. */
export async function stopAllPostfix(): Promise<void> {
  await Promise.all([...live].map((p) => p.stop()));
}

/** The queue directories with the owners and modes of Debian's postfix-files. */
function makeQueueDirs(queueDir: string): void {
  const dirs: [string, number, string][] = [
    ...['active', 'bounce', 'corrupt', 'defer', 'deferred', 'flush', 'hold', 'incoming', 'private', 'saved', 'trace'].map(
      (d): [string, number, string] => [d, 0o700, 'postfix:root'],
    ),
    ['maildrop', 0o730, 'postfix:postdrop'],
    ['public', 0o710, 'postfix:postdrop'],
    ['pid', 0o755, 'root:root'],
  ];
  for (const [name, mode, owner] of dirs) {
    const d = path.join(queueDir, name);
    fs.mkdirSync(d);
    fs.chmodSync(d, mode);
    execFileSync('chown', [owner, d]);
  }
}

async function readMasterPid(queueDir: string): Promise<number | undefined> {
  try {
    const pid = Number(fs.readFileSync(path.join(queueDir, 'pid', 'master.pid'), 'utf8').trim());
    return pid > 0 ? pid : undefined;
  } catch {
    return undefined;
  }
}

function alive(pid: number): boolean {
  try {
    process.kill(pid, 0);
    return true;
  } catch {
    return false;
  }
}

/** Start a private Postfix relaying to a fresh smtp-sink. Throws with the mail log if it does not come up. */
export async function startPostfix(opts: PostfixOptions): Promise<PostfixInstance> {
  const why = postfixUnavailable();
  if (why) throw new Error(`Postfix is not available: ${why}`);
  const dir = fs.mkdtempSync('/tmp/nm-postfix-');
  fs.chmodSync(dir, 0o755); // the postfix user must reach its queue and data dirs
  const configDir = path.join(dir, 'etc');
  const queueDir = path.join(dir, 'spool');
  const dataDir = path.join(dir, 'data');
  const sinkDir = path.join(dir, 'sink');
  const logFile = path.join(dir, 'maillog');
  // Explicit modes: Postfix's daemons read the configuration as user postfix,
  // whatever the umask of the process running the tests (077, say).
  for (const d of [configDir, queueDir, dataDir, sinkDir]) {
    fs.mkdirSync(d);
    fs.chmodSync(d, 0o755);
  }
  execFileSync('chown', ['postfix', dataDir, sinkDir]);
  const smtpPort = await freePort();
  const sinkPort = await freePort();
  const main: Record<string, string> = {
    compatibility_level: '3.6',
    queue_directory: queueDir,
    data_directory: dataDir,
    command_directory: '/usr/sbin',
    daemon_directory: '/usr/lib/postfix/sbin',
    meta_directory: '/etc/postfix',
    shlib_directory: '/usr/lib/postfix',
    mail_owner: 'postfix',
    setgid_group: 'postdrop',
    myhostname: 'mta.test.example',
    mydomain: 'test.example',
    myorigin: '$myhostname',
    mydestination: '',
    inet_interfaces: 'loopback-only',
    inet_protocols: 'ipv4',
    mynetworks: '127.0.0.0/8',
    relayhost: `[127.0.0.1]:${sinkPort}`,
    maillog_file: logFile,
    maillog_file_prefixes: dir,
    alias_maps: '',
    alias_database: '',
    local_recipient_maps: '',
    smtp_tls_security_level: 'none',
    smtpd_tls_security_level: 'none',
    smtpd_milters: postfixMilterSpec(opts.milter),
    milter_default_action: 'tempfail',
    milter_protocol: '6',
    // Deliver at once, and do not wait before retrying a tempfailed relay.
    queue_run_delay: '1s',
    minimal_backoff_time: '1s',
    maximal_backoff_time: '2s',
    ...(opts.main ?? {}),
  };
  fs.writeFileSync(path.join(configDir, 'main.cf'), Object.entries(main).map(([k, v]) => `${k} = ${v}\n`).join(''));
  fs.writeFileSync(path.join(configDir, 'master.cf'), MASTER_CF(smtpPort));
  for (const f of ['main.cf', 'master.cf']) fs.chmodSync(path.join(configDir, f), 0o644);

  let sink: RunningProcess | undefined;
  let stopped = false;
  const log = () => (fs.existsSync(logFile) ? fs.readFileSync(logFile, 'utf8') : '');
  const instance: PostfixInstance = {
    dir,
    configDir,
    queueDir,
    smtpPort,
    sinkPort,
    send: (msg) => smtpSend(smtpPort, msg),
    async waitDelivered(queueId, timeout = 15_000) {
      const deadline = Date.now() + timeout;
      const sent = new RegExp(`${queueId}: to=<[^>]*>, relay=127\\.0\\.0\\.1\\[127\\.0\\.0\\.1\\]:${sinkPort}.*status=sent`);
      for (;;) {
        if (sent.test(log())) {
          const found = readSink(sinkDir).filter((m) => hasQueueId(m.message, queueId));
          if (found.length) return found;
        }
        if (Date.now() > deadline) throw new Error(`${queueId} was not delivered within ${timeout} ms; mail log:\n${log()}`);
        await new Promise((r) => setTimeout(r, 50));
      }
    },
    async heldQueueIds() {
      const { stdout } = await run(POSTQUEUE_BIN, ['-c', configDir, '-p']);
      return [...stdout.matchAll(/^([0-9A-F]+)!/gm)].map((m) => m[1]);
    },
    log,
    delivered: () => readSink(sinkDir),
    async stop() {
      if (stopped) return;
      stopped = true;
      live.delete(instance);
      try {
        const pid = await readMasterPid(queueDir);
        await run(POSTFIX_BIN, ['-c', configDir, 'stop']).catch(() => undefined);
        const until = Date.now() + 5000;
        while (pid && alive(pid) && Date.now() < until) await new Promise((r) => setTimeout(r, 50));
        if (pid && alive(pid)) {
          await run(POSTFIX_BIN, ['-c', configDir, 'abort']).catch(() => undefined);
          try {
            process.kill(pid, 'SIGKILL');
          } catch {
            /* gone */
          }
        }
        await sink?.stop();
      } finally {
        fs.rmSync(dir, { recursive: true, force: true });
      }
    },
  };
  live.add(instance);
  try {
    sink = await startProcess(SMTP_SINK_BIN, {
      args: ['-u', 'postfix', '-d', `${sinkDir}/%H%M%S.`, `127.0.0.1:${sinkPort}`, '100'],
      socket: `inet:${sinkPort}@127.0.0.1`,
      stopSignal: 'SIGKILL',
    });
    // `postfix start` spends ~6-8 s in its permission checks: make the queue
    // directories as postfix-files says and start master directly (-w: return
    // once it has initialised).
    makeQueueDirs(queueDir);
    try {
      await run(MASTER_BIN, ['-c', configDir, '-w']);
    } catch (e) {
      throw new Error(`postfix master failed to start: ${(e as Error).message}\nmail log:\n${log()}`);
    }
    await waitForSocket(`inet:${smtpPort}@127.0.0.1`, { timeout: 10_000 });
  } catch (e) {
    await instance.stop();
    throw e;
  }
  return instance;
}

/**
 * Whether `message` went through the MTA under `queueId`: its Received
 * header says "id QUEUEID" followed by anything but another letter or digit.
 * A substring test would also take a longer ID that starts with this one.
 */
export function hasQueueId(message: string, queueId: string): boolean {
  if (!/^[0-9A-Za-z]+$/.test(queueId)) throw new Error(`not a queue ID: ${JSON.stringify(queueId)}`);
  return new RegExp(`\\sid ${queueId}(?![0-9A-Za-z])`).test(message);
}

/**
 * Wait for each accepted message's delivery and count its copies: stamped
 * (matching `stamp`) or not, and the messages delivered more than once, by
 * queue ID and dump file, for the test to fail on by name.
 */
export async function countDeliveries(
  pf: PostfixInstance,
  accepted: { id: number; t: SmtpTranscript }[],
  stamp: RegExp,
): Promise<{ stamped: number; unstamped: number; twice: string[] }> {
  let stamped = 0;
  let unstamped = 0;
  const twice: string[] = [];
  for (const a of accepted) {
    const msgs = await pf.waitDelivered(a.t.queueId!, 30_000);
    if (msgs.length !== 1) twice.push(`${a.t.queueId} (message ${a.id}): ${msgs.map((d) => d.file).join(', ')}`);
    for (const d of msgs) {
      if (stamp.test(d.message)) stamped++;
      else unstamped++;
    }
  }
  return { stamped, unstamped, twice };
}

/**
 * Parse smtp-sink's dumps, in file-name order: its X-Client-*, X-Helo-Args,
 * X-Mail-Args, X-Rcpt-Args lines and its own Received header come first.
 * Used for Postfix and for sendmail, which both relay to smtp-sink.
 */
export function readSink(sinkDir: string): DeliveredMessage[] {
  const out: DeliveredMessage[] = [];
  for (const name of fs.readdirSync(sinkDir).sort()) {
    const file = path.join(sinkDir, name);
    const text = fs.readFileSync(file, 'latin1').replace(/\r?\n/g, '\r\n');
    const lines = text.split('\r\n');
    let i = 0;
    let mailArgs = '';
    const rcptArgs: string[] = [];
    for (; i < lines.length; i++) {
      const l = lines[i];
      if (l.startsWith('X-Mail-Args: ')) mailArgs = l.slice(13);
      else if (l.startsWith('X-Rcpt-Args: ')) rcptArgs.push(l.slice(13));
      else if (!/^X-(Client-Addr|Client-Proto|Helo-Args):/.test(l)) break;
    }
    // smtp-sink's own Received header (by smtp-sink), with its continuation lines.
    if (/^Received: .*$/.test(lines[i] ?? '') && /by smtp-sink/.test(lines.slice(i, i + 3).join('\n'))) {
      i++;
      while (i < lines.length && /^[ \t]/.test(lines[i])) i++;
    }
    let message = lines.slice(i).join('\r\n');
    // smtp-sink ends each dump with one extra newline after the message.
    if (message.endsWith('\r\n\r\n')) message = message.slice(0, -2);
    out.push({ file, mailArgs, rcptArgs, message });
  }
  return out;
}

/* ------------------------------------------------------------ a small SMTP client */

class SmtpConn {
  private buf = '';
  private waiting: (() => void) | undefined;
  private closed = false;
  constructor(private readonly sock: net.Socket) {
    sock.setEncoding('latin1');
    sock.on('data', (d: string) => {
      this.buf += d;
      this.waiting?.();
    });
    sock.on('close', () => {
      this.closed = true;
      this.waiting?.();
    });
    sock.on('error', () => undefined);
  }

  async reply(timeout = 20_000): Promise<SmtpReplyLine> {
    const deadline = Date.now() + timeout;
    for (;;) {
      const m = /^(?:\d{3}-[^\r\n]*\r\n)*\d{3}(?: [^\r\n]*)?\r\n/.exec(this.buf);
      if (m) {
        this.buf = this.buf.slice(m[0].length);
        const raw = m[0].replace(/\r\n$/, '').split('\r\n');
        return { code: Number(raw[0].slice(0, 3)), lines: raw.map((l) => l.slice(4)), raw: raw.join('\n') };
      }
      if (this.closed) throw new Error(`SMTP connection closed; unread: ${JSON.stringify(this.buf)}`);
      if (Date.now() > deadline) throw new Error(`no SMTP reply within ${timeout} ms; unread: ${JSON.stringify(this.buf)}`);
      await new Promise<void>((resolve) => {
        const t = setTimeout(resolve, 100);
        this.waiting = () => {
          clearTimeout(t);
          resolve();
        };
      });
      this.waiting = undefined;
    }
  }

  async cmd(line: string): Promise<SmtpReplyLine> {
    this.sock.write(`${line}\r\n`, 'latin1');
    return this.reply();
  }

  write(data: string): void {
    this.sock.write(data, 'latin1');
  }

  end(): void {
    this.sock.end();
  }
}

function connectLoopback(port: number): Promise<net.Socket> {
  return new Promise<net.Socket>((resolve, reject) => {
    const s = net.createConnection({ port, host: '127.0.0.1' });
    s.once('connect', () => resolve(s));
    s.once('error', reject);
  });
}

/** The message as sent after DATA: CRLF line ends, dot-stuffed, ended by the dot line. */
function dataOf(message: string | Buffer): string {
  const text = (Buffer.isBuffer(message) ? message.toString('latin1') : message).replace(/\r?\n/g, '\r\n');
  const stuffed = text.replace(/^\./gm, '..');
  return `${stuffed}${stuffed.endsWith('\r\n') ? '' : '\r\n'}.\r\n`;
}

/** Submit one message to 127.0.0.1:port; the message gets CRLF line ends and dot-stuffing. */
export async function smtpSend(
  port: number,
  msg: { from: string; rcpts: string[]; message: string | Buffer; helo?: string },
): Promise<SmtpTranscript> {
  const sock = await connectLoopback(port);
  const c = new SmtpConn(sock);
  try {
    const greeting = await c.reply();
    const ehlo = await c.cmd(`EHLO ${msg.helo ?? 'client.test.example'}`);
    const mail = await c.cmd(`MAIL FROM:${msg.from}`);
    const t: SmtpTranscript = { greeting, ehlo, mail, rcpt: [] };
    if (mail.code !== 250) return t;
    for (const r of msg.rcpts) t.rcpt.push(await c.cmd(`RCPT TO:${r}`));
    if (!t.rcpt.some((r) => r.code === 250)) return t;
    t.data = await c.cmd('DATA');
    if (t.data.code !== 354) return t;
    c.write(dataOf(msg.message));
    t.end = await c.reply(60_000);
    const q = /queued as ([0-9A-Za-z]+)/.exec(t.end.raw);
    if (q) t.queueId = q[1];
    return t;
  } finally {
    try {
      await c.cmd('QUIT');
    } catch {
      /* closed */
    }
    c.end();
    sock.destroy();
  }
}

/** One step of {@link smtpDialog}: an SMTP command line, or a message to send after DATA's 354 (dot-stuffed, ended with a dot). */
export type SmtpStep = string | { message: string };

/**
 * Run a scripted SMTP session on 127.0.0.1:port, for sessions {@link smtpSend}
 * cannot express (several transactions, RSET): reads the greeting, then
 * sends each step and reads its reply; closes the connection at the end.
 * @returns the greeting, then one reply per step.
 */
export async function smtpDialog(port: number, steps: readonly SmtpStep[]): Promise<SmtpReplyLine[]> {
  const sock = await connectLoopback(port);
  const c = new SmtpConn(sock);
  try {
    const replies = [await c.reply()];
    for (const step of steps) {
      if (typeof step === 'string') replies.push(await c.cmd(step));
      else {
        c.write(dataOf(step.message));
        replies.push(await c.reply(60_000));
      }
    }
    return replies;
  } finally {
    c.end();
    sock.destroy();
  }
}
