/* peft.c - PEFT's LoRA adapter directory: writing and checked reading (see peft.h). */
#include "model/peft.h"

#include "model/llama.h"
#include "model/safetensors.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

json_t *peft_config_json(const struct lora_config *lc, const char *base_model)
{
    json_t *targets = json_array();
    for (int t = 0; targets && t < MODEL_LORA_NTARGETS; t++)
        if (lc->targets & (1u << t))
            json_array_append_new(targets, json_string(model_lora_targets[t].module));
    return json_pack("{s:s, s:s, s:s?, s:I, s:f, s:f, s:o, s:s, s:b, s:b, s:b, s:n, s:n, s:n}",
                     "peft_type", "LORA", "task_type", "CAUSAL_LM", "base_model_name_or_path",
                     base_model, "r", (json_int_t) lc->rank, "lora_alpha", lc->alpha,
                     "lora_dropout", lc->dropout, "target_modules", targets, "bias", "none",
                     "fan_in_fan_out", 0, "inference_mode", 1, "init_lora_weights", 1,
                     "modules_to_save", "layers_to_transform", "revision");
}

int peft_write_weights(const char *path, const struct lora_params *a,
                       const struct model_config *cfg, const struct lora_config *lc,
                       struct moai_err *err)
{
    int64_t n = lora_tensor_count(cfg, lc->targets);
    struct st_write_tensor *w = calloc((size_t) (n > 0 ? n : 1), sizeof(*w));
    struct llama_tensor *t = calloc((size_t) (n > 0 ? n : 1), sizeof(*t));
    int rc;

    if (!w || !t) {
        free(w);
        free(t);
        return moai_err_set(err, MOAI_ENOMEM, "out of memory");
    }
    for (int64_t k = 0; k < n; k++) {
        lora_tensor_at(&t[k], a, cfg, lc->rank, lc->targets, k);
        w[k].name = t[k].name;
        w[k].ndim = 2;
        w[k].shape[0] = t[k].shape[0];
        w[k].shape[1] = t[k].shape[1];
        w[k].data = t[k].data;
    }
    rc = st_write(path, (int) n, w, ST_F32, err);
    free(w);
    free(t);
    return rc;
}

/* target_modules: a list of names, one name, or "all-linear" (every projection). */
static int parse_targets(json_t *v, unsigned *mask, const char *path, struct moai_err *err)
{
    size_t i, n = json_is_array(v) ? json_array_size(v) : 1;
    *mask = 0;
    if (json_is_string(v) && !strcmp(json_string_value(v), "all-linear")) {
        *mask = MODEL_LORA_ALL;
        return 0;
    }
    if (!json_is_array(v) && !json_is_string(v))
        return moai_err_set(err, MOAI_EIO, "%s: 'target_modules' must be a list of names", path);
    for (i = 0; i < n; i++) {
        json_t *item = json_is_array(v) ? json_array_get(v, i) : v;
        const char *name = json_string_value(item);
        int t = 0;
        while (name && t < MODEL_LORA_NTARGETS && strcmp(name, model_lora_targets[t].module))
            t++;
        if (!name || t == MODEL_LORA_NTARGETS)
            return moai_err_set(err, MOAI_EIO,
                                "%s: 'target_modules' names '%s', not a projection of a Llama "
                                "layer (q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, "
                                "down_proj)",
                                path, name ? name : "(not a string)");
        *mask |= 1u << t;
    }
    if (!*mask)
        return moai_err_set(err, MOAI_EIO, "%s: 'target_modules' is empty", path);
    return 0;
}

/* Keys whose presence with a value other than the default would change the adapter's
 * meaning, and that the tool does not implement. */
static int check_unsupported(json_t *root, const char *path, struct moai_err *err)
{
    static const char *const off[] = {"use_rslora", "use_dora", "fan_in_fan_out"};
    static const char *const null[] = {"layers_to_transform", "rank_pattern", "alpha_pattern"};
    for (size_t i = 0; i < sizeof(off) / sizeof(off[0]); i++) {
        json_t *v = json_object_get(root, off[i]);
        if (v && !json_is_false(v))
            return moai_err_set(err, MOAI_EIO, "%s: '%s' is not supported (it must be false)", path,
                                off[i]);
    }
    for (size_t i = 0; i < sizeof(null) / sizeof(null[0]); i++) {
        json_t *v = json_object_get(root, null[i]);
        if (v && !json_is_null(v) && !(json_is_object(v) && json_object_size(v) == 0))
            return moai_err_set(err, MOAI_EIO, "%s: '%s' is not supported (it must be null)", path,
                                null[i]);
    }
    return 0;
}

