/*
 * DDSketch-style quantile sketch and time-windowed series (see sketch.h for
 * the contract).
 *
 * Layout: each sign has a dense store, an array of counters for a window of
 * consecutive bucket indices [base, base + cap). The combined capacity of the
 * two windows never exceeds max_buckets, which makes the memory bound a plain
 * invariant and means an index inside an existing window can be counted
 * without any further check (the common, allocation-free path).
 *
 * Anything that may allocate is split into a plan (compute the new collapse
 * floor and windows, allocate the new arrays; may fail, changes nothing) and
 * a commit (cannot fail). That is what lets add, merge and a series record
 * touching three sketches be all-or-nothing under allocation failure.
 */
#include "sketch.h"

#include <float.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

#define NEG 0
#define POS 1
#define NO_FLOOR INT64_MIN /* never collapsed */

struct store {
    uint64_t *c;     /* c[k] counts bucket index base + k; NULL if no window */
    int64_t base;
    uint32_t cap;
    int64_t lo, hi;  /* occupied index range, valid only when n > 0 */
    uint64_t n;
};

struct dx_sketch {
    double acc;          /* as given by the user; merge compatibility key */
    double lng, inv_lng; /* ln(gamma), 1/ln(gamma) */
    double rep_mul;      /* bucket i reports exp(i*lng) * rep_mul */
    int64_t idx_limit;   /* |index| of any finite non-zero double is below */
    uint32_t max_buckets;
    int64_t floor;       /* collapse floor or NO_FLOOR */
    struct store st[2];
    uint64_t zero, count;
    dx_sum sum;
    double min, max;
};

/* ---- parameters and bucket mapping ------------------------------------ */

static int check_params(double a, unsigned b, double *acc, uint32_t *mb) {
    if (a == 0.0)
        a = DX_SKETCH_DEFAULT_ACCURACY;
    if (!(a >= DX_SKETCH_MIN_ACCURACY && a < 1.0))
        return -1;
    if (b == 0)
        b = DX_SKETCH_DEFAULT_BUCKETS;
    if (b < DX_SKETCH_MIN_BUCKETS || b > DX_SKETCH_MAX_BUCKETS)
        return -1;
    *acc = a;
    *mb = (uint32_t)b;
    return 0;
}

static void init_math(dx_sketch *s) {
    /* Buckets are built for a slightly smaller accuracy so that the rounding
     * of log()/exp() (~1e-13 relative) can never push an estimate past the
     * promised bound; the cost is a 1e-6 relative increase in bucket count. */
    double ae = s->acc * (1.0 - 1e-6);
    s->lng = log1p(2.0 * ae / (1.0 - ae)); /* gamma - 1 = 2ae/(1-ae) */
    s->inv_lng = 1.0 / s->lng;
    s->rep_mul = 1.0 - ae; /* 2/(gamma+1) */
    /* |ln v| < 745 for every finite non-zero double (subnormals included). */
    s->idx_limit = (int64_t)ceil(750.0 * s->inv_lng) + 2;
}

static inline int64_t key_of(const dx_sketch *s, double mag) {
    return (int64_t)ceil(log(mag) * s->inv_lng);
}

static inline double rep_of(const dx_sketch *s, int64_t i) {
    return exp((double)i * s->lng) * s->rep_mul;
}

/* Test hook: fail the n-th allocation from now (-1 = never), so tests can
 * check that every allocation failure leaves objects unchanged. */
static long fail_countdown = -1;

void dx_sketch_test_fail_alloc(long nth) { fail_countdown = nth; }

static void *xcalloc(size_t n, size_t sz) {
    if (fail_countdown >= 0 && fail_countdown-- == 0)
        return NULL;
    return calloc(n, sz);
}

static inline int64_t imax(int64_t a, int64_t b) { return a > b ? a : b; }
static inline int64_t imin(int64_t a, int64_t b) { return a < b ? a : b; }

/* ---- sums ------------------------------------------------------------- */

#define SUM_DOWN 0x1p-64 /* the scaled unit: no 2^64 finite doubles overflow it */
#define SUM_UP 0x1p64

/* Neumaier step. hi + x cannot overflow for sums of samples (scaled, that
 * takes some 2^64 samples near the largest double), but a scaled sum read
 * from the wire is only known to be finite: beyond the largest double hi
 * saturates there (the value stays beyond every double), so that a sum stays
 * finite and its sketch serialisable. */
static void neumaier(dx_sum *a, double x) {
    double t = a->hi + x;
    if (!isfinite(t)) {
        a->hi = copysign(DBL_MAX, t);
        return;
    }
    double c = fabs(a->hi) >= fabs(x) ? (a->hi - t) + x : (x - t) + a->hi;
    if (isfinite(a->lo + c)) /* keeps lo finite even from odd inputs */
        a->lo += c;
    a->hi = t;
}

/* Exact (a power of two) and for good: a sum that overflowed once can come
 * back into range by cancellation, which the scaled form still sees. */
static void sum_scale(dx_sum *a) {
    if (!a->scaled) {
        a->hi *= SUM_DOWN;
        a->lo *= SUM_DOWN;
        a->scaled = 1;
    }
}

