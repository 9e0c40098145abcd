/* run.c - one recipe end to end: plan, data, weights, training, checkpoints (see run.h). */
#include "exec/run.h"

#include "data/batch.h"
#include "data/tokcache.h"
#include "data/tokenize.h"
#include "data/validate.h"
#include "data/tokenizer.h"
#include "exec/ckpt.h"
#include "exec/comm.h"
#include "exec/fingerprint.h"
#include "exec/train.h"
#include "log.h"
#include "model/config.h"
#include "model/llama.h"
#include "model/lora.h"
#include "model/optim.h"
#include "model/peft.h"
#include "model/safetensors.h"
#include "model/tensors.h"
#include "plan/plan.h"
#include "plan/report.h"

#include <errno.h>
#include <math.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

/* What the save callback needs. */
struct saver {
    const struct recipe *r;
    const struct model_config *cfg;
    const struct plan_result *plan;
    const struct batches *batches; /* the data order: where a step falls in its epoch */
    int64_t steps_per_epoch, total_steps;
    const struct train_result *progress; /* the running loop's figures (its last loss) */
    const json_t *fingerprint;           /* the run's (exec/fingerprint.h) */
    double *losses, *evals;              /* total_steps entries each, NAN where none: the history */
    const struct exec_opts *opts;        /* its report gets TRAIN_SAVING before the final save */
    bool final_announced;
    const char *tok_name; /* the tokenizer file's name in the checkpoint, NULL: none */
    char *tok_file;       /* the file to copy */
    json_t *tok_config;   /* tokenizer_config.json */
    const float *base;    /* LoRA: the frozen base (for lora.merge) */
};

static int file_exists(const char *path)
{
    return access(path, R_OK) == 0;
}

/* A list of tensors to write, with the names they own. */
struct entries {
    struct st_write_tensor *t;
    char (*names)[160];
    int n, cap;
};

/* Appends the model's tensors over a flat arena (Hugging Face order), each name followed by
 * suffix. */
static int entries_add(struct entries *e, const struct model_config *cfg, const float *arena,
                       const char *suffix)
{
    struct llama_params p;
    int64_t count = llama_tensor_count(cfg);
    if (llama_params_init(&p, cfg, (float *) arena, NULL) < 0)
        return MOAI_ENOMEM;
    if (e->n + count > e->cap) {
        int cap = e->n + (int) count;
        struct st_write_tensor *t = realloc(e->t, (size_t) cap * sizeof(*t));
        char(*names)[160] = t ? realloc(e->names, (size_t) cap * sizeof(*names)) : NULL;
        if (t)
            e->t = t;
        if (!names) {
            llama_params_release(&p);
            return MOAI_ENOMEM;
        }
        e->names = names;
        e->cap = cap;
    }
    for (int64_t i = 0; i < count; i++) {
        struct llama_tensor lt;
        struct st_write_tensor *t = &e->t[e->n];
        llama_tensor_at(&lt, &p, cfg, i);
        snprintf(e->names[e->n], sizeof(e->names[0]), "%s%s", lt.name, suffix);
        memset(t, 0, sizeof(*t));
        t->ndim = lt.ndim;
        t->shape[0] = lt.shape[0];
        t->shape[1] = lt.shape[1];
        t->data = lt.data;
        e->n++;
    }
    for (int i = 0; i < e->n; i++) /* names may have moved with the realloc */
        e->t[i].name = e->names[i];
    llama_params_release(&p);
    return 0;
}

static void entries_release(struct entries *e)
{
    free(e->t);
    free(e->names);
    memset(e, 0, sizeof(*e));
}

/* trainer_state.json's "log_history": every step's loss and every evaluation up to
 * steps_done, in step order, as Hugging Face's trainer keeps it:
 *     [{"step": 1, "loss": 2.5}, ..., {"step": 10, "validation_loss": 2.3, "perplexity": 9.97}]
 */
static json_t *history_json(const struct saver *sv, int64_t steps_done)
{
    json_t *h = json_array();
    for (int64_t i = 0; h && sv->losses && i < steps_done && i < sv->total_steps; i++) {
        if (!isnan(sv->losses[i]))
            json_array_append_new(
                h, json_pack("{s:I, s:f}", "step", (json_int_t) (i + 1), "loss", sv->losses[i]));
        if (!isnan(sv->evals[i]) && isfinite(exp(sv->evals[i])))
            json_array_append_new(h, json_pack("{s:I, s:f, s:f}", "step", (json_int_t) (i + 1),
                                               "validation_loss", sv->evals[i], "perplexity",
                                               exp(sv->evals[i])));
    }
    return h;
}

/* Fills the history arrays (total entries each) from a resumed checkpoint's log_history
 * (entries past total are dropped). */
static void history_load(double *losses, double *evals, int64_t total, const json_t *state)
{
    size_t i;
    json_t *e;
    json_array_foreach(json_object_get(state, "log_history"), i, e)
    {
        json_int_t step = json_integer_value(json_object_get(e, "step"));
        json_t *l = json_object_get(e, "loss"), *v = json_object_get(e, "validation_loss");
        if (step < 1 || step > total)
            continue;
        if (json_is_number(l))
            losses[step - 1] = json_number_value(l);
        if (json_is_number(v))
            evals[step - 1] = json_number_value(v);
    }
}

/* Where the step after steps_done falls: its epoch and index (past the epochs counted under
 * packing: the start of the next one). */
static void data_position(const struct saver *sv, int64_t steps_done, int64_t *epoch,
                          int64_t *index)
{
    const struct batches *b = sv->batches;
    if (b && b->lengths && steps_done >= batch_steps_of_epochs(b, b->nepochs)) {
        *epoch = b->nepochs;
        *index = 0;
    } else if (b) {
        batch_step_at(b, steps_done, epoch, index);
    } else {
        *epoch = steps_done / sv->steps_per_epoch;
        *index = steps_done % sv->steps_per_epoch;
    }
}

static json_t *trainer_state(const struct saver *sv, int64_t steps_done)
{
    json_t *s = json_object();
    int64_t epoch, index;
    data_position(sv, steps_done, &epoch, &index);
    json_object_set_new(s, "format", json_string("moai-finetune trainer state 2"));
    json_object_set_new(s, "step", json_integer(steps_done));
    json_object_set_new(s, "total_steps", json_integer(sv->total_steps));
    json_object_set_new(s, "steps_per_epoch", json_integer(sv->steps_per_epoch));
    json_object_set_new(s, "epoch", json_integer(epoch));
    /* The data order is a pure function of (seed, epoch): the position is all there is to
     * the shuffling RNG's state. */
    json_object_set_new(
        s, "data_position",
        json_pack("{s:I, s:I}", "epoch", (json_int_t) epoch, "index", (json_int_t) index));
    json_object_set_new(s, "rng",
                        json_pack("{s:s, s:I}", "kind", "splitmix64 per epoch", "seed",
                                  (json_int_t) sv->r->training.seed));
    json_object_set_new(s, "last_loss", json_real(sv->progress ? sv->progress->last_loss : 0.0));
    json_object_set_new(s, "log_history", history_json(sv, steps_done));
    json_object_set_new(s, "fingerprint", json_deep_copy(sv->fingerprint));
    json_object_set_new(s, "recipe", recipe_to_json(sv->r));
    return s;
}

/* generation_config.json as Hugging Face's GenerationConfig.from_model_config writes it: the
 * special tokens generation starts, stops and pads with (absent ids are left out). */
