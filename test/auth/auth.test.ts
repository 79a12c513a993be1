// nodemilter/auth's pieces: SRS against postsrsd's answers, DKIM against
// RFC 8463's and RFC 6376's vectors, DMARC policy, ARC sealing, the tables
// and the resolver (timeout, cache, metrics). DNS is a fixture zone.
import { createHash, createPublicKey, generateKeyPairSync } from 'node:crypto';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { describe, expect, it } from 'vitest';

import {
  DnsMetrics,
  SigningTable,
  Srs,
  SrsError,
  arcSeal,
  createResolver,
  dkimSign,
  dmarcDisposition,
  headerFields,
  loadPrivateKey,
  ownAuthResults,
  readSettings,
  signingKey,
  staticResolver,
  verifyMessage,
} from '../../src/auth/index';
import { InvalidArgumentError } from '../../src/errors';
import * as V from './vectors';

const tag = (sig: string, name: string) => new RegExp(`[;\\s]${name}=([^;]+)`).exec(sig.replace(/\r\n[ \t]/g, ' '))?.[1].replace(/\s+/g, '');
const dkimRecord = (pub: ReturnType<typeof generateKeyPairSync>['publicKey'], type: 'rsa' | 'ed25519') =>
  `v=DKIM1; k=${type}; p=${type === 'rsa' ? pub.export({ type: 'spki', format: 'der' }).toString('base64') : pub.export({ type: 'spki', format: 'der' }).subarray(12).toString('base64')}`;

describe('SRS (postsrsd 1.10 vectors)', () => {
  it.each(V.POSTSRSD_FORWARD)('forward %j %s', (settings, input, expected) => {
    const srs = new Srs({ ...settings, now: () => V.POSTSRSD_NOW });
    expect(srs.forward(input)).toBe(expected);
  });

  it.each(V.POSTSRSD_REVERSE)('reverse %j %s', (settings, input, expected) => {
    const srs = new Srs({ ...settings, now: () => V.POSTSRSD_NOW });
    if (typeof expected === 'string') expect(srs.reverse(input)).toBe(expected);
    else {
      expect(() => srs.reverse(input)).toThrow(SrsError);
      try {
        srs.reverse(input);
      } catch (err) {
        expect((err as SrsError).reason).toBe(expected.reason);
      }
    }
  });

  it('forward then reverse gives the sender back, through two forwarders (SRS0 then SRS1)', () => {
    const now = () => V.POSTSRSD_NOW;
    const a = new Srs({ domain: 'a.example', secrets: ['one'], now });
    const b = new Srs({ domain: 'b.example', secrets: ['two'], now });
    const s0 = a.forward('"odd local"@origin.example')!;
    const s1 = b.forward(s0)!;
    expect(s1).toMatch(/^SRS1=[^=]{4}=a\.example==/);
    expect(b.reverse(s1)).toBe(s0);
    expect(a.reverse(s0)).toBe('"odd local"@origin.example');
    expect(a.isSrs(s0)).toBe(true);
    expect(a.isSrs(s1)).toBe(false); // at b.example
    expect(a.forward('')).toBeUndefined(); // the null sender
    expect(a.forward('postmaster')).toBeUndefined();
  });

  it('refuses bad settings with a typed error naming the value', () => {
    expect(() => new Srs({ domain: 'x', secrets: ['s'] })).toThrow(/SRS domain "x" is invalid/);
    expect(() => new Srs({ domain: 'a.example', secrets: [] })).toThrow(InvalidArgumentError);
    expect(() => new Srs({ domain: 'a.example', secrets: ['s'], separator: '#' as '=' })).toThrow(/separator "#"/);
    expect(() => new Srs({ domain: 'a.example', secrets: ['s'], maxAge: 0 })).toThrow(/maxAge 0/);
  });
});

