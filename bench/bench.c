/* bench/bench.c - decode-attention and append benchmark for kvq.h.

   What it measures, all in one run on the same data:
     - this machine's single-thread memory read bandwidth (streaming sum over a
       buffer far larger than L3), the floor every decode kernel is held to;
     - decode attention (one query, head_dim 128) for GQA 32/8 and MHA 8/8 at
       N tokens, for kvq caches at 16 (fp16 baseline), 8, 4, 3 and 2 bits and
       for a hand-written fp32 cache implemented here, on 1 and 2 threads
       (2 threads: kvq_attention_partial on disjoint token ranges, then
       kvq_attention_merge);
     - the average cost of appending one token (8 KV heads) to each cache.
   It prints a table, writes CSV (after '#' lines: CPU model, date, kvq version) and an SVG:
   time vs N (log-log, one line per config) above bars of each config's speed-up over fp16.

   Build:  gcc -std=c99 -O2 -march=native -Wall -Wextra -Werror -pthread -I. \
               bench/bench.c -o build/bench -lm
   Run:    build/bench [--quick] [--n 1K,4K] [--configs fp32,16,4,2] [--threads 1,2]
                       [--heads gqa,mha] [--csv PATH] [--svg PATH] [--min-time SEC]
*/
#define _POSIX_C_SOURCE 200809L
#define _DEFAULT_SOURCE /* glibc's default features, as a plain `cc app.c` has: kvq_cache_create
                           asks for transparent huge pages (KVQ_NO_HUGEPAGES) */
#define KVQ_IMPLEMENTATION
#include "kvq.h"

#include <math.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#define HD 128          /* head_dim */
#define KVH 8           /* KV heads stored in every cache */
#define MAX_THREADS 8
#define MAX_NS 16
#define FILL_CHUNK 256  /* tokens generated and appended at a time */
#define APPEND_POOL 256 /* distinct input tokens cycled through by the append benchmark */

/* ------------------------------------------------------------------------ */
/* Configs. bits 32 is the fp32 cache implemented in this file.             */

typedef struct cfgspec {
    int bits;
    int salient_pct;   /* salient tokens per key block, percent (0 = off) */
    const char *name;  /* CSV / table name */
    const char *label; /* chart legend */
    const char *color;
    int rotate;        /* 1: KVQ_ROTATE_HADAMARD (the rotation's share of attention time) */
    int per_token;     /* 1: keys quantized per token (KVQ_KEYS_PER_TOKEN), as values are */
    int search;        /* range_search: -1 = kvq_default_config's, 0 = min/max ranges */
    int vbits;         /* value bits when they differ from bits (0: the same) */
    int key_block;     /* tokens per key block (0: group_size) */
    int pbits;         /* value_param_bits (0 = 32: fp16 params) */
    kvq_arith arith;   /* attention arithmetic (KVQ_ARITH_AUTO: integer where the ISA has it) */
} cfgspec;

static const cfgspec CFGS[] = {
    {32, 0, "fp32", "fp32 (hand-written)", "#444444", 0, 0, -1, 0, 0, 0, KVQ_ARITH_AUTO},
    {16, 0, "kvq-16", "kvq fp16", "#d62728", 0, 0, -1, 0, 0, 0, KVQ_ARITH_AUTO},
    {8, 0, "kvq-8", "kvq 8-bit", "#ff7f0e", 0, 0, -1, 0, 0, 0, KVQ_ARITH_AUTO},
    {4, 0, "kvq-4", "kvq 4-bit", "#2ca02c", 0, 0, -1, 0, 0, 0, KVQ_ARITH_AUTO},
    {3, 0, "kvq-3", "kvq 3-bit", "#1f77b4", 0, 0, -1, 0, 0, 0, KVQ_ARITH_AUTO},
    {2, 0, "kvq-2", "kvq 2-bit", "#9467bd", 0, 0, -1, 0, 0, 0, KVQ_ARITH_AUTO},
    {2, 5, "kvq-2x5", "kvq 2-bit + 5% salient", "#8c564b", 0, 0, -1, 0, 0, 0, KVQ_ARITH_AUTO},
    {2, 10, "kvq-2x10", "kvq 2-bit + 10% salient", "#e377c2", 0, 0, -1, 0, 0, 0, KVQ_ARITH_AUTO},
    {2, 0, "kvq-2h", "kvq 2-bit + Hadamard rotation", "#17becf", 1, 0, -1, 0, 0, 0, KVQ_ARITH_AUTO},
    {2, 0, "kvq-2t", "kvq 2-bit, keys per token", "#bcbd22", 0, 1, -1, 0, 0, 0, KVQ_ARITH_AUTO},
    {2, 0, "kvq-2c0", "kvq 2-bit, min/max ranges", "#7f7f7f", 0, 0, 0, 0, 0, 0, KVQ_ARITH_AUTO},
    {2, 0, "kvq-2p32", "kvq 2-bit, fp16 value params", "#aec7e8", 0, 0, -1, 0, 0, 32, KVQ_ARITH_AUTO},
    {2, 0, "kvq-2p16", "kvq 2-bit, 16-bit value params", "#c5b0d5", 0, 0, -1, 0, 0, 16, KVQ_ARITH_AUTO},
    {3, 0, "kvq-k3v2", "kvq K3V2, the default: 3-bit K (blocks of 64), 2-bit V (16-bit params)", "#393b79", 0, 0, -1, 2, 64, 16, KVQ_ARITH_AUTO},
    {2, 0, "kvq-2f", "kvq 2-bit, float kernels", "#637939", 0, 0, -1, 0, 0, 0, KVQ_ARITH_FLOAT},
    {3, 0, "kvq-k3v2f", "kvq K3/V2 (as kvq-k3v2), float kernels", "#8c6d31", 0, 0, -1, 2, 64, 16, KVQ_ARITH_FLOAT},
};
#define N_CFGS ((int)(sizeof CFGS / sizeof CFGS[0]))
#define CFG_FP16 1

typedef struct options {
    int quick;
    int ns[MAX_NS], n_ns;
    int cfgs[N_CFGS], n_cfgs;
    int threads[MAX_THREADS], n_threads;
    int heads[2], n_heads; /* query heads: 32 (GQA 32/8) and/or 8 (MHA 8/8) */
    const char *csv_path, *svg_path;
    double min_time;  /* seconds a row keeps repeating after min_reps */
    int min_reps, max_reps;
    int append_tokens;
    size_t bw_bytes;
} options;

/* ------------------------------------------------------------------------ */
/* Small utilities.                                                          */

#include "bench_clock.h" /* now_s, cpu_s, measure_ghz */
static double g_ghz; /* measured at start; 0 = unknown */

static void die(const char *what) {
    fprintf(stderr, "bench: %s\n", what);
    exit(1);
}

static void check(kvq_status s, const char *what) {
    if (s != KVQ_OK) {
        fprintf(stderr, "bench: %s failed: %s\n", what, kvq_status_string(s));
        exit(1);
    }
}

static void *xmalloc(size_t n) {
    void *p = malloc(n ? n : 1);
    if (!p) die("out of memory");
    return p;
}

static int cmp_double(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return x < y ? -1 : x > y;
}

static double median(double *v, int n) {
    qsort(v, (size_t)n, sizeof *v, cmp_double);
    return n % 2 ? v[n / 2] : 0.5 * (v[n / 2 - 1] + v[n / 2]);
}

static void fmt_tokens(int n, char *buf, size_t cap) {
    if (n >= 1024 && n % 1024 == 0) snprintf(buf, cap, "%dK", n / 1024);
    else snprintf(buf, cap, "%d", n);
}

static const char *heads_label(int nq) { return nq == KVH ? "MHA 8/8" : "GQA 32/8"; }

/* ------------------------------------------------------------------------ */
/* Thread pool: n-1 persistent workers plus the calling thread. One job at a
   time; a job is fn(arg, index) for index 0..n-1 (0 runs on the caller).
   Each dispatch costs one condition-variable wake-up per worker.            */

typedef struct pool pool;
typedef struct pool_worker {
    pool *p;
    int index;
    unsigned seen;
} pool_worker;

struct pool {
    int n;
    pthread_t th[MAX_THREADS];
    pool_worker w[MAX_THREADS];
    pthread_mutex_t mu;
    pthread_cond_t go, done;
    unsigned gen;
    int pending, quit;
    void (*fn)(void *, int);
    void *arg;
};

static void *pool_main(void *vp) {
    pool_worker *w = (pool_worker *)vp;
    pool *p = w->p;
    for (;;) {
        void (*fn)(void *, int);
        void *arg;
        pthread_mutex_lock(&p->mu);
        while (!p->quit && p->gen == w->seen) pthread_cond_wait(&p->go, &p->mu);
        if (p->quit) {
            pthread_mutex_unlock(&p->mu);
            return NULL;
        }
        w->seen = p->gen;
        fn = p->fn;
        arg = p->arg;
        pthread_mutex_unlock(&p->mu);
        fn(arg, w->index);
        pthread_mutex_lock(&p->mu);
        if (--p->pending == 0) pthread_cond_signal(&p->done);
        pthread_mutex_unlock(&p->mu);
    }
}

static void pool_start(pool *p, int n) {
    int i;
    memset(p, 0, sizeof *p);
    p->n = n;
    pthread_mutex_init(&p->mu, NULL);
    pthread_cond_init(&p->go, NULL);
    pthread_cond_init(&p->done, NULL);
    for (i = 1; i < n; i++) {
        p->w[i].p = p;
        p->w[i].index = i;
        if (pthread_create(&p->th[i], NULL, pool_main, &p->w[i]) != 0) die("pthread_create failed");
    }
}

static void pool_run(pool *p, void (*fn)(void *, int), void *arg) {
    if (p->n > 1) {
        pthread_mutex_lock(&p->mu);
        p->fn = fn;
        p->arg = arg;
        p->pending = p->n - 1;
        p->gen++;
        pthread_cond_broadcast(&p->go);
        pthread_mutex_unlock(&p->mu);
    }
    fn(arg, 0);
    if (p->n > 1) {
        pthread_mutex_lock(&p->mu);
        while (p->pending) pthread_cond_wait(&p->done, &p->mu);
        pthread_mutex_unlock(&p->mu);
    }
}

static void pool_stop(pool *p) {
    int i;
    pthread_mutex_lock(&p->mu);
    p->quit = 1;
    pthread_cond_broadcast(&p->go);
    pthread_mutex_unlock(&p->mu);
    for (i = 1; i < p->n; i++) pthread_join(p->th[i], NULL);
    pthread_mutex_destroy(&p->mu);
    pthread_cond_destroy(&p->go);
    pthread_cond_destroy(&p->done);
}

