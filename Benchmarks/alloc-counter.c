/*
 * LD_PRELOAD allocation counter for Benchmarks/counts.sh.
 *
 * Counts calls into the C allocator (malloc, calloc, realloc, posix_memalign, aligned_alloc,
 * memalign, valloc, free) of the whole process, every thread, into a small file mapped
 * shared, so another process can read the counters while the daemon runs (before and after
 * a fixed number of requests). Allocation itself is glibc's (__libc_*): only counted.
 *
 *   cc -O2 -shared -fPIC -o alloc-counter.so alloc-counter.c
 *   ALLOC_COUNTER_FILE=/tmp/counts LD_PRELOAD=./alloc-counter.so blockd ...
 *
 * File layout: four little-endian uint64 — allocations, frees, bytes requested, magic.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <sys/mman.h>
#include <unistd.h>

extern void *__libc_malloc(size_t);
extern void *__libc_calloc(size_t, size_t);
extern void *__libc_realloc(void *, size_t);
extern void *__libc_memalign(size_t, size_t);
extern void __libc_free(void *);

struct counters { uint64_t allocs, frees, bytes, magic; };

static struct counters early;                 /* until the file is mapped */
static struct counters *volatile c = &early;

__attribute__((constructor)) static void alloc_counter_init(void) {
  const char *path = getenv("ALLOC_COUNTER_FILE");
  if (!path) return;
  int fd = open(path, O_RDWR | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
  if (fd < 0) return;
  if (ftruncate(fd, sizeof(struct counters)) != 0) { close(fd); return; }
  struct counters *m = mmap(NULL, sizeof(struct counters), PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
  close(fd);
  if (m == MAP_FAILED) return;
  m->allocs = early.allocs; m->frees = early.frees; m->bytes = early.bytes;
  m->magic = 0x616c6c6f63637472ULL;  /* "allocctr" */
  c = m;
}

static inline void count_alloc(size_t n) {
  struct counters *p = c;
  __atomic_fetch_add(&p->allocs, 1, __ATOMIC_RELAXED);
  __atomic_fetch_add(&p->bytes, n, __ATOMIC_RELAXED);
}

void *malloc(size_t n) { count_alloc(n); return __libc_malloc(n); }
void *calloc(size_t k, size_t n) { count_alloc(k * n); return __libc_calloc(k, n); }
void *realloc(void *p, size_t n) {
  if (p == NULL) { count_alloc(n); return __libc_realloc(p, n); }
  /* A resize counts as an allocation (it may move and copy), not as a free. */
  count_alloc(n);
  return __libc_realloc(p, n);
}
void free(void *p) {
  if (p) __atomic_fetch_add(&c->frees, 1, __ATOMIC_RELAXED);
  __libc_free(p);
}
void *memalign(size_t a, size_t n) { count_alloc(n); return __libc_memalign(a, n); }
void *aligned_alloc(size_t a, size_t n) { count_alloc(n); return __libc_memalign(a, n); }
void *valloc(size_t n) { count_alloc(n); return __libc_memalign((size_t)sysconf(_SC_PAGESIZE), n); }
void *pvalloc(size_t n) {
  size_t page = (size_t)sysconf(_SC_PAGESIZE);
  count_alloc(n);
  return __libc_memalign(page, (n + page - 1) & ~(page - 1));
}
int posix_memalign(void **out, size_t a, size_t n) {
  if (a < sizeof(void *) || (a & (a - 1)) != 0) return EINVAL;
  count_alloc(n);
  void *p = __libc_memalign(a, n);
  if (p == NULL && n != 0) return ENOMEM;
  *out = p;
  return 0;
}
