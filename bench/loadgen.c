/*
 * loadgen: plays the MTA over the milter protocol (v6) against one milter,
 * as fast as one core allows. Single-threaded, epoll, non-blocking sockets,
 * packets encoded once per negotiated step set.
 *
 * Each connection: OPTNEG, macros C + CONNECT, HELO, then M messages of
 * macros M + MAIL, RCPT, DATA, 10 headers, EOH, body (chunks of at most
 * 65535 bytes), EOM; then QUIT and a new connection. Steps the milter
 * negotiated away (SMFIP_NO*) are not sent; steps it asked not to answer
 * (SMFIP_NR_*) are sent back to back without waiting, as an MTA does.
 * Everything up to the next step that needs a reply goes out in one write.
 *
 * Per message it checks the EOM reply: a final CONTINUE/ACCEPT, the added
 * headers (>= -H) and, with -R, replaced body bytes equal to the body size.
 *
 * Latency of a message: from sending MAIL (or, for the first message of a
 * connection, from connect()) to the final EOM reply.
 *
 * Two clients:
 *   epoll (default)  one thread drives all CONC connections, non-blocking.
 *   -T (threads)     as Postfix's smtpd and cleanup processes behave: CONC
 *                    threads, each with one blocking connection of its own;
 *                    commands are buffered until a reply is due, then sent
 *                    together and the thread waits for the reply. As
 *                    Postfix's timed reads and writes (and sendmail's), it
 *                    waits in poll() for the socket to be readable (or
 *                    writable), -t seconds at most, before each read and
 *                    write; it does not block in read() itself, which
 *                    would make every read of the milter's (which frees
 *                    space in the socket) wake the thread for nothing.
 * Both send the same bytes in the same writes; they differ in how the MTA
 * side waits, which changes how the milter's threads are scheduled.
 *
 * Usage: loadgen -s SOCKET [-c CONC] [-m MSGS_PER_CONN] [-b BODY_BYTES]
 *                [-n MESSAGES | -d SECONDS] [-w WARMUP_SECONDS] [-H MIN_HEADERS]
 *                [-R] [-B] [-T] [-t TIMEOUT_SECONDS]
 *   -B  barrier: every connection stops before EOM until all CONC
 *       connections hold a message in flight, then all send EOM (scale test;
 *       epoll client only).
 * The JSON line reports, besides rates and latencies, the replies the
 * negotiated steps need: replied_msg per message and replied_conn per
 * connection (CONNECT, HELO), OPTNEG not counted.
 * Output: one JSON line on stdout.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

#define P_NOCONNECT 0x1
#define P_NOHELO 0x2
#define P_NOMAIL 0x4
#define P_NORCPT 0x8
#define P_NOBODY 0x10
#define P_NOHDRS 0x20
#define P_NOEOH 0x40
#define P_NR_HDR 0x80
#define P_NODATA 0x200
#define P_NR_CONN 0x1000
#define P_NR_HELO 0x2000
#define P_NR_MAIL 0x4000
#define P_NR_RCPT 0x8000
#define P_NR_DATA 0x10000
#define P_NR_EOH 0x40000
#define P_NR_BODY 0x80000
#define OFFER_PROTO 0x001FFFFF
#define OFFER_ACTS 0x1FF
#define CHUNK 65535

enum expect { EXP_NONE = 0, EXP_ONE, EXP_EOM, EXP_OPTNEG };

typedef struct {
  size_t off, len;   /* bytes in the script buffer */
  int expect;        /* what follows the write */
  int msg_start;     /* latency clock starts here (MAIL) */
  int barrier;       /* EOM: wait for the barrier first */
} seg_t;

typedef struct {
  char *buf;
  size_t len, cap;
  seg_t *segs;
  int nsegs, segcap;
} script_t;

/* Scripts: 0 = OPTNEG; per negotiated protocol bits: conn (connect+helo), msg, quit */
typedef struct {
  uint32_t proto;
  int ready;
  script_t conn, msg, quit;
} scripts_t;

typedef struct conn {
  int fd;
  int state;           /* 0 = connecting, 1 = running, 2 = closing */
  script_t *cur;       /* current script */
  int seg;             /* next segment index in cur */
  size_t woff;         /* bytes of the current write already sent */
  int writing;         /* a write is pending (EPOLLOUT armed) */
  int expect;          /* reply expected now */
  int msgs_done;       /* messages finished on this connection */
  int waiting_barrier;
  double t_msg;        /* latency clock */
  int hdrs;            /* headers added in this EOM */
  size_t replbody;     /* bytes of replaced body in this EOM */
  char *rbuf;
  size_t rlen;
  int id;
  int retry;           /* connect() must be tried again (unix backlog full) */
} conn_t;

static const char *sockspec;
static int conc = 1, per_conn = 100, min_headers = 1, check_repl = 0, barrier = 0, threads_mode = 0;
static long body_bytes = 2048, total_msgs = 0;
static double duration = 0, warmup = 0, timeout_s = 60;
static int epfd;
static scripts_t sc;
static script_t optneg;
static char *body;

