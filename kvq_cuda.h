/* kvq_cuda.h - kvq's KV cache on an NVIDIA GPU: the same byte layout as kvq.h,
   byte-identical quantization, and fused FlashDecoding attention on the codes.
                                                          MIT licence (see kvq.h).

   Quick start (one .cu file)
   --------------------------
       #define KVQ_IMPLEMENTATION        // kvq.h's implementation must be in this file too
       #define KVQ_CUDA_IMPLEMENTATION   // (add KVQ_STATIC if another file also implements kvq.h)
       #include "kvq_cuda.h"             // includes kvq.h

       kvq_config cfg = kvq_default_config(128, 8, 65536);
       kvq_cuda_cache *gc;
       if (kvq_cuda_cache_create(&gc, &cfg) != KVQ_OK) return 1;
       kvq_cuda_cache_append(gc, d_k, d_v, 1, stream);   // device [n][n_kv_heads][head_dim]
       kvq_attn_params ap = { 32, 1, 0.0f };
       kvq_cuda_attention(gc, d_q, d_out, &ap, stream);  // device [n_queries][n_q_heads][head_dim]
       kvq_cuda_cache_destroy(gc);

   Configuration macros
   --------------------
   | macro                      | default     | meaning                                        |
   |----------------------------|-------------|------------------------------------------------|
   | KVQ_CUDA_IMPLEMENTATION    | (undefined) | emit the implementation (in a .cu file)        |
   | KVQ_CUDA_UNCHECKED_APPEND  | (undefined) | skip the device-side finite/fp16-range check   |
   |                            |             | of appended K/V (and the stream sync it needs) |
   | KVQ_CUDA_API               | extern      | linkage of the public functions                |

   What is the same as kvq.h
   -------------------------
   Per KV head, device memory holds exactly kvq.h's arrays: sinks fp16 [S][D] (keys and
   values); key blocks (fp16 scale[D], fp16 min[D], then per channel G codes packed along
   tokens, lowest bits first; 16 bits: G fp16 rows); values per token (fp16 scale[ng],
   fp16 min[ng], then D codes packed along channels; 16 bits: D fp16); fp16 residual rings
   for keys (R + G rows) and values (R + 1 rows), addressed by position past the sinks
   modulo the ring size. Keys leave the ring a block of G at a time once more than
   max(R, G - 1) wait; values one at a time once more than R wait. Quantization uses the
   same fp16 round-to-nearest-even, the same IEEE division (x - m) / s and the same
   round-half-even, with no FMA contraction, so a cache filled on the GPU serializes to
   the same bytes as one filled by kvq.h from the same inputs.
   Rotation: KVQ_ROTATE_HADAMARD rotates K, V and queries on the device with kvq.h's own
   plan (signs, Kronecker or block-diagonal pieces, Paley matrices) in kvq.h's operation
   order, so the rotated rows and their bytes are the CPU's; rows of L2 norm > 65504 are
   refused as kvq.h refuses them. KVQ_ROTATE_PREROTATED, as in kvq.h, transforms nothing.
   Salient tokens (salient_ratio > 0): the same side store (u16 index, then K and V at
   salient_bits), salience scores and seen counts. When a key block leaves the window its
   salient tokens are picked as kvq.h picks them (tracked attention per query that saw the
   token; the range gain when no query saw any token of the block, or with
   KVQ_SALIENT_ERROR), stored in the side store, left out of the block's min/max, and the
   block's values leave with it (the value ring holds R + G rows). Attention takes their
   keys and values from the side store; with KVQ_SALIENT_ATTENTION it adds, for each
   waiting key, the probability the query heads of its group gave it (after merging the
   chunks) and counts the query.
   Keys per token (key_axis = KVQ_KEYS_PER_TOKEN): kvq.h's records (quantized by the value
   quantizer at key_bits, in their own arrays), leaving the ring with their values.

   Differences from kvq.h (documented, not accidental)
   ---------------------------------------------------
   - append: sizes and capacity are checked on the host (KVQ_ERR_INVALID / KVQ_ERR_FULL,
     nothing launched). Finite and |x| <= 65504 (and, rotated, the row norms) are checked
     on the device before anything is stored; that needs one cudaStreamSynchronize per
     append, after which a bad input returns KVQ_ERR_INVALID with the cache untouched.
     Define KVQ_CUDA_UNCHECKED_APPEND to skip the check and the sync (append is then fully
     asynchronous; bad inputs give meaningless codes but never a memory error).
   - attention does not check the queries for NaN/Inf (a bad query gives NaN output rows).
     It keeps a partial-state scratch per cache that grows on demand (cudaMalloc, which
     synchronizes the device, the first time a larger call is made); calls on one cache
     must not overlap in time (use one stream per cache, or synchronize). With salient
     tokens and KVQ_SALIENT_ATTENTION, attention writes the cache (the salience of the
     waiting keys), as kvq_attention does.
   - tracked salience is not bit-identical: the scores are sums of exp(s - m) / l, and the
     device's expf, dot products and summation order differ from the CPU's in the last
     bits (the counts of queries are exact). Where two tokens' normalized scores are that
     close, the GPU may keep the other one in the side store; the cache is then equally
     valid but not byte-identical. Without attention calls between appends (prefill) or
     with KVQ_SALIENT_ERROR, the picks and every byte are the CPU's.
   - configs: kvq_config_check() decides; every config kvq.h builds is built here.
   - host <-> device copies move kvq.h's documented payload (its serialization image minus
     the header) between host and device in a few large cudaMemcpyAsync calls. The header,
     its version and checksums stay kvq.h's: kvq_cuda_cache_upload() reads the payload out of
     kvq_cache_serialize(); kvq_cuda_cache_download() hands it to kvq.h's own payload reader;
     kvq_cuda_cache_serialize()/_deserialize() go through a temporary host cache (host
     memory of a full cache of that config). So the translation unit that defines
     KVQ_CUDA_IMPLEMENTATION must also hold kvq.h's implementation (KVQ_IMPLEMENTATION,
     with KVQ_STATIC if another file implements kvq.h as well).
   - the host is assumed little-endian (x86-64, aarch64), as every CUDA host is; create
     returns KVQ_ERR_UNSUPPORTED otherwise.
   - errors from the CUDA runtime map to KVQ_ERR_NOMEM (allocation), KVQ_ERR_INVALID (an
     invalid value, e.g. a host pointer where a device one belongs) or KVQ_ERR_UNSUPPORTED
     (no device, a failed launch): kvq_status has no closer word.
*/
#ifndef KVQ_CUDA_H_INCLUDED
#define KVQ_CUDA_H_INCLUDED

#include "kvq.h"
#include <cuda_runtime.h>

#ifndef KVQ_CUDA_API
#define KVQ_CUDA_API extern
#endif

#ifdef __cplusplus
extern "C" {
#endif

typedef struct kvq_cuda_cache kvq_cuda_cache;

/* Most sequences one kvq_cuda_attention_batch launch covers; more are split into launches. */
#define KVQ_CUDA_MAX_BATCH 16

KVQ_CUDA_API kvq_status kvq_cuda_cache_create(kvq_cuda_cache **out, const kvq_config *cfg);
KVQ_CUDA_API void       kvq_cuda_cache_destroy(kvq_cuda_cache *c); /* NULL is a no-op */
KVQ_CUDA_API void       kvq_cuda_cache_reset(kvq_cuda_cache *c);   /* back to 0 tokens */
KVQ_CUDA_API int        kvq_cuda_cache_tokens(const kvq_cuda_cache *c);
KVQ_CUDA_API const kvq_config *kvq_cuda_cache_config(const kvq_cuda_cache *c);
/* Device bytes holding the tokens now stored (as kvq_cache_payload_bytes). */
KVQ_CUDA_API size_t     kvq_cuda_cache_payload_bytes(const kvq_cuda_cache *c);

/* d_k, d_v: device [n_tokens][n_kv_heads][head_dim] floats. Work is queued on stream. */
KVQ_CUDA_API kvq_status kvq_cuda_cache_append(kvq_cuda_cache *c, const float *d_k, const float *d_v,
                                              int n_tokens, cudaStream_t stream);

/* d_q, d_out: device [n_queries][n_q_heads][head_dim]. Asynchronous on stream. */
KVQ_CUDA_API kvq_status kvq_cuda_attention(kvq_cuda_cache *c, const float *d_q, float *d_out,
                                           const kvq_attn_params *p, cudaStream_t stream);
/* The same for n caches (sequences) at once, sharing p; d_q[i], d_out[i] belong to caches[i].
   The caches must be distinct and share head_dim and n_kv_heads (lengths and bit widths may
   differ); one kernel launch per KVQ_CUDA_MAX_BATCH caches. */
KVQ_CUDA_API kvq_status kvq_cuda_attention_batch(kvq_cuda_cache *const *caches, int n,
                                                 const float *const *d_q, float *const *d_out,
                                                 const kvq_attn_params *p, cudaStream_t stream);

/* kvq.h's serialization image of the device cache (kvq_cache_serialized_bytes() of the same
   state). serialize synchronizes stream; deserialize requires the image's config to equal
   the cache's and leaves the cache untouched on any error. */
KVQ_CUDA_API size_t     kvq_cuda_cache_serialized_bytes(const kvq_cuda_cache *c);
KVQ_CUDA_API kvq_status kvq_cuda_cache_serialize(const kvq_cuda_cache *c, void *buf, size_t buf_bytes,
                                                 size_t *written, cudaStream_t stream);
KVQ_CUDA_API kvq_status kvq_cuda_cache_deserialize(kvq_cuda_cache *c, const void *bytes, size_t n_bytes,
                                                   cudaStream_t stream);

/* Copies between a CPU cache and a GPU cache with equal configs. Both synchronize stream. */
KVQ_CUDA_API kvq_status kvq_cuda_cache_upload(kvq_cuda_cache *dst, const kvq_cache *src, cudaStream_t stream);
KVQ_CUDA_API kvq_status kvq_cuda_cache_download(const kvq_cuda_cache *src, kvq_cache *dst, cudaStream_t stream);

#ifdef __cplusplus
}
#endif
#endif /* KVQ_CUDA_H_INCLUDED */

/* ========================================================================== */
#if defined(KVQ_CUDA_IMPLEMENTATION) && !defined(KVQ_CUDA_IMPLEMENTATION_DONE)
#define KVQ_CUDA_IMPLEMENTATION_DONE

#ifndef __CUDACC__
#error "kvq_cuda.h's implementation must be compiled by nvcc (a .cu file)"
#endif
#ifndef KVQ_IMPLEMENTATION_DONE
#error "kvq_cuda.h's implementation needs kvq.h's in the same file: #define KVQ_IMPLEMENTATION first (with KVQ_STATIC if another file implements kvq.h too)"
#endif

#include <cuda_fp16.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

/* ---------------------------------------------------------------------------
   Formats. fp16 conversion is the hardware's round-to-nearest-even (the same
   function kvq.h computes in software); code packing is kvq.h's: code i of a row
   occupies bits [i*bits, (i+1)*bits), little-endian, straddling bytes at 3 bits.
   --------------------------------------------------------------------------- */

#define KVQ__CUDA_NT 128     /* threads per attention / merge block */
#define KVQ__CUDA_TILE 32    /* tokens per attention tile (one per lane) */
#define KVQ__CUDA_HEADS 8    /* most query heads of a GQA group handled by one block */
#define KVQ__CUDA_MAXD 512
#define KVQ__CUDA_ALIGN 256

static __device__ __forceinline__ uint16_t kvq__cu_f2h(float x) {
    return __half_as_ushort(__float2half_rn(x));
}
static __device__ __forceinline__ float kvq__cu_h2f(uint16_t h) {
    return __half2float(__ushort_as_half(h));
}

static __device__ __forceinline__ unsigned kvq__cu_get_code(const uint8_t *row, int i, int bits) {
    unsigned bit = (unsigned)i * (unsigned)bits, off = bit & 7u;
    unsigned v = row[bit >> 3];
    if (off + (unsigned)bits > 8u) v |= (unsigned)row[(bit >> 3) + 1] << 8;
    return (v >> off) & ((1u << bits) - 1u);
}

static __device__ __forceinline__ void kvq__cu_put_code(uint8_t *row, int i, int bits, unsigned code) {
    unsigned bit = (unsigned)i * (unsigned)bits, off = bit & 7u;
    row[bit >> 3] = (uint8_t)(row[bit >> 3] | (code << off));
    if (off + (unsigned)bits > 8u) row[(bit >> 3) + 1] = (uint8_t)(row[(bit >> 3) + 1] | (code >> (8u - off)));
}

