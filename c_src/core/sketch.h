/*
 * Mergeable quantile sketch with bounded relative error (DDSketch-style), and
 * time-windowed series of such sketches. Pure C, libc + libm, no erl_nif.h.
 * Not thread-safe: the caller serialises access to each object.
 *
 * ---- Sketch -------------------------------------------------------------
 * Accuracy a (default 0.01). A value v != 0 goes to the logarithmic bucket
 *   i = ceil(log_g |v|),  g = (1 + a) / (1 - a),
 * which covers (g^(i-1), g^i]; the bucket reports 2 g^i / (g + 1), which is
 * within a relative error a of every value the bucket can hold. Positive and
 * negative values have separate bucket stores (negatives mirrored by |v|),
 * zeros (+0 and -0) have their own counter. NaN and +-inf are refused.
 * count, sum, min and max are kept exactly (sum: a dx_sum, compensated
 * double summation that switches to units of 2^64 instead of overflowing, so
 * 1e308 + 1e308 - 1e308 is 1e308; dx_sketch_sum is +-inf only while the true
 * sum is beyond the double range, and dx_sketch_mean is always finite).
 *
 * Quantile rank. For q in [0, 1] and n = count, the estimate is taken for the
 * 0-based rank
 *     r = floor(q * (n - 1))     (computed in double precision)
 * of the samples sorted ascending, i.e. x[r]. The guarantee is
 *     |estimate - x[r]| <= a * |x[r]|
 * (exactly: estimate 0 when x[r] == 0). q = 0 returns min and q = 1 returns
 * max exactly; every estimate is clamped to [min, max].
 * Values smaller in magnitude than DBL_MIN (subnormals) are bucketed like the
 * others but the reported value is limited by the subnormal grid.
 *
 * Memory bound. The positive and negative stores are dense arrays of 64-bit
 * counters whose combined length never exceeds max_buckets (default 2048,
 * i.e. at most 16 KiB of counters + ~200 bytes of header). When the data
 * would need more, the buckets nearest zero are collapsed: a common floor
 * index c is raised just enough, and every bucket with index < c (in either
 * store) is folded into bucket c of its store. From then on the bound above
 * holds only for ranks whose true sample has |x[r]| > g^(c-1)
 * (dx_sketch_collapsed_limit() returns that magnitude); for positive-only
 * data that is "every quantile above the collapsed range". count, sum, min
 * and max stay exact. At a = 0.01, durations between 1 ns and 3 h span about
 * 1500 buckets, so latency-style data never collapses.
 *
 * Merge needs the same rel_accuracy (compared exactly); the destination's
 * max_buckets applies. Without collapse a merge is exactly the sketch of the
 * union, so its quantiles have the same error bound.
 *
 * Serialized form (little-endian, all lengths checked on input):
 *   "DXQ" version(1) flags(1)  bit0: collapsed, bit1: non-empty,
 *                              bit2: sum scaled by 2^-64 (only if non-empty), others 0
 *   f64 rel_accuracy, varint max_buckets, varint zero_count,
 *   [zigzag varint floor]                         if collapsed
 *   neg store, pos store: varint k, then k entries of
 *       index (first: zigzag varint, then varint gap-1), varint count >= 1
 *   [f64 sum, f64 sum_compensation, f64 min, f64 max]   if non-empty (all finite)
 * varints are unsigned LEB128 (at most 10 bytes).
 *
 * ---- Series -------------------------------------------------------------
 * See dx_series_query below for the exact range rule.
 */
#ifndef DX_SKETCH_H
#define DX_SKETCH_H

#include <stddef.h>
#include <stdint.h>

#define DX_SKETCH_DEFAULT_ACCURACY 0.01
#define DX_SKETCH_MIN_ACCURACY 1e-6       /* keeps bucket indices in range */
#define DX_SKETCH_DEFAULT_BUCKETS 2048u
#define DX_SKETCH_MIN_BUCKETS 2u          /* one per store */
#define DX_SKETCH_MAX_BUCKETS (1u << 20)  /* 8 MiB of counters */

typedef struct dx_sketch dx_sketch;

/* Sum of finite doubles that cannot overflow (see the top of the file):
 * value = (hi + lo) * (scaled ? 2^64 : 1); hi and lo stay finite (a scaled
 * sum saturates at +-DBL_MAX * 2^64, beyond any sum of samples but not of a
 * foreign sketch's). Zero-initialise to start. */
typedef struct {
    double hi, lo;
    int scaled;
} dx_sum;
void dx_sum_add(dx_sum *a, double x);               /* x finite */
void dx_sum_add_n(dx_sum *a, double x, uint64_t n); /* n copies of finite x */
void dx_sum_merge(dx_sum *a, const dx_sum *b);      /* a == b allowed */
double dx_sum_value(const dx_sum *a);               /* +-inf beyond the double range */
double dx_sum_mean(const dx_sum *a, uint64_t n);    /* NaN for n == 0 */

/* rel_accuracy in [DX_SKETCH_MIN_ACCURACY, 1), or 0 for the default;
 * max_buckets in [MIN, MAX], or 0 for the default. NULL on bad args or OOM. */
dx_sketch *dx_sketch_new(double rel_accuracy, unsigned max_buckets);
void dx_sketch_free(dx_sketch *s);
/* Empties the sketch (keeps its buffers for reuse). */
void dx_sketch_clear(dx_sketch *s);
/* 0 ok; -1 for NaN/inf, a count that would overflow uint64, or OOM. */
int dx_sketch_add(dx_sketch *s, double v);
int dx_sketch_add_n(dx_sketch *s, double v, uint64_t n);
/* 0 ok; -1 if rel_accuracy differs, count would overflow, or OOM. On -1 dst
 * is unchanged. dst == src is allowed (doubles every count). */