static long retries = 0;
static long started = 0, done_msgs = 0, counted = 0, errors = 0, headers_seen = 0, connections = 0, bad = 0;
static long long replbody_total = 0;
static double t0, t_count0, t_end = 0;
static int counting = 0, stopping = 0, open_conns = 0, at_barrier = 0, barrier_released = 0;
static uint32_t *lat; /* microseconds */
static long nlat = 0, latcap = 0;
static char first_error[256];

static double now(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return ts.tv_sec + ts.tv_nsec / 1e9;
}

static void fail(const char *what) {
  fprintf(stderr, "loadgen: %s: %s\n", what, strerror(errno));
  exit(2);
}

static pthread_mutex_t mu = PTHREAD_MUTEX_INITIALIZER; /* threads client: first_error, scripts */

static void note_error(const char *msg) {
  pthread_mutex_lock(&mu);
  errors++;
  if (!first_error[0]) snprintf(first_error, sizeof first_error, "%s", msg);
  pthread_mutex_unlock(&mu);
}

static void grow(script_t *s, size_t n) {
  if (s->len + n > s->cap) {
    s->cap = (s->len + n) * 2 + 4096;
    s->buf = realloc(s->buf, s->cap);
    if (!s->buf) fail("realloc");
  }
}

static void put_pkt(script_t *s, char cmd, const char *data, size_t n) {
  grow(s, n + 5);
  uint32_t l = htonl((uint32_t)(n + 1));
  memcpy(s->buf + s->len, &l, 4);
  s->buf[s->len + 4] = cmd;
  if (n) memcpy(s->buf + s->len + 5, data, n);
  s->len += n + 5;
}

/* NUL-terminated strings: pass a list ending with NULL. For 'D' (macros)
 * the first string is the one-letter stage, sent without its NUL. */
static void put_strs(script_t *s, char cmd, const char *first, ...) {
  char tmp[4096];
  size_t n = 0;
  va_list ap;
  if (cmd == 'D') {
    tmp[n++] = first[0];
    va_start(ap, first);
    first = va_arg(ap, const char *);
    for (const char *p = first; p; p = va_arg(ap, const char *)) {
      size_t l = strlen(p) + 1;
      memcpy(tmp + n, p, l);
      n += l;
    }
    va_end(ap);
    put_pkt(s, cmd, tmp, n);
    return;
  }
  va_start(ap, first);
  for (const char *p = first; p; p = va_arg(ap, const char *)) {
    size_t l = strlen(p) + 1;
    memcpy(tmp + n, p, l);
    n += l;
  }
  va_end(ap);
  put_pkt(s, cmd, tmp, n);
}

/* Close the bytes since the last segment into a segment with `expect`. */
static void end_seg(script_t *s, int expect, int msg_start, int bar) {
  size_t off = s->nsegs ? s->segs[s->nsegs - 1].off + s->segs[s->nsegs - 1].len : 0;
  if (s->nsegs == s->segcap) {
    s->segcap = s->segcap * 2 + 8;
    s->segs = realloc(s->segs, s->segcap * sizeof(seg_t));
  }
  s->segs[s->nsegs++] = (seg_t){off, s->len - off, expect, msg_start, bar};
}

