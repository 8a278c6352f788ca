#define _GNU_SOURCE 1
#include <fcntl.h>
#include <sys/uio.h>
#include <sys/socket.h>
#include <sys/ioctl.h>
#include <linux/fs.h>
#include <pthread.h>
#include "CLinux.h"

int clinux_set_thread_name(pthread_t t, const char *name) { return pthread_setname_np(t, name); }

ssize_t clinux_preadv2(int fd, const struct iovec *iov, int cnt, off_t off, int flags) {
    return preadv2(fd, iov, cnt, off, flags);
}
ssize_t clinux_pwritev2(int fd, const struct iovec *iov, int cnt, off_t off, int flags) {
    return pwritev2(fd, iov, cnt, off, flags);
}
int clinux_fallocate(int fd, int mode, off_t off, off_t len) {
    return fallocate(fd, mode, off, len);
}
int clinux_accept4(int fd, int flags) {
    return accept4(fd, NULL, NULL, flags);
}
int clinux_blkgetsize64(int fd, uint64_t *size) {
    return ioctl(fd, BLKGETSIZE64, size);
}
