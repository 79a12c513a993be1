/**
 * The milter-test CLI (dist/src/cli/milter-test.js, run as a real process)
 * against real milters: the C fixture on libmilter and the node fixture on
 * our milter module.
 */
import { spawn } from 'child_process';
import * as fs from 'fs';
import * as path from 'path';
import { afterEach, beforeAll, describe, expect, it } from 'vitest';
import { buildC, C_TESTMILTER_SRC, eventStrings, FIXTURES, freeInetSpec, startProcess, stopAll, tmpDir, tmpSocketSpec } from './helpers';

const CLI = path.resolve(__dirname, '..', 'dist', 'src', 'cli', 'milter-test.js');
const NODE_FIXTURE = path.join(FIXTURES, 'node', 'milter.cjs');
const MESSAGE = 'From: a@example.com\nTo: b@example.org\nSubject: hello\n\nHi there\n';

let cBin = '';
beforeAll(async () => {
  cBin = await buildC(C_TESTMILTER_SRC);
}, 60_000);
afterEach(() => stopAll());

interface CliRun {
  code: number | null;
  stdout: string;
  stderr: string;
}

function runCli(args: string[], input?: string): Promise<CliRun> {
  return new Promise((resolve, reject) => {
    const child = spawn(process.execPath, [CLI, ...args], { stdio: ['pipe', 'pipe', 'pipe'] });
    let stdout = '';
    let stderr = '';
    child.stdout.setEncoding('utf8').on('data', (d) => (stdout += d));
    child.stderr.setEncoding('utf8').on('data', (d) => (stderr += d));
    child.on('error', reject);
    child.on('close', (code) => resolve({ code, stdout, stderr }));
    child.stdin.end(input ?? '');
  });
}

async function startC(env: Record<string, string>): Promise<{ spec: string; proc: Awaited<ReturnType<typeof startProcess>> }> {
  const spec = await freeInetSpec();
  const proc = await startProcess(cBin, { args: [spec], env, socket: spec, stopSignal: 'SIGKILL' });
  await proc.waitForOutput(/^EV\tclose$/m); // the readiness probe's session
  return { spec, proc };
}

async function startNode(config: Record<string, unknown>): Promise<{ spec: string; proc: Awaited<ReturnType<typeof startProcess>> }> {
  const spec = tmpSocketSpec();
  const proc = await startProcess(process.execPath, {
    args: [NODE_FIXTURE],
    env: { MILTER_CONFIG: JSON.stringify({ socket: spec, ...config }) },
    socket: spec,
    stopSignal: 'SIGKILL',
  });
  return { spec, proc };
}

