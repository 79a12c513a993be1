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
/** libmilter's name for {@link REJECT}. */
export const SMFIS_REJECT = REJECT;
/** libmilter's name for {@link DISCARD}. */
export const SMFIS_DISCARD = DISCARD;
/** libmilter's name for {@link ACCEPT}. */
export const SMFIS_ACCEPT = ACCEPT;
/** libmilter's name for {@link TEMPFAIL}. */
export const SMFIS_TEMPFAIL = TEMPFAIL;
/** libmilter's name for {@link NOREPLY}. */
export const SMFIS_NOREPLY = NOREPLY;
/** libmilter's name for {@link SKIP}. */
export const SMFIS_SKIP = SKIP;
/** libmilter's name for {@link ALL_OPTS}. */
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

/** No action flag. */
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

/** libmilter's name for {@link ADDHDRS}. */
export const SMFIF_ADDHDRS = ADDHDRS;
/** libmilter's name for {@link CHGBODY}. */
export const SMFIF_CHGBODY = CHGBODY;
/** libmilter's name for {@link MODBODY}. */
export const SMFIF_MODBODY = MODBODY;
/** libmilter's name for {@link ADDRCPT}. */
export const SMFIF_ADDRCPT = ADDRCPT;
/** libmilter's name for {@link DELRCPT}. */
export const SMFIF_DELRCPT = DELRCPT;
/** libmilter's name for {@link CHGHDRS}. */
export const SMFIF_CHGHDRS = CHGHDRS;
/** libmilter's name for {@link QUARANTINE}. */
export const SMFIF_QUARANTINE = QUARANTINE;
/** libmilter's name for {@link CHGFROM}. */
export const SMFIF_CHGFROM = CHGFROM;
/** libmilter's name for {@link ADDRCPT_PAR}. */
export const SMFIF_ADDRCPT_PAR = ADDRCPT_PAR;
/** libmilter's name for {@link SETSYMLIST}. */
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

/** Step: the MTA does not send connect. */
export const P_NOCONNECT = 0x1;
/** Step: the MTA does not send HELO. */
export const P_NOHELO = 0x2;
/** Step: the MTA does not send MAIL FROM. */
export const P_NOMAIL = 0x4;
/** Step: the MTA does not send RCPT TO. */
export const P_NORCPT = 0x8;
/** Step: the MTA does not send the body. */
export const P_NOBODY = 0x10;
/** Step: the MTA does not send headers. */
export const P_NOHDRS = 0x20;
/** Step: the MTA does not send end of headers. */
export const P_NOEOH = 0x40;
/** Step: the MTA does not wait for a reply to each header (libmilter's old name: SMFIP_NOHREPL). */
export const P_NR_HDR = 0x80;
/** Step: the MTA does not send unknown SMTP commands. */
export const P_NOUNKNOWN = 0x100;
/** Step: the MTA does not send DATA. */
export const P_NODATA = 0x200;
/** Step: the MTA understands SKIP from the body callback. */
export const P_SKIP = 0x400;
/** Step: the MTA also sends recipients it has already rejected. */
export const P_RCPT_REJ = 0x800;
/** Step: the MTA does not wait for a reply to connect. */
export const P_NR_CONN = 0x1000;
/** Step: the MTA does not wait for a reply to HELO. */
export const P_NR_HELO = 0x2000;
/** Step: the MTA does not wait for a reply to MAIL FROM. */
export const P_NR_MAIL = 0x4000;
/** Step: the MTA does not wait for a reply to RCPT TO. */
export const P_NR_RCPT = 0x8000;
/** Step: the MTA does not wait for a reply to DATA. */
export const P_NR_DATA = 0x10000;
/** Step: the MTA does not wait for a reply to an unknown command. */
export const P_NR_UNKN = 0x20000;
/** Step: the MTA does not wait for a reply to end of headers. */
export const P_NR_EOH = 0x40000;
/** Step: the MTA does not wait for a reply to each body chunk. */
export const P_NR_BODY = 0x80000;
/** Step: header values are sent and added with their leading space, byte for byte. */
export const P_HDR_LEADSPC = 0x100000;

