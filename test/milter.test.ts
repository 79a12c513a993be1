// Integration tests of the native core and the `milter` module: real
// libmilter, each milter in its own child process (libmilter runs once per
// process), driven over real sockets by the MTA-side MilterClient.
import * as net from 'node:net';
import * as path from 'node:path';
import { afterEach, describe, expect, it } from 'vitest';

import * as C from '../src/constants';
import { MilterClient } from '../src/testing/client';
import { addonFile, buildC, freeInet6Spec, jsonEvents, linksPatchedLibmilter, startFixtureMilter, stopAll, tmpSocketSpec, waitJsonEvent, type JsonEvent, type RunningProcess } from './helpers';

const FIXTURE = path.join(__dirname, 'fixtures', 'node', 'milter.cjs');
const HANDOFF = path.join(__dirname, 'fixtures', 'node', 'handoff.cjs');

type Ev = JsonEvent;

function startMilter(cfg: Record<string, unknown>): Promise<RunningProcess & { spec: string }> {
  return startFixtureMilter(FIXTURE, cfg);
}

const events = jsonEvents;

async function waitCount(p: RunningProcess, name: string, n: number, timeout = 10_000): Promise<void> {
  const until = Date.now() + timeout;
  while (events(p).filter((e) => e.ev === name).length < n) {
    if (Date.now() > until) throw new Error(`timed out waiting for ${n} "${name}" events`);
    if (p.hasExited) throw new Error(`milter exited while waiting for "${name}": ${p.stderr}`);
    await new Promise((r) => setTimeout(r, 20));
  }
}

function waitEvent(p: RunningProcess, name: string, timeout = 5000): Promise<Ev> {
  return waitJsonEvent(p, name, timeout);
}

const MESSAGE = {
  client: { hostname: 'mail.example.org', family: 'inet' as const, address: '192.0.2.7', port: 40001 },
  helo: 'mail.example.org',
  from: ['<alice@example.org>', 'SIZE=1234', 'BODY=8BITMIME'],
  rcpt: [['<bob@example.net>', 'NOTIFY=NEVER']],
  headers: [
    ['Subject', 'hello'],
    ['X-Latin1', Buffer.from('caf\xe9 cr\xe8me', 'latin1')],
  ] as [string, string | Buffer][],
  body: Buffer.from('line one\r\n\0binary\0\r\nend\r\n', 'latin1'),
};

afterEach(async () => {
  await stopAll();
});

