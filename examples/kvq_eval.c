/* kvq_eval.c — what a kvq config loses on real keys, values and queries.

   kvq_eval [--csv OUT.csv] [--svg OUT.svg] [--svg-x steady|actual] DUMP.kvd... [-c CONFIG]...

   Replays each KVDUMP01 file (see ../shared/data/README.md) under the protocol of
   REFERENCE.md: every layer, KV head and window gets a fresh cache (one KV head per
   cache); tokens are appended one at a time (Kpost, V); after each append the query
   (Qpost) of that token, for every query head of the group, attends over tokens 0..t
   of its window, once exactly in fp32 (double accumulation) and once through
   kvq_attention on the cache. Per config it prints:

     bits steady  storage per K/V element from the format alone (no residual, no sinks)
     bits actual  8 * kvq_cache_payload_bytes / (2 * tokens * head_dim) over the final
                  cache of every (layer, head, window), residual window included
     K/V relMSE   sum ||K' - K||^2 / sum ||K||^2 with K' = kvq_cache_read at the end of
                  each window (what the cache holds then; residual tokens are fp16)
     attn err     mean over queries of ||o - o_exact||^2 / ||o_exact||^2, o = kvq_attention
     KL           mean over queries of KL(p_exact || p_cache) of the attention weights.
                  kvq_attention does not expose its weights, so p_cache is the softmax,
                  with the same scale 1/sqrt(head_dim), of q . k' for the keys k' that
                  kvq_cache_read reconstructs at that moment: it measures what the
                  stored keys lose, not the kernel's arithmetic.
     kern/read    mean ||o - o_read||^2 / ||o_read||^2, o_read = exact attention over
                  the reconstructed K'/V': the fused kernel against its own storage
                  (should sit near float rounding)
     worst layer  the layer with the largest attn err

   CONFIG as in llama.c: k2v2, k4v4g64, k2v2r0, k2v2s4, k3v2b64p16 (b: tokens per key block, p: bits of a
   value group's params), fp16, ... Default set: k16v16 k8v8 k4v4 k3v3 k3v2b64p16 k2v2 k2v2p16 k2v2c0 k2v2s0c0
   k2v2g64 k2v2r0.

   Build: cc -std=c99 -O2 -Wall -Wextra -Werror -I. -o build/kvq_eval examples/kvq_eval.c -lm */
#define KVQ_IMPLEMENTATION
#include "../kvq.h"
#define KVQ_DATA_IMPLEMENTATION
#include "kvq_data.h"
#define LLAMA_MODEL_IMPLEMENTATION
#include "llama_model.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#define MAX_CONFIGS 64
#define MAX_DUMPS 16

static const char *const default_configs[] = { "k16v16", "k8v8", "k4v4", "k3v3", "k3v2b64p16", "k2v2", "k2v2p16",
                                               "k2v2c0", "k2v2s0c0", "k2v2g64", "k2v2r0" };

typedef struct acc {
    double k_err, k_norm, v_err, v_norm;
    double attn_err, kl, kern;
    double n_queries;
    double payload_bytes, elements;
} acc;

typedef struct result {
    char dump[128];
    char config[48];
    double bits_steady, bits_actual;
    double k_rel, v_rel, attn_err, kl, kern;
    int worst_layer;
    double worst_err;
    double seconds;
    int n_layers;
    acc total;
    acc *layers; /* [n_layers] */
} result;

static void acc_add(acc *a, const acc *b)
{
    a->k_err += b->k_err; a->k_norm += b->k_norm; a->v_err += b->v_err; a->v_norm += b->v_norm;
    a->attn_err += b->attn_err; a->kl += b->kl; a->kern += b->kern; a->n_queries += b->n_queries;
    a->payload_bytes += b->payload_bytes; a->elements += b->elements;
}

static double ratio(double num, double den) { return den > 0.0 ? num / den : (num > 0.0 ? INFINITY : 0.0); }

