/* Runtime operations: kvq_cache_truncate and kvq_cache_copy, on every ISA path compiled in.
   - rollback: random appends and attention calls, truncations within the rollback history;
     after each, the cache must equal one built afresh from what was kept (the appends of the
     kept tokens and the attention calls made before the first cut token was appended): the
     same image bytes, reads and attention outputs (memcmp), and the same again later;
   - deep cuts (past the history, after a load): kept tokens within fp16 rounding of before,
     the state loadable, appending and attention as accurate as in a cache never cut;
   - copy: exact where the cut is, fork then diverge, growth into a larger capacity;
   - refusals: status returned and not a byte of either cache changed;
   - the memory the history costs. */
#define KVQ_IMPLEMENTATION
#include "../kvq.h"
#include "test_util.h"

#ifdef __aarch64__
#define STEPS 90 /* qemu is slow */
#else
#define STEPS 200
#endif

enum { OP_APPEND, OP_ATTN };
typedef struct op { int kind, first, n; uint64_t seed; } op; /* tokens [first, first+n), or n queries */

/* A cache under test, the tokens it holds (those cut stay until overwritten) and the history
   of a cache that never saw the cut tokens: what a fresh cache replays to be its twin. */
typedef struct run {
    kvq_config cfg;
    kvq_cache *c;
    float *K, *V;
    op ops[4096];
    int n_ops, hist, nqh;
    tu_rng rng;
} run;

static int isas[4], n_isas;
static double worst_ratio; /* attention error after a deep cut over the cache's never cut */

typedef struct shape {
    int kb, vb, G, key_block, pbits, sal_pct, sal_bits, policy, per_token, rot, S, R, RB, D, H, search, cap;
} shape;

static const shape shapes[] = {
    /* kb vb  G  KB pb sal sb pol tok rot S   R  RB   D  H srch cap */
    {2, 2, 32, 0, 32, 0, 8, 0, 0, 0, 4, 32, 16, 64, 2, 4, 240},
    {3, 3, 16, 32, 32, 0, 8, 0, 0, 0, 0, 32, 8, 32, 2, 4, 240},
    {4, 2, 32, 16, 16, 0, 8, 0, 0, 0, 3, 0, 5, 64, 1, 4, 240},
    {8, 8, 16, 0, 32, 0, 8, 0, 0, 0, 2, 16, 16, 48, 2, 4, 240},
    {16, 16, 32, 0, 32, 0, 8, 0, 0, 0, 4, 32, 12, 32, 2, 4, 240},
    {2, 16, 32, 0, 32, 0, 8, 0, 0, 1, 4, 32, 16, 64, 2, 4, 240},
    {16, 3, 16, 0, 16, 0, 8, 0, 0, 0, 1, 0, 9, 40, 2, 0, 240},
    {2, 2, 32, 0, 32, 13, 8, 0, 0, 0, 4, 32, 16, 64, 2, 4, 240},
    {2, 2, 32, 0, 32, 13, 16, 1, 0, 0, 0, 0, 7, 32, 2, 4, 240},
    {3, 2, 32, 16, 16, 20, 8, 0, 0, 1, 2, 0, 16, 64, 2, 4, 240},
    {4, 4, 16, 0, 32, 10, 16, 0, 0, 0, 0, 16, 4, 32, 1, 0, 240},
    {2, 3, 16, 32, 16, 10, 8, 1, 0, 0, 3, 32, 10, 48, 2, 4, 240},
    {2, 2, 32, 0, 32, 0, 8, 0, 1, 0, 4, 32, 9, 64, 2, 4, 240},
    {4, 8, 16, 0, 32, 0, 8, 0, 1, 1, 0, 0, 3, 32, 2, 4, 240}, /* 16-bit params: not for 8-bit values */
    {2, 2, 16, 0, 32, 0, 8, 0, 0, 0, 0, 0, 1, 16, 1, 4, 240},
    {2, 2, 32, 0, 32, 0, 8, 0, 0, 0, 4, 32, 16, 32, 1, 4, 60}, /* rings as long as the capacity */
};

static kvq_config shape_config(const shape *s) {
    kvq_config cfg = kvq_default_config(s->D, s->H, s->cap);
    cfg.key_bits = s->kb;
    cfg.value_bits = s->vb;
    cfg.group_size = s->G;
    cfg.key_block = s->key_block;
    cfg.value_param_bits = s->pbits;
    cfg.salient_ratio = (float)s->sal_pct / 100.0f;
    cfg.salient_bits = s->sal_bits;
    cfg.salient_policy = s->policy;
    cfg.key_axis = s->per_token ? KVQ_KEYS_PER_TOKEN : KVQ_KEYS_PER_CHANNEL;
    cfg.rotation = s->rot;
    cfg.sink_tokens = s->S;
    cfg.residual_tokens = s->R;
    cfg.rollback_tokens = s->RB;
    cfg.range_search = s->search;
    return cfg;
}

