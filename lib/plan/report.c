/* report.c - the readable plan, its JSON forms and the OUT_OF_MEMORY report (see report.h). */
#include "plan/report.h"

#include "log.h"

#include <stdarg.h>
#include <string.h>
#include <unistd.h>

static double gib(int64_t bytes)
{
    return (double) bytes / 1073741824.0;
}

static void breakdown_lines(FILE *out, const struct mem_breakdown *m, int64_t capacity)
{
    static const char *const names[] = {"weights", "gradients",     "optimizer", "activations",
                                        "logits",  "communication", "reserve"};
    const int64_t parts[] = {m->weights_bytes,     m->gradients_bytes, m->optimizer_bytes,
                             m->activations_bytes, m->logits_bytes,    m->communication_bytes,
                             m->reserve_bytes};
    for (int i = 0; i < 7; i++)
        fprintf(out, "    %-12s %10.2f GiB\n", names[i], gib(parts[i]));
    fprintf(out, "    %-12s %10.2f GiB of %.2f GiB (%.0f%%)\n", "total", gib(m->total_bytes),
            gib(capacity), 100.0 * (double) m->total_bytes / (double) capacity);
}

/* The whole process on the cpu device, without the data set (not read when planning). */
static bool cpu_process(struct mem_process *pm, const struct model_config *cfg,
                        const struct recipe *r, const struct plan *p)
{
    struct mem_process_in in = {.devices = p->lay.dp * p->lay.pp * p->lay.tp,
                                .runtime_bytes = mem_process_runtime_bytes()};
    return mem_process(pm, cfg, r, p, &in) == 0;
}

void plan_report_text(FILE *out, const struct plan_result *res, const struct model_config *cfg,
                      const struct recipe *r)
{
    const struct flavor *f = &r->flavor;
    const struct plan *p = &res->best;
    char line[512];

    fprintf(out, "recipe      %s\n", r->source);
    fprintf(out,
            "model       %s (%s): %lld parameters, %lld layers, hidden %lld, %lld heads "
            "(%lld kv), MLP %lld, vocabulary %lld%s\n",
            cfg->name, cfg->architecture, (long long) res->param_count,
            (long long) cfg->num_hidden_layers, (long long) cfg->hidden_size,
            (long long) cfg->num_attention_heads, (long long) cfg->num_key_value_heads,
            (long long) cfg->intermediate_size, (long long) cfg->vocab_size,
            cfg->tie_word_embeddings ? ", tied embeddings" : "");
    fprintf(out, "flavor      %s: %d x %s, %d per node, %.2f GiB and %.3g TFLOP/s each\n",
            flavor_display_name(f), f->devices, f->device.name, f->devices_per_node,
            gib(f->device.memory_bytes), cost_device_tflops(f));
    fprintf(out, "training    batch %lld x %lld tokens, %s, AP %s\n",
            (long long) r->training.batch_size, (long long) r->training.block_size,
            recipe_precision_name(r->training.precision), res->advanced ? "on" : "off");
    fprintf(out, "search      %lld candidates, %lld fit, %.1f ms\n", (long long) res->candidates,
            (long long) res->feasible, res->plan_ms);
    fprintf(out,
            "layout      dp %d x pp %d x tp %d; %d micro-batches of %lld; recomputation "
            "%s; distribute_param %s; distribute_low_prec_param %s\n",
            p->lay.dp, p->lay.pp, p->lay.tp, p->lay.num_micro_batches,
            (long long) p->lay.batch_per_device, plan_recompute_name(p->lay.recomputation),
            p->lay.distribute_param ? "true" : "false",
            p->lay.distribute_low_prec_param ? "true" : "false");
    fprintf(out, "            %s\n", plan_config_line(line, sizeof(line), p));
    fprintf(out, "memory      per device (stage %d, the most loaded):\n", p->mem.stage);
    breakdown_lines(out, &p->mem, f->device.memory_bytes);
    fprintf(out,
            "step        %.3f s predicted: compute %.3f, bubble %.3f, tp %.3f, p2p %.3f, "
            "dp %.3f exposed of %.3f, optimizer %.3f\n",
            p->predicted_step_seconds, p->cost.compute_seconds, p->cost.bubble_seconds,
            p->cost.tp_comm_seconds, p->cost.p2p_seconds, p->cost.dp_exposed_seconds,
            p->cost.dp_comm_seconds, p->cost.optimizer_seconds);
    fprintf(out, "throughput  %.2f tokens/s, %.1f TFLOP/s per device\n", p->tokens_per_second,
            p->tflops_per_device);
    struct mem_process pm;
    if (!strcmp(f->device.name, "cpu") && cpu_process(&pm, cfg, r, p)) {
        long pages = sysconf(_SC_PHYS_PAGES), page = sysconf(_SC_PAGE_SIZE);
        fprintf(out,
                "process     %.2f GiB of this machine's %.2f GiB before the data set: devices "
                "%.2f, host copies %.2f, checkpoint buffers %.2f, threads %.2f, runtime %.2f\n",
                gib(pm.total_bytes), gib((int64_t) pages * page), gib(pm.devices_bytes),
                gib(pm.host_bytes), gib(pm.checkpoint_bytes), gib(pm.threads_bytes),
                gib(pm.runtime_bytes));
    }
    if (res->n_runners_up > 0) {
        fprintf(out, "runners-up\n");
        for (int i = 0; i < res->n_runners_up; i++) {
            const struct plan *q = &res->runners_up[i];
            fprintf(out, "  %d. %-44s %8.3f s %10.2f GiB\n", i + 2,
                    plan_brief(line, sizeof(line), q), q->predicted_step_seconds,
                    gib(q->mem.total_bytes));
        }
    }
}

