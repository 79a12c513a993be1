/**
 * Small helpers for milter authors.
 *
 * @module nodemilter/utils
 */
import * as fs from 'node:fs';
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

/**
 * Split an address header value into its display name and address, as
 * pymilter's `Milter.utils.parseaddr`: `[name, address]`, `['', '']` when
 * nothing can be made of it. The name has its quotes and escapes removed
 * and comments appended in parentheses (nested ones flattened); the address
 * loses its angle brackets and any source route (`<@hop:user@x>`). A bare
 * address may carry comments, which become the name. pymilter's fixes carry
 * over: a name that looks like an address (`spam@spammer.com <foo@x>`) is
 * still a name.
 *
 * Like Python 3.11's `email.utils.parseaddr` (which pymilter calls), a list of
 * addresses or an unbalanced quote, comment or angle bracket gives
 * `['', '']`. Unlike it, a comment inside an address is taken once:
 * `a(WRONG)@b` gives `['WRONG', 'a@b']` (pymilter's own test expects that;
 * Python gives `'WRONG WRONG'`).
 *
 * @example
 * ```ts
 * parseaddr('"Full Name" <foo@example.com>');                 // ['Full Name', 'foo@example.com']
 * parseaddr('user@example.com (Comment Name)');               // ['Comment Name', 'user@example.com']
 * parseaddr('God@heaven <@hop1.org,@hop2.net:jeff@spec.org>'); // ['God@heaven', 'jeff@spec.org']
 * parseaddr('Real Name ((comment)) <addr...@example.com>');   // ['Real Name (comment)', 'addr...@example.com']
 * ```
 */
export function parseaddr(value: Bytes): [name: string, address: string] {
  const text = typeof value === 'string' ? value : Buffer.isBuffer(value) ? value.toString('utf8') : undefined;
  if (text === undefined) throw new InvalidArgumentError(`parseaddr takes a string or Buffer, not ${typeof value}`);
  const t = splitAddressText(text);
  if (!t) return ['', ''];
  const comments = t.comments.join(' ');
  if (t.angle !== undefined) {
    const inner = t.angle.replace(/\s+/g, '');
    const addr = inner.startsWith('@') ? inner.slice(inner.lastIndexOf(':') + 1) : inner;
    const phrase = t.words.join(' ');
    return [comments ? (phrase ? `${phrase} (${comments})` : comments) : phrase, addr];
  }
  // An addr-spec: its words are written together (no spaces in an address).
  const addr = t.words.join('');
  if (addr.includes(',') || addr.includes(':') || addr.startsWith('@')) return ['', ''];
  return [comments, t.quotedSpec ?? addr];
}

/**
 * The pieces of an address text: comments (nested ones flattened), the
 * text inside a final `<...>` (if any), and the words outside it (quoted
 * strings unquoted). Undefined for unbalanced quotes, comments or angle
 * brackets, or text after the `>`.
 */
function splitAddressText(s: string): { words: string[]; comments: string[]; angle?: string; quotedSpec?: string } | undefined {
  const words: string[] = [];
  const comments: string[] = [];
  let word = '';
  let raw = ''; // the addr-spec as written, quotes kept
  let hadQuote = false;
  let angle: string | undefined;
  let i = 0;
  const endWord = () => {
    if (word) words.push(word);
    word = '';
  };
  while (i < s.length) {
    const c = s[i];
    if (angle !== undefined) {
      if (!/\s/.test(c)) return undefined; // text after <...>
      i++;
    } else if (c === '"') {
      let q = '';
      let j = i + 1;
      for (; j < s.length && s[j] !== '"'; j++) {
        if (s[j] === '\\' && j + 1 < s.length) j++;
        q += s[j];
      }
      if (j >= s.length) return undefined;
      word += q;
      raw += s.slice(i, j + 1);
      hadQuote = true;
      i = j + 1;
    } else if (c === '(') {
      let depth = 0;
      let out = '';
      let j = i;
      for (; j < s.length; j++) {
        const d = s[j];
        if (d === '\\' && j + 1 < s.length) out += s[++j];
        else if (d === '(') depth++;
        else if (d === ')') {
          if (--depth === 0) break;
        } else out += d;
      }
      if (j >= s.length) return undefined;
      comments.push(out.trim());
      endWord();
      i = j + 1;
    } else if (c === '<') {
      const close = s.indexOf('>', i);
      if (close < 0) return undefined;
      endWord();
      angle = s.slice(i + 1, close);
      i = close + 1;
    } else if (c === '>' || c === ')') {
      return undefined;
    } else if (/\s/.test(c)) {
      endWord();
      i++;
    } else {
      word += c;
      raw += c;
      i++;
    }
  }
  endWord();
  return { words, comments, angle, quotedSpec: hadQuote && angle === undefined ? raw : undefined };
}

