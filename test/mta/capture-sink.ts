/**
 * The conformance suite's view of {@link startRawSink}: the same SMTP
 * server keeping the exact bytes of each relayed message (smtp-sink's dumps
 * drop a CR before CRLF: Postfix sends a value `one\r\n\ttwo` from
 * addheader as `one\r\r\n\ttwo`, smtp-sink writes `one\r\n\ttwo`), with
 * each message as latin1 text.
 */
import { startRawSink, type RawMessage } from '../helpers/rawsink';

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
  readonly messages: Captured[];
  /** Wait for a message whose text contains `marker`. */
  waitFor(marker: string, timeout?: number): Promise<Captured>;
  close(): Promise<void>;
}

const asText = (m: RawMessage): Captured => ({ mailFrom: m.mailFrom, rcptTo: m.rcptTo, message: m.data.toString('latin1') });

/** Start a capture server on a free loopback port. */
export async function startCaptureSink(): Promise<CaptureSink> {
  const raw = await startRawSink();
  return {
    port: raw.port,
    get messages() {
      return raw.messages.map(asText);
    },
    waitFor: async (marker, timeout) => asText(await raw.waitFor(marker, timeout)),
    close: () => raw.stop(),
  };
}
