/**
 * Typed errors. Every error nodemilter throws is a {@link MilterError}; the
 * subclass says what kind of problem it is and `code` is a stable string for
 * programs.
 *
 * @module
 */

/** Base class of every error nodemilter throws. */
export class MilterError extends Error {
  /** A stable machine-readable code, e.g. `ERR_MILTER_INVALID_REPLY`. */
  readonly code: string;
  constructor(message: string, code = 'ERR_MILTER') {
    super(message);
    this.name = new.target.name;
    this.code = code;
  }
}

/** An argument has the wrong type or form (bad rcode, header name, socket spec...). */
export class InvalidArgumentError extends MilterError {
  constructor(message: string, code = 'ERR_MILTER_INVALID_ARGUMENT') {
    super(message, code);
  }
}

/** A reply (setreply/setmlreply) breaks the SMTP reply rules. */
export class InvalidReplyError extends InvalidArgumentError {
  constructor(message: string) {
    super(message, 'ERR_MILTER_INVALID_REPLY');
  }
}

/** A socket specification (`unix:/path`, `inet:port@host`, ...) is malformed. */
export class InvalidSocketError extends InvalidArgumentError {
  constructor(message: string) {
    super(message, 'ERR_MILTER_INVALID_SOCKET');
  }
}

/** A handler returned something that is not a status for that step. */
export class InvalidStatusError extends InvalidArgumentError {
  constructor(message: string) {
    super(message, 'ERR_MILTER_INVALID_STATUS');
  }
}

/** An action was called where the protocol does not allow it (e.g. a modification outside eom). */
export class ActionNotAllowedError extends MilterError {
  constructor(message: string, code = 'ERR_MILTER_ACTION_NOT_ALLOWED') {
    super(message, code);
  }
}

/** An action needs an action flag (SMFIF_*) that was not negotiated with the MTA. */
export class DisabledActionError extends ActionNotAllowedError {
  /** The missing SMFIF_* flag. */
  readonly flag: number;
  constructor(message: string, flag: number) {
    super(message, 'ERR_MILTER_DISABLED_ACTION');
    this.flag = flag;
  }
}

/** The context was used after its connection closed. */
export class ContextClosedError extends ActionNotAllowedError {
  constructor(message: string) {
    super(message, 'ERR_MILTER_CONTEXT_CLOSED');
  }
}

/** The engine refused an action or failed to deliver it to the MTA (MI_FAILURE). */
export class ActionFailedError extends MilterError {
  constructor(message: string) {
    super(message, 'ERR_MILTER_ACTION_FAILED');
  }
}

/** The milter is in the wrong lifecycle state for the call (main twice, register after start...). */
export class MilterStateError extends MilterError {
  constructor(message: string) {
    super(message, 'ERR_MILTER_STATE');
  }
}

/** The native addon could not be loaded or libmilter is missing. */
export class NativeLoadError extends MilterError {
  constructor(message: string) {
    super(message, 'ERR_MILTER_NATIVE_LOAD');
  }
}

/**
 * The peer broke the milter protocol: an unknown reply code, a modification
 * outside end-of-message, a truncated or oversize packet, or the connection
 * closed while a reply was awaited. `reason` says which.
 */
export class ProtocolError extends MilterError {
  /** What went wrong: `unknown-reply`, `unexpected-reply`, `truncated`, `oversize`, `closed`, `malformed` or `negotiation`. */
  readonly reason: string;
  constructor(message: string, reason = 'malformed') {
    super(message, 'ERR_MILTER_PROTOCOL');
    this.reason = reason;
  }
}

/** No reply (or no connection) arrived within the allowed time. */
export class MilterTimeoutError extends MilterError {
  /** The time waited, in milliseconds. */
  readonly timeout: number;
  constructor(message: string, timeout: number) {
    super(message, 'ERR_MILTER_TIMEOUT');
    this.timeout = timeout;
  }
}

/**
 * A message could not be parsed, or a MIME operation was given something it
 * cannot work on (nodemilter/mime). `reason` says which: `too-large`,
 * `too-deep`, `bad-input`, `not-a-child`, `not-a-leaf`.
 */
export class MimeError extends MilterError {
  /** What went wrong, as a stable word. */
  readonly reason: string;
  constructor(message: string, reason = 'bad-input') {
    super(message, 'ERR_MILTER_MIME');
    this.reason = reason;
  }
}

/** An Authentication-Results header value (RFC 8601) could not be parsed; `position` is where parsing stopped. */
export class AuthResSyntaxError extends InvalidArgumentError {
  /** The character offset in the value where the parser stopped. */
  readonly position: number;
  constructor(message: string, position: number) {
    super(message, 'ERR_MILTER_AUTHRES_SYNTAX');
    this.position = position;
  }
}

/**
 * An optional peer dependency is not installed (e.g. `better-sqlite3` for the
 * SQLite store, `ioredis` for the Redis store). `packageName` names what to
 * install.
 */
export class MissingDependencyError extends MilterError {
  /** The npm package to install. */
  readonly packageName: string;
  constructor(packageName: string, feature: string, cause?: unknown) {
    super(
      `${feature} needs the optional package "${packageName}", which is not installed: run \`npm install ${packageName}\`` +
        (cause instanceof Error && (cause as NodeJS.ErrnoException).code !== 'MODULE_NOT_FOUND' ? ` (loading it failed: ${cause.message})` : ''),
      'ERR_MILTER_MISSING_DEPENDENCY',
    );
    this.packageName = packageName;
  }
}

/**
 * runmilter's supervisor gave up: its workers kept dying without serving
 * (`restart.limit` failures in a row). The message names the last one and
 * why it died; `failures` is how many in a row.
 */
export class WorkerCrashLoopError extends MilterError {
  /** Worker failures in a row when the supervisor gave up. */
  readonly failures: number;
  constructor(message: string, failures: number) {
    super(message, 'ERR_MILTER_CRASH_LOOP');
    this.failures = failures;
  }
}
