#!/usr/bin/env bash
# Adds up the counts that run-tests.sh recorded and prints the closing line.
set -euo pipefail
dir=$1 passed=0 failed=0
for f in "$dir"/*; do
    read -r p q <"$f"
    passed=$((passed + p)) failed=$((failed + q))
done
echo "check: $passed passed, $failed failed"
[ "$failed" -eq 0 ]