void dx_sum_add(dx_sum *a, double x) {
    if (!a->scaled) {
        if (isfinite(a->hi + x)) {
            neumaier(a, x);
            return;
        }
        sum_scale(a);
    }
    neumaier(a, x * SUM_DOWN);
}

void dx_sum_add_n(dx_sum *a, double x, uint64_t n) {
    if (n == 1) {
        dx_sum_add(a, x);
        return;
    }
    double p = x * (double)n;
    if (!a->scaled && isfinite(p)) {
        dx_sum_add(a, p);
        return;
    }
    sum_scale(a);
    neumaier(a, x * SUM_DOWN * (double)n);
}

void dx_sum_merge(dx_sum *a, const dx_sum *b) {
    dx_sum c = *b; /* a == b is allowed */
    if (c.scaled) {
        sum_scale(a);
        neumaier(a, c.hi);
        neumaier(a, c.lo);
    } else {
        dx_sum_add(a, c.hi);
        dx_sum_add(a, c.lo);
    }
}

double dx_sum_value(const dx_sum *a) {
    double v = a->hi + a->lo;
    return a->scaled ? v * SUM_UP : v;
}

double dx_sum_mean(const dx_sum *a, uint64_t n) {
    if (n == 0)
        return NAN;
    double m = (a->hi + a->lo) / (double)n;
    return a->scaled ? m * SUM_UP : m;
}

/* ---- lifecycle -------------------------------------------------------- */

static void reset_stats(dx_sketch *s) {
    s->floor = NO_FLOOR;
    for (int k = 0; k < 2; k++) {
        s->st[k].n = 0;
        s->st[k].lo = s->st[k].hi = 0;
    }
    s->zero = s->count = 0;
    s->sum = (dx_sum){0.0, 0.0, 0};
    s->min = s->max = 0.0;
}

static dx_sketch *alloc_sketch(double acc, uint32_t mb) {
    dx_sketch *s = xcalloc(1, sizeof *s);
    if (!s)
        return NULL;
    s->acc = acc;
    s->max_buckets = mb;
    init_math(s);
    reset_stats(s);
    return s;
}

dx_sketch *dx_sketch_new(double rel_accuracy, unsigned max_buckets) {
    double acc;
    uint32_t mb;
    if (check_params(rel_accuracy, max_buckets, &acc, &mb) != 0)
        return NULL;
    return alloc_sketch(acc, mb);
}

void dx_sketch_free(dx_sketch *s) {
    if (!s)
        return;
    free(s->st[0].c);
    free(s->st[1].c);
    free(s);
}

void dx_sketch_clear(dx_sketch *s) {
    if (!s)
        return;
    for (int k = 0; k < 2; k++) {
        struct store *st = &s->st[k];
        if (st->n) /* only the occupied part can be non-zero */
            memset(st->c + (st->lo - st->base), 0, (size_t)(st->hi - st->lo + 1) * sizeof *st->c);
    }
    reset_stats(s);
}

/* ---- plan / commit ---------------------------------------------------- */

struct want {
    int has;
    int64_t lo, hi;
};

enum { ACT_KEEP = 0, ACT_MOVE, ACT_DROP };

struct plan {
    int64_t floor;
    struct {
        int act;
        uint64_t *buf;
        int64_t base;
        uint32_t cap;
    } sp[2];
};

static int64_t span_at(const struct want *w, int64_t c) {
    if (!w->has)
        return 0;
    return imax(w->hi, c) - imax(w->lo, c) + 1;
}

static void plan_abort(struct plan *p) {
    for (int k = 0; k < 2; k++)
        if (p->sp[k].act == ACT_MOVE)
            free(p->sp[k].buf);
}

/* w[k] must already contain the store's occupied range. c0 is the lowest
 * floor acceptable (the current one, or higher when merging a collapsed
 * source). Returns -1 on OOM with nothing changed. */
