/* Thread safety, as kvq.h promises it: concurrent kvq_attention calls on one cache, and
   split attention spread over threads (disjoint KV-head rows of one state, token ranges in
   separate states), give the single-threaded results; appends (and attention that records
   salience) under a reader-writer lock, as the header asks, race with nothing and build
   the cache a single thread would; a batch plan's shares run on threads with a barrier
   between attention and merge. `make tsan` runs it under ThreadSanitizer. */
#define _POSIX_C_SOURCE 200809L /* pthread_rwlock_t under -std=c99 */
#define KVQ_IMPLEMENTATION
#include "../kvq.h"
#include "test_util.h"
#include <pthread.h>

enum { D = 64, H = 4, NQH = 8, NQ = 2, T = 1500, THREADS = 4 };

typedef struct job {
    kvq_cache *c;
    const float *q;
    float *out, *state;
    int tok_first, tok_end, kv_first, kv_end, iterations;
    kvq_status st;
} job;

static void *run_attention(void *arg) {
    job *j = (job *)arg;
    kvq_attn_params ap = {NQH, NQ, 0.0f};
    int i;
    for (i = 0; i < j->iterations && j->st == KVQ_OK; i++) j->st = kvq_attention(j->c, j->q, j->out, &ap);
    return NULL;
}

static void *run_partial(void *arg) {
    job *j = (job *)arg;
    kvq_attn_params ap = {NQH, NQ, 0.0f};
    j->st = kvq_attention_partial(j->c, j->q, &ap, j->tok_first, j->tok_end, j->kv_first, j->kv_end, j->state);
    return NULL;
}

/* One appender and two attention threads on one cache, through a reader-writer lock: appends
   (and, with recorded salience, attention too) hold it exclusively, other calls share it. */
typedef struct shared_cache {
    pthread_rwlock_t lock;
    kvq_cache *c;
    const float *k, *v, *q;
    int n, writes_attend, bad;
} shared_cache;

static void *appender(void *arg) {
    shared_cache *s = (shared_cache *)arg;
    int t;
    for (t = 0; t < s->n; t++) {
        pthread_rwlock_wrlock(&s->lock);
        if (kvq_cache_append(s->c, s->k + (size_t)t * H * D, s->v + (size_t)t * H * D, 1) != KVQ_OK) s->bad++;
        pthread_rwlock_unlock(&s->lock);
    }
    return NULL;
}

static void *attender(void *arg) {
    shared_cache *s = (shared_cache *)arg;
    kvq_attn_params ap = {NQH, 1, 0.0f};
    float out[NQH * D];
    int i, j, bad = 0;
    for (i = 0; i < 200; i++) {
        kvq_status st;
        if (s->writes_attend) pthread_rwlock_wrlock(&s->lock);
        else pthread_rwlock_rdlock(&s->lock);
        st = kvq_cache_tokens(s->c) > 0 ? kvq_attention(s->c, s->q, out, &ap) : KVQ_OK;
        if (st == KVQ_OK && kvq_cache_tokens(s->c) > 0)
            for (j = 0; j < NQH * D; j++) bad += !isfinite(out[j]);
        pthread_rwlock_unlock(&s->lock);
        bad += st != KVQ_OK;
    }
    pthread_rwlock_wrlock(&s->lock);
    s->bad += bad;
    pthread_rwlock_unlock(&s->lock);
    return NULL;
}

