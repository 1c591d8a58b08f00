/* The variable store: sessions, each with a sharded table of typed variables.
 *
 * Readers (get, list, exists) run lock-free inside an EBR section: they load the
 * session table, the shard's table and the variable's current snapshot, all
 * published with release stores. Writers take the shard mutex, so every check
 * (version, type, size, deleted) happens in the same critical section as the
 * write it guards, and a committed snapshot is never changed afterwards. */
#ifndef DX_STORE_H
#define DX_STORE_H
#include "cache.h"
#include "graph.h"
#include "rtab.h"
#include "value.h"
#include <pthread.h>
#include <stdatomic.h>
#include <stdbool.h>

#define DX_SHARDS 16

/* An immutable committed version of a variable. */
typedef struct dx_snap {
    uint64_t version;
    int64_t updated_at; /* microseconds since the Unix epoch */
    dx_value value;     /* views into data[] */
    const uint8_t *meta; /* opaque encoded metadata (the NIF uses external term format) */
    size_t meta_len;     /* 0: empty */
    const uint8_t *by;   /* opaque encoded changed_by, 0 length: none */
    size_t by_len;
    size_t size;         /* allocation size */
    /* References: the variable's (as current or archived version) plus one per
     * holder that outlives its EBR section (a pending watch notification). */
    _Atomic uint32_t refs;
    /* NaNs and infinities among the value's doubles (embedding, tensor),
     * counted once at creation (in what was padding): they leave the VM as
     * atoms, so a value without any has an external size that needs no read
     * of its data (diagnostics' `bytes'). */
    uint32_t nonfinite;
    _Alignas(8) char data[];
} dx_snap;

/* A reference taken while the snapshot is reachable (under the shard mutex, or
 * inside an EBR section); the last release frees it. */
static inline void dx_snap_retain(const dx_snap *s) {
    atomic_fetch_add_explicit(&((dx_snap *)s)->refs, 1, memory_order_relaxed);
}
void dx_snap_release(void *s);

struct dx_var;
typedef struct dx_blob {
    size_t len;
    uint8_t data[];
} dx_blob;

typedef struct dx_var {
    /* Hot fields first: a lookup reads the first cache line, then the name text
     * (which follows the struct) and the current snapshot. */
    dx_rkey key; /* keyed by name */
    _Atomic(dx_snap *) cur;
    dx_type type;
    uint32_t history_limit;
    char *id;
    size_t id_len;
    int64_t created_at;
    char *name;
    size_t name_len;
    dx_constraints *cons; /* in the same allocation, after the text */
    bool derived;         /* written only by propagation */
    /* The last propagation error (opaque blob), published like snapshots. */
    _Atomic(struct dx_blob *) error;
    /* Access rules (opaque to the core, owned by the NIF layer), published like
     * snapshots and replaced under the shard mutex. NULL: owner only. */
    _Atomic(void *) acl;
    /* Fields below change only under the shard mutex. */
    uint64_t lock_token; /* 0: not locked by an optimizer */
    dx_blob *lock_holder; /* opaque holder id, for {locked, Holder} */
    bool dead;
    uint32_t hist_start, hist_n;
    dx_snap **hist; /* ring of archived snapshots, oldest at hist_start */
    void **watchers; /* opaque, owned: released through the release hook */
    size_t nwatchers, capwatchers;
    void *notify; /* opaque (the NIF's notification queue), released through its hook */
    char inline_text[]; /* name, NUL, id, NUL, padding, dx_constraints */
} dx_var;

typedef struct {
    pthread_mutex_t mu;
    dx_rtab_ref tab;
    char pad[64 - (sizeof(pthread_mutex_t) + sizeof(dx_rtab_ref)) % 64];
} dx_shard;

