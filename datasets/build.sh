#!/usr/bin/env bash
# Rebuilds the shipped dataset and tokenizer (make dataset):
#   datasets/debian-descriptions.jsonl.zst   from Debian's Translation-en lists
#   models/tiny-llama/tokenizer.model        SentencePiece, trained on it
# Same lists in, same bytes out (sorted records, single-threaded deterministic training).
set -euo pipefail
cd "$(dirname "$0")/.."
if ! ls /var/lib/apt/lists/*_i18n_Translation-en* >/dev/null 2>&1; then
    sudo=; [ "$(id -u)" -eq 0 ] || sudo=sudo
    $sudo apt-get update -qq -o Acquire::Languages=en
fi
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
python3 datasets/build-dataset.py >"$tmp/data.jsonl"
zstd -19 -q --no-progress -f "$tmp/data.jsonl" -o datasets/debian-descriptions.jsonl.zst

# The tokenizer sees every article and synopsis, one text a line.
python3 - "$tmp/data.jsonl" >"$tmp/text.txt" <<'PY'
import json, sys
for line in open(sys.argv[1], encoding="utf-8"):
    r = json.loads(line)
    for part in (r["article"], r["highlights"]):
        for text in part.split("\n"):
            if text.strip():
                print(text.strip())
PY
# Relative paths: the model records its trainer options, paths included.
(cd "$tmp" && spm_train --input=text.txt --model_prefix=tok --model_type=bpe \
    --vocab_size=8000 --byte_fallback=true --character_coverage=1.0 \
    --user_defined_symbols='[SUMMARIZE],[/SUMMARIZE]' \
    --unk_id=0 --bos_id=1 --eos_id=2 --pad_id=3 \
    --num_threads=1 --input_sentence_size=0 --shuffle_input_sentence=false \
    --normalization_rule_name=identity --split_digits=true --max_sentence_length=8192 \
    --minloglevel=1 >spm.log 2>&1) || { cat "$tmp/spm.log"; exit 1; }
mkdir -p models/tiny-llama
cp "$tmp/tok.model" models/tiny-llama/tokenizer.model
echo "dataset: $(zstd -dc datasets/debian-descriptions.jsonl.zst | wc -l) records; tokenizer: models/tiny-llama/tokenizer.model"
