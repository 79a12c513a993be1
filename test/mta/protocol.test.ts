/**
 * nodemilter/mta against scripted milters (test/mta/fake-milter.ts): what
 * goes on the wire (protocol version masks, macros per stage and a milter's
 * own macro lists, SKIP, the MTA's Received header kept from the milters)
 * and how each answer maps to the chain's verdict (accept for a message or a
 * session, discard, shutdown, replycode, a protocol violation).
 */
import { afterEach, describe, expect, it } from 'vitest';
import { Milters, MilterConnection, PROTOCOL_MASKS, resolveMilterOptions } from '../../src/mta';
import { InvalidArgumentError, ProtocolError } from '../../src/errors';
import { fakeMilter, packet, politeExcept, type Fake } from './fake-milter';

const fakes: Fake[] = [];
afterEach(async () => {
  await Promise.all(fakes.splice(0).map((f) => f.close()));
});

async function fake(...args: Parameters<typeof fakeMilter>): Promise<Fake> {
  const f = await fakeMilter(...args);
  fakes.push(f);
  return f;
}

/** A whole transaction through `milters`; returns the message outcome. */
async function transaction(milters: Milters, msg = 'Subject: s\r\nFrom: a@example.com\r\n\r\nbody\r\n') {
  const s = await milters.session({ address: '192.0.2.9', port: 25000, hostname: 'c.example.net' }, { j: 'mx.example.org', v: 'test' });
  const verdicts = [await s.connect(), await s.helo('c.example.net')];
  s.macros.i = 'Q1';
  verdicts.push(await s.mail('<a@example.com>'), await s.rcpt('<b@example.org>'));
  const out = await s.message(msg, [{ name: 'Received', value: 'from c.example.net by mx.example.org' }]);
  return { s, verdicts, out };
}

/** Wait (up to 2 s) until `cond` holds; the fake milter reads what was written asynchronously. */
async function until(cond: () => boolean): Promise<void> {
  const end = Date.now() + 2000;
  while (!cond()) {
    if (Date.now() > end) throw new Error(`not within 2 s: ${cond}`);
    await new Promise((r) => setTimeout(r, 10));
  }
}

const macroPackets = (f: Fake) =>
  f.packets
    .filter((p) => p.cmd === 'D')
    .map((p) => {
      const parts = p.data.subarray(1).toString('latin1').split('\0');
      const o: Record<string, string> = {};
      for (let i = 0; i + 1 < parts.length; i += 2) o[parts[i]] = parts[i + 1];
      return { stage: String.fromCharCode(p.data[0]), macros: o };
    });

