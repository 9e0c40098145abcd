/* validate.h - --validate's look at the data: the recipe's dataset through its template.
 *
 * data_validate reads the first DATA_VALIDATE_RECORDS records of dataset.path and fills the
 * template for each, as training will: a template that does not parse, a response_start that
 * does not occur in it, a line that is not JSON, a record that lacks a template field (the
 * message lists the fields it has) are reported as training would report them, before any
 * work. Chat and instruction records (dataset.format messages, alpaca) are checked for their
 * structure (roles, turns, fields) through the recipe's chat template. It prints nothing.
 *
 *     if (data_validate(&recipe, &err) < 0) ... err names the file and line, or the recipe
 *
 * Thread-safe (no shared state).
 */
#ifndef MOAI_DATA_VALIDATE_H
#define MOAI_DATA_VALIDATE_H

#include "err.h"
#include "recipe.h"

#define DATA_VALIDATE_RECORDS 1000

/* Returns 0, or MOAI_EUSAGE (the template, response_start, a record that does not fit it) or
 * MOAI_EIO (an unreadable or malformed file) with err filled. */
int data_validate(const struct recipe *r, struct moai_err *err);

#endif
