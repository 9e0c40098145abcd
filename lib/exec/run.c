/* run.c - one recipe end to end: plan, data, weights, training, checkpoints (see run.h). */
#include "exec/run.h"

#include "data/batch.h"
#include "data/tokcache.h"
#include "data/tokenize.h"
#include "data/tokenizer.h"
#include "exec/ckpt.h"
#include "exec/comm.h"
#include "exec/train.h"
#include "log.h"
#include "model/config.h"
#include "model/llama.h"
#include "model/optim.h"
#include "model/safetensors.h"
#include "model/tensors.h"
#include "plan/plan.h"
#include "plan/report.h"

#include <errno.h>
#include <math.h>
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
    int64_t steps_per_epoch, total_steps;
    const struct train_result *progress; /* the running loop's figures (its last loss) */
    bool json, final_announced;
    const char *tok_name; /* the tokenizer file's name in the checkpoint, NULL: none */
    char *tok_file;       /* the file to copy */
    json_t *tok_config;   /* tokenizer_config.json */
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

static json_t *trainer_state(const struct saver *sv, int64_t steps_done)
{
    json_t *s = json_object();
    json_object_set_new(s, "format", json_string("moai-finetune trainer state 1"));
    json_object_set_new(s, "step", json_integer(steps_done));
    json_object_set_new(s, "total_steps", json_integer(sv->total_steps));
    json_object_set_new(s, "steps_per_epoch", json_integer(sv->steps_per_epoch));
    json_object_set_new(s, "epoch", json_integer(steps_done / sv->steps_per_epoch));
    /* The data order is a pure function of (seed, epoch): the position is all there is to
     * the shuffling RNG's state. */
    json_object_set_new(s, "data_position",
                        json_pack("{s:I, s:I}", "epoch",
                                  (json_int_t) (steps_done / sv->steps_per_epoch), "index",
                                  (json_int_t) (steps_done % sv->steps_per_epoch)));
    json_object_set_new(s, "rng",
                        json_pack("{s:s, s:I}", "kind", "splitmix64 per epoch", "seed",
                                  (json_int_t) sv->r->training.seed));
    json_object_set_new(s, "last_loss", json_real(sv->progress ? sv->progress->last_loss : 0.0));
    json_object_set_new(s, "recipe", recipe_to_json(sv->r));
    return s;
}

/* The train_save_fn: a whole checkpoint into save_dir, atomically. */
static int save(void *arg, int64_t steps_done, const float *params, const float *m, const float *v,
                struct moai_err *err)
{
    struct saver *sv = arg;
    const struct recipe *r = sv->r;
    struct ckpt_stage stage;
    char path[4096];
    bool bf16 = r->training.precision == PRECISION_BF16;
    struct model_config out = *sv->cfg;
    int rc;

    if (steps_done == sv->total_steps && !sv->final_announced) {
        sv->final_announced = true;
        if (!sv->json) {
            puts("Training Done");
            puts("Saving Model...");
            fflush(stdout);
        }
    }
    snprintf(out.torch_dtype, sizeof(out.torch_dtype), "%s", bf16 ? "bfloat16" : "float32");
    if ((rc = ckpt_stage_begin(&stage, r->training.save_dir, err)) < 0)
        return rc;
    json_t *config = model_config_to_json(&out);
    json_t *state = trainer_state(sv, steps_done);
    json_t *plan = plan_to_json(&sv->plan->best, sv->cfg, r);
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
    if (rc == 0 && sv->tok_name)
        rc = ckpt_stage_copy_file(&stage, sv->tok_name, sv->tok_file, err);
    if (rc == 0 && sv->tok_config)
        rc = ckpt_stage_write_json(&stage, "tokenizer_config.json", sv->tok_config, err);
    if (rc == 0)
        rc = ckpt_stage_write_json(&stage, "plan.json", plan, err);
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
    if (rc == 0)
        rc = ckpt_stage_write_json(&stage, "trainer_state.json", state, err);
    if (rc == 0)
        rc = ckpt_stage_commit(&stage, err);
    if (rc < 0)
        ckpt_stage_abort(&stage);
    else
        log_info("checkpoint saved in '%s' at step %lld", r->training.save_dir,
                 (long long) steps_done);
    json_decref(config);
    json_decref(state);
    json_decref(plan);
    return rc;
}

