/**
 * A starting point for a new milter: every callback is here, in protocol
 * order, with what a real milter usually does in it. Copy this file, delete
 * the callbacks you do not need (a callback that is not overridden is
 * negotiated away, so the MTA never sends that event) and fill in the rest.
 *
 * What it does as it stands:
 * - logs the client: IPv4, IPv6 or a unix socket (local submission);
 * - refuses a HELO that claims to be us, or is a bare IP address, with
 *   `550 5.7.1` and a reply of its own (setreply);
 * - reads the ESMTP parameters of MAIL FROM (SIZE, BODY, SMTPUTF8...);
 * - counts headers and body bytes;
 * - at end of message does its (async) work, adds an `X-Template` header
 *   and, when `TEMPLATE_BCC` is set, a Bcc recipient (addrcpt).
 *
 * Run it (after `npm run build:ts`):
 *
 * ```sh
 * TEMPLATE_BCC='<archive@example.org>' npm run example -- template unix:/run/template/milter.sock
 * ```
 *
 * Environment: `TEMPLATE_BCC` (a recipient to add to every message),
 * `TEMPLATE_HOSTNAMES` (comma-separated names of this host that clients
 * must not use in HELO; default: the `j` macro the MTA sends at connect).
 */
import { setTimeout as sleep } from 'node:timers/promises';
import {
  ADDHDRS, ADDRCPT, Base, CONTINUE, REJECT, param2dict, runmilter,
} from 'nodemilter';
import type { Family, HostAddr, NegotiateOffer } from 'nodemilter';

/** Settings of the template milter; set by main() from the environment, or by a test. */
export const config: { bcc?: string; hostnames: string[] } = { hostnames: [] };

/** Per-message state: fresh at each MAIL FROM, gone after eom or abort. */
interface TemplateMessage {
  from: string;
  params: Record<string, string | true>;
  rcpts: string[];
  headers: number;
  bodyBytes: number;
  subject?: string;
}

export class TemplateMilter extends Base<TemplateMessage> {
  // The actions we may take at end of message; anything else throws.
  static override flags = ADDHDRS | ADDRCPT;

  // Per-connection state: ordinary fields.
  client = 'unknown';
  family: Family = 'unknown';
  helo = '';
  messages = 0;

  protected override newMessage(): TemplateMessage {
    return { from: '', params: {}, rcpts: [], headers: 0, bodyBytes: 0 };
  }

  /**
   * Option negotiation, once per connection before connect. Base already
   * asks for what this class needs (see docs/guide.md); override it only to
   * decide per connection, starting from `super.negotiate(offer)`.
   */
  override negotiate(offer: NegotiateOffer) {
    this.log(`MTA offers actions 0x${offer.actions.toString(16)}, steps 0x${offer.steps.toString(16)}`);
    return super.negotiate(offer);
  }

  override connect(hostname: string, family: Family, hostaddr: HostAddr) {
    this.family = family;
    if ((family === 'inet' || family === 'inet6') && hostaddr && 'address' in hostaddr) {
      // IPv6 addresses are written in brackets in mail (`[IPv6:2001:db8::1]`
      // in an address literal); an IPv4-mapped IPv6 address is IPv4.
      const mapped = /^::ffff:(\d+\.\d+\.\d+\.\d+)$/i.exec(hostaddr.address);
      this.client = family === 'inet6' && !mapped ? `${hostname} [IPv6:${hostaddr.address}]:${hostaddr.port}` : `${hostname} [${mapped?.[1] ?? hostaddr.address}]:${hostaddr.port}`;
    } else if (family === 'unix' && hostaddr && 'path' in hostaddr) {
      this.client = `${hostname} (local, ${hostaddr.path || 'unix socket'})`;
    } else {
      this.client = `${hostname} (address unknown)`;
    }
    this.log('connect from', this.client);
    return CONTINUE;
  }

  override hello(heloname: string) {
    this.helo = heloname;
    const ours = config.hostnames.length ? config.hostnames : [this.getsymval('j')].filter((h): h is string => !!h);
    const local = this.family === 'unix';
    if (!local && ours.some((h) => h.toLowerCase() === heloname.toLowerCase())) {
      this.setreply('550', '5.7.1', `You are not ${heloname}`.replace(/%/g, '%%'));
      return REJECT;
    }
    if (!local && (/^\d+\.\d+\.\d+\.\d+$/.test(heloname) || heloname.includes(':'))) {
      this.setreply('550', '5.7.1', `HELO ${heloname}: an address literal goes in brackets, e.g. [192.0.2.1]`.replace(/%/g, '%%'));
      return REJECT;
    }
    return CONTINUE;
  }

  override envfrom(from: string, ...params: string[]) {
    this.messages++;
    this.message.from = from;
    this.message.params = param2dict(params); // e.g. { SIZE: '1234', BODY: '8BITMIME', SMTPUTF8: true }
    const auth = this.getsymval('{auth_authen}');
    this.log('mail from', from, JSON.stringify(this.message.params), ...(auth ? [`auth=${auth}`] : []));
    return CONTINUE;
  }

  override envrcpt(to: string, ...params: string[]) {
    this.message.rcpts.push(to);
    if (params.length) this.log('rcpt to', to, JSON.stringify(param2dict(params)));
    return CONTINUE;
  }

  override data() {
    return CONTINUE;
  }

  override header(name: string, value: string) {
    this.message.headers++;
    if (name.toLowerCase() === 'subject') this.message.subject = value;
    return CONTINUE;
  }

  override eoh() {
    return CONTINUE;
  }

  override body(chunk: Buffer) {
    this.message.bodyBytes += chunk.length;
    return CONTINUE;
  }

  override async eom() {
    // Async work goes here: a lookup, a scanner, a database. The MTA waits
    // (Postfix: milter_content_timeout, 300 s by default), and the engine
    // sends it progress every few seconds while this promise is pending.
    await sleep(1);
    const m = this.message;
    this.addheader('X-Template', `${m.headers} headers, ${m.bodyBytes} body bytes, message ${this.messages} on this connection`);
    if (config.bcc) this.addrcpt(config.bcc);
    const queueId = this.getsymval('i'); // Postfix sends it at end of message (milter_end_of_data_macros)
    this.log('eom', ...(queueId ? [queueId] : []), m.from, '->', m.rcpts.join(' '), ...(m.subject ? [`"${m.subject}"`] : []));
    return CONTINUE;
  }

  override abort() {
    // The message ended early (RSET, or the client left); the connection may go on.
    return CONTINUE;
  }

  override close() {
    // The connection is gone: release per-connection resources here.
    return CONTINUE;
  }

  override unknown(cmd: string) {
    this.log('unknown command', cmd);
    return CONTINUE;
  }
}

/** Read the settings from the environment and serve on `socket` until SIGTERM/SIGINT. */
export function main(socket = 'inet:8896@127.0.0.1'): Promise<void> {
  config.bcc = process.env.TEMPLATE_BCC || undefined;
  config.hostnames = (process.env.TEMPLATE_HOSTNAMES ?? '').split(',').map((h) => h.trim()).filter(Boolean);
  return runmilter('template', socket, { factory: TemplateMilter });
}

// Started directly (node dist/examples/template.js) or by scripts/run-example.js
// (which sets argv[1]); a test that requires this module only gets the class.
if (require.main === module || process.argv[1] === __filename) {
  main(process.argv[2]).catch((err: Error) => {
    console.error(`template: ${err.message}`);
    process.exit(1);
  });
}
