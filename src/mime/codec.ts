/**
 * Content-transfer-encodings and charsets for the mime module: base64 and
 * quoted-printable in both directions, and text decoding through
 * iconv-lite (which knows every charset a mail reader meets).
 *
 * @module
 */
import iconv from 'iconv-lite';
import libmime from 'libmime';

const HEX = '0123456789ABCDEF';

function hexValue(c: number): number {
  if (c >= 0x30 && c <= 0x39) return c - 0x30;
  if (c >= 0x41 && c <= 0x46) return c - 0x37;
  if (c >= 0x61 && c <= 0x66) return c - 0x57;
  return -1;
}

/**
 * Decode quoted-printable (RFC 2045 6.7). Lenient as mail readers are: a
 * `=` not followed by two hex digits or a line end is kept as it is;
 * trailing white space before a line end is dropped; soft line breaks
 * (`=` at the end of a line) join lines. Line ends are kept as they are.
 */
export function decodeQuotedPrintable(input: Buffer): Buffer {
  const out = Buffer.alloc(input.length);
  let o = 0;
  let i = 0;
  const n = input.length;
  while (i < n) {
    const c = input[i];
    if (c === 0x3d /* = */) {
      // soft line break: '=' then optional white space then CRLF or LF
      let j = i + 1;
      while (j < n && (input[j] === 0x20 || input[j] === 0x09)) j++;
      if (j < n && input[j] === 0x0d && input[j + 1] === 0x0a) {
        i = j + 2;
        continue;
      }
      if (j < n && input[j] === 0x0a) {
        i = j + 1;
        continue;
      }
      if (j >= n) {
        i = n;
        continue;
      }
      const h = i + 2 < n + 1 ? hexValue(input[i + 1]) : -1;
      const l = i + 2 < n ? hexValue(input[i + 2]) : -1;
      if (h >= 0 && l >= 0) {
        out[o++] = (h << 4) | l;
        i += 3;
        continue;
      }
      out[o++] = c;
      i++;
      continue;
    }
    if (c === 0x20 || c === 0x09) {
      // drop white space that ends a line (it was added in transport)
      let j = i;
      while (j < n && (input[j] === 0x20 || input[j] === 0x09)) j++;
      if (j >= n || input[j] === 0x0a || (input[j] === 0x0d && input[j + 1] === 0x0a)) {
        i = j;
        continue;
      }
      while (i < j) out[o++] = input[i++];
      continue;
    }
    out[o++] = c;
    i++;
  }
  return out.subarray(0, o);
}

/**
 * Encode bytes as quoted-printable with lines of at most 76 characters.
 * Line ends in the input (CRLF or LF) become `eol`; a lone CR is encoded.
 */
export function encodeQuotedPrintable(input: Buffer, eol = '\r\n'): string {
  const lines: string[] = [];
  let line = '';
  const push = (token: string) => {
    if (line.length + token.length > 75) {
      lines.push(line + '=');
      line = '';
    }
    line += token;
  };
  for (let i = 0; i < input.length; i++) {
    const c = input[i];
    if (c === 0x0a || (c === 0x0d && input[i + 1] === 0x0a)) {
      if (c === 0x0d) i++;
      // white space at the end of a line must be encoded
      const last = line.charCodeAt(line.length - 1);
      if (last === 0x20 || last === 0x09) line = line.slice(0, -1) + '=' + HEX[last >> 4] + HEX[last & 15];
      lines.push(line);
      line = '';
      continue;
    }
    if ((c >= 0x21 && c <= 0x7e && c !== 0x3d) || c === 0x20 || c === 0x09) push(String.fromCharCode(c));
    else push('=' + HEX[c >> 4] + HEX[c & 15]);
  }
  const last = line.charCodeAt(line.length - 1);
  if (last === 0x20 || last === 0x09) line = line.slice(0, -1) + '=' + HEX[last >> 4] + HEX[last & 15];
  lines.push(line);
  return lines.join(eol);
}

/** Encode bytes as base64 in lines of 76 characters, each ended by `eol`. */
export function encodeBase64(input: Buffer, eol = '\r\n'): string {
  const b64 = input.toString('base64');
  let out = '';
  for (let i = 0; i < b64.length; i += 76) out += b64.slice(i, i + 76) + eol;
  return out;
}

/**
 * Decode a body by its Content-Transfer-Encoding. base64 ignores characters
 * outside the alphabet (as readers do); unknown encodings, 7bit, 8bit and
 * binary give the bytes as they are.
 */
export function decodeTransfer(body: Buffer, encoding: string): Buffer {
  switch (encoding) {
    case 'base64': {
      // Node skips white space and other non-alphabet bytes, but reads - and _ as base64url
      const text = body.toString('latin1');
      return Buffer.from(/[-_]/.test(text) ? text.replace(/[-_]/g, '') : text, 'base64');
    }
    case 'quoted-printable':
      return decodeQuotedPrintable(body);
    default:
      return body;
  }
}

/** Encode a payload for a Content-Transfer-Encoding (7bit, 8bit and binary leave it as it is). */
export function encodeTransfer(payload: Buffer, encoding: string, eol: string): Buffer {
  switch (encoding) {
    case 'base64':
      return Buffer.from(encodeBase64(payload, eol), 'latin1');
    case 'quoted-printable':
      return Buffer.from(encodeQuotedPrintable(payload, eol), 'latin1');
    default:
      return payload;
  }
}

/** The charset name iconv-lite knows for `charset`, or undefined. */
function knownCharset(charset: string | undefined): string | undefined {
  if (!charset) return undefined;
  const names = [charset, libmime.normalizeCharset(charset)];
  for (const name of names) if (iconv.encodingExists(name)) return name;
  return undefined;
}

/** Bytes to text in `charset`; an unknown charset (or us-ascii) reads as UTF-8, which never throws. */
export function decodeText(bytes: Buffer, charset: string | undefined): string {
  const cs = knownCharset(charset);
  if (!cs || /^(us-)?ascii$/i.test(cs)) return bytes.toString('utf8');
  return iconv.decode(bytes, cs);
}

/** Text to bytes in `charset`, UTF-8 when the charset is unknown. */
export function encodeText(text: string, charset: string | undefined): Buffer {
  const cs = knownCharset(charset);
  if (!cs || /^(us-)?ascii$/i.test(cs)) return Buffer.from(text, 'utf8');
  return iconv.encode(text, cs);
}

const utf8 = new TextDecoder('utf-8', { fatal: true });

/**
 * Raw header bytes (held as a latin1 string) to text: UTF-8 when they are
 * valid UTF-8 (RFC 6532 headers), else latin1, so no byte is lost.
 */
export function headerText(latin1: string): string {
  // eslint-disable-next-line no-control-regex
  if (!/[^\x00-\x7f]/.test(latin1)) return latin1;
  try {
    return utf8.decode(Buffer.from(latin1, 'latin1'));
  } catch {
    return latin1;
  }
}
