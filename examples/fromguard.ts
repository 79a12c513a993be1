/**
 * fromguard: a From: header that claims one of our own domains must come
 * from a user who logged in (SMTP AUTH) or from a trusted network. Anyone
 * else writing `From: ceo@example.org` to our users is refused, or, if you
 * prefer, gets the From: rewritten so readers see it was not verified (what
 * vrfydmn does for hosts that serve several domains).
 *
 * - `reject` (default): `550 5.7.1` at the From: header.
 * - `rewrite`: the original goes to `X-Original-From:` and From: becomes
 *   `"<original> (unverified)" <envelope sender>`; when the envelope
 *   sender is empty or itself in our domains there is nothing honest to
 *   put there, and the message is refused as in `reject`.
 *
 * Our domains match with their subdomains. Every address of a From: header
 * (it may list several) is checked.
 *
 * Run it (after `npm run build:ts`):
 *
 * ```sh
 * FROMGUARD_DOMAINS=example.org FROMGUARD_TRUSTED=192.0.2.0/24 npm run example -- fromguard inet:8899@127.0.0.1
 * ```
 *
 * Postfix sends `{auth_authen}` at MAIL FROM by default (milter_mail_macros).
 *
 * Environment: `FROMGUARD_DOMAINS` (our domains, comma-separated,
 * required), `FROMGUARD_ACTION` (`reject` or `rewrite`),
 * `FROMGUARD_TRUSTED` (comma-separated addresses, CIDR ranges or host
 * names whose mail is trusted; loopback is always trusted).
 */
import { ADDHDRS, Base, CHGHDRS, CONTINUE, REJECT, IpList, runmilter, symlist, InvalidArgumentError } from 'nodemilter';
import type { Family, HostAddr } from 'nodemilter';
import { isInternal, parseDomains } from './nomix';

/** What to do with a From: that claims our domain without authentication. */
export type FromGuardAction = 'reject' | 'rewrite';

/** Settings of the fromguard milter; set by main() from the environment, or by a test. */
export const config: { domains: string[]; action: FromGuardAction; trusted: IpList } = {
  domains: [],
  action: 'reject',
  trusted: new IpList([]),
};

/**
 * The addresses of a From: value (`"Doe, J" <j@example.org>, k@example.net`):
 * what is inside angle brackets, else each comma-separated word with an `@`.
 * Quoted strings and comments are skipped, so a display name cannot hide or
 * fake an address.
 */
export function fromAddresses(value: string): string[] {
  const text = value.replace(/"(?:[^"\\]|\\.)*"/g, '""').replace(/\((?:[^()\\]|\\.)*\)/g, ' ');
  const out: string[] = [];
  for (const item of text.split(',')) {
    const angle = /<([^<>]*)>/.exec(item);
    const addr = (angle ? angle[1] : item).trim();
    if (addr.includes('@')) out.push(addr);
  }
  return out;
}

/** The domain of an address (after the last `@`), lower case. */
function domainOf(address: string): string {
  return address.slice(address.lastIndexOf('@') + 1).toLowerCase();
}

interface GuardMessage {
  sender: string;
  user?: string;
  /** The From: value to rewrite at end of message, when the action is `rewrite`. */
  rewrite?: string;
}

export class FromGuardMilter extends Base<GuardMessage> {
  static override flags = ADDHDRS | CHGHDRS;

  trusted = false;

  protected override newMessage(): GuardMessage {
    return { sender: '' };
  }

  override connect(hostname: string, family: Family, hostaddr: HostAddr) {
    // Local submission (a unix socket) and the trusted networks may use our domains.
    if (family === 'unix') this.trusted = true;
    else if (hostaddr && 'address' in hostaddr) {
      this.trusted = config.trusted.contains(hostaddr.address, hostname) || /^(127\.|::1$|::ffff:127\.)/.test(hostaddr.address);
    }
    return CONTINUE;
  }

  @symlist('{auth_authen}')
  override envfrom(from: string) {
    this.message.sender = from.replace(/^<|>$/g, '');
    this.message.user = this.getsymval('{auth_authen}');
    return CONTINUE;
  }

  override header(name: string, value: string) {
    if (name.toLowerCase() !== 'from' || this.trusted || this.message.user) return CONTINUE;
    const claimed = fromAddresses(value).find((a) => isInternal(domainOf(a), config.domains));
    if (!claimed) return CONTINUE;
    const sender = this.message.sender;
    if (config.action === 'rewrite' && sender && !isInternal(domainOf(sender), config.domains)) {
      this.message.rewrite = value;
      return CONTINUE;
    }
    this.log('refused From:', value, 'envelope', `<${sender}>`);
    this.setreply('550', '5.7.1', `From: ${claimed} needs authentication (SMTP AUTH) to be sent here`.replace(/%/g, '%%'));
    return REJECT;
  }

  override eom() {
    const original = this.message.rewrite;
    if (original === undefined) return CONTINUE;
    const label = original.replace(/[\r\n]+\s*/g, ' ').replace(/["\\]/g, '').trim();
    this.addheader('X-Original-From', original);
    this.chgheader('From', 1, `"${label} (unverified)" <${this.message.sender}>`);
    this.log('rewrote From:', original, 'to', `<${this.message.sender}>`);
    return CONTINUE;
  }
}

/** Read the settings from the environment and serve on `socket` until SIGTERM/SIGINT. */
export function main(socket = 'inet:8899@127.0.0.1'): Promise<void> {
  try {
    config.domains = parseDomains(process.env.FROMGUARD_DOMAINS ?? '');
    if (config.domains.length === 0) throw new InvalidArgumentError('fromguard: set FROMGUARD_DOMAINS to our domains, e.g. FROMGUARD_DOMAINS=example.org');
    const action = process.env.FROMGUARD_ACTION || 'reject';
    if (action !== 'reject' && action !== 'rewrite') {
      throw new InvalidArgumentError(`fromguard: FROMGUARD_ACTION=${JSON.stringify(action)} is invalid: expected reject or rewrite`);
    }
    config.action = action;
    config.trusted = new IpList((process.env.FROMGUARD_TRUSTED ?? '').split(',').map((s) => s.trim()).filter(Boolean));
  } catch (err) {
    return Promise.reject(err);
  }
  return runmilter('fromguard', socket, { factory: FromGuardMilter });
}

// Started directly (node dist/examples/fromguard.js) or by scripts/run-example.js
// (which sets argv[1]); a test that requires this module only gets the class.
if (require.main === module || process.argv[1] === __filename) {
  main(process.argv[2]).catch((err: Error) => {
    console.error(`fromguard: ${err.message}`);
    process.exit(1);
  });
}
