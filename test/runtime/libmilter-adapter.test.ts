// The libmilter adapter's handoff drain (src/runtime/libmilter.ts) with the
// milter module replaced: what it does when milter.stopAccepting() works and
// when it cannot (its fallback to refusing, which a real libmilter here never
// takes). The real path, over the wire: test/milter.test.ts
// ("stopAccepting()"), test/runtime/workers.test.ts and the reloads behind
// Postfix (test/runtime/postfix-scenarios.ts).
import { EventEmitter } from 'node:events';
import { beforeEach, describe, expect, it, vi } from 'vitest';

import { LibmilterEngine } from '../../src/runtime/libmilter';

const state = vi.hoisted(() => ({ calls: [] as string[], refuse: undefined as string | undefined }));
const calls = state.calls;

vi.mock('../../src/milter', () => ({
  events: new EventEmitter(),
  setLogger: () => undefined,
  set_exception_policy: () => undefined,
  register: () => state.calls.push('register'),
  setconn: (s: string) => state.calls.push(`setconn ${s}`),
  settimeout: () => undefined,
  setbacklog: () => undefined,
  opensocket: () => state.calls.push('opensocket'),
  main: () => new Promise<void>(() => undefined),
  stopAccepting: () => {
    state.calls.push('stopAccepting');
    if (state.refuse) throw new Error(state.refuse);
  },
  stop: (o: { drain: number }) => {
    state.calls.push(`stop ${o.drain}`);
    return Promise.resolve();
  },
  getdiag: () => ({ running: true }),
}));

function engine() {
  const warnings: string[] = [];
  const logger = { info: () => undefined, warn: (m: string) => warnings.push(m), error: () => undefined };
  const e = new LibmilterEngine({ description: { name: 't', callbacks: {} } as never, socket: 'fd:3', umask: 0o007, logger, options: {} });
  return { e, warnings };
}

beforeEach(() => {
  calls.length = 0;
  state.refuse = undefined;
});

describe('LibmilterEngine.close', () => {
  it("'handoff' stops accepting first, then drains without refusing", async () => {
    const { e, warnings } = engine();
    await e.listen();
    await e.close(3000, 'handoff');
    expect(calls.slice(-2)).toEqual(['stopAccepting', 'stop 3000']);
    expect(e.canStopAccepting).toBe(true);
    expect(warnings).toEqual([]);
  });

  it("'handoff' where libmilter cannot stop accepting: says why and drains by refusing", async () => {
    const why = "stopAccepting(): libmilter's listening descriptor was not found when the socket opened (fd:3)";
    state.refuse = why;
    const { e, warnings } = engine();
    await e.listen();
    await e.close(3000, 'handoff');
    expect(calls.slice(-2)).toEqual(['stopAccepting', 'stop 3000']);
    expect(e.canStopAccepting).toBe(false);
    expect(warnings).toEqual([`${why}; new sessions are refused (421) while the open ones drain`]);
  });

  it("'refuse' does not stop accepting", async () => {
    const { e } = engine();
    await e.listen();
    await e.close(1000, 'refuse');
    expect(calls).not.toContain('stopAccepting');
    expect(calls.at(-1)).toBe('stop 1000');
  });
});