/* ------------------------------------------------------------ IP lists */

type IpRange = [ipaddr.IPv4 | ipaddr.IPv6, number];

/**
 * A compiled list of IP ranges and host names, for {@link iniplist}.
 * Entries:
 * - an IPv4 or IPv6 address, or a CIDR range (`192.0.2.0/24`, `2001:db8::/32`);
 * - an address wildcard, as pymilter's lists write them: digits, dots and
 *   the glob characters `*`, `?` and `[...]` (`192.168.0.*`, `192.168.*.*`,
 *   `10.0.0.?`, `10.1.[0-3].*`), matched against the address as text
 *   (dotted quad; an IPv4-mapped IPv6 address as its IPv4 form) like Python's
 *   `fnmatchcase`: `*` crosses dots, so `192.168.*` matches `192.168.1.2`;
 * - a host name (`mx.example.com`, matched without case against the
 *   `hostname` argument) or a host-name glob (`*.example.com` matches
 *   `a.example.com` and `a.b.example.com`, not `example.com`).
 *
 * An IPv4-mapped IPv6 address (`::ffff:192.0.2.1`) matches IPv4 ranges and
 * the other way round. An entry of another form throws
 * {@link InvalidArgumentError}. Unlike pymilter, a host name is never looked
 * up in the DNS: it matches the client's host name.
 */
export class IpList {
  readonly #ranges: IpRange[] = [];
  readonly #names: RegExp[] = [];
  readonly #ipGlobs: RegExp[] = [];

