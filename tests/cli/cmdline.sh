#!/usr/bin/env bash
# GNU-style command line and --set typed by the recipe schema: options anywhere among the
# recipes, "--" ends the options, a string key takes its --set value as it is.
. tests/cli/lib.inc

good=tests/data/recipes/minimal.yaml

# Options after the recipe apply to it (torchtune users put overrides last).
"$MOAI_BIN" --validate "$good" --set training.batch_size=-4 >"$TMP/out" 2>"$TMP/err"
expect_eq "--set after the recipe: status" 2 $?
expect_eq "--set after the recipe: message" "moai-finetune: error: --set training.batch_size=-4: 'training.batch_size' must be an integer >= 1, not '-4'" "$(cat "$TMP/err")"
"$MOAI_BIN" "$good" --validate --json >"$TMP/out" 2>"$TMP/err"
expect_eq "--validate --json after the recipe: status" 0 $?
expect_eq "--validate --json after the recipe: output" '{"recipe":"tests/data/recipes/minimal.yaml","status":"ok"}' "$(cat "$TMP/out")"
"$MOAI_BIN" "$good" --plan-only --set training.batch_size=64 --json "$good" >"$TMP/out" 2>/dev/null
expect_eq "options between recipes: status" 0 $?
expect_eq "options between recipes: both planned with the override" "64 64" \
    "$(python3 -c 'import json,sys
print(*[json.loads(l)["training"]["batch_size"] for l in open(sys.argv[1])])' "$TMP/out")"

# "--" ends the options: what follows is a recipe, even when it starts with a dash.
cp "$good" "$TMP/--json"
"$MOAI_BIN" --validate -- "$TMP/--json" >"$TMP/out" 2>"$TMP/err"
expect_eq "--: status" 0 $?
expect_eq "--: the file named --json is a recipe" "$TMP/--json: ok" "$(cat "$TMP/out")"

# --set of a string key takes the text as it is: '#' is no comment, ':' no mapping.
"$MOAI_BIN" --plan-only --json "$good" --set 'dataset.response_start=### Answer:' \
    --set 'dataset.template=Q: {article}' >"$TMP/out" 2>"$TMP/err"
expect_eq "--set string: status" 0 $?
python3 - "$TMP/out" <<'PY' && ok || fail "--set string: the values"
import json, sys
o = json.loads(open(sys.argv[1]).read())
assert o["status"] == "ok", o
PY
"$MOAI_BIN" --validate "$good" --set 'dataset.response_start=### Answer:' >"$TMP/out" 2>"$TMP/err"
expect_eq "--set response_start with '#': not a comment (checked against the template)" \
    "moai-finetune: error: tests/data/recipes/minimal.yaml: response_start '### Answer:' does not occur in the literal text of template '[SUMMARIZE] {article} [/SUMMARIZE]\n{highlights}'" \
    "$(cat "$TMP/err")"
# Keys of other types read the value as YAML, and a value that does not parse names the option.
"$MOAI_BIN" --validate "$good" --set 'training.betas=[0.9, 0.95' 2>"$TMP/err"
expect_eq "--set bad YAML: status" 2 $?
expect_eq "--set bad YAML: message" "moai-finetune: error: --set training.betas=[0.9, 0.95: the value is not valid YAML (did not find expected ',' or ']' while parsing a flow sequence)" "$(cat "$TMP/err")"
"$MOAI_BIN" --validate "$good" --set 'training.lr=2e-4 # a comment' >"$TMP/out" 2>"$TMP/err"
expect_eq "--set number with a comment: status" 0 $?
finish
