/* tensors.c - the tensor list of a config, and loading/saving it through safetensors. */
#include "model/tensors.h"

#include "log.h"
#include "progress.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define NT MODEL_LAYER_NTENSORS

static void set_shape(struct model_tensor *t, enum model_tensor_kind kind, int64_t rows,
                      int64_t cols, int64_t offset)
{
    t->kind = kind;
    t->ndim = cols ? 2 : 1;
    t->shape[0] = rows;
    t->shape[1] = cols;
    t->numel = cols ? rows * cols : rows;
    t->offset = offset;
}

int64_t model_tensor_count(const struct model_config *cfg)
{
    return 2 + NT * cfg->num_hidden_layers + (cfg->tie_word_embeddings ? 0 : 1);
}

void model_tensor_at(struct model_tensor *t, const struct model_config *cfg, int64_t index)
{
    int64_t L = cfg->num_hidden_layers, D = cfg->hidden_size, V = cfg->vocab_size;
    int64_t layers_start = V * D, layer_size = model_layer_param_count(cfg);

    MOAI_ASSERT(index >= 0 && index < model_tensor_count(cfg));
    memset(t, 0, sizeof(*t));
    t->layer = -1;
    if (index == 0) {
        snprintf(t->name, sizeof(t->name), "model.embed_tokens.weight");
        set_shape(t, MODEL_TENSOR_EMBEDDING, V, D, 0);
    } else if (index <= NT * L) {
        int64_t l = (index - 1) / NT;
        int k = (int) ((index - 1) % NT);
        const struct model_layer_tensor_desc *d = &model_layer_tensors[k];
        int64_t offset = layers_start + l * layer_size;
        for (int j = 0; j < k; j++)
            offset += model_layer_tensor_numel(cfg, j);
        snprintf(t->name, sizeof(t->name), "model.layers.%lld.%s", (long long) l, d->name);
        set_shape(t, d->kind, model_dim(cfg, d->rows), model_dim(cfg, d->cols), offset);
        t->layer = l;
    } else if (index == NT * L + 1) {
        snprintf(t->name, sizeof(t->name), "model.norm.weight");
        set_shape(t, MODEL_TENSOR_NORM, D, 0, layers_start + L * layer_size);
    } else {
        snprintf(t->name, sizeof(t->name), "lm_head.weight");
        set_shape(t, MODEL_TENSOR_LINEAR, V, D, layers_start + L * layer_size + D);
    }
}

/* The index of name in the list, or -1. */
static int64_t tensor_index(const struct model_config *cfg, const char *name)
{
    static const char prefix[] = "model.layers.";
    int64_t L = cfg->num_hidden_layers;

    if (!strcmp(name, "model.embed_tokens.weight"))
        return 0;
    if (!strcmp(name, "model.norm.weight"))
        return NT * L + 1;
    if (!strcmp(name, "lm_head.weight"))
        return cfg->tie_word_embeddings ? -1 : NT * L + 2;
    if (strncmp(name, prefix, sizeof(prefix) - 1))
        return -1;
    /* model.layers.<l>.<suffix>, l in canonical decimal */
    const char *p = name + sizeof(prefix) - 1;
    int64_t l = 0;
    if (*p < '0' || *p > '9' || (p[0] == '0' && p[1] != '.'))
        return -1;
    for (; *p >= '0' && *p <= '9'; p++) {
        l = 10 * l + (*p - '0');
        if (l >= L)
            return -1;
    }
    if (*p++ != '.')
        return -1;
    for (int k = 0; k < NT; k++)
        if (!strcmp(p, model_layer_tensors[k].name))
            return 1 + NT * l + k;
    return -1;
}

int64_t model_tensor_find(struct model_tensor *t, const struct model_config *cfg, const char *name)
{
    int64_t index = tensor_index(cfg, name);
    if (index >= 0 && t)
        model_tensor_at(t, cfg, index);
    return index;
}

static void fmt_shape(char *buf, size_t size, int ndim, const int64_t *shape)
{
    size_t len = (size_t) snprintf(buf, size, "[");
    for (int d = 0; d < ndim && len < size; d++)
        len +=
            (size_t) snprintf(buf + len, size - len, "%s%lld", d ? ", " : "", (long long) shape[d]);
    if (len < size)
        snprintf(buf + len, size - len, "]");
}