static size_t row_floats(const kvq_config *cfg) { return (size_t)cfg->n_kv_heads * cfg->head_dim; }

static void fill_q(const kvq_config *cfg, int nqh, uint64_t seed, int nq, float *q) {
    tu_rng r;
    size_t i;
    r.s = seed | 1u;
    for (i = 0; i < (size_t)nq * nqh * cfg->head_dim; i++) q[i] = tu_normal(&r);
}

/* One attention call of nq queries from seed; out receives the output. */
static int attend(kvq_cache *c, int nqh, uint64_t seed, int nq, float *out) {
    kvq_attn_params ap;
    float *q = (float *)tu_alloc((size_t)nq * nqh * c->cfg.head_dim * sizeof(float));
    int ok;
    ap.n_q_heads = nqh;
    ap.n_queries = nq;
    ap.scale = 0.0f;
    fill_q(&c->cfg, nqh, seed, nq, q);
    ok = kvq_attention(c, q, out, &ap) == KVQ_OK;
    free(q);
    return ok;
}

static uint8_t *image(const kvq_cache *c, size_t *n) {
    uint8_t *img;
    *n = kvq_cache_serialized_bytes(c);
    img = (uint8_t *)tu_alloc(*n);
    if (kvq_cache_serialize(c, img, *n, NULL) != KVQ_OK) *n = 0;
    return img;
}

/* The same tokens, payload bytes and reads (configs may differ in capacity and history). */
static int same_state(const kvq_cache *a, const kvq_cache *b) {
    size_t na, nb, n = (size_t)a->n_tokens * row_floats(&a->cfg);
    uint8_t *ia = image(a, &na), *ib = image(b, &nb);
    float *ka = (float *)tu_alloc(n * 4 + 4), *va = (float *)tu_alloc(n * 4 + 4);
    float *kb = (float *)tu_alloc(n * 4 + 4), *vb = (float *)tu_alloc(n * 4 + 4);
    int ok = na && na == nb && a->n_tokens == b->n_tokens && !memcmp(ia + KVQ__HEADER_BYTES, ib + KVQ__HEADER_BYTES,
                                                                      na - KVQ__HEADER_BYTES);
    if (ok && a->n_tokens) {
        ok = kvq_cache_read(a, 0, a->n_tokens, ka, va) == KVQ_OK && kvq_cache_read(b, 0, b->n_tokens, kb, vb) == KVQ_OK;
        ok = ok && !memcmp(ka, kb, n * 4) && !memcmp(va, vb, n * 4);
    }
    free(ia); free(ib); free(ka); free(va); free(kb); free(vb);
    return ok;
}

/* A fresh cache of cfg that replays ops: the twin of a cache that never saw the cut tokens. */
static kvq_cache *replay(const kvq_config *cfg, const run *r) {
    kvq_cache *c = NULL;
    float *out = (float *)tu_alloc((size_t)3 * r->nqh * cfg->head_dim * sizeof(float));
    size_t row = row_floats(cfg);
    int i, ok = kvq_cache_create(&c, cfg) == KVQ_OK;
    for (i = 0; ok && i < r->n_ops; i++) {
        const op *o = &r->ops[i];
        if (o->kind == OP_APPEND) ok = kvq_cache_append(c, r->K + row * o->first, r->V + row * o->first, o->n) == KVQ_OK;
        else ok = attend(c, r->nqh, o->seed, o->n, out);
    }
    free(out);
    if (!ok) { kvq_cache_destroy(c); return NULL; }
    return c;
}

static void log_op(run *r, int kind, int first, int n, uint64_t seed) {
    op *o = &r->ops[r->n_ops++];
    KVQ_ASSERT(r->n_ops <= (int)(sizeof r->ops / sizeof r->ops[0]));
    o->kind = kind;
    o->first = first;
    o->n = n;
    o->seed = seed;
}

/* Appends n fresh tokens (new data where cut tokens were). */
static int run_append(run *r, int n) {
    size_t row = row_floats(&r->cfg), i, t = (size_t)r->c->n_tokens;
    for (i = t * row; i < (t + n) * row; i++) {
        r->K[i] = tu_normal(&r->rng);
        r->V[i] = tu_normal(&r->rng);
    }
    if (kvq_cache_append(r->c, r->K + t * row, r->V + t * row, n) != KVQ_OK) return 0;
    log_op(r, OP_APPEND, (int)t, n, 0);
    r->hist = r->hist + n < r->cfg.rollback_tokens ? r->hist + n : r->cfg.rollback_tokens;
    return 1;
}

