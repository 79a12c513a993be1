/**
 * `nodemilter/mime`: look inside messages and change them. Parse a message
 * into a tree of {@link MimePart}s (headers, content types, decoded
 * filenames and payloads, enclosed messages), list attachment names (zip
 * members too), defang dangerous parts, strip scripts from HTML, and turn
 * the result into milter actions with {@link applyToContext}. An unmodified
 * message serializes byte for byte as it came.
 *
 * @example
 * ```ts
 * import { parseMime, applyToContext } from 'nodemilter/mime';
 * const msg = parseMime(raw);
 * msg.getnames();                       // ['invoice.pdf', 'files.zip', 'setup.exe']
 * for (const a of msg.attachments()) if (/\.exe$/i.test(a.name)) a.part.defang();
 * applyToContext(ctx, msg);             // in eom: header changes + replacebody
 * ```
 *
 * @module nodemilter/mime
 */
import type { Readable } from 'node:stream';
import { MimeError } from '../errors';
import { MimePart } from './part';
import type { ParseOptions } from './part';

export { MimePart, SCRIPT_REMOVED_MARKER } from './part';
export type {
  AttachmentInfo, CreatePartOptions, DefangOptions, MimeHeader, MimeHeaderChange, NamesOptions, ParseOptions, StripScriptsOptions,
} from './part';
export { applyToContext, milterActions } from './actions';
export type { MimeAction, MimeActionTarget } from './actions';
export { listZip, looksLikeZip } from './zip';
export type { ZipEntry, ZipLimits } from './zip';
export { MessageCollector, CollectingMilter } from './collector';
export type { CollectorOptions } from './collector';
export { decodeQuotedPrintable, encodeQuotedPrintable, decodeText } from './codec';

/** Options of {@link readMime}. */
export interface ReadOptions extends ParseOptions {
  /** The largest message to read, in bytes (default 256 MiB); larger throws MimeError `too-large`. */
  maxSize?: number;
}

/**
 * Parse a whole message (pymilter's `message_from_file`). Never throws for
 * malformed MIME: problems are worked around and listed in `defects`; only
 * the limits of `options` throw {@link MimeError}.
 */
export function parseMime(raw: Buffer | Uint8Array | string, options: ParseOptions = {}): MimePart {
  let text: string;
  if (typeof raw === 'string') text = Buffer.from(raw, 'utf8').toString('latin1');
  else if (raw instanceof Uint8Array) text = Buffer.from(raw.buffer, raw.byteOffset, raw.byteLength).toString('latin1');
  else throw new MimeError(`parseMime: expected a Buffer, Uint8Array or string, got ${raw === null ? 'null' : typeof raw}`);
  return MimePart.parse(text, options);
}

/** Read a message from a stream (for example {@link MessageCollector.stream}) and parse it. */
export async function readMime(stream: Readable | AsyncIterable<Buffer | string>, options: ReadOptions = {}): Promise<MimePart> {
  const max = options.maxSize ?? 256 * 1024 * 1024;
  const chunks: Buffer[] = [];
  let size = 0;
  for await (const chunk of stream as AsyncIterable<Buffer | string>) {
    const b = typeof chunk === 'string' ? Buffer.from(chunk, 'utf8') : chunk;
    size += b.length;
    if (size > max) {
      (stream as Readable).destroy?.();
      throw new MimeError(`readMime: message is larger than ${max} bytes (maxSize)`, 'too-large');
    }
    chunks.push(b);
  }
  return parseMime(Buffer.concat(chunks), options);
}
