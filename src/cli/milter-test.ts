#!/usr/bin/env node
/**
 * `milter-test`: send a message through a milter listening at a socket, the
 * way an MTA would, and print each stage's decision and the message as the
 * MTA would deliver it. With `--count` it becomes a quick load check.
 *
 * Run `milter-test --help` for the options and exit codes.
 *
 * @module
 */
import * as fs from 'node:fs';
import { parseArgs } from 'node:util';

import { P_HDR_LEADSPC } from '../constants';
import { MilterError } from '../errors';
import { MilterConnection } from '../mta/connection';
import type { EomAction, FamilyArg, MessageResult, MessageSpec, ReplyStatus, SmtpReply, StepResult } from '../mta/connection';
import { applyModifications, readMessage as splitMessage, type ChainEnvelope } from '../mta/message';

/** Exit statuses of milter-test. */
export const EXIT = {
  /** The message was accepted (continue or accept at every stage). */
  OK: 0,
  /** Cannot connect, protocol error, timeout, unreadable message. */
  ERROR: 1,
  /** Bad command line. */
  USAGE: 2,
  /** The milter rejected the message (5xx). */
  REJECT: 3,
  /** The milter tempfailed the message (4xx), or sent shutdown/connfail. */
  TEMPFAIL: 4,
  /** The milter discarded the message. */
  DISCARD: 5,
} as const;

const HELP = `Usage: milter-test [options] SOCKET [FILE]

Send the message in FILE (or standard input, also with FILE "-") through the
milter listening at SOCKET (unix:/path, inet:PORT@HOST, inet6:PORT@HOST),
acting as the MTA; print each stage's decision, the modifications, and the
message as the MTA would deliver it.

Envelope and connection:
  --from ADDR            envelope sender (default <sender@example.com>)
  --from-param P         ESMTP parameter of MAIL FROM, e.g. SIZE=1234 (repeatable)
  --rcpt 'ADDR [P...]'   recipient with optional ESMTP parameters (repeatable;
                         default <rcpt@example.com>)
  --client-addr ADDR     SMTP client address (default 127.0.0.1)
  --client-port PORT     SMTP client port (default 54321)
  --client-name NAME     SMTP client hostname (default localhost)
  --family F             inet | inet6 | unix | unknown (default inet, or inet6
                         when --client-addr has a colon)
  --helo NAME            HELO/EHLO name (default localhost)
  --macro STAGE:NAME=VALUE
                         a macro sent before STAGE (connect, helo, envfrom,
                         envrcpt, data, eoh, eom; mail = envfrom, rcpt =
                         envrcpt), e.g. --macro eom:i=4AB12 or
                         --macro 'connect:{daemon_name}=mx' (repeatable)
Output:
  --json                 one JSON object on standard output
  --timeout MS           per-reply timeout (default 10000; end of message: 5 min)
Load check:
  --count N              send the message N times, each on its own connection
  --concurrency C        with --count, C connections at once (default 1);
                         prints one summary line: messages/s, p50/p99
                         latency, decisions
  -h, --help             this text

Addresses without angle brackets get them. Bare LF line ends become CRLF; a
leading mbox "From " line is dropped.

Exit status:
  0  accepted (continue or accept)
  1  error: cannot connect, protocol error, timeout, unreadable message
  2  bad command line
  3  rejected (5xx)
  4  tempfailed (4xx), or the milter sent shutdown (421) or connfail
  5  discarded
With --count: the worst outcome of all messages, in the order
error (1), tempfail (4), reject (3), discard (5), accepted (0).
`;

/** A command-line problem (exit status 2). */
class UsageError extends MilterError {
  constructor(message: string) {
    super(message, 'ERR_MILTER_TEST_USAGE');
  }
}

interface Options {
  socket: string;
  file?: string;
  spec: Omit<MessageSpec, 'message'>;
  json: boolean;
  timeout?: number;
  count?: number;
  concurrency: number;
}

const STAGES: Record<string, string> = {
  connect: 'connect',
  helo: 'helo',
  envfrom: 'envfrom',
  mail: 'envfrom',
  envrcpt: 'envrcpt',
  rcpt: 'envrcpt',
  data: 'data',
  eoh: 'eoh',
  eom: 'eom',
};
const FAMILIES = new Set(['inet', 'inet6', 'unix', 'unknown']);

