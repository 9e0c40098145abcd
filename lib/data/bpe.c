/* bpe.c - BPE tokenizers from tokenizer.json and tiktoken files (see bpe.h). */
#define PCRE2_CODE_UNIT_WIDTH 8
#include "data/bpe.h"

#include <errno.h>
#include <jansson.h>
#include <pcre2.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define BPE_MAX_ID     (1 << 24)
#define BPE_MAX_SPLITS 8
#define BPE_NO_RANK    UINT32_MAX
#define BPE_EMPTY_KEY  UINT64_MAX
#define META           "\xe2\x96\x81" /* U+2581, SentencePiece's space */
#define META_LEN       3

/* Llama 3's pre-tokenizer pattern (tiktoken files carry none). */
static const char llama3_pattern[] =
    "(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}{1,3}| "
    "?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+";

struct bpe_pair {
    uint64_t key; /* (left << 32) | right; BPE_EMPTY_KEY when the slot is free */
    uint32_t rank;
    int32_t merged;
};

struct bpe_added {
    int32_t id;
    uint32_t off, len; /* content in pool */
};

enum bpe_prepend { PREPEND_NEVER, PREPEND_FIRST, PREPEND_ALWAYS };

struct bpe {
    const char *kind;
    int32_t vocab_size; /* largest id + 1 */
    uint32_t *tok_off;  /* (vocab_size) token bytes in pool; UINT32_MAX: no such id */
    uint32_t *tok_len;  /* (vocab_size) */
    char *pool;
    size_t pool_len, pool_cap;
    int32_t *vslot; /* hash of model-vocabulary bytes -> id; -1 free; vmask + 1 slots */
    size_t vmask;
    struct bpe_pair *pairs; /* pmask + 1 slots */
    size_t pmask;
    int32_t byte_id[256]; /* the single-byte token of each byte (byte-level), -1 when none */
    int32_t byte_fb[256]; /* <0xXX> tokens (byte_fallback), -1 when none */
    bool byte_level, byte_fallback, ignore_merges, fuse_unk;
    int32_t unk_id;
    /* SentencePiece-style normalization */
    bool meta_replace; /* ' ' -> U+2581 */
    enum bpe_prepend prepend;
    bool meta_split; /* cut before each U+2581 */
    int nsplit;
    pcre2_code *split[BPE_MAX_SPLITS];
    int nadded;
    struct bpe_added *added; /* longest first */
    bool added_first[256];   /* some added token starts with this byte */
    int32_t bos_id, eos_id, pad_id;
};

/* ---- tables ---- */

static uint64_t hash_bytes(const char *s, size_t n)
{
    uint64_t h = 0xcbf29ce484222325ull;
    for (size_t i = 0; i < n; i++)
        h = (h ^ (unsigned char) s[i]) * 0x100000001b3ull;
    return h ^ (h >> 29);
}

static uint64_t hash_pair(uint64_t k)
{
    k ^= k >> 33;
    k *= 0xff51afd7ed558ccdull;
    k ^= k >> 33;
    return k;
}

static int pool_add(struct bpe *b, const char *s, size_t n, uint32_t *off)
{
    if (b->pool_len + n + 1 > UINT32_MAX)
        return -1;
    if (b->pool_len + n + 1 > b->pool_cap) {
        size_t cap = b->pool_cap ? b->pool_cap * 2 : 1 << 16;
        while (cap < b->pool_len + n + 1)
            cap *= 2;
        char *p = realloc(b->pool, cap);
        if (!p)
            return -1;
        b->pool = p;
        b->pool_cap = cap;
    }
    memcpy(b->pool + b->pool_len, s, n);
    b->pool[b->pool_len + n] = 0;
    *off = (uint32_t) b->pool_len;
    b->pool_len += n + 1;
    return 0;
}

static int32_t vocab_find(const struct bpe *b, const char *s, size_t n)
{
    if (!b->vslot)
        return -1;
    for (size_t i = hash_bytes(s, n) & b->vmask;; i = (i + 1) & b->vmask) {
        int32_t id = b->vslot[i];
        if (id < 0)
            return -1;
        if (b->tok_len[id] == n && !memcmp(b->pool + b->tok_off[id], s, n))
            return id;
    }
}

static int tables_alloc(struct bpe *b, int32_t vocab_size, size_t npairs)
{
    b->vocab_size = vocab_size;
    b->tok_off = malloc(sizeof(uint32_t) * (size_t) vocab_size);
    b->tok_len = calloc((size_t) vocab_size, sizeof(uint32_t));
    size_t vs = 16, ps = 16;
    while (vs < 2 * (size_t) vocab_size)
        vs *= 2;
    while (ps < 2 * npairs)
        ps *= 2;
    b->vslot = malloc(sizeof(int32_t) * vs);
    b->pairs = malloc(sizeof(struct bpe_pair) * ps);
    if (!b->tok_off || !b->tok_len || !b->vslot || !b->pairs)
        return -1;
    b->vmask = vs - 1;
    b->pmask = ps - 1;
    memset(b->tok_off, 0xff, sizeof(uint32_t) * (size_t) vocab_size);
    memset(b->vslot, 0xff, sizeof(int32_t) * vs);
    for (size_t i = 0; i < ps; i++)
        b->pairs[i].key = BPE_EMPTY_KEY;
    return 0;
}

/* Adds token id with bytes s to the vocabulary. Returns 0, 1 when the id or the bytes are
 * already there, -1 when out of memory. */
static int vocab_add(struct bpe *b, int32_t id, const char *s, size_t n)
{
    if (b->tok_off[id] != UINT32_MAX || vocab_find(b, s, n) >= 0)
        return 1;
    if (pool_add(b, s, n, &b->tok_off[id]) < 0)
        return -1;
    b->tok_len[id] = (uint32_t) n;
    size_t i = hash_bytes(s, n) & b->vmask;
    while (b->vslot[i] >= 0)
        i = (i + 1) & b->vmask;
    b->vslot[i] = id;
    return 0;
}

static struct bpe_pair *pair_slot(const struct bpe *b, int32_t l, int32_t r)
{
    uint64_t key = ((uint64_t) (uint32_t) l << 32) | (uint32_t) r;
    for (size_t i = hash_pair(key) & b->pmask;; i = (i + 1) & b->pmask)
        if (b->pairs[i].key == key || b->pairs[i].key == BPE_EMPTY_KEY)
            return &b->pairs[i];
}

/* Adds a merge; an existing pair keeps its lower rank. */
static void pair_add(struct bpe *b, int32_t l, int32_t r, uint32_t rank, int32_t merged)
{
    struct bpe_pair *p = pair_slot(b, l, r);
    if (p->key != BPE_EMPTY_KEY && p->rank <= rank)
        return;
    p->key = ((uint64_t) (uint32_t) l << 32) | (uint32_t) r;
    p->rank = rank;
    p->merged = merged;
}

static void bytes_index(struct bpe *b)
{
    for (int c = 0; c < 256; c++) {
        char s[8];
        s[0] = (char) c;
        b->byte_id[c] = vocab_find(b, s, 1);
        snprintf(s, sizeof(s), "<0x%02X>", c);
        b->byte_fb[c] = vocab_find(b, s, 6);
    }
}

/* ---- the byte-level alphabet (GPT-2's bytes_to_unicode) ---- */

static bool byte_printable(int c)
{
    return (c >= 33 && c <= 126) || (c >= 161 && c <= 172) || (c >= 174 && c <= 255);
}

/* Maps a code point of the byte-level alphabet back to its byte; -1 when cp is not one. */
static int byte_of_cp(uint32_t cp)
{
    static int table[324];
    static int ready;
    if (!__atomic_load_n(&ready, __ATOMIC_ACQUIRE)) {
        int t[324], n = 0;
        for (int i = 0; i < 324; i++)
            t[i] = -1;
        for (int c = 0; c < 256; c++)
            if (byte_printable(c))
                t[c] = c;
            else
                t[256 + n++] = c;
        memcpy(table, t, sizeof(t));
        __atomic_store_n(&ready, 1, __ATOMIC_RELEASE);
    }
    return cp < 324 ? table[cp] : -1;
}

