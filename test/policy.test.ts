// Policy helpers: sendmail-style access maps, dynamic-IP heuristics
// (cross-checked against pymilter's Milter.dynip), and RFC 3464 DSNs
// (parsed back by Python's email package, an independent MIME parser).
import { spawnSync } from 'node:child_process';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { describe, expect, it } from 'vitest';

import { InvalidArgumentError } from '../src/errors';
import { AccessMap, addressKeys, createDsn, dynipReason, ipKeys, isDynip, parseAccessValue, rfc5322Date } from '../src/policy/index';
import { SYSTEM_PYTHON, tmpDir } from './helpers';

const ACCESS = `
# sendmail access map (makemap source)
Connect:192.0.2            REJECT
Connect:192.0.2.77         OK
Connect:IPv6:2001:db8:0:0  DISCARD
Connect:trusted.example    OK
198.51.100.5               RELAY
From:spammer@              ERROR:5.7.1:550 We know you
From:bulk.example          ERROR:"451 4.7.0 Slow down"
From:<>                    OK
From:Boss@Example.ORG      OK
To:abuse@example.com       OK
To:closed.example.com      550 Mailbox closed
example.net                TEMP:Try later
bad.example                QUARANTINE:Held for review
odd.example                SOMETHING ELSE
`;

describe('AccessMap', () => {
  const access = AccessMap.fromText(ACCESS, { source: 'test' });

  it('looks up Connect: by host name and parent domains, then IP and octet prefixes, tagged before untagged', () => {
    expect(access.checkConnect('mx.trusted.example', '203.0.113.1')).toMatchObject({ action: 'OK', key: 'Connect:trusted.example' });
    expect(access.checkConnect('[192.0.2.9]', '192.0.2.9')).toMatchObject({ action: 'REJECT', rcode: '550', xcode: '5.7.1', key: 'Connect:192.0.2' });
    expect(access.checkConnect('host.dynamic.example', '192.0.2.77')).toMatchObject({ action: 'OK', key: 'Connect:192.0.2.77' });
    expect(access.checkConnect(undefined, '198.51.100.5')).toMatchObject({ action: 'RELAY', key: '198.51.100.5' });
    expect(access.checkConnect('mail.elsewhere.example', '203.0.113.1')).toBeUndefined();
    // IPv6 written any way matches the group prefix.
    expect(access.checkConnect(undefined, '2001:0db8::1')).toMatchObject({ action: 'DISCARD', key: 'Connect:IPv6:2001:db8:0:0' });
    expect(access.checkConnect(undefined, '::ffff:192.0.2.9')).toMatchObject({ action: 'REJECT' });
  });

  it('looks up From:/To: by address, domain and parents, then user@', () => {
    expect(access.checkFrom('<spammer@anywhere.example>')).toMatchObject({ action: 'ERROR', rcode: '550', xcode: '5.7.1', text: 'We know you' });
    expect(access.checkFrom('<news@lists.bulk.example>')).toMatchObject({ action: 'TEMP', rcode: '451', xcode: '4.7.0', text: 'Slow down' });
    expect(access.checkFrom('<>')).toMatchObject({ action: 'OK', key: 'From:<>' });
    expect(access.checkFrom('boss@example.org')).toMatchObject({ action: 'OK' }); // case-insensitive
    expect(access.checkFrom('other@example.org')).toBeUndefined();
    expect(access.checkTo('<abuse@example.com>')).toMatchObject({ action: 'OK' });
    expect(access.checkTo('x@closed.example.com')).toMatchObject({ action: 'ERROR', rcode: '550', text: 'Mailbox closed' });
    // Untagged entries apply to every tag.
    expect(access.checkTo('someone@mx.example.net')).toMatchObject({ action: 'TEMP', rcode: '451', xcode: '4.7.1', text: 'Try later' });
    expect(access.checkFrom('x@bad.example')).toMatchObject({ action: 'QUARANTINE', text: 'Held for review' });
    expect(access.checkFrom('x@odd.example')).toMatchObject({ action: 'OTHER', value: 'SOMETHING ELSE' });
  });

  it('builds from a Map or object, loads a file, and exposes exact get()', async () => {
    const m = new AccessMap(new Map([['Connect:10', 'REJECT']]));
    expect(m.checkConnect(undefined, '10.1.2.3')).toMatchObject({ action: 'REJECT' });
    expect(new AccessMap({ 'To:a@b.example': 'OK' }).checkTo('a@b.example')).toMatchObject({ action: 'OK' });
    const file = path.join(tmpDir('nm-access-'), 'access');
    fs.writeFileSync(file, ACCESS);
    const loaded = await AccessMap.load(file);
    expect(loaded.size).toBe(access.size);
    expect(loaded.get('connect:TRUSTED.example')).toBe('OK');
  });

  it('parses values and candidate keys the sendmail way', () => {
    expect(parseAccessValue('REJECT')).toMatchObject({ action: 'REJECT', rcode: '550', xcode: '5.7.1', text: 'Access denied' });
    expect(parseAccessValue('ERROR:550 Go away')).toMatchObject({ action: 'ERROR', rcode: '550', xcode: undefined, text: 'Go away' });
    expect(parseAccessValue('ERROR:"421 4.3.2 busy"')).toMatchObject({ action: 'TEMP', rcode: '421', xcode: '4.3.2', text: 'busy' });
    expect(parseAccessValue('discard')).toMatchObject({ action: 'DISCARD' });
    expect(addressKeys('<User@Sub.Example.COM>')).toEqual(['user@sub.example.com', 'sub.example.com', 'example.com', 'com', 'user@']);
    expect(ipKeys('192.0.2.7')).toEqual(['192.0.2.7', '192.0.2', '192.0', '192']);
    expect(ipKeys('2001:db8::1')[0]).toBe('ipv6:2001:db8:0:0:0:0:0:1');
  });

  it('rejects malformed input with typed errors naming it', () => {
    expect(() => AccessMap.fromText('ok.example OK\nlonelykey\n', { source: '/etc/mail/access' })).toThrow(
      /\/etc\/mail\/access line 2: expected "key value", got "lonelykey"/,
    );
    expect(() => access.checkConnect(undefined, '300.1.1.1')).toThrow(InvalidArgumentError);
    expect(() => new AccessMap().set('', 'OK')).toThrow(/non-empty key/);
  });
});

