#include "ebr.h"
#include <pthread.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <linux/membarrier.h>
#include <sys/syscall.h>
#include <unistd.h>
#include <sched.h>
#include <time.h>

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
 * finished thread retired is freed by the next full reclaim. A list is in
 * retire order, so in epoch order: what can be freed is a prefix, and a
 * collection costs what it frees, however many objects still wait (a reader
 * preempted inside its section holds the epoch back, and the list grows).
 * Heavy objects (rare: whole sessions) wait in one shared list. */
typedef struct {
    pthread_mutex_t mu;
    retired_t *v;
    size_t head, n, cap; /* waiting: v[head..n) */
    size_t since;        /* retires since the owner last collected */
} rlist_t;

typedef union {
    rlist_t l;
    char pad[2 * LINE];
} rlist_slot;

/* g_lists[SLOTS]: threads without a slot; g_lists[SLOTS + 1]: heavy objects. */
static rlist_slot g_lists[SLOTS + 2] __attribute__((aligned(LINE)));
#define OVERFLOW_LIST (&g_lists[SLOTS].l)
#define HEAVY_LIST (&g_lists[SLOTS + 1].l)
static pthread_once_t g_lists_once = PTHREAD_ONCE_INIT;

static void lists_init(void) {
    for (int i = 0; i < SLOTS + 2; i++) pthread_mutex_init(&g_lists[i].l.mu, NULL);
}

/* Asymmetric fence: with membarrier(PRIVATE_EXPEDITED) the reclaimer forces a
 * full barrier on every running thread of the process, so a reader's epoch
 * announcement needs only a compiler barrier instead of a locked instruction.
 * 1: used, 0: not (readers then use a seq_cst store), -1: not decided yet.
 *
 * The fence is an IPI to every CPU running a thread of the process: 1-3 us on
 * bare metal, but 13-22 us on a 2-vCPU VM guest with one other thread running
 * (an IPI there exits to the hypervisor), and it stalls that thread as well:
 * two writers, each fencing every 64 retires, ran no faster than one (0.92-
 * 1.05x; 1.55-1.60x with seq_cst announcements, which add a few ns to a get).
 * So it is measured once, before any reader announces: with a thread spinning
 * on another CPU, a median above MB_CHEAP_NS means seq_cst announcements.
 * DX_EBR_MEMBARRIER=0|1 in the environment decides instead. */
#define MB_CHEAP_NS 5000
static _Atomic int g_membarrier = -1;
static pthread_once_t g_mb_once = PTHREAD_ONCE_INIT;
static _Atomic int g_spin_state; /* 1: spinning, 2: told to stop */

static void *mb_spinner(void *arg) {
    (void)arg;
    /* 0 -> 1 only: a spinner that starts after the measure is over (state 2)
     * must not overwrite the stop and spin forever */
    int idle = 0;
    if (!atomic_compare_exchange_strong(&g_spin_state, &idle, 1)) return NULL;
    while (atomic_load_explicit(&g_spin_state, memory_order_relaxed) == 1) {
    }
    return NULL;
}

static long now_ns(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec * 1000000000L + t.tv_nsec;
}

static int cmp_long(const void *a, const void *b) {
    long x = *(const long *)a, y = *(const long *)b;
    return (x > y) - (x < y);
}

/* Whether the fence is cheap here: the median of 9 with another thread
 * spinning (well under 1 ms in all; a spinner not running within 5 ms: assume cheap). */
static int membarrier_cheap(long wait_ns) {
    pthread_t th;
    atomic_store(&g_spin_state, 0);
    if (pthread_create(&th, NULL, mb_spinner, NULL) != 0) return 1;
    long spin_deadline = now_ns() + wait_ns;
    while (atomic_load(&g_spin_state) != 1 && now_ns() < spin_deadline) sched_yield();
    long t[9];
    for (int i = 0; i < 9; i++) {
        long t0 = now_ns();
        syscall(SYS_membarrier, MEMBARRIER_CMD_PRIVATE_EXPEDITED, 0, 0);
        t[i] = now_ns() - t0;
    }
    atomic_store(&g_spin_state, 2);
    pthread_join(th, NULL);
    qsort(t, 9, sizeof t[0], cmp_long);
    return t[4] <= MB_CHEAP_NS;
}