static void build_scripts(uint32_t proto) {
  script_t *c = &sc.conn, *m = &sc.msg, *q = &sc.quit;
  sc.proto = proto;
  /* connection */
  if (!(proto & P_NOCONNECT)) {
    put_strs(c, 'D', "C", "j", "mx.example.org", "_", "client.example.net [192.0.2.7]", "{daemon_name}", "smtpd",
             "{client_addr}", "192.0.2.7", "{client_name}", "client.example.net", NULL);
    char ci[64];
    size_t n = 0;
    memcpy(ci, "client.example.net", 19);
    n = 19;
    ci[n++] = '4';
    ci[n++] = (char)(25000 >> 8);
    ci[n++] = (char)(25000 & 0xff);
    memcpy(ci + n, "192.0.2.7", 10);
    n += 10;
    put_pkt(c, 'C', ci, n);
    if (!(proto & P_NR_CONN)) end_seg(c, EXP_ONE, 0, 0);
  }
  if (!(proto & P_NOHELO)) {
    put_strs(c, 'H', "client.example.net", NULL);
    if (!(proto & P_NR_HELO)) end_seg(c, EXP_ONE, 0, 0);
  }
  if (c->nsegs == 0 || c->segs[c->nsegs - 1].off + c->segs[c->nsegs - 1].len != c->len) end_seg(c, EXP_NONE, 0, 0);
  /* message */
  int first = 1;
#define SEG(exp)                       \
  do {                                 \
    end_seg(m, exp, first, 0);         \
    first = 0;                         \
  } while (0)
  if (!(proto & P_NOMAIL)) {
    put_strs(m, 'D', "M", "{mail_addr}", "sender@example.net", "{mail_mailer}", "smtp", "{mail_host}", "example.net", NULL);
    put_strs(m, 'M', "<sender@example.net>", "SIZE=2400", NULL);
    if (!(proto & P_NR_MAIL)) SEG(EXP_ONE);
  }
  if (!(proto & P_NORCPT)) {
    put_strs(m, 'R', "<rcpt@example.org>", NULL);
    if (!(proto & P_NR_RCPT)) SEG(EXP_ONE);
  }
  if (!(proto & P_NODATA)) {
    put_pkt(m, 'T', NULL, 0);
    if (!(proto & P_NR_DATA)) SEG(EXP_ONE);
  }
  if (!(proto & P_NOHDRS)) {
    static const char *h[10][2] = {
        {"Received", "from client.example.net (client.example.net [192.0.2.7]) by mx.example.org"},
        {"From", "Sender <sender@example.net>"},
        {"To", "Recipient <rcpt@example.org>"},
        {"Subject", "Benchmark message for the milter load generator"},
        {"Date", "Sun, 29 Nov 2026 04:00:00 +0000"},
        {"Message-ID", "<bench.0123456789@example.net>"},
        {"MIME-Version", "1.0"},
        {"Content-Type", "text/plain; charset=us-ascii"},
        {"X-Mailer", "loadgen"},
        {"Reply-To", "sender@example.net"},
    };
    for (int i = 0; i < 10; i++) {
      put_strs(m, 'L', h[i][0], h[i][1], NULL);
      if (!(proto & P_NR_HDR)) SEG(EXP_ONE);
    }
  }
  if (!(proto & P_NOEOH)) {
    put_pkt(m, 'N', NULL, 0);
    if (!(proto & P_NR_EOH)) SEG(EXP_ONE);
  }
  if (!(proto & P_NOBODY)) {
    for (long off = 0; off < body_bytes; off += CHUNK) {
      long n = body_bytes - off < CHUNK ? body_bytes - off : CHUNK;
      put_pkt(m, 'B', body + off, (size_t)n);
      if (!(proto & P_NR_BODY)) SEG(EXP_ONE);
    }
  }
  if (barrier) {
    /* flush what is pending, then EOM alone after the barrier */
    if (m->len != (m->nsegs ? m->segs[m->nsegs - 1].off + m->segs[m->nsegs - 1].len : 0)) SEG(EXP_NONE);
    put_pkt(m, 'E', NULL, 0);
    end_seg(m, EXP_EOM, first, 1);
  } else {
    put_pkt(m, 'E', NULL, 0);
    SEG(EXP_EOM);
  }
#undef SEG
  put_pkt(q, 'Q', NULL, 0);
  end_seg(q, EXP_NONE, 0, 0);
  sc.ready = 1;
}

static void arm(conn_t *c, int out) {
  struct epoll_event ev = {.events = EPOLLIN | (out ? EPOLLOUT : 0), .data.ptr = c};
  if (epoll_ctl(epfd, EPOLL_CTL_MOD, c->fd, &ev) < 0) fail("epoll_ctl mod");
}

static void open_conn(conn_t *c);
static void run_segments(conn_t *c);

static void close_conn(conn_t *c, int reopen) {
  epoll_ctl(epfd, EPOLL_CTL_DEL, c->fd, NULL);
  close(c->fd);
  c->fd = -1;
  open_conns--;
  if (reopen && !stopping) open_conn(c);
}

static int want_more(void) {
  if (stopping) return 0;
  if (total_msgs && started >= total_msgs) return 0;
  return 1;
}

/* A socket for -s (unix:/path, local:/path, /path or inet:PORT[@HOST]) and its address. */
static int new_socket(int nonblock, struct sockaddr_storage *ss, socklen_t *len) {
  int fd;
  memset(ss, 0, sizeof *ss);
  if (!strncmp(sockspec, "unix:", 5) || !strncmp(sockspec, "local:", 6) || sockspec[0] == '/') {
    const char *path = sockspec[0] == '/' ? sockspec : strchr(sockspec, ':') + 1;
    struct sockaddr_un *sa = (struct sockaddr_un *)ss;
    sa->sun_family = AF_UNIX;
    snprintf(sa->sun_path, sizeof sa->sun_path, "%s", path);
    *len = sizeof *sa;
    fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC | (nonblock ? SOCK_NONBLOCK : 0), 0);
    if (fd < 0) fail("socket");
  } else if (!strncmp(sockspec, "inet:", 5)) {
    const char *at = strchr(sockspec, '@');
    struct sockaddr_in *sa = (struct sockaddr_in *)ss;
    sa->sin_family = AF_INET;
    sa->sin_port = htons(atoi(sockspec + 5));
    inet_pton(AF_INET, at ? at + 1 : "127.0.0.1", &sa->sin_addr);
    *len = sizeof *sa;
    fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC | (nonblock ? SOCK_NONBLOCK : 0), 0);
    if (fd < 0) fail("socket");
    int one = 1;
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
  } else {
    fprintf(stderr, "loadgen: socket spec %s: expected unix:/path or inet:PORT@HOST\n", sockspec);
    exit(2);
  }
  return fd;
}

