#!/usr/bin/env bash
# --validate looks at the data as training will: a record that lacks a template field (with
# the fields it has), a response_start absent from the template; and a block size beyond the
# model's max_position_embeddings is refused at --validate, --plan-only and training, unless
# the config extends the context with rope scaling.
. tests/cli/lib.inc

good=tests/data/recipes/minimal.yaml
"$MOAI_BIN" --validate "$good" >"$TMP/out" 2>"$TMP/err"
expect_eq "good recipe: status" 0 $?
expect_eq "good recipe: output" "$good: ok" "$(cat "$TMP/out")"

# A template field the records lack: the first record's line and the fields it has.
"$MOAI_BIN" --validate "$good" --set 'dataset.template={article} {summary}' >"$TMP/out" 2>"$TMP/err"
expect_eq "missing field: status" 2 $?
expect_eq "missing field: message" "moai-finetune: error: datasets/debian-descriptions.jsonl.zst:1: record has no field 'summary' (the template needs it; the record has 'package', 'article', 'highlights')" "$(cat "$TMP/err")"
expect_eq "missing field: no output" "" "$(cat "$TMP/out")"

# A later record (line 3 of 6) lacking a field is found too.
python3 - "$TMP/d.jsonl" <<'PY'
import json, sys
with open(sys.argv[1], "w") as f:
    for i in range(6):
        r = {"article": "a%d" % i, "highlights": "h%d" % i}
        if i == 2:
            del r["highlights"]
            r["title"] = "t"
        f.write(json.dumps(r) + "\n")
PY
"$MOAI_BIN" --validate "$good" --set "dataset.path=$TMP/d.jsonl" 2>"$TMP/err" >/dev/null
expect_eq "later record: status" 2 $?
expect_eq "later record: message" "moai-finetune: error: $TMP/d.jsonl:3: record has no field 'highlights' (the template needs it; the record has 'article', 'title')" "$(cat "$TMP/err")"

# response_start absent from the template.
"$MOAI_BIN" --validate "$good" --set 'dataset.response_start=Answer:' 2>"$TMP/err" >/dev/null
expect_eq "response_start absent: status" 2 $?
expect_eq "response_start absent: message" "moai-finetune: error: $good: response_start 'Answer:' does not occur in the literal text of template '[SUMMARIZE] {article} [/SUMMARIZE]\n{highlights}'" "$(cat "$TMP/err")"

# Block size beyond max_position_embeddings: refused everywhere, with the way out.
for mode in --validate --plan-only; do
    "$MOAI_BIN" $mode configs/llama2-13b.yaml --set training.block_size=8192 >"$TMP/out" 2>"$TMP/err"
    expect_eq "block size $mode: status" 2 $?
    expect_eq "block size $mode: message" "moai-finetune: error: configs/llama2-13b.yaml: 'training.block_size' (8192) exceeds the model's max_position_embeddings (4096)
hint: lower training.block_size, or extend the model's context with rope scaling (model.config.rope_scaling)" "$(grep -v '^\[' "$TMP/err")"
done
{
    tiny_recipe | sed 's|vocab_size: 8000,|vocab_size: 8000, max_position_embeddings: 32,|'
    printf '  max_steps: 1\n  save_dir: %s\nflavor: {device: cpu, devices: 1}\n' "$TMP/out-t"
} >"$TMP/t.yaml"
"$MOAI_BIN" -q "$TMP/t.yaml" >"$TMP/out" 2>"$TMP/err"
expect_eq "block size training: status" 2 $?
expect_eq "block size training: message" "moai-finetune: error: $TMP/t.yaml: 'training.block_size' (64) exceeds the model's max_position_embeddings (32)" "$(head -n 1 "$TMP/err")"
[ ! -e "$TMP/out-t" ] && ok || fail "block size training: no output directory"
# ... unless the config extends the context (Llama 3.1 style rope scaling).
rope='model.config.rope_scaling={rope_type: llama3, factor: 8.0, low_freq_factor: 1.0, high_freq_factor: 4.0, original_max_position_embeddings: 8192}'
"$MOAI_BIN" --validate configs/llama3-8b.yaml --set training.block_size=16384 --set "$rope" >"$TMP/out" 2>/dev/null
expect_eq "rope scaling: status" 0 $?
expect_eq "rope scaling: output" "configs/llama3-8b.yaml: ok" "$(cat "$TMP/out")"
finish
