/**
 * Small helpers for milter authors.
 *
 * @module nodemilter/utils
 */
import ipaddr from 'ipaddr.js';
import libmime from 'libmime';
import { AuthResSyntaxError, InvalidArgumentError } from './errors';
import type { Bytes } from './types';

/**
 * Turn ESMTP parameters (the `...params` of envfrom and envrcpt) into a
 * record. `KEY=VALUE` gives `KEY: 'VALUE'` (split at the first `=`, the value
 * kept as sent, still xtext-encoded where the extension says so); a bare
 * `KEY` gives `KEY: true`. Keys are upper-cased, since ESMTP keywords ignore
 * case; a later duplicate wins. Empty strings and parameters with an empty
 * key are skipped. Buffers are read as UTF-8.
 *
 * pymilter's `param2dict` maps a bare keyword to `None`; here it is `true`,
 * so `if (p.SMTPUTF8)` reads naturally.
 *
 * @example
 * ```ts
 * override envfrom(from: string, ...params: string[]) {
 *   const p = param2dict(params);   // ['SIZE=1024', 'BODY=8BITMIME', 'SMTPUTF8']
 *   p.SIZE;      // '1024'
 *   p.SMTPUTF8;  // true
 *   return CONTINUE;
 * }
 * ```
 */
export function param2dict(params: readonly Bytes[]): Record<string, string | true> {
  const result: Record<string, string | true> = {};
  for (const raw of params) {
    const param = typeof raw === 'string' ? raw : raw.toString('utf8');
    if (param.length === 0) continue;
    const eq = param.indexOf('=');
    const key = (eq < 0 ? param : param.slice(0, eq)).toUpperCase();
    if (key.length === 0) continue;
    result[key] = eq < 0 ? true : param.slice(eq + 1);
  }
  return result;
}

/* ------------------------------------------------------------ addresses */

/**
 * Split an email address into user and domain, as pymilter's `parse_addr`:
 * `[user, domain]`, or `[user]` when there is no `@`. Tolerates what MAIL
 * FROM and RCPT TO carry: angle brackets, a source route
 * (`<@relay:user@domain>`), a quoted local part (`"a b"@x` gives `a b`,
 * escapes undone), surrounding space. The null sender `<>` gives `['']`.
 * Never throws for a string; the domain keeps its case.
 *
 * @example
 * ```ts
 * parse_addr('<Alice@Example.com>');          // ['Alice', 'Example.com']
 * parse_addr('<@relay.example:bob@example.org>'); // ['bob', 'example.org']
 * parse_addr('"john doe"@example.com');        // ['john doe', 'example.com']
 * parse_addr('postmaster');                    // ['postmaster']
 * ```
 */
export function parse_addr(address: Bytes): [string] | [string, string] {
  let t = (typeof address === 'string' ? address : address.toString('utf8')).trim();
  if (t.startsWith('<')) t = t.slice(1, t.endsWith('>') ? -1 : undefined).trim();
  else if (t.endsWith('>') && t.includes('<')) t = t.slice(t.lastIndexOf('<') + 1, -1).trim(); // Name <addr>
  // a source route: @a,@b:user@domain
  if (t.startsWith('@')) {
    const colon = t.indexOf(':');
    if (colon >= 0) t = t.slice(colon + 1);
  }
  if (t.startsWith('"')) {
    // quoted local part: find the closing quote, honouring backslash escapes
    let i = 1;
    let user = '';
    for (; i < t.length; i++) {
      const c = t[i];
      if (c === '\\' && i + 1 < t.length) user += t[++i];
      else if (c === '"') break;
      else user += c;
    }
    if (i >= t.length) return [t.slice(1)]; // unterminated quote: everything after it
    const rest = t.slice(i + 1);
    if (rest.startsWith('@')) return [user, rest.slice(1)];
    if (rest === '') return [user];
    t = user + rest;
  }
  const at = t.lastIndexOf('@');
  return at < 0 ? [t] : [t.slice(0, at), t.slice(at + 1)];
}