/* Token range of part i of n: split points rounded down to 128 tokens (a whole
   number of key blocks for every group size) when that leaves parts non-empty. */
static void split_range(int N, int parts, int i, int *lo, int *hi) {
    int a = (int)((long long)N * i / parts), b = (int)((long long)N * (i + 1) / parts);
    if (N / parts >= 128) {
        a = i == 0 ? 0 : a / 128 * 128;
        b = i == parts - 1 ? N : b / 128 * 128;
    }
    *lo = a;
    *hi = b;
}

/* ------------------------------------------------------------------------ */
/* Memory bandwidth: a streaming float sum. 64 independent lanes keep enough
   adds in flight; each lane sums in order, so the compiler may vectorize it
   across lanes without -ffast-math.                                         */

#define BW_LANES 64

typedef struct bw_job {
    const float *buf;
    size_t n; /* floats, a multiple of BW_LANES * threads */
    int parts;
    float result[MAX_THREADS];
} bw_job;

static float sum_stream(const float *p, size_t n) {
    float acc[BW_LANES], s = 0.0f;
    size_t i;
    int j;
    for (j = 0; j < BW_LANES; j++) acc[j] = 0.0f;
    for (i = 0; i + BW_LANES <= n; i += BW_LANES)
        for (j = 0; j < BW_LANES; j++) acc[j] += p[i + j];
    for (j = 0; j < BW_LANES; j++) s += acc[j];
    return s;
}

static void bw_part(void *arg, int idx) {
    bw_job *job = (bw_job *)arg;
    size_t per = job->n / (size_t)job->parts;
    job->result[idx] = sum_stream(job->buf + per * (size_t)idx, per);
}

static volatile float g_sink;

/* GB/s (1e9 bytes/s), median of several passes after one warm-up pass. */
static double measure_bandwidth(pool *p, float *buf, size_t bytes, int passes) {
    bw_job job;
    double t[16];
    int k, i;
    job.buf = buf;
    job.n = bytes / sizeof(float) / (BW_LANES * MAX_THREADS) * (BW_LANES * MAX_THREADS);
    job.parts = p->n;
    if (passes > 16) passes = 16;
    for (k = -1; k < passes; k++) {
        double t0 = now_s();
        float s = 0.0f;
        pool_run(p, bw_part, &job);
        for (i = 0; i < p->n; i++) s += job.result[i];
        g_sink = s;
        if (k >= 0) t[k] = now_s() - t0;
    }
    return (double)job.n * sizeof(float) / median(t, passes) / 1e9;
}

/* ------------------------------------------------------------------------ */
/* Data. Counter-based, so any chunk of tokens can be regenerated alone and
   every config sees exactly the same keys, values and queries.
   Normal-ish: the sum of four 16-bit uniforms (Irwin-Hall), unit variance.
   Keys: a per-channel mean, and two channels per head 8x larger (the outlier
   channels real keys have). Values: unit scale, one channel 3x larger.      */

static uint64_t mix64(uint64_t x) {
    x += 0x9e3779b97f4a7c15ull;
    x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ull;
    x = (x ^ (x >> 27)) * 0x94d049bb133111ebull;
    return x ^ (x >> 31);
}

static float normalish(uint64_t key) {
    uint64_t r = mix64(key);
    float s = (float)(r & 0xffff) + (float)((r >> 16) & 0xffff) + (float)((r >> 32) & 0xffff) +
              (float)(r >> 48);
    return (s * (1.0f / 65535.0f) - 2.0f) * 1.7320508f; /* mean 0, variance 1 */
}

enum { KIND_K = 0, KIND_V = 1, KIND_Q = 2, KIND_MEAN = 3 };

static float g_kscale[KVH][HD], g_kmean[KVH][HD], g_vscale[KVH][HD];

static void init_profiles(void) {
    int h, d;
    for (h = 0; h < KVH; h++)
        for (d = 0; d < HD; d++) {
            g_kscale[h][d] = (d * 7 + h * 29) % 64 == 0 ? 8.0f : 1.0f;
            g_kmean[h][d] = 0.5f * normalish(((uint64_t)h * HD + (uint64_t)d) * 4 + KIND_MEAN);
            g_vscale[h][d] = (d * 5 + h * 11) % 128 == 0 ? 3.0f : 1.0f;
        }
}

static uint64_t data_key(int t, int h, int d, int kind) {
    return ((((uint64_t)t * KVH + (uint64_t)h) * HD + (uint64_t)d) << 2) | (uint64_t)kind;
}

/* k, v: [n][KVH][HD] for tokens [t0, t0+n). */
static void gen_tokens(int t0, int n, float *k, float *v) {
    int t, h, d;
    for (t = 0; t < n; t++)
        for (h = 0; h < KVH; h++) {
            float *kr = k + ((size_t)t * KVH + h) * HD, *vr = v + ((size_t)t * KVH + h) * HD;
            for (d = 0; d < HD; d++) {
                kr[d] = normalish(data_key(t0 + t, h, d, KIND_K)) * g_kscale[h][d] + g_kmean[h][d];
                vr[d] = normalish(data_key(t0 + t, h, d, KIND_V)) * g_vscale[h][d];
            }
        }
}

/* q: [nq][HD]; separate streams for GQA and MHA. */
static void gen_queries(int nq, float *q) {
    int j, d;
    for (j = 0; j < nq; j++)
        for (d = 0; d < HD; d++) q[(size_t)j * HD + d] = normalish(data_key(nq, j, d, KIND_Q) ^ (1ull << 62));
}

/* ------------------------------------------------------------------------ */
/* The fp32 baseline: K, V as [kv_head][token][HD] floats. One pass over the
   tokens of a KV head, in tiles; each K row is scored against every query
   head of the group while it is in L1, each V row is added into every
   head's accumulator likewise. Online softmax with one rescale per tile.
   The inner loops have fixed trip counts and restrict pointers so -O2
   vectorizes them without reassociating any sum (lanes keep their order);
   fmaf() becomes a vector FMA where the target has one (-std=c99 turns off
   implicit contraction). Value accumulators live in registers for a whole
   tile: 16 channels at a time, four query heads (GQA) or four token phases
   (MHA) as independent FMA chains, each V slice loaded once for all heads.
   Tried and dropped: software prefetch of the next tile (no gain here). */

#define FP_TILE 64 /* tokens per tile: 32 KB of K, then 32 KB of V */
#define FP_MAX_GROUP 8
#define STATE_STRIDE (HD + 2) /* m, l, acc[HD] per query head: kvq's state layout */

typedef struct fp32cache {
    int n; /* tokens */
    float *k, *v;
} fp32cache;

static void axpy_hd(float *restrict acc, const float *restrict x, float a) {
    int d;
    for (d = 0; d < HD; d++) acc[d] += a * x[d];
}

static void scale_hd(float *restrict acc, float a) {
    int d;
    for (d = 0; d < HD; d++) acc[d] *= a;
}

/* 32 lanes: two independent FMA chains per dot, each 4 long. */
static float dot_hd(const float *restrict a, const float *restrict b) {
    float part[32];
    int i, j;
    for (j = 0; j < 32; j++) part[j] = a[j] * b[j];
    for (i = 32; i < HD; i += 32)
        for (j = 0; j < 32; j++) part[j] = fmaf(a[i + j], b[i + j], part[j]);
    for (j = 0; j < 16; j++) part[j] += part[j + 16];
    for (j = 0; j < 8; j++) part[j] += part[j + 8];
    for (j = 0; j < 4; j++) part[j] += part[j + 4];
    return (part[0] + part[2]) + (part[1] + part[3]);
}
/* Four query heads: acc_j[16 channels at d0] += sum_t p_j[t] V[t][d0..], each V slice loaded once. */
static void pv_heads4(float *st, const float *restrict V, float (*p)[FP_TILE], int n, int d0) {
    float a0[16], a1[16], a2[16], a3[16];
    float *r0 = st + 2 + d0, *r1 = r0 + STATE_STRIDE, *r2 = r1 + STATE_STRIDE, *r3 = r2 + STATE_STRIDE;
    int t, l;
    for (l = 0; l < 16; l++) { a0[l] = r0[l]; a1[l] = r1[l]; a2[l] = r2[l]; a3[l] = r3[l]; }
    for (t = 0; t < n; t++) {
        const float *restrict v = V + (size_t)t * HD + d0;
        float p0 = p[0][t], p1 = p[1][t], p2 = p[2][t], p3 = p[3][t];
        for (l = 0; l < 16; l++) {
            a0[l] = fmaf(p0, v[l], a0[l]);
            a1[l] = fmaf(p1, v[l], a1[l]);
            a2[l] = fmaf(p2, v[l], a2[l]);
            a3[l] = fmaf(p3, v[l], a3[l]);
        }
    }
    for (l = 0; l < 16; l++) { r0[l] = a0[l]; r1[l] = a1[l]; r2[l] = a2[l]; r3[l] = a3[l]; }
}
/* One query head: four token phases, so four independent chains, summed at the end. */
static void pv_head1(float *st, const float *restrict V, const float *p, int n, int d0) {
    float a0[16], a1[16], a2[16], a3[16];
    float *r = st + 2 + d0;
    int t, l;
    for (l = 0; l < 16; l++) { a0[l] = r[l]; a1[l] = 0.0f; a2[l] = 0.0f; a3[l] = 0.0f; }
    for (t = 0; t + 4 <= n; t += 4) {
        const float *restrict v = V + (size_t)t * HD + d0;
        float p0 = p[t], p1 = p[t + 1], p2 = p[t + 2], p3 = p[t + 3];
        for (l = 0; l < 16; l++) {
            a0[l] = fmaf(p0, v[l], a0[l]);
            a1[l] = fmaf(p1, v[l + HD], a1[l]);
            a2[l] = fmaf(p2, v[l + 2 * HD], a2[l]);
            a3[l] = fmaf(p3, v[l + 3 * HD], a3[l]);
        }
    }
    for (; t < n; t++)
        for (l = 0; l < 16; l++) a0[l] = fmaf(p[t], V[(size_t)t * HD + d0 + l], a0[l]);
    for (l = 0; l < 16; l++) r[l] = (a0[l] + a1[l]) + (a2[l] + a3[l]);
}
/* Query heads q[g][HD] of one KV head, tokens [lo, hi); st: g rows of STATE_STRIDE. */
static void fp32_range(const float *K, const float *V, const float *q, int g, float scale, int lo, int hi,
                       float *st) {
    float s[FP_MAX_GROUP][FP_TILE];
    int t0, t, j, d0;
    for (t0 = lo; t0 < hi; t0 += FP_TILE) {
        int n = hi - t0 < FP_TILE ? hi - t0 : FP_TILE;
        const float *Kt = K + (size_t)t0 * HD, *Vt = V + (size_t)t0 * HD;
        for (j = 0; j < g; j++) {
            const float *qj = q + (size_t)j * HD;
            for (t = 0; t < n; t++) s[j][t] = dot_hd(qj, Kt + (size_t)t * HD) * scale;
        }
        for (j = 0; j < g; j++) {
            float *row = st + (size_t)j * STATE_STRIDE, mx = row[0], sum = 0.0f;
            for (t = 0; t < n; t++) mx = s[j][t] > mx ? s[j][t] : mx;
            if (mx > row[0]) {
                float corr = expf(row[0] - mx);
                row[1] *= corr;
                scale_hd(row + 2, corr);
                row[0] = mx;
            }
            for (t = 0; t < n; t++) {
                float p = expf(s[j][t] - mx);
                s[j][t] = p;
                sum += p;
            }
            row[1] += sum;
        }
        for (j = 0; j + 4 <= g; j += 4)
            for (d0 = 0; d0 < HD; d0 += 16) pv_heads4(st + (size_t)j * STATE_STRIDE, Vt, s + j, n, d0);
        for (; j < g; j++)
            for (d0 = 0; d0 < HD; d0 += 16) pv_head1(st + (size_t)j * STATE_STRIDE, Vt, s[j], n, d0);
    }
}

