/* test_examples.c — tests of the example tools: the data readers (every bad
   file is an error, never a crash), the KVDUMP writer/reader round trip, the
   BPE tokenizer, config strings, the Llama forward pass against the
   reference figures of ../shared/data/README.md, and the KV dumper (llm_dump)
   against the forward pass and the shared dumps.

   Run from the repository root. Shared data: $KVQ_SHARED_DATA, else ../shared/data;
   without it the bundled examples/data files are used (both models and their token
   lists) and the comparisons with the shared copies and dumps are skipped. Last line: "N passed, N failed"; exit status 1 on any failure.

   Build: cc -std=c99 -O2 -Wall -Wextra -Werror -I. -o build/test_examples tests/test_examples.c -lm */
#define _POSIX_C_SOURCE 200809L /* mkdtemp, rmdir */
#define KVQ_IMPLEMENTATION
#include "../kvq.h"
#define KVQ_DATA_IMPLEMENTATION
#include "../examples/kvq_data.h"
#define LLAMA_MODEL_IMPLEMENTATION
#include "../examples/llama_model.h"

#include <limits.h>
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

/* ---- harness ---- */

static int g_pass, g_fail;

#define CHECK(cond) check_((cond) != 0, __LINE__, #cond, "%s", "")
#define CHECKF(cond, ...) check_((cond) != 0, __LINE__, #cond, __VA_ARGS__)

#if defined(__GNUC__) || defined(__clang__)
__attribute__((format(printf, 4, 5)))
#endif
static void check_(int ok, int line, const char *expr, const char *fmt, ...)
{
    va_list ap;
    if (ok) { g_pass++; return; }
    g_fail++;
    fprintf(stderr, "FAIL line %d: %s: ", line, expr);
    va_start(ap, fmt);
    vfprintf(stderr, fmt, ap);
    va_end(ap);
    fputc('\n', stderr);
}

/* ---- temp files ---- */

static char g_dir[512];
static char g_files[64][600];
static int g_n_files;

static const char *tmp_path(const char *name)
{
    int i;
    for (i = 0; i < g_n_files; i++)
        if (strcmp(strrchr(g_files[i], '/') + 1, name) == 0) return g_files[i];
    if (g_n_files == 64) { fprintf(stderr, "too many temp files\n"); exit(2); }
    snprintf(g_files[g_n_files], sizeof g_files[0], "%s/%s", g_dir, name);
    return g_files[g_n_files++];
}

static void write_bytes(const char *path, const void *b, size_t n)
{
    FILE *f = fopen(path, "wb");
    if (!f || fwrite(b, 1, n, f) != n || fclose(f) != 0) { fprintf(stderr, "cannot write %s\n", path); exit(2); }
}

static unsigned char *read_bytes(const char *path, size_t *n)
{
    unsigned char *b;
    long sz;
    FILE *f = fopen(path, "rb");
    if (!f) return NULL;
    fseek(f, 0, SEEK_END);
    sz = ftell(f);
    fseek(f, 0, SEEK_SET);
    b = (unsigned char *)malloc((size_t)sz + 1);
    if (!b || fread(b, 1, (size_t)sz, f) != (size_t)sz) { fclose(f); free(b); return NULL; }
    fclose(f);
    *n = (size_t)sz;
    return b;
}

static int file_exists(const char *path)
{
    FILE *f = fopen(path, "rb");
    if (!f) return 0;
    fclose(f);
    return 1;
}

static void put32(unsigned char *p, int32_t v)
{
    uint32_t u;
    memcpy(&u, &v, 4);
    p[0] = (unsigned char)u; p[1] = (unsigned char)(u >> 8); p[2] = (unsigned char)(u >> 16); p[3] = (unsigned char)(u >> 24);
}

static void putf(unsigned char *p, float f)
{
    int32_t v;
    memcpy(&v, &f, 4);
    put32(p, v);
}

static uint64_t g_rng = 0x1234567887654321ULL;
static uint32_t rnd(void)
{
    g_rng ^= g_rng << 13; g_rng ^= g_rng >> 7; g_rng ^= g_rng << 17;
    return (uint32_t)(g_rng >> 16);
}
static float rndf(void) { return (float)rnd() / 4294967296.0f * 2.0f - 1.0f; }

/* ---- loaders applied to raw bytes ---- */

static int load_ck_bytes(const unsigned char *b, size_t n, char *err)
{
    kvqd_checkpoint ck;
    int rc;
    write_bytes(tmp_path("mut.bin"), b, n);
    rc = kvqd_checkpoint_load(&ck, tmp_path("mut.bin"), err, 256);
    if (rc == KVQD_OK) kvqd_checkpoint_free(&ck);
    return rc;
}

static int load_dump_bytes(const unsigned char *b, size_t n, char *err)
{
    kvqd_dump d;
    int rc;
    write_bytes(tmp_path("mut.kvd"), b, n);
    rc = kvqd_dump_load(&d, tmp_path("mut.kvd"), err, 256);
    if (rc == KVQD_OK) kvqd_dump_free(&d);
    return rc;
}

static int parse_tok_bytes(const unsigned char *b, size_t n, int vocab)
{
    kvqd_tokenizer t;
    char err[256];
    int rc = kvqd_tokenizer_parse(&t, b, n, vocab, err, sizeof err);
    if (rc == KVQD_OK) {
        int ids[64], m = 0;
        /* a parsed tokenizer must also encode and decode without trouble */
        if (kvqd_tokenizer_encode(&t, "a b\xc3\xa9z", 1, 1, ids, 64, &m, err, sizeof err) == KVQD_OK) {
            int i;
            char buf[128];
            for (i = 0; i < m; i++) kvqd_tokenizer_decode(&t, i ? ids[i - 1] : -1, ids[i], buf, sizeof buf);
        }
        kvqd_tokenizer_free(&t);
    }
    return rc;
}

/* ---- (a) checkpoint reader ---- */

static kvqd_llama_config tiny_config(int shared)
{
    kvqd_llama_config c;
    memset(&c, 0, sizeof c);
    c.dim = 16; c.hidden_dim = 24; c.n_layers = 2; c.n_heads = 4; c.n_kv_heads = 2;
    c.vocab_size = 11; c.seq_len = 8; c.shared_classifier = shared;
    return c;
}

