/**
 * Every `@example` in the API docs (doc comments under src/) is a test:
 *
 * - each one is type-checked, strictly, against the real API, imported as a
 *   user imports it (`nodemilter`, `nodemilter/mime`...). A name the example
 *   uses but does not import is imported for it from the module that
 *   exports it; the few free variables a fragment refers to (`raw`, `ctx`,
 *   `MyMilter`...) are declared in HARNESS below, and a fragment that uses
 *   `this` runs inside a method of a Base subclass;
 * - each one that can run here (no MTA, Redis or fixed socket needed: the
 *   reason is written next to those that cannot) runs, and a line of the
 *   form `expression; // value`, where the value is a JavaScript literal,
 *   is checked: equal for primitives and arrays, a subset for objects.
 *
 * A new example needs nothing here unless it uses a free variable or cannot
 * run; then the test fails and names it.
 */
import * as fs from 'node:fs';
import * as path from 'node:path';
import ts from 'typescript';
import { describe, expect, it } from 'vitest';

const ROOT = path.resolve(__dirname, '..');
const SRC = path.join(ROOT, 'src');

/** The public modules, as a user imports them, in the order a free name is looked up. */
const MODULES: Record<string, string> = {
  nodemilter: 'src/index.ts',
  'nodemilter/mime': 'src/mime/index.ts',
  'nodemilter/testing': 'src/testing/index.ts',
  'nodemilter/utils': 'src/utils.ts',
  'nodemilter/policy': 'src/policy/index.ts',
  'nodemilter/greylist': 'src/greylist/index.ts',
  'nodemilter/cache': 'src/cache.ts',
  'nodemilter/metrics': 'src/metrics.ts',
  'nodemilter/engine': 'src/engine/index.ts',
  'nodemilter/milter': 'src/milter.ts',
  'nodemilter/auth': 'src/auth/index.ts',
  'nodemilter/mta': 'src/mta/index.ts',
};

interface Harness {
  /** Declarations put before the example (free variables of a fragment). */
  prelude?: string;
  /** `method`: the example is the body of an async method of `class extends <host>`; `members`: it is a class body. */
  wrap?: 'method' | 'members';
  /** The class a wrapped example's host extends (default Base). */
  host?: string;
  /** Code put before the example, type-checked and run (what a fragment refers to). */
  setup?: string;
  /** Why the example is only type-checked. */
  noRun?: string;
}

