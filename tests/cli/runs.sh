#!/usr/bin/env bash
# Runs know whose checkpoint they resume: the default save_dir is the recipe's own, a
# checkpoint records the run's fingerprint, resume: auto continues only the same run and
# stops with an error naming what differs, resume: never moves the old checkpoint aside, and
# a checkpoint without trainer_state.json is an error, never a fresh start.
. tests/cli/lib.inc

BIN=$(cd "$(dirname "$MOAI_BIN")" && pwd)/$(basename "$MOAI_BIN")
ROOT=$PWD
W=$TMP/work
mkdir -p "$W"
python3 - "$ROOT/datasets/debian-descriptions.jsonl.zst" "$W/data.jsonl" <<'PY'
import json, sys
# 64 small records of our own, so that one of them can be changed
with open(sys.argv[2], "w") as f:
    for i in range(64):
        f.write(json.dumps({"article": "package number %d does thing %d" % (i, i * 7),
                            "highlights": "it does thing %d" % (i * 7)}) + "\n")
PY
recipe() { # recipe FILE [EXTRA TRAINING KEYS]: no save_dir, paths absolute, run from $W
    {
        tiny_recipe | sed -e "s|tokenizer: models/|tokenizer: $ROOT/models/|" \
            -e "s|path: datasets/debian-descriptions.jsonl.zst|path: $W/data.jsonl|"
        cat <<YAML
  max_steps: 2
  ${2:-}
flavor: {device: cpu, devices: 1, memory_gb: 1}
YAML
    } >"$1"
}
run() { (cd "$W" && "$BIN" -q "$@"); }

# Two recipes at the default save_dir: each has its own, outputs/<recipe name>.
recipe "$W/a.yaml"
recipe "$W/b.yaml" "seed: 7"
run a.yaml b.yaml >"$TMP/ab.out" 2>"$TMP/ab.err"
expect_eq "two recipes: status" 0 $?
expect_eq "two recipes: where they saved" "Model saved in 'outputs/a'
Model saved in 'outputs/b'" "$(grep '^Model saved' "$TMP/ab.out")"
[ -s "$W/outputs/a/trainer_state.json" ] && [ -s "$W/outputs/b/trainer_state.json" ] && ok ||
    fail "two recipes: two checkpoints"
python3 - "$W/outputs/a/trainer_state.json" <<'PY' && ok || fail "trainer_state.json has the fingerprint"
import json, sys
s = json.load(open(sys.argv[1]))
fp = s["fingerprint"]
assert fp["model.hidden_size"] == 32 and fp["training.lr"] == 1e-3, fp
assert fp["dataset"].startswith("fnv64:") and fp["dataset"].endswith(" bytes"), fp["dataset"]
assert "training.max_steps" not in fp and "training.save_dir" not in fp, fp
PY
cp "$W/outputs/a/model.safetensors" "$TMP/a.model"

# The same run again: nothing to do, the checkpoint untouched.
run a.yaml >"$TMP/a2.out" 2>"$TMP/a2.err"
expect_eq "same run: status" 0 $?
cmp -s "$TMP/a.model" "$W/outputs/a/model.safetensors" && ok || fail "same run: checkpoint kept"

# b's recipe pointed at a's checkpoint: refused, naming the difference, nothing written.
run --set training.save_dir=outputs/a b.yaml >"$TMP/c.out" 2>"$TMP/c.err"
expect_eq "another run: status" 2 $?
expect_eq "another run: message" "moai-finetune: error: cannot resume from 'outputs/a': its checkpoint is of another run: training.seed (42 then, 7 now)
hint: train into another directory (training.save_dir), or set training.resume: never to start over in 'outputs/a' (its checkpoint is then moved aside into 'outputs/a/previous-N', not deleted)" "$(cat "$TMP/c.err")"
expect_eq "another run: no output" "" "$(cat "$TMP/c.out")"
cmp -s "$TMP/a.model" "$W/outputs/a/model.safetensors" && ok || fail "another run: checkpoint kept"

# --validate says so too, before any work; and ok for the checkpoint's own recipe.
run --validate --set training.save_dir=outputs/a b.yaml >"$TMP/v.out" 2>"$TMP/v.err"
expect_eq "--validate another run: status" 2 $?
expect_eq "--validate another run: message" "moai-finetune: error: cannot resume from 'outputs/a': its checkpoint is of another run: training.seed (42 then, 7 now)" "$(head -n 1 "$TMP/v.err")"
run --validate a.yaml >"$TMP/v.out" 2>/dev/null
expect_eq "--validate the same run" "a.yaml: ok" "$(cat "$TMP/v.out")"

# A changed dataset (one record), template or architecture: refused too.
sed -i '5s/thing 28/thing 29/' "$W/data.jsonl"
grep -q 'thing 29' "$W/data.jsonl" && ok || fail "the dataset changed"
run a.yaml >/dev/null 2>"$TMP/d.err"
expect_eq "changed dataset: status" 2 $?
expect_eq "changed dataset: message" "moai-finetune: error: cannot resume from 'outputs/a': its checkpoint is of another run: dataset (the file's bytes differ)" "$(head -n 1 "$TMP/d.err")"
sed -i '5s/thing 29/thing 28/' "$W/data.jsonl"
run --set 'dataset.template={article}: {highlights}' --set model.config.hidden_size=64 a.yaml \
    >/dev/null 2>"$TMP/e.err"
