/**
 * Heuristics that tell whether an SMTP client's host name looks like a
 * dynamic (end-user, dial-up, DSL, cable) address rather than a mail
 * server: the client's IP written into its PTR name, or a dynamic-pool
 * keyword.
 *
 * @module
 */
import * as ipaddr from 'ipaddr.js';

/** Words ISPs put in the PTR names of end-user address pools. */
export const DYNAMIC_KEYWORDS: readonly string[] = [
  'dyn', 'dynamic', 'dynip', 'dhcp', 'dial', 'dialup', 'dialin', 'ppp', 'pppoe', 'pool', 'dsl', 'adsl', 'vdsl', 'xdsl',
  'cable', 'catv', 'cust', 'customer', 'client', 'clients', 'broadband', 'residential', 'res', 'home', 'user', 'users',
  'ftth', 'fttx', 'fttc', 'hsd', 'modem', 'unknown', 'unassigned', 'no-reverse', 'noptr', 'nat',
];
const KEYWORDS = new Set(DYNAMIC_KEYWORDS);

function pad3(n: number): string {
  return String(n).padStart(3, '0');
}

/** Whether `seq` occurs as consecutive elements of `runs`. */
function containsRun(runs: readonly number[], seq: readonly number[]): boolean {
  outer: for (let i = 0; i + seq.length <= runs.length; i++) {
    for (let j = 0; j < seq.length; j++) if (runs[i + j] !== seq[j]) continue outer;
    return true;
  }
  return false;
}

function ipv4InName(host: string, o: readonly number[]): string | undefined {
  // Digit runs of the name: `host-192-0-2-7.dyn` → 192, 0, 2, 7.
  const runs = (host.match(/\d+/g) ?? []).map((d) => (d.length > 3 ? -1 : Number(d)));
  const rev = [...o].reverse();
  if (containsRun(runs, o)) return 'the IP is written in the host name';
  if (containsRun(runs, rev)) return 'the IP is written backwards in the host name';
  if (containsRun(runs, o.slice(1))) return 'the last three octets of the IP are in the host name';
  if (containsRun(runs, rev.slice(0, 3))) return 'the last three octets of the IP are written backwards in the host name';
  const digits = host.replace(/\D+/g, ' ');
  if (digits.includes(o.map(pad3).join('')) || digits.includes(rev.map(pad3).join(''))) return 'the IP is in the host name, zero-padded';
  if (digits.includes(o.slice(1).map(pad3).join(''))) return 'the last three octets of the IP are in the host name, zero-padded';
  const hex = o.map((n) => n.toString(16).padStart(2, '0')).join('');
  if (host.includes(hex)) return 'the IP is in the host name in hexadecimal';
  return undefined;
}

function ipv6InName(host: string, parts: readonly number[]): string | undefined {
  // The interface identifier (last 64 bits), written with any separators.
  const iid = parts.slice(4);
  if (iid.every((p) => p === 0)) return undefined;
  const hexRuns = host.split(/[^0-9a-f]+/);
  const groups = iid.map((p) => p.toString(16));
  const joined = hexRuns.join(' ');
  if (joined.includes(groups.join(' ')) || joined.includes(iid.map((p) => p.toString(16).padStart(4, '0')).join(''))) {
    return 'the IPv6 interface identifier is written in the host name';
  }
  return undefined;
}

/**
 * Why the client looks dynamic, or undefined if it does not. `hostname`
 * is what the MTA reports for the client (its PTR name, or `[address]`
 * when there is none); `ip` its address.
 *
 * Signs, in this order: no PTR name; the IP (IPv4: all four octets, or
 * the last three, forwards or backwards, or zero-padded, or in hex; IPv6:
 * the interface identifier) written into the name; a dynamic-pool keyword
 * ({@link DYNAMIC_KEYWORDS}) in a label left of the registered domain that
 * also carries digits.
 *
 * @example
 * ```ts
 * dynipReason('host-192-0-2-7.dyn.example.net', '192.0.2.7'); // 'the IP is written in the host name'
 * dynipReason('mail.example.com', '192.0.2.7');               // undefined
 * ```
 */
export function dynipReason(hostname: string | undefined, ip?: string): string | undefined {
  const host = (hostname ?? '').trim().toLowerCase().replace(/\.$/, '');
  if (host === '' || /^\[.*\]$/.test(host)) return 'the client has no PTR name';
  if (ip) {
    let addr: ipaddr.IPv4 | ipaddr.IPv6 | undefined;
    try {
      addr = ipaddr.process(ip.replace(/^\[|\]$/g, '').replace(/^IPv6:/i, ''));
    } catch {
      addr = undefined;
    }
    if (addr && host === addr.toString()) return 'the host name is the IP address';
    const why = addr?.kind() === 'ipv4' ? ipv4InName(host, (addr as ipaddr.IPv4).octets) : addr ? ipv6InName(host, (addr as ipaddr.IPv6).parts) : undefined;
    if (why) return why;
  }
  const labels = host.split('.');
  // Keywords count only left of the registered domain (roughly: the last two labels).
  const local = labels.slice(0, Math.max(0, labels.length - 2));
  if (!/\d/.test(local.join('.'))) return undefined;
  for (const label of local) {
    for (const word of label.split(/[^a-z]+/)) {
      if (KEYWORDS.has(word)) return `the host name has the dynamic-pool word "${word}"`;
    }
    if (label === 'no-reverse') return 'the host name has the dynamic-pool word "no-reverse"';
  }
  return undefined;
}

/** Whether the client's host name looks like a dynamic address (see {@link dynipReason}). pymilter's `is_dynip`. */
export function isDynip(hostname: string | undefined, ip?: string): boolean {
  return dynipReason(hostname, ip) !== undefined;
}
