/* Serialization: exact round trips, and every kind of bad image refused without
   writing anything. `--write DIR` saves an image and what it reads back, and
   `--check DIR` loads them (the NEON run checks an x86 image this way). */
#define KVQ_IMPLEMENTATION
#include "../kvq.h"
#include "test_util.h"

typedef struct built {
    kvq_cache *c;
    uint8_t *img;
    size_t n;
} built;

static built build_cache(const kvq_config *cfg, int tokens, unsigned seed) {
    built b;
    size_t row = (size_t)cfg->n_kv_heads * cfg->head_dim;
    float *k = (float *)tu_alloc(row * (tokens + 1) * 4), *v = (float *)tu_alloc(row * (tokens + 1) * 4);
    tu_rng r;
    size_t i;
    r.s = 0x1234567ull + seed;
    tu_fill_kv(&r, TU_STRUCTURED, tokens, cfg->n_kv_heads, cfg->head_dim, k, v);
    b.c = NULL;
    CHECK(kvq_cache_create(&b.c, cfg) == KVQ_OK, "create");
    for (i = 0; i < (size_t)tokens; i++) kvq_cache_append(b.c, k + i * row, v + i * row, 1);
    b.n = kvq_cache_serialized_bytes(b.c);
    b.img = (uint8_t *)tu_alloc(b.n);
    {
        size_t w = 0;
        CHECK(kvq_cache_serialize(b.c, b.img, b.n - 1, &w) == KVQ_ERR_NOMEM && w == 0, "short buffer");
        CHECK(kvq_cache_serialize(b.c, b.img, b.n, &w) == KVQ_OK && w == b.n, "serialize");
    }
    free(k);
    free(v);
    return b;
}

/* Everything a user can observe of two caches is the same. */
static int same_cache(kvq_cache *a, kvq_cache *b) {
    const kvq_config *cfg = kvq_cache_config(a);
    int T = kvq_cache_tokens(a), same;
    size_t n = (size_t)T * cfg->n_kv_heads * cfg->head_dim;
    float *ka = (float *)tu_alloc(n * 4 + 4), *kb = (float *)tu_alloc(n * 4 + 4);
    float *va = (float *)tu_alloc(n * 4 + 4), *vb = (float *)tu_alloc(n * 4 + 4);
    if (T != kvq_cache_tokens(b) || kvq_cache_payload_bytes(a) != kvq_cache_payload_bytes(b)) same = 0;
    else {
        kvq_cache_read(a, 0, T, ka, va);
        kvq_cache_read(b, 0, T, kb, vb);
        same = memcmp(ka, kb, n * 4) == 0 && memcmp(va, vb, n * 4) == 0;
        if (same && T > 0) {
            int nqh = cfg->n_kv_heads * 2, nq = T < 3 ? T : 3;
            size_t nout = (size_t)nq * nqh * cfg->head_dim, i;
            float *q = (float *)tu_alloc(nout * 4), *oa = (float *)tu_alloc(nout * 4), *ob = (float *)tu_alloc(nout * 4);
            kvq_attn_params ap;
            tu_rng r = {77};
            for (i = 0; i < nout; i++) q[i] = tu_normal(&r);
            ap.n_q_heads = nqh;
            ap.n_queries = nq;
            ap.scale = 0.0f;
            kvq_attention(a, q, oa, &ap);
            kvq_attention(b, q, ob, &ap);
            same = memcmp(oa, ob, nout * 4) == 0;
            free(q); free(oa); free(ob);
        }
    }
    free(ka); free(kb); free(va); free(vb);
    return same;
}

static int same_config(const kvq_config *a, const kvq_config *b) {
    return a->head_dim == b->head_dim && a->n_kv_heads == b->n_kv_heads && a->max_tokens == b->max_tokens &&
           a->key_bits == b->key_bits && a->value_bits == b->value_bits && a->group_size == b->group_size &&
           a->residual_tokens == b->residual_tokens && a->sink_tokens == b->sink_tokens &&
           a->rotation == b->rotation && a->seed == b->seed && a->salient_ratio == b->salient_ratio &&
           a->salient_bits == b->salient_bits && a->salient_policy == b->salient_policy &&
           a->key_axis == b->key_axis;
}

