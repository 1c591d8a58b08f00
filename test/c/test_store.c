/* Unit tests of the store core (sessions, variables, versions, history,
 * batches, import) and of EBR reclamation under concurrent readers. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>
#include <math.h>
#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include "ebr.h"
#include "store.h"

static dx_str S(const char *s) { return (dx_str){s, strlen(s)}; }
static int64_t T_US = 1000000, T_MS = 1000;

static int setup(void **st) {
    dx_limits l = dx_store_limits();
    l.max_vars = 100000;
    l.max_sessions = 1000;
    l.default_history = 50;
    dx_store_set_limits(&l);
    return dx_store_init();
}
static int teardown(void **st) {
    dx_store_shutdown();
    return 0;
}

static dx_session *mk_session(const char *id, int64_t ttl_ms) {
    dx_session *s = NULL;
    int created = 0, limit = 0;
    assert_int_equal(dx_session_create(S(id), NULL, 0, ttl_ms, T_US, T_MS, &s, &created, &limit), DX_OK);
    assert_non_null(s);
    return s;
}

static dx_var *reg_int(dx_session *s, const char *name, int64_t v, int64_t hl) {
    dx_constraints c;
    dx_constraints_init(&c);
    dx_value val = {.type = DX_T_INTEGER, .u.i = v};
    dx_var_spec sp = {.name = S(name), .type = DX_T_INTEGER, .cons = &c, .value = &val, .history_limit = hl};
    dx_var *out = NULL;
    int limit = 0;
    assert_int_equal(dx_var_register(s, &sp, T_US, &out, &limit), DX_OK);
    return out;
}

static int64_t cur_int(dx_var *v) { return dx_var_current(v)->value.u.i; }

static void test_session_lifecycle(void **st) {
    dx_ebr_enter();
    dx_session *a = mk_session("a", -1), *again = NULL;
    int created = 1, limit = 0;
    assert_int_equal(dx_session_create(S("a"), NULL, 0, 5, T_US, T_MS, &again, &created, &limit), DX_OK);
    assert_ptr_equal(a, again); /* idempotent */
    assert_int_equal(created, 0);
    assert_ptr_equal(dx_session_find(S("a"), T_MS), a);
    assert_null(dx_session_find(S("b"), T_MS));
    assert_int_equal(dx_session_delete(S("a")), DX_OK);
    assert_int_equal(dx_session_delete(S("a")), DX_E_SESSION_NOT_FOUND);
    assert_null(dx_session_find(S("a"), T_MS));
    dx_ebr_exit();
}

static void test_ttl_and_sweep(void **st) {
    dx_ebr_enter();
    mk_session("short", 1000);
    mk_session("forever", -1);
    assert_non_null(dx_session_find(S("short"), T_MS + 900));
    /* the find at +900 refreshed nothing (under a second), yet counts: the
     * session lives until ttl + the touch granularity after the last refresh */
    assert_null(dx_session_find(S("short"), T_MS + 2001));
    assert_int_equal(dx_session_sweep(T_MS + 2001), 1);
    assert_non_null(dx_session_find(S("forever"), T_MS + 1000000));
    assert_int_equal(dx_session_delete(S("forever")), DX_OK);
    dx_ebr_exit();
    dx_ebr_reclaim(1);
}

static void test_touch_refreshes(void **st) {
    dx_ebr_enter();
    dx_session *s = mk_session("t", 2000);
    dx_session_touch(s, T_MS + 1500);
    assert_non_null(dx_session_find(S("t"), T_MS + 3000)); /* 1500 ms after the touch; refreshes */
    /* gone after ttl + the touch granularity since that find */
    assert_non_null(dx_session_find(S("t"), T_MS + 6000));
    assert_null(dx_session_find(S("t"), T_MS + 9001));
    dx_session_delete(S("t"));
    dx_ebr_exit();
}

/* The probe's case: ttl 1 s, an access every 600 ms. Accesses within a
 * second of the last refresh are not recorded; the session must still live
 * ttl after each of them (and not much longer). */
static void test_ttl_counts_from_the_last_access(void **st) {
    dx_ebr_enter();
    dx_session *s = mk_session("every600", 1000);
    assert_non_null(dx_session_find(S("every600"), T_MS + 600));
    assert_non_null(dx_session_find(S("every600"), T_MS + 1200));
    /* accesses at gaps of 1..ttl ms, some recorded, most not */
    int64_t now = T_MS + 1200;
    for (int i = 0; i < 5000; i++) {
        now += (i * 37) % 1000 + 1;
        assert_ptr_equal(dx_session_find(S("every600"), now), s);
        assert_false(dx_session_expired(s, now + 1000)); /* a full ttl after this access */
        assert_int_equal(dx_session_sweep(now + 1000), 0);
    }
    /* and gone once ttl + the granularity passed since the last access */
    assert_true(dx_session_expired(s, now + 1000 + DX_TOUCH_GRANULARITY_MS + 1));
    assert_int_equal(dx_session_sweep(now + 1000 + DX_TOUCH_GRANULARITY_MS + 1), 1);
    assert_null(dx_session_find(S("every600"), now + 1000 + DX_TOUCH_GRANULARITY_MS + 1));
    /* made again after it expired but before the sweeper came by: `created' says it replaced an expired
     * session (the lock server is told only then); then it is the live one; a new id is just new */
    dx_session *again;
    int created = -1, limit = 0;
    int64_t late = T_MS + 1000 + DX_TOUCH_GRANULARITY_MS + 1;
    (void)mk_session("replaced600", 1000);
    assert_int_equal(dx_session_create(S("replaced600"), NULL, 0, 1000, T_US, late, &again, &created, &limit), DX_OK);
    assert_int_equal(created, 2);
    assert_int_equal(dx_session_create(S("replaced600"), NULL, 0, 1000, T_US, late, &again, &created, &limit), DX_OK);
    assert_int_equal(created, 0);
    assert_int_equal(dx_session_create(S("fresh600"), NULL, 0, 1000, T_US, late, &again, &created, &limit), DX_OK);
    assert_int_equal(created, 1);
    dx_ebr_exit();
    dx_ebr_reclaim(1);
}

