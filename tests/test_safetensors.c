/* test_safetensors.c - safetensors round trips, conversions, shards, tensor loading, and every
 * malformed file in tests/data/bad/safetensors/ with its expected error. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <cmocka.h>

#include "model/llama.h"
#include "model/optim.h"
#include "model/safetensors.h"
#include "model/tensors.h"

#include <dirent.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

static char dir[] = "/tmp/moai-st-XXXXXX";

static int setup(void **state)
{
    (void) state;
    return mkdtemp(dir) ? 0 : -1;
}

static int teardown(void **state)
{
    (void) state;
    char cmd[256];
    snprintf(cmd, sizeof(cmd), "rm -rf '%s'", dir);
    return system(cmd) == 0 ? 0 : -1;
}

static void test_safetensors_round_trip(void **state)
{
    (void) state;
    float a[6] = {1.0f, -2.5f, 3.14159265f, 0.0f, -0.0f, 1e-30f}, b[3] = {65504.0f, 1e10f, -7.0f};
    struct st_write_tensor t[2] = {
        {.name = "a", .ndim = 2, .shape = {2, 3}, .data = a},
        {.name = "model.b", .ndim = 1, .shape = {3}, .data = b},
    };
    char path[256];
    struct st_file f;
    struct moai_err err = {0};
    float out[6];

    snprintf(path, sizeof(path), "%s/f32.safetensors", dir);
    assert_int_equal(st_write(path, 2, t, ST_F32, &err), 0);
    assert_int_equal(st_open(&f, path, &err), 0);
    assert_int_equal(f.ntensors, 2);
    const struct st_tensor *ta = st_find(&f, "a");
    assert_non_null(ta);
    assert_int_equal(ta->ndim, 2);
    assert_int_equal(ta->shape[1], 3);
    assert_int_equal(st_to_f32(ta, out, &err), 0);
    assert_memory_equal(out, a, sizeof(a)); /* bit for bit */
    /* The header is padded with spaces to a multiple of 8 and names the format. */
    uint64_t n;
    memcpy(&n, f.map, 8);
    assert_int_equal(n % 8, 0);
    assert_non_null(memmem(f.map + 8, n, "{\"__metadata__\":{\"format\":\"pt\"}", 30));
    st_close(&f);

    snprintf(path, sizeof(path), "%s/bf16.safetensors", dir);
    assert_int_equal(st_write(path, 2, t, ST_BF16, &err), 0);
    assert_int_equal(st_open(&f, path, &err), 0);
    ta = st_find(&f, "a");
    assert_int_equal(ta->dtype, ST_BF16);
    assert_int_equal(ta->nbytes, 12);
    assert_int_equal(st_to_f32(ta, out, &err), 0);
    for (int i = 0; i < 6; i++) /* what round-to-nearest-even gives, exactly */
        assert_true(out[i] == optim_f32_from_bf16(optim_bf16_from_f32(a[i])));
    assert_true(out[2] == 3.140625f);
    st_close(&f);

    /* An independent reader of the specification agrees (when python3 is there). */
    if (system("python3 -c '' 2>/dev/null") == 0) {
        char cmd[512], line[256], all[1024] = "";
        snprintf(cmd, sizeof(cmd), "python3 tests/st_check.py '%s'", path);
        FILE *p = popen(cmd, "r");
        assert_non_null(p);
        while (fgets(line, sizeof(line), p))
            strncat(all, line, sizeof(all) - strlen(all) - 1);
        assert_int_equal(pclose(p), 0);
        assert_string_equal(all, "a BF16 [2, 3] 1.0\nmodel.b BF16 [3] 65536.0\n");
    }
}