int exec_load_model_config(const struct recipe *r, struct model_config *cfg, struct moai_err *err)
{
    char path[4096];
    if (r->model.path)
        snprintf(path, sizeof(path), "%s/config.json", r->model.path);
    int rc = model_config_load(cfg, r->model.path ? path : NULL, r->model.config, err);
    if (rc < 0 && !r->model.path)
        moai_err_prefix(err, "%s", r->source);
    return rc == MOAI_EIO ? MOAI_EUSAGE : rc;
}

/* The batcher as the training loop sees it. */
static void rows_of(void *arg, int64_t epoch, int64_t index, int64_t *rows)
{
    batch_rows(arg, epoch, index, rows);
}

/* The records of a data set as the loop reads them: the rows listed (all when rows is NULL),
 * copied into arrays of their own. */
struct records {
    struct train_records view;
    int32_t *tokens, *labels, *lengths;
};

static int records_init(struct records *rec, const struct data_set *ds, const int64_t *rows,
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

/* Reads a checkpoint of save_dir into the host arenas; *steps_done from trainer_state.json. */
static int resume_from(const struct recipe *r, const struct model_config *cfg, float *params,
                       float *m, float *v, int64_t *steps_done, struct moai_err *err)
{
    char path[4096];
    json_error_t jerr;
    int rc;

    snprintf(path, sizeof(path), "%s/trainer_state.json", r->training.save_dir);
    json_t *state = json_load_file(path, 0, &jerr);
    if (!state)
        return moai_err_set(err, MOAI_EIO, "%s:%d: cannot resume: %s", path, jerr.line, jerr.text);
    json_t *step = json_object_get(state, "step");
    if (!json_is_integer(step) || json_integer_value(step) < 0) {
        json_decref(state);
        return moai_err_set(err, MOAI_EIO, "%s: cannot resume: 'step' is not a count", path);
    }
    *steps_done = json_integer_value(step);
    /* A different recipe would not continue the same run: say which keys differ. */
    json_t *was = json_object_get(json_object_get(state, "recipe"), "training");
    json_t *now = recipe_to_json(r), *nt = json_object_get(now, "training");
    const char *key;
    json_t *val;
    json_object_foreach(nt, key, val)
    {
        if (!strcmp(key, "max_steps") || !strcmp(key, "epochs") || !strcmp(key, "save_interval") ||
            !strcmp(key, "log_interval") || !strcmp(key, "resume"))
            continue;
        if (was && !json_equal(val, json_object_get(was, key)))
            log_warn("%s: 'training.%s' differs from the run being resumed", r->source, key);
    }
    json_decref(now);
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
    for (int k = 0; k < 3; k++)
        llama_params_init(&views[k], cfg, dst[k], NULL);
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

static void print_final(const struct recipe *r, const struct model_config *cfg,
                        const struct exec_opts *o, const struct train_result *tr,
                        const struct plan_result *pr)
{
    if (!o->json) {
        printf("Model saved in '%s'\n", r->training.save_dir);
        fflush(stdout);
        return;
    }
    json_t *peaks = json_array(), *predicted = json_array();
    for (int i = 0; i < tr->ndev && i < 64; i++) {
        struct mem_breakdown mb; /* each device's stage */
        mem_stage(&mb, cfg, r, &pr->best, i / pr->best.tp % pr->best.pp);
        json_array_append_new(peaks, json_integer(tr->peak_bytes[i]));
        json_array_append_new(predicted, json_integer(mb.total_bytes));
    }
    json_t *j =
        json_pack("{s:s, s:s, s:s, s:I, s:f, s:o, s:f, s:f, s:I, s:o, s:o}", "status", "done",
                  "recipe", r->source, "save_dir", r->training.save_dir, "steps",
                  (json_int_t) tr->steps_done, "loss", tr->last_loss, "validation_loss",
                  isnan(tr->valid_loss) ? json_null() : json_real(tr->valid_loss), "median_step_s",
                  tr->median_step_s, "median_tokens_per_s", tr->median_tokens_per_s,
                  "predicted_bytes_per_device", (json_int_t) pr->best.mem.total_bytes, "peak_bytes",
                  peaks, "predicted_bytes", predicted);
    char *text = json_dumps(j, JSON_COMPACT | JSON_PRESERVE_ORDER | JSON_REAL_PRECISION(10));
    if (text)
        puts(text);
    free(text);
    json_decref(j);
    fflush(stdout);
}

int exec_prepare_data(const struct recipe *r, struct data_set *out, const char *cache_dir,
                      struct moai_err *err)
{
    static const char *const formats[] = {"text", "messages", "alpaca"};
    static const char *const chats[] = {NULL, "llama3", "llama2", "mistral", "chatml"};
    struct data_recipe dr = {.format = formats[r->dataset.format],
                             .chat_template = chats[r->dataset.chat_template],
                             .train_all = r->dataset.train_on == RECIPE_TRAIN_ON_ALL};
    return data_prepare_format(out, r->dataset.path, r->tokenizer, r->dataset.template,
                               r->dataset.response_start, &dr, r->training.block_size,
                               r->dataset.limit, cache_dir, err);
}

int exec_run(const struct recipe *r, const struct exec_opts *o, struct moai_err *err)
{
    struct model_config cfg;
    struct plan_result pr;
    struct data_set data;
    struct batcher batcher = {0};
    struct records train = {0}, valid = {0};
    struct llama_params host = {0};
    float *m = NULL, *v = NULL;
    int rc;

    if ((rc = exec_load_model_config(r, &cfg, err)) < 0)
        return rc;
    if (cfg.sliding_window && r->training.block_size > cfg.sliding_window)
        return moai_err_set(err, MOAI_EUSAGE,
                            "%s: 'training.block_size' (%lld) exceeds the model's sliding window "
                            "(%lld), which this attention does not implement",
                            r->source, (long long) r->training.block_size,
                            (long long) cfg.sliding_window);
    /* under mpirun the devices are shared out over the ranks: checked before any work */
    struct comm_world *world = NULL;
    if (o->mpi && (rc = comm_world_create_mpi(&world, r->flavor.devices, err)) < 0)
        return rc;
    bool writer = !world || world->first_dev == 0; /* the rank that holds device 0 */
    bool agreed = false;
    rc = plan_search(&pr, &cfg, r, err);
    if (rc == MOAI_EOOM)
        plan_oom_message(err, &pr, &cfg, r);
    if (world) {
        /* Rank 0's plan is the plan: machines measure their own cpu speed and memory, and
         * every rank must run the same layout. */
        int64_t rc0 = rc;
        comm_world_bcast(world, &rc0, sizeof(rc0));
        if (rc0 < 0 && rc == 0)
            rc = moai_err_set(err, (int) rc0, "%s: rank 0 found no plan", r->source);
        if (rc0 == 0) {
            comm_world_bcast(world, &pr.best, sizeof(pr.best));
            rc = 0;
        }
    }
    if (rc < 0) {
        comm_world_free(world);
        return rc;
    }
    struct exec_layout layout = {
        .dp = pr.best.dp,
        .pp = pr.best.pp,
        .tp = pr.best.tp,
        .num_micro_batches = pr.best.num_micro_batches,
        .batch_per_device = pr.best.batch_per_device,
        .recomputation = pr.best.recomputation,
        .distribute_param = pr.best.distribute_param,
        .distribute_low_prec_param = pr.best.distribute_low_prec_param,
    };
    if ((rc = exec_prepare_data(r, &data, r->dataset.cache_dir, err)) < 0)
        goto out_world;
    int32_t top = 0;
    for (int64_t i = 0; i < data.n * data.T; i++)
        if (data.tokens[i] > top)
            top = data.tokens[i];
    if (top >= cfg.vocab_size) {
        rc = moai_err_set(err, MOAI_EUSAGE,
                          "%s: the tokenizer '%s' gives id %d, outside the "
                          "model's vocabulary of %lld",
                          r->source, r->tokenizer, top, (long long) cfg.vocab_size);
        goto out_data;
    }
    if ((rc = batch_init(&batcher, data.n, r->training.batch_size, r->dataset.validation_fraction,
                         r->dataset.shuffle, r->training.seed, err)) < 0)
        goto out_data;
    int64_t spe = batcher.steps_per_epoch;
    if ((rc = records_init(&train, &data, NULL, data.n)) < 0 ||
        (rc = records_init(&valid, &data, batcher.val, batcher.n_val)) < 0) {
        rc = moai_err_set(err, MOAI_ENOMEM, "out of memory copying the records");
        goto out_batcher;
    }
    int64_t total =
        r->training.max_steps != RECIPE_NONE ? r->training.max_steps : spe * r->training.epochs;
    if ((rc = llama_params_init(&host, &cfg, NULL, err)) < 0)
        goto out_batcher;

    int64_t start = 0;
    char state_path[4096];
    snprintf(state_path, sizeof(state_path), "%s/trainer_state.json", r->training.save_dir);
    bool resume = !strcmp(r->training.resume, "auto") ? file_exists(state_path)
                                                      : strcmp(r->training.resume, "never") != 0;
    if (resume) {
        struct recipe from = *r;
        if (strcmp(r->training.resume, "auto"))
            from.training.save_dir = r->training.resume;
        m = calloc((size_t) host.nfloats, sizeof(float));
        v = calloc((size_t) host.nfloats, sizeof(float));
        if (!m || !v)
            rc = moai_err_set(err, MOAI_ENOMEM, "out of memory");
        else
            rc = resume_from(&from, &cfg, host.arena, m, v, &start, err);
        if (rc < 0)
            goto out_params;
        log_info("resuming from '%s' after step %lld of %lld", from.training.save_dir,
                 (long long) start, (long long) total);
    } else if (r->model.init == MODEL_INIT_RANDOM) {
        optim_init_params(NULL, &host, &cfg, r->training.seed);
    } else {
        struct st_set set;
        if ((rc = st_set_open_dir(&set, r->model.path, err)) < 0)
            goto out_params;
        rc = model_tensors_load(&cfg, &set, host.arena, r->model.path, err);
        st_set_close(&set);
        if (rc < 0)
            goto out_params;
    }

    /* Under MPI every process has loaded what it needs, or none trains; then all start from
     * process 0's weights and step (it alone writes save_dir, so only it surely sees a
     * checkpoint there). */
    if (world) {
        agreed = true;
        if (!comm_world_agree(world, true)) {
            rc = moai_err_set(err, MOAI_EIO, "another MPI rank failed before training");
            goto out_params;
        }
        int64_t head[2] = {start, m != NULL};
        comm_world_bcast(world, head, sizeof(head));
        start = head[0];
        if (head[1] && !m) {
            m = calloc((size_t) host.nfloats, sizeof(float));
            v = calloc((size_t) host.nfloats, sizeof(float));
        }
        if (!comm_world_agree(world, !head[1] || (m && v))) {
            rc = moai_err_set(err, MOAI_ENOMEM, "out of memory for the optimizer state");
            goto out_params;
        }
        size_t bytes = sizeof(float) * (size_t) host.nfloats;
        comm_world_bcast(world, host.arena, bytes);
        if (head[1]) {
            comm_world_bcast(world, m, bytes);
            comm_world_bcast(world, v, bytes);
        }
    }
    if (start >= total) {
        log_info("nothing to do: the checkpoint is at step %lld of %lld", (long long) start,
                 (long long) total);
        rc = 0;
        goto out_params;
    }

    struct train_result tr;
    struct saver sv = {.progress = &tr,
                       .r = r,
                       .cfg = &cfg,
                       .plan = &pr,
                       .steps_per_epoch = spe,
                       .total_steps = total,
                       .json = o->json};
    if (r->tokenizer && file_exists(r->tokenizer) &&
        (rc = tokenizer_checkpoint_files(r->tokenizer, &sv.tok_name, &sv.tok_file, &sv.tok_config,
                                         err)) < 0)
        goto out_params;
    struct train_job job = {
        .recipe = r,
        .cfg = &cfg,
        .layout = layout,
        .train = train.view,
        .valid = valid.view,
        .batch_rows = rows_of,
        .batch_arg = &batcher,
        .steps_per_epoch = spe,
        .total_steps = total,
        .start_step = start,
        .init_params = host.arena,
        .init_m = m,
        .init_v = v,
        .save = save,
        .save_arg = &sv,
        .json = o->json,
        .world = world,
    };
    /* plan.json in save_dir once everything the run needs has loaded (every checkpoint carries
     * it too): a run that fails before training leaves no output behind */
    json_t *pj = plan_to_json(&pr.best, &cfg, r);
    char pj_path[4096];
    struct moai_err pj_err = {0};
    struct stat before;
    bool had_dir = stat(r->training.save_dir, &before) == 0;
    snprintf(pj_path, sizeof(pj_path), "%s/plan.json", r->training.save_dir);
    if (writer && (ckpt_mkdir_parents(r->training.save_dir, &pj_err) < 0 ||
                   ckpt_write_json_file(pj_path, pj, &pj_err) < 0))
        log_warn("%s", pj_err.msg);
    json_decref(pj);
    rc = exec_train(&job, &tr, err);
    free(sv.tok_file);
    json_decref(sv.tok_config);
    if (writer && rc < 0 && rc != MOAI_EINTR && access(state_path, F_OK) != 0) {
        /* failed before any checkpoint: take back what this run wrote */
        unlink(pj_path);
        if (!had_dir)
            rmdir(r->training.save_dir);
    }
    if (rc == MOAI_EOOM && tr.oom_requested_bytes) {
        log_error("%s", err->msg);
        plan_oom_message_bytes(err, r, tr.oom_requested_bytes, tr.capacity_bytes);
    }
    for (int i = 0; i < tr.ndev && i < 64 && tr.peak_bytes[i] > 0; i++) {
        /* each device against the planner's figure for its own pipeline stage */
        struct mem_breakdown mb;
        int stage = i / pr.best.tp % pr.best.pp;
        mem_stage(&mb, &cfg, r, &pr.best, stage);
        log_info("device %d (stage %d, tp rank %d): peak memory %lld bytes, planned %lld "
                 "(measured/predicted %.3f)",
                 i, stage, i % pr.best.tp, (long long) tr.peak_bytes[i], (long long) mb.total_bytes,
                 (double) tr.peak_bytes[i] / (double) mb.total_bytes);
    }
    if (rc == 0) {
        if (!isnan(tr.valid_loss))
            log_info("validation loss %.6g", tr.valid_loss);
        log_info("median step %.3f s, %.2f tokens/s (predicted %.3f s)", tr.median_step_s,
                 tr.median_tokens_per_s, pr.best.predicted_step_seconds);
        print_final(r, &cfg, o, &tr, &pr);
    }
out_params:
    free(m);
    free(v);
    llama_params_release(&host);
out_batcher:
    records_release(&train);
    records_release(&valid);
    batch_release(&batcher);
out_data:
    data_set_release(&data);
out_world:
    if (world && !agreed) /* tell the others this process stops here */
        comm_world_agree(world, rc == 0);
    comm_world_free(world);
    return rc;
}
