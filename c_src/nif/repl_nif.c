/* Owner-side replication fast path (issue #21): per-session descriptors
 * and per-link native queues of replication records.
 *
 * A session's writer (dspex_cluster_writer) publishes a descriptor once it
 * owns the session settled under the current view: epoch, the session's
 * replication seq, the view generation, the replica links (one per replica,
 * at most RD_MAX_LINKS) and the mode (sync or async). A caller setting such a
 * session runs repl_set/6 itself: under the descriptor's mutex the store
 * commits the set and the record (the caller's reply address, session, key,
 * value, version, epoch, seq, start time, event seq, how many links answer
 * the caller) is appended to every link's queue, all or nothing (the links
 * locked in ascending id order, room made in each before any append), so
 * two callers of one session ship in commit order on each link. A link's
 * shipper is woken by one message when its queue goes non-empty and drains
 * it with repl_drain/1. Sync: the caller waits for the shippers' answer;
 * async: it is answered once the record is queued.
 *
 * Read index (sync): `announced' is raised before the commit (and lowered
 * again if the set fails) under the same mutex, so a read that sees the
 * change also sees it announced (dspex_cluster_shipper:await_committed/2).
 * Async sets announce nothing (async reads never wait).
 *
 * Unsettling (repl_unsettle/1) takes the descriptor's mutex, so a set in
 * flight finishes (commit and append) first; from then on repl_set/6 answers
 * `slow' and the caller goes through the writer. The entry stays (its epoch,
 * seq and announced readable) until repl_forget/1. */
#include "events_nif.h"
#include "nif.h"
#include <pthread.h>
#include <stdlib.h>
#include <string.h>

#define RL_MAX_LINKS 1024 /* replica nodes ever linked to in the VM's life */
#define RL_MAX_QUEUE 65536
#define RL_DRAIN_NORMAL 2048 /* more records than this are copied on a dirty scheduler */
#define RD_BUCKETS 4096
#define RD_MAX_LINKS 16 /* replicas of one session on the fast path */

typedef struct {
    pthread_mutex_t mu;
    char name[256];
    size_t nlen;
    ErlNifPid pid;
    int open;
    ErlNifEnv *qenv;
    ERL_NIF_TERM *q;
    size_t n, cap;
} rlink;

typedef struct rdesc {
    struct rdesc *next;
    uint64_t hash;
    size_t sidlen;
    pthread_mutex_t mu; /* held across commit and append */
    int settled;
    int async; /* async replication: the caller does not wait, reads do not either */
    uint64_t epoch, seq, gen;
    int nlinks;
    int links[RD_MAX_LINKS]; /* ascending: locked in that order */
    _Atomic uint64_t announced; /* seq announced for reads (>= seq) */
    _Atomic uint64_t aepoch;
    char sid[];
} rdesc;

static rlink *g_links[RL_MAX_LINKS];
static _Atomic int g_nlinks;
static pthread_mutex_t g_links_mu = PTHREAD_MUTEX_INITIALIZER;
static rdesc *g_desc[RD_BUCKETS];
static pthread_rwlock_t g_desc_lock = PTHREAD_RWLOCK_INITIALIZER;
static _Atomic uint64_t g_fast_sets, g_refused_full;

static uint64_t sid_hash(const char *p, size_t n) {
    uint64_t h = 1469598103934665603ULL;
    for (size_t i = 0; i < n; i++) h = (h ^ (uint8_t)p[i]) * 1099511628211ULL;
    return h;
}

/* Under g_desc_lock (read or write). */
static rdesc *desc_find(const char *sid, size_t n, uint64_t h) {
    for (rdesc *d = g_desc[h % RD_BUCKETS]; d; d = d->next)
        if (d->hash == h && d->sidlen == n && !memcmp(d->sid, sid, n)) return d;
    return NULL;
}

/* Takes g_desc_lock for reading (the caller unlocks it) and returns the descriptor of session b, or NULL. */
static rdesc *desc_rdlock(const ErlNifBinary *b) {
    pthread_rwlock_rdlock(&g_desc_lock);
    return desc_find((const char *)b->data, b->size, sid_hash((const char *)b->data, b->size));
}

static int get_bin(ErlNifEnv *env, ERL_NIF_TERM t, ErlNifBinary *b) { return enif_inspect_binary(env, t, b); }

