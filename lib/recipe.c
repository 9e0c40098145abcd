/* recipe.c - the recipe schema table, loading, overrides and checks (see recipe.h). */
#include "recipe.h"

#include "log.h"
#include "yamltree.h"

#include <ctype.h>
#include <errno.h>
#include <float.h>
#include <limits.h>
#include <math.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

enum key_type {
    KT_STRING,      /* a string; null allowed when the default is null */
    KT_INT,         /* an integer in [min, max]; null allowed when the default is null */
    KT_INT_OR_AUTO, /* "auto" (RECIPE_AUTO) or an integer in [min, max] */
    KT_FLOAT,       /* a number in the range min..max (exclusive ends as flagged) */
    KT_BOOL,
    KT_BOOL_OR_AUTO, /* "auto", true or false -> RECIPE_AUTO, 1, 0 */
    KT_ENUM,         /* one of choices; stored as index + enum_base */
    KT_BETAS,        /* [beta1, beta2], each in [0, 1) */
    KT_OBJECT,       /* a mapping kept as JSON (model.config) */
    KT_FLAVOR,       /* a catalog name or a mapping */
};

struct recipe_key {
    const char *path; /* "training.batch_size"; top-level keys have no dot */
    enum key_type type;
    size_t offset, width; /* where the value goes in struct recipe */
    const char *def;      /* default as YAML text, NULL when the key is required */
    double min, max;
    bool min_excl, max_excl;
    const char *const *choices; /* KT_ENUM: NULL-terminated */
    int enum_base;
};

/* KEY(path, type, field, default, optional designated fields...) */
#define KEY(p, t, f, ...)                                                                          \
    {                                                                                              \
        .path = p, .type = t, .offset = offsetof(struct recipe, f),                                \
        .width = sizeof(((struct recipe *) 0)->f), .def = __VA_ARGS__                              \
    }
#define BIG 9.0e15 /* integers past 2^53 do not survive a double; no key needs them */

static const char *const init_choices[] = {"pretrained", "random", NULL};
static const char *const schedule_choices[] = {"constant", "linear", "cosine", NULL};
static const char *const precision_choices[] = {"bf16", "fp32", NULL};
static const char *const recompute_choices[] = {"auto", "none", "selective", "full", NULL};
static const char *const format_choices[] = {"text", "messages", "alpaca", NULL};
static const char *const chat_choices[] = {"auto", "llama3", "llama2", "mistral", "chatml", NULL};
static const char *const train_on_choices[] = {"responses", "all", NULL};

/* The schema. moai-recipe.5 documents every row; keep them in the same order. */
static const struct recipe_key schema[] = {
    KEY("model.path", KT_STRING, model.path, "~"),
    KEY("model.config", KT_OBJECT, model.config, "~"),
    KEY("model.init", KT_ENUM, model.init, "pretrained", .choices = init_choices),
    KEY("tokenizer", KT_STRING, tokenizer, "~"),
    KEY("dataset.path", KT_STRING, dataset.path, NULL),
    KEY("dataset.template", KT_STRING, dataset.template,
        "\"[SUMMARIZE] {article} [/SUMMARIZE]\\n{highlights}\""),
    KEY("dataset.response_start", KT_STRING, dataset.response_start, "~"),
    KEY("dataset.limit", KT_INT, dataset.limit, "~", .min = 1, .max = BIG),
    KEY("dataset.shuffle", KT_BOOL, dataset.shuffle, "true"),
    KEY("dataset.packing", KT_BOOL, dataset.packing, "false"),
    KEY("dataset.validation_fraction", KT_FLOAT, dataset.validation_fraction, "0.0", .min = 0,
        .max = 1, .max_excl = true),
    KEY("dataset.cache_dir", KT_STRING, dataset.cache_dir, "~"),
    KEY("dataset.format", KT_ENUM, dataset.format, "text", .choices = format_choices),
    KEY("dataset.chat_template", KT_ENUM, dataset.chat_template, "auto", .choices = chat_choices),
    KEY("dataset.train_on", KT_ENUM, dataset.train_on, "responses", .choices = train_on_choices),
    KEY("training.batch_size", KT_INT, training.batch_size, "16", .min = 1, .max = 1 << 30),
    KEY("training.block_size", KT_INT, training.block_size, "1024", .min = 2, .max = 1 << 22),
    KEY("training.epochs", KT_INT, training.epochs, "1", .min = 1, .max = 1000000),
    KEY("training.max_steps", KT_INT, training.max_steps, "~", .min = 1, .max = BIG),
    KEY("training.lr", KT_FLOAT, training.lr, "1.0e-5", .min = 0, .max = 1e3, .min_excl = true),
    KEY("training.lr_schedule", KT_ENUM, training.lr_schedule, "constant",
        .choices = schedule_choices),
    KEY("training.warmup_steps", KT_INT, training.warmup_steps, "0", .min = 0, .max = BIG),
    KEY("training.weight_decay", KT_FLOAT, training.weight_decay, "0.0", .min = 0, .max = 1e3),
    KEY("training.betas", KT_BETAS, training.betas, "[0.9, 0.999]"),
    KEY("training.eps", KT_FLOAT, training.eps, "1.0e-8", .min = 0, .max = 1, .min_excl = true),
    KEY("training.grad_clip", KT_FLOAT, training.grad_clip, "1.0", .min = 0, .max = 1e30),
    KEY("training.precision", KT_ENUM, training.precision, "bf16", .choices = precision_choices),
    KEY("training.seed", KT_INT, training.seed, "42", .min = 0, .max = BIG),
    KEY("training.log_interval", KT_INT, training.log_interval, "2", .min = 1, .max = BIG),
    KEY("training.save_dir", KT_STRING, training.save_dir, "~"),
    KEY("training.save_interval", KT_INT, training.save_interval, "~", .min = 1, .max = BIG),
    KEY("training.eval_interval", KT_INT, training.eval_interval, "~", .min = 1, .max = BIG),
    KEY("training.resume", KT_STRING, training.resume, "auto"),
    KEY("flavor", KT_FLAVOR, flavor, "4xlarge"),
    KEY("parallel.advanced", KT_BOOL, parallel.advanced, "true"),
    KEY("parallel.dp", KT_INT_OR_AUTO, parallel.dp, "auto", .min = 1, .max = 1 << 20),
    KEY("parallel.pp", KT_INT_OR_AUTO, parallel.pp, "auto", .min = 1, .max = 1 << 20),
    KEY("parallel.tp", KT_INT_OR_AUTO, parallel.tp, "auto", .min = 1, .max = 1 << 20),
    KEY("parallel.num_micro_batches", KT_INT_OR_AUTO, parallel.num_micro_batches, "auto", .min = 1,
        .max = 1 << 30),
    KEY("parallel.recomputation", KT_ENUM, parallel.recomputation, "auto",
        .choices = recompute_choices, .enum_base = -1),
    KEY("parallel.distribute_param", KT_BOOL_OR_AUTO, parallel.distribute_param, "auto"),
    KEY("parallel.distribute_low_prec_param", KT_BOOL_OR_AUTO, parallel.distribute_low_prec_param,
        "auto"),
};

