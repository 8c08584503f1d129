/* kvq_data.h — readers (and writers) for the data files kvq's examples use.

   Three formats, all little-endian, all validated before use:
     - llama2.c legacy fp32 checkpoints ("stories260K.bin"),
     - llama2.c tokenizers ("tok512.bin") with SentencePiece-style BPE encode/decode,
     - KVDUMP01 dumps of real attention inputs ("*_gen.kvd"),
   plus a plain-text token list ("*.tokens": decimal ids, '#' comments).

   Every loader checks every count against a sane bound, does its size arithmetic
   with overflow checks, compares the file size with what the header implies
   (truncated and oversized files are both errors), rejects NaN/Inf payloads, and
   reports failure as a KVQD_ERR_* code plus a message. Bad bytes never crash.
   Loaders zero their output first, so freeing it after a failure is safe.

   stb-style: include anywhere for the declarations; in exactly one .c file

       #define KVQ_DATA_IMPLEMENTATION
       #include "kvq_data.h"

   C99, libc + libm only. */
#ifndef KVQ_DATA_H_INCLUDED
#define KVQ_DATA_H_INCLUDED

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

enum {
    KVQD_OK = 0,
    KVQD_ERR_IO = -1,        /* cannot open / read / write */
    KVQD_ERR_TRUNCATED = -2, /* the file ends before the header says it should */
    KVQD_ERR_TRAILING = -3,  /* bytes after the end the header implies */
    KVQD_ERR_FORMAT = -4,    /* wrong magic/version, inconsistent fields, NaN/Inf payload */
    KVQD_ERR_RANGE = -5,     /* absurd dimensions, overflow, id out of range */
    KVQD_ERR_NOMEM = -6,     /* allocation failed */
    KVQD_ERR_ARG = -7        /* bad argument from the caller (NULL, buffer too small) */
};
const char *kvqd_code_string(int code);

/* ---- llama2.c legacy checkpoint ------------------------------------------ */

typedef struct kvqd_llama_config {
    int dim, hidden_dim, n_layers, n_heads, n_kv_heads, vocab_size, seq_len;
    /* derived */
    int head_dim, kv_dim;
    int shared_classifier; /* 1 when the header's vocab_size was positive */
} kvqd_llama_config;

typedef struct kvqd_llama_weights {
    const float *token_embedding; /* [vocab][dim] */
    const float *rms_att;         /* [L][dim] */
    const float *wq;              /* [L][dim][dim] */
    const float *wk;              /* [L][kv_dim][dim] */
    const float *wv;              /* [L][kv_dim][dim] */
    const float *wo;              /* [L][dim][dim] */
    const float *rms_ffn;         /* [L][dim] */
    const float *w1;              /* [L][hidden][dim] */
    const float *w2;              /* [L][dim][hidden] */
    const float *w3;              /* [L][hidden][dim] */
    const float *rms_final;       /* [dim] */
    const float *wcls;            /* [vocab][dim]; == token_embedding when shared */
} kvqd_llama_weights;

typedef struct kvqd_checkpoint {
    kvqd_llama_config cfg;
    kvqd_llama_weights w;
    float *data;      /* every float after the 28-byte header */
    size_t n_floats;
} kvqd_checkpoint;

/* Validates the 7 header ints (vocab_size may be negative) and fills cfg and the
   number of floats that must follow the header. */
int  kvqd_checkpoint_check_header(const int32_t hdr[7], kvqd_llama_config *cfg,
                                  size_t *n_floats, char *err, size_t err_size);
int  kvqd_checkpoint_load(kvqd_checkpoint *ck, const char *path, char *err, size_t err_size);
void kvqd_checkpoint_free(kvqd_checkpoint *ck);
/* Writes a checkpoint: header from cfg (vocab negated when !shared_classifier),
   then n_floats floats, which must be exactly what the header implies. */
int  kvqd_checkpoint_write(const char *path, const kvqd_llama_config *cfg,
                           const float *data, size_t n_floats, char *err, size_t err_size);

/* ---- tokenizer (llama2.c tokenizer.bin) ---------------------------------- */

typedef struct kvqd_tok_entry { const char *str; int len; int id; } kvqd_tok_entry;

typedef struct kvqd_tokenizer {
    int vocab_size;
    int max_token_length;
    float *scores;         /* [vocab] merge priority */
    int *lens;             /* [vocab] byte length of each piece */
    char **pieces;         /* [vocab] NUL-terminated (may also contain NUL bytes; use lens) */
    kvqd_tok_entry *sorted;/* pieces sorted by bytes, for lookup */
    int byte_ids[256];     /* id of the "<0xXX>" piece, -1 when the vocab lacks it */
    int unk_id, bos_id, eos_id; /* 0, 1, 2 (llama2.c convention) */
    char *blob;
} kvqd_tokenizer;

/* vocab_size > 0: exactly that many entries must fill the file;
   vocab_size <= 0: read entries until the end of the data. */
int  kvqd_tokenizer_parse(kvqd_tokenizer *t, const void *bytes, size_t n_bytes, int vocab_size,
                          char *err, size_t err_size);
int  kvqd_tokenizer_load(kvqd_tokenizer *t, const char *path, int vocab_size,
                         char *err, size_t err_size);
void kvqd_tokenizer_free(kvqd_tokenizer *t);
/* id of the piece with exactly these bytes, or -1 */
int  kvqd_tokenizer_lookup(const kvqd_tokenizer *t, const char *s, size_t len);
/* SentencePiece-style BPE: prepend a space (when text is non-empty), one piece per
   UTF-8 code point (byte fallback "<0xXX>", else unk), then merge the adjacent
   pair whose concatenation is a piece with the highest score until none is left.
   At most strlen(text) + 3 ids are produced. */
int  kvqd_tokenizer_encode(const kvqd_tokenizer *t, const char *text, int add_bos, int add_eos,
                           int *ids, int max_ids, int *n_ids, char *err, size_t err_size);
/* Bytes of token `tok` following `prev` into out (NUL-terminated): the leading
   space after BOS is dropped and "<0xXX>" pieces become the raw byte.
   Returns the number of bytes, or -1 for an invalid id / too small a buffer. */
int  kvqd_tokenizer_decode(const kvqd_tokenizer *t, int prev, int tok, char *out, size_t out_size);

/* ---- KVDUMP01 ------------------------------------------------------------ */

enum { KVQD_KPOST = 1, KVQD_KPRE = 2, KVQD_V = 4, KVQD_QPOST = 8, KVQD_QPRE = 16,
       KVQD_ALL_TENSORS = 31 };
#define KVQD_DUMP_HEADER_BYTES 88

typedef struct kvqd_dump {
    int version;      /* 1 */
    int header_bytes; /* 88 */
    int n_layers, n_heads, n_kv_heads, head_dim, n_tokens, window, tensor_mask;
    int dim, vocab_size, seq_len; /* informational; vocab_size > 0 bounds the token ids */
    int rope_style;   /* 0 = interleaved pairs */
    float rope_theta;
    int32_t *tokens;  /* [n_tokens] */
    float *data;      /* per layer, each present tensor in bit order */
    size_t layer_floats, n_data_floats;
} kvqd_dump;

/* Allocates a zero-filled dump of this shape (for writers and tests). */
int  kvqd_dump_init(kvqd_dump *d, int n_layers, int n_heads, int n_kv_heads, int head_dim,
                    int n_tokens, int window, int tensor_mask, char *err, size_t err_size);