/* ---------------------------------------------------------------------------
   Quantize. kvq.h's formula, operation for operation:
     m16 = fp16(lo), s16 = fp16((hi - lo) / (2^b - 1)),
     code = clamp(round_half_even((x - m16) / s16), 0, 2^b - 1); s16 == 0 gives code 0.
   Every operation is an explicit IEEE-rounded intrinsic, so nvcc cannot contract
   anything into an FMA or use an approximate division. lo and hi use kvq.h's exact
   comparisons (a < b ? a : b), not fminf, so -0.0 vs +0.0 resolves the same way.
   (x - m16) / s16 stays far inside int range: |x - m16| <= range + ulp(m16)/2 and
   s16 >= 2^-24, so the float->int conversion never saturates on either side.
   --------------------------------------------------------------------------- */

static __device__ __forceinline__ void kvq__cu_fit(float lo, float hi, int bits, uint16_t *s16, uint16_t *m16,
                                                   float *s, float *m) {
    *m16 = kvq__cu_f2h(lo);
    *s16 = kvq__cu_f2h(__fdiv_rn(__fsub_rn(hi, lo), (float)((1 << bits) - 1)));
    *m = kvq__cu_h2f(*m16);
    *s = kvq__cu_h2f(*s16);
}

static __device__ __forceinline__ unsigned kvq__cu_quantize_one(float x, float m, float s, int bits) {
    int code;
    if (s == 0.0f) return 0;
    code = __float2int_rn(__fdiv_rn(__fsub_rn(x, m), s)); /* round half to even */
    if (code < 0) code = 0;
    if (code > (1 << bits) - 1) code = (1 << bits) - 1;
    return (unsigned)code;
}

/* What the device kernels need to know about one cache. */
typedef struct kvq__cuda_view {
    uint16_t *sink_k, *sink_v, *vparams, *ring_k, *ring_v;
    uint8_t *kblocks, *vcodes;
    uint16_t *ktparams;  /* keys per token (key_axis): records like values', [H][max_vquant] */
    uint8_t *ktcodes;
    uint8_t *side;       /* salient side store: [H][max_kblocks][n_salient] entries of side_bytes */
    float *sal_score;    /* [H][kcap] attention received by waiting keys (salient caches) */
    uint32_t *sal_seen;  /* [H][kcap] queries that saw them */
    const float *q;
    float *out, *part;
    float *ring_raw;     /* attention with tracking: raw scores of waiting keys [row][kcap], else NULL */
    float *row_ml;       /* attention with tracking: merged (max, sum) per row */
    int D, H, S, G, kbits, vbits, ng;
    int n_tokens, nkb, nvq, max_kblocks, max_vquant, kcap, vcap;
    int kblock_bytes, vparam_u16, vcode_bytes;
    int n_salient, side_bytes, sal_bits, sal_policy;
    int key_tokens, kt_u16, ktcode_bytes; /* keys per token: flag, record layout (n_ktok = nvq) */
    int n_chunks, chunk;
} kvq__cuda_view;

typedef struct kvq__cuda_batch {
    kvq__cuda_view v[KVQ_CUDA_MAX_BATCH];
    int n_q_heads, n_queries, n_slices;
    float scale;
} kvq__cuda_batch;
/* a kernel parameter: within the 4 KB every CUDA version takes */
static_assert(sizeof(kvq__cuda_batch) <= 4096, "kvq__cuda_batch outgrew the kernel parameter space");

/* One append, as the host planned it: tokens [n_old, n_old + n) arrive in k/v. */
typedef struct kvq__cuda_append {
    kvq__cuda_view c;
    const float *k, *v;
    int n, n_old, after_old, nkb_old, nkb_new, nvq_old, nvq_new;
} kvq__cuda_append;

/* Key row of position pos (past the sinks) as floats: from the ring if it was stored by an
   earlier append, else from this append's input (rounded to fp16 exactly as the ring would). */
static __device__ __forceinline__ float kvq__cu_key_at(const kvq__cuda_append &a, int h, int pos, int ch) {
    const kvq__cuda_view &c = a.c;
    if (pos < a.after_old) return kvq__cu_h2f(c.ring_k[((size_t)h * c.kcap + (size_t)(pos % c.kcap)) * c.D + ch]);
    return kvq__cu_h2f(kvq__cu_f2h(a.k[((size_t)(pos + c.S - a.n_old) * c.H + h) * c.D + ch]));
}
static __device__ __forceinline__ float kvq__cu_value_at(const kvq__cuda_append &a, int h, int pos, int ch) {
    const kvq__cuda_view &c = a.c;
    if (pos < a.after_old) return kvq__cu_h2f(c.ring_v[((size_t)h * c.vcap + (size_t)(pos % c.vcap)) * c.D + ch]);
    return kvq__cu_h2f(kvq__cu_f2h(a.v[((size_t)(pos + c.S - a.n_old) * c.H + h) * c.D + ch]));
}

/* Finite and within fp16 range, as kvq.h's append requires: sets *bad on the first failure. */
__global__ void kvq__cu_check_kernel(const float *k, const float *v, size_t n, int *bad) {
    size_t i;
    for (i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x) {
        float a = k[i], b = v[i];
        if (!(a >= -65504.0f && a <= 65504.0f) || !(b >= -65504.0f && b <= 65504.0f)) *bad = 1;
    }
}

/* KVQ_ROTATE_HADAMARD: every row of L2 norm <= 65504, so it stays in fp16 range rotated
   (kvq__rotates_in_fp16). The same double sum in the same order: (double)x * x is exact
   (24 x 24 significant bits), so a fused multiply-add cannot change it either. */
__global__ void kvq__cu_norm_check_kernel(const float *k, const float *v, size_t rows, int D, int *bad) {
    size_t r;
    for (r = (size_t)blockIdx.x * blockDim.x + threadIdx.x; r < rows; r += (size_t)gridDim.x * blockDim.x) {
        double sk = 0.0, sv = 0.0;
        int i;
        for (i = 0; i < D; i++) {
            double a = (double)k[r * D + i], b = (double)v[r * D + i];
            sk += a * a;
            sv += b * b;
        }
        if (sk > 65504.0 * 65504.0 || sv > 65504.0 * 65504.0) *bad = 1;
    }
}

/* ---------------------------------------------------------------------------
   Salient tokens (kvq.h's kvq__store_salient, once per key block leaving the window).
   One thread per (head, block) does kvq.h's operations in kvq.h's order: each token's
   score (tracked attention / queries that saw it, or the range gain when no query saw
   any token of the block, or with KVQ_SALIENT_ERROR), the top n_salient (ties to the
   older token), then each picked token's K and V row into its side-store entry at
   salient_bits, entries in token order. Runs once per G tokens, so it is kept simple.
   --------------------------------------------------------------------------- */

static __device__ __forceinline__ uint8_t *kvq__cu_side_entry(const kvq__cuda_view &c, int h, int b, int j) {
    return c.side + (((size_t)h * c.max_kblocks + b) * c.n_salient + j) * (size_t)c.side_bytes;
}

/* kvq__range_gain: per channel, the gap a token opens alone at the top or bottom, over the range. */
static __device__ void kvq__cu_range_gain(const kvq__cuda_append &a, int h, int b, float *gain) {
    const int D = a.c.D, G = a.c.G;
    int ch, t;
    for (t = 0; t < G; t++) gain[t] = 0.0f;
    for (ch = 0; ch < D; ch++) {
        float hi = -INFINITY, hi2 = -INFINITY, lo = INFINITY, lo2 = INFINITY;
        int thi = 0, tlo = 0;
        for (t = 0; t < G; t++) {
            float x = kvq__cu_key_at(a, h, b * G + t, ch);
            if (x > hi) { hi2 = hi; hi = x; thi = t; } else if (x > hi2) hi2 = x;
            if (x < lo) { lo2 = lo; lo = x; tlo = t; } else if (x < lo2) lo2 = x;
        }
        if (hi > lo) {
            gain[thi] = __fadd_rn(gain[thi], __fdiv_rn(__fsub_rn(hi, hi2), __fsub_rn(hi, lo)));
            gain[tlo] = __fadd_rn(gain[tlo], __fdiv_rn(__fsub_rn(lo2, lo), __fsub_rn(hi, lo)));
        }
    }
}

/* kvq__select_salient: mask[t] = 1 for the n_salient picked tokens of block b of head h.
   Tokens of this append count as unseen (kvq.h zeroes a key's counts when it arrives). */
static __device__ void kvq__cu_select_salient(const kvq__cuda_append &a, int h, int b, uint8_t *mask) {
    const kvq__cuda_view &c = a.c;
    const int G = c.G;
    const size_t slot0 = (size_t)h * c.kcap + (size_t)((b * G) % c.kcap); /* G slots in a row */
    float score[128];
    int t, j, seen_any = 0;
    if (c.sal_policy == KVQ_SALIENT_ATTENTION)
        for (t = 0; t < G; t++) {
            uint32_t seen = b * G + t < a.after_old ? c.sal_seen[slot0 + t] : 0u;
            score[t] = seen ? __fdiv_rn(c.sal_score[slot0 + t], (float)seen) : -1.0f;
            seen_any |= seen != 0;
        }
    if (!seen_any) kvq__cu_range_gain(a, h, b, score);
    for (t = 0; t < G; t++) mask[t] = 0;
    for (j = 0; j < c.n_salient; j++) { /* top n, ties to the older token */
        int best = -1;
        for (t = 0; t < G; t++)
            if (!mask[t] && (best < 0 || score[t] > score[best])) best = t;
        mask[best] = 1;
    }
}

/* kvq__side_put: the key (which 0) or value (1) row of token pos into entry e at salient_bits:
   16 bits, the fp16 row; 8 bits, kvq.h's per-token quantizer over groups of G channels
   (scale[ng], min[ng] after the u16 index, K's then V's; then K codes[D], V codes[D]). */
static __device__ void kvq__cu_side_put(const kvq__cuda_append &a, uint8_t *e, int which, int h, int pos) {
    const kvq__cuda_view &c = a.c;
    const int D = c.D, G = c.G, ng = c.ng;
    uint16_t *par = (uint16_t *)(e + 2) + (size_t)which * 2 * ng;
    uint8_t *codes = e + 2 + 8 * (size_t)ng + (size_t)which * D;
    int g, i;
    if (c.sal_bits == 16) {
        uint16_t *row = (uint16_t *)(e + 2) + (size_t)which * D;
        for (i = 0; i < D; i++)
            row[i] = kvq__cu_f2h(which ? kvq__cu_value_at(a, h, pos, i) : kvq__cu_key_at(a, h, pos, i));
        return;
    }
    for (g = 0; g < ng; g++) {
        const int c0 = g * G, n = D - c0 < G ? D - c0 : G;
        float x[128], lo, hi, s, m;
        uint16_t s16, m16;
        for (i = 0; i < n; i++) x[i] = which ? kvq__cu_value_at(a, h, pos, c0 + i) : kvq__cu_key_at(a, h, pos, c0 + i);
        lo = hi = x[0];
        for (i = 1; i < n; i++) {
            lo = x[i] < lo ? x[i] : lo;
            hi = x[i] > hi ? x[i] : hi;
        }
        kvq__cu_fit(lo, hi, 8, &s16, &m16, &s, &m);
        par[g] = s16;
        par[ng + g] = m16;
        for (i = 0; i < n; i++) codes[c0 + i] = (uint8_t)kvq__cu_quantize_one(x[i], m, s, 8);
    }
}

/* Blocks [nkb_old, nkb_new) of every head: picks the salient tokens and fills their entries
   (u16 token index in the block, little-endian, then K and V). One thread per (head, block). */
__global__ void kvq__cu_salient_kernel(kvq__cuda_append a) {
    const kvq__cuda_view &c = a.c;
    const int nb = a.nkb_new - a.nkb_old;
    size_t total = (size_t)c.H * nb, idx;
    for (idx = (size_t)blockIdx.x * blockDim.x + threadIdx.x; idx < total; idx += (size_t)gridDim.x * blockDim.x) {
        int b = a.nkb_old + (int)(idx % nb), h = (int)(idx / nb), t, j = 0;
        uint8_t mask[128];
        kvq__cu_select_salient(a, h, b, mask);
        for (t = 0; t < c.G; t++) {
            uint8_t *e;
            if (!mask[t]) continue;
            e = kvq__cu_side_entry(c, h, b, j++);
            e[0] = (uint8_t)t;
            e[1] = 0;
            kvq__cu_side_put(a, e, 0, h, b * c.G + t);
            kvq__cu_side_put(a, e, 1, h, b * c.G + t);
        }
    }
}

