#include "ebr.h"
#include <pthread.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdlib.h>
#include <linux/membarrier.h>
#include <sys/syscall.h>
#include <unistd.h>

#define SLOTS 512
#define LINE 64

/* One cache line per reader thread so readers on different cores never write
 * the same line: this is what lets two readers scale where an rwlock does not. */
typedef struct {
    _Atomic uint64_t epoch; /* 0: not reading; else the epoch seen at entry */
    char pad[LINE - sizeof(uint64_t)];
} slot_t;

static slot_t g_slots[SLOTS] __attribute__((aligned(LINE)));
static _Atomic int g_nslots;
static _Atomic uint64_t g_epoch __attribute__((aligned(LINE))) = 1;
/* Readers that found no free slot; while any exist the epoch cannot advance. */
static _Atomic long g_overflow __attribute__((aligned(LINE)));

static _Thread_local int t_slot = -1; /* -2: overflow reader */
static _Thread_local int t_depth;

typedef struct {
    void *p;
    dx_free_fn fn;
    uint64_t epoch;
    int heavy;
} retired_t;

/* Retired objects wait in a list of the thread that retired them, so writers
 * on different threads share no lock and no written cache line: each list's
 * mutex is taken by its owner on every retire (uncontended) and by another
 * thread only to reclaim everything (dx_ebr_reclaim, pending, drain). Threads
 * without a slot share one extra list. Lists outlive their threads: what a
 * finished thread retired is freed by the next full reclaim. */
typedef struct {
    pthread_mutex_t mu;
    retired_t *v;
    size_t n, cap;
    size_t since; /* retires since the owner last collected */
} rlist_t;

typedef union {
    rlist_t l;
    char pad[2 * LINE];
} rlist_slot;

static rlist_slot g_lists[SLOTS + 1] __attribute__((aligned(LINE)));
static pthread_once_t g_lists_once = PTHREAD_ONCE_INIT;

static void lists_init(void) {
    for (int i = 0; i <= SLOTS; i++) pthread_mutex_init(&g_lists[i].l.mu, NULL);
}

/* Asymmetric fence: with membarrier(PRIVATE_EXPEDITED) the reclaimer forces a
 * full barrier on every running thread of the process, so a reader's epoch
 * announcement needs only a compiler barrier instead of a locked instruction.
 * 1: available, 0: not (readers then use a seq_cst store), -1: not probed. */
static _Atomic int g_membarrier = -1;

static int membarrier_ready(void) {
    int m = atomic_load_explicit(&g_membarrier, memory_order_relaxed);
    if (m >= 0) return m;
    long q = syscall(SYS_membarrier, MEMBARRIER_CMD_QUERY, 0, 0);
    m = q > 0 && (q & MEMBARRIER_CMD_PRIVATE_EXPEDITED) &&
        syscall(SYS_membarrier, MEMBARRIER_CMD_REGISTER_PRIVATE_EXPEDITED, 0, 0) == 0;
    atomic_store(&g_membarrier, m);
    return m;
}

static void heavy_fence(void) {
    if (membarrier_ready() != 1 || syscall(SYS_membarrier, MEMBARRIER_CMD_PRIVATE_EXPEDITED, 0, 0) != 0)
        atomic_thread_fence(memory_order_seq_cst);
}

static void take_slot(void) {
    if (t_slot != -1) return;
    int i = atomic_fetch_add(&g_nslots, 1);
    t_slot = i < SLOTS ? i : -2;
    membarrier_ready(); /* decide before this thread's first light announcement */
}

void dx_ebr_enter(void) {
    if (t_depth++ > 0) return;
    take_slot();
    if (t_slot >= 0) {
        uint64_t e = atomic_load_explicit(&g_epoch, memory_order_relaxed);
        if (atomic_load_explicit(&g_membarrier, memory_order_relaxed) == 1) {
            atomic_store_explicit(&g_slots[t_slot].epoch, e, memory_order_relaxed);
            atomic_signal_fence(memory_order_seq_cst); /* the reclaimer's membarrier orders the rest */
        } else {
            /* the announcement must be visible before any shared read */
            atomic_store_explicit(&g_slots[t_slot].epoch, e, memory_order_seq_cst);
        }
    } else {
        atomic_fetch_add_explicit(&g_overflow, 1, memory_order_seq_cst);
    }
}

void dx_ebr_exit(void) {
    if (--t_depth > 0) return;
    if (t_slot >= 0)
        atomic_store_explicit(&g_slots[t_slot].epoch, 0, memory_order_release);
    else
        atomic_fetch_sub_explicit(&g_overflow, 1, memory_order_release);
}

/* Advances the global epoch if every active reader has seen the current one.
 * Lock-free: concurrent callers race on one compare-and-swap, and a caller
 * whose scan is stale loses it. */
