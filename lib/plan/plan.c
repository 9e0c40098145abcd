/* plan.c - the Advanced Parallelization: enumerate layouts, keep those that fit, pick the
 * fastest (see plan.h). */
#include "plan/plan.h"

#include "log.h"
#include "progress.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

const char *plan_recompute_name(enum recompute rc)
{
    return rc == RECOMPUTE_FULL ? "full" : rc == RECOMPUTE_SELECTIVE ? "selective" : "none";
}

void plan_evaluate(struct plan *p, const struct model_config *cfg, const struct recipe *r)
{
    mem_estimate(&p->mem, cfg, r, p);
    cost_estimate(&p->cost, cfg, r, p);
    p->predicted_step_seconds = p->cost.step_seconds;
    double tokens = (double) r->training.batch_size * (double) r->training.block_size;
    p->tokens_per_second = p->predicted_step_seconds > 0 ? tokens / p->predicted_step_seconds : 0;
    int devices = p->lay.dp * p->lay.pp * p->lay.tp;
    p->tflops_per_device = p->predicted_step_seconds > 0
                               ? p->cost.model_flops / p->predicted_step_seconds / devices / 1e12
                               : 0;
}

/* Every one of tp vocabulary shards of ceil(V / tp) rows holds at least one real row. */
static bool tp_fits_vocab(const struct model_config *cfg, int tp)
{
    return (int64_t) (tp - 1) * ((cfg->vocab_size + tp - 1) / tp) < cfg->vocab_size;
}

/* tp may shard the model: it divides the heads and the MLP width, divides the kv heads or
 * is a multiple of them (kv heads replicated), and leaves no vocabulary shard empty. */
static bool tp_fits_model(const struct model_config *cfg, int tp)
{
    int64_t kv = cfg->num_key_value_heads;
    return cfg->num_attention_heads % tp == 0 && cfg->intermediate_size % tp == 0 &&
           (kv % tp == 0 || tp % kv == 0) && tp_fits_vocab(cfg, tp);
}

int plan_check(const struct plan *p, const struct model_config *cfg, const struct recipe *r,
               struct moai_err *err)
{
    const struct flavor *f = &r->flavor;
    int64_t batch = r->training.batch_size;

    if (p->lay.dp * p->lay.pp * p->lay.tp != f->devices)
        return moai_err_set(err, MOAI_EUSAGE,
                            "dp %d x pp %d x tp %d is not the %d devices of "
                            "the flavor",
                            p->lay.dp, p->lay.pp, p->lay.tp, f->devices);
    if (f->devices_per_node % p->lay.tp != 0)
        return moai_err_set(err, MOAI_EUSAGE, "tp %d does not divide the %d devices of a node",
                            p->lay.tp, f->devices_per_node);
    if (cfg->num_attention_heads % p->lay.tp != 0)
        return moai_err_set(err, MOAI_EUSAGE, "tp %d does not divide the %lld attention heads",
                            p->lay.tp, (long long) cfg->num_attention_heads);
    if (cfg->intermediate_size % p->lay.tp != 0)
        return moai_err_set(err, MOAI_EUSAGE, "tp %d does not divide the MLP width %lld", p->lay.tp,
                            (long long) cfg->intermediate_size);
    if (!tp_fits_vocab(cfg, p->lay.tp))
        return moai_err_set(err, MOAI_EUSAGE,
                            "tp %d leaves a shard of the %lld-token vocabulary empty", p->lay.tp,
                            (long long) cfg->vocab_size);
    if (!tp_fits_model(cfg, p->lay.tp))
        return moai_err_set(err, MOAI_EUSAGE,
                            "tp %d neither divides nor is a multiple of the "
                            "%lld kv heads",
                            p->lay.tp, (long long) cfg->num_key_value_heads);
    if (p->lay.pp > cfg->num_hidden_layers)
        return moai_err_set(err, MOAI_EUSAGE, "pp %d exceeds the %lld layers", p->lay.pp,
                            (long long) cfg->num_hidden_layers);
    if (batch % p->lay.dp != 0)
        return moai_err_set(err, MOAI_EUSAGE, "dp %d does not divide the batch size %lld",
                            p->lay.dp, (long long) batch);
    if ((int64_t) p->lay.num_micro_batches * p->lay.batch_per_device * p->lay.dp != batch)
        return moai_err_set(err, MOAI_EUSAGE,
                            "dp %d x %d micro-batches x %lld sequences is not "
                            "the batch size %lld",
                            p->lay.dp, p->lay.num_micro_batches,
                            (long long) p->lay.batch_per_device, (long long) batch);
    return 0;
}

