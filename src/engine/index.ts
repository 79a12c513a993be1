/**
 * `nodemilter/engine`: the milter protocol in TypeScript, a second engine
 * beneath the same engine-neutral API as the libmilter one. It reads the
 * MTA's commands straight off the socket on the event loop: no libmilter,
 * no compiler, no worker threads, and several milters per process.
 * libmilter stays the default and the reference; differential tests hold
 * this engine to its replies byte for byte (see docs/engine.md for the
 * differences kept).
 *
 * @example
 * ```ts
 * import { Base, describe, CONTINUE } from 'nodemilter';
 * import { serve } from 'nodemilter/engine';
 *
 * class Hello extends Base {
 *   override eom() { this.addheader('X-Hello', 'world'); return CONTINUE; }
 * }
 * const server = await serve(describe(Hello, { name: 'hello' }), { socket: 'inet:8894@127.0.0.1' });
 * process.once('SIGTERM', () => void server.close({ drain: 30_000 }));
 * ```
 *
 * @module nodemilter/engine
 */
export { serve, MilterServer } from './server';
export type { ServeOptions, FlowOptions, CloseOptions, EngineDiag, EngineHandlerErrorInfo } from './server';
export type { Deadlines, SessionCapOptions } from './dispatch';