static json_t *generation_config(const struct model_config *cfg)
{
    json_t *g = json_object();
    if (!g)
        return NULL;
    json_object_set_new(g, "_from_model_config", json_true());
    if (cfg->bos_token_id >= 0)
        json_object_set_new(g, "bos_token_id", json_integer(cfg->bos_token_id));
    if (cfg->eos_token_id >= 0)
        json_object_set_new(g, "eos_token_id", json_integer(cfg->eos_token_id));
    if (cfg->pad_token_id >= 0)
        json_object_set_new(g, "pad_token_id", json_integer(cfg->pad_token_id));
    return g;
}

/* The caller learns once that training is done and the final checkpoint is being written. */
static void announce_final_save(struct saver *sv, int64_t steps_done)
{
    if (steps_done == sv->total_steps && !sv->final_announced && sv->opts->report) {
        sv->final_announced = true;
        sv->opts->report(sv->opts->arg, &(struct train_event){.kind = TRAIN_SAVING,
                                                              .total_steps = sv->total_steps});
    }
}

/* What every checkpoint ends with, after its weights (rc: how they went): the tokenizer's
 * files, plan.json, trainer_state.json, then the commit that makes the whole of it the
 * checkpoint of save_dir (or the abort that leaves the previous one). what names it in the
 * log: "checkpoint" or "adapter". */
static int stage_finish(struct ckpt_stage *stage, struct saver *sv, int64_t steps_done,
                        const char *what, int rc, struct moai_err *err)
{
    const struct recipe *r = sv->r;
    json_t *state = rc == 0 ? trainer_state(sv, steps_done) : NULL;
    json_t *plan = rc == 0 ? plan_to_json(&sv->plan->best, sv->cfg, r) : NULL;

    if (rc == 0 && sv->tok_name)
        rc = ckpt_stage_copy_file(stage, sv->tok_name, sv->tok_file, err);
    if (rc == 0 && sv->tok_config)
        rc = ckpt_stage_write_json(stage, "tokenizer_config.json", sv->tok_config, err);
    if (rc == 0)
        rc = ckpt_stage_write_json(stage, "plan.json", plan, err);
    if (rc == 0)
        rc = ckpt_stage_write_json(stage, "trainer_state.json", state, err);
    if (rc == 0)
        rc = ckpt_stage_commit(stage, err);
    if (rc < 0)
        ckpt_stage_abort(stage);
    else
        log_info("%s saved in '%s' at step %lld", what, r->training.save_dir,
                 (long long) steps_done);
    json_decref(state);
    json_decref(plan);
    return rc;
}

static int save_lora(struct saver *sv, int64_t steps_done, const float *a, const float *m,
                     const float *v, struct moai_err *err);

/* The train_save_fn: a whole checkpoint into save_dir, atomically. */
static int save(void *arg, int64_t steps_done, const float *params, const float *m, const float *v,
                struct moai_err *err)
{
    struct saver *sv = arg;
    if (sv->r->lora.enabled)
        return save_lora(sv, steps_done, params, m, v, err);
    const struct recipe *r = sv->r;
    struct ckpt_stage stage;
    char path[4096];
    bool bf16 = r->training.precision == PRECISION_BF16;
    struct model_config out = *sv->cfg;
    int rc;

    announce_final_save(sv, steps_done);
    snprintf(out.torch_dtype, sizeof(out.torch_dtype), "%s", bf16 ? "bfloat16" : "float32");
    if ((rc = ckpt_stage_begin(&stage, r->training.save_dir, err)) < 0)
        return rc;
    json_t *config = model_config_to_json(&out);
    json_t *gen = generation_config(sv->cfg);
    rc = ckpt_stage_write_json(&stage, "config.json", config, err);
    if (rc == 0) { /* model.safetensors, or shards and their index past 5 GB */
        struct entries e = {0};
        int nshards = 0;
        if (entries_add(&e, sv->cfg, params, "") < 0)
            rc = moai_err_set(err, MOAI_ENOMEM, "out of memory writing the weights");
        else
            rc = st_write_sharded(stage.tmp, "model", e.n, e.t, bf16 ? ST_BF16 : ST_F32,
                                  ST_DEFAULT_SHARD_BYTES, &nshards, err);
        entries_release(&e);
    }
    if (rc == 0 && gen)
        rc = ckpt_stage_write_json(&stage, "generation_config.json", gen, err);
    else if (rc == 0)
        rc = moai_err_set(err, MOAI_ENOMEM, "out of memory writing generation_config.json");
    if (rc == 0) {
        /* Adam's moments, and the fp32 weights when the model file holds them in bf16:
         * resuming continues from exactly the state the run had. */
        struct entries e = {0};
        if (entries_add(&e, sv->cfg, m, ".exp_avg") < 0 ||
            entries_add(&e, sv->cfg, v, ".exp_avg_sq") < 0 ||
            (bf16 && entries_add(&e, sv->cfg, params, ".master") < 0))
            rc = moai_err_set(err, MOAI_ENOMEM, "out of memory writing the optimizer state");
        else
            rc = st_write(ckpt_stage_path(&stage, "optimizer.safetensors", path, sizeof(path)), e.n,
                          e.t, ST_F32, err);
        entries_release(&e);
    }
    rc = stage_finish(&stage, sv, steps_done, "checkpoint", rc, err);
    json_decref(config);
    json_decref(gen);
    return rc;
}

/* The merged model (W + (alpha / r) B A over the frozen base) as model.safetensors, with its
 * config.json and generation_config.json, into the stage. */
static int stage_merged(struct ckpt_stage *stage, const struct saver *sv,
                        const struct lora_params *a, const struct lora_config *lc,
                        struct moai_err *err)
{
    const struct model_config *cfg = sv->cfg;
    bool bf16 = sv->r->training.precision == PRECISION_BF16;
    struct model_config out = *cfg;
    struct llama_params merged;
    struct entries e = {0};
    int rc;

    if ((rc = llama_params_init(&merged, cfg, NULL, err)) < 0)
        return rc;
    memcpy(merged.arena, sv->base, sizeof(float) * (size_t) merged.nfloats);
    lora_merge(&merged, a, cfg, lc);
    snprintf(out.torch_dtype, sizeof(out.torch_dtype), "%s", bf16 ? "bfloat16" : "float32");
    json_t *config = model_config_to_json(&out), *gen = generation_config(cfg);
    rc = ckpt_stage_write_json(stage, "config.json", config, err);
    if (rc == 0 && gen)
        rc = ckpt_stage_write_json(stage, "generation_config.json", gen, err);
    if (rc == 0 && entries_add(&e, cfg, merged.arena, "") < 0)
        rc = moai_err_set(err, MOAI_ENOMEM, "out of memory writing the merged weights");
    else if (rc == 0)
        rc = st_write_sharded(stage->tmp, "model", e.n, e.t, bf16 ? ST_BF16 : ST_F32,
                              ST_DEFAULT_SHARD_BYTES, NULL, err);
    entries_release(&e);
    json_decref(config);
    json_decref(gen);
    llama_params_release(&merged);
    return rc;
}

/* A LoRA run's checkpoint: the adapter in PEFT's format (adapter_config.json,
 * adapter_model.safetensors), the adapters' moments (optimizer.safetensors), the trainer
 * state, the plan and the tokenizer; with lora.merge the merged model too. */
