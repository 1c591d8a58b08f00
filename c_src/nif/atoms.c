#include "atoms.h"
#include <string.h>

#define DX_ATOM_DEF(a) ERL_NIF_TERM ATOM_##a;
DX_ATOM_LIST(DX_ATOM_DEF)

void dx_atoms_init(ErlNifEnv *env) {
#define DX_ATOM_MAKE(a) ATOM_##a = enif_make_atom(env, #a);
    DX_ATOM_LIST(DX_ATOM_MAKE)
}