static int run_attend(run *r, int nq, float *out) {
    uint64_t seed = tu_next(&r->rng);
    if (!attend(r->c, r->nqh, seed, nq, out)) return 0;
    log_op(r, OP_ATTN, 0, nq, seed);
    return 1;
}

/* What the twin keeps of the history: everything before the append of token n. */
static void cut_ops(run *r, int n) {
    int i;
    for (i = 0; i < r->n_ops; i++) {
        op *o = &r->ops[i];
        if (o->kind != OP_APPEND || o->first + o->n <= n) continue;
        if (o->first < n) o->n = n - o->first, i++;
        break;
    }
    r->n_ops = i;
}

static void run_init(run *r, const kvq_config *cfg, uint64_t seed) {
    memset(r, 0, sizeof *r);
    r->cfg = *cfg;
    r->nqh = 2 * cfg->n_kv_heads;
    r->rng.s = seed;
    r->K = (float *)tu_alloc((size_t)cfg->max_tokens * row_floats(cfg) * sizeof(float));
    r->V = (float *)tu_alloc((size_t)cfg->max_tokens * row_floats(cfg) * sizeof(float));
    if (kvq_cache_create(&r->c, cfg) != KVQ_OK) r->c = NULL;
}

static void run_free(run *r) {
    kvq_cache_destroy(r->c);
    free(r->K);
    free(r->V);
}

/* The cache under test against its twin: state, then one more attention call on both (kept
   in the history: it is made after the cut). */
static int check_twin(run *r, float *out, float *out2) {
    kvq_cache *twin = replay(&r->cfg, r);
    uint64_t seed = tu_next(&r->rng);
    size_t n = (size_t)r->nqh * r->cfg.head_dim * sizeof(float);
    int ok = twin && same_state(r->c, twin);
    if (ok && r->c->n_tokens) {
        ok = attend(r->c, r->nqh, seed, 1, out) && attend(twin, r->nqh, seed, 1, out2) && !memcmp(out, out2, n);
        log_op(r, OP_ATTN, 0, 1, seed);
        ok = ok && same_state(r->c, twin);
    }
    kvq_cache_destroy(twin);
    return ok;
}

/* Random appends (single tokens mostly, as decoding; some chunks, as prefill and drafts),
   attention calls, and rollbacks within the history, each checked against a fresh twin. */
static void test_rollback(const shape *s, kvq_isa isa) {
    kvq_config cfg = shape_config(s);
    float *out = (float *)tu_alloc((size_t)3 * 2 * s->H * s->D * sizeof(float));
    float *out2 = (float *)tu_alloc((size_t)3 * 2 * s->H * s->D * sizeof(float));
    int step, cuts = 0, bad = 0, fails = 0;
    run r;
    run_init(&r, &cfg, 0x7275ull * 1000003u + (uint64_t)(s - shapes) * 7919u + (uint64_t)isa);
    CHECK(r.c != NULL, "create");
    for (step = 0; r.c && step < STEPS; step++) {
        const int T = r.c->n_tokens, room = cfg.max_tokens - T, pick = (int)(tu_next(&r.rng) % 10);
        if (room == 0) { /* full: roll back what the history allows, or start again */
            if (r.hist) {
                fails += kvq_cache_truncate(r.c, T - r.hist) != KVQ_OK;
                cut_ops(&r, T - r.hist);
                r.hist = 0;
            } else {
                kvq_cache_reset(r.c);
                r.n_ops = 0;
            }
            bad += !check_twin(&r, out, out2);
        } else if (pick < 4) {
            int n = tu_next(&r.rng) % 5 ? 1 + (int)(tu_next(&r.rng) % 3) : 1 + (int)(tu_next(&r.rng) % 40);
            fails += !run_append(&r, n < room ? n : room);
        } else if (pick < 7 && T > 0) {
            fails += !run_attend(&r, 1 + (int)(tu_next(&r.rng) % (T < 3 ? T : 3)), out);
        } else {
            const int most = r.hist < T ? r.hist : T, cut = most ? (int)(tu_next(&r.rng) % (most + 1)) : 0;
            fails += kvq_cache_truncate(r.c, T - cut) != KVQ_OK || r.c->n_tokens != T - cut;
            r.hist -= cut;
            cut_ops(&r, T - cut);
            bad += !check_twin(&r, out, out2);
            cuts += cut > 0;
        }
    }
    if (r.c) bad += !check_twin(&r, out, out2);
    CHECK(fails == 0, "%s shape %d: %d calls failed", kvq_isa_name(isa), (int)(s - shapes), fails);
    CHECK(bad == 0 && cuts > 3, "%s shape %d: %d rollbacks differ from the twin (%d cuts)", kvq_isa_name(isa),
          (int)(s - shapes), bad, cuts);
    run_free(&r);
    free(out);
    free(out2);
}