static uint64_t try_advance(void) {
    /* Make every reader's announcement (a plain store) visible before the scan. */
    heavy_fence();
    uint64_t e = atomic_load_explicit(&g_epoch, memory_order_seq_cst);
    if (atomic_load_explicit(&g_overflow, memory_order_seq_cst) > 0) return e;
    int n = atomic_load_explicit(&g_nslots, memory_order_acquire);
    if (n > SLOTS) n = SLOTS;
    for (int i = 0; i < n; i++) {
        uint64_t s = atomic_load_explicit(&g_slots[i].epoch, memory_order_seq_cst);
        if (s != 0 && s != e) return e;
    }
    uint64_t want = e;
    atomic_compare_exchange_strong(&g_epoch, &want, e + 1);
    return atomic_load_explicit(&g_epoch, memory_order_seq_cst);
}

static rlist_t *own_list(void) {
    take_slot();
    return &g_lists[t_slot >= 0 ? t_slot : SLOTS].l;
}

/* Moves up to max freeable entries of one list into out (capacity max). */
static size_t take_freeable(rlist_t *l, uint64_t e, int include_heavy, retired_t *out, size_t max) {
    size_t nout = 0, w = 0;
    for (size_t r = 0; r < l->n; r++) {
        retired_t *it = &l->v[r];
        if (nout < max && it->epoch + 2 <= e && (include_heavy || !it->heavy))
            out[nout++] = *it;
        else
            l->v[w++] = *it;
    }
    l->n = w;
    return nout;
}

/* Frees what is safe in list l (the caller's own, inline: bounded by max). */
static size_t collect_list(rlist_t *l, uint64_t e, int include_heavy, size_t max) {
    size_t freed = 0;
    for (;;) {
        retired_t buf[128];
        size_t lim = max - freed < 128 ? max - freed : 128;
        pthread_mutex_lock(&l->mu);
        size_t k = lim ? take_freeable(l, e, include_heavy, buf, lim) : 0;
        l->since = 0;
        pthread_mutex_unlock(&l->mu);
        for (size_t i = 0; i < k; i++) buf[i].fn(buf[i].p);
        freed += k;
        if (k < lim || freed >= max) return freed;
    }
}

void dx_ebr_retire(void *p, dx_free_fn fn, int heavy) {
    if (!p) return;
    pthread_once(&g_lists_once, lists_init);
    /* The unlink that preceded this call must be ordered before the epoch read. */
    atomic_thread_fence(memory_order_seq_cst);
    rlist_t *l = own_list();
    pthread_mutex_lock(&l->mu);
    if (l->n == l->cap) {
        size_t cap = l->cap ? l->cap * 2 : 256;
        retired_t *n = realloc(l->v, cap * sizeof(*n));
        if (!n) {
            /* Cannot defer: wait for a grace period is not possible here, so
             * keep the object forever rather than free it under a reader. */
            pthread_mutex_unlock(&l->mu);
            return;
        }
        l->v = n;
        l->cap = cap;
    }
    l->v[l->n++] = (retired_t){p, fn, atomic_load_explicit(&g_epoch, memory_order_seq_cst), heavy};
    int run = ++l->since >= 64;
    pthread_mutex_unlock(&l->mu);
    /* Inline reclamation is bounded so a writer never spends long freeing. */
    if (run) collect_list(l, try_advance(), 0, 128);
}

static size_t collect_all(int include_heavy) {
    pthread_once(&g_lists_once, lists_init);
    uint64_t e = try_advance();
    int n = atomic_load_explicit(&g_nslots, memory_order_acquire);
    if (n > SLOTS) n = SLOTS;
    size_t freed = collect_list(&g_lists[SLOTS].l, e, include_heavy, SIZE_MAX);
    for (int i = 0; i < n; i++) freed += collect_list(&g_lists[i].l, e, include_heavy, SIZE_MAX);
    return freed;
}

size_t dx_ebr_reclaim(int include_heavy) {
    size_t n = collect_all(include_heavy);
    /* A second pass lets objects retired just before the first advance go too. */
    return n + collect_all(include_heavy);
}

size_t dx_ebr_pending(void) {
    pthread_once(&g_lists_once, lists_init);
    size_t total = 0;
    for (int i = 0; i <= SLOTS; i++) {
        rlist_t *l = &g_lists[i].l;
        pthread_mutex_lock(&l->mu);
        total += l->n;
        pthread_mutex_unlock(&l->mu);
    }
    return total;
}

void dx_ebr_drain(void) {
    pthread_once(&g_lists_once, lists_init);
    for (int i = 0; i <= SLOTS; i++) {
        rlist_t *l = &g_lists[i].l;
        pthread_mutex_lock(&l->mu);
        retired_t *r = l->v;
        size_t n = l->n;
        l->v = NULL;
        l->n = l->cap = l->since = 0;
        pthread_mutex_unlock(&l->mu);
        for (size_t k = 0; k < n; k++) r[k].fn(r[k].p);
        free(r);
    }
}
