/* Shared helpers for kvq's tests: a counting check harness, a deterministic
   random source, an exact (double) attention reference and data generators. */
#ifndef KVQ_TEST_UTIL_H
#define KVQ_TEST_UTIL_H

#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#if defined(__GNUC__) || defined(__clang__)
#define TU_FN static __attribute__((unused)) /* each test uses some of these */
#else
#define TU_FN static
#endif

static int tu_passed, tu_failed;

#define CHECK(cond, ...)                                                  \
    do {                                                                  \
        if (cond) {                                                       \
            tu_passed++;                                                  \
        } else {                                                          \
            tu_failed++;                                                  \
            fprintf(stderr, "FAIL %s:%d: %s: ", __FILE__, __LINE__, #cond); \
            fprintf(stderr, __VA_ARGS__);                                 \
            fputc('\n', stderr);                                          \
        }                                                                 \
    } while (0)

TU_FN int tu_finish(const char *name) {
    printf("%s: %d passed, %d failed\n", name, tu_passed, tu_failed);
    return tu_failed ? 1 : 0;
}

/* xorshift64*: deterministic across platforms */
typedef struct tu_rng { uint64_t s; } tu_rng;
TU_FN uint64_t tu_next(tu_rng *r) {
    r->s ^= r->s >> 12;
    r->s ^= r->s << 25;
    r->s ^= r->s >> 27;
    return r->s * 2685821657736338717ull;
}
TU_FN float tu_uniform(tu_rng *r) { return (float)((tu_next(r) >> 40) * (1.0 / 16777216.0)); }
TU_FN float tu_normal(tu_rng *r) {
    float u = tu_uniform(r), v = tu_uniform(r);
    if (u < 1e-7f) u = 1e-7f;
    return sqrtf(-2.0f * logf(u)) * cosf(6.2831853f * v);
}

TU_FN void *tu_alloc(size_t n) {
    void *p = calloc(n ? n : 1, 1);
    if (!p) { fprintf(stderr, "out of memory\n"); exit(2); }
    return p;
}

/* Exact attention in double. K, V: [T][H][D]; q, out: [nq][nqh][D]; query i sees
   tokens <= T - nq + i. */
TU_FN void tu_ref_attention(const float *K, const float *V, int T, int H, int D, const float *q, int nq,
                             int nqh, float scale, double *out) {
    int i, qh, t, c, group = nqh / H;
    double *s = (double *)tu_alloc(sizeof(double) * (size_t)T);
    for (i = 0; i < nq; i++)
        for (qh = 0; qh < nqh; qh++) {
            int h = qh / group, limit = T - nq + i + 1;
            const float *qv = q + ((size_t)i * nqh + qh) * D;
            double mx = -1e300, l = 0.0, *o = out + ((size_t)i * nqh + qh) * D;
            for (t = 0; t < limit; t++) {
                double d = 0.0;
                for (c = 0; c < D; c++) d += (double)qv[c] * K[((size_t)t * H + h) * D + c];
                s[t] = d * scale;
                if (s[t] > mx) mx = s[t];
            }
            for (c = 0; c < D; c++) o[c] = 0.0;
            for (t = 0; t < limit; t++) {
                double p = exp(s[t] - mx);
                l += p;
                for (c = 0; c < D; c++) o[c] += p * V[((size_t)t * H + h) * D + c];
            }
            for (c = 0; c < D; c++) o[c] /= l;
        }
    free(s);
}

/* Squared relative error ||a - b||^2 / ||b||^2 over n elements. */
TU_FN double tu_rel_err(const float *a, const double *b, size_t n) {
    double e = 0.0, r = 0.0;
    size_t i;
    for (i = 0; i < n; i++) {
        e += (a[i] - b[i]) * (a[i] - b[i]);
        r += b[i] * b[i];
    }
    return r > 0.0 ? e / r : e;
}

/* The same for float results: ||x - ref||^2 / ||ref||^2; NaN anywhere gives 1e30. */
TU_FN double tu_nmse(const float *x, const float *ref, size_t n) {
    double num = 0.0, den = 0.0;
    size_t i;
    for (i = 0; i < n; i++) {
        double d = (double)x[i] - (double)ref[i];
        num += d * d;
        den += (double)ref[i] * ref[i];
    }
    if (!(num == num)) return 1e30;
    return den > 0.0 ? num / den : num;
}

/* Data sets. Random: N(0,1) keys and values (zero-mean values: outputs near
   zero, the hard case for relative error). Structured, like real LLM K/V:
   per-channel key offsets, a few outlier channels 10-20x larger, values with
   non-zero channel means, and a few "sink-like" tokens whose keys align with
   the queries so attention is peaked. */
enum { TU_RANDOM = 0, TU_STRUCTURED = 1 };

TU_FN void tu_fill_kv(tu_rng *r, int kind, int T, int H, int D, float *K, float *V) {
    int t, h, c;
    for (t = 0; t < T; t++)
        for (h = 0; h < H; h++)
            for (c = 0; c < D; c++) {
                size_t at = ((size_t)t * H + h) * D + c;
                float k = tu_normal(r), v = tu_normal(r);
                if (kind == TU_STRUCTURED) {
                    float chan_mean = (float)((c * 7 + h * 3) % 11) * 0.2f - 1.0f;
                    k = k + chan_mean;
                    if (c % 37 == 5 || c == D - 3) k *= 15.0f; /* outlier channels */
                    v = 0.5f * v + (float)((c * 5 + h) % 7) * 0.3f - 0.6f;
                    if (t % 97 == 3) k += 6.0f; /* tokens that draw attention */
                }
                K[at] = k;
                V[at] = v;
            }
}

TU_FN void tu_fill_q(tu_rng *r, int kind, size_t n, int D, float *q) {
    size_t i;
    for (i = 0; i < n; i++) {
        q[i] = tu_normal(r);
        if (kind == TU_STRUCTURED) q[i] = 0.5f * q[i] + 0.4f; /* correlated with the key offsets */
        (void)D;
    }
}

#endif
