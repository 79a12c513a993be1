/**
 * From a modified message to milter actions: the header changes and the new
 * body that eom must send so the MTA delivers the message as modified.
 *
 * @module
 */
import type { MilterContext } from '../types';
import type { MimeHeaderChange, MimePart } from './part';

/** One thing to do in eom: a header change (see {@link MimeHeaderChange}) or a new body. */
export type MimeAction = MimeHeaderChange | { op: 'replacebody'; body: Buffer };

/**
 * Anything with the modification actions: a {@link MilterContext}, or a Base
 * instance (whose actions have the same names and arguments).
 */
export type MimeActionTarget = Pick<MilterContext, 'addheader' | 'chgheader' | 'replacebody'>;

/**
 * The actions that turn the message the MTA has into `msg` as modified:
 * every change to the top-level headers since parsing, in order, then
 * `replacebody` with the new body if the body changed. Empty when nothing
 * changed.
 */
export function milterActions(msg: MimePart): MimeAction[] {
  const actions: MimeAction[] = [...msg.headerChanges];
  if (msg.bodyModified()) actions.push({ op: 'replacebody', body: msg.bodyBuffer() });
  return actions;
}

/**
 * Apply a modified message (or a list of {@link MimeAction}s) in eom:
 * addheader for added headers, chgheader for changed and deleted ones,
 * replacebody for the body. Works on a MilterContext or on `this` of a Base
 * subclass. Needs the ADDHDRS, CHGHDRS and CHGBODY action flags for the
 * actions it sends. Returns the actions applied.
 *
 * @example
 * ```ts
 * class Defang extends CollectingMilter {
 *   static override flags = ADDHDRS | CHGHDRS | CHGBODY;
 *   override async checkmessage(collected: MessageCollector) {
 *     const msg = parseMime(await collected.buffer());
 *     for (const p of msg.walk()) if (/\.exe$/i.test(p.filename ?? '')) p.defang();
 *     applyToContext(this, msg);
 *     return CONTINUE;
 *   }
 * }
 * ```
 */
export function applyToContext(target: MimeActionTarget, source: MimePart | readonly MimeAction[]): MimeAction[] {
  const actions = Array.isArray(source) ? (source as readonly MimeAction[]) : milterActions(source as MimePart);
  for (const a of actions) {
    switch (a.op) {
      case 'add':
        target.addheader(a.name, a.value);
        break;
      case 'insert':
        target.addheader(a.name, a.value, a.index);
        break;
      case 'change':
        target.chgheader(a.name, a.index, a.value);
        break;
      case 'delete':
        target.chgheader(a.name, a.index, '');
        break;
      case 'replacebody':
        target.replacebody(a.body);
        break;
    }
  }
  return [...actions];
}
