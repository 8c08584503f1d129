/* Importance-aware mixed precision: salient tokens are kept at salient_bits in a
   side store and left out of their block's ranges. */
#define KVQ_IMPLEMENTATION
#include "../kvq.h"
#include "test_util.h"

static kvq_config salient_config(int D, float ratio, int bits, int policy) {
    kvq_config cfg = kvq_default_config(D, 2, 512);
    cfg.salient_ratio = ratio;
    cfg.salient_bits = bits;
    cfg.salient_policy = policy;
    cfg.key_block = 0;   /* blocks of G, */
    cfg.residual_tokens = 32;
    cfg.sink_tokens = 0; /* so token t sits at block t / G */
    return cfg;
}

/* Salient tokens reconstruct within their 8-bit step (or fp16 rounding at 16 bits). */
static void test_reconstruction(void) {
    int bits;
    for (bits = 8; bits <= 16; bits += 8) {
        kvq_config cfg = salient_config(64, 0.1f, bits, KVQ_SALIENT_ERROR);
        kvq_cache *c = NULL;
        const int T = 300, H = 2, D = 64;
        size_t n = (size_t)T * H * D;
        float *k = (float *)tu_alloc(n * 4), *v = (float *)tu_alloc(n * 4);
        float *kr = (float *)tu_alloc(n * 4), *vr = (float *)tu_alloc(n * 4);
        tu_rng r = {8};
        int b, j, h, ch, bad = 0, count = 0;
        tu_fill_kv(&r, TU_STRUCTURED, T, H, D, k, v);
        CHECK(kvq_cache_create(&c, &cfg) == KVQ_OK, "create");
        if (!c) return;
        CHECK(c->n_salient == 3, "10%% of 32 is 3 per block, got %d", c->n_salient);
        kvq_cache_append(c, k, v, T);
        kvq_cache_read(c, 0, T, kr, vr);
        for (h = 0; h < H; h++)
            for (b = 0; b < c->n_kblocks; b++)
                for (j = 0; j < c->n_salient; j++) {
                    int t = b * 32 + kvq__side_index(kvq__side_entry(c, h, b, j));
                    count++;
                    for (ch = 0; ch < D; ch++) {
                        size_t at = ((size_t)t * H + h) * D + ch;
                        /* 8-bit group of 32 channels: half a step of that group's range */
                        double lo = 1e30, hi = -1e30, tol;
                        int u, c0 = ch / 32 * 32;
                        for (u = c0; u < c0 + 32; u++) {
                            double x = k[((size_t)t * H + h) * D + u];
                            lo = x < lo ? x : lo;
                            hi = x > hi ? x : hi;
                        }
                        tol = bits == 16 ? 4.9e-4 * fabs(k[at]) + 1e-7
                                         : 0.5 * (hi - lo) / 255 * 1.001 + 4.9e-4 * (fabs(lo) + hi - lo + fabs(k[at])) + 1e-6;
                        if (fabs(kr[at] - k[at]) > tol) bad++;
                    }
                }
        CHECK(count == 2 * 9 * 3, "salient tokens: %d (300 tokens, R 32: 9 blocks)", count);
        CHECK(bad == 0, "%d salient key elements outside their %d-bit step", bad, bits);
        kvq_cache_destroy(c);
        free(k); free(v); free(kr); free(vr);
    }
}

