#!/usr/bin/env bash
# The OUT_OF_MEMORY report helps: the documents' lines first, then sizes in GiB, the closest
# plan's memory broken down, and advice that follows from it (AP on only when it is off, a
# smaller batch only when the activations are the problem).
. tests/cli/lib.inc

# report ARGS...: the error lines of a --plan-only run, its status in $TMP/rc
report() {
    "$MOAI_BIN" --plan-only "$@" >/dev/null 2>"$TMP/err"
    echo $? >"$TMP/rc"
    grep -v '^\[' "$TMP/err"
}

# AP on and nothing fits: the model's state alone is too big; no AP advice, no batch advice.
report configs/llama3-70b.yaml --set flavor=small |
    sed -E -e 's/[0-9]+\.[0-9]+/N/g' -e 's/requested : [0-9]+/requested : N/' -e 's/plan \(.*\) needs/plan (...) needs/' >"$TMP/a"
expect_eq "70B on one device: status" 3 "$(cat "$TMP/rc")"
expect_eq "70B on one device: report" "moai-finetune: error: Error Code 4: OUT_OF_MEMORY
The plan needs more memory than one device of flavor 'small' has.
>> Memory requested : N bytes
>> Memory available : 68702699520 bytes
>> That is N GiB requested (when the allocation fails) of N GiB.
>> The closest plan (...) needs N GiB per device in all (stage 0): weights N, gradients N, optimizer N, activations N, logits N, communication N, reserve N GiB
To address this issue:
 1. Use a flavor with more devices or more memory per device (flavor: ...): the weights, gradients and optimizer state alone need N GiB of the N GiB of a device, so a smaller batch cannot help." "$(cat "$TMP/a")"

# AP off, activations the problem: AP alone finds a plan; recomputation and a smaller batch
# are offered too.
tiny='flavor={device: cpu, devices: 2, memory_gb: 0.3}'
report configs/tiny-llama.yaml --no-ap --set "$tiny" --set training.batch_size=256 |
    sed -E 's/[0-9]+\.[0-9]+ GiB/N GiB/g' >"$TMP/b"
expect_eq "activations, AP off: status" 3 "$(cat "$TMP/rc")"
expect_eq "activations, AP off: advice" "To address this issue:
 1. Switch advanced parallelization on (parallel.advanced: true, or --ap): it finds a plan that fits (dp 2 pp 1 tp 1 mb 128x1 rc none zero-0).
 2. Use a flavor with more devices or more memory per device (flavor: ...).
 3. Recompute activations in the backward pass (parallel.recomputation: full): they and the logits take N GiB.
 4. Decrease the batch size (training.batch_size) or the block size (training.block_size): activations and logits take N GiB, the rest N GiB." \
    "$(sed -n '/^To address/,$p' "$TMP/b")"

# AP on, activations the problem even recomputed with one sequence per micro-batch: a bigger
# flavor or a shorter block only.
report configs/tiny-llama.yaml --set 'flavor={device: cpu, devices: 1, memory_gb: 0.1}' \
    --set training.block_size=1024 >"$TMP/c"
expect_eq "activations, AP on: status" 3 "$(cat "$TMP/rc")"
grep -q '^ 1. Use a flavor with more devices or more memory per device (flavor: ...).$' "$TMP/c" &&
    ok || fail "activations, AP on: flavor advice: $(cat "$TMP/c")"
grep -q '^ 2. Decrease the block size (training.block_size): the activations and logits of one sequence take [0-9.]* GiB, the rest [0-9.]* GiB.$' "$TMP/c" &&
    ok || fail "activations, AP on: block advice"
expect_eq "activations, AP on: no AP advice" 0 "$(grep -c 'Switch advanced' "$TMP/c")"

# During training, with AP on, the report never says to switch it on.
{
    tiny_recipe
    printf '  max_steps: 1\n  save_dir: %s\nflavor: {device: cpu, devices: 2, memory_gb: 0.001}\n' "$TMP/out"
    printf 'parallel: {dp: 2, pp: 1, tp: 1}\n'
} >"$TMP/t.yaml"
"$MOAI_BIN" -q "$TMP/t.yaml" >/dev/null 2>"$TMP/t.err"
expect_eq "training OOM: status" 3 $?
grep -q '^>> That is [0-9.]* GiB requested' "$TMP/t.err" && ok || fail "training OOM: GiB: $(cat "$TMP/t.err")"
expect_eq "training OOM: no AP advice when AP is on" 0 "$(grep -c 'Switch advanced' "$TMP/t.err")"
finish
