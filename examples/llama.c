/* llama.c — a tiny Llama whose KV cache is a kvq cache.

   llama                                     demo: story + PPL/KL table (bundled data)
   llama generate MODEL TOK [-p PROMPT] [-n N] [-s SEED] [-t TEMP] [-P TOPP] [-c CONFIG]
   llama score MODEL TOK TOKENS [-c CONFIG]...

   TOKENS is a text file of decimal token ids ('#' comments) or a KVDUMP01 file,
   whose token ids are used. CONFIG: default (kvq's default, K3V2 = k3v2b64p16), k2v2, k4v2,
   k16v16, fp32, with optional g64 (group size), b64 (key block), p16 (value params),
   r0 (residual tokens), s4 (sink tokens), h (Hadamard).

   Build: cc -std=c99 -O2 -Wall -Wextra -Werror -I. -o build/llama examples/llama.c -lm */
#define KVQ_IMPLEMENTATION
#include "../kvq.h"
#define KVQ_DATA_IMPLEMENTATION
#include "kvq_data.h"
#define LLAMA_MODEL_IMPLEMENTATION
#include "llama_model.h"

#include <ctype.h>
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define DEMO_MODEL  "examples/data/stories260K.bin"
#define DEMO_TOK    "examples/data/tok512.bin"
#define DEMO_TOKENS "examples/data/stories260K_gen.tokens"
#define MAX_CONFIGS 32

static const char *const default_configs[] = { "fp16", "k8v8", "k4v4", "k3v3", "k3v2b64p16", "k2v2", "k2v2g64" };

static void usage(void)
{
    fprintf(stderr,
            "usage:\n"
            "  llama                      demo on examples/data (run from the repository root)\n"
            "  llama generate MODEL TOK [-p PROMPT] [-n STEPS] [-s SEED] [-t TEMP] [-P TOPP] [-c CONFIG]\n"
            "  llama score MODEL TOK TOKENS_FILE [-c CONFIG]...\n"
            "CONFIG: k<bits>v<bits>[g<G>][b<KB>][p<P>][r<R>][s<S>][h], bits in {2,3,4,8,16}; fp16 = k16v16;\n"
            "        b: tokens per key block, p: 16 or 32 bits of a value group's params (k3v2b64p16: K3V2);\n"
            "        fp32 = exact float attention; default = kvq's default (k3v2b64p16), the default CONFIG.\n");
}

/* ---- sampling: temperature + nucleus (top-p), xorshift64* ---- */

static uint64_t rng_next(uint64_t *s)
{
    *s ^= *s >> 12; *s ^= *s << 25; *s ^= *s >> 27;
    return *s * 0x2545F4914F6CDD1DULL;
}

static double rng_unit(uint64_t *s) { return (double)(rng_next(s) >> 11) * (1.0 / 9007199254740992.0); }

typedef struct { double p; int id; } prob_id;

static int cmp_prob_desc(const void *a, const void *b)
{
    double x = ((const prob_id *)a)->p, y = ((const prob_id *)b)->p;
    return x < y ? 1 : (x > y ? -1 : 0);
}

static int sample(const float *logits, int n, float temp, float topp, uint64_t *rng, prob_id *scratch)
{
    int i, best = 0, cut;
    double mx, sum = 0.0, cum = 0.0, r;
    for (i = 1; i < n; i++) if (logits[i] > logits[best]) best = i;
    if (temp <= 0.0f) return best;
    mx = logits[best];
    for (i = 0; i < n; i++) { scratch[i].p = exp(((double)logits[i] - mx) / temp); scratch[i].id = i; sum += scratch[i].p; }
    for (i = 0; i < n; i++) scratch[i].p /= sum;
    qsort(scratch, (size_t)n, sizeof *scratch, cmp_prob_desc);
    cut = n;
    if (topp > 0.0f && topp < 1.0f) {
        for (i = 0; i < n; i++) { cum += scratch[i].p; if (cum >= topp) { cut = i + 1; break; } }
    } else {
        cum = 1.0;
    }
    if (cut < n) { cum = 0.0; for (i = 0; i < cut; i++) cum += scratch[i].p; }
    r = rng_unit(rng) * cum;
    for (i = 0; i < cut; i++) { r -= scratch[i].p; if (r <= 0.0) return scratch[i].id; }
    return scratch[cut - 1].id;
}

