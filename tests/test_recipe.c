/* test_recipe.c - recipe loading: defaults, types, overrides, flavors, the AP switch. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <cmocka.h>

#include "model/layout.h"
#include "recipe.h"

#include <stdlib.h>
#include <string.h>

static const char base[] = "model:\n  path: models/tiny-llama\n"
                           "dataset:\n  path: data.jsonl\n";

static int load(struct recipe *r, const char *text, const char *const *sets, int nsets, int ap,
                struct moai_err *err)
{
    struct recipe_overrides ov = {.sets = sets, .nsets = nsets, .ap = ap};
    return recipe_load_string(r, text, strlen(text), "t.yaml", &ov, err);
}

static void test_recipe_defaults(void **state)
{
    (void) state;
    struct recipe r;
    struct moai_err err = {0};
    unsetenv("MOAI_ENABLE_ADVANCED_PARALLELIZATION");
    assert_int_equal(load(&r, base, NULL, 0, -1, &err), 0);
    assert_string_equal(r.model.path, "models/tiny-llama");
    assert_int_equal(r.model.init, MODEL_INIT_PRETRAINED);
    assert_string_equal(r.tokenizer, "models/tiny-llama/tokenizer.model");
    assert_string_equal(r.dataset.template, "[SUMMARIZE] {article} [/SUMMARIZE]\n{highlights}");
    assert_null(r.dataset.response_start);
    assert_int_equal(r.dataset.limit, RECIPE_NONE);
    assert_true(r.dataset.shuffle);
    assert_int_equal(r.training.batch_size, 16);
    assert_int_equal(r.training.block_size, 1024);
    assert_int_equal(r.training.epochs, 1);
    assert_int_equal(r.training.max_steps, RECIPE_NONE);
    assert_true(r.training.lr == 1.0e-5);
    assert_true(r.training.betas[0] == 0.9 && r.training.betas[1] == 0.999);
    assert_true(r.training.eps == 1.0e-8);
    assert_true(r.training.grad_clip == 1.0);
    assert_int_equal(r.training.precision, PRECISION_BF16);
    assert_int_equal(r.training.seed, 42);
    assert_int_equal(r.training.log_interval, 2);
    assert_string_equal(r.training.save_dir, "outputs/t"); /* the recipe's own */
    assert_int_equal(r.training.save_interval, RECIPE_NONE);
    assert_string_equal(r.training.resume, "auto");
    assert_string_equal(r.flavor.name, "4xlarge.2048gb");
    assert_int_equal(r.flavor.devices, 32);
    assert_true(r.parallel.advanced);
    assert_int_equal(r.parallel.dp, RECIPE_AUTO);
    assert_int_equal(r.parallel.num_micro_batches, RECIPE_AUTO);
    assert_int_equal(r.parallel.recomputation, RECOMPUTE_AUTO);
    assert_int_equal(r.parallel.distribute_param, RECIPE_AUTO);
    recipe_release(&r);
}