function bracket(addr: string): string {
  return addr.startsWith('<') ? addr : `<${addr}>`;
}

function positiveInt(name: string, value: string | undefined, min = 1): number | undefined {
  if (value === undefined) return undefined;
  const n = Number(value);
  if (!Number.isInteger(n) || n < min) throw new UsageError(`${name} must be an integer >= ${min}, got ${JSON.stringify(value)}`);
  return n;
}

/** Parse the command line (without `node` and the script). Throws UsageError. */
function parseOptions(argv: string[]): Options | 'help' {
  let parsed;
  try {
    parsed = parseArgs({
      args: argv,
      allowPositionals: true,
      options: {
        from: { type: 'string' },
        'from-param': { type: 'string', multiple: true },
        rcpt: { type: 'string', multiple: true },
        'client-addr': { type: 'string' },
        'client-port': { type: 'string' },
        'client-name': { type: 'string' },
        family: { type: 'string' },
        helo: { type: 'string' },
        macro: { type: 'string', multiple: true },
        json: { type: 'boolean' },
        timeout: { type: 'string' },
        count: { type: 'string' },
        concurrency: { type: 'string' },
        help: { type: 'boolean', short: 'h' },
      },
    });
  } catch (e) {
    throw new UsageError((e as Error).message);
  }
  const v = parsed.values;
  if (v.help) return 'help';
  const [socket, file, ...extra] = parsed.positionals;
  if (!socket) throw new UsageError('missing SOCKET (e.g. inet:8894@127.0.0.1 or unix:/run/milter.sock)');
  if (extra.length) throw new UsageError(`unexpected arguments ${JSON.stringify(extra)}: expected SOCKET [FILE]`);
  const address = v['client-addr'] ?? '127.0.0.1';
  const family = v.family ?? (address.includes(':') ? 'inet6' : 'inet');
  if (!FAMILIES.has(family)) throw new UsageError(`--family must be one of inet, inet6, unix, unknown; got ${JSON.stringify(family)}`);
  const port = positiveInt('--client-port', v['client-port'], 0) ?? 54321;
  if (port > 65535) throw new UsageError(`--client-port must be at most 65535, got ${port}`);
  const macros: Record<string, Record<string, string>> = {};
  for (const m of v.macro ?? []) {
    const match = /^([A-Za-z]+):([^=]+)=(.*)$/s.exec(m);
    if (!match) throw new UsageError(`--macro ${JSON.stringify(m)}: expected STAGE:NAME=VALUE, e.g. eom:i=4AB12`);
    const stage = STAGES[match[1].toLowerCase()];
    if (!stage) throw new UsageError(`--macro ${JSON.stringify(m)}: unknown stage ${JSON.stringify(match[1])}, expected one of ${Object.keys(STAGES).join(', ')}`);
    (macros[stage] ??= {})[match[2]] = match[3];
  }
  const rcpt = (v.rcpt ?? ['<rcpt@example.com>']).map((r) => {
    const parts = r.trim().split(/\s+/);
    if (parts[0] === '') throw new UsageError('--rcpt needs an address');
    return [bracket(parts[0]), ...parts.slice(1)];
  });
  const count = positiveInt('--count', v.count);
  const concurrency = positiveInt('--concurrency', v.concurrency) ?? 1;
  if (v.concurrency !== undefined && count === undefined) throw new UsageError('--concurrency needs --count');
  return {
    socket,
    file,
    json: v.json ?? false,
    timeout: positiveInt('--timeout', v.timeout),
    count,
    concurrency,
    spec: {
      client: { hostname: v['client-name'] ?? 'localhost', family: family as FamilyArg, address, port },
      helo: v.helo ?? 'localhost',
      from: [bracket(v.from ?? '<sender@example.com>'), ...(v['from-param'] ?? [])],
      rcpt,
      macros,
    },
  };
}

