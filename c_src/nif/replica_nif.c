/* NIFs for cluster replicas (dspex_cluster). lock_token_floor(Floor): a node
 * that takes ownership of sessions raises its lock token counter, so tokens it
 * grants are above every token the previous owner granted. */
#include "nif.h"

ERL_NIF_TERM nif_lock_token_floor(ErlNifEnv *env, int argc, const ERL_NIF_TERM argv[]) {
    (void)argc;
    ErlNifUInt64 floor;
    if (!enif_get_uint64(env, argv[0], &floor)) return enif_make_badarg(env);
    return enif_make_uint64(env, dx_lock_tokens_raise(floor));
}
