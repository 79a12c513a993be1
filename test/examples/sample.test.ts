// examples/sample.ts: pymilter's sample.py on nodemilter. TestCtx runs the
// compiled class in process; the wire tests run dist/examples/sample.js and
// act as the MTA with MilterClient.
import * as fs from 'node:fs';
import * as path from 'node:path';
import { afterAll, afterEach, beforeAll, describe, expect, it } from 'vitest';

import { ENGINES, stopAll, tmpSocketSpec } from '../helpers';
import { FIXTURES, api, dist, memoryLogger, startExample, testing } from './common';

const { SampleMilter } = dist('examples/sample');
const { TestCtx, MilterClient, applyActions } = testing;
const { parseMime } = dist('src/mime/index');
const { ACCEPT, CONTINUE, REJECT, M_ENVFROM, M_CONNECT, P_NR_MAIL, P_NR_CONN, P_NOBODY, ADDHDRS, CHGHDRS, CHGBODY } = api;

const MESSAGE = fs.readFileSync(path.join(FIXTURES, 'sample-attachments.eml'));
const PLAIN = 'From: a@client.example\r\nTo: b@example.org\r\nSubject: lunch\r\n\r\nAt noon?\r\n';

afterEach(async () => {
  await stopAll();
});

describe('sample with TestCtx', () => {
  const quiet = memoryLogger();
  const original = SampleMilter.logger;
  beforeAll(() => {
    SampleMilter.logger = quiet;
  });
  afterAll(() => {
    SampleMilter.logger = original;
  });

  it('defangs setup.exe, strips the script, mirrors the header change and replaces the body', async () => {
    const t = new TestCtx(SampleMilter);
    const st = await t.feedMessage(MESSAGE, { from: '<alice@client.example>', rcpts: ['<bob@example.org>'] });
    expect(st).toBe(ACCEPT);
    expect(t.headerChanges).toEqual([{ op: 'add', name: 'X-Defanged', value: 'setup.exe, 1 script' }]);
    expect(t.replacedBody).toBeDefined();
    const out = parseMime(t.resultMessage());
    expect(out.getnames()).toEqual(['numbers.pdf']);
    expect(out.get('X-Defanged')).toBe('setup.exe, 1 script');
    const text = t.resultMessage().toString('latin1');
    expect(text).not.toMatch(/<script/i);
    expect(text).toContain('setup.exe');           // named in the notice that replaced it
    expect(text).toContain('JVBERi0xLjQKJSBub3QgcmVhbGx5IGEgcGRmCg=='); // the pdf is untouched
    await t.close();
  });

  it('leaves a clean message alone', async () => {
    const t = new TestCtx(SampleMilter);
    expect(await t.feedMessage(PLAIN)).toBe(CONTINUE);
    expect(t.headerChanges).toEqual([]);
    expect(t.replacedBody).toBeUndefined();
    expect(t.resultMessage().toString()).toBe(PLAIN);
    await t.close();
  });

  it('refuses a big5 Subject at the header with its own 550 reply', async () => {
    const t = new TestCtx(SampleMilter);
    const st = await t.feedMessage('From: x@client.example\r\nSubject: =?big5?B?pOWk5Q==?=\r\n\r\nhi\r\n');
    expect(st).toBe(REJECT);
    expect(t.reply).toEqual({ rcode: '550', xcode: '5.7.1', lines: ['We do not read mail in this charset'] });
    expect(t.resultsOf('eom')).toEqual([]);
    await t.close();
  });

  it('refuses MAILER-DAEMON as a recipient and keeps the others', async () => {
    const t = new TestCtx(SampleMilter);
    const st = await t.feedMessage(PLAIN, { rcpts: ['<MAILER-DAEMON@example.org>', '<bob@example.org>'] });
    expect(st).toBe(CONTINUE);
    expect(t.resultsOf('envrcpt').map((r: { status: number }) => r.status)).toEqual([REJECT, CONTINUE]);
    expect(t.recipients).toEqual(['<bob@example.org>']);
    await t.close();
  });

  it('asks for {auth_authen} at MAIL FROM, does not make the MTA wait there, and reads the user', async () => {
    const log = memoryLogger();
    SampleMilter.logger = log;
    try {
      const t = new TestCtx(SampleMilter, { macros: { [M_ENVFROM]: { '{auth_authen}': 'alice' }, [M_CONNECT]: { j: 'mx.example.org' } } });
      await t.feedMessage(PLAIN, { from: '<alice@example.org>' });
      expect(t.symlists[M_ENVFROM]).toEqual(['{auth_authen}']);
      expect(t.steps & P_NR_MAIL).toBe(P_NR_MAIL);
      expect(t.steps & P_NR_CONN).toBe(P_NR_CONN);
      expect(t.steps & P_NOBODY).toBe(0);
      expect(t.actions & (ADDHDRS | CHGHDRS | CHGBODY)).toBe(ADDHDRS | CHGHDRS | CHGBODY);
      expect(log.lines).toContain('mail from <alice@example.org> (authenticated as alice)');
      await t.close();
    } finally {
      SampleMilter.logger = quiet;
    }
  });
});

describe.each(ENGINES)('sample over the wire (%s engine, MilterClient)', (engine) => {
  it('logs where it listens, defangs over the protocol, refuses by header rule, and stops on SIGTERM', async () => {
    const spec = tmpSocketSpec();
    const proc = await startExample('sample', spec, { stopSignal: 'SIGTERM', engine });
    await proc.waitForOutput(`sample: listening on ${spec}`);

    const c = await MilterClient.connect(spec);
    expect(c.negotiation!.steps & P_NR_MAIL).toBe(P_NR_MAIL);
    expect(c.negotiation!.symlists[M_ENVFROM]).toEqual(['{auth_authen}']);
    const r = await c.sendMessage({
      client: { hostname: 'client.example', address: '192.0.2.10', port: 40000 },
      helo: 'client.example',
      from: '<alice@client.example>',
      rcpt: ['<bob@example.org>'],
      message: MESSAGE,
      macros: { envfrom: { '{auth_authen}': 'alice' } },
    });
    expect(r.decision).toBe('accept');
    expect(r.actions.filter((a: { type: string }) => a.type !== 'replbody').map((a: any) => [a.type, a.name, a.value])).toEqual([
      ['addheader', 'X-Defanged', 'setup.exe, 1 script'],
    ]);
    const out = applyActions(MESSAGE, r.actions);
    expect(parseMime(out.message).getnames()).toEqual(['numbers.pdf']);
    expect(out.message.toString('latin1')).not.toMatch(/<script/i);

    const rej = await c.sendMessage({ from: '<x@client.example>', rcpt: ['<bob@example.org>'], message: 'Subject: =?ISO-2022-JP?B?GyRCJUYlOSVIGyhC?=\r\n\r\nhi\r\n' });
    expect(rej.decision).toBe('reject');
    expect(rej.stoppedAt).toBe('header');
    expect(rej.headers.at(-1)!.reply).toMatchObject({ rcode: '550', xcode: '5.7.1', text: 'We do not read mail in this charset' });
    await c.close();

    const res = await proc.stop('SIGTERM');
    expect(res.code).toBe(0);
    expect(res.stdout).toMatch(/sample: SIGTERM: draining/);
    expect(res.stdout).toMatch(/sample: stopped/);
    expect(fs.existsSync(spec.slice('unix:'.length))).toBe(false);
  });
});