json_t *plan_to_json(const struct plan *p, const struct model_config *cfg, const struct recipe *r)
{
    (void) cfg, (void) r;
    const struct mem_breakdown *m = &p->mem;
    return json_pack(
        "{s:i, s:i, s:i, s:i, s:I, s:s, s:b, s:b, s:I, s:{s:I, s:I, s:I, s:I, s:I, "
        "s:I, s:I}, s:{s:I, s:I}, s:f, s:f, s:f}",
        "dp", p->lay.dp, "pp", p->lay.pp, "tp", p->lay.tp, "num_micro_batches",
        p->lay.num_micro_batches, "batch_per_device", (json_int_t) p->lay.batch_per_device,
        "recomputation", plan_recompute_name(p->lay.recomputation), "distribute_param",
        p->lay.distribute_param, "distribute_low_prec_param", p->lay.distribute_low_prec_param,
        "memory_per_device_bytes", (json_int_t) m->total_bytes, "memory_breakdown", "weights",
        (json_int_t) m->weights_bytes, "gradients", (json_int_t) m->gradients_bytes, "optimizer",
        (json_int_t) m->optimizer_bytes, "activations", (json_int_t) m->activations_bytes, "logits",
        (json_int_t) m->logits_bytes, "communication", (json_int_t) m->communication_bytes,
        "reserve", (json_int_t) m->reserve_bytes, "memory_detail", "master_weights",
        (json_int_t) m->master_bytes, "gathered_in_flight", (json_int_t) m->gathered_bytes,
        "predicted_step_s", p->predicted_step_seconds, "predicted_tokens_per_s",
        p->tokens_per_second, "predicted_tflops_per_device", p->tflops_per_device);
}

