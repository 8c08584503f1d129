/* llama_model.h — a small Llama forward pass whose attention runs on a kvq cache.

   The model is the llama2.c architecture: RMSNorm (eps 1e-5), interleaved-pair
   RoPE (theta 10000), grouped-query attention, SwiGLU FFN, fp32 weights. Each
   layer's attention goes either through one kvq cache (kvq_cache_append of the
   token's post-RoPE K and V, then kvq_attention with n_queries = 1; a prompt in
   one kvq_attention_prefill per layer; kvq_cache_truncate to roll back), or
   through an exact fp32 path with its own float K/V arrays: the baseline every
   kvq config is measured against.

   Also here, shared by llama.c, kvq_eval.c, kvdump.c and the tests:
     - cache-config strings ("k2v2", "k4v2g64r0s4", "fp32"),
     - windowed scoring of a token sequence (cross-entropy, KL vs fp32),
     - KVDUMP01 dumps of a token sequence's attention inputs (llm_dump).

   Include kvq.h and kvq_data.h before this header. stb-style: in exactly one
   .c file define LLAMA_MODEL_IMPLEMENTATION first. C99. */
#ifndef LLAMA_MODEL_H_INCLUDED
#define LLAMA_MODEL_H_INCLUDED

#include <stddef.h>

#ifdef __cplusplus
extern "C" {
#endif

/* ---- cache-config strings ------------------------------------------------

   spec  := "default" | "fp32" | "fp16" | item+      (case-insensitive)
   item  := 'k' BITS | 'v' BITS          key / value bits: 2 3 4 8 16
          | 'g' N                        group_size
          | 'r' N                        residual_tokens (multiple of g)
          | 's' N                        sink_tokens
          | 'h'                          Hadamard rotation
          | 'x' N                        salient tokens: N percent of each key block at 8 bits
          | 'e'                          salient tokens chosen by quantization error, not attention
          | 't'                          keys quantized per token (like values), not per channel
          | 'c' N                        range search: N steps a side per group (0 = min/max)
          | 'b' N                        key_block: tokens per key block (0 = g)
          | 'p' N                        value_param_bits: 16 or 32
   "default" is kvq_default_config(head_dim, n_kv_heads, max_tokens) as it is (K3V2:
   k3v2b64p16). Otherwise unnamed fields keep that default but for b0 and p32, so a
   string names one shape whatever the library's default (k2v2 is KIVI-2's shape);
   when g or b is given without r, the default residual is rounded up to a multiple
   of the key block. "fp16" is k16v16; "fp32" selects the exact float path. */
typedef struct llm_cache_spec {
    char name[48];
    int fp32;          /* 1: exact fp32 attention, cfg unused */
    kvq_config cfg;
} llm_cache_spec;

int    llm_parse_config(const char *spec, int head_dim, int n_kv_heads, int max_tokens,
                        llm_cache_spec *out, char *err, size_t err_size);
/* Storage per K/V element of the quantized part, from the format alone
   (no residual window, no sinks): b + 32/G for keys (fp16 scale and min per
   channel per block of G tokens), b + 32*ceil(head_dim/G)/head_dim for values
   (fp16 scale and min per group of G channels; one shorter group at the end). */
double llm_bits_steady(const llm_cache_spec *s);

/* ---- model run state ---------------------------------------------------- */

/* Optional per-layer tap (the KV dumper's): llm_forward calls it twice per layer,
   post_rope 0 right after the Q/K/V projections and post_rope 1 after RoPE, before
   attention. q: [n_heads][head_dim], k and v: [n_kv_heads][head_dim]; pos is the
   token's position in its window. The arrays are valid during the call only. */
typedef void (*llm_tap_fn)(void *ctx, int layer, int pos, int post_rope, const float *q, const float *k,
                           const float *v);

typedef struct llm_run {
    const kvqd_checkpoint *ck;
    llm_cache_spec spec;
    kvq_cache **caches;              /* [n_layers], kvq path */
    float *key_cache, *value_cache;  /* [n_layers][seq_len][kv_dim], fp32 path */
    float *x, *xb, *xb2, *hb, *hb2, *q, *k, *v, *att, *logits;
    float *rope_cos, *rope_sin;      /* [seq_len][head_dim / 2] */
    int pos;                         /* tokens in the current window */
    llm_tap_fn tap;                  /* NULL (llm_run_init's) or set by the caller after init */
    void *tap_ctx;
} llm_run;

int  llm_run_init(llm_run *r, const kvqd_checkpoint *ck, const llm_cache_spec *spec,
                  char *err, size_t err_size);
void llm_run_free(llm_run *r);
/* Starts a new window: position 0, every cache empty. */
void llm_run_reset(llm_run *r);
/* Runs `token` at position r->pos (then pos++); returns the logits [vocab],
   or NULL when the window is full or kvq reports an error. */
const float *llm_forward(llm_run *r, int token, char *err, size_t err_size);
/* Runs tokens[0..n) at positions r->pos.. in one pass (then pos += n): each layer's
   attention is one kvq_attention_prefill (the chunk attends itself at full precision);
   the fp32 path runs them token by token. Returns the logits after the last token. */
const float *llm_prefill(llm_run *r, const int *tokens, int n, char *err, size_t err_size);
/* Rolls the run back to its first pos tokens (kvq_cache_truncate on every layer's cache);
   0, or -1 when pos is not in 0..r->pos. */
int llm_run_truncate(llm_run *r, int pos, char *err, size_t err_size);
/* bits per element of the caches as they are now: 8 * payload / (2 * tokens * kv_dim * layers) */
double llm_run_bits_actual(const llm_run *r);

/* ---- scoring ------------------------------------------------------------ */

typedef struct llm_score_result {
    int n_pred;          /* predictions made: sum over windows of (window length - 1) */
    double nll_sum;      /* nats */
    double ce;           /* nats per token */
    double ppl;          /* exp(ce) */
    double kl;           /* mean KL(p_ref || p) in nats, when ref_logp was given; else 0 */
    double bits_actual;  /* bits per element of the final window's caches */
    double seconds;      /* CPU time of the scoring pass */
} llm_score_result;

int llm_count_predictions(int n_tokens, int seq_len);
/* Scores tokens[0..n): windows of seq_len, each on fresh caches, token t at
   position t % seq_len, each token predicting the next one of its window.
   ref_logp (optional, [n_pred][vocab]): log-probs to measure KL against;
   out_logp (optional, [n_pred][vocab]): receives this run's log-probs. */
int llm_score(const kvqd_checkpoint *ck, const llm_cache_spec *spec, const int *tokens, int n_tokens,
              const float *ref_logp, float *out_logp, llm_score_result *res, char *err, size_t err_size);

/* ---- KV dumps ----------------------------------------------------------- */

/* Runs tokens[0..n_tokens) through the model with exact fp32 attention and fills *d
   (allocated here; kvqd_dump_free it, also after a failure) with each layer's attention
   inputs named in tensor_mask (KVQD_KPOST | KVQD_KPRE | KVQD_V | KVQD_QPOST | KVQD_QPRE).
   The text is cut into windows of `window` tokens (1..seq_len; 0 means seq_len), each
   on fresh caches: token t sits at position t % window, as KVDUMP01 defines. */
int llm_dump(const kvqd_checkpoint *ck, const int *tokens, int n_tokens, int window, int tensor_mask,
             kvqd_dump *d, char *err, size_t err_size);

#ifdef __cplusplus
}
#endif
#endif /* LLAMA_MODEL_H_INCLUDED */