#define NSCHEMA (sizeof(schema) / sizeof(schema[0]))

static const char *const sections[] = {"model", "dataset", "training", "parallel", NULL};
static const char *const top_keys[] = {"model",  "tokenizer", "dataset", "training",
                                       "flavor", "parallel",  NULL};

/* The keys of a custom flavor mapping. */
static const char *const flavor_keys[] = {"device",          "devices",         "devices_per_node",
                                          "memory_gb",       "tflops",          "hbm_gbps",
                                          "intra_node_gbps", "inter_node_gbps", NULL};

int recipe_edit_distance(const char *a, const char *b)
{
    size_t la = strlen(a), lb = strlen(b);
    int row[64];

    if (la >= 63 || lb >= 63)
        return 99;
    for (size_t j = 0; j <= lb; j++)
        row[j] = (int) j;
    for (size_t i = 1; i <= la; i++) {
        int diag = row[0];
        row[0] = (int) i;
        for (size_t j = 1; j <= lb; j++) {
            int up = row[j];
            int best = diag + (a[i - 1] != b[j - 1]);
            if (up + 1 < best)
                best = up + 1;
            if (row[j - 1] + 1 < best)
                best = row[j - 1] + 1;
            row[j] = best;
            diag = up;
        }
    }
    return row[lb];
}

/* The nearest of the candidates to word, or NULL when none is close enough to suggest.
 * Close: an edit distance of at most a third of the word (at least 2), or one word a prefix
 * of the other but for its last letter, 4 letters at least ('recompute' -> 'recomputation'). */
static const char *nearest(const char *word, const char *const *cands, size_t ncands)
{
    const char *best = NULL;
    int best_d = INT_MAX;
    int limit = (int) strlen(word) / 3 + 1;
    if (limit < 2)
        limit = 2;
    for (size_t i = 0; i < ncands; i++) {
        size_t lw = strlen(word), lc = strlen(cands[i]), common = 0;
        size_t shorter = lw < lc ? lw : lc;
        int d = recipe_edit_distance(word, cands[i]);
        while (common < shorter && word[common] == cands[i][common])
            common++;
        if (common >= 4 && common + 1 >= shorter)
            d = 1;
        if (d < best_d) {
            best_d = d;
            best = cands[i];
        }
    }
    return best_d <= limit ? best : NULL;
}

static size_t count_list(const char *const *list)
{
    size_t n = 0;
    while (list[n])
        n++;
    return n;
}

static void fmt_suggestion(char *buf, size_t size, const char *word, const char *const *cands,
                           size_t ncands)
{
    const char *s = nearest(word, cands, ncands);
    if (s)
        snprintf(buf, size, " (did you mean '%s'?)", s);
    else
        buf[0] = '\0';
}

/* Other tools' names for the recipe's keys (torchtune, axolotl, LLaMA-Factory, Hugging Face
 * TrainingArguments), by the section they would be written in ("" for the top level, NULL for
 * any), with what to write instead. */
static const struct {
    const char *section, *name, *advice;
} aliases[] = {
    {NULL, "learning_rate", "did you mean 'training.lr'?"},
    {NULL, "sequence_len", "did you mean 'training.block_size'?"},
    {NULL, "max_seq_len", "did you mean 'training.block_size'?"},
    {NULL, "max_seq_length", "did you mean 'training.block_size'?"},
    {NULL, "seq_length", "did you mean 'training.block_size'?"},
    {NULL, "cutoff_len", "did you mean 'training.block_size'?"},
    {NULL, "num_epochs", "did you mean 'training.epochs'?"},
    {NULL, "num_train_epochs", "did you mean 'training.epochs'?"},
    {NULL, "output_dir", "did you mean 'training.save_dir'?"},
    {NULL, "max_grad_norm", "did you mean 'training.grad_clip'?"},
    {NULL, "clip_grad_norm", "did you mean 'training.grad_clip'?"},
    {NULL, "lr_scheduler", "did you mean 'training.lr_schedule'?"},
    {NULL, "lr_scheduler_type", "did you mean 'training.lr_schedule'?"},
    {NULL, "micro_batch_size",
     "did you mean 'training.batch_size'? It is the global batch; "
     "the planner chooses the micro-batches"},
    {NULL, "per_device_train_batch_size",
     "did you mean 'training.batch_size'? It is the "
     "global batch; the planner chooses the micro-batches"},
    {NULL, "gradient_accumulation_steps",
     "there is no such key: 'training.batch_size' is the "
     "global batch, and the planner chooses the "
     "micro-batches that accumulate to it"},
    {"model", "tokenizer", "did you mean the top-level 'tokenizer'?"},
    {"model", "model_name_or_path", "did you mean 'model.path'?"},
    {"", "base_model", "did you mean 'model.path'?"},
    {"", "model_name_or_path", "did you mean 'model.path'?"},
    {"dataset", "data_files", "did you mean 'dataset.path'?"},
    {"dataset", "source", "did you mean 'dataset.path'?"},
};

/* The advice for a key another tool spells so, or NULL. */
static const char *alias_advice(const char *section, const char *name)
{
    for (size_t i = 0; i < sizeof(aliases) / sizeof(aliases[0]); i++)
        if (!strcmp(aliases[i].name, name) &&
            (!aliases[i].section || !strcmp(aliases[i].section, section ? section : "")))
            return aliases[i].advice;
    return NULL;
}

