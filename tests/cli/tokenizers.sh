#!/usr/bin/env bash
# Byte-level BPE against reference implementations: Llama 3 (tokenizer.json and Meta's tiktoken
# tokenizer.model) and OpenAI's cl100k_base and o200k_base (tokenizer.json), on a hard corpus
# (tests/ref/hard-corpus.mjs) and on the shipped dataset through a template with special
# tokens; every id must be identical. The tokenizer files and the reference ids are built at
# test time from npm packages (llama3-tokenizer-js, js-tiktoken) by tests/ref/tokenizers.mjs and
# cached under build/tokref/. The release build checks every record of the dataset; the ASan
# build the first 3000. Skips (and says so) only when npm cannot install the packages.
. tests/cli/lib.inc

npm_dir=build/npm-ref
packages="llama3-tokenizer-js@1.2.0 js-tiktoken@1.0.21"
if ! [ -d "$npm_dir/node_modules/llama3-tokenizer-js" ] || ! [ -d "$npm_dir/node_modules/js-tiktoken" ]; then
    mkdir -p "$npm_dir"
    # shellcheck disable=SC2086
    if ! npm install --prefix "$npm_dir" --no-audit --no-fund --silent $packages >"$TMP/npm.log" 2>&1; then
        echo "  tokenizers.sh: SKIPPED: npm cannot install $packages:" >&2
        tail -n 3 "$TMP/npm.log" >&2
        exit 0
    fi
fi

template='<|begin_of_text|>[SUMMARIZE] {article} [/SUMMARIZE]\n{highlights}<|eot_id|>'
zstd -dcq datasets/debian-descriptions.jsonl.zst >"$TMP/ds.jsonl"
node tests/ref/hard-corpus.mjs >"$TMP/hard.jsonl"
key=$(cat tests/ref/tokenizers.mjs "$TMP/hard.jsonl" "$TMP/ds.jsonl" <(echo "$packages $template") |
    sha256sum | cut -c1-16)
ref=build/tokref/$key
if ! [ -s "$ref/o200k.ds.jsonl" ]; then
    rm -rf "$ref.tmp" && mkdir -p "$ref.tmp"
    if ! NODE_PATH_BASE="$npm_dir" node tests/ref/tokenizers.mjs "$ref.tmp" hard '{text}' \
        "$TMP/hard.jsonl" ds "$(printf '%b' "$template")" "$TMP/ds.jsonl" 2>"$TMP/node.err"; then
        fail "reference: $(tail -n 3 "$TMP/node.err")"
        finish
        exit 1
    fi
    rm -rf "$ref" && mv "$ref.tmp" "$ref"
fi

limit=null
[ "${MOAI_MODE:-release}" = asan ] && limit=3000

# compare NAME TOKENIZER TAG TEMPLATE RECORDS BOS EOS LIMIT
compare() {
    local name=$1 tok=$2 tag=$3 tmpl=$4 recs=$5 bos=$6 eos=$7 lim=$8
    cat >"$TMP/r.yaml" <<YAML
model:
  config: {hidden_size: 32, intermediate_size: 64, num_hidden_layers: 2, num_attention_heads: 4,
           num_key_value_heads: 2, vocab_size: 200064}
  init: random
tokenizer: $tok
dataset:
  path: $recs
  template: "$tmpl"
  limit: $lim
training:
  batch_size: 8
  block_size: 1024
flavor: {device: cpu, devices: 1}
YAML
    if ! "$MOAI_BIN" -q --tokenize "$TMP/r.yaml" >"$TMP/got.jsonl" 2>"$TMP/err"; then
        fail "$name $tag: --tokenize failed: $(cat "$TMP/err")"
        return
    fi
    jq -c '.input_ids' "$TMP/got.jsonl" >"$TMP/got"
    # the reference ids with the BOS and EOS the tool adds, cut to the block size
    head -n "$([ "$lim" = null ] && echo -0 || echo "$lim")" "$ref/$name.$tag.jsonl" |
        jq -c --argjson b "$bos" --argjson e "$eos" \
            '(if $b >= 0 then [$b] else [] end) + . + [$e] | .[:1024]' >"$TMP/want"
    local n differ
    n=$(wc -l <"$TMP/want")
    differ=$(diff "$TMP/want" "$TMP/got" | grep -c '^<')
    expect_eq "$name ($tok) on $tag: records that differ from the reference, of $n" 0 "$differ"
    [ "$n" -gt 20 ] && ok || fail "$name $tag: only $n records compared"
}

