#!/usr/bin/env bash
# --plan-only: the platform's log lines, the readable plan, JSON Lines for pipelines, the
# OUT_OF_MEMORY report with AP off (by option and by environment), exit statuses.
. tests/cli/lib.inc

"$MOAI_BIN" --plan-only configs/llama2-13b.yaml >"$TMP/out" 2>"$TMP/err"
expect_eq "13b: status" 0 $?
strip() { sed 's/^\[[0-9: .-]*\] \[info\] //' "$1"; }
expect_eq "13b: log lines" "The number of candidates is N.
Parallel Graph Compile start...
Elapsed Time to compile all candidates = N [ms]
Parallel Graph Compile finished.
The number of possible candidates is N.
SelectBestGraphFromCandidates start...
Elapsed Time to compute cost for survived candidates = N [ms]
SelectBestGraphFromCandidates finished.
Configuration for parallelism is selected." "$(strip "$TMP/err" | head -n 9 | sed 's/[0-9][0-9]*/N/g')"
strip "$TMP/err" | sed -n 10p | grep -qE '^(No PP|num_stages : [0-9]+, num_micro_batches : [0-9]+, batch_per_device : [0-9]+), (No TP|TP : [0-9]+), recomputation : (0|1|full\(2\)), distribute_param : (true|false), distribute_low_prec_param : (true|false)$' && ok || fail "13b: configuration line"
strip "$TMP/err" | sed -n 11p | grep -q '^data parallel : [0-9]*, .*memory per device : .* predicted step : ' && ok || fail "13b: summary line"
grep -q '^memory      per device' "$TMP/out" && ok || fail "13b: readable plan"
grep -q '^runners-up' "$TMP/out" && ok || fail "13b: runners-up"

"$MOAI_BIN" --plan-only --no-ap configs/llama2-13b.yaml >"$TMP/out" 2>"$TMP/err"
expect_eq "13b --no-ap: status" 3 $?
expect_eq "13b --no-ap: stdout" "" "$(cat "$TMP/out")"
grep -v '^\[' "$TMP/err" | sed -e 's/requested : [0-9]*/requested : N/' -e 's/That is [0-9.]* GiB/That is N GiB/' \
    -e 's/needs [0-9.]* GiB per device in all (stage 0): .*/needs N GiB per device in all (stage 0): .../' \
    -e 's/fits (.*)\./fits (...)./' -e 's/alone need [0-9.]* GiB/alone need N GiB/' >"$TMP/report"
expect_eq "13b --no-ap: report" "moai-finetune: error: Error Code 4: OUT_OF_MEMORY
The plan needs more memory than one device of flavor '4xlarge' has.
>> Memory requested : N bytes
>> Memory available : 68702699520 bytes
>> That is N GiB requested (when the allocation fails) of 63.98 GiB.
>> The data-parallel plan (dp 32 pp 1 tp 1 mb 1x2 rc none zero-0) needs N GiB per device in all (stage 0): ...
To address this issue:
 1. Switch advanced parallelization on (parallel.advanced: true, or --ap): it finds a plan that fits (...).
 2. Use a flavor with more devices or more memory per device (flavor: ...): the weights, gradients and optimizer state alone need N GiB of the 63.98 GiB of a device, so a smaller batch cannot help." "$(cat "$TMP/report")"

MOAI_ENABLE_ADVANCED_PARALLELIZATION=0 "$MOAI_BIN" -q --plan-only configs/llama2-13b.yaml >/dev/null 2>&1
expect_eq "environment AP=0: status" 3 $?
MOAI_ENABLE_ADVANCED_PARALLELIZATION=0 "$MOAI_BIN" -q --ap --plan-only configs/llama2-13b.yaml >/dev/null 2>&1
expect_eq "--ap beats the environment" 0 $?

# JSON Lines over every recipe, an OOM one among them, through a pipeline.
"$MOAI_BIN" -q --plan-only --json configs/*.yaml >"$TMP/json" 2>/dev/null
expect_eq "--json configs: status" 0 $?
python3 - "$TMP/json" <<'PY' && ok || fail "--json objects"
import json, sys
lines = [json.loads(l) for l in open(sys.argv[1])]
assert len(lines) >= 5
for j in lines:
    assert j["status"] == "ok", j
    assert set(j) >= {"recipe", "model", "flavor", "training", "advanced_parallelization",
                      "candidates", "feasible", "plan_ms", "plan"}, j.keys()
    assert set(j["model"]) >= {"name", "parameters", "layers", "hidden_size", "heads",
                               "kv_heads", "vocab_size"}
    assert set(j["flavor"]) >= {"name", "device", "devices", "devices_per_node",
                                "device_memory_bytes"}
    p = j["plan"]
    assert p["dp"] * p["pp"] * p["tp"] == j["flavor"]["devices"]
    assert p["dp"] * p["num_micro_batches"] * p["batch_per_device"] == j["training"]["batch_size"]
    assert p["memory_per_device_bytes"] <= j["flavor"]["device_memory_bytes"]
    assert sum(p["memory_breakdown"].values()) == p["memory_per_device_bytes"]
byname = {j["recipe"]: j for j in lines}
assert byname["configs/llama2-13b.yaml"]["model"]["parameters"] == 13015864320
assert byname["configs/llama3-8b.yaml"]["model"]["parameters"] == 8030261248
PY
"$MOAI_BIN" -q --plan-only --json --no-ap configs/llama2-13b.yaml configs/tiny-llama.yaml >"$TMP/json" 2>/dev/null
expect_eq "--json oom: status" 3 $?
python3 - "$TMP/json" <<'PY' && ok || fail "--json oom object"
import json, sys
a, b = [json.loads(l) for l in open(sys.argv[1])]
assert a["status"] == "oom" and "OUT_OF_MEMORY" in a["error"], a
assert a["requested_bytes"] > a["available_bytes"] == 68702699520
assert b["status"] == "ok", b
PY
# A recipe whose architecture is inconsistent still gets its JSON object, status "error".
"$MOAI_BIN" -q --plan-only --json --set model.config.num_attention_heads=7 configs/llama2-13b.yaml >"$TMP/json" 2>/dev/null
expect_eq "--json config error: status" 2 $?
python3 - "$TMP/json" <<'PY' && ok || fail "--json config error object"
import json, sys
(j,) = [json.loads(l) for l in open(sys.argv[1])]
assert j["status"] == "error" and "'num_attention_heads' (7) does not divide" in j["error"], j
PY
finish
