/* Contract tests of the ISA kernels: for every ISA kvq_set_isa() accepts here,
   against KVQ_ISA_SCALAR on the same inputs,
   - the quantized bytes are identical (key blocks, value params and codes, sinks, rings),
   - kvq_cache_read() is identical,
   - attention (and the split API) is within NMSE 1e-6 of scalar under the same arithmetic,
     the float kernels and the integer scheme each (kvq_set_arith),
   over bits 2/3/4/8/16 (also mixed), G 16..128, head_dim 8..256, GQA 1..8,
   several queries, sinks, residual 0 and 128, ragged token counts; at 64K
   tokens; and on the real KV dumps in ../shared/data when they are there.
   And the integer scheme's contract: within squared relative error 1e-4 of the float
   kernels' output at 64K tokens (zero-mean values, values with channel means) and on every
   layer of the three real dumps, on scalar and the best ISA. */
#define KVQ_IMPLEMENTATION
#include "../kvq.h"
#include "test_util.h"
#define KVQ_DATA_IMPLEMENTATION
#include "../examples/kvq_data.h"

#define NMSE_MAX 1e-6

#ifdef __aarch64__
#define LONG_T (1 << 16) /* qemu is slow: the long case once, smaller heads */
#define LONG_D 64
#else
#define LONG_T (1 << 16)
#define LONG_D 128
#endif

static int isas[4], n_isas;
static double worst_nmse;
static kvq_arith arith = KVQ_ARITH_FLOAT; /* the arithmetic the ISA comparisons run under */

/* Creates a cache under isa and appends K, V in chunks (exercising the ring). */
static kvq_cache *build(const kvq_config *cfg, kvq_isa isa, const float *K, const float *V, int T) {
    kvq_cache *c = NULL;
    size_t row = (size_t)cfg->n_kv_heads * cfg->head_dim;
    int t = 0, step = 1;
    kvq_set_isa(isa);
    if (kvq_cache_create(&c, cfg) != KVQ_OK) return NULL;
    while (t < T) {
        int n = T - t < step ? T - t : step;
        if (kvq_cache_append(c, K + row * t, V + row * t, n) != KVQ_OK) {
            kvq_cache_destroy(c);
            return NULL;
        }
        t += n;
        step = step * 3 + 1;
    }
    return c;
}

/* Every stored byte that means something: sinks, key blocks, values, waiting rows. */
static int same_bytes(const kvq_cache *a, const kvq_cache *b) {
    const int H = a->cfg.n_kv_heads, D = a->cfg.head_dim, G = a->kb;
    const int after = a->n_tokens > a->cfg.sink_tokens ? a->n_tokens - a->cfg.sink_tokens : 0;
    const int sinks = a->n_tokens - after;
    int h, i;
    if (a->n_tokens != b->n_tokens || a->n_kblocks != b->n_kblocks || a->n_vquant != b->n_vquant) return 0;
    for (h = 0; h < H; h++) {
        if (sinks && (memcmp(kvq__sink_row(a, a->sink_k, h, 0), kvq__sink_row(b, b->sink_k, h, 0), (size_t)sinks * D * 2) ||
                      memcmp(kvq__sink_row(a, a->sink_v, h, 0), kvq__sink_row(b, b->sink_v, h, 0), (size_t)sinks * D * 2)))
            return 0;
        if (a->n_kblocks && memcmp(kvq__key_block(a, h, 0), kvq__key_block(b, h, 0), a->kblock_bytes * a->n_kblocks))
            return 0;
        if (a->n_vquant && (memcmp(kvq__value_codes(a, h, 0), kvq__value_codes(b, h, 0), a->vcode_bytes * a->n_vquant) ||
                            memcmp(kvq__value_params(a, h, 0), kvq__value_params(b, h, 0), a->vparam_bytes * a->n_vquant)))
            return 0;
        for (i = a->n_kblocks * G; i < after; i++)
            if (memcmp(kvq__ring_k_row(a, h, i), kvq__ring_k_row(b, h, i), (size_t)D * 2)) return 0;
        for (i = a->n_vquant; i < after; i++)
            if (memcmp(kvq__ring_v_row(a, h, i), kvq__ring_v_row(b, h, i), (size_t)D * 2)) return 0;
        if (a->n_ktok && (memcmp(kvq__key_token_codes(a, h, 0), kvq__key_token_codes(b, h, 0), a->ktcode_bytes * a->n_ktok) ||
                          memcmp(kvq__key_token_params(a, h, 0), kvq__key_token_params(b, h, 0),
                                 a->ktparam_bytes * a->n_ktok)))
            return 0;
        if (a->n_salient && a->n_kblocks &&
            memcmp(kvq__side_entry(a, h, 0, 0), kvq__side_entry(b, h, 0, 0),
                   a->side_bytes * a->n_salient * a->n_kblocks))
            return 0;
    }
    return 1;
}

/* Attention of cache c under isa; split = 1: three token ranges, two KV-head ranges, merged. */
static int attend(kvq_cache *c, kvq_isa isa, const float *q, const kvq_attn_params *ap, int split, float *out) {
    int T = c->n_tokens, H = c->cfg.n_kv_heads, k, ok = 1;
    kvq_set_arith(arith);
    kvq_set_isa(isa);
    if (!split) return kvq_attention(c, q, out, ap) == KVQ_OK;
    {
        size_t nf = kvq_attention_state_floats(c, ap);
        float *st[3];
        int cut[4];
        cut[0] = 0;
        cut[1] = T / 3 + 1;
        cut[2] = 2 * T / 3 + 5 < T ? 2 * T / 3 + 5 : T;
        cut[3] = T;
        for (k = 0; k < 3; k++) {
            int hm = H / 2 > 0 ? H / 2 : 1;
            st[k] = (float *)tu_alloc(nf * sizeof(float));
            ok &= kvq_attention_partial(c, q, ap, cut[k], cut[k + 1], 0, hm, st[k]) == KVQ_OK;
            if (hm < H) ok &= kvq_attention_partial(c, q, ap, cut[k], cut[k + 1], hm, H, st[k]) == KVQ_OK;
        }
        ok &= kvq_attention_merge(c, ap, (const float *const *)st, 3, out) == KVQ_OK;
        for (k = 0; k < 3; k++) free(st[k]);
    }
    return ok;
}

typedef struct shape {
    int kb, vb, G, D, H, ratio, nq, S, R, T, kind, rot, salient_pct, per_token_keys, search;
    int key_block, pbits; /* 0: group_size, 32 */
} shape;

