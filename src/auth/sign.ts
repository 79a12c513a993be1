/**
 * DKIM signing (RFC 6376, RSA and Ed25519 per RFC 8463) with mailauth's
 * signer, over the message bytes as the MTA will deliver them.
 *
 * @module
 */
import { InvalidArgumentError, MilterError } from '../errors';
import { headerFields } from './headers';
import type { HeaderField } from './headers';
import type { SigningKey } from './keys';
import { mailauth } from './mailauth';
import type { MessageInput } from './mailauth';

/** Options of {@link dkimSign}. */
export interface DkimSignOptions {
  /** `header/body` canonicalization: `relaxed/relaxed` (default), `simple/simple`, `relaxed/simple`, `simple/relaxed`. */
  canonicalization?: string;
  /** Header fields to sign (default mailauth's list: From, To, Subject, Date, Message-ID, MIME headers, List-*...; never Received). */
  headerList?: string[];
  /** The `t=` time (default now). */
  signTime?: Date;
  /** Seconds until the signature expires (`x=`); default none. */
  expireAfter?: number;
}

/** A signing failure for one key (a bad key, an unusable canonicalization). */
export class DkimSignError extends MilterError {
  constructor(message: string) {
    super(message, 'ERR_MILTER_DKIM_SIGN');
  }
}

const CANON = /^(simple|relaxed)(\/(simple|relaxed))?$/;

/**
 * DKIM-Signature header text for `message` (headers, blank line, body,
 * CRLF), one signature per key, in key order, as `DKIM-Signature: ...\r\n`
 * lines folded with CRLF. The message must be byte for byte what the
 * recipient will see for the signed fields and the body; a milter gets
 * that with `headerLeadingSpace` and a `CollectingMilter` (nodemilter/mime).
 * Throws {@link DkimSignError} when a key cannot sign.
 *
 * @example
 * ```ts
 * const text = await dkimSign(await collected.buffer(), table.keysFor(fromAddress));
 * insertOnTop(this, text);
 * ```
 */
export async function dkimSign(message: MessageInput, keys: readonly SigningKey[], options: DkimSignOptions = {}): Promise<string> {
  if (!keys.length) return '';
  const canonicalization = options.canonicalization ?? 'relaxed/relaxed';
  if (!CANON.test(canonicalization)) {
    throw new InvalidArgumentError(`DKIM canonicalization ${JSON.stringify(canonicalization)} is invalid: expected simple or relaxed, e.g. "relaxed/relaxed"`);
  }
  if (options.expireAfter !== undefined && !(Number.isInteger(options.expireAfter) && options.expireAfter > 0)) {
    throw new InvalidArgumentError(`DKIM expireAfter ${JSON.stringify(options.expireAfter)} is invalid: expected whole seconds > 0`);
  }
  const signTime = options.signTime ?? new Date();
  const res = await mailauth('DKIM signing').dkimSign(message, {
    canonicalization,
    signTime,
    ...(options.expireAfter ? { expires: new Date(signTime.getTime() + options.expireAfter * 1000) } : {}),
    ...(options.headerList ? { headerList: options.headerList } : {}),
    signatureData: keys.map((k) => ({ signingDomain: k.domain, selector: k.selector, privateKey: k.privateKey, algorithm: k.algorithm })),
  });
  if (res.errors.length) {
    const e = res.errors[0];
    throw new DkimSignError(`DKIM signing with ${e.selector ?? '?'}._domainkey.${e.signingDomain ?? '?'} failed: ${e.err?.message ?? 'unknown error'}`);
  }
  return res.signatures.replace(/^\r\n$/, '');
}

/** {@link dkimSign}'s text as header fields for addheader (see {@link headerFields}). */
export async function dkimSignatureFields(message: MessageInput, keys: readonly SigningKey[], leadingSpace: boolean, options: DkimSignOptions = {}): Promise<HeaderField[]> {
  return headerFields(await dkimSign(message, keys, options), leadingSpace);
}