static int unknown_key(struct moai_err *err, const struct ynode *key, const char *section,
                       const char *const *cands, size_t ncands)
{
    char where[512], sugg[256];
    const char *advice = alias_advice(section, key->value);
    if (advice)
        snprintf(sugg, sizeof(sugg), " (%s)", advice);
    else
        fmt_suggestion(sugg, sizeof(sugg), key->value, cands, ncands);
    if (section)
        return moai_err_set(err, MOAI_EUSAGE, "%s: unknown key '%s' in '%s'%s",
                            ynode_where(key, where, sizeof(where)), key->value, section, sugg);
    return moai_err_set(err, MOAI_EUSAGE, "%s: unknown key '%s'%s",
                        ynode_where(key, where, sizeof(where)), key->value, sugg);
}

/* "'16'", "the string '16'", "a mapping" - how a bad value is named in a message. */
static const char *describe(const struct ynode *n, char *buf, size_t size)
{
    if (n->kind == YNODE_MAP)
        snprintf(buf, size, "a mapping");
    else if (n->kind == YNODE_SEQ)
        snprintf(buf, size, "a sequence");
    else if (n->quoted)
        snprintf(buf, size, "the string '%.200s'", n->value);
    else if (ynode_is_null(n))
        snprintf(buf, size, "null");
    else
        snprintf(buf, size, "'%.200s'", n->value);
    return buf;
}

static void fmt_range(char *buf, size_t size, const struct recipe_key *k, bool integer)
{
    const char *lo = k->min_excl ? ">" : ">=";
    if (integer && k->max >= 1e6)
        snprintf(buf, size, " %s %lld", lo, (long long) k->min);
    else if (integer)
        snprintf(buf, size, " in [%lld, %lld]", (long long) k->min, (long long) k->max);
    else if (k->max >= 1e30 && !k->max_excl) /* no cap worth stating */
        snprintf(buf, size, " %s %g", lo, k->min);
    else
        snprintf(buf, size, " in %s%g, %g%s", k->min_excl ? "(" : "[", k->min, k->max,
                 k->max_excl ? ")" : "]");
}

static int bad_value(struct moai_err *err, const struct ynode *v, const char *path,
                     const char *expected)
{
    char where[512], what[256];
    return moai_err_set(err, MOAI_EUSAGE, "%s: '%s' must be %s, not %s",
                        ynode_where(v, where, sizeof(where)), path, expected,
                        describe(v, what, sizeof(what)));
}

static bool parse_int(const struct ynode *v, int64_t *out)
{
    char *end;
    if (v->kind != YNODE_SCALAR || v->quoted || !v->value[0])
        return false;
    errno = 0;
    long long x = strtoll(v->value, &end, 10);
    if (*end || errno)
        return false;
    *out = x;
    return true;
}

static bool parse_float(const struct ynode *v, double *out)
{
    char *end;
    if (v->kind != YNODE_SCALAR || v->quoted || !v->value[0] || !strpbrk(v->value, "0123456789"))
        return false;
    errno = 0;
    double x = strtod(v->value, &end);
    if (*end || errno || !isfinite(x))
        return false;
    *out = x;
    return true;
}

static bool in_range(const struct recipe_key *k, double x)
{
    if (k->min_excl ? x <= k->min : x < k->min)
        return false;
    if (k->max_excl ? x >= k->max : x > k->max)
        return false;
    return true;
}

static bool parse_bool(const struct ynode *v, bool *out)
{
    if (v->kind != YNODE_SCALAR || v->quoted)
        return false;
    if (!strcmp(v->value, "true") || !strcmp(v->value, "True") || !strcmp(v->value, "TRUE")) {
        *out = true;
        return true;
    }
    if (!strcmp(v->value, "false") || !strcmp(v->value, "False") || !strcmp(v->value, "FALSE")) {
        *out = false;
        return true;
    }
    return false;
}

static void store_int(struct recipe *r, const struct recipe_key *k, int64_t x)
{
    char *p = (char *) r + k->offset;
    if (k->width == sizeof(int64_t))
        memcpy(p, &x, sizeof(x));
    else {
        int i = (int) x;
        memcpy(p, &i, sizeof(i));
    }
}

/* The catalog name nearest a misspelt flavor, written as the user wrote it (with its memory
 * suffix or without), or NULL when none is close or several are equally close ('5xlarge' is
 * as near 4xlarge as 6xlarge: the whole catalog then says more). Not thread-safe (a static
 * buffer), like recipe loading. */
static const char *nearest_flavor(const char *name)
{
    static char best[64];
    char lower[64], cand[64];
    const char *p = flavor_catalog_names();
    bool with_suffix, tie = false;
    int best_d = INT_MAX, limit;

    snprintf(lower, sizeof(lower), "%s", name);
    for (char *c = lower; *c; c++)
        *c = (char) tolower((unsigned char) *c);
    with_suffix = strchr(lower, '.') != NULL;
    limit = (int) strlen(lower) / 3 + 1;
    if (limit < 2)
        limit = 2;
    while (*p) {
        size_t len = strcspn(p, ",");
        snprintf(cand, sizeof(cand), "%.*s", (int) len, p);
        if (!with_suffix) /* compare like with like */
            *strrchr(cand, '.') = '\0';
        int d = recipe_edit_distance(lower, cand);
        if (d < best_d) {
            best_d = d;
            tie = false;
            snprintf(best, sizeof(best), "%s", cand);
        } else if (d == best_d) {
            tie = true;
        }
        p += len;
        p += strspn(p, ", ");
    }
    return best_d <= limit && !tie ? best : NULL;
}