static void test_recipe_values(void **state)
{
    (void) state;
    static const char text[] =
        "model:\n  path: m\n  init: random\n  config: {num_hidden_layers: 2, rope_theta: 5.0e5,"
        " name: \"x\", tie_word_embeddings: true}\n"
        "tokenizer: tok.model\n"
        "dataset:\n  path: d.jsonl\n  template: \"{a} {{b}}\"\n  response_start: \"[/S]\"\n"
        "  limit: 100\n  shuffle: false\n  validation_fraction: 0.1\n  cache_dir: /tmp/c\n"
        "training:\n  batch_size: 64\n  block_size: 512\n  epochs: 3\n  max_steps: 1000\n"
        "  lr: 2e-6\n  lr_schedule: cosine\n  warmup_steps: 10\n  weight_decay: 0.01\n"
        "  betas: [0.8, 0.95]\n  eps: 1e-6\n  grad_clip: 0\n  precision: fp32\n  seed: 7\n"
        "  log_interval: 1\n  save_dir: out\n  save_interval: 50\n  resume: never\n"
        "flavor: 8XLarge.4096GB\n"
        "parallel:\n  advanced: false\n  dp: 4\n  pp: 2\n  tp: auto\n  num_micro_batches: 8\n"
        "  recomputation: selective\n  distribute_param: true\n"
        "  distribute_low_prec_param: false\n";
    struct recipe r;
    struct moai_err err = {0};
    unsetenv("MOAI_ENABLE_ADVANCED_PARALLELIZATION");
    assert_int_equal(load(&r, text, NULL, 0, -1, &err), 0);
    assert_int_equal(r.model.init, MODEL_INIT_RANDOM);
    assert_int_equal(json_integer_value(json_object_get(r.model.config, "num_hidden_layers")), 2);
    assert_true(json_real_value(json_object_get(r.model.config, "rope_theta")) == 5.0e5);
    assert_true(json_is_string(json_object_get(r.model.config, "name")));
    assert_true(json_is_true(json_object_get(r.model.config, "tie_word_embeddings")));
    assert_string_equal(r.tokenizer, "tok.model");
    assert_string_equal(r.dataset.template, "{a} {{b}}");
    assert_string_equal(r.dataset.response_start, "[/S]");
    assert_int_equal(r.dataset.limit, 100);
    assert_false(r.dataset.shuffle);
    assert_true(r.dataset.validation_fraction == 0.1);
    assert_string_equal(r.dataset.cache_dir, "/tmp/c");
    assert_int_equal(r.training.batch_size, 64);
    assert_int_equal(r.training.max_steps, 1000);
    assert_true(r.training.lr == 2e-6);
    assert_int_equal(r.training.lr_schedule, LR_SCHEDULE_COSINE);
    assert_true(r.training.betas[0] == 0.8 && r.training.betas[1] == 0.95);
    assert_true(r.training.grad_clip == 0.0);
    assert_int_equal(r.training.precision, PRECISION_FP32);
    assert_int_equal(r.training.seed, 7);
    assert_int_equal(r.training.save_interval, 50);
    assert_string_equal(r.training.resume, "never");
    assert_string_equal(r.flavor.name, "8xlarge.4096gb");
    assert_int_equal(r.flavor.devices, 64);
    assert_false(r.parallel.advanced);
    assert_int_equal(r.parallel.dp, 4);
    assert_int_equal(r.parallel.pp, 2);
    assert_int_equal(r.parallel.tp, RECIPE_AUTO);
    assert_int_equal(r.parallel.num_micro_batches, 8);
    assert_int_equal(r.parallel.recomputation, RECOMPUTE_SELECTIVE);
    assert_int_equal(r.parallel.distribute_param, 1);
    assert_int_equal(r.parallel.distribute_low_prec_param, 0);

    /* Every key survives the trip to JSON (trainer_state.json, plan.json). */
    json_t *j = recipe_to_json(&r);
    assert_int_equal(
        json_integer_value(json_object_get(json_object_get(j, "training"), "batch_size")), 64);
    assert_string_equal(json_string_value(json_object_get(j, "flavor")), "8xlarge.4096gb");
    assert_string_equal(
        json_string_value(json_object_get(json_object_get(j, "parallel"), "recomputation")),
        "selective");
    assert_true(json_is_null(json_object_get(json_object_get(j, "parallel"), "tp")) == 0);
    json_decref(j);
    recipe_release(&r);
}

static void test_recipe_set_overrides(void **state)
{
    (void) state;
    const char *sets[] = {"training.batch_size=64",
                          "flavor={device: cpu, devices: 4, "
                          "memory_gb: 0.0625}",
                          "parallel.recomputation=full", "dataset.limit=null",
                          "model.config.vocab_size=512"};
    struct recipe r;
    struct moai_err err = {0};
    assert_int_equal(load(&r, base, sets, 5, -1, &err), 0);
    assert_int_equal(r.training.batch_size, 64);
    assert_true(r.flavor.custom);
    assert_string_equal(r.flavor.device.name, "cpu");
    assert_int_equal(r.flavor.devices, 4);
    assert_int_equal(r.flavor.device.memory_bytes, 64LL << 20);
    assert_int_equal(r.parallel.recomputation, RECOMPUTE_FULL);
    assert_int_equal(r.dataset.limit, RECIPE_NONE);
    assert_int_equal(json_integer_value(json_object_get(r.model.config, "vocab_size")), 512);
    recipe_release(&r);

    const char *bad[] = {"training.batch_size=big"};
    assert_int_equal(load(&r, base, bad, 1, -1, &err), MOAI_EUSAGE);
    assert_string_equal(err.msg, "--set training.batch_size=big: 'training.batch_size' must be "
                                 "an integer >= 1, not 'big'");
}

