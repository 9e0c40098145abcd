#!/usr/bin/env python3
"""Reads a LoRA adapter directory written by moai-finetune the way PEFT lays it out, with the
standard library only (Debian has no python3-peft package), independently of the C reader.
Used by tests/test_peft.c.

    python3 tests/peft_check.py ADAPTER_DIR CONFIG_JSON

CONFIG_JSON is the base model's config.json. Checks adapter_config.json (peft_type LORA,
task_type CAUSAL_LM, r, lora_alpha, lora_dropout, target_modules, bias none,
base_model_name_or_path) and that adapter_model.safetensors holds exactly, for every layer and
target module, base_model.model.model.layers.N.<self_attn|mlp>.<module>.lora_A.weight of shape
[r, in] and lora_B.weight of shape [out, r] (F32), in PEFT's naming. Prints "r ALPHA
DROPOUT MODULES", then one line per tensor in file order: NAME SHAPE FIRST LAST (values as fp32
in Python's repr); exits non-zero with a message on anything else."""
import json
import os
import struct
import sys


def fail(msg):
    sys.exit("peft_check: " + msg)


def main():
    if len(sys.argv) != 3:
        fail("usage: peft_check.py ADAPTER_DIR CONFIG_JSON")
    adir, cpath = sys.argv[1], sys.argv[2]
    with open(os.path.join(adir, "adapter_config.json")) as f:
        ac = json.load(f)
    with open(cpath) as f:
        mc = json.load(f)
    for key, want in (("peft_type", "LORA"), ("task_type", "CAUSAL_LM"), ("bias", "none")):
        if ac.get(key) != want:
            fail("adapter_config.json: %s is %r, not %r" % (key, ac.get(key), want))
    for key in ("r", "lora_alpha", "lora_dropout", "target_modules", "base_model_name_or_path"):
        if key not in ac:
            fail("adapter_config.json: no %s" % key)
    r = ac["r"]
    if not isinstance(r, int) or r < 1:
        fail("adapter_config.json: r is %r" % r)
    D = mc["hidden_size"]
    F = mc["intermediate_size"]
    H = mc["num_attention_heads"]
    KV = mc.get("num_key_value_heads", H)
    hd = mc.get("head_dim", D // H)
    dims = {  # module: (block, out, in)
        "q_proj": ("self_attn", H * hd, D), "k_proj": ("self_attn", KV * hd, D),
        "v_proj": ("self_attn", KV * hd, D), "o_proj": ("self_attn", D, H * hd),
        "gate_proj": ("mlp", F, D), "up_proj": ("mlp", F, D), "down_proj": ("mlp", D, F),
    }
    want = {}
    for layer in range(mc["num_hidden_layers"]):
        for module in ac["target_modules"]:
            if module not in dims:
                fail("adapter_config.json: unknown target module %r" % module)
            block, out, inp = dims[module]
            stem = "base_model.model.model.layers.%d.%s.%s" % (layer, block, module)
            want[stem + ".lora_A.weight"] = [r, inp]
            want[stem + ".lora_B.weight"] = [out, r]

    with open(os.path.join(adir, "adapter_model.safetensors"), "rb") as f:
        blob = f.read()
    if len(blob) < 8:
        fail("adapter_model.safetensors: too short")
    n = struct.unpack("<Q", blob[:8])[0]
    header = json.loads(blob[8:8 + n])
    data = blob[8 + n:]
    header.pop("__metadata__", None)
    if set(header) != set(want):
        fail("tensors %s, expected %s" % (sorted(set(header) ^ set(want))[:4], "PEFT's names"))
    print("%d %r %r %s" % (r, float(ac["lora_alpha"]), float(ac["lora_dropout"]),
                           ",".join(ac["target_modules"])))
    for name, t in sorted(header.items(), key=lambda kv: kv[1]["data_offsets"][0]):
        if t["dtype"] != "F32":
            fail("%s: dtype %s" % (name, t["dtype"]))
        if t["shape"] != want[name]:
            fail("%s: shape %s, expected %s" % (name, t["shape"], want[name]))
        b, e = t["data_offsets"]
        count = want[name][0] * want[name][1]
        if e - b != 4 * count:
            fail("%s: %d bytes for %d floats" % (name, e - b, count))
        vals = struct.unpack("<%df" % count, data[b:e])
        print("%s %s %r %r" % (name, "x".join(map(str, t["shape"])), vals[0], vals[-1]))


if __name__ == "__main__":
    main()
