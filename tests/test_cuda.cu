/* kvq_cuda.h against kvq.h: identical inputs go to the CPU cache and the GPU cache; the
   GPU cache must serialize to the same bytes, and GPU attention must match CPU attention
   within a normalized MSE of 1e-6. Salient caches whose attention scores were tracked are
   the one exception: the tracked float scores may differ in the last bits (device expf,
   another summation order), so they are compared within a tolerance and every other byte
   exactly. Without a CUDA device it prints "skipped: no CUDA device", then
   "0 passed, 0 failed", and exits 0. */
#define KVQ_IMPLEMENTATION
#define KVQ_CUDA_IMPLEMENTATION
#include "kvq_cuda.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "test_util.h" /* the CHECK harness every kvq test uses */
#include "hostile.h"   /* hostile re-sealed images */

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
    e = (s1 == KVQ_OK && s2 == KVQ_OK) ? tu_nmse(o_gpu, o_cpu, n) : 1e30;
    if (s1 != KVQ_OK || s2 != KVQ_OK) fprintf(stderr, "  attention status cpu %d gpu %d\n", (int)s1, (int)s2);
    cudaFree(d_q);
    cudaFree(d_o);
    free(q);
    free(o_cpu);
    free(o_gpu);
    return e;
}

/* Salient caches after attention with KVQ_SALIENT_ATTENTION: the seen counts of the waiting
   keys must be equal and their scores (sums of softmax probabilities) agree within 1e-3
   relative, the accuracy the attention check asks of the outputs (NMSE 1e-6), plus 1e-6 per
   query that saw the key (a probability below that is noise); then, with the CPU's scores
   put into a downloaded copy of the GPU cache, every byte must be equal. */
static int same_tracked(const kvq_cache *cpu, const kvq_cuda_cache *gpu, const char *what) {
    const kvq_config *cfg = kvq_cache_config(cpu);
    kvq_cache *back = NULL;
    int h, i, after = cpu->n_tokens > cfg->sink_tokens ? cpu->n_tokens - cfg->sink_tokens : 0, bad = 0, ok;
    size_t na, nb;
    unsigned char *a, *b;
    if (kvq_cache_create(&back, cfg) != KVQ_OK || kvq_cuda_cache_download(gpu, back, 0) != KVQ_OK) {
        fprintf(stderr, "  %s: download failed\n", what);
        kvq_cache_destroy(back);
        return 0;
    }
    if (back->n_kblocks != cpu->n_kblocks) after = 0; /* the image comparison below reports it */
    for (h = 0; h < cfg->n_kv_heads; h++)
        for (i = cpu->n_kblocks * cpu->kb; i < after; i++) {
            size_t slot = (size_t)h * cpu->kcap + (size_t)(i % cpu->kcap);
            float c = cpu->sal_score[slot], g = back->sal_score[slot];
            double tol = 1e-3 * fabs((double)c) + 1e-6 * cpu->sal_seen[slot];
            if (back->sal_seen[slot] != cpu->sal_seen[slot] || !(fabs((double)g - c) <= tol)) {
                if (!bad)
                    fprintf(stderr, "  %s: head %d waiting key %d: score %.9g (cpu) vs %.9g (gpu), seen %u vs %u\n",
                            what, h, i, c, g, cpu->sal_seen[slot], back->sal_seen[slot]);
                bad++;
            }
            back->sal_score[slot] = c;
        }
    a = cpu_image(cpu, &na);
    b = cpu_image(back, &nb);
    ok = !bad && a && b && na == nb && memcmp(a, b, na) == 0;
    if (!bad && !ok) {
        size_t k, diff = 0, first = 0;
        if (!a || !b || na != nb) fprintf(stderr, "  %s: images %zu vs %zu bytes\n", what, na, nb);
        else {
            for (k = 0; k < na; k++)
                if (a[k] != b[k]) { if (!diff) first = k; diff++; }
            fprintf(stderr, "  %s: %zu of %zu bytes differ (scores aside), first at %zu\n", what, diff, na, first);
        }
    }
    free(a);
    free(b);
    kvq_cache_destroy(back);
    return ok;
}

/* Attention on copies of both caches (through their images), so the originals record no
   salience: tracking is checked on the copies, while the originals keep choosing salient
   tokens by the range gain, which is bit-exact. Returns the NMSE. */
static double attention_on_copies(const kvq_cache *cpu, const kvq_cuda_cache *gpu, int n_q_heads, int n_queries,
                                  const char *what) {
    const kvq_config *cfg = kvq_cache_config(cpu);
    size_t na, nb, bytes = kvq_cache_bytes(cfg);
    unsigned char *a = cpu_image(cpu, &na), *b = gpu_image(gpu, &nb);
    void *mem = malloc(bytes);
    kvq_cache *cc = NULL;
    kvq_cuda_cache *gc = NULL;
    double e = 1e30;
    if (a && b && mem && kvq_cache_deserialize(&cc, a, na, mem, bytes) == KVQ_OK &&
        kvq_cuda_cache_create(&gc, cfg) == KVQ_OK && kvq_cuda_cache_deserialize(gc, b, nb, 0) == KVQ_OK) {
        e = attention_nmse(cc, gc, n_q_heads, n_queries);
        CHECK(same_tracked(cc, gc, what), "%s: tracked salience differs", what);
    } else {
        fprintf(stderr, "  %s: copies failed\n", what);
    }
    kvq_cuda_cache_destroy(gc);
    free(mem);
    free(a);
    free(b);
    return e;
}

/* ---- one config ---------------------------------------------------------------- */

typedef struct test_case {
    int D, H, ratio, kbits, vbits, G, R, S, tokens;
    int rot;          /* KVQ_ROTATE_* */
    float sal;        /* salient_ratio; 0 = off */
    int sal_bits, policy;
    int key_axis;     /* KVQ_KEYS_PER_CHANNEL or KVQ_KEYS_PER_TOKEN */
    int search;       /* range_search: 0 = min/max ranges, 4 = the default */
    int kb;           /* key_block: tokens per key block; 0 = G */
    int vpb;          /* value_param_bits: 0 (= 32) or 16 */
} test_case;

static void describe(char *buf, size_t n, const test_case *tc) {
    static const char *rots[] = {"", " hadamard", " prerotated"};
    int k = snprintf(buf, n, "D=%d H=%d gqa=%d K%d/V%d G=%d R=%d S=%d N=%d%s", tc->D, tc->H, tc->ratio, tc->kbits,
                     tc->vbits, tc->G, tc->R, tc->S, tc->tokens, rots[tc->rot]);
    if (tc->sal > 0.0f && k > 0 && (size_t)k < n)
        k += snprintf(buf + k, n - (size_t)k, " salient %g@%d %s", tc->sal, tc->sal_bits,
                      tc->policy == KVQ_SALIENT_ERROR ? "error" : "attention");
    if (tc->key_axis == KVQ_KEYS_PER_TOKEN && k > 0 && (size_t)k < n)
        k += snprintf(buf + k, n - (size_t)k, " keys per token");
    if (tc->kb && k > 0 && (size_t)k < n) k += snprintf(buf + k, n - (size_t)k, " KB=%d", tc->kb);
    if (tc->vpb && k > 0 && (size_t)k < n) k += snprintf(buf + k, n - (size_t)k, " vparams %d", tc->vpb);
    if (k > 0 && (size_t)k < n) snprintf(buf + k, n - (size_t)k, " search %d", tc->search);
}

static kvq_config case_config(const test_case *tc, int max_tokens) {
    kvq_config cfg = kvq_default_config(tc->D, tc->H, max_tokens);
    cfg.key_bits = tc->kbits;
    cfg.value_bits = tc->vbits;
    cfg.group_size = tc->G;
    cfg.residual_tokens = tc->R;
    cfg.sink_tokens = tc->S;
    cfg.rotation = tc->rot;
    cfg.seed = 777u + (unsigned)tc->D;
    cfg.salient_ratio = tc->sal;
    cfg.salient_bits = tc->sal > 0.0f ? tc->sal_bits : 8;
    cfg.salient_policy = tc->sal > 0.0f ? tc->policy : KVQ_SALIENT_ATTENTION;
    cfg.key_axis = tc->key_axis;
    cfg.range_search = tc->search;
    cfg.key_block = tc->kb;
    cfg.value_param_bits = tc->vpb;
    return cfg;
}