typedef struct dx_session {
    dx_rkey key;
    char *id;
    size_t id_len;
    uint8_t *meta;
    size_t meta_len;
    int64_t created_at;          /* µs since the Unix epoch */
    int64_t ttl_ms;              /* < 0: never expires */
    _Atomic int64_t last_access; /* monotonic ms */
    _Atomic int64_t nvars;
    _Atomic bool dead;
    /* Token bucket (rate 0: unlimited, and never locked). */
    double rate, burst, tokens;
    int64_t bucket_at; /* monotonic ns of the last refill */
    pthread_mutex_t bucket_mu;
    /* The dependency graph, created on first use; graph_mu serialises it. */
    pthread_mutex_t graph_mu;
    dx_graph *graph;
    /* Freshness of a cached copy of another node's session (cache.h); zero
     * (never fresh) for every other session. */
    dx_cache_meta cache;
    dx_shard shards[DX_SHARDS];
} dx_session;

typedef struct {
    uint64_t max_sessions;
    uint64_t max_vars;        /* per session */
    uint64_t max_value_bytes; /* payload of one value */
    uint32_t max_name_len;    /* variable names and session ids, bytes */
    uint32_t max_history;     /* upper bound for history_limit */
    uint32_t default_history;
} dx_limits;

/* The highest version a variable reaches: a write past it is refused
 * (DX_E_VERSION_LIMIT) rather than wrapping to 0, and an import above it is
 * invalid. Below 2^63, so versions stay non-negative int64 everywhere. */
#define DX_VERSION_MAX ((uint64_t)INT64_MAX)

/* Which limit a DX_E_LIMIT refers to. */
enum { DX_L_SESSIONS = 1, DX_L_VARS, DX_L_VALUE_SIZE, DX_L_NAME_LENGTH, DX_L_HISTORY };

int dx_store_init(void);
void dx_store_shutdown(void); /* frees everything; no reader may be running */
void dx_store_set_limits(const dx_limits *l);
dx_limits dx_store_limits(void);
/* Called (outside any lock order concerns) when a var holding watchers is freed. */
void dx_store_set_watcher_release(void (*fn)(void *w));

/* ---- sessions (callers of find/foreach must be inside an EBR section) ---- */
/* What create and import require of a session id: DX_OK, DX_E_LIMIT
 * (*limit = DX_L_NAME_LENGTH: empty or too long) or DX_E_INVALID_NAME. */
int dx_session_id_check(dx_str id, int *limit);
/* *created: 0 (the live session of that id), 1 (a new one), 2 (a new one replacing an expired session
 * the sweeper had not reached). */
int dx_session_create(dx_str id, const uint8_t *meta, size_t meta_len, int64_t ttl_ms, int64_t now_us,
                      int64_t now_ms, dx_session **out, int *created, int *limit);
dx_session *dx_session_find(dx_str id, int64_t now_ms); /* NULL if absent or expired; refreshes */
/* Accesses refresh last_access at most once per this many ms; a session
 * expires once now - last_access > ttl + this, so it lives at least ttl after
 * its last access and at most ttl + this. */
#define DX_TOUCH_GRANULARITY_MS 1000
void dx_session_touch(dx_session *s, int64_t now_ms);
int dx_session_expired(const dx_session *s, int64_t now_ms);
int dx_session_delete(dx_str id);
size_t dx_session_sweep(int64_t now_ms);
size_t dx_session_count(void);
void dx_session_foreach(int (*fn)(void *ctx, dx_session *s), void *ctx);
int64_t dx_session_nvars(const dx_session *s);

/* ---- variables ------------------------------------------------------------ */
typedef struct {
    dx_str name;
    dx_type type;
    dx_constraints *cons; /* moved into the variable on success */
    const dx_value *value;
    const uint8_t *meta;
    size_t meta_len;
    const uint8_t *by;
    size_t by_len;
    int64_t history_limit; /* < 0: default */
    bool derived;
} dx_var_spec;

/* Registers a new variable; its id is "var_<name>_<n>". */
/* Whether id is one a variable named name can have: "var_" name "_" digits
 * (what dx_var_find resolves back to the name). */
int dx_var_id_valid(dx_str name, dx_str id);
int dx_var_register(dx_session *s, const dx_var_spec *spec, int64_t now_us, dx_var **out, int *limit);
/* By name, then by id. Inside an EBR section. */
dx_var *dx_var_find(dx_session *s, dx_str key);
dx_var *dx_var_find_name(dx_session *s, dx_str name);
static inline dx_snap *dx_var_current(dx_var *v) { return atomic_load_explicit(&v->cur, memory_order_acquire); }