static int parse_flavor(struct recipe *r, const struct ynode *v, struct moai_err *err)
{
    char where[512];

    if (v->kind == YNODE_SCALAR && !ynode_is_null(v)) {
        if (flavor_lookup(&r->flavor, v->value, err) < 0) {
            const char *near = nearest_flavor(v->value);
            if (near)
                moai_err_set(err, MOAI_EUSAGE, "unknown flavor '%s' (did you mean '%s'?)", v->value,
                             near);
            return moai_err_prefix(err, "%s", ynode_where(v, where, sizeof(where)));
        }
        return 0;
    }
    if (v->kind != YNODE_MAP)
        return bad_value(err, v, "flavor", "a catalog name or a mapping");

    const struct ynode *dev = ynode_get(v, "device"), *n = ynode_get(v, "devices");
    int64_t devices = 0, per_node = 0;
    for (size_t i = 0; i < v->n; i++) {
        const char *key = v->keys[i]->value;
        bool known = false;
        for (size_t j = 0; flavor_keys[j]; j++)
            known |= !strcmp(key, flavor_keys[j]);
        if (!known)
            return unknown_key(err, v->keys[i], "flavor", flavor_keys, count_list(flavor_keys));
    }
    if (!dev || dev->kind != YNODE_SCALAR || ynode_is_null(dev))
        return moai_err_set(err, MOAI_EUSAGE, "%s: missing key 'device' in 'flavor' (one of %s)",
                            ynode_where(v, where, sizeof(where)), flavor_device_names());
    if (!n)
        return moai_err_set(err, MOAI_EUSAGE, "%s: missing key 'devices' in 'flavor'",
                            ynode_where(v, where, sizeof(where)));
    if (!parse_int(n, &devices) || devices < 1 || devices > 1 << 20)
        return bad_value(err, n, "flavor.devices", "an integer >= 1");
    const struct ynode *pn = ynode_get(v, "devices_per_node");
    if (pn && (!parse_int(pn, &per_node) || per_node < 1 || per_node > devices))
        return bad_value(err, pn, "flavor.devices_per_node", "an integer in [1, devices]");
    if (flavor_custom(&r->flavor, dev->value, (int) devices, (int) per_node, err) < 0)
        return moai_err_prefix(err, "%s", ynode_where(dev, where, sizeof(where)));

    static const struct {
        const char *key;
        size_t offset;
    } figures[] = {
        {"tflops", offsetof(struct device_type, tflops)},
        {"hbm_gbps", offsetof(struct device_type, hbm_gbps)},
        {"intra_node_gbps", offsetof(struct device_type, intra_node_gbps)},
        {"inter_node_gbps", offsetof(struct device_type, inter_node_gbps)},
    };
    for (size_t i = 0; i < sizeof(figures) / sizeof(figures[0]); i++) {
        const struct ynode *f = ynode_get(v, figures[i].key);
        double x;
        char path[64];
        if (!f)
            continue;
        snprintf(path, sizeof(path), "flavor.%s", figures[i].key);
        if (!parse_float(f, &x) || x <= 0)
            return bad_value(err, f, path, "a number > 0");
        memcpy((char *) &r->flavor.device + figures[i].offset, &x, sizeof(x));
    }
    const struct ynode *mem = ynode_get(v, "memory_gb");
    if (mem) {
        double gb;
        if (!parse_float(mem, &gb) || gb <= 0 || gb > 1e6)
            return bad_value(err, mem, "flavor.memory_gb", "a number > 0 (GiB)");
        r->flavor.device.memory_bytes = (int64_t) (gb * 1073741824.0);
    }
    return 0;
}

/* Applies one schema row to the value node v (never NULL: absent keys get their default). */
static int apply_string(char **field, const struct recipe_key *k, const struct ynode *v,
                        struct moai_err *err)
{
    if (v->kind != YNODE_SCALAR || (!v->quoted && ynode_is_null(v)))
        return bad_value(err, v, k->path, "a string");
    if (!v->value[0])
        return bad_value(err, v, k->path, "a non-empty string");
    if (!(*field = strdup(v->value)))
        return moai_err_set(err, MOAI_ENOMEM, "out of memory");
    return 0;
}

/* Is v the plain scalar auto? */
static bool is_auto(const struct ynode *v)
{
    return v->kind == YNODE_SCALAR && !v->quoted && !strcmp(v->value, "auto");
}

/* An integer in k's range; 'auto' too for KT_INT_OR_AUTO. */
static int apply_int(struct recipe *r, const struct recipe_key *k, const struct ynode *v,
                     bool nullable, struct moai_err *err)
{
    char range[96], expected[128];
    int64_t i;
    bool or_auto = k->type == KT_INT_OR_AUTO;

    if (or_auto && is_auto(v)) {
        store_int(r, k, RECIPE_AUTO);
        return 0;
    }
    fmt_range(range, sizeof(range), k, true);
    if (!parse_int(v, &i) || !in_range(k, (double) i)) {
        if (or_auto)
            snprintf(expected, sizeof(expected), "'auto' or an integer%s", range);
        else
            snprintf(expected, sizeof(expected), "an integer%s%s", range,
                     nullable ? " or null" : "");
        return bad_value(err, v, k->path, expected);
    }
    store_int(r, k, i);
    return 0;
}

static int apply_float(double *field, const struct recipe_key *k, const struct ynode *v,
                       struct moai_err *err)
{
    char range[96], expected[128];
    double x;
    fmt_range(range, sizeof(range), k, false);
    if (!parse_float(v, &x) || !in_range(k, x)) {
        snprintf(expected, sizeof(expected), "a number%s", range);
        return bad_value(err, v, k->path, expected);
    }
    memcpy(field, &x, sizeof(x));
    return 0;
}

/* One of k's choices, stored as its index plus k->enum_base; else the list and a suggestion. */
static int apply_enum(struct recipe *r, const struct recipe_key *k, const struct ynode *v,
                      struct moai_err *err)
{
    size_t n = count_list(k->choices);
    char expected[256], where[512], what[256], sugg[128];
    if (v->kind == YNODE_SCALAR)
        for (size_t c = 0; c < n; c++)
            if (!strcmp(v->value, k->choices[c])) {
                store_int(r, k, (int64_t) c + k->enum_base);
                return 0;
            }
    size_t len = (size_t) snprintf(expected, sizeof(expected), "one of ");
    for (size_t c = 0; c < n; c++)
        len += (size_t) snprintf(expected + len, sizeof(expected) - len, "%s%s", c ? ", " : "",
                                 k->choices[c]);
    sugg[0] = '\0';
    if (v->kind == YNODE_SCALAR)
        fmt_suggestion(sugg, sizeof(sugg), v->value, k->choices, n);
    return moai_err_set(err, MOAI_EUSAGE, "%s: '%s' must be %s, not %s%s",
                        ynode_where(v, where, sizeof(where)), k->path, expected,
                        describe(v, what, sizeof(what)), sugg);
}

