/* test_peft.c - LoRA adapter directories in PEFT's format: written, read back bit for bit,
 * read by an independent reader of the layout (Python's standard library), and every bad
 * adapter_config.json or adapter_model.safetensors with its expected error line. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <cmocka.h>

#include "model/config.h"
#include "model/llama.h"
#include "model/lora.h"
#include "model/peft.h"
#include "model/safetensors.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#define MODEL "models/tiny-llama"

static char tmp[512];

static int setup(void **state)
{
    (void) state;
    const char *base = getenv("TMPDIR");
    snprintf(tmp, sizeof(tmp), "%s/moai-peft-XXXXXX", base && *base ? base : "/tmp");
    return mkdtemp(tmp) ? 0 : -1;
}

static int teardown(void **state)
{
    (void) state;
    char cmd[600];
    snprintf(cmd, sizeof(cmd), "rm -rf '%s'", tmp);
    return system(cmd) == 0 ? 0 : -1;
}

static void write_text(const char *name, const char *text)
{
    char path[700];
    snprintf(path, sizeof(path), "%s/%s", tmp, name);
    FILE *f = fopen(path, "w");
    assert_non_null(f);
    fputs(text, f);
    fclose(f);
}

/* The tiny model's config and adapters of lc with distinct values. */
static void adapters(struct model_config *cfg, struct lora_params *a, const struct lora_config *lc)
{
    struct moai_err err = {0};
    assert_int_equal(model_config_load(cfg, MODEL "/config.json", NULL, &err), 0);
    assert_int_equal(lora_params_init(a, cfg, lc->rank, lc->targets, 0, NULL, &err), 0);
    lora_init_peft(a, cfg, cfg, 0, lc->rank, lc->targets, lc->seed);
    for (int64_t i = 0; i < a->nfloats; i++) /* B too, and every value distinct */
        a->arena[i] += (float) i * 1e-6f;
}

static void save(const struct lora_params *a, const struct model_config *cfg,
                 const struct lora_config *lc)
{
    char path[700];
    struct moai_err err = {0};
    json_t *c = peft_config_json(lc, MODEL);
    snprintf(path, sizeof(path), "%s/%s", tmp, PEFT_CONFIG);
    assert_int_equal(json_dump_file(c, path, JSON_INDENT(2)), 0);
    json_decref(c);
    snprintf(path, sizeof(path), "%s/%s", tmp, PEFT_WEIGHTS);
    assert_int_equal(peft_write_weights(path, a, cfg, lc, &err), 0);
}

static void test_peft_round_trip(void **state)
{
    (void) state;
    struct lora_config lc = {
        8, 16.0, 0.05, (1u << MODEL_LORA_wq) | (1u << MODEL_LORA_wv) | (1u << MODEL_LORA_w_down),
        42};
    struct model_config cfg;
    struct lora_params a, b;
    struct moai_err err = {0};
    adapters(&cfg, &a, &lc);
    save(&a, &cfg, &lc);

    struct lora_config back = {.seed = 9};
    assert_int_equal(peft_read_config(tmp, &back, &err), 0);
    assert_int_equal(back.rank, 8);
    assert_true(back.alpha == 16.0 && back.dropout == 0.05);
    assert_int_equal(back.targets, lc.targets);
    assert_int_equal(back.seed, 9);
    assert_int_equal(lora_params_init(&b, &cfg, back.rank, back.targets, 0, NULL, &err), 0);
    assert_int_equal(peft_read_weights(tmp, &b, &cfg, &back, &err), 0);
    assert_memory_equal(a.arena, b.arena, sizeof(float) * (size_t) a.nfloats);

    /* the safetensors file: PEFT's names in the layers' order, F32 */
    char path[700];
    struct st_file f;
    snprintf(path, sizeof(path), "%s/%s", tmp, PEFT_WEIGHTS);
    assert_int_equal(st_open(&f, path, &err), 0);
    assert_int_equal(f.ntensors, 4 * 3 * 2);
    assert_string_equal(f.tensors[0].name,
                        "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight");
    assert_string_equal(f.tensors[23].name,
                        "base_model.model.model.layers.3.mlp.down_proj.lora_B.weight");
    assert_int_equal(f.tensors[23].shape[0], 256);
    assert_int_equal(f.tensors[23].shape[1], 8);
    assert_int_equal(f.tensors[0].dtype, ST_F32);
    st_close(&f);

    /* a recipe's rank that differs: the model's adapter has other shapes */
    struct lora_config other = back;
    other.rank = 4;
    struct lora_params c;
    assert_int_equal(lora_params_init(&c, &cfg, 4, other.targets, 0, NULL, &err), 0);
    assert_int_equal(peft_read_weights(tmp, &c, &cfg, &other, &err), MOAI_EIO);
    assert_non_null(strstr(err.msg, "adapter_model.safetensors: tensor "
                                    "'base_model.model.model.layers.0.self_attn.q_proj.lora_A."
                                    "weight' has shape [8, 256], the model's adapter [4, 256]"));
    lora_params_release(&c);
    /* fewer targets than the file holds */
    other = back;
    other.targets = 1u << MODEL_LORA_wq;
    assert_int_equal(lora_params_init(&c, &cfg, 8, other.targets, 0, NULL, &err), 0);
    assert_int_equal(peft_read_weights(tmp, &c, &cfg, &other, &err), MOAI_EIO);
    assert_non_null(strstr(err.msg, "adapter_model.safetensors: tensor "
                                    "'base_model.model.model.layers.0.self_attn.v_proj.lora_A."
                                    "weight' is not an adapter of this model's layers and "
                                    "target_modules"));
    lora_params_release(&c);
    lora_params_release(&b);
    lora_params_release(&a);
}

