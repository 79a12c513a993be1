/**
 * A minimal SMTP server that keeps every byte an MTA relays, for checks
 * smtp-sink cannot make: smtp-sink's dump drops carriage returns, so a bare
 * CR (`one\r\r\n`) would look like a clean CRLF there. It accepts any
 * EHLO/HELO, MAIL, RCPT, RSET, NOOP and QUIT, and DATA up to the final dot;
 * nothing else (no extensions are announced, so the MTA sends plain SMTP).
 */
import * as net from 'net';

/** A message the sink received: the DATA bytes exactly as sent, the final dot line removed and dots unstuffed. */
export interface RawMessage {
  mailFrom: string;
  rcptTo: string[];
  data: Buffer;
}

/** A running {@link startRawSink}. */
export interface RawSink {
  readonly port: number;
  readonly messages: RawMessage[];
  /** Wait until a message whose DATA contains `marker` arrived. */
  waitFor(marker: string, timeout?: number): Promise<RawMessage>;
  stop(): Promise<void>;
}

/** Start the sink on a free port of 127.0.0.1. */
export async function startRawSink(): Promise<RawSink> {
  const messages: RawMessage[] = [];
  const sockets = new Set<net.Socket>();
  const server = net.createServer((sock) => {
    sockets.add(sock);
    sock.on('close', () => sockets.delete(sock));
    sock.on('error', () => undefined);
    let buf = Buffer.alloc(0);
    let inData = false;
    let cur: RawMessage = { mailFrom: '', rcptTo: [], data: Buffer.alloc(0) };
    const reply = (s: string) => sock.write(`${s}\r\n`);
    reply('220 rawsink.test ESMTP');
    sock.on('data', (chunk: Buffer) => {
      buf = Buffer.concat([buf, chunk]);
      for (;;) {
        if (inData) {
          // An empty message: the final dot comes right after DATA.
          const empty = buf.length >= 3 && buf[0] === 0x2e && buf[1] === 0x0d && buf[2] === 0x0a;
          const end = empty ? -1 : buf.indexOf('\r\n.\r\n');
          if (end < 0 && !empty) return;
          const body = empty ? '' : buf.subarray(0, end + 2).toString('latin1').replace(/^\.\./gm, '.');
          buf = buf.subarray(empty ? 3 : end + 5);
          inData = false;
          messages.push({ ...cur, data: Buffer.from(body, 'latin1') });
          cur = { mailFrom: '', rcptTo: [], data: Buffer.alloc(0) };
          reply('250 2.0.0 Ok: kept');
          continue;
        }
        const nl = buf.indexOf('\r\n');
        if (nl < 0) return;
        const line = buf.subarray(0, nl).toString('latin1');
        buf = buf.subarray(nl + 2);
        const verb = line.slice(0, 4).toUpperCase();
        if (verb === 'EHLO' || verb === 'HELO') reply('250 rawsink.test');
        else if (verb === 'MAIL') {
          cur.mailFrom = line.replace(/^MAIL FROM:\s*/i, '').trim();
          reply('250 2.1.0 Ok');
        } else if (verb === 'RCPT') {
          cur.rcptTo.push(line.replace(/^RCPT TO:\s*/i, '').trim());
          reply('250 2.1.5 Ok');
        } else if (verb === 'DATA') {
          inData = true;
          reply('354 End data with <CR><LF>.<CR><LF>');
        } else if (verb === 'RSET' || verb === 'NOOP') reply('250 2.0.0 Ok');
        else if (verb === 'QUIT') {
          reply('221 2.0.0 Bye');
          sock.end();
          return;
        } else reply('502 5.5.2 Not implemented');
      }
    });
  });
  await new Promise<void>((resolve, reject) => {
    server.once('error', reject);
    server.listen(0, '127.0.0.1', () => resolve());
  });
  const port = (server.address() as net.AddressInfo).port;
  return {
    port,
    messages,
    async waitFor(marker, timeout = 20_000) {
      const until = Date.now() + timeout;
      for (;;) {
        const m = messages.find((x) => x.data.includes(marker));
        if (m) return m;
        if (Date.now() > until) throw new Error(`rawsink: no message with ${JSON.stringify(marker)} within ${timeout} ms (${messages.length} received)`);
        await new Promise((r) => setTimeout(r, 50));
      }
    },
    async stop() {
      for (const s of sockets) s.destroy();
      await new Promise<void>((resolve) => server.close(() => resolve()));
    },
  };
}
