/* cmocka unit tests for c_src/core/rtab.c: the lock-free open-addressing table
 * behind sessions and variables. Slots carry a 16-bit hash tag next to the
 * entry's address; these tests cover finds through tag matches and tag
 * collisions, tombstones, growth, the untagged fallback, and a reader running
 * while the writer inserts and removes. */
#include <stdarg.h>
#include <stddef.h>
#include <setjmp.h>
#include <stdint.h>
#include <cmocka.h>

#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "common.h"
#include "ebr.h"
#include "rtab.h"

typedef struct {
    dx_rkey k;
    char text[32];
    int value;
} ent;

static ent *ent_new(uint64_t hash, const char *text, int value) {
    ent *e = calloc(1, sizeof *e);
    snprintf(e->text, sizeof e->text, "%s", text);
    e->k = (dx_rkey){hash, e->text, strlen(e->text)};
    e->value = value;
    return e;
}

static ent *find(dx_rtab_ref *r, uint64_t hash, const char *text) {
    return (ent *)dx_rtab_find(r, hash, text, strlen(text));
}

static int count_cb(void *ctx, dx_rkey *e) {
    (void)e;
    ++*(int *)ctx;
    return 0;
}

static int count(dx_rtab_ref *r) {
    int n = 0;
    dx_rtab_foreach(r, count_cb, &n);
    return n;
}

static void free_all(dx_rtab_ref *r, ent **es, int n) {
    for (int i = 0; i < n; i++) free(es[i]);
    dx_rtab_destroy(r);
}

/* Hashes chosen to collide: same slot (low bits), same or different tag. */
static void exercise(int untag) {
    dx_rtab_ref r;
    assert_int_equal(dx_rtab_init(&r, 4), DX_OK);
    if (untag) assert_int_equal(dx_rtab_untag(&r), DX_OK);
    enum { N = 600 };
    ent *es[N];
    char buf[32];
    for (int i = 0; i < N; i++) {
        snprintf(buf, sizeof buf, "key_%d", i);
        /* every 3 keys share a tag (top 16 bits) and every 5 share low bits */
        uint64_t h = ((uint64_t)(i / 3) << 48) | (uint64_t)(i % 5) | ((uint64_t)i << 8);
        es[i] = ent_new(h, buf, i);
        assert_int_equal(dx_rtab_insert(&r, &es[i]->k), DX_OK);
    }
    assert_int_equal(count(&r), N);
    for (int i = 0; i < N; i++) {
        snprintf(buf, sizeof buf, "key_%d", i);
        ent *e = find(&r, es[i]->k.hash, buf);
        assert_non_null(e);
        assert_int_equal(e->value, i);
        /* the same text under another hash (other tag, or same tag and slot) is absent */
        assert_null(find(&r, es[i]->k.hash ^ (UINT64_C(1) << 63), buf));
        assert_null(find(&r, es[i]->k.hash ^ (UINT64_C(1) << 20), buf));
    }
    /* a key with an existing entry's hash but other text: absent, and insertable */
    ent *twin = ent_new(es[7]->k.hash, "twin", -1);
    assert_null(find(&r, twin->k.hash, "twin"));
    assert_int_equal(dx_rtab_insert(&r, &twin->k), DX_OK);
    assert_ptr_equal(find(&r, twin->k.hash, "twin"), twin);
    assert_ptr_equal(find(&r, es[7]->k.hash, "key_7"), es[7]);
    ent *dup = ent_new(es[9]->k.hash, "key_9", -2);
    assert_int_equal(dx_rtab_insert(&r, &dup->k), DX_E_EXISTS);
    free(dup);
    /* remove every other key: the rest stay reachable past the tombstones */
    for (int i = 0; i < N; i += 2) {
        snprintf(buf, sizeof buf, "key_%d", i);
        assert_ptr_equal(dx_rtab_remove(&r, es[i]->k.hash, buf, strlen(buf)), &es[i]->k);
        assert_null(dx_rtab_remove(&r, es[i]->k.hash, buf, strlen(buf)));
    }
    for (int i = 0; i < N; i++) {
        snprintf(buf, sizeof buf, "key_%d", i);
        ent *e = find(&r, es[i]->k.hash, buf);
        if (i % 2) assert_ptr_equal(e, es[i]);
        else assert_null(e);
    }
    assert_int_equal(count(&r), N / 2 + 1);
    /* untagging a live table keeps every entry */
    assert_int_equal(dx_rtab_untag(&r), DX_OK);
    assert_int_equal(count(&r), N / 2 + 1);
    for (int i = 1; i < N; i += 2) {
        snprintf(buf, sizeof buf, "key_%d", i);
        assert_ptr_equal(find(&r, es[i]->k.hash, buf), es[i]);
    }
    free(twin);
    dx_ebr_drain();
    free_all(&r, es, N);
}