/* Rows of [n][H][D] within fp16 rounding of ref: ||a - ref|| <= 2^-10 ||ref|| per head row
   (rounding in rotated space moves a row by at most 2^-11 of its norm). */
static int within_fp16(const float *a, const float *ref, size_t rows, int D) {
    size_t r;
    int i;
    for (r = 0; r < rows; r++) {
        double e = 0.0, m = 0.0;
        for (i = 0; i < D; i++) {
            double d = (double)a[r * D + i] - ref[r * D + i];
            e += d * d;
            m += (double)ref[r * D + i] * ref[r * D + i];
        }
        if (sqrt(e) > sqrt(m) / 1024.0 + 1e-6) return 0;
    }
    return 1;
}

/* Attention error of c (holding tokens [0, T) of K, V) against exact attention, one query. */
static double attention_error(kvq_cache *c, const float *K, const float *V, int nqh, uint64_t seed) {
    const int D = c->cfg.head_dim, T = c->n_tokens;
    float *q = (float *)tu_alloc((size_t)nqh * D * 4), *out = (float *)tu_alloc((size_t)nqh * D * 4);
    double *ref = (double *)tu_alloc((size_t)nqh * D * 8), e;
    kvq_attn_params ap;
    ap.n_q_heads = nqh;
    ap.n_queries = 1;
    ap.scale = 0.0f;
    fill_q(&c->cfg, nqh, seed, 1, q);
    e = kvq_attention(c, q, out, &ap) == KVQ_OK ? 0.0 : 1e30;
    tu_ref_attention(K, V, T, c->cfg.n_kv_heads, D, q, 1, nqh, 1.0f / sqrtf((float)D), ref);
    e += tu_rel_err(out, ref, (size_t)nqh * D);
    free(q); free(out); free(ref);
    return e;
}

/* Builds a cache of tokens [0, T) of K, V: appends of 5 with an attention call after each
   (so salience is recorded where the config records it). */
static kvq_cache *build_attended(const kvq_config *cfg, const float *K, const float *V, int T, int nqh, float *out) {
    const size_t row = row_floats(cfg);
    kvq_cache *c = NULL;
    int i, ok = kvq_cache_create(&c, cfg) == KVQ_OK;
    for (i = 0; ok && i < T; i += 5) {
        ok = kvq_cache_append(c, K + row * i, V + row * i, T - i < 5 ? T - i : 5) == KVQ_OK;
        ok = ok && attend(c, nqh, 99 + (uint64_t)i, 1, out);
    }
    if (!ok) { kvq_cache_destroy(c); return NULL; }
    return c;
}

/* Cuts past the history: kept tokens read back within fp16 rounding of before (sinks and
   the records kept exactly), the state loads, and appending the same tokens again attends
   about as accurately as in the cache never cut. */
