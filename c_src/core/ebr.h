/* Epoch-based reclamation: readers never take a lock shared with other readers.
 * A reader brackets its access with dx_ebr_enter/exit (nestable, per thread);
 * writers unlink an object and hand it to dx_ebr_retire, which frees it only
 * after every reader that could have seen it has left. */
#ifndef DX_EBR_H
#define DX_EBR_H
#include <stddef.h>

typedef void (*dx_free_fn)(void *);

void dx_ebr_enter(void);
void dx_ebr_exit(void);
/* heavy: freeing may take long (a whole session); such objects are freed only by
 * dx_ebr_reclaim(1), which the NIF layer runs on a dirty scheduler. */
void dx_ebr_retire(void *p, dx_free_fn fn, int heavy);
/* Tries to advance the epoch and frees what is safe. Returns objects freed. */
size_t dx_ebr_reclaim(int include_heavy);
/* Objects retired and not yet freed. */
size_t dx_ebr_pending(void);
/* Frees everything at once: only when no reader can exist (unload, tests). */
void dx_ebr_drain(void);
/* 1 when readers announce with a plain store ordered by the reclaimer's
 * membarrier, 0 when with a seq_cst store (decided once, see ebr.c). */
int dx_ebr_uses_membarrier(void);
/* The measure behind that choice, run again (tests): 1 if cheap, 0 if not or
 * not used; waits at most wait_ns for its spinning thread to start. */
int dx_ebr_membarrier_probe(long wait_ns);
#endif
