/**
 * A greylisting milter: the first attempt of an unknown
 * (client IP, sender, recipient) triplet gets `451 4.7.1`; a retry after
 * the grey time passes, and so does everything from that triplet for the
 * retain time. Authenticated senders (`{auth_authen}`), and clients,
 * senders or recipients marked OK in an access file, are not greylisted.
 * Passed messages get an `X-Greylist` header.
 *
 * Run it (after `npm run build:ts`):
 *
 * ```sh
 * # one host, state in SQLite:
 * GREYLIST_STORE=/var/lib/milter/greylist.db node dist/examples/greylist.js inet:8895@127.0.0.1
 * # a fleet of MX hosts sharing one Redis:
 * GREYLIST_STORE=redis://10.0.0.5:6379/0 node dist/examples/greylist.js inet:8895@127.0.0.1
 * ```
 *
 * Environment: `GREYLIST_STORE` (a SQLite file, default `greylist.db`, or a
 * `redis://` URL), `GREYLIST_PREFIX` (Redis key prefix), `GREY_TIME`,
 * `GREY_EXPIRE`, `GREY_RETAIN` (seconds), `GREYLIST_ACCESS` (a sendmail
 * access file in text form). See docs/greylist.md for the Postfix settings.
 */
import * as os from 'node:os';

import { ADDHDRS, Base, CONTINUE, DISCARD, REJECT, TEMPFAIL, runmilter, symlist } from 'nodemilter';
import type { Family, HostAddr } from 'nodemilter';
import { Greylist, RedisStore, SqliteStore } from 'nodemilter/greylist';
import type { Store } from 'nodemilter/greylist';
import { AccessMap, dynipReason } from 'nodemilter/policy';
import type { AccessDecision } from 'nodemilter/policy';

/** Per message: who sends, whether greylisting is skipped, and what passed. */
interface GreyMessage {
  from: string;
  exempt?: string;
  passed: string[];
}

/** The greylist and access map the milter uses; set by main() (or by a test). */
export const config: { greylist?: Greylist; access?: AccessMap } = {};

/** Answer a REJECT/ERROR/TEMP/DISCARD access decision; undefined for anything that does not end the step. */
function enforce(milter: Base, d: AccessDecision | undefined): number | undefined {
  if (!d) return undefined;
  if (d.action === 'DISCARD') return DISCARD;
  if (d.action === 'REJECT' || d.action === 'ERROR' || d.action === 'TEMP') {
    milter.setreply(d.rcode!, d.xcode ?? null, d.text || 'Access denied');
    return d.action === 'TEMP' ? TEMPFAIL : REJECT;
  }
  return undefined;
}

export class GreylistMilter extends Base<GreyMessage> {
  static override flags = ADDHDRS;

  /** The client's IP (undefined for a unix-socket or unknown client: never greylisted). */
  ip?: string;
  hostname = '';
  /** Why this connection is exempt (access map OK), if it is. */
  connectExempt?: string;

  protected override newMessage(): GreyMessage {
    return { from: '', passed: [] };
  }

  override connect(hostname: string, family: Family, hostaddr: HostAddr) {
    this.hostname = hostname;
    if ((family === 'inet' || family === 'inet6') && hostaddr && 'address' in hostaddr) this.ip = hostaddr.address;
    const d = config.access?.checkConnect(hostname, this.ip);
    if (d && (d.action === 'OK' || d.action === 'RELAY')) this.connectExempt = `client listed in the access map (${d.key})`;
    return enforce(this, d) ?? CONTINUE;
  }

  // Postfix sends {auth_authen} at MAIL FROM by default (milter_mail_macros);
  // asking for it here also works with an MTA that honours setsymlist.
  @symlist('{auth_authen}')
  override envfrom(from: string) {
    this.message.from = from;
    const user = this.getsymval('{auth_authen}');
    if (user) this.message.exempt = `authenticated as ${user}`;
    else if (this.connectExempt) this.message.exempt = this.connectExempt;
    const d = config.access?.checkFrom(from);
    if (d && (d.action === 'OK' || d.action === 'RELAY')) this.message.exempt ??= `sender listed in the access map (${d.key})`;
    return enforce(this, d) ?? CONTINUE;
  }

  override async envrcpt(to: string) {
    const d = config.access?.checkTo(to);
    const verdict = enforce(this, d);
    if (verdict !== undefined) return verdict;
    if (this.message.exempt || !this.ip || !config.greylist) return CONTINUE;
    if (d && (d.action === 'OK' || d.action === 'RELAY')) return CONTINUE;
    let v;
    try {
      v = await config.greylist.evaluate(this.ip, this.message.from, to);
    } catch (err) {
      // Fail open: a broken store must not stop all mail.
      this.logger.warn(`greylist store failed, letting ${to} through: ${(err as Error).message}`);
      return CONTINUE;
    }
    if (v.count === 0) {
      const dyn = dynipReason(this.hostname, this.ip);
      this.log('greylisted', this.ip, this.message.from, to, v.outcome, dyn ? `(${dyn})` : '');
      this.setreply('451', '4.7.1', `Greylisted, please try again in ${Math.ceil(v.retryAfter)} seconds`);
      return TEMPFAIL;
    }
    this.message.passed.push(`${to} count=${v.count} delay=${Math.round(v.record.lastSeen - v.record.firstSeen)}s`);
    return CONTINUE;
  }

  override eom() {
    const host = this.getsymval('j') ?? os.hostname();
    if (this.message.exempt) this.addheader('X-Greylist', `not greylisted on ${host}: ${this.message.exempt}`);
    else if (this.message.passed.length) this.addheader('X-Greylist', `passed on ${host}: ${this.message.passed.join(', ')}`);
    return CONTINUE;
  }
}

function envSeconds(name: string): number | undefined {
  const v = process.env[name];
  return v === undefined || v === '' ? undefined : Number(v);
}

/** Build the store from GREYLIST_STORE: a `redis://` URL or a SQLite file. */
export function storeFromEnv(): Store {
  const where = process.env.GREYLIST_STORE || 'greylist.db';
  return /^rediss?:\/\//.test(where)
    ? new RedisStore({ url: where, prefix: process.env.GREYLIST_PREFIX || undefined })
    : new SqliteStore(where);
}

async function main(): Promise<void> {
  const socket = process.argv[2] ?? 'inet:8895@127.0.0.1';
  config.greylist = new Greylist(storeFromEnv(), {
    greyTime: envSeconds('GREY_TIME'),
    greyExpire: envSeconds('GREY_EXPIRE'),
    greyRetain: envSeconds('GREY_RETAIN'),
  });
  if (process.env.GREYLIST_ACCESS) config.access = await AccessMap.load(process.env.GREYLIST_ACCESS);
  // Drop records past the retain time once an hour (Redis expires them itself).
  const cleaner = setInterval(() => {
    config.greylist!.clean().catch((err: Error) => console.warn(`greylist clean failed: ${err.message}`));
  }, 3600_000);
  cleaner.unref();
  try {
    await runmilter('greylist', socket, { factory: GreylistMilter, drain: 10_000 });
  } finally {
    clearInterval(cleaner);
    await config.greylist.close();
  }
}

if (require.main === module) {
  main().catch((err) => {
    console.error(err);
    process.exit(1);
  });
}
