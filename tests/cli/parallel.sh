#!/usr/bin/env bash
# Model parallelism end to end: on a cpu flavor too small for any data-parallel plan the
# planner picks a model-parallel one, trains it to the losses of a data-parallel run, reports
# every device's peak memory equal to its prediction, and saves a checkpoint that resumes
# under another layout. (The Open MPI runs are tests/cli/mpi.sh.)
. tests/cli/lib.inc

recipe() { # recipe FILE SAVE_DIR MAX_STEPS MEMORY_GB [PARALLEL]
    {
        tiny_recipe
        cat <<YAML
  max_steps: $3
  save_dir: $2
flavor: {device: cpu, devices: 4, memory_gb: $4}
parallel: {${5:-}}
YAML
    } >"$1"
}

# losses FILE: the step losses of a --json run, one per line
losses() { python3 -c 'import json,sys
for l in open(sys.argv[1]):
    o = json.loads(l)
    if "step" in o: print(o["step"], repr(o["loss"]))' "$1"; }

# close A B: every step's loss within 1e-5 relative
close() { python3 - "$1" "$2" <<'PY'
import sys
a = dict(l.split() for l in open(sys.argv[1]))
b = dict(l.split() for l in open(sys.argv[2]))
assert a.keys() == b.keys() and a, (a, b)
for k in a:
    x, y = float(a[k]), float(b[k])
    assert abs(x - y) <= 1e-5 * abs(x), (k, x, y)
PY
}

small=0.00390625 # 4 MiB a device

# No data-parallel plan fits 4 MiB devices: pinned to one, it is out of memory.
recipe "$TMP/dp.yaml" "$TMP/out-dp" 6 "$small" "pp: 1, tp: 1"
"$MOAI_BIN" --plan-only "$TMP/dp.yaml" >/dev/null 2>"$TMP/dp.err"
expect_eq "data-parallel in 4 MiB: status" 3 $?

# The planner's own choice there is model-parallel; it trains and saves.
recipe "$TMP/mp.yaml" "$TMP/out-mp" 6 "$small"
"$MOAI_BIN" --json "$TMP/mp.yaml" >"$TMP/mp.out" 2>"$TMP/mp.err"
expect_eq "model-parallel: status" 0 $?
python3 -c 'import json,sys; p = json.load(open(sys.argv[1])); assert p["pp"] * p["tp"] > 1, p' \
    "$TMP/out-mp/plan.json" && ok || fail "model-parallel: plan.json is not model-parallel"
for f in model.safetensors optimizer.safetensors trainer_state.json; do
    [ -s "$TMP/out-mp/$f" ] && ok || fail "model-parallel: checkpoint lacks $f"
done
python3 - "$TMP/mp.out" <<'PY' && ok || fail "model-parallel: final object: peaks differ from predictions"
import json, sys
f = [json.loads(l) for l in open(sys.argv[1])][-1]
assert f["status"] == "done" and len(f["peak_bytes"]) == 4, f
assert f["peak_bytes"] == f["predicted_bytes"], f
PY
expect_eq "model-parallel: 4 devices measured as predicted" 4 \
    "$(grep -c 'peak memory .* (measured/predicted 1.000)$' "$TMP/mp.err")"

# The same steps on 1 GiB devices, pinned data-parallel: the same losses.
recipe "$TMP/ref.yaml" "$TMP/out-ref" 6 1 "pp: 1, tp: 1"
"$MOAI_BIN" --json "$TMP/ref.yaml" >"$TMP/ref.out" 2>/dev/null
expect_eq "data-parallel: status" 0 $?
losses "$TMP/ref.out" >"$TMP/ref.loss"
losses "$TMP/mp.out" >"$TMP/mp.loss"
close "$TMP/ref.loss" "$TMP/mp.loss" && ok || fail "model-parallel losses differ from data-parallel ones"

# Pipeline x tensor x data parallel with recomputation and ZeRO-3, pinned: the same losses.
recipe "$TMP/pt.yaml" "$TMP/out-pt" 6 1 \
    "dp: 1, pp: 2, tp: 2, recomputation: full, distribute_param: true, distribute_low_prec_param: true"
"$MOAI_BIN" --json "$TMP/pt.yaml" >"$TMP/pt.out" 2>/dev/null
expect_eq "pp 2 x tp 2: status" 0 $?
losses "$TMP/pt.out" >"$TMP/pt.loss"
close "$TMP/ref.loss" "$TMP/pt.loss" && ok || fail "pp 2 x tp 2 losses differ from data-parallel ones"

# A model-parallel checkpoint resumes under a data-parallel layout: steps 4 to 6 match.
recipe "$TMP/half.yaml" "$TMP/out-half" 3 1 "pp: 2, tp: 2"
"$MOAI_BIN" -q "$TMP/half.yaml" >/dev/null 2>&1
expect_eq "pp 2 x tp 2, 3 steps: status" 0 $?
recipe "$TMP/half.yaml" "$TMP/out-half" 6 1 "pp: 1, tp: 1"
"$MOAI_BIN" --json "$TMP/half.yaml" >"$TMP/half.out" 2>/dev/null
expect_eq "resumed data-parallel: status" 0 $?
losses "$TMP/half.out" >"$TMP/half.loss"
grep -E '^[456] ' "$TMP/ref.loss" >"$TMP/ref456.loss"
close "$TMP/ref456.loss" "$TMP/half.loss" && ok || fail "resumed losses differ"

# Past 64 devices every device's peak is still reported (96 devices: 12 x pp 2 x tp 4).
{
    tiny_recipe | sed 's/batch_size: 8/batch_size: 96/; s/limit: 64/limit: 192/'
    cat <<YAML
  max_steps: 1
  save_dir: $TMP/out-96
flavor: {device: cpu, devices: 96, memory_gb: 0.05}
parallel: {tp: 4, pp: 2}
YAML
} >"$TMP/d96.yaml"
"$MOAI_BIN" -q --json "$TMP/d96.yaml" 2>/dev/null | tail -n 1 >"$TMP/d96.out"
python3 - "$TMP/d96.out" <<'PY' && ok || fail "96 devices: every peak reported, as predicted"
import json, sys
f = json.load(open(sys.argv[1]))
assert f["status"] == "done" and len(f["peak_bytes"]) == 96, f
assert f["peak_bytes"] == f["predicted_bytes"], f
PY
finish
