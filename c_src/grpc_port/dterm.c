#include "dterm.h"

#include <errno.h>
#include <float.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* ------------------------------------------------------------ constructors */

void dt_int(dterm *t, int64_t i) { t->kind = DT_INT; t->u.i = i; }
void dt_float(dterm *t, double f) { t->kind = DT_FLOAT; t->u.f = f; }

static int dt_str(dterm *t, dt_kind k, const void *p, size_t n) {
    char *c = malloc(n + 1);
    if (!c) return -1;
    if (n) memcpy(c, p, n);
    c[n] = 0;
    t->kind = k;
    t->u.s.p = c;
    t->u.s.n = n;
    return 0;
}

int dt_atom(dterm *t, const char *s) { return dt_str(t, DT_ATOM, s, strlen(s)); }
int dt_bin(dterm *t, const void *p, size_t n) { return dt_str(t, DT_BIN, p, n); }

int dt_seq(dterm *t, dt_kind kind, size_t n) {
    t->kind = kind;
    t->u.seq.n = n;
    t->u.seq.v = n ? calloc(n, sizeof(dterm)) : NULL;
    if (n && !t->u.seq.v) { t->u.seq.n = 0; return -1; }
    return 0;
}

int dt_map(dterm *t, size_t n) {
    t->kind = DT_MAP;
    t->u.map.n = n;
    t->u.map.k = n ? calloc(n, sizeof(dterm)) : NULL;
    t->u.map.v = n ? calloc(n, sizeof(dterm)) : NULL;
    if (n && (!t->u.map.k || !t->u.map.v)) {
        free(t->u.map.k); free(t->u.map.v);
        t->u.map.k = t->u.map.v = NULL; t->u.map.n = 0;
        return -1;
    }
    return 0;
}

void dt_free(dterm *t) {
    size_t i;
    switch (t->kind) {
    case DT_ATOM: case DT_BIN: case DT_BIG: free(t->u.s.p); break;
    case DT_LIST: case DT_TUPLE:
        for (i = 0; i < t->u.seq.n; i++) dt_free(&t->u.seq.v[i]);
        free(t->u.seq.v);
        break;
    case DT_MAP:
        for (i = 0; i < t->u.map.n; i++) { dt_free(&t->u.map.k[i]); dt_free(&t->u.map.v[i]); }
        free(t->u.map.k); free(t->u.map.v);
        break;
    default: break;
    }
    t->kind = DT_INT;
    t->u.i = 0;
}

int dt_is_atom(const dterm *t, const char *name) {
    return t && t->kind == DT_ATOM && strcmp(t->u.s.p, name) == 0;
}

const dterm *dt_map_get(const dterm *map, const char *key) {
    size_t i, n = strlen(key);
    if (!map || map->kind != DT_MAP) return NULL;
    for (i = 0; i < map->u.map.n; i++) {
        const dterm *k = &map->u.map.k[i];
        if ((k->kind == DT_ATOM || k->kind == DT_BIN) && k->u.s.n == n && memcmp(k->u.s.p, key, n) == 0)
            return &map->u.map.v[i];
    }
    return NULL;
}

/* A total order good enough for dedupe: kind first, then content. */
int dt_compare(const dterm *a, const dterm *b) {
    size_t i, n;
    int c;
    if (a->kind != b->kind) return a->kind < b->kind ? -1 : 1;
    switch (a->kind) {
    case DT_INT: return a->u.i < b->u.i ? -1 : a->u.i > b->u.i;
    case DT_FLOAT: return a->u.f < b->u.f ? -1 : a->u.f > b->u.f;
    case DT_ATOM: case DT_BIN:
        n = a->u.s.n < b->u.s.n ? a->u.s.n : b->u.s.n;
        c = n ? memcmp(a->u.s.p, b->u.s.p, n) : 0;
        if (c) return c < 0 ? -1 : 1;
        return a->u.s.n < b->u.s.n ? -1 : a->u.s.n > b->u.s.n;
    case DT_BIG: { /* numeric order: sign, then length, then digits */
        int an = a->u.s.p[0] == '-', bn = b->u.s.p[0] == '-', r;
        if (an != bn) return an ? -1 : 1;
        if (a->u.s.n != b->u.s.n) r = a->u.s.n < b->u.s.n ? -1 : 1;
        else r = (c = memcmp(a->u.s.p, b->u.s.p, a->u.s.n)) < 0 ? -1 : c > 0;
        return an ? -r : r;
    }
    case DT_LIST: case DT_TUPLE:
        if (a->u.seq.n != b->u.seq.n) return a->u.seq.n < b->u.seq.n ? -1 : 1;
        for (i = 0; i < a->u.seq.n; i++)
            if ((c = dt_compare(&a->u.seq.v[i], &b->u.seq.v[i]))) return c;
        return 0;
    case DT_MAP:
        if (a->u.map.n != b->u.map.n) return a->u.map.n < b->u.map.n ? -1 : 1;
        for (i = 0; i < a->u.map.n; i++) {
            if ((c = dt_compare(&a->u.map.k[i], &b->u.map.k[i]))) return c;
            if ((c = dt_compare(&a->u.map.v[i], &b->u.map.v[i]))) return c;
        }
        return 0;
    }
    return 0;
}

