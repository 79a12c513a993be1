import { describe, expect, test } from 'vitest';
import { execFileSync } from 'node:child_process';
import iconv from 'iconv-lite';
import {
  formatAuthResults, iniplist, IpList, param2dict, parse_addr, parse_header, parseAuthResults,
} from '../src/utils';
import type { AuthenticationResults } from '../src/utils';
import { AuthResSyntaxError, InvalidArgumentError } from '../src/errors';
import * as root from '../src/index';

describe('parse_addr', () => {
  test.each([
    ['<alice@example.com>', ['alice', 'example.com']],
    ['alice@example.com', ['alice', 'example.com']],
    ['  <Alice@Example.COM>  ', ['Alice', 'Example.COM']],
    ['<postmaster>', ['postmaster']],
    ['postmaster', ['postmaster']],
    ['<>', ['']],
    ['', ['']],
    ['<@relay.example:bob@example.org>', ['bob', 'example.org']],
    ['<@a.example,@b.example:bob@example.org>', ['bob', 'example.org']],
    ['"john doe"@example.com', ['john doe', 'example.com']],
    ['<"weird@local"@example.com>', ['weird@local', 'example.com']],
    ['"a\\"b"@example.com', ['a"b', 'example.com']],
    ['"just quoted"', ['just quoted']],
    ['"unterminated@example.com', ['unterminated@example.com']],
    ['user@host@example.com', ['user@host', 'example.com']],
    ['Alice Example <alice@example.com>', ['alice', 'example.com']],
    ['<alice@example.com', ['alice', 'example.com']],
  ])('%j', (input, expected) => {
    expect(parse_addr(input)).toEqual(expected);
  });

  test('Buffer input is read as UTF-8', () => {
    expect(parse_addr(Buffer.from('<jörg@exämple.de>'))).toEqual(['jörg', 'exämple.de']);
  });

  test('agrees with pymilter parse_addr on the addresses both handle alike', () => {
    // quoted local parts differ on purpose (we undo escapes); compare the rest with the real pymilter
    const inputs = ['<alice@example.com>', 'alice@example.com', '<postmaster>', '<@relay.example:bob@example.org>', 'user@host@example.com', '<>'];
    let out: string;
    try {
      out = execFileSync('/usr/bin/python3', ['-c', 'import json,sys; from Milter.utils import parse_addr; print(json.dumps([parse_addr(a) for a in json.loads(sys.argv[1])]))', JSON.stringify(inputs)], { encoding: 'utf8' });
    } catch (err) {
      throw new Error(`pymilter not available: ${(err as Error).message}`);
    }
    expect(inputs.map((a) => parse_addr(a))).toEqual(JSON.parse(out));
  });
});

describe('parse_header', () => {
  test.each([
    ['plain text', 'plain text'],
    ['=?iso-8859-1?q?caf=E9?=', 'café'],
    ['=?utf-8?b?4pyT?=', '✓'],
    ['=?iso-8859-1?q?caf=E9?= =?utf-8?b?4pyT?=', 'café✓'], // white space between words dropped
    ['=?koi8-r?b?8NLJ18XU?=', 'Привет'],
    ['=?windows-1252?q?=80_price?=', '€ price'],
    ['=?iso-2022-jp?B?GyRCJUYlOSVIGyhC?=', 'テスト'],
    ['=?UTF-8?Q?Re=3A_hello?= world', 'Re: hello world'],
  ])('%j', (input, expected) => {
    expect(parse_header(input)).toBe(expected);
  });

  test('gb18030 and big5, encoded with iconv-lite', () => {
    const gb = iconv.encode('中文邮件', 'gb18030').toString('base64');
    expect(parse_header(`=?gb18030?b?${gb}?=`)).toBe('中文邮件');
    const big5 = iconv.encode('測試', 'big5').toString('base64');
    expect(parse_header(`=?big5?b?${big5}?=`)).toBe('測試');
  });

  test('raw 8-bit bytes: UTF-8 when valid, else latin1', () => {
    expect(parse_header(Buffer.from('Grüße'))).toBe('Grüße');
    expect(parse_header(Buffer.from([0x63, 0x61, 0x66, 0xe9]))).toBe('café');
  });

  test('invalid input never throws', () => {
    for (const bad of ['=?', '=?utf-8?', '=?utf-8?x?abc?=', '=?nosuchcharset?q?abc?=', '=?utf-8?b?!!!?=', '=?utf-8?q?=ZZ?=', '\u0000=?utf-8?q?a?=', '=?'.repeat(1000)]) {
      expect(() => parse_header(bad)).not.toThrow();
      expect(typeof parse_header(bad)).toBe('string');
    }
  });
});