static void test_register_set_versions(void **st) {
    dx_ebr_enter();
    dx_session *s = mk_session("v", -1);
    dx_var *v = reg_int(s, "x", 1, -1);
    assert_int_equal(dx_var_current(v)->version, 0);
    assert_int_equal(strncmp(v->id, "var_x_", 6), 0);
    /* duplicate */
    dx_constraints c;
    dx_constraints_init(&c);
    dx_value val = {.type = DX_T_INTEGER, .u.i = 9};
    dx_var_spec sp = {.name = S("x"), .type = DX_T_INTEGER, .cons = &c, .value = &val, .history_limit = -1};
    dx_var *o = NULL;
    int limit = 0;
    assert_int_equal(dx_var_register(s, &sp, T_US, &o, &limit), DX_E_EXISTS);
    uint64_t ver = 0;
    for (int i = 1; i <= 5; i++) {
        dx_value nv = {.type = DX_T_INTEGER, .u.i = 10 * i};
        assert_int_equal(dx_var_set(s, v, &nv, NULL, T_US + i, &ver, NULL, NULL), DX_OK);
        assert_int_equal(ver, (uint64_t)i);
    }
    /* optimistic locking */
    dx_set_opts o1 = {.has_expected = true, .expected = 3};
    dx_value nv = {.type = DX_T_INTEGER, .u.i = 7};
    assert_int_equal(dx_var_set(s, v, &nv, &o1, T_US, &ver, NULL, NULL), DX_E_VERSION_MISMATCH);
    assert_int_equal(ver, 5);
    assert_int_equal(cur_int(v), 50); /* unchanged */
    o1.expected = 5;
    assert_int_equal(dx_var_set(s, v, &nv, &o1, T_US, &ver, NULL, NULL), DX_OK);
    assert_int_equal(ver, 6);
    /* found by id as well as by name */
    assert_ptr_equal(dx_var_find(s, (dx_str){v->id, v->id_len}), v);
    assert_null(dx_var_find(s, S("var_x_999999")));
    assert_null(dx_var_find(s, S("var_y_1")));
    dx_session_delete(S("v"));
    dx_ebr_exit();
}

static void test_history_ring_and_rollback(void **st) {
    dx_ebr_enter();
    dx_session *s = mk_session("h", -1);
    dx_var *v = reg_int(s, "x", 0, 3);
    uint64_t ver;
    for (int i = 1; i <= 5; i++) {
        dx_value nv = {.type = DX_T_INTEGER, .u.i = i};
        assert_int_equal(dx_var_set(s, v, &nv, NULL, T_US, &ver, NULL, NULL), DX_OK);
    }
    dx_snap *h[10];
    long n = dx_var_history(s, v, h, 10);
    assert_int_equal(n, 3); /* bounded */
    assert_int_equal(h[0]->version, 4); /* newest first */
    assert_int_equal(h[2]->version, 2);
    assert_int_equal(h[2]->value.u.i, 2);
    assert_int_equal(dx_var_rollback(s, v, 1, NULL, T_US, &ver, NULL, NULL), DX_E_VERSION_NOT_FOUND); /* pruned */
    assert_int_equal(dx_var_rollback(s, v, 3, NULL, T_US, &ver, NULL, NULL), DX_OK);
    assert_int_equal(ver, 6); /* a NEW version */
    assert_int_equal(cur_int(v), 3);
    assert_int_equal(dx_var_rollback(s, v, 99, NULL, T_US, &ver, NULL, NULL), DX_E_VERSION_NOT_FOUND);
    dx_var *z = reg_int(s, "nohist", 1, 0);
    dx_value nv = {.type = DX_T_INTEGER, .u.i = 2};
    assert_int_equal(dx_var_set(s, z, &nv, NULL, T_US, &ver, NULL, NULL), DX_OK);
    assert_int_equal(dx_var_history(s, z, h, 10), 0);
    dx_session_delete(S("h"));
    dx_ebr_exit();
}

static int notified;
static void count_notify(void *ctx, dx_session *s, dx_var *v, const dx_snap *old, const dx_snap *cur) {
    assert_int_equal(cur->version, old->version + 1);
    notified++;
}
static int released;
static void count_release(void *w) { released++; }

