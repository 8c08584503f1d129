/* libFuzzer target: random sequences of (config, append, attention, read, split,
   serialize, truncate, reset) calls, on every config class (salient, rotated, per-token keys). Invariants: every call returns a known status, a failed
   call changes none of the cache's memory, and the token count moves only on success. */
#define KVQ_IMPLEMENTATION
#include "../../kvq.h"
#include <math.h>
#include <stdlib.h>
#include <string.h>

typedef struct reader { const uint8_t *p; size_t n, at; } reader;
static unsigned next(reader *r) { return r->at < r->n ? r->p[r->at++] : 0u; }

static float value(reader *r) {
    unsigned b = next(r);
    if (b == 255) return NAN;
    if (b == 254) return INFINITY;
    if (b == 253) return 1e6f;   /* beyond fp16 */
    if (b == 252) return 65504.0f;
    return ((float)b - 128.0f) / (float)(1 + (next(r) & 15));
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);
int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    static const int bits[] = {2, 3, 4, 8, 16, 5, 0, 2};
    static const int groups[] = {16, 32, 64, 128};
    reader r;
    kvq_config cfg;
    kvq_cache *c = NULL;
    uint8_t *mem, *copy;
    size_t need, row;
    int step;
    r.p = data;
    r.n = size;
    r.at = 0;
    cfg = kvq_default_config(8 * (1 + (int)(next(&r) % 12)), 1 + (int)(next(&r) % 3), 1 + (int)(next(&r) % 200));
    cfg.key_bits = bits[next(&r) % 8];
    cfg.value_bits = bits[next(&r) % 8];
    cfg.group_size = groups[next(&r) % 4];
    cfg.key_block = 0;         /* blocks of G and fp16 value params unless the bytes below say */
    cfg.value_param_bits = 32; /* otherwise (not the default's b64 p16 every time) */
    cfg.residual_tokens = cfg.group_size * (int)(next(&r) % 3);
    cfg.sink_tokens = (int)(next(&r) % 8);
    cfg.rollback_tokens = (int)(next(&r) % 20);
    {   /* the optional features: salient tokens, rotation, per-token keys (any mix; some refused) */
        static const float ratios[] = {0.05f, 0.1f, 0.25f, 0.6f};
        unsigned mode = next(&r);
        if (mode & 1) {
            cfg.salient_ratio = ratios[(mode >> 3) & 3];
            cfg.salient_bits = mode & 32 ? 16 : 8;
            cfg.salient_policy = mode & 64 ? KVQ_SALIENT_ERROR : KVQ_SALIENT_ATTENTION;
        }
        if (mode & 2) cfg.rotation = mode & 128 ? KVQ_ROTATE_PREROTATED : KVQ_ROTATE_HADAMARD;
        if (mode & 4) cfg.key_axis = KVQ_KEYS_PER_TOKEN;
        if (mode & 16) cfg.range_search = mode & 8 ? 0 : 8; /* min/max or the widest search; else the default */
        mode = next(&r); /* format v2: key blocks apart from value groups, 16-bit value params (some refused) */
        if (mode & 1) cfg.key_block = groups[(mode >> 1) & 3];
        if (mode & 8) cfg.residual_tokens = cfg.key_block * (int)((mode >> 4) % 3);
        if (mode & 64) cfg.value_param_bits = 16;
    }
    need = kvq_cache_bytes(&cfg);
    if (need == 0) {
        if (kvq_config_check(&cfg) == KVQ_OK) abort();
        return 0;
    }
    mem = (uint8_t *)malloc(need);
    copy = (uint8_t *)malloc(need);
    if (!mem || !copy || kvq_cache_init(&c, &cfg, mem, need) != KVQ_OK) abort();
    row = (size_t)cfg.n_kv_heads * cfg.head_dim;
    for (step = 0; step < 24 && r.at < r.n; step++) {
        unsigned op = next(&r) % 7;
        int before = kvq_cache_tokens(c);
        kvq_status st = KVQ_OK;
        memcpy(copy, mem, need);
        if (op == 0) { /* append */
            int n = (int)(next(&r) % 40) - 2, i;
            size_t m = n > 0 ? (size_t)n * row : 1;
            float *k = (float *)malloc(m * 4), *v = (float *)malloc(m * 4);
            for (i = 0; i < (int)m; i++) { k[i] = value(&r); v[i] = value(&r); }
            st = kvq_cache_append(c, k, v, n);
            if (st == KVQ_OK && kvq_cache_tokens(c) != before + (n > 0 ? n : 0)) abort();
            free(k);
            free(v);
        } else if (op == 1 || op == 2) { /* attention, or split + merge */
            int group = 1 + (int)(next(&r) % 4), nq = (int)(next(&r) % 4);
            kvq_attn_params ap;
            size_t n = (size_t)(nq > 0 ? nq : 1) * group * row, i;
            float *q = (float *)malloc(n * 4), *o = (float *)malloc(n * 4);
            ap.n_q_heads = cfg.n_kv_heads * group;
            ap.n_queries = nq;
            ap.scale = (next(&r) & 1) ? 0.0f : 0.3f;
            for (i = 0; i < n; i++) q[i] = value(&r) * 0.01f;
            if (op == 1) {
                st = kvq_attention(c, q, o, &ap);
            } else {
                size_t sf = kvq_attention_state_floats(c, &ap);
                float *s = (float *)malloc((sf ? sf : 1) * 4);
                const float *one[1];
                int split = before ? (int)(next(&r) % (unsigned)(before + 1)) : 0;
                one[0] = s;
                st = kvq_attention_partial(c, q, &ap, 0, split, 0, cfg.n_kv_heads, s);
                if (st == KVQ_OK) (void)kvq_attention_merge(c, &ap, one, 1, o);
                free(s);
            }
            /* attention never writes, except the salience it records with the attention policy */
            if (st == KVQ_OK && !(cfg.salient_ratio > 0.0f && cfg.salient_policy == KVQ_SALIENT_ATTENTION) &&
                memcmp(copy, mem, need) != 0)
                abort();
            if (kvq_cache_tokens(c) != before) abort();
            free(q);
            free(o);
        } else if (op == 3) { /* read */
            int first = (int)(next(&r) % 64) - 1, n = (int)(next(&r) % 64) - 1;
            size_t m = n > 0 ? (size_t)n * row : 1;
            float *k = (float *)malloc(m * 4), *v = (float *)malloc(m * 4);
            st = kvq_cache_read(c, first, n, (next(&r) & 1) ? k : NULL, v);
            free(k);
            free(v);
            if (memcmp(copy, mem, need) != 0) abort();
        } else if (op == 4) { /* serialize and load into fresh memory */
            size_t n = kvq_cache_serialized_bytes(c), w = 0;
            uint8_t *img = (uint8_t *)malloc(n), *m2 = (uint8_t *)malloc(need);
            kvq_cache *c2 = NULL;
            if (kvq_cache_serialize(c, img, n, &w) != KVQ_OK || w != n) abort();
            if (kvq_cache_deserialize(&c2, img, n, m2, need) != KVQ_OK) abort();
            if (kvq_cache_tokens(c2) != before || kvq_cache_payload_bytes(c2) != kvq_cache_payload_bytes(c)) abort();
            free(img);
            free(m2);
        } else if (op == 5) { /* truncate: a rollback or a deep cut; the image then loads (op 4) */
            int n = (int)(next(&r) % (unsigned)(before + 3)) - 1;
            st = kvq_cache_truncate(c, n);
            if (st == KVQ_OK && kvq_cache_tokens(c) != n) abort();
            if (st == KVQ_OK && n == before && memcmp(copy, mem, need) != 0) abort(); /* a cut of nothing */
        } else {
            kvq_cache_reset(c);
            if (kvq_cache_tokens(c) != 0 || kvq_cache_payload_bytes(c) != 0) abort();
            continue;
        }
        if (st != KVQ_OK) {
            if (st != KVQ_ERR_INVALID && st != KVQ_ERR_FULL && st != KVQ_ERR_UNSUPPORTED) abort();
            if (memcmp(copy, mem, need) != 0 || kvq_cache_tokens(c) != before) abort();
        }
    }
    free(mem);
    free(copy);
    return 0;
}