describe('the wire', () => {
  it('protocol 2 offers only version 2 actions and steps; a version above the offer is refused', async () => {
    const f = await fake(politeExcept(''), { version: 2, actions: 0x3f, steps: 0 });
    const milters = new Milters([{ socket: f.spec, protocol: 2 }]);
    const { s, out } = await transaction(milters);
    expect(out.verdict.action).toBe('continue');
    await s.close();
    const opt = f.packets.find((p) => p.cmd === 'O')!.data;
    expect([opt.readUInt32BE(0), opt.readUInt32BE(4), opt.readUInt32BE(8)]).toEqual([2, PROTOCOL_MASKS[2].actions, PROTOCOL_MASKS[2].steps]);
    // version 2 has no DATA command (it came with version 4)
    expect(f.commands).not.toContain('T');
    expect(f.commands).toContain('E');

    const high = await fake(politeExcept(''), { version: 7 });
    await expect(MilterConnection.connect(high.spec, { timeout: 2000 })).rejects.toThrow(/protocol version 7, expected 2..6/);
    await expect(MilterConnection.connect(high.spec, { timeout: 2000 })).rejects.toBeInstanceOf(ProtocolError);
  });

  it('macros: Postfix defaults per stage, only those with a value; a milter\'s own list wins for its stage', async () => {
    const f = await fake(politeExcept(''), { symlists: { 2: '{mail_addr} {client_addr}' } });
    const milters = new Milters([{ socket: f.spec, macros: { rcpt: ['{rcpt_addr}', 'j'] } }]);
    const { s } = await transaction(milters);
    await s.close();
    const m = macroPackets(f);
    expect(m.find((x) => x.stage === 'C')!.macros).toEqual({ j: 'mx.example.org', v: 'test', _: 'c.example.net [192.0.2.9]' });
    expect(m.find((x) => x.stage === 'M')!.macros).toEqual({ '{mail_addr}': 'a@example.com', '{client_addr}': '192.0.2.9' });
    expect(m.find((x) => x.stage === 'R')!.macros).toEqual({ '{rcpt_addr}': 'b@example.org', j: 'mx.example.org' });
    expect(m.find((x) => x.stage === 'E')!.macros).toEqual({ i: 'Q1' });
    // no helo macro has a value (no TLS): no SMFIC_MACRO for HELO
    expect(m.find((x) => x.stage === 'H')).toBeUndefined();
  });

  it('the prepended Received header is not sent; headers and the body arrive as Postfix sends them', async () => {
    const f = await fake(politeExcept(''));
    const milters = new Milters([f.spec]);
    const { s } = await transaction(milters, 'Subject:  two spaces\r\nX-F: a\r\n\tb\r\n\r\nline\n');
    await s.close();
    const headers = f.packets.filter((p) => p.cmd === 'L').map((p) => p.data.toString('latin1'));
    expect(headers).toEqual(['Subject\0 two spaces\0', 'X-F\0a\n\tb\0']);
    expect(f.packets.filter((p) => p.cmd === 'B').map((p) => p.data.toString('latin1'))).toEqual(['line\r\n']);
  });

  it('SKIP ends the body for that milter only; the message goes on', async () => {
    const skipper = await fake((cmd) => ('DAKQ'.includes(cmd) ? undefined : cmd === 'B' ? packet('s') : packet('c')));
    const next = await fake(politeExcept(''));
    const milters = new Milters([skipper.spec, next.spec]);
    const body = 'y'.repeat(70_000) + '\r\n' + 'z'.repeat(70_000) + '\r\n';
    const { s, out } = await transaction(milters, `Subject: big\r\n\r\n${body}`);
    expect(out.verdict.action).toBe('continue');
    await s.close();
    expect(skipper.commands.filter((c) => c === 'B')).toHaveLength(1);
    expect(next.commands.filter((c) => c === 'B')).toHaveLength(3);
    expect(next.packets.filter((p) => p.cmd === 'B').reduce((n, p) => n + p.data.length, 0)).toBe(body.length);
  });
});

