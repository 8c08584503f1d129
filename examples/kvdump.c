/* kvdump.c — writes a KVDUMP01 file (real attention inputs) from a Llama checkpoint.

   kvdump MODEL TOKENS OUT.kvd [-w WINDOW] [-m MASK]
       Runs MODEL (llama_model.h, exact fp32 attention) over the token ids in TOKENS
       (a .tokens text file or a .kvd dump, as llama.c reads them) and writes every
       layer's attention inputs: Kpost, Kpre, V, Qpost, Qpre (MASK: a subset of 31,
       default all). The text is cut into windows of WINDOW tokens (default and at
       most the model's seq_len): token t sits at position t % WINDOW and each window
       starts on a fresh cache, as the format's README says.
   kvdump diff A.kvd B.kvd [TOL]
       Compares two dumps: shapes, token ids, then per tensor both hold the largest
       |a - b| and the largest |a|. Exit status 1 when shapes or ids differ or a
       tensor's largest |a - b| passes TOL times its largest |a| (default 0: any
       difference fails; 1e-5 passes float rounding of a forward pass).
   kvdump tokens DUMP.kvd OUT.tokens
       Writes a dump's token ids as a .tokens text file.

   `make eval` builds it and generates build/stories260K_gen.kvd and
   build/babyllama105_gen.kvd from the checkpoints and token lists in examples/data.

   Build: cc -std=c99 -O2 -Wall -Wextra -Werror -I. -o build/kvdump examples/kvdump.c -lm */
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

static const char *const tensor_names[5] = { "Kpost", "Kpre", "V", "Qpost", "Qpre" };

static void usage(void)
{
    fprintf(stderr, "usage:\n"
                    "  kvdump MODEL TOKENS OUT.kvd [-w WINDOW] [-m MASK]   MASK: 1 Kpost, 2 Kpre, 4 V, 8 Qpost, 16 Qpre (default 31)\n"
                    "  kvdump diff A.kvd B.kvd [TOL]\n"
                    "  kvdump tokens DUMP.kvd OUT.tokens\n");
}

static int make_dump(const char *model, const char *tokens_path, const char *out, int window, int mask)
{
    kvqd_checkpoint ck;
    kvqd_dump d;
    char err[256] = "";
    int *ids = NULL, n_ids = 0, rc = 1;
    if (kvqd_checkpoint_load(&ck, model, err, sizeof err) != KVQD_OK) { fprintf(stderr, "kvdump: %s\n", err); return 1; }
    if (kvqd_tokens_load(tokens_path, ck.cfg.vocab_size, &ids, &n_ids, err, sizeof err) != KVQD_OK) {
        fprintf(stderr, "kvdump: %s\n", err);
        kvqd_checkpoint_free(&ck);
        return 1;
    }
    if (llm_dump(&ck, ids, n_ids, window, mask, &d, err, sizeof err) != 0 ||
        kvqd_dump_write(&d, out, err, sizeof err) != KVQD_OK) {
        fprintf(stderr, "kvdump: %s\n", err);
    } else {
        printf("wrote %s: %d tokens in windows of %d, %d layers, %d/%d heads, head_dim %d, tensor mask %d\n", out,
               d.n_tokens, d.window, d.n_layers, d.n_heads, d.n_kv_heads, d.head_dim, d.tensor_mask);
        rc = 0;
    }
    kvqd_dump_free(&d);
    free(ids);
    kvqd_checkpoint_free(&ck);
    return rc;
}

/* ---- diff ---- */

