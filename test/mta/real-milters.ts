/**
 * Private instances of real milters from Debian for the MTA-side tests:
 * OpenDKIM (sign or verify), OpenDMARC, spamass-milter with its own spamd.
 * Each gets its own config in a temporary directory, listens on a free
 * loopback port, runs in the foreground as a child of the test and is
 * stopped by PID; nothing under /etc or a system service is used.
 */
import { execFileSync } from 'child_process';
import * as fs from 'fs';
import * as path from 'path';
import { authenticate } from 'mailauth';
import { freeInetSpec, freePort, startProcess, tmpDir, type RunningProcess } from '../helpers';

export const OPENDKIM_BIN = '/usr/sbin/opendkim';
export const OPENDKIM_GENKEY_BIN = '/usr/sbin/opendkim-genkey';
export const OPENDMARC_BIN = '/usr/sbin/opendmarc';
export const SPAMASS_MILTER_BIN = '/usr/sbin/spamass-milter';
export const SPAMD_BIN = '/usr/sbin/spamd';
export const RSPAMD_BIN = '/usr/bin/rspamd';
/** Where Debian's rspamd package puts its shipped configuration (copied, never used in place). */
export const RSPAMD_SHIPPED_CONF = '/etc/rspamd';

/** Why a real milter cannot run here, or undefined. */
export function realMiltersUnavailable(): string | undefined {
  for (const bin of [OPENDKIM_BIN, OPENDKIM_GENKEY_BIN, OPENDMARC_BIN, SPAMASS_MILTER_BIN, SPAMD_BIN]) {
    if (!fs.existsSync(bin)) return `${bin} is missing: apt-get install opendkim opendkim-tools opendmarc spamass-milter spamassassin spamd`;
  }
  if (process.getuid?.() !== 0) return 'the real-milter tests run the milters as root';
  return undefined;
}

/** Why rspamd cannot run here, or undefined. */
export function rspamdUnavailable(): string | undefined {
  if (!fs.existsSync(RSPAMD_BIN) || !fs.existsSync(path.join(RSPAMD_SHIPPED_CONF, 'rspamd.conf'))) return `${RSPAMD_BIN} is missing: apt-get install rspamd`;
  return realMiltersUnavailable();
}

/** A DKIM key pair made with opendkim-genkey. */
export interface DkimKey {
  domain: string;
  selector: string;
  /** The private key file. */
  privateKeyFile: string;
  /** The TXT record's text (`v=DKIM1; h=sha256; k=rsa; p=...`). */
  txt: string;
  /** A file for OpenDKIM's TestPublicKeys: `selector._domainkey.domain TXT-text`. */
  testKeysFile: string;
  /** Remove the key's directory. */
  remove(): void;
}

/** Make a key for `selector._domainkey.domain` in a new temporary directory. */
export function makeDkimKey(domain = 'example.com', selector = 'sel'): DkimKey {
  const dir = tmpDir('nm-dkimkey-');
  execFileSync(OPENDKIM_GENKEY_BIN, ['-b', '1024', '-D', dir, '-d', domain, '-s', selector]);
  const zone = fs.readFileSync(path.join(dir, `${selector}.txt`), 'utf8');
  const txt = [...zone.matchAll(/"([^"]*)"/g)].map((m) => m[1]).join('');
  const testKeysFile = path.join(dir, 'testkeys');
  fs.writeFileSync(testKeysFile, `${selector}._domainkey.${domain} ${txt}\n`);
  return {
    domain,
    selector,
    privateKeyFile: path.join(dir, `${selector}.private`),
    txt,
    testKeysFile,
    remove: () => fs.rmSync(dir, { recursive: true, force: true }),
  };
}

/** The DKIM results mailauth finds for a message (`['pass']`...), with `key` served by a local resolver (no DNS). */
export async function dkimResults(message: Buffer, key: DkimKey): Promise<string[]> {
  const res = await authenticate(message, {
    trustReceived: false,
    ip: '127.0.0.1',
    helo: 'localhost',
    mta: 'mx.example.org',
    sender: 'alice@example.com',
    resolver: async (name: string, type: string) => {
      if (type === 'TXT' && name === `${key.selector}._domainkey.${key.domain}`) return [[key.txt]];
      const e = new Error(`no ${type} for ${name}`) as NodeJS.ErrnoException;
      e.code = 'ENOTFOUND';
      throw e;
    },
  });
  return res.dkim.results.map((r: { status: { result: string } }) => r.status.result);
}

/** A running real milter. */
export interface RealMilter {
  /** Its socket spec, `inet:PORT@127.0.0.1`. */
  spec: string;
  proc: RunningProcess;
  /** Other processes it needs (spamd). */
  helpers: RunningProcess[];
  stop(): Promise<void>;
}

