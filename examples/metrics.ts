/**
 * A milter with the counters an operator wants, served in Prometheus' text
 * format on a loopback HTTP port, and structured (pino) logs.
 *
 *   npm run example -- metrics inet:8894@127.0.0.1
 *   curl http://127.0.0.1:9464/metrics
 *
 * METRICS_PORT sets the HTTP port (default 9464; 0 picks a free one, which
 * is printed). The milter stamps every message and rejects mail whose
 * Subject contains "[spam]", so the verdict counters have something to show.
 */
import * as http from 'node:http';
import type { AddressInfo } from 'node:net';
import pino from 'pino';

import { ADDHDRS, Base, CONTINUE, REJECT, runmilter } from 'nodemilter';
import * as milter from 'nodemilter/milter';
import { MilterMetrics } from 'nodemilter/metrics';

const logger = pino({ name: 'metrics-example' });

class Stamped extends Base {
  static override flags = ADDHDRS;
  static override logger = logger;

  override newMessage() {
    return { spam: false };
  }

  override header(name: string, value: string) {
    if (name.toLowerCase() === 'subject' && value.includes('[spam]')) this.message.spam = true;
    return CONTINUE;
  }

  override eom() {
    if (this.message.spam) {
      this.setreply('550', '5.7.1', 'Looks like spam');
      return REJECT;
    }
    this.addheader('X-Stamped', 'yes');
    return CONTINUE;
  }
}

const socket = process.argv[2] ?? 'inet:8894@127.0.0.1';
const metrics = new MilterMetrics();
milter.setMetrics(metrics);

const server = http.createServer((req, res) => {
  if (req.url !== '/metrics') {
    res.writeHead(404).end();
    return;
  }
  res.writeHead(200, { 'Content-Type': 'text/plain; version=0.0.4; charset=utf-8' });
  res.end(metrics.prometheus());
});
server.listen(Number(process.env.METRICS_PORT ?? 9464), '127.0.0.1', () => {
  logger.info({ port: (server.address() as AddressInfo).port }, 'metrics on http://127.0.0.1:%d/metrics', (server.address() as AddressInfo).port);
});

runmilter('metrics-example', socket, { factory: Stamped, logger })
  .then(() => server.close())
  .catch((err: Error) => {
    logger.error({ err }, 'milter failed');
    process.exit(1);
  });
