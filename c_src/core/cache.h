/* The freshness of a node-local cached copy of another node's session (issue
 * #16, tier 1): what lets a cached read be answered by one NIF call.
 *
 * A cached copy is an ordinary session of the store under a private id (the
 * `\0cache:` prefix, dspex_cache.erl). Its dx_cache_meta says how long it may
 * answer: the time it was filled or renewed (a read in `cached` mode answers
 * while now - fill < max_staleness), the strong lease deadline granted by the
 * owner (a `strong` read answers while now < lease; 0: no lease), and the
 * view generation it is valid under (a `cached` read answers only while the
 * global generation, bumped on every cluster view change, is still that one).
 * Times are CLOCK_MONOTONIC nanoseconds (dx_cache_now_ns), on both the C and
 * the Erlang side. The second-chance bit is set by every hit and cleared by
 * the eviction sweep. Every field is an atomic: readers take no lock.
 *
 * Renewals only move fill and lease forward (max): a reader that sees one
 * field of a renewal and not the other errs on the stale side. */
#ifndef DX_CACHE_H
#define DX_CACHE_H
#include <stdatomic.h>
#include <stddef.h>
#include <stdint.h>

typedef struct {
    _Atomic int64_t fill_ns;  /* 0: never armed (no read answers) */
    _Atomic int64_t lease_ns; /* strong lease deadline; 0: none */
    _Atomic uint64_t gen;     /* view generation; 0: never armed */
    _Atomic uint8_t ref;      /* second-chance bit */
} dx_cache_meta;

enum { DX_CACHE_HIT = 0, DX_CACHE_STALE = 1 };
/* max_stale_ns for a strong read (the lease decides, not the age). */
#define DX_CACHE_STRONG (-1)

/* The clock of every cache time (CLOCK_MONOTONIC, ns). */
int64_t dx_cache_now_ns(void);

/* The current view generation (starts at 1) and a bump (returns the new one). */
uint64_t dx_cache_gen(void);
uint64_t dx_cache_gen_bump(void);

/* DX_CACHE_HIT (and sets the second-chance bit) or DX_CACHE_STALE.
 * max_stale_ns >= 0: a `cached' read of at most that age under generation
 * gen; DX_CACHE_STRONG: a read under an unexpired strong lease. */
int dx_cache_check(dx_cache_meta *m, int64_t now_ns, uint64_t gen, int64_t max_stale_ns);

/* Arms (install) or renews the copy: fill and lease move forward only (0
 * leaves them), the generation is set (0 leaves it). */
void dx_cache_arm(dx_cache_meta *m, int64_t fill_ns, uint64_t gen, int64_t lease_ns);

/* The second-chance bit, cleared (the eviction sweep). */
int dx_cache_take_ref(dx_cache_meta *m);

/* Hit counter, striped per thread (no shared cache line on the hit path). */
void dx_cache_count_hit(void);
uint64_t dx_cache_hits(void);
void dx_cache_reset_hits(void);

/* The private id of the cached copy of session sid: "\0cache:" ++ sid, written
 * to buf (cap bytes). Returns its length, or 0 if it does not fit. */
size_t dx_cache_id(char *buf, size_t cap, const char *sid, size_t len);
#define DX_CACHE_PREFIX "\0cache:"
#define DX_CACHE_PREFIX_LEN 7
#endif