/* softmax of scale * q.k over n rows [n][D]; writes log-probabilities into lp */
static void log_softmax_scores(const float *q, const float *k, int n, int D, double scale, double *lp)
{
    double mx = -INFINITY, sum = 0.0, lse;
    int t, c;
    for (t = 0; t < n; t++) {
        double s = 0.0;
        for (c = 0; c < D; c++) s += (double)q[c] * (double)k[(size_t)t * D + c];
        lp[t] = s * scale;
        if (lp[t] > mx) mx = lp[t];
    }
    for (t = 0; t < n; t++) sum += exp(lp[t] - mx);
    lse = mx + log(sum);
    for (t = 0; t < n; t++) lp[t] -= lse;
}

static void weighted_values(const double *lp, const float *v, int n, int D, double *o)
{
    int t, c;
    for (c = 0; c < D; c++) o[c] = 0.0;
    for (t = 0; t < n; t++) {
        double p = exp(lp[t]);
        for (c = 0; c < D; c++) o[c] += p * (double)v[(size_t)t * D + c];
    }
}

static double rel_err_f(const float *o, const double *ref, int D)
{
    double num = 0.0, den = 0.0;
    int c;
    for (c = 0; c < D; c++) {
        double d = (double)o[c] - ref[c];
        num += d * d;
        den += ref[c] * ref[c];
    }
    return ratio(num, den);
}