/* Validates the header fields of d (and fills layer_floats / n_data_floats). */
int  kvqd_dump_check(kvqd_dump *d, char *err, size_t err_size);
int  kvqd_dump_load(kvqd_dump *d, const char *path, char *err, size_t err_size);
int  kvqd_dump_write(const kvqd_dump *d, const char *path, char *err, size_t err_size);
void kvqd_dump_free(kvqd_dump *d);
/* Floats in one tensor of one layer, or 0 for an unknown bit. */
size_t kvqd_dump_tensor_floats(const kvqd_dump *d, int tensor_bit);
/* [heads][n_tokens][head_dim] of one tensor, NULL when absent or out of range. */
float *kvqd_dump_tensor(const kvqd_dump *d, int layer, int tensor_bit);

/* ---- token lists --------------------------------------------------------- */

/* Text: decimal ids separated by white space; '#' starts a comment to end of line.
   A file that starts with "KVDUMP01" is read as a dump and its token ids are used.
   Ids must lie in [0, vocab_limit) when vocab_limit > 0. *ids is malloc'ed. */
int  kvqd_tokens_load(const char *path, int vocab_limit, int **ids, int *n_ids,
                      char *err, size_t err_size);
int  kvqd_tokens_write(const char *path, const int *ids, int n_ids, const char *comment,
                       char *err, size_t err_size);

#ifdef __cplusplus
}
#endif
#endif /* KVQ_DATA_H_INCLUDED */

/* ========================================================================= */
#ifdef KVQ_DATA_IMPLEMENTATION
#ifndef KVQ_DATA_IMPLEMENTATION_DONE
#define KVQ_DATA_IMPLEMENTATION_DONE

#include <float.h>
#include <limits.h>
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* Bounds that no real model of this format exceeds; anything past them is
   treated as a corrupt header rather than an allocation request. */
#define KVQD_MAX_DIM        65536
#define KVQD_MAX_HIDDEN     (1 << 20)
#define KVQD_MAX_LAYERS     4096
#define KVQD_MAX_HEADS      4096
#define KVQD_MAX_VOCAB      (1 << 24)
#define KVQD_MAX_SEQ        (1 << 24)
#define KVQD_MAX_TOKEN_LEN  65536
#define KVQD_MAX_TOKENIZER_BYTES ((size_t)1 << 30)
#define KVQD_MAX_HEAD_DIM   65536
#define KVQD_MAX_DUMP_TOKENS (1 << 28)
#define KVQD_MAX_TOKENS_FILE ((size_t)1 << 30)

#if defined(__GNUC__) || defined(__clang__)
__attribute__((format(printf, 4, 5)))
#endif
static int kvqd__fail(char *err, size_t err_size, int code, const char *fmt, ...)
{
    if (err && err_size) {
        va_list ap;
        va_start(ap, fmt);
        vsnprintf(err, err_size, fmt, ap);
        va_end(ap);
    }
    return code;
}

const char *kvqd_code_string(int code)
{
    switch (code) {
    case KVQD_OK: return "ok";
    case KVQD_ERR_IO: return "i/o error";
    case KVQD_ERR_TRUNCATED: return "truncated file";
    case KVQD_ERR_TRAILING: return "trailing bytes";
    case KVQD_ERR_FORMAT: return "bad format";
    case KVQD_ERR_RANGE: return "value out of range";
    case KVQD_ERR_NOMEM: return "out of memory";
    case KVQD_ERR_ARG: return "bad argument";
    default: return "unknown error";
    }
}

/* ---- small helpers ---- */

static int kvqd__little_endian(void)
{
    const uint32_t one = 1;
    unsigned char b;
    memcpy(&b, &one, 1);
    return b == 1;
}

/* The formats are little-endian 32-bit words; swap them on a big-endian host. */
static void kvqd__fix_words(void *p, size_t n_words)
{
    unsigned char *b = (unsigned char *)p;
    size_t i;
    if (kvqd__little_endian()) return;
    for (i = 0; i < n_words; i++, b += 4) {
        unsigned char t0 = b[0], t1 = b[1];
        b[0] = b[3]; b[1] = b[2]; b[2] = t1; b[3] = t0;
    }
}

static int32_t kvqd__i32(const unsigned char *p)
{
    uint32_t u = (uint32_t)p[0] | ((uint32_t)p[1] << 8) | ((uint32_t)p[2] << 16) | ((uint32_t)p[3] << 24);
    int32_t v;
    memcpy(&v, &u, 4);
    return v;
}

static float kvqd__f32(const unsigned char *p)
{
    uint32_t u = (uint32_t)p[0] | ((uint32_t)p[1] << 8) | ((uint32_t)p[2] << 16) | ((uint32_t)p[3] << 24);
    float f;
    memcpy(&f, &u, 4);
    return f;
}

static void kvqd__put_i32(unsigned char *p, int32_t v)
{
    uint32_t u;
    memcpy(&u, &v, 4);
    p[0] = (unsigned char)u; p[1] = (unsigned char)(u >> 8);
    p[2] = (unsigned char)(u >> 16); p[3] = (unsigned char)(u >> 24);
}

static void kvqd__put_f32(unsigned char *p, float f)
{
    int32_t v;
    memcpy(&v, &f, 4);
    kvqd__put_i32(p, v);
}

/* a*b and a+b into *out; 0 on overflow past SIZE_MAX */
static int kvqd__mul(size_t a, size_t b, size_t *out)
{
    if (a != 0 && b > SIZE_MAX / a) return 0;
    *out = a * b;
    return 1;
}

static int kvqd__add(size_t a, size_t b, size_t *out)
{
    if (b > SIZE_MAX - a) return 0;
    *out = a + b;
    return 1;
}

static int kvqd__mul3_add(size_t *acc, size_t a, size_t b, size_t c)
{
    size_t t;
    return kvqd__mul(a, b, &t) && kvqd__mul(t, c, &t) && kvqd__add(*acc, t, acc);
}

static int kvqd__all_finite(const float *x, size_t n, size_t *bad)
{
    size_t i;
    for (i = 0; i < n; i++)
        if (!(fabsf(x[i]) <= FLT_MAX)) { *bad = i; return 0; }
    return 1;
}

/* Size of an open file, when the stream can tell; returns 0 when unknown. */
static int kvqd__file_size(FILE *f, size_t *size)
{
    long end;
    if (fseek(f, 0, SEEK_END) != 0) return 0;
    end = ftell(f);
    if (end < 0 || fseek(f, 0, SEEK_SET) != 0) { clearerr(f); fseek(f, 0, SEEK_SET); return 0; }
    *size = (size_t)end;
    return 1;
}

/* fread exactly n bytes; 0 when the stream ends first. */
static int kvqd__read(FILE *f, void *dst, size_t n)
{
    return fread(dst, 1, n, f) == n;
}

/* After the expected payload the stream must be at its end. */
static int kvqd__at_eof(FILE *f)
{
    return fgetc(f) == EOF && !ferror(f);
}

