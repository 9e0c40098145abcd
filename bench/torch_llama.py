#!/usr/bin/env python3
"""torch_llama.py - PyTorch's training-step throughput on bench_llama's shapes, for make bench.

The model is the plain-PyTorch Llama of tests/ref/make_llama_ref.py (TinyLlama); a step is
what bench_llama times: zero the gradients, forward and backward of B x T tokens, clip the
gradient norm to 1, AdamW. fp32, and bf16 under torch.autocast("cpu", dtype=torch.bfloat16)
(weights, gradients and AdamW in fp32, as our bf16). 2 threads, the median of the timed steps
after one warm-up step. Prints rows of make bench's table; needs Debian's python3-torch (run
it with /usr/bin/python3), run-bench.sh skips the rows without it.

PyTorch at its best here (tune()): the script re-executes itself once with glibc's malloc
keeping freed memory (MALLOC_MMAP_MAX_=0, MALLOC_TRIM_THRESHOLD_): otherwise every step maps
its large activations afresh and pays for zeroing their pages, which halves the fp32 speed and
cuts autocast's by 7x on this machine; and, on a cpu with AVX-512, OpenBLAS's SkylakeX kernels
for the fp32 products (Debian's torch calls OpenBLAS, which the machine may pin to Haswell).

    /usr/bin/python3 bench/torch_llama.py             both shapes, fp32 and bf16
    /usr/bin/python3 bench/torch_llama.py tiny bf16   one shape, one precision

With --losses N it instead prints, for the tiny shape, the losses of N steps in fp32 and under
autocast from the same initial weights and batches (the deviation bf16 brings in PyTorch).
"""
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "ref"))
from make_llama_ref import TinyLlama, loss_of  # noqa: E402

SHAPES = {  # name: D, L, H, F, V, T, B, timed steps (bench_llama's)
    "tiny": (288, 6, 6, 768, 32000, 256, 8, 10),
    "small": (768, 12, 12, 2048, 32000, 512, 4, 5),
}


def config(D, L, H, F_, V, T):
    return {"hidden_size": D, "intermediate_size": F_, "num_hidden_layers": L,
            "num_attention_heads": H, "num_key_value_heads": H, "head_dim": D // H,
            "vocab_size": V, "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "rope_scaling": None,
            "tie_word_embeddings": False, "pad_token_id": -1}


def flops_per_token(D, L, H, F_, V, T):
    layer = 4 * D * D + 3 * D * F_
    return 6.0 * (L * layer + V * D) + 12.0 * L * T * D


def step(model, opt, tokens, mask, bf16):
    opt.zero_grad(set_to_none=False)
    if bf16:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logits = model(tokens, mask)
    else:
        logits = model(tokens, mask)
    loss = loss_of(logits, tokens)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    return loss.item()


def make(name, seed=42):
    D, L, H, F_, V, T, B, steps = SHAPES[name]
    torch.manual_seed(seed)
    model = TinyLlama(config(D, L, H, F_, V, T))
    for p in model.parameters():
        if p.dim() == 2:
            torch.nn.init.normal_(p, std=0.02)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.999), eps=1e-8,
                            weight_decay=0.01)
    g = torch.Generator().manual_seed(7)
    tokens = torch.randint(0, V, (B, T), generator=g)
    mask = torch.ones(B, T, dtype=torch.int64)
    return model, opt, tokens, mask


def bench(name, bf16):
    D, L, H, F_, V, T, B, steps = SHAPES[name]
    model, opt, tokens, mask = make(name)
    times, loss = [], 0.0
    for k in range(steps + 1):
        t0 = time.perf_counter()
        loss = step(model, opt, tokens, mask, bf16)
        if k > 0:
            times.append(time.perf_counter() - t0)
    med = statistics.median(times)
    tok_s = B * T / med
    gflops = tok_s * flops_per_token(D, L, H, F_, V, T) * 1e-9
    row = "pytorch %s %s, 2 threads" % (name, "bf16 autocast" if bf16 else "fp32")
    note = "%.1f GFLOP/s; torch %s; median of %d steps of %.3f s; loss %.3f; OpenBLAS %s" % (
        gflops, torch.__version__, steps, med, loss, os.environ.get("OPENBLAS_CORETYPE", "auto"))
    print("%-44s %14s %14s %s" % (row, "%.0f tokens/s" % tok_s, "-", note), flush=True)


def losses(n):
    out = {}
    for bf16 in (False, True):
        model, opt, tokens, mask = make("tiny")
        g = torch.Generator().manual_seed(11)
        seq = []
        for k in range(n):
            batch = torch.randint(0, SHAPES["tiny"][4], tokens.shape, generator=g)
            seq.append(step(model, opt, batch, mask, bf16))
            print("%s step %d: %.6f" % ("bf16" if bf16 else "fp32", k + 1, seq[-1]), flush=True)
        out["bf16" if bf16 else "fp32"] = seq
    worst = max(abs(a - b) / abs(a) for a, b in zip(out["fp32"], out["bf16"]))
    print("pytorch tiny, %d steps: fp32 %s" % (n, " ".join("%.4f" % x for x in out["fp32"])))
    print("pytorch tiny, %d steps: bf16 %s" % (n, " ".join("%.4f" % x for x in out["bf16"])))
    print("pytorch tiny: autocast's largest relative deviation from fp32: %.2e" % worst)


def tune():
    """Re-executes this script once with the allocator and BLAS settings above."""
    if os.environ.get("MOAI_TORCH_TUNED") == "1":
        return
    env = dict(os.environ, MOAI_TORCH_TUNED="1", MALLOC_MMAP_MAX_="0",
               MALLOC_TRIM_THRESHOLD_=str(1 << 40), OMP_NUM_THREADS="2")
    try:
        with open("/proc/cpuinfo") as f:
            avx512 = any(line.startswith("flags") and " avx512f" in line for line in f)
    except OSError:
        avx512 = False
    if avx512:
        env["OPENBLAS_CORETYPE"] = "SkylakeX"
    sys.stdout.flush()
    os.execve(sys.executable, [sys.executable] + sys.argv, env)


def main():
    tune()
    torch.set_num_threads(2)
    if len(sys.argv) > 2 and sys.argv[1] == "--losses":
        losses(int(sys.argv[2]))
        return
    for name in SHAPES:
        if len(sys.argv) > 1 and sys.argv[1] != name:
            continue
        for bf16 in (False, True):
            if len(sys.argv) > 2 and sys.argv[2] != ("bf16" if bf16 else "fp32"):
                continue
            bench(name, bf16)


if __name__ == "__main__":
    main()
