/* Thread safety: concurrent kvq_attention calls on one cache, and split attention
   spread over threads (disjoint KV-head rows of one state, token ranges in
   separate states), give the single-threaded results. `make tsan` runs it
   under ThreadSanitizer. */
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

    /* split: two token ranges (two states) x two KV-head ranges (rows of each state) */
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
    kvq_cache_destroy(c);
    free(k); free(v); free(q); free(serial); free(outs); free(st[0]); free(st[1]);
    return tu_finish("test_threads");
}