/* A block with one huge token quantizes its other tokens as well as a block without it. */
static void test_outlier_token(void) {
    const int D = 32, T = 64;
    kvq_config plain = kvq_default_config(D, 1, T), sal;
    kvq_cache *a = NULL, *b = NULL, *p = NULL;
    float k[64 * 32], v[64 * 32], k2[64 * 32], ra[64 * 32], rb[64 * 32], rp[64 * 32];
    tu_rng r = {3};
    double ea = 0, eb = 0, ep = 0;
    int i, t, ch;
    plain.residual_tokens = 0;
    plain.sink_tokens = 0;
    plain.group_size = 32;
    plain.key_block = 0; /* = G */
    sal = plain;
    sal.salient_ratio = 1.0f / 32;
    sal.salient_policy = KVQ_SALIENT_ERROR;
    for (i = 0; i < T * D; i++) { k[i] = tu_normal(&r); v[i] = tu_normal(&r); }
    memcpy(k2, k, sizeof k);
    for (ch = 0; ch < D; ch++) k2[5 * D + ch] = 400.0f * (ch % 2 ? 1.0f : -1.0f); /* token 5: huge */
    CHECK(kvq_cache_create(&a, &plain) == KVQ_OK && kvq_cache_create(&b, &sal) == KVQ_OK &&
          kvq_cache_create(&p, &plain) == KVQ_OK, "create");
    if (!a || !b || !p) return;
    kvq_cache_append(a, k, v, T);  /* no outlier, plain */
    kvq_cache_append(b, k2, v, T); /* outlier, salient */
    kvq_cache_append(p, k2, v, T); /* outlier, plain */
    kvq_cache_read(a, 0, T, ra, NULL);
    kvq_cache_read(b, 0, T, rb, NULL);
    kvq_cache_read(p, 0, T, rp, NULL);
    for (t = 0; t < 32; t++) {
        if (t == 5) continue;
        for (ch = 0; ch < D; ch++) {
            size_t at = (size_t)t * D + ch;
            ea += (ra[at] - k[at]) * (ra[at] - k[at]);
            eb += (rb[at] - k[at]) * (rb[at] - k[at]);
            ep += (rp[at] - k[at]) * (rp[at] - k[at]);
        }
    }
    CHECK(kvq__find_salient(b, 0, 0, 5) != NULL, "the huge token was not picked");
    CHECK(eb <= ea * 1.0001 + 1e-9, "other tokens: %g with the outlier made salient vs %g without it", eb, ea);
    CHECK(ep > 10 * ea, "the outlier should wreck a plain block (%g vs %g)", ep, ea);
    {
        double e5 = 0;
        for (ch = 0; ch < D; ch++) e5 += (rb[5 * D + ch] - k2[5 * D + ch]) * (rb[5 * D + ch] - k2[5 * D + ch]);
        CHECK(e5 < 1e-2 * 400 * 400 * D, "the salient token itself: %g", e5);
    }
    kvq_cache_destroy(a);
    kvq_cache_destroy(b);
    kvq_cache_destroy(p);
}

/* Both policies give the same bytes for the same calls, however they are made: in a cache
   saved and loaded half-way, then continued; and, with the error policy, on the scalar path
   and on the best ISA compiled in (whose quantize kernels differ in code). The attention
   policy's scores are sums of softmax probabilities from the ISA's attention kernels, which
   may reorder sums: they agree across paths only to rounding (tested below, test_scores). */