describe('milter-test against the C fixture (libmilter)', () => {
  it('sends envelope, client, helo and macros, and prints the message as delivered (--json)', async () => {
    const { spec, proc } = await startC({
      TM_MACROS: 'i {daemon_name} {auth_authen}',
      TM_EOM: 'addheader\tX-Added\tadded value\nchgheader\tSubject\t1\tchanged subject\ninsheader\t0\tX-First\tfirst\nreplacebody\tnew body\\r\\n\naddrcpt\t<c@example.net>',
    });
    const file = path.join(tmpDir('mt-'), 'msg.eml');
    fs.writeFileSync(file, MESSAGE);
    const r = await runCli([
      '--json', '--from', 'a@example.com', '--from-param', 'SIZE=100', '--rcpt', '<b@example.org> NOTIFY=NEVER',
      '--client-name', 'client.example.com', '--client-addr', '192.0.2.7', '--client-port', '4242', '--helo', 'helo.example.com',
      '--macro', 'connect:{daemon_name}=mx-test', '--macro', 'eom:i=QID42', '--macro', 'mail:{auth_authen}=alice',
      spec, file,
    ]);
    expect(r.stderr).toBe('');
    expect(r.code).toBe(0);
    const out = JSON.parse(r.stdout);
    expect(out.decision).toBe('continue');
    expect(out.exitCode).toBe(0);
    expect(out.steps.map((s: { label: string; status: string }) => `${s.label}=${s.status}`)).toEqual([
      'connect=continue', 'helo=continue', 'envfrom=continue', 'envrcpt #1=continue', 'data=continue',
      'header #1=continue', 'header #2=continue', 'header #3=continue', 'eoh=continue', 'body=continue', 'eom=continue',
    ]);
    expect(out.actions.map((a: { type: string }) => a.type)).toEqual(['addheader', 'chgheader', 'insheader', 'replbody', 'addrcpt']);
    expect(out.envelope).toEqual({ sender: '<a@example.com>', recipients: ['<b@example.org>', '<c@example.net>'] });
    expect(out.message).toBe(
      'X-First: first\r\nFrom: a@example.com\r\nTo: b@example.org\r\nSubject: changed subject\r\nX-Added: added value\r\n\r\nnew body\r\n',
    );
    await proc.waitForOutput(/^EV\tclose$/m, { from: proc.stdout.indexOf('EV\tnegotiate') });
    const seen = eventStrings(proc.stdout.slice(proc.stdout.indexOf('EV\tnegotiate')), ['EV', 'MACRO']);
    expect(seen).toContain('connect client.example.com inet 192.0.2.7 4242');
    expect(seen).toContain('helo helo.example.com');
    expect(seen).toContain('envfrom <a@example.com> SIZE=100');
    expect(seen).toContain('envrcpt <b@example.org> NOTIFY=NEVER');
    expect(seen).toContain('MACRO connect {daemon_name} mx-test');
    expect(seen).toContain('MACRO envfrom {auth_authen} alice');
    expect(seen).toContain('MACRO eom i QID42');
  });

  it('exits 3 on reject and prints the reply text; a rejected recipient only drops that recipient', async () => {
    const { spec } = await startC({ TM_RCPT_REJECT: 'bad', TM_REPLY_envrcpt: '550|5.7.1|no bad recipients' });
    const one = await runCli(['--rcpt', 'bad@example.org', spec], MESSAGE);
    expect(one.code).toBe(3);
    expect(one.stdout).toMatch(/^envrcpt #1 +reject 550 5\.7\.1 no bad recipients$/m);
    expect(one.stdout).toMatch(/^decision +reject \(at envrcpt\) 550 5\.7\.1 no bad recipients$/m);
    expect(one.stdout).not.toContain('--- message');
    const two = await runCli(['--rcpt', 'bad@example.org', '--rcpt', 'good@example.org', spec], MESSAGE);
    expect(two.code).toBe(0);
    expect(two.stdout).toMatch(/^recipients +<good@example\.org>$/m);
    expect(two.stdout).toContain('--- message as delivered ---\nFrom: a@example.com\r\n');
  });

  it.each([
    ['reject', 3],
    ['tempfail', 4],
    ['discard', 5],
    ['accept', 0],
  ])('eom %s gives exit status %i', async (ret, code) => {
    const { spec } = await startC({ TM_RET_eom: ret });
    const r = await runCli(['--json', spec], MESSAGE);
    expect(r.code).toBe(code);
    const out = JSON.parse(r.stdout);
    expect(out.decision).toBe(ret);
    expect(out.exitCode).toBe(code);
  });

  it('tempfail with a custom reply at MAIL ends the transaction there', async () => {
    const { spec } = await startC({ TM_RET_envfrom: 'tempfail', TM_REPLY_envfrom: '451|4.7.1|try later' });
    const r = await runCli(['--json', spec], MESSAGE);
    expect(r.code).toBe(4);
    const out = JSON.parse(r.stdout);
    expect(out).toMatchObject({ decision: 'tempfail', stoppedAt: 'envfrom', reply: { rcode: '451', xcode: '4.7.1', text: 'try later' }, message: null });
  });

  it('--count/--concurrency prints one summary line', async () => {
    const { spec } = await startC({});
    const r = await runCli(['--count', '20', '--concurrency', '4', spec], MESSAGE);
    expect(r.code).toBe(0);
    expect(r.stdout).toMatch(
      /^20 messages in [0-9.]+ s \(concurrency 4\): [0-9.]+ msg\/s, latency p50 [0-9.]+ ms, p99 [0-9.]+ ms; decisions: continue=20; errors: 0\n$/,
    );
    const j = await runCli(['--json', '--count', '6', '--concurrency', '2', spec], MESSAGE);
    const sum = JSON.parse(j.stdout);
    expect(sum).toMatchObject({ messages: 6, concurrency: 2, decisions: { continue: 6 }, errors: 0, exitCode: 0 });
    expect(sum.p99ms).toBeGreaterThanOrEqual(sum.p50ms);
    expect(sum.perSecond).toBeGreaterThan(0);
  });
});

describe('milter-test against the node fixture (nodemilter/milter)', () => {
  it('reads stdin and applies the EOM actions as the MTA would', async () => {
    const { spec, proc } = await startNode({
      eomActions: [
        ['addheader', 'X-Node', 'yes'],
        ['chgheader', 'To', 1, null],
        ['chgfrom', '<new@example.com>'],
        ['delrcpt', '<b@example.org>'],
        ['addrcpt', '<c@example.net>'],
        ['quarantine', 'looks odd'],
      ],
    });
    const r = await runCli(['--rcpt', 'b@example.org', '--rcpt', 'd@example.org', spec, '-'], MESSAGE);
    expect(r.stderr).toBe('');
    expect(r.code).toBe(0);
    expect(r.stdout).toMatch(/^action +delete header To\[1\]$/m);
    expect(r.stdout).toMatch(/^quarantine +looks odd$/m);
    expect(r.stdout).toMatch(/^sender +<new@example\.com>$/m);
    expect(r.stdout).toMatch(/^recipients +<d@example\.org> <c@example\.net>$/m);
    expect(r.stdout).toContain('--- message as delivered ---\nFrom: a@example.com\r\nSubject: hello\r\nX-Node: yes\r\n\r\nHi there\r\n');
    await proc.waitForOutput(/"ev":"eom-actions".*"results":\[\["addheader","ok"\]/);
  });

  it('reject with the milter reply, and a load check with decisions counted', async () => {
    const { spec } = await startNode({ rejectRcpt: '<no@example.org>' });
    const r = await runCli(['--json', '--rcpt', 'no@example.org', spec], MESSAGE);
    expect(r.code).toBe(3);
    expect(JSON.parse(r.stdout).reply).toMatchObject({ rcode: '550', xcode: '5.7.1', text: 'Recipient refused by test' });
    const load = await runCli(['--count', '12', '--concurrency', '3', '--rcpt', 'no@example.org', spec], MESSAGE);
    expect(load.code).toBe(3);
    expect(load.stdout).toMatch(/decisions: reject=12; errors: 0\n$/);
  });
});

describe('milter-test command line', () => {
  it('documents the exit codes in --help', async () => {
    const r = await runCli(['--help']);
    expect(r.code).toBe(0);
    expect(r.stdout).toMatch(/^Usage: milter-test/);
    for (const line of [/^ {2}0 {2}accepted/m, /^ {2}1 {2}error/m, /^ {2}2 {2}bad command line/m, /^ {2}3 {2}rejected/m, /^ {2}4 {2}tempfailed/m, /^ {2}5 {2}discarded/m]) {
      expect(r.stdout).toMatch(line);
    }
  });

  it('exits 2 on a bad command line, naming the bad value', async () => {
    const a = await runCli(['--macro', 'later:i=1', 'inet:1@127.0.0.1']);
    expect(a.code).toBe(2);
    expect(a.stderr).toContain('unknown stage "later"');
    const b = await runCli(['--count', 'many', 'inet:1@127.0.0.1']);
    expect(b.code).toBe(2);
    expect(b.stderr).toContain('--count must be an integer >= 1, got "many"');
    const c = await runCli([]);
    expect(c.code).toBe(2);
    expect(c.stderr).toContain('missing SOCKET');
  });

  it('exits 1 when no milter listens or the file cannot be read', async () => {
    const spec = await freeInetSpec();
    const a = await runCli(['--json', spec], MESSAGE);
    expect(a.code).toBe(1);
    expect(JSON.parse(a.stdout)).toMatchObject({ code: 'ECONNREFUSED', exitCode: 1 });
    const b = await runCli([spec, '/nonexistent/message.eml']);
    expect(b.code).toBe(1);
    expect(b.stderr).toContain('cannot read the message from /nonexistent/message.eml');
    const c = await runCli(['--count', '3', spec], MESSAGE);
    expect(c.code).toBe(1);
    expect(c.stdout).toMatch(/decisions: none; errors: 3 \(first: connect ECONNREFUSED/);
  });
});
