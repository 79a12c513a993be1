/**
 * The event-loop spin, the JavaScript thread's side of the spin that
 * docs/native.md ("The spin") describes for libmilter's workers.
 *
 * After a reply is written, the MTA's next command (or, on the libmilter
 * engine, the worker's next event) usually follows within tens of
 * microseconds. An idle event loop sleeps in epoll_wait, and waking a
 * sleeping thread costs about as much on this kind of machine as the whole
 * JavaScript answer. So, for a short while after each reply, the loop is
 * kept polling instead: a chain of setImmediate callbacks makes libuv poll
 * with a zero timeout, and what arrives meanwhile is read without a sleep
 * and a wake-up.
 *
 * It costs CPU, so it runs only while the process serves fewer sessions
 * than it has CPUs (at more, the loop is busy anyway and the spin would
 * take CPU from the work or from the MTA), never on one CPU, and for at
 * most `NODEMILTER_SPIN_US` microseconds (default 50, 0 turns it off) after
 * the last reply.
 *
 * @internal
 * @module
 */
import * as os from 'node:os';
import { InvalidArgumentError } from './errors';

/**
 * NODEMILTER_SPIN_US: a whole number of microseconds from 0 to 1000, 50 when
 * unset. Read by both engines (the libmilter engine passes it to its workers
 * too).
 */
export function spinUsFromEnv(): number {
  const v = process.env.NODEMILTER_SPIN_US;
  if (v === undefined || v === '') return 50;
  if (!/^\d{1,4}$/.test(v) || Number(v) > 1000) {
    throw new InvalidArgumentError(`NODEMILTER_SPIN_US must be a whole number of microseconds from 0 to 1000, got '${v}'`);
  }
  return Number(v);
}

/** Counters of one {@link LoopSpin}. */
export interface LoopSpinCounters {
  /** Spins started (the loop was not already spinning when a reply went out). */
  spins: number;
  /** setImmediate turns the spins took in all. */
  turns: number;
}

/** One spinner per engine instance; {@link kick} after each reply written. */
export class LoopSpin {
  private until = 0;
  private spinning = false;
  private readonly ms: number;
  readonly counters: LoopSpinCounters = { spins: 0, turns: 0 };

  /**
   * @param us how long to keep polling after a reply, in microseconds (0: never).
   * @param sessions how many sessions the process serves now: the spin stops at as many as there are CPUs.
   * @param cpus the CPUs the process may use (default: os.availableParallelism()).
   */
  constructor(
    us: number,
    private readonly sessions: () => number,
    private readonly cpus: number = os.availableParallelism(),
  ) {
    this.ms = cpus > 1 ? us / 1000 : 0;
  }

  /** The spin time in microseconds, after the one-CPU rule (0: off). */
  get us(): number {
    return this.ms * 1000;
  }

  /** A reply was written: poll for what follows, for up to the spin time from now. */
  kick(): void {
    if (this.ms <= 0 || this.sessions() >= this.cpus) return;
    this.until = performance.now() + this.ms;
    if (this.spinning) return;
    this.spinning = true;
    this.counters.spins++;
    setImmediate(this.turn);
  }

  private readonly turn = (): void => {
    this.counters.turns++;
    if (performance.now() < this.until && this.sessions() < this.cpus) setImmediate(this.turn);
    else this.spinning = false;
  };
}