static void test_round_trips(void) {
    static const int bits[][2] = {{2, 2}, {3, 4}, {8, 2}, {16, 16}, {4, 16}, {16, 3}};
    static const int tokens[] = {0, 1, 5, 37, 200, 333};
    int i;
    for (i = 0; i < 6; i++) {
        kvq_config cfg = kvq_default_config(i == 2 ? 40 : 16 * (i + 1), 1 + i % 3, 400);
        built b;
        kvq_config got;
        uint8_t *mem, *img2;
        kvq_cache *c = NULL;
        size_t need, w = 0;
        cfg.key_bits = bits[i][0];
        cfg.value_bits = bits[i][1];
        cfg.sink_tokens = i % 2 ? 3 : 0;
        cfg.group_size = i % 3 ? 32 : 16;
        cfg.residual_tokens = i % 2 ? 0 : 2 * cfg.group_size;
        cfg.key_axis = i % 3 == 1 ? KVQ_KEYS_PER_TOKEN : KVQ_KEYS_PER_CHANNEL;
        b = build_cache(&cfg, tokens[i], (unsigned)i);
        memset(&got, 0, sizeof got);
        CHECK(kvq_serialized_config(b.img, b.n, &got) == KVQ_OK && same_config(&got, &cfg), "config");
        need = kvq_cache_bytes(&got);
        mem = (uint8_t *)tu_alloc(need);
        CHECK(kvq_cache_deserialize(&c, b.img, b.n, mem, need - 1) == KVQ_ERR_NOMEM, "memory one byte short");
        CHECK(kvq_cache_deserialize(&c, b.img, b.n, mem, need) == KVQ_OK, "deserialize %d", i);
        if (c) {
            CHECK(same_cache(b.c, c), "round trip %d differs", i);
            img2 = (uint8_t *)tu_alloc(b.n);
            CHECK(kvq_cache_serialize(c, img2, b.n, &w) == KVQ_OK && w == b.n && memcmp(img2, b.img, b.n) == 0,
                  "re-serialized image differs");
            free(img2);
            /* a loaded cache goes on like the original */
            if (kvq_cache_tokens(c) < 390) {
                float k[3 * 96 * 3], v[3 * 96 * 3];
                size_t j;
                for (j = 0; j < sizeof k / 4; j++) { k[j] = (float)(j % 13) - 6.0f; v[j] = (float)(j % 7) * 0.5f; }
                kvq_cache_append(c, k, v, 3);
                kvq_cache_append(b.c, k, v, 3);
                CHECK(same_cache(b.c, c), "appending after a load differs");
            }
        }
        kvq_cache_destroy(b.c);
        free(b.img);
        free(mem);
    }
}

/* Rewrites the header checksum so a test can reach the checks behind it. */
static void reseal(uint8_t *img) { kvq__put_u32(img + KVQ__H_CRC, kvq__crc32c(0, img, KVQ__H_CRC)); }

