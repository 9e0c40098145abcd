/* fuzz_config.c - libFuzzer harness: config.json parsing and checks on arbitrary bytes, then
 * the parameter count and the tensor list of every accepted config. */
#include "model/config.h"
#include "model/tensors.h"

#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    json_error_t jerr;
    json_t *root = json_loadb((const char *) data, size, JSON_REJECT_DUPLICATES, &jerr);
    struct model_config cfg, again;
    struct moai_err err = {0};

    if (!root)
        return 0;
    if (model_config_from_json(&cfg, root, "fuzz.json", &err) == 0) {
        int64_t params = model_param_count(&cfg), next = 0, n = model_tensor_count(&cfg);
        if (params <= 0 || params > MODEL_MAX_PARAMS)
            abort();
        /* the list tiles the arena: check the first and last few tensors */
        for (int64_t i = 0; i < n; i++) {
            if (i == 32 && n > 64)
                i = n - 32, next = -1;
            struct model_tensor t, u;
            model_tensor_at(&t, &cfg, i);
            if ((next >= 0 && t.offset != next) || model_tensor_find(&u, &cfg, t.name) != i)
                abort();
            next = t.offset + t.numel;
        }
        if (next != params)
            abort();
        /* as inline overrides standing alone, the same config */
        if (model_config_load(&again, NULL, root, &err) != 0 ||
            model_param_count(&again) != params || again.head_dim != cfg.head_dim)
            abort();
        json_t *out = model_config_to_json(&cfg);
        if (!out || model_config_from_json(&again, out, "fuzz.json", &err) != 0 ||
            model_param_count(&again) != params)
            abort(); /* what is written reads back */
        json_decref(out);
    }
    json_decref(root);
    return 0;
}
