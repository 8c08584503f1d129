/* Batched attention and split prefill, on every ISA path kvq_set_isa() accepts here:
   - kvq_batch_plan + kvq_batch_attention + kvq_batch_merge give every sequence the output of
     kvq_attention on it under the same ISA: bit for bit where a (sequence, KV head) ran
     whole, within NMSE 1e-10 where it was split (the tolerance of test_core's split + merge),
     over batches that mix lengths (1 token to 64K), bits 2/3/4/8/16, group sizes, sinks,
     salient tokens, rotation and keys per token, with 1 and 3 queries, on 1..7 threads
     whose calls run in a scrambled order;
   - the plan: pieces tile every (sequence, KV head) row in order, each thread's share of
     tokens x KV heads is less than G + 1 from the mean, one long sequence among short ones
     is spread over the threads, and at most 2 (n_threads - 1) pieces need merging;
   - every refusal (bad argument, mismatched shape, aliasing, a cache changed after
     planning, merging before attention) returns its status and writes nothing;
   - kvq_attention_prefill_partial over head and query splits, then one append, gives
     kvq_attention_prefill's output and cache bytes exactly, and writes only its rows. */
#define KVQ_IMPLEMENTATION
#include "../kvq.h"
#include "test_util.h"

/* A split row sums its tokens in another order than one call: test_core's split tolerance,
   1e-10, up to 2048 tokens. Beyond, it grows with the length T, as the variance of fp32
   rounding in a T-term sum does (both results carry it): at 64K tokens we see 1e-9, and one
   kvq_attention call is itself 1.4e-9 from double-precision attention over its cache. */
#define SPLIT_NMSE_MAX 1e-10
#define SPLIT_NMSE_TOKENS 2048
#define POISON 0xa5

#ifdef __aarch64__
#define LONG_T (1 << 14) /* qemu is slow */
#else
#define LONG_T (1 << 16)
#endif

enum { D = 64, H = 2, NQH = 8, MAX_THREADS = 7 };

static int isas[4], n_isas;

static void find_isas(void) {
    int i;
    isas[n_isas++] = KVQ_ISA_SCALAR;
    for (i = KVQ_ISA_AVX2; i <= KVQ_ISA_NEON; i++)
        if (kvq_set_isa((kvq_isa)i) == KVQ_OK) isas[n_isas++] = i;
    kvq_set_isa(KVQ_ISA_SCALAR);
    printf("ISA paths:");
    for (i = 0; i < n_isas; i++) printf(" %s", kvq_isa_name((kvq_isa)isas[i]));
    printf("\n");
}

/* One sequence of a test batch: its config and its length. */
typedef struct seq_spec {
    int kb, vb, G, S, R, T, rot, salient_pct, policy, per_token_keys, search;
    int key_block, pbits; /* 0: group_size; 0: fp16 value params */
} seq_spec;

static kvq_config spec_config(const seq_spec *s) {
    kvq_config cfg = kvq_default_config(D, H, s->T + 8);
    cfg.key_bits = s->kb;
    cfg.value_bits = s->vb;
    cfg.group_size = s->G;
    cfg.sink_tokens = s->S;
    cfg.residual_tokens = s->R;
    cfg.rotation = s->rot;
    cfg.salient_ratio = (float)s->salient_pct / 100.0f;
    cfg.salient_policy = s->policy;
    cfg.key_axis = s->per_token_keys ? KVQ_KEYS_PER_TOKEN : KVQ_KEYS_PER_CHANNEL;
    cfg.range_search = s->search;
    cfg.key_block = s->key_block;
    cfg.value_param_bits = s->pbits;
    return cfg;
}

/* A cache of T random tokens, appended in growing chunks (the ring fills and drains). */
static kvq_cache *make_cache(const kvq_config *cfg, int T, uint64_t seed) {
    const size_t row = (size_t)cfg->n_kv_heads * cfg->head_dim;
    float *K = (float *)tu_alloc((size_t)T * row * 4), *V = (float *)tu_alloc((size_t)T * row * 4);
    kvq_cache *c = NULL;
    tu_rng r;
    int t = 0, step = 1;
    r.s = seed * 0x9e3779b97f4a7c15ull + 1;
    tu_fill_kv(&r, (int)(seed & 1), T, cfg->n_kv_heads, cfg->head_dim, K, V);
    if (kvq_cache_create(&c, cfg) != KVQ_OK) c = NULL;
    while (c && t < T) {
        int n = T - t < step ? T - t : step;
        if (kvq_cache_append(c, K + row * t, V + row * t, n) != KVQ_OK) {
            kvq_cache_destroy(c);
            c = NULL;
        }
        t += n;
        step = step * 2 + 3;
    }
    free(K);
    free(V);
    return c;
}

/* A batch under test: caches, queries, outputs and the single-call references. */
typedef struct batch {
    int n;
    kvq_cache **c;
    float **q, **out, **ref;
    size_t qn; /* floats per query or output array */
    kvq_attn_params ap;
} batch;

