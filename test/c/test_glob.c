/* cmocka unit tests for c_src/core/glob.c (dx_glob_*). */
#include <stdarg.h>
#include <stddef.h>
#include <setjmp.h>
#include <stdint.h>
#include <cmocka.h>

#include <stdlib.h>
#include <string.h>

#include "glob.h"

/* NUL-terminated convenience wrapper; NUL-containing cases call the API
 * directly with explicit lengths. */
static int gm(const char *pat, const char *subj)
{
    return dx_glob_match(pat, strlen(pat), subj, strlen(subj));
}

/* ---- reference matcher ---------------------------------------------------
 * Written independently of glob.c: decode both strings into arrays of code
 * points (by computing the value and range-checking it, rather than by
 * checking lead/second-byte ranges as glob.c does), then run the textbook
 * O(m*n) DP. Slow but obviously right. */
#define REF_STAR 0xFFFFFFFFu
#define REF_ANY 0xFFFFFFFEu
#define REF_BAD 0x200000u /* + byte; disjoint from every code point */

static size_t ref_decode(const unsigned char *s, size_t n, uint32_t *out, int is_pattern)
{
    static const uint32_t min_cp[5] = {0, 0, 0x80, 0x800, 0x10000};
    size_t cnt = 0;
    for (size_t i = 0; i < n;) {
        unsigned c = s[i];
        size_t need;
        if (is_pattern && c == '*') {
            out[cnt++] = REF_STAR;
            i++;
            continue;
        }
        if (is_pattern && c == '?') {
            out[cnt++] = REF_ANY;
            i++;
            continue;
        }
        if (c < 0x80)
            need = 1;
        else if (c >= 0xC0 && c < 0xE0)
            need = 2;
        else if (c >= 0xE0 && c < 0xF0)
            need = 3;
        else if (c >= 0xF0 && c < 0xF8)
            need = 4;
        else
            need = 0; /* continuation or 0xF8..0xFF */
        if (need == 1) {
            out[cnt++] = c;
            i++;
            continue;
        }
        int ok = need > 1 && i + need <= n;
        uint32_t cp = 0;
        if (ok) {
            cp = c & (0x7Fu >> need);
            for (size_t t = 1; t < need; t++) {
                if ((s[i + t] & 0xC0) != 0x80) {
                    ok = 0;
                    break;
                }
                cp = (cp << 6) | (s[i + t] & 0x3F);
            }
        }
        if (ok && cp >= min_cp[need] && cp <= 0x10FFFF && !(cp >= 0xD800 && cp <= 0xDFFF)) {
            out[cnt++] = cp;
            i += need;
        } else {
            out[cnt++] = REF_BAD + c;
            i++;
        }
    }
    return cnt;
}

static int ref_match(const char *pat, size_t plen, const char *subj, size_t slen)
{
    uint32_t *p = malloc((plen + 1) * sizeof *p);
    uint32_t *s = malloc((slen + 1) * sizeof *s);
    unsigned char *dp = malloc(slen + 1), *nx = malloc(slen + 1);
    assert_non_null(p);
    assert_non_null(s);
    assert_non_null(dp);
    assert_non_null(nx);
    size_t m = ref_decode((const unsigned char *)pat, plen, p, 1);
    size_t n = ref_decode((const unsigned char *)subj, slen, s, 0);

    /* dp[j]: pattern prefix processed so far matches s[0..j). */
    memset(dp, 0, n + 1);
    dp[0] = 1;
    for (size_t i = 0; i < m; i++) {
        memset(nx, 0, n + 1);
        for (size_t j = 0; j <= n; j++) {
            if (p[i] == REF_STAR)
                nx[j] = dp[j] || (j > 0 && nx[j - 1]);
            else if (j > 0)
                nx[j] = dp[j - 1] && (p[i] == REF_ANY || p[i] == s[j - 1]);
        }
        unsigned char *t = dp;
        dp = nx;
        nx = t;
    }
    int r = dp[n];
    free(p);
    free(s);
    free(dp);
    free(nx);
    return r;
}

/* xorshift64: fixed seed so failures are reproducible. */
static uint64_t rng_state = 0x9E3779B97F4A7C15ull;
static uint32_t rnd(uint32_t bound)
{
    rng_state ^= rng_state << 13;
    rng_state ^= rng_state >> 7;
    rng_state ^= rng_state << 17;
    return (uint32_t)(rng_state % bound);
}

