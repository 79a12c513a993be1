// The worked example (dist/examples/greylist.js) as a fleet: two milter
// processes (runmilter, libmilter) sharing one real redis-server, driven by
// the MTA-side MilterClient. Also the single-host SQLite setup, the
// {auth_authen} exemption and the access map.
import * as fs from 'node:fs';
import * as path from 'node:path';
import { afterEach, describe, expect, it } from 'vitest';

import { MilterClient } from '../src/testing/client';
import type { EomAction, MessageSpec } from '../src/testing/client';
import { checkEngine, engineEnv, freeInetSpec, startProcess, stopAll, tmpDir, type Engine, type RunningProcess } from './helpers';
import { REDIS_AVAILABLE, startRedis } from './helpers/redis';

const EXAMPLE = path.resolve(__dirname, '..', 'dist', 'examples', 'greylist.js');
const GREY_TIME = 1.5; // seconds

afterEach(async () => {
  await stopAll();
});

async function startGreylistMilter(env: Record<string, string>, engine?: Engine): Promise<RunningProcess & { spec: string }> {
  const spec = await freeInetSpec();
  const p = await startProcess(process.execPath, {
    args: [EXAMPLE, spec],
    env: { GREY_TIME: String(GREY_TIME), GREY_EXPIRE: '3600', GREY_RETAIN: '86400', ...(engine ? engineEnv(engine) : {}), ...env },
    socket: spec,
    readyTimeout: 30_000, // generous: CI machines are busy
    stopSignal: 'SIGKILL',
  });
  if (engine) checkEngine(p.pid, engine);
  return Object.assign(p, { spec });
}

function message(ip: string, from: string, rcpt: string, extra: Partial<MessageSpec> = {}): MessageSpec {
  return {
    client: { hostname: 'mail.sender.example', family: 'inet', address: ip, port: 40000 },
    helo: 'mail.sender.example',
    from: `<${from}>`,
    rcpt: [`<${rcpt}>`],
    headers: [['Subject', 'hi']],
    body: 'hello\r\n',
    quit: true,
    ...extra,
  };
}

async function send(spec: string, msg: MessageSpec) {
  const c = await MilterClient.connect(spec);
  try {
    return await c.sendMessage(msg);
  } finally {
    c.destroy();
  }
}

function greyHeader(actions: EomAction[]): string | undefined {
  const a = actions.find((x) => x.type === 'addheader' && x.name === 'X-Greylist');
  return a && 'value' in a ? a.value : undefined;
}

const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

// MX A serves on libmilter, MX B on the TypeScript engine: one fleet, one
// store, both engines.
describe.skipIf(!REDIS_AVAILABLE)('two greylist milters sharing Redis, one per engine', () => {
  it('a retry on the other MX passes: each host sees the triplets the other recorded', async () => {
    const redis = await startRedis();
    const env = { GREYLIST_STORE: redis.url, GREYLIST_PREFIX: 'fleet:' };
    const [a, b] = await Promise.all([startGreylistMilter(env, 'libmilter'), startGreylistMilter(env, 'node')]);

    // First attempt on MX A: 451 4.7.1.
    const first = await send(a.spec, message('192.0.2.7', 'alice@example.org', 'bob@example.net'));
    expect(first.envrcpt[0].status).toBe('tempfail');
    expect(first.envrcpt[0].reply).toMatchObject({ rcode: '451', xcode: '4.7.1' });
    expect(first.envrcpt[0].reply!.text).toMatch(/^Greylisted, please try again in 2 seconds$/);

    await sleep(GREY_TIME * 1000 + 300);
    // The retry lands on MX B, which never saw the triplet itself: it passes
    // only because A's first attempt is in the shared store.
    const retry = await send(b.spec, message('192.0.2.7', 'alice@example.org', 'bob@example.net'));
    expect(retry.envrcpt[0].status).toBe('continue');
    expect(retry.decision).toBe('continue');
    expect(greyHeader(retry.actions)).toMatch(/^passed on .*: <bob@example\.net> count=1 delay=\d+s$/);
    // And A counts on from B's pass (its own state alone would say 1).
    const again = await send(a.spec, message('192.0.2.7', 'alice@example.org', 'bob@example.net'));
    expect(greyHeader(again.actions)).toMatch(/count=2 /);

    // Another client IP is another triplet: greylisted afresh.
    const other = await send(b.spec, message('192.0.2.8', 'alice@example.org', 'bob@example.net'));
    expect(other.envrcpt[0].status).toBe('tempfail');
  }, 90_000); // child processes on a busy machine

  it('counts concurrent retries of one triplet from many connections to both hosts exactly', async () => {
    const redis = await startRedis();
    const env = { GREYLIST_STORE: redis.url, GREYLIST_PREFIX: 'conc:' };
    const [a, b] = await Promise.all([startGreylistMilter(env, 'libmilter'), startGreylistMilter(env, 'node')]);
    const msg = message('198.51.100.20', 'news@example.org', 'bob@example.net');
    expect((await send(a.spec, msg)).envrcpt[0].status).toBe('tempfail');
    await sleep(GREY_TIME * 1000 + 300);

    const N = 24;
    const clients = await Promise.all(Array.from({ length: N }, (_, i) => MilterClient.connect(i % 2 ? b.spec : a.spec)));
    try {
      const results = await Promise.all(clients.map((c) => c.sendMessage(msg)));
      const counts = results.map((r) => {
        expect(r.decision).toBe('continue');
        const m = /count=(\d+) /.exec(greyHeader(r.actions) ?? '');
        return m ? Number(m[1]) : -1;
      });
      expect(counts.sort((x, y) => x - y)).toEqual(Array.from({ length: N }, (_, i) => i + 1));
    } finally {
      clients.forEach((c) => c.destroy());
    }
  }, 90_000); // child processes on a busy machine
});

