// tokenizers.mjs - reference token ids from npm tokenizers, and the tokenizer files they use.
//
// usage: node tests/ref/tokenizers.mjs OUTDIR TAG TEMPLATE RECORDS.jsonl [TAG TEMPLATE RECORDS ...]
//
// Writes, from the vocabularies the npm packages carry (never committed here):
//   OUTDIR/llama3/tokenizer.json         Llama 3 as Hugging Face ships it (Split + ByteLevel,
//                                        ignore_merges, 256 added tokens, BOS post-processor)
//   OUTDIR/llama3/tokenizer_config.json  bos <|begin_of_text|>, eos <|end_of_text|>
//   OUTDIR/llama3-tiktoken/tokenizer.model  the same ranks in tiktoken's text format
//   OUTDIR/cl100k/tokenizer.json, OUTDIR/o200k/tokenizer.json  OpenAI's encodings as
//                                        byte-level BPE (merges derived from the ranks)
// and for each TAG and each tokenizer OUTDIR/<tokenizer>.<TAG>.jsonl: one JSON array of ids a
// record, for the record's text filled into TEMPLATE ("{field}", "{{" and "}}" as in
// moai-recipe(5)), without BOS or EOS. Special tokens are matched only in the template's own
// text, never in a record's fields, as moai-finetune does.
//
// References: llama3-tokenizer-js (Llama 3), js-tiktoken (cl100k_base, o200k_base).
import fs from 'node:fs';
import path from 'node:path';
import { createRequire } from 'node:module';

const require = createRequire(path.resolve(process.env.NODE_PATH_BASE || '.', 'x.js'));
const llama3 = (await import(require.resolve('llama3-tokenizer-js'))).default;
const { Tiktoken } = require('js-tiktoken/lite');
const cl100k = require('js-tiktoken/ranks/cl100k_base');
const o200k = require('js-tiktoken/ranks/o200k_base');

const [outdir, ...sets] = process.argv.slice(2);
if (!outdir || sets.length % 3) {
    console.error('usage: tokenizers.mjs OUTDIR TAG TEMPLATE RECORDS.jsonl ...');
    process.exit(2);
}

// GPT-2's bytes_to_unicode
const BYTE_CHAR = (() => {
    const bs = [];
    for (let c = 33; c <= 126; c++) bs.push(c);
    for (let c = 161; c <= 172; c++) bs.push(c);
    for (let c = 174; c <= 255; c++) bs.push(c);
    const cs = bs.slice();
    let n = 0;
    for (let b = 0; b < 256; b++)
        if (!bs.includes(b)) {
            bs.push(b);
            cs.push(256 + n++);
        }
    const m = new Array(256);
    bs.forEach((b, i) => (m[b] = String.fromCharCode(cs[i])));
    return m;
})();
const byteLevel = (bytes) => Array.from(bytes, (b) => BYTE_CHAR[b]).join('');

const LLAMA3_PATTERN =
    "(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}{1,3}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+";
// cl100k_base's pattern as tiktoken writes it (js-tiktoken spells the case-insensitive group out)
const CL100K_PATTERN =
    "(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}{1,3}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+";

function tokenizerJson(vocab, merges, pattern, added, bos) {
    return {
        version: '1.0',
        truncation: null,
        padding: null,
        added_tokens: added.map(([content, id]) => ({
            id, content, single_word: false, lstrip: false, rstrip: false, normalized: false,
            special: true,
        })),
        normalizer: null,
        pre_tokenizer: {
            type: 'Sequence',
            pretokenizers: [
                { type: 'Split', pattern: { Regex: pattern }, behavior: 'Isolated', invert: false },
                { type: 'ByteLevel', add_prefix_space: false, trim_offsets: true, use_regex: false },
            ],
        },
        post_processor: bos
            ? {
                  type: 'TemplateProcessing',
                  single: [
                      { SpecialToken: { id: bos[0], type_id: 0 } },
                      { Sequence: { id: 'A', type_id: 0 } },
                  ],
                  pair: [],
                  special_tokens: { [bos[0]]: { id: bos[0], ids: [bos[1]], tokens: [bos[0]] } },
              }
            : { type: 'ByteLevel', add_prefix_space: true, trim_offsets: false, use_regex: true },
        decoder: { type: 'ByteLevel', add_prefix_space: true, trim_offsets: true, use_regex: true },
        model: {
            type: 'BPE', dropout: null, unk_token: null, continuing_subword_prefix: null,
            end_of_word_suffix: null, fuse_unk: false, byte_fallback: false, ignore_merges: true,
            vocab, merges,
        },
    };
}

// Merges of a rank table: each token of two or more bytes is the merge of the two parts that
// byte pair encoding with the lower ranks ends with (as tiktoken's own converters do).
function mergesOfRanks(textMap, rankOf) {
    const merges = [];
    const ranks = [...textMap.keys()].sort((a, b) => a - b);
    for (const r of ranks) {
        const bytes = textMap.get(r);
        if (bytes.length < 2) continue;
        let parts = Array.from(bytes, (b) => [b]);
        for (;;) {
            let best = -1, bestRank = Infinity;
            for (let i = 0; i + 1 < parts.length; i++) {
                const k = rankOf(parts[i].concat(parts[i + 1]));
                if (k !== undefined && k < r && k < bestRank) (bestRank = k), (best = i);
            }
            if (best < 0) break;
            parts.splice(best, 2, parts[best].concat(parts[best + 1]));
        }
        if (parts.length === 2) merges.push([byteLevel(parts[0]), byteLevel(parts[1])]);
    }
    return merges;
}

