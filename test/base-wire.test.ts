// The Milter layer over the wire: Base subclasses (test/fixtures/base/milter.cjs)
// served by runmilter in a child process, on the real libmilter and on the
// TypeScript engine (each test once per engine), driven by the
// MTA-side MilterClient. What the MTA sees (negotiation reply, replies,
// modifications) and what the milter saw (its printed events) are both checked.
import * as fs from 'node:fs';
import * as path from 'node:path';
import { afterEach, describe, expect, it } from 'vitest';

import {
  ADDHDRS, CHGBODY, CHGHDRS, CONTINUE, TEMPFAIL, ACCEPT, methodTags, protocolSteps, M_CONNECT, M_EOM, M_ENVFROM, M_ENVRCPT, P_NOBODY, P_NOCONNECT, P_NODATA, P_NOEOH, P_NOHDRS, P_NOHELO,
  P_NOMAIL, P_NORCPT, P_NOUNKNOWN, P_NR_CONN, P_NR_EOH, P_NR_HDR, P_NR_HELO, P_NR_MAIL, P_NR_RCPT, P_SKIP, SETSYMLIST, SMFIF_ALL,
  SMFIP_NO_ALL, SMFIP_NR_ALL,
} from '../src/index';
import * as api from '../src/index';
import * as testing from '../src/testing/index';
import { MilterClient } from '../src/testing/client';
import { ENGINES, stopAll, tmpDir, type StartOptions } from './helpers';
import { events, loadGuideExamples, reportFixtures, startBase as startFixture, transpileGuideExamples, waitFor, type Ev } from './fixtures/base/harness';

afterEach(async (ctx) => {
  reportFixtures(ctx.task.result?.state === 'fail');
  await stopAll();
});

const MESSAGE = {
  client: { hostname: 'client.example.org', family: 'inet' as const, address: '192.0.2.7', port: 40001 },
  helo: 'client.example.org',
  from: '<alice@example.org>',
  rcpt: ['<bob@example.net>', '<carol@example.net>'],
  headers: [
    ['Subject', 'hello'],
    ['X-Reject-Me', 'please'],
  ] as [string, string][],
  body: 'line one\r\nline two\r\n',
};

const ALL_NO = P_NOCONNECT | P_NOHELO | P_NOMAIL | P_NORCPT | P_NODATA | P_NOHDRS | P_NOEOH | P_NOBODY | P_NOUNKNOWN;

function byConn(evs: Ev[], conn: number): Ev[] {
  return evs.filter((e) => e.conn === conn);
}

// Every test that starts a milter runs on both engines; the fixture is checked
// to be on the engine named (startBase with opts.engine).
const GUIDE_JS = transpileGuideExamples();