json_t *plan_result_json(const struct plan_result *res, const struct model_config *cfg,
                         const struct recipe *r, const char *status, const char *message)
{
    json_t *j = json_pack("{s:s, s:s}", "recipe", r ? r->source : "", "status", status);
    if (message)
        json_object_set_new(j, "error", json_string(message));
    if (!r || !cfg || !res)
        return j;
    const struct flavor *f = &r->flavor;
    json_object_set_new(j, "model",
                        json_pack("{s:s, s:I, s:I, s:I, s:I, s:I, s:I}", "name", cfg->name,
                                  "parameters", (json_int_t) res->param_count, "layers",
                                  (json_int_t) cfg->num_hidden_layers, "hidden_size",
                                  (json_int_t) cfg->hidden_size, "heads",
                                  (json_int_t) cfg->num_attention_heads, "kv_heads",
                                  (json_int_t) cfg->num_key_value_heads, "vocab_size",
                                  (json_int_t) cfg->vocab_size));
    json_object_set_new(j, "flavor",
                        json_pack("{s:s, s:s, s:i, s:i, s:I}", "name", f->name, "device",
                                  f->device.name, "devices", f->devices, "devices_per_node",
                                  f->devices_per_node, "device_memory_bytes",
                                  (json_int_t) f->device.memory_bytes));
    json_object_set_new(j, "training",
                        json_pack("{s:I, s:I, s:s}", "batch_size",
                                  (json_int_t) r->training.batch_size, "block_size",
                                  (json_int_t) r->training.block_size, "precision",
                                  recipe_precision_name(r->training.precision)));
    json_object_set_new(j, "advanced_parallelization", json_boolean(res->advanced));
    json_object_set_new(j, "candidates", json_integer(res->candidates));
    json_object_set_new(j, "feasible", json_integer(res->feasible));
    json_object_set_new(j, "plan_ms", json_real(res->plan_ms));
    if (!strcmp(status, "ok")) {
        json_object_set_new(j, "plan", plan_to_json(&res->best, cfg, r));
        json_t *ru = json_array();
        for (int i = 0; i < res->n_runners_up; i++)
            json_array_append_new(ru, plan_to_json(&res->runners_up[i], cfg, r));
        json_object_set_new(j, "runners_up", ru);
        struct mem_process pm;
        if (!strcmp(f->device.name, "cpu") && cpu_process(&pm, cfg, r, &res->best))
            json_object_set_new(j, "process_bytes_before_data", json_integer(pm.total_bytes));
    } else if (!strcmp(status, "oom")) {
        json_object_set_new(j, "requested_bytes", json_integer(res->requested_bytes));
        json_object_set_new(j, "available_bytes", json_integer(res->available_bytes));
        json_object_set_new(j, "closest_plan", plan_to_json(&res->best, cfg, r));
    }
    return j;
}

/* Appends printf-style text to err's message. */
static void msg_append(struct moai_err *err, const char *fmt, ...)
    __attribute__((format(printf, 2, 3)));
static void msg_append(struct moai_err *err, const char *fmt, ...)
{
    size_t len = strlen(err->msg);
    va_list ap;
    va_start(ap, fmt);
    if (len < sizeof(err->msg))
        vsnprintf(err->msg + len, sizeof(err->msg) - len, fmt, ap);
    va_end(ap);
}

/* The report's first lines, the source documents' own and the sizes in GiB. */
static void oom_head(struct moai_err *err, const struct recipe *r, int64_t requested,
                     int64_t available)
{
    moai_err_set(err, MOAI_EOOM,
                 "Error Code 4: OUT_OF_MEMORY\n"
                 "The plan needs more memory than one device of flavor '%s' has.\n"
                 ">> Memory requested : %lld bytes\n"
                 ">> Memory available : %lld bytes\n"
                 ">> That is %.2f GiB requested (when the allocation fails) of %.2f GiB.",
                 flavor_display_name(&r->flavor), (long long) requested, (long long) available,
                 gib(requested), gib(available));
}

int plan_oom_message_bytes(struct moai_err *err, const struct recipe *r, int64_t requested,
                           int64_t available)
{
    int n = 0;
    oom_head(err, r, requested, available);
    msg_append(err, "\nTo address this issue:");
    if (!r->parallel.advanced)
        msg_append(err,
                   "\n %d. Switch advanced parallelization on (parallel.advanced: true, or --ap).",
                   ++n);
    msg_append(
        err, "\n %d. Use a flavor with more devices or more memory per device (flavor: ...).", ++n);
    msg_append(err, "\n %d. Decrease the batch size (training.batch_size).", ++n);
    return MOAI_EOOM;
}