typedef struct {
    bool has_expected;
    uint64_t expected;
    bool set_meta; /* replace the metadata with meta/meta_len */
    const uint8_t *meta;
    size_t meta_len;
    const uint8_t *by;
    size_t by_len;
    const dx_snap *if_current; /* non-NULL: fail with DX_E_RETRY unless still current */
    bool propagation;          /* the propagator may write derived variables */
    uint64_t lock_token;       /* 0: none presented */
    /* Access check run under the shard mutex (NULL: the owner is writing). */
    int (*acl_check)(void *ctx, const struct dx_var *v, void *acl);
    void *acl_ctx;
    /* Who writes (`as'), for the event log only: the store neither checks nor keeps it. */
    const char *principal;
    size_t principal_len;
} dx_set_opts;

#define DX_E_RETRY 100

/* Called under the shard mutex after each commit, in commit order (also when
 * the variable has no watchers). It must stay cheap and never block: take
 * references (dx_snap_retain) and append to a queue, then build and deliver
 * after the writer has released the mutex. Several hooks chain through ctx. */
typedef void (*dx_notify_fn)(void *ctx, dx_session *s, dx_var *v, const dx_snap *old, const dx_snap *cur);

/* DX_OK (*version = new), DX_E_VERSION_MISMATCH (*version = current), DX_E_NOT_FOUND
 * (deleted meanwhile), DX_E_LIMIT, DX_E_NOMEM, DX_E_RETRY. */
int dx_var_set(dx_session *s, dx_var *v, const dx_value *val, const dx_set_opts *o, int64_t now_us,
               uint64_t *version, dx_notify_fn nf, void *nctx);

typedef struct {
    dx_var *var;
    dx_value value;
    dx_set_opts opts;
    int rc;           /* out */
    uint64_t version; /* out: new version, or current on mismatch */
    uint8_t *holder;  /* out, DX_E_LOCKED: the lock holder (malloc'd; caller frees) */
    size_t holder_len;
} dx_set_item;

/* Atomic: every item is checked first; all commit or none (returns DX_E_BATCH).
 * Not atomic: each valid item commits; returns DX_OK. check_only: run the checks
 * under the locks and report them, commit nothing. Items must name distinct vars. */
int dx_var_set_many(dx_session *s, dx_set_item *items, size_t n, bool atomic, bool check_only, int64_t now_us,
                    dx_notify_fn nf, void *nctx);

/* Removes the variable and its graph edges. */
int dx_var_delete(dx_session *s, dx_str key);

/* Deletes exactly v if it is still live, running o->acl_check (if set) under
 * the shard mutex: DX_OK, DX_E_NOT_FOUND (deleted meanwhile), DX_E_DENIED,
 * DX_E_LOCKED. Inside an EBR section. */
int dx_var_delete_checked(dx_session *s, dx_var *v, const dx_set_opts *o);

/* The current lock token of v (0: free or deleted), read under the shard mutex. */
uint64_t dx_var_lock_current(dx_session *s, dx_var *v);

/* Optimizer locks. lock: takes the variable for a new token (DX_E_LOCKED with
 * *token = current if held and expect != current). unlock: only with the
 * current token (DX_E_STALE_LOCK otherwise). The holder blob is copied. */
int dx_var_lock(dx_session *s, dx_var *v, uint64_t expect, const uint8_t *holder, size_t hlen, uint64_t *token,
                const dx_set_opts *acl);
int dx_var_unlock(dx_session *s, dx_var *v, uint64_t token);
/* Raises the lock token counter to at least floor (never lowers it); the next
 * token is above it. A new cluster owner calls it so that tokens keep rising
 * across failover. Returns the counter after the call. */
uint64_t dx_lock_tokens_raise(uint64_t floor);
/* The holder of the lock behind the last DX_E_LOCKED returned on this thread,
 * captured in the same critical section as the refusal (valid until the next
 * store call on this thread; len 0 if none). */
void dx_last_lock_holder(const uint8_t **p, size_t *len);

