/* Tests of kvq's core: formats, quantization, the cache and fused attention.
   White-box where it must be (golden bytes), through the public API elsewhere.
   `build/test_core --report` also prints the accuracy table quoted in README.md. */
#define KVQ_IMPLEMENTATION
#include "../kvq.h"
#include "test_util.h"

#define EPS16 4.9e-4 /* just above 2^-11, fp16's relative rounding */

/* ---- fp16 ---------------------------------------------------------------- */

static void test_fp16(void) {
    uint32_t h;
    int bad = 0;
    /* every half survives half -> float -> half */
    for (h = 0; h < 65536; h++) {
        float f = kvq__f16_to_f32((uint16_t)h);
        if (f != f) continue; /* NaN */
        if (kvq__f32_to_f16(f) != h) bad++;
    }
    CHECK(bad == 0, "%d halves did not round-trip", bad);
    /* ties go to even; overflow to inf; subnormals */
    CHECK(kvq__f32_to_f16(1.0f + 1.0f / 2048.0f) == 0x3c00, "tie below 1+2^-10 must round to even (1.0)");
    CHECK(kvq__f32_to_f16(1.0f + 3.0f / 2048.0f) == 0x3c02, "tie must round to even (1+2^-9)");
    CHECK(kvq__f32_to_f16(65504.0f) == 0x7bff, "max half");
    CHECK(kvq__f32_to_f16(65520.0f) == 0x7c00, "65520 rounds to inf");
    CHECK(kvq__f32_to_f16(65519.0f) == 0x7bff, "65519 rounds to max");
    CHECK(kvq__f32_to_f16(5.9604645e-8f) == 0x0001, "smallest subnormal");
    CHECK(kvq__f32_to_f16(2.9802322e-8f) == 0x0000, "half of the smallest subnormal ties to 0");
    CHECK(kvq__f32_to_f16(-0.0f) == 0x8000, "negative zero");
    CHECK(kvq__f16_to_f32(0x3555) == 0.333251953125f, "0x3555");
    /* random floats against the exact definition: nearest half, ties to even */
    {
        tu_rng r = {12345};
        int i, wrong = 0;
        for (i = 0; i < 200000; i++) {
            float f = (tu_uniform(&r) - 0.5f) * powf(2.0f, (float)(int)(tu_uniform(&r) * 40.0f) - 24.0f);
            uint16_t a = kvq__f32_to_f16(f);
            double x = f, lo = kvq__f16_to_f32(a), nb;
            uint16_t other = (uint16_t)(fabs(x) > fabs(lo) ? a + 1 : a - 1);
            if ((a & 0x7fff) == 0) other = (uint16_t)((a & 0x8000) | 1);
            nb = kvq__f16_to_f32(other);
            if (fabs(x - lo) > fabs(x - nb) || (fabs(x - lo) == fabs(x - nb) && (a & 1))) wrong++;
        }
        CHECK(wrong == 0, "%d random floats not rounded to nearest even", wrong);
    }
}

/* ---- storage rules, replicated from kvq.h's Cache section to derive error bounds */

typedef struct rules { int after, nkb, nvq, nkq; } rules; /* nkq: keys quantized past the sinks */

static int key_block(const kvq_config *cfg) { return cfg->key_block ? cfg->key_block : cfg->group_size; }

static rules storage_rules(const kvq_config *cfg, int T) {
    const int KB = key_block(cfg);
    rules s;
    s.after = T > cfg->sink_tokens ? T - cfg->sink_tokens : 0;
    s.nkb = 0;
    while (s.after - s.nkb * KB > cfg->residual_tokens && s.after - s.nkb * KB >= KB) s.nkb++;
    s.nvq = s.after > cfg->residual_tokens ? s.after - cfg->residual_tokens : 0;
    s.nkq = s.nkb * KB;
    if (cfg->key_axis == KVQ_KEYS_PER_TOKEN) { /* keys leave with their values, one at a time */
        s.nkb = 0;
        s.nkq = s.nvq;
    }
    return s;
}

static float to_f16(float x) { return kvq__f16_to_f32(kvq__f32_to_f16(x)); }

/* Bound on |x' - x| for an element quantized in a group with range [lo, hi]
   (of fp16-rounded inputs): half a step, plus fp16 rounding of scale and min. */
static double step_bound(double lo, double hi, int bits, double x) {
    double s = (hi - lo) / ((1 << bits) - 1);
    return 0.5 * s * (1.0 + EPS16) + EPS16 * (fabs(lo) + (hi - lo)) + EPS16 * fabs(x) + 1e-7;
}

/* The bound for element xv of a group of n inputs x[i * stride] (stored as fp16 first). With
   the range search (2 and 3 bits) the range may be clipped by up to 3/8 (2 bits) or 3/16
   (3 bits) of the min/max range on each side, and a finer step never hurts the bulk: so add
   the clip to the bound. */
static double group_bound(const float *x, size_t stride, int n, int bits, int search, double xv, int pbits) {
    /* search: 0 off, else the groups it covers: keys at 2 bits, values at 2 and 3 */
    double lo = 1e30, hi = -1e30, clip, s;
    int i;
    for (i = 0; i < n; i++) {
        double v = to_f16(x[(size_t)i * stride]);
        lo = v < lo ? v : lo;
        hi = v > hi ? v : hi;
    }
    clip = search > 1 && bits <= 3 ? 0.375 / (1 << (bits - 2)) * (hi - lo) * (1.0 + EPS16) : 0.0;
    if (pbits != 16) return step_bound(lo, hi, bits, xv) + clip;
    /* 16-bit params: the scale rounded up to 3 mantissa bits (1/8 at most past what is needed;
       a subnormal one up to 2x, and at least 2^-17), and raised until the min fits in [-8 s,
       127 s / 16]; the min within s / 32 of lo */
    s = (hi - lo) / ((1 << bits) - 1);
    s = s > -lo / 8 ? s : -lo / 8;
    s = s > lo * 16 / 127 ? s : lo * 16 / 127;
    s *= s < 1.0 / 16384 ? 2.0 : 1.125;
    s = s > 0 && s < 1.0 / 131072 ? 1.0 / 131072 : s; /* the smallest scale but 0 */
    return 0.5 * s + s / 32 + clip + EPS16 * fabs(xv) + 1e-7;
}

/* Per-element error bounds of everything the cache stores for T tokens of K, V. */
static void element_bounds(const kvq_config *cfg, int T, const float *K, const float *V, double *ek, double *ev) {
    const int H = cfg->n_kv_heads, D = cfg->head_dim, G = cfg->group_size, S = cfg->sink_tokens, KB = key_block(cfg);
    const int pv = cfg->value_param_bits == 16 && cfg->value_bits <= 3 ? 16 : 32;
    rules r = storage_rules(cfg, T);
    int t, h, c;
    for (t = 0; t < T; t++)
        for (h = 0; h < H; h++)
            for (c = 0; c < D; c++) {
                size_t at = ((size_t)t * H + h) * D + c;
                int pos = t - S;
                ek[at] = EPS16 * fabs(K[at]) + 1e-7;
                ev[at] = EPS16 * fabs(V[at]) + 1e-7;
                int c0 = c / G * G, c1 = c0 + G < D ? c0 + G : D; /* the token's channel group */
                const float *krow = K + ((size_t)t * H + h) * D, *vrow = V + ((size_t)t * H + h) * D;
                if (t >= S && pos < r.nkq && cfg->key_bits < 16 && cfg->key_axis == KVQ_KEYS_PER_TOKEN)
                    ek[at] = group_bound(krow + c0, 1, c1 - c0, cfg->key_bits, cfg->key_bits <= 2 ? cfg->range_search : 0,
                                         K[at], 32);
                else if (t >= S && pos < r.nkb * KB && cfg->key_bits < 16) /* the channel over its block */
                    ek[at] = group_bound(K + ((size_t)(S + pos / KB * KB) * H + h) * D + c, (size_t)H * D, KB,
                                         cfg->key_bits, cfg->key_bits <= 2 ? cfg->range_search : 0, K[at], 32);
                if (t >= S && pos < r.nvq && cfg->value_bits < 16)
                    ev[at] = group_bound(vrow + c0, 1, c1 - c0, cfg->value_bits, cfg->range_search, V[at], pv);
            }
}

/* ---- quantize -> dequantize, and attention against exact fp32 ------------ */

typedef struct accuracy { double out_err, bound_ratio, fused_err; } accuracy;

/* Builds a cache, checks every element within its bound and attention within the
   bound that the element errors imply; returns the figures. */