/* Build a random string from pieces. The lone 0xC3 / 0xA9 pieces can meet
 * and form "é", which exercises how invalid bytes and sequence boundaries
 * are decided. */
static size_t rand_string(char *buf, size_t max_pieces, int wildcards)
{
    static const char *const pieces[] = {"a", "b", "\xC3\xA9", "\xE2\x82\xAC", "\xC3", "\xA9", "*", "?"};
    size_t npieces = wildcards ? 8 : 6;
    size_t len = 0, k = rnd((uint32_t)max_pieces + 1);
    for (size_t i = 0; i < k; i++) {
        /* Bias toward plain letters so matches are not vanishingly rare. */
        size_t pi = rnd(4) == 0 ? rnd((uint32_t)npieces) : rnd(2);
        if (wildcards && rnd(3) == 0)
            pi = 6 + rnd(2);
        size_t pl = strlen(pieces[pi]);
        memcpy(buf + len, pieces[pi], pl);
        len += pl;
    }
    return len;
}

/* ---- tests -------------------------------------------------------------- */

static void test_literal(void **state)
{
    assert_int_equal(gm("hello", "hello"), 1);
    assert_int_equal(gm("hello", "hell"), 0);
    assert_int_equal(gm("hello", "helloo"), 0);
    assert_int_equal(gm("hello", "Hello"), 0);
    assert_int_equal(gm("café", "café"), 1);
    assert_int_equal(gm("café", "cafe"), 0);
}

static void test_star_start_middle_end(void **state)
{
    assert_int_equal(gm("*.txt", "notes.txt"), 1);
    assert_int_equal(gm("*.txt", ".txt"), 1);
    assert_int_equal(gm("*.txt", "notes.txt.bak"), 0);
    assert_int_equal(gm("user.*", "user.42"), 1);
    assert_int_equal(gm("user.*", "user."), 1);
    assert_int_equal(gm("user.*", "user"), 0);
    assert_int_equal(gm("a*z", "az"), 1);
    assert_int_equal(gm("a*z", "abcz"), 1);
    assert_int_equal(gm("a*z", "abczq"), 0);
    assert_int_equal(gm("a*z", "qabcz"), 0);
    assert_int_equal(gm("*", ""), 1);
    assert_int_equal(gm("*", "anything"), 1);
}

static void test_multiple_stars(void **state)
{
    assert_int_equal(gm("*a*b*", "xxaxxbxx"), 1);
    assert_int_equal(gm("*a*b*", "xxbxxaxx"), 0);
    assert_int_equal(gm("a*b*c", "abc"), 1);
    assert_int_equal(gm("a*b*c", "aXbYc"), 1);
    assert_int_equal(gm("a*b*c", "acb"), 0);
    /* Greedy leftmost must still leave room for later segments. */
    assert_int_equal(gm("*ab*abc", "abc"), 0);
    assert_int_equal(gm("*ab*abc", "ababc"), 1);
    assert_int_equal(gm("*abc*ab", "abcab"), 1);
    assert_int_equal(gm("*abc*ab", "ababc"), 0);
    assert_int_equal(gm("*aab*", "aaab"), 1);
    assert_int_equal(gm("x*ana*na", "xbananana"), 1);
}

static void test_star_runs(void **state)
{
    assert_int_equal(gm("*****", ""), 1);
    assert_int_equal(gm("*****", "abc"), 1);
    assert_int_equal(gm("a*****b", "ab"), 1);
    assert_int_equal(gm("a*****b", "a123b"), 1);
    assert_int_equal(gm("a*****b", "a123"), 0);
    assert_int_equal(gm("**a**b**", "xaxbx"), 1);
    assert_int_equal(gm("**a**b**", "xbx"), 0);
}

static void test_question_ascii(void **state)
{
    assert_int_equal(gm("?", "a"), 1);
    assert_int_equal(gm("?", ""), 0);
    assert_int_equal(gm("?", "ab"), 0);
    assert_int_equal(gm("a?c", "abc"), 1);
    assert_int_equal(gm("a?c", "ac"), 0);
    assert_int_equal(gm("a?c", "abbc"), 0);
    assert_int_equal(gm("???", "xyz"), 1);
    assert_int_equal(gm("*?", ""), 0);
    assert_int_equal(gm("*?", "q"), 1);
    assert_int_equal(gm("*x?z*", "aaxyzbb"), 1);
    assert_int_equal(gm("*x?z*", "aaxzbb"), 0);
    assert_int_equal(gm("?*?", "a"), 0);
    assert_int_equal(gm("?*?", "ab"), 1);
}

