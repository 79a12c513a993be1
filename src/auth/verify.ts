/**
 * Verification: SPF (RFC 7208), DKIM (RFC 6376), ARC (RFC 8617) and DMARC
 * (RFC 7489) from mailauth, gathered into one Authentication-Results header
 * (RFC 8601), and the DMARC policy (p, sp, pct) turned into a disposition.
 *
 * @module
 */
import { promises as dnsPromises } from 'node:dns';

import { InvalidArgumentError } from '../errors';
import { formatAuthResults } from '../utils';
import type { AuthResProperty, AuthResResult } from '../utils';
import type { DnsResolve } from './dns';
import type { SigningKey } from './keys';
import { mailauth } from './mailauth';
import type { MessageInput } from './mailauth';

/** One SPF check: of the MAIL FROM identity or of the HELO name. */
export interface SpfCheck {
  /** Which identity was checked (RFC 7208 §2.3, §2.4). */
  identity: 'mailfrom' | 'helo';
  /** The identity's value: the address, or the HELO name. */
  value: string;
  /** `pass`, `fail`, `softfail`, `neutral`, `none`, `temperror`, `permerror`. */
  result: string;
  comment?: string;
  /** The domain checked (for DMARC alignment). */
  domain: string;
}

/** What {@link checkSpf} needs. */
export interface SpfInput {
  /** The client's IP address. */
  ip: string;
  /** The HELO/EHLO name. */
  helo: string;
  /** The envelope sender without brackets; `''` for the null sender. */
  sender: string;
  /** The authserv-id, named in the comments. */
  authservId: string;
  resolver?: DnsResolve;
}

const HOSTNAME = /^[a-z0-9-]+(\.[a-z0-9-]+)+\.?$/i;

/**
 * SPF of the HELO name (when it is a domain name) and of the envelope
 * sender (`postmaster@HELO` for the null sender, RFC 7208 §2.4). A failure
 * of the check itself is a `temperror`, never an exception.
 */
export async function checkSpf(input: SpfInput): Promise<SpfCheck[]> {
  const out: SpfCheck[] = [];
  const one = async (identity: 'mailfrom' | 'helo', value: string, sender: string) => {
    const domain = sender.slice(sender.lastIndexOf('@') + 1).toLowerCase();
    try {
      const r = await mailauth('SPF').spf({ sender, ip: input.ip, helo: input.helo, mta: input.authservId, resolver: input.resolver });
      out.push({ identity, value, result: r.status.result, comment: r.status.comment, domain });
    } catch (err) {
      out.push({ identity, value, result: 'temperror', comment: (err as Error).message, domain });
    }
  };
  if (HOSTNAME.test(input.helo)) await one('helo', input.helo, `postmaster@${input.helo}`);
  if (input.sender) await one('mailfrom', input.sender, input.sender);
  return out;
}

/** SPF checks as Authentication-Results entries (`spf=RESULT (comment) smtp.mailfrom=...`). */
export function spfAuthResults(checks: readonly SpfCheck[]): AuthResResult[] {
  return checks.map((s) => ({ method: 'spf', result: s.result, comment: s.comment, properties: [{ type: 'smtp', name: s.identity, value: s.value }] }));
}

/** A DMARC evaluation (RFC 7489) of the From domain. */
export interface DmarcOutcome {
  /** `pass`, `fail`, `none` (no record), `temperror`, `permerror`. */
  result: string;
  comment?: string;
  /** The RFC5322.From domain. */
  fromDomain: string;
  /** The policy that applies: `sp` for a subdomain when the record has one, else `p`. */
  policy?: 'none' | 'quarantine' | 'reject';
  /** `p=` and `sp=` of the record. */
  p?: string;
  sp?: string;
  /** `pct=` (default 100). */
  pct: number;
}

/** What to do with a message after DMARC. */
export interface DmarcDisposition {
  /** `none` (deliver), `quarantine` or `reject`. */
  action: 'none' | 'quarantine' | 'reject';
  /** Why, for the log and the SMTP reply. */
  reason: string;
}

/**
 * The disposition for a DMARC outcome (RFC 7489 §6.6.4): nothing unless the
 * result is `fail`; then the policy, applied to `pct` percent of messages;
 * a message left out of the sample gets the next weaker policy (reject
 * becomes quarantine, quarantine becomes none). `random` returns [0, 1).
 *
 * @example
 * ```ts
 * dmarcDisposition({ result: 'fail', fromDomain: 'bank.example', policy: 'reject', pct: 100 });
 * // { action: 'reject', reason: 'DMARC policy of bank.example is reject' }
 * ```
 */