static int apply_betas(double *field, const struct recipe_key *k, const struct ynode *v,
                       struct moai_err *err)
{
    double betas[2];
    if (v->kind != YNODE_SEQ || v->n != 2)
        return bad_value(err, v, k->path, "a list of two numbers in [0, 1)");
    for (int j = 0; j < 2; j++)
        if (!parse_float(v->items[j], &betas[j]) || betas[j] < 0 || betas[j] >= 1)
            return bad_value(err, v->items[j], k->path, "a list of two numbers in [0, 1)");
    memcpy(field, betas, sizeof(betas));
    return 0;
}

static int apply_key(struct recipe *r, const struct recipe_key *k, const struct ynode *v,
                     struct moai_err *err)
{
    char *field = (char *) r + k->offset;
    bool b;
    bool nullable = k->def && !strcmp(k->def, "~");

    if (nullable && ynode_is_null(v)) {
        if (k->type == KT_INT)
            store_int(r, k, RECIPE_NONE);
        return 0; /* strings and objects stay NULL */
    }
    switch (k->type) {
    case KT_STRING:
        return apply_string((char **) field, k, v, err);
    case KT_INT:
    case KT_INT_OR_AUTO:
        return apply_int(r, k, v, nullable, err);
    case KT_FLOAT:
        return apply_float((double *) field, k, v, err);
    case KT_BOOL:
        if (!parse_bool(v, &b))
            return bad_value(err, v, k->path, "true or false");
        memcpy(field, &b, sizeof(b));
        return 0;
    case KT_BOOL_OR_AUTO:
        if (is_auto(v)) {
            store_int(r, k, RECIPE_AUTO);
            return 0;
        }
        if (!parse_bool(v, &b))
            return bad_value(err, v, k->path, "'auto', true or false");
        store_int(r, k, b);
        return 0;
    case KT_ENUM:
        return apply_enum(r, k, v, err);
    case KT_BETAS:
        return apply_betas((double *) field, k, v, err);
    case KT_OBJECT:
        if (v->kind != YNODE_MAP)
            return bad_value(err, v, k->path, "a mapping of config.json keys");
        if (!(*(json_t **) field = ynode_to_json(v)))
            return moai_err_set(err, MOAI_ENOMEM, "out of memory");
        return 0;
    case KT_FLAVOR:
        return parse_flavor(r, v, err);
    }
    return 0;
}

static const struct recipe_key *schema_find(const char *path)
{
    for (size_t i = 0; i < NSCHEMA; i++)
        if (!strcmp(schema[i].path, path))
            return &schema[i];
    return NULL;
}

/* Rejects unknown keys at every level, with suggestions from the same level. */
static int check_keys(const struct ynode *root, struct moai_err *err)
{
    for (size_t i = 0; i < root->n; i++) {
        const struct ynode *key = root->keys[i], *val = root->items[i];
        bool is_section = false, is_top = false;
        for (size_t s = 0; sections[s]; s++)
            is_section |= !strcmp(key->value, sections[s]);
        for (size_t s = 0; top_keys[s]; s++)
            is_top |= !strcmp(key->value, top_keys[s]);
        if (!is_top)
            return unknown_key(err, key, NULL, top_keys, count_list(top_keys));
        if (!is_section)
            continue;
        if (ynode_is_null(val))
            continue;
        if (val->kind != YNODE_MAP) {
            char expected[64];
            snprintf(expected, sizeof(expected), "a mapping of '%s.*' keys", key->value);
            return bad_value(err, val, key->value, expected);
        }
        const char *names[NSCHEMA];
        size_t nnames = 0, plen = strlen(key->value);
        for (size_t s = 0; s < NSCHEMA; s++)
            if (!strncmp(schema[s].path, key->value, plen) && schema[s].path[plen] == '.')
                names[nnames++] = schema[s].path + plen + 1;
        for (size_t j = 0; j < val->n; j++) {
            bool known = false;
            for (size_t s = 0; s < nnames; s++)
                known |= !strcmp(val->keys[j]->value, names[s]);
            if (!known)
                return unknown_key(err, val->keys[j], key->value, names, nnames);
        }
    }
    return 0;
}

/* The node a dotted schema path names in the tree, or NULL. */
static const struct ynode *lookup_path(const struct ynode *root, const char *path)
{
    const char *dot = strchr(path, '.');
    if (!dot)
        return ynode_get(root, path);
    char section[32];
    snprintf(section, sizeof(section), "%.*s", (int) (dot - path), path);
    return ynode_get(ynode_get(root, section), dot + 1);
}

/* The node of a --set VALUE for the key path. A key that takes a string (or a name from a list)
 * takes VALUE as it is: '### Answer:' is that text, not a YAML comment, and 'Answer:' not a
 * mapping; an empty VALUE is null (the default); a VALUE in double or single quotes is a YAML
 * quoted string (escapes like \n). Every other key (numbers, booleans, lists, mappings, a
 * flavor, a whole section) reads VALUE as YAML. *value is NULL for an empty document. */
static int set_value(struct ynode **value, const char *path, const char *text, const char *source,
                     struct moai_err *err)
{
    const struct recipe_key *k = schema_find(path);
    size_t len = strlen(text);
    /* a string in YAML quotes keeps YAML's meaning: "Q:\n{q}" has a newline */
    bool quoted = len >= 2 && (text[0] == '"' || text[0] == '\'') && text[len - 1] == text[0];
    *value = NULL;
    if (!k || (k->type != KT_STRING && k->type != KT_ENUM) || quoted) {
        int rc = ytree_parse_opt(value, text, strlen(text), source, false, err);
        size_t skip = strlen(source) + 2;
        if (rc == MOAI_EUSAGE && !strncmp(err->msg, source, strlen(source)) &&
            strlen(err->msg) > skip) {
            char why[sizeof(err->msg)];
            const char *inner = err->msg + skip;
            if (!strncmp(inner, "invalid YAML: ", 14))
                inner += 14;
            snprintf(why, sizeof(why), "%s", inner);
            return moai_err_set(err, rc, "%s: the value is not valid YAML (%s)", source, why);
        }
        return rc;
    }
    struct ynode *n = calloc(1, sizeof(*n));
    if (!n || !(n->source = strdup(source)) || !(n->value = strdup(text[0] ? text : "~"))) {
        ynode_free(n);
        return moai_err_set(err, MOAI_ENOMEM, "out of memory");
    }
    n->kind = YNODE_SCALAR;
    n->quoted = k->type == KT_STRING && text[0];
    *value = n;
    return 0;
}

