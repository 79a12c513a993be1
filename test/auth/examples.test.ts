// examples/dkim-sign.ts, examples/dmarc.ts and examples/srs.ts: with TestCtx
// (fixture DNS) and over the wire on both engines (MilterClient).
import { afterAll, afterEach, beforeEach, describe, expect, it } from 'vitest';

import { ENGINES, freeInetSpec, stopAll } from '../helpers';
import { api, dist, memoryLogger, startExample, testing } from '../examples/common';
import { OFFLINE, OUTGOING, PHISH, SIGNER_ENV, ZONE } from './common';

const auth = dist<typeof import('../../src/auth/index')>('src/auth/index');
const sign = dist('examples/dkim-sign');
const dmarc = dist('examples/dmarc');
const srs = dist('examples/srs');
const { TestCtx, MilterClient, applyActions } = testing;
const { ACCEPT, CONTINUE, REJECT, TEMPFAIL, M_ENVFROM, P_HDR_LEADSPC, parseAuthResults } = api;

const zone = auth.staticResolver(ZONE);
const OUTSIDE = { hostname: 'mx.evil.example', family: 'inet' as const, hostaddr: { address: '203.0.113.5', port: 5000 }, helo: 'mx.evil.example' };

/** Verify a delivered message as the next hop would. */
async function dkimOf(message: string | Buffer) {
  return (await auth.verifyMessage(message, { authservId: 'mx.next', resolver: zone })).dkim.map((d) => `${d.selector}=${d.result}`);
}

const logger = memoryLogger();
for (const m of [sign.DkimSignMilter, dmarc.DmarcMilter, srs.SrsMilter]) m.logger = logger;
afterEach(() => stopAll());