  constructor(entries: readonly string[]) {
    for (const raw of entries) {
      const entry = raw.trim();
      if (entry.includes('/') || ipaddr.isValid(entry.replace(/^\[|\]$/g, ''))) {
        this.#ranges.push(parseRange(entry));
      } else if (/^[0-9.*?[\]!-]+$/.test(entry) && /[*?[]/.test(entry)) {
        this.#ipGlobs.push(ipGlob(raw, entry));
      } else if (/^[0-9.]+$/.test(entry)) {
        // Not a host name, and no address: it would silently match nothing.
        throw new InvalidArgumentError(
          `IP list entry ${JSON.stringify(raw)} is not a whole IPv4 address: write a CIDR range (such as 192.168.0.0/16) or a wildcard (192.168.*)`,
        );
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
    if (this.#ipGlobs.length > 0) {
      const text = (mapped ?? addr).toString();
      if (this.#ipGlobs.some((re) => re.test(text))) return true;
    }
    if (hostname) {
      const h = hostname.trim().toLowerCase().replace(/\.$/, '');
      if (this.#names.some((re) => re.test(h))) return true;
    }
    return false;
  }
}

/**
 * An address wildcard (`192.168.*.*`) as a RegExp with Python's fnmatchcase
 * rules: `*` any run of characters, `?` one, `[...]` a class (`[!...]`
 * negated).
 */
function ipGlob(raw: string, entry: string): RegExp {
  let re = '';
  for (let i = 0; i < entry.length; i++) {
    const c = entry[i];
    if (c === '*') re += '[^]*';
    else if (c === '?') re += '.';
    else if (c === '[') {
      const end = entry.indexOf(']', i + 2);
      if (end < 0) throw new InvalidArgumentError(`IP list entry ${JSON.stringify(raw)} is invalid: "[" without a closing "]"`);
      const body = entry.slice(i + 1, end);
      re += body.startsWith('!') ? `[^${body.slice(1)}]` : `[${body}]`;
      i = end;
    } else if (c === ']' || c === '!') {
      throw new InvalidArgumentError(`IP list entry ${JSON.stringify(raw)} is invalid: ${JSON.stringify(c)} outside a "[...]" class`);
    } else re += c === '.' ? '\\.' : c;
  }
  try {
    return new RegExp(`^${re}$`);
  } catch {
    throw new InvalidArgumentError(`IP list entry ${JSON.stringify(raw)} is invalid: a bad "[...]" class`);
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
 * iniplist('192.168.0.45', ['192.168.*.*']);                      // true
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

/* ------------------------------------------------------------ configuration files */

const TRUE_WORDS = new Set(['1', 'yes', 'true', 'on']);
const FALSE_WORDS = new Set(['0', 'no', 'false', 'off']);

/**
 * pymilter's `Milter.config.MilterConfigParser`: an INI file reader with
 * Python's `ConfigParser` rules, so a migrated milter reads its old
 * configuration unchanged.
 *
 * - `[section]` headers; `key = value` or `key: value` (split at the first
 *   `=` or `:`); option names ignore case; values are trimmed; a more
 *   indented line continues the value above it (joined with LF).
 * - Whole-line comments start with `#` or `;` (there are no inline comments:
 *   `a = b ; c` is the value `b ; c`, as in Python).
 * - A `[DEFAULT]` section supplies options to every section.
 * - `%(name)s` is replaced by the option `name` of the same section (or
 *   DEFAULT); `%%` is a `%`. A lone `%` is an error, as in Python.
 * - The `defaults` given to the constructor answer {@link MilterConfigParser.get}
 *   for options the file lacks (pymilter's own defaults, which, unlike
 *   DEFAULT, do not show up in {@link MilterConfigParser.options}).
 *
 * Errors (a line that is not a section, option or continuation; a
 * duplicate section or option; a missing section or option without a
 * fallback; a value that is not a boolean or integer) throw
 * {@link InvalidArgumentError} naming the file, line, section or option.
 *
 * @example
 * ```ts
 * const cp = new MilterConfigParser();
 * cp.readString('[srsmilter]\nsocketname = /run/srs.sock\nmiltersrs = false\n');
 * cp.getdefault('srsmilter', 'socketname', '/var/run/milter/srsmilter'); // '/run/srs.sock'
 * cp.getdefault('srsmilter', 'datadir', '/var/lib/milter');              // '/var/lib/milter'
 * cp.getboolean('srsmilter', 'miltersrs');                               // false
 * cp.getboolean('srsmilter', 'reject_spoofed', true);                    // true (absent)
 * ```
 */
export class MilterConfigParser {
  readonly #defaults: Readonly<Record<string, string>>;
  readonly #sections = new Map<string, Map<string, string>>();
  readonly #defaultSection = new Map<string, string>();

  /** @param defaults values for options a section lacks, by option name (pymilter's constructor argument) */
  constructor(defaults: Record<string, string> = {}) {
    this.#defaults = Object.fromEntries(Object.entries(defaults).map(([k, v]) => [k.toLowerCase(), String(v)]));
  }

  /**
   * Read the files that exist, in order (later ones add to and override
   * earlier ones); a missing file is skipped, as in Python.
   * @returns the files read
   */
  read(paths: string | readonly string[]): string[] {
    const read: string[] = [];
    for (const p of typeof paths === 'string' ? [paths] : paths) {
      let text: string;
      try {
        text = fs.readFileSync(p, 'utf8');
      } catch (err) {
        if ((err as NodeJS.ErrnoException).code === 'ENOENT') continue;
        throw err;
      }
      this.readString(text, p);
      read.push(p);
    }
    return read;
  }

  /** Read configuration text; `source` names it in errors. */
  readString(text: string, source = '<string>'): void {
    let section: Map<string, string> | undefined;
    let last: { map: Map<string, string>; key: string; indent: number } | undefined;
    const seenSections = new Set<string>();
    const seenOptions = new Set<string>();
    let sectionName = '';
    text.split(/\r?\n/).forEach((line, i) => {
      const where = `${source} line ${i + 1}`;
      const stripped = line.trim();
      const indent = line.length - line.trimStart().length;
      if (stripped === '' || /^[#;]/.test(stripped)) {
        return;
      }
      if (last && indent > last.indent) {
        last.map.set(last.key, `${last.map.get(last.key)}\n${stripped}`);
        return;
      }
      const sec = /^\[([^\]]+)\]/.exec(stripped);
      if (sec && indent === 0) {
        sectionName = sec[1];
        if (seenSections.has(sectionName)) throw new InvalidArgumentError(`${where}: section [${sectionName}] appears twice`);
        seenSections.add(sectionName);
        if (sectionName === 'DEFAULT') section = this.#defaultSection;
        else {
          if (!this.#sections.has(sectionName)) this.#sections.set(sectionName, new Map());
          section = this.#sections.get(sectionName);
        }
        last = undefined;
        return;
      }
      const m = /^([^=:]*[^=:\s])\s*[=:]\s*(.*)$/.exec(stripped);
      if (!m) throw new InvalidArgumentError(`${where}: expected "[section]", "name = value" or "name: value", got ${JSON.stringify(stripped)}`);
      if (!section) throw new InvalidArgumentError(`${where}: option ${JSON.stringify(m[1])} before any [section]`);
      const key = m[1].toLowerCase();
      if (seenOptions.has(`${sectionName}\0${key}`)) throw new InvalidArgumentError(`${where}: option ${JSON.stringify(key)} appears twice in [${sectionName}]`);
      seenOptions.add(`${sectionName}\0${key}`);
      section.set(key, m[2]);
      last = { map: section, key, indent };
    });
  }

  /** The section names, in the order read (DEFAULT not included). */
  sections(): string[] {
    return [...this.#sections.keys()];
  }

  /** Whether the section exists. */
  has_section(section: string): boolean {
    return this.#sections.has(section);
  }

  /** The option names of a section, DEFAULT's included. */
  options(section: string): string[] {
    return [...new Set([...this.#section(section).keys(), ...this.#defaultSection.keys()])];
  }

  /** Whether the section has the option (or DEFAULT has it). False for a missing section. */
  has_option(section: string, option: string): boolean {
    const s = this.#sections.get(section);
    return s !== undefined && (s.has(option.toLowerCase()) || this.#defaultSection.has(option.toLowerCase()));
  }

  /**
   * The value, interpolated. A missing option gives `fallback` if one is
   * given, else the constructor's default, else throws.
   */
  get(section: string, option: string, fallback?: string): string {
    const key = option.toLowerCase();
    if (!this.has_option(section, key)) {
      if (fallback !== undefined) return fallback;
      if (key in this.#defaults) return this.#defaults[key];
      this.#section(section);
      throw new InvalidArgumentError(`configuration: no option ${JSON.stringify(key)} in section [${section}]`);
    }
    return this.#interpolate(section, key, 0);
  }

  /** The value, or `fallback` (default undefined) when the section or option is missing (pymilter's `getdefault`). */
  getdefault(section: string, option: string): string | undefined;
  getdefault<T>(section: string, option: string, fallback: T): string | T;
  getdefault<T>(section: string, option: string, fallback?: T): string | T | undefined {
    return this.has_option(section, option) ? this.get(section, option) : fallback;
  }

  /** A boolean (`1 yes true on` / `0 no false off`, any case); `fallback` when missing, else throws. */
  getboolean(section: string, option: string, fallback?: boolean): boolean {
    if (!this.has_option(section, option) && fallback !== undefined) return fallback;
    const v = this.get(section, option).trim().toLowerCase();
    if (TRUE_WORDS.has(v)) return true;
    if (FALSE_WORDS.has(v)) return false;
    throw new InvalidArgumentError(`configuration [${section}] ${option} = ${JSON.stringify(v)}: expected a boolean (yes/no, true/false, on/off, 1/0)`);
  }

  /** An integer; `fallback` when missing, else throws. */
  getint(section: string, option: string, fallback?: number): number {
    if (!this.has_option(section, option) && fallback !== undefined) return fallback;
    const v = this.get(section, option).trim();
    if (!/^[+-]?\d+$/.test(v)) throw new InvalidArgumentError(`configuration [${section}] ${option} = ${JSON.stringify(v)}: expected an integer`);
    return Number(v);
  }

  /** An integer, or `fallback` when the option is missing (pymilter's `getintdefault`). */
  getintdefault<T = undefined>(section: string, option: string, fallback?: T): number | T {
    return this.has_option(section, option) ? this.getint(section, option) : (fallback as T);
  }

  /** A comma-separated list, each item trimmed; `[]` when the option is missing (pymilter's `getlist`). */
  getlist(section: string, option: string): string[] {
    return this.has_option(section, option) ? this.get(section, option).split(',').map((q) => q.trim()) : [];
  }

  #section(section: string): Map<string, string> {
    const s = this.#sections.get(section);
    if (!s) throw new InvalidArgumentError(`configuration: no section [${section}]`);
    return s;
  }

  #interpolate(section: string, key: string, depth: number): string {
    if (depth > 10) throw new InvalidArgumentError(`configuration [${section}] ${key}: %(...)s references nest deeper than 10 (a loop?)`);
    const raw = this.#sections.get(section)?.get(key) ?? this.#defaultSection.get(key)!;
    return raw.replace(/%(%|\(([^)]*)\)s|)/g, (all, _m, ref: string | undefined) => {
      if (all === '%%') return '%';
      if (ref === undefined) throw new InvalidArgumentError(`configuration [${section}] ${key}: a lone "%" in ${JSON.stringify(raw)}; write "%%"`);
      const r = ref.toLowerCase();
      if (!this.has_option(section, r)) throw new InvalidArgumentError(`configuration [${section}] ${key}: %(${ref})s names no option of [${section}]`);
      return this.#interpolate(section, r, depth + 1);
    });
  }
}