/* Every node of the tree n without a position (the yaml tree is at most YTREE_MAX_DEPTH deep,
 * so the recursion is bounded). */
static void clear_positions(struct ynode *n)
{
    n->line = n->col = 0;
    for (size_t i = 0; i < n->n; i++) {
        if (n->keys)
            clear_positions(n->keys[i]);
        clear_positions(n->items[i]);
    }
}

/* Applies "KEY=VALUE" to the tree, creating mappings along the path as needed. */
static int apply_set(struct ynode **root, const char *set, struct moai_err *err)
{
    char source[600], path[256];
    const char *eq = strchr(set, '=');
    struct ynode *value = NULL;
    int rc;

    snprintf(source, sizeof(source), "--set %s", set);
    if (!eq || eq == set)
        return moai_err_set(err, MOAI_EUSAGE, "--set '%s': expected KEY=VALUE", set);
    if ((size_t) (eq - set) >= sizeof(path))
        return moai_err_set(err, MOAI_EUSAGE, "%s: key too long", source);
    memcpy(path, set, (size_t) (eq - set));
    path[eq - set] = '\0';

    rc = set_value(&value, path, eq + 1, source, err);
    if (rc < 0)
        return rc;
    if (!value) {
        value = calloc(1, sizeof(*value));
        if (!value || !(value->value = strdup("")) || !(value->source = strdup(source))) {
            ynode_free(value);
            return moai_err_set(err, MOAI_ENOMEM, "out of memory");
        }
    }
    /* Positions inside VALUE mean little on a command line: report the option instead. */
    clear_positions(value);

    if (!*root && !(*root = ynode_new_map(source))) {
        ynode_free(value);
        return moai_err_set(err, MOAI_ENOMEM, "out of memory");
    }
    struct ynode *map = *root;
    char *save = NULL, *part = strtok_r(path, ".", &save);
    char walked[256] = "";
    while (part) {
        char *next = strtok_r(NULL, ".", &save);
        if (!next) {
            if (ynode_set(map, part, value, source) < 0)
                return moai_err_set(err, MOAI_ENOMEM, "out of memory");
            return 0;
        }
        struct ynode *child = ynode_get(map, part);
        size_t wl = strlen(walked);
        snprintf(walked + wl, sizeof(walked) - wl, "%s%s", wl ? "." : "", part);
        if (!child || ynode_is_null(child)) {
            child = ynode_new_map(source);
            if (!child || ynode_set(map, part, child, source) < 0) {
                ynode_free(value);
                return moai_err_set(err, MOAI_ENOMEM, "out of memory");
            }
        } else if (child->kind != YNODE_MAP) {
            ynode_free(value);
            return moai_err_set(err, MOAI_EUSAGE, "%s: '%s' is not a mapping", source, walked);
        }
        map = child;
        part = next;
    }
    ynode_free(value);
    return moai_err_set(err, MOAI_EUSAGE, "--set '%s': empty key", set);
}

static char *default_cache_dir(void)
{
    const char *xdg = getenv("XDG_CACHE_HOME"), *home = getenv("HOME");
    char buf[4096];
    if (xdg && *xdg)
        snprintf(buf, sizeof(buf), "%s/moai-finetune", xdg);
    else if (home && *home)
        snprintf(buf, sizeof(buf), "%s/.cache/moai-finetune", home);
    else
        snprintf(buf, sizeof(buf), ".cache/moai-finetune");
    return strdup(buf);
}

/* The default save_dir: outputs/<the recipe file's name without its extension>, so that two
 * recipes never share a checkpoint directory by default ("outputs/stdin" for "-"). */
static char *default_save_dir(const char *source)
{
    const char *base = strrchr(source, '/');
    char name[256], buf[300];
    base = base ? base + 1 : source;
    if (!strcmp(source, "<stdin>"))
        base = "stdin";
    snprintf(name, sizeof(name), "%s", base);
    char *dot = strrchr(name, '.');
    if (dot && dot != name &&
        (!strcmp(dot, ".yaml") || !strcmp(dot, ".yml") || !strcmp(dot, ".json")))
        *dot = '\0';
    if (!name[0] || !strcmp(name, ".") || !strcmp(name, ".."))
        snprintf(name, sizeof(name), "recipe");
    snprintf(buf, sizeof(buf), "outputs/%s", name);
    return strdup(buf);
}

static int apply_environment(struct recipe *r, const struct recipe_overrides *ov,
                             struct moai_err *err)
{
    const char *env = getenv("MOAI_ENABLE_ADVANCED_PARALLELIZATION");
    if (env && *env) {
        if (!strcmp(env, "1"))
            r->parallel.advanced = true;
        else if (!strcmp(env, "0"))
            r->parallel.advanced = false;
        else
            return moai_err_set(err, MOAI_EUSAGE,
                                "MOAI_ENABLE_ADVANCED_PARALLELIZATION must be 0 or 1, not '%s'",
                                env);
    }
    if (ov && ov->ap >= 0)
        r->parallel.advanced = ov->ap != 0;
    return 0;
}
/* A tokenizer given as a directory (or the model directory, the default) means its
 * tokenizer.json when present, else its tokenizer.model. Returns 0 or -1 (out of memory). */
static int tokenizer_in_dir(char **tok)
{
    struct stat st;
    if (stat(*tok, &st) < 0 || !S_ISDIR(st.st_mode))
        return 0;
    size_t len = strlen(*tok) + sizeof("/tokenizer.model");
    char *path = malloc(len);
    if (!path)
        return -1;
    snprintf(path, len, "%s/tokenizer.json", *tok);
    if (access(path, F_OK) < 0)
        snprintf(path, len, "%s/tokenizer.model", *tok);
    free(*tok);
    *tok = path;
    return 0;
}

static int recipe_build(struct recipe *r, struct ynode *root, const char *source,
                        struct moai_err *err)
{
    int rc;
    char where[512];