static int plan_make(const dx_sketch *s, const struct want w[2], int64_t c0, struct plan *p) {
    const int64_t B = s->max_buckets;
    int64_t c = c0;
    if (span_at(&w[0], c) + span_at(&w[1], c) > B) {
        /* Total span is non-increasing in c; find the smallest c that fits.
         * At the highest occupied index every store is one bucket, and
         * B >= 2, so that always fits. */
        int64_t bad = INT64_MAX, good = INT64_MIN; /* f(bad) > B >= f(good) */
        for (int k = 0; k < 2; k++)
            if (w[k].has) {
                good = imax(good, w[k].hi);
                bad = imin(bad, w[k].lo);
            }
        if (c != NO_FLOOR)
            bad = c;
        while (good - bad > 1) {
            int64_t mid = bad + (good - bad) / 2;
            if (span_at(&w[0], mid) + span_at(&w[1], mid) <= B)
                good = mid;
            else
                bad = mid;
        }
        c = good;
    }
    p->floor = c;

    int64_t need[2], cap[2], want_cap[2];
    int64_t tlo[2] = {0, 0};
    int move[2];
    for (int k = 0; k < 2; k++) {
        const struct store *st = &s->st[k];
        p->sp[k].act = ACT_KEEP;
        p->sp[k].buf = NULL;
        need[k] = span_at(&w[k], c);
        move[k] = 0;
        cap[k] = st->cap;
        want_cap[k] = need[k];
        if (!w[k].has)
            continue;
        tlo[k] = imax(w[k].lo, c);
        int64_t thi = imax(w[k].hi, c);
        if (st->c && tlo[k] >= st->base && thi < st->base + (int64_t)st->cap)
            continue;
        move[k] = 1;
        /* Geometric growth keeps re-allocation rare while values spread. */
        int64_t d = imax(imax(need[k] + need[k] / 2, 2 * (int64_t)st->cap), 32);
        want_cap[k] = cap[k] = imin(d, B);
    }
    if (cap[0] + cap[1] > B) {
        /* Trim the slack of growing windows first ... */
        for (int k = 0; k < 2; k++)
            if (move[k] && cap[0] + cap[1] > B)
                cap[k] = imax(need[k], B - cap[1 - k]);
        /* ... and if a kept window is still in the way, make both tight
         * (needs sum to <= B by the choice of c), then hand the rest out. */
        if (cap[0] + cap[1] > B) {
            for (int k = 0; k < 2; k++) {
                if (w[k].has) {
                    move[k] = 1;
                    cap[k] = need[k];
                } else {
                    cap[k] = 0;
                    if (s->st[k].c)
                        p->sp[k].act = ACT_DROP;
                }
            }
            for (int k = 0; k < 2; k++)
                if (w[k].has)
                    cap[k] = imax(need[k], imin(want_cap[k], B - cap[1 - k]));
        }
    }
    for (int k = 0; k < 2; k++) {
        if (!move[k])
            continue;
        uint64_t *buf = xcalloc((size_t)cap[k], sizeof *buf);
        if (!buf) {
            plan_abort(p);
            return -1;
        }
        int64_t extra = cap[k] - need[k];
        int64_t base = tlo[k] - extra / 2;
        if (c != NO_FLOOR && base < c) /* indices below c are never used */
            base = c;
        p->sp[k].act = ACT_MOVE;
        p->sp[k].buf = buf;
        p->sp[k].base = base;
        p->sp[k].cap = (uint32_t)cap[k];
    }
    return 0;
}

static void plan_commit(dx_sketch *s, struct plan *p) {
    const int64_t c = p->floor;
    for (int k = 0; k < 2; k++) {
        struct store *st = &s->st[k];
        switch (p->sp[k].act) {
        case ACT_MOVE:
            if (st->n)
                for (int64_t i = st->lo; i <= st->hi; i++) {
                    uint64_t v = st->c[i - st->base];
                    if (v)
                        p->sp[k].buf[imax(i, c) - p->sp[k].base] += v;
                }
            free(st->c);
            st->c = p->sp[k].buf;
            st->base = p->sp[k].base;
            st->cap = p->sp[k].cap;
            break;
        case ACT_DROP:
            free(st->c);
            st->c = NULL;
            st->cap = 0;
            st->base = 0;
            break;
        default:
            if (st->n && st->lo < c) { /* collapse in place; c is in the window */
                uint64_t acc = 0;
                for (int64_t i = st->lo, e = imin(st->hi, c - 1); i <= e; i++) {
                    acc += st->c[i - st->base];
                    st->c[i - st->base] = 0;
                }
                st->c[c - st->base] += acc;
            }
            break;
        }
        if (st->n) {
            st->lo = imax(st->lo, c);
            st->hi = imax(st->hi, c);
        }
    }
    s->floor = c;
}

/* ---- insertion -------------------------------------------------------- */

/* Where a value goes: k = store (or -1 for the zero counter), idx = key. */
struct slotref {
    int k;
    int64_t idx;
};

static struct slotref locate(const dx_sketch *s, double v) {
    struct slotref r = {-1, 0};
    if (v != 0.0) {
        r.k = v > 0 ? POS : NEG;
        r.idx = key_of(s, fabs(v));
    }
    return r;
}

/* Phase one of an insertion of n copies of (finite) v at r: checks and, when
 * the index is outside the store's window, builds a plan. *planned says
 * whether p must later be committed or aborted. */
static int ins_prepare(const dx_sketch *s, struct slotref r, uint64_t n, struct plan *p, int *planned) {
    *planned = 0;
    if (s->count > UINT64_MAX - n)
        return -1;
    if (r.k < 0)
        return 0;
    const struct store *st = &s->st[r.k];
    int64_t idx = imax(r.idx, s->floor);
    if (st->c && idx >= st->base && idx < st->base + (int64_t)st->cap)
        return 0; /* inside a window: no collapse can be needed */
    struct want w[2];
    for (int k = 0; k < 2; k++) {
        w[k].has = s->st[k].n > 0;
        w[k].lo = s->st[k].lo;
        w[k].hi = s->st[k].hi;
    }
    if (w[r.k].has) {
        w[r.k].lo = imin(w[r.k].lo, idx);
        w[r.k].hi = imax(w[r.k].hi, idx);
    } else {
        w[r.k].has = 1;
        w[r.k].lo = w[r.k].hi = idx;
    }
    if (plan_make(s, w, s->floor, p) != 0)
        return -1;
    *planned = 1;
    return 0;
}

static void bump(struct store *st, int64_t idx, uint64_t n) {
    st->c[idx - st->base] += n;
    if (st->n == 0) {
        st->lo = st->hi = idx;
    } else {
        st->lo = imin(st->lo, idx);
        st->hi = imax(st->hi, idx);
    }
    st->n += n;
}

