/* Hostile cache images, as an attacker would make them: a valid image of a cache built by
   hostile_base(), one field edited, then both CRC32C checksums sealed again, so only the
   loader's content checks can refuse it. Include after kvq.h's implementation (this file
   reads its payload layout) and test_util.h.

     kvq_cache *base = hostile_base(variant);          variant < HOSTILE_VARIANTS
     n = kvq_cache_serialized_bytes(base); serialize it into img;
     for (i = 0; i < HOSTILE_CASES; i++)
         if ((name = hostile_make(i, img, n, bad)))    NULL: the case does not apply
             loading bad must give KVQ_ERR_CORRUPT and write nothing

   The variants cover: salient tokens at 8 bits over 2-bit keys (side-store params, salience
   scores), salient tokens at 16 bits over fp16 keys (the path where unsorted side-store
   entries once wrote out of bounds), keys per token at 4 bits with fp16 values, and 3-bit keys in
   blocks of 32 over 2-bit values in groups of 16 with 16-bit params. */
#ifndef KVQ_TEST_HOSTILE_H
#define KVQ_TEST_HOSTILE_H

enum { HOSTILE_VARIANTS = 4, HOSTILE_TOKENS = 120 };

TU_FN kvq_config hostile_config(int variant) {
    kvq_config cfg = kvq_default_config(32, 2, 200);
    cfg.group_size = 16;
    cfg.residual_tokens = 16;
    cfg.sink_tokens = 2;
    cfg.key_block = 0;         /* blocks of G */
    cfg.value_param_bits = 32; /* fp16 value params but in variant 3 */
    if (variant == 0 || variant == 1) {
        cfg.salient_ratio = 0.2f; /* 3 of 16 */
        cfg.salient_bits = variant == 0 ? 8 : 16;
        cfg.key_bits = variant == 0 ? 2 : 16;
        cfg.value_bits = variant == 0 ? 2 : 4;
    } else if (variant == 2) {
        cfg.key_axis = KVQ_KEYS_PER_TOKEN;
        cfg.key_bits = 4;
        cfg.value_bits = 16;
    } else {
        cfg.key_bits = 3;
        cfg.key_block = 32;
        cfg.residual_tokens = 32;
        cfg.value_param_bits = 16;
    }
    return cfg;
}

/* HOSTILE_TOKENS tokens of structured data, an attention call after each (salience recorded). */
TU_FN kvq_cache *hostile_base(int variant) {
    kvq_config cfg = hostile_config(variant);
    const int H = cfg.n_kv_heads, D = cfg.head_dim;
    float *k = (float *)tu_alloc(sizeof(float) * HOSTILE_TOKENS * H * D);
    float *v = (float *)tu_alloc(sizeof(float) * HOSTILE_TOKENS * H * D);
    float *q = (float *)tu_alloc(sizeof(float) * 2 * H * D), *o = (float *)tu_alloc(sizeof(float) * 2 * H * D);
    kvq_attn_params ap;
    kvq_cache *c = NULL;
    tu_rng r = {0x5eedu + (uint64_t)variant};
    int t;
    ap.n_q_heads = 2 * H;
    ap.n_queries = 1;
    ap.scale = 0.0f;
    tu_fill_kv(&r, TU_STRUCTURED, HOSTILE_TOKENS, H, D, k, v);
    tu_fill_q(&r, TU_STRUCTURED, (size_t)2 * H * D, D, q);
    if (kvq_cache_create(&c, &cfg) != KVQ_OK) { fprintf(stderr, "hostile_base: create\n"); exit(2); }
    for (t = 0; t < HOSTILE_TOKENS; t++) {
        kvq_cache_append(c, k + (size_t)t * H * D, v + (size_t)t * H * D, 1);
        kvq_attention(c, q, o, &ap);
    }
    free(k); free(v); free(q); free(o);
    return c;
}

/* Both checksums of an image, sealed again after an edit. */
TU_FN void hostile_reseal(uint8_t *img) {
    uint64_t payload = kvq__get_u64(img + KVQ__H_PAYLOAD);
    kvq__put_u32(img + KVQ__H_PAYLOAD_CRC, kvq__crc32c(0, img + KVQ__HEADER_BYTES, (size_t)payload));
    kvq__put_u32(img + KVQ__H_CRC, kvq__crc32c(0, img, KVQ__H_CRC));
}