describe('dkim-sign with TestCtx', () => {
  beforeEach(() => sign.configure({ ...SIGNER_ENV, DKIM_CANONICALIZATION: 'simple/simple' }));

  it('signs mail from a trusted network with both keys, on top, over the exact header bytes (simple/simple)', async () => {
    const t = new TestCtx(sign.DkimSignMilter);
    expect(await t.feedMessage(OUTGOING, { from: '<alice@example.com>' })).toBe(CONTINUE);
    expect(t.steps & P_HDR_LEADSPC).toBe(P_HDR_LEADSPC);
    expect(t.headerChanges.map((h: { op: string; name: string; index?: number }) => `${h.op} ${h.name} ${h.index}`)).toEqual([
      'insert DKIM-Signature 0',
      'insert DKIM-Signature 0',
    ]);
    const out = t.resultMessage();
    expect(out.toString()).toMatch(/^DKIM-Signature: v=1; a=rsa-sha256; c=simple\/simple; d=example\.com;\r\n h=/);
    expect(out.toString()).toContain('Subject:  two  spaces\r\nCc:\tcarol@example.org\r\nX-Tight:no space\r\n');
    expect(await dkimOf(out)).toEqual(['rsa2026=pass', 'ed2026=pass']);
    // The proof cuts both ways: one byte of the header changed, simple fails.
    expect(await dkimOf(out.toString().replace('Subject:  two', 'Subject: two'))).toEqual(['rsa2026=fail', 'ed2026=fail']);
    await t.close();
  });

  it('signs for an authenticated client elsewhere; lets other clients pass unsigned (ACCEPT at MAIL)', async () => {
    const a = new TestCtx(sign.DkimSignMilter, { macros: { [M_ENVFROM]: { '{auth_authen}': 'alice' } } });
    expect(await a.feedMessage(OUTGOING, { ...OUTSIDE, from: '<alice@example.com>' })).toBe(CONTINUE);
    expect(a.headerChanges).toHaveLength(2);
    await a.close();
    const o = new TestCtx(sign.DkimSignMilter);
    expect(await o.feedMessage(OUTGOING, { ...OUTSIDE, from: '<alice@example.com>' })).toBe(ACCEPT);
    expect(o.headerChanges).toEqual([]);
    await o.close();
  });

  it('does not sign a From domain without a key, or a message with two From headers', async () => {
    const t = new TestCtx(sign.DkimSignMilter);
    await t.feedMessage(OUTGOING.replace('alice@example.com>', 'alice@other.example>'), {});
    expect(t.headerChanges).toEqual([]);
    await t.close();
    const two = new TestCtx(sign.DkimSignMilter);
    await two.feedMessage(`From: x@example.com\r\n${OUTGOING}`, {});
    expect(two.headerChanges).toEqual([]);
    await two.close();
  });

  it('signs a ~3 MiB message (the body hashed as it arrives, never kept)', async () => {
    const body = 'x'.repeat(998) + '\r\n';
    const big = OUTGOING.replace('Hello Bob,', body.repeat(3 * 1024)); // ~3 MiB, in many body chunks
    const t = new TestCtx(sign.DkimSignMilter);
    expect(await t.feedMessage(big, {})).toBe(CONTINUE);
    expect(await dkimOf(t.resultMessage())).toEqual(['rsa2026=pass', 'ed2026=pass']);
    await t.close();
  });

  it('signs the fields DKIM_SIGN_HEADERS names and oversigns DKIM_OVERSIGN_HEADERS', async () => {
    sign.configure({ ...SIGNER_ENV, DKIM_SIGN_HEADERS: 'From:Subject', DKIM_OVERSIGN_HEADERS: 'From' });
    const t = new TestCtx(sign.DkimSignMilter);
    await t.feedMessage(OUTGOING, {});
    const out = t.resultMessage().toString('latin1');
    await t.close();
    const h = [...out.replace(/\r\n[ \t]/g, ' ').matchAll(/; h=([^;]+);/g)].map((m) => m[1].replace(/\s+/g, ''));
    expect(h).toEqual(['Subject:From:From', 'Subject:From:From']);
    expect(await dkimOf(out)).toEqual(['rsa2026=pass', 'ed2026=pass']);
    expect(await dkimOf(out.replace('To: bob@', 'To: eve@'))).toEqual(['rsa2026=pass', 'ed2026=pass']); // To is not signed
    expect(await dkimOf(out.replace('From: Alice', 'From: x@example.com\r\nFrom: Alice'))).toEqual(['rsa2026=fail', 'ed2026=fail']);
  });

  it('reads an OpenDKIM KeyTable and SigningTable named in a DKIM_CONFIG file', async () => {
    const fs = await import('node:fs');
    const path = await import('node:path');
    const { KEY_DIR, RSA_KEYFILE, ED_KEYFILE } = await import('./common');
    fs.writeFileSync(path.join(KEY_DIR, 'KeyTable'), `rsa example.com:rsa2026:${RSA_KEYFILE}\ned %:ed2026:${ED_KEYFILE}\n`);
    fs.writeFileSync(path.join(KEY_DIR, 'SigningTable'), '*@example.com rsa\n*@example.com ed\n');
    const conf = path.join(KEY_DIR, 'dkim.conf');
    fs.writeFileSync(conf, `# dkim-sign\nDKIM_KEYTABLE=refile:${path.join(KEY_DIR, 'KeyTable')}\nDKIM_SIGNINGTABLE=${path.join(KEY_DIR, 'SigningTable')}\nDKIM_MULTIPLE=yes\n`);
    sign.configure({ DKIM_CONFIG: conf });
    const t = new TestCtx(sign.DkimSignMilter);
    await t.feedMessage(OUTGOING, {});
    expect(await dkimOf(t.resultMessage())).toEqual(['rsa2026=pass', 'ed2026=pass']);
    await t.close();
    fs.writeFileSync(conf, 'DKIM_MULTIPLE=maybe\n');
    expect(() => sign.configure({ DKIM_CONFIG: conf, ...SIGNER_ENV })).toThrow(/DKIM_MULTIPLE="maybe" is invalid/);
  });

  it('refuses incomplete settings with a message naming them', () => {
    expect(() => sign.configure({ DKIM_KEYTABLE: '/x' })).toThrow(/DKIM_KEYTABLE and DKIM_SIGNINGTABLE go together/);
    expect(() => sign.configure({ DKIM_DOMAIN: 'example.com', DKIM_SELECTOR: 'a,b', DKIM_KEYFILE: '/x' })).toThrow(/as many selectors as key files/);
    expect(() => sign.configure({ ...SIGNER_ENV, DKIM_ON_ERROR: 'maybe' })).toThrow(/DKIM_ON_ERROR="maybe" is invalid/);
    expect(() => sign.configure({ ...SIGNER_ENV, DKIM_CANONICALIZATION: 'loose' })).toThrow(/DKIM_CANONICALIZATION: DKIM canonicalization "loose" is invalid/);
    expect(() => sign.configure({ ...SIGNER_ENV, DKIM_SIGN_HEADERS: 'Subject:To' })).toThrow(/DKIM_SIGN_HEADERS: .* lacks From/);
    expect(() => sign.configure({ ...SIGNER_ENV, DKIM_OVERSIGN_HEADERS: 'Frôm' })).toThrow(/DKIM_OVERSIGN_HEADERS: .*"Frôm" is not a header field name/);
  });
});

