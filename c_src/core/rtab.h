/* Open-addressing hash table whose lookups are lock-free: readers (inside an
 * EBR section) load the published array and probe; one writer at a time (the
 * caller's mutex) inserts, tombstones or republishes a grown copy. Entries are
 * caller structs that start with a dx_rkey. */
#ifndef DX_RTAB_H
#define DX_RTAB_H
#include <stdatomic.h>
#include <stddef.h>
#include <stdint.h>

typedef struct {
    uint64_t hash;
    const char *key;
    size_t klen;
} dx_rkey;

typedef struct dx_rtab {
    size_t mask;  /* capacity - 1, capacity a power of two */
    size_t used;  /* live entries (writer only) */
    size_t tombs; /* tombstones (writer only) */
    int untagged; /* slots hold bare addresses (see rtab.c); fixed once published */
    _Atomic(uintptr_t) slot[];
} dx_rtab;

typedef _Atomic(dx_rtab *) dx_rtab_ref;

int dx_rtab_init(dx_rtab_ref *ref, size_t min_cap);
/* Frees the array only (not the entries); no reader may exist. */
void dx_rtab_destroy(dx_rtab_ref *ref);
dx_rkey *dx_rtab_find(dx_rtab_ref *ref, uint64_t hash, const char *key, size_t klen);
/* Writer: DX_OK, DX_E_EXISTS (an equal key is present) or DX_E_NOMEM. */
int dx_rtab_insert(dx_rtab_ref *ref, dx_rkey *e);
/* Writer: unlinks and returns the entry (the caller retires it), or NULL. */
dx_rkey *dx_rtab_remove(dx_rtab_ref *ref, uint64_t hash, const char *key, size_t klen);
/* Writer: republishes the table with untagged slots (what an entry address
 * using the top 16 bits forces; tests use it to cover that path). */
int dx_rtab_untag(dx_rtab_ref *ref);
/* Reader or writer: calls fn for every live entry; stops when fn returns non-zero. */
void dx_rtab_foreach(dx_rtab_ref *ref, int (*fn)(void *ctx, dx_rkey *e), void *ctx);
#endif