static void check_shape(const shape *s, int split) {
    kvq_config cfg = kvq_default_config(s->D, s->H, s->T + 8);
    size_t n = (size_t)s->T * s->H * s->D, nout;
    float *K = (float *)tu_alloc(n * 4), *V = (float *)tu_alloc(n * 4);
    float *Ka = (float *)tu_alloc(n * 4), *Va = (float *)tu_alloc(n * 4);
    float *Kb = (float *)tu_alloc(n * 4), *Vb = (float *)tu_alloc(n * 4);
    float *q, *ref, *out;
    kvq_cache *base, *c;
    kvq_attn_params ap;
    tu_rng r;
    int i;
    cfg.key_bits = s->kb;
    cfg.value_bits = s->vb;
    cfg.group_size = s->G;
    cfg.sink_tokens = s->S;
    cfg.residual_tokens = s->R;
    cfg.rotation = s->rot;
    cfg.salient_ratio = (float)s->salient_pct / 100.0f;
    cfg.key_axis = s->per_token_keys ? KVQ_KEYS_PER_TOKEN : KVQ_KEYS_PER_CHANNEL;
    cfg.range_search = s->search;
    cfg.key_block = s->key_block;
    cfg.value_param_bits = s->pbits;
    ap.n_q_heads = s->H * s->ratio;
    ap.n_queries = s->nq;
    ap.scale = 0.0f;
    nout = (size_t)s->nq * ap.n_q_heads * s->D;
    q = (float *)tu_alloc(nout * 4);
    ref = (float *)tu_alloc(nout * 4);
    out = (float *)tu_alloc(nout * 4);
    r.s = 0x51d0c0ffee123457ull ^ (uint64_t)(s->T * 131 + s->D * 7 + s->kb + s->G);
    tu_fill_kv(&r, s->kind, s->T, s->H, s->D, K, V);
    tu_fill_q(&r, s->kind, nout, s->D, q);
    base = build(&cfg, KVQ_ISA_SCALAR, K, V, s->T);
    CHECK(base != NULL, "scalar cache k%d v%d G%d D%d", s->kb, s->vb, s->G, s->D);
    if (!base) goto done;
    CHECK(kvq_cache_read(base, 0, s->T, Ka, Va) == KVQ_OK, "read");
    /* the integer scheme quantizes weights per call, so a split run is compared with the same split on
       scalar; under float arithmetic the split run also meets the whole one */
    CHECK(attend(base, KVQ_ISA_SCALAR, q, &ap, arith == KVQ_ARITH_INTEGER ? split : 0, ref), "scalar attention");
    for (i = 0; i < n_isas; i++) {
        kvq_isa isa = (kvq_isa)isas[i];
        double e;
        c = build(&cfg, isa, K, V, s->T);
        CHECK(c != NULL, "%s cache", kvq_isa_name(isa));
        if (!c) continue;
        CHECK(same_bytes(base, c), "%s: packed bytes differ (k%d v%d G%d D%d S%d R%d T%d search %d)",
              kvq_isa_name(isa), s->kb, s->vb, s->G, s->D, s->S, s->R, s->T, s->search);
        CHECK(kvq_cache_read(c, 0, s->T, Kb, Vb) == KVQ_OK && !memcmp(Ka, Kb, n * 4) && !memcmp(Va, Vb, n * 4),
              "%s: kvq_cache_read differs", kvq_isa_name(isa));
        CHECK(attend(base, isa, q, &ap, split, out), "%s attention", kvq_isa_name(isa));
        e = tu_nmse(out, ref, nout);
        if (e > worst_nmse) worst_nmse = e;
        CHECK(e <= NMSE_MAX, "%s: attention NMSE %.3g (k%d v%d G%d D%d H%d x%d nq%d S%d R%d T%d kind%d split%d)",
              kvq_isa_name(isa), e, s->kb, s->vb, s->G, s->D, s->H, s->ratio, s->nq, s->S, s->R, s->T, s->kind,
              split);
        kvq_cache_destroy(c);
    }
done:
    kvq_set_isa(KVQ_ISA_SCALAR);
    kvq_cache_destroy(base);
    free(K); free(V); free(Ka); free(Va); free(Kb); free(Vb); free(q); free(ref); free(out);
}

/* Byte identity on the edge cases of min/max and rounding: signed zeros (the scalar scan keeps
   the first of equal values), constant groups (s = 0), exact halves (ties to even), tiny and
   huge ranges (subnormal fp16 scales, 65504). */
static void test_edges(void) {
    static const float pool[] = {0.0f, -0.0f, 1.0f, -1.0f, 0.5f, 2.5f, 1e-7f, -3e-8f, 65504.0f, -65504.0f, 0.25f};
    int bits, G, kind, search;
    for (search = 0; search <= 4; search += 4)
    for (kind = 0; kind < 3; kind++)
        for (bits = 2; bits <= 8; bits = bits == 4 ? 8 : bits + 1)
            for (G = 16; G <= 64; G *= 4) {
                const int D = 48, H = 2, T = 3 * G + 129;
                size_t n = (size_t)T * H * D, i;
                float *K = (float *)tu_alloc(n * 4), *V = (float *)tu_alloc(n * 4);
                kvq_config cfg = kvq_default_config(D, H, T);
                kvq_cache *base, *c;
                tu_rng r;
                int k;
                r.s = 0x1234567ull + (uint64_t)(bits * 131 + G + kind * 7);
                for (i = 0; i < n; i++) {
                    uint64_t u = tu_next(&r);
                    if (kind == 0) { /* zeros of both signs among small values */
                        K[i] = pool[u % 5];
                        V[i] = pool[(u >> 8) % 5];
                    } else if (kind == 1) { /* constant runs: zero ranges */
                        K[i] = (i / (size_t)(D * H)) % 3 == 0 ? -0.0f : pool[(i % 7) % 5];
                        V[i] = (i / 16) % 2 ? 0.0f : -0.0f;
                    } else { /* everything in the pool, ties and extremes */
                        K[i] = pool[u % 11];
                        V[i] = pool[(u >> 16) % 11] * (float)((u >> 32) % 2) * ((u >> 40) % 2 ? 1.0f : -1.0f);
                    }
                }
                cfg.key_bits = cfg.value_bits = bits;
                cfg.group_size = G;
                cfg.key_block = 0;                          /* blocks of G: 16 and 64 */
                cfg.value_param_bits = G == 16 ? 32 : 16; /* both value headers */
                cfg.residual_tokens = 0;
                cfg.range_search = search;
                base = build(&cfg, KVQ_ISA_SCALAR, K, V, T);
                CHECK(base != NULL, "edge cache");
                for (k = 0; base && k < n_isas; k++) {
                    c = build(&cfg, (kvq_isa)isas[k], K, V, T);
                    CHECK(c && same_bytes(base, c), "%s: edge-case bytes differ (kind %d, %d-bit, G%d, search %d)",
                          kvq_isa_name((kvq_isa)isas[k]), kind, bits, G, search);
                    kvq_cache_destroy(c);
                }
                kvq_set_isa(KVQ_ISA_SCALAR);
                kvq_cache_destroy(base);
                free(K);
                free(V);
            }
}