char *plan_config_line(char *buf, size_t size, const struct plan *p)
{
    char pp[128], tp[32], rc[16];
    if (p->lay.pp == 1)
        snprintf(pp, sizeof(pp), "No PP");
    else
        snprintf(pp, sizeof(pp), "num_stages : %d, num_micro_batches : %d, batch_per_device : %lld",
                 p->lay.pp, p->lay.num_micro_batches, (long long) p->lay.batch_per_device);
    if (p->lay.tp == 1)
        snprintf(tp, sizeof(tp), "No TP");
    else
        snprintf(tp, sizeof(tp), "TP : %d", p->lay.tp);
    if (p->lay.recomputation == RECOMPUTE_FULL)
        snprintf(rc, sizeof(rc), "full(2)");
    else
        snprintf(rc, sizeof(rc), "%d", p->lay.recomputation == RECOMPUTE_SELECTIVE ? 1 : 0);
    snprintf(buf, size,
             "%s, %s, recomputation : %s, distribute_param : %s, distribute_low_prec_param : %s",
             pp, tp, rc, p->lay.distribute_param ? "true" : "false",
             p->lay.distribute_low_prec_param ? "true" : "false");
    return buf;
}

char *plan_summary_line(char *buf, size_t size, const struct plan *p, int64_t capacity_bytes)
{
    snprintf(buf, size,
             "data parallel : %d, micro-batches : %d x %lld, memory per device : %.2f of %.2f "
             "GiB (%.0f%%), predicted step : %.3f s, %.2f tokens/s",
             p->lay.dp, p->lay.num_micro_batches, (long long) p->lay.batch_per_device,
             (double) p->mem.total_bytes / 1073741824.0, (double) capacity_bytes / 1073741824.0,
             100.0 * (double) p->mem.total_bytes / (double) capacity_bytes,
             p->predicted_step_seconds, p->tokens_per_second);
    return buf;
}

char *plan_brief(char *buf, size_t size, const struct plan *p)
{
    const char *zero = p->lay.distribute_low_prec_param ? "zero-3"
                       : p->lay.distribute_param        ? "zero-2"
                                                        : "zero-0";
    snprintf(buf, size, "dp %d pp %d tp %d mb %dx%lld rc %s %s", p->lay.dp, p->lay.pp, p->lay.tp,
             p->lay.num_micro_batches, (long long) p->lay.batch_per_device,
             plan_recompute_name(p->lay.recomputation), zero);
    return buf;
}

/* Orders feasible plans: faster first; ties less memory, fewer stages, less tp. */
static int better(const struct plan *a, const struct plan *b)
{
    if (a->predicted_step_seconds != b->predicted_step_seconds)
        return a->predicted_step_seconds < b->predicted_step_seconds;
    if (a->mem.total_bytes != b->mem.total_bytes)
        return a->mem.total_bytes < b->mem.total_bytes;
    if (a->lay.pp != b->lay.pp)
        return a->lay.pp < b->lay.pp;
    return a->lay.tp < b->lay.tp;
}

static int cmp_plans(const void *a, const void *b)
{
    const struct plan *x = a, *y = b;
    return better(x, y) ? -1 : better(y, x) ? 1 : 0;
}

struct search {
    const struct model_config *cfg;
    const struct recipe *r;
    struct plan *all;
    int64_t n, cap;
};

