/**
 * Compile TypeScript that uses standard decorators with the project's
 * compiler settings and run it against the already-loaded nodemilter
 * modules. Vitest's transformer (oxc) does not lower standard decorators, so
 * decorator syntax cannot appear in test files themselves; tsc does lower
 * it, which is how users' code is built.
 */
import ts from 'typescript';
import * as api from '../../src/index';

export function compileMilter(source: string): Record<string, any> {
  const out = ts.transpileModule(source, {
    compilerOptions: {
      target: ts.ScriptTarget.ES2022,
      module: ts.ModuleKind.CommonJS,
      experimentalDecorators: false,
      strict: true,
    },
    reportDiagnostics: true,
  });
  if (out.diagnostics?.length) throw new Error(ts.flattenDiagnosticMessageText(out.diagnostics[0].messageText, '\n'));
  const mod = { exports: {} as Record<string, any> };
  const req = (id: string) => {
    if (id === 'nodemilter') return api;
    throw new Error(`a compiled fixture may import only 'nodemilter', not ${id}`);
  };
  new Function('require', 'module', 'exports', out.outputText)(req, mod, mod.exports);
  return mod.exports;
}
