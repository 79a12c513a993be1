/**
 * Reading the output of the fixture milters (test/fixtures/c/testmilter.c
 * and test/fixtures/py/testmilter.py): one line per event, TAB-separated,
 * fields escaped (\\ \t \r \n \xHH).
 */

/** One output line: `kind` is `EV`, `MACRO` or `ACT`; `name` the callback or action; `fields` unescaped (latin1: one char per byte). */
export interface FixtureEvent {
  kind: string;
  name: string;
  fields: string[];
}

/** Undo the fixture's escaping; the result has one char per byte (latin1). */
export function unescapeField(s: string): string {
  return s.replace(/\\(x[0-9a-f]{2}|.)/g, (_m, e: string) =>
    e.length === 3 ? String.fromCharCode(parseInt(e.slice(1), 16)) : e === 't' ? '\t' : e === 'r' ? '\r' : e === 'n' ? '\n' : e,
  );
}

/** Parse a fixture's stdout (or a slice of it) into events; other lines are ignored. */
export function parseEvents(out: string): FixtureEvent[] {
  const evs: FixtureEvent[] = [];
  for (const line of out.split('\n')) {
    const parts = line.split('\t');
    if (parts.length < 2 || !/^(EV|MACRO|ACT)$/.test(parts[0])) continue;
    evs.push({ kind: parts[0], name: unescapeField(parts[1]), fields: parts.slice(2).map(unescapeField) });
  }
  return evs;
}

/** Events as compact strings (`"helo localhost"`, `"MACRO connect j mx"`...), handy for toEqual. */
export function eventStrings(out: string, kinds: readonly string[] = ['EV']): string[] {
  return parseEvents(out)
    .filter((e) => kinds.includes(e.kind))
    .map((e) => (e.kind === 'EV' ? [e.name, ...e.fields] : [e.kind, e.name, ...e.fields]).join(' '));
}