/* An independent reader of PEFT's layout (Python's standard library) reads the directory:
 * the config's keys, every tensor's name and shape, and the values the C side wrote. Skipped
 * without python3. */
static void test_peft_python_reader(void **state)
{
    (void) state;
    if (system("python3 -c 'import json, struct' 2>/dev/null") != 0)
        skip();
    struct lora_config lc = {4, 8.0, 0.0, MODEL_LORA_ALL, 7};
    struct model_config cfg;
    struct lora_params a;
    adapters(&cfg, &a, &lc);
    save(&a, &cfg, &lc);
    char cmd[800], line[512];
    snprintf(cmd, sizeof(cmd), "python3 tests/peft_check.py '%s' " MODEL "/config.json", tmp);
    FILE *p = popen(cmd, "r");
    assert_non_null(p);
    assert_non_null(fgets(line, sizeof(line), p));
    assert_string_equal(line, "4 8.0 0.0 q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,"
                              "down_proj\n");
    int64_t k = 0;
    while (fgets(line, sizeof(line), p)) {
        struct llama_tensor t;
        char name[160], shape[32];
        double first, last;
        lora_tensor_at(&t, &a, &cfg, lc.rank, lc.targets, k++);
        assert_int_equal(sscanf(line, "%159s %31s %lf %lf", name, shape, &first, &last), 4);
        assert_string_equal(name, t.name);
        char want[32];
        snprintf(want, sizeof(want), "%lldx%lld", (long long) t.shape[0], (long long) t.shape[1]);
        assert_string_equal(shape, want);
        assert_true((float) first == t.data[0] && (float) last == t.data[t.numel - 1]);
    }
    assert_int_equal(pclose(p), 0);
    assert_int_equal(k, lora_tensor_count(&cfg, lc.targets));
    lora_params_release(&a);
}

