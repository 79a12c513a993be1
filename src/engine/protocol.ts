/**
 * The milter wire format, milter side: frames (4-byte big-endian length,
 * one command byte, data), the commands an MTA sends and the replies a
 * milter sends, and the codecs for their data. No I/O here.
 *
 * @internal
 * @module
 */
import { MAX_DATA_SIZE } from '../constants';

/** MTA → milter command bytes (SMFIC_*). */
export const Cmd = {
  ABORT: 0x41, // 'A'
  BODY: 0x42, // 'B'
  CONNECT: 0x43, // 'C'
  MACRO: 0x44, // 'D'
  BODYEOB: 0x45, // 'E'
  HELO: 0x48, // 'H'
  QUIT_NC: 0x4b, // 'K'
  HEADER: 0x4c, // 'L'
  MAIL: 0x4d, // 'M'
  EOH: 0x4e, // 'N'
  OPTNEG: 0x4f, // 'O'
  QUIT: 0x51, // 'Q'
  RCPT: 0x52, // 'R'
  DATA: 0x54, // 'T'
  UNKNOWN: 0x55, // 'U'
} as const;

/** Milter → MTA reply bytes (SMFIR_*). */
export const Rep = {
  ADDRCPT: 0x2b, // '+'
  DELRCPT: 0x2d, // '-'
  ADDRCPT_PAR: 0x32, // '2'
  ACCEPT: 0x61, // 'a'
  REPLBODY: 0x62, // 'b'
  CONTINUE: 0x63, // 'c'
  DISCARD: 0x64, // 'd'
  CHGFROM: 0x65, // 'e'
  ADDHEADER: 0x68, // 'h'
  INSHEADER: 0x69, // 'i'
  CHGHEADER: 0x6d, // 'm'
  PROGRESS: 0x70, // 'p'
  QUARANTINE: 0x71, // 'q'
  REJECT: 0x72, // 'r'
  SKIP: 0x73, // 's'
  TEMPFAIL: 0x74, // 't'
  REPLYCODE: 0x79, // 'y'
  OPTNEG: 0x4f, // 'O'
} as const;

/** The protocol version this engine speaks. */
export const PROTOCOL_VERSION = 6;
/** The oldest MTA protocol version accepted (libmilter's SMFI_PROT_VERSION_MIN). */
export const MIN_PROTOCOL_VERSION = 2;

/** One command read off the socket. */
export interface Frame {
  cmd: number;
  data: Buffer;
  /**
   * The data is a copy of its own (the frame spanned reads); otherwise it
   * is a view into the chunk read off the socket, which a receiver that
   * keeps it should copy.
   */
  owned: boolean;
}

/** What {@link FrameReader.next} found. */
export type ReadResult = Frame | { tooBig: number } | undefined;

/**
 * Cuts a byte stream into frames. A frame whose data is larger than
 * `maxData` is reported as `{ tooBig }` as soon as its length is read (the
 * session ends then). A length of 0 has no command byte; like libmilter,
 * the byte after the length is then taken as the command, with no data.
 *
 * The chunks read off the socket are kept as they came: a frame inside one
 * chunk is a view of it, a frame across chunks is copied once into a buffer
 * of its own size. Nothing is copied again however much is buffered, so a
 * flood costs time linear in its size.
 */
export class FrameReader {
  private chunks: Buffer[] = [];
  /** Offset of the first unread byte in chunks[0]. */
  private off = 0;
  private size = 0;
  private readonly head = Buffer.allocUnsafe(5);

  constructor(readonly maxData = MAX_DATA_SIZE) {}

  push(b: Buffer): void {
    if (b.length === 0) return;
    this.chunks.push(b);
    this.size += b.length;
  }

  /** Bytes buffered but not yet framed. */
  get buffered(): number {
    return this.size;
  }

  /** Copy the next `n` buffered bytes into `to` at `at` (or drop them), consuming them. */
  private take(n: number, to: Buffer | undefined, at: number): void {
    this.size -= n;
    while (n > 0) {
      const c = this.chunks[0];
      const k = Math.min(n, c.length - this.off);
      if (to) c.copy(to, at, this.off, this.off + k);
      at += k;
      n -= k;
      this.off += k;
      if (this.off === c.length) {
        this.chunks.shift();
        this.off = 0;
      }
    }
  }

