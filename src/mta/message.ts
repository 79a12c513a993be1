/**
 * The message as the MTA side holds it between milters: a header list that
 * takes milter edits the way Postfix's cleanup applies them, and a body
 * spooled to memory up to a threshold and to a temporary file beyond it, so
 * a large body is never held whole in memory.
 *
 * @module
 */
import * as fs from 'fs';
import * as os from 'os';
import * as path from 'path';
import { Readable } from 'stream';
import { InvalidArgumentError, ProtocolError } from '../errors';
import type { Bytes } from '../types';
import type { EomAction } from './connection';

/**
 * One header as it stands in the message: its name and every byte after the
 * colon (the leading space included), folded lines joined with LF, as
 * Postfix keeps them in its queue file.
 */
export interface MessageHeader {
  /** The name, as written. */
  name: string;
  /** The bytes after the colon, lines joined with `"\n"`. */
  value: Buffer;
  /**
   * Not shown to milters, though it counts for header indexes: the MTA's
   * own Received header, as Postfix keeps its own from its milters.
   */
  hidden?: boolean;
}

/** Options of {@link HeaderList.apply}. */
export interface HeaderEditOptions {
  /** SMFIP_HDR_LEADSPC was negotiated: values are put after the colon exactly as sent. Otherwise one space goes first. */
  leadingSpace?: boolean;
}

const LF = 0x0a;

/**
 * A message's headers, with the milter edits applied as Postfix applies
 * them: addheader appends; insheader puts the header before the header at
 * its 0-based index (at the end when there are fewer; hidden headers count);
 * chgheader replaces the index-th (from 1) header of that name among those
 * the milter saw (hidden ones do not count), compared case-insensitively,
 * deletes it when the value is empty, and appends the header when there are
 * fewer.
 * Values keep their bytes: a CR the milter sent stays, and every LF becomes
 * CRLF on output, which is how Postfix delivers a value `one\r\n\ttwo` as
 * `one\r\r\n\ttwo`.
 */
export class HeaderList {
  /** The headers in order. */
  readonly headers: MessageHeader[];

  constructor(headers: readonly MessageHeader[] = []) {
    this.headers = headers.map((h) => ({ ...h }));
  }

  /** A copy. */
  clone(): HeaderList {
    return new HeaderList(this.headers);
  }

  /** The value as a milter receives it: without the one leading space unless SMFIP_HDR_LEADSPC. */
  static milterValue(h: MessageHeader, leadingSpace: boolean): Buffer {
    return !leadingSpace && h.value[0] === 0x20 ? h.value.subarray(1) : h.value;
  }

  /** Apply one end-of-message action; actions that are not header edits are ignored. */
  apply(a: EomAction, options: HeaderEditOptions = {}): void {
    if (a.type !== 'addheader' && a.type !== 'insheader' && a.type !== 'chgheader') return;
    const stored = options.leadingSpace ? Buffer.from(a.valueBytes) : Buffer.concat([Buffer.from(' '), a.valueBytes]);
    const h: MessageHeader = { name: a.name, value: stored };
    if (a.type === 'addheader') this.headers.push(h);
    else if (a.type === 'insheader') this.headers.splice(Math.min(a.index, this.headers.length), 0, h);
    else {
      const lower = a.name.toLowerCase();
      let seen = 0;
      // counted among the headers the milter saw: Postfix skips its own hidden Received header here
      const at = this.headers.findIndex((x) => !x.hidden && x.name.toLowerCase() === lower && ++seen === Math.max(a.index, 1));
      if (a.valueBytes.length === 0) {
        if (at >= 0) this.headers.splice(at, 1);
      } else if (at >= 0) this.headers[at] = { name: this.headers[at].name, value: stored };
      else this.headers.push(h);
    }
  }

  /** The header section as it goes on the wire: `name:value` CRLF each (every LF in a value becomes CRLF), without the empty line. */
  toBuffer(): Buffer {
    const parts: Buffer[] = [];
    for (const h of this.headers) parts.push(Buffer.from(`${h.name}:`, 'latin1'), lfToCrlf(h.value), Buffer.from('\r\n'));
    return Buffer.concat(parts);
  }
}