/* Reads a whole file (at most max_bytes) into a malloc'ed buffer. */
static int kvqd__read_all(const char *path, size_t max_bytes, unsigned char **out, size_t *n_out,
                          char *err, size_t err_size)
{
    FILE *f;
    unsigned char *buf;
    size_t cap = 4096, n = 0, known;
    *out = NULL; *n_out = 0;
    f = fopen(path, "rb");
    if (!f) return kvqd__fail(err, err_size, KVQD_ERR_IO, "%s: cannot open", path);
    if (kvqd__file_size(f, &known)) {
        if (known > max_bytes) {
            fclose(f);
            return kvqd__fail(err, err_size, KVQD_ERR_RANGE, "%s: %lu bytes is more than the %lu allowed",
                              path, (unsigned long)known, (unsigned long)max_bytes);
        }
        cap = known + 1; /* +1 so that end of file is seen without a realloc */
    }
    buf = (unsigned char *)malloc(cap);
    if (!buf) { fclose(f); return kvqd__fail(err, err_size, KVQD_ERR_NOMEM, "%s: out of memory", path); }
    for (;;) {
        size_t got;
        if (n == cap) {
            size_t ncap = cap > max_bytes / 2 ? max_bytes + 1 : cap * 2;
            unsigned char *nb;
            if (cap > max_bytes) {
                free(buf); fclose(f);
                return kvqd__fail(err, err_size, KVQD_ERR_RANGE, "%s: more than %lu bytes", path, (unsigned long)max_bytes);
            }
            nb = (unsigned char *)realloc(buf, ncap);
            if (!nb) { free(buf); fclose(f); return kvqd__fail(err, err_size, KVQD_ERR_NOMEM, "%s: out of memory", path); }
            buf = nb; cap = ncap;
        }
        got = fread(buf + n, 1, cap - n, f);
        n += got;
        if (got == 0) break;
    }
    if (ferror(f)) { free(buf); fclose(f); return kvqd__fail(err, err_size, KVQD_ERR_IO, "%s: read error", path); }
    fclose(f);
    if (n > max_bytes) { free(buf); return kvqd__fail(err, err_size, KVQD_ERR_RANGE, "%s: more than %lu bytes", path, (unsigned long)max_bytes); }
    *out = buf; *n_out = n;
    return KVQD_OK;
}

/* ---- checkpoint ---- */

int kvqd_checkpoint_check_header(const int32_t hdr[7], kvqd_llama_config *cfg, size_t *n_floats,
                                 char *err, size_t err_size)
{
    kvqd_llama_config c;
    size_t n = 0, L, d, hd, kvd, hid, voc, t;
    if (!hdr || !cfg || !n_floats) return kvqd__fail(err, err_size, KVQD_ERR_ARG, "NULL argument");
    memset(&c, 0, sizeof c);
    c.dim = hdr[0]; c.hidden_dim = hdr[1]; c.n_layers = hdr[2]; c.n_heads = hdr[3];
    c.n_kv_heads = hdr[4]; c.vocab_size = hdr[5]; c.seq_len = hdr[6];
    if (c.dim < 1 || c.dim > KVQD_MAX_DIM)
        return kvqd__fail(err, err_size, KVQD_ERR_RANGE, "dim %d outside 1..%d", c.dim, KVQD_MAX_DIM);
    if (c.hidden_dim < 1 || c.hidden_dim > KVQD_MAX_HIDDEN)
        return kvqd__fail(err, err_size, KVQD_ERR_RANGE, "hidden_dim %d outside 1..%d", c.hidden_dim, KVQD_MAX_HIDDEN);
    if (c.n_layers < 1 || c.n_layers > KVQD_MAX_LAYERS)
        return kvqd__fail(err, err_size, KVQD_ERR_RANGE, "n_layers %d outside 1..%d", c.n_layers, KVQD_MAX_LAYERS);
    if (c.n_heads < 1 || c.n_heads > c.dim || c.dim % c.n_heads != 0)
        return kvqd__fail(err, err_size, KVQD_ERR_FORMAT, "n_heads %d does not divide dim %d", c.n_heads, c.dim);
    if (c.n_kv_heads < 1 || c.n_kv_heads > c.n_heads || c.n_heads % c.n_kv_heads != 0)
        return kvqd__fail(err, err_size, KVQD_ERR_FORMAT, "n_kv_heads %d does not divide n_heads %d",
                          c.n_kv_heads, c.n_heads);
    c.head_dim = c.dim / c.n_heads;
    if (c.head_dim % 2 != 0)
        return kvqd__fail(err, err_size, KVQD_ERR_FORMAT, "head_dim %d is odd (RoPE rotates pairs)", c.head_dim);
    c.kv_dim = c.head_dim * c.n_kv_heads;
    /* a negative vocab_size flags a separate classifier; INT32_MIN has no negation */
    if (c.vocab_size == INT32_MIN || c.vocab_size == 0 ||
        (c.vocab_size < 0 ? -c.vocab_size : c.vocab_size) > KVQD_MAX_VOCAB)
        return kvqd__fail(err, err_size, KVQD_ERR_RANGE, "vocab_size %d outside 1..%d (or its negation)",
                          c.vocab_size, KVQD_MAX_VOCAB);
    c.shared_classifier = c.vocab_size > 0;
    if (c.vocab_size < 0) c.vocab_size = -c.vocab_size;
    if (c.seq_len < 1 || c.seq_len > KVQD_MAX_SEQ)
        return kvqd__fail(err, err_size, KVQD_ERR_RANGE, "seq_len %d outside 1..%d", c.seq_len, KVQD_MAX_SEQ);

    L = (size_t)c.n_layers; d = (size_t)c.dim; hd = (size_t)c.head_dim; kvd = (size_t)c.kv_dim;
    hid = (size_t)c.hidden_dim; voc = (size_t)c.vocab_size;
    if (!kvqd__mul3_add(&n, voc, d, 1) ||          /* token embedding */
        !kvqd__mul3_add(&n, L, d, 1) ||            /* rms_att */
        !kvqd__mul3_add(&n, L, d, d) ||            /* wq */
        !kvqd__mul3_add(&n, L, kvd, d) ||          /* wk */
        !kvqd__mul3_add(&n, L, kvd, d) ||          /* wv */
        !kvqd__mul3_add(&n, L, d, d) ||            /* wo */
        !kvqd__mul3_add(&n, L, d, 1) ||            /* rms_ffn */
        !kvqd__mul3_add(&n, L, hid, d) ||          /* w1 */
        !kvqd__mul3_add(&n, L, d, hid) ||          /* w2 */
        !kvqd__mul3_add(&n, L, hid, d) ||          /* w3 */
        !kvqd__mul3_add(&n, d, 1, 1) ||            /* rms_final */
        !kvqd__mul3_add(&n, (size_t)c.seq_len, hd, 1) || /* legacy RoPE tables */
        (!c.shared_classifier && !kvqd__mul3_add(&n, voc, d, 1)) ||
        !kvqd__mul(n, 4, &t) || !kvqd__add(t, 28, &t))
        return kvqd__fail(err, err_size, KVQD_ERR_RANGE, "dimensions overflow the address space");
    *cfg = c;
    *n_floats = n;
    return KVQD_OK;
}

static void kvqd__checkpoint_map(kvqd_checkpoint *ck)
{
    const kvqd_llama_config *c = &ck->cfg;
    size_t L = (size_t)c->n_layers, d = (size_t)c->dim, kvd = (size_t)c->kv_dim, hid = (size_t)c->hidden_dim;
    const float *p = ck->data;
    ck->w.token_embedding = p; p += (size_t)c->vocab_size * d;
    ck->w.rms_att = p; p += L * d;
    ck->w.wq = p; p += L * d * d;
    ck->w.wk = p; p += L * kvd * d;
    ck->w.wv = p; p += L * kvd * d;
    ck->w.wo = p; p += L * d * d;
    ck->w.rms_ffn = p; p += L * d;
    ck->w.w1 = p; p += L * hid * d;
    ck->w.w2 = p; p += L * d * hid;
    ck->w.w3 = p; p += L * hid * d;
    ck->w.rms_final = p; p += d;
    p += (size_t)c->seq_len * (size_t)c->head_dim; /* legacy freq_cis tables: unused */
    ck->w.wcls = c->shared_classifier ? ck->w.token_embedding : p;
}