describe('the greylist example on one host (SQLite)', () => {
  it('greylists, exempts {auth_authen} senders and access-map entries, and keeps state across a restart', async () => {
    const dir = tmpDir('nm-greyex-');
    const access = path.join(dir, 'access');
    fs.writeFileSync(access, '# test access map\nConnect:203.0.113 OK\nFrom:spammer@ ERROR:5.7.1:550 Not from you\nTo:postmaster@ OK\n');
    const env = { GREYLIST_STORE: path.join(dir, 'grey.db'), GREYLIST_ACCESS: access };
    let m = await startGreylistMilter(env);

    // An authenticated sender is not greylisted (Postfix sends {auth_authen} with MAIL FROM).
    const auth = await send(m.spec, message('192.0.2.50', 'carol@example.org', 'dan@example.net', { macros: { envfrom: { '{auth_authen}': 'carol' } } }));
    expect(auth.envrcpt[0].status).toBe('continue');
    expect(greyHeader(auth.actions)).toMatch(/^not greylisted on .*: authenticated as carol$/);
    // The same message without authentication is.
    const unauth = await send(m.spec, message('192.0.2.50', 'carol@example.org', 'dan@example.net'));
    expect(unauth.envrcpt[0].status).toBe('tempfail');

    // Access map: a trusted network, a refused sender, an always-open recipient.
    const trusted = await send(m.spec, message('203.0.113.9', 'x@example.org', 'dan@example.net'));
    expect(greyHeader(trusted.actions)).toMatch(/access map \(Connect:203\.0\.113\)/);
    const spam = await send(m.spec, message('192.0.2.51', 'spammer@bad.example', 'dan@example.net'));
    expect(spam.envfrom?.status).toBe('reject');
    expect(spam.envfrom?.reply).toMatchObject({ rcode: '550', xcode: '5.7.1', text: 'Not from you' });
    const pm = await send(m.spec, message('192.0.2.52', 'y@example.org', 'postmaster@example.net'));
    expect(pm.envrcpt[0].status).toBe('continue');

    // Restart the milter: the first attempt recorded before is remembered.
    await m.stop();
    await sleep(GREY_TIME * 1000 + 300);
    m = await startGreylistMilter(env);
    const retry = await send(m.spec, message('192.0.2.50', 'carol@example.org', 'dan@example.net'));
    expect(retry.envrcpt[0].status).toBe('continue');
    expect(greyHeader(retry.actions)).toMatch(/count=1 /);
  }, 90_000); // child processes on a busy machine
});
