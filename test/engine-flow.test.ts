// Flow control on the TypeScript engine (issue 17), the quick cases in
// process: framing that stays linear under a backlog, frames built without
// temporaries, the output cap, an honest drain, half-close, and connections
// that trickle or never negotiate. The memory-heavy floods and stalls run
// in test/reliability/pressure.test.ts, admission under load in
// test/reliability/admission.test.ts.
import { afterEach, describe, expect, it } from 'vitest';

import { Base } from '../src/base';
import * as C from '../src/constants';
import { serve, type MilterServer } from '../src/engine';
import { FrameReader, FrameWriter, OUT_BLOCK, OUT_FIRST_BLOCK, Rep, cstr, frame as buildFrame, u32 } from '../src/engine/protocol';
import { MilterClient } from '../src/testing/client';
import { MilterMetrics } from '../src/metrics';
import { runmilter } from '../src/runmilter';
import type { Callbacks } from '../src/types';
import { RawMta, frame, optneg, preamble } from './reliability/rawmta';
import { tmpSocketSpec } from './helpers';

const servers: MilterServer[] = [];
const mtas: RawMta[] = [];
const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));
const MiB = 1024 * 1024;

afterEach(async () => {
  for (const m of mtas.splice(0)) m.sock.destroy();
  await Promise.all(servers.splice(0).map((s) => s.close()));
});

async function start(callbacks: Callbacks, opts: Partial<Parameters<typeof serve>[1]> = {}, extra = {}): Promise<MilterServer> {
  const s = await serve({ name: 'flow', callbacks, ...extra }, { socket: tmpSocketSpec(), ...opts });
  servers.push(s);
  return s;
}

async function mta(s: MilterServer): Promise<RawMta> {
  const m = await RawMta.open(s.options.socket);
  mtas.push(m);
  return m;
}

async function negotiated(s: MilterServer): Promise<RawMta> {
  const m = await mta(s);
  m.sock.write(optneg());
  await m.until(() => (m.count.O ?? 0) === 1, 5000, 'the negotiation reply');
  return m;
}

describe('FrameReader', () => {
  it('cuts frames split at every byte, and frames across chunks are copied once into buffers of their own', () => {
    const frames = [frame('B', Buffer.alloc(65535, 1)), frame('N'), frame('L', 'Subject\0x\0'), frame('B', Buffer.alloc(65535, 2))];
    const all = Buffer.concat(frames);
    const r = new FrameReader();
    const got: { cmd: number; len: number; owned: boolean }[] = [];
    for (let i = 0; i < all.length; i += 7) {
      r.push(all.subarray(i, Math.min(all.length, i + 7)));
      for (let f = r.next(); f; f = r.next()) {
        if ('tooBig' in f) throw new Error('tooBig');
        got.push({ cmd: f.cmd, len: f.data.length, owned: f.owned });
      }
    }
    expect(got.map((g) => [String.fromCharCode(g.cmd), g.len])).toEqual([['B', 65535], ['N', 0], ['L', 10], ['B', 65535]]);
    expect(got.filter((g) => g.len > 7).every((g) => g.owned)).toBe(true);
    expect(r.buffered).toBe(0);
    // Inside one chunk a frame is a view, not a copy.
    r.push(Buffer.concat(frames));
    const f = r.next();
    expect(f && !('tooBig' in f) && f.owned).toBe(false);
  });

  it('takes linear time over a 64 MiB backlog of frames that straddle reads (no concat of the backlog per frame)', () => {
    const body = frame('B', Buffer.alloc(65535, 3));
    const r = new FrameReader();
    // Reads of 64 KiB - 1: every frame straddles two of them.
    const stream = Buffer.concat(Array.from({ length: 64 }, () => body));
    for (let k = 0; k < 16; k++) for (let i = 0; i < stream.length; i += 65535) r.push(stream.subarray(i, Math.min(stream.length, i + 65535)));
    expect(r.buffered).toBeGreaterThan(64 * MiB);
    const t0 = performance.now();
    let n = 0;
    for (let f = r.next(); f; f = r.next()) n++;
    const ms = performance.now() - t0;
    expect(n).toBe(1024);
    // The old reader concatenated the backlog for every frame: ~40 ms per frame at this size.
    expect(ms).toBeLessThan(1500);
  });

  it('reports a frame larger than the limit as soon as its length is read', () => {
    const r = new FrameReader();
    const head = Buffer.alloc(5);
    head.writeUInt32BE(70_000, 0);
    r.push(head);
    expect(r.next()).toEqual({ tooBig: 69_999 });
  });
});

