// The auth examples behind a real Postfix (test/helpers/postfix.ts), on both
// engines: a message signed by dkim-sign verifies, as smtp-sink received it,
// with mailauth; dmarc refuses a DMARC failure with DMARC_REJECT=1, holds one
// with DMARC_QUARANTINE=1 and tempfails a DNS outage with DMARC_TEMPFAIL=1; srs gives
// a forwarded message an SRS sender, and a bounce to that address reaches
// the original sender.
//
// Without Postfix (or root) this file fails, unless NODEMILTER_SKIP_POSTFIX=1
// is set outside CI.
import { afterEach, describe, expect, it } from 'vitest';

import { ENGINES, freeInetSpec, stopAll } from '../helpers';
import * as path from 'node:path';

import { hasQueueId, mayskipPostfix, postfixUnavailable, readSink, startPostfix, stopAllPostfix } from '../helpers/postfix';
import type { DeliveredMessage, PostfixInstance } from '../helpers/postfix';
import { dist, startExample, testing } from '../examples/common';
import { OFFLINE, OUTGOING, PHISH, SIGNER_ENV, ZONE } from './common';

const auth = dist<typeof import('../../src/auth/index')>('src/auth/index');
const sign = dist('examples/dkim-sign');
const skip = postfixUnavailable() !== undefined && mayskipPostfix();

/**
 * The sink's copy of `queueId`. PostfixInstance.waitDelivered matches log
 * lines "to=<...>, relay=", which an aliased recipient's line
 * ("to=<...>, orig_to=<...>, relay=") is not, so read the sink directly.
 */
async function sunk(pf: PostfixInstance, queueId: string, timeout = 15_000): Promise<DeliveredMessage> {
  const deadline = Date.now() + timeout;
  for (;;) {
    const found = readSink(path.join(pf.dir, 'sink')).find((m) => hasQueueId(m.message, queueId));
    if (found) return found;
    if (Date.now() > deadline) throw new Error(`${queueId} did not reach the sink within ${timeout} ms; mail log:\n${pf.log()}`);
    await new Promise((r) => setTimeout(r, 50));
  }
}

afterEach(async () => {
  await stopAllPostfix();
  await stopAll();
});

