// nodemilter's DKIM signer (src/auth/canon.ts, src/auth/sign.ts): the
// canonicalization edge cases with hand-checked bytes, the header list
// rules, RFC 8463's Ed25519 signature reproduced exactly, incremental input
// equal to whole input, and signing off the event loop. Every signature
// made here is checked with mailauth's verifier (verifyMessage);
// test/auth/opendkim.test.ts has OpenDKIM check them too.
import { spawnSync } from 'node:child_process';
import { createHash, generateKeyPairSync } from 'node:crypto';
import * as path from 'node:path';
import { Readable } from 'node:stream';
import { describe, expect, it } from 'vitest';

import { BodyCanonicalizer, DkimSignError, DkimSigner, canonicalBody, canonicalHeader, dkimSign, loadPrivateKey, parseCanonicalization, signingKey, staticResolver, verifyMessage } from '../../src/auth/index';
import { signHeaderBlock } from '../../src/auth/sign';
import { InvalidArgumentError } from '../../src/errors';
import { ROOT } from '../examples/common';
import * as V from './vectors';

const sha = (s: string) => createHash('sha256').update(s, 'latin1').digest('base64');
const unfold = (sig: string) => sig.replace(/\r\n[ \t]/g, ' ');
const tag = (sig: string, name: string) => new RegExp(`[;\\s]${name}=([^;]+)`).exec(unfold(sig))?.[1].replace(/\s+/g, '');

const rsa = generateKeyPairSync('rsa', { modulusLength: 2048 });
const ed = generateKeyPairSync('ed25519');
const RSA_KEY = signingKey('example.com', 'rsa', rsa.privateKey.export({ type: 'pkcs8', format: 'pem' }));
const ED_KEY = signingKey('example.com', 'ed', ed.privateKey.export({ type: 'pkcs8', format: 'pem' }));
const zone = staticResolver({
  'rsa._domainkey.example.com TXT': [`v=DKIM1; k=rsa; p=${rsa.publicKey.export({ type: 'spki', format: 'der' }).toString('base64')}`],
  'ed._domainkey.example.com TXT': [`v=DKIM1; k=ed25519; p=${ed.publicKey.export({ type: 'spki', format: 'der' }).subarray(12).toString('base64')}`],
});
const CANONS = ['simple/simple', 'relaxed/relaxed', 'relaxed/simple', 'simple/relaxed'];

/** What mailauth's verifier says of each signature of `message`. */
async function verdicts(message: string) {
  return (await verifyMessage(message, { authservId: 'mx.test', resolver: zone })).dkim.map((d) => `${d.selector}=${d.result}`);
}

