/* config.c - Hugging Face config.json for Llama and Mistral: reading, checks, parameter count. */
#include "model/config.h"

#include <errno.h>
#include <libgen.h>
#include <math.h>
#include <stdio.h>
#include <string.h>

/* Architectures this code runs, with the model_type each implies. */
static const struct {
    const char *architecture, *model_type;
} architectures[] = {
    {"LlamaForCausalLM", "llama"},
    {"MistralForCausalLM", "mistral"},
};

#define NARCH (sizeof(architectures) / sizeof(architectures[0]))

/* An integer key: absent gives def (or an error when required), else it must be an integer
 * (a real with an integral value is accepted) of at least min. */
static int get_int(const json_t *root, const char *key, bool required, int64_t def, int64_t min,
                   int64_t *out, const char *src, struct moai_err *err)
{
    const json_t *v = json_object_get(root, key);
    if (!v || json_is_null(v)) {
        if (required)
            return moai_err_set(err, MOAI_EUSAGE, "%s: missing key '%s'", src, key);
        *out = def;
        return 0;
    }
    if (json_is_integer(v)) {
        *out = json_integer_value(v);
    } else if (json_is_real(v) && json_real_value(v) == floor(json_real_value(v)) &&
               fabs(json_real_value(v)) < 9.0e15) {
        *out = (int64_t) json_real_value(v);
    } else {
        return moai_err_set(err, MOAI_EUSAGE, "%s: '%s' must be an integer", src, key);
    }
    if (*out < min)
        return moai_err_set(err, MOAI_EUSAGE, "%s: '%s' must be at least %lld, not %lld", src, key,
                            (long long) min, (long long) *out);
    return 0;
}

static int get_real(const json_t *root, const char *key, double def, bool positive, double *out,
                    const char *src, struct moai_err *err)
{
    const json_t *v = json_object_get(root, key);
    if (!v || json_is_null(v)) {
        *out = def;
        return 0;
    }
    if (!json_is_number(v))
        return moai_err_set(err, MOAI_EUSAGE, "%s: '%s' must be a number", src, key);
    *out = json_number_value(v);
    if (!isfinite(*out) || (positive && *out <= 0))
        return moai_err_set(err, MOAI_EUSAGE, "%s: '%s' must be a positive number, not %g", src,
                            key, *out);
    return 0;
}

/* A token id: an integer, null (-1), or a list whose first element is taken. */
static int get_token_id(const json_t *root, const char *key, int64_t def, int64_t *out,
                        const char *src, struct moai_err *err)
{
    const json_t *v = json_object_get(root, key);
    if (!v) {
        *out = def;
        return 0;
    }
    if (json_is_null(v)) {
        *out = -1;
        return 0;
    }
    if (json_is_array(v))
        v = json_array_size(v) ? json_array_get(v, 0) : json_null();
    if (json_is_null(v)) {
        *out = -1;
        return 0;
    }
    if (!json_is_integer(v) || json_integer_value(v) < 0)
        return moai_err_set(err, MOAI_EUSAGE, "%s: '%s' must be a token id (an integer >= 0)", src,
                            key);
    *out = json_integer_value(v);
    return 0;
}

static int get_architecture(struct model_config *cfg, const json_t *root, const char *src,
                            struct moai_err *err)
{
    const json_t *arch = json_object_get(root, "architectures");
    const json_t *type = json_object_get(root, "model_type");
    const char *name = NULL;

    if (arch && !json_is_null(arch)) {
        if (!json_is_array(arch) || json_array_size(arch) == 0 ||
            !json_is_string(json_array_get(arch, 0)))
            return moai_err_set(err, MOAI_EUSAGE,
                                "%s: 'architectures' must be a list of class names", src);
        name = json_string_value(json_array_get(arch, 0));
        for (size_t i = 0; i < NARCH; i++)
            if (!strcmp(name, architectures[i].architecture)) {
                snprintf(cfg->architecture, sizeof(cfg->architecture), "%s", name);
                return 0;
            }
    } else if (type && !json_is_null(type)) {
        if (!json_is_string(type))
            return moai_err_set(err, MOAI_EUSAGE, "%s: 'model_type' must be a string", src);
        name = json_string_value(type);
        for (size_t i = 0; i < NARCH; i++)
            if (!strcmp(name, architectures[i].model_type)) {
                snprintf(cfg->architecture, sizeof(cfg->architecture), "%s",
                         architectures[i].architecture);
                return 0;
            }
    } else {
        /* Inline configs of a recipe may leave the architecture out: Llama. */
        snprintf(cfg->architecture, sizeof(cfg->architecture), "%s", "LlamaForCausalLM");
        return 0;
    }
    return moai_err_set(err, MOAI_EUSAGE,
                        "%s: unknown architecture '%s' (supported: LlamaForCausalLM, "
                        "MistralForCausalLM)",
                        src, name);
}