/* Replays one dump under one config; fills r. Returns 0 or -1 (message on stderr). */
static int eval_dump(const kvqd_dump *d, const char *dump_name, const char *config, result *r)
{
    const int D = d->head_dim, grp = d->n_heads / d->n_kv_heads, W = d->window;
    const double scale = 1.0 / sqrt((double)D);
    llm_cache_spec spec;
    char err[256] = "";
    float *kr = NULL, *vr = NULL, *qbuf = NULL, *obuf = NULL;
    double *lp_ex = NULL, *lp_rd = NULL, *o_ex = NULL, *o_rd = NULL;
    int l, h, w0, rc = -1;
    clock_t c0 = clock();

    memset(r, 0, sizeof *r);
    snprintf(r->dump, sizeof r->dump, "%s", dump_name);
    if (llm_parse_config(config, D, 1, W < d->n_tokens ? W : d->n_tokens, &spec, err, sizeof err) != 0) {
        fprintf(stderr, "%s\n", err);
        return -1;
    }
    if (spec.fp32) { fprintf(stderr, "kvq_eval: fp32 is the reference itself; use k16v16 for the fp16 baseline\n"); return -1; }
    snprintf(r->config, sizeof r->config, "%s", spec.name);
    r->bits_steady = llm_bits_steady(&spec);
    r->n_layers = d->n_layers;
    r->layers = (acc *)calloc((size_t)d->n_layers, sizeof(acc));
    kr = (float *)malloc((size_t)W * D * sizeof(float));
    vr = (float *)malloc((size_t)W * D * sizeof(float));
    qbuf = (float *)malloc((size_t)grp * D * sizeof(float));
    obuf = (float *)malloc((size_t)grp * D * sizeof(float));
    lp_ex = (double *)malloc((size_t)W * sizeof(double));
    lp_rd = (double *)malloc((size_t)W * sizeof(double));
    o_ex = (double *)malloc((size_t)D * sizeof(double));
    o_rd = (double *)malloc((size_t)D * sizeof(double));
    if (!r->layers || !kr || !vr || !qbuf || !obuf || !lp_ex || !lp_rd || !o_ex || !o_rd) {
        fprintf(stderr, "kvq_eval: out of memory\n");
        goto done;
    }
    for (l = 0; l < d->n_layers; l++) {
        const float *K = kvqd_dump_tensor(d, l, KVQD_KPOST);
        const float *V = kvqd_dump_tensor(d, l, KVQD_V);
        const float *Q = kvqd_dump_tensor(d, l, KVQD_QPOST);
        acc *la = &r->layers[l];
        for (h = 0; h < d->n_kv_heads; h++) {
            const float *Kh = K + (size_t)h * d->n_tokens * D, *Vh = V + (size_t)h * d->n_tokens * D;
            for (w0 = 0; w0 < d->n_tokens; w0 += W) {
                int wlen = d->n_tokens - w0 < W ? d->n_tokens - w0 : W, i, g, c;
                kvq_config cfg = spec.cfg;
                kvq_cache *cache = NULL;
                kvq_attn_params ap;
                kvq_status st;
                cfg.head_dim = D;
                cfg.n_kv_heads = 1;
                cfg.max_tokens = wlen;
                st = kvq_cache_create(&cache, &cfg);
                if (st != KVQ_OK) {
                    fprintf(stderr, "kvq_eval: %s: kvq_cache_create: %s\n", config, kvq_status_string(st));
                    goto done;
                }
                memset(&ap, 0, sizeof ap);
                ap.n_q_heads = grp;
                ap.n_queries = 1;
                ap.scale = (float)scale;
                for (i = 0; i < wlen; i++) {
                    int t = w0 + i, n = i + 1;
                    st = kvq_cache_append(cache, Kh + (size_t)t * D, Vh + (size_t)t * D, 1);
                    if (st == KVQ_OK) st = kvq_cache_read(cache, 0, n, kr, vr);
                    for (g = 0; g < grp; g++)
                        memcpy(qbuf + (size_t)g * D, Q + ((size_t)(h * grp + g) * d->n_tokens + t) * D, (size_t)D * sizeof(float));
                    if (st == KVQ_OK) st = kvq_attention(cache, qbuf, obuf, &ap);
                    if (st != KVQ_OK) {
                        fprintf(stderr, "kvq_eval: %s: layer %d head %d token %d: %s\n", config, l, h, t, kvq_status_string(st));
                        kvq_cache_destroy(cache);
                        goto done;
                    }
                    for (g = 0; g < grp; g++) {
                        const float *q = qbuf + (size_t)g * D;
                        double kl = 0.0;
                        int j;
                        log_softmax_scores(q, Kh + (size_t)w0 * D, n, D, scale, lp_ex);
                        log_softmax_scores(q, kr, n, D, scale, lp_rd);
                        for (j = 0; j < n; j++) kl += exp(lp_ex[j]) * (lp_ex[j] - lp_rd[j]);
                        weighted_values(lp_ex, Vh + (size_t)w0 * D, n, D, o_ex);
                        weighted_values(lp_rd, vr, n, D, o_rd);
                        la->kl += kl;
                        la->attn_err += rel_err_f(obuf + (size_t)g * D, o_ex, D);
                        la->kern += rel_err_f(obuf + (size_t)g * D, o_rd, D);
                        la->n_queries += 1.0;
                    }
                }
                /* what the cache holds at the end of the window */
                if (kvq_cache_read(cache, 0, wlen, kr, vr) != KVQ_OK) {
                    fprintf(stderr, "kvq_eval: kvq_cache_read failed\n");
                    kvq_cache_destroy(cache);
                    goto done;
                }
                for (i = 0; i < wlen; i++)
                    for (c = 0; c < D; c++) {
                        double k0 = Kh[(size_t)(w0 + i) * D + c], v0 = Vh[(size_t)(w0 + i) * D + c];
                        double dk = kr[(size_t)i * D + c] - k0, dv = vr[(size_t)i * D + c] - v0;
                        la->k_err += dk * dk; la->k_norm += k0 * k0;
                        la->v_err += dv * dv; la->v_norm += v0 * v0;
                    }
                la->payload_bytes += (double)kvq_cache_payload_bytes(cache);
                la->elements += 2.0 * kvq_cache_tokens(cache) * D;
                kvq_cache_destroy(cache);
            }
        }
        acc_add(&r->total, la);
    }
    r->bits_actual = ratio(8.0 * r->total.payload_bytes, r->total.elements);
    r->k_rel = ratio(r->total.k_err, r->total.k_norm);
    r->v_rel = ratio(r->total.v_err, r->total.v_norm);
    r->attn_err = ratio(r->total.attn_err, r->total.n_queries);
    r->kl = ratio(r->total.kl, r->total.n_queries);
    r->kern = ratio(r->total.kern, r->total.n_queries);
    r->worst_layer = 0;
    r->worst_err = -1.0;
    for (l = 0; l < d->n_layers; l++) {
        double e = ratio(r->layers[l].attn_err, r->layers[l].n_queries);
        if (e > r->worst_err) { r->worst_err = e; r->worst_layer = l; }
    }
    rc = 0;
done:
    r->seconds = (double)(clock() - c0) / CLOCKS_PER_SEC;
    free(kr); free(vr); free(qbuf); free(obuf); free(lp_ex); free(lp_rd); free(o_ex); free(o_rd);
    return rc;
}

