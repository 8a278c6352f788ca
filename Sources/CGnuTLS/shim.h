#include <gnutls/gnutls.h>
#include <gnutls/x509.h>
#include <string.h>

// gnutls_malloc is a global function pointer; a key handed to GnuTLS from a PSK callback
// must come from it (GnuTLS frees it with gnutls_free).
static inline void *cgnutls_malloc(size_t n) { return gnutls_malloc(n); }
static inline void cgnutls_free(void *p) { gnutls_free(p); }
