/**
 * {@link AccessMap}: sendmail-style access-map lookups (`Connect:`, `From:`,
 * `To:` tags with domain and IP-prefix fallbacks) from a text file or a Map,
 * without a Berkeley DB.
 *
 * @module
 */
import { promises as fsp } from 'node:fs';
import * as ipaddr from 'ipaddr.js';

import { InvalidArgumentError } from '../errors';

/** What an access-map value asks for. */
export type AccessAction = 'OK' | 'RELAY' | 'REJECT' | 'DISCARD' | 'SKIP' | 'ERROR' | 'TEMP' | 'QUARANTINE' | 'OTHER';

/** A parsed access-map value. */
export interface AccessDecision {
  /**
   * `OK`, `RELAY`, `REJECT`, `DISCARD`, `SKIP`; `ERROR` (a permanent or
   * temporary error with its own reply: `ERROR:550 text`,
   * `ERROR:5.7.1:550 text`, `ERROR:"550 text"` or a bare `550 text`);
   * `TEMP` (`TEMP:` or a 4xx reply); `QUARANTINE` (`QUARANTINE:reason`);
   * `OTHER` for anything else (a value for your own use).
   */
  action: AccessAction;
  /** The SMTP reply code for REJECT/ERROR/TEMP (REJECT: `550`). */
  rcode?: string;
  /** The enhanced status code, if given (REJECT: `5.7.1`). */
  xcode?: string;
  /** The reply text, or the quarantine reason. */
  text?: string;
  /** The key that matched, e.g. `Connect:192.0.2`. */
  key: string;
  /** The value as written. */
  value: string;
}

/**
 * Parse an access-map value (the right-hand side).
 *
 * @example
 * ```ts
 * parseAccessValue('ERROR:5.7.1:550 Go away', 'From:spam.example');
 * // { action: 'ERROR', rcode: '550', xcode: '5.7.1', text: 'Go away', ... }
 * ```
 */
export function parseAccessValue(value: string, key = ''): AccessDecision {
  const v = value.trim();
  const upper = v.toUpperCase();
  const base = { key, value };
  if (['OK', 'RELAY', 'DISCARD', 'SKIP'].includes(upper)) return { action: upper as AccessAction, ...base };
  if (upper === 'REJECT') return { action: 'REJECT', rcode: '550', xcode: '5.7.1', text: 'Access denied', ...base };
  const q = /^QUARANTINE:\s*(.*)$/is.exec(v);
  if (q) return { action: 'QUARANTINE', text: q[1], ...base };
  const e = /^(ERROR|TEMP|DISCARD):\s*(.*)$/is.exec(v);
  const reply = parseReply(e ? e[2] : v);
  if (e || reply) {
    const tag = e ? (e[1].toUpperCase() as 'ERROR' | 'TEMP' | 'DISCARD') : 'ERROR';
    if (tag === 'DISCARD') return { action: 'DISCARD', text: e![2] || undefined, ...base };
    if (!reply) {
      return { action: tag, rcode: tag === 'TEMP' ? '451' : '550', xcode: tag === 'TEMP' ? '4.7.1' : '5.7.1', text: e![2] || 'Access denied', ...base };
    }
    const action: AccessAction = tag === 'TEMP' || reply.rcode.startsWith('4') ? 'TEMP' : 'ERROR';
    return { action, ...reply, ...base };
  }
  return { action: 'OTHER', ...base };
}

/** `550 text`, `5.7.1:550 text`, `550 5.7.1 text`, optionally in double quotes. */
function parseReply(s: string): { rcode: string; xcode?: string; text: string } | undefined {
  let t = s.trim();
  if (t.startsWith('"') && t.endsWith('"') && t.length >= 2) t = t.slice(1, -1);
  let xcode: string | undefined;
  const dsn = /^([245]\.\d{1,3}\.\d{1,3}):(.*)$/s.exec(t);
  if (dsn) {
    xcode = dsn[1];
    t = dsn[2].trim();
    if (t.startsWith('"') && t.endsWith('"') && t.length >= 2) t = t.slice(1, -1);
  }
  const m = /^([45]\d\d)(?:[ -]+(.*))?$/s.exec(t);
  if (!m) return undefined;
  let text = (m[2] ?? '').trim();
  const x2 = /^([245]\.\d{1,3}\.\d{1,3})(?:\s+(.*))?$/s.exec(text);
  if (x2 && !xcode) {
    xcode = x2[1];
    text = (x2[2] ?? '').trim();
  }
  return { rcode: m[1], xcode, text };
}

