/**
 * examples/smtp-server.ts end to end: an SMTP client submits to the example
 * MTA (smtp-server + nodemilter/mta), which filters through nodemilter's
 * sample milter (on each engine) and OpenDKIM signing in one chain and
 * delivers to a directory; the delivered message must verify (mailauth,
 * with the key served by a local resolver) and carry the sample milter's
 * changes. Also: SMTP replies of a milter's reject and of a failed milter.
 */
import * as fs from 'fs';
import * as net from 'net';
import * as path from 'path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { ENGINES, FIXTURES, freeInetSpec, freePort, startProcess, tmpDir, type RunningProcess } from '../helpers';
import { smtpSend } from '../helpers/postfix';
import { dist, startExample } from '../examples/common';
import { dkimResults, makeDkimKey, realMiltersUnavailable, startOpenDKIM, type DkimKey, type RealMilter } from './real-milters';

const realWhy = realMiltersUnavailable();
const example = dist<typeof import('../../examples/smtp-server')>('examples/smtp-server');

const MESSAGE = [
  'From: Alice <alice@example.com>',
  'To: Bob <bob@example.org>',
  'Subject: a page with a script',
  'Date: Tue, 01 Dec 2026 20:00:00 +0000',
  'Message-ID: <smtp-server-example@example.com>',
  'MIME-Version: 1.0',
  'Content-Type: multipart/alternative; boundary="b1"',
  '',
  '--b1',
  'Content-Type: text/plain; charset=us-ascii',
  '',
  'Hello Bob.',
  '--b1',
  'Content-Type: text/html; charset=us-ascii',
  '',
  '<p>Hello Bob.</p><script>alert(1)</script>',
  '--b1--',
  '',
].join('\r\n');

describe.skipIf(realWhy !== undefined && process.env.NODEMILTER_SKIP_REAL_MILTERS === '1').each(ENGINES)('examples/smtp-server.ts (sample milter on the %s engine)', (engine) => {
  let dkim: RealMilter | undefined;
  let sample: RunningProcess | undefined;
  let mta: Awaited<ReturnType<typeof example.startMta>> | undefined;
  const mailDir = tmpDir('nm-mta-mail-');
  let key: DkimKey | undefined;

  beforeAll(async () => {
    if (realWhy) return;
    key = makeDkimKey('example.com', 'sel');
    dkim = await startOpenDKIM(key!, 'sign');
    const spec = await freeInetSpec();
    sample = await startExample('sample', spec, { engine });
    mta = await example.startMta({ milters: [spec, dkim.spec], mailDir, port: 0, hostname: 'mx.test.example' });
  }, 30_000);
  afterAll(async () => {
    await mta?.close();
    await sample?.stop();
    await dkim?.stop();
    key?.remove();
    fs.rmSync(mailDir, { recursive: true, force: true });
  });

  it('real milters are installed and we are root (set NODEMILTER_SKIP_REAL_MILTERS=1 to skip)', () => {
    expect(realWhy).toBeUndefined();
  });

  it('delivers a message the sample milter cleaned and OpenDKIM signed; it verifies', async () => {
    const t = await smtpSend(mta!.port, { from: '<alice@example.com>', rcpts: ['<bob@example.org>'], message: MESSAGE, helo: 'client.example.com' });
    expect(t.end?.code).toBe(250);
    const id = /queued as ([0-9A-F]+)/.exec(t.end!.raw)![1];
    const file = path.join(mailDir, 'new', `${id}.eml`);
    const delivered = fs.readFileSync(file);
    const envelope = JSON.parse(fs.readFileSync(path.join(mailDir, 'new', `${id}.json`), 'utf8'));
    expect(envelope).toMatchObject({ sender: '<alice@example.com>', recipients: [{ address: '<bob@example.org>' }], quarantine: [] });
    const text = delivered.toString('latin1');
    expect(text).toMatch(/^DKIM-Signature: v=1; a=rsa-sha256; c=relaxed\/relaxed; d=example.com; s=sel;\r\n/);
    expect(text).toMatch(/\r\nReceived: from client.example.com \(.*\[127.0.0.1\]\)\r\n\tby mx.test.example \(nodemilter\) with E?SMTP id [0-9A-F]+\r\n\tfor <bob@example.org>; /);
    expect(text).not.toContain('<script>');
    expect(text).toContain('<p>Hello Bob.</p>');
    expect(await dkimResults(delivered, key!)).toEqual(['pass']);
  });

  it('a milter reject at RCPT is the SMTP reply, with the milter\'s text', async () => {
    const t = await smtpSend(mta!.port, { from: '<alice@example.com>', rcpts: ['<MAILER-DAEMON@example.org>'], message: MESSAGE });
    expect(t.rcpt[0].raw).toBe('550 5.1.1 MAILER-DAEMON does not take mail');
    expect(t.data).toBeUndefined();
  });
});