int peft_read_config(const char *dir, struct lora_config *lc, struct moai_err *err)
{
    char path[4096];
    json_error_t jerr;
    int rc = 0;

    snprintf(path, sizeof(path), "%s/%s", dir, PEFT_CONFIG);
    json_t *root = json_load_file(path, 0, &jerr);
    if (!root)
        return moai_err_set(err, MOAI_EIO, "%s: %s", path, moai_oneline(jerr.text));
    json_t *type = json_object_get(root, "peft_type"), *r = json_object_get(root, "r");
    json_t *alpha = json_object_get(root, "lora_alpha");
    json_t *drop = json_object_get(root, "lora_dropout"), *bias = json_object_get(root, "bias");
    if (!json_is_object(root))
        rc = moai_err_set(err, MOAI_EIO, "%s: not a JSON object", path);
    else if (!json_is_string(type) || strcmp(json_string_value(type), "LORA"))
        rc = moai_err_set(err, MOAI_EIO, "%s: 'peft_type' must be \"LORA\"", path);
    else if (!json_is_integer(r) || json_integer_value(r) < 1 || json_integer_value(r) > 4096)
        rc = moai_err_set(err, MOAI_EIO, "%s: 'r' must be an integer in [1, 4096]", path);
    else if (!json_is_number(alpha) || !(json_number_value(alpha) > 0))
        rc = moai_err_set(err, MOAI_EIO, "%s: 'lora_alpha' must be a number > 0", path);
    else if (drop && !json_is_null(drop) &&
             (!json_is_number(drop) || json_number_value(drop) < 0 || json_number_value(drop) >= 1))
        rc = moai_err_set(err, MOAI_EIO, "%s: 'lora_dropout' must be a number in [0, 1)", path);
    else if (bias && !(json_is_string(bias) && !strcmp(json_string_value(bias), "none")))
        rc = moai_err_set(err, MOAI_EIO,
                          "%s: 'bias' must be \"none\" (LoRA biases are not "
                          "supported)",
                          path);
    else if ((rc = check_unsupported(root, path, err)) == 0 &&
             (rc = parse_targets(json_object_get(root, "target_modules"), &lc->targets, path,
                                 err)) == 0) {
        lc->rank = json_integer_value(r);
        lc->alpha = json_number_value(alpha);
        lc->dropout = drop && !json_is_null(drop) ? json_number_value(drop) : 0.0;
    }
    json_decref(root);
    return rc;
}

int peft_read_weights(const char *dir, struct lora_params *a, const struct model_config *cfg,
                      const struct lora_config *lc, struct moai_err *err)
{
    char path[4096];
    struct st_file f;
    int64_t n = lora_tensor_count(cfg, lc->targets);
    int rc;

    snprintf(path, sizeof(path), "%s/%s", dir, PEFT_WEIGHTS);
    if ((rc = st_open(&f, path, err)) < 0)
        return rc;
    for (int64_t k = 0; k < n && rc == 0; k++) {
        struct llama_tensor t;
        lora_tensor_at(&t, a, cfg, lc->rank, lc->targets, k);
        const struct st_tensor *s = st_find(&f, t.name);
        if (!s)
            rc = moai_err_set(err, MOAI_EIO, "%s: tensor '%s' is missing", path, t.name);
        else if (s->ndim != 2 || s->shape[0] != t.shape[0] || s->shape[1] != t.shape[1])
            rc = moai_err_set(err, MOAI_EIO,
                              "%s: tensor '%s' has shape [%lld, %lld], the model's adapter "
                              "[%lld, %lld]",
                              path, t.name, (long long) (s->ndim > 0 ? s->shape[0] : 0),
                              (long long) (s->ndim > 1 ? s->shape[1] : 0), (long long) t.shape[0],
                              (long long) t.shape[1]);
        else
            rc = st_to_f32(s, t.data, err);
    }
    if (rc == 0 && f.ntensors != n) {
        /* a tensor of another layer or target: not this model's adapter */
        for (int i = 0; i < f.ntensors && rc == 0; i++) {
            bool known = false;
            for (int64_t k = 0; k < n && !known; k++) {
                struct llama_tensor t;
                lora_tensor_at(&t, NULL, cfg, lc->rank, lc->targets, k);
                known = !strcmp(t.name, f.tensors[i].name);
            }
            if (!known)
                rc = moai_err_set(err, MOAI_EIO,
                                  "%s: tensor '%s' is not an adapter of this model's layers "
                                  "and target_modules",
                                  path, f.tensors[i].name);
        }
    }
    st_close(&f);
    return rc;
}

