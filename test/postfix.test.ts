/**
 * End to end with a real MTA: a private Postfix (test/helpers/postfix.ts)
 * with smtpd_milters pointing at the e2e milter (test/fixtures/e2e/milter.cjs,
 * a Base subclass served by runmilter in a child process, once on each
 * engine), relaying to an smtp-sink. Checks what Postfix delivers and what
 * the SMTP client sees.
 *
 * Without Postfix (or root) this file fails, unless NODEMILTER_SKIP_POSTFIX=1
 * is set outside CI.
 */
import * as path from 'path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { ENGINES, FIXTURES, checkEngine, e2eSessionOf, engineEnv, freeInetSpec, splitMessage, startProcess, type E2eEvent, type RunningProcess } from './helpers';
import { mayskipPostfix, postfixUnavailable, startPostfix, type PostfixInstance } from './helpers/postfix';

const E2E_MILTER = path.join(FIXTURES, 'e2e', 'milter.cjs');
// eslint-disable-next-line @typescript-eslint/no-var-requires
const { REPLACED_BODY, REJECT_TEXT, RCPT_TEXT } = require(E2E_MILTER);

const unavailable = postfixUnavailable();
const skip = unavailable !== undefined && mayskipPostfix();

function message(subject: string, extra = ''): string {
  return [
    'From: Alice <alice@client.example>',
    'To: bob@sink.example',
    `Subject: ${subject}`,
    'Date: Sun, 29 Nov 2026 04:00:00 +0000',
    `Message-ID: <${Math.random().toString(36).slice(2)}@client.example>`,
    'X-Folded: first line',
    '\tsecond line',
    'X-Tight:no space',
    extra,
  ]
    .filter((l) => l !== '')
    .concat(['', 'Hello Bob.', '.a line starting with a dot', ''])
    .join('\r\n');
}

