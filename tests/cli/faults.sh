#!/usr/bin/env bash
# Faults a careful user meets: a weight that stops being finite ends the run before any save
# (the last good checkpoint stays, --json still prints the step); SIGPIPE and write errors on
# standard output end the run like SIGTERM; a failed run leaves an existing checkpoint's
# plan.json alone; resuming from a missing directory names it.
. tests/cli/lib.inc

sums() { (cd "$1" && sha256sum config.json model.safetensors optimizer.safetensors plan.json trainer_state.json); }

# A good checkpoint at step 1, then a negative second moment (as a corrupted optimizer file
# would hold): the update of step 2 makes a weight NaN while the loss and norm stay finite.
dp_recipe "$TMP/n.yaml" "$TMP/out-n" "save_interval: 1"
"$MOAI_BIN" -q --set training.max_steps=1 "$TMP/n.yaml" >/dev/null 2>"$TMP/n1.err"
expect_eq "good run: status" 0 $?
python3 - "$TMP/out-n/optimizer.safetensors" <<'PY' || fail "could not edit the optimizer state"
import json, struct, sys
raw = bytearray(open(sys.argv[1], "rb").read())
(n,) = struct.unpack("<Q", raw[:8])
t = json.loads(raw[8:8 + n])["model.norm.weight.exp_avg_sq"]
struct.pack_into("<f", raw, 8 + n + t["data_offsets"][0], -1.0)
open(sys.argv[1], "wb").write(raw)
PY
sums "$TMP/out-n" >"$TMP/n.sum"
"$MOAI_BIN" -q --json --set training.max_steps=3 "$TMP/n.yaml" >"$TMP/n.out" 2>"$TMP/n.err"
expect_eq "NaN weight: status" 1 $?
expect_eq "NaN weight: message" "moai-finetune: error: a weight is not finite after the update of step 2 (gradient norm $(python3 -c 'import json,sys; print("%g" % json.loads(open(sys.argv[1]).readline())["grad_norm"])' "$TMP/n.out")): stopped without saving it
hint: lower training.lr or training.weight_decay, or set training.grad_clip" "$(grep -v '^\[' "$TMP/n.err")"
expect_eq "NaN weight: the step is printed" 2 "$(python3 -c 'import json,sys; print(json.loads(open(sys.argv[1]).readline())["step"])' "$TMP/n.out")"
(cd "$TMP/out-n" && sha256sum -c --quiet "$TMP/n.sum") && ok || fail "NaN weight: the good checkpoint changed"

# SIGPIPE (the reader of standard output went away): saved, a message, 130
dp_recipe "$TMP/p.yaml" "$TMP/out-p" "max_steps: 100000"
("$MOAI_BIN" -q "$TMP/p.yaml" 2>"$TMP/p.err"; echo $? >"$TMP/p.rc") | head -n 3 >/dev/null
expect_eq "SIGPIPE: status" 130 "$(cat "$TMP/p.rc")"
step=$(python3 -c "import json,sys; print(json.load(open(sys.argv[1]))['step'])" "$TMP/out-p/trainer_state.json" 2>/dev/null)
[ -n "$step" ] && [ "$step" -ge 3 ] && ok || fail "SIGPIPE: checkpoint at step '$step'"
expect_eq "SIGPIPE: message" "moai-finetune: error: interrupted by SIGPIPE: checkpoint saved in '$TMP/out-p' after step $step" "$(grep -v '^\[' "$TMP/p.err")"

# standard output on a full disk: saved, a message, 1
if [ -w /dev/full ]; then
    dp_recipe "$TMP/w.yaml" "$TMP/out-w" "max_steps: 5"
    "$MOAI_BIN" -q "$TMP/w.yaml" >/dev/full 2>"$TMP/w.err"
    expect_eq "/dev/full: status" 1 $?
    step=$(python3 -c "import json,sys; print(json.load(open(sys.argv[1]))['step'])" "$TMP/out-w/trainer_state.json" 2>/dev/null)
    expect_eq "/dev/full: message" "moai-finetune: error: cannot write standard output: No space left on device; checkpoint saved in '$TMP/out-w' after step $step" "$(grep -v '^\[' "$TMP/w.err")"
    "$MOAI_BIN" -q --plan-only "$TMP/w.yaml" >/dev/full 2>"$TMP/wp.err"
    expect_eq "/dev/full --plan-only: status" 1 $?
    expect_eq "/dev/full --plan-only: message" "moai-finetune: error: cannot write standard output: No space left on device" "$(cat "$TMP/wp.err")"
fi

# a run that fails after loading leaves the checkpoint's plan.json as it was
before=$(sha256sum <"$TMP/out-n/plan.json")
"$MOAI_BIN" -q --set training.max_steps=3 --set 'flavor={device: cpu, devices: 1, memory_gb: 1}' "$TMP/n.yaml" >/dev/null 2>&1
expect_eq "failed run: status" 1 $?
expect_eq "failed run: plan.json unchanged" "$before" "$(sha256sum <"$TMP/out-n/plan.json")"

# resuming from a directory that does not exist: a recipe error naming it, with no line number
dp_recipe "$TMP/r.yaml" "$TMP/out-r" "max_steps: 1"
"$MOAI_BIN" -q --set "training.resume=$TMP/nowhere" "$TMP/r.yaml" >/dev/null 2>"$TMP/r.err"
expect_eq "resume from nowhere: status" 2 $?
expect_eq "resume from nowhere: message" "moai-finetune: error: cannot resume from '$TMP/nowhere': it holds no checkpoint
hint: name a checkpoint of this run in training.resume, or set it to auto" "$(grep -v '^\[' "$TMP/r.err")"
finish