static void batch_make(batch *b, const seq_spec *specs, int n, int nq) {
    tu_rng r = {777};
    int s;
    b->n = n;
    b->ap.n_q_heads = NQH;
    b->ap.n_queries = nq;
    b->ap.scale = 0.0f;
    b->qn = (size_t)nq * NQH * D;
    b->c = (kvq_cache **)tu_alloc((size_t)n * sizeof(kvq_cache *));
    b->q = (float **)tu_alloc((size_t)n * sizeof(float *));
    b->out = (float **)tu_alloc((size_t)n * sizeof(float *));
    b->ref = (float **)tu_alloc((size_t)n * sizeof(float *));
    for (s = 0; s < n; s++) {
        kvq_config cfg = spec_config(&specs[s]);
        int T = specs[s].T > nq ? specs[s].T : nq;
        cfg.max_tokens = T + 8;
        b->c[s] = make_cache(&cfg, T, (uint64_t)s + 11);
        CHECK(b->c[s] != NULL, "cache %d (k%d v%d G%d T%d)", s, specs[s].kb, specs[s].vb, specs[s].G, T);
        b->q[s] = (float *)tu_alloc(b->qn * 4);
        b->out[s] = (float *)tu_alloc(b->qn * 4);
        b->ref[s] = (float *)tu_alloc(b->qn * 4);
        tu_fill_q(&r, s & 1, b->qn, D, b->q[s]);
    }
}

static void batch_free(batch *b) {
    int s;
    for (s = 0; s < b->n; s++) {
        kvq_cache_destroy(b->c[s]);
        free(b->q[s]);
        free(b->out[s]);
        free(b->ref[s]);
    }
    free(b->c);
    free(b->q);
    free(b->out);
    free(b->ref);
}

/* The plan's pieces tile every row [0, T) in line order, threads in order; each thread's share
   is less than a tile span + 1 from the mean (kvq__block_span: the whole blocks one tile covers); at most 2 (n - 1) states; returns the threads that hold a
   piece of sequence 0. */
static int check_plan(const kvq_batch *p, const batch *b, int n_threads, const char *what) {
    double work[MAX_THREADS] = {0}, W = 0.0, mean;
    int i = 0, s, h, k, Gmax = 0, holders = 0, ok = 1;
    int held[MAX_THREADS] = {0};
    for (s = 0; s < b->n; s++) {
        const int T = kvq_cache_tokens(b->c[s]);
        if (kvq__block_span(b->c[s]) > Gmax) Gmax = kvq__block_span(b->c[s]); /* tokens one tile may span */
        W += (double)T * H;
        for (h = 0; h < H; h++) {
            int t = 0;
            while (i < p->first_piece[n_threads] && p->pieces[i].seq == s && p->pieces[i].h == h) {
                const kvq__piece *pc = &p->pieces[i];
                ok &= pc->t0 == t && pc->t1 > pc->t0 && pc->thread >= 0 && pc->thread < n_threads;
                ok &= i >= p->first_piece[pc->thread] && i < p->first_piece[pc->thread + 1];
                ok &= (pc->state < 0) == (pc->t0 == 0 && pc->t1 == T);
                work[pc->thread] += pc->t1 - pc->t0;
                if (s == 0) held[pc->thread] = 1;
                t = pc->t1;
                i++;
            }
            ok &= t == T;
        }
    }
    CHECK(ok && i == p->first_piece[n_threads], "%s, %d threads: pieces do not tile the rows", what, n_threads);
    CHECK(p->n_states <= 2 * (n_threads - 1), "%s: %d states for %d threads", what, p->n_states, n_threads);
    mean = W / n_threads;
    for (k = 0; k < n_threads; k++) {
        CHECK(fabs(work[k] - mean) < Gmax + 1, "%s, %d threads: thread %d has %.0f of %.0f, mean %.1f, span %d", what,
              n_threads, k, work[k], W, mean, Gmax);
        holders += held[k];
    }
    return holders;
}

/* Plans the batch on n_threads, runs the attention calls and then the merges in a scrambled
   thread order (as a pool might), and compares every sequence with its reference. */
