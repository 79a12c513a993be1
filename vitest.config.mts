import { fileURLToPath } from 'node:url';
import { defineConfig } from 'vitest/config';

const src = fileURLToPath(new URL('./src/', import.meta.url));

export default defineConfig({
  // The examples import `nodemilter` as users do; a test that imports an
  // example's TypeScript gets src/, like the test itself (tsconfig.json's
  // "paths" say the same to tsc). Compiled examples in dist/ resolve the
  // package through its "exports" instead.
  resolve: {
    alias: [
      { find: /^nodemilter$/, replacement: `${src}index.ts` },
      { find: /^nodemilter\/(.*)$/, replacement: `${src}$1` },
    ],
  },
  test: {
    include: ['test/**/*.test.ts'],
    // Milters run in child processes; forks keep every test file in its own process.
    pool: 'forks',
    testTimeout: 30_000,
    hookTimeout: 30_000,
    reporters: ['default', ['json', { outputFile: 'test-results.json' }]],
  },
});
