#!/usr/bin/env python3
"""autocast_deviation.py - how far PyTorch's bf16 autocast strays from its own fp32 on the
fixtures of tests/data/ref (the same weights and batch test_llama.c checks our bf16 against).

For each fixture: the loss and every gradient under torch.autocast("cpu", dtype=torch.bfloat16)
against the fp32 ones stored in the fixture, as test_llama.c's test_llama_ref_bf16 measures
ours (relative: |loss difference| / |loss|; per gradient the 2-norm of the difference over the
2-norm). The figures justify that test's bounds. Not run by CI; Debian's python3-torch:

    /usr/bin/python3 tests/ref/autocast_deviation.py
"""
import json
import os
import struct

import torch

from make_llama_ref import TinyLlama, loss_of

REF = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "data", "ref")


def load(name):
    meta = json.load(open(os.path.join(REF, name + ".json")))
    raw = open(os.path.join(REF, meta["bin"]), "rb").read()
    data = struct.unpack("<%df" % (len(raw) // 4), raw)
    tensors = {}
    for t in meta["tensors"]:
        n = 1
        for d in t["shape"]:
            n *= d
        tensors[t["name"]] = torch.tensor(data[t["offset"]:t["offset"] + n]).view(t["shape"])
    return meta, tensors


def main():
    for name in ("llama_gqa_untied", "llama_mha_tied"):
        meta, ref = load(name)
        cfg = dict(meta["config"])
        if cfg.get("rope_scaling"):
            cfg["rope_scaling"] = dict(cfg["rope_scaling"])
        model = TinyLlama(cfg)
        with torch.no_grad():
            for n, p in model.named_tensors():
                p.copy_(ref[n])
        b = meta["batch"]
        B, T = b["B"], b["T"]
        tokens = torch.tensor(b["tokens"]).view(B, T)
        labels = torch.tensor(b["labels"]).view(B, T)
        mask = torch.zeros(B, T, dtype=torch.int64)
        for i, n in enumerate(b["lengths"]):
            mask[i, :n] = 1
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logits = model(tokens, mask)
        loss = loss_of(logits, labels)
        loss.backward()
        worst, where = 0.0, ""
        for n, p in model.named_tensors():
            g = ref["grad." + n]
            e = ((p.grad - g).norm() / g.norm()).item() if g.norm() > 0 else 0.0
            if e > worst:
                worst, where = e, n
        print("%s: autocast loss relative error %.2g, worst gradient %.2g (%s)" % (
            name, abs(loss.item() - meta["loss"]) / abs(meta["loss"]), worst, where))


if __name__ == "__main__":
    main()