static void test_checkpoint(void)
{
    kvqd_llama_config c = tiny_config(1), got;
    int32_t hdr[7];
    size_t nf, n, i;
    float *w;
    unsigned char *bytes, *m;
    char err[256];
    kvqd_checkpoint ck;
    int rc, shared;

    for (shared = 1; shared >= 0; shared--) {
        c = tiny_config(shared);
        hdr[0] = c.dim; hdr[1] = c.hidden_dim; hdr[2] = c.n_layers; hdr[3] = c.n_heads; hdr[4] = c.n_kv_heads;
        hdr[5] = shared ? c.vocab_size : -c.vocab_size; hdr[6] = c.seq_len;
        CHECK(kvqd_checkpoint_check_header(hdr, &got, &nf, err, sizeof err) == KVQD_OK);
        /* by hand: emb 11*16, rms 2*16, wq 2*256, wk,wv 2*8*16 each, wo 2*256, rms 2*16,
           w1,w2,w3 2*24*16 each, final 16, rope 8*4, classifier 11*16 if separate */
        CHECKF(nf == (size_t)(176 + 32 + 512 + 256 + 256 + 512 + 32 + 3 * 768 + 16 + 32 + (shared ? 0 : 176)),
               "nf=%lu", (unsigned long)nf);
        CHECK(got.head_dim == 4 && got.kv_dim == 8 && got.vocab_size == 11 && got.shared_classifier == shared);
        w = (float *)calloc(nf, sizeof(float));
        if (!w) { CHECK(w != NULL); return; }
        for (i = 0; i < nf; i++) w[i] = (float)i * 0.001f;
        CHECK(kvqd_checkpoint_write(tmp_path("tiny.bin"), &c, w, nf, err, sizeof err) == KVQD_OK);
        CHECK(kvqd_checkpoint_write(tmp_path("tiny_bad.bin"), &c, w, nf - 1, err, sizeof err) == KVQD_ERR_ARG);
        rc = kvqd_checkpoint_load(&ck, tmp_path("tiny.bin"), err, sizeof err);
        CHECKF(rc == KVQD_OK, "%s", err);
        if (rc == KVQD_OK) {
            CHECK(ck.n_floats == nf && ck.cfg.dim == 16 && ck.cfg.n_kv_heads == 2 && ck.cfg.shared_classifier == shared);
            CHECK(ck.w.token_embedding[0] == w[0] && ck.w.rms_att[0] == w[176] && ck.w.wq[0] == w[208]);
            CHECK(ck.w.rms_final[15] == w[176 + 32 + 512 + 256 + 256 + 512 + 32 + 3 * 768 + 15]);
            if (shared) CHECK(ck.w.wcls == ck.w.token_embedding);
            else CHECK(ck.w.wcls != ck.w.token_embedding && ck.w.wcls[175] == w[nf - 1]);
            kvqd_checkpoint_free(&ck);
        }
        free(w);
    }

    /* mutations of the last (separate classifier) file */
    bytes = read_bytes(tmp_path("tiny.bin"), &n);
    CHECK(bytes != NULL && n == 28 + 4 * nf);
    if (!bytes) return;
    m = (unsigned char *)malloc(n + 4096);
    /* truncated anywhere: every prefix is an error */
    for (i = 0; i < n; i += (i < 64 || i + 64 > n) ? 1 : 13) {
        rc = load_ck_bytes(bytes, i, err);
        CHECKF(rc == KVQD_ERR_TRUNCATED, "prefix %lu: rc %d (%s)", (unsigned long)i, rc, err);
    }
    /* oversized: trailing bytes */
    memcpy(m, bytes, n);
    memset(m + n, 0, 4096);
    CHECK(load_ck_bytes(m, n + 1, err) == KVQD_ERR_TRAILING);
    CHECK(load_ck_bytes(m, n + 4, err) == KVQD_ERR_TRAILING);
    CHECK(load_ck_bytes(m, n + 4096, err) == KVQD_ERR_TRAILING);
    CHECK(load_ck_bytes(m, n, err) == KVQD_OK);
    {
        struct { int field; int32_t value; int want; } cases[] = {
            { 0, 0, KVQD_ERR_RANGE }, { 0, -16, KVQD_ERR_RANGE }, { 0, 1 << 30, KVQD_ERR_RANGE },
            { 0, 20, KVQD_ERR_FORMAT },          /* 4 heads do not divide 20? they do: 5, odd head_dim */
            { 1, 0, KVQD_ERR_RANGE }, { 1, -1, KVQD_ERR_RANGE }, { 1, INT32_MAX, KVQD_ERR_RANGE },
            { 2, 0, KVQD_ERR_RANGE }, { 2, 1 << 20, KVQD_ERR_RANGE }, { 2, INT32_MIN, KVQD_ERR_RANGE },
            { 3, 3, KVQD_ERR_FORMAT }, { 3, 0, KVQD_ERR_FORMAT }, { 3, 32, KVQD_ERR_FORMAT },
            { 3, 16, KVQD_ERR_FORMAT },          /* head_dim 1: odd */
            { 4, 3, KVQD_ERR_FORMAT }, { 4, 8, KVQD_ERR_FORMAT }, { 4, 0, KVQD_ERR_FORMAT }, { 4, -2, KVQD_ERR_FORMAT },
            { 5, 0, KVQD_ERR_RANGE }, { 5, INT32_MIN, KVQD_ERR_RANGE }, { 5, 1 << 30, KVQD_ERR_RANGE },
            { 5, -(1 << 30), KVQD_ERR_RANGE },
            { 5, 11, KVQD_ERR_TRAILING },        /* flips to shared: the file has a classifier too many */
            { 5, -12, KVQD_ERR_TRUNCATED },      /* one more vocab row than the file has */
            { 6, 0, KVQD_ERR_RANGE }, { 6, INT32_MAX, KVQD_ERR_RANGE }, { 6, 9, KVQD_ERR_TRUNCATED },
            { 1, 25, KVQD_ERR_TRUNCATED }, { 2, 3, KVQD_ERR_TRUNCATED },
        };
        for (i = 0; i < sizeof cases / sizeof cases[0]; i++) {
            memcpy(m, bytes, n);
            put32(m + 4 * cases[i].field, cases[i].value);
            rc = load_ck_bytes(m, n, err);
            CHECKF(rc == cases[i].want, "field %d = %d: rc %d want %d (%s)", cases[i].field, (int)cases[i].value, rc,
                   cases[i].want, err);
        }
    }
    /* absurd but in-range dimensions: the size check rejects them before any allocation */
    memcpy(m, bytes, n);
    put32(m + 0, 65536); put32(m + 4, 1 << 20); put32(m + 8, 4096); put32(m + 12, 4096); put32(m + 16, 4096);
    put32(m + 20, -(1 << 24)); put32(m + 24, 1 << 24);
    rc = load_ck_bytes(m, n, err);
    CHECKF(rc == KVQD_ERR_TRUNCATED || rc == KVQD_ERR_RANGE, "rc %d (%s)", rc, err);
    /* NaN and infinite weights */
    memcpy(m, bytes, n);
    putf(m + 28 + 4 * 100, NAN);
    CHECK(load_ck_bytes(m, n, err) == KVQD_ERR_FORMAT);
    memcpy(m, bytes, n);
    putf(m + n - 4, -INFINITY);
    CHECK(load_ck_bytes(m, n, err) == KVQD_ERR_FORMAT);
    /* random header corruption: any outcome but a crash; most are errors */
    for (i = 0; i < 300; i++) {
        memcpy(m, bytes, n);
        m[rnd() % 28] = (unsigned char)rnd();
        rc = load_ck_bytes(m, n, err);
        CHECK(rc == KVQD_OK || rc < 0);
    }
    CHECK(kvqd_checkpoint_load(&ck, tmp_path("does_not_exist.bin"), err, sizeof err) == KVQD_ERR_IO);
    CHECK(kvqd_checkpoint_load(NULL, tmp_path("tiny.bin"), err, sizeof err) == KVQD_ERR_ARG);
    CHECK(kvqd_checkpoint_load(&ck, tmp_path("tiny.bin"), NULL, 0) == KVQD_OK); /* err buffer optional */
    kvqd_checkpoint_free(&ck);
    kvqd_checkpoint_free(&ck); /* twice is harmless */
    free(m);
    free(bytes);
}

/* ---- (a) tokenizer ---- */

typedef struct { const char *s; float score; } piece;

/* tiny vocabulary: unk, bos, eos, [256 byte pieces], then pieces */
static size_t build_tokenizer(unsigned char *out, int with_bytes, const piece *pieces, int n_pieces, int *vocab)
{
    size_t o = 4;
    int i, v = 0, maxlen = 7;
    const char *specials[3] = { "<unk>", "\n<s>\n", "\n</s>\n" };
    put32(out, maxlen);
#define ADD(str, len, sc) do { putf(out + o, (sc)); put32(out + o + 4, (int32_t)(len)); memcpy(out + o + 8, (str), (size_t)(len)); o += 8 + (size_t)(len); v++; } while (0)
    for (i = 0; i < 3; i++) ADD(specials[i], strlen(specials[i]), 0.0f);
    if (with_bytes)
        for (i = 0; i < 256; i++) { char b[8]; snprintf(b, sizeof b, "<0x%02X>", i); ADD(b, 6, 0.0f); }
    for (i = 0; i < n_pieces; i++) ADD(pieces[i].s, strlen(pieces[i].s), pieces[i].score);
#undef ADD
    *vocab = v;
    return o;
}

static int same_ids(const int *a, int na, const int *b, int nb)
{
    return na == nb && memcmp(a, b, (size_t)na * sizeof(int)) == 0;
}

