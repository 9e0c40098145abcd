/* fingerprint.c - what defines a training run, recorded in its checkpoints (see fingerprint.h). */
#include "exec/fingerprint.h"

#include "data/tokcache.h"

#include <errno.h>
#include <inttypes.h>
#include <stdio.h>
#include <string.h>

/* "fnv64:0123456789abcdef, 1234 bytes": the bytes of a file, hashed whole. */
static int hash_file(char *buf, size_t size, const char *path, struct moai_err *err)
{
    FILE *f = fopen(path, "rb");
    unsigned char block[1 << 16];
    uint64_t h = 14695981039346656037ULL, bytes = 0;
    size_t got;

    if (!f)
        return moai_err_set(err, MOAI_EIO, "cannot open '%s': %s", path, strerror(errno));
    while ((got = fread(block, 1, sizeof(block), f)) > 0) {
        h = tokcache_hash(h, block, got);
        bytes += got;
    }
    if (ferror(f)) {
        fclose(f);
        return moai_err_set(err, MOAI_EIO, "cannot read '%s'", path);
    }
    fclose(f);
    snprintf(buf, size, "fnv64:%016" PRIx64 ", %" PRIu64 " bytes", tokcache_hash_final(h), bytes);
    return 0;
}

/* The keys of the recipe's JSON form that are part of the fingerprint, by section. */
static const char *const dataset_keys[] = {
    "template", "response_start", "limit", "shuffle", "validation_fraction", "packing", NULL};
static const char *const training_keys[] = {"batch_size",   "block_size",   "lr",    "lr_schedule",
                                            "warmup_steps", "weight_decay", "betas", "eps",
                                            "grad_clip",    "precision",    "seed",  NULL};

static void copy_keys(json_t *fp, const json_t *recipe, const char *section,
                      const char *const *keys)
{
    const json_t *s = json_object_get(recipe, section);
    for (size_t i = 0; keys[i]; i++) {
        char name[128];
        json_t *v = json_object_get(s, keys[i]);
        snprintf(name, sizeof(name), "%s.%s", section, keys[i]);
        json_object_set_new(fp, name, v ? json_deep_copy(v) : json_null());
    }
}

int fingerprint_build(json_t **out, const struct recipe *r, const struct model_config *cfg,
                      struct moai_err *err)
{
    char hash[128];
    int rc;
    json_t *fp = json_object(), *arch = model_config_to_json(cfg), *rj = recipe_to_json(r);
    const char *key;
    json_t *val;

    *out = NULL;
    if (!fp || !arch || !rj) {
        rc = moai_err_set(err, MOAI_ENOMEM, "out of memory");
        goto out;
    }
    json_object_foreach(arch, key, val)
    {
        char name[128];
        if (!strcmp(key, "torch_dtype") || !strcmp(key, "use_cache"))
            continue; /* how the weights are stored, not what they are */
        snprintf(name, sizeof(name), "model.%s", key);
        json_object_set(fp, name, val);
    }
    json_object_set_new(fp, "model.path", r->model.path ? json_string(r->model.path) : json_null());
    json_object_set(fp, "model.init", json_object_get(json_object_get(rj, "model"), "init"));
    if (r->tokenizer) {
        if ((rc = hash_file(hash, sizeof(hash), r->tokenizer, err)) < 0)
            goto out;
        json_object_set_new(fp, "tokenizer", json_string(hash));
    }
    if ((rc = hash_file(hash, sizeof(hash), r->dataset.path, err)) < 0)
        goto out;
    json_object_set_new(fp, "dataset", json_string(hash));
    copy_keys(fp, rj, "dataset", dataset_keys);
    copy_keys(fp, rj, "training", training_keys);
    *out = fp;
    fp = NULL;
    rc = 0;
out:
    json_decref(fp);
    json_decref(arch);
    json_decref(rj);
    return rc;
}

/* A value for a message: short scalars as JSON text, long ones elided. */
static void show(char *buf, size_t size, const json_t *v)
{
    char *text = v ? json_dumps(v, JSON_ENCODE_ANY | JSON_COMPACT | JSON_REAL_PRECISION(10)) : NULL;
    if (!text)
        snprintf(buf, size, "absent");
    else if (strlen(text) > 72)
        snprintf(buf, size, "%.64s...", text);
    else
        snprintf(buf, size, "%s", text);
    free(text);
}

int fingerprint_diff(const json_t *was, const json_t *now, char *buf, size_t size)
{
    const char *key;
    json_t *val;
    size_t len = 0;
    int n = 0;

    buf[0] = '\0';
    json_object_foreach((json_t *) now, key, val)
    {
        const json_t *old = json_object_get(was, key);
        char a[96], b[96];
        if (old && json_equal(old, val))
            continue;
        if (!old && json_is_false(val))
            continue; /* a switch added since the checkpoint was written (dataset.packing), off */
        show(a, sizeof(a), old);
        show(b, sizeof(b), val);
        if (len < size && old && (!strcmp(key, "dataset") || !strcmp(key, "tokenizer")))
            len += (size_t) snprintf(buf + len, size - len, "%s%s (the file's bytes differ)",
                                     n ? ", " : "", key);
        else if (len < size)
            len += (size_t) snprintf(buf + len, size - len, "%s%s (%s then, %s now)", n ? ", " : "",
                                     key, a, b);
        n++;
    }
    return n;
}
