#include "rtab.h"
#include "common.h"
#include "ebr.h"
#include <stdlib.h>

/* A distinct address marks a deleted slot; probes continue past it. */
static char tomb_mark;
#define TOMB ((uintptr_t)&tomb_mark)

/* A slot holds the entry's address with the top 16 bits of its hash in the
 * address's unused top 16 bits (user-space addresses are below 2^48 on the
 * 64-bit Linux targets), so a probe compares tags without loading the entry:
 * a miss costs no cache line of its own. An address that uses those bits (it
 * never happens on Linux x86-64/arm64 without asking for it) turns tagging off
 * for that table before it is published: the table is then probed as before. */
#define TAG_SHIFT 48
#define ADDR_MASK ((UINT64_C(1) << TAG_SHIFT) - 1)

static inline uintptr_t tag_of(uint64_t hash) { return (uintptr_t)(hash >> TAG_SHIFT) << TAG_SHIFT; }
static inline dx_rkey *entry_of(const dx_rtab *t, uintptr_t w) {
    return (dx_rkey *)(t->untagged ? w : (w & ADDR_MASK));
}
static inline int short_eq(const char *a, const char *b, size_t n) {
    /* variable names are short: word compares instead of a memcmp call */
    while (n >= 8) {
        uint64_t x, y;
        memcpy(&x, a, 8);
        memcpy(&y, b, 8);
        if (x != y) return 0;
        a += 8, b += 8, n -= 8;
    }
    while (n--)
        if (*a++ != *b++) return 0;
    return 1;
}

static dx_rtab *tab_new(size_t cap) {
    dx_rtab *t = calloc(1, sizeof(dx_rtab) + cap * sizeof(_Atomic(uintptr_t)));
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
    int tagged = !t->untagged;
    uintptr_t tag = tag_of(hash);
    size_t i = hash & t->mask;
    for (size_t n = 0; n <= t->mask; n++, i = (i + 1) & t->mask) {
        uintptr_t w = atomic_load_explicit(&t->slot[i], memory_order_acquire);
        if (!w) return NULL;
        if (w == TOMB || (tagged && (w & ~ADDR_MASK) != tag)) continue;
        dx_rkey *e = entry_of(t, w);
        /* The tag matched: this is almost surely the entry. Its key text and the
         * caller's next fields sit in the lines after its header (entries keep
         * their text right after the struct): load them together with the
         * header instead of one after the other. A prefetch never faults. */
        __builtin_prefetch((const char *)e + 64);
        __builtin_prefetch((const char *)e + 128);
        __builtin_prefetch((const char *)e + 192);
        __builtin_prefetch(e->key);
        if (e->hash == hash && e->klen == klen && short_eq(e->key, key, klen)) return e;
    }
    return NULL;
}

/* The slot word of e in t (tagging must already be settled for t). */
static uintptr_t word_of(const dx_rtab *t, const dx_rkey *e) {
    return t->untagged ? (uintptr_t)e : ((uintptr_t)e | tag_of(e->hash));
}

static void place(dx_rtab *t, dx_rkey *e) {
    size_t i = e->hash & t->mask;
    for (;;) {
        uintptr_t s = atomic_load_explicit(&t->slot[i], memory_order_relaxed);
        if (!s || s == TOMB) {
            if (s == TOMB) t->tombs--;
            atomic_store_explicit(&t->slot[i], word_of(t, e), memory_order_release);
            t->used++;
            return;
        }
        i = (i + 1) & t->mask;
    }
}

/* Copy live entries into a fresh array sized for them and publish it; readers
 * still on the old array see a consistent (older) view until they leave. */
static int rebuild(dx_rtab_ref *ref, size_t need, int untagged) {
    dx_rtab *old = atomic_load_explicit(ref, memory_order_relaxed);
    size_t cap = 8;
    while (cap < need * 2) cap <<= 1;
    dx_rtab *t = tab_new(cap);
    if (!t) return DX_E_NOMEM;
    t->untagged = old->untagged || untagged; /* settled before t is published */
    for (size_t i = 0; i <= old->mask; i++) {
        uintptr_t w = atomic_load_explicit(&old->slot[i], memory_order_relaxed);
        if (w && w != TOMB) place(t, entry_of(old, w));
    }
    atomic_store_explicit(ref, t, memory_order_release);
    dx_ebr_retire(old, free, 0);
    return DX_OK;
}

int dx_rtab_insert(dx_rtab_ref *ref, dx_rkey *e) {
    dx_rtab *t = atomic_load_explicit(ref, memory_order_relaxed);
    if (dx_rtab_find(ref, e->hash, e->key, e->klen)) return DX_E_EXISTS;
    /* Keep (live + tombstones) under half full so probes stay short. An
     * address with top bits set cannot carry a tag: republish untagged. */
    int untag = !t->untagged && ((uintptr_t)e & ~ADDR_MASK) != 0;
    if (untag || (t->used + t->tombs + 1) * 2 > t->mask + 1) {
        int rc = rebuild(ref, t->used + 1, untag);
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
        uintptr_t w = atomic_load_explicit(&t->slot[i], memory_order_relaxed);
        if (!w) return NULL;
        dx_rkey *e = w == TOMB ? NULL : entry_of(t, w);
        if (e && e->hash == hash && dx_str_eq(e->key, e->klen, key, klen)) {
            atomic_store_explicit(&t->slot[i], TOMB, memory_order_release);
            t->used--;
            t->tombs++;
            /* Shrink or purge tombstones when the table is mostly dead. */
            if (t->tombs > t->used && t->mask + 1 > 16) rebuild(ref, t->used, 0);
            return e;
        }
    }
    return NULL;
}

int dx_rtab_untag(dx_rtab_ref *ref) {
    dx_rtab *t = atomic_load_explicit(ref, memory_order_relaxed);
    return t->untagged ? DX_OK : rebuild(ref, t->used, 1);
}

void dx_rtab_foreach(dx_rtab_ref *ref, int (*fn)(void *ctx, dx_rkey *e), void *ctx) {
    dx_rtab *t = atomic_load_explicit(ref, memory_order_acquire);
    for (size_t i = 0; i <= t->mask; i++) {
        uintptr_t w = atomic_load_explicit(&t->slot[i], memory_order_acquire);
        if (w && w != TOMB && fn(ctx, entry_of(t, w))) return;
    }
}
