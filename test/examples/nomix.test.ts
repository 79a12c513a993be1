// examples/nomix.ts: recipients inside and outside our domains do not mix.
import { afterAll, afterEach, beforeAll, describe, expect, it } from 'vitest';

import { ENGINES, freeInetSpec, startProcess, stopAll } from '../helpers';
import { ROOT, api, dist, memoryLogger, startExample, testing } from './common';

const { NomixMilter, config, parseDomains, isInternal } = dist('examples/nomix');
const { TestCtx, MilterClient } = testing;
const { CONTINUE, REJECT, InvalidArgumentError } = api;

const MESSAGE = 'Subject: x\r\n\r\nbody\r\n';

afterEach(async () => {
  await stopAll();
});

describe('nomix with TestCtx', () => {
  const original = NomixMilter.logger;
  beforeAll(() => {
    config.domains = ['example.org', 'example.net'];
    NomixMilter.logger = memoryLogger();
  });
  afterAll(() => {
    NomixMilter.logger = original;
  });

  it('keeps recipients on the side of the first one and refuses the others with 550 5.7.1', async () => {
    const t = new TestCtx(NomixMilter);
    const st = await t.feedMessage(MESSAGE, { rcpts: ['<a@example.org>', '<b@mail.EXAMPLE.net>', '<c@gmail.example>', '<postmaster>'] });
    expect(st).toBe(CONTINUE);
    expect(t.resultsOf('envrcpt').map((r: { status: number }) => r.status)).toEqual([CONTINUE, CONTINUE, REJECT, CONTINUE]);
    expect(t.recipients).toEqual(['<a@example.org>', '<b@mail.EXAMPLE.net>', '<postmaster>']);
    expect(t.reply).toEqual({ rcode: '550', xcode: '5.7.1', lines: ['<c@gmail.example> is external but <a@example.org> is internal: send them separate messages'] });
    await t.close();
  });

  it('an external first recipient makes internal ones refused; the next message starts afresh', async () => {
    const t = new TestCtx(NomixMilter);
    await t.feedMessage(MESSAGE, { rcpts: ['<c@other.example>', '<d@other2.example>', '<a@example.org>'] });
    expect(t.resultsOf('envrcpt').map((r: { status: number }) => r.status)).toEqual([CONTINUE, CONTINUE, REJECT]);
    await t.feedMessage(MESSAGE, { rcpts: ['<a@example.org>'] });
    expect(t.resultsOf('envrcpt').at(-1)!.status).toBe(CONTINUE);
    await t.close();
  });

  it('doubles % in the reply text (setreply would refuse a lone %)', async () => {
    const t = new TestCtx(NomixMilter);
    await t.feedMessage(MESSAGE, { rcpts: ['<a@example.org>', '<user%host@other.example>'] });
    expect(t.reply!.lines[0]).toBe('<user%%host@other.example> is external but <a@example.org> is internal: send them separate messages');
    await t.close();
  });

  it('parses the domain list, refusing a bad entry by name', () => {
    expect(parseDomains(' Example.ORG., example.net ,')).toEqual(['example.org', 'example.net']);
    expect(isInternal('sub.example.org', ['example.org'])).toBe(true);
    expect(isInternal('badexample.org', ['example.org'])).toBe(false);
    expect(() => parseDomains('example.org, exa mple.net')).toThrow(InvalidArgumentError);
    expect(() => parseDomains('example.org,exa mple.net')).toThrow(/"exa mple.net" is not a domain name/);
  });
});

describe.each(ENGINES)('nomix over the wire (%s engine, MilterClient)', (engine) => {
  it('refuses the mixed recipient at RCPT with 550 5.7.1 and delivers to the rest', async () => {
    const spec = await freeInetSpec();
    await startExample('nomix', spec, { env: { NOMIX_DOMAINS: 'example.org' }, engine });
    const c = await MilterClient.connect(spec);
    const r = await c.sendMessage({ from: '<x@example.org>', rcpt: ['<a@example.org>', '<b@elsewhere.example>'], message: MESSAGE, quit: true });
    expect(r.envrcpt.map((s: { status: string }) => s.status)).toEqual(['continue', 'reject']);
    expect(r.envrcpt[1].reply).toMatchObject({ rcode: '550', xcode: '5.7.1' });
    expect(r.envrcpt[1].reply!.text).toBe('<b@elsewhere.example> is external but <a@example.org> is internal: send them separate messages');
    expect(r.decision).toBe('continue');
  });
});

describe('nomix as a program', () => {
  it('exits with a clear message when NOMIX_DOMAINS is missing', async () => {
    const p = await startProcess(process.execPath, { args: [`${ROOT}/dist/examples/nomix.js`, 'inet:1@127.0.0.1'], env: { NOMIX_DOMAINS: undefined } });
    const { code } = await p.exited;
    expect(code).toBe(1);
    expect(p.stderr).toContain('nomix: set NOMIX_DOMAINS to the internal domains');
  });
});