static void test_corruption(void) {
    kvq_config cfg = kvq_default_config(32, 2, 300);
    built b;
    size_t need, i, bad = 0, changed = 0;
    uint8_t *mem, *img;
    kvq_cache *c = NULL;
    cfg.sink_tokens = 2;
    cfg.residual_tokens = 32;
    b = build_cache(&cfg, 150, 9);
    need = kvq_cache_bytes(&cfg);
    mem = (uint8_t *)tu_alloc(need);
    img = (uint8_t *)tu_alloc(b.n);
    memset(mem, 0xa5, need);

#define REFUSED(expect, what)                                                                     \
    do {                                                                                          \
        c = NULL;                                                                                 \
        CHECK(kvq_cache_deserialize(&c, img, b.n, mem, need) == (expect) && c == NULL, what);     \
    } while (0)

    /* every truncation */
    for (i = 0; i < b.n; i++) {
        c = NULL;
        if (kvq_cache_deserialize(&c, b.img, i, mem, need) != KVQ_ERR_CORRUPT || c) bad++;
    }
    CHECK(bad == 0, "%zu truncations not refused", bad);
    /* every single flipped byte of the header, and a sample of the payload */
    bad = 0;
    for (i = 0; i < b.n; i += i < KVQ__HEADER_BYTES ? 1 : 37) {
        kvq_status st;
        memcpy(img, b.img, b.n);
        img[i] ^= 0x10;
        c = NULL;
        st = kvq_cache_deserialize(&c, img, b.n, mem, need);
        if (st == KVQ_OK || c) bad++;
    }
    CHECK(bad == 0, "%zu flipped bytes not refused", bad);

    memcpy(img, b.img, b.n);
    img[0] = 'X';
    REFUSED(KVQ_ERR_CORRUPT, "wrong magic");
    memcpy(img, b.img, b.n);
    kvq__put_u32(img + 8, 2);
    reseal(img);
    REFUSED(KVQ_ERR_UNSUPPORTED, "future version");
    memcpy(img, b.img, b.n);
    kvq__put_u32(img + 8, 0);
    reseal(img);
    REFUSED(KVQ_ERR_CORRUPT, "version 0");
    memcpy(img, b.img, b.n);
    kvq__put_u32(img + KVQ__H_CONFIG, 12); /* head_dim 12 */
    reseal(img);
    REFUSED(KVQ_ERR_CORRUPT, "impossible config");
    memcpy(img, b.img, b.n);
    kvq__put_u32(img + KVQ__H_CONFIG + 12, 5); /* key_bits 5: valid but unsupported */
    reseal(img);
    REFUSED(KVQ_ERR_UNSUPPORTED, "unsupported bits");
    memcpy(img, b.img, b.n);
    kvq__put_u32(img + KVQ__H_TOKENS, 301); /* more tokens than capacity */
    reseal(img);
    REFUSED(KVQ_ERR_CORRUPT, "tokens beyond capacity");
    memcpy(img, b.img, b.n);
    kvq__put_u32(img + KVQ__H_TOKENS, 0x80000000u); /* negative */
    reseal(img);
    REFUSED(KVQ_ERR_CORRUPT, "negative tokens");
    memcpy(img, b.img, b.n);
    kvq__put_u32(img + KVQ__H_KBLOCKS, (uint32_t)kvq__get_u32(img + KVQ__H_KBLOCKS) + 1); /* a block count appending can't give */
    reseal(img);
    REFUSED(KVQ_ERR_CORRUPT, "inconsistent block count");
    memcpy(img, b.img, b.n);
    kvq__put_u32(img + KVQ__H_PAYLOAD, 0xffffffffu);
    kvq__put_u32(img + KVQ__H_PAYLOAD + 4, 0xffffffffu); /* payload size that overflows */
    reseal(img);
    REFUSED(KVQ_ERR_CORRUPT, "overflowing payload size");
    memcpy(img, b.img, b.n);
    kvq__put_u32(img + KVQ__H_CONFIG + 8, 0x7fffffffu); /* max_tokens 2^31-1 */
    reseal(img);
    REFUSED(KVQ_ERR_CORRUPT, "absurd capacity");
    memcpy(img, b.img, b.n);
    kvq__put_u32(img + 112, 1); /* reserved bytes must be zero */
    reseal(img);
    REFUSED(KVQ_ERR_CORRUPT, "reserved header bytes");
    memcpy(img, b.img, b.n);
    kvq__put_u32(img + KVQ__H_CONFIG + 52, 9); /* key_axis 9 */
    reseal(img);
    REFUSED(KVQ_ERR_CORRUPT, "bad key axis");
    memcpy(img, b.img, b.n);
    img[b.n - 1] ^= 1;
    REFUSED(KVQ_ERR_CORRUPT, "payload checksum");
    memcpy(img, b.img, b.n);
    CHECK(kvq_cache_deserialize(NULL, img, b.n, mem, need) == KVQ_ERR_INVALID, "NULL out");
    CHECK(kvq_cache_deserialize(&c, NULL, b.n, mem, need) == KVQ_ERR_INVALID, "NULL bytes");
    CHECK(kvq_cache_deserialize(&c, img, b.n, NULL, need) == KVQ_ERR_INVALID, "NULL memory");
    CHECK(kvq_serialized_config(img, 10, &cfg) == KVQ_ERR_CORRUPT, "config of a truncated header");
    CHECK(kvq_cache_serialize(NULL, img, b.n, NULL) == KVQ_ERR_INVALID, "serialize NULL");
    for (i = 0; i < need; i++) changed += mem[i] != 0xa5;
    CHECK(changed == 0, "a refused image wrote %zu bytes of the caller's memory", changed);
    /* trailing bytes after a valid image are allowed (an image inside a larger file) */
    CHECK(kvq_cache_deserialize(&c, b.img, b.n, mem, need) == KVQ_OK, "valid image");
    kvq_cache_destroy(b.c);
    free(b.img);
    free(img);
    free(mem);
}

