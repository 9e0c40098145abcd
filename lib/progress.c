/* progress.c - tqdm-style progress bars (see progress.h). */
#include "progress.h"

#include "log.h"

#include <stdarg.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

double progress_now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double) ts.tv_sec + (double) ts.tv_nsec * 1e-9;
}

static void format_clock(char *buf, size_t size, double seconds)
{
    long s = seconds < 0 ? 0 : (long) (seconds + 0.5);
    if (s >= 3600)
        snprintf(buf, size, "%ld:%02ld:%02ld", s / 3600, (s / 60) % 60, s % 60);
    else
        snprintf(buf, size, "%02ld:%02ld", s / 60, s % 60);
}

char *progress_format(char *buf, size_t size, const char *desc, int64_t n, int64_t total,
                      double elapsed_s, const char *unit, int width)
{
    return progress_format_from(buf, size, desc, 0, n, total, elapsed_s, unit, width, "");
}

char *progress_format_from(char *buf, size_t size, const char *desc, int64_t base, int64_t n,
                           int64_t total, double elapsed_s, const char *unit, int width,
                           const char *postfix)
{
    static const char *const eighths[] = {"", "▏", "▎", "▍", "▌", "▋", "▊", "▉"};
    char elapsed[64], remain[64], rate[64], bar[512];
    double frac = total > 0 ? (double) n / (double) total : 0.0;
    double per_s = elapsed_s > 0 ? (double) (n - base) / elapsed_s : 0.0;
    size_t len = 0;

    if (frac > 1.0)
        frac = 1.0;
    int cells8 = (int) (frac * width * 8);
    for (int i = 0; i < cells8 / 8 && len + 4 < sizeof(bar); i++)
        len += (size_t) snprintf(bar + len, sizeof(bar) - len, "█");
    if (cells8 / 8 < width) {
        len += (size_t) snprintf(bar + len, sizeof(bar) - len, "%s", eighths[cells8 % 8]);
        for (int i = cells8 / 8 + (cells8 % 8 ? 1 : 0); i < width && len + 2 < sizeof(bar); i++)
            bar[len++] = ' ';
        bar[len] = '\0';
    }
    format_clock(elapsed, sizeof(elapsed), elapsed_s);
    if (per_s > 0)
        format_clock(remain, sizeof(remain), (double) (total - n) / per_s);
    else
        snprintf(remain, sizeof(remain), "?");
    if (per_s >= 1.0 || per_s == 0.0 || strcmp(unit, "it") != 0)
        snprintf(rate, sizeof(rate), "%.2f %s/s", per_s, unit);
    else
        snprintf(rate, sizeof(rate), "%5.2fs/%s", 1.0 / per_s, unit);
    snprintf(buf, size, "%s: %3d%%|%s| %lld/%lld [%s<%s, %s%s]", desc, (int) (frac * 100.0), bar,
             (long long) n, (long long) total, elapsed, remain, rate, postfix);
    return buf;
}

void progress_init(struct progress *p, const char *desc, int64_t total, const char *unit)
{
    memset(p, 0, sizeof(*p));
    p->desc = desc;
    p->unit = unit;
    p->total = total;
    p->out = stderr;
    p->start_s = progress_now();
    p->tty = isatty(STDERR_FILENO) && log_get_level() >= LOG_INFO;
}

/* The bar drawn now on the terminal, if any, and where: log lines erase it first. The pointer
 * is only compared, never followed (a bar abandoned on an error path may be gone). */
static struct progress *_Atomic drawn;
static FILE *_Atomic drawn_out;

static void progress_draw(struct progress *p, double now)
{
    char line[1024];
    progress_format_from(line, sizeof(line), p->desc, p->base, p->n, p->total, now - p->start_s,
                         p->unit, 30, p->postfix);
    fprintf(p->out, "\r%s\033[K", line);
    fflush(p->out);
    p->drawn_s = now;
    drawn_out = p->out;
    drawn = p;
}

void progress_start_at(struct progress *p, int64_t n)
{
    p->base = p->n = n;
}

void progress_postfix(struct progress *p, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(p->postfix, sizeof(p->postfix), fmt, ap);
    va_end(ap);
}

void progress_clear(struct progress *p)
{
    if (!p->tty || drawn != p)
        return;
    fputs("\r\033[K", p->out);
    fflush(p->out);
    drawn = NULL; /* the next update draws it again */
}

void progress_interrupt(void)
{
    FILE *out = drawn_out;
    if (!drawn || !out)
        return;
    fputs("\r\033[K", out);
    fflush(out);
    drawn = NULL;
}

void progress_update(struct progress *p, int64_t n)
{
    p->n = n;
    if (!p->tty)
        return;
    double now = progress_now();
    if (now - p->drawn_s >= 0.1 || n == p->total || drawn != p)
        progress_draw(p, now);
}

void progress_finish(struct progress *p)
{
    double now = progress_now();
    if (p->tty) {
        progress_draw(p, now);
        fputc('\n', p->out);
        fflush(p->out);
        drawn = NULL;
        return;
    }
    char line[1024];
    log_info("%s", progress_format_from(line, sizeof(line), p->desc, p->base, p->n, p->total,
                                        now - p->start_s, p->unit, 30, p->postfix));
}
