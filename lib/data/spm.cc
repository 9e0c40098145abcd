// spm.cc - the C interface over sentencepiece::SentencePieceProcessor (see spm.h).
// err.h is a C header: give it C linkage and C++'s spelling of _Noreturn.
#define _Noreturn [[noreturn]]
extern "C" {
#include "err.h"
}
#undef _Noreturn
#include "data/spm.h"

#include <sentencepiece_processor.h>

#include <cstdlib>
#include <cstring>
#include <new>
#include <string>
#include <vector>

struct spm {
    sentencepiece::SentencePieceProcessor proc;
};

extern "C" struct spm *spm_load(const char *path, struct moai_err *err)
{
    struct spm *sp = new (std::nothrow) spm();
    if (!sp) {
        moai_err_set(err, MOAI_ENOMEM, "cannot load tokenizer '%s': out of memory", path);
        return nullptr;
    }
    sentencepiece::util::Status st = sp->proc.Load(path);
    if (!st.ok()) {
        moai_err_set(err, MOAI_EIO, "cannot load tokenizer '%s': %s", path,
                     st.ToString().c_str());
        delete sp;
        return nullptr;
    }
    return sp;
}

extern "C" void spm_free(struct spm *sp)
{
    delete sp;
}

static int encode_vec(const struct spm *sp, const char *text, size_t len, std::vector<int> *out,
                      struct moai_err *err)
{
    try {
        sentencepiece::util::Status st =
            sp->proc.Encode(std::string_view(text, len), out);
        if (!st.ok())
            return moai_err_set(err, MOAI_EIO, "cannot encode text: %s", st.ToString().c_str());
    } catch (const std::bad_alloc &) {
        return moai_err_set(err, MOAI_ENOMEM, "cannot encode text: out of memory");
    }
    return 0;
}

extern "C" int spm_encode(const struct spm *sp, const char *text, size_t len, int32_t **ids,
                          size_t *n, struct moai_err *err)
{
    std::vector<int> v;
    *ids = nullptr;
    *n = 0;
    int rc = encode_vec(sp, text, len, &v, err);
    if (rc < 0)
        return rc;
    int32_t *p = static_cast<int32_t *>(malloc(sizeof(int32_t) * (v.size() ? v.size() : 1)));
    if (!p)
        return moai_err_set(err, MOAI_ENOMEM, "cannot encode text: out of memory");
    for (size_t i = 0; i < v.size(); i++)
        p[i] = v[i];
    *ids = p;
    *n = v.size();
    return 0;
}

extern "C" int spm_encode_into(const struct spm *sp, const char *text, size_t len, int32_t *ids,
                               size_t cap, size_t *n, struct moai_err *err)
{
    std::vector<int> v;
    int rc = encode_vec(sp, text, len, &v, err);
    if (rc < 0)
        return rc;
    for (size_t i = 0; i < v.size() && i < cap; i++)
        ids[i] = v[i];
    *n = v.size();
    return 0;
}

extern "C" int spm_encode_split(const struct spm *sp, const char *text, size_t len,
                                size_t boundary, int32_t *ids, size_t cap, size_t *n,
                                size_t *n_before, struct moai_err *err)
{
    sentencepiece::ImmutableSentencePieceText spt;
    try {
        sentencepiece::util::Status st =
            sp->proc.Encode(std::string_view(text, len), spt.mutable_proto());
        if (!st.ok())
            return moai_err_set(err, MOAI_EIO, "cannot encode text: %s", st.ToString().c_str());
        size_t count = spt.pieces_size(), before = 0;
        for (size_t i = 0; i < count; i++) {
            auto piece = spt.pieces(static_cast<int>(i));
            if (i < cap)
                ids[i] = static_cast<int32_t>(piece.id());
            if (piece.begin() < boundary)
                before = i + 1;
        }
        *n = count;
        *n_before = before;
    } catch (const std::bad_alloc &) {
        return moai_err_set(err, MOAI_ENOMEM, "cannot encode text: out of memory");
    }
    return 0;
}

extern "C" int spm_decode(const struct spm *sp, const int32_t *ids, size_t n, char **text,
                          struct moai_err *err)
{
    *text = nullptr;
    std::vector<int> v(ids, ids + n);
    int vocab = sp->proc.GetPieceSize();
    for (size_t i = 0; i < n; i++)
        if (ids[i] < 0 || ids[i] >= vocab)
            return moai_err_set(err, MOAI_EUSAGE,
                                "cannot decode: id %ld at position %zu is outside [0, %d)",
                                (long) ids[i], i, vocab);
    std::string s;
    try {
        sentencepiece::util::Status st = sp->proc.Decode(v, &s);
        if (!st.ok())
            return moai_err_set(err, MOAI_EIO, "cannot decode: %s", st.ToString().c_str());
    } catch (const std::bad_alloc &) {
        return moai_err_set(err, MOAI_ENOMEM, "cannot decode: out of memory");
    }
    char *p = static_cast<char *>(malloc(s.size() + 1));
    if (!p)
        return moai_err_set(err, MOAI_ENOMEM, "cannot decode: out of memory");
    memcpy(p, s.data(), s.size());
    p[s.size()] = '\0';
    *text = p;
    return 0;
}

extern "C" int32_t spm_bos_id(const struct spm *sp)
{
    return sp->proc.bos_id();
}

extern "C" int32_t spm_eos_id(const struct spm *sp)
{
    return sp->proc.eos_id();
}

extern "C" int32_t spm_pad_id(const struct spm *sp)
{
    return sp->proc.pad_id();
}

extern "C" int32_t spm_unk_id(const struct spm *sp)
{
    return sp->proc.unk_id();
}

extern "C" int32_t spm_vocab_size(const struct spm *sp)
{
    return sp->proc.GetPieceSize();
}

extern "C" int32_t spm_piece_id(const struct spm *sp, const char *piece)
{
    return sp->proc.PieceToId(piece);
}
