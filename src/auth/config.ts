/**
 * Settings for the ready milters: environment variables, or the same
 * `NAME=value` lines in a small file.
 *
 * @module
 */
import { readFileSync } from 'node:fs';

import { InvalidArgumentError } from '../errors';

/**
 * The settings of a milter: `env`, over the `NAME=value` lines of the file
 * named by `env[fileVar]` (if set). In the file `#` starts a comment line
 * and values may be quoted; the environment wins over the file.
 *
 * @example
 * ```ts
 * const s = readSettings(process.env, 'DKIM_CONFIG');   // DKIM_CONFIG=/etc/nodemilter/dkim.conf
 * s.DKIM_KEYTABLE;
 * ```
 */
export function readSettings(env: Record<string, string | undefined>, fileVar: string): Record<string, string> {
  const out: Record<string, string> = {};
  const file = env[fileVar];
  if (file) {
    let text: string;
    try {
      text = readFileSync(file, 'utf8');
    } catch (err) {
      throw new InvalidArgumentError(`${fileVar}: ${file} cannot be read: ${(err as Error).message}`);
    }
    text.split(/\r?\n/).forEach((raw, i) => {
      const line = raw.trim();
      if (!line || line.startsWith('#')) return;
      const m = /^([A-Za-z_][A-Za-z0-9_]*)\s*=\s*(.*)$/.exec(line);
      if (!m) throw new InvalidArgumentError(`${file} line ${i + 1}: expected NAME=value, got ${JSON.stringify(line)}`);
      out[m[1]] = m[2].replace(/^"(.*)"$|^'(.*)'$/, '$1$2');
    });
  }
  for (const [k, v] of Object.entries(env)) if (v !== undefined) out[k] = v;
  return out;
}

/** A comma- or space-separated list setting (empty when unset). */
export function listSetting(value: string | undefined): string[] {
  return (value ?? '').split(/[\s,]+/).filter(Boolean);
}

/** A yes/no setting: `1`, `yes`, `true`, `on` are true; `0`, `no`, `false`, `off` and unset false; anything else throws. */
export function flagSetting(name: string, value: string | undefined): boolean {
  if (value === undefined || value === '') return false;
  const v = value.trim().toLowerCase();
  if (['1', 'yes', 'true', 'on'].includes(v)) return true;
  if (['0', 'no', 'false', 'off'].includes(v)) return false;
  throw new InvalidArgumentError(`${name}=${JSON.stringify(value)} is invalid: expected 1/yes/true/on or 0/no/false/off`);
}

/** A whole-number setting within [min, max], or `dflt` when unset. */
export function intSetting(name: string, value: string | undefined, dflt: number, min: number, max = Number.MAX_SAFE_INTEGER): number {
  if (value === undefined || value === '') return dflt;
  const n = Number(value);
  if (!/^\d+$/.test(value.trim()) || n < min || n > max) throw new InvalidArgumentError(`${name}=${JSON.stringify(value)} is invalid: expected a whole number from ${min} to ${max}`);
  return n;
}
