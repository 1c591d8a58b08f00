/* Typed variable values and their constraints. Conversion rules follow the DSPex
 * bridge: an integer given for a float becomes a float, a whole float given for
 * an integer becomes an integer, floats accept NaN and the infinities. */
#ifndef DX_VALUE_H
#define DX_VALUE_H
#include "common.h"
#include <regex.h>
#include <stdbool.h>

typedef enum {
    DX_T_FLOAT = 0,
    DX_T_INTEGER,
    DX_T_STRING,
    DX_T_BOOLEAN,
    DX_T_CHOICE,
    DX_T_MODULE,
    DX_T_EMBEDDING,
    DX_T_TENSOR,
    DX_T_COUNT
} dx_type;

const char *dx_type_name(dx_type t);
/* 0 and *t set if name is a known type name. */
int dx_type_parse(const char *name, size_t len, dx_type *t);

/* A value as a view: pointers borrow memory owned elsewhere (a snapshot, or the
 * caller's input buffers). */
typedef struct {
    dx_type type;
    union {
        double f;
        int64_t i;
        bool b;
        dx_str s; /* string, choice, module */
        struct {
            const double *data;
            size_t n;
            const int64_t *shape; /* tensor only */
            size_t ndim;
        } v; /* embedding, tensor */
    } u;
} dx_value;

/* Input as the caller received it, before the variable's type is applied. */
typedef enum {
    DX_RAW_INT,
    DX_RAW_BIGINT,  /* an integer outside int64; f holds it as a double (inf if too big) */
    DX_RAW_FLOAT,   /* includes NaN / infinities */
    DX_RAW_BOOL,
    DX_RAW_BYTES,   /* a string */
    DX_RAW_NUMLIST, /* a list of numbers */
    DX_RAW_TENSOR,  /* shape + data */
    DX_RAW_STRLIST, /* a list of strings (constraint lists) */
    DX_RAW_OTHER    /* anything else; desc says what */
} dx_raw_kind;

typedef struct {
    dx_raw_kind kind;
    int64_t i;
    double f;
    bool b;
    dx_str s;
    const double *nums;
    size_t n;
    const int64_t *shape;
    size_t ndim;
    const dx_str *strs;
    size_t nstrs;
    const char *desc; /* e.g. "a map", for error messages */
    bool atom;        /* the input was an ASCII atom; s holds its text (string types accept it) */
} dx_raw;

/* Constraint flags */
enum {
    DX_C_MIN = 1 << 0,
    DX_C_MAX = 1 << 1,
    DX_C_MIN_LENGTH = 1 << 2,
    DX_C_MAX_LENGTH = 1 << 3,
    DX_C_PATTERN = 1 << 4,
    DX_C_ENUM = 1 << 5,
    DX_C_CHOICES = 1 << 6,
    DX_C_ALLOWED_MODULES = 1 << 7,
    DX_C_DIMENSIONS = 1 << 8,
    DX_C_SHAPE = 1 << 9,
};

typedef struct {
    size_t n;
    dx_str *items; /* each item's bytes owned by the list */
} dx_strlist;

typedef struct {
    unsigned flags;
    double min_f, max_f;   /* float bounds */
    int64_t min_i, max_i;  /* integer bounds */
    uint64_t min_length, max_length;
    char *pattern;         /* NUL-terminated source, owned */
    regex_t re;            /* compiled when DX_C_PATTERN */
    dx_strlist enum_values, choices, allowed_modules;
    uint64_t dimensions;
    int64_t *shape;        /* owned */
    size_t ndim;
} dx_constraints;

#define DX_MAX_PATTERN 1024
#define DX_MAX_TENSOR_DIMS 32

void dx_constraints_init(dx_constraints *c);
void dx_constraints_free(dx_constraints *c);
/* Adds one constraint given by name; DX_OK or DX_E_INVALID with a message. */
int dx_constraints_add(dx_constraints *c, dx_type t, const char *key, size_t klen, const dx_raw *val,
                       char *err, size_t errlen);
/* Whole-set checks (min <= max, choice needs choices, ...). */
int dx_constraints_finish(dx_constraints *c, dx_type t, char *err, size_t errlen);
/* Deep copy (for import/export paths and tests). */
int dx_constraints_copy(dx_constraints *dst, const dx_constraints *src);

/* Applies the type's conversion rules to raw input and checks constraints.
 * On success *out views raw's memory (or holds the converted scalar). */
int dx_value_check(dx_type t, const dx_constraints *c, const dx_raw *raw, dx_value *out, char *err,
                   size_t errlen);
/* Validates an already typed value against constraints (used by rollback/import). */
int dx_value_validate(const dx_value *v, const dx_constraints *c, char *err, size_t errlen);

/* Bytes the value's payload occupies (for size limits and allocation). */
size_t dx_value_payload_size(const dx_value *v);
/* Copies the payload of v into buf (payload_size bytes) and points dst at it. */
void dx_value_copy_into(dx_value *dst, const dx_value *v, char *buf);

/* Whether the bytes are valid UTF-8 (no overlongs, surrogates or > U+10FFFF). */
int dx_utf8_valid(const char *p, size_t len);

/* The magnitude of an integer given as n little-endian base-256 digits as the
 * nearest double (ties to even, as erlang:float/1); INFINITY when it rounds
 * beyond the double range. */
double dx_bigmag_to_double(const uint8_t *dig, size_t n);

/* Formats a double the way Erlang's float_to_list(F, [short]) does:
 * shortest round-trip digits, always with a '.', "nan"/"infinity". */
void dx_format_double(double d, char *buf, size_t len);
#endif
