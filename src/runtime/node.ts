/**
 * The TypeScript engine behind {@link MilterEngine}: one {@link MilterServer}
 * built from one {@link EngineSetup}.
 *
 * @internal
 * @module
 */
import type * as net from 'node:net';

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

  close(drain: number, mode: DrainMode = 'refuse'): Promise<void> {
    // A worker hands new connections to the others: closing this process's
    // listener leaves the shared socket open in the supervisor and the
    // other workers. MilterServer keeps its net.Server to itself; the
    // close() below finds it already closed and drains the sessions.
    if (mode === 'handoff') (this.server as unknown as { server: net.Server }).server.close();
    return this.server.close({ drain });
  }

  diag(): EngineCounters {
    const { connections: _connections, ...counters } = this.server.getdiag();
    return counters;
  }
}