static void open_conn(conn_t *c) {
  struct sockaddr_storage sa;
  socklen_t sl;
  int fd = new_socket(1, &sa, &sl);
  if (connect(fd, (struct sockaddr *)&sa, sl) < 0) {
    if (errno == EAGAIN && sa.ss_family == AF_UNIX) { /* the listen backlog is full: try again shortly */
      close(fd);
      c->fd = -1;
      c->retry = 1;
      retries++;
      return;
    }
    if (errno != EINPROGRESS) fail("connect");
  }
  c->fd = fd;
  c->retry = 0;
  c->cur = &optneg;
  c->seg = 0;
  c->woff = 0;
  c->writing = 0;
  c->expect = EXP_NONE;
  c->msgs_done = 0;
  c->rlen = 0;
  c->waiting_barrier = 0;
  c->t_msg = now();
  started++; /* the first message of this connection counts as started now */
  connections++;
  open_conns++;
  struct epoll_event ev = {.events = EPOLLIN | EPOLLOUT, .data.ptr = c};
  if (epoll_ctl(epfd, EPOLL_CTL_ADD, fd, &ev) < 0) fail("epoll_ctl add");
  c->writing = 1; /* wait for writable = connected */
}

static int cmp_u32(const void *a, const void *b) {
  uint32_t x = *(const uint32_t *)a, y = *(const uint32_t *)b;
  return x < y ? -1 : x > y;
}

static void record_latency(double us) {
  if (nlat == latcap) {
    latcap = latcap * 2 + 65536;
    lat = realloc(lat, latcap * sizeof *lat);
  }
  lat[nlat++] = (uint32_t)(us > 4e9 ? 4e9 : us);
}

/* One packet of an EOM reply: 0 = more follow, 1 = the final status, -1 = bad (noted). */
static int eom_packet(char cmd, uint32_t n, int *hdrs, size_t *repl) {
  switch (cmd) {
  case 'h':
  case 'i':
    (*hdrs)++;
    return 0;
  case 'b':
    *repl += n;
    return 0;
  case 'p':
  case 'm':
  case '+':
  case '-':
  case '2':
  case 'e':
  case 'q':
    return 0;
  case 'c':
  case 'a':
    return 1;
  default:
    note_error("EOM ended with a status other than CONTINUE/ACCEPT");
    return -1;
  }
}

/* A message's EOM reply is complete: count it and check its header and body. */
static void check_message(int hdrs, size_t repl) {
  __atomic_fetch_add(&done_msgs, 1, __ATOMIC_RELAXED);
  __atomic_fetch_add(&headers_seen, hdrs, __ATOMIC_RELAXED);
  __atomic_fetch_add(&replbody_total, (long long)repl, __ATOMIC_RELAXED);
  if (hdrs < min_headers) {
    __atomic_fetch_add(&bad, 1, __ATOMIC_RELAXED);
    note_error("EOM reply without the added header");
  }
  if (check_repl && (long)repl != body_bytes) {
    __atomic_fetch_add(&bad, 1, __ATOMIC_RELAXED);
    note_error("replaced body size differs from the body sent");
  }
}

/* The OPTNEG reply: the first one builds the scripts, later ones must agree. 0 = ok, -1 = bad (noted). */
static int accept_optneg(char cmd, const char *data, uint32_t n) {
  if (cmd != 'O' || n < 12) {
    note_error("bad OPTNEG reply");
    return -1;
  }
  uint32_t proto;
  memcpy(&proto, data + 8, 4);
  proto = ntohl(proto);
  pthread_mutex_lock(&mu);
  if (!sc.ready) build_scripts(proto);
  int same = proto == sc.proto;
  pthread_mutex_unlock(&mu);
  if (!same) {
    note_error("milter negotiated different steps on another connection");
    return -1;
  }
  return 0;
}

static void message_done(conn_t *c) {
  double t = now();
  check_message(c->hdrs, c->replbody);
  if (counting && !stopping) {
    counted++;
    record_latency((t - c->t_msg) * 1e6);
  } else if (!counting && warmup > 0 && t - t0 >= warmup) {
    counting = 1;
    t_count0 = t;
  }
  c->msgs_done++;
}

/* After an EOM: next message on this connection, or QUIT and reconnect. */
static void next_message(conn_t *c) {
  if (c->msgs_done < per_conn && want_more()) {
    started++;
    c->cur = &sc.msg;
    c->seg = 0;
    c->t_msg = now();
  } else {
    c->cur = &sc.quit;
    c->seg = 0;
  }
}

