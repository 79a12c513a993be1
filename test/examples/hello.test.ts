// examples/hello.ts: one header on every message.
import { afterEach, describe, expect, it } from 'vitest';

import { ENGINES, stopAll, tmpSocketSpec } from '../helpers';
import { api, dist, startExample, testing } from './common';

const { Hello } = dist('examples/hello');
const { TestCtx, MilterClient } = testing;
const { CONTINUE, P_NOHDRS, P_NOBODY } = api;

afterEach(async () => {
  await stopAll();
});

describe('hello', () => {
  it('adds X-Hello with the queue id (TestCtx)', async () => {
    const t = new TestCtx(Hello, { macros: { [api.M_EOM]: { i: 'Q123' } } });
    const st = await t.feedMessage('Subject: hi\r\n\r\nbody\r\n', { from: '<a@example.org>', rcpts: ['<b@example.net>'] });
    expect(st).toBe(CONTINUE);
    expect(t.resultMessage().toString()).toBe('Subject: hi\r\nX-Hello: checked by nodemilter for Q123\r\n\r\nbody\r\n');
    await t.close();
  });
});

describe.each(ENGINES)('hello over the wire (%s engine)', (engine) => {
  it('eom only, one header added', async () => {
    const spec = tmpSocketSpec();
    await startExample('hello', spec, { engine });
    const c = await MilterClient.connect(spec);
    expect(c.negotiation.steps & (P_NOHDRS | P_NOBODY)).toBe(P_NOHDRS | P_NOBODY);
    const r = await c.sendMessage({ from: '<a@example.org>', rcpt: ['<b@example.net>'], headers: [['Subject', 'hi']], body: 'body\r\n', macros: { eom: { i: 'Q9' } } });
    expect(r.decision).toBe('continue');
    expect(r.actions.map((a: { type: string; name?: string; value?: string }) => [a.type, a.name, a.value])).toEqual([
      ['addheader', 'X-Hello', 'checked by nodemilter for Q9'],
    ]);
    await c.close();
  });
});