/* ========================================================================= */
#ifdef LLAMA_MODEL_IMPLEMENTATION
#ifndef LLAMA_MODEL_IMPLEMENTATION_DONE
#define LLAMA_MODEL_IMPLEMENTATION_DONE

#include <ctype.h>
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

/* Errors are formatted by kvq_data.h's helper: every program that implements this header
   implements kvq_data.h in the same unit. */
#ifndef KVQ_DATA_IMPLEMENTATION_DONE
#error "define KVQ_DATA_IMPLEMENTATION and include kvq_data.h before LLAMA_MODEL_IMPLEMENTATION"
#endif
#define llm__fail kvqd__fail

/* ---- config strings ---- */

int llm_parse_config(const char *spec, int head_dim, int n_kv_heads, int max_tokens,
                     llm_cache_spec *out, char *err, size_t err_size)
{
    char low[64];
    size_t n, i;
    int seen[128];
    kvq_config c;
    if (out) memset(out, 0, sizeof *out);
    if (!spec || !out) return llm__fail(err, err_size, -1, "NULL config");
    n = strlen(spec);
    if (n == 0 || n >= sizeof low) return llm__fail(err, err_size, -1, "config '%s': empty or too long", spec);
    for (i = 0; i <= n; i++) low[i] = (char)tolower((unsigned char)spec[i]);
    memcpy(out->name, low, n + 1 < sizeof out->name ? n + 1 : sizeof out->name - 1);
    c = kvq_default_config(head_dim, n_kv_heads, max_tokens);
    if (strcmp(low, "default") == 0) { out->cfg = c; return 0; }
    /* A string names its shape: what it leaves out is kvq's default, but for key blocks of G
       tokens and fp16 value params (b0 p32), so k2v2 stays KIVI-2's shape whatever the default. */
    c.key_block = 0;
    c.value_param_bits = 32;
    if (strcmp(low, "fp32") == 0) { out->fp32 = 1; out->cfg = c; return 0; }
    if (strcmp(low, "fp16") == 0) { c.key_bits = c.value_bits = 16; out->cfg = c; return 0; }
    memset(seen, 0, sizeof seen);
    for (i = 0; i < n;) {
        char key = low[i++];
        long v = -1;
        if (key != 'k' && key != 'v' && key != 'g' && key != 'r' && key != 's' && key != 'h' && key != 'x' &&
            key != 'e' && key != 't' && key != 'c' && key != 'b' && key != 'p')
            return llm__fail(err, err_size, -1, "config '%s': unknown field '%c' (want k v g b p r s h x e t c)", spec,
                             key);
        if (seen[(unsigned char)key]++)
            return llm__fail(err, err_size, -1, "config '%s': field '%c' given twice", spec, key);
        if (i < n && isdigit((unsigned char)low[i])) {
            v = 0;
            while (i < n && isdigit((unsigned char)low[i])) {
                v = v * 10 + (low[i++] - '0');
                if (v > 1000000) return llm__fail(err, err_size, -1, "config '%s': number too large", spec);
            }
        }
        if (key == 'h' || key == 'e' || key == 't') {
            if (v >= 0) return llm__fail(err, err_size, -1, "config '%s': '%c' takes no number", spec, key);
            if (key == 'h') c.rotation = KVQ_ROTATE_HADAMARD;
            else if (key == 't') c.key_axis = KVQ_KEYS_PER_TOKEN;
            else c.salient_policy = KVQ_SALIENT_ERROR;
            continue;
        }
        if (v < 0) return llm__fail(err, err_size, -1, "config '%s': '%c' needs a number", spec, key);
        switch (key) {
        case 'k': c.key_bits = (int)v; break;
        case 'v': c.value_bits = (int)v; break;
        case 'g': c.group_size = (int)v; break;
        case 'r': c.residual_tokens = (int)v; break;
        case 's': c.sink_tokens = (int)v; break;
        case 'x': c.salient_ratio = (float)v / 100.0f; break;
        case 'c': c.range_search = (int)v; break;
        case 'b': c.key_block = (int)v; break;
        case 'p': c.value_param_bits = (int)v; break;
        default: break;
        }
    }
    {
        const int kb = c.key_block ? c.key_block : c.group_size; /* tokens per key block */
        if ((seen['g'] || seen['b']) && !seen['r'] && kb > 0 && c.residual_tokens % kb != 0)
            c.residual_tokens += kb - c.residual_tokens % kb;
    }
    out->cfg = c;
    if (kvq_cache_bytes(&c) == 0)
        return llm__fail(err, err_size, -1, "config '%s': kvq rejects it as invalid or unsupported "
                         "(k%d v%d g%d r%d s%d rotation %d, head_dim %d, max_tokens %d)", spec, c.key_bits,
                         c.value_bits, c.group_size, c.residual_tokens, c.sink_tokens, c.rotation, head_dim, max_tokens);
    return 0;
}

