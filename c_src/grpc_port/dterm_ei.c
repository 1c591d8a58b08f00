#include "dterm_ei.h"

#include <math.h>

int dt_encode_ei(ei_x_buff *x, const dterm *t) {
    size_t i;
    switch (t->kind) {
    case DT_INT: return ei_x_encode_longlong(x, (long long)t->u.i) ? -1 : 0;
    case DT_FLOAT:
        /* the BEAM has no NaN or infinities: such values travel as atoms */
        if (!isfinite(t->u.f))
            return ei_x_encode_atom(x, isnan(t->u.f) ? "nan" : t->u.f > 0 ? "infinity" : "neg_infinity") ? -1 : 0;
        return ei_x_encode_double(x, t->u.f) ? -1 : 0;
    case DT_ATOM:
        if (t->u.s.n > 255) return -1;
        return ei_x_encode_atom_len_as(x, t->u.s.p, (int)t->u.s.n, ERLANG_UTF8, ERLANG_UTF8) ? -1 : 0;
    case DT_BIN: return ei_x_encode_binary(x, t->u.s.p, (long)t->u.s.n) ? -1 : 0;
    case DT_BIG: { /* written by hand: ei's bignum encoder needs GMP */
        unsigned char mag[DT_BIG_MAX_BYTES], hdr[6];
        size_t n, h = 0;
        int neg;
        if (dt_big_magnitude(t, mag, &n, &neg)) return -1;
        if (n <= 255) { hdr[h++] = 110; hdr[h++] = (unsigned char)n; }
        else {
            hdr[h++] = 111;
            hdr[h++] = (unsigned char)(n >> 24); hdr[h++] = (unsigned char)(n >> 16);
            hdr[h++] = (unsigned char)(n >> 8); hdr[h++] = (unsigned char)n;
        }
        hdr[h++] = (unsigned char)neg;
        return ei_x_append_buf(x, (const char *)hdr, (int)h) || ei_x_append_buf(x, (const char *)mag, (int)n) ? -1 : 0;
    }
    case DT_TUPLE:
        if (ei_x_encode_tuple_header(x, (long)t->u.seq.n)) return -1;
        for (i = 0; i < t->u.seq.n; i++)
            if (dt_encode_ei(x, &t->u.seq.v[i])) return -1;
        return 0;
    case DT_LIST:
        if (t->u.seq.n && ei_x_encode_list_header(x, (long)t->u.seq.n)) return -1;
        for (i = 0; i < t->u.seq.n; i++)
            if (dt_encode_ei(x, &t->u.seq.v[i])) return -1;
        return ei_x_encode_empty_list(x) ? -1 : 0;
    case DT_MAP:
        if (ei_x_encode_map_header(x, (long)t->u.map.n)) return -1;
        for (i = 0; i < t->u.map.n; i++)
            if (dt_encode_ei(x, &t->u.map.k[i]) || dt_encode_ei(x, &t->u.map.v[i])) return -1;
        return 0;
    }
    return -1;
}
