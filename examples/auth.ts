/**
 * auth: SPF and DKIM verification with an Authentication-Results header
 * (RFC 8601), the job pymilter users do with pyspf, pydkim and authres.
 * The checks come from **mailauth** 4.x; this example is the only part of
 * nodemilter that needs it, so install it beside nodemilter:
 *
 * ```sh
 * npm install mailauth@4
 * ```
 *
 * - At MAIL FROM: SPF of the envelope sender (RFC 7208; for the null
 *   sender, of `postmaster@HELO`), and SPF of the HELO name. With
 *   `AUTH_REJECT_SPF_FAIL=1` an SPF `fail` of the sender is refused with
 *   `550 5.7.23`.
 * - At end of message: DKIM verification of every signature (RFC 6376).
 * - Then one `Authentication-Results` header on top of the message, with
 *   `auth=pass` too when the client used SMTP AUTH. Authentication-Results
 *   headers that already claim our authserv-id are forged (RFC 8601 §5)
 *   and deleted.
 *
 * Nothing is refused for a DKIM result: that is DMARC's job, which reads
 * this header.
 *
 * Run it (after `npm run build:ts`):
 *
 * ```sh
 * AUTH_SERVID=mx.example.org npm run example -- auth inet:8898@127.0.0.1
 * ```
 *
 * Environment: `AUTH_SERVID` (the authserv-id; default the MTA's `j`
 * macro, else the host name), `AUTH_REJECT_SPF_FAIL=1`.
 *
 * DNS: `config.resolver` takes any function shaped like Node's
 * `dns.promises.resolve(name, rrtype)`; the tests give it
 * `staticResolver` (from `nodemilter/auth`) over fixture records so they
 * run offline. `examples/dmarc.ts` is the fuller verifier (DMARC, ARC, a
 * DNS timeout and cache).
 */
import * as os from 'node:os';

import { dkimVerify } from 'mailauth';
import type { DNSResolver } from 'mailauth';

import { ADDHDRS, CHGHDRS, CONTINUE, REJECT, formatAuthResults, runmilter } from 'nodemilter';
import type { AuthResResult, Family, HostAddr } from 'nodemilter';
import { CollectingMilter } from 'nodemilter/mime';
import { checkSpf, clientIp, insertOnTop, ownAuthResults, spfAuthResults } from 'nodemilter/auth';
import type { MessageCollector } from 'nodemilter/mime';

/** Settings of the auth milter; set by main() from the environment, or by a test. */
export const config: {
  /** The authserv-id written in the header (default: the `j` macro, else the host name). */
  authservId?: string;
  /** Refuse MAIL FROM when the sender's SPF result is `fail`. */
  rejectSpfFail?: boolean;
  /** DNS lookups for SPF and DKIM (default: Node's resolver). */
  resolver?: DNSResolver;
} = {};

/** A resolver over fixed records, for tests and offline runs (see `nodemilter/auth`). */
export { staticResolver } from 'nodemilter/auth';

/** What one message collects before its Authentication-Results header is written. */
interface AuthMessage {
  results: AuthResResult[];
  /** Which Authentication-Results headers (1-based among them) claim our authserv-id. */
  forged: number[];
  seen: number;
  sender: string;
}

export class AuthMilter extends CollectingMilter<AuthMessage> {
  static override flags = ADDHDRS | CHGHDRS;
  // Raw header values, so that DKIM with simple canonicalization sees the signed bytes.
  static override headerLeadingSpace = true;

  ip?: string;
  helo = '';

  protected override newMessage(): AuthMessage {
    return { results: [], forged: [], seen: 0, sender: '' };
  }

  /** The authserv-id: the configured one, else the MTA's host name (`j`), else ours. */
  authservId(): string {
    return config.authservId ?? this.getsymval('j') ?? os.hostname();
  }

  override connect(hostname: string, family: Family, hostaddr: HostAddr) {
    this.ip = clientIp(family, hostaddr); // SPF needs it; a local client has none
    return CONTINUE;
  }

  override hello(heloname: string) {
    this.helo = heloname;
    return CONTINUE;
  }

  override async envfrom(from: string) {
    const m = this.message;
    const address = from.replace(/^<|>$/g, '');
    m.sender = address;
    const user = this.getsymval('{auth_authen}');
    if (user) m.results.push({ method: 'auth', result: 'pass', properties: [{ type: 'smtp', name: 'auth', value: user }] });
    if (!this.ip) return CONTINUE;
    // RFC 7208 §2.3/§2.4: the HELO identity when it is a name, and MAIL FROM
    // (postmaster@HELO for the null sender).
    const spf = await checkSpf({ ip: this.ip, helo: this.helo, sender: address, authservId: this.authservId(), resolver: config.resolver });
    m.results.push(...spfAuthResults(spf));
    const mf = spf.find((r) => r.identity === 'mailfrom');
    if (mf?.result === 'fail' && config.rejectSpfFail && !user) {
      this.log('refused', from, 'from', this.ip, mf.comment ?? '');
      this.setreply('550', '5.7.23', `SPF: ${this.ip} may not send mail for ${address}`.replace(/%/g, '%%'));
      return REJECT;
    }
    return CONTINUE;
  }

  override header(name: string, value: string) {
    if (name.toLowerCase() === 'authentication-results') {
      const n = ++this.message.seen;
      if (ownAuthResults(value, this.authservId())) this.message.forged.push(n);
    }
    return super.header(name, value); // collect it for DKIM
  }

  protected override async checkmessage(collected: MessageCollector) {
    const m = this.message;
    try {
      const dkim = await dkimVerify(await collected.buffer(), { resolver: config.resolver, sender: m.sender || undefined });
      for (const r of dkim.results) {
        const props = [];
        if (r.signingDomain) props.push({ type: 'header', name: 'd', value: r.signingDomain });
        if (r.selector) props.push({ type: 'header', name: 's', value: r.selector });
        m.results.push({ method: 'dkim', result: r.status.result, comment: r.status.comment, properties: props });
      }
    } catch (err) {
      m.results.push({ method: 'dkim', result: 'temperror', comment: (err as Error).message, properties: [] });
    }
    // Delete from the last, so the indexes of the others stay right.
    for (const n of [...m.forged].reverse()) this.chgheader('Authentication-Results', n, null);
    const value = formatAuthResults({ authservId: this.authservId(), results: m.results }, { fold: true });
    insertOnTop(this, `Authentication-Results: ${value.replace(/\n/g, '\r\n')}\r\n`);
    return CONTINUE;
  }
}

/** Read the settings from the environment and serve on `socket` until SIGTERM/SIGINT. */
export function main(socket = 'inet:8898@127.0.0.1'): Promise<void> {
  config.authservId = process.env.AUTH_SERVID || config.authservId;
  config.rejectSpfFail = process.env.AUTH_REJECT_SPF_FAIL === '1' || config.rejectSpfFail;
  return runmilter('auth', socket, { factory: AuthMilter });
}

// Started directly (node dist/examples/auth.js) or by scripts/run-example.js
// (which sets argv[1]); a test that requires this module only gets the class.
if (require.main === module || process.argv[1] === __filename) {
  main(process.argv[2]).catch((err: Error) => {
    console.error(`auth: ${err.message}`);
    process.exit(1);
  });
}
