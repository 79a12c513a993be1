/**
 * `nodemilter/auth`: the pieces of a DKIM signer, an SPF/DKIM/DMARC/ARC
 * verifier, an ARC sealer and an SRS forwarder. DKIM signing is
 * nodemilter's own (RFC 6376 and RFC 8463 over Node's crypto); every
 * verification rule (SPF, DKIM, DMARC, ARC) and ARC sealing come from
 * **mailauth** (an optional peer dependency: `npm install mailauth@4`). Ready milters
 * built from them are in examples/ (dkim-sign, dmarc, srs); docs/auth.md
 * explains them and maps OpenDKIM, OpenDMARC and postsrsd settings.
 *
 * @example
 * ```ts
 * import { SigningTable, dkimSign, insertOnTop } from 'nodemilter/auth';
 * const table = SigningTable.fromFiles('/etc/nodemilter/KeyTable', '/etc/nodemilter/SigningTable');
 * // in eom, with headerLeadingSpace and a CollectingMilter:
 * insertOnTop(this, await dkimSign(await collected.buffer(), table.keysFor(from)));
 * ```
 *
 * @module nodemilter/auth
 */
export { createResolver, staticResolver, DnsMetrics } from './dns';
export type { DnsResolve, DnsOutcome, DnsMetricsSnapshot, ResolverOptions } from './dns';
export { headerFields, insertOnTop } from './headers';
export type { HeaderField, HeaderInserter } from './headers';
export { SigningTable, loadPrivateKey, signingKey } from './keys';
export type { SigningKey } from './keys';
export { dkimSign, dkimSignatureFields, DkimSigner, DkimSignError, DEFAULT_SIGNED_HEADERS } from './sign';
export { BodyCanonicalizer, BodyHasher, canonicalBody, canonicalHeader, parseCanonicalization } from './canon';
export type { BodySink, CanonAlgorithm, Canonicalization } from './canon';
export type { DkimSignOptions } from './sign';
export { checkSpf, spfAuthResults, verifyMessage, dmarcDisposition, arcSeal } from './verify';
export type { SpfCheck, SpfInput, DmarcOutcome, DmarcDisposition, VerifyOptions, Verification, ArcSealOptions } from './verify';
export { Srs, SrsError } from './srs';
export type { SrsOptions, SrsErrorReason } from './srs';
export { ownAuthResults } from './authres';
export type { MessageInput } from './mailauth';
export { readSettings, listSetting, flagSetting, intSetting } from './config';
export { clientIp } from './client';
