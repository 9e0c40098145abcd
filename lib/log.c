/* log.c - timestamped log lines on standard error (see log.h). */
#include "log.h"

#include "progress.h"

#include <stdarg.h>
#include <time.h>

static enum log_level log_level = LOG_INFO;
static FILE *log_stream;

static const char *const log_level_names[] = {
    [LOG_ERROR] = "error",
    [LOG_WARN] = "warning",
    [LOG_INFO] = "info",
    [LOG_DEBUG] = "debug",
};

void log_set_level(enum log_level level)
{
    log_level = level;
}

enum log_level log_get_level(void)
{
    return log_level;
}

void log_set_stream(FILE *stream)
{
    log_stream = stream;
}

void log_timestamp(char *buf, size_t size)
{
    struct timespec ts;
    struct tm tm;
    char date[32];

    clock_gettime(CLOCK_REALTIME, &ts);
    localtime_r(&ts.tv_sec, &tm);
    strftime(date, sizeof(date), "%Y-%m-%d %H:%M:%S", &tm);
    snprintf(buf, size, "[%s.%03ld]", date, ts.tv_nsec / 1000000);
}

void log_msg(enum log_level level, const char *fmt, ...)
{
    FILE *out = log_stream ? log_stream : stderr;
    char stamp[48];
    va_list ap;

    if (level > log_level)
        return;
    log_timestamp(stamp, sizeof(stamp));
    if (!log_stream)
        progress_interrupt(); /* a bar on the terminal: the line goes above it */
    flockfile(out);
    fprintf(out, "%s [%s] ", stamp, log_level_names[level]);
    va_start(ap, fmt);
    vfprintf(out, fmt, ap);
    va_end(ap);
    fputc('\n', out);
    funlockfile(out);
    fflush(out);
}