/** The candidate keys for an address, in sendmail's order: `user@host.domain`, `host.domain`, `domain`, ..., `user@`. */
export function addressKeys(address: string): string[] {
  let a = address.trim();
  const m = /^<(.*)>$/s.exec(a);
  if (m) a = m[1].trim();
  a = a.toLowerCase();
  if (a === '') return ['<>'];
  const at = a.lastIndexOf('@');
  if (at < 0) return [a, ...domainKeys(a).slice(1)];
  const user = a.slice(0, at);
  const domain = a.slice(at + 1);
  return [a, ...domainKeys(domain), `${user}@`];
}

/** A domain and its parents: `a.b.example` → `a.b.example`, `b.example`, `example`. */
export function domainKeys(domain: string): string[] {
  const d = domain.trim().toLowerCase().replace(/\.$/, '');
  if (!d) return [];
  const parts = d.split('.');
  return parts.map((_, i) => parts.slice(i).join('.'));
}

/**
 * An IP address and its prefixes as sendmail writes them: IPv4 by octets
 * (`192.0.2.7`, `192.0.2`, `192.0`, `192`); IPv6 as `IPv6:` and the full
 * form without leading zeros, by groups (`IPv6:2001:db8:0:0:0:0:0:1`,
 * `IPv6:2001:db8:0:0:0:0:0`, ... `IPv6:2001`).
 */
export function ipKeys(ip: string): string[] {
  let addr: ipaddr.IPv4 | ipaddr.IPv6;
  try {
    addr = ipaddr.process(ip.trim().replace(/^\[|\]$/g, '').replace(/^IPv6:/i, ''));
  } catch {
    throw new InvalidArgumentError(`access map: not an IP address: ${JSON.stringify(ip)}`);
  }
  if (addr.kind() === 'ipv4') {
    const o = addr.toString().split('.');
    return [4, 3, 2, 1].map((n) => o.slice(0, n).join('.'));
  }
  const groups = (addr as ipaddr.IPv6).parts.map((p) => p.toString(16));
  const keys: string[] = [];
  for (let n = 8; n >= 1; n--) keys.push(`ipv6:${groups.slice(0, n).join(':')}`);
  return keys;
}

function normalizeKey(key: string): string {
  const k = key.trim();
  const colon = k.indexOf(':');
  // IPv6 keys: canonical full form so any way of writing the address matches.
  const m = /^(?:([A-Za-z][\w-]*):)?(ipv6:.*)$/i.exec(k);
  if (m) {
    const tag = m[1] ? m[1].toLowerCase() + ':' : '';
    const rest = m[2].slice(5);
    const full = rest.includes('::') || rest.split(':').length === 8 ? tryIpv6(rest) : undefined;
    return tag + (full ?? 'ipv6:' + rest.toLowerCase().split(':').map((g) => g.replace(/^0+(?=.)/, '')).join(':'));
  }
  return colon > 0 ? k.slice(0, colon).toLowerCase() + ':' + k.slice(colon + 1).toLowerCase() : k.toLowerCase();
}

function tryIpv6(s: string): string | undefined {
  try {
    return 'ipv6:' + ipaddr.IPv6.parse(s).parts.map((p) => p.toString(16)).join(':');
  } catch {
    return undefined;
  }
}

/** What {@link AccessMap.fromText} accepts besides the text. */
export interface AccessParseOptions {
  /** The file name, for error messages. */
  source?: string;
}

