/* tensors.c - a config's tensors from a safetensors set into the parameter arena. */
#include "model/tensors.h"

#include "log.h"
#include "model/llama.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static void fmt_shape(char *buf, size_t size, int ndim, const int64_t *shape)
{
    size_t len = (size_t) snprintf(buf, size, "[");
    for (int d = 0; d < ndim; d++)
        len += (size_t) snprintf(buf + len, size - len, "%s%lld", d ? ", " : "",
                                 (long long) shape[d]);
    snprintf(buf + len, size - len, "]");
}

int model_tensors_load(const struct model_config *cfg, const struct st_set *set, float *arena,
                       const char *dir, struct moai_err *err)
{
    struct llama_params p;
    int64_t count = llama_tensor_count(cfg), used = 0;
    int rc;

    if ((rc = llama_params_init(&p, cfg, arena, err)) < 0)
        return rc;
    for (int64_t i = 0; i < count && rc == 0; i++) {
        struct llama_tensor t;
        llama_tensor_at(&t, &p, cfg, i);
        const struct st_tensor *s = st_set_find(set, t.name);
        if (!s) {
            rc = moai_err_set(err, MOAI_EIO, "%s: tensor '%s' is missing", dir, t.name);
            break;
        }
        bool same = s->ndim == t.ndim;
        for (int d = 0; same && d < t.ndim; d++)
            same = s->shape[d] == t.shape[d];
        if (!same) {
            char have[128], want[128];
            fmt_shape(have, sizeof(have), s->ndim, s->shape);
            fmt_shape(want, sizeof(want), t.ndim, t.shape);
            rc = moai_err_set(err, MOAI_EIO, "%s: tensor '%s' has shape %s, the config needs %s",
                              s->file->path, t.name, have, want);
            break;
        }
        rc = st_to_f32(s, t.data, err);
        used++;
    }
    llama_params_release(&p);
    if (rc < 0)
        return rc;
    /* What the config does not use: say so once, it may be a different model. */
    int64_t extra = 0;
    const char *first = NULL;
    for (int f = 0; f < set->nfiles; f++)
        for (int i = 0; i < set->files[f].ntensors; i++) {
            const char *name = set->files[f].tensors[i].name;
            long long layer;
            if (strstr(name, "rotary_emb.inv_freq"))
                continue;
            bool known = !strcmp(name, "model.embed_tokens.weight") ||
                         !strcmp(name, "model.norm.weight") ||
                         (!cfg->tie_word_embeddings && !strcmp(name, "lm_head.weight"));
            if (!known && sscanf(name, "model.layers.%lld.", &layer) == 1)
                known = layer >= 0 && layer < cfg->num_hidden_layers &&
                        (strstr(name, "_layernorm.weight") || strstr(name, "_proj.weight"));
            if (!known) {
                extra++;
                if (!first)
                    first = name;
            }
        }
    if (extra)
        log_warn("%s: %lld tensor(s) the config does not use, such as '%s' (ignored)", dir,
                 (long long) extra, first);
    return 0;
}
