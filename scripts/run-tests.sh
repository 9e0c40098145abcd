#!/usr/bin/env bash
# Runs test binaries (unit) or CLI scripts (cli) and records the counts for summarize-tests.sh.
# usage: run-tests.sh unit MODE BIN...   |   run-tests.sh cli MODE MOAI_BIN SCRIPT...
set -uo pipefail
kind=$1 mode=$2; shift 2
results=build/test-results
mkdir -p "$results"
out="$results/$mode-$kind"
passed=0 failed=0 failures=()

if [ "$kind" = unit ]; then
    for t in "$@"; do
        log=$(mktemp)
        "$t" >"$log" 2>&1
        rc=$?
        cat "$log"
        p=$(sed -n 's/.*\[  PASSED  \] \([0-9]*\) test.*/\1/p' "$log" | tail -n 1)
        f=$(sed -n 's/.*\[  FAILED  \] \([0-9]*\) test.*/\1/p' "$log" | tail -n 1)
        passed=$((passed + ${p:-0}))
        failed=$((failed + ${f:-0}))
        if [ $rc -ne 0 ]; then
            failures+=("$(basename "$t")")
            [ -z "$f" ] && failed=$((failed + 1))
        fi
        rm -f "$log"
    done
else
    bin=$(realpath "$1"); shift
    for s in "$@"; do
        if MOAI_BIN="$bin" MOAI_MODE="$mode" bash "$s"; then
            passed=$((passed + 1)); echo "PASS cli/$(basename "$s") [$mode]"
        else
            failed=$((failed + 1)); failures+=("$(basename "$s")")
            echo "FAIL cli/$(basename "$s") [$mode]"
        fi
    done
fi
echo "$passed $failed" >"$out"
echo "$mode $kind: $passed passed, $failed failed${failures[*]:+ (${failures[*]})}"
[ "$failed" -eq 0 ]