static void test_batches(void **st) {
    dx_ebr_enter();
    dx_session *s = mk_session("b", -1);
    dx_var *a = reg_int(s, "a", 1, -1), *b = reg_int(s, "b", 2, -1);
    dx_set_item it[2] = {
        {.var = a, .value = {.type = DX_T_INTEGER, .u.i = 10}},
        {.var = b, .value = {.type = DX_T_INTEGER, .u.i = 20}, .opts = {.has_expected = true, .expected = 7}},
    };
    assert_int_equal(dx_var_set_many(s, it, 2, true, false, T_US, NULL, NULL), DX_E_BATCH);
    assert_int_equal(it[0].rc, DX_OK);
    assert_int_equal(it[1].rc, DX_E_VERSION_MISMATCH);
    assert_int_equal(cur_int(a), 1); /* nothing committed */
    assert_int_equal(cur_int(b), 2);
    assert_int_equal(dx_var_set_many(s, it, 2, false, false, T_US, NULL, NULL), DX_OK);
    assert_int_equal(cur_int(a), 10); /* the valid one committed */
    assert_int_equal(cur_int(b), 2);
    it[1].opts.expected = 0;
    it[0].value.u.i = 11;
    assert_int_equal(dx_var_set_many(s, it, 2, true, false, T_US, NULL, NULL), DX_OK);
    assert_int_equal(cur_int(a), 11);
    assert_int_equal(cur_int(b), 20);
    assert_int_equal(it[1].version, 1);
    /* check_only reports without committing, even when everything would pass */
    it[0].value.u.i = 12;
    it[1].opts.expected = 1;
    assert_int_equal(dx_var_set_many(s, it, 2, true, true, T_US, NULL, NULL), DX_E_BATCH);
    assert_int_equal(it[0].rc, DX_OK);
    assert_int_equal(it[1].rc, DX_OK);
    assert_int_equal(cur_int(a), 11);
    dx_set_item dup[2] = {{.var = a, .value = {.type = DX_T_INTEGER}}, {.var = a, .value = {.type = DX_T_INTEGER}}};
    assert_int_equal(dx_var_set_many(s, dup, 2, true, false, T_US, NULL, NULL), DX_E_INVALID);
    dx_session_delete(S("b"));
    dx_ebr_exit();
}

static void test_watchers_notify_and_release(void **st) {
    dx_store_set_watcher_release(count_release);
    notified = released = 0;
    dx_ebr_enter();
    dx_session *s = mk_session("w", -1);
    dx_var *a = reg_int(s, "a", 1, -1);
    static int w1, w2;
    assert_int_equal(dx_var_add_watcher(s, a, &w1), DX_OK);
    assert_int_equal(dx_var_add_watcher(s, a, &w2), DX_OK);
    uint64_t ver;
    dx_value nv = {.type = DX_T_INTEGER, .u.i = 5};
    assert_int_equal(dx_var_set(s, a, &nv, NULL, T_US, &ver, count_notify, NULL), DX_OK);
    assert_int_equal(notified, 1); /* once per commit; the callback fans out */
    assert_int_equal(dx_var_remove_watcher(s, a, &w1), 1);
    assert_int_equal(released, 1);
    assert_int_equal(dx_var_delete(s, S("a")), DX_OK);
    assert_int_equal(dx_var_delete(s, S("a")), DX_E_NOT_FOUND);
    assert_int_equal(dx_var_set(s, a, &nv, NULL, T_US, &ver, NULL, NULL), DX_E_NOT_FOUND); /* deleted meanwhile */
    dx_ebr_exit();
    dx_ebr_reclaim(1);
    dx_ebr_reclaim(1);
    assert_int_equal(released, 2); /* the remaining watcher went with the variable */
    dx_session_delete(S("w"));
    dx_store_set_watcher_release(NULL);
}

static void test_limits(void **st) {
    dx_limits saved = dx_store_limits(), l = saved;
    l.max_vars = 2;
    l.max_value_bytes = 8;
    dx_store_set_limits(&l);
    dx_ebr_enter();
    dx_session *s = mk_session("l", -1);
    reg_int(s, "a", 1, -1);
    reg_int(s, "b", 1, -1);
    dx_constraints c;
    dx_constraints_init(&c);
    dx_value val = {.type = DX_T_INTEGER};
    dx_var_spec sp = {.name = S("c"), .type = DX_T_INTEGER, .cons = &c, .value = &val, .history_limit = -1};
    dx_var *o;
    int limit = 0;
    assert_int_equal(dx_var_register(s, &sp, T_US, &o, &limit), DX_E_LIMIT);
    assert_int_equal(limit, DX_L_VARS);
    assert_int_equal(dx_var_delete(s, S("a")), DX_OK);
    dx_value big = {.type = DX_T_STRING, .u.s = {"0123456789", 10}};
    sp.type = DX_T_STRING;
    sp.value = &big;
    assert_int_equal(dx_var_register(s, &sp, T_US, &o, &limit), DX_E_LIMIT);
    assert_int_equal(limit, DX_L_VALUE_SIZE);
    char longname[300];
    memset(longname, 'n', sizeof longname);
    sp.name = (dx_str){longname, sizeof longname};
    assert_int_equal(dx_var_register(s, &sp, T_US, &o, &limit), DX_E_LIMIT);
    assert_int_equal(limit, DX_L_NAME_LENGTH);
    dx_session_delete(S("l"));
    dx_ebr_exit();
    dx_store_set_limits(&saved);
}

static void test_import_roundtrip(void **st) {
    dx_session *s = dx_import_begin(S("imp"), NULL, 0, -1, 42, T_MS);
    assert_non_null(s);
    dx_constraints c;
    dx_constraints_init(&c);
    dx_value cur = {.type = DX_T_INTEGER, .u.i = 30};
    dx_import_hist h[3] = {{.version = 1, .value = {.type = DX_T_INTEGER, .u.i = 10}},
                           {.version = 2, .value = {.type = DX_T_INTEGER, .u.i = 20}},
                           {.version = 4, .value = {.type = DX_T_INTEGER, .u.i = 25}}};
    dx_import_var iv = {.id = S("var_x_77"),
                        .spec = {.name = S("x"), .type = DX_T_INTEGER, .cons = &c, .value = &cur, .history_limit = 2},
                        .version = 5};
    int limit = 0;
    assert_int_equal(dx_import_var_add(s, &iv, h, 3, &limit), DX_OK);
    assert_int_equal(dx_import_commit(s, &limit), DX_OK);
    dx_ebr_enter();
    dx_session *f = dx_session_find(S("imp"), T_MS);
    assert_ptr_equal(f, s);
    dx_var *v = dx_var_find(f, S("var_x_77"));
    assert_non_null(v);
    assert_int_equal(dx_var_current(v)->version, 5);
    dx_snap *hs[4];
    assert_int_equal(dx_var_history(f, v, hs, 4), 2); /* only the newest history_limit kept */
    assert_int_equal(hs[0]->version, 4);
    assert_int_equal(hs[1]->version, 2);
    dx_ebr_exit();
    /* importing the same id again is refused and frees the copy */
    dx_session *s2 = dx_import_begin(S("imp"), NULL, 0, -1, 42, T_MS);
    assert_int_equal(dx_import_commit(s2, &limit), DX_E_EXISTS);
    dx_session_delete(S("imp"));
}

