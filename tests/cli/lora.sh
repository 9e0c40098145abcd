#!/usr/bin/env bash
# LoRA from the command line: the Llama-2-13B recipe that is OUT_OF_MEMORY on one device in full
# fine-tuning plans with adapters and --plan-only shows them (text and JSON); the tiny model
# trains adapters, saves them in PEFT's format (read back by tests/peft_check.py), merges them,
# resumes to the same losses and continues them with lora.adapter.
. tests/cli/lib.inc

r13=configs/llama2-13b.yaml
"$MOAI_BIN" -q --plan-only --set flavor=small "$r13" >"$TMP/out" 2>"$TMP/err"
expect_eq "13B on small, full: status" 3 $?
expect_eq "13B on small, full: the report" "moai-finetune: error: Error Code 4: OUT_OF_MEMORY" \
    "$(head -n 1 "$TMP/err")"

"$MOAI_BIN" -q --plan-only --set flavor=small --set 'lora={rank: 16, alpha: 32}' "$r13" \
    >"$TMP/out" 2>"$TMP/err"
expect_eq "13B on small, lora: status" 0 $?
expect_eq "13B on small, lora: the adapters' line" \
    "lora        rank 16, alpha 32, dropout 0 on q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj: 62586880 adapter parameters (0.481%), the base frozen" \
    "$(grep '^lora ' "$TMP/out")"
expect_eq "13B on small, lora: one device" "layout      dp 1 x pp 1 x tp 1" \
    "$(grep '^layout ' "$TMP/out" | cut -c1-30)"

"$MOAI_BIN" -q --plan-only --json --set flavor=small --set 'lora={target_modules: [q_proj, v_proj]}' \
    "$r13" >"$TMP/out" 2>/dev/null
expect_eq "json: the lora object" "8 8.0 q_proj,v_proj 6553600 ok" \
    "$(python3 -c 'import json, sys
j = json.load(open(sys.argv[1]))
l = j["lora"]
print(l["rank"], l["alpha"], ",".join(l["target_modules"]), l["adapter_parameters"], j["status"])' "$TMP/out")"

# Training: the tiny model's adapters on 2 devices, saved in PEFT's format, read by an
# independent reader (Python's standard library), merged, resumed to the same losses, continued
# with lora.adapter.
lora="lora: {rank: 4, alpha: 8, dropout: 0.05, merge: true}"
dp_recipe "$TMP/a.yaml" "$TMP/out-a" "max_steps: 4"
echo "$lora" >>"$TMP/a.yaml"
"$MOAI_BIN" --validate "$TMP/a.yaml" >"$TMP/out" 2>/dev/null
expect_eq "validate" "$TMP/a.yaml: ok" "$(cat "$TMP/out")"
"$MOAI_BIN" -q "$TMP/a.yaml" >"$TMP/a.out" 2>"$TMP/a.err"
expect_eq "train: status" 0 $?
for f in adapter_config.json adapter_model.safetensors optimizer.safetensors trainer_state.json \
    plan.json config.json model.safetensors tokenizer.model; do
    [ -s "$TMP/out-a/$f" ] && ok || fail "train: $f missing"
done
python3 tests/peft_check.py "$TMP/out-a" "$TMP/out-a/config.json" >"$TMP/peft.out" 2>&1
expect_eq "PEFT reader: status" 0 $?
expect_eq "PEFT reader: config" "4 8.0 0.05 q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj" \
    "$(head -n 1 "$TMP/peft.out")"
expect_eq "PEFT reader: 2 layers x 7 targets x A, B" 28 "$(($(wc -l <"$TMP/peft.out") - 1))"
python3 - "$TMP/out-a" <<'PY' && ok || fail "adapter_config.json keys"
import json, sys
c = json.load(open(sys.argv[1] + "/adapter_config.json"))
assert c["peft_type"] == "LORA" and c["task_type"] == "CAUSAL_LM" and c["bias"] == "none", c
assert c["base_model_name_or_path"] is None, c  # an inline model.config: no directory
PY
python3 tests/st_check.py "$TMP/out-a/model.safetensors" >"$TMP/merged.out" 2>&1
expect_eq "merged model: readable" 0 $?

# the merged model over the shipped pretrained base (bf16, widened exactly): every tensor the
# base's but the targets, which differ by (alpha / r) B A (layer 0's q_proj and down_proj
# checked, in double)
cat >"$TMP/m.yaml" <<YAML
model: {path: models/tiny-llama}
dataset: {path: datasets/debian-descriptions.jsonl.zst, limit: 16, cache_dir: $TMP/cache}
training: {batch_size: 8, block_size: 32, max_steps: 1, lr: 1.0e-2, precision: fp32,
           save_dir: $TMP/out-m}