describe('answers and verdicts', () => {
  it('accept at MAIL takes the milter out for this message only; the next message includes it again', async () => {
    let mails = 0;
    const f = await fake((cmd) => ('DAKQ'.includes(cmd) ? undefined : cmd === 'M' && ++mails === 1 ? packet('a') : packet('c')));
    const milters = new Milters([f.spec]);
    const { s, out } = await transaction(milters);
    expect(out.verdict.action).toBe('continue');
    expect(out.edits).toEqual([]);
    expect(f.commands.filter((c) => 'TLNBE'.includes(c))).toEqual([]);
    await s.mail('<a2@example.com>');
    await s.rcpt('<b@example.org>');
    const out2 = await s.message('Subject: 2\r\n\r\nx\r\n');
    expect(out2.edits).toHaveLength(1);
    // only the second message reached end of message (the first one's would have arrived before it)
    await until(() => f.commands.includes('E'));
    expect(f.commands.filter((c) => c === 'E')).toHaveLength(1);
    await s.close();
  });

  it('accept at CONNECT takes the milter out for the session', async () => {
    const f = await fake((cmd) => ('DAKQ'.includes(cmd) ? undefined : cmd === 'C' ? packet('a') : packet('c')));
    const milters = new Milters([f.spec]);
    const { s, out } = await transaction(milters);
    expect(out.verdict.action).toBe('continue');
    expect(s.states[0].state).toBe('accepted');
    expect(f.commands.filter((c) => c !== 'O' && c !== 'D')).toEqual(['C']);
    await s.close();
  });

  it('discard at RCPT: later recipients are accepted, the message is dropped without reaching any milter', async () => {
    const f = await fake((cmd, data) => ('DAKQ'.includes(cmd) ? undefined : cmd === 'R' && data.toString().startsWith('<spam') ? packet('d') : packet('c')));
    const next = await fake(politeExcept(''));
    const milters = new Milters([f.spec, next.spec]);
    const s = await milters.session();
    await s.connect();
    await s.helo('h');
    await s.mail('<a@example.com>');
    expect((await s.rcpt('<ok@example.org>')).action).toBe('continue');
    expect((await s.rcpt('<spam@example.org>')).action).toBe('discard');
    expect((await s.rcpt('<later@example.org>')).action).toBe('discard');
    const out = await s.message('Subject: x\r\n\r\nbody\r\n');
    expect(out.verdict.action).toBe('discard');
    expect(out.envelope.recipients.map((r) => r.address)).toEqual(['<ok@example.org>', '<spam@example.org>', '<later@example.org>']);
    for (const m of [f, next]) expect(m.commands.filter((c) => 'TLNBE'.includes(c))).toEqual([]);
    await until(() => f.commands.includes('A'));
    // the next message is not discarded
    await s.mail('<b@example.com>');
    await s.rcpt('<ok@example.org>');
    expect((await s.message('Subject: y\r\n\r\nbody\r\n')).verdict.action).toBe('continue');
    await until(() => next.commands.includes('E'));
    for (const m of [f, next]) expect(m.commands.filter((c) => c === 'T' || c === 'E')).toEqual(['T', 'E']);
    await s.close();
  });

  it('discard, shutdown and a replycode at end of message', async () => {
    for (const [answer, want] of [
      [packet('d'), { action: 'discard', reply: { code: 250 } }],
      [packet('4'), { action: 'shutdown', reply: { code: 421, xcode: '4.7.0' } }],
      [packet('y', '452 4.2.2 mailbox full\0'), { action: 'tempfail', reply: { code: 452, xcode: '4.2.2', lines: ['mailbox full'] } }],
      [packet('y', '554-5.7.1 first\r\n554 5.7.1 second\0'), { action: 'reject', reply: { code: 554, xcode: '5.7.1', lines: ['first', 'second'] } }],
    ] as const) {
      const f = await fake((cmd) => ('DAKQ'.includes(cmd) ? undefined : cmd === 'E' ? answer : packet('c')));
      const milters = new Milters([{ socket: f.spec, name: 'm' }]);
      const { s, out } = await transaction(milters);
      expect(out.verdict).toMatchObject({ ...want, milter: 'm' });
      await s.close();
    }
  });

  it('modifications and a quarantine at end of message land in the outcome; delrcpt ignores brackets, not case', async () => {
    const eom = Buffer.concat([
      packet('h', 'X-A\0one\0'),
      packet('+', '<new@example.net>\0'),
      packet('-', 'b@example.org\0'),
      packet('-', '<NEW@example.net>\0'),
      packet('e', '<bounce@example.com>\0SIZE=10\0'),
      packet('b', 'new body\r\n'),
      packet('q', 'held\0'),
      packet('p'),
      packet('c'),
    ]);
    const f = await fake((cmd) => ('DAKQ'.includes(cmd) ? undefined : cmd === 'E' ? eom : packet('c')));
    const milters = new Milters([f.spec]);
    const { s, out } = await transaction(milters);
    expect(out.verdict.action).toBe('continue');
    expect(out.quarantine).toEqual(['held']);
    expect(out.envelope).toEqual({ sender: '<bounce@example.com>', senderParams: ['SIZE=10'], recipients: [{ address: '<new@example.net>', params: [] }] });
    expect((await out.toBuffer()).toString()).toBe('Received: from c.example.net by mx.example.org\r\nSubject: s\r\nFrom: a@example.com\r\nX-A: one\r\n\r\nnew body\r\n');
    await s.close();
  });

  it('a milter that sends an oversize packet gets its default action, and its connection is dropped', async () => {
    const huge = Buffer.alloc(5);
    huge.writeUInt32BE(10_000_000, 0);
    huge[4] = 0x63;
    const f = await fake((cmd) => ('DAKQ'.includes(cmd) ? undefined : cmd === 'R' ? huge : packet('c')));
    const milters = new Milters([{ socket: f.spec, defaultAction: 'tempfail' }]);
    const s = await milters.session();
    await s.connect();
    await s.helo('h');
    await s.mail('<a@example.com>');
    const v = await s.rcpt('<b@example.org>');
    expect(v.action).toBe('tempfail');
    expect(v.error).toBeInstanceOf(ProtocolError);
    expect((v.error as ProtocolError).reason).toBe('oversize');
    await s.close();
  });
});

