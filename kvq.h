/* kvq.h - a 2-bit KV cache for transformer inference, with attention computed
   straight from the packed codes.                         MIT licence at the end.

   kvq stores the keys and values of one layer of one sequence at 2, 3, 4 or 8
   bits (16 = plain fp16, the baseline, through the same code) and computes
   decode attention directly on the packed codes: no dequantized copy of the
   cache is ever built.

     keys    per channel, over blocks of G tokens         (KIVI: outlier channels
     values  per token, over groups of G channels          keep their own scale)
     newest  tokens stay in fp16 until a whole key block is full (residual window)
     first   S tokens stay in fp16 (attention sinks)

   Quick start
   -----------
       #define KVQ_IMPLEMENTATION          // in exactly one .c file
       #include "kvq.h"

       kvq_config cfg = kvq_default_config(128, 8, 4096); // head_dim, kv heads, capacity
       kvq_cache *cache;
       if (kvq_cache_create(&cache, &cfg) != KVQ_OK) return 1;
       kvq_cache_append(cache, k, v, 1);   // k, v: [n_tokens][n_kv_heads][head_dim]
       kvq_attn_params ap = { 32, 1, 0.0f }; // 32 query heads, 1 query, 1/sqrt(d)
       kvq_attention(cache, q, out, &ap);  // q, out: [n_queries][n_q_heads][head_dim]
       kvq_cache_destroy(cache);

   Configuration macros (define before including)
   ----------------------------------------------
   | macro                 | default            | meaning                                  |
   |-----------------------|--------------------|------------------------------------------|
   | KVQ_IMPLEMENTATION    | (undefined)        | emit the implementation in this file     |
   | KVQ_STATIC            | (undefined)        | make every function static (private copy)|
   | KVQ_ASSERT(x)         | assert(x)          | internal preconditions                   |
   | KVQ_MALLOC(n)/KVQ_FREE(p) | malloc / free  | used by kvq_cache_create only; both or neither |

   Memory: kvq_cache_bytes() + kvq_cache_init() place a cache in caller memory;
   kvq_cache_create() is a thin convenience over them. Kernels never allocate.
   Threads: the library creates none. kvq_attention_partial() runs a token
   and/or KV-head range and kvq_attention_merge() combines the partial states,
   so a caller can spread one attention call over its own thread pool.
   Errors: every public call validates its arguments and returns a kvq_status;
   after any error the cache is exactly as it was (appends are all or nothing).
   Floating point: built for the default rounding mode (round to nearest even);
   do not compile with -ffast-math, which may change the quantized bytes.
*/
#ifndef KVQ_H_INCLUDED
#define KVQ_H_INCLUDED

#define KVQ_VERSION_MAJOR 0
#define KVQ_VERSION_MINOR 1
#define KVQ_VERSION_PATCH 0
#define KVQ_VERSION_NUMBER \
    (KVQ_VERSION_MAJOR * 10000 + KVQ_VERSION_MINOR * 100 + KVQ_VERSION_PATCH)

#include <stddef.h>
#include <stdint.h>

#ifndef KVQ_API
#ifdef KVQ_STATIC
#if defined(__GNUC__) || defined(__clang__)
#define KVQ_API static __attribute__((unused)) /* a private copy need not use every function */
#else
#define KVQ_API static
#endif
#else
#define KVQ_API extern
#endif
#endif

#ifdef __cplusplus
extern "C" {
#endif

typedef enum kvq_status {
    KVQ_OK = 0,
    KVQ_ERR_INVALID = -1,     /* a bad argument or config: NULL, out of range, inconsistent */
    KVQ_ERR_UNSUPPORTED = -2, /* valid but not supported here (e.g. bits = 5) */
    KVQ_ERR_FULL = -3,        /* appending would pass max_tokens; nothing was appended */
    KVQ_ERR_NOMEM = -4,       /* caller's buffer too small, or allocation failed */
    KVQ_ERR_CORRUPT = -5      /* serialized bytes failed validation */
} kvq_status;

/* rotation: NONE; HADAMARD (the cache rotates K, V and queries itself); or PREROTATED
   (the caller folded kvq_hadamard() into W_q, W_k, W_v and W_o offline: K, V and queries
   arrive rotated, the output leaves rotated, and the cache does no transform). */
enum { KVQ_ROTATE_NONE = 0, KVQ_ROTATE_HADAMARD = 1, KVQ_ROTATE_PREROTATED = 2 };
/* salient_policy: which tokens of a key block stay at salient_bits. ATTENTION: the ones
   attention used most while they sat in the residual window (ZipCache's normalized
   accumulated attention; needs kvq_attention calls). ERROR: the ones whose removal
   shrinks the block's quantization ranges most (needs no queries: prefill). */
enum { KVQ_SALIENT_ATTENTION = 0, KVQ_SALIENT_ERROR = 1 };
/* key_axis: keys quantized per channel over blocks of G tokens (KIVI), or per token
   over groups of G channels (like values; QuaRot pairs it with rotation). */
enum { KVQ_KEYS_PER_CHANNEL = 0, KVQ_KEYS_PER_TOKEN = 1 };

typedef struct kvq_config {
    int head_dim;        /* channels per head; any multiple of 8 from 8 to 512 */
    int n_kv_heads;      /* KV heads stored in this cache (one layer, one sequence) */
    int max_tokens;      /* capacity */
    int key_bits;        /* 2 (default), 3, 4, 8; 16 = fp16 (the baseline) */
    int value_bits;      /* same set as key_bits */
    int group_size;      /* G: tokens per key block and channels per value group; 16, 32 (default), 64, 128 */
    int residual_tokens; /* newest tokens kept in fp16; default 128; 0 = none; multiple of G */
    int sink_tokens;     /* first tokens kept in fp16; default 0 */
    int rotation;        /* KVQ_ROTATE_NONE or KVQ_ROTATE_HADAMARD */
    unsigned seed;       /* random signs of the rotation */
    float salient_ratio; /* fraction of tokens kept at salient_bits; 0 = off */
    int salient_bits;    /* 8 or 16 */
    int salient_policy;  /* KVQ_SALIENT_ATTENTION (default) or KVQ_SALIENT_ERROR */
    int key_axis;        /* KVQ_KEYS_PER_CHANNEL (default, KIVI) or KVQ_KEYS_PER_TOKEN */
} kvq_config;

typedef struct kvq_cache kvq_cache;

typedef struct kvq_attn_params {
    int n_q_heads; /* a multiple of n_kv_heads; q head h reads kv head h / (n_q_heads/n_kv_heads) */
    int n_queries; /* query i sits at position tokens - n_queries + i and sees tokens <= it */
    float scale;   /* 0 = 1/sqrt(head_dim) */
} kvq_attn_params;

KVQ_API const char *kvq_status_string(kvq_status s);
KVQ_API int         kvq_version_number(void);

KVQ_API kvq_config kvq_default_config(int head_dim, int n_kv_heads, int max_tokens);
KVQ_API kvq_status kvq_config_check(const kvq_config *cfg); /* KVQ_OK if a cache can be built */

KVQ_API size_t     kvq_cache_bytes(const kvq_config *cfg); /* 0 if cfg is invalid or unsupported */
KVQ_API kvq_status kvq_cache_init(kvq_cache **out, const kvq_config *cfg, void *mem, size_t mem_bytes);
KVQ_API kvq_status kvq_cache_create(kvq_cache **out, const kvq_config *cfg); /* uses KVQ_MALLOC */
KVQ_API void       kvq_cache_destroy(kvq_cache *c); /* no-op for init'ed caches and NULL */
KVQ_API void       kvq_cache_reset(kvq_cache *c);   /* back to 0 tokens */
KVQ_API int        kvq_cache_tokens(const kvq_cache *c);
KVQ_API const kvq_config *kvq_cache_config(const kvq_cache *c);
/* Bytes holding the tokens now stored: codes + scales/mins + sinks + residual window. */
KVQ_API size_t     kvq_cache_payload_bytes(const kvq_cache *c);
/* Steady-state storage per K/V element of a config, residual window and sinks excluded. */
KVQ_API double     kvq_config_bits_per_element(const kvq_config *cfg);

/* k, v: [n_tokens][n_kv_heads][head_dim] floats, finite and within fp16 range (|x| <= 65504). */
KVQ_API kvq_status kvq_cache_append(kvq_cache *c, const float *k, const float *v, int n_tokens);
/* Reconstructs tokens [first, first+n) into the layout of append; k or v may be NULL. */
KVQ_API kvq_status kvq_cache_read(const kvq_cache *c, int first, int n, float *k, float *v);

/* q, out: [n_queries][n_q_heads][head_dim]. Single-threaded. */
KVQ_API kvq_status kvq_attention(kvq_cache *c, const float *q, float *out, const kvq_attn_params *p);

/* Split attention. A state holds, per query and query head, (max, sum, acc[head_dim]):
   kvq_attention_state_floats() floats. kvq_attention_partial() fills the rows of the query
   heads that read KV heads [kv_first, kv_end), over tokens [tok_first, tok_end) (each query
   still sees only tokens <= its position); rows of other heads are left untouched.
   kvq_attention_merge() combines n_states states that each hold every row (split the
   tokens across states; split the heads inside one state) and writes the normalized output.
   Calls on disjoint rows of one state may run concurrently. */
/* The rotation M = H diag(signs(seed)) / sqrt(n) that KVQ_ROTATE_HADAMARD applies, and its
   inverse M^T, in place on x[0..n); n a multiple of 8 from 8 to 512. */
KVQ_API kvq_status kvq_hadamard(float *x, int n, unsigned seed);
KVQ_API kvq_status kvq_hadamard_inverse(float *x, int n, unsigned seed);

KVQ_API size_t     kvq_attention_state_floats(const kvq_cache *c, const kvq_attn_params *p);
KVQ_API kvq_status kvq_attention_partial(kvq_cache *c, const float *q, const kvq_attn_params *p,
                                         int tok_first, int tok_end, int kv_first, int kv_end,
                                         float *state);
KVQ_API kvq_status kvq_attention_merge(const kvq_cache *c, const kvq_attn_params *p,
                                       const float *const *states, int n_states, float *out);

/* Serialization (prompt caching): a versioned little-endian image of the config, the
   token count and the payload, with CRC32C checksums. A cache saved on one machine
   loads on any other (x86, aarch64) and attends byte-identically.
   kvq_serialized_config() reads and checks only the header, so the caller can size
   memory with kvq_cache_bytes() before kvq_cache_deserialize() builds the cache there.
   Bad bytes give KVQ_ERR_CORRUPT (or KVQ_ERR_UNSUPPORTED for a newer version) and
   write nothing. */
KVQ_API size_t     kvq_cache_serialized_bytes(const kvq_cache *c);
KVQ_API kvq_status kvq_cache_serialize(const kvq_cache *c, void *buf, size_t buf_bytes, size_t *written);
KVQ_API kvq_status kvq_serialized_config(const void *bytes, size_t n_bytes, kvq_config *cfg);
KVQ_API kvq_status kvq_cache_deserialize(kvq_cache **out, const void *bytes, size_t n_bytes, void *mem,
                                         size_t mem_bytes);

#ifdef __cplusplus
}
#endif
#endif /* KVQ_H_INCLUDED */