/* ------------------------------------------------------------ headers */

/**
 * Decode a header value for display or matching, as pymilter's
 * `parse_header`: RFC 2047 encoded words in any charset a mail reader knows
 * (iso-8859-*, windows-*, koi8-r, iso-2022-jp, gb18030, big5, ...), joined
 * as the RFC says (white space between adjacent encoded words dropped).
 * Raw 8-bit bytes (a Buffer) are read as UTF-8 when valid, else latin1.
 * Never throws: undecodable words are left as they are.
 *
 * @example
 * ```ts
 * parse_header('=?iso-8859-1?q?caf=E9?= =?utf-8?b?4pyT?=');   // 'café✓'
 * ```
 */
export function parse_header(value: Bytes): string {
  let text: string;
  if (typeof value === 'string') text = value;
  else {
    try {
      text = new TextDecoder('utf-8', { fatal: true }).decode(value);
    } catch {
      text = value.toString('latin1');
    }
  }
  try {
    return libmime.decodeWords(text);
  } catch {
    return text;
  }
}

/* ------------------------------------------------------------ IP lists */

type IpRange = [ipaddr.IPv4 | ipaddr.IPv6, number];

/**
 * A compiled list of IP ranges and host names, for {@link iniplist}.
 * Entries: an IPv4 or IPv6 address, a CIDR range (`192.0.2.0/24`,
 * `2001:db8::/32`), a host name (`mx.example.com`, matched without case)
 * or a host-name glob (`*.example.com` matches `a.example.com` and
 * `a.b.example.com`, not `example.com`). An IPv4-mapped IPv6 address
 * (`::ffff:192.0.2.1`) matches IPv4 ranges and the other way round.
 * An entry of another form throws {@link InvalidArgumentError}.
 */
export class IpList {
  readonly #ranges: IpRange[] = [];
  readonly #names: RegExp[] = [];

  constructor(entries: readonly string[]) {
    for (const raw of entries) {
      const entry = raw.trim();
      if (entry.includes('/') || ipaddr.isValid(entry.replace(/^\[|\]$/g, ''))) {
        this.#ranges.push(parseRange(entry));
      } else if (/^(\*\.)?([a-z0-9_*-]+\.)*[a-z0-9_*-]+\.?$/i.test(entry)) {
        const glob = entry.toLowerCase().replace(/\.$/, '');
        const pattern = glob.split('*').map((s) => s.replace(/[.+?^${}()|[\]\\]/g, '\\$&')).join('[^]*');
        this.#names.push(new RegExp(`^${pattern}$`));
      } else {
        throw new InvalidArgumentError(`IP list entry ${JSON.stringify(raw)} is invalid: expected an IP address, a CIDR range or a host name (glob)`);
      }
    }
  }

