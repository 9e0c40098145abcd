/* err.h - error reporting for library code: codes, a message struct, always-on asserts.
 *
 * Library code never prints errors and never exits. A function that can fail returns 0 on
 * success or a negative MOAI_E* code, and fills the caller's struct moai_err with one line of
 * text in git's form: what failed first, the subject quoted, no final period, e.g.
 *
 *     recipe.yaml:7:3: unknown key 'batchsize' in 'training' (did you mean 'batch_size'?)
 *
 * Only cmd/ prints the message and maps the code to an exit status (moai_err_exit_status).
 * An optional hint (a second line, printed as "hint: ...") may be set with moai_err_hint.
 *
 *     struct moai_err err = {0};
 *     if (recipe_load(&r, "x.yaml", &err) < 0)
 *         fprintf(stderr, "moai-finetune: error: %s\n", err.msg);
 *
 * Thread-safety: a struct moai_err belongs to one thread at a time.
 */
#ifndef MOAI_ERR_H
#define MOAI_ERR_H

#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>

#ifdef __cplusplus
extern "C" {
#define MOAI_NORETURN [[noreturn]]
#else
#define MOAI_NORETURN _Noreturn
#endif

enum moai_errcode {
    MOAI_OK = 0,
    MOAI_EIO = -1,     /* run-time failure: I/O, bad data file, non-finite loss (exit 1) */
    MOAI_EUSAGE = -2,  /* usage or recipe error (exit 2) */
    MOAI_EOOM = -3,    /* no layout fits, or an arena is full (exit 3) */
    MOAI_ENOTYET = -4, /* a feature that is not built yet (exit 2) */
    MOAI_EINTR = -5,   /* interrupted by a signal after a checkpoint was saved (exit 130) */
    MOAI_ENOMEM = -6,  /* the host's malloc failed (exit 1) */
};

struct moai_err {
    int code;       /* the last code set, 0 when none */
    char msg[1024]; /* one line, no trailing newline */
    char hint[512]; /* optional second line, "" when none */
};

/* Sets err's code and message (printf-style) and returns code, so a caller can write
 * `return moai_err_set(err, MOAI_EIO, "cannot open '%s': %s", path, strerror(errno));`.
 * err may be NULL, in which case only the code is returned. */
int moai_err_set(struct moai_err *err, int code, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));
int moai_err_vset(struct moai_err *err, int code, const char *fmt, va_list ap);

/* Prepends "prefix: " to err's message (used to add a file name to an inner error).
 * Returns err->code. */
int moai_err_prefix(struct moai_err *err, const char *fmt, ...)
    __attribute__((format(printf, 2, 3)));

/* Sets err's hint line. Returns err->code. */
int moai_err_hint(struct moai_err *err, const char *fmt, ...) __attribute__((format(printf, 2, 3)));

/* The process exit status for a code: 0, 1, 2, 3 or 130. */
int moai_err_exit_status(int code);

/* Makes text one line for a message, in place: a control character (a newline of the input
 * that a parser quotes, say) becomes '?'. Returns text. */
char *moai_oneline(char *text);

/* Reports file and line and aborts. For invariants; plain assert() only in hot loops. */
MOAI_NORETURN void moai_assert_fail(const char *expr, const char *file, int line);

#define MOAI_ASSERT(cond)                                                                          \
    do {                                                                                           \
        if (!(cond))                                                                               \
            moai_assert_fail(#cond, __FILE__, __LINE__);                                           \
    } while (0)

#ifdef __cplusplus
}
#endif

#endif
