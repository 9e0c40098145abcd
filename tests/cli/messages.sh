#!/usr/bin/env bash
# Error messages that help: other tools' key names get the recipe's own, a flavor typo gets
# the nearest name, a record that lacks a template field lists the fields it has (exit 2,
# like every recipe error), and training an accelerator flavor on this machine says that
# its devices are simulated.
. tests/cli/lib.inc

head='model: {path: m}
dataset: {path: d}'
# expect_msg WHAT RECIPE-TAIL MESSAGE
expect_msg() {
    printf '%s\n%s\n' "$head" "$2" | "$MOAI_BIN" --validate - >/dev/null 2>"$TMP/err"
    local rc=$?
    expect_eq "$1: status" 2 $rc
    expect_eq "$1: message" "moai-finetune: error: $3" "$(cat "$TMP/err")"
}
expect_msg "learning_rate" "training: {learning_rate: 1e-4}" \
    "<stdin>:3:12: unknown key 'learning_rate' in 'training' (did you mean 'training.lr'?)"
expect_msg "sequence_len" "training: {sequence_len: 512}" \
    "<stdin>:3:12: unknown key 'sequence_len' in 'training' (did you mean 'training.block_size'?)"
expect_msg "gradient_accumulation_steps" "training: {gradient_accumulation_steps: 4}" \
    "<stdin>:3:12: unknown key 'gradient_accumulation_steps' in 'training' (there is no such key: 'training.batch_size' is the global batch, and the planner chooses the micro-batches that accumulate to it)"
expect_msg "model.tokenizer" "training: {}
model: {tokenizer: t}" "<stdin>:4:1: duplicate key 'model'"
printf 'model: {path: m, tokenizer: t}\ndataset: {path: d}\n' | "$MOAI_BIN" --validate - 2>"$TMP/err" >/dev/null
expect_eq "model.tokenizer: message" "moai-finetune: error: <stdin>:1:18: unknown key 'tokenizer' in 'model' (did you mean the top-level 'tokenizer'?)" "$(cat "$TMP/err")"
expect_msg "num_epochs at the top" "num_epochs: 3" \
    "<stdin>:3:1: unknown key 'num_epochs' (did you mean 'training.epochs'?)"
expect_msg "a near key still gets its suggestion" "training: {batchsize: 3}" \
    "<stdin>:3:12: unknown key 'batchsize' in 'training' (did you mean 'batch_size'?)"

# A flavor typo: the nearest name, as it was written (with or without the memory suffix).
expect_msg "flavor typo" "flavor: 4xlargee" "<stdin>:3:9: unknown flavor '4xlargee' (did you mean '4xlarge'?)"
expect_msg "flavor typo with suffix" "flavor: smal.64gb" "<stdin>:3:9: unknown flavor 'smal.64gb' (did you mean 'small.64gb'?)"
expect_msg "flavor as near one as another" "flavor: 5xlarge" "<stdin>:3:9: unknown flavor '5xlarge' (valid: small.64gb, medium.128gb, large.256gb, xlarge.512gb, 1.5xlarge.768gb, 2xlarge.1024gb, 3xlarge.1536gb, 4xlarge.2048gb, 6xlarge.3072gb, 8xlarge.4096gb, 12xlarge.6144gb, 24xlarge.12288gb, 48xlarge.24576gb)"
expect_msg "flavor far from any" "flavor: zzz" "<stdin>:3:9: unknown flavor 'zzz' (valid: small.64gb, medium.128gb, large.256gb, xlarge.512gb, 1.5xlarge.768gb, 2xlarge.1024gb, 3xlarge.1536gb, 4xlarge.2048gb, 6xlarge.3072gb, 8xlarge.4096gb, 12xlarge.6144gb, 24xlarge.12288gb, 48xlarge.24576gb)"

# A record without a template field: the fields it has, exit 2, at --validate and training.
printf '{"question": "q", "answer": "a"}\n' >"$TMP/qa.jsonl"
{
    tiny_recipe | sed "s|path: datasets/debian-descriptions.jsonl.zst|path: $TMP/qa.jsonl|"
    printf '  max_steps: 1\n  save_dir: %s\nflavor: {device: cpu, devices: 1}\n' "$TMP/out"
} >"$TMP/r.yaml"
for mode in --validate ""; do
    "$MOAI_BIN" -q $mode "$TMP/r.yaml" >"$TMP/out.txt" 2>"$TMP/err"
    expect_eq "missing field ${mode:-training}: status" 2 $?
    expect_eq "missing field ${mode:-training}: message" "moai-finetune: error: $TMP/qa.jsonl:1: record has no field 'article' (the template needs it; the record has 'question', 'answer')" "$(cat "$TMP/err")"
done
[ ! -e "$TMP/out" ] && ok || fail "missing field: no output directory"
# A template that does not parse, at training: a recipe error too.
"$MOAI_BIN" -q --set 'dataset.template={question' "$TMP/r.yaml" >/dev/null 2>"$TMP/err"
expect_eq "bad template at training: status" 2 $?
expect_eq "bad template at training: message" "moai-finetune: error: $TMP/r.yaml: template '{question': unclosed '{' at column 1" "$(cat "$TMP/err")"

# An accelerator flavor trained on this machine: one warning that its devices are simulated.
{
    tiny_recipe
    printf '  max_steps: 1\n  save_dir: %s\nflavor: small\n' "$TMP/out-s"
} >"$TMP/s.yaml"
"$MOAI_BIN" "$TMP/s.yaml" >/dev/null 2>"$TMP/s.err"
expect_eq "simulated: status" 0 $?
expect_eq "simulated: one warning" 1 "$(grep -c 'simulated' "$TMP/s.err")"
grep -q "\[warning\] $TMP/s.yaml: the 1 mi250 devices of flavor 'small.64gb' are simulated by threads of this machine's cpu: the predicted step time (.* s) is for the real hardware, not for this run (flavor: {device: cpu, devices: N} plans for this machine)$" "$TMP/s.err" &&
    ok || fail "simulated: warning: $(grep simulated "$TMP/s.err")"
grep -q "median step .* (predicted .* s on real mi250)$" "$TMP/s.err" && ok || fail "simulated: median line"
# 16 simulated devices: one memory line per pipeline stage, not one per device.
"$MOAI_BIN" --set "training.save_dir=$TMP/out-16" --set flavor=2xlarge --set training.batch_size=16 \
    "$TMP/s.yaml" >/dev/null 2>"$TMP/16.err"
expect_eq "16 devices: status" 0 $?
stages=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["pp"])' "$TMP/out-16/plan.json")
expect_eq "16 devices: a memory line per stage" "$stages" "$(grep -cE '\[info\] stage [0-9]+, [0-9]+ devices: peak memory ' "$TMP/16.err")"
expect_eq "16 devices: no line per device" 0 "$(grep -c '\[info\] device [0-9]* (stage' "$TMP/16.err")"
# ... and none on the cpu device.
"$MOAI_BIN" --set "training.save_dir=$TMP/out-c" --set 'flavor={device: cpu, devices: 1}' "$TMP/s.yaml" >/dev/null 2>"$TMP/c.err"
expect_eq "cpu: no warning" 0 "$(grep -c 'simulated' "$TMP/c.err")"
finish
