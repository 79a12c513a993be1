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
 * class StripForged extends Base<{ arSeen: number; forged: number[] }> {
 *   static override flags = CHGHDRS;
 *   protected override newMessage() { return { arSeen: 0, forged: [] }; }
 *   override header(name: string, value: string) {
 *     if (name.toLowerCase() === 'authentication-results') {
 *       const n = ++this.message.arSeen;
 *       if (ownAuthResults(value, 'mx.example.org')) this.message.forged.push(n);
 *     }
 *     return CONTINUE;
 *   }
 *   override eom() {
 *     // last first, so the indexes of the others stay right
 *     for (const n of [...this.message.forged].reverse()) this.chgheader('Authentication-Results', n, null);
 *     return CONTINUE;
 *   }
 * }
 * ownAuthResults('MX.example.org; spf=pass smtp.mailfrom=a@b.example', 'mx.example.org'); // true
 * ```
 */
export function ownAuthResults(value: string, authservId: string): boolean {
  const id = value.replace(/^\s*(\([^)]*\)\s*)*/, '').split(/[\s;]/, 1)[0];
  return id.toLowerCase() === authservId.toLowerCase();
}