/* Access rules: the release hook frees a rules object once no reader can see it. */
void dx_store_set_acl_release(void (*fn)(void *acl));
/* Replaces the rules (acl may be NULL), retiring the old ones. */
int dx_var_set_acl(dx_session *s, dx_var *v, void *acl);
static inline void *dx_var_acl(dx_var *v) { return atomic_load_explicit(&v->acl, memory_order_acquire); }

/* Per-session token bucket: rate per second and burst; rate 0 turns it off. */
void dx_session_set_rate(dx_session *s, double rate, double burst);
/* The bucket's configuration and the tokens it holds at now_ns (refilled as
 * dx_session_take would, nothing taken). */
void dx_session_get_rate(dx_session *s, int64_t now_ns, double *rate, double *burst, double *tokens);
/* Takes one token (DX_OK) or DX_E_RATE_LIMITED; costs nothing when off. */
int dx_session_take(dx_session *s, int64_t now_ns); /* now_ns: a monotonic clock */

/* Records (blob non-NULL) or clears the variable's propagation error. */
int dx_var_set_error(dx_session *s, dx_var *v, const uint8_t *blob, size_t len);

/* The session's graph, under graph_mu: lock returns it (created on demand;
 * NULL only when out of memory). */
dx_graph *dx_graph_lock(dx_session *s);
void dx_graph_unlock(dx_session *s);

/* Copies up to max archived snapshots, newest first, into out (valid while the
 * caller stays in its EBR section). Returns the count or -1 if deleted. */
long dx_var_history(dx_session *s, dx_var *v, dx_snap **out, size_t max);
/* Commits the value of `version` again as a new version. */
int dx_var_rollback(dx_session *s, dx_var *v, uint64_t target, const dx_set_opts *o, int64_t now_us,
                    uint64_t *version, dx_notify_fn nf, void *nctx);

int dx_var_add_watcher(dx_session *s, dx_var *v, void *w);
/* Installs q as the variable's notification queue unless it has one; returns
 * the installed queue (q or the existing one), or NULL if v was deleted.
 * The store releases the installed queue through the hook when v is freed. */
void *dx_var_adopt_notify(dx_session *s, dx_var *v, void *q);
void dx_store_set_notify_release(void (*fn)(void *q));
/* Watcher count and archived versions, read under the shard mutex; -1 if deleted. */
int dx_var_info(dx_session *s, dx_var *v, size_t *nwatchers, size_t *nhist);
/* Removes every occurrence of w; returns how many (each released). */
size_t dx_var_remove_watcher(dx_session *s, dx_var *v, void *w);

/* Calls fn for every live variable (reader; no order). */
void dx_session_foreach_var(dx_session *s, int (*fn)(void *ctx, dx_var *v), void *ctx);

/* Live variables sorted by name (bytewise), malloc'd array; NULL with *n > 0 on
 * allocation failure. Reader (EBR section). */
dx_var **dx_session_vars_sorted(dx_session *s, size_t *n);

/* One live variable as a page of the session sees it: its current snapshot,
 * watcher count and archived versions, read together under its shard mutex.
 * The name's first 8 bytes (big-endian, zero-padded) and the snapshot's
 * updated_at are copied in, so sorting and ranking mostly stay in the array. */
typedef struct {
    dx_var *var;
    dx_snap *cur;
    uint64_t key;
    int64_t updated_at;
    uint32_t nhist;
    uint32_t nwatchers;
} dx_var_stat;

/* Every live variable of the session (no order), each shard read under its
 * own mutex in turn: no value is read or copied, so a shard is held for a
 * pointer walk only. Then, that shard released, each entry's snapshot is read
 * once (updated_at) and each (may be NULL) is called with the entry, the one
 * pass over the snapshots a caller needs. malloc'd; NULL with *n > 0 on
 * allocation failure. Reader (EBR section): the snapshots stay valid until
 * the section ends. */
dx_var_stat *dx_session_var_stats(dx_session *s, size_t *n, void (*each)(void *ctx, const dx_var_stat *e),
                                  void *ctx);