double llm_bits_steady(const llm_cache_spec *s)
{
    const kvq_config *c = &s->cfg;
    int ng = c->group_size > 0 ? (c->head_dim + c->group_size - 1) / c->group_size : 0;
    const int KB = c->key_block ? c->key_block : c->group_size;        /* tokens per key block */
    const double vparam = c->value_param_bits == 16 && c->value_bits <= 3 ? 16.0 : 32.0; /* a group's scale + min */
    double kb, vb;
    if (s->fp32) return 32.0;
    if (c->group_size <= 0 || c->head_dim <= 0) return 0.0;
    kb = c->key_bits >= 16 ? 16.0
         : c->key_axis == KVQ_KEYS_PER_TOKEN ? c->key_bits + 32.0 * ng / c->head_dim /* like values */
                                             : c->key_bits + 32.0 / KB;
    vb = c->value_bits >= 16 ? 16.0 : c->value_bits + vparam * ng / c->head_dim;
    if (c->salient_ratio > 0.0f) { /* side store: per salient token an index, K and V at 8 bits with group scales */
        int n = (int)(c->salient_ratio * KB + 0.5f);
        double entry = c->salient_bits == 16 ? 2.0 + 4.0 * c->head_dim : 2.0 + 8.0 * ng + 2.0 * c->head_dim;
        n = n < 1 ? 1 : n > KB - 1 ? KB - 1 : n;
        return 0.5 * (kb + vb) + n * entry * 8.0 / (2.0 * KB * c->head_dim);
    }
    return 0.5 * (kb + vb);
}

/* ---- model ---- */

void llm_run_free(llm_run *r)
{
    int l;
    if (!r) return;
    if (r->caches && r->ck)
        for (l = 0; l < r->ck->cfg.n_layers; l++) kvq_cache_destroy(r->caches[l]);
    free(r->caches);
    free(r->key_cache); free(r->value_cache);
    free(r->x); free(r->xb); free(r->xb2); free(r->hb); free(r->hb2);
    free(r->q); free(r->k); free(r->v); free(r->att); free(r->logits);
    free(r->rope_cos); free(r->rope_sin);
    memset(r, 0, sizeof *r);
}