/* Decodes one UTF-8 sequence at s (n bytes left); returns its length (0 when invalid). */
static size_t utf8_decode(const unsigned char *s, size_t n, uint32_t *cp)
{
    if (s[0] < 0x80) {
        *cp = s[0];
        return 1;
    }
    size_t len = s[0] >= 0xf0 ? 4 : s[0] >= 0xe0 ? 3 : s[0] >= 0xc0 ? 2 : 0;
    if (!len || len > n || s[0] > 0xf4)
        return 0;
    uint32_t c = s[0] & (0x7f >> len);
    for (size_t i = 1; i < len; i++) {
        if ((s[i] & 0xc0) != 0x80)
            return 0;
        c = (c << 6) | (s[i] & 0x3f);
    }
    static const uint32_t min[5] = {0, 0, 0x80, 0x800, 0x10000};
    if (c < min[len] || c > 0x10ffff || (c >= 0xd800 && c <= 0xdfff))
        return 0;
    *cp = c;
    return len;
}

/* The bytes a byte-level token string stands for, into out (at least strlen(s) bytes).
 * Returns the length, or -1 when s has a character outside the alphabet. */
static long byte_level_decode(const char *s, size_t n, char *out)
{
    size_t k = 0;
    for (size_t i = 0; i < n;) {
        uint32_t cp;
        size_t l = utf8_decode((const unsigned char *) s + i, n - i, &cp);
        int c = l ? byte_of_cp(cp) : -1;
        if (c < 0)
            return -1;
        out[k++] = (char) c;
        i += l;
    }
    return (long) k;
}

/* ---- regexes ---- */

/* The pattern with \s and \S spelled \p{White_Space} and \P{White_Space}: the Oniguruma and
 * Rust engines of tokenizers and tiktoken take \s as Unicode's White_Space, PCRE2's UCP \s
 * also matches U+180E. Text inside \Q...\E is copied as it is. A new string, or NULL. */
static char *pattern_translate(const char *p, size_t n, size_t *out_len)
{
    static const char ws[] = "\\p{White_Space}";
    char *out = malloc(n * (sizeof(ws) - 1) / 2 + n + 1), *o = out;
    bool quoted = false;
    if (!out)
        return NULL;
    for (size_t i = 0; i < n; i++) {
        if (p[i] != '\\' || i + 1 == n) {
            *o++ = p[i];
            continue;
        }
        char c = p[i + 1];
        if (quoted && c != 'E') {
            *o++ = p[i];
            continue;
        }
        if (c == 'Q' || c == 'E')
            quoted = c == 'Q';
        if (!quoted && (c == 's' || c == 'S')) {
            memcpy(o, ws, sizeof(ws) - 1);
            o[1] = c == 's' ? 'p' : 'P';
            o += sizeof(ws) - 1;
        } else {
            *o++ = p[i];
            *o++ = c;
        }
        i++;
    }
    *o = 0;
    *out_len = (size_t) (o - out);
    return out;
}

static int regex_add(struct bpe *b, const char *name, const char *where, const char *pattern,
                     size_t len, struct moai_err *err)
{
    if (b->nsplit == BPE_MAX_SPLITS)
        return moai_err_set(err, MOAI_EUSAGE, "%s: %s: more than %d Split pre-tokenizers", name,
                            where, BPE_MAX_SPLITS);
    int ecode;
    PCRE2_SIZE eoff;
    size_t tlen;
    char *translated = pattern_translate(pattern, len, &tlen);
    if (!translated)
        return moai_err_set(err, MOAI_ENOMEM, "%s: out of memory", name);
    pcre2_code *re =
        pcre2_compile((PCRE2_SPTR) translated, tlen, PCRE2_UTF | PCRE2_UCP, &ecode, &eoff, NULL);
    free(translated);
    if (!re) {
        PCRE2_UCHAR msg[256];
        pcre2_get_error_message(ecode, msg, sizeof(msg));
        return moai_err_set(err, MOAI_EUSAGE, "%s: %s: regex error at offset %zu: %s", name, where,
                            (size_t) eoff, (const char *) msg);
    }
    (void) pcre2_jit_compile(re, PCRE2_JIT_COMPLETE); /* the interpreter when JIT is absent */
    b->split[b->nsplit++] = re;
    return 0;
}

/* ---- loading tokenizer.json ---- */

static struct bpe *bpe_new(void)
{
    struct bpe *b = calloc(1, sizeof(*b));
    if (!b)
        return NULL;
    b->unk_id = b->bos_id = b->eos_id = b->pad_id = -1;
    for (int c = 0; c < 256; c++)
        b->byte_id[c] = b->byte_fb[c] = -1;
    return b;
}

void bpe_free(struct bpe *b)
{
    if (!b)
        return;
    for (int i = 0; i < b->nsplit; i++)
        pcre2_code_free(b->split[i]);
    free(b->tok_off);
    free(b->tok_len);
    free(b->pool);
    free(b->vslot);
    free(b->pairs);
    free(b->added);
    free(b);
}

static const char *type_of(json_t *obj)
{
    json_t *t = json_object_get(obj, "type");
    return json_is_string(t) ? json_string_value(t) : NULL;
}

static bool json_false_or_absent(json_t *obj, const char *key)
{
    json_t *v = json_object_get(obj, key);
    return !v || json_is_false(v) || json_is_null(v);
}

static bool json_null_or_empty(json_t *obj, const char *key)
{
    json_t *v = json_object_get(obj, key);
    return !v || json_is_null(v) || (json_is_string(v) && !json_string_length(v));
}

static int unsupported(const char *name, const char *where, json_t *obj, struct moai_err *err)
{
    const char *t = type_of(obj);
    return moai_err_set(err, MOAI_EUSAGE, "%s: %s '%s' is not supported", name, where,
                        t                     ? t
                        : json_is_object(obj) ? "(no type)"
                                              : "(not an object)");
}

static bool is_meta_string(json_t *v)
{
    return json_is_string(v) && !strcmp(json_string_value(v), META);
}

static int load_normalizer(struct bpe *b, const char *name, json_t *n, struct moai_err *err)
{
    if (!n || json_is_null(n))
        return 0;
    const char *t = type_of(n);
    if (t && !strcmp(t, "Sequence")) {
        json_t *list = json_object_get(n, "normalizers"), *it;
        size_t i;
        if (!json_is_array(list))
            return moai_err_set(err, MOAI_EUSAGE,
                                "%s: normalizer Sequence has no array "
                                "'normalizers'",
                                name);
        json_array_foreach(list, i, it) if (load_normalizer(b, name, it, err) < 0) return -1;
        return 0;
    }
    if (t && !strcmp(t, "Prepend") && is_meta_string(json_object_get(n, "prepend"))) {
        b->prepend = PREPEND_ALWAYS;
        return 0;
    }
    if (t && !strcmp(t, "Replace")) {
        json_t *pat = json_object_get(n, "pattern");
        json_t *s = json_object_get(pat, "String");
        if (json_is_string(s) && !strcmp(json_string_value(s), " ") &&
            is_meta_string(json_object_get(n, "content"))) {
            b->meta_replace = true;
            return 0;
        }
        return moai_err_set(err, MOAI_EUSAGE,
                            "%s: normalizer Replace other than ' ' -> '%s' is "
                            "not supported",
                            name, META);
    }
    return unsupported(name, "normalizer", n, err);
}

static int load_pre_tokenizer(struct bpe *b, const char *name, json_t *p, struct moai_err *err);

static int pre_sequence(struct bpe *b, const char *name, json_t *p, struct moai_err *err)
{
    json_t *list = json_object_get(p, "pretokenizers"), *it;
    size_t i;
    if (!json_is_array(list))
        return moai_err_set(err, MOAI_EUSAGE,
                            "%s: pre_tokenizer Sequence has no array "
                            "'pretokenizers'",
                            name);
    json_array_foreach(list, i, it) if (load_pre_tokenizer(b, name, it, err) < 0) return -1;
    return 0;
}