static int get_link(ErlNifEnv *env, ERL_NIF_TERM t, rlink **out) {
    int i;
    if (!enif_get_int(env, t, &i) || i < 0 || i >= atomic_load(&g_nlinks)) return 0;
    *out = g_links[i];
    return 1;
}

static rlink *link_by_name(const char *name, size_t n, int *id) {
    for (int i = 0; i < atomic_load(&g_nlinks); i++)
        if (g_links[i]->nlen == n && !memcmp(g_links[i]->name, name, n)) {
            *id = i;
            return g_links[i];
        }
    return NULL;
}

/* repl_link_open(Node) -> {ok, LinkId, Records}: the caller is the link's
 * shipper from now on and takes the records queued for a previous shipper
 * (more than RL_DRAIN_NORMAL of them copied on a dirty scheduler). */
DX_NIF(nif_repl_link_open) {
    char name[256];
    int len = enif_get_atom(env, argv[0], name, sizeof name, ERL_NIF_LATIN1);
    if (len <= 0) return enif_make_badarg(env);
    pthread_mutex_lock(&g_links_mu);
    int id;
    rlink *l = link_by_name(name, (size_t)len - 1, &id);
    if (!l) {
        int n = atomic_load(&g_nlinks);
        if (n == RL_MAX_LINKS || !(l = calloc(1, sizeof *l))) {
            pthread_mutex_unlock(&g_links_mu);
            return dx_error(env, enif_make_atom(env, "too_many_links"));
        }
        pthread_mutex_init(&l->mu, NULL);
        memcpy(l->name, name, (size_t)len - 1);
        l->nlen = (size_t)len - 1;
        id = n;
        g_links[n] = l;
        atomic_store(&g_nlinks, n + 1);
    }
    pthread_mutex_unlock(&g_links_mu);
    pthread_mutex_lock(&l->mu);
    /* the previous shipper's records (up to RL_MAX_QUEUE: copying 65536 took some 190 ms) are copied on a
     * dirty scheduler when there are many: decided under the mutex that takes them, the call is made again
     * there (finding the link above is idempotent) */
    if (l->n > RL_DRAIN_NORMAL && !dx_on_dirty()) {
        pthread_mutex_unlock(&l->mu);
        return enif_schedule_nif(env, "repl_link_open", ERL_NIF_DIRTY_JOB_CPU_BOUND, nif_repl_link_open, argc, argv);
    }
    enif_self(env, &l->pid);
    l->open = 1;
    ErlNifEnv *qenv = l->qenv;
    ERL_NIF_TERM *q = l->q;
    size_t n = l->n;
    l->qenv = NULL;
    l->q = NULL;
    l->n = l->cap = 0;
    pthread_mutex_unlock(&l->mu);
    ERL_NIF_TERM old = enif_make_list(env, 0);
    for (size_t i = n; i > 0; i--) old = enif_make_list_cell(env, enif_make_copy(env, q[i - 1]), old);
    if (qenv) enif_free_env(qenv);
    free(q);
    return enif_make_tuple3(env, ATOM_ok, enif_make_int(env, id), old);
}

/* Makes room for one more record in l's queue (l->mu held): 0, or -1 out of memory. */
static int reserve(rlink *l) {
    if (!l->qenv && !(l->qenv = enif_alloc_env())) return -1;
    if (l->n == l->cap) {
        size_t cap = l->cap ? l->cap * 2 : 64;
        ERL_NIF_TERM *q = realloc(l->q, cap * sizeof *q);
        if (!q) return -1;
        l->q = q;
        l->cap = cap;
    }
    return 0;
}

/* Appends rec to l's queue (l->mu held, room reserved); wakes the shipper when the queue was empty. */
static void append(ErlNifEnv *env, rlink *l, ERL_NIF_TERM rec) {
    l->q[l->n++] = enif_make_copy(l->qenv, rec);
    if (l->n == 1) enif_send(env, &l->pid, NULL, enif_make_atom(env, "dspex_repl_wake"));
}

/* Appends rec to l's queue (l->mu held): 0, or -1 out of memory. */
static int push(ErlNifEnv *env, rlink *l, ERL_NIF_TERM rec) {
    if (reserve(l)) return -1;
    append(env, l, rec);
    return 0;
}

