/* test_calibration.c - the planner against the published runs of bench/calibration/runs.json
 * (see bench/calib.h): the targets the accelerator models were calibrated to, so that a change
 * of the memory or cost model that breaks them fails here. Predictions are arithmetic, not
 * timings: the same on every machine. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <cmocka.h>

#include "../bench/calib.h"

#define RUNS "bench/calibration/runs.json"

struct split {
    double ratio[512];
    int n, within, choice_ok;
};

static int cmp_dbl(const void *a, const void *b)
{
    double x = *(const double *) a, y = *(const double *) b;
    return (x > y) - (x < y);
}

static double median(struct split *s)
{
    qsort(s->ratio, (size_t) s->n, sizeof(double), cmp_dbl);
    return s->n % 2 ? s->ratio[s->n / 2] : 0.5 * (s->ratio[s->n / 2 - 1] + s->ratio[s->n / 2]);
}

/* At least 30 runs over at least 3 device types; on each half: >= 80% of runs predicted within
 * +-20% at the published layout, median in [0.9, 1.1], the planner's choice at least as fast
 * as the published layout in >= 90%; no published layout called OUT_OF_MEMORY; every
 * published peak within +-15%. */
static void test_calibration_targets(void **state)
{
    (void) state;
    struct moai_err err = {0};
    json_t *runs = calib_load(RUNS, &err);
    struct split fit = {0}, holdout = {0};
    char devices[16][32];
    int ndevices = 0, evaluated = 0;

    log_set_level(LOG_WARN);
    assert_non_null(runs);
    for (size_t i = 0; i < json_array_size(runs); i++) {
        struct calib_result c;
        if (calib_run_eval(&c, json_array_get(runs, i)) < 0)
            continue;
        evaluated++;
        bool seen = false;
        for (int d = 0; d < ndevices; d++)
            seen |= !strcmp(devices[d], c.device);
        if (!seen && ndevices < 16)
            snprintf(devices[ndevices++], sizeof(devices[0]), "%s", c.device);
        if (!c.published_fits)
            fail_msg("%s: the published layout is predicted OUT_OF_MEMORY (%.1f GiB)", c.id,
                     c.predicted_gib);
        if (c.published_gib > 0 && fabs(c.predicted_gib / c.published_gib - 1) > 0.15)
            fail_msg("%s: predicted %.1f GiB against a published peak of %.1f GiB", c.id,
                     c.predicted_gib, c.published_gib);
        struct split *s = strcmp(c.split, "holdout") ? &fit : &holdout;
        double q = c.predicted_tps / c.published_tps;
        assert_true(s->n < 512);
        s->ratio[s->n++] = q;
        s->within += q >= 0.8 && q <= 1.2;
        s->choice_ok += c.choice_tps >= c.predicted_tps * (1 - 1e-9);
    }
    json_decref(runs);
    assert_true(evaluated >= 30);
    assert_true(ndevices >= 3);
    struct split *halves[] = {&fit, &holdout};
    for (int h = 0; h < 2; h++) {
        struct split *s = halves[h];
        assert_true(s->n >= 10);
        double med = median(s);
        if (s->within < 0.8 * s->n || med < 0.9 || med > 1.1 || s->choice_ok < 0.9 * s->n)
            fail_msg("%s half: %d of %d within 20%%, median %.3f, choice >= published in %d",
                     h ? "held-out" : "fitting", s->within, s->n, med, s->choice_ok);
    }
}

/* A run the table cannot express is skipped with its reason, not planned wrongly. */
static void test_calibration_skips_what_it_cannot_plan(void **state)
{
    (void) state;
    json_t *run = json_pack("{s:s, s:s, s:i, s:i, s:i, s:i, s:{s:f}}", "id", "cp", "device",
                            "h100-80gb", "devices", 8, "global_batch", 8, "seq_len", 4096, "cp", 2,
                            "published", "tokens_per_s_per_device", 1000.0);
    struct calib_result c;
    assert_int_equal(calib_run_eval(&c, run), -1);
    assert_string_equal(c.skipped, "context parallelism");
    json_decref(run);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_calibration_targets),
        cmocka_unit_test(test_calibration_skips_what_it_cannot_plan),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
