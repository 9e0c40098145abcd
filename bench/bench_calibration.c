/* bench_calibration.c - the planner's predictions against published training runs
 * (bench/calibration/runs.json, see calib.h): per run, predicted / published throughput at
 * the published layout, the planner's own choice against the published layout, and the
 * predicted memory against the published peak; then, for the fitting half and the held-out
 * half separately, the median ratio and the share within +-20%.
 *
 * Run from the repository root (make bench does): reads bench/calibration/runs.json, or the
 * file named by its one argument. */
#include "bench_util.h"
#include "calib.h"

static int cmp_dbl(const void *a, const void *b)
{
    double x = *(const double *) a, y = *(const double *) b;
    return (x > y) - (x < y);
}

struct tally {
    double ratio[512];
    int n, within, choice_ok, oom, mem_n, mem_within;
};

static void tally_add(struct tally *t, const struct calib_result *c)
{
    double q = c->predicted_tps / c->published_tps;
    if (t->n < 512)
        t->ratio[t->n++] = q;
    t->within += q >= 0.8 && q <= 1.2;
    t->choice_ok += c->choice_tps >= c->predicted_tps * (1 - 1e-9);
    t->oom += !c->published_fits;
    if (c->published_gib > 0) {
        double m = c->predicted_gib / c->published_gib;
        t->mem_n++;
        t->mem_within += m >= 0.85 && m <= 1.15;
    }
}

static void tally_print(const char *name, struct tally *t)
{
    char fig[64], note[256];
    if (t->n == 0)
        return;
    qsort(t->ratio, (size_t) t->n, sizeof(double), cmp_dbl);
    double med = t->n % 2 ? t->ratio[t->n / 2] : 0.5 * (t->ratio[t->n / 2 - 1] + t->ratio[t->n / 2]);
    snprintf(fig, sizeof(fig), "%.0f%% in 20%%", 100.0 * t->within / t->n);
    snprintf(note, sizeof(note),
             "%d runs: median predicted/published %.3f (target [0.9, 1.1]); choice >= published "
             "in %d; published layout OOM in %d; memory within 15%% in %d of %d",
             t->n, med, t->choice_ok, t->oom, t->mem_within, t->mem_n);
    bench_row(name, fig, ">= 80%", note);
}

int main(int argc, char **argv)
{
    const char *path = argc > 1 ? argv[1] : "bench/calibration/runs.json";
    struct moai_err err = {0};
    struct tally fit = {0}, holdout = {0};

    log_set_level(LOG_WARN);
    json_t *runs = calib_load(path, &err);
    if (!runs) {
        bench_row("calibration", "error", "", err.msg);
        return 1;
    }
    printf("%-40s %-10s %5s %9s %9s %6s %6s %7s %7s  %-40s %s\n", "run", "device", "devs",
           "published", "predicted", "ratio", "choice", "mem GiB", "peak",
           "published layout (as planned)", "planner's choice");
    for (size_t i = 0; i < json_array_size(runs); i++) {
        struct calib_result c;
        if (calib_run_eval(&c, json_array_get(runs, i)) < 0) {
            printf("%-40.40s %-10s skipped: %s\n", c.id, c.device, c.skipped);
            continue;
        }
        printf("%-40.40s %-10s %5d %9.0f %9.0f %6.3f %6.3f %7.1f %7.1f  %-40s %s%s\n", c.id,
               c.device, c.devices, c.published_tps, c.predicted_tps,
               c.predicted_tps / c.published_tps, c.choice_tps / c.predicted_tps, c.predicted_gib,
               c.published_gib, c.layout, c.choice,
               c.published_fits ? "" : "  (published layout predicted OOM)");
        tally_add(strcmp(c.split, "holdout") ? &fit : &holdout, &c);
    }
    tally_print("calibration: fitting half", &fit);
    tally_print("calibration: held-out half", &holdout);
    json_decref(runs);
    return 0;
}
