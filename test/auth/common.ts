// Shared by the auth example tests: keys, a fixture zone, messages, and the
// examples loaded from dist (they are compiled by tsc, as the other example
// tests load them; see test/examples/common.ts).
import { generateKeyPairSync } from 'node:crypto';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';

import { ROOT } from '../examples/common';

export const OFFLINE = path.join(ROOT, 'test', 'auth', 'fixtures', 'offline.cjs');

const rsa = generateKeyPairSync('rsa', { modulusLength: 2048 });
const ed = generateKeyPairSync('ed25519');
/** Key files for the signer (removed at exit). */
export const KEY_DIR = fs.mkdtempSync(path.join(os.tmpdir(), 'nm-auth-test-keys-'));
process.once('exit', () => fs.rmSync(KEY_DIR, { recursive: true, force: true }));
export const RSA_KEYFILE = path.join(KEY_DIR, 'rsa.private');
export const ED_KEYFILE = path.join(KEY_DIR, 'ed.private');
fs.writeFileSync(RSA_KEYFILE, rsa.privateKey.export({ type: 'pkcs1', format: 'pem' }));
fs.writeFileSync(ED_KEYFILE, ed.privateKey.export({ type: 'pkcs8', format: 'pem' }));

/** DNS for example.com (our signer's domain), bank.example (p=reject) and shop.example (p=quarantine). */
export const ZONE: Record<string, string[]> = {
  'rsa2026._domainkey.example.com TXT': [`v=DKIM1; k=rsa; p=${rsa.publicKey.export({ type: 'spki', format: 'der' }).toString('base64')}`],
  'ed2026._domainkey.example.com TXT': [`v=DKIM1; k=ed25519; p=${ed.publicKey.export({ type: 'spki', format: 'der' }).subarray(12).toString('base64')}`],
  'example.com TXT': ['v=spf1 ip4:192.0.2.0/24 -all'],
  '_dmarc.example.com TXT': ['v=DMARC1; p=reject'],
  'bank.example TXT': ['v=spf1 ip4:198.51.100.0/24 -all'],
  '_dmarc.bank.example TXT': ['v=DMARC1; p=reject; rua=mailto:d@bank.example'],
  '_dmarc.shop.example TXT': ['v=DMARC1; p=quarantine'],
};

/** The signer's settings for one domain, two keys (RSA and Ed25519). */
export const SIGNER_ENV = { DKIM_DOMAIN: 'example.com', DKIM_SELECTOR: 'rsa2026,ed2026', DKIM_KEYFILE: `${RSA_KEYFILE},${ED_KEYFILE}` };

/** A message whose header bytes test exactness: two spaces, a tab, no space, a fold. */
export const OUTGOING =
  'From: Alice <alice@example.com>\r\nTo: bob@example.org\r\nSubject:  two  spaces\r\nCc:\tcarol@example.org\r\n' +
  'X-Tight:no space\r\nDate: Mon, 2 Jun 2025 10:00:00 +0000\r\nMessage-ID: <m1@example.com>\r\n' +
  'References: <a@example.com>\r\n <b@example.com>\r\n\r\nHello Bob,\r\n\r\n  indented  line  \r\n\r\n';

export const PHISH =
  'From: Bank <ceo@bank.example>\r\nTo: victim@example.org\r\nSubject: verify your account\r\nDate: Mon, 2 Jun 2025 10:00:00 +0000\r\nMessage-ID: <p1@evil.example>\r\n\r\nClick here.\r\n';
