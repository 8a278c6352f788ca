#include <dlfcn.h>
#include <pthread.h>
#include <stdio.h>
#include <string.h>
#include "CRBD.h"

static struct blockd_rbd_api api;
static const struct blockd_rbd_api *loaded;
static char failure[512];
static pthread_once_t once = PTHREAD_ONCE_INIT;

#define RESOLVE(handle, name) \
    do { \
        api.name = (__typeof__(api.name))dlsym(handle, #name); \
        if (!api.name) { \
            snprintf(failure, sizeof failure, "symbol %s not found in the Ceph libraries", #name); \
            return; \
        } \
    } while (0)

static void *open_library(const char *soname, const char *fallback) {
    void *h = dlopen(soname, RTLD_NOW | RTLD_LOCAL);
    if (!h) h = dlopen(fallback, RTLD_NOW | RTLD_LOCAL);
    if (!h) {
        const char *why = dlerror();
        snprintf(failure, sizeof failure, "%s", why ? why : soname);
    }
    return h;
}

static void load(void) {
    void *rados = open_library("librados.so.2", "librados.so");
    if (!rados) return;
    void *rbd = open_library("librbd.so.1", "librbd.so");
    if (!rbd) return;
    RESOLVE(rados, rados_create);
    RESOLVE(rados, rados_conf_read_file);
    RESOLVE(rados, rados_conf_set);
    RESOLVE(rados, rados_conf_get);
    RESOLVE(rados, rados_connect);
    RESOLVE(rados, rados_shutdown);
    RESOLVE(rados, rados_cluster_fsid);
    RESOLVE(rados, rados_ioctx_create);
    RESOLVE(rados, rados_ioctx_destroy);
    RESOLVE(rados, rados_ioctx_set_namespace);
    RESOLVE(rados, rados_ioctx_get_id);
    RESOLVE(rbd, rbd_version);
    RESOLVE(rbd, rbd_namespace_exists);
    RESOLVE(rbd, rbd_open);
    RESOLVE(rbd, rbd_open_read_only);
    RESOLVE(rbd, rbd_close);
    RESOLVE(rbd, rbd_stat);
    RESOLVE(rbd, rbd_get_size);
    RESOLVE(rbd, rbd_get_features);
    RESOLVE(rbd, rbd_get_flags);
    RESOLVE(rbd, rbd_get_id);
    RESOLVE(rbd, rbd_get_parent);
    RESOLVE(rbd, rbd_linked_image_spec_cleanup);
    RESOLVE(rbd, rbd_snap_spec_cleanup);
    RESOLVE(rbd, rbd_resize);
    RESOLVE(rbd, rbd_flush);
    RESOLVE(rbd, rbd_diff_iterate2);
    RESOLVE(rbd, rbd_lock_acquire);
    RESOLVE(rbd, rbd_lock_release);
    RESOLVE(rbd, rbd_lock_get_owners);
    RESOLVE(rbd, rbd_lock_get_owners_cleanup);
    RESOLVE(rbd, rbd_set_image_notification);
    RESOLVE(rbd, rbd_poll_io_events);
    RESOLVE(rbd, rbd_aio_create_completion);
    RESOLVE(rbd, rbd_aio_get_return_value);
    RESOLVE(rbd, rbd_aio_get_arg);
    RESOLVE(rbd, rbd_aio_release);
    RESOLVE(rbd, rbd_aio_read);
    RESOLVE(rbd, rbd_aio_write);
    RESOLVE(rbd, rbd_aio_discard);
    RESOLVE(rbd, rbd_aio_write_zeroes);
    RESOLVE(rbd, rbd_aio_flush);
    loaded = &api;
}

const struct blockd_rbd_api *blockd_rbd_load(const char **error) {
    pthread_once(&once, load);
    if (!loaded && error) *error = failure;
    return loaded;
}
