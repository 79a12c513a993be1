/**
 * The client's IP address from the connect callback's arguments.
 *
 * @module
 */
import type { Family, HostAddr } from '../types';

/**
 * The SMTP client's IP address as SPF and IP lists want it (an IPv4-mapped
 * IPv6 address as plain IPv4), or undefined for a local (unix socket or
 * unknown) client.
 *
 * @example
 * ```ts
 * class Spf extends Base {
 *   ip?: string;
 *   override connect(hostname: string, family: Family, hostaddr: HostAddr) {
 *     this.ip = clientIp(family, hostaddr); // undefined for a local client
 *     return CONTINUE;
 *   }
 * }
 * clientIp('inet6', { address: '::ffff:192.0.2.1', port: 25 }); // '192.0.2.1'
 * ```
 */
export function clientIp(family: Family, hostaddr: HostAddr): string | undefined {
  if ((family !== 'inet' && family !== 'inet6') || !hostaddr || !('address' in hostaddr)) return undefined;
  return hostaddr.address.replace(/^::ffff:(?=\d+\.\d+\.\d+\.\d+$)/i, '');
}