/* Byte offset in the image of record i of a kind (KVQ__R_*) of head h, or 0 if there is none. */
TU_FN size_t hostile_record(const uint8_t *img, int kind, int h, int i) {
    kvq_config cfg;
    kvq_cache probe;
    kvq__part pt[3];
    size_t at = KVQ__HEADER_BYTES, size;
    int tokens, hh, kk, first, end, np, j;
    cfg = kvq__get_config(img + KVQ__H_CONFIG);
    tokens = kvq__i32(img + KVQ__H_TOKENS);
    kvq__probe(&probe, &cfg, tokens);
    for (hh = 0; hh < cfg.n_kv_heads; hh++)
        for (kk = 0; kk < KVQ__R_KINDS; kk++) {
            kvq__record_range(&probe, kk, &first, &end);
            if (first >= end) continue;
            np = kvq__record_parts(&probe, kk, hh, first, 0, pt);
            for (j = 0, size = 0; j < np; j++) size += pt[j].n * (size_t)pt[j].width;
            if (hh == h && kk == kind) return i < end - first ? at + (size_t)i * size : 0;
            at += size * (size_t)(end - first);
        }
    return 0;
}

TU_FN void hostile_u16(uint8_t *p, unsigned v) { p[0] = (uint8_t)v; p[1] = (uint8_t)(v >> 8); }

enum { HOSTILE_CASES = 22 };

/* Copies img (n bytes) into out with case i applied and sealed; returns the case's name, or
   NULL where the image has no such field. */
