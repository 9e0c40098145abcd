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
};

/* Monotonic seconds (CLOCK_MONOTONIC). */
double progress_now(void);

void progress_init(struct progress *p, const char *desc, int64_t total, const char *unit);
void progress_update(struct progress *p, int64_t n);
/* Draws the final bar (or logs the plain line) and ends the line. */
void progress_finish(struct progress *p);

/* Formats the bar for n of total after elapsed_s seconds into buf (no newline), width
 * columns for the bar itself. Exposed for tests. Returns buf. */
char *progress_format(char *buf, size_t size, const char *desc, int64_t n, int64_t total,
                      double elapsed_s, const char *unit, int width);

#endif
