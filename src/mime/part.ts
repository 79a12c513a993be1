/**
 * The MIME tree: {@link MimePart} parses a message into parts that keep
 * their original bytes, decodes what a milter needs to look at, and
 * serializes it back: byte for byte when nothing changed, as valid MIME
 * when something did.
 *
 * Bytes are held as latin1 strings inside (one char per byte), so no byte is
 * ever altered by a round trip through text.
 *
 * @module
 */
import libmime from 'libmime';
import { MimeError } from '../errors';
import { decodeText, decodeTransfer, encodeText, encodeTransfer, headerText } from './codec';
import { listZip, looksLikeZip } from './zip';
import type { ZipLimits } from './zip';

/** One header field of a part. */
export interface MimeHeader {
  /** The field name as written. */
  readonly name: string;
  /** The value unfolded and trimmed, as text (UTF-8 when valid, else latin1), RFC 2047 words not decoded. */
  readonly value: string;
  /** The whole field as in the message (latin1), folding and line end included. */
  readonly raw: string;
}

/**
 * A change to the top-level headers, in the terms of the milter actions:
 * `add` appends (addheader), `insert` puts the header at `index` among all
 * headers (addheader with index, from 0), `change` and `delete` address the
 * `index`-th header of that name (chgheader, from 1). `value` is the value
 * as it goes to the MTA: no leading space, folded lines joined by `\n`.
 */
export type MimeHeaderChange =
  | { op: 'add'; name: string; value: string }
  | { op: 'insert'; name: string; value: string; index: number }
  | { op: 'change'; name: string; value: string; index: number }
  | { op: 'delete'; name: string; index: number };

/** Limits for parsing. Exceeding one throws {@link MimeError}. */
export interface ParseOptions {
  /** Deepest nesting of multiparts and message/rfc822 parts. Default 50. */
  maxDepth?: number;
  /** Most parts in the whole tree. Default 10000. */
  maxParts?: number;
}

/** A file name found in a message: an attachment, or a member of a zip attachment. */
export interface AttachmentInfo {
  /** The file name (decoded). */
  name: string;
  /** The part that carries it (for a zip member: the zip's part). */
  part: MimePart;
  /** For a zip member: the zip names it is inside, outermost (the attachment) first; else empty. */
  path: string[];
  /** Decoded size in bytes (for a zip member: uncompressed, as the archive says). */
  size: number;
  /** Set when a zip could not be listed: `corrupt zip: ...`, `nested too deep`, `too large to open`. */
  error?: string;
}

/** Options of {@link MimePart.getnames} and {@link MimePart.attachments}. */
export interface NamesOptions extends ZipLimits {
  /** List the members of zip attachments (default true). */
  zip?: boolean;
}

/** Options of {@link MimePart.create}. */
export interface CreatePartOptions {
  /** Content type, e.g. `text/plain` (default), `application/pdf`. */
  contentType?: string;
  /** The body: a string is encoded in `charset` (default utf-8). */
  body: string | Buffer;
  /** Charset for text (default `utf-8` when body is a string). */
  charset?: string;
  /** A file name: sets Content-Disposition (attachment) and the Content-Type `name`. */
  filename?: string;
  /** `attachment` or `inline` (default: attachment with a filename, none without). */
  disposition?: 'attachment' | 'inline';
  /** Content-Transfer-Encoding (default: 7bit for short ASCII lines, quoted-printable for other text, base64 else). */
  encoding?: '7bit' | '8bit' | 'quoted-printable' | 'base64';
  /** Further headers, in order. */
  headers?: [string, string][];
  /** Line end (default CRLF). */
  eol?: string;
}

/** Options of {@link MimePart.defang}. */
export interface DefangOptions {
  /** The notice text, or a function making it from the removed part. */
  notice?: string | ((part: MimePart, name: string) => string);
}

type Kind = 'leaf' | 'multipart' | 'message';

const HEADER_NAME = /^[!-9;-~]+$/;

interface Counter {
  parts: number;
  maxParts: number;
  maxDepth: number;
}

/** Escape a text for use as a header value: encoded words where it is not ASCII. */
function headerValueText(value: string): string {
  // eslint-disable-next-line no-control-regex
  return /^[\x20-\x7e\t]*$/.test(value) ? value : libmime.encodeWords(value, 'Q', 52);
}