int llm_run_init(llm_run *r, const kvqd_checkpoint *ck, const llm_cache_spec *spec, char *err, size_t err_size)
{
    const kvqd_llama_config *p;
    int l, pos, i, half;
    if (r) memset(r, 0, sizeof *r);
    if (!r || !ck || !ck->data || !spec) return llm__fail(err, err_size, -1, "NULL argument");
    r->ck = ck;
    r->spec = *spec;
    p = &ck->cfg;
    half = p->head_dim / 2;
    r->x = (float *)calloc((size_t)p->dim, sizeof(float));
    r->xb = (float *)calloc((size_t)p->dim, sizeof(float));
    r->xb2 = (float *)calloc((size_t)p->dim, sizeof(float));
    r->hb = (float *)calloc((size_t)p->hidden_dim, sizeof(float));
    r->hb2 = (float *)calloc((size_t)p->hidden_dim, sizeof(float));
    r->q = (float *)calloc((size_t)p->dim, sizeof(float));
    r->k = (float *)calloc((size_t)p->kv_dim, sizeof(float));
    r->v = (float *)calloc((size_t)p->kv_dim, sizeof(float));
    r->att = (float *)calloc((size_t)p->seq_len, sizeof(float));
    r->logits = (float *)calloc((size_t)p->vocab_size, sizeof(float));
    r->rope_cos = (float *)malloc((size_t)p->seq_len * (size_t)half * sizeof(float));
    r->rope_sin = (float *)malloc((size_t)p->seq_len * (size_t)half * sizeof(float));
    if (!r->x || !r->xb || !r->xb2 || !r->hb || !r->hb2 || !r->q || !r->k || !r->v || !r->att ||
        !r->logits || !r->rope_cos || !r->rope_sin) {
        llm_run_free(r);
        return llm__fail(err, err_size, -1, "out of memory");
    }
    /* channels (2i, 2i+1) of a head rotate by pos * theta^(-2i/head_dim) */
    for (pos = 0; pos < p->seq_len; pos++)
        for (i = 0; i < half; i++) {
            double freq = pow(10000.0, -2.0 * i / p->head_dim);
            double a = pos * freq;
            r->rope_cos[(size_t)pos * half + i] = (float)cos(a);
            r->rope_sin[(size_t)pos * half + i] = (float)sin(a);
        }
    if (spec->fp32) {
        size_t n = (size_t)p->n_layers * (size_t)p->seq_len * (size_t)p->kv_dim;
        r->key_cache = (float *)malloc(n * sizeof(float));
        r->value_cache = (float *)malloc(n * sizeof(float));
        if (!r->key_cache || !r->value_cache) { llm_run_free(r); return llm__fail(err, err_size, -1, "out of memory"); }
    } else {
        kvq_config c = spec->cfg;
        c.head_dim = p->head_dim;
        c.n_kv_heads = p->n_kv_heads;
        c.max_tokens = p->seq_len;
        r->spec.cfg = c;
        r->caches = (kvq_cache **)calloc((size_t)p->n_layers, sizeof(kvq_cache *));
        if (!r->caches) { llm_run_free(r); return llm__fail(err, err_size, -1, "out of memory"); }
        for (l = 0; l < p->n_layers; l++) {
            kvq_status st = kvq_cache_create(&r->caches[l], &c);
            if (st != KVQ_OK) {
                llm_run_free(r);
                return llm__fail(err, err_size, -1, "kvq_cache_create(%s): %s", spec->name, kvq_status_string(st));
            }
        }
    }
    return 0;
}

void llm_run_reset(llm_run *r)
{
    int l;
    if (!r || !r->ck) return;
    r->pos = 0;
    if (r->caches)
        for (l = 0; l < r->ck->cfg.n_layers; l++) kvq_cache_reset(r->caches[l]);
}

static void llm__rmsnorm(float *o, const float *x, const float *w, int n)
{
    float ss = 0.0f;
    int j;
    for (j = 0; j < n; j++) ss += x[j] * x[j];
    ss = 1.0f / sqrtf(ss / (float)n + 1e-5f);
    for (j = 0; j < n; j++) o[j] = w[j] * (ss * x[j]);
}