static int pre_split(struct bpe *b, const char *name, json_t *p, struct moai_err *err)
{
    json_t *re = json_object_get(json_object_get(p, "pattern"), "Regex");
    json_t *beh = json_object_get(p, "behavior");
    if (!json_is_string(re))
        return moai_err_set(err, MOAI_EUSAGE,
                            "%s: pre_tokenizer Split: only a "
                            "{\"Regex\": ...} pattern is supported",
                            name);
    if (!json_is_string(beh) || strcmp(json_string_value(beh), "Isolated"))
        return moai_err_set(err, MOAI_EUSAGE,
                            "%s: pre_tokenizer Split behavior '%s' is not "
                            "supported (only 'Isolated')",
                            name, json_is_string(beh) ? json_string_value(beh) : "?");
    if (!json_false_or_absent(p, "invert"))
        return moai_err_set(err, MOAI_EUSAGE,
                            "%s: pre_tokenizer Split with invert is not "
                            "supported",
                            name);
    return regex_add(b, name, "pre_tokenizer Split", json_string_value(re), json_string_length(re),
                     err);
}

static int pre_byte_level(struct bpe *b, const char *name, json_t *p, struct moai_err *err)
{
    if (!json_false_or_absent(p, "add_prefix_space"))
        return moai_err_set(err, MOAI_EUSAGE,
                            "%s: pre_tokenizer ByteLevel with "
                            "add_prefix_space is not supported",
                            name);
    b->byte_level = true;
    json_t *ur = json_object_get(p, "use_regex");
    if (!ur || json_is_true(ur)) { /* GPT-2's own pattern */
        static const char gpt2[] = "'s|'t|'re|'ve|'m|'ll|'d| ?\\p{L}+| ?\\p{N}+| "
                                   "?[^\\s\\p{L}\\p{N}]+|\\s+(?!\\S)|\\s+";
        return regex_add(b, name, "pre_tokenizer ByteLevel", gpt2, sizeof(gpt2) - 1, err);
    }
    return 0;
}

/* Numbers apart, each digit alone when individual_digits. */
static int pre_digits(struct bpe *b, const char *name, json_t *p, struct moai_err *err)
{
    static const char one[] = "\\p{N}", run[] = "\\p{N}+";
    bool individual = json_is_true(json_object_get(p, "individual_digits"));
    return regex_add(b, name, "pre_tokenizer Digits", individual ? one : run,
                     individual ? sizeof(one) - 1 : sizeof(run) - 1, err);
}

static int pre_metaspace(struct bpe *b, const char *name, json_t *p, struct moai_err *err)
{
    if (!is_meta_string(json_object_get(p, "replacement")))
        return moai_err_set(err, MOAI_EUSAGE,
                            "%s: pre_tokenizer Metaspace with a replacement "
                            "other than '%s' is not supported",
                            name, META);
    json_t *ps = json_object_get(p, "prepend_scheme");
    json_t *aps = json_object_get(p, "add_prefix_space");
    const char *scheme = json_is_string(ps) ? json_string_value(ps) : NULL;
    if (scheme && !strcmp(scheme, "first"))
        b->prepend = PREPEND_FIRST;
    else if (scheme && !strcmp(scheme, "never"))
        b->prepend = PREPEND_NEVER;
    else if (scheme && !strcmp(scheme, "always"))
        b->prepend = PREPEND_ALWAYS;
    else if (scheme)
        return moai_err_set(err, MOAI_EUSAGE,
                            "%s: pre_tokenizer Metaspace prepend_scheme "
                            "'%s' is not supported",
                            name, scheme);
    else
        b->prepend = !aps || json_is_true(aps) ? PREPEND_ALWAYS : PREPEND_NEVER;
    b->meta_replace = true;
    b->meta_split = !json_is_false(json_object_get(p, "split"));
    return 0;
}

/* The pre-tokenizers understood, by type. */
static const struct {
    const char *type;
    int (*load)(struct bpe *b, const char *name, json_t *p, struct moai_err *err);
} pre_tokenizers[] = {
    {"Sequence", pre_sequence}, {"Split", pre_split},         {"ByteLevel", pre_byte_level},
    {"Digits", pre_digits},     {"Metaspace", pre_metaspace},
};

static int load_pre_tokenizer(struct bpe *b, const char *name, json_t *p, struct moai_err *err)
{
    if (!p || json_is_null(p))
        return 0;
    const char *t = type_of(p);
    for (size_t i = 0; t && i < sizeof(pre_tokenizers) / sizeof(pre_tokenizers[0]); i++)
        if (!strcmp(t, pre_tokenizers[i].type))
            return pre_tokenizers[i].load(b, name, p, err);
    return unsupported(name, "pre_tokenizer", p, err);
}

/* The id of an added token's content, or of a vocabulary token; -1 when none. */
static int32_t find_token(const struct bpe *b, const char *s, size_t n)
{
    for (int i = 0; i < b->nadded; i++)
        if (b->added[i].len == n && !memcmp(b->pool + b->added[i].off, s, n))
            return b->added[i].id;
    if (b->byte_level) {
        char *raw = malloc(n + 1);
        long k = raw ? byte_level_decode(s, n, raw) : -1;
        int32_t id = k >= 0 ? vocab_find(b, raw, (size_t) k) : -1;
        free(raw);
        if (id >= 0)
            return id;
    }
    return vocab_find(b, s, n);
}

static int load_post_processor(struct bpe *b, const char *name, json_t *p, struct moai_err *err)
{
    if (!p || json_is_null(p))
        return 0;
    const char *t = type_of(p);
    if (t && !strcmp(t, "Sequence")) {
        json_t *list = json_object_get(p, "processors"), *it;
        size_t i;
        if (!json_is_array(list))
            return moai_err_set(err, MOAI_EUSAGE,
                                "%s: post_processor Sequence has no array "
                                "'processors'",
                                name);
        json_array_foreach(list, i, it) if (load_post_processor(b, name, it, err) < 0) return -1;
        return 0;
    }
    if (t && !strcmp(t, "ByteLevel"))
        return 0; /* offsets only */
    if (t && !strcmp(t, "TemplateProcessing")) {
        json_t *single = json_object_get(p, "single"), *it;
        size_t i;
        bool after = false;
        if (!json_is_array(single))
            return moai_err_set(err, MOAI_EUSAGE,
                                "%s: post_processor TemplateProcessing has no "
                                "array 'single'",
                                name);
        json_array_foreach(single, i, it)
        {
            json_t *st = json_object_get(json_object_get(it, "SpecialToken"), "id");
            if (json_object_get(it, "Sequence")) {
                after = true;
                continue;
            }
            if (!json_is_string(st))
                return moai_err_set(err, MOAI_EUSAGE,
                                    "%s: post_processor TemplateProcessing: "
                                    "item %zu is neither SpecialToken nor Sequence",
                                    name, i);
            int32_t id = find_token(b, json_string_value(st), json_string_length(st));
            if (id < 0)
                return moai_err_set(err, MOAI_EUSAGE,
                                    "%s: post_processor names the token '%s', "
                                    "which is not in the vocabulary",
                                    name, json_string_value(st));
            if (after)
                b->eos_id = id;
            else
                b->bos_id = id;
        }
        return 0;
    }
    return unsupported(name, "post_processor", p, err);
}