/** A RealMilter whose stop() ends its processes by PID and removes its directory. */
async function started(dir: string, spec: string, proc: RunningProcess, helpers: RunningProcess[] = []): Promise<RealMilter> {
  return {
    spec,
    proc,
    helpers,
    async stop() {
      await proc.stop();
      for (const h of helpers) await h.stop();
      fs.rmSync(dir, { recursive: true, force: true });
    },
  };
}

/**
 * OpenDKIM in the foreground: `sign` signs mail from `key.domain` sent by
 * 127.0.0.1 (its default InternalHosts), `verify` verifies against the key in
 * TestPublicKeys (no DNS), `both` does both, as Mode sv.
 */
export async function startOpenDKIM(key: DkimKey, mode: 'sign' | 'verify' | 'both' = 'sign'): Promise<RealMilter> {
  const dir = tmpDir('nm-opendkim-');
  const spec = await freeInetSpec();
  const conf = path.join(dir, 'opendkim.conf');
  const lines = [
    `Mode ${mode === 'sign' ? 's' : mode === 'verify' ? 'v' : 'sv'}`,
    `Domain ${key.domain}`,
    `Selector ${key.selector}`,
    `KeyFile ${key.privateKeyFile}`,
    `Socket ${spec}`,
    `PidFile ${path.join(dir, 'pid')}`,
    'Background no',
    'Syslog no',
    'Canonicalization relaxed/relaxed',
    'AuthservID mta.test.example',
    'RequireSafeKeys no',
    `TestPublicKeys ${key.testKeysFile}`,
    // Fixed signature headers and no timestamp, so runs compare byte for byte.
    'SignatureAlgorithm rsa-sha256',
    'OversignHeaders From',
  ];
  if (mode === 'verify') {
    // 127.0.0.1 is an internal host by default, whose mail OpenDKIM signs but does not verify.
    const internal = path.join(dir, 'internal');
    fs.writeFileSync(internal, '192.0.2.255\n');
    lines.push(`InternalHosts ${internal}`);
  }
  fs.writeFileSync(conf, lines.join('\n') + '\n');
  const proc = await startProcess(OPENDKIM_BIN, { args: ['-f', '-x', conf, '-l'], socket: spec, stopSignal: 'SIGKILL' });
  return started(dir, spec, proc);
}

/** OpenDMARC in the foreground, every client checked (IgnoreHosts is an empty file), trusting OpenDKIM's results (authserv-id mta.test.example). */
export async function startOpenDMARC(): Promise<RealMilter> {
  const dir = tmpDir('nm-opendmarc-');
  const spec = await freeInetSpec();
  const ignore = path.join(dir, 'ignore');
  fs.writeFileSync(ignore, '');
  const conf = path.join(dir, 'opendmarc.conf');
  fs.writeFileSync(
    conf,
    [
      `Socket ${spec}`,
      `PidFile ${path.join(dir, 'pid')}`,
      'Background false',
      'Syslog false',
      'AuthservID mta.test.example',
      'TrustedAuthservIDs mta.test.example',
      `IgnoreHosts ${ignore}`,
      'RejectFailures false',
      'SPFSelfValidate false',
      'SPFIgnoreResults true',
      'RequiredHeaders false',
    ].join('\n') + '\n',
  );
  const proc = await startProcess(OPENDMARC_BIN, { args: ['-f', '-c', conf], socket: spec, stopSignal: 'SIGKILL' });
  return started(dir, spec, proc);
}

/**
 * spamd on a free loopback port with network tests off and no rule updates
 * (the rules Debian ships), and spamass-milter in front of it.
 */