int kvqd_checkpoint_load(kvqd_checkpoint *ck, const char *path, char *err, size_t err_size)
{
    FILE *f;
    unsigned char hb[28] = { 0 };
    int32_t hdr[7];
    size_t n_floats, fsize, i, bad;
    int rc;
    if (ck) memset(ck, 0, sizeof *ck);
    if (!ck || !path) return kvqd__fail(err, err_size, KVQD_ERR_ARG, "NULL argument");
    f = fopen(path, "rb");
    if (!f) return kvqd__fail(err, err_size, KVQD_ERR_IO, "%s: cannot open", path);
    if (!kvqd__read(f, hb, sizeof hb)) {
        fclose(f);
        return kvqd__fail(err, err_size, KVQD_ERR_TRUNCATED, "%s: shorter than the 28-byte header", path);
    }
    for (i = 0; i < 7; i++) hdr[i] = kvqd__i32(hb + 4 * i);
    rc = kvqd_checkpoint_check_header(hdr, &ck->cfg, &n_floats, err, err_size);
    if (rc != KVQD_OK) {
        char tmp[200];
        if (err && err_size) { snprintf(tmp, sizeof tmp, "%s", err); snprintf(err, err_size, "%s: %s", path, tmp); }
        fclose(f);
        return rc;
    }
    if (kvqd__file_size(f, &fsize)) {
        size_t want = 28 + 4 * n_floats; /* cannot overflow: checked in check_header */
        if (fsize != want) {
            fclose(f);
            return kvqd__fail(err, err_size, fsize < want ? KVQD_ERR_TRUNCATED : KVQD_ERR_TRAILING,
                              "%s: file has %lu bytes, the header implies %lu", path,
                              (unsigned long)fsize, (unsigned long)want);
        }
        if (fseek(f, 28, SEEK_SET) != 0) { fclose(f); return kvqd__fail(err, err_size, KVQD_ERR_IO, "%s: seek failed", path); }
    }
    ck->data = (float *)malloc(n_floats * sizeof(float));
    if (!ck->data) { fclose(f); return kvqd__fail(err, err_size, KVQD_ERR_NOMEM, "%s: cannot allocate %lu floats", path, (unsigned long)n_floats); }
    if (!kvqd__read(f, ck->data, n_floats * sizeof(float))) {
        fclose(f); kvqd_checkpoint_free(ck);
        return kvqd__fail(err, err_size, KVQD_ERR_TRUNCATED, "%s: truncated weights", path);
    }
    if (!kvqd__at_eof(f)) {
        fclose(f); kvqd_checkpoint_free(ck);
        return kvqd__fail(err, err_size, KVQD_ERR_TRAILING, "%s: bytes after the weights", path);
    }
    fclose(f);
    kvqd__fix_words(ck->data, n_floats);
    if (!kvqd__all_finite(ck->data, n_floats, &bad)) {
        kvqd_checkpoint_free(ck);
        return kvqd__fail(err, err_size, KVQD_ERR_FORMAT, "%s: weight %lu is NaN or infinite", path, (unsigned long)bad);
    }
    ck->n_floats = n_floats;
    kvqd__checkpoint_map(ck);
    return KVQD_OK;
}

void kvqd_checkpoint_free(kvqd_checkpoint *ck)
{
    if (!ck) return;
    free(ck->data);
    memset(ck, 0, sizeof *ck);
}

int kvqd_checkpoint_write(const char *path, const kvqd_llama_config *cfg, const float *data,
                          size_t n_floats, char *err, size_t err_size)
{
    int32_t hdr[7];
    unsigned char hb[28];
    kvqd_llama_config chk;
    size_t want, i;
    FILE *f;
    int rc, ok;
    if (!path || !cfg || (!data && n_floats)) return kvqd__fail(err, err_size, KVQD_ERR_ARG, "NULL argument");
    hdr[0] = cfg->dim; hdr[1] = cfg->hidden_dim; hdr[2] = cfg->n_layers; hdr[3] = cfg->n_heads;
    hdr[4] = cfg->n_kv_heads; hdr[5] = cfg->shared_classifier ? cfg->vocab_size : -cfg->vocab_size;
    hdr[6] = cfg->seq_len;
    rc = kvqd_checkpoint_check_header(hdr, &chk, &want, err, err_size);
    if (rc != KVQD_OK) return rc;
    if (want != n_floats)
        return kvqd__fail(err, err_size, KVQD_ERR_ARG, "%lu floats given, the header implies %lu",
                          (unsigned long)n_floats, (unsigned long)want);
    for (i = 0; i < 7; i++) kvqd__put_i32(hb + 4 * i, hdr[i]);
    f = fopen(path, "wb");
    if (!f) return kvqd__fail(err, err_size, KVQD_ERR_IO, "%s: cannot create", path);
    ok = fwrite(hb, 1, sizeof hb, f) == sizeof hb;
    for (i = 0; ok && i < n_floats; i++) {
        unsigned char b[4];
        kvqd__put_f32(b, data[i]);
        ok = fwrite(b, 1, 4, f) == 4;
    }
    if (fclose(f) != 0) ok = 0;
    return ok ? KVQD_OK : kvqd__fail(err, err_size, KVQD_ERR_IO, "%s: write failed", path);
}

/* ---- tokenizer ---- */

static int kvqd__entry_cmp(const void *a, const void *b)
{
    const kvqd_tok_entry *x = (const kvqd_tok_entry *)a, *y = (const kvqd_tok_entry *)b;
    int m = x->len < y->len ? x->len : y->len;
    int r = memcmp(x->str, y->str, (size_t)m);
    if (r != 0) return r;
    if (x->len != y->len) return x->len < y->len ? -1 : 1;
    return x->id < y->id ? -1 : (x->id > y->id);
}

void kvqd_tokenizer_free(kvqd_tokenizer *t)
{
    if (!t) return;
    free(t->scores); free(t->lens); free(t->pieces); free(t->sorted); free(t->blob);
    memset(t, 0, sizeof *t);
}

