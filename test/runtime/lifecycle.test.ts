// runmilter's one life cycle (src/runtime/lifecycle.ts) against the engine
// interface alone: a fake MilterEngine that records what it is asked. The
// real engines behind it are tested over the wire in test/runmilter.test.ts
// and test/runtime/workers.test.ts; this holds the life cycle to the
// interface: a signal before the engine serves is acted on once it does,
// a second signal only warns, handler errors are logged, and every listener
// it installed is gone afterwards.
import { EventEmitter } from 'node:events';
import { describe, expect, it } from 'vitest';

import type { DrainMode, MilterEngine } from '../../src/runtime/engine';
import { serveEngine } from '../../src/runtime/lifecycle';
import type { EngineCounters } from '../../src/types';

class FakeEngine implements MilterEngine {
  readonly kind = 'node' as const;
  readonly canStopAccepting = true;
  readonly events = new EventEmitter();
  readonly calls: string[] = [];
  private end!: () => void;
  readonly stopped = new Promise<void>((r) => (this.end = r));
  listening: (() => void) | undefined;
  listen(): Promise<void> {
    this.calls.push('listen');
    return new Promise((r) => (this.listening = r));
  }
  close(drain: number, mode?: DrainMode): Promise<void> {
    this.calls.push(`close ${drain} ${mode}`);
    setTimeout(this.end, 5);
    return this.stopped;
  }
  diag(): EngineCounters {
    return { created: 0, deleted: 0, active: 0, deadlineExpired: 0, progressSent: 0, lateAnswers: 0, drainRefused: 0, running: true };
  }
}

function logger() {
  const lines: string[] = [];
  return { lines, log: { info: (m: string) => lines.push(`info ${m}`), warn: (m: string) => lines.push(`warn ${m}`), error: (m: string) => lines.push(`error ${m}`) } };
}

describe('serveEngine over the MilterEngine interface', () => {
  it('a stop signal while the engine opens its socket is kept and acted on once it serves; a second one warns', async () => {
    const e = new FakeEngine();
    const { lines, log } = logger();
    const before = process.listenerCount('SIGUSR2');
    let listening = 0;
    const done = serveEngine(e, { name: 'fake', socket: 'inet:1@127.0.0.1', drain: 1234, signals: ['SIGUSR2'], logger: log, onListening: () => listening++ });
    expect(process.listenerCount('SIGUSR2')).toBe(before + 1); // installed before the socket opens
    process.emit('SIGUSR2', 'SIGUSR2');
    process.emit('SIGUSR2', 'SIGUSR2');
    expect(e.calls).toEqual(['listen']);
    e.listening!();
    await done;
    expect(e.calls).toEqual(['listen', 'close 1234 refuse']);
    expect(listening).toBe(1);
    expect(lines).toEqual([
      'warn fake: SIGUSR2 again, still draining',
      'info fake: listening on inet:1@127.0.0.1 (node engine)',
      'info fake: SIGUSR2: draining open sessions for up to 1234 ms, then stopping',
      'info fake: stopped',
    ]);
    expect(process.listenerCount('SIGUSR2')).toBe(before);
    expect(e.events.listenerCount('handlerError')).toBe(0);
  });

  it('handler errors go to the log with the callback and connection; a listen failure rejects and leaves no listener', async () => {
    const e = new FakeEngine();
    const { lines, log } = logger();
    const done = serveEngine(e, { name: 'fake', socket: 'unix:/x', drain: 0, signals: ['SIGUSR2'], logger: log });
    e.listening!();
    await new Promise((r) => setImmediate(r));
    e.events.emit('handlerError', new Error('boom'), { callback: 'eom', connection: 7 });
    process.emit('SIGUSR2', 'SIGUSR2');
    await done;
    expect(lines).toContain('error fake: eom failed on connection 7: boom');

    const failing = new FakeEngine();
    failing.listen = () => Promise.reject(new Error('EADDRINUSE'));
    const before = process.listenerCount('SIGUSR2');
    await expect(serveEngine(failing, { name: 'fake', socket: 'unix:/x', drain: 0, signals: ['SIGUSR2'], logger: log })).rejects.toThrow('EADDRINUSE');
    expect(process.listenerCount('SIGUSR2')).toBe(before);
    expect(failing.events.listenerCount('handlerError')).toBe(0);
  });
});