static void note_value(dx_sketch *s, double v, uint64_t n) {
    if (s->count == 0) {
        s->min = s->max = v;
    } else {
        if (v < s->min)
            s->min = v;
        if (v > s->max)
            s->max = v;
    }
    s->count += n;
    dx_sum_add_n(&s->sum, v, n);
}

static void ins_commit(dx_sketch *s, double v, struct slotref r, uint64_t n, struct plan *p, int planned) {
    if (planned)
        plan_commit(s, p);
    if (r.k < 0)
        s->zero += n;
    else
        bump(&s->st[r.k], imax(r.idx, s->floor), n);
    note_value(s, v, n);
}

int dx_sketch_add_n(dx_sketch *s, double v, uint64_t n) {
    if (!s || !isfinite(v))
        return -1;
    if (n == 0)
        return 0;
    struct slotref r = locate(s, v);
    struct plan p;
    int planned;
    if (ins_prepare(s, r, n, &p, &planned) != 0)
        return -1;
    ins_commit(s, v, r, n, &p, planned);
    return 0;
}

int dx_sketch_add(dx_sketch *s, double v) { return dx_sketch_add_n(s, v, 1); }

int64_t dx_sketch_key(const dx_sketch *s, double v) { return key_of(s, v); }

int dx_sketch_add_keyed(dx_sketch *s, double v, int64_t key) {
    if (!s || !(v > 0.0) || !isfinite(v))
        return -1;
    struct slotref r = {POS, key};
    struct plan p;
    int planned;
    if (ins_prepare(s, r, 1, &p, &planned) != 0)
        return -1;
    ins_commit(s, v, r, 1, &p, planned);
    return 0;
}

/* ---- merge ------------------------------------------------------------ */

int dx_sketch_merge(dx_sketch *dst, const dx_sketch *src) {
    if (!dst || !src || dst->acc != src->acc)
        return -1;
    if (src->count == 0)
        return 0;
    if (dst->count > UINT64_MAX - src->count)
        return -1;
    if (dst == src) { /* src would be invalidated by re-windowing: double in place */
        for (int k = 0; k < 2; k++) {
            struct store *st = &dst->st[k];
            if (st->n)
                for (int64_t i = st->lo; i <= st->hi; i++)
                    st->c[i - st->base] *= 2;
            st->n *= 2;
        }
        dst->zero *= 2;
        dst->count *= 2;
        if (!isfinite(dst->sum.hi * 2)) /* doubling is exact unless it overflows */
            sum_scale(&dst->sum);
        double hi = dst->sum.hi;
        dst->sum.hi = 0.0; /* added twice: saturates as neumaier does (a scaled sum from the wire) */
        dst->sum.lo = isfinite(dst->sum.lo * 2) ? dst->sum.lo * 2 : copysign(DBL_MAX, dst->sum.lo);
        neumaier(&dst->sum, hi);
        neumaier(&dst->sum, hi);
        return 0;
    }
    struct want w[2];
    for (int k = 0; k < 2; k++) {
        const struct store *a = &dst->st[k], *b = &src->st[k];
        w[k].has = a->n > 0 || b->n > 0;
        if (a->n && b->n) {
            w[k].lo = imin(a->lo, b->lo);
            w[k].hi = imax(a->hi, b->hi);
        } else if (a->n) {
            w[k].lo = a->lo;
            w[k].hi = a->hi;
        } else {
            w[k].lo = b->lo;
            w[k].hi = b->hi;
        }
    }
    /* The source's folded data sits at its floor; adopting the higher floor
     * keeps dx_sketch_collapsed_limit honest. */
    struct plan p;
    if (plan_make(dst, w, imax(dst->floor, src->floor), &p) != 0)
        return -1;
    plan_commit(dst, &p);
    for (int k = 0; k < 2; k++) {
        const struct store *b = &src->st[k];
        if (!b->n)
            continue;
        for (int64_t i = b->lo; i <= b->hi; i++) {
            uint64_t v = b->c[i - b->base];
            if (v)
                bump(&dst->st[k], imax(i, dst->floor), v);
        }
    }
    dst->zero += src->zero;
    if (dst->count == 0) {
        dst->min = src->min;
        dst->max = src->max;
    } else {
        if (src->min < dst->min)
            dst->min = src->min;
        if (src->max > dst->max)
            dst->max = src->max;
    }
    dst->count += src->count;
    dx_sum_merge(&dst->sum, &src->sum);
    return 0;
}

/* ---- queries ---------------------------------------------------------- */

uint64_t dx_sketch_count(const dx_sketch *s) { return s ? s->count : 0; }

double dx_sketch_sum(const dx_sketch *s) { return s ? dx_sum_value(&s->sum) : 0.0; }

const dx_sum *dx_sketch_sum_acc(const dx_sketch *s) { return &s->sum; }

double dx_sketch_mean(const dx_sketch *s) {
    if (!s || s->count == 0)
        return NAN;
    double m = dx_sum_mean(&s->sum, s->count);
    /* rounding can step just outside; the mean of the samples cannot */
    return m < s->min ? s->min : m > s->max ? s->max : m;
}

double dx_sketch_min(const dx_sketch *s) { return s && s->count ? s->min : NAN; }
double dx_sketch_max(const dx_sketch *s) { return s && s->count ? s->max : NAN; }
double dx_sketch_rel_accuracy(const dx_sketch *s) { return s ? s->acc : NAN; }

