"""Value encoding of the snakepit bridge protocol.

A value travels as a ``google.protobuf.Any`` whose ``type_url`` is
``type.googleapis.com/snakepit.<type>`` and whose ``value`` is UTF-8 JSON.
JSON has no NaN or infinities, so non-finite floats travel as the strings
``"NaN"``, ``"Infinity"`` and ``"-Infinity"`` (also inside embeddings and
tensors).

Large embeddings and tensors go in the message's ``binary_value`` field
instead: the Any then carries only ``{"shape": [...], "dtype": "float32" |
"float64"}`` and the bytes are the elements in row-major order, each an IEEE 754
little-endian float of that dtype.  Nothing here ever decodes pickle.
"""

import array
import json
import math
import sys

from google.protobuf import any_pb2

TYPE_URL_PREFIX = "type.googleapis.com/snakepit."

#: Types the store knows; other type names are sent as plain JSON.
KNOWN_TYPES = ("float", "integer", "string", "boolean", "choice", "module",
               "embedding", "tensor")

#: Embeddings/tensors whose float64 size exceeds this many bytes use binary_value.
DEFAULT_BINARY_THRESHOLD = 10240

_DTYPES = {"float32": ("f", 4), "float64": ("d", 8)}
_NONFINITE_IN = {"NaN": math.nan, "Infinity": math.inf, "-Infinity": -math.inf}


class CodecError(ValueError):
    """A value that cannot be encoded for its type, or a malformed wire value."""


def type_url(var_type):
    """The Any type_url of a bridge type name."""
    return TYPE_URL_PREFIX + var_type


def type_from_url(url):
    """The bridge type name in an Any type_url ('' for an empty Any)."""
    if not url:
        return ""
    if not url.startswith(TYPE_URL_PREFIX):
        raise CodecError("unexpected type_url %r" % url)
    name = url[len(TYPE_URL_PREFIX):]
    # Older snakepit senders marked binary payloads with a ".binary" suffix.
    if name.endswith(".binary"):
        name = name[:-len(".binary")]
    return name


def infer_type(value):
    """The bridge type a Python value is registered as when none is given."""
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int):
        return "integer"
    if isinstance(value, float):
        return "float"
    if isinstance(value, str):
        return "string"
    if isinstance(value, dict) and "shape" in value and "data" in value:
        return "tensor"
    if isinstance(value, (list, tuple)) and all(
            isinstance(x, (int, float)) and not isinstance(x, bool) for x in value):
        return "embedding"
    raise CodecError("cannot infer a bridge type for %s; pass var_type"
                     % type(value).__name__)


# ---------------------------------------------------------------- numbers

def _float_out(x):
    """A float as it appears in JSON: a number, or a string if non-finite."""
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        raise CodecError("expected a number, got %r" % (x,))
    try:
        x = float(x)
    except OverflowError:  # an int beyond the float range: a bad value, as the server says
        raise CodecError("number out of the float range: %s" % _short_int(x)) from None
    if math.isnan(x):
        return "NaN"
    if math.isinf(x):
        return "Infinity" if x > 0 else "-Infinity"
    return x


def _short_int(x):
    # str() of a huge int is slow and may hit Python's digit limit
    return "an integer of %d bits" % x.bit_length() if isinstance(x, int) else repr(x)


def _float_in(x):
    if isinstance(x, str):
        try:
            return _NONFINITE_IN[x]
        except KeyError:
            raise CodecError("bad float %r" % x) from None
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        raise CodecError("bad float %r" % (x,))
    return float(x)


def _flatten(data):
    out = []
    stack = [iter(data)]
    while stack:
        for item in stack[-1]:
            if isinstance(item, (list, tuple)):
                stack.append(iter(item))
                break
            out.append(item)
        else:
            stack.pop()
    return out


def _shape_of(nested):
    shape = []
    cur = nested
    while isinstance(cur, (list, tuple)):
        shape.append(len(cur))
        if not cur:
            break
        cur = cur[0]
    return shape


def _tensor_parts(value):
    """(shape, flat float data) of a tensor given as {"shape", "data"} or nested lists."""
    if isinstance(value, dict):
        if "shape" not in value or "data" not in value:
            raise CodecError("a tensor is {'shape': [...], 'data': [...]}")
        shape = list(value["shape"])
        data = _flatten(value["data"])
    elif isinstance(value, (list, tuple)):
        shape = _shape_of(value)
        data = _flatten(value)
    else:
        raise CodecError("a tensor is {'shape': [...], 'data': [...]}, got %r" % (value,))
    for d in shape:
        if isinstance(d, bool) or not isinstance(d, int) or d < 0:
            raise CodecError("bad tensor shape %r" % (shape,))
    return shape, data


# ---------------------------------------------------------------- JSON form

def to_json_value(var_type, value):
    """The JSON-ready form of a Python value of a bridge type."""
    if var_type == "float":
        return _float_out(value)
    if var_type == "integer":
        if isinstance(value, bool):
            raise CodecError("expected an integer, got a boolean")
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if not isinstance(value, int):
            raise CodecError("expected an integer, got %r" % (value,))
        return value
    if var_type == "boolean":
        if not isinstance(value, bool):
            raise CodecError("expected a boolean, got %r" % (value,))
        return value
    if var_type in ("string", "choice", "module"):
        if not isinstance(value, str):
            raise CodecError("expected a string, got %r" % (value,))
        return value
    if var_type == "embedding":
        if not isinstance(value, (list, tuple)):
            raise CodecError("expected a list of numbers, got %r" % (value,))
        return [_float_out(x) for x in value]
    if var_type == "tensor":
        shape, data = _tensor_parts(value)
        return {"shape": shape, "data": [_float_out(x) for x in data]}
    return value