typedef struct { const dterm *k; size_t idx; } key_ref;

static int key_ref_cmp(const void *x, const void *y) {
    const key_ref *a = x, *b = y;
    int c = dt_compare(a->k, b->k);
    if (c) return c;
    return a->idx < b->idx ? -1 : a->idx > b->idx; /* stable: later index last */
}

void dt_map_dedupe(dterm *m) {
    size_t i, n = m->u.map.n, out = 0;
    key_ref *refs;
    dterm *nk, *nv;
    if (n < 2) return;
    refs = malloc(n * sizeof *refs);
    nk = malloc(n * sizeof *nk);
    nv = malloc(n * sizeof *nv);
    if (!refs || !nk || !nv) { free(refs); free(nk); free(nv); return; } /* keep as is */
    for (i = 0; i < n; i++) { refs[i].k = &m->u.map.k[i]; refs[i].idx = i; }
    qsort(refs, n, sizeof *refs, key_ref_cmp);
    for (i = 0; i < n; i++) {
        size_t j = refs[i].idx;
        if (i + 1 < n && dt_compare(refs[i].k, refs[i + 1].k) == 0) {
            /* a later duplicate follows: drop this one */
            dt_free(&m->u.map.k[j]);
            dt_free(&m->u.map.v[j]);
            continue;
        }
        nk[out] = m->u.map.k[j];
        nv[out] = m->u.map.v[j];
        out++;
    }
    free(refs);
    free(m->u.map.k);
    free(m->u.map.v);
    m->u.map.k = nk;
    m->u.map.v = nv;
    m->u.map.n = out;
}

/* ------------------------------------------------------------ buffers */

int dt_buf_put(dt_buf *b, const void *p, size_t n) {
    if (b->n + n + 1 > b->cap) {
        size_t cap = b->cap ? b->cap : 64;
        char *np;
        while (cap < b->n + n + 1) {
            if (cap > ((size_t)-1) / 2) return -1;
            cap *= 2;
        }
        np = realloc(b->p, cap);
        if (!np) return -1;
        b->p = np;
        b->cap = cap;
    }
    if (n) memcpy(b->p + b->n, p, n);
    b->n += n;
    b->p[b->n] = 0;
    return 0;
}

void dt_buf_free(dt_buf *b) { free(b->p); b->p = NULL; b->n = b->cap = 0; }

/* ------------------------------------------------------------ UTF-8 */

int dt_utf8_valid(const unsigned char *p, size_t n) {
    size_t i = 0;
    while (i < n) {
        unsigned c = p[i];
        size_t len;
        unsigned cp, min;
        if (c < 0x80) { i++; continue; }
        if ((c & 0xE0) == 0xC0) { len = 2; cp = c & 0x1F; min = 0x80; }
        else if ((c & 0xF0) == 0xE0) { len = 3; cp = c & 0x0F; min = 0x800; }
        else if ((c & 0xF8) == 0xF0) { len = 4; cp = c & 0x07; min = 0x10000; }
        else return 0;
        if (n - i < len) return 0;
        for (size_t j = 1; j < len; j++) {
            if ((p[i + j] & 0xC0) != 0x80) return 0;
            cp = (cp << 6) | (p[i + j] & 0x3F);
        }
        if (cp < min || cp > 0x10FFFF || (cp >= 0xD800 && cp <= 0xDFFF)) return 0;
        i += len;
    }
    return 1;
}

/* ------------------------------------------------------------ external term format */

typedef struct { const unsigned char *p; size_t len, pos; } rd;

static int need(rd *r, size_t n) { return r->len - r->pos >= n; }
static uint32_t be32(const unsigned char *p) {
    return ((uint32_t)p[0] << 24) | ((uint32_t)p[1] << 16) | ((uint32_t)p[2] << 8) | p[3];
}

static int etf_term(rd *r, dterm *t, int depth);

/* A bignum's little-endian magnitude: DT_INT when it fits int64, else its
 * decimal text (DT_BIG), by repeated division by 10^9 over 32-bit limbs,
 * bounded by DT_BIG_MAX_BYTES. */