static accuracy check_config(const kvq_config *cfg, int T, int kind, int nqh, int nq, unsigned seed, int quiet) {
    const int H = cfg->n_kv_heads, D = cfg->head_dim;
    size_t n = (size_t)T * H * D, nout = (size_t)nq * nqh * D;
    float *K = (float *)tu_alloc(n * 4), *V = (float *)tu_alloc(n * 4);
    float *Kr = (float *)tu_alloc(n * 4), *Vr = (float *)tu_alloc(n * 4);
    double *ek = (double *)tu_alloc(n * 8), *ev = (double *)tu_alloc(n * 8);
    float *q = (float *)tu_alloc(nout * 4), *out = (float *)tu_alloc(nout * 4);
    double *ref = (double *)tu_alloc(nout * 8), *ref_q = (double *)tu_alloc(nout * 8);
    float scale = 1.0f / sqrtf((float)D);
    tu_rng r;
    kvq_cache *c = NULL;
    kvq_attn_params ap;
    accuracy acc = {0, 0, 0};
    size_t i;
    int over = 0, j, hd;
    r.s = 0x9e3779b97f4a7c15ull ^ seed;
    tu_fill_kv(&r, kind, T, H, D, K, V);
    tu_fill_q(&r, kind, nout, D, q);
    CHECK(kvq_cache_create(&c, cfg) == KVQ_OK, "create k%d v%d G%d", cfg->key_bits, cfg->value_bits,
          cfg->group_size);
    if (!c) goto done;
    CHECK(kvq_cache_append(c, K, V, T) == KVQ_OK, "append");
    CHECK(kvq_cache_read(c, 0, T, Kr, Vr) == KVQ_OK, "read");
    element_bounds(cfg, T, K, V, ek, ev);
    for (i = 0; i < n; i++) {
        if (fabs(Kr[i] - K[i]) > ek[i]) over++;
        if (fabs(Vr[i] - V[i]) > ev[i]) over++;
    }
    CHECK(over == 0, "%d elements outside half a step (k%d v%d G%d KB%d P%d D%d R%d S%d)", over, cfg->key_bits,
          cfg->value_bits, cfg->group_size, key_block(cfg), cfg->value_param_bits, D, cfg->residual_tokens,
          cfg->sink_tokens);

    ap.n_q_heads = nqh;
    ap.n_queries = nq;
    ap.scale = 0.0f;
    CHECK(kvq_attention(c, q, out, &ap) == KVQ_OK, "attention");
    /* fused attention equals exact attention on what the cache holds */
    tu_ref_attention(Kr, Vr, T, H, D, q, nq, nqh, scale, ref_q);
    acc.fused_err = tu_rel_err(out, ref_q, nout);
    CHECK(acc.fused_err < 1e-9, "fused vs dequantized reference: %g", acc.fused_err);
    /* and lies within the bound the element errors imply:
       ||o' - o|| <= max_t ||dv_t|| + (exp(2E) - 1) max_t ||v_t||, E = max_t |score error| */
    tu_ref_attention(K, V, T, H, D, q, nq, nqh, scale, ref);
    acc.out_err = tu_rel_err(out, ref, nout);
    for (j = 0; j < nq; j++)
        for (hd = 0; hd < nqh; hd++) {
            int h = hd / (nqh / H), t, ch, limit = T - nq + j + 1;
            const float *qv = q + ((size_t)j * nqh + hd) * D;
            double E = 0, dv = 0, vmax = 0, e2 = 0, bound;
            for (t = 0; t < limit; t++) {
                double se = 0, dvt = 0, vt = 0;
                for (ch = 0; ch < D; ch++) {
                    size_t at = ((size_t)t * H + h) * D + ch;
                    se += fabs(qv[ch]) * ek[at];
                    dvt += ev[at] * ev[at];
                    vt += (double)V[at] * V[at];
                }
                E = se * scale > E ? se * scale : E;
                dv = dvt > dv ? dvt : dv;
                vmax = vt > vmax ? vt : vmax;
            }
            bound = sqrt(dv) + expm1(2 * E) * sqrt(vmax);
            for (ch = 0; ch < D; ch++) {
                double d = out[((size_t)j * nqh + hd) * D + ch] - ref[((size_t)j * nqh + hd) * D + ch];
                e2 += d * d;
            }
            bound = bound * (1 + 1e-4) + 1e-6;
            if (sqrt(e2) / bound > acc.bound_ratio) acc.bound_ratio = sqrt(e2) / bound;
        }
    CHECK(acc.bound_ratio <= 1.0, "attention error %.3g x its bound (k%d v%d G%d D%d)", acc.bound_ratio,
          cfg->key_bits, cfg->value_bits, cfg->group_size, D);
    if (cfg->key_bits == 16 && cfg->value_bits == 16)
        CHECK(acc.out_err < 1e-6, "fp16 cache should be near exact: %g", acc.out_err);
    if (!quiet)
        printf("  k%-2d v%-2d G%-3d D%-3d R%-3d S%-2d %-10s T%-5d  attn err %.3e  (%.2f of bound)\n",
               cfg->key_bits, cfg->value_bits, cfg->group_size, D, cfg->residual_tokens, cfg->sink_tokens,
               kind ? "structured" : "random", T, acc.out_err, acc.bound_ratio);
done:
    kvq_cache_destroy(c);
    free(K); free(V); free(Kr); free(Vr); free(ek); free(ev); free(q); free(out); free(ref); free(ref_q);
    return acc;
}

static void test_accuracy_grid(void) {
    static const int bits[] = {2, 3, 4, 8, 16};
    static const int groups[] = {16, 32, 64, 128};
    int b, g, kind;
    for (kind = 0; kind < 2; kind++)
        for (b = 0; b < 5; b++)
            for (g = 0; g < 4; g++) {
                kvq_config cfg = kvq_default_config(groups[g] == 64 ? 96 : 64, 2, 400);
                cfg.key_bits = cfg.value_bits = bits[b];
                cfg.group_size = groups[g];
                cfg.key_block = 0; /* = G */
                cfg.value_param_bits = 32;
                cfg.residual_tokens = (g % 2) ? groups[g] : 0;
                cfg.sink_tokens = (b % 2) ? 4 : 0;
                check_config(&cfg, 300 + 7 * g, kind, 4, 2, (unsigned)(b * 10 + g), 1);
                cfg.key_axis = KVQ_KEYS_PER_TOKEN; /* the same with keys per token */
                check_config(&cfg, 300 + 7 * g, kind, 4, 2, (unsigned)(b * 10 + g), 1);
                /* keys in blocks of another size than the value groups, values with 16-bit params */
                cfg.key_axis = KVQ_KEYS_PER_CHANNEL;
                cfg.key_block = groups[3 - g];
                cfg.residual_tokens = (g % 2) ? 128 : 0;
                cfg.value_param_bits = 16; /* 4- and 8-bit values keep fp16 params */
                check_config(&cfg, 300 + 7 * g, kind, 4, 2, (unsigned)(b * 10 + g + 5), 1);
            }
}

static void test_shapes(void) {
    /* head_dims that G does not divide, the extremes of head_dim, mixed K/V bits,
       GQA 1..8, several queries, tokens fewer than one block, all-sink caches */
    static const int dims[] = {8, 24, 40, 80, 96, 112, 136, 512};
    int i;
    for (i = 0; i < 8; i++) {
        kvq_config cfg = kvq_default_config(dims[i], 1 + i % 3, 200);
        cfg.key_bits = (i % 2) ? 3 : 2;
        cfg.value_bits = (i % 3) ? 4 : 8;
        cfg.residual_tokens = (i % 2) ? 64 : 0;
        check_config(&cfg, 150 + i, i % 2, cfg.n_kv_heads * (1 + i % 8), 1 + i % 3, (unsigned)i, 1);
    }
    {
        kvq_config cfg = kvq_default_config(32, 2, 64);
        cfg.residual_tokens = 0;
        check_config(&cfg, 10, TU_STRUCTURED, 4, 3, 7, 1); /* fewer tokens than a block */
        cfg.sink_tokens = 64;
        check_config(&cfg, 64, TU_STRUCTURED, 2, 5, 8, 1); /* every token a sink */
        cfg.sink_tokens = 5;
        cfg.key_bits = 16;
        cfg.value_bits = 2;
        check_config(&cfg, 64, TU_RANDOM, 8, 1, 9, 1);
    }
}

/* The figures quoted in README.md: D 128, 8 KV heads / 32 query heads, 2048 tokens,
   structured data, default G 32 and R 128. */
static void report(void) {
    static const int bits[] = {16, 8, 4, 3, 2};
    int b, R;
    printf("accuracy on structured data (D 128, GQA 32/8, 2048 tokens, 4 queries), squared relative error:\n");
    for (R = 0; R <= 128; R += 128)
        for (b = 0; b < 5; b++) {
            kvq_config cfg = kvq_default_config(128, 8, 2048);
            kvq_cache *c = NULL;
            accuracy a;
            cfg.key_bits = cfg.value_bits = bits[b];
            cfg.key_block = 0; /* blocks and groups of 32, fp16 params: one shape for every width */
            cfg.value_param_bits = 32;
            cfg.residual_tokens = R;
            a = check_config(&cfg, 2048, TU_STRUCTURED, 32, 4, 1, 1);
            if (kvq_cache_create(&c, &cfg) == KVQ_OK) {
                printf("  k%-2d v%-2d G32 R%-3d  %.2f bits/element steady  attn err %.2e  (%.2f of bound)\n",
                       bits[b], bits[b], R, kvq_config_bits_per_element(&cfg), a.out_err, a.bound_ratio);
                kvq_cache_destroy(c);
            }
        }
}

