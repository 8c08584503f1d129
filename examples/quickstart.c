/* quickstart: the smallest useful kvq program.
   Fills a cache of kvq's default config (3-bit keys, 2-bit values: 3.0 bits) with 4096 tokens of keys/values (8 KV heads, head_dim 128),
   runs one decode attention step for 32 query heads, and compares it with exact
   fp32 attention over the same keys and values.
     cc -O2 -I. examples/quickstart.c -lm -o quickstart && ./quickstart */
#define KVQ_IMPLEMENTATION
#include "kvq.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>

enum { HEAD_DIM = 128, KV_HEADS = 8, Q_HEADS = 32, TOKENS = 4096 };

/* Keys with per-channel offsets and two outlier channels, as real LLM keys have. */
static float sample(unsigned *s, int channel, int is_key) {
    float u1, u2, x;
    *s = *s * 1664525u + 1013904223u;
    u1 = ((*s >> 8) + 1) / 16777217.0f;
    *s = *s * 1664525u + 1013904223u;
    u2 = (*s >> 8) / 16777216.0f;
    x = sqrtf(-2.0f * logf(u1)) * cosf(6.2831853f * u2);
    if (is_key) return (channel % 17 == 3 ? 12.0f : 1.0f) * x + 0.1f * (float)(channel % 5);
    return 0.5f * x + 0.05f * (float)(channel % 7);
}

/* Exact attention of one query head over fp32 keys/values [token][kv_head][dim]. */
static void exact_attention(const float *k, const float *v, const float *q, int kv_head, float *out) {
    static float score[TOKENS];
    float mx = -INFINITY, sum = 0.0f;
    int t, c;
    for (t = 0; t < TOKENS; t++) {
        const float *kt = k + ((size_t)t * KV_HEADS + kv_head) * HEAD_DIM;
        float d = 0.0f;
        for (c = 0; c < HEAD_DIM; c++) d += q[c] * kt[c];
        score[t] = d / sqrtf((float)HEAD_DIM);
        mx = score[t] > mx ? score[t] : mx;
    }
    for (c = 0; c < HEAD_DIM; c++) out[c] = 0.0f;
    for (t = 0; t < TOKENS; t++) {
        const float *vt = v + ((size_t)t * KV_HEADS + kv_head) * HEAD_DIM;
        float p = expf(score[t] - mx);
        sum += p;
        for (c = 0; c < HEAD_DIM; c++) out[c] += p * vt[c];
    }
    for (c = 0; c < HEAD_DIM; c++) out[c] /= sum;
}

int main(void) {
    size_t n = (size_t)TOKENS * KV_HEADS * HEAD_DIM, i;
    float *k = malloc(n * sizeof *k), *v = malloc(n * sizeof *v);
    float q[Q_HEADS * HEAD_DIM], out[Q_HEADS * HEAD_DIM], ref[HEAD_DIM];
    unsigned seed = 1;
    double err = 0.0, norm = 0.0, bits;
    int t, h, c;
    kvq_cache *cache;
    kvq_config cfg = kvq_default_config(HEAD_DIM, KV_HEADS, TOKENS); /* 3-bit K, 2-bit V: 3.0 bits */
    kvq_attn_params ap = {Q_HEADS, 1, 0.0f};                         /* 1 query, scale 1/sqrt(d) */
    kvq_status st;

    if (!k || !v) return 1;
    for (i = 0; i < n; i++) {
        k[i] = sample(&seed, (int)(i % HEAD_DIM), 1);
        v[i] = sample(&seed, (int)(i % HEAD_DIM), 0);
    }
    for (i = 0; i < Q_HEADS * HEAD_DIM; i++) q[i] = sample(&seed, (int)(i % HEAD_DIM), 0);

    if ((st = kvq_cache_create(&cache, &cfg)) != KVQ_OK) {
        fprintf(stderr, "kvq_cache_create: %s\n", kvq_status_string(st));
        return 1;
    }
    for (t = 0; t < TOKENS; t++) /* decode: one token at a time */
        if ((st = kvq_cache_append(cache, k + (size_t)t * KV_HEADS * HEAD_DIM,
                                   v + (size_t)t * KV_HEADS * HEAD_DIM, 1)) != KVQ_OK) {
            fprintf(stderr, "kvq_cache_append: %s\n", kvq_status_string(st));
            return 1;
        }
    if ((st = kvq_attention(cache, q, out, &ap)) != KVQ_OK) {
        fprintf(stderr, "kvq_attention: %s\n", kvq_status_string(st));
        return 1;
    }

    for (h = 0; h < Q_HEADS; h++) {
        exact_attention(k, v, q + h * HEAD_DIM, h / (Q_HEADS / KV_HEADS), ref);
        for (c = 0; c < HEAD_DIM; c++) {
            double d = out[h * HEAD_DIM + c] - ref[c];
            err += d * d;
            norm += (double)ref[c] * ref[c];
        }
    }
    bits = 8.0 * (double)kvq_cache_payload_bytes(cache) / (2.0 * TOKENS * KV_HEADS * HEAD_DIM);
    printf("kvq %d.%d.%d quickstart: %d tokens, %d KV heads, head_dim %d, %d query heads\n", KVQ_VERSION_MAJOR,
           KVQ_VERSION_MINOR, KVQ_VERSION_PATCH, TOKENS, KV_HEADS, HEAD_DIM, Q_HEADS);
    printf("  config            %d-bit keys (blocks of %d tokens), %d-bit values (groups of %d channels), "
           "%d fp16 residual tokens, %d fp16 sinks\n",
           cfg.key_bits, cfg.key_block, cfg.value_bits, cfg.group_size, cfg.residual_tokens, cfg.sink_tokens);
    printf("  storage           %.2f bits per element (%.2f steady state, residual window excluded)\n", bits,
           kvq_config_bits_per_element(&cfg));
    printf("  cache size        %.2f MiB  (fp16: %.2f MiB, %.1fx smaller; fp32: %.2f MiB)\n",
           kvq_cache_payload_bytes(cache) / 1048576.0, n * 2.0 * 2 / 1048576.0,
           n * 2.0 * 2 / (double)kvq_cache_payload_bytes(cache), n * 4.0 * 2 / 1048576.0);
    printf("  attention error   %.3e  (||out - exact||^2 / ||exact||^2, exact = fp32 attention)\n", err / norm);
    kvq_cache_destroy(cache);
    free(k);
    free(v);
    return 0;
}
