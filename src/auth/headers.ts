/**
 * Header fields as mailauth writes them (`Name: value`, folded with CRLF)
 * turned into what addheader/insheader take, so that the MTA delivers the
 * bytes that were signed.
 *
 * @module
 */
import { P_HDR_LEADSPC } from '../constants';
import { InvalidArgumentError } from '../errors';

/** A header field for addheader/insheader: folded lines joined with LF, the value as the negotiated leading-space mode wants it. */
export interface HeaderField {
  name: string;
  value: string;
}

/** The methods of a milter context this module uses to insert headers. */
export interface HeaderInserter {
  /** The negotiated protocol steps (for SMFIP_HDR_LEADSPC). */
  readonly steps: number;
  /** Base.addheader: with an index, insert there (0 is the top). */
  addheader(name: string, value: string, idx?: number): unknown;
}

/**
 * Split header text (`Name: value\r\n\tmore\r\nOther: x\r\n`) into fields
 * for addheader. Folds become LF (Postfix turns a CR LF inside a value into
 * CR CR LF; LF is delivered as CRLF). With `leadingSpace` (HDR_LEADSPC
 * negotiated) the value keeps everything after the colon, so the MTA
 * delivers the bytes given; without it one leading space is dropped, which
 * the MTA puts back.
 */
export function headerFields(text: string, leadingSpace: boolean): HeaderField[] {
  const out: HeaderField[] = [];
  const lines = text.replace(/\r?\n$/, '').split(/\r?\n/);
  for (const line of lines) {
    if (line === '') continue;
    if (/^[ \t]/.test(line)) {
      if (!out.length) throw new InvalidArgumentError(`header text starts with a continuation line: ${JSON.stringify(line.slice(0, 40))}`);
      out[out.length - 1].value += `\n${line}`;
      continue;
    }
    const colon = line.indexOf(':');
    if (colon <= 0 || !/^[\x21-\x39\x3b-\x7e]+$/.test(line.slice(0, colon))) throw new InvalidArgumentError(`not a header field: ${JSON.stringify(line.slice(0, 60))}`);
    out.push({ name: line.slice(0, colon), value: line.slice(colon + 1) });
  }
  if (!leadingSpace) for (const f of out) if (f.value.startsWith(' ')) f.value = f.value.slice(1);
  return out;
}

/**
 * Insert header fields at the top of the message (index 0), in the order
 * given, each value as the session's leading-space mode needs it. Under
 * Postfix index 0 is above the Received header it adds (which the milter
 * never sees and nothing here signs).
 */
export function insertOnTop(ctx: HeaderInserter, text: string): HeaderField[] {
  const fields = headerFields(text, (ctx.steps & P_HDR_LEADSPC) !== 0);
  for (const f of [...fields].reverse()) ctx.addheader(f.name, f.value, 0);
  return fields;
}