/* KVQ_RUNTIME_DISPATCH: the first call picks the best ISA the CPU has, judged here by the
   compiler's own cpuid reader rather than kvq.h's. Must run before anything sets the ISA. */
static void test_runtime_pick(void) {
#if KVQ__RUNTIME && (defined(__x86_64__) || defined(__i386__))
    kvq_isa want = KVQ_ISA_SCALAR;
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) want = KVQ_ISA_AVX2;
    if (want == KVQ_ISA_AVX2 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
        __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512vl"))
        want = KVQ_ISA_AVX512;
    CHECK(kvq_get_isa() == want, "runtime dispatch picked %s, cpu has %s", kvq_isa_name(kvq_get_isa()),
          kvq_isa_name(want));
    printf("runtime dispatch picked %s\n", kvq_isa_name(kvq_get_isa()));
#endif
}

static void test_api(void) {
    int i, accepted = 0;
    CHECK(kvq_set_isa(KVQ_ISA_SCALAR) == KVQ_OK && kvq_get_isa() == KVQ_ISA_SCALAR, "scalar always there");
    CHECK(kvq_set_isa((kvq_isa)7) == KVQ_ERR_INVALID && kvq_get_isa() == KVQ_ISA_SCALAR, "bad isa: nothing changes");
    for (i = KVQ_ISA_AVX2; i <= KVQ_ISA_NEON; i++) {
        kvq_status st = kvq_set_isa((kvq_isa)i);
        CHECK(st == KVQ_OK || st == KVQ_ERR_UNSUPPORTED, "set_isa %d: %d", i, (int)st);
        if (st == KVQ_OK) {
            CHECK(kvq_get_isa() == (kvq_isa)i, "get_isa after set");
            isas[n_isas++] = i;
            accepted++;
        } else {
            CHECK(kvq_get_isa() != (kvq_isa)i, "unsupported isa not taken");
        }
        kvq_set_isa(KVQ_ISA_SCALAR);
    }
    CHECK(!strcmp(kvq_isa_name(KVQ_ISA_AVX512), "avx512") && !strcmp(kvq_isa_name(KVQ_ISA_NEON), "neon"), "names");
    CHECK(kvq_get_arith() == KVQ_ARITH_AUTO, "the default arithmetic is AUTO");
    CHECK(kvq_set_arith((kvq_arith)3) == KVQ_ERR_INVALID && kvq_set_arith((kvq_arith)-1) == KVQ_ERR_INVALID &&
              kvq_get_arith() == KVQ_ARITH_AUTO, "bad arithmetic: nothing changes");
    CHECK(kvq_set_arith(KVQ_ARITH_FLOAT) == KVQ_OK && !kvq_integer_kernels(), "FLOAT: no integer kernels");
    CHECK(kvq_set_arith(KVQ_ARITH_INTEGER) == KVQ_OK && kvq_integer_kernels(), "INTEGER: integer kernels");
    kvq_set_arith(KVQ_ARITH_AUTO);
    CHECK(!kvq_integer_kernels(), "AUTO on scalar: float kernels");
    for (i = 0; i < n_isas; i++) { /* AUTO: integer exactly where the ISA has native integer kernels */
        kvq_set_isa((kvq_isa)isas[i]);
        printf("AUTO on %s: %s kernels\n", kvq_isa_name((kvq_isa)isas[i]), kvq_integer_kernels() ? "integer" : "float");
        CHECK(kvq_integer_kernels() == (isas[i] != KVQ_ISA_NEON || KVQ__HAVE_NEON_INT), "AUTO on %s: integer",
              kvq_isa_name((kvq_isa)isas[i]));
    }
    kvq_set_isa(KVQ_ISA_SCALAR);
    printf("ISAs accepted here:");
    for (i = 0; i < n_isas; i++) printf(" %s", kvq_isa_name((kvq_isa)isas[i]));
    printf("%s\n", accepted ? "" : " (none besides scalar)");
}

