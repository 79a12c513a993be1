/**
 * Counters an operator expects from a mail filter, kept in the process and
 * readable from the application: sessions, messages, the statuses handlers
 * returned (per callback, and the verdicts that decided a message),
 * handler failures, a latency histogram per callback, and the engine's own
 * counters (deadline expiries, late answers, drain refusals). Rendered as
 * Prometheus text by {@link MilterMetrics.prometheus}; no dependency on a
 * metrics library.
 *
 * Engine-neutral: it measures the callbacks it wraps ({@link
 * MilterMetrics.instrument}) and reads the engine's counters through a
 * function it is given. `nodemilter/milter` wires both with
 * `milter.setMetrics(metrics)`; for the TypeScript engine, instrument the
 * description's callbacks and pass `() => server.diag()`.
 *
 * @example
 * ```ts
 * import * as milter from 'nodemilter/milter';
 * import { MilterMetrics } from 'nodemilter/metrics';
 * import { runmilter } from 'nodemilter';
 *
 * const metrics = new MilterMetrics();
 * milter.setMetrics(metrics);           // before runmilter()/main()
 * runmilter('mymilter', 'inet:8894@127.0.0.1', { factory: MyMilter });
 * http.createServer((req, res) => res.end(metrics.prometheus())).listen(9464, '127.0.0.1');
 * ```
 *
 * @module nodemilter/metrics
 */
import * as C from './constants';
import { InvalidArgumentError } from './errors';
import type { CallbackName, Callbacks, MilterContext } from './types';

/** Status names as they appear in labels. */
const STATUS_NAMES: Record<number, string> = {
  [C.CONTINUE]: 'continue',
  [C.REJECT]: 'reject',
  [C.DISCARD]: 'discard',
  [C.ACCEPT]: 'accept',
  [C.TEMPFAIL]: 'tempfail',
  [C.NOREPLY]: 'noreply',
  [C.SKIP]: 'skip',
  [C.ALL_OPTS]: 'all_opts',
};

/** Callbacks that belong to a message (the first of them after connect/helo, or after a message ended, starts one). */
const MESSAGE_STEPS = new Set<CallbackName>(['envfrom', 'envrcpt', 'data', 'header', 'eoh', 'body', 'eom']);

/** Default histogram buckets, in seconds. */
export const DEFAULT_BUCKETS: readonly number[] = [0.0005, 0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1, 2.5, 5, 10];

/** The counters an engine keeps itself (`milter.getdiag()` and the TypeScript engine's `diag()` both fit). */
export interface EngineCounters {
  /** Sessions the engine created. */
  created: number;
  /** Sessions open now. */
  active: number;
  /** Callbacks answered by the fallback because JavaScript was too slow. */
  deadlineExpired: number;
  /** Answers that arrived after their deadline. */
  lateAnswers: number;
  /** Sessions refused while draining. */
  drainRefused: number;
  /** Progress messages sent during eom. */
  progressSent: number;
  /** Connections over `maxSessions`, answered as `sessionCapAction` says (where the engine counts them). */
  sessionsRefused?: number;
  /** Connections shed for event-loop lag (TypeScript engine). */
  sessionsShed?: number;
  /** Connections closed for not negotiating in time (TypeScript engine). */
  negotiationTimeouts?: number;
  /** Connections closed for a frame not completed in time (TypeScript engine). */
  frameTimeouts?: number;
  /** Sessions ended because the MTA stopped taking their output (TypeScript engine). */
  writeStalls?: number;
  /** Actions refused for passing the output cap (TypeScript engine). */
  outputLimited?: number;
  /** Times the process ran out of file descriptors (TypeScript engine). */
  fdExhausted?: number;
}

/** The optional engine counters and their Prometheus names and help. */
const FLOW_COUNTERS: [keyof EngineCounters, string, string][] = [
  ['sessionsRefused', 'sessions_refused_total', 'Connections over maxSessions, answered as sessionCapAction says.'],
  ['sessionsShed', 'sessions_shed_total', 'Connections shed because the event loop lagged past maxEventLoopLag.'],
  ['negotiationTimeouts', 'negotiation_timeouts_total', 'Connections closed because the MTA did not negotiate in time.'],
  ['frameTimeouts', 'frame_timeouts_total', 'Connections closed because a frame did not complete within frameTimeout.'],
  ['writeStalls', 'write_stalls_total', 'Sessions ended because their output made no progress for writeTimeout.'],
  ['outputLimited', 'output_limited_total', 'Actions refused because the output queued would pass maxOutputBytes.'],
  ['fdExhausted', 'fd_exhausted_total', 'Times the process ran out of file descriptors.'],
];

