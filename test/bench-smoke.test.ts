// Smoke test of the benchmark tools (correctness only, no timing): the C
// load generator drives ~200 messages through the C and the nodemilter S3
// milters, and every message comes back with its added header.
import { afterAll, describe, expect, it } from 'vitest';
import { execFile } from 'node:child_process';
import { createRequire } from 'node:module';
import * as path from 'node:path';

const bench = createRequire(__filename)('../bench/lib.cjs') as {
  startMilter(impl: string, shape: string, socket: string): Promise<{ stop(): Promise<void>; socket: string; alive(): boolean }>;
  runLoadgen(socket: string, o: Record<string, unknown>): Promise<Record<string, any>>;
  socketFor(name: string): string;
  killAll(): void;
};

afterAll(() => bench.killAll());

describe('bench load generator', () => {
  for (const impl of ['c', 'node', 'ts']) {
    it(`sends 200 messages through the ${impl} S3 milter, each gets its header`, async () => {
      const m = await bench.startMilter(impl, 's3', bench.socketFor(`smoke-${impl}-${process.pid}`));
      try {
        const r = await bench.runLoadgen(m.socket, { conc: 4, perConn: 25, messages: 200, timeout: 20 });
        expect(r.first_error).toBe('');
        expect(r.errors).toBe(0);
        expect(r.bad).toBe(0);
        expect(r.messages).toBe(200);
        expect(r.headers).toBe(200);
        expect(r.connections).toBeGreaterThanOrEqual(8); // 25 per connection; the last ones may be split
        expect(r.exitCode).toBe(0);
        expect(m.alive()).toBe(true);
      } finally {
        await m.stop();
      }
    });
  }
});

describe('bench:ceiling', () => {
  it('runs C, ceiling.c, bare.cjs and the TypeScript engine without an error, one row per concurrency, then the hand-off costs', async () => {
    const script = path.join(__dirname, '..', 'bench', 'ceiling', 'run.cjs');
    const { code, stdout, stderr } = await new Promise<{ code: number; stdout: string; stderr: string }>((resolve) =>
      execFile(process.execPath, [script, '--rounds', '1', '--seconds', '0.3', '--conc', '1,4', '--handoff', '500'], { timeout: 60_000 }, (err, stdout, stderr) =>
        resolve({ code: err ? Number((err as { code?: number }).code ?? 1) : 0, stdout, stderr }),
      ),
    );
    expect(stderr).toBe('');
    expect(code).toBe(0);
    const rows = stdout.split('\n').filter((l) => /^\| \d+ \|/.test(l));
    expect(rows.map((r) => r.split('|')[1].trim())).toEqual(['1', '4']);
    for (const r of rows) {
      const rates = r.split('|').slice(2, 6).map((x) => Number(x.trim()));
      for (const rate of rates) expect(rate).toBeGreaterThan(0);
    }
    const handoff = /condition variable ([\d.]+) us, eventfd \+ epoll ([\d.]+) us, unix socket pair ([\d.]+) us/.exec(stdout);
    expect(handoff, stdout).not.toBeNull();
    for (const us of handoff!.slice(1)) expect(Number(us)).toBeGreaterThan(0);
  }, 90_000);
});
