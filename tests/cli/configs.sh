#!/usr/bin/env bash
# Every shipped recipe validates, from a file and from standard input.
. tests/cli/lib.inc

for recipe in configs/*.yaml; do
    "$MOAI_BIN" -q --validate "$recipe" >"$TMP/out" 2>"$TMP/err"
    expect_eq "$recipe: status" 0 $?
    expect_eq "$recipe: output" "$recipe: ok" "$(cat "$TMP/out")"
done
"$MOAI_BIN" -q --validate configs/*.yaml >/dev/null 2>&1
expect_eq "all configs at once" 0 $?
cat configs/llama2-13b.yaml | "$MOAI_BIN" -q --validate - >/dev/null 2>"$TMP/err"
expect_eq "llama2-13b from stdin" 0 $?
finish
