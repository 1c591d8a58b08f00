#include "value.h"
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>

static const char *const type_names[DX_T_COUNT] = {
    "float", "integer", "string", "boolean", "choice", "module", "embedding", "tensor",
};

const char *dx_type_name(dx_type t) { return t < DX_T_COUNT ? type_names[t] : "unknown"; }

int dx_type_parse(const char *name, size_t len, dx_type *t) {
    for (int i = 0; i < DX_T_COUNT; i++)
        if (dx_str_eq(name, len, type_names[i], strlen(type_names[i]))) {
            *t = (dx_type)i;
            return 0;
        }
    return -1;
}

void dx_format_double(double d, char *buf, size_t len) {
    if (isnan(d)) { snprintf(buf, len, "nan"); return; }
    if (isinf(d)) { snprintf(buf, len, d > 0 ? "infinity" : "neg_infinity"); return; }
    char tmp[40];
    for (int p = 1; p <= 17; p++) {
        snprintf(tmp, sizeof tmp, "%.*g", p, d);
        if (strtod(tmp, NULL) == d) break;
    }
    /* Reshape C's "1e+20" into Erlang's "1.0e20", and "3" into "3.0". */
    char mant[40], ex[16] = "";
    char *e = strchr(tmp, 'e');
    if (e) {
        size_t ml = (size_t)(e - tmp);
        memcpy(mant, tmp, ml);
        mant[ml] = 0;
        const char *x = e + 1;
        int neg = *x == '-';
        if (*x == '+' || *x == '-') x++;
        while (*x == '0' && x[1]) x++;
        snprintf(ex, sizeof ex, "e%s%s", neg ? "-" : "", x);
    } else {
        snprintf(mant, sizeof mant, "%s", tmp);
    }
    snprintf(buf, len, "%s%s%s", mant, strchr(mant, '.') ? "" : ".0", ex);
}

/* ---- UTF-8 ---------------------------------------------------------------- */

/* Returns the number of code points, or -1 if s is not valid UTF-8. */
static long utf8_length(const char *p, size_t len) {
    const unsigned char *s = (const unsigned char *)p;
    long n = 0;
    size_t i = 0;
    while (i < len) {
        unsigned c = s[i];
        size_t k;
        unsigned cp;
        if (c < 0x80) { i++; n++; continue; }
        else if ((c & 0xE0) == 0xC0) { k = 1; cp = c & 0x1F; }
        else if ((c & 0xF0) == 0xE0) { k = 2; cp = c & 0x0F; }
        else if ((c & 0xF8) == 0xF0) { k = 3; cp = c & 0x07; }
        else return -1;
        for (size_t j = 1; j <= k; j++) {
            if (i + j >= len || (s[i + j] & 0xC0) != 0x80) return -1;
            cp = (cp << 6) | (s[i + j] & 0x3F);
        }
        /* Reject overlong forms, surrogates and values past U+10FFFF. */
        if ((k == 1 && cp < 0x80) || (k == 2 && cp < 0x800) || (k == 3 && cp < 0x10000) ||
            (cp >= 0xD800 && cp <= 0xDFFF) || cp > 0x10FFFF)
            return -1;
        i += k + 1;
        n++;
    }
    return n;
}

int dx_utf8_valid(const char *p, size_t len) { return utf8_length(p, len) >= 0; }

double dx_bigmag_to_double(const uint8_t *dig, size_t n) {
    while (n && !dig[n - 1]) n--;
    if (n > 128) return INFINITY; /* >= 2^1024 */
    size_t top = n < 8 ? n : 8;
    uint64_t hi = 0;
    for (size_t i = 0; i < top; i++) hi = (hi << 8) | dig[n - 1 - i];
    /* The top 64 bits hold at least 57 significant bits when anything was cut
     * off, so bit 0 lies below the rounding point: a sticky 1 there for any
     * non-zero cut-off digit makes the one rounding (double)hi does exact
     * (rounding the top 64 bits alone, then the rest, rounds twice). */
    for (size_t i = 0; i < n - top; i++)
        if (dig[i]) {
            hi |= 1;
            break;
        }
    return ldexp((double)hi, (int)(8 * (n - top))); /* exact, or inf past the range */
}