static int etf_bignum(dterm *t, const unsigned char *p, size_t n, unsigned sign) {
    uint32_t limbs[(DT_BIG_MAX_BYTES + 3) / 4];
    char digits[DT_BIG_MAX_DIGITS + 16], *out;
    size_t nl, nd = 0, k;
    while (n && p[n - 1] == 0) n--; /* a non-canonical zero-padded magnitude */
    if (n <= 8) {
        uint64_t mag = 0;
        for (k = 0; k < n; k++) mag |= (uint64_t)p[k] << (8 * k);
        if (sign && mag <= (uint64_t)INT64_MAX + 1) {
            dt_int(t, mag == (uint64_t)INT64_MAX + 1 ? INT64_MIN : -(int64_t)mag);
            return 0;
        }
        if (!sign && mag <= (uint64_t)INT64_MAX) { dt_int(t, (int64_t)mag); return 0; }
    }
    if (n > DT_BIG_MAX_BYTES) return -1;
    nl = (n + 3) / 4;
    memset(limbs, 0, nl * sizeof *limbs);
    for (k = 0; k < n; k++) limbs[k / 4] |= (uint32_t)p[k] << (8 * (k % 4));
    while (nl) {
        uint64_t rem = 0;
        for (size_t i = nl; i-- > 0;) {
            uint64_t cur = (rem << 32) | limbs[i];
            limbs[i] = (uint32_t)(cur / 1000000000u);
            rem = cur % 1000000000u;
        }
        while (nl && limbs[nl - 1] == 0) nl--;
        for (int d = 0; d < 9 && (nl || rem); d++) { /* the last chunk without leading zeros */
            if (nd >= DT_BIG_MAX_DIGITS) return -1;
            digits[nd++] = (char)('0' + rem % 10);
            rem /= 10;
        }
    }
    if (nd == 0) digits[nd++] = '0';
    if (!(out = malloc(nd + 2))) return -1;
    k = 0;
    if (sign && !(nd == 1 && digits[0] == '0')) out[k++] = '-';
    while (nd) out[k++] = digits[--nd];
    out[k] = 0;
    t->kind = DT_BIG;
    t->u.s.p = out;
    t->u.s.n = k;
    return 0;
}

int dt_big_magnitude(const dterm *t, unsigned char *out, size_t *n, int *neg) {
    uint32_t limbs[(DT_BIG_MAX_BYTES + 3) / 4];
    size_t nl = 0, i = 0, len;
    const char *d;
    if (t->kind != DT_BIG) return -1;
    d = t->u.s.p;
    len = t->u.s.n;
    *neg = d[0] == '-';
    if (*neg) { d++; len--; }
    if (len == 0 || len > DT_BIG_MAX_DIGITS) return -1;
    while (i < len) { /* limbs = limbs * 10^k + next k digits, k <= 9 */
        uint32_t chunk = 0, mul = 1;
        for (int k = 0; k < 9 && i < len; k++, i++) {
            if (d[i] < '0' || d[i] > '9') return -1;
            chunk = chunk * 10 + (uint32_t)(d[i] - '0');
            mul *= 10;
        }
        uint64_t carry = chunk;
        for (size_t j = 0; j < nl; j++) {
            uint64_t cur = (uint64_t)limbs[j] * mul + carry;
            limbs[j] = (uint32_t)cur;
            carry = cur >> 32;
        }
        if (carry) {
            if (nl == sizeof limbs / sizeof *limbs) return -1;
            limbs[nl++] = (uint32_t)carry;
        }
    }
    *n = 0;
    for (size_t j = 0; j < nl; j++)
        for (int b = 0; b < 4; b++) out[(*n)++] = (unsigned char)(limbs[j] >> (8 * b));
    while (*n && out[*n - 1] == 0) (*n)--;
    return 0;
}

static int etf_items(rd *r, dterm *t, dt_kind kind, size_t n, int depth) {
    /* every item takes at least one byte: a count beyond the bytes left is a lie */
    if (n > r->len - r->pos) return -1;
    if (dt_seq(t, kind, n)) return -1;
    for (size_t i = 0; i < n; i++)
        if (etf_term(r, &t->u.seq.v[i], depth + 1)) return -1;
    return 0;
}