static void test_grid(void) {
    static const int bits[][2] = {{2, 2}, {3, 3}, {4, 4}, {8, 8}, {16, 16}, {2, 16}, {16, 2}, {4, 2}, {3, 8}};
    static const int groups[] = {16, 32, 64, 128};
    static const int dims[] = {8, 16, 24, 64, 80, 96, 112, 128, 256};
    int b, g, d, k = 0;
    for (b = 0; b < (int)(sizeof bits / sizeof bits[0]); b++)
        for (g = 0; g < 4; g++) {
            shape s = {0};
            s.kb = bits[b][0]; s.vb = bits[b][1]; s.G = groups[g];
            s.D = dims[(b * 4 + g) % 9]; s.H = 1 + (b + g) % 3; s.ratio = 1 + (b * 4 + g) % 8;
            s.nq = 1 + (b + g) % 3; s.S = (b + g) % 2 ? 5 : 0; s.R = (b + 2 * g) % 3 ? 128 : 0;
            s.T = 3 * s.G + 37 + 11 * b; s.kind = (b + g) % 2; s.rot = 0;
            if (s.R) s.T += 150;
            check_shape(&s, (k++ % 3) == 2);
        }
    for (d = 0; d < 9; d++) { /* every head_dim with the default 2-bit config, split and whole */
        shape s = {0};
        s.kb = 2; s.vb = 2; s.G = 32; s.D = dims[d]; s.H = 2; s.ratio = 1 + d % 8; s.nq = 2; s.S = 3;
        s.R = d % 2 ? 0 : 128; s.T = 421 + d; s.kind = d % 2; s.rot = 0;
        check_shape(&s, 0);
        check_shape(&s, 1);
    }
    for (d = 1; d <= 16; d++) { /* GQA 1..8 at 4 and 16 bits (16 bits: the 128-channel value path) */
        shape s = {0};
        s.kb = d > 8 ? 4 : 16; s.vb = d > 8 ? 4 : 16; s.G = 32; s.D = d % 2 ? 128 : 256; s.H = 2;
        s.ratio = 1 + (d - 1) % 8; s.nq = 1 + d % 2; s.S = 0; s.R = 128; s.T = 700 + d; s.kind = TU_STRUCTURED;
        s.rot = 0;
        check_shape(&s, 0);
    }
    for (d = 0; d < 3; d++) { /* head_dim 512: the largest stack buffers */
        static const int g5[] = {16, 128, 64}, b5[] = {2, 16, 3};
        shape s = {0};
        s.kb = b5[d]; s.vb = b5[(d + 1) % 3]; s.G = g5[d]; s.D = 512; s.H = 1; s.ratio = 8 - d; s.nq = 2;
        s.S = 2; s.R = d == 1 ? 0 : 128; s.T = 300 + 97 * d; s.kind = d % 2; s.rot = 0;
        check_shape(&s, d == 2);
    }
    {
        shape s = {0}; /* rotation on top */
        s.kb = 2; s.vb = 2; s.G = 32; s.D = 96; s.H = 2; s.ratio = 4; s.nq = 2; s.S = 4; s.R = 128; s.T = 555;
        s.kind = TU_STRUCTURED; s.rot = KVQ_ROTATE_HADAMARD;
        {
            kvq_config cfg = kvq_default_config(96, 2, 600);
            cfg.rotation = KVQ_ROTATE_HADAMARD;
            if (kvq_config_check(&cfg) == KVQ_OK) check_shape(&s, 0);
        }
    }
    for (d = 0; d < 4; d++) { /* salient tokens (side store, patch-up pass), rotation on and off */
        shape s = {0};
        s.kb = d == 3 ? 3 : 2; s.vb = d == 2 ? 4 : 2; s.G = d == 1 ? 64 : 32; s.D = d == 2 ? 80 : 64; s.H = 2;
        s.ratio = 4; s.nq = 1 + d % 2; s.S = d % 2 ? 4 : 0; s.R = d == 3 ? 0 : 64; s.T = 400 + 31 * d;
        s.kind = TU_STRUCTURED; s.rot = d % 2 ? KVQ_ROTATE_HADAMARD : KVQ_ROTATE_NONE;
        s.salient_pct = d % 2 ? 5 : 10;
        check_shape(&s, 0);
        check_shape(&s, 1);
    }
    for (d = 0; d < 4; d++) { /* keys per token (key_axis), with and without rotation */
        shape s = {0};
        s.kb = d == 2 ? 16 : 2 + d % 2; s.vb = 2; s.G = d == 1 ? 64 : 32; s.D = d == 3 ? 80 : 128; s.H = 2;
        s.ratio = 4; s.nq = 1 + d % 2; s.S = 4; s.R = d == 3 ? 0 : 128; s.T = 500 + 17 * d;
        s.kind = TU_STRUCTURED; s.rot = d % 2 ? KVQ_ROTATE_HADAMARD : KVQ_ROTATE_NONE; s.per_token_keys = 1;
        check_shape(&s, 0);
        check_shape(&s, 1);
    }
    for (d = 0; d < 8; d++) { /* the range search: every shape of group, salient, per-token keys, rotation */
        static const int dims8[] = {8, 40, 72, 128, 16, 96, 64, 128}, g8[] = {16, 32, 16, 32, 128, 64, 32, 32};
        shape s = {0};
        s.kb = d % 3 == 1 ? 3 : 2; s.vb = d % 3 == 2 ? 3 : 2; s.G = g8[d]; s.D = dims8[d]; s.H = 2;
        s.ratio = 1 + d % 4; s.nq = 1 + d % 2; s.S = d % 2 ? 4 : 0; s.R = d == 4 ? 0 : 128; s.T = 3 * s.G + 200 + d;
        s.kind = d % 2; s.rot = d == 6 ? KVQ_ROTATE_HADAMARD : KVQ_ROTATE_NONE;
        s.salient_pct = d == 5 ? 10 : 0; s.per_token_keys = d == 7; s.search = 2 + d % 7;
        check_shape(&s, d % 2);
    }
    for (d = 0; d < 8; d++) { /* key blocks of another size than value groups; 16-bit value params */
        static const int kb8[] = {64, 16, 128, 64, 32, 64, 16, 128}, g8[] = {32, 64, 16, 32, 128, 16, 32, 64};
        shape s = {0};
        s.kb = d % 4 == 1 ? 2 : 3; s.vb = d % 4 == 2 ? 3 : 2; s.G = g8[d]; s.D = d % 2 ? 128 : 96; s.H = 2;
        s.ratio = 1 + d % 4; s.nq = 1 + d % 2; s.S = d % 2 ? 4 : 0; s.R = d == 4 ? 0 : 128; s.T = 3 * kb8[d] + 200 + d;
        s.kind = d % 2; s.rot = d == 6 ? KVQ_ROTATE_HADAMARD : KVQ_ROTATE_NONE; s.salient_pct = d == 5 ? 10 : 0;
        s.search = d == 3 ? 0 : 4; s.key_block = kb8[d]; s.pbits = d == 7 ? 32 : 16;
        if (d == 4) s.vb = 4, s.pbits = 32; /* 16-bit params: 2- and 3-bit values only */
        check_shape(&s, d % 2);
    }
    for (d = 0; d < 2; d++) { /* key blocks x value groups past the params scratch: 128 x 16 at head_dim 256 */
        shape s = {0};
        s.kb = 2; s.vb = d ? 8 : 2; s.G = 16; s.D = 256; s.H = 1; s.ratio = 2; s.nq = 1; s.S = 4; s.R = 128;
        s.T = 700; s.kind = TU_STRUCTURED; s.rot = KVQ_ROTATE_NONE; s.salient_pct = d ? 60 : 0; s.search = 4;
        s.key_block = 128; s.pbits = d ? 32 : 16;
        check_shape(&s, d);
    }
    printf("grid: worst attention NMSE vs scalar %.3g\n", worst_nmse);
}

