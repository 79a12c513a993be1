/**
 * libmilter's constants, with the values of `<libmilter/mfapi.h>` and
 * `<libmilter/mfdef.h>` (sendmail 8.17). Engine-neutral: every layer may use
 * them, and they mean the same on the wire whichever engine serves.
 *
 * @module
 */

/** Callback return status: go on with the next step. */
export const CONTINUE = 0;
/** Reject the message (or the recipient, from envrcpt) with a 5xx reply. */
export const REJECT = 1;
/** Accept the message and silently throw it away. */
export const DISCARD = 2;
/** Accept the message (or connection) without calling the milter again for it. */
export const ACCEPT = 3;
/** Fail temporarily with a 4xx reply. */
export const TEMPFAIL = 4;
/** No reply is sent to the MTA (only for steps negotiated as no-reply). */
export const NOREPLY = 7;
/** Skip the rest of the body (only from body(), only if SMFIP_SKIP was negotiated). */
export const SKIP = 8;
/** From negotiate: use libmilter's defaults for the options. */
export const ALL_OPTS = 10;

/** Same values under libmilter's own names. */
export const SMFIS_CONTINUE = CONTINUE;
export const SMFIS_REJECT = REJECT;
export const SMFIS_DISCARD = DISCARD;
export const SMFIS_ACCEPT = ACCEPT;
export const SMFIS_TEMPFAIL = TEMPFAIL;
export const SMFIS_NOREPLY = NOREPLY;
export const SMFIS_SKIP = SKIP;
export const SMFIS_ALL_OPTS = ALL_OPTS;

/** A callback's answer to the MTA. */
export type Status =
  | typeof CONTINUE
  | typeof REJECT
  | typeof DISCARD
  | typeof ACCEPT
  | typeof TEMPFAIL
  | typeof NOREPLY
  | typeof SKIP
  | typeof ALL_OPTS;

/** Every valid status value, for validation. */
export const STATUSES: readonly number[] = [CONTINUE, REJECT, DISCARD, ACCEPT, TEMPFAIL, NOREPLY, SKIP, ALL_OPTS];

const STATUS_NAMES: Record<number, string> = {
  [CONTINUE]: 'CONTINUE',
  [REJECT]: 'REJECT',
  [DISCARD]: 'DISCARD',
  [ACCEPT]: 'ACCEPT',
  [TEMPFAIL]: 'TEMPFAIL',
  [NOREPLY]: 'NOREPLY',
  [SKIP]: 'SKIP',
  [ALL_OPTS]: 'ALL_OPTS',
};

/** The name of a status value (`CONTINUE`, `REJECT`, ...), or `undefined`. */
export function statusName(status: number): string | undefined {
  return STATUS_NAMES[status];
}

/* ---- Action flags (SMFIF_*): what a milter may modify at end of message. */

export const SMFIF_NONE = 0x0;
/** May add headers. */
export const ADDHDRS = 0x1;
/** May replace the body. */
export const CHGBODY = 0x2;
/** Old name of CHGBODY. */
export const MODBODY = CHGBODY;
/** May add recipients. */
export const ADDRCPT = 0x4;
/** May delete recipients. */
export const DELRCPT = 0x8;
/** May change or delete headers. */
export const CHGHDRS = 0x10;
/** May quarantine the message. */
export const QUARANTINE = 0x20;
/** May change the envelope sender. */
export const CHGFROM = 0x40;
/** May add recipients with ESMTP parameters. */
export const ADDRCPT_PAR = 0x80;
/** May set the list of macros per stage. */
export const SETSYMLIST = 0x100;

export const SMFIF_ADDHDRS = ADDHDRS;
export const SMFIF_CHGBODY = CHGBODY;
export const SMFIF_MODBODY = MODBODY;
export const SMFIF_ADDRCPT = ADDRCPT;
export const SMFIF_DELRCPT = DELRCPT;
export const SMFIF_CHGHDRS = CHGHDRS;
export const SMFIF_QUARANTINE = QUARANTINE;
export const SMFIF_CHGFROM = CHGFROM;
export const SMFIF_ADDRCPT_PAR = ADDRCPT_PAR;
export const SMFIF_SETSYMLIST = SETSYMLIST;
/** Every action flag of protocol version 6. */
export const SMFIF_ALL = 0x1ff;
/** The action flags of a version 1 filter. */
export const SMFI_V1_ACTS = 0xf;
/** The action flags of a version 2 filter. */
export const SMFI_V2_ACTS = 0x3f;
/** The action flags libmilter 8.17 knows. */
export const SMFI_CURR_ACTS = 0x1ff;

