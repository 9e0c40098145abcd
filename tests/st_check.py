#!/usr/bin/env python3
"""Reads safetensors files written by moai-finetune the way the format's specification says,
with the standard library only (Debian has no python3-safetensors package), independently of
the C reader. Used by tests/test_safetensors.c.

    python3 tests/st_check.py FILE.safetensors        one file
    python3 tests/st_check.py DIR/model.safetensors.index.json   an index and its shards

Prints one line per tensor, NAME DTYPE SHAPE FIRST LAST (the first and last values as fp32, in
Python's shortest repr), in file order (shards in name order), and exits non-zero with a
message on anything the specification forbids or the writer promises not to do."""
import json
import os
import struct
import sys

SIZES = {"F32": 4, "F16": 2, "BF16": 2}


def fail(msg):
    sys.exit("st_check: " + msg)


def value(raw, dtype):
    if dtype == "F32":
        return struct.unpack("<f", raw)[0]
    if dtype == "BF16":
        return struct.unpack("<f", b"\0\0" + raw)[0]
    return struct.unpack("<e", raw)[0]


def check_file(path):
    """Returns the tensors of one file as (name, dtype, shape, nbytes) in file order."""
    with open(path, "rb") as f:
        data = f.read()
    if len(data) < 8:
        fail(f"{path}: shorter than 8 bytes")
    (n,) = struct.unpack("<Q", data[:8])
    if 8 + n > len(data):
        fail(f"{path}: header length {n} past the end")
    if n % 8:
        fail(f"{path}: header not padded to a multiple of 8 bytes")
    text = data[8:8 + n].decode("utf-8")
    if not text.startswith("{") or text.rstrip(" ") != text.rstrip(" ").rstrip():
        fail(f"{path}: header does not start with '{{' or is padded with other than spaces")
    header = json.loads(text, object_pairs_hook=lambda pairs: pairs)
    names = [k for k, _ in header]
    if len(set(names)) != len(names):
        fail(f"{path}: duplicate names")
    area = data[8 + n:]
    end = 0
    out = []
    for name, entry in header:
        entry = dict(entry)
        if name == "__metadata__":
            if entry != {"format": "pt"}:
                fail(f"{path}: metadata {entry}")
            continue
        if sorted(entry) != ["data_offsets", "dtype", "shape"]:
            fail(f"{path}: {name}: keys {sorted(entry)}")
        begin, stop = entry["data_offsets"]
        if begin != end:
            fail(f"{path}: {name}: not contiguous in header order")
        count = 1
        for d in entry["shape"]:
            if not isinstance(d, int) or d < 0:
                fail(f"{path}: {name}: bad size {d}")
            count *= d
        size = SIZES[entry["dtype"]]
        if stop - begin != count * size:
            fail(f"{path}: {name}: {stop - begin} bytes for {count} x {entry['dtype']}")
        raw = area[begin:stop]
        if count:
            first = repr(value(raw[:size], entry["dtype"]))
            last = repr(value(raw[-size:], entry["dtype"]))
        else:
            first = last = "-"
        print(name, entry["dtype"], entry["shape"], first, last)
        out.append(name)
        end = stop
    if end != len(area):
        fail(f"{path}: the data area has bytes no tensor owns")
    return out, len(area)


def check_index(path):
    with open(path) as f:
        index = json.load(f)
    folder = os.path.dirname(path)
    weight_map = index["weight_map"]
    if list(weight_map) != sorted(weight_map):
        fail(f"{path}: weight_map keys not sorted")
    total = 0
    seen = {}
    for shard in sorted(set(weight_map.values())):
        names, nbytes = check_file(os.path.join(folder, shard))
        total += nbytes
        for name in names:
            seen[name] = shard
    if seen != weight_map:
        fail(f"{path}: weight_map does not match the shards")
    if index["metadata"]["total_size"] != total:
        fail(f"{path}: total_size {index['metadata']['total_size']}, shards hold {total}")


if sys.argv[1].endswith(".json"):
    check_index(sys.argv[1])
else:
    check_file(sys.argv[1])