/* prints a decoded piece, dropping control bytes other than white space */
static void print_piece(const char *s, int len)
{
    int i;
    if (len == 1 && !(isprint((unsigned char)s[0]) || isspace((unsigned char)s[0])) && (unsigned char)s[0] < 0x80)
        return;
    for (i = 0; i < len; i++) putchar(s[i]);
}

static int generate(const kvqd_checkpoint *ck, const kvqd_tokenizer *tok, const char *config, const char *prompt,
                    int steps, unsigned long long seed, float temp, float topp)
{
    llm_cache_spec spec;
    llm_run run;
    char err[256] = "", piece[64];
    int *ids, n_ids = 0, token, pos = 0, next = 0, rc = 0, stopped = 0;
    const float *logits;
    prob_id *scratch;
    uint64_t rng = seed ? seed : 0x9E3779B97F4A7C15ULL;
    const kvqd_llama_config *p = &ck->cfg;
    size_t plen = prompt ? strlen(prompt) : 0;

    if (llm_parse_config(config, p->head_dim, p->n_kv_heads, p->seq_len, &spec, err, sizeof err) != 0) {
        fprintf(stderr, "%s\n", err);
        return 1;
    }
    ids = (int *)calloc(plen + 3, sizeof(int));
    scratch = (prob_id *)calloc((size_t)p->vocab_size + 1, sizeof(prob_id));
    if (!ids || !scratch) { free(ids); free(scratch); fprintf(stderr, "out of memory\n"); return 1; }
    if (kvqd_tokenizer_encode(tok, prompt ? prompt : "", 1, 0, ids, (int)plen + 3, &n_ids, err, sizeof err) != KVQD_OK) {
        fprintf(stderr, "encode: %s\n", err);
        free(ids); free(scratch);
        return 1;
    }
    if (llm_run_init(&run, ck, &spec, err, sizeof err) != 0) {
        fprintf(stderr, "%s\n", err);
        free(ids); free(scratch);
        return 1;
    }
    if (n_ids < 1) ids[n_ids++] = tok->bos_id;
    if (steps <= 0 || steps > p->seq_len) steps = p->seq_len;
    if (n_ids > steps) n_ids = steps;
    logits = llm_prefill(&run, ids, n_ids, err, sizeof err); /* the prompt in one pass */
    for (pos = 1; pos < n_ids; pos++) {
        int len = kvqd_tokenizer_decode(tok, ids[pos - 1], ids[pos], piece, sizeof piece);
        if (len > 0) print_piece(piece, len);
    }
    pos = n_ids;
    token = ids[n_ids - 1];
    while (logits) {
        int len;
        next = sample(logits, p->vocab_size, temp, topp, &rng, scratch);
        if (next == tok->bos_id) { stopped = 1; break; } /* BOS separates stories */
        len = kvqd_tokenizer_decode(tok, token, next, piece, sizeof piece);
        if (len > 0) print_piece(piece, len);
        fflush(stdout);
        token = next;
        if (pos >= steps) break;
        logits = llm_forward(&run, token, err, sizeof err);
        pos++;
    }
    if (!logits) { fprintf(stderr, "\n%s\n", err); rc = 1; }
    printf(stopped || rc ? "\n" : " [...]\n");
    llm_run_free(&run);
    free(ids);
    free(scratch);
    return rc;
}

static int argmax(const float *x, int n)
{
    int i, best = 0;
    for (i = 1; i < n; i++) if (x[i] > x[best]) best = i;
    return best;
}

/* Whether every layer's cache of a and b serializes to the same bytes. */
static int same_caches(const llm_run *a, const llm_run *b)
{
    int l, same = 1;
    for (l = 0; l < a->ck->cfg.n_layers && same; l++) {
        size_t na = kvq_cache_serialized_bytes(a->caches[l]), nb = kvq_cache_serialized_bytes(b->caches[l]);
        unsigned char *ia = (unsigned char *)malloc(na), *ib = (unsigned char *)malloc(nb);
        same = ia && ib && na == nb && kvq_cache_serialize(a->caches[l], ia, na, NULL) == KVQ_OK &&
               kvq_cache_serialize(b->caches[l], ib, nb, NULL) == KVQ_OK && memcmp(ia, ib, na) == 0;
        free(ia);
        free(ib);
    }
    return same;
}