/**
 * A sendmail access map read from text (the `makemap` input format: one
 * `key value` per line, `#` comments) or given as a Map. No Berkeley DB is
 * involved. Keys match case-insensitively.
 *
 * Lookups follow sendmail: for each candidate key, first `Tag:key`, then
 * the untagged `key`.
 * - {@link AccessMap.checkConnect}: the client's host name and its parent
 *   domains, then its IP and the IP's prefixes.
 * - {@link AccessMap.checkFrom} / {@link AccessMap.checkTo}: `user@domain`,
 *   the domain and its parents, then `user@`.
 *
 * @example
 * ```ts
 * const access = AccessMap.fromText(`
 *   Connect:192.0.2          REJECT
 *   Connect:trusted.example  OK
 *   From:spammer@            ERROR:5.7.1:550 We know you
 *   To:abuse@example.com     OK
 * `);
 * access.checkConnect('mx.trusted.example', '198.51.100.1'); // { action: 'OK', key: 'Connect:trusted.example', ... }
 * access.checkFrom('<spammer@anywhere.example>');            // { action: 'ERROR', rcode: '550', xcode: '5.7.1', ... }
 * ```
 */
export class AccessMap {
  readonly #entries = new Map<string, { key: string; value: string }>();

  /** Entries as `key → value` (a Map, an array of pairs, or a plain object). */
  constructor(entries: Map<string, string> | Iterable<readonly [string, string]> | Record<string, string> = []) {
    const it: Iterable<readonly [string, string]> =
      entries instanceof Map || Symbol.iterator in Object(entries)
        ? (entries as Iterable<readonly [string, string]>)
        : Object.entries(entries as Record<string, string>);
    for (const [k, v] of it) this.set(k, v);
  }

  /** Parse `makemap` input text: `key<space or tab>value` per line; blank lines and `#` comments ignored. */
  static fromText(text: string, options: AccessParseOptions = {}): AccessMap {
    const map = new AccessMap();
    text.split(/\r?\n/).forEach((line, i) => {
      const l = line.trim();
      if (l === '' || l.startsWith('#')) return;
      const m = /^(\S+)\s+(.*)$/.exec(l);
      if (!m) {
        throw new InvalidArgumentError(`${options.source ?? 'access map'} line ${i + 1}: expected "key value", got ${JSON.stringify(l)}`);
      }
      map.set(m[1], m[2].trim());
    });
    return map;
  }

  /** Read and parse a text access file (e.g. /etc/mail/access, the makemap source). */
  static async load(path: string): Promise<AccessMap> {
    return AccessMap.fromText(await fsp.readFile(path, 'utf8'), { source: path });
  }

  /** Number of entries. */
  get size(): number {
    return this.#entries.size;
  }

  /** Add or replace an entry. */
  set(key: string, value: string): void {
    if (typeof key !== 'string' || key.trim() === '' || typeof value !== 'string') {
      throw new InvalidArgumentError(`access map entry needs a non-empty key and a string value, got ${JSON.stringify([key, value])}`);
    }
    this.#entries.set(normalizeKey(key), { key: key.trim(), value: value.trim() });
  }

  /** The value of exactly this key (`Connect:10.1`, `example.com`), case-insensitive, or undefined. */
  get(key: string): string | undefined {
    return this.#entries.get(normalizeKey(key))?.value;
  }

  /** Look up candidate keys in order, each with `tag:` first, then untagged. */
  lookup(tag: string | undefined, candidates: readonly string[]): AccessDecision | undefined {
    for (const c of candidates) {
      const keys = tag ? [`${tag.toLowerCase()}:${c}`, c] : [c];
      for (const k of keys) {
        const e = this.#entries.get(normalizeKey(k));
        if (e) return parseAccessValue(e.value, e.key);
      }
    }
    return undefined;
  }

  /**
   * The `Connect:` decision for an SMTP client: host name (unless it is
   * `[address]`, i.e. no PTR) and parent domains, then IP and prefixes.
   */
  checkConnect(hostname: string | undefined, ip: string | undefined): AccessDecision | undefined {
    const keys: string[] = [];
    if (hostname && !/^\[.*\]$/.test(hostname.trim())) keys.push(...domainKeys(hostname));
    if (ip) keys.push(...ipKeys(ip));
    return this.lookup('Connect', keys);
  }

  /** The `From:` decision for an envelope sender (angle brackets allowed). */
  checkFrom(address: string): AccessDecision | undefined {
    return this.lookup('From', addressKeys(address));
  }

  /** The `To:` decision for an envelope recipient. */
  checkTo(address: string): AccessDecision | undefined {
    return this.lookup('To', addressKeys(address));
  }
}