def from_json_value(var_type, value):
    """The Python value of a decoded JSON body of a bridge type."""
    if var_type == "float":
        return _float_in(value)
    if var_type == "integer":
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, bool) or not isinstance(value, int):
            raise CodecError("bad integer %r" % (value,))
        return value
    if var_type == "embedding":
        if not isinstance(value, list):
            raise CodecError("bad embedding %r" % (value,))
        return [_float_in(x) for x in value]
    if var_type == "tensor":
        if not isinstance(value, dict) or "shape" not in value or "data" not in value:
            raise CodecError("bad tensor %r" % (value,))
        return {"shape": list(value["shape"]),
                "data": [_float_in(x) for x in _flatten(value["data"])]}
    return value


def _dumps(obj):
    try:
        return json.dumps(obj, allow_nan=False, separators=(",", ":"),
                          ensure_ascii=False).encode("utf-8")
    except (TypeError, ValueError) as e:
        raise CodecError("value is not JSON-encodable: %s" % e) from None


# ---------------------------------------------------------------- binary form

def pack_floats(data, dtype="float64"):
    """Elements as little-endian IEEE 754 floats of dtype ('float32'/'float64')."""
    try:
        code, _ = _DTYPES[dtype]
    except KeyError:
        raise CodecError("unsupported dtype %r" % dtype) from None
    try:
        arr = array.array(code, (float(x) for x in data))
    except (TypeError, ValueError):
        raise CodecError("binary values must be numbers") from None
    except OverflowError:
        raise CodecError("binary values must be in the float range") from None
    if sys.byteorder != "little":
        arr.byteswap()
    return arr.tobytes()


def unpack_floats(raw, dtype, count):
    """The list of floats in raw (little-endian, dtype), which must hold count elements."""
    try:
        code, size = _DTYPES[dtype]
    except KeyError:
        raise CodecError("unsupported dtype %r" % (dtype,)) from None
    if len(raw) != count * size:
        raise CodecError("binary value has %d bytes, shape needs %d" % (len(raw), count * size))
    arr = array.array(code)
    arr.frombytes(raw)
    if sys.byteorder != "little":
        arr.byteswap()
    return arr.tolist()


def _product(shape):
    n = 1
    for d in shape:
        n *= d
    return n


# ---------------------------------------------------------------- public API

def encode(var_type, value, binary_threshold=DEFAULT_BINARY_THRESHOLD, dtype="float64"):
    """Encode value as (Any, binary bytes).

    binary bytes is b"" unless var_type is embedding/tensor and the float64 size
    of its data exceeds binary_threshold (None: never binary; 0: always).
    """
    if var_type in ("embedding", "tensor") and binary_threshold is not None:
        if var_type == "embedding":
            if not isinstance(value, (list, tuple)):
                raise CodecError("expected a list of numbers, got %r" % (value,))
            shape, data = [len(value)], value
        else:
            shape, data = _tensor_parts(value)
            if len(data) != _product(shape):
                raise CodecError("tensor data has %d elements, shape %r needs %d"
                                 % (len(data), shape, _product(shape)))
        if len(data) * 8 > binary_threshold:
            for x in data:
                if isinstance(x, bool) or not isinstance(x, (int, float)):
                    raise CodecError("expected a number, got %r" % (x,))
            meta = {"shape": shape, "dtype": dtype}
            return any_pb2.Any(type_url=type_url(var_type), value=_dumps(meta)), \
                pack_floats(data, dtype)
    body = _dumps(to_json_value(var_type, value))
    return any_pb2.Any(type_url=type_url(var_type), value=body), b""


def decode(any_msg, binary=b""):
    """Decode an Any (and the message's binary bytes, if any) to a Python value."""
    var_type = type_from_url(any_msg.type_url)
    if not var_type and not any_msg.value and not binary:
        return None
    try:
        body = json.loads(any_msg.value.decode("utf-8")) if any_msg.value else None
    except (UnicodeDecodeError, ValueError) as e:
        raise CodecError("bad JSON in %s value: %s" % (var_type, e)) from None
    if binary:
        if var_type not in ("embedding", "tensor"):
            raise CodecError("binary value for type %r" % var_type)
        if not isinstance(body, dict) or not isinstance(body.get("shape"), list):
            raise CodecError("binary value without a shape")
        if body.get("binary_format", "raw_le") != "raw_le":
            raise CodecError("unsupported binary_format %r" % (body["binary_format"],))
        shape = body["shape"]
        data = unpack_floats(binary, body.get("dtype", "float32"), _product(shape))
        if var_type == "embedding":
            return data
        return {"shape": shape, "data": data}
    return from_json_value(var_type, body)


def encode_json(obj):
    """JSON text of constraints/rules/config (allow_nan off; '' for None)."""
    if obj is None:
        return ""
    return _dumps(obj).decode("utf-8")


def decode_json(text, default=None):
    """Parse a JSON text field ('' gives default)."""
    if not text:
        return default
    return json.loads(text)
