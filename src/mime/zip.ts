/**
 * Listing the members of zip archives (fflate), nested zips included, with
 * limits so that a zip bomb or a corrupt archive gives a result, not a crash.
 *
 * @module
 */
import { unzipSync } from 'fflate';

/** Limits for {@link listZip}. */
export interface ZipLimits {
  /** How many zips deep to look (1 = only the archive itself). Default 4. */
  maxDepth?: number;
  /** The largest nested zip (uncompressed bytes) to open. Default 32 MiB. */
  maxNestedSize?: number;
  /** Stop listing after this many members in all (a corrupt directory can claim 65535). Default 2000. */
  maxEntries?: number;
}

/** One member of a zip archive, or a problem met while listing one. */
export interface ZipEntry {
  /** The member's name as stored in the archive (directories end with `/`). */
  name: string;
  /** The names of the zips it is inside, outermost first (the attachment's own name first). */
  path: string[];
  /** Its uncompressed size, as the archive says. */
  size: number;
  /**
   * Set when this member is a zip that could not be listed (`corrupt zip:
   * ...`, `nested too deep`, `too large to open`), or when the archive
   * itself could not be read: then `name` is the archive's name. A listing
   * cut at `maxEntries` ends with an entry whose error is `too many entries`.
   */
  error?: string;
}

/** Whether bytes start like a zip archive (a local file header or an empty archive's end record). */
export function looksLikeZip(data: Uint8Array): boolean {
  return data.length >= 4 && data[0] === 0x50 && data[1] === 0x4b && (data[2] === 3 || data[2] === 5) && (data[3] === 4 || data[3] === 6);
}

const isZipName = (name: string) => /\.zip$/i.test(name);
const TOO_MANY = new Error('too many entries');

/**
 * List the members of a zip archive, opening nested zips (members whose
 * name ends in `.zip`) up to `maxDepth`. Never throws for bad data: a
 * corrupt archive gives one entry with `error` set. An empty one (zero
 * bytes) gives no entries and no error.
 *
 * @param data the archive's bytes
 * @param name the archive's name (the attachment's filename), used in `path`
 */
export function listZip(data: Uint8Array, name: string, limits: ZipLimits = {}): ZipEntry[] {
  const maxDepth = limits.maxDepth ?? 4;
  const maxNested = limits.maxNestedSize ?? 32 * 1024 * 1024;
  const maxEntries = limits.maxEntries ?? 2000;
  const out: ZipEntry[] = [];
  // An empty attachment named .zip (DSNs carry them) holds nothing: not an error, as in pymilter.
  if (data.length === 0) return out;
  let truncated = false;
  const walk = (bytes: Uint8Array, path: string[], depth: number): string | undefined => {
    const infos: { name: string; originalSize: number }[] = [];
    let opened: Record<string, Uint8Array>;
    try {
      opened = unzipSync(bytes, {
        filter: (info) => {
          if (out.length + infos.length >= maxEntries) throw TOO_MANY;
          infos.push({ name: info.name, originalSize: info.originalSize });
          return depth < maxDepth && isZipName(info.name) && info.originalSize <= maxNested;
        },
      });
    } catch (err) {
      if (err !== TOO_MANY) return `corrupt zip: ${(err as Error).message}`;
      truncated = true;
      opened = {}; // nothing was decompressed yet: fflate decompresses after the directory
    }
    for (const info of infos) {
      if (out.length >= maxEntries) return undefined;
      const entry: ZipEntry = { name: info.name, path, size: info.originalSize };
      out.push(entry);
      if (!isZipName(info.name)) continue;
      if (depth >= maxDepth) entry.error = 'nested too deep';
      else if (info.originalSize > maxNested) entry.error = 'too large to open';
      else {
        const inner = opened[info.name];
        if (inner) entry.error = walk(inner, [...path, info.name], depth + 1);
        if (entry.error === undefined) delete entry.error;
      }
    }
    return undefined;
  };
  const error = walk(data, [name], 1);
  if (error) out.push({ name, path: [], size: data.length, error });
  if (truncated) out.push({ name, path: [], size: data.length, error: 'too many entries' });
  return out;
}