/* The adapters' tensors of arenas m1 and m2 as moments to write or read: names with suffixes. */
struct moment_names {
    struct llama_tensor *t; /* 2 n: m1's then m2's */
    char (*name)[128];
    int64_t n;
};

static int moment_names(struct moment_names *mn, const struct lora_params *m1,
                        const struct lora_params *m2, const struct model_config *cfg,
                        const struct lora_config *lc, struct moai_err *err)
{
    mn->n = lora_tensor_count(cfg, lc->targets);
    mn->t = calloc((size_t) (2 * mn->n + 1), sizeof(*mn->t));
    mn->name = calloc((size_t) (2 * mn->n + 1), sizeof(*mn->name));
    if (!mn->t || !mn->name) {
        free(mn->t);
        free(mn->name);
        return moai_err_set(err, MOAI_ENOMEM, "out of memory");
    }
    for (int64_t k = 0; k < 2 * mn->n; k++) {
        lora_tensor_at(&mn->t[k], k < mn->n ? m1 : m2, cfg, lc->rank, lc->targets, k % mn->n);
        snprintf(mn->name[k], sizeof(mn->name[k]), "%s.%s", mn->t[k].name,
                 k < mn->n ? "exp_avg" : "exp_avg_sq");
    }
    return 0;
}

int peft_write_moments(const char *path, const struct lora_params *m1, const struct lora_params *m2,
                       const struct model_config *cfg, const struct lora_config *lc,
                       struct moai_err *err)
{
    struct moment_names mn;
    int rc = moment_names(&mn, m1, m2, cfg, lc, err);
    if (rc < 0)
        return rc;
    struct st_write_tensor *w = calloc((size_t) (2 * mn.n + 1), sizeof(*w));
    if (!w)
        rc = moai_err_set(err, MOAI_ENOMEM, "out of memory");
    for (int64_t k = 0; w && k < 2 * mn.n; k++)
        w[k] = (struct st_write_tensor){.name = mn.name[k],
                                        .ndim = 2,
                                        .shape = {mn.t[k].shape[0], mn.t[k].shape[1]},
                                        .data = mn.t[k].data};
    if (w)
        rc = st_write(path, (int) (2 * mn.n), w, ST_F32, err);
    free(w);
    free(mn.t);
    free(mn.name);
    return rc;
}

int peft_read_moments(const char *path, struct lora_params *m1, struct lora_params *m2,
                      const struct model_config *cfg, const struct lora_config *lc,
                      struct moai_err *err)
{
    struct moment_names mn;
    struct st_file f;
    int rc = moment_names(&mn, m1, m2, cfg, lc, err);
    if (rc < 0)
        return rc;
    if ((rc = st_open(&f, path, err)) < 0)
        goto out;
    for (int64_t k = 0; k < 2 * mn.n && rc == 0; k++) {
        const struct st_tensor *s = st_find(&f, mn.name[k]);
        if (!s || s->ndim != 2 || s->shape[0] != mn.t[k].shape[0] ||
            s->shape[1] != mn.t[k].shape[1])
            rc = moai_err_set(err, MOAI_EIO,
                              "%s: tensor '%s' is missing or not of shape "
                              "[%lld, %lld]",
                              path, mn.name[k], (long long) mn.t[k].shape[0],
                              (long long) mn.t[k].shape[1]);
        else
            rc = st_to_f32(s, mn.t[k].data, err);
    }
    st_close(&f);
out:
    free(mn.t);
    free(mn.name);
    return rc;
}