describe('dmarc with TestCtx (fixture DNS)', () => {
  beforeEach(() => {
    dmarc.config.resolver = zone;
    dmarc.configure({ DMARC_AUTHSERV_ID: 'mx.example.org' });
    dmarc.config.random = () => 0;
  });
  afterAll(() => {
    dmarc.config.resolver = undefined;
  });
  const arOf = (t: InstanceType<typeof TestCtx>) => {
    const added = t.headerChanges.filter((h: { name: string }) => h.name === 'Authentication-Results');
    expect(added).toHaveLength(1);
    return parseAuthResults(added[0].value);
  };
  const summary = (ar: { results: { method: string; result: string }[] }) => ar.results.map((r) => `${r.method}=${r.result}`);

  it('one Authentication-Results header on top: spf, dkim, dmarc; a DMARC failure is recorded, not refused, by default', async () => {
    const t = new TestCtx(dmarc.DmarcMilter);
    expect(await t.feedMessage(PHISH, { ...OUTSIDE, from: '<x@evil.example>' })).toBe(CONTINUE);
    const ar = arOf(t);
    expect(ar.authservId).toBe('mx.example.org');
    expect(summary(ar)).toEqual(['spf=none', 'spf=none', 'dkim=none', 'dmarc=fail']);
    expect(t.resultMessage().toString()).toMatch(/^Authentication-Results: mx\.example\.org;\r\n\tspf=none/);
    await t.close();
  });

  it('with DMARC_REJECT, p=reject failures are refused 550 5.7.1; aligned signed mail passes', async () => {
    dmarc.configure({ DMARC_AUTHSERV_ID: 'mx.example.org', DMARC_REJECT: '1' });
    const t = new TestCtx(dmarc.DmarcMilter);
    expect(await t.feedMessage(PHISH, { ...OUTSIDE, from: '<x@evil.example>' })).toBe(REJECT);
    expect(t.reply).toEqual({ rcode: '550', xcode: '5.7.1', lines: ['Message rejected: DMARC policy of bank.example is reject'] });
    await t.close();
    // simple/simple over headers with odd spacing: the verifier must see the raw bytes too (HDR_LEADSPC).
    sign.configure({ ...SIGNER_ENV, DKIM_CANONICALIZATION: 'simple/simple' });
    const s = new TestCtx(sign.DkimSignMilter);
    await s.feedMessage(OUTGOING, {});
    const signed = s.resultMessage();
    await s.close();
    const p = new TestCtx(dmarc.DmarcMilter);
    expect(await p.feedMessage(signed, { ...OUTSIDE, from: '<x@evil.example>' })).toBe(CONTINUE);
    expect(summary(arOf(p))).toEqual(['spf=none', 'spf=none', 'dkim=pass', 'dkim=pass', 'dmarc=pass']);
    await p.close();
  });

  it('with DMARC_QUARANTINE, p=quarantine failures are quarantined; authenticated clients are not judged', async () => {
    dmarc.configure({ DMARC_AUTHSERV_ID: 'mx.example.org', DMARC_QUARANTINE: '1', DMARC_REJECT: '1' });
    const q = new TestCtx(dmarc.DmarcMilter);
    expect(await q.feedMessage(PHISH.replace(/bank\.example/g, 'shop.example'), { ...OUTSIDE, from: '<x@evil.example>' })).toBe(CONTINUE);
    expect(q.quarantineReason).toBe('DMARC policy of shop.example is quarantine');
    await q.close();
    const a = new TestCtx(dmarc.DmarcMilter, { macros: { [M_ENVFROM]: { '{auth_authen}': 'ceo' } } });
    expect(await a.feedMessage(PHISH, { ...OUTSIDE, from: '<ceo@bank.example>' })).toBe(CONTINUE);
    expect(summary(arOf(a))).toEqual(['auth=pass', 'dkim=none']);
    await a.close();
  });

  it('SPF_REJECT_FAIL refuses an SPF fail at MAIL FROM with 550 5.7.23', async () => {
    dmarc.configure({ DMARC_AUTHSERV_ID: 'mx.example.org', SPF_REJECT_FAIL: '1' });
    const t = new TestCtx(dmarc.DmarcMilter);
    expect(await t.feedMessage(PHISH, { ...OUTSIDE, from: '<ceo@bank.example>' })).toBe(REJECT);
    expect(t.reply).toEqual({ rcode: '550', xcode: '5.7.23', lines: ['SPF: 203.0.113.5 may not send mail for ceo@bank.example'] });
    await t.close();
  });

  it('deletes Authentication-Results that claim our authserv-id, last first, and keeps others', async () => {
    const forged =
      'Authentication-Results: other.example; spf=pass smtp.mailfrom=x@y\r\n' +
      'Authentication-Results: MX.example.org; dmarc=pass header.from=bank.example\r\n' +
      'Authentication-Results: mx.example.org;\r\n\tdkim=pass\r\n' +
      PHISH;
    const t = new TestCtx(dmarc.DmarcMilter);
    await t.feedMessage(forged, { ...OUTSIDE, from: '<x@evil.example>' });
    expect(t.headerChanges.slice(0, 2)).toEqual([
      { op: 'delete', name: 'Authentication-Results', index: 3 },
      { op: 'delete', name: 'Authentication-Results', index: 2 },
    ]);
    const out = t.resultMessage().toString();
    expect(out.match(/^Authentication-Results:/gm)).toHaveLength(2);
    expect(out).not.toContain('dmarc=pass header.from=bank.example');
    await t.close();
  });

  it('a DNS outage: temperror everywhere and CONTINUE, or 451 4.4.3 with DMARC_TEMPFAIL; each lookup bounded by DNS_TIMEOUT', async () => {
    dmarc.config.resolver = () => new Promise(() => undefined); // a server that never answers
    dmarc.configure({ DMARC_AUTHSERV_ID: 'mx.example.org', DMARC_REJECT: '1', DNS_TIMEOUT: '150' });
    const t = new TestCtx(dmarc.DmarcMilter);
    const t0 = Date.now();
    expect(await t.feedMessage(PHISH, { ...OUTSIDE, from: '<x@evil.example>' })).toBe(CONTINUE);
    expect(Date.now() - t0).toBeLessThan(5000);
    expect(summary(arOf(t))).toEqual(['spf=temperror', 'spf=temperror', 'dkim=none', 'dmarc=temperror']);
    await t.close();
    dmarc.config.resolver = () => new Promise(() => undefined);
    dmarc.configure({ DMARC_AUTHSERV_ID: 'mx.example.org', DMARC_TEMPFAIL: '1', DNS_TIMEOUT: '150' });
    const f = new TestCtx(dmarc.DmarcMilter);
    expect(await f.feedMessage(PHISH, { ...OUTSIDE, from: '<x@evil.example>' })).toBe(TEMPFAIL);
    expect(f.reply).toEqual({ rcode: '451', xcode: '4.4.3', lines: ['DMARC check of bank.example failed temporarily (DNS), try again later'] });
    await f.close();
    expect(dmarc.dnsMetrics.snapshot().lookups.TXT.timeout).toBeGreaterThan(0);
  });

  it('hostile input: broken DKIM-Signature, ARC and From headers, 8-bit bytes, a bare LF; one header, no exception', async () => {
    const hostile =
      'DKIM-Signature: v=1; a=rsa-sha256; d=bank.example; s=sel; b=!!!; bh=???\r\n' +
      'DKIM-Signature: garbage\r\n' +
      'ARC-Seal: i=1; cv=pass; b=x\r\n' +
      'ARC-Message-Signature: i=9; h=from\r\n' +
      'From: <<<@@@>>>, "\xff\xfe" <ceo@bank.example>\r\n' +
      'Subject: \x01 bad\n\tfolded with a bare LF\r\n\r\nbody\r\n';
    const t = new TestCtx(dmarc.DmarcMilter);
    expect(await t.feedMessage(Buffer.from(hostile, 'latin1'), { ...OUTSIDE, from: '<x@evil.example>' })).toBe(CONTINUE);
    const ar = arOf(t);
    expect(summary(ar)).toEqual(['spf=none', 'spf=none', 'dkim=neutral', 'dkim=permerror', 'arc=fail', 'dmarc=permerror']);
    expect(ar.results[3].comment).toBe('unparseable DKIM-Signature');
    expect(ar.results[5].comment).toBe('more than one From address');
    expect(ar.results.find((r: { method: string }) => r.method === 'arc')?.result).toBe('fail');
    await t.close();
  });

  it('with an ARC key, seals: ARC-Seal, ARC-Message-Signature, ARC-Authentication-Results above Authentication-Results; the next hop validates it', async () => {
    const { generateKeyPairSync } = await import('node:crypto');
    const k = generateKeyPairSync('rsa', { modulusLength: 2048 });
    dmarc.config.seal = auth.signingKey('fwd.example.org', 'arc', k.privateKey.export({ type: 'pkcs8', format: 'pem' }));
    try {
      const t = new TestCtx(dmarc.DmarcMilter);
      await t.feedMessage(PHISH, { ...OUTSIDE, from: '<x@evil.example>' });
      const out = t.resultMessage().toString();
      expect(out.split('\r\n').filter((l: string) => /^[A-Z]/i.test(l)).map((l: string) => l.split(':')[0]).slice(0, 4)).toEqual([
        'ARC-Seal',
        'ARC-Message-Signature',
        'ARC-Authentication-Results',
        'Authentication-Results',
      ]);
      const next = await auth.verifyMessage(out, {
        authservId: 'mx.next',
        resolver: auth.staticResolver({ ...ZONE, 'arc._domainkey.fwd.example.org TXT': [`v=DKIM1; k=rsa; p=${k.publicKey.export({ type: 'spki', format: 'der' }).toString('base64')}`] }),
      });
      expect(next.arc).toMatchObject({ result: 'pass', i: 1 });
      await t.close();
    } finally {
      dmarc.config.seal = undefined;
    }
  });
});

