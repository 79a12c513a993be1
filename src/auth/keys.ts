/**
 * Signing keys chosen per From address, from tables shaped like OpenDKIM's
 * KeyTable and SigningTable.
 *
 * @module
 */
import { createPrivateKey } from 'node:crypto';
import type { KeyObject } from 'node:crypto';
import { readFileSync } from 'node:fs';
import * as path from 'node:path';

import { InvalidArgumentError } from '../errors';

/** One DKIM (or ARC) key: who signs (`d=`), with which selector (`s=`), and the private key. */
export interface SigningKey {
  /** The signing domain (`d=`). */
  domain: string;
  /** The selector (`s=`): the public key is at `SELECTOR._domainkey.DOMAIN`. */
  selector: string;
  /** The private key, PKCS#8 PEM (RSA or Ed25519). */
  privateKey: string;
  /** `rsa-sha256` or `ed25519-sha256`, from the key's type. */
  algorithm: 'rsa-sha256' | 'ed25519-sha256';
  /**
   * The private key parsed once ({@link loadPrivateKey} and
   * {@link signingKey} set it), so signing does not parse the PEM again
   * for every message. Without it the signer parses `privateKey` each time.
   */
  keyObject?: KeyObject;
}

/**
 * Read a private key: PEM (PKCS#1 or PKCS#8; RSA or Ed25519), or an Ed25519
 * key as RFC 8463 prints it (the 32-byte seed in base64). Anything else
 * throws {@link InvalidArgumentError} naming `what`.
 *
 * @example
 * ```ts
 * loadPrivateKey('nWGxne/9WmC6hEr0kuwsxERJxWl7MmkZcDusAxyuf2A=');   // RFC 8463's example key
 * ```
 */
export function loadPrivateKey(text: string | Buffer, what = 'private key'): { privateKey: string; algorithm: SigningKey['algorithm']; keyObject: KeyObject } {
  const s = (Buffer.isBuffer(text) ? text.toString('latin1') : String(text)).trim();
  let key: KeyObject;
  try {
    if (/^-----BEGIN /.test(s)) key = createPrivateKey({ key: s, format: 'pem' });
    else if (/^[A-Za-z0-9+/]{43}=$/.test(s)) {
      const der = Buffer.concat([Buffer.from('302e020100300506032b657004220420', 'hex'), Buffer.from(s, 'base64')]);
      key = createPrivateKey({ key: der, format: 'der', type: 'pkcs8' });
    } else throw new Error('expected a PEM key or a base64 Ed25519 seed (44 characters)');
  } catch (err) {
    throw new InvalidArgumentError(`${what} is not a usable private key: ${(err as Error).message}`);
  }
  const type = key.asymmetricKeyType;
  if (type !== 'rsa' && type !== 'ed25519') throw new InvalidArgumentError(`${what} is a ${type} key: expected RSA or Ed25519`);
  return { privateKey: key.export({ type: 'pkcs8', format: 'pem' }).toString(), algorithm: type === 'rsa' ? 'rsa-sha256' : 'ed25519-sha256', keyObject: key };
}

