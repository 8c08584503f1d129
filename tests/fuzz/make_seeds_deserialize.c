/* Writes the seeds of fuzz_deserialize (tests/fuzz/seeds_deserialize/): real images of small
   caches, one per record kind the loader checks. Run from the repository root:
     cc -std=c99 -O1 -I. -o build/make_seeds_deserialize tests/fuzz/make_seeds_deserialize.c -lm
     build/make_seeds_deserialize tests/fuzz/seeds_deserialize */
#define KVQ_IMPLEMENTATION
#include "../../kvq.h"
#include <stdio.h>
#include <stdlib.h>

typedef struct seed {
    const char *name;
    int head_dim, heads, kbits, vbits, group, residual, sinks, tokens, key_block, pbits;
} seed;

static const seed seeds[] = {
    {"empty", 8, 1, 2, 2, 32, 0, 0, 0, 0, 0},
    {"k16v8", 8, 1, 16, 8, 32, 32, 1, 20, 0, 0},
    {"k2v2_s2", 8, 1, 2, 2, 16, 0, 2, 40, 0, 0},
    {"k3v4_r16", 16, 2, 3, 4, 16, 16, 0, 50, 0, 0},
    {"k3v2_b32_p16", 16, 1, 3, 2, 16, 32, 2, 90, 32, 16},
};

int main(int argc, char **argv) {
    size_t i;
    if (argc != 2) { fprintf(stderr, "usage: make_seeds_deserialize DIR\n"); return 2; }
    for (i = 0; i < sizeof seeds / sizeof seeds[0]; i++) {
        const seed *s = &seeds[i];
        kvq_config cfg = kvq_default_config(s->head_dim, s->heads, 96);
        kvq_cache *c = NULL;
        float k[2 * 16], v[2 * 16];
        unsigned char *img;
        size_t n;
        char path[512];
        FILE *f;
        int t, j;
        cfg.key_bits = s->kbits;
        cfg.value_bits = s->vbits;
        cfg.group_size = s->group;
        cfg.residual_tokens = s->residual;
        cfg.sink_tokens = s->sinks;
        cfg.key_block = s->key_block;
        cfg.value_param_bits = s->pbits;
        if (kvq_cache_create(&c, &cfg) != KVQ_OK) { fprintf(stderr, "%s: config refused\n", s->name); return 1; }
        for (t = 0; t < s->tokens; t++) {
            for (j = 0; j < s->heads * s->head_dim; j++) {
                k[j] = (float)((t * 7 + j * 3) % 13 - 6) * 0.25f * (float)(j % s->head_dim + 1);
                v[j] = (float)((t * 5 + j * 11) % 9 - 4) * 0.5f;
            }
            kvq_cache_append(c, k, v, 1);
        }
        n = kvq_cache_serialized_bytes(c);
        img = (unsigned char *)malloc(n);
        if (!img || kvq_cache_serialize(c, img, n, NULL) != KVQ_OK) return 1;
        snprintf(path, sizeof path, "%s/%s", argv[1], s->name);
        if (!(f = fopen(path, "wb")) || fwrite(img, 1, n, f) != n || fclose(f)) { perror(path); return 1; }
        printf("%s: %zu bytes\n", path, n);
        free(img);
        kvq_cache_destroy(c);
    }
    return 0;
}
