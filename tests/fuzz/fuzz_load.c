/* libFuzzer target: load a mutated image, then use the cache. A cache is built by appending
   (config, tokens and kvq_attention calls from the input, so salience is recorded), serialized,
   and a few payload bytes are overwritten at input-chosen offsets (fp16 Inf/NaN, float NaN,
   any byte). kvq_cache_deserialize must then refuse the image with KVQ_ERR_CORRUPT and leave
   the caller's memory untouched, or accept it; an accepted image must behave like one that
   appending produced: more appends through the quantizer, kvq_attention with real queries,
   kvq_attention_partial over token and KV-head ranges merged by kvq_attention_merge, and
   kvq_cache_read all give finite numbers, and the merged partials match kvq_attention.
   Built with -DKVQ_RUNTIME_DISPATCH the input also picks the ISA (scalar, AVX2, AVX-512). */
#define KVQ_IMPLEMENTATION
#include "../../kvq.h"
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define FILL 0xa5 /* the caller's memory before a load */

typedef struct reader { const uint8_t *p; size_t n, at; } reader;
static unsigned next(reader *r) { return r->at < r->n ? r->p[r->at++] : 0u; }
static unsigned next16(reader *r) {
    unsigned lo = next(r);
    return lo | next(r) << 8;
}

static void fail(const char *why) {
    fprintf(stderr, "fuzz_load: %s\n", why);
    abort();
}

/* xorshift32: token and query values come from a seed in the input, not a byte each */
static uint32_t rng(uint32_t *s) {
    uint32_t x = *s;
    x ^= x << 13;
    x ^= x >> 17;
    x ^= x << 5;
    return *s = x;
}
static float unit(uint32_t *s) { return (float)(rng(s) >> 8) * (2.0f / 16777216.0f) - 1.0f; } /* [-1, 1) */

/* A valid config from a few bytes: every feature, and sizes small enough for many runs a second. */
static kvq_config pick_config(reader *r) {
    static const int wide[] = {72, 80, 88, 96, 104, 112, 120, 128, 136, 160, 192, 200, 256, 320, 448, 512};
    static const int bits[] = {2, 3, 4, 8, 16, 2, 4, 8};
    static const int groups[] = {16, 32, 64, 128};
    static const float ratios[] = {0.05f, 0.1f, 0.25f, 0.6f};
    unsigned b = next(r), mode, shape;
    int D = b < 224 ? 8 * (1 + (int)(b % 8)) : wide[(b - 224) % 16]; /* mostly small: runs per second */
    int H = 1 + (int)(next(r) % 3);
    int max_tokens = 1 + (int)(next16(r) % 320);
    kvq_config cfg = kvq_default_config(D, H, max_tokens);
    b = next(r);
    cfg.key_bits = bits[b & 7];
    cfg.value_bits = bits[(b >> 3) & 7];
    shape = next(r);
    cfg.group_size = groups[shape & 3];
    cfg.key_block = 0;         /* blocks of G and fp16 value params unless the bytes below say */
    cfg.value_param_bits = 32; /* otherwise (not the default's b64 p16 every time) */
    cfg.sink_tokens = (int)((shape >> 4) & 7) < max_tokens ? (int)((shape >> 4) & 7) : max_tokens;
    if (shape & 128 && cfg.value_bits <= 3) cfg.value_param_bits = 16;
    mode = next(r);
    if (mode & 1) { /* salient tokens with a side store (not with per-token keys: unsupported) */
        cfg.salient_ratio = ratios[(mode >> 3) & 3];
        cfg.salient_bits = mode & 32 ? 16 : 8;
        cfg.salient_policy = mode & 64 ? KVQ_SALIENT_ERROR : KVQ_SALIENT_ATTENTION;
    } else if (mode & 4) {
        cfg.key_axis = KVQ_KEYS_PER_TOKEN;
    }
    if (mode & 2) cfg.rotation = mode & 128 ? KVQ_ROTATE_PREROTATED : KVQ_ROTATE_HADAMARD;
    b = next(r);
    cfg.seed = 0x9e3779b9u * (1u + b);
    cfg.range_search = b % 4 == 0 ? 0 : b % 4 == 1 ? 8 : 4; /* min/max, the widest search, the default */
    if (b & 16) cfg.key_block = groups[(b >> 5) & 3]; /* key blocks apart from the value groups */
    cfg.residual_tokens = (cfg.key_block ? cfg.key_block : cfg.group_size) * (int)(((shape >> 2) & 3) % 3);
    return cfg;
}