/* ------------------------------------------------------------ dynip */

// Cases where pymilter's heuristics and ours must agree.
const AGREED: [string, string][] = [
  ['post3.fabulousdealz.com', '69.60.99.112'],
  ['adsl-69-208-201-177.dsl.emhril.ameritech.net', '69.208.201.177'],
  ['[1.2.3.4]', '1.2.3.4'],
  ['c-71-63-151-151.hsd1.mn.comcast.net', '71.63.151.151'],
  ['host-192-0-2-7.dyn.example.net', '192.0.2.7'],
  ['mail.example.com', '192.0.2.7'],
  ['mx1.example.org', '198.51.100.1'],
  ['7.2.0.192.in-addr.example.net', '192.0.2.7'],
  ['smtp-out2.example.org', '203.0.113.2'],
  ['mail-wr1-f54.google.com', '209.85.221.54'],
  ['c0000207.dhcp.example.net', '192.0.2.7'],
  ['cpe-198-51-100-23.cable.example.com', '198.51.100.23'],
  ['ppp-203-0-113-45.dialup.example.com', '203.0.113.45'],
  ['out.mailer.example.com', '203.0.113.45'],
  ['p5B0C1D2E.dip0.t-ipconnect.de', '91.12.29.46'],
];

describe('dynip', () => {
  it('agrees with pymilter Milter.dynip.is_dynip on common host names', () => {
    const r = spawnSync(
      SYSTEM_PYTHON,
      ['-c', 'import sys, json\nfrom Milter.dynip import is_dynip\nprint(json.dumps([is_dynip(h, a) for h, a in json.load(sys.stdin)]))'],
      { input: JSON.stringify(AGREED), encoding: 'utf8' },
    );
    expect(r.stderr).toBe('');
    const py = JSON.parse(r.stdout) as boolean[];
    expect(py.filter(Boolean).length).toBe(9); // the list has both kinds
    expect(AGREED.map(([h, a]) => isDynip(h, a))).toEqual(py);
  });

  it('gives a reason: no PTR, the IP in the name (forwards, backwards, padded, hex), pool keywords', () => {
    expect(dynipReason('host-192-0-2-7.dyn.example.net', '192.0.2.7')).toBe('the IP is written in the host name');
    expect(dynipReason('[192.0.2.7]', '192.0.2.7')).toBe('the client has no PTR name');
    expect(dynipReason(undefined)).toBe('the client has no PTR name');
    expect(dynipReason('7-2-0-192.example.net', '192.0.2.7')).toBe('the IP is written backwards in the host name');
    expect(dynipReason('x192000002007.example.net', '192.0.2.7')).toBe('the IP is in the host name, zero-padded');
    expect(dynipReason('host123.pool.example.net', '198.51.100.200')).toBe('the host name has the dynamic-pool word "pool"');
    expect(dynipReason('dsl.example.net', '198.51.100.200')).toBeUndefined(); // no digits: a server's name
    expect(dynipReason('host-2001-db8--1-2-3-4.v6.example.net', '2001:db8::1:2:3:4')).toBe('the IPv6 interface identifier is written in the host name');
    expect(dynipReason('mail.example.net', '2001:db8::1:2:3:4')).toBeUndefined();
  });
});

/* ------------------------------------------------------------ DSN */

