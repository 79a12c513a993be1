// The sample example behind a real Postfix (test/helpers/postfix.ts): a
// message with setup.exe and an HTML script is delivered defanged, with the
// X-Defanged header; a big5 Subject gets the example's own 550 reply.
//
// Without Postfix (or root) this file fails, unless NODEMILTER_SKIP_POSTFIX=1
// is set outside CI.
import * as fs from 'node:fs';
import * as path from 'node:path';
import { afterEach, describe, expect, it } from 'vitest';

import { ENGINES, checkEngine, engineEnv, freeInetSpec, startProcess, stopAll } from './helpers';
import { mayskipPostfix, postfixUnavailable, startPostfix, stopAllPostfix } from './helpers/postfix';

const ROOT = path.resolve(__dirname, '..');
const { parseMime } = require(path.join(ROOT, 'dist', 'src', 'mime', 'index.js'));
const MESSAGE = fs.readFileSync(path.join(ROOT, 'test', 'fixtures', 'examples', 'sample-attachments.eml'), 'latin1');
const skip = postfixUnavailable() !== undefined && mayskipPostfix();

afterEach(async () => {
  await stopAllPostfix();
  await stopAll();
});

describe.skipIf(skip).each(ENGINES)('sample example behind Postfix, %s engine', (engine) => {
  it('delivers the message defanged, and refuses a big5 Subject with 550 5.7.1', async () => {
    const spec = await freeInetSpec();
    const milter = await startProcess(process.execPath, {
      args: [path.join(ROOT, 'dist', 'examples', 'sample.js'), spec],
      env: engineEnv(engine),
      socket: spec,
      readyTimeout: 30_000,
      stopSignal: 'SIGKILL',
    });
    checkEngine(milter.pid, engine);
    const pf = await startPostfix({ milter: spec });

    const t = await pf.send({ from: '<alice@client.example>', rcpts: ['<bob@sink.example>'], message: MESSAGE });
    expect(t.end?.code).toBe(250);
    expect(t.queueId).toBeTruthy();
    const [delivered] = await pf.waitDelivered(t.queueId!);
    expect(delivered.message).toMatch(/^X-Defanged: setup\.exe, 1 script$/m);
    const msg = parseMime(Buffer.from(delivered.message.replace(/\r?\n/g, '\r\n'), 'latin1'));
    expect(msg.getnames()).toEqual(['numbers.pdf']);
    expect(delivered.message).not.toMatch(/<script/i);
    expect(delivered.message).toContain('An attachment was removed from this message: "setup.exe"');

    const r = await pf.send({
      from: '<x@client.example>',
      rcpts: ['<bob@sink.example>'],
      message: 'From: x@client.example\r\nSubject: =?big5?B?pOWk5Q==?=\r\n\r\nhi\r\n',
    });
    expect(r.end?.code).toBe(550);
    expect(r.end?.lines[0]).toBe('5.7.1 We do not read mail in this charset');
  });
});