/* Cross-platform: one machine writes an image and what it reads back; another checks. */
static kvq_config xplat_config(void) {
    kvq_config cfg = kvq_default_config(64, 2, 1024);
    cfg.key_bits = 2;
    cfg.value_bits = 3;
    cfg.sink_tokens = 4;
    return cfg;
}

static int xplat(const char *dir, int write) {
    kvq_config cfg = xplat_config();
    built b = build_cache(&cfg, 700, 42);
    char path[1024];
    size_t n = (size_t)700 * 2 * 64, got;
    float *kv = (float *)tu_alloc(n * 8), *kv2 = (float *)tu_alloc(n * 8);
    FILE *f;
    kvq_cache_read(b.c, 0, 700, kv, kv + n);
    snprintf(path, sizeof path, "%s/xplat.kvqc", dir);
    if (write) {
        f = fopen(path, "wb");
        CHECK(f && fwrite(b.img, 1, b.n, f) == b.n, "write %s", path);
        if (f) fclose(f);
        snprintf(path, sizeof path, "%s/xplat.f32", dir);
        f = fopen(path, "wb");
        CHECK(f && fwrite(kv, 8, n, f) == n, "write %s", path);
        if (f) fclose(f);
    } else {
        uint8_t *img = (uint8_t *)tu_alloc(b.n + 1), *mem = (uint8_t *)tu_alloc(kvq_cache_bytes(&cfg));
        kvq_cache *c = NULL;
        f = fopen(path, "rb");
        if (!f) {
            printf("skipped: no image from another machine in %s\n", dir);
        } else {
            got = fread(img, 1, b.n + 1, f);
            fclose(f);
            CHECK(got == b.n && memcmp(img, b.img, b.n) == 0, "the other machine's image differs from this one's");
            CHECK(kvq_cache_deserialize(&c, img, got, mem, kvq_cache_bytes(&cfg)) == KVQ_OK, "load");
            snprintf(path, sizeof path, "%s/xplat.f32", dir);
            f = fopen(path, "rb");
            CHECK(f && fread(kv2, 8, n, f) == n, "read %s", path);
            if (f) fclose(f);
            if (c) {
                kvq_cache_read(c, 0, 700, kv, kv + n);
                CHECK(memcmp(kv, kv2, n * 8) == 0, "the loaded cache reads differently than on the machine that saved it");
                CHECK(same_cache(b.c, c), "loaded cache attends differently from one built here");
            }
        }
        free(img);
        free(mem);
    }
    kvq_cache_destroy(b.c);
    free(b.img);
    free(kv);
    free(kv2);
    return 0;
}

/* Size arithmetic never wraps: helpers flag overflow, and the largest config either
   fits (64-bit size_t) or gives 0 (32-bit). */
static void test_sizes(void) {
    int ok = 1;
    kvq_config big = kvq_default_config(512, 4096, 1 << 30);
    size_t n;
    kvq__mul((size_t)-1 / 2, 3, &ok);
    CHECK(!ok, "multiplication overflow not flagged");
    ok = 1;
    kvq__add((size_t)-1 - 5, 6, &ok);
    CHECK(!ok, "addition overflow not flagged");
    ok = 1;
    kvq__align_up((size_t)-1 - 3, &ok);
    CHECK(!ok, "alignment overflow not flagged");
    big.key_bits = big.value_bits = 16;
    n = kvq_cache_bytes(&big);
    if (sizeof(size_t) >= 8)
        CHECK(n >= (size_t)4096 * ((size_t)1 << 30) * 512 * 4, "largest config: %zu bytes", n);
    else
        CHECK(n == 0, "largest config must not fit a 32-bit size_t");
    big.max_tokens = (1 << 30) + 1;
    CHECK(kvq_cache_bytes(&big) == 0, "capacity past the limit");
}

int main(int argc, char **argv) {
    if (argc == 3 && strcmp(argv[1], "--write") == 0) {
        xplat(argv[2], 1);
        return tu_finish("test_serialize --write");
    }
    test_sizes();
    test_round_trips();
    test_corruption();
    if (argc == 3 && strcmp(argv[1], "--check") == 0) xplat(argv[2], 0);
    return tu_finish("test_serialize");
}
