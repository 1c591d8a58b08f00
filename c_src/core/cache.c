/* Freshness checks of cached session copies (see cache.h). */
#include "cache.h"
#include <string.h>
#include <time.h>

int64_t dx_cache_now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
}

static _Atomic uint64_t g_gen = 1;

uint64_t dx_cache_gen(void) { return atomic_load_explicit(&g_gen, memory_order_acquire); }
uint64_t dx_cache_gen_bump(void) { return atomic_fetch_add_explicit(&g_gen, 1, memory_order_acq_rel) + 1; }

int dx_cache_check(dx_cache_meta *m, int64_t now_ns, uint64_t gen, int64_t max_stale_ns) {
    int fresh;
    if (max_stale_ns < 0) {
        fresh = now_ns < atomic_load_explicit(&m->lease_ns, memory_order_acquire);
    } else {
        int64_t fill = atomic_load_explicit(&m->fill_ns, memory_order_acquire);
        fresh = fill > 0 && atomic_load_explicit(&m->gen, memory_order_acquire) == gen && now_ns - fill < max_stale_ns;
    }
    if (!fresh) return DX_CACHE_STALE;
    /* store only when clear: a hot copy's line stays shared between readers */
    if (!atomic_load_explicit(&m->ref, memory_order_relaxed)) atomic_store_explicit(&m->ref, 1, memory_order_relaxed);
    return DX_CACHE_HIT;
}

static void raise_to(_Atomic int64_t *a, int64_t v) {
    int64_t cur = atomic_load_explicit(a, memory_order_relaxed);
    while (cur < v && !atomic_compare_exchange_weak_explicit(a, &cur, v, memory_order_release, memory_order_relaxed)) {
    }
}

void dx_cache_arm(dx_cache_meta *m, int64_t fill_ns, uint64_t gen, int64_t lease_ns) {
    /* the generation before the fill time: a reader that sees the new fill
     * sees the new generation too (it loads the fill first) */
    if (gen) atomic_store_explicit(&m->gen, gen, memory_order_release);
    if (lease_ns > 0) raise_to(&m->lease_ns, lease_ns);
    if (fill_ns > 0) raise_to(&m->fill_ns, fill_ns);
}

int dx_cache_take_ref(dx_cache_meta *m) { return atomic_exchange_explicit(&m->ref, 0, memory_order_relaxed); }

/* One counter per stripe, each on its own cache line; a thread keeps the
 * stripe it drew first. */
#define STRIPES 64
static struct {
    _Alignas(64) _Atomic uint64_t n;
} g_hits[STRIPES];
static _Atomic unsigned g_next_stripe;
static _Thread_local int t_stripe = -1;

void dx_cache_count_hit(void) {
    if (t_stripe < 0) t_stripe = (int)(atomic_fetch_add_explicit(&g_next_stripe, 1, memory_order_relaxed) % STRIPES);
    atomic_fetch_add_explicit(&g_hits[t_stripe].n, 1, memory_order_relaxed);
}

uint64_t dx_cache_hits(void) {
    uint64_t s = 0;
    for (int i = 0; i < STRIPES; i++) s += atomic_load_explicit(&g_hits[i].n, memory_order_relaxed);
    return s;
}

void dx_cache_reset_hits(void) {
    for (int i = 0; i < STRIPES; i++) atomic_store_explicit(&g_hits[i].n, 0, memory_order_relaxed);
}

size_t dx_cache_id(char *buf, size_t cap, const char *sid, size_t len) {
    if (len > cap || cap - len < DX_CACHE_PREFIX_LEN) return 0;
    memcpy(buf, DX_CACHE_PREFIX, DX_CACHE_PREFIX_LEN);
    memcpy(buf + DX_CACHE_PREFIX_LEN, sid, len);
    return DX_CACHE_PREFIX_LEN + len;
}