flavor: {device: cpu, devices: 1}
lora: {rank: 4, alpha: 8, target_modules: [q_proj, down_proj], merge: true}
YAML
"$MOAI_BIN" -q "$TMP/m.yaml" >/dev/null 2>"$TMP/m.err"
expect_eq "merge: status" 0 $?
python3 - models/tiny-llama/model.safetensors "$TMP/out-m" <<'PY' && ok || fail "merged = base + (alpha / r) B A"
import json, struct, sys
def read(path):
    blob = open(path, "rb").read()
    n = struct.unpack("<Q", blob[:8])[0]
    h = json.loads(blob[8:8 + n]); h.pop("__metadata__", None)
    out = {}
    for name, t in h.items():
        b, e = t["data_offsets"]; raw = blob[8 + n + b:8 + n + e]
        if t["dtype"] == "F32":
            v = struct.unpack("<%df" % (len(raw) // 4), raw)
        else:  # BF16: the high half of an fp32
            v = struct.unpack("<%df" % (len(raw) // 2), b"".join(b"\0\0" + raw[i:i + 2] for i in range(0, len(raw), 2)))
        out[name] = (t["shape"], v)
    return out
base, merged = read(sys.argv[1]), read(sys.argv[2] + "/model.safetensors")
ad = read(sys.argv[2] + "/adapter_model.safetensors")
targets = ("self_attn.q_proj", "mlp.down_proj")
for name, (shape, v) in base.items():
    if not any(t in name for t in targets):
        assert merged[name][1] == v, name
for t in targets:
    stem = "model.layers.0.%s" % t
    (out, inp), w0 = base[stem + ".weight"]
    w1 = merged[stem + ".weight"][1]
    A = ad["base_model.model.%s.lora_A.weight" % stem][1]
    B = ad["base_model.model.%s.lora_B.weight" % stem][1]
    worst = max(abs(b) for b in B)
    assert worst > 0, "B is still zero"
    for i in range(out):
        for j in range(inp):
            ba = sum(B[i * 4 + q] * A[q * inp + j] for q in range(4))
            d = w1[i * inp + j] - w0[i * inp + j]
            assert abs(d - 2.0 * ba) <= 1e-6 * (1 + abs(w0[i * inp + j])), (stem, i, j, d, 2.0 * ba)
PY

# resumed: 2 steps, then to 4 from the checkpoint: the whole run's losses of steps 3 and 4
dp_recipe "$TMP/b.yaml" "$TMP/out-b" "max_steps: 4"
echo "$lora" >>"$TMP/b.yaml"
"$MOAI_BIN" -q --set training.max_steps=2 "$TMP/b.yaml" >/dev/null 2>&1
expect_eq "resume: first part" 0 $?
"$MOAI_BIN" "$TMP/b.yaml" >"$TMP/b.out" 2>/dev/null
expect_eq "resume: status" 0 $?
"$MOAI_BIN" "$TMP/a.yaml" --set training.save_dir="$TMP/out-a2" >"$TMP/a2.out" 2>/dev/null
expect_eq "resumed losses equal the whole run's" \
    "$(grep -E '^\[Step [34]/4\]' "$TMP/a2.out" | sed 's/ | Duration.*//')" \
    "$(grep -E '^\[Step [34]/4\]' "$TMP/b.out" | sed 's/ | Duration.*//')"
expect_eq "resume: steps 3 and 4 only" "3 4" "$(sed -n 's/^\[Step \([0-9]*\)\/4\].*/\1/p' "$TMP/b.out" | xargs)"

# a full fine-tuning cannot resume a LoRA run's checkpoint: the fingerprints differ by lora
grep -v '^lora:' "$TMP/b.yaml" >"$TMP/full.yaml"
"$MOAI_BIN" -q "$TMP/full.yaml" >/dev/null 2>"$TMP/full.err"
expect_eq "full over lora: status" 2 $?
grep -q "^moai-finetune: error: cannot resume from '$TMP/out-b': its checkpoint is of another run: lora ({\"rank\":4,.* then, absent now)$" "$TMP/full.err" &&
    ok || fail "full over lora: message: $(head -n 1 "$TMP/full.err")"

# lora.adapter continues the saved adapter: its first loss is not the base model's
dp_recipe "$TMP/c.yaml" "$TMP/out-c" "max_steps: 1"
echo "lora: {rank: 4, alpha: 8, adapter: $TMP/out-a}" >>"$TMP/c.yaml"
"$MOAI_BIN" "$TMP/c.yaml" >"$TMP/c.out" 2>/dev/null
expect_eq "lora.adapter: status" 0 $?
dp_recipe "$TMP/d.yaml" "$TMP/out-d" "max_steps: 1"
echo "lora: {rank: 4, alpha: 8}" >>"$TMP/d.yaml"
"$MOAI_BIN" "$TMP/d.yaml" >"$TMP/d.out" 2>/dev/null
first() { sed -n 's/^\[Step 1\/1\] | Loss: \([0-9.]*\).*/\1/p' "$1"; }
[ -n "$(first "$TMP/c.out")" ] && [ "$(first "$TMP/c.out")" != "$(first "$TMP/d.out")" ] && ok ||
    fail "lora.adapter: first loss $(first "$TMP/c.out") vs a fresh adapter's $(first "$TMP/d.out")"
finish
