/**
 * An SMTP server that keeps the exact bytes of each message relayed to it
 * (dot-unstuffed), with its MAIL FROM and RCPT TO arguments. smtp-sink's
 * dumps drop a CR before CRLF (Postfix sends a value `one\r\n\ttwo` from
 * addheader as `one\r\r\n\ttwo`, smtp-sink writes `one\r\n\ttwo`), so the
 * conformance suite compares against this instead.
 */
import * as net from 'net';
import { freePort } from '../helpers';

/** One captured message. */
export interface Captured {
  mailFrom: string;
  rcptTo: string[];
  /** The message bytes (latin1), CRLF as sent, dot-unstuffed, without the final dot line. */
  message: string;
}

/** A running capture server. */
export interface CaptureSink {
  port: number;
  messages: Captured[];
  /** Wait for a message whose text contains `marker`. */
  waitFor(marker: string, timeout?: number): Promise<Captured>;
  close(): Promise<void>;
}

/** Start a capture server on a free loopback port. */
export async function startCaptureSink(): Promise<CaptureSink> {
  const messages: Captured[] = [];
  const socks = new Set<net.Socket>();
  const server = net.createServer((s) => {
    socks.add(s);
    s.on('close', () => socks.delete(s));
    s.on('error', () => undefined);
    s.write('220 capture ESMTP\r\n');
    let buf = '';
    let data: string | undefined;
    let cur: Captured = { mailFrom: '', rcptTo: [], message: '' };
    s.setEncoding('latin1');
    s.on('data', (d: string) => {
      buf += d;
      for (;;) {
        if (data !== undefined) {
          const end = buf.indexOf('\r\n.\r\n');
          const startEnd = data === '' && buf.startsWith('.\r\n');
          if (end < 0 && !startEnd) return;
          const body = startEnd ? '' : buf.slice(0, end + 2);
          buf = startEnd ? buf.slice(3) : buf.slice(end + 5);
          cur.message = body.replace(/^\.\./gm, '.');
          messages.push(cur);
          cur = { mailFrom: '', rcptTo: [], message: '' };
          data = undefined;
          s.write('250 2.0.0 captured\r\n');
          continue;
        }
        const nl = buf.indexOf('\r\n');
        if (nl < 0) return;
        const line = buf.slice(0, nl);
        buf = buf.slice(nl + 2);
        if (/^(EHLO|HELO)/i.test(line)) s.write('250 capture\r\n');
        else if (/^MAIL FROM:/i.test(line)) {
          cur.mailFrom = line.slice(10).trim();
          s.write('250 2.1.0 ok\r\n');
        } else if (/^RCPT TO:/i.test(line)) {
          cur.rcptTo.push(line.slice(8).trim());
          s.write('250 2.1.5 ok\r\n');
        } else if (/^DATA/i.test(line)) {
          data = '';
          s.write('354 go ahead\r\n');
        } else if (/^QUIT/i.test(line)) {
          s.write('221 2.0.0 bye\r\n');
          s.end();
          return;
        } else s.write('250 2.0.0 ok\r\n');
      }
    });
  });
  const port = await freePort();
  await new Promise<void>((r) => server.listen(port, '127.0.0.1', r));
  return {
    port,
    messages,
    async waitFor(marker, timeout = 20_000) {
      const until = Date.now() + timeout;
      for (;;) {
        const m = messages.find((x) => x.message.includes(marker));
        if (m) return m;
        if (Date.now() > until) throw new Error(`no message with ${JSON.stringify(marker)} within ${timeout} ms (${messages.length} captured)`);
        await new Promise((r) => setTimeout(r, 50));
      }
    },
    close: () =>
      new Promise<void>((r) => {
        for (const s of socks) s.destroy();
        server.close(() => r());
      }),
  };
}