static int save_lora(struct saver *sv, int64_t steps_done, const float *a, const float *m,
                     const float *v, struct moai_err *err)
{
    const struct recipe *r = sv->r;
    struct lora_config lc = {r->lora.rank, r->lora.alpha, r->lora.dropout, r->lora.targets,
                             r->training.seed};
    struct lora_params pa, pm, pv;
    struct ckpt_stage stage;
    char path[4096];
    int rc;

    announce_final_save(sv, steps_done);
    memset(&pa, 0, sizeof(pa));
    memset(&pm, 0, sizeof(pm));
    memset(&pv, 0, sizeof(pv));
    if ((rc = lora_params_init(&pa, sv->cfg, lc.rank, lc.targets, 0, (float *) a, err)) < 0 ||
        (rc = lora_params_init(&pm, sv->cfg, lc.rank, lc.targets, 0, (float *) m, err)) < 0 ||
        (rc = lora_params_init(&pv, sv->cfg, lc.rank, lc.targets, 0, (float *) v, err)) < 0)
        goto out;
    if ((rc = ckpt_stage_begin(&stage, r->training.save_dir, err)) < 0)
        goto out;
    json_t *config = peft_config_json(&lc, r->model.path);
    rc = config ? ckpt_stage_write_json(&stage, PEFT_CONFIG, config, err)
                : moai_err_set(err, MOAI_ENOMEM, "out of memory writing %s", PEFT_CONFIG);
    if (rc == 0)
        rc = peft_write_weights(ckpt_stage_path(&stage, PEFT_WEIGHTS, path, sizeof(path)), &pa,
                                sv->cfg, &lc, err);
    if (rc == 0)
        rc =
            peft_write_moments(ckpt_stage_path(&stage, "optimizer.safetensors", path, sizeof(path)),
                               &pm, &pv, sv->cfg, &lc, err);
    if (rc == 0 && r->lora.merge)
        rc = stage_merged(&stage, sv, &pa, &lc, err);
    rc = stage_finish(&stage, sv, steps_done, "adapter", rc, err);
    json_decref(config);
out:
    lora_params_release(&pv);
    lora_params_release(&pm);
    lora_params_release(&pa);
    return rc;
}

/* A block longer than the positions the model was trained on: rotary embeddings past
 * max_position_embeddings are out of distribution, unless the config extends the context
 * (rope scaling). */
static int check_context(const struct recipe *r, const struct model_config *cfg,
                         struct moai_err *err)
{
    if (r->training.block_size <= cfg->max_position_embeddings ||
        cfg->rope_scaling.type != ROPE_SCALING_NONE)
        return 0;
    moai_err_set(err, MOAI_EUSAGE,
                 "%s: 'training.block_size' (%lld) exceeds the model's max_position_embeddings "
                 "(%lld)",
                 r->source, (long long) r->training.block_size,
                 (long long) cfg->max_position_embeddings);
    return moai_err_hint(err, "lower training.block_size, or extend the model's context with "
                              "rope scaling (model.config.rope_scaling)");
}

int exec_load_model_config(const struct recipe *r, struct model_config *cfg, struct moai_err *err)
{
    char path[4096];
    if (r->model.path)
        snprintf(path, sizeof(path), "%s/config.json", r->model.path);
    int rc = model_config_load(cfg, r->model.path ? path : NULL, r->model.config, err);
    if (rc < 0 && !r->model.path)
        moai_err_prefix(err, "%s", r->source);
    if (rc == 0)
        rc = check_context(r, cfg, err);
    return rc == MOAI_EIO ? MOAI_EUSAGE : rc;
}

/* The batch order as the training loop sees it: every device thread asks for the same step's rows,
 * so the epoch's order is computed once into a buffer allocated before training (nothing can
 * fail inside the loop). */
struct order_cache {
    const struct batches *b;
    pthread_mutex_t lock;
    int64_t *order; /* (n_train) */
    int64_t epoch;  /* whose order it holds; -1: none */
};

static void rows_of(void *arg, int64_t epoch, int64_t index, int64_t *rows)
{
    struct order_cache *c = arg;
    int64_t B = c->b->batch_size;
    pthread_mutex_lock(&c->lock);
    if (c->epoch != epoch) {
        batch_epoch_order(c->b, epoch, c->order);
        c->epoch = epoch;
    }
    memcpy(rows, c->order + index * B, (size_t) B * sizeof(int64_t));
    pthread_mutex_unlock(&c->lock);
}

/* Packing: the loop's rows and its steps' places from the packer (data/batch.h). */
static void packed_rows_of(void *arg, int64_t epoch, int64_t index, int64_t *rows)
{
    batch_packer_rows(arg, epoch, index, rows);
}

static bool packed_step_at(void *arg, int64_t step, int64_t *epoch, int64_t *index)
{
    const struct batch_packer *k = arg;
    return batch_step_at(k->b, step, epoch, index);
}

/* The records of a data set as the loop reads them: the rows listed (all when rows is NULL),
 * copied into arrays of their own. */
struct records {
    struct train_records view;
    int32_t *tokens, *labels, *lengths;
};

static int records_init(struct records *rec, const struct tokenized *ds, const int64_t *rows,
                        int64_t n)
{
    int64_t T = ds->T;
    memset(rec, 0, sizeof(*rec));
    rec->tokens = malloc((size_t) (n * T + 1) * sizeof(int32_t));
    rec->labels = malloc((size_t) (n * T + 1) * sizeof(int32_t));
    rec->lengths = malloc((size_t) (n + 1) * sizeof(int32_t));
    if (!rec->tokens || !rec->labels || !rec->lengths)
        return MOAI_ENOMEM;
    for (int64_t i = 0; i < n; i++) {
        int64_t src = rows ? rows[i] : i;
        memcpy(rec->tokens + i * T, ds->tokens + src * T, (size_t) T * sizeof(int32_t));
        memcpy(rec->labels + i * T, ds->labels + src * T, (size_t) T * sizeof(int32_t));
        rec->lengths[i] = (int32_t) ds->lengths[src];
    }
    rec->view = (struct train_records){
        .n = n, .T = T, .tokens = rec->tokens, .labels = rec->labels, .lengths = rec->lengths};
    return 0;
}

static void records_release(struct records *rec)
{
    free(rec->tokens);
    free(rec->labels);
    free(rec->lengths);
    memset(rec, 0, sizeof(*rec));
}

/* The hint of a refused resume: how to go on without losing the checkpoint. */
static void resume_hint(struct moai_err *err, const struct recipe *r)
{
    if (strcmp(r->training.resume, "auto")) {
        moai_err_hint(err, "name a checkpoint of this run in training.resume, or set it to auto");
        return;
    }
    moai_err_hint(err,
                  "train into another directory (training.save_dir), or set training.resume: "
                  "never to start over in '%s' (its checkpoint is then moved aside into "
                  "'%s/previous-N', not deleted)",
                  r->training.save_dir, r->training.save_dir);
}

/* Reads trainer_state.json of the checkpoint in dir and checks that it is this run's (the
 * fingerprint fp). Returns the state (new reference) or NULL with err set: MOAI_EUSAGE when the
 * checkpoint is of another run or has no trainer_state.json, MOAI_EIO when it is unreadable. */
static json_t *resume_state(const struct recipe *r, const char *dir, const json_t *fp,
                            struct moai_err *err)
{
    char path[4096], what[768], found[64];
    json_error_t jerr;