/* out[d] = W[d][n] x[n]; eight partial sums break the add-latency chain */
static void llm__matmul(float *out, const float *x, const float *W, int n, int d)
{
    int i, j;
    for (i = 0; i < d; i++) {
        const float *w = W + (size_t)i * (size_t)n;
        float s0 = 0, s1 = 0, s2 = 0, s3 = 0, s4 = 0, s5 = 0, s6 = 0, s7 = 0;
        for (j = 0; j + 8 <= n; j += 8) {
            s0 += w[j] * x[j];         s1 += w[j + 1] * x[j + 1];
            s2 += w[j + 2] * x[j + 2]; s3 += w[j + 3] * x[j + 3];
            s4 += w[j + 4] * x[j + 4]; s5 += w[j + 5] * x[j + 5];
            s6 += w[j + 6] * x[j + 6]; s7 += w[j + 7] * x[j + 7];
        }
        for (; j < n; j++) s0 += w[j] * x[j];
        out[i] = ((s0 + s1) + (s2 + s3)) + ((s4 + s5) + (s6 + s7));
    }
}

static void llm__rope(float *x, int n_heads, int head_dim, const float *cs, const float *sn)
{
    int h, i;
    for (h = 0; h < n_heads; h++) {
        float *v = x + (size_t)h * head_dim;
        for (i = 0; i < head_dim / 2; i++) {
            float a = v[2 * i], b = v[2 * i + 1];
            v[2 * i] = a * cs[i] - b * sn[i];
            v[2 * i + 1] = a * sn[i] + b * cs[i];
        }
    }
}

/* exact attention for one layer at position pos over float K/V [seq_len][kv_dim] */
static void llm__attention_fp32(llm_run *r, const float *kc, const float *vc, int pos)
{
    const kvqd_llama_config *p = &r->ck->cfg;
    int hd = p->head_dim, grp = p->n_heads / p->n_kv_heads, h, t, i;
    float scale = 1.0f / sqrtf((float)hd);
    for (h = 0; h < p->n_heads; h++) {
        const float *q = r->q + (size_t)h * hd;
        float *o = r->xb + (size_t)h * hd;
        size_t koff = (size_t)(h / grp) * hd;
        float mx = -INFINITY, sum = 0.0f;
        for (t = 0; t <= pos; t++) {
            const float *k = kc + (size_t)t * p->kv_dim + koff;
            float s = 0.0f;
            for (i = 0; i < hd; i++) s += q[i] * k[i];
            s *= scale;
            r->att[t] = s;
            if (s > mx) mx = s;
        }
        for (t = 0; t <= pos; t++) { r->att[t] = expf(r->att[t] - mx); sum += r->att[t]; }
        for (i = 0; i < hd; i++) o[i] = 0.0f;
        for (t = 0; t <= pos; t++) {
            const float *v = vc + (size_t)t * p->kv_dim + koff;
            float a = r->att[t] / sum;
            for (i = 0; i < hd; i++) o[i] += a * v[i];
        }
    }
}

/* q, k, v (r->q, r->k, r->v) of layer l for a token at position pos whose residual stream is x */
static void llm__qkv(llm_run *r, int l, const float *x, int pos)
{
    const kvqd_llama_config *p = &r->ck->cfg;
    const kvqd_llama_weights *w = &r->ck->w;
    const int dim = p->dim, kvd = p->kv_dim;
    const float *cs = r->rope_cos + (size_t)pos * (p->head_dim / 2), *sn = r->rope_sin + (size_t)pos * (p->head_dim / 2);
    llm__rmsnorm(r->xb, x, w->rms_att + (size_t)l * dim, dim);
    llm__matmul(r->q, r->xb, w->wq + (size_t)l * dim * dim, dim, dim);
    llm__matmul(r->k, r->xb, w->wk + (size_t)l * kvd * dim, dim, kvd);
    llm__matmul(r->v, r->xb, w->wv + (size_t)l * kvd * dim, dim, kvd);
    if (r->tap) r->tap(r->tap_ctx, l, pos, 0, r->q, r->k, r->v); /* before RoPE (the dumper's Kpre, Qpre) */
    llm__rope(r->q, p->n_heads, p->head_dim, cs, sn);
    llm__rope(r->k, p->n_kv_heads, p->head_dim, cs, sn);
    if (r->tap) r->tap(r->tap_ctx, l, pos, 1, r->q, r->k, r->v);
}

/* the rest of layer l for one token: the attention output att [dim] through wo into the
   residual stream x, then the SwiGLU FFN (att may be r->xb: it is read first) */
static void llm__finish_layer(llm_run *r, int l, float *x, const float *att)
{
    const kvqd_llama_config *p = &r->ck->cfg;
    const kvqd_llama_weights *w = &r->ck->w;
    const int dim = p->dim, hid = p->hidden_dim;
    int i;
    llm__matmul(r->xb2, att, w->wo + (size_t)l * dim * dim, dim, dim);
    for (i = 0; i < dim; i++) x[i] += r->xb2[i];
    llm__rmsnorm(r->xb, x, w->rms_ffn + (size_t)l * dim, dim);
    llm__matmul(r->hb, r->xb, w->w1 + (size_t)l * hid * dim, dim, hid);
    llm__matmul(r->hb2, r->xb, w->w3 + (size_t)l * hid * dim, dim, hid);
    for (i = 0; i < hid; i++) {
        float a = r->hb[i];
        r->hb[i] = a / (1.0f + expf(-a)) * r->hb2[i]; /* SwiGLU: silu(w1 x) * w3 x */
    }
    llm__matmul(r->xb, r->hb, w->w2 + (size_t)l * hid * dim, hid, dim);
    for (i = 0; i < dim; i++) x[i] += r->xb[i];
}

