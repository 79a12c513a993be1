/**
 * dkim-sign: DKIM-sign mail from authenticated senders and trusted
 * networks (OpenDKIM's signing mode, dkim-milter.py's job), with RSA and
 * Ed25519 keys (RFC 8463) chosen per From domain by an OpenDKIM-style
 * KeyTable and SigningTable. Needs nothing beyond nodemilter (Node's
 * crypto signs; mailauth is not used).
 *
 * The signature is computed over the header bytes exactly as the MTA will
 * deliver them: the milter asks for SMFIP_HDR_LEADSPC (raw header values).
 * The body is hashed as it arrives and never kept; the key signs at end of
 * message on libuv's thread pool. Postfix's own Received header, which the
 * milter never sees, is not signed. The DKIM-Signature headers go on top.
 *
 * Run it (after `npm run build:ts`):
 *
 * ```sh
 * DKIM_KEYTABLE=/etc/nodemilter/KeyTable DKIM_SIGNINGTABLE=/etc/nodemilter/SigningTable \
 *   npm run example -- dkim-sign inet:8891@127.0.0.1
 * ```
 *
 * Settings (environment, or `NAME=value` lines in the file `DKIM_CONFIG`);
 * docs/auth.md maps them to OpenDKIM's:
 *
 * - `DKIM_KEYTABLE`, `DKIM_SIGNINGTABLE`: the tables; or, for one domain,
 *   `DKIM_DOMAIN`, `DKIM_SELECTOR` and `DKIM_KEYFILE` (comma lists of
 *   selectors and key files give several signatures, e.g. RSA + Ed25519).
 * - `DKIM_MULTIPLE=1`: every matching SigningTable line signs.
 * - `DKIM_INTERNAL_HOSTS`: client addresses whose mail is signed (default
 *   `127.0.0.1/8,::1`); clients that authenticated (`{auth_authen}`) are
 *   signed too.
 * - `DKIM_CANONICALIZATION` (default `relaxed/relaxed`), `DKIM_SIGN_HEADERS`
 *   (colon or comma list), `DKIM_OVERSIGN_HEADERS` (the same; e.g. `From`),
 *   `DKIM_EXPIRE` (seconds).
 * - `DKIM_ON_ERROR`: `tempfail` (default) or `accept` when signing fails.
 */
import { ACCEPT, ADDHDRS, Base, CONTINUE, P_HDR_LEADSPC, TEMPFAIL, IpList, parse_addr, runmilter, InvalidArgumentError } from 'nodemilter';
import type { Bytes, Family, HostAddr } from 'nodemilter';
import { DkimSigner, SigningTable, clientIp, flagSetting, insertOnTop, intSetting, listSetting, readSettings, signingKey } from 'nodemilter/auth';
import type { DkimSignOptions, SigningKey } from 'nodemilter/auth';
import { readFileSync } from 'node:fs';

/** Settings of the signer; set by {@link configure} from the environment, or by a test. */
export const config: {
  table?: SigningTable;
  internal: IpList;
  sign: DkimSignOptions;
  onError: 'tempfail' | 'accept';
} = { internal: new IpList(['127.0.0.1/8', '::1']), sign: {}, onError: 'tempfail' };

interface SignMessage {
  /** The From header's address, when there is exactly one From header. */
  from?: string;
  fromCount: number;
  /** Why this message is signed (for the log). */
  who: string;
  /** The keys for the From address (known at end of headers). */
  keys: SigningKey[];
  /** Hashes the message as it arrives (from envfrom on, for clients we sign for). */
  signer?: DkimSigner;
}

export class DkimSignMilter extends Base<SignMessage> {
  static override flags = ADDHDRS;
  static override headerLeadingSpace = true;

  ip?: string;

  protected override newMessage(): SignMessage {
    return { fromCount: 0, who: '', keys: [] };
  }

  override connect(hostname: string, family: Family, hostaddr: HostAddr) {
    this.ip = clientIp(family, hostaddr);
    return CONTINUE;
  }

  override envfrom() {
    const user = this.getsymval('{auth_authen}');
    if (user) this.message.who = `user ${user}`;
    else if (this.ip && config.internal.contains(this.ip)) this.message.who = `client ${this.ip}`;
    else if (!this.ip) this.message.who = 'local client';
    // Nothing to sign from here: let the rest of the message pass without us.
    else return ACCEPT;
    this.message.signer = new DkimSigner(config.sign);
    return CONTINUE;
  }

  override header(name: string, value: Bytes) {
    const m = this.message;
    if (name.toLowerCase() === 'from') {
      m.fromCount++;
      const [user, domain] = parse_addr(Buffer.from(value).toString());
      if (domain) m.from = `${user}@${domain}`;
    }
    m.signer?.header(name, value, (this.steps & P_HDR_LEADSPC) !== 0);
    return CONTINUE;
  }

