#include <dlfcn.h>
#include <pthread.h>
#include "CZstdLoader.h"

static void *(*create_dctx)(void);
static size_t (*free_dctx)(void *);
static size_t (*decompress_stream)(void *, blockd_zstd_out *, blockd_zstd_in *);
static unsigned (*is_error)(size_t);
static void *(*create_cctx)(void);
static size_t (*free_cctx)(void *);
static size_t (*compress_stream2)(void *, blockd_zstd_out *, blockd_zstd_in *, int);
static pthread_once_t once = PTHREAD_ONCE_INIT;

/* ZSTD_e_end in zstd.h (stable since zstd 1.4.0). */
#define BLOCKD_ZSTD_E_END 2

static void load(void) {
    void *h = dlopen("libzstd.so.1", RTLD_NOW | RTLD_LOCAL);
    if (!h) h = dlopen("libzstd.so", RTLD_NOW | RTLD_LOCAL);
    if (!h) return;
    create_dctx = (void *(*)(void))dlsym(h, "ZSTD_createDCtx");
    free_dctx = (size_t (*)(void *))dlsym(h, "ZSTD_freeDCtx");
    decompress_stream = (size_t (*)(void *, blockd_zstd_out *, blockd_zstd_in *))dlsym(h, "ZSTD_decompressStream");
    is_error = (unsigned (*)(size_t))dlsym(h, "ZSTD_isError");
    if (!create_dctx || !free_dctx || !decompress_stream || !is_error) {
        create_dctx = 0;
        return;
    }
    create_cctx = (void *(*)(void))dlsym(h, "ZSTD_createCCtx");
    free_cctx = (size_t (*)(void *))dlsym(h, "ZSTD_freeCCtx");
    compress_stream2 = (size_t (*)(void *, blockd_zstd_out *, blockd_zstd_in *, int))dlsym(h, "ZSTD_compressStream2");
    if (!create_cctx || !free_cctx || !compress_stream2) {
        create_cctx = 0;
    }
}

int blockd_zstd_available(void) {
    pthread_once(&once, load);
    return create_dctx != 0;
}

void *blockd_zstd_create(void) {
    return blockd_zstd_available() ? create_dctx() : 0;
}

void blockd_zstd_free(void *ctx) {
    if (ctx && free_dctx) free_dctx(ctx);
}

size_t blockd_zstd_decompress_stream(void *ctx, blockd_zstd_out *out, blockd_zstd_in *in) {
    return decompress_stream(ctx, out, in);
}

unsigned blockd_zstd_is_error(size_t code) {
    return is_error(code);
}

int blockd_zstd_compress_available(void) {
    return blockd_zstd_available() && create_cctx != 0;
}

void *blockd_zstd_create_cctx(void) {
    return blockd_zstd_compress_available() ? create_cctx() : 0;
}

void blockd_zstd_free_cctx(void *ctx) {
    if (ctx && free_cctx) free_cctx(ctx);
}

size_t blockd_zstd_compress_end(void *ctx, blockd_zstd_out *out, blockd_zstd_in *in) {
    return compress_stream2(ctx, out, in, BLOCKD_ZSTD_E_END);
}