/* All query heads over tokens [lo, hi) into state[nq][STATE_STRIDE]. */
static void fp32_partial(const fp32cache *c, const float *q, int nq, int lo, int hi, float *state) {
    int group = nq / KVH, h, qh, j;
    float scale = 1.0f / sqrtf((float)HD);
    for (j = 0; j < nq; j++) {
        float *row = state + (size_t)j * STATE_STRIDE;
        row[0] = -INFINITY;
        row[1] = 0.0f;
        memset(row + 2, 0, HD * sizeof(float));
    }
    for (h = 0; h < KVH; h++)
        for (qh = h * group; qh < (h + 1) * group; qh += FP_MAX_GROUP) {
            int g = (h + 1) * group - qh < FP_MAX_GROUP ? (h + 1) * group - qh : FP_MAX_GROUP;
            fp32_range(c->k + (size_t)h * c->n * HD, c->v + (size_t)h * c->n * HD, q + (size_t)qh * HD, g, scale,
                       lo, hi, state + (size_t)qh * STATE_STRIDE);
        }
}

static void fp32_merge(const float *const *states, int n_states, int nq, float *out) {
    int r, k, d;
    for (r = 0; r < nq; r++) {
        float m = -INFINITY, l = 0.0f, *o = out + (size_t)r * HD;
        for (k = 0; k < n_states; k++) m = states[k][(size_t)r * STATE_STRIDE] > m ? states[k][(size_t)r * STATE_STRIDE] : m;
        for (d = 0; d < HD; d++) o[d] = 0.0f;
        for (k = 0; k < n_states; k++) {
            const float *sk = states[k] + (size_t)r * STATE_STRIDE;
            float w;
            if (!(sk[1] > 0.0f)) continue;
            w = expf(sk[0] - m);
            l += w * sk[1];
            axpy_hd(o, sk + 2, w);
        }
        scale_hd(o, 1.0f / l);
    }
}

/* ------------------------------------------------------------------------ */
/* One benchmarked call: attention over the whole cache, on pool->n threads. */

typedef struct attn_job {
    int is_fp32;
    fp32cache *fc;
    kvq_cache *kc;
    kvq_attn_params ap;
    kvq_arith arith;
    const float *q;
    float *out;
    float *states[MAX_THREADS];
    int n_tokens, parts;
    pool *pool;
    kvq_status err[MAX_THREADS];
} attn_job;

static void attn_part(void *arg, int idx) {
    attn_job *j = (attn_job *)arg;
    int lo, hi;
    split_range(j->n_tokens, j->parts, idx, &lo, &hi);
    if (j->is_fp32) fp32_partial(j->fc, j->q, j->ap.n_q_heads, lo, hi, j->states[idx]);
    else j->err[idx] = kvq_attention_partial(j->kc, j->q, &j->ap, lo, hi, 0, KVH, j->states[idx]);
}

static void attn_call(attn_job *j) {
    int i;
    kvq_set_arith(j->arith); /* between calls, when no other kvq call runs */
    if (j->parts == 1 && !j->is_fp32) {
        check(kvq_attention(j->kc, j->q, j->out, &j->ap), "kvq_attention");
        return;
    }
    if (j->parts == 1) {
        attn_part(j, 0);
        fp32_merge((const float *const *)j->states, 1, j->ap.n_q_heads, j->out);
        return;
    }
    pool_run(j->pool, attn_part, j);
    if (j->is_fp32) {
        fp32_merge((const float *const *)j->states, j->parts, j->ap.n_q_heads, j->out);
        return;
    }
    for (i = 0; i < j->parts; i++) check(j->err[i], "kvq_attention_partial");
    check(kvq_attention_merge(j->kc, &j->ap, (const float *const *)j->states, j->parts, j->out),
          "kvq_attention_merge");
}

/* ------------------------------------------------------------------------ */
/* Results.                                                                  */

typedef struct row {
    int cfg, nq, threads, n;
    int reps;
    double med_ms, min_ms;
    double cpu_ms;  /* median CPU time per call, all threads */
    double bytes;   /* cache bytes one call reads */
    double bits_el; /* 8 * bytes / (2 * n * KVH * HD) */
    double err;     /* relative L2 error vs fp32 1-thread output; < 0 = not available */
} row;

typedef struct append_row {
    int cfg, tokens, passes;
    double med_ms, med_cpu_ms; /* wall and CPU time of the median passes */
} append_row;

typedef struct results {
    row *rows;
    int n_rows, cap;
    append_row app[N_CFGS];
    int n_app;
    double bw[MAX_THREADS + 1];     /* GB/s by thread count at the start; 0 = not measured */
    double bw_end[MAX_THREADS + 1]; /* the same, measured again after the attention rows */
    size_t bw_bytes;
} results;

static const row *find_row(const results *R, int cfg, int nq, int threads, int n) {
    int i;
    for (i = 0; i < R->n_rows; i++)
        if (R->rows[i].cfg == cfg && R->rows[i].nq == nq && R->rows[i].threads == threads && R->rows[i].n == n)
            return &R->rows[i];
    return NULL;
}

static double row_bw(const results *R, const row *r) {
    return R->bw[r->threads] > 0 ? R->bw[r->threads] : R->bw[1];
}

/* Times repeated calls: one warm-up, then until min_reps and min_time, at most max_reps. */
static void time_row(attn_job *j, const options *o, row *r) {
    double *t = (double *)xmalloc(sizeof(double) * (size_t)o->max_reps), start;
    double *tc = (double *)xmalloc(sizeof(double) * (size_t)o->max_reps);
    int k;
    attn_call(j);
    start = now_s();
    for (k = 0; k < o->max_reps; k++) {
        double t0 = now_s(), c0 = cpu_s();
        attn_call(j);
        t[k] = now_s() - t0;
        tc[k] = cpu_s() - c0;
        if (k + 1 >= o->min_reps && now_s() - start >= o->min_time) {
            k++;
            break;
        }
    }
    r->reps = k;
    r->cpu_ms = 1e3 * median(tc, k);
    r->med_ms = 1e3 * median(t, k);
    r->min_ms = 1e3 * t[0];
    free(t);
    free(tc);
}

static double rel_err(const float *x, const float *ref, size_t n) {
    double num = 0.0, den = 0.0;
    size_t i;
    for (i = 0; i < n; i++) {
        double d = (double)x[i] - ref[i];
        num += d * d;
        den += (double)ref[i] * ref[i];
    }
    return den > 0.0 ? sqrt(num / den) : sqrt(num);
}

/* ------------------------------------------------------------------------ */
/* Building and filling caches.                                             */

static kvq_config make_config(int cfg_index, int n) {
    kvq_config c = kvq_default_config(HD, KVH, n);
    c.key_bits = CFGS[cfg_index].bits;
    c.value_bits = CFGS[cfg_index].vbits ? CFGS[cfg_index].vbits : CFGS[cfg_index].bits;
    c.key_block = CFGS[cfg_index].key_block;
    c.value_param_bits = CFGS[cfg_index].pbits;
    c.salient_ratio = (float)CFGS[cfg_index].salient_pct / 100.0f; /* filled without attention: error policy */
    c.rotation = CFGS[cfg_index].rotate ? KVQ_ROTATE_HADAMARD : KVQ_ROTATE_NONE;
    c.key_axis = CFGS[cfg_index].per_token ? KVQ_KEYS_PER_TOKEN : KVQ_KEYS_PER_CHANNEL;
    if (CFGS[cfg_index].search >= 0) c.range_search = CFGS[cfg_index].search;
    return c;
}

static void fill_fp32(fp32cache *c, int n, float *kbuf, float *vbuf) {
    int t0, t, h;
    c->n = n;
    c->k = (float *)xmalloc((size_t)n * KVH * HD * sizeof(float));
    c->v = (float *)xmalloc((size_t)n * KVH * HD * sizeof(float));
    for (t0 = 0; t0 < n; t0 += FILL_CHUNK) {
        int m = n - t0 < FILL_CHUNK ? n - t0 : FILL_CHUNK;
        gen_tokens(t0, m, kbuf, vbuf);
        for (t = 0; t < m; t++)
            for (h = 0; h < KVH; h++) {
                memcpy(c->k + ((size_t)h * n + t0 + t) * HD, kbuf + ((size_t)t * KVH + h) * HD, HD * sizeof(float));
                memcpy(c->v + ((size_t)h * n + t0 + t) * HD, vbuf + ((size_t)t * KVH + h) * HD, HD * sizeof(float));
            }
    }
}

static kvq_cache *fill_kvq(int cfg_index, int n, float *kbuf, float *vbuf) {
    kvq_config cfg = make_config(cfg_index, n);
    kvq_cache *c;
    int t0;
    check(kvq_cache_create(&c, &cfg), "kvq_cache_create");
    for (t0 = 0; t0 < n; t0 += FILL_CHUNK) {
        int m = n - t0 < FILL_CHUNK ? n - t0 : FILL_CHUNK;
        gen_tokens(t0, m, kbuf, vbuf);
        check(kvq_cache_append(c, kbuf, vbuf, m), "kvq_cache_append");
    }
    return c;
}

/* ------------------------------------------------------------------------ */
/* Output: table, CSV, SVG.                                                  */

static void print_table_header(void) {
    printf("%-8s %-9s %3s %5s %10s %9s %10s %11s %10s %9s %7s %8s %7s %8s %9s\n", "config", "heads", "thr", "reps",
           "median ms", "cpu ms", "min ms", "ns/tok/kvh", "cyc/tok/kvh", "MB read", "bits/el", "GB/s", "%BW",
           "vs fp16", "out.dev");
}