function readMessage(file: string | undefined): Buffer {
  let raw: Buffer;
  try {
    raw = !file || file === '-' ? fs.readFileSync(0) : fs.readFileSync(file);
  } catch (e) {
    throw new MilterError(`cannot read the message from ${!file || file === '-' ? 'standard input' : file}: ${(e as Error).message}`);
  }
  if (raw.subarray(0, 5).toString('latin1') === 'From ') {
    const nl = raw.indexOf(10);
    raw = nl < 0 ? Buffer.alloc(0) : raw.subarray(nl + 1);
  }
  return raw;
}

/** The exit status for a transaction's decision. */
function exitFor(decision: ReplyStatus): number {
  switch (decision) {
    case 'reject':
      return EXIT.REJECT;
    case 'tempfail':
    case 'shutdown':
    case 'connfail':
      return EXIT.TEMPFAIL;
    case 'discard':
      return EXIT.DISCARD;
    default:
      return EXIT.OK;
  }
}

const WORST = [EXIT.ERROR, EXIT.TEMPFAIL, EXIT.REJECT, EXIT.DISCARD, EXIT.OK];

async function sendOne(opts: Options, message: Buffer): Promise<MessageResult> {
  const client = await MilterConnection.connect(opts.socket, opts.timeout ? { timeout: opts.timeout } : {});
  try {
    return await client.sendMessage({ ...opts.spec, message, quit: true });
  } finally {
    client.destroy();
  }
}

/* ------------------------------------------------------------ one message */

function replyText(r: SmtpReply | undefined): string {
  return r ? ` ${r.raw.replace(/\r\n/g, ' | ')}` : '';
}

function stepLines(res: MessageResult): { label: string; result: StepResult; extra?: string }[] {
  const out: { label: string; result: StepResult; extra?: string }[] = [];
  if (res.connect) out.push({ label: 'connect', result: res.connect });
  if (res.helo) out.push({ label: 'helo', result: res.helo });
  if (res.envfrom) out.push({ label: 'envfrom', result: res.envfrom });
  const rcpts = (res.envrcpt ?? []) as StepResult[];
  rcpts.forEach((r, i) => out.push({ label: `envrcpt #${i + 1}`, result: r }));
  if (res.data) out.push({ label: 'data', result: res.data });
  res.headers.forEach((h, i) => out.push({ label: `header #${i + 1}`, result: h }));
  if (res.eoh) out.push({ label: 'eoh', result: res.eoh });
  if (res.body) out.push({ label: 'body', result: res.body, extra: ` (${res.body.chunksSent}/${res.body.chunksTotal} chunks)` });
  if (res.eom) out.push({ label: 'eom', result: res.eom });
  return out;
}

function describeAction(a: EomAction): string {
  switch (a.type) {
    case 'addheader':
      return `addheader ${a.name}: ${JSON.stringify(a.value)}`;
    case 'insheader':
      return `insheader at ${a.index} ${a.name}: ${JSON.stringify(a.value)}`;
    case 'chgheader':
      return a.valueBytes.length ? `chgheader ${a.name}[${a.index}]: ${JSON.stringify(a.value)}` : `delete header ${a.name}[${a.index}]`;
    case 'addrcpt':
      return `addrcpt ${a.rcpt}`;
    case 'addrcpt_par':
      return `addrcpt ${a.rcpt}${a.params ? ` ${a.params}` : ''}`;
    case 'delrcpt':
      return `delrcpt ${a.rcpt}`;
    case 'chgfrom':
      return `chgfrom ${a.sender}${a.params ? ` ${a.params}` : ''}`;
    case 'replbody':
      return `replacebody (${a.chunk.length} bytes)`;
    case 'quarantine':
      return `quarantine ${JSON.stringify(a.reason)}`;
  }
}

function jsonAction(a: EomAction): Record<string, unknown> {
  const { raw: _raw, ...rest } = a as EomAction & { valueBytes?: Buffer; chunk?: Buffer };
  const o: Record<string, unknown> = { ...rest };
  delete o.valueBytes;
  if ('chunk' in o) o.chunk = (a as { chunk: Buffer }).chunk.toString('utf8');
  return o;
}