/* Write the current segment; returns when a reply is expected, a write blocks or the connection ends. */
static void run_segments(conn_t *c) {
  for (;;) {
    if (c->expect != EXP_NONE || c->waiting_barrier) return;
    if (c->seg >= c->cur->nsegs) {
      if (c->cur == &sc.conn) {
        c->cur = &sc.msg;
        c->seg = 0;
        continue;
      }
      if (c->cur == &sc.quit) {
        int more = want_more();
        close_conn(c, more);
        return;
      }
      return;
    }
    seg_t *s = &c->cur->segs[c->seg];
    if (s->barrier && !barrier_released && c->woff == 0) {
      c->waiting_barrier = 1;
      if (++at_barrier >= conc) barrier_released = 1;
      return;
    }
    if (s->msg_start && c->cur == &sc.msg && c->woff == 0 && c->msgs_done > 0) c->t_msg = now();
    while (c->woff < s->len) {
      ssize_t n = write(c->fd, c->cur->buf + s->off + c->woff, s->len - c->woff);
      if (n < 0) {
        if (errno == EAGAIN) {
          if (!c->writing) {
            c->writing = 1;
            arm(c, 1);
          }
          return;
        }
        if (errno == EINTR) continue;
        note_error(errno == EAGAIN ? "no progress: timed out" : "write failed");
        close_conn(c, !stopping);
        return;
      }
      c->woff += (size_t)n;
    }
    if (c->writing) {
      c->writing = 0;
      arm(c, 0);
    }
    c->woff = 0;
    c->expect = s->expect;
    c->hdrs = 0;
    c->replbody = 0;
    c->seg++;
    if (s->expect == EXP_EOM && c->cur == &sc.msg) c->seg = c->cur->nsegs; /* message script ends with EOM */
  }
}

static void release_barrier(conn_t *conns) {
  for (int i = 0; i < conc; i++)
    if (conns[i].fd >= 0 && conns[i].waiting_barrier) {
      conns[i].waiting_barrier = 0;
      run_segments(&conns[i]);
    }
}

/* One reply packet: returns 0 to go on, -1 if the connection was closed. */
static int on_packet(conn_t *c, char cmd, const char *data, uint32_t n) {
  switch (c->expect) {
  case EXP_OPTNEG: {
    if (accept_optneg(cmd, data, n) < 0) {
      close_conn(c, 0);
      return -1;
    }
    c->expect = EXP_NONE;
    c->cur = &sc.conn;
    c->seg = 0;
    return 0;
  }
  case EXP_ONE:
    if (cmd != 'c') {
      note_error("step reply is not CONTINUE");
      close_conn(c, 0);
      return -1;
    }
    c->expect = EXP_NONE;
    return 0;
  case EXP_EOM:
    switch (eom_packet(cmd, n, &c->hdrs, &c->replbody)) {
    case 0:
      return 0;
    case 1:
      c->expect = EXP_NONE;
      message_done(c);
      next_message(c);
      return 0;
    default:
      close_conn(c, 0);
      return -1;
    }
  default:
    note_error("unexpected packet from the milter");
    close_conn(c, 0);
    return -1;
  }
}

static void on_readable(conn_t *c) {
  for (;;) {
    ssize_t n = read(c->fd, c->rbuf + c->rlen, (CHUNK + 16) * 2 - c->rlen);
    if (n == 0) {
      if (c->cur != &sc.quit || c->expect != EXP_NONE) note_error("milter closed the connection");
      close_conn(c, !stopping && c->cur == &sc.quit);
      return;
    }
    if (n < 0) {
      if (errno == EAGAIN) break;
      if (errno == EINTR) continue;
      note_error("read failed");
      close_conn(c, 0);
      return;
    }
    c->rlen += (size_t)n;
    size_t p = 0;
    while (c->rlen - p >= 5) {
      uint32_t len;
      memcpy(&len, c->rbuf + p, 4);
      len = ntohl(len);
      if (len == 0 || len > CHUNK + 1 + 16) {
        note_error("bad packet length");
        close_conn(c, 0);
        return;
      }
      if (c->rlen - p < 4 + (size_t)len) break;
      if (on_packet(c, c->rbuf[p + 4], c->rbuf + p + 5, len - 1) < 0) return;
      p += 4 + len;
    }
    if (p) {
      memmove(c->rbuf, c->rbuf + p, c->rlen - p);
      c->rlen -= p;
    }
    if (c->expect == EXP_NONE) run_segments(c);
    if (c->fd < 0) return;
  }
}