static void membarrier_decide(void) {
    long q = syscall(SYS_membarrier, MEMBARRIER_CMD_QUERY, 0, 0);
    int m = q > 0 && (q & MEMBARRIER_CMD_PRIVATE_EXPEDITED) &&
            syscall(SYS_membarrier, MEMBARRIER_CMD_REGISTER_PRIVATE_EXPEDITED, 0, 0) == 0;
    const char *env = getenv("DX_EBR_MEMBARRIER");
    if (m && env && (env[0] == '0' || env[0] == '1'))
        m = env[0] == '1';
    else if (m)
        m = membarrier_cheap(5000000L);
    atomic_store(&g_membarrier, m);
}

static int membarrier_ready(void) {
    int m = atomic_load_explicit(&g_membarrier, memory_order_relaxed);
    if (m >= 0) return m;
    pthread_once(&g_mb_once, membarrier_decide);
    return atomic_load(&g_membarrier);
}

int dx_ebr_uses_membarrier(void) { return membarrier_ready(); }

int dx_ebr_membarrier_probe(long wait_ns) {
    static pthread_mutex_t mu = PTHREAD_MUTEX_INITIALIZER; /* one probe at a time */
    pthread_mutex_lock(&mu);
    int r = membarrier_ready() == 1 ? membarrier_cheap(wait_ns) : 0;
    pthread_mutex_unlock(&mu);
    return r;
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
    return t_slot >= 0 ? &g_lists[t_slot].l : OVERFLOW_LIST;
}

/* Frees the safe prefix of list l, at most max objects. */
static size_t collect_list(rlist_t *l, uint64_t e, size_t max) {
    size_t freed = 0;
    for (;;) {
        retired_t buf[128];
        size_t lim = max - freed < 128 ? max - freed : 128, k = 0;
        pthread_mutex_lock(&l->mu);
        while (k < lim && l->head < l->n && l->v[l->head].epoch + 2 <= e) buf[k++] = l->v[l->head++];
        if (l->head == l->n) {
            l->head = l->n = 0;
        } else if (l->head > l->cap / 2) {
            memmove(l->v, l->v + l->head, (l->n - l->head) * sizeof *l->v);
            l->n -= l->head;
            l->head = 0;
        }
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
    rlist_t *l = heavy ? HEAVY_LIST : own_list();
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
    uint64_t e = atomic_load_explicit(&g_epoch, memory_order_seq_cst);
    l->v[l->n++] = (retired_t){p, fn, e, heavy};
    /* every 64 retires (512 halved the membarriers but doubled a set's cost: a larger set of retired
     * snapshots churns malloc's heap and comes back cold) */
    int run = !heavy && ++l->since >= 64;
    /* advancing costs a membarrier: skip it while the oldest can go anyway */
    int advance = run && l->v[l->head].epoch + 2 > e;
    pthread_mutex_unlock(&l->mu);
    /* Inline reclamation is bounded so a writer never spends long freeing. */
    if (run) collect_list(l, advance ? try_advance() : e, 128);
}

static size_t collect_all(int include_heavy) {
    pthread_once(&g_lists_once, lists_init);
    uint64_t e = try_advance();
    int n = atomic_load_explicit(&g_nslots, memory_order_acquire);
    if (n > SLOTS) n = SLOTS;
    size_t freed = collect_list(OVERFLOW_LIST, e, SIZE_MAX);
    if (include_heavy) freed += collect_list(HEAVY_LIST, e, SIZE_MAX);
    for (int i = 0; i < n; i++) freed += collect_list(&g_lists[i].l, e, SIZE_MAX);
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
    for (int i = 0; i < SLOTS + 2; i++) {
        rlist_t *l = &g_lists[i].l;
        pthread_mutex_lock(&l->mu);
        total += l->n - l->head;
        pthread_mutex_unlock(&l->mu);
    }
    return total;
}

void dx_ebr_drain(void) {
    pthread_once(&g_lists_once, lists_init);
    for (int i = 0; i < SLOTS + 2; i++) {
        rlist_t *l = &g_lists[i].l;
        pthread_mutex_lock(&l->mu);
        retired_t *r = l->v;
        size_t h = l->head, n = l->n;
        l->v = NULL;
        l->head = l->n = l->cap = l->since = 0;
        pthread_mutex_unlock(&l->mu);
        for (size_t k = h; k < n; k++) r[k].fn(r[k].p);
        free(r);
    }
}