/** Every LF becomes CRLF, whatever comes before it (a CR before it stays). */
function lfToCrlf(b: Buffer): Buffer {
  if (!b.includes(LF)) return b;
  return Buffer.from(b.toString('latin1').replace(/\n/g, '\r\n'), 'latin1');
}

/** An envelope recipient. */
export interface Recipient {
  /** The address with angle brackets, as in RCPT TO. */
  address: string;
  /** ESMTP parameters. */
  params: string[];
}

/** The envelope as it stands after the milters. */
export interface ChainEnvelope {
  /** The sender with angle brackets, as in MAIL FROM. */
  sender: string;
  /** ESMTP parameters of MAIL FROM (or of a milter's chgfrom). */
  senderParams: string[];
  /** The recipients: the accepted ones, minus delrcpt, plus addrcpt. */
  recipients: Recipient[];
}

/** `<a@b>` without its angle brackets. */
export function stripBrackets(a: string): string {
  return a.startsWith('<') && a.endsWith('>') ? a.slice(1, -1) : a;
}

/** Options of {@link applyModifications}. */
export interface ModifyOptions extends HeaderEditOptions {
  /** Where a replacement body is spooled. */
  spool?: SpoolOptions;
}

/**
 * Apply one milter's end-of-message modifications as Postfix does: header
 * edits to `headers` (see {@link HeaderList}), chgfrom, addrcpt and delrcpt
 * (compared without angle brackets, case-sensitively, as Postfix) to `envelope`, both
 * in place. Returns the replacement body, if the milter replaced it, and
 * the quarantine reasons.
 */
export function applyModifications(
  actions: readonly EomAction[],
  headers: HeaderList,
  envelope: ChainEnvelope,
  options: ModifyOptions = {},
): { replacedBody?: BodySpool; quarantine: string[] } {
  let replaced: BodySpool | undefined;
  const quarantine: string[] = [];
  const words = (p: string | undefined) => (p ? p.split(' ').filter(Boolean) : []);
  for (const a of actions) {
    switch (a.type) {
      case 'addheader':
      case 'insheader':
      case 'chgheader':
        headers.apply(a, options);
        break;
      case 'addrcpt':
        envelope.recipients.push({ address: a.rcpt, params: [] });
        break;
      case 'addrcpt_par':
        envelope.recipients.push({ address: a.rcpt, params: words(a.params) });
        break;
      case 'delrcpt': {
        // exact, case and all, as Postfix matches it (measured: <CAROL@x> does not delete <carol@x>)
        const gone = stripBrackets(a.rcpt);
        envelope.recipients = envelope.recipients.filter((r) => stripBrackets(r.address) !== gone);
        break;
      }
      case 'chgfrom':
        envelope.sender = a.sender;
        envelope.senderParams = words(a.params);
        break;
      case 'replbody':
        replaced ??= new BodySpool(options.spool);
        replaced.write(a.chunk);
        break;
      case 'quarantine':
        quarantine.push(a.reason);
        break;
    }
  }
  replaced?.end();
  return replaced ? { replacedBody: replaced, quarantine } : { quarantine };
}

/** Options of {@link BodySpool}. */
export interface SpoolOptions {
  /** Bytes kept in memory before the body moves to a temporary file. Default 1 MiB. */
  memoryLimit?: number;
  /** Directory for the temporary file. Default `os.tmpdir()`. */
  tmpDir?: string;
}

/** Default {@link SpoolOptions.memoryLimit}: 1 MiB. */
export const DEFAULT_SPOOL_MEMORY = 1024 * 1024;

/**
 * A message body written once and read any number of times: in memory up to
 * `memoryLimit` bytes, in a temporary file (removed by {@link dispose})
 * beyond.
 */
export class BodySpool {
  private chunks: Buffer[] = [];
  private mem = 0;
  private file: { dir: string; path: string; fd: number } | undefined;
  private size = 0;
  private ended = false;
  private readonly memoryLimit: number;
  private readonly tmpDir: string;

