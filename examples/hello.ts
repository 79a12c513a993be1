/**
 * The smallest useful milter: stamp every message with a header.
 *
 *   npm run example -- hello inet:8894@127.0.0.1
 *
 * Postfix: `smtpd_milters = inet:127.0.0.1:8894` in main.cf.
 */
import { ADDHDRS, Base, CONTINUE, runmilter } from 'nodemilter';

/** Adds `X-Hello` naming the queue id (macro `i`) to every message. */
export class Hello extends Base {
  static override flags = ADDHDRS;

  override eom() {
    this.addheader('X-Hello', `checked by nodemilter for ${this.getsymval('i') ?? 'a message'}`);
    return CONTINUE;
  }
}

/** Serve {@link Hello} on `socket` until SIGTERM/SIGINT. */
export function main(socket = 'inet:8894@127.0.0.1'): Promise<void> {
  return runmilter('hello', socket, { factory: Hello });
}

if (require.main === module) {
  main(process.argv[2]).catch((err: Error) => {
    console.error(`hello: ${err.message}`);
    process.exit(1);
  });
}