static int etf_term(rd *r, dterm *t, int depth) {
    unsigned tag;
    uint32_t n;
    dt_int(t, 0);
    if (depth > DT_MAX_OUT_DEPTH || !need(r, 1)) return -1;
    tag = r->p[r->pos++];
    switch (tag) {
    case 97: /* SMALL_INTEGER_EXT */
        if (!need(r, 1)) return -1;
        dt_int(t, r->p[r->pos++]);
        return 0;
    case 98: /* INTEGER_EXT */
        if (!need(r, 4)) return -1;
        dt_int(t, (int32_t)be32(r->p + r->pos));
        r->pos += 4;
        return 0;
    case 70: { /* NEW_FLOAT_EXT */
        uint64_t bits = 0;
        double d;
        if (!need(r, 8)) return -1;
        for (int i = 0; i < 8; i++) bits = (bits << 8) | r->p[r->pos + i];
        r->pos += 8;
        memcpy(&d, &bits, sizeof d);
        dt_float(t, d);
        return 0;
    }
    case 110: case 111: { /* SMALL_BIG_EXT, LARGE_BIG_EXT */
        int rc;
        if (tag == 110) { if (!need(r, 1)) return -1; n = r->p[r->pos++]; }
        else { if (!need(r, 4)) return -1; n = be32(r->p + r->pos); r->pos += 4; }
        if (!need(r, 1)) return -1;
        unsigned sign = r->p[r->pos++];
        if (!need(r, n)) return -1;
        rc = etf_bignum(t, r->p + r->pos, n, sign);
        r->pos += n;
        return rc;
    }
    case 100: case 118: /* ATOM_EXT, ATOM_UTF8_EXT */
        if (!need(r, 2)) return -1;
        n = ((uint32_t)r->p[r->pos] << 8) | r->p[r->pos + 1];
        r->pos += 2;
        goto atom;
    case 115: case 119: /* SMALL_ATOM_EXT, SMALL_ATOM_UTF8_EXT */
        if (!need(r, 1)) return -1;
        n = r->p[r->pos++];
    atom:
        if (!need(r, n)) return -1;
        if (dt_str(t, DT_ATOM, r->p + r->pos, n)) return -1;
        r->pos += n;
        return 0;
    case 109: /* BINARY_EXT */
        if (!need(r, 4)) return -1;
        n = be32(r->p + r->pos);
        r->pos += 4;
        if (!need(r, n)) return -1;
        if (dt_str(t, DT_BIN, r->p + r->pos, n)) return -1;
        r->pos += n;
        return 0;
    case 104: /* SMALL_TUPLE_EXT */
        if (!need(r, 1)) return -1;
        n = r->p[r->pos++];
        return etf_items(r, t, DT_TUPLE, n, depth);
    case 105: /* LARGE_TUPLE_EXT */
        if (!need(r, 4)) return -1;
        n = be32(r->p + r->pos);
        r->pos += 4;
        return etf_items(r, t, DT_TUPLE, n, depth);
    case 106: /* NIL_EXT */
        return dt_seq(t, DT_LIST, 0);
    case 107: /* STRING_EXT: a list of bytes */
        if (!need(r, 2)) return -1;
        n = ((uint32_t)r->p[r->pos] << 8) | r->p[r->pos + 1];
        r->pos += 2;
        if (!need(r, n) || dt_seq(t, DT_LIST, n)) return -1;
        for (uint32_t i = 0; i < n; i++) dt_int(&t->u.seq.v[i], r->p[r->pos + i]);
        r->pos += n;
        return 0;
    case 108: { /* LIST_EXT: proper lists only */
        dterm tail;
        if (!need(r, 4)) return -1;
        n = be32(r->p + r->pos);
        r->pos += 4;
        if (etf_items(r, t, DT_LIST, n, depth)) return -1;
        if (etf_term(r, &tail, depth + 1)) { dt_free(&tail); return -1; }
        if (tail.kind != DT_LIST || tail.u.seq.n != 0) { dt_free(&tail); return -1; }
        dt_free(&tail);
        return 0;
    }
    case 116: /* MAP_EXT */
        if (!need(r, 4)) return -1;
        n = be32(r->p + r->pos);
        r->pos += 4;
        if (n > (r->len - r->pos) / 2) return -1;
        if (dt_map(t, n)) return -1;
        for (uint32_t i = 0; i < n; i++) {
            if (etf_term(r, &t->u.map.k[i], depth + 1)) return -1;
            if (etf_term(r, &t->u.map.v[i], depth + 1)) return -1;
        }
        return 0;
    default:
        return -1; /* pids, refs, funs, bitstrings, old floats...: never sent to us */
    }
}

int dt_decode_etf(const unsigned char *buf, size_t len, dterm *out) {
    rd r = {buf, len, 0};
    dt_int(out, 0);
    if (len < 1 || buf[0] != 131) return -1;
    r.pos = 1;
    if (etf_term(&r, out, 0) || r.pos != len) { dt_free(out); return -1; }
    return 0;
}

int dt_etf_peek_call_id(const unsigned char *buf, size_t len, uint64_t *id) {
    rd r = {buf, len, 1};
    unsigned tag;
    uint32_t n;
    if (len < 3 || buf[0] != 131) return -1;
    tag = r.p[r.pos++];
    if (tag == 104) n = r.p[r.pos++];
    else if (tag == 105) { if (!need(&r, 4)) return -1; n = be32(r.p + r.pos); r.pos += 4; }
    else return -1;
    if (n < 2 || !need(&r, 1)) return -1;
    tag = r.p[r.pos++];
    if (tag == 100 || tag == 118) { /* the command's atom: skipped, not trusted */
        if (!need(&r, 2)) return -1;
        n = ((uint32_t)r.p[r.pos] << 8) | r.p[r.pos + 1];
        r.pos += 2;
    } else if (tag == 115 || tag == 119) {
        if (!need(&r, 1)) return -1;
        n = r.p[r.pos++];
    } else return -1;
    if (!need(&r, n)) return -1;
    r.pos += n;
    if (!need(&r, 1)) return -1;
    tag = r.p[r.pos++];
    if (tag == 97) { if (!need(&r, 1)) return -1; *id = r.p[r.pos]; return 0; }
    if (tag == 98) {
        int32_t v;
        if (!need(&r, 4)) return -1;
        v = (int32_t)be32(r.p + r.pos);
        if (v < 0) return -1;
        *id = (uint64_t)v;
        return 0;
    }
    if (tag == 110) { /* ids beyond 2^27 are small bignums */
        uint64_t v = 0;
        if (!need(&r, 2)) return -1;
        n = r.p[r.pos];
        if (r.p[r.pos + 1] != 0 || n > 8 || !need(&r, 2 + (size_t)n)) return -1;
        for (uint32_t i = 0; i < n; i++) v |= (uint64_t)r.p[r.pos + 2 + i] << (8 * i);
        *id = v;
        return 0;
    }
    return -1;
}