compare llama3 "$ref/llama3" hard '{text}' "$TMP/hard.jsonl" 128000 128001 null
compare llama3 "$ref/llama3-tiktoken/tokenizer.model" hard '{text}' "$TMP/hard.jsonl" 128000 128001 null
compare cl100k "$ref/cl100k" hard '{text}' "$TMP/hard.jsonl" -1 100257 null
compare o200k "$ref/o200k" hard '{text}' "$TMP/hard.jsonl" -1 199999 null
compare llama3 "$ref/llama3" ds "$template" datasets/debian-descriptions.jsonl.zst 128000 128001 "$limit"
compare llama3 "$ref/llama3-tiktoken/tokenizer.model" ds "$template" datasets/debian-descriptions.jsonl.zst 128000 128001 "$limit"
compare cl100k "$ref/cl100k" ds "$template" datasets/debian-descriptions.jsonl.zst -1 100257 "$limit"
compare o200k "$ref/o200k" ds "$template" datasets/debian-descriptions.jsonl.zst -1 199999 "$limit"

# Special tokens come from the template only: a record's "<|eot_id|>" is plain text.
printf '{"text": "a <|eot_id|> b"}\n' >"$TMP/sp.jsonl"
cat >"$TMP/sp.yaml" <<YAML
model: {config: {hidden_size: 32, intermediate_size: 64, num_hidden_layers: 2, num_attention_heads: 4, num_key_value_heads: 2, vocab_size: 128256}, init: random}
tokenizer: $ref/llama3
dataset: {path: $TMP/sp.jsonl, template: "{text}<|eot_id|>"}
training: {batch_size: 8, block_size: 64}
flavor: {device: cpu, devices: 1}
YAML
got=$("$MOAI_BIN" -q --tokenize "$TMP/sp.yaml" | jq -c '.input_ids')
expect_eq "a record's special-token text is not a special token" \
    "[128000,64,83739,68,354,851,91,29,293,128009,128001]" "$got"

# A chat record through the llama3 template (chosen from the tokenizer): the ids of the
# published template's rendering, encoded by the reference, and labels on the answers only.
printf '%s\n' '{"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi! <|eot_id|>"}, {"role": "assistant", "content": "Hello."}]}' >"$TMP/chat.jsonl"
cat >"$TMP/chat.yaml" <<YAML
model: {config: {hidden_size: 32, intermediate_size: 64, num_hidden_layers: 2, num_attention_heads: 4, num_key_value_heads: 2, vocab_size: 128256}, init: random}
tokenizer: $ref/llama3
dataset: {path: $TMP/chat.jsonl, format: messages}
training: {batch_size: 8, block_size: 64}
flavor: {device: cpu, devices: 1}
YAML
"$MOAI_BIN" -q --tokenize "$TMP/chat.yaml" >"$TMP/chat.out" 2>"$TMP/chat.err" || fail "chat: $(cat "$TMP/chat.err")"
want=$(cd "$npm_dir" && node --input-type=module -e '
const l = (await import("llama3-tokenizer-js")).default;
const sp = /<\|(?:begin_of_text|end_of_text|start_header_id|end_header_id|eot_id)\|>/g;
const t = "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|>" +
    "<|start_header_id|>user<|end_header_id|>\n\n";
const ids = l.encode(t, {bos: false, eos: false, specialTokenRegex: sp});
ids.push(...l.encode("Hi! <|eot_id|>", {bos: false, eos: false, specialTokenRegex: /(?!)/g}));
ids.push(...l.encode("<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\nHello.<|eot_id|>",
    {bos: false, eos: false, specialTokenRegex: sp}));
ids.push(128001);
console.log(JSON.stringify(ids));')
expect_eq "chat (llama3): ids of the published template, the record's <|eot_id|> as text" \
    "$want" "$(jq -c .input_ids "$TMP/chat.out")"
expect_eq "chat (llama3): learned tokens are the answer, its <|eot_id|> and the EOS" \
    "[9906,13,128009,128001]" "$(jq -c '[.labels[] | select(. != -100)]' "$TMP/chat.out")"

finish