/** A latency histogram: cumulative counts per upper bound, as Prometheus wants them. */
export interface Histogram {
  /** Upper bounds in seconds, ascending. */
  buckets: readonly number[];
  /** counts[i]: observations <= buckets[i] (cumulative). */
  counts: number[];
  /** All observations. */
  count: number;
  /** Sum of observations in seconds. */
  sum: number;
}

/** Everything {@link MilterMetrics} knows, as plain data. */
export interface MetricsSnapshot {
  /** Sessions seen by the instrumented callbacks (first callback of a session). */
  sessions: number;
  /** Messages started (the first message callback of each transaction). */
  messages: number;
  /** Statuses returned, per callback and status name. */
  results: Record<string, Record<string, number>>;
  /** Verdicts per status: eom's result, or a non-continue status at an earlier step. */
  verdicts: Record<string, number>;
  /** Handlers that threw or rejected, per callback. */
  errors: Record<string, number>;
  /** Handler latency per callback. */
  latency: Record<string, Histogram>;
  /** The engine's counters, if an engine was attached. */
  engine?: EngineCounters;
}

interface SessionState {
  inMessage: boolean;
}

/**
 * A set of counters for one milter process. Feed it by wrapping the
 * callbacks ({@link instrument}; `milter.setMetrics()` does it for the
 * libmilter engine) and read it with {@link snapshot} or {@link prometheus}.
 */
export class MilterMetrics {
  private sessionCount = 0;
  private messageCount = 0;
  private readonly results = new Map<string, Map<string, number>>();
  private readonly verdictCounts = new Map<string, number>();
  private readonly errorCounts = new Map<string, number>();
  private readonly histograms = new Map<string, Histogram>();
  private readonly seen = new WeakMap<object, SessionState>();
  private engineSource: (() => EngineCounters) | undefined;
  /** Histogram bucket bounds in seconds. */
  readonly buckets: readonly number[];

  /** @param options.buckets histogram upper bounds in seconds (ascending); default {@link DEFAULT_BUCKETS}. */
  constructor(options: { buckets?: readonly number[] } = {}) {
    const b = options.buckets ?? DEFAULT_BUCKETS;
    if (!Array.isArray(b) || b.length === 0 || b.some((x, i) => !(typeof x === 'number' && x > 0 && Number.isFinite(x)) || (i > 0 && x <= b[i - 1]))) {
      throw new InvalidArgumentError(`buckets must be ascending positive finite seconds, got ${JSON.stringify(b)}`);
    }
    this.buckets = [...b];
  }

  /** Read the engine's counters from this function at every snapshot (`() => milter.getdiag()`). */
  setEngine(source: (() => EngineCounters) | undefined): void {
    this.engineSource = source;
  }

  /**
   * Wrap callbacks so that each call is counted and timed (from the call to
   * the settled promise). Only the callbacks present are wrapped: what the
   * MTA is asked to send stays the same. The wrapper is transparent: same
   * arguments, same result, same exceptions.
   */
  instrument(callbacks: Callbacks): Callbacks {
    const out: Record<string, unknown> = {};
    for (const [name, fn] of Object.entries(callbacks)) {
      if (typeof fn !== 'function') {
        out[name] = fn;
        continue;
      }
      const cb = name as CallbackName;
      out[name] = (ctx: MilterContext, ...args: unknown[]): unknown => {
        this.enter(ctx, cb);
        const start = process.hrtime.bigint();
        let result: unknown;
        try {
          result = (fn as (...a: unknown[]) => unknown)(ctx, ...args);
        } catch (err) {
          this.leave(ctx, cb, start, undefined, true);
          throw err;
        }
        if (result !== null && typeof result === 'object' && typeof (result as PromiseLike<unknown>).then === 'function') {
          return Promise.resolve(result).then(
            (v) => {
              this.leave(ctx, cb, start, v, false);
              return v;
            },
            (err: unknown) => {
              this.leave(ctx, cb, start, undefined, true);
              throw err;
            },
          );
        }
        this.leave(ctx, cb, start, result, false);
        return result;
      };
    }
    return out as Callbacks;
  }

