/**
 * The TypeScript engine behind {@link MilterEngine}: one {@link MilterServer}
 * built from one {@link EngineSetup}.
 *
 * @internal
 * @module
 */
import { MilterServer } from '../engine/server';
import type { EngineCounters } from '../types';
import type { DrainMode, EngineSetup, MilterEngine } from './engine';

/** The TypeScript engine's server as a {@link MilterEngine}. */
export class NodeEngine implements MilterEngine {
  readonly kind = 'node' as const;
  readonly canStopAccepting = true;
  readonly server: MilterServer;
  readonly stopped: Promise<void>;

  constructor(setup: EngineSetup) {
    const { description, socket, umask, logger, options } = setup;
    this.server = new MilterServer(description, { ...options, socket, umask, logger });
    this.stopped = new Promise<void>((resolve) => this.server.once('close', () => resolve()));
  }

  get events(): MilterServer {
    return this.server;
  }

  listen(): Promise<void> {
    return this.server.listen();
  }

  async close(drain: number, mode: DrainMode = 'refuse'): Promise<void> {
    if (mode === 'handoff') {
      // A worker hands new connections to the others: the shared socket
      // stays open in the supervisor and the other workers. Then every MTA
      // connection gets the budget to end by itself, not only those in a
      // message: an MTA holds its milter connection for the whole SMTP
      // session and answers 4xx for the rest of it once that closes.
      this.server.stopAccepting();
      const until = Date.now() + drain;
      while (this.server.connectionCount > 0 && Date.now() < until) await new Promise((r) => setTimeout(r, 25));
      return this.server.close({ drain: Math.max(0, until - Date.now()) });
    }
    return this.server.close({ drain });
  }

  diag(): EngineCounters {
    const { connections: _connections, ...counters } = this.server.getdiag();
    return counters;
  }
}
