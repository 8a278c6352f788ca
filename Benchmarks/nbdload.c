/* nbdload: a small libnbd load generator that also works over TLS (fio's nbd engine cannot
 * do TLS). One connection, QD requests always in flight, driven by nbd_poll.
 *
 *   nbdload URI randread|read BS QD SECONDS
 *
 * URI is any libnbd URI (nbds://…?tls-certificates=DIR). The export is read for SECONDS after
 * one second of warm-up: random BS-aligned offsets (randread) or sequentially, wrapping at
 * the end (read). Prints one line: ops bytes seconds p50_us p99_us.
 *
 * Built by Benchmarks/tls.sh: cc -O2 -o nbdload nbdload.c $(pkg-config --cflags --libs libnbd)
 */
#include <inttypes.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <libnbd.h>

#define MAX_US 200000

static uint64_t now_ns(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (uint64_t) ts.tv_sec * 1000000000u + ts.tv_nsec;
}

struct slot {
  char *buf;
  uint64_t started;
  bool done;
  bool busy;
};

static uint64_t *histogram;
static bool measuring;
static uint64_t ops, bytes_done;
static size_t block_size;
static int failed;

static int completed(void *user_data, int *error) {
  struct slot *s = user_data;
  if (*error) {
    fprintf(stderr, "nbdload: read failed: %s\n", strerror(*error));
    failed = 1;
  }
  if (measuring) {
    uint64_t us = (now_ns() - s->started) / 1000;
    histogram[us < MAX_US ? us : MAX_US - 1]++;
    ops++;
    bytes_done += block_size;
  }
  s->done = true;
  return 1;   /* retire the command */
}

static uint64_t percentile(double p) {
  uint64_t total = 0, seen = 0;
  for (int i = 0; i < MAX_US; i++) total += histogram[i];
  for (int i = 0; i < MAX_US; i++) {
    seen += histogram[i];
    if (seen >= total * p) return i;
  }
  return MAX_US;
}

int main(int argc, char **argv) {
  if (argc != 6) {
    fprintf(stderr, "usage: nbdload URI randread|read BS QD SECONDS\n");
    return 2;
  }
  const char *uri = argv[1];
  bool random = strcmp(argv[2], "randread") == 0;
  block_size = strtoul(argv[3], NULL, 0);
  int qd = atoi(argv[4]);
  double seconds = atof(argv[5]);
  histogram = calloc(MAX_US, sizeof *histogram);

  struct nbd_handle *h = nbd_create();
  if (!h || nbd_set_uri_allow_local_file(h, true) == -1 || nbd_connect_uri(h, uri) == -1) {
    fprintf(stderr, "nbdload: %s\n", nbd_get_error());
    return 1;
  }
  int64_t size = nbd_get_size(h);
  uint64_t blocks = (uint64_t) size / block_size;
  struct slot *slots = calloc(qd, sizeof *slots);
  for (int i = 0; i < qd; i++) {
    slots[i].buf = aligned_alloc(4096, (block_size + 4095) / 4096 * 4096);
    slots[i].done = true;
  }
  uint64_t x = 0x9E3779B97F4A7C15u, next = 0;
  uint64_t start = now_ns(), measure_from = start + 1000000000u, end = measure_from + (uint64_t) (seconds * 1e9);
  uint64_t t;
  while ((t = now_ns()) < end && !failed) {
    if (!measuring && t >= measure_from) measuring = true;
    for (int i = 0; i < qd; i++) {
      if (!slots[i].done) continue;
      uint64_t block;
      if (random) {
        x ^= x << 13; x ^= x >> 7; x ^= x << 17;
        block = x % blocks;
      } else {
        block = next++ % blocks;
      }
      slots[i].done = false;
      slots[i].started = now_ns();
      nbd_completion_callback cb = { .callback = completed, .user_data = &slots[i] };
      if (nbd_aio_pread(h, slots[i].buf, block_size, block * block_size, cb, 0) == -1) {
        fprintf(stderr, "nbdload: %s\n", nbd_get_error());
        return 1;
      }
    }
    if (nbd_poll(h, -1) == -1) {
      fprintf(stderr, "nbdload: %s\n", nbd_get_error());
      return 1;
    }
  }
  double elapsed = (double) (now_ns() - measure_from) / 1e9;
  measuring = false;
  while (nbd_aio_in_flight(h) > 0 && nbd_poll(h, -1) != -1) {}
  nbd_shutdown(h, 0);
  nbd_close(h);
  printf("%" PRIu64 " %" PRIu64 " %.3f %" PRIu64 " %" PRIu64 "\n", ops, bytes_done, elapsed,
         percentile(0.5), percentile(0.99));
  return failed;
}