/* ---- messages ------------------------------------------------------------- */

static int fail(char *err, size_t errlen, const char *fmt, ...) __attribute__((format(printf, 3, 4)));
static int fail(char *err, size_t errlen, const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    if (err && errlen) vsnprintf(err, errlen, fmt, ap);
    va_end(ap);
    return DX_E_INVALID;
}

static const char *raw_desc(const dx_raw *r) {
    switch (r->kind) {
    case DX_RAW_INT:
    case DX_RAW_BIGINT: return "an integer";
    case DX_RAW_FLOAT: return "a float";
    case DX_RAW_BOOL: return "a boolean";
    case DX_RAW_BYTES: return "a string";
    case DX_RAW_NUMLIST: return "a list of numbers";
    case DX_RAW_TENSOR: return "a tensor";
    case DX_RAW_STRLIST: return "a list of strings";
    default: return r->desc ? r->desc : "an unsupported term";
    }
}

/* Quotes at most 60 bytes of a string for a message. */
static void quote(char *buf, size_t len, dx_str s) {
    size_t n = s.len > 60 ? 60 : s.len;
    snprintf(buf, len, "\"%.*s%s\"", (int)n, s.ptr, s.len > 60 ? "..." : "");
}

static void format_shape(char *buf, size_t len, const int64_t *shape, size_t ndim) {
    size_t off = 0;
    off += (size_t)snprintf(buf + off, len - off, "[");
    for (size_t i = 0; i < ndim && off < len; i++)
        off += (size_t)snprintf(buf + off, len - off, "%s%lld", i ? "," : "", (long long)shape[i]);
    if (off < len) snprintf(buf + off, len - off, "]");
}

/* ---- constraints ----------------------------------------------------------- */

void dx_constraints_init(dx_constraints *c) { memset(c, 0, sizeof *c); }

static void strlist_free(dx_strlist *l) {
    for (size_t i = 0; i < l->n; i++) free((void *)l->items[i].ptr);
    free(l->items);
    l->items = NULL;
    l->n = 0;
}

void dx_constraints_free(dx_constraints *c) {
    if (c->flags & DX_C_PATTERN) regfree(&c->re);
    free(c->pattern);
    strlist_free(&c->enum_values);
    strlist_free(&c->choices);
    strlist_free(&c->allowed_modules);
    free(c->shape);
    memset(c, 0, sizeof *c);
}

static int strlist_set(dx_strlist *l, const dx_raw *v, const char *key, char *err, size_t errlen) {
    if (!(v->kind == DX_RAW_STRLIST || (v->kind == DX_RAW_NUMLIST && v->n == 0)))
        return fail(err, errlen, "constraint %s must be a list of strings, got %s", key, raw_desc(v));
    size_t n = v->kind == DX_RAW_STRLIST ? v->nstrs : 0;
    dx_strlist nl = {0, NULL};
    if (n) {
        nl.items = calloc(n, sizeof(dx_str));
        if (!nl.items) return DX_E_NOMEM;
    }
    for (size_t i = 0; i < n; i++) {
        if (utf8_length(v->strs[i].ptr, v->strs[i].len) < 0) {
            strlist_free(&nl);
            return fail(err, errlen, "constraint %s has an item that is not valid UTF-8", key);
        }
        char *p = malloc(v->strs[i].len + 1);
        if (!p) { strlist_free(&nl); return DX_E_NOMEM; }
        if (v->strs[i].len) memcpy(p, v->strs[i].ptr, v->strs[i].len);
        p[v->strs[i].len] = 0;
        nl.items[i] = (dx_str){p, v->strs[i].len};
        nl.n = i + 1;
    }
    strlist_free(l);
    *l = nl;
    return DX_OK;
}

static int strlist_has(const dx_strlist *l, dx_str s) {
    for (size_t i = 0; i < l->n; i++)
        if (dx_str_eq(l->items[i].ptr, l->items[i].len, s.ptr, s.len)) return 1;
    return 0;
}

static int key_is(const char *key, size_t klen, const char *name) { return dx_str_eq(key, klen, name, strlen(name)); }