static int load_added(struct bpe *b, const char *name, json_t *list, struct moai_err *err)
{
    json_t *it;
    size_t i;
    if (!list || json_is_null(list))
        return 0;
    if (!json_is_array(list))
        return moai_err_set(err, MOAI_EUSAGE, "%s: 'added_tokens' is not an array", name);
    b->added = calloc(json_array_size(list) + 1, sizeof(*b->added));
    if (!b->added)
        return moai_err_set(err, MOAI_ENOMEM, "%s: out of memory", name);
    json_array_foreach(list, i, it)
    {
        json_t *id = json_object_get(it, "id"), *content = json_object_get(it, "content");
        if (!json_is_integer(id) || !json_is_string(content) || !json_string_length(content) ||
            json_integer_value(id) < 0 || json_integer_value(id) >= BPE_MAX_ID)
            return moai_err_set(err, MOAI_EUSAGE,
                                "%s: added_tokens[%zu]: expected an integer "
                                "'id' in [0, %d) and a non-empty string 'content'",
                                name, i, BPE_MAX_ID);
        static const char *const flags[] = {"single_word", "lstrip", "rstrip"};
        for (int f = 0; f < 3; f++)
            if (!json_false_or_absent(it, flags[f]))
                return moai_err_set(err, MOAI_EUSAGE,
                                    "%s: added_tokens[%zu] '%s': %s is not "
                                    "supported",
                                    name, i, json_string_value(content), flags[f]);
        struct bpe_added *a = &b->added[b->nadded++];
        a->id = (int32_t) json_integer_value(id);
        a->len = (uint32_t) json_string_length(content);
        if (pool_add(b, json_string_value(content), a->len, &a->off) < 0)
            return moai_err_set(err, MOAI_ENOMEM, "%s: out of memory", name);
        b->added_first[(unsigned char) json_string_value(content)[0]] = true;
    }
    return 0;
}

static int cmp_added(const void *x, const void *y)
{
    const struct bpe_added *a = x, *c = y;
    return a->len != c->len ? (a->len < c->len ? 1 : -1) : (a->id > c->id) - (a->id < c->id);
}

/* Splits a merge entry into its two parts: "a b" or ["a", "b"]. */
static int merge_parts(json_t *m, const char **l, size_t *ln, const char **r, size_t *rn)
{
    if (json_is_string(m)) {
        const char *s = json_string_value(m), *sp = strchr(s, ' ');
        if (!sp || strchr(sp + 1, ' '))
            return -1;
        *l = s, *ln = (size_t) (sp - s), *r = sp + 1, *rn = strlen(sp + 1);
        return *ln && *rn ? 0 : -1;
    }
    if (json_is_array(m) && json_array_size(m) == 2 && json_is_string(json_array_get(m, 0)) &&
        json_is_string(json_array_get(m, 1))) {
        *l = json_string_value(json_array_get(m, 0)),
        *ln = json_string_length(json_array_get(m, 0));
        *r = json_string_value(json_array_get(m, 1)),
        *rn = json_string_length(json_array_get(m, 1));
        return 0;
    }
    return -1;
}

/* Looks up a model token written in the file's alphabet (byte-level or raw). */
static int32_t model_token(const struct bpe *b, const char *s, size_t n, char *scratch)
{
    if (!b->byte_level)
        return vocab_find(b, s, n);
    long k = byte_level_decode(s, n, scratch);
    return k < 0 ? -1 : vocab_find(b, scratch, (size_t) k);
}

/* The model must be plain BPE: no dropout, no subword prefix or suffix. */
static int check_model_kind(const char *name, json_t *model, struct moai_err *err)
{
    const char *t = type_of(model);
    if (!json_is_object(model))
        return moai_err_set(err, MOAI_EUSAGE, "%s: 'model' is missing or not an object", name);
    if (!t || strcmp(t, "BPE"))
        return moai_err_set(err, MOAI_EUSAGE, "%s: model type '%s' is not supported (only BPE)",
                            name, t ? t : "(none)");
    static const char *const nulls[] = {"dropout", "continuing_subword_prefix",
                                        "end_of_word_suffix"};
    for (int i = 0; i < 3; i++)
        if (!json_null_or_empty(model, nulls[i]))
            return moai_err_set(err, MOAI_EUSAGE, "%s: model BPE with %s is not supported", name,
                                nulls[i]);
    return 0;
}

/* The largest id, over the vocabulary and the added tokens, into *top; fails on an id out of
 * [0, BPE_MAX_ID) and on an empty vocabulary. */
static int vocab_top_id(const struct bpe *b, const char *name, json_t *vocab, int32_t *top,
                        struct moai_err *err)
{
    const char *key;
    json_t *v;

    *top = -1;
    json_object_foreach(vocab, key, v)
    {
        if (!json_is_integer(v) || json_integer_value(v) < 0 || json_integer_value(v) >= BPE_MAX_ID)
            return moai_err_set(err, MOAI_EUSAGE, "%s: vocab['%s']: expected an id in [0, %d)",
                                name, key, BPE_MAX_ID);
        if (json_integer_value(v) > *top)
            *top = (int32_t) json_integer_value(v);
    }
    for (int i = 0; i < b->nadded; i++)
        if (b->added[i].id > *top)
            *top = b->added[i].id;
    if (*top < 0)
        return moai_err_set(err, MOAI_EUSAGE, "%s: the vocabulary is empty", name);
    return 0;
}

/* A scratch buffer of at least need bytes in *buf (grown, its old contents dropped). */
static int grow_scratch(char **buf, size_t *cap, size_t need, size_t grow_to)
{
    if (need <= *cap)
        return 0;
    free(*buf);
    *cap = grow_to;
    return (*buf = malloc(*cap)) ? 0 : -1;
}

/* Adds every vocab entry (decoded from the byte-level alphabet when the model uses it). */
static int load_vocab(struct bpe *b, const char *name, json_t *vocab, char **scratch, size_t *scap,
                      struct moai_err *err)
{
    const char *key;
    json_t *v;

    json_object_foreach(vocab, key, v)
    {
        size_t n = strlen(key);
        const char *bytes = key;
        if (b->byte_level) {
            if (grow_scratch(scratch, scap, n + 1, 2 * n + 64) < 0)
                return moai_err_set(err, MOAI_ENOMEM, "%s: out of memory", name);
            long k = byte_level_decode(key, n, *scratch);
            if (k < 0)
                return moai_err_set(err, MOAI_EUSAGE,
                                    "%s: vocab token '%s' is not in the "
                                    "byte-level alphabet",
                                    name, key);
            bytes = *scratch, n = (size_t) k;
        }
        int a = vocab_add(b, (int32_t) json_integer_value(v), bytes, n);
        if (a < 0)
            return moai_err_set(err, MOAI_ENOMEM, "%s: out of memory", name);
        if (a > 0)
            return moai_err_set(err, MOAI_EUSAGE,
                                "%s: vocab token '%s': its id %lld or its bytes "
                                "are given twice",
                                name, key, (long long) json_integer_value(v));
    }
    return 0;
}

/* The unk_token, when the model names one, must be in the vocabulary. */
static int load_unk(struct bpe *b, const char *name, json_t *model, struct moai_err *err)
{
    json_t *unk = json_object_get(model, "unk_token");
    if (!json_is_string(unk))
        return 0;
    if ((b->unk_id = vocab_find(b, json_string_value(unk), json_string_length(unk))) < 0)
        return moai_err_set(err, MOAI_EUSAGE, "%s: unk_token '%s' is not in the vocabulary", name,
                            json_string_value(unk));
    return 0;
}