describe.skipIf(skip).each(ENGINES)('auth examples behind Postfix, %s engine', (engine) => {
  it('dkim-sign: the delivered message verifies byte for byte (simple/simple and relaxed, RSA and Ed25519)', async () => {
    for (const canon of ['simple/simple', 'relaxed/relaxed']) {
      const spec = await freeInetSpec();
      const milter = await startExample('dkim-sign', spec, { env: { ...SIGNER_ENV, DKIM_CANONICALIZATION: canon }, engine });
      const pf = await startPostfix({ milter: spec });
      try {
        const t = await pf.send({ from: '<alice@example.com>', rcpts: ['<bob@example.org>'], message: OUTGOING });
        expect(t.end?.code).toBe(250);
        const [d] = await pf.waitDelivered(t.queueId!);
        const lines = d.message.split('\r\n');
        // Ours on top, above the Received header Postfix added (which is not signed).
        expect(lines[0]).toMatch(new RegExp(`^DKIM-Signature: v=1; a=rsa-sha256; c=${canon.replace('/', '\\/')}; d=example\\.com;$`));
        expect(d.message).toMatch(/\r\nReceived: from client\.test\.example \(localhost \[127\.0\.0\.1\]\)/);
        expect(d.message).toContain('Subject:  two  spaces\r\nCc:\tcarol@example.org\r\nX-Tight:no space\r\n');
        const v = await auth.verifyMessage(d.message, { authservId: 'mx.next', resolver: auth.staticResolver(ZONE) });
        expect(v.dkim.map((x) => `${x.selector}=${x.result}`)).toEqual(['rsa2026=pass', 'ed2026=pass']);
        expect(v.dmarc?.result).toBe('pass');
      } finally {
        await pf.stop();
        await milter.stop();
      }
    }
  });

  it('dmarc: a DMARC failure under p=reject is refused (DMARC_REJECT=1); other mail is delivered with one Authentication-Results', async () => {
    const spec = await freeInetSpec();
    await startExample('dmarc', spec, {
      script: OFFLINE,
      env: { AUTH_TEST_EXAMPLE: 'dmarc', AUTH_TEST_ZONE: JSON.stringify(ZONE), DMARC_AUTHSERV_ID: 'mta.test.example', DMARC_REJECT: '1' },
      engine,
    });
    const pf = await startPostfix({ milter: spec });
    const r = await pf.send({ from: '<x@evil.example>', rcpts: ['<victim@example.org>'], message: PHISH });
    expect(r.end?.code).toBe(550);
    expect(r.end?.lines[0]).toBe('5.7.1 Message rejected: DMARC policy of bank.example is reject');

    // Signed simple/simple over headers with odd spacing (dkim-sign, in process): dmarc sees the raw bytes and passes it.
    sign.configure({ ...SIGNER_ENV, DKIM_CANONICALIZATION: 'simple/simple' });
    const st = new testing.TestCtx(sign.DkimSignMilter);
    await st.feedMessage(OUTGOING, {});
    const signed = st.resultMessage();
    await st.close();
    const sp = await pf.send({ from: '<x@evil.example>', rcpts: ['<victim@example.org>'], message: signed });
    expect(sp.end?.code).toBe(250);
    const [sd] = await pf.waitDelivered(sp.queueId!);
    const sar = /^Authentication-Results: (.*(?:\r\n\t.*)*)\r\n/m.exec(sd.message)![1];
    expect(sar).toMatch(/\tdkim=pass header\.d=example\.com header\.s=rsa2026 [^\r]*;\r\n\tdkim=pass header\.d=example\.com header\.s=ed2026 [^\r]*;\r\n\tdmarc=pass /);

    const ok = PHISH.replace(/bank\.example/g, 'nodmarc.example');
    const forged = `Authentication-Results: mta.test.example; dmarc=pass header.from=nodmarc.example\r\n${ok}`;
    const t = await pf.send({ from: '<x@evil.example>', rcpts: ['<victim@example.org>'], message: forged });
    expect(t.end?.code).toBe(250);
    const [d] = await pf.waitDelivered(t.queueId!);
    expect(d.message.match(/^Authentication-Results:/gm)).toHaveLength(1);
    expect(d.message).toMatch(/^Authentication-Results: mta\.test\.example;\r\n\tspf=none .*\r\n\tspf=none .*\r\n\tdkim=none \(message not signed\);\r\n\tdmarc=none header\.from=nodmarc\.example\r\n/);
  });

  it('dmarc: a p=quarantine failure goes to the hold queue (DMARC_QUARANTINE=1); a DNS outage gives 451 4.4.3 (DMARC_TEMPFAIL=1)', async () => {
    const spec = await freeInetSpec();
    await startExample('dmarc', spec, {
      script: OFFLINE,
      env: { AUTH_TEST_EXAMPLE: 'dmarc', AUTH_TEST_ZONE: JSON.stringify(ZONE), DMARC_AUTHSERV_ID: 'mta.test.example', DMARC_QUARANTINE: '1' },
      engine,
    });
    const pf = await startPostfix({ milter: spec });
    const q = await pf.send({ from: '<x@evil.example>', rcpts: ['<victim@example.org>'], message: PHISH.replace(/bank\.example/g, 'shop.example') });
    expect(q.end?.code).toBe(250);
    const until = Date.now() + 10_000;
    while (!(await pf.heldQueueIds()).includes(q.queueId!) && Date.now() < until) await new Promise((r) => setTimeout(r, 100));
    expect(await pf.heldQueueIds()).toContain(q.queueId);
    expect(pf.log()).toMatch(new RegExp(`${q.queueId}: milter-hold: END-OF-MESSAGE from localhost\\[127\\.0\\.0\\.1\\]: milter triggers HOLD action`));

    const outage = await freeInetSpec();
    await startExample('dmarc', outage, {
      script: OFFLINE,
      env: { AUTH_TEST_EXAMPLE: 'dmarc', AUTH_TEST_DNS: 'hang', DNS_TIMEOUT: '300', DMARC_AUTHSERV_ID: 'mta.test.example', DMARC_REJECT: '1', DMARC_TEMPFAIL: '1' },
      engine,
    });
    const pf2 = await startPostfix({ milter: outage });
    const t0 = Date.now();
    const r = await pf2.send({ from: '<x@evil.example>', rcpts: ['<victim@example.org>'], message: PHISH });
    expect(r.end?.code).toBe(451);
    expect(r.end?.lines[0]).toBe('4.4.3 DMARC check of bank.example failed temporarily (DNS), try again later');
    expect(Date.now() - t0).toBeLessThan(10_000); // each lookup is cut at 300 ms
  });

  it('srs: a forwarded message leaves with an SRS0 sender; a bounce to it reaches the original sender', async () => {
    const spec = await freeInetSpec();
    await startExample('srs', spec, { env: { SRS_DOMAIN: 'fwd.example.org', SRS_SECRETS: 'tops3cr3t', SRS_EXCLUDE_DOMAINS: 'example.org' }, engine });
    // user@example.org forwards to dest@far.example (Postfix's virtual aliases, expanded after the milter).
    const pf = await startPostfix({ milter: spec, main: { virtual_alias_maps: 'inline:{ user@example.org=dest@far.example }' } });
    const t = await pf.send({ from: '<alice@origin.example>', rcpts: ['<user@example.org>'], message: PHISH });
    expect(t.end?.code).toBe(250);
    const fwd = await sunk(pf, t.queueId!);
    expect(fwd.rcptArgs).toEqual(['<dest@far.example> ORCPT=rfc822;user@example.org']);
    const m = /^<(SRS0=[^=]{4}=[A-Z2-7]{2}=origin\.example=alice@fwd\.example\.org)>/.exec(fwd.mailArgs);
    expect(m, fwd.mailArgs).not.toBeNull();
    expect(pf.log()).toMatch(new RegExp(`${t.queueId}: from=<${m![1].replace(/[.+]/g, '\\$&')}>`));

    // far.example bounces it: a DSN from the null sender to the SRS address.
    const bounce = await pf.send({ from: '<>', rcpts: [`<${m![1]}>`], message: 'From: MAILER-DAEMON@far.example\r\nSubject: Undelivered Mail\r\n\r\nNo such user.\r\n' });
    expect(bounce.end?.code).toBe(250);
    const back = await sunk(pf, bounce.queueId!);
    expect(back.rcptArgs).toHaveLength(1);
    expect(back.rcptArgs[0]).toMatch(/^<alice@origin\.example>( |$)/);
    expect(back.message).toContain('No such user.');
    expect(back.mailArgs).toMatch(/^<>/);

    // A forged SRS address is refused at RCPT.
    const forged = await pf.send({ from: '<>', rcpts: [`<${m![1].replace(/^SRS0=..../, 'SRS0=AAAA')}>`], message: 'Subject: x\r\n\r\nx\r\n' });
    expect(forged.rcpt[0].code).toBe(550);
    expect(forged.rcpt[0].lines[0]).toMatch(/^5\.1\.1 Invalid SRS address/);
  });
});