describe('callbacks and their arguments', () => {
  it('delivers every callback with its arguments, 8-bit headers and NUL bytes intact', async () => {
    const p = await startMilter({});
    const c = await MilterClient.connect(p.spec);
    const r = await c.sendMessage({ ...MESSAGE, quit: false });
    expect(r.decision).toBe('continue');
    await c.unknown('XYZZY arg');
    await c.quit();
    await waitEvent(p, 'close');
    const ev = events(p).filter((e) => e.conn !== undefined);
    const names = ev.map((e) => e.ev);
    expect(names).toEqual(['connect', 'helo', 'envfrom', 'envrcpt', 'data', 'header', 'header', 'eoh', 'body', 'eom', 'eom-actions', 'unknown', 'close']);
    const by = (n: string) => ev.filter((e) => e.ev === n);
    expect(by('connect')[0].args).toEqual(['mail.example.org', 'inet', { address: '192.0.2.7', port: 40001 }]);
    expect(by('helo')[0].args).toEqual(['mail.example.org']);
    expect(by('envfrom')[0].args).toEqual(['<alice@example.org>', 'SIZE=1234', 'BODY=8BITMIME']);
    expect(by('envrcpt')[0].args).toEqual(['<bob@example.net>', 'NOTIFY=NEVER']);
    expect(by('header')[0].args).toEqual(['Subject', 'hello']);
    // Not valid UTF-8: decoded as latin1 so each byte stays one character.
    expect(by('header')[1].args).toEqual(['X-Latin1', 'caf\xe9 cr\xe8me']);
    expect(by('body')[0].args).toEqual([{ hex: MESSAGE.body.toString('hex') }]);
    expect(by('unknown')[0].args).toEqual(['XYZZY arg']);
    const ids = new Set(ev.map((e) => e.conn));
    expect(ids.size).toBe(1);
  });

  it('decodes IPv6 and unix client addresses, and unknown families', async () => {
    const p = await startMilter({ callbacks: ['connect', 'close'] });
    for (const [family, address, port] of [
      ['inet6', '2001:db8::25', 2525],
      ['unix', '/run/some.sock', 0],
      ['unknown', '', 0],
    ] as const) {
      const c = await MilterClient.connect(p.spec);
      const r = await c.connect('client.example', family, address, port);
      expect(r.status).toBe('continue');
      await c.quit();
    }
    await waitCount(p, 'close', 3);
    const got = events(p)
      .filter((e) => e.ev === 'connect')
      .map((e) => e.args);
    expect(got).toEqual([
      ['client.example', 'inet6', { address: '2001:db8::25', port: 2525 }],
      ['client.example', 'unix', { path: '/run/some.sock' }],
      ['client.example', 'unknown', null],
    ]);
  });

  it('listens on unix and inet6 sockets too', async () => {
    const specs = [tmpSocketSpec()];
    const v6 = await freeInet6Spec();
    if (v6) specs.push(v6);
    for (const spec of specs) {
      const p = await startMilter({ socket: spec, callbacks: ['helo'] });
      const c = await MilterClient.connect(spec);
      expect((await c.helo('x.example')).status).toBe('continue');
      await c.quit();
      process.kill(p.pid, 'SIGTERM');
      expect((await p.exited).code).toBe(0);
    }
  });

  it('negotiates away callbacks that are not registered', async () => {
    const p = await startMilter({ callbacks: ['eom'] });
    const c = await MilterClient.connect(p.spec);
    const n = c.negotiation;
    const no = C.P_NOCONNECT | C.P_NOHELO | C.P_NOMAIL | C.P_NORCPT | C.P_NOBODY | C.P_NOHDRS | C.P_NOEOH | C.P_NOUNKNOWN | C.P_NODATA;
    expect(n.steps & no).toBe(no);
    const r = await c.sendMessage(MESSAGE);
    expect(r.headers.every((h) => h.status === 'notsent')).toBe(true);
    expect(r.eom?.status).toBe('continue');
    await c.close();
    expect(events(p).map((e) => e.ev)).not.toContain('header');
  });
});