/* Moves the entries of ranks [offset, offset + limit) by name (bytewise, the
 * order of dx_session_vars_sorted) to a[offset..], sorted; the others are left
 * in no order. Returns how many there are (0 when offset >= n). Expected
 * O(n + limit log limit): a page costs no sort of the whole session. */
size_t dx_var_stats_page(dx_var_stat *a, size_t n, size_t offset, size_t limit);

/* The k entries written last into out, newest first: by updated_at, then by
 * name, both descending (a stable sort by updated_at of the name-sorted list,
 * reversed). Returns min(k, n). O(n k). */
size_t dx_var_stats_latest(const dx_var_stat *a, size_t n, dx_var_stat *out, size_t k);

/* Export support: holds every shard mutex of the session, so nothing commits
 * while the caller reads all variables and their histories. */
void dx_session_lock_all(dx_session *s);
void dx_session_unlock_all(dx_session *s);
/* Under lock_all: archived snapshots oldest first, like history but complete. */
size_t dx_var_history_locked(dx_var *v, dx_snap **out, size_t max);

/* ---- import: builds a detached session, then publishes it whole ----------- */
/* NULL if the id fails dx_session_id_check, or out of memory. */
dx_session *dx_import_begin(dx_str id, const uint8_t *meta, size_t meta_len, int64_t ttl_ms, int64_t created_at,
                            int64_t now_ms);
typedef struct {
    dx_str id;
    dx_var_spec spec;
    uint64_t version;
    int64_t created_at, updated_at;
} dx_import_var;
/* hist: archived entries oldest first (values already validated by the caller
 * against spec.cons). */
typedef struct {
    uint64_t version;
    int64_t updated_at;
    dx_value value;
    const uint8_t *meta;
    size_t meta_len;
    const uint8_t *by;
    size_t by_len;
} dx_import_hist;
/* The checks of register (name length, UTF-8, value size, variable count),
 * and of the copy: iv->id valid for the name (dx_var_id_valid) and
 * iv->version <= DX_VERSION_MAX, else DX_E_INVALID. */
int dx_import_var_add(dx_session *s, const dx_import_var *iv, const dx_import_hist *hist, size_t nhist, int *limit);
/* DX_OK, DX_E_EXISTS, DX_E_LIMIT. On error the detached session is freed. */
int dx_import_commit(dx_session *s, int *limit);
void dx_import_abort(dx_session *s);

/* ---- event log hook (issue #15) -------------------------------------------------
 * Called with the lock that orders the change still held (the shard mutex for
 * variables, the session table mutex for sessions), so hooks see changes in
 * commit order. A hook only copies what it needs; it never calls back into the store. */
enum {
    DX_EV_SESSION_CREATED = 1,
    DX_EV_SESSION_DELETED,
    DX_EV_VAR_REGISTERED,
    DX_EV_VAR_UPDATED,
    DX_EV_VAR_DELETED,
    DX_EV_VAR_ROLLED_BACK,
    DX_EV_BATCH_COMMITTED,
    DX_EV_BATCH_BEGIN, /* before the members of an atomic batch commit (their events belong together) */
};
enum { DX_EV_REASON_DELETED = 0, DX_EV_REASON_EXPIRED, DX_EV_REASON_MIGRATED };
typedef struct {
    int kind;
    dx_session *s;
    dx_var *v;                /* variable events */
    const dx_snap *old, *cur; /* updated / rolled back: before and after; registered: cur */
    int reason;               /* session_deleted */
    const dx_set_item *items; /* batch_committed: the committed members */
    size_t nitems;
    const char *principal; /* the writer's dx_set_opts principal (NULL: none given) */
    size_t principal_len;
} dx_ev_change;
void dx_store_set_event_hook(void (*fn)(const dx_ev_change *c));
/* dx_session_delete with the reason the event log records. */
int dx_session_delete_reason(dx_str id, int reason);

/* Allocates a snapshot (used by the NIF for decoded values in tests). */
dx_snap *dx_snap_new(const dx_value *v, uint64_t version, int64_t now_us, const uint8_t *meta, size_t meta_len,
                     const uint8_t *by, size_t by_len);
#endif