/* ------------------------------------------------------------ JSON reader */

typedef struct { const char *s; size_t n, i; const char *err; } jr;

static void ws(jr *j) {
    while (j->i < j->n && (j->s[j->i] == ' ' || j->s[j->i] == '\t' || j->s[j->i] == '\n' || j->s[j->i] == '\r'))
        j->i++;
}

static int jfail(jr *j, const char *e) { if (!j->err) j->err = e; return -1; }

static int hex4(jr *j, unsigned *out) {
    unsigned v = 0;
    if (j->n - j->i < 4) return jfail(j, "truncated \\u escape");
    for (int k = 0; k < 4; k++) {
        char c = j->s[j->i++];
        v <<= 4;
        if (c >= '0' && c <= '9') v |= (unsigned)(c - '0');
        else if (c >= 'a' && c <= 'f') v |= (unsigned)(c - 'a' + 10);
        else if (c >= 'A' && c <= 'F') v |= (unsigned)(c - 'A' + 10);
        else return jfail(j, "bad \\u escape");
    }
    *out = v;
    return 0;
}

static int put_utf8(dt_buf *b, unsigned cp) {
    unsigned char u[4];
    size_t n;
    if (cp < 0x80) { u[0] = (unsigned char)cp; n = 1; }
    else if (cp < 0x800) { u[0] = 0xC0 | (cp >> 6); u[1] = 0x80 | (cp & 0x3F); n = 2; }
    else if (cp < 0x10000) { u[0] = 0xE0 | (cp >> 12); u[1] = 0x80 | ((cp >> 6) & 0x3F); u[2] = 0x80 | (cp & 0x3F); n = 3; }
    else { u[0] = 0xF0 | (cp >> 18); u[1] = 0x80 | ((cp >> 12) & 0x3F); u[2] = 0x80 | ((cp >> 6) & 0x3F); u[3] = 0x80 | (cp & 0x3F); n = 4; }
    return dt_buf_put(b, u, n);
}

static int jstring(jr *j, dterm *t) {
    dt_buf b = {0};
    size_t start;
    j->i++; /* opening quote */
    for (;;) {
        start = j->i;
        while (j->i < j->n && j->s[j->i] != '"' && j->s[j->i] != '\\' && (unsigned char)j->s[j->i] >= 0x20) j->i++;
        if (j->i > start && dt_buf_put(&b, j->s + start, j->i - start)) goto oom;
        if (j->i >= j->n) { dt_buf_free(&b); return jfail(j, "unterminated string"); }
        if (j->s[j->i] == '"') { j->i++; break; }
        if ((unsigned char)j->s[j->i] < 0x20) { dt_buf_free(&b); return jfail(j, "control character in string"); }
        /* escape */
        j->i++;
        if (j->i >= j->n) { dt_buf_free(&b); return jfail(j, "truncated escape"); }
        {
            char c = j->s[j->i++], o;
            unsigned cp, lo;
            switch (c) {
            case '"': o = '"'; break;
            case '\\': o = '\\'; break;
            case '/': o = '/'; break;
            case 'b': o = '\b'; break;
            case 'f': o = '\f'; break;
            case 'n': o = '\n'; break;
            case 'r': o = '\r'; break;
            case 't': o = '\t'; break;
            case 'u':
                if (hex4(j, &cp)) { dt_buf_free(&b); return -1; }
                if (cp >= 0xDC00 && cp <= 0xDFFF) { dt_buf_free(&b); return jfail(j, "lone low surrogate"); }
                if (cp >= 0xD800 && cp <= 0xDBFF) {
                    if (j->n - j->i < 2 || j->s[j->i] != '\\' || j->s[j->i + 1] != 'u') {
                        dt_buf_free(&b); return jfail(j, "lone high surrogate");
                    }
                    j->i += 2;
                    if (hex4(j, &lo)) { dt_buf_free(&b); return -1; }
                    if (lo < 0xDC00 || lo > 0xDFFF) { dt_buf_free(&b); return jfail(j, "bad surrogate pair"); }
                    cp = 0x10000 + ((cp - 0xD800) << 10) + (lo - 0xDC00);
                }
                if (put_utf8(&b, cp)) goto oom;
                continue;
            default: dt_buf_free(&b); return jfail(j, "bad escape");
            }
            if (dt_buf_put(&b, &o, 1)) goto oom;
        }
    }
    if (!dt_utf8_valid((const unsigned char *)b.p, b.n)) { dt_buf_free(&b); return jfail(j, "invalid UTF-8 in string"); }
    if (dt_bin(t, b.n ? b.p : "", b.n)) goto oom;
    dt_buf_free(&b);
    return 0;
oom:
    dt_buf_free(&b);
    return jfail(j, "out of memory");
}

