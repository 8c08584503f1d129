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
       if (kvq_cuda_cache_create(&gc, &cfg) != KVQ_OK) return 1; // allocates all it will use
       kvq_cuda_cache_append(gc, d_k, d_v, 1, stream);   // device [n][n_kv_heads][head_dim]
       kvq_attn_params ap = { 32, 1, 0.0f };
       kvq_cuda_attention(gc, d_q, d_out, &ap, stream);  // device [n_queries][n_q_heads][head_dim];
                                                         // n_queries * n_q_heads <= KVQ_CUDA_ATTN_ROWS
                                                         // (or create_ex's max_attn_rows)
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
   values); key blocks of KB = key_block tokens (group_size where it is 0): fp16 scale[D],
   fp16 min[D], then per channel KB codes packed along tokens, lowest bits first; 16 bits:
   KB fp16 rows; values per token in groups of G = group_size channels (fp16 scale[ng],
   fp16 min[ng], or with value_param_bits 16 one u16 per group: an 8-bit scale | an int8
   min << 8; then D codes packed along channels; 16 bits: D fp16); fp16 residual rings
   for keys and values of kvq.h's lengths (kvq__plan: R + KB and R + 1 rows, longer by the
   rollback history, rollback_tokens), addressed by position past the sinks
   modulo the ring size. Keys leave the ring a block of KB at a time once more than
   max(R, KB - 1) wait; values one at a time once more than R wait. Quantization uses the
   same fp16 round-to-nearest-even, the same IEEE division (x - m) / s and the same
   round-half-even (and for 16-bit value params kvq.h's fitting of the 8-bit scale and
   int8 min), with no FMA contraction, so a cache filled on the GPU serializes to the
   same bytes as one filled by kvq.h from the same inputs.
   Rotation: KVQ_ROTATE_HADAMARD rotates K, V and queries on the device with kvq.h's own
   plan (signs, Kronecker or block-diagonal pieces, Paley matrices) in kvq.h's operation
   order, so the rotated rows and their bytes are the CPU's; rows of L2 norm > 65504 are
   refused as kvq.h refuses them. KVQ_ROTATE_PREROTATED, as in kvq.h, transforms nothing.
   Salient tokens (salient_ratio > 0): the same side store (u16 index, then K and V at
   salient_bits), salience scores and seen counts. When a key block leaves the window its
   salient tokens are picked as kvq.h picks them (tracked attention per query that saw the
   token; the range gain when no query saw any token of the block, or with
   KVQ_SALIENT_ERROR), stored in the side store, left out of the block's min/max, and the
   block's values leave with it (the value ring is the key ring's length). Attention takes their
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
   - attention does not check the queries: a NaN/Inf query, or one kvq.h would refuse
     (|scale| * sum_c |q_c| > 2^100 in a head row), gives undefined output rows (NaN or
     garbage), never a memory error. Checking would need a stream sync, which attention
     must not do. With salient tokens and KVQ_SALIENT_ATTENTION, attention writes the cache
     (the salience of the waiting keys), as kvq_attention does; such a query may then leave
     meaningless salience scores too (a later salient pick may differ, nothing worse).
   - tracked salience is not bit-identical: the scores are sums of exp(s - m) / l, and the
     device's expf, dot products and summation order differ from the CPU's in the last
     bits (the counts of queries are exact). Where two tokens' normalized scores are that
     close, the GPU may keep the other one in the side store; the cache is then equally
     valid but not byte-identical. Without attention calls between appends (prefill) or
     with KVQ_SALIENT_ERROR, the picks and every byte are the CPU's.
   - configs: kvq_config_check() decides; every config kvq.h builds is built here.
   - no kvq_cache_truncate / kvq_cache_copy on the device, and no rollback history: the
     device's append quantizes what leaves the window straight from its input, so the
     pushed-out rows are not kept (rollback_tokens only sizes the rings, as in kvq.h, so
     that upload and download move the same bytes). Download, cut or copy on the host, and
     upload. A downloaded cache, like a loaded one, starts with no history.
   - host <-> device copies move kvq.h's documented payload (its serialization image minus
     the header) between host and device in a few large cudaMemcpyAsync calls. The header,
     its version and checksums stay kvq.h's: kvq_cuda_cache_upload() reads the payload out of
     kvq_cache_serialize(); kvq_cuda_cache_download() hands it to kvq.h's own payload reader;
     kvq_cuda_cache_serialize() goes through a temporary host cache (host memory of a full
     cache of that config), kvq_cuda_cache_deserialize() through one sized for the tokens
     the image holds (its max_tokens is a claim, not a size to trust), loaded and checked
     by kvq_cache_load(): images reach the GPU through kvq.h's own validation. So the
     translation unit that defines KVQ_CUDA_IMPLEMENTATION must also hold kvq.h's
     implementation (KVQ_IMPLEMENTATION, with KVQ_STATIC if another file implements kvq.h).
   - the host is assumed little-endian (x86-64, aarch64), as every CUDA host is; create
     returns KVQ_ERR_UNSUPPORTED otherwise.
   - errors from the CUDA runtime map to KVQ_ERR_NOMEM (allocation), KVQ_ERR_INVALID (an
     invalid value) or KVQ_ERR_UNSUPPORTED (no device, a failed launch, a device fault, an
     error pending before the call): kvq_status has no closer word. See "Errors" below.

   Streams: what may overlap
   -------------------------
   A cache's device state and its scratch are used by the work of each call on it, and its
   token count (on the host) changes when an append is called, not when it runs. So:
   - calls on one cache are made one at a time (one host thread, or the caller's lock), and
     their device work must be ordered: the same stream, or the caller's events
     (cudaEventRecord after one call, cudaStreamWaitEvent before the next on another
     stream). This holds for every pair, reads included: two attention calls on one cache
     share its attention scratch, and an attention call reads what an append writes.
   - distinct caches share nothing (no global buffers, flags or scratch): calls on distinct
     caches may run on any streams at once, from any host threads. A batch uses each of its
     caches as attention on it would, so each must be ordered before the batch's stream.
   - append and attention have separate scratch (append: rotated K/V of one round and the
     check's flag; attention: rotated queries and partial states): between the two kinds
     of call only the cache's own arrays need the ordering above, never a scratch buffer.
   - destroy a cache only once the work queued on it has finished or is ordered before
     the destroy (its cudaFree calls synchronize the device, but not the caller's streams
     against later use of the pointer).

   Scratch, allocation and CUDA graphs
   -----------------------------------
   Everything is allocated by create: the cache's arrays, the append scratch and the
   attention scratch. append and attention never allocate or free (so they never
   synchronize the device that way). kvq_cuda_cache_create_ex() takes the bounds:
   - max_attn_rows (default KVQ_CUDA_ATTN_ROWS): the most n_queries * n_q_heads one
     attention call may have; larger calls return KVQ_ERR_INVALID with nothing launched.
     The scratch is (max_attn_rows + 32 * SMs) * (head_dim + 2) floats of partial states
     (tokens split into chunks for about 4 blocks per SM: rows * chunks stays below
     rows + 32 * SMs whatever the length), plus max_attn_rows * (kcap + 2) in salient
     caches with KVQ_SALIENT_ATTENTION and max_attn_rows * head_dim with
     KVQ_ROTATE_HADAMARD. About 2.2 MB at head_dim 128 on 132 SMs with the default.
   - append_chunk (default KVQ_CUDA_APPEND_CHUNK): tokens per round of append kernels.
     KVQ_ROTATE_HADAMARD caches keep rotated K and V of one round (2 * append_chunk *
     n_kv_heads * head_dim floats); longer appends run in rounds, after one check of the
     whole input, with the same bytes as one round (kvq.h's result does not depend on how
     tokens are split into appends).
   attention is thus capturable into a CUDA graph: it makes no allocation, no
   synchronization and no copy, only host-side queries (cudaPeekAtLastError,
   cudaPointerGetAttributes, cudaGetLastError) and kernel launches on stream. So is append
   with KVQ_CUDA_UNCHECKED_APPEND (the checked append synchronizes once). The token counts
   are kernel parameters: a captured call replays the state it was captured in, so
   capture per step or update the graph (cudaGraphExecUpdate) after each append.

   Pointers
   --------
   d_k, d_v, d_q and d_out must be device memory of the cache's device, or managed memory:
   each is checked with cudaPointerGetAttributes before anything is launched, and a host
   pointer (pageable or pinned) returns KVQ_ERR_INVALID with nothing changed, instead of a
   kernel fault that would leave the context unusable. Only the kind of memory is checked,
   not that the allocation is large enough.

   Errors
   ------
   kvq reports only errors its own calls cause. A call that uses the device first reads
   cudaPeekAtLastError(): an error already pending (the caller's failed launch, or a sticky
   error from an earlier fault) belongs to someone else, so the call does nothing, returns
   KVQ_ERR_UNSUPPORTED and leaves the error pending for its owner to read. Otherwise each
   runtime call and launch is checked right after it (cudaGetLastError then returns and
   clears that call's own error, so kvq leaves no error of its own pending). A launch or
   copy can fail after earlier work of the same call ran only on a device fault (every
   size and pointer is checked before the first): append then stops with the cache's
   memory partly written, and upload/deserialize reset the cache to 0 tokens (a mix of old
   and new state is no state); reset or reload it (the context is usually unusable then).
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

/* Defaults of kvq_cuda_limits (see "Scratch, allocation and CUDA graphs" above). */
#define KVQ_CUDA_ATTN_ROWS 256
#define KVQ_CUDA_APPEND_CHUNK 256

/* What create sizes the scratch for; a field of 0 takes its default. */
typedef struct kvq_cuda_limits {
    int max_attn_rows; /* most n_queries * n_q_heads of one attention call */
    int append_chunk;  /* tokens per round of append kernels (rotated caches keep one round) */
} kvq_cuda_limits;

KVQ_CUDA_API kvq_status kvq_cuda_cache_create(kvq_cuda_cache **out, const kvq_config *cfg); /* default limits */
/* lim NULL: the defaults. KVQ_ERR_INVALID for a negative field, max_attn_rows above 2^26 or
   append_chunk above 2^20. */
KVQ_CUDA_API kvq_status kvq_cuda_cache_create_ex(kvq_cuda_cache **out, const kvq_config *cfg,
                                                 const kvq_cuda_limits *lim);
KVQ_CUDA_API const kvq_cuda_limits *kvq_cuda_cache_limits(const kvq_cuda_cache *c); /* with defaults filled in */
/* Device bytes create allocated for append and attention scratch (beyond the cache's arrays). */
KVQ_CUDA_API size_t     kvq_cuda_cache_scratch_bytes(const kvq_cuda_cache *c);
KVQ_CUDA_API void       kvq_cuda_cache_destroy(kvq_cuda_cache *c); /* NULL is a no-op */
KVQ_CUDA_API void       kvq_cuda_cache_reset(kvq_cuda_cache *c);   /* back to 0 tokens */
KVQ_CUDA_API int        kvq_cuda_cache_tokens(const kvq_cuda_cache *c);
KVQ_CUDA_API const kvq_config *kvq_cuda_cache_config(const kvq_cuda_cache *c);
/* Device bytes holding the tokens now stored (as kvq_cache_payload_bytes). */
KVQ_CUDA_API size_t     kvq_cuda_cache_payload_bytes(const kvq_cuda_cache *c);

/* d_k, d_v: device [n_tokens][n_kv_heads][head_dim] floats. Work is queued on stream; the
   check of the input synchronizes it once (none with KVQ_CUDA_UNCHECKED_APPEND). */
KVQ_CUDA_API kvq_status kvq_cuda_cache_append(kvq_cuda_cache *c, const float *d_k, const float *d_v,
                                              int n_tokens, cudaStream_t stream);

/* d_q, d_out: device [n_queries][n_q_heads][head_dim]. Asynchronous on stream: no allocation,
   no synchronization (capturable into a CUDA graph). n_queries * n_q_heads at most the
   cache's max_attn_rows. */
KVQ_CUDA_API kvq_status kvq_cuda_attention(kvq_cuda_cache *c, const float *d_q, float *d_out,
                                           const kvq_attn_params *p, cudaStream_t stream);
/* The same for n caches (sequences) at once, sharing p; d_q[i], d_out[i] belong to caches[i].
   The caches must be distinct and share head_dim and n_kv_heads (lengths and bit widths may
   differ); one kernel launch per KVQ_CUDA_MAX_BATCH caches. */
KVQ_CUDA_API kvq_status kvq_cuda_attention_batch(kvq_cuda_cache *const *caches, int n,
                                                 const float *const *d_q, float *const *d_out,
                                                 const kvq_attn_params *p, cudaStream_t stream);

/* kvq.h's serialization image of the device cache (kvq_cache_serialized_bytes() of the same
   state). serialize synchronizes stream. deserialize validates the image with kvq.h's own
   checks into a temporary host cache first, then copies; it requires the image's config to
   equal the cache's but for max_tokens (the tokens it holds must fit the cache's, else
   KVQ_ERR_FULL) and leaves the cache untouched on any error but a device fault (see
   "Errors"); a bad image gives KVQ_ERR_CORRUPT, as kvq_cache_load() does. */
KVQ_CUDA_API size_t     kvq_cuda_cache_serialized_bytes(const kvq_cuda_cache *c);
KVQ_CUDA_API kvq_status kvq_cuda_cache_serialize(const kvq_cuda_cache *c, void *buf, size_t buf_bytes,
                                                 size_t *written, cudaStream_t stream);
KVQ_CUDA_API kvq_status kvq_cuda_cache_deserialize(kvq_cuda_cache *c, const void *bytes, size_t n_bytes,
                                                   cudaStream_t stream);

/* Copies between a CPU cache and a GPU cache with equal configs. Both synchronize stream.
   upload leaves dst untouched on any error but a device fault (see "Errors"). */
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
   function kvq.h computes in software); code packing is kvq.h's (its Formats section):
   a row of n codes, little-endian; at 2, 4, 8 bits code i occupies bits [i*bits, (i+1)*bits);
   at 3 bits two bit planes, the low 2 bits as a 2-bit row in bytes [0, n/4) and the high bit
   at bit i%8 of byte n/4 + i/8 (code = lo2 | hi1 << 2).
   --------------------------------------------------------------------------- */

#define KVQ__CUDA_NT 128     /* threads per attention / merge block */
#define KVQ__CUDA_TILE 32    /* tokens per attention tile (one per lane) */
#define KVQ__CUDA_HEADS 8    /* most query heads of a GQA group handled by one block */
#define KVQ__CUDA_MAXD 512
#define KVQ__CUDA_ALIGN 256

static __device__ __forceinline__ uint16_t kvq__cu_f32_to_f16(float x) {
    return __half_as_ushort(__float2half_rn(x));
}
static __device__ __forceinline__ float kvq__cu_f16_to_f32(uint16_t h) {
    return __half2float(__ushort_as_half(h));
}

/* Code i of a row of n codes (kvq__get_code). */
static __device__ __forceinline__ unsigned kvq__cu_get_code(const uint8_t *row, int n, int i, int bits) {
    const int b = bits == 3 ? 2 : bits; /* the low plane of a 3-bit row is a 2-bit row */
    const unsigned bit = (unsigned)i * (unsigned)b;
    unsigned v = (unsigned)(row[bit >> 3] >> (bit & 7u)) & ((1u << b) - 1u);
    if (bits == 3) v |= (unsigned)(row[n / 4 + i / 8] >> (i & 7) & 1u) << 2;
    return v;
}

/* ORs code i into a zeroed row of n codes (kvq__put_code). */
static __device__ __forceinline__ void kvq__cu_put_code(uint8_t *row, int n, int i, int bits, unsigned code) {
    const int b = bits == 3 ? 2 : bits;
    const unsigned bit = (unsigned)i * (unsigned)b;
    row[bit >> 3] = (uint8_t)(row[bit >> 3] | (code & ((1u << b) - 1u)) << (bit & 7u));
    if (bits == 3) row[n / 4 + i / 8] = (uint8_t)(row[n / 4 + i / 8] | (code >> 2) << (i & 7));
}

/* kvq.h's element formats (kvq__formats) where device code can read them: the same initializer,
   in constant memory (kvq.h's table is host memory). */
static __constant__ kvq__format kvq__cu_formats[KVQ__N_FORMATS] = KVQ__FORMATS;
/* kvq__fmt */
static __device__ __forceinline__ const kvq__format *kvq__cu_fmt(int bits) {
    const kvq__format *f = kvq__cu_formats;
    while (f->bits != bits && f < kvq__cu_formats + KVQ__N_FORMATS - 1) f++;
    return f;
}
/* kvq__row_bytes */
static __device__ __forceinline__ size_t kvq__cu_row_bytes(const kvq__format *f, size_t n) {
    return n * (size_t)f->bits / 8;
}
/* kvq__block_codes, kvq__block_codes_rw: after a quantized key block's fp16 scale[D], min[D] */
static __device__ __forceinline__ const uint8_t *kvq__cu_block_codes(const uint8_t *blk, int D) {
    return blk + 4 * (size_t)D;
}
static __device__ __forceinline__ uint8_t *kvq__cu_block_codes_rw(uint8_t *blk, int D) { return blk + 4 * (size_t)D; }

/* ---------------------------------------------------------------------------
   Quantize. kvq.h's formula, operation for operation:
     m16 = fp16(lo), s16 = fp16((hi - lo) / (2^b - 1)),
     code = clamp(round_half_even((x - m16) / s16), 0, 2^b - 1); s16 == 0 gives code 0.
   Every operation is an explicit IEEE-rounded intrinsic, so nvcc cannot contract
   anything into an FMA or use an approximate division. lo and hi use kvq.h's exact
   comparisons (a < b ? a : b), not fminf, so -0.0 vs +0.0 resolves the same way.
   (x - m16) / s16 stays far inside int range: |x - m16| <= range + ulp(m16)/2 and
   s16 >= 2^-24, so the float->int conversion never saturates on either side.
   Params are kvq.h's kvq__qparams (a plain struct, usable on the device): two fp16, or
   with value_param_bits 16 (quantized values only) kvq.h's packed pair, the scale byte e
   (the fp16 whose bits are e << 7) and an int8 min m8 in units of scale / 16.
   --------------------------------------------------------------------------- */

/* kvq__fit_range: fp16 min and scale. */
static __device__ __forceinline__ kvq__qparams kvq__cu_fit_range(float lo, float hi, int bits) {
    kvq__qparams qp;
    qp.min = kvq__cu_f32_to_f16(lo);
    qp.scale = kvq__cu_f32_to_f16(__fdiv_rn(__fsub_rn(hi, lo), (float)((1 << bits) - 1)));
    return qp;
}

/* kvq__e5m3, kvq__min16: the 8-bit scale and the int8 min (m8 * s is exact: 8 x 4 bits). */
static __device__ __forceinline__ float kvq__cu_e5m3(unsigned e) { return kvq__cu_f16_to_f32((uint16_t)(e << 7)); }
static __device__ __forceinline__ float kvq__cu_min16(unsigned e, unsigned m8) {
    const int v = (int)(m8 & 0xffu) - (m8 & 0x80u ? 256 : 0); /* int8, two's complement */
    return __fmul_rn(__fmul_rn((float)v, kvq__cu_e5m3(e)), 0.0625f);
}

/* kvq__fit_range16: the smallest 8-bit scale >= (hi - lo) / (2^b - 1), -lo / 8 and lo / 7.9375,
   raised until lo lies in [-8 s, 127 s / 16] (a rounded division), then m8 = round(16 lo / s),
   clamped to int8. */
static __device__ kvq__qparams kvq__cu_fit_range16(float lo, float hi, int bits) {
    float need = __fdiv_rn(__fsub_rn(hi, lo), (float)((1 << bits) - 1));
    unsigned h, e;
    float s, m8;
    kvq__qparams qp;
    need = __fmul_rn(-0.125f, lo) > need ? __fmul_rn(-0.125f, lo) : need;
    need = __fdiv_rn(lo, 7.9375f) > need ? __fdiv_rn(lo, 7.9375f) : need;
    h = kvq__cu_f32_to_f16(need);
    h += kvq__cu_f16_to_f32((uint16_t)h) < need; /* fp16 rounded up, then its low 7 bits */
    e = (h + 0x7fu) >> 7;
    e = e > 0xf7u ? 0xf7u : e; /* 0xf8 and up: inf, NaN */
    while (e < 0xf7u &&
           !(lo >= __fmul_rn(-8.0f, kvq__cu_e5m3(e)) && lo <= __fmul_rn(7.9375f, kvq__cu_e5m3(e))))
        e++;
    s = kvq__cu_e5m3(e);
    m8 = s == 0.0f ? 0.0f : rintf(__fdiv_rn(__fmul_rn(lo, 16.0f), s));
    m8 = m8 < -128.0f ? -128.0f : m8 > 127.0f ? 127.0f : m8;
    qp.scale = (uint16_t)e;
    qp.min = (uint16_t)((unsigned)((int)m8 + 256) & 0xffu);
    return qp;
}

/* kvq__fit, kvq__params_f32, kvq__put_params, kvq__get_params: pbits 32 (two fp16) or 16. */
static __device__ __forceinline__ kvq__qparams kvq__cu_fit(float lo, float hi, int bits, int pbits) {
    return pbits == 16 ? kvq__cu_fit_range16(lo, hi, bits) : kvq__cu_fit_range(lo, hi, bits);
}
static __device__ __forceinline__ void kvq__cu_params_f32(kvq__qparams qp, int pbits, float *m, float *s) {
    *s = pbits == 16 ? kvq__cu_e5m3(qp.scale) : kvq__cu_f16_to_f32(qp.scale);
    *m = pbits == 16 ? kvq__cu_min16(qp.scale, qp.min) : kvq__cu_f16_to_f32(qp.min);
}
/* Group g of a record's ng groups: fp16 scale[ng] then min[ng], or one u16 (scale | m8 << 8). */
static __device__ __forceinline__ void kvq__cu_put_params(uint16_t *par, int ng, int g, kvq__qparams qp, int pbits) {
    if (pbits == 16) par[g] = (uint16_t)(qp.scale | qp.min << 8);
    else {
        par[g] = qp.scale;
        par[ng + g] = qp.min;
    }
}
static __device__ __forceinline__ kvq__qparams kvq__cu_get_params(const uint16_t *par, int ng, int g, int pbits) {
    kvq__qparams qp;
    qp.scale = pbits == 16 ? (uint16_t)(par[g] & 0xffu) : par[g];
    qp.min = pbits == 16 ? (uint16_t)(par[g] >> 8) : par[ng + g];
    return qp;
}

static __device__ __forceinline__ unsigned kvq__cu_quantize_one(float x, float m, float s, int bits) {
    int code;
    if (s == 0.0f) return 0;
    code = __float2int_rn(__fdiv_rn(__fsub_rn(x, m), s)); /* round half to even */
    if (code < 0) code = 0;
    if (code > (1 << bits) - 1) code = (1 << bits) - 1;
    return (unsigned)code;
}

/* kvq.h's range search (its Quantize section), operation for operation: each float and double
   operation an explicit IEEE-rounded intrinsic, in kvq.h's order, so the sums and the picks
   are kvq.h's. Candidate (i, j): the range with i steps of the min/max range off the bottom
   and j off the top; m, 1/s (0: no range left) and s^2 in float. */
typedef struct kvq__cu_cand { float lo, hi, m, r, s2; } kvq__cu_cand;

static __device__ __forceinline__ double kvq__cu_search_step(int bits, int steps) {
    return rint(__ddiv_rn(__ddiv_rn(96.0, (double)(1 << (bits - 2))), (double)(steps - 1))) / 256.0;
}

static __device__ kvq__cu_cand kvq__cu_search_candidate(float lo, float hi, int bits, int pbits, double step, int i,
                                                        int j) {
    const double range = __dsub_rn((double)hi, (double)lo);
    kvq__cu_cand c;
    float s;
    c.lo = i ? __double2float_rn(__dadd_rn((double)lo, __dmul_rn(range, __dmul_rn((double)i, step)))) : lo;
    c.hi = j ? __double2float_rn(__dsub_rn((double)hi, __dmul_rn(range, __dmul_rn((double)j, step)))) : hi;
    s = __fdiv_rn(__fsub_rn(c.hi, c.lo), (float)((1 << bits) - 1));
    c.m = c.lo;
    if (pbits == 16) kvq__cu_params_f32(kvq__cu_fit_range16(c.lo, c.hi, bits), 16, &c.m, &s); /* scored as stored */
    c.r = s > 0.0f ? __fdiv_rn(1.0f, s) : 0.0f;
    c.s2 = __fmul_rn(s, s);
    return c;
}

/* kvq__search_term: the squared rounding error of x in units of s^2, d kept to 9 bits. */
static __device__ __forceinline__ float kvq__cu_search_term(float x, float m, float r, float top) {
    float u = __fmul_rn(__fsub_rn(x, m), r), c = u < 0.0f ? 0.0f : u, d;
    unsigned b;
    c = c > top ? top : c;
    c = __fsub_rn(__fadd_rn(c, 12582912.0f), 12582912.0f);
    d = __fsub_rn(u, c);
    b = ((__float_as_uint(d) & 0x7fffffffu) + 0x2000u) & 0x7fffc000u;
    b = b < 0x2b800000u ? 0u : b;
    d = __uint_as_float(b);
    return __fmul_rn(d, d);
}

/* kvq.h's search (kvq__search_row_with) of one group x[0..n) (n a multiple of 8), eight lanes
   combined in a fixed order; the bottom side first, then the top from the best bottom. Sets *lo,
   *hi. */
static __device__ void kvq__cu_search_group(const float *x, int n, int bits, int pbits, int steps, float *lo,
                                            float *hi) {
    const float top = (float)((1 << bits) - 1);
    const double step = kvq__cu_search_step(bits, steps);
    const float lo0 = *lo, hi0 = *hi;
    float best_err = 0.0f;
    int side, k, i_best = 0, t, l;
    for (side = 0; side < 2; side++)
        for (k = 0; k < (side ? steps - 1 : steps); k++) {
            const kvq__cu_cand c =
                kvq__cu_search_candidate(lo0, hi0, bits, pbits, step, side ? i_best : k, side ? k + 1 : 0);
            float a[8] = {0, 0, 0, 0, 0, 0, 0, 0}, e;
            if (c.r == 0.0f) continue;
            for (t = 0; t < n; t += 8)
                for (l = 0; l < 8; l++) a[l] = __fadd_rn(a[l], kvq__cu_search_term(x[t + l], c.m, c.r, top));
            e = __fmul_rn(__fadd_rn(__fadd_rn(__fadd_rn(a[0], a[4]), __fadd_rn(a[1], a[5])),
                                    __fadd_rn(__fadd_rn(a[2], a[6]), __fadd_rn(a[3], a[7]))),
                          c.s2);
            if ((side | k) == 0 || e < best_err) {
                best_err = e;
                *lo = c.lo;
                *hi = c.hi;
                if (!side) i_best = k;
            }
        }
}

/* kvq__search_columns for one channel: x[t] of G tokens weighted by w[t] (0: left out), one
   sum in token order. */
static __device__ void kvq__cu_search_columns(const float *x, int G, const uint8_t *w, int bits, int steps,
                                              float *lo, float *hi) {
    const float top = (float)((1 << bits) - 1);
    const double step = kvq__cu_search_step(bits, steps);
    const float lo0 = *lo, hi0 = *hi;
    float best_err = 0.0f;
    int k, i_best = 0, t;
    for (k = 0; k < 2 * steps - 1; k++) {
        const int i = k < steps ? k : i_best, j = k < steps ? 0 : k - steps + 1;
        const kvq__cu_cand c = kvq__cu_search_candidate(lo0, hi0, bits, 32, step, i, j);
        float acc = 0.0f, e;
        for (t = 0; t < G; t++)
            if (w[t]) acc = __fadd_rn(acc, __fmul_rn((float)w[t], kvq__cu_search_term(x[t], c.m, c.r, top)));
        e = __fmul_rn(acc, c.s2);
        if (k == 0 || (c.r != 0.0f && e < best_err)) {
            best_err = e;
            *lo = c.lo;
            *hi = c.hi;
            i_best = i;
        }
    }
}

/* What the device kernels need to know about one cache, in kvq.h's words: struct kvq_cache's
   field names (arrays, counts, capacities, record sizes), its config's (key_bits, value_bits,
   salient_bits, salient_policy), and kvq.h's local names D, H, S, G, ng (head_dim, n_kv_heads,
   sink_tokens, group_size, kvq__value_groups). */
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
    float *sal_ring;     /* attention with tracking: raw scores of waiting keys [row][kcap], else NULL */
    float *row_ml;       /* attention with tracking: merged (max, sum) per row */
    int D, H, S, G, key_bits, value_bits, ng; /* G: channels per value group (and per key-per-token group) */
    int n_tokens, n_kblocks, n_vquant, max_kblocks, max_vquant, kcap, vcap;
    int kblock_bytes, vparam_bytes, vcode_bytes; /* vparam_bytes: params of a value record (0 at 16 bits) */
    int n_salient, side_bytes, salient_bits, salient_policy;
    int key_tokens, ktparam_bytes, ktcode_bytes; /* keys per token: flag, record layout (n_ktok = n_vquant) */
    /* shorts, so that KVQ_CUDA_MAX_BATCH views stay a kernel parameter (below) */
    short kb;            /* tokens per key block (kvq.h's c->kb: key_block, or G where it is 0) */
    short vpb;           /* bits of a quantized value group's params: 32 or 16 (kvq__vpb) */
    short kgrid, vgrid;  /* range search steps a side for key and value groups (1: min/max), as kvq.h's */
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
    int n, n_old, after_old, n_kblocks_old, n_kblocks_new, n_vquant_old, n_vquant_new;
} kvq__cuda_append;

/* Key row of position pos (past the sinks) as floats: from the ring if it was stored by an
   earlier append, else from this append's input (rounded to fp16 exactly as the ring would). */
static __device__ __forceinline__ float kvq__cu_key_at(const kvq__cuda_append &a, int h, int pos, int ch) {
    const kvq__cuda_view &c = a.c;
    if (pos < a.after_old)
        return kvq__cu_f16_to_f32(c.ring_k[((size_t)h * c.kcap + (size_t)(pos % c.kcap)) * c.D + ch]);
    return kvq__cu_f16_to_f32(kvq__cu_f32_to_f16(a.k[((size_t)(pos + c.S - a.n_old) * c.H + h) * c.D + ch]));
}
static __device__ __forceinline__ float kvq__cu_value_at(const kvq__cuda_append &a, int h, int pos, int ch) {
    const kvq__cuda_view &c = a.c;
    if (pos < a.after_old)
        return kvq__cu_f16_to_f32(c.ring_v[((size_t)h * c.vcap + (size_t)(pos % c.vcap)) * c.D + ch]);
    return kvq__cu_f16_to_f32(kvq__cu_f32_to_f16(a.v[((size_t)(pos + c.S - a.n_old) * c.H + h) * c.D + ch]));
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
   salient_bits, entries in token order. Runs once per key block, so it is kept simple.
   --------------------------------------------------------------------------- */

static __device__ __forceinline__ uint8_t *kvq__cu_side_entry(const kvq__cuda_view &c, int h, int b, int j) {
    return c.side + (((size_t)h * c.max_kblocks + b) * c.n_salient + j) * (size_t)c.side_bytes;
}
static __device__ __forceinline__ int kvq__cu_side_index(const uint8_t *e) { return e[0] | e[1] << 8; }
/* kvq__side_params_at, kvq__side_codes_at: byte offsets of the K (which 0) or V (1) part of an
   entry: after the u16 index, K's params, V's params, K's codes, V's codes (no params at 16 bits). */
static __device__ __forceinline__ size_t kvq__cu_side_params_at(const kvq__cuda_view &c, int which) {
    return 2 + (size_t)which * c.ng * kvq__cu_fmt(c.salient_bits)->param_bytes;
}
static __device__ __forceinline__ size_t kvq__cu_side_codes_at(const kvq__cuda_view &c, int which) {
    const kvq__format *f = kvq__cu_fmt(c.salient_bits);
    return 2 + 2 * (size_t)c.ng * f->param_bytes + (size_t)which * kvq__cu_row_bytes(f, c.D);
}

/* kvq__range_gain: per channel, the gap a token opens alone at the top or bottom, over the range. */
static __device__ void kvq__cu_range_gain(const kvq__cuda_append &a, int h, int b, float *gain) {
    const int D = a.c.D, G = a.c.kb;
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
    const int G = c.kb;
    const size_t slot0 = (size_t)h * c.kcap + (size_t)((b * G) % c.kcap); /* G slots in a row */
    float score[128];
    int t, j, seen_any = 0;
    if (c.salient_policy == KVQ_SALIENT_ATTENTION)
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
    uint16_t *par = (uint16_t *)(e + kvq__cu_side_params_at(c, which));
    uint8_t *codes = e + kvq__cu_side_codes_at(c, which);
    int g, i;
    if (!kvq__cu_fmt(c.salient_bits)->quantized) {
        uint16_t *row = (uint16_t *)codes;
        for (i = 0; i < D; i++)
            row[i] = kvq__cu_f32_to_f16(which ? kvq__cu_value_at(a, h, pos, i) : kvq__cu_key_at(a, h, pos, i));
        return;
    }
    for (g = 0; g < ng; g++) {
        const int c0 = g * G, n = D - c0 < G ? D - c0 : G;
        float x[128], lo, hi, s, m;
        kvq__qparams qp;
        for (i = 0; i < n; i++) x[i] = which ? kvq__cu_value_at(a, h, pos, c0 + i) : kvq__cu_key_at(a, h, pos, c0 + i);
        lo = hi = x[0];
        for (i = 1; i < n; i++) {
            lo = x[i] < lo ? x[i] : lo;
            hi = x[i] > hi ? x[i] : hi;
        }
        qp = kvq__cu_fit(lo, hi, 8, 32); /* side-store entries keep fp16 params */
        kvq__cu_put_params(par, ng, g, qp, 32);
        kvq__cu_params_f32(qp, 32, &m, &s);
        for (i = 0; i < n; i++) codes[c0 + i] = (uint8_t)kvq__cu_quantize_one(x[i], m, s, 8);
    }
}

/* kvq__store_salient: blocks [n_kblocks_old, n_kblocks_new) of every head: picks the salient
   tokens and fills their entries (u16 token index in the block, little-endian, then K and V).
   One thread per (head, block). */
__global__ void kvq__cu_store_salient_kernel(kvq__cuda_append a) {
    const kvq__cuda_view &c = a.c;
    const int nb = a.n_kblocks_new - a.n_kblocks_old;
    size_t total = (size_t)c.H * nb, idx;
    for (idx = (size_t)blockIdx.x * blockDim.x + threadIdx.x; idx < total; idx += (size_t)gridDim.x * blockDim.x) {
        int b = a.n_kblocks_old + (int)(idx % nb), h = (int)(idx / nb), t, j = 0;
        uint8_t mask[128];
        kvq__cu_select_salient(a, h, b, mask);
        for (t = 0; t < c.kb; t++) {
            uint8_t *e;
            if (!mask[t]) continue;
            e = kvq__cu_side_entry(c, h, b, j++);
            e[0] = (uint8_t)t;
            e[1] = 0;
            kvq__cu_side_put(a, e, 0, h, b * c.kb + t);
            kvq__cu_side_put(a, e, 1, h, b * c.kb + t);
        }
    }
}

/* mask[t] = 1 for the tokens of block b of head h that the side store holds. */
static __device__ void kvq__cu_block_mask(const kvq__cuda_view &c, int h, int b, uint8_t *mask) {
    int t, j;
    for (t = 0; t < c.kb; t++) mask[t] = 0;
    for (j = 0; j < c.n_salient; j++) {
        const uint8_t *e = kvq__cu_side_entry(c, h, b, j);
        mask[kvq__cu_side_index(e)] = 1;
    }
}

/* kvq__key_weights: in caches that record attention, each key's normalized score plus 0.1x the
   block's mean, scaled to 1..31; 0 if a token has no queries yet (this append's count as none). */
static __device__ int kvq__cu_key_weights(const kvq__cuda_append &a, int h, int b, uint8_t *w) {
    const kvq__cuda_view &c = a.c;
    const int G = c.kb;
    const size_t slot0 = (size_t)h * c.kcap + (size_t)((b * G) % c.kcap);
    float s[128], mean = 0.0f, top = 0.0f;
    int t;
    if (!c.n_salient || c.salient_policy != KVQ_SALIENT_ATTENTION) return 0;
    for (t = 0; t < G; t++) {
        const uint32_t seen = b * G + t < a.after_old ? c.sal_seen[slot0 + t] : 0u;
        if (!seen) return 0;
        s[t] = __fdiv_rn(c.sal_score[slot0 + t], (float)seen);
        mean = __fadd_rn(mean, s[t]);
    }
    mean = __fdiv_rn(__fmul_rn(0.1f, mean), (float)G);
    for (t = 0; t < G; t++) top = __fadd_rn(s[t], mean) > top ? __fadd_rn(s[t], mean) : top;
    if (!(top > 0.0f)) return 0;
    for (t = 0; t < G; t++) {
        const float q = rintf(__fmul_rn(31.0f, __fdiv_rn(__fadd_rn(s[t], mean), top)));
        w[t] = (uint8_t)(q < 1.0f ? 1.0f : q);
    }
    return 1;
}

/* kvq__quantize_key_block: key blocks [n_kblocks_old, n_kblocks_new) of every head, one thread
   per (head, block, channel). Salient caches leave the side store's tokens out
   (kvq__quantize_key_block_masked): they take no part in the min/max, which starts from +-inf
   there, and their codes stay 0. */
__global__ void kvq__cu_quantize_key_block_kernel(kvq__cuda_append a) {
    const kvq__cuda_view &c = a.c;
    const int D = c.D, G = c.kb, bits = c.key_bits; /* G: tokens per key block */
    const kvq__format *f = kvq__cu_fmt(bits);
    const int nb = a.n_kblocks_new - a.n_kblocks_old;
    size_t total = (size_t)c.H * nb * D, idx;
    for (idx = (size_t)blockIdx.x * blockDim.x + threadIdx.x; idx < total; idx += (size_t)gridDim.x * blockDim.x) {
        int ch = (int)(idx % D), b = a.n_kblocks_old + (int)((idx / D) % nb), h = (int)(idx / ((size_t)D * nb));
        uint8_t *blk = c.kblocks + ((size_t)h * c.max_kblocks + b) * c.kblock_bytes;
        float x[128], lo, hi, s, m;
        kvq__qparams qp;
        uint8_t row[128], mask[128];
        int t, row_bytes = (int)kvq__cu_row_bytes(f, G);
        if (!f->quantized) { /* salient or not, the block keeps every row as it is */
            uint16_t *rows = (uint16_t *)blk;
            for (t = 0; t < G; t++) rows[(size_t)t * D + ch] = kvq__cu_f32_to_f16(kvq__cu_key_at(a, h, b * G + t, ch));
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
        if (c.kgrid > 1) { /* kvq__quantize_key_block_masked: weights where attention was recorded */
            uint8_t w[128];
            const int weighted = kvq__cu_key_weights(a, h, b, w);
            for (t = 0; t < G; t++) w[t] = mask[t] ? 0 : weighted ? w[t] : 1;
            kvq__cu_search_columns(x, G, w, bits, c.kgrid, &lo, &hi);
        }
        qp = kvq__cu_fit(lo, hi, bits, 32); /* fp16 scale[D], min[D] */
        kvq__cu_put_params((uint16_t *)blk, D, ch, qp, 32);
        kvq__cu_params_f32(qp, 32, &m, &s);
        for (t = 0; t < row_bytes; t++) row[t] = 0;
        for (t = 0; t < G; t++)
            if (!mask[t]) kvq__cu_put_code(row, G, t, bits, kvq__cu_quantize_one(x[t], m, s, bits));
        {
            uint8_t *dst = kvq__cu_block_codes_rw(blk, D) + (size_t)row_bytes * ch;
            for (t = 0; t < row_bytes; t++) dst[t] = row[t];
        }
    }
}

/* kvq__quantize_record: per-token records [n_vquant_old, n_vquant_new) of every head: values, or
   (keys = 1) keys stored per token, which kvq.h quantizes with the value quantizer and which
   leave with their values.
   One thread per (head, token, channel group). Groups start at multiples of G channels and
   G*bits/8 is whole bytes (G >= 16; a ragged last group has a multiple of 8 channels), so
   threads never share a code byte: at 3 bits a group's n codes are the planes of an n-code row
   of its own, n/4 bytes at c0/4 and n/8 at D/4 + c0/8 (kvq.h's Formats). */
__global__ void kvq__cu_quantize_record_kernel(kvq__cuda_append a, int keys) {
    const kvq__cuda_view &c = a.c;
    const int D = c.D, G = c.G, bits = keys ? c.key_bits : c.value_bits, ng = c.ng;
    const kvq__format *f = kvq__cu_fmt(bits);
    const int nv = a.n_vquant_new - a.n_vquant_old;
    const int par_u16 = (keys ? c.ktparam_bytes : c.vparam_bytes) / 2;
    const int code_bytes = keys ? c.ktcode_bytes : c.vcode_bytes;
    const int pbits = keys ? 32 : c.vpb; /* keys per token keep fp16 params */
    uint16_t *params = keys ? c.ktparams : c.vparams;
    size_t total = (size_t)c.H * nv * ng, idx;
    for (idx = (size_t)blockIdx.x * blockDim.x + threadIdx.x; idx < total; idx += (size_t)gridDim.x * blockDim.x) {
        int g = (int)(idx % ng), j = a.n_vquant_old + (int)((idx / ng) % nv), h = (int)(idx / ((size_t)ng * nv));
        int c0 = g * G, n = D - c0 < G ? D - c0 : G, i;
        size_t rec = (size_t)h * c.max_vquant + j;
        uint8_t *codes = (keys ? c.ktcodes : c.vcodes) + rec * code_bytes;
        float x[128], lo, hi, s, m;
        kvq__qparams qp;
        uint8_t row[128];
        for (i = 0; i < n; i++) x[i] = keys ? kvq__cu_key_at(a, h, j, c0 + i) : kvq__cu_value_at(a, h, j, c0 + i);
        if (!f->quantized) {
            for (i = 0; i < n; i++) ((uint16_t *)codes)[c0 + i] = kvq__cu_f32_to_f16(x[i]);
            continue;
        }
        lo = hi = x[0];
        for (i = 1; i < n; i++) {
            lo = x[i] < lo ? x[i] : lo;
            hi = x[i] > hi ? x[i] : hi;
        }
        if ((keys ? c.kgrid : c.vgrid) > 1)
            kvq__cu_search_group(x, n, bits, pbits, keys ? c.kgrid : c.vgrid, &lo, &hi);
        qp = kvq__cu_fit(lo, hi, bits, pbits);
        kvq__cu_put_params(params + rec * par_u16, ng, g, qp, pbits);
        kvq__cu_params_f32(qp, pbits, &m, &s);
        for (i = 0; i < (int)kvq__cu_row_bytes(f, n); i++) row[i] = 0;
        for (i = 0; i < n; i++) kvq__cu_put_code(row, n, i, bits, kvq__cu_quantize_one(x[i], m, s, bits));
        if (f->planes == 2) { /* each plane of the group's row into the record's plane */
            for (i = 0; i < n / 4; i++) codes[c0 / 4 + i] = row[i];
            for (i = 0; i < n / 8; i++) codes[D / 4 + c0 / 8 + i] = row[n / 4 + i];
        } else {
            for (i = 0; i < (int)kvq__cu_row_bytes(f, n); i++) codes[kvq__cu_row_bytes(f, c0) + i] = row[i];
        }
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
            c.sink_k[((size_t)h * S + t) * D + ch] = kvq__cu_f32_to_f16(a.k[idx]);
            c.sink_v[((size_t)h * S + t) * D + ch] = kvq__cu_f32_to_f16(a.v[idx]);
            continue;
        }
        if (pos >= (c.key_tokens ? a.n_vquant_new : a.n_kblocks_new * c.kb))
            c.ring_k[((size_t)h * c.kcap + (size_t)(pos % c.kcap)) * D + ch] = kvq__cu_f32_to_f16(a.k[idx]);
        if (c.n_salient && ch == 0 && pos >= a.n_kblocks_new * c.kb) { /* a new waiting key: no attention yet */
            c.sal_score[(size_t)h * c.kcap + (size_t)(pos % c.kcap)] = 0.0f;
            c.sal_seen[(size_t)h * c.kcap + (size_t)(pos % c.kcap)] = 0u;
        }
        if (pos >= a.n_vquant_new)
            c.ring_v[((size_t)h * c.vcap + (size_t)(pos % c.vcap)) * D + ch] = kvq__cu_f32_to_f16(a.v[idx]);
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
   Attention (FlashDecoding): kvq.h's Attention section on the GPU, its float scheme (kvq.h's
   integer kernels, kvq_set_arith, are CPU only: tests/test_cuda.cu compares with kvq.h under
   KVQ_ARITH_FLOAT). Grid: x = (query, KV
   head, slice of <= 8 query heads of its group), y = token chunk, z = sequence. A block is
   one kvq__attend_query over its chunk (kvq__cu_attend_query): it walks the chunk in tiles
   of 32 tokens, one per lane (unlike kvq.h's tiles, one may cross a segment boundary: each
   lane finds where its own token is stored, kvq__cu_key_ref), through kvq__attend_range's
   phases, each a function below, the barriers between them in the kernel:
     kvq__cu_tile_scores    the tile's keys from whatever they are stored as: kvq__cu_scores_f16,
                            kvq__cu_scores_codes (key blocks), kvq__cu_scores_record (keys per
                            token; salient tokens, whose key kvq__cu_salient_key takes from the
                            side store: kvq__salient_scores per lane, not a patch-up pass).
                            Lane = token, the 4 warps split the channels in runs of 8; every key
                            is dequantized once and dotted with all the group's query heads (in
                            shared memory, pre-scaled); partial sums stay in shared memory.
     kvq__cu_tile_softmax   per query head: the partial sums added, the running max and sum
                            with rescaling (FlashAttention); a salient token's weight is set
                            aside for its side-store value; raw scores of waiting keys kept.
     kvq__cu_tile_values    the accumulators rescaled, then kvq__cu_salient_values (the salient
                            tokens' side-store values, kvq__salient_values) and
                            kvq__cu_values_tile (the tile's values, kvq__values_tile, the salient
                            tokens' weights 0 there): thread = channel(s), each value dequantized
                            once and accumulated for every head.
   Each block leaves (max, sum, acc[D]) per query head (kvq__cu_attend_end); the merge kernel
   combines the chunks. Only tiles that hold quantized-block tokens of a salient cache do any
   salient work (a branch uniform per block). With tracking (KVQ_SALIENT_ATTENTION), the raw
   scores of waiting keys go to a scratch row per query head (sal_ring, kvq__attend_range's
   ring_scores); after the merge, kvq__cu_track_salience_kernel turns them into kvq.h's
   salience scores (kvq__track_salience).
   --------------------------------------------------------------------------- */

/* A block's shared memory, reused tile after tile. */
typedef struct kvq__cu_attn_smem {
    float q[KVQ__CUDA_HEADS * KVQ__CUDA_MAXD];                      /* query heads times the scale, [j][D] */
    float part[KVQ__CUDA_NT / 32][KVQ__CUDA_HEADS][KVQ__CUDA_TILE]; /* scores: each warp's partial sums */
    float p[KVQ__CUDA_HEADS][KVQ__CUDA_TILE];                       /* softmax weights of the codes pass */
    float m[KVQ__CUDA_HEADS], l[KVQ__CUDA_HEADS];                   /* running max and sum per head */
    float corr[KVQ__CUDA_HEADS];                                    /* this tile's exp(m_old - m_new) */
    float psal[KVQ__CUDA_HEADS][KVQ__CUDA_TILE];                    /* weights of salient tokens */
    int sal[KVQ__CUDA_TILE]; /* a token's index among its block's side-store entries, or -1 */
} kvq__cu_attn_smem;
/* q and p are read as float4 */
static_assert(offsetof(kvq__cu_attn_smem, p) % 16 == 0, "kvq__cu_attn_smem: p must be 16-byte aligned");

/* One block's work, kvq__attend_query's arguments: query i, KV head h, query heads
   [qh0, qh0 + nh) of its group, tokens [lo, hi) (chunk `chunk`, clipped to causality); D, the
   head dimension, read once. */
typedef struct kvq__cu_query {
    int D, i, h, qh0, nh, lo, hi, chunk;
} kvq__cu_query;

/* Tokens [t0, t0 + n) of a block's range, n <= 32, as one lane sees them: its token t, valid
   when t is in the range; n8 runs of 8 channels; first_wait, the first key still in the ring.
   Uniform per block: sal, the tile holds quantized-block tokens of a salient cache; track, it
   holds waiting keys whose scores are tracked. */
typedef struct kvq__cu_tile {
    int t0, t, valid, n8, n, first_wait, sal, track;
} kvq__cu_tile;

/* kvq__values_tile's locals: what the value phase reads of the view once per tile. */
typedef struct kvq__cu_vals {
    int S, G, bits, ng, pbits, quantized; /* quantized: value_bits' kvq__format */
} kvq__cu_vals;

/* Where token t's key lives: an fp16 row (16-byte aligned), a quantized block (blk, tt), or a
   per-token record (par, codes at bits: a key stored per token, or a salient token's entry in
   the side store, sal its index among the block's entries, else -1). */
typedef struct kvq__cu_keyref {
    const uint16_t *row, *par;
    const uint8_t *blk, *codes;
    int tt, sal, bits;
} kvq__cu_keyref;

/* kvq__find_salient: index of token tt among the side-store entries of block b of head h, or -1. */
static __device__ __forceinline__ int kvq__cu_find_salient(const kvq__cuda_view &v, int h, int b, int tt) {
    int j;
    for (j = 0; j < v.n_salient; j++)
        if (kvq__cu_side_index(kvq__cu_side_entry(v, h, b, j)) == tt) return j;
    return -1;
}

/* Channels [c8*8, c8*8 + 8) of a per-token record (kvq__read_token_record): m + s*code
   with the scale and min of the value group (one group holds all 8: groups start at multiples
   of G, a multiple of 8); 16 bits: codes is the fp16 row, read per element (a side-store row
   is only 2-byte aligned). */
static __device__ __forceinline__ void kvq__cu_read_token_record(const uint16_t *par, const uint8_t *codes, int bits,
                                                                 int D, int G, int ng, int c8, float *x) {
    int i;
    if (!kvq__cu_fmt(bits)->quantized) {
        for (i = 0; i < 8; i++) x[i] = kvq__cu_f16_to_f32(((const uint16_t *)codes)[c8 * 8 + i]);
    } else {
        const int g = c8 * 8 / G;
        const float s = kvq__cu_f16_to_f32(par[g]), m = kvq__cu_f16_to_f32(par[ng + g]);
        for (i = 0; i < 8; i++) x[i] = m + s * (float)kvq__cu_get_code(codes, D, c8 * 8 + i, bits);
    }
}

/* Channel ch of the value of side-store entry e (kvq__side_get's V part; quantized, 8 bits:
   a code per byte). */
static __device__ __forceinline__ float kvq__cu_side_value(const kvq__cuda_view &v, const uint8_t *e, int ch) {
    const uint8_t *codes = e + kvq__cu_side_codes_at(v, 1);
    if (!kvq__cu_fmt(v.salient_bits)->quantized) return kvq__cu_f16_to_f32(((const uint16_t *)codes)[ch]);
    {
        const uint16_t *par = (const uint16_t *)(e + kvq__cu_side_params_at(v, 1));
        const int g = ch / v.G;
        return kvq__cu_f16_to_f32(par[v.ng + g]) + kvq__cu_f16_to_f32(par[g]) * (float)codes[ch];
    }
}

/* kvq__salient_scores for one lane: the key of a salient token (entry r->sal of block b of
   head h) is the K part of its side-store entry (params after the u16 index, codes after V's
   params), a per-token record, scored by kvq__cu_scores_record instead of from the block. */
static __device__ __forceinline__ void kvq__cu_salient_key(const kvq__cuda_view &v, int h, int b,
                                                          kvq__cu_keyref *r) {
    const uint8_t *e = kvq__cu_side_entry(v, h, b, r->sal);
    r->par = (const uint16_t *)(e + kvq__cu_side_params_at(v, 0));
    r->codes = e + kvq__cu_side_codes_at(v, 0);
    r->bits = v.salient_bits;
}

/* kvq__attend_range's segments (and kvq__read_key's) for one key: a sink row, a key block
   (its salient tokens from the side store), a key stored per token, or a ring row. */
static __device__ __forceinline__ kvq__cu_keyref kvq__cu_key_ref(const kvq__cuda_view &v, int h, int t) {
    kvq__cu_keyref r;
    int pos = t - v.S;
    r.row = r.par = 0;
    r.blk = r.codes = 0;
    r.tt = r.bits = 0;
    r.sal = -1;
    if (t < v.S) {
        r.row = v.sink_k + ((size_t)h * v.S + t) * v.D;
    } else if (pos < v.n_kblocks * v.kb) {
        const uint8_t *blk = v.kblocks + ((size_t)h * v.max_kblocks + pos / v.kb) * v.kblock_bytes;
        if (v.n_salient) r.sal = kvq__cu_find_salient(v, h, pos / v.kb, pos % v.kb);
        if (r.sal >= 0) {
            kvq__cu_salient_key(v, h, pos / v.kb, &r);
        } else if (!kvq__cu_fmt(v.key_bits)->quantized) {
            r.row = (const uint16_t *)blk + (size_t)(pos % v.kb) * v.D;
        } else {
            r.blk = blk;
            r.tt = pos % v.kb;
        }
    } else if (v.key_tokens && pos < v.n_vquant) { /* keys per token leave with their values */
        const size_t rec = (size_t)h * v.max_vquant + pos;
        if (!kvq__cu_fmt(v.key_bits)->quantized) {
            r.row = (const uint16_t *)(v.ktcodes + rec * v.ktcode_bytes);
        } else {
            r.par = v.ktparams + rec * ((size_t)v.ktparam_bytes / 2);
            r.codes = v.ktcodes + rec * v.ktcode_bytes;
            r.bits = v.key_bits;
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
        f[2 * e] = kvq__cu_f16_to_f32((uint16_t)(w[e] & 0xffffu));
        f[2 * e + 1] = kvq__cu_f16_to_f32((uint16_t)(w[e] >> 16));
    }
}

/* kvq__dot8's part: sc[j] += q_j[c8*8 .. c8*8+8) . kx for the block's query heads j < nh (q in
   shared memory). */
template <int NH>
static __device__ __forceinline__ void kvq__cu_dot8(const float *q_s, int D, int c8, int nh, const float *kx,
                                                    float *sc) {
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

/* kvq__k_scores_f16 for one key, the warp's channel runs: an fp16 row, 16-byte aligned (a
   sink, a ring row, a 16-bit key block's row or 16-bit key per token). */
template <int NH>
static __device__ __forceinline__ void kvq__cu_scores_f16(const uint16_t *row, const float *q_s, int D, int n8,
                                                          int nh, int warp, float *sc) {
    int c8;
#pragma unroll 2
    for (c8 = warp; c8 < n8; c8 += KVQ__CUDA_NT / 32) {
        float kx[8];
        kvq__cu_h8(*(const uint4 *)(row + c8 * 8), kx);
        kvq__cu_dot8<NH>(q_s, D, c8, nh, kx, sc);
    }
}

/* kvq__k_scores_codes for one key, the warp's channel runs: token tt of a quantized key block
   (fp16 scale[D], min[D], then per channel a row of kb codes: row_bytes), m + s * code. */
template <int NH>
static __device__ __forceinline__ void kvq__cu_scores_codes(const uint8_t *blk, int tt, int bits, int row_bytes,
                                                            const kvq__cuda_view &v, const float *q_s, int D,
                                                            int n8, int nh, int warp, float *sc) {
    int c8;
#pragma unroll 2
    for (c8 = warp; c8 < n8; c8 += KVQ__CUDA_NT / 32) {
        float kx[8], sf[8], mf[8];
        const uint8_t *codes = kvq__cu_block_codes(blk, D) + (size_t)row_bytes * c8 * 8;
        int e;
        kvq__cu_h8(*(const uint4 *)(blk + (size_t)c8 * 16), sf);
        kvq__cu_h8(*(const uint4 *)(blk + 2 * (size_t)D + (size_t)c8 * 16), mf);
#pragma unroll
        for (e = 0; e < 8; e++)
            kx[e] = mf[e] + sf[e] * (float)kvq__cu_get_code(codes + (size_t)row_bytes * e, v.kb, tt, bits);
        kvq__cu_dot8<NH>(q_s, D, c8, nh, kx, sc);
    }
}

/* kvq__scores_key_tokens and kvq__salient_scores for one key, the warp's channel runs: a
   per-token record (a key stored per token, or a salient token's K in the side store). */
template <int NH>
static __device__ __forceinline__ void kvq__cu_scores_record(const kvq__cu_keyref &r, const kvq__cuda_view &v,
                                                             const float *q_s, int D, int n8, int nh, int warp,
                                                             float *sc) {
    int c8;
    for (c8 = warp; c8 < n8; c8 += KVQ__CUDA_NT / 32) {
        float kx[8];
        kvq__cu_read_token_record(r.par, r.codes, r.bits, D, v.G, v.ng, c8, kx);
        kvq__cu_dot8<NH>(q_s, D, c8, nh, kx, sc);
    }
}

/* kvq__attend_query: block (unit, chunk) of sequence v as a query, its query heads and its
   tokens; 0 when the block has nothing to do (uniform per block). */
template <int NH>
static __device__ __forceinline__ int kvq__cu_attend_query(const kvq__cuda_batch &b, const kvq__cuda_view &v,
                                                           int unit, int chunk, kvq__cu_query *u) {
    const int group = b.n_q_heads / v.H;
    int sl, limit;
    if (chunk >= v.n_chunks) return 0;
    u->i = unit / (v.H * b.n_slices);
    if (u->i >= b.n_queries) return 0; /* (the grid is exact; a guard) */
    unit -= u->i * v.H * b.n_slices;
    u->h = unit / b.n_slices;
    sl = unit - u->h * b.n_slices;
    u->qh0 = u->h * group + sl * NH;
    u->nh = group - sl * NH < NH ? group - sl * NH : NH;
    limit = v.n_tokens - b.n_queries + u->i + 1; /* causal: query i sees tokens <= its position */
    u->chunk = chunk;
    u->lo = chunk * v.chunk;
    u->hi = u->lo + v.chunk < limit ? u->lo + v.chunk : limit;
    return 1;
}

/* kvq__attend_query's and kvq__attend_range's start: the query heads times the scale into
   shared memory, empty running states and accumulators. */
template <int NH, int KCH>
static __device__ __forceinline__ void kvq__cu_attend_begin(const kvq__cuda_batch &b, const kvq__cuda_view &v,
                                                            const kvq__cu_query &u, kvq__cu_attn_smem &sm, int tid,
                                                            float (&acc)[NH][KCH]) {
    const int D = u.D;
    int j, k;
    for (k = tid; k < u.nh * D; k += KVQ__CUDA_NT)
        sm.q[k] = v.q[((size_t)u.i * b.n_q_heads + u.qh0 + k / D) * D + k % D] * b.scale;
    if (tid < KVQ__CUDA_HEADS) {
        sm.m[tid] = -INFINITY;
        sm.l[tid] = 0.0f;
    }
#pragma unroll
    for (j = 0; j < NH; j++)
#pragma unroll
        for (k = 0; k < KCH; k++) acc[j][k] = 0.0f;
}

/* The tile of the block's range that starts at t0, as lane `lane` sees it. */
static __device__ __forceinline__ kvq__cu_tile kvq__cu_tile_at(const kvq__cuda_view &v, const kvq__cu_query &u,
                                                               int t0, int lane) {
    kvq__cu_tile tl;
    tl.t0 = t0;
    tl.t = t0 + lane;
    tl.valid = tl.t < u.hi;
    tl.n8 = u.D / 8;
    tl.n = u.hi - t0 < KVQ__CUDA_TILE ? u.hi - t0 : KVQ__CUDA_TILE;
    tl.first_wait = v.S + v.n_kblocks * v.kb;
    /* & rather than &&: no branch (with &&, ptxas spilled registers in some NH, KCH shapes) */
    tl.sal = (v.n_salient != 0) & ((t0 > v.S ? t0 : v.S) < (t0 + tl.n < tl.first_wait ? t0 + tl.n : tl.first_wait));
    tl.track = (v.sal_ring != 0) & (t0 + tl.n > tl.first_wait);
    return tl;
}

/* kvq__attend_range's scores: lane = token, each warp its share of the channel runs, through
   the loop of the key's form (a loop per form, not one with a branch inside, so each unrolls
   and keeps loads in flight). Leaves the partial sums in sm.part[warp] and, in salient tiles,
   each token's side-store entry (or -1) in sm.sal. */
template <int NH>
static __device__ __forceinline__ void kvq__cu_tile_scores(const kvq__cuda_view &v, const kvq__cu_query &u,
                                                           const kvq__cu_tile &tl, kvq__cu_attn_smem &sm, int lane,
                                                           int warp) {
    float sc[NH];
    int j, sal = -1;
#pragma unroll
    for (j = 0; j < NH; j++) sc[j] = 0.0f;
    if (tl.valid) {
        const kvq__cu_keyref r = kvq__cu_key_ref(v, u.h, tl.t);
        const int bits = v.key_bits, row_bytes = (int)kvq__cu_row_bytes(kvq__cu_fmt(bits), v.kb); /* a channel row */
        if (r.row) {
            kvq__cu_scores_f16<NH>(r.row, sm.q, u.D, tl.n8, u.nh, warp, sc);
        } else if (r.codes) {
            sal = r.sal;
            kvq__cu_scores_record<NH>(r, v, sm.q, u.D, tl.n8, u.nh, warp, sc);
        } else {
            kvq__cu_scores_codes<NH>(r.blk, r.tt, bits, row_bytes, v, sm.q, u.D, tl.n8, u.nh, warp, sc);
        }
    }
#pragma unroll
    for (j = 0; j < NH; j++) sm.part[warp][j][lane] = sc[j];
    if (tl.sal && warp == 0) sm.sal[lane] = sal;
}

/* kvq__attend_range's online softmax for query head j of the block (lane = token): the warps'
   partial scores added, the tile's max and exp-sum by shuffles, the running (max, sum) and the
   accumulators' factor updated by lane 0, the weights into sm.p; a salient token's weight goes
   to sm.psal instead, for its side-store value (kvq__salient_values' first half: the codes pass
   gets 0 for it). With tracking, waiting keys' raw scores go to the head's sal_ring row
   (kvq__attend_range's ring_scores). */
static __device__ __forceinline__ void kvq__cu_tile_softmax(const kvq__cuda_batch &b, const kvq__cuda_view &v,
                                                            const kvq__cu_query &u, const kvq__cu_tile &tl,
                                                            kvq__cu_attn_smem &sm, int j, int lane) {
    float s = -INFINITY, mx, m_new, p, sum;
    int w, o;
    if (tl.valid) {
        s = 0.0f;
        for (w = 0; w < KVQ__CUDA_NT / 32; w++) s += sm.part[w][j][lane];
    }
    mx = s;
    for (o = 16; o; o >>= 1) mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, o));
    m_new = fmaxf(sm.m[j], mx); /* finite: the tile has a valid token */
    p = tl.valid ? expf(s - m_new) : 0.0f;
    sum = p;
    for (o = 16; o; o >>= 1) sum += __shfl_xor_sync(0xffffffffu, sum, o);
    if (tl.sal && sm.sal[lane] >= 0) {
        sm.psal[j][lane] = p;
        p = 0.0f;
    }
    sm.p[j][lane] = p;
    if (tl.track && tl.valid && tl.t >= tl.first_wait)
        v.sal_ring[((size_t)u.i * b.n_q_heads + u.qh0 + j) * v.kcap + (tl.t - tl.first_wait)] = s;
    if (lane == 0) {
        const float corr = expf(sm.m[j] - m_new); /* exp(-inf) = 0 on the first tile */
        sm.corr[j] = corr;
        sm.l[j] = sm.l[j] * corr + sum;
        sm.m[j] = m_new;
    }
}

/* kvq__salient_values: each salient token of the tile adds its weight (sm.psal) times its
   side-store value; thread = channels tid, tid + 128, ... */
template <int NH, int KCH>
static __device__ __forceinline__ void kvq__cu_salient_values(const kvq__cuda_view &v, const kvq__cu_query &u,
                                                              const kvq__cu_tile &tl, const kvq__cu_vals &vl,
                                                              const kvq__cu_attn_smem &sm, int tid,
                                                              float (&acc)[NH][KCH]) {
    int tt, j, k;
    for (tt = 0; tt < tl.n; tt++) {
        const uint8_t *e;
        if (sm.sal[tt] < 0) continue;
        e = kvq__cu_side_entry(v, u.h, (tl.t0 + tt - vl.S) / v.kb, sm.sal[tt]);
#pragma unroll
        for (k = 0; k < KCH; k++) {
            const int ch = tid + k * KVQ__CUDA_NT;
            if (ch < u.D) {
                const float x = kvq__cu_side_value(v, e, ch);
#pragma unroll
                for (j = 0; j < NH; j++)
                    if (j < u.nh) acc[j][k] += sm.psal[j][tt] * x;
            }
        }
    }
}

/* kvq__values_tile's segments for one token: channels tid + k * 128 of token tk's value from a
   sink row, a quantized record (m + s * code, kvq__value_params_f32's params: an fp16 pair or
   16-bit params) or a ring row; 0 for a token past the tile (in_tile 0). */
template <int KCH>
static __device__ __forceinline__ void kvq__cu_value_channels(const kvq__cuda_view &v, const kvq__cu_vals &vl, int D,
                                                              int h, int tk, int in_tile, int tid, float *vx) {
    const int pos = tk - vl.S;
    const uint16_t *row = 0, *par = 0;
    const uint8_t *codes = 0;
    int k;
    if (!in_tile) {
        row = 0;
    } else if (tk < vl.S) {
        row = v.sink_v + ((size_t)h * vl.S + tk) * D;
    } else if (pos >= v.n_vquant) {
        row = v.ring_v + ((size_t)h * v.vcap + (size_t)(pos % v.vcap)) * D;
    } else {
        size_t rec = (size_t)h * v.max_vquant + pos;
        codes = v.vcodes + rec * v.vcode_bytes;
        if (!vl.quantized) row = (const uint16_t *)codes;
        else par = v.vparams + rec * ((size_t)v.vparam_bytes / 2);
    }
#pragma unroll
    for (k = 0; k < KCH; k++) {
        int ch = tid + k * KVQ__CUDA_NT;
        vx[k] = 0.0f;
        if (ch < D) {
            if (row) {
                vx[k] = kvq__cu_f16_to_f32(row[ch]);
            } else if (par) {
                float m, s;
                kvq__cu_params_f32(kvq__cu_get_params(par, vl.ng, ch / vl.G, vl.pbits), vl.pbits, &m, &s);
                vx[k] = m + s * (float)kvq__cu_get_code(codes, D, ch, vl.bits);
            }
        }
    }
}

/* kvq__values_tile: the tile's values into the accumulators of the thread's channels
   tid + k * 128, weights sm.p. Four tokens at a time: four independent loads in flight per
   thread, and one float4 of softmax weights per head (tokens past n have weight 0, value 0). */
template <int NH, int KCH>
static __device__ __forceinline__ void kvq__cu_values_tile(const kvq__cuda_view &v, const kvq__cu_query &u,
                                                           const kvq__cu_tile &tl, const kvq__cu_vals &vl,
                                                           const kvq__cu_attn_smem &sm, int tid,
                                                           float (&acc)[NH][KCH]) {
    int tt, w, j, k;
    for (tt = 0; tt < tl.n; tt += 4) {
        float vx[4][KCH];
#pragma unroll
        for (w = 0; w < 4; w++)
            kvq__cu_value_channels<KCH>(v, vl, u.D, u.h, tl.t0 + tt + w, tt + w < tl.n, tid, vx[w]);
#pragma unroll
        for (j = 0; j < NH; j++) {
            if (j < u.nh) {
                const float4 p = *(const float4 *)&sm.p[j][tt];
#pragma unroll
                for (k = 0; k < KCH; k++)
                    acc[j][k] += p.x * vx[0][k] + p.y * vx[1][k] + p.z * vx[2][k] + p.w * vx[3][k];
            }
        }
    }
}

/* kvq__attend_range's value phase: the accumulators rescaled by this tile's exp(m_old - m_new),
   then the salient tokens' side-store values (kvq__cu_salient_values) and the tile's values
   (kvq__cu_values_tile). Thread = channels tid, tid + 128, ... */
template <int NH, int KCH>
static __device__ __forceinline__ void kvq__cu_tile_values(const kvq__cuda_view &v, const kvq__cu_query &u,
                                                           const kvq__cu_tile &tl, const kvq__cu_attn_smem &sm,
                                                           int tid, float (&acc)[NH][KCH]) {
    kvq__cu_vals vl;
    float corr[NH];
    int j, k;
    vl.S = v.S;
    vl.G = v.G;
    vl.bits = v.value_bits;
    vl.quantized = kvq__cu_fmt(v.value_bits)->quantized;
    vl.ng = v.ng;
    vl.pbits = v.vpb;
#pragma unroll
    for (j = 0; j < NH; j++) corr[j] = j < u.nh ? sm.corr[j] : 0.0f;
#pragma unroll
    for (j = 0; j < NH; j++)
#pragma unroll
        for (k = 0; k < KCH; k++) acc[j][k] *= corr[j];
    if (tl.sal) kvq__cu_salient_values<NH, KCH>(v, u, tl, vl, sm, tid, acc);
    kvq__cu_values_tile<NH, KCH>(v, u, tl, vl, sm, tid, acc);
}

/* The block's partial state per query head for the merge, [row][chunk] (max, sum, acc[D]):
   kvq__attend_query's kvq__head_state, unnormalized. */
template <int NH, int KCH>
static __device__ __forceinline__ void kvq__cu_attend_end(const kvq__cuda_batch &b, const kvq__cuda_view &v,
                                                          const kvq__cu_query &u, const kvq__cu_attn_smem &sm,
                                                          int tid, const float (&acc)[NH][KCH]) {
    const int D = u.D;
    int j, k;
    for (j = 0; j < u.nh; j++) {
        size_t row = (size_t)u.i * b.n_q_heads + u.qh0 + j;
        float *st = v.part + (row * v.n_chunks + u.chunk) * (size_t)(D + 2);
        if (tid == 0) {
            st[0] = u.lo < u.hi ? sm.m[j] : -INFINITY;
            st[1] = u.lo < u.hi ? sm.l[j] : 0.0f;
        }
    }
#pragma unroll
    for (j = 0; j < NH; j++) { /* unrolled, so acc stays in registers */
        if (j < u.nh) {
            size_t row = (size_t)u.i * b.n_q_heads + u.qh0 + j;
            float *st = v.part + (row * v.n_chunks + u.chunk) * (size_t)(D + 2);
#pragma unroll
            for (k = 0; k < KCH; k++) {
                int ch = tid + k * KVQ__CUDA_NT;
                if (ch < D) st[2 + ch] = acc[j][k];
            }
        }
    }
}

/* NH: query heads per block (1, 2, 4, 8); KCH: channels per thread in the value phase (ceil(D / 128)).
   Both compile-time, so the accumulators are exactly the registers a shape needs. The driver of
   the phases above (kvq__attend_query, then kvq__attend_range's tile loop); every barrier is here. */
template <int NH, int KCH>
__global__ void __launch_bounds__(KVQ__CUDA_NT) kvq__cu_attn_kernel(const __grid_constant__ kvq__cuda_batch b) {
    __shared__ __align__(16) kvq__cu_attn_smem sm;
    const kvq__cuda_view &v = b.v[blockIdx.z];
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    kvq__cu_query u;
    float acc[NH][KCH];
    int t0, j;
    u.D = v.D;
    if (!kvq__cu_attend_query<NH>(b, v, blockIdx.x, blockIdx.y, &u)) return;
    kvq__cu_attend_begin<NH, KCH>(b, v, u, sm, tid, acc);
    __syncthreads();
    for (t0 = u.lo; t0 < u.hi; t0 += KVQ__CUDA_TILE) {
        const kvq__cu_tile tl = kvq__cu_tile_at(v, u, t0, lane);
        kvq__cu_tile_scores<NH>(v, u, tl, sm, lane, warp);
        __syncthreads();
        for (j = warp; j < u.nh; j += KVQ__CUDA_NT / 32) /* warp w: heads w, w + 4 */
            kvq__cu_tile_softmax(b, v, u, tl, sm, j, lane);
        __syncthreads();
        kvq__cu_tile_values<NH, KCH>(v, u, tl, sm, tid, acc);
        __syncthreads(); /* sm.part and sm.p are reused by the next tile */
    }
    kvq__cu_attend_end<NH, KCH>(b, v, u, sm, tid, acc);
}

/* kvq__merge_row: combines the chunks of one (query, query head) row,
   out = sum_c e^(m_c - M) acc_c / sum_c e^(m_c - M) l_c. */
__global__ void __launch_bounds__(KVQ__CUDA_NT) kvq__cu_merge_row_kernel(const __grid_constant__ kvq__cuda_batch b) {
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
__global__ void kvq__cu_track_salience_kernel(const __grid_constant__ kvq__cuda_batch b) {
    const kvq__cuda_view &v = b.v[blockIdx.y];
    const int group = b.n_q_heads / v.H, after = v.n_tokens > v.S ? v.n_tokens - v.S : 0;
    const int waiting = after - v.n_kblocks * v.kb, first_wait = v.S + v.n_kblocks * v.kb;
    const size_t idx = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    size_t slot;
    float score;
    uint32_t seen;
    int h, u, i, qh, j;
    if (!v.sal_ring || waiting < 1 || idx >= (size_t)v.H * waiting) return;
    h = (int)(idx / waiting);
    u = (int)(idx % waiting);
    slot = (size_t)h * v.kcap + (size_t)((v.n_kblocks * v.kb + u) % v.kcap);
    score = v.sal_score[slot];
    seen = v.sal_seen[slot];
    for (i = 0; i < b.n_queries; i++) {
        if (first_wait + u >= v.n_tokens - b.n_queries + i + 1) continue; /* causal: not seen */
        for (qh = h * group; qh < (h + 1) * group; qh += KVQ__CUDA_HEADS) {
            const int qe = qh + KVQ__CUDA_HEADS < (h + 1) * group ? qh + KVQ__CUDA_HEADS : (h + 1) * group;
            float add = 0.0f;
            for (j = qh; j < qe; j++) {
                const size_t row = (size_t)i * b.n_q_heads + j;
                add += expf(v.sal_ring[row * v.kcap + u] - v.row_ml[2 * row]) / v.row_ml[2 * row + 1];
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
    kvq_cuda_limits lim; /* defaults filled in */
    kvq__cuda_view v;    /* device pointers and sizes; counts filled per call */
    int n_tokens;
    int device;          /* the device the cache lives on (pointer checks) */
    int sms;             /* its multiprocessors (attention chunks) */
    void *d_mem;         /* the cache's arrays */
    kvq__cu_rot *d_rot;  /* KVQ_ROTATE_HADAMARD: the plan, in device memory */
    /* append's scratch: the check's result, rotated K and V of one round */
    int *h_flag, *d_flag;
    float *d_app_rot;
    /* attention's scratch: rotated queries [max_attn_rows][D], then partial states */
    float *d_attn;
    size_t attn_floats, part_floats;
};

static size_t kvq__cu_align(size_t x) { return (x + KVQ__CUDA_ALIGN - 1) & ~(size_t)(KVQ__CUDA_ALIGN - 1); }

/* e, an error of kvq's own last runtime call or launch, as a status; clears it (kvq__cu_enter
   made sure no one else's error was pending, so this clears only kvq's). */
static kvq_status kvq__cu_err(cudaError_t e) {
    if (e == cudaSuccess) return KVQ_OK;
    (void)cudaGetLastError();
    if (e == cudaErrorMemoryAllocation) return KVQ_ERR_NOMEM;
    if (e == cudaErrorInvalidValue) return KVQ_ERR_INVALID;
    return KVQ_ERR_UNSUPPORTED; /* no device, launch failure, ...: kvq_status has no better word */
}

/* Before a call touches the device: an error already pending is someone else's (or a
   sticky fault). Reading it with cudaGetLastError would clear it and later checks would
   blame kvq's launches for it, so the call does nothing and leaves it pending. */
static kvq_status kvq__cu_enter(void) { return cudaPeekAtLastError() == cudaSuccess ? KVQ_OK : KVQ_ERR_UNSUPPORTED; }

/* Right after a launch: its own configuration error, or a fault of the device since. */
static kvq_status kvq__cu_launched(void) { return kvq__cu_err(cudaGetLastError()); }

/* 1 when kernels on the cache's device may read p: its device memory, or managed memory.
   A host pointer, pageable or pinned, would fault there and leave the context unusable. */
static int kvq__cu_device_ptr(const kvq_cuda_cache *c, const void *p) {
    cudaPointerAttributes at;
    if (!p) return 0;
    if (cudaPointerGetAttributes(&at, p) != cudaSuccess) { /* older runtimes: unknown host memory */
        (void)cudaGetLastError();
        return 0;
    }
    return at.type == cudaMemoryTypeManaged || (at.type == cudaMemoryTypeDevice && at.device == c->device);
}

static int kvq__cu_launch_blocks(size_t work, int threads) {
    size_t b = (work + (size_t)threads - 1) / (size_t)threads;
    if (b < 1) b = 1;
    return b > 65536 ? 65536 : (int)b; /* grid-stride loops cover the rest */
}

/* The view's sizes for cfg (kvq.h's capacities L); device pointers are set later. */
static void kvq__cu_shape(kvq__cuda_view *v, const kvq_config *cfg, const kvq__layout *L) {
    const int D = cfg->head_dim, G = cfg->group_size, bits_k = cfg->key_bits, bits_v = cfg->value_bits;
    v->D = D;
    v->H = cfg->n_kv_heads;
    v->S = cfg->sink_tokens;
    v->G = G;
    v->kb = (short)kvq__kb(cfg);
    v->vpb = (short)kvq__vpb(cfg);
    v->key_bits = bits_k;
    v->value_bits = bits_v;
    v->ng = (D + G - 1) / G;
    v->max_kblocks = L->max_kblocks;
    v->max_vquant = L->max_vquant;
    v->kcap = L->kcap;
    v->vcap = L->vcap;
    v->kblock_bytes = (int)kvq__key_block_bytes(cfg);
    v->vparam_bytes = (int)kvq__value_param_bytes(cfg); /* 4 ng, 2 ng with 16-bit params, 0 at 16 bits */
    v->vcode_bytes = (int)kvq__value_code_bytes(cfg);
    v->n_salient = kvq__salient_count(cfg);
    v->side_bytes = (int)kvq__side_entry_bytes(cfg);
    v->salient_bits = cfg->salient_bits;
    v->salient_policy = cfg->salient_policy;
    v->key_tokens = cfg->key_axis == KVQ_KEYS_PER_TOKEN;
    v->kgrid = (short)kvq__search_grid(cfg->range_search, bits_k, 1);
    v->vgrid = (short)kvq__search_grid(cfg->range_search, bits_v, 0);
    v->ktparam_bytes = (int)kvq__token_param_bytes(cfg, bits_k);
    v->ktcode_bytes = (int)kvq__token_code_bytes(cfg, bits_k);
}

/* One device allocation for every array of the view, each 256-byte aligned. */
static kvq_status kvq__cu_arrays(kvq_cuda_cache *c, const kvq__layout *L) {
    kvq__cuda_view *v = &c->v;
    size_t off[KVQ__A_DEVICE], end = 0;
    uint8_t *base;
    int a;
    for (a = 0; a < KVQ__A_DEVICE; a++) { /* the cache's arrays of kvq.h's plan, with its sizes */
        off[a] = end;
        end = kvq__cu_align(end + L->bytes[a]);
    }
    if (cudaMalloc(&c->d_mem, end ? end : 1) != cudaSuccess) return kvq__cu_err(cudaErrorMemoryAllocation);
    base = (uint8_t *)c->d_mem;
    v->sink_k = (uint16_t *)(base + off[KVQ__A_SINK_K]);
    v->sink_v = (uint16_t *)(base + off[KVQ__A_SINK_V]);
    v->kblocks = base + off[KVQ__A_KBLOCKS];
    v->vparams = (uint16_t *)(base + off[KVQ__A_VPARAMS]);
    v->vcodes = base + off[KVQ__A_VCODES];
    v->ring_k = (uint16_t *)(base + off[KVQ__A_RING_K]);
    v->ring_v = (uint16_t *)(base + off[KVQ__A_RING_V]);
    v->side = base + off[KVQ__A_SIDE];
    v->sal_score = (float *)(base + off[KVQ__A_SCORE]);
    v->sal_seen = (uint32_t *)(base + off[KVQ__A_SEEN]);
    v->ktparams = (uint16_t *)(base + off[KVQ__A_KTPARAMS]);
    v->ktcodes = base + off[KVQ__A_KTCODES];
    return KVQ_OK;
}

/* KVQ_ROTATE_HADAMARD: kvq.h's rotation plan, copied into device memory. */
static kvq_status kvq__cu_rot_plan(kvq_cuda_cache *c) {
    static const int orders[3] = {12, 20, 28};
    kvq__cu_rot hr;
    kvq__rotation r;
    int k, i, j;
    memset(&hr, 0, sizeof hr);
    kvq__rotation_init(&r, c->cfg.head_dim, c->cfg.seed);
    hr.n = r.n;
    hr.n_pieces = r.n_pieces;
    for (k = 0; k < 10; k++) {
        hr.off[k] = r.off[k];
        hr.pow2[k] = r.pow2[k];
        hr.m[k] = r.m[k];
    }
    for (i = 0; i < c->cfg.head_dim; i++) hr.sign[i] = r.sign[i];
    for (k = 0; k < 3; k++)
        for (i = 0; i < orders[k]; i++)
            for (j = 0; j < orders[k]; j++) hr.paley[k][i * orders[k] + j] = (signed char)kvq__paley(orders[k], i, j);
    if (cudaMalloc((void **)&c->d_rot, sizeof hr) != cudaSuccess) return kvq__cu_err(cudaErrorMemoryAllocation);
    return kvq__cu_err(cudaMemcpy(c->d_rot, &hr, sizeof hr, cudaMemcpyHostToDevice));
}

/* Attention scratch, in floats: partial states for the most rows a call may have; see
   kvq__cu_attn_plan for why (rows + 32 SMs) rows of chunk states always suffice. */
static size_t kvq__cu_part_floats(const kvq_cuda_cache *c) {
    const size_t rows = (size_t)c->lim.max_attn_rows;
    const int track = c->v.n_salient && c->cfg.salient_policy == KVQ_SALIENT_ATTENTION;
    return (rows + 32 * (size_t)c->sms) * ((size_t)c->v.D + 2) + (track ? rows * ((size_t)c->v.kcap + 2) : 0);
}

/* Every scratch append and attention use, so that neither allocates. */
static kvq_status kvq__cu_scratch(kvq_cuda_cache *c) {
    const int rot = c->cfg.rotation == KVQ_ROTATE_HADAMARD;
    const size_t round = (size_t)c->lim.append_chunk * c->v.H * c->v.D;
    if (cudaHostAlloc((void **)&c->h_flag, sizeof(int), cudaHostAllocDefault) != cudaSuccess ||
        cudaMalloc((void **)&c->d_flag, sizeof(int)) != cudaSuccess ||
        (rot && cudaMalloc((void **)&c->d_app_rot, 2 * round * sizeof(float)) != cudaSuccess))
        return kvq__cu_err(cudaErrorMemoryAllocation);
    c->part_floats = kvq__cu_part_floats(c);
    c->attn_floats = (rot ? (size_t)c->lim.max_attn_rows * c->v.D : 0) + c->part_floats;
    if (cudaMalloc((void **)&c->d_attn, c->attn_floats * sizeof(float)) != cudaSuccess)
        return kvq__cu_err(cudaErrorMemoryAllocation);
    return KVQ_OK;
}

/* The limits with defaults filled in; 0 when a field is out of range. */
static int kvq__cu_limits(const kvq_cuda_limits *in, kvq_cuda_limits *out) {
    kvq_cuda_limits l = {0, 0};
    if (in) l = *in;
    if (l.max_attn_rows < 0 || l.max_attn_rows > 1 << 26 || l.append_chunk < 0 || l.append_chunk > 1 << 20) return 0;
    if (!l.max_attn_rows) l.max_attn_rows = KVQ_CUDA_ATTN_ROWS;
    if (!l.append_chunk) l.append_chunk = KVQ_CUDA_APPEND_CHUNK;
    *out = l;
    return 1;
}

KVQ_CUDA_API kvq_status kvq_cuda_cache_create_ex(kvq_cuda_cache **out, const kvq_config *cfg,
                                                 const kvq_cuda_limits *lim) {
    kvq_cuda_cache *c;
    kvq_status st;
    kvq__layout L;
    kvq_cuda_limits l;
    const uint16_t one = 1;
    if (!out || !kvq__cu_limits(lim, &l)) return KVQ_ERR_INVALID;
    if ((st = kvq_config_check(cfg)) != KVQ_OK) return st;
    if (*(const uint8_t *)&one != 1) return KVQ_ERR_UNSUPPORTED; /* big-endian host */
    if (!kvq__plan(cfg, &L)) return KVQ_ERR_NOMEM;                 /* kvq.h's capacities */
    if ((st = kvq__cu_enter()) != KVQ_OK) return st;
    if (!(c = (kvq_cuda_cache *)calloc(1, sizeof *c))) return KVQ_ERR_NOMEM;
    c->cfg = *cfg;
    c->lim = l;
    kvq__cu_shape(&c->v, cfg, &L);
    if (cudaGetDevice(&c->device) != cudaSuccess ||
        cudaDeviceGetAttribute(&c->sms, cudaDevAttrMultiProcessorCount, c->device) != cudaSuccess || c->sms < 1) {
        kvq_cuda_cache_destroy(c);
        return kvq__cu_err(cudaErrorNoDevice); /* no usable device */
    }
    st = kvq__cu_arrays(c, &L);
    if (st == KVQ_OK && cfg->rotation == KVQ_ROTATE_HADAMARD) st = kvq__cu_rot_plan(c);
    if (st == KVQ_OK) st = kvq__cu_scratch(c);
    if (st != KVQ_OK) {
        kvq_cuda_cache_destroy(c);
        return st;
    }
    *out = c;
    return KVQ_OK;
}

KVQ_CUDA_API kvq_status kvq_cuda_cache_create(kvq_cuda_cache **out, const kvq_config *cfg) {
    return kvq_cuda_cache_create_ex(out, cfg, NULL);
}

KVQ_CUDA_API void kvq_cuda_cache_destroy(kvq_cuda_cache *c) {
    if (!c) return;
    /* errors of these (a sticky fault) are left pending: destroy returns nothing to say so */
    if (c->d_mem) cudaFree(c->d_mem);
    if (c->d_rot) cudaFree(c->d_rot);
    if (c->d_flag) cudaFree(c->d_flag);
    if (c->h_flag) cudaFreeHost(c->h_flag);
    if (c->d_app_rot) cudaFree(c->d_app_rot);
    if (c->d_attn) cudaFree(c->d_attn);
    free(c);
}

KVQ_CUDA_API const kvq_cuda_limits *kvq_cuda_cache_limits(const kvq_cuda_cache *c) { return c ? &c->lim : NULL; }

KVQ_CUDA_API size_t kvq_cuda_cache_scratch_bytes(const kvq_cuda_cache *c) {
    size_t app;
    if (!c) return 0;
    app = c->d_app_rot ? 2 * (size_t)c->lim.append_chunk * c->v.H * c->v.D * sizeof(float) : 0;
    return app + sizeof(int) + c->attn_floats * sizeof(float);
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
    kvq__counts_after(&c->cfg, c->n_tokens, &v.n_kblocks, &v.n_vquant);
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
    kq = v.key_tokens ? (size_t)v.n_vquant : (size_t)v.n_kblocks * v.kb; /* keys that left the ring */
    per_head = (size_t)(c->n_tokens - (int)after) * 2 * row + (size_t)v.n_kblocks * v.kblock_bytes +
               (after - kq) * row + (size_t)v.n_vquant * ((size_t)v.vparam_bytes + v.vcode_bytes) +
               (after - (size_t)v.n_vquant) * row;
    if (v.key_tokens) per_head += (size_t)v.n_vquant * ((size_t)v.ktparam_bytes + v.ktcode_bytes);
    if (v.n_salient) per_head += (size_t)v.n_kblocks * v.n_salient * v.side_bytes;
    if (v.n_salient && image) per_head += (after - (size_t)v.n_kblocks * v.kb) * 8;
    return per_head * (size_t)v.H;
}

KVQ_CUDA_API size_t kvq_cuda_cache_payload_bytes(const kvq_cuda_cache *c) { return c ? kvq__cu_payload_size(c, 0) : 0; }

#ifndef KVQ_CUDA_UNCHECKED_APPEND
/* All or nothing, like kvq.h: every input checked on the device before any is stored.
   KVQ_ERR_INVALID for a bad value; the one synchronization of a checked append. */
static kvq_status kvq__cu_check_append(kvq_cuda_cache *c, const float *d_k, const float *d_v, int n,
                                       cudaStream_t stream) {
    const size_t work = (size_t)n * c->v.H * c->v.D, rows = (size_t)n * c->v.H;
    kvq_status st;
    if ((st = kvq__cu_err(cudaMemsetAsync(c->d_flag, 0, sizeof(int), stream))) != KVQ_OK) return st;
    kvq__cu_check_kernel<<<kvq__cu_launch_blocks(work, 256), 256, 0, stream>>>(d_k, d_v, work, c->d_flag);
    if ((st = kvq__cu_launched()) != KVQ_OK) return st;
    if (c->cfg.rotation == KVQ_ROTATE_HADAMARD) {
        kvq__cu_norm_check_kernel<<<kvq__cu_launch_blocks(rows, 128), 128, 0, stream>>>(d_k, d_v, rows, c->v.D,
                                                                                        c->d_flag);
        if ((st = kvq__cu_launched()) != KVQ_OK) return st;
    }
    if ((st = kvq__cu_err(cudaMemcpyAsync(c->h_flag, c->d_flag, sizeof(int), cudaMemcpyDeviceToHost, stream))) !=
            KVQ_OK ||
        (st = kvq__cu_err(cudaStreamSynchronize(stream))) != KVQ_OK)
        return st;
    return *c->h_flag ? KVQ_ERR_INVALID : KVQ_OK;
}
#endif

/* One round: n tokens (checked) of d_k, d_v into the cache, kernels queued on stream.
   KVQ_ROTATE_HADAMARD caches store rotated rows, as kvq.h does, rotated first into the
   append scratch; stream order keeps the next round's rotation after this round's reads. */
static kvq_status kvq__cu_append_round(kvq_cuda_cache *c, const float *d_k, const float *d_v, int n,
                                       cudaStream_t stream) {
    const size_t work = (size_t)n * c->v.H * c->v.D, rows = (size_t)n * c->v.H;
    kvq__cuda_append a;
    kvq_status st;
    if (c->cfg.rotation == KVQ_ROTATE_HADAMARD) {
        float *rk = c->d_app_rot, *rv = c->d_app_rot + (size_t)c->lim.append_chunk * c->v.H * c->v.D;
        kvq__cu_rotate_kernel<<<kvq__cu_launch_blocks(rows, 128), 128, 0, stream>>>(d_k, rk, rows, c->d_rot, 0);
        if ((st = kvq__cu_launched()) != KVQ_OK) return st;
        kvq__cu_rotate_kernel<<<kvq__cu_launch_blocks(rows, 128), 128, 0, stream>>>(d_v, rv, rows, c->d_rot, 0);
        if ((st = kvq__cu_launched()) != KVQ_OK) return st;
        d_k = rk;
        d_v = rv;
    }
    memset(&a, 0, sizeof a);
    a.c = kvq__cu_view(c);
    a.k = d_k;
    a.v = d_v;
    a.n = n;
    a.n_old = c->n_tokens;
    a.after_old = c->n_tokens > c->v.S ? c->n_tokens - c->v.S : 0;
    a.n_kblocks_old = a.c.n_kblocks;
    a.n_vquant_old = a.c.n_vquant;
    kvq__counts_after(&c->cfg, c->n_tokens + n, &a.n_kblocks_new, &a.n_vquant_new);
    /* order matters: the quantizers read ring rows (and salience) of earlier appends before
       the store kernel may reuse their slots; the key blocks read the side store's picks */
    if (c->v.n_salient && a.n_kblocks_new > a.n_kblocks_old) {
        size_t m = (size_t)c->v.H * (a.n_kblocks_new - a.n_kblocks_old);
        kvq__cu_store_salient_kernel<<<kvq__cu_launch_blocks(m, 64), 64, 0, stream>>>(a);
        if ((st = kvq__cu_launched()) != KVQ_OK) return st;
    }
    if (a.n_kblocks_new > a.n_kblocks_old) {
        size_t m = (size_t)c->v.H * (a.n_kblocks_new - a.n_kblocks_old) * c->v.D;
        kvq__cu_quantize_key_block_kernel<<<kvq__cu_launch_blocks(m, 128), 128, 0, stream>>>(a);
        if ((st = kvq__cu_launched()) != KVQ_OK) return st;
    }
    if (a.n_vquant_new > a.n_vquant_old) {
        size_t m = (size_t)c->v.H * (a.n_vquant_new - a.n_vquant_old) * c->v.ng;
        if (c->v.key_tokens) {
            kvq__cu_quantize_record_kernel<<<kvq__cu_launch_blocks(m, 128), 128, 0, stream>>>(a, 1);
            if ((st = kvq__cu_launched()) != KVQ_OK) return st;
        }
        kvq__cu_quantize_record_kernel<<<kvq__cu_launch_blocks(m, 128), 128, 0, stream>>>(a, 0);
        if ((st = kvq__cu_launched()) != KVQ_OK) return st;
    }
    kvq__cu_store_kernel<<<kvq__cu_launch_blocks(work, 256), 256, 0, stream>>>(a);
    if ((st = kvq__cu_launched()) != KVQ_OK) return st;
    c->n_tokens += n;
    return KVQ_OK;
}

KVQ_CUDA_API kvq_status kvq_cuda_cache_append(kvq_cuda_cache *c, const float *d_k, const float *d_v, int n_tokens,
                                              cudaStream_t stream) {
    size_t row;
    kvq_status st;
    int done, n;
    if (!c || n_tokens < 0) return KVQ_ERR_INVALID;
    if (n_tokens == 0) return KVQ_OK;
    if (!d_k || !d_v) return KVQ_ERR_INVALID;
    if (n_tokens > c->cfg.max_tokens - c->n_tokens) return KVQ_ERR_FULL;
    if ((st = kvq__cu_enter()) != KVQ_OK) return st;
    if (!kvq__cu_device_ptr(c, d_k) || !kvq__cu_device_ptr(c, d_v)) return KVQ_ERR_INVALID;
#ifndef KVQ_CUDA_UNCHECKED_APPEND
    if ((st = kvq__cu_check_append(c, d_k, d_v, n_tokens, stream)) != KVQ_OK) return st;
#endif
    /* rounds of append_chunk tokens: the bytes are those of one append (kvq.h's result does
       not depend on how tokens are split into appends); a failed launch is a device fault */
    row = (size_t)c->v.H * c->v.D;
    for (done = 0; done < n_tokens; done += n) {
        n = n_tokens - done < c->lim.append_chunk ? n_tokens - done : c->lim.append_chunk;
        if ((st = kvq__cu_append_round(c, d_k + done * row, d_v + done * row, n, stream)) != KVQ_OK) return st;
    }
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
   (max, sum) [row][2]. The chunk states fit (rows + 32 SMs) rows, whatever the tokens:
   n_chunks <= want = max(1, ceil(4 SMs / units)) (each chunk holds >= n_tokens / want tokens),
   and rows / units = group / slices <= 8, so rows * n_chunks < rows + 32 SMs; create
   sizes the scratch so (kvq__cu_part_floats). */
static size_t kvq__cu_attn_plan(const kvq_cuda_cache *c, const kvq_attn_params *p, int m, int *nh, int *slices,
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
    kvq_status st;
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
    for (s = 0; s < n; s++) { /* the scratch create sized must hold this call: no allocation here */
        const kvq_cuda_cache *c = caches[s];
        int first_s = s / KVQ_CUDA_MAX_BATCH * KVQ_CUDA_MAX_BATCH, nh, slices, chunk, n_chunks;
        int m = n - first_s < KVQ_CUDA_MAX_BATCH ? n - first_s : KVQ_CUDA_MAX_BATCH;
        size_t units;
        if ((size_t)p->n_queries * p->n_q_heads > (size_t)c->lim.max_attn_rows) return KVQ_ERR_INVALID;
        if (kvq__cu_attn_plan(c, p, m, &nh, &slices, &units, &chunk, &n_chunks) > c->part_floats)
            return KVQ_ERR_INVALID; /* cannot happen: see kvq__cu_attn_plan */
    }
    if ((st = kvq__cu_enter()) != KVQ_OK) return st;
    for (s = 0; s < n; s++) /* host memory in a kernel would fault and spoil the context */
        if (!kvq__cu_device_ptr(caches[s], d_q[s]) || !kvq__cu_device_ptr(caches[s], d_out[s])) return KVQ_ERR_INVALID;
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
            (void)kvq__cu_attn_plan(c, p, m, &nh, &slices, &units, &v->chunk, &v->n_chunks); /* scratch: sized above */
            if (s == 0) {
                b.n_slices = slices;
                heads = nh;
                b.scale = p->scale != 0.0f ? p->scale : 1.0f / sqrtf((float)c->cfg.head_dim);
            }
            v->q = d_q[first + s];
            v->out = d_out[first + s];
            v->part = c->d_attn;
            if (c->cfg.rotation == KVQ_ROTATE_HADAMARD) { /* queries into the cache's rotated space */
                kvq__cu_rotate_kernel<<<kvq__cu_launch_blocks(rows, 128), 128, 0, stream>>>(v->q, c->d_attn, rows,
                                                                                             c->d_rot, 0);
                if ((st = kvq__cu_launched()) != KVQ_OK) return st;
                v->q = c->d_attn;
                v->part = c->d_attn + (size_t)c->lim.max_attn_rows * c->v.D;
            }
            v->sal_ring = track ? v->part + rows * v->n_chunks * ((size_t)v->D + 2) : NULL;
            v->row_ml = track ? v->sal_ring + rows * v->kcap : NULL;
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
        if ((st = kvq__cu_launched()) != KVQ_OK) return st;
        kvq__cu_merge_row_kernel<<<dim3((unsigned)(p->n_queries * p->n_q_heads), (unsigned)m), KVQ__CUDA_NT, 0,
                                   stream>>>(b);
        if ((st = kvq__cu_launched()) != KVQ_OK) return st;
        if (max_track) {
            kvq__cu_track_salience_kernel<<<dim3((unsigned)kvq__cu_launch_blocks(max_track, 128), (unsigned)m), 128, 0,
                                            stream>>>(b);
            if ((st = kvq__cu_launched()) != KVQ_OK) return st;
        }
        for (s = 0; s < m; s++) { /* outputs back to the caller's space */
            kvq_cuda_cache *c = caches[first + s];
            size_t rows = (size_t)p->n_queries * p->n_q_heads;
            if (c->cfg.rotation != KVQ_ROTATE_HADAMARD) continue;
            kvq__cu_rotate_kernel<<<kvq__cu_launch_blocks(rows, 128), 128, 0, stream>>>(b.v[s].out, b.v[s].out, rows,
                                                                                         c->d_rot, 1);
            if ((st = kvq__cu_launched()) != KVQ_OK) return st;
        }
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
   par_bytes of params then code bytes per token in the image, two arrays on the device, so
   each array moves in one copy through host scratch tmp and is (de)interleaved on the host.
   No params (16 bits): the codes are the image's bytes as they are. */
static cudaError_t kvq__cu_records_xfer(uint16_t *par, int par_bytes, uint8_t *codes, int code_bytes, int n,
                                        uint8_t **img, int to_image, uint8_t *tmp, cudaStream_t stream) {
    const size_t pb = (size_t)par_bytes, cb = (size_t)code_bytes;
    uint8_t *pp = tmp, *cp = tmp + (size_t)n * pb, *at = *img;
    cudaError_t e = cudaSuccess;
    int j;
    if (n < 1) return cudaSuccess;
    if (!par_bytes) {
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
   tmp: host scratch for the value or key records of one head (n_vquant * record bytes) and, in
   salient caches, for its salience rings (kcap * 8 bytes). */
static cudaError_t kvq__cu_xfer_payload(const kvq__cuda_view *v, uint8_t *img, int to_image, uint8_t *tmp,
                                        cudaStream_t stream) {
    const int D = v->D, G = v->kb, sinks = v->n_tokens < v->S ? v->n_tokens : v->S;
    const int after = v->n_tokens - sinks;
    const int kq = v->key_tokens ? v->n_vquant : v->n_kblocks * G; /* keys out of the ring */
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
        KVQ__CU_SEG(v->kblocks + (size_t)h * v->max_kblocks * v->kblock_bytes, (size_t)v->n_kblocks * v->kblock_bytes);
        if (v->key_tokens) { /* keys per token: records like values' */
            e = kvq__cu_records_xfer(v->ktparams + rec * (v->ktparam_bytes / 2), v->ktparam_bytes,
                                     v->ktcodes + rec * v->ktcode_bytes, v->ktcode_bytes, v->n_vquant, &img,
                                     to_image, tmp, stream);
            if (e != cudaSuccess) return e;
        }
        e = kvq__cu_ring_xfer(v->ring_k + (size_t)h * v->kcap * D, v->kcap, D, kq, after, img, to_image, stream);
        if (e != cudaSuccess) return e;
        img += (size_t)(after - kq) * D * 2;
        e = kvq__cu_records_xfer(v->vparams + rec * (v->vparam_bytes / 2), v->vparam_bytes,
                                 v->vcodes + rec * v->vcode_bytes, v->vcode_bytes, v->n_vquant, &img, to_image,
                                 tmp, stream);
        if (e != cudaSuccess) return e;
        e = kvq__cu_ring_xfer(v->ring_v + (size_t)h * v->vcap * D, v->vcap, D, v->n_vquant, after, img, to_image,
                              stream);
        if (e != cudaSuccess) return e;
        img += (size_t)(after - v->n_vquant) * D * 2;
        if (v->n_salient) {
            /* side-store entries are stored as the image has them (u16 little-endian, then
               code bytes); (score f32, seen u32) of each waiting key, oldest first, are
               interleaved there and two ring arrays here: through tmp, on the host */
            const size_t sb = (size_t)v->n_salient * v->side_bytes, ring = (size_t)h * v->kcap;
            float *sc = (float *)(void *)tmp;
            uint32_t *seen = (uint32_t *)(void *)(tmp + 4 * (size_t)v->kcap);
            KVQ__CU_SEG(v->side + (size_t)h * v->max_kblocks * sb, (size_t)v->n_kblocks * sb);
            if (to_image) {
                e = cudaMemcpyAsync(sc, v->sal_score + ring, 4 * (size_t)v->kcap, cudaMemcpyDeviceToHost, stream);
                if (e == cudaSuccess)
                    e = cudaMemcpyAsync(seen, v->sal_seen + ring, 4 * (size_t)v->kcap, cudaMemcpyDeviceToHost, stream);
                if (e == cudaSuccess) e = cudaStreamSynchronize(stream);
                if (e != cudaSuccess) return e;
            } else {
                memset(tmp, 0, 8 * (size_t)v->kcap);
            }
            for (j = v->n_kblocks * G; j < after; j++) {
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

/* Moves the payload of c as it would hold `tokens` tokens between device and host. Host
   scratch is allocated before the first copy: *copying (may be NULL) tells whether a
   failure came from a copy (to the device: the cache then holds a mix of states). */
static kvq_status kvq__cu_payload(kvq_cuda_cache *c, int tokens, uint8_t *img, int to_image, cudaStream_t stream,
                                  int *copying) {
    kvq_cuda_cache probe = *c;
    kvq__cuda_view v;
    uint8_t *tmp;
    size_t rec; /* bytes of the larger per-token record */
    cudaError_t e;
    probe.n_tokens = tokens;
    v = kvq__cu_view(&probe);
    rec = (size_t)v.vparam_bytes + v.vcode_bytes;
    if (v.key_tokens && (size_t)v.ktparam_bytes + v.ktcode_bytes > rec) rec = (size_t)v.ktparam_bytes + v.ktcode_bytes;
    if (!(tmp = (uint8_t *)malloc((size_t)v.n_vquant * rec + 8 * (size_t)v.kcap + 8))) return KVQ_ERR_NOMEM;
    if (copying) *copying = 1;
    e = kvq__cu_xfer_payload(&v, img, to_image, tmp, stream);
    free(tmp);
    return kvq__cu_err(e);
}

static int kvq__cu_same_config(const kvq_config *a, const kvq_config *b) {
    return memcmp(a, b, sizeof *a) == 0; /* ints, unsigned and a float: no padding */
}

/* Equal but for the capacity. */
static int kvq__cu_same_shape(const kvq_config *a, const kvq_config *b) {
    kvq_config t = *a;
    t.max_tokens = b->max_tokens;
    return kvq__cu_same_config(&t, b);
}

/* src's state into dst: configs equal but for max_tokens, src's tokens within dst's. Every
   check and host allocation comes before the first copy into dst, so any error but a failed
   copy (a device fault) leaves dst untouched; after a failed copy dst is reset to 0 tokens. */
static kvq_status kvq__cu_upload(kvq_cuda_cache *dst, const kvq_cache *src, cudaStream_t stream) {
    const int tokens = kvq_cache_tokens(src);
    kvq_cuda_cache probe = *dst;
    size_t n = kvq_cache_serialized_bytes(src), hdr;
    uint8_t *img;
    kvq_status st;
    int copying = 0;
    if (!kvq__cu_same_shape(kvq_cache_config(src), &dst->cfg) || tokens > dst->cfg.max_tokens) return KVQ_ERR_INVALID;
    if ((st = kvq__cu_enter()) != KVQ_OK) return st;
    if (!(img = (uint8_t *)malloc(n))) return KVQ_ERR_NOMEM;
    st = kvq_cache_serialize(src, img, n, NULL);
    /* bytes 12..16 of every kvq image give the header size; the rest must be exactly the
       payload this file expects, or the formats have drifted apart */
    probe.n_tokens = tokens;
    if (st == KVQ_OK) {
        hdr = (size_t)img[12] | (size_t)img[13] << 8 | (size_t)img[14] << 16 | (size_t)img[15] << 24;
        if (hdr > n || n - hdr != kvq__cu_payload_size(&probe, 1)) st = KVQ_ERR_UNSUPPORTED;
        else st = kvq__cu_payload(dst, tokens, img + hdr, 0, stream, &copying);
    }
    if (st == KVQ_OK) dst->n_tokens = tokens;
    else if (copying) dst->n_tokens = 0; /* a mix of the old and the new state is no state */
    free(img);
    return st;
}

KVQ_CUDA_API kvq_status kvq_cuda_cache_upload(kvq_cuda_cache *dst, const kvq_cache *src, cudaStream_t stream) {
    if (!dst || !src) return KVQ_ERR_INVALID;
    if (!kvq__cu_same_config(kvq_cache_config(src), &dst->cfg)) return KVQ_ERR_INVALID;
    return kvq__cu_upload(dst, src, stream);
}

KVQ_CUDA_API kvq_status kvq_cuda_cache_download(const kvq_cuda_cache *src, kvq_cache *dst, cudaStream_t stream) {
    size_t n;
    uint8_t *img;
    kvq_status st;
    if (!src || !dst) return KVQ_ERR_INVALID;
    if (!kvq__cu_same_config(kvq_cache_config(dst), &src->cfg)) return KVQ_ERR_INVALID;
    if ((st = kvq__cu_enter()) != KVQ_OK) return st;
    n = kvq__cu_payload_size(src, 1);
    if (!(img = (uint8_t *)malloc(n + 1))) return KVQ_ERR_NOMEM;
    st = kvq__cu_payload((kvq_cuda_cache *)(uintptr_t)src, src->n_tokens, img, 1, stream, NULL);
    if (st == KVQ_OK) {
        /* kvq.h's own payload reader (the one kvq_cache_deserialize uses) puts each record
           where kvq.h keeps it, whatever its internal layout */
        dst->n_tokens = src->n_tokens;
        kvq__counts_after(&dst->cfg, dst->n_tokens, &dst->n_kblocks, &dst->n_vquant);
        dst->n_ktok = dst->cfg.key_axis == KVQ_KEYS_PER_TOKEN ? dst->n_vquant : 0; /* as kvq_cache_deserialize */
        dst->n_hist = 0; /* the image holds no rollback history */
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
    if (buf_bytes < kvq_cuda_cache_serialized_bytes(c)) return KVQ_ERR_BUFFER;
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
    int held;
    if (!c || !bytes) return KVQ_ERR_INVALID;
    if ((st = kvq_serialized_info(bytes, n_bytes, &cfg, &held)) != KVQ_OK) return st;
    if (!kvq__cu_same_shape(&cfg, &c->cfg)) return KVQ_ERR_INVALID;
    if (held > c->cfg.max_tokens) return KVQ_ERR_FULL;
    /* the image's max_tokens is a claim: host memory for the tokens it holds, no more (the
       payload's layout does not depend on the capacity) */
    cfg.max_tokens = held > cfg.sink_tokens ? held : cfg.sink_tokens > 0 ? cfg.sink_tokens : 1;
    if (!(need = kvq_cache_bytes(&cfg)) || !(mem = malloc(need))) return KVQ_ERR_NOMEM;
    /* kvq.h validates every byte (header, sizes, checksums, each record's contents) into
       that host cache, writing nothing of c; then one upload, checked before it copies */
    st = kvq_cache_load(&tmp, bytes, n_bytes, cfg.max_tokens, mem, need);
    if (st == KVQ_OK) st = kvq__cu_upload(c, tmp, stream);
    free(mem);
    return st;
}

#endif /* KVQ_CUDA_IMPLEMENTATION */
