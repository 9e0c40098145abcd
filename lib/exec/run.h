/* run.h - one recipe end to end: architecture, plan, data, weights, training, checkpoints.
 *
 * exec_run is what `moai-finetune RECIPE` does: it reads the model config, plans the layout
 * (logging the platform's lines; an out-of-memory plan prints the documented report), tokenizes
 * the dataset (or loads the token cache), loads the weights (or initializes them, or resumes
 * from save_dir), trains on the flavor's virtual devices, and saves a Hugging Face style
 * checkpoint atomically: config.json, model.safetensors, tokenizer.model, plan.json, and for
 * resuming optimizer.safetensors and trainer_state.json.
 *
 * It writes nothing to standard output: the steps, evaluations and the start of the final save
 * reach the caller through exec_opts.report (exec/train.h), the result through exec_opts.done
 * (cmd/ prints both); standard error gets the logs. Returns 0, or the code of the failure with
 * err filled (MOAI_EOOM with the OUT_OF_MEMORY report in err, MOAI_EINTR after an interrupted
 * run was saved).
 *
 *     struct exec_opts o = {.report = print_event, .done = print_summary, .arg = &printer,
 *                           .report_name = "standard output"};
 *     rc = exec_run(&recipe, &o, &err);
 */
#ifndef MOAI_RUN_H
#define MOAI_RUN_H

#include "err.h"
#include "exec/train.h"
#include "recipe.h"

#include <stdbool.h>
#include <stdint.h>

/* The result of a run that finished and saved. */
struct exec_summary {
    const char *recipe, *save_dir;
    int64_t steps;          /* optimizer steps done */
    double loss;            /* the last step's */
    double validation_loss; /* the final evaluation's, NAN without a validation set */
    double median_step_s, median_tokens_per_s;
    int64_t predicted_bytes_per_device; /* the plan's most loaded device */
    int ndev;                           /* entries of the two arrays (0: none) */
    const int64_t *peak_bytes;          /* each device's measured peak */
    const int64_t *predicted_bytes;     /* each device's planned memory (its stage's) */
    int64_t process_predicted_bytes, process_peak_bytes; /* the whole process (plan/mem.h) */
};

struct exec_opts {
    bool mpi; /* started by mpirun (MPI initialized): the devices are shared out over ranks */
    train_report_fn report; /* optional: steps, evaluations, the final save's start */
    void (*done)(void *arg, const struct exec_summary *s); /* optional: the result */
    void *arg;                                             /* of both */
    const char *report_name; /* what report writes to, for its error: "standard output" */
};

int exec_run(const struct recipe *r, const struct exec_opts *o, struct moai_err *err);

/* Whether checkpoints can be written in the recipe's save_dir (for --validate; exec_run checks
 * it again under its lock). Creates nothing. Returns 0 or MOAI_EIO naming the recipe and key. */
int exec_check_save_dir(const struct recipe *r, struct moai_err *err);

struct model_config;
struct tokenized;

/* The recipe's dataset tokenized (any dataset.format), from the token cache in cache_dir when
 * it is there (NULL: no cache). Returns 0 or a negative code with err filled. */
int exec_prepare_data(const struct recipe *r, struct tokenized *out, const char *cache_dir,
                      struct moai_err *err);

/* The recipe's architecture: <model.path>/config.json with model.config over it, or
 * model.config alone; a training.block_size past max_position_embeddings is refused unless
 * the config extends the context (rope_scaling). Returns 0 or MOAI_EUSAGE naming the file and
 * key. */
int exec_load_model_config(const struct recipe *r, struct model_config *cfg, struct moai_err *err);

/* What training checks before any work about the checkpoint it would continue: under
 * resume: auto a checkpoint in save_dir, or the one resume names, must be of this run (its
 * fingerprint, exec/fingerprint.h) and have its trainer_state.json. When there is one, reads
 * the dataset and the tokenizer to hash them; writes nothing. Returns 0, MOAI_EUSAGE (another run's, no
 * trainer_state.json: with a hint), MOAI_EIO (unreadable). For --validate. */
int exec_check_resume(const struct recipe *r, const struct model_config *cfg, struct moai_err *err);

#endif