describe('DKIM vectors', () => {
  it("RFC 8463 A.3: both signatures (Ed25519 and RSA) verify with A.2's records", async () => {
    const v = await verifyMessage(V.RFC8463_SIGNATURES + V.RFC8463_UNSIGNED, { authservId: 'mx.test', resolver: staticResolver(V.RFC8463_ZONE) });
    expect(v.dkim.map((d) => [d.selector, d.result])).toEqual([
      ['brisbane', 'pass'],
      ['test', 'pass'],
    ]);
    expect(v.results.filter((r) => r.method === 'dkim').map((r) => r.properties.find((p) => p.name === 'a')?.value)).toEqual(['ed25519-sha256', 'rsa-sha256']);
  });

  it('RFC 8463 A.3 with a changed Subject fails both', async () => {
    const msg = (V.RFC8463_SIGNATURES + V.RFC8463_UNSIGNED).replace('Is dinner ready?', 'Is lunch ready?');
    const v = await verifyMessage(msg, { authservId: 'mx.test', resolver: staticResolver(V.RFC8463_ZONE) });
    expect(v.dkim.map((d) => d.result)).toEqual(['fail', 'fail']);
  });

  it("RFC 8463's Ed25519 seed gives A.2's public key, signs deterministically, and verifies", async () => {
    const key = loadPrivateKey(V.RFC8463_ED25519_SEED);
    expect(key.algorithm).toBe('ed25519-sha256');
    expect(createPublicKey(key.privateKey).export({ type: 'spki', format: 'der' }).subarray(12).toString('base64')).toBe(V.RFC8463_ED25519_PUBLIC);
    const k = signingKey('football.example.com', 'brisbane', V.RFC8463_ED25519_SEED);
    const signTime = new Date(1528637909_000);
    const sig = await dkimSign(V.RFC8463_UNSIGNED, [k], { signTime });
    expect(tag(sig, 'bh')).toBe(V.RFC_BODY_HASH);
    expect(tag(sig, 'a')).toBe('ed25519-sha256');
    expect(await dkimSign(V.RFC8463_UNSIGNED, [k], { signTime })).toBe(sig); // Ed25519 is deterministic
    const v = await verifyMessage(sig + V.RFC8463_UNSIGNED, { authservId: 'mx.test', resolver: staticResolver(V.RFC8463_ZONE) });
    expect(v.dkim).toMatchObject([{ result: 'pass', domain: 'football.example.com', selector: 'brisbane' }]);
  });

  it("RFC 6376 A.1's body hashes to the published bh= under simple canonicalization", async () => {
    const k = signingKey('football.example.com', 'brisbane', V.RFC8463_ED25519_SEED);
    expect(tag(await dkimSign(V.RFC6376_UNSIGNED, [k], { canonicalization: 'simple/simple' }), 'bh')).toBe(V.RFC_BODY_HASH);
    expect(tag(await dkimSign(V.RFC8463_UNSIGNED, [k], { canonicalization: 'simple/simple' }), 'bh')).not.toBe(V.RFC_BODY_HASH); // two spaces count
  });

  it("RFC 6376 §3.4.6's example body canonicalizes as the RFC says (simple and relaxed)", async () => {
    const k = signingKey('example.com', 's', V.RFC8463_ED25519_SEED);
    const msg = `A: X\r\nB : Y\t\r\n\tZ  \r\nFrom: a@example.com\r\n\r\n${V.RFC6376_CANON_BODY}`;
    const sha = (s: string) => createHash('sha256').update(s).digest('base64');
    expect(tag(await dkimSign(msg, [k], { canonicalization: 'relaxed/relaxed' }), 'bh')).toBe(sha(V.RFC6376_RELAXED_BODY));
    expect(tag(await dkimSign(msg, [k], { canonicalization: 'simple/simple' }), 'bh')).toBe(sha(V.RFC6376_SIMPLE_BODY));
  });

  it('refuses a bad canonicalization and an unusable key with typed errors', async () => {
    const k = signingKey('example.com', 's', V.RFC8463_ED25519_SEED);
    await expect(dkimSign(V.RFC8463_UNSIGNED, [k], { canonicalization: 'loose' })).rejects.toThrow(/canonicalization "loose" is invalid/);
    expect(() => loadPrivateKey('not a key', 'KeyTable line 3')).toThrow(/KeyTable line 3 is not a usable private key/);
    const ec = generateKeyPairSync('ec', { namedCurve: 'P-256' }).privateKey.export({ type: 'pkcs8', format: 'pem' }).toString();
    expect(() => loadPrivateKey(ec)).toThrow(/ec key: expected RSA or Ed25519/);
    expect(() => signingKey('bad domain', 's', V.RFC8463_ED25519_SEED)).toThrow(/is not a domain name/);
  });
});