/* The rotation's butterflies on every path: the same sums, so the same bits as scalar. */
static void test_rotation_paths(void) {
    int n, i, bad = 0;
    tu_rng r = {0x707};
    for (n = 8; n <= 512; n += 8) {
        float x[512], ref[512], y[512];
        int k;
        for (k = 0; k < n; k++) x[k] = tu_normal(&r);
        memcpy(ref, x, sizeof x);
        kvq_set_isa(KVQ_ISA_SCALAR);
        kvq_hadamard(ref, n, 3u);
        for (i = 0; i < n_isas; i++) {
            memcpy(y, x, sizeof x);
            kvq_set_isa((kvq_isa)isas[i]);
            kvq_hadamard(y, n, 3u);
            if (memcmp(y, ref, (size_t)n * sizeof(float)) != 0) bad++;
            kvq_hadamard_inverse(y, n, 3u);
            for (k = 0; k < n; k++)
                if (fabsf(y[k] - x[k]) > 1e-5f) { bad++; break; }
        }
    }
    kvq_set_isa(KVQ_ISA_SCALAR);
    CHECK(bad == 0, "%d head_dims where a path's rotation differs from scalar", bad);
}

/* 64K tokens: zero-mean values (outputs near zero) and values with non-zero channel means. */
static void test_long(void) {
    int kind, bits;
    for (kind = 0; kind < 2; kind++)
        for (bits = 2; bits <= 16; bits *= 8) {
            shape s = {0};
            double before = worst_nmse;
            worst_nmse = 0.0;
            s.kb = bits; s.vb = bits; s.G = 32; s.D = LONG_D; s.H = 1; s.ratio = 4; s.nq = 1; s.S = 4;
            s.R = 128; s.T = LONG_T + 13; s.kind = kind; s.rot = 0;
#ifdef __aarch64__
            if (bits == 16 && kind == 1) continue;
#endif
            check_shape(&s, kind == 1);
            printf("64K tokens, %d-bit, %s values: worst NMSE vs scalar %.3g\n", bits,
                   kind ? "non-zero-mean" : "zero-mean", worst_nmse);
            worst_nmse = worst_nmse > before ? worst_nmse : before;
        }
}

/* A dump layer in append's layout: K, V [T][H][D] and the last nq tokens' queries [nq][QH][D]
   (allocated here); 0 when the dump lacks Kpost, V or Qpost. */
static int dump_layer(const kvqd_dump *d, int layer, int nq, float **K, float **V, float **q) {
    const int T = d->n_tokens, H = d->n_kv_heads, D = d->head_dim, QH = d->n_heads;
    const float *Kd = kvqd_dump_tensor(d, layer, KVQD_KPOST), *Vd = kvqd_dump_tensor(d, layer, KVQD_V);
    const float *Qd = kvqd_dump_tensor(d, layer, KVQD_QPOST);
    int t, h;
    if (!Kd || !Vd || !Qd) return 0;
    *K = (float *)tu_alloc((size_t)T * H * D * 4);
    *V = (float *)tu_alloc((size_t)T * H * D * 4);
    *q = (float *)tu_alloc((size_t)nq * QH * D * 4);
    for (t = 0; t < T; t++)
        for (h = 0; h < H; h++) {
            memcpy(*K + ((size_t)t * H + h) * D, Kd + ((size_t)h * T + t) * D, (size_t)D * 4);
            memcpy(*V + ((size_t)t * H + h) * D, Vd + ((size_t)h * T + t) * D, (size_t)D * 4);
        }
    for (t = 0; t < nq; t++)
        for (h = 0; h < QH; h++)
            memcpy(*q + ((size_t)t * QH + h) * D, Qd + ((size_t)h * T + (T - nq + t)) * D, (size_t)D * 4);
    return 1;
}

/* Real keys, values and queries: every layer of the KV dumps, the last 4 tokens as queries. */
static void test_real(void) {
    static const char *files[] = {"stories260K_gen.kvd", "babyllama105_gen.kvd"};
    const char *dir = getenv("KVQ_SHARED_DATA");
    char path[1024], err[256];
    int f;
    if (!dir) dir = "../shared/data";
    snprintf(path, sizeof path, "%s/%s", dir, files[0]);
    {
        FILE *fp = fopen(path, "rb");
        if (!fp) { printf("skipped: ../shared/data not found\n"); return; }
        fclose(fp);
    }
    for (f = 0; f < 2; f++) {
        kvqd_dump d;
        int layer, bi;
        static const int bits[] = {2, 4, 16};
        snprintf(path, sizeof path, "%s/%s", dir, files[f]);
        if (kvqd_dump_load(&d, path, err, sizeof err) != KVQD_OK) {
            CHECK(0, "load %s: %s", path, err);
            continue;
        }
        for (layer = 0; layer < d.n_layers; layer++)
            for (bi = 0; bi < 3; bi++) {
                const int T = d.n_tokens, H = d.n_kv_heads, D = d.head_dim, QH = d.n_heads, nq = 4;
                float *K, *V, *q, *ref, *out;
                kvq_config cfg = kvq_default_config(D, H, T);
                kvq_attn_params ap;
                kvq_cache *base, *c;
                int i;
                if (!dump_layer(&d, layer, nq, &K, &V, &q)) { CHECK(0, "%s lacks Kpost/V/Qpost", files[f]); break; }
                cfg.key_bits = cfg.value_bits = bits[bi];
                cfg.group_size = 16;
                cfg.key_block = 0; /* = G */
                ref = (float *)tu_alloc((size_t)nq * QH * D * 4);
                out = (float *)tu_alloc((size_t)nq * QH * D * 4);
                ap.n_q_heads = QH;
                ap.n_queries = nq;
                ap.scale = 0.0f;
                base = build(&cfg, KVQ_ISA_SCALAR, K, V, T);
                CHECK(base && attend(base, KVQ_ISA_SCALAR, q, &ap, 0, ref), "%s scalar", files[f]);
                for (i = 0; base && i < n_isas; i++) {
                    double e;
                    c = build(&cfg, (kvq_isa)isas[i], K, V, T);
                    CHECK(c && same_bytes(base, c), "%s layer %d %d-bit: %s bytes differ", files[f], layer, bits[bi],
                          kvq_isa_name((kvq_isa)isas[i]));
                    kvq_cache_destroy(c);
                    CHECK(attend(base, (kvq_isa)isas[i], q, &ap, 0, out), "attention");
                    e = tu_nmse(out, ref, (size_t)nq * QH * D);
                    if (e > worst_nmse) worst_nmse = e;
                    CHECK(e <= NMSE_MAX, "%s layer %d %d-bit: %s NMSE %.3g", files[f], layer, bits[bi],
                          kvq_isa_name((kvq_isa)isas[i]), e);
                }
                kvq_set_isa(KVQ_ISA_SCALAR);
                kvq_cache_destroy(base);
                free(K); free(V); free(q); free(ref); free(out);
            }
        printf("%s: %d layers x bits 2/4/16 checked\n", files[f], d.n_layers);
        kvqd_dump_free(&d);
    }
    printf("real data: worst NMSE vs scalar %.3g\n", worst_nmse);
}