static int add(struct search *s, const struct plan *p)
{
    if (s->n == s->cap) {
        int64_t cap = s->cap ? 2 * s->cap : 1024;
        struct plan *all = realloc(s->all, (size_t) cap * sizeof(*all));
        if (!all)
            return MOAI_ENOMEM;
        s->all = all;
        s->cap = cap;
    }
    s->all[s->n++] = *p;
    return 0;
}

static bool pinned_ok(int pin, int v)
{
    return pin == RECIPE_AUTO || pin == v;
}

/* Every valid layout under the recipe's pins. */
static int enumerate(struct search *s)
{
    const struct model_config *cfg = s->cfg;
    const struct recipe *r = s->r;
    const struct flavor *f = &r->flavor;
    int N = f->devices;
    int64_t batch = r->training.batch_size;

    for (int tp = 1; tp <= f->devices_per_node; tp++) {
        if (f->devices_per_node % tp || N % tp || !tp_fits_model(cfg, tp) ||
            !pinned_ok(r->parallel.tp, tp))
            continue;
        for (int pp = 1; pp * tp <= N && pp <= cfg->num_hidden_layers; pp++) {
            if ((N / tp) % pp || !pinned_ok(r->parallel.pp, pp))
                continue;
            int dp = N / tp / pp;
            if (batch % dp || !pinned_ok(r->parallel.dp, dp))
                continue;
            int64_t per = batch / dp;
            for (int64_t nmb = 1; nmb <= per; nmb++) {
                if (per % nmb || !pinned_ok(r->parallel.num_micro_batches, (int) nmb))
                    continue;
                for (int rc = RECOMPUTE_NONE; rc <= RECOMPUTE_FULL; rc++) {
                    if (r->parallel.recomputation != RECOMPUTE_AUTO &&
                        r->parallel.recomputation != rc)
                        continue;
                    for (int zero = 0; zero <= 2; zero++) {
                        bool z2 = zero >= 1, z3 = zero == 2;
                        /* distribute_low_prec_param implies distribute_param */
                        if (r->parallel.distribute_param != RECIPE_AUTO &&
                            r->parallel.distribute_param != z2)
                            continue;
                        if (r->parallel.distribute_low_prec_param != RECIPE_AUTO &&
                            r->parallel.distribute_low_prec_param != z3)
                            continue;
                        /* one replica has nothing to shard over, unless asked for */
                        if (dp == 1 && zero > 0 && r->parallel.distribute_param == RECIPE_AUTO &&
                            r->parallel.distribute_low_prec_param == RECIPE_AUTO)
                            continue;
                        struct plan p = {.lay = {.dp = dp,
                                                 .pp = pp,
                                                 .tp = tp,
                                                 .num_micro_batches = (int) nmb,
                                                 .batch_per_device = per / nmb,
                                                 .recomputation = (enum recompute) rc,
                                                 .distribute_param = z2,
                                                 .distribute_low_prec_param = z3}};
                        if (add(s, &p) < 0)
                            return MOAI_ENOMEM;
                    }
                }
            }
        }
    }
    return 0;
}

/* Why no candidate satisfies the pins: the first pinned field no layout can take. */
static int explain_pins(const struct model_config *cfg, const struct recipe *r,
                        struct moai_err *err)
{
    const struct flavor *f = &r->flavor;
    int N = f->devices;
    int tp = r->parallel.tp, pp = r->parallel.pp, dp = r->parallel.dp;