TU_FN const char *hostile_make(int i, const uint8_t *img, size_t n, uint8_t *out) {
    kvq_config cfg;
    int tokens, D, ng, L;
    size_t at;
    const char *name = NULL;
    memcpy(out, img, n);
    if (kvq_serialized_info(img, n, &cfg, &tokens) != KVQ_OK) return NULL;
    D = cfg.head_dim;
    ng = (D + cfg.group_size - 1) / cfg.group_size;
    L = (1 << (cfg.key_bits < 16 ? cfg.key_bits : 1)) - 1;
#define HOSTILE_AT(kind, h, rec, name_)                          \
    if (!(at = hostile_record(out, kind, h, rec))) return NULL; \
    name = name_
    switch (i) {
    case 0: HOSTILE_AT(KVQ__R_SINK_K, 0, 1, "NaN in a sink key"); hostile_u16(out + at + 6, 0x7e00); break;
    case 1: HOSTILE_AT(KVQ__R_SINK_V, 1, 0, "+inf in a sink value"); hostile_u16(out + at, 0x7c00); break;
    case 2: HOSTILE_AT(KVQ__R_RING_K, 1, 3, "-inf in a waiting key"); hostile_u16(out + at + 2 * (D - 1), 0xfc00); break;
    case 3: HOSTILE_AT(KVQ__R_RING_V, 0, 0, "NaN in a waiting value"); hostile_u16(out + at + 8, 0xfe01); break;
    case 4:
        if (cfg.key_bits != 16) return NULL;
        HOSTILE_AT(KVQ__R_KEY_BLOCK, 0, 1, "NaN in an fp16 key block"); hostile_u16(out + at + 2 * 37, 0x7c01);
        break;
    case 5:
        if (cfg.key_bits == 16) return NULL;
        HOSTILE_AT(KVQ__R_KEY_BLOCK, 1, 0, "NaN key-block scale"); hostile_u16(out + at + 2 * 5, 0x7e00);
        break;
    case 6:
        if (cfg.key_bits == 16) return NULL;
        HOSTILE_AT(KVQ__R_KEY_BLOCK, 0, 2, "negative key-block scale"); hostile_u16(out + at, 0xbc00);
        break;
    case 7: /* one fp16 step above the widest range: (65504 + 65504) / L */
        if (cfg.key_bits == 16) return NULL;
        HOSTILE_AT(KVQ__R_KEY_BLOCK, 0, 0, "key-block scale above any range");
        hostile_u16(out + at + 2 * 3, kvq__f32_to_f16(131008.0f / (float)L) + 1u);
        break;
    case 8:
        if (cfg.key_bits == 16) return NULL;
        HOSTILE_AT(KVQ__R_KEY_BLOCK, 1, 1, "-inf key-block min"); hostile_u16(out + at + 2 * (D + 4), 0xfc00);
        break;
    case 9: /* each finite and in range alone, but min + scale * L far past 65504 */
        if (cfg.key_bits == 16) return NULL;
        HOSTILE_AT(KVQ__R_KEY_BLOCK, 0, 1, "key-block min + range past fp16");
        hostile_u16(out + at + 2 * 7, kvq__f32_to_f16(131008.0f / (float)L));
        hostile_u16(out + at + 2 * (D + 7), 0x7bff);
        break;
    case 10:
        if (cfg.value_bits == 16) { HOSTILE_AT(KVQ__R_VALUE, 1, 2, "inf in an fp16 value"); hostile_u16(out + at + 10, 0x7c00); }
        else if (cfg.value_param_bits == 16) { HOSTILE_AT(KVQ__R_VALUE, 1, 2, "inf 8-bit value scale"); out[at] = 0xf8; }
        else { HOSTILE_AT(KVQ__R_VALUE, 1, 2, "NaN value scale"); hostile_u16(out + at, 0x7e00); }
        break;
    case 11:
        if (cfg.value_bits == 16) return NULL;
        if (cfg.value_param_bits == 16) { /* the largest finite scale and min: 127/16 * 61440 > 2 * 65504 */
            HOSTILE_AT(KVQ__R_VALUE, 0, 5, "8-bit value min past 2 x fp16");
            out[at + 2] = 0xf7;
            out[at + 3] = 0x7f;
            break;
        }
        HOSTILE_AT(KVQ__R_VALUE, 0, 5, "inf value min"); hostile_u16(out + at + 2 * ng, 0x7c00);
        break;
    case 12:
        if (cfg.key_axis != KVQ_KEYS_PER_TOKEN) return NULL;
        HOSTILE_AT(KVQ__R_KEY_TOKEN, 0, 1, "negative per-token key scale"); hostile_u16(out + at, 0x8001);
        break;
    case 13:
        if (cfg.key_axis != KVQ_KEYS_PER_TOKEN) return NULL;
        HOSTILE_AT(KVQ__R_KEY_TOKEN, 1, 0, "NaN per-token key min"); hostile_u16(out + at + 2 * ng, 0xfe00);
        break;
    case 14:
        HOSTILE_AT(KVQ__R_SIDE, 0, 1, "side-store index past the block");
        hostile_u16(out + at, (unsigned)(cfg.key_block ? cfg.key_block : cfg.group_size));
        break;
    case 15: { /* entries 0 and 1 of block 1 swapped: unsorted */
        size_t e0 = hostile_record(out, KVQ__R_SIDE, 1, 3), e1 = hostile_record(out, KVQ__R_SIDE, 1, 4);
        uint8_t a0, a1;
        if (!e0 || !e1) return NULL;
        name = "side-store entries unsorted";
        a0 = out[e0]; a1 = out[e0 + 1];
        out[e0] = out[e1]; out[e0 + 1] = out[e1 + 1];
        out[e1] = a0; out[e1 + 1] = a1;
        break;
    }
    case 16: { /* entry 2 of block 0 repeats entry 1's token */
        size_t e1 = hostile_record(out, KVQ__R_SIDE, 0, 1);
        HOSTILE_AT(KVQ__R_SIDE, 0, 2, "side-store entries duplicated");
        if (!e1) return NULL;
        out[at] = out[e1];
        out[at + 1] = out[e1 + 1];
        break;
    }
    case 17:
        HOSTILE_AT(KVQ__R_SIDE, 1, 2, "NaN in a side-store key");
        hostile_u16(out + at + 2, 0x7e00); /* the first scale (8 bits) or element (16 bits) of K */
        break;
    case 18: HOSTILE_AT(KVQ__R_SALIENCE, 0, 0, "NaN salience score"); kvq__put_u32(out + at, 0x7fc00000u); break;
    case 19: HOSTILE_AT(KVQ__R_SALIENCE, 1, 1, "negative salience score"); kvq__put_u32(out + at, 0xbf000000u); break;
    case 20: HOSTILE_AT(KVQ__R_SALIENCE, 0, 2, "salience without a query"); kvq__put_u32(out + at + 4, 0); break;
    case 21: HOSTILE_AT(KVQ__R_SALIENCE, 1, 0, "infinite salience score"); kvq__put_u32(out + at, 0x7f800000u); break;
    default: return NULL;
    }
#undef HOSTILE_AT
    hostile_reseal(out);
    return name;
}

#endif
