// spm.cc - the C interface over sentencepiece::SentencePieceProcessor (see spm.h).
#include "err.h"
#include "data/spm.h"

#include <sentencepiece_processor.h>

#include <cstdlib>
#include <cstring>
#include <new>
#include <string>
#include <vector>

struct spm {
    sentencepiece::SentencePieceProcessor proc;
    // Bytes of input text each piece stands for: "▁" counts as the one space it replaces,
    // a byte piece as one byte, control pieces as none. Unknown pieces get a large negative
    // length so that the total check in spm_encode_split fails and the exact path runs.
    std::vector<int64_t> surface_len;
    // Byte pieces of UTF-8 continuation bytes: SentencePiece gives them the offset of their
    // character's first byte.
    std::vector<bool> continuation;
};

static void fill_surface_lengths(struct spm *sp)
{
    static const std::string space_mark = "\xe2\x96\x81"; // U+2581
    int n = sp->proc.GetPieceSize();
    sp->surface_len.assign(static_cast<size_t>(n), 0);
    sp->continuation.assign(static_cast<size_t>(n), false);
    for (int id = 0; id < n; id++) {
        int64_t len;
        if (sp->proc.IsUnknown(id)) {
            len = -(int64_t{1} << 40);
        } else if (sp->proc.IsControl(id)) {
            len = 0;
        } else if (sp->proc.IsByte(id)) {
            len = 1;
            // byte pieces are named "<0xNN>"
            unsigned long byte = std::strtoul(sp->proc.IdToPiece(id).c_str() + 3, nullptr, 16);
            sp->continuation[static_cast<size_t>(id)] = (byte & 0xC0) == 0x80;
        } else {
            const std::string &piece = sp->proc.IdToPiece(id);
            len = static_cast<int64_t>(piece.size());
            for (size_t at = piece.find(space_mark); at != std::string::npos;
                 at = piece.find(space_mark, at + space_mark.size()))
                len -= static_cast<int64_t>(space_mark.size()) - 1;
        }
        sp->surface_len[static_cast<size_t>(id)] = len;
    }
}

extern "C" struct spm *spm_load(const char *path, struct moai_err *err)
{
    struct spm *sp = new (std::nothrow) spm();
    if (!sp) {
        moai_err_set(err, MOAI_ENOMEM, "cannot load tokenizer '%s': out of memory", path);
        return nullptr;
    }
    sentencepiece::util::Status st = sp->proc.Load(path);
    if (!st.ok()) {
        moai_err_set(err, MOAI_EIO, "cannot load tokenizer '%s': %s", path, st.ToString().c_str());
        delete sp;
        return nullptr;
    }
    try {
        fill_surface_lengths(sp);
    } catch (const std::bad_alloc &) {
        moai_err_set(err, MOAI_ENOMEM, "cannot load tokenizer '%s': out of memory", path);
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
        sentencepiece::util::Status st = sp->proc.Encode(std::string_view(text, len), out);
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

extern "C" int spm_encode_offsets(const struct spm *sp, const char *text, size_t len, int32_t *ids,
                                  uint32_t *begins, size_t cap, size_t *n, struct moai_err *err)
{
    sentencepiece::ImmutableSentencePieceText spt;
    try {
        sentencepiece::util::Status st =
            sp->proc.Encode(std::string_view(text, len), spt.mutable_proto());
        if (!st.ok())
            return moai_err_set(err, MOAI_EIO, "cannot encode text: %s", st.ToString().c_str());
        size_t count = spt.pieces_size();
        for (size_t i = 0; i < count && i < cap; i++) {
            auto piece = spt.pieces(static_cast<int>(i));
            ids[i] = static_cast<int32_t>(piece.id());
            begins[i] = piece.begin();
        }
        *n = count;
    } catch (const std::bad_alloc &) {
        return moai_err_set(err, MOAI_ENOMEM, "cannot encode text: out of memory");
    }
    return 0;
}

extern "C" int spm_encode_split(const struct spm *sp, const char *text, size_t len, size_t boundary,
                                int32_t *ids, size_t cap, size_t *n, size_t *n_before,
                                struct moai_err *err)
{
    std::vector<int> v;
    int rc = encode_vec(sp, text, len, &v, err);
    if (rc < 0)
        return rc;
    // Piece k starts at (sum of the surface lengths before it) - 1: the first piece carries
    // the dummy-prefix space, which is not in the text. The offsets hold when the lengths
    // add up to len + 1; otherwise (unknown pieces, a literal U+2581 in the text, a model
    // without the dummy prefix) the exact offsets come from SentencePiece itself.
    int64_t pos = -1, start = 0;
    size_t before = 0;
    for (size_t i = 0; i < v.size(); i++) {
        if (!sp->continuation[static_cast<size_t>(v[i])])
            start = pos < 0 ? 0 : pos;
        if (start < static_cast<int64_t>(boundary))
            before = i + 1;
        pos += sp->surface_len[static_cast<size_t>(v[i])];
        if (i < cap)
            ids[i] = v[i];
    }
    *n = v.size();
    if (v.empty() || pos == static_cast<int64_t>(len)) {
        *n_before = v.empty() ? 0 : before;
        return 0;
    }
    std::vector<int32_t> exact_ids(v.size());
    std::vector<uint32_t> begins(v.size());
    size_t count;
    rc = spm_encode_offsets(sp, text, len, exact_ids.data(), begins.data(), v.size(), &count, err);
    if (rc < 0)
        return rc;
    before = 0;
    for (size_t i = 0; i < count && i < v.size(); i++)
        if (begins[i] < boundary)
            before = i + 1;
    *n_before = before;
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

extern "C" const char *spm_piece(const struct spm *sp, int32_t id)
{
    if (id < 0 || id >= sp->proc.GetPieceSize())
        return NULL;
    return sp->proc.IdToPiece(id).c_str();
}

extern "C" int32_t spm_piece_id(const struct spm *sp, const char *piece)
{
    return sp->proc.PieceToId(piece);
}