static void test_determinism(void) {
    int policy;
    for (policy = 0; policy < 2; policy++) {
        kvq_config cfg = salient_config(32, 0.1f, 8, policy);
        kvq_cache *a = NULL, *b = NULL, *l = NULL;
        const int T = 200;
        float *k = (float *)tu_alloc((size_t)T * 64 * 4), *v = (float *)tu_alloc((size_t)T * 64 * 4);
        float q[4 * 32], o[4 * 32];
        kvq_attn_params ap = {4, 1, 0.0f};
        kvq_isa best;
        tu_rng r = {12};
        size_t na, nb, nl;
        uint8_t *ia, *ib, *il, *mem = (uint8_t *)tu_alloc(kvq_cache_bytes(&cfg));
        int t, isa;
        for (isa = KVQ_ISA_SCALAR; isa <= KVQ_ISA_NEON; isa++) kvq_set_isa((kvq_isa)isa);
        best = kvq_get_isa();
        tu_fill_kv(&r, TU_STRUCTURED, T, 2, 32, k, v);
        tu_fill_q(&r, TU_STRUCTURED, 4 * 32, 32, q);
        kvq_cache_create(&a, &cfg);
        kvq_cache_create(&b, &cfg);
        for (t = 0; t < T; t++) {
            kvq_set_isa(KVQ_ISA_SCALAR);
            kvq_cache_append(a, k + (size_t)t * 64, v + (size_t)t * 64, 1);
            kvq_attention(a, q, o, &ap);
            kvq_set_isa(best);
            kvq_cache_append(b, k + (size_t)t * 64, v + (size_t)t * 64, 1);
            kvq_attention(b, q, o, &ap);
            if (t == T / 2) { /* save b, load it, continue the copy alongside */
                nl = kvq_cache_serialized_bytes(b);
                il = (uint8_t *)tu_alloc(nl);
                kvq_cache_serialize(b, il, nl, NULL);
                CHECK(kvq_cache_deserialize(&l, il, nl, mem, kvq_cache_bytes(&cfg)) == KVQ_OK, "load half-way");
                free(il);
            } else if (l && t > T / 2) {
                kvq_cache_append(l, k + (size_t)t * 64, v + (size_t)t * 64, 1);
                kvq_attention(l, q, o, &ap);
            }
        }
        na = kvq_cache_serialized_bytes(a);
        nb = kvq_cache_serialized_bytes(b);
        nl = l ? kvq_cache_serialized_bytes(l) : 0;
        ia = (uint8_t *)tu_alloc(na);
        ib = (uint8_t *)tu_alloc(nb);
        il = (uint8_t *)tu_alloc(nl + 1);
        kvq_cache_serialize(a, ia, na, NULL);
        kvq_cache_serialize(b, ib, nb, NULL);
        if (l) kvq_cache_serialize(l, il, nl, NULL);
        if (policy == KVQ_SALIENT_ERROR)
            CHECK(na == nb && memcmp(ia, ib, na) == 0, "policy %d: scalar and %s caches differ", policy,
                  kvq_isa_name(best));
        CHECK(nl == nb && memcmp(il, ib, nb) == 0, "policy %d: the cache loaded half-way went on differently", policy);
        kvq_cache_destroy(a);
        kvq_cache_destroy(b);
        free(ia); free(ib); free(il); free(k); free(v); free(mem);
    }
}

/* Equal importance goes to the older token: two tokens of a block that each alone stretch one
   channel's range by the same share tie under the error policy, and the first is kept. */
static void test_ties(void) {
    kvq_config cfg = salient_config(16, 0.03f, 8, KVQ_SALIENT_ERROR); /* one salient token of 32 */
    kvq_cache *c = NULL;
    float k[64 * 2 * 16], v[64 * 2 * 16];
    int t, ch, h;
    cfg.group_size = 32;
    for (t = 0; t < 64; t++)
        for (h = 0; h < 2; h++)
            for (ch = 0; ch < 16; ch++) {
                float x = 0.0f;
                if (t == 9 && ch == 0) x = 10.0f; /* gain (10 - 0) / 10 = 1 in channel 0 */
                if (t == 3 && ch == 1) x = 10.0f; /* and the same in channel 1 */
                k[(t * 2 + h) * 16 + ch] = x;
                v[(t * 2 + h) * 16 + ch] = 0.5f;
            }
    CHECK(kvq_cache_create(&c, &cfg) == KVQ_OK && kvq_cache_append(c, k, v, 64) == KVQ_OK, "build");
    if (!c) return;
    CHECK(c->n_kblocks >= 1 && c->n_salient == 1, "one block, one salient token");
    for (h = 0; h < 2; h++)
        CHECK(kvq__side_index(kvq__side_entry(c, h, 0, 0)) == 3, "head %d kept token %d of a tie, not the older 3", h,
              kvq__side_index(kvq__side_entry(c, h, 0, 0)));
    kvq_cache_destroy(c);
}

/* A partial call whose token range starts inside a salient block, with fp16 keys (scores of
   the tile then start at the tile, not the block): merged, it equals kvq_attention up to float
   rounding. On the float kernels: the integer ones quantize softmax weights per run from a tile's
   start, and a range that starts inside a tile runs other runs. */