export function dmarcDisposition(d: DmarcOutcome | undefined, random: () => number = Math.random): DmarcDisposition {
  if (!d || d.result !== 'fail' || !d.policy || d.policy === 'none') return { action: 'none', reason: d ? `DMARC ${d.result}` : 'no DMARC check' };
  const pct = Number.isFinite(d.pct) ? Math.min(100, Math.max(0, d.pct)) : 100;
  if (pct >= 100 || random() * 100 < pct) return { action: d.policy, reason: `DMARC policy of ${d.fromDomain} is ${d.policy}` };
  const weaker = d.policy === 'reject' ? 'quarantine' : 'none';
  return { action: weaker, reason: `DMARC policy of ${d.fromDomain} is ${d.policy} for pct=${pct}; this message was sampled out (${weaker})` };
}

/** What {@link verifyMessage} needs besides the message. */
export interface VerifyOptions {
  /** The authserv-id (the host name this header speaks for). */
  authservId: string;
  /** SPF results checked at MAIL FROM ({@link checkSpf}); without them, and with `ip`, SPF is checked here. */
  spf?: SpfCheck[];
  /** The client IP (for SPF when `spf` is not given). */
  ip?: string;
  /** The HELO name. */
  helo?: string;
  /** The envelope sender without brackets (`''` for the null sender). */
  sender?: string;
  /** The SMTP AUTH user, if the client authenticated: adds `auth=pass smtp.auth=USER`. */
  authUser?: string;
  resolver?: DnsResolve;
  /** Smallest RSA key accepted, in bits (default 1024). */
  minBitLength?: number;
  /** Skip ARC validation. */
  disableArc?: boolean;
  /** Skip DMARC. */
  disableDmarc?: boolean;
  /** ARC-seal what was verified with this key (an ARC set for a forwarding host); RSA only (mailauth's ARC signer). */
  seal?: SigningKey;
  /** The time of the ARC seal (default now). */
  signTime?: Date;
  /**
   * DNS work one message may cause in DKIM, ARC and DMARC (SPF has RFC
   * 7208's own limit of 10): at most `lookups` lookups (default 32) within
   * `ms` milliseconds (default 15000). Past it every lookup fails as a
   * timeout, so a message with hundreds of signatures gets `temperror`s, not
   * hundreds of sequential lookups.
   */
  dnsBudget?: { lookups?: number; ms?: number };
}

/** `resolver` (or Node's) limited to `lookups` calls within `ms` from now; past that, lookups fail with ETIMEOUT. */
function budgeted(resolver: DnsResolve | undefined, lookups: number, ms: number): DnsResolve {
  const resolve = resolver ?? ((name: string, rrtype: string) => dnsPromises.resolve(name, rrtype));
  const end = Date.now() + ms;
  let used = 0;
  const spent = (name: string, rrtype: string) => {
    const err: NodeJS.ErrnoException = new Error(`DNS ${rrtype} ${name}: this message's DNS budget (${lookups} lookups in ${ms} ms) is spent`);
    err.code = 'ETIMEOUT';
    return err;
  };
  return async (name: string, rrtype: string) => {
    const left = end - Date.now();
    if (++used > lookups || left <= 0) throw spent(name, rrtype);
    let timer: NodeJS.Timeout | undefined;
    try {
      return await Promise.race([resolve(name, rrtype), new Promise<never>((_, reject) => (timer = setTimeout(() => reject(spent(name, rrtype)), left)))]);
    } finally {
      clearTimeout(timer);
    }
  };
}

/** Everything {@link verifyMessage} found. */
export interface Verification {
  /** The results, in the order of the header: auth, spf, dkim, arc, dmarc. */
  results: AuthResResult[];
  /** The Authentication-Results value (folded with LF, for addheader). */
  authResults: string;
  spf: SpfCheck[];
  /** mailauth's DKIM results, one per signature. */
  dkim: Array<{ result: string; comment?: string; domain?: string; selector?: string; aligned?: string | false }>;
  /** ARC chain validation: `none`, `pass`, `fail`; `i` the highest instance. */
  arc?: { result: string; comment?: string; i: number };
  dmarc?: DmarcOutcome;
  /** `ARC-Seal`, `ARC-Message-Signature`, `ARC-Authentication-Results` text (CRLF) when `seal` was given and the chain allows it. */
  arcSet?: string;
}

function prop(type: string, name: string, value: string | undefined): AuthResProperty[] {
  return value ? [{ type, name, value }] : [];
}