describe.skipIf(skip).each(ENGINES)('Postfix end to end (%s engine)', (engine) => {
  let pf: PostfixInstance | undefined;
  let milter: RunningProcess | undefined;

  const sessionOf = (marker: string): E2eEvent[] => e2eSessionOf(milter!.stdout, marker);

  beforeAll(async () => {
    if (unavailable) return;
    const spec = await freeInetSpec();
    milter = await startProcess(process.execPath, { args: [E2E_MILTER, spec], env: engineEnv(engine), socket: spec, stopSignal: 'SIGKILL' });
    checkEngine(milter.pid, engine);
    pf = await startPostfix({ milter: spec });
  }, 30_000);

  afterAll(async () => {
    await pf?.stop();
    await milter?.stop();
  }, 20_000);

  it('Postfix is installed and we are root (set NODEMILTER_SKIP_POSTFIX=1 to skip outside CI)', () => {
    expect(unavailable).toBeUndefined();
  });

  it('delivers the header the milter added; the milter saw Postfix\'s view of the message', async () => {
    const t = await pf!.send({ from: '<alice@client.example>', rcpts: ['<bob@sink.example>'], message: message('plain one') });
    expect(t.end?.code).toBe(250);
    const [d] = await pf!.waitDelivered(t.queueId!);
    expect(d.rcptArgs.map((r) => r.split(' ')[0])).toEqual(['<bob@sink.example>']);
    const [head, body] = splitMessage(d.message);
    // Seven headers: Postfix does not pass its own Received header to smtpd milters.
    expect(head).toMatch(/\r\nX-E2E: seen 7 headers$/);
    expect(head).toMatch(/^Received: from client\.test\.example \(localhost \[127\.0\.0\.1\]\)\r\n\tby mta\.test\.example \(Postfix\) with ESMTP id /);
    expect(head).toContain('\r\nX-Folded: first line\r\n\tsecond line\r\n');
    expect(head).toContain('\r\nX-Tight:no space\r\n');
    expect(body).toBe('Hello Bob.\r\n.a line starting with a dot\r\n');

    const evs = sessionOf('plain one');
    const headers = evs.filter((e) => e.ev === 'header').map((e) => [e.name, e.value]);
    expect(headers).toEqual([
      ['From', 'Alice <alice@client.example>'],
      ['To', 'bob@sink.example'],
      ['Subject', 'plain one'],
      ['Date', 'Sun, 29 Nov 2026 04:00:00 +0000'],
      ['Message-ID', expect.stringMatching(/^<.*@client\.example>$/)],
      ['X-Folded', 'first line\n\tsecond line'],
      ['X-Tight', 'no space'],
    ]);
    const connect = evs.find((e) => e.ev === 'connect')!;
    expect(connect).toMatchObject({ hostname: 'localhost', family: 'inet', hostaddr: { address: '127.0.0.1' } });
    // Postfix's default milter_*_macros, as the milter could read them with getsymval.
    expect(connect.macros).toEqual({ j: 'mta.test.example', _: 'localhost [127.0.0.1]', v: expect.stringMatching(/^Postfix /), '{daemon_name}': 'mta.test.example', '{daemon_addr}': '127.0.0.1' });
    expect(evs.find((e) => e.ev === 'helo')).toMatchObject({ name: 'client.test.example' });
    expect(evs.find((e) => e.ev === 'envfrom')!.macros).toMatchObject({ '{mail_addr}': 'alice@client.example' });
    expect(evs.find((e) => e.ev === 'envrcpt')!.macros).toMatchObject({ '{rcpt_addr}': 'bob@sink.example' });
    expect(evs.find((e) => e.ev === 'eom')!.macros.i).toBe(t.queueId);
  });

  it('refuses a message the milter rejects at end of message, with the milter\'s reply text', async () => {
    const t = await pf!.send({ from: '<alice@client.example>', rcpts: ['<bob@sink.example>'], message: message('[reject] please') });
    expect(t.end?.code).toBe(550);
    expect(t.end?.raw).toBe(`550 5.7.1 ${REJECT_TEXT}`);
    expect(t.queueId).toBeUndefined();
  });

  it('refuses a recipient the milter rejects at RCPT, with its reply text, and delivers to the others', async () => {
    const t = await pf!.send({
      from: '<alice@client.example>',
      rcpts: ['<refused@sink.example>', '<bob@sink.example>'],
      message: message('partly refused'),
    });
    expect(t.rcpt.map((r) => r.raw)).toEqual([`550 5.7.1 ${RCPT_TEXT}`, '250 2.1.5 Ok']);
    expect(t.end?.code).toBe(250);
    const [d] = await pf!.waitDelivered(t.queueId!);
    expect(d.rcptArgs.map((r) => r.split(' ')[0])).toEqual(['<bob@sink.example>']);
  });

  it('delivers the body the milter replaced, the header it changed and the recipient it added', async () => {
    const t = await pf!.send({ from: '<alice@client.example>', rcpts: ['<bob@sink.example>'], message: message('[replace] [tag] [addrcpt] all') });
    expect(t.end?.code).toBe(250);
    const found = await pf!.waitDelivered(t.queueId!);
    const rcpts = found.flatMap((d) => d.rcptArgs.map((r) => r.split(' ')[0])).sort();
    expect(rcpts).toEqual(['<added@sink.example>', '<bob@sink.example>']);
    const [head, body] = splitMessage(found[0].message);
    expect(body).toBe(REPLACED_BODY);
    expect(head).toContain('\r\nSubject: [e2e] [replace] [tag] [addrcpt] all\r\n');
  });

  it('holds a message the milter quarantines', async () => {
    const t = await pf!.send({ from: '<alice@client.example>', rcpts: ['<bob@sink.example>'], message: message('[quarantine] me') });
    expect(t.end?.code).toBe(250);
    let held: string[] = [];
    for (let i = 0; i < 50 && !held.includes(t.queueId!); i++) {
      held = await pf!.heldQueueIds();
      if (!held.includes(t.queueId!)) await new Promise((r) => setTimeout(r, 100));
    }
    expect(held).toContain(t.queueId);
    expect(pf!.log()).toMatch(new RegExp(`${t.queueId}: milter-hold: END-OF-MESSAGE from localhost\\[127\\.0\\.0\\.1\\]: milter triggers HOLD action;`));
    // Postfix logs no quarantine reason: "held by e2e" appears nowhere.
    expect(pf!.log()).not.toContain('held by e2e');
  });

  it('tempfails mail when the milter is down (milter_default_action = tempfail)', async () => {
    await milter!.stop();
    const t = await pf!.send({ from: '<alice@client.example>', rcpts: ['<bob@sink.example>'], message: message('milter down') });
    const refused = [t.mail, ...t.rcpt, t.data, t.end].find((r) => r && r.code >= 400);
    expect(refused?.code).toBe(451);
    expect(refused?.raw).toMatch(/^451 4\.7\.1 /);
  });
});
