// Per-message limits (register's `limits`, enforced by the engine-neutral
// dispatcher): past the header count, header bytes or body bytes the
// handler no longer sees the message and the MTA gets the policy's answer.
import { afterEach, describe, expect, it } from 'vitest';

import * as C from '../../src/constants';
import { DEFAULT_LIMITS, resolveLimits } from '../../src/engine/dispatch';
import { InvalidArgumentError } from '../../src/errors';
import * as milter from '../../src/milter';
import { MilterClient } from '../../src/testing/client';
import { stopAll } from '../helpers';
import { MESSAGE, lines, startMilter, stats } from './lib';

afterEach(() => stopAll());

const headers = (n: number, value = 'v') => Array.from({ length: n }, (_, i) => [`X-H${i}`, value] as [string, string]);

describe('limits', () => {
  it('has safe defaults and refuses bad values with a typed error naming them', () => {
    expect(resolveLimits(undefined)).toEqual(DEFAULT_LIMITS);
    expect(DEFAULT_LIMITS.maxHeaders).toBe(10_000);
    expect(DEFAULT_LIMITS.maxHeaderBytes).toBe(8 * 1024 * 1024);
    expect(resolveLimits({ maxBodyBytes: 1000, status: C.TEMPFAIL })).toMatchObject({ maxBodyBytes: 1000, status: C.TEMPFAIL, maxHeaders: 10_000 });
    expect(() => resolveLimits({ maxHeaders: 0 })).toThrow(InvalidArgumentError);
    expect(() => resolveLimits({ maxHeaders: 1.5 })).toThrow(/limits.maxHeaders must be a positive integer/);
    expect(() => resolveLimits({ maxBodyBytes: -1 })).toThrow(/maxBodyBytes/);
    expect(() => resolveLimits({ status: C.ACCEPT })).toThrow(/limits.status must be REJECT or TEMPFAIL, got ACCEPT/);
    expect(() => milter.register('x', {}, { limits: { maxHeaderBytes: Number.NaN } })).toThrow(InvalidArgumentError);
  });

});

describe.each(['libmilter', 'node'] as const)('limits, %s engine', (engine) => {
  it('maxHeaders: the header past the limit is rejected 552 5.3.4 and never reaches the handler; the next message starts again', async () => {
    const m = await startMilter({ engine, limits: { maxHeaders: 5 } });
    const c = await MilterClient.connect(m.spec);
    const r = await c.sendMessage({ ...MESSAGE, headers: headers(10) });
    expect(r.decision).toBe('reject');
    expect(r.stoppedAt).toBe('header');
    expect(r.headers).toHaveLength(6);
    const last = r.headers[5];
    expect(last.reply?.rcode).toBe('552');
    expect(last.reply?.xcode).toBe('5.3.4');
    expect(last.reply?.text).toMatch(/Too many header fields.*5/);
    // Same connection, a new message within the limit passes.
    const r2 = await c.sendMessage({ ...MESSAGE, client: undefined, helo: undefined, headers: headers(5) });
    expect(r2.decision).toBe('continue');
    c.destroy();
    const s = await stats(m);
    expect(s.counts.headers).toBe(10);
    expect(s.counts.limitExceeded).toBe(1);
    expect(lines(m).find((l) => l.ev === 'limitExceeded')).toMatchObject({ limit: 'maxHeaders', value: 5 });
  }, 30_000);

  it('maxHeaderBytes and maxBodyBytes with TEMPFAIL: 452 4.3.4, the handler saw at most the limit', async () => {
    const m = await startMilter({ engine, limits: { maxHeaderBytes: 1000, maxBodyBytes: 100_000, status: C.TEMPFAIL } });
    const c1 = await MilterClient.connect(m.spec);
    const r1 = await c1.sendMessage({ ...MESSAGE, headers: [['Subject', 'x'.repeat(2000)]] });
    c1.destroy();
    expect(r1.decision).toBe('tempfail');
    expect(r1.headers[0].reply?.rcode).toBe('452');
    expect(r1.headers[0].reply?.xcode).toBe('4.3.4');
    expect(r1.headers[0].reply?.text).toMatch(/header too large/);
    const c2 = await MilterClient.connect(m.spec);
    const r2 = await c2.sendMessage({ ...MESSAGE, body: 'y'.repeat(300_000) });
    c2.destroy();
    expect(r2.decision).toBe('tempfail');
    expect(r2.stoppedAt).toBe('body');
    expect(r2.body?.reply?.rcode).toBe('452');
    const s = await stats(m);
    expect(s.counts.bodyBytes).toBeGreaterThan(0);
    expect(s.counts.bodyBytes).toBeLessThanOrEqual(100_000);
    // The first message's one header was past the limit; the second's three were not.
    expect(s.counts.headers).toBe(MESSAGE.headers.length);
  }, 30_000);

  it('a no-reply header past the limit is answered at the next step the MTA waits for (end of headers)', async () => {
    const m = await startMilter({ engine, limits: { maxHeaders: 3 }, noreply: ['header'] });
    const c = await MilterClient.connect(m.spec);
    const r = await c.sendMessage({ ...MESSAGE, headers: headers(8) });
    c.destroy();
    expect(r.decision).toBe('reject');
    expect(r.stoppedAt).toBe('eoh');
    expect(r.eoh?.reply?.rcode).toBe('552');
    const s = await stats(m);
    expect(s.counts.headers).toBe(3);
  }, 30_000);

  it('a flood of 50 000 headers is cut at the default limit, and the milter stays small', async () => {
    const m = await startMilter({ engine, quiet: true });
    const c = await MilterClient.connect(m.spec, { timeout: 60_000 });
    const r = await c.sendMessage({ ...MESSAGE, headers: headers(50_000, 'z'.repeat(100)) });
    c.destroy();
    expect(r.decision).toBe('reject');
    expect(r.headers).toHaveLength(10_001);
    const s = await stats(m);
    expect(s.counts.headers).toBe(10_000);
    expect(s.rss).toBeLessThan(200 * 2 ** 20);
  }, 60_000);
});