/* mask[t] = 1 for the tokens of block b of head h that the side store holds. */
static __device__ void kvq__cu_block_mask(const kvq__cuda_view &c, int h, int b, uint8_t *mask) {
    int t, j;
    for (t = 0; t < c.G; t++) mask[t] = 0;
    for (j = 0; j < c.n_salient; j++) {
        const uint8_t *e = kvq__cu_side_entry(c, h, b, j);
        mask[e[0] | e[1] << 8] = 1;
    }
}

/* Key blocks [nkb_old, nkb_new) of every head: one thread per (head, block, channel).
   Salient caches leave the side store's tokens out (kvq__quantize_key_block_masked): they
   take no part in the min/max, which starts from +-inf there, and their codes stay 0. */
__global__ void kvq__cu_key_blocks_kernel(kvq__cuda_append a) {
    const kvq__cuda_view &c = a.c;
    const int D = c.D, G = c.G, bits = c.kbits, nb = a.nkb_new - a.nkb_old;
    size_t total = (size_t)c.H * nb * D, idx;
    for (idx = (size_t)blockIdx.x * blockDim.x + threadIdx.x; idx < total; idx += (size_t)gridDim.x * blockDim.x) {
        int ch = (int)(idx % D), b = a.nkb_old + (int)((idx / D) % nb), h = (int)(idx / ((size_t)D * nb));
        uint8_t *blk = c.kblocks + ((size_t)h * c.max_kblocks + b) * c.kblock_bytes;
        float x[128], lo, hi, s, m;
        uint16_t s16, m16;
        uint8_t row[128], mask[128];
        int t, row_bytes = G * bits / 8;
        if (bits == 16) { /* salient or not, the block keeps every row as it is */
            uint16_t *rows = (uint16_t *)blk;
            for (t = 0; t < G; t++) rows[(size_t)t * D + ch] = kvq__cu_f2h(kvq__cu_key_at(a, h, b * G + t, ch));
            continue;
        }
        for (t = 0; t < G; t++) x[t] = kvq__cu_key_at(a, h, b * G + t, ch);
        if (c.n_salient) {
            kvq__cu_block_mask(c, h, b, mask);
            lo = INFINITY;
            hi = -INFINITY;
            for (t = 0; t < G; t++)
                if (!mask[t]) {
                    lo = x[t] < lo ? x[t] : lo;
                    hi = x[t] > hi ? x[t] : hi;
                }
        } else {
            for (t = 0; t < G; t++) mask[t] = 0;
            lo = hi = x[0];
            for (t = 1; t < G; t++) {
                lo = x[t] < lo ? x[t] : lo;
                hi = x[t] > hi ? x[t] : hi;
            }
        }
        kvq__cu_fit(lo, hi, bits, &s16, &m16, &s, &m);
        ((uint16_t *)blk)[ch] = s16;
        ((uint16_t *)blk)[D + ch] = m16;
        for (t = 0; t < row_bytes; t++) row[t] = 0;
        for (t = 0; t < G; t++)
            if (!mask[t]) kvq__cu_put_code(row, t, bits, kvq__cu_quantize_one(x[t], m, s, bits));
        {
            uint8_t *dst = blk + 4 * (size_t)D + (size_t)row_bytes * ch;
            for (t = 0; t < row_bytes; t++) dst[t] = row[t];
        }
    }
}

/* Per-token records [nvq_old, nvq_new) of every head: values, or (keys = 1) keys stored per
   token, which kvq.h quantizes with the value quantizer and which leave with their values.
   One thread per (head, token, channel group). Groups start at multiples of G channels and
   G*bits/8 is whole bytes (G >= 16; a ragged last group has a multiple of 8 channels), so
   threads never share a code byte. */
__global__ void kvq__cu_records_kernel(kvq__cuda_append a, int keys) {
    const kvq__cuda_view &c = a.c;
    const int D = c.D, G = c.G, bits = keys ? c.kbits : c.vbits, ng = c.ng, nv = a.nvq_new - a.nvq_old;
    const int par_u16 = keys ? c.kt_u16 : c.vparam_u16, code_bytes = keys ? c.ktcode_bytes : c.vcode_bytes;
    uint16_t *params = keys ? c.ktparams : c.vparams;
    size_t total = (size_t)c.H * nv * ng, idx;
    for (idx = (size_t)blockIdx.x * blockDim.x + threadIdx.x; idx < total; idx += (size_t)gridDim.x * blockDim.x) {
        int g = (int)(idx % ng), j = a.nvq_old + (int)((idx / ng) % nv), h = (int)(idx / ((size_t)ng * nv));
        int c0 = g * G, n = D - c0 < G ? D - c0 : G, i;
        size_t rec = (size_t)h * c.max_vquant + j;
        uint8_t *codes = (keys ? c.ktcodes : c.vcodes) + rec * code_bytes;
        float x[128], lo, hi, s, m;
        uint16_t s16, m16;
        uint8_t row[128];
        for (i = 0; i < n; i++) x[i] = keys ? kvq__cu_key_at(a, h, j, c0 + i) : kvq__cu_value_at(a, h, j, c0 + i);
        if (bits == 16) {
            for (i = 0; i < n; i++) ((uint16_t *)codes)[c0 + i] = kvq__cu_f2h(x[i]);
            continue;
        }
        lo = hi = x[0];
        for (i = 1; i < n; i++) {
            lo = x[i] < lo ? x[i] : lo;
            hi = x[i] > hi ? x[i] : hi;
        }
        kvq__cu_fit(lo, hi, bits, &s16, &m16, &s, &m);
        params[rec * par_u16 + g] = s16;
        params[rec * par_u16 + ng + g] = m16;
        for (i = 0; i < n * bits / 8; i++) row[i] = 0;
        for (i = 0; i < n; i++) kvq__cu_put_code(row, i, bits, kvq__cu_quantize_one(x[i], m, s, bits));
        for (i = 0; i < n * bits / 8; i++) codes[(size_t)c0 * bits / 8 + i] = row[i];
    }
}

/* Stores this append's tokens that stay in fp16: sinks, and ring rows still waiting at the
   end of the append (the others were quantized straight from the input above). */
__global__ void kvq__cu_store_kernel(kvq__cuda_append a) {
    const kvq__cuda_view &c = a.c;
    const int D = c.D, H = c.H, S = c.S;
    size_t total = (size_t)a.n * H * D, idx;
    for (idx = (size_t)blockIdx.x * blockDim.x + threadIdx.x; idx < total; idx += (size_t)gridDim.x * blockDim.x) {
        int ch = (int)(idx % D), h = (int)((idx / D) % H), t = a.n_old + (int)(idx / ((size_t)D * H)), pos = t - S;
        if (t < S) {
            c.sink_k[((size_t)h * S + t) * D + ch] = kvq__cu_f2h(a.k[idx]);
            c.sink_v[((size_t)h * S + t) * D + ch] = kvq__cu_f2h(a.v[idx]);
            continue;
        }
        if (pos >= (c.key_tokens ? a.nvq_new : a.nkb_new * c.G))
            c.ring_k[((size_t)h * c.kcap + (size_t)(pos % c.kcap)) * D + ch] = kvq__cu_f2h(a.k[idx]);
        if (c.n_salient && ch == 0 && pos >= a.nkb_new * c.G) { /* a new waiting key has received no attention yet */
            c.sal_score[(size_t)h * c.kcap + (size_t)(pos % c.kcap)] = 0.0f;
            c.sal_seen[(size_t)h * c.kcap + (size_t)(pos % c.kcap)] = 0u;
        }
        if (pos >= a.nvq_new) c.ring_v[((size_t)h * c.vcap + (size_t)(pos % c.vcap)) * D + ch] = kvq__cu_f2h(a.v[idx]);
    }
}

/* ---------------------------------------------------------------------------
   Rotate. KVQ_ROTATE_HADAMARD exactly as kvq.h does it: the plan (random signs,
   Kronecker or block-diagonal pieces, Paley matrices) comes from kvq.h's own
   kvq__rotation_init, and each row is transformed by one thread with kvq.h's
   operations in kvq.h's order (sign, Paley rows summed left to right, Walsh-Hadamard
   butterflies, 1/sqrt(len)), every one an explicit IEEE-rounded intrinsic, so rotated
   rows, and the fp16 bytes made from them, are the ones the CPU makes.
   --------------------------------------------------------------------------- */

typedef struct kvq__cu_rot {
    int n, n_pieces;
    int off[10], pow2[10], m[10];
    float sign[KVQ__CUDA_MAXD];
    signed char paley[3][28 * 28]; /* orders 12, 20, 28: entry (i, j) at i * m + j */
} kvq__cu_rot;

static __device__ void kvq__cu_rotate(const kvq__cu_rot *r, float *x, int inverse) {
    int p, i, j;
    if (!inverse)
        for (i = 0; i < r->n; i++) x[i] = __fmul_rn(x[i], r->sign[i]);
    for (p = 0; p < r->n_pieces; p++) {
        float *xp = x + r->off[p];
        const int m = r->m[p], pow2 = r->pow2[p], len = pow2 * m;
        const float norm = __fdiv_rn(1.0f, __fsqrt_rn((float)len));
        int len2, a, c;
        if (m > 1) {
            const signed char *P = r->paley[m == 12 ? 0 : m == 20 ? 1 : 2];
            float y[28];
            for (a = 0; a < pow2; a++) {
                float *row = xp + a * m;
                for (i = 0; i < m; i++) {
                    float acc = 0.0f;
                    for (j = 0; j < m; j++)
                        acc = __fadd_rn(acc, __fmul_rn((float)(inverse ? P[j * m + i] : P[i * m + j]), row[j]));
                    y[i] = acc;
                }
                for (i = 0; i < m; i++) row[i] = y[i];
            }
        }
        for (c = 0; c < m; c++) /* H_2^a along the other axis: stride m */
            for (len2 = 1; len2 < pow2; len2 *= 2)
                for (i = 0; i < pow2; i += 2 * len2)
                    for (j = i; j < i + len2; j++) {
                        float u = xp[j * m + c], w = xp[(j + len2) * m + c];
                        xp[j * m + c] = __fadd_rn(u, w);
                        xp[(j + len2) * m + c] = __fsub_rn(u, w);
                    }
        for (i = 0; i < len; i++) xp[i] = __fmul_rn(xp[i], norm);
    }
    if (inverse)
        for (i = 0; i < r->n; i++) x[i] = __fmul_rn(x[i], r->sign[i]);
}

/* dst[row] = M src[row] (or M^T), rows of r->n floats; dst may be src. One thread per row. */
__global__ void kvq__cu_rotate_kernel(const float *src, float *dst, size_t rows, const kvq__cu_rot *r, int inverse) {
    size_t row;
    for (row = (size_t)blockIdx.x * blockDim.x + threadIdx.x; row < rows; row += (size_t)gridDim.x * blockDim.x) {
        float x[KVQ__CUDA_MAXD];
        const int n = r->n;
        int i;
        for (i = 0; i < n; i++) x[i] = src[row * n + i];
        kvq__cu_rotate(r, x, inverse);
        for (i = 0; i < n; i++) dst[row * n + i] = x[i];
    }
}

/* ---------------------------------------------------------------------------
   Attention (FlashDecoding). Grid: x = (query, KV head, slice of <= 8 query heads of its
   group), y = token chunk, z = sequence. A block walks its chunk in tiles of 32 tokens:
     scores: lane = token, the 4 warps split the channels in runs of 8; every key is
             dequantized once (m + s*code from a block or a per-token record, or an fp16
             row) and dotted with all the group's query heads (held in shared memory,
             pre-scaled), partial sums reduced through shared memory;
     softmax: per head, running max / sum with rescaling (FlashAttention);
     values: thread = channel(s), dequantize once, accumulate for every head.
   Each block leaves (max, sum, acc[D]) per query head; the merge kernel combines chunks.
   Salient tokens of quantized blocks (kvq.h's patch-up, done inline): their key comes from
   the side store (the per-token record loop, taken only by those lanes), and their softmax weight
   goes to the side-store value, in a pass before the codes pass, which then sees weight 0.
   Only tiles that hold quantized-block tokens of a salient cache do any of this (a branch
   uniform per block). With tracking (KVQ_SALIENT_ATTENTION), the raw scores of waiting keys
   go to a scratch row per query head; after the merge, a small kernel turns them into
   kvq.h's salience scores.
   --------------------------------------------------------------------------- */