  private enter(ctx: MilterContext, cb: CallbackName): void {
    let st = this.seen.get(ctx);
    if (!st) {
      st = { inMessage: false };
      this.seen.set(ctx, st);
      this.sessionCount++;
    }
    if (MESSAGE_STEPS.has(cb) && !st.inMessage) {
      st.inMessage = true;
      this.messageCount++;
    }
  }

  private leave(ctx: MilterContext, cb: CallbackName, start: bigint, result: unknown, failed: boolean): void {
    this.observe(cb, Number(process.hrtime.bigint() - start) / 1e9);
    const st = this.seen.get(ctx);
    if (failed) {
      bump(this.errorCounts, cb);
      if (st && (cb === 'eom' || MESSAGE_STEPS.has(cb))) st.inMessage = false;
      return;
    }
    if (cb === 'close' || cb === 'abort') {
      if (st) st.inMessage = false;
      return;
    }
    const status = typeof result === 'number' ? (STATUS_NAMES[result] ?? `status_${result}`) : result === undefined ? 'none' : 'other';
    let byStatus = this.results.get(cb);
    if (!byStatus) this.results.set(cb, (byStatus = new Map()));
    bump(byStatus, status);
    const decisive = cb === 'eom' || (cb !== 'negotiate' && status !== 'continue' && status !== 'noreply' && status !== 'skip' && status !== 'none');
    if (decisive) {
      bump(this.verdictCounts, status);
      if (st) st.inMessage = false;
    }
  }

  private observe(cb: string, seconds: number): void {
    let h = this.histograms.get(cb);
    if (!h) this.histograms.set(cb, (h = { buckets: this.buckets, counts: this.buckets.map(() => 0), count: 0, sum: 0 }));
    for (let i = 0; i < h.buckets.length; i++) if (seconds <= h.buckets[i]) h.counts[i]++;
    h.count++;
    h.sum += seconds;
  }

  /** The counters now, as plain data (copies). */
  snapshot(): MetricsSnapshot {
    const obj = (m: Map<string, number>) => Object.fromEntries(m);
    const snap: MetricsSnapshot = {
      sessions: this.sessionCount,
      messages: this.messageCount,
      results: Object.fromEntries([...this.results].map(([k, v]) => [k, obj(v)])),
      verdicts: obj(this.verdictCounts),
      errors: obj(this.errorCounts),
      latency: Object.fromEntries([...this.histograms].map(([k, h]) => [k, { ...h, counts: [...h.counts] }])),
    };
    if (this.engineSource) {
      const e = this.engineSource();
      snap.engine = {
        created: e.created,
        active: e.active,
        deadlineExpired: e.deadlineExpired,
        lateAnswers: e.lateAnswers,
        drainRefused: e.drainRefused,
        progressSent: e.progressSent,
      };
      for (const [k] of FLOW_COUNTERS) if (typeof e[k] === 'number') (snap.engine as unknown as Record<string, number>)[k] = e[k] as number;
    }
    return snap;
  }

  /**
   * The counters in Prometheus' text exposition format (version 0.0.4),
   * every name prefixed with `prefix` (default `nodemilter`).
   */
  prometheus(prefix = 'nodemilter'): string {
    return formatPrometheus(metricFamilies(this.snapshot(), prefix));
  }
}

/** One sample of a {@link MetricFamily}. */
export interface MetricSample {
  /** The sample's name when it is not the family's (`_bucket`, `_sum`, `_count` of a histogram). */
  metricName?: string;
  labels: Record<string, string>;
  value: number;
}

/** One metric family: what a Prometheus text block, or a prom-client metric, holds. */
export interface MetricFamily {
  name: string;
  help: string;
  type: 'counter' | 'gauge' | 'histogram';
  values: MetricSample[];
}

/** Format a bucket bound as Prometheus writes it. */
function num(v: number): string {
  return Number.isInteger(v) ? String(v) : v.toPrecision(9).replace(/\.?0+$/, '');
}

/**
 * A snapshot as metric families, every name prefixed with `prefix`: what
 * {@link formatPrometheus} renders and {@link registerPromClient} hands to a
 * prom-client Registry.
 */
