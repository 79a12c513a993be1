// examples/template.ts: every callback; IPv4/IPv6/unix clients, a refused
// HELO, ESMTP parameters, a Bcc by addrcpt, async eom.
import { afterAll, afterEach, beforeAll, describe, expect, it } from 'vitest';

import { ENGINES, freeInetSpec, stopAll } from '../helpers';
import { api, dist, memoryLogger, startExample, testing } from './common';

const { TemplateMilter, config } = dist('examples/template');
const { TestCtx, MilterClient, applyActions } = testing;
const { CONTINUE, REJECT, M_CONNECT, ADDHDRS, ADDRCPT } = api;

const MESSAGE = 'From: a@client.example\r\nTo: b@example.org\r\nSubject: hello\r\n\r\nline one\r\nline two\r\n';

afterEach(async () => {
  config.bcc = undefined;
  config.hostnames = [];
  await stopAll();
});

describe('template with TestCtx', () => {
  const log = memoryLogger();
  const original = TemplateMilter.logger;
  beforeAll(() => {
    TemplateMilter.logger = log;
  });
  afterAll(() => {
    TemplateMilter.logger = original;
  });

  it('negotiates every step (nothing negotiated away) and ADDHDRS|ADDRCPT', async () => {
    const t = new TestCtx(TemplateMilter);
    await t.negotiate();
    expect(t.actions).toBe(ADDHDRS | ADDRCPT);
    // Every optional callback is overridden: no SMFIP_NO* bit is asked for.
    const { P_NOCONNECT, P_NOHELO, P_NOMAIL, P_NORCPT, P_NOBODY, P_NOHDRS, P_NOEOH, P_NOUNKNOWN, P_NODATA } = api;
    expect(t.steps & (P_NOCONNECT | P_NOHELO | P_NOMAIL | P_NORCPT | P_NOBODY | P_NOHDRS | P_NOEOH | P_NOUNKNOWN | P_NODATA)).toBe(0);
    await t.close();
  });

  it.each([
    ['inet', { address: '192.0.2.7', port: 2525 }, 'mx.client.example [192.0.2.7]:2525'],
    ['inet6', { address: '2001:db8::25', port: 2525 }, 'mx.client.example [IPv6:2001:db8::25]:2525'],
    ['inet6', { address: '::ffff:192.0.2.7', port: 2525 }, 'mx.client.example [192.0.2.7]:2525'],
    ['unix', { path: '/run/submit.sock' }, 'mx.client.example (local, /run/submit.sock)'],
    ['unknown', null, 'mx.client.example (address unknown)'],
  ])('describes a %s client', async (family, hostaddr, expected) => {
    const t = new TestCtx(TemplateMilter);
    expect(await t.connect('mx.client.example', family as any, hostaddr as any)).toBe(CONTINUE);
    expect(t.milter!.client).toBe(expected);
    expect(log.lines).toContain(`connect from ${expected}`);
    await t.close();
  });

  it('refuses a HELO with our own name or a bare address, with its own reply; local clients may', async () => {
    const t = new TestCtx(TemplateMilter, { macros: { [M_CONNECT]: { j: 'mx.example.org' } } });
    await t.connect('c.example', 'inet', { address: '192.0.2.1', port: 1 });
    expect(await t.helo('MX.example.org')).toBe(REJECT);
    expect(t.reply).toEqual({ rcode: '550', xcode: '5.7.1', lines: ['You are not MX.example.org'] });
    expect(await t.helo('192.0.2.1')).toBe(REJECT);
    expect(t.reply!.lines[0]).toBe('HELO 192.0.2.1: an address literal goes in brackets, e.g. [192.0.2.1]');
    expect(await t.helo('[192.0.2.1]')).toBe(CONTINUE);
    await t.close();

    const local = new TestCtx(TemplateMilter, { macros: { [M_CONNECT]: { j: 'mx.example.org' } } });
    await local.connect('localhost', 'unix', { path: '' });
    expect(await local.helo('mx.example.org')).toBe(CONTINUE);
    await local.close();
  });

  it('reads ESMTP parameters, counts, adds X-Template and the Bcc in an async eom', async () => {
    config.bcc = '<archive@example.org>';
    const t = new TestCtx(TemplateMilter);
    const st = await t.feedMessage(MESSAGE, { from: '<a@client.example>', fromParams: ['SIZE=123', 'BODY=8BITMIME', 'SMTPUTF8'], rcpts: ['<b@example.org>'] });
    expect(st).toBe(CONTINUE);
    expect(log.lines).toContain('mail from <a@client.example> {"SIZE":"123","BODY":"8BITMIME","SMTPUTF8":true}');
    expect(t.headerChanges).toEqual([{ op: 'add', name: 'X-Template', value: '3 headers, 20 body bytes, message 1 on this connection' }]);
    expect(t.addedRecipients).toEqual([{ rcpt: '<archive@example.org>' }]);
    expect(t.resultEnvelope().recipients).toEqual(['<b@example.org>', '<archive@example.org>']);
    // A second message on the same connection starts with fresh per-message state.
    await t.feedMessage('Subject: again\r\n\r\nx\r\n');
    expect(t.headerChanges).toEqual([{ op: 'add', name: 'X-Template', value: '1 headers, 3 body bytes, message 2 on this connection' }]);
    expect(log.lines).toContain('eom <sender@example.com> -> <rcpt@example.com> "again"');
    expect(await t.unknown('XYZZY')).toBe(CONTINUE);
    expect(log.lines).toContain('unknown command XYZZY');
    await t.close();
  });
});

describe.each(ENGINES)('template over the wire (%s engine, MilterClient)', (engine) => {
  it('adds the Bcc and header, and refuses a bad HELO with the reply text', async () => {
    const spec = await freeInetSpec();
    const proc = await startExample('template', spec, { env: { TEMPLATE_BCC: '<archive@example.org>', TEMPLATE_HOSTNAMES: 'mx.example.org' }, engine });
    await proc.waitForOutput(`template: listening on ${spec}`);

    const c = await MilterClient.connect(spec);
    const r = await c.sendMessage({
      client: { hostname: 'c.example', family: 'inet6', address: '2001:db8::7', port: 2525 },
      helo: 'c.example',
      from: ['<a@client.example>', 'SIZE=123'],
      rcpt: ['<b@example.org>'],
      message: MESSAGE,
    });
    expect(r.decision).toBe('continue');
    const out = applyActions(MESSAGE, r.actions, { sender: '<a@client.example>', recipients: ['<b@example.org>'] });
    expect(out.envelope.recipients).toEqual(['<b@example.org>', '<archive@example.org>']);
    expect(out.message.toString()).toContain('X-Template: 3 headers, 20 body bytes, message 1 on this connection\r\n');
    await c.close();
    await proc.waitForOutput('connect from c.example [IPv6:2001:db8::7]:2525');

    const bad = await MilterClient.connect(spec);
    const h = await bad.sendMessage({ client: { hostname: 'c.example', address: '192.0.2.9' }, helo: 'mx.example.org', from: '<a@b.example>', rcpt: ['<b@example.org>'], message: MESSAGE });
    expect(h.decision).toBe('reject');
    expect(h.stoppedAt).toBe('helo');
    expect(h.helo!.reply).toMatchObject({ rcode: '550', xcode: '5.7.1', text: 'You are not mx.example.org' });
    await bad.close();
  });
});