static void test_safetensors_f16_exact(void **state)
{
    (void) state;
    /* 1.0, -2.0, the smallest subnormal, the largest normal, inf, 0.333 */
    const uint16_t h[6] = {0x3c00, 0xc000, 0x0001, 0x7bff, 0x7c00, 0x3555};
    const float want[6] = {1.0f, -2.0f, 5.9604644775390625e-8f, 65504.0f, INFINITY,
                           0.333251953125f};
    uint8_t file[128];
    char hdr[] = "{\"h\":{\"dtype\":\"F16\",\"shape\":[6],\"data_offsets\":[0,12]}}    ";
    size_t hl = strlen(hdr);
    uint64_t n = hl;
    memcpy(file, &n, 8);
    memcpy(file + 8, hdr, hl);
    memcpy(file + 8 + hl, h, sizeof(h));
    struct st_file f = {0};
    struct moai_err err = {0};
    float out[6];
    assert_int_equal(st_parse(&f, file, 8 + hl + sizeof(h), "mem", &err), 0);
    assert_int_equal(st_to_f32(st_find(&f, "h"), out, &err), 0);
    assert_memory_equal(out, want, sizeof(want));
    st_close(&f);
}

static void tiny_config(struct model_config *cfg, bool tied)
{
    struct moai_err err = {0};
    json_t *o = json_pack("{s:i, s:i, s:i, s:i, s:i, s:i, s:b}", "hidden_size", 8,
                          "intermediate_size", 12, "num_hidden_layers", 2, "num_attention_heads",
                          2, "num_key_value_heads", 1, "vocab_size", 16, "tie_word_embeddings",
                          tied);
    assert_int_equal(model_config_load(cfg, NULL, o, &err), 0);
    json_decref(o);
}

/* Writes the model's tensors (all of them, or all but skip) to path. */
static void write_model(const char *path, const struct model_config *cfg, const float *arena,
                        const char *skip, const char *reshape)
{
    struct llama_params p;
    struct moai_err err = {0};
    assert_int_equal(llama_params_init(&p, cfg, (float *) arena, &err), 0);
    int64_t n = llama_tensor_count(cfg), k = 0;
    struct st_write_tensor *t = calloc((size_t) n, sizeof(*t));
    struct llama_tensor *lt = calloc((size_t) n, sizeof(*lt));
    for (int64_t i = 0; i < n; i++) {
        llama_tensor_at(&lt[i], &p, cfg, i);
        if (skip && !strcmp(lt[i].name, skip))
            continue;
        t[k] = (struct st_write_tensor){.name = lt[i].name, .ndim = lt[i].ndim,
                                        .shape = {lt[i].shape[0], lt[i].shape[1]},
                                        .data = lt[i].data};
        if (reshape && !strcmp(lt[i].name, reshape)) {
            t[k].shape[0] = lt[i].shape[1];
            t[k].shape[1] = lt[i].shape[0];
        }
        k++;
    }
    assert_int_equal(st_write(path, (int) k, t, ST_F32, &err), 0);
    free(t);
    free(lt);
    llama_params_release(&p);
}

static void test_safetensors_model_load(void **state)
{
    (void) state;
    struct model_config cfg;
    struct moai_err err = {0};
    struct llama_params p;
    char mdir[256], path[300];
    tiny_config(&cfg, false);
    assert_int_equal(llama_params_init(&p, &cfg, NULL, &err), 0);
    optim_init_params(NULL, &p, &cfg, 3);
    snprintf(mdir, sizeof(mdir), "%s/model", dir);
    mkdir(mdir, 0777);
    snprintf(path, sizeof(path), "%s/model.safetensors", mdir);
    write_model(path, &cfg, p.arena, NULL, NULL);

    struct st_set set;
    float *back = calloc((size_t) p.nfloats, sizeof(float));
    assert_int_equal(st_set_open_dir(&set, mdir, &err), 0);
    assert_int_equal(model_tensors_load(&cfg, &set, back, mdir, &err), 0);
    assert_memory_equal(back, p.arena, (size_t) p.nfloats * sizeof(float));
    st_set_close(&set);

    write_model(path, &cfg, p.arena, "model.layers.1.mlp.up_proj.weight", NULL);
    assert_int_equal(st_set_open_dir(&set, mdir, &err), 0);
    assert_int_equal(model_tensors_load(&cfg, &set, back, mdir, &err), MOAI_EIO);
    assert_non_null(strstr(err.msg, "tensor 'model.layers.1.mlp.up_proj.weight' is missing"));
    st_set_close(&set);

    write_model(path, &cfg, p.arena, NULL, "model.layers.0.self_attn.k_proj.weight");
    assert_int_equal(st_set_open_dir(&set, mdir, &err), 0);
    assert_int_equal(model_tensors_load(&cfg, &set, back, mdir, &err), MOAI_EIO);
    assert_non_null(strstr(err.msg, "tensor 'model.layers.0.self_attn.k_proj.weight' has shape "
                                    "[8, 4], the config needs [4, 8]"));
    st_set_close(&set);
    free(back);
    llama_params_release(&p);
}

