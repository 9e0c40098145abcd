/* fuzz_safetensors.c - libFuzzer harness: the safetensors header checks (st_parse) on arbitrary
 * bytes, then every accepted tensor converted to fp32 (reading all of its bytes). */
#include "model/safetensors.h"

#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    struct st_file f;
    struct moai_err err = {0};

    /* A copy of exactly size bytes, so that ASan sees any read past the end. */
    uint8_t *copy = malloc(size ? size : 1);
    if (!copy)
        return 0;
    memcpy(copy, data, size);
    if (st_parse(&f, copy, size, "fuzz.safetensors", &err) == 0) {
        for (int i = 0; i < f.ntensors; i++) {
            const struct st_tensor *t = &f.tensors[i];
            if (st_find(&f, t->name) != t)
                abort(); /* names are unique */
            if (t->data < copy || t->nbytes > size || t->data + t->nbytes > copy + size)
                abort(); /* every accepted tensor lies inside the input */
            if (t->numel > (1 << 20))
                continue;
            float *out = malloc((size_t) t->numel * sizeof(float) + 1);
            if (out)
                st_to_f32(t, out, &err);
            free(out);
        }
        st_close(&f);
    }
    free(copy);
    return 0;
}
