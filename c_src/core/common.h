/* Shared small definitions of the pure C core (no erl_nif types). */
#ifndef DX_COMMON_H
#define DX_COMMON_H
#include <stddef.h>
#include <stdint.h>
#include <string.h>

/* A borrowed byte string (not NUL-terminated, may contain NUL). */
typedef struct {
    const char *ptr;
    size_t len;
} dx_str;

/* Result codes shared by every core module; the NIF layer maps each to a stable
 * Erlang error term (see README "Errors"). */
enum {
    DX_OK = 0,
    DX_E_NOMEM,
    DX_E_SESSION_NOT_FOUND,
    DX_E_NOT_FOUND,
    DX_E_EXISTS,
    DX_E_VERSION_MISMATCH,
    DX_E_INVALID,          /* value or argument invalid; message in err buffer */
    DX_E_LIMIT,            /* a configured limit; which one in *limit */
    DX_E_VERSION_NOT_FOUND,
    DX_E_BATCH,            /* an atomic batch failed; per-item results say why */
    DX_E_DERIVED,          /* a derived variable written other than by propagation */
    DX_E_LOCKED,           /* locked by an optimizer and the write lacks its token */
    DX_E_STALE_LOCK,       /* the write carries a token that is no longer current */
    DX_E_DENIED,           /* access control refused the operation */
    DX_E_RATE_LIMITED,     /* the session's token bucket is empty */
    DX_E_INVALID_NAME,     /* a name or session id that is not UTF-8 */
    DX_E_VERSION_LIMIT,    /* the variable is at DX_VERSION_MAX: no further version */
};

#define DX_ERRLEN 256

/* Seeded 64-bit hash; the seed is set once at load so outside input cannot aim
 * at a fixed hash function. */
void dx_hash_seed(uint64_t seed);
uint64_t dx_hash(const void *p, size_t len);

static inline int dx_str_eq(const char *a, size_t alen, const char *b, size_t blen) {
    return alen == blen && (alen == 0 || memcmp(a, b, alen) == 0);
}

#endif