static void test_partial_inside_block(void) {
    kvq_config cfg = salient_config(32, 0.2f, 16, KVQ_SALIENT_ERROR);
    const int T = 200, NQH = 4;
    kvq_cache *c = NULL;
    float *k = (float *)tu_alloc((size_t)T * 64 * 4), *v = (float *)tu_alloc((size_t)T * 64 * 4);
    float q[4 * 32], ref[4 * 32], out[4 * 32], *sa, *sb;
    const float *st[2];
    kvq_attn_params ap = {NQH, 1, 0.0f};
    tu_rng r = {77};
    size_t sf;
    int cut, i;
    cfg.key_bits = 16;
    cfg.group_size = 16;
    cfg.residual_tokens = 16;
    tu_fill_kv(&r, TU_STRUCTURED, T, 2, 32, k, v);
    tu_fill_q(&r, TU_STRUCTURED, 4 * 32, 32, q);
    CHECK(kvq_cache_create(&c, &cfg) == KVQ_OK && kvq_cache_append(c, k, v, T) == KVQ_OK, "build");
    if (!c) return;
    kvq_set_arith(KVQ_ARITH_FLOAT);
    CHECK(kvq_attention(c, q, ref, &ap) == KVQ_OK, "attention");
    sf = kvq_attention_state_floats(c, &ap);
    sa = (float *)tu_alloc(sf * 4);
    sb = (float *)tu_alloc(sf * 4);
    for (cut = 1; cut < 60; cut += 7) { /* inside blocks 0 to 3 */
        double e = 0, n = 0;
        CHECK(kvq_attention_partial(c, q, &ap, 0, cut, 0, 2, sa) == KVQ_OK, "partial [0, %d)", cut);
        CHECK(kvq_attention_partial(c, q, &ap, cut, T, 0, 2, sb) == KVQ_OK, "partial [%d, T)", cut);
        st[0] = sa;
        st[1] = sb;
        CHECK(kvq_attention_merge(c, &ap, st, 2, out) == KVQ_OK, "merge");
        for (i = 0; i < 4 * 32; i++) {
            e += (out[i] - ref[i]) * (out[i] - ref[i]);
            n += ref[i] * ref[i];
        }
        CHECK(e <= 1e-10 * n, "split at %d: %g", cut, e / n);
    }
    kvq_set_arith(KVQ_ARITH_AUTO);
    kvq_cache_destroy(c);
    free(k); free(v); free(sa); free(sb);
}

/* Scores: with GQA and several queries, each query adds the probability its heads gave
   a waiting token, and counts once. Checked against the exact softmax. */
