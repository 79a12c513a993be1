/*
 * handoff: what one hand-off between two threads costs on this machine, the
 * price the libmilter engine pays twice per replied callback (libmilter's
 * worker -> the JavaScript thread -> the worker). Two threads ping-pong N
 * times through
 *   cv      a mutex and condition variable each way (how the worker parks)
 *   eventfd an eventfd each way, the waiter in epoll_wait (how libuv wakes
 *           the JavaScript thread for a thread-safe function call)
 * and, for scale, a unix socket pair between the two threads (what one
 * MTA <-> milter round trip needs at the least). Prints the median round
 * trip in microseconds of 5 runs of N round trips each, as JSON.
 *
 *   cc -O2 -pthread -o handoff bench/ceiling/handoff.c && ./handoff [N]
 */
#define _GNU_SOURCE
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

static long N = 20000;

static double now_us(void) {
  struct timespec t;
  clock_gettime(CLOCK_MONOTONIC, &t);
  return t.tv_sec * 1e6 + t.tv_nsec / 1e3;
}

/* ---- condition variable */
static pthread_mutex_t mu = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t cv = PTHREAD_COND_INITIALIZER;
static long turn; /* even: main's turn, odd: peer's */

static void *cv_peer(void *arg) {
  (void)arg;
  for (long i = 0; i < N; i++) {
    pthread_mutex_lock(&mu);
    while (!(turn & 1)) pthread_cond_wait(&cv, &mu);
    turn++;
    pthread_mutex_unlock(&mu);
    pthread_cond_signal(&cv);
  }
  return NULL;
}

static double run_cv(void) {
  pthread_t t;
  turn = 0;
  pthread_create(&t, NULL, cv_peer, NULL);
  double t0 = now_us();
  for (long i = 0; i < N; i++) {
    pthread_mutex_lock(&mu);
    turn++;
    pthread_mutex_unlock(&mu);
    pthread_cond_signal(&cv);
    pthread_mutex_lock(&mu);
    while (turn & 1) pthread_cond_wait(&cv, &mu);
    pthread_mutex_unlock(&mu);
  }
  double dt = now_us() - t0;
  pthread_join(t, NULL);
  return dt / N;
}

/* ---- eventfd + epoll */
static int efd_a, efd_b;

static void wait_efd(int ep, int fd) {
  struct epoll_event ev;
  while (epoll_wait(ep, &ev, 1, -1) < 1) {
  }
  uint64_t v;
  if (read(fd, &v, 8) != 8) abort();
}

static void *efd_peer(void *arg) {
  (void)arg;
  int ep = epoll_create1(0);
  struct epoll_event ev = {.events = EPOLLIN};
  epoll_ctl(ep, EPOLL_CTL_ADD, efd_a, &ev);
  uint64_t one = 1;
  for (long i = 0; i < N; i++) {
    wait_efd(ep, efd_a);
    if (write(efd_b, &one, 8) != 8) abort();
  }
  close(ep);
  return NULL;
}

static double run_efd(void) {
  efd_a = eventfd(0, 0);
  efd_b = eventfd(0, 0);
  int ep = epoll_create1(0);
  struct epoll_event ev = {.events = EPOLLIN};
  epoll_ctl(ep, EPOLL_CTL_ADD, efd_b, &ev);
  pthread_t t;
  pthread_create(&t, NULL, efd_peer, NULL);
  uint64_t one = 1;
  double t0 = now_us();
  for (long i = 0; i < N; i++) {
    if (write(efd_a, &one, 8) != 8) abort();
    wait_efd(ep, efd_b);
  }
  double dt = now_us() - t0;
  pthread_join(t, NULL);
  close(ep);
  close(efd_a);
  close(efd_b);
  return dt / N;
}

/* ---- unix socket pair */
static int sp[2];

static void *sock_peer(void *arg) {
  (void)arg;
  char b[64];
  for (long i = 0; i < N; i++) {
    if (read(sp[1], b, 1) != 1 || write(sp[1], b, 1) != 1) abort();
  }
  return NULL;
}

static double run_sock(void) {
  socketpair(AF_UNIX, SOCK_STREAM, 0, sp);
  pthread_t t;
  pthread_create(&t, NULL, sock_peer, NULL);
  char b = 'x';
  double t0 = now_us();
  for (long i = 0; i < N; i++) {
    if (write(sp[0], &b, 1) != 1 || read(sp[0], &b, 1) != 1) abort();
  }
  double dt = now_us() - t0;
  pthread_join(t, NULL);
  close(sp[0]);
  close(sp[1]);
  return dt / N;
}

static int cmp(const void *a, const void *b) {
  double x = *(const double *)a, y = *(const double *)b;
  return x < y ? -1 : x > y;
}

static double median5(double (*f)(void)) {
  double r[5];
  for (int i = 0; i < 5; i++) r[i] = f();
  qsort(r, 5, sizeof r[0], cmp);
  return r[2];
}

int main(int argc, char **argv) {
  if (argc > 1) N = atol(argv[1]);
  if (N <= 0) {
    fprintf(stderr, "usage: %s [ROUND_TRIPS]\n", argv[0]);
    return 2;
  }
  double c = median5(run_cv), e = median5(run_efd), s = median5(run_sock);
  printf("{\"roundTrips\":%ld,\"condvar_us\":%.2f,\"eventfd_epoll_us\":%.2f,\"socketpair_us\":%.2f}\n", N, c, e, s);
  return 0;
}