int kvqd_tokenizer_parse(kvqd_tokenizer *t, const void *bytes, size_t n_bytes, int vocab_size,
                         char *err, size_t err_size)
{
    const unsigned char *b = (const unsigned char *)bytes;
    size_t pos, blob_bytes = 0;
    int n = 0, i, maxlen;
    char *w;
    if (t) memset(t, 0, sizeof *t);
    if (!t || (!b && n_bytes)) return kvqd__fail(err, err_size, KVQD_ERR_ARG, "NULL argument");
    if (vocab_size > KVQD_MAX_VOCAB)
        return kvqd__fail(err, err_size, KVQD_ERR_RANGE, "vocab_size %d too large", vocab_size);
    if (n_bytes < 4) return kvqd__fail(err, err_size, KVQD_ERR_TRUNCATED, "tokenizer shorter than its 4-byte header");
    maxlen = kvqd__i32(b);
    if (maxlen < 1 || maxlen > KVQD_MAX_TOKEN_LEN)
        return kvqd__fail(err, err_size, KVQD_ERR_RANGE, "max_token_length %d outside 1..%d", maxlen, KVQD_MAX_TOKEN_LEN);
    /* pass 1: walk the records, validate, count */
    pos = 4;
    for (;;) {
        int32_t len;
        float score;
        if (vocab_size > 0 && n == vocab_size) break;
        if (vocab_size <= 0 && pos == n_bytes) break;
        if (n_bytes - pos < 8)
            return kvqd__fail(err, err_size, KVQD_ERR_TRUNCATED, "tokenizer ends inside the record of token %d", n);
        score = kvqd__f32(b + pos);
        len = kvqd__i32(b + pos + 4);
        if (!(fabsf(score) <= FLT_MAX))
            return kvqd__fail(err, err_size, KVQD_ERR_FORMAT, "token %d has a NaN/infinite score", n);
        if (len < 1 || len > maxlen)
            return kvqd__fail(err, err_size, KVQD_ERR_FORMAT, "token %d has length %d outside 1..%d", n, (int)len, maxlen);
        pos += 8;
        if (n_bytes - pos < (size_t)len)
            return kvqd__fail(err, err_size, KVQD_ERR_TRUNCATED, "tokenizer ends inside the bytes of token %d", n);
        pos += (size_t)len;
        blob_bytes += (size_t)len + 1;
        n++;
        if (n > KVQD_MAX_VOCAB) return kvqd__fail(err, err_size, KVQD_ERR_RANGE, "more than %d tokens", KVQD_MAX_VOCAB);
    }
    if (pos != n_bytes)
        return kvqd__fail(err, err_size, KVQD_ERR_TRAILING, "%lu bytes after the %d tokens",
                          (unsigned long)(n_bytes - pos), n);
    if (n < 3) return kvqd__fail(err, err_size, KVQD_ERR_FORMAT, "only %d tokens (need unk, bos, eos)", n);
    t->vocab_size = n;
    t->max_token_length = maxlen;
    t->scores = (float *)malloc((size_t)n * sizeof(float));
    t->lens = (int *)malloc((size_t)n * sizeof(int));
    t->pieces = (char **)malloc((size_t)n * sizeof(char *));
    t->sorted = (kvqd_tok_entry *)malloc((size_t)n * sizeof(kvqd_tok_entry));
    t->blob = (char *)malloc(blob_bytes);
    if (!t->scores || !t->lens || !t->pieces || !t->sorted || !t->blob) {
        kvqd_tokenizer_free(t);
        return kvqd__fail(err, err_size, KVQD_ERR_NOMEM, "out of memory");
    }
    /* pass 2: copy */
    pos = 4; w = t->blob;
    for (i = 0; i < n; i++) {
        int len = kvqd__i32(b + pos + 4);
        t->scores[i] = kvqd__f32(b + pos);
        t->lens[i] = len;
        pos += 8;
        memcpy(w, b + pos, (size_t)len);
        w[len] = '\0';
        t->pieces[i] = w;
        t->sorted[i].str = w; t->sorted[i].len = len; t->sorted[i].id = i;
        w += len + 1;
        pos += (size_t)len;
    }
    qsort(t->sorted, (size_t)n, sizeof *t->sorted, kvqd__entry_cmp);
    t->unk_id = 0; t->bos_id = 1; t->eos_id = 2;
    for (i = 0; i < 256; i++) {
        char name[8];
        snprintf(name, sizeof name, "<0x%02X>", i);
        t->byte_ids[i] = kvqd_tokenizer_lookup(t, name, 6);
    }
    return KVQD_OK;
}

int kvqd_tokenizer_load(kvqd_tokenizer *t, const char *path, int vocab_size, char *err, size_t err_size)
{
    unsigned char *buf;
    size_t n;
    int rc;
    if (t) memset(t, 0, sizeof *t);
    if (!t || !path) return kvqd__fail(err, err_size, KVQD_ERR_ARG, "NULL argument");
    rc = kvqd__read_all(path, KVQD_MAX_TOKENIZER_BYTES, &buf, &n, err, err_size);
    if (rc != KVQD_OK) return rc;
    rc = kvqd_tokenizer_parse(t, buf, n, vocab_size, err, err_size);
    free(buf);
    if (rc != KVQD_OK && err && err_size) {
        char tmp[200];
        snprintf(tmp, sizeof tmp, "%s", err);
        snprintf(err, err_size, "%s: %s", path, tmp);
    }
    return rc;
}

int kvqd_tokenizer_lookup(const kvqd_tokenizer *t, const char *s, size_t len)
{
    size_t lo = 0, hi;
    if (!t || !t->sorted || (!s && len) || len > (size_t)t->max_token_length) return -1;
    hi = (size_t)t->vocab_size;
    while (lo < hi) {
        size_t mid = lo + (hi - lo) / 2;
        const kvqd_tok_entry *e = &t->sorted[mid];
        size_t m = (size_t)e->len < len ? (size_t)e->len : len;
        int r = m ? memcmp(e->str, s, m) : 0;
        if (r == 0) r = (size_t)e->len < len ? -1 : ((size_t)e->len > len);
        if (r == 0) {
            /* several equal pieces: return the lowest id, like a first-match scan */
            while (mid > 0 && t->sorted[mid - 1].len == e->len &&
                   memcmp(t->sorted[mid - 1].str, s, len) == 0) mid--;
            return t->sorted[mid].id;
        }
        if (r < 0) lo = mid + 1; else hi = mid;
    }
    return -1;
}

int kvqd_tokenizer_encode(const kvqd_tokenizer *t, const char *text, int add_bos, int add_eos,
                          int *ids, int max_ids, int *n_ids, char *err, size_t err_size)
{
    size_t tl, i;
    int n = 0, cap_needed;
    char *s, *pair;
    if (!t || !t->pieces || !text || !ids || !n_ids) return kvqd__fail(err, err_size, KVQD_ERR_ARG, "NULL argument");
    *n_ids = 0;
    tl = strlen(text);
    if (tl > (size_t)INT_MAX - 3) return kvqd__fail(err, err_size, KVQD_ERR_RANGE, "text too long");
    cap_needed = (add_bos ? 1 : 0) + (tl ? (int)tl + 1 : 0) + (add_eos ? 1 : 0);
    if (max_ids < cap_needed)
        return kvqd__fail(err, err_size, KVQD_ERR_ARG, "id buffer of %d may be too small (need %d)", max_ids, cap_needed);
    if (add_bos) ids[n++] = t->bos_id;
    if (tl) {
        /* the dummy prefix: SentencePiece encodes " " + text */
        s = (char *)malloc(tl + 2);
        pair = (char *)malloc(2 * (size_t)t->max_token_length + 1);
        if (!s || !pair) { free(s); free(pair); return kvqd__fail(err, err_size, KVQD_ERR_NOMEM, "out of memory"); }
        s[0] = ' ';
        memcpy(s + 1, text, tl + 1);
        /* one piece per UTF-8 code point, bytes as the fallback */
        for (i = 0; i < tl + 1;) {
            size_t cl = 1;
            int id;
            while (cl < 4 && i + cl < tl + 1 && ((unsigned char)s[i + cl] & 0xC0) == 0x80) cl++;
            id = kvqd_tokenizer_lookup(t, s + i, cl);
            if (id >= 0) {
                ids[n++] = id;
            } else {
                size_t j;
                for (j = 0; j < cl; j++) {
                    int bid = t->byte_ids[(unsigned char)s[i + j]];
                    ids[n++] = bid >= 0 ? bid : t->unk_id;
                }
            }
            i += cl;
        }
        /* greedy merges of the best-scoring adjacent pair (leftmost on ties) */
        {
            int first = add_bos ? 1 : 0;
            for (;;) {
                float best = -FLT_MAX;
                int best_i = -1, best_id = -1, k;
                for (k = first; k + 1 < n; k++) {
                    int la = t->lens[ids[k]], lb = t->lens[ids[k + 1]], id;
                    if (la + lb > t->max_token_length) continue;
                    memcpy(pair, t->pieces[ids[k]], (size_t)la);
                    memcpy(pair + la, t->pieces[ids[k + 1]], (size_t)lb);
                    id = kvqd_tokenizer_lookup(t, pair, (size_t)(la + lb));
                    if (id >= 0 && (best_i < 0 || t->scores[id] > best)) {
                        best = t->scores[id]; best_i = k; best_id = id;
                    }
                }
                if (best_i < 0) break;
                ids[best_i] = best_id;
                memmove(ids + best_i + 1, ids + best_i + 2, (size_t)(n - best_i - 2) * sizeof(int));
                n--;
            }
        }
        free(s);
        free(pair);
    }
    if (add_eos) ids[n++] = t->eos_id;
    *n_ids = n;
    return KVQD_OK;
}