describe('KeyTable and SigningTable', () => {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'nm-auth-keys-'));
  const rsa = generateKeyPairSync('rsa', { modulusLength: 1024 });
  fs.writeFileSync(path.join(dir, 'rsa.private'), rsa.privateKey.export({ type: 'pkcs1', format: 'pem' }));
  fs.writeFileSync(path.join(dir, 'KeyTable'), `# name  domain:selector:keyfile\nrsa example.com:r2026:rsa.private\ned example.com:e2026:${V.RFC8463_ED25519_SEED}\nany %:shared:rsa.private\n`);
  fs.writeFileSync(path.join(dir, 'SigningTable'), 'alice@example.org ed\n*@example.com rsa\n*@example.com ed\n*.example.net any\n');

  it('chooses keys by From address: the first match, or all with multiple; % is the From domain', () => {
    const one = SigningTable.fromFiles(`refile:${path.join(dir, 'KeyTable')}`, path.join(dir, 'SigningTable'));
    expect(one.keysFor('Bob@Example.COM').map((k) => `${k.selector}/${k.algorithm}`)).toEqual(['r2026/rsa-sha256']);
    const all = SigningTable.fromFiles(path.join(dir, 'KeyTable'), path.join(dir, 'SigningTable'), { multiple: true });
    expect(all.keysFor('bob@example.com').map((k) => k.selector)).toEqual(['r2026', 'e2026']);
    expect(all.keysFor('alice@example.org').map((k) => k.selector)).toEqual(['e2026']);
    expect(all.keysFor('x@mail.example.net')).toMatchObject([{ domain: 'mail.example.net', selector: 'shared' }]);
    expect(all.keysFor('x@example.net')).toEqual([]); // *.example.net is subdomains only
    expect(all.keysFor('nobody@elsewhere.example')).toEqual([]);
    expect(all.keysFor('not-an-address')).toEqual([]);
  });

  it('names the line of a bad entry', () => {
    expect(() => SigningTable.parse('k example.com:s', '')).toThrow(/KeyTable line 1: "example.com:s" is not DOMAIN:SELECTOR:KEYFILE/);
    expect(() => SigningTable.parse('k example.com:s:/nonexistent/key', '')).toThrow(/KeyTable line 1: key file \/nonexistent\/key cannot be read/);
    expect(() => SigningTable.parse(`k example.com:s:${V.RFC8463_ED25519_SEED}`, '\n*@example.com other\n')).toThrow(/key "other" is not in the KeyTable/);
    expect(() => SigningTable.parse(`k example.com:s:${V.RFC8463_ED25519_SEED}`, '*@example.com\n')).toThrow(/SigningTable line 1: expected "PATTERN KEYNAME"/);
  });
});

describe('DMARC policy (RFC 7489 §6.6.4)', () => {
  const fail = { result: 'fail', fromDomain: 'bank.example', pct: 100 } as const;
  it('applies p to pct percent, and the next weaker policy to the rest', () => {
    expect(dmarcDisposition({ ...fail, policy: 'reject' }).action).toBe('reject');
    expect(dmarcDisposition({ ...fail, policy: 'reject', pct: 20 }, () => 0.1).action).toBe('reject');
    expect(dmarcDisposition({ ...fail, policy: 'reject', pct: 20 }, () => 0.5)).toEqual({
      action: 'quarantine',
      reason: 'DMARC policy of bank.example is reject for pct=20; this message was sampled out (quarantine)',
    });
    expect(dmarcDisposition({ ...fail, policy: 'quarantine', pct: 0 }, () => 0).action).toBe('none');
    expect(dmarcDisposition({ ...fail, result: 'pass', policy: 'reject' }).action).toBe('none');
    expect(dmarcDisposition({ ...fail, policy: 'none' }).action).toBe('none');
    expect(dmarcDisposition(undefined).action).toBe('none');
  });

  const rsa = generateKeyPairSync('rsa', { modulusLength: 1024 });
  const key = signingKey('bank.example', 'sel', rsa.privateKey.export({ type: 'pkcs8', format: 'pem' }));
  const zone = staticResolver({
    '_dmarc.bank.example TXT': ['v=DMARC1; p=reject; sp=quarantine; pct=50'],
    'bank.example TXT': ['v=spf1 ip4:192.0.2.0/24 -all'],
    'sel._domainkey.bank.example TXT': [dkimRecord(rsa.publicKey, 'rsa')],
  });
  const msg = (from: string) => `From: ${from}\r\nTo: x@example.org\r\nSubject: pay\r\nDate: Mon, 2 Jun 2025 10:00:00 +0000\r\nMessage-ID: <1@x>\r\n\r\nPay now.\r\n`;

  it('fails unaligned mail, with p for the domain and sp for a subdomain, pct from the record', async () => {
    const v = await verifyMessage(msg('ceo@bank.example'), { authservId: 'mx.test', ip: '203.0.113.5', helo: 'evil.example', sender: 'x@evil.example', resolver: zone });
    expect(v.dmarc).toMatchObject({ result: 'fail', fromDomain: 'bank.example', policy: 'reject', pct: 50 });
    const sub = await verifyMessage(msg('ceo@mail.bank.example'), { authservId: 'mx.test', ip: '203.0.113.5', helo: 'evil.example', sender: 'x@evil.example', resolver: zone });
    expect(sub.dmarc).toMatchObject({ result: 'fail', fromDomain: 'mail.bank.example', policy: 'quarantine' });
    expect(sub.authResults).toMatch(/\n\tdmarc=fail \(p=REJECT sp=QUARANTINE arc=none\) header\.from=mail\.bank\.example$/);
  });

  it('passes with an aligned DKIM signature, or an aligned SPF pass', async () => {
    const signed = (await dkimSign(msg('ceo@bank.example'), [key])) + msg('ceo@bank.example');
    const v = await verifyMessage(signed, { authservId: 'mx.test', ip: '203.0.113.5', helo: 'evil.example', sender: 'x@evil.example', resolver: zone });
    expect(v.dmarc?.result).toBe('pass');
    const s = await verifyMessage(msg('ceo@bank.example'), { authservId: 'mx.test', ip: '192.0.2.9', helo: 'mx.bank.example', sender: 'bounce@bank.example', resolver: zone });
    expect(s.spf.find((x) => x.identity === 'mailfrom')?.result).toBe('pass');
    expect(s.dmarc?.result).toBe('pass');
  });

  it('gives no DMARC verdict for several From addresses (permerror), and none without a record', async () => {
    const v = await verifyMessage(msg('a@bank.example, b@bank.example'), { authservId: 'mx.test', resolver: zone });
    expect(v.dmarc).toMatchObject({ result: 'permerror' });
    const n = await verifyMessage(msg('a@nodmarc.example'), { authservId: 'mx.test', resolver: zone });
    expect(n.dmarc).toMatchObject({ result: 'none' });
  });
});