/* repl_push(LinkId, Record) -> ok | full | down: a record of the writer
 * (dspex_cluster_shipper:ship/2), in order with the fast path's. */
DX_NIF(nif_repl_push) {
    rlink *l;
    if (!get_link(env, argv[0], &l)) return enif_make_badarg(env);
    pthread_mutex_lock(&l->mu);
    ERL_NIF_TERM r;
    if (!l->open || !enif_is_process_alive(env, &l->pid)) r = enif_make_atom(env, "down");
    else if (l->n >= RL_MAX_QUEUE) r = enif_make_atom(env, "full");
    else r = push(env, l, argv[1]) ? enif_make_atom(env, "down") : ATOM_ok;
    pthread_mutex_unlock(&l->mu);
    return r;
}

/* repl_link_id(Node) -> LinkId | undefined (no shipper opened it yet). */
DX_NIF(nif_repl_link_id) {
    char name[256];
    int len = enif_get_atom(env, argv[0], name, sizeof name, ERL_NIF_LATIN1);
    if (len <= 0) return enif_make_badarg(env);
    int id;
    pthread_mutex_lock(&g_links_mu);
    rlink *l = link_by_name(name, (size_t)len - 1, &id);
    pthread_mutex_unlock(&g_links_mu);
    return l && l->open ? enif_make_int(env, id) : enif_make_atom(env, "undefined");
}

/* repl_drain(LinkId) -> the queued records in append order: the writer's
 * (dspex_cluster_shipper:record()) and the fast path's {From, Session, Key,
 * Value, Version, Epoch, Seq, T0, EventSeq} (EventSeq: the session sequence of
 * the set's event, 0 with the log off); the next record appended wakes the
 * shipper again. More than RL_DRAIN_NORMAL records are copied on a dirty
 * scheduler: counted under the mutex that takes them (a count read before,
 * then the records taken after a second lock, let appends in between grow the
 * copy on a normal scheduler up to RL_MAX_QUEUE). */
DX_NIF(nif_repl_drain) {
    rlink *l;
    if (!get_link(env, argv[0], &l)) return enif_make_badarg(env);
    pthread_mutex_lock(&l->mu);
    if (l->n > RL_DRAIN_NORMAL && !dx_on_dirty()) {
        pthread_mutex_unlock(&l->mu);
        return enif_schedule_nif(env, "repl_drain", ERL_NIF_DIRTY_JOB_CPU_BOUND, nif_repl_drain, argc, argv);
    }
    ErlNifEnv *qenv = l->qenv;
    ERL_NIF_TERM *q = l->q;
    size_t n = l->n;
    l->qenv = NULL;
    l->q = NULL;
    l->n = l->cap = 0;
    pthread_mutex_unlock(&l->mu);
    ERL_NIF_TERM list = enif_make_list(env, 0);
    for (size_t i = n; i > 0; i--) list = enif_make_list_cell(env, enif_make_copy(env, q[i - 1]), list);
    if (qenv) enif_free_env(qenv);
    free(q);
    return list;
}

/* The replica links of a descriptor: LinkId, or a list of 1..RD_MAX_LINKS
 * distinct LinkIds; stored ascending (the order repl_set/6 locks them in). */
static int get_links(ErlNifEnv *env, ERL_NIF_TERM t, int *links, int *n) {
    rlink *l;
    unsigned len;
    *n = 0;
    if (enif_is_number(env, t)) {
        if (!get_link(env, t, &l)) return 0;
        enif_get_int(env, t, &links[0]);
        *n = 1;
        return 1;
    }
    if (!enif_get_list_length(env, t, &len) || len == 0 || len > RD_MAX_LINKS) return 0;
    ERL_NIF_TERM h;
    while (enif_get_list_cell(env, t, &h, &t)) {
        int id;
        if (!get_link(env, h, &l)) return 0;
        enif_get_int(env, h, &id);
        int i = *n;
        while (i > 0 && links[i - 1] > id) {
            links[i] = links[i - 1];
            i--;
        }
        if (i > 0 && links[i - 1] == id) return 0; /* twice */
        links[i] = id;
        (*n)++;
    }
    return 1;
}

/* repl_publish(Session, Epoch, Seq, Gen, Links) -> ok: settled, sync;
 * repl_publish(Session, Epoch, Seq, Gen, Links, sync | async) -> ok.
 * Links: a LinkId or a list of distinct LinkIds (at most 16), the replica
 * links of the session. async: repl_set/6 answers at once and does not
 * announce its change for reads (async reads never wait). */