const MILTER_CLASS = 'declare class MyMilter extends Base {}';
const HARNESS: Record<string, Harness> = {
  'base.ts#2': { wrap: 'method', host: 'Base' },
  'auth/dns.ts#0': { noRun: 'serves HTTP on a fixed port' },
  'auth/dns.ts#1': { prelude: 'declare const message: Buffer, ip: string, helo: string, sender: string;', noRun: 'looks up DNS at 127.0.0.1' },
  'auth/index.ts#0': { prelude: 'declare const collected: MessageCollector, from: string;', wrap: 'method', noRun: 'reads key files under /etc/nodemilter; a fragment of an eom' },
  'auth/keys.ts#1': { noRun: 'reads key files under /etc/nodemilter' },
  'auth/sign.ts#0': { prelude: 'declare const table: SigningTable, from: string;', wrap: 'method', noRun: 'a fragment of a milter (header, body and eom callbacks)' },
  'auth/sign.ts#1': { prelude: 'declare const collected: MessageCollector, table: SigningTable, fromAddress: string;', wrap: 'method', noRun: 'a fragment of an eom (collected is the message)' },
  'auth/verify.ts#1': { prelude: "declare const collected: MessageCollector, spf: VerifyOptions['spf'], resolver: DnsResolve;", wrap: 'method', noRun: 'a fragment of an eom; looks up DNS' },
  'metrics.ts#1': { prelude: MILTER_CLASS, noRun: 'runs a milter on a fixed port' },
  'mta/connection.ts#0': { noRun: 'talks to milters on a fixed port and socket' },
  'mta/smtp-server.ts#0': { noRun: 'listens on a fixed port and writes under /var/mail' },
  'base.ts#4': { prelude: 'class MyMilter extends Base {}' },
  'cache.ts#0': { prelude: 'declare const url: string;', noRun: 'needs a Redis server' },
  'engine/index.ts#0': { noRun: 'listens on a fixed port until SIGTERM' },
  'engine/server.ts#0': { prelude: 'declare const server: MilterServer;', noRun: 'a fragment: server serves a socket shared with other processes' },
  'engine/server.ts#1': { prelude: MILTER_CLASS, noRun: 'listens on a fixed port until SIGTERM' },
  'greylist/greylist.ts#0': { noRun: 'writes under /var/lib/milter' },
  'greylist/index.ts#0': { prelude: 'declare const ip: string, from: string, rcpt: string;', noRun: 'needs a Redis server' },
  'greylist/redis.ts#0': { noRun: 'needs a Redis server' },
  'greylist/sqlite.ts#0': { noRun: 'writes under /var/lib/milter' },
  'metrics.ts#0': { prelude: `${MILTER_CLASS}\nimport * as http from 'node:http';`, noRun: 'runs a milter and an HTTP server on fixed ports' },
  'milter.ts#0': { noRun: 'starts libmilter on a fixed port (one milter per process)' },
  'milter.ts#1': { prelude: 'declare const callbacks: Callbacks;', noRun: 'registers with libmilter (one milter per process)' },
  'milter.ts#2': { prelude: MILTER_CLASS, noRun: 'runs a milter on a fixed port' },
  'milter.ts#3': { noRun: 'a fragment of a milter serving a shared socket (installs a SIGTERM handler)' },
  'mime/index.ts#0': { prelude: 'declare const raw: Buffer; declare const ctx: MimeActionTarget;', noRun: 'a fragment of an eom (ctx is the connection)' },
  'mime/part.ts#0': { prelude: 'declare const raw: Buffer;', wrap: 'method', noRun: 'a fragment of an eom on a message the MTA sent' },
  'mime/part.ts#1': { prelude: 'declare const msg: MimePart;', noRun: 'a fragment: msg is a message with those attachments' },
  'mime/part.ts#3': { prelude: 'declare const msg: MimePart; declare const pdfBytes: Buffer;', noRun: 'a fragment: msg is a multipart being built' },
  'policy/dsn.ts#0': { setup: "const originalHeaders = 'Subject: hi\\r\\n';" },
  'runmilter.ts#0': { noRun: 'serves on a fixed port until SIGTERM' },
  'testing/apply.ts#0': { noRun: 'talks to a milter on a fixed port' },
  'testing/client.ts#0': { noRun: 'talks to milters on a fixed port and socket' },
  'testing/testctx.ts#0': {
    prelude: "import { expect } from 'vitest';",
    setup: "class MyMilter extends Base { static override flags = ADDHDRS; override eom() { this.addheader('X-Seen', 'yes'); return CONTINUE; } }",
  },
  'types.ts#0': { noRun: 'needs pino configured for output' },
  'socketspec.ts#0': { prelude: "import { parseSocketSpec } from '../src/socketspec';" },
  'utils.ts#0': { wrap: 'members', host: 'Base' },
};

interface Example {
  id: string;
  file: string;
  line: number;
  code: string;
  /** A ```js example: checked as JavaScript (checkJs). */
  js: boolean;
}

function sourceFiles(dir: string): string[] {
  return fs.readdirSync(dir, { withFileTypes: true }).flatMap((e) =>
    e.isDirectory() ? sourceFiles(path.join(dir, e.name)) : e.name.endsWith('.ts') ? [path.join(dir, e.name)] : [],
  );
}

function examples(): Example[] {
  const out: Example[] = [];
  for (const file of sourceFiles(SRC)) {
    const text = fs.readFileSync(file, 'utf8');
    const re = /@example[ \t]*\n((?:[ \t]*\*.*\n)*?)[ \t]*\*[ \t]*```(ts|js)\n((?:[ \t]*\*.*\n)*?)[ \t]*\*[ \t]*```/g;
    let m: RegExpExecArray | null;
    let n = 0;
    while ((m = re.exec(text))) {
      const rel = path.relative(SRC, file).split(path.sep).join('/');
      const code = m[3].split('\n').map((l) => l.replace(/^[ \t]*\* ?/, '')).join('\n');
      out.push({ id: `${rel}#${n++}`, file, line: text.slice(0, m.index).split('\n').length, code, js: m[2] === 'js' });
    }
    // An @example without a ```ts block would be skipped silently: refuse it.
    const all = (text.match(/^[ \t]*\*[ \t]*@example\b/gm) ?? []).length;
    if (all !== n) throw new Error(`${file}: ${all} @example tags but ${n} with a \`\`\`ts or \`\`\`js block`);
  }
  return out;
}

const EXAMPLES = examples();

