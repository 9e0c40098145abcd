/* log.h - timestamped log lines on standard error.
 *
 * One event per line, in the platform's form:
 *
 *     [2026-11-22 14:07:02.815] [info] The number of candidates is 30.
 *
 * Levels: error and warning always print unless quiet; info by default; debug with -v.
 * Thread-safe: each line is written whole under the stream's lock.
 *
 *     log_set_level(LOG_INFO);
 *     log_info("The number of candidates is %d.", n);
 */
#ifndef MOAI_LOG_H
#define MOAI_LOG_H

#include <stdio.h>

enum log_level {
    LOG_ERROR = 0,
    LOG_WARN = 1,
    LOG_INFO = 2,
    LOG_DEBUG = 3,
};

/* Lines above level are dropped. Default LOG_INFO. */
void log_set_level(enum log_level level);
enum log_level log_get_level(void);

/* Redirects log lines (default stderr); for tests. */
void log_set_stream(FILE *stream);

void log_msg(enum log_level level, const char *fmt, ...) __attribute__((format(printf, 2, 3)));

#define log_error(...) log_msg(LOG_ERROR, __VA_ARGS__)
#define log_warn(...)  log_msg(LOG_WARN, __VA_ARGS__)
#define log_info(...)  log_msg(LOG_INFO, __VA_ARGS__)
#define log_debug(...) log_msg(LOG_DEBUG, __VA_ARGS__)

/* Writes the "[YYYY-mm-dd HH:MM:SS.mmm]" stamp of now into buf (at least 26 bytes). */
void log_timestamp(char *buf, size_t size);

#endif