/* the logits of residual stream x (into r->logits; x is normalized in place) */
static const float *llm__logits(llm_run *r, float *x)
{
    const kvqd_llama_config *p = &r->ck->cfg;
    llm__rmsnorm(x, x, r->ck->w.rms_final, p->dim);
    llm__matmul(r->logits, x, r->ck->w.wcls, p->dim, p->vocab_size);
    return r->logits;
}

static int llm__check_tokens(const llm_run *r, const int *tokens, int n, char *err, size_t err_size)
{
    int i;
    if (!r || !r->ck || !r->x) return llm__fail(err, err_size, -1, "run not initialized");
    if (n > r->ck->cfg.seq_len - r->pos) return llm__fail(err, err_size, -1, "window full (%d tokens)", r->pos);
    for (i = 0; i < n; i++)
        if (tokens[i] < 0 || tokens[i] >= r->ck->cfg.vocab_size)
            return llm__fail(err, err_size, -1, "token %d out of range", tokens[i]);
    return 0;
}

const float *llm_forward(llm_run *r, int token, char *err, size_t err_size)
{
    const kvqd_llama_config *p;
    int kvd, pos, l;
    if (llm__check_tokens(r, &token, 1, err, err_size) != 0) return NULL;
    p = &r->ck->cfg;
    kvd = p->kv_dim;
    pos = r->pos;
    memcpy(r->x, r->ck->w.token_embedding + (size_t)token * p->dim, (size_t)p->dim * sizeof(float));
    for (l = 0; l < p->n_layers; l++) {
        llm__qkv(r, l, r->x, pos);
        if (r->spec.fp32) {
            size_t off = ((size_t)l * p->seq_len) * kvd;
            memcpy(r->key_cache + off + (size_t)pos * kvd, r->k, (size_t)kvd * sizeof(float));
            memcpy(r->value_cache + off + (size_t)pos * kvd, r->v, (size_t)kvd * sizeof(float));
            llm__attention_fp32(r, r->key_cache + off, r->value_cache + off, pos);
        } else {
            kvq_attn_params ap;
            kvq_status st = kvq_cache_append(r->caches[l], r->k, r->v, 1);
            if (st != KVQ_OK) { llm__fail(err, err_size, -1, "kvq_cache_append: %s", kvq_status_string(st)); return NULL; }
            memset(&ap, 0, sizeof ap);
            ap.n_q_heads = p->n_heads;
            ap.n_queries = 1;
            ap.scale = 0.0f;
            st = kvq_attention(r->caches[l], r->q, r->xb, &ap);
            if (st != KVQ_OK) { llm__fail(err, err_size, -1, "kvq_attention: %s", kvq_status_string(st)); return NULL; }
        }
        llm__finish_layer(r, l, r->x, r->xb);
    }
    r->pos++;
    return llm__logits(r, r->x);
}

const float *llm_prefill(llm_run *r, const int *tokens, int n, char *err, size_t err_size)
{
    const kvqd_llama_config *p;
    float *X, *Q, *K, *V, *O;
    const float *logits = NULL;
    int l, t;
    if (n < 1 || !tokens) { llm__fail(err, err_size, -1, "llm_prefill: no tokens"); return NULL; }
    if (llm__check_tokens(r, tokens, n, err, err_size) != 0) return NULL;
    if (r->spec.fp32) { /* exact attention either way: token by token */
        for (t = 0; t < n; t++)
            if (!(logits = llm_forward(r, tokens[t], err, err_size))) return NULL;
        return logits;
    }
    p = &r->ck->cfg;
    X = (float *)malloc((size_t)n * p->dim * sizeof(float)); /* residual streams */
    Q = (float *)malloc((size_t)n * p->dim * sizeof(float));
    O = (float *)malloc((size_t)n * p->dim * sizeof(float));
    K = (float *)malloc((size_t)n * p->kv_dim * sizeof(float));
    V = (float *)malloc((size_t)n * p->kv_dim * sizeof(float));
    if (!X || !Q || !O || !K || !V) {
        llm__fail(err, err_size, -1, "out of memory");
        goto done;
    }
    for (t = 0; t < n; t++)
        memcpy(X + (size_t)t * p->dim, r->ck->w.token_embedding + (size_t)tokens[t] * p->dim, (size_t)p->dim * sizeof(float));
    for (l = 0; l < p->n_layers; l++) {
        kvq_attn_params ap;
        kvq_status st;
        for (t = 0; t < n; t++) {
            llm__qkv(r, l, X + (size_t)t * p->dim, r->pos + t);
            memcpy(Q + (size_t)t * p->dim, r->q, (size_t)p->dim * sizeof(float));
            memcpy(K + (size_t)t * p->kv_dim, r->k, (size_t)p->kv_dim * sizeof(float));
            memcpy(V + (size_t)t * p->kv_dim, r->v, (size_t)p->kv_dim * sizeof(float));
        }
        memset(&ap, 0, sizeof ap);
        ap.n_q_heads = p->n_heads;
        ap.n_queries = n;
        st = kvq_attention_prefill(r->caches[l], K, V, n, Q, O, &ap);
        if (st != KVQ_OK) {
            llm__fail(err, err_size, -1, "kvq_attention_prefill: %s", kvq_status_string(st));
            goto done;
        }
        for (t = 0; t < n; t++) llm__finish_layer(r, l, X + (size_t)t * p->dim, O + (size_t)t * p->dim);
    }
    r->pos += n;
    memcpy(r->x, X + (size_t)(n - 1) * p->dim, (size_t)p->dim * sizeof(float));
    logits = llm__logits(r, r->x);
done:
    free(X); free(Q); free(O); free(K); free(V);
    return logits;
}

