/* Compile test: the header included twice, the implementation in this unit with
   KVQ_STATIC (private copy), and a second unit (compile_b.c) doing the same, so the
   program links two static copies without clashing. Built as C99 and as C++. */
#define KVQ_STATIC
#define KVQ_IMPLEMENTATION
#include "../kvq.h"
#include "../kvq.h"
#include <stdio.h>

int compile_b_run(void);

static int run_a(void) {
    kvq_config cfg = kvq_default_config(64, 2, 256);
    kvq_cache *c = NULL;
    float k[2 * 64] = {0}, v[2 * 64] = {0}, q[4 * 64] = {0}, o[4 * 64];
    kvq_attn_params ap = {4, 1, 0.0f};
    int ok;
    k[0] = 1.0f;
    v[1] = 2.0f;
    if (kvq_cache_create(&c, &cfg) != KVQ_OK) return 1;
    ok = kvq_cache_append(c, k, v, 1) == KVQ_OK && kvq_attention(c, q, o, &ap) == KVQ_OK && o[1] == 2.0f;
    kvq_cache_destroy(c);
    return ok ? 0 : 1;
}

int main(void) {
    int fails = run_a() + compile_b_run();
    printf("compile: %d passed, %d failed\n", 2 - fails, fails);
    return fails;
}