  next(): ReadResult {
    if (this.size < 5) return undefined;
    let c = this.chunks[0];
    let off = this.off;
    if (c.length - off < 5) {
      // The length and command byte span chunks (rare): peek at them.
      let got = 0;
      for (let i = 0; got < 5; i++) {
        const ch = this.chunks[i];
        const from = i === 0 ? off : 0;
        const k = Math.min(5 - got, ch.length - from);
        ch.copy(this.head, got, from, from + k);
        got += k;
      }
      c = this.head;
      off = 0;
    }
    const len = c.readUInt32BE(off);
    const dataLen = len === 0 ? 0 : len - 1;
    if (dataLen > this.maxData) return { tooBig: dataLen };
    const total = 5 + dataLen;
    if (this.size < total) return undefined;
    const cmd = c[off + 4];
    const first = this.chunks[0];
    if (first.length - this.off >= total) {
      const data = first.subarray(this.off + 5, this.off + total);
      this.off += total;
      this.size -= total;
      if (this.off === first.length) {
        this.chunks.shift();
        this.off = 0;
      }
      return { cmd, data, owned: false };
    }
    this.take(5, undefined, 0);
    const data = Buffer.allocUnsafe(dataLen);
    this.take(dataLen, data, 0);
    return { cmd, data, owned: true };
  }
}

/** One frame: length, command byte, data. */
export function frame(cmd: number, ...parts: Buffer[]): Buffer {
  let n = 0;
  for (const p of parts) n += p.length;
  const out = Buffer.allocUnsafe(5 + n);
  out.writeUInt32BE(n + 1, 0);
  out[4] = cmd;
  let off = 5;
  for (const p of parts) {
    p.copy(out, off);
    off += p.length;
  }
  return out;
}

/** Size of the blocks {@link FrameWriter} builds small frames in. */
export const OUT_BLOCK = 16 * 1024;
/**
 * Size of a writer's first block, taken from Node's shared buffer pool
 * (Buffer.allocUnsafe) rather than allocated on its own: most connections
 * write a few hundred bytes in all (negotiation, and an answer or two per
 * message), and a 16 KiB ArrayBuffer of their own per connection is
 * external memory that V8 collects only by a full mark-compact. With one
 * message per connection that was 4 times as many mark-compacts as
 * bench/ceiling/bare.cjs had (S3, 8 connections).
 */
export const OUT_FIRST_BLOCK = 1024;
/** Data at least this large is sent by reference, not copied into a block. */
const BY_REFERENCE = 8 * 1024;

/**
 * Builds reply frames straight into blocks of {@link OUT_BLOCK} bytes (the
 * first, {@link OUT_FIRST_BLOCK}, from the shared pool), with
 * no temporary buffer per string or number: a run of small frames (the
 * actions and the reply of one eom) leaves as one buffer, and queued output
 * costs what goes on the wire, not a pool slab per frame. Large data
 * (replacebody chunks) is queued by reference after its 5-byte head.
 * {@link take} hands over what was built since the last call.
 */
export class FrameWriter {
  private block: Buffer | undefined;
  /** Where the next frame goes in `block`, and where the untaken part begins. */
  private pos = 0;
  private start = 0;
  /** Finished pieces not yet taken (full blocks, large data). */
  private pieces: Buffer[] = [];
  /** Bytes built and not yet taken. */
  pending = 0;

  /** Room for `n` bytes in the current block. */
  private room(n: number): Buffer {
    let b = this.block;
    if (b && b.length - this.pos >= n) return b;
    if (b && this.pos > this.start) this.pieces.push(b.subarray(this.start, this.pos));
    b = this.block = !b && n <= OUT_FIRST_BLOCK ? Buffer.allocUnsafe(OUT_FIRST_BLOCK) : Buffer.allocUnsafeSlow(Math.max(OUT_BLOCK, n));
    this.pos = this.start = 0;
    return b;
  }

  private head(b: Buffer, cmd: number, dataLen: number): void {
    b.writeUInt32BE(dataLen + 1, this.pos);
    b[this.pos + 4] = cmd;
    this.pos += 5;
    this.pending += 5 + dataLen;
  }

  /** A frame with no data. */
  empty(cmd: number): void {
    this.head(this.room(5), cmd, 0);
  }

  /**
   * A frame of NUL-terminated strings (UTF-8 for a string), after a 32-bit
   * number when `n` is given (INSHEADER, CHGHEADER).
   */
  strings(cmd: number, n: number | undefined, a: string | Buffer, b?: string | Buffer): void {
    const la = typeof a === 'string' ? Buffer.byteLength(a, 'utf8') : a.length;
    const lb = b === undefined ? -1 : typeof b === 'string' ? Buffer.byteLength(b, 'utf8') : b.length;
    const dataLen = (n === undefined ? 0 : 4) + la + 1 + (lb < 0 ? 0 : lb + 1);
    const buf = this.room(5 + dataLen);
    this.head(buf, cmd, dataLen);
    if (n !== undefined) {
      buf.writeUInt32BE(n >>> 0, this.pos);
      this.pos += 4;
    }
    this.pos += typeof a === 'string' ? buf.write(a, this.pos, 'utf8') : a.copy(buf, this.pos);
    buf[this.pos++] = 0;
    if (b !== undefined) {
      this.pos += typeof b === 'string' ? buf.write(b, this.pos, 'utf8') : b.copy(buf, this.pos);
      buf[this.pos++] = 0;
    }
  }

