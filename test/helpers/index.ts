/** Shared test helpers: process control, C fixture builds, fixture locations. */
import * as fs from 'fs';
import * as path from 'path';

export * from './process';
export * from './build';
export * from './events';
export * from './engines';
export * from './jsonlines';

/** The repository's test/fixtures directory. */
export const FIXTURES = path.resolve(__dirname, '..', 'fixtures');
/** The configurable libmilter test milter's C source (see its header comment). */
export const C_TESTMILTER_SRC = path.join(FIXTURES, 'c', 'testmilter.c');
/** The configurable pymilter test milter (same TM_* environment as the C one). */
export const PY_TESTMILTER = path.join(FIXTURES, 'py', 'testmilter.py');
/**
 * The Python that has Debian's python3-milter: /usr/bin/python3 (a python3
 * earlier in PATH, e.g. pyenv's, does not see Debian's dist-packages).
 */
export const SYSTEM_PYTHON = fs.existsSync('/usr/bin/python3') ? '/usr/bin/python3' : 'python3';
export * from './libmilter';
