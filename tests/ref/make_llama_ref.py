#!/usr/bin/env python3
"""make_llama_ref.py - PyTorch reference fixtures for tests/test_llama.c and tests/test_optim.c.

Builds tiny Llama models in plain PyTorch, written here after transformers' modeling_llama
(RMSNorm in fp32, rotate_half rotary embeddings with Llama 3 rope_scaling, grouped-query eager
attention with a causal + padding mask, SwiGLU MLP, optional tied lm_head, shifted
cross-entropy with -100 ignored, nn.Embedding with padding_idx = pad_token_id), runs one
forward and backward in float32, and writes for each variant:

    tests/data/ref/<variant>.json   config, batch (tokens, labels, lengths), loss, and for each
                                    tensor its name, shape and offset (in floats) in the .bin
    tests/data/ref/<variant>.bin    little-endian float32: every weight, then every gradient

and AdamW / clip_grad_norm_ steps to tests/data/ref/adamw.{json,bin}. The fixtures are
committed; CI does not run this script. Rerun with Debian's python3-torch (1.13):

    /usr/bin/python3 tests/ref/make_llama_ref.py
"""
import json
import math
import os
import struct

import torch
import torch.nn.functional as F

OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "data", "ref")


def llama3_inv_freq(cfg):
    dim = cfg["head_dim"]
    base = cfg["rope_theta"]
    inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    rs = cfg.get("rope_scaling")
    if not rs:
        return inv_freq
    factor = rs["factor"]
    low_freq_factor = rs["low_freq_factor"]
    high_freq_factor = rs["high_freq_factor"]
    old_context_len = rs["original_max_position_embeddings"]
    low_freq_wavelen = old_context_len / low_freq_factor
    high_freq_wavelen = old_context_len / high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    inv_freq_llama = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    smooth_factor = (old_context_len / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
    smoothed_inv_freq = (1 - smooth_factor) * inv_freq_llama / factor + smooth_factor * inv_freq_llama
    is_medium_freq = ~(wavelen < high_freq_wavelen) * ~(wavelen > low_freq_wavelen)
    return torch.where(is_medium_freq, smoothed_inv_freq, inv_freq_llama)


def rotate_half(x):
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def rms_norm(x, weight, eps):
    variance = x.to(torch.float32).pow(2).mean(-1, keepdim=True)
    return weight * (x * torch.rsqrt(variance + eps))


class TinyLlama(torch.nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        D, F_, V = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
        H, KV, hd = cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["head_dim"]
        pad = cfg["pad_token_id"]
        self.embed_tokens = torch.nn.Embedding(V, D, padding_idx=pad if pad >= 0 else None)
        self.layers = torch.nn.ModuleList()
        for _ in range(cfg["num_hidden_layers"]):
            layer = torch.nn.Module()
            layer.input_layernorm = torch.nn.Parameter(torch.ones(D))
            layer.q_proj = torch.nn.Linear(D, H * hd, bias=False)
            layer.k_proj = torch.nn.Linear(D, KV * hd, bias=False)
            layer.v_proj = torch.nn.Linear(D, KV * hd, bias=False)
            layer.o_proj = torch.nn.Linear(H * hd, D, bias=False)
            layer.post_attention_layernorm = torch.nn.Parameter(torch.ones(D))
            layer.gate_proj = torch.nn.Linear(D, F_, bias=False)
            layer.up_proj = torch.nn.Linear(D, F_, bias=False)
            layer.down_proj = torch.nn.Linear(F_, D, bias=False)
            self.layers.append(layer)
        self.norm = torch.nn.Parameter(torch.ones(D))
        if cfg["tie_word_embeddings"]:
            self.lm_head = None
        else:
            self.lm_head = torch.nn.Linear(D, V, bias=False)
        self.register_buffer("inv_freq", llama3_inv_freq(cfg), persistent=False)

    def named_tensors(self):
        """(Hugging Face name, parameter) in the checkpoint's order."""
        out = [("model.embed_tokens.weight", self.embed_tokens.weight)]
        for i, layer in enumerate(self.layers):
            p = "model.layers.%d." % i
            out += [
                (p + "input_layernorm.weight", layer.input_layernorm),
                (p + "self_attn.q_proj.weight", layer.q_proj.weight),
                (p + "self_attn.k_proj.weight", layer.k_proj.weight),
                (p + "self_attn.v_proj.weight", layer.v_proj.weight),
                (p + "self_attn.o_proj.weight", layer.o_proj.weight),
                (p + "post_attention_layernorm.weight", layer.post_attention_layernorm),
                (p + "mlp.gate_proj.weight", layer.gate_proj.weight),
                (p + "mlp.up_proj.weight", layer.up_proj.weight),
                (p + "mlp.down_proj.weight", layer.down_proj.weight),
            ]
        out.append(("model.norm.weight", self.norm))
        if self.lm_head is not None:
            out.append(("lm_head.weight", self.lm_head.weight))
        return out

    def forward(self, tokens, attention_mask):
        cfg = self.cfg
        B, T = tokens.shape
        H, KV, hd = cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["head_dim"]
        eps = cfg["rms_norm_eps"]
        x = self.embed_tokens(tokens)
        # rotary tables (LlamaRotaryEmbedding.forward)
        pos = torch.arange(T).float()[None, :]
        freqs = (self.inv_freq[None, :, None].float() @ pos[:, None, :]).transpose(1, 2)
        emb = torch.cat((freqs, freqs), dim=-1)
        cos, sin = emb.cos()[:, None], emb.sin()[:, None]  # (1, 1, T, hd)
        # causal + padding mask with finfo.min, as _prepare_4d_causal_attention_mask
        minv = torch.finfo(torch.float32).min
        causal = torch.triu(torch.full((T, T), minv), diagonal=1)
        pad = (1.0 - attention_mask[:, None, None, :].float()) * minv
        mask = (causal[None, None] + pad).clamp(min=minv)
        for layer in self.layers:
            h = rms_norm(x, layer.input_layernorm, eps)
            q = layer.q_proj(h).view(B, T, H, hd).transpose(1, 2)
            k = layer.k_proj(h).view(B, T, KV, hd).transpose(1, 2)
            v = layer.v_proj(h).view(B, T, KV, hd).transpose(1, 2)
            q = q * cos + rotate_half(q) * sin
            k = k * cos + rotate_half(k) * sin
            k = k.repeat_interleave(H // KV, dim=1)
            v = v.repeat_interleave(H // KV, dim=1)
            w = torch.matmul(q, k.transpose(2, 3)) * hd ** -0.5 + mask
            w = F.softmax(w, dim=-1, dtype=torch.float32)
            a = torch.matmul(w, v).transpose(1, 2).reshape(B, T, H * hd)
            x = x + layer.o_proj(a)
            h = rms_norm(x, layer.post_attention_layernorm, eps)
            x = x + layer.down_proj(F.silu(layer.gate_proj(h)) * layer.up_proj(h))
        x = rms_norm(x, self.norm, eps)
        if self.lm_head is None:
            return x @ self.embed_tokens.weight.t()
        return self.lm_head(x)


def loss_of(logits, labels):
    V = logits.shape[-1]
    shift_logits = logits[..., :-1, :].contiguous().view(-1, V)
    shift_labels = labels[..., 1:].contiguous().view(-1)
    return F.cross_entropy(shift_logits.float(), shift_labels, ignore_index=-100)


def write_fixture(name, meta, tensors):
    """tensors: list of (name, float32 tensor); their data go to <name>.bin in order."""
    os.makedirs(OUT, exist_ok=True)
    index, offset, blob = [], 0, bytearray()
    for tname, t in tensors:
        flat = t.detach().contiguous().view(-1).tolist()
        blob += struct.pack("<%df" % len(flat), *flat)
        index.append({"name": tname, "shape": list(t.shape), "offset": offset})
        offset += len(flat)
    meta = dict(meta)
    meta["tensors"] = index
    meta["bin"] = name + ".bin"
    with open(os.path.join(OUT, name + ".bin"), "wb") as f:
        f.write(blob)
    with open(os.path.join(OUT, name + ".json"), "w") as f:
        json.dump(meta, f, indent=1)
        f.write("\n")


def make_model_fixture(name, cfg, B, T, lengths, seed, std, ignore_prompt):
    torch.manual_seed(seed)
    model = TinyLlama(cfg)
    with torch.no_grad():
        for _, p in model.named_tensors():
            if p.dim() == 1:
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
            else:
                p.normal_(0.0, std)
    V, pad = cfg["vocab_size"], cfg["pad_token_id"]
    tokens = torch.randint(1, V, (B, T))
    labels = tokens.clone()
    mask = torch.zeros(B, T, dtype=torch.int64)
    fill = pad if pad >= 0 else 0
    for b, n in enumerate(lengths):
        mask[b, :n] = 1
        tokens[b, n:] = fill
        labels[b, n:] = -100
        labels[b, :ignore_prompt] = -100   # a masked prompt
    if pad >= 0 and lengths[0] > 3:
        tokens[0, 2] = pad                 # a real pad token: padding_idx gets no gradient
    logits = model(tokens, mask)
    loss = loss_of(logits, labels)
    loss.backward()
    params = model.named_tensors()
    tensors = [(n, p) for n, p in params]
    tensors += [("grad." + n, p.grad) for n, p in params]
    meta = {
        "config": cfg,
        "batch": {"B": B, "T": T, "tokens": tokens.view(-1).tolist(),
                  "labels": labels.view(-1).tolist(), "lengths": list(lengths)},
        "loss": loss.item(),
        "targets": int((labels[:, 1:] != -100).sum().item()),
    }
    write_fixture(name, meta, tensors)
    print("%s: loss %.7f, %d tensors" % (name, loss.item(), len(params)))


def make_adamw_fixture():
    torch.manual_seed(7)
    n = 37
    p = torch.nn.Parameter(torch.randn(n))
    p0 = p.detach().clone()
    hp = {"lr": 1e-2, "betas": [0.9, 0.95], "eps": 1e-8, "weight_decay": 0.1}
    opt = torch.optim.AdamW([p], lr=hp["lr"], betas=tuple(hp["betas"]), eps=hp["eps"],
                            weight_decay=hp["weight_decay"])
    tensors = [("p0", p0)]
    for step in range(1, 4):
        g = torch.randn(n) * (10.0 ** (step - 2))
        p.grad = g.clone()
        opt.step()
        tensors += [("grad%d" % step, g), ("param%d" % step, p.detach().clone()),
                    ("exp_avg%d" % step, opt.state[p]["exp_avg"].clone()),
                    ("exp_avg_sq%d" % step, opt.state[p]["exp_avg_sq"].clone())]
    # clip_grad_norm_ over two tensors, as one flat array
    a = torch.nn.Parameter(torch.zeros(20))
    b = torch.nn.Parameter(torch.zeros(13))
    a.grad = torch.randn(20)
    b.grad = torch.randn(13) * 3
    before = torch.cat([a.grad, b.grad]).clone()
    norm = torch.nn.utils.clip_grad_norm_([a, b], max_norm=2.0)
    tensors += [("clip_before", before), ("clip_after", torch.cat([a.grad, b.grad]))]
    meta = {"adamw": hp, "steps": 3, "n": n, "clip_max_norm": 2.0, "clip_norm": norm.item()}
    write_fixture("adamw", meta, tensors)
    print("adamw: 3 steps of %d parameters, clip norm %.6f" % (n, norm.item()))


def main():
    torch.set_num_threads(1)
    gqa = {
        "hidden_size": 32, "intermediate_size": 48, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 8, "vocab_size": 64,
        "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "tie_word_embeddings": False,
        "pad_token_id": 0,
        "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                         "high_freq_factor": 4.0, "original_max_position_embeddings": 64},
    }
    make_model_fixture("llama_gqa_untied", gqa, B=2, T=16, lengths=[16, 11], seed=1, std=0.2,
                       ignore_prompt=3)
    tied = {
        "hidden_size": 24, "intermediate_size": 40, "num_hidden_layers": 1,
        "num_attention_heads": 3, "num_key_value_heads": 3, "head_dim": 8, "vocab_size": 48,
        "rms_norm_eps": 1e-6, "rope_theta": 500000.0, "tie_word_embeddings": True,
        "pad_token_id": -1, "rope_scaling": None,
    }
    make_model_fixture("llama_mha_tied", tied, B=2, T=70, lengths=[70, 66], seed=2, std=0.2,
                       ignore_prompt=0)
    make_adamw_fixture()


if __name__ == "__main__":
    main()
