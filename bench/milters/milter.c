/*
 * The C baseline on libmilter, one binary for every benchmark shape:
 *   s1   every callback implemented, each returns CONTINUE; EOM adds a header
 *   s2   the pre-EOM callbacks are no-reply (SMFIP_NR_*); EOM adds a header
 *   s3   only EOM is implemented (everything else negotiated away)
 *   s4   s2, but EOM sleeps 2 ms before adding the header
 *   big  body collected (no-reply); EOM replaces the body with the same bytes
 * Usage: milter SHAPE SOCKET
 */
#include <libmilter/mfapi.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

static int shape_async;

static sfsistat ok(SMFICTX *ctx) { (void)ctx; return SMFIS_CONTINUE; }
static sfsistat quiet(SMFICTX *ctx) { (void)ctx; return SMFIS_NOREPLY; }

static sfsistat s1_connect(SMFICTX *c, char *h, _SOCK_ADDR *a) { (void)h; (void)a; return ok(c); }
static sfsistat s1_helo(SMFICTX *c, char *h) { (void)h; return ok(c); }
static sfsistat s1_env(SMFICTX *c, char **v) { (void)v; return ok(c); }
static sfsistat s1_header(SMFICTX *c, char *n, char *v) { (void)n; (void)v; return ok(c); }
static sfsistat s1_body(SMFICTX *c, unsigned char *b, size_t l) { (void)b; (void)l; return ok(c); }
static sfsistat s1_unknown(SMFICTX *c, const char *l) { (void)l; return ok(c); }

static sfsistat s2_connect(SMFICTX *c, char *h, _SOCK_ADDR *a) { (void)h; (void)a; return quiet(c); }
static sfsistat s2_helo(SMFICTX *c, char *h) { (void)h; return quiet(c); }
static sfsistat s2_env(SMFICTX *c, char **v) { (void)v; return quiet(c); }
static sfsistat s2_header(SMFICTX *c, char *n, char *v) { (void)n; (void)v; return quiet(c); }
static sfsistat s2_body(SMFICTX *c, unsigned char *b, size_t l) { (void)b; (void)l; return quiet(c); }

static sfsistat s2_negotiate(SMFICTX *ctx, unsigned long f0, unsigned long f1, unsigned long f2, unsigned long f3,
                             unsigned long *pf0, unsigned long *pf1, unsigned long *pf2, unsigned long *pf3) {
  (void)ctx; (void)f2; (void)f3;
  unsigned long nr = SMFIP_NR_CONN | SMFIP_NR_HELO | SMFIP_NR_MAIL | SMFIP_NR_RCPT | SMFIP_NR_DATA | SMFIP_NR_HDR |
                     SMFIP_NR_EOH | SMFIP_NR_BODY;
  *pf0 = f0 & SMFIF_ADDHDRS;
  *pf1 = (f1 & nr) | (f1 & SMFIP_NOUNKNOWN);
  *pf2 = 0;
  *pf3 = 0;
  return SMFIS_CONTINUE;
}

static sfsistat eom_addheader(SMFICTX *ctx) {
  if (shape_async) {
    struct timespec ts = {0, 2000000};
    nanosleep(&ts, NULL);
  }
  if (smfi_addheader(ctx, "X-Bench", "c") != MI_SUCCESS) return SMFIS_TEMPFAIL;
  return SMFIS_CONTINUE;
}

/* big: collect the body, give it back */
typedef struct { unsigned char *buf; size_t len, cap; } body_t;

static sfsistat big_body(SMFICTX *ctx, unsigned char *b, size_t l) {
  body_t *p = smfi_getpriv(ctx);
  if (!p) {
    p = calloc(1, sizeof *p);
    smfi_setpriv(ctx, p);
  }
  if (p->len + l > p->cap) {
    p->cap = (p->len + l) * 2;
    p->buf = realloc(p->buf, p->cap);
  }
  memcpy(p->buf + p->len, b, l);
  p->len += l;
  return SMFIS_NOREPLY;
}