static void print_row(const results *R, const row *r) {
    const row *base = find_row(R, CFG_FP16, r->nq, r->threads, r->n);
    double gbs = r->bytes / (r->med_ms * 1e6);
    char sp[32], er[32];
    if (base) snprintf(sp, sizeof sp, "%.2fx", base->med_ms / r->med_ms);
    else snprintf(sp, sizeof sp, "-");
    if (r->err >= 0.0) snprintf(er, sizeof er, "%.2e", r->err);
    else snprintf(er, sizeof er, "-");
    printf("%-8s %-9s %3d %5d %10.3f %9.3f %10.3f %11.2f %10.1f %9.2f %7.2f %8.2f %6.1f%% %8s %9s\n",
           CFGS[r->cfg].name, heads_label(r->nq), r->threads, r->reps, r->med_ms, r->cpu_ms, r->min_ms,
           r->med_ms * 1e6 / ((double)r->n * KVH), r->med_ms * 1e6 / ((double)r->n * KVH) * g_ghz, r->bytes / 1e6,
           r->bits_el, gbs, 100.0 * gbs / row_bw(R, r), sp, er);
}

static void print_block(const results *R, const options *o, int n) {
    int hi, ti, ci;
    char nb[32];
    fmt_tokens(n, nb, sizeof nb);
    printf("\nN = %s tokens (%d)\n", nb, n);
    print_table_header();
    for (hi = 0; hi < o->n_heads; hi++)
        for (ti = 0; ti < o->n_threads; ti++)
            for (ci = 0; ci < o->n_cfgs; ci++) {
                const row *r = find_row(R, o->cfgs[ci], o->heads[hi], o->threads[ti], n);
                if (r) print_row(R, r);
            }
    fflush(stdout);
}

/* The CSV starts with '#' lines saying where and when it was measured (bench/overview.c
   labels its figure with them; readers that take no comments skip 3 lines), then a header. */
static int write_csv(const results *R, const char *cpu, const char *date, const char *path) {
    FILE *f = fopen(path, "w");
    int i, t;
    if (!f) return -1;
    fprintf(f, "# cpu: %s\n# date: %s\n# kvq: %d.%d.%d", cpu, date, KVQ_VERSION_MAJOR, KVQ_VERSION_MINOR,
            KVQ_VERSION_PATCH);
#ifdef KVQ_HAS_ISA_API
    fprintf(f, ", ISA %s, %s kernels", kvq_isa_name(kvq_get_isa()), kvq_integer_kernels() ? "integer" : "float");
#endif
    fprintf(f, "\n");
    fprintf(f, "kind,config,key_bits,value_bits,n_q_heads,n_kv_heads,head_dim,threads,n_tokens,reps,median_ms,"
               "min_ms,ns_per_token,ns_per_token_per_kv_head,bytes_read,bits_per_element,gb_per_s,pct_of_bw,"
               "speedup_vs_fp16,out_dev_vs_fp32\n");
    for (t = 1; t <= MAX_THREADS; t++) {
        if (R->bw[t] > 0)
            fprintf(f, "bandwidth,stream-sum-start,,,,,,%d,,7,%.4f,,,,%.0f,,%.3f,100.0,,\n", t,
                    (double)R->bw_bytes / (R->bw[t] * 1e6), (double)R->bw_bytes, R->bw[t]);
        if (R->bw_end[t] > 0)
            fprintf(f, "bandwidth,stream-sum-end,,,,,,%d,,7,%.4f,,,,%.0f,,%.3f,%.2f,,\n", t,
                    (double)R->bw_bytes / (R->bw_end[t] * 1e6), (double)R->bw_bytes, R->bw_end[t],
                    100.0 * R->bw_end[t] / R->bw[t]);
    }
    for (i = 0; i < R->n_rows; i++) {
        const row *r = &R->rows[i];
        const row *base = find_row(R, CFG_FP16, r->nq, r->threads, r->n);
        double gbs = r->bytes / (r->med_ms * 1e6);
        int b = CFGS[r->cfg].bits, vb = CFGS[r->cfg].vbits ? CFGS[r->cfg].vbits : b;
        fprintf(f, "attention,%s,%d,%d,%d,%d,%d,%d,%d,%d,%.6f,%.6f,%.4f,%.4f,%.0f,%.4f,%.3f,%.2f,", CFGS[r->cfg].name,
                b, vb, r->nq, KVH, HD, r->threads, r->n, r->reps, r->med_ms, r->min_ms, r->med_ms * 1e6 / r->n,
                r->med_ms * 1e6 / ((double)r->n * KVH), r->bytes, r->bits_el, gbs, 100.0 * gbs / row_bw(R, r));
        if (base) fprintf(f, "%.4f,", base->med_ms / r->med_ms);
        else fprintf(f, ",");
        if (r->err >= 0.0) fprintf(f, "%.3e\n", r->err);
        else fprintf(f, "\n");
    }
    for (i = 0; i < R->n_app; i++) {
        const append_row *a = &R->app[i];
        int b = CFGS[a->cfg].bits;
        double ns = a->med_ms * 1e6 / a->tokens;
        fprintf(f, "append,%s,%d,%d,,%d,%d,1,%d,%d,%.6f,,%.2f,%.2f,,,,,,\n", CFGS[a->cfg].name, b, b, KVH, HD,
                a->tokens, a->passes, a->med_ms, ns, ns / KVH);
    }
    return fclose(f);
}

static void xml_text(FILE *f, const char *s) {
    for (; *s; s++) {
        if (*s == '&') fputs("&amp;", f);
        else if (*s == '<') fputs("&lt;", f);
        else if (*s == '>') fputs("&gt;", f);
        else if ((unsigned char)*s >= 32) fputc(*s, f);
    }
}

/* Advance width of s at font size px. SVG cannot measure text, so legends and labels are
   laid out from a table: DejaVu Sans's advances (the usual sans-serif on Linux, and wider
   than Helvetica or Arial), in hundredths of an em, rounded up, for ' ' to '~'. */
static double text_w(const char *s, double px) {
    static const unsigned char adv[95] = {
        32, 41, 46, 84, 64, 96, 78, 28, 40, 40, 50, 84, 32, 37, 32, 34, 64, 64, 64,
        64, 64, 64, 64, 64, 64, 64, 34, 34, 84, 84, 84, 54, 100, 69, 69, 70, 78, 64,
        58, 78, 76, 30, 30, 66, 56, 87, 75, 79, 61, 79, 70, 64, 62, 74, 69, 99, 69,
        62, 69, 40, 34, 40, 84, 50, 50, 62, 64, 55, 64, 62, 36, 64, 64, 28, 28, 58,
        28, 98, 64, 62, 64, 64, 42, 53, 40, 64, 60, 82, 60, 60, 53, 64, 34, 64, 84,
    };
    double em = 0.0;
    for (; *s; s++) {
        unsigned char c = (unsigned char)*s;
        if (c >= 32 && c < 127) em += adv[c - 32] / 100.0;
        else if ((c & 0xC0) != 0x80) em += 1.0; /* one per UTF-8 character, at the widest */
    }
    return em * px;
}

static void svg_line(FILE *f, double x1, double y1, double x2, double y2, const char *stroke) {
    fprintf(f, "<line x1=\"%.1f\" y1=\"%.1f\" x2=\"%.1f\" y2=\"%.1f\" stroke=\"%s\"/>\n", x1, y1, x2, y2, stroke);
}

/* Bar colour for the i-th of n context lengths: light to dark blue as N grows. */
static void n_colour(int i, int n, char *buf, size_t cap) {
    static const int lo[3] = {0xb5, 0xd4, 0xe9}, hi[3] = {0x08, 0x30, 0x6b};
    double t = n > 1 ? (double)i / (n - 1) : 1.0;
    snprintf(buf, cap, "#%02x%02x%02x", (int)(lo[0] + t * (hi[0] - lo[0])), (int)(lo[1] + t * (hi[1] - lo[1])),
             (int)(lo[2] + t * (hi[2] - lo[2])));
}

static void legend_label(int c, char *lab, size_t cap) {
    if (CFGS[c].bits == 32) snprintf(lab, cap, "%s, 32 bits/el", CFGS[c].label);
    else {
        kvq_config kc = make_config(c, 1 << 16);
        snprintf(lab, cap, "%s, %.2f bits/el", CFGS[c].label, kvq_config_bits_per_element(&kc));
    }
}

static int slice_has(const results *R, int cfg, int nq, int thr) {
    int i;
    for (i = 0; i < R->n_rows; i++)
        if ((cfg < 0 || R->rows[i].cfg == cfg) && R->rows[i].nq == nq && R->rows[i].threads == thr) return 1;
    return 0;
}

/* The time panel's legend: its entries (configs measured in the slice, then the fp16
   bandwidth floor) and the column width that holds the longest, swatch included. */
#define FLOOR_LABEL "kvq fp16 bytes / measured bandwidth"
static int legend_layout(const results *R, const options *o, int nq, int thr, double *colw) {
    char lab[160];
    int ci, n = 0;
    *colw = 0.0;
    for (ci = 0; ci < o->n_cfgs; ci++) {
        if (!slice_has(R, o->cfgs[ci], nq, thr)) continue;
        legend_label(o->cfgs[ci], lab, sizeof lab);
        if (text_w(lab, 12) > *colw) *colw = text_w(lab, 12);
        n++;
    }
    if (slice_has(R, CFG_FP16, nq, thr)) {
        if (text_w(FLOOR_LABEL, 12) > *colw) *colw = text_w(FLOOR_LABEL, 12);
        n++;
    }
    *colw += 30 + 24; /* swatch before, gap after */
    return n;
}

/* Layout shared by the SVG's panels. */
#define SVG_L 80.0       /* left margin: y tick labels and axis title */
#define SVG_R 30.0       /* right margin */
#define SVG_LEG_ROW 18.0 /* legend row height */
#define BAR_PH 220.0     /* bar panel: plot height */
#define BAR_NAME_PX 11.0 /* bar panel: config name size */

/* Panel 1: time vs N, log-log, one line per config, for one (heads, threads) slice; the
   legend sits below the plot in columns as wide as the longest label. Returns its height. */