static void test_deep(const shape *s, kvq_isa isa) {
    kvq_config cfg = shape_config(s);
    const int T = cfg.max_tokens < 300 ? cfg.max_tokens : 300, nqh = 2 * s->H;
    const size_t row = row_floats(&cfg);
    float *K = (float *)tu_alloc(T * row * 4), *V = (float *)tu_alloc(T * row * 4);
    float *Kb = (float *)tu_alloc(T * row * 4), *Vb = (float *)tu_alloc(T * row * 4);
    float *Ka = (float *)tu_alloc(T * row * 4), *Va = (float *)tu_alloc(T * row * 4);
    float *out = (float *)tu_alloc((size_t)nqh * s->D * 4);
    kvq_cache *c, *whole;
    tu_rng rng;
    int cuts[6], k, bad_read = 0, bad_acc = 0, bad_load = 0, exact_kept = 1;
    double worst = 0.0, e_whole;
    rng.s = 0xdee9ull + (uint64_t)(s - shapes);
    tu_fill_kv(&rng, TU_STRUCTURED, T, s->H, s->D, K, V);
    cuts[0] = T - cfg.rollback_tokens - 1; /* just past the history */
    cuts[1] = T / 2 + 7;
    cuts[2] = T / 3;
    cuts[3] = cfg.sink_tokens + 1;
    cuts[4] = cfg.sink_tokens > 1 ? 1 : 0; /* into the sinks */
    cuts[5] = 0;
    whole = build_attended(&cfg, K, V, T, nqh, out);
    CHECK(whole && kvq_cache_read(whole, 0, T, Kb, Vb) == KVQ_OK, "build");
    e_whole = whole ? attention_error(whole, K, V, nqh, 7) : 1.0;
    for (k = 0; whole && k < 6; k++) {
        const int n = cuts[k] < 0 ? 0 : cuts[k];
        double e_cut;
        size_t ni;
        uint8_t *img, *mem;
        kvq_cache *l = NULL;
        c = build_attended(&cfg, K, V, T, nqh, out); /* the twin of whole, before its last call */
        CHECK(c && kvq_cache_truncate(c, n) == KVQ_OK && kvq_cache_tokens(c) == n, "deep cut to %d", n);
        if (!c) break;
        if (n) {
            kvq_cache_read(c, 0, n, Ka, Va);
            bad_read += !within_fp16(Ka, Kb, (size_t)n * s->H, s->D) || !within_fp16(Va, Vb, (size_t)n * s->H, s->D);
            /* sinks and the records the cut kept: as stored */
            ni = (size_t)(n < cfg.sink_tokens + kvq__keys_quantized(c) ? n : cfg.sink_tokens + kvq__keys_quantized(c));
            exact_kept &= !memcmp(Ka, Kb, ni * row * 4);
            ni = (size_t)(n < cfg.sink_tokens + c->n_vquant ? n : cfg.sink_tokens + c->n_vquant);
            exact_kept &= !memcmp(Va, Vb, ni * row * 4);
        }
        /* a state appending could have made: its image loads, into the same bytes */
        img = image(c, &ni);
        mem = (uint8_t *)tu_alloc(kvq_cache_bytes(&cfg));
        bad_load += kvq_cache_deserialize(&l, img, ni, mem, kvq_cache_bytes(&cfg)) != KVQ_OK || !same_state(c, l);
        free(img);
        free(mem);
        /* appending goes on: the same tokens again, attention about as accurate as never cut */
        CHECK(kvq_cache_append(c, K + row * n, V + row * n, T - n) == KVQ_OK, "append after the cut");
        e_cut = attention_error(c, K, V, nqh, 7);
        worst = e_cut / (e_whole + 1e-9) > worst ? e_cut / (e_whole + 1e-9) : worst;
        bad_acc += !(e_cut <= 1.5 * e_whole + 1e-5);
        kvq_cache_destroy(c);
    }
    CHECK(bad_read == 0 && exact_kept, "%s shape %d: %d deep cuts moved kept tokens", kvq_isa_name(isa),
          (int)(s - shapes), bad_read);
    CHECK(bad_load == 0, "%s shape %d: %d deep cuts left a state that does not load", kvq_isa_name(isa),
          (int)(s - shapes), bad_load);
    CHECK(bad_acc == 0, "%s shape %d: attention after a deep cut worse (worst ratio %.3f)", kvq_isa_name(isa),
          (int)(s - shapes), worst);
    if (worst > worst_ratio) worst_ratio = worst;
    kvq_cache_destroy(whole);
    free(K); free(V); free(Kb); free(Vb); free(Ka); free(Va); free(out);
}

/* A loaded cache has no history: a cut of one token is deep, as for a copy (which has none
   either); both re-express the same records into the same bytes. */
static void test_loaded(const shape *s) {
    kvq_config cfg = shape_config(s);
    const size_t need = kvq_cache_bytes(&cfg);
    uint8_t *mem = (uint8_t *)tu_alloc(need), *img;
    kvq_cache *l = NULL, *cp = NULL;
    size_t n;
    run r;
    int i, ok = 1;
    run_init(&r, &cfg, 0x10adull + (uint64_t)(s - shapes));
    for (i = 0; i < 50 && ok && r.c->n_tokens + 7 <= cfg.max_tokens; i++) ok = run_append(&r, 1 + i % 7);
    img = image(r.c, &n);
    CHECK(ok && kvq_cache_deserialize(&l, img, n, mem, need) == KVQ_OK && l->n_hist == 0, "load: no history");
    CHECK(kvq_cache_create(&cp, &cfg) == KVQ_OK && kvq_cache_copy(cp, r.c, r.c->n_tokens) == KVQ_OK, "copy");
    for (i = 0; i < 6 && l && cp; i++) {
        const int t = kvq_cache_tokens(l) - 1 - i * 3;
        CHECK(kvq_cache_truncate(l, t) == KVQ_OK && kvq_cache_truncate(cp, t) == KVQ_OK && same_state(l, cp),
              "shape %d: loaded and copied caches cut to %d differ", (int)(s - shapes), t);
    }
    kvq_cache_destroy(cp);
    free(img);
    free(mem);
    run_free(&r);
}

/* Copies: exact within src's history (the twin of src cut there), as a deep truncate past it,
   into larger and smaller capacities and another history length; then fork and diverge. */
