/**
 * nodemilter/metrics: the counters as a unit (instrumented callbacks called
 * directly), then over the wire on libmilter: the metrics example scraped
 * over HTTP after real milter sessions, and a runmilter milter with pino as
 * its logger whose handler misses its deadline or throws.
 */
import * as fs from 'node:fs';
import * as http from 'node:http';
import * as os from 'node:os';
import * as path from 'node:path';
import { afterEach, describe, expect, it } from 'vitest';

import * as C from '../src/constants';
import { InvalidArgumentError } from '../src/errors';
import { MilterMetrics } from '../src/metrics';
import { MilterClient } from '../src/testing';
import type { MilterContext } from '../src/types';
import { freeInetSpec, freePort, startProcess, stopAll } from './helpers';

const DIST = path.resolve(__dirname, '..', 'dist');

afterEach(() => stopAll());

function scrape(port: number): Promise<{ status: number; type: string; body: string }> {
  return new Promise((resolve, reject) => {
    http
      .get({ host: '127.0.0.1', port, path: '/metrics' }, (res) => {
        let body = '';
        res.setEncoding('utf8');
        res.on('data', (d: string) => (body += d));
        res.on('end', () => resolve({ status: res.statusCode ?? 0, type: String(res.headers['content-type']), body }));
      })
      .on('error', reject);
  });
}

/** Prometheus text → { 'name{labels}': value } (comments dropped). */
function parseProm(text: string): Record<string, number> {
  const out: Record<string, number> = {};
  for (const line of text.split('\n')) {
    if (!line || line.startsWith('#')) continue;
    const m = /^([a-zA-Z_:][a-zA-Z0-9_:]*(?:\{[^}]*\})?) (\S+)$/.exec(line);
    if (!m) throw new Error(`not a Prometheus sample line: ${JSON.stringify(line)}`);
    out[m[1]] = Number(m[2]);
  }
  return out;
}

