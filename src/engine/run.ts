/**
 * runmilter on the TypeScript engine: what `runmilter(..., { engine: 'node' })`
 * does. Same options and the same life cycle as on libmilter: listen, drain
 * on SIGTERM/SIGINT (new sessions get 421 4.3.2), stop, remove the unix socket.
 *
 * @internal
 * @module
 */
import type { RunmilterOptions } from '../runmilter';
import type { Logger, MilterDescription } from '../types';
import { serve } from './server';

/** Serve `description` on the TypeScript engine until a stop signal; resolves when stopped. */
export async function runOnNodeEngine(
  name: string,
  socket: string,
  description: MilterDescription,
  options: RunmilterOptions & { drain: number; logger: Logger },
): Promise<void> {
  const log = options.logger;
  const server = await serve(description, {
    socket,
    deadline: options.deadline,
    progressInterval: options.progressInterval,
    exceptionPolicy: options.exceptionPolicy,
    timeout: options.timeout,
    backlog: options.backlog,
    umask: options.umask ?? 0o007, // runmilter's default, as on libmilter
    limits: options.limits,
    logger: log,
    maxSessions: options.maxSessions,
    sessionCapAction: options.sessionCapAction,
    negotiationTimeout: options.negotiationTimeout,
    frameTimeout: options.frameTimeout,
    writeTimeout: options.writeTimeout,
    maxOutputBytes: options.maxOutputBytes,
    maxEventLoopLag: options.maxEventLoopLag,
  });
  server.on('handlerError', (err: Error, info: { callback: string; connection: number }) => {
    log.error(`${name}: ${info.callback} failed on connection ${info.connection}: ${err.message}`, err);
  });
  const stopped = new Promise<void>((resolve) => server.once('close', () => resolve()));
  const signals = options.signals ?? ['SIGTERM', 'SIGINT'];
  let stopping = false;
  const onSignal = (sig: NodeJS.Signals) => {
    if (stopping) {
      log.warn(`${name}: ${sig} again, still draining`);
      return;
    }
    stopping = true;
    // Refuse new sessions first, then say so: whoever reads the log line may connect at once.
    const closed = server.close({ drain: options.drain });
    log.info(`${name}: ${sig}: draining open sessions for up to ${options.drain} ms, then stopping`);
    closed.catch((err: Error) => log.error(`${name}: stop failed: ${err.message}`, err));
  };
  for (const s of signals) process.on(s, onSignal);
  log.info(`${name}: listening on ${socket} (node engine)`);
  options.onListening?.();
  try {
    await stopped;
  } finally {
    for (const s of signals) process.removeListener(s, onSignal);
    log.info(`${name}: stopped`);
  }
}
