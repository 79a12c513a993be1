// examples/auth.ts: SPF (MAIL FROM and HELO) and DKIM with mailauth, and an
// Authentication-Results header. DNS is a fixture zone (staticResolver), so
// everything runs offline; the DKIM key pair is made here and the message
// signed with mailauth's signer.
import { generateKeyPairSync } from 'node:crypto';
import * as path from 'node:path';
import { dkimSign } from 'mailauth';
import { afterAll, afterEach, beforeAll, beforeEach, describe, expect, it } from 'vitest';

import { ENGINES, freeInetSpec, stopAll } from '../helpers';
import { FIXTURES, api, dist, memoryLogger, startExample, testing } from './common';

const { AuthMilter, config, staticResolver } = dist('examples/auth');
const { TestCtx, MilterClient, applyActions } = testing;
const { CONTINUE, REJECT, M_ENVFROM, parseAuthResults } = api;

const { privateKey, publicKey } = generateKeyPairSync('rsa', { modulusLength: 2048 });
const ZONE: Record<string, string[]> = {
  'client.example TXT': ['v=spf1 ip4:192.0.2.0/24 -all'],
  'mx.client.example TXT': ['v=spf1 a -all'],
  'mx.client.example A': ['192.0.2.10'],
  'forged.example TXT': ['v=spf1 -all'],
  'sel._domainkey.client.example TXT': [`v=DKIM1; k=rsa; p=${publicKey.export({ type: 'spki', format: 'der' }).toString('base64')}`],
};
const CLIENT = { hostname: 'mx.client.example', family: 'inet' as const, hostaddr: { address: '192.0.2.10', port: 5000 }, helo: 'mx.client.example' };
const UNSIGNED =
  'From: Alice <alice@client.example>\r\nTo: bob@example.org\r\nSubject: report\r\nDate: Mon, 2 Jun 2025 10:00:00 +0000\r\nMessage-ID: <r1@client.example>\r\n\r\nThe report is ready.\r\n';
let SIGNED = '';

beforeAll(async () => {
  const { signatures } = await dkimSign(UNSIGNED, {
    signatureData: [{ signingDomain: 'client.example', selector: 'sel', privateKey: privateKey.export({ type: 'pkcs8', format: 'pem' }) }],
  } as any);
  SIGNED = signatures + UNSIGNED;
});

afterEach(async () => {
  await stopAll();
});

/** The Authentication-Results the milter inserted, parsed. */
function authResults(t: InstanceType<typeof TestCtx>) {
  const added = t.headerChanges.filter((h: { name: string }) => h.name === 'Authentication-Results');
  expect(added).toHaveLength(1);
  expect(added[0]).toMatchObject({ op: 'insert', index: 0 });
  return parseAuthResults(added[0].value);
}
const summary = (ar: { results: { method: string; result: string; properties: { type: string; name: string; value: string }[] }[] }) =>
  ar.results.map((r) => [r.method, r.result, ...r.properties.map((p) => `${p.type}.${p.name}=${p.value}`)].join(' '));

