#!/usr/bin/env node
// Send N messages to a milter with MilterClient, a few connections at once.
// Every 10th session is dropped in the middle of its body (abort + close
// paths); the rest are whole transactions that must come back stamped with
// X-Reliability. Used by valgrind.sh.
//
//   node scripts/reliability/drive.cjs --socket SPEC --messages N [--conns C]
'use strict';
const path = require('node:path');
const { MilterClient } = require(path.join(__dirname, '..', '..', 'dist', 'src', 'testing', 'index.js'));

function arg(name, dflt) {
  const i = process.argv.indexOf(`--${name}`);
  return i < 0 ? dflt : process.argv[i + 1];
}
const spec = arg('socket');
const total = Number(arg('messages', 1000));
const conns = Number(arg('conns', 4));
if (!spec || !(total > 0)) {
  console.error('usage: drive.cjs --socket SPEC --messages N [--conns C]');
  process.exit(64);
}

const body = 'Hello,\r\n' + 'this is a line of the body.\r\n'.repeat(40);
let next = 0;
const result = { sent: 0, stamped: 0, dropped: 0, failed: 0, errors: [] };

async function one(i) {
  const c = await MilterClient.connect(spec, { timeout: 60_000, eomTimeout: 120_000 });
  try {
    if (i % 10 === 9) {
      await c.connect('drop.example', 'inet', '192.0.2.3', 3);
      await c.helo('drop.example');
      await c.envfrom('<d@example.org>');
      await c.envrcpt('<e@example.net>');
      await c.header('Subject', 'dropped');
      await c.eoh();
      await c.body(body);
      result.dropped++;
      return;
    }
    const r = await c.sendMessage({
      client: { hostname: 'mx.example.org', family: 'inet', address: '192.0.2.9', port: 1000 + (i % 50000) },
      helo: 'mx.example.org',
      from: ['<a@example.org>', 'SIZE=2000'],
      rcpt: ['<b@example.net>', '<c@example.net>'],
      headers: [['From', 'a@example.org'], ['To', 'b@example.net'], ['Subject', `message ${i}`], ['X-8bit', Buffer.from('caf\xe9', 'latin1')]],
      body,
      quit: true,
    });
    result.sent++;
    if (r.decision === 'continue' && r.actions.some((a) => a.type === 'addheader' && a.name === 'X-Reliability')) result.stamped++;
    else result.failed++;
  } finally {
    c.destroy();
  }
}

async function main() {
  const t0 = Date.now();
  await Promise.all(
    Array.from({ length: conns }, async () => {
      while (next < total) {
        const i = next++;
        try {
          await one(i);
        } catch (err) {
          result.failed++;
          if (result.errors.length < 5) result.errors.push(err.message);
        }
        if (i > 0 && i % 1000 === 0) console.error(`drive: ${i} sessions, ${Math.round((Date.now() - t0) / 1000)} s`);
      }
    }),
  );
  result.seconds = Math.round((Date.now() - t0) / 1000);
  console.log(JSON.stringify(result));
  process.exit(result.failed === 0 ? 0 : 1);
}
main();