describe('iniplist', () => {
  const list = ['192.0.2.0/24', '198.51.100.7', '2001:db8::/32', '::ffff:203.0.113.0/120', '*.example.com', 'mx.example.net'];

  test.each([
    ['192.0.2.1', undefined, true],
    ['192.0.3.1', undefined, false],
    ['198.51.100.7', undefined, true],
    ['198.51.100.8', undefined, false],
    ['2001:db8:1::5', undefined, true],
    ['2001:db9::5', undefined, false],
    ['[2001:db8::1]', undefined, true],
    ['IPv6:2001:db8::1', undefined, false],
    ['::ffff:192.0.2.9', undefined, true], // mapped address in an IPv4 range
    ['203.0.113.5', undefined, true], // IPv4 address in a mapped IPv6 range
    ['10.0.0.1', 'a.example.com', true],
    ['10.0.0.1', 'A.B.EXAMPLE.COM.', true],
    ['10.0.0.1', 'example.com', false],
    ['10.0.0.1', 'notexample.com', false],
    ['10.0.0.1', 'mx.example.net', true],
    ['10.0.0.1', 'mx2.example.net', false],
  ])('%s (%s) -> %s', (ip, host, expected) => {
    if (ip === 'IPv6:2001:db8::1') {
      expect(() => iniplist(ip, list, host)).toThrow(InvalidArgumentError);
      return;
    }
    expect(iniplist(ip, list, host)).toBe(expected);
    expect(new IpList(list).contains(ip, host)).toBe(expected);
  });

  test('bad entries and bad addresses are typed errors naming the value', () => {
    expect(() => new IpList(['192.0.2.0/33'])).toThrow(/192\.0\.2\.0\/33.*0 to 32/);
    expect(() => new IpList(['1.2.3/8'])).toThrow(InvalidArgumentError);
    expect(() => new IpList(['not a host!'])).toThrow(/"not a host!"/);
    expect(() => new IpList(['2001:db8::/129'])).toThrow(/0 to 128/);
    expect(() => iniplist('999.1.1.1', ['0.0.0.0/0'])).toThrow(/"999\.1\.1\.1" is not an IP address/);
    expect(() => iniplist('1.2.3', ['0.0.0.0/0'])).toThrow(InvalidArgumentError);
  });

  test('0.0.0.0/0 and ::/0 match everything of their family, and mapped addresses', () => {
    expect(iniplist('8.8.8.8', ['0.0.0.0/0'])).toBe(true);
    expect(iniplist('::ffff:8.8.8.8', ['0.0.0.0/0'])).toBe(true);
    expect(iniplist('2001:db8::1', ['0.0.0.0/0'])).toBe(false);
    expect(iniplist('2001:db8::1', ['::/0'])).toBe(true);
  });
});

