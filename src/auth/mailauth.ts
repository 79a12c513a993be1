/**
 * The optional peer dependency mailauth, loaded on first use, so that
 * importing `nodemilter/auth` without it fails only when a check runs, with
 * a {@link MissingDependencyError} saying what to install.
 *
 * @module
 */
import type { Readable } from 'node:stream';

import { MissingDependencyError } from '../errors';

/** A message for the signer and for mailauth: the bytes (headers, blank line, body; CRLF), or a stream of them (e.g. `MessageCollector.stream()`, which does not load a spooled message into memory). */
export type MessageInput = Buffer | string | Readable;

/** The parts of mailauth this module calls (its own typings are not re-exported). */
export interface Mailauth {
  dkimVerify(input: MessageInput, options: Record<string, unknown>): Promise<any>;
  spf(options: Record<string, unknown>): Promise<any>;
  dmarc(options: Record<string, unknown>): Promise<any>;
  arc(data: unknown, options: Record<string, unknown>): Promise<any>;
  createSeal(input: MessageInput | false, data: Record<string, unknown>): Promise<{ headers: string[] }>;
  sealMessage(input: MessageInput, seal: Record<string, unknown>): Promise<Buffer>;
}

let loaded: Mailauth | undefined;

/** mailauth, or a MissingDependencyError naming `feature`. */
export function mailauth(feature: string): Mailauth {
  if (!loaded) {
    try {
      // eslint-disable-next-line @typescript-eslint/no-require-imports
      loaded = require('mailauth') as Mailauth;
    } catch (err) {
      throw new MissingDependencyError('mailauth', feature, err);
    }
  }
  return loaded;
}
