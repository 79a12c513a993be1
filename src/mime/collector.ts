/**
 * Collecting a message as it arrives (header and body callbacks) so that eom
 * can parse it whole. Small messages stay in memory; past a threshold the
 * body spools to a private temporary file that is always removed.
 *
 * @module
 */
import { randomBytes } from 'node:crypto';
import { createReadStream, unlinkSync } from 'node:fs';
import { open, readFile, unlink } from 'node:fs/promises';
import type { FileHandle } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { Readable } from 'node:stream';
import { Base } from '../base';
import { CONTINUE, P_HDR_LEADSPC } from '../constants';
import { InvalidArgumentError, MilterStateError } from '../errors';
import type { Bytes, StatusLike } from '../types';

/** Options of a {@link MessageCollector}. */
export interface CollectorOptions {
  /** Body bytes kept in memory before spooling to a file. Default 1 MiB; 0 spools at once. */
  threshold?: number;
  /** Where temporary files go (default `os.tmpdir()`). Files are created with mode 0600. */
  dir?: string;
}

/** Spool files not yet removed, so that even an abrupt exit removes them. */
const liveFiles = new Set<string>();
let exitHook = false;
function track(path: string): void {
  liveFiles.add(path);
  if (!exitHook) {
    exitHook = true;
    process.once('exit', () => {
      for (const p of liveFiles) {
        try {
          unlinkSync(p);
        } catch {
          /* already gone */
        }
      }
    });
  }
}

const bytes = (value: Bytes) => (typeof value === 'string' ? Buffer.from(value, 'utf8') : Buffer.from(value));

/**
 * Collects one message: headers as the MTA sent them and the body. Read it
 * back whole with {@link buffer} or {@link stream} (headers, blank line,
 * body, CRLF line ends), then {@link dispose} it. Use it directly from your
 * own callbacks, or let {@link CollectingMilter} do it all.
 *
 * @example
 * ```ts
 * const c = new MessageCollector({ threshold: 256 * 1024 });
 * c.header('Subject', 'hi');
 * await c.body(Buffer.from('text\r\n'));
 * try {
 *   const msg = parseMime(await c.buffer());
 * } finally {
 *   await c.dispose();
 * }
 * ```
 */
export class MessageCollector {
  /** Body bytes kept in memory before spooling. */
  readonly threshold: number;
  /** The directory spool files go to. */
  readonly dir: string;
  #headers: Buffer[] = [];
  #memory: Buffer[] = [];
  #bodySize = 0;
  #path: string | undefined;
  #file: FileHandle | undefined;
  #disposed = false;

  constructor(options: CollectorOptions = {}) {
    const threshold = options.threshold ?? 1024 * 1024;
    if (!Number.isInteger(threshold) || threshold < 0) {
      throw new InvalidArgumentError(`collector threshold ${JSON.stringify(threshold)} is invalid: expected an integer >= 0 (bytes)`);
    }
    this.threshold = threshold;
    this.dir = options.dir ?? tmpdir();
  }

  #check(what: string): void {
    if (this.#disposed) throw new MilterStateError(`MessageCollector.${what}: the collector was disposed (after eom, abort or close)`);
  }

  /**
   * Add a header as the header callback got it. Folded lines (LF) become
   * CRLF. With `leadingSpace` (HDR_LEADSPC negotiated) the value is written
   * right after the colon, else after `": "`.
   */
  header(name: string, value: Bytes, leadingSpace = false): void {
    this.#check('header');
    const v = bytes(value).toString('latin1').replace(/\r?\n/g, '\r\n');
    this.#headers.push(Buffer.from(`${name}:${leadingSpace ? '' : ' '}${v}\r\n`, 'latin1'));
  }