static void test_tokenizer(void)
{
    static const piece pieces[] = {
        { " ", 0.0f }, { "a", -0.1f }, { "b", -0.2f }, { "c", -0.3f }, { "ab", -1.0f }, { "bc", -0.5f },
        { " a", -2.0f }, { "abc", -3.0f }, { "\xc3\xa9", -4.0f }, { " abc", -0.25f },
    };
    unsigned char buf[8192];
    size_t n, i;
    int vocab, ids[64] = { 0 }, m = 0, rc;
    kvqd_tokenizer t;
    char err[256], out[32];
    const int B = 3 + 256; /* first piece id after the byte pieces */

    n = build_tokenizer(buf, 1, pieces, (int)(sizeof pieces / sizeof pieces[0]), &vocab);
    rc = kvqd_tokenizer_parse(&t, buf, n, vocab, err, sizeof err);
    CHECKF(rc == KVQD_OK, "%s", err);
    if (rc != KVQD_OK) return;
    CHECK(t.vocab_size == vocab && t.max_token_length == 7);
    CHECK(kvqd_tokenizer_lookup(&t, "ab", 2) == B + 4 && kvqd_tokenizer_lookup(&t, "abd", 3) == -1);
    CHECK(kvqd_tokenizer_lookup(&t, "<0x41>", 6) == 3 + 0x41 && t.byte_ids[0xff] == 3 + 0xff);
    /* " abc": pieces ' ' a b c; best pair bc (-0.5) -> ' ' a bc; then ' a' (-2) beats abc (-3)
       -> ' a' bc; ' abc' is a piece (-0.25) -> ' abc' */
    CHECK(kvqd_tokenizer_encode(&t, "abc", 1, 0, ids, 64, &m, err, sizeof err) == KVQD_OK);
    { int want[] = { 1, B + 9 }; CHECKF(same_ids(ids, m, want, 2), "m=%d ids %d %d", m, ids[0], m > 1 ? ids[1] : -1); }
    /* "ab": ' ' a b -> ab (-1) beats ' a' (-2) -> ' ' ab, with EOS */
    CHECK(kvqd_tokenizer_encode(&t, "ab", 0, 1, ids, 64, &m, err, sizeof err) == KVQD_OK);
    { int want[] = { B + 0, B + 4, 2 }; CHECK(same_ids(ids, m, want, 3)); }
    /* a code point in the vocab, one not in it (byte fallback), an ASCII byte not in it */
    CHECK(kvqd_tokenizer_encode(&t, "\xc3\xa9\xc3\xbcx", 0, 0, ids, 64, &m, err, sizeof err) == KVQD_OK);
    { int want[] = { B + 0, B + 8, 3 + 0xc3, 3 + 0xbc, 3 + 'x' }; CHECK(same_ids(ids, m, want, 5)); }
    /* empty text: no dummy prefix */
    CHECK(kvqd_tokenizer_encode(&t, "", 1, 1, ids, 64, &m, err, sizeof err) == KVQD_OK);
    { int want[] = { 1, 2 }; CHECK(same_ids(ids, m, want, 2)); }
    /* buffer too small is an error, not an overflow */
    CHECK(kvqd_tokenizer_encode(&t, "abcabc", 1, 0, ids, 4, &m, err, sizeof err) == KVQD_ERR_ARG);
    /* decode: the space after BOS is dropped, byte pieces become bytes */
    CHECK(kvqd_tokenizer_decode(&t, 1, B + 9, out, sizeof out) == 3 && strcmp(out, "abc") == 0);
    CHECK(kvqd_tokenizer_decode(&t, B + 1, B + 9, out, sizeof out) == 4 && strcmp(out, " abc") == 0);
    CHECK(kvqd_tokenizer_decode(&t, B + 1, 3 + 0x41, out, sizeof out) == 1 && out[0] == 'A');
    CHECK(kvqd_tokenizer_decode(&t, B + 1, vocab, out, sizeof out) == -1);
    CHECK(kvqd_tokenizer_decode(&t, B + 1, -1, out, sizeof out) == -1);
    CHECK(kvqd_tokenizer_decode(&t, B + 1, B + 9, out, 3) == -1);
    kvqd_tokenizer_free(&t);

    /* without byte pieces an unknown code point is unk */
    n = build_tokenizer(buf, 0, pieces, (int)(sizeof pieces / sizeof pieces[0]), &vocab);
    CHECK(kvqd_tokenizer_parse(&t, buf, n, vocab, err, sizeof err) == KVQD_OK);
    CHECK(kvqd_tokenizer_encode(&t, "x", 0, 0, ids, 64, &m, err, sizeof err) == KVQD_OK);
    { int want[] = { 3, 0 }; CHECK(same_ids(ids, m, want, 2)); }
    kvqd_tokenizer_free(&t);

    /* bad files */
    n = build_tokenizer(buf, 1, pieces, (int)(sizeof pieces / sizeof pieces[0]), &vocab);
    for (i = 0; i < n; i++) {
        rc = parse_tok_bytes(buf, i, vocab);
        CHECKF(rc == KVQD_ERR_TRUNCATED, "prefix %lu: rc %d", (unsigned long)i, rc);
    }
    CHECK(parse_tok_bytes(buf, n, vocab + 1) == KVQD_ERR_TRUNCATED);
    CHECK(parse_tok_bytes(buf, n, vocab - 1) == KVQD_ERR_TRAILING);
    CHECK(parse_tok_bytes(buf, n, 0) == KVQD_OK); /* count to the end */
    buf[n] = 0;
    CHECK(parse_tok_bytes(buf, n + 1, vocab) == KVQD_ERR_TRAILING);
    CHECK(parse_tok_bytes(buf, n + 1, 0) == KVQD_ERR_TRUNCATED);
    {
        unsigned char m2[8192];
        size_t first_len = 4 + 4; /* offset of token 0's length field */
        memcpy(m2, buf, n); put32(m2, 0);           CHECK(parse_tok_bytes(m2, n, vocab) == KVQD_ERR_RANGE);
        memcpy(m2, buf, n); put32(m2, -7);          CHECK(parse_tok_bytes(m2, n, vocab) == KVQD_ERR_RANGE);
        memcpy(m2, buf, n); put32(m2, INT32_MAX);   CHECK(parse_tok_bytes(m2, n, vocab) == KVQD_ERR_RANGE);
        memcpy(m2, buf, n); put32(m2, 4);           CHECK(parse_tok_bytes(m2, n, vocab) == KVQD_ERR_FORMAT); /* "<unk>" > 4 */
        memcpy(m2, buf, n); put32(m2 + first_len, 0);  CHECK(parse_tok_bytes(m2, n, vocab) == KVQD_ERR_FORMAT);
        memcpy(m2, buf, n); put32(m2 + first_len, -1); CHECK(parse_tok_bytes(m2, n, vocab) == KVQD_ERR_FORMAT);
        memcpy(m2, buf, n); put32(m2 + first_len, INT32_MIN); CHECK(parse_tok_bytes(m2, n, vocab) == KVQD_ERR_FORMAT);
        memcpy(m2, buf, n); putf(m2 + 4, NAN);      CHECK(parse_tok_bytes(m2, n, vocab) == KVQD_ERR_FORMAT);
        memcpy(m2, buf, n); putf(m2 + 4, INFINITY); CHECK(parse_tok_bytes(m2, n, vocab) == KVQD_ERR_FORMAT);
        for (i = 0; i < 2000; i++) {
            memcpy(m2, buf, n);
            m2[rnd() % n] = (unsigned char)rnd();
            if (i & 1) m2[rnd() % n] ^= (unsigned char)(1u << (rnd() % 8));
            rc = parse_tok_bytes(m2, n, (i & 2) ? 0 : vocab);
            CHECK(rc == KVQD_OK || rc < 0);
        }
    }
    CHECK(kvqd_tokenizer_parse(&t, buf, 2, 0, err, sizeof err) == KVQD_ERR_TRUNCATED);
    CHECK(kvqd_tokenizer_load(&t, tmp_path("no_such_tok.bin"), 0, err, sizeof err) == KVQD_ERR_IO);
    write_bytes(tmp_path("tok.bin"), buf, n);
    CHECK(kvqd_tokenizer_load(&t, tmp_path("tok.bin"), vocab, err, sizeof err) == KVQD_OK);
    kvqd_tokenizer_free(&t);
}

/* the real tokenizer: encoding reproduces the ids the model itself produced */
static void test_real_tokenizer(const char *tok_path, int vocab, const int *ids, int n_ids, const char *text)
{
    kvqd_tokenizer t;
    char err[256], buf[64], dec[4096];
    int enc[1024], m = 0, i, rc, len = 0;
    rc = kvqd_tokenizer_load(&t, tok_path, vocab, err, sizeof err);
    CHECKF(rc == KVQD_OK, "%s", err);
    if (rc != KVQD_OK) return;
    CHECK(kvqd_tokenizer_encode(&t, text, 1, 0, enc, 1024, &m, err, sizeof err) == KVQD_OK);
    CHECKF(m <= n_ids && memcmp(enc, ids, (size_t)m * sizeof(int)) == 0, "%s: encoding of '%s' differs from the dump", tok_path, text);
    for (i = 1; i < m; i++) {
        int l = kvqd_tokenizer_decode(&t, enc[i - 1], enc[i], buf, sizeof buf);
        CHECK(l >= 0);
        if (l > 0 && len + l < (int)sizeof dec) { memcpy(dec + len, buf, (size_t)l); len += l; }
    }
    dec[len] = '\0';
    CHECKF(strcmp(dec, text) == 0, "decode gave '%s'", dec);
    kvqd_tokenizer_free(&t);
}

/* ---- (a, b) KVDUMP ---- */

static void fill_dump(kvqd_dump *d)
{
    size_t i;
    for (i = 0; i < (size_t)d->n_tokens; i++) d->tokens[i] = (int32_t)(i * 7 % 50);
    for (i = 0; i < d->n_data_floats; i++) d->data[i] = rndf() * 3.0f;
}

