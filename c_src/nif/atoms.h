/* Atoms are made once at load (never from outside input). */
#ifndef DX_ATOMS_H
#define DX_ATOMS_H
#include <erl_nif.h>

#define DX_ATOM_LIST(X) \
    X(ok) X(error) X(true) X(false) X(undefined) X(nil) X(nan) X(infinity) X(neg_infinity) \
    X(session_not_found) X(not_found) X(already_exists) X(version_mismatch) X(invalid_value) \
    X(invalid_argument) X(invalid_constraints) X(unknown_type) X(limit_exceeded) X(version_not_found) \
    X(batch_failed) X(enomem) X(duplicate_variable) X(invalid_export) \
    X(sessions) X(variables) X(value_size) X(name_length) X(history_limit) \
    X(var) X(min_max) X(slow) X(get) X(get_value) X(set) X(id) X(name) X(type) X(value) X(constraints) X(metadata) X(version) X(created_at) X(updated_at) \
    X(changed_by) X(shape) X(data) X(found) X(missing) X(updated) X(errors) X(ttl) X(last_accessed_at) \
    X(variable_count) X(previous_version) X(expected_version) X(history) X(format) \
    X(dspex_session_v1) X(dspex_variable) X(all) X(max_sessions) X(max_variables) X(max_value_bytes) \
    X(max_name_length) X(max_history) X(default_history) X(dirty) \
    X(float) X(integer) X(string) X(boolean) X(choice) X(module) X(embedding) X(tensor) \
    X(derived_variable) X(locked) X(stale_lock) X(lock) X(token) X(read) X(write) X(observe) X(optimize) X(as) X(context) X(access_denied) X(rate_limited) X(invalid_rule) X(rules) X(session_pattern) X(permissions) X(conditions) X(any) X(dspex_acl_audit) X(dspex_denied) X(dspex_rate_limited) X(denied) X(derived) X(propagation) X(would_create_cycle) X(min) X(max) X(min_length) X(max_length) X(pattern) X(enum) X(choices) X(allowed_modules) X(dimensions) \
    X(dependencies) X(dependents) X(all_dependents) X(update_order) X(reclaim_pending) X(history_size) X(watchers) \
    X(unchanged) X(replaced) X(test_hooks) X(test_hooks_disabled) X(miss) X(stale) X(copy) X(strong) X(current) X(bump) X(off) X(need_full) X(stale_epoch) \
    X(bytes) X(edges) X(history_entries) X(last_writes) X(total) X(watched)

#define DX_ATOM_DECL(a) extern ERL_NIF_TERM ATOM_##a;
DX_ATOM_LIST(DX_ATOM_DECL)

void dx_atoms_init(ErlNifEnv *env);
#endif
