/* fuzz_recipe.c - libFuzzer harness: recipe_load_string on arbitrary bytes must return 0 or
 * a clean error, never crash, leak or read out of bounds. */
#include "recipe.h"

#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    static const char *const sets[] = {"training.batch_size=8"};
    struct recipe_overrides ov = {.sets = sets, .nsets = (int) (size & 1), .ap = -1};
    struct recipe r;
    struct moai_err err = {0};

    if (recipe_load_string(&r, (const char *) data, size, "fuzz.yaml", &ov, &err) == 0)
        recipe_release(&r);
    return 0;
}
