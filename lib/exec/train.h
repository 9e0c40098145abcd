/* train.h - the training loop of any parallel plan on the devices.
 *
 * exec_train runs a dp x pp x tp plan (layout/shard.h numbers the devices and cuts the model):
 * every step each of the dp replicas runs its num_micro_batches micro-batches of
 * batch_per_device sequences through its pp pipeline stages under a 1F1B schedule, each stage
 * split over tp devices Megatron style (the model's tensor-parallel hooks, llama.h), keeping
 * the activations the recomputation mode says. The gradients are all-reduced over the
 * replicas (or reduce-scattered unit by unit under distribute_param), the partial sums of
 * replicated weights joined (k and v of a kv head shared by tp ranks, a tied embedding's two
 * copies on the first and last stage), clipped to the global norm, and AdamW updates the
 * parameters (each replica its shard under distribute_param, then an all-gather). Under
 * distribute_low_prec_param the working weights are sharded too and each unit (the
 * embedding, a layer, the final norm, lm_head) is gathered just before it runs.
 *
 * The devices are threads of this process, or under Open MPI (job.world) the devices
 * [first_dev, first_dev + nlocal) of the world; everything between devices, checkpoints
 * included, goes through the communicator, so both give the same results.
 *
 * The loss of a step is the mean over the unmasked tokens of the whole global batch: every
 * micro-batch's backward is scaled by 1 / (counted tokens of the step), so the gradients are
 * those of one device running the whole batch, up to the order of floating-point sums.
 * Reductions run in rank order: runs are bit-for-bit reproducible.
 *
 * Memory: every buffer a device holds is counted against the flavor's memory per device
 * (exec/dev.h): parameters, gradients, optimizer moments, activations and workspace (the
 * model's size functions), gathered units and gradient buckets, exactly what shard_bytes
 * counts. A plan that does not fit fails
 * with MOAI_EOOM before the first step; train_result.peak_bytes records each device's peak.
 *
 *     struct train_job job = {.recipe = &r, .cfg = &cfg, .layout = {...}, .train = recs, ...};
 *     rc = exec_train(&job, &result, &err);
 *
 * Not reentrant (one run at a time: the stop flag is process-wide).
 */
#ifndef MOAI_TRAIN_H
#define MOAI_TRAIN_H

#include "err.h"
#include "exec/steplog.h"
#include "layout/shard.h"
#include "model/config.h"
#include "model/llama.h"
#include "recipe.h"

#include <signal.h>
#include <stdbool.h>
#include <stdint.h>

/* Tokenized records, right-padded to T tokens; or packed rows of several examples each
 * (dataset.packing, data/pack.h), with their positions. */
struct train_records {
    int64_t n, T;
    const int32_t *tokens;    /* (n, T) */
    const int32_t *labels;    /* (n, T), -100 where not scored */
    const int32_t *lengths;   /* (n) real tokens (the attention mask's ones) */
    const int32_t *positions; /* (n, T) packed rows: each token's position in its example
                                 (struct llama_batch); NULL: one example a record */
    const int32_t *examples;  /* (n) packed rows: the examples in each; NULL: 1 each */
};

/* The rows of the global batch of step `index` of epoch `epoch`: batch_size indices into the
 * training records. Must be the same whenever it is called with the same arguments. A caller
 * that makes packed rows step by step may write them into the records as it is asked: a
 * step's rows must then stay unchanged until the step after the next one asks for its own
 * (every device asks for a step's rows before any finishes it). */
typedef void (*train_batch_rows_fn)(void *arg, int64_t epoch, int64_t index, int64_t *rows);

/* Places global step `step` (from 0) in its epoch: *epoch, and *index within it; returns
 * whether it is the epoch's last step. For epochs of different lengths (packed rows). */
typedef bool (*train_step_at_fn)(void *arg, int64_t step, int64_t *epoch, int64_t *index);

/* Saves a checkpoint: the parameters, Adam moments (P floats each, Hugging Face order) and the
 * number of optimizer steps done. Called on device 0's thread while the others wait. */
typedef int (*train_save_fn)(void *arg, int64_t steps_done, const float *params, const float *m,
                             const float *v, struct moai_err *err);