  constructor(options: SpoolOptions = {}) {
    this.memoryLimit = options.memoryLimit ?? DEFAULT_SPOOL_MEMORY;
    if (!Number.isInteger(this.memoryLimit) || this.memoryLimit < 0) {
      throw new InvalidArgumentError(`memoryLimit must be a whole number of bytes >= 0, got ${options.memoryLimit}`);
    }
    this.tmpDir = options.tmpDir ?? os.tmpdir();
  }

  /** A spool holding `body`. */
  static from(body: Bytes, options: SpoolOptions = {}): BodySpool {
    const s = new BodySpool(options);
    s.write(typeof body === 'string' ? Buffer.from(body, 'utf8') : body);
    s.end();
    return s;
  }

  /** The body's length in bytes. */
  get length(): number {
    return this.size;
  }

  /** Whether the body went to a temporary file. */
  get onDisk(): boolean {
    return this.file !== undefined;
  }

  /** Append bytes. */
  write(b: Buffer): void {
    if (this.ended) throw new InvalidArgumentError('BodySpool.write after end()');
    if (b.length === 0) return;
    this.size += b.length;
    if (!this.file && this.mem + b.length <= this.memoryLimit) {
      this.chunks.push(Buffer.from(b));
      this.mem += b.length;
      return;
    }
    if (!this.file) {
      const dir = fs.mkdtempSync(path.join(this.tmpDir, 'nodemilter-spool-'));
      const p = path.join(dir, 'body');
      this.file = { dir, path: p, fd: fs.openSync(p, 'w+', 0o600) };
      for (const c of this.chunks) fs.writeSync(this.file.fd, c);
      this.chunks = [];
      this.mem = 0;
    }
    fs.writeSync(this.file.fd, b);
  }

  /** No more writes. */
  end(): void {
    this.ended = true;
  }

  /** The body in chunks of at most `size` bytes. */
  async *chunksOf(size: number): AsyncGenerator<Buffer> {
    if (!this.file) {
      let pending: Buffer[] = [];
      let n = 0;
      for (const c of this.chunks) {
        for (let off = 0; off < c.length; ) {
          const take = Math.min(size - n, c.length - off);
          pending.push(c.subarray(off, off + take));
          n += take;
          off += take;
          if (n === size) {
            yield pending.length === 1 ? pending[0] : Buffer.concat(pending);
            pending = [];
            n = 0;
          }
        }
      }
      if (n > 0) yield Buffer.concat(pending);
      return;
    }
    const buf = Buffer.alloc(size);
    for (let pos = 0; pos < this.size; ) {
      const got = await new Promise<number>((resolve, reject) =>
        fs.read(this.file!.fd, buf, 0, Math.min(size, this.size - pos), pos, (e, n) => (e ? reject(e) : resolve(n))),
      );
      if (got === 0) throw new ProtocolError(`the body spool ${this.file.path} ended early at ${pos} of ${this.size} bytes`, 'truncated');
      pos += got;
      yield Buffer.from(buf.subarray(0, got));
    }
  }

  /** The body as one Buffer (reads the file if it is on disk). */
  async toBuffer(): Promise<Buffer> {
    const parts: Buffer[] = [];
    for await (const c of this.chunksOf(65536)) parts.push(c);
    return Buffer.concat(parts);
  }

  /** A readable stream of the body. */
  stream(): Readable {
    return Readable.from(this.chunksOf(65536));
  }

  /** Remove the temporary file, if any. Safe to call twice. */
  dispose(): void {
    if (this.file) {
      try {
        fs.closeSync(this.file.fd);
      } catch {
        /* closed already */
      }
      fs.rmSync(this.file.dir, { recursive: true, force: true });
      this.file = undefined;
    }
    this.chunks = [];
  }
}

/** Options of {@link readMessage}. */
export interface ReadMessageOptions extends SpoolOptions {
  /** Largest header section accepted, in bytes. Default 1 MiB (Postfix's `header_size_limit` is per header, 100 KiB, and it keeps at most 1000 headers). */
  maxHeaderBytes?: number;
}