/* 16-bit value params decode to the same floats on every path (every ng from 1 to 20, ragged n). */
static void test_params16(void) {
    tu_rng r = {0x1616};
    int ng, n, i, k, bad = 0;
    for (ng = 1; ng <= 20; ng++)
        for (n = 1; n <= 40; n += 3) {
            uint16_t p[40 * 20];
            float ref[2 * 40 * 20], out[2 * 40 * 20];
            for (k = 0; k < n * ng; k++) p[k] = (uint16_t)(tu_next(&r) % 0xf8 | (tu_next(&r) & 0xff) << 8);
            kvq_set_isa(KVQ_ISA_SCALAR);
            kvq__dispatch_params16(p, n, ng, ref);
            for (i = 0; i < n_isas; i++) {
                kvq_set_isa((kvq_isa)isas[i]);
                kvq__dispatch_params16(p, n, ng, out);
                if (memcmp(out, ref, (size_t)n * 2 * ng * sizeof(float))) bad++;
            }
        }
    kvq_set_isa(KVQ_ISA_SCALAR);
    CHECK(bad == 0, "%d 16-bit param decodes differ from scalar", bad);
}

/* The per-token record dot kernel (salient side store, keys stored per token) on every ISA
   against a double sum: bits 2/3/4/8, every G, D from 8 to 512 (D % 16 == 8 too), 1 to 8 heads,
   records at a stride past their bytes. Within 1e-5 of sum_c |q_c x_c|. */
static void test_dot_codes(void) {
    static const int bits[4] = {2, 3, 4, 8}, Gs[4] = {16, 32, 64, 128}, Ds[6] = {8, 24, 120, 128, 136, 512};
    tu_rng r = {0xd07};
    int bi, gi, di, nh, i, bad = 0, runs = 0;
    for (bi = 0; bi < 4; bi++)
        for (gi = 0; gi < 4; gi++)
            for (di = 0; di < 6; di++)
                for (nh = 1; nh <= KVQ__HEAD_CHUNK; nh += 3) {
                    const int D = Ds[di], G = Gs[gi], ng = (D + G - 1) / G, n = 1 + (bi + di + nh) % 9;
                    const size_t stride = kvq__row_bytes(kvq__fmt(bits[bi]), (size_t)D) + 5;
                    uint8_t codes[9 * (512 + 5)];
                    float par[9 * 2 * 32], q[KVQ__HEAD_CHUNK * 512], s[KVQ__HEAD_CHUNK * KVQ__TILE];
                    int t, j, c;
                    for (i = 0; i < (int)sizeof codes; i++) codes[i] = (uint8_t)tu_next(&r);
                    for (i = 0; i < n * 2 * ng; i++) par[i] = tu_normal(&r);
                    for (i = 0; i < nh * D; i++) q[i] = tu_normal(&r);
                    for (i = 0; i < n_isas + 1; i++) {
                        kvq_set_isa(i ? (kvq_isa)isas[i - 1] : KVQ_ISA_SCALAR);
                        kvq__k_dot_codes(codes, stride, par, n, D, G, bits[bi], q, nh, s);
                        for (j = 0; j < nh; j++)
                            for (t = 0; t < n; t++) {
                                double want = 0.0, mag = 0.0;
                                for (c = 0; c < D; c++) {
                                    const float *pt = par + (size_t)t * 2 * ng;
                                    const double x = (double)pt[c / G] * kvq__get_code(codes + stride * t, D, c, bits[bi]) +
                                                     pt[ng + c / G];
                                    want += (double)q[j * D + c] * x;
                                    mag += fabs((double)q[j * D + c] * x);
                                }
                                bad += fabs(s[j * KVQ__TILE + t] - want) > 1e-5 * mag + 1e-30;
                            }
                        runs++;
                    }
                }
    kvq_set_isa(KVQ_ISA_SCALAR);
    CHECK(bad == 0, "%d record dot products off (of %d kernel runs)", bad, runs);
}

/* The fp16-range check of appended rows on every ISA: one bad value (past 65504, inf, NaN, of
   either sign) at every position of rows of many lengths (the vector body and the tail), and
   the largest good value everywhere. */
static void test_fits_fp16(void) {
    static const float bad[] = {65520.0f, -65536.0f, INFINITY, -INFINITY, NAN, 1e30f};
    float x[75];
    int n, at, b, i, wrong = 0, runs = 0;
    for (n = 1; n <= 75; n += 2)
        for (i = 0; i < n_isas; i++) {
            int k;
            kvq_set_isa((kvq_isa)isas[i]);
            for (k = 0; k < n; k++) x[k] = k % 2 ? 65504.0f : -65504.0f;
            wrong += kvq__dispatch_fits_fp16(x, (size_t)n) != 1;
            for (at = 0; at < n; at++)
                for (b = 0; b < 6; b++) {
                    const float keep = x[at];
                    x[at] = b == 1 ? nextafterf(65504.0f, INFINITY) : bad[b];
                    wrong += kvq__dispatch_fits_fp16(x, (size_t)n) != 0;
                    x[at] = keep;
                    runs++;
                }
        }
    kvq_set_isa(KVQ_ISA_SCALAR);
    CHECK(runs > 0 && wrong == 0, "%d of %d fp16-range checks wrong", wrong, runs);
}

/* The range search of a row's groups (kvq__search_row) and of a key block's channels
   (kvq__search_columns) gives the scalar's params on every ISA:
   rows of many scales and shapes (tiny, huge, one-signed, constant, ranges far from zero, a lone
   outlier, a tiny min beside a large max), every bit width it serves, both value headers, grids
   2-8, groups that do not divide the row. */