describe('FrameWriter', () => {
  it('builds the same bytes as frame/cstr/u32, small frames into one buffer, large data by reference', () => {
    const w = new FrameWriter();
    w.empty(Rep.CONTINUE);
    w.strings(Rep.ADDHEADER, undefined, 'X-Ä', Buffer.from('v\xe9', 'latin1'));
    w.strings(Rep.INSHEADER, 3, 'Name', 'value');
    w.raw(Rep.REPLYCODE, Buffer.from('451 4.3.0 later'), true);
    w.words(Rep.OPTNEG, 6, 0x1ff, 0xffffffff);
    const big = Buffer.alloc(65535, 0x61);
    w.raw(Rep.REPLBODY, big);
    const expected = Buffer.concat([
      buildFrame(Rep.CONTINUE),
      buildFrame(Rep.ADDHEADER, cstr('X-Ä'), cstr(Buffer.from('v\xe9', 'latin1'))),
      buildFrame(Rep.INSHEADER, u32(3), cstr('Name'), cstr('value')),
      buildFrame(Rep.REPLYCODE, Buffer.from('451 4.3.0 later'), Buffer.from([0])),
      buildFrame(Rep.OPTNEG, u32(6), u32(0x1ff), u32(0xffffffff)),
      buildFrame(Rep.REPLBODY, big),
    ]);
    expect(w.pending).toBe(expected.length);
    const out = w.take();
    expect(Buffer.concat(out).equals(expected)).toBe(true);
    expect(out.length).toBe(2);
    expect(out[1]).toBe(big);
    expect(w.pending).toBe(0);
    expect(w.take()).toEqual([]);
  });

  it('takes its first block from the shared pool, not an ArrayBuffer of its own, and runs past it into blocks of its own intact', () => {
    const w = new FrameWriter();
    w.strings(Rep.ADDHEADER, undefined, 'X-Bench', 'node');
    w.empty(Rep.CONTINUE);
    const first = w.take();
    expect(first.length).toBe(1);
    // A slice of Node's 8 KiB pool: a connection that writes a few frames costs no external allocation.
    expect(first[0].buffer.byteLength).toBe(Buffer.poolSize);
    expect(Buffer.poolSize).toBeGreaterThan(OUT_FIRST_BLOCK);
    // Past the first block: 200 frames of 19 bytes (3,800 > 1,024) arrive whole and in order.
    const expected: Buffer[] = [];
    for (let i = 0; i < 200; i++) {
      const v = `v${String(i).padStart(3, '0')}`;
      w.strings(Rep.ADDHEADER, undefined, 'X-Number', v);
      expected.push(buildFrame(Rep.ADDHEADER, cstr('X-Number'), cstr(v)));
    }
    const out = w.take();
    expect(Buffer.concat(out).equals(Buffer.concat(expected))).toBe(true);
    expect(out.map((b) => b.buffer.byteLength)).toEqual([Buffer.poolSize, OUT_BLOCK]);
  });
});

/** A server whose eom replaces the body with 8 MiB, and an MTA that sent a message up to its EOM. */
async function replacingAtEom(opts: Partial<Parameters<typeof serve>[1]> = {}): Promise<{ s: MilterServer; m: RawMta }> {
  const s = await start({ eom: (ctx) => (ctx.replacebody(Buffer.alloc(8 * MiB, 0x62)), C.CONTINUE) }, opts);
  const m = await negotiated(s);
  m.sock.write(preamble());
  await m.until(() => (m.count.c ?? 0) >= 6, 5000, 'replies to the preamble');
  return { s, m };
}