/* Where token t's key lives: an fp16 row (16-byte aligned), a quantized block (blk, tt), or a
   per-token record (par, codes at bits: a key stored per token, or a salient token's entry in
   the side store, sal its index among the block's entries, else -1). */
typedef struct kvq__cu_keyref {
    const uint16_t *row, *par;
    const uint8_t *blk, *codes;
    int tt, sal, bits;
} kvq__cu_keyref;

/* Index of token tt among the side-store entries of block b of head h, or -1. */
static __device__ __forceinline__ int kvq__cu_find_salient(const kvq__cuda_view &v, int h, int b, int tt) {
    int j;
    for (j = 0; j < v.n_salient; j++) {
        const uint8_t *e = kvq__cu_side_entry(v, h, b, j);
        if ((e[0] | e[1] << 8) == tt) return j;
    }
    return -1;
}

/* Channels [c8*8, c8*8 + 8) of a per-token record (kvq.h's kvq__read_token_record): m + s*code
   with the scale and min of the value group (one group holds all 8: groups start at multiples
   of G, a multiple of 8); 16 bits: codes is the fp16 row, read per element (a side-store row
   is only 2-byte aligned). */
static __device__ __forceinline__ void kvq__cu_record_run(const uint16_t *par, const uint8_t *codes, int bits, int G,
                                                          int ng, int c8, float *x) {
    int i;
    if (bits == 16) {
        for (i = 0; i < 8; i++) x[i] = kvq__cu_h2f(((const uint16_t *)codes)[c8 * 8 + i]);
    } else {
        const int g = c8 * 8 / G;
        const float s = kvq__cu_h2f(par[g]), m = kvq__cu_h2f(par[ng + g]);
        for (i = 0; i < 8; i++) x[i] = m + s * (float)kvq__cu_get_code(codes, c8 * 8 + i, bits);
    }
}

/* Channel ch of the value of side-store entry e. */
static __device__ __forceinline__ float kvq__cu_side_value(const kvq__cuda_view &v, const uint8_t *e, int ch) {
    const uint16_t *u = (const uint16_t *)(e + 2);
    if (v.sal_bits == 16) return kvq__cu_h2f(u[v.D + ch]);
    {
        const int ng = v.ng, g = ch / v.G;
        return kvq__cu_h2f(u[3 * ng + g]) + kvq__cu_h2f(u[2 * ng + g]) * (float)e[2 + 8 * (size_t)ng + v.D + ch];
    }
}

static __device__ __forceinline__ kvq__cu_keyref kvq__cu_key_ref(const kvq__cuda_view &v, int h, int t) {
    kvq__cu_keyref r;
    int pos = t - v.S;
    r.row = r.par = 0;
    r.blk = r.codes = 0;
    r.tt = r.bits = 0;
    r.sal = -1;
    if (t < v.S) {
        r.row = v.sink_k + ((size_t)h * v.S + t) * v.D;
    } else if (pos < v.nkb * v.G) {
        const uint8_t *blk = v.kblocks + ((size_t)h * v.max_kblocks + pos / v.G) * v.kblock_bytes;
        if (v.n_salient) r.sal = kvq__cu_find_salient(v, h, pos / v.G, pos % v.G);
        if (r.sal >= 0) { /* K part of the entry: params after the u16 index, codes after V's params */
            const uint8_t *e = kvq__cu_side_entry(v, h, pos / v.G, r.sal);
            r.par = (const uint16_t *)(e + 2);
            r.codes = v.sal_bits == 16 ? e + 2 : e + 2 + 8 * (size_t)v.ng;
            r.bits = v.sal_bits;
        } else if (v.kbits == 16) {
            r.row = (const uint16_t *)blk + (size_t)(pos % v.G) * v.D;
        } else {
            r.blk = blk;
            r.tt = pos % v.G;
        }
    } else if (v.key_tokens && pos < v.nvq) { /* keys per token leave with their values */
        const size_t rec = (size_t)h * v.max_vquant + pos;
        if (v.kbits == 16) {
            r.row = (const uint16_t *)(v.ktcodes + rec * v.ktcode_bytes);
        } else {
            r.par = v.ktparams + rec * v.kt_u16;
            r.codes = v.ktcodes + rec * v.ktcode_bytes;
            r.bits = v.kbits;
        }
    } else {
        r.row = v.ring_k + ((size_t)h * v.kcap + (size_t)(pos % v.kcap)) * v.D;
    }
    return r;
}

/* 8 fp16 from one 16-byte load, unpacked with shifts (no type punning of the vector). */
static __device__ __forceinline__ void kvq__cu_h8(uint4 u, float *f) {
    const unsigned w[4] = {u.x, u.y, u.z, u.w};
    int e;
#pragma unroll
    for (e = 0; e < 4; e++) {
        f[2 * e] = kvq__cu_h2f((uint16_t)(w[e] & 0xffffu));
        f[2 * e + 1] = kvq__cu_h2f((uint16_t)(w[e] >> 16));
    }
}

/* sc[j] += q_j[c8*8 .. c8*8+8) . kx for the block's query heads j < nh (q in shared memory). */
template <int NH>
static __device__ __forceinline__ void kvq__cu_dot8(const float *q_s, int D, int c8, int nh, const float *kx, float *sc) {
    int j;
#pragma unroll
    for (j = 0; j < NH; j++) {
        if (j < nh) {
            const float4 *qa = (const float4 *)(q_s + j * D + c8 * 8);
            float4 q0 = qa[0], q1 = qa[1];
            sc[j] += q0.x * kx[0] + q0.y * kx[1] + q0.z * kx[2] + q0.w * kx[3] + q1.x * kx[4] + q1.y * kx[5] +
                     q1.z * kx[6] + q1.w * kx[7];
        }
    }
}

/* NH: query heads per block (1, 2, 4, 8); KCH: channels per thread in the value phase (ceil(D / 128)).
   Both compile-time, so the accumulators are exactly the registers a shape needs. */
template <int NH, int KCH>
__global__ void __launch_bounds__(KVQ__CUDA_NT) kvq__cu_attn_kernel(const __grid_constant__ kvq__cuda_batch b) {
    __shared__ __align__(16) float q_s[KVQ__CUDA_HEADS * KVQ__CUDA_MAXD];
    __shared__ float part_s[KVQ__CUDA_NT / 32][KVQ__CUDA_HEADS][KVQ__CUDA_TILE];
    __shared__ __align__(16) float p_s[KVQ__CUDA_HEADS][KVQ__CUDA_TILE];
    __shared__ float m_s[KVQ__CUDA_HEADS], l_s[KVQ__CUDA_HEADS], corr_s[KVQ__CUDA_HEADS];
    __shared__ float psal_s[KVQ__CUDA_HEADS][KVQ__CUDA_TILE]; /* weights of salient tokens */
    __shared__ int sal_s[KVQ__CUDA_TILE];                    /* index among its block's entries, or -1 */
    const kvq__cuda_view &v = b.v[blockIdx.z];
    const int D = v.D, tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const int chunk = blockIdx.y, group = b.n_q_heads / v.H;
    int unit = blockIdx.x, i, h, sl, qh0, nh, limit, t_begin, t_end, t0, j, k;
    float acc[NH][KCH];
    if (chunk >= v.n_chunks) return;
    i = unit / (v.H * b.n_slices);
    if (i >= b.n_queries) return; /* (the grid is exact; a guard) */
    unit -= i * v.H * b.n_slices;
    h = unit / b.n_slices;
    sl = unit - h * b.n_slices;
    qh0 = h * group + sl * NH;
    nh = group - sl * NH < NH ? group - sl * NH : NH;
    limit = v.n_tokens - b.n_queries + i + 1; /* causal: query i sees tokens <= its position */
    t_begin = chunk * v.chunk;
    t_end = t_begin + v.chunk < limit ? t_begin + v.chunk : limit;

    for (k = tid; k < nh * D; k += KVQ__CUDA_NT)
        q_s[k] = v.q[((size_t)i * b.n_q_heads + qh0 + k / D) * D + k % D] * b.scale;
    if (tid < KVQ__CUDA_HEADS) { m_s[tid] = -INFINITY; l_s[tid] = 0.0f; }
#pragma unroll
    for (j = 0; j < NH; j++)
#pragma unroll
        for (k = 0; k < KCH; k++) acc[j][k] = 0.0f;
    __syncthreads();

    for (t0 = t_begin; t0 < t_end; t0 += KVQ__CUDA_TILE) {
        const int t = t0 + lane, valid = t < t_end, n8 = D / 8;
        const int n = t_end - t0 < KVQ__CUDA_TILE ? t_end - t0 : KVQ__CUDA_TILE;
        const int first_wait = v.S + v.nkb * v.G; /* first key still in the ring */
        /* uniform per block: the tile holds quantized-block tokens of a salient cache, or
           waiting keys whose scores are tracked */
        const int sal_tile = v.n_salient && (t0 > v.S ? t0 : v.S) < (t0 + n < first_wait ? t0 + n : first_wait);
        const int track_tile = v.ring_raw && t0 + n > first_wait;
        float sc[NH];
        int c8, sal = -1;
#pragma unroll
        for (j = 0; j < NH; j++) sc[j] = 0.0f;
        /* scores: lane = token, warps split the channel runs */
        if (valid) {
            kvq__cu_keyref r = kvq__cu_key_ref(v, h, t);
            const int G = v.G, bits = v.kbits, row_bytes = G * bits / 8;
            /* a loop per key form, not one with a branch inside, so each unrolls and keeps loads in flight */
            if (r.row) {
#pragma unroll 2
                for (c8 = warp; c8 < n8; c8 += KVQ__CUDA_NT / 32) {
                    float kx[8];
                    kvq__cu_h8(*(const uint4 *)(r.row + c8 * 8), kx);
                    kvq__cu_dot8<NH>(q_s, D, c8, nh, kx, sc);
                }
            } else if (r.codes) { /* a per-token record: a key stored per token, or a salient token */
                sal = r.sal;
                for (c8 = warp; c8 < n8; c8 += KVQ__CUDA_NT / 32) {
                    float kx[8];
                    kvq__cu_record_run(r.par, r.codes, r.bits, v.G, v.ng, c8, kx);
                    kvq__cu_dot8<NH>(q_s, D, c8, nh, kx, sc);
                }
            } else {
#pragma unroll 2
                for (c8 = warp; c8 < n8; c8 += KVQ__CUDA_NT / 32) {
                    float kx[8], sf[8], mf[8];
                    const uint8_t *codes = r.blk + 4 * (size_t)D + (size_t)row_bytes * c8 * 8;
                    int e;
                    kvq__cu_h8(*(const uint4 *)(r.blk + (size_t)c8 * 16), sf);
                    kvq__cu_h8(*(const uint4 *)(r.blk + 2 * (size_t)D + (size_t)c8 * 16), mf);
#pragma unroll
                    for (e = 0; e < 8; e++)
                        kx[e] = mf[e] + sf[e] * (float)kvq__cu_get_code(codes + (size_t)row_bytes * e, r.tt, bits);
                    kvq__cu_dot8<NH>(q_s, D, c8, nh, kx, sc);
                }
            }
        }
#pragma unroll
        for (j = 0; j < NH; j++) part_s[warp][j][lane] = sc[j];
        if (sal_tile && warp == 0) sal_s[lane] = sal;
        __syncthreads();
        /* softmax: warp w owns heads w, w + 4 */
        for (j = warp; j < nh; j += KVQ__CUDA_NT / 32) {
            float s = -INFINITY, mx, m_new, p, sum;
            int w, o;
            if (valid) {
                s = 0.0f;
                for (w = 0; w < KVQ__CUDA_NT / 32; w++) s += part_s[w][j][lane];
            }
            mx = s;
            for (o = 16; o; o >>= 1) mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, o));
            m_new = fmaxf(m_s[j], mx); /* finite: the tile has a valid token */
            p = valid ? expf(s - m_new) : 0.0f;
            sum = p;
            for (o = 16; o; o >>= 1) sum += __shfl_xor_sync(0xffffffffu, sum, o);
            if (sal_tile && sal_s[lane] >= 0) { /* spent on the side-store value below */
                psal_s[j][lane] = p;
                p = 0.0f;
            }
            p_s[j][lane] = p;
            if (track_tile && valid && t >= first_wait)
                v.ring_raw[((size_t)i * b.n_q_heads + qh0 + j) * v.kcap + (t - first_wait)] = s;
            if (lane == 0) {
                float corr = expf(m_s[j] - m_new); /* exp(-inf) = 0 on the first tile */
                corr_s[j] = corr;
                l_s[j] = l_s[j] * corr + sum;
                m_s[j] = m_new;
            }
        }
        __syncthreads();
        /* values: thread = channels tid, tid + 128, ... */
        {
            const int S = v.S, G = v.G, bits = v.vbits, ng = v.ng;
            float corr[NH];
            int tt;
#pragma unroll
            for (j = 0; j < NH; j++) corr[j] = j < nh ? corr_s[j] : 0.0f;
#pragma unroll
            for (j = 0; j < NH; j++)
#pragma unroll
                for (k = 0; k < KCH; k++) acc[j][k] *= corr[j];
            if (sal_tile) /* salient tokens: their weight on the side-store value */
                for (tt = 0; tt < n; tt++) {
                    const uint8_t *e;
                    if (sal_s[tt] < 0) continue;
                    e = kvq__cu_side_entry(v, h, (t0 + tt - S) / G, sal_s[tt]);
#pragma unroll
                    for (k = 0; k < KCH; k++) {
                        const int ch = tid + k * KVQ__CUDA_NT;
                        if (ch < D) {
                            const float x = kvq__cu_side_value(v, e, ch);
#pragma unroll
                            for (j = 0; j < NH; j++)
                                if (j < nh) acc[j][k] += psal_s[j][tt] * x;
                        }
                    }
                }
            /* four tokens at a time: four independent loads in flight per thread, and one
               float4 of softmax weights per head (tokens past n have weight 0 and value 0) */
            for (tt = 0; tt < n; tt += 4) {
                float vx[4][KCH];
                int u;
#pragma unroll
                for (u = 0; u < 4; u++) {
                    const int tk = t0 + tt + u, pos = tk - S;
                    const uint16_t *row = 0, *par = 0;
                    const uint8_t *codes = 0;
                    if (tt + u >= n) {
                        row = 0;
                    } else if (tk < S) {
                        row = v.sink_v + ((size_t)h * S + tk) * D;
                    } else if (pos >= v.nvq) {
                        row = v.ring_v + ((size_t)h * v.vcap + (size_t)(pos % v.vcap)) * D;
                    } else {
                        size_t rec = (size_t)h * v.max_vquant + pos;
                        codes = v.vcodes + rec * v.vcode_bytes;
                        if (bits == 16) row = (const uint16_t *)codes;
                        else par = v.vparams + rec * v.vparam_u16;
                    }
#pragma unroll
                    for (k = 0; k < KCH; k++) {
                        int ch = tid + k * KVQ__CUDA_NT;
                        vx[u][k] = 0.0f;
                        if (ch < D) {
                            if (row) {
                                vx[u][k] = kvq__cu_h2f(row[ch]);
                            } else if (par) {
                                int g = ch / G;
                                vx[u][k] = kvq__cu_h2f(par[ng + g]) +
                                           kvq__cu_h2f(par[g]) * (float)kvq__cu_get_code(codes, ch, bits);
                            }
                        }
                    }
                }
#pragma unroll
                for (j = 0; j < NH; j++) {
                    if (j < nh) {
                        const float4 p = *(const float4 *)&p_s[j][tt];
#pragma unroll
                        for (k = 0; k < KCH; k++)
                            acc[j][k] += p.x * vx[0][k] + p.y * vx[1][k] + p.z * vx[2][k] + p.w * vx[3][k];
                    }
                }
            }
        }
        __syncthreads(); /* part_s and p_s are reused by the next tile */
    }

    /* partial state per query head: [row][chunk] (max, sum, acc[D]) */
    for (j = 0; j < nh; j++) {
        size_t row = (size_t)i * b.n_q_heads + qh0 + j;
        float *st = v.part + (row * v.n_chunks + chunk) * (size_t)(D + 2);
        if (tid == 0) {
            st[0] = t_begin < t_end ? m_s[j] : -INFINITY;
            st[1] = t_begin < t_end ? l_s[j] : 0.0f;
        }
    }
