/* progress.h - tqdm-style progress bars on standard error.
 *
 *     Map: 100%|██████████████████████████████| 1000/1000 [00:05<00:00, 188.95 examples/s]
 *     Loading checkpoint shards: 100%|█████████| 2/2 [00:08<00:00,  4.15s/it]
 *
 * A bar is drawn (redrawn in place with '\r', at most every 0.1 s) only when standard error
 * is a terminal and the log level is at least info; otherwise progress_finish logs one plain
 * line with the same figures. Not thread-safe: one thread updates a bar; workers may add to
 * a shared counter and let the owner call progress_update.
 *
 * A bar may start past 0 (a resumed run: its rate and ETA count only what this run did) and
 * carry a postfix (", loss 4.61, lr 5.0e-04"):
 *
 *     Training:  40%|████████████                  | 24/60 [00:18<00:27, 1.33 steps/s, loss 4.61]
 *
 * While a bar is drawn, a log line (log.c calls progress_interrupt) or a caller about to print
 * on the same terminal (progress_clear) first erases it; the next update draws it again.
 *
 *     struct progress p;
 *     progress_init(&p, "Map", n, "examples");
 *     for (i = 0; i < n; i++) { work(i); progress_update(&p, i + 1); }
 *     progress_finish(&p);
 */
#ifndef MOAI_PROGRESS_H
#define MOAI_PROGRESS_H

#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>

struct progress {
    const char *desc; /* "Map", "Loading checkpoint shards" */
    const char *unit; /* "examples"; "it" prints s/it when slower than 1/s */
    int64_t total;
    int64_t n;
    double start_s; /* monotonic seconds at init */
    double drawn_s; /* when the bar was last drawn */
    bool tty;       /* draw the bar in place */
    FILE *out;
    int64_t base;      /* n when the bar started (rate and ETA count from it) */
    char postfix[128]; /* appended after the rate, "" when none */
};

/* Monotonic seconds (CLOCK_MONOTONIC). */
double progress_now(void);

void progress_init(struct progress *p, const char *desc, int64_t total, const char *unit);
/* Starts the bar at n of total (after progress_init). */
void progress_start_at(struct progress *p, int64_t n);
/* Sets the postfix (printf-style; ", loss 4.61"); shown from the next draw. */
void progress_postfix(struct progress *p, const char *fmt, ...)
    __attribute__((format(printf, 2, 3)));
/* Erases a drawn bar from its line (for output about to go to the same terminal). */
void progress_clear(struct progress *p);
/* Erases whatever bar is drawn now, if any (log.c calls it before each log line). */
void progress_interrupt(void);
void progress_update(struct progress *p, int64_t n);
/* Draws the final bar (or logs the plain line) and ends the line. */
void progress_finish(struct progress *p);

/* Formats the bar for n of total after elapsed_s seconds into buf (no newline), width
 * columns for the bar itself. Exposed for tests. Returns buf. */
char *progress_format(char *buf, size_t size, const char *desc, int64_t n, int64_t total,
                      double elapsed_s, const char *unit, int width);

/* The same for a bar started at base, with postfix after the rate (may be ""). */
char *progress_format_from(char *buf, size_t size, const char *desc, int64_t base, int64_t n,
                           int64_t total, double elapsed_s, const char *unit, int width,
                           const char *postfix);

#endif