static void test_dump(void)
{
    kvqd_dump d, e;
    char err[256];
    unsigned char *bytes, *m;
    size_t n, i;
    int rc, mask;

    for (mask = 31; mask >= 13; mask -= 18) { /* all tensors, then Kpost|V|Qpost */
        rc = kvqd_dump_init(&d, 2, 4, 2, 8, 10, 6, mask, err, sizeof err);
        CHECKF(rc == KVQD_OK, "%s", err);
        if (rc != KVQD_OK) return;
        d.dim = 32; d.vocab_size = 50; d.seq_len = 6;
        fill_dump(&d);
        CHECK(d.layer_floats == (size_t)(mask == 31 ? 3 * 2 * 10 * 8 + 2 * 4 * 10 * 8 : 2 * 2 * 10 * 8 + 4 * 10 * 8));
        CHECK(kvqd_dump_write(&d, tmp_path("rt.kvd"), err, sizeof err) == KVQD_OK);
        rc = kvqd_dump_load(&e, tmp_path("rt.kvd"), err, sizeof err);
        CHECKF(rc == KVQD_OK, "%s", err);
        if (rc == KVQD_OK) {
            CHECK(e.version == 1 && e.header_bytes == 88 && e.n_layers == 2 && e.n_heads == 4 && e.n_kv_heads == 2);
            CHECK(e.head_dim == 8 && e.n_tokens == 10 && e.window == 6 && e.tensor_mask == mask && e.dim == 32);
            CHECK(e.vocab_size == 50 && e.seq_len == 6 && e.rope_style == 0 && e.rope_theta == 10000.0f);
            CHECK(e.n_data_floats == d.n_data_floats);
            CHECK(memcmp(e.tokens, d.tokens, (size_t)d.n_tokens * 4) == 0);
            CHECK(memcmp(e.data, d.data, d.n_data_floats * 4) == 0);
            /* tensor addressing: layer 1's Qpost sits after its K/V tensors */
            CHECK(kvqd_dump_tensor(&e, 1, KVQD_QPOST) ==
                  e.data + e.layer_floats + (mask == 31 ? 3 * 160 : 2 * 160));
            CHECK(kvqd_dump_tensor(&e, 0, KVQD_KPOST) == e.data);
            CHECK(kvqd_dump_tensor(&e, 0, KVQD_V) == e.data + (mask == 31 ? 320 : 160));
            CHECK((kvqd_dump_tensor(&e, 0, KVQD_KPRE) != NULL) == (mask == 31));
            CHECK(kvqd_dump_tensor(&e, 2, KVQD_KPOST) == NULL && kvqd_dump_tensor(&e, -1, KVQD_KPOST) == NULL);
            CHECK(kvqd_dump_tensor(&e, 0, 3) == NULL && kvqd_dump_tensor(&e, 0, 32) == NULL);
            CHECK(kvqd_dump_tensor_floats(&e, KVQD_QPRE) == 320 && kvqd_dump_tensor_floats(&e, KVQD_V) == 160);
            kvqd_dump_free(&e);
        }
        if (mask == 13) break;
        kvqd_dump_free(&d);
    }
    /* writer validation */
    d.tensor_mask = 0;
    CHECK(kvqd_dump_write(&d, tmp_path("bad.kvd"), err, sizeof err) == KVQD_ERR_FORMAT);
    d.tensor_mask = 13;
    kvqd_dump_free(&d);
    CHECK(kvqd_dump_init(&d, 1, 3, 2, 8, 4, 4, 31, err, sizeof err) == KVQD_ERR_FORMAT);
    CHECK(kvqd_dump_init(&d, 1, 4, 2, 8, 0, 4, 31, err, sizeof err) == KVQD_ERR_RANGE);

    bytes = read_bytes(tmp_path("rt.kvd"), &n);
    CHECK(bytes != NULL && n == 88 + 40 + 4 * 2 * 640);
    if (!bytes) return;
    m = (unsigned char *)malloc(n + 64);
    for (i = 0; i < n; i += (i < 140 || i + 40 > n) ? 1 : 17) {
        rc = load_dump_bytes(bytes, i, err);
        CHECKF(rc == KVQD_ERR_TRUNCATED, "prefix %lu: rc %d (%s)", (unsigned long)i, rc, err);
    }
    memcpy(m, bytes, n);
    memset(m + n, 0, 64);
    CHECK(load_dump_bytes(m, n + 1, err) == KVQD_ERR_TRAILING);
    CHECK(load_dump_bytes(m, n + 64, err) == KVQD_ERR_TRAILING);
    CHECK(load_dump_bytes(m, n, err) == KVQD_OK);
    {
        /* header ints are at 8 + 4*k: version, header_bytes, n_layers, n_heads, n_kv_heads,
           head_dim, n_tokens, window, tensor_mask, dim, vocab_size, seq_len, rope_style, 0, 0, 0 */
        struct { int k; int32_t v; int want; } cases[] = {
            { 0, 2, KVQD_ERR_FORMAT }, { 0, 0, KVQD_ERR_FORMAT }, { 1, 92, KVQD_ERR_FORMAT }, { 1, 0, KVQD_ERR_FORMAT },
            { 2, 0, KVQD_ERR_RANGE }, { 2, -1, KVQD_ERR_RANGE }, { 2, 1 << 30, KVQD_ERR_RANGE }, { 2, 3, KVQD_ERR_TRUNCATED },
            { 2, 1, KVQD_ERR_TRAILING },
            { 3, 3, KVQD_ERR_FORMAT }, { 3, 0, KVQD_ERR_RANGE }, { 3, INT32_MAX, KVQD_ERR_RANGE },
            { 4, 0, KVQD_ERR_FORMAT }, { 4, 3, KVQD_ERR_FORMAT }, { 4, 8, KVQD_ERR_FORMAT }, { 4, 4, KVQD_ERR_TRUNCATED },
            { 5, 0, KVQD_ERR_RANGE }, { 5, -8, KVQD_ERR_RANGE }, { 5, 1 << 30, KVQD_ERR_RANGE }, { 5, 4, KVQD_ERR_TRAILING },
            { 6, 0, KVQD_ERR_RANGE }, { 6, INT32_MAX, KVQD_ERR_RANGE }, { 6, 11, KVQD_ERR_TRUNCATED },
            { 6, (1 << 28), KVQD_ERR_TRUNCATED },
            { 7, 0, KVQD_ERR_RANGE }, { 7, -6, KVQD_ERR_RANGE },
            { 8, 0, KVQD_ERR_FORMAT }, { 8, 32, KVQD_ERR_FORMAT }, { 8, 64, KVQD_ERR_FORMAT }, { 8, -1, KVQD_ERR_FORMAT },
            { 8, 31, KVQD_ERR_TRUNCATED }, { 8, 5, KVQD_ERR_TRAILING },
            { 9, -1, KVQD_ERR_RANGE }, { 10, -1, KVQD_ERR_RANGE }, { 10, 40, KVQD_ERR_RANGE } /* token 42 >= 40 */,
            { 11, -1, KVQD_ERR_RANGE }, { 12, 1, KVQD_ERR_FORMAT }, { 13, 1, KVQD_ERR_FORMAT }, { 15, -1, KVQD_ERR_FORMAT },
        };
        for (i = 0; i < sizeof cases / sizeof cases[0]; i++) {
            memcpy(m, bytes, n);
            put32(m + 8 + 4 * cases[i].k, cases[i].v);
            rc = load_dump_bytes(m, n, err);
            CHECKF(rc == cases[i].want, "int %d = %d: rc %d want %d (%s)", cases[i].k, (int)cases[i].v, rc, cases[i].want, err);
        }
    }
    memcpy(m, bytes, n); m[0] = 'X';                  CHECK(load_dump_bytes(m, n, err) == KVQD_ERR_FORMAT);
    memcpy(m, bytes, n); memcpy(m, "KVDUMP02", 8);    CHECK(load_dump_bytes(m, n, err) == KVQD_ERR_FORMAT);
    memcpy(m, bytes, n); putf(m + 72, NAN);           CHECK(load_dump_bytes(m, n, err) == KVQD_ERR_FORMAT);
    memcpy(m, bytes, n); putf(m + 72, 0.0f);          CHECK(load_dump_bytes(m, n, err) == KVQD_ERR_FORMAT);
    memcpy(m, bytes, n); putf(m + 72, -10000.0f);     CHECK(load_dump_bytes(m, n, err) == KVQD_ERR_FORMAT);
    memcpy(m, bytes, n); putf(m + 80, 1.0f);          CHECK(load_dump_bytes(m, n, err) == KVQD_ERR_FORMAT);
    memcpy(m, bytes, n); put32(m + 88 + 4 * 3, -5);   CHECK(load_dump_bytes(m, n, err) == KVQD_ERR_RANGE);
    memcpy(m, bytes, n); put32(m + 88 + 4 * 9, 50);   CHECK(load_dump_bytes(m, n, err) == KVQD_ERR_RANGE);
    memcpy(m, bytes, n); putf(m + n - 4, NAN);        CHECK(load_dump_bytes(m, n, err) == KVQD_ERR_FORMAT);
    memcpy(m, bytes, n); putf(m + 88 + 40, INFINITY); CHECK(load_dump_bytes(m, n, err) == KVQD_ERR_FORMAT);
    for (i = 0; i < 500; i++) {
        memcpy(m, bytes, n);
        m[rnd() % 88] = (unsigned char)rnd();
        rc = load_dump_bytes(m, n, err);
        CHECK(rc == KVQD_OK || rc < 0);
    }
    CHECK(kvqd_dump_load(&e, tmp_path("none.kvd"), err, sizeof err) == KVQD_ERR_IO);
    free(m);
    free(bytes);

    /* a dump is also a token list */
    {
        int *ids = NULL, n_ids = 0;
        CHECK(kvqd_tokens_load(tmp_path("rt.kvd"), 50, &ids, &n_ids, err, sizeof err) == KVQD_OK);
        CHECK(n_ids == 10 && ids && ids[3] == 21);
        free(ids);
        CHECK(kvqd_tokens_load(tmp_path("rt.kvd"), 20, &ids, &n_ids, err, sizeof err) == KVQD_ERR_RANGE);
    }
}