static const char *base_name(const char *path)
{
    const char *s = strrchr(path, '/');
    return s ? s + 1 : path;
}

/* ---- CSV ---- */

static int write_csv(const char *path, result *res, int n)
{
    FILE *f = fopen(path, "w");
    int i, l;
    if (!f) { fprintf(stderr, "kvq_eval: cannot create %s\n", path); return -1; }
    fprintf(f, "dump,config,layer,bits_steady,bits_actual,k_rel_mse,v_rel_mse,attn_err,kl,kernel_vs_read,queries,seconds\n");
    for (i = 0; i < n; i++) {
        result *r = &res[i];
        fprintf(f, "%s,%s,all,%.4f,%.4f,%.6e,%.6e,%.6e,%.6e,%.6e,%.0f,%.3f\n", r->dump, r->config, r->bits_steady,
                r->bits_actual, r->k_rel, r->v_rel, r->attn_err, r->kl, r->kern, r->total.n_queries, r->seconds);
        for (l = 0; l < r->n_layers; l++) {
            const acc *a = &r->layers[l];
            fprintf(f, "%s,%s,%d,%.4f,%.4f,%.6e,%.6e,%.6e,%.6e,%.6e,%.0f,\n", r->dump, r->config, l, r->bits_steady,
                    ratio(8.0 * a->payload_bytes, a->elements), ratio(a->k_err, a->k_norm), ratio(a->v_err, a->v_norm),
                    ratio(a->attn_err, a->n_queries), ratio(a->kl, a->n_queries), ratio(a->kern, a->n_queries),
                    a->n_queries);
        }
    }
    if (fclose(f) != 0) { fprintf(stderr, "kvq_eval: write to %s failed\n", path); return -1; }
    return 0;
}

/* ---- SVG: attn err (log y) vs bits per element, one labelled point per config ---- */

static void svg_text(FILE *f, const char *s)
{
    for (; *s; s++) {
        if (*s == '&') fputs("&amp;", f);
        else if (*s == '<') fputs("&lt;", f);
        else if (*s == '>') fputs("&gt;", f);
        else if (*s == '"') fputs("&quot;", f);
        else fputc(*s, f);
    }
}