    snprintf(path, sizeof(path), "%s/trainer_state.json", dir);
    if (access(path, F_OK) != 0) {
        if (ckpt_present(dir, found, sizeof(found)))
            moai_err_set(err, MOAI_EUSAGE,
                         "cannot resume from '%s': it holds %s but no trainer_state.json, so "
                         "which run it is and where it stopped are unknown",
                         dir, found);
        else
            moai_err_set(err, MOAI_EUSAGE, "cannot resume from '%s': it holds no checkpoint", dir);
        resume_hint(err, r);
        return NULL;
    }
    json_t *state = json_load_file(path, 0, &jerr);
    if (!state) {
        moai_err_set(err, MOAI_EIO, "%s:%d: cannot resume: %s", path, jerr.line,
                     moai_oneline(jerr.text));
        return NULL;
    }
    json_t *step = json_object_get(state, "step");
    const json_t *was = json_object_get(state, "fingerprint");
    if (!json_is_integer(step) || json_integer_value(step) < 0) {
        moai_err_set(err, MOAI_EIO, "%s: cannot resume: 'step' is not a count", path);
    } else if (!json_is_object(was)) {
        moai_err_set(err, MOAI_EUSAGE,
                     "cannot resume from '%s': its trainer_state.json records no run fingerprint "
                     "(an older moai-finetune wrote it), so whether it is this run is unknown",
                     dir);
        resume_hint(err, r);
    } else if (fingerprint_diff(was, fp, what, sizeof(what)) > 0) {
        moai_err_set(err, MOAI_EUSAGE,
                     "cannot resume from '%s': its checkpoint is of another run: %s", dir, what);
        resume_hint(err, r);
    } else {
        return state;
    }
    json_decref(state);
    return NULL;
}

/* Reads a checkpoint of save_dir into the host arenas; *steps_done from trainer_state.json.
 * The checkpoint must be of this run (fingerprint fp). */
static int resume_from(const struct recipe *r, const struct model_config *cfg, const json_t *fp,
                       float *params, float *m, float *v, int64_t *steps_done, double *losses,
                       double *evals, int64_t total, struct moai_err *err)
{
    char path[4096];
    int rc;

    json_t *state = resume_state(r, r->training.save_dir, fp, err);
    if (!state)
        return err->code;
    *steps_done = json_integer_value(json_object_get(state, "step"));
    history_load(losses, evals, total, state);
    json_decref(state);

    struct st_set set;
    if ((rc = st_set_open_dir(&set, r->training.save_dir, err)) < 0)
        return rc;
    rc = model_tensors_load(cfg, &set, params, r->training.save_dir, err);
    st_set_close(&set);
    if (rc < 0)
        return rc;
    snprintf(path, sizeof(path), "%s/optimizer.safetensors", r->training.save_dir);
    struct st_file f;
    if ((rc = st_open(&f, path, err)) < 0)
        return rc;
    struct llama_params views[3];
    float *dst[3] = {m, v, params};
    memset(views, 0, sizeof(views));
    for (int k = 0; k < 3 && rc == 0; k++)
        if (llama_params_init(&views[k], cfg, dst[k], NULL) < 0)
            rc = moai_err_set(err, MOAI_ENOMEM, "out of memory reading '%s'", path);
    int64_t count = llama_tensor_count(cfg);
    for (int64_t i = 0; i < count && rc == 0; i++) {
        static const char *const suffix[] = {".exp_avg", ".exp_avg_sq", ".master"};
        for (int k = 0; k < 3 && rc == 0; k++) {
            struct llama_tensor lt;
            char name[200];
            llama_tensor_at(&lt, &views[k], cfg, i);
            snprintf(name, sizeof(name), "%s%s", lt.name, suffix[k]);
            const struct st_tensor *t = st_find(&f, name);
            if (!t) {
                if (k < 2)
                    rc = moai_err_set(err, MOAI_EIO, "%s: tensor '%s' is missing", path, name);
                continue;
            }
            if (t->numel != lt.numel)
                rc = moai_err_set(err, MOAI_EIO, "%s: tensor '%s' has %lld elements, not %lld",
                                  path, name, (long long) t->numel, (long long) lt.numel);
            else
                rc = st_to_f32(t, lt.data, err);
        }
    }
    for (int k = 0; k < 3; k++)
        llama_params_release(&views[k]);
    st_close(&f);
    return rc;
}

/* LoRA's starting adapters into *a (the whole model's): a LoRA checkpoint's to resume (then its
 * moments into *m and *v, its step and history), else lora.adapter's (fresh moments), else
 * PEFT's init from training.seed. The base was loaded from model.path as for a fresh run. */
static int lora_start(const struct recipe *r, const struct model_config *cfg,
                      const char *resume_dir, const json_t *fp, struct lora_params *a,
                      struct lora_params *m, struct lora_params *v, int64_t *start, double *losses,
                      double *evals, int64_t total, struct moai_err *err)
{
    struct lora_config lc = {r->lora.rank, r->lora.alpha, r->lora.dropout, r->lora.targets,
                             r->training.seed};
    char path[4096];
    int rc = lora_params_init(a, cfg, lc.rank, lc.targets, 0, NULL, err);
    if (rc < 0)
        return rc;
    if (resume_dir) {
        json_t *state = resume_state(r, resume_dir, fp, err);
        if (!state)
            return err->code;
        *start = json_integer_value(json_object_get(state, "step"));
        history_load(losses, evals, total, state);
        json_decref(state);
        snprintf(path, sizeof(path), "%s/optimizer.safetensors", resume_dir);
        if ((rc = lora_params_init(m, cfg, lc.rank, lc.targets, 0, NULL, err)) < 0 ||
            (rc = lora_params_init(v, cfg, lc.rank, lc.targets, 0, NULL, err)) < 0 ||
            (rc = peft_read_weights(resume_dir, a, cfg, &lc, err)) < 0 ||
            (rc = peft_read_moments(path, m, v, cfg, &lc, err)) < 0)
            return rc;
        log_info("resuming the adapter from '%s' after step %lld of %lld", resume_dir,
                 (long long) *start, (long long) total);
        return 0;
    }
    if (r->lora.adapter) {
        if ((rc = peft_read_weights(r->lora.adapter, a, cfg, &lc, err)) < 0)
            return moai_err_prefix(err, "%s: 'lora.adapter'", r->source);
        log_info("continuing the adapter '%s'", r->lora.adapter);
        return 0;
    }
    lora_init_peft(a, cfg, cfg, 0, lc.rank, lc.targets, lc.seed);
    return 0;
}

/* Under MPI: process 0's adapters (and moments when resuming) on every process. */
static int lora_bcast(struct comm_world *world, const struct model_config *cfg,
                      const struct recipe *r, struct lora_params *a, struct lora_params *m,
                      struct lora_params *v, struct moai_err *err)
{
    int64_t has = m->arena != NULL;
    comm_world_bcast(world, &has, sizeof(has));
    bool ok = true;
    if (has && !m->arena)
        ok = lora_params_init(m, cfg, r->lora.rank, r->lora.targets, 0, NULL, err) == 0 &&
             lora_params_init(v, cfg, r->lora.rank, r->lora.targets, 0, NULL, err) == 0;
    if (!comm_world_agree(world, ok))
        return moai_err_set(err, MOAI_ENOMEM, "out of memory for the adapters' optimizer state");
    size_t bytes = sizeof(float) * (size_t) a->nfloats;
    comm_world_bcast(world, a->arena, bytes);
    if (has) {
        comm_world_bcast(world, m->arena, bytes);
        comm_world_bcast(world, v->arena, bytes);
    }
    return 0;
}

/* A checkpoint writes config.json, model.safetensors and the tokenizer by name: saving into
 * the model's own directory would replace the user's model. Both paths resolved, so "." and
 * links are seen through. */
