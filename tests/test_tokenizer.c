/* test_tokenizer.c - the tokenizer interface, tokenizer.json BPE, tiktoken files, bad files. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <cmocka.h>

#include <jansson.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "data/bpe.h"
#include "data/dataset.h"
#include "data/tokenizer.h"

#define BAD_DIR "tests/data/bad/tokenizers"

/* A tiktoken file in memory: the 256 bytes in order, then "ab" (256) and "abc" (257). */
static struct bpe *tiny_tiktoken(void)
{
    char *buf = malloc(258 * 16), *p = buf;
    static const char b64[] = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    for (int c = 0; c < 256; c++)
        p += sprintf(p, "%c%c== %d\n", b64[c >> 2], b64[(c & 3) << 4], c);
    p += sprintf(p, "YWI= 256\nYWJj 257\n");
    struct moai_err err = {0};
    assert_true(bpe_is_tiktoken(buf, (size_t) (p - buf)));
    struct bpe *b = bpe_load_tiktoken_mem("tiny.tiktoken", buf, (size_t) (p - buf), &err);
    if (!b)
        fail_msg("%s", err.msg);
    free(buf);
    return b;
}

static void encode(const struct bpe *b, const char *text, const size_t *spec, size_t nspec,
                   size_t boundary, int32_t *ids, size_t *n, size_t *before)
{
    struct moai_err err = {0};
    if (bpe_encode(b, text, strlen(text), spec, nspec, boundary, ids, 64, n, before, &err) < 0)
        fail_msg("%s", err.msg);
}

static void test_tokenizer_tiktoken_merges_and_specials(void **state)
{
    (void) state;
    struct bpe *b = tiny_tiktoken();
    int32_t ids[64];
    size_t n, before;
    /* pieces "abc" and " abc": the first is a token, the second merges to ' ' + "abc" */
    encode(b, "abc abc", NULL, 0, SIZE_MAX, ids, &n, &before);
    assert_int_equal(n, 3);
    assert_int_equal(ids[0], 257);
    assert_int_equal(ids[1], ' ');
    assert_int_equal(ids[2], 257);
    assert_int_equal(before, 3);
    /* Llama 3's specials follow the ranks: BOS 258, EOS 259, <|eot_id|> 267 */
    assert_int_equal(bpe_bos_id(b), 258);
    assert_int_equal(bpe_eos_id(b), 259);
    assert_int_equal(bpe_token_id(b, "<|eot_id|>"), 267);
    assert_int_equal(bpe_vocab_size(b), 258 + 256);
    encode(b, "ab<|eot_id|>", NULL, 0, SIZE_MAX, ids, &n, NULL);
    assert_int_equal(n, 2);
    assert_int_equal(ids[1], 267);
    /* outside the allowed ranges the same text is plain bytes */
    size_t none[2] = {0, 0};
    encode(b, "ab<|eot_id|>", none, 0, SIZE_MAX, ids, &n, NULL);
    assert_int_equal(n, 1 + 10);
    size_t tail[2] = {2, 12};
    encode(b, "ab<|eot_id|>", tail, 1, SIZE_MAX, ids, &n, NULL);
    assert_int_equal(n, 2);
    /* tokens that start before byte 4 of "abc abc": "abc" and ' ' */
    encode(b, "abc abc", NULL, 0, 4, ids, &n, &before);
    assert_int_equal(before, 2);
    bpe_free(b);
}

static void test_tokenizer_invalid_utf8(void **state)
{
    (void) state;
    struct bpe *b = tiny_tiktoken();
    int32_t ids[8];
    size_t n;
    struct moai_err err = {0};
    assert_int_equal(bpe_encode(b, "ab\xff", 3, NULL, 0, SIZE_MAX, ids, 8, &n, NULL, &err),
                     MOAI_EIO);
    assert_string_equal(err.msg, "invalid UTF-8 at byte 2");
    bpe_free(b);
}

