/* See repl.h. */
#include "repl.h"

static uint64_t max64(uint64_t a, uint64_t b) { return a > b ? a : b; }

dx_repl_verdict dx_repl_check(const dx_repl_state *st, uint64_t epoch, uint64_t seq) {
    if (epoch < max64(st->epoch, st->fence)) return DX_REPL_STALE;
    if (epoch == st->epoch && seq <= st->seq) return DX_REPL_REPEAT;
    if (epoch != st->epoch || seq != st->seq + 1) return DX_REPL_GAP;
    return DX_REPL_APPLIED;
}

size_t dx_repl_apply_batch(dx_repl_state *st, const dx_repl_rec *recs, size_t n, int (*apply)(void *ctx, size_t i),
                           void *ctx, dx_repl_outcome *out) {
    size_t applied = 0;
    for (size_t i = 0; i < n; i++) {
        dx_repl_verdict v = dx_repl_check(st, recs[i].epoch, recs[i].seq);
        out[i].known = v == DX_REPL_STALE ? max64(st->epoch, st->fence) : 0;
        if (v == DX_REPL_APPLIED) {
            if (apply(ctx, i) != 0) {
                v = DX_REPL_GAP;
            } else {
                st->seq = recs[i].seq;
                st->fence = max64(st->fence, recs[i].epoch);
                applied++;
            }
        }
        out[i].verdict = v;
    }
    return applied;
}
