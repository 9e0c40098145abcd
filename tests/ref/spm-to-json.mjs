// spm-to-json.mjs - a Llama 2 style tokenizer.json from a SentencePiece BPE model's vocabulary.
//
// usage: spm_export_vocab --model=m.model | node tests/ref/spm-to-json.mjs OUTDIR [metaspace]
//
// Writes OUTDIR/tokenizer.json and OUTDIR/tokenizer_config.json the way Hugging Face's
// converter writes Llama 2's: normalizer Prepend("▁") + Replace(" " -> "▁"), model BPE with
// byte_fallback and fuse_unk, merges of every piece that is two pieces (ordered by the merged
// piece's score, then by the parts' ids), <unk> <s> </s> added, <s> added by the
// post-processor. With "metaspace", the newer form (Mistral's): no normalizer, the Metaspace
// pre-tokenizer with prepend_scheme "first" and split false.
import fs from 'node:fs';
import path from 'node:path';

const outdir = process.argv[2];
const metaspace = process.argv[3] === 'metaspace';
const lines = fs.readFileSync(0, 'utf8').split('\n').filter((l) => l.length);
const vocab = {};
const score = [];
lines.forEach((l, id) => {
    const tab = l.lastIndexOf('\t');
    vocab[l.slice(0, tab)] = id;
    score.push(Number(l.slice(tab + 1)));
});
const merges = [];
for (const [piece, id] of Object.entries(vocab)) {
    const chars = Array.from(piece);
    const local = [];
    for (let i = 1; i < chars.length; i++) {
        const l = chars.slice(0, i).join(''), r = chars.slice(i).join('');
        if (l in vocab && r in vocab) local.push([l, r, id]);
    }
    local.sort((a, b) => vocab[a[0]] - vocab[b[0]] || vocab[a[1]] - vocab[b[1]]);
    merges.push(...local);
}
merges.sort((a, b) => score[b[2]] - score[a[2]] || a[2] - b[2]);
const special = (id, content) => ({ id, content, single_word: false, lstrip: false, rstrip: false,
    normalized: false, special: true });
const tj = {
    version: '1.0',
    added_tokens: [special(0, '<unk>'), special(1, '<s>'), special(2, '</s>')],
    normalizer: metaspace ? null : { type: 'Sequence', normalizers: [
        { type: 'Prepend', prepend: '\u2581' },
        { type: 'Replace', pattern: { String: ' ' }, content: '\u2581' }] },
    pre_tokenizer: metaspace
        ? { type: 'Metaspace', replacement: '\u2581', prepend_scheme: 'first', split: false }
        : null,
    post_processor: { type: 'TemplateProcessing',
        single: [{ SpecialToken: { id: '<s>', type_id: 0 } }, { Sequence: { id: 'A', type_id: 0 } }],
        pair: [], special_tokens: { '<s>': { id: '<s>', ids: [1], tokens: ['<s>'] } } },
    decoder: null,
    model: { type: 'BPE', dropout: null, unk_token: '<unk>', continuing_subword_prefix: null,
        end_of_word_suffix: null, fuse_unk: true, byte_fallback: true, ignore_merges: false,
        vocab, merges: merges.map(([l, r]) => [l, r]) },
};
fs.mkdirSync(outdir, { recursive: true });
fs.writeFileSync(path.join(outdir, 'tokenizer.json'), JSON.stringify(tj));
fs.writeFileSync(path.join(outdir, 'tokenizer_config.json'), JSON.stringify({
    add_bos_token: true, add_eos_token: false, bos_token: '<s>', eos_token: '</s>', unk_token: '<unk>',
    tokenizer_class: 'LlamaTokenizer' }));