/* Speculative decoding's step on the cache: DRAFT guessed tokens run through the model
   (each appended and attended, as the target model does to verify them), the last REJECT
   are refused and cut with kvq_cache_truncate (within rollback_tokens, 16 by default),
   and decoding goes on. Run a must then be, bit for bit, run b that never saw the draft:
   the same logits at every later step and the same bytes in every layer's cache. The
   config records attention for its salient tokens and has a short residual window, so a
   key block leaves the window inside the draft and is taken back. */
#define DRAFT_AT 62
#define DRAFT 8
#define REJECT 5
static int rollback_demo(const kvqd_checkpoint *ck, const kvqd_tokenizer *tok)
{
    static const char *config = "k2v2r32x10";
    const kvqd_llama_config *p = &ck->cfg;
    const size_t vbytes = (size_t)p->vocab_size * sizeof(float);
    llm_cache_spec spec;
    llm_run a, b;
    char err[256] = "";
    int ids[32], n_ids = 0, draft[DRAFT], i, same = 1, ok;
    const float *la, *lb;
    uint64_t rng = 7;
    prob_id *scratch = (prob_id *)calloc((size_t)p->vocab_size + 1, sizeof(prob_id));
    if (!scratch || llm_parse_config(config, p->head_dim, p->n_kv_heads, p->seq_len, &spec, err, sizeof err) != 0 ||
        kvqd_tokenizer_encode(tok, "Once upon a time", 1, 0, ids, 32, &n_ids, err, sizeof err) != KVQD_OK) {
        fprintf(stderr, "rollback demo: %s\n", err);
        free(scratch);
        return 1;
    }
    if (llm_run_init(&a, ck, &spec, err, sizeof err) != 0) { fprintf(stderr, "%s\n", err); free(scratch); return 1; }
    if (llm_run_init(&b, ck, &spec, err, sizeof err) != 0) { fprintf(stderr, "%s\n", err); llm_run_free(&a); free(scratch); return 1; }
    /* the prompt, then greedy decoding on both runs alike up to the draft */
    la = llm_prefill(&a, ids, n_ids, err, sizeof err);
    lb = llm_prefill(&b, ids, n_ids, err, sizeof err);
    ok = la && lb;
    while (ok && a.pos < DRAFT_AT) {
        int next = argmax(la, p->vocab_size);
        ok = (la = llm_forward(&a, next, err, sizeof err)) && (lb = llm_forward(&b, next, err, sizeof err));
    }
    /* a: a draft model's guesses (here: samples) through the model, then the refused ones cut */
    for (i = 0; ok && i < DRAFT; i++) {
        draft[i] = sample(la, p->vocab_size, 1.0f, 0.9f, &rng, scratch);
        ok = (la = llm_forward(&a, draft[i], err, sizeof err)) != NULL;
    }
    ok = ok && llm_run_truncate(&a, a.pos - REJECT, err, sizeof err) == 0;
    /* b: only the accepted tokens; then both decode on, fed the same tokens */
    for (i = 0; ok && i < DRAFT - REJECT; i++) ok = (lb = llm_forward(&b, draft[i], err, sizeof err)) != NULL;
    for (i = 0; ok && i < 8; i++) {
        int next = argmax(lb, p->vocab_size);
        ok = (la = llm_forward(&a, next, err, sizeof err)) && (lb = llm_forward(&b, next, err, sizeof err));
        same = same && ok && memcmp(la, lb, vbytes) == 0;
    }
    same = same && ok && same_caches(&a, &b);
    if (!ok) fprintf(stderr, "rollback demo: %s\n", err);
    else
        printf("rollback (%s, rollback_tokens %d): %d draft tokens at positions %d-%d (a key block left the window\n"
               "at %d), %d cut with kvq_cache_truncate, 8 more decoded: logits and all %d layers' caches\n"
               "bit-identical to a run that never drafted: %s\n",
               config, spec.cfg.rollback_tokens, DRAFT, DRAFT_AT, DRAFT_AT + DRAFT - 1,
               spec.cfg.sink_tokens + spec.cfg.residual_tokens + spec.cfg.group_size, REJECT, p->n_layers,
               same ? "yes" : "NO");
    llm_run_free(&a);
    llm_run_free(&b);
    free(scratch);
    return ok && same ? 0 : 1;
}