/* merges[i] "l r": both parts and their concatenation must be tokens of the vocabulary. */
static int load_merge(struct bpe *b, const char *name, size_t i, json_t *m, char **scratch,
                      size_t *scap, struct moai_err *err)
{
    const char *l, *r;
    size_t ln, rn;

    if (merge_parts(m, &l, &ln, &r, &rn) < 0)
        return moai_err_set(err, MOAI_EUSAGE,
                            "%s: merges[%zu]: expected \"a b\" or [\"a\", "
                            "\"b\"]",
                            name, i);
    if (grow_scratch(scratch, scap, ln + rn + 1, 2 * (ln + rn) + 64) < 0)
        return moai_err_set(err, MOAI_ENOMEM, "%s: out of memory", name);
    int32_t li = model_token(b, l, ln, *scratch), ri = model_token(b, r, rn, *scratch);
    char *cat = malloc(ln + rn + 1);
    if (!cat)
        return moai_err_set(err, MOAI_ENOMEM, "%s: out of memory", name);
    memcpy(cat, l, ln);
    memcpy(cat + ln, r, rn);
    int32_t mi = model_token(b, cat, ln + rn, *scratch);
    free(cat);
    if (li < 0 || ri < 0)
        return moai_err_set(err, MOAI_EUSAGE,
                            "%s: merges[%zu] '%.*s %.*s': '%.*s' is not "
                            "in the vocabulary",
                            name, i, (int) ln, l, (int) rn, r, li < 0 ? (int) ln : (int) rn,
                            li < 0 ? l : r);
    if (mi < 0)
        return moai_err_set(err, MOAI_EUSAGE,
                            "%s: merges[%zu] '%.*s %.*s': the merged "
                            "token '%.*s%.*s' is not in the vocabulary",
                            name, i, (int) ln, l, (int) rn, r, (int) ln, l, (int) rn, r);
    pair_add(b, li, ri, (uint32_t) i, mi);
    return 0;
}

static int load_model(struct bpe *b, const char *name, json_t *model, struct moai_err *err)
{
    int rc;
    if ((rc = check_model_kind(name, model, err)) < 0)
        return rc;
    json_t *vocab = json_object_get(model, "vocab"), *merges = json_object_get(model, "merges");
    if (!json_is_object(vocab))
        return moai_err_set(err, MOAI_EUSAGE, "%s: model 'vocab' is missing or not an object",
                            name);
    if (!json_is_array(merges))
        return moai_err_set(err, MOAI_EUSAGE, "%s: model 'merges' is missing or not an array",
                            name);
    b->byte_fallback = json_is_true(json_object_get(model, "byte_fallback"));
    b->fuse_unk = json_is_true(json_object_get(model, "fuse_unk"));
    b->ignore_merges = json_is_true(json_object_get(model, "ignore_merges"));
    int32_t top;
    if ((rc = vocab_top_id(b, name, vocab, &top, err)) < 0)
        return rc;
    if (tables_alloc(b, top + 1, json_array_size(merges)) < 0)
        return moai_err_set(err, MOAI_ENOMEM, "%s: out of memory", name);

    char *scratch = NULL;
    size_t scap = 0;
    rc = load_vocab(b, name, vocab, &scratch, &scap, err);
    if (rc == 0)
        rc = load_unk(b, name, model, err);
    for (size_t i = 0; rc == 0 && i < json_array_size(merges); i++)
        rc = load_merge(b, name, i, json_array_get(merges, i), &scratch, &scap, err);
    free(scratch);
    return rc;
}

/* A special token's string in tokenizer_config.json: "x" or {"content": "x"}; NULL when
 * absent or null. */
static const char *config_token(json_t *cfg, const char *key)
{
    json_t *v = json_object_get(cfg, key);
    if (json_is_object(v))
        v = json_object_get(v, "content");
    return json_is_string(v) ? json_string_value(v) : NULL;
}

static int load_config(struct bpe *b, const char *name, const char *text, size_t size,
                       struct moai_err *err)
{
    json_error_t jerr;
    json_t *cfg = json_loadb(text, size, 0, &jerr);
    int rc = 0;
    if (!json_is_object(cfg)) {
        rc = moai_err_set(err, MOAI_EUSAGE, "%s: %d:%d: %s", name, jerr.line, jerr.column,
                          cfg ? "expected an object" : moai_oneline(jerr.text));
        goto out;
    }
    static const char *const keys[] = {"bos_token", "eos_token", "pad_token"};
    int32_t ids[3] = {-1, -1, -1};
    for (int k = 0; k < 3; k++) {
        const char *s = config_token(cfg, keys[k]);
        if (!s)
            continue;
        if ((ids[k] = find_token(b, s, strlen(s))) < 0) {
            rc = moai_err_set(err, MOAI_EUSAGE, "%s: %s '%s' is not a token of the tokenizer", name,
                              keys[k], s);
            goto out;
        }
    }
    /* the BOS is added when add_bos_token says so, else when the post-processor adds one */
    json_t *ab = json_object_get(cfg, "add_bos_token");
    bool add_bos = json_is_boolean(ab) ? json_is_true(ab) : b->bos_id >= 0;
    if (ids[0] >= 0)
        b->bos_id = ids[0];
    if (!add_bos)
        b->bos_id = -1;
    if (ids[1] >= 0)
        b->eos_id = ids[1];
    if (ids[2] >= 0)
        b->pad_id = ids[2];
out:
    json_decref(cfg);
    return rc;
}

static int finish_ids(struct bpe *b, const char *name, struct moai_err *err)
{
    qsort(b->added, (size_t) b->nadded, sizeof(*b->added), cmp_added);
    for (int i = 0; i < b->nadded; i++) {
        int32_t id = b->added[i].id;
        const char *s = b->pool + b->added[i].off;
        if (b->tok_off[id] == UINT32_MAX) {
            b->tok_off[id] = b->added[i].off;
            b->tok_len[id] = b->added[i].len;
        } else if (b->tok_len[id] != b->added[i].len ||
                   memcmp(b->pool + b->tok_off[id], s, b->added[i].len)) {
            return moai_err_set(err, MOAI_EUSAGE,
                                "%s: added token '%s' has id %d, which the "
                                "vocabulary gives to another token",
                                name, s, (int) id);
        }
    }
    bytes_index(b);
    if (b->byte_level)
        for (int c = 0; c < 256; c++)
            if (b->byte_id[c] < 0)
                return moai_err_set(err, MOAI_EUSAGE,
                                    "%s: the byte-level vocabulary has no "
                                    "token for byte 0x%02X",
                                    name, c);
    if (b->pad_id < 0)
        b->pad_id = b->eos_id;
    return 0;
}

struct bpe *bpe_load_json_mem(const char *name, const char *json, size_t size, const char *config,
                              size_t config_size, struct moai_err *err)
{
    json_error_t jerr;
    json_t *root = json_loadb(json, size, 0, &jerr);
    struct bpe *b = NULL;
    if (!root) {
        moai_err_set(err, MOAI_EUSAGE, "%s:%d:%d: invalid JSON: %s", name, jerr.line, jerr.column,
                     moai_oneline(jerr.text));
        return NULL;
    }
    if (!json_is_object(root)) {
        moai_err_set(err, MOAI_EUSAGE, "%s: expected a JSON object (a tokenizer.json)", name);
        goto fail;
    }
    if (!(b = bpe_new())) {
        moai_err_set(err, MOAI_ENOMEM, "%s: out of memory", name);
        goto fail;
    }
    if (load_normalizer(b, name, json_object_get(root, "normalizer"), err) < 0 ||
        load_pre_tokenizer(b, name, json_object_get(root, "pre_tokenizer"), err) < 0 ||
        load_added(b, name, json_object_get(root, "added_tokens"), err) < 0 ||
        load_model(b, name, json_object_get(root, "model"), err) < 0 ||
        finish_ids(b, name, err) < 0 ||
        load_post_processor(b, name, json_object_get(root, "post_processor"), err) < 0)
        goto fail;
    if (b->byte_level && (b->meta_replace || b->prepend != PREPEND_NEVER)) {
        moai_err_set(err, MOAI_EUSAGE,
                     "%s: ByteLevel together with Metaspace normalization is "
                     "not supported",
                     name);
        goto fail;
    }
    b->kind = b->byte_level ? "tokenizer.json BPE (byte-level)"
                            : "tokenizer.json BPE (SentencePiece-style)";
    if (config) {
        char cname[4200];
        snprintf(cname, sizeof(cname), "%s (tokenizer_config.json)", name);
        if (load_config(b, cname, config, config_size, err) < 0)
            goto fail;
        if (b->pad_id < 0)
            b->pad_id = b->eos_id;
    }
    json_decref(root);
    return b;
fail:
    json_decref(root);
    bpe_free(b);
    return NULL;
}

