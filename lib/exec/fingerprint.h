/* fingerprint.h - what defines a training run, recorded in its checkpoints.
 *
 * A run's fingerprint is a flat JSON object of dotted names: the model's architecture (its
 * config.json keys), model.path and model.init, the tokenizer's and the dataset's bytes (a
 * 64-bit hash and the size), the template and the keys that shape the data, and the training
 * keys that change the trajectory (batch and block size, optimizer, schedule, precision,
 * seed); a LoRA run's also its lora mapping (key "lora"). Keys that only extend or observe a run (max_steps, epochs, log_interval,
 * save_interval, eval_interval, save_dir, resume) are not in it, so a finished run can be
 * continued for more steps.
 *
 * trainer_state.json keeps it under "fingerprint"; resuming compares the two and refuses a
 * checkpoint of another run, naming what differs.
 *
 *     json_t *fp;
 *     if (fingerprint_build(&fp, &recipe, &cfg, &err) < 0) ...
 *     if (fingerprint_diff(old, fp, what, sizeof(what)) > 0) ... "what" lists the differences
 *     json_decref(fp);
 *
 * Thread-safe (no shared state). Errors name the file that could not be read.
 */
#ifndef MOAI_FINGERPRINT_H
#define MOAI_FINGERPRINT_H

#include "err.h"
#include "model/config.h"
#include "recipe.h"

#include <jansson.h>
#include <stddef.h>

/* Builds the fingerprint of r with the architecture cfg into *out (a new reference). Reads the
 * dataset and the tokenizer whole to hash them. Returns 0, MOAI_EIO when a file cannot be read
 * or MOAI_ENOMEM. */
int fingerprint_build(json_t **out, const struct recipe *r, const struct model_config *cfg,
                      struct moai_err *err);

/* Compares the fingerprint a checkpoint recorded (was) with the current one (now) and writes
 * the differences into buf as "dataset.template, training.lr (0.001 then, 0.002 now), ...";
 * a key only one of them has differs too ("lora ({...} then, absent now)"). Returns the number
 * of keys that differ (0: the same run). */
int fingerprint_diff(const json_t *was, const json_t *now, char *buf, size_t size);

#endif