static void run_batch(batch *b, int n_threads, const char *what, int check_holders) {
    const size_t bytes = kvq_batch_plan_bytes(kvq_cache_config(b->c[0]), &b->ap, b->n, n_threads);
    uint8_t *mem = (uint8_t *)tu_alloc(bytes + 8);
    kvq_batch *p = NULL;
    int s, k, i, split, skip;
    double worst = 0.0;
    CHECK(bytes > 0, "%s: plan bytes", what);
    for (s = 0; s < b->n; s++) memset(b->out[s], POISON, b->qn * 4);
    /* mem + 3: the plan aligns itself */
    CHECK(kvq_batch_plan(&p, mem + 3, bytes, b->c, (const float *const *)b->q, b->out, b->n, &b->ap, n_threads) ==
              KVQ_OK, "%s: plan on %d threads", what, n_threads);
    if (!p) { free(mem); return; }
    /* the thread of the first split piece runs last: until it has, merging that row is refused */
    for (i = 0, skip = -1; i < p->first_piece[n_threads] && skip < 0; i++)
        if (p->pieces[i].state >= 0) skip = i;
    for (i = 0; i < n_threads; i++) {
        k = (i * 11 + 3) % n_threads; /* 11 is prime to every n_threads <= 7: a permutation */
        if (skip < 0 || k != p->pieces[skip].thread)
            CHECK(kvq_batch_attention(p, k) == KVQ_OK, "%s: attention of thread %d", what, k);
    }
    if (skip >= 0) {
        const kvq__piece *first = &p->pieces[skip], *last = first;
        float *rows = b->out[first->seq] + (size_t)first->h * (NQH / H) * D; /* query 0's rows of that KV head */
        uint8_t poison[(NQH / H) * D * 4];
        while (last + 1 < p->pieces + p->first_piece[n_threads] && last[1].seq == first->seq && last[1].h == first->h)
            last++;
        memset(poison, POISON, sizeof poison);
        CHECK(kvq_batch_merge(p, last->thread) == KVQ_ERR_INVALID && !memcmp(rows, poison, sizeof poison),
              "%s: a merge before all its attention calls is refused and writes nothing", what);
        CHECK(kvq_batch_attention(p, first->thread) == KVQ_OK, "%s: attention of thread %d", what, first->thread);
    }
    for (i = n_threads - 1; i >= 0; i--) CHECK(kvq_batch_merge(p, i) == KVQ_OK, "%s: merge of thread %d", what, i);
    for (s = 0; s < b->n; s++) {
        for (i = split = 0; i < p->first_piece[n_threads]; i++) split |= p->pieces[i].seq == s && p->pieces[i].state >= 0;
        if (split) {
            const int T = kvq_cache_tokens(b->c[s]);
            const double e = tu_nmse(b->out[s], b->ref[s], b->qn);
            const double tol = SPLIT_NMSE_MAX * (T > SPLIT_NMSE_TOKENS ? (double)T / SPLIT_NMSE_TOKENS : 1.0);
            worst = e > worst ? e : worst;
            CHECK(e <= tol, "%s, %s, %d threads: split sequence %d (%d tokens) NMSE %.3g", what,
                  kvq_isa_name(kvq_get_isa()), n_threads, s, T, e);
        } else {
            CHECK(memcmp(b->out[s], b->ref[s], b->qn * 4) == 0, "%s, %s, %d threads: whole sequence %d differs", what,
                  kvq_isa_name(kvq_get_isa()), n_threads, s);
        }
    }
    k = check_plan(p, b, n_threads, what);
    if (check_holders) CHECK(k >= n_threads - 1, "%s: the long sequence sits on %d of %d threads", what, k, n_threads);
    if (n_threads == MAX_THREADS)
        printf("%s, %s, %d threads: %d pieces, %d merged; worst split NMSE %.3g\n", what, kvq_isa_name(kvq_get_isa()),
               n_threads, p->first_piece[n_threads], p->n_states, worst);
    free(mem);
}

static void test_batches(const seq_spec *specs, int n, int nq, const char *what, int check_holders) {
    batch b;
    int i, s, nt;
    batch_make(&b, specs, n, nq);
    for (i = 0; i < n_isas; i++) {
        kvq_set_isa((kvq_isa)isas[i]);
        for (s = 0; s < b.n; s++)
            CHECK(b.c[s] && kvq_attention(b.c[s], b.q[s], b.ref[s], &b.ap) == KVQ_OK, "%s: reference %d", what, s);
        for (nt = 1; nt <= MAX_THREADS; nt++) run_batch(&b, nt, what, check_holders);
    }
    kvq_set_isa(KVQ_ISA_SCALAR);
    batch_free(&b);
}

/* {kb, vb, G, S, R, T, rot, salient %, policy, keys per token, search, key block, value param bits} */
static const seq_spec mixed[] = {
    {2, 2, 32, 4, 128, 700, 0, 0, 0, 0, 4, 0, 0},
    {3, 3, 16, 0, 0, 1, 0, 0, 0, 0, 4, 0, 0},             /* one token */
    {4, 4, 64, 4, 64, 300, KVQ_ROTATE_HADAMARD, 0, 0, 0, 4, 0, 0},
    {8, 8, 32, 4, 128, 129, 0, 0, 0, 1, 4, 0, 0},         /* keys per token */
    {16, 16, 128, 4, 128, 1000, 0, 0, 0, 0, 0, 0, 0},
    {2, 4, 32, 4, 128, 900, 0, 10, KVQ_SALIENT_ATTENTION, 0, 4, 0, 0},
    {2, 2, 32, 4, 128, 450, KVQ_ROTATE_HADAMARD, 10, KVQ_SALIENT_ERROR, 0, 4, 0, 0},
    {4, 2, 32, 8, 32, 5, 0, 0, 0, 0, 4, 0, 0},            /* sinks only */
    {2, 3, 32, 4, 128, 2500, 0, 0, 0, 0, 0, 0, 0},
    {3, 8, 16, 7, 16, 333, 0, 0, 0, 0, 4, 0, 0},          /* sinks not a multiple of G */
    {3, 2, 32, 4, 128, 800, 0, 0, 0, 0, 4, 64, 16},       /* K3V2: key blocks of 64, 16-bit value params */
};

static void test_mixed(void) {
    test_batches(mixed, (int)(sizeof mixed / sizeof mixed[0]), 1, "mixed, 1 query", 0);
    test_batches(mixed, (int)(sizeof mixed / sizeof mixed[0]), 3, "mixed, 3 queries", 0);
}

