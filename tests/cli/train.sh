#!/usr/bin/env bash
# Training end to end on a tiny random model: the documented step lines and final messages,
# the checkpoint layout, --json, resuming to the same losses, SIGINT saving, and the
# OUT_OF_MEMORY report of a device that is too small.
. tests/cli/lib.inc


# A whole run: step lines, final lines, checkpoint.
dp_recipe "$TMP/a.yaml" "$TMP/out-a" "max_steps: 6"
"$MOAI_BIN" -q "$TMP/a.yaml" >"$TMP/a.out" 2>"$TMP/a.err"
expect_eq "train: status" 0 $?
expect_eq "train: step lines" 6 "$(grep -cE '^\[Step [1-6]/6\] \| Loss: [0-9]+(\.[0-9]+)? \| Duration: [0-9]+\.[0-9]{2} \| Throughput: [0-9]+\.[0-9]{2} tokens/sec$' "$TMP/a.out")"
expect_eq "train: final lines" "Training Done
Saving Model...
Model saved in '$TMP/out-a'" "$(tail -n 3 "$TMP/a.out")"
for f in config.json model.safetensors tokenizer.model plan.json optimizer.safetensors trainer_state.json; do
    [ -s "$TMP/out-a/$f" ] && ok || fail "checkpoint lacks $f"
done
python3 - "$TMP/out-a" <<'PY' && ok || fail "checkpoint files are what other tools read"
import json, struct, sys
d = sys.argv[1]
cfg = json.load(open(d + "/config.json"))
assert cfg["architectures"] == ["LlamaForCausalLM"] and cfg["hidden_size"] == 32, cfg
assert json.load(open(d + "/trainer_state.json"))["step"] == 6
raw = open(d + "/model.safetensors", "rb").read()
(n,) = struct.unpack("<Q", raw[:8])
h = json.loads(raw[8:8 + n])
assert h["__metadata__"] == {"format": "pt"}
assert h["model.embed_tokens.weight"]["shape"] == [8000, 32], h["model.embed_tokens.weight"]
assert "lm_head.weight" not in h  # tied
assert json.load(open(d + "/plan.json"))["dp"] >= 1
PY

# The loss of step 6 when the run stops at 3 and resumes equals the uninterrupted run's.
dp_recipe "$TMP/b.yaml" "$TMP/out-b" "max_steps: 3"
"$MOAI_BIN" -q "$TMP/b.yaml" >/dev/null 2>&1
expect_eq "first half: status" 0 $?
dp_recipe "$TMP/b.yaml" "$TMP/out-b" "max_steps: 6"
"$MOAI_BIN" -q "$TMP/b.yaml" >"$TMP/b.out" 2>"$TMP/b.err"
expect_eq "resumed: status" 0 $?
expect_eq "resumed: steps 4 to 6 only" "4 5 6" "$(sed -n 's/^\[Step \([0-9]*\)\/6\].*/\1/p' "$TMP/b.out" | xargs)"
expect_eq "resumed losses equal the whole run's" \
    "$(grep -E '^\[Step [456]/6\]' "$TMP/a.out" | sed 's/ | Duration.*//')" \
    "$(grep -E '^\[Step [456]/6\]' "$TMP/b.out" | sed 's/ | Duration.*//')"

# JSON Lines: one object per step and a final summary.
dp_recipe "$TMP/c.yaml" "$TMP/out-c" "max_steps: 2"
"$MOAI_BIN" -q --json "$TMP/c.yaml" >"$TMP/c.out" 2>/dev/null
expect_eq "--json: status" 0 $?
python3 - "$TMP/c.out" <<'PY' && ok || fail "--json step objects"
import json, sys
lines = [json.loads(l) for l in open(sys.argv[1])]
assert [l["step"] for l in lines[:2]] == [1, 2], lines
for l in lines[:2]:
    assert set(l) >= {"step", "total_steps", "loss", "duration_s", "tokens_per_s", "lr"}, l
assert lines[2]["status"] == "done", lines[2]
PY
# the whole process's peak resident size beside its prediction (not under ASan, whose shadow
# memory the prediction does not count)
if [ "${MOAI_MODE:-release}" = release ]; then
    python3 - "$TMP/c.out" <<'PY' && ok || fail "--json: process peak within 10% of its prediction"
