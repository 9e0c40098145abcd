/* fuzz_config.c - libFuzzer harness: config.json parsing and checks on arbitrary bytes. */
#include "model/config.h"

#include <stddef.h>
#include <stdint.h>

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    json_error_t jerr;
    json_t *root = json_loadb((const char *) data, size, JSON_REJECT_DUPLICATES, &jerr);
    struct model_config cfg;
    struct moai_err err = {0};

    if (!root)
        return 0;
    if (model_config_from_json(&cfg, root, "fuzz.json", &err) == 0) {
        (void) model_param_count(&cfg);
        json_decref(model_config_to_json(&cfg));
    }
    json_decref(root);
    return 0;
}
