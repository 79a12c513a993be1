// The nodemilter side of the benchmark: the same shapes as milter.c, each a
// Base subclass served by runmilter, written as a user would in plain
// JavaScript (decorate() is @noreply without decorator syntax).
// Usage: node bench/milters/node.cjs s1|s2|s3|s4|big SOCKET   (npm run bench:milter -- SHAPE SOCKET)
// NODEMILTER_DIST=/path/to/dist measures another build (default: this tree's dist/).
'use strict';
const path = require('node:path');
const dist = process.env.NODEMILTER_DIST || path.join(__dirname, '../../dist');
const { Base, runmilter, describe, decorate, noreply, CONTINUE, ADDHDRS, CHGBODY } = require(path.join(dist, 'src/index.js'));

class S1 extends Base {
  static flags = ADDHDRS;
  connect() { return CONTINUE; }
  hello() { return CONTINUE; }
  envfrom() { return CONTINUE; }
  envrcpt() { return CONTINUE; }
  data() { return CONTINUE; }
  header() { return CONTINUE; }
  eoh() { return CONTINUE; }
  body() { return CONTINUE; }
  unknown() { return CONTINUE; }
  abort() { return CONTINUE; }
  close() { return CONTINUE; }
  eom() {
    this.addheader('X-Bench', 'node');
    return CONTINUE;
  }
}

class S2 extends Base {
  static flags = ADDHDRS;
  connect() { return CONTINUE; }
  hello() { return CONTINUE; }
  envfrom() { return CONTINUE; }
  envrcpt() { return CONTINUE; }
  data() { return CONTINUE; }
  header() { return CONTINUE; }
  eoh() { return CONTINUE; }
  body() { return CONTINUE; }
  eom() {
    this.addheader('X-Bench', 'node');
    return CONTINUE;
  }
}
for (const m of ['connect', 'hello', 'envfrom', 'envrcpt', 'data', 'header', 'eoh', 'body']) decorate(S2, m, noreply);

class S3 extends Base {
  static flags = ADDHDRS;
  eom() {
    this.addheader('X-Bench', 'node');
    return CONTINUE;
  }
}

const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

class S4 extends S2 {
  async eom() {
    await sleep(2);
    this.addheader('X-Bench', 'node');
    return CONTINUE;
  }
}

class Big extends Base {
  static flags = ADDHDRS | CHGBODY;
  newMessage() { return { chunks: [] }; }
  body(chunk) {
    this.message.chunks.push(chunk);
    return CONTINUE;
  }
  eom() {
    this.addheader('X-Bench', 'node');
    this.replacebody(Buffer.concat(this.message.chunks));
    return CONTINUE;
  }
}
decorate(Big, 'body', noreply);

const SHAPES = { s1: S1, s2: S2, s3: S3, s4: S4, big: Big };

const [shape, socket, engine = 'libmilter'] = process.argv.slice(2);
if (!SHAPES[shape] || !socket || !['libmilter', 'ts'].includes(engine)) {
  console.error('usage: node bench/milters/node.cjs s1|s2|s3|s4|big SOCKET [libmilter|ts]');
  process.exit(2);
}
const quiet = { debug() {}, info() {}, warn: console.warn, error: console.error };
for (const cls of Object.values(SHAPES)) cls.logger = quiet;
if (engine === 'libmilter') {
  runmilter('bench-node', socket, { factory: SHAPES[shape], backlog: 1024, drain: 0, logger: quiet }).catch((err) => {
    console.error(err);
    process.exit(1);
  });
} else {
  // The milter protocol in TypeScript (nodemilter/engine), same Base classes.
  const { serve } = require(path.join(dist, 'src/engine/index.js'));
  serve(describe(SHAPES[shape], { name: 'bench-node-ts' }), { socket, backlog: 1024 }).catch((err) => {
    console.error(err);
    process.exit(1);
  });
}