describe('output', () => {
  it('refuses an action past maxOutputBytes with ERR_MILTER_OUTPUT_LIMIT; the exception policy answers', async () => {
    const errors: string[] = [];
    const s = await start({
      eom(ctx) {
        try {
          ctx.replacebody(Buffer.alloc(2 * MiB));
        } catch (e) {
          errors.push((e as { code: string }).code);
          throw e;
        }
        return C.CONTINUE;
      },
    }, { maxOutputBytes: MiB });
    s.on('handlerError', () => undefined);
    const c = await MilterClient.connect(s.options.socket);
    const r = await c.sendMessage({ from: '<a@x>', rcpt: ['<b@y>'], headers: [['Subject', 'x']], body: 'b\r\n' });
    expect(errors).toEqual(['ERR_MILTER_OUTPUT_LIMIT']);
    expect(r.eom.status).toBe('tempfail');
    expect(r.eom.actions).toEqual([]);
    expect(s.getdiag().outputLimited).toBe(1);
    c.destroy();
  });

  it('close({drain}) waits until a slow reader has all of a 8 MiB replacebody and the reply (slow is not stalled)', async () => {
    // writeTimeout 300 ms: a reader that takes a little every 20 ms makes progress and is not cut off.
    const { s, m } = await replacingAtEom({ writeTimeout: 300 });
    // The MTA reads a little every 20 ms: about 3 MiB/s.
    m.sock.pause();
    const reader = setInterval(() => {
      m.sock.resume();
      setImmediate(() => m.sock.pause());
    }, 20);
    try {
      m.sock.write(frame('E'));
      await m.until(() => (m.count.b ?? 0) > 0, 5000, 'the first replacebody frame');
      const t0 = Date.now();
      await s.close({ drain: 10_000 });
      const took = Date.now() - t0;
      // Everything was handed over when close resolved: the MTA gets it all, the reply last.
      await m.until(() => m.closed, 5000, 'the connection to close');
      console.log(`drain to a slow reader: close resolved after ${took} ms`);
      expect(m.count.b).toBe(Math.ceil((8 * MiB) / 65535));
      expect(m.frames[m.frames.length - 1].cmd).toBe('c');
      expect(m.count.c).toBe(7);
      expect(took).toBeGreaterThan(100);
      expect(took).toBeLessThan(10_000);
      expect(s.getdiag().writeStalls).toBe(0);
    } finally {
      clearInterval(reader);
    }
  });

  it('close({drain}) gives up on an MTA that does not read once the budget is over', async () => {
    const { s, m } = await replacingAtEom();
    m.sock.pause();
    m.sock.write(frame('E'));
    await sleep(100);
    const t0 = Date.now();
    await s.close({ drain: 400 });
    const took = Date.now() - t0;
    expect(took).toBeGreaterThanOrEqual(350);
    expect(took).toBeLessThan(2000);
    m.sock.resume();
    await m.until(() => m.closed, 5000, 'the connection to close');
  });
});

describe('half-close', () => {
  it('answers the pending eom before ending when the MTA shuts down its side (100 of 100 rounds)', async () => {
    const s = await start({
      async eom(ctx) {
        await sleep(2);
        ctx.addheader('X-Half', 'closed');
        return C.CONTINUE;
      },
    });
    const errors: Error[] = [];
    s.on('handlerError', (e: Error) => errors.push(e));
    let answered = 0;
    for (let i = 0; i < 100; i++) {
      const m = await negotiated(s);
      m.sock.write(Buffer.concat([preamble(), frame('E')]));
      m.sock.end();
      await m.until(() => m.closed, 5000, 'the milter to close');
      if (m.frames.some((f) => f.cmd === 'h') && m.frames[m.frames.length - 1].cmd === 'c') answered++;
    }
    expect(errors).toEqual([]);
    expect(answered).toBe(100);
  });
});

describe('trickling and idle connections', () => {
  it('closes frames trickled a byte at a time within frameTimeout, and connections that never negotiate within negotiationTimeout', async () => {
    const s = await start({ connect: () => C.CONTINUE }, { frameTimeout: 800, negotiationTimeout: 500 });
    const trickle = await Promise.all(Array.from({ length: 50 }, () => negotiated(s)));
    const silent = await Promise.all(Array.from({ length: 20 }, () => mta(s)));
    // Each trickler sends a frame of 65,000 bytes, one byte every 50 ms: each byte is activity, none completes the frame.
    const head = Buffer.alloc(4);
    head.writeUInt32BE(65_000, 0);
    const t0 = Date.now();
    let i = 0;
    const dripper = setInterval(() => {
      for (const m of trickle) if (!m.closed) m.sock.write(i < 4 ? head.subarray(i, i + 1) : Buffer.from('B'));
      i++;
    }, 50);
    try {
      await Promise.all(trickle.map((m) => m.until(() => m.closed, 5000, 'a trickler to be closed')));
      const tookTrickle = Date.now() - t0;
      await Promise.all(silent.map((m) => m.until(() => m.closed, 5000, 'a silent connection to be closed')));
      expect(tookTrickle).toBeGreaterThanOrEqual(700);
      expect(tookTrickle).toBeLessThan(800 + 1000);
      expect(s.getdiag().frameTimeouts).toBe(50);
      expect(s.getdiag().negotiationTimeouts).toBe(20);
      for (let k = 0; k < 100 && s.connectionCount > 0; k++) await sleep(20);
      expect(s.connectionCount).toBe(0);
    } finally {
      clearInterval(dripper);
    }
  });

  it('does not count time the engine itself holds a frame (a slow handler) against frameTimeout', async () => {
    const seen: number[] = [];
    const s = await start({
      async body(_ctx, chunk) {
        seen.push(chunk.length);
        await sleep(150);
        return C.CONTINUE;
      },
    }, { frameTimeout: 100 });
    const m = await negotiated(s);
    // Five body frames pipelined behind the preamble, written in pieces that split frames.
    const all = Buffer.concat([preamble(), ...Array.from({ length: 5 }, () => frame('B', Buffer.alloc(40_000, 0x62))), frame('E')]);
    for (let i = 0; i < all.length; i += 30_000) m.sock.write(all.subarray(i, i + 30_000));
    await m.until(() => (m.count.c ?? 0) >= 12, 5000, 'every body chunk and the eom answered');
    expect(seen).toEqual([40_000, 40_000, 40_000, 40_000, 40_000]);
    expect(m.closed).toBe(false);
    expect(s.getdiag().frameTimeouts).toBe(0);
  });

  it('does not let macros alone keep a session past the session timeout', async () => {
    const s = await start({ connect: () => C.CONTINUE }, { timeout: 1 });
    const m = await negotiated(s);
    const t0 = Date.now();
    const macro = frame('D', Buffer.concat([Buffer.from('C'), Buffer.from('j\0mx\0')]));
    const drip = setInterval(() => m.sock.write(macro), 200);
    try {
      await m.until(() => m.closed, 5000, 'the session timeout');
      expect(Date.now() - t0).toBeLessThan(2500);
    } finally {
      clearInterval(drip);
    }
  });
});

