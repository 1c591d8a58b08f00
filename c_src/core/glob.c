/*
 * Linear-time glob matcher ('*' and '?' over UTF-8 code points).
 *
 * Strategy: the pattern is decoded once into "keys" (one per character, runs
 * of '*' collapsed). It is then a sequence of '*'-separated segments:
 *   - the first segment must match at the start of the subject,
 *   - the last one (unless the pattern ends in '*') at the end,
 *   - the middle ones are located left to right, each at its earliest-ending
 *     occurrence after the previous one. Taking the earliest end is optimal
 *     because anything a later segment could use stays available.
 * Segments have a fixed length in characters, so the search is a bit-parallel
 * Shift-And over code points: O(ceil(m/64)) words of work per subject
 * character, never any backtracking. All scratch space lives in one struct on
 * the stack (about 21 KiB), sized by DX_GLOB_MAX_PATTERN.
 */
#include "glob.h"

#include <stdint.h>
#include <string.h>

/* Key space: valid code points are < 0x110000, an invalid byte b maps to
 * KEY_BAD + b, so a lone 0xE9 never equals U+00E9. The two wildcards sit
 * far above both ranges. */
#define KEY_BAD 0x110000u
#define KEY_ANY 0xFFFFFFFEu
#define KEY_STAR 0xFFFFFFFFu

#define MAXC DX_GLOB_MAX_PATTERN /* a character is at least one byte */
#define MAXW ((MAXC + 63) / 64)

struct glob_ctx {
    uint32_t keys[MAXC];     /* decoded pattern */
    /* Shift-And tables for the segment being searched. Equality masks are
     * stored sparsely (only non-zero words) because a dense table per
     * distinct character could need 50+ KiB. */
    uint16_t order[MAXC];    /* literal positions sorted by (key, pos) */
    uint32_t gkey[MAXC];     /* distinct literal keys, ascending */
    uint16_t gfirst[MAXC + 1]; /* group g owns pairs [gfirst[g], gfirst[g+1]) */
    uint64_t pbits[MAXC];    /* non-zero mask word ... */
    uint8_t pword[MAXC];     /* ... and its index */
    uint64_t wild[MAXW];     /* positions holding '?' */
    uint64_t state[MAXW];    /* active prefixes */
    uint64_t shifted[MAXW];
};

/* Decode the character at s[0] (n >= 1 bytes available). Strict UTF-8 per
 * RFC 3629; anything else consumes exactly one byte. Returns its length. */
static inline size_t dec_fwd(const unsigned char *s, size_t n, uint32_t *key)
{
    unsigned c = s[0];
    unsigned lo = 0x80, hi = 0xBF; /* allowed range of the 2nd byte */
    size_t len;
    uint32_t cp;

    if (c < 0x80) {
        *key = c;
        return 1;
    }
    if (c >= 0xC2 && c <= 0xDF) {
        len = 2;
        cp = c & 0x1F;
    } else if (c >= 0xE0 && c <= 0xEF) {
        len = 3;
        cp = c & 0x0F;
        if (c == 0xE0)
            lo = 0xA0; /* overlong */
        else if (c == 0xED)
            hi = 0x9F; /* surrogates */
    } else if (c >= 0xF0 && c <= 0xF4) {
        len = 4;
        cp = c & 0x07;
        if (c == 0xF0)
            lo = 0x90; /* overlong */
        else if (c == 0xF4)
            hi = 0x8F; /* > U+10FFFF */
    } else {
        goto bad;
    }
    if (n < len || s[1] < lo || s[1] > hi)
        goto bad;
    cp = (cp << 6) | (s[1] & 0x3Fu);
    for (size_t i = 2; i < len; i++) {
        if ((s[i] & 0xC0u) != 0x80u)
            goto bad;
        cp = (cp << 6) | (s[i] & 0x3Fu);
    }
    *key = cp;
    return len;
bad:
    *key = KEY_BAD + c;
    return 1;
}

/* Decode the character ending at s[e-1], not looking below lo. Both lo and e
 * must be character boundaries of the whole subject; then the result agrees
 * with forward decoding, because a valid sequence starts at its only
 * non-continuation byte and cannot straddle a boundary. Returns its start. */
static inline size_t dec_back(const unsigned char *s, size_t lo, size_t e, uint32_t *key)
{
    if ((s[e - 1] & 0xC0u) == 0x80u) {
        for (size_t len = 2; len <= 4 && e - lo >= len; len++) {
            size_t q = e - len;
            if ((s[q] & 0xC0u) != 0x80u) {
                if (dec_fwd(s + q, len, key) == len)
                    return q;
                break;
            }
        }
    }
    dec_fwd(s + e - 1, 1, key);
    return e - 1;
}

/* Heapsort of order[0..n) by (keys[base + i], i); no recursion, no libc
 * callback, bounded worst case. */
static int ord_less(const uint32_t *k, uint16_t a, uint16_t b)
{
    return k[a] < k[b] || (k[a] == k[b] && a < b);
}

static void ord_sift(const uint32_t *k, uint16_t *o, size_t root, size_t n)
{
    for (;;) {
        size_t child = 2 * root + 1;
        if (child >= n)
            return;
        if (child + 1 < n && ord_less(k, o[child], o[child + 1]))
            child++;
        if (!ord_less(k, o[root], o[child]))
            return;
        uint16_t t = o[root];
        o[root] = o[child];
        o[child] = t;
        root = child;
    }
}

static void ord_sort(const uint32_t *k, uint16_t *o, size_t n)
{
    for (size_t i = n / 2; i-- > 0;)
        ord_sift(k, o, i, n);
    for (size_t end = n; end > 1;) {
        end--;
        uint16_t t = o[0];
        o[0] = o[end];
        o[end] = t;
        ord_sift(k, o, 0, end);
    }
}