function writeJson(file, obj) {
    fs.mkdirSync(path.dirname(file), { recursive: true });
    fs.writeFileSync(file, JSON.stringify(obj));
}

// ---- Llama 3 ----
const l3vocab = {};
const l3base = llama3.vocabById.length - 256;
for (let id = 0; id < l3base; id++) l3vocab[llama3.vocabById[id]] = id;
const l3merges = [...llama3.merges.keys()].map((k) => k.split(' '));
const l3added = llama3.vocabById.slice(l3base).map((s, i) => [s, l3base + i]);
writeJson(path.join(outdir, 'llama3/tokenizer.json'),
          tokenizerJson(l3vocab, l3merges, LLAMA3_PATTERN, l3added, ['<|begin_of_text|>', l3base]));
writeJson(path.join(outdir, 'llama3/tokenizer_config.json'),
          { bos_token: '<|begin_of_text|>', eos_token: '<|end_of_text|>', tokenizer_class: 'PreTrainedTokenizerFast' });
{
    const charByte = new Map(BYTE_CHAR.map((c, b) => [c, b]));
    const lines = [];
    for (let id = 0; id < l3base; id++) {
        const bytes = Buffer.from(Array.from(llama3.vocabById[id], (c) => charByte.get(c)));
        lines.push(`${bytes.toString('base64')} ${id}\n`);
    }
    fs.mkdirSync(path.join(outdir, 'llama3-tiktoken'), { recursive: true });
    fs.writeFileSync(path.join(outdir, 'llama3-tiktoken/tokenizer.model'), lines.join(''));
}

// ---- OpenAI encodings ----
const openai = {};
for (const [name, ranks, pattern] of [['cl100k', cl100k, CL100K_PATTERN], ['o200k', o200k, o200k.pat_str]]) {
    const enc = new Tiktoken(ranks);
    const vocab = {};
    for (const [r, bytes] of enc.textMap) vocab[byteLevel(bytes)] = r;
    const merges = mergesOfRanks(enc.textMap, (bytes) => enc.rankMap.get(bytes.join(',')));
    const added = Object.entries(ranks.special_tokens);
    writeJson(path.join(outdir, `${name}/tokenizer.json`), tokenizerJson(vocab, merges, pattern, added, null));
    writeJson(path.join(outdir, `${name}/tokenizer_config.json`),
              { bos_token: null, eos_token: '<|endoftext|>', add_bos_token: false });
    openai[name] = { enc, special: ranks.special_tokens };
}

// ---- reference ids ----
// A template's parts: [text, isField].
function parseTemplate(t) {
    const parts = [];
    let lit = '';
    for (let i = 0; i < t.length; i++) {
        if (t[i] === '{' && t[i + 1] === '{') (lit += '{'), i++;
        else if (t[i] === '}' && t[i + 1] === '}') (lit += '}'), i++;
        else if (t[i] === '{') {
            const j = t.indexOf('}', i);
            if (lit) parts.push([lit, false]);
            lit = '';
            parts.push([t.slice(i + 1, j), true]);
            i = j;
        } else lit += t[i];
    }
    if (lit) parts.push([lit, false]);
    return parts;
}

// Splits a record's filled text into plain strings and special tokens (only in template text).
function segments(parts, rec, specials) {
    const out = [];
    let plain = '';
    for (const [s, field] of parts) {
        if (field) {
            plain += rec[s];
            continue;
        }
        let i = 0;
        while (i < s.length) {
            const sp = specials.filter((t) => s.startsWith(t, i)).sort((a, b) => b.length - a.length)[0];
            if (sp) {
                out.push([plain, false], [sp, true]);
                plain = '';
                i += sp.length;
            } else plain += s[i++];
        }
    }
    out.push([plain, false]);
    return out;
}

const never = /(?!)/g;
const encoders = {
    llama3: {
        specials: l3added.map(([s]) => s),
        plain: (s) => llama3.encode(s, { bos: false, eos: false, specialTokenRegex: never }),
        special: (s) => llama3.vocabByString.get(s),
    },
};
for (const name of ['cl100k', 'o200k'])
    encoders[name] = {
        specials: Object.keys(openai[name].special),
        plain: (s) => openai[name].enc.encode(s, [], []),
        special: (s) => openai[name].special[s],
    };

for (let k = 0; k < sets.length; k += 3) {
    const [tag, template, file] = sets.slice(k, k + 3);
    const parts = parseTemplate(template);
    const records = fs.readFileSync(file, 'utf8').split('\n').filter((l) => l.trim()).map((l) => JSON.parse(l));
    for (const [name, e] of Object.entries(encoders)) {
        const lines = records.map((rec) => {
            const ids = [];
            for (const [s, sp] of segments(parts, rec, e.specials))
                if (sp) ids.push(e.special(s));
                else if (s) ids.push(...e.plain(s));
            return JSON.stringify(ids);
        });
        fs.writeFileSync(path.join(outdir, `${name}.${tag}.jsonl`), lines.join('\n') + '\n');
    }
}
