/**
 * Parsing of milter socket specifications, in the syntax libmilter's
 * `smfi_setconn` accepts (and MTAs use to reach a milter):
 *
 * | spec | meaning |
 * | --- | --- |
 * | `unix:/path/to/sock`, `local:/path`, `/path` | unix-domain socket |
 * | `inet:PORT`, `inet:PORT@HOST` | IPv4 TCP (host: address or name) |
 * | `inet6:PORT`, `inet6:PORT@HOST` | IPv6 TCP |
 * | `fd:N` | an already-open listening descriptor (socket activation) |
 *
 * The protocol name is case-insensitive; a spec without a colon, or with
 * an empty protocol (`:/path`), is a unix socket path, as in libmilter.
 *
 * @module
 */
import * as fs from 'node:fs';

import { InvalidSocketError } from './errors';

/** A unix-domain socket. */
export interface UnixSocketSpec {
  kind: 'unix';
  /** The socket's path, as given (may be relative). */
  path: string;
}

/** A TCP socket over IPv4 (`inet`) or IPv6 (`inet6`). */
export interface InetSocketSpec {
  kind: 'inet' | 'inet6';
  /** The TCP port, 0–65535. */
  port: number;
  /**
   * The host part after `@`, without any surrounding brackets, or
   * `undefined` when the spec has none (a listener then binds every
   * address; a client connects to the loopback address).
   */
  host: string | undefined;
}

/** An inherited, already-open descriptor (`fd:N`). */
export interface FdSocketSpec {
  kind: 'fd';
  /** The descriptor number. */
  fd: number;
}

/** A parsed socket specification. */
export type SocketSpec = UnixSocketSpec | InetSocketSpec | FdSocketSpec;

/** The longest unix socket path Linux accepts (sun_path is 108 bytes with the NUL). */
const MAX_UNIX_PATH = 107;

function bad(spec: string, what: string): never {
  throw new InvalidSocketError(
    `invalid socket spec ${JSON.stringify(spec)}: ${what} ` +
      '(expected unix:/path, local:/path, inet:PORT[@HOST], inet6:PORT[@HOST] or fd:N)',
  );
}

/**
 * Parse a socket specification.
 *
 * @example
 * ```ts
 * parseSocketSpec('inet:8894@127.0.0.1'); // { kind: 'inet', port: 8894, host: '127.0.0.1' }
 * parseSocketSpec('unix:/run/milter.sock'); // { kind: 'unix', path: '/run/milter.sock' }
 * ```
 * @throws InvalidSocketError naming the bad spec and what was expected.
 */
export function parseSocketSpec(spec: string): SocketSpec {
  if (typeof spec !== 'string') bad(String(spec), 'not a string');
  if (spec.length === 0) bad(spec, 'empty');
  if (spec.includes('\0')) bad(spec, 'contains a NUL byte');
  const colon = spec.indexOf(':');
  const proto = colon < 0 ? '' : spec.slice(0, colon).toLowerCase();
  const rest = colon < 0 ? spec : spec.slice(colon + 1);
  switch (proto) {
    case '':
    case 'unix':
    case 'local': {
      if (rest.length === 0) bad(spec, 'missing socket path');
      if (Buffer.byteLength(rest) > MAX_UNIX_PATH) bad(spec, `socket path longer than ${MAX_UNIX_PATH} bytes`);
      return { kind: 'unix', path: rest };
    }
    case 'inet':
    case 'inet6': {
      const at = rest.indexOf('@');
      const portText = at < 0 ? rest : rest.slice(0, at);
      let host: string | undefined = at < 0 ? undefined : rest.slice(at + 1);
      if (!/^[0-9]{1,5}$/.test(portText)) bad(spec, `port ${JSON.stringify(portText)} is not a number`);
      const port = Number(portText);
      if (port > 65535) bad(spec, `port ${port} is out of range 0-65535`);
      if (host !== undefined) {
        if (host.startsWith('[') && host.endsWith(']')) host = host.slice(1, -1);
        if (host.length === 0) bad(spec, 'empty host after @');
        if (/[\s@/]/.test(host)) bad(spec, `bad host ${JSON.stringify(host)}`);
        if (proto === 'inet' && host.includes(':')) bad(spec, `IPv6 address ${JSON.stringify(host)} in an inet spec (use inet6:)`);
      }
      return { kind: proto, port, host };
    }
    case 'fd': {
      if (!/^[0-9]{1,9}$/.test(rest)) bad(spec, `descriptor ${JSON.stringify(rest)} is not a non-negative integer`);
      return { kind: 'fd', fd: Number(rest) };
    }
    default:
      bad(spec, `unknown socket type ${JSON.stringify(spec.slice(0, colon))}`);
  }
}

/** Format a parsed spec back into libmilter's syntax. */
export function formatSocketSpec(s: SocketSpec): string {
  switch (s.kind) {
    case 'unix':
      return `unix:${s.path}`;
    case 'fd':
      return `fd:${s.fd}`;
    default:
      return s.host === undefined ? `${s.kind}:${s.port}` : `${s.kind}:${s.port}@${s.host}`;
  }
}

/**
 * Refuse to listen on a unix path that exists and is not a socket.
 * libmilter (and Node's listen) replace a stale socket but fail on anything
 * else at the path with a bare "could not open the milter socket" or
 * EADDRINUSE: this says what is there, and leaves it alone. An absent path
 * is fine.
 *
 * @throws InvalidSocketError naming the path and what it is.
 */
export function refuseNonSocket(path: string, socket: string): void {
  let st: fs.Stats;
  try {
    st = fs.lstatSync(path);
  } catch {
    return; // nothing there (or not reachable: listening reports that)
  }
  if (st.isSocket()) return;
  const what = st.isFile() ? 'a regular file' : st.isDirectory() ? 'a directory' : st.isSymbolicLink() ? 'a symbolic link' : 'not a socket';
  throw new InvalidSocketError(
    `cannot listen on ${socket}: ${path} exists and is ${what}; expected a unix socket or nothing there (it was left untouched)`,
  );
}

/**
 * Remove the unix socket at `path` if it is a socket; anything else at the
 * path is left alone, and an absent path is fine. Returns the error that
 * prevented the removal, if any (for the caller to log).
 */
export function removeUnixSocket(path: string): Error | undefined {
  try {
    if (fs.lstatSync(path).isSocket()) fs.unlinkSync(path);
    return undefined;
  } catch (err) {
    return (err as NodeJS.ErrnoException).code === 'ENOENT' ? undefined : (err as Error);
  }
}
