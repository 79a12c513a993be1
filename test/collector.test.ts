import { afterAll, beforeAll, describe, expect, test } from 'vitest';
import { existsSync, mkdtempSync, readdirSync, readFileSync, rmSync, statSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { CollectingMilter, MessageCollector, parseMime, readMime } from '../src/mime';
import { ADDHDRS, CONTINUE, TEMPFAIL } from '../src/constants';
import { InvalidArgumentError, MilterStateError } from '../src/errors';
import type { StatusLike } from '../src/types';
import { TestCtx } from '../src/testing';

const FIXTURE = join(__dirname, 'fixtures', 'mime', 'mixed-alternative.eml');
let dir: string;

beforeAll(() => {
  dir = mkdtempSync(join(tmpdir(), 'nodemilter-collector-test-'));
});
afterAll(() => {
  rmSync(dir, { recursive: true, force: true });
});

describe('MessageCollector', () => {
  test('a small message stays in memory and reads back whole', async () => {
    const c = new MessageCollector({ dir });
    c.header('Subject', 'hi\n\tthere');
    c.header('X-Raw', ' leading', true);
    await c.body(Buffer.from('line 1\r\n'));
    await c.body('line 2\r\n');
    expect(c.spooled).toBe(false);
    expect(c.path).toBeUndefined();
    expect(c.bodySize).toBe(16);
    const expected = 'Subject: hi\r\n\tthere\r\nX-Raw: leading\r\n\r\nline 1\r\nline 2\r\n';
    expect((await c.buffer()).toString()).toBe(expected);
    expect((await readMime(c.stream())).toBuffer().toString()).toBe(expected);
    await c.dispose();
    expect(readdirSync(dir)).toEqual([]);
  });

  test('past the threshold the body spools to a 0600 file that dispose removes', async () => {
    const c = new MessageCollector({ threshold: 1000, dir });
    c.header('Subject', 'big');
    const chunk = Buffer.alloc(700, 'a');
    await c.body(chunk);
    expect(c.spooled).toBe(false);
    await c.body(chunk);
    await c.body(chunk);
    expect(c.spooled).toBe(true);
    const path = c.path!;
    expect(path.startsWith(dir)).toBe(true);
    expect(statSync(path).mode & 0o777).toBe(0o600);
    expect(statSync(path).size).toBe(2100);
    const whole = await c.buffer();
    expect(whole.toString()).toBe('Subject: big\r\n\r\n' + 'a'.repeat(2100));
    const streamed = Buffer.concat(await c.stream().toArray());
    expect(streamed.equals(whole)).toBe(true);
    await c.dispose();
    expect(existsSync(path)).toBe(false);
    await c.dispose(); // twice is fine
    expect(c.disposed).toBe(true);
    await expect(c.body('more')).rejects.toThrow(MilterStateError);
    await expect(c.buffer()).rejects.toThrow(/disposed/);
  });

  test('threshold 0 spools at once; the default directory is os.tmpdir()', async () => {
    const c = new MessageCollector({ threshold: 0 });
    await c.body('x');
    expect(c.spooled).toBe(true);
    expect(c.path!.startsWith(tmpdir())).toBe(true);
    await c.dispose();
  });

  test('bad options are typed errors', () => {
    expect(() => new MessageCollector({ threshold: -1 })).toThrow(InvalidArgumentError);
    expect(() => new MessageCollector({ threshold: 1.5 })).toThrow(/threshold 1.5/);
  });
});

/** Paths of spool files seen while collecting, per test. */
const seen: string[] = [];

class Scanner extends CollectingMilter {
  static override flags = ADDHDRS;
  static override collector = { threshold: 256, dir: '' };
  static mode: 'ok' | 'throw' | 'reject' = 'ok';
  static parsed: string[] = [];

  override async body(chunk: Buffer): Promise<number> {
    const st = await super.body(chunk);
    if (this.collected.path && !seen.includes(this.collected.path)) seen.push(this.collected.path);
    return st;
  }

  protected override checkmessage(collected: MessageCollector): StatusLike {
    if (Scanner.mode === 'throw') throw new Error('handler bug');
    if (Scanner.mode === 'reject') return Promise.reject(new Error('async handler bug'));
    return (async () => {
      expect(existsSync(collected.path!)).toBe(true);
      const msg = await readMime(collected.stream());
      Scanner.parsed.push(...msg.getnames());
      this.addheader('X-Names', String(msg.getnames().length));
      return CONTINUE;
    })();
  }
}

describe('CollectingMilter with TestCtx', () => {
  beforeAll(() => {
    Scanner.collector = { threshold: 256, dir };
  });

  const spoolFiles = () => readdirSync(dir);

  test('the spool file is gone after eom, and the handler saw the whole message', async () => {
    Scanner.mode = 'ok';
    seen.length = 0;
    const t = new TestCtx(Scanner);
    expect(await t.feedMessage({ path: FIXTURE }, { chunkSize: 100 })).toBe(CONTINUE);
    expect(seen).toHaveLength(1);
    expect(existsSync(seen[0])).toBe(false);
    expect(Scanner.parsed).toEqual(['setup.exe', 'Rapport annuel été.pdf', 'Привет.txt']);
    expect(t.headerChanges).toEqual([{ op: 'add', name: 'X-Names', value: '3' }]);
    // the next message on the same connection gets a new file, also removed
    await t.feedMessage({ path: FIXTURE });
    expect(seen).toHaveLength(2);
    expect(seen[1]).not.toBe(seen[0]);
    expect(spoolFiles()).toEqual([]);
    await t.close();
  });

  test('the spool file is gone after abort', async () => {
    seen.length = 0;
    const t = new TestCtx(Scanner);
    await t.connect();
    await t.envfrom('<a@example.com>');
    await t.envrcpt('<b@example.org>');
    await t.header('Subject', 'aborted');
    await t.eoh();
    await t.body(Buffer.alloc(1000, 'x'));
    expect(existsSync(seen[0])).toBe(true);
    await t.abort();
    expect(existsSync(seen[0])).toBe(false);
    await t.close();
    expect(spoolFiles()).toEqual([]);
  });

  test('the spool file is gone after close in the middle of a message', async () => {
    seen.length = 0;
    const t = new TestCtx(Scanner);
    await t.connect();
    await t.envfrom('<a@example.com>');
    await t.envrcpt('<b@example.org>');
    await t.body(Buffer.alloc(1000, 'y'));
    expect(existsSync(seen[0])).toBe(true);
    await t.close();
    expect(existsSync(seen[0])).toBe(false);
    expect(spoolFiles()).toEqual([]);
  });

  test.each(['throw', 'reject'] as const)('the spool file is gone when the eom handler fails (%s)', async (mode) => {
    Scanner.mode = mode;
    seen.length = 0;
    const t = new TestCtx(Scanner);
    await expect(t.feedMessage({ path: FIXTURE })).rejects.toThrow(/handler bug/);
    expect(seen).toHaveLength(1);
    expect(existsSync(seen[0])).toBe(false);
    expect(spoolFiles()).toEqual([]);
    await t.close();
    Scanner.mode = 'ok';
  });

  test('with HDR_LEADSPC the collected message is byte for byte what the MTA sent', async () => {
    let collected: Buffer | undefined;
    class Exact extends CollectingMilter {
      static override headerLeadingSpace = true;
      protected override async checkmessage(c: MessageCollector) {
        collected = await c.buffer();
        return TEMPFAIL;
      }
    }
    const t = new TestCtx(Exact);
    expect(await t.feedMessage({ path: FIXTURE })).toBe(TEMPFAIL);
    const raw = readFileSync(FIXTURE);
    expect(collected!.equals(raw)).toBe(true);
    expect(parseMime(collected!).toBuffer().equals(raw)).toBe(true);
    await t.close();
  });
});
