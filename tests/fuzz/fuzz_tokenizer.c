/* fuzz_tokenizer.c - libFuzzer harness: tokenizer.json and tiktoken parsing on arbitrary bytes,
 * then encoding a fixed text and the input itself (as text, when it is UTF-8) with every
 * tokenizer that loads. The first byte picks the parser: even tokenizer.json, odd tiktoken. */
#include "data/bpe.h"

#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

static void encode_check(const struct bpe *b, const char *text, size_t len)
{
    int32_t ids[256];
    size_t n = 0, before = 0;
    struct moai_err err = {0};
    if (bpe_encode(b, text, len, NULL, 0, len / 2, ids, 256, &n, &before, &err) < 0)
        return;
    if (before > n)
        abort();
    for (size_t i = 0; i < n && i < 256; i++)
        if (ids[i] < 0 || ids[i] >= bpe_vocab_size(b))
            abort();
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    struct moai_err err = {0};
    struct bpe *b;
    if (size < 1)
        return 0;
    const char *text = (const char *) data + 1;
    if (data[0] & 1)
        b = bpe_load_tiktoken_mem("fuzz.tiktoken", text, size - 1, &err);
    else
        b = bpe_load_json_mem("fuzz.json", text, size - 1, NULL, 0, &err);
    if (!b) {
        if (!err.msg[0] || strchr(err.msg, '\n'))
            abort();
        return 0;
    }
    static const char sample[] = "Hello, world! It's 2026: caf\xc3\xa9 \xe6\xbc\xa2\xe5\xad\x97 "
                                 "<|begin_of_text|>   \n\n x";
    encode_check(b, sample, sizeof(sample) - 1);
    encode_check(b, text, size - 1);
    bpe_free(b);
    return 0;
}
