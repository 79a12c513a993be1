/**
 * runmilter's life cycle, written once over {@link MilterEngine}: signal
 * handlers (installed before the socket opens), the listening log line,
 * drain on a stop signal, handler errors to the log, clean-up of the unix
 * socket, and, in a worker, the supervisor's side channel (ready, metrics,
 * stop).
 *
 * @internal
 * @module
 */
import type { HandlerErrorInfo } from '../engine/dispatch';
import type { MetricsSnapshot } from '../metrics';
import { removeUnixSocket } from '../socketspec';
import type { Logger } from '../types';
import type { DrainMode, MilterEngine } from './engine';
import { notifyReady } from './notify';
import type { FromWorker, ToWorker } from './protocol';

/** How {@link serveEngine} runs the engine. */
export interface LifecycleOptions {
  /** The milter's name, first word of every log line. */
  name: string;
  /** The socket as the user gave it (for the log). */
  socket: string;
  /** Removed after the stop when it is a unix socket this process created. */
  unixPath?: string;
  drain: number;
  /** Signals that stop the milter gracefully. */
  signals: readonly NodeJS.Signals[];
  logger: Logger;
  onListening?: () => void;
  /**
   * Set in a worker: its number, its metrics, and the supervisor's reload
   * signal, which the worker ignores (a signal to the whole process group,
   * such as a terminal's SIGHUP, is the supervisor's to act on).
   */
  worker?: { id: number; snapshot?: () => MetricsSnapshot; reloadSignal?: NodeJS.Signals | null };
}

/**
 * Serve `engine` until a stop signal (or, in a worker, the supervisor's
 * stop), drain, stop, clean up. Resolves when stopped; rejects if the
 * engine cannot listen or fails while serving.
 */
export async function serveEngine(engine: MilterEngine, o: LifecycleOptions): Promise<void> {
  const log = o.logger;
  const who = o.worker ? `${o.name}[worker ${o.worker.id}]` : o.name;
  const onHandlerError = (err: Error, info: HandlerErrorInfo) => {
    log.error(`${who}: ${info.callback} failed on connection ${info.connection}: ${err.message}`, err);
  };
  engine.events.on('handlerError', onHandlerError);

  // Signal handlers go in before the socket opens: a client (or a test) may
  // signal the moment it can connect. A signal before the engine serves is
  // kept and acted on as soon as it does.
  let stopping = false;
  let serving = false;
  let early: { why: string; mode: DrainMode } | undefined;
  // A worker shares its socket: its drain leaves new connections to the other workers.
  const signalMode: DrainMode = o.worker ? 'handoff' : 'refuse';
  const beginStop = (why: string, mode: DrainMode) => {
    // Refuse new sessions first, then say so: whoever reads the log line may connect at once.
    const stopped = engine.close(o.drain, mode);
    const how = mode === 'handoff' && engine.canStopAccepting ? 'stopped accepting; ' : '';
    log.info(`${who}: ${why}: ${how}draining open sessions for up to ${o.drain} ms, then stopping`);
    stopped.catch((err: Error) => log.error(`${who}: stop failed: ${err.message}`, err));
  };
  const requestStop = (why: string, mode: DrainMode) => {
    if (stopping) {
      log.warn(`${who}: ${why} again, still draining`);
      return;
    }
    stopping = true;
    if (serving) beginStop(why, mode);
    else early = { why, mode };
  };
  const onSignal = (sig: NodeJS.Signals) => requestStop(sig, signalMode);
  for (const s of o.signals) process.on(s, onSignal);
  const onMessage = (m: ToWorker) => {
    if (!m || typeof m !== 'object') return;
    if (m.type === 'stop') requestStop(`the supervisor asks to stop (${m.reason})`, m.mode);
    else if (m.type === 'metrics') send({ type: 'metrics', seq: m.seq, snapshot: o.worker?.snapshot?.() });
  };
  // The supervisor is gone: nobody replaces or reloads this worker any more.
  const onDisconnect = () => requestStop('the supervisor went away', 'refuse');
  const ignore = () => undefined;
  const ignored = o.worker?.reloadSignal && !o.signals.includes(o.worker.reloadSignal) ? o.worker.reloadSignal : undefined;
  if (o.worker) {
    process.on('message', onMessage);
    process.once('disconnect', onDisconnect);
    if (ignored) process.on(ignored, ignore);
  }
  const cleanUp = () => {
    for (const s of o.signals) process.removeListener(s, onSignal);
    engine.events.removeListener('handlerError', onHandlerError);
    if (o.worker) {
      process.removeListener('message', onMessage);
      process.removeListener('disconnect', onDisconnect);
      if (ignored) process.removeListener(ignored, ignore);
    }
  };

  try {
    await engine.listen();
  } catch (err) {
    cleanUp();
    throw err;
  }
  serving = true;
  log.info(`${who}: listening on ${o.socket}${engine.kind === 'node' ? ' (node engine)' : ''}`);
  if (o.worker) send({ type: 'ready', pid: process.pid });
  else notifyReady(`listening on ${o.socket}`, log, o.name);
  if (early) beginStop(early.why, early.mode);
  o.onListening?.();
  try {
    await engine.stopped;
  } finally {
    cleanUp();
    if (o.unixPath) {
      const err = removeUnixSocket(o.unixPath);
      if (err) log.warn(`could not remove socket ${o.unixPath}: ${err.message}`);
    }
    if (o.worker) send({ type: 'stopped', snapshot: o.worker.snapshot?.() });
    log.info(`${who}: stopped`);
  }
}

function send(m: FromWorker): void {
  if (process.connected) process.send?.(m, undefined, undefined, () => undefined);
}
