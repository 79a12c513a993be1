/**
 * nomix: refuse a recipient list that mixes internal and external domains
 * (pymilter's milter-nomix). A message meant for colleagues must not also
 * go outside by accident, and an outside message must not carry internal
 * addresses along.
 *
 * The first recipient decides the message's side; a later recipient on the
 * other side is refused at RCPT TO with `550 5.7.1`, so a client that meant
 * it sends those recipients in a second message. Internal domains match
 * with their subdomains (`example.org` covers `mail.example.org`).
 *
 * Run it (after `npm run build:ts`):
 *
 * ```sh
 * NOMIX_DOMAINS=example.org,example.net npm run example -- nomix inet:8897@127.0.0.1
 * ```
 *
 * Environment: `NOMIX_DOMAINS`, the internal domains, comma-separated
 * (required).
 */
import { Base, CONTINUE, REJECT, parse_addr, runmilter, InvalidArgumentError } from 'nodemilter';

/** Settings of the nomix milter; set by main() from the environment, or by a test. */
export const config: { domains: string[] } = { domains: [] };

/** Whether `domain` is one of `domains` or a subdomain of one (case-insensitive). */
export function isInternal(domain: string, domains: readonly string[]): boolean {
  const d = domain.toLowerCase().replace(/\.$/, '');
  return domains.some((x) => d === x || d.endsWith(`.${x}`));
}

/** Parse a comma-separated domain list; throws InvalidArgumentError naming a bad entry. */
export function parseDomains(list: string): string[] {
  const out = list.split(',').map((d) => d.trim().toLowerCase().replace(/\.$/, '')).filter(Boolean);
  for (const d of out) {
    if (!/^[a-z0-9]([a-z0-9-]*[a-z0-9])?(\.[a-z0-9]([a-z0-9-]*[a-z0-9])?)*$/.test(d)) {
      throw new InvalidArgumentError(`nomix: ${JSON.stringify(d)} is not a domain name (expected e.g. example.org)`);
    }
  }
  return out;
}

export class NomixMilter extends Base<{ side?: 'internal' | 'external'; first?: string }> {
  override envrcpt(to: string) {
    const [, domain] = parse_addr(to);
    // A recipient without a domain is local to the MTA: internal.
    const side = domain === undefined || isInternal(domain, config.domains) ? 'internal' : 'external';
    const m = this.message;
    if (!m.side) {
      m.side = side;
      m.first = to;
      return CONTINUE;
    }
    if (side === m.side) return CONTINUE;
    this.log('refused', to, 'after', m.first, `(${side} after ${m.side})`);
    // setreply takes `%` as a format character: double it in addresses.
    const text = `${to} is ${side} but ${m.first} is ${m.side}: send them separate messages`.replace(/%/g, '%%');
    this.setreply('550', '5.7.1', text);
    return REJECT;
  }
}

/** Read NOMIX_DOMAINS and serve on `socket` until SIGTERM/SIGINT. */
export function main(socket = 'inet:8897@127.0.0.1'): Promise<void> {
  config.domains = parseDomains(process.env.NOMIX_DOMAINS ?? '');
  if (config.domains.length === 0) {
    return Promise.reject(new InvalidArgumentError('nomix: set NOMIX_DOMAINS to the internal domains, e.g. NOMIX_DOMAINS=example.org,example.net'));
  }
  return runmilter('nomix', socket, { factory: NomixMilter });
}

// Started directly (node dist/examples/nomix.js) or by scripts/run-example.js
// (which sets argv[1]); a test that requires this module only gets the class.
if (require.main === module || process.argv[1] === __filename) {
  main(process.argv[2]).catch((err: Error) => {
    console.error(`nomix: ${err.message}`);
    process.exit(1);
  });
}