function show(value: unknown): string {
  const s = typeof value === 'string' ? value : String(value);
  return JSON.stringify(s.length > 60 ? s.slice(0, 60) + '...' : s);
}

/** The comment pymilter's `HTMLScriptFilter` leaves where it removed a script. */
export const SCRIPT_REMOVED_MARKER = '<!-- WARNING: embedded script removed -->';

/** Options of {@link MimePart.stripScripts}. */
export interface StripScriptsOptions {
  /** Leave a comment where each script was: `true` for {@link SCRIPT_REMOVED_MARKER}, or the text to leave. Default: nothing. */
  marker?: boolean | string;
}

/**
 * One MIME part, or a whole message (the root part). Parse with
 * {@link parseMime}; look with `get`, `contentType`, `filename`, `parts`,
 * `message`, `getPayload`, `walk`, `getnames`; change with `setHeader`,
 * `setPayload`, `defang`, `stripScripts`, `addPart`, `removePart`; write with
 * `toBuffer` (byte-identical when `ismodified()` is false).
 *
 * @example
 * ```ts
 * const msg = parseMime(raw);
 * for (const part of msg.walk()) {
 *   if (/\.(exe|scr|js)$/i.test(part.filename ?? '')) part.defang();
 * }
 * msg.stripScripts();
 * if (msg.ismodified()) applyToContext(this, msg);   // in eom
 * ```
 */
export class MimePart {
  /** The enclosing multipart or message/rfc822 part; undefined for the root. */
  parent: MimePart | undefined;
  /** Problems the parser worked around (no boundary found, unterminated multipart, bad header line...). */
  readonly defects: string[] = [];
  /**
   * Root only: called for every change to the top-level headers, so a
   * milter can mirror them into addheader/chgheader as they happen. The
   * same changes are also kept in {@link headerChanges}.
   */
  onHeaderChange: ((change: MimeHeaderChange) => void) | undefined;
  /** Root only: every change to the top-level headers since parsing, in order. */
  readonly headerChanges: MimeHeaderChange[] = [];
  /** The line end this part's generated lines use (the message's own: CRLF or LF). */
  readonly eol: string;

  #headers: MimeHeader[] = [];
  #unixFrom = '';
  #sep = '';
  #body = '';
  #raw: string | undefined;
  #kind: Kind = 'leaf';
  #parts: MimePart[] = [];
  #delims: string[] = [];
  #preamble = '';
  #close = '';
  #epilogue = '';
  #message: MimePart | undefined;
  #payload: Buffer | undefined;
  #headersDirty = false;
  #bodyDirty = false;

  private constructor(eol: string) {
    this.eol = eol;
  }

  /** @internal parse `raw` (latin1) into a part. */
  static parse(raw: string, options: ParseOptions = {}): MimePart {
    const eol = /\r\n/.test(raw.slice(0, 4096)) || !raw.includes('\n') ? '\r\n' : '\n';
    const counter: Counter = { parts: 0, maxParts: options.maxParts ?? 10000, maxDepth: options.maxDepth ?? 50 };
    return MimePart.#parse(raw, eol, counter, 0, undefined, false);
  }