static void test_safetensors_sharded_set(void **state)
{
    (void) state;
    char sdir[256], path[300];
    float x[4] = {1, 2, 3, 4}, y[2] = {5, 6};
    struct st_write_tensor a = {.name = "x", .ndim = 1, .shape = {4}, .data = x};
    struct st_write_tensor b = {.name = "y", .ndim = 1, .shape = {2}, .data = y};
    struct moai_err err = {0};
    struct st_set set;
    snprintf(sdir, sizeof(sdir), "%s/sharded", dir);
    mkdir(sdir, 0777);
    snprintf(path, sizeof(path), "%s/model-00001-of-00002.safetensors", sdir);
    assert_int_equal(st_write(path, 1, &a, ST_F32, &err), 0);
    snprintf(path, sizeof(path), "%s/model-00002-of-00002.safetensors", sdir);
    assert_int_equal(st_write(path, 1, &b, ST_F32, &err), 0);
    snprintf(path, sizeof(path), "%s/model.safetensors.index.json", sdir);
    FILE *f = fopen(path, "w");
    fputs("{\"metadata\": {\"total_size\": 24}, \"weight_map\": {\"x\": "
          "\"model-00001-of-00002.safetensors\", \"y\": \"model-00002-of-00002.safetensors\"}}",
          f);
    fclose(f);
    assert_int_equal(st_set_open_dir(&set, sdir, &err), 0);
    assert_int_equal(set.nfiles, 2);
    float out[2];
    assert_int_equal(st_to_f32(st_set_find(&set, "y"), out, &err), 0);
    assert_true(out[0] == 5 && out[1] == 6);
    st_set_close(&set);

    /* The index names a tensor its shard does not hold. */
    f = fopen(path, "w");
    fputs("{\"weight_map\": {\"x\": \"model-00001-of-00002.safetensors\", \"z\": "
          "\"model-00002-of-00002.safetensors\"}}",
          f);
    fclose(f);
    assert_int_equal(st_set_open_dir(&set, sdir, &err), MOAI_EIO);
    assert_non_null(strstr(err.msg, "tensor 'z' is not in its shard "
                                    "'model-00002-of-00002.safetensors'"));
}

static void test_safetensors_bad_files(void **state)
{
    (void) state;
    const char *bad = "tests/data/bad/safetensors";
    DIR *d = opendir(bad);
    struct dirent *e;
    int n = 0;
    assert_non_null(d);
    while ((e = readdir(d))) {
        size_t len = strlen(e->d_name);
        if (len < 13 || strcmp(e->d_name + len - 12, ".safetensors"))
            continue;
        char path[512], exp[512], want[1024] = "";
        snprintf(path, sizeof(path), "%s/%s", bad, e->d_name);
        snprintf(exp, sizeof(exp), "%s/%.*s.expected", bad, (int) (len - 12), e->d_name);
        FILE *f = fopen(exp, "r");
        if (f) {
            if (!fgets(want, sizeof(want), f))
                want[0] = '\0';
            fclose(f);
        }
        want[strcspn(want, "\n")] = '\0';
        struct st_file sf;
        struct moai_err err = {0};
        int rc = st_open(&sf, path, &err);
        if (rc == 0)
            st_close(&sf);
        if (rc != MOAI_EIO || strcmp(want, err.msg)) {
            print_error("%s: expected '%s', got '%s'\n", path, want, err.msg);
            fail();
        }
        n++;
    }
    closedir(d);
    assert_true(n >= 15);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_safetensors_round_trip),
        cmocka_unit_test(test_safetensors_f16_exact),
        cmocka_unit_test(test_safetensors_model_load),
        cmocka_unit_test(test_safetensors_sharded_set),
        cmocka_unit_test(test_safetensors_bad_files),
    };
    return cmocka_run_group_tests(tests, setup, teardown);
}
