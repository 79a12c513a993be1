/**
 * Option negotiation as tables and pure functions, shared by Base, the test
 * harness and the engines: which SMFIP_* bits belong to which callback, and
 * what a {@link MilterDescription} asks for given what the MTA offers.
 *
 * @module
 */
import {
  M_CONNECT, M_DATA, M_ENVFROM, M_ENVRCPT, M_EOH, M_EOM, M_HELO,
  P_NOBODY, P_NOCONNECT, P_NODATA, P_NOEOH, P_NOHDRS, P_NOHELO, P_NOMAIL, P_NORCPT, P_NOUNKNOWN,
  P_NR_BODY, P_NR_CONN, P_NR_DATA, P_NR_EOH, P_NR_HDR, P_NR_HELO, P_NR_MAIL, P_NR_RCPT, P_NR_UNKN,
  P_SKIP, SETSYMLIST,
} from './constants';
import type { MacroStage } from './constants';
import type { CallbackName, MilterDescription, NegotiateOffer } from './types';

/** A callback the MTA can be told not to send (it has an SMFIP_NO* bit). */
export type OptionalCallback = 'connect' | 'helo' | 'envfrom' | 'envrcpt' | 'data' | 'header' | 'eoh' | 'body' | 'unknown';

/**
 * Per optional callback: `no`, the SMFIP_NO* bit that stops the MTA sending
 * it, and `nr`, the SMFIP_NR_* bit that stops the MTA waiting for its reply.
 */
export const STEP_BITS: Readonly<Record<OptionalCallback, { readonly no: number; readonly nr: number }>> = {
  connect: { no: P_NOCONNECT, nr: P_NR_CONN },
  helo: { no: P_NOHELO, nr: P_NR_HELO },
  envfrom: { no: P_NOMAIL, nr: P_NR_MAIL },
  envrcpt: { no: P_NORCPT, nr: P_NR_RCPT },
  data: { no: P_NODATA, nr: P_NR_DATA },
  header: { no: P_NOHDRS, nr: P_NR_HDR },
  eoh: { no: P_NOEOH, nr: P_NR_EOH },
  body: { no: P_NOBODY, nr: P_NR_BODY },
  unknown: { no: P_NOUNKNOWN, nr: P_NR_UNKN },
};

/** The optional callbacks, in protocol order. */
export const OPTIONAL_CALLBACKS: readonly OptionalCallback[] = Object.keys(STEP_BITS) as OptionalCallback[];

/** The macro stage (SMFIM_*) whose macros arrive just before each callback that has one. */
export const MACRO_STAGE_OF: Readonly<Partial<Record<CallbackName, MacroStage>>> = {
  connect: M_CONNECT,
  helo: M_HELO,
  envfrom: M_ENVFROM,
  envrcpt: M_ENVRCPT,
  data: M_DATA,
  eoh: M_EOH,
  eom: M_EOM,
};

/**
 * The steps a description asks for when it gives no `steps`: SMFIP_NO* for
 * every optional callback it lacks, SMFIP_NR_* for every `noreply` one, and
 * SMFIP_SKIP (harmless unless body returns SKIP).
 */
export function defaultSteps(desc: Pick<MilterDescription, 'callbacks' | 'noreply'>): number {
  let steps = P_SKIP;
  for (const cb of OPTIONAL_CALLBACKS) {
    if (!desc.callbacks[cb]) steps |= STEP_BITS[cb].no;
    else if (desc.noreply?.includes(cb)) steps |= STEP_BITS[cb].nr;
  }
  return steps;
}

/** The outcome of negotiation: what is in force for the connection. */
export interface Negotiated {
  actions: number;
  steps: number;
  /** The macro lists to send with the reply (empty unless SETSYMLIST is in `actions`). */
  symlists: Partial<Record<MacroStage, readonly string[]>>;
}

/**
 * What a description without a negotiate callback asks for, given the
 * MTA's offer: its `actions` (all offered when undefined) and `steps`
 * ({@link defaultSteps} when undefined), both limited to what was offered,
 * plus SMFIF_SETSYMLIST when it has symlists and the MTA offers it. Asking
 * for an unoffered bit would abort the session, so those bits are dropped.
 */
export function resolveNegotiation(desc: MilterDescription, offer: NegotiateOffer): Negotiated {
  const hasSymlists = Object.keys(desc.symlists ?? {}).length > 0;
  let actions = (desc.actions ?? offer.actions) & offer.actions;
  if (hasSymlists) actions |= offer.actions & SETSYMLIST;
  const steps = (desc.steps ?? defaultSteps(desc)) & offer.steps;
  const symlists = actions & SETSYMLIST && hasSymlists ? { ...desc.symlists } : {};
  return { actions, steps, symlists };
}