static void test_locked_appends(const float *k, const float *v, const float *q) {
    int salient;
    for (salient = 0; salient < 2; salient++) {
        kvq_config cfg = kvq_default_config(D, H, 400);
        shared_cache s;
        kvq_cache *serial = NULL;
        pthread_t th[3];
        size_t na, nb;
        uint8_t *ia, *ib;
        int t;
        cfg.salient_ratio = salient ? 0.1f : 0.0f;
        memset(&s, 0, sizeof s);
        pthread_rwlock_init(&s.lock, NULL);
        s.k = k;
        s.v = v;
        s.q = q;
        s.n = 400;
        s.writes_attend = salient; /* attention records salience: it writes */
        CHECK(kvq_cache_create(&s.c, &cfg) == KVQ_OK, "create");
        pthread_create(&th[0], NULL, appender, &s);
        for (t = 1; t < 3; t++) pthread_create(&th[t], NULL, attender, &s);
        for (t = 0; t < 3; t++) pthread_join(th[t], NULL);
        CHECK(s.bad == 0 && kvq_cache_tokens(s.c) == 400, "salient %d: %d failed calls", salient, s.bad);
        if (!salient) { /* attention only read: the cache is the one a single thread builds */
            kvq_cache_create(&serial, &cfg);
            kvq_cache_append(serial, k, v, 400);
            na = kvq_cache_serialized_bytes(s.c);
            nb = kvq_cache_serialized_bytes(serial);
            ia = (uint8_t *)tu_alloc(na);
            ib = (uint8_t *)tu_alloc(nb);
            kvq_cache_serialize(s.c, ia, na, NULL);
            kvq_cache_serialize(serial, ib, nb, NULL);
            CHECK(na == nb && memcmp(ia, ib, na) == 0, "appends among attention calls built another cache");
            free(ia); free(ib);
            kvq_cache_destroy(serial);
        }
        kvq_cache_destroy(s.c);
        pthread_rwlock_destroy(&s.lock);
    }
}

/* Batched attention on real threads: each runs its attention share, meets the others at a
   barrier, and merges its share; then prefill's split form, one KV head per thread, and the
   append after a join. Outputs as one kvq_attention / kvq_attention_prefill call gives them. */
enum { BATCH_SEQS = 5 };

typedef struct batch_job {
    kvq_batch *plan;
    pthread_barrier_t *barrier;
    const kvq_cache *c;
    const float *k, *v, *q;
    float *out;
    int index, n;
    kvq_status st;
} batch_job;

static void *run_batch_share(void *arg) {
    batch_job *j = (batch_job *)arg;
    kvq_status a = kvq_batch_attention(j->plan, j->index), m;
    pthread_barrier_wait(j->barrier);
    m = kvq_batch_merge(j->plan, j->index);
    j->st = a != KVQ_OK ? a : m;
    return NULL;
}

static void *run_prefill_head(void *arg) {
    batch_job *j = (batch_job *)arg;
    kvq_attn_params ap = {NQH, 0, 0.0f};
    ap.n_queries = j->n;
    j->st = kvq_attention_prefill_partial(j->c, j->k, j->v, j->n, j->q, j->out, &ap, 0, j->n, j->index, j->index + 1);
    return NULL;
}

