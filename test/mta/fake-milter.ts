/**
 * A scripted milter for the MTA-side tests: it negotiates as told, records
 * every packet it receives, and answers each command with what `answer`
 * returns (nothing: it stays silent, so the client times out).
 */
import * as net from 'net';
import { freePort } from '../helpers';

/** One packet the fake milter received. */
export interface Received {
  cmd: string;
  data: Buffer;
}

/** A running fake milter. */
export interface Fake {
  spec: string;
  packets: Received[];
  /** The command characters received, in order. */
  readonly commands: string[];
  close(): Promise<void>;
}

/** What the fake answers to SMFIC_OPTNEG. */
export interface FakeNegotiation {
  version?: number;
  actions?: number;
  steps?: number;
  /** Macro lists per stage (SMFIM_* number), as smfi_setsymlist sends them. */
  symlists?: Record<number, string>;
  /** Never answer SMFIC_OPTNEG. */
  silent?: boolean;
}

/** A reply packet: command character and data. */
export function packet(cmd: string, data: Buffer | string = Buffer.alloc(0)): Buffer {
  const d = typeof data === 'string' ? Buffer.from(data, 'latin1') : data;
  const h = Buffer.alloc(5);
  h.writeUInt32BE(d.length + 1, 0);
  h[4] = cmd.charCodeAt(0);
  return Buffer.concat([h, d]);
}

/** Answer continue to every command that wants an answer, except those in `silent`. */
export const politeExcept = (silent: string) => (cmd: string) => ('DAKQ'.includes(cmd) || silent.includes(cmd) ? undefined : packet('c'));

/** Start a fake milter on a free loopback port. */
export async function fakeMilter(answer: (cmd: string, data: Buffer) => Buffer | undefined, neg: FakeNegotiation = {}): Promise<Fake> {
  const packets: Received[] = [];
  const socks = new Set<net.Socket>();
  const server = net.createServer((sock) => {
    socks.add(sock);
    let buf = Buffer.alloc(0);
    sock.on('error', () => undefined);
    sock.on('data', (d) => {
      buf = Buffer.concat([buf, d]);
      while (buf.length >= 4 && buf.length >= 4 + buf.readUInt32BE(0)) {
        const len = buf.readUInt32BE(0);
        const cmd = String.fromCharCode(buf[4]);
        const data = Buffer.from(buf.subarray(5, 4 + len));
        buf = buf.subarray(4 + len);
        packets.push({ cmd, data });
        if (cmd === 'O') {
          if (neg.silent) continue;
          const parts = [Buffer.alloc(12)];
          parts[0].writeUInt32BE(neg.version ?? 6, 0);
          parts[0].writeUInt32BE(neg.actions ?? 0x1ff, 4);
          parts[0].writeUInt32BE(neg.steps ?? 0, 8);
          for (const [stage, list] of Object.entries(neg.symlists ?? {})) {
            const st = Buffer.alloc(4);
            st.writeUInt32BE(Number(stage));
            parts.push(st, Buffer.from(list + '\0', 'latin1'));
          }
          sock.write(packet('O', Buffer.concat(parts)));
          continue;
        }
        const a = answer(cmd, data);
        if (a) sock.write(a);
      }
    });
  });
  const port = await freePort();
  await new Promise<void>((r) => server.listen(port, '127.0.0.1', r));
  return {
    spec: `inet:${port}@127.0.0.1`,
    packets,
    get commands() {
      return packets.map((p) => p.cmd);
    },
    close: () =>
      new Promise<void>((r) => {
        for (const s of socks) s.destroy();
        server.close(() => r());
      }),
  };
}