/* Runs the epoll client. */
static void run_epoll(void) {
  epfd = epoll_create1(EPOLL_CLOEXEC);
  if (epfd < 0) fail("epoll_create1");
  conn_t *conns = calloc(conc, sizeof *conns);
  t0 = now();
  if (warmup <= 0) {
    counting = 1;
    t_count0 = t0;
  }
  for (int i = 0; i < conc; i++) {
    conns[i].id = i;
    conns[i].rbuf = malloc((CHUNK + 16) * 2);
    conns[i].fd = -1;
    open_conn(&conns[i]);
  }
  struct epoll_event evs[256];
  double hard_end = duration > 0 ? t0 + warmup + duration + timeout_s : 0;
  double last_progress = t0;
  long last_done = 0;
  for (;;) {
    int pending = 0;
    for (int i = 0; i < conc; i++)
      if (conns[i].retry) {
        if (stopping) conns[i].retry = 0;
        else {
          open_conn(&conns[i]);
          pending += conns[i].retry;
        }
      }
    if (open_conns == 0 && !pending) break;
    int n = epoll_wait(epfd, evs, 256, pending ? 1 : 200);
    if (n < 0) {
      if (errno == EINTR) continue;
      fail("epoll_wait");
    }
    for (int i = 0; i < n; i++) {
      conn_t *c = evs[i].data.ptr;
      if (c->fd < 0) continue;
      if (evs[i].events & (EPOLLERR | EPOLLHUP) && !(evs[i].events & EPOLLIN)) {
        note_error("connection error (is the milter listening?)");
        close_conn(c, 0);
        continue;
      }
      if (evs[i].events & EPOLLIN) on_readable(c);
      if (c->fd >= 0 && (evs[i].events & EPOLLOUT) && c->writing) {
        if (c->cur == &optneg && c->expect == EXP_NONE && c->seg == 0 && c->woff == 0) {
          int err = 0;
          socklen_t l = sizeof err;
          getsockopt(c->fd, SOL_SOCKET, SO_ERROR, &err, &l);
          if (err) {
            errno = err;
            note_error("connect failed");
            close_conn(c, 0);
            continue;
          }
        }
        run_segments(c);
      }
    }
    /* connections that failed never reach the barrier: release once every live one waits */
    if (barrier && !barrier_released && at_barrier > 0 && at_barrier >= open_conns && !pending) barrier_released = 1;
    if (barrier && barrier_released) {
      release_barrier(conns);
      barrier = 0; /* one barrier: the scale test sends one message per connection */
    }
    double t = now();
    if (duration > 0 && counting && !stopping && t - t_count0 >= duration) {
      stopping = 1;
      t_end = t;
    }
    if (total_msgs && !stopping && done_msgs >= total_msgs) {
      stopping = 1;
      t_end = t;
    }
    if (done_msgs != last_done) {
      last_done = done_msgs;
      last_progress = t;
    } else if (t - last_progress > timeout_s) {
      note_error("no progress: timed out");
      break;
    }
    if (hard_end && t > hard_end) {
      note_error("did not finish in time");
      break;
    }
  }
}

/* Replies the negotiated steps need: per message, and per connection (CONNECT, HELO). */
static int replied_in(const script_t *s) {
  int n = 0;
  for (int i = 0; i < s->nsegs; i++) n += s->segs[i].expect != EXP_NONE;
  return n;
}

/* ---- threads client: one blocking connection per thread, as Postfix's processes */

typedef struct {
  pthread_t th;
  int fd;
  char *rbuf;
  size_t roff, rlen;
  uint32_t *lat;
  long nlat, latcap;
} worker_t;

static int load_flag(const int *p) { return __atomic_load_n(p, __ATOMIC_ACQUIRE); }

/* Start another message unless the run is over (-n: reserve one of the total). */
static int take_message(void) {
  if (load_flag(&stopping)) return 0;
  long s = __atomic_fetch_add(&started, 1, __ATOMIC_RELAXED);
  if (total_msgs && s >= total_msgs) return 0;
  return 1;
}

static int blocking_connect(void) {
  struct timeval tv = {.tv_sec = (time_t)timeout_s, .tv_usec = (suseconds_t)((timeout_s - (time_t)timeout_s) * 1e6)};
  struct sockaddr_storage sa;
  socklen_t sl;
  int fd;
  for (;;) {
    fd = new_socket(0, &sa, &sl);
    if (connect(fd, (struct sockaddr *)&sa, sl) == 0) break;
    int e = errno;
    close(fd);
    if (e != EAGAIN || sa.ss_family != AF_UNIX || load_flag(&stopping)) {
      errno = e;
      return -1;
    }
    __atomic_fetch_add(&retries, 1, __ATOMIC_RELAXED); /* the listen backlog is full */
    usleep(1000);
  }
  /* a write larger than the socket's buffer still blocks in write(): bound it too */
  setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof tv);
  return fd;
}

/* Wait until fd is ready for `events` (POLLIN or POLLOUT), at most -t
 * seconds, as Postfix's read_wait and write_wait do before each read and
 * write. Returns 0, or -1 with the error noted. */
static int wait_ready(int fd, short events) {
  struct pollfd p = {.fd = fd, .events = events};
  int ms = timeout_s * 1000 > 2147483647.0 ? -1 : (int)(timeout_s * 1000);
  for (;;) {
    int n = poll(&p, 1, ms);
    if (n > 0) return 0;
    if (n == 0) {
      note_error("no progress: timed out");
      return -1;
    }
    if (errno != EINTR) {
      note_error("poll failed");
      return -1;
    }
  }
}

static int send_all(worker_t *w, const char *p, size_t n) {
  while (n) {
    if (wait_ready(w->fd, POLLOUT) < 0) return -1;
    ssize_t k = write(w->fd, p, n);
    if (k < 0) {
      if (errno == EINTR) continue;
      note_error("write failed");
      return -1;
    }
    p += k;
    n -= (size_t)k;
  }
  return 0;
}

