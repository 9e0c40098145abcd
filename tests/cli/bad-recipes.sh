#!/usr/bin/env bash
# Every malformed recipe in tests/data/bad/recipes/ gives its one expected line on standard
# error, nothing on standard output, and exit status 2. NAME.args holds extra options and
# NAME.env extra environment for that case.
. tests/cli/lib.inc

n=0
for recipe in tests/data/bad/recipes/*.yaml; do
    name=${recipe%.yaml}
    args=() envs=()
    [ -f "$name.args" ] && read -r -a args <"$name.args"
    [ -f "$name.env" ] && read -r -a envs <"$name.env"
    env "${envs[@]}" "$MOAI_BIN" --validate "${args[@]}" "$recipe" >"$TMP/out" 2>"$TMP/err"
    rc=$?
    expect_eq "$recipe: exit status" 2 "$rc"
    expect_eq "$recipe: stderr" "$(cat "$name.expected")" "$(cat "$TMP/err")"
    expect_eq "$recipe: stdout" "" "$(cat "$TMP/out")"
    n=$((n + 1))
done
[ "$n" -ge 20 ] && ok || fail "only $n bad recipes (want at least 20)"
finish
