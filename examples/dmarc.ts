/**
 * dmarc: verify incoming mail (SPF, DKIM, ARC and DMARC, RFC 7489 with the
 * record's p, sp and pct) and write one Authentication-Results header
 * (RFC 8601) on top; OpenDMARC's job together with OpenDKIM's verifying
 * mode, spfmilter.py's and more. Optionally ARC-seal what was verified (a
 * forwarding host, OpenARC's job). Needs mailauth (`npm install mailauth@4`).
 *
 * - At MAIL FROM: SPF of the HELO name and of the sender (`postmaster@HELO`
 *   for the null sender); with `SPF_REJECT_FAIL=1` an SPF `fail` is refused
 *   with `550 5.7.23`.
 * - At end of message: DKIM, ARC, DMARC. Authentication-Results headers
 *   that claim our authserv-id are forged (RFC 8601 §5) and deleted.
 * - With `DMARC_REJECT=1` a DMARC failure under `p=reject` (or `sp=reject`
 *   for a subdomain) is refused with `550 5.7.1`; with `DMARC_QUARANTINE=1`
 *   one under `p=quarantine` is quarantined (Postfix: the hold queue).
 *   `pct` applies: messages sampled out get the next weaker policy. Both
 *   are off by default.
 * - DNS: one resolver with a per-lookup timeout and a cache for all checks.
 *   A DNS failure gives `temperror` results; with `DMARC_TEMPFAIL=1` a
 *   message whose DMARC result is `temperror` is answered `451 4.4.3` so
 *   the sender retries, instead of being delivered unjudged.
 *
 * Clients that authenticated (`{auth_authen}`) or connect from
 * `DMARC_INTERNAL_HOSTS` are not judged (OpenDMARC's IgnoreAuthenticatedClients
 * and IgnoreHosts): no SPF, no DMARC, no action; their message still gets
 * the header, with `auth=pass` and the DKIM results.
 *
 * Run it (after `npm run build:ts`):
 *
 * ```sh
 * DMARC_AUTHSERV_ID=mx.example.org DMARC_REJECT=1 npm run example -- dmarc inet:8893@127.0.0.1
 * ```
 *
 * Settings (environment, or `NAME=value` lines in the file `DMARC_CONFIG`;
 * docs/auth.md has them all, with OpenDMARC's names): `DMARC_AUTHSERV_ID`,
 * `DMARC_REJECT`, `DMARC_QUARANTINE`, `DMARC_TEMPFAIL`, `SPF_REJECT_FAIL`,
 * `DMARC_INTERNAL_HOSTS`, `DMARC_MIN_KEY_BITS`, `DNS_TIMEOUT` (ms, default 5000), `DNS_SERVERS`,
 * `DNS_CACHE_SIZE`, `DNS_METRICS_PORT` (serve DNS metrics on
 * 127.0.0.1:PORT/metrics), `ARC_SEAL_DOMAIN`, `ARC_SEAL_SELECTOR`,
 * `ARC_SEAL_KEYFILE`.
 */
import * as http from 'node:http';
import type { AddressInfo } from 'node:net';
import * as os from 'node:os';
import { readFileSync } from 'node:fs';

import { ADDHDRS, CHGHDRS, CONTINUE, QUARANTINE, REJECT, TEMPFAIL, IpList, runmilter, InvalidArgumentError } from 'nodemilter';
import type { Family, HostAddr } from 'nodemilter';
import { CollectingMilter } from 'nodemilter/mime';
import type { MessageCollector } from 'nodemilter/mime';
import {
  DnsMetrics,
  checkSpf,
  clientIp,
  createResolver,
  dmarcDisposition,
  flagSetting,
  insertOnTop,
  intSetting,
  listSetting,
  ownAuthResults,
  readSettings,
  signingKey,
  verifyMessage,
} from 'nodemilter/auth';
import type { DnsResolve, SigningKey, SpfCheck } from 'nodemilter/auth';