static int save_dir_is_not_the_model(const struct recipe *r, struct moai_err *err)
{
    char *save = r->model.path ? realpath(r->training.save_dir, NULL) : NULL;
    char *model = save ? realpath(r->model.path, NULL) : NULL;
    bool same = model && !strcmp(save, model);
    free(save);
    free(model);
    if (same)
        return moai_err_set(err, MOAI_EUSAGE,
                            "%s: 'training.save_dir' is the model's directory '%s': a checkpoint "
                            "would overwrite its config.json and weights",
                            r->source, r->model.path);
    return 0;
}

int exec_check_save_dir(const struct recipe *r, struct moai_err *err)
{
    int rc = save_dir_is_not_the_model(r, err);
    if (rc < 0)
        return rc;
    rc = ckpt_check_writable(r->training.save_dir, err);
    return rc < 0 ? moai_err_prefix(err, "%s: 'training.save_dir'", r->source) : 0;
}

/* Takes save_dir for this run (exec/ckpt.h): it must be writable, and no other run may hold
 * it. Before any training, so a run that cannot save stops at once. */
static int hold_save_dir(const struct recipe *r, struct ckpt_lock *lock, struct moai_err *err)
{
    int rc = ckpt_lock_acquire(lock, r->training.save_dir, err);
    return rc < 0 ? moai_err_prefix(err, "%s: 'training.save_dir'", r->source) : 0;
}

/* The whole process's predicted peak (plan/mem.h) once the data set is known; on the cpu
 * device a prediction past this machine's memory stops the run before it loads the weights,
 * rather than the kernel killing it later. */
static int check_process_memory(struct mem_process *pm, const struct model_config *cfg,
                                const struct recipe *r, const struct plan *p,
                                const struct comm_world *world, const struct tokenized *data,
                                const struct batches *b, bool resume, int64_t runtime_bytes,
                                struct moai_err *err)
{
    int ndev = p->lay.dp * p->lay.pp * p->lay.tp;
    struct mem_process_in in = {.first_device = world ? world->first_dev : 0,
                                .devices = world ? world->nlocal : ndev,
                                .examples = data->n,
                                .valid_examples = b->n_val,
                                .resume = resume,
                                .runtime_bytes = runtime_bytes};
    if (mem_process(pm, cfg, r, p, &in) < 0)
        return moai_err_set(err, MOAI_ENOMEM, "out of memory sizing the process");
    if (strcmp(r->flavor.device.name, "cpu"))
        return 0;
    long pages = sysconf(_SC_PHYS_PAGES), page = sysconf(_SC_PAGE_SIZE);
    int64_t physical = pages > 0 && page > 0 ? (int64_t) pages * page : 0;
    log_info("process: %lld bytes predicted (devices %lld, threads %lld, host copies %lld, "
             "checkpoint buffers %lld, data %lld, runtime %lld)",
             (long long) pm->total_bytes, (long long) pm->devices_bytes,
             (long long) pm->threads_bytes, (long long) pm->host_bytes,
             (long long) pm->checkpoint_bytes, (long long) pm->data_bytes,
             (long long) pm->runtime_bytes);
    if (physical > 0 && pm->total_bytes > physical)
        return moai_err_set(err, MOAI_EOOM,
                            "%s: the process would need %.2f GiB (its devices %.2f GiB, host "
                            "copies of the model %.2f GiB, checkpoint buffers %.2f GiB, data "
                            "%.2f GiB), more than this machine's %.2f GiB",
                            r->source, pm->total_bytes / 1073741824.0,
                            pm->devices_bytes / 1073741824.0, pm->host_bytes / 1073741824.0,
                            pm->checkpoint_bytes / 1073741824.0, pm->data_bytes / 1073741824.0,
                            physical / 1073741824.0);
    return 0;
}

/* Logs each device's peak memory against the planner's figure for its own pipeline stage; past
 * 8 devices, one line per stage (its devices' smallest and largest peaks). */
static void log_device_peaks(const struct train_result *tr, const struct plan_result *pr,
                             const struct model_config *cfg, const struct recipe *r)
{
    int n = tr->peak_bytes ? tr->ndev : 0, pp = pr->best.lay.pp, tp = pr->best.lay.tp;
    for (int i = 0; n <= 8 && i < n && tr->peak_bytes[i] > 0; i++) {
        struct mem_breakdown mb;
        int stage = i / tp % pp;
        mem_stage(&mb, cfg, r, &pr->best, stage);
        log_info("device %d (stage %d, tp rank %d): peak memory %lld bytes, planned %lld "
                 "(measured/predicted %.3f)",
                 i, stage, i % tp, (long long) tr->peak_bytes[i], (long long) mb.total_bytes,
                 (double) tr->peak_bytes[i] / (double) mb.total_bytes);
    }
    for (int stage = 0; n > 8 && stage < pp; stage++) {
        struct mem_breakdown mb;
        int64_t lo = INT64_MAX, hi = 0;
        int count = 0;
        for (int i = 0; i < n; i++)
            if (i / tp % pp == stage && tr->peak_bytes[i] > 0) {
                lo = tr->peak_bytes[i] < lo ? tr->peak_bytes[i] : lo;
                hi = tr->peak_bytes[i] > hi ? tr->peak_bytes[i] : hi;
                count++;
            }
        if (!count)
            continue;
        mem_stage(&mb, cfg, r, &pr->best, stage);
        if (lo == hi)
            log_info("stage %d, %d devices: peak memory %lld bytes each, planned %lld "
                     "(measured/predicted %.3f)",
                     stage, count, (long long) lo, (long long) mb.total_bytes,
                     (double) lo / (double) mb.total_bytes);
        else
            log_info("stage %d, %d devices: peak memory %lld to %lld bytes, planned %lld "
                     "(measured/predicted %.3f to %.3f)",
                     stage, count, (long long) lo, (long long) hi, (long long) mb.total_bytes,
                     (double) lo / (double) mb.total_bytes, (double) hi / (double) mb.total_bytes);
    }
}

/* The checkpoint a run continues: save_dir's under resume: auto when one is there, the named
 * one under resume: <dir>, NULL for a fresh start. */
static const char *resume_dir_of(const struct recipe *r)
{
    char found[64];
    if (!strcmp(r->training.resume, "auto"))
        return ckpt_present(r->training.save_dir, found, sizeof(found)) ? r->training.save_dir
                                                                        : NULL;
    return strcmp(r->training.resume, "never") ? r->training.resume : NULL;
}

/* Builds the run's fingerprint into *fp and finds the checkpoint it continues (*dir, NULL for a
 * fresh start). Fails, before any work, when that checkpoint is another run's or has no
 * trainer_state.json. */
static int check_resume(const struct recipe *r, const struct model_config *cfg, json_t **fp,
                        const char **dir, struct moai_err *err)
{
    int rc;
    *dir = resume_dir_of(r);
    if ((rc = fingerprint_build(fp, r, cfg, err)) < 0)
        return rc;
    if (*dir) {
        json_t *state = resume_state(r, *dir, *fp, err);
        if (!state)
            return err->code;
        json_decref(state);
    }
    return 0;
}

int exec_check_resume(const struct recipe *r, const struct model_config *cfg, struct moai_err *err)
{
    json_t *fp = NULL;
    const char *dir;
    if (!resume_dir_of(r)) /* a fresh start: nothing to check (nor files to hash) */
        return 0;
    int rc = check_resume(r, cfg, &fp, &dir, err);
    json_decref(fp);
    return rc;
}

