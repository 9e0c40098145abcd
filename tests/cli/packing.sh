#!/usr/bin/env bash
# Sequence packing (dataset.packing): steps count packed rows, the step lines and --json step
# objects count the examples and real tokens in them, validation packs the same way, a
# resumed run continues the same packed order, the checkpoint's fingerprint keeps packed and
# unpacked runs apart, and mpirun packs the same rows as threads.
. tests/cli/lib.inc

recipe() { # recipe FILE SAVE_DIR MAX_STEPS ("": one epoch) PACKING
    {
        tiny_recipe | sed "s|^  limit: 64|  limit: 160\n  validation_fraction: 0.2\n  packing: $4|; s|^  block_size: 64|  block_size: 256|"
        [ -n "$3" ] && printf '  max_steps: %s\n' "$3"
        printf '  log_interval: 1\n  eval_interval: 2\n  save_dir: %s\n' "$2"
        printf 'flavor: {device: cpu, devices: 2, memory_gb: 1}\n'
    } >"$1"
}

# Unpacked and packed runs of the same 128 training records (32 held out).
recipe "$TMP/u.yaml" "$TMP/out-u" "" false
"$MOAI_BIN" -q --json "$TMP/u.yaml" >"$TMP/u.out" 2>"$TMP/u.err"
expect_eq "unpacked: status" 0 $?
recipe "$TMP/p.yaml" "$TMP/out-p" "" true
"$MOAI_BIN" --json "$TMP/p.yaml" >"$TMP/p.out" 2>"$TMP/p.err"
expect_eq "packed: status" 0 $?
python3 - "$TMP/u.out" "$TMP/p.out" "$TMP/out-p/trainer_state.json" <<'PY' && ok || fail "packed: steps, rows, examples, real tokens"
import json, sys
def steps(path):
    lines = [json.loads(l) for l in open(path)]
    return [l for l in lines if "step" in l and "status" not in l], lines
us, ul = steps(sys.argv[1])
ps, pl = steps(sys.argv[2])
# unpacked: 128 records, batch 8: 16 steps of 8 rows, one example each
assert len(us) == 16 and us[-1]["total_steps"] == 16, us[-1]
assert all(s["rows"] == 8 and s["examples"] == 8 for s in us), us[0]
# packed: fewer steps to the epoch, each of 8 rows holding more examples
n = len(ps)
assert 2 <= n < 16 and all(s["total_steps"] == n for s in ps), ps
assert all(s["rows"] == 8 and s["examples"] > 8 for s in ps), ps
assert sum(s["examples"] for s in ps) <= 128
# packed rows have little padding: more real tokens a step than unpacked
ur = sum(s["real_tokens"] for s in us) / len(us)
pr = sum(s["real_tokens"] for s in ps) / n
assert pr > 1.5 * ur and pr <= 8 * 256, (ur, pr)
for s in ps:
    assert 0 < s["real_tokens_per_s"] <= s["tokens_per_s"], s
# validation ran packed, every 2 steps and at the end
ev = [l for l in pl if "eval" in l]
assert len(ev) >= 1 and pl[-1]["validation_loss"] is not None, pl[-1]
st = json.load(open(sys.argv[3]))
assert st["steps_per_epoch"] == n and st["step"] == n, st
PY
grep -q "\[info\] Packed 128 training examples into [0-9]* rows of 256 tokens: [0-9.]*% padding (unpacked [0-9.]*%)" "$TMP/p.err" &&
    ok || fail "packed: the packing is logged: $(grep -i pack "$TMP/p.err")"

# The step lines are the platform's, packed or not; the step bar counts the examples.
"$MOAI_BIN" -q --set training.max_steps=1 --set "training.save_dir=$TMP/out-l" "$TMP/p.yaml" >"$TMP/l.out" 2>&1
grep -qE '^\[Step 1/1\] \| Loss: [0-9.]+ \| Duration: [0-9.]+ \| Throughput: [0-9.]+ tokens/sec$' "$TMP/l.out" &&
    ok || fail "packed: step line: $(cat "$TMP/l.out")"