static void test_question_utf8(void **state)
{
    assert_int_equal(gm("caf?", "café"), 1);  /* é is 2 bytes, one char */
    assert_int_equal(gm("caf??", "café"), 0);
    assert_int_equal(gm("?", "é"), 1);
    assert_int_equal(gm("?", "€"), 1);        /* 3 bytes */
    assert_int_equal(gm("?", "\xF0\x9F\x98\x80"), 1); /* 4 bytes */
    assert_int_equal(gm("??", "\xF0\x9F\x98\x80"), 0);
    assert_int_equal(gm("?€?", "a€b"), 1);
    assert_int_equal(gm("*?é", "xé"), 1);
    assert_int_equal(gm("*?é", "é"), 0);
    assert_int_equal(gm("*€?*", "1€é2"), 1);
    assert_int_equal(gm("*€??*", "1€é"), 0);
}

static void test_empty(void **state)
{
    assert_int_equal(dx_glob_match("", 0, "", 0), 1);
    assert_int_equal(dx_glob_match(NULL, 0, NULL, 0), 1);
    assert_int_equal(dx_glob_match("", 0, "a", 1), 0);
    assert_int_equal(dx_glob_match("a", 1, "", 0), 0);
    assert_int_equal(dx_glob_match("*", 1, NULL, 0), 1);
    assert_int_equal(dx_glob_match("?", 1, NULL, 0), 0);
    assert_int_equal(dx_glob_match("a*", 2, "", 0), 0);
    assert_int_equal(dx_glob_match("*a", 2, "", 0), 0);
}

static void test_regex_metachars_are_literal(void **state)
{
    assert_int_equal(gm("a.b", "a.b"), 1);
    assert_int_equal(gm("a.b", "axb"), 0);
    assert_int_equal(gm(".*", "abc"), 0); /* '.' is literal, not "any" */
    assert_int_equal(gm(".*", ".abc"), 1);
    assert_int_equal(gm("[ab]", "[ab]"), 1);
    assert_int_equal(gm("[ab]", "a"), 0);
    assert_int_equal(gm("[ab]", "b"), 0);
    assert_int_equal(gm("[!a]", "b"), 0);
    assert_int_equal(gm("(a|b)", "(a|b)"), 1);
    assert_int_equal(gm("(a|b)", "a"), 0);
    assert_int_equal(gm("a|b", "a"), 0);
    assert_int_equal(gm("^a$", "^a$"), 1);
    assert_int_equal(gm("^a$", "a"), 0);
    assert_int_equal(gm("a+", "aa"), 0);
    assert_int_equal(gm("a+", "a+"), 1);
    assert_int_equal(gm("a{2}", "aa"), 0);
    assert_int_equal(gm("a{2}", "a{2}"), 1);
    /* No escaping: backslash is an ordinary byte before '*' and '?'. */
    assert_int_equal(gm("\\*", "*"), 0);
    assert_int_equal(gm("\\*", "\\"), 1);
    assert_int_equal(gm("\\*", "\\anything"), 1);
    assert_int_equal(gm("\\?", "?"), 0);
    assert_int_equal(gm("\\?", "\\x"), 1);
    assert_int_equal(gm("\\", "\\"), 1);
    /* "\E" (regex quote terminator) is just two bytes. */
    assert_int_equal(gm("\\E", "\\E"), 1);
    assert_int_equal(gm("\\E", "E"), 0);
    assert_int_equal(gm("\\Q.*\\E", "\\Q.x\\E"), 1);
    assert_int_equal(gm("\\Q.*\\E", "anything"), 0);
    assert_int_equal(gm("a\\E.*", "a\\E.z"), 1);
    /* Wildcards in the subject are plain characters. */
    assert_int_equal(gm("a", "*"), 0);
    assert_int_equal(gm("?", "*"), 1);
    assert_int_equal(gm("*", "?*"), 1);
}

