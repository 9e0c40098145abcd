/* report.h - what the planner tells people and scripts: the readable plan, the JSON object of
 * --plan-only --json, plan.json, and the OUT_OF_MEMORY report.
 *
 *     plan_report_text(stdout, &res, &cfg, &recipe);
 *     json_t *j = plan_result_json(&res, &cfg, &recipe, "ok", NULL);
 *
 * Pure formatting: thread-safe; JSON objects are new references owned by the caller.
 */
#ifndef MOAI_PLAN_REPORT_H
#define MOAI_PLAN_REPORT_H

#include "err.h"
#include "model/config.h"
#include "plan/plan.h"
#include "recipe.h"

#include <jansson.h>
#include <stdio.h>

/* The readable plan of --plan-only: recipe, model, flavor, layout, memory per device broken
 * down against capacity, predicted step time, throughput and TFLOP/s, the runners-up. */
void plan_report_text(FILE *out, const struct plan_result *res, const struct model_config *cfg,
                      const struct recipe *r);

/* One plan as JSON (plan.json and the "plan" member of the result object). */
json_t *plan_to_json(const struct plan *p, const struct model_config *cfg, const struct recipe *r);

/* The --plan-only --json object of DESIGN.md section 7. status is "ok", "oom" or "error";
 * message is the error for the latter two. res and cfg may be NULL for an error found before
 * planning. */
json_t *plan_result_json(const struct plan_result *res, const struct model_config *cfg,
                         const struct recipe *r, const char *status, const char *message);

/* Fills err (MOAI_EOOM) with the documented report, one line after another:
 *   Error Code 4: OUT_OF_MEMORY
 *   The plan needs more memory than one device of flavor '4xlarge' has.
 *   >> Memory requested : 75051597828 bytes ... To address this issue: ...
 * The source documents' four lines come first as they are; then both sizes in GiB, the
 * closest plan's (with AP off: the data-parallel plan's) memory per device broken down, and
 * advice that follows from it: AP on only with AP off (saying whether that alone finds a plan,
 * by searching again), a bigger flavor always, recomputation and a smaller batch only when the
 * model's state fits and the activations are the problem. */
int plan_oom_message(struct moai_err *err, const struct plan_result *res,
                     const struct model_config *cfg, const struct recipe *r);

/* The same report for a device that ran out of memory while executing a plan. */
int plan_oom_message_bytes(struct moai_err *err, const struct recipe *r, int64_t requested,
                           int64_t available);

#endif