/* Whether an extended regex uses a back-reference (\1-\9, a glibc extension
 * to POSIX ERE). Back-references make regexec backtrack, exponentially in the
 * worst case, so a constraint could stall the scheduler that checks a value.
 * Inside a bracket expression a backslash is an ordinary character. */
static int has_backreference(const char *p, size_t n) {
    for (size_t i = 0; i < n; i++) {
        if (p[i] == '\\') {
            if (i + 1 < n && p[i + 1] >= '1' && p[i + 1] <= '9') return 1;
            i++; /* the escaped character */
        } else if (p[i] == '[') {
            i++;
            if (i < n && p[i] == '^') i++;
            if (i < n && p[i] == ']') i++; /* a leading ] is literal */
            while (i < n && p[i] != ']') {
                if (p[i] == '[' && i + 1 < n && (p[i + 1] == ':' || p[i + 1] == '.' || p[i + 1] == '=')) {
                    char close = p[i + 1];
                    i += 2;
                    while (i + 1 < n && !(p[i] == close && p[i + 1] == ']')) i++;
                    i += 2;
                } else {
                    i++;
                }
            }
        }
    }
    return 0;
}

static int applies(dx_type t, const char *key, size_t klen) {
    switch (t) {
    case DX_T_FLOAT:
    case DX_T_INTEGER: return key_is(key, klen, "min") || key_is(key, klen, "max");
    case DX_T_STRING:
        return key_is(key, klen, "min_length") || key_is(key, klen, "max_length") ||
               key_is(key, klen, "pattern") || key_is(key, klen, "enum");
    case DX_T_CHOICE: return key_is(key, klen, "choices");
    case DX_T_MODULE: return key_is(key, klen, "allowed_modules");
    case DX_T_EMBEDDING: return key_is(key, klen, "dimensions");
    case DX_T_TENSOR: return key_is(key, klen, "shape");
    default: return 0;
    }
}

