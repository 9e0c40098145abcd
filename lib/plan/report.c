/* report.c - the readable plan, its JSON forms and the OUT_OF_MEMORY report (see report.h). */
#include "plan/report.h"

#include "log.h"

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
static void cpu_process(struct mem_process *pm, const struct model_config *cfg,
                        const struct recipe *r, const struct plan *p)
{
    struct mem_process_in in = {.devices = p->dp * p->pp * p->tp,
                                .runtime_bytes = mem_process_runtime_bytes()};
    mem_process(pm, cfg, r, p, &in);
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
            p->dp, p->pp, p->tp, p->num_micro_batches, (long long) p->batch_per_device,
            plan_recompute_name(p->recomputation), p->distribute_param ? "true" : "false",
            p->distribute_low_prec_param ? "true" : "false");
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
    if (!strcmp(f->device.name, "cpu")) {
        struct mem_process pm;
        long pages = sysconf(_SC_PHYS_PAGES), page = sysconf(_SC_PAGE_SIZE);
        cpu_process(&pm, cfg, r, p);
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
        "dp", p->dp, "pp", p->pp, "tp", p->tp, "num_micro_batches", p->num_micro_batches,
        "batch_per_device", (json_int_t) p->batch_per_device, "recomputation",
        plan_recompute_name(p->recomputation), "distribute_param", p->distribute_param,
        "distribute_low_prec_param", p->distribute_low_prec_param, "memory_per_device_bytes",
        (json_int_t) m->total_bytes, "memory_breakdown", "weights", (json_int_t) m->weights_bytes,
        "gradients", (json_int_t) m->gradients_bytes, "optimizer", (json_int_t) m->optimizer_bytes,
        "activations", (json_int_t) m->activations_bytes, "logits", (json_int_t) m->logits_bytes,
        "communication", (json_int_t) m->communication_bytes, "reserve",
        (json_int_t) m->reserve_bytes, "memory_detail", "master_weights",
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
        if (!strcmp(f->device.name, "cpu")) {
            struct mem_process pm;
            cpu_process(&pm, cfg, r, &res->best);
            json_object_set_new(j, "process_bytes_before_data", json_integer(pm.total_bytes));
        }
    } else if (!strcmp(status, "oom")) {
        json_object_set_new(j, "requested_bytes", json_integer(res->requested_bytes));
        json_object_set_new(j, "available_bytes", json_integer(res->available_bytes));
        json_object_set_new(j, "closest_plan", plan_to_json(&res->best, cfg, r));
    }
    return j;
}

int plan_oom_message_bytes(struct moai_err *err, const struct recipe *r, int64_t requested,
                           int64_t available)
{
    return moai_err_set(err, MOAI_EOOM,
                        "Error Code 4: OUT_OF_MEMORY\n"
                        "The plan needs more memory than one device of flavor '%s' has.\n"
                        ">> Memory requested : %lld bytes\n"
                        ">> Memory available : %lld bytes\n"
                        "To address this issue:\n"
                        " 1. Switch advanced parallelization on (parallel.advanced: true, or "
                        "--ap).\n"
                        " 2. Use a flavor with more devices or more memory per device (flavor: "
                        "...).\n"
                        " 3. Decrease the batch size (training.batch_size).",
                        flavor_display_name(&r->flavor), (long long) requested,
                        (long long) available);
}

int plan_oom_message(struct moai_err *err, const struct plan_result *res,
                     const struct model_config *cfg, const struct recipe *r)
{
    (void) cfg;
    plan_oom_message_bytes(err, r, res->requested_bytes, res->available_bytes);
    if (log_get_level() >= LOG_DEBUG) {
        const struct mem_breakdown *m = &res->best.mem;
        char brief[128];
        size_t len = strlen(err->msg);
        snprintf(err->msg + len, sizeof(err->msg) - len,
                 "\n>> Per device (%s, stage %d): weights %lld, gradients %lld, optimizer %lld, "
                 "activations %lld, logits %lld, reserve %lld bytes",
                 plan_brief(brief, sizeof(brief), &res->best), m->stage,
                 (long long) m->weights_bytes, (long long) m->gradients_bytes,
                 (long long) m->optimizer_bytes, (long long) m->activations_bytes,
                 (long long) m->logits_bytes, (long long) m->reserve_bytes);
    }
    return MOAI_EOOM;
}
