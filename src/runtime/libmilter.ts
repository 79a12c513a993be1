/**
 * The libmilter engine behind {@link MilterEngine}: the `milter` module
 * (one milter per process) configured from one {@link EngineSetup}.
 *
 * @internal
 * @module
 */
import * as milter from '../milter';
import type { SessionCapOptions } from '../engine/dispatch';
import { parseSocketSpec } from '../socketspec';
import type { EngineCounters } from '../types';
import type { DrainMode, EngineSetup, MilterEngine } from './engine';

/**
 * The libmilter module as a {@link MilterEngine}. A `'handoff'` drain
 * stops accepting ({@link milter.stopAccepting}: the shared socket's other
 * processes take the new connections), lets every open session end by
 * itself within the budget, then stops; if this libmilter cannot stop
 * accepting, it refuses new sessions as `'refuse'` does, and says so.
 */
export class LibmilterEngine implements MilterEngine {
  readonly kind = 'libmilter' as const;
  readonly events = milter.events;
  /** Set by the first close: whether it stopped accepting. */
  private handedOff: boolean | undefined;
  private running: Promise<void> | undefined;
  private readonly ended: Promise<void>;
  private settle!: (p: Promise<void>) => void;

  constructor(private readonly setup: EngineSetup) {
    this.ended = new Promise<void>((resolve) => {
      this.settle = resolve;
    });
    const { description, socket, logger, options } = setup;
    milter.setLogger(logger);
    if (options.exceptionPolicy !== undefined) milter.set_exception_policy(options.exceptionPolicy);
    const registerOptions: milter.RegisterOptions & SessionCapOptions = {
      deadline: options.deadline,
      progressInterval: options.progressInterval,
      limits: options.limits,
      maxSessions: options.maxSessions,
      sessionCapAction: options.sessionCapAction,
    };
    milter.register(description, registerOptions);
    milter.setconn(socket);
    if (options.timeout !== undefined) milter.settimeout(options.timeout);
    if (options.backlog !== undefined) milter.setbacklog(options.backlog);
  }

  get stopped(): Promise<void> {
    return this.ended;
  }

  async listen(): Promise<void> {
    const oldMask = parseSocketSpec(this.setup.socket).kind === 'unix' ? process.umask(this.setup.umask) : undefined;
    try {
      // Removes a stale unix socket, and only if it is a socket.
      milter.opensocket(true);
    } finally {
      if (oldMask !== undefined) process.umask(oldMask);
    }
    this.running = milter.main();
    this.settle(this.running);
  }

  /**
   * Whether `close(drain, 'handoff')` stops accepting. Only trying tells
   * (see {@link milter.stopAccepting}): true until a close has run, then
   * whether its handoff did.
   */
  get canStopAccepting(): boolean {
    return this.handedOff ?? true;
  }

  close(drain: number, mode: DrainMode = 'refuse'): Promise<void> {
    if (mode === 'handoff' && this.handedOff === undefined) {
      try {
        milter.stopAccepting();
        this.handedOff = true;
      } catch (err) {
        this.handedOff = false;
        this.setup.logger.warn(`${(err as Error).message}; new sessions are refused (421) while the open ones drain`);
      }
    }
    return milter.stop({ drain });
  }

  diag(): EngineCounters {
    return milter.getdiag();
  }
}
