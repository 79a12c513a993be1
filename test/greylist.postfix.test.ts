// The greylist example behind a real Postfix (test/helpers/postfix.ts): the
// first RCPT gets Postfix's "451 4.7.1 Greylisted ...", the retry after the
// grey time is accepted and delivered with the X-Greylist header.
//
// Without Postfix (or root) this file fails, unless NODEMILTER_SKIP_POSTFIX=1
// is set outside CI.
import * as path from 'node:path';
import { afterEach, describe, expect, it } from 'vitest';

import { ENGINES, checkEngine, engineEnv, freeInetSpec, startProcess, stopAll, tmpDir } from './helpers';
import { mayskipPostfix, postfixUnavailable, startPostfix, stopAllPostfix } from './helpers/postfix';

const EXAMPLE = path.resolve(__dirname, '..', 'dist', 'examples', 'greylist.js');
const skip = postfixUnavailable() !== undefined && mayskipPostfix();

afterEach(async () => {
  await stopAllPostfix();
  await stopAll();
});

describe.skipIf(skip).each(ENGINES)('greylist example behind Postfix, %s engine', (engine) => {
  it('answers the first RCPT with 451 4.7.1 and delivers the retry with an X-Greylist header', async () => {
    const spec = await freeInetSpec();
    const milter = await startProcess(process.execPath, {
      args: [EXAMPLE, spec],
      env: { GREYLIST_STORE: path.join(tmpDir('nm-greypf-'), 'grey.db'), GREY_TIME: '1.5', GREY_EXPIRE: '3600', ...engineEnv(engine) },
      socket: spec,
      readyTimeout: 30_000,
      stopSignal: 'SIGKILL',
    });
    checkEngine(milter.pid, engine);
    const pf = await startPostfix({ milter: spec });
    const mail = {
      from: '<alice@client.example>',
      rcpts: ['<bob@sink.example>'],
      message: 'From: alice@client.example\r\nTo: bob@sink.example\r\nSubject: greylist\r\n\r\nHello.\r\n',
    };
    const first = await pf.send(mail);
    expect(first.rcpt[0].code).toBe(451);
    expect(first.rcpt[0].lines[0]).toMatch(/^4\.7\.1 Greylisted, please try again in 2 seconds$/);
    expect(first.data).toBeUndefined();

    await new Promise((r) => setTimeout(r, 1800));
    const retry = await pf.send(mail);
    expect(retry.rcpt[0].code).toBe(250);
    expect(retry.queueId).toBeTruthy();
    const [delivered] = await pf.waitDelivered(retry.queueId!);
    expect(delivered.message).toMatch(/^X-Greylist: passed on mta\.test\.example: <bob@sink\.example> count=1 delay=\d+s$/m);
  }, 90_000); // child processes on a busy machine
});