static void test_peft_bad_configs(void **state)
{
    (void) state;
    static const struct {
        const char *json, *msg;
    } bad[] = {
        {"{\"peft_type\": \"PREFIX_TUNING\", \"r\": 8}", "'peft_type' must be \"LORA\""},
        {"{\"peft_type\": \"LORA\", \"r\": 0, \"lora_alpha\": 8, \"target_modules\": "
         "[\"q_proj\"]}",
         "'r' must be an integer in [1, 4096]"},
        {"{\"peft_type\": \"LORA\", \"r\": 8, \"target_modules\": [\"q_proj\"]}",
         "'lora_alpha' must be a number > 0"},
        {"{\"peft_type\": \"LORA\", \"r\": 8, \"lora_alpha\": 8, \"lora_dropout\": 1.5, "
         "\"target_modules\": [\"q_proj\"]}",
         "'lora_dropout' must be a number in [0, 1)"},
        {"{\"peft_type\": \"LORA\", \"r\": 8, \"lora_alpha\": 8, \"bias\": \"all\", "
         "\"target_modules\": [\"q_proj\"]}",
         "'bias' must be \"none\" (LoRA biases are not supported)"},
        {"{\"peft_type\": \"LORA\", \"r\": 8, \"lora_alpha\": 8, \"use_dora\": true, "
         "\"target_modules\": [\"q_proj\"]}",
         "'use_dora' is not supported (it must be false)"},
        {"{\"peft_type\": \"LORA\", \"r\": 8, \"lora_alpha\": 8, \"target_modules\": "
         "[\"q_proj\", \"lm_head\"]}",
         "'target_modules' names 'lm_head', not a projection of a Llama layer (q_proj, k_proj, "
         "v_proj, o_proj, gate_proj, up_proj, down_proj)"},
        {"{\"peft_type\": \"LORA\", \"r\": 8, \"lora_alpha\": 8}",
         "'target_modules' must be a list of names"},
    };
    struct moai_err err = {0};
    struct lora_config lc;
    char want[700];
    for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++) {
        write_text(PEFT_CONFIG, bad[i].json);
        assert_int_equal(peft_read_config(tmp, &lc, &err), MOAI_EIO);
        snprintf(want, sizeof(want), "%s/%s: %s", tmp, PEFT_CONFIG, bad[i].msg);
        assert_string_equal(err.msg, want);
    }
    /* PEFT's other spellings of the targets */
    write_text(PEFT_CONFIG, "{\"peft_type\": \"LORA\", \"r\": 2, \"lora_alpha\": 4, "
                            "\"target_modules\": \"all-linear\"}");
    assert_int_equal(peft_read_config(tmp, &lc, &err), 0);
    assert_int_equal(lc.targets, MODEL_LORA_ALL);
    assert_true(lc.dropout == 0.0);
    write_text(PEFT_CONFIG, "{\"peft_type\": \"LORA\", \"r\": 2, \"lora_alpha\": 4, "
                            "\"target_modules\": \"v_proj\"}");
    assert_int_equal(peft_read_config(tmp, &lc, &err), 0);
    assert_int_equal(lc.targets, 1u << MODEL_LORA_wv);
    /* no file */
    char missing[700];
    snprintf(missing, sizeof(missing), "%s/none", tmp);
    assert_int_equal(peft_read_config(missing, &lc, &err), MOAI_EIO);
    assert_non_null(strstr(err.msg, "none/adapter_config.json: unable to open"));
}

/* The moments of an exact resume: written and read back bit for bit, a missing one named. */
static void test_peft_moments(void **state)
{
    (void) state;
    struct lora_config lc = {2, 4.0, 0.0, (1u << MODEL_LORA_wo) | (1u << MODEL_LORA_w_up), 1};
    struct model_config cfg;
    struct lora_params m1, m2, r1, r2, other;
    struct moai_err err = {0};
    char path[700];
    adapters(&cfg, &m1, &lc);
    adapters(&cfg, &m2, &lc);
    for (int64_t i = 0; i < m2.nfloats; i++)
        m2.arena[i] = (float) i * 0.25f;
    snprintf(path, sizeof(path), "%s/optimizer.safetensors", tmp);
    assert_int_equal(peft_write_moments(path, &m1, &m2, &cfg, &lc, &err), 0);
    assert_int_equal(lora_params_init(&r1, &cfg, 2, lc.targets, 0, NULL, &err), 0);
    assert_int_equal(lora_params_init(&r2, &cfg, 2, lc.targets, 0, NULL, &err), 0);
    assert_int_equal(peft_read_moments(path, &r1, &r2, &cfg, &lc, &err), 0);
    assert_memory_equal(m1.arena, r1.arena, sizeof(float) * (size_t) m1.nfloats);
    assert_memory_equal(m2.arena, r2.arena, sizeof(float) * (size_t) m2.nfloats);
    struct lora_config more = lc;
    more.targets |= 1u << MODEL_LORA_wq;
    assert_int_equal(lora_params_init(&other, &cfg, 2, more.targets, 0, NULL, &err), 0);
    assert_int_equal(peft_read_moments(path, &other, &other, &cfg, &more, &err), MOAI_EIO);
    char want[800];
    snprintf(want, sizeof(want),
             "%s: tensor 'base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight.exp_avg' "
             "is missing or not of shape [2, 256]",
             path);
    assert_string_equal(err.msg, want);
    lora_params_release(&other);
    lora_params_release(&r2);
    lora_params_release(&r1);
    lora_params_release(&m2);
    lora_params_release(&m1);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test_setup_teardown(test_peft_round_trip, setup, teardown),
        cmocka_unit_test_setup_teardown(test_peft_python_reader, setup, teardown),
        cmocka_unit_test_setup_teardown(test_peft_bad_configs, setup, teardown),
        cmocka_unit_test_setup_teardown(test_peft_moments, setup, teardown),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