static void test_scores(int NQH) {
    const int D = 16, H = 2, NQ = 3, T = 40;
    kvq_config cfg = kvq_default_config(D, H, 256);
    kvq_cache *c = NULL;
    float k[40 * 2 * 16], v[40 * 2 * 16], q[3 * 24 * 16], o[3 * 24 * 16];
    double expect[2][40], seen[40];
    kvq_attn_params ap = {NQH, NQ, 0.0f};
    tu_rng r = {21};
    int i, h, qh, t, ch, bad = 0;
    cfg.salient_ratio = 0.1f;
    cfg.residual_tokens = 64;
    cfg.sink_tokens = 0;
    for (i = 0; i < 40 * 2 * 16; i++) { k[i] = tu_normal(&r); v[i] = tu_normal(&r); }
    for (i = 0; i < NQ * NQH * D; i++) q[i] = tu_normal(&r);
    CHECK(kvq_cache_create(&c, &cfg) == KVQ_OK, "create");
    if (!c) return;
    kvq_cache_append(c, k, v, T);
    CHECK(kvq_attention(c, q, o, &ap) == KVQ_OK, "attention");
    memset(expect, 0, sizeof expect);
    memset(seen, 0, sizeof seen);
    for (i = 0; i < NQ; i++) {
        int limit = T - NQ + i + 1;
        for (t = 0; t < limit; t++) seen[t] += 1;
        for (qh = 0; qh < NQH; qh++) {
            double s[40], mx = -1e30, l = 0;
            h = qh / (NQH / H);
            for (t = 0; t < limit; t++) {
                double d = 0;
                for (ch = 0; ch < D; ch++)
                    d += (double)q[((size_t)i * NQH + qh) * D + ch] *
                         kvq__f16_to_f32(kvq__f32_to_f16(k[((size_t)t * H + h) * D + ch]));
                s[t] = d / 4.0;
                mx = s[t] > mx ? s[t] : mx;
            }
            for (t = 0; t < limit; t++) l += exp(s[t] - mx);
            for (t = 0; t < limit; t++) expect[h][t] += exp(s[t] - mx) / l;
        }
    }
    for (h = 0; h < H; h++)
        for (t = 0; t < T; t++) {
            size_t slot = (size_t)h * c->kcap + (size_t)t;
            if (c->sal_seen[slot] != (uint32_t)seen[t] || fabs(c->sal_score[slot] - expect[h][t]) > 1e-5) bad++;
        }
    CHECK(bad == 0, "%d waiting tokens with a wrong score or count (%d query heads)", bad, NQH);
    kvq_cache_destroy(c);
}

static void test_bad_config(void) {
    kvq_config cfg = salient_config(32, 0.1f, 8, 0);
    CHECK(kvq_config_check(&cfg) == KVQ_OK, "valid");
    cfg.salient_ratio = 1.0f;
    CHECK(kvq_config_check(&cfg) == KVQ_ERR_INVALID, "ratio 1");
    cfg.salient_ratio = -0.5f;
    CHECK(kvq_config_check(&cfg) == KVQ_ERR_INVALID, "ratio < 0");
    cfg.salient_ratio = 0.1f;
    cfg.salient_bits = 4;
    CHECK(kvq_config_check(&cfg) == KVQ_ERR_INVALID, "bits 4");
    cfg.salient_bits = 8;
    cfg.salient_policy = 7;
    CHECK(kvq_config_check(&cfg) == KVQ_ERR_INVALID, "policy 7");
}

/* Accounting: the side store counts, index and scales included. */
static void test_accounting(void) {
    kvq_config cfg = kvq_default_config(128, 8, 4096);
    kvq_cache *c = NULL;
    float *k = (float *)tu_alloc(4096 * 8 * 128 * 4), *v = (float *)tu_alloc(4096 * 8 * 128 * 4);
    tu_rng r = {1};
    size_t i, expect;
    cfg.salient_ratio = 0.1f;
    cfg.sink_tokens = 0;
    for (i = 0; i < 4096u * 8 * 128; i++) { k[i] = tu_normal(&r); v[i] = tu_normal(&r); }
    kvq_cache_create(&c, &cfg);
    kvq_cache_append(c, k, v, 4096);
    /* 4096 tokens: 124 blocks (3968) + 128 waiting; 3 salient per block of 2 + 8*4 + 256 bytes */
    expect = 8 * (124 * (size_t)(512 + 1024) + 128 * 256 + 3968 * (size_t)(16 + 32) + 128 * 256 + 124 * 3 * 290);
    CHECK(kvq_cache_payload_bytes(c) == expect, "payload %zu, expected %zu", kvq_cache_payload_bytes(c), expect);
    kvq_cache_destroy(c);
    free(k);
    free(v);
}

/* The fused kernels (block codes, then the side-store patch-up, or per-token keys) equal exact
   attention over what kvq_cache_read() reconstructs, on every ISA compiled in: GQA, several
   queries, tiles that start inside a block (sinks), salient tokens at 8 and 16 bits. */