/* One long sequence among 40 of 100 tokens: the long one is spread over the threads. */
static void test_long_among_short(void) {
    enum { N = 41 };
    seq_spec specs[N];
    int s;
    for (s = 0; s < N; s++) {
        seq_spec x = {2, 2, 32, 4, 128, 100, 0, 0, 0, 0, 4, 0, 0};
        x.kb = s % 3 == 0 ? 2 : s % 3 == 1 ? 4 : 16;
        if (s == 0) x.T = LONG_T;
        specs[s] = x;
    }
    test_batches(specs, N, 1, "one long among short", 1);
}

/* Status and output buffers after a refused call: the status is expected, and neither any
   output nor the plan's memory changed. */
typedef struct refusal_env {
    batch b;
    uint8_t *mem, *mem_copy;
    size_t bytes;
    float **out_copy;
} refusal_env;

static int unchanged(const refusal_env *e) {
    int s, same = memcmp(e->mem, e->mem_copy, e->bytes) == 0;
    for (s = 0; s < e->b.n; s++) same &= memcmp(e->b.out[s], e->out_copy[s], e->b.qn * 4) == 0;
    return same;
}

#define REFUSED(call, expect)                                                        \
    do {                                                                             \
        kvq_status st_ = (call);                                                     \
        CHECK(st_ == (expect), #call ": status %d", (int)st_);                       \
        CHECK(unchanged(&e), #call " wrote an output or the plan's memory");          \
    } while (0)

static void test_refusals(void) {
    static const seq_spec specs[] = {{2, 2, 32, 4, 128, 300, 0, 0, 0, 0, 4, 0, 0},
                                     {4, 4, 32, 4, 128, 50, 0, 0, 0, 0, 4, 0, 0},
                                     {2, 2, 32, 4, 128, 90, 0, 0, 0, 0, 4, 0, 0}};
    refusal_env e;
    kvq_cache *cs[3], *other = NULL, *empty = NULL, *inmem = NULL;
    const float *qs[3];
    float *outs[3];
    kvq_batch *p = NULL;
    kvq_attn_params ap;
    kvq_config cfg;
    uint8_t *cmem;
    size_t cbytes;
    int s;
    batch_make(&e.b, specs, 3, 1);
    ap = e.b.ap;
    e.bytes = kvq_batch_plan_bytes(kvq_cache_config(e.b.c[0]), &ap, 3, 2);
    e.mem = (uint8_t *)tu_alloc(e.bytes);
    e.mem_copy = (uint8_t *)tu_alloc(e.bytes);
    e.out_copy = (float **)tu_alloc(3 * sizeof(float *));
    memset(e.mem, POISON, e.bytes);
    memcpy(e.mem_copy, e.mem, e.bytes);
    for (s = 0; s < 3; s++) {
        memset(e.b.out[s], POISON, e.b.qn * 4);
        e.out_copy[s] = (float *)tu_alloc(e.b.qn * 4);
        memcpy(e.out_copy[s], e.b.out[s], e.b.qn * 4);
        cs[s] = e.b.c[s];
        qs[s] = e.b.q[s];
        outs[s] = e.b.out[s];
    }
    /* sizes: 0 for bad arguments */
    CHECK(e.bytes > 0, "plan bytes");
    CHECK(kvq_batch_plan_bytes(NULL, &ap, 3, 2) == 0 && kvq_batch_plan_bytes(kvq_cache_config(cs[0]), NULL, 3, 2) == 0,
          "plan bytes of NULL");
    CHECK(kvq_batch_plan_bytes(kvq_cache_config(cs[0]), &ap, 0, 2) == 0 &&
              kvq_batch_plan_bytes(kvq_cache_config(cs[0]), &ap, 3, 0) == 0 &&
              kvq_batch_plan_bytes(kvq_cache_config(cs[0]), &ap, 3, (1 << 16) + 1) == 0,
          "plan bytes of no sequences, no threads, too many threads");
    ap.n_q_heads = 3;
    CHECK(kvq_batch_plan_bytes(kvq_cache_config(cs[0]), &ap, 3, 2) == 0, "plan bytes: heads not a multiple");
    ap = e.b.ap;
    CHECK(kvq_batch_plan_bytes(kvq_cache_config(cs[0]), &ap, 3, 3) > e.bytes, "more threads, more bytes");

    /* NULLs and counts */
    REFUSED(kvq_batch_plan(NULL, e.mem, e.bytes, cs, qs, outs, 3, &ap, 2), KVQ_ERR_INVALID);
    REFUSED(kvq_batch_plan(&p, NULL, e.bytes, cs, qs, outs, 3, &ap, 2), KVQ_ERR_INVALID);
    REFUSED(kvq_batch_plan(&p, e.mem, e.bytes, NULL, qs, outs, 3, &ap, 2), KVQ_ERR_INVALID);
    REFUSED(kvq_batch_plan(&p, e.mem, e.bytes, cs, NULL, outs, 3, &ap, 2), KVQ_ERR_INVALID);
    REFUSED(kvq_batch_plan(&p, e.mem, e.bytes, cs, qs, NULL, 3, &ap, 2), KVQ_ERR_INVALID);
    REFUSED(kvq_batch_plan(&p, e.mem, e.bytes, cs, qs, outs, 3, NULL, 2), KVQ_ERR_INVALID);
    REFUSED(kvq_batch_plan(&p, e.mem, e.bytes, cs, qs, outs, 0, &ap, 2), KVQ_ERR_INVALID);
    REFUSED(kvq_batch_plan(&p, e.mem, e.bytes, cs, qs, outs, 3, &ap, 0), KVQ_ERR_INVALID);
    REFUSED(kvq_batch_plan(&p, e.mem, e.bytes, cs, qs, outs, 3, &ap, -1), KVQ_ERR_INVALID);
    REFUSED(kvq_batch_plan(&p, e.mem, e.bytes - 1, cs, qs, outs, 3, &ap, 2), KVQ_ERR_BUFFER);
    cs[1] = NULL;
    REFUSED(kvq_batch_plan(&p, e.mem, e.bytes, cs, qs, outs, 3, &ap, 2), KVQ_ERR_INVALID);
    cs[1] = e.b.c[1];
    qs[2] = NULL;
    REFUSED(kvq_batch_plan(&p, e.mem, e.bytes, cs, qs, outs, 3, &ap, 2), KVQ_ERR_INVALID);
    qs[2] = e.b.q[2];
    outs[2] = NULL;
    REFUSED(kvq_batch_plan(&p, e.mem, e.bytes, cs, qs, outs, 3, &ap, 2), KVQ_ERR_INVALID);
    outs[2] = e.b.out[2];
    /* params and queries, as kvq_attention checks them */
    ap.n_q_heads = 5;
    REFUSED(kvq_batch_plan(&p, e.mem, e.bytes, cs, qs, outs, 3, &ap, 2), KVQ_ERR_INVALID);
    ap = e.b.ap;
    ap.scale = NAN;
    REFUSED(kvq_batch_plan(&p, e.mem, e.bytes, cs, qs, outs, 3, &ap, 2), KVQ_ERR_INVALID);
    ap = e.b.ap;
    e.b.q[2][D + 5] = INFINITY;
    REFUSED(kvq_batch_plan(&p, e.mem, e.bytes, cs, qs, outs, 3, &ap, 2), KVQ_ERR_INVALID);
    e.b.q[2][D + 5] = 0.5f;
    /* shapes: every cache has caches[0]'s head_dim and n_kv_heads */
    cfg = *kvq_cache_config(cs[0]);
    cfg.head_dim = 32;
    other = make_cache(&cfg, 100, 5);
    cs[1] = other;
    REFUSED(kvq_batch_plan(&p, e.mem, e.bytes, cs, qs, outs, 3, &ap, 2), KVQ_ERR_INVALID);
    kvq_cache_destroy(other);
    cfg = *kvq_cache_config(cs[0]);
    cfg.n_kv_heads = 1;
    other = make_cache(&cfg, 100, 5);
    cs[1] = other;
    REFUSED(kvq_batch_plan(&p, e.mem, e.bytes, cs, qs, outs, 3, &ap, 2), KVQ_ERR_INVALID);
    kvq_cache_destroy(other);
    /* a cache with no token: as kvq_attention, which refuses a query with nothing to see */
    cfg = *kvq_cache_config(cs[0]);
    CHECK(kvq_cache_create(&empty, &cfg) == KVQ_OK, "empty cache");
    CHECK(kvq_attention(empty, qs[1], e.b.ref[1], &ap) == KVQ_ERR_INVALID, "kvq_attention on no token");
    cs[1] = empty;
    REFUSED(kvq_batch_plan(&p, e.mem, e.bytes, cs, qs, outs, 3, &ap, 2), KVQ_ERR_INVALID);
    cs[1] = e.b.c[1];
    /* aliasing: outputs with outputs, queries, caches, the plan's memory */
    outs[2] = outs[0];
    REFUSED(kvq_batch_plan(&p, e.mem, e.bytes, cs, qs, outs, 3, &ap, 2), KVQ_ERR_INVALID);
    outs[2] = outs[0] + 5;
    REFUSED(kvq_batch_plan(&p, e.mem, e.bytes, cs, qs, outs, 3, &ap, 2), KVQ_ERR_INVALID);
    outs[2] = e.b.q[1];
    REFUSED(kvq_batch_plan(&p, e.mem, e.bytes, cs, qs, outs, 3, &ap, 2), KVQ_ERR_INVALID);
    outs[2] = e.b.q[0] + e.b.qn - 1;
    REFUSED(kvq_batch_plan(&p, e.mem, e.bytes, cs, qs, outs, 3, &ap, 2), KVQ_ERR_INVALID);
    outs[2] = (float *)(void *)(e.mem + e.bytes - 4);
    REFUSED(kvq_batch_plan(&p, e.mem, e.bytes, cs, qs, outs, 3, &ap, 2), KVQ_ERR_INVALID);
    outs[2] = e.b.out[2];
    qs[1] = (const float *)(const void *)e.mem;
    REFUSED(kvq_batch_plan(&p, e.mem, e.bytes, cs, qs, outs, 3, &ap, 2), KVQ_ERR_INVALID);
    qs[1] = e.b.q[1];
    cfg = *kvq_cache_config(cs[0]);
    cbytes = kvq_cache_bytes(&cfg);
    cmem = (uint8_t *)tu_alloc(cbytes);
    CHECK(kvq_cache_init(&inmem, &cfg, cmem, cbytes) == KVQ_OK, "cache in our memory");
    {
        const size_t row = (size_t)H * D;
        float *kv = (float *)tu_alloc(40 * row * 4);
        for (s = 0; s < (int)(40 * row); s++) kv[s] = (float)(s % 7) * 0.25f;
        CHECK(kvq_cache_append(inmem, kv, kv, 40) == KVQ_OK, "fill it");
        free(kv);
    }
    cs[1] = inmem;
    CHECK(kvq_batch_plan(&p, e.mem, e.bytes, cs, qs, outs, 3, &ap, 2) == KVQ_OK, "plan with a cache in our memory");
    memcpy(e.mem_copy, e.mem, e.bytes); /* that plan is the memory's content now */
    outs[0] = (float *)(void *)(cmem + cbytes / 2);
    REFUSED(kvq_batch_plan(&p, e.mem, e.bytes, cs, qs, outs, 3, &ap, 2), KVQ_ERR_INVALID);
    outs[0] = e.b.out[0];
    {
        uint8_t *ccopy = (uint8_t *)tu_alloc(cbytes);
        memcpy(ccopy, cmem, cbytes);
        CHECK(kvq_batch_plan(&p, cmem + 256, e.bytes, cs, qs, outs, 3, &ap, 2) == KVQ_ERR_INVALID &&
                  memcmp(ccopy, cmem, cbytes) == 0,
              "a plan over a cache's memory is refused and writes nothing");
        free(ccopy);
    }
    cs[1] = e.b.c[1];
    {
        kvq_cache **in_plan = (kvq_cache **)(void *)(e.mem + 64); /* the pointer array inside the plan's memory */
        memcpy(in_plan, cs, sizeof cs);
        memcpy(e.mem_copy, e.mem, e.bytes);
        REFUSED(kvq_batch_plan(&p, e.mem, e.bytes, in_plan, qs, outs, 3, &ap, 2), KVQ_ERR_INVALID);
    }

    /* the calls: a plan, a thread in range, caches as planned, merge after attention */
    p = NULL;
    CHECK(kvq_batch_plan(&p, e.mem, e.bytes, cs, qs, outs, 3, &ap, 2) == KVQ_OK && p, "plan");
    memcpy(e.mem_copy, e.mem, e.bytes);
    REFUSED(kvq_batch_attention(NULL, 0), KVQ_ERR_INVALID);
    REFUSED(kvq_batch_attention(p, -1), KVQ_ERR_INVALID);
    REFUSED(kvq_batch_attention(p, 2), KVQ_ERR_INVALID);
    REFUSED(kvq_batch_merge(NULL, 0), KVQ_ERR_INVALID);
    REFUSED(kvq_batch_merge(p, 2), KVQ_ERR_INVALID);
    REFUSED(kvq_batch_merge(p, -1), KVQ_ERR_INVALID);
    CHECK(p->n_states > 0, "two threads over 880 token-heads split a row");
    for (s = 0; s < 2; s++) /* merging before the attention calls: the split row is unseen */
        if (p->merge[s].n_pieces) REFUSED(kvq_batch_merge(p, s), KVQ_ERR_INVALID);
    {
        struct kvq_batch fake;
        memset(&fake, 0, sizeof fake);
        REFUSED(kvq_batch_attention(&fake, 0), KVQ_ERR_INVALID); /* no plan there */
        REFUSED(kvq_batch_merge(&fake, 0), KVQ_ERR_INVALID);
    }
    {   /* a cache appended to after planning: the threads that read it refuse */
        const size_t row = (size_t)H * D;
        float *kv = (float *)tu_alloc(row * 4);
        CHECK(kvq_cache_append(cs[2], kv, kv, 1) == KVQ_OK, "append after planning");
        for (s = 0; s < 2; s++) {
            int i, reads = 0;
            for (i = p->first_piece[s]; i < p->first_piece[s + 1]; i++) reads |= p->pieces[i].seq == 2;
            if (reads) REFUSED(kvq_batch_attention(p, s), KVQ_ERR_INVALID);
            if (reads) REFUSED(kvq_batch_merge(p, s), KVQ_ERR_INVALID);
        }
        free(kv);
    }
    kvq_cache_destroy(empty);
    free(cmem);
    for (s = 0; s < 3; s++) free(e.out_copy[s]);
    free(e.out_copy);
    free(e.mem);
    free(e.mem_copy);
    batch_free(&e.b);
}

/* Prefill's split form against kvq_attention_prefill: same output bits, same cache bytes. */
static int same_cache(const kvq_cache *a, const kvq_cache *b) {
    size_t na = kvq_cache_serialized_bytes(a), nb = kvq_cache_serialized_bytes(b);
    uint8_t *ia = (uint8_t *)tu_alloc(na), *ib = (uint8_t *)tu_alloc(nb);
    int same = na == nb && kvq_cache_serialize(a, ia, na, NULL) == KVQ_OK &&
               kvq_cache_serialize(b, ib, nb, NULL) == KVQ_OK && memcmp(ia, ib, na) == 0;
    free(ia);
    free(ib);
    return same;
}

/* Query and head ranges of one split: n_q query ranges x n_h head ranges (H = 4 here). */
typedef struct prefill_split {
    int n_q, q_cut[4], n_h, h_cut[5];
} prefill_split;

static void test_prefill_split(void) {
    enum { PH = 4, PQH = 8, T0 = 150, N = 37 };
    static const prefill_split splits[] = {
        {1, {0, N}, 1, {0, PH}},                 /* one call */
        {1, {0, N}, 4, {0, 1, 2, 3, PH}},        /* each head */
        {3, {0, 5, 30, N}, 1, {0, PH}},          /* query ranges */
        {3, {0, 0, 20, N}, 2, {0, 3, PH}},       /* an empty query range, uneven heads */
    };
    static const seq_spec cfgs[] = {
        {2, 2, 32, 4, 128, 0, 0, 0, 0, 0, 4, 0, 0},
        {4, 3, 16, 4, 32, 0, KVQ_ROTATE_HADAMARD, 0, 0, 0, 4, 0, 0},
        {16, 16, 32, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0},
        {2, 4, 32, 4, 64, 0, 0, 10, KVQ_SALIENT_ERROR, 0, 4, 0, 0},
        {8, 2, 32, 4, 64, 0, 0, 0, 0, 1, 4, 0, 0},
    };
    const size_t row = (size_t)PH * D, qrow = (size_t)PQH * D;
    float *K = (float *)tu_alloc((T0 + N) * row * 4), *V = (float *)tu_alloc((T0 + N) * row * 4);
    float *q = (float *)tu_alloc(N * qrow * 4), *ref = (float *)tu_alloc(N * qrow * 4);
    float *out = (float *)tu_alloc(N * qrow * 4), *poisoned = (float *)tu_alloc(N * qrow * 4);
    kvq_attn_params ap = {PQH, N, 0.0f};
    tu_rng r = {2024};
    int i, f, t0i, sp, k, j;
    tu_fill_kv(&r, TU_STRUCTURED, T0 + N, PH, D, K, V);
    tu_fill_q(&r, TU_STRUCTURED, N * qrow, D, q);
    memset(poisoned, POISON, N * qrow * 4);
    for (i = 0; i < n_isas; i++) {
        kvq_set_isa((kvq_isa)isas[i]);
        for (f = 0; f < (int)(sizeof cfgs / sizeof cfgs[0]); f++)
            for (t0i = 0; t0i < 2; t0i++) {
                const int T0n = t0i ? T0 : 0;
                kvq_config cfg = spec_config(&cfgs[f]);
                kvq_cache *a = NULL, *b = NULL;
                cfg.n_kv_heads = PH;
                cfg.max_tokens = T0 + N;
                CHECK(kvq_cache_create(&a, &cfg) == KVQ_OK && kvq_cache_create(&b, &cfg) == KVQ_OK, "create");
                if (!a || !b) continue;
                kvq_cache_append(a, K, V, T0n);
                kvq_cache_append(b, K, V, T0n);
                CHECK(kvq_attention_prefill(a, K + T0n * row, V + T0n * row, N, q, ref, &ap) == KVQ_OK, "prefill");
                for (sp = 0; sp < (int)(sizeof splits / sizeof splits[0]); sp++) {
                    const prefill_split *x = &splits[sp];
                    int ok = 1;
                    memset(out, POISON, N * qrow * 4);
                    for (k = x->n_q - 1; k >= 0; k--) /* backwards: no call depends on another */
                        for (j = x->n_h - 1; j >= 0; j--)
                            ok &= kvq_attention_prefill_partial(b, K + T0n * row, V + T0n * row, N, q, out, &ap,
                                                                x->q_cut[k], x->q_cut[k + 1], x->h_cut[j],
                                                                x->h_cut[j + 1]) == KVQ_OK;
                    CHECK(ok && kvq_cache_tokens(b) == T0n, "split %d: partial calls, nothing appended", sp);
                    CHECK(memcmp(out, ref, N * qrow * 4) == 0, "%s cfg %d T0 %d split %d: not prefill's bits",
                          kvq_isa_name((kvq_isa)isas[i]), f, T0n, sp);
                }
                /* one range writes its rows only: queries [5, 30) of KV head 2 (query heads 4, 5) */
                memset(out, POISON, N * qrow * 4);
                CHECK(kvq_attention_prefill_partial(b, K + T0n * row, V + T0n * row, N, q, out, &ap, 5, 30, 2, 3) ==
                          KVQ_OK, "one range");
                {
                    int rows_ok = 1, qi, qh;
                    for (qi = 0; qi < N; qi++)
                        for (qh = 0; qh < PQH; qh++) {
                            const size_t at = ((size_t)qi * PQH + qh) * D;
                            const int mine = qi >= 5 && qi < 30 && qh / (PQH / PH) == 2;
                            rows_ok &= mine ? memcmp(out + at, ref + at, D * 4) == 0
                                            : memcmp(out + at, poisoned + at, D * 4) == 0;
                        }
                    CHECK(rows_ok, "cfg %d: a partial wrote outside its rows, or other bits in them", f);
                }
                CHECK(kvq_cache_append(b, K + T0n * row, V + T0n * row, N) == KVQ_OK, "append after the partials");
                CHECK(same_cache(a, b), "%s cfg %d T0 %d: the cache after partials + append is not prefill's",
                      kvq_isa_name((kvq_isa)isas[i]), f, T0n);
                kvq_cache_destroy(a);
                kvq_cache_destroy(b);
            }
    }
    kvq_set_isa(KVQ_ISA_SCALAR);
    { /* refusals write nothing and append nothing */
        kvq_config cfg = kvq_default_config(D, PH, T0 + N - 1);
        kvq_cache *c = NULL;
        float keep;
        CHECK(kvq_cache_create(&c, &cfg) == KVQ_OK, "create");
#define PREFILL_REFUSED(call, expect)                                                                   \
    do {                                                                                                \
        memset(out, POISON, N * qrow * 4);                                                              \
        CHECK((call) == (expect), #call);                                                               \
        CHECK(memcmp(out, poisoned, N * qrow * 4) == 0 && kvq_cache_tokens(c) == T0, #call " wrote");   \
    } while (0)
        kvq_cache_append(c, K, V, T0);
        PREFILL_REFUSED(kvq_attention_prefill_partial(c, K, V, N, q, out, &ap, 0, N, 0, PH), KVQ_ERR_FULL);
        ap.n_queries = N - 2;
        PREFILL_REFUSED(kvq_attention_prefill_partial(c, K, V, N - 2, q, out, &ap, 0, N - 1, 0, PH), KVQ_ERR_INVALID);
        PREFILL_REFUSED(kvq_attention_prefill_partial(c, K, V, N - 2, q, out, &ap, 3, 2, 0, PH), KVQ_ERR_INVALID);
        PREFILL_REFUSED(kvq_attention_prefill_partial(c, K, V, N - 2, q, out, &ap, -1, 2, 0, PH), KVQ_ERR_INVALID);
        PREFILL_REFUSED(kvq_attention_prefill_partial(c, K, V, N - 2, q, out, &ap, 0, 2, 1, 1), KVQ_ERR_INVALID);
        PREFILL_REFUSED(kvq_attention_prefill_partial(c, K, V, N - 2, q, out, &ap, 0, 2, 0, PH + 1), KVQ_ERR_INVALID);
        PREFILL_REFUSED(kvq_attention_prefill_partial(c, K, V, N - 2, q, out, &ap, 0, 2, -1, 1), KVQ_ERR_INVALID);
        PREFILL_REFUSED(kvq_attention_prefill_partial(c, K, V, N - 3, q, out, &ap, 0, 2, 0, 1), KVQ_ERR_INVALID);
        PREFILL_REFUSED(kvq_attention_prefill_partial(NULL, K, V, N - 2, q, out, &ap, 0, 2, 0, 1), KVQ_ERR_INVALID);
        PREFILL_REFUSED(kvq_attention_prefill_partial(c, K, V, N - 2, q, NULL, &ap, 0, 2, 0, 1), KVQ_ERR_INVALID);
        PREFILL_REFUSED(kvq_attention_prefill_partial(c, K, V, N - 2, q, out, NULL, 0, 2, 0, 1), KVQ_ERR_INVALID);
        keep = K[7];
        K[7] = NAN;
        PREFILL_REFUSED(kvq_attention_prefill_partial(c, K, V, N - 2, q, out, &ap, 0, 2, 0, 1), KVQ_ERR_INVALID);
        K[7] = keep;
        keep = q[3];
        q[3] = INFINITY;
        PREFILL_REFUSED(kvq_attention_prefill_partial(c, K, V, N - 2, q, out, &ap, 0, 2, 0, 1), KVQ_ERR_INVALID);
        q[3] = keep;
        /* out over q, k, v */
        CHECK(kvq_attention_prefill_partial(c, K, V, N - 2, q, q + 8, &ap, 0, 2, 0, 1) == KVQ_ERR_INVALID, "out over q");
        CHECK(kvq_attention_prefill_partial(c, K, V, N - 2, q, K + 3, &ap, 0, 2, 0, 1) == KVQ_ERR_INVALID, "out over k");
        CHECK(kvq_attention_prefill_partial(c, K, V, N - 2, q, V, &ap, 0, 2, 0, 1) == KVQ_ERR_INVALID, "out over v");
        memset(out, POISON, N * qrow * 4);
        CHECK(kvq_attention_prefill_partial(c, K, V, N - 2, q, out, &ap, 0, 0, 0, 1) == KVQ_OK &&
                  memcmp(out, poisoned, N * qrow * 4) == 0,
              "no queries: fine, and nothing written");
        CHECK(kvq_cache_tokens(c) == T0, "nothing appended");
#undef PREFILL_REFUSED
        kvq_cache_destroy(c);
    }
    free(K); free(V); free(q); free(ref); free(out); free(poisoned);
}

int main(void) {
    find_isas();
    test_mixed();
    test_long_among_short();
    test_refusals();
    test_prefill_split();
    return tu_finish("test_batch");
}
