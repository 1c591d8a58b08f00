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

static pthread_mutex_t g_mu = PTHREAD_MUTEX_INITIALIZER;
static retired_t *g_ret;
static size_t g_nret, g_capret;
static size_t g_since_reclaim;

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

void dx_ebr_enter(void) {
    if (t_depth++ > 0) return;
    if (t_slot == -1) {
        int i = atomic_fetch_add(&g_nslots, 1);
        t_slot = i < SLOTS ? i : -2;
        membarrier_ready(); /* decide before this thread's first light announcement */
    }
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

/* Advance the global epoch if every active reader has seen the current one. */
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

/* Moves the freeable entries out under the lock; frees them outside it. */
static size_t collect(int include_heavy, size_t max) {
    retired_t *out = NULL;
    size_t nout = 0;
    pthread_mutex_lock(&g_mu);
    uint64_t e = try_advance();
    if (g_nret) {
        out = malloc(sizeof(*out) * (g_nret < max ? g_nret : max));
        if (out) {
            size_t w = 0;
            for (size_t r = 0; r < g_nret; r++) {
                retired_t *it = &g_ret[r];
                if (nout < max && it->epoch + 2 <= e && (include_heavy || !it->heavy))
                    out[nout++] = *it;
                else
                    g_ret[w++] = *it;
            }
            g_nret = w;
        }
    }
    g_since_reclaim = 0;
    pthread_mutex_unlock(&g_mu);
    for (size_t i = 0; i < nout; i++) out[i].fn(out[i].p);
    free(out);
    return nout;
}

void dx_ebr_retire(void *p, dx_free_fn fn, int heavy) {
    if (!p) return;
    /* The unlink that preceded this call must be ordered before the epoch read. */
    atomic_thread_fence(memory_order_seq_cst);
    int run = 0;
    pthread_mutex_lock(&g_mu);
    if (g_nret == g_capret) {
        size_t cap = g_capret ? g_capret * 2 : 256;
        retired_t *n = realloc(g_ret, cap * sizeof(*n));
        if (!n) {
            /* Cannot defer: wait for a grace period is not possible here, so
             * keep the object forever rather than free it under a reader. */
            pthread_mutex_unlock(&g_mu);
            return;
        }
        g_ret = n;
        g_capret = cap;
    }
    g_ret[g_nret++] = (retired_t){p, fn, atomic_load_explicit(&g_epoch, memory_order_seq_cst), heavy};
    run = ++g_since_reclaim >= 64;
    pthread_mutex_unlock(&g_mu);
    /* Inline reclamation is bounded so a writer never spends long freeing. */
    if (run) collect(0, 128);
}

size_t dx_ebr_reclaim(int include_heavy) {
    size_t n = collect(include_heavy, SIZE_MAX);
    /* A second pass lets objects retired just before the first advance go too. */
    return n + collect(include_heavy, SIZE_MAX);
}

size_t dx_ebr_pending(void) {
    pthread_mutex_lock(&g_mu);
    size_t n = g_nret;
    pthread_mutex_unlock(&g_mu);
    return n;
}

void dx_ebr_drain(void) {
    pthread_mutex_lock(&g_mu);
    retired_t *r = g_ret;
    size_t n = g_nret;
    g_ret = NULL;
    g_nret = g_capret = 0;
    pthread_mutex_unlock(&g_mu);
    for (size_t i = 0; i < n; i++) r[i].fn(r[i].p);
    free(r);
}
