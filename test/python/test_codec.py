"""Value encoding: JSON bodies, non-finite floats, binary tensors, bad input."""
import json
import math
import struct
import unittest

import _paths  # noqa: F401
from google.protobuf import any_pb2

from dspex_bridge import codec
from dspex_bridge.codec import CodecError


def body(any_msg):
    return json.loads(any_msg.value.decode("utf-8"))


class JsonEncoding(unittest.TestCase):
    def test_type_url_names_the_snakepit_type(self):
        for t, v in [("float", 0.5), ("integer", 3), ("string", "x"), ("boolean", True),
                     ("choice", "a"), ("module", "Predict"), ("embedding", [1.0, 2.0]),
                     ("tensor", {"shape": [1], "data": [1.0]})]:
            a, binary = codec.encode(t, v)
            self.assertEqual(a.type_url, "type.googleapis.com/snakepit." + t)
            self.assertEqual(binary, b"")

    def test_scalars_round_trip_with_exact_json_bodies(self):
        cases = [("float", 0.1, 0.1), ("float", 3, 3.0), ("integer", 2 ** 62, 2 ** 62),
                 ("integer", 4.0, 4), ("string", "héllo \"q\"", "héllo \"q\""),
                 ("boolean", False, False), ("choice", "b", "b"), ("module", "CoT", "CoT")]
        for t, v, expect in cases:
            a, _ = codec.encode(t, v)
            self.assertEqual(body(a), expect, t)
            self.assertEqual(codec.decode(a), expect, t)
            self.assertIs(type(codec.decode(a)), type(expect), t)

    def test_non_finite_floats_travel_as_strings(self):
        for v, s in [(math.inf, "Infinity"), (-math.inf, "-Infinity")]:
            a, _ = codec.encode("float", v)
            self.assertEqual(a.value, json.dumps(s).encode())
            self.assertEqual(codec.decode(a), v)
        a, _ = codec.encode("float", math.nan)
        self.assertEqual(a.value, b'"NaN"')
        self.assertTrue(math.isnan(codec.decode(a)))

    def test_non_finite_inside_embeddings_and_tensors(self):
        a, _ = codec.encode("embedding", [1.0, math.inf, math.nan])
        self.assertEqual(body(a), [1.0, "Infinity", "NaN"])
        out = codec.decode(a)
        self.assertEqual(out[:2], [1.0, math.inf])
        self.assertTrue(math.isnan(out[2]))
        a, _ = codec.encode("tensor", {"shape": [2, 1], "data": [[-math.inf], [2]]})
        self.assertEqual(body(a), {"shape": [2, 1], "data": ["-Infinity", 2.0]})
        self.assertEqual(codec.decode(a), {"shape": [2, 1], "data": [-math.inf, 2.0]})

    def test_tensor_from_nested_lists_is_flattened_row_major(self):
        a, _ = codec.encode("tensor", [[1, 2, 3], [4, 5, 6]])
        self.assertEqual(body(a), {"shape": [2, 3], "data": [1.0, 2.0, 3.0, 4.0, 5.0, 6.0]})

    def test_wrong_python_types_are_refused(self):
        for t, v in [("float", "x"), ("float", True), ("integer", 1.5), ("integer", True),
                     ("boolean", 1), ("string", 3), ("embedding", "abc"),
                     ("embedding", [1, "a"]), ("tensor", 3), ("tensor", {"shape": [1]}),
                     ("tensor", {"shape": [-1], "data": []})]:
            with self.assertRaises(CodecError, msg=(t, v)):
                codec.encode(t, v)

    def test_unknown_types_are_plain_json(self):
        a, _ = codec.encode("map", {"k": [1, "two"]})
        self.assertEqual(a.type_url, "type.googleapis.com/snakepit.map")
        self.assertEqual(codec.decode(a), {"k": [1, "two"]})

    def test_empty_any_decodes_to_none(self):
        self.assertIsNone(codec.decode(any_pb2.Any()))

    def test_bad_wire_values_raise(self):
        with self.assertRaises(CodecError):
            codec.decode(any_pb2.Any(type_url="type.googleapis.com/other.float", value=b"1"))
        with self.assertRaises(CodecError):
            codec.decode(any_pb2.Any(type_url=codec.type_url("float"), value=b"{"))
        with self.assertRaises(CodecError):
            codec.decode(any_pb2.Any(type_url=codec.type_url("float"), value=b'"nan"'))
        with self.assertRaises(CodecError):
            codec.decode(any_pb2.Any(type_url=codec.type_url("integer"), value=b"1.5"))

    def test_infer_type(self):
        self.assertEqual(codec.infer_type(True), "boolean")
        self.assertEqual(codec.infer_type(1), "integer")
        self.assertEqual(codec.infer_type(1.0), "float")
        self.assertEqual(codec.infer_type("s"), "string")
        self.assertEqual(codec.infer_type([1, 2.5]), "embedding")
        self.assertEqual(codec.infer_type({"shape": [1], "data": [1]}), "tensor")
        with self.assertRaises(CodecError):
            codec.infer_type(object())