static void test_tokens_file(void)
{
    int ids[5] = { 1, 403, 0, 7, 511 }, *got = NULL, n = 0;
    char err[256];
    CHECK(kvqd_tokens_write(tmp_path("t.tokens"), ids, 5, "line one\nline two", err, sizeof err) == KVQD_OK);
    CHECK(kvqd_tokens_load(tmp_path("t.tokens"), 512, &got, &n, err, sizeof err) == KVQD_OK);
    CHECK(n == 5 && got && same_ids(got, n, ids, 5));
    free(got); got = NULL;
    CHECK(kvqd_tokens_load(tmp_path("t.tokens"), 511, &got, &n, err, sizeof err) == KVQD_ERR_RANGE);
    write_bytes(tmp_path("t2.tokens"), "# c\n1, 2 3\r\n4 # five\n", 21);
    CHECK(kvqd_tokens_load(tmp_path("t2.tokens"), 0, &got, &n, err, sizeof err) == KVQD_OK && n == 4 && got[3] == 4);
    free(got); got = NULL;
    write_bytes(tmp_path("t3.tokens"), "1 2 x3\n", 7);
    CHECK(kvqd_tokens_load(tmp_path("t3.tokens"), 0, &got, &n, err, sizeof err) == KVQD_ERR_FORMAT);
    write_bytes(tmp_path("t3.tokens"), "1 -2\n", 5);
    CHECK(kvqd_tokens_load(tmp_path("t3.tokens"), 0, &got, &n, err, sizeof err) == KVQD_ERR_FORMAT);
    write_bytes(tmp_path("t3.tokens"), "1 2a\n", 5);
    CHECK(kvqd_tokens_load(tmp_path("t3.tokens"), 0, &got, &n, err, sizeof err) == KVQD_ERR_FORMAT);
    write_bytes(tmp_path("t3.tokens"), "99999999999\n", 12);
    CHECK(kvqd_tokens_load(tmp_path("t3.tokens"), 0, &got, &n, err, sizeof err) == KVQD_ERR_RANGE);
    write_bytes(tmp_path("t3.tokens"), "# nothing\n", 10);
    CHECK(kvqd_tokens_load(tmp_path("t3.tokens"), 0, &got, &n, err, sizeof err) == KVQD_ERR_FORMAT);
    write_bytes(tmp_path("t3.tokens"), "", 0);
    CHECK(kvqd_tokens_load(tmp_path("t3.tokens"), 0, &got, &n, err, sizeof err) == KVQD_ERR_FORMAT);
    CHECK(got == NULL);
}

/* ---- config strings ---- */

static void test_configs(void)
{
    llm_cache_spec s;
    char err[256];
    static const char *const bad[] = { "", "k", "k2k2", "k5v2", "k2v2r48", "k2v2g48", "k2v2h3", "k2v2 ",
                                       "k99999999", "k-2", "kv2", "k2v2g0", "fp64", "k2v2s9999" };
    static const char *const good[] = { "k2v2", "k16v16", "k8v8g16", "k4v2g64r0s4", "k3v3g128", "v4", "k2v2r0", "fp16", "FP32" };
    size_t i;
    CHECK(llm_parse_config("k4v2g64r0s4", 8, 4, 512, &s, err, sizeof err) == 0);
    CHECK(!s.fp32 && s.cfg.key_bits == 4 && s.cfg.value_bits == 2 && s.cfg.group_size == 64 &&
          s.cfg.residual_tokens == 0 && s.cfg.sink_tokens == 4 && s.cfg.head_dim == 8 && s.cfg.n_kv_heads == 4 &&
          s.cfg.max_tokens == 512 && strcmp(s.name, "k4v2g64r0s4") == 0);
    CHECK(llm_parse_config("K2V2", 8, 4, 512, &s, err, sizeof err) == 0 && s.cfg.key_bits == 2 && s.cfg.residual_tokens == 128);
    CHECK(llm_parse_config("fp16", 8, 4, 512, &s, err, sizeof err) == 0 && s.cfg.key_bits == 16 && s.cfg.value_bits == 16);
    CHECK(llm_parse_config("fp32", 8, 4, 512, &s, err, sizeof err) == 0 && s.fp32);
    {
        kvq_config def = kvq_default_config(64, 4, 512);
        CHECK(llm_parse_config("default", 64, 4, 512, &s, err, sizeof err) == 0 && !memcmp(&s.cfg, &def, sizeof def));
        CHECK(llm_parse_config("k3v2b64p16", 64, 4, 512, &s, err, sizeof err) == 0 && !memcmp(&s.cfg, &def, sizeof def));
        CHECK(llm_parse_config("k3v2", 64, 4, 512, &s, err, sizeof err) == 0 && s.cfg.key_block == 0 &&
              s.cfg.value_param_bits == 32); /* strings name their shape: b0 p32 unless given */
    }
    CHECK(llm_parse_config("k2v2g128", 8, 4, 512, &s, err, sizeof err) == 0 && s.cfg.residual_tokens == 128);
    CHECK(llm_parse_config("k2v2g64", 8, 4, 512, &s, err, sizeof err) == 0 && s.cfg.residual_tokens == 128);
    for (i = 0; i < sizeof good / sizeof good[0]; i++)
        CHECKF(llm_parse_config(good[i], 16, 4, 256, &s, err, sizeof err) == 0, "'%s': %s", good[i], err);
    for (i = 0; i < sizeof bad / sizeof bad[0]; i++)
        CHECKF(llm_parse_config(bad[i], 8, 4, 512, &s, err, sizeof err) != 0, "'%s' accepted", bad[i]);
    CHECK(llm_parse_config(NULL, 8, 4, 512, &s, err, sizeof err) != 0);
    /* the steady-state formula here agrees with kvq's own accounting */
    {
        static const char *const specs[] = { "k2v2", "k3v3", "k4v4", "k8v8", "k16v16", "k2v2g64", "k2v2g16", "k4v2g128",
                                             "k16v2", "k2v16", "k3v2b64p16", "k3v2g16b128", "k2v2p16x10" };
        static const int dims[] = { 8, 16, 24, 64, 80, 128 };
        size_t j;
        for (i = 0; i < sizeof specs / sizeof specs[0]; i++)
            for (j = 0; j < sizeof dims / sizeof dims[0]; j++) {
                double mine, theirs;
                if (llm_parse_config(specs[i], dims[j], 2, 1024, &s, err, sizeof err) != 0) { CHECKF(0, "%s", err); continue; }
                mine = llm_bits_steady(&s);
                theirs = kvq_config_bits_per_element(&s.cfg);
                CHECKF(fabs(mine - theirs) < 1e-9, "%s head_dim %d: %g vs kvq %g", specs[i], dims[j], mine, theirs);
            }
        llm_parse_config("k2v2", 8, 4, 512, &s, err, sizeof err);
        CHECK(llm_bits_steady(&s) == 4.5);  /* keys 2 + 32/32, values 2 + 32/8 */
        llm_parse_config("k2v2", 16, 4, 256, &s, err, sizeof err);
        CHECK(llm_bits_steady(&s) == 3.5);
        llm_parse_config("k2v2g64", 128, 8, 4096, &s, err, sizeof err);
        CHECK(llm_bits_steady(&s) == 2.5);
    }
    CHECK(llm_count_predictions(1024, 512) == 1022 && llm_count_predictions(1024, 256) == 1020);
    CHECK(llm_count_predictions(1000, 512) == 998 && llm_count_predictions(1, 512) == 0 && llm_count_predictions(513, 512) == 511);
}

/* ---- (c) the model against the reference figures ---- */

static void model_checks(const char *name, const char *model, const char *tokens_path, double want_ce, int want_pred,
                         int deep)
{
    kvqd_checkpoint ck;
    char err[256];
    int *ids = NULL, n_ids = 0, rc, n_pred;
    llm_cache_spec fp32, fp16, q2, q4;
    llm_score_result r32, r16, r2, r4;
    float *ref;
    rc = kvqd_checkpoint_load(&ck, model, err, sizeof err);
    CHECKF(rc == KVQD_OK, "%s", err);
    if (rc != KVQD_OK) return;
    rc = kvqd_tokens_load(tokens_path, ck.cfg.vocab_size, &ids, &n_ids, err, sizeof err);
    CHECKF(rc == KVQD_OK, "%s", err);
    if (rc != KVQD_OK) { kvqd_checkpoint_free(&ck); return; }
    n_pred = llm_count_predictions(n_ids, ck.cfg.seq_len);
    CHECKF(n_pred == want_pred, "%s: %d predictions", name, n_pred);
    ref = (float *)calloc((size_t)n_pred * ck.cfg.vocab_size + 1, sizeof(float));
    memset(&r32, 0, sizeof r32); memset(&r16, 0, sizeof r16); memset(&r2, 0, sizeof r2); memset(&r4, 0, sizeof r4);
    llm_parse_config("fp32", ck.cfg.head_dim, ck.cfg.n_kv_heads, ck.cfg.seq_len, &fp32, err, sizeof err);
    llm_parse_config("k16v16", ck.cfg.head_dim, ck.cfg.n_kv_heads, ck.cfg.seq_len, &fp16, err, sizeof err);
    rc = llm_score(&ck, &fp32, ids, n_ids, NULL, ref, &r32, err, sizeof err);
    CHECKF(rc == 0, "%s", err);
    CHECKF(rc == 0 && fabs(r32.ce - want_ce) < 0.001 && r32.n_pred == want_pred,
           "%s fp32: %.4f nats/token over %d predictions, want %.4f over %d", name, r32.ce, r32.n_pred, want_ce, want_pred);
    printf("  %s fp32: %.4f nats/token (PPL %.3f) over %d predictions\n", name, r32.ce, r32.ppl, r32.n_pred);
    rc = llm_score(&ck, &fp16, ids, n_ids, ref, NULL, &r16, err, sizeof err);
    CHECKF(rc == 0 && fabs(r16.ppl / r32.ppl - 1.0) < 0.001 && r16.kl < 1e-4 && r16.kl >= 0.0,
           "%s k16v16: PPL %.4f vs fp32 %.4f, KL %.2e", name, r16.ppl, r32.ppl, r16.kl);
    CHECK(r16.bits_actual == 16.0);
    printf("  %s k16v16: PPL %.4f (%+.3f%%), KL %.2e\n", name, r16.ppl, 100.0 * (r16.ppl / r32.ppl - 1.0), r16.kl);
    if (deep) {
        /* quantized caches: finite, ordered, and 2-bit keys+values cost little with the residual window */
        llm_parse_config("k2v2", ck.cfg.head_dim, ck.cfg.n_kv_heads, ck.cfg.seq_len, &q2, err, sizeof err);
        llm_parse_config("k4v4", ck.cfg.head_dim, ck.cfg.n_kv_heads, ck.cfg.seq_len, &q4, err, sizeof err);
        CHECK(llm_score(&ck, &q2, ids, n_ids, ref, NULL, &r2, err, sizeof err) == 0);
        CHECK(llm_score(&ck, &q4, ids, n_ids, ref, NULL, &r4, err, sizeof err) == 0);
        CHECKF(r2.kl > r4.kl && r4.kl > r16.kl && r2.kl < 0.05, "KL k2v2 %.2e k4v4 %.2e k16v16 %.2e", r2.kl, r4.kl, r16.kl);
        CHECKF(fabs(r2.ce - r32.ce) < 0.02 * r32.ce, "k2v2 CE %.4f vs %.4f", r2.ce, r32.ce);
        printf("  %s k2v2: PPL %.4f (%+.3f%%), KL %.2e, %.2f bits/element actual\n", name, r2.ppl,
               100.0 * (r2.ppl / r32.ppl - 1.0), r2.kl, r2.bits_actual);
    }
    free(ref);
    free(ids);
    kvqd_checkpoint_free(&ck);
}

