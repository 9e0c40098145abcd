#!/usr/bin/env bash
# Runs every benchmark binary; each prints its own rows of the table.
set -euo pipefail
# Llama 3's tokenizer.json for bench_data, built from npm's llama3-tokenizer-js (as the CLI test
# tests/cli/tokenizers.sh does); the row is skipped when npm cannot install it.
ref=build/tokref/bench
if ! [ -s "$ref/llama3/tokenizer.json" ]; then
    mkdir -p build/npm-ref
    if [ -d build/npm-ref/node_modules/js-tiktoken ] ||
        npm install --prefix build/npm-ref --no-audit --no-fund --silent \
            llama3-tokenizer-js@1.2.0 js-tiktoken@1.0.21 >/dev/null 2>&1; then
        NODE_PATH_BASE=build/npm-ref node tests/ref/tokenizers.mjs "$ref" >/dev/null 2>&1 || true
    fi
fi
[ -s "$ref/llama3/tokenizer.json" ] && export MOAI_BENCH_LLAMA3=$ref/llama3/tokenizer.json
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
printf '%-44s %14s %14s %s\n' "benchmark" "figure" "target" "note"
for b in "$@"; do
    "$b"
done

# PyTorch's own step on the same shapes, fp32 and bf16 autocast, with Debian's python3-torch
# (its /usr/bin/python3); the rows are skipped without it. Then our trainer's bf16 step on 1
# device against PyTorch's autocast step on the tiny shape, measured back to back twice
# (ours, PyTorch's, ours, PyTorch's: a load that drifts weighs on both alike); the figure is
# the ratio of the means.
if /usr/bin/python3 -c "import torch" >/dev/null 2>&1; then
    /usr/bin/python3 bench/torch_llama.py || echo "pytorch: no result"
    for k in 1 2; do
        build/bench/bench_train tiny bf16 1 >>"$out/ours"
        /usr/bin/python3 bench/torch_llama.py tiny bf16 >>"$out/theirs"
    done
    python3 - "$out/ours" "$out/theirs" <<'PY' || echo "trainer bf16 / pytorch autocast: no result"
import re, statistics, sys
ours = [float(x) for x in re.findall(r"^train tiny bf16, 1 device\s+(\d+) tok/s", open(sys.argv[1]).read(), re.M)]
theirs = [float(x) for x in re.findall(r"^pytorch tiny bf16 autocast.*?\s(\d+) tokens/s", open(sys.argv[2]).read(), re.M)]
name = "train tiny bf16 / pytorch bf16 autocast"
if not ours or not theirs:
    print("%-44s %14s %14s %s" % (name, "skipped", "-", "no bf16 figure (a cpu without AVX512_BF16?)"))
else:
    print("%-44s %14s %14s %s" % (name, "%.2fx" % (statistics.mean(ours) / statistics.mean(theirs)),
          ">= 1.30x", "back to back: our trainer on 1 cpu device %s tok/s, PyTorch %s tok/s" % (
              " and ".join("%.0f" % x for x in ours), " and ".join("%.0f" % x for x in theirs))))
PY
else
    printf '%-44s %14s %14s %s\n' "pytorch fp32 and bf16 autocast" "skipped" "-" \
        "python3-torch is not installed"
fi

# The default recipe end to end (tokens cached after the first run), 12 steps.
build/moai-finetune -q --json --set training.max_steps=12 --set "training.save_dir=$out/ckpt" \
    configs/tiny-llama.yaml 2>/dev/null | tail -n 1 >"$out/final.json"
python3 - "$out/final.json" <<'PY' || echo "default recipe: no result"
import json, sys
j = json.load(open(sys.argv[1]))
fig = "%.0f tok/s" % j["median_tokens_per_s"]
note = "median of 11 steps of %.3f s; 2 cpu devices, batch 16 x 256; peak %d bytes/device, planned %d" % (
    j["median_step_s"], j["peak_bytes"][0], j["predicted_bytes_per_device"])
print("%-44s %14s %14s %s" % ("train: configs/tiny-llama.yaml (make run)", fig, "-", note))
PY

# The default recipe's whole run in fp32 and in bf16 (products in bf16 where the cpu has
# AVX512_BF16): how far the bf16 loss curve strays from fp32's, step by step, and each speed.
for p in fp32 bf16; do
    build/moai-finetune -q --json --set "training.precision=$p" --set training.log_interval=1 \
        --set "training.save_dir=$out/curve-$p" configs/tiny-llama.yaml 2>/dev/null >"$out/curve-$p.jsonl"
done
python3 - "$out/curve-fp32.jsonl" "$out/curve-bf16.jsonl" <<'PY' || echo "bf16 loss curve: no result"
import json, sys
runs = [list(map(json.loads, open(p))) for p in sys.argv[1:]]
a, b = ([o["loss"] for o in r if "step" in o and "loss" in o] for r in runs)
rel = [abs(x - y) / abs(x) for x, y in zip(a, b)]
worst = max(rel)
speed = ", ".join("%s %.0f tok/s" % (n, r[-1]["median_tokens_per_s"]) for n, r in zip(["fp32", "bf16"], runs))
print("%-44s %14s %14s %s" % ("bf16 vs fp32 loss, configs/tiny-llama.yaml", "%.2e" % worst, "<= 1e-2",
      "worst relative deviation over %d steps (step %d), mean %.1e; %s" % (
          len(rel), rel.index(worst) + 1, sum(rel) / len(rel), speed)))
