#!/usr/bin/env bash
# Checkpoints ready for Hugging Face tools: generation_config.json beside config.json, and a
# checkpoint stripped of its optimizer state (as the README says to share it) is still a model
# that loads: here, as the model.path of another recipe.
. tests/cli/lib.inc

{
    tiny_recipe
    printf '  max_steps: 1\n  save_dir: %s\nflavor: {device: cpu, devices: 1, memory_gb: 1}\n' "$TMP/out"
} >"$TMP/a.yaml"
"$MOAI_BIN" -q "$TMP/a.yaml" >/dev/null 2>"$TMP/a.err"
expect_eq "train: status" 0 $?
python3 - "$TMP/out" <<'PY' && ok || fail "generation_config.json"
import json, sys
g = json.load(open(sys.argv[1] + "/generation_config.json"))
assert g == {"_from_model_config": True, "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 3}, g
c = json.load(open(sys.argv[1] + "/config.json"))
assert (c["bos_token_id"], c["eos_token_id"], c["pad_token_id"]) == (1, 2, 3), c
PY

# Shared without the optimizer state: what the README says to delete.
rm "$TMP/out/optimizer.safetensors" "$TMP/out/trainer_state.json"
cat >"$TMP/b.yaml" <<YAML
model: {path: $TMP/out}
dataset: {path: datasets/debian-descriptions.jsonl.zst, limit: 16, cache_dir: $TMP/cache}
training: {batch_size: 8, block_size: 64, max_steps: 1, precision: fp32, save_dir: $TMP/out-b}
flavor: {device: cpu, devices: 1, memory_gb: 1}
YAML
"$MOAI_BIN" -q "$TMP/b.yaml" >"$TMP/b.out" 2>"$TMP/b.err"
expect_eq "fine-tuned again from the shared checkpoint: status" 0 $?
[ -s "$TMP/out-b/model.safetensors" ] && ok || fail "fine-tuned again: a checkpoint: $(cat "$TMP/b.err")"
# ... but it is no longer a checkpoint to resume: an error, not a fresh start over it.
"$MOAI_BIN" -q "$TMP/a.yaml" >/dev/null 2>"$TMP/c.err"
expect_eq "stripped checkpoint resumed: status" 2 $?
grep -q "it holds model.safetensors but no trainer_state.json" "$TMP/c.err" && ok ||
    fail "stripped checkpoint resumed: message: $(cat "$TMP/c.err")"
finish