  static #parse(raw: string, eol: string, counter: Counter, depth: number, parent: MimePart | undefined, digest: boolean): MimePart {
    if (++counter.parts > counter.maxParts) throw new MimeError(`message has more than ${counter.maxParts} parts (maxParts)`, 'too-large');
    if (depth > counter.maxDepth) throw new MimeError(`message nests deeper than ${counter.maxDepth} levels (maxDepth)`, 'too-deep');
    const part = new MimePart(eol);
    part.parent = parent;
    part.#raw = raw;
    part.#digestChild = digest;
    part.#parseHeaders(raw, parent === undefined || parent.#kind === 'message');
    const type = part.contentType;
    if (type.startsWith('multipart/')) {
      const boundary = part.#rawBoundary();
      if (boundary === undefined) part.defects.push('multipart without a boundary parameter: read as a single part');
      else part.#parseMultipart(boundary, counter, depth, type === 'multipart/digest');
    } else if (type === 'message/rfc822' || type === 'message/global') {
      const inner = decodeTransfer(Buffer.from(part.#body, 'latin1'), part.transferEncoding).toString('latin1');
      part.#kind = 'message';
      part.#message = MimePart.#parse(inner, eol, counter, depth + 1, part, false);
    }
    return part;
  }

  #digestChild = false;

  #parseHeaders(s: string, isMessage: boolean): void {
    let pos = 0;
    // An mbox envelope line ("From sender date") before the headers of a
    // message, as Python's parser accepts it: kept apart (unixFrom), and in
    // the bytes toBuffer() writes.
    if (isMessage && s.startsWith('From ')) {
      const nl = s.indexOf('\n');
      pos = nl < 0 ? s.length : nl + 1;
      this.#unixFrom = s.slice(0, pos);
    }
    let current: { name: string; raw: string } | undefined;
    const flush = () => {
      if (current) this.#headers.push(MimePart.#header(current.name, current.raw));
      current = undefined;
    };
    while (pos < s.length) {
      const nl = s.indexOf('\n', pos);
      const end = nl < 0 ? s.length : nl + 1;
      const line = s.slice(pos, end);
      const content = line.replace(/\r?\n$/, '');
      if (content === '') {
        this.#sep = line;
        pos = end;
        break;
      }
      if ((content[0] === ' ' || content[0] === '\t') && current) {
        current.raw += line;
        pos = end;
        continue;
      }
      const colon = content.indexOf(':');
      const name = colon > 0 ? content.slice(0, colon).replace(/[ \t]+$/, '') : '';
      if (!HEADER_NAME.test(name)) {
        this.defects.push(
          this.#headers.length > 0 || current
            ? `no blank line after the headers: body starts at ${show(content)}`
            : `no header fields: the part starts with ${show(content)}, read as body`,
        );
        break;
      }
      flush();
      current = { name, raw: line };
      pos = end;
    }
    flush();
    this.#body = s.slice(pos);
  }

