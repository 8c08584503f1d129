/* llama.c — a tiny Llama whose KV cache is a kvq cache.

   llama                                     demo: story + PPL/KL table (bundled data)
   llama generate MODEL TOK [-p PROMPT] [-n N] [-s SEED] [-t TEMP] [-P TOPP] [-c CONFIG]
   llama score MODEL TOK TOKENS [-c CONFIG]...

   TOKENS is a text file of decimal token ids ('#' comments) or a KVDUMP01 file,
   whose token ids are used. CONFIG: k2v2 (default), k4v2, k16v16, fp32, with
   optional g64 (group size), r0 (residual tokens), s4 (sink tokens), h (Hadamard).

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

static const char *const default_configs[] = { "fp16", "k8v8", "k4v4", "k3v3", "k2v2", "k2v2g64" };

static void usage(void)
{
    fprintf(stderr,
            "usage:\n"
            "  llama                      demo on examples/data (run from the repository root)\n"
            "  llama generate MODEL TOK [-p PROMPT] [-n STEPS] [-s SEED] [-t TEMP] [-P TOPP] [-c CONFIG]\n"
            "  llama score MODEL TOK TOKENS_FILE [-c CONFIG]...\n"
            "CONFIG: k<bits>v<bits>[g<G>][r<R>][s<S>][h], bits in {2,3,4,8,16}; fp16 = k16v16;\n"
            "        fp32 = exact float attention. Default k2v2 (G 32, residual 128).\n");
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
    token = ids[0];
    while (pos < steps) {
        const float *logits = llm_forward(&run, token, err, sizeof err);
        int len;
        if (!logits) { fprintf(stderr, "\n%s\n", err); rc = 1; break; }
        if (pos + 1 < n_ids) {
            next = ids[pos + 1];     /* still reading the prompt */
        } else {
            next = sample(logits, p->vocab_size, temp, topp, &rng, scratch);
        }
        pos++;
        if (next == tok->bos_id) { stopped = 1; break; } /* BOS separates stories */
        len = kvqd_tokenizer_decode(tok, token, next, piece, sizeof piece);
        if (len > 0) print_piece(piece, len);
        fflush(stdout);
        token = next;
    }
    printf(stopped || rc ? "\n" : " [...]\n");
    llm_run_free(&run);
    free(ids);
    free(scratch);
    return rc;
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
    printf("stories260K (dim %d, %d layers, %d/%d heads, head_dim %d, seq_len %d), cache k2v2 "
           "(2-bit keys per channel and values per token, G 32, residual 128):\n\n",
           ck.cfg.dim, ck.cfg.n_layers, ck.cfg.n_heads, ck.cfg.n_kv_heads, ck.cfg.head_dim, ck.cfg.seq_len);
    rc = generate(&ck, &tok, "k2v2", "Once upon a time", 200, 42, 1.0f, 0.9f);
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
        const char *prompt = "", *config = "k2v2";
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