describe('ARC (RFC 8617)', () => {
  const rsa = generateKeyPairSync('rsa', { modulusLength: 2048 });
  const seal = signingKey('lists.example', 'arc', rsa.privateKey.export({ type: 'pkcs8', format: 'pem' }));
  const zone = staticResolver({ 'arc._domainkey.lists.example TXT': [dkimRecord(rsa.publicKey, 'rsa')] });
  const msg = 'From: a@origin.example\r\nTo: list@lists.example\r\nSubject: hello\r\nDate: Mon, 2 Jun 2025 10:00:00 +0000\r\nMessage-ID: <2@x>\r\n\r\nHello list.\r\n';

  it('seals what it verified; the next hop validates the chain (arc=pass, i=1)', async () => {
    const v = await verifyMessage(msg, { authservId: 'lists.example', resolver: zone, seal });
    expect(v.arcSet).toMatch(/^ARC-Seal: i=1; a=rsa-sha256; t=\d+; cv=none;/);
    const fields = headerFields(v.arcSet!, true).map((f) => f.name);
    expect(fields).toEqual(['ARC-Seal', 'ARC-Message-Signature', 'ARC-Authentication-Results']);
    const next = await verifyMessage(v.arcSet + `Authentication-Results: ${v.authResults.replace(/\n/g, '\r\n')}\r\n` + msg, { authservId: 'mx.next', resolver: zone });
    expect(next.arc).toMatchObject({ result: 'pass', i: 1 });
    expect(next.results.find((r) => r.method === 'arc')?.result).toBe('pass');
  });

  it('arcSeal seals a message the host changed; a change after sealing fails the chain', async () => {
    const v = await verifyMessage(msg, { authservId: 'lists.example', resolver: zone });
    const changed = msg.replace('Subject: hello', 'Subject: [list] hello');
    const set = await arcSeal(changed, { key: seal, authResults: v.authResults, cv: v.arc!.result });
    expect((await verifyMessage(set + changed, { authservId: 'mx.next', resolver: zone })).arc?.result).toBe('pass');
    expect((await verifyMessage(set + changed.replace('Hello list.', 'Hello world.'), { authservId: 'mx.next', resolver: zone })).arc?.result).toBe('fail');
    await expect(arcSeal(changed, { key: seal, authResults: 'x; none', cv: 'maybe' })).rejects.toThrow(/ARC cv "maybe" is invalid/);
    await expect(arcSeal(changed, { key: signingKey('x.example', 'e', V.RFC8463_ED25519_SEED), authResults: 'x; none', cv: 'none' })).rejects.toThrow(/needs an RSA key/);
  });
});