/* GPT-2's byte-level alphabet character for byte c, as UTF-8 into s. */
static void byte_char(int c, char *s)
{
    int printable = (c >= 33 && c <= 126) || (c >= 161 && c <= 172) || (c >= 174 && c <= 255);
    int cp = c;
    if (!printable) {
        int k = 0;
        for (int d = 0; d < c; d++)
            k += !((d >= 33 && d <= 126) || (d >= 161 && d <= 172) || (d >= 174 && d <= 255));
        cp = 256 + k;
    }
    if (cp < 0x80) {
        s[0] = (char) cp, s[1] = 0;
    } else {
        s[0] = (char) (0xc0 | (cp >> 6)), s[1] = (char) (0x80 | (cp & 0x3f)), s[2] = 0;
    }
}

/* A byte-level tokenizer.json: bytes, "ab" (256), " ab" (257), an added <|end|> (258), a Split
 * regex with a Unicode property and a case-insensitive group. */
static char *bytelevel_json(void)
{
    json_t *vocab = json_object(), *root = json_object();
    char s[8];
    for (int c = 0; c < 256; c++) {
        byte_char(c, s);
        json_object_set_new(vocab, s, json_integer(c));
    }
    json_object_set_new(vocab, "ab", json_integer(256));
    byte_char(' ', s);
    char sp_ab[16];
    snprintf(sp_ab, sizeof(sp_ab), "%sab", s);
    json_object_set_new(vocab, sp_ab, json_integer(257));
    json_t *model = json_pack("{s:s, s:o, s:[[s,s],[s,s]], s:b}", "type", "BPE", "vocab", vocab,
                              "merges", "a", "b", s, "ab", "ignore_merges", 0);
    json_object_set_new(root, "model", model);
    json_object_set_new(root, "pre_tokenizer",
                        json_pack("{s:s, s:[{s:s, s:{s:s}, s:s, s:b}, {s:s, s:b, s:b}]}", "type",
                                  "Sequence", "pretokenizers", "type", "Split", "pattern", "Regex",
                                  "(?i:'s)| ?\\p{L}+|\\p{N}{1,3}|\\s+", "behavior", "Isolated",
                                  "invert", 0, "type", "ByteLevel", "add_prefix_space", 0,
                                  "use_regex", 0));
    json_object_set_new(
        root, "added_tokens",
        json_pack("[{s:i, s:s, s:b}]", "id", 258, "content", "<|end|>", "special", 1));
    char *text = json_dumps(root, 0);
    json_decref(root);
    return text;
}

static void test_tokenizer_json_byte_level(void **state)
{
    (void) state;
    char *json = bytelevel_json();
    const char cfg[] = "{\"eos_token\": \"<|end|>\", \"bos_token\": null}";
    struct moai_err err = {0};
    struct bpe *b = bpe_load_json_mem("t.json", json, strlen(json), cfg, strlen(cfg), &err);
    if (!b)
        fail_msg("%s", err.msg);
    int32_t ids[64];
    size_t n;
    /* "ab ab'S 12345": pieces "ab", " ab", "'S", " ", "123", "45" (the regex has no ' ?\d') */
    encode(b, "ab ab'S 12345<|end|>", NULL, 0, SIZE_MAX, ids, &n, NULL);
    const int32_t want[] = {256, 257, '\'', 'S', ' ', '1', '2', '3', '4', '5', 258};
    assert_int_equal(n, sizeof(want) / sizeof(want[0]));
    for (size_t i = 0; i < n; i++)
        assert_int_equal(ids[i], want[i]);
    assert_int_equal(bpe_bos_id(b), -1);
    assert_int_equal(bpe_eos_id(b), 258);
    assert_int_equal(bpe_pad_id(b), 258);
    assert_string_equal(bpe_kind(b), "tokenizer.json BPE (byte-level)");
    bpe_free(b);
    free(json);
}

