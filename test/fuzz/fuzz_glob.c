/*
 * libFuzzer harness for dx_glob_match: input is "pattern 0xFF subject"
 * (no 0xFF: all pattern, empty subject). The result is compared with a slow
 * reference matcher (code-point decode + O(m*n) DP); any disagreement
 * abort()s so libFuzzer records the input.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "glob.h"

#define R_STAR 0xFFFFFFFFu
#define R_ANY 0xFFFFFFFEu
#define R_BAD 0x80000000u /* + byte: never a code point */

/* Reference decoder, deliberately shaped differently from glob.c: guess the
 * length from the lead byte, assemble the value, then reject overlongs,
 * surrogates and values past U+10FFFF by range. */
static size_t ref_decode(const uint8_t *s, size_t n, uint32_t *out, int pattern)
{
    size_t cnt = 0;
    for (size_t i = 0; i < n;) {
        uint8_t c = s[i];
        if (pattern && (c == '*' || c == '?')) {
            out[cnt++] = c == '*' ? R_STAR : R_ANY;
            i++;
            continue;
        }
        size_t len = c < 0x80 ? 1 : c < 0xC0 ? 0 : c < 0xE0 ? 2 : c < 0xF0 ? 3 : c < 0xF8 ? 4 : 0;
        uint32_t cp = len == 1 ? c : (uint32_t)(c & (0xFF >> (len + 1)));
        int ok = len != 0 && i + len <= n;
        for (size_t k = 1; ok && k < len; k++) {
            ok = (s[i + k] & 0xC0) == 0x80;
            cp = (cp << 6) | (s[i + k] & 0x3F);
        }
        if (ok && len > 1) {
            uint32_t min = len == 2 ? 0x80 : len == 3 ? 0x800 : 0x10000;
            ok = cp >= min && cp <= 0x10FFFF && (cp < 0xD800 || cp > 0xDFFF);
        }
        if (ok) {
            out[cnt++] = cp;
            i += len;
        } else {
            out[cnt++] = R_BAD + c;
            i++;
        }
    }
    return cnt;
}

static int ref_dp(const uint32_t *p, size_t m, const uint32_t *s, size_t n, uint8_t *row)
{
    /* row[j] = pattern prefix matches s[0..j); updated in place per
     * pattern token, keeping the diagonal in 'diag'. */
    memset(row, 0, n + 1);
    row[0] = 1;
    for (size_t i = 0; i < m; i++) {
        if (p[i] == R_STAR) {
            for (size_t j = 1; j <= n; j++)
                row[j] = row[j] || row[j - 1];
        } else {
            uint8_t diag = row[0];
            row[0] = 0;
            for (size_t j = 1; j <= n; j++) {
                uint8_t cur = row[j];
                row[j] = diag && (p[i] == R_ANY || p[i] == s[j - 1]);
                diag = cur;
            }
        }
    }
    return row[n];
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    const uint8_t *sep = memchr(data, 0xFF, size);
    size_t plen = sep ? (size_t)(sep - data) : size;
    size_t slen = sep ? size - plen - 1 : 0;

    /* Separate exact-size copies so ASan sees any read past either end
     * (in the original buffer it would just hit the other half). */
    char *pat = malloc(plen ? plen : 1);
    char *subj = malloc(slen ? slen : 1);
    if (!pat || !subj)
        abort();
    memcpy(pat, data, plen);
    if (slen)
        memcpy(subj, sep + 1, slen);

    int got = dx_glob_match(pat, plen, subj, slen);
    if (dx_glob_check(pat, plen) != (plen > DX_GLOB_MAX_PATTERN ? -1 : 0))
        abort();

    if (plen > DX_GLOB_MAX_PATTERN) {
        if (got != -1)
            abort();
    } else {
        if (got != 0 && got != 1)
            abort();
        /* No wildcards: decoding is injective, so match == byte equality. */
        if (dx_glob_is_literal(pat, plen) &&
            got != (plen == slen && memcmp(pat, subj, plen) == 0))
            abort();

        uint32_t *pk = malloc((plen + 1) * sizeof *pk);
        uint32_t *sk = malloc((slen + 1) * sizeof *sk);
        uint8_t *row = malloc(slen + 1);
        if (!pk || !sk || !row)
            abort();
        size_t m = ref_decode((const uint8_t *)pat, plen, pk, 1);
        size_t n = ref_decode((const uint8_t *)subj, slen, sk, 0);
        /* Keep the quadratic reference cheap enough for fuzzing speed. */
        if ((uint64_t)m * n <= (1u << 20) && ref_dp(pk, m, sk, n, row) != got)
            abort();
        free(pk);
        free(sk);
        free(row);
    }
    free(pat);
    free(subj);
    return 0;
}
