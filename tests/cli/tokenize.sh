#!/usr/bin/env bash
# --tokenize (the ids and labels the model will see), tokenizer formats that need no npm: a
# Llama 2 style tokenizer.json gives the ids of the SentencePiece BPE model it was made from,
# a model directory's tokenizer.json is its default tokenizer, bad tokenizer files and invalid
# records give one line.
. tests/cli/lib.inc

head_yaml() { # head_yaml TOKENIZER DATASET TEMPLATE [EXTRA DATASET KEYS]
    cat <<YAML
model:
  config: {hidden_size: 32, intermediate_size: 64, num_hidden_layers: 2, num_attention_heads: 4,
           num_key_value_heads: 2, vocab_size: 8000}
  init: random
tokenizer: $1
dataset:
  path: $2
  template: "$3"
  ${4:-}
training:
  batch_size: 8
  block_size: 64
flavor: {device: cpu, devices: 1}
YAML
}

# --tokenize: one object per record in file order, no padding, labels masked before
# response_start ("a b" is [268, 715] in the shipped tokenizer; BOS 1, EOS 2).
printf '{"q": "a", "r": "b"}\n{"q": "b", "r": "a b"}\n' >"$TMP/qa.jsonl"
head_yaml models/tiny-llama/tokenizer.model "$TMP/qa.jsonl" '{q}\n[/SUMMARIZE]\n{r}' \
    'response_start: "[/SUMMARIZE]\n"' >"$TMP/qa.yaml"
"$MOAI_BIN" -q --tokenize "$TMP/qa.yaml" >"$TMP/qa.out" 2>"$TMP/qa.err"
expect_eq "--tokenize status" 0 $?
expect_eq "--tokenize lines" 2 "$(wc -l <"$TMP/qa.out")"
expect_eq "--tokenize: input_ids and labels of the same length" "true true" \
    "$(jq -r '(.input_ids | length) == (.labels | length)' "$TMP/qa.out" | xargs)"
expect_eq "--tokenize: the first record ends with the EOS, learned" "2 2" \
    "$(jq -r '[.input_ids[-1], .labels[-1]] | map(tostring) | join(" ")' "$TMP/qa.out" | head -n 1)"
expect_eq "--tokenize: the prompt is masked, BOS included" "-100" \
    "$(jq -r '.labels[0], .labels[1]' "$TMP/qa.out" | sort -u | head -n 1)"
expect_eq "--tokenize: nothing on stdout but the objects" "" \
    "$(grep -v '^{"input_ids": \[' "$TMP/qa.out")"
"$MOAI_BIN" -q --tokenize --validate "$TMP/qa.yaml" >/dev/null 2>"$TMP/both.err"
expect_eq "--tokenize with --validate: usage error" 2 $?
expect_eq "--tokenize with --validate: message" \
    "moai-finetune: error: --validate cannot be combined with --tokenize" "$(cat "$TMP/both.err")"

# A record with invalid UTF-8 is an error naming its line.
printf '{"q": "a", "r": "b"}\n{"q": "\xff", "r": "b"}\n' >"$TMP/bad.jsonl"
head_yaml models/tiny-llama/tokenizer.model "$TMP/bad.jsonl" '{q} {r}' >"$TMP/bad.yaml"
"$MOAI_BIN" -q --tokenize "$TMP/bad.yaml" >"$TMP/bad.out" 2>"$TMP/bad.err"
expect_eq "invalid UTF-8: status" 1 $?
expect_eq "invalid UTF-8: no partial output" "" "$(cat "$TMP/bad.out")"
grep -q "^moai-finetune: error: $TMP/bad.jsonl:2:.*UTF-8" "$TMP/bad.err" && ok ||
    fail "invalid UTF-8: message: $(cat "$TMP/bad.err")"

# A file that is no tokenizer says so.
"$MOAI_BIN" -q --tokenize <(head_yaml tests/data/bad/tokenizers/not-a-tokenizer.txt \
    "$TMP/qa.jsonl" '{q}') >/dev/null 2>"$TMP/nt.err"
expect_eq "not a tokenizer: status" 2 $?
expect_eq "not a tokenizer: message" "moai-finetune: error: 'tests/data/bad/tokenizers/not-a-tokenizer.txt' is not a tokenizer: expected a tokenizer.json, a tiktoken file or a SentencePiece model" \
    "$(cat "$TMP/nt.err")"

# A Llama 2 style tokenizer.json (Prepend + Replace normalizer, byte_fallback BPE) made from a
# SentencePiece BPE model gives that model's ids, on the shipped dataset and a hard corpus.
zstd -dcq datasets/debian-descriptions.jsonl.zst | head -n 3000 | jq -r '.article, .highlights' \
    >"$TMP/corpus.txt"
(cd "$TMP" && spm_train --input=corpus.txt --model_prefix=bpe --model_type=bpe --vocab_size=3000 \
    --byte_fallback=true --split_digits=true --normalization_rule_name=identity \
    --remove_extra_whitespaces=false --unk_id=0 --bos_id=1 --eos_id=2 --pad_id=-1 \
    --character_coverage=0.9995 --num_threads=1 --minloglevel=2 >/dev/null 2>&1)