export async function startSpamassMilter(): Promise<RealMilter> {
  const dir = tmpDir('nm-spamass-');
  const spamdPort = await freePort();
  const spec = await freeInetSpec();
  // Our own site config (spamd's --siteconfigpath replaces /etc/spamassassin): the
  // plugins the shipped rules need, and nothing that goes to the network.
  const plugins = ['Check', 'HTTPSMismatch', 'URIDetail', 'BodyEval', 'HTMLEval', 'HeaderEval', 'MIMEEval', 'RelayEval', 'URIEval', 'WLBLEval', 'VBounce', 'ImageInfo', 'FreeMail', 'FromNameSpoof', 'Phishing', 'HashBL'];
  fs.writeFileSync(path.join(dir, 'plugins.pre'), plugins.map((p) => `loadplugin Mail::SpamAssassin::Plugin::${p}\n`).join(''));
  fs.writeFileSync(
    path.join(dir, 'local.cf'),
    ['use_bayes 0', 'skip_rbl_checks 1', 'dns_available no', 'score ALL_TRUSTED 0', 'report_safe 0', ''].join('\n'),
  );
  // spamd's children run as nobody: explicit modes, whatever the umask of the test run
  fs.chmodSync(dir, 0o755);
  for (const f of ['plugins.pre', 'local.cf']) fs.chmodSync(path.join(dir, f), 0o644);
  const spamd = await startProcess(SPAMD_BIN, {
    args: [
      '--listen', `127.0.0.1:${spamdPort}`, '--allowed-ips', '127.0.0.1', '-L', '--siteconfigpath', dir,
      '--pidfile', path.join(dir, 'spamd.pid'), '-u', 'nobody', '--nouser-config', '-m', '2', '--min-children', '1',
      '-s', 'stderr',
    ],
    socket: `inet:${spamdPort}@127.0.0.1`,
    readyTimeout: 60_000,
    stopSignal: 'SIGTERM',
  });
  const port = /^inet:(\d+)@/.exec(spec)![1];
  const proc = await startProcess(SPAMASS_MILTER_BIN, {
    args: ['-p', `inet:${port}@127.0.0.1`, '--', '-d', '127.0.0.1', '-p', String(spamdPort)],
    socket: spec,
    stopSignal: 'SIGKILL',
  }).catch(async (e) => {
    await spamd.stop();
    throw e;
  });
  return started(dir, spec, proc, [spamd]);
}

/**
 * rspamd 3.4 in the foreground with a private copy of the configuration
 * Debian ships: its proxy worker in milter mode (self-scanning) on a free
 * port, the normal and controller workers on free ports, DNS pointed at a
 * closed port (no network) and the modules that ask DNS turned off, so the
 * result does not depend on lookup timing, and milter_headers adding its
 * result headers. Loading the rules takes tens of seconds.
 */
export async function startRspamd(): Promise<RealMilter> {
  const dir = tmpDir('nm-rspamd-');
  const conf = path.join(dir, 'conf');
  fs.cpSync(RSPAMD_SHIPPED_CONF, conf, { recursive: true, dereference: true });
  for (const d of ['run', 'db', 'log']) fs.mkdirSync(path.join(dir, d));
  const spec = await freeInetSpec();
  const port = /^inet:(\d+)@/.exec(spec)![1];
  const [normal, controller] = [await freePort(), await freePort()];
  const local = path.join(conf, 'local.d');
  fs.mkdirSync(local, { recursive: true });
  const files: Record<string, string> = {
    'worker-proxy.inc': `bind_socket = "127.0.0.1:${port}";\nmilter = yes;\ntimeout = 120s;\ncount = 1;\nupstream "local" {\n  default = yes;\n  self_scan = yes;\n}\n`,
    'worker-normal.inc': `bind_socket = "127.0.0.1:${normal}";\ncount = 1;\n`,
    'worker-controller.inc': `bind_socket = "127.0.0.1:${controller}";\ncount = 1;\n`,
    'worker-fuzzy.inc': 'count = 0;\n',
    'logging.inc': 'type = "console";\nlevel = "error";\n',
    'options.inc': 'dns {\n  nameserver = ["127.0.0.1:1"];\n  timeout = 0.2s;\n  retransmits = 1;\n}\n',
    'milter_headers.conf': 'use = ["x-spamd-result", "x-rspamd-queue-id", "x-spam-level", "x-spam-status"];\nskip_local = false;\nskip_authenticated = false;\n',
  };
  // The modules that ask DNS (whose timeouts would make the results vary) are off.
  for (const m of ['rbl', 'surbl', 'spf', 'dkim', 'dmarc', 'arc', 'asn', 'emails', 'fuzzy_check', 'mx_check', 'dkim_signing', 'arc_signing']) {
    files[`${m}.conf`] = 'enabled = false;\n';
  }
  for (const [f, text] of Object.entries(files)) fs.writeFileSync(path.join(local, f), text);
  const vars = ['CONFDIR', conf, 'LOCAL_CONFDIR', conf, 'RUNDIR', path.join(dir, 'run'), 'DBDIR', path.join(dir, 'db'), 'LOGDIR', path.join(dir, 'log')];
  const args = ['-f', '-i', '-u', 'root', '-g', 'root', '-c', path.join(conf, 'rspamd.conf')];
  for (let i = 0; i < vars.length; i += 2) args.push('--var', `${vars[i]}=${vars[i + 1]}`);
  const proc = await startProcess(RSPAMD_BIN, { args, socket: spec, readyTimeout: 180_000, stopSignal: 'SIGTERM', killGrace: 5000 });
  return started(dir, spec, proc);
}