/* ---- tiktoken ---- */

static int b64_value(int c)
{
    if (c >= 'A' && c <= 'Z')
        return c - 'A';
    if (c >= 'a' && c <= 'z')
        return c - 'a' + 26;
    if (c >= '0' && c <= '9')
        return c - '0' + 52;
    return c == '+' ? 62 : c == '/' ? 63 : -1;
}

/* Decodes n base64 characters into out; returns the byte count or -1 when malformed. */
static long b64_decode(const char *s, size_t n, char *out)
{
    if (n == 0 || n % 4)
        return -1;
    size_t k = 0;
    for (size_t i = 0; i < n; i += 4) {
        int v[4], pad = 0;
        for (int j = 0; j < 4; j++) {
            if (s[i + j] == '=' && i + 4 == n && j >= 2) {
                v[j] = 0;
                pad++;
            } else if ((v[j] = b64_value((unsigned char) s[i + j])) < 0 || pad) {
                return -1;
            }
        }
        uint32_t w = (uint32_t) (v[0] << 18 | v[1] << 12 | v[2] << 6 | v[3]);
        out[k++] = (char) (w >> 16);
        if (pad < 2)
            out[k++] = (char) (w >> 8);
        if (pad < 1)
            out[k++] = (char) w;
    }
    return (long) k;
}

int bpe_is_tiktoken(const char *data, size_t size)
{
    size_t i = 0;
    while (i < size && (b64_value((unsigned char) data[i]) >= 0 || data[i] == '='))
        i++;
    if (i == 0 || i >= size || data[i] != ' ')
        return 0;
    size_t d = ++i;
    while (i < size && data[i] >= '0' && data[i] <= '9')
        i++;
    return i > d && (i == size || data[i] == '\n' || data[i] == '\r');
}

/* Llama 3's special tokens, from rank n on. */
static int tiktoken_specials(struct bpe *b, int32_t base, const char *name, struct moai_err *err)
{
    static const char *const named[] = {"<|begin_of_text|>",
                                        "<|end_of_text|>",
                                        "<|reserved_special_token_0|>",
                                        "<|reserved_special_token_1|>",
                                        "<|finetune_right_pad_id|>",
                                        "<|reserved_special_token_2|>",
                                        "<|start_header_id|>",
                                        "<|end_header_id|>",
                                        "<|eom_id|>",
                                        "<|eot_id|>",
                                        "<|python_tag|>"};
    if (!(b->added = calloc(256, sizeof(*b->added))))
        return moai_err_set(err, MOAI_ENOMEM, "%s: out of memory", name);
    for (int i = 0; i < 256; i++) {
        char s[64];
        if (i < 11)
            snprintf(s, sizeof(s), "%s", named[i]);
        else
            snprintf(s, sizeof(s), "<|reserved_special_token_%d|>", i - 11 + 3);
        struct bpe_added *a = &b->added[b->nadded++];
        a->id = base + i;
        a->len = (uint32_t) strlen(s);
        if (pool_add(b, s, a->len, &a->off) < 0)
            return moai_err_set(err, MOAI_ENOMEM, "%s: out of memory", name);
        b->added_first[(unsigned char) s[0]] = true;
    }
    b->bos_id = base;
    b->eos_id = base + 1;
    return 0;
}

/* Lines in data, the last one counted without its newline. */
static size_t count_lines(const char *data, size_t size)
{
    size_t lines = 0;
    for (size_t i = 0; i < size; i++)
        lines += data[i] == '\n';
    if (size && data[size - 1] != '\n')
        lines++;
    return lines;
}

/* One line "<base64 token> <rank>" (without its newline): the token's bytes into tok, their
 * count (0 or less when the line is not of that form) returned, the rank into *rank (-1 when
 * not a number of up to 9 digits). */
static long tiktoken_line(const char *s, size_t ln, char *tok, long long *rank)
{
    const char *sp = memchr(s, ' ', ln);
    long k = -1;

    *rank = -1;
    if (sp) {
        k = b64_decode(s, (size_t) (sp - s), tok);
        const char *d = sp + 1, *end = s + ln;
        if (d < end && end - d <= 9)
            for (*rank = 0; d < end && *rank >= 0; d++)
                *rank = *d >= '0' && *d <= '9' ? *rank * 10 + (*d - '0') : -1;
    }
    return k;
}

/* The ranked tokens, one a line, into b's vocabulary: n ranks, each below n, each once. */
static int tiktoken_ranks(struct bpe *b, const char *name, const char *data, size_t size, int32_t n,
                          struct moai_err *err)
{
    char *tok = malloc(size + 4);
    size_t line = 0;
    int rc = 0;

    if (!tok)
        return moai_err_set(err, MOAI_ENOMEM, "%s: out of memory", name);
    for (size_t i = 0; i < size && rc == 0; line++) {
        const char *s = data + i, *e = memchr(s, '\n', size - i);
        size_t ln = e ? (size_t) (e - s) : size - i;
        long long rank;
        i += ln + 1;
        if (ln && s[ln - 1] == '\r')
            ln--;
        long k = tiktoken_line(s, ln, tok, &rank);
        if (k <= 0 || rank < 0) {
            rc = moai_err_set(err, MOAI_EUSAGE, "%s:%zu: expected '<base64 token> <rank>'", name,
                              line + 1);
            break;
        }
        if (rank >= n) {
            rc = moai_err_set(err, MOAI_EUSAGE,
                              "%s:%zu: rank %lld is not below the number of lines "
                              "(%d)",
                              name, line + 1, rank, (int) n);
            break;
        }
        int a = vocab_add(b, (int32_t) rank, tok, (size_t) k);
        if (a < 0)
            rc = moai_err_set(err, MOAI_ENOMEM, "%s: out of memory", name);
        else if (a > 0)
            rc = moai_err_set(err, MOAI_EUSAGE, "%s:%zu: rank %lld or its token is given twice",
                              name, line + 1, rank);
    }
    free(tok);
    return rc;
}

/* Every split of each of the n ranked tokens into two tokens: counted (add false) or added
 * as a merge ranked by the whole token's rank. Returns the count. */
static size_t tiktoken_splits(struct bpe *b, int32_t n, bool add)
{
    size_t npairs = 0;
    for (int32_t id = 0; id < n; id++) {
        const char *s = b->pool + b->tok_off[id];
        uint32_t len = b->tok_len[id];
        for (uint32_t c = 1; c < len; c++) {
            int32_t l = vocab_find(b, s, c), r = l >= 0 ? vocab_find(b, s + c, len - c) : -1;
            if (l < 0 || r < 0)
                continue;
            npairs++;
            if (add)
                pair_add(b, l, r, (uint32_t) id, id);
        }
    }
    return npairs;
}

/* The merges of a tiktoken vocabulary: its splits, in a pair table sized for them. */
static int tiktoken_merges(struct bpe *b, const char *name, int32_t n, struct moai_err *err)
{
    size_t npairs = tiktoken_splits(b, n, false), ps = 16;
    while (ps < 2 * npairs + 16)
        ps *= 2;
    free(b->pairs);
    if (!(b->pairs = malloc(sizeof(struct bpe_pair) * ps)))
        return moai_err_set(err, MOAI_ENOMEM, "%s: out of memory", name);
    b->pmask = ps - 1;
    for (size_t i = 0; i < ps; i++)
        b->pairs[i].key = BPE_EMPTY_KEY;
    tiktoken_splits(b, n, true);
    return 0;
}