/* the kvq forward path and the fp32 path agree token by token on a short text */
static void forward_agreement(const char *model)
{
    kvqd_checkpoint ck;
    llm_cache_spec a, b;
    llm_run ra, rb;
    char err[256];
    int t, i, ok = 1;
    if (kvqd_checkpoint_load(&ck, model, err, sizeof err) != KVQD_OK) { CHECKF(0, "%s", err); return; }
    llm_parse_config("fp32", ck.cfg.head_dim, ck.cfg.n_kv_heads, ck.cfg.seq_len, &a, err, sizeof err);
    llm_parse_config("k16v16", ck.cfg.head_dim, ck.cfg.n_kv_heads, ck.cfg.seq_len, &b, err, sizeof err);
    CHECK(llm_run_init(&ra, &ck, &a, err, sizeof err) == 0);
    CHECK(llm_run_init(&rb, &ck, &b, err, sizeof err) == 0);
    for (t = 0; t < 40 && ok; t++) {
        int tok = t == 0 ? 1 : (int)(rnd() % (unsigned)ck.cfg.vocab_size);
        const float *la = llm_forward(&ra, tok, err, sizeof err), *lb = llm_forward(&rb, tok, err, sizeof err);
        double num = 0.0, den = 0.0;
        if (!la || !lb) { ok = 0; break; }
        for (i = 0; i < ck.cfg.vocab_size; i++) { num += (la[i] - lb[i]) * (double)(la[i] - lb[i]); den += (double)la[i] * la[i]; }
        if (!(num <= 1e-5 * den)) ok = 0;
    }
    CHECKF(ok, "fp32 and k16v16 logits diverge at token %d", t);
    /* a full window refuses one more token instead of writing past the end */
    ra.pos = ck.cfg.seq_len;
    CHECK(llm_forward(&ra, 1, err, sizeof err) == NULL);
    CHECK(llm_forward(&rb, -1, err, sizeof err) == NULL && llm_forward(&rb, ck.cfg.vocab_size, err, sizeof err) == NULL);
    llm_run_free(&ra);
    llm_run_free(&rb);
    kvqd_checkpoint_free(&ck);
}

/* a prompt through llm_prefill gives the logits of token-by-token exact attention (k16v16:
   the chunk attends itself in fp32); a draft cut with llm_run_truncate leaves caches and
   later logits bit-identical to a run that never saw it (salient tokens by attention, so
   the salience snapshots are used, and a key block leaves inside the draft) */
static void prefill_and_rollback(const char *model)
{
    kvqd_checkpoint ck;
    llm_cache_spec f32, f16, sal;
    llm_run ra, rb;
    char err[256];
    int ids[80], t, i, l, ok = 1, same = 1;
    const float *la, *lb;
    double num = 0.0, den = 0.0;
    if (kvqd_checkpoint_load(&ck, model, err, sizeof err) != KVQD_OK) { CHECKF(0, "%s", err); return; }
    for (t = 0; t < 80; t++) ids[t] = t == 0 ? 1 : (int)(rnd() % (unsigned)ck.cfg.vocab_size);
    llm_parse_config("fp32", ck.cfg.head_dim, ck.cfg.n_kv_heads, ck.cfg.seq_len, &f32, err, sizeof err);
    llm_parse_config("k16v16", ck.cfg.head_dim, ck.cfg.n_kv_heads, ck.cfg.seq_len, &f16, err, sizeof err);
    CHECK(llm_run_init(&ra, &ck, &f32, err, sizeof err) == 0 && llm_run_init(&rb, &ck, &f16, err, sizeof err) == 0);
    la = llm_prefill(&ra, ids, 20, err, sizeof err);
    lb = llm_prefill(&rb, ids, 20, err, sizeof err);
    CHECK(la && lb && ra.pos == 20 && rb.pos == 20);
    for (i = 0; la && lb && i < ck.cfg.vocab_size; i++) { num += (la[i] - lb[i]) * (double)(la[i] - lb[i]); den += (double)la[i] * la[i]; }
    CHECKF(la && lb && num <= 1e-6 * den, "prefill: k16v16 and fp32 logits differ (%.2e)", num / (den + 1e-30));
    CHECK(llm_prefill(&rb, ids, ck.cfg.seq_len, err, sizeof err) == NULL && rb.pos == 20); /* past the window */
    llm_run_free(&ra);
    llm_run_free(&rb);
    CHECK(llm_parse_config("k2v2r32x10", ck.cfg.head_dim, ck.cfg.n_kv_heads, ck.cfg.seq_len, &sal, err, sizeof err) == 0);
    CHECK(llm_run_init(&ra, &ck, &sal, err, sizeof err) == 0 && llm_run_init(&rb, &ck, &sal, err, sizeof err) == 0);
    ok = llm_prefill(&ra, ids, 10, err, sizeof err) && llm_prefill(&rb, ids, 10, err, sizeof err);
    for (t = 10; ok && t < 62; t++) ok = llm_forward(&ra, ids[t], err, sizeof err) && llm_forward(&rb, ids[t], err, sizeof err);
    for (t = 0; ok && t < 8; t++) ok = llm_forward(&ra, (int)(rnd() % (unsigned)ck.cfg.vocab_size), err, sizeof err) != NULL;
    ok = ok && llm_run_truncate(&ra, 62, err, sizeof err) == 0 && ra.pos == 62;
    CHECK(llm_run_truncate(&ra, 63, err, sizeof err) != 0 && llm_run_truncate(&ra, -1, err, sizeof err) != 0);
    for (t = 62; ok && t < 80; t++) {
        ok = (la = llm_forward(&ra, ids[t], err, sizeof err)) && (lb = llm_forward(&rb, ids[t], err, sizeof err));
        same = same && ok && memcmp(la, lb, (size_t)ck.cfg.vocab_size * sizeof(float)) == 0;
    }
    for (l = 0; ok && l < ck.cfg.n_layers; l++) {
        size_t na = kvq_cache_serialized_bytes(ra.caches[l]), nb = kvq_cache_serialized_bytes(rb.caches[l]);
        unsigned char *ia = (unsigned char *)malloc(na), *ib = (unsigned char *)malloc(nb);
        same = same && ia && ib && na == nb && kvq_cache_serialize(ra.caches[l], ia, na, NULL) == KVQ_OK &&
               kvq_cache_serialize(rb.caches[l], ib, nb, NULL) == KVQ_OK && memcmp(ia, ib, na) == 0;
        free(ia);
        free(ib);
    }
    CHECKF(ok && same, "rollback: a run that drafted and cut differs from one that never drafted (%s)", ok ? "state" : err);
    llm_run_free(&ra);
    llm_run_free(&rb);
    kvqd_checkpoint_free(&ck);
}

/* ---- (d) the KV dumper: llm_dump against the model's own forward pass ---- */

/* largest |a - b| over n floats, and the largest |b| into *bmax */
static double max_diff(const float *a, const float *b, size_t n, double *bmax)
{
    double mx = 0.0;
    size_t i;
    *bmax = 0.0;
    for (i = 0; i < n; i++) {
        double d = fabs((double)a[i] - (double)b[i]);
        if (d > mx) mx = d;
        if (fabs((double)b[i]) > *bmax) *bmax = fabs((double)b[i]);
    }
    return mx;
}

/* x [heads][D] rotated in double at pos: channels (2i, 2i+1) by pos * 10000^(-2i/D) */
static void rope_double(double *x, int heads, int D, int pos)
{
    int h, i;
    for (h = 0; h < heads; h++)
        for (i = 0; i < D / 2; i++) {
            double a = pos * pow(10000.0, -2.0 * i / D), c = cos(a), sn = sin(a);
            double x0 = x[h * D + 2 * i], x1 = x[h * D + 2 * i + 1];
            x[h * D + 2 * i] = x0 * c - x1 * sn;
            x[h * D + 2 * i + 1] = x0 * sn + x1 * c;
        }
}