static void test_fused_matches_read(void) {
    static const int shapes[][5] = { /* D, G, salient %, salient bits, per-token keys */
        {64, 32, 10, 8, 0}, {64, 32, 25, 16, 0}, {128, 16, 5, 8, 0}, {80, 64, 10, 8, 0},
        {96, 128, 5, 16, 0}, {64, 32, 0, 8, 1}, {72, 16, 0, 8, 1}};
    const int T = 700, H = 2, NQH = 6, NQ = 3;
    int sh, isa;
    for (sh = 0; sh < (int)(sizeof shapes / sizeof shapes[0]); sh++) {
        const int D = shapes[sh][0];
        kvq_config cfg = salient_config(D, (float)shapes[sh][2] / 100.0f, shapes[sh][3], KVQ_SALIENT_ERROR);
        kvq_attn_params ap = {NQH, NQ, 0.0f};
        size_t n = (size_t)T * H * D, nout = (size_t)NQ * NQH * D;
        float *k = (float *)tu_alloc(n * 4), *v = (float *)tu_alloc(n * 4), *kr = (float *)tu_alloc(n * 4);
        float *vr = (float *)tu_alloc(n * 4), *q = (float *)tu_alloc(nout * 4), *out = (float *)tu_alloc(nout * 4);
        double *ref = (double *)tu_alloc(nout * sizeof(double));
        kvq_cache *c = NULL;
        tu_rng r = {40 + (uint64_t)sh};
        cfg.max_tokens = T;
        cfg.group_size = shapes[sh][1];
        cfg.residual_tokens = shapes[sh][1] > 32 ? 128 : 32; /* a multiple of G */
        cfg.sink_tokens = 3;
        cfg.key_bits = 2;
        cfg.value_bits = 3;
        if (shapes[sh][4]) cfg.key_axis = KVQ_KEYS_PER_TOKEN;
        tu_fill_kv(&r, TU_STRUCTURED, T, H, D, k, v);
        tu_fill_q(&r, TU_STRUCTURED, nout, D, q);
        CHECK(kvq_cache_create(&c, &cfg) == KVQ_OK && kvq_cache_append(c, k, v, T) == KVQ_OK, "shape %d", sh);
        if (c && kvq_cache_read(c, 0, T, kr, vr) == KVQ_OK) {
            tu_ref_attention(kr, vr, T, H, D, q, NQ, NQH, 1.0f / sqrtf((float)D), ref);
            for (isa = KVQ_ISA_SCALAR; isa <= KVQ_ISA_NEON; isa++) {
                double e;
                if (kvq_set_isa((kvq_isa)isa) != KVQ_OK) continue;
                kvq_set_arith(KVQ_ARITH_FLOAT); /* exact up to float rounding */
                CHECK(kvq_attention(c, q, out, &ap) == KVQ_OK, "attention");
                e = tu_rel_err(out, ref, nout);
                CHECK(e < 1e-9, "shape %d on %s: fused vs reconstructed %g", sh, kvq_isa_name((kvq_isa)isa), e);
                kvq_set_arith(KVQ_ARITH_INTEGER); /* the integer scheme's contract: squared error <= 1e-4 */
                CHECK(kvq_attention(c, q, out, &ap) == KVQ_OK, "attention");
                e = tu_rel_err(out, ref, nout);
                CHECK(e <= 1e-4, "shape %d on %s: integer fused vs reconstructed %g", sh, kvq_isa_name((kvq_isa)isa), e);
            }
            kvq_set_arith(KVQ_ARITH_AUTO);
            kvq_set_isa(KVQ_ISA_SCALAR);
        }
        kvq_cache_destroy(c);
        free(k); free(v); free(kr); free(vr); free(q); free(out); free(ref);
    }
}

int main(void) {
    test_bad_config();
    test_reconstruction();
    test_outlier_token();
    test_determinism();
    test_ties();
    test_partial_inside_block();
    test_scores(6);
    test_scores(24); /* a GQA group of 12: two chunks of query heads, each query counted once */
    test_accounting();
    test_fused_matches_read();
    return tu_finish("test_salient");
}