int exec_prepare_data(const struct recipe *r, struct tokenized *out, const char *cache_dir,
                      struct moai_err *err)
{
    static const char *const formats[] = {"text", "messages", "alpaca"};
    static const char *const chats[] = {NULL, "llama3", "llama2", "mistral", "chatml"};
    struct data_recipe dr = {.format = formats[r->dataset.format],
                             .chat_template = chats[r->dataset.chat_template],
                             .train_all = r->dataset.train_on == RECIPE_TRAIN_ON_ALL};
    return tokcache_prepare_format(out, r->dataset.path, r->tokenizer, r->dataset.template,
                                   r->dataset.response_start, &dr, r->training.block_size,
                                   r->dataset.limit, cache_dir, err);
}

/* Everything one run holds; zeroed at the start, released by runner_release whatever stage the
 * run reached. */
struct runner {
    const struct recipe *r;
    const struct exec_opts *o;
    struct model_config cfg;
    struct plan_result pr;
    struct comm_world *world; /* under MPI; NULL: threads */
    bool writer;              /* this process holds device 0 (and writes save_dir) */
    bool agreed;              /* the MPI ranks agreed once: the others know this one's fate */
    bool simulated;           /* an accelerator flavor run by this machine's cpu */
    json_t *fp;               /* the run's fingerprint */
    const char *resume_dir;   /* the checkpoint it continues, NULL: a fresh start */
    struct ckpt_lock lock;
    struct tokenized data;
    struct batches batches;
    struct batch_packer packer; /* dataset.packing: the loop's packed rows */
    struct records train, valid;
    struct mem_process pm;
    int64_t runtime_bytes; /* this process's resident bytes before the run */
    int64_t total, start;  /* the run's steps, and those a checkpoint has done */
    struct llama_params host;
    float *m, *v;                  /* Adam's moments on resume, else NULL */
    struct lora_params la, lm, lv; /* LoRA: the adapters, and their moments on resume */
    double *hist_loss, *hist_eval; /* the run's history, [step - 1] */
    int64_t *peaks;                /* each device's peak memory */
    struct saver sv;
};

/* The architecture, and the plan: rank 0's under MPI (machines measure their own cpu speed and
 * memory, and every rank must run the same layout). */
static int runner_plan(struct runner *R, struct moai_err *err)
{
    const struct recipe *r = R->r;
    int rc;

    if ((rc = exec_load_model_config(r, &R->cfg, err)) < 0)
        return rc;
    if (R->cfg.sliding_window && r->training.block_size > R->cfg.sliding_window)
        return moai_err_set(err, MOAI_EUSAGE,
                            "%s: 'training.block_size' (%lld) exceeds the model's sliding window "
                            "(%lld), which this attention does not implement",
                            r->source, (long long) r->training.block_size,
                            (long long) R->cfg.sliding_window);
    /* under mpirun the devices are shared out over the ranks: checked before any work */
    if (R->o->mpi && (rc = comm_world_create_mpi(&R->world, r->flavor.devices, err)) < 0)
        return rc;
    R->writer = !R->world || R->world->first_dev == 0;
    rc = plan_search(&R->pr, &R->cfg, r, err);
    if (rc == MOAI_EOOM)
        plan_oom_message(err, &R->pr, &R->cfg, r);
    if (R->world) {
        int64_t rc0 = rc;
        comm_world_bcast(R->world, &rc0, sizeof(rc0));
        if (rc0 < 0 && rc == 0)
            rc = moai_err_set(err, (int) rc0, "%s: rank 0 found no plan", r->source);
        if (rc0 == 0) {
            comm_world_bcast(R->world, &R->pr.best, sizeof(R->pr.best));
            rc = 0;
        }
    }
    if (rc < 0)
        return rc;
    R->simulated = strcmp(r->flavor.device.name, "cpu") != 0;
    if (R->simulated)
        log_warn("%s: the %d %s devices of flavor '%s' are simulated by threads of this "
                 "machine's cpu: the predicted step time (%.3f s) is for the real hardware, not "
                 "for this run (flavor: {device: cpu, devices: N} plans for this machine)",
                 r->source, r->flavor.devices, r->flavor.device.name, r->flavor.name,
                 R->pr.best.predicted_step_seconds);
    return 0;
}

/* Which checkpoint the run continues (refused early when it is another run's), and save_dir
 * held for this run. */
static int runner_claim(struct runner *R, struct moai_err *err)
{
    int rc;
    if ((rc = save_dir_is_not_the_model(R->r, err)) < 0 ||
        (rc = check_resume(R->r, &R->cfg, &R->fp, &R->resume_dir, err)) < 0)
        return rc;
    return R->writer ? hold_save_dir(R->r, &R->lock, err) : 0;
}

/* The tokenized data set checked against the model: some token is scored, every id is in the
 * vocabulary. */
static int check_data(const struct recipe *r, const struct model_config *cfg,
                      const struct tokenized *data, struct moai_err *err)
{
    if (tokenized_count_unscored(data) == data->n) {
        moai_err_set(err, MOAI_EUSAGE,
                     "%s: no example has a token counted in the loss: training.block_size "
                     "%lld cuts every one before its response (dataset.response_start)",
                     r->source, (long long) r->training.block_size);
        return moai_err_hint(err, "raise training.block_size, or shorten the prompts");
    }
    int32_t top = 0;
    for (int64_t i = 0; i < data->n * data->T; i++)
        if (data->tokens[i] > top)
            top = data->tokens[i];
    if (top >= cfg->vocab_size)
        return moai_err_set(err, MOAI_EUSAGE,
                            "%s: the tokenizer '%s' gives id %d, outside the model's vocabulary "
                            "of %lld",
                            r->source, r->tokenizer, top, (long long) cfg->vocab_size);
    return 0;
}

/* dataset.packing: each epoch's packed steps counted (at least the run's epochs and
 * max_steps), the packer set up over every record, the first epoch's packing logged against
 * padding, and the chosen layout's step predicted again with its rows' measured attention cost
 * (plan/cost.h; the layout itself was chosen before the data was read, at the worst case). */
static int runner_pack(struct runner *R, struct moai_err *err)
{
    const struct recipe *r = R->r;
    struct batches *b = &R->batches;
    const struct train_records *all = &R->train.view;
    int64_t T = r->training.block_size;
    int64_t steps = r->training.max_steps != RECIPE_NONE ? r->training.max_steps : 0;
    int rc = batch_set_packing(b, all->lengths, T, r->training.epochs, steps, err);
    if (rc < 0) {
        moai_err_prefix(err, "%s", r->source);
        return rc;
    }
    struct pack_source src = {T, all->tokens, all->labels, all->lengths,
                              R->data.pad_id >= 0 ? R->data.pad_id : 0};
    struct packing p;
    if ((rc = batch_packer_init(&R->packer, b, &src, err)) < 0 ||
        (rc = batch_epoch_packing(b, 0, &p, err)) < 0)
        return rc;
    int64_t real = 0;
    for (int64_t i = 0; i < b->n_train; i++)
        real += all->lengths[b->train[i]];
    double frac = pack_attention_fraction(&p, all->lengths, T);
    log_info("Packed %lld training examples into %lld rows of %lld tokens: %.1f%% padding "
             "(unpacked %.1f%%), attention %.1f%% of a full row's",
             (long long) b->n_train, (long long) p.nrows, (long long) T,
             100.0 * (1.0 - (double) p.tokens / ((double) p.nrows * (double) T)),
             100.0 * (1.0 - (double) real / ((double) b->n_train * (double) T)), 100.0 * frac);
    pack_release(&p);
    struct recipe packed = *r;
    packed.dataset.packed_attention = frac;
    plan_evaluate(&R->pr.best, &R->cfg, &packed);
    return 0;
}

/* The data: validated, tokenized (or from the token cache), split into batches and a
 * validation set (or packed rows), the process's memory checked, the records copied for the
 * loop. */