static int jnumber(jr *j, dterm *t) {
    size_t start = j->i;
    int is_int = 1;
    char tmp[64], *heap = NULL, *txt, *end;
    size_t len;
    if (j->s[j->i] == '-') j->i++;
    if (j->i >= j->n) return jfail(j, "bad number");
    if (j->s[j->i] == '0') j->i++;
    else if (j->s[j->i] >= '1' && j->s[j->i] <= '9') while (j->i < j->n && j->s[j->i] >= '0' && j->s[j->i] <= '9') j->i++;
    else return jfail(j, "bad number");
    if (j->i < j->n && j->s[j->i] == '.') {
        is_int = 0;
        j->i++;
        if (j->i >= j->n || j->s[j->i] < '0' || j->s[j->i] > '9') return jfail(j, "bad fraction");
        while (j->i < j->n && j->s[j->i] >= '0' && j->s[j->i] <= '9') j->i++;
    }
    if (j->i < j->n && (j->s[j->i] == 'e' || j->s[j->i] == 'E')) {
        is_int = 0;
        j->i++;
        if (j->i < j->n && (j->s[j->i] == '+' || j->s[j->i] == '-')) j->i++;
        if (j->i >= j->n || j->s[j->i] < '0' || j->s[j->i] > '9') return jfail(j, "bad exponent");
        while (j->i < j->n && j->s[j->i] >= '0' && j->s[j->i] <= '9') j->i++;
    }
    len = j->i - start;
    if (len < sizeof tmp) txt = tmp;
    else if (!(txt = heap = malloc(len + 1))) return jfail(j, "out of memory");
    memcpy(txt, j->s + start, len);
    txt[len] = 0;
    errno = 0;
    if (is_int) {
        long long v = strtoll(txt, &end, 10);
        if (errno == 0) { dt_int(t, v); free(heap); return 0; }
        /* beyond int64: exact (DT_BIG), never silently a float */
        if (len - (txt[0] == '-') > DT_BIG_MAX_DIGITS) { free(heap); return jfail(j, "integer has too many digits"); }
        {
            int rc = dt_str(t, DT_BIG, txt, len);
            free(heap);
            return rc ? jfail(j, "out of memory") : 0;
        }
    }
    {
        double d = strtod(txt, &end);
        free(heap);
        if (isinf(d)) return dt_atom(t, d > 0 ? "infinity" : "neg_infinity") ? jfail(j, "out of memory") : 0;
        dt_float(t, d); /* underflow gives 0 or a subnormal: fine */
    }
    return 0;
}

static int jvalue(jr *j, dterm *t, int depth);

static int jarray(jr *j, dterm *t, int depth) {
    dterm *items = NULL;
    size_t n = 0, cap = 0;
    j->i++;
    ws(j);
    if (j->i < j->n && j->s[j->i] == ']') { j->i++; return dt_seq(t, DT_LIST, 0); }
    for (;;) {
        if (n == cap) {
            size_t nc = cap ? cap * 2 : 8;
            dterm *ni = realloc(items, nc * sizeof *ni);
            if (!ni) { jfail(j, "out of memory"); goto fail; }
            items = ni;
            cap = nc;
        }
        if (jvalue(j, &items[n], depth + 1)) { dt_free(&items[n]); goto fail; }
        n++;
        ws(j);
        if (j->i < j->n && j->s[j->i] == ',') { j->i++; continue; }
        if (j->i < j->n && j->s[j->i] == ']') { j->i++; break; }
        jfail(j, "expected , or ]");
        goto fail;
    }
    t->kind = DT_LIST;
    t->u.seq.v = items;
    t->u.seq.n = n;
    return 0;
fail:
    for (size_t k = 0; k < n; k++) dt_free(&items[k]);
    free(items);
    return -1;
}