int llm_run_truncate(llm_run *r, int pos, char *err, size_t err_size)
{
    int l;
    if (!r || !r->ck || pos < 0 || pos > r->pos) return llm__fail(err, err_size, -1, "llm_run_truncate: bad position");
    for (l = 0; r->caches && l < r->ck->cfg.n_layers; l++) {
        kvq_status st = kvq_cache_truncate(r->caches[l], pos);
        if (st != KVQ_OK) return llm__fail(err, err_size, -1, "kvq_cache_truncate: %s", kvq_status_string(st));
    }
    r->pos = pos; /* the fp32 path overwrites its arrays from there */
    return 0;
}

double llm_run_bits_actual(const llm_run *r)
{
    const kvqd_llama_config *p = &r->ck->cfg;
    double bytes = 0.0, elems;
    int l, tokens = 0;
    if (!r->caches) return r->spec.fp32 ? 32.0 : 0.0;
    for (l = 0; l < p->n_layers; l++) {
        bytes += (double)kvq_cache_payload_bytes(r->caches[l]);
        tokens += kvq_cache_tokens(r->caches[l]);
    }
    elems = 2.0 * tokens * p->kv_dim;
    return elems > 0 ? 8.0 * bytes / elems : 0.0;
}

/* ---- scoring ---- */

int llm_count_predictions(int n_tokens, int seq_len)
{
    int n = 0, w0;
    for (w0 = 0; w0 < n_tokens; w0 += seq_len) {
        int len = n_tokens - w0 < seq_len ? n_tokens - w0 : seq_len;
        n += len - 1;
    }
    return n;
}

int llm_score(const kvqd_checkpoint *ck, const llm_cache_spec *spec, const int *tokens, int n_tokens,
              const float *ref_logp, float *out_logp, llm_score_result *res, char *err, size_t err_size)
{
    llm_run run;
    int V, S, w0, pred = 0, t, i;
    double *lp;
    clock_t c0 = clock();
    if (!ck || !spec || !tokens || n_tokens < 1 || !res) return llm__fail(err, err_size, -1, "bad argument");
    memset(res, 0, sizeof *res);
    V = ck->cfg.vocab_size;
    S = ck->cfg.seq_len;
    for (t = 0; t < n_tokens; t++)
        if (tokens[t] < 0 || tokens[t] >= V) return llm__fail(err, err_size, -1, "token %d at %d is out of range", tokens[t], t);
    lp = (double *)malloc((size_t)V * sizeof(double));
    if (!lp) return llm__fail(err, err_size, -1, "out of memory");
    if (llm_run_init(&run, ck, spec, err, err_size) != 0) { free(lp); return -1; }
    for (w0 = 0; w0 < n_tokens; w0 += S) {
        int end = n_tokens - w0 < S ? n_tokens : w0 + S;
        llm_run_reset(&run);
        for (t = w0; t < end; t++) {
            const float *logits = llm_forward(&run, tokens[t], err, err_size);
            double mx, sum = 0.0, lse;
            if (!logits) { llm_run_free(&run); free(lp); return -1; }
            if (t + 1 >= end) continue; /* the window's last token has nothing to predict */
            mx = logits[0];
            for (i = 1; i < V; i++) if (logits[i] > mx) mx = logits[i];
            for (i = 0; i < V; i++) sum += exp((double)logits[i] - mx);
            lse = mx + log(sum);
            for (i = 0; i < V; i++) lp[i] = (double)logits[i] - lse;
            res->nll_sum -= lp[tokens[t + 1]];
            if (ref_logp) {
                const float *rl = ref_logp + (size_t)pred * V;
                double kl = 0.0;
                for (i = 0; i < V; i++) {
                    double pr = exp((double)rl[i]);
                    if (pr > 0.0) kl += pr * ((double)rl[i] - lp[i]);
                }
                res->kl += kl;
            }
            if (out_logp)
                for (i = 0; i < V; i++) out_logp[(size_t)pred * V + i] = (float)lp[i];
            pred++;
        }
    }
    res->n_pred = pred;
    res->ce = pred ? res->nll_sum / pred : 0.0;
    res->ppl = exp(res->ce);
    res->kl = pred && ref_logp ? res->kl / pred : 0.0;
    res->bits_actual = llm_run_bits_actual(&run);
    res->seconds = (double)(clock() - c0) / CLOCKS_PER_SEC;
    llm_run_free(&run);
    free(lp);
    return 0;
}