static void test_batch_threads(const float *k, const float *v) {
    static const int lengths[BATCH_SEQS] = {1400, 37, 300, 900, 64};
    enum { N = 40 }; /* prefill chunk */
    const size_t nout = (size_t)NQH * D;
    float *q = (float *)tu_alloc(nout * 4 * N); /* queries of the batch's sequences, then of the chunk */
    kvq_cache *cs[BATCH_SEQS];
    const float *qs[BATCH_SEQS];
    float *outs[BATCH_SEQS], *ref = (float *)tu_alloc(nout * 4 * BATCH_SEQS);
    kvq_attn_params ap = {NQH, 1, 0.0f};
    pthread_barrier_t barrier;
    pthread_t th[THREADS];
    batch_job jobs[THREADS];
    kvq_batch *plan = NULL;
    size_t bytes;
    void *mem;
    tu_rng r = {77};
    int s, t, ok = 1;
    tu_fill_q(&r, TU_STRUCTURED, nout * N, D, q);
    for (s = 0; s < BATCH_SEQS; s++) {
        kvq_config cfg = kvq_default_config(D, H, lengths[s]);
        cfg.key_bits = s % 2 ? 4 : 2;
        cfg.rotation = s == 3 ? KVQ_ROTATE_HADAMARD : KVQ_ROTATE_NONE;
        cs[s] = NULL;
        CHECK(kvq_cache_create(&cs[s], &cfg) == KVQ_OK && kvq_cache_append(cs[s], k, v, lengths[s]) == KVQ_OK,
              "batch cache %d", s);
        qs[s] = q + nout * s;
        outs[s] = (float *)tu_alloc(nout * 4);
        CHECK(kvq_attention(cs[s], qs[s], ref + nout * s, &ap) == KVQ_OK, "reference %d", s);
    }
    bytes = kvq_batch_plan_bytes(kvq_cache_config(cs[0]), &ap, BATCH_SEQS, THREADS);
    mem = tu_alloc(bytes);
    CHECK(kvq_batch_plan(&plan, mem, bytes, cs, qs, outs, BATCH_SEQS, &ap, THREADS) == KVQ_OK, "plan");
    pthread_barrier_init(&barrier, NULL, THREADS);
    for (t = 0; t < THREADS; t++) {
        memset(&jobs[t], 0, sizeof jobs[t]);
        jobs[t].plan = plan;
        jobs[t].barrier = &barrier;
        jobs[t].index = t;
        pthread_create(&th[t], NULL, run_batch_share, &jobs[t]);
    }
    for (t = 0; t < THREADS; t++) pthread_join(th[t], NULL);
    pthread_barrier_destroy(&barrier);
    for (t = 0; t < THREADS; t++) ok &= jobs[t].st == KVQ_OK;
    CHECK(ok, "batch shares on threads");
    for (s = 0; s < BATCH_SEQS; s++)
        CHECK(tu_nmse(outs[s], ref + nout * s, nout) < 1e-10, "threaded batch, sequence %d: NMSE %g", s,
              tu_nmse(outs[s], ref + nout * s, nout));
    { /* prefill of 40 tokens after the 37 of cache 1, one KV head per thread, then the append */
        kvq_config cfg = *kvq_cache_config(cs[1]);
        kvq_cache *a = NULL;
        float *pre = (float *)tu_alloc((size_t)N * nout * 4), *split = (float *)tu_alloc((size_t)N * nout * 4);
        kvq_attn_params pp = {NQH, N, 0.0f};
        const size_t row = (size_t)H * D;
        cfg.max_tokens = 37 + N;
        CHECK(kvq_cache_create(&a, &cfg) == KVQ_OK && kvq_cache_append(a, k, v, 37) == KVQ_OK, "prefill cache");
        CHECK(kvq_attention_prefill(a, k + 37 * row, v + 37 * row, N, q, pre, &pp) == KVQ_OK, "prefill");
        kvq_cache_destroy(a);
        CHECK(kvq_cache_create(&a, &cfg) == KVQ_OK && kvq_cache_append(a, k, v, 37) == KVQ_OK, "prefill cache");
        for (t = 0; t < THREADS && t < H; t++) {
            memset(&jobs[t], 0, sizeof jobs[t]);
            jobs[t].c = a;
            jobs[t].k = k + 37 * row;
            jobs[t].v = v + 37 * row;
            jobs[t].q = q;
            jobs[t].out = split;
            jobs[t].n = N;
            jobs[t].index = t;
            pthread_create(&th[t], NULL, run_prefill_head, &jobs[t]);
        }
        for (t = 0; t < THREADS && t < H; t++) pthread_join(th[t], NULL);
        for (t = 0, ok = 1; t < THREADS && t < H; t++) ok &= jobs[t].st == KVQ_OK;
        CHECK(ok && kvq_cache_append(a, k + 37 * row, v + 37 * row, N) == KVQ_OK, "prefill heads on threads, append");
        CHECK(memcmp(pre, split, (size_t)N * nout * 4) == 0, "threaded prefill is not prefill's bits");
        kvq_cache_destroy(a);
        free(pre);
        free(split);
    }
    for (s = 0; s < BATCH_SEQS; s++) {
        kvq_cache_destroy(cs[s]);
        free(outs[s]);
    }
    free(ref);
    free(mem);
    free(q);
}

