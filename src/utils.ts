/**
 * Small helpers for milter authors.
 *
 * @module
 */
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