static int runner_load_data(struct runner *R, struct moai_err *err)
{
    const struct recipe *r = R->r;
    int rc;

    if ((rc = data_validate(r, err)) < 0) /* a record that does not fit: before any work */
        return rc;
    if ((rc = exec_prepare_data(r, &R->data, r->dataset.cache_dir, err)) < 0 ||
        (rc = check_data(r, &R->cfg, &R->data, err)) < 0)
        return rc;
    if ((rc = batch_init(&R->batches, R->data.n, r->training.batch_size,
                         r->dataset.validation_fraction, r->dataset.shuffle, r->training.seed,
                         err)) < 0)
        return rc;
    if (r->dataset.validation_fraction > 0 && R->batches.n_val == 0)
        log_warn("%s: 'dataset.validation_fraction' %g of %lld records holds out none: there is "
                 "no validation",
                 r->source, r->dataset.validation_fraction, (long long) R->data.n);
    else if (r->training.eval_interval != RECIPE_NONE && R->batches.n_val == 0)
        log_warn("%s: 'training.eval_interval' is set but there is no validation set "
                 "(dataset.validation_fraction)",
                 r->source);
    if ((rc = check_process_memory(&R->pm, &R->cfg, r, &R->pr.best, R->world, &R->data, &R->batches,
                                   R->resume_dir != NULL, R->runtime_bytes, err)) < 0)
        return rc;
    if (records_init(&R->train, &R->data, NULL, R->data.n) < 0 ||
        records_init(&R->valid, &R->data, R->batches.val, R->batches.n_val) < 0)
        return moai_err_set(err, MOAI_ENOMEM, "out of memory copying the records");
    if (r->dataset.packing && (rc = runner_pack(R, err)) < 0)
        return rc;
    R->total = r->training.max_steps != RECIPE_NONE
                   ? r->training.max_steps
                   : batch_steps_of_epochs(&R->batches, r->training.epochs);
    return 0;
}

/* A fresh run's weights: a random initialization, or the model's. */
static int runner_load_base(struct runner *R, struct moai_err *err)
{
    const struct recipe *r = R->r;
    int rc;
    if (r->model.init == MODEL_INIT_RANDOM) {
        optim_init_params(NULL, &R->host, &R->cfg, r->training.seed);
        return 0;
    }
    struct st_set set;
    if ((rc = st_set_open_dir(&set, r->model.path, err)) < 0)
        return rc;
    rc = model_tensors_load(&R->cfg, &set, R->host.arena, r->model.path, err);
    st_set_close(&set);
    return rc;
}

/* The weights to start from: the checkpoint resumed (with Adam's moments and the history), a
 * random initialization, or the model's; with LoRA the base as a fresh run's and the adapters
 * resumed, continued (lora.adapter) or new. */
static int runner_load_weights(struct runner *R, struct moai_err *err)
{
    const struct recipe *r = R->r;
    int rc;

    if ((rc = llama_params_init(&R->host, &R->cfg, NULL, err)) < 0)
        return rc;
    R->hist_loss = malloc((size_t) R->total * sizeof(double));
    R->hist_eval = malloc((size_t) R->total * sizeof(double));
    R->peaks = calloc((size_t) r->flavor.devices, sizeof(*R->peaks));
    if (!R->hist_loss || !R->hist_eval || !R->peaks)
        return moai_err_set(err, MOAI_ENOMEM, "out of memory");
    for (int64_t i = 0; i < R->total; i++)
        R->hist_loss[i] = R->hist_eval[i] = NAN;

    if (r->lora.enabled) { /* the base as a fresh run's; the adapters resumed or started */
        if ((rc = runner_load_base(R, err)) < 0)
            return rc;
        return lora_start(r, &R->cfg, R->resume_dir, R->fp, &R->la, &R->lm, &R->lv, &R->start,
                          R->hist_loss, R->hist_eval, R->total, err);
    }
    if (R->resume_dir) {
        struct recipe from = *r;
        from.training.save_dir = (char *) R->resume_dir;
        R->m = calloc((size_t) R->host.nfloats, sizeof(float));
        R->v = calloc((size_t) R->host.nfloats, sizeof(float));
        if (!R->m || !R->v)
            return moai_err_set(err, MOAI_ENOMEM, "out of memory");
        if ((rc = resume_from(&from, &R->cfg, R->fp, R->host.arena, R->m, R->v, &R->start,
                              R->hist_loss, R->hist_eval, R->total, err)) < 0)
            return rc;
        log_info("resuming from '%s' after step %lld of %lld", R->resume_dir, (long long) R->start,
                 (long long) R->total);
        return 0;
    }
    return runner_load_base(R, err);
}

/* Under MPI every process has loaded what it needs, or none trains; then all start from
 * process 0's weights and step (it alone writes save_dir, so only it surely sees a checkpoint
 * there). */
static int runner_agree(struct runner *R, struct moai_err *err)
{
    struct comm_world *w = R->world;
    if (!w)
        return 0;
    R->agreed = true;
    if (!comm_world_agree(w, true))
        return moai_err_set(err, MOAI_EIO, "another MPI rank failed before training");
    int64_t head[2] = {R->start, R->m != NULL};
    comm_world_bcast(w, head, sizeof(head));
    R->start = head[0];
    if (head[1] && !R->m) {
        R->m = calloc((size_t) R->host.nfloats, sizeof(float));
        R->v = calloc((size_t) R->host.nfloats, sizeof(float));
    }
    if (!comm_world_agree(w, !head[1] || (R->m && R->v)))
        return moai_err_set(err, MOAI_ENOMEM, "out of memory for the optimizer state");
    size_t bytes = sizeof(float) * (size_t) R->host.nfloats;
    comm_world_bcast(w, R->host.arena, bytes);
    if (head[1]) {
        comm_world_bcast(w, R->m, bytes);
        comm_world_bcast(w, R->v, bytes);
    }
    return R->r->lora.enabled ? lora_bcast(w, &R->cfg, R->r, &R->la, &R->lm, &R->lv, err) : 0;
}

/* What a checkpoint needs besides the weights: the saver's figures and the tokenizer's files;
 * under resume: never, save_dir's old checkpoint moved aside (it stays the user's). */
static int runner_prepare_save(struct runner *R, struct train_result *tr, struct moai_err *err)
{
    const struct recipe *r = R->r;
    char found[64];
    int rc;

    R->sv = (struct saver){.progress = tr,
                           .r = r,
                           .cfg = &R->cfg,
                           .plan = &R->pr,
                           .batches = &R->batches,
                           .steps_per_epoch = R->batches.steps_per_epoch,
                           .total_steps = R->total,
                           .opts = R->o,
                           .fingerprint = R->fp,
                           .losses = R->hist_loss,
                           .evals = R->hist_eval,
                           .base = R->host.arena};
    if (R->writer && !R->resume_dir && strcmp(r->training.resume, "auto") &&
        ckpt_present(r->training.save_dir, found, sizeof(found))) {
        char aside[4096];
        if ((rc = ckpt_move_aside(r->training.save_dir, aside, sizeof(aside), err)) < 0)
            return rc;
        log_warn("%s: training.resume is never: the checkpoint in '%s' was moved aside into '%s'",
                 r->source, r->training.save_dir, aside);
    }
    if (r->tokenizer && file_exists(r->tokenizer))
        return tokenizer_checkpoint_files(r->tokenizer, &R->sv.tok_name, &R->sv.tok_file,
                                          &R->sv.tok_config, err);
    return 0;
}

/* plan.json in save_dir once everything the run needs has loaded (every checkpoint carries it
 * too), unless one is there already (a checkpoint's). Returns whether it wrote one. */