describe('actions', () => {
  it('sends every EOM action on the wire, byte for byte', async () => {
    const latin = { hex: Buffer.from('\xe9t\xe9', 'latin1').toString('hex') };
    const p = await startMilter({
      eomActions: [
        ['addheader', 'X-Added', 'one'],
        ['addheader', 'X-Inserted', 'zero', 0],
        ['chgheader', 'Subject', 1, 'changed'],
        ['chgheader', 'X-Latin1', 1, latin],
        ['chgheader', 'X-Gone', 1, null],
        ['addrcpt', '<new@example.net>'],
        ['addrcpt', '<par@example.net>', 'NOTIFY=NEVER'],
        ['delrcpt', '<bob@example.net>'],
        ['chgfrom', '<bounce@example.org>', 'SIZE=1'],
        ['replacebody', 'new body\r\n'],
        ['replacebody', 'second chunk\r\n'],
        ['quarantine', 'held for review'],
        ['progress'],
      ],
      eomStatus: 'ACCEPT',
    });
    const c = await MilterClient.connect(p.spec);
    const r = await c.sendMessage(MESSAGE);
    expect(r.decision).toBe('accept');
    const acts = r.actions.map((a) => {
      const { raw: _raw, ...rest } = a as typeof a & { valueBytes?: Buffer };
      if ('valueBytes' in rest) delete (rest as { valueBytes?: Buffer }).valueBytes;
      return rest;
    });
    expect(acts).toEqual([
      { type: 'addheader', name: 'X-Added', value: 'one' },
      { type: 'insheader', index: 0, name: 'X-Inserted', value: 'zero' },
      { type: 'chgheader', index: 1, name: 'Subject', value: 'changed' },
      { type: 'chgheader', index: 1, name: 'X-Latin1', value: expect.any(String) },
      { type: 'chgheader', index: 1, name: 'X-Gone', value: '' },
      { type: 'addrcpt', rcpt: '<new@example.net>' },
      { type: 'addrcpt_par', rcpt: '<par@example.net>', params: 'NOTIFY=NEVER' },
      { type: 'delrcpt', rcpt: '<bob@example.net>' },
      { type: 'chgfrom', sender: '<bounce@example.org>', params: 'SIZE=1' },
      { type: 'replbody', chunk: Buffer.from('new body\r\n') },
      { type: 'replbody', chunk: Buffer.from('second chunk\r\n') },
      { type: 'quarantine', reason: 'held for review' },
    ]);
    const latinAction = r.actions[3] as { valueBytes: Buffer };
    expect(latinAction.valueBytes.equals(Buffer.from('\xe9t\xe9', 'latin1'))).toBe(true);
    expect(r.replacedBody?.toString()).toBe('new body\r\nsecond chunk\r\n');
    expect(r.eom?.progress).toBe(1);
    const results = (await waitEvent(p, 'eom-actions')).results as unknown[][];
    expect(results.every((x) => x[1] === 'ok')).toBe(true);
    await c.close();
  });

  it('keeps the negotiated actions for the session that follows QUIT_NC', async () => {
    const p = await startMilter({ callbacks: ['connect', 'eom', 'close'], eomActions: [['addheader', 'X-Session', 'n']] });
    const c = await MilterClient.connect(p.spec);
    const first = await c.sendMessage(MESSAGE);
    expect(first.actions).toHaveLength(1);
    await c.quitNc();
    const second = await c.sendMessage(MESSAGE);
    expect(second.decision).toBe('continue');
    expect(second.actions.map((a) => a.type)).toEqual(['addheader']);
    await c.close();
    const results = events(p).filter((e) => e.ev === 'eom-actions');
    expect(results.map((r) => (r.results as unknown[][])[0][1])).toEqual(['ok', 'ok']);
    // QUIT_NC ends one session and starts another on the same connection.
    expect(new Set(results.map((r) => r.conn)).size).toBe(2);
  });

  it('replaces a body larger than one milter packet', async () => {
    const p = await startMilter({ callbacks: ['eom'], eomActions: [['replacebody', { repeat: 'x', count: 200_000 }]] });
    const big = 'x'.repeat(200_000);
    const c = await MilterClient.connect(p.spec);
    const r = await c.sendMessage(MESSAGE);
    expect(r.replacedBody?.length).toBe(big.length);
    expect(r.actions.filter((a) => a.type === 'replbody').length).toBeGreaterThan(3);
    await c.close();
  });

  it('refuses actions whose flag was not negotiated, or that are called outside eom', async () => {
    const p = await startMilter({
      eomActions: [
        ['addheader', 'X-Ok', 'fine'],
        ['chgfrom', '<x@example.org>'],
        ['quarantine', 'nope'],
      ],
    });
    const c = await MilterClient.connect(p.spec, { actions: C.ADDHDRS });
    await c.sendMessage(MESSAGE);
    const results = (await waitEvent(p, 'eom-actions')).results as unknown[][];
    expect(results[0]).toEqual(['addheader', 'ok']);
    expect(results[1].slice(0, 3)).toEqual(['chgfrom', 'DisabledActionError', 'ERR_MILTER_DISABLED_ACTION']);
    expect(results[2].slice(0, 2)).toEqual(['quarantine', 'DisabledActionError']);
    await c.close();
  });

  it('sets single- and multi-line replies on reject', async () => {
    const p = await startMilter({ rejectRcpt: '<bad@example.net>' });
    const c = await MilterClient.connect(p.spec);
    await c.connect('h', 'inet', '192.0.2.1', 1);
    await c.envfrom('<a@example.org>');
    const r = await c.envrcpt('<bad@example.net>');
    expect(r.status).toBe('reject');
    expect(r.reply).toMatchObject({ rcode: '550', xcode: '5.7.1', text: 'Recipient refused by test' });
    await c.close();
  });
});