struct bpe *bpe_load_tiktoken_mem(const char *name, const char *data, size_t size,
                                  struct moai_err *err)
{
    struct bpe *b = bpe_new();
    if (!b) {
        moai_err_set(err, MOAI_ENOMEM, "%s: out of memory", name);
        return NULL;
    }
    size_t lines = count_lines(data, size);
    if (lines == 0 || lines >= BPE_MAX_ID - 256) {
        moai_err_set(err, MOAI_EUSAGE, "%s: a tiktoken file needs 1 to %d lines", name,
                     BPE_MAX_ID - 257);
        goto fail;
    }
    int32_t n = (int32_t) lines;
    if (tables_alloc(b, n + 256, 0) < 0) {
        moai_err_set(err, MOAI_ENOMEM, "%s: out of memory", name);
        goto fail;
    }
    if (tiktoken_ranks(b, name, data, size, n, err) < 0 || tiktoken_merges(b, name, n, err) < 0)
        goto fail;
    b->ignore_merges = true;
    b->byte_level = true;
    b->kind = "tiktoken";
    if (regex_add(b, name, "Llama 3 pattern", llama3_pattern, sizeof(llama3_pattern) - 1, err) <
            0 ||
        tiktoken_specials(b, n, name, err) < 0 || finish_ids(b, name, err) < 0)
        goto fail;
    return b;
fail:
    bpe_free(b);
    return NULL;
}

static char *slurp(const char *path, size_t *size, struct moai_err *err)
{
    FILE *f = fopen(path, "rb");
    char *buf = NULL;
    size_t cap = 0, n = 0;
    if (!f) {
        moai_err_set(err, MOAI_EIO, "cannot open '%s': %s", path, strerror(errno));
        return NULL;
    }
    for (;;) {
        if (n + 65536 + 1 > cap) {
            cap = cap ? cap * 2 : 1 << 20;
            char *p = realloc(buf, cap);
            if (!p) {
                moai_err_set(err, MOAI_ENOMEM, "reading '%s': out of memory", path);
                goto fail;
            }
            buf = p;
        }
        size_t got = fread(buf + n, 1, cap - n - 1, f);
        n += got;
        if (got == 0)
            break;
    }
    if (ferror(f)) {
        moai_err_set(err, MOAI_EIO, "cannot read '%s': %s", path, strerror(errno));
        goto fail;
    }
    fclose(f);
    buf[n] = 0;
    *size = n;
    return buf;
fail:
    fclose(f);
    free(buf);
    return NULL;
}

struct bpe *bpe_load_file(const char *path, struct moai_err *err)
{
    size_t size, csize = 0;
    char *data = slurp(path, &size, err), *cfg = NULL;
    struct bpe *b = NULL;
    if (!data)
        return NULL;
    size_t i = 0;
    while (i < size && (data[i] == ' ' || data[i] == '\n' || data[i] == '\t' || data[i] == '\r'))
        i++;
    if (i < size && data[i] == '{') {
        char cpath[4200];
        const char *slash = strrchr(path, '/');
        snprintf(cpath, sizeof(cpath), "%.*stokenizer_config.json",
                 slash ? (int) (slash - path + 1) : 0, path);
        FILE *f = fopen(cpath, "rb");
        if (f) {
            fclose(f);
            if (!(cfg = slurp(cpath, &csize, err)))
                goto out;
        }
        b = bpe_load_json_mem(path, data, size, cfg, csize, err);
    } else {
        b = bpe_load_tiktoken_mem(path, data, size, err);
    }
out:
    free(data);
    free(cfg);
    return b;
}

/* ---- encoding ---- */

struct enc {
    const struct bpe *b;
    int32_t *ids;
    uint32_t *starts; /* (cap) where each id starts in the text, NULL when not wanted */
    size_t cap, n, n_before, boundary;
    pcre2_match_data *md[BPE_MAX_SPLITS];
    struct moai_err *err;
    /* scratch for one piece */
    int32_t *sym;
    uint32_t *start, *rank;
    size_t scap;
};

static void emit(struct enc *e, int32_t id, size_t start)
{
    if (e->n < e->cap) {
        e->ids[e->n] = id;
        if (e->starts)
            e->starts[e->n] = (uint32_t) start;
    }
    e->n++;
    if (start < e->boundary)
        e->n_before++;
}

static int scratch_reserve(struct enc *e, size_t n)
{
    if (n <= e->scap)
        return 0;
    size_t cap = e->scap ? e->scap : 256;
    while (cap < n)
        cap *= 2;
    int32_t *s = realloc(e->sym, sizeof(int32_t) * cap);
    if (s)
        e->sym = s;
    uint32_t *st = realloc(e->start, sizeof(uint32_t) * cap);
    if (st)
        e->start = st;
    uint32_t *r = realloc(e->rank, sizeof(uint32_t) * cap);
    if (r)
        e->rank = r;
    if (!s || !st || !r)
        return moai_err_set(e->err, MOAI_ENOMEM, "tokenizing: out of memory");
    e->scap = cap;
    return 0;
}

static uint32_t pair_rank(const struct bpe *b, int32_t l, int32_t r, int32_t *merged)
{
    if (l < 0 || r < 0)
        return BPE_NO_RANK;
    const struct bpe_pair *p = pair_slot(b, l, r);
    if (p->key == BPE_EMPTY_KEY)
        return BPE_NO_RANK;
    if (merged)
        *merged = p->merged;
    return p->rank;
}

/* BPE of one piece s[0, n) whose bytes start at origin offsets map[i] (map NULL: base + i). */
static int bpe_piece(struct enc *e, const char *s, size_t n, size_t base, const uint32_t *map)
{
    const struct bpe *b = e->b;
    if (n == 0)
        return 0;
    if (b->ignore_merges) {
        int32_t id = vocab_find(b, s, n);
        if (id >= 0) {
            emit(e, id, map ? map[0] : base);
            return 0;
        }
    }
    if (scratch_reserve(e, n + 1) < 0)
        return -1;
    size_t m = 0;
    if (b->byte_level) {
        for (size_t i = 0; i < n; i++) {
            e->sym[m] = b->byte_id[(unsigned char) s[i]];
            e->start[m++] = (uint32_t) i;
        }
    } else {
        bool last_unk = false;
        for (size_t i = 0; i < n;) {
            uint32_t cp;
            size_t l = utf8_decode((const unsigned char *) s + i, n - i, &cp);
            if (!l)
                l = 1;
            int32_t id = vocab_find(b, s + i, l);
            if (id >= 0) {
                e->sym[m] = id;
                e->start[m++] = (uint32_t) i;
                last_unk = false;
            } else if (b->byte_fallback && b->byte_fb[(unsigned char) s[i]] >= 0) {
                for (size_t k = 0; k < l; k++) {
                    e->sym[m] = b->byte_fb[(unsigned char) s[i + k]];
                    e->start[m++] = (uint32_t) (i + k);
                }
                last_unk = false;
            } else if (!(b->fuse_unk && last_unk)) {
                e->sym[m] = b->unk_id;
                e->start[m++] = (uint32_t) i;
                last_unk = true;
            }
            i += l;
        }
    }
    for (size_t i = 0; i + 1 < m; i++)
        e->rank[i] = pair_rank(b, e->sym[i], e->sym[i + 1], NULL);
    while (m > 1) {
        size_t best = 0;
        uint32_t br = BPE_NO_RANK;
        for (size_t i = 0; i + 1 < m; i++)
            if (e->rank[i] < br)
                br = e->rank[i], best = i;
        if (br == BPE_NO_RANK)
            break;
        int32_t merged = -1;
        pair_rank(b, e->sym[best], e->sym[best + 1], &merged);
        e->sym[best] = merged;
        memmove(e->sym + best + 1, e->sym + best + 2, sizeof(int32_t) * (m - best - 2));
        memmove(e->start + best + 1, e->start + best + 2, sizeof(uint32_t) * (m - best - 2));
        memmove(e->rank + best, e->rank + best + 1, sizeof(uint32_t) * (m - best - 2));
        m--;
        if (best > 0)
            e->rank[best - 1] = pair_rank(b, e->sym[best - 1], e->sym[best], NULL);
        if (best + 1 < m)
            e->rank[best] = pair_rank(b, e->sym[best], e->sym[best + 1], NULL);
    }
    for (size_t i = 0; i < m; i++)
        if (e->sym[i] >= 0)
            emit(e, e->sym[i], map ? map[e->start[i]] : base + e->start[i]);
    return 0;
}

