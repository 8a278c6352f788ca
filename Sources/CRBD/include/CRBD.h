#ifndef BLOCKD_CRBD_H
#define BLOCKD_CRBD_H

/* librbd and librados for the `rbd` driver, loaded at run time (dlopen of librbd.so.1 and
 * librados.so.2) the first time an rbd node opens. Linking them would map ~20 MB of Ceph
 * libraries (and run their C++ static initialisers) in every blockd process, rbd or not.
 * Building needs the headers (Debian librbd-dev); running an rbd node needs librbd1.
 *
 * Every entry has exactly the type of the library function it points to (__typeof__), so
 * the compiler checks the table against the installed headers. */
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <rados/librados.h>
#include <rbd/librbd.h>
#include <rbd/features.h>

struct blockd_rbd_api {
    __typeof__(rados_create) *rados_create;
    __typeof__(rados_conf_read_file) *rados_conf_read_file;
    __typeof__(rados_conf_set) *rados_conf_set;
    __typeof__(rados_conf_get) *rados_conf_get;
    __typeof__(rados_connect) *rados_connect;
    __typeof__(rados_shutdown) *rados_shutdown;
    __typeof__(rados_cluster_fsid) *rados_cluster_fsid;
    __typeof__(rados_ioctx_create) *rados_ioctx_create;
    __typeof__(rados_ioctx_destroy) *rados_ioctx_destroy;
    __typeof__(rados_ioctx_set_namespace) *rados_ioctx_set_namespace;
    __typeof__(rados_ioctx_get_id) *rados_ioctx_get_id;

    __typeof__(rbd_version) *rbd_version;
    __typeof__(rbd_namespace_exists) *rbd_namespace_exists;
    __typeof__(rbd_open) *rbd_open;
    __typeof__(rbd_open_read_only) *rbd_open_read_only;
    __typeof__(rbd_close) *rbd_close;
    __typeof__(rbd_stat) *rbd_stat;
    __typeof__(rbd_get_size) *rbd_get_size;
    __typeof__(rbd_get_features) *rbd_get_features;
    __typeof__(rbd_get_flags) *rbd_get_flags;
    __typeof__(rbd_get_id) *rbd_get_id;
    __typeof__(rbd_get_parent) *rbd_get_parent;
    __typeof__(rbd_linked_image_spec_cleanup) *rbd_linked_image_spec_cleanup;
    __typeof__(rbd_snap_spec_cleanup) *rbd_snap_spec_cleanup;
    __typeof__(rbd_resize) *rbd_resize;
    __typeof__(rbd_flush) *rbd_flush;
    __typeof__(rbd_diff_iterate2) *rbd_diff_iterate2;
    __typeof__(rbd_lock_acquire) *rbd_lock_acquire;
    __typeof__(rbd_lock_release) *rbd_lock_release;
    __typeof__(rbd_lock_get_owners) *rbd_lock_get_owners;
    __typeof__(rbd_lock_get_owners_cleanup) *rbd_lock_get_owners_cleanup;

    __typeof__(rbd_set_image_notification) *rbd_set_image_notification;
    __typeof__(rbd_poll_io_events) *rbd_poll_io_events;
    __typeof__(rbd_aio_create_completion) *rbd_aio_create_completion;
    __typeof__(rbd_aio_get_return_value) *rbd_aio_get_return_value;
    __typeof__(rbd_aio_get_arg) *rbd_aio_get_arg;
    __typeof__(rbd_aio_release) *rbd_aio_release;
    __typeof__(rbd_aio_read) *rbd_aio_read;
    __typeof__(rbd_aio_write) *rbd_aio_write;
    __typeof__(rbd_aio_discard) *rbd_aio_discard;
    __typeof__(rbd_aio_write_zeroes) *rbd_aio_write_zeroes;
    __typeof__(rbd_aio_flush) *rbd_aio_flush;
};

/* The loaded API, or NULL with a reason in `error` (dlopen's or the missing symbol). Loads
 * once; later calls return the same answer. Thread-safe. */
const struct blockd_rbd_api *blockd_rbd_load(const char **error);

/* Constants Swift does not import from the headers (enums and macros). */
static const int blockd_RBD_WRITE_ZEROES_FLAG_THICK_PROVISION = RBD_WRITE_ZEROES_FLAG_THICK_PROVISION;
static const int blockd_EVENT_TYPE_EVENTFD = EVENT_TYPE_EVENTFD;
static const int blockd_RBD_LOCK_MODE_EXCLUSIVE = RBD_LOCK_MODE_EXCLUSIVE;
static const uint64_t blockd_RBD_FEATURE_STRIPINGV2 = RBD_FEATURE_STRIPINGV2;
static const uint64_t blockd_RBD_FEATURE_EXCLUSIVE_LOCK = RBD_FEATURE_EXCLUSIVE_LOCK;
static const uint64_t blockd_RBD_FEATURE_OBJECT_MAP = RBD_FEATURE_OBJECT_MAP;
static const uint64_t blockd_RBD_FEATURE_FAST_DIFF = RBD_FEATURE_FAST_DIFF;
static const uint64_t blockd_RBD_FLAG_FAST_DIFF_INVALID = RBD_FLAG_FAST_DIFF_INVALID;
static const int blockd_LIBRBD_VERSION_CODE = LIBRBD_VERSION_CODE;

#endif
