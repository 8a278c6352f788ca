#define _GNU_SOURCE 1
#include <fcntl.h>
#include <sys/uio.h>
#include <sys/socket.h>
#include <sys/ioctl.h>
#include <linux/fs.h>
#include <pthread.h>
#include <errno.h>
#include "CLinux.h"

int clinux_set_thread_name(pthread_t t, const char *name) { return pthread_setname_np(t, name); }

static __thread int loop_thread;
void clinux_set_loop_thread(int on) { loop_thread = on; }
int clinux_is_loop_thread(void) { return loop_thread; }

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
int clinux_blksszget(int fd, int *size) {
    return ioctl(fd, BLKSSZGET, size);
}
int clinux_o_direct(void) { return O_DIRECT; }

static int ofd_op(int fd, int cmd, int64_t start, short type) {
    struct flock fl = { .l_whence = SEEK_SET, .l_start = start, .l_len = 1, .l_type = type };
    if (fcntl(fd, cmd, &fl) == -1) return -errno;
    return 0;
}
int clinux_ofd_lock(int fd, int64_t start, int exclusive) {
    return ofd_op(fd, F_OFD_SETLK, start, exclusive ? F_WRLCK : F_RDLCK);
}
int clinux_ofd_unlock(int fd, int64_t start) {
    return ofd_op(fd, F_OFD_SETLK, start, F_UNLCK);
}
int clinux_ofd_test(int fd, int64_t start, int exclusive) {
    struct flock fl = { .l_whence = SEEK_SET, .l_start = start, .l_len = 1,
                        .l_type = exclusive ? F_WRLCK : F_RDLCK };
    if (fcntl(fd, F_OFD_GETLK, &fl) == -1) return -errno;
    return fl.l_type == F_UNLCK ? 0 : -EAGAIN;
}
