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

/** One JSON line of the e2e milter (test/fixtures/e2e/milter.cjs): `ev` and its fields; `conn` numbers the session. */
export interface E2eEvent {
  ev: string;
  [k: string]: any;
}

/**
 * The events the e2e milter printed (its stdout) for the session whose
 * Subject header contains `marker`; throws, with the output, if none did.
 */
export function e2eSessionOf(stdout: string, marker: string): E2eEvent[] {
  const byConn = new Map<number, E2eEvent[]>();
  for (const line of stdout.split('\n')) {
    if (!line.startsWith('{')) continue;
    const e = JSON.parse(line) as E2eEvent;
    if (e.conn === undefined) continue;
    if (!byConn.has(e.conn)) byConn.set(e.conn, []);
    byConn.get(e.conn)!.push(e);
  }
  const s = [...byConn.values()].find((evs) => evs.some((e) => e.ev === 'header' && e.name === 'Subject' && e.value.includes(marker)));
  if (!s) throw new Error(`no milter session with ${marker}:\n${stdout}`);
  return s;
}

/** A CRLF message split at its first empty line: [header, body]. */
export function splitMessage(m: string): [string, string] {
  const at = m.indexOf('\r\n\r\n');
  return [m.slice(0, at), m.slice(at + 4)];
}
