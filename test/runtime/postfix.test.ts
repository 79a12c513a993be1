// Workers behind a real Postfix, short runs for npm test (the long ones, 20 s
// of load with 10 reloads, are in test/reliability/workers-postfix.test.ts):
// kill -9 of one of two workers under load, and reloads under load, on both
// engines. Scenarios in ./postfix-scenarios.ts.
import { afterEach, describe, it } from 'vitest';

import { ENGINES, stopAll } from '../helpers';
import { mayskipPostfix, postfixUnavailable, stopAllPostfix } from '../helpers/postfix';
import { stopRuntimes } from './lib';
import { crashUnderLoad, reloadUnderLoad } from './postfix-scenarios';

const unavailable = postfixUnavailable();
const skip = unavailable !== undefined && mayskipPostfix();

afterEach(async () => {
  await stopAllPostfix();
  await stopRuntimes();
  await stopAll();
});

describe.skipIf(skip).each(ENGINES)('workers behind Postfix, %s engine (short)', (engine) => {
  it('kill -9 of one of 2 workers under load: 0 lost, 0 delivered unstamped, the 4xx ones retried until delivered', async () => {
    if (unavailable) throw new Error(unavailable);
    await crashUnderLoad(engine, 5);
  }, 120_000);

  it('3 reloads in 6 s of load: every message answered by the milter, delivered stamped', async () => {
    if (unavailable) throw new Error(unavailable);
    await reloadUnderLoad(engine, 6, 3);
  }, 120_000);
});