describe('srs with TestCtx', () => {
  const now = Date.now;
  beforeEach(() => srs.configure({ SRS_DOMAIN: 'fwd.example.org', SRS_SECRETS: 'tops3cr3t', SRS_EXCLUDE_DOMAINS: 'example.org,.local.example' }));
  afterAll(() => void (Date.now = now));

  it('rewrites a forwarded sender (chgfrom), keeps the null sender and excluded domains', async () => {
    const t = new TestCtx(srs.SrsMilter);
    await t.feedMessage(PHISH, { from: '<alice@example.com>', rcpts: ['<user@example.org>'] });
    const sender = t.resultEnvelope().sender;
    expect(sender).toMatch(/^<SRS0=[^=]{4}=[A-Z2-7]{2}=example\.com=alice@fwd\.example\.org>$/);
    expect(srs.config.srs.reverse(sender.slice(1, -1))).toBe('alice@example.com');
    await t.close();
    for (const from of ['<>', '<bob@example.org>', '<carol@a.local.example>']) {
      const k = new TestCtx(srs.SrsMilter);
      await k.feedMessage(PHISH, { from });
      expect(k.newSender).toBeUndefined();
      await k.close();
    }
  });

  it('a bounce to an SRS address goes to the original sender (delrcpt + addrcpt); a forged one is refused at RCPT', async () => {
    const bounceTo = srs.config.srs.forward('alice@example.com');
    const t = new TestCtx(srs.SrsMilter);
    await t.feedMessage('Subject: failure notice\r\n\r\nbounced\r\n', { from: '<>', rcpts: [`<${bounceTo}>`] });
    expect(t.resultEnvelope().recipients).toEqual(['<alice@example.com>']);
    await t.close();
    const f = new TestCtx(srs.SrsMilter);
    const forged = bounceTo.replace(/^SRS0=..../, 'SRS0=AAAA');
    expect(await f.feedMessage('Subject: x\r\n\r\nx\r\n', { from: '<>', rcpts: [`<${forged}>`] })).toBe(REJECT);
    expect(f.reply).toEqual({ rcode: '550', xcode: '5.1.1', lines: [`Invalid SRS address <${forged}>`] });
    await f.close();
  });

  it('refuses missing settings', () => {
    expect(() => srs.configure({})).toThrow(/needs SRS_DOMAIN/);
    expect(() => srs.configure({ SRS_DOMAIN: 'fwd.example.org' })).toThrow(/needs a secret/);
    expect(() => srs.configure({ SRS_DOMAIN: 'fwd.example.org', SRS_SECRET: '/nonexistent/secret' })).toThrow(/SRS_SECRET: \/nonexistent\/secret cannot be read/);
  });
});

