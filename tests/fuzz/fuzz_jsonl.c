/* fuzz_jsonl.c - libFuzzer harness: dataset_load_mem (JSON Lines, plain or zstd, template
 * filling) on arbitrary bytes must load consistent texts or return a clean error, never
 * crash, leak or read out of bounds. The first byte picks a template. */
#include "data/dataset.h"

#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    static const char *const templates[][2] = {
        {"[SUMMARIZE] {article} [/SUMMARIZE]\n{highlights}", NULL},
        {"[SUMMARIZE] {article} [/SUMMARIZE]\n{highlights}", "[/SUMMARIZE]\n"},
        {"{{{a}}}", NULL},
        {"Q: {q}\nA: {a}", "\nA: "},
    };
    struct dataset_texts dt;
    struct moai_err err = {0};
    if (size == 0)
        return 0;
    const char *const *t = templates[data[0] % 4];
    int64_t limit = data[0] >= 128 ? 3 : -1;
    if (dataset_load_mem(&dt, "fuzz.jsonl", data + 1, size - 1, t[0], t[1], limit, &err) == 0) {
        if (dt.n < 1 || (limit > 0 && dt.n > limit))
            abort();
        for (int64_t i = 0; i < dt.n; i++) {
            size_t len = dataset_text_len(&dt, i);
            if (dt.off[i + 1] < dt.off[i] || dataset_text(&dt, i)[len] != '\0')
                abort();
            if (t[1] && dt.resp_end[i] > len)
                abort();
        }
        dataset_texts_release(&dt);
    } else if (err.msg[0] == '\0' || err.code >= 0) {
        abort();
    }
    return 0;
}
