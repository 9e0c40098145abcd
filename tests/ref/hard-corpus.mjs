// hard-corpus.mjs - writes JSON Lines records {"text": ...} of text that is hard to tokenize.
//
// usage: node tests/ref/hard-corpus.mjs > corpus.jsonl
//
// Every Unicode general category but Cs (surrogates cannot be in UTF-8): sampled code points,
// alone, between letters and between spaces. CJK, emoji with ZWJ sequences, skin tones and
// flags, combining marks, long digit and whitespace runs, contractions in upper case, source
// code, and text that looks like special tokens. Deterministic. Sampled code points stay below U+3400 (apart from the named scripts
// below) so that the Unicode versions of the regex engines compared agree, and leave out
// U+0000 (JSON Lines records hold no NUL) and U+0085 and U+FEFF, the two characters on which
// JavaScript's \s (the references here) differs from Unicode's White_Space, which the Rust and
// Oniguruma engines of tiktoken and tokenizers follow, and so does moai-finetune. U+180E, which
// PCRE2's own \s would count as a space, is in (moai-finetune reads \s as White_Space).
const categories = ['Lu', 'Ll', 'Lt', 'Lm', 'Lo', 'Mn', 'Mc', 'Me', 'Nd', 'Nl', 'No', 'Pc', 'Pd',
    'Ps', 'Pe', 'Pi', 'Pf', 'Po', 'Sm', 'Sc', 'Sk', 'So', 'Zs', 'Zl', 'Zp', 'Cc', 'Cf', 'Co', 'Cn'];
const excluded = new Set([0, 0x85, 0xfeff]);
const records = [];
const add = (text) => records.push({ text });

for (const gc of categories) {
    const re = new RegExp(`^\\p{gc=${gc}}$`, 'u');
    const cps = [];
    const limit = gc === 'Co' ? 0xf900 : 0x3400;
    const from = gc === 'Co' ? 0xe000 : 0;
    for (let cp = from; cp < limit; cp++)
        if (!excluded.has(cp) && !(cp >= 0x2ff0 && cp <= 0x2fff) && !(cp >= 0x31c0 && cp <= 0x31ef)
            && re.test(String.fromCodePoint(cp)))
            cps.push(cp);
    const step = Math.max(1, Math.floor(cps.length / 24));
    const pick = cps.filter((_, i) => i % step === 0).slice(0, 24).map((c) => String.fromCodePoint(c));
    if (!pick.length) continue;
    add(pick.join(''));
    add(pick.join(' '));
    add(pick.map((c) => `ab${c}cd ${c}12 '${c}`).join(' '));
}

add('漢字とひらがなとカタカナの混ざった文。中文的句子，还有标点符号！한국어 문장도 있습니다.');
add('日本語\u3000全角スペース\u3000と１２３４５６全角数字');
add('👨‍👩‍👧‍👦 family, 🏳️‍🌈 flag, 👍🏽 thumbs, 🇰🇷🇯🇵🇺🇸 flags, 🧑🏿‍🚀 astronaut, ❤️‍🔥 and 😀😃😄😁');
add('e\u0301 a\u0308 n\u0303 Z\u0351\u0352\u0357a\u0315\u0362l\u0300\u0301g\u0308o combining; ก่ำ ที่ Thai; हिन्दी देवनागरी');
add('1234567890'.repeat(12) + ' ' + '3.14159265358979323846264338327950288 and 1,000,000.00');
add('     spaces      \t\t\ttabs\t  \n\n\nnewlines\r\n\r\n   mixed \u00a0\u2003\u3000 end   ');
add('Mongolian \u180e vowel separator \u180e\u180e and \u1680 ogham \u2028 \u2029 x \u202f \u205f y');
add(' '.repeat(300) + 'x' + '\n'.repeat(50) + 'y' + '\t'.repeat(70));
add("DON'T I'LL WE'VE SHE'S THEY'RE I'M HE'D can't won't y'all O'NEILL 'TIS ROCK'N'ROLL");
add("don't DON'T Don'T dOn't it's IT'S It'S i'm I'M you're YOU'RE you'Re");
add('int main(int argc, char **argv) {\n    for (int i = 0; i < argc; i++)\n        printf("%s\\n", argv[i]);\n    return 0;\n}\n');
add('def f(x):\n    """Doc."""\n    return {k: v ** 2 for k, v in x.items() if v != None}  # comment\n');
add('<|begin_of_text|> <|end_of_text|> <|eot_id|><|start_header_id|>user<|end_header_id|> <|endoftext|> <|fim_prefix|>');
add('<s> </s> [INST] [/INST] <<SYS>> <|im_start|>system<|im_end|> <|reserved_special_token_250|> <|reserved_special_token_5|>');
add('<|begin_of_text <| |> <||> <|eot_id <|EOT_ID|> <| eot_id |>');
add('https://example.org/path?q=a%20b&x=1#frag user@example.com C:\\Windows\\System32 ~/.config/x.yaml');
add('a'.repeat(500) + ' ' + 'ab'.repeat(200) + ' ' + '!!!'.repeat(60) + ' ' + '...'.repeat(40));
add('Ünïcödé ÀÉÎÕÜ àéîõü ß ẞ ǅ ǈ ǋ ǲ ﬁ ﬂ Ωmega µ K Å ſ ı İ');
add('Mixed: café-au-lait naïve résumé coöperate — “quotes” ‘single’ «guillemets» „low“ …');
add('');
add('x');
add(' ');

for (const r of records) process.stdout.write(JSON.stringify(r) + '\n');