/* Next reply packet (buffered reads). Returns 0 and sets cmd/data/len, or -1. */
static int read_packet(worker_t *w, char *cmd, const char **data, uint32_t *len) {
  const size_t cap = (CHUNK + 16) * 2;
  for (;;) {
    if (w->rlen - w->roff >= 5) {
      uint32_t l;
      memcpy(&l, w->rbuf + w->roff, 4);
      l = ntohl(l);
      if (l == 0 || l > CHUNK + 1 + 16) {
        note_error("bad packet length");
        return -1;
      }
      if (w->rlen - w->roff >= 4 + (size_t)l) {
        *cmd = w->rbuf[w->roff + 4];
        *data = w->rbuf + w->roff + 5;
        *len = l - 1;
        w->roff += 4 + l;
        return 0;
      }
    }
    if (w->roff) {
      memmove(w->rbuf, w->rbuf + w->roff, w->rlen - w->roff);
      w->rlen -= w->roff;
      w->roff = 0;
    }
    if (wait_ready(w->fd, POLLIN) < 0) return -1;
    ssize_t n = read(w->fd, w->rbuf + w->rlen, cap - w->rlen);
    if (n == 0) {
      note_error("milter closed the connection");
      return -1;
    }
    if (n < 0) {
      if (errno == EINTR) continue;
      note_error("read failed");
      return -1;
    }
    w->rlen += (size_t)n;
  }
}

/* Send each segment of a script, then read the reply it needs. For EOM:
 * count headers and replaced body; *t_msg is the latency clock. */
static int play(worker_t *w, const script_t *s, double *t_msg) {
  for (int i = 0; i < s->nsegs; i++) {
    const seg_t *g = &s->segs[i];
    if (send_all(w, s->buf + g->off, g->len) < 0) return -1;
    if (g->expect == EXP_NONE) continue;
    int hdrs = 0;
    size_t repl = 0;
    for (;;) {
      char cmd;
      const char *data;
      uint32_t n;
      if (read_packet(w, &cmd, &data, &n) < 0) return -1;
      if (g->expect == EXP_OPTNEG) {
        if (accept_optneg(cmd, data, n) < 0) return -1;
        break;
      }
      if (g->expect == EXP_ONE) {
        if (cmd != 'c') {
          note_error("step reply is not CONTINUE");
          return -1;
        }
        break;
      }
      int st = eom_packet(cmd, n, &hdrs, &repl);
      if (st < 0) return -1;
      if (st == 0) continue;
      double t = now();
      check_message(hdrs, repl);
      if (load_flag(&counting) && !load_flag(&stopping)) {
        __atomic_fetch_add(&counted, 1, __ATOMIC_RELAXED);
        if (w->nlat == w->latcap) {
          w->latcap = w->latcap * 2 + 4096;
          w->lat = realloc(w->lat, w->latcap * sizeof *w->lat);
        }
        double us = (t - *t_msg) * 1e6;
        w->lat[w->nlat++] = (uint32_t)(us > 4e9 ? 4e9 : us);
      }
      break;
    }
  }
  return 0;
}

static void *client_thread(void *arg) {
  worker_t *w = arg;
  while (take_message()) {
    double t_msg = now(); /* first message: from connect() */
    w->fd = blocking_connect();
    if (w->fd < 0) {
      note_error("connect failed");
      return NULL;
    }
    __atomic_fetch_add(&connections, 1, __ATOMIC_RELAXED);
    w->roff = w->rlen = 0;
    int ok = play(w, &optneg, &t_msg) == 0 && play(w, &sc.conn, &t_msg) == 0;
    for (int k = 0; ok; k++) {
      if (k > 0) t_msg = now();
      ok = play(w, &sc.msg, &t_msg) == 0;
      if (!ok || k + 1 >= per_conn || !take_message()) break;
    }
    if (ok) ok = play(w, &sc.quit, &t_msg) == 0;
    close(w->fd);
    w->fd = -1;
    if (!ok) return NULL; /* as the epoll client: a failed connection is not reopened */
  }
  return NULL;
}

static void sleep_s(double s) {
  if (s <= 0) return;
  struct timespec ts = {(time_t)s, (long)((s - (time_t)s) * 1e9)};
  while (nanosleep(&ts, &ts) < 0 && errno == EINTR) {
  }
}