PY

# Sequence packing: the default recipe's real (non-padding) tokens per second and padding
# fraction without and with dataset.packing, measured in this run in the order unpacked,
# packed, packed, unpacked (so a load that drifts during the bench weighs on both alike), 10
# steps each; medians of each run's steps 2..10 (the target is the ratio of the two medians).
for p in false true true false; do
    build/moai-finetune -q --json --set training.max_steps=10 --set training.log_interval=1 \
        --set dataset.packing=$p --set "training.save_dir=$out/pack-$p" configs/tiny-llama.yaml \
        2>/dev/null >>"$out/pack-$p.json" || true
    rm -rf "$out/pack-$p"
done
python3 - "$out/pack-false.json" "$out/pack-true.json" models/tiny-llama/config.json <<'PY' ||
import json, statistics, sys
# What a step would cost if time followed FLOPs: the layers' products over every position of
# every row (padding too), lm_head over the scored tokens only (every real token but each
# example's first), and attention at most 12 L D T/2 a position. Counting the unpacked rows'
# attention at that most and the packed rows' at nothing, the ratio of FLOPs per real token is
# an upper bound on packing's speed-up.
cfg = json.load(open(sys.argv[3]))
D, F, L, V = (cfg[k] for k in ("hidden_size", "intermediate_size", "num_hidden_layers", "vocab_size"))
H, KV = cfg["num_attention_heads"], cfg.get("num_key_value_heads", cfg["num_attention_heads"])
hd = cfg.get("head_dim", D // H)
layer = D * H * hd + 2 * D * KV * hd + H * hd * D + 3 * D * F
T = 256
def flops(rows, real, examples, attention):
    return 6.0 * L * layer * rows * T + 6.0 * V * D * (real - examples) + attention * 12.0 * L * D * T / 2 * rows * T
res = []
for path in sys.argv[1:3]:
    steps = [json.loads(l) for l in open(path)]
    steps = [s for s in steps if "step" in s and "status" not in s and s["step"] > 1]
    rate = statistics.median(s["real_tokens_per_s"] for s in steps)
    rows, real, ex = (sum(s[k] for s in steps) for k in ("rows", "real_tokens", "examples"))
    res.append((rate, 1 - real / (rows * T), ex / len(steps), len(steps), rows, real, ex))
for (rate, pad, ex, n, *_), name in zip(res, ["unpacked", "packed"]):
    print("%-44s %14s %14s %s" % ("train: tiny-llama.yaml real tokens, " + name, "%.0f tok/s" % rate,
          "-", "median of %d steps; %.1f%% padding, %.1f examples a step of 16 rows" % (n, 100 * pad, ex)))
(_, _, _, _, ru, xu, eu), (_, _, _, _, rp, xp, ep) = res
per_u = flops(ru, xu, eu, 1) / xu
bound = per_u / (flops(rp, xp, ep, 0) / xp)
full = per_u / (flops(rp * xp / (rp * T), xp, ep, 0) / xp)  # the packed rows without any padding
print("%-44s %14s %14s %s" % ("train: packing speed-up, real tokens/s", "%.2fx" % (res[1][0] / res[0][0]),
      ">= 1.70x", "packed / unpacked medians above; if time followed FLOPs at most %.2fx "
      "(%.2fx with no padding at all): lm_head, %.0f%% of a packed step's FLOPs, scores every real "
      "token either way" % (bound, full, 100 * 6.0 * V * D * (xp - ep) / flops(rp, xp, ep, 0))))
PY
    echo "packing: no result"

# The whole process against the planner's prediction (VmHWM at the end of the run): the
# default recipe above, and a 111M-parameter model on 4 cpu devices as pp 2 x tp 2.
cat >"$out/m111.yaml" <<YAML
model:
  init: random
  config: {hidden_size: 1024, intermediate_size: 2816, num_hidden_layers: 8,
           num_attention_heads: 16, num_key_value_heads: 8, vocab_size: 8000,
           max_position_embeddings: 512}
tokenizer: models/tiny-llama/tokenizer.model
dataset:
  path: datasets/debian-descriptions.jsonl.zst
  template: "[SUMMARIZE] {article} [/SUMMARIZE]\n{highlights}"
  limit: 2000
training: {batch_size: 4, block_size: 64, max_steps: 1, precision: fp32, save_dir: $out/m111}
flavor: {device: cpu, devices: 4}
parallel: {pp: 2, tp: 2}
YAML
build/moai-finetune -q --json "$out/m111.yaml" 2>/dev/null | tail -n 1 >"$out/m111.json"
python3 - "$out/final.json" "$out/m111.json" <<'PY' || echo "process memory: no result"
import json, sys
for path, name in zip(sys.argv[1:], ["default recipe, 2 devices", "111M, pp 2 x tp 2"]):
    j = json.load(open(path))
    q = j["process_peak_bytes"] / j["process_predicted_bytes"]
    print("%-44s %14s %14s %s" % ("process memory: " + name, "%.3f" % q, "0.9-1.1",
          "peak resident %d bytes (VmHWM), predicted %d" % (j["process_peak_bytes"],
                                                             j["process_predicted_bytes"])))
PY
