/* steplog.c - the documented step lines and JSON step objects (see steplog.h). */
#include "exec/steplog.h"

#include <math.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* Rounds to two decimals the way printf does, for the JSON twin of "%.2f". */
static double round2(double x)
{
    char buf[64];
    snprintf(buf, sizeof(buf), "%.2f", x);
    return strtod(buf, NULL);
}

char *steplog_format_loss(char *buf, size_t size, double loss)
{
    if (!isfinite(loss)) {
        snprintf(buf, size, "%s", isnan(loss) ? "nan" : (loss > 0 ? "inf" : "-inf"));
        return buf;
    }
    /* 7 significant digits as fixed-point decimals, then strip trailing zeros. */
    int digits = loss == 0.0 ? 0 : 6 - (int) floor(log10(fabs(loss)));
    if (digits < 0)
        digits = 0;
    if (digits > 20)
        digits = 20;
    snprintf(buf, size, "%.*f", digits, loss);
    if (strchr(buf, '.')) {
        char *end = buf + strlen(buf) - 1;
        while (*end == '0')
            *end-- = '\0';
        if (*end == '.')
            *end = '\0';
    }
    return buf;
}

char *steplog_format(char *buf, size_t size, const struct step_record *s)
{
    char loss[64];
    snprintf(buf, size,
             "[Step %lld/%lld] | Loss: %s | Duration: %.2f | Throughput: %.2f tokens/sec",
             (long long) s->step, (long long) s->total_steps,
             steplog_format_loss(loss, sizeof(loss), s->loss), s->duration_s, s->tokens_per_s);
    return buf;
}

/* A JSON number, or null for a value that is not finite (JSON has no NaN). */
static json_t *real_or_null(double x)
{
    return isfinite(x) ? json_real(x) : json_null();
}

json_t *steplog_json(const struct step_record *s)
{
    char loss[64];
    steplog_format_loss(loss, sizeof(loss), s->loss);
    json_t *j = json_object();
    if (!j)
        return NULL;
    json_object_set_new(j, "step", json_integer((json_int_t) s->step));
    json_object_set_new(j, "total_steps", json_integer((json_int_t) s->total_steps));
    json_object_set_new(j, "loss", real_or_null(strtod(loss, NULL)));
    json_object_set_new(j, "duration_s", real_or_null(round2(s->duration_s)));
    json_object_set_new(j, "tokens_per_s", real_or_null(round2(s->tokens_per_s)));
    json_object_set_new(j, "lr", real_or_null(s->lr));
    json_object_set_new(j, "grad_norm", real_or_null(s->grad_norm));
    json_object_set_new(j, "real_tokens_per_s", real_or_null(round2(s->real_tokens_per_s)));
    if (s->rows > 0) {
        json_object_set_new(j, "rows", json_integer((json_int_t) s->rows));
        json_object_set_new(j, "examples", json_integer((json_int_t) s->examples));
        json_object_set_new(j, "real_tokens", json_integer((json_int_t) s->real_tokens));
    }
    return j;
}

char *steplog_format_eval(char *buf, size_t size, int64_t step, int64_t total_steps, double loss)
{
    char text[64];
    snprintf(buf, size, "[Eval %lld/%lld] | Validation loss: %s | Perplexity: %.2f",
             (long long) step, (long long) total_steps,
             steplog_format_loss(text, sizeof(text), loss), exp(loss));
    return buf;
}

json_t *steplog_eval_json(int64_t step, int64_t total_steps, double loss)
{
    char text[64];
    steplog_format_loss(text, sizeof(text), loss);
    bool finite = isfinite(loss) && isfinite(exp(loss));
    return json_pack("{s:I, s:I, s:o, s:o}", "eval", (json_int_t) step, "total_steps",
                     (json_int_t) total_steps, "validation_loss",
                     isfinite(loss) ? json_real(strtod(text, NULL)) : json_null(), "perplexity",
                     finite ? json_real(round2(exp(loss))) : json_null());
}
