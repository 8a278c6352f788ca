#ifndef BLOCKD_CLINUX_H
#define BLOCKD_CLINUX_H

#define _GNU_SOURCE 1
#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <sys/timerfd.h>
#include <sys/socket.h>
#include <sys/uio.h>
#include <sys/un.h>
#include <sys/stat.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <fcntl.h>
#include <unistd.h>
#include <errno.h>
#include <linux/fs.h>
#include <linux/falloc.h>
#include <sys/ioctl.h>

/* Flags that Glibc's Swift overlay does not import as constants. */
static const int clinux_FALLOC_FL_KEEP_SIZE = FALLOC_FL_KEEP_SIZE;
static const int clinux_FALLOC_FL_PUNCH_HOLE = FALLOC_FL_PUNCH_HOLE;
static const int clinux_FALLOC_FL_ZERO_RANGE = FALLOC_FL_ZERO_RANGE;
static const int clinux_RWF_NOWAIT = RWF_NOWAIT;
static const int clinux_RWF_DSYNC = RWF_DSYNC;
static const int clinux_SEEK_DATA = SEEK_DATA;
static const int clinux_SEEK_HOLE = SEEK_HOLE;
static const unsigned clinux_EPOLLIN = EPOLLIN;
static const unsigned clinux_EPOLLOUT = EPOLLOUT;
static const unsigned clinux_EPOLLERR = EPOLLERR;
static const unsigned clinux_EPOLLHUP = EPOLLHUP;
static const unsigned clinux_EPOLLRDHUP = EPOLLRDHUP;
static const unsigned clinux_EPOLLET = EPOLLET;
static const int clinux_EFD_NONBLOCK = EFD_NONBLOCK;
static const int clinux_EFD_CLOEXEC = EFD_CLOEXEC;
static const int clinux_TFD_NONBLOCK = TFD_NONBLOCK;
static const int clinux_TFD_CLOEXEC = TFD_CLOEXEC;
static const int clinux_SOCK_NONBLOCK = SOCK_NONBLOCK;
static const int clinux_SOCK_CLOEXEC = SOCK_CLOEXEC;
static const int clinux_MSG_NOSIGNAL = MSG_NOSIGNAL;
static const int clinux_MSG_MORE = MSG_MORE;

static inline ssize_t clinux_preadv2(int fd, const struct iovec *iov, int cnt, off_t off, int flags) {
    return preadv2(fd, iov, cnt, off, flags);
}
static inline ssize_t clinux_pwritev2(int fd, const struct iovec *iov, int cnt, off_t off, int flags) {
    return pwritev2(fd, iov, cnt, off, flags);
}
static inline int clinux_fallocate(int fd, int mode, off_t off, off_t len) {
    return fallocate(fd, mode, off, len);
}
static inline int clinux_errno(void) { return errno; }
static inline uint64_t clinux_epoll_data_u64(const struct epoll_event *ev) { return ev->data.u64; }
static inline int clinux_blkgetsize64(int fd, uint64_t *size) { return ioctl(fd, BLKGETSIZE64, size); }

#include <sys/ioctl.h>
#endif
