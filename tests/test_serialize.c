/* Serialization: exact round trips, and every kind of bad image refused without
   writing anything. `--write DIR` saves an image and what it reads back, and
   `--check DIR` loads them (the NEON run checks an x86 image this way). */
#define KVQ_IMPLEMENTATION
#include "../kvq.h"
#include "test_util.h"
#include "hostile.h"

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
    b.img = NULL;
    b.n = 0;
    CHECK(kvq_cache_create(&b.c, cfg) == KVQ_OK, "create");
    if (!b.c) exit(1); /* the rest would read garbage */
    for (i = 0; i < (size_t)tokens; i++) kvq_cache_append(b.c, k + i * row, v + i * row, 1);
    b.n = kvq_cache_serialized_bytes(b.c);
    b.img = (uint8_t *)tu_alloc(b.n);
    {
        size_t w = 0;
        CHECK(kvq_cache_serialize(b.c, b.img, b.n - 1, &w) == KVQ_ERR_BUFFER && w == 0, "short buffer");
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
           a->key_axis == b->key_axis && a->range_search == b->range_search;
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
        cfg.key_block = i % 2 ? cfg.key_block : 0; /* the default's 64-token blocks where no window is kept */
        cfg.key_axis = i % 3 == 1 ? KVQ_KEYS_PER_TOKEN : KVQ_KEYS_PER_CHANNEL;
        cfg.range_search = i % 2 ? 4 : 0;
        b = build_cache(&cfg, tokens[i], (unsigned)i);
        memset(&got, 0, sizeof got);
        CHECK(kvq_serialized_config(b.img, b.n, &got) == KVQ_OK && same_config(&got, &cfg), "config");
        need = kvq_cache_bytes(&got);
        mem = (uint8_t *)tu_alloc(need);
        CHECK(kvq_cache_deserialize(&c, b.img, b.n, mem, need - 1) == KVQ_ERR_BUFFER, "memory one byte short");
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
    cfg.residual_tokens = 64;
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
    kvq__put_u32(img + 8, 3);
    reseal(img);
    REFUSED(KVQ_ERR_UNSUPPORTED, "future version");
    memcpy(img, b.img, b.n);
    kvq__put_u32(img + 8, 1); /* kvq 0.2's images: refused, not misread */
    reseal(img);
    REFUSED(KVQ_ERR_UNSUPPORTED, "version 1");
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
    kvq__put_u32(img + 144, 1); /* reserved bytes must be zero */
    reseal(img);
    REFUSED(KVQ_ERR_CORRUPT, "reserved header bytes");
    memcpy(img, b.img, b.n);
    kvq__put_u32(img + KVQ__H_CONFIG + KVQ__H_CONFIG_USED, 1); /* an unused config slot */
    reseal(img);
    REFUSED(KVQ_ERR_CORRUPT, "reserved config slot");
    CHECK(KVQ__H_CONFIG_USED == 68 + 4 && kvq__get_u32(b.img + KVQ__H_CONFIG + 68) == (uint32_t)cfg.rollback_tokens,
          "rollback_tokens is the last config slot used");
    memcpy(img, b.img, b.n);
    kvq__put_u32(img + KVQ__H_CONFIG + 68, 0xffffffffu); /* rollback_tokens -1 */
    reseal(img);
    REFUSED(KVQ_ERR_CORRUPT, "negative rollback");
    memcpy(img, b.img, b.n);
    kvq__put_u32(img + KVQ__H_CONFIG + 68, 0); /* no history: smaller rings, the same payload */
    reseal(img);
    {
        uint8_t *other = (uint8_t *)tu_alloc(need);
        kvq_cache *o = NULL;
        CHECK(kvq_cache_deserialize(&o, img, b.n, other, need) == KVQ_OK && o && o->cfg.rollback_tokens == 0 &&
                  kvq_cache_tokens(o) == 150, "another rollback_tokens: the same payload loads");
        free(other);
    }
    memcpy(img, b.img, b.n);
    kvq__put_u32(img + KVQ__H_CONFIG + 60, 48); /* key_block 48 */
    reseal(img);
    REFUSED(KVQ_ERR_UNSUPPORTED, "key block of 48");
    memcpy(img, b.img, b.n);
    kvq__put_u32(img + KVQ__H_CONFIG + 64, 8); /* value_param_bits 8 */
    reseal(img);
    REFUSED(KVQ_ERR_CORRUPT, "value params of 8 bits");
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

/* Hostile images (tests/hostile.h): each edit, sealed with valid checksums, is refused with
   KVQ_ERR_CORRUPT on every ISA path, by both loaders, and writes nothing. The unedited
   image, sealed the same way, loads: the refusals come from the content checks. */
static void test_hostile(void) {
    int variant, i, isa, applied[HOSTILE_CASES], missing = 0;
    memset(applied, 0, sizeof applied);
    for (variant = 0; variant < HOSTILE_VARIANTS; variant++) {
        kvq_cache *base = hostile_base(variant), *c = NULL;
        kvq_config cfg = *kvq_cache_config(base);
        size_t n = kvq_cache_serialized_bytes(base), need = kvq_cache_bytes(&cfg), j, changed;
        uint8_t *img = (uint8_t *)tu_alloc(n), *bad = (uint8_t *)tu_alloc(n), *mem = (uint8_t *)tu_alloc(need);
        CHECK(kvq_cache_serialize(base, img, n, NULL) == KVQ_OK, "serialize");
        hostile_reseal(img);
        CHECK(kvq_cache_deserialize(&c, img, n, mem, need) == KVQ_OK, "variant %d: the resealed base image", variant);
        for (i = 0; i < HOSTILE_CASES; i++) {
            const char *name = hostile_make(i, img, n, bad);
            if (!name) continue;
            applied[i]++;
            CHECK(memcmp(bad, img, n) != 0, "case %s changed nothing", name);
            for (isa = 0; isa <= KVQ_ISA_NEON; isa++) {
                kvq_status a, b;
                if (kvq_set_isa((kvq_isa)isa) != KVQ_OK) continue;
                memset(mem, 0xa5, need);
                c = NULL;
                a = kvq_cache_deserialize(&c, bad, n, mem, need);
                b = kvq_cache_load(&c, bad, n, HOSTILE_TOKENS + 7, mem, need);
                for (j = 0, changed = 0; j < need; j++) changed += mem[j] != 0xa5;
                CHECK(a == KVQ_ERR_CORRUPT && b == KVQ_ERR_CORRUPT && c == NULL && changed == 0,
                      "variant %d, %s, %s: statuses %d %d, %zu bytes written", variant, name,
                      kvq_isa_name((kvq_isa)isa), (int)a, (int)b, changed);
            }
            kvq_set_isa(KVQ_ISA_SCALAR);
            while (kvq_set_isa((kvq_isa)(kvq_get_isa() + 1)) == KVQ_OK) {} /* back to the best */
        }
        kvq_cache_destroy(base);
        free(img); free(bad); free(mem);
    }
    for (i = 0; i < HOSTILE_CASES; i++) missing += applied[i] == 0;
    CHECK(missing == 0, "%d hostile cases applied to no variant", missing);
}

/* An image holding max_tokens + 1 tokens whose counts, payload size and checksums all agree:
   only the capacity check can refuse it. */
static void test_tokens_past_capacity(void) {
    kvq_config cfg = kvq_default_config(16, 2, 61), got;
    built b;
    kvq_cache *c = NULL;
    uint8_t *mem;
    size_t need;
    int held;
    cfg.residual_tokens = 32;
    cfg.group_size = 16;
    cfg.key_block = 0; /* blocks of G, so 61 tokens fill some */
    b = build_cache(&cfg, 61, 3);
    kvq__put_u32(b.img + KVQ__H_CONFIG + 8, 60);
    hostile_reseal(b.img);
    cfg.max_tokens = 60;
    need = kvq_cache_bytes(&cfg) + 4096;
    mem = (uint8_t *)tu_alloc(need);
    CHECK(kvq_serialized_info(b.img, b.n, &got, &held) == KVQ_ERR_CORRUPT, "info of 61 tokens in 60");
    CHECK(kvq_cache_deserialize(&c, b.img, b.n, mem, need) == KVQ_ERR_CORRUPT && !c, "61 tokens in 60");
    CHECK(kvq_cache_load(&c, b.img, b.n, 100, mem, need) == KVQ_ERR_CORRUPT && !c, "61 tokens in 60, loaded into 100");
    kvq__put_u32(b.img + KVQ__H_CONFIG + 8, 61);
    hostile_reseal(b.img);
    CHECK(kvq_cache_deserialize(&c, b.img, b.n, mem, need) == KVQ_OK, "61 tokens in 61");
    kvq_cache_destroy(b.c);
    free(b.img);
    free(mem);
}

/* Loading into a capacity the caller chooses: learn the tokens held, size for them, go on
   appending exactly as the saved cache would. */
static void test_load_capacity(void) {
    kvq_config cfg = kvq_default_config(32, 2, 200), got;
    built b, c2;
    kvq_cache *c = NULL;
    uint8_t *mem, *tiny;
    size_t need, j, changed;
    int held;
    float k[64 * 64], v[64 * 64];
    cfg.salient_ratio = 0.1f;
    cfg.residual_tokens = 64;
    for (j = 0; j < 64 * 64; j++) { k[j] = (float)(j % 29) * 0.3f - 4.0f; v[j] = (float)(j % 11) - 5.0f; }
    b = build_cache(&cfg, 150, 4);
    CHECK(kvq_serialized_info(b.img, b.n, &got, &held) == KVQ_OK && held == 150 && got.max_tokens == 200, "info");
    got.max_tokens = 500;
    need = kvq_cache_bytes(&got);
    mem = (uint8_t *)tu_alloc(need);
    CHECK(kvq_cache_load(&c, b.img, b.n, 500, mem, need - 1) == KVQ_ERR_BUFFER, "memory one byte short");
    CHECK(kvq_cache_load(&c, b.img, b.n, 500, mem, need) == KVQ_OK && kvq_cache_config(c)->max_tokens == 500, "grow");
    if (c) {
        CHECK(same_cache(b.c, c), "the grown cache reads and attends differently");
        CHECK(kvq_cache_append(c, k, v, 40) == KVQ_OK && kvq_cache_append(b.c, k, v, 40) == KVQ_OK, "append 40");
        CHECK(same_cache(b.c, c), "the grown cache goes on differently");
        CHECK(kvq_cache_append(c, k, v, 60) == KVQ_OK, "the grown cache takes more than the old capacity");
    }
    /* exactly the tokens held: full at once */
    got.max_tokens = 150;
    CHECK(kvq_cache_load(&c, b.img, b.n, 150, mem, kvq_cache_bytes(&got)) == KVQ_OK && c, "capacity = tokens held");
    if (c) CHECK(kvq_cache_append(c, k, v, 1) == KVQ_ERR_FULL, "a load at exact capacity is full");
    /* too small: refused, nothing written */
    memset(mem, 0x3c, need);
    c = NULL;
    CHECK(kvq_cache_load(&c, b.img, b.n, 149, mem, need) == KVQ_ERR_FULL && !c, "capacity below the tokens held");
    CHECK(kvq_cache_load(&c, b.img, b.n, -1, mem, need) == KVQ_ERR_INVALID && !c, "negative capacity");
    for (j = 0, changed = 0; j < need; j++) changed += mem[j] != 0x3c;
    CHECK(changed == 0, "a refused load wrote %zu bytes", changed);
    /* fewer slots than sink tokens: an impossible config */
    cfg = kvq_default_config(32, 2, 200);
    c2 = build_cache(&cfg, 1, 5);
    CHECK(kvq_cache_load(&c, c2.img, c2.n, 2, mem, need) == KVQ_ERR_INVALID, "capacity below the sinks");
    /* a 128-byte image claiming a capacity of terabytes loads into the few tokens it holds */
    cfg.head_dim = 512;
    kvq_cache_destroy(c2.c);
    free(c2.img);
    c2 = build_cache(&cfg, 0, 6);
    kvq__put_u32(c2.img + KVQ__H_CONFIG + 4, 64);      /* n_kv_heads */
    kvq__put_u32(c2.img + KVQ__H_CONFIG + 8, 1u << 30); /* max_tokens */
    hostile_reseal(c2.img);
    CHECK(c2.n == KVQ__HEADER_BYTES, "an empty image is its header");
    CHECK(kvq_serialized_info(c2.img, c2.n, &got, &held) == KVQ_OK && held == 0, "info of the huge claim");
    CHECK(kvq_cache_bytes(&got) > ((size_t)1 << 40) || kvq_cache_bytes(&got) == 0, "it claims over a terabyte");
    got.max_tokens = 32;
    need = kvq_cache_bytes(&got);
    tiny = (uint8_t *)tu_alloc(need);
    CHECK(need < (8u << 20), "32 tokens fit in %zu bytes", need);
    CHECK(kvq_cache_load(&c, c2.img, c2.n, 32, tiny, need) == KVQ_OK && kvq_cache_tokens(c) == 0, "load the claim small");
    kvq_cache_destroy(c2.c);
    free(c2.img);
    free(tiny);
    kvq_cache_destroy(b.c);
    free(b.img);
    free(mem);
}

/* A load whose memory overlaps its image is refused before anything is written. */
static void test_load_aliasing(void) {
    kvq_config cfg = kvq_default_config(16, 1, 100);
    built b = build_cache(&cfg, 40, 8);
    size_t need = kvq_cache_bytes(&cfg);
    uint8_t *buf = (uint8_t *)tu_alloc(need + b.n), *copy = (uint8_t *)tu_alloc(need + b.n);
    kvq_cache *c = NULL;
    memcpy(buf, b.img, b.n);
    memcpy(copy, buf, need + b.n);
    CHECK(kvq_cache_deserialize(&c, buf, b.n, buf, need + b.n) == KVQ_ERR_INVALID && !c, "mem == bytes");
    CHECK(kvq_cache_deserialize(&c, buf, b.n, buf + b.n - 1, need) == KVQ_ERR_INVALID && !c, "mem overlaps the end");
    CHECK(memcmp(buf, copy, need + b.n) == 0, "a refused aliased load wrote");
    CHECK(kvq_cache_deserialize(&c, buf, b.n, buf + b.n, need) == KVQ_OK && c, "adjacent, not overlapping");
    if (c) {
        /* serializing into the cache's own memory would corrupt it */
        CHECK(kvq_cache_serialize(c, (uint8_t *)c + 64, kvq_cache_serialized_bytes(c), NULL) == KVQ_ERR_INVALID,
              "serialize into the cache");
        CHECK(same_cache(b.c, c), "the cache after a refused serialize");
    }
    kvq_cache_destroy(b.c);
    free(b.img);
    free(buf);
    free(copy);
}

/* Cross-platform: one machine writes an image and what it reads back; another checks. */
static kvq_config xplat_config(void) {
    kvq_config cfg = kvq_default_config(64, 2, 1024);
    cfg.key_bits = 2;
    cfg.value_bits = 3;
    cfg.sink_tokens = 4;
    cfg.range_search = 4; /* the search's float sums must agree across machines too */
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
    test_hostile();
    test_tokens_past_capacity();
    test_load_capacity();
    test_load_aliasing();
    if (argc == 3 && strcmp(argv[1], "--check") == 0) xplat(argv[2], 0);
    return tu_finish("test_serialize");
}
