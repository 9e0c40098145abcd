/* fuzz_safetensors.c - libFuzzer harness: the safetensors header checks on arbitrary bytes. */
#include "model/safetensors.h"

#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    struct st_file f = {0};
    struct moai_err err = {0};
    if (st_parse(&f, data, size, "fuzz.safetensors", &err) == 0 && f.ntensors > 0) {
        float *out = malloc((size_t) f.tensors[0].numel * sizeof(float) + 1);
        if (out && f.tensors[0].numel < (1 << 20))
            st_to_f32(&f.tensors[0], out, &err);
        free(out);
    }
    st_close(&f);
    return 0;
}