describe('resolver: timeout, cache, metrics', () => {
  it('a lookup that hangs fails with ETIMEOUT within the timeout, and SPF/DKIM/DMARC report temperror', async () => {
    const metrics = new DnsMetrics();
    const resolver = createResolver({ resolve: () => new Promise(() => undefined), timeout: 200, metrics });
    const t0 = Date.now();
    await expect(resolver('example.com', 'TXT')).rejects.toMatchObject({ code: 'ETIMEOUT' });
    expect(Date.now() - t0).toBeGreaterThanOrEqual(190);
    expect(Date.now() - t0).toBeLessThan(2000);
    const signed = (await dkimSign(V.RFC8463_UNSIGNED, [signingKey('football.example.com', 'brisbane', V.RFC8463_ED25519_SEED)])) + V.RFC8463_UNSIGNED;
    const t1 = Date.now();
    const v = await verifyMessage(signed, { authservId: 'mx.test', ip: '192.0.2.1', helo: 'mx.football.example.com', sender: 'joe@football.example.com', resolver });
    expect(v.results.map((r) => `${r.method}=${r.result}`)).toEqual(['spf=temperror', 'spf=temperror', 'dkim=temperror', 'dmarc=temperror']);
    // Every lookup is bounded: 4 sequential lookups of 200 ms, not c-ares' retries.
    expect(Date.now() - t1).toBeLessThan(5000);
    const snap = metrics.snapshot();
    expect(snap.lookups.TXT.timeout).toBeGreaterThanOrEqual(4);
    expect(metrics.prometheus()).toMatch(/^nodemilter_dns_lookups_total\{type="TXT",outcome="timeout"\} \d+$/m);
    expect(metrics.prometheus()).toMatch(/^nodemilter_dns_lookup_duration_seconds_count \d+$/m);
  });

  it('caches answers and negative answers for their TTLs, never server failures; shares lookups in flight; stays within cacheSize', async () => {
    let clock = 0;
    const calls: string[] = [];
    const metrics = new DnsMetrics();
    const upstream = async (name: string, type: string) => {
      calls.push(`${name} ${type}`);
      await new Promise((r) => setTimeout(r, 5));
      if (name === 'fail.example') throw Object.assign(new Error('servfail'), { code: 'ESERVFAIL' });
      if (name === 'none.example') throw Object.assign(new Error('nx'), { code: 'ENOTFOUND' });
      return [[`v=${name}`]];
    };
    const r = createResolver({ resolve: upstream, cacheTtl: 10, negativeTtl: 2, cacheSize: 2, metrics, now: () => clock });
    const [a, b] = await Promise.all([r('A.example.', 'txt'), r('a.example', 'TXT')]);
    expect(a).toEqual([['v=a.example']]);
    expect(b).toBe(a);
    expect(calls).toEqual(['a.example TXT']); // shared, names normalized
    await r('a.example', 'TXT');
    expect(calls).toHaveLength(1);
    await expect(r('none.example', 'TXT')).rejects.toMatchObject({ code: 'ENOTFOUND' });
    await expect(r('none.example', 'TXT')).rejects.toMatchObject({ code: 'ENOTFOUND' });
    expect(calls).toHaveLength(2);
    await expect(r('fail.example', 'TXT')).rejects.toMatchObject({ code: 'ESERVFAIL' });
    await expect(r('fail.example', 'TXT')).rejects.toMatchObject({ code: 'ESERVFAIL' });
    expect(calls).toHaveLength(4); // not cached
    clock = 3000; // negative entry expired
    await expect(r('none.example', 'TXT')).rejects.toMatchObject({ code: 'ENOTFOUND' });
    expect(calls).toHaveLength(5);
    await r('b.example', 'TXT'); // cacheSize 2: evicts the least recently used (a.example)
    await r('a.example', 'TXT');
    expect(calls.filter((c) => c === 'a.example TXT')).toHaveLength(2);
    expect(metrics.snapshot()).toMatchObject({ cacheHits: 2, shared: 1, lookups: { TXT: { ok: 3, nxdomain: 2, error: 2 } } });
  });

  it("a message with 200 DKIM signatures costs at most the DNS budget (32 lookups), not 200 lookups", async () => {
    const sigs = Array.from({ length: 200 }, (_, i) => `DKIM-Signature: v=1; a=rsa-sha256; c=relaxed/relaxed; d=flood${i}.example; s=s${i}; h=from; bh=${V.RFC_BODY_HASH}; b=AAAA\r\n`).join('');
    let calls = 0;
    const slow = async () => {
      calls++;
      await new Promise((r) => setTimeout(r, 20));
      throw Object.assign(new Error('servfail'), { code: 'ESERVFAIL' });
    };
    const t0 = Date.now();
    const v = await verifyMessage(sigs + V.RFC8463_UNSIGNED, { authservId: 'mx.test', resolver: slow });
    expect(Date.now() - t0).toBeLessThan(5000);
    expect(calls).toBeLessThanOrEqual(32);
    expect(v.dkim).toHaveLength(200);
    expect(v.dkim.every((d) => d.result === 'temperror')).toBe(true);
    const b = await verifyMessage(sigs + V.RFC8463_UNSIGNED, { authservId: 'mx.test', resolver: slow, dnsBudget: { lookups: 1000, ms: 300 } });
    expect(b.dkim.every((d) => d.result === 'temperror')).toBe(true);
    await expect(verifyMessage(V.RFC8463_UNSIGNED, { authservId: 'mx.test', dnsBudget: { lookups: 0 } })).rejects.toThrow(/dnsBudget .* is invalid/);
  });

  it("the default upstream (Node's resolver, one try) against a server that does not answer fails within the timeout", async () => {
    const metrics = new DnsMetrics();
    const r = createResolver({ servers: ['127.0.0.1:9'], timeout: 300, metrics });
    const t0 = Date.now();
    const err = await r('example.com', 'TXT').then(
      () => undefined,
      (e: NodeJS.ErrnoException) => e,
    );
    expect(err?.code).toMatch(/^(ETIMEOUT|ECONNREFUSED|ESERVFAIL)$/);
    expect(Date.now() - t0).toBeLessThan(2000);
    expect(Object.values(metrics.snapshot().lookups.TXT).reduce((a, b) => a + (b ?? 0), 0)).toBe(1);
  });

  it('refuses bad options', () => {
    expect(() => createResolver({ timeout: 0 })).toThrow(/timeout 0 is invalid/);
    expect(() => createResolver({ cacheSize: -1 })).toThrow(/cacheSize -1 is invalid/);
    expect(() => createResolver({ resolve: 'x' as never })).toThrow(/resolve must be a function/);
    expect(() => staticResolver({ badkey: ['x'] })).toThrow(/record key "badkey" is invalid/);
  });
});