describe('body canonicalization (RFC 6376 §3.4.3, §3.4.4)', () => {
  // [body, simple, relaxed], worked out by hand from the RFC's rules.
  const CASES: [string, string, string][] = [
    ['', '\r\n', ''], // empty body: simple is one CRLF, relaxed stays empty
    ['\r\n', '\r\n', ''],
    ['\r\n\r\n\r\n', '\r\n', ''], // only CRLFs
    [' \t \r\n\t\r\n', ' \t \r\n\t\r\n', ''], // only WSP lines: relaxed empties them, then drops them
    ['abc', 'abc\r\n', 'abc\r\n'], // no final CRLF: one is added
    ['abc\r\n\r\n\r\n', 'abc\r\n', 'abc\r\n'], // trailing empty lines go
    ['a\r\n\r\nb\r\n', 'a\r\n\r\nb\r\n', 'a\r\n\r\nb\r\n'], // inner empty lines stay
    ['a \t b  \r\n', 'a \t b  \r\n', 'a b\r\n'], // WSP runs: one space; none at the line end
    ['  lead\r\n', '  lead\r\n', ' lead\r\n'], // leading WSP is a run too, not removed
    ['abc   ', 'abc   \r\n', 'abc\r\n'], // trailing WSP on a last line without CRLF
    [V.RFC6376_CANON_BODY, V.RFC6376_SIMPLE_BODY, V.RFC6376_RELAXED_BODY], // RFC 6376 §3.4.6
    ['a \t\r\n \r\n\r\nb\r\r\n \t \r\n\r\n', 'a \t\r\n \r\n\r\nb\r\r\n \t \r\n', 'a\r\n\r\n\r\nb\r\r\n'], // a bare CR is content
    ['x\r', 'x\r\r\n', 'x\r\r\n'],
  ];

  it.each(CASES)('%j', (body, simple, relaxed) => {
    expect(canonicalBody(body, 'simple')).toBe(simple);
    expect(canonicalBody(body, 'relaxed')).toBe(relaxed);
  });

  it('gives the same bytes however the body is cut into pieces (every cut, and byte by byte)', () => {
    for (const [body, simple, relaxed] of CASES) {
      for (const [algorithm, expected] of [['simple', simple], ['relaxed', relaxed]] as const) {
        const feed = (pieces: string[]) => {
          const out: string[] = [];
          const c = new BodyCanonicalizer(algorithm, (b: string) => out.push(b));
          for (const p of pieces) c.update(Buffer.from(p, 'latin1'));
          c.end();
          return out.join('');
        };
        for (let i = 0; i <= body.length; i++) {
          for (let j = i; j <= body.length; j++) expect(feed([body.slice(0, i), body.slice(i, j), body.slice(j)]), `${algorithm} ${JSON.stringify(body)} cut at ${i},${j}`).toBe(expected);
        }
        expect(feed([...body]), `${algorithm} byte by byte`).toBe(expected);
      }
    }
  });

  it('collapses a WSP run and drops trailing CRLFs that span many pieces, holding neither', () => {
    const out: string[] = [];
    const c = new BodyCanonicalizer('relaxed', (b: string) => out.push(b));
    c.update('a');
    for (let i = 0; i < 1000; i++) c.update(' \t'.repeat(500)); // 1 MB of WSP
    c.update('b');
    for (let i = 0; i < 1000; i++) c.update('\r\n'.repeat(500)); // 1 MB of empty lines
    c.end();
    expect(out.join('')).toBe('a b\r\n');
    // What reached the sink is the canonical body, not the megabytes fed in.
    expect(out.join('').length).toBe(5);
  });
});

describe('header canonicalization (RFC 6376 §3.4.1, §3.4.2)', () => {
  it.each([
    ['A: X', 'a:X\r\n'],
    ['B : Y\t\r\n\tZ  ', 'b:Y Z\r\n'], // RFC 6376 §3.4.6
    ['Subject:  two  spaces', 'subject:two spaces\r\n'],
    ['X-Tight:no space', 'x-tight:no space\r\n'],
    ['References: <a@example.com>\r\n <b@example.com>', 'references:<a@example.com> <b@example.com>\r\n'], // a fold is unfolded
    ['Empty:   ', 'empty:\r\n'],
    ['Cc:\tcarol@example.org', 'cc:carol@example.org\r\n'],
  ])('relaxed %j', (field, expected) => {
    expect(canonicalHeader(field, 'relaxed')).toBe(expected);
    expect(canonicalHeader(field, 'simple')).toBe(`${field}\r\n`); // simple: the bytes unchanged
  });

  it('parses c= values, a lone algorithm with a simple body, and refuses others', () => {
    expect(parseCanonicalization('relaxed')).toEqual({ header: 'relaxed', body: 'simple' });
    expect(parseCanonicalization('simple/relaxed')).toEqual({ header: 'simple', body: 'relaxed' });
    expect(() => parseCanonicalization('relaxed/loose')).toThrow(InvalidArgumentError);
  });
});