int main(void) {
    kvq_config cfg = kvq_default_config(D, H, T);
    kvq_cache *c = NULL;
    size_t n = (size_t)T * H * D, nout = (size_t)NQ * NQH * D, sf, i;
    float *k = (float *)tu_alloc(n * 4), *v = (float *)tu_alloc(n * 4), *q = (float *)tu_alloc(nout * 4);
    float *serial = (float *)tu_alloc(nout * 4), *outs = (float *)tu_alloc(nout * 4 * THREADS);
    float *st[2];
    const float *cst[2];
    pthread_t th[THREADS];
    job jobs[THREADS];
    kvq_attn_params ap = {NQH, NQ, 0.0f};
    tu_rng r = {2024};
    int t, ok;
    double e = 0, rr = 0;
    cfg.sink_tokens = 2;
    tu_fill_kv(&r, TU_STRUCTURED, T, H, D, k, v);
    tu_fill_q(&r, TU_STRUCTURED, nout, D, q);
    CHECK(kvq_cache_create(&c, &cfg) == KVQ_OK, "create");
    CHECK(kvq_cache_append(c, k, v, T) == KVQ_OK, "append");
    CHECK(kvq_attention(c, q, serial, &ap) == KVQ_OK, "serial attention");

    /* the same call from four threads at once */
    for (t = 0; t < THREADS; t++) {
        memset(&jobs[t], 0, sizeof jobs[t]);
        jobs[t].c = c;
        jobs[t].q = q;
        jobs[t].out = outs + nout * t;
        jobs[t].iterations = 3;
        pthread_create(&th[t], NULL, run_attention, &jobs[t]);
    }
    for (t = 0; t < THREADS; t++) pthread_join(th[t], NULL);
    for (t = 0, ok = 1; t < THREADS; t++)
        ok &= jobs[t].st == KVQ_OK && memcmp(outs + nout * t, serial, nout * 4) == 0;
    CHECK(ok, "concurrent kvq_attention calls differ from the serial one");

    /* split: two token ranges (two states) x two KV-head ranges (rows of each state); float arithmetic,
       whose split runs equal the whole one to rounding (the integer scheme quantizes weights per tile,
       and 700 is no tile boundary) */
    kvq_set_arith(KVQ_ARITH_FLOAT);
    CHECK(kvq_attention(c, q, serial, &ap) == KVQ_OK, "serial attention, float");
    sf = kvq_attention_state_floats(c, &ap);
    st[0] = (float *)tu_alloc(sf * 4);
    st[1] = (float *)tu_alloc(sf * 4);
    for (t = 0; t < THREADS; t++) {
        memset(&jobs[t], 0, sizeof jobs[t]);
        jobs[t].c = c;
        jobs[t].q = q;
        jobs[t].state = st[t / 2];
        jobs[t].tok_first = t / 2 ? 700 : 0;
        jobs[t].tok_end = t / 2 ? T : 700;
        jobs[t].kv_first = t % 2 ? 1 : 0;
        jobs[t].kv_end = t % 2 ? H : 1;
        pthread_create(&th[t], NULL, run_partial, &jobs[t]);
    }
    for (t = 0; t < THREADS; t++) pthread_join(th[t], NULL);
    for (t = 0, ok = 1; t < THREADS; t++) ok &= jobs[t].st == KVQ_OK;
    CHECK(ok, "partial calls");
    cst[0] = st[0];
    cst[1] = st[1];
    CHECK(kvq_attention_merge(c, &ap, cst, 2, outs) == KVQ_OK, "merge");
    for (i = 0; i < nout; i++) {
        e += (outs[i] - serial[i]) * (outs[i] - serial[i]);
        rr += serial[i] * serial[i];
    }
    CHECK(e / rr < 1e-10, "threaded split differs: %g", e / rr);
    kvq_set_arith(KVQ_ARITH_AUTO);
    kvq_cache_destroy(c);
    test_locked_appends(k, v, q);
    test_batch_threads(k, v);
    free(k); free(v); free(q); free(serial); free(outs); free(st[0]); free(st[1]);
    return tu_finish("test_threads");
}