static void test_embedded_nul(void **state)
{
    static const char p1[] = "a\0b";
    static const char s1[] = "a\0b";
    static const char s2[] = "a\0c";
    assert_int_equal(dx_glob_match(p1, 3, s1, 3), 1);
    assert_int_equal(dx_glob_match(p1, 3, s2, 3), 0);
    assert_int_equal(dx_glob_match(p1, 3, "a", 1), 0); /* NUL is not an end */
    static const char p2[] = "a?b";
    assert_int_equal(dx_glob_match(p2, 3, s1, 3), 1); /* '?' matches NUL */
    static const char p3[] = "*\0*";
    assert_int_equal(dx_glob_match(p3, 3, "x\0y", 3), 1);
    assert_int_equal(dx_glob_match(p3, 3, "xy", 2), 0);
    static const char p4[] = "\0";
    assert_int_equal(dx_glob_match(p4, 1, "", 0), 0);
    assert_int_equal(dx_glob_match(p4, 1, "\0", 1), 1);
}

static void test_too_long(void **state)
{
    char pat[DX_GLOB_MAX_PATTERN + 1];
    memset(pat, 'a', sizeof pat);
    /* Exactly the limit is accepted and matched normally. */
    assert_int_equal(dx_glob_match(pat, DX_GLOB_MAX_PATTERN, pat, DX_GLOB_MAX_PATTERN), 1);
    assert_int_equal(dx_glob_match(pat, DX_GLOB_MAX_PATTERN + 1, pat, DX_GLOB_MAX_PATTERN + 1), -1);
    assert_int_equal(dx_glob_match(pat, DX_GLOB_MAX_PATTERN + 1, "", 0), -1);
    memset(pat, '*', sizeof pat);
    assert_int_equal(dx_glob_match(pat, DX_GLOB_MAX_PATTERN, "x", 1), 1);
    assert_int_equal(dx_glob_match(pat, DX_GLOB_MAX_PATTERN + 1, "x", 1), -1);
}

static void test_check_and_is_literal(void **state)
{
    char pat[DX_GLOB_MAX_PATTERN + 1];
    memset(pat, '?', sizeof pat);
    assert_int_equal(dx_glob_check(pat, 0), 0);
    assert_int_equal(dx_glob_check(pat, DX_GLOB_MAX_PATTERN), 0);
    assert_int_equal(dx_glob_check(pat, DX_GLOB_MAX_PATTERN + 1), -1);
    assert_int_equal(dx_glob_check(pat, (size_t)-1), -1);

    assert_int_equal(dx_glob_is_literal("", 0), 1);
    assert_int_equal(dx_glob_is_literal("abc", 3), 1);
    assert_int_equal(dx_glob_is_literal("a.b[c]\\E(x|y)^$+{", 18), 1);
    assert_int_equal(dx_glob_is_literal("café", strlen("café")), 1);
    assert_int_equal(dx_glob_is_literal("a*", 2), 0);
    assert_int_equal(dx_glob_is_literal("a?", 2), 0);
    assert_int_equal(dx_glob_is_literal("\\*", 2), 0); /* no escaping */
    assert_int_equal(dx_glob_is_literal("a\0*", 3), 0); /* looks past NUL */
    assert_int_equal(dx_glob_is_literal("a\0*", 2), 1); /* honours length */
}