/* Whether the planner, with AP switched on, finds a plan that fits; its brief into buf. */
static bool fits_with_ap(char *buf, size_t size, const struct model_config *cfg,
                         const struct recipe *r)
{
    struct recipe on = *r;
    struct plan_result res;
    struct moai_err err = {0};
    enum log_level level = log_get_level();
    on.parallel.advanced = true;
    if (level > LOG_WARN) /* the search's own lines are for a real planning */
        log_set_level(LOG_WARN);
    int rc = plan_search(&res, cfg, &on, &err);
    log_set_level(level);
    if (rc == 0)
        plan_brief(buf, size, &res.best);
    return rc == 0;
}

int plan_oom_message(struct moai_err *err, const struct plan_result *res,
                     const struct model_config *cfg, const struct recipe *r)
{
    const struct plan *p = &res->best;
    const struct mem_breakdown *m = &p->mem;
    int64_t avail = res->available_bytes;
    /* what a device holds whatever the batch: the model's state and the workspace reserve */
    int64_t state = m->weights_bytes + m->gradients_bytes + m->optimizer_bytes + m->reserve_bytes;
    int64_t acts = m->activations_bytes + m->logits_bytes;
    char brief[128], ap_brief[128];
    int n = 0;

    oom_head(err, r, res->requested_bytes, avail);
    msg_append(err,
               "\n>> The %s plan (%s) needs %.2f GiB per device in all (stage %d): weights "
               "%.2f, gradients %.2f, optimizer %.2f, activations %.2f, logits %.2f, "
               "communication %.2f, reserve %.2f GiB\nTo address this issue:",
               res->advanced ? "closest" : "data-parallel", plan_brief(brief, sizeof(brief), p),
               gib(m->total_bytes), m->stage, gib(m->weights_bytes), gib(m->gradients_bytes),
               gib(m->optimizer_bytes), gib(m->activations_bytes), gib(m->logits_bytes),
               gib(m->communication_bytes), gib(m->reserve_bytes));
    if (!res->advanced) {
        if (fits_with_ap(ap_brief, sizeof(ap_brief), cfg, r))
            msg_append(err,
                       "\n %d. Switch advanced parallelization on (parallel.advanced: true, or "
                       "--ap): it finds a plan that fits (%s).",
                       ++n, ap_brief);
        else
            msg_append(err,
                       "\n %d. Switch advanced parallelization on (parallel.advanced: true, or "
                       "--ap) together with the changes below: alone it finds no plan that fits.",
                       ++n);
    }
    if (state >= avail) {
        msg_append(err,
                   "\n %d. Use a flavor with more devices or more memory per device (flavor: "
                   "...): the weights, gradients and optimizer state alone need %.2f GiB of the "
                   "%.2f GiB of a device, so a smaller batch cannot help.",
                   ++n, gib(state), gib(avail));
        return MOAI_EOOM;
    }
    msg_append(
        err, "\n %d. Use a flavor with more devices or more memory per device (flavor: ...).", ++n);
    if (p->lay.recomputation != RECOMPUTE_FULL && !res->advanced)
        msg_append(err,
                   "\n %d. Recompute activations in the backward pass (parallel.recomputation: "
                   "full): they and the logits take %.2f GiB.",
                   ++n, gib(acts));
    if (p->lay.batch_per_device > 1)
        msg_append(err,
                   "\n %d. Decrease the batch size (training.batch_size) or the block size "
                   "(training.block_size): activations and logits take %.2f GiB, the rest "
                   "%.2f GiB.",
                   ++n, gib(acts), gib(state));
    else /* one sequence per micro-batch already: only shorter ones help */
        msg_append(err,
                   "\n %d. Decrease the block size (training.block_size): the activations and "
                   "logits of one sequence take %.2f GiB, the rest %.2f GiB.",
                   ++n, gib(acts), gib(state));
    return MOAI_EOOM;
}
