#!/usr/bin/env bash
# save_dir is the user's: ".", "..", a symbolic link or a mount point keep every file the user
# put there, unchanged; a save_dir that cannot be written stops the run (and --validate)
# before training; two runs on one save_dir: the second stops at once.
. tests/cli/lib.inc

ROOT=$PWD
recipe() { # recipe FILE SAVE_DIR [EXTRA TRAINING KEYS]: paths absolute, so it runs anywhere
    dp_recipe "$@"
    sed -i "s|: models/|: $ROOT/models/|; s|: datasets/|: $ROOT/datasets/|" "$1"
}

# user_files DIR: a recipe-like file, notes, a subfolder of data and a symbolic link
user_files() {
    mkdir -p "$1/data"
    echo "my notes" >"$1/notes.txt"
    seq 1000 >"$1/data/numbers.txt"
    ln -s notes.txt "$1/link-to-notes"
}

# same_files WHAT DIR SNAPSHOT: every file of SNAPSHOT is in DIR, unchanged
same_files() {
    if (cd "$2" && sha256sum -c --quiet "$3" >/dev/null 2>&1); then ok; else fail "$1: the user's files changed"; fi
}
snapshot() { (cd "$1" && find . -path ./.moai-save -prune -o -type f -print | sort | xargs sha256sum) >"$2"; }
has_checkpoint() {
    for f in config.json model.safetensors plan.json optimizer.safetensors trainer_state.json; do
        [ -s "$2/$f" ] || { fail "$1: no $f"; return; }
    done
    ok
}

# save_dir "." in a folder holding the recipe, notes and a subfolder: run twice (save, resume)
mkdir -p "$TMP/dot"
user_files "$TMP/dot"
recipe "$TMP/dot/recipe.yaml" . "max_steps: 2"
snapshot "$TMP/dot" "$TMP/dot.sum"
(cd "$TMP/dot" && "$MOAI_BIN" -q recipe.yaml >/dev/null 2>"$TMP/dot.err")
expect_eq "save_dir .: status" 0 $?
same_files "save_dir ." "$TMP/dot" "$TMP/dot.sum"
has_checkpoint "save_dir ." "$TMP/dot"
(cd "$TMP/dot" && "$MOAI_BIN" -q --set training.max_steps=3 --set training.save_interval=1 recipe.yaml >/dev/null 2>>"$TMP/dot.err")
expect_eq "save_dir . resumed: status" 0 $?
same_files "save_dir . resumed" "$TMP/dot" "$TMP/dot.sum"
expect_eq "save_dir . resumed: step" 3 "$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["step"])' "$TMP/dot/trainer_state.json")"
[ ! -e "$TMP/dot/.moai-save" ] && ok || fail "save_dir .: staging directory left behind"

# save_dir ".." from a subfolder: the parent's files stay
mkdir -p "$TMP/up/sub"
user_files "$TMP/up"
recipe "$TMP/up/sub/recipe.yaml" .. "max_steps: 1"
snapshot "$TMP/up" "$TMP/up.sum"
(cd "$TMP/up/sub" && "$MOAI_BIN" -q recipe.yaml >/dev/null 2>"$TMP/up.err")
expect_eq "save_dir ..: status" 0 $?
same_files "save_dir .." "$TMP/up" "$TMP/up.sum"
has_checkpoint "save_dir .." "$TMP/up"

# a symbolic link to a directory: stays a link; its target keeps the user's files
mkdir -p "$TMP/target"
user_files "$TMP/target"
ln -s target "$TMP/link"
snapshot "$TMP/target" "$TMP/target.sum"
recipe "$TMP/link.yaml" "$TMP/link" "max_steps: 1"
"$MOAI_BIN" -q "$TMP/link.yaml" >/dev/null 2>"$TMP/link.err"
expect_eq "symlink: status" 0 $?
"$MOAI_BIN" -q --set training.max_steps=2 "$TMP/link.yaml" >/dev/null 2>>"$TMP/link.err"
expect_eq "symlink resumed: status" 0 $?
[ -L "$TMP/link" ] && ok || fail "symlink: save_dir is no longer a link"
same_files "symlink" "$TMP/target" "$TMP/target.sum"
has_checkpoint "symlink" "$TMP/target"

# a mount point (a container's volume): where this user may mount a tmpfs in a namespace
if unshare -rm true 2>/dev/null || { [ "$(id -u)" = 0 ] && unshare -m true 2>/dev/null; }; then
    mkdir -p "$TMP/mnt"
    recipe "$TMP/mnt.yaml" "$TMP/mnt" "save_interval: 1"
    flag=-m; [ "$(id -u)" = 0 ] || flag=-rm
    unshare $flag sh -c "mount -t tmpfs none '$TMP/mnt' && echo mine >'$TMP/mnt/notes.txt' &&
        '$MOAI_BIN' -q --set training.max_steps=2 '$TMP/mnt.yaml' >/dev/null && cat '$TMP/mnt/notes.txt' &&
        test -s '$TMP/mnt/model.safetensors'" >"$TMP/mnt.out" 2>"$TMP/mnt.err"
    expect_eq "mount point: status" 0 $?
    expect_eq "mount point: user's file" mine "$(cat "$TMP/mnt.out")"