static int jobject(jr *j, dterm *t, int depth) {
    dterm *ks = NULL, *vs = NULL;
    size_t n = 0, cap = 0;
    j->i++;
    ws(j);
    if (j->i < j->n && j->s[j->i] == '}') { j->i++; return dt_map(t, 0); }
    for (;;) {
        if (n == cap) {
            size_t nc = cap ? cap * 2 : 8;
            dterm *nk = realloc(ks, nc * sizeof *nk), *nv;
            if (!nk) { jfail(j, "out of memory"); goto fail; }
            ks = nk;
            nv = realloc(vs, nc * sizeof *nv);
            if (!nv) { jfail(j, "out of memory"); goto fail; }
            vs = nv;
            cap = nc;
        }
        ws(j);
        if (j->i >= j->n || j->s[j->i] != '"') { jfail(j, "expected object key"); goto fail; }
        if (jstring(j, &ks[n])) goto fail;
        ws(j);
        if (j->i >= j->n || j->s[j->i] != ':') { dt_free(&ks[n]); jfail(j, "expected :"); goto fail; }
        j->i++;
        if (jvalue(j, &vs[n], depth + 1)) { dt_free(&ks[n]); dt_free(&vs[n]); goto fail; }
        n++;
        ws(j);
        if (j->i < j->n && j->s[j->i] == ',') { j->i++; continue; }
        if (j->i < j->n && j->s[j->i] == '}') { j->i++; break; }
        jfail(j, "expected , or }");
        goto fail;
    }
    t->kind = DT_MAP;
    t->u.map.k = ks;
    t->u.map.v = vs;
    t->u.map.n = n;
    dt_map_dedupe(t);
    return 0;
fail:
    for (size_t k = 0; k < n; k++) { dt_free(&ks[k]); dt_free(&vs[k]); }
    free(ks);
    free(vs);
    return -1;
}

static int jlit(jr *j, const char *lit, dterm *t, const char *atom) {
    size_t n = strlen(lit);
    if (j->n - j->i < n || memcmp(j->s + j->i, lit, n) != 0) return jfail(j, "unexpected token");
    j->i += n;
    return dt_atom(t, atom) ? jfail(j, "out of memory") : 0;
}

static int jvalue(jr *j, dterm *t, int depth) {
    dt_int(t, 0);
    if (depth > DT_MAX_DEPTH) return jfail(j, "nested too deeply");
    ws(j);
    if (j->i >= j->n) return jfail(j, "unexpected end of input");
    switch (j->s[j->i]) {
    case '{': return jobject(j, t, depth);
    case '[': return jarray(j, t, depth);
    case '"': return jstring(j, t);
    case 't': return jlit(j, "true", t, "true");
    case 'f': return jlit(j, "false", t, "false");
    case 'n': return jlit(j, "null", t, "null");
    default:
        if (j->s[j->i] == '-' || (j->s[j->i] >= '0' && j->s[j->i] <= '9')) return jnumber(j, t);
        return jfail(j, "unexpected character");
    }
}

int dt_parse_json(const char *s, size_t n, dterm *out, const char **err) {
    jr j = {s, n, 0, NULL};
    dt_int(out, 0);
    if (jvalue(&j, out, 0)) { dt_free(out); *err = j.err ? j.err : "invalid JSON"; return -1; }
    ws(&j);
    if (j.i != n) { dt_free(out); *err = "trailing characters after JSON value"; return -1; }
    return 0;
}

/* ------------------------------------------------------------ JSON writer */

static int wstring(dt_buf *b, const char *p, size_t n, const char **err) {
    static const char hex[] = "0123456789abcdef";
    size_t i, start = 0;
    if (!dt_utf8_valid((const unsigned char *)p, n)) { *err = "string is not valid UTF-8"; return -1; }
    if (dt_buf_put(b, "\"", 1)) goto oom;
    for (i = 0; i < n; i++) {
        unsigned char c = (unsigned char)p[i];
        char esc[6];
        size_t en = 2;
        if (c >= 0x20 && c != '"' && c != '\\') continue;
        if (i > start && dt_buf_put(b, p + start, i - start)) goto oom;
        esc[0] = '\\';
        switch (c) {
        case '"': esc[1] = '"'; break;
        case '\\': esc[1] = '\\'; break;
        case '\n': esc[1] = 'n'; break;
        case '\r': esc[1] = 'r'; break;
        case '\t': esc[1] = 't'; break;
        case '\b': esc[1] = 'b'; break;
        case '\f': esc[1] = 'f'; break;
        default:
            esc[1] = 'u'; esc[2] = '0'; esc[3] = '0'; esc[4] = hex[c >> 4]; esc[5] = hex[c & 15];
            en = 6;
        }
        if (dt_buf_put(b, esc, en)) goto oom;
        start = i + 1;
    }
    if (n > start && dt_buf_put(b, p + start, n - start)) goto oom;
    if (dt_buf_put(b, "\"", 1)) goto oom;
    return 0;
oom:
    *err = "out of memory";
    return -1;
}