describe('async handlers, ordering and concurrency', () => {
  it('keeps each connection in order with async handlers across 50 concurrent connections', async () => {
    const p = await startMilter({ async: 3, eomActions: [['addheader', 'X-Async', 'yes']] });
    const clients = await Promise.all(Array.from({ length: 50 }, () => MilterClient.connect(p.spec)));
    const results = await Promise.all(clients.map((c) => c.sendMessage(MESSAGE)));
    for (const r of results) {
      expect(r.decision).toBe('continue');
      expect(r.actions).toHaveLength(1);
    }
    await Promise.all(clients.map((c) => c.quit()));
    await waitCount(p, 'close', 50);
    const perConn = new Map<number, string[]>();
    for (const e of events(p)) if (e.conn !== undefined) perConn.set(e.conn, [...(perConn.get(e.conn) ?? []), e.ev]);
    expect(perConn.size).toBe(50);
    for (const seq of perConn.values()) {
      expect(seq).toEqual(['connect', 'helo', 'envfrom', 'envrcpt', 'data', 'header', 'header', 'eoh', 'body', 'eom', 'eom-actions', 'close']);
    }
  });

  it('runs no-reply handlers in order without the MTA waiting for them', async () => {
    const p = await startMilter({ noreply: ['connect', 'helo', 'envfrom', 'header', 'body'], async: 20, macros: ['j', '{mail_addr}'] });
    const c = await MilterClient.connect(p.spec);
    const nr = C.P_NR_CONN | C.P_NR_HELO | C.P_NR_MAIL | C.P_NR_HDR | C.P_NR_BODY;
    expect(c.negotiation.steps & nr).toBe(nr);
    const r = await c.sendMessage({ ...MESSAGE, macros: { connect: { j: 'mx.test' }, envfrom: { '{mail_addr}': 'alice@example.org' } } });
    expect(r.connect?.status).toBe('noreply');
    expect(r.headers.map((h) => h.status)).toEqual(['noreply', 'noreply']);
    expect(r.envrcpt[0].status).toBe('continue');
    await c.quit();
    await waitEvent(p, 'close');
    const seq = events(p).filter((e) => e.conn !== undefined);
    expect(seq.map((e) => e.ev)).toEqual(['connect', 'helo', 'envfrom', 'envrcpt', 'data', 'header', 'header', 'eoh', 'body', 'eom', 'eom-actions', 'close']);
    // getsymval works in no-reply steps from the macros captured with the event.
    expect(seq[0].macros).toEqual({ j: 'mx.test' });
    expect(seq[2].macros).toEqual({ j: 'mx.test', '{mail_addr}': 'alice@example.org' });
  });

  it('lets body answer SKIP and still reaches eom', async () => {
    const p = await startMilter({ skipBody: true });
    const c = await MilterClient.connect(p.spec, { chunkSize: 10 });
    const r = await c.sendMessage({ ...MESSAGE, body: 'a'.repeat(100) });
    expect(r.body?.status).toBe('skip');
    expect(r.body?.chunksSent).toBe(1);
    expect(r.eom?.status).toBe('continue');
    await c.close();
    expect(events(p).filter((e) => e.ev === 'body')).toHaveLength(1);
  });
});

