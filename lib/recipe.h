/* recipe.h - the YAML recipe: schema, defaults, overrides, validation.
 *
 * A recipe is read with libyaml into a small node tree, --set overrides are applied to the
 * tree, and the tree is checked against one schema table (recipe.c) that gives every key its
 * type, range, default and choices. Errors name the source, line and column:
 *
 *     recipe.yaml:7:3: unknown key 'batchsize' in 'training' (did you mean 'batch_size'?)
 *
 *     struct recipe r;
 *     if (recipe_load(&r, "configs/llama3-8b.yaml", sets, nsets, &err) < 0) ...
 *     ... r.training.batch_size ...
 *     recipe_release(&r);
 *
 * A loaded recipe owns its strings and its model.config object; recipe_release frees them.
 * Not thread-safe while loading; a loaded recipe is read-only and may be shared.
 */
#ifndef MOAI_RECIPE_H
#define MOAI_RECIPE_H

#include "err.h"
#include "flavor.h"

#include <jansson.h>
#include <stdbool.h>
#include <stdint.h>

#define RECIPE_AUTO (-1) /* an int or tristate left to the planner */
#define RECIPE_NONE (-1) /* an optional int that is null */

enum model_init {
    MODEL_INIT_PRETRAINED,
    MODEL_INIT_RANDOM,
};

enum lr_schedule {
    LR_SCHEDULE_CONSTANT,
    LR_SCHEDULE_LINEAR,
    LR_SCHEDULE_COSINE,
};

enum precision {
    PRECISION_BF16, /* bf16 weights/activations, fp32 master and optimizer */
    PRECISION_FP32,
};

enum recompute {
    RECOMPUTE_AUTO = -1,
    RECOMPUTE_NONE = 0,      /* printed 0 */
    RECOMPUTE_SELECTIVE = 1, /* attention internals only, printed 1 */
    RECOMPUTE_FULL = 2,      /* whole layers, printed full(2) */
};

/* dataset.format, dataset.chat_template, dataset.train_on (their names in recipe.c). */
enum recipe_format { RECIPE_FORMAT_TEXT, RECIPE_FORMAT_MESSAGES, RECIPE_FORMAT_ALPACA };
enum recipe_chat {
    RECIPE_CHAT_AUTO,
    RECIPE_CHAT_LLAMA3,
    RECIPE_CHAT_LLAMA2,
    RECIPE_CHAT_MISTRAL,
    RECIPE_CHAT_CHATML
};
enum recipe_train_on { RECIPE_TRAIN_ON_RESPONSES, RECIPE_TRAIN_ON_ALL };

struct recipe {
    char *source; /* the file name as given, "<stdin>" for "-" */

    struct {
        char *path;     /* model directory, NULL when only model.config is given */
        json_t *config; /* inline config.json keys (object), NULL when none */
        enum model_init init;
    } model;

    char *tokenizer; /* a file: the default (or a directory) resolved to its tokenizer.json,
                      * else tokenizer.model; NULL when neither tokenizer nor model.path */

    struct {
        char *path;
        char *template;       /* with {field} placeholders */
        char *response_start; /* NULL when unset */
        int64_t limit;        /* RECIPE_NONE for all records */
        bool shuffle;
        bool packing; /* whole examples packed into rows of block_size (data/pack.h) */
        /* not a key: the attention cost of a packed row against one example filling it,
         * mean(sum of its examples' squared lengths) / block_size^2, once the data is known
         * (exec); 0 (unknown) plans the worst case, 1 */
        double packed_attention;
        double validation_fraction;
        char *cache_dir; /* resolved default: $XDG_CACHE_HOME or ~/.cache, + /moai-finetune */
        enum recipe_format format;
        enum recipe_chat chat_template; /* RECIPE_CHAT_AUTO: from the tokenizer */
        enum recipe_train_on train_on;
    } dataset;

    struct {
        int64_t batch_size; /* global batch, sequences per optimizer step */
        int64_t block_size;
        int64_t epochs;
        int64_t max_steps; /* RECIPE_NONE for epochs x steps per epoch */
        double lr;
        enum lr_schedule lr_schedule;
        int64_t warmup_steps;
        double weight_decay;
        double betas[2];
        double eps;
        double grad_clip; /* 0 disables */
        enum precision precision;
        uint64_t seed;
        int64_t log_interval;
        char *save_dir;
        int64_t save_interval; /* RECIPE_NONE: only at the end */
        int64_t eval_interval; /* RECIPE_NONE: at each epoch's end and the end only */
        char *resume;          /* "auto", "never" or a checkpoint directory */
    } training;

    struct flavor flavor; /* resolved (catalog name or mapping with overrides) */

    struct {
        bool advanced;         /* after the environment variable and --ap/--no-ap */
        int dp, pp, tp;        /* RECIPE_AUTO or a pin */
        int num_micro_batches; /* RECIPE_AUTO or a pin */
        enum recompute recomputation;
        int distribute_param;          /* RECIPE_AUTO, 0 or 1 */
        int distribute_low_prec_param; /* RECIPE_AUTO, 0 or 1 */
    } parallel;
};

/* How AP was switched from outside the recipe: -1 leaves the recipe's value. */
struct recipe_overrides {
    const char *const *sets; /* "KEY=VALUE" strings from --set */
    int nsets;
    int ap; /* --ap 1, --no-ap 0, else -1 */
};

/* Loads path ("-" reads standard input), applies overrides, checks every key, fills
 * defaults, resolves the flavor and applies MOAI_ENABLE_ADVANCED_PARALLELIZATION (the
 * option wins over the variable, the variable over the recipe). Returns 0, or MOAI_EUSAGE for
 * any recipe error, a file that cannot be opened or read included (exit status 2, as every
 * usage error). On failure r holds nothing. */
int recipe_load(struct recipe *r, const char *path, const struct recipe_overrides *ov,
                struct moai_err *err);

/* Same from a string; source names it in messages. */
int recipe_load_string(struct recipe *r, const char *text, size_t len, const char *source,
                       const struct recipe_overrides *ov, struct moai_err *err);

/* Checks that the files the recipe names exist and are readable: the model directory and its
 * config.json (unless only inline), the tokenizer and the dataset. A model directory without
 * weights (and then without its default tokenizer.model) is only a warning, since planning
 * needs neither; loading the weights reports their absence as an error.
 * Returns 0 or MOAI_EUSAGE naming the key and the file. */
int recipe_check_files(const struct recipe *r, struct moai_err *err);

/* model.path holds model.safetensors or model.safetensors.index.json. */
bool recipe_has_weights(const struct recipe *r);

/* Frees what r holds. */
void recipe_release(struct recipe *r);

/* Names for messages and JSON: "bf16", "cosine", "selective", ... */
const char *recipe_precision_name(enum precision p);
const char *recipe_lr_schedule_name(enum lr_schedule s);
const char *recipe_recompute_name(enum recompute m);

/* The recipe as a JSON object with every key (for trainer_state.json and plan.json). */
json_t *recipe_to_json(const struct recipe *r);

/* Levenshtein distance, for "did you mean" suggestions. */
int recipe_edit_distance(const char *a, const char *b);

#endif
