#!/usr/bin/env bash
# The command line: help, version, usage errors, several recipes, exit statuses, --json.
. tests/cli/lib.inc

"$MOAI_BIN" --help >"$TMP/out" 2>"$TMP/err"
expect_eq "--help status" 0 $?
grep -q -- '--plan-only' "$TMP/out" && ok || fail "--help lists --plan-only"
grep -q -- '--set KEY=VALUE' "$TMP/out" && ok || fail "--help lists --set"

"$MOAI_BIN" --version >"$TMP/out"
expect_eq "--version status" 0 $?
grep -qE '^moai-finetune [0-9]+\.[0-9]+\.[0-9]+$' "$TMP/out" && ok || fail "--version format"

"$MOAI_BIN" 2>"$TMP/err"
expect_eq "no recipe: status" 2 $?
expect_eq "no recipe: message" "moai-finetune: error: no recipe given (usage: moai-finetune [OPTIONS] RECIPE...)" "$(cat "$TMP/err")"

"$MOAI_BIN" --frobnicate x.yaml 2>"$TMP/err"
expect_eq "unknown option: status" 2 $?
expect_eq "unknown option: message" "moai-finetune: error: unknown option or missing argument '--frobnicate'" "$(cat "$TMP/err")"

"$MOAI_BIN" -x x.yaml 2>"$TMP/err"
expect_eq "unknown short option: status" 2 $?
expect_eq "unknown short option: message" "moai-finetune: error: unknown option '-x'" "$(cat "$TMP/err")"

"$MOAI_BIN" --plan-only --validate x.yaml 2>"$TMP/err"
expect_eq "--plan-only with --validate" 2 $?
expect_eq "--plan-only with --validate: message" "moai-finetune: error: --validate cannot be combined with --plan-only" "$(cat "$TMP/err")"

"$MOAI_BIN" --validate --tokenize x.yaml 2>"$TMP/err"
expect_eq "--tokenize with --validate: message" "moai-finetune: error: --tokenize cannot be combined with --plan-only or --validate" "$(cat "$TMP/err")"

"$MOAI_BIN" --validate no-such-recipe.yaml 2>"$TMP/err"
expect_eq "missing recipe: status" 2 $?
expect_eq "missing recipe: message" "moai-finetune: error: cannot open 'no-such-recipe.yaml': No such file or directory" "$(cat "$TMP/err")"

# Several recipes: a failure is reported, the next still runs, the status is the highest.
good=tests/data/recipes/minimal.yaml
"$MOAI_BIN" --validate no-such-recipe.yaml "$good" >"$TMP/out" 2>"$TMP/err"
expect_eq "several recipes: status" 2 $?
expect_eq "several recipes: the good one ran" "$good: ok" "$(cat "$TMP/out")"

# Standard input.
"$MOAI_BIN" --validate - <"$good" >"$TMP/out" 2>"$TMP/err"
expect_eq "stdin: status" 0 $?
expect_eq "stdin: output" "-: ok" "$(cat "$TMP/out")"

# JSON Lines: one object per recipe, errors included.
"$MOAI_BIN" --validate --json "$good" no-such-recipe.yaml >"$TMP/out" 2>/dev/null
expect_eq "--json: status" 2 $?
expect_eq "--json: lines" 2 "$(wc -l <"$TMP/out")"
python3 - "$TMP/out" <<'PY' && ok || fail "--json objects"
import json, sys
lines = [json.loads(l) for l in open(sys.argv[1])]
assert lines[0] == {"recipe": "tests/data/recipes/minimal.yaml", "status": "ok"}, lines[0]
assert lines[1]["status"] == "error" and "no-such-recipe.yaml" in lines[1]["error"], lines[1]
PY

# --set overrides apply to every recipe, with the recipe checks.
"$MOAI_BIN" --validate --set training.batch_size=-4 "$good" 2>"$TMP/err"
expect_eq "--set checked: status" 2 $?
expect_eq "--set checked: message" "moai-finetune: error: --set training.batch_size=-4: 'training.batch_size' must be an integer >= 1, not '-4'" "$(cat "$TMP/err")"

# Results on standard output only; nothing there on failure.
"$MOAI_BIN" --validate tests/data/bad/recipes/empty.yaml >"$TMP/out" 2>/dev/null
expect_eq "failure prints nothing on stdout" "" "$(cat "$TMP/out")"
finish
