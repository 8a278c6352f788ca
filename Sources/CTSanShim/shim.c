// ThreadSanitizer support for Swift's Synchronization.Mutex on Linux (TSan builds only; see
// scripts/tsan.sh and docs/architecture.md, "ThreadSanitizer").
//
// Mutex's fast paths (one compare-and-swap to lock, one to unlock) are inlined into our code
// and instrumented, but its slow paths (`_lockSlow`, `_tryLockSlow`, `_unlockSlow`: a spin
// and FUTEX_LOCK_PI / FUTEX_UNLOCK_PI) live in libswiftSynchronization.so, which is not
// built with TSan. A lock handed over through a slow path is then invisible to TSan, which
// reports every access the lock protects as a race. These wrappers interpose the three slow
// paths (the executable's definition wins over the shared library's), call the real ones,
// and tell TSan about the acquire and release on the lock word, the same address the
// inlined fast paths use.
#define _GNU_SOURCE
#include <dlfcn.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>

#define SWIFTCC __attribute__((swiftcall))
#define SWIFTSELF __attribute__((swift_context))

void __tsan_acquire(void *addr) __attribute__((weak));
void __tsan_release(void *addr) __attribute__((weak));

#define LOCK_SLOW "$s15Synchronization12_MutexHandleV9_lockSlowyys6UInt32VF"
#define TRYLOCK_SLOW "$s15Synchronization12_MutexHandleV12_tryLockSlowSbyF"
#define UNLOCK_SLOW "$s15Synchronization12_MutexHandleV11_unlockSlowyyF"

typedef SWIFTCC void lock_fn(uint32_t, void *SWIFTSELF);
typedef SWIFTCC bool trylock_fn(void *SWIFTSELF);
typedef SWIFTCC void unlock_fn(void *SWIFTSELF);

static lock_fn *next_lock;
static trylock_fn *next_trylock;
static unlock_fn *next_unlock;

static void *real(const char *name) {
    void *f = dlsym(RTLD_NEXT, name);
    if (!f) {
        fprintf(stderr, "CTSanShim: %s not found\n", name);
        abort();
    }
    return f;
}

SWIFTCC void blockd_tsan_lockSlow(uint32_t id, void *SWIFTSELF self) __asm__(LOCK_SLOW);
SWIFTCC void blockd_tsan_lockSlow(uint32_t id, void *SWIFTSELF self) {
    next_lock(id, self);
    if (__tsan_acquire) __tsan_acquire(self);
}

SWIFTCC bool blockd_tsan_tryLockSlow(void *SWIFTSELF self) __asm__(TRYLOCK_SLOW);
SWIFTCC bool blockd_tsan_tryLockSlow(void *SWIFTSELF self) {
    bool locked = next_trylock(self);
    if (locked && __tsan_acquire) __tsan_acquire(self);
    return locked;
}

SWIFTCC void blockd_tsan_unlockSlow(void *SWIFTSELF self) __asm__(UNLOCK_SLOW);
SWIFTCC void blockd_tsan_unlockSlow(void *SWIFTSELF self) {
    if (__tsan_release) __tsan_release(self);
    next_unlock(self);
}

// Resolved before main, while the process has one thread.
__attribute__((constructor)) static void blockd_tsan_shim_init(void) {
    next_lock = (lock_fn *)real(LOCK_SLOW);
    next_trylock = (trylock_fn *)real(TRYLOCK_SLOW);
    next_unlock = (unlock_fn *)real(UNLOCK_SLOW);
}