describe('Authentication-Results', () => {
  const sample: AuthenticationResults = {
    authservId: 'mx.example.org',
    results: [
      { method: 'spf', result: 'pass', properties: [{ type: 'smtp', name: 'mailfrom', value: 'alice@example.com' }] },
      {
        method: 'dkim', version: '1', result: 'fail', comment: 'signature did not verify', reason: 'bad signature',
        properties: [
          { type: 'header', name: 'd', value: 'example.com' },
          { type: 'header', name: 'i', value: '@example.com' },
          { type: 'header', name: 'b', value: 'Ab/Cd+Ef' },
        ],
      },
      { method: 'dmarc', result: 'none', properties: [{ type: 'header', name: 'from', value: 'example.com', comment: 'policy none' }] },
    ],
  };

  test('format', () => {
    expect(formatAuthResults(sample)).toBe(
      'mx.example.org; spf=pass smtp.mailfrom=alice@example.com; ' +
        'dkim/1=fail (signature did not verify) reason="bad signature" header.d=example.com header.i=@example.com header.b=Ab/Cd+Ef; ' +
        'dmarc=none header.from=example.com (policy none)',
    );
    expect(formatAuthResults({ authservId: 'mx.example.org', results: [] })).toBe('mx.example.org; none');
    expect(formatAuthResults({ authservId: 'mx.example.org', version: '1', results: [] }, { fold: true })).toBe('mx.example.org 1;\n\tnone');
    expect(formatAuthResults({ authservId: 'mx', results: [{ method: 'auth', result: 'pass', properties: [{ type: 'smtp', name: 'auth', value: 'a user;x' }] }] })).toBe(
      'mx; auth=pass smtp.auth="a user;x"',
    );
  });

  test('round trip, single line and folded', () => {
    expect(parseAuthResults(formatAuthResults(sample))).toEqual(sample);
    expect(parseAuthResults(formatAuthResults(sample, { fold: true }).replace(/\n/g, '\r\n'))).toEqual(sample);
    const none = { authservId: 'mx.example.org', version: '1', results: [] };
    expect(parseAuthResults(formatAuthResults(none))).toEqual(none);
  });

  test('parsing is tolerant of folding, comments, case and a trailing semicolon', () => {
    const ar = parseAuthResults(
      ' (leading comment) example.net (the id);\r\n\tSPF=PASS (sender (nested) ok)\r\n  smtp.mailfrom="bob@example.org" ;\n dkim = pass header.d = example.org (key (2048) bits) ;',
    );
    expect(ar).toEqual({
      authservId: 'example.net',
      results: [
        { method: 'spf', result: 'pass', comment: 'sender (nested) ok', properties: [{ type: 'smtp', name: 'mailfrom', value: 'bob@example.org' }] },
        { method: 'dkim', result: 'pass', properties: [{ type: 'header', name: 'd', value: 'example.org', comment: 'key (2048) bits' }] },
      ],
    });
    expect(parseAuthResults('mx; none').results).toEqual([]);
    expect(parseAuthResults('"quoted id"; iprev=pass policy.iprev=192.0.2.1').authservId).toBe('quoted id');
  });

  test('reads a header that mailauth produced', async () => {
    const { authenticate } = await import('mailauth');
    const raw = Buffer.from('From: a@example.com\r\nTo: b@example.org\r\nSubject: x\r\n\r\nbody\r\n');
    // no DNS: a resolver that knows nothing
    const resolver = async () => {
      const err: any = new Error('not found');
      err.code = 'ENOTFOUND';
      throw err;
    };
    const res: any = await authenticate(raw, { ip: '192.0.2.1', helo: 'client.example.com', sender: 'a@example.com', mta: 'mx.example.org', resolver, disableArc: true, disableBimi: true });
    const field = String(res.headers).split(/\r?\n(?=[^ \t])/).find((f) => /^Authentication-Results:/i.test(f))!;
    const value = field.replace(/^Authentication-Results:\s*/i, '');
    expect(value).toContain('\r\n '); // folded, with comments
    const ar = parseAuthResults(value);
    expect(ar.authservId).toBe('mx.example.org');
    expect(ar.results.map((r) => r.method)).toEqual(expect.arrayContaining(['spf', 'dkim', 'dmarc']));
    const spf = ar.results.find((r) => r.method === 'spf')!;
    expect(spf.properties).toContainEqual({ type: 'smtp', name: 'mailfrom', value: 'a@example.com' });
    expect(spf.comment).toMatch(/does not designate/);
    expect(ar.results.find((r) => r.method === 'dkim')!.comment).toBe('message not signed');
  });

  test('syntax errors are typed and say where', () => {
    for (const bad of ['', 'mx; spf', 'mx; spf=', 'mx; spf=pass smtp.mailfrom', 'mx; spf=pass (unterminated', 'mx; spf=pass foo=bar', 'mx junk', 'mx; spf=pass smtp.mailfrom="x']) {
      let err: unknown;
      try {
        parseAuthResults(bad);
      } catch (e) {
        err = e;
      }
      expect(err, bad).toBeInstanceOf(AuthResSyntaxError);
      expect((err as AuthResSyntaxError).position).toBeGreaterThanOrEqual(0);
    }
  });

  test('format rejects what it cannot write', () => {
    expect(() => formatAuthResults({ authservId: '', results: [] })).toThrow(InvalidArgumentError);
    expect(() => formatAuthResults({ authservId: 'mx', results: [{ method: 'sp f', result: 'pass', properties: [] }] })).toThrow(/"sp f"/);
    expect(() => formatAuthResults({ authservId: 'mx', results: [{ method: 'spf', result: 'pass', properties: [{ type: 'smtp.x', name: 'y', value: 'z' }] }] })).toThrow(/ptype\.property/);
  });
});

test('the root module exports the helpers, and param2dict still works', () => {
  expect(root.parse_addr).toBe(parse_addr);
  expect(root.iniplist).toBe(iniplist);
  expect(param2dict(['SIZE=1', 'SMTPUTF8'])).toEqual({ SIZE: '1', SMTPUTF8: true });
});