/* A string key takes the --set value as it is; the others read it as YAML. */
static void test_recipe_set_typed_by_schema(void **state)
{
    (void) state;
    const char *sets[] = {"dataset.response_start=### Answer:", "dataset.template=Q: {q}\nA: {a}",
                          "training.save_dir=runs/x # y", "training.lr=2e-3 # a comment"};
    struct recipe r;
    struct moai_err err = {0};
    assert_int_equal(load(&r, base, sets, 4, -1, &err), 0);
    assert_string_equal(r.dataset.response_start, "### Answer:");
    assert_string_equal(r.dataset.template, "Q: {q}\nA: {a}");
    assert_string_equal(r.training.save_dir, "runs/x # y");
    assert_true(r.training.lr == 2e-3);
    recipe_release(&r);

    const char *colon[] = {"dataset.response_start=Answer:", "tokenizer=null"};
    assert_int_equal(load(&r, base, colon, 2, -1, &err), 0);
    assert_string_equal(r.dataset.response_start, "Answer:");
    assert_string_equal(r.tokenizer, "null"); /* a file named null */
    recipe_release(&r);

    const char *quoted[] = {"dataset.template=\"Q: {q}\\nA: {a}\"", "dataset.response_start='#'"};
    assert_int_equal(load(&r, base, quoted, 2, -1, &err), 0);
    assert_string_equal(r.dataset.template, "Q: {q}\nA: {a}"); /* YAML's escape: a newline */
    assert_string_equal(r.dataset.response_start, "#");
    recipe_release(&r);

    const char *empty[] = {"dataset.response_start=### Answer:", "dataset.response_start="};
    assert_int_equal(load(&r, base, empty, 2, -1, &err), 0);
    assert_null(r.dataset.response_start); /* empty: null, the default */
    recipe_release(&r);

    const char *bad[] = {"training.betas=[0.9"};
    assert_int_equal(load(&r, base, bad, 1, -1, &err), MOAI_EUSAGE);
    assert_string_equal(err.msg, "--set training.betas=[0.9: the value is not valid YAML (did not "
                                 "find expected ',' or ']' while parsing a flow sequence)");
}

/* The default save_dir is outputs/<recipe name>. */
static void test_recipe_default_save_dir(void **state)
{
    (void) state;
    static const char text[] = "model: {path: m}\ndataset: {path: d}\n";
    static const struct {
        const char *source, *save_dir;
    } cases[] = {{"configs/llama3-8b.yaml", "outputs/llama3-8b"},
                 {"a.yml", "outputs/a"},
                 {"dir/r.json", "outputs/r"},
                 {"plain", "outputs/plain"},
                 {"<stdin>", "outputs/stdin"},
                 {"x/.yaml", "outputs/.yaml"}};
    for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
        struct recipe r;
        struct moai_err err = {0};
        assert_int_equal(recipe_load_string(&r, text, strlen(text), cases[i].source, NULL, &err),
                         0);
        assert_string_equal(r.training.save_dir, cases[i].save_dir);
        recipe_release(&r);
    }
}

static void test_recipe_ap_switch_precedence(void **state)
{
    (void) state;
    struct recipe r;
    struct moai_err err = {0};
    static const char off[] = "model: {path: m}\ndataset: {path: d}\nparallel: {advanced: false}\n";

    unsetenv("MOAI_ENABLE_ADVANCED_PARALLELIZATION");
    assert_int_equal(load(&r, off, NULL, 0, -1, &err), 0);
    assert_false(r.parallel.advanced);
    recipe_release(&r);

    setenv("MOAI_ENABLE_ADVANCED_PARALLELIZATION", "1", 1); /* the variable beats the recipe */
    assert_int_equal(load(&r, off, NULL, 0, -1, &err), 0);
    assert_true(r.parallel.advanced);
    recipe_release(&r);

    assert_int_equal(load(&r, off, NULL, 0, 0, &err), 0); /* the option beats the variable */
    assert_false(r.parallel.advanced);
    recipe_release(&r);

    setenv("MOAI_ENABLE_ADVANCED_PARALLELIZATION", "0", 1);
    assert_int_equal(load(&r, base, NULL, 0, 1, &err), 0);
    assert_true(r.parallel.advanced);
    recipe_release(&r);
    assert_int_equal(load(&r, base, NULL, 0, -1, &err), 0);
    assert_false(r.parallel.advanced);
    recipe_release(&r);

    setenv("MOAI_ENABLE_ADVANCED_PARALLELIZATION", "yes", 1);
    assert_int_equal(load(&r, base, NULL, 0, -1, &err), MOAI_EUSAGE);
    unsetenv("MOAI_ENABLE_ADVANCED_PARALLELIZATION");
}