/* The Digits pre-tokenizer: each digit alone (individual_digits), or runs of digits. */
static void test_tokenizer_json_digits(void **state)
{
    (void) state;
    for (int individual = 0; individual < 2; individual++) {
        char *text = bytelevel_json();
        json_error_t jerr;
        json_t *root = json_loads(text, 0, &jerr), *model = json_object_get(root, "model");
        free(text);
        json_object_set_new(json_object_get(model, "vocab"), "12", json_integer(259));
        json_array_append_new(json_object_get(model, "merges"), json_pack("[s,s]", "1", "2"));
        json_object_set_new(root, "pre_tokenizer",
                            json_pack("{s:s, s:[{s:s, s:b}, {s:s, s:b, s:b}]}", "type", "Sequence",
                                      "pretokenizers", "type", "Digits", "individual_digits",
                                      individual, "type", "ByteLevel", "add_prefix_space", 0,
                                      "use_regex", 0));
        text = json_dumps(root, 0);
        json_decref(root);
        struct moai_err err = {0};
        struct bpe *b = bpe_load_json_mem("d.json", text, strlen(text), NULL, 0, &err);
        if (!b)
            fail_msg("%s", err.msg);
        int32_t ids[64];
        size_t n;
        encode(b, "ab12", NULL, 0, SIZE_MAX, ids, &n, NULL);
        assert_int_equal(ids[0], 256);
        if (individual) {
            assert_int_equal(n, 3);
            assert_int_equal(ids[1], '1');
            assert_int_equal(ids[2], '2');
        } else {
            assert_int_equal(n, 2);
            assert_int_equal(ids[1], 259);
        }
        bpe_free(b);
        free(text);
    }
}

/* A directory means its tokenizer.json, else its tokenizer.model; content decides the kind. */
static void test_tokenizer_load_directory(void **state)
{
    (void) state;
    char dir[] = "/tmp/test_tokenizer.XXXXXX", path[512];
    struct moai_err err = {0};
    assert_non_null(mkdtemp(dir));
    assert_null(tokenizer_load(dir, &err));
    assert_non_null(strstr(err.msg, "holds neither tokenizer.json nor tokenizer.model"));
    /* the shipped SentencePiece model through the interface */
    struct tokenizer *tk = tokenizer_load("models/tiny-llama", &err);
    if (!tk)
        fail_msg("%s", err.msg);
    assert_string_equal(tokenizer_kind(tk), "sentencepiece");
    assert_int_equal(tokenizer_bos_id(tk), 1);
    assert_int_equal(tokenizer_token_id(tk, "[SUMMARIZE]"), 4);
    assert_int_equal(tokenizer_token_id(tk, "no such piece"), -1);
    tokenizer_free(tk);
    char *json = bytelevel_json();
    snprintf(path, sizeof(path), "%s/tokenizer.json", dir);
    FILE *f = fopen(path, "w");
    assert_non_null(f);
    fputs(json, f);
    fclose(f);
    free(json);
    snprintf(path, sizeof(path), "%s/tokenizer_config.json", dir);
    f = fopen(path, "w");
    assert_non_null(f);
    fputs("{\"eos_token\": {\"content\": \"<|end|>\"}}", f);
    fclose(f);
    tk = tokenizer_load(dir, &err);
    if (!tk)
        fail_msg("%s", err.msg);
    assert_string_equal(tokenizer_kind(tk), "tokenizer.json BPE (byte-level)");
    assert_int_equal(tokenizer_eos_id(tk), 258);
    tokenizer_free(tk);
    unlink(path);
    snprintf(path, sizeof(path), "%s/tokenizer.json", dir);
    unlink(path);
    rmdir(dir);
}