#pragma unroll
    for (j = 0; j < NH; j++) { /* unrolled, so acc stays in registers */
        if (j < nh) {
            size_t row = (size_t)i * b.n_q_heads + qh0 + j;
            float *st = v.part + (row * v.n_chunks + chunk) * (size_t)(D + 2);
#pragma unroll
            for (k = 0; k < KCH; k++) {
                int ch = tid + k * KVQ__CUDA_NT;
                if (ch < D) st[2 + ch] = acc[j][k];
            }
        }
    }
}

/* Combines the chunks of one (query, query head) row: out = sum_c e^(m_c - M) acc_c / sum_c e^(m_c - M) l_c. */
__global__ void __launch_bounds__(KVQ__CUDA_NT) kvq__cu_merge_kernel(const __grid_constant__ kvq__cuda_batch b) {
    const kvq__cuda_view &v = b.v[blockIdx.y];
    const size_t row = blockIdx.x, stride = (size_t)v.D + 2;
    const float *st = v.part + row * v.n_chunks * stride;
    float m = -INFINITY, l = 0.0f;
    int c, ch;
    if (row >= (size_t)b.n_queries * b.n_q_heads) return;
    for (c = 0; c < v.n_chunks; c++)
        if (st[c * stride + 1] > 0.0f) m = fmaxf(m, st[c * stride]);
    for (c = 0; c < v.n_chunks; c++)
        if (st[c * stride + 1] > 0.0f) l += expf(st[c * stride] - m) * st[c * stride + 1];
    for (ch = threadIdx.x; ch < v.D; ch += blockDim.x) {
        float o = 0.0f;
        for (c = 0; c < v.n_chunks; c++)
            if (st[c * stride + 1] > 0.0f) o += expf(st[c * stride] - m) * st[c * stride + 2 + ch];
        v.out[row * v.D + ch] = o / l;
    }
    if (v.row_ml && threadIdx.x == 0) { /* the row's final softmax, for tracking */
        v.row_ml[2 * row] = m;
        v.row_ml[2 * row + 1] = l;
    }
}

/* ZipCache's score of the keys still waiting (kvq__track_salience): each query that saw
   waiting key u adds, over the query heads of u's KV group, exp(s - m) / l with s its raw
   score and (m, l) the merged row's, in kvq.h's order (queries, then runs of up to 8 heads,
   each run summed first), and counts once. One thread per (KV head, waiting key); y = sequence. */
__global__ void kvq__cu_track_kernel(const __grid_constant__ kvq__cuda_batch b) {
    const kvq__cuda_view &v = b.v[blockIdx.y];
    const int group = b.n_q_heads / v.H, after = v.n_tokens > v.S ? v.n_tokens - v.S : 0;
    const int waiting = after - v.nkb * v.G, first_wait = v.S + v.nkb * v.G;
    const size_t idx = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    size_t slot;
    float score;
    uint32_t seen;
    int h, u, i, qh, j;
    if (!v.ring_raw || waiting < 1 || idx >= (size_t)v.H * waiting) return;
    h = (int)(idx / waiting);
    u = (int)(idx % waiting);
    slot = (size_t)h * v.kcap + (size_t)((v.nkb * v.G + u) % v.kcap);
    score = v.sal_score[slot];
    seen = v.sal_seen[slot];
    for (i = 0; i < b.n_queries; i++) {
        if (first_wait + u >= v.n_tokens - b.n_queries + i + 1) continue; /* causal: not seen */
        for (qh = h * group; qh < (h + 1) * group; qh += KVQ__CUDA_HEADS) {
            const int qe = qh + KVQ__CUDA_HEADS < (h + 1) * group ? qh + KVQ__CUDA_HEADS : (h + 1) * group;
            float add = 0.0f;
            for (j = qh; j < qe; j++) {
                const size_t row = (size_t)i * b.n_q_heads + j;
                add += expf(v.ring_raw[row * v.kcap + u] - v.row_ml[2 * row]) / v.row_ml[2 * row + 1];
            }
            score += add;
        }
        seen++;
    }
    v.sal_score[slot] = score;
    v.sal_seen[slot] = seen;
}

/* ---------------------------------------------------------------------------
   Cache (host side). One device allocation holding kvq.h's arrays for all heads,
   each aligned to 256 bytes; the counts live on the host, which plans every append.
   --------------------------------------------------------------------------- */

struct kvq_cuda_cache {
    kvq_config cfg;
    kvq__cuda_view v; /* device pointers and sizes; counts filled per call */
    int n_tokens;
    void *d_mem;
    float *d_part;
    size_t part_floats;
    int *h_flag, *d_flag; /* the append check's result */
    int sms;              /* multiprocessors of the device the cache lives on */
    kvq__cu_rot *d_rot;   /* KVQ_ROTATE_HADAMARD: the plan, in device memory */
    float *d_rot_in;      /* rotated K and V of an append, or rotated queries */
    size_t rot_floats;
};

static size_t kvq__cu_align(size_t x) { return (x + KVQ__CUDA_ALIGN - 1) & ~(size_t)(KVQ__CUDA_ALIGN - 1); }

/* The key blocks and values quantized after n tokens: kvq.h's own rule (keys leave a block at
   a time once more than max(R, G - 1) wait; values one at a time once more than R wait, or
   with their key block in salient caches; keys per token leave with their values, no blocks). */
static void kvq__cu_counts(const kvq_config *cfg, int n, int *nkb, int *nvq) { kvq__counts_after(cfg, n, nkb, nvq); }

static kvq_status kvq__cu_err(cudaError_t e) {
    if (e == cudaSuccess) return KVQ_OK;
    (void)cudaGetLastError(); /* clear a non-sticky error so later calls start clean */
    if (e == cudaErrorMemoryAllocation) return KVQ_ERR_NOMEM;
    if (e == cudaErrorInvalidValue) return KVQ_ERR_INVALID;
    return KVQ_ERR_UNSUPPORTED; /* no device, launch failure, ...: kvq_status has no better word */
}

static int kvq__cu_launch_blocks(size_t work, int threads) {
    size_t b = (work + (size_t)threads - 1) / (size_t)threads;
    if (b < 1) b = 1;
    return b > 65536 ? 65536 : (int)b; /* grid-stride loops cover the rest */
}

