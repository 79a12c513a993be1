/**
 * The MTA-side milter protocol client for tests: {@link MilterClient} plays
 * the part of sendmail or Postfix towards any milter (nodemilter's, a C
 * milter on libmilter, pymilter...), so milters can be tested end to end
 * without an MTA. It is `nodemilter/mta`'s {@link MilterConnection}; a
 * production MTA uses `nodemilter/mta`'s `Milters` chain instead.
 *
 * @module
 */
import { MilterConnection, type ConnectionOptions } from '../mta/connection';

export {
  Command,
  Reply,
  CLIENT_PROTOCOL_VERSION,
  DEFAULT_TIMEOUT,
  DEFAULT_EOM_TIMEOUT,
  parseSmtpReply,
  parseMessage,
  type Packet,
  type Negotiation,
  type SmtpReply,
  type ReplyStatus,
  type StepName,
  type StepResult,
  type BodyResult,
  type EomAction,
  type EomResult,
  type FamilyArg,
  type MacroStageArg,
  type MessageSpec,
  type MessageResult,
  type ParsedHeader,
} from '../mta/connection';

/** Options of {@link MilterClient.connect}. */
export type MilterClientOptions = ConnectionOptions;

/**
 * The MTA side of the milter protocol for tests: connects to a milter,
 * negotiates, sends SMTP events one by one (or a whole transaction with
 * `sendMessage`) and collects the replies and end-of-message modifications.
 * Everything is {@link MilterConnection}'s; see there for the details.
 *
 * @example
 * ```ts
 * import { MilterClient } from 'nodemilter/testing';
 *
 * const c = await MilterClient.connect('inet:8894@127.0.0.1', { timeout: 5000 });
 * await c.connect('client.example.com', 'inet', '192.0.2.1', 4567);
 * await c.helo('client.example.com');
 * await c.envfrom('<alice@example.com>');
 * const r = await c.envrcpt('<bob@example.org>');
 * if (r.status === 'reject') console.log(r.reply?.text);
 * const res = await c.sendMessage({ from: '<a@x>', rcpt: ['<b@y>'], message: 'Subject: hi\r\n\r\nbody\r\n', quit: true });
 * console.log(res.decision, res.actions);
 * ```
 */
export class MilterClient extends MilterConnection {
  /**
   * Connect to a milter at a socket spec (`unix:/path`, `inet:PORT@HOST`,
   * `inet6:PORT@HOST`...) and, unless `options.negotiate` is false,
   * negotiate options.
   *
   * @throws InvalidSocketError for a malformed spec, MilterTimeoutError if
   *   the connection is not made in time, the socket's own error (e.g.
   *   ECONNREFUSED) if it fails, ProtocolError if negotiation breaks the protocol.
   */
  static override async connect(spec: string, options: MilterClientOptions = {}): Promise<MilterClient> {
    return MilterConnection.open(spec, options, (sock) => new MilterClient(sock, options));
  }
}