DX_NIF(nif_repl_publish) {
    ErlNifBinary b;
    ErlNifUInt64 e, seq, gen;
    int links[RD_MAX_LINKS], nl, async = 0;
    if (!get_bin(env, argv[0], &b) || !enif_get_uint64(env, argv[1], &e) || !enif_get_uint64(env, argv[2], &seq) ||
        !enif_get_uint64(env, argv[3], &gen) || !get_links(env, argv[4], links, &nl))
        return enif_make_badarg(env);
    if (argc == 6) {
        if (enif_is_identical(argv[5], enif_make_atom(env, "async"))) async = 1;
        else if (!enif_is_identical(argv[5], enif_make_atom(env, "sync"))) return enif_make_badarg(env);
    }
    uint64_t h = sid_hash((const char *)b.data, b.size);
    /* an existing entry under the read lock (the fast path's sets go on); a new one under the write lock */
    pthread_rwlock_rdlock(&g_desc_lock);
    rdesc *d = desc_find((const char *)b.data, b.size, h);
    if (!d) {
        pthread_rwlock_unlock(&g_desc_lock);
        pthread_rwlock_wrlock(&g_desc_lock);
        d = desc_find((const char *)b.data, b.size, h);
    }
    if (!d) {
        if (!(d = calloc(1, sizeof *d + b.size))) {
            pthread_rwlock_unlock(&g_desc_lock);
            return dx_error(env, ATOM_enomem);
        }
        pthread_mutex_init(&d->mu, NULL);
        d->hash = h;
        d->sidlen = b.size;
        memcpy(d->sid, b.data, b.size);
        d->next = g_desc[h % RD_BUCKETS];
        g_desc[h % RD_BUCKETS] = d;
    }
    pthread_mutex_lock(&d->mu);
    d->epoch = e;
    d->seq = seq;
    d->gen = gen;
    d->nlinks = nl;
    memcpy(d->links, links, (size_t)nl * sizeof *links);
    d->async = async;
    /* announced never goes back within an epoch; async sets announce nothing */
    if (!async && (atomic_load(&d->aepoch) != e || atomic_load(&d->announced) < seq)) {
        atomic_store(&d->announced, seq);
        atomic_store(&d->aepoch, e);
    }
    d->settled = 1;
    pthread_mutex_unlock(&d->mu);
    pthread_rwlock_unlock(&g_desc_lock);
    return ATOM_ok;
}

/* repl_unsettle(Session) -> {Epoch, Seq} | none: no more fast sets; a set in
 * flight has committed and appended when this returns. */
DX_NIF(nif_repl_unsettle) {
    ErlNifBinary b;
    if (!get_bin(env, argv[0], &b)) return enif_make_badarg(env);
    ERL_NIF_TERM r = enif_make_atom(env, "none");
    rdesc *d = desc_rdlock(&b);
    if (d) {
        pthread_mutex_lock(&d->mu);
        d->settled = 0;
        r = enif_make_tuple2(env, enif_make_uint64(env, d->epoch), enif_make_uint64(env, d->seq));
        pthread_mutex_unlock(&d->mu);
    }
    pthread_rwlock_unlock(&g_desc_lock);
    return r;
}

/* repl_forget(Session) -> ok: the entry is removed (it must be unsettled). */
DX_NIF(nif_repl_forget) {
    ErlNifBinary b;
    if (!get_bin(env, argv[0], &b)) return enif_make_badarg(env);
    uint64_t h = sid_hash((const char *)b.data, b.size);
    pthread_rwlock_wrlock(&g_desc_lock);
    for (rdesc **p = &g_desc[h % RD_BUCKETS]; *p; p = &(*p)->next) {
        rdesc *d = *p;
        if (d->hash == h && d->sidlen == b.size && !memcmp(d->sid, b.data, b.size)) {
            *p = d->next;
            pthread_mutex_destroy(&d->mu);
            free(d);
            break;
        }
    }
    pthread_rwlock_unlock(&g_desc_lock);
    return ATOM_ok;
}

