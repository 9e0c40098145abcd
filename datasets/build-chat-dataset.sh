#!/usr/bin/env bash
# Builds datasets/debian-chat.json.zst: the first 2,000 records of the shipped summarization
# set as chat conversations (a system prompt, the description as the user turn, the synopsis as
# the assistant's answer), one JSON array, for dataset.format: messages
# (configs/llama3-8b-chat.yaml). Deterministic.
#
# Usage: datasets/build-chat-dataset.sh
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
zstd -dcq "$here/debian-descriptions.jsonl.zst" | python3 -c '
import json, sys
out = []
for line in sys.stdin:
    if len(out) == 2000:
        continue  # read to the end: zstd is not cut off
    r = json.loads(line)
    out.append({"messages": [
        {"role": "system", "content": "You summarize Debian package descriptions in one line."},
        {"role": "user", "content": r["article"]},
        {"role": "assistant", "content": r["highlights"]}]})
json.dump(out, sys.stdout, ensure_ascii=False, indent=1)
sys.stdout.write("\n")
' | zstd -q -19 -f -o "$here/debian-chat.json.zst"