static void run_case(const test_case *tc, int salt) {
    kvq_config cfg = case_config(tc, tc->tokens + 8);
    kvq_cache *cpu = NULL, *back = NULL;
    kvq_cuda_cache *gpu = NULL, *up = NULL;
    static const int sched[] = {1, 3, 17, 1, 64, 5, 129, 2, 250, 31, 1, 400};
    char name[160];
    float *k, *v, *d_k, *d_v;
    int done = 0, step = 0, max_chunk = 400;
    /* salience tracked by attention: attention runs on copies (see attention_on_copies) */
    const int tracked = tc->sal > 0.0f && tc->policy == KVQ_SALIENT_ATTENTION;
    /* rotated rows must have an L2 norm <= 65504: no 6e4 values there */
    const float vbig = tc->rot == KVQ_ROTATE_HADAMARD ? 600.0f : 6.0e4f;
    kvq_status st;
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
        fill_kv(v, n, tc->H, tc->D, salt + step + 5, vbig);
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
            char what[200];
            double e;
            snprintf(what, sizeof what, "%s after %d tokens, %d queries", name, done, nq);
            e = tracked ? attention_on_copies(cpu, gpu, tc->H * tc->ratio, nq, what)
                        : attention_nmse(cpu, gpu, tc->H * tc->ratio, nq);
            CHECK(e < 1e-6, "%s: attention NMSE %.3g at %d tokens, %d queries", name, e, done, nq);
        }
    }
    /* download into a fresh CPU cache, and upload the CPU cache into a fresh GPU cache */
    st = kvq_cache_create(&back, &cfg);
    if (st == KVQ_OK) st = kvq_cuda_cache_download(gpu, back, 0);
    CHECK(st == KVQ_OK, "%s: download %d", name, (int)st);
    if (st == KVQ_OK) {
        size_t na, nb, nf = (size_t)done * tc->H * tc->D;
        unsigned char *a = cpu_image(cpu, &na), *b = cpu_image(back, &nb);
        float *rk = (float *)malloc(2 * nf * sizeof(float)), *rv = (float *)malloc(2 * nf * sizeof(float));
        CHECK(a && b && na == nb && memcmp(a, b, na) == 0, "%s: downloaded cache differs", name);
        /* every token read back (dequantized) from the download is the CPU cache's */
        CHECK(rk && rv && kvq_cache_read(cpu, 0, done, rk, rv) == KVQ_OK &&
                  kvq_cache_read(back, 0, done, rk + nf, rv + nf) == KVQ_OK &&
                  memcmp(rk, rk + nf, nf * sizeof(float)) == 0 && memcmp(rv, rv + nf, nf * sizeof(float)) == 0,
              "%s: tokens read from the download differ", name);
        free(rk);
        free(rv);
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
        fill_kv(v, n, tc->H, tc->D, salt + 98, vbig);
        CUDA_OK(cudaMemcpy(d_k, k, (size_t)n * tc->H * tc->D * sizeof(float), cudaMemcpyHostToDevice));
        CUDA_OK(cudaMemcpy(d_v, v, (size_t)n * tc->H * tc->D * sizeof(float), cudaMemcpyHostToDevice));
        CHECK(kvq_cache_append(cpu, k, v, n) == KVQ_OK && kvq_cuda_cache_append(up, d_k, d_v, n, 0) == KVQ_OK,
              "%s: append after upload", name);
        CHECK(same_bytes(cpu, up, name), "%s: cache after upload + append differs", name);
        CHECK(attention_nmse(cpu, up, tc->H * tc->ratio, 2) < 1e-6, "%s: attention after upload", name);
        if (tracked) CHECK(same_tracked(cpu, up, name), "%s: salience tracked after upload differs", name);
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
    kvq_attn_params ap = {4, 1, 0.0f};
    kvq_config bad = cfg;
    cfg.residual_tokens = 0;
    cfg.group_size = 16;
    CHECK(kvq_cuda_cache_create(NULL, &cfg) == KVQ_ERR_INVALID, "create(NULL)");
    bad.key_bits = 5;
    CHECK(kvq_cuda_cache_create(&g, &bad) == KVQ_ERR_UNSUPPORTED, "bits 5");
    bad = cfg;
    bad.key_axis = 2;
    CHECK(kvq_cuda_cache_create(&g, &bad) == KVQ_ERR_INVALID, "key_axis 2");
    bad.key_axis = KVQ_KEYS_PER_TOKEN;
    bad.salient_ratio = 0.1f;
    CHECK(kvq_cuda_cache_create(&g, &bad) == KVQ_ERR_UNSUPPORTED, "salient tokens with keys per token (as kvq.h)");
    bad.salient_ratio = 0.0f;
    CHECK(kvq_cuda_cache_create(&g, &bad) == KVQ_OK, "keys per token");
    kvq_cuda_cache_destroy(g);
    g = NULL;
    bad = cfg;
    bad.salient_ratio = 0.1f;
    bad.salient_bits = 4;
    CHECK(kvq_cuda_cache_create(&g, &bad) == KVQ_ERR_INVALID, "salient_bits 4");
    bad.salient_bits = 8;
    bad.salient_policy = 2;
    CHECK(kvq_cuda_cache_create(&g, &bad) == KVQ_ERR_INVALID, "salient policy 2");
    bad.salient_policy = KVQ_SALIENT_ERROR;
    bad.salient_ratio = 1.0f;
    CHECK(kvq_cuda_cache_create(&g, &bad) == KVQ_ERR_INVALID, "salient ratio 1");
    bad.salient_ratio = 0.1f;
    CHECK(kvq_cuda_cache_create(&g, &bad) == KVQ_OK, "salient tokens");
    kvq_cuda_cache_destroy(g);
    g = NULL;
    bad = cfg;
    bad.rotation = 7;
    CHECK(kvq_cuda_cache_create(&g, &bad) == KVQ_ERR_INVALID, "rotation 7");
    bad = cfg;
    bad.key_block = 48;
    CHECK(kvq_cuda_cache_create(&g, &bad) == KVQ_ERR_UNSUPPORTED, "key_block 48");
    bad.key_block = 64;
    bad.residual_tokens = 32;
    CHECK(kvq_cuda_cache_create(&g, &bad) == KVQ_ERR_INVALID, "residual_tokens not a multiple of key_block");
    bad = cfg;
    bad.value_param_bits = 8;
    CHECK(kvq_cuda_cache_create(&g, &bad) == KVQ_ERR_INVALID, "value_param_bits 8");
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
        size_t n_before, n_after;
        unsigned char *before, *after;
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
            img[8] = 1; /* format version 1 (kvq 0.2): refused, not misread */
            CHECK(kvq_cuda_cache_deserialize(g2, img, n, 0) == KVQ_ERR_UNSUPPORTED, "version 1 image");
            CHECK(same_bytes(cpu, g2, "deserialized"), "a version 1 image changed the cache");
            img[8] = 2;
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

/* ---- streams, scratch, pointers, errors, images (kvq_cuda.h's rules) ------------------ */

/* 1 when the GPU cache serializes to the bytes of img (n bytes). */
static int gpu_image_is(const kvq_cuda_cache *g, const unsigned char *img, size_t n) {
    size_t m;
    unsigned char *now = gpu_image(g, &m);
    int ok = img && now && m == n && memcmp(img, now, n) == 0;
    free(now);
    return ok;
}

/* Device copies of host floats. */
static float *to_device(const float *x, size_t n) {
    float *d;
    CUDA_OK(cudaMalloc((void **)&d, n * sizeof(float)));
    CUDA_OK(cudaMemcpy(d, x, n * sizeof(float), cudaMemcpyHostToDevice));
    return d;
}

/* The documented rule: calls on distinct caches overlap freely; calls on one cache are
   ordered by the caller's events when they use two streams. Cache X (rotated) is appended
   on stream A while cache Y (salient, tracked) appends and attends on stream B; X's
   attention then runs on B after an event recorded on A, and X's next append on A after
   an event recorded on B. Every byte must be kvq.h's, attention within the NMSE bound. */
static void test_streams(void) {
    enum { D = 64, H = 2, QH = 8, N = 90 };
    kvq_config cx = kvq_default_config(D, H, 2 * N), cy = cx;
    kvq_cache *px = NULL, *py = NULL;
    kvq_cuda_cache *gx = NULL, *gy = NULL;
    float *k = (float *)malloc((size_t)2 * N * H * D * sizeof(float)), *v = (float *)malloc((size_t)2 * N * H * D * sizeof(float));
    float q[2 * QH * D], ox[2 * QH * D], oy[2 * QH * D], gxo[2 * QH * D], gyo[2 * QH * D];
    float *d_k, *d_v, *d_q, *d_ox, *d_oy;
    kvq_attn_params ap = {QH, 2, 0.0f};
    cudaStream_t sa, sb;
    cudaEvent_t ea, eb;
    cx.rotation = KVQ_ROTATE_HADAMARD;
    cy.salient_ratio = 0.1f;
    cy.group_size = 16;
    cy.key_block = 0; /* = G */
    cy.residual_tokens = 16;
    if (kvq_cache_create(&px, &cx) != KVQ_OK || kvq_cache_create(&py, &cy) != KVQ_OK ||
        kvq_cuda_cache_create(&gx, &cx) != KVQ_OK || kvq_cuda_cache_create(&gy, &cy) != KVQ_OK) {
        CHECK(0, "streams: create");
        exit(2);
    }
    fill_kv(k, 2 * N, H, D, 41, 60.0f);
    fill_kv(v, 2 * N, H, D, 42, 60.0f);
    fill_q(q, 2 * QH * D);
    d_k = to_device(k, (size_t)2 * N * H * D);
    d_v = to_device(v, (size_t)2 * N * H * D);
    d_q = to_device(q, 2 * QH * D);
    CUDA_OK(cudaMalloc((void **)&d_ox, sizeof ox));
    CUDA_OK(cudaMalloc((void **)&d_oy, sizeof oy));
    CUDA_OK(cudaStreamCreateWithFlags(&sa, cudaStreamNonBlocking));
    CUDA_OK(cudaStreamCreateWithFlags(&sb, cudaStreamNonBlocking));
    CUDA_OK(cudaEventCreateWithFlags(&ea, cudaEventDisableTiming));
    CUDA_OK(cudaEventCreateWithFlags(&eb, cudaEventDisableTiming));
    /* distinct caches: nothing orders A against B */
    CHECK(kvq_cuda_cache_append(gx, d_k, d_v, N, sa) == KVQ_OK, "streams: append X on A");
    CHECK(kvq_cuda_cache_append(gy, d_k, d_v, N, sb) == KVQ_OK, "streams: append Y on B");
    CHECK(kvq_cuda_attention(gy, d_q, d_oy, &ap, sb) == KVQ_OK, "streams: attention Y on B");
    /* one cache on two streams: ordered by events */
    CUDA_OK(cudaEventRecord(ea, sa));
    CUDA_OK(cudaStreamWaitEvent(sb, ea, 0));
    CHECK(kvq_cuda_attention(gx, d_q, d_ox, &ap, sb) == KVQ_OK, "streams: attention X on B");
    CUDA_OK(cudaEventRecord(eb, sb));
    CUDA_OK(cudaStreamWaitEvent(sa, eb, 0));
    CHECK(kvq_cuda_cache_append(gx, d_k + (size_t)N * H * D, d_v + (size_t)N * H * D, N, sa) == KVQ_OK,
          "streams: second append X on A");
    CHECK(kvq_cuda_cache_append(gy, d_k + (size_t)N * H * D, d_v + (size_t)N * H * D, N, sb) == KVQ_OK,
          "streams: second append Y on B");
    CUDA_OK(cudaStreamSynchronize(sa));
    CUDA_OK(cudaStreamSynchronize(sb));
    CUDA_OK(cudaMemcpy(gxo, d_ox, sizeof gxo, cudaMemcpyDeviceToHost));
    CUDA_OK(cudaMemcpy(gyo, d_oy, sizeof gyo, cudaMemcpyDeviceToHost));
    /* the same on the CPU, in one order */
    CHECK(kvq_cache_append(px, k, v, N) == KVQ_OK && kvq_cache_append(py, k, v, N) == KVQ_OK &&
              kvq_attention(py, q, oy, &ap) == KVQ_OK && kvq_attention(px, q, ox, &ap) == KVQ_OK &&
              kvq_cache_append(px, k + (size_t)N * H * D, v + (size_t)N * H * D, N) == KVQ_OK &&
              kvq_cache_append(py, k + (size_t)N * H * D, v + (size_t)N * H * D, N) == KVQ_OK,
          "streams: cpu");
    CHECK(tu_nmse(gxo, ox, 2 * QH * D) < 1e-6 && tu_nmse(gyo, oy, 2 * QH * D) < 1e-6, "streams: attention");
    CHECK(same_bytes(px, gx, "streams X"), "streams: cache X differs from kvq.h's");
    CHECK(same_tracked(py, gy, "streams Y"), "streams: cache Y differs from kvq.h's");
    cudaEventDestroy(ea);
    cudaEventDestroy(eb);
    cudaStreamDestroy(sa);
    cudaStreamDestroy(sb);
    cudaFree(d_k);
    cudaFree(d_v);
    cudaFree(d_q);
    cudaFree(d_ox);
    cudaFree(d_oy);
    free(k);
    free(v);
    kvq_cache_destroy(px);
    kvq_cache_destroy(py);
    kvq_cuda_cache_destroy(gx);
    kvq_cuda_cache_destroy(gy);
}

#ifdef KVQ_CUDA_EMU
/* The emulator counts allocations, frees and synchronizations. */
static kvq_emu::api_counts api_now(void) { return kvq_emu::counts(); }
static int api_same(kvq_emu::api_counts a, kvq_emu::api_counts b, int syncs_too) {
    return a.allocs == b.allocs && a.frees == b.frees && (!syncs_too || a.syncs == b.syncs);
}
#endif

/* Scratch is allocated by create: attention (single, batched, rotated, tracked, up to
   max_attn_rows rows, on one token and on many) allocates, frees and synchronizes nothing,
   and append allocates and frees nothing (the emulator counts the runtime calls). More rows
   than max_attn_rows are refused before any launch; kvq_cuda_cache_create_ex() raises the
   bound. A rotated cache with append_chunk 7 stores one 300-token append in rounds, to the
   bytes kvq.h makes of it in one append. */
static void test_scratch(void) {
    enum { D = 64, H = 2, N = 300, NC = 3 };
    kvq_cuda_limits lim = {0, 0};
    kvq_config cfg[NC];
    kvq_cache *cpu[NC];
    kvq_cuda_cache *gpu[NC];
    float *k = (float *)malloc((size_t)N * H * D * sizeof(float)), *v = (float *)malloc((size_t)N * H * D * sizeof(float));
    float *q = (float *)malloc((size_t)512 * D * sizeof(float)), *oc = (float *)malloc((size_t)512 * D * sizeof(float));
    float *og = (float *)malloc((size_t)512 * D * sizeof(float)), *d_k, *d_v, *d_q, *d_o[NC], *d_qs[NC];
    int i, s;
    for (s = 0; s < NC; s++) {
        cfg[s] = kvq_default_config(D, H, N + 10);
        cfg[s].group_size = 16;
        cfg[s].key_block = 0; /* = G */
        cfg[s].residual_tokens = 32;
    }
    cfg[0].rotation = KVQ_ROTATE_HADAMARD;
    cfg[1].salient_ratio = 0.2f; /* tracked salience: the largest scratch */
    cfg[2].key_axis = KVQ_KEYS_PER_TOKEN;
    fill_kv(k, N, H, D, 51, 60.0f);
    fill_kv(v, N, H, D, 52, 60.0f);
    fill_q(q, (size_t)512 * D);
    d_k = to_device(k, (size_t)N * H * D);
    d_v = to_device(v, (size_t)N * H * D);
    d_q = to_device(q, (size_t)512 * D);
    lim.append_chunk = 7;
    for (s = 0; s < NC; s++) {
        CHECK(kvq_cache_create(&cpu[s], &cfg[s]) == KVQ_OK &&
                  kvq_cuda_cache_create_ex(&gpu[s], &cfg[s], s == 0 ? &lim : NULL) == KVQ_OK,
              "scratch: create %d", s);
        if (!cpu[s] || !gpu[s]) exit(2);
        CUDA_OK(cudaMalloc((void **)&d_o[s], (size_t)512 * D * sizeof(float)));
        d_qs[s] = d_q;
    }
    CHECK(kvq_cuda_cache_limits(gpu[0])->append_chunk == 7 && kvq_cuda_cache_limits(gpu[1])->append_chunk ==
              KVQ_CUDA_APPEND_CHUNK && kvq_cuda_cache_limits(gpu[1])->max_attn_rows == KVQ_CUDA_ATTN_ROWS,
          "scratch: limits");
    CHECK(kvq_cuda_cache_scratch_bytes(gpu[1]) > kvq_cuda_cache_scratch_bytes(gpu[2]), "scratch: tracking needs more");
    {
        kvq_cuda_cache *none = NULL;
        lim.max_attn_rows = -1;
        CHECK(kvq_cuda_cache_create_ex(&none, &cfg[0], &lim) == KVQ_ERR_INVALID && !none, "scratch: negative rows");
    }
    lim.max_attn_rows = 0;
    lim.append_chunk = 7;
    for (s = 0; s < NC; s++) {
#ifdef KVQ_CUDA_EMU
        kvq_emu::api_counts before = api_now();
#endif
        int n = s == 0 ? N : 1, done;
        for (done = 0; done < N; done += n) /* one token at a time: decode */
            CHECK(kvq_cuda_cache_append(gpu[s], d_k + (size_t)done * H * D, d_v + (size_t)done * H * D, n, 0) == KVQ_OK,
                  "scratch: append %d", s);
#ifdef KVQ_CUDA_EMU
        CHECK(api_same(before, api_now(), 0), "scratch: append %d allocated or freed", s);
#endif
        CHECK(kvq_cache_append(cpu[s], k, v, N) == KVQ_OK, "scratch: cpu append");
        CHECK(same_bytes(cpu[s], gpu[s], "scratch"), "scratch: cache %d differs from kvq.h's", s);
    }
    {
        static const int shapes[][2] = {{1, 4}, {1, 32}, {4, 8}, {2, 128}, {8, 32}, {64, 4}, {1, 256}};
        for (i = 0; i < (int)(sizeof shapes / sizeof shapes[0]); i++) {
            kvq_attn_params ap = {shapes[i][1], shapes[i][0], 0.0f};
            size_t n = (size_t)ap.n_queries * ap.n_q_heads * D;
#ifdef KVQ_CUDA_EMU
            kvq_emu::api_counts before = api_now();
#endif
            for (s = 0; s < NC; s++)
                CHECK(kvq_cuda_attention(gpu[s], d_q, d_o[s], &ap, 0) == KVQ_OK, "scratch: attention %d shape %d", s, i);
            CHECK(kvq_cuda_attention_batch(gpu, NC, (const float *const *)d_qs, d_o, &ap, 0) == KVQ_OK,
                  "scratch: batch shape %d", i);
#ifdef KVQ_CUDA_EMU
            CHECK(api_same(before, api_now(), 1), "scratch: attention shape %d allocated, freed or synchronized", i);
#endif
            for (s = 0; s < NC; s++) { /* twice on the GPU (single, batch): twice on the CPU */
                CHECK(kvq_attention(cpu[s], q, oc, &ap) == KVQ_OK && kvq_attention(cpu[s], q, oc, &ap) == KVQ_OK,
                      "scratch: cpu attention");
                CUDA_OK(cudaMemcpy(og, d_o[s], n * sizeof(float), cudaMemcpyDeviceToHost));
                CHECK(tu_nmse(og, oc, n) < 1e-6, "scratch: cache %d shape %d: NMSE", s, i);
            }
            CHECK(same_tracked(cpu[1], gpu[1], "scratch tracked"), "scratch: tracked salience shape %d", i);
        }
    }
    {
        kvq_attn_params ap = {32, 9, 0.0f}; /* 288 rows > KVQ_CUDA_ATTN_ROWS */
        kvq_cuda_cache *big = NULL;
        unsigned char *img;
        size_t n;
        CUDA_OK(cudaMemset(d_o[1], 0xab, (size_t)512 * D * sizeof(float)));
        img = gpu_image(gpu[1], &n);
        CHECK(kvq_cuda_attention(gpu[1], d_q, d_o[1], &ap, 0) == KVQ_ERR_INVALID, "scratch: rows over the bound");
        CHECK(gpu_image_is(gpu[1], img, n), "scratch: a refused attention changed the cache");
        CUDA_OK(cudaMemcpy(og, d_o[1], sizeof(float), cudaMemcpyDeviceToHost));
        CHECK(((unsigned char *)og)[0] == 0xab, "scratch: a refused attention wrote its output");
        free(img);
        lim.max_attn_rows = 512;
        lim.append_chunk = 0;
        CHECK(kvq_cuda_cache_create_ex(&big, &cfg[1], &lim) == KVQ_OK, "scratch: create with 512 rows");
        if (big) {
            size_t m = (size_t)ap.n_queries * ap.n_q_heads * D;
            CHECK(kvq_cuda_cache_upload(big, cpu[1], 0) == KVQ_OK, "scratch: upload");
            CHECK(kvq_cuda_attention(big, d_q, d_o[1], &ap, 0) == KVQ_OK, "scratch: 288 rows within 512");
            CHECK(kvq_attention(cpu[1], q, oc, &ap) == KVQ_OK, "scratch: cpu 288 rows");
            CUDA_OK(cudaMemcpy(og, d_o[1], m * sizeof(float), cudaMemcpyDeviceToHost));
            CHECK(tu_nmse(og, oc, m) < 1e-6, "scratch: 288 rows NMSE");
            CHECK(same_tracked(cpu[1], big, "scratch 288 rows"), "scratch: 288 rows tracked salience");
        }
        kvq_cuda_cache_destroy(big);
    }
    for (s = 0; s < NC; s++) {
        kvq_cache_destroy(cpu[s]);
        kvq_cuda_cache_destroy(gpu[s]);
        cudaFree(d_o[s]);
    }
    cudaFree(d_k);
    cudaFree(d_v);
    cudaFree(d_q);
    free(k);
    free(v);
    free(q);
    free(oc);
    free(og);
}

#ifndef KVQ_CUDA_EMU
/* On a GPU: attention captured into a CUDA graph (global capture mode, where an allocation
   or a synchronization would invalidate the capture) replays to the output of a direct call. */
static void test_graph_capture(void) {
    enum { D = 64, H = 2, QH = 8, N = 200 };
    kvq_config cfg = kvq_default_config(D, H, N);
    kvq_cuda_cache *g = NULL;
    float *k = (float *)malloc((size_t)N * H * D * sizeof(float)), q[2 * QH * D], o1[2 * QH * D], o2[2 * QH * D];
    float *d_k, *d_q, *d_o;
    kvq_attn_params ap = {QH, 2, 0.0f};
    cudaStream_t st;
    cudaGraph_t graph = NULL;
    cudaGraphExec_t exec = NULL;
    kvq_status s = KVQ_ERR_INVALID;
    cfg.rotation = KVQ_ROTATE_HADAMARD;
    cfg.salient_ratio = 0.1f;
    fill_kv(k, N, H, D, 61, 60.0f);
    fill_q(q, 2 * QH * D);
    d_k = to_device(k, (size_t)N * H * D);
    d_q = to_device(q, 2 * QH * D);
    CUDA_OK(cudaMalloc((void **)&d_o, sizeof o1));
    CUDA_OK(cudaStreamCreateWithFlags(&st, cudaStreamNonBlocking));
    CHECK(kvq_cuda_cache_create(&g, &cfg) == KVQ_OK && kvq_cuda_cache_append(g, d_k, d_k, N, st) == KVQ_OK,
          "graph: create and append");
    if (!g) exit(2);
    CUDA_OK(cudaStreamSynchronize(st));
    CUDA_OK(cudaStreamBeginCapture(st, cudaStreamCaptureModeGlobal));
    s = kvq_cuda_attention(g, d_q, d_o, &ap, st);
    CHECK(cudaStreamEndCapture(st, &graph) == cudaSuccess && s == KVQ_OK, "graph: attention captured (%d)", (int)s);
    (void)cudaGetLastError();
    if (graph && s == KVQ_OK) {
        /* salience is tracked: a direct call and a replay each add one query's worth, so
           compare outputs only (each from the same cache state: download, replay, compare) */
        unsigned char *img;
        size_t n;
        CUDA_OK(cudaGraphInstantiate(&exec, graph, 0));
        img = gpu_image(g, &n);
        CUDA_OK(cudaGraphLaunch(exec, st));
        CUDA_OK(cudaStreamSynchronize(st));
        CUDA_OK(cudaMemcpy(o1, d_o, sizeof o1, cudaMemcpyDeviceToHost));
        CHECK(kvq_cuda_cache_deserialize(g, img, n, st) == KVQ_OK, "graph: back to the captured state");
        CHECK(kvq_cuda_attention(g, d_q, d_o, &ap, st) == KVQ_OK, "graph: direct attention");
        CUDA_OK(cudaStreamSynchronize(st));
        CUDA_OK(cudaMemcpy(o2, d_o, sizeof o2, cudaMemcpyDeviceToHost));
        CHECK(memcmp(o1, o2, sizeof o1) == 0, "graph: replay and direct call differ");
        free(img);
        cudaGraphExecDestroy(exec);
    }
    if (graph) cudaGraphDestroy(graph);
    kvq_cuda_cache_destroy(g);
    cudaStreamDestroy(st);
    cudaFree(d_k);
    cudaFree(d_q);
    cudaFree(d_o);
    free(k);
}
#endif

/* Host memory where device memory belongs (pageable or pinned) is refused with
   KVQ_ERR_INVALID before any launch: the cache, the output and the runtime's error state
   stay as they were. Managed memory is taken. */
static void test_host_pointers(void) {
    enum { D = 64, H = 2, QH = 4, N = 40 };
    kvq_config cfg = kvq_default_config(D, H, 2 * N);
    kvq_cache *cpu = NULL;
    kvq_cuda_cache *g = NULL, *gs[2];
    float *k = (float *)malloc((size_t)N * H * D * sizeof(float)), q[QH * D], o[QH * D], oc[QH * D];
    float *d_k, *d_q, *d_o, *pinned, *managed_k, *managed_o;
    const float *qs[2];
    float *os[2];
    kvq_attn_params ap = {QH, 1, 0.0f};
    unsigned char *img;
    size_t n;
    int i, untouched = 1;
    cfg.rotation = KVQ_ROTATE_HADAMARD;
    fill_kv(k, N, H, D, 71, 60.0f);
    fill_q(q, QH * D);
    d_k = to_device(k, (size_t)N * H * D);
    d_q = to_device(q, QH * D);
    CUDA_OK(cudaMalloc((void **)&d_o, sizeof o));
    CUDA_OK(cudaMallocHost((void **)&pinned, (size_t)N * H * D * sizeof(float)));
    memcpy(pinned, k, (size_t)N * H * D * sizeof(float));
    CHECK(kvq_cuda_cache_create(&g, &cfg) == KVQ_OK && kvq_cache_create(&cpu, &cfg) == KVQ_OK, "host pointers: create");
    if (!g || !cpu) exit(2);
    CHECK(kvq_cuda_cache_append(g, d_k, d_k, N / 2, 0) == KVQ_OK && kvq_cache_append(cpu, k, k, N / 2) == KVQ_OK,
          "host pointers: append");
    CUDA_OK(cudaMemset(d_o, 0xab, sizeof o));
    img = gpu_image(g, &n);
    gs[0] = g;
    gs[1] = NULL;
    CHECK(kvq_cuda_cache_append(g, k, d_k, 1, 0) == KVQ_ERR_INVALID, "host pointers: pageable k");
    CHECK(kvq_cuda_cache_append(g, d_k, k, 1, 0) == KVQ_ERR_INVALID, "host pointers: pageable v");
    CHECK(kvq_cuda_cache_append(g, pinned, d_k, 1, 0) == KVQ_ERR_INVALID, "host pointers: pinned k");
    CHECK(kvq_cuda_attention(g, q, d_o, &ap, 0) == KVQ_ERR_INVALID, "host pointers: pageable q");
    CHECK(kvq_cuda_attention(g, d_q, o, &ap, 0) == KVQ_ERR_INVALID, "host pointers: pageable out");
    CHECK(kvq_cuda_attention(g, pinned, d_o, &ap, 0) == KVQ_ERR_INVALID, "host pointers: pinned q");
    qs[0] = q;
    os[0] = d_o;
    CHECK(kvq_cuda_attention_batch(gs, 1, qs, os, &ap, 0) == KVQ_ERR_INVALID, "host pointers: batch q");
    qs[0] = d_q;
    os[0] = o;
    CHECK(kvq_cuda_attention_batch(gs, 1, qs, os, &ap, 0) == KVQ_ERR_INVALID, "host pointers: batch out");
    CHECK(cudaPeekAtLastError() == cudaSuccess, "host pointers: an error was left pending");
    CHECK(kvq_cuda_cache_tokens(g) == N / 2 && gpu_image_is(g, img, n), "host pointers: the cache changed");
    CUDA_OK(cudaMemcpy(o, d_o, sizeof o, cudaMemcpyDeviceToHost));
    for (i = 0; i < (int)sizeof o; i++) untouched &= ((unsigned char *)o)[i] == 0xab;
    CHECK(untouched, "host pointers: the output was written");
    /* managed memory works, and the cache goes on as kvq.h's */
    CUDA_OK(cudaMallocManaged((void **)&managed_k, (size_t)N * H * D * sizeof(float), cudaMemAttachGlobal));
    CUDA_OK(cudaMallocManaged((void **)&managed_o, sizeof o, cudaMemAttachGlobal));
    memcpy(managed_k, k, (size_t)N * H * D * sizeof(float));
    CHECK(kvq_cuda_cache_append(g, managed_k + (size_t)N / 2 * H * D, managed_k + (size_t)N / 2 * H * D, N / 2, 0) ==
              KVQ_OK,
          "host pointers: managed k, v");
    CHECK(kvq_cache_append(cpu, k + (size_t)N / 2 * H * D, k + (size_t)N / 2 * H * D, N / 2) == KVQ_OK,
          "host pointers: cpu append");
    CHECK(same_bytes(cpu, g, "managed"), "host pointers: cache after a managed append");
    CHECK(kvq_cuda_attention(g, d_q, managed_o, &ap, 0) == KVQ_OK, "host pointers: managed out");
    CUDA_OK(cudaDeviceSynchronize());
    CHECK(kvq_attention(cpu, q, oc, &ap) == KVQ_OK && tu_nmse(managed_o, oc, QH * D) < 1e-6,
          "host pointers: managed attention");
    free(img);
    free(k);
    cudaFree(d_k);
    cudaFree(d_q);
    cudaFree(d_o);
    cudaFree(managed_k);
    cudaFree(managed_o);
    cudaFreeHost(pinned);
    kvq_cuda_cache_destroy(g);
    kvq_cache_destroy(cpu);
}

/* A launch the runtime refuses, to leave an error pending that is not kvq's. */
__global__ void refused_kernel(int *x) {
    if (x) *x = 1;
}

/* An error pending before a call (here the test's own refused launch) is not kvq's: every
   call that would use the device returns KVQ_ERR_UNSUPPORTED, does nothing and leaves the
   error pending, to be read by its owner; then calls work again. */
static void test_pending_error(void) {
    enum { D = 64, H = 2, QH = 4, N = 40 };
    kvq_config cfg = kvq_default_config(D, H, 2 * N);
    kvq_cuda_cache *g = NULL, *g2 = NULL;
    kvq_cache *cpu = NULL;
    float *k = (float *)malloc((size_t)N * H * D * sizeof(float)), q[QH * D], o[QH * D], *d_k, *d_q, *d_o;
    kvq_attn_params ap = {QH, 1, 0.0f};
    unsigned char *img, *buf;
    size_t n;
    int i, untouched = 1;
    fill_kv(k, N, H, D, 81, 60.0f);
    fill_q(q, QH * D);
    d_k = to_device(k, (size_t)N * H * D);
    d_q = to_device(q, QH * D);
    CUDA_OK(cudaMalloc((void **)&d_o, sizeof o));
    CUDA_OK(cudaMemset(d_o, 0xab, sizeof o));
    CHECK(kvq_cuda_cache_create(&g, &cfg) == KVQ_OK && kvq_cache_create(&cpu, &cfg) == KVQ_OK, "pending: create");
    if (!g || !cpu) exit(2);
    CHECK(kvq_cuda_cache_append(g, d_k, d_k, N / 2, 0) == KVQ_OK, "pending: append");
    CHECK(kvq_cache_append(cpu, k, k, N) == KVQ_OK, "pending: cpu append");
    img = gpu_image(g, &n);
    buf = (unsigned char *)malloc(n);
    refused_kernel<<<1, 2048>>>((int *)NULL); /* more threads than a block may have */
    CHECK(cudaPeekAtLastError() == cudaErrorInvalidConfiguration, "pending: the test's launch was not refused");
    CHECK(kvq_cuda_cache_append(g, d_k, d_k, 1, 0) == KVQ_ERR_UNSUPPORTED, "pending: append ran");
    CHECK(kvq_cuda_attention(g, d_q, d_o, &ap, 0) == KVQ_ERR_UNSUPPORTED, "pending: attention ran");
    CHECK(kvq_cuda_cache_upload(g, cpu, 0) == KVQ_ERR_UNSUPPORTED, "pending: upload ran");
    CHECK(kvq_cuda_cache_deserialize(g, img, n, 0) == KVQ_ERR_UNSUPPORTED, "pending: deserialize ran");
    CHECK(kvq_cuda_cache_serialize(g, buf, n, NULL, 0) == KVQ_ERR_UNSUPPORTED, "pending: serialize ran");
    CHECK(kvq_cuda_cache_create(&g2, &cfg) == KVQ_ERR_UNSUPPORTED && !g2, "pending: create ran");
    CHECK(cudaPeekAtLastError() == cudaErrorInvalidConfiguration, "pending: kvq cleared the caller's error");
    CHECK(cudaGetLastError() == cudaErrorInvalidConfiguration, "pending: read by its owner");
    CHECK(kvq_cuda_cache_tokens(g) == N / 2 && gpu_image_is(g, img, n), "pending: the cache changed");
    CUDA_OK(cudaMemcpy(o, d_o, sizeof o, cudaMemcpyDeviceToHost));
    for (i = 0; i < (int)sizeof o; i++) untouched &= ((unsigned char *)o)[i] == 0xab;
    CHECK(untouched, "pending: the output was written");
    CHECK(kvq_cuda_cache_append(g, d_k + (size_t)N / 2 * H * D, d_k + (size_t)N / 2 * H * D, N / 2, 0) == KVQ_OK,
          "pending: append after the error was read");
    CHECK(same_bytes(cpu, g, "pending"), "pending: cache after the error was read");
    free(img);
    free(buf);
    free(k);
    cudaFree(d_k);
    cudaFree(d_q);
    cudaFree(d_o);
    kvq_cuda_cache_destroy(g);
    kvq_cache_destroy(cpu);
}

/* Images reach the GPU through kvq.h's loader. deserialize takes an image of another
   capacity when the tokens it holds fit (same bytes as kvq_cache_load() of it at the
   device cache's capacity), refuses more tokens than fit (KVQ_ERR_FULL), another config
   (KVQ_ERR_INVALID) and every hostile re-sealed image of tests/hostile.h
   (KVQ_ERR_CORRUPT), each time leaving the device cache byte for byte as it was. */
static void test_images(void) {
    int variant, i;
    for (variant = 0; variant < HOSTILE_VARIANTS; variant++) {
        kvq_cache *base = hostile_base(variant), *twin = NULL;
        kvq_config cfg = hostile_config(variant), big = cfg, small = cfg, other = cfg;
        kvq_cuda_cache *g = NULL, *gbig = NULL, *gsmall = NULL, *gother = NULL;
        size_t n = kvq_cache_serialized_bytes(base), nb, m;
        uint8_t *img = (uint8_t *)malloc(n), *bad = (uint8_t *)malloc(n);
        unsigned char *before;
        void *mem;
        int refused = 0, kept = 0, cases = 0;
        big.max_tokens = 1000;
        small.max_tokens = HOSTILE_TOKENS - 1;
        other.seed ^= 1u;
        CHECK(kvq_cache_serialize(base, img, n, NULL) == KVQ_OK, "images: serialize");
        CHECK(kvq_cuda_cache_create(&g, &cfg) == KVQ_OK && kvq_cuda_cache_create(&gbig, &big) == KVQ_OK &&
                  kvq_cuda_cache_create(&gsmall, &small) == KVQ_OK && kvq_cuda_cache_create(&gother, &other) == KVQ_OK,
              "images: create");
        if (!g || !gbig || !gsmall || !gother) exit(2);
        CHECK(kvq_cuda_cache_deserialize(g, img, n, 0) == KVQ_OK, "images: variant %d loads", variant);
        CHECK(same_bytes(base, g, "images"), "images: variant %d differs", variant);
        /* another capacity */
        mem = malloc(nb = kvq_cache_bytes(&big));
        CHECK(kvq_cuda_cache_deserialize(gbig, img, n, 0) == KVQ_OK, "images: into capacity 1000");
        CHECK(mem && kvq_cache_load(&twin, img, n, big.max_tokens, mem, nb) == KVQ_OK && same_bytes(twin, gbig, "images"),
              "images: variant %d at capacity 1000 differs from kvq_cache_load()'s", variant);
        free(mem);
        before = gpu_image(gsmall, &m);
        CHECK(kvq_cuda_cache_deserialize(gsmall, img, n, 0) == KVQ_ERR_FULL, "images: more tokens than fit");
        CHECK(gpu_image_is(gsmall, before, m), "images: a refused image changed the cache");
        free(before);
        before = gpu_image(gother, &m);
        CHECK(kvq_cuda_cache_deserialize(gother, img, n, 0) == KVQ_ERR_INVALID, "images: another config");
        CHECK(gpu_image_is(gother, before, m), "images: a refused image changed the cache");
        free(before);
        /* hostile images: refused, the loaded cache as it was */
        before = gpu_image(g, &m);
        for (i = 0; i < HOSTILE_CASES; i++) {
            const char *name = hostile_make(i, img, n, bad);
            kvq_status st;
            if (!name) continue;
            cases++;
            st = kvq_cuda_cache_deserialize(g, bad, n, 0);
            refused += st == KVQ_ERR_CORRUPT;
            kept += gpu_image_is(g, before, m) && kvq_cuda_cache_tokens(g) == HOSTILE_TOKENS;
            if (st != KVQ_ERR_CORRUPT) fprintf(stderr, "  images: variant %d hostile case %s: %d\n", variant, name, (int)st);
        }
        CHECK(cases > 0 && refused == cases, "images: variant %d: %d of %d hostile images refused", variant, refused, cases);
        CHECK(kept == cases, "images: variant %d: %d of %d hostile images changed the cache", variant, cases - kept, cases);
        free(before);
        /* an empty image: host memory for no tokens, and the cache empties */
        kvq_cache_reset(base);
        CHECK(kvq_cache_serialize(base, img, n, &nb) == KVQ_OK && kvq_cuda_cache_deserialize(gbig, img, nb, 0) == KVQ_OK &&
                  kvq_cuda_cache_tokens(gbig) == 0 && kvq_cuda_cache_payload_bytes(gbig) == 0,
              "images: variant %d empty image", variant);
        free(img);
        free(bad);
        kvq_cache_destroy(base);
        kvq_cuda_cache_destroy(g);
        kvq_cuda_cache_destroy(gbig);
        kvq_cuda_cache_destroy(gsmall);
        kvq_cuda_cache_destroy(gother);
    }
}

/* Several sequences of different lengths in one batched launch, against the CPU one by one.
   mode 2: keys per token (2, 4 and 3 bits, the last rotated). mode 1 (salient): the three
   caches keep salient tokens (attention policy at 8 bits, error policy at
   16 bits with 4-bit keys, attention policy rotated at 3 bits) and the batch runs twice, so
   tracked salience accumulates; their bytes are compared as same_tracked does. mode 3: key
   blocks apart from value groups (key_block/group_size 64/32, 16/64, 128/16, the last
   rotated), 16-bit value params in the first and last. */
/* A batch that cannot run (the same cache twice; a different shape in a later launch of
   more than KVQ_CUDA_MAX_BATCH caches) returns KVQ_ERR_INVALID before launching anything:
   no output written, and no salience recorded in any cache of the earlier launches. */
static void test_batch_all_or_nothing(void) {
    enum { NS = KVQ_CUDA_MAX_BATCH + 1, D = 64, H = 2, QH = 4, T = 40 };
    kvq_cuda_cache *gpu[NS];
    kvq_cuda_cache *dup[3];
    float *d_k, *d_v, *d_q[NS], *d_o[NS];
    float *k = (float *)malloc((size_t)T * H * D * sizeof(float)), *v = (float *)malloc((size_t)T * H * D * sizeof(float));
    unsigned char *before[NS], *after, *o = (unsigned char *)malloc(QH * D * sizeof(float));
    kvq_attn_params ap = {QH, 1, 0.0f};
    size_t n_before[NS], n_after;
    int s, same = 1, untouched = 1;
    CUDA_OK(cudaMalloc((void **)&d_k, (size_t)T * H * D * sizeof(float)));
    CUDA_OK(cudaMalloc((void **)&d_v, (size_t)T * H * D * sizeof(float)));
    fill_kv(k, T, H, D, 3, 60.0f);
    fill_kv(v, T, H, D, 4, 60.0f);
    CUDA_OK(cudaMemcpy(d_k, k, (size_t)T * H * D * sizeof(float), cudaMemcpyHostToDevice));
    CUDA_OK(cudaMemcpy(d_v, v, (size_t)T * H * D * sizeof(float), cudaMemcpyHostToDevice));
    for (s = 0; s < NS; s++) {
        kvq_config cfg = kvq_default_config(s == NS - 1 ? D / 2 : D, H, T); /* the last: another shape */
        float *q = (float *)malloc(QH * D * sizeof(float));
        cfg.salient_ratio = 0.1f; /* attention policy: a launch that ran would record salience */
        CHECK(kvq_cuda_cache_create(&gpu[s], &cfg) == KVQ_OK, "create %d", s);
        if (!gpu[s]) exit(2);
        CHECK(kvq_cuda_cache_append(gpu[s], d_k, d_v, T, 0) == KVQ_OK, "append %d", s);
        fill_q(q, QH * D);
        CUDA_OK(cudaMalloc((void **)&d_q[s], QH * D * sizeof(float)));
        CUDA_OK(cudaMalloc((void **)&d_o[s], QH * D * sizeof(float)));
        CUDA_OK(cudaMemcpy(d_q[s], q, QH * D * sizeof(float), cudaMemcpyHostToDevice));
        CUDA_OK(cudaMemset(d_o[s], 0xab, QH * D * sizeof(float)));
        before[s] = gpu_image(gpu[s], &n_before[s]);
        free(q);
    }
    CHECK(kvq_cuda_attention_batch(gpu, NS, (const float *const *)d_q, d_o, &ap, 0) == KVQ_ERR_INVALID,
          "a shape change in the second launch");
    dup[0] = gpu[0]; dup[1] = gpu[1]; dup[2] = gpu[0];
    CHECK(kvq_cuda_attention_batch(dup, 3, (const float *const *)d_q, d_o, &ap, 0) == KVQ_ERR_INVALID,
          "the same cache twice");
    CUDA_OK(cudaDeviceSynchronize());
    for (s = 0; s < NS; s++) {
        int i;
        after = gpu_image(gpu[s], &n_after);
        same &= before[s] && after && n_after == n_before[s] && memcmp(before[s], after, n_after) == 0;
        CUDA_OK(cudaMemcpy(o, d_o[s], QH * D * sizeof(float), cudaMemcpyDeviceToHost));
        for (i = 0; i < (int)(QH * D * sizeof(float)); i++) untouched &= o[i] == 0xab;
        free(after);
        free(before[s]);
    }
    CHECK(same, "a refused batch changed a cache");
    CHECK(untouched, "a refused batch wrote an output");
    CHECK(kvq_cuda_attention_batch(gpu, NS - 1, (const float *const *)d_q, d_o, &ap, 0) == KVQ_OK,
          "the first %d alone run", NS - 1);
    for (s = 0; s < NS; s++) {
        kvq_cuda_cache_destroy(gpu[s]);
        cudaFree(d_q[s]);
        cudaFree(d_o[s]);
    }
    cudaFree(d_k);
    cudaFree(d_v);
    free(k);
    free(v);
    free(o);
}

static void test_batch(int mode) {
    const int salient = mode == 1;
    enum { NS = 3, D = 64, H = 2, QH = 8, MAXN = 700, NQ = 2 };
    static const int lens[NS] = {700, 33, 300};
    kvq_cache *cpu[NS];
    kvq_cuda_cache *gpu[NS];
    float *k = (float *)malloc((size_t)MAXN * H * D * sizeof(float)), *v = (float *)malloc((size_t)MAXN * H * D * sizeof(float));
    float *q[NS], *o_cpu = (float *)malloc(NQ * QH * D * sizeof(float)), *o_gpu = (float *)malloc(NQ * QH * D * sizeof(float));
    float *d_k, *d_v, *d_q[NS], *d_o[NS];
    kvq_attn_params ap = {QH, salient ? NQ : 1, 0.0f};
    int s, run;
    CUDA_OK(cudaMalloc((void **)&d_k, (size_t)MAXN * H * D * sizeof(float)));
    CUDA_OK(cudaMalloc((void **)&d_v, (size_t)MAXN * H * D * sizeof(float)));
    for (s = 0; s < NS; s++) {
        kvq_config cfg = kvq_default_config(D, H, MAXN);
        if (salient) {
            cfg.salient_ratio = s == 1 ? 0.25f : 0.1f;
            cfg.salient_bits = s == 1 ? 16 : 8;
            cfg.salient_policy = s == 1 ? KVQ_SALIENT_ERROR : KVQ_SALIENT_ATTENTION;
            cfg.key_bits = s == 1 ? 4 : s == 2 ? 3 : 2;
            cfg.rotation = s == 2 ? KVQ_ROTATE_HADAMARD : KVQ_ROTATE_NONE;
        }
        if (mode == 2) {
            cfg.key_axis = KVQ_KEYS_PER_TOKEN;
            cfg.key_bits = s == 1 ? 4 : s == 2 ? 3 : 2;
            cfg.rotation = s == 2 ? KVQ_ROTATE_HADAMARD : KVQ_ROTATE_NONE;
        }
        if (mode == 3) { /* key blocks and value groups of their own sizes in one launch */
            cfg.group_size = s == 1 ? 64 : s == 2 ? 16 : 32;
            cfg.key_block = s == 1 ? 16 : s == 2 ? 128 : 64;
            cfg.value_param_bits = s == 1 ? 32 : 16;
            cfg.key_bits = s == 1 ? 3 : 2;
            cfg.value_bits = s == 2 ? 3 : 2;
            cfg.rotation = s == 2 ? KVQ_ROTATE_HADAMARD : KVQ_ROTATE_NONE;
        }
        q[s] = (float *)malloc(NQ * QH * D * sizeof(float));
        fill_q(q[s], NQ * QH * D);
        CUDA_OK(cudaMalloc((void **)&d_q[s], NQ * QH * D * sizeof(float)));
        CUDA_OK(cudaMalloc((void **)&d_o[s], NQ * QH * D * sizeof(float)));
        CUDA_OK(cudaMemcpy(d_q[s], q[s], NQ * QH * D * sizeof(float), cudaMemcpyHostToDevice));
        fill_kv(k, lens[s], H, D, 10 + s, 600.0f);
        fill_kv(v, lens[s], H, D, 20 + s, cfg.rotation == KVQ_ROTATE_HADAMARD ? 600.0f : 6.0e4f);
        CUDA_OK(cudaMemcpy(d_k, k, (size_t)lens[s] * H * D * sizeof(float), cudaMemcpyHostToDevice));
        CUDA_OK(cudaMemcpy(d_v, v, (size_t)lens[s] * H * D * sizeof(float), cudaMemcpyHostToDevice));
        CHECK(kvq_cache_create(&cpu[s], &cfg) == KVQ_OK && kvq_cuda_cache_create(&gpu[s], &cfg) == KVQ_OK, "batch create");
        if (!cpu[s] || !gpu[s]) exit(2);
        CHECK(kvq_cache_append(cpu[s], k, v, lens[s]) == KVQ_OK, "batch cpu append");
        CHECK(kvq_cuda_cache_append(gpu[s], d_k, d_v, lens[s], 0) == KVQ_OK, "batch gpu append");
    }
    for (run = 0; run < (salient ? 2 : 1); run++) {
        CHECK(kvq_cuda_attention_batch(gpu, NS, (const float *const *)d_q, d_o, &ap, 0) == KVQ_OK, "batch attention");
        CUDA_OK(cudaDeviceSynchronize());
        for (s = 0; s < NS; s++) {
            size_t n = (size_t)ap.n_queries * QH * D;
            double e;
            char what[96];
            CHECK(kvq_attention(cpu[s], q[s], o_cpu, &ap) == KVQ_OK, "cpu attention");
            CUDA_OK(cudaMemcpy(o_gpu, d_o[s], n * sizeof(float), cudaMemcpyDeviceToHost));
            e = tu_nmse(o_gpu, o_cpu, n);
            snprintf(what, sizeof what, "batch mode %d sequence %d (N=%d) run %d", mode, s, lens[s], run);
            CHECK(e < 1e-6, "%s: NMSE %.3g", what, e);
            if (salient) CHECK(same_tracked(cpu[s], gpu[s], what), "%s: cache differs", what);
        }
    }
    for (s = 0; s < NS; s++) {
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
    test_case tc = {128, 2, 4, kbits, vbits, 32, 128, 4, 65536, KVQ_ROTATE_NONE, 0.0f, 8, KVQ_SALIENT_ATTENTION,
                    KVQ_KEYS_PER_CHANNEL, 4, 0, 0};
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

/* KVQ_ROTATE_HADAMARD (the cache rotates) and KVQ_ROTATE_PREROTATED (the caller did) against
   kvq.h's own cache of the same config, over every shape of the rotation plan: one
   Walsh-Hadamard piece (8, 64, 128, 256), a Paley piece (80, 96, 112, 160) or power-of-two
   blocks (72). Same bytes after every append, then attention. */
static void test_rotation(int D, int bits, int G, int S, int rot) {
    const int H = 2, ratio = 4, N = 400;
    test_case tc;
    kvq_config cfg;
    kvq_cache *cpu = NULL;
    kvq_cuda_cache *gpu = NULL;
    float *k = (float *)malloc((size_t)N * H * D * sizeof(float)), *v = (float *)malloc((size_t)N * H * D * sizeof(float));
    float *d_k, *d_v;
    char name[160];
    int done = 0, n;
    kvq_status st;
    memset(&tc, 0, sizeof tc);
    tc.D = D;
    tc.H = H;
    tc.ratio = ratio;
    tc.kbits = tc.vbits = bits;
    tc.G = G;
    tc.R = 128;
    tc.S = S;
    tc.tokens = N;
    tc.rot = rot;
    cfg = case_config(&tc, N);
    describe(name, sizeof name, &tc);
    st = kvq_cuda_cache_create(&gpu, &cfg);
    CHECK(st == KVQ_OK, "%s: create %d", name, (int)st);
    CHECK(kvq_cache_create(&cpu, &cfg) == KVQ_OK, "%s: cpu create", name);
    if (!gpu || !cpu) { kvq_cuda_cache_destroy(gpu); kvq_cache_destroy(cpu); free(k); free(v); return; }
    CUDA_OK(cudaMalloc((void **)&d_k, (size_t)N * H * D * sizeof(float)));
    CUDA_OK(cudaMalloc((void **)&d_v, (size_t)N * H * D * sizeof(float)));
    for (n = 1; done < N; n = n * 3 + 1) {
        if (n > N - done) n = N - done;
        fill_kv(k, n, H, D, done, 60.0f); /* rotation spreads a value over sqrt(D) channels: stay in fp16 */
        fill_kv(v, n, H, D, done + 1, 60.0f);
        CUDA_OK(cudaMemcpy(d_k, k, (size_t)n * H * D * sizeof(float), cudaMemcpyHostToDevice));
        CUDA_OK(cudaMemcpy(d_v, v, (size_t)n * H * D * sizeof(float), cudaMemcpyHostToDevice));
        CHECK(kvq_cuda_cache_append(gpu, d_k, d_v, n, 0) == KVQ_OK, "%s: gpu append", name);
        CHECK(kvq_cache_append(cpu, k, v, n) == KVQ_OK, "%s: cpu append", name);
        done += n;
        CHECK(same_bytes(cpu, gpu, name), "%s: bytes after %d tokens", name, done);
    }
    {
        double e = attention_nmse(cpu, gpu, H * ratio, 2);
        CHECK(e < 1e-6, "%s: attention NMSE %.3g", name, e);
    }
    cudaFree(d_k);
    cudaFree(d_v);
    free(k);
    free(v);
    kvq_cache_destroy(cpu);
    kvq_cuda_cache_destroy(gpu);
}

/* KVQ_ROTATE_HADAMARD takes rows of L2 norm <= 65504 only (every element then stays in fp16
   range rotated), as kvq.h does: a row of 10000s (norm 80000 at D 64) is refused and leaves
   the cache as it was; a row of 8000s (norm 64000) goes in, to the CPU's bytes. */
static void test_rotation_range(void) {
    enum { D = 64, H = 2, N = 4 };
    kvq_config cfg = kvq_default_config(D, H, 64);
    kvq_cache *cpu = NULL;
    kvq_cuda_cache *gpu = NULL;
    float k[N * H * D], v[N * H * D], *d_k, *d_v;
    size_t na;
    unsigned char *a;
    int i;
    cfg.rotation = KVQ_ROTATE_HADAMARD;
    cfg.group_size = 16;
    cfg.residual_tokens = 0;
    if (kvq_cache_create(&cpu, &cfg) != KVQ_OK || kvq_cuda_cache_create(&gpu, &cfg) != KVQ_OK) {
        CHECK(0, "rotation range: create");
        return;
    }
    CUDA_OK(cudaMalloc((void **)&d_k, sizeof k));
    CUDA_OK(cudaMalloc((void **)&d_v, sizeof v));
    fill_kv(k, N, H, D, 1, 60.0f);
    fill_kv(v, N, H, D, 2, 60.0f);
    CUDA_OK(cudaMemcpy(d_k, k, sizeof k, cudaMemcpyHostToDevice));
    CUDA_OK(cudaMemcpy(d_v, v, sizeof v, cudaMemcpyHostToDevice));
    CHECK(kvq_cache_append(cpu, k, v, N) == KVQ_OK && kvq_cuda_cache_append(gpu, d_k, d_v, N, 0) == KVQ_OK,
          "rotation range: append");
    for (i = 0; i < D; i++) v[(N - 1) * H * D + D + i] = 10000.0f; /* last token, second head */
    CUDA_OK(cudaMemcpy(d_v, v, sizeof v, cudaMemcpyHostToDevice));
    a = gpu_image(gpu, &na);
    CHECK(kvq_cache_append(cpu, k, v, N) == KVQ_ERR_INVALID, "rotation range: cpu takes norm 80000");
#ifndef KVQ_CUDA_UNCHECKED_APPEND
    CHECK(kvq_cuda_cache_append(gpu, d_k, d_v, N, 0) == KVQ_ERR_INVALID, "rotation range: gpu takes norm 80000");
    CHECK(gpu_image_is(gpu, a, na), "rotation range: a refused append changed the cache");
#endif
    free(a);
    for (i = 0; i < D; i++) v[(N - 1) * H * D + D + i] = 8000.0f;
    CUDA_OK(cudaMemcpy(d_v, v, sizeof v, cudaMemcpyHostToDevice));
    CHECK(kvq_cache_append(cpu, k, v, N) == KVQ_OK && kvq_cuda_cache_append(gpu, d_k, d_v, N, 0) == KVQ_OK,
          "rotation range: norm 64000");
    CHECK(same_bytes(cpu, gpu, "rotation range"), "rotation range: bytes");
    cudaFree(d_k);
    cudaFree(d_v);
    kvq_cache_destroy(cpu);
    kvq_cuda_cache_destroy(gpu);
}

/* Ties in the salient pick go to the older token, on both sides: a block of equal keys (every
   range gain 0), a block with one outlier token (one gain above 0, the rest tied), and, with
   the attention policy, a block of which only the first two tokens were seen by a query (the
   unseen ones tie at -1). */
static void test_salient_ties(void) {
    enum { D = 32, H = 2, G = 16, N = 64 };
    int policy;
    for (policy = 0; policy < 2; policy++) {
        kvq_config cfg = kvq_default_config(D, H, N);
        kvq_cache *cpu = NULL;
        kvq_cuda_cache *gpu = NULL;
        float k[N * H * D], v[N * H * D], q[4 * D], o[4 * D], *d_k, *d_v, *d_q, *d_o;
        kvq_attn_params ap = {4, 1, 0.0f};
        const char *name = policy == KVQ_SALIENT_ERROR ? "ties, error policy" : "ties, attention policy";
        int i;
        cfg.group_size = G;
        cfg.key_block = 0; /* blocks of G */
        cfg.residual_tokens = 0;
        cfg.sink_tokens = 0;
        cfg.salient_ratio = 0.25f; /* 4 of 16 */
        cfg.salient_policy = policy;
        if (kvq_cache_create(&cpu, &cfg) != KVQ_OK || kvq_cuda_cache_create(&gpu, &cfg) != KVQ_OK) {
            CHECK(0, "%s: create", name);
            kvq_cache_destroy(cpu);
            return;
        }
        fill_kv(k, N, H, D, 4, 600.0f);
        fill_kv(v, N, H, D, 5, 600.0f);
        for (i = G * H * D; i < 3 * G * H * D; i++) k[i] = i < 2 * G * H * D ? 0.75f : -2.0f;
        for (i = 0; i < H * D; i++) k[(2 * G + 9) * H * D + i] = 5.0f; /* block 2, token 9 */
        fill_q(q, 4 * D);
        CUDA_OK(cudaMalloc((void **)&d_k, sizeof k));
        CUDA_OK(cudaMalloc((void **)&d_v, sizeof v));
        CUDA_OK(cudaMalloc((void **)&d_q, sizeof q));
        CUDA_OK(cudaMalloc((void **)&d_o, sizeof o));
        CUDA_OK(cudaMemcpy(d_k, k, sizeof k, cudaMemcpyHostToDevice));
        CUDA_OK(cudaMemcpy(d_v, v, sizeof v, cudaMemcpyHostToDevice));
        CUDA_OK(cudaMemcpy(d_q, q, sizeof q, cudaMemcpyHostToDevice));
        /* two tokens, attention (which the attention policy tracks), then the rest at once */
        CHECK(kvq_cache_append(cpu, k, v, 2) == KVQ_OK && kvq_cuda_cache_append(gpu, d_k, d_v, 2, 0) == KVQ_OK,
              "%s: append 2", name);
        CHECK(kvq_attention(cpu, q, o, &ap) == KVQ_OK && kvq_cuda_attention(gpu, d_q, d_o, &ap, 0) == KVQ_OK,
              "%s: attention", name);
        CHECK(kvq_cache_append(cpu, k + 2 * H * D, v + 2 * H * D, N - 2) == KVQ_OK &&
                  kvq_cuda_cache_append(gpu, d_k + 2 * H * D, d_v + 2 * H * D, N - 2, 0) == KVQ_OK,
              "%s: append the rest", name);
        CHECK(same_tracked(cpu, gpu, name), "%s: cache differs", name);
        for (i = 0; i < 4; i++) {
            static const int block2[4] = {0, 1, 2, 9};
            if (policy == KVQ_SALIENT_ATTENTION)
                CHECK(kvq__side_index(kvq__side_entry(cpu, 1, 0, i)) == i, "%s: block 0 pick %d", name, i);
            CHECK(kvq__side_index(kvq__side_entry(cpu, 1, 1, i)) == i, "%s: block 1 pick %d", name, i);
            CHECK(kvq__side_index(kvq__side_entry(cpu, 1, 2, i)) == block2[i], "%s: block 2 pick %d", name, i);
        }
        cudaFree(d_k);
        cudaFree(d_v);
        cudaFree(d_q);
        cudaFree(d_o);
        kvq_cache_destroy(cpu);
        kvq_cuda_cache_destroy(gpu);
    }
}

/* Salient tokens chosen by tracked attention, end to end. In every key block the tokens at
   offsets 1, 3, ..., 2 n_salient - 1 get keys along a direction the queries share, so they
   take most of the attention: scaled score about 10 against about N(0, 1.5) for the others, a
   margin that no last-bit difference in the tracked scores can flip. Attention after every
   append (so every planted key is seen while it waits); the CPU must pick exactly the planted
   tokens, and the GPU the same, with every byte but the tracked scores equal. KB: key_block
   (0: G), the tokens of a block. */
static void test_tracking(int D, int G, int KB, float ratio, int sal_bits, int kbits, int rot, int R, int S,
                          int max_step) {
    enum { H = 2, GQA = 2, QH = H * GQA, N = 300, MAXQ = 3 };
    kvq_config cfg = kvq_default_config(D, H, N);
    kvq_cache *cpu = NULL;
    kvq_cuda_cache *gpu = NULL;
    float *dir = (float *)malloc((size_t)H * D * sizeof(float));
    float *k = (float *)malloc((size_t)max_step * H * D * sizeof(float)), *v = (float *)malloc((size_t)max_step * H * D * sizeof(float));
    float *q = (float *)malloc((size_t)MAXQ * QH * D * sizeof(float)), *o_cpu = (float *)malloc((size_t)MAXQ * QH * D * sizeof(float));
    float *o_gpu = (float *)malloc((size_t)MAXQ * QH * D * sizeof(float)), *d_k, *d_v, *d_q, *d_o;
    char name[160];
    int n_sal, done = 0, step = 0, h, d, i, b, j, wrong = 0;
    cfg.key_bits = kbits;
    cfg.group_size = G;
    cfg.key_block = KB;
    cfg.residual_tokens = R;
    cfg.sink_tokens = S;
    cfg.rotation = rot;
    cfg.salient_ratio = ratio;
    cfg.salient_bits = sal_bits;
    cfg.salient_policy = KVQ_SALIENT_ATTENTION;
    n_sal = kvq__salient_count(&cfg);
    /* data of its own: the CPU's picks must be the planted tokens, whatever ran before */
    rng_state = 0x1234567887654321ull;
    snprintf(name, sizeof name, "tracking D=%d G=%d KB=%d salient %g@%d K%d rot %d R=%d S=%d", D, G, KB, ratio,
             sal_bits, kbits, rot, R, S);
    if (kvq_cache_create(&cpu, &cfg) != KVQ_OK || kvq_cuda_cache_create(&gpu, &cfg) != KVQ_OK) {
        CHECK(0, "%s: create", name);
        kvq_cache_destroy(cpu);
        return;
    }
    CUDA_OK(cudaMalloc((void **)&d_k, (size_t)max_step * H * D * sizeof(float)));
    CUDA_OK(cudaMalloc((void **)&d_v, (size_t)max_step * H * D * sizeof(float)));
    CUDA_OK(cudaMalloc((void **)&d_q, (size_t)MAXQ * QH * D * sizeof(float)));
    CUDA_OK(cudaMalloc((void **)&d_o, (size_t)MAXQ * QH * D * sizeof(float)));
    for (h = 0; h < H; h++) { /* a unit direction per KV head */
        double nn = 0.0;
        for (d = 0; d < D; d++) {
            dir[h * D + d] = gauss();
            nn += (double)dir[h * D + d] * dir[h * D + d];
        }
        for (d = 0; d < D; d++) dir[h * D + d] = (float)(dir[h * D + d] / sqrt(nn));
    }
    while (done < N) {
        int n = 1 + step % max_step, t, nq;
        kvq_attn_params ap;
        double e;
        if (n > N - done) n = N - done;
        for (t = 0; t < n; t++) {
            int pos = done + t - S, off = pos >= 0 ? pos % (KB ? KB : G) : -1, planted = off >= 0 && off % 2 == 1 && off < 2 * n_sal;
            for (h = 0; h < H; h++)
                for (d = 0; d < D; d++) {
                    size_t at = ((size_t)t * H + h) * D + d;
                    k[at] = planted ? 1.25f * sqrtf((float)D) * dir[h * D + d] + 0.5f * gauss() : gauss();
                    v[at] = gauss();
                }
        }
        CUDA_OK(cudaMemcpy(d_k, k, (size_t)n * H * D * sizeof(float), cudaMemcpyHostToDevice));
        CUDA_OK(cudaMemcpy(d_v, v, (size_t)n * H * D * sizeof(float), cudaMemcpyHostToDevice));
        CHECK(kvq_cache_append(cpu, k, v, n) == KVQ_OK && kvq_cuda_cache_append(gpu, d_k, d_v, n, 0) == KVQ_OK,
              "%s: append", name);
        done += n;
        nq = 1 + step % MAXQ < done ? 1 + step % MAXQ : done;
        for (i = 0; i < nq * QH; i++)
            for (d = 0; d < D; d++) q[(size_t)i * D + d] = 8.0f * dir[(i % QH) / GQA * D + d] + gauss();
        ap.n_q_heads = QH;
        ap.n_queries = nq;
        ap.scale = 0.0f;
        CUDA_OK(cudaMemcpy(d_q, q, (size_t)nq * QH * D * sizeof(float), cudaMemcpyHostToDevice));
        CHECK(kvq_attention(cpu, q, o_cpu, &ap) == KVQ_OK && kvq_cuda_attention(gpu, d_q, d_o, &ap, 0) == KVQ_OK,
              "%s: attention", name);
        CUDA_OK(cudaMemcpy(o_gpu, d_o, (size_t)nq * QH * D * sizeof(float), cudaMemcpyDeviceToHost));
        e = tu_nmse(o_gpu, o_cpu, (size_t)nq * QH * D);
        CHECK(e < 1e-6, "%s: attention NMSE %.3g at %d tokens", name, e, done);
        if (step % 5 == 4 || done == N) {
            char what[200];
            snprintf(what, sizeof what, "%s after %d tokens", name, done);
            CHECK(same_tracked(cpu, gpu, what), "%s: cache differs", what);
        }
        step++;
    }
    for (h = 0; h < H; h++)
        for (b = 0; b < cpu->n_kblocks; b++)
            for (j = 0; j < n_sal; j++) wrong += kvq__side_index(kvq__side_entry(cpu, h, b, j)) != 2 * j + 1;
    CHECK(cpu->n_kblocks > 0 && wrong == 0, "%s: %d picks of %d blocks are not the planted tokens", name, wrong,
          cpu->n_kblocks);
    cudaFree(d_k);
    cudaFree(d_v);
    cudaFree(d_q);
    cudaFree(d_o);
    free(dir);
    free(k);
    free(v);
    free(q);
    free(o_cpu);
    free(o_gpu);
    kvq_cache_destroy(cpu);
    kvq_cuda_cache_destroy(gpu);
}

/* The rollback history stays on the host: a cache downloaded from the device has none, so
   its first cut is deep, the same bytes as a history-free copy of the cache cut there. */
static void test_history(void) {
    kvq_config cfg = kvq_default_config(32, 2, 300);
    kvq_cuda_cache *g = NULL;
    kvq_cache *h = NULL, *cp = NULL;
    float *k = (float *)malloc(sizeof(float) * 101 * 64), *v = (float *)malloc(sizeof(float) * 101 * 64);
    tu_rng r = {0x415u};
    size_t na, nb;
    uint8_t *ia, *ib;
    cfg.key_block = 0; /* = G */
    cfg.residual_tokens = 32;
    tu_fill_kv(&r, TU_RANDOM, 101, 2, 32, k, v);
    CHECK(kvq_cache_create(&h, &cfg) == KVQ_OK && kvq_cache_create(&cp, &cfg) == KVQ_OK &&
              kvq_cuda_cache_create(&g, &cfg) == KVQ_OK, "history: create");
    if (!h || !cp || !g) exit(2);
    CHECK(kvq_cache_append(h, k, v, 100) == KVQ_OK && h->n_hist == 16, "history: 16 appends kept");
    CHECK(kvq_cuda_cache_upload(g, h, 0) == KVQ_OK && kvq_cache_append(h, k + 100 * 64, v + 100 * 64, 1) == KVQ_OK &&
              kvq_cuda_cache_download(g, h, 0) == KVQ_OK && kvq_cache_tokens(h) == 100 && h->n_hist == 0,
          "history: none after a download");
    CHECK(kvq_cache_copy(cp, h, 100) == KVQ_OK && kvq_cache_truncate(h, 67) == KVQ_OK &&
              kvq_cache_truncate(cp, 67) == KVQ_OK, "history: deep cuts");
    na = kvq_cache_serialized_bytes(h);
    nb = kvq_cache_serialized_bytes(cp);
    ia = (uint8_t *)malloc(na);
    ib = (uint8_t *)malloc(nb);
    CHECK(na == nb && kvq_cache_serialize(h, ia, na, NULL) == KVQ_OK && kvq_cache_serialize(cp, ib, nb, NULL) == KVQ_OK &&
              memcmp(ia, ib, na) == 0, "history: a downloaded cache cuts as a copy does");
    free(ia); free(ib); free(k); free(v);
    kvq_cuda_cache_destroy(g);
    kvq_cache_destroy(h);
    kvq_cache_destroy(cp);
}

int main(int argc, char **argv) {
    static const int bits[][2] = {{2, 2}, {3, 3}, {4, 4}, {8, 8}, {16, 16}, {2, 16}, {16, 2}, {4, 2}, {3, 8}, {2, 4}};
    static const int gs[] = {16, 32, 64, 128};
    static const int dims[] = {8, 16, 40, 64, 80, 96, 112, 128, 136, 256};
    static const int heads[][2] = {{1, 1}, {2, 4}, {4, 2}, {1, 8}, {2, 12}, {3, 1}};
    int devices = 0, i, quick = argc > 1 && strcmp(argv[1], "--quick") == 0, n_cases = quick ? 40 : 240;
    cudaError_t e = cudaGetDeviceCount(&devices);
    kvq_set_arith(KVQ_ARITH_FLOAT); /* the GPU kernels compute the float scheme: compare with kvq.h's */
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
        tc.rot = i % 8 == 3 ? KVQ_ROTATE_HADAMARD : i % 8 == 6 ? KVQ_ROTATE_PREROTATED : KVQ_ROTATE_NONE;
        tc.sal = 0.0f;
        tc.sal_bits = 8;
        tc.policy = KVQ_SALIENT_ATTENTION;
        tc.key_axis = KVQ_KEYS_PER_CHANNEL;
        tc.search = i % 5 == 4 ? 0 : i % 5 == 2 ? 8 : 4; /* min/max, the widest search, the default */
        tc.kb = 0;
        tc.vpb = 0;
        run_case(&tc, i);
    }
    /* salient tokens: both policies, both side-store widths, every key width, rotation,
       ragged value groups (D 40, 72, 136 against G 32..128) */
    for (i = 0; i < (quick ? 12 : 48); i++) {
        static const int sbits[][2] = {{2, 2}, {3, 4}, {4, 2}, {8, 3}, {16, 2}, {2, 16}};
        static const int sdims[] = {40, 64, 136, 72, 128, 8, 96};
        static const float ratios[] = {0.05f, 0.1f, 0.25f};
        test_case tc;
        int hh = (i * 5 + i / 6) % 6;
        tc.D = sdims[i % 7];
        tc.kbits = sbits[i % 6][0];
        tc.vbits = sbits[i % 6][1];
        tc.G = gs[(i / 6 + i) % 4];
        tc.H = heads[hh][0];
        tc.ratio = heads[hh][1];
        tc.R = (i / 3) % 2 ? 128 : 0;
        tc.S = i % 5;
        tc.tokens = 150 + (int)(rnd() % 450);
        tc.rot = i % 4 == 1 ? KVQ_ROTATE_HADAMARD : i % 4 == 3 ? KVQ_ROTATE_PREROTATED : KVQ_ROTATE_NONE;
        tc.sal = ratios[i % 3];
        tc.sal_bits = (i / 3) % 4 < 2 ? 8 : 16;
        tc.policy = (i / 2) % 2 ? KVQ_SALIENT_ERROR : KVQ_SALIENT_ATTENTION;
        tc.key_axis = KVQ_KEYS_PER_CHANNEL;
        tc.search = i % 4 == 2 ? 0 : 4; /* searched keys weighted by recorded attention, or min/max */
        tc.kb = 0;
        tc.vpb = 0;
        run_case(&tc, 1000 + i);
    }
    /* keys per token (stored like values): every key width, rotated or not, ragged groups */
    for (i = 0; i < (quick ? 10 : 40); i++) {
        test_case tc;
        int hh = (i * 5 + i / 10) % 6;
        tc.D = dims[(i * 3 + i / 10) % 10];
        tc.kbits = bits[i % 10][0];
        tc.vbits = bits[i % 10][1];
        tc.G = gs[(i / 10 + i) % 4];
        tc.H = heads[hh][0];
        tc.ratio = heads[hh][1];
        tc.R = (i / 2) % 3 == 0 ? 0 : (i / 2) % 3 == 1 ? 128 : 256;
        tc.S = i % 6;
        tc.tokens = 150 + (int)(rnd() % 450);
        tc.rot = i % 3 == 1 ? KVQ_ROTATE_HADAMARD : i % 6 == 2 ? KVQ_ROTATE_PREROTATED : KVQ_ROTATE_NONE;
        tc.sal = 0.0f;
        tc.sal_bits = 8;
        tc.policy = KVQ_SALIENT_ATTENTION;
        tc.key_axis = KVQ_KEYS_PER_TOKEN;
        tc.search = i % 3 == 0 ? 0 : 3;
        tc.kb = 0;
        tc.vpb = 0;
        run_case(&tc, 2000 + i);
    }
    /* format v2: key blocks of key_block tokens apart from the value groups' G channels
       (longer, shorter, equal), and 16-bit value params, over every value width (searched at
       2 and 3 bits), 16-bit keys (fp16 blocks of key_block rows), ragged value groups,
       salient tokens (both policies, both widths: side-store indices within key_block),
       keys per token and rotation */
    for (i = 0; i < (quick ? 18 : 72); i++) {
        static const int kbg[][2] = {{64, 32}, {16, 64}, {128, 16}, {32, 128}, {16, 32}, {32, 32}};
        static const int vbits[][2] = {{2, 2}, {3, 3}, {4, 4}, {2, 8}, {16, 3}, {3, 16}, {8, 2}, {4, 3}, {2, 4}};
        static const int vdims[] = {64, 40, 128, 136, 80, 96, 256, 72};
        test_case tc;
        int hh = (i * 5 + i / 6) % 6, j = i + i / 6; /* j: each pair of sizes meets every option */
        tc.kb = kbg[i % 6][0];
        tc.G = kbg[i % 6][1];
        tc.vpb = j % 3 == 2 ? 0 : 16;
        tc.kbits = vbits[(i + i / 9) % 9][0];
        tc.vbits = vbits[(i + i / 9) % 9][1];
        tc.D = vdims[(i * 3 + i / 8) % 8];
        if (tc.vbits == 4 || tc.vbits == 8) tc.vpb = 0; /* 16-bit params: 2- and 3-bit values only */
        tc.H = heads[hh][0];
        tc.ratio = heads[hh][1];
        tc.R = (i / 2) % 3 == 0 ? 0 : (i / 2) % 3 == 1 ? 128 : 256;
        tc.S = i % 5;
        tc.tokens = 150 + (int)(rnd() % 450);
        tc.rot = i % 5 == 1 ? KVQ_ROTATE_HADAMARD : i % 5 == 3 ? KVQ_ROTATE_PREROTATED : KVQ_ROTATE_NONE;
        tc.sal = j % 4 == 1 ? (j % 8 == 1 ? 0.1f : 0.25f) : 0.0f;
        tc.sal_bits = (j / 4) % 2 ? 16 : 8;
        tc.policy = (j / 8) % 2 ? KVQ_SALIENT_ERROR : KVQ_SALIENT_ATTENTION;
        tc.key_axis = j % 4 == 3 ? KVQ_KEYS_PER_TOKEN : KVQ_KEYS_PER_CHANNEL;
        tc.search = i % 7 == 5 ? 0 : i % 7 == 2 ? 8 : 4;
        run_case(&tc, 3000 + i);
    }
    test_errors();
    test_batch(0);
    test_batch(1);
    test_batch(2);
    test_batch(3);
    test_batch_all_or_nothing();
    {
        static const int rdims[] = {8, 64, 72, 80, 96, 112, 128, 160, 256};
        for (i = 0; i < (int)(sizeof rdims / sizeof rdims[0]); i++)
            test_rotation(rdims[i], i % 3 == 2 ? 16 : (i % 2 ? 4 : 2), i % 2 ? 32 : 16, i % 3,
                          i % 4 == 3 ? KVQ_ROTATE_PREROTATED : KVQ_ROTATE_HADAMARD);
    }
    test_rotation_range();
    test_salient_ties();
    test_streams();
    test_scratch();
#ifndef KVQ_CUDA_EMU
    test_graph_capture();
#endif
    test_host_pointers();
    test_pending_error();
    test_images();
    test_history();
    /* tracked attention choosing the salient tokens */
    test_tracking(64, 32, 0, 0.1f, 8, 2, KVQ_ROTATE_NONE, 32, 4, 3);
    test_tracking(40, 16, 0, 0.25f, 16, 4, KVQ_ROTATE_HADAMARD, 16, 0, 3);
    test_tracking(128, 64, 0, 0.05f, 8, 3, KVQ_ROTATE_NONE, 0, 1, 1);
    test_tracking(64, 32, 64, 0.1f, 8, 2, KVQ_ROTATE_NONE, 64, 2, 3);   /* key blocks longer than value groups */
    test_tracking(136, 64, 16, 0.25f, 16, 3, KVQ_ROTATE_NONE, 32, 1, 2); /* and shorter */
    if (!quick) {
        test_tracking(136, 32, 0, 0.1f, 16, 8, KVQ_ROTATE_NONE, 64, 2, 3);
        test_tracking(96, 16, 0, 0.25f, 8, 16, KVQ_ROTATE_HADAMARD, 32, 3, 2);
        test_tracking(64, 128, 0, 0.05f, 8, 2, KVQ_ROTATE_PREROTATED, 128, 4, 3);
        test_tracking(80, 16, 128, 0.05f, 8, 2, KVQ_ROTATE_HADAMARD, 128, 0, 3);
    }
    test_long(2, 2);
    if (!quick) {
        test_long(4, 4);
        test_long(16, 16);
    }
    return tu_finish("test_cuda");
}
