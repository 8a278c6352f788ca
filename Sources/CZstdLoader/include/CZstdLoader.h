#ifndef BLOCKD_CZSTDLOADER_H
#define BLOCKD_CZSTDLOADER_H
#include <stddef.h>

/* zstd streaming (de)compression, loaded at run time from libzstd.so.1 (always present on
 * Debian, a dependency of apt), so building blockd needs no libzstd-dev. The buffer structs
 * have ZSTD_inBuffer's and ZSTD_outBuffer's stable layout. */
typedef struct { const void *src; size_t size; size_t pos; } blockd_zstd_in;
typedef struct { void *dst; size_t size; size_t pos; } blockd_zstd_out;

/* 1 when libzstd could be loaded. */
int blockd_zstd_available(void);
void *blockd_zstd_create(void);
void blockd_zstd_free(void *ctx);
size_t blockd_zstd_decompress_stream(void *ctx, blockd_zstd_out *out, blockd_zstd_in *in);
unsigned blockd_zstd_is_error(size_t code);

/* Compression (ZSTD_compressStream2 with ZSTD_e_end, as QEMU's qcow2 writes a cluster).
 * 1 when the loaded libzstd has the compression API (zstd >= 1.4). */
int blockd_zstd_compress_available(void);
void *blockd_zstd_create_cctx(void);
void blockd_zstd_free_cctx(void *ctx);
/* One call compresses all of `in` into one frame: returns 0 when the frame is complete,
 * > 0 when `out` was too small (the context must then be discarded), or an error code. */
size_t blockd_zstd_compress_end(void *ctx, blockd_zstd_out *out, blockd_zstd_in *in);

#endif