let exportsCache: Map<string, string> | undefined;
/** Names each public module exports (values and types), from the compiler. */
function moduleExports(): Map<string, string> {
  if (exportsCache) return exportsCache;
  const program = ts.createProgram(Object.values(MODULES).map((f) => path.join(ROOT, f)), { ...compilerOptions(), noEmit: true });
  const checker = program.getTypeChecker();
  const owner = new Map<string, string>();
  for (const [spec, file] of Object.entries(MODULES)) {
    const sf = program.getSourceFile(path.join(ROOT, file))!;
    const sym = checker.getSymbolAtLocation(sf);
    for (const e of sym ? checker.getExportsOfModule(sym) : []) if (!owner.has(e.name)) owner.set(e.name, spec);
  }
  return (exportsCache = owner);
}

function compilerOptions(): ts.CompilerOptions {
  return {
    target: ts.ScriptTarget.ES2022,
    module: ts.ModuleKind.CommonJS,
    lib: ['lib.es2022.d.ts'],
    types: ['node'],
    strict: true,
    noImplicitOverride: true,
    esModuleInterop: true,
    skipLibCheck: true,
    baseUrl: ROOT,
    paths: Object.fromEntries(Object.entries(MODULES).map(([k, v]) => [k, [v]])),
  };
}

const IDENT = /[A-Za-z_$][\w$]*/g;

/** The names a piece of code declares or imports at its top level. */
function declaredNames(code: string): Set<string> {
  const names = new Set<string>();
  const sf = ts.createSourceFile('x.ts', code, ts.ScriptTarget.ES2022, true);
  for (const st of sf.statements) {
    if (ts.isVariableStatement(st)) for (const d of st.declarationList.declarations) if (ts.isIdentifier(d.name)) names.add(d.name.text);
    if ((ts.isClassDeclaration(st) || ts.isFunctionDeclaration(st)) && st.name) names.add(st.name.text);
    if (ts.isImportDeclaration(st) && st.importClause) {
      const c = st.importClause;
      if (c.name) names.add(c.name.text);
      const b = c.namedBindings;
      if (b && ts.isNamespaceImport(b)) names.add(b.name.text);
      if (b && ts.isNamedImports(b)) for (const e of b.elements) names.add(e.name.text);
    }
  }
  return names;
}