static int score(const kvqd_checkpoint *ck, const int *tokens, int n_tokens, const char *const *configs, int n_configs,
                 const char *label)
{
    const kvqd_llama_config *p = &ck->cfg;
    int n_pred = llm_count_predictions(n_tokens, p->seq_len), i;
    float *ref;
    llm_cache_spec fp32;
    llm_score_result base;
    char err[256] = "";
    if (n_pred < 1) { fprintf(stderr, "need at least 2 tokens\n"); return 1; }
    for (i = 0; i < n_configs; i++) { /* every config is checked before any work */
        llm_cache_spec spec;
        if (llm_parse_config(configs[i], p->head_dim, p->n_kv_heads, p->seq_len, &spec, err, sizeof err) != 0) {
            fprintf(stderr, "%s\n", err);
            return 1;
        }
    }
    ref = (float *)calloc((size_t)n_pred * (size_t)p->vocab_size, sizeof(float));
    if (!ref) { fprintf(stderr, "out of memory\n"); return 1; }
    llm_parse_config("fp32", p->head_dim, p->n_kv_heads, p->seq_len, &fp32, err, sizeof err);
    if (llm_score(ck, &fp32, tokens, n_tokens, NULL, ref, &base, err, sizeof err) != 0) {
        fprintf(stderr, "fp32: %s\n", err);
        free(ref);
        return 1;
    }
    printf("%s: %d tokens, windows of %d, %d predictions; KL = mean KL(p_fp32 || p_config) of next-token distributions\n",
           label, n_tokens, p->seq_len, n_pred);
    printf("%-12s %8s %8s %10s %9s %9s %11s %8s\n", "config", "bits/el", "bits/el", "CE", "PPL", "dPPL", "KL", "time");
    printf("%-12s %8s %8s %10s %9s %9s %11s %8s\n", "", "steady", "actual", "nats/tok", "", "", "nats", "s");
    printf("%-12s %8.2f %8.2f %10.4f %9.4f %9s %11s %8.3f\n", "fp32", 32.0, 32.0, base.ce, base.ppl, "-", "-", base.seconds);
    for (i = 0; i < n_configs; i++) {
        llm_cache_spec spec;
        llm_score_result r;
        if (llm_parse_config(configs[i], p->head_dim, p->n_kv_heads, p->seq_len, &spec, err, sizeof err) != 0) {
            fprintf(stderr, "%s\n", err);
            free(ref);
            return 1;
        }
        if (llm_score(ck, &spec, tokens, n_tokens, spec.fp32 ? NULL : ref, NULL, &r, err, sizeof err) != 0) {
            fprintf(stderr, "%s: %s\n", configs[i], err);
            free(ref);
            return 1;
        }
        printf("%-12s %8.2f %8.2f %10.4f %9.4f %+8.2f%% %11.3e %8.3f\n", spec.name, llm_bits_steady(&spec),
               r.bits_actual, r.ce, r.ppl, 100.0 * (r.ppl / base.ppl - 1.0), r.kl, r.seconds);
    }
    printf("bits/el: storage per K/V element; steady = quantized part only (fp16 scale+min per group), "
           "actual = 8*payload/(2*tokens*kv_dim) of the final window's caches (residual window included)\n");
    free(ref);
    return 0;
}

static int load_model(const char *model, const char *tokpath, kvqd_checkpoint *ck, kvqd_tokenizer *tok)
{
    char err[256] = "";
    if (kvqd_checkpoint_load(ck, model, err, sizeof err) != KVQD_OK) {
        fprintf(stderr, "model: %s\n", err);
        return 1;
    }
    if (tok && kvqd_tokenizer_load(tok, tokpath, ck->cfg.vocab_size, err, sizeof err) != KVQD_OK) {
        fprintf(stderr, "tokenizer: %s\n", err);
        kvqd_checkpoint_free(ck);
        return 1;
    }
    return 0;
}

