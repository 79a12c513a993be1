/**
 * `nodemilter/policy`: policy helpers for milters: sendmail-style access
 * maps ({@link AccessMap}, and pymilter's lookup order in {@link MTAPolicy}), dynamic-IP heuristics ({@link isDynip}) and
 * delivery status notifications ({@link createDsn}).
 *
 * @module nodemilter/policy
 */
export { AccessMap, parseAccessValue, addressKeys, domainKeys, ipKeys } from './access';
export type { AccessAction, AccessDecision, AccessParseOptions } from './access';
export { MTAPolicy } from './mtapolicy';
export { isDynip, dynipReason, DYNAMIC_KEYWORDS } from './dynip';
export { createDsn, rfc5322Date } from './dsn';
export type { DsnAction, DsnOptions, DsnRecipient } from './dsn';
