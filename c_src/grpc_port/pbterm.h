/* Reflective conversion between protobuf-c messages and dterm maps, driven by
 * the generated descriptors, so one walker serves every message of the proto.
 *   message            -> map of field-name atom => value (every field present)
 *   string / bytes     -> binary          ints -> integer   float/double -> float
 *   bool               -> true | false    enum -> atom of the value name
 *   repeated           -> list            map<K,V> -> map (last duplicate wins)
 *   unset submessage   -> undefined
 *   google.protobuf.Any       -> #{type_url => Bin, value => JSON term} (the
 *                                JSON body parsed; an empty body is null)
 *   google.protobuf.Timestamp -> integer microseconds since the Unix epoch;
 *                                seconds and nanos outside the range of
 *                                timestamp.proto (years 1..9999, nanos
 *                                0..999999999) are an error naming the field
 *   string field named *_json -> the parsed JSON term ("" is undefined)
 * The reverse direction accepts exactly these shapes (plus integers for
 * enums, integers for floats, atoms for strings) and the atom undefined for
 * "leave the default". Unknown field names are errors. */
#ifndef DSPEX_PBTERM_H
#define DSPEX_PBTERM_H

#include <protobuf-c/protobuf-c.h>
#include "dterm.h"

/* Unpacks a message for pb_to_term (which needs its allocator to know each
 * string's real length: a string may hold NUL bytes); NULL if malformed.
 * Free it with pb_free_unpacked. */
ProtobufCMessage *pb_unpack(const ProtobufCMessageDescriptor *d, size_t len, const uint8_t *data);
void pb_free_unpacked(ProtobufCMessage *m);
/* m must come from pb_unpack. */
int pb_to_term(const ProtobufCMessage *m, dterm *out, char *err, size_t errlen);
int pb_from_term(const ProtobufCMessageDescriptor *d, const dterm *t, ProtobufCMessage **out,
                 char *err, size_t errlen);

#endif