describe('hostile input', () => {
  // With a libmilter built with native/libmilter/odd-macros.patch (a
  // prebuild linked with scripts/build-libmilter.sh's archive, loaded with
  // NODEMILTER_ADDON), libmilter itself drops the trailing name and the
  // pairs before it are read; with any other libmilter the guard reads none.
  const addon = addonFile();
  const patched = addon !== undefined && linksPatchedLibmilter(addon);

  it('survives a macro list with an odd number of entries (libmilter would read past it)', async () => {
    const p = await startMilter({ noreply: ['connect'], callbacks: ['connect', 'helo', 'close'], macros: ['j', 'k', 'zz'] });
    const c = await MilterClient.connect(p.spec);
    // Name, value, name: the last name has no value.
    c.sendRaw('D', Buffer.from('Cj\0mx.example\0k\0', 'latin1'));
    await c.connect('h.example', 'inet', '192.0.2.1', 25);
    expect((await c.helo('h.example')).status).toBe('continue');
    await c.close();
    // A well-formed list on the next session is read again.
    const c2 = await MilterClient.connect(p.spec);
    c2.sendRaw('D', Buffer.from('Cj\0mx2.example\0', 'latin1'));
    await c2.connect('h2.example', 'inet', '192.0.2.2', 25);
    expect((await c2.helo('h2.example')).status).toBe('continue');
    await c2.close();
    await waitCount(p, 'close', 2);
    const connects = events(p).filter((e) => e.ev === 'connect');
    expect(connects, JSON.stringify(events(p))).toHaveLength(2);
    // The name without a value is never answered (and never read past).
    expect(connects[0].macros).toEqual(patched ? { j: 'mx.example' } : {});
    expect(connects[1].macros).toEqual({ j: 'mx2.example' });
    process.kill(p.pid, 'SIGTERM');
    const stopped = await waitEvent(p, 'stopped');
    const diag = stopped.diag as { macroLayout: number; macroGuard: string };
    if (patched) {
      // No guard needed, so no calibration.
      expect(diag.macroGuard).toBe('patched libmilter');
      expect(diag.macroLayout).toBe(-2);
    } else {
      // The guard found libmilter's seven macro stages in its context.
      expect(diag.macroLayout).toBe(7);
      expect(diag.macroGuard).toBe('layout');
    }
    expect((await p.exited).code).toBe(0);
  });

  it('answers getsymval right after odd macro lists at every stage, pairs before the stray name intact', async () => {
    const stages = ['connect', 'helo', 'envfrom', 'envrcpt', 'data', 'eoh', 'eom'] as const;
    const p = await startMilter({ callbacks: [...stages, 'close'], macros: ['j', '{a}', 'b', '{c}', '{stray}', '{late}'] });
    const c = await MilterClient.connect(p.spec);
    // One odd list per stage byte, each with a stray name last; the value
    // strings are long so that a walk past the list would meet heap data.
    const odd = (stage: string, pairs: [string, string][]) =>
      c.sendRaw('D', Buffer.from(`${stage}${pairs.map(([n, v]) => `${n}\0${v}\0`).join('')}{stray}\0`, 'latin1'));
    const v = (s: string) => `${s}-${'x'.repeat(200)}`;
    odd('C', [['j', v('mx')]]);
    await c.connect('h.example', 'inet', '192.0.2.1', 25);
    odd('H', [['{a}', v('helo')]]);
    await c.helo('h.example');
    odd('M', [['b', v('mail')], ['{c}', v('mail2')]]);
    await c.envfrom('<a@example.org>');
    odd('R', []);
    await c.envrcpt('<b@example.net>');
    odd('T', [['{a}', v('data')]]);
    await c.data();
    await c.header('Subject', 'x');
    odd('N', [['{late}', v('eoh')]]);
    await c.eoh();
    odd('E', [['{c}', v('eom')]]);
    const r = await c.eom();
    expect(r.status).toBe('continue');
    await c.close();
    await waitEvent(p, 'close');
    const got = Object.fromEntries(events(p).filter((e) => stages.includes(e.ev as never)).map((e) => [e.ev, e.macros]));
    const expected = patched
      ? {
          connect: { j: v('mx') },
          helo: { j: v('mx'), '{a}': v('helo') },
          envfrom: { j: v('mx'), '{a}': v('helo'), b: v('mail'), '{c}': v('mail2') },
          envrcpt: { j: v('mx'), '{a}': v('helo'), b: v('mail'), '{c}': v('mail2') },
          // Later stages win, as in smfi_getsymval's backwards search.
          data: { j: v('mx'), '{a}': v('data'), b: v('mail'), '{c}': v('mail2') },
          eoh: { j: v('mx'), '{a}': v('data'), b: v('mail'), '{c}': v('mail2'), '{late}': v('eoh') },
          eom: { j: v('mx'), '{a}': v('data'), b: v('mail'), '{c}': v('eom'), '{late}': v('eoh') },
        }
      : Object.fromEntries(stages.map((s) => [s, {}]));
    expect(got).toEqual(expected);
    process.kill(p.pid, 'SIGTERM');
    const stopped = await waitEvent(p, 'stopped');
    expect((stopped.diag as { macroGuard: string }).macroGuard).toBe(patched ? 'patched libmilter' : 'layout');
    expect((await p.exited).code).toBe(0);
  });
});