async function waitFor<T>(what: string, fn: () => Promise<T | undefined> | T | undefined, timeout = 10_000): Promise<T> {
  const until = Date.now() + timeout;
  for (;;) {
    const v = await fn();
    if (v !== undefined) return v;
    if (Date.now() > until) throw new Error(`timed out waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 50));
  }
}

describe('MilterMetrics (unit)', () => {
  it('counts sessions, messages, results, verdicts and errors, and times sync and async handlers', async () => {
    const m = new MilterMetrics({ buckets: [0.01, 0.1, 10] });
    const cbs = m.instrument({
      connect: () => C.CONTINUE,
      envfrom: async (_ctx, from) => {
        await new Promise((r) => setTimeout(r, 30));
        return from === '<bad@x>' ? C.REJECT : C.CONTINUE;
      },
      eom: (_ctx) => C.CONTINUE,
      close: () => undefined,
    });
    const s1 = {} as MilterContext;
    const s2 = {} as MilterContext;
    expect(cbs.connect!(s1, 'h', 'inet', null)).toBe(C.CONTINUE);
    expect(await cbs.envfrom!(s1, '<a@x>')).toBe(C.CONTINUE);
    expect(cbs.eom!(s1)).toBe(C.CONTINUE);
    expect(await cbs.envfrom!(s1, '<a@x>')).toBe(C.CONTINUE); // a second message on the same session
    expect(cbs.eom!(s1)).toBe(C.CONTINUE);
    cbs.close!(s1);
    cbs.connect!(s2, 'h', 'inet', null);
    expect(await cbs.envfrom!(s2, '<bad@x>')).toBe(C.REJECT);
    const snap = m.snapshot();
    expect(snap.sessions).toBe(2);
    expect(snap.messages).toBe(3);
    expect(snap.results).toEqual({ connect: { continue: 2 }, envfrom: { continue: 2, reject: 1 }, eom: { continue: 2 } });
    expect(snap.verdicts).toEqual({ continue: 2, reject: 1 });
    expect(snap.engine).toBeUndefined();
    const h = snap.latency.envfrom;
    expect(h.count).toBe(3);
    expect(h.counts[0]).toBe(0); // every envfrom slept ~30 ms: none within 10 ms
    expect(h.counts[2]).toBe(3);
    expect(h.sum).toBeGreaterThan(0.06);
    expect(snap.latency.connect.counts[2]).toBe(2);
  });

  it('passes exceptions and rejections through and counts them per callback', async () => {
    const m = new MilterMetrics();
    const boom = new Error('boom');
    const cbs = m.instrument({
      helo: () => {
        throw boom;
      },
      eom: async () => {
        throw boom;
      },
    });
    const ctx = {} as MilterContext;
    expect(() => cbs.helo!(ctx, 'x')).toThrow(boom);
    await expect(cbs.eom!(ctx) as Promise<number>).rejects.toBe(boom);
    expect(m.snapshot().errors).toEqual({ helo: 1, eom: 1 });
    expect(Object.keys(cbs)).toEqual(['helo', 'eom']); // nothing added: negotiation stays the same
  });

  it('renders Prometheus text with engine counters, and refuses bad buckets and prefixes', () => {
    const m = new MilterMetrics({ buckets: [0.5, 1] });
    m.setEngine(() => ({ created: 4, active: 1, deadlineExpired: 2, lateAnswers: 1, drainRefused: 0, progressSent: 3 }));
    const cbs = m.instrument({ eom: () => C.TEMPFAIL });
    cbs.eom!({} as MilterContext);
    const text = m.prometheus('mf');
    expect(text).toContain('# TYPE mf_callback_duration_seconds histogram\n');
    const p = parseProm(text);
    expect(p).toMatchObject({
      'mf_messages_total': 1,
      'mf_verdicts_total{status="tempfail"}': 1,
      'mf_callback_results_total{callback="eom",status="tempfail"}': 1,
      'mf_callback_duration_seconds_bucket{callback="eom",le="0.5"}': 1,
      'mf_callback_duration_seconds_bucket{callback="eom",le="+Inf"}': 1,
      'mf_callback_duration_seconds_count{callback="eom"}': 1,
      'mf_engine_sessions_total': 4,
      'mf_engine_sessions_active': 1,
      'mf_deadline_expired_total': 2,
      'mf_late_answers_total': 1,
    });
    expect(() => new MilterMetrics({ buckets: [1, 0.5] })).toThrow(InvalidArgumentError);
    expect(() => new MilterMetrics({ buckets: [] })).toThrow(/ascending positive/);
    expect(() => m.prometheus('bad-prefix')).toThrow(/bad-prefix/);
  });
});

describe('metrics over the wire (libmilter engine)', () => {
  it('examples/metrics: a scrape after real sessions shows messages, verdicts, latency and engine counters; logs are pino JSON', async () => {
    const spec = await freeInetSpec();
    const port = await freePort();
    const proc = await startProcess(process.execPath, {
      args: [path.join(DIST, 'examples', 'metrics.js'), spec],
      env: { METRICS_PORT: String(port) },
      socket: spec,
    });
    await waitFor('the metrics port', () => scrape(port).catch(() => undefined));
    const send = async (subject: string) => {
      const c = await MilterClient.connect(spec, { timeout: 10_000 });
      return c.sendMessage({ from: '<a@example.org>', rcpt: ['<b@example.org>'], message: `Subject: ${subject}\r\n\r\nhi\r\n`, quit: true });
    };
    expect((await send('one')).actions.map((a) => a.type)).toEqual(['addheader']);
    expect((await send('two')).decision).toBe('continue');
    expect((await send('[spam] three')).decision).toBe('reject');
    // The engine counts a session as deleted a moment after QUIT: wait for the gauge.
    const p = await waitFor('three closed sessions', async () => {
      const r = await scrape(port);
      expect(r.status).toBe(200);
      expect(r.type).toMatch(/^text\/plain; version=0\.0\.4/);
      const parsed = parseProm(r.body);
      return parsed.nodemilter_engine_sessions_active === 0 && parsed.nodemilter_messages_total === 3 ? parsed : undefined;
    });
    expect(p).toMatchObject({
      nodemilter_sessions_total: 3,
      nodemilter_messages_total: 3,
      'nodemilter_verdicts_total{status="continue"}': 2,
      'nodemilter_verdicts_total{status="reject"}': 1,
      'nodemilter_callback_duration_seconds_count{callback="eom"}': 3,
      'nodemilter_callback_duration_seconds_count{callback="header"}': 3,
      nodemilter_deadline_expired_total: 0,
    });
    // libmilter also counts the readiness probe's connection as a session.
    expect(p.nodemilter_engine_sessions_total).toBeGreaterThanOrEqual(3);
    const logs = proc.stdout
      .split('\n')
      .filter((l) => l.startsWith('{'))
      .map((l) => JSON.parse(l) as { level: number; name: string; msg: string });
    expect(logs).toContainEqual(expect.objectContaining({ level: 30, name: 'metrics-example', msg: `metrics-example: listening on ${spec}` }));
  }, 30_000);

  it('counts a deadline expiry and a handler error; runmilter logs them through pino', async () => {
    const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'nm-metrics-'));
    const fixture = path.join(dir, 'slow.cjs');
    fs.writeFileSync(
      fixture,
      `'use strict';
const http = require('node:http');
const pino = require(${JSON.stringify(require.resolve('pino'))});
const nm = require(${JSON.stringify(path.join(DIST, 'src', 'index.js'))});
const milter = require(${JSON.stringify(path.join(DIST, 'src', 'milter.js'))});
const { MilterMetrics } = require(${JSON.stringify(path.join(DIST, 'src', 'metrics.js'))});
class Slow extends nm.Base {
  async envfrom(from) {
    if (from.includes('slow')) await new Promise((r) => setTimeout(r, 1500));
    return nm.CONTINUE;
  }
  eom() {
    throw new Error('eom exploded');
  }
}
const metrics = new MilterMetrics();
milter.setMetrics(metrics);
http.createServer((req, res) => res.end(metrics.prometheus())).listen(Number(process.argv[3]), '127.0.0.1');
nm.runmilter('slow', process.argv[2], { factory: Slow, logger: pino({ name: 'slow' }), deadline: { envfrom: 300 } });
`,
    );
    const spec = await freeInetSpec();
    const port = await freePort();
    const proc = await startProcess(process.execPath, { args: [fixture, spec, String(port)], socket: spec });
    try {
      const slow = await MilterClient.connect(spec, { timeout: 10_000 });
      const r1 = await slow.sendMessage({ from: '<slow@example.org>', rcpt: ['<b@example.org>'], message: 'Subject: s\r\n\r\nhi\r\n', quit: true });
      expect(r1.decision).toBe('tempfail');
      expect(r1.envfrom?.reply).toMatchObject({ rcode: '451', xcode: '4.3.0', text: 'Mail filter did not answer in time' }); // the engine's fallback
      const c = await MilterClient.connect(spec, { timeout: 10_000 });
      const r2 = await c.sendMessage({ from: '<ok@example.org>', rcpt: ['<b@example.org>'], message: 'Subject: s\r\n\r\nhi\r\n', quit: true });
      expect(r2.decision).toBe('tempfail'); // the default exception policy
      const p = await waitFor('the late answer', async () => {
        const parsed = parseProm((await scrape(port)).body);
        return parsed.nodemilter_late_answers_total === 1 ? parsed : undefined;
      });
      expect(p).toMatchObject({
        nodemilter_deadline_expired_total: 1,
        'nodemilter_handler_errors_total{callback="eom"}': 1,
        // the late envfrom still ends with CONTINUE in JavaScript; libmilter had answered TEMPFAIL
        'nodemilter_callback_results_total{callback="envfrom",status="continue"}': 2,
      });
      expect(p['nodemilter_callback_duration_seconds_bucket{callback="envfrom",le="1"}']).toBe(1);
      const logs = proc.stdout
        .split('\n')
        .filter((l) => l.startsWith('{'))
        .map((l) => JSON.parse(l) as { level: number; name: string; msg: string });
      expect(logs).toContainEqual(expect.objectContaining({ level: 50, name: 'slow', msg: expect.stringMatching(/^slow: eom failed on connection \d+: eom exploded$/) }));
    } finally {
      fs.rmSync(dir, { recursive: true, force: true });
    }
  }, 30_000);
});
