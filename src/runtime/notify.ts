/**
 * Readiness for systemd's `Type=notify`: when `NOTIFY_SOCKET` is set, tell
 * systemd the milter serves (READY=1) through `systemd-notify` (Node has
 * no unix datagram sockets). The unit needs `NotifyAccess=all`, because the
 * message comes from that child process. Without `NOTIFY_SOCKET`, nothing.
 *
 * @internal
 * @module
 */
import { execFile } from 'node:child_process';

import type { Logger } from '../types';

/** Send READY=1 (and a STATUS= line) to systemd, if it asked for notifications. */
export function notifyReady(status: string, log: Logger, name: string): void {
  if (!process.env.NOTIFY_SOCKET) return;
  execFile('systemd-notify', ['--ready', `--pid=${process.pid}`, `--status=${status}`], (err) => {
    if (err) log.warn(`${name}: could not tell systemd the milter is ready (systemd-notify: ${err.message}); use Type=simple, or install systemd-notify`);
  });
}
