#!/usr/bin/env python3
"""Writes the malformed safetensors files of this folder (stdlib only). Each NAME.safetensors
has its expected error line in NAME.expected, checked by tests/test_safetensors.c.
Run it from anywhere: python3 tests/data/bad/safetensors/make.py"""
import json
import os
import struct

HERE = os.path.dirname(os.path.abspath(__file__))
REL = "tests/data/bad/safetensors"


def header(obj, pad=True):
    h = json.dumps(obj).encode() if not isinstance(obj, bytes) else obj
    if pad:
        h += b" " * (-len(h) % 8)
    return h


def write(name, data, expected):
    with open(os.path.join(HERE, name + ".safetensors"), "wb") as f:
        f.write(data)
    with open(os.path.join(HERE, name + ".expected"), "w") as f:
        f.write(expected.replace("FILE", f"{REL}/{name}.safetensors") + "\n")


def file(obj, data=b"", n=None):
    h = header(obj)
    return struct.pack("<Q", len(h) if n is None else n) + h + data


ok = {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}
write("empty", b"", "FILE: file too short for a safetensors header (0 bytes)")
write("short", b"\x01\x02\x03", "FILE: file too short for a safetensors header (3 bytes)")
write("header-too-long", struct.pack("<Q", 1000) + b"{}",
      "FILE: header length 1000 runs past the end of the file (10 bytes)")
write("header-huge", struct.pack("<Q", 1 << 62) + b"{}",
      "FILE: header length 4611686018427387904 runs past the end of the file (10 bytes)")
write("not-json", file(b"{\"a\": [1, 2"),
      "FILE: header is not JSON: ']' expected near end of file (column 16)")
write("not-object", file([1, 2, 3]), "FILE: header is not a JSON object")
write("entry-not-object", file({"w": 5}), "FILE: tensor 'w': entry is not an object")
write("dtype-missing", file({"w": {"shape": [2], "data_offsets": [0, 8]}}, b"\0" * 8),
      "FILE: tensor 'w': 'dtype' is not a string")
write("dtype-unknown", file({"w": {"dtype": "F12", "shape": [2], "data_offsets": [0, 8]}},
                            b"\0" * 8), "FILE: tensor 'w': unknown dtype 'F12'")
write("dtype-unsupported", file({"w": {"dtype": "I64", "shape": [1], "data_offsets": [0, 8]}},
                                b"\0" * 8),
      "FILE: tensor 'w': dtype I64 is not supported (F32, F16 and BF16 are)")
write("shape-negative", file({"w": {"dtype": "F32", "shape": [-2], "data_offsets": [0, 8]}},
                             b"\0" * 8),
      "FILE: tensor 'w': shape has a negative or non-integer size")
write("shape-overflow", file({"w": {"dtype": "F32", "shape": [1 << 40, 1 << 40],
                                    "data_offsets": [0, 8]}}, b"\0" * 8),
      "FILE: tensor 'w': shape is too large")
write("offsets-past-end", file({"w": {"dtype": "F32", "shape": [3], "data_offsets": [0, 12]}},
                               b"\0" * 8),
      "FILE: tensor 'w': data offsets [0, 12) run past the end of the data area (8 bytes)")
write("offsets-reversed", file({"w": {"dtype": "F32", "shape": [0], "data_offsets": [8, 4]}},
                               b"\0" * 8),
      "FILE: tensor 'w': data offsets [8, 4) are not an interval")
write("offsets-not-two", file({"w": {"dtype": "F32", "shape": [2], "data_offsets": [0]}},
                              b"\0" * 8), "FILE: tensor 'w': 'data_offsets' is not two integers")
write("length-mismatch", file({"w": {"dtype": "BF16", "shape": [2, 3], "data_offsets": [0, 8]}},
                              b"\0" * 8),
      "FILE: tensor 'w': 8 bytes of data, but BF16 x 6 elements need 12")
write("overlap", file({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
                       "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}}, b"\0" * 12),
      "FILE: tensors 'a' and 'b' overlap")
write("duplicate-name", file(b'{"w": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]},'
                             b' "w": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]}}',
                             b"\0" * 8),
      "FILE: header is not JSON: duplicate object key near '\"w\"' (column 65)")
write("metadata-not-object", file({"__metadata__": 3, "w": ok}, b"\0" * 8),
      "FILE: '__metadata__' is not an object")
write("too-many-dims", file({"w": {"dtype": "F32", "shape": [1] * 9, "data_offsets": [0, 4]}},
                            b"\0" * 4),
      "FILE: tensor 'w': 'shape' is not a list of at most 8 sizes")
write("header-not-utf8", file(b'{"w\xff": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}',
                             b"\0" * 4),
      "FILE: header is not JSON: unable to decode byte 0xff near '\"w' (column 3)")
write("header-trailing-garbage", file(b"{} x"),
      "FILE: header is not JSON: end of file expected near 'x' (column 4)")
write("gap", file({"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]},
                   "b": {"dtype": "F32", "shape": [1], "data_offsets": [8, 12]}}, b"\0" * 12),
      "FILE: bytes [4, 8) of the data area belong to no tensor")
write("trailing-bytes", file({"w": ok}, b"\0" * 12),
      "FILE: bytes [8, 12) of the data area belong to no tensor")
write("empty-inside", file({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
                            "b": {"dtype": "F32", "shape": [0], "data_offsets": [4, 4]}},
                           b"\0" * 8),
      "FILE: tensors 'a' and 'b' overlap")
write("offsets-float", file({"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8.0]}},
                            b"\0" * 8), "FILE: tensor 'w': 'data_offsets' is not two integers")
write("shape-not-list", file({"w": {"dtype": "F32", "shape": 2, "data_offsets": [0, 8]}},
                             b"\0" * 8),
      "FILE: tensor 'w': 'shape' is not a list of at most 8 sizes")
write("dtype-not-string", file({"w": {"dtype": 4, "shape": [2], "data_offsets": [0, 8]}},
                               b"\0" * 8), "FILE: tensor 'w': 'dtype' is not a string")
write("metadata-value-not-string", file({"__metadata__": {"format": 1}, "w": ok}, b"\0" * 8),
      "FILE: '__metadata__' value 'format' is not a string")
write("offsets-huge", file({"w": {"dtype": "F32", "shape": [2],
                                  "data_offsets": [(1 << 63) - 8, (1 << 63) - 1]}}, b"\0" * 8),
      "FILE: tensor 'w': data offsets [9223372036854775800, 9223372036854775807) run past the "
      "end of the data area (8 bytes)")