describe('bounds', () => {
  it('a replacement body over maxReplacedBody is a failure: default action, connection closed, memory bounded', async () => {
    const chunk = packet('b', Buffer.alloc(60_000, 0x41));
    const f = await fake((cmd) => ('DAKQ'.includes(cmd) ? undefined : cmd === 'E' ? Buffer.concat([chunk, chunk, chunk, packet('c')]) : packet('c')));
    const milters = new Milters([{ socket: f.spec, maxReplacedBody: 100_000, defaultAction: 'tempfail' }]);
    const { s, out } = await transaction(milters);
    expect(out.verdict.action).toBe('tempfail');
    expect(out.verdict.error).toBeInstanceOf(ProtocolError);
    expect(out.verdict.error?.message).toMatch(/longer than maxReplacedBody \(100000 bytes\)/);
    await s.close();
    // within the bound it goes through
    const ok = new Milters([{ socket: f.spec, maxReplacedBody: 180_000 }]);
    const r = await transaction(ok);
    expect(r.out.verdict.action).toBe('continue');
    expect(r.out.body.length).toBe(180_000);
    await r.s.close();
  });
});

describe('a milter that never negotiates', () => {
  it('is bounded by commandTimeout and gets its default action at CONNECT', async () => {
    const f = await fake(politeExcept(''), { silent: true });
    const milters = new Milters([{ socket: f.spec, commandTimeout: 300, defaultAction: 'reject' }]);
    const t0 = Date.now();
    const s = await milters.session();
    const v = await s.connect();
    expect(Date.now() - t0).toBeGreaterThanOrEqual(290);
    expect(Date.now() - t0).toBeLessThan(5000);
    expect(v).toMatchObject({ action: 'reject', reply: { code: 550, xcode: '5.7.1' } });
    expect(v.error?.message).toMatch(/within 300 ms/);
    expect(milters.pools[0].stats).toMatchObject({ open: 0, busy: 0 });
    await s.close();
  });
});

describe('options', () => {
  it('refuses bad options with the option named', () => {
    expect(() => resolveMilterOptions({ socket: '' })).toThrow(InvalidArgumentError);
    expect(() => resolveMilterOptions({ socket: 'inet:1@h', commandTimeout: -1 })).toThrow(/commandTimeout/);
    expect(() => resolveMilterOptions({ socket: 'inet:1@h', defaultAction: 'drop' as never })).toThrow(/defaultAction/);
    expect(() => resolveMilterOptions({ socket: 'inet:1@h', protocol: 5 as never })).toThrow(/protocol must be 2, 3, 4 or 6/);
    expect(() => resolveMilterOptions({ socket: 'inet:1@h', macros: { helo2: [] } as never })).toThrow(/unknown macro stage "helo2"/);
    expect(() => resolveMilterOptions({ socket: 'inet:1@h', maxConnections: 0 })).toThrow(/maxConnections/);
    expect(resolveMilterOptions('inet:1@h')).toMatchObject({ connectTimeout: 30_000, commandTimeout: 30_000, contentTimeout: 300_000, defaultAction: 'tempfail', protocol: 6 });
  });
});