static void test_invalid_utf8(void **state)
{
    /* A lone byte that is not part of a valid sequence is one character. */
    assert_int_equal(gm("?", "\xC3"), 1);
    assert_int_equal(gm("?", "\xA9"), 1);
    assert_int_equal(gm("?", "\xFF"), 1);
    assert_int_equal(gm("??", "\xC3\x28"), 1);
    assert_int_equal(gm("?(", "\xC3\x28"), 1);
    /* Overlong NUL and an encoded surrogate are invalid: 2 and 3 chars. */
    assert_int_equal(gm("?", "\xC0\x80"), 0);
    assert_int_equal(gm("??", "\xC0\x80"), 1);
    assert_int_equal(gm("???", "\xED\xA0\x80"), 1);
    assert_int_equal(gm("?", "\xED\x9F\xBF"), 1); /* U+D7FF is fine */
    assert_int_equal(gm("?", "\xE0\x9F\xBF"), 0);  /* overlong 3-byte */
    assert_int_equal(gm("???", "\xE0\x9F\xBF"), 1);
    assert_int_equal(gm("?", "\xE0\xA0\x80"), 1);  /* U+0800, shortest */
    assert_int_equal(gm("?", "\xF0\x8F\xBF\xBF"), 0); /* overlong 4-byte */
    assert_int_equal(gm("?", "\xF0\x90\x80\x80"), 1); /* U+10000 */
    assert_int_equal(gm("?", "\xF4\x8F\xBF\xBF"), 1); /* U+10FFFF */
    assert_int_equal(gm("?", "\xF5\x80\x80\x80"), 0); /* never a lead */
    assert_int_equal(gm("?", "\xF4\x90\x80\x80"), 0); /* > U+10FFFF */
    assert_int_equal(gm("????", "\xF4\x90\x80\x80"), 1);
    /* Truncated sequence: each byte stands alone. */
    assert_int_equal(gm("??", "\xE2\x82"), 1);
    assert_int_equal(gm("?", "\xE2\x82"), 0);
    /* A lone lead byte in the pattern is not the start of the subject's
     * sequence, even though the bytes agree. */
    assert_int_equal(gm("\xE2*", "\xE2\x82\xAC"), 0);
    assert_int_equal(gm("caf\xC3*", "café"), 0);
    assert_int_equal(gm("*\xA9", "café"), 0);
    assert_int_equal(gm("*\xA9", "caf\xA9"), 1);
    assert_int_equal(gm("*\x82\xAC*", "x€y"), 0);
    assert_int_equal(gm("*\x82\xAC*", "x\x82\xACy"), 1);
    /* Lone 0xE9 (invalid) must not equal U+00E9 (é). */
    assert_int_equal(gm("\xE9", "é"), 0);
    assert_int_equal(gm("é", "\xE9"), 0);
}

static void test_head_and_tail_do_not_overlap(void **state)
{
    assert_int_equal(gm("ab*ba", "aba"), 0);
    assert_int_equal(gm("ab*ba", "abba"), 1);
    assert_int_equal(gm("a*a", "a"), 0);
    assert_int_equal(gm("a*a", "aa"), 1);
    assert_int_equal(gm("é*é", "é"), 0);
    assert_int_equal(gm("é*é", "éé"), 1);
    assert_int_equal(gm("?*?", "é"), 0);
    assert_int_equal(gm("a*b*a", "aba"), 1);
    assert_int_equal(gm("a*b*a", "aa"), 0);
    assert_int_equal(gm("ab*b*ba", "abba"), 0);
    assert_int_equal(gm("ab*b*ba", "abbba"), 1);
}

static void test_pathological_is_linear(void **state)
{
    /* Inputs that make backtracking matchers blow up; here they must simply
     * finish (no timing assertion) with the right answer. */
    enum { N = 100000 };
    char *s = malloc(N + 1);
    assert_non_null(s);
    memset(s, 'a', N);
    s[N] = '\0';
    assert_int_equal(gm("*a*a*a*a*a*a*a*b", s), 0);
    assert_int_equal(gm("*a*a*a*a*a*a*a*b*", s), 0);
    assert_int_equal(gm("*a*a*a*a*a*a*a*", s), 1);
    assert_int_equal(gm("*aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaab*", s), 0);
    assert_int_equal(gm("*?a?a?a?a?a?a?a?a?a?a?a?a?b*", s), 0);
    assert_int_equal(gm("a*?*?*?*?*?*?*?*?*?*?*?*?*?*?*?*?*?*?*?*b", s), 0);
    s[N - 1] = 'b';
    assert_int_equal(gm("*a*a*a*a*a*a*a*b", s), 1);
    assert_int_equal(gm("*aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaab*", s), 1);
    assert_int_equal(gm("*?a?a?a?a?a?a?a?a?a?a?a?a?b*", s), 1);
    assert_int_equal(gm("*?a?a?a?a?a?a?a?a?a?a?a?a?bb*", s), 0);
    assert_int_equal(gm("a*?*?*?*?*?*?*?*?*?*?*?*?*?*?*?*?*?*?*?*b", s), 1);

    /* A 1000-char segment (16 mask words) over the long subject: absent,
     * then present once the subject ends in 'c'. */
    char pat[DX_GLOB_MAX_PATTERN];
    pat[0] = '*';
    for (size_t i = 1; i < 1000; i++)
        pat[i] = (i % 3) ? 'a' : '?';
    pat[1000] = 'c';
    pat[1001] = '*';
    assert_int_equal(dx_glob_match(pat, 1002, s, N), 0);
    s[N - 1] = 'c';
    assert_int_equal(dx_glob_match(pat, 1002, s, N), 1);
    free(s);
}