static int write_svg(const char *path, result *res, int n, int x_actual)
{
    static const char *const colours[] = { "#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b" };
    const double Wd = 760, Ht = 500, ml = 80, mr = 30, mt = 50, mb = 60;
    double xmin = INFINITY, xmax = -INFINITY, ymin = INFINITY, ymax = -INFINITY, xstep;
    const char *dumps[MAX_DUMPS];
    static double boxes[2 * MAX_DUMPS * MAX_CONFIGS][3]; /* points and labels: x, bottom y, width */
    int n_dumps = 0, n_boxes = 0, i, j, e;
    FILE *f = fopen(path, "w");
    if (!f) { fprintf(stderr, "kvq_eval: cannot create %s\n", path); return -1; }
    for (i = 0; i < n; i++) {
        double bx = x_actual ? res[i].bits_actual : res[i].bits_steady;
        double y = res[i].attn_err > 1e-12 ? res[i].attn_err : 1e-12;
        if (bx < xmin) xmin = bx;
        if (bx > xmax) xmax = bx;
        if (y < ymin) ymin = y;
        if (y > ymax) ymax = y;
        for (j = 0; j < n_dumps; j++) if (strcmp(dumps[j], res[i].dump) == 0) break;
        if (j == n_dumps && n_dumps < MAX_DUMPS) dumps[n_dumps++] = res[i].dump;
    }
    if (n == 0) { xmin = 0; xmax = 16; ymin = 1e-6; ymax = 1; }
    xmin = floor(xmin) - 1.0; if (xmin < 0) xmin = 0;
    xmax = ceil(xmax) + 1.0;
    ymin = floor(log10(ymin));
    ymax = ceil(log10(ymax));
    if (ymax <= ymin) ymax = ymin + 1;
    xstep = xmax - xmin > 12 ? 2.0 : 1.0;
#define SX(v) (ml + ((v) - xmin) / (xmax - xmin) * (Wd - ml - mr))
#define SY(v) (mt + (ymax - (v)) / (ymax - ymin) * (Ht - mt - mb))
    fprintf(f, "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"%.0f\" height=\"%.0f\" viewBox=\"0 0 %.0f %.0f\" "
               "font-family=\"sans-serif\" font-size=\"12\">\n", Wd, Ht, Wd, Ht);
    fprintf(f, "<rect width=\"100%%\" height=\"100%%\" fill=\"white\"/>\n");
    fprintf(f, "<text x=\"%.0f\" y=\"24\" text-anchor=\"middle\" font-size=\"15\">kvq: attention-output relative error "
               "vs bits per K/V element (%s)</text>\n", Wd / 2, x_actual ? "actual, residual window included" : "steady state");
    for (e = (int)ymin; e <= (int)ymax; e++) {
        double y = SY((double)e);
        fprintf(f, "<line x1=\"%.1f\" y1=\"%.1f\" x2=\"%.1f\" y2=\"%.1f\" stroke=\"#ddd\"/>\n", ml, y, Wd - mr, y);
        fprintf(f, "<text x=\"%.1f\" y=\"%.1f\" text-anchor=\"end\">1e%d</text>\n", ml - 6, y + 4, e);
    }
    for (e = 0; ceil(xmin) + e * xstep <= xmax + 1e-9; e++) {
        double x = ceil(xmin) + e * xstep, px = SX(x);
        fprintf(f, "<line x1=\"%.1f\" y1=\"%.1f\" x2=\"%.1f\" y2=\"%.1f\" stroke=\"#eee\"/>\n", px, mt, px, Ht - mb);
        fprintf(f, "<text x=\"%.1f\" y=\"%.1f\" text-anchor=\"middle\">%g</text>\n", px, Ht - mb + 18, x);
    }
    fprintf(f, "<rect x=\"%.1f\" y=\"%.1f\" width=\"%.1f\" height=\"%.1f\" fill=\"none\" stroke=\"#333\"/>\n",
            ml, mt, Wd - ml - mr, Ht - mt - mb);
    fprintf(f, "<text x=\"%.1f\" y=\"%.1f\" text-anchor=\"middle\">bits per element (%s)</text>\n",
            (ml + Wd - mr) / 2, Ht - 18, x_actual ? "8 * payload / (2 * tokens * head_dim)" : "quantized part: codes + fp16 scale/min");
    fprintf(f, "<text transform=\"translate(18 %.1f) rotate(-90)\" text-anchor=\"middle\">mean ||o - o_exact||^2 / ||o_exact||^2 (log)</text>\n",
            (mt + Ht - mb) / 2);
    /* points first (each also blocks labels), then labels at the first of six spots
       around their point that overlaps nothing placed so far */
    for (i = 0; i < n; i++) {
        double bx = x_actual ? res[i].bits_actual : res[i].bits_steady;
        double y = log10(res[i].attn_err > 1e-12 ? res[i].attn_err : 1e-12);
        for (j = 0; j < n_dumps; j++) if (strcmp(dumps[j], res[i].dump) == 0) break;
        fprintf(f, "<circle cx=\"%.1f\" cy=\"%.1f\" r=\"4.5\" fill=\"%s\"/>\n", SX(bx), SY(y), colours[j % 6]);
        boxes[n_boxes][0] = SX(bx) - 5; boxes[n_boxes][1] = SY(y) + 5; boxes[n_boxes][2] = 10;
        n_boxes++;
    }
    for (i = 0; i < n; i++) {
        static const double ox[6] = { 6, 6, -6, -6, 6, -6 }, oy[6] = { -6, 16, -6, 16, 4, 4 };
        double bx = x_actual ? res[i].bits_actual : res[i].bits_steady;
        double y = log10(res[i].attn_err > 1e-12 ? res[i].attn_err : 1e-12);
        double px = SX(bx), py = SY(y), lw = 7.0 * (double)strlen(res[i].config), lx = px + 6, ly = py - 6;
        int k, q;
        for (k = 0; k < 6; k++) {
            double cx = ox[k] > 0 ? px + ox[k] : px + ox[k] - lw, cy = py + oy[k];
            int clash = 0;
            for (q = 0; q < n_boxes && !clash; q++)
                clash = cx < boxes[q][0] + boxes[q][2] && boxes[q][0] < cx + lw && cy - 11 < boxes[q][1] && boxes[q][1] - 11 < cy;
            if (!clash) { lx = cx; ly = cy; break; }
        }
        boxes[n_boxes][0] = lx; boxes[n_boxes][1] = ly; boxes[n_boxes][2] = lw;
        n_boxes++;
        for (j = 0; j < n_dumps; j++) if (strcmp(dumps[j], res[i].dump) == 0) break;
        fprintf(f, "<text x=\"%.1f\" y=\"%.1f\" fill=\"%s\">", lx, ly, colours[j % 6]);
        svg_text(f, res[i].config);
        fprintf(f, "</text>\n");
    }
    for (j = 0; j < n_dumps; j++) {
        double ly = mt + 16 + 16 * j;
        fprintf(f, "<circle cx=\"%.1f\" cy=\"%.1f\" r=\"4.5\" fill=\"%s\"/>\n", Wd - mr - 220, ly - 4, colours[j % 6]);
        fprintf(f, "<text x=\"%.1f\" y=\"%.1f\">", Wd - mr - 210, ly);
        svg_text(f, dumps[j]);
        fprintf(f, "</text>\n");
    }
#undef SX
#undef SY
    fprintf(f, "</svg>\n");
    if (fclose(f) != 0) { fprintf(stderr, "kvq_eval: write to %s failed\n", path); return -1; }
    return 0;
}