/* repl_info(Session) -> none | {Settled, Epoch, Seq, {AEpoch, Announced}}; lock-free read of announced. */
DX_NIF(nif_repl_info) {
    ErlNifBinary b;
    if (!get_bin(env, argv[0], &b)) return enif_make_badarg(env);
    ERL_NIF_TERM r = enif_make_atom(env, "none");
    rdesc *d = desc_rdlock(&b);
    if (d) {
        uint64_t ae = atomic_load(&d->aepoch), a = atomic_load(&d->announced);
        pthread_mutex_lock(&d->mu);
        r = enif_make_tuple4(env, d->settled ? ATOM_true : ATOM_false, enif_make_uint64(env, d->epoch),
                             enif_make_uint64(env, d->seq),
                             enif_make_tuple2(env, enif_make_uint64(env, ae), enif_make_uint64(env, a)));
        pthread_mutex_unlock(&d->mu);
    }
    pthread_rwlock_unlock(&g_desc_lock);
    return r;
}

/* repl_announced(Session) -> {Epoch, Seq} | none: the read index's target,
 * without waiting for a set in flight. */
DX_NIF(nif_repl_announced) {
    ErlNifBinary b;
    if (!get_bin(env, argv[0], &b)) return enif_make_badarg(env);
    ERL_NIF_TERM r = enif_make_atom(env, "none");
    rdesc *d = desc_rdlock(&b);
    if (d) {
        uint64_t a = atomic_load(&d->announced);
        r = enif_make_tuple2(env, enif_make_uint64(env, atomic_load(&d->aepoch)), enif_make_uint64(env, a));
    }
    pthread_rwlock_unlock(&g_desc_lock);
    return r;
}

/* repl_stats() -> {FastSets, RefusedFull}. */
DX_NIF(nif_repl_stats) {
    return enif_make_tuple2(env, enif_make_uint64(env, atomic_load(&g_fast_sets)),
                            enif_make_uint64(env, atomic_load(&g_refused_full)));
}

static ERL_NIF_TERM done(ErlNifEnv *env, uint64_t epoch, ERL_NIF_TERM r) {
    return enif_make_tuple3(env, enif_make_atom(env, "done"), enif_make_uint64(env, epoch), r);
}

/* repl_set(Session, Key, Value, Gen, From, T0) -> slow | {queued, Shippers, Epoch, Seq, {ok, Version}} | {done, Epoch, Reply} | {wait, Epoch}
 *
 * set(Session, Key, Value, #{}) of a settled session under view generation
 * Gen: commit and append in one critical section. `slow': not settled, another
 * view, a big value, a link without a shipper: the caller goes through the
 * writer. The record goes to every replica link of the session (all or
 * nothing, under the descriptor's mutex, so each link gets the session's
 * records in commit order): a full link queue is {done, Epoch, {error,
 * {retry, replica_slow}}} with nothing committed (async: {wait, Epoch},
 * nothing committed: async callers outrun their replicas, so they wait for
 * room rather than fail); a set that fails is {done,
 * Epoch, Error}, with nothing shipped. Sync: {queued, Shippers, ...}, the
 * caller waits for one answer (the last replica's, or the first failure);
 * Shippers, the shipper pid of each link, to monitor. Async: {done, Epoch,
 * {ok, Version}} once queued, nothing announced for reads. From is {Alias,
 * Alias} (the shipper answers with gen_server:reply/2). The record is {From,
 * Session, Key, Value, Version, Epoch, Seq, T0, EventSeq, Count}: Count, the
 * links a sync caller waits for, 0 for async. */
