/* kernels: the attention kernels one at a time, on the active ISA (the same dispatch attention
   uses), for the cycle budget of issue-style targets: ns and cycles per token per KV head of
     keys:    a quantized key block's scores (kvq__k_scores_int, integer; kvq__k_scores_codes, float),
              query preparation included, for key blocks of 32, 64 and 128 tokens;
     values:  a run of KVQ__INT_RUN tokens into the accumulators (kvq__k_acc_int with its weight
              preparation; kvq__k_acc_codes), groups of 32 channels;
     softmax: exp and sum over a tile (kvq__k_exp_sum);
     records: per-token 8-bit records (the salient side store's), 8 a call as in a tile at 5%:
              their keys' scores (kvq__k_dot_codes) and their values (kvq__k_acc_codes), per record.
   head_dim 128, 1 thread, synthetic codes and params (the kernels' time does not depend on them),
   16K tokens per pass (the codes stay in L2), best of 15 passes; CPU time beside wall time.
   Usage: build/kernels [--heads N] (query heads per KV head, default 4: GQA 32/8; 1: MHA). */
#define _POSIX_C_SOURCE 200809L /* clock_gettime */
#define KVQ_IMPLEMENTATION
#include "kvq.h"
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

enum { D = 128, TOKENS = 16384, PASSES = 15 };

#include "bench_clock.h" /* now_s, cpu_s, measure_ghz */

typedef struct timing { double wall, cpu; } timing;

/* Best pass of fn(arg) over PASSES: wall and CPU seconds. */
static timing best_of(void (*fn)(void *), void *arg) {
    timing b = {1e30, 1e30};
    int r;
    fn(arg); /* warm-up */
    for (r = 0; r < PASSES; r++) {
        const double w0 = now_s(), c0 = cpu_s();
        double w, c;
        fn(arg);
        w = now_s() - w0;
        c = cpu_s() - c0;
        if (w < b.wall) {
            b.wall = w;
            b.cpu = c;
        }
    }
    return b;
}

typedef struct job {
    int G, bits, nh, integer;
    uint8_t *mem;
    size_t block_bytes, row_bytes;
    float q[KVQ__HEAD_CHUNK * D], p[KVQ__HEAD_CHUNK * KVQ__TILE], par[2 * KVQ__WMAX];
    float scores[KVQ__HEAD_CHUNK * KVQ__TILE], accb[KVQ__HEAD_CHUNK * D];
    float sink;
} job;

static void keys_pass(void *arg) {
    job *j = (job *)arg;
    int b;
    for (b = 0; b < TOKENS / j->G; b++) {
        const uint8_t *blk = j->mem + j->block_bytes * (size_t)b;
        if (j->integer) kvq__k_scores_int(blk, D, j->G, j->bits, j->q, j->nh, j->scores);
        else kvq__k_scores_codes(blk, D, j->G, j->bits, j->q, j->nh, j->scores);
    }
    j->sink += j->scores[1];
}

static void values_pass(void *arg) {
    job *j = (job *)arg;
    float *acc[KVQ__HEAD_CHUNK];
    int t, k;
    for (k = 0; k < j->nh; k++) acc[k] = j->accb + (size_t)k * D;
    for (t = 0; t < TOKENS; t += KVQ__INT_RUN) {
        const uint8_t *codes = j->mem + j->row_bytes * (size_t)t;
        if (j->integer) kvq__k_acc_int(codes, j->row_bytes, j->par, KVQ__INT_RUN, D, 32, j->bits, j->p, j->nh, acc);
        else kvq__k_acc_codes(codes, j->row_bytes, j->par, KVQ__INT_RUN, D, 32, j->bits, j->p, j->nh, acc);
    }
    j->sink += j->accb[3];
}

static void exp_pass(void *arg) {
    job *j = (job *)arg;
    int t, k;
    for (t = 0; t < TOKENS; t += KVQ__TILE)
        for (k = 0; k < j->nh; k++) {
            memcpy(j->scores + (size_t)k * KVQ__TILE, j->p + (size_t)k * KVQ__TILE, KVQ__TILE * sizeof(float));
            j->sink += kvq__k_exp_sum(j->scores + (size_t)k * KVQ__TILE, KVQ__TILE, 1.0f);
        }
}

/* TOKENS side-store records, 8 a call, from a working set of 4096 (in L2), at an entry's stride */
enum { RECORDS_A_CALL = 8, RECORD_SET = 4096, RECORD_STRIDE = D + 16 };
static void records_pass(void *arg) {
    job *j = (job *)arg;
    float *acc[KVQ__HEAD_CHUNK];
    int r, k;
    for (k = 0; k < j->nh; k++) acc[k] = j->accb + (size_t)k * D;
    for (r = 0; r < TOKENS; r += RECORDS_A_CALL) {
        const uint8_t *codes = j->mem + (size_t)RECORD_STRIDE * (size_t)(r % RECORD_SET);
        if (j->integer) kvq__k_dot_codes(codes, RECORD_STRIDE, j->par, RECORDS_A_CALL, D, 32, 8, j->q, j->nh, j->scores);
        else kvq__k_acc_codes(codes, RECORD_STRIDE, j->par, RECORDS_A_CALL, D, 32, 8, j->p, j->nh, acc);
    }
    j->sink += j->scores[1] + j->accb[3];
}