static void test_recipe_errors(void **state)
{
    (void) state;
    static const struct {
        const char *text, *msg;
    } cases[] = {
        {"model: {path: m}\ndataset: {path: d}\ntraining: {batchsize: 3}\n",
         "t.yaml:3:12: unknown key 'batchsize' in 'training' (did you mean 'batch_size'?)"},
        {"model: {path: m}\ndataset: {path: d}\ntraining: {learning_rate: 3}\n",
         "t.yaml:3:12: unknown key 'learning_rate' in 'training' (did you mean 'training.lr'?)"},
        {"model: {path: m}\ndataset: {path: d}\nflavor: 4xlargee\n",
         "t.yaml:3:9: unknown flavor '4xlargee' (did you mean '4xlarge'?)"},
        {"model: {path: m}\ndataset: {path: d}\nflavor: 5xlarge\n",
         "t.yaml:3:9: unknown flavor '5xlarge' (valid: small.64gb, medium.128gb, large.256gb, "
         "xlarge.512gb, 1.5xlarge.768gb, 2xlarge.1024gb, 3xlarge.1536gb, 4xlarge.2048gb, "
         "6xlarge.3072gb, 8xlarge.4096gb, 12xlarge.6144gb, 24xlarge.12288gb, 48xlarge.24576gb)"},
        {"model: {path: m}\ndataset: {path: d}\ntraining: {eps: 0}\n",
         "t.yaml:3:17: 'training.eps' must be a number in (0, 1], not '0'"},
        {"model: {path: m}\ndataset: {path: d}\ntraining: {resume: ~}\n",
         "t.yaml:3:20: 'training.resume' must be a string, not null"},
        {"dataset: {path: d}\n", "t.yaml: missing key 'path' in 'model'"},
        {"model: {config: {hidden_size: 8}}\ndataset: {path: d}\n",
         "t.yaml:1:8: 'model.init' is pretrained but there is no 'model.path' to load weights "
         "from"},
        {"{", "t.yaml:2:1: invalid YAML: did not find expected node content while parsing a "
              "flow node"},
        {"a: &x [*x]\n", "t.yaml:1:4: invalid YAML: nested too deeply"},
    };
    for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
        struct recipe r;
        struct moai_err err = {0};
        assert_int_equal(load(&r, cases[i].text, NULL, 0, -1, &err), MOAI_EUSAGE);
        assert_string_equal(err.msg, cases[i].msg);
    }
}

static void test_recipe_alias_bomb_is_bounded(void **state)
{
    (void) state;
    /* Nine levels of ten-fold aliases would expand to 10^9 nodes. */
    char text[2048];
    size_t len = (size_t) snprintf(text, sizeof(text), "a0: &a0 [x,x,x,x,x,x,x,x,x,x]\n");
    for (int i = 1; i < 9; i++) {
        int p = i - 1;
        len += (size_t) snprintf(text + len, sizeof(text) - len,
                                 "a%d: &a%d [*a%d,*a%d,*a%d,*a%d,*a%d,*a%d,*a%d,*a%d,*a%d,*a%d]\n",
                                 i, i, p, p, p, p, p, p, p, p, p, p);
    }
    struct recipe r;
    struct moai_err err = {0};
    assert_int_equal(load(&r, text, NULL, 0, -1, &err), MOAI_EUSAGE);
    assert_non_null(strstr(err.msg, "too many nodes"));
}