describe('errors in handlers', () => {
  for (const [kind, key] of [
    ['throws', 'throwIn'],
    ['rejects', 'rejectIn'],
    ['returns a non-status', 'badStatusIn'],
  ] as const) {
    it(`answers TEMPFAIL with 451 4.3.0 when a handler ${kind}, and reports it`, async () => {
      const p = await startMilter({ [key]: 'envfrom' });
      const c = await MilterClient.connect(p.spec);
      await c.connect('h', 'inet', '192.0.2.1', 1);
      const r = await c.envfrom('<a@example.org>');
      expect(r.status).toBe('tempfail');
      expect(r.reply?.rcode).toBe('451');
      expect(r.reply?.xcode).toBe('4.3.0');
      const err = await waitEvent(p, 'handlerError');
      expect(err.info).toMatchObject({ callback: 'envfrom', answered: C.TEMPFAIL });
      if (key === 'badStatusIn') expect(err.name).toBe('InvalidStatusError');
      await c.close();
    });
  }

  it('follows the exception policy REJECT with 554 5.3.0', async () => {
    const p = await startMilter({ throwIn: 'eom', policy: 'REJECT' });
    const c = await MilterClient.connect(p.spec);
    const r = await c.sendMessage(MESSAGE);
    expect(r.decision).toBe('reject');
    expect(r.eom?.reply).toMatchObject({ rcode: '554', xcode: '5.3.0' });
    await c.close();
  });

  it('does not let a failed no-reply step pass the message silently', async () => {
    const p = await startMilter({ noreply: ['header'], throwIn: 'header' });
    const c = await MilterClient.connect(p.spec);
    const r = await c.sendMessage(MESSAGE);
    expect(r.headers[0].status).toBe('noreply');
    expect(['tempfail']).toContain(r.decision);
    await c.close();
  });

  it('survives a storm of throwing handlers', async () => {
    const p = await startMilter({ throwIn: 'header' });
    const clients = await Promise.all(Array.from({ length: 20 }, () => MilterClient.connect(p.spec)));
    const rs = await Promise.all(clients.map((c) => c.sendMessage(MESSAGE)));
    expect(rs.every((r) => r.decision === 'tempfail')).toBe(true);
    await Promise.all(clients.map((c) => c.close()));
    expect(p.hasExited).toBe(false);
  });
});

describe('deadlines', () => {
  it('answers TEMPFAIL when eom misses its deadline, sending progress meanwhile, and ignores the late answer', async () => {
    const p = await startMilter({ callbacks: ['eom'], eomSleep: 1500, deadline: { eom: 900 }, progressInterval: 250, eomActions: [['addheader', 'X-Late', 'x']] });
    const c = await MilterClient.connect(p.spec);
    const r = await c.sendMessage(MESSAGE);
    expect(r.decision).toBe('tempfail');
    expect(r.eom?.reply?.rcode).toBe('451');
    expect(r.eom?.progress).toBeGreaterThanOrEqual(2);
    expect(r.actions).toHaveLength(0);
    const late = (await waitEvent(p, 'eom-actions', 3000)).results as unknown[][];
    expect(late[0].slice(0, 2)).toEqual(['addheader', 'ActionNotAllowedError']);
    // The session still works after the late answer.
    const r2 = await c.sendMessage({ ...MESSAGE, client: null, helo: null });
    expect(r2.decision).toBe('tempfail');
    await c.close();
  });

  it('keeps a slow eom alive with progress when it finishes within the deadline', async () => {
    const p = await startMilter({ callbacks: ['eom'], eomSleep: 700, progressInterval: 200, eomActions: [['addheader', 'X-Slow', 'ok']] });
    const c = await MilterClient.connect(p.spec, { eomTimeout: 400 });
    const r = await c.sendMessage(MESSAGE);
    expect(r.decision).toBe('continue');
    expect(r.eom?.progress).toBeGreaterThanOrEqual(2);
    expect(r.actions).toHaveLength(1);
    await c.close();
  });
});

