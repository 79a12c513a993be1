/**
 * The optional peer dependency mailauth, loaded on first use, so that
 * importing `nodemilter/auth` without it fails only when a check runs, with
 * a {@link MissingDependencyError} saying what to install.
 *
 * @module
 */
import { MissingDependencyError } from '../errors';

/** The parts of mailauth this module calls (its own typings are not re-exported). */
export interface Mailauth {
  dkimSign(input: Buffer | string, options: Record<string, unknown>): Promise<{ signatures: string; errors: Array<{ selector?: string; signingDomain?: string; err?: Error }> }>;
  dkimVerify(input: Buffer | string, options: Record<string, unknown>): Promise<any>;
  spf(options: Record<string, unknown>): Promise<any>;
  dmarc(options: Record<string, unknown>): Promise<any>;
  arc(data: unknown, options: Record<string, unknown>): Promise<any>;
  createSeal(input: Buffer | string | false, data: Record<string, unknown>): Promise<{ headers: string[] }>;
  sealMessage(input: Buffer | string, seal: Record<string, unknown>): Promise<Buffer>;
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