static void report(const char *what, timing t, double ghz) {
    const double ns = 1e9 * t.wall / TOKENS;
    printf("%-50s %8.2f %9.1f %8.2f\n", what, ns, ns * ghz, 1e9 * t.cpu / TOKENS);
}

int main(int argc, char **argv) {
    static job j;
    const size_t max_block = (size_t)D * 4 + (size_t)D * 128 * 4 / 8;
    double ghz;
    unsigned seed = 12345u;
    size_t i;
    int G, bits, k;
    j.nh = 4;
    for (k = 1; k < argc; k++) {
        if (!strcmp(argv[k], "--heads") && k + 1 < argc) j.nh = atoi(argv[++k]);
        else { fprintf(stderr, "usage: kernels [--heads N] (1..%d)\n", KVQ__HEAD_CHUNK); return 2; }
    }
    if (j.nh < 1 || j.nh > KVQ__HEAD_CHUNK) { fprintf(stderr, "kernels: --heads 1..%d\n", KVQ__HEAD_CHUNK); return 2; }
    j.mem = (uint8_t *)malloc(max_block * (TOKENS / 16));
    if (!j.mem) return 1;
    for (i = 0; i < max_block * (TOKENS / 16); i++) j.mem[i] = (uint8_t)((seed = seed * 1103515245u + 12345u) >> 16);
    for (i = 0; i < sizeof j.q / sizeof j.q[0]; i++) j.q[i] = (float)((int)(i * 37 % 101) - 50) / 50.0f;
    for (i = 0; i < sizeof j.p / sizeof j.p[0]; i++) j.p[i] = (float)(i * 53 % 97 + 1) / 97.0f;
    for (i = 0; i < sizeof j.par / sizeof j.par[0]; i++) j.par[i] = 0.01f * (float)(i % 7 + 1);
    ghz = measure_ghz();
    printf("kvq kernels: kvq %s, ISA %s, integer kernels %s; clock %.2f GHz (dependent adds)\n", KVQ_VERSION_STRING,
           kvq_isa_name(kvq_get_isa()), kvq_integer_kernels() ? "on" : "off", ghz);
    printf("head_dim %d, %d query head(s) per KV head, %d tokens a pass, best of %d passes, 1 thread\n", D, j.nh, TOKENS,
           PASSES);
    printf("%-50s %8s %9s %8s\n", "kernel (per token per KV head)", "ns", "cycles", "cpu ns");
    for (bits = 2; bits <= 4; bits++)
        for (G = 32; G <= 128; G *= 2) {
            char what[80];
            uint16_t *sc;
            size_t b;
            if (G * bits > 256) continue; /* the integer keys' limit (kvq__int_keys) */
            j.G = G;
            j.bits = bits;
            j.block_bytes = (size_t)D * 4 + (size_t)D * G * bits / 8;
            for (b = 0; b < (size_t)(TOKENS / G); b++) { /* fp16 scales and mins in [1/64, 1/32) */
                sc = (uint16_t *)(void *)(j.mem + j.block_bytes * b);
                for (i = 0; i < 2 * (size_t)D; i++) sc[i] = (uint16_t)(0x2400 + (i * 97 + b) % 1024);
            }
            for (j.integer = 1; j.integer >= 0; j.integer--) {
                snprintf(what, sizeof what, "keys %d-bit, blocks of %d, %s", bits, G, j.integer ? "integer" : "float");
                report(what, best_of(keys_pass, &j), ghz);
            }
        }
    for (bits = 2; bits <= 4; bits++) {
        char what[80];
        j.bits = bits;
        j.row_bytes = (size_t)D * bits / 8;
        for (j.integer = 1; j.integer >= 0; j.integer--) {
            snprintf(what, sizeof what, "values %d-bit, runs of %d, %s", bits, KVQ__INT_RUN,
                     j.integer ? "integer (weights too)" : "float");
            report(what, best_of(values_pass, &j), ghz);
        }
    }
    report("softmax exp and sum", best_of(exp_pass, &j), ghz);
    j.integer = 1; /* here: the keys' pass */
    report("8-bit records, keys' scores (per record)", best_of(records_pass, &j), ghz);
    j.integer = 0;
    report("8-bit records, values (per record)", best_of(records_pass, &j), ghz);
    printf("(checksum %g)\n", (double)j.sink);
    free(j.mem);
    return 0;
}