import json, sys
j = [json.loads(l) for l in open(sys.argv[1])][-1]
q = j["process_peak_bytes"] / j["process_predicted_bytes"]
assert 0.8 <= q <= 1.1, (j["process_peak_bytes"], j["process_predicted_bytes"])
PY
fi

# A process that would not fit this machine stops before it loads anything, whatever the devices'
# own budgets say (a one-layer model whose vocabulary is sized from this machine's memory so
# that the host copies and checkpoint buffers alone, 16 bytes a parameter, exceed it).
mem_kib=$(awk '/^MemTotal:/ {print $2}' /proc/meminfo)
vocab=$((mem_kib * 1024 / 16 / 64 + 1000))
cat >"$TMP/big.yaml" <<YAML
model:
  init: random
  config: {hidden_size: 64, intermediate_size: 128, num_hidden_layers: 1, num_attention_heads: 4,
           num_key_value_heads: 4, vocab_size: $vocab, tie_word_embeddings: true}
tokenizer: models/tiny-llama/tokenizer.model
dataset: {path: datasets/debian-descriptions.jsonl.zst, limit: 16, cache_dir: $TMP/cache}
training: {batch_size: 2, block_size: 32, max_steps: 1, precision: fp32, save_dir: $TMP/out-big}
flavor: {device: cpu, devices: 1, memory_gb: 100000}
YAML
"$MOAI_BIN" -q "$TMP/big.yaml" >/dev/null 2>"$TMP/big.err"
expect_eq "process too big: status" 3 $?
grep -q "the process would need .* more than this machine's" "$TMP/big.err" && ok ||
    fail "process too big: message: $(cat "$TMP/big.err")"
[ ! -e "$TMP/out-big" ] && ok || fail "process too big: save_dir created"

# SIGINT saves and exits 130; the run then resumes to the end.
dp_recipe "$TMP/d.yaml" "$TMP/out-d" "max_steps: 400"
"$MOAI_BIN" -q "$TMP/d.yaml" >"$TMP/d.out" 2>"$TMP/d.err" &
pid=$!
for _ in $(seq 100); do grep -q '^\[Step' "$TMP/d.out" 2>/dev/null && break; sleep 0.1; done
kill -INT $pid
wait $pid
expect_eq "SIGINT: status" 130 $?
step=$(python3 -c "import json,sys; print(json.load(open(sys.argv[1]))['step'])" "$TMP/out-d/trainer_state.json" 2>/dev/null)
[ -n "$step" ] && [ "$step" -ge 1 ] && [ "$step" -lt 400 ] && ok || fail "SIGINT: checkpoint at step '$step'"

# A device too small for the plan: the OUT_OF_MEMORY report and exit 3.
dp_recipe "$TMP/e.yaml" "$TMP/out-e" "max_steps: 1"
"$MOAI_BIN" -q --set 'flavor={device: cpu, devices: 2, memory_gb: 0.001}' "$TMP/e.yaml" >/dev/null 2>"$TMP/e.err"
expect_eq "too small: status" 3 $?
grep -q '^moai-finetune: error: Error Code 4: OUT_OF_MEMORY$' "$TMP/e.err" && ok || fail "too small: report: $(cat "$TMP/e.err")"
[ ! -e "$TMP/out-e" ] && ok || fail "too small: no output directory"
# Malformed weights: one error line naming the file, exit 1, no output directory.
mkdir -p "$TMP/badmodel"
cp models/tiny-llama/config.json models/tiny-llama/tokenizer.model "$TMP/badmodel/"
printf '\x10\x00\x00\x00\x00\x00\x00\x00{"a": 1}' >"$TMP/badmodel/model.safetensors"
cat >"$TMP/f.yaml" <<YAML
model: {path: $TMP/badmodel}
dataset: {path: datasets/debian-descriptions.jsonl.zst, limit: 64, cache_dir: $TMP/cache}
training: {batch_size: 8, block_size: 64, max_steps: 1, save_dir: $TMP/out-f}
flavor: {device: cpu, devices: 1}
YAML
"$MOAI_BIN" -q "$TMP/f.yaml" >"$TMP/f.out" 2>"$TMP/f.err"
expect_eq "bad weights: status" 1 $?
expect_eq "bad weights: message" "moai-finetune: error: $TMP/badmodel/model.safetensors: header length 16 runs past the end of the file (16 bytes)" "$(grep -v '^\[' "$TMP/f.err")"
[ ! -e "$TMP/out-f" ] && ok || fail "bad weights: no output directory"
finish
