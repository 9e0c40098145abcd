#!/usr/bin/env bash
# Runs test binaries (unit) or CLI scripts (cli) and records the counts for summarize-tests.sh.
# coretypes runs the binaries once under each OpenBLAS kernel family (OPENBLAS_CORETYPE) that
# this CPU can execute, so the numerics hold on every x86-64 host, not only this one's.
# usage: run-tests.sh unit MODE BIN...   |   run-tests.sh cli MODE MOAI_BIN SCRIPT...
#        run-tests.sh coretypes MODE BIN...
set -uo pipefail
kind=$1 mode=$2; shift 2
results=build/test-results
mkdir -p "$results"
out="$results/$mode-$kind"
passed=0 failed=0 failures=()

# run_unit TAG BIN...: runs cmocka binaries, adding to the counts
run_unit() {
    local tag=$1 t log rc p f
    shift
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
            failures+=("$(basename "$t")$tag")
            [ -z "$f" ] && failed=$((failed + 1))
        fi
        rm -f "$log"
    done
}

# The kernel families of Debian's x86-64 OpenBLAS and the CPU flags each needs.
families="Sandybridge:avx Haswell:avx2 Zen:avx2 SkylakeX:avx512f"

if [ "$kind" = unit ]; then
    run_unit "" "$@"
elif [ "$kind" = coretypes ]; then
    flags=" $(grep -m1 '^flags' /proc/cpuinfo 2>/dev/null | cut -d: -f2) "
    ran=0
    for fam in $families; do
        name=${fam%%:*} need=${fam#*:}
        case "$flags" in *" $need "*) ;; *) echo "coretypes: this CPU cannot run $name"; continue ;; esac
        echo "coretypes: OPENBLAS_CORETYPE=$name"
        OPENBLAS_CORETYPE=$name run_unit " [$name]" "$@"
        ran=$((ran + 1))
    done
    [ $ran -gt 0 ] || run_unit "" "$@" # not x86-64: the default kernels
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
