// The API reference must build with zero warnings (typedoc.json has
// treatWarningsAsErrors and validation.notDocumented), so an undocumented
// export or a broken {@link} fails the suite. --emit none: nothing is
// written; --skipErrorChecking: tsc already type-checks in CI, and typedoc's
// own check doubles the time (~10 s quiet, several times that on a loaded
// 2-core machine).
import { execFile } from 'node:child_process';
import * as path from 'node:path';
import { promisify } from 'node:util';
import { describe, expect, it } from 'vitest';

const ROOT = path.resolve(__dirname, '..');
const run = promisify(execFile);

describe('API docs (typedoc)', () => {
  it('builds from typedoc.json with no warning and no error', async () => {
    const typedoc = path.join(ROOT, 'node_modules', 'typedoc', 'bin', 'typedoc');
    let out = '';
    let code = 0;
    try {
      const r = await run(process.execPath, [typedoc, '--emit', 'none', '--skipErrorChecking'], { cwd: ROOT, env: { ...process.env, NO_COLOR: '1', FORCE_COLOR: '0' } });
      out = r.stdout + r.stderr;
    } catch (err) {
      const e = err as { code?: number; stdout?: string; stderr?: string };
      code = e.code ?? 1;
      out = (e.stdout ?? '') + (e.stderr ?? '');
    }
    expect(out).not.toMatch(/\[(warning|error)\]/);
    expect(code).toBe(0);
  }, 120_000);
});