expect_eq "changed template and model: status" 2 $?
expect_eq "changed template and model: message" "moai-finetune: error: cannot resume from 'outputs/a': its checkpoint is of another run: model.hidden_size (32 then, 64 now), model.head_dim (8 then, 16 now), dataset.template (\"[SUMMARIZE] {article} [/SUMMARIZE]\\n{highlights}\" then, \"{article}: {highlights}\" now)" "$(head -n 1 "$TMP/e.err")"
cmp -s "$TMP/a.model" "$W/outputs/a/model.safetensors" && ok || fail "changed run: checkpoint kept"

# resume: never starts over and moves the old checkpoint aside, other files untouched.
echo "my notes" >"$W/outputs/a/notes.txt"
run --set training.resume=never --set training.seed=7 a.yaml >"$TMP/f.out" 2>"$TMP/f.err"
expect_eq "resume never: status" 0 $?
grep -q "training.resume is never: the checkpoint in 'outputs/a' was moved aside into 'outputs/a/previous-1'" "$TMP/f.err" &&
    ok || fail "resume never: warning: $(cat "$TMP/f.err")"
cmp -s "$TMP/a.model" "$W/outputs/a/previous-1/model.safetensors" && ok || fail "resume never: old model kept aside"
[ -s "$W/outputs/a/previous-1/trainer_state.json" ] && ok || fail "resume never: old state kept aside"
cmp -s "$TMP/a.model" "$W/outputs/a/model.safetensors" && fail "resume never: a new model" || ok
expect_eq "resume never: the user's file" "my notes" "$(cat "$W/outputs/a/notes.txt")"
expect_eq "resume never: step lines from 1" "1 2" "$(sed -n 's/^\[Step \([0-9]*\)\/2\].*/\1/p' "$TMP/f.out" | xargs)"

# A checkpoint without trainer_state.json: an error, not a fresh start over it.
rm "$W/outputs/b/trainer_state.json"
cp "$W/outputs/b/model.safetensors" "$TMP/b.model"
run b.yaml >"$TMP/g.out" 2>"$TMP/g.err"
expect_eq "no trainer_state: status" 2 $?
expect_eq "no trainer_state: message" "moai-finetune: error: cannot resume from 'outputs/b': it holds model.safetensors but no trainer_state.json, so which run it is and where it stopped are unknown" "$(head -n 1 "$TMP/g.err")"
cmp -s "$TMP/b.model" "$W/outputs/b/model.safetensors" && ok || fail "no trainer_state: checkpoint kept"

# An unreadable trainer_state.json: an error naming it.
echo '{"step": ' >"$W/outputs/b/trainer_state.json"
run b.yaml >/dev/null 2>"$TMP/h.err"
expect_eq "broken trainer_state: status" 1 $?
grep -q "^moai-finetune: error: outputs/b/trainer_state.json:2: cannot resume: " "$TMP/h.err" && ok ||
    fail "broken trainer_state: message: $(cat "$TMP/h.err")"

# An explicit resume of another run's checkpoint is refused alike.
run --set training.resume=outputs/a/previous-1 --set training.save_dir=outputs/c b.yaml >/dev/null 2>"$TMP/i.err"
expect_eq "explicit resume of another run: status" 2 $?
expect_eq "explicit resume of another run: hint" "hint: name a checkpoint of this run in training.resume, or set it to auto" "$(tail -n 1 "$TMP/i.err")"

# Interrupted, changed, resumed: the interrupted run's checkpoint survives the changed run.
recipe "$W/e.yaml" "save_interval: 1"
(cd "$W" && exec "$BIN" -q --set training.max_steps=400 e.yaml >"$TMP/k.out" 2>"$TMP/k.err") &
pid=$!
for _ in $(seq 200); do grep -q '^\[Step' "$TMP/k.out" 2>/dev/null && break; sleep 0.1; done
kill -INT $pid
wait $pid
expect_eq "interrupted: status" 130 $?
step=$(python3 -c "import json,sys; print(json.load(open(sys.argv[1]))['step'])" "$W/outputs/e/trainer_state.json")
cp "$W/outputs/e/model.safetensors" "$TMP/e.model"
sed -i '7s/thing 42/thing 43/' "$W/data.jsonl"
grep -q 'thing 43' "$W/data.jsonl" && ok || fail "the dataset changed"
run --set training.max_steps=400 e.yaml >/dev/null 2>"$TMP/l.err"
expect_eq "interrupted, then a changed dataset: status" 2 $?
cmp -s "$TMP/e.model" "$W/outputs/e/model.safetensors" && ok || fail "interrupted, then a changed dataset: checkpoint kept"
sed -i '7s/thing 43/thing 42/' "$W/data.jsonl"
run --set training.max_steps=$((step + 1)) e.yaml >"$TMP/m.out" 2>"$TMP/m.err"
expect_eq "interrupted, then resumed: status" 0 $?
expect_eq "interrupted, then resumed: the next step only" "$((step + 1))" "$(sed -n 's/^\[Step \([0-9]*\)\/.*/\1/p' "$TMP/m.out" | xargs)"

# The recipe from standard input saves in outputs/stdin.
run --plan-only --json - <"$W/a.yaml" >/dev/null 2>&1
run - <"$W/a.yaml" >"$TMP/j.out" 2>/dev/null
expect_eq "stdin: save_dir" "Model saved in 'outputs/stdin'" "$(tail -n 1 "$TMP/j.out")"
finish
