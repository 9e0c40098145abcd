#!/usr/bin/env bash
# Validation you can see: training.eval_interval evaluates the validation set periodically,
# each evaluation prints a line (and a --json object) with the validation loss and
# perplexity, trainer_state.json keeps the history of step losses and evaluations across a
# resume, and a validation fraction that holds out no record is a warning.
. tests/cli/lib.inc

recipe() { # recipe FILE SAVE_DIR MAX_STEPS [DATASET KEYS]
    {
        tiny_recipe | sed "s|^  limit: 64|  limit: 64\n  validation_fraction: ${4:-0.25}|"
        printf '  max_steps: %s\n  log_interval: 1\n  eval_interval: 2\n  save_dir: %s\n' "$3" "$2"
        printf 'flavor: {device: cpu, devices: 1, memory_gb: 1}\n'
    } >"$1"
}

recipe "$TMP/a.yaml" "$TMP/out-a" 4
"$MOAI_BIN" -q "$TMP/a.yaml" >"$TMP/a.out" 2>"$TMP/a.err"
expect_eq "eval: status" 0 $?
expect_eq "eval: lines in order, visible with -q" "Step 1
Step 2
Eval 2
Step 3
Step 4
Eval 4" "$(sed -n 's/^\[\(Step\|Eval\) \([0-9]*\)\/4\].*/\1 \2/p' "$TMP/a.out")"
grep -qE '^\[Eval 2/4\] \| Validation loss: [0-9]+(\.[0-9]+)? \| Perplexity: [0-9]+\.[0-9]{2}$' "$TMP/a.out" &&
    ok || fail "eval: line format: $(grep Eval "$TMP/a.out")"
python3 - "$TMP/a.out" "$TMP/out-a/trainer_state.json" <<'PY' && ok || fail "eval: perplexity and history"
import json, math, re, sys
evals = [l for l in open(sys.argv[1]) if l.startswith("[Eval")]
for l in evals:
    m = re.match(r"\[Eval (\d+)/4\] \| Validation loss: (\S+) \| Perplexity: (\S+)$", l)
    assert abs(math.exp(float(m.group(2))) - float(m.group(3))) < 0.01, l
h = json.load(open(sys.argv[2]))["log_history"]
assert [e["step"] for e in h if "loss" in e] == [1, 2, 3, 4], h
ev = [e for e in h if "validation_loss" in e]
assert [e["step"] for e in ev] == [2, 4], h
assert all(abs(e["perplexity"] - math.exp(e["validation_loss"])) < 1e-9 for e in ev), ev
PY

# --json: an object per evaluation; with blocks longer than most records, the real tokens per
# second are fewer than the tokens the steps ran.
recipe "$TMP/b.yaml" "$TMP/out-b" 4
"$MOAI_BIN" -q --json --set training.block_size=512 "$TMP/b.yaml" >"$TMP/b.out" 2>/dev/null
expect_eq "eval --json: status" 0 $?
python3 - "$TMP/b.out" <<'PY' && ok || fail "eval --json objects"
import json, math, sys
lines = [json.loads(l) for l in open(sys.argv[1])]
ev = [l for l in lines if "eval" in l]
assert [e["eval"] for e in ev] == [2, 4], lines
for e in ev:
    assert e["total_steps"] == 4 and abs(math.exp(e["validation_loss"]) - e["perplexity"]) < 0.01, e
steps = [l for l in lines if "step" in l and "status" not in l]
for s in steps:  # real tokens are fewer than all the tokens a step ran
    assert 0 < s["real_tokens_per_s"] < s["tokens_per_s"], s
assert lines[-1]["status"] == "done" and lines[-1]["validation_loss"] is not None
PY

# Resumed: the history of both halves in the checkpoint.
recipe "$TMP/c.yaml" "$TMP/out-c" 2
"$MOAI_BIN" -q "$TMP/c.yaml" >/dev/null 2>&1
recipe "$TMP/c.yaml" "$TMP/out-c" 4
"$MOAI_BIN" -q "$TMP/c.yaml" >"$TMP/c.out" 2>&1
expect_eq "resumed: status" 0 $?
python3 - "$TMP/out-a/trainer_state.json" "$TMP/out-c/trainer_state.json" <<'PY' && ok || fail "resumed: history"
import json, sys
a = json.load(open(sys.argv[1]))["log_history"]
c = json.load(open(sys.argv[2]))["log_history"]
assert [e["step"] for e in c if "loss" in e] == [1, 2, 3, 4], c
assert [e["step"] for e in c if "validation_loss" in e] == [2, 4], c
# the same run: the same losses
la = [e["loss"] for e in a if "loss" in e]
lc = [e["loss"] for e in c if "loss" in e]
assert all(abs(x - y) <= 1e-6 * abs(x) for x, y in zip(la, lc)), (la, lc)
PY

# A fraction that rounds to no record: a warning, and the run trains without validation.
recipe "$TMP/d.yaml" "$TMP/out-d" 1 0.005
"$MOAI_BIN" -q "$TMP/d.yaml" >"$TMP/d.out" 2>"$TMP/d.err"
expect_eq "no record held out: status" 0 $?
grep -q "\[warning\] $TMP/d.yaml: 'dataset.validation_fraction' 0.005 of 64 records holds out none: there is no validation$" "$TMP/d.err" &&
    ok || fail "no record held out: warning: $(cat "$TMP/d.err")"
expect_eq "no record held out: no eval line" 0 "$(grep -c '^\[Eval' "$TMP/d.out")"
finish