export function metricFamilies(s: MetricsSnapshot, prefix = 'nodemilter'): MetricFamily[] {
  if (!/^[a-zA-Z_:][a-zA-Z0-9_:]*$/.test(prefix)) throw new InvalidArgumentError(`metric prefix must match [a-zA-Z_:][a-zA-Z0-9_:]*, got ${JSON.stringify(prefix)}`);
  const out: MetricFamily[] = [];
  const family = (name: string, type: MetricFamily['type'], help: string, values: MetricSample[] = []) => {
    out.push({ name: `${prefix}_${name}`, help, type, values });
    return values;
  };
  family('sessions_total', 'counter', 'Milter sessions seen by the callbacks.', [{ labels: {}, value: s.sessions }]);
  family('messages_total', 'counter', 'Messages (SMTP transactions) seen by the callbacks.', [{ labels: {}, value: s.messages }]);
  const results = family('callback_results_total', 'counter', 'Statuses returned by the handlers, per callback.');
  for (const [callback, by] of Object.entries(s.results)) for (const [status, n] of Object.entries(by)) results.push({ labels: { callback, status }, value: n });
  const verdicts = family('verdicts_total', 'counter', "Message verdicts: eom's status, or a non-continue status at an earlier step.");
  for (const [status, n] of Object.entries(s.verdicts)) verdicts.push({ labels: { status }, value: n });
  const errors = family('handler_errors_total', 'counter', 'Handlers that threw or rejected, per callback.');
  for (const [callback, n] of Object.entries(s.errors)) errors.push({ labels: { callback }, value: n });
  const hist = `${prefix}_callback_duration_seconds`;
  const latency = family('callback_duration_seconds', 'histogram', 'Time from calling a handler to its settled result.');
  for (const [callback, h] of Object.entries(s.latency)) {
    h.buckets.forEach((b, i) => latency.push({ metricName: `${hist}_bucket`, labels: { callback, le: num(b) }, value: h.counts[i] }));
    latency.push({ metricName: `${hist}_bucket`, labels: { callback, le: '+Inf' }, value: h.count });
    latency.push({ metricName: `${hist}_sum`, labels: { callback }, value: h.sum });
    latency.push({ metricName: `${hist}_count`, labels: { callback }, value: h.count });
  }
  if (s.engine) {
    const e = s.engine;
    family('engine_sessions_total', 'counter', 'Sessions the engine created.', [{ labels: {}, value: e.created }]);
    family('engine_sessions_active', 'gauge', 'Sessions open now.', [{ labels: {}, value: e.active }]);
    family('deadline_expired_total', 'counter', 'Callbacks answered by the fallback (451 4.3.0) because the handler missed its deadline.', [{ labels: {}, value: e.deadlineExpired }]);
    family('late_answers_total', 'counter', 'Handler answers that arrived after their deadline.', [{ labels: {}, value: e.lateAnswers }]);
    family('drain_refused_total', 'counter', 'Sessions refused while draining.', [{ labels: {}, value: e.drainRefused }]);
    family('progress_sent_total', 'counter', 'Progress messages sent while eom was pending.', [{ labels: {}, value: e.progressSent }]);
    for (const [k, name, help] of FLOW_COUNTERS) {
      const v = (e as unknown as Record<string, number | undefined>)[k];
      if (typeof v === 'number') family(name, 'counter', help, [{ labels: {}, value: v }]);
    }
  }
  return out;
}

/**
 * Metric families in Prometheus' text exposition format (version 0.0.4):
 * what {@link MilterMetrics.prometheus} serves, and what a supervisor
 * serves for the sum of its workers ({@link mergeSnapshots}).
 */
export function formatPrometheus(families: readonly MetricFamily[]): string {
  const lines: string[] = [];
  for (const f of families) {
    lines.push(`# HELP ${f.name} ${f.help}`, `# TYPE ${f.name} ${f.type}`);
    for (const v of f.values) {
      const labels = Object.entries(v.labels).map(([k, x]) => `${k}="${x.replace(/\\/g, '\\\\').replace(/"/g, '\\"').replace(/\n/g, '\\n')}"`);
      lines.push(`${v.metricName ?? f.name}${labels.length ? `{${labels.join(',')}}` : ''} ${num(v.value)}`);
    }
  }
  return lines.join('\n') + '\n';
}

/**
 * The sum of several snapshots (one per worker process): counters and
 * histograms add up, and so do the engines' counters (`active` included:
 * sessions open now in all of them). Histograms must share their buckets.
 *
 * @throws InvalidArgumentError when two histograms of a callback have different buckets.
 */