/* ---- KV dumps ---- */

typedef struct llm__dump_ctx { kvqd_dump *d; int w0; } llm__dump_ctx;

/* one token's rows [heads][head_dim] into a dump tensor [heads][n_tokens][head_dim] */
static void llm__dump_rows(const kvqd_dump *d, int layer, int bit, int t, int heads, const float *x)
{
    float *dst = kvqd_dump_tensor(d, layer, bit);
    int h;
    if (!dst) return; /* not in the mask */
    for (h = 0; h < heads; h++)
        memcpy(dst + ((size_t)h * d->n_tokens + t) * d->head_dim, x + (size_t)h * d->head_dim,
               (size_t)d->head_dim * sizeof(float));
}

static void llm__dump_tap(void *ctx, int layer, int pos, int post_rope, const float *q, const float *k, const float *v)
{
    const llm__dump_ctx *c = (const llm__dump_ctx *)ctx;
    const kvqd_dump *d = c->d;
    int t = c->w0 + pos;
    if (post_rope) {
        llm__dump_rows(d, layer, KVQD_KPOST, t, d->n_kv_heads, k);
        llm__dump_rows(d, layer, KVQD_QPOST, t, d->n_heads, q);
    } else {
        llm__dump_rows(d, layer, KVQD_KPRE, t, d->n_kv_heads, k);
        llm__dump_rows(d, layer, KVQD_V, t, d->n_kv_heads, v);
        llm__dump_rows(d, layer, KVQD_QPRE, t, d->n_heads, q);
    }
}

int llm_dump(const kvqd_checkpoint *ck, const int *tokens, int n_tokens, int window, int tensor_mask,
             kvqd_dump *d, char *err, size_t err_size)
{
    const kvqd_llama_config *p;
    llm_cache_spec spec;
    llm_run run;
    llm__dump_ctx ctx;
    int t;
    if (d) memset(d, 0, sizeof *d);
    if (!ck || !ck->data || !tokens || !d) return llm__fail(err, err_size, -1, "NULL argument");
    p = &ck->cfg;
    if (window == 0) window = p->seq_len;
    if (window < 1 || window > p->seq_len)
        return llm__fail(err, err_size, -1, "window %d outside 1..%d (the model's seq_len)", window, p->seq_len);
    for (t = 0; t < n_tokens; t++)
        if (tokens[t] < 0 || tokens[t] >= p->vocab_size)
            return llm__fail(err, err_size, -1, "token %d at %d is out of range", tokens[t], t);
    if (kvqd_dump_init(d, p->n_layers, p->n_heads, p->n_kv_heads, p->head_dim, n_tokens, window, tensor_mask, err,
                       err_size) != KVQD_OK)
        return -1;
    d->dim = p->dim;
    d->vocab_size = p->vocab_size;
    d->seq_len = p->seq_len;
    d->rope_style = 0;        /* interleaved pairs */
    d->rope_theta = 10000.0f; /* llm_run_init's tables */
    for (t = 0; t < n_tokens; t++) d->tokens[t] = tokens[t];
    llm_parse_config("fp32", p->head_dim, p->n_kv_heads, p->seq_len, &spec, err, err_size);
    if (llm_run_init(&run, ck, &spec, err, err_size) != 0) { kvqd_dump_free(d); return -1; }
    ctx.d = d;
    ctx.w0 = 0;
    run.tap = llm__dump_tap;
    run.tap_ctx = &ctx;
    for (t = 0; t < n_tokens; t++) {
        if (t % window == 0) { llm_run_reset(&run); ctx.w0 = t; }
        if (!llm_forward(&run, tokens[t], err, err_size)) { llm_run_free(&run); kvqd_dump_free(d); return -1; }
    }
    llm_run_free(&run);
    return 0;
}

#endif /* LLAMA_MODEL_IMPLEMENTATION_DONE */
#endif /* LLAMA_MODEL_IMPLEMENTATION */