/* ---- golden vectors: a fixed input and its packed bytes ------------------- */

/* Input: D 8, 1 head, G 16, no residual, 16 tokens, 2-bit keys and 3-bit values (formulas below),
   with min/max ranges (range_search 0) and with the default range search (4). The expected bytes
   were computed independently of kvq.h by tests/golden.py. */
static const uint8_t golden_k2[] = {
#include "golden_k2.inc"
};
static const uint8_t golden_v3[] = {
#include "golden_v3.inc"
};
static const uint8_t golden_k2c4[] = {
#include "golden_k2c4.inc"
};
static const uint8_t golden_v3c4[] = {
#include "golden_v3c4.inc"
};
static const uint8_t golden_v2p16[] = {
#include "golden_v2p16.inc"
};
static const uint8_t golden_v2p16c4[] = {
#include "golden_v2p16c4.inc"
};

static void test_golden(void) {
    float k[16 * 8], v[16 * 8];
    int t, ch, search;
    for (t = 0; t < 16; t++)
        for (ch = 0; ch < 8; ch++) {
            k[t * 8 + ch] = (float)((t * 7 + ch * 3) % 13 - 6) * 0.375f * (float)(ch + 1);
            v[t * 8 + ch] = (float)((t * 5 + ch * 11) % 9 - 4) * 0.5f + (float)ch * 0.1f;
        }
    CHECK(kvq_default_config(8, 1, 16).range_search == 4, "the default searches 4 steps a side");
    for (search = 0; search <= 4; search += 4) {
        kvq_config cfg = kvq_default_config(8, 1, 16);
        const uint8_t *gk = search ? golden_k2c4 : golden_k2, *gv = search ? golden_v3c4 : golden_v3;
        kvq_cache *c = NULL;
        uint8_t got[16 * 7]; /* value records: fp16 scale, fp16 min (one group of 8 channels), 3 code bytes */
        cfg.group_size = 16;
        cfg.key_block = 0; /* = G */
        cfg.value_param_bits = 32;
        cfg.residual_tokens = 0;
        cfg.sink_tokens = 0;
        cfg.key_bits = 2;
        cfg.value_bits = 3;
        cfg.range_search = search;
        if (kvq_cache_create(&c, &cfg) != KVQ_OK) { CHECK(0, "create"); return; }
        kvq_cache_append(c, k, v, 16);
        CHECK(c->n_kblocks == 1 && c->n_vquant == 16, "all quantized");
        CHECK(c->kblock_bytes == sizeof golden_k2, "key block size %zu", c->kblock_bytes);
        CHECK(memcmp(c->kblocks, gk, sizeof golden_k2) == 0, "key block bytes differ from golden (search %d)", search);
        for (t = 0; t < 16; t++) {
            memcpy(got + t * 7, kvq__value_params(c, 0, t), 4);
            memcpy(got + t * 7 + 4, kvq__value_codes(c, 0, t), 3);
        }
        CHECK(sizeof golden_v3 == sizeof got && memcmp(got, gv, sizeof got) == 0,
              "value bytes differ from golden (search %d)", search);
        if (getenv("KVQ_PRINT_GOLDEN")) {
            size_t i;
            for (i = 0; i < c->kblock_bytes; i++) printf("%u,%s", c->kblocks[i], i % 16 == 15 ? "\n" : "");
            printf("\n--\n");
            for (i = 0; i < sizeof got; i++) printf("%u,%s", got[i], i % 16 == 15 ? "\n" : "");
            printf("\n");
        }
        kvq_cache_destroy(c);
    }
    for (search = 0; search <= 4; search += 4) { /* 2-bit values with 16-bit params */
        kvq_config cfg = kvq_default_config(8, 1, 16);
        const uint8_t *gv = search ? golden_v2p16c4 : golden_v2p16;
        kvq_cache *c = NULL;
        uint8_t got[16 * 4]; /* value records: one u16 of params (one group of 8 channels), 2 code bytes */
        cfg.group_size = 16;
        cfg.residual_tokens = 0;
        cfg.sink_tokens = 0;
        cfg.value_bits = 2;
        cfg.value_param_bits = 16;
        cfg.range_search = search;
        if (kvq_cache_create(&c, &cfg) != KVQ_OK) { CHECK(0, "create"); return; }
        kvq_cache_append(c, k, v, 16);
        for (t = 0; t < 16; t++) {
            memcpy(got + t * 4, kvq__value_params(c, 0, t), 2);
            memcpy(got + t * 4 + 2, kvq__value_codes(c, 0, t), 2);
        }
        CHECK(sizeof golden_v2p16 == sizeof got && memcmp(got, gv, sizeof got) == 0,
              "16-bit-param value bytes differ from golden (search %d)", search);
        kvq_cache_destroy(c);
    }
}

/* ---- 3-bit bit planes: known codes, their bytes, on every ISA path ------------ */

/* A 3-bit row of n codes as the format says (section "Formats" of kvq.h), written here
   independently of kvq.h's packers: n/4 bytes of low 2 bits (code i at bits 2*(i%4) of byte
   i/4), then n/8 bytes of high bits (code i at bit i%8 of byte n/4 + i/8). */
static void planes_row(const int *code, int n, uint8_t *row) {
    int i;
    memset(row, 0, (size_t)n * 3 / 8);
    for (i = 0; i < n; i++) {
        row[i / 4] = (uint8_t)(row[i / 4] | (code[i] & 3) << 2 * (i % 4));
        row[n / 4 + i / 8] = (uint8_t)(row[n / 4 + i / 8] | (code[i] >> 2) << i % 8);
    }
}

/* Inputs whose codes are the inputs: every key channel and value group holds 0 and 7 (min 0,
   scale 1). Under each ISA: the stored bytes of key rows (n = G) and value rows (n = D, a short
   last group) are the planes above; key channel 0 (codes 0..7, 7..0) is also spelled out; and
   the ISA's attention kernels read the codes back exactly (one-hot queries score a key channel;
   a weight of 1 on one token accumulates its value row). Shapes: D 24, G 16 (AVX-512: a half
   run of values) and D 40, G 32 (two runs per key row; AVX-512: a pair of value chunks). */
static void test_planes(void) {
    static const int shapes[2][2] = {{24, 16}, {40, 32}};
    static const uint8_t row0[2][12] = {{0xe4, 0xe4, 0x1b, 0x1b, 0xf0, 0x0f}, /* low plane, high plane */
                                        {0xe4, 0xe4, 0x1b, 0x1b, 0xe4, 0xe4, 0x1b, 0x1b, 0xf0, 0x0f, 0xf0, 0x0f}};
    static const float one = 1.0f;
    const kvq_isa best = kvq_get_isa();
    int sh, isa, t, ch;
    for (sh = 0; sh < 2; sh++) {
        const int D = shapes[sh][0], G = shapes[sh][1];
        float k[32 * 40], v[32 * 40], q[40], sc[KVQ__TILE], x[40], par[4], *xp = x;
        int kc[40][32], vc[32][40];
        uint8_t want[40 * 12];
        for (t = 0; t < G; t++)
            for (ch = 0; ch < D; ch++) {
                kc[ch][t] = ch ? (3 * t + ch) % 8 : t % 16 < 8 ? t % 8 : 7 - t % 8; /* 0..7 in every 8 tokens */
                vc[t][ch] = (5 * ch + t) % 8;                                        /* and every 8 channels */
                k[t * D + ch] = (float)kc[ch][t];
                v[t * D + ch] = (float)vc[t][ch];
            }
        for (isa = KVQ_ISA_SCALAR; isa <= KVQ_ISA_NEON; isa++) {
            kvq_config cfg = kvq_default_config(D, 1, G);
            kvq_cache *c = NULL;
            const uint8_t *codes;
            const char *name = kvq_isa_name((kvq_isa)isa);
            int bad = 0;
            if (kvq_set_isa((kvq_isa)isa) != KVQ_OK) continue;
            cfg.group_size = G;
            cfg.key_block = 0; /* = G */
            cfg.value_param_bits = 32;
            cfg.residual_tokens = 0;
            cfg.sink_tokens = 0;
            cfg.key_bits = cfg.value_bits = 3;
            cfg.range_search = 0;
            if (kvq_cache_create(&c, &cfg) != KVQ_OK) { CHECK(0, "create"); break; }
            CHECK(kvq_cache_append(c, k, v, G) == KVQ_OK && c->n_kblocks == 1 && c->n_vquant == G, "append");
            codes = c->kblocks + 4 * (size_t)D;
            CHECK(memcmp(codes, row0[sh], (size_t)G * 3 / 8) == 0, "%s D%d G%d: key channel 0 is not e4 e4 1b 1b..",
                  name, D, G);
            for (ch = 0; ch < D; ch++) planes_row(kc[ch], G, want + (size_t)ch * G * 3 / 8);
            CHECK(memcmp(codes, want, (size_t)D * G * 3 / 8) == 0, "%s D%d G%d: key rows", name, D, G);
            for (t = 0; t < G; t++) {
                planes_row(vc[t], D, want);
                bad += memcmp(kvq__value_codes(c, 0, t), want, (size_t)D * 3 / 8) != 0;
            }
            CHECK(bad == 0, "%s D%d G%d: %d value rows", name, D, G, bad);
            for (ch = 0, bad = 0; ch < D; ch++) { /* scores of one-hot queries: channel ch's codes */
                memset(q, 0, sizeof q);
                q[ch] = 1.0f;
                kvq__k_scores_codes(c->kblocks, D, G, 3, q, 1, sc);
                for (t = 0; t < G; t++) bad += sc[t] != (float)kc[ch][t];
            }
            CHECK(bad == 0, "%s D%d G%d: %d key codes read back wrong", name, D, G, bad);
            for (t = 0, bad = 0; t < G; t++) { /* a value row with weight 1: its codes */
                const uint16_t *p = kvq__value_params(c, 0, t); /* scale[2], min[2] */
                for (ch = 0; ch < 4; ch++) par[ch] = kvq__f16_to_f32(p[ch]);
                memset(x, 0, sizeof x);
                kvq__k_acc_codes(kvq__value_codes(c, 0, t), 0, par, 1, D, G, 3, &one, 1, &xp);
                for (ch = 0; ch < D; ch++) bad += x[ch] != (float)vc[t][ch];
            }
            CHECK(bad == 0, "%s D%d G%d: %d value codes read back wrong", name, D, G, bad);
            kvq_cache_destroy(c);
        }
    }
    kvq_set_isa(best);
}

