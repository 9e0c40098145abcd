#!/usr/bin/env bash
# Builds datasets/debian-descriptions.jsonl.zst from apt's English package description lists.
#
# Usage: datasets/build-dataset.sh [LIST.lz4...]
# Default lists: every /var/lib/apt/lists/*_i18n_Translation-en.lz4, in sorted name order (the
# first description seen for a package wins). The same lists give byte-identical output.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
out="$here/debian-descriptions.jsonl.zst"
if [ "$#" -eq 0 ]; then
    shopt -s nullglob
    set -- /var/lib/apt/lists/*_i18n_Translation-en.lz4
    if [ "$#" -eq 0 ]; then
        echo "build-dataset.sh: no Translation-en lists under /var/lib/apt/lists (run apt-get update)" >&2
        exit 1
    fi
fi
mapfile -t lists < <(printf '%s\n' "$@" | LC_ALL=C sort)
decompress() {
    case "$1" in
        *.lz4) lz4 -dc "$1" ;;
        *.zst) zstd -dc "$1" ;;
        *.xz) xz -dc "$1" ;;
        *.gz) gzip -dc "$1" ;;
        *) cat "$1" ;;
    esac
    echo # a blank line ends the last stanza of each list
}
tmp=$(mktemp "$out.XXXXXX")
trap 'rm -f "$tmp"' EXIT
for l in "${lists[@]}"; do decompress "$l"; done \
    | LC_ALL=C.UTF-8 python3 "$here/build_dataset.py" - \
    | zstd -19 --no-progress -q -c > "$tmp"
chmod 644 "$tmp"
mv "$tmp" "$out"
trap - EXIT
echo "wrote $out ($(zstd -dc "$out" | wc -l) records)"