/* An import is held to what create and register enforce, plus what the copy
 * itself must satisfy: ids an id lookup resolves, versions a set can follow. */
static void test_import_refuses_what_register_would(void **st) {
    int limit = 0;
    assert_null(dx_import_begin(S(""), NULL, 0, -1, 42, T_MS));
    assert_int_equal(dx_session_id_check(S(""), &limit), DX_E_LIMIT);
    assert_int_equal(limit, DX_L_NAME_LENGTH);
    assert_null(dx_import_begin(S("\xff"), NULL, 0, -1, 42, T_MS));
    assert_int_equal(dx_session_id_check(S("\xff"), &limit), DX_E_INVALID_NAME);
    dx_session *s = dx_import_begin(S("imp2"), NULL, 0, -1, 42, T_MS);
    assert_non_null(s);
    dx_constraints c;
    dx_constraints_init(&c);
    dx_value cur = {.type = DX_T_INTEGER, .u.i = 1};
    dx_import_var iv = {.id = S("var_\xff\x01_1"), .spec = {.name = S("\xff\x01"), .type = DX_T_INTEGER, .cons = &c,
                                                             .value = &cur, .history_limit = 2}};
    assert_int_equal(dx_import_var_add(s, &iv, NULL, 0, &limit), DX_E_INVALID_NAME);
    iv.spec.name = S("x");
    const char *bad_ids[] = {"whatever", "var_x_", "var_x", "var_y_1", "var_x_1a", "var_x__1", "vax_x_1", "var_xx_1"};
    for (size_t i = 0; i < sizeof bad_ids / sizeof *bad_ids; i++) {
        iv.id = S(bad_ids[i]);
        assert_int_equal(dx_import_var_add(s, &iv, NULL, 0, &limit), DX_E_INVALID);
    }
    iv.id = S("var_x_12");
    iv.version = DX_VERSION_MAX + 1;
    assert_int_equal(dx_import_var_add(s, &iv, NULL, 0, &limit), DX_E_INVALID);
    assert_int_equal(dx_session_nvars(s), 0);
    /* the highest version imports; a set past it is refused, never wraps to 0 */
    iv.version = DX_VERSION_MAX;
    assert_int_equal(dx_import_var_add(s, &iv, NULL, 0, &limit), DX_OK);
    iv.id = S("var_x_13"); /* same name: refused, so no two variables share an id */
    assert_int_equal(dx_import_var_add(s, &iv, NULL, 0, &limit), DX_E_EXISTS);
    assert_int_equal(dx_import_commit(s, &limit), DX_OK);
    dx_ebr_enter();
    dx_var *v = dx_var_find(s, S("var_x_12"));
    assert_non_null(v);
    dx_value nv = {.type = DX_T_INTEGER, .u.i = 2};
    uint64_t ver = 0;
    assert_int_equal(dx_var_set(s, v, &nv, NULL, T_US, &ver, NULL, NULL), DX_E_VERSION_LIMIT);
    assert_int_equal(dx_var_rollback(s, v, DX_VERSION_MAX, NULL, T_US, &ver, NULL, NULL), DX_E_VERSION_LIMIT);
    dx_set_item it = {.var = v, .value = nv};
    assert_int_equal(dx_var_set_many(s, &it, 1, false, false, T_US, NULL, NULL), DX_OK);
    assert_int_equal(it.rc, DX_E_VERSION_LIMIT);
    assert_true(dx_var_current(v)->version == DX_VERSION_MAX);
    assert_int_equal(dx_var_current(v)->value.u.i, 1);
    dx_ebr_exit();
    dx_session_delete(S("imp2"));
}