int dx_sketch_merge(dx_sketch *dst, const dx_sketch *src);

/* The bucket key of a finite v > 0: callers may cache it (e.g. in a table
 * over a discrete input such as clock ticks) and add with dx_sketch_add_keyed,
 * which skips the log(). key must be dx_sketch_key(s, v) for this accuracy. */
int64_t dx_sketch_key(const dx_sketch *s, double v);
int dx_sketch_add_keyed(dx_sketch *s, double v, int64_t key);
uint64_t dx_sketch_count(const dx_sketch *s);
double dx_sketch_sum(const dx_sketch *s);  /* 0 when empty; +-inf beyond the double range */
const dx_sum *dx_sketch_sum_acc(const dx_sketch *s); /* s != NULL */
double dx_sketch_mean(const dx_sketch *s); /* NaN when empty, else finite, in [min, max] */
double dx_sketch_min(const dx_sketch *s);  /* NaN when empty */
double dx_sketch_max(const dx_sketch *s);  /* NaN when empty */
/* q in [0,1]; NaN if empty or q invalid. Rank rule: see the top of the file. */
double dx_sketch_quantile(const dx_sketch *s, double q);

double dx_sketch_rel_accuracy(const dx_sketch *s);
/* The counter budget the sketch was created (or deserialized) with. */
unsigned dx_sketch_max_buckets(const dx_sketch *s);
/* 0 if no bucket was ever collapsed, else the magnitude g^(c-1) at or below
 * which samples may have been folded into a coarser bucket. */
double dx_sketch_collapsed_limit(const dx_sketch *s);
/* Heap bytes owned by the sketch (header + counter arrays). */
size_t dx_sketch_memory(const dx_sketch *s);

/* Testing only: make the nth heap allocation from now fail (0 = the next
 * one); -1 turns it off. Global, not thread-safe. */
void dx_sketch_test_fail_alloc(long nth);

/* Returns the bytes needed; writes only if cap >= that (0 for s == NULL). */
size_t dx_sketch_serialize(const dx_sketch *s, uint8_t *buf, size_t cap);
/* NULL if malformed in any way (including trailing bytes) or OOM. */
dx_sketch *dx_sketch_deserialize(const uint8_t *buf, size_t len);

/* ---- Series ----------------------------------------------------------------
 * Three rings of sketches, filled at record time (each value goes into its
 * second, minute and hour sketch):
 *   seconds: 60 slots,      the seconds  [L-59, L]
 *   minutes: 61 slots,      the minutes  [L/60-60, L/60]
 *   hours:   H+1 slots,     the hours    [L/3600-H, L/3600]
 * where L is the latest time seen (max of every now_sec passed to record or
 * query) and H the retention in hours (default 24). The extra slot at the
 * coarse levels makes the last 60 minutes / last H hours always answerable
 * at that granularity. Older data is dropped (and unreachable) as L moves.
 * Times use floor division; now_sec must satisfy |now_sec| <= 2^62.
 * Memory: at most 60 + 61 + H + 1 sketches, created lazily, each bounded as
 * above (DX_SKETCH_DEFAULT_BUCKETS counters).
 */
#define DX_SERIES_DEFAULT_RETENTION_H 24u
#define DX_SERIES_MAX_RETENTION_H (24u * 366u)

typedef struct dx_series dx_series;

/* rel_accuracy as for dx_sketch_new (0 = default); retention_hours in
 * [1, DX_SERIES_MAX_RETENTION_H] or 0 for the default. NULL on bad args/OOM. */
dx_series *dx_series_new(double rel_accuracy, unsigned retention_hours);
void dx_series_free(dx_series *s);
/* Records v at time now_sec (late values are fine: each level that still
 * retains now_sec gets it). 0 ok; -1 if v is NaN/inf, now_sec is out of
 * range, now_sec is older than every level retains (dropped), or OOM. Either
 * every retaining level records the value or none does. */
int dx_series_record(dx_series *s, int64_t now_sec, double v);
/* Adds every sample of b (same accuracy) at now_sec to each window, as if
 * recorded one by one; -1 on mismatch, a time no window keeps, or allocation
 * failure (then some windows may lack the batch). */
int dx_series_merge(dx_series *s, int64_t now_sec, const dx_sketch *b);
/* Merges the data of the inclusive range [from_sec, to_sec] into out (which
 * must have the series' rel_accuracy), with L taken as max(L, now_sec) for
 * this query (the series itself is not modified).
 * Rule, per second t of the range: t is answered by the finest level that
 * retains it. Coarse buckets are taken whole: an hour bucket is used when at
 * least one second of the range inside that hour is retained neither by the
 * seconds nor by the minutes ring; otherwise that part is answered at minute
 * level, where a minute bucket is used when at least one second of the range
 * inside it is outside the seconds ring, and the rest from single seconds.
 * So a partly covered coarse bucket counts in full (the result can include
 * up to one coarse bucket more at each end of the range, never less), and a
 * second is never counted twice. Seconds retained by no level are missing.
 * 0 ok (also when nothing was retained), -1 on bad args (from > to, out of
 * range times, accuracy mismatch) or OOM; on -1 out is unchanged. */
int dx_series_query(dx_series *s, int64_t from_sec, int64_t to_sec, int64_t now_sec, dx_sketch *out);
/* Heap bytes owned by the series and all its sketches. */
size_t dx_series_memory(const dx_series *s);

#endif /* DX_SKETCH_H */