/* ---- Protocol steps (SMFIP_*): what the MTA sends and awaits. */

export const P_NOCONNECT = 0x1;
export const P_NOHELO = 0x2;
export const P_NOMAIL = 0x4;
export const P_NORCPT = 0x8;
export const P_NOBODY = 0x10;
export const P_NOHDRS = 0x20;
export const P_NOEOH = 0x40;
export const P_NR_HDR = 0x80;
export const P_NOUNKNOWN = 0x100;
export const P_NODATA = 0x200;
export const P_SKIP = 0x400;
export const P_RCPT_REJ = 0x800;
export const P_NR_CONN = 0x1000;
export const P_NR_HELO = 0x2000;
export const P_NR_MAIL = 0x4000;
export const P_NR_RCPT = 0x8000;
export const P_NR_DATA = 0x10000;
export const P_NR_UNKN = 0x20000;
export const P_NR_EOH = 0x40000;
export const P_NR_BODY = 0x80000;
export const P_HDR_LEADSPC = 0x100000;

export const SMFIP_NOCONNECT = P_NOCONNECT;
export const SMFIP_NOHELO = P_NOHELO;
export const SMFIP_NOMAIL = P_NOMAIL;
export const SMFIP_NORCPT = P_NORCPT;
export const SMFIP_NOBODY = P_NOBODY;
export const SMFIP_NOHDRS = P_NOHDRS;
export const SMFIP_NOEOH = P_NOEOH;
export const SMFIP_NR_HDR = P_NR_HDR;
export const SMFIP_NOHREPL = P_NR_HDR;
export const SMFIP_NOUNKNOWN = P_NOUNKNOWN;
export const SMFIP_NODATA = P_NODATA;
export const SMFIP_SKIP = P_SKIP;
export const SMFIP_RCPT_REJ = P_RCPT_REJ;
export const SMFIP_NR_CONN = P_NR_CONN;
export const SMFIP_NR_HELO = P_NR_HELO;
export const SMFIP_NR_MAIL = P_NR_MAIL;
export const SMFIP_NR_RCPT = P_NR_RCPT;
export const SMFIP_NR_DATA = P_NR_DATA;
export const SMFIP_NR_UNKN = P_NR_UNKN;
export const SMFIP_NR_EOH = P_NR_EOH;
export const SMFIP_NR_BODY = P_NR_BODY;
export const SMFIP_HDR_LEADSPC = P_HDR_LEADSPC;
/** Every SMFIP_NO* bit. */
export const SMFIP_NO_ALL = 0x37f;
/** Every SMFIP_NR_* bit. */
export const SMFIP_NR_ALL = P_NR_HDR | P_NR_CONN | P_NR_HELO | P_NR_MAIL | P_NR_RCPT | P_NR_DATA | P_NR_UNKN | P_NR_EOH | P_NR_BODY;
/** Every protocol bit of version 6. */
export const SMFI_CURR_PROT = 0x1fffff;

/* ---- Macro stages, for setsymlist. */

export const M_CONNECT = 0;
export const M_HELO = 1;
export const M_ENVFROM = 2;
export const M_ENVRCPT = 3;
export const M_DATA = 4;
export const M_EOM = 5;
export const M_EOH = 6;
export const SMFIM_CONNECT = M_CONNECT;
export const SMFIM_HELO = M_HELO;
export const SMFIM_ENVFROM = M_ENVFROM;
export const SMFIM_ENVRCPT = M_ENVRCPT;
export const SMFIM_DATA = M_DATA;
export const SMFIM_EOM = M_EOM;
export const SMFIM_EOH = M_EOH;

/** A macro stage (SMFIM_*). */
export type MacroStage = 0 | 1 | 2 | 3 | 4 | 5 | 6;

/** The largest data a single milter command carries (MILTER_MAX_DATA_SIZE). */
export const MAX_DATA_SIZE = 65535;
