#!/usr/bin/env python3
"""make_lora_ref.py - the PyTorch reference fixture of LoRA for tests/test_llama.c.

The tiny grouped-query Llama of make_llama_ref.py with PEFT's LoRA written out in plain
PyTorch on every target projection: y = base(x) + (alpha / r) (x A^T) B^T (lora_dropout 0, as
a reference cannot share a dropout mask), the base frozen (requires_grad False), A and B
non-zero. Writes tests/data/ref/lora_gqa.{json,bin}: the base weights (Hugging Face names),
the adapters and their gradients (PEFT's names, "grad." before them), the loss, and the losses
of 4 steps of torch.optim.AdamW on the adapters alone after clip_grad_norm_. The fixture is
committed; CI does not run this script. Rerun with Debian's python3-torch (1.13):

    /usr/bin/python3 tests/ref/make_lora_ref.py
"""
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from make_llama_ref import TinyLlama, loss_of, write_fixture  # noqa: E402

TARGETS = [("self_attn", "q_proj"), ("self_attn", "k_proj"), ("self_attn", "v_proj"),
           ("self_attn", "o_proj"), ("mlp", "gate_proj"), ("mlp", "up_proj"),
           ("mlp", "down_proj")]


class LoraLinear(torch.nn.Module):
    """PEFT's lora.Linear without dropout: the base's output plus the scaled adapter's."""

    def __init__(self, base, r, alpha):
        super().__init__()
        self.base = base
        self.lora_A = torch.nn.Parameter(torch.empty(r, base.in_features))
        self.lora_B = torch.nn.Parameter(torch.empty(base.out_features, r))
        self.scaling = alpha / r

    def forward(self, x):
        return self.base(x) + (x @ self.lora_A.t()) @ self.lora_B.t() * self.scaling


def main():
    torch.set_num_threads(1)
    torch.manual_seed(3)
    cfg = {
        "hidden_size": 32, "intermediate_size": 48, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 8, "vocab_size": 64,
        "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "tie_word_embeddings": False,
        "pad_token_id": 0, "rope_scaling": None,
    }
    r, alpha = 4, 8.0
    B, T, lengths = 2, 16, [16, 12]
    model = TinyLlama(cfg)
    with torch.no_grad():
        for _, p in model.named_tensors():
            if p.dim() == 1:
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
            else:
                p.normal_(0.0, 0.2)
    base = [(n, p.detach().clone()) for n, p in model.named_tensors()]
    for p in model.parameters():
        p.requires_grad_(False)
    adapters = []
    for i, layer in enumerate(model.layers):
        for block, name in TARGETS:
            lin = LoraLinear(getattr(layer, name), r, alpha)
            with torch.no_grad():
                bound = 1.0 / lin.base.in_features ** 0.5
                lin.lora_A.uniform_(-bound, bound)
                lin.lora_B.normal_(0.0, 0.1)  # non-zero: a trained adapter
            setattr(layer, name, lin)
            stem = "base_model.model.model.layers.%d.%s.%s" % (i, block, name)
            adapters += [(stem + ".lora_A.weight", lin.lora_A), (stem + ".lora_B.weight", lin.lora_B)]
    V = cfg["vocab_size"]
    tokens = torch.randint(1, V, (B, T))
    labels = tokens.clone()
    mask = torch.zeros(B, T, dtype=torch.int64)
    for b, n in enumerate(lengths):
        mask[b, :n] = 1
        tokens[b, n:] = 0
        labels[b, n:] = -100
        labels[b, :2] = -100
    start = [(n, p.detach().clone()) for n, p in adapters]
    loss = loss_of(model(tokens, mask), labels)
    loss.backward()
    grads = [("grad." + n, p.grad.detach().clone()) for n, p in adapters]

    hp = {"lr": 2e-2, "betas": [0.9, 0.95], "eps": 1e-8, "weight_decay": 0.1, "clip": 0.5}
    params = [p for _, p in adapters]
    opt = torch.optim.AdamW(params, lr=hp["lr"], betas=tuple(hp["betas"]), eps=hp["eps"],
                            weight_decay=hp["weight_decay"])
    losses = []
    for step in range(4):
        opt.zero_grad()
        step_loss = loss_of(model(tokens, mask), labels)
        step_loss.backward()
        losses.append(step_loss.item())
        torch.nn.utils.clip_grad_norm_(params, max_norm=hp["clip"])
        opt.step()
    meta = {
        "config": cfg,
        "lora": {"r": r, "lora_alpha": alpha},
        "batch": {"B": B, "T": T, "tokens": tokens.view(-1).tolist(),
                  "labels": labels.view(-1).tolist(), "lengths": lengths},
        "loss": loss.item(),
        "targets": int((labels[:, 1:] != -100).sum().item()),
        "adamw": hp,
        "step_losses": losses,
    }
    write_fixture("lora_gqa", meta, base + start + grads)
    print("lora_gqa: loss %.7f, step losses %s" % (loss.item(), losses))


if __name__ == "__main__":
    main()