/* ========================================================================== */
#if defined(KVQ_IMPLEMENTATION) && !defined(KVQ_IMPLEMENTATION_DONE)
#define KVQ_IMPLEMENTATION_DONE

#include <float.h>
#include <limits.h>
#include <math.h>
#include <string.h>

#ifndef KVQ_ASSERT
#include <assert.h>
#define KVQ_ASSERT(x) assert(x)
#endif

#if defined(KVQ_MALLOC) != defined(KVQ_FREE)
#error "define both KVQ_MALLOC and KVQ_FREE, or neither"
#endif
#ifndef KVQ_MALLOC
#include <stdlib.h>
#define KVQ_MALLOC(n) malloc(n)
#define KVQ_FREE(p) free(p)
#endif

#ifdef __cplusplus
extern "C" {
#endif

#define KVQ__FP16_MAX 65504.0f
#define KVQ__MAX_TOKENS (1 << 30)
#define KVQ__MAX_HEADS 4096
#define KVQ__ALIGN 64

/* ---------------------------------------------------------------------------
   Formats. IEEE fp16 conversions (round to nearest even, as F16C and CUDA do),
   the bit packing of codes (little-endian, lowest bits first, a code may
   straddle two bytes at 3 bits) and the byte size of every record.
   --------------------------------------------------------------------------- */

static uint16_t kvq__f32_to_f16(float f) {
    uint32_t x, ax, sign;
    memcpy(&x, &f, 4);
    sign = (x >> 16) & 0x8000u;
    ax = x & 0x7fffffffu;
    if (ax > 0x7f800000u) return (uint16_t)(sign | 0x7e00u);        /* NaN */
    if (ax >= 0x477ff000u) return (uint16_t)(sign | 0x7c00u);       /* >= 65520: inf */
    if (ax < 0x38800000u) {
        /* below 2^-14: a subnormal half counts units of 2^-24. Adding 0.5 (whose
           ulp is 2^-24) rounds to that unit, to nearest even, in one fp add. */
        float a, r;
        uint32_t rb;
        memcpy(&a, &ax, 4);
        r = a + 0.5f;
        memcpy(&rb, &r, 4);
        return (uint16_t)(sign | (rb - 0x3f000000u));
    }
    /* normal: rebias the exponent (127 -> 15) and round 23 -> 10 mantissa bits */
    ax += 0xc8000fffu + ((ax >> 13) & 1u);
    return (uint16_t)(sign | (ax >> 13));
}

static float kvq__f16_to_f32(uint16_t h) {
    uint32_t sign = (uint32_t)(h & 0x8000u) << 16;
    uint32_t e = (h >> 10) & 0x1fu, m = h & 0x3ffu, x;
    float f;
    if (e == 0) {
        f = (float)m * (1.0f / 16777216.0f); /* m * 2^-24, exact */
        memcpy(&x, &f, 4);
        x |= sign;
    } else if (e == 31) {
        x = sign | 0x7f800000u | (m << 13);
    } else {
        x = sign | ((e + 112u) << 23) | (m << 13);
    }
    memcpy(&f, &x, 4);
    return f;
}

/* Code i of a packed row occupies bits [i*bits, (i+1)*bits). */
static unsigned kvq__get_code(const uint8_t *row, int i, int bits) {
    unsigned bit = (unsigned)i * (unsigned)bits, off = bit & 7u;
    unsigned v = row[bit >> 3];
    if (off + (unsigned)bits > 8u) v |= (unsigned)row[(bit >> 3) + 1] << 8;
    return (v >> off) & ((1u << bits) - 1u);
}

static void kvq__put_code(uint8_t *row, int i, int bits, unsigned code) {
    unsigned bit = (unsigned)i * (unsigned)bits, off = bit & 7u;
    row[bit >> 3] = (uint8_t)(row[bit >> 3] | (code << off));
    if (off + (unsigned)bits > 8u) row[(bit >> 3) + 1] = (uint8_t)(row[(bit >> 3) + 1] | (code >> (8u - off)));
}

/* Value groups: ceil(head_dim / G); the last one is shorter when G does not divide head_dim. */
static int kvq__value_groups(const kvq_config *cfg) {
    return (cfg->head_dim + cfg->group_size - 1) / cfg->group_size;
}

/* Key block of one head: fp16 scale[D], fp16 min[D], then per channel G codes packed
   along tokens. At 16 bits: G rows of D fp16, token-major. */
static size_t kvq__key_block_bytes(const kvq_config *cfg) {
    size_t d = (size_t)cfg->head_dim, g = (size_t)cfg->group_size;
    if (cfg->key_bits == 16) return 2 * g * d;
    return 4 * d + d * (g * (size_t)cfg->key_bits / 8);
}

/* Value token of one head: fp16 scale[ngroups], fp16 min[ngroups] (the "params"),
   then D codes packed along channels. At 16 bits: no params, D fp16. */
static size_t kvq__value_param_bytes(const kvq_config *cfg) {
    return cfg->value_bits == 16 ? 0 : 4 * (size_t)kvq__value_groups(cfg);
}
static size_t kvq__value_code_bytes(const kvq_config *cfg) {
    return (size_t)cfg->head_dim * (size_t)cfg->value_bits / 8;
}

KVQ_API double kvq_config_bits_per_element(const kvq_config *cfg) {
    double kb, vb;
    if (kvq_config_check(cfg) != KVQ_OK) return 0.0;
    kb = 8.0 * (double)kvq__key_block_bytes(cfg) / ((double)cfg->group_size * cfg->head_dim);
    vb = 8.0 * (double)(kvq__value_param_bytes(cfg) + kvq__value_code_bytes(cfg)) / cfg->head_dim;
    return 0.5 * (kb + vb);
}

/* ---------------------------------------------------------------------------
   Quantize. Asymmetric uniform, b bits, group x[0..n):
     m = min x, s = (max x - m) / (2^b - 1), both stored as fp16;
     code = clamp(round_half_even((x - m16) / s16), 0, 2^b - 1), x' = m16 + s16 * code.
   Codes use the stored (rounded) m16 and s16, so x' is what the cache means.
   s16 == 0 (a zero range, or one below fp16's smallest step) stores codes 0.
   s16 * code is exact in float (11 + 8 significant bits), so x' is the same
   with or without FMA contraction, on every path.
   --------------------------------------------------------------------------- */

typedef struct kvq__qparams { uint16_t scale, min; } kvq__qparams;

static kvq__qparams kvq__fit_range(float lo, float hi, int bits) {
    kvq__qparams qp;
    qp.min = kvq__f32_to_f16(lo);
    qp.scale = kvq__f32_to_f16((hi - lo) / (float)((1 << bits) - 1));
    return qp;
}

static unsigned kvq__quantize_one(float x, float m, float s, int bits) {
    float v;
    int code;
    if (s == 0.0f) return 0;
    v = rintf((x - m) / s); /* default rounding mode: nearest, ties to even */
    code = (int)v;
    if (code < 0) code = 0;
    if (code > (1 << bits) - 1) code = (1 << bits) - 1;
    return (unsigned)code;
}

/* Quantizes n values x[i*stride] into codes i of a packed row (zeroed first by the caller). */
static kvq__qparams kvq__quantize_group(const float *x, int n, int stride, int bits, uint8_t *codes,
                                        int first_code) {
    float lo = x[0], hi = x[0], m, s;
    kvq__qparams qp;
    int i;
    for (i = 1; i < n; i++) {
        float v = x[(size_t)i * stride];
        lo = v < lo ? v : lo;
        hi = v > hi ? v : hi;
    }
    qp = kvq__fit_range(lo, hi, bits);
    m = kvq__f16_to_f32(qp.min);
    s = kvq__f16_to_f32(qp.scale);
    for (i = 0; i < n; i++)
        kvq__put_code(codes, first_code + i, bits, kvq__quantize_one(x[(size_t)i * stride], m, s, bits));
    return qp;
}

/* ---------------------------------------------------------------------------
   Rotate. A random orthogonal rotation spreads outlier channels over all the
   others before quantization (QuaRot, RotateKV):  M = T * diag(s) / sqrt(n),
   s = random signs from the seed, T = a Hadamard matrix (T T^T = n I).
   Keys and queries both rotate (q.k is unchanged); values rotate and the
   attention output rotates back (M^-1 = M^T).
   n = 2^a * m with m in {1, 12, 20, 28}: T = H_{2^a} (x) H_m, the fast
   Walsh-Hadamard transform along one axis and a small dense Paley matrix along
   the other (80 = 4*20, 96 = 8*12, 112 = 4*28, 160, 192, ...). Other multiples
   of 8 (72, 88, 104, ...) split into power-of-two blocks (72 = 64 + 8), each
   rotated on its own: block-diagonal, still orthogonal.
   --------------------------------------------------------------------------- */

typedef struct kvq__rotation {
    int n;
    int n_pieces;              /* blocks on the diagonal */
    int off[10], pow2[10], m[10];
    float sign[512];
} kvq__rotation;

/* Legendre symbol (a / q) for an odd prime q: 0, 1 or -1. */
static int kvq__legendre(int a, int q) {
    int r = 1, b = ((a % q) + q) % q, e = (q - 1) / 2;
    if (b == 0) return 0;
    while (e) {
        if (e & 1) r = r * b % q;
        b = b * b % q;
        e >>= 1;
    }
    return r == 1 ? 1 : -1;
}

/* Entry (i, j) of a Hadamard matrix of order m in {12, 20, 28}.
   12, 20: Paley I over q = 11, 19 (q = 3 mod 4): H = I + [[0, 1^T], [-1, Q]], Q_ij = (j - i / q).
   28: Paley II over q = 13 (q = 1 mod 4): C = [[0, 1^T], [1, Q]] (symmetric), and
       H = C (x) [[1, 1], [1, -1]] + I (x) [[1, -1], [-1, -1]]. */
static int kvq__paley(int m, int i, int j) {
    if (m == 28) {
        int a = i / 2, b = j / 2, x = i % 2, y = j % 2, cab;
        if (a == b) return (x == 0 && y == 0) ? 1 : -1;
        cab = (a == 0 || b == 0) ? 1 : kvq__legendre(b - a, 13);
        return (x == 1 && y == 1) ? -cab : cab;
    }
    if (i == j) return 1;
    if (i == 0) return 1;
    if (j == 0) return -1;
    return kvq__legendre(j - i, m - 1);
}

static void kvq__rotation_init(kvq__rotation *r, int n, unsigned seed) {
    static const int ms[] = {28, 20, 12};
    uint64_t s = 0x9e3779b97f4a7c15ull ^ ((uint64_t)seed << 1 | 1u);
    int i, k, rest = n, off = 0;
    memset(r, 0, sizeof *r);
    r->n = n;
    for (i = 0; i < n; i++) { /* splitmix64: a fixed, portable sign sequence per seed */
        uint64_t z = (s += 0x9e3779b97f4a7c15ull);
        z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
        z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
        r->sign[i] = ((z ^ (z >> 31)) & 1u) ? -1.0f : 1.0f;
    }
    for (k = 0; k < 3; k++) /* one Kronecker piece when n = 2^a * m */
        if (n % ms[k] == 0 && ((n / ms[k]) & (n / ms[k] - 1)) == 0) {
            r->n_pieces = 1;
            r->pow2[0] = n / ms[k];
            r->m[0] = ms[k];
            return;
        }
    while (rest) { /* power-of-two blocks, largest first */
        int p = 1;
        while (p * 2 <= rest) p *= 2;
        r->off[r->n_pieces] = off;
        r->pow2[r->n_pieces] = p;
        r->m[r->n_pieces] = 1;
        r->n_pieces++;
        off += p;
        rest -= p;
    }
}

/* In-place unnormalized Walsh-Hadamard transform of x[i * stride], i < n (a power of two). */
static void kvq__wht(float *x, int n, int stride) {
    int len, i, j;
    for (len = 1; len < n; len *= 2)
        for (i = 0; i < n; i += 2 * len)
            for (j = i; j < i + len; j++) {
                float a = x[(size_t)j * stride], b = x[(size_t)(j + len) * stride];
                x[(size_t)j * stride] = a + b;
                x[(size_t)(j + len) * stride] = a - b;
            }
}

/* x (viewed as [pow2][m]) <- H_m (or H_m^T) applied to each row of m. */
static void kvq__paley_rows(float *x, int pow2, int m, int transpose) {
    float y[28];
    int r, i, j;
    for (r = 0; r < pow2; r++) {
        float *row = x + (size_t)r * m;
        for (i = 0; i < m; i++) {
            float acc = 0.0f;
            for (j = 0; j < m; j++) acc += (float)(transpose ? kvq__paley(m, j, i) : kvq__paley(m, i, j)) * row[j];
            y[i] = acc;
        }
        memcpy(row, y, (size_t)m * sizeof(float));
    }
}

/* x <- M x (forward) or M^T x (inverse), in place. */
static void kvq__rotate(const kvq__rotation *r, float *x, int inverse) {
    int p, i;
    if (!inverse)
        for (i = 0; i < r->n; i++) x[i] *= r->sign[i];
    for (p = 0; p < r->n_pieces; p++) {
        float *xp = x + r->off[p];
        int m = r->m[p], len = r->pow2[p] * m, c;
        float norm = 1.0f / sqrtf((float)len);
        if (m > 1) kvq__paley_rows(xp, r->pow2[p], m, inverse);
        for (c = 0; c < m; c++) kvq__wht(xp + c, r->pow2[p], m); /* H_2^a along the other axis */
        for (i = 0; i < len; i++) xp[i] *= norm;
    }
    if (inverse)
        for (i = 0; i < r->n; i++) x[i] *= r->sign[i];
}

static int kvq__rotation_dim_ok(int n) { return n >= 8 && n <= 512 && n % 8 == 0; }

KVQ_API kvq_status kvq_hadamard(float *x, int n, unsigned seed) {
    kvq__rotation r;
    if (!x || !kvq__rotation_dim_ok(n)) return KVQ_ERR_INVALID;
    kvq__rotation_init(&r, n, seed);
    kvq__rotate(&r, x, 0);
    return KVQ_OK;
}

KVQ_API kvq_status kvq_hadamard_inverse(float *x, int n, unsigned seed) {
    kvq__rotation r;
    if (!x || !kvq__rotation_dim_ok(n)) return KVQ_ERR_INVALID;
    kvq__rotation_init(&r, n, seed);
    kvq__rotate(&r, x, 1);
    return KVQ_OK;
}

/* ---------------------------------------------------------------------------
   Cache. One allocation: the struct, then per KV head
     sinks      [S][D] fp16 keys and values
     key blocks [max_blocks] records (kvq__key_block_bytes)
     values     [max_values] params and codes
     residual   rings of fp16 rows: keys [kcap][D], values [vcap][D]
   Token t of a head lives in: sinks if t < S; a key block if t < S + n_kblocks*G,
   else the key ring; a quantized value if t < S + n_vquant, else the value ring.
   Keys leave the ring one full block of G at a time, once more than R are
   waiting; values leave one at a time, once more than R are waiting. So
   n_kblocks*G <= n_vquant always, and attention has at most four segments.
   --------------------------------------------------------------------------- */

struct kvq_cache {
    kvq_config cfg;
    void *owned;       /* the allocation from kvq_cache_create, or NULL */
    int n_tokens;
    int n_kblocks;     /* quantized key blocks per head */
    int n_vquant;      /* quantized values per head */
    int max_kblocks, max_vquant, kcap, vcap, n_sinks_cap;
    size_t kblock_bytes, vparam_bytes, vcode_bytes;
    uint16_t *sink_k, *sink_v; /* [H][S][D] */
    uint8_t *kblocks;          /* [H][max_kblocks][kblock_bytes] */
    uint16_t *vparams;         /* [H][max_vquant][vparam_bytes/2] */
    uint8_t *vcodes;           /* [H][max_vquant][vcode_bytes] */
    uint16_t *ring_k;          /* [H][kcap][D] */
    uint16_t *ring_v;          /* [H][vcap][D] */
    kvq__rotation rot;         /* used when cfg.rotation == KVQ_ROTATE_HADAMARD */
};

KVQ_API const char *kvq_status_string(kvq_status s) {
    switch (s) {
    case KVQ_OK: return "ok";
    case KVQ_ERR_INVALID: return "invalid argument";
    case KVQ_ERR_UNSUPPORTED: return "unsupported configuration";
    case KVQ_ERR_FULL: return "cache full";
    case KVQ_ERR_NOMEM: return "out of memory";
    case KVQ_ERR_CORRUPT: return "corrupt data";
    }
    return "unknown status";
}

KVQ_API int kvq_version_number(void) { return KVQ_VERSION_NUMBER; }

KVQ_API kvq_config kvq_default_config(int head_dim, int n_kv_heads, int max_tokens) {
    kvq_config c;
    memset(&c, 0, sizeof c);
    c.head_dim = head_dim;
    c.n_kv_heads = n_kv_heads;
    c.max_tokens = max_tokens;
    c.key_bits = 2;
    c.value_bits = 2;
    c.group_size = 32;
    c.residual_tokens = 128;
    c.sink_tokens = 0;
    c.rotation = KVQ_ROTATE_NONE;
    c.seed = 0x6b7671u; /* "kvq" */
    c.salient_ratio = 0.0f;
    c.salient_bits = 8;
    c.salient_policy = KVQ_SALIENT_ATTENTION;
    c.key_axis = KVQ_KEYS_PER_CHANNEL;
    return c;
}

static kvq_status kvq__check_bits(int bits) {
    if (bits == 2 || bits == 3 || bits == 4 || bits == 8 || bits == 16) return KVQ_OK;
    return (bits >= 1 && bits <= 32) ? KVQ_ERR_UNSUPPORTED : KVQ_ERR_INVALID;
}

KVQ_API kvq_status kvq_config_check(const kvq_config *cfg) {
    kvq_status st;
    if (!cfg) return KVQ_ERR_INVALID;
    if (cfg->head_dim < 8 || cfg->head_dim > 512 || cfg->head_dim % 8) return KVQ_ERR_INVALID;
    if (cfg->n_kv_heads < 1 || cfg->n_kv_heads > KVQ__MAX_HEADS) return KVQ_ERR_INVALID;
    if (cfg->max_tokens < 1 || cfg->max_tokens > KVQ__MAX_TOKENS) return KVQ_ERR_INVALID;
    if ((st = kvq__check_bits(cfg->key_bits)) != KVQ_OK) return st;
    if ((st = kvq__check_bits(cfg->value_bits)) != KVQ_OK) return st;
    switch (cfg->group_size) {
    case 16: case 32: case 64: case 128: break;
    default: return cfg->group_size > 0 && cfg->group_size <= 4096 ? KVQ_ERR_UNSUPPORTED : KVQ_ERR_INVALID;
    }
    if (cfg->residual_tokens < 0 || cfg->residual_tokens > KVQ__MAX_TOKENS ||
        cfg->residual_tokens % cfg->group_size)
        return KVQ_ERR_INVALID;
    if (cfg->sink_tokens < 0 || cfg->sink_tokens > cfg->max_tokens) return KVQ_ERR_INVALID;
    if (cfg->salient_bits != 8 && cfg->salient_bits != 16) return KVQ_ERR_INVALID;
    if (cfg->salient_policy != KVQ_SALIENT_ATTENTION && cfg->salient_policy != KVQ_SALIENT_ERROR)
        return KVQ_ERR_INVALID;
    if (cfg->key_axis != KVQ_KEYS_PER_CHANNEL && cfg->key_axis != KVQ_KEYS_PER_TOKEN) return KVQ_ERR_INVALID;
    if (cfg->key_axis == KVQ_KEYS_PER_TOKEN) return KVQ_ERR_UNSUPPORTED;
    if (!(cfg->salient_ratio >= 0.0f && cfg->salient_ratio < 1.0f)) return KVQ_ERR_INVALID;
    if (cfg->rotation < KVQ_ROTATE_NONE || cfg->rotation > KVQ_ROTATE_PREROTATED) return KVQ_ERR_INVALID;
    /* Rotation and salient tokens arrive in their own releases. */
    if (cfg->rotation == KVQ_ROTATE_HADAMARD || cfg->salient_ratio > 0.0f) return KVQ_ERR_UNSUPPORTED;
    return KVQ_OK;
}

/* Overflow-checked size arithmetic: every helper leaves *ok at 0 on overflow. */
static size_t kvq__mul(size_t a, size_t b, int *ok) {
    if (a && b > SIZE_MAX / a) { *ok = 0; return 0; }
    return a * b;
}
static size_t kvq__add(size_t a, size_t b, int *ok) {
    if (b > SIZE_MAX - a) { *ok = 0; return 0; }
    return a + b;
}
static size_t kvq__align_up(size_t a, int *ok) {
    return kvq__add(a, KVQ__ALIGN - 1, ok) & ~(size_t)(KVQ__ALIGN - 1);
}

typedef struct kvq__layout {
    int max_kblocks, max_vquant, kcap, vcap;
    size_t off_sink_k, off_sink_v, off_kblocks, off_vparams, off_vcodes, off_ring_k, off_ring_v, total;
} kvq__layout;

/* Places one array of count*elem bytes at the aligned end of the layout so far. */
static size_t kvq__place(size_t *end, size_t count, size_t elem, int *ok) {
    size_t at = kvq__align_up(*end, ok);
    *end = kvq__add(at, kvq__mul(count, elem, ok), ok);
    return at;
}

static int kvq__plan(const kvq_config *cfg, kvq__layout *L) {
    int ok = 1;
    size_t H = (size_t)cfg->n_kv_heads, D = (size_t)cfg->head_dim, end;
    int after_sinks = cfg->max_tokens - cfg->sink_tokens;
    int G = cfg->group_size, R = cfg->residual_tokens;
    KVQ_ASSERT(G > 0 && after_sinks >= 0); /* kvq_config_check passed */
    memset(L, 0, sizeof *L);
    L->max_kblocks = after_sinks / G;
    L->max_vquant = after_sinks > R ? after_sinks - R : 0;
    /* Ring capacities: keys wait at most R + G - 1 (a multiple-of-G ring keeps each
       block contiguous); values at most R + 1. Never more than the tokens that can come. */
    L->kcap = R + G < after_sinks ? R + G : (after_sinks > 0 ? after_sinks : 1);
    L->vcap = R + 1 < after_sinks ? R + 1 : (after_sinks > 0 ? after_sinks : 1);
    end = sizeof(kvq_cache);
    L->off_sink_k = kvq__place(&end, kvq__mul(H, (size_t)cfg->sink_tokens * D, &ok), 2, &ok);
    L->off_sink_v = kvq__place(&end, kvq__mul(H, (size_t)cfg->sink_tokens * D, &ok), 2, &ok);
    L->off_kblocks = kvq__place(&end, kvq__mul(H, (size_t)L->max_kblocks, &ok), kvq__key_block_bytes(cfg), &ok);
    L->off_vparams = kvq__place(&end, kvq__mul(H, (size_t)L->max_vquant, &ok), kvq__value_param_bytes(cfg), &ok);
    L->off_vcodes = kvq__place(&end, kvq__mul(H, (size_t)L->max_vquant, &ok), kvq__value_code_bytes(cfg), &ok);
    L->off_ring_k = kvq__place(&end, kvq__mul(H, (size_t)L->kcap, &ok), 2 * D, &ok);
    L->off_ring_v = kvq__place(&end, kvq__mul(H, (size_t)L->vcap, &ok), 2 * D, &ok);
    L->total = kvq__add(end, KVQ__ALIGN, &ok); /* slack to align the caller's pointer */
    return ok;
}

KVQ_API size_t kvq_cache_bytes(const kvq_config *cfg) {
    kvq__layout L;
    if (kvq_config_check(cfg) != KVQ_OK || !kvq__plan(cfg, &L)) return 0;
    return L.total;
}

KVQ_API kvq_status kvq_cache_init(kvq_cache **out, const kvq_config *cfg, void *mem, size_t mem_bytes) {
    kvq__layout L;
    kvq_status st;
    uint8_t *base;
    kvq_cache *c;
    if (!out || !mem) return KVQ_ERR_INVALID;
    if ((st = kvq_config_check(cfg)) != KVQ_OK) return st;
    if (!kvq__plan(cfg, &L)) return KVQ_ERR_NOMEM;
    if (mem_bytes < L.total) return KVQ_ERR_NOMEM;
    base = (uint8_t *)mem + ((KVQ__ALIGN - ((uintptr_t)mem & (KVQ__ALIGN - 1))) & (KVQ__ALIGN - 1));
    c = (kvq_cache *)(void *)base;
    memset(c, 0, sizeof *c);
    c->cfg = *cfg;
    c->max_kblocks = L.max_kblocks;
    c->max_vquant = L.max_vquant;
    c->kcap = L.kcap;
    c->vcap = L.vcap;
    c->kblock_bytes = kvq__key_block_bytes(cfg);
    c->vparam_bytes = kvq__value_param_bytes(cfg);
    c->vcode_bytes = kvq__value_code_bytes(cfg);
    c->sink_k = (uint16_t *)(void *)(base + L.off_sink_k);
    c->sink_v = (uint16_t *)(void *)(base + L.off_sink_v);
    c->kblocks = base + L.off_kblocks;
    c->vparams = (uint16_t *)(void *)(base + L.off_vparams);
    c->vcodes = base + L.off_vcodes;
    c->ring_k = (uint16_t *)(void *)(base + L.off_ring_k);
    c->ring_v = (uint16_t *)(void *)(base + L.off_ring_v);
    kvq__rotation_init(&c->rot, cfg->head_dim, cfg->seed);
    *out = c;
    return KVQ_OK;
}

KVQ_API kvq_status kvq_cache_create(kvq_cache **out, const kvq_config *cfg) {
    size_t n;
    void *mem;
    kvq_status st;
    if (!out) return KVQ_ERR_INVALID;
    if ((st = kvq_config_check(cfg)) != KVQ_OK) return st;
    if ((n = kvq_cache_bytes(cfg)) == 0) return KVQ_ERR_NOMEM;
    if (!(mem = KVQ_MALLOC(n))) return KVQ_ERR_NOMEM;
    st = kvq_cache_init(out, cfg, mem, n);
    if (st != KVQ_OK) { KVQ_FREE(mem); return st; }
    (*out)->owned = mem;
    return KVQ_OK;
}

KVQ_API void kvq_cache_destroy(kvq_cache *c) {
    if (c && c->owned) KVQ_FREE(c->owned);
}

KVQ_API void kvq_cache_reset(kvq_cache *c) {
    if (!c) return;
    c->n_tokens = c->n_kblocks = c->n_vquant = 0;
}

KVQ_API int kvq_cache_tokens(const kvq_cache *c) { return c ? c->n_tokens : 0; }

KVQ_API const kvq_config *kvq_cache_config(const kvq_cache *c) { return c ? &c->cfg : NULL; }

/* Tokens past the sinks, and how many of them sit in the key and value rings. */
static int kvq__after_sinks(const kvq_cache *c) {
    return c->n_tokens > c->cfg.sink_tokens ? c->n_tokens - c->cfg.sink_tokens : 0;
}

KVQ_API size_t kvq_cache_payload_bytes(const kvq_cache *c) {
    size_t H, D, row, sinks, kq, kres, vq, vres;
    int after;
    if (!c) return 0;
    H = (size_t)c->cfg.n_kv_heads;
    D = (size_t)c->cfg.head_dim;
    row = 2 * D; /* one fp16 row */
    after = kvq__after_sinks(c);
    sinks = (size_t)(c->n_tokens - after) * row * 2;
    kq = (size_t)c->n_kblocks * c->kblock_bytes;
    kres = (size_t)(after - c->n_kblocks * c->cfg.group_size) * row;
    vq = (size_t)c->n_vquant * (c->vparam_bytes + c->vcode_bytes);
    vres = (size_t)(after - c->n_vquant) * row;
    return H * (sinks + kq + kres + vq + vres);
}

/* Addresses of one head's records. */
static uint16_t *kvq__sink_row(const kvq_cache *c, uint16_t *base, int h, int t) {
    return base + ((size_t)h * c->cfg.sink_tokens + (size_t)t) * c->cfg.head_dim;
}
static uint8_t *kvq__key_block(const kvq_cache *c, int h, int b) {
    return c->kblocks + ((size_t)h * c->max_kblocks + (size_t)b) * c->kblock_bytes;
}
static uint16_t *kvq__value_params(const kvq_cache *c, int h, int j) {
    return c->vparams + ((size_t)h * c->max_vquant + (size_t)j) * (c->vparam_bytes / 2);
}
static uint8_t *kvq__value_codes(const kvq_cache *c, int h, int j) {
    return c->vcodes + ((size_t)h * c->max_vquant + (size_t)j) * c->vcode_bytes;
}
/* Ring rows are addressed by position past the sinks, modulo the ring size. */
static uint16_t *kvq__ring_k_row(const kvq_cache *c, int h, int pos) {
    return c->ring_k + ((size_t)h * c->kcap + (size_t)(pos % c->kcap)) * c->cfg.head_dim;
}
static uint16_t *kvq__ring_v_row(const kvq_cache *c, int h, int pos) {
    return c->ring_v + ((size_t)h * c->vcap + (size_t)(pos % c->vcap)) * c->cfg.head_dim;
}

static void kvq__f16_row(uint16_t *dst, const float *src, int n) {
    int i;
    for (i = 0; i < n; i++) dst[i] = kvq__f32_to_f16(src[i]);
}
static void kvq__f32_row(float *dst, const uint16_t *src, int n) {
    int i;
    for (i = 0; i < n; i++) dst[i] = kvq__f16_to_f32(src[i]);
}

/* Quantizes the oldest waiting key block of head h (block index b, ring positions b*G..). */
static void kvq__quantize_key_block(kvq_cache *c, int h, int b) {
    const int D = c->cfg.head_dim, G = c->cfg.group_size, bits = c->cfg.key_bits;
    uint8_t *blk = kvq__key_block(c, h, b);
    const uint16_t *rows = kvq__ring_k_row(c, h, b * G); /* G contiguous rows: kcap % G == 0 or no wrap */
    float x[128];
    int ch, t;
    if (bits == 16) {
        memcpy(blk, rows, (size_t)G * D * 2);
        return;
    }
    {
        uint16_t *scale = (uint16_t *)(void *)blk, *mins = scale + D;
        uint8_t *codes = blk + 4 * (size_t)D;
        size_t row_bytes = (size_t)G * bits / 8;
        memset(codes, 0, row_bytes * D);
        for (ch = 0; ch < D; ch++) {
            kvq__qparams qp;
            for (t = 0; t < G; t++) x[t] = kvq__f16_to_f32(rows[(size_t)t * D + ch]);
            qp = kvq__quantize_group(x, G, 1, bits, codes + row_bytes * ch, 0);
            scale[ch] = qp.scale;
            mins[ch] = qp.min;
        }
    }
}

/* Quantizes the oldest waiting value of head h (value index j) per group of G channels. */
static void kvq__quantize_value(kvq_cache *c, int h, int j) {
    const int D = c->cfg.head_dim, G = c->cfg.group_size, bits = c->cfg.value_bits;
    const uint16_t *row = kvq__ring_v_row(c, h, j);
    uint8_t *codes = kvq__value_codes(c, h, j);
    uint16_t *par = kvq__value_params(c, h, j);
    int ng = kvq__value_groups(&c->cfg), g;
    float x[512];
    if (bits == 16) {
        memcpy(codes, row, (size_t)D * 2);
        return;
    }
    kvq__f32_row(x, row, D);
    memset(codes, 0, c->vcode_bytes);
    for (g = 0; g < ng; g++) {
        int c0 = g * G, n = D - c0 < G ? D - c0 : G;
        kvq__qparams qp = kvq__quantize_group(x + c0, n, 1, bits, codes, c0);
        par[g] = qp.scale;
        par[ng + g] = qp.min;
    }
}

/* Stores one caller row as fp16, rotated first when the cache rotates. */
static void kvq__store_row(const kvq_cache *c, uint16_t *dst, const float *src) {
    float tmp[512];
    if (c->cfg.rotation != KVQ_ROTATE_HADAMARD) {
        kvq__f16_row(dst, src, c->cfg.head_dim);
        return;
    }
    memcpy(tmp, src, (size_t)c->cfg.head_dim * sizeof(float));
    kvq__rotate(&c->rot, tmp, 0);
    kvq__f16_row(dst, tmp, c->cfg.head_dim);
}

static int kvq__finite_fp16(const float *x, size_t n) {
    size_t i;
    for (i = 0; i < n; i++)
        if (!(x[i] >= -KVQ__FP16_MAX && x[i] <= KVQ__FP16_MAX)) return 0; /* also rejects NaN */
    return 1;
}

/* Stores one token (all heads) and moves what leaves the residual window. */
static void kvq__append_token(kvq_cache *c, const float *k, const float *v) {
    const int H = c->cfg.n_kv_heads, D = c->cfg.head_dim, S = c->cfg.sink_tokens;
    const int G = c->cfg.group_size, R = c->cfg.residual_tokens;
    int t = c->n_tokens, h, pos, kwait, vwait;
    if (t < S) {
        for (h = 0; h < H; h++) {
            kvq__store_row(c, kvq__sink_row(c, c->sink_k, h, t), k + (size_t)h * D);
            kvq__store_row(c, kvq__sink_row(c, c->sink_v, h, t), v + (size_t)h * D);
        }
        c->n_tokens++;
        return;
    }
    pos = t - S;
    for (h = 0; h < H; h++) {
        kvq__store_row(c, kvq__ring_k_row(c, h, pos), k + (size_t)h * D);
        kvq__store_row(c, kvq__ring_v_row(c, h, pos), v + (size_t)h * D);
    }
    c->n_tokens++;
    kwait = pos + 1 - c->n_kblocks * G;
    if (kwait > R && kwait >= G) {
        for (h = 0; h < H; h++) kvq__quantize_key_block(c, h, c->n_kblocks);
        c->n_kblocks++;
    }
    vwait = pos + 1 - c->n_vquant;
    if (vwait > R) {
        for (h = 0; h < H; h++) kvq__quantize_value(c, h, c->n_vquant);
        c->n_vquant++;
    }
}

KVQ_API kvq_status kvq_cache_append(kvq_cache *c, const float *k, const float *v, int n_tokens) {
    size_t row;
    int i;
    if (!c || n_tokens < 0) return KVQ_ERR_INVALID;
    if (n_tokens == 0) return KVQ_OK;
    if (!k || !v) return KVQ_ERR_INVALID;
    if (n_tokens > c->cfg.max_tokens - c->n_tokens) return KVQ_ERR_FULL;
    row = (size_t)c->cfg.n_kv_heads * c->cfg.head_dim;
    /* validate everything first: an append is all or nothing */
    if (!kvq__finite_fp16(k, row * n_tokens) || !kvq__finite_fp16(v, row * n_tokens)) return KVQ_ERR_INVALID;
    for (i = 0; i < n_tokens; i++) kvq__append_token(c, k + row * i, v + row * i);
    return KVQ_OK;
}

/* Dequantizes key of token t of head h into x[D]. */
static void kvq__read_key(const kvq_cache *c, int h, int t, float *x) {
    const int D = c->cfg.head_dim, S = c->cfg.sink_tokens, G = c->cfg.group_size, bits = c->cfg.key_bits;
    int pos = t - S, ch;
    if (t < S) { kvq__f32_row(x, kvq__sink_row(c, c->sink_k, h, t), D); return; }
    if (pos >= c->n_kblocks * G) { kvq__f32_row(x, kvq__ring_k_row(c, h, pos), D); return; }
    {
        const uint8_t *blk = kvq__key_block(c, h, pos / G);
        int tt = pos % G;
        if (bits == 16) { kvq__f32_row(x, (const uint16_t *)(const void *)blk + (size_t)tt * D, D); return; }
        {
            const uint16_t *scale = (const uint16_t *)(const void *)blk, *mins = scale + D;
            const uint8_t *codes = blk + 4 * (size_t)D;
            size_t row_bytes = (size_t)G * bits / 8;
            for (ch = 0; ch < D; ch++)
                x[ch] = kvq__f16_to_f32(mins[ch]) +
                        kvq__f16_to_f32(scale[ch]) * (float)kvq__get_code(codes + row_bytes * ch, tt, bits);
        }
    }
}

static void kvq__read_value(const kvq_cache *c, int h, int t, float *x) {
    const int D = c->cfg.head_dim, S = c->cfg.sink_tokens, G = c->cfg.group_size, bits = c->cfg.value_bits;
    int pos = t - S, ch;
    if (t < S) { kvq__f32_row(x, kvq__sink_row(c, c->sink_v, h, t), D); return; }
    if (pos >= c->n_vquant) { kvq__f32_row(x, kvq__ring_v_row(c, h, pos), D); return; }
    {
        const uint8_t *codes = kvq__value_codes(c, h, pos);
        const uint16_t *par = kvq__value_params(c, h, pos);
        int ng = kvq__value_groups(&c->cfg);
        if (bits == 16) { kvq__f32_row(x, (const uint16_t *)(const void *)codes, D); return; }
        for (ch = 0; ch < D; ch++)
            x[ch] = kvq__f16_to_f32(par[ng + ch / G]) +
                    kvq__f16_to_f32(par[ch / G]) * (float)kvq__get_code(codes, ch, bits);
    }
}

KVQ_API kvq_status kvq_cache_read(const kvq_cache *c, int first, int n, float *k, float *v) {
    const int H = c ? c->cfg.n_kv_heads : 0, D = c ? c->cfg.head_dim : 0;
    int t, h;
    if (!c || (!k && !v) || first < 0 || n < 0 || n > c->n_tokens - first) return KVQ_ERR_INVALID;
    for (t = 0; t < n; t++)
        for (h = 0; h < H; h++) {
            size_t at = ((size_t)t * H + h) * D;
            if (k) kvq__read_key(c, h, first + t, k + at);
            if (v) kvq__read_value(c, h, first + t, v + at);
            if (c->cfg.rotation == KVQ_ROTATE_HADAMARD) { /* back to the caller's space */
                if (k) kvq__rotate(&c->rot, k + at, 1);
                if (v) kvq__rotate(&c->rot, v + at, 1);
            }
        }
    return KVQ_OK;
}

/* ---------------------------------------------------------------------------
   Attention. For each KV head and query, the visible tokens are walked in
   tiles that never cross a segment (sinks, key block, key ring) boundary;
   each tile scores its keys from whatever they are stored as, updates an
   online softmax (FlashAttention: running max m, sum l, accumulator acc,
   rescaled by exp(m_old - m_new) when the max grows) and adds its values.
   Quantized keys, per channel c of a block:
     q.k_t = sum_c (q_c s_c) code_{c,t} + sum_c q_c m_c
   so the scales fold into the query once per block and the mins are one bias.
   Quantized values, per group g: sum_t p_t v_t[c] = sum_t (p_t s_{t,g}) code_{t,c} + p_t m_{t,g}.
   --------------------------------------------------------------------------- */

#define KVQ__HEAD_CHUNK 8 /* query heads of one KV group handled together */
#define KVQ__TILE 128     /* at most G tokens per tile */

typedef struct kvq__head_state {
    float m, l; /* running max and sum of exp(score - m) */
    float *acc; /* [D], unnormalized */
} kvq__head_state;

/* scores[t] = scale * q . k, tokens [t0, t0+n) of a run of fp16 rows (sinks, ring, fp16 block). */
static void kvq__scores_f16_rows(const uint16_t *const *rows, int n, int D, const float *q, float scale,
                                 float *scores) {
    int t, ch;
    for (t = 0; t < n; t++) {
        float s = 0.0f;
        for (ch = 0; ch < D; ch++) s += q[ch] * kvq__f16_to_f32(rows[t][ch]);
        scores[t] = s * scale;
    }
}

/* Scores tokens [tt, tt+n) of a quantized key block. */
static void kvq__scores_key_block(const uint8_t *blk, int D, int G, int bits, const float *q, float scale,
                                  int tt, int n, float *scores) {
    const uint16_t *sc = (const uint16_t *)(const void *)blk, *mins = sc + D;
    const uint8_t *codes = blk + 4 * (size_t)D;
    size_t row_bytes = (size_t)G * bits / 8;
    float bias = 0.0f;
    int ch, t;
    for (t = 0; t < n; t++) scores[t] = 0.0f;
    for (ch = 0; ch < D; ch++) {
        float qs = q[ch] * kvq__f16_to_f32(sc[ch]);
        const uint8_t *row = codes + row_bytes * ch;
        bias += q[ch] * kvq__f16_to_f32(mins[ch]);
        for (t = 0; t < n; t++) scores[t] += qs * (float)kvq__get_code(row, tt + t, bits);
    }
    for (t = 0; t < n; t++) scores[t] = (scores[t] + bias) * scale;
}

/* acc += p * v for one stored value of head h at token t. */
static void kvq__accumulate_value(const kvq_cache *c, int h, int t, float p, float *acc) {
    const int D = c->cfg.head_dim, S = c->cfg.sink_tokens, G = c->cfg.group_size, bits = c->cfg.value_bits;
    int pos = t - S, ch;
    const uint16_t *row = NULL;
    if (t < S) row = kvq__sink_row(c, c->sink_v, h, t);
    else if (pos >= c->n_vquant) row = kvq__ring_v_row(c, h, pos);
    else if (bits == 16) row = (const uint16_t *)(const void *)kvq__value_codes(c, h, pos);
    if (row) {
        for (ch = 0; ch < D; ch++) acc[ch] += p * kvq__f16_to_f32(row[ch]);
        return;
    }
    {
        const uint8_t *codes = kvq__value_codes(c, h, pos);
        const uint16_t *par = kvq__value_params(c, h, pos);
        int ng = kvq__value_groups(&c->cfg), g;
        for (g = 0; g < ng; g++) {
            float ps = p * kvq__f16_to_f32(par[g]), pm = p * kvq__f16_to_f32(par[ng + g]);
            int c0 = g * G, c1 = c0 + G < D ? c0 + G : D;
            for (ch = c0; ch < c1; ch++) acc[ch] += ps * (float)kvq__get_code(codes, ch, bits) + pm;
        }
    }
}

/* Scores the tile [t0, t0+n) of head h for one query vector. The tile lies in one segment. */
static void kvq__score_tile(const kvq_cache *c, int h, int t0, int n, const float *q, float scale, float *scores) {
    const int D = c->cfg.head_dim, S = c->cfg.sink_tokens, G = c->cfg.group_size;
    const uint16_t *rows[KVQ__TILE];
    int pos = t0 - S, t;
    if (t0 >= S && pos < c->n_kblocks * G) {
        const uint8_t *blk = kvq__key_block(c, h, pos / G);
        if (c->cfg.key_bits != 16) {
            kvq__scores_key_block(blk, D, G, c->cfg.key_bits, q, scale, pos % G, n, scores);
            return;
        }
        for (t = 0; t < n; t++) rows[t] = (const uint16_t *)(const void *)blk + (size_t)(pos % G + t) * D;
    } else {
        for (t = 0; t < n; t++)
            rows[t] = t0 + t < S ? kvq__sink_row(c, c->sink_k, h, t0 + t) : kvq__ring_k_row(c, h, pos + t);
    }
    kvq__scores_f16_rows(rows, n, D, q, scale, scores);
}

/* End of the tile starting at t: the next segment boundary (sinks, block, ring), at most hi. */
static int kvq__tile_end(const kvq_cache *c, int t, int hi) {
    const int S = c->cfg.sink_tokens, G = c->cfg.group_size;
    int end;
    if (t < S) end = S < t + G ? S : t + G;
    else if (t - S < c->n_kblocks * G) end = S + ((t - S) / G + 1) * G;
    else end = t + G;
    return end < hi ? end : hi;
}

/* Online softmax over tokens [lo, hi) of head h, for nh query vectors q[j*D]. */
static void kvq__attend_range(const kvq_cache *c, int h, const float *q, int nh, float scale, int lo, int hi,
                              kvq__head_state *st) {
    const int D = c->cfg.head_dim;
    float scores[KVQ__TILE];
    int t0, j, t, ch;
    for (t0 = lo; t0 < hi;) {
        int t1 = kvq__tile_end(c, t0, hi), n = t1 - t0;
        for (j = 0; j < nh; j++) {
            kvq__head_state *s = &st[j];
            float mx = s->m, sum = 0.0f;
            kvq__score_tile(c, h, t0, n, q + (size_t)j * D, scale, scores);
            for (t = 0; t < n; t++) mx = scores[t] > mx ? scores[t] : mx;
            if (mx > s->m) {
                float corr = expf(s->m - mx); /* exp(-inf) = 0 on the first tile */
                s->l *= corr;
                for (ch = 0; ch < D; ch++) s->acc[ch] *= corr;
                s->m = mx;
            }
            for (t = 0; t < n; t++) {
                float p = expf(scores[t] - mx);
                sum += p;
                kvq__accumulate_value(c, h, t0 + t, p, s->acc);
            }
            s->l += sum;
        }
        t0 = t1;
    }
}

static kvq_status kvq__check_attn(const kvq_cache *c, const float *q, const kvq_attn_params *p) {
    size_t n;
    if (!c || !q || !p) return KVQ_ERR_INVALID;
    if (p->n_q_heads < c->cfg.n_kv_heads || p->n_q_heads % c->cfg.n_kv_heads || p->n_q_heads > 1 << 20)
        return KVQ_ERR_INVALID;
    if (p->n_queries < 1 || p->n_queries > c->n_tokens) return KVQ_ERR_INVALID;
    if (!(p->scale > -FLT_MAX && p->scale < FLT_MAX)) return KVQ_ERR_INVALID; /* also NaN */
    n = (size_t)p->n_queries * p->n_q_heads * c->cfg.head_dim;
    {
        size_t i;
        for (i = 0; i < n; i++)
            if (!(q[i] > -FLT_MAX && q[i] < FLT_MAX)) return KVQ_ERR_INVALID;
    }
    return KVQ_OK;
}

static float kvq__scale(const kvq_cache *c, const kvq_attn_params *p) {
    return p->scale != 0.0f ? p->scale : 1.0f / sqrtf((float)c->cfg.head_dim);
}

/* Runs query i, query heads [qh0, qh0+nh) of KV head h over tokens [lo, hi) clipped to causality. */
static void kvq__attend_query(const kvq_cache *c, const float *q, const kvq_attn_params *p, int i, int h,
                              int qh0, int nh, int lo, int hi, kvq__head_state *st) {
    const int D = c->cfg.head_dim;
    int limit = c->n_tokens - p->n_queries + i + 1; /* causal: tokens <= position */
    int j;
    for (j = 0; j < nh; j++) {
        st[j].m = -INFINITY;
        st[j].l = 0.0f;
        memset(st[j].acc, 0, (size_t)D * sizeof(float));
    }
    if (hi > limit) hi = limit;
    kvq__attend_range(c, h, q + ((size_t)i * p->n_q_heads + qh0) * D, nh, kvq__scale(c, p), lo, hi, st);
}

KVQ_API kvq_status kvq_attention(kvq_cache *c, const float *q, float *out, const kvq_attn_params *p) {
    kvq__head_state st[KVQ__HEAD_CHUNK];
    kvq_status s;
    int H, D, group, h, i, qh, j, ch;
    if (!out) return KVQ_ERR_INVALID;
    if ((s = kvq__check_attn(c, q, p)) != KVQ_OK) return s;
    H = c->cfg.n_kv_heads;
    D = c->cfg.head_dim;
    group = p->n_q_heads / H;
    for (h = 0; h < H; h++)
        for (i = 0; i < p->n_queries; i++)
            for (qh = h * group; qh < (h + 1) * group; qh += KVQ__HEAD_CHUNK) {
                int nh = (h + 1) * group - qh < KVQ__HEAD_CHUNK ? (h + 1) * group - qh : KVQ__HEAD_CHUNK;
                for (j = 0; j < nh; j++) st[j].acc = out + ((size_t)i * p->n_q_heads + qh + j) * D;
                kvq__attend_query(c, q, p, i, h, qh, nh, 0, c->n_tokens, st);
                for (j = 0; j < nh; j++) {
                    float inv = 1.0f / st[j].l; /* l >= 1: the max token contributes exp(0) */
                    for (ch = 0; ch < D; ch++) st[j].acc[ch] *= inv;
                }
            }
    return KVQ_OK;
}

KVQ_API size_t kvq_attention_state_floats(const kvq_cache *c, const kvq_attn_params *p) {
    if (!c || !p || p->n_queries < 1 || p->n_q_heads < 1 || p->n_q_heads > 1 << 20 ||
        p->n_queries > KVQ__MAX_TOKENS)
        return 0;
    return (size_t)p->n_queries * p->n_q_heads * ((size_t)c->cfg.head_dim + 2);
}

KVQ_API kvq_status kvq_attention_partial(kvq_cache *c, const float *q, const kvq_attn_params *p, int tok_first,
                                         int tok_end, int kv_first, int kv_end, float *state) {
    kvq__head_state st[KVQ__HEAD_CHUNK];
    kvq_status s;
    int D, group, h, i, qh, j;
    size_t stride;
    if (!state) return KVQ_ERR_INVALID;
    if ((s = kvq__check_attn(c, q, p)) != KVQ_OK) return s;
    if (tok_first < 0 || tok_first > tok_end || tok_end > c->n_tokens) return KVQ_ERR_INVALID;
    if (kv_first < 0 || kv_first >= kv_end || kv_end > c->cfg.n_kv_heads) return KVQ_ERR_INVALID;
    D = c->cfg.head_dim;
    stride = (size_t)D + 2;
    group = p->n_q_heads / c->cfg.n_kv_heads;
    for (h = kv_first; h < kv_end; h++)
        for (i = 0; i < p->n_queries; i++)
            for (qh = h * group; qh < (h + 1) * group; qh += KVQ__HEAD_CHUNK) {
                int nh = (h + 1) * group - qh < KVQ__HEAD_CHUNK ? (h + 1) * group - qh : KVQ__HEAD_CHUNK;
                float *row0 = state + ((size_t)i * p->n_q_heads + qh) * stride;
                for (j = 0; j < nh; j++) st[j].acc = row0 + (size_t)j * stride + 2;
                kvq__attend_query(c, q, p, i, h, qh, nh, tok_first, tok_end, st);
                for (j = 0; j < nh; j++) {
                    row0[(size_t)j * stride] = st[j].m;
                    row0[(size_t)j * stride + 1] = st[j].l;
                }
            }
    return KVQ_OK;
}

KVQ_API kvq_status kvq_attention_merge(const kvq_cache *c, const kvq_attn_params *p, const float *const *states,
                                       int n_states, float *out) {
    size_t rows, r, stride;
    int D, k, ch;
    if (!c || !p || !states || !out || n_states < 1) return KVQ_ERR_INVALID;
    if (kvq_attention_state_floats(c, p) == 0 || p->n_q_heads % c->cfg.n_kv_heads) return KVQ_ERR_INVALID;
    for (k = 0; k < n_states; k++)
        if (!states[k]) return KVQ_ERR_INVALID;
    D = c->cfg.head_dim;
    stride = (size_t)D + 2;
    rows = (size_t)p->n_queries * p->n_q_heads;
    for (r = 0; r < rows; r++) {
        float m = -INFINITY, l = 0.0f, *o = out + r * D;
        for (k = 0; k < n_states; k++) {
            float mk = states[k][r * stride];
            m = mk > m ? mk : m;
        }
        for (ch = 0; ch < D; ch++) o[ch] = 0.0f;
        for (k = 0; k < n_states; k++) {
            const float *sk = states[k] + r * stride;
            float w;
            if (!(sk[1] > 0.0f)) continue; /* this state saw no token of the row */
            w = expf(sk[0] - m);
            l += w * sk[1];
            for (ch = 0; ch < D; ch++) o[ch] += w * sk[2 + ch];
        }
        if (!(l > 0.0f)) return KVQ_ERR_INVALID; /* no state saw any token: ranges did not cover */
        for (ch = 0; ch < D; ch++) o[ch] /= l;
    }
    return KVQ_OK;
}

/* ---------------------------------------------------------------------------
   Serialization. Image, all integers little-endian:
     0   char[8]  "KVQCACHE"
     8   u32      format version (1)
     12  u32      header bytes (128)
     16  i32[16]  config: head_dim, n_kv_heads, max_tokens, key_bits, value_bits,
                  group_size, residual_tokens, sink_tokens, rotation, seed,
                  salient_ratio (f32 bits), salient_bits, salient_policy, key_axis, 0, 0
     80  i32      tokens stored
     84  i32      quantized key blocks per head, 88 i32 quantized values per head
     92  u32      0
     96  u64      payload bytes
     104 u32      CRC32C of the payload
     108 u32[4]   0
     124 u32      CRC32C of bytes [0, 124)
     128 payload: per KV head: sink K rows, sink V rows, key blocks, waiting keys
         (oldest first), quantized values (params then codes per token), waiting
         values; every fp16 as u16 little-endian.
   The block counts are derived again from the token count and checked, so an
   image can only describe a state that appending could have produced.
   --------------------------------------------------------------------------- */

#define KVQ__MAGIC "KVQCACHE"
/* Fuzzing builds skip the checksums, so the fuzzer reaches the checks behind them. */
#ifdef FUZZING_BUILD_MODE_UNSAFE_FOR_PRODUCTION
#define KVQ__FUZZING 1
#else
#define KVQ__FUZZING 0
#endif
#define KVQ__FORMAT_VERSION 1u
#define KVQ__HEADER_BYTES 128u
enum { KVQ__H_CONFIG = 16, KVQ__H_TOKENS = 80, KVQ__H_KBLOCKS = 84, KVQ__H_VQUANT = 88, KVQ__H_PAYLOAD = 96,
       KVQ__H_PAYLOAD_CRC = 104, KVQ__H_CRC = 124 };

/* CRC32C (Castagnoli, reflected polynomial 0x82F63B78), bitwise: no tables, no state. */
static uint32_t kvq__crc32c(uint32_t crc, const uint8_t *p, size_t n) {
    size_t i;
    int b;
    crc = ~crc;
    for (i = 0; i < n; i++) {
        crc ^= p[i];
        for (b = 0; b < 8; b++) crc = (crc >> 1) ^ (0x82f63b78u & (0u - (crc & 1u)));
    }
    return ~crc;
}

static void kvq__put_u32(uint8_t *p, uint32_t v) {
    p[0] = (uint8_t)v; p[1] = (uint8_t)(v >> 8); p[2] = (uint8_t)(v >> 16); p[3] = (uint8_t)(v >> 24);
}
static uint32_t kvq__get_u32(const uint8_t *p) {
    return (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24;
}
static uint64_t kvq__get_u64(const uint8_t *p) { return kvq__get_u32(p) | (uint64_t)kvq__get_u32(p + 4) << 32; }

/* The block counts that appending n tokens one by one leaves (see kvq__append_token). */
static void kvq__counts_after(const kvq_config *cfg, int n, int *nkb, int *nvq) {
    int after = n > cfg->sink_tokens ? n - cfg->sink_tokens : 0, G = cfg->group_size, R = cfg->residual_tokens;
    int k = 0;
    if (after > R && after >= G) k = (after - (R > G - 1 ? R : G - 1) + G - 1) / G;
    *nkb = k;
    *nvq = after > R ? after - R : 0;
}

/* One pass over the payload in image order. Writing: copies cache -> image. Reading: image -> cache.
   u16 arrays go through explicit little-endian conversion; code bytes are copied as they are. */
typedef struct kvq__stream { uint8_t *img; size_t at; int to_image; } kvq__stream;

static void kvq__xfer_u16(kvq__stream *s, uint16_t *a, size_t n) {
    size_t i;
    uint8_t *p = s->img + s->at;
    if (s->to_image)
        for (i = 0; i < n; i++) { p[2 * i] = (uint8_t)a[i]; p[2 * i + 1] = (uint8_t)(a[i] >> 8); }
    else
        for (i = 0; i < n; i++) a[i] = (uint16_t)(p[2 * i] | p[2 * i + 1] << 8);
    s->at += 2 * n;
}
static void kvq__xfer_bytes(kvq__stream *s, uint8_t *a, size_t n) {
    if (s->to_image) memcpy(s->img + s->at, a, n);
    else memcpy(a, s->img + s->at, n);
    s->at += n;
}

/* Streams the payload of cache c; with img == NULL it only counts the bytes. */
static size_t kvq__xfer_payload(const kvq_cache *c, uint8_t *img, int to_image) {
    const int D = c->cfg.head_dim, G = c->cfg.group_size, S = c->cfg.sink_tokens;
    const int sinks = c->n_tokens < S ? c->n_tokens : S, after = kvq__after_sinks(c);
    const int kbits = c->cfg.key_bits, D2 = 2 * D;
    const size_t kparams = kbits == 16 ? (size_t)G * D : 2 * (size_t)D; /* u16 at the start of a key block */
    const size_t kcodes = c->kblock_bytes - 2 * kparams;
    kvq__stream s;
    int h, i;
    s.img = img;
    s.at = 0;
    s.to_image = to_image;
    if (!img) {
        size_t per_head = (size_t)sinks * 2 * D2 + (size_t)c->n_kblocks * c->kblock_bytes +
                          (size_t)(after - c->n_kblocks * G) * D2 +
                          (size_t)c->n_vquant * (c->vparam_bytes + c->vcode_bytes) +
                          (size_t)(after - c->n_vquant) * D2;
        return per_head * (size_t)c->cfg.n_kv_heads;
    }
    for (h = 0; h < c->cfg.n_kv_heads; h++) {
        if (sinks) {
            kvq__xfer_u16(&s, kvq__sink_row(c, c->sink_k, h, 0), (size_t)sinks * D);
            kvq__xfer_u16(&s, kvq__sink_row(c, c->sink_v, h, 0), (size_t)sinks * D);
        }
        for (i = 0; i < c->n_kblocks; i++) {
            uint8_t *blk = kvq__key_block(c, h, i);
            kvq__xfer_u16(&s, (uint16_t *)(void *)blk, kparams);
            kvq__xfer_bytes(&s, blk + 2 * kparams, kcodes);
        }
        for (i = c->n_kblocks * G; i < after; i++) kvq__xfer_u16(&s, kvq__ring_k_row(c, h, i), (size_t)D);
        for (i = 0; i < c->n_vquant; i++) {
            kvq__xfer_u16(&s, kvq__value_params(c, h, i), c->vparam_bytes / 2);
            if (c->cfg.value_bits == 16) kvq__xfer_u16(&s, (uint16_t *)(void *)kvq__value_codes(c, h, i), (size_t)D);
            else kvq__xfer_bytes(&s, kvq__value_codes(c, h, i), c->vcode_bytes);
        }
        for (i = c->n_vquant; i < after; i++) kvq__xfer_u16(&s, kvq__ring_v_row(c, h, i), (size_t)D);
    }
    return s.at;
}

KVQ_API size_t kvq_cache_serialized_bytes(const kvq_cache *c) {
    return c ? KVQ__HEADER_BYTES + kvq__xfer_payload(c, NULL, 1) : 0;
}

static void kvq__put_config(uint8_t *p, const kvq_config *cfg) {
    uint32_t ratio;
    memcpy(&ratio, &cfg->salient_ratio, 4);
    kvq__put_u32(p + 0, (uint32_t)cfg->head_dim);
    kvq__put_u32(p + 4, (uint32_t)cfg->n_kv_heads);
    kvq__put_u32(p + 8, (uint32_t)cfg->max_tokens);
    kvq__put_u32(p + 12, (uint32_t)cfg->key_bits);
    kvq__put_u32(p + 16, (uint32_t)cfg->value_bits);
    kvq__put_u32(p + 20, (uint32_t)cfg->group_size);
    kvq__put_u32(p + 24, (uint32_t)cfg->residual_tokens);
    kvq__put_u32(p + 28, (uint32_t)cfg->sink_tokens);
    kvq__put_u32(p + 32, (uint32_t)cfg->rotation);
    kvq__put_u32(p + 36, cfg->seed);
    kvq__put_u32(p + 40, ratio);
    kvq__put_u32(p + 44, (uint32_t)cfg->salient_bits);
    kvq__put_u32(p + 48, (uint32_t)cfg->salient_policy);
    kvq__put_u32(p + 52, (uint32_t)cfg->key_axis);
}

static int kvq__i32(const uint8_t *p) {
    uint32_t u = kvq__get_u32(p);
    return u <= (uint32_t)INT_MAX ? (int)u : -1 - (int)(~u & 0x7fffffffu); /* two's complement, portably */
}

static kvq_config kvq__get_config(const uint8_t *p) {
    kvq_config cfg;
    uint32_t ratio = kvq__get_u32(p + 40);
    memset(&cfg, 0, sizeof cfg);
    cfg.head_dim = kvq__i32(p + 0);
    cfg.n_kv_heads = kvq__i32(p + 4);
    cfg.max_tokens = kvq__i32(p + 8);
    cfg.key_bits = kvq__i32(p + 12);
    cfg.value_bits = kvq__i32(p + 16);
    cfg.group_size = kvq__i32(p + 20);
    cfg.residual_tokens = kvq__i32(p + 24);
    cfg.sink_tokens = kvq__i32(p + 28);
    cfg.rotation = kvq__i32(p + 32);
    cfg.seed = kvq__get_u32(p + 36);
    memcpy(&cfg.salient_ratio, &ratio, 4);
    cfg.salient_bits = kvq__i32(p + 44);
    cfg.salient_policy = kvq__i32(p + 48);
    cfg.key_axis = kvq__i32(p + 52);
    return cfg;
}

KVQ_API kvq_status kvq_cache_serialize(const kvq_cache *c, void *buf, size_t buf_bytes, size_t *written) {
    uint8_t *p = (uint8_t *)buf;
    size_t need, payload;
    if (!c || !buf) return KVQ_ERR_INVALID;
    need = kvq_cache_serialized_bytes(c);
    if (buf_bytes < need) return KVQ_ERR_NOMEM;
    payload = need - KVQ__HEADER_BYTES;
    memset(p, 0, KVQ__HEADER_BYTES);
    memcpy(p, KVQ__MAGIC, 8);
    kvq__put_u32(p + 8, KVQ__FORMAT_VERSION);
    kvq__put_u32(p + 12, KVQ__HEADER_BYTES);
    kvq__put_config(p + KVQ__H_CONFIG, &c->cfg);
    kvq__put_u32(p + KVQ__H_TOKENS, (uint32_t)c->n_tokens);
    kvq__put_u32(p + KVQ__H_KBLOCKS, (uint32_t)c->n_kblocks);
    kvq__put_u32(p + KVQ__H_VQUANT, (uint32_t)c->n_vquant);
    kvq__put_u32(p + KVQ__H_PAYLOAD, (uint32_t)payload);
    kvq__put_u32(p + KVQ__H_PAYLOAD + 4, (uint32_t)((uint64_t)payload >> 32));
    kvq__xfer_payload(c, p + KVQ__HEADER_BYTES, 1);
    kvq__put_u32(p + KVQ__H_PAYLOAD_CRC, kvq__crc32c(0, p + KVQ__HEADER_BYTES, payload));
    kvq__put_u32(p + KVQ__H_CRC, kvq__crc32c(0, p, KVQ__H_CRC));
    if (written) *written = need;
    return KVQ_OK;
}

/* Checks everything the header says; on success *cfg and *tokens describe the image. */
static kvq_status kvq__check_header(const uint8_t *p, size_t n, kvq_config *cfg, int *tokens) {
    int nkb, nvq, i;
    uint64_t payload;
    kvq_status st;
    if (n < KVQ__HEADER_BYTES || memcmp(p, KVQ__MAGIC, 8) != 0) return KVQ_ERR_CORRUPT;
    if (kvq__crc32c(0, p, KVQ__H_CRC) != kvq__get_u32(p + KVQ__H_CRC) && !KVQ__FUZZING) return KVQ_ERR_CORRUPT;
    if (kvq__get_u32(p + 8) > KVQ__FORMAT_VERSION) return KVQ_ERR_UNSUPPORTED; /* from a newer kvq */
    if (kvq__get_u32(p + 8) != KVQ__FORMAT_VERSION || kvq__get_u32(p + 12) != KVQ__HEADER_BYTES)
        return KVQ_ERR_CORRUPT;
    for (i = 92; i < KVQ__H_CRC; i += 4)
        if ((i == 92 || i >= KVQ__H_PAYLOAD_CRC + 4) && kvq__get_u32(p + i) != 0) return KVQ_ERR_CORRUPT;
    if (kvq__get_u32(p + KVQ__H_CONFIG + 56) || kvq__get_u32(p + KVQ__H_CONFIG + 60)) return KVQ_ERR_CORRUPT;
    *cfg = kvq__get_config(p + KVQ__H_CONFIG);
    st = kvq_config_check(cfg);
    if (st == KVQ_ERR_INVALID) return KVQ_ERR_CORRUPT;
    if (st != KVQ_OK) return st;
    *tokens = kvq__i32(p + KVQ__H_TOKENS);
    if (*tokens < 0 || *tokens > cfg->max_tokens) return KVQ_ERR_CORRUPT;
    kvq__counts_after(cfg, *tokens, &nkb, &nvq);
    if (kvq__i32(p + KVQ__H_KBLOCKS) != nkb || kvq__i32(p + KVQ__H_VQUANT) != nvq) return KVQ_ERR_CORRUPT;
    payload = kvq__get_u64(p + KVQ__H_PAYLOAD);
    if (payload > (uint64_t)(n - KVQ__HEADER_BYTES)) return KVQ_ERR_CORRUPT;
    return KVQ_OK;
}

KVQ_API kvq_status kvq_serialized_config(const void *bytes, size_t n_bytes, kvq_config *cfg) {
    int tokens;
    kvq_config tmp;
    kvq_status st;
    if (!bytes || !cfg) return KVQ_ERR_INVALID;
    if ((st = kvq__check_header((const uint8_t *)bytes, n_bytes, &tmp, &tokens)) != KVQ_OK) return st;
    *cfg = tmp;
    return KVQ_OK;
}

KVQ_API kvq_status kvq_cache_deserialize(kvq_cache **out, const void *bytes, size_t n_bytes, void *mem,
                                         size_t mem_bytes) {
    const uint8_t *p = (const uint8_t *)bytes;
    kvq_config cfg;
    kvq_cache probe, *c;
    kvq_status st;
    size_t payload;
    int tokens;
    if (!out || !bytes || !mem) return KVQ_ERR_INVALID;
    if ((st = kvq__check_header(p, n_bytes, &cfg, &tokens)) != KVQ_OK) return st;
    if (mem_bytes < kvq_cache_bytes(&cfg)) return KVQ_ERR_NOMEM;
    /* the payload size implied by the header must match the one stated, then the checksum */
    memset(&probe, 0, sizeof probe);
    probe.cfg = cfg;
    probe.n_tokens = tokens;
    kvq__counts_after(&cfg, tokens, &probe.n_kblocks, &probe.n_vquant);
    probe.kblock_bytes = kvq__key_block_bytes(&cfg);
    probe.vparam_bytes = kvq__value_param_bytes(&cfg);
    probe.vcode_bytes = kvq__value_code_bytes(&cfg);
    payload = kvq__xfer_payload(&probe, NULL, 0);
    if ((uint64_t)payload != kvq__get_u64(p + KVQ__H_PAYLOAD))
        return KVQ_ERR_CORRUPT;
    if (n_bytes - KVQ__HEADER_BYTES < payload) return KVQ_ERR_CORRUPT;
    if (kvq__crc32c(0, p + KVQ__HEADER_BYTES, payload) != kvq__get_u32(p + KVQ__H_PAYLOAD_CRC) && !KVQ__FUZZING)
        return KVQ_ERR_CORRUPT;
    /* only now is the caller's memory written */
    if ((st = kvq_cache_init(&c, &cfg, mem, mem_bytes)) != KVQ_OK) return st;
    c->n_tokens = tokens;
    c->n_kblocks = probe.n_kblocks;
    c->n_vquant = probe.n_vquant;
    kvq__xfer_payload(c, (uint8_t *)(uintptr_t)p + KVQ__HEADER_BYTES, 0); /* reads only */
    *out = c;
    return KVQ_OK;
}

#ifdef __cplusplus
}
#endif
#endif /* KVQ_IMPLEMENTATION */

/*
MIT License

Copyright (c) 2026 the kvq authors

Permission is hereby granted, free of charge, to any person obtaining a copy
of this software and associated documentation files (the "Software"), to deal
in the Software without restriction, including without limitation the rights
to use, copy, modify, merge, publish, distribute, sublicense, and/or sell
copies of the Software, and to permit persons to whom the Software is
furnished to do so, subject to the following conditions:

The above copyright notice and this permission notice shall be included in all
copies or substantial portions of the Software.

THE SOFTWARE IS PROVIDED "AS IS", WITHOUT WARRANTY OF ANY KIND, EXPRESS OR
IMPLIED, INCLUDING BUT NOT LIMITED TO THE WARRANTIES OF MERCHANTABILITY,
FITNESS FOR A PARTICULAR PURPOSE AND NONINFRINGEMENT. IN NO EVENT SHALL THE
AUTHORS OR COPYRIGHT HOLDERS BE LIABLE FOR ANY CLAIM, DAMAGES OR OTHER
LIABILITY, WHETHER IN AN ACTION OF CONTRACT, TORT OR OTHERWISE, ARISING FROM,
OUT OF OR IN CONNECTION WITH THE SOFTWARE OR THE USE OR OTHER DEALINGS IN THE
SOFTWARE.
*/