/* n rows of D floats that appending accepts: |x| <= 65504, and with the cache's own rotation
   each row's L2 norm <= 65504. A class byte picks the magnitude (constant rows, tiny, large,
   one outlier channel, ...). */
static void fill_rows(float *x, size_t rows, int D, int rotated, reader *r) {
    static const float amps[] = {0.0f, 1e-4f, 0.5f, 4.0f, 60.0f, 1000.0f, 65504.0f, 1.0f};
    uint32_t s = 0x2545f491u * (1u + next(r));
    unsigned cls = next(r) % 8;
    float amp = amps[cls];
    size_t i;
    int ch;
    if (rotated && amp * sqrtf((float)D) > 65000.0f) amp = 65000.0f / sqrtf((float)D);
    for (i = 0; i < rows; i++) {
        float *row = x + i * (size_t)D;
        if (cls == 0) { /* constant rows: zero ranges */
            float v = (float)(int)(rng(&s) % 9) - 4.0f;
            for (ch = 0; ch < D; ch++) row[ch] = v;
            continue;
        }
        for (ch = 0; ch < D; ch++) row[ch] = amp * unit(&s);
        if (cls == 7) row[rng(&s) % (uint32_t)D] = rotated ? 60000.0f : -65504.0f; /* an outlier */
    }
}

/* Appends up to n tokens (clipped to the room left); appending valid rows cannot fail. */
static void append_tokens(kvq_cache *c, int n, reader *r) {
    const kvq_config *cfg = kvq_cache_config(c);
    size_t row = (size_t)cfg->n_kv_heads * cfg->head_dim;
    float *k, *v;
    if (n > cfg->max_tokens - kvq_cache_tokens(c)) n = cfg->max_tokens - kvq_cache_tokens(c);
    if (n <= 0) return;
    k = (float *)malloc((size_t)n * row * sizeof(float));
    v = (float *)malloc((size_t)n * row * sizeof(float));
    if (!k || !v) abort();
    fill_rows(k, (size_t)n * cfg->n_kv_heads, cfg->head_dim, cfg->rotation == KVQ_ROTATE_HADAMARD, r);
    fill_rows(v, (size_t)n * cfg->n_kv_heads, cfg->head_dim, cfg->rotation == KVQ_ROTATE_HADAMARD, r);
    if (kvq_cache_append(c, k, v, n) != KVQ_OK) fail("append of valid rows refused");
    free(k);
    free(v);
}

static void check_finite(const float *x, size_t n, const char *what) {
    size_t i;
    for (i = 0; i < n; i++)
        if (!isfinite(x[i])) {
            fprintf(stderr, "fuzz_load: %s[%zu] = %g\n", what, i, (double)x[i]);
            fail("non-finite output");
        }
}

/* Reads back every token; all finite. Returns the largest |v| (for the tolerance below). */
static float read_all(const kvq_cache *c) {
    const kvq_config *cfg = kvq_cache_config(c);
    size_t n = (size_t)kvq_cache_tokens(c) * cfg->n_kv_heads * cfg->head_dim, i;
    float *k, *v, vmax = 0.0f;
    if (n == 0) return 0.0f;
    k = (float *)malloc(n * sizeof(float));
    v = (float *)malloc(n * sizeof(float));
    if (!k || !v) abort();
    if (kvq_cache_read(c, 0, kvq_cache_tokens(c), k, v) != KVQ_OK) fail("read refused");
    check_finite(k, n, "read k");
    check_finite(v, n, "read v");
    for (i = 0; i < n; i++) vmax = fabsf(v[i]) > vmax ? fabsf(v[i]) : vmax;
    free(k);
    free(v);
    return vmax;
}

/* Query shape and values from the input: 1-4 queries, GQA groups of 1-3, real queries. */
typedef struct query { kvq_attn_params ap; float *q; size_t n; } query;
static void pick_query(const kvq_cache *c, reader *r, query *qy) {
    static const float amps[] = {0.01f, 0.3f, 1.0f, 3.0f, 20.0f};
    static const float scales[] = {0.0f, 0.05f, 0.5f, 1.0f};
    const kvq_config *cfg = kvq_cache_config(c);
    unsigned b = next(r);
    uint32_t s = 0x68e31da4u * (1u + next(r));
    float amp = amps[next(r) % 5];
    int T = kvq_cache_tokens(c);
    size_t i;
    qy->ap.n_q_heads = cfg->n_kv_heads * (1 + (int)(b % 3));
    qy->ap.n_queries = 1 + (int)((b >> 2) % 4) < T ? 1 + (int)((b >> 2) % 4) : T;
    qy->ap.scale = scales[(b >> 4) & 3];
    qy->n = (size_t)qy->ap.n_queries * qy->ap.n_q_heads * cfg->head_dim;
    qy->q = (float *)malloc(qy->n * sizeof(float));
    if (!qy->q) abort();
    for (i = 0; i < qy->n; i++) {
        qy->q[i] = amp * unit(&s);
        if (qy->q[i] == 0.0f) qy->q[i] = amp;
    }
}