static double svg_time_panel(FILE *f, const results *R, const options *o, const char *cpu, const char *date,
                             int nq, int thr, double W, double y0) {
    const double L = SVG_L, T = y0 + 64, ph = 360, pw = W - SVG_L - SVG_R;
    double nmin = 1e30, nmax = 0, tmin = 1e30, tmax = 0, lx0, lx1, ly0, ly1, e, colw, legy;
    int have_fp16 = 0, i, ci, k, n_ent = legend_layout(R, o, nq, thr, &colw), n_cols;
    char lab[160];
    for (i = 0; i < R->n_rows; i++) {
        const row *r = &R->rows[i];
        if (r->nq != nq || r->threads != thr) continue;
        if (r->n < nmin) nmin = r->n;
        if (r->n > nmax) nmax = r->n;
        if (r->med_ms < tmin) tmin = r->med_ms;
        if (r->med_ms > tmax) tmax = r->med_ms;
        if (r->cfg == CFG_FP16) {
            double floor_ms = r->bytes / (row_bw(R, r) * 1e6);
            have_fp16 = 1;
            if (floor_ms < tmin) tmin = floor_ms;
        }
    }
    lx0 = log2(nmin) - 0.5;
    lx1 = log2(nmax) + 0.5;
    ly0 = floor(log10(tmin * 0.9));
    ly1 = ceil(log10(tmax * 1.1));
    if (ly1 <= ly0) ly1 = ly0 + 1;
#define SX(n) (L + (log2(n) - lx0) / (lx1 - lx0) * pw)
#define SY(ms) (T + ph - (log10(ms) - ly0) / (ly1 - ly0) * ph)
    fprintf(f, "<text x=\"%.0f\" y=\"%.0f\" font-size=\"15\" font-weight=\"bold\">kvq decode attention, %s, "
               "head_dim %d, %d thread%s: median time per call</text>\n",
            L, y0 + 24, heads_label(nq), HD, thr, thr == 1 ? "" : "s");
    fprintf(f, "<text x=\"%.0f\" y=\"%.0f\" fill=\"#555\">", L, y0 + 42);
    xml_text(f, cpu);
    fprintf(f, "; %s</text>\n", date);
    fprintf(f, "<text x=\"%.0f\" y=\"%.0f\" fill=\"#555\">measured read bandwidth %.1f GB/s (1 thread); "
               "kvq %d.%d.%d</text>\n", L, y0 + 57, R->bw[1], KVQ_VERSION_MAJOR, KVQ_VERSION_MINOR, KVQ_VERSION_PATCH);
    /* y grid: decades with 2x and 5x minor lines */
    for (e = ly0; e <= ly1 + 1e-9; e += 1.0) {
        double v = pow(10.0, e), y = SY(v);
        svg_line(f, L, y, L + pw, y, "#ccc");
        svg_line(f, L - 6, y, L, y, "#000");
        fprintf(f, "<text x=\"%.1f\" y=\"%.1f\" text-anchor=\"end\">%g</text>\n", L - 9, y + 4, v);
        if (e + 1.0 <= ly1 + 1e-9)
            for (k = 2; k <= 5; k += 3) {
                double ym = SY(v * k);
                svg_line(f, L, ym, L + pw, ym, "#eee");
                svg_line(f, L - 3, ym, L, ym, "#000");
            }
    }
    /* x grid: powers of two */
    for (k = (int)ceil(lx0); k <= (int)floor(lx1); k++) {
        double x = L + (k - lx0) / (lx1 - lx0) * pw;
        char nb[32];
        fmt_tokens(1 << k, nb, sizeof nb);
        svg_line(f, x, T, x, T + ph, "#ddd");
        svg_line(f, x, T + ph, x, T + ph + 6, "#000");
        fprintf(f, "<text x=\"%.1f\" y=\"%.1f\" text-anchor=\"middle\">%s</text>\n", x, T + ph + 20, nb);
    }
    fprintf(f, "<rect x=\"%.1f\" y=\"%.1f\" width=\"%.1f\" height=\"%.1f\" fill=\"none\" stroke=\"#000\"/>\n", L, T, pw, ph);
    fprintf(f, "<text x=\"%.1f\" y=\"%.1f\" text-anchor=\"middle\">context length N (tokens, log scale)</text>\n",
            L + pw / 2, T + ph + 40);
    fprintf(f, "<text transform=\"translate(20 %.1f) rotate(-90)\" text-anchor=\"middle\">median ms per call "
               "(log scale)</text>\n", T + ph / 2);
    /* legend: as many columns as fit */
    n_cols = (int)(pw / colw);
    if (n_cols < 1) n_cols = 1;
    legy = T + ph + 62;
    /* one polyline per config, in option order, with markers, and its legend entry */
    for (ci = 0, k = 0; ci < o->n_cfgs; ci++) {
        int c = o->cfgs[ci], first = 1, ni;
        const char *col = CFGS[c].color;
        double lx = L + (k % n_cols) * colw, ly = legy + (k / n_cols) * SVG_LEG_ROW;
        for (ni = 0; ni < o->n_ns; ni++) {
            const row *r = find_row(R, c, nq, thr, o->ns[ni]);
            if (!r) continue;
            if (first) fprintf(f, "<polyline fill=\"none\" stroke=\"%s\" stroke-width=\"2\" points=\"", col);
            fprintf(f, "%.1f,%.1f ", SX(r->n), SY(r->med_ms));
            first = 0;
        }
        if (first) continue;
        fprintf(f, "\"/>\n");
        for (ni = 0; ni < o->n_ns; ni++) {
            const row *r = find_row(R, c, nq, thr, o->ns[ni]);
            if (r) fprintf(f, "<circle cx=\"%.1f\" cy=\"%.1f\" r=\"3.5\" fill=\"%s\"/>\n", SX(r->n), SY(r->med_ms), col);
        }
        legend_label(c, lab, sizeof lab);
        fprintf(f, "<line x1=\"%.1f\" y1=\"%.1f\" x2=\"%.1f\" y2=\"%.1f\" stroke=\"%s\" stroke-width=\"2\"/>\n", lx,
                ly, lx + 24, ly, col);
        fprintf(f, "<circle cx=\"%.1f\" cy=\"%.1f\" r=\"3.5\" fill=\"%s\"/>\n", lx + 12, ly, col);
        fprintf(f, "<text x=\"%.1f\" y=\"%.1f\">", lx + 30, ly + 4);
        xml_text(f, lab);
        fprintf(f, "</text>\n");
        k++;
    }
    if (have_fp16) {
        int first = 1, ni;
        double lx = L + (k % n_cols) * colw, ly = legy + (k / n_cols) * SVG_LEG_ROW;
        for (ni = 0; ni < o->n_ns; ni++) {
            const row *r = find_row(R, CFG_FP16, nq, thr, o->ns[ni]);
            if (!r) continue;
            if (first)
                fprintf(f, "<polyline fill=\"none\" stroke=\"%s\" stroke-width=\"1.5\" stroke-dasharray=\"6 4\" "
                           "points=\"", CFGS[CFG_FP16].color);
            fprintf(f, "%.1f,%.1f ", SX(r->n), SY(r->bytes / (row_bw(R, r) * 1e6)));
            first = 0;
        }
        fprintf(f, "\"/>\n");
        fprintf(f, "<line x1=\"%.1f\" y1=\"%.1f\" x2=\"%.1f\" y2=\"%.1f\" stroke=\"%s\" stroke-width=\"1.5\" "
                   "stroke-dasharray=\"6 4\"/>\n", lx, ly, lx + 24, ly, CFGS[CFG_FP16].color);
        fprintf(f, "<text x=\"%.1f\" y=\"%.1f\">" FLOOR_LABEL "</text>\n", lx + 30, ly + 4);
    }
#undef SX
#undef SY
    return legy - y0 + ((n_ent + n_cols - 1) / n_cols) * SVG_LEG_ROW;
}

/* The configs a bar panel shows: every one measured in the slice but fp16. */
static int bar_configs(const results *R, const options *o, int nq, int thr, int *out) {
    int ci, n = 0;
    for (ci = 0; ci < o->n_cfgs; ci++)
        if (o->cfgs[ci] != CFG_FP16 && slice_has(R, o->cfgs[ci], nq, thr)) out[n++] = o->cfgs[ci];
    return n;
}

/* Width a bar panel needs: per config, its N bars or its name, whichever is wider. */
static double bar_group_w(const options *o, const int *cfgs, int n_cfgs) {
    double w = 14.0 + 12.0 * o->n_ns;
    int i;
    for (i = 0; i < n_cfgs; i++)
        if (text_w(CFGS[cfgs[i]].name, BAR_NAME_PX) + 10 > w) w = text_w(CFGS[cfgs[i]].name, BAR_NAME_PX) + 10;
    return w;
}

/* Panel 2 (one per heads layout): the speed-up of each config over kvq fp16, median fp16
   time / median config time at the same N, a bar per N grouped by config, with a 1.0x
   line. A log-log time chart hides 1.2-1.7x gaps; these bars do not. Returns its height. */