/* Every file in tests/data/bad/tokenizers gives its one line. */
static void test_tokenizer_bad_files(void **state)
{
    (void) state;
    static const struct {
        const char *file, *msg;
    } cases[] = {
        {"added-token-bad-id.json", "added-token-bad-id.json: added_tokens[0]: expected an "
                                    "integer 'id' in [0, 16777216) and a non-empty string "
                                    "'content'"},
        {"bad-line.tiktoken", "bad-line.tiktoken:3: expected '<base64 token> <rank>'"},
        {"duplicate-rank.tiktoken", "duplicate-rank.tiktoken:3: rank 1 or its token is given "
                                    "twice"},
        {"merge-unknown-result.json", "merge-unknown-result.json: merges[0] 'a b': the merged "
                                      "token 'ab' is not in the vocabulary"},
        {"merge-unknown-token.json", "merge-unknown-token.json: merges[0] 'a c': 'c' is not in "
                                     "the vocabulary"},
        {"model-unigram.json", "model-unigram.json: model type 'Unigram' is not supported (only "
                               "BPE)"},
        {"normalizer-nfc.json", "normalizer-nfc.json: normalizer 'NFC' is not supported"},
        {"not-a-tokenizer.txt", "not-a-tokenizer.txt' is not a tokenizer: expected a "
                                "tokenizer.json, a tiktoken file or a SentencePiece model"},
        {"pre-tokenizer-unsupported.json", "pre-tokenizer-unsupported.json: pre_tokenizer "
                                           "'Whitespace' is not supported"},
        {"rank-too-large.tiktoken", "rank-too-large.tiktoken:2: rank 7 is not below the number "
                                    "of lines (2)"},
        {"split-bad-regex.json", "split-bad-regex.json: pre_tokenizer Split: regex error at "
                                 "offset 3: missing closing parenthesis"},
        {"split-removed.json", "split-removed.json: pre_tokenizer Split behavior 'Removed' is "
                               "not supported (only 'Isolated')"},
        {"truncated.json", "truncated.json:1:47: invalid JSON: ':' expected near end of file"},
        {"vocab-duplicate-id.json", "vocab-duplicate-id.json: vocab token 'b': its id 0 or its "
                                    "bytes are given twice"},
        {"vocab-not-object.json", "vocab-not-object.json: model 'vocab' is missing or not an "
                                  "object"},
    };
    for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
        char path[256];
        struct moai_err err = {0};
        snprintf(path, sizeof(path), BAD_DIR "/%s", cases[i].file);
        assert_null(tokenizer_load(path, &err));
        if (!strstr(err.msg, cases[i].msg))
            fail_msg("%s: got '%s'", cases[i].file, err.msg);
        assert_int_equal(err.code, MOAI_EUSAGE);
        assert_null(strchr(err.msg, '\n'));
    }
}

/* Renders one conversation with template chat from a dataset file of the given text. */
static char *render(const char *file_text, enum dataset_chat chat, bool train_all, size_t *ntrain,
                    size_t *train)
{
    char path[] = "/tmp/test_tokenizer_chat.XXXXXX";
    int fd = mkstemp(path);
    assert_true(fd >= 0);
    assert_int_equal(write(fd, file_text, strlen(file_text)), (ssize_t) strlen(file_text));
    close(fd);
    struct dataset_format f = {.kind = DATASET_MESSAGES, .chat = chat, .train_all = train_all};
    struct dataset_texts dt;
    struct moai_err err = {0};
    if (dataset_load_format(&dt, path, &f, -1, &err) < 0)
        fail_msg("%s", err.msg);
    unlink(path);
    assert_int_equal(dt.n, 1);
    char *text = strdup(dataset_text(&dt, 0));
    *ntrain = dataset_text_ntrain(&dt, 0);
    memcpy(train, dataset_text_train(&dt, 0), sizeof(size_t) * 2 * *ntrain);
    dataset_texts_release(&dt);
    return text;
}

/* Each chat template renders what its model family's published chat_template renders for the
 * same conversation (the strings below are those templates' output, the opening BOS aside,
 * which the tokenizer adds); the assistant turns (with their end of turn) are the loss. */
