// Workers behind a real Postfix, short runs for npm test (the long ones, 20 s
// of load with 10 reloads, are in test/reliability/workers-postfix.test.ts):
// kill -9 of one of two workers under load, and reloads under load, on both
// engines (the run with Postfix's C load generator, smtp-source, is in the
// long file only). Scenarios in ./postfix-scenarios.ts.
import { describe, it } from 'vitest';

import { ENGINES } from '../helpers';
import { crashUnderLoad, postfixSuite, reloadUnderLoad } from './postfix-scenarios';

const { unavailable, skip } = postfixSuite();

describe.skipIf(skip).each(ENGINES)('workers behind Postfix, %s engine (short)', (engine) => {
  it('kill -9 of one of 2 workers under load: 0 lost, 0 delivered unstamped, the 4xx ones retried until delivered', async () => {
    if (unavailable) throw new Error(unavailable);
    await crashUnderLoad(engine, 5);
  }, 120_000);

  it('3 reloads in 6 s of load: every message answered by the milter and delivered stamped, no milter connection refused', async () => {
    if (unavailable) throw new Error(unavailable);
    await reloadUnderLoad(engine, 6, 3);
  }, 120_000);
});