static void test_optimizer_locks(void **st) {
    dx_ebr_enter();
    dx_session *s = mk_session("locks", -1);
    dx_var *v = reg_int(s, "x", 0, -1);
    uint64_t t1 = 0, t2 = 0, ver;
    assert_int_equal(dx_var_lock(s, v, 0, (const uint8_t *)"opt1", 4, &t1, NULL), DX_OK);
    assert_true(t1 > 0);
    /* held: a second lock without the current token is refused and names it */
    assert_int_equal(dx_var_lock(s, v, 0, (const uint8_t *)"opt2", 4, &t2, NULL), DX_E_LOCKED);
    assert_int_equal(t2, t1);
    /* the refusal captured its holder in the same critical section */
    const uint8_t *h;
    size_t hl;
    dx_last_lock_holder(&h, &hl);
    assert_int_equal(hl, 4);
    assert_memory_equal(h, "opt1", 4);
    dx_value nv = {.type = DX_T_INTEGER, .u.i = 1};
    assert_int_equal(dx_var_set(s, v, &nv, NULL, T_US, &ver, NULL, NULL), DX_E_LOCKED);
    dx_set_opts o = {.lock_token = t1};
    assert_int_equal(dx_var_set(s, v, &nv, &o, T_US, &ver, NULL, NULL), DX_OK);
    assert_int_equal(dx_var_delete(s, S("x")), DX_E_LOCKED);
    /* preemption: locking with the holder's token hands over to a newer token */
    assert_int_equal(dx_var_lock(s, v, t1, (const uint8_t *)"opt2", 4, &t2, NULL), DX_OK);
    assert_true(t2 > t1);
    /* the old token while another holds the lock: stale, not {locked, Holder} */
    assert_int_equal(dx_var_set(s, v, &nv, &o, T_US, &ver, NULL, NULL), DX_E_STALE_LOCK);
    assert_int_equal(dx_var_set(s, v, &nv, NULL, T_US, &ver, NULL, NULL), DX_E_LOCKED); /* no token */
    dx_set_item it = {.var = v, .value = nv, .opts = o};
    assert_int_equal(dx_var_set_many(s, &it, 1, true, false, T_US, NULL, NULL), DX_E_BATCH);
    assert_int_equal(it.rc, DX_E_STALE_LOCK);
    assert_int_equal(dx_var_rollback(s, v, 1, &o, T_US, &ver, NULL, NULL), DX_E_STALE_LOCK);
    assert_int_equal(dx_var_unlock(s, v, t1), DX_E_STALE_LOCK);
    assert_int_equal(dx_var_unlock(s, v, t2), DX_OK);
    o.lock_token = t2;
    assert_int_equal(dx_var_set(s, v, &nv, &o, T_US, &ver, NULL, NULL), DX_E_STALE_LOCK);
    assert_int_equal(dx_var_set(s, v, &nv, NULL, T_US, &ver, NULL, NULL), DX_OK);
    assert_int_equal(dx_var_lock(s, v, 0, NULL, 0, &t1, NULL), DX_OK); /* freed with the variable below */
    dx_session_delete(S("locks"));
    dx_ebr_exit();
}

static void test_token_bucket(void **st) {
    dx_ebr_enter();
    dx_session *s = mk_session("bucket", -1);
    assert_int_equal(dx_session_take(s, 0), DX_OK); /* off by default */
    dx_session_set_rate(s, 2.0, 3.0);               /* 2 per second, bursts of 3 */
    int64_t t = 1000000000;
    for (int i = 0; i < 3; i++) assert_int_equal(dx_session_take(s, t), DX_OK);
    assert_int_equal(dx_session_take(s, t), DX_E_RATE_LIMITED);
    assert_int_equal(dx_session_take(s, t + 250000000), DX_E_RATE_LIMITED); /* half a token */
    assert_int_equal(dx_session_take(s, t + 500000000), DX_OK);             /* the other half */
    double rate, burst, tokens;
    dx_session_get_rate(s, t + 500000000, &rate, &burst, &tokens);           /* read, nothing taken */
    assert_true(rate == 2.0 && burst == 3.0 && tokens == 0.0);
    dx_session_get_rate(s, t + 1500000000, &rate, &burst, &tokens);          /* refilled as take would */
    assert_true(tokens == 2.0);
    dx_session_get_rate(s, t + 10000000000, &rate, &burst, &tokens);         /* capped at the burst */
    assert_true(tokens == 3.0);
    assert_int_equal(dx_session_take(s, t + 10000000000), DX_OK);           /* capped at the burst */
    assert_int_equal(dx_session_take(s, t + 10000000000), DX_OK);
    assert_int_equal(dx_session_take(s, t + 10000000000), DX_OK);
    assert_int_equal(dx_session_take(s, t + 10000000000), DX_E_RATE_LIMITED);
    dx_session_delete(S("bucket"));
    dx_ebr_exit();
}

/* A snapshot counts its value's NaNs and infinities once, at creation (the
 * external size of the value follows from the count without its data). */
static void test_snapshot_counts_nonfinite(void **st) {
    double d[] = {1.0, NAN, INFINITY, -INFINITY, -0.0, 1e308, -NAN};
    int64_t shape[] = {7};
    dx_value e = {.type = DX_T_EMBEDDING, .u.v = {.data = d, .n = 7}};
    dx_value t = {.type = DX_T_TENSOR, .u.v = {.data = d, .n = 7, .shape = shape, .ndim = 1}};
    dx_value few = {.type = DX_T_EMBEDDING, .u.v = {.data = d, .n = 1}};
    dx_value f = {.type = DX_T_FLOAT, .u.f = NAN}; /* a scalar needs no count */
    dx_value none = {.type = DX_T_EMBEDDING, .u.v = {.data = NULL, .n = 0}};
    const struct {
        dx_value *v;
        uint32_t want;
    } cases[] = {{&e, 4}, {&t, 4}, {&few, 0}, {&f, 0}, {&none, 0}};
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        dx_snap *sn = dx_snap_new(cases[i].v, 1, T_US, NULL, 0, NULL, 0);
        assert_non_null(sn);
        assert_int_equal(sn->nonfinite, cases[i].want);
        dx_snap_release(sn);
    }
}

static void count_visit(void *ctx, const dx_var_stat *e) {
    assert_int_equal(e->updated_at, e->cur->updated_at); /* filled before the call */
    (*(size_t *)ctx)++;
}

/* A page of the session by name, from dx_session_var_stats +
 * dx_var_stats_page, is the same slice as dx_session_vars_sorted gives; the
 * stats carry each variable's watchers and archived versions; latest is
 * newest first, ties by the greater name. */