/* row t of a dump tensor [heads][n_tokens][D] gathered into out [heads][D] */
static void gather(const kvqd_dump *d, int layer, int bit, int heads, int t, double *out)
{
    const float *x = kvqd_dump_tensor(d, layer, bit);
    int h, c;
    for (h = 0; h < heads; h++)
        for (c = 0; c < d->head_dim; c++) out[h * d->head_dim + c] = x[((size_t)h * d->n_tokens + t) * d->head_dim + c];
}

/* Dumps the first 40 tokens in windows of 16 (two full windows and a part) and checks the
   header; Kpost and V against the fp32 run's own caches (same code: equal bits); layer 0's
   Kpre, V and Qpre recomputed in double from the weights; Kpost = RoPE(Kpre) and
   Qpost = RoPE(Qpre) in double at position t % 16 in every layer (a dump that kept counting
   positions across windows fails here). With shared_kvd, the whole text is dumped as it
   was and compared with it: float rounding only (1e-5 of each tensor's largest value). */
static void dump_checks(const char *name, const char *model, const char *tokens_path, const char *shared_kvd)
{
    enum { N = 40, WIN = 16 };
    kvqd_checkpoint ck;
    kvqd_dump d, e;
    llm_cache_spec spec;
    llm_run run;
    char err[256] = "";
    int *ids = NULL, n_ids = 0, rc, t, l, h, i, bad_cache = 0, bad_rope = 0, bad_l0 = 0;
    double *ref = NULL, *got = NULL, *xn = NULL, worst_rope = 0.0, worst_l0 = 0.0;
    const kvqd_llama_config *p;
    rc = kvqd_checkpoint_load(&ck, model, err, sizeof err);
    CHECKF(rc == KVQD_OK, "%s", err);
    if (rc != KVQD_OK) return;
    p = &ck.cfg;
    rc = kvqd_tokens_load(tokens_path, p->vocab_size, &ids, &n_ids, err, sizeof err);
    CHECKF(rc == KVQD_OK && n_ids >= N, "%s", err);
    if (rc != KVQD_OK || n_ids < N) { free(ids); kvqd_checkpoint_free(&ck); return; }

    /* arguments it refuses, leaving *d safe to free */
    CHECK(llm_dump(&ck, ids, N, p->seq_len + 1, KVQD_ALL_TENSORS, &d, err, sizeof err) != 0 && d.data == NULL);
    CHECK(llm_dump(&ck, ids, N, -1, KVQD_ALL_TENSORS, &d, err, sizeof err) != 0 && d.data == NULL);
    CHECK(llm_dump(&ck, ids, N, WIN, 0, &d, err, sizeof err) != 0 && d.data == NULL);
    CHECK(llm_dump(&ck, ids, 0, WIN, KVQD_ALL_TENSORS, &d, err, sizeof err) != 0 && d.data == NULL);
    i = ids[5];
    ids[5] = p->vocab_size;
    CHECK(llm_dump(&ck, ids, N, WIN, KVQD_ALL_TENSORS, &d, err, sizeof err) != 0 && d.data == NULL);
    ids[5] = i;
    kvqd_dump_free(&d);

    rc = llm_dump(&ck, ids, N, WIN, KVQD_ALL_TENSORS, &d, err, sizeof err);
    CHECKF(rc == 0, "%s: llm_dump: %s", name, err);
    if (rc != 0) { free(ids); kvqd_checkpoint_free(&ck); return; }
    CHECK(d.version == 1 && d.header_bytes == 88 && d.n_layers == p->n_layers && d.n_heads == p->n_heads);
    CHECK(d.n_kv_heads == p->n_kv_heads && d.head_dim == p->head_dim && d.n_tokens == N && d.window == WIN);
    CHECK(d.tensor_mask == KVQD_ALL_TENSORS && d.dim == p->dim && d.vocab_size == p->vocab_size && d.seq_len == p->seq_len);
    CHECK(d.rope_style == 0 && d.rope_theta == 10000.0f);
    for (t = 0; t < N; t++) if (d.tokens[t] != ids[t]) break;
    CHECKF(t == N, "%s: dump token %d differs", name, t);
    /* what kvq_eval reads: the written file loads back, every byte the same */
    CHECK(kvqd_dump_write(&d, tmp_path("gen.kvd"), err, sizeof err) == KVQD_OK);
    rc = kvqd_dump_load(&e, tmp_path("gen.kvd"), err, sizeof err);
    CHECKF(rc == KVQD_OK, "%s", err);
    if (rc == KVQD_OK) {
        CHECK(e.n_data_floats == d.n_data_floats && memcmp(e.data, d.data, d.n_data_floats * sizeof(float)) == 0);
        CHECK(e.n_tokens == N && memcmp(e.tokens, d.tokens, (size_t)N * 4) == 0 && e.window == WIN);
        kvqd_dump_free(&e);
    }

    /* Kpost and V: the fp32 run's caches at the end of each window */
    llm_parse_config("fp32", p->head_dim, p->n_kv_heads, p->seq_len, &spec, err, sizeof err);
    rc = llm_run_init(&run, &ck, &spec, err, sizeof err);
    CHECKF(rc == 0, "%s", err);
    for (t = 0; rc == 0 && t < N; t++) {
        int w0 = t - t % WIN, pos;
        if (t == w0) llm_run_reset(&run);
        if (!llm_forward(&run, ids[t], err, sizeof err)) { CHECKF(0, "%s", err); break; }
        if (t + 1 < N && (t + 1) % WIN != 0) continue;
        for (l = 0; l < p->n_layers; l++)
            for (pos = 0; pos <= t - w0; pos++)
                for (h = 0; h < p->n_kv_heads; h++) {
                    size_t c = ((size_t)l * p->seq_len + pos) * p->kv_dim + (size_t)h * p->head_dim;
                    size_t o = ((size_t)h * N + w0 + pos) * p->head_dim;
                    if (memcmp(run.key_cache + c, kvqd_dump_tensor(&d, l, KVQD_KPOST) + o, (size_t)p->head_dim * 4) != 0 ||
                        memcmp(run.value_cache + c, kvqd_dump_tensor(&d, l, KVQD_V) + o, (size_t)p->head_dim * 4) != 0)
                        bad_cache++;
                }
    }
    if (rc == 0) llm_run_free(&run);
    CHECKF(bad_cache == 0, "%s: %d Kpost/V rows differ from the fp32 run's caches", name, bad_cache);

    /* layer 0 from the weights, RoPE in every layer, in double */
    ref = (double *)malloc((size_t)p->dim * sizeof(double));
    got = (double *)malloc((size_t)p->dim * sizeof(double));
    xn = (double *)malloc((size_t)p->dim * sizeof(double));
    if (!ref || !got || !xn) { CHECK(0); goto done; }
    for (t = 0; t < N; t++) {
        static const int bits[3] = { KVQD_QPRE, KVQD_KPRE, KVQD_V };
        const float *emb = ck.w.token_embedding + (size_t)ids[t] * p->dim;
        double ss = 0.0;
        int b;
        for (i = 0; i < p->dim; i++) ss += (double)emb[i] * emb[i];
        ss = 1.0 / sqrt(ss / p->dim + 1e-5);
        for (i = 0; i < p->dim; i++) xn[i] = ck.w.rms_att[i] * ss * emb[i];
        for (b = 0; b < 3; b++) {
            const float *W = bits[b] == KVQD_QPRE ? ck.w.wq : bits[b] == KVQD_KPRE ? ck.w.wk : ck.w.wv;
            int rows = bits[b] == KVQD_QPRE ? p->dim : p->kv_dim, r, j;
            double scale = 0.0;
            gather(&d, 0, bits[b], rows / p->head_dim, t, got);
            for (r = 0; r < rows; r++) {
                double acc = 0.0;
                for (j = 0; j < p->dim; j++) acc += (double)W[(size_t)r * p->dim + j] * xn[j];
                ref[r] = acc;
                if (fabs(acc) > scale) scale = fabs(acc);
            }
            for (r = 0; r < rows; r++) {
                double e1 = fabs(got[r] - ref[r]) / (scale > 1.0 ? scale : 1.0);
                if (e1 > worst_l0) worst_l0 = e1;
                if (e1 > 1e-5) bad_l0++;
            }
        }
        for (l = 0; l < p->n_layers; l++)
            for (b = 0; b < 2; b++) {
                int heads = b ? p->n_kv_heads : p->n_heads, r, n = heads * p->head_dim;
                double scale = 0.0;
                gather(&d, l, b ? KVQD_KPRE : KVQD_QPRE, heads, t, ref);
                rope_double(ref, heads, p->head_dim, t % WIN);
                gather(&d, l, b ? KVQD_KPOST : KVQD_QPOST, heads, t, got);
                for (r = 0; r < n; r++) if (fabs(ref[r]) > scale) scale = fabs(ref[r]);
                for (r = 0; r < n; r++) {
                    double e1 = fabs(got[r] - ref[r]) / (scale > 1.0 ? scale : 1.0);
                    if (e1 > worst_rope) worst_rope = e1;
                    if (e1 > 1e-5) bad_rope++;
                }
            }
    }
    CHECKF(bad_l0 == 0, "%s: %d layer-0 Q/K/V values differ from the weights' product (worst %.2e)", name, bad_l0, worst_l0);
    CHECKF(bad_rope == 0, "%s: %d Kpost/Qpost values are not RoPE(pre) at t %% %d (worst %.2e)", name, bad_rope, WIN, worst_rope);
    printf("  %s dump: layer-0 Q/K/V vs double %.1e, RoPE(pre) vs post %.1e (relative)\n", name, worst_l0, worst_rope);

    /* the shared dump of the same text, regenerated */
    if (shared_kvd) {
        rc = kvqd_dump_load(&e, shared_kvd, err, sizeof err);
        CHECKF(rc == KVQD_OK, "%s", err);
        if (rc == KVQD_OK) {
            kvqd_dump g;
            int *all = (int *)malloc((size_t)e.n_tokens * sizeof(int));
            for (t = 0; all && t < e.n_tokens; t++) all[t] = e.tokens[t];
            CHECKF(same_ids(all, e.n_tokens, ids, n_ids), "%s differs from %s's ids", tokens_path, shared_kvd);
            rc = all ? llm_dump(&ck, all, e.n_tokens, e.window, e.tensor_mask, &g, err, sizeof err) : -1;
            CHECKF(rc == 0, "%s", err);
            if (rc == 0) {
                int bit;
                printf("  %s: regenerated against %s, max |diff| per tensor:", name, shared_kvd);
                CHECK(g.n_data_floats == e.n_data_floats && g.window == e.window && g.dim == e.dim && g.seq_len == e.seq_len);
                for (bit = 1; bit <= KVQD_QPRE && g.n_data_floats == e.n_data_floats; bit <<= 1) {
                    double worst = 0.0, top = 0.0, bm;
                    if (!(e.tensor_mask & bit)) continue;
                    for (l = 0; l < e.n_layers; l++) {
                        double m = max_diff(kvqd_dump_tensor(&g, l, bit), kvqd_dump_tensor(&e, l, bit),
                                            kvqd_dump_tensor_floats(&e, bit), &bm);
                        if (m > worst) worst = m;
                        if (bm > top) top = bm;
                    }
                    printf(" %.1e", worst);
                    CHECKF(worst <= 1e-5 * top, "%s tensor %d: max |diff| %.3e, largest value %.3e", name, bit, worst, top);
                }
                printf("\n");
                kvqd_dump_free(&g);
            }
            free(all);
            kvqd_dump_free(&e);
        }
    }
done:
    free(ref); free(got); free(xn);
    kvqd_dump_free(&d);
    free(ids);
    kvqd_checkpoint_free(&ck);
}