static void test_copy(const shape *s, kvq_isa isa) {
    kvq_config cfg = shape_config(s), big = cfg, small = cfg;
    float *out = (float *)tu_alloc((size_t)3 * 2 * s->H * s->D * 4), *out2 = (float *)tu_alloc((size_t)3 * 2 * s->H * s->D * 4);
    kvq_cache *dst = NULL, *clone = NULL, *twin;
    uint8_t *before, *after;
    size_t nb, na;
    int i, ok = 1, k;
    run r, f;
    big.max_tokens = cfg.max_tokens * 2 + 5;
    big.rollback_tokens = cfg.rollback_tokens + 3;
    run_init(&r, &cfg, 0xc0b1ull * 31u + (uint64_t)(s - shapes) * 17u + (uint64_t)isa);
    for (i = 0; ok && r.c->n_tokens < cfg.max_tokens - 20 && i < 120; i++)
        ok = i % 3 == 2 ? run_attend(&r, 1, out) : run_append(&r, 1 + i % 4);
    CHECK(ok, "build src");
    before = image(r.c, &nb);
    for (k = 0; k < 4; k++) { /* n: all, inside the history, past it, into the sinks */
        const int T = r.c->n_tokens;
        const int n = k == 0 ? T : k == 1 ? T - r.hist / 2 - 1 : k == 2 ? T - r.hist - 9 : cfg.sink_tokens / 2;
        small.max_tokens = n > cfg.sink_tokens ? n : cfg.sink_tokens > 0 ? cfg.sink_tokens : 1;
        small.rollback_tokens = k;
        CHECK(kvq_cache_create(&dst, k % 2 ? &small : &big) == KVQ_OK && kvq_cache_copy(dst, r.c, n) == KVQ_OK,
              "copy %d tokens", n);
        if (k == 0) CHECK(same_state(dst, r.c), "%s shape %d: a copy of everything reads as src", kvq_isa_name(isa),
                          (int)(s - shapes));
        if (k < 2) { /* exact: the twin of src cut at n */
            f = r;
            cut_ops(&f, n);
            twin = replay(&cfg, &f);
            CHECK(twin && same_state(dst, twin), "%s shape %d: copy of %d tokens differs from the twin",
                  kvq_isa_name(isa), (int)(s - shapes), n);
            kvq_cache_destroy(twin);
        } else { /* deep: as src's history-free clone truncated there */
            CHECK(kvq_cache_create(&clone, &cfg) == KVQ_OK && kvq_cache_copy(clone, r.c, T) == KVQ_OK &&
                      kvq_cache_truncate(clone, n) == KVQ_OK && same_state(dst, clone),
                  "%s shape %d: deep copy of %d tokens differs from a deep cut", kvq_isa_name(isa), (int)(s - shapes), n);
            kvq_cache_destroy(clone);
        }
        kvq_cache_destroy(dst);
    }
    after = image(r.c, &na);
    CHECK(na == nb && !memcmp(before, after, nb), "src unchanged by copies");
    free(before);
    free(after);
    /* fork into a larger capacity, then diverge: each stays the twin of its own history, and
       the fork grows past src's capacity */
    CHECK(kvq_cache_create(&dst, &big) == KVQ_OK && kvq_cache_copy(dst, r.c, r.c->n_tokens) == KVQ_OK, "fork");
    f = r;
    f.c = dst;
    f.cfg = big;
    f.hist = 0;
    f.rng.s ^= 0x5eedull;
    f.K = (float *)tu_alloc((size_t)big.max_tokens * row_floats(&big) * 4);
    f.V = (float *)tu_alloc((size_t)big.max_tokens * row_floats(&big) * 4);
    memcpy(f.K, r.K, (size_t)cfg.max_tokens * row_floats(&cfg) * 4);
    memcpy(f.V, r.V, (size_t)cfg.max_tokens * row_floats(&cfg) * 4);
    for (i = 0; ok && i < 12; i++) ok = run_append(&r, 1) && run_append(&f, 2) && run_attend(&f, 1, out);
    while (ok && f.c->n_tokens < cfg.max_tokens + 30) ok = run_append(&f, 7) && run_attend(&f, 2, out);
    CHECK(ok, "diverge");
    CHECK(check_twin(&r, out, out2) && check_twin(&f, out, out2), "%s shape %d: forks differ from their twins",
          kvq_isa_name(isa), (int)(s - shapes));
    CHECK(kvq_cache_truncate(f.c, f.c->n_tokens - f.hist) == KVQ_OK, "the fork rolls back its own history");
    f.hist = 0;
    cut_ops(&f, f.c->n_tokens);
    CHECK(check_twin(&f, out, out2), "%s shape %d: fork rollback", kvq_isa_name(isa), (int)(s - shapes));
    free(f.K);
    free(f.V);
    kvq_cache_destroy(dst);
    run_free(&r);
    free(out);
    free(out2);
}