KVQ_CUDA_API kvq_status kvq_cuda_cache_create(kvq_cuda_cache **out, const kvq_config *cfg) {
    kvq_cuda_cache *c;
    kvq_status st;
    kvq__layout L;
    size_t H, D, S, off[12], end = 0, sz[12];
    int G, bits_k, bits_v, a;
    const uint16_t one = 1;
    uint8_t *base;
    if (!out) return KVQ_ERR_INVALID;
    if ((st = kvq_config_check(cfg)) != KVQ_OK) return st;
    if (*(const uint8_t *)&one != 1) return KVQ_ERR_UNSUPPORTED; /* big-endian host */
    if (!kvq__plan(cfg, &L)) return KVQ_ERR_NOMEM;                 /* kvq.h's capacities */
    if (!(c = (kvq_cuda_cache *)calloc(1, sizeof *c))) return KVQ_ERR_NOMEM;
    c->cfg = *cfg;
    H = (size_t)cfg->n_kv_heads;
    D = (size_t)cfg->head_dim;
    S = (size_t)cfg->sink_tokens;
    G = cfg->group_size;
    bits_k = cfg->key_bits;
    bits_v = cfg->value_bits;
    c->v.D = (int)D;
    c->v.H = (int)H;
    c->v.S = (int)S;
    c->v.G = G;
    c->v.kbits = bits_k;
    c->v.vbits = bits_v;
    c->v.ng = (int)((D + G - 1) / G);
    c->v.max_kblocks = L.max_kblocks;
    c->v.max_vquant = L.max_vquant;
    c->v.kcap = L.kcap;
    c->v.vcap = L.vcap;
    c->v.kblock_bytes = (int)kvq__key_block_bytes(cfg);
    c->v.vparam_u16 = bits_v == 16 ? 0 : 2 * c->v.ng;
    c->v.vcode_bytes = (int)D * bits_v / 8;
    c->v.n_salient = kvq__salient_count(cfg);
    c->v.side_bytes = (int)kvq__side_entry_bytes(cfg);
    c->v.sal_bits = cfg->salient_bits;
    c->v.sal_policy = cfg->salient_policy;
    c->v.key_tokens = cfg->key_axis == KVQ_KEYS_PER_TOKEN;
    c->v.kt_u16 = bits_k == 16 ? 0 : 2 * c->v.ng;
    c->v.ktcode_bytes = (int)D * bits_k / 8;
    sz[0] = sz[1] = H * S * D * 2;
    sz[2] = H * (size_t)c->v.max_kblocks * c->v.kblock_bytes;
    sz[3] = H * (size_t)c->v.max_vquant * c->v.vparam_u16 * 2;
    sz[4] = H * (size_t)c->v.max_vquant * c->v.vcode_bytes;
    sz[5] = H * (size_t)c->v.kcap * D * 2;
    sz[6] = H * (size_t)c->v.vcap * D * 2;
    sz[7] = H * (size_t)c->v.max_kblocks * c->v.n_salient * c->v.side_bytes; /* side store */
    sz[8] = sz[9] = c->v.n_salient ? H * (size_t)c->v.kcap * 4 : 0;        /* sal_score, sal_seen */
    sz[10] = c->v.key_tokens ? H * (size_t)c->v.max_vquant * c->v.kt_u16 * 2 : 0; /* keys per token */
    sz[11] = c->v.key_tokens ? H * (size_t)c->v.max_vquant * c->v.ktcode_bytes : 0;
    for (a = 0; a < 12; a++) {
        off[a] = end;
        end = kvq__cu_align(end + sz[a]);
    }
    if (cudaMalloc(&c->d_mem, end ? end : 1) != cudaSuccess ||
        cudaHostAlloc((void **)&c->h_flag, sizeof(int), cudaHostAllocDefault) != cudaSuccess ||
        cudaMalloc((void **)&c->d_flag, sizeof(int)) != cudaSuccess) {
        (void)cudaGetLastError();
        kvq_cuda_cache_destroy(c);
        return KVQ_ERR_NOMEM;
    }
    {
        int dev = 0;
        if (cudaGetDevice(&dev) != cudaSuccess ||
            cudaDeviceGetAttribute(&c->sms, cudaDevAttrMultiProcessorCount, dev) != cudaSuccess || c->sms < 1)
            c->sms = 100;
        (void)cudaGetLastError();
    }
    if (cfg->rotation == KVQ_ROTATE_HADAMARD) {
        kvq__cu_rot hr;
        kvq__rotation r;
        int k, i, j;
        static const int orders[3] = {12, 20, 28};
        memset(&hr, 0, sizeof hr);
        kvq__rotation_init(&r, cfg->head_dim, cfg->seed);
        hr.n = r.n;
        hr.n_pieces = r.n_pieces;
        for (k = 0; k < 10; k++) {
            hr.off[k] = r.off[k];
            hr.pow2[k] = r.pow2[k];
            hr.m[k] = r.m[k];
        }
        for (i = 0; i < cfg->head_dim; i++) hr.sign[i] = r.sign[i];
        for (k = 0; k < 3; k++)
            for (i = 0; i < orders[k]; i++)
                for (j = 0; j < orders[k]; j++) hr.paley[k][i * orders[k] + j] = (signed char)kvq__paley(orders[k], i, j);
        if (cudaMalloc((void **)&c->d_rot, sizeof hr) != cudaSuccess ||
            cudaMemcpy(c->d_rot, &hr, sizeof hr, cudaMemcpyHostToDevice) != cudaSuccess) {
            (void)cudaGetLastError();
            kvq_cuda_cache_destroy(c);
            return KVQ_ERR_NOMEM;
        }
    }
    base = (uint8_t *)c->d_mem;
    c->v.sink_k = (uint16_t *)(base + off[0]);
    c->v.sink_v = (uint16_t *)(base + off[1]);
    c->v.kblocks = base + off[2];
    c->v.vparams = (uint16_t *)(base + off[3]);
    c->v.vcodes = base + off[4];
    c->v.ring_k = (uint16_t *)(base + off[5]);
    c->v.ring_v = (uint16_t *)(base + off[6]);
    c->v.side = base + off[7];
    c->v.sal_score = (float *)(base + off[8]);
    c->v.sal_seen = (uint32_t *)(base + off[9]);
    c->v.ktparams = (uint16_t *)(base + off[10]);
    c->v.ktcodes = base + off[11];
    *out = c;
    return KVQ_OK;
}

KVQ_CUDA_API void kvq_cuda_cache_destroy(kvq_cuda_cache *c) {
    if (!c) return;
    if (c->d_mem) cudaFree(c->d_mem);
    if (c->d_part) cudaFree(c->d_part);
    if (c->d_flag) cudaFree(c->d_flag);
    if (c->h_flag) cudaFreeHost(c->h_flag);
    if (c->d_rot) cudaFree(c->d_rot);
    if (c->d_rot_in) cudaFree(c->d_rot_in);
    free(c);
}

KVQ_CUDA_API void kvq_cuda_cache_reset(kvq_cuda_cache *c) {
    if (c) c->n_tokens = 0;
}

KVQ_CUDA_API int kvq_cuda_cache_tokens(const kvq_cuda_cache *c) { return c ? c->n_tokens : 0; }

KVQ_CUDA_API const kvq_config *kvq_cuda_cache_config(const kvq_cuda_cache *c) { return c ? &c->cfg : NULL; }

/* The view with the counts of the current token count filled in. */
static kvq__cuda_view kvq__cu_view(const kvq_cuda_cache *c) {
    kvq__cuda_view v = c->v;
    v.n_tokens = c->n_tokens;
    kvq__cu_counts(&c->cfg, c->n_tokens, &v.nkb, &v.nvq);
    return v;
}

/* Bytes of the tokens stored (as kvq_cache_payload_bytes); image: of the serialization
   payload, which adds the (score, seen) of each waiting key in salient caches. */
static size_t kvq__cu_payload_size(const kvq_cuda_cache *c, int image) {
    kvq__cuda_view v;
    size_t row, after, per_head, kq;
    v = kvq__cu_view(c);
    row = 2 * (size_t)v.D;
    after = (size_t)(c->n_tokens > v.S ? c->n_tokens - v.S : 0);
    kq = v.key_tokens ? (size_t)v.nvq : (size_t)v.nkb * v.G; /* keys that left the ring */
    per_head = (size_t)(c->n_tokens - (int)after) * 2 * row + (size_t)v.nkb * v.kblock_bytes + (after - kq) * row +
               (size_t)v.nvq * ((size_t)v.vparam_u16 * 2 + v.vcode_bytes) + (after - (size_t)v.nvq) * row;
    if (v.key_tokens) per_head += (size_t)v.nvq * ((size_t)v.kt_u16 * 2 + v.ktcode_bytes);
    if (v.n_salient) per_head += (size_t)v.nkb * v.n_salient * v.side_bytes;
    if (v.n_salient && image) per_head += (after - (size_t)v.nkb * v.G) * 8;
    return per_head * (size_t)v.H;
}

KVQ_CUDA_API size_t kvq_cuda_cache_payload_bytes(const kvq_cuda_cache *c) { return c ? kvq__cu_payload_size(c, 0) : 0; }

/* Grows the rotation scratch to n floats (cudaFree/cudaMalloc synchronize the device). */
/* Grows a device scratch *buf of *have floats to n (cudaFree/cudaMalloc synchronize). */
static kvq_status kvq__cu_grow(float **buf, size_t *have, size_t n) {
    if (n <= *have) return KVQ_OK;
    if (*buf) cudaFree(*buf);
    *buf = NULL;
    *have = 0;
    if (cudaMalloc((void **)buf, n * sizeof(float)) != cudaSuccess) {
        (void)cudaGetLastError();
        return KVQ_ERR_NOMEM;
    }
    *have = n;
    return KVQ_OK;
}

static kvq_status kvq__cu_rot_scratch(kvq_cuda_cache *c, size_t n) {
    return kvq__cu_grow(&c->d_rot_in, &c->rot_floats, n);
}

KVQ_CUDA_API kvq_status kvq_cuda_cache_append(kvq_cuda_cache *c, const float *d_k, const float *d_v, int n_tokens,
                                              cudaStream_t stream) {
    kvq__cuda_append a;
    size_t work;
    if (!c || n_tokens < 0) return KVQ_ERR_INVALID;
    if (n_tokens == 0) return KVQ_OK;
    if (!d_k || !d_v) return KVQ_ERR_INVALID;
    if (n_tokens > c->cfg.max_tokens - c->n_tokens) return KVQ_ERR_FULL;
    work = (size_t)n_tokens * c->v.H * c->v.D;
#ifndef KVQ_CUDA_UNCHECKED_APPEND
    /* all or nothing, like kvq.h: check every input on the device before storing any */
    if (cudaMemsetAsync(c->d_flag, 0, sizeof(int), stream) != cudaSuccess) return kvq__cu_err(cudaGetLastError());
    kvq__cu_check_kernel<<<kvq__cu_launch_blocks(work, 256), 256, 0, stream>>>(d_k, d_v, work, c->d_flag);
    if (c->cfg.rotation == KVQ_ROTATE_HADAMARD) {
        size_t rows = (size_t)n_tokens * c->v.H;
        kvq__cu_norm_check_kernel<<<kvq__cu_launch_blocks(rows, 128), 128, 0, stream>>>(d_k, d_v, rows, c->v.D,
                                                                                        c->d_flag);
    }
    if (cudaMemcpyAsync(c->h_flag, c->d_flag, sizeof(int), cudaMemcpyDeviceToHost, stream) != cudaSuccess ||
        cudaStreamSynchronize(stream) != cudaSuccess)
        return kvq__cu_err(cudaGetLastError());
    if (*c->h_flag) return KVQ_ERR_INVALID;
#endif
    if (c->cfg.rotation == KVQ_ROTATE_HADAMARD) {
        /* store rotated rows, as kvq.h does: rotate K and V into the scratch first */
        size_t rows = (size_t)n_tokens * c->v.H;
        kvq_status st = kvq__cu_rot_scratch(c, 2 * work);
        if (st != KVQ_OK) return st;
        kvq__cu_rotate_kernel<<<kvq__cu_launch_blocks(rows, 128), 128, 0, stream>>>(d_k, c->d_rot_in, rows, c->d_rot, 0);
        kvq__cu_rotate_kernel<<<kvq__cu_launch_blocks(rows, 128), 128, 0, stream>>>(d_v, c->d_rot_in + work, rows, c->d_rot, 0);
        d_k = c->d_rot_in;
        d_v = c->d_rot_in + work;
    }
    memset(&a, 0, sizeof a);
    a.c = kvq__cu_view(c);
    a.k = d_k;
    a.v = d_v;
    a.n = n_tokens;
    a.n_old = c->n_tokens;
    a.after_old = c->n_tokens > c->v.S ? c->n_tokens - c->v.S : 0;
    a.nkb_old = a.c.nkb;
    a.nvq_old = a.c.nvq;
    kvq__cu_counts(&c->cfg, c->n_tokens + n_tokens, &a.nkb_new, &a.nvq_new);
    /* order matters: the quantizers read ring rows (and salience) of earlier appends before
       the store kernel may reuse their slots; the key blocks read the side store's picks */
    if (c->v.n_salient && a.nkb_new > a.nkb_old) {
        size_t n = (size_t)c->v.H * (a.nkb_new - a.nkb_old);
        kvq__cu_salient_kernel<<<kvq__cu_launch_blocks(n, 64), 64, 0, stream>>>(a);
    }
    if (a.nkb_new > a.nkb_old) {
        size_t n = (size_t)c->v.H * (a.nkb_new - a.nkb_old) * c->v.D;
        kvq__cu_key_blocks_kernel<<<kvq__cu_launch_blocks(n, 128), 128, 0, stream>>>(a);
    }
    if (a.nvq_new > a.nvq_old) {
        size_t n = (size_t)c->v.H * (a.nvq_new - a.nvq_old) * c->v.ng;
        if (c->v.key_tokens) kvq__cu_records_kernel<<<kvq__cu_launch_blocks(n, 128), 128, 0, stream>>>(a, 1);
        kvq__cu_records_kernel<<<kvq__cu_launch_blocks(n, 128), 128, 0, stream>>>(a, 0);
    }
    kvq__cu_store_kernel<<<kvq__cu_launch_blocks(work, 256), 256, 0, stream>>>(a);
    if (cudaGetLastError() != cudaSuccess) return KVQ_ERR_UNSUPPORTED;
    c->n_tokens += n_tokens;
    return KVQ_OK;
}

