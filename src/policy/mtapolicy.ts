/**
 * {@link MTAPolicy}: pymilter's `Milter.policy.MTAPolicy` lookup order over
 * an {@link AccessMap}, for milters migrated from pymilter that keep their
 * `SPF-Pass:`, `SMTP-Auth:`... access entries.
 *
 * @module
 */
import { InvalidArgumentError } from '../errors';
import { AccessMap } from './access';

/**
 * A sender's policy from an access map, looked up the way pymilter's
 * `MTAPolicy.getPolicy(prefix)` does; the value is returned as written
 * (`'OK'`, `'REJECT'`, anything), or undefined where pymilter returns None.
 *
 * For a prefix `P` and the sender `user@a.b.example`, the first key present wins:
 *
 * 1. `P:user@a.b.example` (the whole sender);
 * 2. `P:a.b.example` (the exact domain), else the parent domains written
 *    with a leading dot, `P:.b.example`, then `P:.example`; only the last
 *    one tried counts when none is present;
 * 3. `P:` (a bare default for the prefix);
 * 4. `P` (the prefix without its colon).
 *
 * This differs from {@link AccessMap.checkFrom} (sendmail's order), which
 * tries the parent domains without a dot, then `user@`, and also the
 * untagged keys: see docs/pymilter-migration.md for both side by side.
 * Keys match without case (as `makemap` folds them). The sender may have
 * angle brackets.
 *
 * @example
 * ```ts
 * const access = AccessMap.fromText(`
 *   SMTP-Auth:good@example.com  OK
 *   SMTP-Auth:example.com       REJECT
 *   SMTP-Test:                  REJECT
 *   SMTP-Test:.baz.com          WILDCARD
 * `);
 * new MTAPolicy('good@example.com', access).getPolicy('smtp-auth');    // 'OK'
 * new MTAPolicy('bad@example.com', access).getPolicy('smtp-auth');     // 'REJECT'
 * new MTAPolicy('bad@bad.example.com', access).getPolicy('smtp-auth'); // undefined
 * new MTAPolicy('foo@bar.baz.com', access).getPolicy('smtp-test');     // 'WILDCARD'
 * new MTAPolicy('any@random.com', access).getPolicy('smtp-test');      // 'REJECT'
 * ```
 */
export class MTAPolicy {
  /** The sender, without angle brackets. */
  readonly sender: string;
  /** The sender's domain, lower case (the whole sender when it has no `@`). */
  readonly domain: string;
  readonly #access: AccessMap | undefined;

  /**
   * @param sender the envelope sender (`user@example.com`, angle brackets allowed)
   * @param access the access map; undefined gives undefined for every prefix, as pymilter without an access file
   */
  constructor(sender: string, access: AccessMap | undefined) {
    if (typeof sender !== 'string') throw new InvalidArgumentError(`MTAPolicy: sender must be a string, got ${typeof sender}`);
    if (access !== undefined && !(access instanceof AccessMap)) throw new InvalidArgumentError('MTAPolicy: access must be an AccessMap');
    const m = /^<(.*)>$/s.exec(sender.trim());
    this.sender = m ? m[1] : sender.trim();
    this.domain = this.sender.slice(this.sender.lastIndexOf('@') + 1).toLowerCase();
    this.#access = access;
  }

  /** The value for `prefix` (`'smtp-auth'`, `'SPF-Pass'`...), in pymilter's order (see {@link MTAPolicy}). */
  getPolicy(prefix: string): string | undefined {
    if (typeof prefix !== 'string' || prefix === '' || prefix.includes(':')) {
      throw new InvalidArgumentError(`MTAPolicy.getPolicy: prefix ${JSON.stringify(prefix)} is invalid: expected a tag like "smtp-auth", without ":"`);
    }
    const acf = this.#access;
    if (!acf) return undefined;
    const tag = `${prefix}:`;
    const exact = acf.get(tag + this.sender);
    if (exact !== undefined) return exact;
    let d = this.domain;
    let key = tag + d;
    while (acf.get(key) === undefined && d.includes('.')) {
      d = d.slice(d.indexOf('.') + 1);
      key = `${tag}.${d}`;
    }
    return acf.get(key) ?? acf.get(tag) ?? acf.get(prefix);
  }
}