function jsonStep(label: string, r: StepResult, extra: Record<string, unknown> = {}): Record<string, unknown> {
  const o: Record<string, unknown> = { step: r.step, label, status: r.status, ...extra };
  if (r.reply) o.reply = { rcode: r.reply.rcode, xcode: r.reply.xcode, text: r.reply.text, raw: r.reply.raw };
  if (r.progress) o.progress = r.progress;
  return o;
}

/** The reply that came with the decision, if any. */
function decisiveReply(res: MessageResult): SmtpReply | undefined {
  if (res.eom) return res.eom.reply;
  if (res.stoppedAt === 'envrcpt') return res.envrcpt[res.envrcpt.length - 1]?.reply;
  const steps = stepLines(res);
  return steps[steps.length - 1]?.result.reply;
}

/** The message and envelope as Postfix delivers them after the milter's modifications (nodemilter/mta's rules). */
interface Applied {
  message: Buffer;
  envelope: { sender: string; recipients: string[] };
  quarantine?: string;
}

async function delivered(message: Buffer, actions: readonly EomAction[], envelope: ChainEnvelope, leadingSpace: boolean): Promise<Applied> {
  const { headers, body } = await splitMessage(message);
  try {
    const r = applyModifications(actions, headers, envelope, { leadingSpace });
    const newBody = r.replacedBody ?? body;
    const text = Buffer.concat([headers.toBuffer(), Buffer.from('\r\n'), await newBody.toBuffer()]);
    r.replacedBody?.dispose();
    const out: Applied = { message: text, envelope: { sender: envelope.sender, recipients: envelope.recipients.map((x) => x.address) } };
    if (r.quarantine.length) out.quarantine = r.quarantine[r.quarantine.length - 1];
    return out;
  } finally {
    body.dispose();
  }
}

async function runOne(opts: Options, message: Buffer, write: (s: string) => void): Promise<number> {
  const res = await sendOne(opts, message);
  const code = exitFor(res.decision);
  const accepted = (opts.spec.rcpt as string[][]).filter((_, i) => {
    const s = res.envrcpt[i]?.status;
    return s === undefined || s === 'continue' || s === 'noreply' || s === 'notsent' || s === 'accept';
  });
  const from = opts.spec.from as string[];
  const envelope: ChainEnvelope = { sender: from[0], senderParams: from.slice(1), recipients: accepted.map((r) => ({ address: r[0], params: r.slice(1) })) };
  let applied: Applied | undefined;
  if (res.eom && (res.decision === 'continue' || res.decision === 'accept')) {
    applied = await delivered(message, res.actions, envelope, (res.negotiation.steps & P_HDR_LEADSPC) !== 0);
  }
  const reply = decisiveReply(res);
  if (opts.json) {
    const steps = stepLines(res).map(({ label, result }) =>
      jsonStep(label, result, result.step === 'body' ? { chunksSent: (result as any).chunksSent, chunksTotal: (result as any).chunksTotal } : {}),
    );
    const out: Record<string, unknown> = {
      socket: opts.socket,
      negotiation: {
        version: res.negotiation.version,
        actions: res.negotiation.actions,
        steps: res.negotiation.steps,
        symlists: res.negotiation.symlists,
      },
      steps,
      decision: res.decision,
      stoppedAt: res.stoppedAt ?? null,
      reply: reply ? { rcode: reply.rcode, xcode: reply.xcode, text: reply.text, raw: reply.raw } : null,
      actions: res.actions.map(jsonAction),
      envelope: applied?.envelope ?? null,
      quarantine: applied?.quarantine ?? null,
      message: applied ? applied.message.toString('utf8') : null,
      exitCode: code,
    };
    write(`${JSON.stringify(out)}\n`);
    return code;
  }
  const n = res.negotiation;
  write(`negotiate    version ${n.version}, actions 0x${n.actions.toString(16)}, steps 0x${n.steps.toString(16)}\n`);
  for (const { label, result, extra } of stepLines(res)) {
    write(`${label.padEnd(12)} ${result.status}${replyText(result.reply)}${extra ?? ''}\n`);
  }
  for (const a of res.actions) write(`action       ${describeAction(a)}\n`);
  write(`decision     ${res.decision}${res.stoppedAt ? ` (at ${res.stoppedAt})` : ''}${replyText(reply)}\n`);
  if (applied) {
    if (applied.quarantine !== undefined) write(`quarantine   ${applied.quarantine}\n`);
    write(`sender       ${applied.envelope.sender}\n`);
    write(`recipients   ${applied.envelope.recipients.join(' ')}\n`);
    write('--- message as delivered ---\n');
    write(applied.message.toString('utf8'));
  }
  return code;
}