  /** A frame of three 32-bit big-endian numbers (the OPTNEG reply without symbol lists). */
  words(cmd: number, w0: number, w1: number, w2: number): void {
    const buf = this.room(17);
    this.head(buf, cmd, 12);
    buf.writeUInt32BE(w0 >>> 0, this.pos);
    buf.writeUInt32BE(w1 >>> 0, this.pos + 4);
    buf.writeUInt32BE(w2 >>> 0, this.pos + 8);
    this.pos += 12;
  }

  /** A frame whose data is `data` as it is, then a NUL when `nul`. */
  raw(cmd: number, data: Buffer, nul = false): void {
    const dataLen = data.length + (nul ? 1 : 0);
    if (data.length < BY_REFERENCE || nul) {
      const buf = this.room(5 + dataLen);
      this.head(buf, cmd, dataLen);
      this.pos += data.copy(buf, this.pos);
      if (nul) buf[this.pos++] = 0;
      return;
    }
    const buf = this.room(5);
    this.head(buf, cmd, dataLen);
    this.pieces.push(buf.subarray(this.start, this.pos), data);
    this.start = this.pos;
  }

  /** What was built since the last call, in order (empty when nothing was). */
  take(): Buffer[] {
    const out = this.pieces;
    if (this.block && this.pos > this.start) {
      out.push(this.block.subarray(this.start, this.pos));
      this.start = this.pos;
    }
    this.pieces = [];
    this.pending = 0;
    return out;
  }
}

const NUL = Buffer.from([0]);

/** A string (UTF-8) or Buffer followed by NUL. */
export function cstr(v: string | Buffer): Buffer {
  const b = typeof v === 'string' ? Buffer.from(v, 'utf8') : v;
  return Buffer.concat([b, NUL]);
}

/** A 32-bit big-endian unsigned number. */
export function u32(n: number): Buffer {
  const b = Buffer.allocUnsafe(4);
  b.writeUInt32BE(n >>> 0, 0);
  return b;
}

/**
 * Split data into its NUL-terminated strings. Bytes after the last NUL
 * (an unterminated tail) form a last string too.
 */
export function splitStrings(data: Buffer): Buffer[] {
  const out: Buffer[] = [];
  let off = 0;
  while (off < data.length) {
    let nul = data.indexOf(0, off);
    if (nul < 0) nul = data.length;
    out.push(data.subarray(off, nul));
    off = nul + 1;
  }
  return out;
}

/** A Buffer as the dispatcher's raw text: a string when ASCII, else the Buffer (decoded later). */
export function rawText(b: Buffer): string | Buffer {
  return rawTextIn(b, 0, b.length);
}

/**
 * {@link rawText} of the bytes `start` to `end` of `b`, without making a
 * view of them first (no Buffer object per field when the text is ASCII,
 * as it almost always is); 8-bit text is copied out as a Buffer of its own.
 */
export function rawTextIn(b: Buffer, start: number, end: number): string | Buffer {
  return asciiIn(b, start, end) ? b.toString('latin1', start, end) : Buffer.from(b.subarray(start, end));
}

/** Whether the bytes `start` to `end` of `b` are all ASCII (checked in place, no view made). */
function asciiIn(b: Buffer, start: number, end: number): boolean {
  for (let i = start; i < end; i++) if (b[i] >= 0x80) return false;
  return true;
}

/**
 * {@link splitStrings} of the bytes from `start` to `end` as raw text
 * ({@link rawText} of each), in one decode when they are ASCII.
 */
export function rawStringsIn(b: Buffer, start: number, end: number): (string | Buffer)[] {
  return asciiIn(b, start, end) ? asciiStringsIn(b, start, end) : splitStrings(b.subarray(start, end)).map(rawText);
}

/** {@link splitStrings} of bytes known to be ASCII, as strings, in one decode. */
export function asciiStringsIn(b: Buffer, start: number, end: number): string[] {
  if (start >= end) return [];
  const out = b.toString('latin1', start, end).split('\0');
  if (b[end - 1] === 0) out.pop();
  return out;
}