/* Bad arguments: the status, and not a byte of either cache's memory changed. */
static void test_refusals(void) {
    kvq_config cfg = kvq_default_config(32, 2, 200), other, tiny;
    size_t need;
    uint8_t *ma, *mb, *sa, *sb, *shared, *ss;
    kvq_cache *a = NULL, *b = NULL, *x = NULL, *y = NULL, *t = NULL;
    float *K = (float *)tu_alloc(150 * 64 * 4), *V = (float *)tu_alloc(150 * 64 * 4);
    tu_rng rng;
    rng.s = 77;
    cfg.residual_tokens = 64;
    other = tiny = cfg;
    need = kvq_cache_bytes(&cfg);
    ma = (uint8_t *)tu_alloc(need); mb = (uint8_t *)tu_alloc(need); sa = (uint8_t *)tu_alloc(need);
    sb = (uint8_t *)tu_alloc(need); shared = (uint8_t *)tu_alloc(2 * need); ss = (uint8_t *)tu_alloc(2 * need);
    tu_fill_kv(&rng, TU_RANDOM, 150, 2, 32, K, V);
    CHECK(kvq_cache_init(&a, &cfg, ma, need) == KVQ_OK && kvq_cache_init(&b, &cfg, mb, need) == KVQ_OK, "init");
    CHECK(kvq_cache_append(a, K, V, 150) == KVQ_OK && kvq_cache_append(b, K, V, 20) == KVQ_OK, "fill");
    memcpy(sa, ma, need);
    memcpy(sb, mb, need);
#define UNCHANGED() (!memcmp(sa, ma, need) && !memcmp(sb, mb, need))
    CHECK(kvq_cache_truncate(a, -1) == KVQ_ERR_INVALID && UNCHANGED(), "negative");
    CHECK(kvq_cache_truncate(a, 151) == KVQ_ERR_INVALID && UNCHANGED(), "more than held");
    CHECK(kvq_cache_truncate(NULL, 0) == KVQ_ERR_INVALID, "NULL");
    CHECK(kvq_cache_truncate(a, 150) == KVQ_OK && UNCHANGED(), "a cut of nothing changes nothing");
    CHECK(kvq_cache_copy(b, a, -1) == KVQ_ERR_INVALID && UNCHANGED(), "copy negative");
    CHECK(kvq_cache_copy(b, a, 151) == KVQ_ERR_INVALID && UNCHANGED(), "copy more than held");
    CHECK(kvq_cache_copy(NULL, a, 1) == KVQ_ERR_INVALID && kvq_cache_copy(b, NULL, 1) == KVQ_ERR_INVALID &&
              UNCHANGED(), "copy NULL");
    CHECK(kvq_cache_copy(a, a, 10) == KVQ_ERR_INVALID && UNCHANGED(), "copy onto itself");
    other.key_bits = 4;
    CHECK(kvq_cache_create(&x, &other) == KVQ_OK, "other");
    CHECK(kvq_cache_copy(x, a, 10) == KVQ_ERR_INVALID && kvq_cache_copy(b, x, 0) == KVQ_ERR_INVALID && UNCHANGED(),
          "config mismatch");
    kvq_cache_destroy(x);
    other = cfg;
    other.seed ^= 1;
    CHECK(kvq_cache_create(&x, &other) == KVQ_OK && kvq_cache_copy(x, a, 10) == KVQ_ERR_INVALID, "seed mismatch");
    kvq_cache_destroy(x);
    tiny.max_tokens = 100;
    tiny.rollback_tokens = 0;
    CHECK(kvq_cache_create(&t, &tiny) == KVQ_OK, "tiny");
    {
        uint8_t *img0, *img1;
        size_t n0, n1;
        img0 = image(t, &n0);
        CHECK(kvq_cache_copy(t, a, 101) == KVQ_ERR_FULL, "too small");
        img1 = image(t, &n1);
        CHECK(n0 == n1 && !memcmp(img0, img1, n0) && UNCHANGED(), "too small: nothing changed");
        CHECK(kvq_cache_copy(t, a, 100) == KVQ_OK && kvq_cache_tokens(t) == 100, "capacity = tokens copied");
        free(img0);
        free(img1);
    }
    kvq_cache_destroy(t);
    /* two caches whose memory overlaps (the second clobbers the first's arrays, not its struct) */
    CHECK(kvq_cache_init(&x, &cfg, shared, need) == KVQ_OK && kvq_cache_init(&y, &cfg, shared + need / 2, need) == KVQ_OK,
          "overlapping caches");
    memcpy(ss, shared, 2 * need);
    CHECK(kvq_cache_copy(x, y, 0) == KVQ_ERR_INVALID && kvq_cache_copy(y, x, 0) == KVQ_ERR_INVALID &&
              !memcmp(ss, shared, 2 * need), "overlap refused, nothing written");
#undef UNCHANGED
    {   /* the config field: range checked, in kvq_config_check and the image */
        kvq_config c2 = kvq_default_config(32, 2, 200);
        c2.rollback_tokens = -1;
        CHECK(kvq_config_check(&c2) == KVQ_ERR_INVALID && kvq_cache_bytes(&c2) == 0, "rollback -1");
        c2.rollback_tokens = KVQ__MAX_ROLLBACK + 1;
        CHECK(kvq_config_check(&c2) == KVQ_ERR_INVALID, "rollback past the limit");
        c2.rollback_tokens = KVQ__MAX_ROLLBACK;
        CHECK(kvq_config_check(&c2) == KVQ_OK, "rollback at the limit");
    }
    free(ma); free(mb); free(sa); free(sb); free(shared); free(ss); free(K); free(V);
}