/**
 * Verify one message: DKIM signatures, the ARC chain, DMARC of the From
 * domain (with SPF and DKIM alignment), and SPF unless given; all DNS
 * failures become `temperror` results, never exceptions. The results are
 * formatted as one Authentication-Results value. With `seal`, an ARC set
 * over the message as received is made too (put it above the
 * Authentication-Results header).
 *
 * @example
 * ```ts
 * const v = await verifyMessage(await collected.buffer(), { authservId: 'mx.example.org', spf, resolver });
 * this.addheader('Authentication-Results', v.authResults, 0);
 * if (dmarcDisposition(v.dmarc).action === 'reject') return REJECT;
 * ```
 */
export async function verifyMessage(message: MessageInput, options: VerifyOptions): Promise<Verification> {
  if (!options || typeof options.authservId !== 'string' || !options.authservId) {
    throw new InvalidArgumentError(`verifyMessage needs an authservId (the host name the header speaks for), got ${JSON.stringify(options?.authservId)}`);
  }
  const ma = mailauth('DKIM, DMARC and ARC verification');
  const lookups = options.dnsBudget?.lookups ?? 32;
  const ms = options.dnsBudget?.ms ?? 15_000;
  if (!Number.isInteger(lookups) || lookups < 1 || !Number.isFinite(ms) || ms <= 0) {
    throw new InvalidArgumentError(`verifyMessage dnsBudget ${JSON.stringify(options.dnsBudget)} is invalid: expected lookups (a whole number >= 1) and ms (> 0)`);
  }
  const mta = options.authservId;
  const results: AuthResResult[] = [];
  if (options.authUser) results.push({ method: 'auth', result: 'pass', properties: [{ type: 'smtp', name: 'auth', value: options.authUser }] });

  let spf = options.spf;
  if (!spf) spf = options.ip ? await checkSpf({ ip: options.ip, helo: options.helo ?? '', sender: options.sender ?? '', authservId: mta, resolver: options.resolver }) : [];
  const resolver = budgeted(options.resolver, lookups, ms);
  results.push(...spfAuthResults(spf));

  const seal = options.seal
    ? { signingDomain: options.seal.domain, selector: options.seal.selector, privateKey: options.seal.privateKey, algorithm: options.seal.algorithm }
    : undefined;
  let dkimRes: any;
  try {
    dkimRes = await ma.dkimVerify(message, { resolver, sender: options.sender || undefined, minBitLength: options.minBitLength, ...(seal ? { seal } : {}) });
  } catch (err) {
    // Unparseable input: mailauth found no message to verify.
    results.push({ method: 'dkim', result: 'permerror', comment: (err as Error).message, properties: [] });
    return { results, authResults: formatAuthResults({ authservId: mta, results }, { fold: true }), spf, dkim: [] };
  }
  const dkim: Verification['dkim'] = [];
  for (const r of dkimRes.results as any[]) {
    const result = r.status.result === 'temperr' ? 'temperror' : r.status.result;
    dkim.push({ result, comment: r.status.comment, domain: r.signingDomain, selector: r.selector, aligned: r.status.aligned });
    results.push({
      method: 'dkim',
      result,
      comment: r.status.comment,
      properties: [
        ...prop('header', 'd', r.signingDomain),
        ...prop('header', 's', r.selector),
        ...prop('header', 'a', r.algo),
        ...prop('header', 'b', typeof r.signature === 'string' ? r.signature.slice(0, 8) : undefined),
      ],
    });
  }

  // mailauth skips a DKIM-Signature it cannot parse; say so rather than let it vanish.
  const sigHeaders = ((dkimRes.headers?.parsed ?? []) as Array<{ key: string }>).filter((h) => h.key === 'dkim-signature').length;
  const judged = (dkimRes.results as any[]).filter((r) => r.status.result !== 'none').length;
  for (let i = judged; i < sigHeaders; i++) {
    dkim.push({ result: 'permerror', comment: 'unparseable DKIM-Signature' });
    results.push({ method: 'dkim', result: 'permerror', comment: 'unparseable DKIM-Signature', properties: [] });
  }

  let arcRes: any;
  let arc: Verification['arc'];
  if (!options.disableArc) {
    try {
      arcRes = await ma.arc(dkimRes.arc, { resolver, minBitLength: options.minBitLength });
    } catch (err) {
      arcRes = { status: { result: 'fail', comment: (err as Error).message }, i: 0 };
    }
    arc = { result: arcRes.status.result, comment: arcRes.status.comment || undefined, i: Number(arcRes.i) || 0 };
    if (arc.result !== 'none' || arc.i > 0) results.push({ method: 'arc', result: arc.result, comment: arc.comment, properties: [] });
  }

  let dmarc: DmarcOutcome | undefined;
  const from: string[] = dkimRes.headerFrom ?? [];
  if (!options.disableDmarc && from.length) {
    const fromDomain = (from[0].split('@').pop() ?? '').toLowerCase();
    if (from.length !== 1) {
      // RFC 7489 §6.6.1: a message with more than one From address is not evaluated here.
      dmarc = { result: 'permerror', comment: 'more than one From address', fromDomain, pct: 100 };
    } else {
      // SPF alignment uses the MAIL FROM domain, or the HELO domain for the null sender (RFC 7489 §3.1.2).
      const identity = spf.find((s) => s.identity === 'mailfrom') ?? spf.find((s) => s.identity === 'helo');
      let d: any;
      try {
        d = await ma.dmarc({
          headerFrom: from,
          spfDomains: identity && identity.result === 'pass' ? [identity.domain] : [],
          dkimDomains: (dkimRes.results as any[])
            .filter((r) => r.status.result === 'pass')
            .map((r) => ({ id: r.id, domain: r.signingDomain, aligned: r.status.aligned, underSized: r.status.underSized })),
          arcResult: arcRes,
          resolver,
        });
      } catch (err) {
        d = { status: { result: 'temperror', comment: (err as Error).message } };
      }
      if (d) {
        dmarc = {
          result: d.status.result,
          comment: typeof d.status.comment === 'string' && d.status.comment ? d.status.comment : d.error,
          fromDomain,
          policy: ['none', 'quarantine', 'reject'].includes(d.policy) ? d.policy : undefined,
          p: d.p,
          sp: d.sp,
          pct: typeof d.pct === 'number' ? d.pct : 100,
        };
      }
    }
    if (dmarc) results.push({ method: 'dmarc', result: dmarc.result, comment: dmarc.comment, properties: prop('header', 'from', dmarc.fromDomain) });
  }

  const authResults = formatAuthResults({ authservId: mta, results }, { fold: true });
  const verification: Verification = { results, authResults, spf, dkim, arc, dmarc };

  // RFC 8617 §5.1: seal when the chain is absent or valid (or its last set said pass and we are the next hop).
  if (seal && arcRes && (['none', 'pass'].includes(arcRes.status.result) || arcRes.status.shouldSeal)) {
    const sealed = await ma.createSeal(false, {
      headers: dkimRes.headers,
      arc: dkimRes.arc,
      seal: { ...dkimRes.seal, i: (Number(arcRes.i) || 0) + 1, cv: arcRes.status.result, authResults: authResults.replace(/\n/g, '\r\n'), signTime: options.signTime ?? new Date() },
    });
    verification.arcSet = sealed.headers.join('\r\n') + '\r\n';
  }
  return verification;
}

