/* Hadamard rotation: orthogonal for every head_dim, inverse exact, deterministic per
   seed; a rotated cache reads back in the caller's space and attends like an
   unrotated one (exactly so at 16 bits); bad arguments are refused. */
#define KVQ_IMPLEMENTATION
#include "../kvq.h"
#include "test_util.h"

/* Columns of M, from rotating the unit vectors. */
static double orthogonality_error(int n, unsigned seed) {
    float *m = (float *)tu_alloc((size_t)n * n * 4);
    double worst = 0.0;
    int i, j, k;
    for (j = 0; j < n; j++) {
        float *col = m + (size_t)j * n;
        col[j] = 1.0f;
        kvq_hadamard(col, n, seed);
    }
    for (i = 0; i < n; i++)
        for (j = i; j < n; j++) {
            double d = 0.0;
            for (k = 0; k < n; k++) d += (double)m[(size_t)i * n + k] * m[(size_t)j * n + k];
            d -= i == j ? 1.0 : 0.0;
            worst = fabs(d) > worst ? fabs(d) : worst;
        }
    free(m);
    return worst;
}

static void test_transform(void) {
    int n, worst_n = 0, inv_bad = 0, spread_bad = 0;
    double worst = 0.0;
    tu_rng r = {31};
    for (n = 8; n <= 512; n += 8) {
        float x[512], y[512], z[512];
        double e = orthogonality_error(n, 1234u), back = 0.0, top = 0.0;
        int i;
        if (e > worst) { worst = e; worst_n = n; }
        for (i = 0; i < n; i++) x[i] = tu_normal(&r);
        memcpy(y, x, sizeof x);
        kvq_hadamard(y, n, 99u);
        kvq_hadamard_inverse(y, n, 99u);
        for (i = 0; i < n; i++) back = fabs(y[i] - x[i]) > back ? fabs(y[i] - x[i]) : back;
        if (back > 1e-5) inv_bad++;
        /* one outlier channel spreads: no output keeps more than half of its energy */
        memset(z, 0, sizeof z);
        z[n / 3] = 10.0f;
        kvq_hadamard(z, n, 5u);
        for (i = 0; i < n; i++) top = fabs(z[i]) > top ? fabs(z[i]) : top;
        if (top * top > 0.5 * 100.0) spread_bad++;
    }
    CHECK(worst < 1e-6, "M^T M = I off by %g at head_dim %d", worst, worst_n);
    CHECK(inv_bad == 0, "%d head_dims where inverse(forward(x)) != x", inv_bad);
    CHECK(spread_bad == 0, "%d head_dims where an outlier channel did not spread", spread_bad);
    {
        float a[128], b[128];
        int i, differ = 0;
        for (i = 0; i < 128; i++) a[i] = b[i] = (float)i;
        kvq_hadamard(a, 128, 7u);
        kvq_hadamard(b, 128, 7u);
        CHECK(memcmp(a, b, sizeof a) == 0, "same seed, different rotation");
        for (i = 0; i < 128; i++) b[i] = (float)i;
        kvq_hadamard(b, 128, 8u);
        for (i = 0; i < 128; i++) differ += a[i] != b[i];
        CHECK(differ > 0, "different seeds, same rotation");
    }
    {
        float x[16] = {0};
        CHECK(kvq_hadamard(NULL, 16, 1) == KVQ_ERR_INVALID, "NULL");
        CHECK(kvq_hadamard(x, 12, 1) == KVQ_ERR_INVALID, "n = 12");
        CHECK(kvq_hadamard(x, 0, 1) == KVQ_ERR_INVALID, "n = 0");
        CHECK(kvq_hadamard_inverse(x, 520, 1) == KVQ_ERR_INVALID, "n = 520");
    }
}

/* Attention of a rotated cache against the same cache unrotated. */
static double rotated_vs_plain(int D, int bits, double *read_err) {
    kvq_config a = kvq_default_config(D, 2, 300), b;
    kvq_cache *ca = NULL, *cb = NULL;
    const int T = 260, NQH = 4, NQ = 2;
    size_t n = (size_t)T * 2 * D, no = (size_t)NQ * NQH * D, i;
    float *k = (float *)tu_alloc(n * 4), *v = (float *)tu_alloc(n * 4), *kr = (float *)tu_alloc(n * 4);
    float *q = (float *)tu_alloc(no * 4), *oa = (float *)tu_alloc(no * 4), *ob = (float *)tu_alloc(no * 4);
    kvq_attn_params ap = {NQH, NQ, 0.0f};
    tu_rng r = {17};
    double e = 0, rr = 0, re = 0, rn = 0;
    a.key_bits = a.value_bits = bits;
    a.sink_tokens = 2;
    a.residual_tokens = 64;
    b = a;
    b.rotation = KVQ_ROTATE_HADAMARD;
    tu_fill_kv(&r, TU_STRUCTURED, T, 2, D, k, v);
    tu_fill_q(&r, TU_STRUCTURED, no, D, q);
    if (kvq_cache_create(&ca, &a) != KVQ_OK || kvq_cache_create(&cb, &b) != KVQ_OK) {
        CHECK(0, "create D %d", D);
        return 1.0;
    }
    kvq_cache_append(ca, k, v, T);
    kvq_cache_append(cb, k, v, T);
    CHECK(kvq_attention(ca, q, oa, &ap) == KVQ_OK && kvq_attention(cb, q, ob, &ap) == KVQ_OK, "attention");
    for (i = 0; i < no; i++) {
        e += (oa[i] - ob[i]) * (oa[i] - ob[i]);
        rr += (double)oa[i] * oa[i];
    }
    kvq_cache_read(cb, 0, T, kr, NULL);
    for (i = 0; i < n; i++) {
        re += (kr[i] - k[i]) * (kr[i] - k[i]);
        rn += (double)k[i] * k[i];
    }
    *read_err = re / rn;
    kvq_cache_destroy(ca);
    kvq_cache_destroy(cb);
    free(k); free(v); free(kr); free(q); free(oa); free(ob);
    return e / rr;
}