static void test_page_of_a_session(void **st) {
    static int w;
    dx_store_set_watcher_release(NULL);
    dx_ebr_enter();
    dx_session *s = mk_session("page", -1);
    /* names registered in a scrambled order; some prefixes of others, some
     * with bytes >= 0x80 (bytewise order, shorter first) */
    enum { N = 300 };
    char name[32];
    for (int i = 0; i < N; i++) {
        int j = (i * 97) % N;
        snprintf(name, sizeof name, j % 3 == 0 ? "v%d" : j % 3 == 1 ? "v%d\xc3\xa9" : "v%dx", j / 3);
        dx_constraints c;
        dx_constraints_init(&c);
        dx_value val = {.type = DX_T_INTEGER, .u.i = j};
        dx_var_spec sp = {.name = S(name), .type = DX_T_INTEGER, .cons = &c, .value = &val, .history_limit = -1};
        dx_var *out = NULL;
        int limit = 0;
        /* two variables per microsecond: ties of updated_at */
        assert_int_equal(dx_var_register(s, &sp, T_US + j / 2, &out, &limit), DX_OK);
    }
    /* names equal in their first 8 bytes, or ending in NUL bytes (the
     * prefix key pads with zeros: only the bytes themselves can order them) */
    static const dx_str odd[] = {{"p", 1}, {"p\0", 2}, {"p\0\0\0\0\0\0\0\0", 9}, {"p\1", 2},
                                 {"longprefix_b", 12}, {"longprefix_a", 12}, {"longprefi", 9}};
    enum { NODD = sizeof odd / sizeof odd[0] };
    for (int i = 0; i < NODD; i++) {
        dx_constraints c;
        dx_constraints_init(&c);
        dx_value val = {.type = DX_T_INTEGER, .u.i = i};
        dx_var_spec sp = {.name = odd[i], .type = DX_T_INTEGER, .cons = &c, .value = &val, .history_limit = -1};
        dx_var *out = NULL;
        int limit = 0;
        assert_int_equal(dx_var_register(s, &sp, T_US, &out, &limit), DX_OK);
    }
    dx_var *a = dx_var_find(s, S("v7x")), *b = dx_var_find(s, S("v0"));
    assert_int_equal(dx_var_add_watcher(s, a, &w), DX_OK);
    assert_int_equal(dx_var_add_watcher(s, a, &w), DX_OK);
    uint64_t ver;
    dx_value nv = {.type = DX_T_INTEGER, .u.i = -1};
    for (int i = 0; i < 3; i++) assert_int_equal(dx_var_set(s, b, &nv, NULL, T_US + 1000 + i, &ver, NULL, NULL), DX_OK);
    assert_int_equal(dx_var_delete(s, S("v1")), DX_OK); /* a deleted variable is in no page */

    size_t n = 0, total = 0;
    dx_var **sorted = dx_session_vars_sorted(s, &n);
    assert_non_null(sorted);
    assert_int_equal(n, N - 1 + NODD);
    size_t cases[][2] = {{0, 10}, {0, N + NODD}, {5, 1}, {100, 50}, {N - 11, 500}, {N - 2, 1}, {N - 1, 5},
                         {N + NODD - 2, 1}, {N + 7, 5}, {0, 0}, {42, SIZE_MAX}, {280, 20}};
    for (size_t c = 0; c < sizeof cases / sizeof cases[0]; c++) {
        dx_var_stat *st_ = dx_session_var_stats(s, &total, NULL, NULL);
        assert_non_null(st_);
        assert_int_equal(total, N - 1 + NODD);
        size_t off = cases[c][0], lim = cases[c][1];
        size_t got = dx_var_stats_page(st_, total, off, lim);
        size_t want = off >= n ? 0 : (lim > n - off ? n - off : lim);
        assert_int_equal(got, want);
        for (size_t i = 0; i < got; i++) assert_ptr_equal(st_[off + i].var, sorted[off + i]);
        free(st_);
    }
    size_t visited = 0;
    dx_var_stat *all = dx_session_var_stats(s, &total, count_visit, &visited);
    assert_int_equal(visited, total);
    size_t watched = 0, hist = 0;
    for (size_t i = 0; i < total; i++) {
        assert_ptr_equal(all[i].cur, dx_var_current(all[i].var));
        assert_int_equal(all[i].updated_at, all[i].cur->updated_at);
        watched += all[i].nwatchers;
        hist += all[i].nhist;
        if (all[i].var == a) assert_int_equal(all[i].nwatchers, 2);
        if (all[i].var == b) assert_int_equal(all[i].nhist, 3);
    }
    assert_int_equal(watched, 2);
    assert_int_equal(hist, 3);
    /* newest first: v0 (written last), then the two of the last microsecond,
     * the greater name first */
    dx_var_stat top[4];
    assert_int_equal(dx_var_stats_latest(all, total, top, 4), 4);
    assert_ptr_equal(top[0].var, b);
    for (int i = 1; i < 4; i++) {
        assert_true(top[i - 1].cur->updated_at >= top[i].cur->updated_at);
        if (i > 1 && top[i - 1].cur->updated_at == top[i].cur->updated_at)
            assert_true(strcmp(top[i - 1].var->name, top[i].var->name) > 0);
    }
    assert_int_equal(top[1].cur->updated_at, T_US + (N - 1) / 2);
    assert_int_equal(dx_var_stats_latest(all, total, top, 0), 0);
    assert_int_equal(dx_var_stats_latest(all, 2, top, 4), 2);
    free(all);
    free(sorted);
    dx_ebr_exit();
    dx_session_delete(S("page"));
    dx_ebr_reclaim(1);
    dx_ebr_reclaim(1);
}

static int deny_all(void *ctx, const dx_var *v, void *acl) {
    (*(int *)ctx)++;
    return 0;
}