static void test_tokenizer_chat_templates(void **state)
{
    (void) state;
    static const char sys_conv[] =
        "{\"messages\": [{\"role\": \"system\", \"content\": \"You are helpful.\"}, "
        "{\"role\": \"user\", \"content\": \" Hi! \"}, {\"role\": \"assistant\", "
        "\"content\": \"Hello.\"}, {\"role\": \"user\", \"content\": \"More?\"}, "
        "{\"role\": \"assistant\", \"content\": \"Sure.\"}]}\n";
    static const char plain_conv[] =
        "[{\"messages\": [{\"role\": \"user\", \"content\": \"Hi!\"}, {\"role\": "
        "\"assistant\", \"content\": \"Hello.\"}, {\"role\": \"user\", \"content\": "
        "\"More?\"}, {\"role\": \"assistant\", \"content\": \"Sure.\"}]}]";
    static const struct {
        enum dataset_chat chat;
        const char *conv, *want, *learned;
    } cases[] = {
        {DATASET_CHAT_LLAMA3, sys_conv,
         "<|start_header_id|>system<|end_header_id|>\n\nYou are helpful.<|eot_id|>"
         "<|start_header_id|>user<|end_header_id|>\n\nHi!<|eot_id|>"
         "<|start_header_id|>assistant<|end_header_id|>\n\nHello.<|eot_id|>"
         "<|start_header_id|>user<|end_header_id|>\n\nMore?<|eot_id|>"
         "<|start_header_id|>assistant<|end_header_id|>\n\nSure.<|eot_id|>",
         "Hello.<|eot_id|>|Sure.<|eot_id|>|"},
        {DATASET_CHAT_LLAMA2, sys_conv,
         "[INST] <<SYS>>\nYou are helpful.\n<</SYS>>\n\n Hi! [/INST] Hello. </s>"
         "<s>[INST] More? [/INST] Sure. </s>",
         "Hello. </s>|Sure. </s>|"},
        {DATASET_CHAT_MISTRAL, plain_conv,
         "[INST] Hi! [/INST]Hello.</s>[INST] More? [/INST]Sure.</s>", "Hello.</s>|Sure.</s>|"},
        {DATASET_CHAT_CHATML, plain_conv,
         "<|im_start|>user\nHi!<|im_end|>\n<|im_start|>assistant\nHello.<|im_end|>\n"
         "<|im_start|>user\nMore?<|im_end|>\n<|im_start|>assistant\nSure.<|im_end|>\n",
         "Hello.<|im_end|>|Sure.<|im_end|>|"},
    };
    for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
        size_t ntrain, train[16];
        char *text = render(cases[i].conv, cases[i].chat, false, &ntrain, train);
        assert_string_equal(text, cases[i].want);
        char learned[256] = "";
        for (size_t k = 0; k < ntrain; k++) {
            strncat(learned, text + train[2 * k], train[2 * k + 1] - train[2 * k]);
            strcat(learned, "|");
        }
        assert_string_equal(learned, cases[i].learned);
        free(text);
        text = render(cases[i].conv, cases[i].chat, true, &ntrain, train);
        assert_int_equal(ntrain, 1);
        assert_int_equal(train[0], 0);
        assert_int_equal(train[1], strlen(cases[i].want));
        free(text);
    }
}

/* Bad chat records name the record and what is wrong. */
static void test_tokenizer_chat_errors(void **state)
{
    (void) state;
    static const struct {
        const char *text, *msg;
    } cases[] = {
        {"{\"text\": \"x\"}\n", ":1: record has no field 'messages' (dataset.format is messages)"},
        {"{\"messages\": \"hi\"}\n", ":1: 'messages' is a string, not a list of turns"},
        {"\n{\"messages\": [{\"role\": \"bot\", \"content\": \"x\"}]}\n",
         ":2: messages[0] has role 'bot' (expected system, user or assistant)"},
        {"{\"messages\": [{\"role\": \"user\", \"content\": 3}]}\n",
         ":1: messages[0] field 'content' is a number, not a string"},
        {"[{\"messages\": [{\"role\": \"user\", \"content\": \"x\"}]}]",
         ": record 1: the record has no assistant turn to learn"},
        {"[{\"messages\": [{\"role\": \"user\", \"content\": \"x\"}]}", ":1:"},
    };
    for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
        char path[] = "/tmp/test_tokenizer_chat.XXXXXX";
        int fd = mkstemp(path);
        assert_true(fd >= 0);
        assert_int_equal(write(fd, cases[i].text, strlen(cases[i].text)),
                         (ssize_t) strlen(cases[i].text));
        close(fd);
        struct dataset_format f = {.kind = DATASET_MESSAGES, .chat = DATASET_CHAT_LLAMA3};
        struct dataset_texts dt;
        struct moai_err err = {0};
        assert_int_equal(dataset_load_format(&dt, path, &f, -1, &err), MOAI_EIO);
        unlink(path);
        if (strncmp(err.msg, path, strlen(path)) || !strstr(err.msg, cases[i].msg))
            fail_msg("case %zu: got '%s'", i, err.msg);
    }
}

