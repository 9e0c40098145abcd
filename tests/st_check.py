#!/usr/bin/env python3
"""Reads a safetensors file the way the format's specification says, with the standard library
only (Debian has no python3-safetensors), and prints NAME DTYPE SHAPE FIRST-VALUE per tensor.
Exits non-zero on anything the specification forbids. Used by tests/test_safetensors.c."""
import json
import struct
import sys

SIZES = {"F32": 4, "F16": 2, "BF16": 2}
data = open(sys.argv[1], "rb").read()
(n,) = struct.unpack("<Q", data[:8])
assert n % 8 == 0, "header not padded to 8 bytes"
text = data[8:8 + n].decode("utf-8")
assert text.rstrip(" ") == text.rstrip(), "padding is not spaces"
header = json.loads(text)
area = data[8 + n:]
end = 0
for name, t in header.items():
    if name == "__metadata__":
        assert t == {"format": "pt"}, t
        continue
    begin, stop = t["data_offsets"]
    assert begin == end, "tensors are not contiguous in header order"
    count = 1
    for d in t["shape"]:
        count *= d
    assert stop - begin == count * SIZES[t["dtype"]], name
    raw = area[begin:stop]
    if t["dtype"] == "F32":
        first = struct.unpack("<f", raw[:4])[0]
    else:
        first = struct.unpack("<f", b"\0\0" + raw[:2])[0]
    print(name, t["dtype"], t["shape"], repr(round(first, 6)))
    end = stop
assert end == len(area), "data area has bytes no tensor owns"
