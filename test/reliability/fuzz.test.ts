// The short version of the socket fuzzer (scripts/reliability/fuzz.cjs; the
// long run is `npm run fuzz -- --minutes 5 [--engine node]`): 30 s of hostile
// packets on a listening milter, on each engine (libmilter, then the
// TypeScript engine), which must not crash, must keep answering well-formed
// messages, and must keep its RSS and its V8 heap (after a forced GC)
// bounded. The two cases run one after the other: about 65 s in all.
import { execFile } from 'node:child_process';
import * as path from 'node:path';
import { describe, expect, it } from 'vitest';

import { ROOT } from './lib';

interface MemRow { t: number; rss: number; heap: number; ext: number; ab: number; live: number; held: number; created: number; deleted: number }

async function fuzz(engine: 'libmilter' | 'node') {
  const script = path.join(ROOT, 'scripts', 'reliability', 'fuzz.cjs');
  const args = [script, '--seconds', '30', '--conns', '6', '--max-growth-mib', '48', '--engine', engine];
  const { code, stdout, stderr } = await new Promise<{ code: number | null; stdout: string; stderr: string }>((resolve) => {
    execFile(process.execPath, args, { timeout: 90_000, maxBuffer: 1 << 24 }, (err, stdout, stderr) =>
      resolve({ code: err ? ((err as { code?: number }).code ?? null) : 0, stdout, stderr }),
    );
  });
  const last = stdout.trim().split('\n').pop() ?? '';
  expect(last.startsWith('{'), `no summary; stderr: ${stderr}`).toBe(true);
  const s = JSON.parse(last);
  const mem = s.mem as MemRow[];
  console.log(
    `[reliability] fuzz 30 s (${engine}): ${s.connections} connections, ${s.packets} packets, ${(s.bytes / 2 ** 20).toFixed(1)} MiB sent, ` +
      `probes ${s.probesOk} ok / ${s.probesFailed} failed, RSS ${s.rssFirstMiB} -> max ${s.rssMaxMiB} MiB, ` +
      `heap after GC ${mem[0]?.heap} -> ${mem[mem.length - 1]?.heap} MiB, seed ${s.seed}`,
  );
  expect(s.engine).toBe(engine);
  expect(s.crashed).toBe(false);
  expect(s.probesFailed).toBe(0);
  expect(s.probesOk).toBeGreaterThanOrEqual(5);
  expect(s.connections).toBeGreaterThan(300);
  for (const kind of ['mutated', 'hugeLength', 'truncated', 'unknownCommand', 'badMacros', 'outOfOrder', 'nulsInStrings', 'garbage']) {
    expect(s.byKind[kind]).toBeGreaterThan(10);
  }
  expect(s.diag.created).toBeGreaterThan(0);
  expect(s.diag.created).toBe(s.diag.deleted);
  // Nothing held once every connection has gone: no engine session or
  // connection, no session state in the milter.
  expect(s.diag.held).toBe(0);
  expect(mem[mem.length - 1].live).toBe(0);
  expect(s.counts.dupCloses).toBe(0);
  expect(s.rssMaxMiB - s.rssBaseMiB).toBeLessThan(48);
  // A GC'd memory sample per tenth of the run plus the final one.
  expect(mem.length).toBeGreaterThanOrEqual(6);
  expect(mem[mem.length - 1].heap - mem[0].heap).toBeLessThan(16);
  expect(code).toBe(0);
  return s;
}

describe('fuzzing the listening milter', () => {
  it('libmilter engine: survives 30 s of random and mutated packets with memory bounded', async () => {
    await fuzz('libmilter');
  }, 120_000);

  it('TypeScript engine: survives 30 s of random and mutated packets with memory bounded', async () => {
    const s = await fuzz('node');
    // The TypeScript engine also counts MTA connections; it saw every one the fuzzer made that got through.
    expect(s.diag.connections).toBeGreaterThan(300);
  }, 120_000);
});