static int kvqd__hex(int c)
{
    if (c >= '0' && c <= '9') return c - '0';
    if (c >= 'A' && c <= 'F') return c - 'A' + 10;
    if (c >= 'a' && c <= 'f') return c - 'a' + 10;
    return -1;
}

int kvqd_tokenizer_decode(const kvqd_tokenizer *t, int prev, int tok, char *out, size_t out_size)
{
    const char *p;
    int len;
    if (!t || !t->pieces || !out || out_size == 0 || tok < 0 || tok >= t->vocab_size) return -1;
    p = t->pieces[tok];
    len = t->lens[tok];
    if (prev == t->bos_id && len > 0 && p[0] == ' ') { p++; len--; }
    if (len == 6 && p[0] == '<' && p[1] == '0' && p[2] == 'x' && p[5] == '>' &&
        kvqd__hex(p[3]) >= 0 && kvqd__hex(p[4]) >= 0) {
        if (out_size < 2) return -1;
        out[0] = (char)(kvqd__hex(p[3]) * 16 + kvqd__hex(p[4]));
        out[1] = '\0';
        return 1;
    }
    if ((size_t)len + 1 > out_size) return -1;
    memcpy(out, p, (size_t)len);
    out[len] = '\0';
    return len;
}

/* ---- KVDUMP01 ---- */

static size_t kvqd__tensor_heads(const kvqd_dump *d, int bit)
{
    switch (bit) {
    case KVQD_KPOST: case KVQD_KPRE: case KVQD_V: return (size_t)d->n_kv_heads;
    case KVQD_QPOST: case KVQD_QPRE: return (size_t)d->n_heads;
    default: return 0;
    }
}

int kvqd_dump_check(kvqd_dump *d, char *err, size_t err_size)
{
    size_t lf = 0, total, t;
    int bit;
    if (!d) return kvqd__fail(err, err_size, KVQD_ERR_ARG, "NULL argument");
    if (d->version != 1) return kvqd__fail(err, err_size, KVQD_ERR_FORMAT, "version %d (only 1 is known)", d->version);
    if (d->header_bytes != KVQD_DUMP_HEADER_BYTES)
        return kvqd__fail(err, err_size, KVQD_ERR_FORMAT, "header_bytes %d (version 1 has %d)", d->header_bytes, KVQD_DUMP_HEADER_BYTES);
    if (d->n_layers < 1 || d->n_layers > KVQD_MAX_LAYERS)
        return kvqd__fail(err, err_size, KVQD_ERR_RANGE, "n_layers %d outside 1..%d", d->n_layers, KVQD_MAX_LAYERS);
    if (d->n_heads < 1 || d->n_heads > KVQD_MAX_HEADS)
        return kvqd__fail(err, err_size, KVQD_ERR_RANGE, "n_heads %d outside 1..%d", d->n_heads, KVQD_MAX_HEADS);
    if (d->n_kv_heads < 1 || d->n_kv_heads > d->n_heads || d->n_heads % d->n_kv_heads != 0)
        return kvqd__fail(err, err_size, KVQD_ERR_FORMAT, "n_kv_heads %d does not divide n_heads %d", d->n_kv_heads, d->n_heads);
    if (d->head_dim < 1 || d->head_dim > KVQD_MAX_HEAD_DIM)
        return kvqd__fail(err, err_size, KVQD_ERR_RANGE, "head_dim %d outside 1..%d", d->head_dim, KVQD_MAX_HEAD_DIM);
    if (d->n_tokens < 1 || d->n_tokens > KVQD_MAX_DUMP_TOKENS)
        return kvqd__fail(err, err_size, KVQD_ERR_RANGE, "n_tokens %d outside 1..%d", d->n_tokens, KVQD_MAX_DUMP_TOKENS);
    if (d->window < 1 || d->window > KVQD_MAX_DUMP_TOKENS)
        return kvqd__fail(err, err_size, KVQD_ERR_RANGE, "window %d outside 1..%d", d->window, KVQD_MAX_DUMP_TOKENS);
    if (d->tensor_mask < 1 || (d->tensor_mask & ~KVQD_ALL_TENSORS) != 0)
        return kvqd__fail(err, err_size, KVQD_ERR_FORMAT, "tensor_mask %d is not a non-empty subset of 31", d->tensor_mask);
    if (d->dim < 0 || d->dim > KVQD_MAX_DIM)
        return kvqd__fail(err, err_size, KVQD_ERR_RANGE, "dim %d outside 0..%d", d->dim, KVQD_MAX_DIM);
    if (d->vocab_size < 0 || d->vocab_size > KVQD_MAX_VOCAB)
        return kvqd__fail(err, err_size, KVQD_ERR_RANGE, "vocab_size %d outside 0..%d", d->vocab_size, KVQD_MAX_VOCAB);
    if (d->seq_len < 0 || d->seq_len > KVQD_MAX_SEQ)
        return kvqd__fail(err, err_size, KVQD_ERR_RANGE, "seq_len %d outside 0..%d", d->seq_len, KVQD_MAX_SEQ);
    if (d->rope_style != 0)
        return kvqd__fail(err, err_size, KVQD_ERR_FORMAT, "rope_style %d (only 0, interleaved pairs, is known)", d->rope_style);
    if (!(d->rope_theta > 0.0f && d->rope_theta <= FLT_MAX))
        return kvqd__fail(err, err_size, KVQD_ERR_FORMAT, "rope_theta is not a positive finite number");
    for (bit = 1; bit <= KVQD_QPRE; bit <<= 1) {
        if (!(d->tensor_mask & bit)) continue;
        if (!kvqd__mul3_add(&lf, kvqd__tensor_heads(d, bit), (size_t)d->n_tokens, (size_t)d->head_dim))
            return kvqd__fail(err, err_size, KVQD_ERR_RANGE, "tensor sizes overflow");
    }
    if (!kvqd__mul(lf, (size_t)d->n_layers, &total) || !kvqd__mul(total, 4, &t) ||
        !kvqd__add(t, KVQD_DUMP_HEADER_BYTES + 4 * (size_t)d->n_tokens, &t))
        return kvqd__fail(err, err_size, KVQD_ERR_RANGE, "dump size overflows");
    d->layer_floats = lf;
    d->n_data_floats = total;
    return KVQD_OK;
}

void kvqd_dump_free(kvqd_dump *d)
{
    if (!d) return;
    free(d->tokens);
    free(d->data);
    memset(d, 0, sizeof *d);
}