double dx_sketch_collapsed_limit(const dx_sketch *s) {
    if (!s || s->floor == NO_FLOOR)
        return 0.0;
    return exp((double)(s->floor - 1) * s->lng);
}

unsigned dx_sketch_max_buckets(const dx_sketch *s) { return s ? s->max_buckets : 0; }

size_t dx_sketch_memory(const dx_sketch *s) {
    if (!s)
        return 0;
    return sizeof *s + ((size_t)s->st[0].cap + s->st[1].cap) * sizeof(uint64_t);
}

double dx_sketch_quantile(const dx_sketch *s, double q) {
    if (!s || !(q >= 0.0 && q <= 1.0) || s->count == 0)
        return NAN;
    if (q == 0.0)
        return s->min;
    if (q == 1.0)
        return s->max;
    double rd = floor(q * (double)(s->count - 1));
    /* (double)(count-1) can round up to 2^64 for huge counts */
    uint64_t r = rd >= 18446744073709551616.0 ? s->count - 1 : (uint64_t)rd;
    if (r > s->count - 1)
        r = s->count - 1;
    double est = s->max;
    uint64_t cum = 0;
    const struct store *ng = &s->st[NEG], *ps = &s->st[POS];
    if (ng->n) /* most negative first: highest magnitude index first */
        for (int64_t i = ng->hi; i >= ng->lo; i--) {
            cum += ng->c[i - ng->base];
            if (cum > r) {
                est = -rep_of(s, i);
                goto done;
            }
        }
    cum += s->zero;
    if (cum > r) {
        est = 0.0;
        goto done;
    }
    if (ps->n)
        for (int64_t i = ps->lo; i <= ps->hi; i++) {
            cum += ps->c[i - ps->base];
            if (cum > r) {
                est = rep_of(s, i);
                goto done;
            }
        }
done:
    /* The true sample lies in [min, max]; clamping can only reduce the
     * error, and it absorbs exp() overflow in the top bucket. */
    if (est < s->min)
        est = s->min;
    if (est > s->max)
        est = s->max;
    return est;
}

/* ---- serialization ---------------------------------------------------- */

#define SER_VERSION 1
#define FL_COLLAPSED 1u
#define FL_NONEMPTY 2u
#define FL_SCALED 4u /* the sum is kept in units of 2^64 (it overflowed once) */

/* Writer that only counts when out is NULL (first pass sizes the buffer). */
struct wr {
    uint8_t *out;
    size_t n;
};

static void w_u8(struct wr *w, uint8_t b) {
    if (w->out)
        w->out[w->n] = b;
    w->n++;
}

static void w_varint(struct wr *w, uint64_t v) {
    while (v >= 0x80) {
        w_u8(w, (uint8_t)(v | 0x80));
        v >>= 7;
    }
    w_u8(w, (uint8_t)v);
}

static uint64_t zigzag(int64_t v) { return ((uint64_t)v << 1) ^ (uint64_t)(v >> 63); }
static int64_t unzigzag(uint64_t u) { return (int64_t)(u >> 1) ^ -(int64_t)(u & 1); }

static void w_f64(struct wr *w, double d) {
    uint64_t u;
    memcpy(&u, &d, sizeof u);
    for (int i = 0; i < 8; i++)
        w_u8(w, (uint8_t)(u >> (8 * i)));
}

static void w_store(struct wr *w, const struct store *st) {
    uint64_t k = 0;
    if (st->n)
        for (int64_t i = st->lo; i <= st->hi; i++)
            k += st->c[i - st->base] != 0;
    w_varint(w, k);
    int first = 1;
    int64_t prev = 0;
    if (st->n)
        for (int64_t i = st->lo; i <= st->hi; i++) {
            uint64_t v = st->c[i - st->base];
            if (!v)
                continue;
            if (first)
                w_varint(w, zigzag(i));
            else
                w_varint(w, (uint64_t)(i - prev - 1));
            w_varint(w, v);
            first = 0;
            prev = i;
        }
}

static size_t encode(const dx_sketch *s, uint8_t *out) {
    struct wr w = {out, 0};
    w_u8(&w, 'D');
    w_u8(&w, 'X');
    w_u8(&w, 'Q');
    w_u8(&w, SER_VERSION);
    w_u8(&w, (uint8_t)((s->floor != NO_FLOOR ? FL_COLLAPSED : 0) | (s->count ? FL_NONEMPTY : 0) |
                       (s->count && s->sum.scaled ? FL_SCALED : 0)));
    w_f64(&w, s->acc);
    w_varint(&w, s->max_buckets);
    w_varint(&w, s->zero);
    if (s->floor != NO_FLOOR)
        w_varint(&w, zigzag(s->floor));
    w_store(&w, &s->st[NEG]);
    w_store(&w, &s->st[POS]);
    if (s->count) {
        w_f64(&w, s->sum.hi);
        w_f64(&w, s->sum.lo);
        w_f64(&w, s->min);
        w_f64(&w, s->max);
    }
    return w.n;
}

size_t dx_sketch_serialize(const dx_sketch *s, uint8_t *buf, size_t cap) {
    if (!s)
        return 0;
    size_t need = encode(s, NULL);
    if (buf && cap >= need)
        encode(s, buf);
    return need;
}

