/* The lock registry: what dspex_locks needs to rebuild its state after a
 * restart. The core keeps only a variable's lock token and holder (for the
 * write path); here every lock granted through var_lock/6 is kept by token
 * with its session, variable name, holder and the server's meta term (the
 * holder pid, priority, lease, ...). Entries go when the lock is unlocked or
 * replaced (preemption), and lock_list/0 drops those whose lock the core no
 * longer holds (variable or session deleted). Process-global, like the store:
 * it outlives the lock server and is shared across a NIF upgrade. */
#include "nif.h"
#include <pthread.h>
#include <stdlib.h>

#define REG_BUCKETS 256

typedef struct reg_entry {
    struct reg_entry *next;
    uint64_t token;
    size_t sid_len, name_len, holder_len, meta_len;
    uint8_t data[]; /* sid, name, holder, meta */
} reg_entry;

static reg_entry *g_reg[REG_BUCKETS];
static pthread_mutex_t g_reg_mu = PTHREAD_MUTEX_INITIALIZER;

static reg_entry **bucket(uint64_t token) { return &g_reg[(token * 0x9e3779b97f4a7c15ull) >> 56]; }

int dx_lockreg_put(uint64_t token, dx_str sid, dx_str name, const uint8_t *holder, size_t hlen, const uint8_t *meta,
                   size_t mlen) {
    reg_entry *e = malloc(sizeof *e + sid.len + name.len + hlen + mlen);
    if (!e) return -1;
    e->token = token;
    e->sid_len = sid.len;
    e->name_len = name.len;
    e->holder_len = hlen;
    e->meta_len = mlen;
    uint8_t *p = e->data;
    memcpy(p, sid.ptr, sid.len), p += sid.len;
    memcpy(p, name.ptr, name.len), p += name.len;
    if (hlen) memcpy(p, holder, hlen), p += hlen;
    if (mlen) memcpy(p, meta, mlen);
    pthread_mutex_lock(&g_reg_mu);
    reg_entry **b = bucket(token);
    e->next = *b;
    *b = e;
    pthread_mutex_unlock(&g_reg_mu);
    return 0;
}

void dx_lockreg_drop(uint64_t token) {
    reg_entry *gone = NULL;
    pthread_mutex_lock(&g_reg_mu);
    for (reg_entry **b = bucket(token); *b; b = &(*b)->next)
        if ((*b)->token == token) {
            gone = *b;
            *b = gone->next;
            break;
        }
    pthread_mutex_unlock(&g_reg_mu);
    free(gone);
}

void dx_lockreg_clear(void) {
    pthread_mutex_lock(&g_reg_mu);
    for (int i = 0; i < REG_BUCKETS; i++) {
        for (reg_entry *e = g_reg[i], *n; e; e = n) {
            n = e->next;
            free(e);
        }
        g_reg[i] = NULL;
    }
    pthread_mutex_unlock(&g_reg_mu);
}

/* Whether the core still holds this lock (inside an EBR section). */
static int still_held(const reg_entry *e) {
    dx_str sid = {(const char *)e->data, e->sid_len}, name = {(const char *)e->data + e->sid_len, e->name_len};
    dx_session *s = dx_session_find(sid, dx_now_ms());
    dx_var *v = s ? dx_var_find_name(s, name) : NULL;
    return v && dx_var_lock_current(s, v) == e->token;
}

/* lock_list() -> [{Session, Name, Token, Holder, Meta}]: every lock the core
 * still holds; entries of locks gone with their variable are dropped. Dirty:
 * it walks every entry (called once when dspex_locks starts). */
DX_NIF(nif_lock_list) {
    ERL_NIF_TERM l = enif_make_list(env, 0);
    dx_ebr_enter();
    pthread_mutex_lock(&g_reg_mu);
    for (int i = 0; i < REG_BUCKETS; i++) {
        for (reg_entry **b = &g_reg[i]; *b;) {
            reg_entry *e = *b;
            if (!still_held(e)) {
                *b = e->next;
                free(e);
                continue;
            }
            const uint8_t *p = e->data;
            ERL_NIF_TERM sid = dx_make_bin(env, (const char *)p, e->sid_len);
            ERL_NIF_TERM name = dx_make_bin(env, (const char *)p + e->sid_len, e->name_len);
            p += e->sid_len + e->name_len;
            ERL_NIF_TERM holder = dx_blob_to_term(env, p, e->holder_len, ATOM_undefined);
            ERL_NIF_TERM meta = dx_blob_to_term(env, p + e->holder_len, e->meta_len, ATOM_undefined);
            l = enif_make_list_cell(env, enif_make_tuple5(env, sid, name, enif_make_uint64(env, e->token), holder, meta), l);
            b = &e->next;
        }
    }
    pthread_mutex_unlock(&g_reg_mu);
    dx_ebr_exit();
    return l;
}