    if (tp != RECIPE_AUTO) {
        if (f->devices_per_node % tp)
            return moai_err_set(err, MOAI_EUSAGE,
                                "pinned tp %d does not divide the %d devices "
                                "of a node of flavor '%s'",
                                tp, f->devices_per_node, flavor_display_name(f));
        if (cfg->num_attention_heads % tp)
            return moai_err_set(err, MOAI_EUSAGE,
                                "pinned tp %d does not divide the %lld "
                                "attention heads",
                                tp, (long long) cfg->num_attention_heads);
        if (!tp_fits_vocab(cfg, tp))
            return moai_err_set(err, MOAI_EUSAGE,
                                "pinned tp %d leaves a shard of the %lld-token vocabulary empty",
                                tp, (long long) cfg->vocab_size);
        if (!tp_fits_model(cfg, tp))
            return moai_err_set(err, MOAI_EUSAGE,
                                "pinned tp %d does not fit the model (MLP "
                                "width %lld, %lld kv heads)",
                                tp, (long long) cfg->intermediate_size,
                                (long long) cfg->num_key_value_heads);
    }
    if (pp != RECIPE_AUTO && pp > cfg->num_hidden_layers)
        return moai_err_set(err, MOAI_EUSAGE, "pinned pp %d exceeds the %lld layers", pp,
                            (long long) cfg->num_hidden_layers);
    int prod =
        (tp != RECIPE_AUTO ? tp : 1) * (pp != RECIPE_AUTO ? pp : 1) * (dp != RECIPE_AUTO ? dp : 1);
    if (N % prod)
        return moai_err_set(err, MOAI_EUSAGE,
                            "the pinned degrees (dp x pp x tp = %d) do not "
                            "divide the %d devices of flavor '%s'",
                            prod, N, flavor_display_name(f));
    if (dp != RECIPE_AUTO && r->training.batch_size % dp)
        return moai_err_set(err, MOAI_EUSAGE, "pinned dp %d does not divide the batch size %lld",
                            dp, (long long) r->training.batch_size);
    if (r->parallel.num_micro_batches != RECIPE_AUTO)
        return moai_err_set(err, MOAI_EUSAGE,
                            "no layout of flavor '%s' runs %d micro-batches "
                            "of the batch size %lld with the other pins",
                            flavor_display_name(f), r->parallel.num_micro_batches,
                            (long long) r->training.batch_size);
    if (r->parallel.distribute_low_prec_param == 1 && r->parallel.distribute_param == 0)
        return moai_err_set(err, MOAI_EUSAGE,
                            "distribute_low_prec_param needs "
                            "distribute_param (it shards what that shards, and the weights)");
    return moai_err_set(err, MOAI_EUSAGE,
                        "no layout of the %d devices of flavor '%s' satisfies "
                        "the pins (parallel.*) with the batch size %lld",
                        N, flavor_display_name(f), (long long) r->training.batch_size);
}

static void log_rejected(struct search *s, int64_t capacity)
{
    /* The five closest to fitting, and what did not fit. */
    char brief[128];
    for (int round = 0; round < 5; round++) {
        const struct plan *best = NULL;
        for (int64_t i = 0; i < s->n; i++) {
            const struct plan *p = &s->all[i];
            if (p->mem.total_bytes <= capacity || p->mem.stage < -1)
                continue;
            if (!best || p->mem.total_bytes < best->mem.total_bytes)
                best = p;
        }
        if (!best)
            break;
        const struct mem_breakdown *m = &best->mem;
        log_debug("rejected %s: needs %lld bytes on stage %d, %lld over (weights %lld, "
                  "gradients %lld, optimizer %lld, activations %lld, logits %lld)",
                  plan_brief(brief, sizeof(brief), best), (long long) m->total_bytes, m->stage,
                  (long long) (m->total_bytes - capacity), (long long) m->weights_bytes,
                  (long long) m->gradients_bytes, (long long) m->optimizer_bytes,
                  (long long) m->activations_bytes, (long long) m->logits_bytes);
        ((struct plan *) best)->mem.stage = -2 - best->mem.stage; /* mark as shown */
    }
    for (int64_t i = 0; i < s->n; i++) /* undo the marks */
        if (s->all[i].mem.stage < -1)
            s->all[i].mem.stage = -2 - s->all[i].mem.stage;
}