struct comm_world;

/* What device 0 reports while training (cmd/ prints it: lib writes nothing to standard output).
 * TRAIN_STEP every log_interval steps and the first and last; TRAIN_EVAL after each evaluation
 * of the validation set; TRAIN_SAVING when the last step is done and the final checkpoint is
 * being written (from the save function, exec/run.c). */
enum train_event_kind { TRAIN_STEP, TRAIN_EVAL, TRAIN_SAVING };

struct train_event {
    enum train_event_kind kind;
    struct step_record step; /* TRAIN_STEP */
    int64_t eval_step;       /* TRAIN_EVAL: the step after which it ran, */
    int64_t total_steps;     /* of the run's total_steps (TRAIN_EVAL, TRAIN_SAVING) */
    double eval_loss;        /* TRAIN_EVAL */
};

/* Receives the job's events on device 0's thread. Returns 0, or the errno of a failed write
 * (a full disk, a closed pipe): the run then stops at the next step and saves, as on a signal,
 * and fails with MOAI_EIO naming train_job.report_name. */
typedef int (*train_report_fn)(void *arg, const struct train_event *ev);

struct train_job {
    const struct recipe *recipe;
    const struct model_config *cfg;
    struct layout layout;
    struct train_records train; /* the training records */
    struct train_records valid; /* validation records, n = 0 when none */
    train_batch_rows_fn batch_rows;
    void *batch_arg;
    train_step_at_fn step_at; /* optional (batch_arg): NULL, epochs of steps_per_epoch */
    int64_t steps_per_epoch;
    int64_t total_steps;
    int64_t start_step;           /* optimizer steps already done (resume), else 0 */
    const float *init_params;     /* P floats to start from */
    const float *init_m, *init_v; /* P floats each on resume, else NULL */
    train_save_fn save;
    void *save_arg;
    train_report_fn report; /* optional: the steps and evaluations (device 0's thread) */
    void *report_arg;
    const char *report_name;  /* what report writes to, for its error: "standard output" */
    bool quiet;               /* no step bar on standard error (tests) */
    double *step_losses;      /* optional: total_steps entries, [step - 1] */
    double *eval_losses;      /* optional: total_steps entries, [step - 1] after an evaluation */
    int64_t *peak_bytes;      /* optional: dp x pp x tp entries, each device's peak memory (every
                                 device's in the process of device 0, under MPI) */
    struct comm_world *world; /* optional: the devices' world (Open MPI); NULL: threads */
};

struct train_result {
    int64_t steps_done; /* optimizer steps done, including start_step */
    double last_loss;
    double valid_loss;    /* NAN when no validation set */
    double median_step_s; /* over the steps run, the first excepted when > 1 */
    double median_tokens_per_s;
    int ndev;
    const int64_t *peak_bytes; /* job->peak_bytes once filled, NULL when the job gave none */
    int64_t capacity_bytes;
    bool interrupted;            /* stopped by SIGINT/SIGTERM after a save */
    int oom_device;              /* on MOAI_EOOM: the device that ran out, */
    int64_t oom_requested_bytes; /* what it would have held with the failed allocation */
};

/* Set by the signal handler of cmd/ to the signal's number; the loop saves and stops at the
 * next step boundary. Under MPI a signal to any process stops every one. */
extern volatile sig_atomic_t exec_stop_requested;

/* 1 while device 0 writes a checkpoint (for the signal handler's message). */
extern volatile sig_atomic_t exec_saving;

/* Runs the job. Returns 0, MOAI_EINTR (stopped by a signal, checkpoint saved), MOAI_EOOM
 * (a device's memory is too small), MOAI_EIO (non-finite loss, gradient norm or weight, a
 * failed save, or the report failed: the run then stops and saves like a signal). */
int exec_train(const struct train_job *job, struct train_result *res, struct moai_err *err);

/* The bytes the most loaded device of a plan allocates (layout/shard.h), by the same
 * arithmetic as exec_train: for comparing with the planner's memory model. */
int64_t exec_device_bytes(const struct model_config *cfg, const struct layout *layout, int64_t T,
                          int nthreads);

#endif