  static #header(name: string, raw: string): MimeHeader {
    const colon = raw.indexOf(':');
    const value = headerText(raw.slice(colon + 1).replace(/\r?\n(?=[ \t])/g, '').replace(/\r?\n$/, '').trim());
    return { name, value, raw };
  }

  #rawBoundary(): string | undefined {
    const h = this.#headers.find((x) => x.name.toLowerCase() === 'content-type');
    if (!h) return undefined;
    const latin1 = h.raw.slice(h.raw.indexOf(':') + 1).replace(/\r?\n(?=[ \t])/g, '').trim();
    const b = libmime.parseHeaderValue(latin1, { stripComments: true }).params.boundary;
    return b ? b : undefined;
  }

  #parseMultipart(boundary: string, counter: Counter, depth: number, digest: boolean): void {
    const b = this.#body;
    const dash = '--' + boundary;
    const starts: { delimStart: number; lineEnd: number; close: boolean }[] = [];
    let from = 0;
    for (;;) {
      const at = b.indexOf(dash, from);
      if (at < 0) break;
      from = at + dash.length;
      if (at > 0 && b[at - 1] !== '\n') continue;
      const nl = b.indexOf('\n', at);
      const lineEnd = nl < 0 ? b.length : nl + 1;
      const rest = b.slice(at + dash.length, lineEnd).replace(/\r?\n$/, '').replace(/[ \t]+$/, '');
      if (rest !== '' && rest !== '--') continue;
      const delimStart = at === 0 ? 0 : b[at - 2] === '\r' && at >= 2 ? at - 2 : at - 1;
      starts.push({ delimStart, lineEnd, close: rest === '--' });
      if (rest === '--') break;
      from = lineEnd;
    }
    const opens = starts.filter((d) => !d.close);
    if (opens.length === 0) {
      this.defects.push(`no boundary line ${show(dash)} in the body: read as a single part`);
      return;
    }
    this.#kind = 'multipart';
    this.#preamble = b.slice(0, opens[0].delimStart);
    for (let i = 0; i < starts.length; i++) {
      const d = starts[i];
      if (d.close) {
        this.#close = b.slice(d.delimStart, d.lineEnd);
        this.#epilogue = b.slice(d.lineEnd);
        break;
      }
      const next = starts[i + 1];
      const end = next ? next.delimStart : b.length;
      this.#delims.push(b.slice(d.delimStart, d.lineEnd));
      this.#parts.push(MimePart.#parse(b.slice(d.lineEnd, Math.max(d.lineEnd, end)), this.eol, counter, depth + 1, this, digest));
    }
    if (!starts[starts.length - 1].close) this.defects.push(`multipart has no closing boundary ${show(dash + '--')}`);
  }

  /* ------------------------------------------------------------ headers */

  /** The header fields, in order. */
  get headers(): readonly MimeHeader[] {
    return this.#headers;
  }

  /**
   * The mbox envelope line before the headers (`From sender date`, without
   * its line end), as Python's `get_unixfrom()`; undefined when the message
   * has none. It is not a header field: not in {@link headers} nor in
   * {@link headerBuffer}, but {@link toBuffer} writes it back.
   */
  get unixFrom(): string | undefined {
    return this.#unixFrom ? this.#unixFrom.replace(/\r?\n$/, '') : undefined;
  }

  /** The first value of header `name` (any case), unfolded, RFC 2047 words not decoded; undefined if absent. */
  get(name: string): string | undefined {
    const n = name.toLowerCase();
    return this.#headers.find((h) => h.name.toLowerCase() === n)?.value;
  }

  /** Every value of header `name`, in order. */
  getAll(name: string): string[] {
    const n = name.toLowerCase();
    return this.#headers.filter((h) => h.name.toLowerCase() === n).map((h) => h.value);
  }

  /** The first value of header `name` with RFC 2047 encoded words decoded. */
  getDecoded(name: string): string | undefined {
    const v = this.get(name);
    if (v === undefined) return undefined;
    try {
      return libmime.decodeWords(v);
    } catch {
      return v;
    }
  }

  #parsed(name: string): { value: string; params: Record<string, string> } | undefined {
    const v = this.get(name);
    if (v === undefined) return undefined;
    const parsed = libmime.parseHeaderValue(v, { stripComments: true });
    const params: Record<string, string> = {};
    for (const [k, val] of Object.entries(parsed.params)) {
      // RFC 2231 values are decoded already; RFC 2047 words in a parameter are common in the wild
      params[k] = parsed.decodedParams.includes(k) || k === 'boundary' ? val : libmime.decodeWords(val);
    }
    return { value: parsed.value.trim().toLowerCase(), params };
  }

  /** The content type in lower case (`text/plain` when absent or malformed; `message/rfc822` inside multipart/digest). */
  get contentType(): string {
    const ct = this.#parsed('content-type')?.value;
    if (ct && /^[^/\s]+\/[^/\s]+$/.test(ct)) return ct;
    return this.#digestChild ? 'message/rfc822' : 'text/plain';
  }

  /** The Content-Type parameters (names in lower case), RFC 2231 and RFC 2047 decoded. */
  get params(): Record<string, string> {
    return this.#parsed('content-type')?.params ?? {};
  }

  /** The charset parameter in lower case, if any. */
  get charset(): string | undefined {
    return this.params.charset?.toLowerCase();
  }

  /** The Content-Transfer-Encoding in lower case (`7bit` when absent). */
  get transferEncoding(): string {
    return (this.get('content-transfer-encoding') ?? '7bit').trim().toLowerCase().replace(/\s*\(.*$/, '') || '7bit';
  }

  /** `attachment`, `inline` (or another disposition type) in lower case; undefined when absent. */
  get disposition(): string | undefined {
    return this.#parsed('content-disposition')?.value || undefined;
  }

  /** The file name: Content-Disposition `filename`, else Content-Type `name`; RFC 2231 and RFC 2047 decoded. */
  get filename(): string | undefined {
    const name = this.#parsed('content-disposition')?.params.filename ?? this.params.name;
    return name === undefined || name === '' ? undefined : name;
  }

  /* ------------------------------------------------------------ structure */

  /** Whether this is a multipart with parts. */
  ismultipart(): boolean {
    return this.#kind === 'multipart';
  }

  /** The parts of a multipart (empty for other parts). */
  get parts(): readonly MimePart[] {
    return this.#parts;
  }

  /** The enclosed message of a message/rfc822 part. */
  get message(): MimePart | undefined {
    return this.#message;
  }

  /** This part and every part below it, depth first, into enclosed messages too. */
  *walk(): Generator<MimePart> {
    yield this;
    for (const p of this.#parts) yield* p.walk();
    if (this.#message) yield* this.#message.walk();
  }

  /** The root of the tree this part is in. */
  get root(): MimePart {
    let p: MimePart = this;
    while (p.parent) p = p.parent;
    return p;
  }

  /* ------------------------------------------------------------ payload */

  /** The decoded body (transfer encoding undone). For a multipart: its raw body. */
  getPayload(): Buffer {
    if (this.#payload) return this.#payload;
    if (this.#kind === 'multipart') return Buffer.from(this.#bodyText(), 'latin1');
    if (this.#kind === 'message' && this.#message!.ismodified()) return Buffer.from(this.#message!.#text(), 'latin1');
    if (this.#kind === 'message') return decodeTransfer(Buffer.from(this.#body, 'latin1'), this.transferEncoding);
    return (this.#decoded ??= decodeTransfer(Buffer.from(this.#body, 'latin1'), this.transferEncoding));
  }

  /** The decoded original body of a leaf, kept once computed (the original never changes). */
  #decoded: Buffer | undefined;

  /** The decoded body as text in its charset (UTF-8 when the charset is unknown). */
  getText(): string {
    return decodeText(this.getPayload(), this.charset);
  }

  /** The decoded size in bytes. */
  get size(): number {
    return this.getPayload().length;
  }

  /* ------------------------------------------------------------ names */

  /**
   * Every file name in this part and below: attachment names and, with
   * `zip` (default), the members of zip attachments, nested zips included.
   * A zip that cannot be read adds nothing but its own name; see
   * {@link attachments} for the reason.
   *
   * @example
   * ```ts
   * msg.getnames();   // ['report.pdf', 'files.zip', 'readme.txt', 'inner.zip', 'setup.exe']
   * ```
   */
  getnames(options: NamesOptions = {}): string[] {
    return this.attachments(options).filter((a) => !(a.error && a.path.length === 0)).map((a) => a.name);
  }

  /** Like {@link getnames}, with the part, zip path, size and any listing error of each name. */
  attachments(options: NamesOptions = {}): AttachmentInfo[] {
    const out: AttachmentInfo[] = [];
    for (const part of this.walk()) {
      const name = part.filename;
      if (name === undefined || part.#kind === 'multipart') continue;
      const payload = part.getPayload();
      out.push({ name, part, path: [], size: payload.length });
      const zipType = /^application\/(x-)?(zip|zip-compressed)$/.test(part.contentType);
      if (options.zip !== false && (zipType || /\.zip$/i.test(name) || looksLikeZip(payload))) {
        for (const e of listZip(payload, name, options)) {
          if (e.path.length === 0) out.push({ name: e.name, part, path: [], size: e.size, error: e.error });
          else out.push({ name: e.name, part, path: e.path, size: e.size, ...(e.error ? { error: e.error } : {}) });
        }
      }
    }
    return out;
  }

  /* ------------------------------------------------------------ modification */

  /** Whether this part or any part below it was changed since parsing. */
  ismodified(): boolean {
    return this.#raw === undefined || this.#headersDirty || this.bodyModified();
  }

  /** Whether the body (everything after the header block) changed: own payload, parts, or enclosed message. */
  bodyModified(): boolean {
    return this.#bodyDirty || this.#parts.some((p) => p.ismodified()) || (this.#message?.ismodified() ?? false);
  }

  #record(change: MimeHeaderChange): void {
    if (this.parent) return;
    this.headerChanges.push(change);
    this.onHeaderChange?.(change);
  }

  #indexOfName(pos: number): number {
    const n = this.#headers[pos].name.toLowerCase();
    let k = 0;
    for (let i = 0; i <= pos; i++) if (this.#headers[i].name.toLowerCase() === n) k++;
    return k;
  }

  #makeHeader(name: string, value: string): MimeHeader {
    if (!HEADER_NAME.test(name)) throw new MimeError(`header name ${show(name)} is invalid: expected printable ASCII without spaces or colon`);
    if (/[\r\n\0]/.test(value)) throw new MimeError(`value of header ${show(name)} contains CR, LF or NUL: ${show(value)}`);
    const text = headerValueText(value);
    const folded = libmime.foldLines(`${name}: ${text}`, 76).replace(/\r?\n/g, this.eol).replace(/[ \t]+$/, '');
    return MimePart.#header(name, folded + this.eol);
  }

  /** The value of header `h` as the MTA takes it: after `name:` and one space, folds joined by `\n`. */
  static #milterValue(h: MimeHeader): string {
    return h.raw.slice(h.raw.indexOf(':') + 1).replace(/^ /, '').replace(/\r?\n$/, '').replace(/\r?\n/g, '\n');
  }

  /**
   * Add a header at the end, or at `index` (0 = first) among all headers.
   * Non-ASCII text is RFC 2047 encoded; long values are folded.
   */
  addHeader(name: string, value: string, index?: number): void {
    const h = this.#makeHeader(name, value);
    if (index === undefined || index < 0 || index >= this.#headers.length) {
      this.#headers.push(h);
      this.#record({ op: 'add', name, value: MimePart.#milterValue(h) });
    } else {
      this.#headers.splice(index, 0, h);
      this.#record({ op: 'insert', name, value: MimePart.#milterValue(h), index });
    }
    this.#headersDirty = true;
    this.#decoded = undefined;
  }

  /** Set header `name`: change its first occurrence (or the `nth`, from 1), or add it when absent. */
  setHeader(name: string, value: string, nth = 1): void {
    const pos = this.#position(name, nth);
    if (pos < 0) return this.addHeader(name, value);
    const h = this.#makeHeader(this.#headers[pos].name, value);
    this.#headers[pos] = h;
    this.#headersDirty = true;
    this.#decoded = undefined;
    this.#record({ op: 'change', name: h.name, value: MimePart.#milterValue(h), index: this.#indexOfName(pos) });
  }

  /** Remove header `name`: every occurrence, or only the `nth` (from 1). Returns how many were removed. */
  removeHeader(name: string, nth?: number): number {
    let removed = 0;
    for (;;) {
      const pos = this.#position(name, nth ?? 1);
      if (pos < 0) break;
      const index = this.#indexOfName(pos);
      const h = this.#headers.splice(pos, 1)[0];
      this.#headersDirty = true;
      this.#decoded = undefined;
      this.#record({ op: 'delete', name: h.name, index });
      removed++;
      if (nth !== undefined) break;
    }
    return removed;
  }

  #position(name: string, nth: number): number {
    const n = name.toLowerCase();
    let k = 0;
    return this.#headers.findIndex((h) => h.name.toLowerCase() === n && ++k === nth);
  }

  /**
   * Replace the decoded body of a leaf part. A string is encoded in the
   * part's charset. The transfer encoding is kept, except that 7bit becomes
   * quoted-printable when the new payload is not short ASCII lines.
   */
  setPayload(data: string | Buffer): void {
    if (this.#kind !== 'leaf') throw new MimeError(`setPayload: this part is ${this.contentType}, not a leaf part (use defang, addPart or removePart)`, 'not-a-leaf');
    const payload = typeof data === 'string' ? encodeText(data, this.charset) : Buffer.from(data);
    const cte = this.transferEncoding;
    if ((cte === '7bit' || !['8bit', 'binary', 'base64', 'quoted-printable'].includes(cte)) && !isShortAscii(payload)) {
      this.setHeader('Content-Transfer-Encoding', 'quoted-printable');
    }
    this.#payload = payload;
    this.#bodyDirty = true;
  }

  /**
   * Replace this part (an attachment, a multipart, an enclosed message) by
   * a short text/plain notice naming the removed file. Its Content-* headers
   * are replaced; other headers stay. Returns the name that was removed
   * (the filename, or the content type when it had none).
   */
  defang(options: DefangOptions = {}): string {
    const name = this.filename ?? this.contentType;
    const notice =
      typeof options.notice === 'function'
        ? options.notice(this, name)
        : options.notice ??
          `An attachment was removed from this message: "${name}" (${this.contentType}, ${this.size} bytes). ` +
            'Files of this kind can harm your computer.' +
            this.eol;
    for (const h of [...this.#headers]) if (/^content-/i.test(h.name)) this.removeHeader(h.name);
    this.addHeader('Content-Type', 'text/plain; charset=utf-8');
    this.addHeader('Content-Transfer-Encoding', isShortAscii(Buffer.from(notice, 'utf8')) ? '7bit' : 'quoted-printable');
    this.addHeader('Content-Disposition', 'inline');
    this.#kind = 'leaf';
    for (const p of this.#parts) p.parent = undefined;
    this.#parts = [];
    this.#delims = [];
    if (this.#message) this.#message.parent = undefined;
    this.#message = undefined;
    this.#payload = Buffer.from(notice, 'utf8');
    this.#bodyDirty = true;
    if (!this.#sep) this.#sep = this.eol;
    return name;
  }

  /**
   * Remove `<script>` elements (and an unclosed `<script` to the end) from
   * every text/html part here and below, keeping charset and transfer
   * encoding. Returns how many were removed. This takes scripts out; it is
   * not a full HTML sanitizer (event attributes stay).
   *
   * With `marker`, each removed element is replaced by a comment, as
   * pymilter's `HTMLScriptFilter` does: `true` writes pymilter's
   * {@link SCRIPT_REMOVED_MARKER}, a string writes that string. An
   * unclosed `<script` gets no marker (pymilter writes none either).
   *
   * @example
   * ```ts
   * const msg = parseMime('Content-Type: text/html\r\n\r\n<p>hi</p><script>alert(1)</script>\r\n');
   * msg.stripScripts({ marker: true });   // 1
   * msg.getText();                         // '<p>hi</p><!-- WARNING: embedded script removed -->\r\n'
   * ```
   */
  stripScripts(options: StripScriptsOptions = {}): number {
    const marker = options.marker === true ? SCRIPT_REMOVED_MARKER : typeof options.marker === 'string' ? options.marker : '';
    if (options.marker !== undefined && typeof options.marker !== 'boolean' && typeof options.marker !== 'string') {
      throw new MimeError(`stripScripts: marker must be a boolean or a string, got ${typeof options.marker}`, 'bad-input');
    }
    let count = 0;
    for (const part of this.walk()) {
      if (part.#kind !== 'leaf' || part.contentType !== 'text/html') continue;
      const text = part.getText();
      let out = text;
      let before: string;
      do {
        before = out;
        out = out.replace(/<script\b[^>]*>[\s\S]*?<\/script\s*>/gi, () => {
          count++;
          return marker;
        });
        // only when no whole element is left: an unclosed one runs to the end
        if (out === before) {
          out = out.replace(/<script\b[\s\S]*$/i, () => {
            count++;
            return '';
          });
        }
      } while (out !== before);
      if (out !== text) part.setPayload(out);
    }
    return count;
  }

  /** Add `part` to this multipart, at the end or at `index`. */
  addPart(part: MimePart, index?: number): void {
    if (this.#kind !== 'multipart') throw new MimeError(`addPart: this part is ${this.contentType}, not a multipart`, 'not-a-multipart');
    if (part.parent) throw new MimeError('addPart: the part is already in a tree; remove it first', 'bad-input');
    const at = index === undefined || index < 0 || index > this.#parts.length ? this.#parts.length : index;
    part.parent = this;
    this.#parts.splice(at, 0, part);
    this.#delims.splice(at, 0, `${this.eol}--${this.#rawBoundary()}${this.eol}`);
    this.#bodyDirty = true;
  }

  /** Remove a part (or the part at `index`) from this multipart. Returns the removed part. */
  removePart(part: MimePart | number): MimePart {
    const at = typeof part === 'number' ? part : this.#parts.indexOf(part);
    if (at < 0 || at >= this.#parts.length) throw new MimeError(`removePart: ${typeof part === 'number' ? `index ${part}` : 'that part'} is not a part of this multipart`, 'not-a-child');
    const [removed] = this.#parts.splice(at, 1);
    this.#delims.splice(at, 1);
    removed.parent = undefined;
    this.#bodyDirty = true;
    return removed;
  }

  /**
   * Make a new leaf part to add with {@link addPart}.
   *
   * @example
   * ```ts
   * msg.addPart(MimePart.create({ body: 'Scanned: 2 attachments removed.\r\n' }));
   * msg.addPart(MimePart.create({ contentType: 'application/pdf', filename: 'report.pdf', body: pdfBytes }));
   * ```
   */
  static create(options: CreatePartOptions): MimePart {
    const eol = options.eol ?? '\r\n';
    const type = options.contentType ?? 'text/plain';
    const charset = options.charset ?? (typeof options.body === 'string' ? 'utf-8' : undefined);
    const payload = typeof options.body === 'string' ? encodeText(options.body, charset) : options.body;
    const params: Record<string, string> = {};
    if (charset && type.startsWith('text/')) params.charset = charset;
    if (options.filename !== undefined) params.name = options.filename;
    const encoding = options.encoding ?? (isShortAscii(payload) ? '7bit' : type.startsWith('text/') ? 'quoted-printable' : 'base64');
    const lines: string[] = [];
    const add = (name: string, value: string) => lines.push(libmime.foldLines(`${name}: ${value}`, 76).replace(/\r?\n/g, eol) + eol);
    add('Content-Type', libmime.buildHeaderValue({ value: type, params }));
    add('Content-Transfer-Encoding', encoding);
    const disposition = options.disposition ?? (options.filename !== undefined ? 'attachment' : undefined);
    if (disposition) {
      add('Content-Disposition', libmime.buildHeaderValue({ value: disposition, params: options.filename !== undefined ? { filename: options.filename } : {} }));
    }
    for (const [k, v] of options.headers ?? []) add(k, headerValueText(v));
    const raw = lines.join('') + eol + encodeTransfer(payload, encoding, eol).toString('latin1');
    const part = MimePart.#parse(raw, eol, { parts: 0, maxParts: 10000, maxDepth: 50 }, 0, undefined, false);
    part.#raw = undefined; // a new part counts as a change wherever it goes
    return part;
  }

  /* ------------------------------------------------------------ serialization */

  #text(): string {
    if (!this.ismodified() && this.#raw !== undefined) return this.#raw;
    return this.#unixFrom + this.#headerText() + this.#bodyText();
  }

  #headerText(): string {
    let sep = this.#sep;
    if (!sep && this.ismodified() && this.#bodyDirty) sep = this.eol;
    return this.#headers.map((h) => h.raw).join('') + sep;
  }

  #bodyText(): string {
    if (!this.bodyModified()) return this.#body;
    if (this.#payload) return encodeTransfer(this.#payload, this.transferEncoding, this.eol).toString('latin1');
    if (this.#kind === 'message') return encodeTransfer(Buffer.from(this.#message!.#text(), 'latin1'), this.transferEncoding, this.eol).toString('latin1');
    if (this.#kind === 'multipart') {
      let out = this.#preamble;
      const boundary = this.#rawBoundary();
      this.#parts.forEach((p, i) => {
        let d = this.#delims[i];
        if ((i > 0 || out.length > 0) && !/^\r?\n/.test(d)) d = this.eol + d;
        out += d + p.#text();
      });
      out += this.#close || `${this.eol}--${boundary}--${this.eol}`;
      return out + this.#epilogue;
    }
    return this.#body;
  }

  /** The whole part as bytes: the original bytes when nothing changed. */
  toBuffer(): Buffer {
    return Buffer.from(this.#text(), 'latin1');
  }

  /** The header block (fields and the blank line after them) as bytes. */
  headerBuffer(): Buffer {
    return Buffer.from(this.#headerText(), 'latin1');
  }

  /** The body (everything after the header block) as bytes: what replacebody needs. */
  bodyBuffer(): Buffer {
    return Buffer.from(this.#bodyText(), 'latin1');
  }
}

/** Whether bytes are 7-bit text with lines of at most 998 characters (safe as 7bit). */
function isShortAscii(data: Buffer): boolean {
  let run = 0;
  for (const c of data) {
    if (c >= 0x80 || c === 0) return false;
    if (c === 0x0a) run = 0;
    else if (++run > 998) return false;
  }
  return true;
}