spm_export_vocab --model="$TMP/bpe.model" | node tests/ref/spm-to-json.mjs "$TMP/l2"
spm_export_vocab --model="$TMP/bpe.model" | node tests/ref/spm-to-json.mjs "$TMP/ms" metaspace
node tests/ref/hard-corpus.mjs >"$TMP/hard.jsonl"
for set in "datasets/debian-descriptions.jsonl.zst|[SUMMARIZE] {article} [/SUMMARIZE]\\\\n{highlights}" \
    "$TMP/hard.jsonl|{text}"; do
    data=${set%%|*} tmpl=${set#*|}
    for tok in "$TMP/bpe.model" "$TMP/l2" "$TMP/ms"; do
        head_yaml "$tok" "$data" "$tmpl" "limit: 2000" | sed 's/block_size: 64/block_size: 4096/' \
            >"$TMP/l2.yaml"
        "$MOAI_BIN" -q --tokenize "$TMP/l2.yaml" | jq -c .input_ids >"$TMP/ids.$(basename "$tok")"
    done
    n=$(wc -l <"$TMP/ids.bpe.model")
    [ "$n" -gt 100 ] && ok || fail "Llama 2 style: only $n records"
    expect_eq "Llama 2 style tokenizer.json = SentencePiece BPE on $(basename "$data") ($n records)" \
        "" "$(diff "$TMP/ids.bpe.model" "$TMP/ids.l2" | head -n 4)"
    expect_eq "Metaspace tokenizer.json = SentencePiece BPE on $(basename "$data") ($n records)" \
        "" "$(diff "$TMP/ids.bpe.model" "$TMP/ids.ms" | head -n 4)"
done

# A model directory with tokenizer.json uses it by default (over tokenizer.model).
mkdir -p "$TMP/model"
cp "$TMP/bpe.model" "$TMP/model/tokenizer.model"
cp "$TMP/l2/tokenizer.json" "$TMP/l2/tokenizer_config.json" "$TMP/model/"
cp models/tiny-llama/config.json "$TMP/model/"
sed -e '/^tokenizer:/d' -e "s|^  init: random|  init: random\n  path: $TMP/model|" \
    "$TMP/qa.yaml" >"$TMP/dir.yaml"
"$MOAI_BIN" -q -v --tokenize "$TMP/dir.yaml" >"$TMP/dir.out" 2>"$TMP/dir.err"
expect_eq "model directory tokenizer: status" 0 $?
expect_eq "model directory tokenizer: ids of tokenizer.json" \
    "$(jq -c .input_ids "$TMP/dir.out")" \
    "$(sed "s|^tokenizer:.*|tokenizer: $TMP/l2|" "$TMP/qa.yaml" >"$TMP/l2q.yaml" &&
        "$MOAI_BIN" -q --tokenize "$TMP/l2q.yaml" | jq -c .input_ids)"

# --validate loads the tokenizer and checks it against the model's vocabulary (8000 ids).
python3 -c '
import base64
toks = [bytes([c]) for c in range(256)] + [bytes([a, b]) for a in range(33, 127) for b in range(33, 127)]
print("".join("%s %d\n" % (base64.b64encode(t).decode(), i) for i, t in enumerate(toks)), end="")
' >"$TMP/big.tiktoken"
for tok in "$TMP/l2" "$TMP/big.tiktoken"; do
    cat >"$TMP/v.yaml" <<YAML
model: {path: models/tiny-llama}
tokenizer: $tok
dataset: {path: $TMP/qa.jsonl, template: "{q} {r}"}
flavor: {device: cpu, devices: 1}
YAML
    "$MOAI_BIN" -q --validate "$TMP/v.yaml" >"$TMP/v.out" 2>"$TMP/v.err"
    echo "$? $(cat "$TMP/v.out" "$TMP/v.err")" >"$TMP/v.$(basename "$tok")"
done
expect_eq "--validate: a tokenizer within the vocabulary" "0 $TMP/v.yaml: ok" "$(cat "$TMP/v.l2")"
expect_eq "--validate: a tokenizer larger than the vocabulary" \
    "2 moai-finetune: error: $TMP/v.yaml: tokenizer '$TMP/big.tiktoken' has 9348 ids, more than the model's vocabulary of 8000" \
    "$(cat "$TMP/v.big.tiktoken")"

# The checkpoint keeps the tokenizer file it used and a tokenizer_config.json.
for tok in "$TMP/model" models/tiny-llama/tokenizer.model; do
    rm -rf "$TMP/ck"
    sed -e "s|^tokenizer:.*|tokenizer: $tok|" \
        -e "s|^  batch_size: 8|  batch_size: 2|" -e "s|^  block_size: 64|  block_size: 16\n  max_steps: 1\n  precision: fp32\n  save_dir: $TMP/ck|" \
        "$TMP/qa.yaml" >"$TMP/ck.yaml"
    "$MOAI_BIN" -q "$TMP/ck.yaml" >/dev/null 2>"$TMP/ck.err" || fail "training with $tok: $(cat "$TMP/ck.err")"
    if [ "$tok" = models/tiny-llama/tokenizer.model ]; then
        cmp -s "$TMP/ck/tokenizer.model" "$tok" && ok || fail "checkpoint: tokenizer.model differs"
        want='"<s>" "</s>" "<pad>" true "LlamaTokenizer"'
    else
        cmp -s "$TMP/ck/tokenizer.json" "$TMP/model/tokenizer.json" && ok || fail "checkpoint: tokenizer.json differs"
        want='"<s>" "</s>" "</s>" true "PreTrainedTokenizerFast"'
    fi
    expect_eq "checkpoint tokenizer_config.json ($tok)" "$want" \
        "$(jq -c '.bos_token, .eos_token, .pad_token, .add_bos_token, .tokenizer_class' "$TMP/ck/tokenizer_config.json" | xargs -d '\n' echo)"
done

finish
