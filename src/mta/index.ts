/**
 * The MTA side of the milter protocol, for production: run any milter
 * (OpenDKIM, OpenDMARC, spamass-milter, rspamd, a nodemilter milter) from a
 * Node SMTP server. {@link Milters} chains milters the way Postfix's
 * `smtpd_milters` does, with per-milter timeouts, default actions, macros,
 * connection limits and reuse; {@link MilterConnection} is one connection,
 * step by step; `smtpServerHooks` wires a chain into the `smtp-server`
 * package. See docs/mta.md.
 *
 * @module nodemilter/mta
 */
export * from './connection';
export * from './message';
export * from './milter';
export * from './chain';
export * from './smtp-server';