/** libmilter's name for {@link P_NOCONNECT}. */
export const SMFIP_NOCONNECT = P_NOCONNECT;
/** libmilter's name for {@link P_NOHELO}. */
export const SMFIP_NOHELO = P_NOHELO;
/** libmilter's name for {@link P_NOMAIL}. */
export const SMFIP_NOMAIL = P_NOMAIL;
/** libmilter's name for {@link P_NORCPT}. */
export const SMFIP_NORCPT = P_NORCPT;
/** libmilter's name for {@link P_NOBODY}. */
export const SMFIP_NOBODY = P_NOBODY;
/** libmilter's name for {@link P_NOHDRS}. */
export const SMFIP_NOHDRS = P_NOHDRS;
/** libmilter's name for {@link P_NOEOH}. */
export const SMFIP_NOEOH = P_NOEOH;
/** libmilter's name for {@link P_NR_HDR}. */
export const SMFIP_NR_HDR = P_NR_HDR;
/** libmilter's old name for {@link P_NR_HDR}. */
export const SMFIP_NOHREPL = P_NR_HDR;
/** libmilter's name for {@link P_NOUNKNOWN}. */
export const SMFIP_NOUNKNOWN = P_NOUNKNOWN;
/** libmilter's name for {@link P_NODATA}. */
export const SMFIP_NODATA = P_NODATA;
/** libmilter's name for {@link P_SKIP}. */
export const SMFIP_SKIP = P_SKIP;
/** libmilter's name for {@link P_RCPT_REJ}. */
export const SMFIP_RCPT_REJ = P_RCPT_REJ;
/** libmilter's name for {@link P_NR_CONN}. */
export const SMFIP_NR_CONN = P_NR_CONN;
/** libmilter's name for {@link P_NR_HELO}. */
export const SMFIP_NR_HELO = P_NR_HELO;
/** libmilter's name for {@link P_NR_MAIL}. */
export const SMFIP_NR_MAIL = P_NR_MAIL;
/** libmilter's name for {@link P_NR_RCPT}. */
export const SMFIP_NR_RCPT = P_NR_RCPT;
/** libmilter's name for {@link P_NR_DATA}. */
export const SMFIP_NR_DATA = P_NR_DATA;
/** libmilter's name for {@link P_NR_UNKN}. */
export const SMFIP_NR_UNKN = P_NR_UNKN;
/** libmilter's name for {@link P_NR_EOH}. */
export const SMFIP_NR_EOH = P_NR_EOH;
/** libmilter's name for {@link P_NR_BODY}. */
export const SMFIP_NR_BODY = P_NR_BODY;
/** libmilter's name for {@link P_HDR_LEADSPC}. */
export const SMFIP_HDR_LEADSPC = P_HDR_LEADSPC;
/** Every SMFIP_NO* bit. */
export const SMFIP_NO_ALL = 0x37f;
/** Every SMFIP_NR_* bit. */
export const SMFIP_NR_ALL = P_NR_HDR | P_NR_CONN | P_NR_HELO | P_NR_MAIL | P_NR_RCPT | P_NR_DATA | P_NR_UNKN | P_NR_EOH | P_NR_BODY;
/** Every protocol bit of version 6. */
export const SMFI_CURR_PROT = 0x1fffff;

/* ---- Macro stages, for setsymlist. */

/** Macro stage: connect. */
export const M_CONNECT = 0;
/** Macro stage: HELO. */
export const M_HELO = 1;
/** Macro stage: MAIL FROM. */
export const M_ENVFROM = 2;
/** Macro stage: RCPT TO. */
export const M_ENVRCPT = 3;
/** Macro stage: DATA. */
export const M_DATA = 4;
/** Macro stage: end of message. */
export const M_EOM = 5;
/** Macro stage: end of headers. */
export const M_EOH = 6;
/** libmilter's name for {@link M_CONNECT}. */
export const SMFIM_CONNECT = M_CONNECT;
/** libmilter's name for {@link M_HELO}. */
export const SMFIM_HELO = M_HELO;
/** libmilter's name for {@link M_ENVFROM}. */
export const SMFIM_ENVFROM = M_ENVFROM;
/** libmilter's name for {@link M_ENVRCPT}. */
export const SMFIM_ENVRCPT = M_ENVRCPT;
/** libmilter's name for {@link M_DATA}. */
export const SMFIM_DATA = M_DATA;
/** libmilter's name for {@link M_EOM}. */
export const SMFIM_EOM = M_EOM;
/** libmilter's name for {@link M_EOH}. */
export const SMFIM_EOH = M_EOH;

/** A macro stage (SMFIM_*). */
export type MacroStage = 0 | 1 | 2 | 3 | 4 | 5 | 6;

/** The largest data a single milter command carries (MILTER_MAX_DATA_SIZE). */
export const MAX_DATA_SIZE = 65535;