static int diff_dumps(const char *pa, const char *pb, double tol)
{
    kvqd_dump a, b;
    char err[256] = "";
    int rc = 0, l, bit, i;
    if (kvqd_dump_load(&a, pa, err, sizeof err) != KVQD_OK) { fprintf(stderr, "kvdump: %s\n", err); return 1; }
    if (kvqd_dump_load(&b, pb, err, sizeof err) != KVQD_OK) { fprintf(stderr, "kvdump: %s\n", err); kvqd_dump_free(&a); return 1; }
    if (a.n_layers != b.n_layers || a.n_heads != b.n_heads || a.n_kv_heads != b.n_kv_heads || a.head_dim != b.head_dim ||
        a.n_tokens != b.n_tokens || a.window != b.window) {
        printf("shapes differ: %d layers, %d/%d heads, head_dim %d, %d tokens, window %d against "
               "%d layers, %d/%d heads, head_dim %d, %d tokens, window %d\n",
               a.n_layers, a.n_heads, a.n_kv_heads, a.head_dim, a.n_tokens, a.window,
               b.n_layers, b.n_heads, b.n_kv_heads, b.head_dim, b.n_tokens, b.window);
        rc = 1;
        goto done;
    }
    for (i = 0; i < a.n_tokens; i++)
        if (a.tokens[i] != b.tokens[i]) { printf("token ids differ first at %d: %d against %d\n", i, a.tokens[i], b.tokens[i]); rc = 1; goto done; }
    if (a.dim != b.dim || a.vocab_size != b.vocab_size || a.seq_len != b.seq_len || a.rope_theta != b.rope_theta)
        printf("note: informational header fields differ (dim, vocab_size, seq_len or rope_theta)\n");
    printf("%d tokens, windows of %d, %d layers; per tensor over all layers:\n", a.n_tokens, a.window, a.n_layers);
    printf("  %-6s %12s %12s %12s %6s\n", "tensor", "max|a-b|", "max|a|", "rel", "layer");
    for (bit = 1, i = 0; bit <= KVQD_QPRE; bit <<= 1, i++) {
        double mx = 0.0, amax = 0.0;
        int worst = 0;
        size_t n = kvqd_dump_tensor_floats(&a, bit), j;
        if (!(a.tensor_mask & bit) || !(b.tensor_mask & bit)) {
            if ((a.tensor_mask | b.tensor_mask) & bit) printf("  %-6s only in %s\n", tensor_names[i], a.tensor_mask & bit ? pa : pb);
            continue;
        }
        for (l = 0; l < a.n_layers; l++) {
            const float *x = kvqd_dump_tensor(&a, l, bit), *y = kvqd_dump_tensor(&b, l, bit);
            for (j = 0; j < n; j++) {
                double dd = fabs((double)x[j] - (double)y[j]);
                if (dd > mx) { mx = dd; worst = l; }
                if (fabs((double)x[j]) > amax) amax = fabs((double)x[j]);
            }
        }
        printf("  %-6s %12.3e %12.3e %12.3e %6d\n", tensor_names[i], mx, amax, amax > 0.0 ? mx / amax : 0.0, worst);
        if (mx > tol * amax) rc = 1;
    }
done:
    kvqd_dump_free(&a);
    kvqd_dump_free(&b);
    return rc;
}

static int dump_tokens(const char *in, const char *out)
{
    kvqd_dump d;
    char err[256] = "", comment[600];
    int rc;
    if (kvqd_dump_load(&d, in, err, sizeof err) != KVQD_OK) { fprintf(stderr, "kvdump: %s\n", err); return 1; }
    snprintf(comment, sizeof comment, "the %d token ids of %s (vocab %d, windows of %d). One decimal id per line;\n"
             "'#' starts a comment.", d.n_tokens, in, d.vocab_size, d.window);
    rc = kvqd_tokens_write(out, d.tokens, d.n_tokens, comment, err, sizeof err) == KVQD_OK ? 0 : 1;
    if (rc) fprintf(stderr, "kvdump: %s\n", err);
    kvqd_dump_free(&d);
    return rc;
}

static int parse_int(const char *s, long lo, long hi, int *out)
{
    char *end;
    long v = strtol(s, &end, 10);
    if (!*s || *end || v < lo || v > hi) return 0;
    *out = (int)v;
    return 1;
}

int main(int argc, char **argv)
{
    int window = 0, mask = KVQD_ALL_TENSORS, i;
    if (argc >= 4 && strcmp(argv[1], "diff") == 0 && argc <= 5) {
        double tol = 0.0;
        if (argc == 5) {
            char *end;
            tol = strtod(argv[4], &end);
            if (!*argv[4] || *end || !(tol >= 0.0)) { usage(); return 2; }
        }
        return diff_dumps(argv[2], argv[3], tol);
    }
    if (argc == 4 && strcmp(argv[1], "tokens") == 0) return dump_tokens(argv[2], argv[3]);
    if (argc < 4 || argv[1][0] == '-') { usage(); return 2; }
    for (i = 4; i < argc; i++) {
        if (i + 1 < argc && strcmp(argv[i], "-w") == 0 && parse_int(argv[i + 1], 1, 1L << 24, &window)) i++;
        else if (i + 1 < argc && strcmp(argv[i], "-m") == 0 && parse_int(argv[i + 1], 1, KVQD_ALL_TENSORS, &mask)) i++;
        else { usage(); return 2; }
    }
    return make_dump(argv[1], argv[2], argv[3], window, mask);
}
