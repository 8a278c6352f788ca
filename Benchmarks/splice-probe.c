/*
 * What would zero-copy sends save? Sends a cached file through a socket in 256 KiB pieces,
 * the way an NBD server answers reads, and prints the CPU time per GiB of the sending and
 * the receiving thread for each method. Run by hand (see Benchmarks/README.md):
 *
 *   cc -O2 -pthread -o /tmp/splice-probe Benchmarks/splice-probe.c
 *   /tmp/splice-probe FILE [unix|tcp] [sndbuf-bytes]
 *
 * Methods:
 *   pread+write   pread into a user buffer, write it to the socket (two copies)
 *   splice        splice file -> pipe -> socket (the socket takes page references:
 *                 MSG_SPLICE_PAGES, Linux 6.5+ for AF_UNIX and TCP)
 *   mmap+write    write straight from a mapping of the file (one copy, no pread)
 *
 * The receiver reads into one 256 KiB buffer (like nbdcopy to null:).
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#define CHUNK (256 * 1024)

static double thread_cpu(void) {
  struct rusage u;
  getrusage(RUSAGE_THREAD, &u);
  return u.ru_utime.tv_sec + u.ru_utime.tv_usec / 1e6 + u.ru_stime.tv_sec + u.ru_stime.tv_usec / 1e6;
}
static double now(void) {
  struct timespec t;
  clock_gettime(CLOCK_MONOTONIC, &t);
  return t.tv_sec + t.tv_nsec / 1e9;
}
static void die(const char *what) { perror(what); exit(1); }

struct rx { int fd; off_t total; double cpu; };
static void *receiver(void *arg) {
  struct rx *r = arg;
  char *buf = aligned_alloc(4096, CHUNK);
  double c0 = thread_cpu();
  off_t got = 0;
  while (got < r->total) {
    ssize_t n = read(r->fd, buf, CHUNK);
    if (n <= 0) die("receiver read");
    got += n;
  }
  r->cpu = thread_cpu() - c0;
  free(buf);
  return NULL;
}

static void make_pair(const char *kind, int sv[2]) {
  if (strcmp(kind, "unix") == 0) {
    if (socketpair(AF_UNIX, SOCK_STREAM, 0, sv) != 0) die("socketpair");
    return;
  }
  int l = socket(AF_INET, SOCK_STREAM, 0);
  struct sockaddr_in a = { .sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK) };
  socklen_t len = sizeof a;
  if (bind(l, (struct sockaddr *)&a, sizeof a) || listen(l, 1) || getsockname(l, (struct sockaddr *)&a, &len)) die("listen");
  sv[0] = socket(AF_INET, SOCK_STREAM, 0);
  if (connect(sv[0], (struct sockaddr *)&a, sizeof a)) die("connect");
  sv[1] = accept(l, NULL, NULL);
  close(l);
  int one = 1;
  setsockopt(sv[0], IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
}

static void run(const char *method, const char *kind, int file, off_t size, int sndbuf) {
  int sv[2];
  make_pair(kind, sv);
  if (sndbuf > 0 && setsockopt(sv[0], SOL_SOCKET, SO_SNDBUF, &sndbuf, sizeof sndbuf)) die("SO_SNDBUF");
  struct rx r = { .fd = sv[1], .total = size };
  pthread_t t;
  pthread_create(&t, NULL, receiver, &r);
  char *buf = aligned_alloc(4096, CHUNK);
  char *map = NULL;
  int p[2] = { -1, -1 };
  if (strcmp(method, "splice") == 0) {
    if (pipe(p)) die("pipe");
    if (fcntl(p[1], F_SETPIPE_SZ, CHUNK) < 0) die("F_SETPIPE_SZ");
  }
  if (strcmp(method, "mmap+write") == 0) {
    map = mmap(NULL, size, PROT_READ, MAP_SHARED | MAP_POPULATE, file, 0);
    if (map == MAP_FAILED) die("mmap");
  }
  double t0 = now(), c0 = thread_cpu();
  for (off_t off = 0; off < size; off += CHUNK) {
    if (strcmp(method, "pread+write") == 0) {
      if (pread(file, buf, CHUNK, off) != CHUNK) die("pread");
      for (ssize_t done = 0; done < CHUNK;) {
        ssize_t n = write(sv[0], buf + done, CHUNK - done);
        if (n < 0) die("write");
        done += n;
      }
    } else if (strcmp(method, "mmap+write") == 0) {
      for (ssize_t done = 0; done < CHUNK;) {
        ssize_t n = write(sv[0], map + off + done, CHUNK - done);
        if (n < 0) die("write");
        done += n;
      }
    } else {
      loff_t o = off;
      for (ssize_t in = 0; in < CHUNK;) {
        ssize_t n = splice(file, &o, p[1], NULL, CHUNK - in, SPLICE_F_MOVE);
        if (n <= 0) die("splice file->pipe");
        in += n;
        for (ssize_t out = 0; out < n;) {
          ssize_t m = splice(p[0], NULL, sv[0], NULL, n - out, SPLICE_F_MOVE);
          if (m <= 0) die("splice pipe->socket");
          out += m;
        }
      }
    }
  }
  double cpu = thread_cpu() - c0;
  pthread_join(t, NULL);
  double el = now() - t0;
  double gib = size / 1073741824.0;
  printf("%-6s %-12s sndbuf %-8d  sender %5.0f ms CPU/GiB  receiver %5.0f ms CPU/GiB  %6.0f MiB/s\n",
         kind, method, sndbuf, cpu * 1000 / gib, r.cpu * 1000 / gib, size / 1048576.0 / el);
  if (map) munmap(map, size);
  if (p[0] >= 0) { close(p[0]); close(p[1]); }
  free(buf);
  close(sv[0]);
  close(sv[1]);
}

int main(int argc, char **argv) {
  if (argc < 2) { fprintf(stderr, "usage: %s FILE [unix|tcp] [sndbuf]\n", argv[0]); return 2; }
  const char *kind = argc > 2 ? argv[2] : "unix";
  int sndbuf = argc > 3 ? atoi(argv[3]) : 0;
  int file = open(argv[1], O_RDONLY);
  if (file < 0) die("open");
  struct stat st;
  fstat(file, &st);
  off_t size = st.st_size / CHUNK * CHUNK;
  const char *methods[] = { "pread+write", "splice", "mmap+write" };
  for (int round = 0; round < 2; round++)
    for (int i = 0; i < 3; i++) run(methods[i], kind, file, size, sndbuf);
  return 0;
}