describe('runmilter passes the bounds to the engine', () => {
  it("maxSessions and sessionCapAction 'close' on runmilter({ engine: 'node' })", async () => {
    const socket = tmpSocketSpec();
    let listening!: () => void;
    const ready = new Promise<void>((r) => (listening = r));
    const quiet = { info: () => undefined, warn: () => undefined, error: () => undefined };
    const done = runmilter('capped', socket, {
      factory: Base, engine: 'node', signals: ['SIGUSR2'], drain: 0, logger: quiet, onListening: () => listening(),
      maxSessions: 1, sessionCapAction: 'close', negotiationTimeout: 5000,
    });
    await ready;
    const first = await RawMta.open(socket);
    mtas.push(first);
    first.sock.write(optneg());
    await first.until(() => (first.count.O ?? 0) === 1, 5000, 'the negotiation reply');
    const second = await RawMta.open(socket);
    mtas.push(second);
    second.sock.write(optneg());
    await second.until(() => second.closed, 2000, 'the connection over the cap to be closed');
    expect(second.frames).toEqual([]);
    first.sock.destroy();
    process.emit('SIGUSR2', 'SIGUSR2');
    await done;
  });

  it('rejects a bad admission option before serving', async () => {
    await expect(runmilter('x', tmpSocketSpec(), { factory: Base, engine: 'node', maxSessions: -3 })).rejects.toThrow(/maxSessions must be a positive integer/);
  });
});

describe('counters', () => {
  it('reaches getdiag() and the Prometheus metrics', async () => {
    const s = await start({}, { maxSessions: 1, sessionCapAction: 'close', negotiationTimeout: 300 });
    const metrics = new MilterMetrics();
    metrics.setEngine(() => s.getdiag());
    await negotiated(s);
    const over = await mta(s);
    await over.until(() => over.closed, 2000, 'the connection over the cap to close');
    const quiet = await RawMta.open(s.options.socket);
    mtas.push(quiet);
    expect(s.getdiag()).toMatchObject({ sessionsRefused: 2, negotiationTimeouts: 0, frameTimeouts: 0, writeStalls: 0, outputLimited: 0, sessionsShed: 0 });
    const text = metrics.prometheus();
    expect(text).toContain('nodemilter_sessions_refused_total 2');
    expect(text).toContain('# TYPE nodemilter_write_stalls_total counter');
    expect(metrics.snapshot().engine).toMatchObject({ sessionsRefused: 2, fdExhausted: 0 });
  });

  it('counts a refused connection that negotiates and then says nothing as a negotiation timeout', async () => {
    const s = await start({}, { maxSessions: 1, negotiationTimeout: 300 });
    await negotiated(s);
    const refused = await negotiated(s);
    await refused.until(() => refused.closed, 2000, 'the refused connection to be closed');
    expect(s.getdiag()).toMatchObject({ sessionsRefused: 1, negotiationTimeouts: 1 });
  });
});