static void test_recipe_flavors(void **state)
{
    (void) state;
    struct flavor f;
    struct moai_err err = {0};
    assert_int_equal(flavor_catalog_size(), 13);
    assert_int_equal(flavor_lookup(&f, "4xLarge.2048GB", &err), 0);
    assert_int_equal(f.devices, 32);
    assert_int_equal(f.devices_per_node, 8);
    assert_int_equal(flavor_nodes(&f), 4);
    assert_int_equal(f.device.memory_bytes, 68702699520LL);
    assert_true(f.device.tflops == 181.0);
    assert_int_equal(flavor_lookup(&f, "1.5XLARGE", &err), 0);
    assert_int_equal(f.devices, 12);
    assert_int_equal(flavor_nodes(&f), 2);
    assert_int_equal(flavor_lookup(&f, "small", &err), 0);
    assert_int_equal(f.devices, 1);
    assert_int_equal(f.devices_per_node, 1);
    assert_int_equal(flavor_lookup(&f, "48xlarge.24576gb", &err), 0);
    assert_int_equal(f.devices, 384);
    assert_int_equal(flavor_nodes(&f), 48);
    assert_int_equal(flavor_lookup(&f, "4xlarge.1024gb", &err), MOAI_EUSAGE);

    assert_int_equal(flavor_custom(&f, "H100-80GB", 64, 8, &err), 0);
    assert_int_equal(flavor_nodes(&f), 8);
    assert_true(f.device.tflops == 989.0);
    assert_int_equal(flavor_custom(&f, "cpu", 4, 0, &err), 0);
    assert_true(f.device.memory_bytes > 0);
    assert_int_equal(f.devices_per_node, 4);
    assert_int_equal(flavor_custom(&f, "tpu", 4, 0, &err), MOAI_EUSAGE);
}

static void test_recipe_custom_flavor_overrides(void **state)
{
    (void) state;
    static const char text[] = "model: {path: m}\ndataset: {path: d}\n"
                               "flavor: {device: h100-80gb, devices: 16, devices_per_node: 4,"
                               " memory_gb: 40, tflops: 500, inter_node_gbps: 12.5}\n";
    struct recipe r;
    struct moai_err err = {0};
    assert_int_equal(load(&r, text, NULL, 0, -1, &err), 0);
    assert_int_equal(r.flavor.devices, 16);
    assert_int_equal(r.flavor.devices_per_node, 4);
    assert_int_equal(r.flavor.device.memory_bytes, 40LL << 30);
    assert_true(r.flavor.device.tflops == 500.0);
    assert_true(r.flavor.device.inter_node_gbps == 12.5);
    assert_true(r.flavor.device.hbm_gbps == 3350.0);
    recipe_release(&r);
}

static void test_recipe_edit_distance(void **state)
{
    (void) state;
    assert_int_equal(recipe_edit_distance("batchsize", "batch_size"), 1);
    assert_int_equal(recipe_edit_distance("", "abc"), 3);
    assert_int_equal(recipe_edit_distance("kitten", "sitting"), 3);
}

static void test_recipe_json_is_yaml(void **state)
{
    (void) state;
    static const char text[] = "{\"model\": {\"path\": \"m\"}, \"dataset\": {\"path\": \"d\"},"
                               " \"training\": {\"batch_size\": 8}}";
    struct recipe r;
    struct moai_err err = {0};
    assert_int_equal(load(&r, text, NULL, 0, -1, &err), 0);
    assert_int_equal(r.training.batch_size, 8);
    recipe_release(&r);
}