struct rd {
    const uint8_t *p;
    size_t len, pos;
};

static int r_u8(struct rd *r, uint8_t *b) {
    if (r->pos >= r->len)
        return -1;
    *b = r->p[r->pos++];
    return 0;
}

static int r_varint(struct rd *r, uint64_t *v) {
    uint64_t x = 0;
    for (int shift = 0; shift < 64; shift += 7) {
        uint8_t b;
        if (r_u8(r, &b) != 0)
            return -1;
        if (shift == 63 && b > 1) /* would not fit in 64 bits */
            return -1;
        x |= (uint64_t)(b & 0x7f) << shift;
        if (!(b & 0x80)) {
            *v = x;
            return 0;
        }
    }
    return -1;
}

static int r_f64(struct rd *r, double *d) {
    if (r->len - r->pos < 8)
        return -1;
    uint64_t u = 0;
    for (size_t i = 0; i < 8; i++)
        u |= (uint64_t)r->p[r->pos + i] << (8 * i);
    r->pos += 8;
    memcpy(d, &u, sizeof *d);
    return 0;
}

/* Parses one store. Pass one (st == NULL) validates and reports the range
 * and total; pass two fills st, whose window was sized from pass one. */
static int r_store(struct rd *r, const dx_sketch *s, struct store *st, struct want *w, uint64_t *total) {
    uint64_t k;
    if (r_varint(r, &k) != 0 || k > s->max_buckets)
        return -1;
    int64_t prev = 0;
    uint64_t sum = 0;
    w->lo = 0;
    for (uint64_t j = 0; j < k; j++) {
        uint64_t u, cnt;
        if (r_varint(r, &u) != 0)
            return -1;
        int64_t idx;
        if (j == 0) {
            idx = unzigzag(u);
        } else {
            if (u >= (uint64_t)(2 * s->idx_limit)) /* also keeps prev+u+1 from overflowing */
                return -1;
            idx = prev + (int64_t)u + 1;
        }
        if (idx > s->idx_limit || idx < -s->idx_limit)
            return -1;
        if (s->floor != NO_FLOOR && idx < s->floor)
            return -1;
        if (r_varint(r, &cnt) != 0 || cnt == 0 || sum > UINT64_MAX - cnt)
            return -1;
        sum += cnt;
        if (j == 0)
            w->lo = idx;
        if (st)
            st->c[idx - st->base] = cnt;
        prev = idx;
    }
    w->has = k > 0;
    w->hi = prev;
    *total = sum;
    return 0;
}

dx_sketch *dx_sketch_deserialize(const uint8_t *buf, size_t len) {
    if (!buf)
        return NULL;
    struct rd r = {buf, len, 0};
    uint8_t m[4], flags;
    for (int i = 0; i < 4; i++)
        if (r_u8(&r, &m[i]) != 0)
            return NULL;
    if (m[0] != 'D' || m[1] != 'X' || m[2] != 'Q' || m[3] != SER_VERSION)
        return NULL;
    if (r_u8(&r, &flags) != 0 || (flags & ~(FL_COLLAPSED | FL_NONEMPTY | FL_SCALED)))
        return NULL;
    double a;
    uint64_t mb, zero;
    if (r_f64(&r, &a) != 0 || r_varint(&r, &mb) != 0 || r_varint(&r, &zero) != 0)
        return NULL;
    if (a == 0.0 || mb == 0 || mb > DX_SKETCH_MAX_BUCKETS) /* 0 = default is API sugar only */
        return NULL;
    double acc;
    uint32_t mb32;
    if (check_params(a, (unsigned)mb, &acc, &mb32) != 0)
        return NULL;
    /* A scratch header carries the parameters through pass one. */
    dx_sketch hdr;
    memset(&hdr, 0, sizeof hdr);
    hdr.acc = acc;
    hdr.max_buckets = mb32;
    init_math(&hdr);
    hdr.floor = NO_FLOOR;
    if (flags & FL_COLLAPSED) {
        uint64_t u;
        if (r_varint(&r, &u) != 0)
            return NULL;
        int64_t f = unzigzag(u);
        if (f > hdr.idx_limit || f < -hdr.idx_limit)
            return NULL;
        hdr.floor = f;
    }
    struct want w[2];
    uint64_t n[2];
    size_t start = r.pos;
    if (r_store(&r, &hdr, NULL, &w[NEG], &n[NEG]) != 0 || r_store(&r, &hdr, NULL, &w[POS], &n[POS]) != 0)
        return NULL;
    if (span_at(&w[NEG], NO_FLOOR) + span_at(&w[POS], NO_FLOOR) > (int64_t)mb32)
        return NULL;
    if (n[NEG] > UINT64_MAX - n[POS] || zero > UINT64_MAX - n[NEG] - n[POS])
        return NULL;
    uint64_t count = zero + n[NEG] + n[POS];
    if (!!(flags & FL_NONEMPTY) != (count > 0) || ((flags & FL_SCALED) && !count))
        return NULL;
    double sum = 0, sumc = 0, mn = 0, mx = 0;
    if (count) {
        if (r_f64(&r, &sum) != 0 || r_f64(&r, &sumc) != 0 || r_f64(&r, &mn) != 0 || r_f64(&r, &mx) != 0)
            return NULL;
        /* A sum never overflows (it is scaled instead), so it is finite. */
        if (!isfinite(sum) || !isfinite(sumc) || !isfinite(mn) || !isfinite(mx) || mn > mx)
            return NULL;
        /* Signs must agree with where the counts are, as they do for any
         * sketch built by adding values. */
        if ((n[NEG] > 0) != (mn < 0) || (n[POS] > 0) != (mx > 0))
            return NULL;
        if (zero && !(mn <= 0 && mx >= 0))
            return NULL;
    }
    if (r.pos != len)
        return NULL;

    dx_sketch *s = alloc_sketch(acc, mb32);
    if (!s)
        return NULL;
    s->floor = hdr.floor;
    for (int k = 0; k < 2; k++) {
        if (!w[k].has)
            continue;
        struct store *st = &s->st[k];
        st->cap = (uint32_t)(w[k].hi - w[k].lo + 1);
        st->base = w[k].lo;
        st->c = xcalloc(st->cap, sizeof *st->c);
        if (!st->c) {
            dx_sketch_free(s);
            return NULL;
        }
        st->lo = w[k].lo;
        st->hi = w[k].hi;
        st->n = n[k];
    }
    struct rd r2 = {buf, len, start};
    struct want dummy;
    uint64_t t;
    r_store(&r2, s, s->st[NEG].c ? &s->st[NEG] : NULL, &dummy, &t); /* validated above */
    r_store(&r2, s, s->st[POS].c ? &s->st[POS] : NULL, &dummy, &t);
    s->zero = zero;
    s->count = count;
    s->sum = (dx_sum){sum, sumc, !!(flags & FL_SCALED)};
    s->min = mn;
    s->max = mx;
    return s;
}