static double svg_speedup_panel(FILE *f, const results *R, const options *o, int nq, int thr, double W, double y0) {
    const double L = SVG_L, T = y0 + 64, ph = BAR_PH, pw = W - SVG_L - SVG_R;
    int cfgs[N_CFGS], n_cfgs = bar_configs(R, o, nq, thr, cfgs), gi, ni;
    double vmax = 1.0, top, step, v, gw, gap = 14.0, bw, lx;
    char col[16], nb[32];
    for (gi = 0; gi < n_cfgs; gi++)
        for (ni = 0; ni < o->n_ns; ni++) {
            const row *r = find_row(R, cfgs[gi], nq, thr, o->ns[ni]);
            const row *b = find_row(R, CFG_FP16, nq, thr, o->ns[ni]);
            if (r && b && b->med_ms / r->med_ms > vmax) vmax = b->med_ms / r->med_ms;
        }
    /* the axis leaves ~34 px above the tallest bar for its (rotated) value label */
    step = vmax > 3.0 ? 1.0 : vmax > 1.5 ? 0.5 : 0.25;
    top = ceil(vmax / (1.0 - 34.0 / ph) / step) * step;
    gw = pw / (n_cfgs > 0 ? n_cfgs : 1);
    bw = (gw - gap) / o->n_ns;
    if (bw > 40) bw = 40;
#define BY(s) (T + ph - (s) / top * ph)
    fprintf(f, "<text x=\"%.0f\" y=\"%.0f\" font-size=\"15\" font-weight=\"bold\">speed-up over kvq fp16, %s, "
               "%d thread%s</text>\n", L, y0 + 24, heads_label(nq), thr, thr == 1 ? "" : "s");
    fprintf(f, "<text x=\"%.0f\" y=\"%.0f\" fill=\"#555\">median kvq fp16 time / median time of the config at the "
               "same N (same run, same data); above 1.0 = faster than fp16</text>\n", L, y0 + 42);
    /* N legend: a swatch per context length */
    lx = L;
    for (ni = 0; ni < o->n_ns; ni++) {
        n_colour(ni, o->n_ns, col, sizeof col);
        fmt_tokens(o->ns[ni], nb, sizeof nb);
        fprintf(f, "<rect x=\"%.1f\" y=\"%.1f\" width=\"12\" height=\"12\" fill=\"%s\"/>\n", lx, y0 + 48, col);
        fprintf(f, "<text x=\"%.1f\" y=\"%.1f\">N = %s</text>\n", lx + 16, y0 + 58, nb);
        lx += 16 + text_w("N = ", 12) + text_w(nb, 12) + 14;
    }
    fprintf(f, "<line x1=\"%.1f\" y1=\"%.1f\" x2=\"%.1f\" y2=\"%.1f\" stroke=\"%s\" stroke-width=\"1.5\" "
               "stroke-dasharray=\"6 4\"/>\n", lx, y0 + 54, lx + 24, y0 + 54, CFGS[CFG_FP16].color);
    fprintf(f, "<text x=\"%.1f\" y=\"%.1f\">kvq fp16 = 1.0x</text>\n", lx + 30, y0 + 58);
    for (v = 0.0; v <= top + 1e-9; v += step) {
        svg_line(f, L, BY(v), L + pw, BY(v), v == 0.0 ? "#000" : "#ddd");
        fprintf(f, "<text x=\"%.1f\" y=\"%.1f\" text-anchor=\"end\">%.*fx</text>\n", L - 8, BY(v) + 4,
                step < 0.5 ? 2 : 1, v);
    }
    fprintf(f, "<text transform=\"translate(20 %.1f) rotate(-90)\" text-anchor=\"middle\">speed-up over fp16</text>\n",
            T + ph / 2);
    /* the 1.0x line under the bars; value labels get a white box where it crosses them */
    fprintf(f, "<line x1=\"%.1f\" y1=\"%.1f\" x2=\"%.1f\" y2=\"%.1f\" stroke=\"%s\" stroke-width=\"1.5\" "
               "stroke-dasharray=\"6 4\"/>\n", L, BY(1.0), L + pw, BY(1.0), CFGS[CFG_FP16].color);
    for (gi = 0; gi < n_cfgs; gi++) {
        double gx = L + gi * gw + (gw - bw * o->n_ns) / 2;
        for (ni = 0; ni < o->n_ns; ni++) {
            const row *r = find_row(R, cfgs[gi], nq, thr, o->ns[ni]);
            const row *b = find_row(R, CFG_FP16, nq, thr, o->ns[ni]);
            double s, x = gx + ni * bw, y, tw;
            char val[32];
            if (!r || !b) continue;
            s = b->med_ms / r->med_ms;
            y = BY(s);
            n_colour(ni, o->n_ns, col, sizeof col);
            fprintf(f, "<rect x=\"%.1f\" y=\"%.1f\" width=\"%.1f\" height=\"%.1f\" fill=\"%s\"/>\n", x + 1, y,
                    bw - 2, T + ph - y, col);
            snprintf(val, sizeof val, "%.2f", s);
            tw = text_w(val, 10);
            if (tw + 2 <= bw) /* level above the bar, else turned to read upwards */
                fprintf(f, "<g transform=\"translate(%.1f %.1f)\">", x + bw / 2, y - 3);
            else
                fprintf(f, "<g transform=\"translate(%.1f %.1f) rotate(-90) translate(%.1f 0)\">", x + bw / 2 + 3.5,
                        y - 3, tw / 2);
            fprintf(f, "<rect x=\"%.1f\" y=\"-8.5\" width=\"%.1f\" height=\"10\" fill=\"#fff\"/><text "
                       "font-size=\"10\" text-anchor=\"middle\">%s</text></g>\n", -tw / 2 - 1, tw + 2, val);
        }
        fprintf(f, "<text x=\"%.1f\" y=\"%.1f\" font-size=\"%.0f\" text-anchor=\"middle\">", L + gi * gw + gw / 2,
                T + ph + 16, BAR_NAME_PX);
        xml_text(f, CFGS[cfgs[gi]].name);
        fprintf(f, "</text>\n");
    }
    fprintf(f, "<rect x=\"%.1f\" y=\"%.1f\" width=\"%.1f\" height=\"%.1f\" fill=\"none\" stroke=\"#000\"/>\n", L, T, pw, ph);
#undef BY
    return T + ph + 30 - y0;
}

/* The SVG: time vs N (log-log) for GQA (else the first heads layout) on 1 thread (else the
   first count), then below it a speed-up bar panel per heads layout at that thread count. */
static int write_svg(const results *R, const options *o, const char *cpu, const char *date, const char *path) {
    double W = 900, H, y, colw, need;
    int nq = o->heads[0], thr = o->threads[0], i, n_ent, n_cols, bar[2], n_bar = 0, other_thr = 0;
    int cfgs[N_CFGS], n_cfgs;
    FILE *f;
    for (i = 0; i < o->n_heads; i++)
        if (o->heads[i] == 32) nq = 32;
    for (i = 0; i < o->n_threads; i++)
        if (o->threads[i] == 1) thr = 1;
    if (!slice_has(R, -1, nq, thr)) return 0; /* nothing to plot */
    for (i = 0; i < o->n_threads; i++) other_thr |= o->threads[i] != thr;
    /* width: the widest legend column and every bar panel's groups must fit */
    n_ent = legend_layout(R, o, nq, thr, &colw);
    need = SVG_L + colw + SVG_R;
    if (need > W) W = need;
    for (i = 0; i < o->n_heads; i++)
        if (slice_has(R, CFG_FP16, o->heads[i], thr) && (n_cfgs = bar_configs(R, o, o->heads[i], thr, cfgs)) > 0) {
            need = SVG_L + n_cfgs * bar_group_w(o, cfgs, n_cfgs) + SVG_R;
            if (need > W) W = need;
            bar[n_bar++] = o->heads[i];
        }
    if (n_bar == 2 && bar[0] != nq) { /* the line panel's layout first */
        bar[1] = bar[0];
        bar[0] = nq;
    }
    /* height: the same sums the panels return */
    n_cols = (int)((W - SVG_L - SVG_R) / colw);
    if (n_cols < 1) n_cols = 1;
    H = 64 + 360 + 62 + ((n_ent + n_cols - 1) / n_cols) * SVG_LEG_ROW + 10;
    H += n_bar * (64 + BAR_PH + 30 + 10) + (other_thr ? 20 : 0) + 10;
    f = fopen(path, "w");
    if (!f) return -1;
    fprintf(f, "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"%.0f\" height=\"%.0f\" viewBox=\"0 0 %.0f %.0f\" "
               "font-family=\"sans-serif\" font-size=\"12\">\n", W, H, W, H);
    fprintf(f, "<rect width=\"100%%\" height=\"100%%\" fill=\"white\"/>\n");
    y = svg_time_panel(f, R, o, cpu, date, nq, thr, W, 0.0) + 10;
    for (i = 0; i < n_bar; i++) y += svg_speedup_panel(f, R, o, bar[i], thr, W, y) + 10;
    if (other_thr)
        fprintf(f, "<text x=\"%.0f\" y=\"%.0f\" fill=\"#555\">Rows at other thread counts: in the CSV and the "
                   "printed table.</text>\n", SVG_L, y + 4);
    fprintf(f, "</svg>\n");
    return fclose(f);
}

/* ------------------------------------------------------------------------ */
/* Options.                                                                  */

static void usage(FILE *f) {
    fprintf(f,
            "usage: bench [options]\n"
            "  --quick            smoke test: N 1K,4K, short timing, 4K-token append\n"
            "  --n LIST           context lengths, e.g. 1K,4K,16K,64K (default)\n"
            "  --configs LIST     from fp32,16,8,4,3,2,kvq-2x5,kvq-2x10,kvq-2h,kvq-2t,kvq-2c0,kvq-2p32,kvq-2p16,\n"
            "                     kvq-k3v2,kvq-2f,kvq-k3v2f (default: all);\n"
            "                     16 = kvq fp16\n"
            "  --threads LIST     e.g. 1,2 (default), at most %d\n"
            "  --heads LIST       gqa (32 q / 8 kv), mha (8 / 8); default gqa,mha\n"
            "  --csv PATH         CSV output (default bench/results.csv)\n"
            "  --svg PATH         SVG chart (default bench/results.svg)\n"
            "  --min-time SEC     keep repeating a row until this much time is spent (default 1)\n",
            MAX_THREADS);
}

static int parse_int_k(const char *s, int *out) {
    char *end;
    long v = strtol(s, &end, 10);
    if (end == s) return 0;
    if (*end == 'k' || *end == 'K') { v *= 1024; end++; }
    else if (*end == 'm' || *end == 'M') { v *= 1024 * 1024; end++; }
    if (*end || v < 1 || v > (1L << 26)) return 0;
    *out = (int)v;
    return 1;
}

/* Splits a comma list into tokens of at most 31 chars; returns the count. */
static int split_list(const char *s, char tok[][32], int max) {
    int n = 0;
    while (*s && n < max) {
        size_t len = strcspn(s, ",");
        if (len >= 32) return -1;
        memcpy(tok[n], s, len);
        tok[n][len] = 0;
        n++;
        s += len;
        if (*s == ',') s++;
    }
    return *s ? -1 : n;
}