describe('signals, stop and drain', () => {
  it('leaves SIGHUP to Node: 200 SIGHUPs while mail flows, every message served', async () => {
    const p = await startMilter({ countSighup: true, callbacks: ['envfrom', 'eom'], eomActions: [['addheader', 'X-Hup', '1']] });
    let sent = 0;
    const storm = (async () => {
      for (let i = 0; i < 200; i++) {
        process.kill(p.pid, 'SIGHUP');
        sent++;
        await new Promise((r) => setTimeout(r, 2));
      }
    })();
    const c = await MilterClient.connect(p.spec);
    let ok = 0;
    const flow = (async () => {
      for (let i = 0; i < 60; i++) {
        const r = await c.sendMessage({ ...MESSAGE, client: i === 0 ? MESSAGE.client : null, helo: i === 0 ? MESSAGE.helo : null });
        if (r.decision === 'continue' && r.actions.length === 1) ok++;
      }
    })();
    await Promise.all([storm, flow]);
    await c.close();
    expect(sent).toBe(200);
    expect(ok).toBe(60);
    expect(p.hasExited).toBe(false);
    process.kill(p.pid, 'SIGTERM');
    const stopped = await waitEvent(p, 'stopped', 10_000);
    // Signals coalesce, so Node may count fewer than were sent, but libmilter took none.
    expect(stopped.hups).toBeGreaterThan(0);
    expect(events(p).some((e) => e.ev === 'main-rejected')).toBe(false);
  });

  it('stops without blocking and the process exits by itself', async () => {
    const p = await startMilter({ callbacks: ['eom'] });
    process.kill(p.pid, 'SIGTERM');
    const exit = await p.exited;
    expect(exit.code).toBe(0);
    expect(events(p).map((e) => e.ev)).toEqual(['ready', 'sigterm', 'main-resolved', 'stopped']);
    // smfi_stop alone waits for the listener's 5 s poll; stop() wakes it.
    expect(events(p).find((e) => e.ev === 'stopped')!.ms).toBeLessThan(2000);
  });

  it('drains: an open session finishes its slow eom, a new one is refused with TEMPFAIL', async () => {
    const p = await startMilter({ callbacks: ['connect', 'eom'], eomSleep: 1200, onSigterm: 'drain:5000', eomActions: [['addheader', 'X-Drained', 'yes']] });
    const c1 = await MilterClient.connect(p.spec);
    const inflight = c1.sendMessage(MESSAGE);
    await p.waitForOutput('"ev":"eom"');
    process.kill(p.pid, 'SIGTERM');
    await waitEvent(p, 'sigterm');
    const c2 = await MilterClient.connect(p.spec);
    const refused = await c2.connect('late.example', 'inet', '192.0.2.9', 1);
    expect(refused.status).toBe('tempfail');
    expect(refused.reply?.rcode).toBe('421');
    await c2.close();
    const r = await inflight;
    expect(r.decision).toBe('continue');
    expect(r.actions).toHaveLength(1);
    await c1.quit();
    const exit = await p.exited;
    expect(exit.code).toBe(0);
    const stopped = events(p).find((e) => e.ev === 'stopped')!;
    expect((stopped.diag as { drainRefused: number }).drainRefused).toBe(1);
  });

  it('stopAccepting() on a socket shared with another process: new connections wait in the queue for it, the open session is answered, stop() settles at once', async () => {
    const p = await startFixtureMilter(HANDOFF, { drain: 5000 });
    await waitEvent(p, 'ready');
    expect(events(p).find((e) => e.ev === 'ready')!.early).toBe('MilterStateError: stopAccepting() before main(): the milter is not running');
    const c1 = await MilterClient.connect(p.spec);
    expect((await c1.connect('open.example', 'inet', '192.0.2.1', 1)).status).toBe('continue');
    process.kill(p.pid, 'SIGUSR2');
    const stopped = await waitEvent(p, 'accepting-stopped');
    expect((stopped.diag as { acceptingStopped: boolean }).acceptingStopped).toBe(true);
    // libmilter now polls another socket, a unix one nobody can reach: its
    // path is gone, so a local client cannot connect to it.
    expect(stopped.now).not.toBe(stopped.before);
    expect(stopped.path).toMatch(/^\/.*\/nodemilter-[^/]+\/s$/);
    const reach = net.connect(stopped.path as string);
    await expect(new Promise((resolve, reject) => reach.once('connect', resolve).once('error', reject))).rejects.toThrow(/ENOENT/);

    // The kernel completes the TCP handshake (the socket still listens), but
    // this process does not accept: the negotiation gets no answer.
    const t0 = Date.now();
    const late = MilterClient.connect(p.spec, { timeout: 20_000 }).then(
      (c) => ({ answered: true as const, c }),
      (err: Error) => ({ answered: false as const, err }),
    );
    let settled = false;
    void late.then(() => (settled = true));
    await new Promise((r) => setTimeout(r, 1500));
    expect(settled).toBe(false);

    // The session this process already has is served in full meanwhile.
    const r = await c1.sendMessage({ ...MESSAGE, client: null });
    expect(r.decision).toBe('continue');
    expect(r.actions).toEqual([expect.objectContaining({ type: 'addheader', name: 'X-Handoff' })]);
    expect(settled).toBe(false);
    expect(events(p).filter((e) => e.ev === 'connect').map((e) => e.host)).toEqual(['open.example']);

    // The other process holding the socket accepts the waiting connection,
    // with the negotiation the client sent (SMFIC_OPTNEG: 17 bytes) still in it.
    process.kill(p.pid, 'SIGUSR2');
    const other = await waitEvent(p, 'other-accepted', 5000);
    expect(other.bytes).toBe(17);
    const lr = await late;
    expect(lr.answered).toBe(false);
    expect(Date.now() - t0).toBeGreaterThan(1500);

    await c1.quit();
    await waitEvent(p, 'close');
    process.kill(p.pid, 'SIGTERM');
    const done = await waitEvent(p, 'stopped', 10_000);
    // No session refused (none arrived), and the listener's 5 s poll was
    // woken: no connection can do that once this process stopped accepting.
    expect((done.diag as { drainRefused: number }).drainRefused).toBe(0);
    expect((done.diag as { wakeSignal: string }).wakeSignal).toBe('SIGRTMIN+4');
    expect(done.ms).toBeLessThan(2000);
    expect((await p.exited).code).toBe(0);
    expect(events(p).some((e) => e.ev === 'main-rejected')).toBe(false);
  });

  it('when something else handles SIGRTMIN+4, stop() wakes the listener with the next free real-time signal: still at once after stopAccepting()', async () => {
    const shim = await buildC(path.join(__dirname, 'fixtures', 'c', 'rtsig-shim.c'), { cflags: ['-shared', '-fPIC'], libs: [] });
    const p = await startFixtureMilter(HANDOFF, { drain: 5000 }, { env: { LD_PRELOAD: [process.env.NODEMILTER_CHILD_PRELOAD, shim].filter(Boolean).join(' ') } });
    await waitEvent(p, 'ready');
    process.kill(p.pid, 'SIGUSR2');
    const stopped = await waitEvent(p, 'accepting-stopped');
    expect((stopped.diag as { wakeSignal: string }).wakeSignal).toBe('SIGRTMIN+5');
    process.kill(p.pid, 'SIGTERM');
    const done = await waitEvent(p, 'stopped', 10_000);
    // Only the signal can end libmilter's 5 s poll once this process stopped accepting.
    expect(done.ms).toBeLessThan(2000);
    expect((await p.exited).code).toBe(0);
  });

  it('exits cleanly with process.exit() while callbacks are pending', async () => {
    const p = await startMilter({ exitInEom: 3, async: 50 });
    const clients = await Promise.all(Array.from({ length: 5 }, () => MilterClient.connect(p.spec, { timeout: 3000 })));
    const rs = await Promise.allSettled(clients.map((c) => c.sendMessage(MESSAGE)));
    const exit = await p.exited;
    expect(exit).toEqual({ code: 3, signal: null });
    expect(rs.some((r) => r.status === 'rejected')).toBe(true);
    expect(p.stderr).not.toMatch(/Assertion|Segmentation|core dumped|FATAL/i);
  });
});