/* ---- series ----------------------------------------------------------- */

enum { LV_SEC = 0, LV_MIN, LV_HOUR, LV_N };

struct slot {
    int64_t key;    /* which second/minute/hour the sketch holds */
    dx_sketch *sk;  /* NULL until first used */
};

struct level {
    struct slot *slots;
    int64_t n;      /* ring size */
    int64_t unit;   /* seconds per bucket */
};

struct dx_series {
    double acc;
    int has_latest;
    int64_t latest; /* L: largest now_sec recorded */
    struct level lv[LV_N];
};

#define TIME_LIMIT ((int64_t)1 << 62)

static int64_t fdiv(int64_t a, int64_t b) {
    int64_t q = a / b;
    if (a % b != 0 && a < 0)
        q--;
    return q;
}

static int64_t pmod(int64_t a, int64_t n) {
    int64_t r = a % n;
    return r < 0 ? r + n : r;
}

dx_series *dx_series_new(double rel_accuracy, unsigned retention_hours) {
    double acc;
    uint32_t mb;
    if (check_params(rel_accuracy, 0, &acc, &mb) != 0)
        return NULL;
    if (retention_hours == 0)
        retention_hours = DX_SERIES_DEFAULT_RETENTION_H;
    if (retention_hours > DX_SERIES_MAX_RETENTION_H)
        return NULL;
    dx_series *s = xcalloc(1, sizeof *s);
    if (!s)
        return NULL;
    s->acc = acc;
    const int64_t sizes[LV_N] = {60, 61, (int64_t)retention_hours + 1};
    const int64_t units[LV_N] = {1, 60, 3600};
    for (int l = 0; l < LV_N; l++) {
        s->lv[l].n = sizes[l];
        s->lv[l].unit = units[l];
        s->lv[l].slots = xcalloc((size_t)sizes[l], sizeof(struct slot));
        if (!s->lv[l].slots) {
            dx_series_free(s);
            return NULL;
        }
    }
    return s;
}

void dx_series_free(dx_series *s) {
    if (!s)
        return;
    for (int l = 0; l < LV_N; l++) {
        if (!s->lv[l].slots)
            continue;
        for (int64_t i = 0; i < s->lv[l].n; i++)
            dx_sketch_free(s->lv[l].slots[i].sk);
        free(s->lv[l].slots);
    }
    free(s);
}

size_t dx_series_memory(const dx_series *s) {
    if (!s)
        return 0;
    size_t m = sizeof *s;
    for (int l = 0; l < LV_N; l++) {
        m += (size_t)s->lv[l].n * sizeof(struct slot);
        for (int64_t i = 0; i < s->lv[l].n; i++)
            m += dx_sketch_memory(s->lv[l].slots[i].sk);
    }
    return m;
}

/* Is bucket key of level l inside the window that ends at time L? */
static int retained(const struct level *lv, int64_t key, int64_t L) {
    int64_t top = fdiv(L, lv->unit);
    return key <= top && key > top - lv->n;
}

/* The slot of every level that keeps now_sec (given the series' latest time
 * L), made ready to take samples: *nuse of them in use[]; -1 on allocation
 * failure, 0 otherwise (*nuse 0: older than any level retains). */