static int wfloat(dt_buf *b, double d, const char **err) {
    char tmp[40];
    int n;
    if (isnan(d)) return wstring(b, "NaN", 3, err);
    if (isinf(d)) return d > 0 ? wstring(b, "Infinity", 8, err) : wstring(b, "-Infinity", 9, err);
    /* Shortest text that reads back to the same double. A normal double
     * whose shortest form has at most 15 significant digits prints exactly
     * that at %.15g (%g drops trailing zeros); the rest need 16 or 17.
     * Subnormals carry fewer digits: search those from 1 up. */
    if (d != 0 && fabs(d) < DBL_MIN) {
        for (int prec = 1; prec <= 17; prec++) {
            n = snprintf(tmp, sizeof tmp, "%.*g", prec, d);
            if (strtod(tmp, NULL) == d) break;
        }
    } else {
        n = snprintf(tmp, sizeof tmp, "%.15g", d);
        if (strtod(tmp, NULL) != d) {
            n = snprintf(tmp, sizeof tmp, "%.16g", d);
            if (strtod(tmp, NULL) != d) n = snprintf(tmp, sizeof tmp, "%.17g", d);
        }
    }
    /* keep it a float for readers that distinguish 1 from 1.0 */
    if (!strpbrk(tmp, ".eEn")) { tmp[n++] = '.'; tmp[n++] = '0'; tmp[n] = 0; }
    if (dt_buf_put(b, tmp, (size_t)n)) { *err = "out of memory"; return -1; }
    return 0;
}

static int wvalue(const dterm *t, dt_buf *b, const char **err, int depth) {
    char tmp[32];
    size_t i;
    if (depth > DT_MAX_OUT_DEPTH) { *err = "nested too deeply"; return -1; }
    switch (t->kind) {
    case DT_INT:
        snprintf(tmp, sizeof tmp, "%lld", (long long)t->u.i);
        if (dt_buf_put(b, tmp, strlen(tmp))) goto oom;
        return 0;
    case DT_FLOAT: return wfloat(b, t->u.f, err);
    case DT_BIG: return dt_buf_put(b, t->u.s.p, t->u.s.n) ? (*err = "out of memory", -1) : 0;
    case DT_ATOM: {
        const char *a = t->u.s.p, *lit = NULL;
        if (!strcmp(a, "true") || !strcmp(a, "false") || !strcmp(a, "null")) lit = a;
        else if (!strcmp(a, "undefined")) lit = "null";
        if (lit) return dt_buf_put(b, lit, strlen(lit)) ? (*err = "out of memory", -1) : 0;
        if (!strcmp(a, "nan")) return wstring(b, "NaN", 3, err);
        if (!strcmp(a, "infinity")) return wstring(b, "Infinity", 8, err);
        if (!strcmp(a, "neg_infinity")) return wstring(b, "-Infinity", 9, err);
        return wstring(b, a, t->u.s.n, err);
    }
    case DT_BIN: return wstring(b, t->u.s.p, t->u.s.n, err);
    case DT_LIST: case DT_TUPLE:
        if (dt_buf_put(b, "[", 1)) goto oom;
        for (i = 0; i < t->u.seq.n; i++) {
            if (i && dt_buf_put(b, ",", 1)) goto oom;
            if (wvalue(&t->u.seq.v[i], b, err, depth + 1)) return -1;
        }
        if (dt_buf_put(b, "]", 1)) goto oom;
        return 0;
    case DT_MAP:
        if (dt_buf_put(b, "{", 1)) goto oom;
        for (i = 0; i < t->u.map.n; i++) {
            const dterm *k = &t->u.map.k[i];
            if (i && dt_buf_put(b, ",", 1)) goto oom;
            if (k->kind == DT_BIN || k->kind == DT_ATOM) {
                if (wstring(b, k->u.s.p, k->u.s.n, err)) return -1;
            } else if (k->kind == DT_INT) {
                snprintf(tmp, sizeof tmp, "\"%lld\"", (long long)k->u.i);
                if (dt_buf_put(b, tmp, strlen(tmp))) goto oom;
            } else if (k->kind == DT_BIG) {
                if (dt_buf_put(b, "\"", 1) || dt_buf_put(b, k->u.s.p, k->u.s.n) || dt_buf_put(b, "\"", 1)) goto oom;
            } else {
                *err = "map key is not a string";
                return -1;
            }
            if (dt_buf_put(b, ":", 1)) goto oom;
            if (wvalue(&t->u.map.v[i], b, err, depth + 1)) return -1;
        }
        if (dt_buf_put(b, "}", 1)) goto oom;
        return 0;
    }
    *err = "unknown term";
    return -1;
oom:
    *err = "out of memory";
    return -1;
}

int dt_write_json(const dterm *t, dt_buf *out, const char **err) {
    size_t mark = out->n;
    if (wvalue(t, out, err, 0)) {
        out->n = mark; /* nothing half-written stays */
        if (out->p) out->p[mark] = 0;
        return -1;
    }
    if (!out->p && dt_buf_put(out, "", 0)) { *err = "out of memory"; return -1; }
    return 0;
}