/* A synthetic dump in the regime the shared small models cannot show: head_dim 128 keys after
   RoPE (interleaved pairs, theta 10000) with per-channel offsets and four large outlier
   channels in slow-rotating pairs, as real Llama keys have; queries that read those channels;
   values with channel means. 1 layer, 8 query / 2 KV heads, 1024 tokens in one window. */
static float synth_normal(uint64_t *s)
{
    double u, v;
    *s = *s * 6364136223846793005ull + 1442695040888963407ull;
    u = ((double)(*s >> 11) + 1.0) / 9007199254740993.0;
    *s = *s * 6364136223846793005ull + 1442695040888963407ull;
    v = (double)(*s >> 11) / 9007199254740992.0;
    return (float)(sqrt(-2.0 * log(u)) * cos(6.283185307179586 * v));
}

static void synth_rope(float *x, int D, int pos)
{
    int i;
    for (i = 0; i < D / 2; i++) {
        double a = pos * pow(10000.0, -2.0 * i / D), c = cos(a), s = sin(a);
        float x0 = x[2 * i], x1 = x[2 * i + 1];
        x[2 * i] = (float)(x0 * c - x1 * s);
        x[2 * i + 1] = (float)(x0 * s + x1 * c);
    }
}

static int write_synthetic(const char *path)
{
    enum { D = 128, H = 2, NQH = 8, T = 1024 };
    static const int outliers[] = {104, 105, 118, 119}; /* pairs 52 and 59: slow rotation */
    kvqd_dump d;
    char err[256] = "";
    float mean_k[H][D], mean_v[H][D], *K, *V, *Q;
    uint64_t seed = 0x6b7671ull;
    int h, t, c, j, rc;
    if (kvqd_dump_init(&d, 1, NQH, H, D, T, T, KVQD_KPOST | KVQD_V | KVQD_QPOST, err, sizeof err) != KVQD_OK) {
        fprintf(stderr, "kvq_eval: %s\n", err);
        return 1;
    }
    K = kvqd_dump_tensor(&d, 0, KVQD_KPOST);
    V = kvqd_dump_tensor(&d, 0, KVQD_V);
    Q = kvqd_dump_tensor(&d, 0, KVQD_QPOST);
    for (h = 0; h < H; h++)
        for (c = 0; c < D; c++) {
            mean_k[h][c] = 0.7f * synth_normal(&seed);
            mean_v[h][c] = 0.3f * synth_normal(&seed);
        }
    for (h = 0; h < H; h++)
        for (j = 0; j < 4; j++) mean_k[h][outliers[j]] = (j % 2 ? -1.0f : 1.0f) * (10.0f + 4.0f * (float)h);
    for (t = 0; t < T; t++) {
        d.tokens[t] = t % 100;
        for (h = 0; h < H; h++) {
            float *k = K + ((size_t)h * T + t) * D, *v = V + ((size_t)h * T + t) * D;
            for (c = 0; c < D; c++) {
                int big = c == outliers[0] || c == outliers[1] || c == outliers[2] || c == outliers[3];
                k[c] = mean_k[h][c] + (big ? 2.0f : 1.0f) * synth_normal(&seed);
                v[c] = mean_v[h][c] + synth_normal(&seed);
            }
            synth_rope(k, D, t);
        }
        for (h = 0; h < NQH; h++) {
            float *q = Q + ((size_t)h * T + t) * D;
            for (c = 0; c < D; c++) {
                int big = c == outliers[0] || c == outliers[1] || c == outliers[2] || c == outliers[3];
                q[c] = (big ? 0.4f * (c % 2 ? -1.0f : 1.0f) : 0.0f) + synth_normal(&seed);
            }
            synth_rope(q, D, t);
        }
    }
    rc = kvqd_dump_write(&d, path, err, sizeof err) == KVQD_OK ? 0 : 1;
    if (rc) fprintf(stderr, "kvq_eval: %s\n", err);
    else printf("wrote %s: synthetic head_dim %d, %d/%d heads, %d tokens, 4 outlier key channels\n", path, D, NQH, H, T);
    kvqd_dump_free(&d);
    return rc;
}