    if (!root)
        return moai_err_set(err, MOAI_EUSAGE, "%s: empty recipe", source);
    if (root->kind != YNODE_MAP)
        return moai_err_set(err, MOAI_EUSAGE, "%s: expected a mapping at the top of the recipe",
                            ynode_where(root, where, sizeof(where)));
    if ((rc = check_keys(root, err)) < 0)
        return rc;

    for (size_t i = 0; i < NSCHEMA; i++) {
        const struct recipe_key *k = &schema[i];
        const struct ynode *v = lookup_path(root, k->path);
        struct ynode *def = NULL;
        if (!v) {
            if (!k->def) {
                const char *dot = strchr(k->path, '.');
                if (dot)
                    return moai_err_set(err, MOAI_EUSAGE, "%s: missing key '%s' in '%.*s'", source,
                                        dot + 1, (int) (dot - k->path), k->path);
                return moai_err_set(err, MOAI_EUSAGE, "%s: missing key '%s'", source, k->path);
            }
            rc = ytree_parse(&def, k->def, strlen(k->def), "default", err);
            MOAI_ASSERT(rc == 0 && def);
            v = def;
        }
        rc = apply_key(r, k, v, err);
        ynode_free(def);
        if (rc < 0)
            return rc;
    }

    if (!r->model.path && !r->model.config) {
        const struct ynode *m = ynode_get(root, "model");
        return moai_err_set(err, MOAI_EUSAGE, "%s: missing key 'path' in 'model'",
                            m ? ynode_where(m, where, sizeof(where)) : source);
    }
    if (!r->model.path && r->model.init == MODEL_INIT_PRETRAINED) {
        const struct ynode *m = ynode_get(root, "model");
        return moai_err_set(err, MOAI_EUSAGE,
                            "%s: 'model.init' is pretrained but there is no 'model.path' to load "
                            "weights from",
                            m ? ynode_where(m, where, sizeof(where)) : source);
    }
    if (!r->tokenizer && r->model.path && !(r->tokenizer = strdup(r->model.path)))
        return moai_err_set(err, MOAI_ENOMEM, "out of memory");
    if (r->tokenizer && tokenizer_in_dir(&r->tokenizer) < 0)
        return moai_err_set(err, MOAI_ENOMEM, "out of memory");
    if (r->dataset.format != RECIPE_FORMAT_TEXT && r->dataset.response_start) {
        const struct ynode *w = lookup_path(root, "dataset.response_start");
        return moai_err_set(err, MOAI_EUSAGE,
                            "%s: 'dataset.response_start' applies to dataset.format text only "
                            "(formats messages and alpaca mask by dataset.train_on)",
                            w ? ynode_where(w, where, sizeof(where)) : source);
    }
    if (!r->dataset.cache_dir && !(r->dataset.cache_dir = default_cache_dir()))
        return moai_err_set(err, MOAI_ENOMEM, "out of memory");
    if (!r->training.save_dir && !(r->training.save_dir = default_save_dir(source)))
        return moai_err_set(err, MOAI_ENOMEM, "out of memory");
    if (r->training.warmup_steps > 0 && r->training.max_steps != RECIPE_NONE &&
        r->training.warmup_steps > r->training.max_steps) {
        const struct ynode *w = lookup_path(root, "training.warmup_steps");
        return moai_err_set(err, MOAI_EUSAGE,
                            "%s: 'training.warmup_steps' (%lld) exceeds 'training.max_steps' "
                            "(%lld)",
                            ynode_where(w, where, sizeof(where)),
                            (long long) r->training.warmup_steps,
                            (long long) r->training.max_steps);
    }
    return 0;
}

int recipe_load_string(struct recipe *r, const char *text, size_t len, const char *source,
                       const struct recipe_overrides *ov, struct moai_err *err)
{
    struct ynode *root = NULL;
    int rc;

    memset(r, 0, sizeof(*r));
    if (!(r->source = strdup(source)))
        return moai_err_set(err, MOAI_ENOMEM, "out of memory");
    rc = ytree_parse(&root, text, len, source, err);
    for (int i = 0; rc == 0 && ov && i < ov->nsets; i++)
        rc = apply_set(&root, ov->sets[i], err);
    if (rc == 0)
        rc = recipe_build(r, root, source, err);
    if (rc == 0)
        rc = apply_environment(r, ov, err);
    ynode_free(root);
    if (rc < 0)
        recipe_release(r);
    return rc;
}

int recipe_load(struct recipe *r, const char *path, const struct recipe_overrides *ov,
                struct moai_err *err)
{
    FILE *f;
    char *text = NULL;
    size_t len = 0, cap = 0;
    const char *source = strcmp(path, "-") ? path : "<stdin>";
    int rc;

    memset(r, 0, sizeof(*r));
    f = strcmp(path, "-") ? fopen(path, "rb") : stdin;
    if (!f)
        return moai_err_set(err, MOAI_EUSAGE, "cannot open '%s': %s", path, strerror(errno));
    for (;;) {
        if (len + 4096 > cap) {
            char *t;
            cap = cap ? cap * 2 : 8192;
            if (cap > (64u << 20) || !(t = realloc(text, cap))) {
                free(text);
                if (f != stdin)
                    fclose(f);
                return moai_err_set(err, MOAI_EUSAGE, "%s: recipe too large", source);
            }
            text = t;
        }
        size_t got = fread(text + len, 1, cap - len, f);
        len += got;
        if (got == 0)
            break;
    }
    if (ferror(f)) {
        rc = moai_err_set(err, MOAI_EUSAGE, "cannot read '%s': %s", source, strerror(errno));
        free(text);
        if (f != stdin)
            fclose(f);
        return rc;
    }
    if (f != stdin)
        fclose(f);
    rc = recipe_load_string(r, text ? text : "", len, source, ov, err);
    free(text);
    return rc;
}

static int check_readable(const struct recipe *r, const char *key, const char *path, bool dir,
                          struct moai_err *err)
{
    struct stat st;
    if (stat(path, &st) < 0 || access(path, R_OK) < 0)
        return moai_err_set(err, MOAI_EUSAGE, "%s: '%s': cannot open '%s': %s", r->source, key,
                            path, strerror(errno));
    if (dir && !S_ISDIR(st.st_mode))
        return moai_err_set(err, MOAI_EUSAGE, "%s: '%s': '%s' is not a directory", r->source, key,
                            path);
    if (!dir && S_ISDIR(st.st_mode))
        return moai_err_set(err, MOAI_EUSAGE, "%s: '%s': '%s' is a directory", r->source, key,
                            path);
    return 0;
}