export function mergeSnapshots(snapshots: readonly MetricsSnapshot[]): MetricsSnapshot {
  const out: MetricsSnapshot = { sessions: 0, messages: 0, results: {}, verdicts: {}, errors: {}, latency: {} };
  const add = (into: Record<string, number>, from: Record<string, number>) => {
    for (const [k, v] of Object.entries(from)) into[k] = (into[k] ?? 0) + v;
  };
  for (const s of snapshots) {
    out.sessions += s.sessions;
    out.messages += s.messages;
    for (const [cb, by] of Object.entries(s.results)) add((out.results[cb] ??= {}), by);
    add(out.verdicts, s.verdicts);
    add(out.errors, s.errors);
    for (const [cb, h] of Object.entries(s.latency)) {
      const m = out.latency[cb];
      if (!m) {
        out.latency[cb] = { buckets: [...h.buckets], counts: [...h.counts], count: h.count, sum: h.sum };
        continue;
      }
      if (m.buckets.length !== h.buckets.length || m.buckets.some((b, i) => b !== h.buckets[i])) {
        throw new InvalidArgumentError(`cannot merge ${cb} histograms with different buckets: ${JSON.stringify(m.buckets)} and ${JSON.stringify(h.buckets)}`);
      }
      h.counts.forEach((c, i) => (m.counts[i] += c));
      m.count += h.count;
      m.sum += h.sum;
    }
    if (s.engine) {
      // The base counters, and the optional flow counters an engine reports.
      const e = (out.engine ??= { created: 0, active: 0, deadlineExpired: 0, lateAnswers: 0, drainRefused: 0, progressSent: 0 }) as unknown as Record<string, number>;
      for (const [k, v] of Object.entries(s.engine)) if (typeof v === 'number') e[k] = (e[k] ?? 0) + v;
    }
  }
  return out;
}

function bump(m: Map<string, number>, key: string): void {
  m.set(key, (m.get(key) ?? 0) + 1);
}

/** The part of a prom-client `Registry` {@link registerPromClient} uses. */
export interface PromClientRegistry {
  /** prom-client's `Registry.registerMetric`. */
  registerMetric(metric: never): void;
}

/**
 * Register the milter's metrics into a prom-client `Registry` (prom-client
 * is an optional peer: nothing here imports it), so an application that
 * already serves prom-client metrics gets the milter's in the same scrape.
 * `source` is a {@link MilterMetrics}, or a function returning a snapshot
 * (or a promise of one). One snapshot is taken per scrape, however many
 * families the registry reads. Returns the names registered.
 *
 * @example
 * ```ts
 * import { Registry } from 'prom-client';
 * import { MilterMetrics, registerPromClient } from 'nodemilter/metrics';
 * const metrics = new MilterMetrics();
 * const registry = new Registry();
 * registerPromClient(registry, metrics);
 * runmilter('mymilter', 'inet:8894@127.0.0.1', { factory: MyMilter, metrics });
 * // registry.metrics() now includes nodemilter_sessions_total, ...
 * ```
 */
export function registerPromClient(
  registry: PromClientRegistry,
  source: MilterMetrics | (() => MetricsSnapshot | Promise<MetricsSnapshot>),
  prefix = 'nodemilter',
): string[] {
  if (!registry || typeof registry.registerMetric !== 'function') throw new InvalidArgumentError('registerPromClient needs a prom-client Registry (with registerMetric)');
  const take = source instanceof MilterMetrics ? () => source.snapshot() : source;
  if (typeof take !== 'function') throw new InvalidArgumentError('registerPromClient needs a MilterMetrics or a function returning a snapshot');
  // The families present in any snapshot: the empty one has every family but the engine's.
  const names = metricFamilies({ sessions: 0, messages: 0, results: {}, verdicts: {}, errors: {}, latency: {}, engine: { created: 0, active: 0, deadlineExpired: 0, lateAnswers: 0, drainRefused: 0, progressSent: 0 } }, prefix);
  let current: Promise<MetricFamily[]> | undefined;
  const families = (): Promise<MetricFamily[]> => {
    if (!current) {
      current = Promise.resolve(take()).then((s) => metricFamilies(s, prefix));
      // One snapshot for the families read in one scrape (they are read in one turn of the loop).
      setImmediate(() => (current = undefined));
    }
    return current;
  };
  for (const f of names) {
    const metric = {
      name: f.name,
      help: f.help,
      type: f.type,
      aggregator: 'sum',
      get: async () => {
        const found = (await families()).find((x) => x.name === f.name);
        return { name: f.name, help: f.help, type: f.type, aggregator: 'sum', values: found ? found.values : [] };
      },
      reset: () => undefined,
    };
    registry.registerMetric(metric as never);
  }
  return names.map((f) => f.name);
}