int main(void)
{
    const char *tmp = getenv("TMPDIR"), *shared = getenv("KVQ_SHARED_DATA");
    char p_model[600], p_tok[600], p_tokens[600], p_bmodel[600], p_btok[600], p_bkvd[600], err[256];
    int i, have_shared, have_bshared;

    snprintf(g_dir, sizeof g_dir, "%s/kvq_test_examples_XXXXXX", tmp && *tmp ? tmp : "/tmp");
    if (!mkdtemp(g_dir)) { fprintf(stderr, "cannot create a temp dir under %s\n", tmp ? tmp : "/tmp"); return 2; }

    printf("readers: checkpoint\n");
    test_checkpoint();
    printf("readers: tokenizer\n");
    test_tokenizer();
    printf("readers: KVDUMP01 round trip and bad dumps\n");
    test_dump();
    test_tokens_file();
    printf("config strings\n");
    test_configs();

    if (!shared || !*shared) shared = "../shared/data";
    snprintf(p_model, sizeof p_model, "%s/stories260K.bin", shared);
    snprintf(p_tok, sizeof p_tok, "%s/tok512.bin", shared);
    snprintf(p_tokens, sizeof p_tokens, "%s/stories260K_gen.kvd", shared);
    have_shared = file_exists(p_model) && file_exists(p_tokens) && file_exists(p_tok);
    printf("model: stories260K from %s\n", have_shared ? shared : "examples/data (bundled)");
    if (!have_shared) {
        snprintf(p_model, sizeof p_model, "examples/data/stories260K.bin");
        snprintf(p_tok, sizeof p_tok, "examples/data/tok512.bin");
        snprintf(p_tokens, sizeof p_tokens, "examples/data/stories260K_gen.tokens");
    }
    {
        int *ids = NULL, n = 0;
        if (kvqd_tokens_load(p_tokens, 512, &ids, &n, err, sizeof err) == KVQD_OK) {
            test_real_tokenizer(p_tok, 512, ids, n, "Once upon a time, there was a big dog. The dog lived in a tree.");
            free(ids);
        } else {
            CHECKF(0, "%s", err);
        }
    }
    model_checks("stories260K", p_model, p_tokens, 1.2912, 1022, 1);
    forward_agreement(p_model);
    prefill_and_rollback(p_model);
    if (have_shared) {
        /* the bundled copies are the shared files */
        int *a = NULL, *b = NULL, na = 0, nb = 0;
        size_t n1 = 0, n2 = 0;
        unsigned char *x = read_bytes(p_model, &n1), *y = read_bytes("examples/data/stories260K.bin", &n2);
        CHECKF(x && y && n1 == n2 && memcmp(x, y, n1) == 0, "examples/data/stories260K.bin differs from %s", p_model);
        free(x); free(y);
        CHECK(kvqd_tokens_load(p_tokens, 512, &a, &na, err, sizeof err) == KVQD_OK);
        CHECK(kvqd_tokens_load("examples/data/stories260K_gen.tokens", 512, &b, &nb, err, sizeof err) == KVQD_OK);
        CHECKF(a && b && same_ids(a, na, b, nb), "examples/data/stories260K_gen.tokens differs from the dump's ids");
        free(a); free(b);
    }
    printf("kvdump: stories260K\n");
    dump_checks("stories260K", "examples/data/stories260K.bin", "examples/data/stories260K_gen.tokens",
                have_shared ? p_tokens : NULL);

    /* babyllama105: bundled too; the shared copies, when there, must be the same files */
    snprintf(p_bmodel, sizeof p_bmodel, "%s/babyllama_tok105_model5000.bin", shared);
    snprintf(p_btok, sizeof p_btok, "%s/tok105.bin", shared);
    snprintf(p_bkvd, sizeof p_bkvd, "%s/babyllama105_gen.kvd", shared);
    have_bshared = file_exists(p_bmodel) && file_exists(p_btok) && file_exists(p_bkvd);
    if (have_bshared) {
        static const char *const pairs[2][2] = { { "babyllama_tok105_model5000.bin", "examples/data/babyllama_tok105_model5000.bin" },
                                                 { "tok105.bin", "examples/data/tok105.bin" } };
        int *a = NULL, *b = NULL, na = 0, nb = 0;
        for (i = 0; i < 2; i++) {
            char sp[700];
            size_t n1 = 0, n2 = 0;
            unsigned char *x, *y;
            snprintf(sp, sizeof sp, "%s/%s", shared, pairs[i][0]);
            x = read_bytes(sp, &n1);
            y = read_bytes(pairs[i][1], &n2);
            CHECKF(x && y && n1 == n2 && memcmp(x, y, n1) == 0, "%s differs from %s", pairs[i][1], sp);
            free(x); free(y);
        }
        CHECK(kvqd_tokens_load(p_bkvd, 105, &a, &na, err, sizeof err) == KVQD_OK);
        CHECK(kvqd_tokens_load("examples/data/babyllama105_gen.tokens", 105, &b, &nb, err, sizeof err) == KVQD_OK);
        CHECKF(a && b && same_ids(a, na, b, nb), "examples/data/babyllama105_gen.tokens differs from the dump's ids");
        free(a); free(b);
    }
    printf("model: babyllama105 from examples/data (bundled)%s\n", have_bshared ? ", compared with the shared copies" : "");
    {
        int *ids = NULL, n = 0;
        if (kvqd_tokens_load("examples/data/babyllama105_gen.tokens", 105, &ids, &n, err, sizeof err) == KVQD_OK) {
            test_real_tokenizer("examples/data/tok105.bin", 105, ids, n, "Once upon a time, there was a little girl named Lily.");
            free(ids);
        } else {
            CHECKF(0, "%s", err);
        }
    }
    model_checks("babyllama105", "examples/data/babyllama_tok105_model5000.bin", "examples/data/babyllama105_gen.tokens",
                 0.5325, 1020, 1);
    if (have_bshared) {
        kvqd_dump d;
        int rc = kvqd_dump_load(&d, p_bkvd, err, sizeof err);
        CHECKF(rc == KVQD_OK && d.n_tokens == 1024 && d.window == 256 && d.head_dim == 16, "%s", err);
        if (rc == KVQD_OK) kvqd_dump_free(&d);
    } else {
        printf("skipped: %s not found (the bundled babyllama105 files are not compared with it)\n", shared);
    }
    printf("kvdump: babyllama105\n");
    dump_checks("babyllama105", "examples/data/babyllama_tok105_model5000.bin", "examples/data/babyllama105_gen.tokens",
                have_bshared ? p_bkvd : NULL);

    for (i = 0; i < g_n_files; i++) remove(g_files[i]);
    rmdir(g_dir);
    printf("%d passed, %d failed\n", g_pass, g_fail);
    return g_fail ? 1 : 0;
}
