// runmilter's metrics: the `metrics`/`metricsListen` options instrument
// either engine the same way; with workers the supervisor serves one
// endpoint with the sum over its workers (and keeps what a dead worker had
// counted at the last scrape); the text passes `promtool check metrics`;
// registerPromClient puts the same families into a prom-client Registry.
import { execFileSync } from 'node:child_process';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { Registry } from 'prom-client';
import { afterEach, describe, expect, it } from 'vitest';

import { MilterMetrics, formatPrometheus, mergeSnapshots, metricFamilies, registerPromClient, type MetricsSnapshot } from '../../src/metrics';
import { ENGINES, stopAll, tmpDir, tmpSocketSpec } from '../helpers';
import { sendOne, startRuntime, stopRuntimes, waitLine, workerPids, type Runtime } from './lib';

afterEach(async () => {
  await stopRuntimes();
  await stopAll();
});

const PROMTOOL = ['/usr/bin/promtool', '/usr/local/bin/promtool'].find((p) => fs.existsSync(p));

async function scrape(m: Runtime): Promise<string> {
  const l = await waitLine(m, (x) => /metrics at http:\/\//.test(x.msg ?? ''));
  const url = /metrics at (http:\S+)/.exec(l.msg!)![1];
  const res = await fetch(url);
  expect(res.status).toBe(200);
  expect(res.headers.get('content-type')).toBe('text/plain; version=0.0.4; charset=utf-8');
  return res.text();
}

function value(text: string, sample: string): number | undefined {
  const line = text.split('\n').find((l) => l.startsWith(`${sample} `));
  return line === undefined ? undefined : Number(line.slice(sample.length + 1));
}

/** promtool's verdict on `text` (its lint included), or why it cannot run. */
function promtool(text: string): string {
  const dir = tmpDir();
  const file = path.join(dir, 'metrics.txt');
  fs.writeFileSync(file, text);
  try {
    return execFileSync('sh', ['-c', `${PROMTOOL} check metrics < ${file} 2>&1; echo "exit $?"`], { encoding: 'utf8' });
  } finally {
    fs.rmSync(dir, { recursive: true, force: true });
  }
}

describe.each(ENGINES)('metrics (%s engine)', (engine) => {
  it('metricsListen without workers: the callbacks and the engine counted the same way on either engine', async () => {
    const spec = tmpSocketSpec();
    const m = await startRuntime(engine, { socket: spec, metricsListen: '127.0.0.1:0' });
    for (let i = 0; i < 3; i++) expect((await sendOne(spec, i)).decision).toBe('continue');
    const text = await scrape(m);
    expect(value(text, 'nodemilter_messages_total')).toBe(3);
    expect(value(text, 'nodemilter_sessions_total')).toBe(3);
    expect(value(text, 'nodemilter_verdicts_total{status="continue"}')).toBe(3);
    expect(value(text, 'nodemilter_callback_duration_seconds_count{callback="eom"}')).toBe(3);
    // The readiness probe is a session for the engine, not for the callbacks.
    expect(value(text, 'nodemilter_engine_sessions_total')).toBeGreaterThanOrEqual(3);
    expect(value(text, 'nodemilter_engine_sessions_active')).toBeLessThanOrEqual(1);
    expect(text).not.toMatch(/nodemilter_workers/);
  });

  it('workers: the supervisor serves the sum, keeps a killed worker\'s counts from the last scrape, and counts the restart', async () => {
    const spec = tmpSocketSpec();
    const m = await startRuntime(engine, { socket: spec, workers: 2, metricsListen: '127.0.0.1:0', restart: { initialDelay: 100 } });
    await waitLine(m, (l) => l.ev === 'listening' && l.worker === undefined);
    const sent = await Promise.all(Array.from({ length: 10 }, (_, i) => sendOne(spec, i)));
    expect(sent.filter((s) => s.decision === 'continue')).toHaveLength(10);
    const first = await scrape(m);
    expect(value(first, 'nodemilter_messages_total')).toBe(10);
    expect(value(first, 'nodemilter_verdicts_total{status="continue"}')).toBe(10);
    expect(value(first, 'nodemilter_workers{state="serving"}')).toBe(2);
    expect(value(first, 'nodemilter_worker_restarts_total')).toBe(0);
    process.kill(workerPids(m.pid)[0], 'SIGKILL');
    await waitLine(m, (l) => /serving again/.test(l.msg ?? ''));
    for (let i = 0; i < 4; i++) expect((await sendOne(spec, 100 + i)).decision).toBe('continue');
    const second = await scrape(m);
    expect(value(second, 'nodemilter_messages_total')).toBe(14);
    expect(value(second, 'nodemilter_worker_restarts_total')).toBe(1);
    expect(value(second, 'nodemilter_workers{state="serving"}')).toBe(2);
    if (!PROMTOOL) {
      console.log('[runtime] promtool not installed (apt-get install prometheus): the exposition was not checked by promtool');
      return;
    }
    expect(promtool(second)).toBe('exit 0\n');
  });
});

describe('metrics text and prom-client', () => {
  const snap = (n: number): MetricsSnapshot => ({
    sessions: n,
    messages: n,
    results: { eom: { continue: n } },
    verdicts: { continue: n },
    errors: { body: 1 },
    latency: { eom: { buckets: [0.01, 0.1], counts: [n, n], count: n, sum: n * 0.005 } },
    engine: { created: n, active: 1, deadlineExpired: 0, lateAnswers: 0, drainRefused: 0, progressSent: 2 },
  });

  it.skipIf(!PROMTOOL)('passes promtool check metrics (families with no sample included)', () => {
    const text = formatPrometheus(metricFamilies(new MilterMetrics().snapshot()));
    expect(promtool(text)).toBe('exit 0\n');
    expect(promtool(formatPrometheus(metricFamilies(mergeSnapshots([snap(2), snap(3)]))))).toBe('exit 0\n');
  });

  it('mergeSnapshots adds counters, histograms and engine counters; different buckets are refused by name', () => {
    const m = mergeSnapshots([snap(2), snap(3)]);
    expect(m).toEqual({
      sessions: 5,
      messages: 5,
      results: { eom: { continue: 5 } },
      verdicts: { continue: 5 },
      errors: { body: 2 },
      latency: { eom: { buckets: [0.01, 0.1], counts: [5, 5], count: 5, sum: 0.025 } },
      engine: { created: 5, active: 2, deadlineExpired: 0, lateAnswers: 0, drainRefused: 0, progressSent: 4 },
    });
    const other = snap(1);
    other.latency.eom.buckets = [0.5, 1];
    expect(() => mergeSnapshots([snap(1), other])).toThrow(/cannot merge eom histograms with different buckets: \[0\.01,0\.1\] and \[0\.5,1\]/);
  });

  it('MilterMetrics.prometheus is formatPrometheus of its families', () => {
    const mm = new MilterMetrics();
    const cb = mm.instrument({ eom: () => 0 });
    cb.eom!({} as never);
    expect(mm.prometheus()).toBe(formatPrometheus(metricFamilies(mm.snapshot())));
    expect(mm.prometheus('x')).toMatch(/^x_messages_total 1$/m);
  });

  it('registerPromClient: a prom-client Registry renders the same samples, one snapshot per scrape', async () => {
    const registry = new Registry();
    let taken = 0;
    const names = registerPromClient(registry, () => {
      taken++;
      return snap(4);
    });
    expect(names).toContain('nodemilter_callback_duration_seconds');
    const text = await registry.metrics();
    expect(taken).toBe(1);
    const ours = formatPrometheus(metricFamilies(snap(4)));
    const samples = (t: string) => t.split('\n').filter((l) => l && !l.startsWith('#')).sort();
    expect(samples(text)).toEqual(samples(ours));
    expect(text).toMatch(/^# TYPE nodemilter_callback_duration_seconds histogram$/m);
    await new Promise((r) => setImmediate(r)); // the next scrape
    await registry.metrics();
    expect(taken).toBe(2);
    // A MilterMetrics works as the source too; a second registration of the same names is prom-client's error.
    const r2 = new Registry();
    registerPromClient(r2, new MilterMetrics());
    expect(await r2.metrics()).toMatch(/^nodemilter_sessions_total 0$/m);
    expect(() => registerPromClient(r2, new MilterMetrics())).toThrow(/already been registered/);
    expect(() => registerPromClient({} as never, new MilterMetrics())).toThrow(/needs a prom-client Registry/);
  });
});
