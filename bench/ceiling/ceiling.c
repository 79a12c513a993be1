/*
 * ceiling: the least work an S3 milter can do, to measure what the load
 * generator and this machine allow at all. No libmilter, one thread, epoll,
 * non-blocking unix sockets: it negotiates S3's protocol (only EOM is sent),
 * and answers every EOM with ADDHEADER X-Bench and CONTINUE in one write.
 * Nothing a real milter would do (no macros kept, no state machine, no
 * checks beyond framing). Used by `npm run bench:ceiling` (bench/ceiling/run.cjs) to put a bound
 * on the S3 cells of the benchmark table: no engine can beat this one.
 *
 *   cc -O2 -o ceiling bench/ceiling/ceiling.c && ./ceiling /path/to.sock
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#define MAXBUF (1 << 20)

struct conn {
  int fd;
  size_t len;
  unsigned char buf[MAXBUF];
};

/* S3: no connect, helo, mail, rcpt, body, headers, eoh, unknown, data; skip. */
#define S3_PROTO 0x77Fu
#define ADDHDRS 0x01u

static void put32(unsigned char *p, uint32_t v) {
  v = htonl(v);
  memcpy(p, &v, 4);
}

static int frame(unsigned char *out, char cmd, const void *data, uint32_t n) {
  put32(out, n + 1);
  out[4] = (unsigned char)cmd;
  if (n) memcpy(out + 5, data, n);
  return (int)(5 + n);
}

static void write_all(int fd, const unsigned char *p, size_t n) {
  while (n > 0) {
    ssize_t w = write(fd, p, n);
    if (w < 0) {
      if (errno == EINTR) continue;
      if (errno == EAGAIN) continue; /* tiny replies: the socket buffer has room */
      return;
    }
    p += w;
    n -= (size_t)w;
  }
}

/* Handle every whole packet in c->buf; returns -1 to close. */
static int handle(struct conn *c) {
  static const char hdr[] = "X-Bench\0ceiling";
  unsigned char out[4096];
  size_t off = 0, outn = 0;
  while (c->len - off >= 5) {
    uint32_t n;
    memcpy(&n, c->buf + off, 4);
    n = ntohl(n);
    if (n < 1 || n > MAXBUF - 4) return -1;
    if (c->len - off < 4 + n) break;
    unsigned char cmd = c->buf[off + 4];
    if (cmd == 'O') {
      unsigned char d[12];
      put32(d, 6);
      put32(d + 4, ADDHDRS);
      put32(d + 8, S3_PROTO);
      outn += (size_t)frame(out + outn, 'O', d, 12);
    } else if (cmd == 'E') {
      outn += (size_t)frame(out + outn, 'h', hdr, sizeof hdr);
      outn += (size_t)frame(out + outn, 'c', NULL, 0);
    } else if (cmd == 'Q') {
      if (outn) write_all(c->fd, out, outn);
      return -1;
    }
    /* D (macros), A (abort), K (quit, new connection): no reply. */
    off += 4 + n;
    if (outn > sizeof out - 64) {
      write_all(c->fd, out, outn);
      outn = 0;
    }
  }
  if (outn) write_all(c->fd, out, outn);
  memmove(c->buf, c->buf + off, c->len - off);
  c->len -= off;
  return 0;
}

int main(int argc, char **argv) {
  if (argc != 2) {
    fprintf(stderr, "usage: %s SOCKET_PATH\n", argv[0]);
    return 2;
  }
  int ls = socket(AF_UNIX, SOCK_STREAM | SOCK_NONBLOCK, 0);
  struct sockaddr_un sa = {.sun_family = AF_UNIX};
  snprintf(sa.sun_path, sizeof sa.sun_path, "%s", argv[1]);
  unlink(argv[1]);
  if (bind(ls, (struct sockaddr *)&sa, sizeof sa) < 0 || listen(ls, 4096) < 0) {
    perror("listen");
    return 1;
  }
  int ep = epoll_create1(0);
  struct epoll_event ev = {.events = EPOLLIN, .data.ptr = NULL};
  epoll_ctl(ep, EPOLL_CTL_ADD, ls, &ev);
  struct epoll_event evs[256];
  for (;;) {
    int k = epoll_wait(ep, evs, 256, -1);
    for (int i = 0; i < k; i++) {
      struct conn *c = evs[i].data.ptr;
      if (!c) {
        int fd;
        while ((fd = accept4(ls, NULL, NULL, SOCK_NONBLOCK)) >= 0) {
          struct conn *nc = malloc(sizeof *nc);
          nc->fd = fd;
          nc->len = 0;
          struct epoll_event e = {.events = EPOLLIN, .data.ptr = nc};
          epoll_ctl(ep, EPOLL_CTL_ADD, fd, &e);
        }
        continue;
      }
      ssize_t r = read(c->fd, c->buf + c->len, MAXBUF - c->len);
      if (r > 0) {
        c->len += (size_t)r;
        if (handle(c) == 0) continue;
      } else if (r < 0 && (errno == EAGAIN || errno == EINTR)) {
        continue;
      }
      close(c->fd);
      free(c);
    }
  }
}