/* ------------------------------------------------------------ load check */

/** The q-quantile (0..1) of sorted values, nearest rank. */
function quantile(sorted: number[], q: number): number {
  if (sorted.length === 0) return NaN;
  return sorted[Math.min(sorted.length - 1, Math.max(0, Math.ceil(q * sorted.length) - 1))];
}

async function runLoad(opts: Options, message: Buffer, write: (s: string) => void): Promise<number> {
  const count = opts.count!;
  const latencies: number[] = [];
  const decisions: Record<string, number> = {};
  const codes = new Set<number>();
  let errors = 0;
  let firstError: string | undefined;
  let next = 0;
  const started = process.hrtime.bigint();
  const worker = async () => {
    while (next < count) {
      next++;
      const t0 = process.hrtime.bigint();
      try {
        const res = await sendOne(opts, message);
        latencies.push(Number(process.hrtime.bigint() - t0) / 1e6);
        decisions[res.decision] = (decisions[res.decision] ?? 0) + 1;
        codes.add(exitFor(res.decision));
      } catch (e) {
        errors++;
        firstError ??= (e as Error).message;
        codes.add(EXIT.ERROR);
      }
    }
  };
  await Promise.all(Array.from({ length: Math.min(opts.concurrency, count) }, worker));
  const seconds = Number(process.hrtime.bigint() - started) / 1e9;
  latencies.sort((a, b) => a - b);
  const summary = {
    messages: count,
    concurrency: opts.concurrency,
    seconds: Number(seconds.toFixed(3)),
    perSecond: Number((count / seconds).toFixed(1)),
    p50ms: Number(quantile(latencies, 0.5).toFixed(2)),
    p99ms: Number(quantile(latencies, 0.99).toFixed(2)),
    decisions,
    errors,
    firstError: firstError ?? null,
  };
  const code = WORST.find((c) => codes.has(c)) ?? EXIT.OK;
  if (opts.json) write(`${JSON.stringify({ ...summary, exitCode: code })}\n`);
  else {
    const dec = Object.entries(decisions)
      .map(([k, v]) => `${k}=${v}`)
      .join(' ');
    write(
      `${count} messages in ${summary.seconds} s (concurrency ${opts.concurrency}): ${summary.perSecond} msg/s, ` +
        `latency p50 ${summary.p50ms} ms, p99 ${summary.p99ms} ms; decisions: ${dec || 'none'}; errors: ${errors}` +
        `${firstError ? ` (first: ${firstError})` : ''}\n`,
    );
  }
  return code;
}

/**
 * Run milter-test with these arguments (without `node` and the script name);
 * resolves with the exit status. Output goes to `out`/`err` (default
 * process.stdout/stderr).
 */
export async function main(
  argv: string[],
  out: (s: string) => void = (s) => process.stdout.write(s),
  err: (s: string) => void = (s) => process.stderr.write(s),
): Promise<number> {
  let opts: Options | 'help';
  try {
    opts = parseOptions(argv);
  } catch (e) {
    err(`milter-test: ${(e as Error).message}\nTry milter-test --help.\n`);
    return EXIT.USAGE;
  }
  if (opts === 'help') {
    out(HELP);
    return EXIT.OK;
  }
  try {
    const message = readMessage(opts.file);
    return opts.count === undefined ? await runOne(opts, message, out) : await runLoad(opts, message, out);
  } catch (e) {
    const msg = (e as Error).message;
    if (opts.json) out(`${JSON.stringify({ error: msg, code: (e as MilterError).code ?? null, exitCode: EXIT.ERROR })}\n`);
    err(`milter-test: error: ${msg}\n`);
    return EXIT.ERROR;
  }
}

if (require.main === module) {
  main(process.argv.slice(2)).then((code) => {
    process.exitCode = code;
  });
}
