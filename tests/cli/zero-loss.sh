#!/usr/bin/env bash
# No silent zero loss: examples whose every label is masked are counted in the tokenization
# summary, a step with no counted token is an error naming why, and a dataset where no
# example has one stops before training.
. tests/cli/lib.inc

# 8 examples whose prompt fills the block, then 8 short ones; file order (no shuffle).
python3 - "$TMP/qa.jsonl" <<'PY'
import json, sys
with open(sys.argv[1], "w") as f:
    for i in range(16):
        q = ("why does package %d depend on so many other packages " % i) * (12 if i < 8 else 1)
        f.write(json.dumps({"q": q, "a": "because of %d" % i}) + "\n")
PY
recipe() { # recipe FILE BLOCK_SIZE
    cat <<YAML >"$1"
model:
  config: {hidden_size: 32, intermediate_size: 64, num_hidden_layers: 2, num_attention_heads: 4,
           num_key_value_heads: 2, vocab_size: 8000, tie_word_embeddings: true,
           bos_token_id: 1, eos_token_id: 2, pad_token_id: 3}
  init: random
tokenizer: models/tiny-llama/tokenizer.model
dataset:
  path: $TMP/qa.jsonl
  template: "{q}\n### Answer: {a}"
  response_start: "### Answer:"
  shuffle: false
  cache_dir: $TMP/cache
training:
  batch_size: 8
  block_size: $2
  max_steps: 2
  log_interval: 1
  precision: fp32
  save_dir: $TMP/out-$2
flavor: {device: cpu, devices: 1, memory_gb: 1}
YAML
}

recipe "$TMP/a.yaml" 48
"$MOAI_BIN" "$TMP/a.yaml" >"$TMP/a.out" 2>"$TMP/a.err"
expect_eq "masked step: status" 2 $?
grep -q "Tokenized 16 examples of 48 tokens: 8 truncated, 8 with no token counted in the loss" "$TMP/a.err" &&
    ok || fail "masked step: summary: $(grep Tokenized "$TMP/a.err")"
grep -q "\[warning\] 8 of 16 examples have no token counted in the loss (the block size 48 cuts them before their response): they teach nothing.$" "$TMP/a.err" &&
    ok || fail "masked step: warning: $(cat "$TMP/a.err")"
expect_eq "masked step: error" "moai-finetune: error: step 1 has no token counted in the loss: every label of its 8 sequences is masked (training.block_size 48 cuts them before dataset.response_start's response)
hint: raise training.block_size, or drop the examples whose prompt fills the block" "$(grep -v '^\[' "$TMP/a.err")"
expect_eq "masked step: no step line, no Loss: 0" "" "$(cat "$TMP/a.out")"
[ ! -e "$TMP/out-48/model.safetensors" ] && ok || fail "masked step: no checkpoint"

# Every example masked: stopped before training.
recipe "$TMP/b.yaml" 8
"$MOAI_BIN" -q "$TMP/b.yaml" >"$TMP/b.out" 2>"$TMP/b.err"
expect_eq "all masked: status" 2 $?
expect_eq "all masked: error" "moai-finetune: error: $TMP/b.yaml: no example has a token counted in the loss: training.block_size 8 cuts every one before its response (dataset.response_start)
hint: raise training.block_size, or shorten the prompts" "$(grep -v '^\[' "$TMP/b.err")"

# A block that holds every response trains.
recipe "$TMP/c.yaml" 160
"$MOAI_BIN" -q "$TMP/c.yaml" >"$TMP/c.out" 2>"$TMP/c.err"
expect_eq "long enough: status" 0 $?
grep -q '^\[Step 2/2\] | Loss: [1-9]' "$TMP/c.out" && ok || fail "long enough: a real loss: $(cat "$TMP/c.out")"
finish