/* Tokens per chunk: enough blocks to fill the GPU about four times over, at least 256
   tokens per block, at most 65535 chunks; a multiple of the tile. */
static int kvq__cu_chunk(int n_tokens, size_t units, int n_seqs, int sms) {
    size_t want, per;
    want = (4 * (size_t)sms + units * n_seqs - 1) / (units * n_seqs);
    if (want < 1) want = 1;
    per = ((size_t)n_tokens + want - 1) / want;
    if (per < 256) per = 256;
    if (per < ((size_t)n_tokens + 65534) / 65535) per = ((size_t)n_tokens + 65534) / 65535;
    per = (per + KVQ__CUDA_TILE - 1) / KVQ__CUDA_TILE * KVQ__CUDA_TILE;
    return (int)per;
}

/* How one sequence of a launch of m splits: query-head slices of <= *nh heads, grid units,
   token chunks; returns the partial-state scratch it needs, in floats: [row][chunk](max, sum,
   acc[D]), and with tracking the raw scores of waiting keys [row][kcap] and the merged
   (max, sum) [row][2]. */
static size_t kvq__cu_plan(const kvq_cuda_cache *c, const kvq_attn_params *p, int m, int *nh, int *slices,
                           size_t *units, int *chunk, int *n_chunks) {
    const int group = p->n_q_heads / c->cfg.n_kv_heads;
    const size_t rows = (size_t)p->n_queries * p->n_q_heads;
    const int track = c->v.n_salient && c->cfg.salient_policy == KVQ_SALIENT_ATTENTION;
    *nh = group > 4 ? 8 : group > 2 ? 4 : group;
    *slices = (group + *nh - 1) / *nh;
    *units = (size_t)p->n_queries * c->cfg.n_kv_heads * *slices;
    *chunk = kvq__cu_chunk(c->n_tokens, *units, m, c->sms);
    *n_chunks = (c->n_tokens + *chunk - 1) / *chunk;
    return rows * *n_chunks * ((size_t)c->v.D + 2) + (track ? rows * ((size_t)c->v.kcap + 2) : 0);
}

KVQ_CUDA_API kvq_status kvq_cuda_attention_batch(kvq_cuda_cache *const *caches, int n, const float *const *d_q,
                                                 float *const *d_out, const kvq_attn_params *p, cudaStream_t stream) {
    int s, u, first;
    if (!caches || !d_q || !d_out || !p || n < 1) return KVQ_ERR_INVALID;
    for (s = 0; s < n; s++) { /* everything checked before the first launch: all or nothing */
        const kvq_cuda_cache *c = caches[s];
        if (!c || !d_q[s] || !d_out[s]) return KVQ_ERR_INVALID;
        if (p->n_q_heads < c->cfg.n_kv_heads || p->n_q_heads % c->cfg.n_kv_heads || p->n_q_heads > 1 << 20)
            return KVQ_ERR_INVALID;
        if (p->n_queries < 1 || p->n_queries > c->n_tokens) return KVQ_ERR_INVALID;
        if (!(p->scale > -3.4e38f && p->scale < 3.4e38f)) return KVQ_ERR_INVALID;
        if (c->cfg.n_kv_heads != caches[0]->cfg.n_kv_heads || c->cfg.head_dim != caches[0]->cfg.head_dim)
            return KVQ_ERR_INVALID; /* one launch: one shape */
        if ((size_t)p->n_queries * p->n_q_heads > 0x7fffffffu) return KVQ_ERR_UNSUPPORTED;
        for (u = 0; u < s; u++) /* a cache's scratch (and salience) serves one sequence per call */
            if (caches[u] == c) return KVQ_ERR_INVALID;
    }
    for (s = 0; s < n; s++) { /* scratch sized before anything is launched */
        kvq_cuda_cache *c = caches[s];
        int first_s = s / KVQ_CUDA_MAX_BATCH * KVQ_CUDA_MAX_BATCH, nh, slices, chunk, n_chunks;
        int m = n - first_s < KVQ_CUDA_MAX_BATCH ? n - first_s : KVQ_CUDA_MAX_BATCH;
        size_t units, need = kvq__cu_plan(c, p, m, &nh, &slices, &units, &chunk, &n_chunks);
        kvq_status st = kvq__cu_grow(&c->d_part, &c->part_floats, need);
        if (st == KVQ_OK && c->cfg.rotation == KVQ_ROTATE_HADAMARD)
            st = kvq__cu_rot_scratch(c, (size_t)p->n_queries * p->n_q_heads * c->cfg.head_dim);
        if (st != KVQ_OK) return st;
    }
    for (first = 0; first < n; first += KVQ_CUDA_MAX_BATCH) {
        int m = n - first < KVQ_CUDA_MAX_BATCH ? n - first : KVQ_CUDA_MAX_BATCH, max_chunks = 0, max_units = 0, heads = 8;
        size_t max_track = 0; /* threads of the tracking kernel: (KV head, waiting key) */
        int kch = (caches[first]->cfg.head_dim + KVQ__CUDA_NT - 1) / KVQ__CUDA_NT;
        dim3 grid;
        kvq__cuda_batch b;
        memset(&b, 0, sizeof b);
        b.n_q_heads = p->n_q_heads;
        b.n_queries = p->n_queries;
        for (s = 0; s < m; s++) {
            kvq_cuda_cache *c = caches[first + s];
            const size_t rows = (size_t)p->n_queries * p->n_q_heads;
            const int track = c->v.n_salient && c->cfg.salient_policy == KVQ_SALIENT_ATTENTION;
            kvq__cuda_view *v = &b.v[s];
            int nh, slices;
            size_t units;
            *v = kvq__cu_view(c);
            (void)kvq__cu_plan(c, p, m, &nh, &slices, &units, &v->chunk, &v->n_chunks); /* scratch: sized above */
            if (s == 0) {
                b.n_slices = slices;
                heads = nh;
                b.scale = p->scale != 0.0f ? p->scale : 1.0f / sqrtf((float)c->cfg.head_dim);
            }
            v->q = d_q[first + s];
            v->out = d_out[first + s];
            if (c->cfg.rotation == KVQ_ROTATE_HADAMARD) { /* queries into the cache's rotated space */
                kvq__cu_rotate_kernel<<<kvq__cu_launch_blocks(rows, 128), 128, 0, stream>>>(v->q, c->d_rot_in, rows,
                                                                                             c->d_rot, 0);
                v->q = c->d_rot_in;
            }
            v->part = c->d_part;
            v->ring_raw = track ? c->d_part + rows * v->n_chunks * ((size_t)v->D + 2) : NULL;
            v->row_ml = track ? v->ring_raw + rows * v->kcap : NULL;
            if (track && (size_t)v->H * v->kcap > max_track) max_track = (size_t)v->H * v->kcap;
            if (v->n_chunks > max_chunks) max_chunks = v->n_chunks;
            if ((int)units > max_units) max_units = (int)units;
        }
        grid = dim3((unsigned)max_units, (unsigned)max_chunks, (unsigned)m);
#define KVQ__CU_ATTN(NH_)                                                                          \
    switch (kch) {                                                                                 \
    case 1: kvq__cu_attn_kernel<NH_, 1><<<grid, KVQ__CUDA_NT, 0, stream>>>(b); break;              \
    case 2: kvq__cu_attn_kernel<NH_, 2><<<grid, KVQ__CUDA_NT, 0, stream>>>(b); break;              \
    case 3: kvq__cu_attn_kernel<NH_, 3><<<grid, KVQ__CUDA_NT, 0, stream>>>(b); break;              \
    default: kvq__cu_attn_kernel<NH_, 4><<<grid, KVQ__CUDA_NT, 0, stream>>>(b); break;             \
    }
        switch (heads) {
        case 1: KVQ__CU_ATTN(1) break;
        case 2: KVQ__CU_ATTN(2) break;
        case 4: KVQ__CU_ATTN(4) break;
        default: KVQ__CU_ATTN(8) break;
        }
#undef KVQ__CU_ATTN
        kvq__cu_merge_kernel<<<dim3((unsigned)(p->n_queries * p->n_q_heads), (unsigned)m), KVQ__CUDA_NT, 0, stream>>>(b);
        if (max_track)
            kvq__cu_track_kernel<<<dim3((unsigned)kvq__cu_launch_blocks(max_track, 128), (unsigned)m), 128, 0, stream>>>(b);
        for (s = 0; s < m; s++) { /* outputs back to the caller's space */
            kvq_cuda_cache *c = caches[first + s];
            size_t rows = (size_t)p->n_queries * p->n_q_heads;
            if (c->cfg.rotation == KVQ_ROTATE_HADAMARD)
                kvq__cu_rotate_kernel<<<kvq__cu_launch_blocks(rows, 128), 128, 0, stream>>>(b.v[s].out, b.v[s].out, rows,
                                                                                             c->d_rot, 1);
        }
        if (cudaGetLastError() != cudaSuccess) return KVQ_ERR_UNSUPPORTED;
    }
    return KVQ_OK;
}

KVQ_CUDA_API kvq_status kvq_cuda_attention(kvq_cuda_cache *c, const float *d_q, float *d_out,
                                           const kvq_attn_params *p, cudaStream_t stream) {
    if (!c || !d_q || !d_out) return KVQ_ERR_INVALID;
    return kvq_cuda_attention_batch(&c, 1, &d_q, &d_out, p, stream);
}

/* ---------------------------------------------------------------------------
   Serialization. Between host and device only kvq.h's documented payload moves,
   in its image order: per KV head sink K rows, sink V rows, key blocks (or keys per
   token: params then codes), waiting keys (oldest first), values (params then codes
   per token), waiting values, then in salient caches the side-store entries and the
   (score, seen) of each waiting key; u16 as little-endian (the host's own order). The image header, its version and
   checksums stay kvq.h's business: uploads read the payload out of
   kvq_cache_serialize(), downloads hand it to kvq.h's payload reader, and the
   image functions go through a temporary host cache. So kvq_cuda.h never writes a
   header of its own and follows kvq.h's format as it evolves.
   --------------------------------------------------------------------------- */

/* Copies ring rows [p0, p1) (positions past the sinks) of one head between device and host. */
static cudaError_t kvq__cu_ring_xfer(uint16_t *ring, int cap, int D, int p0, int p1, uint8_t *img, int to_image,
                                     cudaStream_t stream) {
    while (p0 < p1) {
        int slot = p0 % cap, n = p1 - p0 < cap - slot ? p1 - p0 : cap - slot;
        size_t bytes = (size_t)n * D * 2;
        uint16_t *dev = ring + (size_t)slot * D;
        cudaError_t e = to_image ? cudaMemcpyAsync(img, dev, bytes, cudaMemcpyDeviceToHost, stream)
                                 : cudaMemcpyAsync(dev, img, bytes, cudaMemcpyHostToDevice, stream);
        if (e != cudaSuccess) return e;
        img += bytes;
        p0 += n;
    }
    return cudaSuccess;
}

/* Moves n per-token records of one head between device and image *img (advanced past them):
   fp16 params[par_u16] then code bytes per token in the image, two arrays on the device, so
   each array moves in one copy through host scratch tmp and is (de)interleaved on the host.
   No params (16 bits): the codes are the image's bytes as they are. */