describe('DKIM signing', () => {
  it("reproduces RFC 8463 A.3's Ed25519 signature exactly from its header fields and signature field", async () => {
    // The RFC's field with b= emptied; h= lists from, subject and date twice (the
    // second of each is absent: an empty field, RFC 6376 §5.4.2).
    const rfc = V.RFC8463_SIGNATURES.split('\r\nDKIM-Signature:')[0];
    const unsigned = rfc.replace(/b=[^;]*$/, 'b=');
    const fields = V.RFC8463_UNSIGNED.split('\r\n\r\n')[0].split('\r\n');
    const byName = (n: string) => fields.find((f) => f.toLowerCase().startsWith(`${n}:`))!;
    const signed = ['from', 'to', 'subject', 'date', 'message-id'].map((n) => canonicalHeader(byName(n), 'relaxed')).join('');
    const key = loadPrivateKey(V.RFC8463_ED25519_SEED).keyObject;
    const b = await signHeaderBlock(signed, unsigned, 'relaxed', 'ed25519', key);
    expect(b).toBe(tag(rfc, 'b'));
  });

  it('signs with RSA and Ed25519 under every canonicalization; mailauth verifies; one changed byte of a header or the body fails', async () => {
    const msg = 'From: Alice <alice@example.com>\r\nTo: bob@example.org\r\nSubject:  two  spaces\r\nX-Tight:no space\r\n\r\nHello  \r\n\r\n';
    for (const canonicalization of CANONS) {
      const sig = await dkimSign(msg, [RSA_KEY, ED_KEY], { canonicalization });
      expect(sig).toMatch(new RegExp(`^DKIM-Signature: v=1; a=rsa-sha256; c=${canonicalization}; d=example\\.com;\r\n`));
      expect(sig.split('\r\n').every((l) => l.length <= 78), sig).toBe(true);
      expect(await verdicts(sig + msg), canonicalization).toEqual(['rsa=pass', 'ed=pass']);
      expect(await verdicts(sig + msg.replace('alice@', 'alicf@')), canonicalization).toEqual(['rsa=fail', 'ed=fail']);
      // A changed body: mailauth says neutral ("body hash did not verify").
      expect(await verdicts(sig + msg.replace('Hello', 'Hellp')), canonicalization).toEqual(['rsa=neutral', 'ed=neutral']);
    }
  });

  it('signs an empty body, a body of only CRLFs and a last line without CRLF with the RFC body hashes', async () => {
    for (const body of ['', '\r\n', '\r\n\r\n\r\n']) {
      const msg = `From: a@example.com\r\nSubject: x\r\n\r\n${body}`;
      const simple = await dkimSign(msg, [ED_KEY], { canonicalization: 'simple/simple' });
      const relaxed = await dkimSign(msg, [ED_KEY], { canonicalization: 'relaxed/relaxed' });
      expect(tag(simple, 'bh')).toBe(sha('\r\n'));
      expect(tag(relaxed, 'bh')).toBe(sha(''));
      expect(await verdicts(simple + msg)).toEqual(['ed=pass']);
      expect(await verdicts(relaxed + msg)).toEqual(['ed=pass']);
    }
    // No final CRLF (trailing WSP too): relaxed adds the CRLF and drops the WSP, simple keeps the WSP.
    const open = 'From: a@example.com\r\nSubject: x\r\n\r\nlast line  ';
    expect(tag(await dkimSign(open, [ED_KEY], { canonicalization: 'relaxed/relaxed' }), 'bh')).toBe(sha('last line\r\n'));
    expect(tag(await dkimSign(open, [ED_KEY], { canonicalization: 'relaxed/simple' }), 'bh')).toBe(sha('last line  \r\n'));
    for (const canonicalization of CANONS) expect(await verdicts((await dkimSign(open, [ED_KEY], { canonicalization })) + open), canonicalization).toEqual(['ed=pass']);
    // A message with no blank line at all is all header and an empty body.
    const headOnly = 'From: a@example.com\r\nSubject: x\r\n';
    expect(tag(await dkimSign(headOnly, [ED_KEY], { canonicalization: 'simple/simple' }), 'bh')).toBe(sha('\r\n'));
  });

  it('signs every listed field present, lowest first (a field twice is signed twice), never Received, and lists no absent field', async () => {
    const msg =
      'Received: from a by b\r\nTo: one@example.org\r\nFrom: a@example.com\r\nX-Other: not signed\r\nSubject: s\r\nto: two@example.org\r\nMessage-ID: <m@example.com>\r\n\r\nbody\r\n';
    const sig = await dkimSign(msg, [ED_KEY]);
    expect(tag(sig, 'h')).toBe('Message-ID:to:Subject:From:To');
    expect(await verdicts(sig + msg)).toEqual(['ed=pass']);
    // Both To fields are covered: changing either breaks it.
    expect(await verdicts(sig + msg.replace('two@', 'tw0@'))).toEqual(['ed=fail']);
    expect(await verdicts(sig + msg.replace('one@', '0ne@'))).toEqual(['ed=fail']);
    // Received and X-Other are not.
    expect(await verdicts(sig + msg.replace('from a by b', 'from c by d').replace('not signed', 'changed'))).toEqual(['ed=pass']);
  });

  it('honours headerList (any case; absent names skipped, a name listed twice once) and needs From in it', async () => {
    const msg = 'From: a@example.com\r\nSubject: s\r\nTo: b@example.org\r\n\r\nbody\r\n';
    const sig = await dkimSign(msg, [ED_KEY], { headerList: ['SUBJECT', 'from', 'X-Absent', 'Subject'] });
    expect(tag(sig, 'h')).toBe('Subject:From');
    expect(await verdicts(sig + msg)).toEqual(['ed=pass']);
    expect(await verdicts(sig + msg.replace('b@example.org', 'c@example.org'))).toEqual(['ed=pass']); // To is not signed
    await expect(dkimSign(msg, [ED_KEY], { headerList: ['Subject'] })).rejects.toThrow(/headerList \["Subject"\] lacks From/);
    await expect(dkimSign(msg, [ED_KEY], { headerList: ['From', 'Bad Name'] })).rejects.toThrow(/headerList entry "Bad Name" is not a header field name/);
  });

  it('oversigns: a From added above the signed one breaks the signature only with oversign', async () => {
    const msg = 'From: a@example.com\r\nSubject: s\r\n\r\nbody\r\n';
    const forged = (sig: string) => `${sig}From: ceo@example.com\r\n${msg}`;
    const plain = await dkimSign(msg, [ED_KEY]);
    expect(tag(plain, 'h')).toBe('Subject:From');
    expect(await verdicts(forged(plain))).toEqual(['ed=pass']); // what oversigning is for
    const over = await dkimSign(msg, [ED_KEY], { oversign: ['from', 'FROM', 'Reply-To'] });
    expect(tag(over, 'h')).toBe('Subject:From:from:Reply-To');
    expect(await verdicts(over + msg)).toEqual(['ed=pass']);
    expect(await verdicts(forged(over))).toEqual(['ed=fail']);
    expect(await verdicts(`${over}Reply-To: x@evil.example\r\n${msg}`)).toEqual(['ed=fail']);
    // An oversigned name is signed even when headerList leaves it out.
    const cc = await dkimSign(`Cc: c@example.org\r\n${msg}`, [ED_KEY], { headerList: ['From'], oversign: ['Cc'] });
    expect(tag(cc, 'h')).toBe('From:Cc:Cc');
    expect(await verdicts(`${cc}Cc: c@example.org\r\n${msg}`)).toEqual(['ed=pass']);
    expect(await verdicts(`${cc}Cc: d@example.org\r\n${msg}`)).toEqual(['ed=fail']);
    await expect(dkimSign(msg, [ED_KEY], { oversign: ['Bad:Name'] })).rejects.toThrow(/oversign entry "Bad:Name" is not a header field name/);
  });

  it('writes t= and x=, and the tags in a fixed order', async () => {
    const sig = await dkimSign('From: a@example.com\r\n\r\n', [ED_KEY], { signTime: new Date(1_700_000_000_500), expireAfter: 3600 });
    expect(unfold(sig)).toMatch(/^DKIM-Signature: v=1; a=ed25519-sha256; c=relaxed\/relaxed; d=example\.com; h=From; q=dns\/txt; s=ed; t=1700000000; x=1700003600; bh=[^;]+; b=[A-Za-z0-9+/= ]+\r\n$/);
    await expect(dkimSign('From: a@example.com\r\n\r\n', [ED_KEY], { expireAfter: 1.5 })).rejects.toThrow(/expireAfter 1.5 is invalid/);
  });

  it('refuses a message without From, a line that is not a header field, and a key of the wrong type, with DkimSignError', async () => {
    await expect(dkimSign('Subject: no from\r\n\r\nbody\r\n', [ED_KEY])).rejects.toThrow(/no From header field/);
    await expect(dkimSign('From: a@example.com\r\nthis is no header\r\n\r\nbody\r\n', [ED_KEY])).rejects.toThrow(DkimSignError);
    await expect(dkimSign('From: a@example.com\r\nthis is no header\r\n\r\nbody\r\n', [ED_KEY])).rejects.toThrow(/not a header field: "this is no header"/);
    await expect(dkimSign(' folded\r\nFrom: a@example.com\r\n\r\n', [ED_KEY])).rejects.toThrow(/starts with a continuation line/);
    await expect(dkimSign('From: a@example.com\r\n\r\n', [{ ...ED_KEY, algorithm: 'rsa-sha256' }])).rejects.toThrow(/a ed25519 key cannot sign rsa-sha256/);
    const s = new DkimSigner();
    s.header('Bad Name', 'x');
    s.header('From', ' a@example.com', true);
    await expect(s.sign([ED_KEY])).rejects.toThrow(/header field name "Bad Name" is invalid/);
    await expect(s.sign([ED_KEY])).rejects.toThrow(/after sign\(\)/);
  });

  it('gives the same signature for a buffer, a stream in small pieces, and header()/body() callbacks', async () => {
    const signTime = new Date(1_700_000_000_000);
    const msg = V.RFC8463_UNSIGNED;
    for (const canonicalization of CANONS) {
      const whole = await dkimSign(msg, [ED_KEY], { signTime, canonicalization });
      const pieces = Readable.from(Array.from({ length: Math.ceil(msg.length / 7) }, (_, i) => Buffer.from(msg.slice(i * 7, i * 7 + 7))));
      expect(await dkimSign(pieces, [ED_KEY], { signTime, canonicalization })).toBe(whole);
      const s = new DkimSigner({ signTime, canonicalization });
      const head = msg.slice(0, msg.indexOf('\r\n\r\n'));
      const body = msg.slice(head.length + 4);
      for (const f of head.split('\r\n')) s.header(f.slice(0, f.indexOf(':')), f.slice(f.indexOf(':') + 1), true);
      for (const c of body.match(/[^]{1,5}/g)!) s.body(c);
      expect(await s.sign([ED_KEY])).toBe(whole);
    }
  });

  it('uses the KeyObject parsed once, and parses the PEM when a key has none', async () => {
    expect(ED_KEY.keyObject?.asymmetricKeyType).toBe('ed25519');
    const msg = 'From: a@example.com\r\n\r\nx\r\n';
    const signTime = new Date(1_700_000_000_000);
    const { keyObject: _, ...plain } = ED_KEY;
    const expected = await dkimSign(msg, [ED_KEY], { signTime });
    expect(await dkimSign(msg, [plain], { signTime })).toBe(expected);
    // The PEM is not read when the KeyObject is there...
    expect(await dkimSign(msg, [{ ...ED_KEY, privateKey: 'not a key' }], { signTime })).toBe(expected);
    // ...and a bad PEM without one is a DkimSignError naming the key.
    await expect(dkimSign(msg, [{ ...plain, privateKey: 'not a key' }], { signTime })).rejects.toThrow(/DKIM signing with ed\._domainkey\.example\.com failed/);
  });

  it('signs off the event loop: the loop turns while 32 RSA-2048 signatures are made', async () => {
    const pem = rsa.privateKey.export({ type: 'pkcs8', format: 'pem' });
    const keys = Array.from({ length: 32 }, (_, i) => signingKey('example.com', `k${i}`, pem));
    let ticks = 0;
    let stop = false;
    const tick = () => {
      ticks++;
      if (!stop) setImmediate(tick);
    };
    setImmediate(tick);
    const sig = await dkimSign('From: a@example.com\r\n\r\nx\r\n', keys);
    stop = true;
    expect(sig.match(/^DKIM-Signature:/gm)).toHaveLength(32);
    // Synchronous signing would make all 32 (tens of ms of CPU) in one turn of the loop, with no tick between.
    expect(ticks).toBeGreaterThan(32);
  });

  it('keeps no body: 128 MiB through DkimSigner.body grows the heap by less than 16 MiB', () => {
    const script = `
      const auth = require(${JSON.stringify(path.join(ROOT, 'dist/src/auth/index.js'))});
      const key = auth.signingKey('example.com', 'ed', ${JSON.stringify(V.RFC8463_ED25519_SEED)});
      const chunk = ('x'.repeat(78) + '  \\r\\n').repeat(800); // 64 KiB of lines, trailing WSP on each
      const heap = () => { global.gc(); return process.memoryUsage().heapUsed + process.memoryUsage().arrayBuffers; };
      (async () => {
        const out = {};
        for (const canonicalization of ['simple/simple', 'relaxed/relaxed']) {
          const s = new auth.DkimSigner({ canonicalization });
          s.header('From', ' a@example.com', true);
          const before = heap();
          let most = 0;
          const mib = canonicalization === 'simple/simple' ? 128 : 32;
          for (let i = 0; i < mib * 16; i++) {
            s.body(Buffer.from(chunk));
            if (i % 256 === 0) most = Math.max(most, heap() - before);
          }
          const sig = await s.sign([key]);
          out[canonicalization] = { grew: Math.max(most, heap() - before), signed: sig.startsWith('DKIM-Signature:') };
        }
        console.log(JSON.stringify(out));
      })();`;
    const r = spawnSync(process.execPath, ['--expose-gc', '-e', script], { encoding: 'utf8' });
    expect(r.stderr).toBe('');
    const out = JSON.parse(r.stdout);
    for (const c of ['simple/simple', 'relaxed/relaxed']) {
      expect(out[c].signed).toBe(true);
      expect(out[c].grew, c).toBeLessThan(16 * 1024 * 1024);
    }
  });

  it('signs without mailauth installed (verifying still says to install it)', () => {
    const script = `
      const Module = require('module');
      const orig = Module._resolveFilename;
      Module._resolveFilename = function (req, ...rest) {
        if (req === 'mailauth') { const e = new Error("Cannot find module 'mailauth'"); e.code = 'MODULE_NOT_FOUND'; throw e; }
        return orig.call(this, req, ...rest);
      };
      const auth = require(${JSON.stringify(path.join(ROOT, 'dist/src/auth/index.js'))});
      const key = auth.signingKey('example.com', 'ed', ${JSON.stringify(V.RFC8463_ED25519_SEED)});
      auth.dkimSign('From: a@example.com\\r\\n\\r\\nx\\r\\n', [key]).then(async (sig) => {
        let verify;
        try { await auth.verifyMessage(sig, { authservId: 'x' }); verify = 'no error'; } catch (e) { verify = [e.name, e.packageName]; }
        console.log(JSON.stringify({ sig, verify }));
      });`;
    const r = spawnSync(process.execPath, ['-e', script], { encoding: 'utf8' });
    expect(r.stderr).toBe('');
    const out = JSON.parse(r.stdout);
    expect(out.sig).toMatch(/^DKIM-Signature: v=1; a=ed25519-sha256; /);
    expect(out.verify).toEqual(['MissingDependencyError', 'mailauth']);
  });
});
