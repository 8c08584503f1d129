/* kvq_cuda.h against kvq.h: identical inputs go to the CPU cache and the GPU cache; the
   GPU cache must serialize to the same bytes, and GPU attention must match CPU attention
   within a normalized MSE of 1e-6. Without a CUDA device it prints
   "skipped: no CUDA device", then "0 passed, 0 failed", and exits 0. */
#define KVQ_IMPLEMENTATION
#define KVQ_CUDA_IMPLEMENTATION
#include "kvq_cuda.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "test_util.h" /* the CHECK harness every kvq test uses */

#define CUDA_OK(x)                                                                 \
    do {                                                                           \
        cudaError_t e_ = (x);                                                      \
        if (e_ != cudaSuccess) {                                                   \
            fprintf(stderr, "%s:%d: %s: %s\n", __FILE__, __LINE__, #x, cudaGetErrorString(e_)); \
            exit(2);                                                               \
        }                                                                          \
    } while (0)

/* ---- deterministic data ------------------------------------------------------ */

static uint64_t rng_state = 0x1234567887654321ull;
static uint32_t rnd(void) { /* xorshift64* */
    rng_state ^= rng_state >> 12;
    rng_state ^= rng_state << 25;
    rng_state ^= rng_state >> 27;
    return (uint32_t)((rng_state * 0x2545f4914f6cdd1dull) >> 32);
}
static float uniform(void) { return ((float)rnd() + 0.5f) * (1.0f / 4294967296.0f); }
static float gauss(void) {
    float u = uniform(), v = uniform();
    return sqrtf(-2.0f * logf(u)) * cosf(6.2831853f * v);
}

/* Tokens [n][H][D] with what real caches and edge cases have: per-channel offsets and
   outlier channels, constant channels (zero range), zeros of both signs, exact fp16 grid
   values (quantization ties), huge and tiny magnitudes. big: the rare huge value; keys use
   a moderate one, since a score of 10^4 turns float rounding into visible softmax error. */
static void fill_kv(float *x, int n, int H, int D, int salt, float big) {
    int t, h, d;
    for (t = 0; t < n; t++)
        for (h = 0; h < H; h++)
            for (d = 0; d < D; d++) {
                float *o = &x[((size_t)t * H + h) * D + d];
                int kind = (d * 7 + h * 3 + salt) % 11;
                float g = gauss();
                switch (kind) {
                case 0: *o = 0.25f * (float)(d % 5) + 8.0f * g; break;          /* outlier channel */
                case 1: *o = 1.5f; break;                                     /* constant channel */
                case 2: *o = (rnd() & 1) ? 0.0f : -0.0f; break;               /* signed zeros */
                case 3: *o = (float)((int)(rnd() % 7) - 3) * 0.5f; break;     /* on a grid: ties */
                case 4: *o = 1e-6f * g; break;                                /* fp16 subnormals */
                case 5: *o = (t % 97 == 5) ? big * (g > 0 ? 1.0f : -1.0f) : g; break; /* rare huge values */
                default: *o = g + 0.1f * (float)(d % 3);
                }
            }
}

static void fill_q(float *x, size_t n) {
    size_t i;
    for (i = 0; i < n; i++) x[i] = gauss();
}

/* ---- comparisons -------------------------------------------------------------- */

static unsigned char *cpu_image(const kvq_cache *c, size_t *n) {
    unsigned char *buf;
    *n = kvq_cache_serialized_bytes(c);
    buf = (unsigned char *)malloc(*n);
    if (!buf || kvq_cache_serialize(c, buf, *n, NULL) != KVQ_OK) { free(buf); return NULL; }
    return buf;
}

static unsigned char *gpu_image(const kvq_cuda_cache *c, size_t *n) {
    unsigned char *buf;
    *n = kvq_cuda_cache_serialized_bytes(c);
    buf = (unsigned char *)malloc(*n);
    if (!buf || kvq_cuda_cache_serialize(c, buf, *n, NULL, 0) != KVQ_OK) { free(buf); return NULL; }
    return buf;
}

/* 1 when both caches serialize to the same bytes; reports the first difference. */
static int same_bytes(const kvq_cache *cpu, const kvq_cuda_cache *gpu, const char *what) {
    size_t na, nb, i;
    unsigned char *a = cpu_image(cpu, &na), *b = gpu_image(gpu, &nb);
    int ok = a && b && na == nb && memcmp(a, b, na) == 0;
    if (!ok) {
        if (!a || !b) fprintf(stderr, "  %s: serialize failed (cpu %p gpu %p)\n", what, (void *)a, (void *)b);
        else if (na != nb) fprintf(stderr, "  %s: image sizes %zu (cpu) vs %zu (gpu)\n", what, na, nb);
        else {
            size_t diff = 0, first = 0;
            for (i = 0; i < na; i++)
                if (a[i] != b[i]) { if (!diff) first = i; diff++; }
            fprintf(stderr, "  %s: %zu of %zu bytes differ, first at %zu (cpu %02x gpu %02x)\n", what, diff, na,
                    first, a[first], b[first]);
        }
    }
    free(a);
    free(b);
    return ok;
}

static double nmse(const float *ref, const float *x, size_t n) {
    double num = 0.0, den = 0.0;
    size_t i;
    for (i = 0; i < n; i++) {
        double d = (double)x[i] - (double)ref[i];
        num += d * d;
        den += (double)ref[i] * ref[i];
    }
    if (!(num == num)) return 1e30; /* NaN */
    return den > 0.0 ? num / den : num;
}

/* GPU attention vs CPU attention for the current state; returns the NMSE. */
static double attention_nmse(kvq_cache *cpu, kvq_cuda_cache *gpu, int n_q_heads, int n_queries) {
    const kvq_config *cfg = kvq_cache_config(cpu);
    size_t n = (size_t)n_queries * n_q_heads * cfg->head_dim;
    float *q = (float *)malloc(n * sizeof(float)), *o_cpu = (float *)malloc(n * sizeof(float));
    float *o_gpu = (float *)malloc(n * sizeof(float)), *d_q, *d_o;
    kvq_attn_params ap;
    kvq_status s1, s2;
    double e;
    ap.n_q_heads = n_q_heads;
    ap.n_queries = n_queries;
    ap.scale = 0.0f;
    fill_q(q, n);
    CUDA_OK(cudaMalloc((void **)&d_q, n * sizeof(float)));
    CUDA_OK(cudaMalloc((void **)&d_o, n * sizeof(float)));
    CUDA_OK(cudaMemcpy(d_q, q, n * sizeof(float), cudaMemcpyHostToDevice));
    s1 = kvq_attention(cpu, q, o_cpu, &ap);
    s2 = kvq_cuda_attention(gpu, d_q, d_o, &ap, 0);
    CUDA_OK(cudaDeviceSynchronize());
    CUDA_OK(cudaMemcpy(o_gpu, d_o, n * sizeof(float), cudaMemcpyDeviceToHost));
    e = (s1 == KVQ_OK && s2 == KVQ_OK) ? nmse(o_cpu, o_gpu, n) : 1e30;
    if (s1 != KVQ_OK || s2 != KVQ_OK) fprintf(stderr, "  attention status cpu %d gpu %d\n", (int)s1, (int)s2);
    cudaFree(d_q);
    cudaFree(d_o);
    free(q);
    free(o_cpu);
    free(o_gpu);
    return e;
}

/* ---- one config ---------------------------------------------------------------- */

typedef struct test_case {
    int D, H, ratio, kbits, vbits, G, R, S, tokens;
} test_case;

static void describe(char *buf, size_t n, const test_case *tc) {
    snprintf(buf, n, "D=%d H=%d gqa=%d K%d/V%d G=%d R=%d S=%d N=%d", tc->D, tc->H, tc->ratio, tc->kbits, tc->vbits,
             tc->G, tc->R, tc->S, tc->tokens);
}

static void run_case(const test_case *tc, int salt) {
    kvq_config cfg = kvq_default_config(tc->D, tc->H, tc->tokens + 8);
    kvq_cache *cpu = NULL, *back = NULL;
    kvq_cuda_cache *gpu = NULL, *up = NULL;
    static const int sched[] = {1, 3, 17, 1, 64, 5, 129, 2, 250, 31, 1, 400};
    char name[160];
    float *k, *v, *d_k, *d_v;
    int done = 0, step = 0, max_chunk = 400;
    kvq_status st;
    cfg.key_bits = tc->kbits;
    cfg.value_bits = tc->vbits;
    cfg.group_size = tc->G;
    cfg.residual_tokens = tc->R;
    cfg.sink_tokens = tc->S;
    describe(name, sizeof name, tc);
    st = kvq_cache_create(&cpu, &cfg);
    CHECK(st == KVQ_OK, "%s: cpu create %d", name, (int)st);
    st = kvq_cuda_cache_create(&gpu, &cfg);
    CHECK(st == KVQ_OK, "%s: gpu create %d", name, (int)st);
    if (!cpu || !gpu) { kvq_cache_destroy(cpu); kvq_cuda_cache_destroy(gpu); return; }
    k = (float *)malloc((size_t)max_chunk * tc->H * tc->D * sizeof(float));
    v = (float *)malloc((size_t)max_chunk * tc->H * tc->D * sizeof(float));
    CUDA_OK(cudaMalloc((void **)&d_k, (size_t)max_chunk * tc->H * tc->D * sizeof(float)));
    CUDA_OK(cudaMalloc((void **)&d_v, (size_t)max_chunk * tc->H * tc->D * sizeof(float)));
    while (done < tc->tokens) {
        int n = sched[(step + salt) % (int)(sizeof sched / sizeof sched[0])];
        kvq_status s1, s2;
        if (n > tc->tokens - done) n = tc->tokens - done;
        fill_kv(k, n, tc->H, tc->D, salt + step, 600.0f);
        fill_kv(v, n, tc->H, tc->D, salt + step + 5, 6.0e4f);
        CUDA_OK(cudaMemcpy(d_k, k, (size_t)n * tc->H * tc->D * sizeof(float), cudaMemcpyHostToDevice));
        CUDA_OK(cudaMemcpy(d_v, v, (size_t)n * tc->H * tc->D * sizeof(float), cudaMemcpyHostToDevice));
        s1 = kvq_cache_append(cpu, k, v, n);
        s2 = kvq_cuda_cache_append(gpu, d_k, d_v, n, 0);
        CHECK(s1 == KVQ_OK && s2 == KVQ_OK, "%s: append %d tokens at %d: cpu %d gpu %d", name, n, done, (int)s1, (int)s2);
        done += n;
        step++;
        if (step % 3 == 0 || done == tc->tokens) {
            char what[200];
            snprintf(what, sizeof what, "%s after %d tokens", name, done);
            CHECK(same_bytes(cpu, gpu, what), "%s: cache bytes differ", what);
            CHECK(kvq_cuda_cache_tokens(gpu) == kvq_cache_tokens(cpu), "%s: token counts", what);
            CHECK(kvq_cuda_cache_payload_bytes(gpu) == kvq_cache_payload_bytes(cpu), "%s: payload bytes", what);
        }
        if (step % 4 == 1 || done == tc->tokens) {
            int nq = done >= 3 ? 1 + (step % 3) : 1;
            double e = attention_nmse(cpu, gpu, tc->H * tc->ratio, nq);
            CHECK(e < 1e-6, "%s: attention NMSE %.3g at %d tokens, %d queries", name, e, done, nq);
        }
    }
    /* download into a fresh CPU cache, and upload the CPU cache into a fresh GPU cache */
    st = kvq_cache_create(&back, &cfg);
    if (st == KVQ_OK) st = kvq_cuda_cache_download(gpu, back, 0);
    CHECK(st == KVQ_OK, "%s: download %d", name, (int)st);
    if (st == KVQ_OK) {
        size_t na, nb;
        unsigned char *a = cpu_image(cpu, &na), *b = cpu_image(back, &nb);
        CHECK(a && b && na == nb && memcmp(a, b, na) == 0, "%s: downloaded cache differs", name);
        free(a);
        free(b);
    }
    st = kvq_cuda_cache_create(&up, &cfg);
    if (st == KVQ_OK) st = kvq_cuda_cache_upload(up, cpu, 0);
    CHECK(st == KVQ_OK, "%s: upload %d", name, (int)st);
    if (st == KVQ_OK) {
        /* the uploaded cache keeps going exactly like the CPU one (rings included) */
        int n = 8 < (int)cfg.max_tokens - done ? 8 : (int)cfg.max_tokens - done;
        CHECK(same_bytes(cpu, up, name), "%s: uploaded cache differs", name);
        fill_kv(k, n, tc->H, tc->D, salt + 99, 600.0f);
        fill_kv(v, n, tc->H, tc->D, salt + 98, 6.0e4f);
        CUDA_OK(cudaMemcpy(d_k, k, (size_t)n * tc->H * tc->D * sizeof(float), cudaMemcpyHostToDevice));
        CUDA_OK(cudaMemcpy(d_v, v, (size_t)n * tc->H * tc->D * sizeof(float), cudaMemcpyHostToDevice));
        CHECK(kvq_cache_append(cpu, k, v, n) == KVQ_OK && kvq_cuda_cache_append(up, d_k, d_v, n, 0) == KVQ_OK,
              "%s: append after upload", name);
        CHECK(same_bytes(cpu, up, name), "%s: cache after upload + append differs", name);
        CHECK(attention_nmse(cpu, up, tc->H * tc->ratio, 2) < 1e-6, "%s: attention after upload", name);
    }
    cudaFree(d_k);
    cudaFree(d_v);
    free(k);
    free(v);
    kvq_cache_destroy(cpu);
    kvq_cache_destroy(back);
    kvq_cuda_cache_destroy(gpu);
    kvq_cuda_cache_destroy(up);
}

/* ---- error paths and the image functions ------------------------------------------ */

static void test_errors(void) {
    kvq_config cfg = kvq_default_config(64, 2, 40);
    kvq_cuda_cache *g = NULL;
    kvq_cache *cpu = NULL;
    float *k = (float *)calloc(50 * 2 * 64, sizeof(float)), *d_k, *d_v, *d_q, *d_o;
    size_t n_before, n_after;
    unsigned char *before, *after;
    kvq_attn_params ap = {4, 1, 0.0f};
    kvq_config bad = cfg;
    cfg.residual_tokens = 0;
    cfg.group_size = 16;
    CHECK(kvq_cuda_cache_create(NULL, &cfg) == KVQ_ERR_INVALID, "create(NULL)");
    bad.key_bits = 5;
    CHECK(kvq_cuda_cache_create(&g, &bad) == KVQ_ERR_UNSUPPORTED, "bits 5");
    bad = cfg;
    bad.salient_ratio = 0.1f;
    CHECK(kvq_cuda_cache_create(&g, &bad) == KVQ_ERR_UNSUPPORTED, "salient tokens");
    bad = cfg;
    bad.rotation = 7;
    CHECK(kvq_cuda_cache_create(&g, &bad) == KVQ_ERR_INVALID, "rotation 7");
    bad = cfg;
    bad.head_dim = 12;
    CHECK(kvq_cuda_cache_create(&g, &bad) == KVQ_ERR_INVALID, "head_dim 12");
    CHECK(kvq_cuda_cache_create(&g, &cfg) == KVQ_OK, "create");
    CHECK(kvq_cache_create(&cpu, &cfg) == KVQ_OK, "cpu create");
    if (!g || !cpu) return;
    CUDA_OK(cudaMalloc((void **)&d_k, 50 * 2 * 64 * sizeof(float)));
    CUDA_OK(cudaMalloc((void **)&d_v, 50 * 2 * 64 * sizeof(float)));
    CUDA_OK(cudaMalloc((void **)&d_q, 4 * 64 * sizeof(float)));
    CUDA_OK(cudaMalloc((void **)&d_o, 4 * 64 * sizeof(float)));
    fill_kv(k, 50, 2, 64, 3, 600.0f);
    CUDA_OK(cudaMemcpy(d_k, k, 50 * 2 * 64 * sizeof(float), cudaMemcpyHostToDevice));
    CUDA_OK(cudaMemcpy(d_v, k, 50 * 2 * 64 * sizeof(float), cudaMemcpyHostToDevice));
    CUDA_OK(cudaMemcpy(d_q, k, 4 * 64 * sizeof(float), cudaMemcpyHostToDevice));
    CHECK(kvq_cuda_attention(g, d_q, d_o, &ap, 0) == KVQ_ERR_INVALID, "attention on an empty cache");
    CHECK(kvq_cuda_cache_append(g, d_k, d_v, -1, 0) == KVQ_ERR_INVALID, "n < 0");
    CHECK(kvq_cuda_cache_append(g, NULL, d_v, 1, 0) == KVQ_ERR_INVALID, "NULL k");
    CHECK(kvq_cuda_cache_append(g, d_k, d_v, 0, 0) == KVQ_OK, "n = 0");
    CHECK(kvq_cuda_cache_append(g, d_k, d_v, 41, 0) == KVQ_ERR_FULL, "over capacity");
    CHECK(kvq_cuda_cache_append(g, d_k, d_v, 20, 0) == KVQ_OK, "append 20");
    CHECK(kvq_cache_append(cpu, k, k, 20) == KVQ_OK, "cpu append 20");
    CHECK(kvq_cuda_cache_append(g, d_k, d_v, 21, 0) == KVQ_ERR_FULL, "21 more is over capacity");
#ifndef KVQ_CUDA_UNCHECKED_APPEND
    {
        float bad_vals[3] = {NAN, INFINITY, 70000.0f};
        int b;
        before = gpu_image(g, &n_before);
        for (b = 0; b < 3; b++) {
            /* a bad value in the last token of the value input: nothing may be appended */
            CUDA_OK(cudaMemcpy(d_v + 3 * 2 * 64 - 1, &bad_vals[b], sizeof(float), cudaMemcpyHostToDevice));
            CHECK(kvq_cuda_cache_append(g, d_k, d_v, 3, 0) == KVQ_ERR_INVALID, "bad value %d", b);
            CHECK(kvq_cuda_cache_tokens(g) == 20, "tokens after a rejected append");
        }
        after = gpu_image(g, &n_after);
        CHECK(before && after && n_before == n_after && memcmp(before, after, n_before) == 0,
              "a rejected append changed the cache");
        free(before);
        free(after);
        CUDA_OK(cudaMemcpy(d_v, k, 50 * 2 * 64 * sizeof(float), cudaMemcpyHostToDevice));
    }
#endif
    CHECK(same_bytes(cpu, g, "errors"), "cache after the error paths");
    ap.n_q_heads = 3;
    CHECK(kvq_cuda_attention(g, d_q, d_o, &ap, 0) == KVQ_ERR_INVALID, "n_q_heads not a multiple");
    ap.n_q_heads = 4;
    ap.n_queries = 21;
    CHECK(kvq_cuda_attention(g, d_q, d_o, &ap, 0) == KVQ_ERR_INVALID, "more queries than tokens");
    ap.n_queries = 1;
    CHECK(kvq_cuda_attention(g, NULL, d_o, &ap, 0) == KVQ_ERR_INVALID, "NULL q");
    CHECK(kvq_cuda_attention(g, d_q, d_o, &ap, 0) == KVQ_OK, "attention");
    /* image round trip through the device, and a config mismatch */
    {
        size_t n;
        unsigned char *img = gpu_image(g, &n);
        kvq_cuda_cache *g2 = NULL;
        kvq_config other = cfg;
        CHECK(img != NULL, "gpu image");
        CHECK(kvq_cuda_cache_create(&g2, &cfg) == KVQ_OK, "create g2");
        if (img && g2) {
            CHECK(kvq_cuda_cache_deserialize(g2, img, n, 0) == KVQ_OK, "deserialize");
            CHECK(same_bytes(cpu, g2, "deserialized"), "deserialized image differs");
            img[n - 1] ^= 1;
            CHECK(kvq_cuda_cache_deserialize(g2, img, n, 0) == KVQ_ERR_CORRUPT, "corrupt image");
        }
        kvq_cuda_cache_destroy(g2);
        other.max_tokens = 41;
        g2 = NULL;
        CHECK(kvq_cuda_cache_create(&g2, &other) == KVQ_OK, "create other");
        CHECK(kvq_cuda_cache_upload(g2, cpu, 0) == KVQ_ERR_INVALID, "upload with another config");
        kvq_cuda_cache_destroy(g2);
        free(img);
    }
    kvq_cuda_cache_reset(g);
    CHECK(kvq_cuda_cache_tokens(g) == 0 && kvq_cuda_cache_payload_bytes(g) == 0, "reset");
    kvq_cuda_cache_destroy(g);
    kvq_cuda_cache_destroy(NULL);
    kvq_cache_destroy(cpu);
    cudaFree(d_k);
    cudaFree(d_v);
    cudaFree(d_q);
    cudaFree(d_o);
    free(k);
}

/* Several sequences of different lengths in one batched launch, against the CPU one by one. */
static void test_batch(void) {
    enum { NS = 3, D = 64, H = 2, QH = 8, MAXN = 700 };
    static const int lens[NS] = {700, 33, 300};
    kvq_cache *cpu[NS];
    kvq_cuda_cache *gpu[NS];
    float *k = (float *)malloc((size_t)MAXN * H * D * sizeof(float)), *v = (float *)malloc((size_t)MAXN * H * D * sizeof(float));
    float *q[NS], *o_cpu = (float *)malloc(QH * D * sizeof(float)), *o_gpu = (float *)malloc(QH * D * sizeof(float));
    float *d_k, *d_v, *d_q[NS], *d_o[NS];
    kvq_attn_params ap = {QH, 1, 0.0f};
    int s;
    kvq_config cfg = kvq_default_config(D, H, MAXN);
    CUDA_OK(cudaMalloc((void **)&d_k, (size_t)MAXN * H * D * sizeof(float)));
    CUDA_OK(cudaMalloc((void **)&d_v, (size_t)MAXN * H * D * sizeof(float)));
    for (s = 0; s < NS; s++) {
        q[s] = (float *)malloc(QH * D * sizeof(float));
        fill_q(q[s], QH * D);
        CUDA_OK(cudaMalloc((void **)&d_q[s], QH * D * sizeof(float)));
        CUDA_OK(cudaMalloc((void **)&d_o[s], QH * D * sizeof(float)));
        CUDA_OK(cudaMemcpy(d_q[s], q[s], QH * D * sizeof(float), cudaMemcpyHostToDevice));
        fill_kv(k, lens[s], H, D, 10 + s, 600.0f);
        fill_kv(v, lens[s], H, D, 20 + s, 6.0e4f);
        CUDA_OK(cudaMemcpy(d_k, k, (size_t)lens[s] * H * D * sizeof(float), cudaMemcpyHostToDevice));
        CUDA_OK(cudaMemcpy(d_v, v, (size_t)lens[s] * H * D * sizeof(float), cudaMemcpyHostToDevice));
        CHECK(kvq_cache_create(&cpu[s], &cfg) == KVQ_OK && kvq_cuda_cache_create(&gpu[s], &cfg) == KVQ_OK, "batch create");
        CHECK(kvq_cache_append(cpu[s], k, v, lens[s]) == KVQ_OK, "batch cpu append");
        CHECK(kvq_cuda_cache_append(gpu[s], d_k, d_v, lens[s], 0) == KVQ_OK, "batch gpu append");
    }
    CHECK(kvq_cuda_attention_batch(gpu, NS, (const float *const *)d_q, d_o, &ap, 0) == KVQ_OK, "batch attention");
    CUDA_OK(cudaDeviceSynchronize());
    for (s = 0; s < NS; s++) {
        double e;
        CHECK(kvq_attention(cpu[s], q[s], o_cpu, &ap) == KVQ_OK, "cpu attention");
        CUDA_OK(cudaMemcpy(o_gpu, d_o[s], QH * D * sizeof(float), cudaMemcpyDeviceToHost));
        e = nmse(o_cpu, o_gpu, QH * D);
        CHECK(e < 1e-6, "batch sequence %d (N=%d): NMSE %.3g", s, lens[s], e);
        kvq_cache_destroy(cpu[s]);
        kvq_cuda_cache_destroy(gpu[s]);
        cudaFree(d_q[s]);
        cudaFree(d_o[s]);
        free(q[s]);
    }
    cudaFree(d_k);
    cudaFree(d_v);
    free(k);
    free(v);
    free(o_cpu);
    free(o_gpu);
}

/* 64K tokens, where rounding accumulates: only attention is compared (bytes are by then
   covered by the grid above). */
static void test_long(int kbits, int vbits) {
    test_case tc = {128, 2, 4, kbits, vbits, 32, 128, 4, 65536};
    kvq_config cfg = kvq_default_config(tc.D, tc.H, tc.tokens);
    kvq_cache *cpu = NULL;
    kvq_cuda_cache *gpu = NULL;
    const int chunk = 4096;
    float *k = (float *)malloc((size_t)chunk * tc.H * tc.D * sizeof(float)), *v = (float *)malloc((size_t)chunk * tc.H * tc.D * sizeof(float));
    float *d_k, *d_v;
    char name[160];
    int done;
    cfg.key_bits = kbits;
    cfg.value_bits = vbits;
    cfg.sink_tokens = tc.S;
    describe(name, sizeof name, &tc);
    CHECK(kvq_cache_create(&cpu, &cfg) == KVQ_OK && kvq_cuda_cache_create(&gpu, &cfg) == KVQ_OK, "%s: create", name);
    if (!cpu || !gpu) return;
    CUDA_OK(cudaMalloc((void **)&d_k, (size_t)chunk * tc.H * tc.D * sizeof(float)));
    CUDA_OK(cudaMalloc((void **)&d_v, (size_t)chunk * tc.H * tc.D * sizeof(float)));
    for (done = 0; done < tc.tokens; done += chunk) {
        fill_kv(k, chunk, tc.H, tc.D, done / chunk, 600.0f);
        fill_kv(v, chunk, tc.H, tc.D, done / chunk + 1, 6.0e4f);
        CUDA_OK(cudaMemcpy(d_k, k, (size_t)chunk * tc.H * tc.D * sizeof(float), cudaMemcpyHostToDevice));
        CUDA_OK(cudaMemcpy(d_v, v, (size_t)chunk * tc.H * tc.D * sizeof(float), cudaMemcpyHostToDevice));
        CHECK(kvq_cache_append(cpu, k, v, chunk) == KVQ_OK && kvq_cuda_cache_append(gpu, d_k, d_v, chunk, 0) == KVQ_OK,
              "%s: append", name);
    }
    CHECK(same_bytes(cpu, gpu, name), "%s: cache bytes differ", name);
    {
        double e = attention_nmse(cpu, gpu, tc.H * tc.ratio, 1);
        CHECK(e < 1e-6, "%s: attention NMSE %.3g", name, e);
        e = attention_nmse(cpu, gpu, tc.H * tc.ratio, 4);
        CHECK(e < 1e-6, "%s: attention NMSE %.3g (4 queries)", name, e);
    }
    cudaFree(d_k);
    cudaFree(d_v);
    free(k);
    free(v);
    kvq_cache_destroy(cpu);
    kvq_cuda_cache_destroy(gpu);
}

/* KVQ_ROTATE_HADAMARD on the GPU against kvq.h with KVQ_ROTATE_PREROTATED fed rows that
   kvq_hadamard() rotated on the host: the same payload bytes, and after rotating the
   CPU's output back with kvq_hadamard_inverse(), the same attention. Works while kvq.h's
   own config check still refuses KVQ_ROTATE_HADAMARD. */
static void rotate_rows(float *x, size_t rows, int D, unsigned seed, int inverse) {
    size_t r;
    for (r = 0; r < rows; r++) {
        if (inverse) kvq_hadamard_inverse(x + r * D, D, seed);
        else kvq_hadamard(x + r * D, D, seed);
    }
}

static void test_rotation(int D, int bits, int G, int S) {
    const int H = 2, ratio = 4, N = 400, QH = H * ratio;
    kvq_config cfg = kvq_default_config(D, H, N), pre;
    kvq_cache *cpu = NULL;
    kvq_cuda_cache *gpu = NULL;
    float *k = (float *)malloc((size_t)N * H * D * sizeof(float)), *v = (float *)malloc((size_t)N * H * D * sizeof(float));
    float *q = (float *)malloc((size_t)2 * QH * D * sizeof(float)), *qr = (float *)malloc((size_t)2 * QH * D * sizeof(float));
    float *o_cpu = (float *)malloc((size_t)2 * QH * D * sizeof(float)), *o_gpu = (float *)malloc((size_t)2 * QH * D * sizeof(float));
    float *d_k, *d_v, *d_q, *d_o;
    kvq_attn_params ap = {QH, 2, 0.0f};
    char name[96];
    int done = 0, n;
    kvq_status st;
    cfg.key_bits = cfg.value_bits = bits;
    cfg.group_size = G;
    cfg.sink_tokens = S;
    cfg.rotation = KVQ_ROTATE_HADAMARD;
    cfg.seed = 12345u + (unsigned)D;
    pre = cfg;
    pre.rotation = KVQ_ROTATE_PREROTATED;
    snprintf(name, sizeof name, "rotation D=%d bits=%d G=%d S=%d", D, bits, G, S);
    st = kvq_cuda_cache_create(&gpu, &cfg);
    CHECK(st == KVQ_OK, "%s: create %d", name, (int)st);
    CHECK(kvq_cache_create(&cpu, &pre) == KVQ_OK, "%s: cpu create", name);
    if (!gpu || !cpu) { kvq_cuda_cache_destroy(gpu); kvq_cache_destroy(cpu); return; }
    CUDA_OK(cudaMalloc((void **)&d_k, (size_t)N * H * D * sizeof(float)));
    CUDA_OK(cudaMalloc((void **)&d_v, (size_t)N * H * D * sizeof(float)));
    CUDA_OK(cudaMalloc((void **)&d_q, (size_t)2 * QH * D * sizeof(float)));
    CUDA_OK(cudaMalloc((void **)&d_o, (size_t)2 * QH * D * sizeof(float)));
    for (n = 1; done < N; n = n * 3 + 1) {
        if (n > N - done) n = N - done;
        fill_kv(k, n, H, D, done, 60.0f); /* rotation spreads a value over sqrt(D) channels: stay in fp16 */
        fill_kv(v, n, H, D, done + 1, 60.0f);
        CUDA_OK(cudaMemcpy(d_k, k, (size_t)n * H * D * sizeof(float), cudaMemcpyHostToDevice));
        CUDA_OK(cudaMemcpy(d_v, v, (size_t)n * H * D * sizeof(float), cudaMemcpyHostToDevice));
        CHECK(kvq_cuda_cache_append(gpu, d_k, d_v, n, 0) == KVQ_OK, "%s: gpu append", name);
        rotate_rows(k, (size_t)n * H, D, cfg.seed, 0);
        rotate_rows(v, (size_t)n * H, D, cfg.seed, 0);
        CHECK(kvq_cache_append(cpu, k, v, n) == KVQ_OK, "%s: cpu append", name);
        done += n;
    }
    {
        size_t ni, hdr, pay = kvq_cuda_cache_payload_bytes(gpu);
        unsigned char *img = cpu_image(cpu, &ni), *gp = (unsigned char *)malloc(pay + 1);
        hdr = img ? ((size_t)img[12] | (size_t)img[13] << 8 | (size_t)img[14] << 16 | (size_t)img[15] << 24) : 0;
        CHECK(img && gp && kvq__cu_payload(gpu, kvq_cuda_cache_tokens(gpu), gp, 1, 0) == KVQ_OK, "%s: payloads", name);
        CHECK(img && gp && ni - hdr == pay && memcmp(img + hdr, gp, pay) == 0, "%s: rotated payload bytes differ", name);
        free(img);
        free(gp);
    }
    fill_q(q, (size_t)2 * QH * D);
    memcpy(qr, q, (size_t)2 * QH * D * sizeof(float));
    rotate_rows(qr, (size_t)2 * QH, D, cfg.seed, 0);
    CUDA_OK(cudaMemcpy(d_q, q, (size_t)2 * QH * D * sizeof(float), cudaMemcpyHostToDevice));
    CHECK(kvq_attention(cpu, qr, o_cpu, &ap) == KVQ_OK, "%s: cpu attention", name);
    rotate_rows(o_cpu, (size_t)2 * QH, D, cfg.seed, 1);
    CHECK(kvq_cuda_attention(gpu, d_q, d_o, &ap, 0) == KVQ_OK, "%s: gpu attention", name);
    CUDA_OK(cudaMemcpy(o_gpu, d_o, (size_t)2 * QH * D * sizeof(float), cudaMemcpyDeviceToHost));
    {
        double e = nmse(o_cpu, o_gpu, (size_t)2 * QH * D);
        CHECK(e < 1e-6, "%s: attention NMSE %.3g", name, e);
    }
    cudaFree(d_k);
    cudaFree(d_v);
    cudaFree(d_q);
    cudaFree(d_o);
    free(k);
    free(v);
    free(q);
    free(qr);
    free(o_cpu);
    free(o_gpu);
    kvq_cache_destroy(cpu);
    kvq_cuda_cache_destroy(gpu);
}

int main(int argc, char **argv) {
    static const int bits[][2] = {{2, 2}, {3, 3}, {4, 4}, {8, 8}, {16, 16}, {2, 16}, {16, 2}, {4, 2}, {3, 8}, {2, 4}};
    static const int gs[] = {16, 32, 64, 128};
    static const int dims[] = {8, 16, 40, 64, 80, 96, 112, 128, 136, 256};
    static const int heads[][2] = {{1, 1}, {2, 4}, {4, 2}, {1, 8}, {2, 12}, {3, 1}};
    int devices = 0, i, quick = argc > 1 && strcmp(argv[1], "--quick") == 0, n_cases = quick ? 40 : 240;
    cudaError_t e = cudaGetDeviceCount(&devices);
    if (e != cudaSuccess || devices == 0) {
        (void)cudaGetLastError();
        printf("skipped: no CUDA device\n");
        printf("0 passed, 0 failed\n"); /* the line tests/run_all.sh counts */
        return 0;
    }
    {
        cudaDeviceProp prop;
        if (cudaGetDeviceProperties(&prop, 0) == cudaSuccess) printf("device: %s (sm_%d%d)\n", prop.name, prop.major, prop.minor);
    }
    /* every bits pair, G and head_dim at least once, the rest of the grid sampled */
    for (i = 0; i < n_cases; i++) {
        test_case tc;
        int b = i % 10, g = (i / 10 + i) % 4, d = (i * 3 + i / 40) % 10, hh = (i * 5 + i / 10) % 6;
        tc.D = dims[d];
        tc.kbits = bits[b][0];
        tc.vbits = bits[b][1];
        tc.G = gs[g];
        tc.H = heads[hh][0];
        tc.ratio = heads[hh][1];
        tc.R = (i / 2) % 2 ? 128 : 0;
        tc.S = (i / 4) % 3 == 0 ? 0 : (i % 7) + 1;
        tc.tokens = 200 + (int)(rnd() % 500);
        run_case(&tc, i);
    }
    test_errors();
    test_batch();
    {
        static const int rdims[] = {8, 64, 72, 80, 96, 112, 128, 160, 256};
        for (i = 0; i < (int)(sizeof rdims / sizeof rdims[0]); i++)
            test_rotation(rdims[i], i % 3 == 2 ? 16 : (i % 2 ? 4 : 2), i % 2 ? 32 : 16, i % 3);
    }
    test_long(2, 2);
    if (!quick) {
        test_long(4, 4);
        test_long(16, 16);
    }
    return tu_finish("test_cuda");
}