static int get_rope_scaling(struct model_config *cfg, const json_t *root, const char *src,
                            struct moai_err *err)
{
    const json_t *rs = json_object_get(root, "rope_scaling");
    const json_t *type;
    int rc;

    memset(&cfg->rope_scaling, 0, sizeof(cfg->rope_scaling));
    if (!rs || json_is_null(rs))
        return 0;
    if (!json_is_object(rs))
        return moai_err_set(err, MOAI_EUSAGE, "%s: 'rope_scaling' must be an object or null", src);
    type = json_object_get(rs, "rope_type");
    if (!type)
        type = json_object_get(rs, "type");
    if (!json_is_string(type))
        return moai_err_set(err, MOAI_EUSAGE, "%s: 'rope_scaling' has no 'rope_type'", src);
    if (!strcmp(json_string_value(type), "default"))
        return 0;
    if (strcmp(json_string_value(type), "llama3") != 0)
        return moai_err_set(err, MOAI_EUSAGE,
                            "%s: 'rope_scaling' type '%s' is not supported (supported: llama3)",
                            src, json_string_value(type));
    char where[512];
    snprintf(where, sizeof(where), "%s: rope_scaling", src);
    cfg->rope_scaling.type = ROPE_SCALING_LLAMA3;
    if ((rc = get_real(rs, "factor", 8.0, true, &cfg->rope_scaling.factor, where, err)) < 0 ||
        (rc = get_real(rs, "low_freq_factor", 1.0, true, &cfg->rope_scaling.low_freq_factor, where,
                       err)) < 0 ||
        (rc = get_real(rs, "high_freq_factor", 4.0, true, &cfg->rope_scaling.high_freq_factor,
                       where, err)) < 0 ||
        (rc = get_int(rs, "original_max_position_embeddings", false, 8192, 1,
                      &cfg->rope_scaling.original_max_position_embeddings, where, err)) < 0)
        return rc;
    if (cfg->rope_scaling.high_freq_factor <= cfg->rope_scaling.low_freq_factor)
        return moai_err_set(err, MOAI_EUSAGE,
                            "%s: 'high_freq_factor' must exceed 'low_freq_factor'", where);
    return 0;
}