static void test_tagged(void **st) {
    (void)st;
    exercise(0);
}

static void test_untagged(void **st) {
    (void)st;
    exercise(1);
}

/* A reader probing while the writer inserts, removes and regrows: it never
 * sees a wrong entry, always finds the keys that stay, and never crashes. */
enum { STAY = 64, CHURN = 256, ROUNDS = 300 };
static dx_rtab_ref g_r;
static ent *g_stay[STAY];
static _Atomic int g_stop;
static _Atomic long g_bad;

static void *reader(void *arg) {
    (void)arg;
    char buf[32];
    long bad = 0;
    while (!atomic_load(&g_stop)) {
        for (int i = 0; i < STAY; i++) {
            snprintf(buf, sizeof buf, "stay_%d", i);
            dx_ebr_enter();
            ent *e = find(&g_r, g_stay[i]->k.hash, buf);
            if (e != g_stay[i]) bad++;
            snprintf(buf, sizeof buf, "churn_%d", i);
            e = find(&g_r, dx_hash(buf, strlen(buf)), buf);
            if (e && strcmp(e->text, buf) != 0) bad++;
            dx_ebr_exit();
        }
    }
    atomic_fetch_add(&g_bad, bad);
    return NULL;
}

static void release_ent(void *p) { free(p); }

static void test_reader_during_churn(void **st) {
    (void)st;
    char buf[32];
    assert_int_equal(dx_rtab_init(&g_r, 4), DX_OK);
    for (int i = 0; i < STAY; i++) {
        snprintf(buf, sizeof buf, "stay_%d", i);
        g_stay[i] = ent_new(dx_hash(buf, strlen(buf)), buf, i);
        assert_int_equal(dx_rtab_insert(&g_r, &g_stay[i]->k), DX_OK);
    }
    atomic_store(&g_stop, 0);
    pthread_t th;
    assert_int_equal(pthread_create(&th, NULL, reader, NULL), 0);
    for (int round = 0; round < ROUNDS; round++) {
        for (int i = 0; i < CHURN; i++) {
            snprintf(buf, sizeof buf, "churn_%d", i);
            ent *e = ent_new(dx_hash(buf, strlen(buf)), buf, i);
            assert_int_equal(dx_rtab_insert(&g_r, &e->k), DX_OK);
        }
        if (round == ROUNDS / 2) assert_int_equal(dx_rtab_untag(&g_r), DX_OK);
        for (int i = 0; i < CHURN; i++) {
            snprintf(buf, sizeof buf, "churn_%d", i);
            dx_rkey *k = dx_rtab_remove(&g_r, dx_hash(buf, strlen(buf)), buf, strlen(buf));
            assert_non_null(k);
            dx_ebr_retire(k, release_ent, 0);
        }
        dx_ebr_reclaim(0);
    }
    atomic_store(&g_stop, 1);
    pthread_join(th, NULL);
    assert_int_equal(atomic_load(&g_bad), 0);
    assert_int_equal(count(&g_r), STAY);
    dx_ebr_drain();
    free_all(&g_r, g_stay, STAY);
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_tagged),
        cmocka_unit_test(test_untagged),
        cmocka_unit_test(test_reader_during_churn),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