describe.each(ENGINES)('auth examples over the wire (%s engine, MilterClient)', (engine) => {
  it('dkim-sign: two DKIM-Signature inserts that verify after applyActions', async () => {
    const spec = await freeInetSpec();
    await startExample('dkim-sign', spec, { env: { ...SIGNER_ENV, DKIM_CANONICALIZATION: 'simple/simple' }, engine });
    const c = await MilterClient.connect(spec);
    const r = await c.sendMessage({ from: '<alice@example.com>', rcpt: ['<bob@example.org>'], message: OUTGOING, quit: true });
    expect(r.decision).toBe('continue');
    expect(r.negotiation.steps & P_HDR_LEADSPC).toBe(P_HDR_LEADSPC);
    expect(r.actions.map((a: { type: string }) => a.type)).toEqual(['insheader', 'insheader']);
    const out = applyActions(OUTGOING, r.actions, undefined, { leadingSpace: true }).message;
    expect(await dkimOf(out)).toEqual(['rsa2026=pass', 'ed2026=pass']);
  });

  it('dmarc: rejects a p=reject failure with 550 5.7.1 (DMARC_REJECT=1)', async () => {
    const spec = await freeInetSpec();
    const p = await startExample('dmarc', spec, {
      script: OFFLINE,
      env: { AUTH_TEST_EXAMPLE: 'dmarc', AUTH_TEST_ZONE: JSON.stringify(ZONE), DMARC_AUTHSERV_ID: 'mx.example.org', DMARC_REJECT: '1', DNS_METRICS_PORT: '0' },
      engine,
    });
    const c = await MilterClient.connect(spec);
    const r = await c.sendMessage({ client: { hostname: 'mx.evil.example', address: '203.0.113.5', port: 5000 }, helo: 'mx.evil.example', from: '<x@evil.example>', rcpt: ['<victim@example.org>'], message: PHISH, quit: true });
    expect(r.decision).toBe('reject');
    expect(r.eom?.reply).toMatchObject({ rcode: '550', xcode: '5.7.1' });
    // The DNS metrics, as an operator scrapes them (DNS_METRICS_PORT).
    const url = (await p.waitForOutput(/DNS metrics on (http:\S+)/, { timeout: 5000, stream: 'stdout' }))[1];
    const text = await (await fetch(url)).text();
    expect(text).toMatch(/^nodemilter_dns_lookups_total\{type="TXT",outcome="ok"\} [1-9]\d*$/m);
    expect(text).toMatch(/^nodemilter_dns_lookup_duration_seconds_count [1-9]\d*$/m);
  });

  it('srs: chgfrom to an SRS0 address; a bounce to it becomes delrcpt + addrcpt of the sender', async () => {
    const spec = await freeInetSpec();
    await startExample('srs', spec, { env: { SRS_DOMAIN: 'fwd.example.org', SRS_SECRETS: 'tops3cr3t' }, engine });
    const c = await MilterClient.connect(spec);
    const r = await c.sendMessage({ from: '<alice@example.com>', rcpt: ['<user@example.org>'], message: PHISH });
    expect(r.actions).toMatchObject([{ type: 'chgfrom' }]);
    const srsAddr = /<(SRS0=[^>]+)>/.exec((r.actions[0] as { sender: string }).sender)![1];
    const b = await c.sendMessage({ from: '<>', rcpt: [`<${srsAddr}>`], message: 'Subject: failure\r\n\r\nbounce\r\n', quit: true });
    expect(b.actions.map((a: { type: string }) => a.type)).toEqual(['delrcpt', 'addrcpt']);
    expect(applyActions('Subject: x\r\n\r\n', b.actions, { sender: '<>', recipients: [`<${srsAddr}>`] }).envelope.recipients).toEqual(['<alice@example.com>']);
  });
});