static void test_recipe_lora(void **state)
{
    (void) state;
    struct recipe r;
    struct moai_err err = {0};
    char text[512];

    /* off without a 'lora' mapping, PEFT's defaults when it is empty */
    assert_int_equal(load(&r, base, NULL, 0, -1, &err), 0);
    assert_false(r.lora.enabled);
    json_t *j = recipe_to_json(&r);
    assert_true(json_is_null(json_object_get(j, "lora")));
    json_decref(j);
    recipe_release(&r);
    snprintf(text, sizeof(text), "%slora: {}\n", base);
    assert_int_equal(load(&r, text, NULL, 0, -1, &err), 0);
    assert_true(r.lora.enabled);
    assert_int_equal(r.lora.rank, 8);
    assert_true(r.lora.alpha == 8.0 && r.lora.dropout == 0.0);
    assert_int_equal(r.lora.targets, MODEL_LORA_ALL);
    assert_null(r.lora.adapter);
    assert_false(r.lora.merge);
    recipe_release(&r);

    snprintf(text, sizeof(text),
             "%slora:\n  rank: 16\n  alpha: 32\n  dropout: 0.05\n"
             "  target_modules: [v_proj, q_proj, down_proj]\n  adapter: out/a\n  merge: true\n",
             base);
    assert_int_equal(load(&r, text, NULL, 0, -1, &err), 0);
    assert_int_equal(r.lora.rank, 16);
    assert_true(r.lora.alpha == 32.0 && r.lora.dropout == 0.05);
    assert_int_equal(r.lora.targets,
                     (1u << MODEL_LORA_wq) | (1u << MODEL_LORA_wv) | (1u << MODEL_LORA_w_down));
    assert_string_equal(r.lora.adapter, "out/a");
    assert_true(r.lora.merge);
    j = recipe_to_json(&r);
    json_t *t = json_object_get(json_object_get(j, "lora"), "target_modules");
    assert_int_equal(json_array_size(t), 3);
    assert_string_equal(json_string_value(json_array_get(t, 0)), "q_proj");
    assert_string_equal(json_string_value(json_array_get(t, 2)), "down_proj");
    json_decref(j);
    recipe_release(&r);

    /* --set turns it on too */
    const char *sets[] = {"lora.rank=4"};
    assert_int_equal(load(&r, base, sets, 1, -1, &err), 0);
    assert_true(r.lora.enabled);
    assert_int_equal(r.lora.rank, 4);
    recipe_release(&r);

    static const struct {
        const char *yaml, *msg;
    } bad[] = {
        {"lora:\n  rnak: 4\n", "t.yaml:6:3: unknown key 'rnak' in 'lora' (did you mean 'rank'?)"},
        {"lora:\n  rank: 0\n", "t.yaml:6:9: 'lora.rank' must be an integer in [1, 4096], not '0'"},
        {"lora:\n  dropout: 1\n",
         "t.yaml:6:12: 'lora.dropout' must be a number in [0, 1), not '1'"},
        {"lora:\n  target_modules: [q_proj, v_prj]\n",
         "t.yaml:6:28: 'lora.target_modules' must be a list of q_proj, k_proj, v_proj, o_proj, "
         "gate_proj, up_proj, down_proj, not 'v_prj' (did you mean 'v_proj'?)"},
        {"lora:\n  target_modules: []\n",
         "t.yaml:6:19: 'lora.target_modules' must be a list of q_proj, k_proj, v_proj, o_proj, "
         "gate_proj, up_proj, down_proj, not a sequence"},
        {"lora:\n  target_modules: [q_proj, q_proj]\n",
         "t.yaml:6:28: 'lora.target_modules' names 'q_proj' twice"},
        {"lora: 8\n", "t.yaml:5:7: 'lora' must be a mapping of 'lora.*' keys, not '8'"},
    };
    for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++) {
        snprintf(text, sizeof(text), "%s%s", base, bad[i].yaml);
        assert_int_equal(load(&r, text, NULL, 0, -1, &err), MOAI_EUSAGE);
        assert_string_equal(err.msg, bad[i].msg);
    }
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_recipe_defaults),
        cmocka_unit_test(test_recipe_values),
        cmocka_unit_test(test_recipe_set_overrides),
        cmocka_unit_test(test_recipe_set_typed_by_schema),
        cmocka_unit_test(test_recipe_default_save_dir),
        cmocka_unit_test(test_recipe_ap_switch_precedence),
        cmocka_unit_test(test_recipe_errors),
        cmocka_unit_test(test_recipe_alias_bomb_is_bounded),
        cmocka_unit_test(test_recipe_flavors),
        cmocka_unit_test(test_recipe_custom_flavor_overrides),
        cmocka_unit_test(test_recipe_edit_distance),
        cmocka_unit_test(test_recipe_json_is_yaml),
        cmocka_unit_test(test_recipe_lora),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