static int plan_plain(struct plan_result *res, const struct model_config *cfg,
                      const struct recipe *r, struct moai_err *err)
{
    const struct flavor *f = &r->flavor;
    int64_t batch = r->training.batch_size;
    char line[512];

    if (batch % f->devices)
        return moai_err_set(err, MOAI_EUSAGE,
                            "the batch size %lld is not divisible by the %d "
                            "devices of flavor '%s' (without advanced parallelization the batch "
                            "is split evenly)",
                            (long long) batch, f->devices, flavor_display_name(f));
    struct plan p = {.lay = {.dp = f->devices,
                             .pp = 1,
                             .tp = 1,
                             .num_micro_batches = 1,
                             .batch_per_device = batch / f->devices,
                             .recomputation = RECOMPUTE_NONE}};
    plan_evaluate(&p, cfg, r);
    res->best = p;
    res->candidates = 1;
    res->feasible = p.mem.total_bytes <= f->device.memory_bytes;
    log_info("Advanced parallelization is off: data parallel over the %d devices.", f->devices);
    if (!res->feasible) {
        res->requested_bytes = mem_requested_bytes(&p.mem, f->device.memory_bytes);
        return MOAI_EOOM;
    }
    log_info("%s", plan_config_line(line, sizeof(line), &p));
    log_info("%s", plan_summary_line(line, sizeof(line), &p, f->device.memory_bytes));
    return 0;
}

/* Sizes every candidate (the platform's "compile"). */
static void size_all(struct search *s)
{
    log_info("The number of candidates is %lld.", (long long) s->n);
    log_info("Parallel Graph Compile start...");
    double t1 = progress_now();
    for (int64_t i = 0; i < s->n; i++)
        mem_estimate(&s->all[i].mem, s->cfg, s->r, &s->all[i]);
    log_info("Elapsed Time to compile all candidates = %.0f [ms]", (progress_now() - t1) * 1e3);
    log_info("Parallel Graph Compile finished.");
}

/* Moves the candidates that fit capacity to the front; returns their count and, in *closest,
 * the one that needs the least memory (copied before the compaction overwrites it). */
static int64_t keep_feasible(struct search *s, int64_t capacity, struct plan *closest)
{
    int64_t feasible = 0, least = 0;
    for (int64_t i = 1; i < s->n; i++)
        if (s->all[i].mem.total_bytes < s->all[least].mem.total_bytes)
            least = i;
    *closest = s->all[least];
    for (int64_t i = 0; i < s->n; i++)
        if (s->all[i].mem.total_bytes <= capacity)
            s->all[feasible++] = s->all[i];
    log_info("The number of possible candidates is %lld.", (long long) feasible);
    return feasible;
}

/* Nothing fits: res reports the closest plan; at debug level the rejected ones. */
static int report_none_fits(struct plan_result *res, struct search *s, const struct plan *closest,
                            int64_t capacity)
{
    res->best = *closest;
    plan_evaluate(&res->best, s->cfg, s->r);
    res->requested_bytes = mem_requested_bytes(&res->best.mem, capacity);
    if (log_get_level() >= LOG_DEBUG) {
        for (int64_t i = 0; i < s->n; i++) /* the compaction overwrote them: size again */
            mem_estimate(&s->all[i].mem, s->cfg, s->r, &s->all[i]);
        log_rejected(s, capacity);
    }
    return MOAI_EOOM;
}

/* Costs the feasible candidates and returns the index of the fastest (ties: better()). */
static int64_t select_best(struct search *s, int64_t feasible)
{
    log_info("SelectBestGraphFromCandidates start...");
    double t2 = progress_now();
    int64_t best = 0;
    for (int64_t i = 0; i < feasible; i++) {
        plan_evaluate(&s->all[i], s->cfg, s->r);
        if (i && better(&s->all[i], &s->all[best]))
            best = i;
    }
    log_info("Elapsed Time to compute cost for survived candidates = %.0f [ms]",
             (progress_now() - t2) * 1e3);
    log_info("SelectBestGraphFromCandidates finished.");
    return best;
}