describe.each(ENGINES)('%s engine', (engine) => {
  const startBase = (cfg: Record<string, unknown>, opts: StartOptions = {}) => startFixture(cfg, { ...opts, engine });

  describe('negotiation derived from the class', () => {
    it('a milter overriding only eom gets no header or body events, and its OPTNEG reply says so', async () => {
      const p = await startBase({ milter: 'EomOnly' });
      const c = await MilterClient.connect(p.spec);
      const neg = c.negotiation!;
      expect(neg.steps & ALL_NO).toBe(ALL_NO);
      expect(neg.steps & SMFIP_NR_ALL).toBe(0);
      expect(neg.steps & P_SKIP).toBe(P_SKIP);
      expect(neg.actions).toBe(SMFIF_ALL); // static flags undefined: whatever the MTA offers

      const r = await c.sendMessage({ ...MESSAGE, quit: true });
      expect(r.connect?.status).toBe('notsent');
      expect(r.helo?.status).toBe('notsent');
      expect(r.envfrom?.status).toBe('notsent');
      expect(r.envrcpt.map((x) => x.status)).toEqual(['notsent', 'notsent']);
      expect(r.headers.map((x) => x.status)).toEqual(['notsent', 'notsent']);
      expect(r.eoh?.status).toBe('notsent');
      expect(r.body?.status).toBe('notsent');
      expect(r.decision).toBe('continue');

      await waitFor(p, (e) => e.ev === 'close');
      const seen = events(p).filter((e) => e.conn !== undefined);
      expect(seen.map((e) => e.ev)).toEqual(['eom', 'close']);
      // Base sees the same negotiation in force.
      expect(seen[0].steps).toBe(neg.steps);
      expect(seen[0].actions).toBe(neg.actions);
    });

    it('a MTA with sendAll gets an answer for steps negotiated away, and Base never runs them', async () => {
      // The engine itself answers events whose callback is absent (continue).
      const p = await startBase({ milter: 'EomOnly' });
      const c = await MilterClient.connect(p.spec, { sendAll: true });
      const r = await c.sendMessage({ ...MESSAGE, quit: true });
      expect(r.headers.map((x) => x.status)).toEqual(['continue', 'continue']);
      expect(r.body?.status).toBe('continue');
      await waitFor(p, (e) => e.ev === 'close');
      expect(events(p).filter((e) => e.conn !== undefined).map((e) => e.ev)).toEqual(['eom', 'close']);
    });

    it('@noreply steps get no reply on the wire, and the handlers still run one at a time in protocol order', async () => {
      const p = await startBase({ milter: 'NoReply' });
      const c = await MilterClient.connect(p.spec);
      const steps = c.negotiation!.steps;
      const nr = P_NR_CONN | P_NR_HELO | P_NR_MAIL | P_NR_RCPT | P_NR_HDR;
      expect(steps & nr).toBe(nr);
      expect(steps & P_NR_EOH).toBe(0); // eoh is not @noreply
      expect(steps & P_NODATA).toBe(P_NODATA); // data not overridden
      expect(steps & (P_NOCONNECT | P_NOHELO | P_NOMAIL | P_NORCPT | P_NOHDRS | P_NOEOH)).toBe(0);

      const r = await c.sendMessage(MESSAGE);
      expect(r.connect?.status).toBe('noreply');
      expect(r.helo?.status).toBe('noreply');
      expect(r.envfrom?.status).toBe('noreply');
      expect(r.envrcpt.map((x) => x.status)).toEqual(['noreply', 'noreply']);
      expect(r.data?.status).toBe('notsent');
      expect(r.headers.map((x) => x.status)).toEqual(['noreply', 'noreply']);
      expect(r.eoh?.status).toBe('continue');
      // The REJECT from the no-reply header handler is not an answer: the message goes on.
      expect(r.decision).toBe('continue');
      await c.quit();

      const run = events(p).filter((e) => e.ev === 'start' || e.ev === 'end');
      // Each handler ends before the next starts, in protocol order, although
      // the client sent everything up to eoh without waiting and earlier
      // handlers sleep longer than later ones.
      const expected = [
        ['connect', 'client.example.org'], ['hello', 'client.example.org'], ['envfrom', '<alice@example.org>'],
        ['envrcpt', '<bob@example.net>'], ['envrcpt', '<carol@example.net>'], ['header', 'Subject: hello'],
        ['header', 'X-Reject-Me: please'], ['eoh', undefined],
      ];
      const flat = expected.flatMap(([step, arg]) => [`start ${step} ${arg ?? ''}`, `end ${step}`]);
      expect(run.map((e) => (e.ev === 'start' ? `start ${e.step} ${e.arg ?? ''}` : `end ${e.step}`))).toEqual([...flat, 'start eom ']);
      const logged = events(p).filter((e) => e.ev === 'log' && e.level === 'error');
      expect(logged).toHaveLength(1);
      expect(logged[0].msg).toMatch(/NoReply\.header\(\) is @noreply but returned REJECT/);
    });

    it('@symlist macros are in the OPTNEG reply, and getsymval returns them when the MTA sends only those', async () => {
      const p = await startBase({ milter: 'Symlists' });
      const c = await MilterClient.connect(p.spec, { filterMacros: true });
      const neg = c.negotiation!;
      expect(neg.actions & SETSYMLIST).toBe(SETSYMLIST);
      expect(neg.symlists).toEqual({
        [M_CONNECT]: ['j', '{client_addr}'],
        [M_ENVFROM]: ['{auth_authen}', '{mail_addr}'],
        [M_ENVRCPT]: ['{rcpt_addr}'],
        [M_EOM]: ['i'],
      });
      const r = await c.sendMessage({
        ...MESSAGE,
        rcpt: ['<bob@example.net>'],
        macros: {
          connect: { j: 'mx.example.net', '{client_addr}': '192.0.2.7', '{daemon_name}': 'smtpd' },
          envfrom: { '{auth_authen}': 'alice', '{mail_addr}': 'alice@example.org', '{auth_type}': 'PLAIN' },
          envrcpt: { '{rcpt_addr}': 'bob@example.net' },
          eom: { i: 'QID42', j: 'not-asked-here' },
        },
        quit: true,
      });
      expect(r.decision).toBe('continue');
      await waitFor(p, (e) => e.ev === 'eom');
      const seen = Object.fromEntries(events(p).filter((e) => e.conn !== undefined).map((e) => [e.ev, e.macros]));
      expect(seen.connect).toEqual({ j: 'mx.example.net', '{client_addr}': '192.0.2.7' });
      expect(seen.envfrom).toMatchObject({ '{auth_authen}': 'alice', '{mail_addr}': 'alice@example.org' });
      expect(seen.envfrom['{auth_type}']).toBeUndefined();
      expect(seen.envfrom['{daemon_name}']).toBeUndefined();
      expect(seen.envrcpt).toMatchObject({ '{rcpt_addr}': 'bob@example.net' });
      expect(seen.eom).toMatchObject({ i: 'QID42', j: 'mx.example.net' }); // eom's own j was filtered; connect's remains
    });

    it('an async negotiate override (super.negotiate) gets the offer and sends the same answer and macro lists', async () => {
      const p = await startBase({ milter: 'DynSymlists' });
      const c = await MilterClient.connect(p.spec, { filterMacros: true, actions: SMFIF_ALL & ~CHGBODY });
      const neg = c.negotiation!;
      expect(neg.actions).toBe(SMFIF_ALL & ~CHGBODY);
      expect(neg.symlists[M_ENVFROM]).toEqual(['{auth_authen}', '{mail_addr}']);
      expect(neg.steps & (P_NOCONNECT | P_NOMAIL | P_NORCPT)).toBe(0);
      expect(neg.steps & (P_NOHELO | P_NOHDRS | P_NOBODY)).toBe(P_NOHELO | P_NOHDRS | P_NOBODY);
      const r = await c.sendMessage({ ...MESSAGE, macros: { envfrom: { '{auth_authen}': 'alice', '{auth_type}': 'PLAIN' } }, quit: true });
      expect(r.decision).toBe('continue');
      await waitFor(p, (e) => e.ev === 'eom');
      const ng = events(p).find((e) => e.ev === 'negotiate')!;
      expect(ng.offer.actions).toBe(SMFIF_ALL & ~CHGBODY);
      expect(ng.answer).toEqual({ status: CONTINUE, actions: neg.actions, steps: neg.steps });
      expect(events(p).find((e) => e.ev === 'envfrom')!.macros).toEqual({ '{auth_authen}': 'alice' });
    });

    it('without SETSYMLIST on offer, the symlists are dropped and the session still works', async () => {
      const p = await startBase({ milter: 'Symlists' });
      const c = await MilterClient.connect(p.spec, { actions: SMFIF_ALL & ~SETSYMLIST, filterMacros: true });
      expect(c.negotiation!.actions & SETSYMLIST).toBe(0);
      expect(c.negotiation!.symlists).toEqual({});
      const r = await c.sendMessage({ ...MESSAGE, macros: { envfrom: { '{auth_type}': 'PLAIN' } }, quit: true });
      expect(r.decision).toBe('continue');
      await waitFor(p, (e) => e.ev === 'envfrom');
      // No list asked for: the MTA sends what it likes, and getsymval sees it.
      expect(events(p).find((e) => e.ev === 'envfrom')!.macros).toEqual({ '{auth_type}': 'PLAIN' });
    });
  });

  describe('actions and their errors', () => {
    it('DisabledActionError when the MTA does not offer a flag: seen inside the milter, and the message still gets an answer', async () => {
      const p = await startBase({
        milter: 'Actions',
        actions: [
          ['addheader', 'X-Ok', 'yes'],
          ['chgheader', 'Subject', 1, 'changed'],
          ['addrcpt', '<dave@example.net>'],
        ],
      });
      const c = await MilterClient.connect(p.spec, { actions: ADDHDRS });
      expect(c.negotiation!.actions).toBe(ADDHDRS);
      const r = await c.sendMessage({ ...MESSAGE, quit: true });
      expect(r.decision).toBe('continue');
      expect(r.actions.map((a) => a.type)).toEqual(['addheader']);
      await waitFor(p, (e) => e.ev === 'eom-done');
      const results = events(p).filter((e) => e.ev === 'action');
      expect(results.map((e) => [e.method, e.ok])).toEqual([['addheader', true], ['chgheader', false], ['addrcpt', false]]);
      const chg = results[1].error;
      expect(chg.name).toBe('DisabledActionError');
      expect(chg.code).toBe('ERR_MILTER_DISABLED_ACTION');
      expect(chg.flag).toBe(CHGHDRS);
      expect(chg.message).toMatch(/chgheader\(\) needs the CHGHDRS action flag.*the MTA did not offer it/);
      expect(results[2].error.message).toMatch(/addrcpt\(\) needs the ADDRCPT action flag/);
    });

    it('an uncaught DisabledActionError falls to the exception policy: the MTA gets TEMPFAIL 451, not silence', async () => {
      const p = await startBase({ milter: 'Actions', actions: [['addheader', 'X-Before', '1']], uncaught: ['quarantine', 'held'] });
      const c = await MilterClient.connect(p.spec, { actions: ADDHDRS });
      const r = await c.sendMessage({ ...MESSAGE, quit: true });
      expect(r.decision).toBe('tempfail');
      expect(r.eom?.reply?.rcode).toBe('451');
      await waitFor(p, (e) => e.ev === 'log' && e.level === 'error');
      const err = events(p).find((e) => e.ev === 'log' && e.level === 'error')!;
      expect(err.msg).toMatch(/eom failed on connection \d+: quarantine\(\) needs the QUARANTINE action flag/);
      expect(events(p).some((e) => e.ev === 'eom-done')).toBe(false);
    });

    it('exceptionPolicy REJECT from runmilter options applies to a failing handler', async () => {
      const p = await startBase({ milter: 'Actions', uncaught: ['quarantine', 'held'], run: { exceptionPolicy: 'REJECT' } });
      const c = await MilterClient.connect(p.spec, { actions: ADDHDRS });
      const r = await c.sendMessage({ ...MESSAGE, quit: true });
      expect(r.decision).toBe('reject');
      expect(r.eom?.reply?.rcode).toMatch(/^5/);
    });
  });

  describe('state and ordering', () => {
    it('async handlers on 20 interleaved connections keep each connection in protocol order, with its own state', async () => {
      const p = await startBase({ milter: 'Stateful', delays: true });
      const N = 20;
      const clients = await Promise.all(Array.from({ length: N }, () => MilterClient.connect(p.spec)));
      const results = await Promise.all(
        clients.map((c, i) =>
          c.sendMessage({
            client: { hostname: `h${i}.example`, address: `192.0.2.${i + 1}`, port: 1000 + i },
            helo: `helo${i}.example`,
            from: `<s${i}@example.org>`,
            rcpt: Array.from({ length: (i % 3) + 1 }, (_, k) => `<r${i}-${k}@example.net>`),
            headers: Array.from({ length: (i % 4) + 1 }, (_, k) => [`X-H${k}`, `v${i}`] as [string, string]),
            body: 'x'.repeat(10 + i) + '\r\n',
            quit: true,
          }),
        ),
      );
      results.forEach((r, i) => {
        expect(r.decision).toBe('continue');
        expect(r.actions).toHaveLength(1);
        const a = r.actions[0] as { type: string; name: string; value: string };
        expect(a.name).toBe('X-State');
        expect(JSON.parse(a.value)).toEqual({
          helo: `helo${i}.example`,
          messages: 1,
          rcpts: Array.from({ length: (i % 3) + 1 }, (_, k) => `<r${i}-${k}@example.net>`),
          headers: (i % 4) + 1,
          bodyBytes: 12 + i,
        });
      });
      await waitFor(p, (e) => e.ev === 'close', N);
      const evs = events(p).filter((e) => e.serial !== undefined);
      const conns = [...new Set(evs.map((e) => e.conn!))];
      expect(conns).toHaveLength(N);
      for (const conn of conns) {
        const mine = byConn(evs, conn);
        const serials = new Set(mine.map((e) => e.serial));
        expect(serials.size).toBe(1); // one instance per connection
        const names = mine.map((e) => e.ev);
        const nr = names.filter((n) => n === 'envrcpt').length;
        const nh = names.filter((n) => n === 'header').length;
        expect(names).toEqual(['connect', 'hello', 'envfrom', ...Array(nr).fill('envrcpt'), ...Array(nh).fill('header'), 'eoh', 'body', 'eom', 'close']);
        expect(mine.filter((e) => e.n !== undefined).map((e) => e.n)).toEqual(Array.from({ length: names.length - 1 }, (_, k) => k + 1));
      }
      // The connections really interleaved: some connection's events are not contiguous in the log.
      const order = evs.map((e) => e.conn);
      const switches = order.filter((c, k) => k > 0 && c !== order[k - 1]).length;
      expect(switches).toBeGreaterThan(N);
    });

    it('two messages with an abort between: this.message starts clean for each, connection state survives', async () => {
      const p = await startBase({ milter: 'Stateful' });
      const c = await MilterClient.connect(p.spec);
      const first = await c.sendMessage({ ...MESSAGE, headers: [['Subject', 'one']] });
      expect(first.decision).toBe('continue');
      // Second message: aborted after two recipients and a header.
      expect((await c.envfrom('<second@example.org>')).status).toBe('continue');
      await c.envrcpt('<x1@example.net>');
      await c.envrcpt('<x2@example.net>');
      await c.data();
      await c.header('Subject', 'two');
      await c.abort();
      const third = await c.sendMessage({ from: '<third@example.org>', rcpt: ['<y@example.net>'], headers: [['Subject', 'three']], body: 'short\r\n' });
      expect(third.connect).toBeUndefined(); // same SMTP session: no new connect
      await c.quit();
      await waitFor(p, (e) => e.ev === 'close');

      const state = (r: typeof first) => JSON.parse((r.actions[0] as { value: string }).value);
      expect(state(first)).toEqual({ helo: 'client.example.org', messages: 1, rcpts: MESSAGE.rcpt, headers: 1, bodyBytes: MESSAGE.body.length });
      // The aborted message's recipients and header are gone; helo and the message count are not.
      expect(state(third)).toEqual({ helo: 'client.example.org', messages: 3, rcpts: ['<y@example.net>'], headers: 1, bodyBytes: 7 });
      const fresh = events(p).filter((e) => e.ev === 'fresh');
      expect(fresh.map((e) => [e.from, e.rcpts, e.headers, e.bodyBytes])).toEqual([
        ['<alice@example.org>', 0, 0, 0],
        ['<second@example.org>', 0, 0, 0],
        ['<third@example.org>', 0, 0, 0],
      ]);
      // abort() still sees the message it ends.
      expect(events(p).filter((e) => e.ev === 'abort').map((e) => e.rcpts)).toEqual([['<x1@example.net>', '<x2@example.net>']]);
      expect(new Set(events(p).filter((e) => e.serial !== undefined).map((e) => e.serial)).size).toBe(1);
    });
  });

  describe('class switches and inheritance over the wire', () => {
    it('static flags restricts the actions asked for; an action outside them names the switch to change', async () => {
      const p = await startBase({ milter: 'Parent' });
      const c = await MilterClient.connect(p.spec); // offers every action
      const neg = c.negotiation!;
      expect(neg.actions).toBe(ADDHDRS);
      expect(neg.steps & P_NORCPT).toBe(0);
      expect(neg.steps & P_NOHDRS).toBe(P_NOHDRS);
      const r = await c.sendMessage({ ...MESSAGE, quit: true });
      expect(r.headers.map((h) => h.status)).toEqual(['notsent', 'notsent']);
      expect(r.actions.map((a) => [a.type, (a as { value?: string }).value])).toEqual([['addheader', 'Parent']]);
      await waitFor(p, (e) => e.ev === 'chgheader');
      const chg = events(p).find((e) => e.ev === 'chgheader')!;
      expect(chg.ok).toBe(false);
      expect(chg.error.name).toBe('DisabledActionError');
      expect(chg.error.message).toMatch(/add CHGHDRS to static flags/);
      expect(events(p).filter((e) => e.ev === 'envrcpt').map((e) => e.to)).toEqual(MESSAGE.rcpt);
    });

    it('a subclass gets its own mask: the step it overrides, the step it drops (@nocallback), its own flags', async () => {
      const p = await startBase({ milter: 'Child' });
      const c = await MilterClient.connect(p.spec);
      const neg = c.negotiation!;
      expect(neg.actions).toBe(ADDHDRS | CHGHDRS);
      expect(neg.steps & P_NOHDRS).toBe(0);
      expect(neg.steps & P_NORCPT).toBe(P_NORCPT);
      expect(neg.steps & SMFIP_NO_ALL).toBe(ALL_NO & ~P_NOHDRS);
      const r = await c.sendMessage({ ...MESSAGE, quit: true });
      expect(r.headers.map((h) => h.status)).toEqual(['continue', 'continue']);
      expect(r.envrcpt.map((h) => h.status)).toEqual(['notsent', 'notsent']);
      expect(r.actions.map((a) => [a.type, (a as { value?: string }).value])).toEqual([
        ['addheader', 'Child'],
        ['chgheader', 'changed'],
      ]);
      await waitFor(p, (e) => e.ev === 'chgheader');
      expect(events(p).filter((e) => e.ev === 'header').map((e) => e.name)).toEqual(['Subject', 'X-Reject-Me']);
      expect(events(p).some((e) => e.ev === 'envrcpt')).toBe(false);
    });
  });

  describe("docs/guide.md's examples over the wire (compiled by tsc as a user's build would)", () => {
    it('Tagger over the wire: chgheader when offered, the DisabledActionError fallback when not', async () => {
      const guideJs = path.join(tmpDir('nmg-'), 'guide-examples.js');
      fs.writeFileSync(guideJs, GUIDE_JS);
      const p = await startBase({ milter: 'guide:Tagger', guideJs });
      const full = await MilterClient.connect(p.spec);
      expect(full.negotiation!.actions).toBe(ADDHDRS | CHGHDRS);
      const r1 = await full.sendMessage({ ...MESSAGE, macros: { eom: { i: 'Q1' } }, quit: true });
      expect(r1.actions.map((a) => [a.type, (a as { value?: string }).value])).toEqual([['chgheader', '[tagged] Q1']]);
      const poor = await MilterClient.connect(p.spec, { actions: ADDHDRS });
      const r2 = await poor.sendMessage({ ...MESSAGE, quit: true });
      expect(r2.decision).toBe('continue');
      expect(r2.actions.map((a) => [a.type, (a as { name?: string }).name])).toEqual([['addheader', 'X-Tag']]);
    });
  });
});

