// A raw MTA for the flow-control tests: frames written by hand, a socket the
// test controls (flood it, stop reading, read slowly, half-close it), and a
// reader that counts what the milter sent. MilterClient is the polite MTA;
// this one is the adversary.
import { once } from 'node:events';
import * as net from 'node:net';

import { parseSocketSpec } from '../../src/socketspec';

/** One frame: 4-byte length, command byte, data. */
export function frame(cmd: string, data: Buffer | string = Buffer.alloc(0)): Buffer {
  const d = typeof data === 'string' ? Buffer.from(data, 'latin1') : data;
  const head = Buffer.alloc(5);
  head.writeUInt32BE(d.length + 1, 0);
  head[4] = cmd.charCodeAt(0);
  return Buffer.concat([head, d]);
}

/** Version 6 negotiation offering every action and every protocol step (NR_* included). */
export function optneg(actions = 0x1ff, steps = 0x1fffff): Buffer {
  const d = Buffer.alloc(12);
  d.writeUInt32BE(6, 0);
  d.writeUInt32BE(actions, 4);
  d.writeUInt32BE(steps, 8);
  return frame('O', d);
}

/** SMFIC_CONNECT for mx.example.org [192.0.2.1]:25. */
export function connectCmd(): Buffer {
  const port = Buffer.alloc(2);
  port.writeUInt16BE(25);
  return frame('C', Buffer.concat([Buffer.from('mx.example.org\0'), Buffer.from('4'), port, Buffer.from('192.0.2.1\0')]));
}

/** The commands of a message up to (not including) its body: connect, helo, mail, rcpt, a header, eoh. */
export function preamble(): Buffer {
  return Buffer.concat([
    connectCmd(),
    frame('H', 'mx.example.org\0'),
    frame('M', '<a@example.org>\0'),
    frame('R', '<b@example.net>\0'),
    frame('L', 'Subject\0pressure\0'),
    frame('N'),
  ]);
}

/** An MTA connection: the socket, and the frames the milter sent (counted; kept unless `keep` is false). */
export class RawMta {
  readonly frames: { cmd: string; data: Buffer }[] = [];
  /** Bytes received. */
  received = 0;
  /** Frames received per command. */
  readonly count: Record<string, number> = {};
  closed = false;
  private buf: Buffer[] = [];
  private size = 0;
  private waiters: (() => void)[] = [];

  constructor(readonly sock: net.Socket, private readonly keep = true) {
    sock.on('data', (d: Buffer) => this.onData(d));
    sock.on('error', () => undefined);
    sock.on('close', () => {
      this.closed = true;
      this.wake();
    });
  }

  static async open(spec: string, keep = true): Promise<RawMta> {
    const s = parseSocketSpec(spec);
    const sock = s.kind === 'unix' ? net.connect(s.path) : net.connect(s.port, s.host ?? '127.0.0.1');
    await once(sock, 'connect');
    return new RawMta(sock, keep);
  }

  private wake(): void {
    for (const w of this.waiters.splice(0)) w();
  }

  private onData(d: Buffer): void {
    this.received += d.length;
    this.buf.push(d);
    this.size += d.length;
    let all = this.buf.length === 1 ? this.buf[0] : Buffer.concat(this.buf);
    while (all.length >= 4) {
      const len = all.readUInt32BE(0);
      if (all.length < 4 + len) break;
      const cmd = String.fromCharCode(all[4]);
      this.count[cmd] = (this.count[cmd] ?? 0) + 1;
      if (this.keep) this.frames.push({ cmd, data: Buffer.from(all.subarray(5, 4 + len)) });
      all = all.subarray(4 + len);
    }
    this.buf = all.length ? [all] : [];
    this.size = all.length;
    this.wake();
  }

  /** Wait until `ok` holds (checked on every read), or throw after `ms`. */
  async until(ok: () => boolean, ms: number, what: string): Promise<void> {
    const end = Date.now() + ms;
    while (!ok()) {
      const left = end - Date.now();
      if (left <= 0) throw new Error(`timed out after ${ms} ms waiting for ${what}`);
      await new Promise<void>((r) => {
        const t = setTimeout(r, Math.min(left, 50));
        this.waiters.push(() => {
          clearTimeout(t);
          r();
        });
      });
    }
  }

  /** Write, waiting for drain when the socket asks to. */
  async write(b: Buffer): Promise<void> {
    if (this.sock.write(b) || this.closed) return;
    await new Promise<void>((r) => {
      const done = () => {
        this.sock.off('drain', done);
        this.sock.off('close', done);
        r();
      };
      this.sock.on('drain', done);
      this.sock.on('close', done);
    });
  }
}