const DOMAIN = /^(?=.{1,253}$)([a-z0-9_](?:[a-z0-9_-]{0,61}[a-z0-9])?\.)*[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?$/i;
const SELECTOR = /^[a-z0-9_](?:[a-z0-9_.-]*[a-z0-9_])?$/i;

/** Make a {@link SigningKey}, checking the domain and selector. */
export function signingKey(domain: string, selector: string, key: string | Buffer, what = `key ${selector}._domainkey.${domain}`): SigningKey {
  if (domain !== '%' && !DOMAIN.test(domain)) throw new InvalidArgumentError(`${what}: domain ${JSON.stringify(domain)} is not a domain name`);
  if (!SELECTOR.test(selector)) throw new InvalidArgumentError(`${what}: selector ${JSON.stringify(selector)} is invalid: expected letters, digits, "-", "_" and "."`);
  return { domain: domain.toLowerCase(), selector, ...loadPrivateKey(key, what) };
}

/** Lines of a table file: `#` comments and blank lines dropped, continuation of neither. */
function tableLines(text: string): { line: number; fields: string[] }[] {
  const out: { line: number; fields: string[] }[] = [];
  text.split(/\r?\n/).forEach((raw, i) => {
    const t = raw.replace(/(^|\s)#.*$/, '').trim();
    if (t) out.push({ line: i + 1, fields: t.split(/\s+/) });
  });
  return out;
}

/** `refile:/path` or `file:/path` (OpenDKIM's data-set syntax) to the path. */
function dataSetPath(spec: string): string {
  return spec.replace(/^(refile|file):/, '');
}

interface SigningRule {
  /** The From address pattern, compiled. */
  pattern: RegExp;
  keyName: string;
}

/**
 * Which keys sign a message, by its From address, as OpenDKIM's KeyTable
 * and SigningTable say:
 *
 * - KeyTable lines: `NAME DOMAIN:SELECTOR:KEY`, where KEY is a key file
 *   (relative to the table's directory) or the key inline; DOMAIN `%` means
 *   the From domain.
 * - SigningTable lines: `PATTERN NAME`. A pattern is an address or a domain
 *   with `*` wildcards (`*@example.com`, `*.example.com`, `alice@example.org`);
 *   a bare domain (`example.com`) matches every address at it, as OpenDKIM's
 *   non-regex lookup does.
 *
 * The first matching line wins; with `multiple` every matching line adds its
 * key (OpenDKIM's MultipleSignatures), e.g. an RSA and an Ed25519 key.
 *
 * @example
 * ```ts
 * const keys = SigningTable.fromFiles('/etc/nodemilter/KeyTable', '/etc/nodemilter/SigningTable', { multiple: true });
 * keys.keysFor('alice@example.com');   // [{ domain: 'example.com', selector: 'rsa2026', ... }, ...]
 * ```
 */
export class SigningTable {
  readonly #keys = new Map<string, SigningKey>();
  readonly #rules: SigningRule[] = [];
  /** Whether every matching rule signs (else the first). */
  readonly multiple: boolean;

  /**
   * @param keys the keys by name (a parsed KeyTable).
   * @param rules `[pattern, keyName]` in order (a parsed SigningTable).
   * @param options.multiple sign with every matching key (default false).
   */
  constructor(keys: Record<string, SigningKey>, rules: [pattern: string, keyName: string][], options: { multiple?: boolean } = {}) {
    this.multiple = options.multiple ?? false;
    for (const [name, key] of Object.entries(keys)) this.#keys.set(name, key);
    rules.forEach(([pat, keyName], i) => {
      const where = `signing rule ${i + 1} (${JSON.stringify(pat)})`;
      if (!this.#keys.has(keyName)) throw new InvalidArgumentError(`${where}: key ${JSON.stringify(keyName)} is not in the KeyTable`);
      const glob = pat.toLowerCase();
      const full = glob.includes('@') ? glob : `*@${glob}`;
      if (!/^[^\s@]*@[^\s@]+$/.test(full)) throw new InvalidArgumentError(`${where}: not an address or domain pattern`);
      const re = full.split('*').map((s) => s.replace(/[.+?^${}()|[\]\\]/g, '\\$&')).join('[^]*');
      this.#rules.push({ pattern: new RegExp(`^${re}$`), keyName });
    });
  }

  /**
   * Parse KeyTable and SigningTable text.
   *
   * @param options.baseDir where relative key paths start (default: the working directory).
   */
  static parse(keyTable: string, signingTable: string, options: { baseDir?: string; multiple?: boolean } = {}): SigningTable {
    const base = options.baseDir ?? process.cwd();
    const keys: Record<string, SigningKey> = {};
    for (const { line, fields } of tableLines(keyTable)) {
      const where = `KeyTable line ${line}`;
      if (fields.length !== 2) throw new InvalidArgumentError(`${where}: expected "NAME DOMAIN:SELECTOR:KEYFILE", got ${JSON.stringify(fields.join(' '))}`);
      const [name, spec] = fields;
      const parts = spec.split(':');
      if (parts.length < 3) throw new InvalidArgumentError(`${where}: ${JSON.stringify(spec)} is not DOMAIN:SELECTOR:KEYFILE`);
      const [domain, selector] = parts;
      const keyRef = parts.slice(2).join(':');
      let keyText: string;
      if (/^[A-Za-z0-9+/]{43}=$/.test(keyRef)) keyText = keyRef;
      else {
        const file = path.resolve(base, keyRef);
        try {
          keyText = readFileSync(file, 'latin1');
        } catch (err) {
          throw new InvalidArgumentError(`${where}: key file ${file} cannot be read: ${(err as Error).message}`);
        }
      }
      if (name in keys) throw new InvalidArgumentError(`${where}: key name ${JSON.stringify(name)} is defined twice`);
      keys[name] = signingKey(domain, selector, keyText, `${where} (${name})`);
    }
    const rules: [string, string][] = [];
    for (const { line, fields } of tableLines(signingTable)) {
      if (fields.length !== 2) throw new InvalidArgumentError(`SigningTable line ${line}: expected "PATTERN KEYNAME", got ${JSON.stringify(fields.join(' '))}`);
      rules.push([fields[0], fields[1]]);
    }
    return new SigningTable(keys, rules, options);
  }

  /** Read both tables from files (OpenDKIM's `refile:` and `file:` prefixes are accepted); key paths are relative to the KeyTable's directory. */
  static fromFiles(keyTablePath: string, signingTablePath: string, options: { multiple?: boolean } = {}): SigningTable {
    const kt = dataSetPath(keyTablePath);
    const st = dataSetPath(signingTablePath);
    const read = (file: string, what: string) => {
      try {
        return readFileSync(file, 'utf8');
      } catch (err) {
        throw new InvalidArgumentError(`${what} ${file} cannot be read: ${(err as Error).message}`);
      }
    };
    return SigningTable.parse(read(kt, 'KeyTable'), read(st, 'SigningTable'), { ...options, baseDir: path.dirname(path.resolve(kt)) });
  }

  /** All `keys` for every address at `domain` (not its subdomains), without tables. */
  static forDomain(domain: string, keys: SigningKey[]): SigningTable {
    const named = Object.fromEntries(keys.map((k, i) => [`k${i}`, k]));
    return new SigningTable(named, keys.map((_, i) => [domain, `k${i}`]), { multiple: true });
  }

  /** The keys that sign mail from `address` (the From header's address), in table order; empty when none. */
  keysFor(address: string): SigningKey[] {
    const a = address.trim().toLowerCase().replace(/^<|>$/g, '');
    const at = a.lastIndexOf('@');
    if (at <= 0 || at === a.length - 1) return [];
    const fromDomain = a.slice(at + 1);
    const out: SigningKey[] = [];
    const used = new Set<string>();
    for (const r of this.#rules) {
      if (!r.pattern.test(a) || used.has(r.keyName)) continue;
      used.add(r.keyName);
      const k = this.#keys.get(r.keyName)!;
      out.push(k.domain === '%' ? { ...k, domain: fromDomain } : k);
      if (!this.multiple) break;
    }
    return out;
  }
}
