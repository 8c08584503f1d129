/* libFuzzer target: kvq_cache_deserialize on arbitrary bytes (built with
   FUZZING_BUILD_MODE_UNSAFE_FOR_PRODUCTION, so checksums do not stop the fuzzer). A refused image must
   leave the caller's memory untouched; an accepted one must behave: read, attend,
   and serialize back to the very same bytes. */
#define KVQ_IMPLEMENTATION
#include "../../kvq.h"
#include <stdlib.h>
#include <string.h>

#define MAX_MEM (64u << 20)

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);
int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    kvq_config cfg;
    kvq_cache *c = NULL;
    size_t need, i;
    uint8_t *mem;
    kvq_status st;
    if (kvq_serialized_config(data, size, &cfg) != KVQ_OK) {
        uint8_t small[256];
        memset(small, 0x5a, sizeof small);
        st = kvq_cache_deserialize(&c, data, size, small, sizeof small);
        if (st == KVQ_OK) abort(); /* the header was refused, the image cannot be accepted */
        for (i = 0; i < sizeof small; i++)
            if (small[i] != 0x5a) abort();
        return 0;
    }
    need = kvq_cache_bytes(&cfg);
    if (need == 0) abort(); /* a config the header check accepted must be buildable */
    if (need > MAX_MEM) return 0;
    mem = (uint8_t *)malloc(need);
    if (!mem) return 0;
    memset(mem, 0x5a, need);
    st = kvq_cache_deserialize(&c, data, size, mem, need);
    if (st != KVQ_OK) {
        for (i = 0; i < need; i++)
            if (mem[i] != 0x5a) abort();
    } else {
        int T = kvq_cache_tokens(c);
        size_t out_n = kvq_cache_serialized_bytes(c), w = 0;
        uint8_t *again = (uint8_t *)malloc(out_n);
        if (T > 0 && (size_t)cfg.n_kv_heads * cfg.head_dim <= 4096) {
            float *kv = (float *)malloc(sizeof(float) * 2 * cfg.n_kv_heads * cfg.head_dim);
            float *q = (float *)calloc((size_t)cfg.n_kv_heads * cfg.head_dim, sizeof(float));
            float *o = (float *)malloc(sizeof(float) * cfg.n_kv_heads * cfg.head_dim);
            kvq_attn_params ap;
            ap.n_q_heads = cfg.n_kv_heads;
            ap.n_queries = 1;
            ap.scale = 0.0f;
            if (kv && kvq_cache_read(c, T - 1, 1, kv, kv + cfg.n_kv_heads * cfg.head_dim) != KVQ_OK) abort();
            if (q && o && kvq_attention(c, q, o, &ap) != KVQ_OK) abort();
            free(kv);
            free(q);
            free(o);
        }
        if (again) {
            /* the same bytes, checksums aside: this build does not check them */
            if (kvq_cache_serialize(c, again, out_n, &w) != KVQ_OK || w > size ||
                memcmp(again, data, KVQ__H_PAYLOAD_CRC) != 0 ||
                memcmp(again + KVQ__H_PAYLOAD_CRC + 4, data + KVQ__H_PAYLOAD_CRC + 4, KVQ__H_CRC - KVQ__H_PAYLOAD_CRC - 4) ||
                memcmp(again + KVQ__HEADER_BYTES, data + KVQ__HEADER_BYTES, w - KVQ__HEADER_BYTES) != 0)
                abort();
            free(again);
        }
    }
    free(mem);
    return 0;
}