const struct model_layer_tensor_desc model_layer_tensors[MODEL_LAYER_NTENSORS] = {
#define MODEL_LAYER_DESC(field, name, kind, rows, cols)                                            \
    {name, MODEL_TENSOR_##kind, MODEL_DIM_##rows, MODEL_DIM_##cols},
    MODEL_LAYER_TENSORS(MODEL_LAYER_DESC)
#undef MODEL_LAYER_DESC
};

const struct model_lora_target_desc model_lora_targets[MODEL_LORA_NTARGETS + 1] = {
#define MODEL_LORA_DESC(field, module) {#module, MODEL_LAYER_##field},
    MODEL_LORA_TARGETS(MODEL_LORA_DESC)
#undef MODEL_LORA_DESC
        {NULL, MODEL_LAYER_NTENSORS},
};

/* Dimension d of c into *out; false when it overflows. */
static bool dim_checked(const struct model_config *c, enum model_dim d, int64_t *out)
{
    switch (d) {
    case MODEL_DIM_D:
        *out = c->hidden_size;
        return true;
    case MODEL_DIM_Q:
        return !__builtin_mul_overflow(c->num_attention_heads, c->head_dim, out);
    case MODEL_DIM_KV:
        return !__builtin_mul_overflow(c->num_key_value_heads, c->head_dim, out);
    case MODEL_DIM_F:
        *out = c->intermediate_size;
        return true;
    case MODEL_DIM_V:
        *out = c->vocab_size;
        return true;
    case MODEL_DIM_NONE:
        break;
    }
    *out = 0;
    return true;
}

int64_t model_dim(const struct model_config *c, enum model_dim d)
{
    int64_t n;
    dim_checked(c, d, &n);
    return n;
}

int64_t model_layer_tensor_numel(const struct model_config *c, int k)
{
    const struct model_layer_tensor_desc *t = &model_layer_tensors[k];
    int64_t cols = model_dim(c, t->cols);
    return model_dim(c, t->rows) * (cols ? cols : 1);
}

int64_t model_lora_layer_param_count(const struct model_config *c, int64_t rank, unsigned targets)
{
    int64_t n = 0;
    for (int t = 0; t < MODEL_LORA_NTARGETS; t++) {
        const struct model_layer_tensor_desc *d = &model_layer_tensors[model_lora_targets[t].layer];
        if (targets & (1u << t))
            n += rank * (model_dim(c, d->rows) + model_dim(c, d->cols));
    }
    return n;
}

/* The parameters of a layer into *out, false when a product or the sum overflows. */
static bool layer_count_checked(const struct model_config *c, int64_t *out)
{
    int64_t sum = 0;
    for (int k = 0; k < MODEL_LAYER_NTENSORS; k++) {
        int64_t rows, cols, n;
        const struct model_layer_tensor_desc *t = &model_layer_tensors[k];
        if (!dim_checked(c, t->rows, &rows) || !dim_checked(c, t->cols, &cols) ||
            __builtin_mul_overflow(rows, cols ? cols : 1, &n) ||
            __builtin_add_overflow(sum, n, &sum))
            return false;
    }
    *out = sum;
    return true;
}

/* Does model_param_count stay within MODEL_MAX_PARAMS (computed without overflow, with the
 * untied head, the larger count)? */
static bool count_fits(const struct model_config *c)
{
    int64_t sum, V;
    bool o = !layer_count_checked(c, &sum);
    o |= __builtin_mul_overflow(sum, c->num_hidden_layers, &sum);
    o |= __builtin_mul_overflow(c->vocab_size, c->hidden_size, &V);
    o |= __builtin_add_overflow(sum, V, &sum);              /* the embedding */
    o |= __builtin_add_overflow(sum, V, &sum);              /* lm_head */
    o |= __builtin_add_overflow(sum, c->hidden_size, &sum); /* the final norm */
    return !o && sum <= MODEL_MAX_PARAMS;
}

/* The integer and real sizes, with their defaults. */
static int get_sizes(struct model_config *cfg, const json_t *root, const char *src,
                     struct moai_err *err)
{
    int rc;
    if ((rc = get_int(root, "hidden_size", true, 0, 1, &cfg->hidden_size, src, err)) < 0 ||
        (rc = get_int(root, "intermediate_size", true, 0, 1, &cfg->intermediate_size, src, err)) <
            0 ||
        (rc = get_int(root, "num_hidden_layers", true, 0, 1, &cfg->num_hidden_layers, src, err)) <
            0 ||
        (rc = get_int(root, "num_attention_heads", true, 0, 1, &cfg->num_attention_heads, src,
                      err)) < 0 ||
        (rc = get_int(root, "vocab_size", true, 0, 1, &cfg->vocab_size, src, err)) < 0 ||
        (rc = get_int(root, "num_key_value_heads", false, cfg->num_attention_heads, 1,
                      &cfg->num_key_value_heads, src, err)) < 0 ||
        (rc = get_int(root, "max_position_embeddings", false, 2048, 1,
                      &cfg->max_position_embeddings, src, err)) < 0 ||
        (rc = get_int(root, "sliding_window", false, 0, 1, &cfg->sliding_window, src, err)) < 0)
        return rc;
    if ((rc = get_real(root, "rms_norm_eps", 1e-6, true, &cfg->rms_norm_eps, src, err)) < 0 ||
        (rc = get_real(root, "rope_theta", 10000.0, true, &cfg->rope_theta, src, err)) < 0 ||
        (rc = get_real(root, "initializer_range", 0.02, true, &cfg->initializer_range, src, err)) <
            0)
        return rc;
    return 0;
}

/* head_dim, given or hidden_size / num_attention_heads, even; the key-value heads divide the
 * heads. */
static int get_head_dim(struct model_config *cfg, const json_t *root, const char *src,
                        struct moai_err *err)
{
    int64_t H = cfg->num_attention_heads, D = cfg->hidden_size;
    const json_t *v = json_object_get(root, "head_dim");
    int rc;
    if (v && !json_is_null(v)) {
        if ((rc = get_int(root, "head_dim", true, 0, 1, &cfg->head_dim, src, err)) < 0)
            return rc;
    } else {
        if (D % H != 0)
            return moai_err_set(err, MOAI_EUSAGE,
                                "%s: 'num_attention_heads' (%lld) does not divide 'hidden_size' "
                                "(%lld)",
                                src, (long long) H, (long long) D);
        cfg->head_dim = D / H;
    }
    if (cfg->head_dim % 2)
        return moai_err_set(err, MOAI_EUSAGE,
                            "%s: the head dimension (%lld) must be even for rotary embeddings", src,
                            (long long) cfg->head_dim);
    if (H % cfg->num_key_value_heads != 0)
        return moai_err_set(err, MOAI_EUSAGE,
                            "%s: 'num_key_value_heads' (%lld) does not divide "
                            "'num_attention_heads' (%lld)",
                            src, (long long) cfg->num_key_value_heads, (long long) H);
    return 0;
}

/* tie_word_embeddings and the special token ids, each inside the vocabulary. */
static int get_embedding_ids(struct model_config *cfg, const json_t *root, const char *src,
                             struct moai_err *err)
{
    const json_t *v = json_object_get(root, "tie_word_embeddings");
    int rc;
    if (v && !json_is_boolean(v) && !json_is_null(v))
        return moai_err_set(err, MOAI_EUSAGE, "%s: 'tie_word_embeddings' must be true or false",
                            src);
    cfg->tie_word_embeddings = v && json_is_true(v);
    if ((rc = get_token_id(root, "bos_token_id", 1, &cfg->bos_token_id, src, err)) < 0 ||
        (rc = get_token_id(root, "eos_token_id", 2, &cfg->eos_token_id, src, err)) < 0 ||
        (rc = get_token_id(root, "pad_token_id", -1, &cfg->pad_token_id, src, err)) < 0)
        return rc;
    const int64_t *ids[] = {&cfg->bos_token_id, &cfg->eos_token_id, &cfg->pad_token_id};
    const char *id_keys[] = {"bos_token_id", "eos_token_id", "pad_token_id"};
    for (int i = 0; i < 3; i++)
        if (*ids[i] >= cfg->vocab_size)
            return moai_err_set(err, MOAI_EUSAGE,
                                "%s: '%s' (%lld) is outside the vocabulary "
                                "(%lld)",
                                src, id_keys[i], (long long) *ids[i], (long long) cfg->vocab_size);
    return 0;
}

/* The activation must be SiLU, and the layers without biases. */
static int check_unsupported(const json_t *root, const char *src, struct moai_err *err)
{
    const json_t *v = json_object_get(root, "hidden_act");
    if (v && !json_is_null(v) && (!json_is_string(v) || strcmp(json_string_value(v), "silu")))
        return moai_err_set(err, MOAI_EUSAGE, "%s: 'hidden_act' must be \"silu\"", src);
    static const char *const biases[] = {"attention_bias", "mlp_bias"};
    for (int i = 0; i < 2; i++) {
        v = json_object_get(root, biases[i]);
        if (v && json_is_true(v))
            return moai_err_set(err, MOAI_EUSAGE, "%s: '%s' true is not supported", src, biases[i]);
    }
    return 0;
}

int model_config_from_json(struct model_config *cfg, const json_t *root, const char *source,
                           struct moai_err *err)
{
    const char *src = source ? source : "config.json";
    const json_t *v;
    int rc;

    memset(cfg, 0, sizeof(*cfg));
    snprintf(cfg->name, sizeof(cfg->name), "model");
    if (!json_is_object(root))
        return moai_err_set(err, MOAI_EUSAGE, "%s: expected a JSON object", src);
    if ((rc = get_architecture(cfg, root, src, err)) < 0 ||
        (rc = get_sizes(cfg, root, src, err)) < 0 || (rc = get_head_dim(cfg, root, src, err)) < 0)
        return rc;
    if (!count_fits(cfg))
        return moai_err_set(err, MOAI_EUSAGE, "%s: the sizes give more than %lld parameters", src,
                            (long long) MODEL_MAX_PARAMS);
    if ((rc = get_embedding_ids(cfg, root, src, err)) < 0 ||
        (rc = check_unsupported(root, src, err)) < 0)
        return rc;
    v = json_object_get(root, "torch_dtype");
    if (v && json_is_string(v))
        snprintf(cfg->torch_dtype, sizeof(cfg->torch_dtype), "%s", json_string_value(v));
    return get_rope_scaling(cfg, root, src, err);
}

int model_config_load(struct model_config *cfg, const char *path, const json_t *overrides,
                      struct moai_err *err)
{
    json_t *root;
    json_error_t jerr;
    char src[4096];
    int rc;

    if (path) {
        root = json_load_file(path, JSON_REJECT_DUPLICATES, &jerr);
        if (!root) {
            FILE *f = fopen(path, "r");
            if (!f)
                return moai_err_set(err, MOAI_EIO, "cannot open '%s': %s", path, strerror(errno));
            fclose(f);
            return moai_err_set(err, MOAI_EIO, "%s:%d:%d: invalid JSON: %s", path, jerr.line,
                                jerr.column, moai_oneline(jerr.text));
        }
        snprintf(src, sizeof(src), "%s", path);
    } else {
        root = json_object();
        snprintf(src, sizeof(src), "model.config");
    }
    if (overrides) {
        if (!json_is_object(root)) {
            json_decref(root);
            return moai_err_set(err, MOAI_EUSAGE, "%s: expected a JSON object", src);
        }
        json_object_update(root, (json_t *) overrides);
        if (path)
            snprintf(src, sizeof(src), "%s (with model.config)", path);
    }
    rc = model_config_from_json(cfg, root, src, err);
    json_decref(root);
    if (rc == 0 && path) {
        char dir[4096];
        snprintf(dir, sizeof(dir), "%s", path);
        snprintf(cfg->name, sizeof(cfg->name), "%s", basename(dirname(dir)));
    }
    return rc;
}

int64_t model_layer_param_count(const struct model_config *c)
{
    int64_t n = 0;
    for (int k = 0; k < MODEL_LAYER_NTENSORS; k++)
        n += model_layer_tensor_numel(c, k);
    return n;
}

int64_t model_param_count(const struct model_config *c)
{
    int64_t embed = c->vocab_size * c->hidden_size;
    return embed + c->num_hidden_layers * model_layer_param_count(c) + c->hidden_size +
           (c->tie_word_embeddings ? 0 : embed);
}

json_t *model_config_to_json(const struct model_config *c)
{
    bool mistral = !strcmp(c->architecture, "MistralForCausalLM");
    json_t *j = json_object();
    json_object_set_new(j, "architectures", json_pack("[s]", c->architecture));
    json_object_set_new(j, "model_type", json_string(mistral ? "mistral" : "llama"));
    json_object_set_new(j, "bos_token_id",
                        c->bos_token_id >= 0 ? json_integer(c->bos_token_id) : json_null());
    json_object_set_new(j, "eos_token_id",
                        c->eos_token_id >= 0 ? json_integer(c->eos_token_id) : json_null());
    if (c->pad_token_id >= 0)
        json_object_set_new(j, "pad_token_id", json_integer(c->pad_token_id));
    json_object_set_new(j, "hidden_act", json_string("silu"));
    json_object_set_new(j, "hidden_size", json_integer(c->hidden_size));
    json_object_set_new(j, "head_dim", json_integer(c->head_dim));
    json_object_set_new(j, "initializer_range", json_real(c->initializer_range));
    json_object_set_new(j, "intermediate_size", json_integer(c->intermediate_size));
    json_object_set_new(j, "max_position_embeddings", json_integer(c->max_position_embeddings));
    json_object_set_new(j, "num_attention_heads", json_integer(c->num_attention_heads));
    json_object_set_new(j, "num_hidden_layers", json_integer(c->num_hidden_layers));
    json_object_set_new(j, "num_key_value_heads", json_integer(c->num_key_value_heads));
    json_object_set_new(j, "rms_norm_eps", json_real(c->rms_norm_eps));
    if (c->rope_scaling.type == ROPE_SCALING_LLAMA3)
        json_object_set_new(j, "rope_scaling",
                            json_pack("{s:f, s:f, s:f, s:I, s:s}", "factor", c->rope_scaling.factor,
                                      "low_freq_factor", c->rope_scaling.low_freq_factor,
                                      "high_freq_factor", c->rope_scaling.high_freq_factor,
                                      "original_max_position_embeddings",
                                      (json_int_t) c->rope_scaling.original_max_position_embeddings,
                                      "rope_type", "llama3"));
    else
        json_object_set_new(j, "rope_scaling", json_null());
    json_object_set_new(j, "rope_theta", json_real(c->rope_theta));
    if (mistral)
        json_object_set_new(j, "sliding_window",
                            c->sliding_window ? json_integer(c->sliding_window) : json_null());
    json_object_set_new(j, "tie_word_embeddings", json_boolean(c->tie_word_embeddings));
    json_object_set_new(j, "torch_dtype",
                        json_string(c->torch_dtype[0] ? c->torch_dtype : "float32"));
    json_object_set_new(j, "use_cache", json_true());
    json_object_set_new(j, "vocab_size", json_integer(c->vocab_size));
    return j;
}