/** Settings of the verifier; set by {@link configure}, or by a test. */
export const config: {
  authservId?: string;
  rejectDmarc: boolean;
  quarantineDmarc: boolean;
  tempfailDns: boolean;
  rejectSpfFail: boolean;
  internal?: IpList;
  resolver?: DnsResolve;
  seal?: SigningKey;
  /** Smallest RSA key accepted for DKIM and ARC, in bits (mailauth's default 1024). */
  minKeyBits?: number;
  /** Random numbers for DMARC's pct (tests fix it). */
  random: () => number;
} = { rejectDmarc: false, quarantineDmarc: false, tempfailDns: false, rejectSpfFail: false, random: Math.random };

/** DNS metrics of the resolver {@link configure} made. */
export const dnsMetrics = new DnsMetrics();

interface DmarcMessage {
  spf: SpfCheck[];
  sender: string;
  user?: string;
  /** Authentication-Results headers (1-based among them) that claim our authserv-id. */
  forged: number[];
  arSeen: number;
}

export class DmarcMilter extends CollectingMilter<DmarcMessage> {
  static override flags = ADDHDRS | CHGHDRS | QUARANTINE;
  // Raw header values: a signature with simple canonicalization covers the
  // exact bytes after the colon, which the MTA otherwise trims.
  static override headerLeadingSpace = true;

  ip?: string;
  helo = '';

  protected override newMessage(): DmarcMessage {
    return { spf: [], sender: '', forged: [], arSeen: 0 };
  }

  /** The authserv-id: the configured one, else the MTA's host name (`j`), else ours. */
  authservId(): string {
    return config.authservId ?? this.getsymval('j') ?? os.hostname();
  }

  /** Whether this client's mail is ours (authenticated or internal): not judged. */
  trusted(): boolean {
    return !!this.message.user || (!!this.ip && !!config.internal?.contains(this.ip));
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
    m.sender = from.replace(/^<|>$/g, '');
    m.user = this.getsymval('{auth_authen}') || undefined;
    if (!this.ip || this.trusted()) return CONTINUE;
    m.spf = await checkSpf({ ip: this.ip, helo: this.helo, sender: m.sender, authservId: this.authservId(), resolver: config.resolver });
    const mf = m.spf.find((s) => s.identity === 'mailfrom');
    if (mf?.result === 'fail' && config.rejectSpfFail) {
      this.log('refused', from, 'from', this.ip, mf.comment ?? '');
      this.setreply('550', '5.7.23', `SPF: ${this.ip} may not send mail for ${m.sender}`.replace(/%/g, '%%'));
      return REJECT;
    }
    return CONTINUE;
  }

  override header(name: string, value: string) {
    if (name.toLowerCase() === 'authentication-results') {
      const n = ++this.message.arSeen;
      if (ownAuthResults(value, this.authservId())) this.message.forged.push(n);
    }
    return super.header(name, value);
  }

  protected override async checkmessage(collected: MessageCollector) {
    const m = this.message;
    const v = await verifyMessage(collected.stream(), {
      authservId: this.authservId(),
      spf: m.spf,
      sender: m.sender,
      authUser: m.user,
      resolver: config.resolver,
      seal: config.seal,
      minBitLength: config.minKeyBits,
      // Our own clients' mail is not judged (OpenDMARC's IgnoreAuthenticatedClients, IgnoreHosts).
      disableDmarc: this.trusted(),
    });
    // Delete from the last, so the indexes of the others stay right.
    for (const n of [...m.forged].reverse()) this.chgheader('Authentication-Results', n, null);
    insertOnTop(this, `Authentication-Results: ${v.authResults.replace(/\n/g, '\r\n')}\r\n`);
    if (v.arcSet) insertOnTop(this, v.arcSet);
    if (this.trusted() || !v.dmarc) return CONTINUE;
    if (v.dmarc.result === 'temperror' && config.tempfailDns) {
      this.setreply('451', '4.4.3', `DMARC check of ${v.dmarc.fromDomain} failed temporarily (DNS), try again later`);
      return TEMPFAIL;
    }
    const d = dmarcDisposition(v.dmarc, config.random);
    if (d.action === 'reject' && config.rejectDmarc) {
      this.log('rejected:', d.reason);
      this.setreply('550', '5.7.1', `Message rejected: ${d.reason}`.replace(/%/g, '%%'));
      return REJECT;
    }
    if (d.action === 'quarantine' && config.quarantineDmarc) {
      this.log('quarantined:', d.reason);
      this.quarantine(d.reason);
    }
    return CONTINUE;
  }
}

