/* steplog.h - the documented training output: step lines, JSON step objects, final lines.
 *
 *     [Step 4/17944] | Loss: 2.03125 | Duration: 1.27 | Throughput: 12882.87 tokens/sec
 *     {"step": 4, "total_steps": 17944, "loss": 2.03125, "duration_s": 1.27,
 *      "tokens_per_s": 12882.87, "lr": 1e-05}
 *
 * Loss is printed with up to 7 significant digits and no trailing zeros, Duration with 2
 * decimals, Throughput = batch_size x block_size / duration with 2 decimals: every token the
 * step ran through the model, padding included. The JSON object adds real_tokens_per_s, the
 * tokens that are not padding, and, when the loop counts them, the step's rows (batch_size
 * sequences), examples and real tokens. The line is the platform's whatever the data: with
 * dataset.packing the step bar shows the examples per step (exec/train.c).
 *
 * An evaluation of the validation set (every training.eval_interval steps, at each epoch's
 * end and at the end of the run) prints
 *
 *     [Eval 10/60] | Validation loss: 2.345678 | Perplexity: 10.44
 *     {"eval": 10, "total_steps": 60, "validation_loss": 2.345678, "perplexity": 10.44}
 *
 * with the loss formatted like a step's and the perplexity exp(loss) with 2 decimals.
 * Pure formatting: thread-safe, no allocation but the returned JSON object.
 */
#ifndef MOAI_STEPLOG_H
#define MOAI_STEPLOG_H

#include <jansson.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

struct step_record {
    int64_t step; /* counted from 1 across epochs */
    int64_t total_steps;
    double loss;              /* mean over the unmasked tokens of the global batch */
    double duration_s;        /* wall time of the whole step */
    double tokens_per_s;      /* batch_size x block_size / duration_s */
    double real_tokens_per_s; /* the step's tokens that are not padding / duration_s */
    double lr;                /* the learning rate the step used */
    double grad_norm;         /* before clipping */
    int64_t rows;             /* sequences (packed rows) of the step; 0: not counted */
    int64_t examples;         /* examples in them */
    int64_t real_tokens;      /* their tokens that are not padding */
    bool packed;              /* dataset.packing: rows hold several examples */
};

/* Writes the step line (no newline) into buf. Returns buf. */
char *steplog_format(char *buf, size_t size, const struct step_record *s);

/* The step as a JSON object (new reference); a value that is not finite is null. */
json_t *steplog_json(const struct step_record *s);

/* Writes the evaluation line after step (no newline) into buf. Returns buf. */
char *steplog_format_eval(char *buf, size_t size, int64_t step, int64_t total_steps, double loss);

/* The evaluation as a JSON object (new reference); a non-finite loss is null. */
json_t *steplog_eval_json(int64_t step, int64_t total_steps, double loss);

/* "%.7g" without an exponent for ordinary values: 2.03125, 10.5, 0.0001234. */
char *steplog_format_loss(char *buf, size_t size, double loss);

#endif