describe('helpers', () => {
  it('headerFields folds with LF and keeps or drops the leading space', () => {
    const text = 'DKIM-Signature: v=1; a=rsa-sha256;\r\n d=example.com\r\nX-Tight:no space\r\n';
    expect(headerFields(text, true)).toEqual([
      { name: 'DKIM-Signature', value: ' v=1; a=rsa-sha256;\n d=example.com' },
      { name: 'X-Tight', value: 'no space' },
    ]);
    expect(headerFields(text, false)[0].value).toBe('v=1; a=rsa-sha256;\n d=example.com');
    expect(() => headerFields(' continued\r\n', true)).toThrow(/starts with a continuation line/);
    expect(() => headerFields('no colon here\r\n', true)).toThrow(/not a header field/);
  });

  it('ownAuthResults compares the authserv-id without case, after a comment', () => {
    expect(ownAuthResults(' MX.example.org; spf=pass', 'mx.example.org')).toBe(true);
    expect(ownAuthResults('(forged) mx.example.org 1; none', 'mx.example.org')).toBe(true);
    expect(ownAuthResults('mx.example.org.evil; none', 'mx.example.org')).toBe(false);
  });

  it('readSettings: the environment over a NAME=value file; a bad line is named', () => {
    const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'nm-auth-conf-'));
    const file = path.join(dir, 'conf');
    fs.writeFileSync(file, '# comment\nSRS_DOMAIN = fwd.example\nSRS_SECRETS="a,b"\n');
    expect(readSettings({ CONF: file, SRS_SECRETS: 'c' }, 'CONF')).toMatchObject({ SRS_DOMAIN: 'fwd.example', SRS_SECRETS: 'c' });
    fs.writeFileSync(file, 'SRS_DOMAIN\n');
    expect(() => readSettings({ CONF: file }, 'CONF')).toThrow(/conf line 1: expected NAME=value/);
    fs.rmSync(dir, { recursive: true, force: true });
  });
});
