/*
 * Glob matching for dspex_bridge: '*' and '?' only, over UTF-8 code points.
 *
 *   '*'  any run (possibly empty) of characters
 *   '?'  exactly one character
 *   every other byte is literal (no escapes, no classes, no regex).
 *
 * A "character" is one well-formed UTF-8 sequence (no overlongs, no
 * surrogates, <= U+10FFFF); every byte that is not part of such a sequence
 * is a character on its own. Matching is anchored at both ends, lengths are
 * explicit so NUL bytes are ordinary characters. Runs in time linear in the
 * subject for a bounded pattern, uses no heap and no mutable globals, so it
 * is safe to call from any thread.
 */
#ifndef DX_GLOB_H
#define DX_GLOB_H

#include <stddef.h>

#define DX_GLOB_MAX_PATTERN 1024 /* bytes */

/* Returns 1 on match, 0 on no match, -1 if the pattern is longer than
 * DX_GLOB_MAX_PATTERN. */
int dx_glob_match(const char *pat, size_t plen, const char *subj, size_t slen);

/* 0 if the pattern is acceptable, -1 if too long. */
int dx_glob_check(const char *pat, size_t plen);

/* 1 if pattern contains no '*' or '?', i.e. it is a literal. */
int dx_glob_is_literal(const char *pat, size_t plen);

#endif /* DX_GLOB_H */
