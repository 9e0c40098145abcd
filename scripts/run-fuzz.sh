#!/usr/bin/env bash
# Runs each libFuzzer binary for SECONDS from a copy of its corpus (tests/fuzz/corpus/NAME, so
# the repository's corpus does not grow) and fails on the first finding (a crash, a leak, a
# sanitizer report). Prints the executions each did.
# usage: run-fuzz.sh SECONDS build/fuzz/fuzz_NAME...
set -uo pipefail
secs=$1; shift
status=0
for f in "$@"; do
    name=$(basename "$f"); name=${name#fuzz_}
    work=$(mktemp -d)
    cp -r "tests/fuzz/corpus/$name/." "$work/" 2>/dev/null
    log=$(mktemp)
    "$f" -max_total_time="$secs" -print_final_stats=1 -artifact_prefix="build/fuzz/$name-" \
        "$work" >"$log" 2>&1
    rc=$?
    runs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log")
    if [ $rc -ne 0 ]; then
        tail -n 40 "$log"
        echo "fuzz $name: FINDING after ${runs:-?} runs (artifact under build/fuzz/)"
        status=1
    else
        echo "fuzz $name: ${runs:-?} runs in ${secs}s, no finding"
    fi
    rm -rf "$work" "$log"
done
exit $status
