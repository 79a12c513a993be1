/**
 * nodemilter: write sendmail and Postfix mail filters (milters) in
 * TypeScript. Subclass {@link Base}, override the callbacks you need, and
 * serve it with `runmilter`. The one-to-one libmilter API lives in
 * `nodemilter/milter`; test tools in `nodemilter/testing`.
 *
 * @module nodemilter
 */
export * from './constants';
export * from './errors';
export * from './types';
export { Base, Milter, describe, protocolSteps, CALLBACK_OF } from './base';
export type { CallbackMethod, ClassSwitches, DescribeOptions, MilterClass, MilterFactory } from './base';
export { noreply, nocallback, symlist, decode, decorate, methodTags } from './decorators';
export type { MethodDecorator, MethodTags } from './decorators';
export { STEP_BITS, OPTIONAL_CALLBACKS, MACRO_STAGE_OF, defaultSteps, resolveNegotiation } from './negotiation';
export type { Negotiated, OptionalCallback } from './negotiation';
export {
  validateReply, validateHeaderName, validateHeaderValue, validateHeaderIndex, validateEnvelope,
  validateQuarantineReason, normalizeSymlist, checkStatus, MAX_REPLY_LINE, MAX_REPLY_LINES,
} from './validate';
export type { Reply } from './validate';
export { param2dict } from './utils';
export { runmilter, reload } from './runmilter';
export type { RunmilterOptions, EngineName } from './runmilter';
export type { EngineOptions } from './runtime/engine';
export type { RestartPolicy } from './runtime/supervisor';
export { parse_addr, parse_header, iniplist, IpList, formatAuthResults, parseAuthResults } from './utils';
export type { AuthenticationResults, AuthResResult, AuthResProperty } from './utils';
