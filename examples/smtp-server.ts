/**
 * A tiny MTA: the `smtp-server` package in front, a chain of milters in the
 * middle (nodemilter/mta), and delivery to a directory: each accepted
 * message is written to `MAIL_DIR/new/ID.eml` with its envelope beside it in
 * `ID.json`; quarantined ones go to `MAIL_DIR/hold/`.
 *
 * Run it (after `npm run build:ts` and `npm install smtp-server`), here with
 * nodemilter's sample milter and OpenDKIM signing:
 *
 * ```sh
 * npm run example -- sample inet:8894@127.0.0.1 &
 * opendkim -f -x opendkim.conf &            # Socket inet:8891@127.0.0.1
 * MILTERS=inet:8894@127.0.0.1,inet:8891@127.0.0.1 SMTP_PORT=2525 MAIL_DIR=./mail \
 *   npm run example -- smtp-server
 * ```
 *
 * Environment: `MILTERS` (socket specs in chain order, comma-separated;
 * default `inet:8894@127.0.0.1`), `MILTER_DEFAULT_ACTION` (accept, reject,
 * tempfail or quarantine; default tempfail, as Postfix), `SMTP_HOST`
 * (default 127.0.0.1), `SMTP_PORT` (default 2525), `MAIL_DIR` (default
 * `./mail`), `MTA_HOSTNAME` (default the host name).
 */
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';

import { Milters, smtpServerHooks } from 'nodemilter/mta';
import type { DefaultAction, MessageOutcome } from 'nodemilter/mta';

/** Options of {@link startMta}. */
export interface MtaOptions {
  /** Milter socket specs, in chain order. */
  milters: string[];
  /** What a failing milter means for the mail. Default `tempfail`. */
  defaultAction?: DefaultAction;
  /** Where mail goes: `new/` and `hold/` below it. */
  mailDir: string;
  /** Listen address. Default 127.0.0.1. */
  host?: string;
  /** Listen port (0: any free one). Default 2525. */
  port?: number;
  /** The server's name (Received header, `j` macro). Default the host name. */
  hostname?: string;
}

/** A running tiny MTA. */
export interface Mta {
  /** The port it listens on. */
  port: number;
  /** Stop listening, close the milter connections. */
  close(): Promise<void>;
}

async function store(dir: string, id: string, outcome: MessageOutcome): Promise<void> {
  await fs.promises.mkdir(dir, { recursive: true });
  const tmp = path.join(dir, `.${id}.eml`);
  await new Promise<void>((resolve, reject) => {
    const out = fs.createWriteStream(tmp);
    outcome.stream().on('error', reject).pipe(out).on('finish', resolve).on('error', reject);
  });
  await fs.promises.writeFile(path.join(dir, `${id}.json`), JSON.stringify({ ...outcome.envelope, quarantine: outcome.quarantine }, null, 2));
  await fs.promises.rename(tmp, path.join(dir, `${id}.eml`));
}

/** Start the MTA. */
export async function startMta(options: MtaOptions): Promise<Mta> {
  // smtp-server is an optional peer dependency of nodemilter: load it here.
  // eslint-disable-next-line @typescript-eslint/no-var-requires
  const { SMTPServer } = require('smtp-server');
  const milters = new Milters(options.milters.map((socket) => ({ socket, defaultAction: options.defaultAction ?? 'tempfail' })));
  const server = new SMTPServer({
    name: options.hostname ?? os.hostname(),
    banner: 'nodemilter example MTA',
    authOptional: true,
    disabledCommands: ['AUTH', 'STARTTLS'],
    size: 25 * 1024 * 1024,
    logger: false,
    ...smtpServerHooks(milters, {
      hostname: options.hostname ?? os.hostname(),
      async deliver(outcome, _session, id) {
        const held = outcome.quarantine.length > 0;
        await store(path.join(options.mailDir, held ? 'hold' : 'new'), id, outcome);
        return `2.0.0 Ok: ${held ? 'held' : 'queued'} as ${id}`;
      },
      onError: (err) => process.stderr.write(`milter chain: ${err.message}\n`),
    }),
  });
  await new Promise<void>((resolve, reject) => {
    server.once('error', reject);
    server.listen(options.port ?? 2525, options.host ?? '127.0.0.1', () => resolve());
  });
  return {
    port: server.server.address().port,
    async close() {
      await new Promise<void>((resolve) => server.close(() => resolve()));
      await milters.close();
    },
  };
}

if (require.main === module) {
  const milters = (process.env.MILTERS ?? 'inet:8894@127.0.0.1').split(',').map((s) => s.trim()).filter(Boolean);
  startMta({
    milters,
    defaultAction: (process.env.MILTER_DEFAULT_ACTION as DefaultAction | undefined) ?? 'tempfail',
    mailDir: process.env.MAIL_DIR ?? './mail',
    host: process.env.SMTP_HOST ?? '127.0.0.1',
    port: Number(process.env.SMTP_PORT ?? 2525),
    hostname: process.env.MTA_HOSTNAME,
  }).then(
    (mta) => {
      process.stdout.write(`smtp-server: listening on ${process.env.SMTP_HOST ?? '127.0.0.1'}:${mta.port} (milters ${milters.join(' -> ')})\n`);
      const stop = () => void mta.close().then(() => process.exit(0));
      process.once('SIGTERM', stop);
      process.once('SIGINT', stop);
    },
    (err) => {
      process.stderr.write(`smtp-server example: ${err.message}\n`);
      process.exit(1);
    },
  );
}