static bool write_plan_json(const struct runner *R, const char *path)
{
    struct moai_err err = {0};
    bool written = false;
    if (!R->writer || access(path, F_OK) == 0)
        return false;
    json_t *pj = plan_to_json(&R->pr.best, &R->cfg, R->r);
    if (ckpt_write_json_file(path, pj, &err) < 0)
        log_warn("%s", err.msg);
    else
        written = true;
    json_decref(pj);
    return written;
}

/* The training job over the loaded records and weights. */
static int runner_exec(struct runner *R, struct train_result *tr, struct moai_err *err)
{
    const struct recipe *r = R->r;
    struct order_cache orders = {.b = &R->batches, .epoch = -1};
    char state_path[4096], pj_path[4096];

    orders.order = malloc((size_t) (R->batches.n_train + 1) * sizeof(int64_t));
    if (!orders.order)
        return moai_err_set(err, MOAI_ENOMEM, "out of memory for the data order");
    pthread_mutex_init(&orders.lock, NULL);
    struct train_job job = {
        .recipe = r,
        .cfg = &R->cfg,
        .layout = R->pr.best.lay,
        .train = R->train.view,
        .valid = R->valid.view,
        .batch_rows = rows_of,
        .batch_arg = &orders,
        .steps_per_epoch = R->batches.steps_per_epoch,
        .total_steps = R->total,
        .start_step = R->start,
        .init_params = R->host.arena,
        .init_m = R->m,
        .init_v = R->v,
        .save = save,
        .save_arg = &R->sv,
        .report = R->o->report,
        .report_arg = R->o->arg,
        .report_name = R->o->report_name,
        .step_losses = R->hist_loss,
        .eval_losses = R->hist_eval,
        .peak_bytes = R->peaks,
        .world = R->world,
        .lora_init = r->lora.enabled ? &R->la : NULL,
        .lora_m = R->lm.arena ? &R->lm : NULL,
        .lora_v = R->lv.arena ? &R->lv : NULL,
    };
    if (r->dataset.packing) { /* the packer's rows: two steps' worth, written step by step */
        const struct batch_packer *k = &R->packer;
        job.train = (struct train_records){.n = 2 * R->batches.batch_size,
                                           .T = R->batches.T,
                                           .tokens = k->tokens,
                                           .labels = k->labels,
                                           .lengths = k->lengths,
                                           .positions = k->positions,
                                           .examples = k->examples};
        job.valid = (struct train_records){.n = k->val_rows,
                                           .T = R->batches.T,
                                           .tokens = k->val_tokens,
                                           .labels = k->val_labels,
                                           .lengths = k->val_lengths,
                                           .positions = k->val_positions,
                                           .examples = k->val_examples};
        job.batch_rows = packed_rows_of;
        job.batch_arg = &R->packer;
        job.step_at = packed_step_at;
    }
    snprintf(state_path, sizeof(state_path), "%s/trainer_state.json", r->training.save_dir);
    snprintf(pj_path, sizeof(pj_path), "%s/plan.json", r->training.save_dir);
    bool pj_written = write_plan_json(R, pj_path);
    int rc = exec_train(&job, tr, err);
    pthread_mutex_destroy(&orders.lock);
    free(orders.order);
    /* a run that fails before its first checkpoint takes back the plan.json it wrote */
    if (pj_written && rc < 0 && rc != MOAI_EINTR && access(state_path, F_OK) != 0)
        unlink(pj_path);
    if (rc == MOAI_EOOM && tr->oom_requested_bytes) {
        log_error("%s", err->msg);
        plan_oom_message_bytes(err, r, tr->oom_requested_bytes, tr->capacity_bytes);
    }
    return rc;
}

/* The result of a run that finished: logged against the plan, then handed to the caller. */
static void runner_report(struct runner *R, const struct train_result *tr)
{
    const struct recipe *r = R->r;
    const struct plan *p = &R->pr.best;
    int64_t peak = mem_process_peak_bytes();
    int64_t *predicted = calloc((size_t) tr->ndev + 1, sizeof(*predicted));

    log_info("median step %.3f s, %.2f tokens/s (predicted %.3f s%s%s)", tr->median_step_s,
             tr->median_tokens_per_s, p->predicted_step_seconds, R->simulated ? " on real " : "",
             R->simulated ? r->flavor.device.name : "");
    if (r->flavor.device.memory_bytes > 0 && !R->simulated)
        log_info("process: peak resident %lld bytes, predicted %lld (measured/predicted %.3f)",
                 (long long) peak, (long long) R->pm.total_bytes,
                 (double) peak / (double) R->pm.total_bytes);
    for (int i = 0; predicted && i < tr->ndev; i++) { /* each device's stage */
        struct mem_breakdown mb;
        mem_stage(&mb, &R->cfg, r, p, i / p->lay.tp % p->lay.pp);
        predicted[i] = mb.total_bytes;
    }
    struct exec_summary s = {.recipe = r->source,
                             .save_dir = r->training.save_dir,
                             .steps = tr->steps_done,
                             .loss = tr->last_loss,
                             .validation_loss = tr->valid_loss,
                             .median_step_s = tr->median_step_s,
                             .median_tokens_per_s = tr->median_tokens_per_s,
                             .predicted_bytes_per_device = p->mem.total_bytes,
                             .ndev = tr->peak_bytes && predicted ? tr->ndev : 0,
                             .peak_bytes = tr->peak_bytes,
                             .predicted_bytes = predicted,
                             .process_predicted_bytes = R->pm.total_bytes,
                             .process_peak_bytes = peak};
    if (R->o->done)
        R->o->done(R->o->arg, &s);
    free(predicted);
}

static void runner_release(struct runner *R, int rc)
{
    free(R->sv.tok_file);
    json_decref(R->sv.tok_config);
    free(R->m);
    free(R->v);
    lora_params_release(&R->lv);
    lora_params_release(&R->lm);
    lora_params_release(&R->la);
    free(R->hist_loss);
    free(R->hist_eval);
    free(R->peaks);
    llama_params_release(&R->host);
    records_release(&R->train);
    records_release(&R->valid);
    batch_packer_release(&R->packer);
    batch_release(&R->batches);
    tokenized_release(&R->data);
    if (R->world && !R->agreed) /* tell the others this process stops here */
        comm_world_agree(R->world, rc == 0);
    comm_world_free(R->world);
    ckpt_lock_release(&R->lock);
    json_decref(R->fp);
}

int exec_run(const struct recipe *r, const struct exec_opts *o, struct moai_err *err)
{
    struct runner R = {.r = r, .o = o, .lock = {.fd = -1}};
    struct train_result tr = {0};
    int rc;

    R.runtime_bytes = mem_process_runtime_bytes();
    if ((rc = runner_plan(&R, err)) < 0 || (rc = runner_claim(&R, err)) < 0 ||
        (rc = runner_load_data(&R, err)) < 0 || (rc = runner_load_weights(&R, err)) < 0 ||
        (rc = runner_agree(&R, err)) < 0)
        goto out;
    if (R.start >= R.total) {
        log_info("nothing to do: the checkpoint is at step %lld of %lld", (long long) R.start,
                 (long long) R.total);
        goto out;
    }
    if ((rc = runner_prepare_save(&R, &tr, err)) < 0)
        goto out;
    rc = runner_exec(&R, &tr, err);
    log_device_peaks(&tr, &R.pr, &R.cfg, r);
    if (rc == 0)
        runner_report(&R, &tr);
out:
    runner_release(&R, rc);
    return rc;
}
