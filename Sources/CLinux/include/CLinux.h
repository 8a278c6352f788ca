#ifndef BLOCKD_CLINUX_H
#define BLOCKD_CLINUX_H

#include <stdint.h>
#include <sys/types.h>
#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <sys/timerfd.h>
#include <sys/socket.h>
#include <sys/uio.h>
#include <sys/un.h>
#include <sys/stat.h>
#include <sys/ioctl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <fcntl.h>
#include <unistd.h>
#include <errno.h>
#include <linux/fs.h>
#include <linux/falloc.h>

/* Constants that Glibc's Swift overlay does not import (macros or _GNU_SOURCE-only). */
static const int clinux_FALLOC_FL_KEEP_SIZE = FALLOC_FL_KEEP_SIZE;
static const int clinux_FALLOC_FL_PUNCH_HOLE = FALLOC_FL_PUNCH_HOLE;
static const int clinux_FALLOC_FL_ZERO_RANGE = FALLOC_FL_ZERO_RANGE;
static const int clinux_RWF_NOWAIT = RWF_NOWAIT;
static const int clinux_RWF_DSYNC = RWF_DSYNC;
static const int clinux_SEEK_DATA = 3;
static const int clinux_SEEK_HOLE = 4;
static const uint32_t clinux_EPOLLIN = EPOLLIN;
static const uint32_t clinux_EPOLLOUT = EPOLLOUT;
static const uint32_t clinux_EPOLLERR = EPOLLERR;
static const uint32_t clinux_EPOLLHUP = EPOLLHUP;
static const uint32_t clinux_EPOLLRDHUP = EPOLLRDHUP;
static const uint32_t clinux_EPOLLET = EPOLLET;
static const int clinux_EFD_NONBLOCK = EFD_NONBLOCK;
static const int clinux_EFD_CLOEXEC = EFD_CLOEXEC;
static const int clinux_TFD_NONBLOCK = TFD_NONBLOCK;
static const int clinux_TFD_CLOEXEC = TFD_CLOEXEC;
static const int clinux_SOCK_NONBLOCK = SOCK_NONBLOCK;
static const int clinux_SOCK_CLOEXEC = SOCK_CLOEXEC;
static const int clinux_MSG_NOSIGNAL = MSG_NOSIGNAL;
static const int clinux_MSG_MORE = MSG_MORE;
static const int clinux_MSG_DONTWAIT = MSG_DONTWAIT;

/* Wrappers for functions declared only under _GNU_SOURCE (defined in shim.c). */
ssize_t clinux_preadv2(int fd, const struct iovec *iov, int cnt, off_t off, int flags);
ssize_t clinux_pwritev2(int fd, const struct iovec *iov, int cnt, off_t off, int flags);
int clinux_fallocate(int fd, int mode, off_t off, off_t len);
int clinux_accept4(int fd, int flags);
int clinux_blkgetsize64(int fd, uint64_t *size);
int clinux_blksszget(int fd, int *size);
/* O_DIRECT (a _GNU_SOURCE macro whose value differs between architectures). */
int clinux_o_direct(void);
/* Open file description (OFD) byte locks, as QEMU's qemu_lock_fd / qemu_unlock_fd /
 * qemu_lock_fd_test: return 0 or -errno; the test returns -EAGAIN when another open file
 * description holds a conflicting lock on the byte. */
int clinux_ofd_lock(int fd, int64_t start, int exclusive);
int clinux_ofd_unlock(int fd, int64_t start);
int clinux_ofd_test(int fd, int64_t start, int exclusive);
#include <pthread.h>
int clinux_set_thread_name(pthread_t t, const char *name);

/* A thread-local mark for event-loop threads, set by EventLoop.run: debug builds assert that
 * no file syscall that may sleep (pread/pwrite without RWF_NOWAIT, fsync, fallocate, ...) runs
 * on a thread that has it (FileDriver). */
void clinux_set_loop_thread(int on);
int clinux_is_loop_thread(void);
static inline uint64_t clinux_epoll_data_u64(const struct epoll_event *ev) { return ev->data.u64; }
static inline void clinux_epoll_set_u64(struct epoll_event *ev, uint64_t v) { ev->data.u64 = v; }

#endif