  /** Add a piece of the body; spools to a file once the body passes the threshold. */
  async body(chunk: Bytes): Promise<void> {
    this.#check('body');
    const b = bytes(chunk);
    this.#bodySize += b.length;
    if (!this.#path && this.#bodySize > this.threshold) await this.#spool();
    if (this.#file) await this.#file.write(b);
    else this.#memory.push(b);
  }

  async #spool(): Promise<void> {
    const path = join(this.dir, `nodemilter-${process.pid}-${randomBytes(8).toString('hex')}.eml`);
    this.#path = path;
    track(path);
    this.#file = await open(path, 'wx', 0o600);
    for (const b of this.#memory) await this.#file.write(b);
    this.#memory = [];
  }

  /** Bytes of body collected. */
  get bodySize(): number {
    return this.#bodySize;
  }

  /** Whether the body went to a file. */
  get spooled(): boolean {
    return this.#path !== undefined;
  }

  /** The spool file's path, while it exists. */
  get path(): string | undefined {
    return this.#disposed ? undefined : this.#path;
  }

  /** Whether {@link dispose} ran. */
  get disposed(): boolean {
    return this.#disposed;
  }

  /** The headers as received, with the blank line that ends them. */
  headerBytes(): Buffer {
    return Buffer.concat([...this.#headers, Buffer.from('\r\n')]);
  }

  /** The whole message (headers, blank line, body) in memory. */
  async buffer(): Promise<Buffer> {
    this.#check('buffer');
    if (!this.#path) return Buffer.concat([this.headerBytes(), ...this.#memory]);
    return Buffer.concat([this.headerBytes(), await readFile(this.#path)]);
  }

  /** The whole message as a stream (read it before the collector is disposed). */
  stream(): Readable {
    this.#check('stream');
    const head = this.headerBytes();
    const path = this.#path;
    const memory = this.#memory;
    return Readable.from(
      (async function* () {
        yield head;
        if (path) yield* createReadStream(path);
        else yield* memory;
      })(),
    );
  }

  /** Forget the message and remove the spool file. Safe to call more than once. */
  async dispose(): Promise<void> {
    if (this.#disposed) return;
    this.#disposed = true;
    this.#memory = [];
    this.#headers = [];
    const file = this.#file;
    const path = this.#path;
    this.#file = undefined;
    try {
      await file?.close();
    } finally {
      if (path) {
        liveFiles.delete(path);
        await unlink(path).catch((err: NodeJS.ErrnoException) => {
          if (err.code !== 'ENOENT') throw err;
        });
      }
    }
  }
}

/**
 * A Base that collects every message for you: header() and body() feed a
 * {@link MessageCollector}; at eom your {@link checkmessage} gets it; the
 * spool file is removed after eom, abort and close, whether the handler
 * returned, threw or rejected. Override header() or body() only with a
 * call to `super`. Set `static collector` for the threshold and directory.
 *
 * @example
 * ```ts
 * class Scan extends CollectingMilter {
 *   static override flags = ADDHDRS | CHGHDRS | CHGBODY;
 *   static override collector = { threshold: 512 * 1024 };
 *   override async checkmessage(collected: MessageCollector) {
 *     const msg = await readMime(collected.stream());
 *     if (msg.stripScripts() > 0) applyToContext(this, msg);
 *     return CONTINUE;
 *   }
 * }
 * ```
 */
export abstract class CollectingMilter<M extends object = Record<string, any>> extends Base<M> {
  /** Collector options for this class. */
  static collector: CollectorOptions = {};

  #collector: MessageCollector | undefined;

  /** The collector of the current message (made at first use). */
  protected get collected(): MessageCollector {
    return (this.#collector ??= new MessageCollector((this.constructor as typeof CollectingMilter).collector));
  }

  /** Check the whole message in eom. The collector is disposed after this returns or throws. */
  protected abstract checkmessage(collected: MessageCollector): StatusLike;

  async #release(): Promise<void> {
    const c = this.#collector;
    this.#collector = undefined;
    await c?.dispose();
  }

  /** Collects the header (call `super.header()` when overriding). */
  override header(name: string, value: Bytes): StatusLike {
    this.collected.header(name, value, (this.steps & P_HDR_LEADSPC) !== 0);
    return CONTINUE;
  }

  /** Collects the body chunk (call `super.body()` when overriding). */
  override async body(chunk: Buffer): Promise<number> {
    await this.collected.body(chunk);
    return CONTINUE;
  }

  /** Runs {@link checkmessage}, then disposes the collector whatever happened. */
  override async eom(): Promise<number> {
    try {
      return await this.checkmessage(this.collected);
    } finally {
      await this.#release();
    }
  }

  /** Removes the spool file; a subclass that overrides it must call `super.abort()`. */
  override async abort(): Promise<number> {
    await this.#release();
    return CONTINUE;
  }

  /** Removes the spool file; a subclass that overrides it must call `super.close()`. */
  override async close(): Promise<number> {
    await this.#release();
    return CONTINUE;
  }
}