static void parse_args(int argc, char **argv, options *o) {
    int i, k, user_n = 0;
    char tok[MAX_NS][32];
    memset(o, 0, sizeof *o);
    o->csv_path = "bench/results.csv";
    o->svg_path = "bench/results.svg";
    for (k = 0; k < N_CFGS; k++) o->cfgs[k] = k;
    o->n_cfgs = N_CFGS;
    o->threads[0] = 1;
    o->threads[1] = 2;
    o->n_threads = 2;
    o->heads[0] = 32;
    o->heads[1] = 8;
    o->n_heads = 2;
    o->min_time = -1.0;
    for (i = 1; i < argc; i++) {
        const char *a = argv[i], *v = i + 1 < argc ? argv[i + 1] : NULL;
        int n;
        if (!strcmp(a, "-h") || !strcmp(a, "--help")) {
            usage(stdout);
            exit(0);
        } else if (!strcmp(a, "--quick")) {
            o->quick = 1;
            continue;
        }
        if (!v) {
            usage(stderr);
            exit(2);
        }
        i++;
        if (!strcmp(a, "--csv")) o->csv_path = v;
        else if (!strcmp(a, "--svg")) o->svg_path = v;
        else if (!strcmp(a, "--min-time")) {
            o->min_time = atof(v);
            if (!(o->min_time >= 0.0 && o->min_time < 3600.0)) die("bad --min-time");
        } else if (!strcmp(a, "--n")) {
            if ((n = split_list(v, tok, MAX_NS)) < 1) die("bad --n list");
            for (k = 0; k < n; k++)
                if (!parse_int_k(tok[k], &o->ns[k])) die("bad --n value");
            o->n_ns = n;
            user_n = 1;
        } else if (!strcmp(a, "--configs")) {
            if ((n = split_list(v, tok, MAX_NS)) < 1 || n > N_CFGS) die("bad --configs list");
            o->n_cfgs = 0;
            for (k = 0; k < n; k++) {
                int c, found = -1;
                for (c = 0; c < N_CFGS; c++) {
                    char num[8];
                    snprintf(num, sizeof num, "%d", CFGS[c].bits);
                    if ((!strcmp(tok[k], num) && !CFGS[c].salient_pct && !CFGS[c].rotate && !CFGS[c].per_token &&
                         CFGS[c].search < 0 && !CFGS[c].vbits && !CFGS[c].key_block && !CFGS[c].pbits &&
                         CFGS[c].arith == KVQ_ARITH_AUTO) ||
                        !strcmp(tok[k], CFGS[c].name))
                        found = c;
                }
                if (!strcmp(tok[k], "fp16")) found = CFG_FP16;
                if (found < 0) die("unknown config (see --help)");
                o->cfgs[o->n_cfgs++] = found;
            }
        } else if (!strcmp(a, "--threads")) {
            if ((n = split_list(v, tok, MAX_THREADS)) < 1) die("bad --threads list");
            for (k = 0; k < n; k++)
                if (!parse_int_k(tok[k], &o->threads[k]) || o->threads[k] > MAX_THREADS) die("bad --threads value");
            o->n_threads = n;
        } else if (!strcmp(a, "--heads")) {
            if ((n = split_list(v, tok, 2)) < 1) die("bad --heads list");
            for (k = 0; k < n; k++) {
                if (!strcmp(tok[k], "gqa")) o->heads[k] = 32;
                else if (!strcmp(tok[k], "mha")) o->heads[k] = 8;
                else die("unknown --heads value (gqa, mha)");
            }
            o->n_heads = n;
        } else {
            usage(stderr);
            exit(2);
        }
    }
    if (!user_n) {
        static const int full[] = {1024, 4096, 16384, 65536}, quick[] = {1024, 4096};
        o->n_ns = o->quick ? 2 : 4;
        for (k = 0; k < o->n_ns; k++) o->ns[k] = o->quick ? quick[k] : full[k];
    }
    if (o->min_time < 0.0) o->min_time = o->quick ? 0.03 : 1.0;
    o->min_reps = 5;
    o->max_reps = o->quick ? 40 : 400;
    o->append_tokens = o->quick ? 4096 : 65536;
    o->bw_bytes = (size_t)(o->quick ? 256 : 512) << 20;
}

/* ------------------------------------------------------------------------ */

static void cpu_model(char *buf, size_t cap) {
    FILE *f = fopen("/proc/cpuinfo", "r");
    char line[512];
    snprintf(buf, cap, "unknown CPU");
    if (!f) return;
    while (fgets(line, sizeof line, f)) {
        if (!strncmp(line, "model name", 10) || !strncmp(line, "Model", 5) || !strncmp(line, "Hardware", 8)) {
            char *p = strchr(line, ':');
            if (!p) continue;
            p++;
            while (*p == ' ' || *p == '\t') p++;
            p[strcspn(p, "\n")] = 0;
            if (*p) {
                snprintf(buf, cap, "%s", p);
                break;
            }
        }
    }
    fclose(f);
}

static void bench_append(const options *o, int ci, append_row *out, float *pool_k, float *pool_v) {
    int c = o->cfgs[ci], bits = CFGS[c].bits, n = o->append_tokens, pass, t;
    double t_pass[16], c_pass[16], start = now_s();
    const size_t row = (size_t)KVH * HD;
    for (pass = 0; pass < 16; pass++) {
        double t0;
        if (bits == 32) {
            /* fp32 reference: copy the token's rows into [head][token][HD] */
            float *K = (float *)xmalloc((size_t)n * row * sizeof(float));
            float *V = (float *)xmalloc((size_t)n * row * sizeof(float));
            int h;
            memset(K, 0, (size_t)n * row * sizeof(float)); /* fault pages outside the timing */
            memset(V, 0, (size_t)n * row * sizeof(float));
            c_pass[pass] = cpu_s();
            t0 = now_s();
            for (t = 0; t < n; t++) {
                const float *k = pool_k + (size_t)(t % APPEND_POOL) * row, *v = pool_v + (size_t)(t % APPEND_POOL) * row;
                for (h = 0; h < KVH; h++) {
                    memcpy(K + ((size_t)h * n + t) * HD, k + (size_t)h * HD, HD * sizeof(float));
                    memcpy(V + ((size_t)h * n + t) * HD, v + (size_t)h * HD, HD * sizeof(float));
                }
            }
            t_pass[pass] = now_s() - t0;
            c_pass[pass] = cpu_s() - c_pass[pass];
            g_sink = K[(size_t)n * row - 1] + V[0];
            free(K);
            free(V);
        } else {
            kvq_config cfg = make_config(c, n);
            const size_t bytes = kvq_cache_bytes(&cfg);
            void *mem = xmalloc(bytes);
            kvq_cache *kc;
            memset(mem, 0, bytes); /* fault pages outside the timing, as for fp32 */
            check(kvq_cache_init(&kc, &cfg, mem, bytes), "kvq_cache_init");
            c_pass[pass] = cpu_s();
            t0 = now_s();
            for (t = 0; t < n; t++)
                check(kvq_cache_append(kc, pool_k + (size_t)(t % APPEND_POOL) * row,
                                       pool_v + (size_t)(t % APPEND_POOL) * row, 1),
                      "kvq_cache_append");
            t_pass[pass] = now_s() - t0;
            c_pass[pass] = cpu_s() - c_pass[pass];
            kvq_cache_destroy(kc);
            free(mem);
        }
        if (pass + 1 >= 3 && now_s() - start >= (o->quick ? 0.05 : 2.0)) {
            pass++;
            break;
        }
    }
    out->cfg = c;
    out->tokens = n;
    out->passes = pass;
    out->med_ms = 1e3 * median(t_pass, pass);
    out->med_cpu_ms = 1e3 * median(c_pass, pass);
}

/* Core availability: every thread of a pool runs the same fixed compute loop (no memory
   traffic); time on n threads / time on 1. 1.0 means n free cores; near n means the
   threads shared one core (other work on the machine), and so will the 2-thread rows. */
static volatile uint64_t g_spin_out[MAX_THREADS];

static void spin_part(void *arg, int idx) {
    uint64_t x = (uint64_t)idx + 1, i, n = *(const uint64_t *)arg;
    for (i = 0; i < n; i++) x = x * 6364136223846793005ull + 1442695040888963407ull;
    g_spin_out[idx] = x;
}

static double core_check(pool *one, pool *p) {
    uint64_t iters = 20u * 1000u * 1000u;
    double t1[3], tn[3];
    int k;
    for (k = 0; k < 3; k++) {
        double t0 = now_s();
        pool_run(one, spin_part, &iters);
        t1[k] = now_s() - t0;
        t0 = now_s();
        pool_run(p, spin_part, &iters);
        tn[k] = now_s() - t0;
    }
    return median(tn, 3) / median(t1, 3);
}

static void print_core_check(pool *pools, const int *have_pool, const char *when) {
    int i;
    for (i = 2; i <= MAX_THREADS; i++)
        if (have_pool[i])
            printf("core check %s: %d threads each doing 1 thread's compute took %.2fx its time "
                   "(1.00 = %d free cores)\n", when, i, core_check(&pools[1], &pools[i]), i);
}

/* Fills a buffer once and measures every pool's streaming bandwidth into bw[threads]. */
static void bandwidth_all(pool *pools, const int *have_pool, size_t bytes, double *bw) {
    float *buf = (float *)xmalloc(bytes);
    size_t n = bytes / sizeof(float), k;
    int i;
    for (k = 0; k < n; k++) buf[k] = (float)(k & 7) * 0.125f;
    for (i = 1; i <= MAX_THREADS; i++)
        if (have_pool[i]) bw[i] = measure_bandwidth(&pools[i], buf, bytes, 7);
    free(buf);
}

static void print_loadavg(const char *when) {
    FILE *f = fopen("/proc/loadavg", "r");
    char line[128];
    if (!f) return;
    if (fgets(line, sizeof line, f)) {
        line[strcspn(line, "\n")] = 0;
        printf("load average %s: %s\n", when, line);
    }
    fclose(f);
}