/** The server's first reply, read until it closes the connection. */
function greeting(port: number): Promise<string> {
  return new Promise((resolve, reject) => {
    let text = '';
    const s = net.createConnection({ port, host: '127.0.0.1' });
    s.setEncoding('latin1');
    s.on('data', (d: string) => (text += d));
    s.on('error', reject);
    s.on('close', () => resolve(text));
  });
}

describe('smtp-server hooks and a client that goes away', () => {
  it('a client that drops the connection in the middle of DATA leaves no milter connection behind', async () => {
    const { SMTPServer } = require('smtp-server');
    const { Milters, smtpServerHooks } = dist<typeof import('../../src/mta')>('src/mta/index');
    const spec = await freeInetSpec();
    const e2e = await startProcess(process.execPath, { args: [path.join(FIXTURES, 'e2e', 'milter.cjs'), spec], socket: spec, stopSignal: 'SIGKILL' });
    const milters = new Milters([spec]);
    let delivered = 0;
    const server = new SMTPServer({
      authOptional: true,
      disabledCommands: ['AUTH', 'STARTTLS'],
      disableReverseLookup: true,
      logger: false,
      ...smtpServerHooks(milters, { deliver: async () => void delivered++ }),
    });
    const port = await freePort();
    await new Promise<void>((r) => server.listen(port, '127.0.0.1', r));
    try {
      const sock = net.createConnection({ port, host: '127.0.0.1' });
      sock.setEncoding('latin1');
      let text = '';
      sock.on('data', (d: string) => (text += d));
      const waitFor = async (re: RegExp) => {
        const end = Date.now() + 10_000;
        while (!re.test(text)) {
          if (Date.now() > end) throw new Error(`no ${re} in ${JSON.stringify(text)}`);
          await new Promise((r) => setTimeout(r, 20));
        }
      };
      await waitFor(/^220 /m);
      for (const [cmd, re] of [['EHLO c.example', /^250 /m], ['MAIL FROM:<a@example.com>', /^250 Accepted/m], ['RCPT TO:<b@example.org>', /^250 Accepted[\s\S]*$/], ['DATA', /^354 /m]] as const) {
        text = '';
        sock.write(`${cmd}\r\n`);
        await waitFor(re);
      }
      expect(milters.pools[0].stats.busy).toBe(1);
      sock.write('Subject: half a message\r\n\r\nsome bo');
      await new Promise((r) => setTimeout(r, 100));
      sock.destroy();
      const end = Date.now() + 10_000;
      while (milters.pools[0].stats.busy > 0 && Date.now() < end) await new Promise((r) => setTimeout(r, 20));
      expect(milters.pools[0].stats).toMatchObject({ busy: 0, open: 0 });
      expect(delivered).toBe(0);
      // the milter saw the session end (not only the readiness probe's close)
      await e2e.waitForOutput(/"ev":"connect"[\s\S]*"ev":"close"/);
    } finally {
      await new Promise((r) => server.close(r));
      await milters.close();
      await e2e.stop();
    }
  });
});

describe('smtp-server hooks with a failing milter', () => {
  it('defaultAction tempfail: 451 4.7.1 at connect, like Postfix', async () => {
    const mailDir = tmpDir('nm-mta-mail-');
    const dead = `inet:${await freePort()}@127.0.0.1`;
    const mta = await example.startMta({ milters: [dead], mailDir, port: 0, defaultAction: 'tempfail' });
    try {
      expect(await greeting(mta.port)).toBe('451 4.7.1 Service unavailable - try again later\r\n');
    } finally {
      await mta.close();
      fs.rmSync(mailDir, { recursive: true, force: true });
    }
  });

  it('defaultAction accept: the mail goes through without the milter', async () => {
    const mailDir = tmpDir('nm-mta-mail-');
    const dead = `inet:${await freePort()}@127.0.0.1`;
    const mta = await example.startMta({ milters: [dead], mailDir, port: 0, defaultAction: 'accept' });
    try {
      const t = await smtpSend(mta.port, { from: '<a@example.com>', rcpts: ['<b@example.org>'], message: MESSAGE });
      expect(t.end?.code).toBe(250);
      expect(fs.readdirSync(path.join(mailDir, 'new')).filter((f) => f.endsWith('.eml'))).toHaveLength(1);
    } finally {
      await mta.close();
      fs.rmSync(mailDir, { recursive: true, force: true });
    }
  });
});