int kvqd_dump_init(kvqd_dump *d, int n_layers, int n_heads, int n_kv_heads, int head_dim,
                   int n_tokens, int window, int tensor_mask, char *err, size_t err_size)
{
    int rc;
    if (!d) return kvqd__fail(err, err_size, KVQD_ERR_ARG, "NULL argument");
    memset(d, 0, sizeof *d);
    d->version = 1; d->header_bytes = KVQD_DUMP_HEADER_BYTES;
    d->n_layers = n_layers; d->n_heads = n_heads; d->n_kv_heads = n_kv_heads; d->head_dim = head_dim;
    d->n_tokens = n_tokens; d->window = window; d->tensor_mask = tensor_mask;
    d->rope_theta = 10000.0f;
    rc = kvqd_dump_check(d, err, err_size);
    if (rc != KVQD_OK) return rc;
    d->tokens = (int32_t *)calloc((size_t)n_tokens + 1, sizeof(int32_t));
    d->data = (float *)calloc(d->n_data_floats ? d->n_data_floats : 1, sizeof(float));
    if (!d->tokens || !d->data) { kvqd_dump_free(d); return kvqd__fail(err, err_size, KVQD_ERR_NOMEM, "out of memory"); }
    return KVQD_OK;
}

static const char kvqd__magic[8] = { 'K', 'V', 'D', 'U', 'M', 'P', '0', '1' };

int kvqd_dump_load(kvqd_dump *d, const char *path, char *err, size_t err_size)
{
    FILE *f;
    unsigned char h[KVQD_DUMP_HEADER_BYTES] = { 0 };
    int32_t v[16];
    float th[4];
    size_t fsize, want, bad, i;
    int rc;
    if (d) memset(d, 0, sizeof *d);
    if (!d || !path) return kvqd__fail(err, err_size, KVQD_ERR_ARG, "NULL argument");
    f = fopen(path, "rb");
    if (!f) return kvqd__fail(err, err_size, KVQD_ERR_IO, "%s: cannot open", path);
    if (!kvqd__read(f, h, sizeof h)) { fclose(f); return kvqd__fail(err, err_size, KVQD_ERR_TRUNCATED, "%s: shorter than the 88-byte header", path); }
    if (memcmp(h, kvqd__magic, 8) != 0) { fclose(f); return kvqd__fail(err, err_size, KVQD_ERR_FORMAT, "%s: no KVDUMP01 magic", path); }
    for (i = 0; i < 16; i++) v[i] = kvqd__i32(h + 8 + 4 * i);
    for (i = 0; i < 4; i++) th[i] = kvqd__f32(h + 72 + 4 * i);
    d->version = v[0]; d->header_bytes = v[1]; d->n_layers = v[2]; d->n_heads = v[3];
    d->n_kv_heads = v[4]; d->head_dim = v[5]; d->n_tokens = v[6]; d->window = v[7];
    d->tensor_mask = v[8]; d->dim = v[9]; d->vocab_size = v[10]; d->seq_len = v[11];
    d->rope_style = v[12]; d->rope_theta = th[0];
    rc = kvqd_dump_check(d, err, err_size);
    if (rc == KVQD_OK && (v[13] | v[14] | v[15]) != 0) rc = kvqd__fail(err, err_size, KVQD_ERR_FORMAT, "reserved header ints are not zero");
    if (rc == KVQD_OK && (th[1] != 0.0f || th[2] != 0.0f || th[3] != 0.0f)) rc = kvqd__fail(err, err_size, KVQD_ERR_FORMAT, "reserved header floats are not zero");
    if (rc != KVQD_OK) {
        char tmp[200];
        if (err && err_size) { snprintf(tmp, sizeof tmp, "%s", err); snprintf(err, err_size, "%s: %s", path, tmp); }
        fclose(f);
        memset(d, 0, sizeof *d);
        return rc;
    }
    want = KVQD_DUMP_HEADER_BYTES + 4 * (size_t)d->n_tokens + 4 * d->n_data_floats; /* checked */
    if (kvqd__file_size(f, &fsize)) {
        if (fsize != want) {
            fclose(f); memset(d, 0, sizeof *d);
            return kvqd__fail(err, err_size, fsize < want ? KVQD_ERR_TRUNCATED : KVQD_ERR_TRAILING,
                              "%s: file has %lu bytes, the header implies %lu", path, (unsigned long)fsize, (unsigned long)want);
        }
        if (fseek(f, KVQD_DUMP_HEADER_BYTES, SEEK_SET) != 0) { fclose(f); memset(d, 0, sizeof *d); return kvqd__fail(err, err_size, KVQD_ERR_IO, "%s: seek failed", path); }
    }
    d->tokens = (int32_t *)malloc((size_t)d->n_tokens * sizeof(int32_t));
    d->data = (float *)malloc(d->n_data_floats * sizeof(float));
    if (!d->tokens || !d->data) { fclose(f); kvqd_dump_free(d); return kvqd__fail(err, err_size, KVQD_ERR_NOMEM, "%s: out of memory", path); }
    if (!kvqd__read(f, d->tokens, (size_t)d->n_tokens * 4) || !kvqd__read(f, d->data, d->n_data_floats * 4)) {
        fclose(f); kvqd_dump_free(d);
        return kvqd__fail(err, err_size, KVQD_ERR_TRUNCATED, "%s: truncated", path);
    }
    if (!kvqd__at_eof(f)) { fclose(f); kvqd_dump_free(d); return kvqd__fail(err, err_size, KVQD_ERR_TRAILING, "%s: bytes after the data", path); }
    fclose(f);
    kvqd__fix_words(d->tokens, (size_t)d->n_tokens);
    kvqd__fix_words(d->data, d->n_data_floats);
    for (i = 0; i < (size_t)d->n_tokens; i++) {
        if (d->tokens[i] < 0 || (d->vocab_size > 0 && d->tokens[i] >= d->vocab_size)) {
            int tok = d->tokens[i];
            kvqd_dump_free(d);
            return kvqd__fail(err, err_size, KVQD_ERR_RANGE, "%s: token %lu has id %d outside the vocabulary",
                              path, (unsigned long)i, tok);
        }
    }
    if (!kvqd__all_finite(d->data, d->n_data_floats, &bad)) {
        kvqd_dump_free(d);
        return kvqd__fail(err, err_size, KVQD_ERR_FORMAT, "%s: float %lu is NaN or infinite", path, (unsigned long)bad);
    }
    return KVQD_OK;
}