static void test_cache(void) {
    static const int dims[] = {8, 64, 80, 96, 112, 128, 72, 256};
    int i;
    for (i = 0; i < 8; i++) {
        double read_err, err = rotated_vs_plain(dims[i], 16, &read_err);
        CHECK(err < 1e-5, "fp16 cache: rotated attention differs by %g (D %d)", err, dims[i]);
        CHECK(read_err < 1e-6, "fp16 cache: rotated read-back error %g (D %d)", read_err, dims[i]);
        err = rotated_vs_plain(dims[i], 4, &read_err);
        CHECK(read_err < 1e-2, "4-bit rotated read-back error %g (D %d)", read_err, dims[i]);
    }
    {
        kvq_config cfg = kvq_default_config(64, 1, 10);
        cfg.rotation = 3;
        CHECK(kvq_config_check(&cfg) == KVQ_ERR_INVALID, "rotation 3");
        cfg.rotation = -1;
        CHECK(kvq_config_check(&cfg) == KVQ_ERR_INVALID, "rotation -1");
        cfg.rotation = KVQ_ROTATE_PREROTATED;
        CHECK(kvq_config_check(&cfg) == KVQ_OK, "prerotated");
    }
    { /* a row inside fp16 range can leave it once rotated: refused, nothing appended */
        kvq_config cfg = kvq_default_config(64, 1, 10);
        kvq_cache *c = NULL;
        float k[64], v[64];
        int i;
        cfg.rotation = KVQ_ROTATE_HADAMARD;
        for (i = 0; i < 64; i++) { k[i] = 60000.0f; v[i] = 1.0f; }
        CHECK(kvq_cache_create(&c, &cfg) == KVQ_OK, "create");
        CHECK(kvq_cache_append(c, k, v, 1) == KVQ_ERR_INVALID && kvq_cache_tokens(c) == 0,
              "a row that overflows fp16 once rotated must be refused");
        for (i = 0; i < 64; i++) k[i] = 8000.0f; /* norm 64000 */
        CHECK(kvq_cache_append(c, k, v, 1) == KVQ_OK, "norm within range");
        kvq_cache_destroy(c);
    }
}

/* KVQ_ROTATE_PREROTATED: inputs rotated by the caller with kvq_hadamard give what the cache's
   own rotation gives, once the caller rotates the output back (the QuaRot-style folding). */
static void test_prerotated(void) {
    const int D = 96, H = 2, NQH = 4, T = 200;
    kvq_config a = kvq_default_config(D, H, T), b;
    kvq_cache *ca = NULL, *cb = NULL;
    size_t n = (size_t)T * H * D, no = (size_t)NQH * D, i;
    float *k = (float *)tu_alloc(n * 4), *v = (float *)tu_alloc(n * 4), *q = (float *)tu_alloc(no * 4);
    float *oa = (float *)tu_alloc(no * 4), *ob = (float *)tu_alloc(no * 4);
    kvq_attn_params ap = {NQH, 1, 0.0f};
    tu_rng r = {44};
    double e = 0, rr = 0;
    a.rotation = KVQ_ROTATE_HADAMARD;
    a.seed = 77u;
    b = a;
    b.rotation = KVQ_ROTATE_PREROTATED;
    tu_fill_kv(&r, TU_STRUCTURED, T, H, D, k, v);
    tu_fill_q(&r, TU_STRUCTURED, no, D, q);
    CHECK(kvq_cache_create(&ca, &a) == KVQ_OK && kvq_cache_create(&cb, &b) == KVQ_OK, "create");
    if (!ca || !cb) return;
    kvq_cache_append(ca, k, v, T);
    for (i = 0; i < n; i += D) { /* the caller's folding, done here by hand */
        kvq_hadamard(k + i, D, 77u);
        kvq_hadamard(v + i, D, 77u);
    }
    for (i = 0; i < no; i += D) kvq_hadamard(q + i, D, 77u);
    kvq_cache_append(cb, k, v, T);
    CHECK(kvq_attention(ca, q, oa, &ap) == KVQ_OK, "attention"); /* q rotated: ca sees another query */
    for (i = 0; i < no; i += D) kvq_hadamard_inverse(q + i, D, 77u);
    kvq_attention(ca, q, oa, &ap);
    for (i = 0; i < no; i += D) kvq_hadamard(q + i, D, 77u);
    kvq_attention(cb, q, ob, &ap);
    for (i = 0; i < no; i += D) kvq_hadamard_inverse(ob + i, D, 77u);
    for (i = 0; i < no; i++) {
        e += (oa[i] - ob[i]) * (oa[i] - ob[i]);
        rr += (double)oa[i] * oa[i];
    }
    CHECK(e / rr < 1e-10, "prerotated inputs differ from the cache's rotation: %g", e / rr);
    kvq_cache_destroy(ca);
    kvq_cache_destroy(cb);
    free(k); free(v); free(q); free(oa); free(ob);
}

int main(void) {
    test_transform();
    test_cache();
    test_prerotated();
    return tu_finish("test_rotate");
}