int dx_constraints_add(dx_constraints *c, dx_type t, const char *key, size_t klen, const dx_raw *v,
                       char *err, size_t errlen) {
    char kq[80];
    quote(kq, sizeof kq, (dx_str){key, klen});
    if (!applies(t, key, klen))
        return fail(err, errlen, "constraint %s does not apply to type %s", kq, dx_type_name(t));
    if (key_is(key, klen, "min") || key_is(key, klen, "max")) {
        int is_min = key_is(key, klen, "min");
        const char *kn = is_min ? "min" : "max";
        if (t == DX_T_FLOAT) {
            double d;
            if (v->kind == DX_RAW_INT) d = (double)v->i;
            else if ((v->kind == DX_RAW_FLOAT || v->kind == DX_RAW_BIGINT) && !isnan(v->f)) d = v->f;
            else return fail(err, errlen, "constraint %s must be a number, got %s", kn, raw_desc(v));
            if (is_min) c->min_f = d; else c->max_f = d;
        } else {
            int64_t i;
            if (v->kind == DX_RAW_INT) i = v->i;
            else if (v->kind == DX_RAW_FLOAT && isfinite(v->f) && v->f == floor(v->f) &&
                     v->f >= -9223372036854775808.0 && v->f < 9223372036854775808.0)
                i = (int64_t)v->f;
            else return fail(err, errlen, "constraint %s must be an integer, got %s", kn, raw_desc(v));
            if (is_min) c->min_i = i; else c->max_i = i;
        }
        c->flags |= is_min ? DX_C_MIN : DX_C_MAX;
        return DX_OK;
    }
    if (key_is(key, klen, "min_length") || key_is(key, klen, "max_length") || key_is(key, klen, "dimensions")) {
        const char *kn = key_is(key, klen, "min_length") ? "min_length"
                         : key_is(key, klen, "max_length") ? "max_length" : "dimensions";
        if (v->kind != DX_RAW_INT || v->i < 0 || (v->i == 0 && kn[0] == 'd'))
            return fail(err, errlen, "constraint %s must be a %s integer, got %s", kn,
                        kn[0] == 'd' ? "positive" : "non-negative", raw_desc(v));
        if (kn[0] == 'd') { c->dimensions = (uint64_t)v->i; c->flags |= DX_C_DIMENSIONS; }
        else if (kn[2] == 'n') { c->min_length = (uint64_t)v->i; c->flags |= DX_C_MIN_LENGTH; }
        else { c->max_length = (uint64_t)v->i; c->flags |= DX_C_MAX_LENGTH; }
        return DX_OK;
    }
    if (key_is(key, klen, "pattern")) {
        if (v->kind != DX_RAW_BYTES) return fail(err, errlen, "constraint pattern must be a string, got %s", raw_desc(v));
        if (v->s.len > DX_MAX_PATTERN) return fail(err, errlen, "constraint pattern is longer than %d bytes", DX_MAX_PATTERN);
        if (memchr(v->s.ptr, 0, v->s.len)) return fail(err, errlen, "constraint pattern contains a NUL byte");
        if (has_backreference(v->s.ptr, v->s.len))
            return fail(err, errlen, "constraint pattern uses a back-reference (\\1-\\9): not supported, "
                                     "matching could take exponential time");
        char *src = malloc(v->s.len + 1);
        if (!src) return DX_E_NOMEM;
        memcpy(src, v->s.ptr, v->s.len);
        src[v->s.len] = 0;
        regex_t re;
        int rc = regcomp(&re, src, REG_EXTENDED | REG_NOSUB);
        if (rc) {
            char msg[128];
            regerror(rc, &re, msg, sizeof msg);
            free(src);
            return fail(err, errlen, "constraint pattern is not a valid POSIX extended regex: %s", msg);
        }
        if (c->flags & DX_C_PATTERN) regfree(&c->re);
        free(c->pattern);
        c->pattern = src;
        c->re = re;
        c->flags |= DX_C_PATTERN;
        return DX_OK;
    }
    if (key_is(key, klen, "enum")) {
        int rc = strlist_set(&c->enum_values, v, "enum", err, errlen);
        if (!rc) c->flags |= DX_C_ENUM;
        return rc;
    }
    if (key_is(key, klen, "choices")) {
        int rc = strlist_set(&c->choices, v, "choices", err, errlen);
        if (!rc) c->flags |= DX_C_CHOICES;
        return rc;
    }
    if (key_is(key, klen, "allowed_modules")) {
        int rc = strlist_set(&c->allowed_modules, v, "allowed_modules", err, errlen);
        if (!rc) c->flags |= DX_C_ALLOWED_MODULES;
        return rc;
    }
    /* shape (tensor) */
    if (v->kind != DX_RAW_NUMLIST || v->n == 0 || v->n > DX_MAX_TENSOR_DIMS)
        return fail(err, errlen, "constraint shape must be a list of 1 to %d non-negative integers", DX_MAX_TENSOR_DIMS);
    int64_t *shape = malloc(v->n * sizeof(int64_t));
    if (!shape) return DX_E_NOMEM;
    for (size_t i = 0; i < v->n; i++) {
        double d = v->nums[i];
        if (!(d >= 0 && d == floor(d) && d < 4294967296.0)) {
            free(shape);
            return fail(err, errlen, "constraint shape must be a list of 1 to %d non-negative integers", DX_MAX_TENSOR_DIMS);
        }
        shape[i] = (int64_t)d;
    }
    free(c->shape);
    c->shape = shape;
    c->ndim = v->n;
    c->flags |= DX_C_SHAPE;
    return DX_OK;
}

int dx_constraints_finish(dx_constraints *c, dx_type t, char *err, size_t errlen) {
    if ((c->flags & DX_C_MIN) && (c->flags & DX_C_MAX)) {
        if (t == DX_T_FLOAT && c->min_f > c->max_f) {
            char a[40], b[40];
            dx_format_double(c->min_f, a, sizeof a);
            dx_format_double(c->max_f, b, sizeof b);
            return fail(err, errlen, "constraint min %s is greater than max %s", a, b);
        }
        if (t == DX_T_INTEGER && c->min_i > c->max_i)
            return fail(err, errlen, "constraint min %lld is greater than max %lld", (long long)c->min_i,
                        (long long)c->max_i);
    }
    if ((c->flags & DX_C_MIN_LENGTH) && (c->flags & DX_C_MAX_LENGTH) && c->min_length > c->max_length)
        return fail(err, errlen, "constraint min_length %llu is greater than max_length %llu",
                    (unsigned long long)c->min_length, (unsigned long long)c->max_length);
    if (t == DX_T_CHOICE && (!(c->flags & DX_C_CHOICES) || c->choices.n == 0))
        return fail(err, errlen, "a choice variable needs a non-empty choices constraint");
    return DX_OK;
}