static cudaError_t kvq__cu_records_xfer(uint16_t *par, int par_u16, uint8_t *codes, int code_bytes, int n,
                                        uint8_t **img, int to_image, uint8_t *tmp, cudaStream_t stream) {
    const size_t pb = (size_t)par_u16 * 2, cb = (size_t)code_bytes;
    uint8_t *pp = tmp, *cp = tmp + (size_t)n * pb, *at = *img;
    cudaError_t e = cudaSuccess;
    int j;
    if (n < 1) return cudaSuccess;
    if (!par_u16) {
        e = to_image ? cudaMemcpyAsync(at, codes, (size_t)n * cb, cudaMemcpyDeviceToHost, stream)
                     : cudaMemcpyAsync(codes, at, (size_t)n * cb, cudaMemcpyHostToDevice, stream);
        *img += (size_t)n * cb;
        return e;
    }
    if (to_image) {
        e = cudaMemcpyAsync(pp, par, (size_t)n * pb, cudaMemcpyDeviceToHost, stream);
        if (e == cudaSuccess) e = cudaMemcpyAsync(cp, codes, (size_t)n * cb, cudaMemcpyDeviceToHost, stream);
        if (e == cudaSuccess) e = cudaStreamSynchronize(stream);
        if (e != cudaSuccess) return e;
        for (j = 0; j < n; j++, at += pb + cb) {
            memcpy(at, pp + j * pb, pb);
            memcpy(at + pb, cp + j * cb, cb);
        }
    } else {
        for (j = 0; j < n; j++, at += pb + cb) {
            memcpy(pp + j * pb, at, pb);
            memcpy(cp + j * cb, at + pb, cb);
        }
        e = cudaMemcpyAsync(par, pp, (size_t)n * pb, cudaMemcpyHostToDevice, stream);
        if (e == cudaSuccess) e = cudaMemcpyAsync(codes, cp, (size_t)n * cb, cudaMemcpyHostToDevice, stream);
        if (e == cudaSuccess) e = cudaStreamSynchronize(stream); /* before tmp is reused */
    }
    *img = at;
    return e;
}

/* Moves the payload of state v between device and host buffer img, then synchronizes.
   tmp: host scratch for the value or key records of one head (nvq * record bytes) and, in
   salient caches, for its salience rings (kcap * 8 bytes). */
static cudaError_t kvq__cu_xfer_payload(const kvq__cuda_view *v, uint8_t *img, int to_image, uint8_t *tmp,
                                        cudaStream_t stream) {
    const int D = v->D, G = v->G, sinks = v->n_tokens < v->S ? v->n_tokens : v->S;
    const int after = v->n_tokens - sinks, kq = v->key_tokens ? v->nvq : v->nkb * G; /* keys out of the ring */
    cudaError_t e = cudaSuccess;
    int h;
#define KVQ__CU_SEG(devp, bytes)                                                                \
    do {                                                                                      \
        size_t nb_ = (bytes);                                                                 \
        if (nb_) {                                                                            \
            e = to_image ? cudaMemcpyAsync(img, (devp), nb_, cudaMemcpyDeviceToHost, stream)  \
                         : cudaMemcpyAsync((devp), img, nb_, cudaMemcpyHostToDevice, stream); \
            if (e != cudaSuccess) return e;                                                   \
            img += nb_;                                                                       \
        }                                                                                     \
    } while (0)
    for (h = 0; h < v->H; h++) {
        size_t rec = (size_t)h * v->max_vquant;
        int j;
        KVQ__CU_SEG(v->sink_k + (size_t)h * v->S * D, (size_t)sinks * D * 2);
        KVQ__CU_SEG(v->sink_v + (size_t)h * v->S * D, (size_t)sinks * D * 2);
        KVQ__CU_SEG(v->kblocks + (size_t)h * v->max_kblocks * v->kblock_bytes, (size_t)v->nkb * v->kblock_bytes);
        if (v->key_tokens) { /* keys per token: records like values' */
            e = kvq__cu_records_xfer(v->ktparams + rec * v->kt_u16, v->kt_u16, v->ktcodes + rec * v->ktcode_bytes,
                                     v->ktcode_bytes, v->nvq, &img, to_image, tmp, stream);
            if (e != cudaSuccess) return e;
        }
        e = kvq__cu_ring_xfer(v->ring_k + (size_t)h * v->kcap * D, v->kcap, D, kq, after, img, to_image, stream);
        if (e != cudaSuccess) return e;
        img += (size_t)(after - kq) * D * 2;
        e = kvq__cu_records_xfer(v->vparams + rec * v->vparam_u16, v->vparam_u16, v->vcodes + rec * v->vcode_bytes,
                                 v->vcode_bytes, v->nvq, &img, to_image, tmp, stream);
        if (e != cudaSuccess) return e;
        e = kvq__cu_ring_xfer(v->ring_v + (size_t)h * v->vcap * D, v->vcap, D, v->nvq, after, img, to_image, stream);
        if (e != cudaSuccess) return e;
        img += (size_t)(after - v->nvq) * D * 2;
        if (v->n_salient) {
            /* side-store entries are stored as the image has them (u16 little-endian, then
               code bytes); (score f32, seen u32) of each waiting key, oldest first, are
               interleaved there and two ring arrays here: through tmp, on the host */
            const size_t sb = (size_t)v->n_salient * v->side_bytes, ring = (size_t)h * v->kcap;
            float *sc = (float *)(void *)tmp;
            uint32_t *seen = (uint32_t *)(void *)(tmp + 4 * (size_t)v->kcap);
            KVQ__CU_SEG(v->side + (size_t)h * v->max_kblocks * sb, (size_t)v->nkb * sb);
            if (to_image) {
                e = cudaMemcpyAsync(sc, v->sal_score + ring, 4 * (size_t)v->kcap, cudaMemcpyDeviceToHost, stream);
                if (e == cudaSuccess)
                    e = cudaMemcpyAsync(seen, v->sal_seen + ring, 4 * (size_t)v->kcap, cudaMemcpyDeviceToHost, stream);
                if (e == cudaSuccess) e = cudaStreamSynchronize(stream);
                if (e != cudaSuccess) return e;
            } else {
                memset(tmp, 0, 8 * (size_t)v->kcap);
            }
            for (j = v->nkb * G; j < after; j++) {
                if (to_image) {
                    memcpy(img, &sc[j % v->kcap], 4);
                    memcpy(img + 4, &seen[j % v->kcap], 4);
                } else {
                    memcpy(&sc[j % v->kcap], img, 4);
                    memcpy(&seen[j % v->kcap], img + 4, 4);
                }
                img += 8;
            }
            if (!to_image) {
                e = cudaMemcpyAsync(v->sal_score + ring, sc, 4 * (size_t)v->kcap, cudaMemcpyHostToDevice, stream);
                if (e == cudaSuccess)
                    e = cudaMemcpyAsync(v->sal_seen + ring, seen, 4 * (size_t)v->kcap, cudaMemcpyHostToDevice, stream);
                if (e == cudaSuccess) e = cudaStreamSynchronize(stream); /* before tmp is reused */
                if (e != cudaSuccess) return e;
            }
        }
    }
#undef KVQ__CU_SEG
    return cudaStreamSynchronize(stream);
}

/* Moves the payload of c as it would hold `tokens` tokens between device and host. */
static kvq_status kvq__cu_payload(kvq_cuda_cache *c, int tokens, uint8_t *img, int to_image, cudaStream_t stream) {
    kvq_cuda_cache probe = *c;
    kvq__cuda_view v;
    uint8_t *tmp;
    size_t rec; /* bytes of the larger per-token record */
    cudaError_t e;
    probe.n_tokens = tokens;
    v = kvq__cu_view(&probe);
    rec = (size_t)v.vparam_u16 * 2 + v.vcode_bytes;
    if (v.key_tokens && (size_t)v.kt_u16 * 2 + v.ktcode_bytes > rec) rec = (size_t)v.kt_u16 * 2 + v.ktcode_bytes;
    if (!(tmp = (uint8_t *)malloc((size_t)v.nvq * rec + 8 * (size_t)v.kcap + 8))) return KVQ_ERR_NOMEM;
    e = kvq__cu_xfer_payload(&v, img, to_image, tmp, stream);
    free(tmp);
    return kvq__cu_err(e);
}

static int kvq__cu_same_config(const kvq_config *a, const kvq_config *b) {
    return memcmp(a, b, sizeof *a) == 0; /* ints, unsigned and a float: no padding */
}

KVQ_CUDA_API kvq_status kvq_cuda_cache_upload(kvq_cuda_cache *dst, const kvq_cache *src, cudaStream_t stream) {
    size_t n, hdr;
    uint8_t *img;
    kvq_status st;
    int tokens;
    if (!dst || !src) return KVQ_ERR_INVALID;
    if (!kvq__cu_same_config(kvq_cache_config(src), &dst->cfg)) return KVQ_ERR_INVALID;
    tokens = kvq_cache_tokens(src);
    n = kvq_cache_serialized_bytes(src);
    if (!(img = (uint8_t *)malloc(n))) return KVQ_ERR_NOMEM;
    st = kvq_cache_serialize(src, img, n, NULL);
    if (st == KVQ_OK) {
        kvq_cuda_cache probe = *dst;
        probe.n_tokens = tokens;
        /* bytes 12..16 of every kvq image give the header size; the rest must be exactly the
           payload this file expects, or the formats have drifted apart */
        hdr = (size_t)img[12] | (size_t)img[13] << 8 | (size_t)img[14] << 16 | (size_t)img[15] << 24;
        if (hdr > n || n - hdr != kvq__cu_payload_size(&probe, 1)) st = KVQ_ERR_UNSUPPORTED;
        else st = kvq__cu_payload(dst, tokens, img + hdr, 0, stream);
        if (st == KVQ_OK) dst->n_tokens = tokens;
        else dst->n_tokens = 0; /* a failed copy may have overwritten part of the old state */
    }
    free(img);
    return st;
}

KVQ_CUDA_API kvq_status kvq_cuda_cache_download(const kvq_cuda_cache *src, kvq_cache *dst, cudaStream_t stream) {
    size_t n;
    uint8_t *img;
    kvq_status st;
    if (!src || !dst) return KVQ_ERR_INVALID;
    if (!kvq__cu_same_config(kvq_cache_config(dst), &src->cfg)) return KVQ_ERR_INVALID;
    n = kvq__cu_payload_size(src, 1);
    if (!(img = (uint8_t *)malloc(n + 1))) return KVQ_ERR_NOMEM;
    st = kvq__cu_payload((kvq_cuda_cache *)(uintptr_t)src, src->n_tokens, img, 1, stream);
    if (st == KVQ_OK) {
        /* kvq.h's own payload reader (the one kvq_cache_deserialize uses) puts each record
           where kvq.h keeps it, whatever its internal layout */
        dst->n_tokens = src->n_tokens;
        kvq__counts_after(&dst->cfg, dst->n_tokens, &dst->n_kblocks, &dst->n_vquant);
        dst->n_ktok = dst->cfg.key_axis == KVQ_KEYS_PER_TOKEN ? dst->n_vquant : 0; /* as kvq_cache_deserialize */
        kvq__xfer_payload(dst, img, 0);
    }
    free(img);
    return st;
}

KVQ_CUDA_API size_t kvq_cuda_cache_serialized_bytes(const kvq_cuda_cache *c) {
    return c ? KVQ__HEADER_BYTES + kvq__cu_payload_size(c, 1) : 0;
}

KVQ_CUDA_API kvq_status kvq_cuda_cache_serialize(const kvq_cuda_cache *c, void *buf, size_t buf_bytes,
                                                 size_t *written, cudaStream_t stream) {
    kvq_cache *tmp;
    kvq_status st;
    if (!c || !buf) return KVQ_ERR_INVALID;
    if (buf_bytes < kvq_cuda_cache_serialized_bytes(c)) return KVQ_ERR_NOMEM;
    if ((st = kvq_cache_create(&tmp, &c->cfg)) != KVQ_OK) return st;
    st = kvq_cuda_cache_download(c, tmp, stream);
    if (st == KVQ_OK) st = kvq_cache_serialize(tmp, buf, buf_bytes, written);
    kvq_cache_destroy(tmp);
    return st;
}

KVQ_CUDA_API kvq_status kvq_cuda_cache_deserialize(kvq_cuda_cache *c, const void *bytes, size_t n_bytes,
                                                   cudaStream_t stream) {
    kvq_config cfg;
    kvq_cache *tmp;
    kvq_status st;
    size_t need;
    void *mem;
    if (!c || !bytes) return KVQ_ERR_INVALID;
    if ((st = kvq_serialized_config(bytes, n_bytes, &cfg)) != KVQ_OK) return st;
    if (!kvq__cu_same_config(&cfg, &c->cfg)) return KVQ_ERR_INVALID;
    /* kvq.h validates every byte (counts, sizes, checksums) into a host cache first */
    if (!(need = kvq_cache_bytes(&cfg)) || !(mem = malloc(need))) return KVQ_ERR_NOMEM;
    st = kvq_cache_deserialize(&tmp, bytes, n_bytes, mem, need);
    if (st == KVQ_OK) st = kvq_cuda_cache_upload(c, tmp, stream);
    free(mem);
    return st;
}

#endif /* KVQ_CUDA_IMPLEMENTATION */