/* What the history costs: up to 4 * head_dim bytes per token per KV head (a key and a value
   row; the first token's rows were there already), the key rows rounded up to whole key
   blocks, so free up to G at R >= G; plus, in caches that record attention, a salience
   snapshot (8 bytes per key ring row) per token. */
static void test_cost(void) {
    kvq_config a = kvq_default_config(128, 8, 4096), b;
    long d;
    CHECK(a.rollback_tokens == 16, "default rollback_tokens 16");
    b = a;
    b.rollback_tokens = 0;
    d = (long)kvq_cache_bytes(&a) - (long)kvq_cache_bytes(&b);
    CHECK(d == 8L * 15 * 256, "default: 15 value rows of 256 bytes per head, no key row (%ld bytes)", d);
    printf("rollback_tokens 16 at head_dim 128, 8 KV heads, the default config: +%ld bytes per layer (%ld per head)\n", d,
           d / 8);
    b.rollback_tokens = 32;
    d = (long)kvq_cache_bytes(&b) - (long)kvq_cache_bytes(&a);
    CHECK(d == 8L * 16 * 256, "32: 16 value rows more, still no key row (%ld bytes)", d);
    b.rollback_tokens = 0;
    a.residual_tokens = 0;
    b.residual_tokens = 0;
    d = (long)kvq_cache_bytes(&a) - (long)kvq_cache_bytes(&b);
    CHECK(d == 8L * (15 + 64) * 256, "R 0: 15 value rows and a key block (64) of rows per head (%ld bytes)", d);
    a.residual_tokens = b.residual_tokens = 128;
    a.salient_ratio = b.salient_ratio = 0.125f;
    d = (long)kvq_cache_bytes(&a) - (long)kvq_cache_bytes(&b);
    /* key ring: R + 16 rows rounded up to whole 64-token blocks, 192 */
    CHECK(d == 8L * 16 * 192 * 8, "salient attention: a snapshot of 192 ring slots per token per head (%ld bytes)", d);
    printf("with salient tokens (attention policy): +%ld bytes per layer\n", d);
    CHECK(kvq_config_bits_per_element(&a) == kvq_config_bits_per_element(&b), "steady state: history excluded");
}

int main(void) {
    int i, k;
    isas[n_isas++] = KVQ_ISA_SCALAR;
    for (i = KVQ_ISA_AVX2; i <= KVQ_ISA_NEON; i++)
        if (kvq_set_isa((kvq_isa)i) == KVQ_OK) isas[n_isas++] = i;
    test_refusals();
    test_cost();
    for (k = 0; k < n_isas; k++) {
        kvq_set_isa((kvq_isa)isas[k]);
        printf("%s:", kvq_isa_name((kvq_isa)isas[k]));
        for (i = 0; i < (int)(sizeof shapes / sizeof shapes[0]); i++) {
            test_rollback(&shapes[i], (kvq_isa)isas[k]);
            test_deep(&shapes[i], (kvq_isa)isas[k]);
            test_copy(&shapes[i], (kvq_isa)isas[k]);
            if (k == 0) test_loaded(&shapes[i]);
            printf(" %d", i);
            fflush(stdout);
        }
        printf("\n");
    }
    printf("attention error after deep cuts and the same appends: at most %.3fx the cache's never cut\n", worst_ratio);
    kvq_set_isa(KVQ_ISA_SCALAR);
    return tu_finish("test_runtime");
}