/* Applies the Split regexes from level k on to s[0, n), then BPE to each resulting piece. */
static int split_level(struct enc *e, int k, const char *s, size_t n, size_t base,
                       const uint32_t *map)
{
    const struct bpe *b = e->b;
    if (k == b->nsplit)
        return bpe_piece(e, s, n, base, map);
    size_t gap = 0, pos = 0; /* gap: start of the unmatched text; pos: where to search */
    uint32_t opts = 0;
    while (pos < n) {
        int rc = pcre2_match(b->split[k], (PCRE2_SPTR) s, n, pos, opts, e->md[k], NULL);
        if (rc == PCRE2_ERROR_JIT_STACKLIMIT)
            rc = pcre2_match(b->split[k], (PCRE2_SPTR) s, n, pos, opts | PCRE2_NO_JIT, e->md[k],
                             NULL);
        if (rc == PCRE2_ERROR_NOMATCH)
            break;
        if (rc < 0) {
            PCRE2_UCHAR msg[256];
            pcre2_get_error_message(rc, msg, sizeof(msg));
            return moai_err_set(e->err, MOAI_EIO, "pre-tokenizer regex failed: %s",
                                (const char *) msg);
        }
        opts = PCRE2_NO_UTF_CHECK;
        PCRE2_SIZE *ov = pcre2_get_ovector_pointer(e->md[k]);
        size_t ms = ov[0], me = ov[1];
        if (me == ms) { /* an empty match cuts nothing: search again one character on */
            pos = ms + 1;
            while (pos < n && ((unsigned char) s[pos] & 0xc0) == 0x80)
                pos++;
            continue;
        }
        if (ms > gap &&
            split_level(e, k + 1, s + gap, ms - gap, base + gap, map ? map + gap : NULL) < 0)
            return -1;
        if (split_level(e, k + 1, s + ms, me - ms, base + ms, map ? map + ms : NULL) < 0)
            return -1;
        gap = pos = me;
    }
    if (gap < n && split_level(e, k + 1, s + gap, n - gap, base + gap, map ? map + gap : NULL) < 0)
        return -1;
    return 0;
}

/* SentencePiece-style normalization of s[0, n) (at text offset base), then Metaspace split. */
static int meta_segment(struct enc *e, const char *s, size_t n, size_t base, bool first)
{
    const struct bpe *b = e->b;
    size_t cap = 3 * n + META_LEN + 1;
    char *buf = malloc(cap);
    uint32_t *map = malloc(sizeof(uint32_t) * cap);
    int rc = 0;
    if (!buf || !map) {
        rc = moai_err_set(e->err, MOAI_ENOMEM, "tokenizing: out of memory");
        goto out;
    }
    size_t m = 0;
    if (b->prepend == PREPEND_ALWAYS || (b->prepend == PREPEND_FIRST && first)) {
        memcpy(buf, META, META_LEN);
        for (int i = 0; i < META_LEN; i++)
            map[m++] = (uint32_t) base;
    }
    for (size_t i = 0; i < n; i++) {
        if (s[i] == ' ' && b->meta_replace) {
            memcpy(buf + m, META, META_LEN);
            for (int k = 0; k < META_LEN; k++)
                map[m++] = (uint32_t) (base + i);
        } else {
            buf[m] = s[i];
            map[m++] = (uint32_t) (base + i);
        }
    }
    size_t from = 0;
    for (size_t i = 1; b->meta_split && i + META_LEN <= m; i++)
        if (!memcmp(buf + i, META, META_LEN)) {
            if ((rc = split_level(e, 0, buf + from, i - from, 0, map + from)) < 0)
                goto out;
            from = i;
        }
    rc = split_level(e, 0, buf + from, m - from, 0, map + from);
out:
    free(buf);
    free(map);
    return rc;
}

static int encode_segment(struct enc *e, const char *text, size_t a, size_t z)
{
    if (a == z)
        return 0;
    if (e->b->meta_replace || e->b->prepend != PREPEND_NEVER)
        return meta_segment(e, text + a, z - a, a, a == 0);
    return split_level(e, 0, text + a, z - a, a, NULL);
}

int bpe_encode(const struct bpe *b, const char *text, size_t len, const size_t *spec, size_t nspec,
               size_t boundary, int32_t *ids, size_t cap, size_t *n, size_t *n_before,
               struct moai_err *err)
{
    return bpe_encode_starts(b, text, len, spec, nspec, boundary, ids, NULL, cap, n, n_before, err);
}

int bpe_encode_starts(const struct bpe *b, const char *text, size_t len, const size_t *spec,
                      size_t nspec, size_t boundary, int32_t *ids, uint32_t *starts, size_t cap,
                      size_t *n, size_t *n_before, struct moai_err *err)
{
    struct enc e = {
        .b = b, .ids = ids, .starts = starts, .cap = cap, .boundary = boundary, .err = err};
    if (len > UINT32_MAX)
        return moai_err_set(err, MOAI_EUSAGE, "a text of %zu bytes is too long to tokenize", len);
    int rc = 0;
    /* the whole text must be UTF-8: pieces are cut at character boundaries */
    for (size_t i = 0; i < len;) {
        uint32_t cp;
        size_t l = utf8_decode((const unsigned char *) text + i, len - i, &cp);
        if (!l)
            return moai_err_set(err, MOAI_EIO, "invalid UTF-8 at byte %zu", i);
        i += l;
    }
    for (int k = 0; k < b->nsplit; k++)
        if (!(e.md[k] = pcre2_match_data_create_from_pattern(b->split[k], NULL))) {
            rc = moai_err_set(err, MOAI_ENOMEM, "tokenizing: out of memory");
            goto out;
        }
    size_t seg = 0, all[2] = {0, len};
    if (!spec)
        spec = all, nspec = 1;
    for (size_t r = 0; r < nspec; r++) {
        size_t from = spec[2 * r] > seg ? spec[2 * r] : seg;
        size_t to = spec[2 * r + 1] < len ? spec[2 * r + 1] : len;
        for (size_t i = from; i < to; i++) {
            if (!b->added_first[(unsigned char) text[i]])
                continue;
            for (int a = 0; a < b->nadded; a++) {
                const struct bpe_added *ad = &b->added[a];
                if (ad->len <= to - i && !memcmp(text + i, b->pool + ad->off, ad->len)) {
                    if ((rc = encode_segment(&e, text, seg, i)) < 0)
                        goto out;
                    emit(&e, ad->id, i);
                    i += ad->len - 1;
                    seg = i + 1;
                    break;
                }
            }
        }
    }
    rc = encode_segment(&e, text, seg, len);
out:
    for (int k = 0; k < b->nsplit; k++)
        pcre2_match_data_free(e.md[k]);
    free(e.sym);
    free(e.start);
    free(e.rank);
    *n = e.n;
    if (n_before)
        *n_before = e.n_before;
    return rc;
}

int32_t bpe_bos_id(const struct bpe *b)
{
    return b->bos_id;
}

int32_t bpe_eos_id(const struct bpe *b)
{
    return b->eos_id;
}

int32_t bpe_pad_id(const struct bpe *b)
{
    return b->pad_id >= 0 ? b->pad_id : b->eos_id;
}

int32_t bpe_vocab_size(const struct bpe *b)
{
    return b->vocab_size;
}

int32_t bpe_token_id(const struct bpe *b, const char *token)
{
    size_t n = strlen(token);
    for (int i = 0; i < b->nadded; i++)
        if (b->added[i].len == n && !memcmp(b->pool + b->added[i].off, token, n))
            return b->added[i].id;
    return vocab_find(b, token, n);
}

const char *bpe_token_bytes(const struct bpe *b, int32_t id, size_t *len)
{
    if (id < 0 || id >= b->vocab_size || b->tok_off[id] == UINT32_MAX)
        return NULL;
    *len = b->tok_len[id];
    return b->pool + b->tok_off[id];
}

const char *bpe_kind(const struct bpe *b)
{
    return b->kind;
}
