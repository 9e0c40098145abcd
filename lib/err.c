/* err.c - error messages and codes for library code (see err.h). */
#include "err.h"

#include <string.h>

int moai_err_vset(struct moai_err *err, int code, const char *fmt, va_list ap)
{
    if (!err)
        return code;
    err->code = code;
    err->hint[0] = '\0';
    vsnprintf(err->msg, sizeof(err->msg), fmt, ap);
    return code;
}

int moai_err_set(struct moai_err *err, int code, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    moai_err_vset(err, code, fmt, ap);
    va_end(ap);
    return code;
}

int moai_err_prefix(struct moai_err *err, const char *fmt, ...)
{
    char prefix[512];
    size_t plen, mlen, cap = sizeof(err->msg);
    va_list ap;

    va_start(ap, fmt);
    vsnprintf(prefix, sizeof(prefix), fmt, ap);
    va_end(ap);
    plen = strlen(prefix) + 2;
    mlen = strnlen(err->msg, cap - 1);
    if (plen + mlen >= cap)
        mlen = cap - 1 - plen;
    memmove(err->msg + plen, err->msg, mlen);
    memcpy(err->msg, prefix, plen - 2);
    memcpy(err->msg + plen - 2, ": ", 2);
    err->msg[plen + mlen] = '\0';
    return err->code;
}

int moai_err_hint(struct moai_err *err, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(err->hint, sizeof(err->hint), fmt, ap);
    va_end(ap);
    return err->code;
}

int moai_err_exit_status(int code)
{
    switch (code) {
    case MOAI_OK:
        return 0;
    case MOAI_EUSAGE:
    case MOAI_ENOTYET:
        return 2;
    case MOAI_EOOM:
        return 3;
    case MOAI_EINTR:
        return 130;
    default:
        return 1;
    }
}

void moai_assert_fail(const char *expr, const char *file, int line)
{
    fprintf(stderr, "moai-finetune: %s:%d: assertion failed: %s\n", file, line, expr);
    abort();
}

char *moai_oneline(char *text)
{
    for (unsigned char *p = (unsigned char *) text; *p; p++)
        if (*p < 0x20 || *p == 0x7f)
            *p = '?';
    return text;
}