static int strlist_copy(dx_strlist *d, const dx_strlist *s) {
    dx_raw r = {.kind = DX_RAW_STRLIST, .strs = s->items, .nstrs = s->n};
    d->n = 0;
    d->items = NULL;
    return strlist_set(d, &r, "", NULL, 0);
}

int dx_constraints_copy(dx_constraints *dst, const dx_constraints *src) {
    dx_constraints_init(dst);
    *dst = *src;
    dst->pattern = NULL;
    dst->shape = NULL;
    dst->enum_values = dst->choices = dst->allowed_modules = (dx_strlist){0, NULL};
    dst->flags &= ~(unsigned)DX_C_PATTERN;
    if (src->flags & DX_C_PATTERN) {
        dx_raw r = {.kind = DX_RAW_BYTES, .s = {src->pattern, strlen(src->pattern)}};
        if (dx_constraints_add(dst, DX_T_STRING, "pattern", 7, &r, NULL, 0)) goto oom;
    }
    if (strlist_copy(&dst->enum_values, &src->enum_values) || strlist_copy(&dst->choices, &src->choices) ||
        strlist_copy(&dst->allowed_modules, &src->allowed_modules))
        goto oom;
    if (src->shape) {
        dst->shape = malloc(src->ndim * sizeof(int64_t));
        if (!dst->shape) goto oom;
        memcpy(dst->shape, src->shape, src->ndim * sizeof(int64_t));
    }
    return DX_OK;
oom:
    dx_constraints_free(dst);
    return DX_E_NOMEM;
}

/* ---- values ---------------------------------------------------------------- */

static int check_list(const dx_strlist *l, dx_str s, const char *what, char *err, size_t errlen) {
    if (strlist_has(l, s)) return DX_OK;
    char q[80], opts[160];
    size_t off = 0;
    quote(q, sizeof q, s);
    opts[0] = 0;
    for (size_t i = 0; i < l->n && off < sizeof opts - 8; i++)
        off += (size_t)snprintf(opts + off, sizeof opts - off, "%s%.*s", i ? ", " : "",
                                (int)(l->items[i].len > 40 ? 40 : l->items[i].len), l->items[i].ptr);
    return fail(err, errlen, "value %s is not one of the %s: %s", q, what, opts);
}