static void usage(void)
{
    fprintf(stderr, "usage: kvq_eval [--csv OUT.csv] [--svg OUT.svg] [--svg-x steady|actual] DUMP.kvd... [-c CONFIG]...\n"
                    "       kvq_eval --synthetic OUT.kvd   (writes a head_dim-128 RoPE dump with outlier channels)\n"
                    "CONFIG: k<bits>v<bits>[g<G>][b<KB>][p<P>][r<R>][s<S>][c<C>][h][t][x<percent>][e] (bits 2 3 4 8 16),\n"
                    "        fp16 = k16v16; g: channels per value group, b: tokens per key block, p: 16 or 32 bits of\n"
                    "        a value group's params, c: range search steps, h: Hadamard rotation, t: keys per token,\n"
                    "        x: salient tokens per key block, e: salient by error, not attention.\n"
                    "default configs: k16v16 k8v8 k4v4 k3v3 k3v2b64p16 k2v2 k2v2p16 k2v2c0 k2v2s0c0 k2v2g64 k2v2r0\n");
}

int main(int argc, char **argv)
{
    const char *csv = NULL, *svg = NULL, *dumps[MAX_DUMPS], *configs[MAX_CONFIGS];
    int n_dumps = 0, n_configs = 0, x_actual = 0, i, j, n_res = 0, rc = 0;
    result *res;
    if (argc == 3 && strcmp(argv[1], "--synthetic") == 0) return write_synthetic(argv[2]);
    for (i = 1; i < argc; i++) {
        if (strcmp(argv[i], "--csv") == 0 && i + 1 < argc) csv = argv[++i];
        else if (strcmp(argv[i], "--svg") == 0 && i + 1 < argc) svg = argv[++i];
        else if (strcmp(argv[i], "--svg-x") == 0 && i + 1 < argc) {
            i++;
            if (strcmp(argv[i], "actual") == 0) x_actual = 1;
            else if (strcmp(argv[i], "steady") == 0) x_actual = 0;
            else { usage(); return 2; }
        } else if (strcmp(argv[i], "-c") == 0 && i + 1 < argc) {
            if (n_configs == MAX_CONFIGS) { fprintf(stderr, "kvq_eval: at most %d configs\n", MAX_CONFIGS); return 2; }
            configs[n_configs++] = argv[++i];
        } else if (argv[i][0] == '-') { usage(); return 2; }
        else {
            if (n_dumps == MAX_DUMPS) { fprintf(stderr, "kvq_eval: at most %d dumps\n", MAX_DUMPS); return 2; }
            dumps[n_dumps++] = argv[i];
        }
    }
    if (n_dumps == 0) { usage(); return 2; }
    if (n_configs == 0)
        for (i = 0; i < (int)(sizeof default_configs / sizeof default_configs[0]); i++) configs[n_configs++] = default_configs[i];
    res = (result *)calloc((size_t)n_dumps * n_configs, sizeof(result));
    if (!res) { fprintf(stderr, "kvq_eval: out of memory\n"); return 1; }
    for (i = 0; i < n_dumps && rc == 0; i++) {
        kvqd_dump d;
        char err[256] = "";
        if (kvqd_dump_load(&d, dumps[i], err, sizeof err) != KVQD_OK) {
            fprintf(stderr, "kvq_eval: %s\n", err);
            rc = 1;
            break;
        }
        if ((d.tensor_mask & (KVQD_KPOST | KVQD_V | KVQD_QPOST)) != (KVQD_KPOST | KVQD_V | KVQD_QPOST)) {
            fprintf(stderr, "kvq_eval: %s lacks Kpost, V or Qpost (tensor_mask %d)\n", dumps[i], d.tensor_mask);
            kvqd_dump_free(&d);
            rc = 1;
            break;
        }
        for (j = 0; j < n_configs; j++) { /* every config is checked before any work */
            llm_cache_spec spec;
            if (llm_parse_config(configs[j], d.head_dim, 1, d.window < d.n_tokens ? d.window : d.n_tokens, &spec, err,
                                 sizeof err) != 0 || spec.fp32) {
                fprintf(stderr, "kvq_eval: %s\n", spec.fp32 ? "fp32 is the reference itself; k16v16 is the fp16 baseline" : err);
                rc = 1;
                break;
            }
        }
        if (rc != 0) { kvqd_dump_free(&d); break; }
        printf("%s: %d layers, %d/%d heads, head_dim %d, %d tokens in windows of %d\n", base_name(dumps[i]),
               d.n_layers, d.n_heads, d.n_kv_heads, d.head_dim, d.n_tokens, d.window);
        printf("  %-10s %6s %6s %10s %10s %10s %10s %10s  %-16s %6s\n", "config", "bits", "bits", "K relMSE", "V relMSE",
               "attn err", "KL", "kern/read", "worst layer", "time");
        printf("  %-10s %6s %6s %10s %10s %10s %10s %10s  %-16s %6s\n", "", "steady", "actual", "", "", "", "nats", "",
               "(attn err)", "s");
        for (j = 0; j < n_configs; j++) {
            result *r = &res[n_res];
            char worst[32];
            if (eval_dump(&d, base_name(dumps[i]), configs[j], r) != 0) { free(r->layers); r->layers = NULL; rc = 1; break; }
            n_res++;
            snprintf(worst, sizeof worst, "L%d (%.2e)", r->worst_layer, r->worst_err);
            printf("  %-10s %6.2f %6.2f %10.2e %10.2e %10.2e %10.2e %10.2e  %-16s %6.2f\n", r->config, r->bits_steady,
                   r->bits_actual, r->k_rel, r->v_rel, r->attn_err, r->kl, r->kern, worst, r->seconds);
            fflush(stdout);
        }
        printf("\n");
        kvqd_dump_free(&d);
    }
    if (rc == 0 && csv && write_csv(csv, res, n_res) != 0) rc = 1;
    if (rc == 0 && svg && write_svg(svg, res, n_res, x_actual) != 0) rc = 1;
    if (rc == 0) {
        printf("KL: attention weights from the keys kvq_cache_read reconstructs (same 1/sqrt(head_dim) scale);\n"
               "kern/read: kvq_attention against exact attention over the reconstructed K/V.\n");
        if (csv) printf("wrote %s\n", csv);
        if (svg) printf("wrote %s\n", svg);
    }
    for (i = 0; i < n_res; i++) free(res[i].layers);
    free(res);
    return rc;
}