static int demo(void)
{
    kvqd_checkpoint ck;
    kvqd_tokenizer tok;
    int *tokens = NULL, n_tokens = 0, rc;
    char err[256] = "";
    if (load_model(DEMO_MODEL, DEMO_TOK, &ck, &tok) != 0) {
        fprintf(stderr, "(the demo reads examples/data/: run it from the repository root)\n");
        usage();
        return 1;
    }
    printf("stories260K (dim %d, %d layers, %d/%d heads, head_dim %d, seq_len %d), kvq's default cache "
           "(3-bit keys per channel in blocks of 64 tokens, 2-bit values per token in groups of 32, residual 128):\n\n",
           ck.cfg.dim, ck.cfg.n_layers, ck.cfg.n_heads, ck.cfg.n_kv_heads, ck.cfg.head_dim, ck.cfg.seq_len);
    rc = generate(&ck, &tok, "default", "Once upon a time", 200, 42, 1.0f, 0.9f);
    if (rc == 0) {
        printf("\n");
        rc = rollback_demo(&ck, &tok);
    }
    if (rc == 0) {
        printf("\n");
        if (kvqd_tokens_load(DEMO_TOKENS, ck.cfg.vocab_size, &tokens, &n_tokens, err, sizeof err) != KVQD_OK) {
            fprintf(stderr, "%s\n", err);
            rc = 1;
        } else {
            rc = score(&ck, tokens, n_tokens, default_configs,
                       (int)(sizeof default_configs / sizeof default_configs[0]), DEMO_TOKENS);
        }
    }
    free(tokens);
    kvqd_tokenizer_free(&tok);
    kvqd_checkpoint_free(&ck);
    return rc;
}

static int parse_int(const char *s, long lo, long hi, long *out)
{
    char *end;
    long v = strtol(s, &end, 10);
    if (!*s || *end || v < lo || v > hi) return 0;
    *out = v;
    return 1;
}

int main(int argc, char **argv)
{
    kvqd_checkpoint ck;
    kvqd_tokenizer tok;
    char err[256] = "";
    int i, rc;
    if (argc == 1) return demo();
    if (strcmp(argv[1], "generate") == 0 && argc >= 4) {
        const char *prompt = "", *config = "default";
        long steps = 256, v;
        unsigned long long seed = 42;
        float temp = 1.0f, topp = 0.9f;
        for (i = 4; i < argc; i++) {
            if (i + 1 >= argc) { usage(); return 2; }
            if (strcmp(argv[i], "-p") == 0) prompt = argv[++i];
            else if (strcmp(argv[i], "-c") == 0) config = argv[++i];
            else if (strcmp(argv[i], "-n") == 0 && parse_int(argv[i + 1], 1, 1 << 24, &v)) { steps = v; i++; }
            else if (strcmp(argv[i], "-s") == 0 && parse_int(argv[i + 1], 0, 2147483647L, &v)) { seed = (unsigned long long)v; i++; }
            else if (strcmp(argv[i], "-t") == 0) temp = (float)atof(argv[++i]);
            else if (strcmp(argv[i], "-P") == 0) topp = (float)atof(argv[++i]);
            else { usage(); return 2; }
        }
        if (load_model(argv[2], argv[3], &ck, &tok) != 0) return 1;
        rc = generate(&ck, &tok, config, prompt, (int)steps, seed, temp, topp);
        kvqd_tokenizer_free(&tok);
        kvqd_checkpoint_free(&ck);
        return rc;
    }
    if (strcmp(argv[1], "score") == 0 && argc >= 5) {
        const char *configs[MAX_CONFIGS];
        int n_configs = 0, *tokens = NULL, n_tokens = 0;
        for (i = 5; i < argc; i++) {
            if (strcmp(argv[i], "-c") == 0 && i + 1 < argc && n_configs < MAX_CONFIGS) configs[n_configs++] = argv[++i];
            else { usage(); return 2; }
        }
        if (n_configs == 0)
            for (i = 0; i < (int)(sizeof default_configs / sizeof default_configs[0]); i++) configs[n_configs++] = default_configs[i];
        /* the tokenizer is only checked here, so a bad TOK is reported before scoring */
        if (load_model(argv[2], argv[3], &ck, &tok) != 0) return 1;
        if (kvqd_tokens_load(argv[4], ck.cfg.vocab_size, &tokens, &n_tokens, err, sizeof err) != KVQD_OK) {
            fprintf(stderr, "%s\n", err);
            kvqd_tokenizer_free(&tok);
            kvqd_checkpoint_free(&ck);
            return 1;
        }
        rc = score(&ck, tokens, n_tokens, configs, n_configs, argv[4]);
        free(tokens);
        kvqd_tokenizer_free(&tok);
        kvqd_checkpoint_free(&ck);
        return rc;
    }
    usage();
    return 2;
}
