/**
 * End to end with sendmail: the Postfix scenarios (test/postfix.test.ts)
 * against Debian's sendmail 8.17 run from its unpacked packages
 * (test/helpers/sendmail.ts, scripts/fetch-sendmail.sh) with
 * INPUT_MAIL_FILTER pointing at the e2e milter (test/fixtures/e2e/milter.cjs,
 * a Base subclass served by runmilter), relaying to an smtp-sink.
 *
 * Without root or the packages this file fails, unless
 * NODEMILTER_SKIP_SENDMAIL=1 is set outside CI.
 */
import * as path from 'path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';

import { ENGINES, FIXTURES, checkEngine, e2eSessionOf, engineEnv, freeInetSpec, splitMessage, startProcess, type E2eEvent, type RunningProcess } from './helpers';
import { SENDMAIL_HOSTNAME, mayskipSendmail, sendmailUnavailable, startSendmail, type SendmailInstance } from './helpers/sendmail';

const E2E_MILTER = path.join(FIXTURES, 'e2e', 'milter.cjs');
// eslint-disable-next-line @typescript-eslint/no-require-imports
const { REPLACED_BODY, REJECT_TEXT, RCPT_TEXT } = require(E2E_MILTER);

const unavailable = sendmailUnavailable();
const skip = unavailable !== undefined && mayskipSendmail();

function message(subject: string): string {
  return [
    'From: Alice <alice@client.example>',
    'To: bob@sink.example',
    `Subject: ${subject}`,
    'Date: Sun, 29 Nov 2026 04:00:00 +0000',
    `Message-ID: <${Math.random().toString(36).slice(2)}@client.example>`,
    'X-Folded: first line',
    '\tsecond line',
    'X-Tight:no space',
    '',
    'Hello Bob.',
    '.a line starting with a dot',
    '',
  ].join('\r\n');
}

