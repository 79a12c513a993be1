// examples/fromguard.ts: a From: in our domains needs SMTP AUTH or a trusted client.
import { afterAll, afterEach, beforeAll, beforeEach, describe, expect, it } from 'vitest';

import { ENGINES, freeInetSpec, stopAll } from '../helpers';
import { api, dist, memoryLogger, startExample, testing } from './common';

const { FromGuardMilter, config, fromAddresses } = dist('examples/fromguard');
const { TestCtx, MilterClient, applyActions } = testing;
const { CONTINUE, REJECT, M_ENVFROM, IpList } = api;

const OUTSIDE = { hostname: 'mx.outside.example', family: 'inet' as const, hostaddr: { address: '203.0.113.5', port: 4000 } };
const msg = (from: string) => `From: ${from}\r\nTo: bob@example.org\r\nSubject: pay this\r\n\r\nPlease.\r\n`;

afterEach(async () => {
  await stopAll();
});

describe('fromguard with TestCtx', () => {
  const original = FromGuardMilter.logger;
  beforeAll(() => {
    FromGuardMilter.logger = memoryLogger();
  });
  beforeEach(() => {
    config.domains = ['example.org'];
    config.action = 'reject';
    config.trusted = new IpList(['198.51.100.0/24']);
  });
  afterAll(() => {
    FromGuardMilter.logger = original;
  });

  it('refuses From: in our domain from an unauthenticated outside client, with 550 5.7.1', async () => {
    const t = new TestCtx(FromGuardMilter);
    const st = await t.feedMessage(msg('"The CEO" <ceo@Mail.Example.ORG>'), { ...OUTSIDE, from: '<x@outside.example>' });
    expect(st).toBe(REJECT);
    expect(t.reply).toEqual({ rcode: '550', xcode: '5.7.1', lines: ['From: ceo@Mail.Example.ORG needs authentication (SMTP AUTH) to be sent here'] });
    await t.close();
  });

  it('lets it through with SMTP AUTH, from a trusted network, or from a local socket', async () => {
    const auth = new TestCtx(FromGuardMilter, { macros: { [M_ENVFROM]: { '{auth_authen}': 'ceo' } } });
    expect(await auth.feedMessage(msg('ceo@example.org'), OUTSIDE)).toBe(CONTINUE);
    expect(auth.symlists[M_ENVFROM]).toEqual(['{auth_authen}']);
    await auth.close();
    const trusted = new TestCtx(FromGuardMilter);
    expect(await trusted.feedMessage(msg('ceo@example.org'), { hostname: 'web', family: 'inet', hostaddr: { address: '198.51.100.20', port: 1 } })).toBe(CONTINUE);
    await trusted.close();
    const local = new TestCtx(FromGuardMilter);
    expect(await local.feedMessage(msg('ceo@example.org'), { hostname: 'localhost', family: 'unix', hostaddr: { path: '' } })).toBe(CONTINUE);
    await local.close();
  });

  it('is not fooled by display names, and checks every address of the field', async () => {
    const a = new TestCtx(FromGuardMilter);
    expect(await a.feedMessage(msg('"ceo@example.org" <someone@outside.example>'), OUTSIDE)).toBe(CONTINUE);
    await a.close();
    const b = new TestCtx(FromGuardMilter);
    expect(await b.feedMessage(msg('"someone@outside.example" <ceo@example.org>'), OUTSIDE)).toBe(REJECT);
    await b.close();
    const c = new TestCtx(FromGuardMilter);
    expect(await c.feedMessage(msg('a@outside.example, (boss) ceo@example.org'), OUTSIDE)).toBe(REJECT);
    await c.close();
    expect(fromAddresses('"Doe, J" <j@example.org>, k@example.net (K)')).toEqual(['j@example.org', 'k@example.net']);
  });

  it('rewrite: keeps the original in X-Original-From and puts the envelope sender in From', async () => {
    config.action = 'rewrite';
    const t = new TestCtx(FromGuardMilter);
    const st = await t.feedMessage(msg('"The CEO" <ceo@example.org>'), { ...OUTSIDE, from: '<bounce@outside.example>' });
    expect(st).toBe(CONTINUE);
    expect(t.headerChanges).toEqual([
      { op: 'add', name: 'X-Original-From', value: '"The CEO" <ceo@example.org>' },
      { op: 'change', name: 'From', index: 1, value: '"The CEO <ceo@example.org> (unverified)" <bounce@outside.example>' },
    ]);
    expect(t.resultMessage().toString()).toMatch(/^From: "The CEO <ceo@example.org> \(unverified\)" <bounce@outside.example>\r\n/m);
    await t.close();
  });

  it('rewrite falls back to refusing when the envelope sender is empty or ours', async () => {
    config.action = 'rewrite';
    for (const from of ['<>', '<other@example.org>']) {
      const t = new TestCtx(FromGuardMilter);
      expect(await t.feedMessage(msg('ceo@example.org'), { ...OUTSIDE, from })).toBe(REJECT);
      await t.close();
    }
  });
});

describe.each(ENGINES)('fromguard over the wire (%s engine, MilterClient)', (engine) => {
  it('rewrites the From: of an unauthenticated outside client and leaves an authenticated one alone', async () => {
    const spec = await freeInetSpec();
    await startExample('fromguard', spec, { env: { FROMGUARD_DOMAINS: 'example.org', FROMGUARD_ACTION: 'rewrite' }, engine });
    const client = { hostname: 'mx.outside.example', address: '203.0.113.5', port: 4000 };
    const c = await MilterClient.connect(spec);
    const message = msg('ceo@example.org');
    const r = await c.sendMessage({ client, from: '<bounce@outside.example>', rcpt: ['<bob@example.org>'], message });
    expect(r.decision).toBe('continue');
    const out = applyActions(message, r.actions).message.toString();
    expect(out).toContain('X-Original-From: ceo@example.org\r\n');
    expect(out).toContain('From: "ceo@example.org (unverified)" <bounce@outside.example>\r\n');
    await c.close();

    const a = await MilterClient.connect(spec);
    const ok = await a.sendMessage({ client, from: '<ceo@example.org>', rcpt: ['<bob@example.org>'], message, macros: { envfrom: { '{auth_authen}': 'ceo' } } });
    expect(ok.decision).toBe('continue');
    expect(ok.actions).toEqual([]);
    await a.close();
  });

  it('refuses in reject mode with the reply on the header step', async () => {
    const spec = await freeInetSpec();
    await startExample('fromguard', spec, { env: { FROMGUARD_DOMAINS: 'example.org' }, engine });
    const c = await MilterClient.connect(spec);
    const r = await c.sendMessage({ client: { address: '203.0.113.5' }, from: '<x@outside.example>', rcpt: ['<bob@example.org>'], message: msg('ceo@example.org'), quit: true });
    expect(r.decision).toBe('reject');
    expect(r.stoppedAt).toBe('header');
    expect(r.headers.at(-1)!.reply).toMatchObject({ rcode: '550', xcode: '5.7.1', text: 'From: ceo@example.org needs authentication (SMTP AUTH) to be sent here' });
  });
});