/** The example as a module: imports for what it uses but does not import, the prelude, the (wrapped) code. */
function moduleText(ex: Example, owner: Map<string, string>): string {
  const h = HARNESS[ex.id] ?? {};
  const lines = ex.code.split('\n');
  const ownImports = lines.filter((l) => /^import\s/.test(l));
  const rest = lines.filter((l) => !/^import\s/.test(l)).join('\n');
  const declared = declaredNames([...ownImports, h.prelude ?? '', h.setup ?? ''].join('\n'));
  const host = h.wrap ? h.host ?? 'Base' : undefined;
  const used = new Set([...(ex.code + (h.prelude ?? '') + (h.setup ?? '') + (host ?? '')).matchAll(IDENT)].map((m) => m[0]));
  const byModule = new Map<string, string[]>();
  for (const name of used) {
    const spec = owner.get(name);
    if (!spec || declared.has(name)) continue;
    // vitest's describe in a test, nodemilter's when called as describe(Class...)
    if (name === 'describe' && !/\bdescribe\(\s*[A-Z]/.test(ex.code + (h.setup ?? ''))) continue;
    byModule.set(spec, [...(byModule.get(spec) ?? []), name]);
  }
  const imports = [...byModule].map(([spec, names]) => `import { ${names.join(', ')} } from '${spec}';`);
  if (used.has('milter') && !declared.has('milter')) imports.push("import * as milter from 'nodemilter/milter';");
  const head = [...ownImports, ...imports, h.prelude ?? '', h.setup ?? ''].join('\n');
  let body: string;
  if (h.wrap === 'method') body = `class __Host extends ${host} {\n  async __example() {\n${rest}\n  }\n}`;
  else if (h.wrap === 'members') body = `class __Host extends ${host} {\n${rest}\n}`;
  else body = rest;
  return `${head}\n${body}\nexport {};\n`;
}

describe('every @example in the API docs', () => {
  it('finds the examples', () => {
    expect(EXAMPLES.length).toBeGreaterThan(40);
    for (const id of Object.keys(HARNESS)) expect(EXAMPLES.map((e) => e.id), `HARNESS names ${id}, which is no longer an example`).toContain(id);
  });

  it('type-checks every example against the API, imported as nodemilter', () => {
    const owner = moduleExports();
    const files = new Map<string, string>();
    const where = new Map<string, Example>();
    for (const ex of EXAMPLES) {
      const name = path.join(ROOT, '.doc-examples', ex.id.replace(/[/#]/g, '_') + (ex.js ? '.js' : '.ts'));
      files.set(name, moduleText(ex, owner));
      where.set(name, ex);
    }
    // Top-level await is fine in an example (ES modules); JavaScript examples are checked loosely.
    const options: ts.CompilerOptions = { ...compilerOptions(), module: ts.ModuleKind.ES2022, moduleResolution: ts.ModuleResolutionKind.Node10, allowJs: true, checkJs: true };
    const host = ts.createCompilerHost(options);
    const read = host.readFile.bind(host);
    host.readFile = (f) => files.get(path.resolve(f)) ?? read(f);
    const exists = host.fileExists.bind(host);
    host.fileExists = (f) => files.has(path.resolve(f)) || exists(f);
    const getSourceFile = host.getSourceFile.bind(host);
    host.getSourceFile = (f, lang, onError, create) => {
      const text = files.get(path.resolve(f));
      return text !== undefined ? ts.createSourceFile(f, text, lang, true) : getSourceFile(f, lang, onError, create);
    };
    const tsFiles = [...files.keys()].filter((f) => f.endsWith('.ts'));
    const jsFiles = [...files.keys()].filter((f) => f.endsWith('.js'));
    const loose: ts.CompilerOptions = { ...options, strict: false, noImplicitOverride: false };
    const diagnostics = [
      ...ts.getPreEmitDiagnostics(ts.createProgram(tsFiles, options, host)),
      ...ts.getPreEmitDiagnostics(ts.createProgram(jsFiles, loose, host)),
    ];
    const problems: string[] = [];
    for (const d of diagnostics) {
      const ex = d.file && where.get(path.resolve(d.file.fileName));
      if (!ex) continue;
      const line = d.file!.getLineAndCharacterOfPosition(d.start ?? 0).line + 1;
      problems.push(`${ex.id} (${path.relative(ROOT, ex.file)}:${ex.line}), example line ${line}: ${ts.flattenDiagnosticMessageText(d.messageText, '\n')}\n${files.get(path.resolve(d.file!.fileName))}`);
    }
    expect(problems).toEqual([]);
  }, 120_000);

  const owner = moduleExports();
  let checked = 0;
  for (const ex of EXAMPLES) {
    const h = HARNESS[ex.id] ?? {};
    it.skipIf(h.noRun !== undefined)(`${ex.id} runs${h.noRun ? ` (type-checked only: ${h.noRun})` : ''}`, async () => {
      const text = moduleText(ex, owner);
      const checks: { expr: string; expected: unknown; line: string }[] = [];
      // `expression; // literal` lines become checks; prose comments are left alone.
      const instrumented = text
        .split('\n')
        .map((line) => {
          const m = /^(\s*)([^/].*?);\s*\/\/\s*(.+?)\s*$/.exec(line);
          // A wrapped example is defined, not called: its comments are not checked.
          if (h.wrap || !m || /^(const|let|var|return|await|if|for|import|export|static|class)\b/.test(m[2].trim())) return line;
          let expected: unknown;
          try {
            expected = new Function(`return (${m[3]});`)();
          } catch {
            return line;
          }
          checks.push({ expr: m[2], expected, line: line.trim() });
          return `${m[1]}__check(${checks.length - 1}, ${m[2]});`;
        })
        .join('\n');
      const js = ts.transpileModule(instrumented.replace(/^export \{\};$/m, ''), { compilerOptions: { ...compilerOptions(), paths: undefined, baseUrl: undefined } }).outputText;
      const seen: unknown[] = [];
      const req = (spec: string) => {
        if (spec in MODULES) return require(path.join(ROOT, 'dist', MODULES[spec].replace(/\.ts$/, '.js')));
        if (spec.startsWith('../src/')) return require(path.join(ROOT, 'dist', spec.slice(3)));
        if (spec === 'vitest') return { expect }; // this file's: the example's expectations count here
        return require(spec);
      };
      const __check = (i: number, value: unknown) => {
        seen[i] = value;
      };
      const run = new Function('require', 'exports', '__check', `return (async () => {\n${js}\n})();`);
      await run(req, {}, __check);
      checked += checks.length;
      checks.forEach((c, i) => {
        const expected = c.expected;
        if (expected !== null && typeof expected === 'object' && !Array.isArray(expected)) expect(seen[i], c.line).toMatchObject(expected as object);
        else expect(seen[i], c.line).toEqual(expected);
      });
    });
  }

  it('checked the values the examples show', () => {
    // Every `expr; // literal` line of a runnable example (29 today).
    expect(checked).toBeGreaterThanOrEqual(29);
  });
});