DX_NIF(nif_repl_set) {
    ErlNifBinary b;
    ErlNifUInt64 gen;
    const ERL_NIF_TERM *from;
    int arity;
    ErlNifSInt64 t0;
    ERL_NIF_TERM slow = enif_make_atom(env, "slow");
    if (!get_bin(env, argv[0], &b) || !enif_get_uint64(env, argv[3], &gen) ||
        !enif_get_tuple(env, argv[4], &arity, &from) || arity != 2 || !enif_is_ref(env, from[1]) ||
        !enif_get_int64(env, argv[5], &t0))
        return enif_make_badarg(env);
    char kbuf[DX_ATOM_TEXT];
    dx_str key;
    /* a bad key or a big value: the writer's path (and its errors) */
    if (!dx_get_name(env, argv[1], &key, kbuf, DX_ATOM_TEXT) || dx_set_plain_big(env, argv[2])) return slow;
    /* the log must number the set's event without asking its backend (the writer seeds it) */
    if (!dx_events_known((const char *)b.data, b.size)) return slow;
    rdesc *d = desc_rdlock(&b);
    if (!d) {
        pthread_rwlock_unlock(&g_desc_lock);
        return slow;
    }
    pthread_mutex_lock(&d->mu);
    rlink *ls[RD_MAX_LINKS];
    ERL_NIF_TERM pids[RD_MAX_LINKS];
    int nl = d->settled && d->gen == gen ? d->nlinks : 0, full = 0, nlinks = atomic_load(&g_nlinks);
    for (int i = 0; i < nl; i++) {
        if (d->links[i] >= nlinks) {
            nl = 0;
            break;
        }
        rlink *l = ls[i] = g_links[d->links[i]];
        pthread_mutex_lock(&l->mu);
        pids[i] = enif_make_pid(env, &l->pid);
        full |= l->n >= RL_MAX_QUEUE;
        int open = l->open && enif_is_process_alive(env, &l->pid);
        pthread_mutex_unlock(&l->mu);
        if (!open) {
            nl = 0; /* one link without its shipper: the writer's path */
            break;
        }
    }
    ERL_NIF_TERM r = slow;
    dx_notify_ctx nc;
    int ran = 0, async = d->async;
    if (nl && full) {
        atomic_fetch_add(&g_refused_full, 1);
        r = async ? enif_make_tuple2(env, enif_make_atom(env, "wait"), enif_make_uint64(env, d->epoch))
                  : done(env, d->epoch, dx_error2(env, enif_make_atom(env, "retry"), enif_make_atom(env, "replica_slow")));
    } else if (nl) {
        /* announced before the commit: a read that sees the change waits for it (sync) */
        uint64_t seq = d->seq + 1;
        if (!async) atomic_store(&d->announced, seq);
        dx_notify_ctx_init(&nc, env, 1);
        ran = 1;
        (void)dx_events_take_pushed();
        r = dx_set_plain(env, argv[0], argv[1], argv[2], &nc);
        uint64_t post = dx_events_take_pushed(); /* the set's event, if the log is on */
        const ERL_NIF_TERM *el;
        ErlNifUInt64 ver;
        if (enif_get_tuple(env, r, &arity, &el) && arity == 2 && enif_is_identical(el[0], ATOM_ok) &&
            enif_get_uint64(env, el[1], &ver)) {
            d->seq = seq;
            ERL_NIF_TERM rec[10] = {argv[4], argv[0], argv[1], argv[2], el[1], enif_make_uint64(env, d->epoch),
                                    enif_make_uint64(env, seq), argv[5], enif_make_uint64(env, post),
                                    enif_make_int(env, async ? 0 : nl)};
            ERL_NIF_TERM t = enif_make_tuple_from_array(env, rec, 10);
            /* every link or none: all locked (ascending ids), room made in each, then appended */
            int room = 1;
            for (int i = 0; i < nl; i++) pthread_mutex_lock(&ls[i]->mu);
            for (int i = 0; i < nl && room; i++) room = !reserve(ls[i]);
            for (int i = 0; i < nl && room; i++) append(env, ls[i], t);
            for (int i = nl; i > 0; i--) pthread_mutex_unlock(&ls[i - 1]->mu);
            if (room) {
                atomic_fetch_add(&g_fast_sets, 1);
                r = async ? done(env, d->epoch, r)
                          : enif_make_tuple5(env, enif_make_atom(env, "queued"), enif_make_list_from_array(env, pids, nl),
                                             enif_make_uint64(env, d->epoch), enif_make_uint64(env, seq), r);
            } else {
                /* committed, not shipped (out of memory): the replicas see a gap at the
                 * session's next change and get a full copy; the writer takes over */
                d->settled = 0;
                r = done(env, d->epoch,
                         dx_error2(env, enif_make_atom(env, "retry"), enif_make_atom(env, "replica_unavailable")));
            }
        } else {
            if (!async) atomic_store(&d->announced, d->seq); /* withdrawn: nothing committed */
            r = done(env, d->epoch, r);
        }
    }
    pthread_mutex_unlock(&d->mu);
    pthread_rwlock_unlock(&g_desc_lock);
    /* outside every lock: the watch messages */
    return ran ? dx_watch_finish(env, &nc, r) : r;
}
