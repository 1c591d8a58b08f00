/* The replica side of sync replication (dspex_cluster, issue #21): the rules
 * by which a replica takes the owner's changes of one session, applied to a
 * batch of them in order.
 *
 * The replica's state of a session is its `{epoch, seq}' (the last change it
 * applied) and its fence (the highest epoch a takeover announced). A change
 * `{epoch, seq}' is
 *   - refused (STALE) when its epoch is below max(state epoch, fence): an
 *     older owner, fenced by a takeover;
 *   - ignored (REPEAT) when it is of the state's epoch at or below its seq;
 *   - a gap (GAP) when it is not the next one (another epoch, or seq != seq+1):
 *     the owner must send the whole session;
 *   - else applied; if the application fails (the replayed change did not
 *     reach the version the owner's did) it is a GAP too and the state does
 *     not move, so every later change of the batch is a GAP as well.
 * Pure C: no erl_nif types (the NIF applies the changes through the callback). */
#ifndef DX_REPL_H
#define DX_REPL_H
#include <stddef.h>
#include <stdint.h>

typedef struct {
    uint64_t epoch;
    uint64_t seq;
    uint64_t fence;
} dx_repl_state;

typedef enum { DX_REPL_APPLIED = 0, DX_REPL_REPEAT, DX_REPL_STALE, DX_REPL_GAP } dx_repl_verdict;

typedef struct {
    uint64_t epoch;
    uint64_t seq;
} dx_repl_rec;

typedef struct {
    dx_repl_verdict verdict;
    uint64_t known; /* STALE: the epoch that refused it, max(epoch, fence) */
} dx_repl_outcome;

/* What the rules say of change {epoch, seq} before it is applied: APPLIED
 * means "apply it" here. */
dx_repl_verdict dx_repl_check(const dx_repl_state *st, uint64_t epoch, uint64_t seq);

/* Applies recs[0..n) in order: apply(ctx, i) is called for each change the
 * rules let through and returns 0 when it was applied, non-zero when it failed
 * (a GAP). out[i] gets each change's outcome; *st follows the applied ones
 * (seq, and fence raised to the epoch). Returns how many were applied. */
size_t dx_repl_apply_batch(dx_repl_state *st, const dx_repl_rec *recs, size_t n, int (*apply)(void *ctx, size_t i),
                           void *ctx, dx_repl_outcome *out);

#endif
