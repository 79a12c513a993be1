/**
 * The metrics endpoint: `GET /metrics` in Prometheus' text format, on the
 * address runmilter's `metricsListen` names.
 *
 * @internal
 * @module
 */
import * as http from 'node:http';

import { InvalidArgumentError } from '../errors';
import type { Logger } from '../types';

/** `'PORT'`, `'HOST:PORT'` or `'[V6]:PORT'` as host and port (host default 127.0.0.1). */
export function parseListen(listen: string): { host: string; port: number } {
  const m = typeof listen === 'string' ? /^(?:(\[[0-9a-fA-F:.]+\]|[^:[\]\s]+):)?([0-9]{1,5})$/.exec(listen) : null;
  const port = m ? Number(m[2]) : NaN;
  if (!m || port > 65535) {
    throw new InvalidArgumentError(`metricsListen must be 'PORT', 'HOST:PORT' or '[IPV6]:PORT' with a port 0-65535, got ${JSON.stringify(listen)}`);
  }
  const host = m[1] === undefined ? '127.0.0.1' : m[1].replace(/^\[|\]$/g, '');
  return { host, port };
}

/** A running metrics endpoint. */
export interface MetricsEndpoint {
  /** The bound port (for a `0` port). */
  readonly port: number;
  close(): Promise<void>;
}

/** Serve `render()` at /metrics on `listen`; resolves once it listens. */
export async function serveMetrics(listen: string, render: () => Promise<string>, log: Logger, name: string): Promise<MetricsEndpoint> {
  const { host, port } = parseListen(listen);
  const server = http.createServer((req, res) => {
    if (req.method !== 'GET' || (req.url ?? '').split('?')[0] !== '/metrics') {
      res.writeHead(404, { 'content-type': 'text/plain' }).end('not found: the metrics are at /metrics\n');
      return;
    }
    render().then(
      (text) => res.writeHead(200, { 'content-type': 'text/plain; version=0.0.4; charset=utf-8' }).end(text),
      (err: Error) => {
        log.error(`${name}: metrics failed: ${err.message}`, err);
        res.writeHead(500, { 'content-type': 'text/plain' }).end(`metrics failed: ${err.message}\n`);
      },
    );
  });
  await new Promise<void>((resolve, reject) => {
    server.once('error', reject);
    server.listen({ host, port }, () => {
      server.removeListener('error', reject);
      resolve();
    });
  });
  const bound = (server.address() as { port: number }).port;
  log.info(`${name}: metrics at http://${host.includes(':') ? `[${host}]` : host}:${bound}/metrics`);
  return {
    port: bound,
    close: () => new Promise<void>((resolve) => {
      server.close(() => resolve());
      server.closeAllConnections();
    }),
  };
}