/* The next PLAN_RUNNERS_UP fastest after the best, distinct. */
static void pick_runners_up(struct plan_result *res, const struct search *s, int64_t feasible,
                            int64_t best)
{
    for (int k = 0; k < PLAN_RUNNERS_UP; k++) {
        int64_t pick = -1;
        for (int64_t i = 0; i < feasible; i++) {
            if (i == best)
                continue;
            bool taken = false;
            for (int j = 0; j < res->n_runners_up; j++)
                taken |= !memcmp(&res->runners_up[j], &s->all[i], sizeof(struct plan));
            if (taken)
                continue;
            if (pick < 0 || better(&s->all[i], &s->all[pick]))
                pick = i;
        }
        if (pick < 0)
            break;
        res->runners_up[res->n_runners_up++] = s->all[pick];
    }
}

/* Debug level: the ten fastest that fit, and the rejected ones closest to fitting. */
static void log_candidates(struct search *s, int64_t feasible, int64_t capacity)
{
    char brief[128];
    log_debug("the ten fastest candidates that fit:");
    qsort(s->all, (size_t) feasible, sizeof(*s->all), cmp_plans);
    for (int64_t j = 0; j < feasible && j < 10; j++)
        log_debug("  %lld. %s: %.3f s, %lld bytes", (long long) j + 1,
                  plan_brief(brief, sizeof(brief), &s->all[j]), s->all[j].predicted_step_seconds,
                  (long long) s->all[j].mem.total_bytes);
    /* the compaction overwrote the rejected ones: enumerate them again */
    s->n = 0;
    if (enumerate(s) == 0) {
        for (int64_t i = 0; i < s->n; i++)
            mem_estimate(&s->all[i].mem, s->cfg, s->r, &s->all[i]);
        log_rejected(s, capacity);
    }
}

/* The pins rule every layout out: say which, naming the recipe. */
static int no_candidates(const struct model_config *cfg, const struct recipe *r,
                         struct moai_err *err)
{
    int rc = explain_pins(cfg, r, err);
    char msg[sizeof(err->msg)];
    snprintf(msg, sizeof(msg), "%s: %s", r->source, err->msg);
    memcpy(err->msg, msg, sizeof(msg));
    return rc;
}

int plan_search(struct plan_result *res, const struct model_config *cfg, const struct recipe *r,
                struct moai_err *err)
{
    int64_t capacity = r->flavor.device.memory_bytes;
    struct search s = {.cfg = cfg, .r = r};
    struct plan closest;
    char line[512];
    double t0 = progress_now();
    int rc = 0;

    memset(res, 0, sizeof(*res));
    res->advanced = r->parallel.advanced;
    res->param_count = model_param_count(cfg);
    res->available_bytes = capacity;
    if (!r->parallel.advanced) {
        rc = plan_plain(res, cfg, r, err);
        goto out;
    }
    if ((rc = enumerate(&s)) < 0) {
        rc = moai_err_set(err, rc, "out of memory enumerating layouts");
        goto out;
    }
    if (s.n == 0) {
        rc = no_candidates(cfg, r, err);
        goto out;
    }
    res->candidates = s.n;
    size_all(&s);
    res->feasible = keep_feasible(&s, capacity, &closest);
    if (res->feasible == 0) {
        rc = report_none_fits(res, &s, &closest, capacity);
        goto out;
    }
    int64_t best = select_best(&s, res->feasible);
    res->best = s.all[best];
    pick_runners_up(res, &s, res->feasible, best);
    log_info("Configuration for parallelism is selected.");
    log_info("%s", plan_config_line(line, sizeof(line), &res->best));
    log_info("%s", plan_summary_line(line, sizeof(line), &res->best, capacity));
    if (log_get_level() >= LOG_DEBUG)
        log_candidates(&s, res->feasible, capacity);
out:
    free(s.all);
    res->plan_ms = (progress_now() - t0) * 1e3;
    return rc;
}
