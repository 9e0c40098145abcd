#!/usr/bin/env bash
# Runs every benchmark binary; each prints its own rows of the table.
set -euo pipefail
printf '%-44s %14s %14s %s\n' "benchmark" "figure" "target" "note"
for b in "$@"; do
    "$b"
done