static void test_acl_hook_in_write_path(void **st) {
    dx_ebr_enter();
    dx_session *s = mk_session("aclhook", -1);
    dx_var *v = reg_int(s, "x", 0, -1);
    int calls = 0;
    uint64_t ver;
    dx_value nv = {.type = DX_T_INTEGER, .u.i = 1};
    dx_set_opts o = {.acl_check = deny_all, .acl_ctx = &calls};
    assert_int_equal(dx_var_set(s, v, &nv, &o, T_US, &ver, NULL, NULL), DX_E_DENIED);
    assert_int_equal(calls, 1);
    assert_int_equal(cur_int(v), 0);
    uint64_t tok;
    assert_int_equal(dx_var_lock(s, v, 0, NULL, 0, &tok, &o), DX_E_DENIED);
    assert_int_equal(calls, 2);
    dx_session_delete(S("aclhook"));
    dx_ebr_exit();
}

/* ---- concurrency: readers chase writers that replace, delete and re-create ---- */

#define ROUNDS 20000
static atomic_int stop;
static atomic_long reads;
static dx_session *cs;

static void *reader(void *arg) {
    long seen = 0;
    while (!atomic_load(&stop)) {
        dx_ebr_enter();
        dx_var *v = dx_var_find(cs, S("hot"));
        if (v) {
            dx_snap *sn = dx_var_current(v);
            /* snapshot invariant written by the writer: value == version * 3 */
            if (sn->value.u.i != (int64_t)sn->version * 3) abort();
            seen++;
            atomic_fetch_add(&reads, 1);
        }
        dx_ebr_exit();
    }
    return (void *)seen;
}

static void *churner(void *arg) {
    for (int i = 0; i < ROUNDS / 10; i++) {
        dx_ebr_enter();
        char name[32];
        snprintf(name, sizeof name, "tmp%d", i % 50);
        dx_var_delete(cs, S(name));
        dx_constraints c;
        dx_constraints_init(&c);
        dx_value val = {.type = DX_T_INTEGER, .u.i = i};
        dx_var_spec sp = {.name = S(name), .type = DX_T_INTEGER, .cons = &c, .value = &val, .history_limit = 2};
        dx_var *o;
        int limit;
        dx_var_register(cs, &sp, T_US, &o, &limit);
        dx_constraints_free(&c);
        dx_ebr_exit();
    }
    return NULL;
}

static void test_concurrent_readers_writers(void **st) {
    int rounds = getenv("DX_TEST_SCALE") ? ROUNDS / 10 : ROUNDS;
    dx_ebr_enter();
    cs = mk_session("conc", -1);
    dx_var *hot = reg_int(cs, "hot", 0, 4);
    dx_ebr_exit();
    pthread_t r[3], c;
    atomic_store(&stop, 0);
    for (int i = 0; i < 3; i++) pthread_create(&r[i], NULL, reader, NULL);
    pthread_create(&c, NULL, churner, NULL);
    for (int i = 1; i <= rounds; i++) {
        dx_ebr_enter();
        dx_value nv = {.type = DX_T_INTEGER, .u.i = (int64_t)i * 3};
        uint64_t ver;
        assert_int_equal(dx_var_set(cs, hot, &nv, NULL, T_US, &ver, NULL, NULL), DX_OK);
        assert_int_equal(ver, (uint64_t)i);
        dx_ebr_exit();
    }
    pthread_join(c, NULL);
    /* let readers overlap the writes for sure, even under valgrind's serial threads */
    while (atomic_load(&reads) < 1000) sched_yield();
    atomic_store(&stop, 1);
    long total = 0;
    for (int i = 0; i < 3; i++) {
        void *seen;
        pthread_join(r[i], &seen);
        total += (long)seen;
    }
    assert_true(total > 0);
    dx_ebr_enter();
    assert_int_equal(dx_var_current(hot)->version, (uint64_t)rounds);
    dx_ebr_exit();
    dx_session_delete(S("conc"));
    dx_ebr_reclaim(1);
    dx_ebr_reclaim(1);
    assert_int_equal(dx_ebr_pending(), 0); /* everything retired was freed */
}

/* ---- EBR without a global lock: per-thread retire lists ------------------- */

static _Atomic int freed_count;
static void count_free(void *p) {
    free(p);
    atomic_fetch_add(&freed_count, 1);
}

typedef struct {
    _Atomic int in, leave;
} reader_gate;

static void *gate_reader(void *arg) {
    reader_gate *g = arg;
    dx_ebr_enter();
    atomic_store(&g->in, 1);
    while (!atomic_load(&g->leave)) sched_yield();
    dx_ebr_exit();
    return NULL;
}

static void *retire_n(void *arg) {
    long n = (long)arg;
    for (long i = 0; i < n; i++) dx_ebr_retire(malloc(16), count_free, 0);
    return NULL;
}

/* An object retired while another thread reads is kept until that reader
 * leaves; objects retired by a thread that has since exited are freed by a
 * reclaim on another thread; two threads retiring at once lose nothing. */
static void test_ebr_per_thread_lists(void **st) {
    dx_ebr_reclaim(1);
    dx_ebr_reclaim(1);
    size_t base = dx_ebr_pending();
    atomic_store(&freed_count, 0);
    reader_gate g = {0};
    pthread_t r;
    pthread_create(&r, NULL, gate_reader, &g);
    while (!atomic_load(&g.in)) sched_yield();
    pthread_t w[2];
    for (int i = 0; i < 2; i++) pthread_create(&w[i], NULL, retire_n, (void *)1000L);
    for (int i = 0; i < 2; i++) pthread_join(w[i], NULL);
    dx_ebr_reclaim(0);
    dx_ebr_reclaim(0);
    /* the reader entered before every retire: nothing may be freed yet */
    assert_int_equal(atomic_load(&freed_count), 0);
    assert_int_equal(dx_ebr_pending(), base + 2000);
    atomic_store(&g.leave, 1);
    pthread_join(r, NULL);
    dx_ebr_reclaim(0);
    dx_ebr_reclaim(0);
    assert_int_equal(atomic_load(&freed_count), 2000);
    assert_int_equal(dx_ebr_pending(), base);
}