/* Alpaca records, with and without input; the loss is on the output. */
static void test_tokenizer_alpaca(void **state)
{
    (void) state;
    char path[] = "/tmp/test_tokenizer_alpaca.XXXXXX";
    static const char text[] =
        "{\"instruction\": \"Add.\", \"input\": \"1 2\", \"output\": \"3\"}\n"
        "{\"instruction\": \"Greet.\", \"output\": \"Hi\"}\n";
    int fd = mkstemp(path);
    assert_true(fd >= 0);
    assert_int_equal(write(fd, text, strlen(text)), (ssize_t) strlen(text));
    close(fd);
    struct dataset_format f = {.kind = DATASET_ALPACA};
    struct dataset_texts dt;
    struct moai_err err = {0};
    if (dataset_load_format(&dt, path, &f, -1, &err) < 0)
        fail_msg("%s", err.msg);
    unlink(path);
    assert_int_equal(dt.n, 2);
    assert_string_equal(dataset_text(&dt, 0),
                        "Below is an instruction that describes a task, paired with an input that "
                        "provides further context. Write a response that appropriately completes "
                        "the request.\n\n### Instruction:\nAdd.\n\n### Input:\n1 2\n\n"
                        "### Response:\n3");
    assert_string_equal(dataset_text(&dt, 1),
                        "Below is an instruction that describes a task. Write a response that "
                        "appropriately completes the request.\n\n### Instruction:\nGreet.\n\n"
                        "### Response:\nHi");
    assert_int_equal(dataset_text_ntrain(&dt, 1), 1);
    assert_int_equal(dataset_text_train(&dt, 1)[0], dataset_text_len(&dt, 1) - 2);
    assert_int_equal(dataset_text_train(&dt, 1)[1], dataset_text_len(&dt, 1));
    dataset_texts_release(&dt);
}

/* A parser's error that quotes the input (a raw newline after a backslash, found by
 * fuzz_tokenizer) still makes a one-line message. */
static void test_tokenizer_json_error_is_one_line(void **state)
{
    (void) state;
    static const char text[] = "{\"pre_tokenize5\\\n\": 1}";
    struct moai_err err = {0};
    assert_null(bpe_load_json_mem("t.json", text, sizeof(text) - 1, NULL, 0, &err));
    assert_string_equal(err.msg,
                        "t.json:2:0: invalid JSON: invalid escape near '\"pre_tokenize5\\?'");
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_tokenizer_tiktoken_merges_and_specials),
        cmocka_unit_test(test_tokenizer_invalid_utf8),
        cmocka_unit_test(test_tokenizer_json_byte_level),
        cmocka_unit_test(test_tokenizer_json_digits),
        cmocka_unit_test(test_tokenizer_load_directory),
        cmocka_unit_test(test_tokenizer_bad_files),
        cmocka_unit_test(test_tokenizer_chat_templates),
        cmocka_unit_test(test_tokenizer_chat_errors),
        cmocka_unit_test(test_tokenizer_alpaca),
        cmocka_unit_test(test_tokenizer_json_error_is_one_line),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