  override eoh() {
    const m = this.message;
    m.keys = m.from && m.fromCount === 1 && config.table ? config.table.keysFor(m.from) : [];
    // No key for this From (or no single From): nothing more to do here.
    return m.keys.length && m.signer ? CONTINUE : ACCEPT;
  }

  override body(chunk: Buffer) {
    this.message.signer?.body(chunk);
    return CONTINUE;
  }

  override async eom() {
    const m = this.message;
    if (!m.signer || !m.keys.length) return CONTINUE;
    const keys = m.keys;
    try {
      insertOnTop(this, await m.signer.sign(keys));
      this.log('signed', m.from, 'for', m.who, 'with', keys.map((k) => `${k.selector}._domainkey.${k.domain}`).join(' '));
    } catch (err) {
      this.log('signing failed:', (err as Error).message);
      if (config.onError === 'tempfail') {
        this.setreply('451', '4.7.0', 'DKIM signing failed, try again later');
        return TEMPFAIL;
      }
    }
    return CONTINUE;
  }
}

/** Read the settings (environment over the `DKIM_CONFIG` file) into {@link config}. */
export function configure(env: Record<string, string | undefined> = process.env): void {
  const s = readSettings(env, 'DKIM_CONFIG');
  const multiple = flagSetting('DKIM_MULTIPLE', s.DKIM_MULTIPLE);
  if (s.DKIM_KEYTABLE || s.DKIM_SIGNINGTABLE) {
    if (!s.DKIM_KEYTABLE || !s.DKIM_SIGNINGTABLE) throw new InvalidArgumentError('DKIM_KEYTABLE and DKIM_SIGNINGTABLE go together');
    config.table = SigningTable.fromFiles(s.DKIM_KEYTABLE, s.DKIM_SIGNINGTABLE, { multiple });
  } else if (s.DKIM_DOMAIN) {
    const selectors = listSetting(s.DKIM_SELECTOR);
    const files = listSetting(s.DKIM_KEYFILE);
    if (!selectors.length || selectors.length !== files.length) throw new InvalidArgumentError('DKIM_SELECTOR and DKIM_KEYFILE must list as many selectors as key files');
    const keys = selectors.map((sel, i) => {
      let text: string;
      try {
        text = readFileSync(files[i], 'latin1');
      } catch (err) {
        throw new InvalidArgumentError(`DKIM_KEYFILE: ${files[i]} cannot be read: ${(err as Error).message}`);
      }
      return signingKey(s.DKIM_DOMAIN, sel, text, `DKIM_KEYFILE ${files[i]}`);
    });
    config.table = SigningTable.forDomain(s.DKIM_DOMAIN, keys);
  } else if (!config.table) {
    throw new InvalidArgumentError('dkim-sign needs keys: DKIM_KEYTABLE + DKIM_SIGNINGTABLE, or DKIM_DOMAIN + DKIM_SELECTOR + DKIM_KEYFILE');
  }
  if (s.DKIM_INTERNAL_HOSTS) config.internal = new IpList(listSetting(s.DKIM_INTERNAL_HOSTS));
  const names = (v: string | undefined) => (v ? v.split(/[\s,:]+/).filter(Boolean) : undefined);
  const sign: DkimSignOptions = {
    canonicalization: s.DKIM_CANONICALIZATION || undefined,
    headerList: names(s.DKIM_SIGN_HEADERS),
    oversign: names(s.DKIM_OVERSIGN_HEADERS),
    expireAfter: s.DKIM_EXPIRE ? intSetting('DKIM_EXPIRE', s.DKIM_EXPIRE, 0, 1) : undefined,
  };
  // Check each signing setting now, so a bad one stops the milter at start, not every message.
  for (const [setting, option] of [['DKIM_CANONICALIZATION', 'canonicalization'], ['DKIM_SIGN_HEADERS', 'headerList'], ['DKIM_OVERSIGN_HEADERS', 'oversign']] as const) {
    try {
      new DkimSigner({ [option]: sign[option] });
    } catch (err) {
      throw new InvalidArgumentError(`${setting}: ${(err as Error).message}`);
    }
  }
  config.sign = sign;
  const onError = s.DKIM_ON_ERROR || 'tempfail';
  if (onError !== 'tempfail' && onError !== 'accept') throw new InvalidArgumentError(`DKIM_ON_ERROR=${JSON.stringify(onError)} is invalid: expected tempfail or accept`);
  config.onError = onError;
}

/** Configure from the environment and serve on `socket` until SIGTERM/SIGINT. */
export function main(socket = 'inet:8891@127.0.0.1'): Promise<void> {
  configure();
  return runmilter('dkim-sign', socket, { factory: DkimSignMilter });
}

if (require.main === module || process.argv[1] === __filename) {
  main(process.argv[2]).catch((err: Error) => {
    console.error(`dkim-sign: ${err.message}`);
    process.exit(1);
  });
}