int dx_value_validate(const dx_value *v, const dx_constraints *c, char *err, size_t errlen) {
    char a[40], b[40];
    switch (v->type) {
    case DX_T_FLOAT:
        if ((c->flags & (DX_C_MIN | DX_C_MAX)) && isnan(v->u.f))
            return fail(err, errlen, "value nan cannot satisfy min/max constraints");
        if ((c->flags & DX_C_MIN) && v->u.f < c->min_f) {
            dx_format_double(v->u.f, a, sizeof a);
            dx_format_double(c->min_f, b, sizeof b);
            return fail(err, errlen, "value %s is below minimum %s", a, b);
        }
        if ((c->flags & DX_C_MAX) && v->u.f > c->max_f) {
            dx_format_double(v->u.f, a, sizeof a);
            dx_format_double(c->max_f, b, sizeof b);
            return fail(err, errlen, "value %s is above maximum %s", a, b);
        }
        return DX_OK;
    case DX_T_INTEGER:
        if ((c->flags & DX_C_MIN) && v->u.i < c->min_i)
            return fail(err, errlen, "value %lld is below minimum %lld", (long long)v->u.i, (long long)c->min_i);
        if ((c->flags & DX_C_MAX) && v->u.i > c->max_i)
            return fail(err, errlen, "value %lld is above maximum %lld", (long long)v->u.i, (long long)c->max_i);
        return DX_OK;
    case DX_T_STRING: {
        long n = utf8_length(v->u.s.ptr, v->u.s.len);
        if (n < 0) return fail(err, errlen, "string is not valid UTF-8");
        if ((c->flags & DX_C_MIN_LENGTH) && (uint64_t)n < c->min_length)
            return fail(err, errlen, "string length %ld is below min_length %llu", n, (unsigned long long)c->min_length);
        if ((c->flags & DX_C_MAX_LENGTH) && (uint64_t)n > c->max_length)
            return fail(err, errlen, "string length %ld is above max_length %llu", n, (unsigned long long)c->max_length);
        if (c->flags & DX_C_PATTERN) {
            /* regexec needs a C string: a NUL inside can never match as intended. */
            if (memchr(v->u.s.ptr, 0, v->u.s.len))
                return fail(err, errlen, "string contains a NUL byte and cannot be matched against pattern %s", c->pattern);
            char stackbuf[512];
            char *s = v->u.s.len < sizeof stackbuf ? stackbuf : malloc(v->u.s.len + 1);
            if (!s) return DX_E_NOMEM;
            memcpy(s, v->u.s.ptr, v->u.s.len);
            s[v->u.s.len] = 0;
            int rc = regexec(&c->re, s, 0, NULL, 0);
            if (s != stackbuf) free(s);
            if (rc) return fail(err, errlen, "string does not match pattern %s", c->pattern);
        }
        if (c->flags & DX_C_ENUM) return check_list(&c->enum_values, v->u.s, "enum values", err, errlen);
        return DX_OK;
    }
    case DX_T_BOOLEAN: return DX_OK;
    case DX_T_CHOICE:
        if (utf8_length(v->u.s.ptr, v->u.s.len) < 0) return fail(err, errlen, "choice is not valid UTF-8");
        return check_list(&c->choices, v->u.s, "choices", err, errlen);
    case DX_T_MODULE:
        if (utf8_length(v->u.s.ptr, v->u.s.len) < 0) return fail(err, errlen, "module name is not valid UTF-8");
        if (v->u.s.len == 0) return fail(err, errlen, "module name is empty");
        if (c->flags & DX_C_ALLOWED_MODULES) return check_list(&c->allowed_modules, v->u.s, "allowed_modules", err, errlen);
        return DX_OK;
    case DX_T_EMBEDDING:
        if ((c->flags & DX_C_DIMENSIONS) && v->u.v.n != c->dimensions)
            return fail(err, errlen, "embedding has %zu dimensions, expected %llu", v->u.v.n,
                        (unsigned long long)c->dimensions);
        return DX_OK;
    case DX_T_TENSOR: {
        uint64_t prod = 1;
        int zero = 0;
        for (size_t i = 0; i < v->u.v.ndim; i++) {
            if (v->u.v.shape[i] < 0) return fail(err, errlen, "tensor shape has a negative dimension");
            zero |= v->u.v.shape[i] == 0;
        }
        /* with a zero dimension the product is 0, however large the others */
        for (size_t i = 0; !zero && i < v->u.v.ndim; i++) {
            if (prod > UINT64_MAX / (uint64_t)v->u.v.shape[i]) return fail(err, errlen, "tensor shape is too large");
            prod *= (uint64_t)v->u.v.shape[i];
        }
        if (zero) prod = 0;
        char s1[128];
        format_shape(s1, sizeof s1, v->u.v.shape, v->u.v.ndim);
        if (prod != v->u.v.n)
            return fail(err, errlen, "tensor data has %zu elements, shape %s needs %llu", v->u.v.n, s1,
                        (unsigned long long)prod);
        if (c->flags & DX_C_SHAPE) {
            int same = c->ndim == v->u.v.ndim;
            for (size_t i = 0; same && i < c->ndim; i++) same = c->shape[i] == v->u.v.shape[i];
            if (!same) {
                char s2[128];
                format_shape(s2, sizeof s2, c->shape, c->ndim);
                return fail(err, errlen, "tensor shape %s does not match the required shape %s", s1, s2);
            }
        }
        return DX_OK;
    }
    default: return fail(err, errlen, "unknown type");
    }
}