static void test_random_vs_reference(void **state)
{
    char pat[64], subj[64];
    int matches = 0;
    for (int iter = 0; iter < 20000; iter++) {
        size_t pl = rand_string(pat, 8, 1);
        size_t sl = rand_string(subj, 10, 0);
        int want = ref_match(pat, pl, subj, sl);
        int got = dx_glob_match(pat, pl, subj, sl);
        if (got != want)
            fail_msg("iter %d: pattern '%.*s' subject '%.*s': got %d want %d", iter,
                     (int)pl, pat, (int)sl, subj, got, want);
        matches += got;
    }
    /* Guard against a generator that never produces matches. */
    assert_true(matches > 1000);
    assert_true(matches < 19000);
}

/* One random character for the long-segment test: mostly 'a', some 'b',
 * some 2-byte 'é'. */
static size_t put_char(char *buf)
{
    uint32_t r = rnd(16);
    if (r == 0) {
        memcpy(buf, "\xC3\xA9", 2);
        return 2;
    }
    buf[0] = r < 3 ? 'b' : 'a';
    return 1;
}

static void test_long_segments_vs_reference(void **state)
{
    /* Segments longer than 64 characters cross mask words; the short random
     * test above never does. Subjects are built by instantiating the
     * pattern and then sometimes corrupting one byte, so both outcomes
     * occur. */
    char pat[DX_GLOB_MAX_PATTERN], subj[4096];
    int matches = 0;
    for (int iter = 0; iter < 150; iter++) {
        size_t pl = 0, sl = 0;
        size_t nseg = 1 + rnd(3);
        pat[pl++] = '*';
        for (size_t g = 0; g < nseg; g++) {
            for (size_t f = rnd(100); f > 0; f--)
                sl += put_char(subj + sl);
            for (size_t len = 60 + rnd(70); len > 0; len--) {
                size_t cl = put_char(subj + sl);
                if (rnd(4) == 0)
                    pat[pl++] = '?';
                else
                    memcpy(pat + pl, subj + sl, cl), pl += cl;
                sl += cl;
            }
            pat[pl++] = '*';
        }
        if (rnd(2)) {
            pl--; /* anchor the last segment at the end */
        } else {
            for (size_t f = rnd(100); f > 0; f--)
                sl += put_char(subj + sl);
        }
        if (rnd(2))
            subj[rnd((uint32_t)sl)] = 'c'; /* never in the pattern */
        int want = ref_match(pat, pl, subj, sl);
        int got = dx_glob_match(pat, pl, subj, sl);
        if (got != want)
            fail_msg("iter %d: got %d want %d", iter, got, want);
        matches += got;
    }
    assert_true(matches > 10);
    assert_true(matches < 140);
}

static void test_literal_pattern_means_byte_equality(void **state)
{
    /* Without wildcards the decoding is injective, so a match must be
     * exactly byte equality, invalid bytes included. */
    char a[64], b[64];
    int equal = 0;
    for (int iter = 0; iter < 5000; iter++) {
        size_t al = rand_string(a, 4, 0);
        size_t bl = rnd(2) ? (memcpy(b, a, al), al) : rand_string(b, 4, 0);
        assert_int_equal(dx_glob_is_literal(a, al), 1);
        int same = al == bl && memcmp(a, b, al) == 0;
        assert_int_equal(dx_glob_match(a, al, b, bl), same);
        equal += same;
    }
    assert_true(equal > 100);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_literal),
        cmocka_unit_test(test_star_start_middle_end),
        cmocka_unit_test(test_multiple_stars),
        cmocka_unit_test(test_star_runs),
        cmocka_unit_test(test_question_ascii),
        cmocka_unit_test(test_question_utf8),
        cmocka_unit_test(test_empty),
        cmocka_unit_test(test_regex_metachars_are_literal),
        cmocka_unit_test(test_embedded_nul),
        cmocka_unit_test(test_too_long),
        cmocka_unit_test(test_check_and_is_literal),
        cmocka_unit_test(test_invalid_utf8),
        cmocka_unit_test(test_head_and_tail_do_not_overlap),
        cmocka_unit_test(test_pathological_is_linear),
        cmocka_unit_test(test_random_vs_reference),
        cmocka_unit_test(test_long_segments_vs_reference),
        cmocka_unit_test(test_literal_pattern_means_byte_equality),
    };
    return cmocka_run_group_tests_name("glob", tests, NULL, NULL);
}