/* Heavy objects are left to dx_ebr_reclaim(1), whichever thread retired them. */
static void test_ebr_heavy_only_on_full_reclaim(void **st) {
    atomic_store(&freed_count, 0);
    pthread_t w;
    pthread_create(&w, NULL, retire_n, (void *)0L);
    pthread_join(w, NULL);
    dx_ebr_retire(malloc(8), count_free, 1);
    dx_ebr_reclaim(0);
    dx_ebr_reclaim(0);
    assert_int_equal(atomic_load(&freed_count), 0);
    dx_ebr_reclaim(1);
    assert_int_equal(atomic_load(&freed_count), 1);
}

/* The commit hook runs for every commit (watchers or not), under the shard
 * mutex; a reference it takes keeps a snapshot alive after the variable, its
 * history entry and the session are gone. */
typedef struct {
    int calls;
    dx_snap *kept_old, *kept_cur;
} keep_ctx;

static void keep_hook(void *ctx, dx_session *s, dx_var *v, const dx_snap *old, const dx_snap *cur) {
    keep_ctx *k = ctx;
    k->calls++;
    if (!k->kept_old) {
        dx_snap_retain(old);
        dx_snap_retain(cur);
        k->kept_old = (dx_snap *)old;
        k->kept_cur = (dx_snap *)cur;
    }
}

static void test_snapshot_refs_outlive_variable(void **st) {
    dx_session *s = mk_session("refs", -1);
    dx_ebr_enter();
    dx_var *v = reg_int(s, "x", 7, 0); /* no history: the old version is retired at once */
    keep_ctx k = {0};
    uint64_t ver = 0;
    dx_value val = {.type = DX_T_INTEGER, .u.i = 8};
    assert_int_equal(dx_var_set(s, v, &val, NULL, T_US, &ver, keep_hook, &k), DX_OK);
    val.u.i = 9;
    assert_int_equal(dx_var_set(s, v, &val, NULL, T_US, &ver, keep_hook, &k), DX_OK);
    assert_int_equal(k.calls, 2);
    dx_ebr_exit();
    assert_int_equal(dx_session_delete(S("refs")), DX_OK);
    dx_ebr_reclaim(1);
    dx_ebr_reclaim(1);
    /* freed by now without the references; valgrind/ASan check these reads */
    assert_int_equal(k.kept_old->value.u.i, 7);
    assert_int_equal(k.kept_cur->value.u.i, 8);
    assert_int_equal(k.kept_cur->version, 1);
    dx_snap_release(k.kept_old);
    dx_snap_release(k.kept_cur);
}

/* How readers announce is decided once per process: DX_EBR_MEMBARRIER=0
 * forces seq_cst announcements (make test runs this file once in each mode,
 * so both paths go through test_concurrent_readers_writers). */
static void test_ebr_mode_follows_the_environment(void **state) {
    (void)state;
    const char *env = getenv("DX_EBR_MEMBARRIER");
    int m = dx_ebr_uses_membarrier();
    assert_true(m == 0 || m == 1);
    if (env && env[0] == '0') assert_int_equal(m, 0);
    assert_int_equal(dx_ebr_uses_membarrier(), m); /* decided once */
}

/* The measure's spinning thread may start after the measure is over (a
 * loaded machine, ASan): it must then stop at once, not spin forever while
 * the measuring thread waits for it (which hung test_lock_floor under ASan).
 * With no wait at all the spinner is nearly always late. */
static void test_ebr_probe_with_a_late_spinner_returns(void **state) {
    (void)state;
    for (int i = 0; i < 200; i++) {
        int r = dx_ebr_membarrier_probe(0);
        assert_true(r == 0 || r == 1);
    }
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_ebr_mode_follows_the_environment),
        cmocka_unit_test(test_ebr_probe_with_a_late_spinner_returns),
        cmocka_unit_test(test_session_lifecycle),       cmocka_unit_test(test_ttl_and_sweep),
        cmocka_unit_test(test_touch_refreshes),         cmocka_unit_test(test_register_set_versions),
        cmocka_unit_test(test_ttl_counts_from_the_last_access),
        cmocka_unit_test(test_history_ring_and_rollback), cmocka_unit_test(test_batches),
        cmocka_unit_test(test_watchers_notify_and_release), cmocka_unit_test(test_limits),
        cmocka_unit_test(test_import_roundtrip),        cmocka_unit_test(test_import_refuses_what_register_would),        cmocka_unit_test(test_concurrent_readers_writers),
        cmocka_unit_test(test_optimizer_locks),         cmocka_unit_test(test_token_bucket),
        cmocka_unit_test(test_acl_hook_in_write_path),
        cmocka_unit_test(test_ebr_per_thread_lists),    cmocka_unit_test(test_ebr_heavy_only_on_full_reclaim),
        cmocka_unit_test(test_snapshot_refs_outlive_variable),
        cmocka_unit_test(test_page_of_a_session),       cmocka_unit_test(test_snapshot_counts_nonfinite),
    };
    return cmocka_run_group_tests_name("store", tests, setup, teardown);
}