/* kvq_attention into out (n floats), checked finite. */
static float *attend(kvq_cache *c, const query *qy) {
    float *out = (float *)malloc(qy->n * sizeof(float));
    if (!out) abort();
    if (kvq_attention(c, qy->q, out, &qy->ap) != KVQ_OK) fail("attention refused");
    check_finite(out, qy->n, "attention");
    return out;
}

/* kvq_attention, then the same query as partial calls over token ranges (one state each) and
   KV-head ranges (inside a state), plus maybe an empty state, merged: finite, and close to
   kvq_attention. The partials tile the tokens from other starting points and merge their
   softmax sums in another order: float rounding differs, values are weighted averages, so
   the gap is bounded by a small multiple of the largest |v| (vmax), not of the output
   (which may cancel to ~0). */
static void attend_and_split(kvq_cache *c, reader *r) {
    const kvq_config *cfg = kvq_cache_config(c);
    const int T = kvq_cache_tokens(c), H = cfg->n_kv_heads;
    int cut[6], n_cuts = 1 + (int)(next(r) % 4), extra = (int)(next(r) & 1), n_states, i, j;
    float *states[6], *merged, *out, omax = 0.0f, diff = 0.0f, vmax = 0.0f, tol = 1e-3f, vtol = 1e-4f;
    size_t sf, e;
    query qy;
    if (T == 0) return;
    pick_query(c, r, &qy);
    out = attend(c, &qy);
    /* token cuts 0 = cut[0] <= cut[1] <= ... <= cut[n_cuts] = T */
    cut[0] = 0;
    cut[n_cuts] = T;
    for (i = 1; i < n_cuts; i++) cut[i] = (int)(next16(r) % (unsigned)(T + 1));
    for (i = 1; i < n_cuts; i++) /* insertion sort of cut[1..n_cuts-1] */
        for (j = i; j > 1 && cut[j - 1] > cut[j]; j--) {
            int t = cut[j];
            cut[j] = cut[j - 1];
            cut[j - 1] = t;
        }
    sf = kvq_attention_state_floats(c, &qy.ap);
    if (sf == 0) fail("state_floats is 0");
    n_states = n_cuts + extra;
    for (i = 0; i < n_states; i++) {
        int h0 = 0;
        states[i] = (float *)malloc(sf * sizeof(float));
        if (!states[i]) abort();
        memset(states[i], 0xff, sf * sizeof(float)); /* NaN garbage: state_init must clear it */
        if (kvq_attention_state_init(c, &qy.ap, states[i]) != KVQ_OK) fail("state_init refused");
        if (i == n_cuts) break; /* the extra state stays empty: it must count for nothing */
        while (h0 < H) {
            int h1 = h0 + 1 + (int)(next(r) % (unsigned)(H - h0));
            if (kvq_attention_partial(c, qy.q, &qy.ap, cut[i], cut[i + 1], h0, h1, states[i]) != KVQ_OK)
                fail("partial refused");
            h0 = h1;
        }
    }
    merged = (float *)malloc(qy.n * sizeof(float));
    if (!merged) abort();
    if (kvq_attention_merge(c, &qy.ap, (const float *const *)states, n_states, merged) != KVQ_OK)
        fail("merge refused");
    check_finite(merged, qy.n, "merged partials");
    for (e = 0; e < qy.n; e++) {
        float d = fabsf(merged[e] - out[e]);
        diff = d > diff ? d : diff;
        omax = fabsf(out[e]) > omax ? fabsf(out[e]) : omax;
    }
    /* reading back (slow with rotation) only when the output-relative bound does not hold; the
       integer kernels quantize softmax weights per run of a tile, so cuts inside a tile move the
       output by up to their contract (1e-4 squared, 1e-2 relative), not by rounding */
    if (kvq_integer_kernels()) tol = 3e-2f, vtol = 1e-2f;
    if (diff > tol * (1.0f + omax) && diff > tol * (1.0f + omax) + vtol * (vmax = read_all(c))) {
        fprintf(stderr, "fuzz_load: merged partials differ from attention by %g (max |out| %g, max |v| %g), "
                "%d tokens, %d cuts\n", (double)diff, (double)omax, (double)vmax, T, n_cuts);
        fail("partial + merge != attention");
    }
    for (i = 0; i < n_states; i++) free(states[i]);
    free(merged);
    free(out);
    free(qy.q);
}