static void big_free(SMFICTX *ctx) {
  body_t *p = smfi_getpriv(ctx);
  if (p) {
    free(p->buf);
    free(p);
    smfi_setpriv(ctx, NULL);
  }
}

static sfsistat big_eom(SMFICTX *ctx) {
  body_t *p = smfi_getpriv(ctx);
  if (smfi_addheader(ctx, "X-Bench", "c") != MI_SUCCESS) return SMFIS_TEMPFAIL;
  if (p && smfi_replacebody(ctx, p->buf, (int)p->len) != MI_SUCCESS) return SMFIS_TEMPFAIL;
  big_free(ctx);
  return SMFIS_CONTINUE;
}

static sfsistat big_abort(SMFICTX *ctx) { big_free(ctx); return SMFIS_CONTINUE; }

static sfsistat big_negotiate(SMFICTX *ctx, unsigned long f0, unsigned long f1, unsigned long f2, unsigned long f3,
                              unsigned long *pf0, unsigned long *pf1, unsigned long *pf2, unsigned long *pf3) {
  (void)ctx; (void)f2; (void)f3;
  *pf0 = f0 & (SMFIF_ADDHDRS | SMFIF_CHGBODY);
  *pf1 = (f1 & (SMFIP_NOCONNECT | SMFIP_NOHELO | SMFIP_NOMAIL | SMFIP_NORCPT | SMFIP_NOHDRS | SMFIP_NOEOH |
                SMFIP_NOUNKNOWN | SMFIP_NODATA)) | (f1 & SMFIP_NR_BODY);
  *pf2 = 0;
  *pf3 = 0;
  return SMFIS_CONTINUE;
}

int main(int argc, char **argv) {
  if (argc != 3) {
    fprintf(stderr, "usage: %s s1|s2|s3|s4|big SOCKET\n", argv[0]);
    return 2;
  }
  const char *shape = argv[1];
  struct smfiDesc d;
  memset(&d, 0, sizeof d);
  d.xxfi_name = "bench-c";
  d.xxfi_version = SMFI_VERSION;
  d.xxfi_flags = SMFIF_ADDHDRS;
  d.xxfi_eom = eom_addheader;
  if (!strcmp(shape, "s1")) {
    d.xxfi_connect = s1_connect;
    d.xxfi_helo = s1_helo;
    d.xxfi_envfrom = s1_env;
    d.xxfi_envrcpt = s1_env;
    d.xxfi_data = ok;
    d.xxfi_header = s1_header;
    d.xxfi_eoh = ok;
    d.xxfi_body = s1_body;
    d.xxfi_abort = ok;
    d.xxfi_close = ok;
    d.xxfi_unknown = s1_unknown;
  } else if (!strcmp(shape, "s2") || !strcmp(shape, "s4")) {
    d.xxfi_connect = s2_connect;
    d.xxfi_helo = s2_helo;
    d.xxfi_envfrom = s2_env;
    d.xxfi_envrcpt = s2_env;
    d.xxfi_data = quiet;
    d.xxfi_header = s2_header;
    d.xxfi_eoh = quiet;
    d.xxfi_body = s2_body;
    d.xxfi_negotiate = s2_negotiate;
    shape_async = !strcmp(shape, "s4");
  } else if (!strcmp(shape, "s3")) {
    /* only eom */
  } else if (!strcmp(shape, "big")) {
    d.xxfi_flags = SMFIF_ADDHDRS | SMFIF_CHGBODY;
    d.xxfi_body = big_body;
    d.xxfi_eom = big_eom;
    d.xxfi_abort = big_abort;
    d.xxfi_negotiate = big_negotiate;
  } else {
    fprintf(stderr, "unknown shape %s: expected s1, s2, s3, s4 or big\n", shape);
    return 2;
  }
  if (smfi_setconn(argv[2]) == MI_FAILURE) return 1;
  if (smfi_register(d) == MI_FAILURE) return 1;
  smfi_setbacklog(1024);
  if (smfi_opensocket(1) == MI_FAILURE) {
    fprintf(stderr, "cannot open %s\n", argv[2]);
    return 1;
  }
  return smfi_main() == MI_SUCCESS ? 0 : 1;
}
