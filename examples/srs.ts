/**
 * srs: the Sender Rewriting Scheme for a forwarding host, postsrsd's job
 * (and pysrs's) as a milter, configured like postsrsd.
 *
 * - The envelope sender of mail that passes through is rewritten (chgfrom)
 *   to `SRS0=HASH=TT=origin.example=user@SRS_DOMAIN`, so SPF at the next
 *   hop checks our domain; an SRS0 address of another forwarder becomes
 *   SRS1. The null sender, senders at `SRS_DOMAIN` and senders at
 *   `SRS_EXCLUDE_DOMAINS` keep their address.
 * - A recipient at `SRS_DOMAIN` that is an SRS address (a bounce coming
 *   back) is replaced (delrcpt + addrcpt) by the address it stands for. A
 *   forged, damaged or expired one is refused at RCPT with `550 5.1.1`.
 *
 * Run it (after `npm run build:ts`):
 *
 * ```sh
 * SRS_DOMAIN=fwd.example.org SRS_SECRET=/etc/nodemilter/srs.secret \
 *   npm run example -- srs inet:8895@127.0.0.1
 * ```
 *
 * Settings (environment, or `NAME=value` lines in the file `SRS_CONFIG`;
 * the names are postsrsd's):
 *
 * - `SRS_DOMAIN`: the domain of rewritten addresses (required).
 * - `SRS_SECRET`: a file of secrets, one a line; the first signs, all
 *   verify (put a new secret first, drop the old one after `SRS_MAXAGE`
 *   days). Or `SRS_SECRETS`, a comma list (tests).
 * - `SRS_EXCLUDE_DOMAINS`: comma list; `.example.com` covers subdomains.
 * - `SRS_SEPARATOR` (`=`, `+` or `-`), `SRS_HASHLENGTH` (4),
 *   `SRS_HASHMIN` (the hash length), `SRS_MAXAGE` (21 days).
 */
import { readFileSync } from 'node:fs';

import { ADDRCPT, CHGFROM, CONTINUE, DELRCPT, REJECT, runmilter, Base, InvalidArgumentError } from 'nodemilter';
import { Srs, SrsError, intSetting, listSetting, readSettings } from 'nodemilter/auth';

/** The rewriter; set by {@link configure}, or by a test. */
export const config: { srs?: Srs } = {};

interface SrsMessage {
  sender: string;
  /** Recipients to replace at eom: [as given, reversed]. */
  reversed: [string, string][];
}

export class SrsMilter extends Base<SrsMessage> {
  static override flags = CHGFROM | ADDRCPT | DELRCPT;

  protected override newMessage(): SrsMessage {
    return { sender: '', reversed: [] };
  }

  get srs(): Srs {
    if (!config.srs) throw new InvalidArgumentError('srs: not configured (SRS_DOMAIN and SRS_SECRET)');
    return config.srs;
  }

  override envfrom(from: string) {
    this.message.sender = from.replace(/^<|>$/g, '');
    return CONTINUE;
  }

  override envrcpt(to: string) {
    const rcpt = to.replace(/^<|>$/g, '');
    if (!this.srs.isSrs(rcpt)) return CONTINUE;
    try {
      this.message.reversed.push([to, this.srs.reverse(rcpt)]);
      return CONTINUE;
    } catch (err) {
      if (!(err instanceof SrsError)) throw err;
      this.log('refused', to, err.reason);
      this.setreply('550', '5.1.1', `${err.reason === 'expired' ? 'Expired' : 'Invalid'} SRS address <${rcpt}>`.replace(/%/g, '%%'));
      return REJECT;
    }
  }

  override eom() {
    const m = this.message;
    for (const [given, original] of m.reversed) {
      this.delrcpt(given);
      this.addrcpt(`<${original}>`);
    }
    const rewritten = this.srs.forward(m.sender);
    if (rewritten) {
      this.chgfrom(`<${rewritten}>`);
      this.log('sender', m.sender, 'rewritten to', rewritten);
    }
    return CONTINUE;
  }
}

/** Read the settings (environment over the `SRS_CONFIG` file) into {@link config}. */
export function configure(env: Record<string, string | undefined> = process.env): void {
  const s = readSettings(env, 'SRS_CONFIG');
  if (!s.SRS_DOMAIN) throw new InvalidArgumentError('srs needs SRS_DOMAIN (the domain of rewritten addresses)');
  let secrets = listSetting(s.SRS_SECRETS);
  if (s.SRS_SECRET) {
    try {
      secrets = readFileSync(s.SRS_SECRET, 'utf8').split(/\r?\n/).map((l) => l.trim()).filter((l) => l && !l.startsWith('#'));
    } catch (err) {
      throw new InvalidArgumentError(`SRS_SECRET: ${s.SRS_SECRET} cannot be read: ${(err as Error).message}`);
    }
  }
  if (!secrets.length) throw new InvalidArgumentError('srs needs a secret: SRS_SECRET (a file, one secret a line) or SRS_SECRETS');
  const sep = s.SRS_SEPARATOR || '=';
  if (sep !== '=' && sep !== '+' && sep !== '-') throw new InvalidArgumentError(`SRS_SEPARATOR=${JSON.stringify(sep)} is invalid: expected =, + or -`);
  config.srs = new Srs({
    domain: s.SRS_DOMAIN,
    secrets,
    excludeDomains: listSetting(s.SRS_EXCLUDE_DOMAINS),
    separator: sep,
    hashLength: intSetting('SRS_HASHLENGTH', s.SRS_HASHLENGTH, 4, 1, 27),
    hashMin: s.SRS_HASHMIN ? intSetting('SRS_HASHMIN', s.SRS_HASHMIN, 4, 1, 27) : undefined,
    maxAge: intSetting('SRS_MAXAGE', s.SRS_MAXAGE, 21, 1, 1023),
  });
}

/** Configure from the environment and serve on `socket` until SIGTERM/SIGINT. */
export function main(socket = 'inet:8895@127.0.0.1'): Promise<void> {
  configure();
  return runmilter('srs', socket, { factory: SrsMilter });
}

if (require.main === module || process.argv[1] === __filename) {
  main(process.argv[2]).catch((err: Error) => {
    console.error(`srs: ${err.message}`);
    process.exit(1);
  });
}