/** Read the settings (environment over the `DMARC_CONFIG` file) into {@link config}. */
export function configure(env: Record<string, string | undefined> = process.env): void {
  const s = readSettings(env, 'DMARC_CONFIG');
  config.authservId = s.DMARC_AUTHSERV_ID || config.authservId;
  config.rejectDmarc = flagSetting('DMARC_REJECT', s.DMARC_REJECT);
  config.quarantineDmarc = flagSetting('DMARC_QUARANTINE', s.DMARC_QUARANTINE);
  config.tempfailDns = flagSetting('DMARC_TEMPFAIL', s.DMARC_TEMPFAIL);
  config.rejectSpfFail = flagSetting('SPF_REJECT_FAIL', s.SPF_REJECT_FAIL);
  config.minKeyBits = s.DMARC_MIN_KEY_BITS ? intSetting('DMARC_MIN_KEY_BITS', s.DMARC_MIN_KEY_BITS, 1024, 512, 16384) : undefined;
  if (s.DMARC_INTERNAL_HOSTS) config.internal = new IpList(listSetting(s.DMARC_INTERNAL_HOSTS));
  config.resolver = createResolver({
    resolve: config.resolver, // a test's fixture zone stays the upstream
    timeout: intSetting('DNS_TIMEOUT', s.DNS_TIMEOUT, 5000, 1),
    cacheSize: intSetting('DNS_CACHE_SIZE', s.DNS_CACHE_SIZE, 10_000, 0),
    servers: s.DNS_SERVERS ? listSetting(s.DNS_SERVERS) : undefined,
    metrics: dnsMetrics,
  });
  if (s.ARC_SEAL_DOMAIN || s.ARC_SEAL_SELECTOR || s.ARC_SEAL_KEYFILE) {
    if (!s.ARC_SEAL_DOMAIN || !s.ARC_SEAL_SELECTOR || !s.ARC_SEAL_KEYFILE) throw new InvalidArgumentError('ARC sealing needs ARC_SEAL_DOMAIN, ARC_SEAL_SELECTOR and ARC_SEAL_KEYFILE');
    let key: string;
    try {
      key = readFileSync(s.ARC_SEAL_KEYFILE, 'latin1');
    } catch (err) {
      throw new InvalidArgumentError(`ARC_SEAL_KEYFILE: ${s.ARC_SEAL_KEYFILE} cannot be read: ${(err as Error).message}`);
    }
    config.seal = signingKey(s.ARC_SEAL_DOMAIN, s.ARC_SEAL_SELECTOR, key, 'ARC_SEAL_KEYFILE');
    if (config.seal.algorithm !== 'rsa-sha256') throw new InvalidArgumentError('ARC_SEAL_KEYFILE must be an RSA key (mailauth seals with rsa-sha256)');
  }
  if (s.DNS_METRICS_PORT) {
    const server = http.createServer((req, res) => {
      if (req.url !== '/metrics') return void res.writeHead(404).end();
      res.writeHead(200, { 'Content-Type': 'text/plain; version=0.0.4; charset=utf-8' }).end(dnsMetrics.prometheus());
    });
    server.listen(intSetting('DNS_METRICS_PORT', s.DNS_METRICS_PORT, 0, 0, 65535), '127.0.0.1', () => {
      console.log(`dmarc: DNS metrics on http://127.0.0.1:${(server.address() as AddressInfo).port}/metrics`);
    });
    server.unref();
  }
}

/** Configure from the environment and serve on `socket` until SIGTERM/SIGINT. */
export function main(socket = 'inet:8893@127.0.0.1'): Promise<void> {
  configure();
  return runmilter('dmarc', socket, { factory: DmarcMilter });
}

if (require.main === module || process.argv[1] === __filename) {
  main(process.argv[2]).catch((err: Error) => {
    console.error(`dmarc: ${err.message}`);
    process.exit(1);
  });
}