describe('auth with TestCtx (fixture DNS)', () => {
  const original = AuthMilter.logger;
  beforeAll(() => {
    AuthMilter.logger = memoryLogger();
  });
  beforeEach(() => {
    config.resolver = staticResolver(ZONE);
    config.authservId = 'mx.example.org';
    config.rejectSpfFail = false;
  });
  afterAll(() => {
    AuthMilter.logger = original;
    config.resolver = undefined;
  });

  it('SPF pass for HELO and MAIL FROM, DKIM pass: one Authentication-Results on top', async () => {
    const t = new TestCtx(AuthMilter);
    expect(await t.feedMessage(SIGNED, { ...CLIENT, from: '<alice@client.example>' })).toBe(CONTINUE);
    const ar = authResults(t);
    expect(ar.authservId).toBe('mx.example.org');
    expect(summary(ar)).toEqual([
      'spf pass smtp.helo=mx.client.example',
      'spf pass smtp.mailfrom=alice@client.example',
      'dkim pass header.d=client.example header.s=sel',
    ]);
    expect(ar.results[1].comment).toBe('mx.example.org: domain of alice@client.example designates 192.0.2.10 as permitted sender');
    expect(t.resultMessage().toString()).toMatch(/^Authentication-Results: mx\.example\.org;\r\n\tspf=pass/);
    await t.close();
  });

  it('a changed signed header fails DKIM, a changed body is neutral (as mailauth rates it), unsigned is none', async () => {
    const h = new TestCtx(AuthMilter);
    await h.feedMessage(SIGNED.replace('Subject: report', 'Subject: invoice'), { ...CLIENT, from: '<alice@client.example>' });
    expect(authResults(h).results[2]).toMatchObject({ method: 'dkim', result: 'fail', comment: 'bad signature' });
    await h.close();
    const t = new TestCtx(AuthMilter);
    await t.feedMessage(SIGNED.replace('ready', 'late'), { ...CLIENT, from: '<alice@client.example>' });
    expect(authResults(t).results[2]).toMatchObject({ method: 'dkim', result: 'neutral', comment: 'body hash did not verify' });
    await t.close();
    const u = new TestCtx(AuthMilter);
    await u.feedMessage(UNSIGNED, { ...CLIENT, from: '<alice@client.example>' });
    expect(authResults(u).results[2]).toMatchObject({ method: 'dkim', result: 'none', comment: 'message not signed' });
    await u.close();
  });

  it('SPF fail is recorded, or refused with 550 5.7.23 when rejectSpfFail is set (not for an authenticated user)', async () => {
    const t = new TestCtx(AuthMilter);
    await t.feedMessage(UNSIGNED, { ...CLIENT, helo: 'unknown.example', from: '<ceo@forged.example>' });
    expect(summary(authResults(t))).toEqual(['spf none smtp.helo=unknown.example', 'spf fail smtp.mailfrom=ceo@forged.example', 'dkim none']);
    await t.close();

    config.rejectSpfFail = true;
    const r = new TestCtx(AuthMilter);
    expect(await r.feedMessage(UNSIGNED, { ...CLIENT, from: '<ceo@forged.example>' })).toBe(REJECT);
    expect(r.reply).toEqual({ rcode: '550', xcode: '5.7.23', lines: ['SPF: 192.0.2.10 may not send mail for ceo@forged.example'] });
    await r.close();

    const a = new TestCtx(AuthMilter, { macros: { [M_ENVFROM]: { '{auth_authen}': 'ceo' } } });
    expect(await a.feedMessage(UNSIGNED, { ...CLIENT, from: '<ceo@forged.example>' })).toBe(CONTINUE);
    expect(summary(authResults(a))[0]).toBe('auth pass smtp.auth=ceo');
    await a.close();
  });

  it('the null sender is checked as postmaster@HELO; a local client gets no SPF result', async () => {
    const t = new TestCtx(AuthMilter);
    await t.feedMessage(UNSIGNED, { ...CLIENT, from: '<>' });
    expect(summary(authResults(t))).toEqual(['spf pass smtp.helo=mx.client.example', 'dkim none']);
    await t.close();
    const l = new TestCtx(AuthMilter);
    await l.feedMessage(UNSIGNED, { hostname: 'localhost', family: 'unix', hostaddr: { path: '' }, from: '<alice@client.example>' });
    expect(summary(authResults(l))).toEqual(['dkim none']);
    await l.close();
  });

  it('deletes Authentication-Results that claim our authserv-id (forged), last first, and keeps others', async () => {
    const forged =
      'Authentication-Results: other.example; spf=pass smtp.mailfrom=x@y\r\n' +
      'Authentication-Results: MX.example.org; dkim=pass header.d=bank.example\r\n' +
      'Authentication-Results: mx.example.org;\r\n\tspf=pass\r\n' +
      UNSIGNED;
    const t = new TestCtx(AuthMilter);
    await t.feedMessage(forged, { ...CLIENT, from: '<alice@client.example>' });
    expect(t.headerChanges.slice(0, 2)).toEqual([
      { op: 'delete', name: 'Authentication-Results', index: 3 },
      { op: 'delete', name: 'Authentication-Results', index: 2 },
    ]);
    const out = t.resultMessage().toString();
    expect(out.match(/^Authentication-Results:/gm)).toHaveLength(2);
    expect(out).toContain('Authentication-Results: other.example; spf=pass smtp.mailfrom=x@y\r\n');
    expect(out).not.toContain('bank.example');
    await t.close();
  });

  it('a DNS failure is a temperror, never an exception', async () => {
    config.resolver = async () => {
      throw Object.assign(new Error('server failure'), { code: 'ESERVFAIL' });
    };
    const t = new TestCtx(AuthMilter);
    expect(await t.feedMessage(SIGNED, { ...CLIENT, from: '<alice@client.example>' })).toBe(CONTINUE);
    expect(authResults(t).results.map((r: { result: string }) => r.result)).toEqual(['temperror', 'temperror', 'temperror']);
    await t.close();
  });
});

describe.each(ENGINES)('auth over the wire (%s engine, MilterClient, fixture DNS)', (engine) => {
  it('inserts the Authentication-Results header over the protocol', async () => {
    const spec = await freeInetSpec();
    await startExample('auth', spec, {
      script: path.join(FIXTURES, 'auth-offline.cjs'),
      env: { AUTH_TEST_ZONE: JSON.stringify(ZONE), AUTH_SERVID: 'mx.example.org' },
      engine,
    });
    const c = await MilterClient.connect(spec);
    const r = await c.sendMessage({
      client: { hostname: 'mx.client.example', address: '192.0.2.10', port: 5000 },
      helo: 'mx.client.example',
      from: '<alice@client.example>',
      rcpt: ['<bob@example.org>'],
      message: SIGNED,
      quit: true,
    });
    expect(r.decision).toBe('continue');
    expect(r.actions.map((a: { type: string }) => a.type)).toEqual(['insheader']);
    const out = applyActions(SIGNED, r.actions).message.toString();
    const first = /^Authentication-Results: ([^\r]*(?:\r\n\t[^\r]*)*)\r\n/.exec(out);
    expect(first).not.toBeNull();
    expect(summary(parseAuthResults(first![1]))).toEqual([
      'spf pass smtp.helo=mx.client.example',
      'spf pass smtp.mailfrom=alice@client.example',
      'dkim pass header.d=client.example header.s=sel',
    ]);
  });
});