describe.skipIf(skip).each(ENGINES)('sendmail end to end, %s engine', (engine) => {
  let sm: SendmailInstance | undefined;
  let milter: RunningProcess | undefined;

  const sessionOf = (marker: string): E2eEvent[] => e2eSessionOf(milter!.stdout, marker);

  beforeAll(async () => {
    if (unavailable) return;
    const spec = await freeInetSpec();
    milter = await startProcess(process.execPath, { args: [E2E_MILTER, spec], env: engineEnv(engine), socket: spec, stopSignal: 'SIGKILL' });
    checkEngine(milter.pid, engine);
    sm = await startSendmail({ milter: spec });
  }, 60_000);

  afterAll(async () => {
    await sm?.stop();
    await milter?.stop();
  }, 20_000);

  it('sendmail can run here: root, postfix\'s smtp-sink, the unpacked packages (NODEMILTER_SKIP_SENDMAIL=1 skips outside CI)', () => {
    expect(unavailable).toBeUndefined();
  });

  it('the generated sendmail.cf declares the milter (X line) and its macros', () => {
    expect(sm!.cf).toMatch(/^Xnodemilter, S=inet:\d+@127\.0\.0\.1, F=T, T=C:5s;S:10s;R:10s;E:1m$/m);
    expect(sm!.cf).toMatch(/^O InputMailFilters=nodemilter$/m);
    expect(sm!.cf).toMatch(/^O Milter\.macros\.connect=j, _, \{daemon_name\}, \{if_name\}, \{if_addr\}$/m);
  });

  it('delivers the header the milter added; the milter saw sendmail\'s view of the message and its macros', async () => {
    const t = await sm!.send({ from: '<alice@client.example>', rcpts: ['<bob@sink.example>'], message: message('plain one') });
    expect(t.end?.raw).toMatch(/^250 2\.0\.0 \w+ Message accepted for delivery$/);
    const [d] = await sm!.waitDelivered(t.queueId!);
    expect(d.rcptArgs.map((r) => r.split(' ')[0])).toEqual(['<bob@sink.example>']);
    const [head, body] = splitMessage(d.message);
    // Seven headers: sendmail does not pass its own Received header to the milter either.
    expect(head).toMatch(/\r\nX-E2E: seen 7 headers$/);
    expect(head).toMatch(new RegExp(`^Received: from client\\.test\\.example \\(localhost \\[127\\.0\\.0\\.1\\]\\)\r\n\tby ${SENDMAIL_HOSTNAME.replace(/\./g, '\\.')} \\(8\\.17\\.1\\.9/8\\.17\\.1\\.9\\) with ESMTP id ${t.queueId}`));
    expect(head).toContain('\r\nX-Folded: first line\r\n\tsecond line\r\n');
    expect(head).toContain('\r\nX-Tight:no space\r\n');
    expect(body).toBe('Hello Bob.\r\n.a line starting with a dot\r\n');

    const evs = sessionOf('plain one');
    expect(evs.filter((e) => e.ev === 'header').map((e) => [e.name, e.value])).toEqual([
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
    // sendmail's default Milter.macros.connect (no {if_addr} on loopback).
    expect(connect.macros).toEqual({ j: SENDMAIL_HOSTNAME, _: 'localhost [127.0.0.1]', '{daemon_name}': 'MTA', '{if_name}': 'localhost' });
    expect(evs.find((e) => e.ev === 'helo')).toMatchObject({ name: 'client.test.example' });
    expect(evs.find((e) => e.ev === 'envfrom')!.macros).toMatchObject({
      i: t.queueId,
      '{mail_addr}': 'alice@client.example',
      '{mail_host}': '[127.0.0.1]',
      '{mail_mailer}': 'relay',
    });
    expect(evs.find((e) => e.ev === 'envrcpt')!.macros).toMatchObject({ '{rcpt_addr}': 'bob@sink.example', '{rcpt_host}': '[127.0.0.1]', '{rcpt_mailer}': 'relay' });
    expect(evs.find((e) => e.ev === 'eom')!.macros.i).toBe(t.queueId);
  });

  it('refuses a message the milter rejects at end of message, with the milter\'s reply text', async () => {
    const t = await sm!.send({ from: '<alice@client.example>', rcpts: ['<bob@sink.example>'], message: message('[reject] please') });
    expect(t.end?.raw).toBe(`550 5.7.1 ${REJECT_TEXT}`);
    expect(t.queueId).toBeUndefined();
  });

  it('refuses a recipient the milter rejects at RCPT, with its reply text, and delivers to the others', async () => {
    const t = await sm!.send({ from: '<alice@client.example>', rcpts: ['<refused@sink.example>', '<bob@sink.example>'], message: message('partly refused') });
    // sendmail puts the address in front of the milter's text.
    expect(t.rcpt.map((r) => r.raw)).toEqual([`550 5.7.1 <refused@sink.example>... ${RCPT_TEXT}`, '250 2.1.5 <bob@sink.example>... Recipient ok']);
    const [d] = await sm!.waitDelivered(t.queueId!);
    expect(d.rcptArgs.map((r) => r.split(' ')[0])).toEqual(['<bob@sink.example>']);
  });

  it('delivers the body the milter replaced, the header it changed and the recipient it added', async () => {
    const t = await sm!.send({ from: '<alice@client.example>', rcpts: ['<bob@sink.example>'], message: message('[replace] [tag] [addrcpt] all') });
    expect(t.end?.code).toBe(250);
    const found = await sm!.waitDelivered(t.queueId!);
    const rcpts = found.flatMap((d) => d.rcptArgs.map((r) => r.split(' ')[0])).sort();
    expect(rcpts).toEqual(['<added@sink.example>', '<bob@sink.example>']);
    const [head, body] = splitMessage(found[0].message);
    expect(body).toBe(REPLACED_BODY);
    expect(head).toContain('\r\nSubject: [e2e] [replace] [tag] [addrcpt] all\r\n');
  });

  it('puts a message the milter quarantines into the quarantine queue, with the reason', async () => {
    const t = await sm!.send({ from: '<alice@client.example>', rcpts: ['<bob@sink.example>'], message: message('[quarantine] me') });
    expect(t.end?.code).toBe(250);
    // sendmail writes the queue file before it answers the final dot.
    expect(sm!.quarantined()).toContainEqual({ queueId: t.queueId, reason: 'held by e2e' });
  });

  it('tempfails mail when the milter is down (F=T)', async () => {
    await milter!.stop();
    const t = await sm!.send({ from: '<alice@client.example>', rcpts: ['<bob@sink.example>'], message: message('milter down') });
    // sendmail could not reach the milter at connect; it refuses at MAIL.
    expect(t.mail.raw).toBe('451 4.3.2 Please try again later');
    expect(t.rcpt).toEqual([]);
  });
});