else
    echo "  savedir.sh: no mount namespace here; the mount point case is skipped" >&2
fi

# a save_dir that is a file, or under one: --validate and the run stop before training
echo "not a directory" >"$TMP/file"
recipe "$TMP/f.yaml" "$TMP/file" "max_steps: 1"
"$MOAI_BIN" -q --validate "$TMP/f.yaml" >"$TMP/fv.out" 2>"$TMP/fv.err"
expect_eq "file: --validate status" 1 $?
expect_eq "file: --validate message" "moai-finetune: error: $TMP/f.yaml: 'training.save_dir': '$TMP/file' is not a directory" "$(cat "$TMP/fv.err")"
"$MOAI_BIN" -q "$TMP/f.yaml" >"$TMP/f.out" 2>"$TMP/f.err"
expect_eq "file: status" 1 $?
expect_eq "file: message" "moai-finetune: error: $TMP/f.yaml: 'training.save_dir': '$TMP/file' is not a directory" "$(cat "$TMP/f.err")"
expect_eq "file: no step trained" "" "$(cat "$TMP/f.out")"
expect_eq "file: unchanged" "not a directory" "$(cat "$TMP/file")"
recipe "$TMP/g.yaml" "$TMP/file/sub" "max_steps: 1"
"$MOAI_BIN" -q "$TMP/g.yaml" >"$TMP/g.out" 2>"$TMP/g.err"
expect_eq "under a file: status" 1 $?
expect_eq "under a file: message" "moai-finetune: error: $TMP/g.yaml: 'training.save_dir': cannot use '$TMP/file/sub': Not a directory" "$(cat "$TMP/g.err")"
if [ "$(id -u)" != 0 ]; then # root writes through a read-only mode
    mkdir -p "$TMP/ro" && chmod 555 "$TMP/ro"
    recipe "$TMP/ro.yaml" "$TMP/ro" "max_steps: 1"
    "$MOAI_BIN" -q --validate "$TMP/ro.yaml" >/dev/null 2>"$TMP/ro.err"
    expect_eq "read-only: --validate status" 1 $?
    expect_eq "read-only: message" "moai-finetune: error: $TMP/ro.yaml: 'training.save_dir': cannot write in '$TMP/ro': Permission denied" "$(cat "$TMP/ro.err")"
fi

# save_dir resolving to the model's own directory (here through "/."): refused before any work,
# the model's files untouched, in training and in --validate
mkdir -p "$TMP/own"
cp "$ROOT"/models/tiny-llama/config.json "$ROOT"/models/tiny-llama/model.safetensors \
    "$ROOT"/models/tiny-llama/tokenizer.model "$TMP/own/"
own_before=$(cd "$TMP/own" && sha256sum ./* | sort)
cat >"$TMP/own.yaml" <<YAML
model: {path: $TMP/own}
dataset: {path: $ROOT/datasets/debian-descriptions.jsonl.zst, limit: 16, cache_dir: $TMP/cache}
training: {batch_size: 2, block_size: 32, max_steps: 1, precision: fp32, save_dir: $TMP/own/.}
flavor: {device: cpu, devices: 1}
YAML
for mode in train validate; do
    flag=; [ $mode = validate ] && flag=--validate
    "$MOAI_BIN" -q $flag "$TMP/own.yaml" >/dev/null 2>"$TMP/own.err"
    expect_eq "save_dir is the model ($mode): status" 2 $?
    expect_eq "save_dir is the model ($mode): message" "moai-finetune: error: $TMP/own.yaml: 'training.save_dir' is the model's directory '$TMP/own': a checkpoint would overwrite its config.json and weights" "$(grep -v '^\[' "$TMP/own.err")"
done
expect_eq "save_dir is the model: its files unchanged" "$own_before" "$(cd "$TMP/own" && sha256sum ./* | sort)"

# two runs on one save_dir: the second stops at once; the first finishes its checkpoint
recipe "$TMP/two.yaml" "$TMP/two" "max_steps: 100000"
"$MOAI_BIN" -q "$TMP/two.yaml" >"$TMP/two1.out" 2>"$TMP/two1.err" &
pid=$!
for _ in $(seq 100); do grep -q '^\[Step' "$TMP/two1.out" 2>/dev/null && break; sleep 0.1; done
"$MOAI_BIN" -q --set training.precision=bf16 "$TMP/two.yaml" >"$TMP/two2.out" 2>"$TMP/two2.err"
expect_eq "second run: status" 1 $?
expect_eq "second run: message" "moai-finetune: error: $TMP/two.yaml: 'training.save_dir': '$TMP/two' is in use by another moai-finetune run" "$(cat "$TMP/two2.err")"
expect_eq "second run: no step" "" "$(cat "$TMP/two2.out")"
kill -INT $pid
wait $pid
expect_eq "first run: interrupted and saved" 130 $?
python3 - "$TMP/two" <<'PY' && ok || fail "first run: its checkpoint is whole and fp32"
import json, sys
d = sys.argv[1]
assert json.load(open(d + "/config.json"))["torch_dtype"] == "float32"
assert json.load(open(d + "/trainer_state.json"))["recipe"]["training"]["precision"] == "fp32"
PY
finish
