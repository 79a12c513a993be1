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
}

/** What {@link FrameReader.next} found. */
export type ReadResult = Frame | { tooBig: number } | undefined;

/**
 * Cuts a byte stream into frames. A frame whose data is larger than
 * `maxData` is reported as `{ tooBig }` as soon as its length is read (the
 * session ends then). A length of 0 has no command byte; like libmilter,
 * the byte after the length is then taken as the command, with no data.
 */
export class FrameReader {
  private chunks: Buffer[] = [];
  private size = 0;

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

  private flat(): Buffer {
    if (this.chunks.length > 1) this.chunks = [Buffer.concat(this.chunks, this.size)];
    return this.chunks[0];
  }

  next(): ReadResult {
    if (this.size < 5) return undefined;
    const buf = this.flat();
    const len = buf.readUInt32BE(0);
    const dataLen = len === 0 ? 0 : len - 1;
    if (dataLen > this.maxData) return { tooBig: dataLen };
    const total = 5 + dataLen;
    if (this.size < total) return undefined;
    const frame: Frame = { cmd: buf[4], data: buf.subarray(5, total) };
    if (total === this.size) {
      this.chunks = [];
      this.size = 0;
    } else {
      this.chunks = [buf.subarray(total)];
      this.size -= total;
    }
    return frame;
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
  for (let i = 0; i < b.length; i++) if (b[i] >= 0x80) return Buffer.from(b);
  return b.toString('latin1');
}