static void test_search_row(void) {
    static const float scales[] = {1.0f, 1e-6f, 3e4f, 1e-20f, 0.01f};
    tu_rng r = {0x5ea4c};
    int trial, i, bad = 0, runs = 0;
    for (trial = 0; trial < 3000; trial++) {
        const int G = 16 << (trial % 3), D = 8 * (1 + (int)(tu_next(&r) % 40)), ng = (D + G - 1) / G;
        const int bits = 2 + trial % 3, pbits = bits <= 3 && trial % 2 ? 16 : 32, grid = 2 + (int)(tu_next(&r) % 7);
        const float sc = scales[trial % 5], shift = trial % 7 == 3 ? 5.0f * sc : 0.0f;
        float x[512], lo[64], hi[64];
        kvq__qparams ref[64], got[64];
        int g, shape = (int)(tu_next(&r) % 6);
        for (i = 0; i < D; i++) {
            float v = tu_normal(&r) * sc + shift;
            if (shape == 1) v = fabsf(v);                               /* one-signed */
            if (shape == 2 && i % 5) v = 0.25f * sc;                    /* mostly constant */
            if (shape == 3 && i % 11 == 0) v *= 60.0f;                  /* outliers */
            if (shape == 4) v = (float)(int)(v * 4.0f / sc) * 0.25f * sc; /* ties on a grid */
            if (shape == 5 && i % 9 == 0) v = -1e-15f;                  /* a tiny min beside a large max */
            x[i] = v;
        }
        if (trial % 50 == 0) for (i = 0; i < D; i++) x[i] = -0.0f;
        for (g = 0; g < ng; g++) kvq__group_range(x + g * G, D - g * G < G ? D - g * G : G, 1, &lo[g], &hi[g]);
        kvq_set_isa(KVQ_ISA_SCALAR);
        kvq__dispatch_search_row(x, D, G, bits, pbits, grid, lo, hi, ref);
        for (i = 0; i < n_isas; i++) {
            kvq_set_isa((kvq_isa)isas[i]);
            kvq__dispatch_search_row(x, D, G, bits, pbits, grid, lo, hi, got);
            for (g = 0; g < ng; g++) bad += ref[g].scale != got[g].scale || ref[g].min != got[g].min;
            runs++;
        }
    }
    kvq_set_isa(KVQ_ISA_SCALAR);
    CHECK(runs > 0 && bad == 0, "%d searched groups differ from scalar (%d rows x ISAs)", bad, runs);
    /* the key-block search: KVQ__COLS channels of G tokens, tokens weighted 0-31 (0: left out) */
    for (trial = 0, bad = 0, runs = 0; trial < 600; trial++) {
        const int G = 16 << (trial % 4), bits = 2 + trial % 2, grid = 2 + (int)(tu_next(&r) % 7);
        const float sc = scales[trial % 5];
        float xb[128 * KVQ__COLS], lo[KVQ__COLS], hi[KVQ__COLS];
        uint8_t w[128];
        kvq__qparams ref[KVQ__COLS], got[KVQ__COLS];
        int t, c;
        for (t = 0; t < G; t++) w[t] = trial % 3 ? (uint8_t)(tu_next(&r) % 32) : 1;
        w[0] = w[0] ? w[0] : 1;
        for (i = 0; i < G * KVQ__COLS; i++) {
            float v = tu_normal(&r) * sc + (i % KVQ__COLS == 7 ? 9.0f * sc : 0.0f);
            if (i % KVQ__COLS == 3) v = fabsf(v);
            if (i % KVQ__COLS == 5 && i % 3) v = 0.5f * sc;
            if (i % KVQ__COLS == 9 && i % 13 == 0) v = -1e-15f;
            xb[i] = v;
        }
        for (c = 0; c < KVQ__COLS; c++) {
            lo[c] = INFINITY;
            hi[c] = -INFINITY;
            for (t = 0; t < G; t++)
                if (w[t]) {
                    lo[c] = xb[t * KVQ__COLS + c] < lo[c] ? xb[t * KVQ__COLS + c] : lo[c];
                    hi[c] = xb[t * KVQ__COLS + c] > hi[c] ? xb[t * KVQ__COLS + c] : hi[c];
                }
        }
        kvq_set_isa(KVQ_ISA_SCALAR);
        kvq__dispatch_search_columns(xb, G, w, bits, grid, lo, hi, ref);
        for (i = 0; i < n_isas; i++) {
            kvq_set_isa((kvq_isa)isas[i]);
            kvq__dispatch_search_columns(xb, G, w, bits, grid, lo, hi, got);
            for (c = 0; c < KVQ__COLS; c++) bad += ref[c].scale != got[c].scale || ref[c].min != got[c].min;
            runs++;
        }
    }
    kvq_set_isa(KVQ_ISA_SCALAR);
    CHECK(runs > 0 && bad == 0, "%d searched key channels differ from scalar (%d blocks x ISAs)", bad, runs);
}

/* The integer scheme's bytes of a query: q16 = 256 hi + lo rebuilt, |q16| <= 32639, and within
   half a unit of qs / unit, for random and extreme rows. */
static void test_query_bytes(void) {
    tu_rng r = {0x9b};
    int trial, c, bad = 0;
    for (trial = 0; trial < 200; trial++) {
        float qs[512];
        int8_t hi[512], lo[512];
        const int D = 8 * (1 + trial % 64);
        float unit;
        for (c = 0; c < D; c++) qs[c] = tu_normal(&r) * (trial % 3 == 0 ? 1e-30f : trial % 3 == 1 ? 1.0f : 1e30f);
        if (trial == 7) for (c = 0; c < D; c++) qs[c] = 0.0f;
        if (trial == 8) qs[3] = -qs[3] * 1e6f; /* one dominant channel, negative */
        unit = kvq__query_q16(qs, D, hi, lo);
        for (c = 0; c < D; c++) {
            const int q16 = 256 * hi[c] + lo[c];
            if (q16 > 32639 || q16 < -32639) bad++;
            if (unit > 0.0f && fabs((double)q16 - (double)qs[c] / unit) > 0.5 + 1e-3 * fabs((double)q16)) bad++;
            if (unit == 0.0f && q16 != 0) bad++;
        }
    }
    CHECK(bad == 0, "%d query bytes out of contract", bad);
}

/* The integer scheme against the float kernels on the same cache: squared relative error <= 1e-4
   (the contract), on scalar (the reference) and the best ISA (the one AUTO picks). */