/* Find the earliest-ending occurrence of seg[0..m) (m >= 1, no '*') in
 * s[pos..e). On success store the end offset and return 1. */
static int find_segment(struct glob_ctx *c, const uint32_t *seg, size_t m,
                        const unsigned char *s, size_t pos, size_t e, size_t *end)
{
    size_t nw = (m + 63) / 64;
    size_t nlit = 0, ngroups = 0, npairs = 0;

    memset(c->wild, 0, nw * sizeof c->wild[0]);
    memset(c->state, 0, nw * sizeof c->state[0]);
    for (size_t j = 0; j < m; j++) {
        if (seg[j] == KEY_ANY)
            c->wild[j >> 6] |= (uint64_t)1 << (j & 63);
        else
            c->order[nlit++] = (uint16_t)j;
    }
    ord_sort(seg, c->order, nlit);

    /* Group equal keys; positions within a group ascend, so bits that share
     * a mask word are adjacent and fold into one pair. */
    for (size_t i = 0; i < nlit; i++) {
        uint16_t j = c->order[i];
        uint8_t w = (uint8_t)(j >> 6);
        uint64_t bit = (uint64_t)1 << (j & 63);
        if (ngroups == 0 || c->gkey[ngroups - 1] != seg[j]) {
            c->gkey[ngroups] = seg[j];
            c->gfirst[ngroups++] = (uint16_t)npairs;
        } else if (c->pword[npairs - 1] == w) {
            c->pbits[npairs - 1] |= bit;
            continue;
        }
        c->pword[npairs] = w;
        c->pbits[npairs++] = bit;
    }
    c->gfirst[ngroups] = (uint16_t)npairs;

    size_t last_w = (m - 1) >> 6;
    uint64_t last_bit = (uint64_t)1 << ((m - 1) & 63);

    while (pos < e) {
        uint32_t key;
        pos += dec_fwd(s + pos, e - pos, &key);

        /* Shift in a fresh start; keep only prefixes whose next pattern
         * position is '?' here, literal positions are OR-ed in below. */
        uint64_t carry = 1;
        for (size_t w = 0; w < nw; w++) {
            uint64_t d = c->state[w];
            uint64_t sh = (d << 1) | carry;
            carry = d >> 63;
            c->shifted[w] = sh;
            c->state[w] = sh & c->wild[w];
        }

        /* Binary search: deterministic O(log m), unlike a hash an adversary
         * could flood. */
        size_t lo = 0, hi = ngroups;
        while (lo < hi) {
            size_t mid = lo + (hi - lo) / 2;
            if (c->gkey[mid] < key)
                lo = mid + 1;
            else
                hi = mid;
        }
        if (lo < ngroups && c->gkey[lo] == key) {
            for (size_t p = c->gfirst[lo]; p < c->gfirst[lo + 1]; p++) {
                size_t w = c->pword[p];
                c->state[w] |= c->shifted[w] & c->pbits[p];
            }
        }

        if (c->state[last_w] & last_bit) {
            *end = pos;
            return 1;
        }
    }
    return 0;
}

int dx_glob_check(const char *pat, size_t plen)
{
    (void)pat;
    return plen > DX_GLOB_MAX_PATTERN ? -1 : 0;
}

int dx_glob_is_literal(const char *pat, size_t plen)
{
    /* '*' and '?' are ASCII, so they never occur inside a multi-byte
     * sequence and a byte scan is exact. */
    if (plen == 0)
        return 1;
    return memchr(pat, '*', plen) == NULL && memchr(pat, '?', plen) == NULL;
}

int dx_glob_match(const char *pat, size_t plen, const char *subj, size_t slen)
{
    if (plen > DX_GLOB_MAX_PATTERN)
        return -1;

    const unsigned char *p = (const unsigned char *)pat;
    const unsigned char *s = (const unsigned char *)subj;
    struct glob_ctx c;
    uint32_t *k = c.keys;
    size_t nk = 0;

    for (size_t i = 0; i < plen;) {
        if (p[i] == '*') {
            if (nk == 0 || k[nk - 1] != KEY_STAR)
                k[nk++] = KEY_STAR;
            i++;
        } else if (p[i] == '?') {
            k[nk++] = KEY_ANY;
            i++;
        } else {
            i += dec_fwd(p + i, plen - i, &k[nk++]);
        }
    }

    /* Head: everything before the first '*' is anchored at the start. */
    size_t first = 0, pos = 0;
    uint32_t key;
    while (first < nk && k[first] != KEY_STAR)
        first++;
    for (size_t j = 0; j < first; j++) {
        if (pos >= slen)
            return 0;
        pos += dec_fwd(s + pos, slen - pos, &key);
        if (k[j] != KEY_ANY && k[j] != key)
            return 0;
    }
    if (first == nk)
        return pos == slen;

    /* Tail: everything after the last '*' is anchored at the end and must
     * not overlap the head. */
    size_t last = nk - 1, end = slen;
    while (k[last] != KEY_STAR)
        last--;
    for (size_t j = nk; j > last + 1; j--) {
        if (end <= pos)
            return 0;
        end = dec_back(s, pos, end, &key);
        if (k[j - 1] != KEY_ANY && k[j - 1] != key)
            return 0;
    }

    /* Middle segments, greedily within [pos, end). */
    for (size_t j = first + 1; j < last;) {
        size_t start = j;
        while (k[j] != KEY_STAR)
            j++;
        if (!find_segment(&c, k + start, j - start, s, pos, end, &pos))
            return 0;
        j++;
    }
    return 1;
}
