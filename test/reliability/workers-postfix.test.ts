// The long runs of test/runtime/postfix.test.ts (npm run reliability): 10
// reloads during 20 s of load through Postfix (from SMTP clients in Node, and
// from Postfix's C load generator smtp-source), and kill -9 of one of two
// workers during 20 s of load, on both engines.
import { describe, it } from 'vitest';

import { ENGINES } from '../helpers';
import { crashUnderLoad, postfixSuite, reloadUnderLoad, reloadUnderSmtpSource } from '../runtime/postfix-scenarios';

const { unavailable, skip } = postfixSuite();

describe.skipIf(skip).each(ENGINES)('workers behind Postfix, %s engine', (engine) => {
  it('10 reloads during 20 s of load: 0 messages answered by anything but the milter, 0 milter connections refused, 0 lost, 0 unstamped', async () => {
    if (unavailable) throw new Error(unavailable);
    await reloadUnderLoad(engine, 20, 10);
  }, 300_000);

  it('10 reloads during 20 s of smtp-source (C, 8 sessions) through Postfix: every batch accepted, every message delivered once, stamped, 0 milter warnings', async () => {
    if (unavailable) throw new Error(unavailable);
    await reloadUnderSmtpSource(engine, 20, 10);
  }, 300_000);

  it('kill -9 of one of 2 workers during 20 s of load: 0 lost, 0 delivered unstamped', async () => {
    if (unavailable) throw new Error(unavailable);
    await crashUnderLoad(engine, 20);
  }, 300_000);
});