int recipe_check_files(const struct recipe *r, struct moai_err *err)
{
    char path[4096];
    bool skip_tokenizer = false;
    int rc;

    if (r->model.path) {
        if ((rc = check_readable(r, "model.path", r->model.path, true, err)) < 0)
            return rc;
        snprintf(path, sizeof(path), "%s/config.json", r->model.path);
        if ((rc = check_readable(r, "model.path", path, false, err)) < 0)
            return rc;
        if (r->model.init == MODEL_INIT_PRETRAINED && !recipe_has_weights(r)) {
            /* A directory with only config.json is how the shipped recipes of large models
             * come: it plans, and trains once the user adds the weights and tokenizer. */
            snprintf(path, sizeof(path), "%s/tokenizer.model", r->model.path);
            skip_tokenizer = r->tokenizer && !strcmp(r->tokenizer, path) && access(path, R_OK);
            log_warn("%s: '%s' holds no weights (model.safetensors or "
                     "model.safetensors.index.json)%s: planning works, training needs them",
                     r->source, r->model.path,
                     skip_tokenizer ? " and no tokenizer (tokenizer.json or tokenizer.model)" : "");
        }
    }
    if (!skip_tokenizer) {
        if (!r->tokenizer)
            return moai_err_set(err, MOAI_EUSAGE,
                                "%s: no tokenizer: set 'tokenizer' or 'model.path'", r->source);
        if ((rc = check_readable(r, "tokenizer", r->tokenizer, false, err)) < 0)
            return rc;
    }
    return check_readable(r, "dataset.path", r->dataset.path, false, err);
}

bool recipe_has_weights(const struct recipe *r)
{
    char path[4096];
    if (!r->model.path)
        return false;
    snprintf(path, sizeof(path), "%s/model.safetensors", r->model.path);
    if (access(path, R_OK) == 0)
        return true;
    snprintf(path, sizeof(path), "%s/model.safetensors.index.json", r->model.path);
    return access(path, R_OK) == 0;
}

void recipe_release(struct recipe *r)
{
    free(r->source);
    free(r->model.path);
    json_decref(r->model.config);
    free(r->tokenizer);
    free(r->dataset.path);
    free(r->dataset.template);
    free(r->dataset.response_start);
    free(r->dataset.cache_dir);
    free(r->training.save_dir);
    free(r->training.resume);
    memset(r, 0, sizeof(*r));
}

const char *recipe_precision_name(enum precision p)
{
    return precision_choices[p];
}

const char *recipe_lr_schedule_name(enum lr_schedule s)
{
    return schedule_choices[s];
}

const char *recipe_recompute_name(enum recompute m)
{
    return recompute_choices[m + 1];
}

static json_t *flavor_to_json(const struct flavor *f)
{
    if (!f->custom)
        return json_string(f->name);
    return json_pack("{s:s, s:i, s:i, s:f, s:f, s:f, s:f, s:f}", "device", f->device.name,
                     "devices", f->devices, "devices_per_node", f->devices_per_node, "memory_gb",
                     (double) f->device.memory_bytes / 1073741824.0, "tflops", f->device.tflops,
                     "hbm_gbps", f->device.hbm_gbps, "intra_node_gbps", f->device.intra_node_gbps,
                     "inter_node_gbps", f->device.inter_node_gbps);
}

static json_t *key_to_json(const struct recipe *r, const struct recipe_key *k)
{
    const char *field = (const char *) r + k->offset;
    int64_t i64 = 0;
    int i32 = 0;

    switch (k->type) {
    case KT_STRING: {
        const char *s = *(char *const *) field;
        return s ? json_string(s) : json_null();
    }
    case KT_INT:
    case KT_INT_OR_AUTO:
    case KT_BOOL_OR_AUTO:
    case KT_ENUM:
        if (k->width == sizeof(int64_t))
            memcpy(&i64, field, sizeof(i64));
        else {
            memcpy(&i32, field, sizeof(i32));
            i64 = i32;
        }
        if (k->type == KT_ENUM)
            return json_string(k->choices[i64 - k->enum_base]);
        if (k->type != KT_INT && i64 == RECIPE_AUTO)
            return json_string("auto");
        if (k->type == KT_BOOL_OR_AUTO)
            return json_boolean(i64);
        if (i64 == RECIPE_NONE)
            return json_null();
        return json_integer(i64);
    case KT_FLOAT:
        return json_real(*(const double *) field);
    case KT_BOOL:
        return json_boolean(*(const bool *) field);
    case KT_BETAS:
        return json_pack("[f, f]", ((const double *) field)[0], ((const double *) field)[1]);
    case KT_OBJECT: {
        json_t *o = *(json_t *const *) field;
        return o ? json_deep_copy(o) : json_null();
    }
    case KT_FLAVOR:
        return flavor_to_json(&r->flavor);
    }
    return json_null();
}

json_t *recipe_to_json(const struct recipe *r)
{
    json_t *root = json_object();
    for (size_t i = 0; root && i < NSCHEMA; i++) {
        const struct recipe_key *k = &schema[i];
        const char *dot = strchr(k->path, '.');
        json_t *v = key_to_json(r, k);
        if (!dot) {
            json_object_set_new(root, k->path, v);
            continue;
        }
        char section[32];
        snprintf(section, sizeof(section), "%.*s", (int) (dot - k->path), k->path);
        json_t *s = json_object_get(root, section);
        if (!s) {
            s = json_object();
            json_object_set_new(root, section, s);
        }
        json_object_set_new(s, dot + 1, v);
    }
    /* The effective AP switch, after the environment and the options. */
    json_object_set_new(json_object_get(root, "parallel"), "advanced",
                        json_boolean(r->parallel.advanced));
    return root;
}

/* For tests: the schema row of a dotted path exists. */
bool recipe_has_key(const char *path);
bool recipe_has_key(const char *path)
{
    return schema_find(path) != NULL;
}