#define INT_CONTRACT 1e-4
static double worst_contract;
static void check_contract(kvq_cache *c, const float *q, const kvq_attn_params *ap, const char *what) {
    const size_t nout = (size_t)ap->n_queries * ap->n_q_heads * c->cfg.head_dim;
    float *f = (float *)tu_alloc(nout * 4), *g = (float *)tu_alloc(nout * 4);
    const kvq_isa two[2] = {KVQ_ISA_SCALAR, n_isas ? (kvq_isa)isas[n_isas - 1] : KVQ_ISA_SCALAR};
    int i;
    for (i = 0; i < (n_isas ? 2 : 1); i++) {
        double e;
        kvq_set_isa(two[i]);
        kvq_set_arith(KVQ_ARITH_FLOAT);
        CHECK(kvq_attention(c, q, f, ap) == KVQ_OK, "float attention");
        kvq_set_arith(KVQ_ARITH_INTEGER);
        CHECK(kvq_attention(c, q, g, ap) == KVQ_OK, "integer attention");
        e = tu_nmse(g, f, nout);
        if (e > worst_contract) worst_contract = e;
        CHECK(e <= INT_CONTRACT, "%s on %s: integer vs float %.3g", what, kvq_isa_name(two[i]), e);
    }
    kvq_set_isa(KVQ_ISA_SCALAR);
    kvq_set_arith(KVQ_ARITH_AUTO);
    free(f);
    free(g);
}

/* 64K tokens (as test_long), the formats the integer scheme covers: 2-, 3- and 4-bit keys and values,
   K3/V2 in key blocks of 64 with 16-bit value params (kvq_eval's k3v2b64p16), zero-mean values and
   values with channel means. */
static void test_integer_long(void) {
    static const int cfgs[][4] = {{2, 2, 0, 32}, {3, 2, 64, 16}, {4, 4, 0, 32}, {3, 3, 0, 32}}; /* kb, vb, key block, pbits */
    int kind, ci;
    for (ci = 0; ci < 4; ci++)
        for (kind = 0; kind < 2; kind++) {
            const int T = LONG_T + 13, H = 1, QH = 4, D = LONG_D;
            const size_t n = (size_t)T * H * D, nout = (size_t)QH * D;
            float *K = (float *)tu_alloc(n * 4), *V = (float *)tu_alloc(n * 4), *q = (float *)tu_alloc(nout * 4);
            kvq_config cfg = kvq_default_config(D, H, T);
            kvq_attn_params ap = {QH, 1, 0.0f};
            kvq_cache *c = NULL;
            char what[96];
            tu_rng r = {0xc0de + (uint64_t)(ci * 2 + kind)};
#ifdef __aarch64__
            if (ci > 1) { free(K); free(V); free(q); continue; } /* qemu: K2V2 and K3V2 (the default) */
#endif
            cfg.key_bits = cfgs[ci][0];
            cfg.value_bits = cfgs[ci][1];
            cfg.key_block = cfgs[ci][2];
            cfg.value_param_bits = cfgs[ci][3];
            tu_fill_kv(&r, kind, T, H, D, K, V);
            tu_fill_q(&r, kind, nout, D, q);
            CHECK(kvq_cache_create(&c, &cfg) == KVQ_OK && kvq_cache_append(c, K, V, T) == KVQ_OK, "64K cache");
            snprintf(what, sizeof what, "64K k%d v%d b%d p%d %s", cfgs[ci][0], cfgs[ci][1], cfgs[ci][2], cfgs[ci][3],
                     kind ? "channel means" : "zero-mean");
            if (c) check_contract(c, q, &ap, what);
            kvq_cache_destroy(c);
            free(K); free(V); free(q);
        }
    printf("64K tokens: worst integer-vs-float squared relative error %.3g\n", worst_contract);
}

/* Every layer of the three dumps (MiniLM too), the last 4 tokens as queries, the default config
   and K3/V2. */
static void test_integer_real(void) {
    static const char *files[] = {"stories260K_gen.kvd", "babyllama105_gen.kvd", "minilm_gpl3.kvd"};
    const char *dir = getenv("KVQ_SHARED_DATA");
    double before = worst_contract;
    char path[1024], err[256];
    int f, checked = 0;
    if (!dir) dir = "../shared/data";
    worst_contract = 0.0;
    for (f = 0; f < 3; f++) {
        kvqd_dump d;
        int layer, ci;
        snprintf(path, sizeof path, "%s/%s", dir, files[f]);
        if (kvqd_dump_load(&d, path, err, sizeof err) != KVQD_OK) {
            printf("integer contract: %s skipped (%s)\n", files[f], err);
            continue;
        }
        for (layer = 0; layer < d.n_layers; layer++)
            for (ci = 0; ci < 2; ci++) {
                const int T = d.n_tokens, H = d.n_kv_heads, D = d.head_dim, QH = d.n_heads, nq = 4;
                kvq_config cfg = kvq_default_config(D, H, T);
                kvq_attn_params ap = {QH, nq, 0.0f};
                kvq_cache *c = NULL;
                float *K, *V, *q;
                char what[96];
                if (!dump_layer(&d, layer, nq, &K, &V, &q)) { CHECK(0, "%s lacks Kpost/V/Qpost", files[f]); break; }
                if (!ci) { cfg.key_bits = 2; cfg.key_block = 0; cfg.value_param_bits = 32; } /* KIVI-2's shape */
                CHECK(kvq_cache_create(&c, &cfg) == KVQ_OK && kvq_cache_append(c, K, V, T) == KVQ_OK, "%s", files[f]);
                snprintf(what, sizeof what, "%s layer %d %s", files[f], layer, ci ? "default (k3v2b64p16)" : "k2v2");
                if (c) check_contract(c, q, &ap, what);
                kvq_cache_destroy(c);
                free(K); free(V); free(q);
                checked++;
            }
        kvqd_dump_free(&d);
    }
    printf("real data: %d layer x config pairs, worst integer-vs-float squared relative error %.3g\n", checked,
           worst_contract);
    worst_contract = worst_contract > before ? worst_contract : before;
}

int main(void) {
    test_runtime_pick();
    test_api();
    test_edges();
    test_query_bytes();
    test_params16();
    test_dot_codes();
    test_search_row();
    test_fits_fp16();
    for (arith = KVQ_ARITH_FLOAT; arith <= KVQ_ARITH_INTEGER; arith = (kvq_arith)(arith + 1)) {
        printf("-- ISA paths against scalar, %s arithmetic --\n", arith == KVQ_ARITH_FLOAT ? "float" : "integer");
        worst_nmse = 0.0;
        test_grid();
        test_long();
        test_real();
    }
    kvq_set_arith(KVQ_ARITH_AUTO);
    test_rotation_paths();
    test_integer_long();
    test_integer_real();
    return tu_finish("test_simd");
}
