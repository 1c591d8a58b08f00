#include "rtab.h"
#include "common.h"
#include "ebr.h"
#include <stdlib.h>

/* A distinct address marks a deleted slot; probes continue past it. */
static char tomb_mark;
#define TOMB ((dx_rkey *)&tomb_mark)

static dx_rtab *tab_new(size_t cap) {
    dx_rtab *t = calloc(1, sizeof(dx_rtab) + cap * sizeof(_Atomic(dx_rkey *)));
    if (!t) return NULL;
    t->mask = cap - 1;
    return t;
}

int dx_rtab_init(dx_rtab_ref *ref, size_t min_cap) {
    size_t cap = 8;
    while (cap < min_cap * 2) cap <<= 1;
    dx_rtab *t = tab_new(cap);
    if (!t) return DX_E_NOMEM;
    atomic_store_explicit(ref, t, memory_order_release);
    return DX_OK;
}

void dx_rtab_destroy(dx_rtab_ref *ref) {
    free(atomic_load_explicit(ref, memory_order_relaxed));
    atomic_store_explicit(ref, NULL, memory_order_relaxed);
}

dx_rkey *dx_rtab_find(dx_rtab_ref *ref, uint64_t hash, const char *key, size_t klen) {
    dx_rtab *t = atomic_load_explicit(ref, memory_order_acquire);
    size_t i = hash & t->mask;
    for (size_t n = 0; n <= t->mask; n++, i = (i + 1) & t->mask) {
        dx_rkey *e = atomic_load_explicit(&t->slot[i], memory_order_acquire);
        if (!e) return NULL;
        /* the key text sits right after the entry's header: fetch both lines together */
        if (e != TOMB && e->hash == hash) {
            __builtin_prefetch(e->key);
            if (dx_str_eq(e->key, e->klen, key, klen)) return e;
        }
    }
    return NULL;
}

static void place(dx_rtab *t, dx_rkey *e) {
    size_t i = e->hash & t->mask;
    for (;;) {
        dx_rkey *s = atomic_load_explicit(&t->slot[i], memory_order_relaxed);
        if (!s || s == TOMB) {
            if (s == TOMB) t->tombs--;
            atomic_store_explicit(&t->slot[i], e, memory_order_release);
            t->used++;
            return;
        }
        i = (i + 1) & t->mask;
    }
}

/* Copy live entries into a fresh array sized for them and publish it; readers
 * still on the old array see a consistent (older) view until they leave. */
static int rebuild(dx_rtab_ref *ref, size_t need) {
    dx_rtab *old = atomic_load_explicit(ref, memory_order_relaxed);
    size_t cap = 8;
    while (cap < need * 2) cap <<= 1;
    dx_rtab *t = tab_new(cap);
    if (!t) return DX_E_NOMEM;
    for (size_t i = 0; i <= old->mask; i++) {
        dx_rkey *e = atomic_load_explicit(&old->slot[i], memory_order_relaxed);
        if (e && e != TOMB) place(t, e);
    }
    atomic_store_explicit(ref, t, memory_order_release);
    dx_ebr_retire(old, free, 0);
    return DX_OK;
}

int dx_rtab_insert(dx_rtab_ref *ref, dx_rkey *e) {
    dx_rtab *t = atomic_load_explicit(ref, memory_order_relaxed);
    if (dx_rtab_find(ref, e->hash, e->key, e->klen)) return DX_E_EXISTS;
    /* Keep (live + tombstones) under half full so probes stay short. */
    if ((t->used + t->tombs + 1) * 2 > t->mask + 1) {
        int rc = rebuild(ref, t->used + 1);
        if (rc) return rc;
        t = atomic_load_explicit(ref, memory_order_relaxed);
    }
    place(t, e);
    return DX_OK;
}

dx_rkey *dx_rtab_remove(dx_rtab_ref *ref, uint64_t hash, const char *key, size_t klen) {
    dx_rtab *t = atomic_load_explicit(ref, memory_order_relaxed);
    size_t i = hash & t->mask;
    for (size_t n = 0; n <= t->mask; n++, i = (i + 1) & t->mask) {
        dx_rkey *e = atomic_load_explicit(&t->slot[i], memory_order_relaxed);
        if (!e) return NULL;
        if (e != TOMB && e->hash == hash && dx_str_eq(e->key, e->klen, key, klen)) {
            atomic_store_explicit(&t->slot[i], TOMB, memory_order_release);
            t->used--;
            t->tombs++;
            /* Shrink or purge tombstones when the table is mostly dead. */
            if (t->tombs > t->used && t->mask + 1 > 16) rebuild(ref, t->used);
            return e;
        }
    }
    return NULL;
}

void dx_rtab_foreach(dx_rtab_ref *ref, int (*fn)(void *ctx, dx_rkey *e), void *ctx) {
    dx_rtab *t = atomic_load_explicit(ref, memory_order_acquire);
    for (size_t i = 0; i <= t->mask; i++) {
        dx_rkey *e = atomic_load_explicit(&t->slot[i], memory_order_acquire);
        if (e && e != TOMB && fn(ctx, e)) return;
    }
}
