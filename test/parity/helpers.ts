/**
 * Helpers of the pymilter parity suite (test/parity/): the corpus copied
 * from pymilter's test/ directory (test/fixtures/pymilter), a reader for its
 * password-protected virus.zip, and a way to ask the installed pymilter
 * (Debian's python3-milter) the same question live.
 */
import { spawnSync } from 'node:child_process';
import * as fs from 'node:fs';
import * as path from 'node:path';
import * as zlib from 'node:zlib';
import { FIXTURES, SYSTEM_PYTHON } from '../helpers';

/** pymilter's test corpus and data files. */
export const PYMILTER_DIR = path.join(FIXTURES, 'pymilter');

/** The plain corpus messages (virus.zip holds the rest). */
export const CORPUS = [
  'big5', 'bounce', 'bounce1', 'bound', 'honey', 'missingboundary', 'samp1', 'spam44', 'spam7', 'spam8',
  'test1', 'test2', 'test8', 'utf8', 'zip1', 'zip2', 'zip3', 'ziploop',
] as const;

/** A corpus file's bytes. */
export function corpus(name: string): Buffer {
  return fs.readFileSync(path.join(PYMILTER_DIR, name));
}

const CRC_TABLE = (() => {
  const t = new Uint32Array(256);
  for (let n = 0; n < 256; n++) {
    let c = n;
    for (let k = 0; k < 8; k++) c = c & 1 ? 0xedb88320 ^ (c >>> 1) : c >>> 1;
    t[n] = c >>> 0;
  }
  return t;
})();
const crc32byte = (crc: number, b: number) => (CRC_TABLE[(crc ^ b) & 0xff] ^ (crc >>> 8)) >>> 0;

/** The members of a zip encrypted with the traditional PKWARE cipher (as pymilter's virus.zip, password "denatured"). */
export function readEncryptedZip(file: string, password: string): Map<string, Buffer> {
  const zip = fs.readFileSync(file);
  const eocd = zip.lastIndexOf(Buffer.from([0x50, 0x4b, 0x05, 0x06]));
  if (eocd < 0) throw new Error(`${file}: no end of central directory`);
  const count = zip.readUInt16LE(eocd + 10);
  let p = zip.readUInt32LE(eocd + 16);
  const out = new Map<string, Buffer>();
  for (let i = 0; i < count; i++) {
    if (zip.readUInt32LE(p) !== 0x02014b50) throw new Error(`${file}: bad central directory entry`);
    const method = zip.readUInt16LE(p + 10);
    const csize = zip.readUInt32LE(p + 20);
    const nameLen = zip.readUInt16LE(p + 28);
    const extraLen = zip.readUInt16LE(p + 30);
    const commentLen = zip.readUInt16LE(p + 32);
    const local = zip.readUInt32LE(p + 42);
    const name = zip.toString('latin1', p + 46, p + 46 + nameLen);
    p += 46 + nameLen + extraLen + commentLen;
    const start = local + 30 + zip.readUInt16LE(local + 26) + zip.readUInt16LE(local + 28);
    const data = Buffer.from(zip.subarray(start, start + csize));
    let k0 = 0x12345678;
    let k1 = 0x23456789;
    let k2 = 0x34567890;
    const update = (b: number) => {
      k0 = crc32byte(k0, b);
      k1 = (Math.imul((k1 + (k0 & 0xff)) >>> 0, 134775813) + 1) >>> 0;
      k2 = crc32byte(k2, k1 >>> 24);
    };
    for (const b of Buffer.from(password, 'latin1')) update(b);
    for (let j = 0; j < data.length; j++) {
      const t = (k2 | 2) & 0xffff;
      const c = data[j] ^ ((Math.imul(t, t ^ 1) >>> 8) & 0xff);
      data[j] = c;
      update(c);
    }
    const body = data.subarray(12);
    out.set(name, method === 8 ? zlib.inflateRawSync(body) : Buffer.from(body));
  }
  return out;
}

let viruses: Map<string, Buffer> | undefined;
/** A member of pymilter's virus.zip (virus1 ... virus7, virus13). */
export function virus(name: string): Buffer {
  viruses ??= readEncryptedZip(path.join(PYMILTER_DIR, 'virus.zip'), 'denatured');
  const v = viruses.get(name);
  if (!v) throw new Error(`virus.zip has no ${name}`);
  return v;
}

/**
 * Run Python code with the installed pymilter (cwd: the corpus directory)
 * and parse the JSON it prints. Throws with Python's stderr on failure.
 */
export function pymilter<T = unknown>(code: string, input?: Buffer | string): T {
  const r = spawnSync(SYSTEM_PYTHON, ['-c', code], { cwd: PYMILTER_DIR, input, encoding: 'utf8', maxBuffer: 64 * 1024 * 1024 });
  if (r.status !== 0) throw new Error(`pymilter failed (${r.status}): ${r.stderr}`);
  return JSON.parse(r.stdout) as T;
}

/** A small CRLF message for the MTA end-to-end parity tests; `subject` tells sessions apart. */
export function mtaMessage(subject: string): string {
  return [
    'From: Alice <alice@client.example>',
    'To: bob@sink.example',
    `Subject: ${subject}`,
    'Date: Sun, 29 Nov 2026 04:00:00 +0000',
    `Message-ID: <${Math.random().toString(36).slice(2)}@client.example>`,
    '',
    'Hello Bob.',
    '',
  ].join('\r\n');
}

/** The header fields (folded lines kept, with their line ends) that the fold milter adds or changes. */
export function foldedFields(head: string): string[] {
  return head.split(/\r\n(?![ \t])/).filter((h) => /^(X-Fold|X-Ins|Subject):/i.test(h));
}
