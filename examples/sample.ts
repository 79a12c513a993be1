/**
 * The sample milter: what pymilter's sample.py does, on nodemilter.
 *
 * - rejects a message whose Subject is written in a charset we do not read
 *   (a header rule, with our own 550 reply);
 * - notes the SMTP AUTH user at MAIL FROM (`@symlist('{auth_authen}')`,
 *   `@noreply`: the MTA does not wait for that step);
 * - refuses mail to `MAILER-DAEMON@...` at RCPT TO;
 * - collects the message (in memory, or in a private spool file past 1 MiB);
 * - at end of message replaces dangerous attachments (by file name, zip
 *   members included) with a short notice and strips `<script>` elements
 *   from HTML parts, then sends the header changes and the new body to the
 *   MTA (`applyToContext`: addheader/chgheader + replacebody).
 *
 * Run it (after `npm run build:ts`):
 *
 * ```sh
 * npm run example -- sample inet:8894@127.0.0.1
 * npm start                        # the same, on inet:8894@127.0.0.1
 * ```
 *
 * Postfix `main.cf`: `smtpd_milters = inet:127.0.0.1:8894` (Postfix already
 * sends `{auth_authen}` at MAIL FROM: see `milter_mail_macros`).
 *
 * Environment: `SAMPLE_SPOOL_DIR` (where large messages are spooled,
 * default the system temp directory).
 */
import { ACCEPT, ADDHDRS, CHGBODY, CHGHDRS, CONTINUE, REJECT, noreply, runmilter, symlist } from 'nodemilter';
import type { Family, HostAddr } from 'nodemilter';
import { CollectingMilter, applyToContext, readMime } from 'nodemilter/mime';
import type { MessageCollector } from 'nodemilter/mime';

/**
 * File names whose attachments are replaced by a notice: programs, scripts
 * and shortcuts that run when opened on a desktop system.
 */
export const DANGEROUS_NAME =
  /\.(ade|adp|app|bas|bat|chm|cmd|com|cpl|dll|exe|hta|inf|ins|isp|jar|js|jse|lnk|msc|msi|msp|mst|pif|ps1|reg|scf|scr|sct|shb|shs|url|vb|vbe|vbs|wsc|wsf|wsh)$/i;

/**
 * Header rules: a header whose value matches is refused with the reply
 * given. The first rule mirrors sample.py: a Subject encoded in big5 or
 * iso-2022-jp is taken for spam by a site that reads neither.
 */
export const HEADER_RULES: { header: string; match: RegExp; reply: [rcode: string, xcode: string, text: string] }[] = [
  { header: 'subject', match: /^=\?(big5|iso-2022-jp)\?/i, reply: ['550', '5.7.1', 'We do not read mail in this charset'] },
];

/** What the milter learns about each message before end of message. */
interface SampleMessage {
  from: string;
  user?: string;
  rcpts: string[];
}

export class SampleMilter extends CollectingMilter<SampleMessage> {
  static override flags = ADDHDRS | CHGHDRS | CHGBODY;
  static override collector = { threshold: 1024 * 1024, dir: process.env.SAMPLE_SPOOL_DIR || undefined };

  /** Where the client connected from, for the log. */
  client = '';

  protected override newMessage(): SampleMessage {
    return { from: '', rcpts: [] };
  }

  @noreply
  override connect(hostname: string, family: Family, hostaddr: HostAddr) {
    const where = hostaddr && 'address' in hostaddr ? hostaddr.address : hostaddr && 'path' in hostaddr ? hostaddr.path : family;
    this.client = `${hostname} [${where}]`;
    this.log('connect from', this.client);
    return CONTINUE;
  }

  // Postfix sends {auth_authen} at MAIL FROM by default; with sendmail the
  // symlist asks for it (the MTA must offer SETSYMLIST).
  @symlist('{auth_authen}')
  @noreply
  override envfrom(from: string, ...params: string[]) {
    this.message.from = from;
    this.message.user = this.getsymval('{auth_authen}');
    const user = this.message.user ? [`(authenticated as ${this.message.user})`] : [];
    this.log('mail from', from, ...params, ...user);
    return CONTINUE;
  }

  override envrcpt(to: string) {
    // Mail to a MAILER-DAEMON is spam that bounced back to a forged sender.
    if (/^<mailer-daemon@/i.test(to)) {
      this.log('refused rcpt', to);
      this.setreply('550', '5.1.1', 'MAILER-DAEMON does not take mail');
      return REJECT;
    }
    this.message.rcpts.push(to);
    return CONTINUE;
  }

  override header(name: string, value: string) {
    const lname = name.toLowerCase();
    for (const rule of HEADER_RULES) {
      if (rule.header === lname && rule.match.test(value)) {
        this.log('refused', `${name}: ${value}`, 'from', this.client);
        this.setreply(...rule.reply);
        return REJECT;
      }
    }
    return super.header(name, value); // collect it
  }

  protected override async checkmessage(collected: MessageCollector) {
    const msg = await readMime(collected.stream());
    const parts = new Set(msg.attachments().filter((a) => DANGEROUS_NAME.test(a.name)).map((a) => a.part));
    const removed = [...parts].map((part) => part.defang());
    const scripts = msg.stripScripts();
    if (!msg.ismodified()) return CONTINUE;
    const what = [...removed, ...(scripts ? [`${scripts} script${scripts > 1 ? 's' : ''}`] : [])];
    msg.addHeader('X-Defanged', what.join(', '));
    this.log('defanged', what.join(', '), 'in a message from', this.message.from, 'to', this.message.rcpts.join(' '));
    applyToContext(this, msg); // header changes (as the MTA must mirror them) and the new body
    return ACCEPT;
  }
}

/** Serve the sample milter on `socket` until SIGTERM/SIGINT. */
export function main(socket = 'inet:8894@127.0.0.1'): Promise<void> {
  return runmilter('sample', socket, { factory: SampleMilter });
}

// Started directly (node dist/examples/sample.js) or by scripts/run-example.js
// (which sets argv[1]); a test that requires this module only gets the class.
if (require.main === module || process.argv[1] === __filename) {
  main(process.argv[2]).catch((err: Error) => {
    console.error(`sample: ${err.message}`);
    process.exit(1);
  });
}
