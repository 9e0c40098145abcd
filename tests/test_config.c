/* test_config.c - config.json reading, checks and exact parameter counts. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <cmocka.h>

#include "model/config.h"

#include <dirent.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static void test_config_published_parameter_counts(void **state)
{
    (void) state;
    static const struct {
        const char *dir;
        int64_t params;
        const char *arch;
    } cases[] = {
        {"llama2-7b", 6738415616LL, "LlamaForCausalLM"},
        {"llama2-13b", 13015864320LL, "LlamaForCausalLM"}, /* the source documents' figure */
        {"llama2-70b", 68976648192LL, "LlamaForCausalLM"},
        {"llama3-8b", 8030261248LL, "LlamaForCausalLM"},
        {"llama3-70b", 70553706496LL, "LlamaForCausalLM"},
        {"mistral-7b", 7248023552LL, "MistralForCausalLM"},
    };
    for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
        char path[256];
        struct model_config cfg;
        struct moai_err err = {0};
        snprintf(path, sizeof(path), "configs/models/%s/config.json", cases[i].dir);
        assert_int_equal(model_config_load(&cfg, path, NULL, &err), 0);
        assert_int_equal(model_param_count(&cfg), cases[i].params);
        assert_string_equal(cfg.architecture, cases[i].arch);
        assert_string_equal(cfg.name, cases[i].dir);
    }
}

static void test_config_fields_and_defaults(void **state)
{
    (void) state;
    struct model_config cfg;
    struct moai_err err = {0};
    assert_int_equal(model_config_load(&cfg, "configs/models/llama3-8b/config.json", NULL, &err),
                     0);
    assert_int_equal(cfg.hidden_size, 4096);
    assert_int_equal(cfg.num_key_value_heads, 8);
    assert_int_equal(cfg.head_dim, 128);
    assert_int_equal(cfg.vocab_size, 128256);
    assert_true(cfg.rope_theta == 500000.0);
    assert_true(cfg.rms_norm_eps == 1e-5);
    assert_int_equal(cfg.bos_token_id, 128000);
    assert_int_equal(cfg.eos_token_id, 128001);
    assert_int_equal(cfg.pad_token_id, -1);
    assert_false(cfg.tie_word_embeddings);
    assert_string_equal(cfg.torch_dtype, "bfloat16");
    /* Per layer: 2 norms + q, k, v, o + gate, up, down. */
    assert_int_equal(model_layer_param_count(&cfg),
                     2 * 4096 + (32 + 2 * 8) * 128 * 4096 + 4096 * 4096 + 3 * 14336 * 4096);

    /* Inline keys only, with HF's defaults and a llama3 rope scaling and an eos list. */
    json_t *o = json_pack("{s:i, s:i, s:i, s:i, s:i, s:b, s:[i,i], s:{s:s, s:f, s:f, s:f, s:i}}",
                          "hidden_size", 64, "intermediate_size", 96, "num_hidden_layers", 2,
                          "num_attention_heads", 4, "vocab_size", 50, "tie_word_embeddings", 1,
                          "eos_token_id", 7, 8, "rope_scaling", "rope_type", "llama3", "factor",
                          8.0, "low_freq_factor", 1.0, "high_freq_factor", 4.0,
                          "original_max_position_embeddings", 16);
    assert_int_equal(model_config_load(&cfg, NULL, o, &err), 0);
    assert_string_equal(cfg.architecture, "LlamaForCausalLM");
    assert_int_equal(cfg.num_key_value_heads, 4);
    assert_int_equal(cfg.head_dim, 16);
    assert_int_equal(cfg.eos_token_id, 7);
    assert_int_equal(cfg.bos_token_id, 1);
    assert_true(cfg.rms_norm_eps == 1e-6);
    assert_int_equal(cfg.rope_scaling.type, ROPE_SCALING_LLAMA3);
    assert_int_equal(cfg.rope_scaling.original_max_position_embeddings, 16);
    assert_int_equal(model_param_count(&cfg),
                     50 * 64 + 2 * (2 * 64 + 3 * 64 * 64 + 64 * 64 + 3 * 96 * 64) + 64);
    json_decref(o);

    /* Overrides win over the file. */
    o = json_pack("{s:i}", "num_hidden_layers", 2);
    assert_int_equal(model_config_load(&cfg, "configs/models/llama2-7b/config.json", o, &err), 0);
    assert_int_equal(cfg.num_hidden_layers, 2);
    json_decref(o);

    /* The JSON written back reads to the same config. */
    struct model_config back;
    json_t *j = model_config_to_json(&cfg);
    assert_int_equal(model_config_from_json(&back, j, "x", &err), 0);
    assert_int_equal(model_param_count(&back), model_param_count(&cfg));
    assert_int_equal(back.num_key_value_heads, cfg.num_key_value_heads);
    json_decref(j);
}

static char *read_line(const char *path)
{
    static char buf[1024];
    FILE *f = fopen(path, "r");
    if (!f || !fgets(buf, sizeof(buf), f)) {
        if (f)
            fclose(f);
        return NULL;
    }
    fclose(f);
    buf[strcspn(buf, "\n")] = '\0';
    return buf;
}

static void test_config_bad_files(void **state)
{
    (void) state;
    const char *dir = "tests/data/bad/config";
    DIR *d = opendir(dir);
    struct dirent *e;
    int n = 0;
    assert_non_null(d);
    while ((e = readdir(d))) {
        size_t len = strlen(e->d_name);
        if (len < 6 || strcmp(e->d_name + len - 5, ".json"))
            continue;
        char path[512], expected[512];
        snprintf(path, sizeof(path), "%s/%s", dir, e->d_name);
        snprintf(expected, sizeof(expected), "%s/%.*s.expected", dir, (int) (len - 5), e->d_name);
        struct model_config cfg;
        struct moai_err err = {0};
        assert_true(model_config_load(&cfg, path, NULL, &err) < 0);
        const char *want = read_line(expected);
        if (!want || strcmp(want, err.msg)) {
            print_error("%s: expected '%s', got '%s'\n", path, want ? want : "(no .expected)",
                        err.msg);
            fail();
        }
        n++;
    }
    closedir(d);
    assert_true(n >= 8);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_config_published_parameter_counts),
        cmocka_unit_test(test_config_fields_and_defaults),
        cmocka_unit_test(test_config_bad_files),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