  /**
   * Whether `ip` (or `hostname`, if given) matches an entry. `ip` must be
   * an IPv4 or IPv6 address (brackets allowed); otherwise it throws
   * InvalidArgumentError.
   */
  contains(ip: string, hostname?: string): boolean {
    const addr = parseAddress(ip);
    const mapped = addr.kind() === 'ipv6' && (addr as ipaddr.IPv6).isIPv4MappedAddress() ? (addr as ipaddr.IPv6).toIPv4Address() : undefined;
    for (const [net, bits] of this.#ranges) {
      if (net.kind() === addr.kind() && addr.match(net as any, bits)) return true;
      if (mapped && net.kind() === 'ipv4' && mapped.match(net as ipaddr.IPv4, bits)) return true;
      if (addr.kind() === 'ipv4' && net.kind() === 'ipv6' && (addr as ipaddr.IPv4).toIPv4MappedAddress().match(net as ipaddr.IPv6, bits)) return true;
    }
    if (hostname) {
      const h = hostname.trim().toLowerCase().replace(/\.$/, '');
      if (this.#names.some((re) => re.test(h))) return true;
    }
    return false;
  }
}

function parseAddress(ip: string): ipaddr.IPv4 | ipaddr.IPv6 {
  const s = String(ip).trim().replace(/^\[(?:IPv6:)?|\]$/gi, '');
  if (ipaddr.IPv4.isValidFourPartDecimal(s)) return ipaddr.IPv4.parse(s);
  if (ipaddr.IPv6.isValid(s)) return ipaddr.IPv6.parse(s);
  throw new InvalidArgumentError(`${JSON.stringify(ip)} is not an IP address: expected IPv4 (192.0.2.1) or IPv6 (2001:db8::1)`);
}

function parseRange(entry: string): IpRange {
  const slash = entry.indexOf('/');
  const addrText = slash < 0 ? entry : entry.slice(0, slash);
  let addr: ipaddr.IPv4 | ipaddr.IPv6;
  try {
    addr = parseAddress(addrText);
  } catch {
    throw new InvalidArgumentError(`IP list entry ${JSON.stringify(entry)} is invalid: ${JSON.stringify(addrText)} is not an IP address`);
  }
  const max = addr.kind() === 'ipv4' ? 32 : 128;
  const bits = slash < 0 ? max : Number(entry.slice(slash + 1));
  if (!Number.isInteger(bits) || bits < 0 || bits > max || (slash >= 0 && !/^\d+$/.test(entry.slice(slash + 1)))) {
    throw new InvalidArgumentError(`IP list entry ${JSON.stringify(entry)} has an invalid prefix length: expected 0 to ${max}`);
  }
  return [addr, bits];
}

/**
 * Whether an IP address (or the client's host name) is in a list, as
 * pymilter's `iniplist`. See {@link IpList} for the entries; build an
 * IpList once when the same list is checked often.
 *
 * @example
 * ```ts
 * iniplist('192.0.2.7', ['192.0.2.0/24', '2001:db8::/32']);        // true
 * iniplist('::ffff:192.0.2.7', ['192.0.2.0/24']);                 // true
 * iniplist('203.0.113.9', ['*.example.com'], 'mx1.example.com');  // true
 * ```
 */
export function iniplist(ip: string, list: readonly string[] | IpList, hostname?: string): boolean {
  return (list instanceof IpList ? list : new IpList(list)).contains(ip, hostname);
}

/* ------------------------------------------------------------ Authentication-Results */

/** A property of an authentication result: `ptype.name=value`, e.g. `smtp.mailfrom=alice@example.com`. */
export interface AuthResProperty {
  /** `smtp`, `header`, `body` or `policy`. */
  type: string;
  /** The property, e.g. `mailfrom`, `from`, `d`, `i`. */
  name: string;
  value: string;
  /** A comment after the value, without parentheses. */
  comment?: string;
}

/** One method's result: `method[/version]=result [(comment)] [reason="..."] properties...`. */
export interface AuthResResult {
  /** `spf`, `dkim`, `dmarc`, `arc`, `auth`, `iprev`... */
  method: string;
  /** The method version, when given (`dkim/1`). */
  version?: string;
  /** `pass`, `fail`, `none`, `neutral`, `softfail`, `temperror`, `permerror`, `policy`... */
  result: string;
  /** A comment after the result, without parentheses. */
  comment?: string;
  reason?: string;
  properties: AuthResProperty[];
}

/** An Authentication-Results header value (RFC 8601): who checked, and the results (none = `none`). */
export interface AuthenticationResults {
  /** The authentication service, usually the MTA's host name. */
  authservId: string;
  /** The header version, when given (only `1` exists). */
  version?: string;
  results: AuthResResult[];
}

const TOKEN = /^[A-Za-z0-9!#$%&'*+\-.^_`{|}~]+$/;
const PVALUE = /^(?:[A-Za-z0-9!#$%&'*+\-.^_`{|}~/=]*@)?[A-Za-z0-9!#$%&'*+\-.^_`{|}~/=]+$/;

function quoteIfNeeded(value: string, allowed: RegExp): string {
  if (value !== '' && allowed.test(value)) return value;
  return `"${value.replace(/(["\\])/g, '\\$1')}"`;
}

function comment(text: string | undefined): string {
  return text === undefined ? '' : ` (${text.replace(/([()\\])/g, '\\$1')})`;
}

/**
 * Format an Authentication-Results value (RFC 8601), without the field
 * name, as pymilter's companion `authres` does. Results are separated by
 * `;` and, with `fold`, start on their own line (joined by `\n\t`, as
 * addheader takes folded values). No results gives `authserv-id; none`.
 *
 * @example
 * ```ts
 * formatAuthResults({ authservId: 'mx.example.org', results: [
 *   { method: 'spf', result: 'pass', properties: [{ type: 'smtp', name: 'mailfrom', value: 'alice@example.com' }] },
 *   { method: 'dkim', result: 'fail', reason: 'bad signature', properties: [{ type: 'header', name: 'd', value: 'example.com' }] },
 * ] });
 * // 'mx.example.org; spf=pass smtp.mailfrom=alice@example.com; dkim=fail reason="bad signature" header.d=example.com'
 * ```
 */
export function formatAuthResults(ar: AuthenticationResults, options: { fold?: boolean } = {}): string {
  if (!ar || typeof ar.authservId !== 'string' || ar.authservId === '') {
    throw new InvalidArgumentError(`Authentication-Results needs an authservId (a non-empty string), got ${JSON.stringify(ar?.authservId)}`);
  }
  const head = quoteIfNeeded(ar.authservId, TOKEN) + (ar.version !== undefined ? ` ${ar.version}` : '');
  const sep = options.fold ? ';\n\t' : '; ';
  if (!ar.results || ar.results.length === 0) return `${head}${sep}none`;
  const results = ar.results.map((r) => {
    for (const [what, v] of [['method', r.method], ['result', r.result]] as const) {
      if (typeof v !== 'string' || !TOKEN.test(v)) throw new InvalidArgumentError(`Authentication-Results ${what} ${JSON.stringify(v)} is invalid: expected a token such as "spf" or "pass"`);
    }
    let s = `${r.method}${r.version !== undefined ? `/${r.version}` : ''}=${r.result}${comment(r.comment)}`;
    if (r.reason !== undefined) s += ` reason=${quoteIfNeeded(r.reason, TOKEN)}`;
    for (const p of r.properties ?? []) {
      if (!TOKEN.test(p.type) || !TOKEN.test(p.name) || p.type.includes('.')) {
        throw new InvalidArgumentError(`Authentication-Results property ${JSON.stringify(`${p.type}.${p.name}`)} is invalid: expected ptype.property such as "smtp.mailfrom"`);
      }
      s += ` ${p.type}.${p.name}=${quoteIfNeeded(p.value, PVALUE)}${comment(p.comment)}`;
    }
    return s;
  });
  return head + sep + results.join(sep);
}

/**
 * Parse an Authentication-Results value (RFC 8601; the part after
 * `Authentication-Results:`). Tolerant of folding (CRLF or LF plus white
 * space), comments anywhere (kept on the result or property they follow),
 * quoted strings, any case of keywords (method, result and property names
 * come back in lower case), and a trailing `;`. Throws
 * {@link AuthResSyntaxError} with the position when the value does not
 * follow the grammar.
 *
 * @example
 * ```ts
 * const ar = parseAuthResults('mx.example.org; dkim=pass (good sig) header.d=example.com header.i=@example.com');
 * ar.results[0].comment;        // 'good sig'
 * ar.results[0].properties[1];  // { type: 'header', name: 'i', value: '@example.com' }
 * ```
 */
export function parseAuthResults(value: Bytes): AuthenticationResults {
  const s = typeof value === 'string' ? value : value.toString('utf8');
  let pos = 0;
  const fail = (what: string): never => {
    const near = s.slice(pos, pos + 20);
    throw new AuthResSyntaxError(`Authentication-Results: ${what} at offset ${pos}${near ? ` near ${JSON.stringify(near)}` : ' (end of value)'}`, pos);
  };
  /** Skip white space, folding and comments; return the comments' text. */
  const cfws = (): string | undefined => {
    let found: string[] | undefined;
    for (;;) {
      while (pos < s.length && /[ \t\r\n]/.test(s[pos])) pos++;
      if (s[pos] !== '(') return found?.join(' ');
      let depth = 0;
      let text = '';
      for (; pos < s.length; pos++) {
        const c = s[pos];
        if (c === '\\' && pos + 1 < s.length) {
          text += s[++pos];
          continue;
        }
        if (c === '(') {
          if (depth++ > 0) text += c;
        } else if (c === ')') {
          if (--depth === 0) {
            pos++;
            break;
          }
          text += c;
        } else text += c;
      }
      if (depth > 0) fail('unterminated comment');
      (found ??= []).push(text.replace(/\r?\n[ \t]+/g, ' ').trim());
    }
  };
  const quoted = (): string => {
    let out = '';
    for (pos++; pos < s.length; pos++) {
      const c = s[pos];
      if (c === '\\' && pos + 1 < s.length) out += s[++pos];
      else if (c === '"') {
        pos++;
        return out.replace(/\r?\n(?=[ \t])/g, '');
      } else out += c;
    }
    return fail('unterminated quoted string');
  };
  /** A word: a quoted string or characters up to white space, `;`, `(`, or a stop character. */
  const word = (stops: string): string => {
    if (s[pos] === '"') return quoted();
    const start = pos;
    while (pos < s.length && !/[ \t\r\n;()"]/.test(s[pos]) && !stops.includes(s[pos])) pos++;
    return s.slice(start, pos);
  };

  cfws();
  const authservId = word('');
  if (authservId === '') fail('expected the authserv-id');
  const ar: AuthenticationResults = { authservId, results: [] };
  cfws();
  if (/^\d+$/.test(s.slice(pos).match(/^[^;\s(]*/)![0]) && s.slice(pos).match(/^[^;\s(]*/)![0] !== '') {
    ar.version = word('');
    cfws();
  }
  while (pos < s.length) {
    if (s[pos] !== ';') fail('expected ";"');
    pos++;
    cfws();
    if (pos >= s.length) break; // a trailing ';'
    const start = pos;
    const methodSpec = word('=/');
    if (methodSpec.toLowerCase() === 'none' && s[pos] !== '=' && s[pos] !== '/') {
      cfws();
      continue;
    }
    if (!methodSpec) fail('expected a method');
    const result: AuthResResult = { method: methodSpec.toLowerCase(), result: '', properties: [] };
    cfws();
    if (s[pos] === '/') {
      pos++;
      cfws();
      result.version = word('=');
      cfws();
    }
    if (s[pos] !== '=') {
      pos = start;
      fail(`expected "=" and a result after method ${JSON.stringify(methodSpec)}`);
    }
    pos++;
    cfws();
    result.result = word('').toLowerCase();
    if (!result.result) fail('expected a result');
    const c = cfws();
    if (c !== undefined) result.comment = c;
    while (pos < s.length && s[pos] !== ';') {
      const key = word('=');
      cfws();
      if (!key || s[pos] !== '=') fail(`expected "reason=" or "ptype.property=" (got ${JSON.stringify(key)})`);
      pos++;
      cfws();
      const v = word('');
      const after = cfws();
      const k = key.toLowerCase();
      if (k === 'reason') result.reason = v;
      else {
        const dot = k.indexOf('.');
        if (dot <= 0 || dot === k.length - 1) fail(`property ${JSON.stringify(key)} is not ptype.property`);
        const prop: AuthResProperty = { type: k.slice(0, dot), name: k.slice(dot + 1), value: v };
        if (after !== undefined) prop.comment = after;
        result.properties.push(prop);
      }
    }
    ar.results.push(result);
  }
  return ar;
}