int kvqd_dump_write(const kvqd_dump *d, const char *path, char *err, size_t err_size)
{
    kvqd_dump c;
    unsigned char h[KVQD_DUMP_HEADER_BYTES], b[4];
    int32_t v[16];
    size_t i;
    FILE *f;
    int rc, ok;
    if (!d || !path || !d->tokens || !d->data) return kvqd__fail(err, err_size, KVQD_ERR_ARG, "NULL argument");
    c = *d;
    rc = kvqd_dump_check(&c, err, err_size);
    if (rc != KVQD_OK) return rc;
    if (c.n_data_floats != d->n_data_floats)
        return kvqd__fail(err, err_size, KVQD_ERR_ARG, "n_data_floats does not match the header");
    memset(h, 0, sizeof h);
    memcpy(h, kvqd__magic, 8);
    memset(v, 0, sizeof v);
    v[0] = d->version; v[1] = d->header_bytes; v[2] = d->n_layers; v[3] = d->n_heads;
    v[4] = d->n_kv_heads; v[5] = d->head_dim; v[6] = d->n_tokens; v[7] = d->window;
    v[8] = d->tensor_mask; v[9] = d->dim; v[10] = d->vocab_size; v[11] = d->seq_len; v[12] = d->rope_style;
    for (i = 0; i < 16; i++) kvqd__put_i32(h + 8 + 4 * i, v[i]);
    kvqd__put_f32(h + 72, d->rope_theta);
    f = fopen(path, "wb");
    if (!f) return kvqd__fail(err, err_size, KVQD_ERR_IO, "%s: cannot create", path);
    ok = fwrite(h, 1, sizeof h, f) == sizeof h;
    for (i = 0; ok && i < (size_t)d->n_tokens; i++) {
        kvqd__put_i32(b, d->tokens[i]);
        ok = fwrite(b, 1, 4, f) == 4;
    }
    for (i = 0; ok && i < d->n_data_floats; i++) {
        kvqd__put_f32(b, d->data[i]);
        ok = fwrite(b, 1, 4, f) == 4;
    }
    if (fclose(f) != 0) ok = 0;
    return ok ? KVQD_OK : kvqd__fail(err, err_size, KVQD_ERR_IO, "%s: write failed", path);
}

size_t kvqd_dump_tensor_floats(const kvqd_dump *d, int tensor_bit)
{
    if (!d) return 0;
    return kvqd__tensor_heads(d, tensor_bit) * (size_t)d->n_tokens * (size_t)d->head_dim;
}

float *kvqd_dump_tensor(const kvqd_dump *d, int layer, int tensor_bit)
{
    size_t off;
    int bit;
    if (!d || !d->data || layer < 0 || layer >= d->n_layers || !(d->tensor_mask & tensor_bit) ||
        kvqd__tensor_heads(d, tensor_bit) == 0)
        return NULL;
    off = (size_t)layer * d->layer_floats;
    for (bit = 1; bit < tensor_bit; bit <<= 1)
        if (d->tensor_mask & bit) off += kvqd_dump_tensor_floats(d, bit);
    return d->data + off;
}

/* ---- token lists ---- */

int kvqd_tokens_load(const char *path, int vocab_limit, int **ids, int *n_ids, char *err, size_t err_size)
{
    unsigned char *buf;
    size_t n, i, line = 1;
    int *out = NULL, cnt = 0, cap = 0, rc;
    if (ids) *ids = NULL;
    if (n_ids) *n_ids = 0;
    if (!path || !ids || !n_ids) return kvqd__fail(err, err_size, KVQD_ERR_ARG, "NULL argument");
    rc = kvqd__read_all(path, KVQD_MAX_TOKENS_FILE, &buf, &n, err, err_size);
    if (rc != KVQD_OK) return rc;
    if (n >= 8 && memcmp(buf, kvqd__magic, 8) == 0) {
        kvqd_dump d;
        free(buf);
        rc = kvqd_dump_load(&d, path, err, err_size);
        if (rc != KVQD_OK) return rc;
        for (i = 0; i < (size_t)d.n_tokens; i++) {
            if (vocab_limit > 0 && d.tokens[i] >= vocab_limit) {
                int tok = d.tokens[i];
                kvqd_dump_free(&d);
                return kvqd__fail(err, err_size, KVQD_ERR_RANGE, "%s: token id %d >= vocabulary size %d", path, tok, vocab_limit);
            }
        }
        out = (int *)malloc(((size_t)d.n_tokens + 1) * sizeof(int)); /* n_tokens >= 1; +1 keeps analyzers calm */
        if (!out) { kvqd_dump_free(&d); return kvqd__fail(err, err_size, KVQD_ERR_NOMEM, "out of memory"); }
        for (i = 0; i < (size_t)d.n_tokens; i++) out[i] = d.tokens[i];
        *ids = out; *n_ids = d.n_tokens;
        kvqd_dump_free(&d);
        return KVQD_OK;
    }
    for (i = 0; i < n;) {
        unsigned char c = buf[i];
        if (c == '#') { while (i < n && buf[i] != '\n') i++; continue; }
        if (c == '\n') { line++; i++; continue; }
        if (c == ' ' || c == '\t' || c == '\r' || c == ',') { i++; continue; }
        if (c >= '0' && c <= '9') {
            long long v = 0;
            while (i < n && buf[i] >= '0' && buf[i] <= '9') {
                v = v * 10 + (buf[i] - '0');
                if (v > INT_MAX) { free(buf); free(out); return kvqd__fail(err, err_size, KVQD_ERR_RANGE, "%s:%lu: id too large", path, (unsigned long)line); }
                i++;
            }
            if (i < n && !(buf[i] == ' ' || buf[i] == '\t' || buf[i] == '\r' || buf[i] == '\n' || buf[i] == ',' || buf[i] == '#')) {
                free(buf); free(out);
                return kvqd__fail(err, err_size, KVQD_ERR_FORMAT, "%s:%lu: unexpected character after a number", path, (unsigned long)line);
            }
            if (vocab_limit > 0 && v >= vocab_limit) {
                free(buf); free(out);
                return kvqd__fail(err, err_size, KVQD_ERR_RANGE, "%s:%lu: token id %lld >= vocabulary size %d", path, (unsigned long)line, v, vocab_limit);
            }
            if (cnt == cap) {
                int ncap = cap ? cap * 2 : 1024;
                int *no = (int *)realloc(out, (size_t)ncap * sizeof(int));
                if (!no) { free(buf); free(out); return kvqd__fail(err, err_size, KVQD_ERR_NOMEM, "out of memory"); }
                out = no; cap = ncap;
            }
            out[cnt++] = (int)v;
            continue;
        }
        free(buf); free(out);
        return kvqd__fail(err, err_size, KVQD_ERR_FORMAT, "%s:%lu: unexpected byte 0x%02x (want decimal ids)", path, (unsigned long)line, c);
    }
    free(buf);
    if (cnt == 0) { free(out); return kvqd__fail(err, err_size, KVQD_ERR_FORMAT, "%s: no token ids", path); }
    *ids = out; *n_ids = cnt;
    return KVQD_OK;
}

int kvqd_tokens_write(const char *path, const int *ids, int n_ids, const char *comment, char *err, size_t err_size)
{
    FILE *f;
    int i, ok = 1;
    if (!path || (!ids && n_ids) || n_ids < 0) return kvqd__fail(err, err_size, KVQD_ERR_ARG, "bad argument");
    f = fopen(path, "w");
    if (!f) return kvqd__fail(err, err_size, KVQD_ERR_IO, "%s: cannot create", path);
    if (comment) {
        const char *p = comment;
        /* every comment line starts with '#' */
        ok = fputs("# ", f) >= 0;
        for (; ok && *p; p++) {
            ok = fputc(*p, f) != EOF;
            if (ok && *p == '\n' && p[1]) ok = fputs("# ", f) >= 0;
        }
        if (ok && (p == comment || p[-1] != '\n')) ok = fputc('\n', f) != EOF;
    }
    for (i = 0; ok && i < n_ids; i++) {
        if (ids[i] < 0) { fclose(f); return kvqd__fail(err, err_size, KVQD_ERR_ARG, "negative id"); }
        ok = fprintf(f, "%d\n", ids[i]) > 0;
    }
    if (fclose(f) != 0) ok = 0;
    return ok ? KVQD_OK : kvqd__fail(err, err_size, KVQD_ERR_IO, "%s: write failed", path);
}

#endif /* KVQ_DATA_IMPLEMENTATION_DONE */
#endif /* KVQ_DATA_IMPLEMENTATION */