/**
 * Read an RFC 5322 message from a stream: the headers into a
 * {@link HeaderList} (CRLF folding joined with LF), the body, with bare LF
 * turned into CRLF, into a {@link BodySpool}. The headers end at the first
 * empty line, or at the first line that is neither a header nor a
 * continuation line (that line starts the body), as Postfix decides.
 *
 * @throws ProtocolError (`oversize`) when the header section passes `maxHeaderBytes`.
 */
export async function readMessage(
  input: AsyncIterable<Buffer | string> | Buffer | string,
  options: ReadMessageOptions = {},
): Promise<{ headers: HeaderList; body: BodySpool }> {
  const maxHeaderBytes = options.maxHeaderBytes ?? 1024 * 1024;
  const body = new BodySpool(options);
  const headers: MessageHeader[] = [];
  let inHeaders = true;
  let line: Buffer[] = [];
  let lineLen = 0;
  let headerBytes = 0;
  let lastWasCr = false;
  const bodyWrite = (b: Buffer) => {
    // bare LF -> CRLF, keeping state across chunks
    let start = 0;
    const out: Buffer[] = [];
    for (let i = 0; i < b.length; i++) {
      if (b[i] === LF && !(i > 0 ? b[i - 1] === 0x0d : lastWasCr)) {
        out.push(b.subarray(start, i), Buffer.from('\r'));
        start = i;
      }
    }
    out.push(b.subarray(start));
    if (b.length) lastWasCr = b[b.length - 1] === 0x0d;
    body.write(out.length === 1 ? out[0] : Buffer.concat(out));
  };
  const endHeaderLine = (l: Buffer): boolean => {
    let text = l.toString('latin1');
    if (text.endsWith('\n')) text = text.slice(0, -1);
    if (text.endsWith('\r')) text = text.slice(0, -1);
    if (text === '') return false;
    if ((text[0] === ' ' || text[0] === '\t') && headers.length > 0) {
      const h = headers[headers.length - 1];
      h.value = Buffer.concat([h.value, Buffer.from('\n' + text, 'latin1')]);
      return true;
    }
    const colon = text.indexOf(':');
    if (colon <= 0 || /\s/.test(text.slice(0, colon).trimEnd()) || text[0] === ' ' || text[0] === '\t') {
      bodyWrite(l);
      return false;
    }
    headers.push({ name: text.slice(0, colon).trimEnd(), value: Buffer.from(text.slice(colon + 1), 'latin1') });
    return true;
  };
  const source: AsyncIterable<Buffer | string> | Iterable<Buffer | string> =
    typeof input === 'string' || Buffer.isBuffer(input) ? [input] : (input as AsyncIterable<Buffer | string>);
  try {
    for await (const piece of source) {
      const chunk = typeof piece === 'string' ? Buffer.from(piece, 'latin1') : piece;
      if (!inHeaders) {
        bodyWrite(chunk);
        continue;
      }
      let start = 0;
      for (let i = 0; i < chunk.length && inHeaders; i++) {
        if (chunk[i] !== LF) continue;
        line.push(chunk.subarray(start, i + 1));
        lineLen += i + 1 - start;
        start = i + 1;
        headerBytes += lineLen;
        if (headerBytes > maxHeaderBytes) {
          throw new ProtocolError(`the header section is longer than maxHeaderBytes (${maxHeaderBytes})`, 'oversize');
        }
        const l = Buffer.concat(line);
        line = [];
        lineLen = 0;
        if (!endHeaderLine(l)) inHeaders = false;
      }
      if (inHeaders) {
        line.push(chunk.subarray(start));
        lineLen += chunk.length - start;
        if (headerBytes + lineLen > maxHeaderBytes) {
          throw new ProtocolError(`the header section is longer than maxHeaderBytes (${maxHeaderBytes})`, 'oversize');
        }
      } else if (start < chunk.length) bodyWrite(chunk.subarray(start));
    }
    if (inHeaders && lineLen > 0) endHeaderLine(Buffer.concat(line));
  } catch (e) {
    body.dispose();
    throw e;
  }
  body.end();
  return { headers: new HeaderList(headers), body };
}
