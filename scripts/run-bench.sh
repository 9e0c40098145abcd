#!/usr/bin/env bash
# Runs every benchmark binary; each prints its own rows of the table.
set -euo pipefail
printf '%-44s %14s %14s %s\n' "benchmark" "figure" "target" "note"
for b in "$@"; do
    "$b"
done

# The default recipe end to end (tokens cached after the first run), 12 steps.
out=$(mktemp -d)
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
rm -rf "$out"
