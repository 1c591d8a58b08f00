#include "common.h"

static uint64_t g_seed = 0x2d358dccaa6c78a5ull;

void dx_hash_seed(uint64_t seed) { g_seed = seed ^ 0x8bb84b93962eacc9ull; }

static inline uint64_t mix(uint64_t a, uint64_t b) {
    __uint128_t r = (__uint128_t)a * b;
    return (uint64_t)r ^ (uint64_t)(r >> 64);
}

/* Multiply-fold hash over 8-byte words: short keys (variable names) dominate,
 * so it is tuned for few words rather than long-input throughput. */
uint64_t dx_hash(const void *p, size_t len) {
    const uint8_t *s = p;
    uint64_t h = g_seed ^ (len * 0x9e3779b97f4a7c15ull);
    while (len >= 8) {
        uint64_t w;
        memcpy(&w, s, 8);
        h = mix(h ^ w, 0xbf58476d1ce4e5b9ull);
        s += 8;
        len -= 8;
    }
    uint64_t w = 0;
    if (len) memcpy(&w, s, len);
    h = mix(h ^ w ^ ((uint64_t)len << 59), 0x94d049bb133111ebull);
    return mix(h, 0xa0761d6478bd642full);
}
