#!/usr/bin/env bash
# Trains models/tiny-llama/tokenizer.model (SentencePiece unigram, 8000 pieces, byte fallback) on
# the articles and highlights of datasets/debian-descriptions.jsonl.zst with Debian's spm_train.
#
# Usage: datasets/build-tokenizer.sh
# Deterministic: one thread, no sampling of input sentences, no shuffling; the same dataset
# gives byte-identical tokenizer.model.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$(dirname "$here")
data="$here/debian-descriptions.jsonl.zst"
outdir="$root/models/tiny-llama"
mkdir -p "$outdir"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
# One training sentence per line: every line of every article (blank lines dropped), then
# every synopsis.
zstd -dc "$data" | LC_ALL=C.UTF-8 python3 -c '
import json, sys
for line in sys.stdin:
    r = json.loads(line)
    for part in r["article"].split("\n"):
        if part.strip():
            print(part)
    print(r["highlights"])
' > "$work/corpus.txt"
n=$(wc -l < "$work/corpus.txt")
# Relative paths: the trainer spec stored in the model records them.
(cd "$work" && spm_train \
    --input=corpus.txt \
    --model_prefix=tokenizer \
    --model_type=unigram \
    --vocab_size=8000 \
    --byte_fallback=true \
    --user_defined_symbols='[SUMMARIZE],[/SUMMARIZE]' \
    --unk_id=0 --bos_id=1 --eos_id=2 --pad_id=3 \
    --character_coverage=1.0 \
    --normalization_rule_name=identity \
    --remove_extra_whitespaces=false \
    --split_digits=true \
    --allow_whitespace_only_pieces=true \
    --max_sentence_length=16384 \
    --num_threads=1 \
    --input_sentence_size="$n" \
    --shuffle_input_sentence=false \
    --minloglevel=1)
install -m 644 "$work/tokenizer.model" "$outdir/tokenizer.model"
echo "wrote $outdir/tokenizer.model (trained on $n lines)"