/* Runs the threads client; fills the counters and lat/nlat as the epoll loop does. */
static void run_threads(void) {
  worker_t *ws = calloc(conc, sizeof *ws);
  t0 = now();
  if (warmup <= 0) {
    counting = 1;
    t_count0 = t0;
  }
  pthread_attr_t attr;
  pthread_attr_init(&attr);
  pthread_attr_setstacksize(&attr, 256 * 1024);
  for (int i = 0; i < conc; i++) {
    ws[i].fd = -1;
    ws[i].rbuf = malloc((CHUNK + 16) * 2);
    if (pthread_create(&ws[i].th, &attr, client_thread, &ws[i])) fail("pthread_create");
  }
  if (duration > 0) {
    if (warmup > 0) {
      sleep_s(warmup);
      t_count0 = now();
      __atomic_store_n(&counting, 1, __ATOMIC_RELEASE);
    }
    sleep_s(duration);
    t_end = now();
    __atomic_store_n(&stopping, 1, __ATOMIC_RELEASE);
  }
  for (int i = 0; i < conc; i++) pthread_join(ws[i].th, NULL);
  if (!t_end) t_end = now();
  for (int i = 0; i < conc; i++) {
    for (long k = 0; k < ws[i].nlat; k++) record_latency(ws[i].lat[k]);
    free(ws[i].lat);
    free(ws[i].rbuf);
  }
  free(ws);
}

int main(int argc, char **argv) {
  int opt;
  while ((opt = getopt(argc, argv, "s:c:m:b:n:d:w:H:RBTt:")) != -1) {
    switch (opt) {
    case 's': sockspec = optarg; break;
    case 'c': conc = atoi(optarg); break;
    case 'm': per_conn = atoi(optarg); break;
    case 'b': body_bytes = atol(optarg); break;
    case 'n': total_msgs = atol(optarg); break;
    case 'd': duration = atof(optarg); break;
    case 'w': warmup = atof(optarg); break;
    case 'H': min_headers = atoi(optarg); break;
    case 'R': check_repl = 1; break;
    case 'B': barrier = 1; break;
    case 'T': threads_mode = 1; break;
    case 't': timeout_s = atof(optarg); break;
    default:
      fprintf(stderr, "usage: loadgen -s SOCKET [-c CONC] [-m PER_CONN] [-b BODY] [-n MSGS | -d SECS] [-w WARMUP] [-H N] [-R] [-B] [-T] [-t TIMEOUT]\n");
      return 2;
    }
  }
  if (!sockspec || conc < 1 || per_conn < 1 || body_bytes < 0 || (!total_msgs && duration <= 0)) {
    fprintf(stderr, "loadgen: need -s SOCKET and either -n MESSAGES or -d SECONDS (got conc %d, per-conn %d)\n", conc, per_conn);
    return 2;
  }
  if (threads_mode && barrier) {
    fprintf(stderr, "loadgen: -B (barrier) works with the epoll client only, not with -T\n");
    return 2;
  }
  struct rlimit rl;
  if (getrlimit(RLIMIT_NOFILE, &rl) == 0 && rl.rlim_cur < (rlim_t)conc + 64) {
    rl.rlim_cur = rl.rlim_max;
    setrlimit(RLIMIT_NOFILE, &rl);
  }
  body = malloc(body_bytes + 1);
  for (long i = 0; i < body_bytes; i++) {
    long col = i % 72;
    body[i] = col == 70 ? '\r' : col == 71 ? '\n' : (char)('a' + (i / 72 + col) % 26);
  }
  {
    char o[12];
    uint32_t v = htonl(6), a = htonl(OFFER_ACTS), p = htonl(OFFER_PROTO);
    memcpy(o, &v, 4);
    memcpy(o + 4, &a, 4);
    memcpy(o + 8, &p, 4);
    put_pkt(&optneg, 'O', o, 12);
    end_seg(&optneg, EXP_OPTNEG, 0, 0);
  }
  if (threads_mode) run_threads();
  else run_epoll();
  if (!t_end) t_end = now();
  double secs = t_end - t_count0;
  struct rusage ru;
  getrusage(RUSAGE_SELF, &ru);
  double cpu = ru.ru_utime.tv_sec + ru.ru_utime.tv_usec / 1e6 + ru.ru_stime.tv_sec + ru.ru_stime.tv_usec / 1e6;
  /* percentiles */
  qsort(lat, nlat, sizeof *lat, cmp_u32);
  double p50 = nlat ? lat[(long)(nlat * 0.50)] : 0, p99 = nlat ? lat[nlat * 99 / 100 < nlat ? nlat * 99 / 100 : nlat - 1] : 0;
  double pmax = nlat ? lat[nlat - 1] : 0;
  printf("{\"messages\":%ld,\"counted\":%ld,\"seconds\":%.4f,\"rate\":%.1f,\"p50_us\":%.0f,\"p99_us\":%.0f,\"max_us\":%.0f,"
         "\"errors\":%ld,\"bad\":%ld,\"headers\":%ld,\"replbody_bytes\":%lld,\"connections\":%ld,\"proto\":%u,"
         "\"loadgen_cpu_s\":%.3f,\"connect_retries\":%ld,\"client\":\"%s\",\"replied_msg\":%d,\"replied_conn\":%d,"
         "\"first_error\":\"%s\"}\n",
         done_msgs, counted, secs, secs > 0 ? counted / secs : 0, p50, p99, pmax, errors, bad, headers_seen, replbody_total,
         connections, sc.proto, cpu, retries, threads_mode ? "threads" : "epoll", replied_in(&sc.msg), replied_in(&sc.conn),
         first_error);
  return errors || bad ? 1 : 0;
}