static int check_shape(const struct st_tensor *s, const struct model_tensor *t,
                       struct moai_err *err)
{
    bool same = s->ndim == t->ndim;
    for (int d = 0; same && d < t->ndim; d++)
        same = s->shape[d] == t->shape[d];
    if (same)
        return 0;
    char have[160], want[64];
    fmt_shape(have, sizeof(have), s->ndim, s->shape);
    fmt_shape(want, sizeof(want), t->ndim, t->shape);
    return moai_err_set(err, MOAI_EIO, "%s: tensor '%s' has shape %s, the config needs %s",
                        s->file->path, t->name, have, want);
}

int model_tensors_check(const struct model_config *cfg, const struct st_set *set, const char *dir,
                        bool strict, struct moai_err *err)
{
    int64_t count = model_tensor_count(cfg), extra = 0;
    const struct st_tensor *first = NULL;
    int rc;

    for (int64_t i = 0; i < count; i++) {
        struct model_tensor t;
        model_tensor_at(&t, cfg, i);
        const struct st_tensor *s = st_set_find(set, t.name);
        if (!s)
            return moai_err_set(err, MOAI_EIO, "%s: tensor '%s' is missing", dir, t.name);
        if ((rc = check_shape(s, &t, err)) < 0)
            return rc;
    }
    /* What the config does not use (in name order, so the first one named is stable). */
    for (int64_t i = 0; i < set->ntensors; i++) {
        const struct st_tensor *s = set->by_name[i];
        if (strstr(s->name, "rotary_emb.inv_freq") || tensor_index(cfg, s->name) >= 0)
            continue;
        if (!first)
            first = s;
        extra++;
    }
    if (extra && strict)
        return moai_err_set(err, MOAI_EIO,
                            "%s: tensor '%s' is not part of the config (%lld such "
                            "tensors)",
                            first->file->path, first->name, (long long) extra);
    if (extra)
        log_warn("%s: %lld tensor(s) the config does not use, such as '%s' (ignored)", dir,
                 (long long) extra, first->name);
    return 0;
}

int model_tensors_load(const struct model_config *cfg, const struct st_set *set, float *arena,
                       const char *dir, struct moai_err *err)
{
    int64_t count = model_tensor_count(cfg);
    int rc;

    if ((rc = model_tensors_check(cfg, set, dir, false, err)) < 0)
        return rc;
    struct progress bar; /* converting a large model's weights takes a while */
    progress_init(&bar, "Loading weights", count, "tensors");
    for (int64_t i = 0; i < count; i++) {
        struct model_tensor t;
        model_tensor_at(&t, cfg, i);
        if ((rc = st_to_f32(st_set_find(set, t.name), arena + t.offset, err)) < 0) {
            progress_clear(&bar);
            return rc;
        }
        progress_update(&bar, i + 1);
    }
    progress_finish(&bar);
    return 0;
}

int model_tensors_open_dir(struct model_config *cfg, struct st_set *set, const char *dir,
                           const json_t *overrides, bool strict, struct moai_err *err)
{
    size_t n = strlen(dir);
    char *path = malloc(n + sizeof("/config.json"));
    int rc;

    memset(set, 0, sizeof(*set));
    if (!path)
        return moai_err_set(err, MOAI_ENOMEM, "out of memory");
    memcpy(path, dir, n);
    memcpy(path + n, "/config.json", sizeof("/config.json"));
    rc = model_config_load(cfg, path, overrides, err);
    free(path);
    if (rc < 0)
        return rc;
    if ((rc = st_set_open_dir(set, dir, err)) < 0)
        return rc;
    if ((rc = model_tensors_check(cfg, set, dir, strict, err)) < 0)
        st_set_close(set);
    return rc;
}

int model_tensors_save(const struct model_config *cfg, const float *arena, const char *dir,
                       enum st_dtype dtype, uint64_t max_shard_bytes, struct moai_err *err)
{
    int64_t count = model_tensor_count(cfg);
    struct model_tensor *mt = calloc((size_t) count, sizeof(*mt));
    struct st_write_tensor *wt = calloc((size_t) count, sizeof(*wt));
    int rc;

    if (!mt || !wt) {
        free(mt);
        free(wt);
        return moai_err_set(err, MOAI_ENOMEM, "out of memory");
    }
    for (int64_t i = 0; i < count; i++) {
        model_tensor_at(&mt[i], cfg, i);
        wt[i] = (struct st_write_tensor){.name = mt[i].name,
                                         .ndim = mt[i].ndim,
                                         .shape = {mt[i].shape[0], mt[i].shape[1]},
                                         .data = arena + mt[i].offset};
    }
    rc = st_write_sharded(dir, "model", (int) count, wt, dtype, max_shard_bytes, NULL, err);
    free(mt);
    free(wt);
    return rc;
}