const PY_PARSE = `
import sys, json, email
from email import policy
msg = email.message_from_bytes(sys.stdin.buffer.read(), policy=policy.compat32)
parts = msg.get_payload()
ds = parts[1]
blocks = [dict(b.items()) for b in ds.get_payload()]
print(json.dumps({
  'type': msg.get_content_type(), 'report': msg.get_param('report-type'), 'defects': [str(d) for d in msg.defects],
  'to': msg['To'], 'from': msg['From'], 'auto': msg['Auto-Submitted'],
  'parts': [p.get_content_type() for p in parts],
  'text': parts[0].get_payload(decode=True).decode('utf-8'),
  'blocks': blocks,
  'orig': parts[2].get_payload() if len(parts) > 2 and isinstance(parts[2].get_payload(), str) else [dict(p.items()) for p in parts[2].get_payload()] if len(parts) > 2 else None,
}))
`;

function pyParse(msg: Buffer) {
  const r = spawnSync(SYSTEM_PYTHON, ['-c', PY_PARSE], { input: msg, encoding: 'utf8' });
  if (r.status !== 0) throw new Error(r.stderr);
  return JSON.parse(r.stdout);
}

describe('createDsn', () => {
  const original = 'From: alice@example.org\r\nTo: bob@example.net\r\nSubject: hello\r\n\r\nbody text\r\n';

  it('composes an RFC 3464 multipart/report that an independent parser reads back', () => {
    const msg = createDsn({
      reportingMta: 'mx1.example.net',
      sender: '<alice@example.org>',
      recipients: [
        { recipient: 'bob@example.net', action: 'failed', status: '5.1.1', diagnostic: '550 5.1.1 No such user', remoteMta: 'mx.example.net' },
        { recipient: 'carol@example.net', originalRecipient: 'Carol@example.net', action: 'delayed', status: '4.4.1' },
      ],
      arrivalDate: new Date(Date.UTC(2026, 0, 2, 3, 4, 5)),
      envelopeId: 'QQ314159',
      original,
      date: new Date(Date.UTC(2026, 0, 2, 4, 0, 0)),
    });
    expect(msg.includes(Buffer.from('\n')) && !/[^\r]\n/.test(msg.toString('latin1'))).toBe(true);
    const p = pyParse(msg);
    expect(p.type).toBe('multipart/report');
    expect(p.report).toBe('delivery-status');
    expect(p.defects).toEqual([]);
    expect(p.to).toBe('<alice@example.org>');
    expect(p.from).toBe('Mail Delivery System <MAILER-DAEMON@mx1.example.net>');
    expect(p.auto).toBe('auto-replied');
    expect(p.parts).toEqual(['text/plain', 'message/delivery-status', 'text/rfc822-headers']);
    expect(p.text).toContain('<bob@example.net>: failed (5.1.1): 550 5.1.1 No such user');
    expect(p.blocks[0]).toEqual({ 'Reporting-MTA': 'dns; mx1.example.net', 'Original-Envelope-Id': 'QQ314159', 'Arrival-Date': 'Fri, 2 Jan 2026 03:04:05 +0000' });
    expect(p.blocks[1]).toEqual({
      'Final-Recipient': 'rfc822; bob@example.net', Action: 'failed', Status: '5.1.1',
      'Remote-MTA': 'dns; mx.example.net', 'Diagnostic-Code': 'smtp; 550 5.1.1 No such user',
    });
    expect(p.blocks[2]).toEqual({ 'Original-Recipient': 'rfc822; Carol@example.net', 'Final-Recipient': 'rfc822; carol@example.net', Action: 'delayed', Status: '4.4.1' });
    expect(p.orig).toBe('From: alice@example.org\r\nTo: bob@example.net\r\nSubject: hello\r\n');
  });

  it('returns the full message as message/rfc822 when asked', () => {
    const p = pyParse(createDsn({
      reportingMta: 'mx1.example.net', sender: 'alice@example.org', original, returnContent: 'full',
      recipients: [{ recipient: 'bob@example.net', action: 'failed', status: '5.7.1' }],
    }));
    expect(p.parts[2]).toBe('message/rfc822');
    expect(p.orig[0]).toMatchObject({ Subject: 'hello' });
  });

  it('rejects bad fields with typed errors', () => {
    const base = { reportingMta: 'mx.example', sender: 'a@example.org', recipients: [{ recipient: 'b@example.org', action: 'failed' as const, status: '5.1.1' }] };
    expect(() => createDsn({ ...base, recipients: [] })).toThrow(/at least one recipient/);
    expect(() => createDsn({ ...base, recipients: [{ ...base.recipients[0], status: '550' }] })).toThrow(/status must look like 5.1.1, got "550"/);
    expect(() => createDsn({ ...base, sender: 'a b' })).toThrow(InvalidArgumentError);
    expect(() => createDsn({ ...base, envelopeId: 'x\r\nBcc: evil@example' })).toThrow(/must be one line/);
    expect(rfc5322Date(new Date(Date.UTC(2026, 10, 29, 4, 10, 0)))).toBe('Sun, 29 Nov 2026 04:10:00 +0000');
  });
});