/** What {@link arcSeal} needs. */
export interface ArcSealOptions {
  /** The sealing key (RSA; mailauth's ARC signer is rsa-sha256 only). */
  key: SigningKey;
  /** The Authentication-Results value of this hop (e.g. {@link Verification.authResults}). */
  authResults: string;
  /** The chain validation state of the message as received (`none`, `pass`, `fail`; {@link Verification.arc}). */
  cv: string;
  /** The seal's time (default now). */
  signTime?: Date;
}

/**
 * An ARC set (RFC 8617) for a message this host changed, e.g. a mailing
 * list that tagged the subject: `message` is the message as it leaves,
 * `cv` and `authResults` what verification found when it arrived. Returns
 * the `ARC-Seal`, `ARC-Message-Signature` and `ARC-Authentication-Results`
 * text (CRLF), to put on top.
 */
export async function arcSeal(message: MessageInput, options: ArcSealOptions): Promise<string> {
  if (!['none', 'pass', 'fail'].includes(options.cv)) throw new InvalidArgumentError(`ARC cv ${JSON.stringify(options.cv)} is invalid: expected none, pass or fail`);
  if (options.key.algorithm !== 'rsa-sha256') throw new InvalidArgumentError(`ARC sealing needs an RSA key, got ${options.key.algorithm} for ${options.key.selector}._domainkey.${options.key.domain}`);
  const out = await mailauth('ARC sealing').sealMessage(message, {
    signingDomain: options.key.domain,
    selector: options.key.selector,
    privateKey: options.key.privateKey,
    authResults: options.authResults.replace(/\r?\n/g, '\r\n'),
    cv: options.cv,
    signTime: options.signTime ?? new Date(),
  });
  return out.toString('latin1');
}