/* ---- incremental vs bulk append, split vs single ----------------------- */

static void test_incremental_and_split(void) {
    kvq_config cfg = kvq_default_config(48, 3, 700);
    kvq_cache *a = NULL, *b = NULL;
    const int T = 650, H = 3, D = 48, NQH = 6, NQ = 3;
    size_t n = (size_t)T * H * D;
    float *K = (float *)tu_alloc(n * 4), *V = (float *)tu_alloc(n * 4);
    float q[3 * 6 * 48], o1[3 * 6 * 48], o2[3 * 6 * 48], o3[3 * 6 * 48];
    float *st[3];
    kvq_attn_params ap = {NQH, NQ, 0.0f};
    tu_rng r = {99};
    size_t sf, i;
    int t, same = 1;
    double e = 0, rr = 0;
    cfg.sink_tokens = 4;
    cfg.residual_tokens = 64;
    cfg.key_bits = 3;
    cfg.value_bits = 2;
    tu_fill_kv(&r, TU_STRUCTURED, T, H, D, K, V);
    tu_fill_q(&r, TU_STRUCTURED, sizeof q / 4, D, q);
    kvq_cache_create(&a, &cfg);
    kvq_cache_create(&b, &cfg);
    CHECK(kvq_cache_append(a, K, V, T) == KVQ_OK, "bulk");
    for (t = 0; t < T; t++) kvq_cache_append(b, K + (size_t)t * H * D, V + (size_t)t * H * D, 1);
    same = a->n_kblocks == b->n_kblocks && a->n_vquant == b->n_vquant &&
           memcmp(a->kblocks, b->kblocks, (size_t)H * a->max_kblocks * a->kblock_bytes) == 0 &&
           memcmp(a->vcodes, b->vcodes, (size_t)H * a->max_vquant * a->vcode_bytes) == 0 &&
           memcmp(a->vparams, b->vparams, (size_t)H * a->max_vquant * a->vparam_bytes) == 0;
    CHECK(same, "bulk and one-at-a-time appends stored different bytes");
    kvq_attention(a, q, o1, &ap);
    kvq_attention(b, q, o2, &ap);
    CHECK(memcmp(o1, o2, sizeof o1) == 0, "bulk and one-at-a-time appends attend differently");
    CHECK(kvq_cache_payload_bytes(a) == kvq_cache_payload_bytes(b), "payload");

    /* split: three token ranges, the second split again over KV heads, then merge */
    sf = kvq_attention_state_floats(a, &ap);
    CHECK(sf == (size_t)NQ * NQH * (D + 2), "state floats %zu", sf);
    for (i = 0; i < 3; i++) st[i] = (float *)tu_alloc(sf * 4);
    CHECK(kvq_attention_partial(a, q, &ap, 0, 100, 0, H, st[0]) == KVQ_OK, "partial 0");
    CHECK(kvq_attention_partial(a, q, &ap, 100, 640, 0, 1, st[1]) == KVQ_OK, "partial 1a");
    CHECK(kvq_attention_partial(a, q, &ap, 100, 640, 1, H, st[1]) == KVQ_OK, "partial 1b");
    CHECK(kvq_attention_partial(a, q, &ap, 640, T, 0, H, st[2]) == KVQ_OK, "partial 2");
    CHECK(kvq_attention_merge(a, &ap, (const float *const *)st, 3, o3) == KVQ_OK, "merge");
    for (i = 0; i < sizeof o1 / 4; i++) {
        e += (o3[i] - o1[i]) * (o3[i] - o1[i]);
        rr += o1[i] * o1[i];
    }
    CHECK(e / rr < 1e-10, "split + merge differs from one call: %g", e / rr);
    /* a range that covers nothing for some query still merges (query 0 sees tokens <= 647) */
    CHECK(kvq_attention_partial(a, q, &ap, 648, T, 0, H, st[2]) == KVQ_OK, "partial beyond query 0");
    CHECK(kvq_attention_partial(a, q, &ap, 0, 648, 0, H, st[0]) == KVQ_OK, "partial up to");
    CHECK(kvq_attention_merge(a, &ap, (const float *const *)st + 2, 1, o3) == KVQ_ERR_INVALID,
          "merging states in which some query saw no token is refused");
    {
        const float *two[2];
        two[0] = st[0];
        two[1] = st[2];
        CHECK(kvq_attention_merge(a, &ap, two, 2, o3) == KVQ_OK, "merge two");
        e = rr = 0;
        for (i = 0; i < sizeof o1 / 4; i++) {
            e += (o3[i] - o1[i]) * (o3[i] - o1[i]);
            rr += o1[i] * o1[i];
        }
        CHECK(e / rr < 1e-10, "split at the causal edge differs: %g", e / rr);
    }
    for (i = 0; i < 3; i++) free(st[i]);
    /* reset gives an empty cache that fills the same way again */
    kvq_cache_reset(b);
    CHECK(kvq_cache_tokens(b) == 0 && kvq_cache_payload_bytes(b) == 0, "reset");
    kvq_cache_append(b, K, V, T);
    kvq_attention(b, q, o2, &ap);
    CHECK(memcmp(o1, o2, sizeof o1) == 0, "refilled cache attends differently");
    kvq_cache_destroy(a);
    kvq_cache_destroy(b);
    free(K);
    free(V);
}

/* ---- accounting ---------------------------------------------------------- */

static void test_accounting(void) {
    kvq_config cfg = kvq_default_config(128, 8, 4096);
    kvq_cache *c = NULL;
    float *k = (float *)tu_alloc(8 * 128 * 4), *v = (float *)tu_alloc(8 * 128 * 4);
    int t;
    /* the default: 3-bit keys + 32 bits of fp16 scale/min per 64 tokens (3.5), 2-bit values + 16 bits
       of params per 32 channels (2.5) */
    CHECK(fabs(kvq_config_bits_per_element(&cfg) - 3.0) < 1e-12, "K3V2 b64 p16 is 3.0 bits: %g",
          kvq_config_bits_per_element(&cfg));
    cfg.key_bits = 2; /* KIVI-2's shape: 2 bits, blocks and groups of 32, fp16 params */
    cfg.key_block = 0;
    cfg.value_param_bits = 32;
    CHECK(fabs(kvq_config_bits_per_element(&cfg) - 3.0) < 1e-12, "2-bit G32 is 3.0 bits: %g",
          kvq_config_bits_per_element(&cfg));
    cfg.group_size = 64;
    CHECK(fabs(kvq_config_bits_per_element(&cfg) - 2.5) < 1e-12, "2-bit G64 is 2.5 bits");
    cfg.group_size = 32;
    cfg.key_bits = cfg.value_bits = 16;
    CHECK(kvq_config_bits_per_element(&cfg) == 16.0, "fp16 is 16 bits");
    cfg.key_bits = cfg.value_bits = 2;
    cfg.sink_tokens = 4;
    kvq_cache_create(&c, &cfg);
    for (t = 0; t < 1000; t++) kvq_cache_append(c, k, v, 1);
    /* 4 sinks; 996 after: keys 28 blocks (896) + 100 in the ring (a block leaves once more
       than 128 wait); values 868 quantized + 128 in the ring */
    {
        size_t expect = 8 * (4 * 256 * 2 + 28 * (size_t)(4 * 128 + 128 * 8) + 100 * 256 +
                             868 * (size_t)(4 * 4 + 32) + 128 * 256);
        CHECK(kvq_cache_payload_bytes(c) == expect, "payload %zu, expected %zu", kvq_cache_payload_bytes(c),
              expect);
    }
    kvq_cache_destroy(c);
    free(k);
    free(v);
}