int dx_value_check(dx_type t, const dx_constraints *c, const dx_raw *r, dx_value *out, char *err, size_t errlen) {
    memset(out, 0, sizeof *out);
    out->type = t;
    switch (t) {
    case DX_T_FLOAT:
        if (r->kind == DX_RAW_INT) out->u.f = (double)r->i;
        else if (r->kind == DX_RAW_FLOAT) out->u.f = r->f;
        else if (r->kind == DX_RAW_BIGINT && isfinite(r->f)) out->u.f = r->f;
        else if (r->kind == DX_RAW_BIGINT) return fail(err, errlen, "integer is too large to store as a float");
        else return fail(err, errlen, "expected a float, got %s", raw_desc(r));
        break;
    case DX_T_INTEGER:
        if (r->kind == DX_RAW_INT) out->u.i = r->i;
        else if (r->kind == DX_RAW_FLOAT) {
            char a[40];
            dx_format_double(r->f, a, sizeof a);
            if (!isfinite(r->f) || r->f != floor(r->f)) return fail(err, errlen, "value %s is not a whole number", a);
            if (!(r->f >= -9223372036854775808.0 && r->f < 9223372036854775808.0))
                return fail(err, errlen, "value %s is outside the 64-bit integer range", a);
            out->u.i = (int64_t)r->f;
        } else if (r->kind == DX_RAW_BIGINT) return fail(err, errlen, "integer is outside the 64-bit range");
        else return fail(err, errlen, "expected an integer, got %s", raw_desc(r));
        break;
    case DX_T_BOOLEAN:
        if (r->kind != DX_RAW_BOOL) return fail(err, errlen, "expected a boolean, got %s", raw_desc(r));
        out->u.b = r->b;
        break;
    case DX_T_STRING:
    case DX_T_CHOICE:
    case DX_T_MODULE:
        if (r->kind != DX_RAW_BYTES && !r->atom) return fail(err, errlen, "expected a string, got %s", raw_desc(r));
        out->u.s = r->s;
        break;
    case DX_T_EMBEDDING:
        if (r->kind != DX_RAW_NUMLIST)
            return fail(err, errlen, "expected a list of numbers, got %s", raw_desc(r));
        out->u.v.data = r->nums;
        out->u.v.n = r->n;
        break;
    case DX_T_TENSOR:
        if (r->kind != DX_RAW_TENSOR)
            return fail(err, errlen, "expected a tensor #{shape => [...], data => [...]}, got %s", raw_desc(r));
        if (r->ndim > DX_MAX_TENSOR_DIMS) return fail(err, errlen, "tensor has more than %d dimensions", DX_MAX_TENSOR_DIMS);
        out->u.v.data = r->nums;
        out->u.v.n = r->n;
        out->u.v.shape = r->shape;
        out->u.v.ndim = r->ndim;
        break;
    default: return fail(err, errlen, "unknown type");
    }
    return dx_value_validate(out, c, err, errlen);
}

size_t dx_value_payload_size(const dx_value *v) {
    switch (v->type) {
    case DX_T_STRING:
    case DX_T_CHOICE:
    case DX_T_MODULE: return v->u.s.len;
    case DX_T_EMBEDDING: return v->u.v.n * sizeof(double);
    case DX_T_TENSOR: return v->u.v.n * sizeof(double) + v->u.v.ndim * sizeof(int64_t);
    default: return 0;
    }
}

void dx_value_copy_into(dx_value *dst, const dx_value *v, char *buf) {
    *dst = *v;
    switch (v->type) {
    case DX_T_STRING:
    case DX_T_CHOICE:
    case DX_T_MODULE:
        if (v->u.s.len) memcpy(buf, v->u.s.ptr, v->u.s.len);
        dst->u.s.ptr = buf;
        break;
    case DX_T_EMBEDDING:
    case DX_T_TENSOR:
        /* doubles first so they stay 8-byte aligned in a malloc'd buffer */
        if (v->u.v.n) memcpy(buf, v->u.v.data, v->u.v.n * sizeof(double));
        dst->u.v.data = (const double *)(void *)buf;
        if (v->type == DX_T_TENSOR) {
            char *sp = buf + v->u.v.n * sizeof(double);
            if (v->u.v.ndim) memcpy(sp, v->u.v.shape, v->u.v.ndim * sizeof(int64_t));
            dst->u.v.shape = (const int64_t *)(void *)sp;
        }
        break;
    default: break;
    }
}