/* Overwrites a few bytes of the payload: fp16 Inf/NaN/extremes, float NaN/Inf/negative,
   counts, or any bytes, at input-chosen offsets. */
static void mutate(uint8_t *pay, size_t n, reader *r) {
    static const uint16_t h16[] = {0x7c00, 0xfc00, 0x7e00, 0xfe00, 0x7c01, 0x7bff, 0xfbff, 0x0001, 0x8000, 0x3c00};
    static const uint32_t f32[] = {0x7fc00000u, 0x7f800000u, 0xff800000u, 0xffc00000u,
                                   0xbf800000u, 0x7f7fffffu, 0xffffffffu, 0x00000001u};
    int count = (int)(next(r) % 9), i, b;
    for (i = 0; i < count && n > 0; i++) {
        size_t at = ((size_t)next(r) | (size_t)next(r) << 8 | (size_t)next(r) << 16) % n;
        unsigned kind = next(r), v = next16(r);
        uint32_t bytes;
        int width;
        switch (kind % 4) {
        case 0: bytes = v & 0xffu; width = 1; break;
        case 1: bytes = h16[v % 10]; width = 2; break;
        case 2: bytes = f32[v % 8]; width = 4; break;
        default: bytes = v; width = 2; break;
        }
        for (b = 0; b < width && at + (size_t)b < n; b++) pay[at + (size_t)b] = (uint8_t)(bytes >> 8 * b);
    }
}

#ifndef FUZZING_BUILD_MODE_UNSAFE_FOR_PRODUCTION
/* A build that checks checksums (a plain reproduction) needs them to match the mutated bytes. */
static uint32_t crc32c(const uint8_t *p, size_t n) {
    uint32_t crc = 0xffffffffu;
    size_t i;
    int b;
    for (i = 0; i < n; i++) {
        crc ^= p[i];
        for (b = 0; b < 8; b++) crc = (crc >> 1) ^ (0x82f63b78u & (0u - (crc & 1u)));
    }
    return ~crc;
}
static void put32(uint8_t *p, uint32_t v) {
    int b;
    for (b = 0; b < 4; b++) p[b] = (uint8_t)(v >> 8 * b);
}
#endif

/* The image without its two checksums (at KVQ__H_PAYLOAD_CRC and KVQ__H_CRC) equals the other one. */
static int same_image(const uint8_t *a, const uint8_t *b, size_t n) {
    const size_t pc = KVQ__H_PAYLOAD_CRC, hb = KVQ__HEADER_BYTES;
    return memcmp(a, b, pc) == 0 && memcmp(a + pc + 4, b + pc + 4, KVQ__H_CRC - pc - 4) == 0 &&
           memcmp(a + hb, b + hb, n - hb) == 0;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);
int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    static const kvq_isa isas[] = {KVQ_ISA_SCALAR, KVQ_ISA_AVX2, KVQ_ISA_AVX512, KVQ_ISA_NEON};
    reader r;
    kvq_config cfg;
    kvq_cache *c = NULL, *c2;
    uint8_t *mem, *mem2, *img, *orig, *again;
    size_t need, n_img, w = 0, i;
    unsigned isa;
    int chunks, steps, changed;
    kvq_status st;
    r.p = data;
    r.n = size;
    r.at = 0;
    isa = next(&r);
    if (kvq_set_isa(isas[isa & 3]) != KVQ_OK) (void)kvq_set_isa(KVQ_ISA_SCALAR); /* for building */
    cfg = pick_config(&r);
    need = kvq_cache_bytes(&cfg);
    if (need == 0) fail("picked config refused");
    mem = (uint8_t *)malloc(need);
    mem2 = (uint8_t *)malloc(need);
    if (!mem || !mem2 || kvq_cache_init(&c, &cfg, mem, need) != KVQ_OK) abort();

    /* build: chunks of tokens, each maybe followed by attention (salience with the attention policy) */
    chunks = (int)(next(&r) % 6);
    for (i = 0; i < (size_t)chunks; i++) {
        unsigned b = next(&r);
        append_tokens(c, (int)(next(&r) % 128) + (b & 2 ? 128 : 0), &r);
        if ((b & 1) && kvq_cache_tokens(c) > 0) {
            query qy;
            pick_query(c, &r, &qy);
            free(attend(c, &qy));
            free(qy.q);
        }
    }

    /* serialize, mutate the payload, load into memory full of FILL */
    n_img = kvq_cache_serialized_bytes(c);
    img = (uint8_t *)malloc(n_img);
    orig = (uint8_t *)malloc(n_img);
    again = (uint8_t *)malloc(n_img);
    if (!img || !orig || !again) abort();
    if (kvq_cache_serialize(c, img, n_img, &w) != KVQ_OK || w != n_img) fail("serialize failed");
    memcpy(orig, img, n_img);
    mutate(img + KVQ__HEADER_BYTES, n_img - KVQ__HEADER_BYTES, &r);
    changed = memcmp(img, orig, n_img) != 0;
