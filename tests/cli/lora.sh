#!/usr/bin/env bash
# LoRA from the command line: the Llama-2-13B recipe that is OUT_OF_MEMORY on one device in full
# fine-tuning plans with adapters, --plan-only shows them (text and JSON), --validate accepts the
# recipe, and training it stops with one error line before any work (the training loop does not
# run adapters yet), writing nothing.
. tests/cli/lib.inc

r13=configs/llama2-13b.yaml
"$MOAI_BIN" -q --plan-only --set flavor=small "$r13" >"$TMP/out" 2>"$TMP/err"
expect_eq "13B on small, full: status" 3 $?
expect_eq "13B on small, full: the report" "moai-finetune: error: Error Code 4: OUT_OF_MEMORY" \
    "$(head -n 1 "$TMP/err")"

"$MOAI_BIN" -q --plan-only --set flavor=small --set 'lora={rank: 16, alpha: 32}' "$r13" \
    >"$TMP/out" 2>"$TMP/err"
expect_eq "13B on small, lora: status" 0 $?
expect_eq "13B on small, lora: the adapters' line" \
    "lora        rank 16, alpha 32, dropout 0 on q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj: 62586880 adapter parameters (0.481%), the base frozen" \
    "$(grep '^lora ' "$TMP/out")"
expect_eq "13B on small, lora: one device" "layout      dp 1 x pp 1 x tp 1" \
    "$(grep '^layout ' "$TMP/out" | cut -c1-30)"

"$MOAI_BIN" -q --plan-only --json --set flavor=small --set 'lora={target_modules: [q_proj, v_proj]}' \
    "$r13" >"$TMP/out" 2>/dev/null
expect_eq "json: the lora object" "8 8.0 q_proj,v_proj 6553600 ok" \
    "$(python3 -c 'import json, sys
j = json.load(open(sys.argv[1]))
l = j["lora"]
print(l["rank"], l["alpha"], ",".join(l["target_modules"]), l["adapter_parameters"], j["status"])' "$TMP/out")"

# the tiny model: validates; training stops before any work and writes nothing
dp_recipe "$TMP/lora.yaml" "$TMP/ckpt" ""
echo "lora: {rank: 4}" >>"$TMP/lora.yaml"
"$MOAI_BIN" --validate "$TMP/lora.yaml" >"$TMP/out" 2>"$TMP/err"
expect_eq "validate: status" 0 $?
expect_eq "validate: output" "$TMP/lora.yaml: ok" "$(cat "$TMP/out")"
"$MOAI_BIN" -q "$TMP/lora.yaml" >"$TMP/out" 2>"$TMP/err"
expect_eq "train: status" 2 $?
expect_eq "train: message" \
    "moai-finetune: error: $TMP/lora.yaml: 'lora': the training loop does not train adapters yet (plan it with --plan-only)" \
    "$(cat "$TMP/err")"
expect_eq "train: no output" "" "$(cat "$TMP/out")"
[ -e "$TMP/ckpt" ] && fail "train: the save_dir was created" || ok
finish
