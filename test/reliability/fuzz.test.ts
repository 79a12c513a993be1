// The short version of the socket fuzzer (scripts/reliability/fuzz.cjs; the
// long run is `npm run fuzz -- --minutes 5`): 30 s of hostile packets on a
// listening milter, which must not crash, must keep answering well-formed
// messages, and must keep its RSS bounded.
import { execFile } from 'node:child_process';
import * as path from 'node:path';
import { describe, expect, it } from 'vitest';

import { ROOT } from './lib';

describe('fuzzing the listening milter', () => {
  it('survives 30 s of random and mutated packets with memory bounded', async () => {
    const script = path.join(ROOT, 'scripts', 'reliability', 'fuzz.cjs');
    const { code, stdout, stderr } = await new Promise<{ code: number | null; stdout: string; stderr: string }>((resolve) => {
      execFile(process.execPath, [script, '--seconds', '30', '--conns', '6', '--max-growth-mib', '48'], { timeout: 90_000, maxBuffer: 1 << 24 }, (err, stdout, stderr) =>
        resolve({ code: err ? ((err as { code?: number }).code ?? null) : 0, stdout, stderr }),
      );
    });
    const last = stdout.trim().split('\n').pop() ?? '';
    expect(last.startsWith('{'), `no summary; stderr: ${stderr}`).toBe(true);
    const s = JSON.parse(last);
    console.log(`[reliability] fuzz 30 s: ${s.connections} connections, ${s.packets} packets, ${(s.bytes / 2 ** 20).toFixed(1)} MiB sent, probes ${s.probesOk} ok / ${s.probesFailed} failed, RSS ${s.rssFirstMiB} -> max ${s.rssMaxMiB} MiB, seed ${s.seed}`);
    expect(s.crashed).toBe(false);
    expect(s.probesFailed).toBe(0);
    expect(s.probesOk).toBeGreaterThanOrEqual(5);
    expect(s.connections).toBeGreaterThan(300);
    for (const kind of ['mutated', 'hugeLength', 'truncated', 'unknownCommand', 'badMacros', 'outOfOrder', 'nulsInStrings', 'garbage']) {
      expect(s.byKind[kind]).toBeGreaterThan(10);
    }
    expect(s.diag.created).toBe(s.diag.deleted);
    expect(s.counts.dupCloses).toBe(0);
    expect(s.rssMaxMiB - s.rssBaseMiB).toBeLessThan(48);
    expect(code).toBe(0);
  }, 120_000);
});