#ifndef FUZZING_BUILD_MODE_UNSAFE_FOR_PRODUCTION
    put32(img + KVQ__H_PAYLOAD_CRC, crc32c(img + KVQ__HEADER_BYTES, n_img - KVQ__HEADER_BYTES));
    put32(img + KVQ__H_CRC, crc32c(img, KVQ__H_CRC));
#endif
    if (kvq_set_isa(isas[(isa >> 2) & 3]) != KVQ_OK) (void)kvq_set_isa(KVQ_ISA_SCALAR); /* for the load */
    (void)kvq_set_arith((isa >> 5) & 1 ? KVQ_ARITH_FLOAT : KVQ_ARITH_AUTO); /* and the attention after it */
    memset(mem2, FILL, need);
    c2 = c; /* a refused load leaves *out as it was */
    if ((isa >> 4) & 1) { /* into a capacity between the tokens held (or the sinks) and the image's */
        const int lo = kvq_cache_tokens(c) > cfg.sink_tokens ? kvq_cache_tokens(c) : cfg.sink_tokens;
        const int cap = lo + (int)(next(&r) % (unsigned)(cfg.max_tokens - lo + 1));
        st = kvq_cache_load(&c2, img, n_img, cap > 0 ? cap : 1, mem2, need);
        if (st == KVQ_OK && kvq_cache_config(c2)->max_tokens != (cap > 0 ? cap : 1)) fail("load kept another capacity");
    } else {
        st = kvq_cache_deserialize(&c2, img, n_img, mem2, need);
    }
    if (st != KVQ_OK) {
        if (st != KVQ_ERR_CORRUPT) fail("a refused image gave a status other than KVQ_ERR_CORRUPT");
        if (!changed) fail("an unchanged image was refused");
        if (c2 != c) fail("a refused load wrote *out");
        for (i = 0; i < need; i++)
            if (mem2[i] != FILL) fail("a refused load wrote the caller's memory");
        goto done;
    }
    if (kvq_cache_tokens(c2) != kvq_cache_tokens(c)) fail("loaded token count differs");
    /* an accepted image serializes back to the same bytes (checksums aside: a fuzzing build has stale ones) */
    if (kvq_cache_serialize(c2, again, n_img, &w) != KVQ_OK || w != n_img) fail("reserialize failed");
    memcpy(again + 24, img + 24, 4); /* the capacity, when it was loaded into another one */
    if (!same_image(again, img, n_img)) fail("reserialized image differs");
    if (!changed) { /* unchanged: the first and last tokens read back as the original's, bit for bit
                       (not all: reading a rotated cache costs many runs a second) */
        static float a[2 * 4 * 3 * 512], b[2 * 4 * 3 * 512]; /* 4 tokens, 3 heads of 512 */
        const int T = kvq_cache_tokens(c), n = T < 4 ? T : 4;
        const size_t m = (size_t)n * cfg.n_kv_heads * cfg.head_dim;
        int pass;
        for (pass = 0; pass < 2 && n > 0; pass++) {
            int first = pass ? T - n : 0;
            if (kvq_cache_read(c, first, n, a, a + m) != KVQ_OK || kvq_cache_read(c2, first, n, b, b + m) != KVQ_OK ||
                memcmp(a, b, 2 * m * sizeof(float)) != 0)
                fail("loaded cache reads back differently");
        }
    }

    /* use it: appends, attention and split attention, reads; then a last check of everything */
    steps = 1 + (int)(next(&r) % 4);
    for (i = 0; i < (size_t)steps; i++) {
        unsigned op = next(&r) % 3;
        if (op == 0) append_tokens(c2, (int)(next(&r) % 160), &r);
        else if (op == 1) attend_and_split(c2, &r);
        else (void)read_all(c2);
    }
    attend_and_split(c2, &r);
    (void)read_all(c2);
done:
    free(img);
    free(orig);
    free(again);
    free(mem);
    free(mem2);
    return 0;
}