describe("docs/guide.md's examples (compiled by tsc as a user's build would)", () => {
  const js = GUIDE_JS;
  const guide = loadGuideExamples(js, api, testing);

  it('RcptLimit: the 51st recipient is refused with 452, message state is per message', async () => {
    const lines: string[] = [];
    guide.RcptLimit.logger = { info: (m: string) => lines.push(m), warn: (m: string) => lines.push(m), error: (m: string) => lines.push(m) };
    const t = new testing.TestCtx(guide.RcptLimit);
    await t.connect();
    await t.helo();
    await t.envfrom('<a@example.org>', 'SIZE=1000');
    for (let i = 0; i < 50; i++) expect(await t.envrcpt(`<r${i}@example.net>`)).toBe(CONTINUE);
    expect(await t.envrcpt('<r50@example.net>')).toBe(TEMPFAIL);
    expect(t.reply).toMatchObject({ rcode: '452', xcode: '4.5.3' });
    await t.abort();
    expect(lines).toEqual(['message from <a@example.org> aborted after 50 recipients']);
    expect(await t.feedMessage('Subject: x\r\n\r\nbody\r\n', { rcpts: ['<b@example.net>'] })).toBe(CONTINUE);
    expect(t.headerChanges).toEqual([expect.objectContaining({ name: 'X-Rcpt-Count', value: '1' })]);
    expect((t.milter as unknown as { messages: number }).messages).toBe(2);
  });

  it('decorators: Auth negotiates NR_HDR and its symlist; QuietAuth drops header; Counter is tagged', async () => {
    const { Auth, QuietAuth, Counter } = guide;
    expect(protocolSteps(Auth) & api.P_NR_HDR).toBe(api.P_NR_HDR);
    expect(protocolSteps(QuietAuth) & api.P_NOHDRS).toBe(api.P_NOHDRS);
    expect(methodTags(Counter.prototype.header)).toEqual({ noreply: true, decode: 'bytes' });
    const t = new testing.TestCtx(Auth, { macros: { [M_ENVFROM]: { '{auth_authen}': 'alice', '{auth_type}': 'PLAIN' } } });
    await t.negotiate();
    expect(t.symlists[M_ENVFROM]).toEqual(['{auth_authen}', '{auth_type}']);
    await t.connect();
    expect(await t.helo('caf\u00e9')).toBe(api.REJECT); // 8-bit HELO, seen as bytes
    expect(await t.envfrom('<alice@example.org>')).toBe(ACCEPT);
  });

  it('the testing example: TestCtx records the Subject change with the queue id macro', async () => {
    const t = new testing.TestCtx(guide.Tagger, { macros: { [api.M_EOM]: { i: 'QID1' } } });
    expect(await t.feedMessage('Subject: hi\r\n\r\nbody\r\n', { rcpts: ['<bob@example.net>'] })).toBe(CONTINUE);
    expect(t.headerChanges).toEqual([{ op: 'change', name: 'Subject', index: 1, value: '[tagged] QID1' }]);
    expect(t.resultMessage().toString()).toBe('Subject: [tagged] QID1\r\n\r\nbody\r\n');
  });

  it('every TypeScript block of docs/guide.md is quoted verbatim from guide-examples.ts (so it was type-checked)', () => {
    const guideMd = fs.readFileSync(path.join(__dirname, '..', 'docs', 'guide.md'), 'utf8');
    const examples = fs.readFileSync(path.join(__dirname, 'fixtures', 'base', 'guide-examples.ts'), 'utf8');
    const blocks = [...guideMd.matchAll(/```ts\n([\s\S]*?)```/g)].map((m) => m[1]);
    expect(blocks.length).toBeGreaterThanOrEqual(10);
    for (const b of blocks) expect(examples).toContain(b);
  });

  it('Cautious: its negotiate sees the offer and replaces the body only when CHGBODY is offered', async () => {
    for (const [actions, replaced] of [[api.SMFIF_ALL, true], [api.SMFIF_ALL & ~CHGBODY, false]] as const) {
      const t = new testing.TestCtx(guide.Cautious, { offer: { actions } });
      expect(await t.feedMessage('Subject: x\r\n\r\nsecret\r\n')).toBe(CONTINUE);
      expect(t.replacedBody?.toString()).toBe(replaced ? '[removed]\r\n' : undefined);
    }
  });
});
