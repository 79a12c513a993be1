/**
 * The smallest useful milter: stamp every message with a header.
 *
 *   npm run example -- hello inet:8894@127.0.0.1
 *
 * Postfix: `smtpd_milters = inet:127.0.0.1:8894` in main.cf.
 */
import { ADDHDRS, Base, CONTINUE, runmilter } from '../src';

class Hello extends Base {
  static override flags = ADDHDRS;

  override eom() {
    this.addheader('X-Hello', `checked by nodemilter for ${this.getsymval('i') ?? 'a message'}`);
    return CONTINUE;
  }
}

const socket = process.argv[2] ?? 'inet:8894@127.0.0.1';
runmilter('hello', socket, { factory: Hello }).catch((err: Error) => {
  console.error(`hello: ${err.message}`);
  process.exit(1);
});