# Resumed: 2 steps, then on to 4, the losses of the uninterrupted run's steps 3 and 4.
recipe "$TMP/r.yaml" "$TMP/out-r" 2 true
"$MOAI_BIN" -q --json "$TMP/r.yaml" >/dev/null 2>&1
recipe "$TMP/r.yaml" "$TMP/out-r" 4 true
"$MOAI_BIN" -q --json "$TMP/r.yaml" >"$TMP/r.out" 2>/dev/null
expect_eq "resumed: status" 0 $?
recipe "$TMP/w.yaml" "$TMP/out-w" 4 true
"$MOAI_BIN" -q --json "$TMP/w.yaml" >"$TMP/w.out" 2>/dev/null
python3 - "$TMP/r.out" "$TMP/w.out" <<'PY' && ok || fail "resumed: the same packed order and losses"
import json, sys
r = [json.loads(l) for l in open(sys.argv[1])]
w = [json.loads(l) for l in open(sys.argv[2])]
r = {s["step"]: s for s in r if "step" in s and "status" not in s}
w = {s["step"]: s for s in w if "step" in s and "status" not in s}
assert sorted(r) == [3, 4], sorted(r)
for k in (3, 4):
    assert r[k]["examples"] == w[k]["examples"] and r[k]["real_tokens"] == w[k]["real_tokens"]
    assert abs(r[k]["loss"] - w[k]["loss"]) <= 1e-6 * abs(w[k]["loss"]), (r[k], w[k])
PY

# A packed checkpoint is another run than an unpacked one.
"$MOAI_BIN" -q --set dataset.packing=false "$TMP/r.yaml" >/dev/null 2>"$TMP/f.err"
expect_eq "fingerprint: exit status" 2 $?
grep -q "dataset.packing (true then, false now)" "$TMP/f.err" &&
    ok || fail "fingerprint: names dataset.packing: $(cat "$TMP/f.err")"
# Fewer packed rows than one batch: an error before training, naming the recipe.
"$MOAI_BIN" -q --set dataset.limit=20 --set dataset.validation_fraction=0 \
    --set training.batch_size=16 --set "training.save_dir=$TMP/out-few" "$TMP/p.yaml" \
    >/dev/null 2>"$TMP/few.err"
expect_eq "too few rows: exit status" 2 $?
grep -qE "^moai-finetune: error: $TMP/p.yaml: dataset has 20 training records, which pack into [0-9]+ rows of 256 tokens, fewer than one batch of 16$" "$TMP/few.err" &&
    ok || fail "too few rows: message: $(cat "$TMP/few.err")"

# Under mpirun (2 ranks of 2 devices, dp 2 x pp 2): the thread run's packed steps and losses,
# and its checkpoint byte for byte.
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
export LSAN_OPTIONS="suppressions=$PWD/tests/lsan-mpi.supp:fast_unwind_on_malloc=0:print_suppressions=0"
{
    tiny_recipe | sed "s|^  limit: 64|  limit: 96\n  packing: true|; s|^  block_size: 64|  block_size: 256|"
    printf '  max_steps: 4\n  log_interval: 1\nflavor: {device: cpu, devices: 4, memory_gb: 1}\n'
    printf 'parallel: {dp: 2, pp: 2, tp: 1, num_micro_batches: 2}\n'
} >"$TMP/m.yaml"
steps() { sed -n 's/^\(\[Step [0-9]*\/4\] | Loss: [^ ]*\) .*$/\1/p' "$1"; }
"$MOAI_BIN" -q --set "training.save_dir=$TMP/mt" "$TMP/m.yaml" >"$TMP/mt.out" 2>/dev/null
mpirun --oversubscribe -n 2 "$MOAI_BIN" -q --set "training.save_dir=$TMP/mm" "$TMP/m.yaml" \
    >"$TMP/mm.out" 2>"$TMP/mm.err"
expect_eq "mpirun: status" 0 $?
expect_eq "mpirun: the thread run's packed steps" "$(steps "$TMP/mt.out")" "$(steps "$TMP/mm.out")"
expect_eq "mpirun: 4 steps" 4 "$(steps "$TMP/mm.out" | wc -l)"
cmp -s "$TMP/mt/model.safetensors" "$TMP/mm/model.safetensors" && ok ||
    fail "mpirun: the checkpoint differs from the thread run's"
finish