int main(int argc, char **argv) {
    options o;
    results R;
    pool pools[MAX_THREADS + 1];
    int have_pool[MAX_THREADS + 1];
    char cpu[256], date[32];
    time_t now = time(NULL);
    float *kbuf, *vbuf, *q[2], *out, *ref[2], *states[MAX_THREADS];
    double t_start = now_s();
    int ni, ci, hi, ti, i;

    parse_args(argc, argv, &o);
    memset(&R, 0, sizeof R);
    memset(have_pool, 0, sizeof have_pool);
    cpu_model(cpu, sizeof cpu);
    if (!strftime(date, sizeof date, "%Y-%m-%d %H:%M UTC", gmtime(&now))) snprintf(date, sizeof date, "unknown date");
    init_profiles();

    printf("kvq bench: kvq %d.%d.%d (kvq_version_number %d)\n", KVQ_VERSION_MAJOR, KVQ_VERSION_MINOR,
           KVQ_VERSION_PATCH, kvq_version_number());
#ifdef KVQ_HAS_ISA_API
    printf("kvq ISA: %s; attention arithmetic (AUTO): %s kernels (configs ending in f: float kernels)\n",
           kvq_isa_name(kvq_get_isa()), kvq_integer_kernels() ? "integer" : "float");
#else
    printf("kvq ISA: (kvq.h has no ISA query; scalar or compile-time selected)\n");
#endif
    g_ghz = measure_ghz();
    printf("CPU: %s, %ld online cores; clock %.2f GHz (measured: dependent adds, best of 5)\n", cpu,
           sysconf(_SC_NPROCESSORS_ONLN), g_ghz);
    print_loadavg("at start (other work on the machine skews every figure)");
#ifdef __VERSION__
    printf("compiler: %s\n", __VERSION__);
#endif
    fflush(stdout);

    for (ti = 0; ti < o.n_threads; ti++) {
        int n = o.threads[ti];
        if (!have_pool[n]) {
            pool_start(&pools[n], n);
            have_pool[n] = 1;
        }
    }
    if (!have_pool[1]) {
        pool_start(&pools[1], 1);
        have_pool[1] = 1;
    }

    /* bandwidth first, before the big caches exist */
    R.bw_bytes = o.bw_bytes / (BW_LANES * MAX_THREADS * sizeof(float)) * (BW_LANES * MAX_THREADS * sizeof(float));
    bandwidth_all(pools, have_pool, o.bw_bytes, R.bw);
    print_core_check(pools, have_pool, "at start");
    printf("memory read bandwidth (streaming sum over %zu MiB, median of 7 passes): %.1f GB/s on 1 thread",
           o.bw_bytes >> 20, R.bw[1]);
    for (i = 2; i <= MAX_THREADS; i++)
        if (R.bw[i] > 0) printf(", %.1f GB/s on %d threads", R.bw[i], i);
    printf("\n");
    printf("attention: decode (1 query), head_dim %d, %d KV heads; kvq configs key_bits = value_bits = b,\n"
           "  group 32, residual 128 (kvq_default_config); fp32 = the hand-written fp32 cache in this file.\n"
           "timing: 1 warm-up call, then repeat until >= %d reps and >= %.2f s spent (at most %d reps); median.\n"
           "  2+ threads: token ranges split over a persistent pthread pool (kvq_attention_partial + merge).\n"
           "  Caches are hot between reps: small N fits in L2/L3, so GB/s can pass DRAM bandwidth.\n"
           "  MB read = kvq_cache_payload_bytes (fp32: 8 * N * kv_heads * D); %%BW is against the bandwidth\n"
           "  measured above at the same thread count; vs fp16 = fp16 time / this time (same N, heads, threads);\n"
           "  cpu ms = CPU time of the process per call (all threads); cyc/tok/kvh = ns/tok/kvh x the clock above.\n"
           "  out.dev = relative L2 deviation of the output from the hand-written fp32 cache's output: a check\n"
           "  that every path and the split API compute the same thing. It is not a quality figure: the\n"
           "  synthetic values are zero-mean, so outputs are small and 2-bit deviations read 0.7-3 here;\n"
           "  accuracy against exact attention on real data is the eval tool's (make eval).\n",
           HD, KVH, o.min_reps, o.min_time, o.max_reps);
    fflush(stdout);

    kbuf = (float *)xmalloc((size_t)FILL_CHUNK * KVH * HD * sizeof(float));
    vbuf = (float *)xmalloc((size_t)FILL_CHUNK * KVH * HD * sizeof(float));
    out = (float *)xmalloc((size_t)32 * HD * sizeof(float));
    for (i = 0; i < 2; i++) {
        q[i] = (float *)xmalloc((size_t)32 * HD * sizeof(float));
        ref[i] = (float *)xmalloc((size_t)32 * HD * sizeof(float));
    }
    for (i = 0; i < MAX_THREADS; i++) states[i] = (float *)xmalloc((size_t)32 * STATE_STRIDE * sizeof(float));
    for (hi = 0; hi < o.n_heads; hi++) gen_queries(o.heads[hi], q[hi]);
    R.cap = o.n_ns * o.n_cfgs * o.n_heads * o.n_threads;
    R.rows = (row *)xmalloc(sizeof(row) * (size_t)R.cap);

    for (ni = 0; ni < o.n_ns; ni++) {
        int n = o.ns[ni], have_ref = 0;
        for (ci = 0; ci < o.n_cfgs; ci++) {
            int c = o.cfgs[ci], bits = CFGS[c].bits;
            fp32cache fc = {0, NULL, NULL};
            kvq_cache *kc = NULL;
            double bytes, tf = now_s();
            char nb[32];
            fmt_tokens(n, nb, sizeof nb);
            fprintf(stderr, "[%6.1fs] N=%s %s: filling...", now_s() - t_start, nb, CFGS[c].name);
            if (bits == 32) {
                fill_fp32(&fc, n, kbuf, vbuf);
                bytes = 4.0 * 2 * n * KVH * HD;
            } else {
                kc = fill_kvq(c, n, kbuf, vbuf);
                bytes = (double)kvq_cache_payload_bytes(kc);
            }
            fprintf(stderr, " %.1fs;", now_s() - tf);
            for (hi = 0; hi < o.n_heads; hi++)
                for (ti = 0; ti < o.n_threads; ti++) {
                    attn_job j;
                    row *r = &R.rows[R.n_rows];
                    memset(&j, 0, sizeof j);
                    j.is_fp32 = bits == 32;
                    j.fc = &fc;
                    j.kc = kc;
                    j.arith = CFGS[c].arith;
                    j.ap.n_q_heads = o.heads[hi];
                    j.ap.n_queries = 1;
                    j.ap.scale = 0.0f;
                    j.q = q[hi];
                    j.out = out;
                    for (i = 0; i < MAX_THREADS; i++) j.states[i] = states[i];
                    j.n_tokens = n;
                    j.parts = o.threads[ti];
                    j.pool = &pools[j.parts];
                    if (!j.is_fp32 && kvq_attention_state_floats(kc, &j.ap) > (size_t)32 * STATE_STRIDE)
                        die("kvq state larger than expected");
                    memset(r, 0, sizeof *r);
                    r->cfg = c;
                    r->nq = o.heads[hi];
                    r->threads = j.parts;
                    r->n = n;
                    r->bytes = bytes;
                    r->bits_el = 8.0 * bytes / (2.0 * n * KVH * HD);
                    time_row(&j, &o, r);
                    if (bits == 32 && j.parts == 1) {
                        memcpy(ref[hi], out, (size_t)o.heads[hi] * HD * sizeof(float));
                        have_ref |= 1 << hi;
                    }
                    r->err = have_ref & (1 << hi) ? rel_err(out, ref[hi], (size_t)o.heads[hi] * HD) : -1.0;
                    R.n_rows++;
                    fprintf(stderr, " %s/%dt %.2fms", o.heads[hi] == 32 ? "gqa" : "mha", j.parts, r->med_ms);
                }
            fprintf(stderr, "\n");
            if (bits == 32) {
                free(fc.k);
                free(fc.v);
            } else {
                kvq_cache_destroy(kc);
            }
        }
        print_block(&R, &o, n);
    }

    /* bandwidth again: if it moved, the machine was busy and %BW is uncertain */
    bandwidth_all(pools, have_pool, o.bw_bytes, R.bw_end);
    printf("\nmemory read bandwidth again after the attention rows: %.1f GB/s on 1 thread (%+.0f%% vs start)",
           R.bw_end[1], 100.0 * (R.bw_end[1] / R.bw[1] - 1.0));
    for (i = 2; i <= MAX_THREADS; i++)
        if (R.bw_end[i] > 0) printf(", %.1f GB/s on %d threads", R.bw_end[i], i);
    printf("\n");
    if (fabs(R.bw_end[1] / R.bw[1] - 1.0) > 0.10)
        printf("  WARNING: bandwidth moved by more than 10%% during the run; something else was using the machine.\n");
    print_core_check(pools, have_pool, "after the attention rows");

    /* append throughput: one token per call (decode), inputs cycled from a small pool */
    {
        const size_t row = (size_t)KVH * HD;
        float *pk = (float *)xmalloc(APPEND_POOL * row * sizeof(float));
        float *pv = (float *)xmalloc(APPEND_POOL * row * sizeof(float));
        char nb[32];
        gen_tokens(0, APPEND_POOL, pk, pv);
        fmt_tokens(o.append_tokens, nb, sizeof nb);
        printf("\nappend: %s tokens one per call into an empty cache (%d KV heads, D %d), inputs cycled from %d\n"
               "  tokens; >= 3 passes, median pass; the cache's memory is faulted in before the timing.\n"
               "  fp32 = copying rows into [head][token][D].\n",
               nb, KVH, HD, APPEND_POOL);
        printf("%-8s %7s %12s %12s %14s %14s\n", "config", "passes", "ms/pass", "ns/token", "ns/token/kvh",
               "cpu ns/token");
        for (ci = 0; ci < o.n_cfgs; ci++) {
            append_row *a = &R.app[R.n_app++];
            fprintf(stderr, "[%6.1fs] append %s\n", now_s() - t_start, CFGS[o.cfgs[ci]].name);
            bench_append(&o, ci, a, pk, pv);
            printf("%-8s %7d %12.2f %12.1f %14.1f %14.1f\n", CFGS[a->cfg].name, a->passes, a->med_ms,
                   a->med_ms * 1e6 / a->tokens, a->med_ms * 1e6 / a->tokens / KVH, a->med_cpu_ms * 1e6 / a->tokens);
            fflush(stdout);
        }
        free(pk);
        free(pv);
    }

    /* summary: GQA / MHA, 1 thread, ms by config and N */
    for (hi = 0; hi < o.n_heads; hi++)
        for (ti = 0; ti < o.n_threads; ti++) {
            printf("\nsummary, %s, %d thread%s: median ms (speed-up vs kvq fp16)\n%-8s", heads_label(o.heads[hi]),
                   o.threads[ti], o.threads[ti] == 1 ? "" : "s", "config");
            for (ni = 0; ni < o.n_ns; ni++) {
                char nb[32];
                fmt_tokens(o.ns[ni], nb, sizeof nb);
                printf(" %18s", nb);
            }
            printf("\n");
            for (ci = 0; ci < o.n_cfgs; ci++) {
                printf("%-8s", CFGS[o.cfgs[ci]].name);
                for (ni = 0; ni < o.n_ns; ni++) {
                    const row *r = find_row(&R, o.cfgs[ci], o.heads[hi], o.threads[ti], o.ns[ni]);
                    const row *b = find_row(&R, CFG_FP16, o.heads[hi], o.threads[ti], o.ns[ni]);
                    char cell[64];
                    if (r && b) snprintf(cell, sizeof cell, "%.3f (%.2fx)", r->med_ms, b->med_ms / r->med_ms);
                    else if (r) snprintf(cell, sizeof cell, "%.3f", r->med_ms);
                    else snprintf(cell, sizeof cell, "-");
                    printf(" %18s", cell);
                }
                printf("\n");
            }
        }

    if (write_csv(&R, cpu, date, o.csv_path) != 0) fprintf(stderr, "bench: cannot write %s\n", o.csv_path);
    else printf("\nwrote %s\n", o.csv_path);
    if (write_svg(&R, &o, cpu, date, o.svg_path) != 0) fprintf(stderr, "bench: cannot write %s\n", o.svg_path);
    else printf("wrote %s\n", o.svg_path);
    print_loadavg("at end");
    printf("total time %.1f s\n", now_s() - t_start);

    for (i = 1; i <= MAX_THREADS; i++)
        if (have_pool[i]) pool_stop(&pools[i]);
    for (i = 0; i < 2; i++) {
        free(q[i]);
        free(ref[i]);
    }
    for (i = 0; i < MAX_THREADS; i++) free(states[i]);
    free(kbuf);
    free(vbuf);
    free(out);
    free(R.rows);
    return 0;
}