/* ---- bad input: a status, and nothing changed ---------------------------- */

typedef struct snapshot { unsigned char *mem; size_t n; } snapshot;

static void test_errors(void) {
    kvq_config cfg = kvq_default_config(16, 2, 40), bad;
    size_t bytes = kvq_cache_bytes(&cfg);
    unsigned char *mem = (unsigned char *)tu_alloc(bytes), *copy = (unsigned char *)tu_alloc(bytes);
    kvq_cache *c = NULL, *tmp = NULL;
    float k[40 * 32], v[40 * 32], q[4 * 16 * 2], out[4 * 16 * 2], st[4 * 18 * 2];
    const float *sts[1];
    kvq_attn_params ap = {4, 1, 0.0f};
    tu_rng r = {5};
    int i;
    for (i = 0; i < 40 * 32; i++) { k[i] = tu_normal(&r); v[i] = tu_normal(&r); }
    for (i = 0; i < 4 * 16 * 2; i++) q[i] = tu_normal(&r);
    cfg.residual_tokens = 0;
    cfg.group_size = 16;
    bytes = kvq_cache_bytes(&cfg);

    /* configs */
#define BAD_CFG(field, value, expect)                                                          \
    do {                                                                                       \
        bad = cfg;                                                                             \
        bad.field = value;                                                                     \
        CHECK(kvq_config_check(&bad) == (expect), #field " = " #value);                        \
        CHECK(kvq_cache_bytes(&bad) == 0, #field " = " #value ": bytes must be 0");            \
        tmp = NULL;                                                                            \
        CHECK(kvq_cache_create(&tmp, &bad) == (expect) && tmp == NULL, #field " = " #value);   \
    } while (0)
    BAD_CFG(head_dim, 0, KVQ_ERR_INVALID);
    BAD_CFG(head_dim, 12, KVQ_ERR_INVALID);
    BAD_CFG(head_dim, 520, KVQ_ERR_INVALID);
    BAD_CFG(n_kv_heads, 0, KVQ_ERR_INVALID);
    BAD_CFG(n_kv_heads, -3, KVQ_ERR_INVALID);
    BAD_CFG(max_tokens, 0, KVQ_ERR_INVALID);
    BAD_CFG(key_bits, 5, KVQ_ERR_UNSUPPORTED);
    BAD_CFG(value_bits, 1, KVQ_ERR_UNSUPPORTED);
    BAD_CFG(value_bits, 0, KVQ_ERR_INVALID);
    BAD_CFG(key_bits, -2, KVQ_ERR_INVALID);
    BAD_CFG(group_size, 24, KVQ_ERR_UNSUPPORTED);
    BAD_CFG(group_size, 0, KVQ_ERR_INVALID);
    BAD_CFG(residual_tokens, 8, KVQ_ERR_INVALID);
    BAD_CFG(residual_tokens, -16, KVQ_ERR_INVALID);
    BAD_CFG(sink_tokens, -1, KVQ_ERR_INVALID);
    BAD_CFG(sink_tokens, 41, KVQ_ERR_INVALID);
    BAD_CFG(rotation, 7, KVQ_ERR_INVALID);
    BAD_CFG(key_block, 48, KVQ_ERR_UNSUPPORTED);
    BAD_CFG(key_block, -32, KVQ_ERR_INVALID);
    BAD_CFG(value_param_bits, 8, KVQ_ERR_INVALID);
    BAD_CFG(value_param_bits, -16, KVQ_ERR_INVALID);
    bad = cfg;
    bad.residual_tokens = 32;
    bad.key_block = 64;
    CHECK(kvq_config_check(&bad) == KVQ_ERR_INVALID, "a residual window of half a key block");
    bad = cfg;
    bad.value_bits = 8;
    bad.value_param_bits = 16;
    {
        kvq_config fp16_params = bad;
        fp16_params.value_param_bits = 32;
        CHECK(kvq_config_check(&bad) == KVQ_OK && kvq_cache_bytes(&bad) == kvq_cache_bytes(&fp16_params) &&
                  kvq_config_bits_per_element(&bad) == kvq_config_bits_per_element(&fp16_params),
              "16-bit params apply to 2- and 3-bit values: 8-bit values keep fp16 ones");
    }
    bad = cfg;
    bad.key_axis = KVQ_KEYS_PER_TOKEN;
    bad.salient_ratio = 0.1f;
    CHECK(kvq_config_check(&bad) == KVQ_ERR_UNSUPPORTED && kvq_cache_bytes(&bad) == 0,
          "per-token keys with salient tokens are not supported");
    BAD_CFG(salient_ratio, -0.1f, KVQ_ERR_INVALID);
    BAD_CFG(salient_ratio, NAN, KVQ_ERR_INVALID);
    BAD_CFG(salient_bits, 4, KVQ_ERR_INVALID);
    BAD_CFG(salient_policy, 2, KVQ_ERR_INVALID);
    BAD_CFG(key_axis, -1, KVQ_ERR_INVALID);
    CHECK(kvq_config_check(NULL) == KVQ_ERR_INVALID && kvq_cache_bytes(NULL) == 0, "NULL config");
    CHECK(kvq_cache_create(NULL, &cfg) == KVQ_ERR_INVALID, "NULL out");

    /* init */
    CHECK(kvq_cache_init(&c, &cfg, mem, bytes - 1) == KVQ_ERR_BUFFER, "buffer one byte short");
    CHECK(kvq_cache_init(&c, &cfg, NULL, bytes) == KVQ_ERR_INVALID, "NULL memory");
    CHECK(kvq_cache_init(NULL, &cfg, mem, bytes) == KVQ_ERR_INVALID, "NULL out");
    CHECK(kvq_cache_init(&c, &cfg, mem + 3, bytes - 3) == KVQ_ERR_BUFFER, "misaligned, short");
    CHECK(kvq_cache_init(&c, &cfg, mem, bytes) == KVQ_OK, "init");
    CHECK(kvq_cache_append(c, k, v, 20) == KVQ_OK, "append 20");

    /* every failing call leaves all of the cache's memory as it was */
#define UNCHANGED(call, expect)                                                 \
    do {                                                                        \
        memcpy(copy, mem, bytes);                                               \
        CHECK((call) == (expect), #call);                                       \
        CHECK(memcmp(copy, mem, bytes) == 0, #call " changed the cache");       \
    } while (0)
    UNCHANGED(kvq_cache_append(c, k, v, 21), KVQ_ERR_FULL);
    UNCHANGED(kvq_cache_append(c, k, v, -1), KVQ_ERR_INVALID);
    UNCHANGED(kvq_cache_append(c, NULL, v, 1), KVQ_ERR_INVALID);
    UNCHANGED(kvq_cache_append(c, k, NULL, 1), KVQ_ERR_INVALID);
    UNCHANGED(kvq_cache_append(NULL, k, v, 1), KVQ_ERR_INVALID);
    k[5 * 32 + 7] = NAN;
    UNCHANGED(kvq_cache_append(c, k, v, 10), KVQ_ERR_INVALID);
    k[5 * 32 + 7] = INFINITY;
    UNCHANGED(kvq_cache_append(c, k, v, 10), KVQ_ERR_INVALID);
    k[5 * 32 + 7] = 70000.0f; /* beyond fp16 */
    UNCHANGED(kvq_cache_append(c, k, v, 10), KVQ_ERR_INVALID);
    k[5 * 32 + 7] = 65519.0f; /* rounds to 65504 in fp16, but past the largest finite half */
    UNCHANGED(kvq_cache_append(c, k, v, 10), KVQ_ERR_INVALID);
    k[5 * 32 + 7] = nextafterf(65504.0f, 1e9f); /* the first float past it */
    UNCHANGED(kvq_cache_append(c, k, v, 10), KVQ_ERR_INVALID);
    k[5 * 32 + 7] = -nextafterf(65504.0f, 1e9f);
    UNCHANGED(kvq_cache_append(c, k, v, 10), KVQ_ERR_INVALID);
    k[5 * 32 + 7] = 0.5f;
    v[9 * 32 + 31] = -INFINITY; /* the last element of the last token */
    UNCHANGED(kvq_cache_append(c, k, v, 10), KVQ_ERR_INVALID);
    v[9 * 32 + 31] = 0.25f;
    UNCHANGED(kvq_cache_read(c, 0, 21, k, v), KVQ_ERR_INVALID);
    UNCHANGED(kvq_cache_read(c, -1, 2, k, v), KVQ_ERR_INVALID);
    UNCHANGED(kvq_cache_read(c, 0, 2, NULL, NULL), KVQ_ERR_INVALID);
    UNCHANGED(kvq_cache_read(NULL, 0, 2, k, v), KVQ_ERR_INVALID);
    UNCHANGED(kvq_cache_read(c, 0, 2, k, k + 32), KVQ_ERR_INVALID); /* k and v overlap */
    UNCHANGED(kvq_cache_read(c, 0, 2, (float *)(void *)(mem + bytes / 2), NULL), KVQ_ERR_INVALID); /* into the cache */
    UNCHANGED(kvq_attention(c, q, out, NULL), KVQ_ERR_INVALID);
    UNCHANGED(kvq_attention(c, NULL, out, &ap), KVQ_ERR_INVALID);
    UNCHANGED(kvq_attention(c, q, NULL, &ap), KVQ_ERR_INVALID);
    UNCHANGED(kvq_attention(NULL, q, out, &ap), KVQ_ERR_INVALID);
    ap.n_q_heads = 3;
    UNCHANGED(kvq_attention(c, q, out, &ap), KVQ_ERR_INVALID);
    ap.n_q_heads = 0;
    UNCHANGED(kvq_attention(c, q, out, &ap), KVQ_ERR_INVALID);
    ap.n_q_heads = 4;
    ap.n_queries = 21;
    UNCHANGED(kvq_attention(c, q, out, &ap), KVQ_ERR_INVALID);
    ap.n_queries = 0;
    UNCHANGED(kvq_attention(c, q, out, &ap), KVQ_ERR_INVALID);
    ap.n_queries = 1;
    ap.scale = NAN;
    UNCHANGED(kvq_attention(c, q, out, &ap), KVQ_ERR_INVALID);
    ap.scale = 0.0f;
    q[3] = NAN;
    UNCHANGED(kvq_attention(c, q, out, &ap), KVQ_ERR_INVALID);
    q[3] = 1.0f;
    /* aliasing: outputs never overlap inputs or the cache */
    {
        float qcopy[4 * 16 * 2];
        memcpy(qcopy, q, sizeof q);
        UNCHANGED(kvq_attention(c, q, q, &ap), KVQ_ERR_INVALID);
        UNCHANGED(kvq_attention(c, q, q + 63, &ap), KVQ_ERR_INVALID);
        UNCHANGED(kvq_attention_partial(c, q, &ap, 0, 20, 0, 2, q), KVQ_ERR_INVALID);
        CHECK(memcmp(qcopy, q, sizeof q) == 0, "a refused aliased call wrote its input");
        UNCHANGED(kvq_attention(c, q, (float *)(void *)(mem + bytes / 2), &ap), KVQ_ERR_INVALID);
        UNCHANGED(kvq_attention(c, q, (float *)(void *)mem, &ap), KVQ_ERR_INVALID);
        CHECK(kvq_attention(c, q, q + 64, &ap) == KVQ_OK, "adjacent q and out");
        memcpy(q, qcopy, sizeof q);
        CHECK(kvq_attention_partial(c, q, &ap, 0, 20, 0, 2, st) == KVQ_OK, "partial");
        sts[0] = st;
        UNCHANGED(kvq_attention_merge(c, &ap, sts, 1, st), KVQ_ERR_INVALID);
        UNCHANGED(kvq_attention_merge(c, &ap, sts, 1, st + 70), KVQ_ERR_INVALID);
        UNCHANGED(kvq_attention_merge(c, &ap, sts, 1, (float *)(void *)(mem + 128)), KVQ_ERR_INVALID);
        CHECK(kvq_attention_merge(c, &ap, sts, 1, st + 72) == KVQ_OK, "merge into the floats after the state");
    }
    /* finite inputs whose scores would overflow are refused: |scale| * sum |q| <= 2^100 */
    for (i = 0; i < 16; i++) q[i] = 1e10f;
    ap.scale = 1e30f;
    UNCHANGED(kvq_attention(c, q, out, &ap), KVQ_ERR_INVALID);
    UNCHANGED(kvq_attention_partial(c, q, &ap, 0, 20, 0, 2, st), KVQ_ERR_INVALID);
    for (i = 0; i < 16; i++) q[i] = 0x1p96f * 1.0001f; /* 16 * 2^96 = 2^100, and a bit more */
    ap.scale = 1.0f;
    UNCHANGED(kvq_attention(c, q, out, &ap), KVQ_ERR_INVALID);
    for (i = 0; i < 16; i++) q[i] = 0x1p96f; /* exactly the bound: allowed, and finite */
    CHECK(kvq_attention(c, q, out, &ap) == KVQ_OK, "a query at the bound");
    {
        int finite = 1;
        for (i = 0; i < 4 * 16; i++) finite &= isfinite(out[i]) != 0;
        CHECK(finite, "a query at the bound gives a non-finite output");
    }
    for (i = 0; i < 4 * 16 * 2; i++) q[i] = tu_normal(&r);
    ap.scale = 0.0f;
    UNCHANGED(kvq_attention_partial(c, q, &ap, 0, 21, 0, 2, st), KVQ_ERR_INVALID);
    UNCHANGED(kvq_attention_partial(c, q, &ap, 5, 4, 0, 2, st), KVQ_ERR_INVALID);
    UNCHANGED(kvq_attention_partial(c, q, &ap, 0, 20, 1, 1, st), KVQ_ERR_INVALID);
    UNCHANGED(kvq_attention_partial(c, q, &ap, 0, 20, 0, 3, st), KVQ_ERR_INVALID);
    UNCHANGED(kvq_attention_partial(c, q, &ap, 0, 20, 0, 2, NULL), KVQ_ERR_INVALID);
    sts[0] = NULL;
    UNCHANGED(kvq_attention_merge(c, &ap, sts, 1, out), KVQ_ERR_INVALID);
    sts[0] = st;
    UNCHANGED(kvq_attention_merge(c, &ap, sts, 0, out), KVQ_ERR_INVALID);
    UNCHANGED(kvq_attention_merge(c, &ap, NULL, 1, out), KVQ_ERR_INVALID);
    CHECK(kvq_cache_tokens(c) == 20, "still 20 tokens");
    /* the cache still works, up to exactly max_tokens */
    k[3] = 65504.0f; /* the largest half is accepted */
    v[40] = -65504.0f;
    CHECK(kvq_cache_append(c, k, v, 20) == KVQ_OK, "fill to capacity");
    UNCHANGED(kvq_cache_append(c, k, v, 1), KVQ_ERR_FULL);
    CHECK(kvq_cache_append(c, k, v, 0) == KVQ_OK, "appending nothing is fine");
    CHECK(kvq_attention(c, q, out, &ap) == KVQ_OK, "attention after errors");
    kvq_cache_destroy(c); /* no-op: caller's memory */
    kvq_cache_destroy(NULL);
    kvq_cache_reset(NULL);
    CHECK(kvq_cache_tokens(NULL) == 0 && kvq_cache_payload_bytes(NULL) == 0, "NULL queries");
    CHECK(strcmp(kvq_status_string(KVQ_ERR_FULL), "cache full") == 0, "status string");
    CHECK(strcmp(kvq_status_string(KVQ_ERR_BUFFER), "caller's buffer too small") == 0 &&
              strcmp(kvq_status_string(KVQ_ERR_NOMEM), kvq_status_string(KVQ_ERR_BUFFER)) != 0,
          "a too-small buffer has its own status and words");
    CHECK(kvq_version_number() == KVQ_VERSION_NUMBER, "version");
    free(mem);
    free(copy);
}

/* A long context: rounding in the online softmax does not drift. */
static void test_long_context(void) {
    kvq_config cfg = kvq_default_config(64, 1, 1 << 16);
    accuracy a;
    cfg.key_bits = cfg.value_bits = 16;
    a = check_config(&cfg, 1 << 16, TU_STRUCTURED, 4, 1, 3, 1);
    CHECK(a.fused_err < 1e-10, "64K tokens fp16: fused err %g", a.fused_err);
}

/* Merge takes the largest max over all states, whatever their order: with scores 200 apart,
   taking the first state's max would give exp(200) = inf, and NaN. */
static void test_merge_order(void) {
    enum { D = 16, T = 64 };
    kvq_config cfg = kvq_default_config(D, 1, T);
    kvq_cache *c = NULL;
    float k[T * D], v[T * D], q[D], ref[D], out[D], sa[D + 2], sb[D + 2];
    const float *order[2];
    kvq_attn_params ap = {1, 1, 10.0f};
    tu_rng r = {31};
    double e = 0, n = 0;
    int t, ch, o;
    for (t = 0; t < T; t++)
        for (ch = 0; ch < D; ch++) {
            k[t * D + ch] = ch == 0 ? (t < T / 2 ? -1.0f : 1.0f) : 0.0f; /* scores -100 then +100 */
            v[t * D + ch] = tu_normal(&r);
        }
    for (ch = 0; ch < D; ch++) q[ch] = ch == 0 ? 10.0f : 0.0f;
    cfg.sink_tokens = 0;
    CHECK(kvq_cache_create(&c, &cfg) == KVQ_OK && kvq_cache_append(c, k, v, T) == KVQ_OK, "build");
    if (!c) return;
    CHECK(kvq_attention(c, q, ref, &ap) == KVQ_OK, "attention");
    CHECK(kvq_attention_partial(c, q, &ap, 0, T / 2, 0, 1, sa) == KVQ_OK, "earlier half");
    CHECK(kvq_attention_partial(c, q, &ap, T / 2, T, 0, 1, sb) == KVQ_OK, "later half");
    for (o = 0; o < 2; o++) {
        order[0] = o ? sb : sa;
        order[1] = o ? sa : sb;
        CHECK(kvq_attention_merge(c, &ap, order, 2, out) == KVQ_OK, "merge");
        for (ch = 0, e = n = 0; ch < D; ch++) {
            e += (out[ch] - ref[ch]) * (out[ch] - ref[ch]);
            n += ref[ch] * ref[ch];
        }
        CHECK(e <= 1e-12 * n, "merge of [%s] states differs: %g", o ? "later, earlier" : "earlier, later", e / n);
    }
    kvq_cache_destroy(c);
}

/* The range search: it keeps min/max where that is exact, lowers the squared error where an
   outlier stretches a group, takes only 0-8, and touches only 2-bit keys and 2-3-bit values. */
static void test_range_search(void) {
    enum { D = 32, H = 1, T = 200 };
    float k[T * D], v[T * D], ka[T * D], va[T * D], kb[T * D], vb[T * D];
    kvq_cache *a = NULL, *b = NULL;
    kvq_config cfg = kvq_default_config(D, H, T), bad;
    tu_rng r = {88};
    double ea = 0, eb = 0;
    int i, bits;
    cfg.residual_tokens = 0;
    cfg.sink_tokens = 0;
    /* levels 0..3 exactly: min/max is exact, so the search must keep it (same bytes) */
    for (i = 0; i < T * D; i++) { k[i] = (float)(i % 4); v[i] = (float)((i / 3) % 4) * 0.5f; }
    cfg.range_search = 4;
    CHECK(kvq_cache_create(&a, &cfg) == KVQ_OK && kvq_cache_append(a, k, v, T) == KVQ_OK, "searched");
    cfg.range_search = 0;
    CHECK(kvq_cache_create(&b, &cfg) == KVQ_OK && kvq_cache_append(b, k, v, T) == KVQ_OK, "min/max");
    if (a && b) {
        size_t n = kvq_cache_serialized_bytes(a);
        uint8_t *ia = (uint8_t *)tu_alloc(n), *ib = (uint8_t *)tu_alloc(n);
        kvq_cache_serialize(a, ia, n, NULL);
        kvq_cache_serialize(b, ib, n, NULL);
        CHECK(memcmp(ia + KVQ__HEADER_BYTES, ib + KVQ__HEADER_BYTES, n - KVQ__HEADER_BYTES) == 0,
              "an exact min/max grid was replaced");
        free(ia); free(ib);
    }
    kvq_cache_destroy(a);
    kvq_cache_destroy(b);
    /* Gaussian data with rare outliers: the search lowers the error of both K and V */
    for (i = 0; i < T * D; i++) {
        k[i] = tu_normal(&r) + (i % 97 == 0 ? 8.0f : 0.0f);
        v[i] = tu_normal(&r) + (i % 89 == 0 ? -7.0f : 0.0f);
    }
    for (bits = 2; bits <= 4; bits++) {
        double eka = 0, ekb = 0, eva = 0, evb = 0;
        a = b = NULL;
        cfg.key_bits = cfg.value_bits = bits;
        cfg.range_search = 4;
        kvq_cache_create(&a, &cfg);
        kvq_cache_append(a, k, v, T);
        cfg.range_search = 0;
        kvq_cache_create(&b, &cfg);
        kvq_cache_append(b, k, v, T);
        kvq_cache_read(a, 0, T, ka, va);
        kvq_cache_read(b, 0, T, kb, vb);
        for (i = 0; i < T * D; i++) {
            eka += (ka[i] - k[i]) * (ka[i] - k[i]);
            ekb += (kb[i] - k[i]) * (kb[i] - k[i]);
            eva += (va[i] - v[i]) * (va[i] - v[i]);
            evb += (vb[i] - v[i]) * (vb[i] - v[i]);
        }
        if (bits == 2) CHECK(eka < 0.9 * ekb, "2-bit keys: search %g vs min/max %g", eka, ekb);
        else CHECK(eka == ekb, "%d-bit keys must keep min/max", bits);
        if (bits <= 3) CHECK(eva < 0.9 * evb, "%d-bit values: search %g vs min/max %g", bits, eva, evb);
        else CHECK(eva == evb, "4-bit values must keep min/max");
        ea += eka;
        eb += ekb;
        kvq_cache_destroy(a);
        kvq_cache_destroy(b);
    }
    CHECK(ea < eb, "search never helped");
    bad = cfg;
    bad.range_search = -1;
    CHECK(kvq_config_check(&bad) == KVQ_ERR_INVALID, "range_search -1");
    bad.range_search = 9;
    CHECK(kvq_config_check(&bad) == KVQ_ERR_INVALID, "range_search 9");
    bad.range_search = 8;
    CHECK(kvq_config_check(&bad) == KVQ_OK, "range_search 8");
}

/* Chunked prefill: into an empty cache it is exact attention; a later chunk is at least as
   accurate as appending and attending token by token; on every ISA path; all or nothing. */
static void test_prefill(void) {
    enum { D = 64, H = 2, NQH = 8, T0 = 300, N = 40 };
    const size_t row = (size_t)H * D, qrow = (size_t)NQH * D;
    float *K = (float *)tu_alloc((T0 + N) * row * 4), *V = (float *)tu_alloc((T0 + N) * row * 4);
    float *q = (float *)tu_alloc((T0 + N) * qrow * 4), *out = (float *)tu_alloc(N * qrow * 4);
    float *tok = (float *)tu_alloc(N * qrow * 4);
    double *ref = (double *)tu_alloc((size_t)N * qrow * 8);
    kvq_attn_params ap = {NQH, N, 0.0f}, ap1 = {NQH, 1, 0.0f};
    tu_rng r = {4242};
    int rot, isa, i;
    tu_fill_kv(&r, TU_STRUCTURED, T0 + N, H, D, K, V);
    tu_fill_q(&r, TU_STRUCTURED, (size_t)(T0 + N) * qrow, D, q);
    for (rot = 0; rot <= KVQ_ROTATE_HADAMARD; rot++) {
        kvq_config cfg = kvq_default_config(D, H, T0 + N + 8);
        cfg.rotation = rot;
        /* an empty cache: exact attention over the chunk (fp32 against the double reference) */
        tu_ref_attention(K, V, N, H, D, q, N, NQH, 1.0f / sqrtf((float)D), ref);
        for (isa = KVQ_ISA_SCALAR; isa <= KVQ_ISA_NEON; isa++) {
            kvq_cache *c = NULL;
            if (kvq_set_isa((kvq_isa)isa) != KVQ_OK) continue;
            CHECK(kvq_cache_create(&c, &cfg) == KVQ_OK, "create");
            CHECK(kvq_attention_prefill(c, K, V, N, q, out, &ap) == KVQ_OK && kvq_cache_tokens(c) == N, "prefill");
            CHECK(tu_rel_err(out, ref, (size_t)N * qrow) <= 1e-6, "%s rot %d: prefill into an empty cache %g",
                  kvq_isa_name((kvq_isa)isa), rot, tu_rel_err(out, ref, (size_t)N * qrow));
            kvq_cache_destroy(c);
        }
        kvq_set_isa(KVQ_ISA_SCALAR);
        /* after T0 stored tokens: a chunk of N against token by token, both against exact attention */
        tu_ref_attention(K, V, T0 + N, H, D, q + (size_t)T0 * qrow, N, NQH, 1.0f / sqrtf((float)D), ref);
        {
            kvq_cache *a = NULL, *b = NULL;
            double ea, eb;
            size_t na, nb;
            uint8_t *ia, *ib;
            kvq_cache_create(&a, &cfg);
            kvq_cache_create(&b, &cfg);
            kvq_cache_append(a, K, V, T0);
            kvq_cache_append(b, K, V, T0);
            CHECK(kvq_attention_prefill(a, K + T0 * row, V + T0 * row, N, q + (size_t)T0 * qrow, out, &ap) == KVQ_OK,
                  "prefill a chunk");
            for (i = 0; i < N; i++) {
                kvq_cache_append(b, K + (T0 + i) * row, V + (T0 + i) * row, 1);
                kvq_attention(b, q + (size_t)(T0 + i) * qrow, tok + (size_t)i * qrow, &ap1);
            }
            ea = tu_rel_err(out, ref, (size_t)N * qrow);
            eb = tu_rel_err(tok, ref, (size_t)N * qrow);
            CHECK(ea <= eb, "rot %d: a prefilled chunk %g is less accurate than token by token %g", rot, ea, eb);
            printf("prefill, rotation %d: chunk of %d after %d tokens, error %.3g (token by token %.3g)\n", rot, N, T0,
                   ea, eb);
            /* and the chunk was appended exactly as append would */
            na = kvq_cache_serialized_bytes(a);
            nb = kvq_cache_serialized_bytes(b);
            ia = (uint8_t *)tu_alloc(na);
            ib = (uint8_t *)tu_alloc(nb);
            kvq_cache_serialize(a, ia, na, NULL);
            kvq_cache_serialize(b, ib, nb, NULL);
            CHECK(na == nb && memcmp(ia, ib, na) == 0, "prefill appended other bytes than append");
            free(ia); free(ib);
            kvq_cache_destroy(a);
            kvq_cache_destroy(b);
        }
    }
    { /* refusals change nothing: neither the cache nor out */
        kvq_config cfg = kvq_default_config(D, H, T0 + N - 1);
        kvq_cache *c = NULL;
        float keep;
        kvq_cache_create(&c, &cfg);
        kvq_cache_append(c, K, V, T0);
        memset(out, 0x5a, N * qrow * 4);
        CHECK(kvq_attention_prefill(c, K, V, N, q, out, &ap) == KVQ_ERR_FULL, "past capacity");
        ap.n_queries = N - 1;
        CHECK(kvq_attention_prefill(c, K, V, N - 1, q, out, &ap) == KVQ_OK, "fills to capacity");
        kvq_cache_reset(c);
        ap.n_queries = N;
        CHECK(kvq_attention_prefill(c, K, V, N - 1, q, out, &ap) == KVQ_ERR_INVALID, "n_queries != n_tokens");
        keep = K[5];
        K[5] = NAN;
        memset(out, 0x5a, N * qrow * 4);
        CHECK(kvq_attention_prefill(c, K, V, N, q, out, &ap) == KVQ_ERR_INVALID && kvq_cache_tokens(c) == 0, "NaN key");
        K[5] = keep;
        CHECK(kvq_attention_prefill(c, K, V, N, q, q, &ap) == KVQ_ERR_INVALID, "out == q");
        CHECK(kvq_attention_prefill(c, K, V, N, q, K, &ap) == KVQ_ERR_INVALID, "out over k");
        CHECK(kvq_attention_prefill(NULL, K, V, N, q, out, &ap) == KVQ_ERR_INVALID, "NULL cache");
        {
            size_t b, changed = 0;
            for (b = 0; b < N * qrow * 4; b++) changed += ((unsigned char *)out)[b] != 0x5a;
            CHECK(changed == 0 && kvq_cache_tokens(c) == 0, "a refused prefill wrote %zu bytes of out", changed);
        }
        kvq_cache_destroy(c);
    }
    free(K); free(V); free(q); free(out); free(tok); free(ref);
}

/* 16-bit value params over every magnitude fp16 holds: the scale is finite, the min in range,
   and each element of the group dequantizes within the bound group_bound() states (which
   test_accuracy_grid relies on); ranges near +-65504 exercise the largest scales. */
static void test_params16(void) {
    tu_rng r = {0x16b17u};
    int i, j, bad = 0, bits;
    for (bits = 2; bits <= 8; bits *= 2)
        for (i = 0; i < 4000; i++) {
            float x[32], lo = 0, hi = 0, m, s;
            const double mag = pow(10.0, -6.0 + 10.8 * tu_uniform(&r)); /* 1e-6 .. 6e4 */
            const double off = (tu_uniform(&r) - 0.5) * 2.0 * (i % 3 ? 0.5 : 4.0) * mag;
            kvq__qparams qp;
            for (j = 0; j < 32; j++) {
                double v = off + (tu_uniform(&r) - 0.5) * mag;
                v = v > 65504.0 ? 65504.0 : v < -65504.0 ? -65504.0 : v;
                x[j] = kvq__f16_to_f32(kvq__f32_to_f16((float)v));
                lo = j == 0 || x[j] < lo ? x[j] : lo;
                hi = j == 0 || x[j] > hi ? x[j] : hi;
            }
            qp = kvq__fit(lo, hi, bits, 16);
            kvq__params_f32(qp, 16, &m, &s);
            if (qp.scale > 0xf7u || !(s >= 0.0f) || !isfinite(m)) { bad++; continue; }
            for (j = 0; j < 32; j++) {
                const double xq = (double)m + (double)s * kvq__quantize_one(x[j], m, s, bits);
                if (fabs(xq - x[j]) > group_bound(x, 1, 32, bits, 0, x[j], 16)) bad++;
            }
        }
    CHECK(bad == 0, "%d elements past the bound of 16-bit value params", bad);
    { /* the branch-free scale decoder is the fp16 with bits e << 7, for every scale code */
        unsigned e;
        for (e = 0, bad = 0; e <= 0xf7u; e++) bad += kvq__e5m3(e) != kvq__f16_to_f32((uint16_t)(e << 7));
        CHECK(bad == 0, "%d scale codes decoded unlike their fp16", bad);
    }
    { /* attention's decoder of stored params agrees with the reference for every u16 */
        kvq_config cfg = kvq_default_config(16, 1, 16);
        kvq_cache *c = NULL;
        unsigned v;
        cfg.value_param_bits = 16;
        cfg.group_size = 16;
        bad = 0;
        if (kvq_cache_create(&c, &cfg) == KVQ_OK) {
            for (v = 0; v < 65536; v++) {
                uint16_t par = (uint16_t)v;
                float out[2], m, s;
                kvq__qparams qp;
                if ((v & 0xffu) > 0xf7u) continue; /* not a scale (refused on load) */
                qp.scale = (uint16_t)(v & 0xffu);
                qp.min = (uint16_t)(v >> 8);
                kvq__params_f32(qp, 16, &m, &s);
                kvq__value_params_f32(c, &par, 1, out);
                bad += memcmp(&out[0], &s, 4) != 0 || memcmp(&out[1], &m, 4) != 0;
            }
        }
        CHECK(c && bad == 0, "%d 16-bit params decoded differently by attention", bad);
        kvq_cache_destroy(c);
    }
    { /* groups near +-65504 (the largest scales) at 2 and 3 bits: what append stores, a load accepts
         (at 4 bits a grid of 15 scales from a min near 65504 passed 2 x 65504: refused config) */
        int vb;
        for (vb = 2; vb <= 3; vb++) {
            kvq_config cfg = kvq_default_config(16, 1, 64);
            kvq_cache *c = NULL, *d = NULL;
            float k[16], v[16];
            uint8_t *img = NULL, *mem = NULL;
            size_t n = 0;
            int t, ch;
            cfg.value_bits = vb;
            cfg.value_param_bits = 16;
            cfg.group_size = 16;
            cfg.residual_tokens = 0;
            cfg.sink_tokens = 0;
            if (kvq_cache_create(&c, &cfg) != KVQ_OK) { CHECK(0, "create"); continue; }
            for (t = 0; t < 48; t++) {
                for (ch = 0; ch < 16; ch++) {
                    const float big = t % 3 == 0 ? 65504.0f : t % 3 == 1 ? -65504.0f : 30000.0f;
                    k[ch] = 1.0f;
                    v[ch] = t % 3 == 2 ? big + (float)ch * 2300.0f : big - (float)(ch % 4) * (big > 0 ? 16.0f : -16.0f);
                }
                kvq_cache_append(c, k, v, 1);
            }
            n = kvq_cache_serialized_bytes(c);
            img = (uint8_t *)tu_alloc(n);
            mem = (uint8_t *)tu_alloc(kvq_cache_bytes(&cfg));
            CHECK(kvq_cache_serialize(c, img, n, NULL) == KVQ_OK &&
                      kvq_cache_deserialize(&d, img, n, mem, kvq_cache_bytes(&cfg)) == KVQ_OK,
                  "an image of values near +-65504 with 16-bit params at %d bits loads", vb);
            free(img);
            free(mem);
            kvq_cache_destroy(c);
        }
        {
            kvq_config cfg = kvq_default_config(16, 1, 64);
            kvq_config fp16_params;
            cfg.value_bits = 4;
            cfg.value_param_bits = 16;
            fp16_params = cfg;
            fp16_params.value_param_bits = 32;
            CHECK(kvq_config_check(&cfg) == KVQ_OK && kvq_cache_bytes(&cfg) == kvq_cache_bytes(&fp16_params),
                  "4-bit values keep fp16 params whatever value_param_bits says");
        }
    }
}

int main(int argc, char **argv) {
    if (argc > 1 && strcmp(argv[1], "--report") == 0) {
        report();
        return tu_finish("test_core --report");
    }
    test_fp16();
    test_golden();
    test_planes();
    test_accounting();
    test_errors();
    test_incremental_and_split();
    test_merge_order();
    test_range_search();
    test_params16();
    test_prefill();
    test_accuracy_grid();
    test_shapes();
    test_long_context();
    return tu_finish("test_core");
}