static int slots_for(dx_series *s, int64_t now_sec, int64_t L, struct slot **use, int *nuse) {
    *nuse = 0;
    for (int l = 0; l < LV_N; l++) {
        const struct level *lv = &s->lv[l];
        int64_t key = fdiv(now_sec, lv->unit);
        if (!retained(lv, key, L))
            continue;
        struct slot *sl = &lv->slots[pmod(key, lv->n)];
        if (!sl->sk) {
            /* An empty sketch in a slot is invisible, so creating it early
             * does not break all-or-nothing. */
            sl->sk = dx_sketch_new(s->acc, 0);
            if (!sl->sk)
                return -1;
            sl->key = key;
        } else if (sl->key != key) {
            /* Same ring position, so the old key is out of the window: its
             * data is already unreachable and can be dropped now. */
            dx_sketch_clear(sl->sk);
            sl->key = key;
        }
        use[(*nuse)++] = sl;
    }
    return 0;
}

int dx_series_record(dx_series *s, int64_t now_sec, double v) {
    if (!s || !isfinite(v) || now_sec > TIME_LIMIT || now_sec < -TIME_LIMIT)
        return -1;
    int64_t L = s->has_latest && s->latest > now_sec ? s->latest : now_sec;
    struct slot *use[LV_N];
    int nuse;
    if (slots_for(s, now_sec, L, use, &nuse) != 0 || nuse == 0)
        return -1; /* out of memory, or older than any level retains */
    struct slotref r = locate(use[0]->sk, v); /* same accuracy everywhere */
    struct plan p[LV_N];
    int planned[LV_N];
    for (int i = 0; i < nuse; i++) {
        if (ins_prepare(use[i]->sk, r, 1, &p[i], &planned[i]) != 0) {
            for (int j = 0; j < i; j++)
                if (planned[j])
                    plan_abort(&p[j]);
            return -1;
        }
    }
    for (int i = 0; i < nuse; i++)
        ins_commit(use[i]->sk, v, r, 1, &p[i], planned[i]);
    s->latest = L;
    s->has_latest = 1;
    return 0;
}

int dx_series_merge(dx_series *s, int64_t now_sec, const dx_sketch *b) {
    if (!s || !b || b->acc != s->acc || now_sec > TIME_LIMIT || now_sec < -TIME_LIMIT)
        return -1;
    if (b->count == 0)
        return 0;
    int64_t L = s->has_latest && s->latest > now_sec ? s->latest : now_sec;
    struct slot *use[LV_N];
    int nuse;
    if (slots_for(s, now_sec, L, use, &nuse) != 0 || nuse == 0)
        return -1;
    /* Unlike record, not all-or-nothing across windows: a level whose merge
     * fails (only on allocation failure or count overflow) misses the batch. */
    int rc = 0;
    for (int i = 0; i < nuse; i++)
        if (dx_sketch_merge(use[i]->sk, b) != 0)
            rc = -1;
    s->latest = L;
    s->has_latest = 1;
    return rc;
}

static int merge_slot(dx_sketch *tmp, const struct level *lv, int64_t key) {
    const struct slot *sl = &lv->slots[pmod(key, lv->n)];
    if (!sl->sk || sl->key != key)
        return 0;
    return dx_sketch_merge(tmp, sl->sk);
}

int dx_series_query(dx_series *s, int64_t from_sec, int64_t to_sec, int64_t now_sec, dx_sketch *out) {
    if (!s || !out || from_sec > to_sec || now_sec > TIME_LIMIT || now_sec < -TIME_LIMIT)
        return -1;
    if (out->acc != s->acc)
        return -1;
    if (!s->has_latest)
        return 0;
    const int64_t L = s->latest > now_sec ? s->latest : now_sec;
    const struct level *ls = &s->lv[LV_SEC], *lm = &s->lv[LV_MIN], *lh = &s->lv[LV_HOUR];
    /* First second retained by each level; the windows are nested. */
    const int64_t hs = (fdiv(L, 3600) - lh->n + 1) * 3600;
    const int64_t ms = (fdiv(L, 60) - lm->n + 1) * 60;
    const int64_t ss = L - ls->n + 1;
    /* Clipping to what any level can hold bounds the loops below by the
     * ring sizes; it cannot change a decision since hs is hour-aligned and
     * nothing is recorded after L. */
    const int64_t f = imax(from_sec, hs), t = imin(to_sec, L);
    if (f > t)
        return 0;
    /* Collect into a scratch sketch so a failure leaves out untouched. */
    dx_sketch *tmp = alloc_sketch(out->acc, out->max_buckets);
    if (!tmp)
        return -1;
    int rc = 0;
    for (int64_t h = fdiv(f, 3600); rc == 0 && h <= fdiv(t, 3600); h++) {
        int64_t a = imax(f, h * 3600), b = imin(t, h * 3600 + 3599);
        if (a < ms) { /* part of it only the hour ring has: take the hour */
            rc = merge_slot(tmp, lh, h);
            continue;
        }
        for (int64_t m = fdiv(a, 60); rc == 0 && m <= fdiv(b, 60); m++) {
            int64_t ma = imax(a, m * 60), mb = imin(b, m * 60 + 59);
            if (ma < ss) {
                rc = merge_slot(tmp, lm, m);
                continue;
            }
            for (int64_t sec = ma; rc == 0 && sec <= mb; sec++)
                rc = merge_slot(tmp, ls, sec);
        }
    }
    if (rc == 0)
        rc = dx_sketch_merge(out, tmp);
    dx_sketch_free(tmp);
    return rc;
}
