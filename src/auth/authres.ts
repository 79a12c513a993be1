/**
 * Forged Authentication-Results: a header that claims our authserv-id on a
 * message arriving from outside was not written by us (RFC 8601 §5).
 *
 * @module
 */

/**
 * Whether an Authentication-Results value claims `authservId` (compared
 * without case). Delete such headers from incoming mail before adding
 * your own.
 *
 * @example
 * ```ts
 * override header(name: string, value: string) {
 *   if (name.toLowerCase() === 'authentication-results') {
 *     const n = ++this.message.arSeen;
 *     if (ownAuthResults(value, 'mx.example.org')) this.message.forged.push(n);
 *   }
 *   return super.header(name, value);
 * }
 * // at eom, last first: for (const n of forged.reverse()) this.chgheader('Authentication-Results', n, null);
 * ```
 */
export function ownAuthResults(value: string, authservId: string): boolean {
  const id = value.replace(/^\s*(\([^)]*\)\s*)*/, '').split(/[\s;]/, 1)[0];
  return id.toLowerCase() === authservId.toLowerCase();
}