class BinaryEncoding(unittest.TestCase):
    def test_small_arrays_stay_json_big_ones_go_binary(self):
        a, b = codec.encode("embedding", [0.5] * 1280)       # 10240 bytes: not over
        self.assertEqual(b, b"")
        a, b = codec.encode("embedding", [0.5] * 1281)
        self.assertEqual(len(b), 1281 * 8)
        self.assertEqual(body(a), {"shape": [1281], "dtype": "float64"})
        self.assertEqual(a.type_url, codec.type_url("embedding"))

    def test_binary_bytes_are_little_endian_float64_row_major(self):
        t = {"shape": [2, 2], "data": [1.0, -2.5, math.inf, 1e300]}
        a, b = codec.encode("tensor", t, binary_threshold=0)
        self.assertEqual(b, struct.pack("<4d", 1.0, -2.5, math.inf, 1e300))
        self.assertEqual(body(a), {"shape": [2, 2], "dtype": "float64"})
        self.assertEqual(codec.decode(a, b), t)

    def test_float32_dtype(self):
        a, b = codec.encode("embedding", [1.5, -0.25], binary_threshold=0, dtype="float32")
        self.assertEqual(b, struct.pack("<2f", 1.5, -0.25))
        self.assertEqual(codec.decode(a, b), [1.5, -0.25])

    def test_decoding_a_server_binary_with_a_binary_suffix(self):
        meta = json.dumps({"shape": [3], "dtype": "float32", "binary_format": "raw_le"}).encode()
        a = any_pb2.Any(type_url="type.googleapis.com/snakepit.embedding.binary", value=meta)
        self.assertEqual(codec.decode(a, struct.pack("<3f", 1, 2, 3)), [1.0, 2.0, 3.0])

    def test_bad_binaries_raise(self):
        meta = json.dumps({"shape": [3], "dtype": "float64"}).encode()
        a = any_pb2.Any(type_url=codec.type_url("embedding"), value=meta)
        with self.assertRaises(CodecError):   # length does not match the shape
            codec.decode(a, b"\0" * 16)
        pickled = json.dumps({"shape": [1], "dtype": "float64", "binary_format": "pickle"}).encode()
        with self.assertRaises(CodecError):   # never unpickles
            codec.decode(any_pb2.Any(type_url=codec.type_url("tensor"), value=pickled), b"\0" * 8)
        with self.assertRaises(CodecError):
            codec.decode(any_pb2.Any(type_url=codec.type_url("float"), value=b"1"), b"\0" * 8)
        with self.assertRaises(CodecError):
            codec.encode("tensor", {"shape": [2, 2], "data": [1.0]}, binary_threshold=0)
        with self.assertRaises(CodecError):
            codec.encode("embedding", [1.0], binary_threshold=0, dtype="int8")


if __name__ == "__main__":
    unittest.main()
