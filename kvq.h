/* kvq.h - a 2- and 3-bit KV cache for transformer inference, with attention computed
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

       kvq_config cfg = kvq_default_config(128, 8, 4096); // head_dim, kv heads, capacity: K3V2, 3.0 bits
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
   | KVQ_NO_SIMD           | (undefined)        | compile only the scalar kernels          |
   | KVQ_SIMD              | from -m flags      | force one ISA: 0 scalar, 1 AVX2, 2 AVX-512 (+AVX2), 3 NEON |
   | KVQ_RUNTIME_DISPATCH  | (undefined)        | x86 gcc/clang: compile AVX2 and AVX-512, pick by cpuid,  |
   |                       |                    | even where the flags target AVX2; the default when they  |
   |                       |                    | do not (a plain `cc -O2` build)                          |
   | KVQ_NO_RUNTIME_DISPATCH | (undefined)      | a build without AVX2 flags stays scalar (no cpuid)       |
   | KVQ_NO_HUGEPAGES      | (undefined)        | Linux: kvq_cache_create() does not ask for transparent   |
   |                       |                    | huge pages (it does where <sys/mman.h> shows             |
   |                       |                    | MADV_HUGEPAGE: glibc's default feature set, not -std=c99 |
   |                       |                    | alone) for the memory it allocates with malloc           |

   Memory: kvq_cache_bytes() + kvq_cache_init() place a cache in caller memory;
   kvq_cache_create() is a thin convenience over them. Kernels never allocate.
   Threads: the library creates none. kvq_attention_partial() runs a token
   and/or KV-head range and kvq_attention_merge() combines the partial states,
   so a caller can spread one attention call over its own thread pool;
   kvq_batch_plan() spreads a batch of sequences' decode attention evenly, and
   kvq_attention_prefill_partial() splits a prefill chunk's queries and heads.
   A cache has no lock. Calls that only read it (kvq_cache_read, _tokens, _config,
   _payload_bytes, _serialize, kvq_attention_partial, kvq_attention_merge,
   kvq_attention_prefill_partial, kvq_batch_attention, kvq_batch_merge, and
   kvq_attention unless it records salience, see below; kvq_cache_copy's src) may run
   concurrently on one cache. Calls that write it (kvq_cache_append, _reset, _truncate,
   kvq_cache_copy's dst, and kvq_attention on a cache with salient_ratio > 0 and
   KVQ_SALIENT_ATTENTION) need exclusive access: serialize them against every other call
   on that cache (a mutex or reader-writer lock, or one thread per cache). Distinct caches
   are independent. tests/test_threads.c runs this under TSan.
   Errors: every public call validates its arguments and returns a kvq_status;
   after any error the cache is exactly as it was (appends are all or nothing).
   Aliasing: outputs must not overlap inputs or the cache's memory (q and out of
   attention, states and out of merge, image and memory of a load, ...): such calls
   return KVQ_ERR_INVALID and write nothing.
   Floating point: built for the default rounding mode (round to nearest even);
   do not compile with -ffast-math, which may change the quantized bytes.
*/
#ifndef KVQ_H_INCLUDED
#define KVQ_H_INCLUDED

#define KVQ_VERSION_MAJOR 0
#define KVQ_VERSION_MINOR 5
#define KVQ_VERSION_PATCH 2
#define KVQ_VERSION_NUMBER \
    (KVQ_VERSION_MAJOR * 10000 + KVQ_VERSION_MINOR * 100 + KVQ_VERSION_PATCH)
#define KVQ_VERSION_STRING "0.5.2" /* MAJOR.MINOR.PATCH; CHANGELOG.md says what each changed */

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
    KVQ_ERR_NOMEM = -4,       /* allocation failed, or a size does not fit size_t */
    KVQ_ERR_CORRUPT = -5,     /* serialized bytes failed validation */
    KVQ_ERR_BUFFER = -6       /* the caller's buffer is too small: size it with kvq_cache_bytes() or
                                 kvq_cache_serialized_bytes() (before 0.2: KVQ_ERR_NOMEM) */
} kvq_status;

/* rotation: NONE; HADAMARD (the cache rotates K, V and queries itself); or PREROTATED
   (the caller folded kvq_hadamard() into W_q, W_k, W_v and W_o offline: K, V and queries
   arrive rotated, the output leaves rotated, and the cache does no transform). */
enum { KVQ_ROTATE_NONE = 0, KVQ_ROTATE_HADAMARD = 1, KVQ_ROTATE_PREROTATED = 2 };
/* salient_policy: which tokens of a key block stay at salient_bits. ATTENTION: the ones
   attention used most while they sat in the residual window (ZipCache's normalized
   accumulated attention; needs kvq_attention calls). ERROR: the ones whose removal
   shrinks the block's quantization ranges most (needs no queries: prefill).
   ATTENTION's scores are sums of softmax probabilities from the ISA's attention kernels,
   which may order sums differently: ISA paths agree on them to rounding only, so where two
   tokens nearly tie, two paths may keep different ones. ERROR's picks and bytes are the
   same on every path. */
enum { KVQ_SALIENT_ATTENTION = 0, KVQ_SALIENT_ERROR = 1 };
/* key_axis: keys quantized per channel over blocks of G tokens (KIVI), or per token
   over groups of G channels (like values; QuaRot pairs it with rotation). */
enum { KVQ_KEYS_PER_CHANNEL = 0, KVQ_KEYS_PER_TOKEN = 1 };

typedef struct kvq_config {
    int head_dim;        /* channels per head; any multiple of 8 from 8 to 512 */
    int n_kv_heads;      /* KV heads stored in this cache (one layer, one sequence) */
    int max_tokens;      /* capacity */
    int key_bits;        /* 2, 3 (default), 4, 8; 16 = fp16 (the baseline) */
    int value_bits;      /* same set as key_bits; default 2 */
    int group_size;      /* G: channels per value group (and per key group with per-token keys); 16, 32
                            (default), 64, 128 */
    int residual_tokens; /* newest tokens kept in fp16; default 128; 0 = none; multiple of the key block */
    int sink_tokens;     /* first tokens kept in fp16; default 4 */
    int rotation;        /* KVQ_ROTATE_NONE or KVQ_ROTATE_HADAMARD */
    unsigned seed;       /* random signs of the rotation */
    float salient_ratio; /* fraction of tokens kept at salient_bits; 0 = off */
    int salient_bits;    /* 8 or 16 */
    int salient_policy;  /* KVQ_SALIENT_ATTENTION (default) or KVQ_SALIENT_ERROR */
    int key_axis;        /* KVQ_KEYS_PER_CHANNEL (default, KIVI) or KVQ_KEYS_PER_TOKEN */
    int range_search;    /* 2-8 (default 4): the range of each 2-bit key group and 2- or 3-bit value
                            group is the best of n clipped ranges a side (least squared error; keys
                            weighted by recorded attention); 0 or 1: min/max ranges (KIVI) */
    int key_block;       /* tokens per key block (keys per channel): 16, 32, 64 (default), 128;
                            0 = group_size; residual_tokens is a multiple of it */
    int value_param_bits; /* a value group's scale and min: 32 (two fp16; 0 means 32) or 16 (default:
                             an 8-bit float scale and an int8 min in units of scale/16). 16 applies
                             to 2- and 3-bit values; 4- and 8-bit values keep 32 whatever this says
                             (the min's range, [-8, 8) scales, is too narrow for them, and a grid of
                             2^b - 1 scales can pass 2 x 65504) */
    int rollback_tokens; /* 0-4096 (default 16; 0 = none): kvq_cache_truncate() undoes up to this
                            many of the newest appends exactly (speculative decoding's drafts);
                            costs up to 4 * head_dim bytes per token per KV head (see truncate) */
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
/* Places a cache in mem, which may have any alignment (kvq_cache_bytes() includes the slack to
   align it inside); mem_bytes below kvq_cache_bytes() gives KVQ_ERR_BUFFER. */
KVQ_API kvq_status kvq_cache_init(kvq_cache **out, const kvq_config *cfg, void *mem, size_t mem_bytes);
KVQ_API kvq_status kvq_cache_create(kvq_cache **out, const kvq_config *cfg); /* uses KVQ_MALLOC */
/* Frees a created cache; a no-op for init'ed caches and NULL. Like free(), destroying a
   cache twice, or using it after destroy, is undefined behaviour. */
KVQ_API void       kvq_cache_destroy(kvq_cache *c);
KVQ_API void       kvq_cache_reset(kvq_cache *c);   /* back to 0 tokens */
/* Keeps the first n_tokens tokens (0 <= n_tokens <= tokens held, else KVQ_ERR_INVALID and
   nothing changes). Rollback: cutting at most the newest h tokens, h the cache's rollback
   history, leaves exactly the cache that never saw them: the same reads, attention outputs
   and serialized image, and the same again after any further appends and attention calls.
   The history grows by one token per append up to cfg.rollback_tokens, loses the tokens a
   rollback cuts, and starts empty at create, reset, load, a deep cut and kvq_cache_copy's
   dst. Salience recorded by kvq_attention (salient_ratio > 0, KVQ_SALIENT_ATTENTION) is part
   of it: the waiting keys' scores return to what they were before the first cut token was
   appended, as if the attention calls made since had not been. A deeper cut keeps every kept
   token as stored, except that those which had left the fp16 window (into a quantized record
   that the cut now splits or removes) return to the window as their dequantized values
   rounded to fp16, and forget the attention they received; appending and attention go on
   as usual. */
KVQ_API kvq_status kvq_cache_truncate(kvq_cache *c, int n_tokens);
/* Puts src's first n_tokens tokens into dst (fork, shared prefix, or growth into a larger
   capacity): dst then reads, attends and appends exactly as src truncated to n_tokens would
   (a cut inside src's rollback history is exact; a deeper one as kvq_cache_truncate's), with
   an empty rollback history. dst's config must equal src's but for max_tokens (at least
   n_tokens, else KVQ_ERR_FULL) and rollback_tokens; a mismatch, n_tokens outside
   0..tokens of src, or dst's memory overlapping src's give KVQ_ERR_INVALID. On any error dst
   is unchanged. src is only read (as by kvq_cache_read). */
KVQ_API kvq_status kvq_cache_copy(kvq_cache *dst, const kvq_cache *src, int n_tokens);
KVQ_API int        kvq_cache_tokens(const kvq_cache *c);
KVQ_API const kvq_config *kvq_cache_config(const kvq_cache *c);
/* Bytes holding the tokens now stored: codes + scales/mins + sinks + residual window (not the
   rollback history, which holds no token: it is in kvq_cache_bytes()). */
KVQ_API size_t     kvq_cache_payload_bytes(const kvq_cache *c);
/* Steady-state storage per K/V element of a config, residual window and sinks excluded, and
   so the rollback history, a fixed fp16 extension of the window (in kvq_cache_bytes()). */
KVQ_API double     kvq_config_bits_per_element(const kvq_config *cfg);

/* k, v: [n_tokens][n_kv_heads][head_dim] floats, finite and within fp16 range (|x| <= 65504;
   with KVQ_ROTATE_HADAMARD, each head's row of L2 norm <= 65504, so it stays in range rotated). */
KVQ_API kvq_status kvq_cache_append(kvq_cache *c, const float *k, const float *v, int n_tokens);
/* Reconstructs tokens [first, first+n) into the layout of append; k or v may be NULL. */
KVQ_API kvq_status kvq_cache_read(const kvq_cache *c, int first, int n, float *k, float *v);

/* q, out: [n_queries][n_q_heads][head_dim]. Single-threaded. Threads: calls on one cache
   may run concurrently (they only read it) unless salient_ratio > 0 with the attention
   policy, where kvq_attention records the attention each waiting token receives.
   q must be finite with |s| * sum_c |q_c| <= 2^100 for every head's row, s the scale
   (KVQ_ERR_INVALID otherwise): scores then stay finite on every path. out must not
   overlap q. */
KVQ_API kvq_status kvq_attention(kvq_cache *c, const float *q, float *out, const kvq_attn_params *p);

/* Chunked prefill: appends n_tokens tokens (k, v as for append) and attends their queries
   (p->n_queries == n_tokens): query i sees every token stored before the chunk, as stored,
   and the chunk's tokens 0..i at full precision (fp32), so prefill into an empty cache is
   exact attention. All or nothing: on any error nothing is appended and out is not written.
   out must not overlap q, k, v or the cache. It records no salience. Single-threaded; the
   stored part runs on the ISA's kernels, the chunk part in fp32 C. */
KVQ_API kvq_status kvq_attention_prefill(kvq_cache *c, const float *k, const float *v, int n_tokens,
                                         const float *q, float *out, const kvq_attn_params *p);
/* Prefill's split form, for a caller's threads: the rows of out of queries [q_first, q_end)
   (q_first == q_end: none) and of the query heads that read KV heads [kv_first, kv_end),
   bit for bit those kvq_attention_prefill() writes, and nothing appended: it only reads the
   cache, so calls over disjoint ranges may run concurrently. When every row is written,
   kvq_cache_append(c, k, v, n_tokens) (exclusive access) makes the cache the one prefill
   leaves. Checks as prefill does (KVQ_ERR_FULL if the chunk would not fit), so that append
   cannot fail. Query i costs (stored tokens + i + 1) per head: split heads, or queries
   where there are fewer heads than threads.
       // thread k of n: KV heads [k*H/n, (k+1)*H/n) where n <= H
       kvq_attention_prefill_partial(c, kc, vc, m, q, out, &p, 0, m, k * H / n, (k + 1) * H / n);
       // ... barrier, then one thread: kvq_cache_append(c, kc, vc, m); */
KVQ_API kvq_status kvq_attention_prefill_partial(const kvq_cache *c, const float *k, const float *v, int n_tokens,
                                                 const float *q, float *out, const kvq_attn_params *p, int q_first,
                                                 int q_end, int kv_first, int kv_end);

/* Split attention. A state holds, per query and query head, (max, sum, acc[head_dim]):
   kvq_attention_state_floats() floats. kvq_attention_partial() fills the rows of the query
   heads that read KV heads [kv_first, kv_end), over tokens [tok_first, tok_end) (each query
   still sees only tokens <= its position); rows of other heads are left untouched.
   kvq_attention_merge() combines n_states states that each hold every row (split the
   tokens across states; split the heads inside one state) and writes the normalized output
   (rotated back to the caller's space). Partial calls only read the cache: any number may
   run concurrently, into distinct states or disjoint rows of one. They record no salience
   (a partial sees no final softmax): with salient_ratio > 0 and the attention policy, call
   kvq_attention, or tokens are chosen by the error policy. With the integer kernels
   (kvq_set_arith) softmax weights are quantized per run of tokens from a tile's start: a
   token range that begins inside a tile (a tile: the whole key blocks that fit in 128 tokens,
   from a multiple of that span after the sinks) runs other runs than the whole call, so the merged
   output matches it within the integer contract (1e-4), not to rounding; ranges cut at tile
   boundaries, as kvq_batch_plan cuts them, match it to rounding. */
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
/* Marks every row of a state empty, so a state whose rows are not all filled by partial
   calls still merges (its empty rows count for nothing). */
KVQ_API kvq_status kvq_attention_state_init(const kvq_cache *c, const kvq_attn_params *p, float *state);

/* Batched decode attention: n_seqs sequences, one cache each (any lengths, bits, G; all with
   caches[0]'s head_dim and n_kv_heads, else KVQ_ERR_INVALID), on n_threads of the caller's
   threads. Every out[s] gets what kvq_attention(caches[s], q[s], out[s], p) writes: bit for
   bit where a (sequence, KV head) runs whole on one thread, to rounding where a long one is
   split by tokens across threads and merged (NMSE ~1e-10 at 2K tokens, growing with the
   length as fp32 rounding does: ~1e-9 at 64K; on every ISA path).
   kvq_batch_plan() checks everything first and writes nothing on error: each sequence as
   kvq_attention checks it (so a cache with fewer than p->n_queries tokens is refused), and
   no output may overlap another output, any query, any cache or the plan's memory. It cuts
   the work (tokens x KV heads over all sequences) into n_threads shares, each less than
   one tile + 1 from the mean (a tile: up to 128 tokens of whole key blocks), cut where a
   single call's tiles end, so one 64K-token sequence among many short ones is spread over
   every thread. The plan lives in mem (any alignment;
   kvq_batch_plan_bytes() sizes it, 0 for bad arguments, and less gives KVQ_ERR_BUFFER) and
   binds caches, q and out: do not move it, change q, or append to the caches until the batch
   is done (a call that finds a cache changed returns KVQ_ERR_INVALID and writes nothing).
   Thread k calls kvq_batch_attention(plan, k), then, after a barrier that all n_threads
   attention calls have passed, kvq_batch_merge(plan, k), which finishes the rows that were
   split (at most one per thread; it refuses, writing nothing, while an attention call it
   needs has not run). The library never waits: k may run on any thread, once per step.
   The calls only read the caches and record no salience (like the partial calls).
   kvq_batch_plan_bytes() reads head_dim and n_kv_heads of shape; n_threads <= 65536.
   Planning costs O(n_seqs^2) for its aliasing checks, O(n_seqs x n_kv_heads + n_threads)
   for the rest.
       size_t n = kvq_batch_plan_bytes(kvq_cache_config(caches[0]), &p, n_seqs, nt);
       kvq_batch *b;  // mem: n bytes of yours
       if (kvq_batch_plan(&b, mem, n, caches, q, out, n_seqs, &p, nt) != KVQ_OK) return;
       // on thread k of nt:
       kvq_batch_attention(b, k);  barrier();  kvq_batch_merge(b, k); */
typedef struct kvq_batch kvq_batch;
KVQ_API size_t     kvq_batch_plan_bytes(const kvq_config *shape, const kvq_attn_params *p, int n_seqs,
                                        int n_threads);
KVQ_API kvq_status kvq_batch_plan(kvq_batch **plan, void *mem, size_t mem_bytes, kvq_cache *const *caches,
                                  const float *const *q, float *const *out, int n_seqs, const kvq_attn_params *p,
                                  int n_threads);
KVQ_API kvq_status kvq_batch_attention(kvq_batch *plan, int thread_index);
KVQ_API kvq_status kvq_batch_merge(kvq_batch *plan, int thread_index);

/* ISA selection. Kernels for AVX2 (+FMA, F16C), AVX-512 and NEON give the scalar
   path's quantized bytes exactly and its attention output within NMSE 1e-6.
   kvq_set_isa() returns KVQ_ERR_UNSUPPORTED (and changes nothing) when that path
   is not compiled in or the CPU lacks it. It is not thread-safe: call it while no
   other kvq call runs. The default is the best ISA available. */
#define KVQ_HAS_ISA_API 1
typedef enum kvq_isa { KVQ_ISA_SCALAR = 0, KVQ_ISA_AVX2 = 1, KVQ_ISA_AVX512 = 2, KVQ_ISA_NEON = 3 } kvq_isa;
KVQ_API kvq_status  kvq_set_isa(kvq_isa isa);
KVQ_API kvq_isa     kvq_get_isa(void);
KVQ_API const char *kvq_isa_name(kvq_isa isa);

/* Attention arithmetic on quantized keys and values (2-4 bits, shapes in kvq.h's "Integer
   attention"). KVQ_ARITH_INTEGER: integer dot products on the codes (a 16-bit query, 8-bit
   softmax weights), within squared relative error 1e-4 of the float kernels' output.
   KVQ_ARITH_FLOAT: the float kernels, the reference. KVQ_ARITH_AUTO (the default): integer
   where the active ISA has native integer kernels (AVX-512 with VNNI and VBMI; AVX2, with
   vpmaddubsw; NEON built for the Armv8.2 dot product, -march=armv8.2-a+dotprod), float
   elsewhere (AVX-512 without VNNI or VBMI runs the AVX2 integer kernels). INTEGER on scalar and
   plain NEON runs the same integer scheme in portable C (slow: for tests). Like kvq_set_isa,
   not thread-safe; KVQ_ERR_INVALID for a value out of the enum. */
typedef enum kvq_arith { KVQ_ARITH_AUTO = 0, KVQ_ARITH_FLOAT = 1, KVQ_ARITH_INTEGER = 2 } kvq_arith;
KVQ_API kvq_status  kvq_set_arith(kvq_arith a);
KVQ_API kvq_arith   kvq_get_arith(void);
KVQ_API int         kvq_integer_kernels(void); /* 1 if attention now runs the integer kernels */


/* Serialization (prompt caching): a versioned little-endian image of the config, the
   token count and the payload, with CRC32C checksums. A cache saved on one machine loads
   on any other (x86, aarch64) into the very same bytes: reads and later appends are then
   identical everywhere; attention outputs are those of the loading machine's ISA path
   (paths agree within the NMSE of kvq_set_isa's contract, not to the bit).
   Images are untrusted input. Loading checks the header, the sizes, both checksums and
   every record (fp16 values finite, scales and mins in the range appending produces,
   side-store indices in their block and ascending, salience scores finite and >= 0), so
   an image can only describe a state that appending could have produced; a bad one gives
   KVQ_ERR_CORRUPT (KVQ_ERR_UNSUPPORTED for a newer version) and writes nothing.
   The image's max_tokens is a claim, not a size to trust: size memory from the tokens it
   holds. kvq_serialized_info() reads and checks only the header (config and tokens held);
   then choose a capacity >= those tokens, size it with kvq_cache_bytes(), and
   kvq_cache_load() the image into it:
       kvq_config cfg; int held;
       if (kvq_serialized_info(img, n, &cfg, &held) != KVQ_OK) return;
       cfg.max_tokens = held + room;
       mem = malloc(bytes = kvq_cache_bytes(&cfg));
       kvq_cache_load(&cache, img, n, cfg.max_tokens, mem, bytes);
   kvq_cache_load() with max_tokens 0 keeps the image's capacity (kvq_cache_deserialize());
   a max_tokens below the tokens held gives KVQ_ERR_FULL. mem must not overlap bytes. */
KVQ_API size_t     kvq_cache_serialized_bytes(const kvq_cache *c);
KVQ_API kvq_status kvq_cache_serialize(const kvq_cache *c, void *buf, size_t buf_bytes, size_t *written);
KVQ_API kvq_status kvq_serialized_info(const void *bytes, size_t n_bytes, kvq_config *cfg, int *n_tokens);
KVQ_API kvq_status kvq_serialized_config(const void *bytes, size_t n_bytes, kvq_config *cfg);
KVQ_API kvq_status kvq_cache_load(kvq_cache **out, const void *bytes, size_t n_bytes, int max_tokens, void *mem,
                                  size_t mem_bytes);
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
#if defined(__linux__) && !defined(KVQ_NO_HUGEPAGES) /* kvq_cache_create's own memory only */
#include <sys/mman.h>
#ifdef MADV_HUGEPAGE
#define KVQ__HUGEPAGES 1
#endif
#endif
#endif
#ifndef KVQ__HUGEPAGES
#define KVQ__HUGEPAGES 0
#endif

#ifdef __cplusplus
extern "C" {
#endif

/* Which ISA kernels the implementation compiles: KVQ_NO_SIMD, KVQ_SIMD (one, forced), the
   compiler's target flags, or (gcc/clang on x86 without AVX2 flags, or KVQ_RUNTIME_DISPATCH)
   all x86 kernels picked at run time; KVQ_NO_RUNTIME_DISPATCH keeps a baseline build scalar. */
#define KVQ__HAVE_AVX2 0
#define KVQ__HAVE_AVX512 0
#define KVQ__HAVE_NEON 0
#define KVQ__RUNTIME 0
#if !defined(KVQ_NO_SIMD)
#if defined(__x86_64__) || defined(_M_X64) || defined(__i386__) || defined(_M_IX86)
#if defined(KVQ_SIMD)
#if KVQ_SIMD == 1 || KVQ_SIMD == 2
#undef KVQ__HAVE_AVX2
#define KVQ__HAVE_AVX2 1
#endif
#if KVQ_SIMD == 2
#undef KVQ__HAVE_AVX512
#define KVQ__HAVE_AVX512 1
#endif
#elif defined(__AVX2__) && ((defined(__FMA__) && defined(__F16C__)) || defined(_MSC_VER)) && \
    !defined(KVQ_RUNTIME_DISPATCH)
/* the compiler targets AVX2 (MSVC's /arch:AVX2 defines no __FMA__, but every AVX2 CPU has FMA
   and F16C): compile-time kernels, AVX-512 too where the flags allow it */
#undef KVQ__HAVE_AVX2
#define KVQ__HAVE_AVX2 1
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512DQ__) && defined(__AVX512VL__)
#undef KVQ__HAVE_AVX512
#define KVQ__HAVE_AVX512 1
#endif
#elif (defined(__GNUC__) || defined(__clang__)) && !defined(KVQ_NO_RUNTIME_DISPATCH)
/* a baseline build (no -mavx2): the AVX2 and AVX-512 kernels are compiled with target
   attributes and picked by cpuid on first use, so `cc -O2` runs them without -march */
#undef KVQ__HAVE_AVX2
#undef KVQ__HAVE_AVX512
#undef KVQ__RUNTIME
#define KVQ__HAVE_AVX2 1
#define KVQ__HAVE_AVX512 1
#define KVQ__RUNTIME 1
#endif
#elif (defined(__aarch64__) || defined(_M_ARM64)) && (!defined(KVQ_SIMD) || KVQ_SIMD == 3)
#undef KVQ__HAVE_NEON
#define KVQ__HAVE_NEON 1
#endif
#endif /* !KVQ_NO_SIMD */
#define KVQ__HAVE_SIMD (KVQ__HAVE_AVX2 || KVQ__HAVE_AVX512 || KVQ__HAVE_NEON)
/* The AVX-512 integer attention kernels need VNNI (vpdpbusd) and VBMI (vpermb); a runtime-dispatch
   build requires both of an AVX-512 CPU (older ones take the AVX2 kernels there). */
/* KVQ__ANALYZER (make lint's gcc -fanalyzer steps, which take over 10 minutes on the unrolled integer
   kernels) takes the portable integer kernels instead; clang-tidy and cppcheck see the SIMD ones. */
#if KVQ__HAVE_AVX512 && (KVQ__RUNTIME || (defined(__AVX512VNNI__) && defined(__AVX512VBMI__))) && !defined(KVQ__ANALYZER)
#define KVQ__HAVE_AVX512_INT 1
#else
#define KVQ__HAVE_AVX512_INT 0
#endif
#if KVQ__HAVE_NEON && defined(__ARM_FEATURE_DOTPROD) && !defined(KVQ__ANALYZER) /* sdot, udot (Armv8.2) */
#define KVQ__HAVE_NEON_INT 1
#else
#define KVQ__HAVE_NEON_INT 0
#endif

#if defined(__GNUC__) || defined(__clang__)
#define KVQ__INLINE inline __attribute__((always_inline)) /* constant bits / head count fold away; ISA copies */
#else
#define KVQ__INLINE
#endif

#define KVQ__FP16_MAX 65504.0f
#define KVQ__MAX_TOKENS (1 << 30)
#define KVQ__MAX_HEADS 4096
#define KVQ__MAX_ROLLBACK 4096 /* history rows and salience snapshots grow with it */
#define KVQ__ALIGN 64
#define KVQ__HEAD_CHUNK 8 /* query heads of one KV group handled together in attention */

/* ---------------------------------------------------------------------------
   Formats. IEEE fp16 conversions (round to nearest even, as F16C and CUDA do),
   the bit packing of codes (little-endian, lowest bits first; 3 bits as two
   bit planes, so no code straddles a byte) and the byte size of every record.
   --------------------------------------------------------------------------- */

/* A float's bits and back (memcpy into a fresh local: no aliasing, and analyzers follow it). */
static KVQ__INLINE uint32_t kvq__f32_bits(float f) {
    uint32_t b;
    memcpy(&b, &f, 4);
    return b;
}
static KVQ__INLINE float kvq__bits_f32(uint32_t b) {
    float f;
    memcpy(&f, &b, 4);
    return f;
}

static uint16_t kvq__f32_to_f16(float f) {
    uint32_t x = kvq__f32_bits(f), ax, sign;
    sign = (x >> 16) & 0x8000u;
    ax = x & 0x7fffffffu;
    if (ax > 0x7f800000u) return (uint16_t)(sign | 0x7e00u);        /* NaN */
    if (ax >= 0x477ff000u) return (uint16_t)(sign | 0x7c00u);       /* >= 65520: inf */
    if (ax < 0x38800000u) {
        /* below 2^-14: a subnormal half counts units of 2^-24. Adding 0.5 (whose
           ulp is 2^-24) rounds to that unit, to nearest even, in one fp add. */
        return (uint16_t)(sign | (kvq__f32_bits(kvq__bits_f32(ax) + 0.5f) - 0x3f000000u));
    }
    /* normal: rebias the exponent (127 -> 15) and round 23 -> 10 mantissa bits */
    ax += 0xc8000fffu + ((ax >> 13) & 1u);
    return (uint16_t)(sign | (ax >> 13));
}

static float kvq__f16_to_f32(uint16_t h) {
    uint32_t sign = (uint32_t)(h & 0x8000u) << 16;
    uint32_t e = (h >> 10) & 0x1fu, m = h & 0x3ffu;
    if (e == 0) return kvq__bits_f32(kvq__f32_bits((float)m * (1.0f / 16777216.0f)) | sign); /* m * 2^-24, exact */
    if (e == 31) return kvq__bits_f32(sign | 0x7f800000u | (m << 13));
    return kvq__bits_f32(sign | ((e + 112u) << 23) | (m << 13));
}

/* A packed row holds n codes (n a multiple of 8: G for a key channel's row of a block, head_dim
   for a per-token record) in n * bits / 8 bytes, little-endian, lowest bits first:
     2, 4, 8 bits: code i at bits [i*bits, (i+1)*bits) of the row (never straddling a byte);
     3 bits (format v2), two bit planes:
       bytes [0, n/4)      the low 2 bits of every code, as a 2-bit row: bits 2*(i%4) of byte i/4;
       bytes [n/4, 3n/8)   the high bit: bit i%8 of byte n/4 + i/8;
       code = lo2 | hi1 << 2.
   Eight codes from i (a multiple of 8) are a run: bits bytes at i * bits / 8; at 3 bits, two
   low-plane bytes at i/4 and one high-plane byte at kvq__hi_at(n, i).
   The codes [c0, c0 + m) of a 3-bit row (c0, m multiples of 8) are the planes of an m-code row
   of their own: m/4 bytes at c0/4, m/8 bytes at n/4 + c0/8 (how a value group is written). */
static KVQ__INLINE size_t kvq__hi_at(int n, int i) { return (size_t)n / 4 + (size_t)i / 8; }

static unsigned kvq__get_code(const uint8_t *row, int n, int i, int bits) {
    const int b = bits == 3 ? 2 : bits; /* the low plane of a 3-bit row is a 2-bit row */
    const unsigned bit = (unsigned)i * (unsigned)b;
    unsigned v = (unsigned)(row[bit >> 3] >> (bit & 7u)) & ((1u << b) - 1u);
    if (bits == 3) v |= (unsigned)(row[kvq__hi_at(n, i)] >> (i & 7) & 1u) << 2;
    return v;
}

/* ORs code into place: the row starts zeroed. */
static void kvq__put_code(uint8_t *row, int n, int i, int bits, unsigned code) {
    const int b = bits == 3 ? 2 : bits;
    const unsigned bit = (unsigned)i * (unsigned)b;
    row[bit >> 3] = (uint8_t)(row[bit >> 3] | (code & ((1u << b) - 1u)) << (bit & 7u));
    if (bits == 3) row[kvq__hi_at(n, i)] = (uint8_t)(row[kvq__hi_at(n, i)] | (code >> 2) << (i & 7));
}

/* The element formats of keys (key_bits), values (value_bits) and salient entries (salient_bits),
   one entry per supported bit width (kvq__check_bits reads the table). A quantized format stores
   b-bit codes, packed as above, with an fp16 scale and min per group; 16 bits stores the fp16
   rows themselves, no params. Record sizes and every "codes or fp16 rows" choice read the entry,
   so a format is described once. KVQ__FORMATS is the initializer (kvq_cuda.h copies it to the
   device). */
typedef struct kvq__format {
    int bits;        /* per element: a code's width, or 16 (an fp16) */
    int quantized;   /* 1: codes with a scale and min per group; 0: plain fp16 rows */
    int planes;      /* bit planes of a code row: 2 at 3 bits (a 2-bit plane, then a 1-bit one), else 1 */
    int levels;      /* the top code, 2^bits - 1 (0: not quantized) */
    int param_bytes; /* a group's fp16 scale and min: 4 (0: no params) */
    int width;       /* bytes an image swaps as one element of the codes: 2 (fp16 rows), 1 (code bytes) */
} kvq__format;
#define KVQ__FORMATS                                                                                            \
    {{2, 1, 1, 3, 4, 1}, {3, 1, 2, 7, 4, 1}, {4, 1, 1, 15, 4, 1}, {8, 1, 1, 255, 4, 1}, {16, 0, 1, 0, 0, 2}}
#define KVQ__N_FORMATS 5
static const kvq__format kvq__formats[KVQ__N_FORMATS] = KVQ__FORMATS;

/* The format of bits. Callers pass widths kvq_config_check accepted; any other gets the last
   entry (never NULL), which kvq__check_bits tells apart by its bits. */
static const kvq__format *kvq__fmt(int bits) {
    const kvq__format *f = kvq__formats;
    while (f->bits != bits && f < kvq__formats + KVQ__N_FORMATS - 1) f++;
    return f;
}

/* Bytes of a row of n elements (n a multiple of 8): packed codes, or n fp16. */
static size_t kvq__row_bytes(const kvq__format *f, size_t n) { return n * (size_t)f->bits / 8; }

/* The codes of a quantized key block record, after its fp16 scale[D] and min[D]
   (kvq__key_block_bytes); _rw for the quantizers that write them. */
static KVQ__INLINE const uint8_t *kvq__block_codes(const uint8_t *blk, int D) { return blk + 4 * (size_t)D; }
static KVQ__INLINE uint8_t *kvq__block_codes_rw(uint8_t *blk, int D) { return blk + 4 * (size_t)D; }

/* Tokens per key block: key_block, or group_size where it is 0. */
static int kvq__kb(const kvq_config *cfg) { return cfg->key_block ? cfg->key_block : cfg->group_size; }

/* Value groups: ceil(head_dim / G); the last one is shorter when G does not divide head_dim. */
static int kvq__value_groups(const kvq_config *cfg) {
    return (cfg->head_dim + cfg->group_size - 1) / cfg->group_size;
}

/* Key block of one head: fp16 scale[D], fp16 min[D], then per channel G codes packed
   along tokens. At 16 bits: G rows of D fp16, token-major (as many bytes as D rows of G). */
static size_t kvq__key_block_bytes(const kvq_config *cfg) {
    const kvq__format *f = kvq__fmt(cfg->key_bits);
    return (size_t)cfg->head_dim * ((size_t)f->param_bytes + kvq__row_bytes(f, (size_t)kvq__kb(cfg)));
}

/* Value token of one head: fp16 scale[ngroups], fp16 min[ngroups] (the "params"),
   then D codes packed along channels. At 16 bits: no params, D fp16. */
static size_t kvq__token_param_bytes(const kvq_config *cfg, int bits) {
    return (size_t)kvq__fmt(bits)->param_bytes * (size_t)kvq__value_groups(cfg);
}
static size_t kvq__token_code_bytes(const kvq_config *cfg, int bits) {
    return kvq__row_bytes(kvq__fmt(bits), (size_t)cfg->head_dim);
}
/* Bits of a value group's scale and min: 32 (two fp16) or 16 (see kvq__fit_range16). */
static int kvq__vpb(const kvq_config *cfg) {
    return cfg->value_param_bits == 16 && cfg->value_bits <= 3 ? 16 : 32; /* 4-, 8-bit values: see kvq_config */
}
static size_t kvq__value_param_bytes(const kvq_config *cfg) {
    return kvq__token_param_bytes(cfg, cfg->value_bits) / (kvq__vpb(cfg) == 16 ? 2 : 1);
}
static size_t kvq__value_code_bytes(const kvq_config *cfg) { return kvq__token_code_bytes(cfg, cfg->value_bits); }

/* Salient tokens per key block: the ratio of G, at least one when the ratio is positive. */
static int kvq__salient_count(const kvq_config *cfg) {
    int n;
    if (!(cfg->salient_ratio > 0.0f)) return 0;
    n = (int)(cfg->salient_ratio * (float)kvq__kb(cfg) + 0.5f);
    return n < 1 ? 1 : (n > kvq__kb(cfg) - 1 ? kvq__kb(cfg) - 1 : n);
}

/* Whether kvq_attention records the attention waiting keys receive (salience scores). */
static int kvq__records_attention(const kvq_config *cfg) {
    return kvq__salient_count(cfg) && cfg->salient_policy == KVQ_SALIENT_ATTENTION;
}

/* Side-store entry: u16 token index in its block, then K and V as per-token records at
   salient_bits, params first: K's params, V's params, K's codes, V's codes (8 bits: fp16
   scale[ng], min[ng] each, codes[D]; 16 bits: no params, K[D], V[D] as fp16). */
static size_t kvq__side_entry_bytes(const kvq_config *cfg) {
    return 2 + 2 * (kvq__token_param_bytes(cfg, cfg->salient_bits) + kvq__token_code_bytes(cfg, cfg->salient_bits));
}

KVQ_API double kvq_config_bits_per_element(const kvq_config *cfg) {
    double kb, vb, side;
    if (kvq_config_check(cfg) != KVQ_OK) return 0.0;
    {
        const size_t token_key_bytes =
            kvq__token_param_bytes(cfg, cfg->key_bits) + kvq__token_code_bytes(cfg, cfg->key_bits);
        kb = cfg->key_axis == KVQ_KEYS_PER_TOKEN
                 ? 8.0 * (double)token_key_bytes / cfg->head_dim
                 : 8.0 * (double)kvq__key_block_bytes(cfg) / ((double)kvq__kb(cfg) * cfg->head_dim);
    }
    vb = 8.0 * (double)(kvq__value_param_bytes(cfg) + kvq__value_code_bytes(cfg)) / cfg->head_dim;
    side = 8.0 * (double)kvq__salient_count(cfg) * (double)kvq__side_entry_bytes(cfg) /
           (2.0 * kvq__kb(cfg) * cfg->head_dim);
    return 0.5 * (kb + vb) + side;
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

/* The kernel list. Every ISA implements each kernel as base_scalar, base_avx2, base_avx512 and
   base_neon (or aliases another ISA's); the first name is the wrapper the library calls, which
   picks the active ISA's (section "Dispatch"). Adding a kernel: one line here and its
   implementations. ret is `return` for kernels that return a value (C99 has no void return). */
#define KVQ__KERNELS(X)                                                                                           \
    X(kvq__dispatch_to_f16, kvq__to_f16, void, , (uint16_t *dst, const float *src, int n), (dst, src, n))          \
    X(kvq__dispatch_to_f32, kvq__to_f32, void, , (float *dst, const uint16_t *src, int n), (dst, src, n))          \
    X(kvq__dispatch_fits_fp16, kvq__fits_fp16, int, return, (const float *x, size_t n), (x, n))                    \
    X(kvq__dispatch_params16, kvq__params16, void, , (const uint16_t *par, int n, int ng, float *out),            \
      (par, n, ng, out))                                                                                           \
    X(kvq__dispatch_quantize_keys, kvq__quantize_keys, void, ,                                                     \
      (const uint16_t *rows, int D, int G, int bits, uint8_t *blk, int keep_params),                               \
      (rows, D, G, bits, blk, keep_params))                                                                        \
    X(kvq__dispatch_quantize_value, kvq__quantize_value, void, ,                                                   \
      (const uint16_t *row, int D, int G, int bits, int pbits, int grid, uint16_t *par, uint8_t *codes),          \
      (row, D, G, bits, pbits, grid, par, codes))                                                                  \
    X(kvq__dispatch_butterflies, kvq__butterflies, void, , (float *x, int n, int len), (x, n, len))                \
    X(kvq__dispatch_search_row, kvq__search_row, void, ,                                                            \
      (const float *x, int D, int G, int bits, int pbits, int steps, const float *lo, const float *hi,              \
       kvq__qparams *best),                                                                                        \
      (x, D, G, bits, pbits, steps, lo, hi, best))                                                                 \
    X(kvq__dispatch_search_columns, kvq__search_columns, void, ,                                                   \
      (const float *xb, int G, const uint8_t *w, int bits, int steps, const float *lo, const float *hi,             \
       kvq__qparams *best),                                                                                        \
      (xb, G, w, bits, steps, lo, hi, best))                                                                       \
    X(kvq__k_scores_codes, kvq__scores_codes, void, ,                                                              \
      (const uint8_t *blk, int D, int G, int bits, const float *q, int nh, float *scores),                         \
      (blk, D, G, bits, q, nh, scores))                                                                            \
    X(kvq__k_scores_f16, kvq__scores_f16, void, ,                                                                  \
      (const uint16_t *const *rows, int n, int D, const float *q, int nh, float *scores), (rows, n, D, q, nh, scores)) \
    X(kvq__k_exp_sum, kvq__exp_sum, float, return, (float *x, int n, float mx), (x, n, mx))                        \
    X(kvq__k_acc_codes, kvq__acc_codes, void, ,                                                                    \
      (const uint8_t *codes, size_t stride, const float *par, int n, int D, int G, int bits, const float *p, int nh, \
       float *const *acc),                                                                                         \
      (codes, stride, par, n, D, G, bits, p, nh, acc))                                                             \
    X(kvq__k_dot_codes, kvq__dot_codes, void, ,                                                                    \
      (const uint8_t *codes, size_t stride, const float *par, int n, int D, int G, int bits, const float *q, int nh, \
       float *scores),                                                                                             \
      (codes, stride, par, n, D, G, bits, q, nh, scores))                                                          \
    X(kvq__k_acc_f16, kvq__acc_f16, void, ,                                                                        \
      (const uint16_t *const *rows, int n, int D, const float *p, int nh, float *const *acc), (rows, n, D, p, nh, acc)) \
    X(kvq__k_scores_int, kvq__scores_int, void, ,                                                                  \
      (const uint8_t *blk, int D, int G, int bits, const float *q, int nh, float *scores),                         \
      (blk, D, G, bits, q, nh, scores))                                                                            \
    X(kvq__k_acc_int, kvq__acc_int, void, ,                                                                        \
      (const uint8_t *codes, size_t stride, const float *par, int n, int D, int G, int bits, const float *p, int nh, \
       float *const *acc),                                                                                         \
      (codes, stride, par, n, D, G, bits, p, nh, acc))
#define KVQ__DECLARE_WRAPPER(wrapper, base, rtype, ret, params, args) static rtype wrapper params;
KVQ__KERNELS(KVQ__DECLARE_WRAPPER)
#undef KVQ__DECLARE_WRAPPER
static int kvq__int_on(void); /* attention runs the integer kernels (kvq_set_arith, section "Dispatch") */

static kvq__qparams kvq__fit_range(float lo, float hi, int bits) {
    kvq__qparams qp;
    qp.min = kvq__f32_to_f16(lo);
    qp.scale = kvq__f32_to_f16((hi - lo) / (float)((1 << bits) - 1));
    return qp;
}

/* Value params in 16 bits (value_param_bits 16), per group: byte 0 the scale e, a positive fp16
   cut to 5 exponent and 3 mantissa bits (the fp16 whose bits are e << 7; e <= 0xf7, finite), byte
   1 an int8 min m8 in units of scale / 16:  x' = s * (code + m8 / 16). Fitting: e the smallest scale
   >= (hi - lo) / (2^b - 1), so the grid spans the range, raised until lo lies in [-8 s, 127 s / 16],
   then m8 = round(16 lo / s), within s / 32 of lo. The
   scale has at most 4 significant bits and m8 8, so m = m8 * s / 16 is exact in float. The
   smallest scale but 0 is 2^-17: a group narrower than that has an absolute error <= 2^-18. */
/* The scale of code e: the fp16 with bits e << 7, branch-free. e << 20 is that fp16's exponent and
   mantissa in a float's place: rebias by 112 (a normal fp16, e >= 8), or by 113 and take away
   2^-14 (a subnormal one: (e & 7) * 2^-17). */
static KVQ__INLINE float kvq__e5m3(unsigned e) {
    const float normal = kvq__bits_f32((e << 20) + (112u << 23));
    const float sub = kvq__bits_f32((e << 20) + (113u << 23)) - 6.103515625e-5f;
    return e >= 8 ? normal : sub;
}
/* The smallest scale code whose scale is >= need (0 <= need <= 65504). */
static KVQ__INLINE unsigned kvq__e5m3_ceil(float need) {
    uint32_t x = kvq__f32_bits(need);
    unsigned e;
    if (need < 6.103515625e-5f) { /* below fp16's normals: k * 2^-17, k <= 8 */
        float k = need * 131072.0f; /* exact */
        return (unsigned)k + ((float)(unsigned)k < k);
    }
    e = (((x >> 23) - 112u) << 3) | ((x >> 20) & 7u);
    return e + ((x & 0xfffffu) != 0); /* a carry runs into the exponent */
}
static KVQ__INLINE float kvq__min16(unsigned e, unsigned m8) {
    const int v = (int)(m8 & 0xffu) - (m8 & 0x80u ? 256 : 0); /* int8, two's complement */
    return ((float)v * kvq__e5m3(e)) * 0.0625f;
}
static KVQ__INLINE kvq__qparams kvq__fit_range16(float lo, float hi, int bits) {
    float need = (hi - lo) / (float)((1 << bits) - 1), s, m8;
    unsigned e;
    kvq__qparams qp;
    need = -0.125f * lo > need ? -0.125f * lo : need; /* lo >= -8 s */
    need = lo / 7.9375f > need ? lo / 7.9375f : need;  /* lo <= 127 s / 16 */
    e = kvq__e5m3_ceil(need);
    e = e > 0xf7u ? 0xf7u : e; /* 0xf8 and up: inf, NaN */
    while (e < 0xf7u && !(lo >= -8.0f * kvq__e5m3(e) && lo <= 7.9375f * kvq__e5m3(e))) e++; /* a rounded division */
    s = kvq__e5m3(e);
    m8 = s == 0.0f ? 0.0f : rintf(lo * 16.0f / s);
    m8 = m8 < -128.0f ? -128.0f : m8 > 127.0f ? 127.0f : m8;
    qp.scale = (uint16_t)e;
    qp.min = (uint16_t)((unsigned)((int)m8 + 256) & 0xffu);
    return qp;
}

/* A group's params for value_param_bits pbits (32: two fp16; 16: the packed pair above). */
static kvq__qparams kvq__fit(float lo, float hi, int bits, int pbits) {
    return pbits == 16 ? kvq__fit_range16(lo, hi, bits) : kvq__fit_range(lo, hi, bits);
}
static KVQ__INLINE void kvq__params_f32(kvq__qparams qp, int pbits, float *m, float *s) {
    *s = pbits == 16 ? kvq__e5m3(qp.scale) : kvq__f16_to_f32(qp.scale);
    *m = pbits == 16 ? kvq__min16(qp.scale, qp.min) : kvq__f16_to_f32(qp.min);
}
/* Group g of a record's ng groups: fp16 scale[ng] then min[ng], or one u16 (scale | m8 << 8). */
static void kvq__put_params(uint16_t *par, int ng, int g, kvq__qparams qp, int pbits) {
    if (pbits == 16) par[g] = (uint16_t)(qp.scale | qp.min << 8);
    else {
        par[g] = qp.scale;
        par[ng + g] = qp.min;
    }
}
static KVQ__INLINE kvq__qparams kvq__get_params(const uint16_t *par, int ng, int g, int pbits) {
    kvq__qparams qp;
    qp.scale = pbits == 16 ? (uint16_t)(par[g] & 0xffu) : par[g];
    qp.min = pbits == 16 ? (uint16_t)(par[g] >> 8) : par[ng + g];
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

/* Range search (clipping). At 2 and 3 bits the min/max range spends levels on a group's
   extremes; a narrower range rounds the bulk finer and clips a few values. Of the grid x grid
   ranges (lo + range * f_i, hi - range * f_j), f_i = i * step, at most 3/8 of the range off
   each side at 2 bits and 3/16 at 3 (step = that / (grid - 1), rounded to 1/256), keep the one
   with the least weighted squared error s^2 * sum_t w_t d_t^2, d = u - code, u = (x - m) / s;
   ties keep the earlier candidate, so (min, max) stays unless beaten. The sides are searched
   one after the other (2 * grid - 1 candidates): the bottom's grid steps with the top at max,
   then the top's with the best bottom. Errors use float m and s; the winner is then rounded to
   fp16 params like any range. 16-bit value params are too coarse for that (a scale with 3
   mantissa bits): each candidate is scored with the params it would be stored as, which took
   the dumps' attention error from 0.56x to 0.47x of KIVI-2's on BabyLlama (k3v2b64p16).
   Determinism: d is rounded to 9 significant bits and w is an integer 1..31, so every w * d * d
   is exact in float and FMA contraction cannot change a sum; the sums run in a fixed order.
   The search is this C on every ISA path but AVX-512, which runs the same operations in vector
   lanes (and the CUDA twin the same in CUDA), so the bytes are the same everywhere. */
/* Which groups search, measured on the three real dumps (README, "Range search"): keys at 2
   bits, values at 2 and 3. At 3 bits searched keys lowered K's MSE but raised attention error
   on one dump; at 4 bits the search raised it on two. The rest keep min/max. */
#define KVQ__SEARCH_KEY_BITS 2
#define KVQ__SEARCH_VALUE_BITS 3

/* The search's steps per side for a group of keys (is_key) or values at bits: 1 = min/max. */
static int kvq__search_grid(int grid, int bits, int is_key) {
    return bits <= (is_key ? KVQ__SEARCH_KEY_BITS : KVQ__SEARCH_VALUE_BITS) && grid > 1 ? grid : 1;
}

/* Candidate (i, j): the range with i steps off the bottom and j off the top, as m, 1/s (0: no
   range left) and s^2 in float; only the winner is rounded to fp16 params. kvq__cands holds one
   side's candidates of a group as arrays (vector kernels store and read them in lanes). */
typedef struct kvq__cand { float lo, hi, m, r, s2; } kvq__cand;
typedef struct kvq__cands { float lo[8], hi[8], m[8], r[8], s2[8]; } kvq__cands;
static double kvq__search_step(int bits, int steps) { return rint(96.0 / (1 << (bits - 2)) / (steps - 1)) / 256.0; }
/* x as computed (rounded to double): a compiler's FMA contraction cannot fuse it into the add
   that follows, which would round once where the CUDA twin and the vector kernels round twice. */
static KVQ__INLINE double kvq__rounded(double x) {
#if (defined(__GNUC__) || defined(__clang__)) && defined(__x86_64__)
    __asm__("" : "+x"(x));
#elif (defined(__GNUC__) || defined(__clang__)) && defined(__aarch64__)
    __asm__("" : "+w"(x));
#else
    volatile double v = x;
    x = v;
#endif
    return x;
}
static KVQ__INLINE kvq__cand kvq__search_candidate(float lo, float hi, int bits, int pbits, double step, int i,
                                                  int j) {
    const double range = (double)hi - (double)lo;
    kvq__cand c;
    float s;
    /* range * (i * step) is exact in double when |hi| and |lo| are within a factor 2^19 (24 + 19
       bits of range, 10 of i * step: step is a multiple of 1/256 below 1/2, i < 8); beyond, it
       is rounded, so it must not fuse with the add */
    c.lo = i ? (float)((double)lo + kvq__rounded(range * (i * step))) : lo; /* (0, 0) is min/max exactly */
    c.hi = j ? (float)((double)hi - kvq__rounded(range * (j * step))) : hi;
    s = (c.hi - c.lo) / (float)((1 << bits) - 1);
    c.m = c.lo;
    if (pbits == 16) /* params this coarse are scored as they will be stored */
        kvq__params_f32(kvq__fit_range16(c.lo, c.hi, bits), 16, &c.m, &s);
    c.r = s > 0.0f ? 1.0f / s : 0.0f;
    c.s2 = s * s;
    return c;
}

/* The squared rounding error of x, in units of s^2, with d kept to 9 significant bits (0 below
   2^-40): d * d and 31 * d * d are then exact in float. Branch-free, so loops over it vectorize. */
static KVQ__INLINE float kvq__search_term(float x, float m, float r, float top) {
    float u = (x - m) * r, c = u < 0.0f ? 0.0f : u, d;
    uint32_t b;
    c = c > top ? top : c;
    c = (c + 12582912.0f) - 12582912.0f; /* 1.5 * 2^23: rounds 0 <= c < 2^22 to nearest even */
    b = ((kvq__f32_bits(u - c) & 0x7fffffffu) + 0x2000u) & 0x7fffc000u;
    d = kvq__bits_f32(b < 0x2b800000u ? 0u : b); /* |d| < 2^-40: 0 */
    return d * d;
}

/* Candidate k of the side-by-side search: the bottom first (k < steps: (k, 0)), then the top
   from the best bottom i_best ((i_best, k - steps + 1)); 2 * steps - 1 candidates in all. */
static KVQ__INLINE void kvq__search_ij(int k, int steps, int i_best, int *i, int *j) {
    *i = k < steps ? k : i_best;
    *j = k < steps ? 0 : k - steps + 1;
}

/* Channels of group g of a row of D in groups of G: G, fewer in the last when G does not divide D. */
static KVQ__INLINE int kvq__group_n(int D, int G, int g) { return D - g * G < G ? D - g * G : G; }

/* The sums of the search terms of x[0..n) (n a multiple of 8) for candidates c[0..nk): acc[k][l]
   adds the terms of x[l], x[8 + l], x[16 + l], ... in that order. The C here; an ISA may do the
   same lanes wider (AVX-512: two candidates a register). */
typedef void (*kvq__search_sums_fn)(const float *x, int n, const kvq__cands *c, int nk, float top, float (*acc)[8]);
static KVQ__INLINE void kvq__search_sums(const float *x, int n, const kvq__cands *c, int nk, float top,
                                         float (*acc)[8]) {
    int k, t, l;
    for (k = 0; k < nk; k++) { /* candidate by candidate: measured faster than one pass over x */
        for (l = 0; l < 8; l++) acc[k][l] = 0.0f;
        for (t = 0; t < n; t += 8)
            for (l = 0; l < 8; l++) acc[k][l] += kvq__search_term(x[t + l], c->m[k], c->r[k], top);
    }
}

/* The candidates of one side of the search of [lo, hi] (kvq__search_ij): side 0 (k, 0) for
   k < steps, side 1 (i_best, k + 1) for k < steps - 1. The C here; an ISA may compute them in
   lanes with the same operations (AVX-512). */
typedef void (*kvq__search_cands_fn)(float lo, float hi, int bits, int pbits, double step, int steps, int side,
                                     int i_best, kvq__cands *c);
static KVQ__INLINE void kvq__search_cands(float lo, float hi, int bits, int pbits, double step, int steps, int side,
                                          int i_best, kvq__cands *c) {
    int k, i, j;
    for (k = 0; k < (side ? steps - 1 : steps); k++) {
        kvq__cand one;
        kvq__search_ij(side ? steps + k : k, steps, i_best, &i, &j);
        one = kvq__search_candidate(lo, hi, bits, pbits, step, i, j);
        c->lo[k] = one.lo;
        c->hi[k] = one.hi;
        c->m[k] = one.m;
        c->r[k] = one.r;
        c->s2[k] = one.s2;
    }
}

/* Scores one side's candidates of a group from their lane sums (an error is the eight sums
   combined in a fixed tree, times s^2) and keeps the best: ties keep the earlier candidate. */
static KVQ__INLINE void kvq__search_pick(const kvq__cands *c, float (*acc)[8], int nk, int side, float *best_err,
                                         float *best_lo, float *best_hi, int *i_best) {
    float err = *best_err, lo = *best_lo, hi = *best_hi;
    int k, ib = *i_best;
    for (k = 0; k < nk; k++) { /* branch-free: which candidate wins is data, not a pattern */
        const float *a = acc[k];
        const float e = (((a[0] + a[4]) + (a[1] + a[5])) + ((a[2] + a[6]) + (a[3] + a[7]))) * c->s2[k];
        /* no range left (a constant group): min/max stays */
        const int take = (c->r[k] != 0.0f) & (((side | k) == 0) | (e < err));
        err = take ? e : err;
        lo = take ? c->lo[k] : lo;
        hi = take ? c->hi[k] : hi;
        ib = take && !side ? k : ib;
    }
    *best_err = err;
    *best_lo = lo;
    *best_hi = hi;
    *i_best = ib;
}

/* The search over every group of a row x[0..D) (groups of G channels, the last one shorter when G
   does not divide D), unweighted: values, keys per token; lo[g], hi[g] each group's min and max.
   KVQ__SEARCH_BATCH groups go through each phase side by side: one group's search is a long
   chain of dependent steps, and the core overlaps several (Zen 4, AVX-512, 16-bit params, groups
   of 32: 1,510 cycles for 4 against 526 for one alone). */
#define KVQ__SEARCH_BATCH 4
static KVQ__INLINE void kvq__search_row_with(const float *x, int D, int G, int bits, int pbits, int steps,
                                             const float *lo, const float *hi, kvq__qparams *best,
                                             kvq__search_cands_fn cands, kvq__search_sums_fn sums) {
    enum { B = KVQ__SEARCH_BATCH };
    const float top = (float)((1 << bits) - 1);
    const double step = kvq__search_step(bits, steps);
    const int ng = (D + G - 1) / G;
    kvq__cands c[B];
    float acc[B][9][8], best_err[B], best_lo[B], best_hi[B]; /* acc: one row spare for pairs */
    int i_best[B], g0, b, nb, side;
    for (g0 = 0; g0 < ng; g0 += B) {
        nb = ng - g0 < B ? ng - g0 : B;
        for (b = 0; b < nb; b++) {
            best_err[b] = 0.0f;
            best_lo[b] = lo[g0 + b];
            best_hi[b] = hi[g0 + b];
            i_best[b] = 0;
        }
        for (side = 0; side < 2; side++) { /* the bottom from the full range, then the top */
            const int nk = side ? steps - 1 : steps;
            for (b = 0; b < nb; b++) cands(lo[g0 + b], hi[g0 + b], bits, pbits, step, steps, side, i_best[b], &c[b]);
            for (b = 0; b < nb; b++) {
                sums(x + (g0 + b) * G, kvq__group_n(D, G, g0 + b), &c[b], nk, top, acc[b]);
            }
            for (b = 0; b < nb; b++)
                kvq__search_pick(&c[b], acc[b], nk, side, &best_err[b], &best_lo[b], &best_hi[b], &i_best[b]);
        }
        for (b = 0; b < nb; b++) best[g0 + b] = kvq__fit(best_lo[b], best_hi[b], bits, pbits);
    }
}

/* The search over the channels of a key block, KVQ__COLS at once (a constant trip count, so
   compilers vectorize it): xb[t * KVQ__COLS + ch] for G tokens, token t weighted by w[t] in
   0..31 (0: left out); lo, hi: each channel's range over the tokens kept. */
#define KVQ__COLS 32
static KVQ__INLINE void kvq__search_columns_body(const float *xb, int G, const uint8_t *w, int bits, int steps,
                                                 const float *lo, const float *hi, kvq__qparams *best) {
    const float top = (float)((1 << bits) - 1);
    const double step = kvq__search_step(bits, steps);
    kvq__cand c[KVQ__COLS];
    float m[KVQ__COLS], r[KVQ__COLS], acc[KVQ__COLS], best_err[KVQ__COLS], win_lo[KVQ__COLS], win_hi[KVQ__COLS];
    int i_best[KVQ__COLS], i[KVQ__COLS], j, k, t, ch;
    for (ch = 0; ch < KVQ__COLS; ch++) { /* candidate (0, 0), min/max, wins unless beaten */
        i_best[ch] = 0;
        best_err[ch] = 0.0f;
        win_lo[ch] = lo[ch];
        win_hi[ch] = hi[ch];
    }
    for (k = 0; k < 2 * steps - 1; k++) {
        for (ch = 0; ch < KVQ__COLS; ch++) {
            kvq__search_ij(k, steps, i_best[ch], &i[ch], &j);
            c[ch] = kvq__search_candidate(lo[ch], hi[ch], bits, 32, step, i[ch], j);
            m[ch] = c[ch].m;
            r[ch] = c[ch].r;
            acc[ch] = 0.0f;
        }
        for (t = 0; t < G; t++) {
            const float *xt = xb + (size_t)t * KVQ__COLS, wt = (float)w[t];
            if (w[t])
                for (ch = 0; ch < KVQ__COLS; ch++) acc[ch] += wt * kvq__search_term(xt[ch], m[ch], r[ch], top);
        }
        for (ch = 0; ch < KVQ__COLS; ch++) {
            float e = acc[ch] * c[ch].s2;
            if (k == 0 || (r[ch] != 0.0f && e < best_err[ch])) {
                best_err[ch] = e;
                win_lo[ch] = c[ch].lo;
                win_hi[ch] = c[ch].hi;
                i_best[ch] = i[ch];
            }
        }
    }
    for (ch = 0; ch < KVQ__COLS; ch++) best[ch] = kvq__fit_range(win_lo[ch], win_hi[ch], bits);
}

/* The C search; the AVX2 copy ("ISA kernels") only lets a baseline build (runtime dispatch)
   run it on wide vectors, and AVX-512 has its own lanes of the same operations. */
static void kvq__search_row_scalar(const float *x, int D, int G, int bits, int pbits, int steps, const float *lo,
                                  const float *hi, kvq__qparams *best) {
    kvq__search_row_with(x, D, G, bits, pbits, steps, lo, hi, best, kvq__search_cands, kvq__search_sums);
}
static void kvq__search_columns_scalar(const float *xb, int G, const uint8_t *w, int bits, int steps, const float *lo,
                                       const float *hi, kvq__qparams *best) {
    kvq__search_columns_body(xb, G, w, bits, steps, lo, hi, best);
}

/* The params of a row's groups from their ranges lo[g], hi[g]: the range search (grid > 1) or
   min/max. */
static void kvq__row_params(const float *x, int D, int G, int bits, int pbits, int grid, const float *lo,
                            const float *hi, kvq__qparams *qp) {
    int g;
    if (grid > 1) kvq__dispatch_search_row(x, D, G, bits, pbits, grid, lo, hi, qp);
    else
        for (g = 0; g < (D + G - 1) / G; g++) qp[g] = kvq__fit(lo[g], hi[g], bits, pbits);
}

/* A group's min and max over x[i * stride], i < n; the first of equal values is kept (the sign of
   a zero). */
static void kvq__group_range(const float *x, int n, int stride, float *lo, float *hi) {
    int i;
    *lo = *hi = x[0];
    for (i = 1; i < n; i++) {
        float v = x[(size_t)i * stride];
        *lo = v < *lo ? v : *lo;
        *hi = v > *hi ? v : *hi;
    }
}

/* ORs the codes of x[i * stride] on params qp into codes first_code + i of a packed row of row_n
   codes (zeroed first by the caller). */
static void kvq__group_codes(const float *x, int n, int stride, int bits, int pbits, kvq__qparams qp, uint8_t *codes,
                             int row_n, int first_code) {
    float m, s;
    int i;
    kvq__params_f32(qp, pbits, &m, &s);
    for (i = 0; i < n; i++)
        kvq__put_code(codes, row_n, first_code + i, bits, kvq__quantize_one(x[(size_t)i * stride], m, s, bits));
}

/* Quantizes n values x[i*stride] on their min/max range (see kvq__group_codes). */
static kvq__qparams kvq__quantize_group(const float *x, int n, int stride, int bits, int pbits, uint8_t *codes,
                                        int row_n, int first_code) {
    float lo, hi;
    kvq__qparams qp;
    kvq__group_range(x, n, stride, &lo, &hi);
    qp = kvq__fit(lo, hi, bits, pbits);
    kvq__group_codes(x, n, stride, bits, pbits, qp, codes, row_n, first_code);
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
    signed char paley[28 * 28]; /* H_m's entries, when one Kronecker piece has m > 1 */
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
            int a, b;
            r->n_pieces = 1;
            r->pow2[0] = n / ms[k];
            r->m[0] = ms[k];
            for (a = 0; a < ms[k]; a++) /* once, not per element of every rotation */
                for (b = 0; b < ms[k]; b++) r->paley[a * ms[k] + b] = (signed char)kvq__paley(ms[k], a, b);
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

/* One level of butterflies on contiguous x[0..n): (a, b) <- (a + b, a - b) for the pairs
   len apart. Each ISA has it (section "ISA kernels"); the sums are the same on every path. */
static void kvq__butterflies_scalar(float *x, int n, int len) {
    int i, j;
    for (i = 0; i < n; i += 2 * len)
        for (j = i; j < i + len; j++) {
            float a = x[j], b = x[j + len];
            x[j] = a + b;
            x[j + len] = a - b;
        }
}

/* In-place unnormalized Walsh-Hadamard transform of x[i * stride], i < n (a power of two). */
static void kvq__wht(float *x, int n, int stride) {
    int len, i, j;
    if (stride == 1) { /* contiguous: the wide levels run on the ISA's vectors */
        for (len = 1; len < n; len *= 2) {
            if (len >= 8) kvq__dispatch_butterflies(x, n, len);
            else kvq__butterflies_scalar(x, n, len);
        }
        return;
    }
    for (len = 1; len < n; len *= 2)
        for (i = 0; i < n; i += 2 * len)
            for (j = i; j < i + len; j++) {
                float a = x[(size_t)j * stride], b = x[(size_t)(j + len) * stride];
                x[(size_t)j * stride] = a + b;
                x[(size_t)(j + len) * stride] = a - b;
            }
}

/* x (viewed as [pow2][m]) <- H_m (or H_m^T) applied to each row of m; h: H_m's m x m entries. */
static void kvq__paley_rows(float *x, int pow2, int m, const signed char *h, int transpose) {
    float y[28];
    int r, i, j;
    for (r = 0; r < pow2; r++) {
        float *row = x + (size_t)r * m;
        for (i = 0; i < m; i++) {
            float acc = 0.0f;
            for (j = 0; j < m; j++) acc += (float)(transpose ? h[j * m + i] : h[i * m + j]) * row[j];
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
        if (m > 1) kvq__paley_rows(xp, r->pow2[p], m, r->paley, inverse);
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
   Rollback history: a row that leaves the window stays in its ring, unchanged, for
   rollback_tokens more appends (the rings are that much longer), so undoing those
   appends only uncounts records (see "Truncate and copy").
   --------------------------------------------------------------------------- */

struct kvq_cache {
    kvq_config cfg;
    void *owned;       /* the allocation from kvq_cache_create, or NULL */
    size_t span;       /* bytes from the struct's start to the end of its arrays (aliasing checks) */
    int n_tokens;
    int kb;            /* tokens per key block (kvq__kb) */
    int n_kblocks;     /* quantized key blocks per head (keys per channel) */
    int n_ktok;        /* quantized keys per head (keys per token: stored like values) */
    int n_vquant;      /* quantized values per head */
    int max_kblocks, max_vquant, kcap, vcap, n_sinks_cap;
    size_t kblock_bytes, vparam_bytes, vcode_bytes;
    uint16_t *sink_k, *sink_v; /* [H][S][D] */
    uint8_t *kblocks;          /* [H][max_kblocks][kblock_bytes] */
    uint16_t *vparams;         /* [H][max_vquant][vparam_bytes/2] */
    uint8_t *vcodes;           /* [H][max_vquant][vcode_bytes] */
    uint16_t *ktparams;        /* keys per token: [H][max_vquant][ktparam_bytes/2] */
    uint8_t *ktcodes;          /* keys per token: [H][max_vquant][ktcode_bytes] */
    size_t ktparam_bytes, ktcode_bytes;
    uint16_t *ring_k;          /* [H][kcap][D] */
    uint16_t *ring_v;          /* [H][vcap][D] */
    int n_salient;             /* salient tokens per key block; 0 = off */
    size_t side_bytes;         /* one side-store entry */
    uint8_t *side;             /* [H][max_kblocks][n_salient] entries */
    float *sal_score;          /* [H][kcap] attention received by waiting keys */
    uint32_t *sal_seen;        /* [H][kcap] queries that saw them */
    float *sal_ring;           /* [KVQ__HEAD_CHUNK][kcap] scratch: raw scores of waiting keys */
    int n_hist;                /* newest appends a truncate undoes exactly (<= rollback_tokens) */
    float *snap_score;         /* [rollback_tokens][H][kcap] sal_score before append t, at t % rollback_tokens; */
    uint32_t *snap_seen;       /* the same of sal_seen; both NULL unless the cache records attention */
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
    case KVQ_ERR_BUFFER: return "caller's buffer too small";
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
    c.key_bits = 3; /* K3V2, 3.0 bits: README, "Why the default is K3V2" */
    c.value_bits = 2;
    c.group_size = 32;
    c.residual_tokens = 128;
    c.sink_tokens = max_tokens < 4 ? (max_tokens > 0 ? max_tokens : 0) : 4; /* measured: README, "Sinks" */
    c.rotation = KVQ_ROTATE_NONE;
    c.seed = 0x6b7671u; /* "kvq" */
    c.salient_ratio = 0.0f;
    c.salient_bits = 8;
    c.salient_policy = KVQ_SALIENT_ATTENTION;
    c.key_axis = KVQ_KEYS_PER_CHANNEL;
    c.range_search = 4; /* measured: README, "Range search" */
    c.key_block = 64;
    c.value_param_bits = 16;
    c.rollback_tokens = 16; /* drafts of 4-16 tokens; 15 value rows a head: README, "Integrating into a runtime" */
    return c;
}

/* 16, 32, 64 or 128: a group or block size (x the bits, a whole number of bytes). */
static kvq_status kvq__check_group(int g) {
    if (g == 16 || g == 32 || g == 64 || g == 128) return KVQ_OK;
    return g > 0 && g <= 4096 ? KVQ_ERR_UNSUPPORTED : KVQ_ERR_INVALID;
}

static kvq_status kvq__check_bits(int bits) {
    if (kvq__fmt(bits)->bits == bits) return KVQ_OK; /* a format of its own */
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
    if ((st = kvq__check_group(cfg->group_size)) != KVQ_OK) return st;
    if (cfg->key_block && (st = kvq__check_group(cfg->key_block)) != KVQ_OK) return st;
    if (cfg->value_param_bits && cfg->value_param_bits != 32 && cfg->value_param_bits != 16) return KVQ_ERR_INVALID;
    if (cfg->residual_tokens < 0 || cfg->residual_tokens > KVQ__MAX_TOKENS || cfg->residual_tokens % kvq__kb(cfg))
        return KVQ_ERR_INVALID;
    if (cfg->sink_tokens < 0 || cfg->sink_tokens > cfg->max_tokens) return KVQ_ERR_INVALID;
    if (cfg->salient_bits != 8 && cfg->salient_bits != 16) return KVQ_ERR_INVALID;
    if (cfg->salient_policy != KVQ_SALIENT_ATTENTION && cfg->salient_policy != KVQ_SALIENT_ERROR)
        return KVQ_ERR_INVALID;
    if (cfg->key_axis != KVQ_KEYS_PER_CHANNEL && cfg->key_axis != KVQ_KEYS_PER_TOKEN) return KVQ_ERR_INVALID;
    if (cfg->range_search < 0 || cfg->range_search > 8) return KVQ_ERR_INVALID;
    if (cfg->key_axis == KVQ_KEYS_PER_TOKEN && cfg->salient_ratio > 0.0f) return KVQ_ERR_UNSUPPORTED;
    if (!(cfg->salient_ratio >= 0.0f && cfg->salient_ratio < 1.0f)) return KVQ_ERR_INVALID;
    if (cfg->rotation < KVQ_ROTATE_NONE || cfg->rotation > KVQ_ROTATE_PREROTATED) return KVQ_ERR_INVALID;
    if (cfg->rollback_tokens < 0 || cfg->rollback_tokens > KVQ__MAX_ROLLBACK) return KVQ_ERR_INVALID;
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

/* The arrays of a cache, in memory order. The first KVQ__A_DEVICE are what a cache holds (the
   CUDA twin allocates those, with these sizes); the rest are host scratch and the rollback
   history's salience snapshots. */
enum { KVQ__A_SINK_K, KVQ__A_SINK_V, KVQ__A_KBLOCKS, KVQ__A_VPARAMS, KVQ__A_VCODES, KVQ__A_RING_K, KVQ__A_RING_V,
       KVQ__A_SIDE, KVQ__A_SCORE, KVQ__A_SEEN, KVQ__A_KTPARAMS, KVQ__A_KTCODES, KVQ__A_DEVICE,
       KVQ__A_RING_SCORES = KVQ__A_DEVICE, KVQ__A_SNAP_SCORE, KVQ__A_SNAP_SEEN, KVQ__A_COUNT };

/* The layout plan: the capacities, then each array's count of elements, element size,
   offset from the struct's start and bytes. Everything that sizes or places an array reads
   it (init, kvq_cache_bytes, the CUDA twin). */
typedef struct kvq__layout {
    int max_kblocks, max_vquant, kcap, vcap;
    size_t count[KVQ__A_COUNT], elem[KVQ__A_COUNT], off[KVQ__A_COUNT], bytes[KVQ__A_COUNT];
    size_t total;
} kvq__layout;


/* Places one array of count*elem bytes at the aligned end of the layout so far. */
static size_t kvq__place(size_t *end, size_t count, size_t elem, int *ok) {
    size_t at = kvq__align_up(*end, ok);
    *end = kvq__add(at, kvq__mul(count, elem, ok), ok);
    return at;
}

static int kvq__plan(const kvq_config *cfg, kvq__layout *L) {
    int ok = 1;
    size_t H = (size_t)cfg->n_kv_heads, D = (size_t)cfg->head_dim, end, snaps;
    int after_sinks = cfg->max_tokens - cfg->sink_tokens;
    int G = kvq__kb(cfg), R = cfg->residual_tokens, RB = cfg->rollback_tokens, kwait;
    const int tracks = kvq__records_attention(cfg);
    KVQ_ASSERT(G > 0 && after_sinks >= 0); /* kvq_config_check passed */
    memset(L, 0, sizeof *L);
    L->max_kblocks = after_sinks / G;
    L->max_vquant = after_sinks > R ? after_sinks - R : 0;
    /* Ring capacities: keys wait at most max(R, G - 1), values at most R, and one row more
       arrives before a block or value leaves. With a rollback history the rings also keep
       the rows of the newest RB appends, back to a state whose waiting rows precede them:
       RB rows over the waiting ones, which covers the arriving one. A multiple-of-G key ring
       keeps each block contiguous (so RB <= G costs no key row at R >= G). Never more than
       the tokens that can come. */
    RB = RB > 1 ? RB : 1;
    kwait = (R > G - 1 ? R : G - 1) + RB;
    kwait = (kwait + G - 1) / G * G;
    L->kcap = kwait < after_sinks ? kwait : (after_sinks > 0 ? after_sinks : 1);
    L->vcap = R + RB < after_sinks ? R + RB : (after_sinks > 0 ? after_sinks : 1);
    if (kvq__salient_count(cfg)) { /* values leave with their key block, to join its side store */
        L->max_vquant = L->max_kblocks * G;
        L->vcap = L->kcap;
    }
    if (cfg->key_axis == KVQ_KEYS_PER_TOKEN) { /* keys leave one at a time, with their values */
        L->max_kblocks = 0;
        L->kcap = L->vcap;
    }
    {
        const size_t S = (size_t)cfg->sink_tokens, ns = (size_t)kvq__salient_count(cfg);
        const int per_token = cfg->key_axis == KVQ_KEYS_PER_TOKEN;
        size_t *n = L->count, *e = L->elem;
        int a;
        n[KVQ__A_SINK_K] = n[KVQ__A_SINK_V] = kvq__mul(H, S * D, &ok);
        e[KVQ__A_SINK_K] = e[KVQ__A_SINK_V] = 2;
        n[KVQ__A_KBLOCKS] = kvq__mul(H, (size_t)L->max_kblocks, &ok);
        e[KVQ__A_KBLOCKS] = kvq__key_block_bytes(cfg);
        n[KVQ__A_VPARAMS] = kvq__mul(H, (size_t)L->max_vquant, &ok);
        e[KVQ__A_VPARAMS] = kvq__value_param_bytes(cfg);
        n[KVQ__A_VCODES] = n[KVQ__A_VPARAMS];
        e[KVQ__A_VCODES] = kvq__value_code_bytes(cfg);
        n[KVQ__A_RING_K] = kvq__mul(H, (size_t)L->kcap, &ok);
        e[KVQ__A_RING_K] = 2 * D;
        n[KVQ__A_RING_V] = kvq__mul(H, (size_t)L->vcap, &ok);
        e[KVQ__A_RING_V] = 2 * D;
        n[KVQ__A_SIDE] = kvq__mul(H, (size_t)L->max_kblocks * ns, &ok);
        e[KVQ__A_SIDE] = ns ? kvq__side_entry_bytes(cfg) : 0;
        n[KVQ__A_SCORE] = n[KVQ__A_SEEN] = kvq__mul(H, ns ? (size_t)L->kcap : 0, &ok); /* received, queries */
        e[KVQ__A_SCORE] = e[KVQ__A_SEEN] = 4;
        n[KVQ__A_KTPARAMS] = n[KVQ__A_KTCODES] = kvq__mul(H, per_token ? (size_t)L->max_vquant : 0, &ok);
        e[KVQ__A_KTPARAMS] = kvq__token_param_bytes(cfg, cfg->key_bits);
        e[KVQ__A_KTCODES] = kvq__token_code_bytes(cfg, cfg->key_bits);
        n[KVQ__A_RING_SCORES] = ns ? (size_t)L->kcap : 0;
        e[KVQ__A_RING_SCORES] = 4 * KVQ__HEAD_CHUNK; /* scratch */
        /* salience snapshots, one per append of the history (caches that record attention) */
        snaps = H * (size_t)(tracks ? cfg->rollback_tokens : 0); /* <= 2^24 */
        n[KVQ__A_SNAP_SCORE] = n[KVQ__A_SNAP_SEEN] = kvq__mul(snaps, (size_t)L->kcap, &ok);
        e[KVQ__A_SNAP_SCORE] = e[KVQ__A_SNAP_SEEN] = 4;
        end = sizeof(kvq_cache);
        for (a = 0; a < KVQ__A_COUNT; a++) {
            L->off[a] = kvq__place(&end, n[a], e[a], &ok);
            L->bytes[a] = kvq__mul(n[a], e[a], &ok);
        }
    }
    L->total = kvq__add(end, KVQ__ALIGN, &ok); /* slack to align the caller's pointer */
    return ok;
}

/* Whether byte ranges [a, a+na) and [b, b+nb) overlap (addresses compared as integers). */
static int kvq__overlap(const void *a, size_t na, const void *b, size_t nb) {
    uintptr_t x = (uintptr_t)a, y = (uintptr_t)b;
    return na && nb && x < y + nb && y < x + na;
}

/* Whether [p, p+n) overlaps the memory of cache c: the struct and the arrays after it. */
static int kvq__overlaps_cache(const kvq_cache *c, const void *p, size_t n) {
    return kvq__overlap(c, c->span, p, n);
}

/* The record sizes of a cache of cfg (init and the image probe share them). */
static void kvq__record_sizes(kvq_cache *c, const kvq_config *cfg) {
    c->kb = kvq__kb(cfg);
    c->kblock_bytes = kvq__key_block_bytes(cfg);
    c->vparam_bytes = kvq__value_param_bytes(cfg);
    c->vcode_bytes = kvq__value_code_bytes(cfg);
    c->ktparam_bytes = kvq__token_param_bytes(cfg, cfg->key_bits);
    c->ktcode_bytes = kvq__token_code_bytes(cfg, cfg->key_bits);
    c->n_salient = kvq__salient_count(cfg);
    c->side_bytes = kvq__side_entry_bytes(cfg);
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
    if (mem_bytes < L.total) return KVQ_ERR_BUFFER;
    base = (uint8_t *)mem + ((KVQ__ALIGN - ((uintptr_t)mem & (KVQ__ALIGN - 1))) & (KVQ__ALIGN - 1));
    c = (kvq_cache *)(void *)base;
    memset(c, 0, sizeof *c);
    c->cfg = *cfg;
    c->span = L.total - KVQ__ALIGN; /* total = the arrays' end + alignment slack */
    c->max_kblocks = L.max_kblocks;
    c->max_vquant = L.max_vquant;
    c->kcap = L.kcap;
    c->vcap = L.vcap;
    kvq__record_sizes(c, cfg);
    c->sink_k = (uint16_t *)(void *)(base + L.off[KVQ__A_SINK_K]);
    c->sink_v = (uint16_t *)(void *)(base + L.off[KVQ__A_SINK_V]);
    c->kblocks = base + L.off[KVQ__A_KBLOCKS];
    c->vparams = (uint16_t *)(void *)(base + L.off[KVQ__A_VPARAMS]);
    c->vcodes = base + L.off[KVQ__A_VCODES];
    c->ring_k = (uint16_t *)(void *)(base + L.off[KVQ__A_RING_K]);
    c->ring_v = (uint16_t *)(void *)(base + L.off[KVQ__A_RING_V]);
    c->side = base + L.off[KVQ__A_SIDE];
    c->sal_score = (float *)(void *)(base + L.off[KVQ__A_SCORE]);
    c->sal_seen = (uint32_t *)(void *)(base + L.off[KVQ__A_SEEN]);
    c->sal_ring = (float *)(void *)(base + L.off[KVQ__A_RING_SCORES]);
    c->ktparams = (uint16_t *)(void *)(base + L.off[KVQ__A_KTPARAMS]);
    c->ktcodes = base + L.off[KVQ__A_KTCODES];
    if (L.bytes[KVQ__A_SNAP_SCORE]) {
        c->snap_score = (float *)(void *)(base + L.off[KVQ__A_SNAP_SCORE]);
        c->snap_seen = (uint32_t *)(void *)(base + L.off[KVQ__A_SNAP_SEEN]);
    }
    kvq__rotation_init(&c->rot, cfg->head_dim, cfg->seed);
    *out = c;
    return KVQ_OK;
}

/* Transparent huge pages for the whole 2 MiB pages inside [mem, mem+n), asked before they are
   first touched (KVQ__HUGEPAGES: Linux, malloc'd memory). Attention streams each KV head's key
   blocks, value codes and params; with 4 KiB pages a 64K-token cache (51 MB at 2 bits) missed
   the TLB enough to cost 10-15% of attention here (Zen 4). Advice only: an error changes nothing. */
static void kvq__advise_huge(void *mem, size_t n) {
#if KVQ__HUGEPAGES
    const uintptr_t huge = (uintptr_t)1 << 21, lo = ((uintptr_t)mem + huge - 1) & ~(huge - 1);
    const uintptr_t hi = ((uintptr_t)mem + n) & ~(huge - 1);
    if (hi > lo) (void)madvise((void *)lo, (size_t)(hi - lo), MADV_HUGEPAGE);
#else
    (void)mem;
    (void)n;
#endif
}

KVQ_API kvq_status kvq_cache_create(kvq_cache **out, const kvq_config *cfg) {
    size_t n;
    void *mem;
    kvq_status st;
    if (!out) return KVQ_ERR_INVALID;
    if ((st = kvq_config_check(cfg)) != KVQ_OK) return st;
    if ((n = kvq_cache_bytes(cfg)) == 0) return KVQ_ERR_NOMEM;
    if (!(mem = KVQ_MALLOC(n))) return KVQ_ERR_NOMEM;
    kvq__advise_huge(mem, n);
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
    c->n_tokens = c->n_kblocks = c->n_ktok = c->n_vquant = c->n_hist = 0;
}

KVQ_API int kvq_cache_tokens(const kvq_cache *c) { return c ? c->n_tokens : 0; }

KVQ_API const kvq_config *kvq_cache_config(const kvq_cache *c) { return c ? &c->cfg : NULL; }

/* Tokens past the sinks, and how many of them sit in the key and value rings. */
static int kvq__after_sinks(const kvq_cache *c) {
    return c->n_tokens > c->cfg.sink_tokens ? c->n_tokens - c->cfg.sink_tokens : 0;
}

static int kvq__per_token_keys(const kvq_cache *c) { return c->cfg.key_axis == KVQ_KEYS_PER_TOKEN; }
/* Keys past the sinks that have left the ring: whole blocks, or single tokens. */
static int kvq__keys_quantized(const kvq_cache *c) {
    return kvq__per_token_keys(c) ? c->n_ktok : c->n_kblocks * c->kb;
}

KVQ_API size_t kvq_cache_payload_bytes(const kvq_cache *c) {
    size_t H, D, row, sinks, kq, kres, vq, vres, side;
    int after;
    if (!c) return 0;
    H = (size_t)c->cfg.n_kv_heads;
    D = (size_t)c->cfg.head_dim;
    row = 2 * D; /* one fp16 row */
    after = kvq__after_sinks(c);
    sinks = (size_t)(c->n_tokens - after) * row * 2;
    kq = (size_t)c->n_kblocks * c->kblock_bytes + (size_t)c->n_ktok * (c->ktparam_bytes + c->ktcode_bytes);
    kres = (size_t)(after - kvq__keys_quantized(c)) * row;
    vq = (size_t)c->n_vquant * (c->vparam_bytes + c->vcode_bytes);
    vres = (size_t)(after - c->n_vquant) * row;
    side = (size_t)c->n_kblocks * c->n_salient * c->side_bytes;
    return H * (sinks + kq + kres + vq + vres + side);
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
/* Keys per token (key_axis) are stored like values, in their own arrays. */
static uint16_t *kvq__key_token_params(const kvq_cache *c, int h, int j) {
    return c->ktparams + ((size_t)h * c->max_vquant + (size_t)j) * (c->ktparam_bytes / 2);
}
static uint8_t *kvq__key_token_codes(const kvq_cache *c, int h, int j) {
    return c->ktcodes + ((size_t)h * c->max_vquant + (size_t)j) * c->ktcode_bytes;
}
/* Ring rows are addressed by position past the sinks, modulo the ring size. */
static uint16_t *kvq__ring_k_row(const kvq_cache *c, int h, int pos) {
    return c->ring_k + ((size_t)h * c->kcap + (size_t)(pos % c->kcap)) * c->cfg.head_dim;
}
static uint16_t *kvq__ring_v_row(const kvq_cache *c, int h, int pos) {
    return c->ring_v + ((size_t)h * c->vcap + (size_t)(pos % c->vcap)) * c->cfg.head_dim;
}

/* The scalar conversion and quantize kernels (the reference; the other ISAs' are in
   "ISA kernels", chosen in "Dispatch"). */
static void kvq__to_f16_scalar(uint16_t *dst, const float *src, int n) {
    int i;
    for (i = 0; i < n; i++) dst[i] = kvq__f32_to_f16(src[i]);
}
static void kvq__to_f32_scalar(float *dst, const uint16_t *src, int n) {
    int i;
    for (i = 0; i < n; i++) dst[i] = kvq__f16_to_f32(src[i]);
}

/* Key block kernels: per channel, fp16 scale[D], min[D] (from min/max, or kept as the caller
   set them: keep_params, the range search's), then the codes of the G tokens. */
static void kvq__quantize_keys_scalar(const uint16_t *rows, int D, int G, int bits, uint8_t *blk, int keep_params) {
    uint16_t *scale = (uint16_t *)(void *)blk, *mins = scale + D;
    uint8_t *codes = kvq__block_codes_rw(blk, D);
    size_t row_bytes = kvq__row_bytes(kvq__fmt(bits), (size_t)G);
    float x[128];
    int ch, t;
    memset(codes, 0, row_bytes * D);
    for (ch = 0; ch < D; ch++) {
        kvq__qparams qp;
        for (t = 0; t < G; t++) x[t] = kvq__f16_to_f32(rows[(size_t)t * D + ch]);
        if (keep_params) {
            const float m = kvq__f16_to_f32(mins[ch]), s = kvq__f16_to_f32(scale[ch]);
            for (t = 0; t < G; t++)
                kvq__put_code(codes + row_bytes * ch, G, t, bits, kvq__quantize_one(x[t], m, s, bits));
            continue;
        }
        qp = kvq__quantize_group(x, G, 1, bits, 32, codes + row_bytes * ch, G, 0);
        scale[ch] = qp.scale;
        mins[ch] = qp.min;
    }
}

static void kvq__f32_row(float *dst, const uint16_t *src, int n); /* the ISA's conversion, in "Cache" below */

/* One per-token record (a value, or a key per token): fp16 scale[ng], min[ng], codes. */
static void kvq__quantize_record(const uint16_t *row, int D, int G, int bits, int pbits, int grid, uint16_t *par,
                                 uint8_t *codes) {
    int ng = (D + G - 1) / G, g;
    float x[512], lo[64], hi[64];
    kvq__qparams qp[64];
    if (grid > 1) kvq__f32_row(x, row, D); /* the ISA's conversion (exact on every path) */
    else kvq__to_f32_scalar(x, row, D);
    memset(codes, 0, kvq__row_bytes(kvq__fmt(bits), (size_t)D));
    for (g = 0; g < ng; g++) kvq__group_range(x + g * G, kvq__group_n(D, G, g), 1, &lo[g], &hi[g]);
    kvq__row_params(x, D, G, bits, pbits, grid, lo, hi, qp);
    for (g = 0; g < ng; g++) {
        kvq__put_params(par, ng, g, qp[g], pbits);
        kvq__group_codes(x + g * G, kvq__group_n(D, G, g), 1, bits, pbits, qp[g], codes, D, g * G);
    }
}
static void kvq__quantize_value_scalar(const uint16_t *row, int D, int G, int bits, int pbits, int grid,
                                       uint16_t *par, uint8_t *codes) {
    kvq__quantize_record(row, D, G, bits, pbits, grid, par, codes);
}


static void kvq__f16_row(uint16_t *dst, const float *src, int n) { kvq__dispatch_to_f16(dst, src, n); }
static void kvq__f32_row(float *dst, const uint16_t *src, int n) { kvq__dispatch_to_f32(dst, src, n); }

/* Dequantizes one per-token record: fp16 scale[ng], min[ng], then D codes (values, keys per
   token, salient side-store entries); at 16 bits the codes are the fp16 row itself. */
static void kvq__read_token_record(const kvq_cache *c, const uint16_t *par, int pbits, const uint8_t *codes, int bits,
                                   float *x) {
    const int D = c->cfg.head_dim, G = c->cfg.group_size, ng = kvq__value_groups(&c->cfg);
    int g, ch;
    if (!kvq__fmt(bits)->quantized) { kvq__f32_row(x, (const uint16_t *)(const void *)codes, D); return; }
    for (g = 0; g < ng; g++) {
        float sc, m;
        kvq__params_f32(kvq__get_params(par, ng, g, pbits), pbits, &m, &sc);
        int c1 = (g + 1) * G < D ? (g + 1) * G : D;
        for (ch = g * G; ch < c1; ch++) x[ch] = m + sc * (float)kvq__get_code(codes, D, ch, bits);
    }
}

/* a . b over n floats, n a multiple of 8, in eight lanes (vectorizable, order fixed). */
static float kvq__dot8(const float *a, const float *b, int n) {
    float d8[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    int i, l;
    for (i = 0; i < n; i += 8)
        for (l = 0; l < 8; l++) d8[l] += a[i + l] * b[i + l];
    return ((d8[0] + d8[4]) + (d8[1] + d8[5])) + ((d8[2] + d8[6]) + (d8[3] + d8[7]));
}

/* ---------------------------------------------------------------------------
   Salient side store (MiKV, ZipCache). When a key block leaves the window, its
   n_salient most important tokens move to a side store at salient_bits and are
   left out of the block's per-channel min/max (their codes are ignored), so one
   huge token no longer stretches the grid of the others. Importance: the
   attention a token received while waiting, divided by the queries that saw it
   (ZipCache's normalized score, fair to young tokens); or, with no attention
   seen (prefill) or KVQ_SALIENT_ERROR, how much leaving the token out shrinks
   the block's per-channel ranges. Entries: see kvq__side_entry_bytes.
   --------------------------------------------------------------------------- */
static uint8_t *kvq__side_entry(const kvq_cache *c, int h, int b, int j) {
    return c->side + (((size_t)h * c->max_kblocks + (size_t)b) * c->n_salient + (size_t)j) * c->side_bytes;
}

static int kvq__side_index(const uint8_t *e) { return e[0] | e[1] << 8; }

/* Byte offsets in an entry of the K (which 0) or V (1) part: after the u16 index, K's params,
   V's params, K's codes, V's codes (kvq__side_entry_bytes; at 16 bits the params are empty). */
static size_t kvq__side_params_at(const kvq_cache *c, int which) {
    return 2 + (size_t)which * kvq__token_param_bytes(&c->cfg, c->cfg.salient_bits);
}
static size_t kvq__side_codes_at(const kvq_cache *c, int which) {
    return 2 + 2 * kvq__token_param_bytes(&c->cfg, c->cfg.salient_bits) +
           (size_t)which * kvq__token_code_bytes(&c->cfg, c->cfg.salient_bits);
}

/* Columns [c0, c0+nc) of a block's G fp16 rows as floats, xb[t * KVQ__COLS + i] (SIMD convert:
   a block walks its channels in runs of KVQ__COLS instead of converting one value at a time);
   lanes past nc repeat the last column, so the range search always runs KVQ__COLS lanes. */
static void kvq__block_columns_padded(const uint16_t *rows, int D, int G, int c0, int nc, float *xb) {
    int t, i;
    for (t = 0; t < G; t++) {
        float *xt = xb + (size_t)t * KVQ__COLS;
        kvq__f32_row(xt, rows + (size_t)t * D + c0, nc);
        for (i = nc; i < KVQ__COLS; i++) xt[i] = xt[nc - 1];
    }
}

/* Range-shrink score: per channel, the gap a token opens alone at the top or bottom, over the range. */
static void kvq__range_gain(const kvq_cache *c, const uint16_t *rows, float *gain) {
    const int D = c->cfg.head_dim, G = c->kb;
    float xb[128 * KVQ__COLS];
    int c0, i, t;
    for (t = 0; t < G; t++) gain[t] = 0.0f;
    for (c0 = 0; c0 < D; c0 += KVQ__COLS) {
        const int nc = D - c0 < KVQ__COLS ? D - c0 : KVQ__COLS;
        kvq__block_columns_padded(rows, D, G, c0, nc, xb);
        for (i = 0; i < nc; i++) { /* channel c0 + i */
            float hi = -INFINITY, hi2 = -INFINITY, lo = INFINITY, lo2 = INFINITY;
            int thi = 0, tlo = 0;
            for (t = 0; t < G; t++) {
                float x = xb[(size_t)t * KVQ__COLS + i];
                if (x > hi) { hi2 = hi; hi = x; thi = t; } else if (x > hi2) hi2 = x;
                if (x < lo) { lo2 = lo; lo = x; tlo = t; } else if (x < lo2) lo2 = x;
            }
            if (hi > lo) {
                gain[thi] += (hi - hi2) / (hi - lo);
                gain[tlo] += (lo2 - lo) / (hi - lo);
            }
        }
    }
}

/* Picks the n_salient tokens of block b of head h (indices into the block, ascending) and marks them. */
static void kvq__select_salient(const kvq_cache *c, int h, int b, int *picked, uint8_t *mask) {
    const int G = c->kb, n = c->n_salient;
    float score[128];
    int t, j, seen_any = 0;
    size_t slot0 = (size_t)h * c->kcap + (size_t)((b * G) % c->kcap);
    if (c->cfg.salient_policy == KVQ_SALIENT_ATTENTION)
        for (t = 0; t < G; t++) {
            uint32_t seen = c->sal_seen[slot0 + t];
            score[t] = seen ? c->sal_score[slot0 + t] / (float)seen : -1.0f;
            seen_any |= seen != 0;
        }
    if (!seen_any) kvq__range_gain(c, kvq__ring_k_row(c, h, b * G), score);
    memset(mask, 0, (size_t)G);
    for (j = 0; j < n; j++) { /* top n, ties to the older token */
        int best = -1;
        for (t = 0; t < G; t++)
            if (!mask[t] && (best < 0 || score[t] > score[best])) best = t;
        mask[best] = 1;
    }
    for (t = 0, j = 0; t < G; t++)
        if (mask[t]) picked[j++] = t;
}

/* Stores fp16 row src (D channels) at salient_bits into the entry's K (which 0) or V (1) part:
   a per-token record with fp16 params (min/max, the scalar quantizer: the same bytes on every path). */
static void kvq__side_put(const kvq_cache *c, uint8_t *e, int which, const uint16_t *src) {
    const int D = c->cfg.head_dim, bits = c->cfg.salient_bits;
    uint8_t *codes = e + kvq__side_codes_at(c, which);
    if (!kvq__fmt(bits)->quantized) memcpy(codes, src, (size_t)D * 2);
    else kvq__quantize_record(src, D, c->cfg.group_size, bits, 32, 1,
                              (uint16_t *)(void *)(e + kvq__side_params_at(c, which)), codes);
}

/* Reconstructs the K (which 0) or V (1) row of a side-store entry, in storage space. */
static void kvq__side_get(const kvq_cache *c, const uint8_t *e, int which, float *x) {
    kvq__read_token_record(c, (const uint16_t *)(const void *)(e + kvq__side_params_at(c, which)), 32,
                           e + kvq__side_codes_at(c, which), c->cfg.salient_bits, x);
}

/* The side-store entry of token tt of block b of head h, or NULL if it is not salient. */
static const uint8_t *kvq__find_salient(const kvq_cache *c, int h, int b, int tt) {
    int j;
    for (j = 0; j < c->n_salient; j++) {
        const uint8_t *e = kvq__side_entry(c, h, b, j);
        if (kvq__side_index(e) == tt) return e;
    }
    return NULL;
}

/* ---------------------------------------------------------------------------
   Leaving the window: a full key block (per channel, its ranges searched, salient
   tokens left out), one value, or one key per token is quantized into its record.
   --------------------------------------------------------------------------- */

/* Range-search weights of block b of head h: in caches that record attention (salient tokens,
   attention policy), a waiting key's normalized score plus 0.1x the block's mean, scaled to
   1..31 (5 bits keep the search's sums exact); 0 where nothing was recorded. */
static int kvq__key_weights(const kvq_cache *c, int h, int b, uint8_t *w) {
    const int G = c->kb;
    const size_t slot0 = (size_t)h * c->kcap + (size_t)((b * G) % c->kcap);
    float s[128], mean = 0.0f, top = 0.0f;
    int t;
    if (!c->n_salient || c->cfg.salient_policy != KVQ_SALIENT_ATTENTION) return 0;
    for (t = 0; t < G; t++) {
        uint32_t seen = c->sal_seen[slot0 + t];
        if (!seen) return 0; /* prefill: no queries yet */
        s[t] = c->sal_score[slot0 + t] / (float)seen;
        mean += s[t];
    }
    mean = 0.1f * mean / (float)G;
    for (t = 0; t < G; t++) top = s[t] + mean > top ? s[t] + mean : top;
    if (!(top > 0.0f)) return 0;
    for (t = 0; t < G; t++) {
        float q = rintf(31.0f * ((s[t] + mean) / top));
        w[t] = (uint8_t)(q < 1.0f ? 1.0f : q);
    }
    return 1;
}

/* The fp16 params of the KVQ__COLS channels of xb over the tokens with w[t] > 0: min/max (the
   scan keeps the first of equal values, as every quantize kernel does), or the search's pick. */
static void kvq__columns_params(const float *xb, int G, const uint8_t *w, int bits, int grid, kvq__qparams *qp) {
    float lo[KVQ__COLS], hi[KVQ__COLS];
    int i, t;
    for (i = 0; i < KVQ__COLS; i++) {
        lo[i] = INFINITY;
        hi[i] = -INFINITY;
    }
    for (t = 0; t < G; t++)
        if (w[t])
            for (i = 0; i < KVQ__COLS; i++) {
                const float x = xb[(size_t)t * KVQ__COLS + i];
                lo[i] = x < lo[i] ? x : lo[i];
                hi[i] = x > hi[i] ? x : hi[i];
            }
    if (grid > 1) kvq__dispatch_search_columns(xb, G, w, bits, grid, lo, hi, qp);
    else
        for (i = 0; i < KVQ__COLS; i++) qp[i] = kvq__fit_range(lo[i], hi[i], bits);
}

/* Key-block params (scale[D] then min[D] at the start of blk) of the G rows, tokens weighted by w. */
static void kvq__key_block_params(const uint16_t *rows, int D, int G, int bits, int grid, const uint8_t *w,
                                  uint8_t *blk, float *xb) {
    uint16_t *scale = (uint16_t *)(void *)blk, *mins = scale + D;
    kvq__qparams qp[KVQ__COLS];
    int c0, i;
    for (c0 = 0; c0 < D; c0 += KVQ__COLS) {
        const int nc = D - c0 < KVQ__COLS ? D - c0 : KVQ__COLS;
        kvq__block_columns_padded(rows, D, G, c0, nc, xb);
        kvq__columns_params(xb, G, w, bits, grid, qp);
        for (i = 0; i < nc; i++) {
            scale[c0 + i] = qp[i].scale;
            mins[c0 + i] = qp[i].min;
        }
    }
}

/* Quantizes key block b of head h per channel, leaving out the masked (salient) tokens: their
   codes stay 0 and they take no part in a channel's range. With a range search, tokens are
   weighted by the attention they received where the cache records it. Scalar on every path
   (salient caches only), so the bytes are the same on all of them. */
static void kvq__quantize_key_block_masked(kvq_cache *c, int h, int b, const uint8_t *mask) {
    const int D = c->cfg.head_dim, G = c->kb, bits = c->cfg.key_bits;
    const int grid = kvq__search_grid(c->cfg.range_search, bits, 1);
    uint8_t *blk = kvq__key_block(c, h, b);
    const uint16_t *rows = kvq__ring_k_row(c, h, b * G);
    uint16_t *scale = (uint16_t *)(void *)blk, *mins = scale + D;
    const kvq__format *f = kvq__fmt(bits);
    uint8_t *codes = kvq__block_codes_rw(blk, D), w[128];
    size_t row_bytes = kvq__row_bytes(f, (size_t)G);
    float xb[128 * KVQ__COLS];
    int c0, i, t, weighted;
    if (!f->quantized) { /* nothing to stretch: the block keeps every token as it is */
        memcpy(blk, rows, (size_t)G * D * 2);
        return;
    }
    weighted = grid > 1 && kvq__key_weights(c, h, b, w);
    for (t = 0; t < G; t++) w[t] = mask[t] ? 0 : weighted ? w[t] : 1;
    memset(codes, 0, row_bytes * D);
    for (c0 = 0; c0 < D; c0 += KVQ__COLS) {
        const int nc = D - c0 < KVQ__COLS ? D - c0 : KVQ__COLS;
        float m[KVQ__COLS], sc[KVQ__COLS];
        kvq__qparams qp[KVQ__COLS];
        kvq__block_columns_padded(rows, D, G, c0, nc, xb);
        kvq__columns_params(xb, G, w, bits, grid, qp);
        for (i = 0; i < nc; i++) {
            scale[c0 + i] = qp[i].scale;
            mins[c0 + i] = qp[i].min;
            m[i] = kvq__f16_to_f32(qp[i].min);
            sc[i] = kvq__f16_to_f32(qp[i].scale);
        }
        for (t = 0; t < G; t++)
            if (!mask[t])
                for (i = 0; i < nc; i++)
                    kvq__put_code(codes + row_bytes * (c0 + i), G, t, bits,
                                  kvq__quantize_one(xb[(size_t)t * KVQ__COLS + i], m[i], sc[i], bits));
    }
}

/* Moves the picked tokens of block b of head h to the side store; mask marks them for quantization. */
static void kvq__store_salient(kvq_cache *c, int h, int b, uint8_t *mask) {
    const int G = c->kb;
    int picked[128], j;
    kvq__select_salient(c, h, b, picked, mask);
    for (j = 0; j < c->n_salient; j++) {
        uint8_t *e = kvq__side_entry(c, h, b, j);
        e[0] = (uint8_t)picked[j];
        e[1] = 0;
        kvq__side_put(c, e, 0, kvq__ring_k_row(c, h, b * G + picked[j]));
        kvq__side_put(c, e, 1, kvq__ring_v_row(c, h, b * G + picked[j]));
    }
}

/* Stores fp16 row (D channels) as a per-token record at bits: the row itself (16 bits), or
   params and codes from the ISA's quantizer. */
static void kvq__put_record(const uint16_t *row, int D, int G, int bits, int pbits, int grid, uint16_t *par,
                            uint8_t *codes) {
    if (!kvq__fmt(bits)->quantized) memcpy(codes, row, (size_t)D * 2);
    else kvq__dispatch_quantize_value(row, D, G, bits, pbits, grid, par, codes);
}

/* Quantizes key j of head h (past the sinks, from its ring row) as a per-token record (keys per token). */
static void kvq__quantize_key_token(kvq_cache *c, int h, int j) {
    const int bits = c->cfg.key_bits;
    kvq__put_record(kvq__ring_k_row(c, h, j), c->cfg.head_dim, c->cfg.group_size, bits, 32,
                    kvq__search_grid(c->cfg.range_search, bits, 1), kvq__key_token_params(c, h, j),
                    kvq__key_token_codes(c, h, j));
}
/* Quantizes the oldest waiting key block of head h (block index b, ring positions b*G..). */
static void kvq__quantize_key_block(kvq_cache *c, int h, int b) {
    const int D = c->cfg.head_dim, G = c->kb, bits = c->cfg.key_bits;
    const int grid = kvq__search_grid(c->cfg.range_search, bits, 1);
    uint8_t *blk = kvq__key_block(c, h, b);
    const uint16_t *rows = kvq__ring_k_row(c, h, b * G); /* G contiguous rows: kcap % G == 0 or no wrap */
    if (!kvq__fmt(bits)->quantized) {
        memcpy(blk, rows, (size_t)G * D * 2);
    } else if (grid > 1) { /* the search sets the params, the ISA's kernel the codes */
        uint8_t all[128];
        float xb[128 * KVQ__COLS];
        memset(all, 1, sizeof all); /* every token, weight 1 */
        kvq__key_block_params(rows, D, G, bits, grid, all, blk, xb);
        kvq__dispatch_quantize_keys(rows, D, G, bits, blk, 1);
    } else {
        kvq__dispatch_quantize_keys(rows, D, G, bits, blk, 0);
    }
}

/* Quantizes the oldest waiting value of head h (value index j) per group of G channels. */
static void kvq__quantize_value(kvq_cache *c, int h, int j) {
    const int bits = c->cfg.value_bits;
    kvq__put_record(kvq__ring_v_row(c, h, j), c->cfg.head_dim, c->cfg.group_size, bits, kvq__vpb(&c->cfg),
                    kvq__search_grid(c->cfg.range_search, bits, 0), kvq__value_params(c, h, j),
                    kvq__value_codes(c, h, j));
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

/* |x| <= 65504 for all x, NaN rejected: on the bits, |x| orders as an integer (NaN above inf).
   Eight running maxima so that compilers vectorize it at -O2 (append's hot path). */
/* A rotated element is at most the row's L2 norm, so rows of norm <= 65504 stay in fp16 range. */
static int kvq__rotates_in_fp16(const float *x, size_t n, int D) {
    size_t r;
    for (r = 0; r < n; r += (size_t)D) {
        double ss = 0.0;
        int i;
        for (i = 0; i < D; i++) ss += (double)x[r + i] * (double)x[r + i];
        if (ss > (double)KVQ__FP16_MAX * (double)KVQ__FP16_MAX) return 0;
    }
    return 1;
}

/* Whether every |x| <= 65504 (NaN fails too): the bits of |x| against those of 65504, in
   blocks of 16 that compilers vectorize at -O2 (the scalar kernel; AVX2 has its own). */
static int kvq__fits_fp16_scalar(const float *x, size_t n) {
    /* 0x477fe000 (the bits of 65504.0f) - |x|'s bits wraps to a set top bit exactly when |x| is
       past it (NaN too); ORed per lane of 16, which compilers vectorize on any SIMD (SSE2 too) */
    uint32_t over[16] = {0}, u[16], any = 0;
    size_t i = 0;
    int j;
    for (; i + 16 <= n; i += 16) {
        memcpy(u, x + i, sizeof u);
        for (j = 0; j < 16; j++) over[j] |= 0x477fe000u - (u[j] & 0x7fffffffu);
    }
    for (; i < n; i++) {
        memcpy(u, x + i, 4);
        any |= 0x477fe000u - (u[0] & 0x7fffffffu);
    }
    for (j = 0; j < 16; j++) any |= over[j];
    return !(any >> 31);
}

/* Keeps the salience scores as they are before token t is appended: a rollback to t restores
   them (the attention calls made since are undone with the tokens). */
static void kvq__snapshot_salience(kvq_cache *c, int t) {
    const size_t n = (size_t)c->cfg.n_kv_heads * c->kcap, at = (size_t)(t % c->cfg.rollback_tokens) * n;
    memcpy(c->snap_score + at, c->sal_score, n * sizeof(float));
    memcpy(c->snap_seen + at, c->sal_seen, n * sizeof(uint32_t));
}

/* Stores one token (all heads) and moves what leaves the residual window. The token joins the
   rollback history; with snap, its salience snapshot is taken (only the newest rollback_tokens
   appends of a call need one: no attention runs between the others). */
static void kvq__append_token(kvq_cache *c, const float *k, const float *v, int snap) {
    const int H = c->cfg.n_kv_heads, D = c->cfg.head_dim, S = c->cfg.sink_tokens;
    const int G = c->kb, R = c->cfg.residual_tokens;
    int t = c->n_tokens, h, pos, kwait, vwait;
    if (snap && c->snap_score) kvq__snapshot_salience(c, t);
    if (c->n_hist < c->cfg.rollback_tokens) c->n_hist++;
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
    if (c->n_salient)
        for (h = 0; h < H; h++) { /* a new waiting key has received no attention yet */
            c->sal_score[(size_t)h * c->kcap + (size_t)(pos % c->kcap)] = 0.0f;
            c->sal_seen[(size_t)h * c->kcap + (size_t)(pos % c->kcap)] = 0;
        }
    if (kvq__per_token_keys(c)) { /* keys leave with their values, one token at a time */
        if (pos + 1 - c->n_vquant > R) {
            for (h = 0; h < H; h++) {
                kvq__quantize_key_token(c, h, c->n_ktok);
                kvq__quantize_value(c, h, c->n_vquant);
            }
            c->n_ktok++;
            c->n_vquant++;
        }
        return;
    }
    kwait = pos + 1 - c->n_kblocks * G;
    if (kwait > R && kwait >= G && c->n_salient) {
        int b = c->n_kblocks, j;
        uint8_t mask[128];
        for (h = 0; h < H; h++) {
            kvq__store_salient(c, h, b, mask);
            kvq__quantize_key_block_masked(c, h, b, mask);
            for (j = 0; j < G; j++) kvq__quantize_value(c, h, b * G + j); /* values leave with their block */
        }
        c->n_kblocks++;
        c->n_vquant += G;
        return;
    }
    if (kwait > R && kwait >= G) {
        for (h = 0; h < H; h++) kvq__quantize_key_block(c, h, c->n_kblocks);
        c->n_kblocks++;
    }
    vwait = pos + 1 - c->n_vquant;
    if (vwait > R && !c->n_salient) {
        for (h = 0; h < H; h++) kvq__quantize_value(c, h, c->n_vquant);
        c->n_vquant++;
    }
}

/* Everything an append of n_tokens >= 1 checks before it stores anything (all or nothing). */
static kvq_status kvq__check_append(const kvq_cache *c, const float *k, const float *v, int n_tokens) {
    const size_t row = (size_t)c->cfg.n_kv_heads * c->cfg.head_dim;
    if (!k || !v) return KVQ_ERR_INVALID;
    if (n_tokens > c->cfg.max_tokens - c->n_tokens) return KVQ_ERR_FULL;
    if (kvq__overlaps_cache(c, k, row * n_tokens * sizeof(float)) ||
        kvq__overlaps_cache(c, v, row * n_tokens * sizeof(float)))
        return KVQ_ERR_INVALID;
    if (!kvq__dispatch_fits_fp16(k, row * n_tokens) || !kvq__dispatch_fits_fp16(v, row * n_tokens))
        return KVQ_ERR_INVALID;
    if (c->cfg.rotation == KVQ_ROTATE_HADAMARD &&
        (!kvq__rotates_in_fp16(k, row * n_tokens, c->cfg.head_dim) ||
         !kvq__rotates_in_fp16(v, row * n_tokens, c->cfg.head_dim)))
        return KVQ_ERR_INVALID;
    return KVQ_OK;
}

KVQ_API kvq_status kvq_cache_append(kvq_cache *c, const float *k, const float *v, int n_tokens) {
    const size_t row = c ? (size_t)c->cfg.n_kv_heads * c->cfg.head_dim : 0;
    kvq_status st;
    int i;
    if (!c || n_tokens < 0) return KVQ_ERR_INVALID;
    if (n_tokens == 0) return KVQ_OK;
    if ((st = kvq__check_append(c, k, v, n_tokens)) != KVQ_OK) return st;
    for (i = 0; i < n_tokens; i++)
        kvq__append_token(c, k + row * i, v + row * i, n_tokens - i <= c->cfg.rollback_tokens);
    return KVQ_OK;
}

/* Dequantizes key of token t of head h into x[D]. */
static void kvq__read_key(const kvq_cache *c, int h, int t, float *x) {
    const int D = c->cfg.head_dim, S = c->cfg.sink_tokens, G = c->kb, bits = c->cfg.key_bits;
    int pos = t - S, ch;
    if (t < S) { kvq__f32_row(x, kvq__sink_row(c, c->sink_k, h, t), D); return; }
    if (pos >= kvq__keys_quantized(c)) { kvq__f32_row(x, kvq__ring_k_row(c, h, pos), D); return; }
    if (kvq__per_token_keys(c)) {
        kvq__read_token_record(c, kvq__key_token_params(c, h, pos), 32, kvq__key_token_codes(c, h, pos), bits, x);
        return;
    }
    if (c->n_salient) {
        const uint8_t *e = kvq__find_salient(c, h, pos / G, pos % G);
        if (e) { kvq__side_get(c, e, 0, x); return; }
    }
    {
        const uint8_t *blk = kvq__key_block(c, h, pos / G);
        int tt = pos % G;
        const kvq__format *f = kvq__fmt(bits);
        if (!f->quantized) { kvq__f32_row(x, (const uint16_t *)(const void *)blk + (size_t)tt * D, D); return; }
        {
            const uint16_t *scale = (const uint16_t *)(const void *)blk, *mins = scale + D;
            const uint8_t *codes = kvq__block_codes(blk, D);
            size_t row_bytes = kvq__row_bytes(f, (size_t)G);
            for (ch = 0; ch < D; ch++)
                x[ch] = kvq__f16_to_f32(mins[ch]) +
                        kvq__f16_to_f32(scale[ch]) * (float)kvq__get_code(codes + row_bytes * ch, G, tt, bits);
        }
    }
}

static void kvq__read_value(const kvq_cache *c, int h, int t, float *x) {
    const int D = c->cfg.head_dim, S = c->cfg.sink_tokens, G = c->kb;
    int pos = t - S;
    if (t < S) { kvq__f32_row(x, kvq__sink_row(c, c->sink_v, h, t), D); return; }
    if (pos >= c->n_vquant) { kvq__f32_row(x, kvq__ring_v_row(c, h, pos), D); return; }
    if (c->n_salient) {
        const uint8_t *e = kvq__find_salient(c, h, pos / G, pos % G);
        if (e) { kvq__side_get(c, e, 1, x); return; }
    }
    kvq__read_token_record(c, kvq__value_params(c, h, pos), kvq__vpb(&c->cfg), kvq__value_codes(c, h, pos),
                           c->cfg.value_bits, x);
}

KVQ_API kvq_status kvq_cache_read(const kvq_cache *c, int first, int n, float *k, float *v) {
    const int H = c ? c->cfg.n_kv_heads : 0, D = c ? c->cfg.head_dim : 0;
    int t, h;
    size_t bytes;
    if (!c || (!k && !v) || first < 0 || n < 0 || n > c->n_tokens - first) return KVQ_ERR_INVALID;
    bytes = (size_t)n * H * D * sizeof(float);
    if (kvq__overlap(k, k ? bytes : 0, v, v ? bytes : 0) || kvq__overlaps_cache(c, k, k ? bytes : 0) ||
        kvq__overlaps_cache(c, v, v ? bytes : 0))
        return KVQ_ERR_INVALID;
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
   Tiles outside, query heads inside: a tile of K and V is read once for all
   the query heads of its GQA group (up to KVQ__HEAD_CHUNK). The arithmetic
   is in the active ISA's kernels (sections "ISA kernels" and "Dispatch").
   Quantized keys, per channel c of a block:
     q.k_t = sum_c (q_c s_c) code_{c,t} + sum_c q_c m_c
   so the scales fold into the query once per block and the mins are one bias.
   Quantized values, per group g: sum_t p_t v_t[c] = sum_t (p_t s_{t,g}) code_{t,c} + p_t m_{t,g}.
   --------------------------------------------------------------------------- */

#define KVQ__TILE 128     /* at most G tokens per tile */
#define KVQ__WMAX 640     /* value params decoded at once: tokens x groups (kvq__value_chunk) */

typedef struct kvq__head_state {
    float m, l; /* running max and sum of exp(score - m) */
    float *acc; /* [D], unnormalized */
} kvq__head_state;

/* The active ISA's kernels (sections "ISA kernels" and "Dispatch"; each ISA has the same set,
   suffixed _scalar, _avx2, _avx512, _neon). Scores and softmax weights of head j live at
   [j * KVQ__TILE + t]. */
/* The scalar kernels, the reference:
   scores_codes: scores of all G tokens of a quantized key block, q already scaled;
   scores_f16:   scores of n fp16 rows;
   exp_sum:      x = exp(x - mx), returns the sum;
   acc_codes:    acc[j][c] += sum_t p[j][t] (s_t,g code_t,c + m_t,g), par[t * 2ng + g] = s, [.. + ng + g] = m;
   acc_f16:      acc[j][c] += sum_t p[j][t] v_t[c] over n fp16 rows. */
static void kvq__scores_codes_scalar(const uint8_t *blk, int D, int G, int bits, const float *q, int nh,
                                     float *scores) {
    const uint16_t *sc = (const uint16_t *)(const void *)blk, *mins = sc + D;
    const uint8_t *codes = kvq__block_codes(blk, D);
    size_t row_bytes = (size_t)G * bits / 8;
    int ch, t, j;
    for (j = 0; j < nh; j++) {
        const float *qj = q + (size_t)j * D;
        float *s = scores + (size_t)j * KVQ__TILE, bias = 0.0f;
        for (t = 0; t < G; t++) s[t] = 0.0f;
        for (ch = 0; ch < D; ch++) {
            float qs = qj[ch] * kvq__f16_to_f32(sc[ch]);
            const uint8_t *row = codes + row_bytes * ch;
            bias += qj[ch] * kvq__f16_to_f32(mins[ch]);
            for (t = 0; t < G; t++) s[t] += qs * (float)kvq__get_code(row, G, t, bits);
        }
        for (t = 0; t < G; t++) s[t] += bias;
    }
}

static void kvq__scores_f16_scalar(const uint16_t *const *rows, int n, int D, const float *q, int nh,
                                   float *scores) {
    int t, ch, j;
    for (j = 0; j < nh; j++)
        for (t = 0; t < n; t++) {
            float s = 0.0f;
            for (ch = 0; ch < D; ch++) s += q[(size_t)j * D + ch] * kvq__f16_to_f32(rows[t][ch]);
            scores[(size_t)j * KVQ__TILE + t] = s;
        }
}

static float kvq__exp_sum_scalar(float *x, int n, float mx) {
    float sum = 0.0f;
    int t;
    for (t = 0; t < n; t++) sum += (x[t] = expf(x[t] - mx));
    return sum;
}

static void kvq__acc_codes_scalar(const uint8_t *codes, size_t stride, const float *par, int n, int D, int G,
                                  int bits, const float *p, int nh, float *const *acc) {
    int ng = (D + G - 1) / G, j, t, ch;
    for (j = 0; j < nh; j++)
        for (t = 0; t < n; t++) {
            const uint8_t *ct = codes + stride * t;
            const float *pt = par + (size_t)t * 2 * ng, pj = p[(size_t)j * KVQ__TILE + t];
            for (ch = 0; ch < D; ch++)
                acc[j][ch] += pj * (pt[ch / G] * (float)kvq__get_code(ct, D, ch, bits) + pt[ng + ch / G]);
        }
}

/* The dot products of per-token records (keys stored per token, the side store's keys) with the
   queries: scores[j][t] = sum_c q_j,c (s_t,g code_t,c + m_t,g). Params as in kvq__acc_codes. */
static void kvq__dot_codes_scalar(const uint8_t *codes, size_t stride, const float *par, int n, int D, int G,
                                  int bits, const float *q, int nh, float *scores) {
    int ng = (D + G - 1) / G, j, t, ch;
    for (j = 0; j < nh; j++)
        for (t = 0; t < n; t++) {
            const uint8_t *ct = codes + stride * t;
            const float *pt = par + (size_t)t * 2 * ng, *qj = q + (size_t)j * D;
            float s = 0.0f;
            for (ch = 0; ch < D; ch++)
                s += qj[ch] * (pt[ch / G] * (float)kvq__get_code(ct, D, ch, bits) + pt[ng + ch / G]);
            scores[(size_t)j * KVQ__TILE + t] = s;
        }
}

static void kvq__acc_f16_scalar(const uint16_t *const *rows, int n, int D, const float *p, int nh,
                                float *const *acc) {
    int j, t, ch;
    for (j = 0; j < nh; j++)
        for (t = 0; t < n; t++) {
            float pt = p[(size_t)j * KVQ__TILE + t];
            for (ch = 0; ch < D; ch++) acc[j][ch] += pt * kvq__f16_to_f32(rows[t][ch]);
        }
}


/* Integer attention (kvq_set_arith). One scheme, defined by the two scalar kernels below; every
   ISA's integer kernels compute its integer sums exactly and may reorder only the float ones.
   Keys (a block of G tokens, bits 2-4, G % 16 == 0, G * bits <= 256): per query head the scaled
   query qs_c = q_c s_c becomes 16-bit integers and their two bytes,
     q16_c = rint(qs_c * (32639 / amax)), amax = max_c |qs_c|;  hi_c = (q16_c + 128) >> 8, lo_c = q16_c - 256 hi_c
   (|q16| <= 32639 keeps hi within int8), and
     score_t = (amax / 32639) * sum_c code_{c,t} (256 hi_c + lo_c) + sum_c q_c m_c,
   the sum exact in int32: two u8 x s8 dot products (vpdpbusd, sdot) per 4 channels. The query's
   rounding error is 2^-16 of its largest element.
   Values (bits 2-4, G % 16 == 0, D % G == 0): per run (the quantized values of a tile, KVQ__INT_RUN
   tokens at a time from its start), query head and group g, the weights w_t = p_t s_{t,g} become
   bytes w8_t = rint(w_t * 255 / wmax) (wmax = max_t w_t, at least 2^-100) and, with centred codes
   (their rounding multiplies code - top/2, top = 2^b - 1),
     acc_c += (wmax / 510) * (2 sum_t w8_t code_{t,c} - top sum_t w8_t) + sum_t p_t (m_{t,g} + s_{t,g} top / 2),
   the integer part exact, the last sum in float. The run length trades speed (one weight setup
   and one float step per run) for accuracy: runs of 32, 64 and 128 measured 2.3e-5, 3.9e-5 and
   6.4e-5 against the float kernels at 64K tokens (tests/test_simd.c). Tiles cover whole key
   blocks (kvq__block_span), so a split range (kvq_attention_partial at a tile boundary, the
   batch plan) runs the same runs. Other shapes and bits use the float kernels. */
#define KVQ__Q16 32639.0f
#ifndef KVQ__INT_RUN
#define KVQ__INT_RUN 64 /* tokens whose softmax weights share one scale (one value-kernel call) */
#endif
#define KVQ__W_MIN 7.8886091e-31f /* 2^-100: the least wmax, so 255 / wmax stays finite */
static int kvq__int_keys(int bits, int G) { return bits >= 2 && bits <= 4 && G % 16 == 0 && G * bits <= 256; }
/* An ISA's integer pass for nj <= 4 query heads, PASS(b, n), with the bits b constant and, for four
   heads (GQA) or one (MHA), the head count n constant too, so the hot loop tests neither. */
#define KVQ__INT_CASES(bits, nj, PASS)                                                                             \
    switch ((bits) * 8 + ((nj) == 4 ? 1 : (nj) == 1 ? 2 : 0)) {                                                   \
    case 17: PASS(2, 4); break;                                                                                    \
    case 25: PASS(3, 4); break;                                                                                    \
    case 33: PASS(4, 4); break;                                                                                    \
    case 18: PASS(2, 1); break;                                                                                    \
    case 26: PASS(3, 1); break;                                                                                    \
    case 34: PASS(4, 1); break;                                                                                    \
    case 16: PASS(2, nj); break;                                                                                   \
    case 24: PASS(3, nj); break;                                                                                   \
    case 32: PASS(4, nj); break;                                                                                   \
    default: PASS(bits, nj); break;                                                                                \
    }
static int kvq__int_values(int bits, int D, int G) {
    return bits >= 2 && bits <= 4 && D % 16 == 0 && G % 16 == 0 && D % G == 0;
}

/* A head's scaled query qs[D] as the bytes hi, lo of q16 (above); returns the unit amax / 32639. */
static float kvq__query_q16(const float *qs, int D, int8_t *hi, int8_t *lo) {
    float amax = 0.0f, inv;
    int c;
    for (c = 0; c < D; c++) amax = fabsf(qs[c]) > amax ? fabsf(qs[c]) : amax;
    inv = amax > 0.0f ? KVQ__Q16 / amax : 0.0f;
    for (c = 0; c < D; c++) {
        const int v = (int)rintf(qs[c] * inv), h = ((v + 128 + 65536) >> 8) - 256; /* floor((v + 128) / 256) */
        hi[c] = (int8_t)h;
        lo[c] = (int8_t)(v - 256 * h);
    }
    return amax / KVQ__Q16;
}

static void kvq__scores_int_scalar(const uint8_t *blk, int D, int G, int bits, const float *q, int nh,
                                   float *scores) {
    const uint16_t *sc = (const uint16_t *)(const void *)blk, *mins = sc + D;
    const uint8_t *codes = kvq__block_codes(blk, D);
    const size_t row_bytes = (size_t)G * bits / 8;
    float qs[512];
    int8_t hi[512], lo[512];
    int ch, t, j;
    for (j = 0; j < nh; j++) {
        const float *qj = q + (size_t)j * D;
        float bias = 0.0f, unit;
        for (ch = 0; ch < D; ch++) {
            qs[ch] = qj[ch] * kvq__f16_to_f32(sc[ch]);
            bias += qj[ch] * kvq__f16_to_f32(mins[ch]);
        }
        unit = kvq__query_q16(qs, D, hi, lo);
        for (t = 0; t < G; t++) {
            int32_t sum = 0;
            for (ch = 0; ch < D; ch++)
                sum += (int32_t)kvq__get_code(codes + row_bytes * ch, G, t, bits) * (256 * hi[ch] + lo[ch]);
            scores[(size_t)j * KVQ__TILE + t] = (float)sum * unit + bias;
        }
    }
}

/* The weights of group g for query head j over n tokens (above): bytes w8[t] (zero from n to a
   multiple of 4), returns sum_t w8_t; *unit = wmax / 510, *bias = sum_t p_t (m + s top / 2). */
static int32_t kvq__value_weights(const float *par, int n, int ng, int g, int top, const float *pj, uint8_t *w8,
                                  float *unit, float *bias) {
    float wmax = KVQ__W_MIN, b = 0.0f, inv;
    int32_t sum = 0;
    int t;
    for (t = 0; t < n; t++) {
        const float s = par[(size_t)t * 2 * ng + g], w = pj[t] * s;
        wmax = w > wmax ? w : wmax;
        b += pj[t] * (par[(size_t)t * 2 * ng + ng + g] + s * (0.5f * (float)top));
    }
    inv = 255.0f / wmax;
    for (t = 0; t < n; t++) {
        w8[t] = (uint8_t)(int)rintf(pj[t] * par[(size_t)t * 2 * ng + g] * inv);
        sum += w8[t];
    }
    for (; t % 4; t++) w8[t] = 0;
    *unit = wmax / 510.0f;
    *bias = b;
    return sum;
}

static void kvq__acc_int_scalar(const uint8_t *codes, size_t stride, const float *par, int n, int D, int G,
                                int bits, const float *p, int nh, float *const *acc) {
    const int ng = D / G, top = (1 << bits) - 1;
    uint8_t w8[KVQ__TILE + 3];
    int j, g, t, ch;
    for (j = 0; j < nh; j++)
        for (g = 0; g < ng; g++) {
            float unit, bias;
            const int32_t W = kvq__value_weights(par, n, ng, g, top, p + (size_t)j * KVQ__TILE, w8, &unit, &bias);
            for (ch = g * G; ch < (g + 1) * G; ch++) {
                int32_t sum = 0;
                for (t = 0; t < n; t++) sum += (int32_t)w8[t] * (int32_t)kvq__get_code(codes + stride * t, D, ch, bits);
                acc[j][ch] += (float)(2 * sum - top * W) * unit + bias;
            }
        }
}


/* The params of n stored values from par as floats, [t][scale[ng], min[ng]]. */
static void kvq__value_params_f32(const kvq_cache *c, const uint16_t *par, int n, float *out) {
    const int ng = kvq__value_groups(&c->cfg);
    if (kvq__vpb(&c->cfg) == 32) {
        kvq__dispatch_to_f32(out, par, n * 2 * ng);
        return;
    }
    kvq__dispatch_params16(par, n, ng, out);
}

/* n tokens' 16-bit value params (ng u16 each) as floats [t][scale[ng], min[ng]]. */
static void kvq__params16_scalar(const uint16_t *par, int n, int ng, float *out) {
    int t, g;
    for (t = 0; t < n; t++, par += ng, out += 2 * ng) /* one pass, branch-free */
        for (g = 0; g < ng; g++) kvq__params_f32(kvq__get_params(par, ng, g, 16), 16, &out[ng + g], &out[g]);
}

/* Tokens whose value params fit the scratch of KVQ__WMAX groups: a whole tile of kb tokens but
   where kb x groups is larger (key blocks of 128 over groups of 16 at head_dim 256, ...). */
static int kvq__value_chunk(const kvq_cache *c) { return KVQ__WMAX / kvq__value_groups(&c->cfg); }

/* Values of tokens [t0, t0+n) of head h into the accumulators, weights p[j * KVQ__TILE + t]. */
static void kvq__values_tile(const kvq_cache *c, int h, int t0, int n, const float *p, int nh,
                             float *const *acc, int integer) {
    const int D = c->cfg.head_dim, S = c->cfg.sink_tokens, G = c->cfg.group_size, bits = c->cfg.value_bits;
    const uint16_t *rows[KVQ__TILE];
    int pos = t0 - S, nq, t;
    if (t0 < S) { /* a tile never crosses the sinks' end */
        for (t = 0; t < n; t++) rows[t] = kvq__sink_row(c, c->sink_v, h, t0 + t);
        kvq__k_acc_f16(rows, n, D, p, nh, acc);
        return;
    }
    nq = c->n_vquant - pos;
    nq = nq < 0 ? 0 : nq > n ? n : nq;
    if (nq > 0 && !kvq__fmt(bits)->quantized) {
        for (t = 0; t < nq; t++) rows[t] = (const uint16_t *)(const void *)kvq__value_codes(c, h, pos + t);
        kvq__k_acc_f16(rows, nq, D, p, nh, acc);
    } else if (nq > 0) { /* params as floats, [t][scale[ng], min[ng]], a chunk of tokens at a time */
        const int ints = integer && kvq__int_values(bits, D, G);
        const int step = ints && kvq__value_chunk(c) > KVQ__INT_RUN ? KVQ__INT_RUN : kvq__value_chunk(c);
        float par[2 * KVQ__WMAX];
        int t1, m;
        for (t1 = 0; t1 < nq; t1 += m) {
            m = nq - t1 < step ? nq - t1 : step;
            kvq__value_params_f32(c, kvq__value_params(c, h, pos + t1), m, par);
            if (ints)
                kvq__k_acc_int(kvq__value_codes(c, h, pos + t1), c->vcode_bytes, par, m, D, G, bits, p + t1, nh, acc);
            else
                kvq__k_acc_codes(kvq__value_codes(c, h, pos + t1), c->vcode_bytes, par, m, D, G, bits, p + t1, nh,
                                 acc);
        }
    }
    if (nq < n) {
        for (t = nq; t < n; t++) rows[t - nq] = kvq__ring_v_row(c, h, pos + t);
        kvq__k_acc_f16(rows, n - nq, D, p + nq, nh, acc);
    }
}

/* Per-token records (8-bit ones of the side store, keys stored per token) dotted with the
   queries: out[j * KVQ__TILE + i] = q_j . x_i for records i < n, params (fp16 [scale[ng],
   min[ng]]) every pstride u16 from par, codes every cstride bytes from codes. */
static void kvq__records_scores(const kvq_cache *c, const uint16_t *par, size_t pstride, const uint8_t *codes,
                                size_t cstride, int bits, int n, const float *qs, int nh, float *out) {
    const int D = c->cfg.head_dim, ng = kvq__value_groups(&c->cfg), step = kvq__value_chunk(c);
    float parf[2 * KVQ__WMAX];
    int i, i0, m;
    if (!kvq__fmt(bits)->quantized) { /* fp16 rows */
        const uint16_t *rows[KVQ__TILE];
        for (i = 0; i < n; i++) rows[i] = (const uint16_t *)(const void *)(codes + (size_t)i * cstride);
        kvq__k_scores_f16(rows, n, D, qs, nh, out);
        return;
    }
    for (i0 = 0; i0 < n; i0 += m) {
        m = n - i0 < step ? n - i0 : step;
        if (pstride == (size_t)2 * ng) kvq__f32_row(parf, par + (size_t)i0 * pstride, m * 2 * ng); /* one array */
        else
            for (i = 0; i < m; i++) kvq__f32_row(parf + (size_t)i * 2 * ng, par + (size_t)(i0 + i) * pstride, 2 * ng);
        kvq__k_dot_codes(codes + (size_t)i0 * cstride, cstride, parf, m, D, c->cfg.group_size, bits, qs, nh,
                         out + i0);
    }
}

/* Salient tokens of quantized blocks: a patch-up pass after the blocks' kernels, so the hot
   loops carry no per-token branch. Head h's side-store entries of consecutive blocks are
   consecutive, sorted by token in each block, so those of a tile [pos, pos+n) are one run of
   entries e0.. (numbered across blocks): this returns its length, sets *e0, and puts entry
   e0 + i's place in the tile in at[i]. */
static int kvq__salient_tile(const kvq_cache *c, int h, int pos, int n, int *e0, int *at) {
    const int G = c->kb, ns = c->n_salient;
    int b, e, t, ne = 0;
    for (b = pos / G; b <= (pos + n - 1) / G; b++) {
        const uint8_t *ent = kvq__side_entry(c, h, b, 0);
        for (e = 0; e < ns; e++, ent += c->side_bytes) {
            t = b * G + kvq__side_index(ent) - pos;
            if (t < 0) continue; /* the first block's entries before the tile */
            if (t >= n) return ne;
            if (!ne) *e0 = b * ns + e;
            at[ne++] = t;
        }
    }
    return ne;
}

/* The scores of the tile's ne salient tokens (kvq__salient_tile) replaced by q . k from the side store. */
static void kvq__salient_scores(const kvq_cache *c, int h, int e0, int ne, const int *at, const float *qs, int nh,
                                float *sp) {
    const uint8_t *first = kvq__side_entry(c, h, e0 / c->n_salient, e0 % c->n_salient);
    float s[KVQ__HEAD_CHUNK * KVQ__TILE];
    int i, j;
    kvq__records_scores(c, (const uint16_t *)(const void *)(first + kvq__side_params_at(c, 0)), c->side_bytes / 2,
                        first + kvq__side_codes_at(c, 0), c->side_bytes, c->cfg.salient_bits, ne, qs, nh, s);
    for (j = 0; j < nh; j++)
        for (i = 0; i < ne; i++) sp[(size_t)j * KVQ__TILE + at[i]] = s[(size_t)j * KVQ__TILE + i];
}

/* Their softmax weights are spent on the side-store values and zeroed, so the codes pass adds
   nothing for them: acc[j] += sum_i w_j,i v_i through the value kernels. */
static void kvq__salient_values(const kvq_cache *c, int h, int e0, int ne, const int *at, float *sp, int nh,
                                float *const *acc) {
    const int D = c->cfg.head_dim, ng = kvq__value_groups(&c->cfg);
    const uint8_t *first = kvq__side_entry(c, h, e0 / c->n_salient, e0 % c->n_salient);
    const size_t codes = kvq__side_codes_at(c, 1), params = kvq__side_params_at(c, 1);
    float w[KVQ__HEAD_CHUNK * KVQ__TILE];
    int i, j;
    for (j = 0; j < nh; j++)
        for (i = 0; i < ne; i++) {
            w[(size_t)j * KVQ__TILE + i] = sp[(size_t)j * KVQ__TILE + at[i]];
            sp[(size_t)j * KVQ__TILE + at[i]] = 0.0f;
        }
    if (!kvq__fmt(c->cfg.salient_bits)->quantized) {
        const uint16_t *rows[KVQ__TILE];
        for (i = 0; i < ne; i++) rows[i] = (const uint16_t *)(const void *)(first + (size_t)i * c->side_bytes + codes);
        kvq__k_acc_f16(rows, ne, D, w, nh, acc);
    } else { /* params as floats [i][scale[ng], min[ng]], a chunk of entries at a time */
        const int step = kvq__value_chunk(c);
        float par[2 * KVQ__WMAX];
        int i0, m;
        for (i0 = 0; i0 < ne; i0 += m) {
            m = ne - i0 < step ? ne - i0 : step;
            for (i = 0; i < m; i++)
                kvq__f32_row(par + (size_t)i * 2 * ng,
                             (const uint16_t *)(const void *)(first + (size_t)(i0 + i) * c->side_bytes + params),
                             2 * ng);
            kvq__k_acc_codes(first + (size_t)i0 * c->side_bytes + codes, c->side_bytes, par, m, D, c->cfg.group_size,
                             c->cfg.salient_bits, w + i0, nh, acc);
        }
    }
}

/* Scores of keys stored per token (key_axis). */
static void kvq__scores_key_tokens(const kvq_cache *c, int h, int pos, int n, const float *qs, int nh,
                                   float *scores) {
    kvq__records_scores(c, kvq__key_token_params(c, h, pos), c->ktparam_bytes / 2, kvq__key_token_codes(c, h, pos),
                        c->ktcode_bytes, c->cfg.key_bits, n, qs, nh, scores);
}

/* Tokens of the key-block segment a tile may span: whole blocks up to KVQ__TILE, from a multiple
   of the span (so a range split at a multiple tiles as the whole range does). Several blocks a
   tile share one softmax update and one value-kernel call; a side store patches them block by
   block. */
static int kvq__block_span(const kvq_cache *c) { return KVQ__TILE / c->kb * c->kb; }

/* End of the tile starting at t: the next segment boundary (sinks, blocks, ring), at most hi. */
static int kvq__tile_end(const kvq_cache *c, int t, int hi) {
    const int S = c->cfg.sink_tokens, G = c->kb, span = kvq__block_span(c);
    int end;
    if (t < S) end = S < t + G ? S : t + G;
    else if (t - S < c->n_kblocks * G) { /* never past the blocks' end */
        end = ((t - S) / span + 1) * span;
        end = S + (end < c->n_kblocks * G ? end : c->n_kblocks * G);
    }
    else if (t - S < c->n_ktok) end = S + c->n_ktok < t + G ? S + c->n_ktok : t + G;
    else end = t + G;
    return end < hi ? end : hi;
}

#if defined(__GNUC__) || defined(__clang__)
#define KVQ__PREFETCH(p) __builtin_prefetch((p), 0, 0)
#else
#define KVQ__PREFETCH(p) ((void)(p))
#endif
/* Starts loading the quantized key blocks and values of tokens [t0, t1) of head h (the tile after
   the one being computed): at 64K tokens the cache streams from DRAM, and the tiles' few streams
   stalled on it without this (one prefetch per 64-byte line, about one per token). */
static void kvq__prefetch_tile(const kvq_cache *c, int h, int t0, int t1) {
    const int S = c->cfg.sink_tokens, G = c->kb;
    int p0 = t0 - S, p1 = t1 - S, b;
    size_t i, n;
    const uint8_t *x;
    if (p0 < 0 || p1 <= p0) return;
    for (b = p0 / G; b < c->n_kblocks && b * G < p1; b++)
        for (x = kvq__key_block(c, h, b), i = 0; i < c->kblock_bytes; i += 64) KVQ__PREFETCH(x + i);
    if (c->n_salient && p0 < c->n_kblocks * G) /* the blocks' side-store entries, consecutive */
        for (x = kvq__side_entry(c, h, p0 / G, 0), n = (size_t)(b - p0 / G) * c->n_salient * c->side_bytes, i = 0;
             i < n; i += 64)
            KVQ__PREFETCH(x + i);
    if (p1 > c->n_vquant) p1 = c->n_vquant;
    if (p1 <= p0) return;
    n = (size_t)(p1 - p0);
    for (x = kvq__value_codes(c, h, p0), i = 0; i < n * c->vcode_bytes; i += 64) KVQ__PREFETCH(x + i);
    for (x = (const uint8_t *)kvq__value_params(c, h, p0), i = 0; i < n * c->vparam_bytes; i += 64) KVQ__PREFETCH(x + i);
}

/* Online softmax over tokens [lo, hi) of head h, for nh <= KVQ__HEAD_CHUNK query vectors
   q[j*D]. Tiles outside, heads inside: each tile of K and V is read once for all nh heads. */
static void kvq__attend_range(const kvq_cache *c, int h, const float *q, int nh, float scale, int lo, int hi,
                              kvq__head_state *st, float *ring_scores) {
    const int D = c->cfg.head_dim, S = c->cfg.sink_tokens, G = c->kb;
    const int kquant = kvq__fmt(c->cfg.key_bits)->quantized; /* key blocks and per-token keys hold codes */
    float qs[KVQ__HEAD_CHUNK * 512], scores[KVQ__HEAD_CHUNK * KVQ__TILE];
    const uint16_t *rows[KVQ__TILE];
    float *acc[KVQ__HEAD_CHUNK];
    const int integer = kvq__int_on();
    int t0, j, t, ch, ne, e0 = 0, at[KVQ__TILE];
    KVQ_ASSERT(nh >= 1 && nh <= KVQ__HEAD_CHUNK && G <= KVQ__TILE && D <= 512);
    for (j = 0; j < nh; j++) {
        for (ch = 0; ch < D; ch++) qs[(size_t)j * D + ch] = q[(size_t)j * D + ch] * scale;
        if (c->cfg.rotation == KVQ_ROTATE_HADAMARD) kvq__rotate(&c->rot, qs + (size_t)j * D, 0); /* M q . M k = q . k */
        acc[j] = st[j].acc;
    }
    for (t0 = lo; t0 < hi;) {
        int t1 = kvq__tile_end(c, t0, hi), n = t1 - t0, pos = t0 - S;
        float *sp = scores; /* scores of token t0, head 0 */
        if (t1 < hi) kvq__prefetch_tile(c, h, t1, kvq__tile_end(c, t1, hi));
        if (t0 >= S && pos < c->n_kblocks * G) { /* whole blocks, G scores each, from pos's block */
            int b;
            if (kquant) {
                const int ik = integer && kvq__int_keys(c->cfg.key_bits, G);
                for (b = pos / G; b <= (pos + n - 1) / G; b++) {
                    const uint8_t *blk = kvq__key_block(c, h, b);
                    float *sb = scores + (size_t)(b - pos / G) * G;
                    if (ik) kvq__k_scores_int(blk, D, G, c->cfg.key_bits, qs, nh, sb);
                    else kvq__k_scores_codes(blk, D, G, c->cfg.key_bits, qs, nh, sb);
                }
                sp = scores + pos % G;
            } else {
                for (t = 0; t < n; t++)
                    rows[t] = (const uint16_t *)(const void *)kvq__key_block(c, h, (pos + t) / G) + (size_t)((pos + t) % G) * D;
                kvq__k_scores_f16(rows, n, D, qs, nh, scores);
            }
        } else if (t0 >= S && pos < c->n_ktok && kquant) {
            kvq__scores_key_tokens(c, h, pos, n, qs, nh, scores);
        } else {
            for (t = 0; t < n; t++)
                rows[t] = t0 + t < S              ? kvq__sink_row(c, c->sink_k, h, t0 + t)
                          : pos + t < c->n_ktok ? (const uint16_t *)(const void *)kvq__key_token_codes(c, h, pos + t)
                                                : kvq__ring_k_row(c, h, pos + t);
            kvq__k_scores_f16(rows, n, D, qs, nh, scores);
        }
        ne = c->n_salient && t0 >= S && pos < c->n_kblocks * G ? kvq__salient_tile(c, h, pos, n, &e0, at) : 0;
        if (ne) kvq__salient_scores(c, h, e0, ne, at, qs, nh, sp);
        if (ring_scores && t0 >= S && pos >= c->n_kblocks * G) /* raw scores, for the salience of waiting keys */
            for (j = 0; j < nh; j++)
                memcpy(ring_scores + (size_t)j * c->kcap + (pos - c->n_kblocks * G), sp + (size_t)j * KVQ__TILE,
                       (size_t)n * sizeof(float));
        for (j = 0; j < nh; j++) {
            kvq__head_state *s = &st[j];
            float *sj = sp + (size_t)j * KVQ__TILE, mx = s->m, m4[4];
            m4[0] = m4[1] = m4[2] = m4[3] = mx; /* four chains: a max's latency per token was measurable */
            for (t = 0; t + 4 <= n; t += 4)
                for (ch = 0; ch < 4; ch++) m4[ch] = sj[t + ch] > m4[ch] ? sj[t + ch] : m4[ch];
            for (; t < n; t++) mx = sj[t] > mx ? sj[t] : mx;
            for (ch = 0; ch < 4; ch++) mx = m4[ch] > mx ? m4[ch] : mx;
            if (mx > s->m) {
                float corr = expf(s->m - mx); /* exp(-inf) = 0 on the first tile */
                s->l *= corr;
                for (ch = 0; ch < D; ch++) s->acc[ch] *= corr;
                s->m = mx;
            }
            s->l += kvq__k_exp_sum(sj, n, mx);
        }
        if (ne) kvq__salient_values(c, h, e0, ne, at, sp, nh, acc);
        kvq__values_tile(c, h, t0, n, sp, nh, acc, integer);
        t0 = t1;
    }
}

static float kvq__scale(const kvq_cache *c, const kvq_attn_params *p) {
    return p->scale != 0.0f ? p->scale : 1.0f / sqrtf((float)c->cfg.head_dim);
}

/* Largest |s| * sum_c |q_c| of a query head's row. Every stored element has |k| <= 2^17
   (appending keeps |x| <= 65504; loading checks scale and min), and rotation grows a row's
   L1 norm by at most sqrt(512) < 2^5, so each score and every partial sum of it, on every
   path, stays below 2^122: finite, as are differences of two scores. */
#define KVQ__Q_L1_MAX 1267650600228229401496703205376.0 /* 2^100 */

/* The query bytes of a call: [n_queries][n_q_heads][head_dim] floats. */
static size_t kvq__q_bytes(const kvq_cache *c, const kvq_attn_params *p) {
    return (size_t)p->n_queries * p->n_q_heads * c->cfg.head_dim * sizeof(float);
}

/* The params and queries of an attention call of 1..max_queries queries (the count is checked
   before a query is read). */
static kvq_status kvq__check_queries(const kvq_cache *c, const float *q, const kvq_attn_params *p, int max_queries) {
    size_t rows, r;
    int D, ch;
    double s;
    if (!c || !q || !p) return KVQ_ERR_INVALID;
    if (p->n_q_heads < c->cfg.n_kv_heads || p->n_q_heads % c->cfg.n_kv_heads || p->n_q_heads > 1 << 20)
        return KVQ_ERR_INVALID;
    if (p->n_queries < 1 || p->n_queries > max_queries) return KVQ_ERR_INVALID;
    if (!(p->scale > -FLT_MAX && p->scale < FLT_MAX)) return KVQ_ERR_INVALID; /* also NaN */
    D = c->cfg.head_dim;
    rows = (size_t)p->n_queries * p->n_q_heads;
    s = fabs((double)kvq__scale(c, p));
    for (r = 0; r < rows; r++) {
        const float *qr = q + r * (size_t)D;
        double l1 = 0.0;
        for (ch = 0; ch < D; ch++) {
            if (!(qr[ch] > -FLT_MAX && qr[ch] < FLT_MAX)) return KVQ_ERR_INVALID; /* also NaN */
            l1 += fabs((double)qr[ch]);
        }
        if (l1 * s > KVQ__Q_L1_MAX) return KVQ_ERR_INVALID;
    }
    return KVQ_OK;
}

static kvq_status kvq__check_attn(const kvq_cache *c, const float *q, const kvq_attn_params *p) {
    return c ? kvq__check_queries(c, q, p, c->n_tokens) : KVQ_ERR_INVALID;
}

/* Runs query i, query heads [qh0, qh0+nh) of KV head h over tokens [lo, hi) clipped to causality. */
static void kvq__attend_query(const kvq_cache *c, const float *q, const kvq_attn_params *p, int i, int h,
                              int qh0, int nh, int lo, int hi, kvq__head_state *st, float *ring_scores) {
    const int D = c->cfg.head_dim;
    int limit = c->n_tokens - p->n_queries + i + 1; /* causal: tokens <= position */
    int j;
    for (j = 0; j < nh; j++) {
        st[j].m = -INFINITY;
        st[j].l = 0.0f;
        memset(st[j].acc, 0, (size_t)D * sizeof(float));
    }
    if (hi > limit) hi = limit;
    kvq__attend_range(c, h, q + ((size_t)i * p->n_q_heads + qh0) * D, nh, kvq__scale(c, p), lo, hi, st,
                      ring_scores);
}

/* ZipCache's score for the keys still waiting in the ring: each query adds the probability that
   its heads (all of the KV group, over chunks) gave each waiting key it saw, and counts once.
   ring_scores holds the raw scores of the waiting keys [0, limit - first waiting). */
static void kvq__track_salience(kvq_cache *c, int h, int limit, const float *ring_scores, int nh,
                                const kvq__head_state *st, int first_chunk) {
    int first = c->cfg.sink_tokens + c->n_kblocks * c->kb, u, j;
    for (u = 0; first + u < limit; u++) {
        size_t slot = (size_t)h * c->kcap + (size_t)((c->n_kblocks * c->kb + u) % c->kcap);
        float add = 0.0f;
        for (j = 0; j < nh; j++) add += expf(ring_scores[(size_t)j * c->kcap + u] - st[j].m) / st[j].l;
        c->sal_score[slot] += add;
        if (first_chunk) c->sal_seen[slot]++;
    }
}

/* y <- M^T y for n rows of an output in rotated space. */
static void kvq__unrotate_rows(const kvq_cache *c, float *y, size_t n) {
    size_t r;
    if (c->cfg.rotation != KVQ_ROTATE_HADAMARD) return;
    for (r = 0; r < n; r++) kvq__rotate(&c->rot, y + r * c->cfg.head_dim, 1);
}

/* Every query of the query heads of KV head h over all the tokens it sees, normalized into out (in
   the cache's rotated space). track: the cache itself when kvq_attention records salience (the
   one caller that writes), else NULL. */
static void kvq__attend_head(const kvq_cache *c, const float *q, float *out, const kvq_attn_params *p, int h,
                             kvq_cache *track) {
    kvq__head_state st[KVQ__HEAD_CHUNK];
    const int D = c->cfg.head_dim, group = p->n_q_heads / c->cfg.n_kv_heads;
    int i, qh, j, ch;
    for (i = 0; i < p->n_queries; i++)
        for (qh = h * group; qh < (h + 1) * group; qh += KVQ__HEAD_CHUNK) {
            int nh = (h + 1) * group - qh < KVQ__HEAD_CHUNK ? (h + 1) * group - qh : KVQ__HEAD_CHUNK;
            int limit = c->n_tokens - p->n_queries + i + 1;
            for (j = 0; j < nh; j++) st[j].acc = out + ((size_t)i * p->n_q_heads + qh + j) * D;
            kvq__attend_query(c, q, p, i, h, qh, nh, 0, c->n_tokens, st, track ? track->sal_ring : NULL);
            for (j = 0; j < nh; j++) {
                float inv = 1.0f / st[j].l; /* l >= 1: the max token contributes exp(0) */
                for (ch = 0; ch < D; ch++) st[j].acc[ch] *= inv;
            }
            if (track) kvq__track_salience(track, h, limit, track->sal_ring, nh, st, qh == h * group);
        }
}

KVQ_API kvq_status kvq_attention(kvq_cache *c, const float *q, float *out, const kvq_attn_params *p) {
    kvq_status s;
    int h, track;
    if (!out) return KVQ_ERR_INVALID;
    if ((s = kvq__check_attn(c, q, p)) != KVQ_OK) return s;
    if (kvq__overlap(q, kvq__q_bytes(c, p), out, kvq__q_bytes(c, p)) || kvq__overlaps_cache(c, out, kvq__q_bytes(c, p)))
        return KVQ_ERR_INVALID;
    track = c->n_salient && c->cfg.salient_policy == KVQ_SALIENT_ATTENTION;
    for (h = 0; h < c->cfg.n_kv_heads; h++) kvq__attend_head(c, q, out, p, h, track ? c : NULL);
    kvq__unrotate_rows(c, out, (size_t)p->n_queries * p->n_q_heads);
    return KVQ_OK;
}

/* Chunked prefill. Query i of the chunk sees the stored tokens (all of them: they come before
   the chunk) through the fused kernels, then the chunk's tokens 0..i at full precision (fp32,
   in the caller's space); the two online-softmax states merge, and only then is the chunk
   appended. So early queries never see their neighbours quantized (KIVI computes prefill
   attention at full precision for the same reason), and into an empty cache prefill is
   exact attention. Salience is not recorded (as for split attention). */
static void kvq__prefill_chunk_part(const kvq_cache *c, const float *k, const float *v, int i, int h,
                                    const float *qrow, float scale, kvq__head_state *st) {
    const int D = c->cfg.head_dim;
    const size_t row = (size_t)c->cfg.n_kv_heads * D;
    float qs[512];
    int j, ch;
    for (ch = 0; ch < D; ch++) qs[ch] = qrow[ch] * scale;
    for (j = 0; j <= i; j++) { /* one token at a time, the online softmax as in the tile loop */
        const float *kj = k + row * j + (size_t)h * D, *vj = v + row * j + (size_t)h * D;
        const float s = kvq__dot8(qs, kj, D);
        float p;
        if (s > st->m) {
            const float corr = expf(st->m - s); /* exp(-inf) = 0 when nothing came before */
            st->l *= corr;
            for (ch = 0; ch < D; ch++) st->acc[ch] *= corr;
            st->m = s;
        }
        p = expf(s - st->m);
        st->l += p;
        for (ch = 0; ch < D; ch++) st->acc[ch] += p * vj[ch];
    }
}

/* What prefill and its split form check: the queries, the chunk as an append, and out against
   q, k, v and the cache. */
static kvq_status kvq__check_prefill(const kvq_cache *c, const float *k, const float *v, int n_tokens,
                                     const float *q, const float *out, const kvq_attn_params *p) {
    size_t qbytes, kvbytes;
    kvq_status s;
    if (!out || !p || n_tokens < 1 || p->n_queries != n_tokens) return KVQ_ERR_INVALID;
    if ((s = kvq__check_queries(c, q, p, n_tokens)) != KVQ_OK) return s;
    if ((s = kvq__check_append(c, k, v, n_tokens)) != KVQ_OK) return s;
    qbytes = kvq__q_bytes(c, p);
    kvbytes = (size_t)n_tokens * c->cfg.n_kv_heads * c->cfg.head_dim * sizeof(float);
    if (kvq__overlap(q, qbytes, out, qbytes) || kvq__overlaps_cache(c, out, qbytes) ||
        kvq__overlap(k, kvbytes, out, qbytes) || kvq__overlap(v, kvbytes, out, qbytes))
        return KVQ_ERR_INVALID;
    return KVQ_OK;
}

/* Prefill's output rows of queries [q_first, q_end) and the query heads of KV heads
   [kv_first, kv_end). Each (query, head chunk) is computed on its own, in the same order
   whatever the ranges, so any split of the rows gives the single call's bits. */
static void kvq__prefill_rows(const kvq_cache *c, const float *k, const float *v, const float *q, float *out,
                              const kvq_attn_params *p, int q_first, int q_end, int kv_first, int kv_end) {
    kvq__head_state st[KVQ__HEAD_CHUNK];
    const int D = c->cfg.head_dim, T = c->n_tokens, group = p->n_q_heads / c->cfg.n_kv_heads;
    int h, i, qh, j, ch;
    for (h = kv_first; h < kv_end; h++)
        for (i = q_first; i < q_end; i++)
            for (qh = h * group; qh < (h + 1) * group; qh += KVQ__HEAD_CHUNK) {
                const int nh = (h + 1) * group - qh < KVQ__HEAD_CHUNK ? (h + 1) * group - qh : KVQ__HEAD_CHUNK;
                const float *q0 = q + ((size_t)i * p->n_q_heads + qh) * D;
                for (j = 0; j < nh; j++) {
                    st[j].m = -INFINITY;
                    st[j].l = 0.0f;
                    st[j].acc = out + ((size_t)i * p->n_q_heads + qh + j) * D;
                    memset(st[j].acc, 0, (size_t)D * sizeof(float));
                }
                if (T > 0) { /* the stored tokens, fused; back to the caller's space */
                    kvq__attend_range(c, h, q0, nh, kvq__scale(c, p), 0, T, st, NULL);
                    kvq__unrotate_rows(c, st[0].acc, (size_t)nh);
                }
                for (j = 0; j < nh; j++) {
                    kvq__prefill_chunk_part(c, k, v, i, h, q0 + (size_t)j * D, kvq__scale(c, p), &st[j]);
                    for (ch = 0; ch < D; ch++) st[j].acc[ch] /= st[j].l;
                }
            }
}

KVQ_API kvq_status kvq_attention_prefill(kvq_cache *c, const float *k, const float *v, int n_tokens, const float *q,
                                         float *out, const kvq_attn_params *p) {
    kvq_status s;
    if (!c) return KVQ_ERR_INVALID;
    if ((s = kvq__check_prefill(c, k, v, n_tokens, q, out, p)) != KVQ_OK) return s;
    kvq__prefill_rows(c, k, v, q, out, p, 0, n_tokens, 0, c->cfg.n_kv_heads);
    kvq_cache_append(c, k, v, n_tokens); /* checked above: it cannot fail */
    return KVQ_OK;
}

KVQ_API kvq_status kvq_attention_prefill_partial(const kvq_cache *c, const float *k, const float *v, int n_tokens,
                                                 const float *q, float *out, const kvq_attn_params *p, int q_first,
                                                 int q_end, int kv_first, int kv_end) {
    kvq_status s;
    if (!c) return KVQ_ERR_INVALID;
    if ((s = kvq__check_prefill(c, k, v, n_tokens, q, out, p)) != KVQ_OK) return s;
    if (q_first < 0 || q_first > q_end || q_end > n_tokens) return KVQ_ERR_INVALID;
    if (kv_first < 0 || kv_first >= kv_end || kv_end > c->cfg.n_kv_heads) return KVQ_ERR_INVALID;
    kvq__prefill_rows(c, k, v, q, out, p, q_first, q_end, kv_first, kv_end);
    return KVQ_OK;
}

KVQ_API size_t kvq_attention_state_floats(const kvq_cache *c, const kvq_attn_params *p) {
    if (!c || !p || p->n_queries < 1 || p->n_q_heads < 1 || p->n_q_heads > 1 << 20 ||
        p->n_queries > KVQ__MAX_TOKENS || p->n_q_heads % c->cfg.n_kv_heads)
        return 0;
    return (size_t)p->n_queries * p->n_q_heads * ((size_t)c->cfg.head_dim + 2);
}

/* The unnormalized rows (m, l, acc[D]) of every query of the query heads of KV head h over
   tokens [lo, hi) (each query still sees only tokens <= its position): query i, group head j
   at rows + i * query_stride + j * (D + 2). */
static void kvq__partial_head(const kvq_cache *c, const float *q, const kvq_attn_params *p, int h, int lo, int hi,
                              float *rows, size_t query_stride) {
    kvq__head_state st[KVQ__HEAD_CHUNK];
    const size_t stride = (size_t)c->cfg.head_dim + 2;
    const int group = p->n_q_heads / c->cfg.n_kv_heads;
    int i, qh, j;
    for (i = 0; i < p->n_queries; i++)
        for (qh = h * group; qh < (h + 1) * group; qh += KVQ__HEAD_CHUNK) {
            int nh = (h + 1) * group - qh < KVQ__HEAD_CHUNK ? (h + 1) * group - qh : KVQ__HEAD_CHUNK;
            float *row0 = rows + (size_t)i * query_stride + (size_t)(qh - h * group) * stride;
            for (j = 0; j < nh; j++) st[j].acc = row0 + (size_t)j * stride + 2;
            kvq__attend_query(c, q, p, i, h, qh, nh, lo, hi, st, NULL);
            for (j = 0; j < nh; j++) {
                row0[(size_t)j * stride] = st[j].m;
                row0[(size_t)j * stride + 1] = st[j].l;
            }
        }
}

KVQ_API kvq_status kvq_attention_partial(kvq_cache *c, const float *q, const kvq_attn_params *p, int tok_first,
                                         int tok_end, int kv_first, int kv_end, float *state) {
    kvq_status s;
    size_t stride;
    int group, h;
    if (!state) return KVQ_ERR_INVALID;
    if ((s = kvq__check_attn(c, q, p)) != KVQ_OK) return s;
    if (tok_first < 0 || tok_first > tok_end || tok_end > c->n_tokens) return KVQ_ERR_INVALID;
    if (kv_first < 0 || kv_first >= kv_end || kv_end > c->cfg.n_kv_heads) return KVQ_ERR_INVALID;
    {
        size_t sb = kvq_attention_state_floats(c, p) * sizeof(float);
        if (kvq__overlap(q, kvq__q_bytes(c, p), state, sb) || kvq__overlaps_cache(c, state, sb)) return KVQ_ERR_INVALID;
    }
    stride = (size_t)c->cfg.head_dim + 2;
    group = p->n_q_heads / c->cfg.n_kv_heads;
    for (h = kv_first; h < kv_end; h++) /* head h's rows start at query head h * group */
        kvq__partial_head(c, q, p, h, tok_first, tok_end, state + (size_t)h * group * stride,
                          (size_t)p->n_q_heads * stride);
    return KVQ_OK;
}

/* Whether some state saw a token of the row at offset `at` (its sum l > 0). */
static int kvq__row_seen(const float *const *states, int n_states, size_t at) {
    int k;
    for (k = 0; k < n_states; k++)
        if (states[k][at + 1] > 0.0f) return 1;
    return 0;
}

/* The row at offset `at` of n_states states, merged and normalized into o[D]: with m the
   largest max, o = sum_k exp(m_k - m) acc_k / sum_k exp(m_k - m) l_k. States that saw no
   token of the row (l = 0) count for nothing; at least one saw one. */
static void kvq__merge_row(const float *const *states, int n_states, size_t at, int D, float *o) {
    float m = -INFINITY, l = 0.0f;
    int k, ch;
    for (k = 0; k < n_states; k++) {
        float mk = states[k][at];
        m = mk > m ? mk : m;
    }
    for (ch = 0; ch < D; ch++) o[ch] = 0.0f;
    for (k = 0; k < n_states; k++) {
        const float *sk = states[k] + at;
        float w;
        if (!(sk[1] > 0.0f)) continue; /* this state saw no token of the row */
        w = expf(sk[0] - m);
        l += w * sk[1];
        for (ch = 0; ch < D; ch++) o[ch] += w * sk[2 + ch];
    }
    for (ch = 0; ch < D; ch++) o[ch] /= l;
}

KVQ_API kvq_status kvq_attention_merge(const kvq_cache *c, const kvq_attn_params *p, const float *const *states,
                                       int n_states, float *out) {
    size_t rows, r, stride;
    int D, k;
    if (!c || !p || !states || !out || n_states < 1) return KVQ_ERR_INVALID;
    if (kvq_attention_state_floats(c, p) == 0 || p->n_q_heads % c->cfg.n_kv_heads) return KVQ_ERR_INVALID;
    D = c->cfg.head_dim;
    stride = (size_t)D + 2;
    rows = (size_t)p->n_queries * p->n_q_heads;
    if (kvq__overlaps_cache(c, out, rows * D * sizeof(float))) return KVQ_ERR_INVALID;
    for (k = 0; k < n_states; k++) /* out is written while states are read: no overlap */
        if (!states[k] || kvq__overlap(states[k], kvq_attention_state_floats(c, p) * sizeof(float), out,
                                       rows * D * sizeof(float)))
            return KVQ_ERR_INVALID;
    for (r = 0; r < rows; r++) /* every row seen by some state, or nothing is written */
        if (!kvq__row_seen(states, n_states, r * stride)) return KVQ_ERR_INVALID;
    for (r = 0; r < rows; r++) kvq__merge_row(states, n_states, r * stride, D, out + r * D);
    kvq__unrotate_rows(c, out, rows);
    return KVQ_OK;
}

KVQ_API kvq_status kvq_attention_state_init(const kvq_cache *c, const kvq_attn_params *p, float *state) {
    size_t rows, r, stride;
    if (!state || kvq_attention_state_floats(c, p) == 0) return KVQ_ERR_INVALID;
    stride = (size_t)c->cfg.head_dim + 2;
    rows = (size_t)p->n_queries * p->n_q_heads;
    for (r = 0; r < rows; r++) {
        state[r * stride] = -INFINITY;
        memset(state + r * stride + 1, 0, (stride - 1) * sizeof(float));
    }
    return KVQ_OK;
}

/* ---------------------------------------------------------------------------
   Batched attention: many sequences, one cache each, spread over a caller's
   threads. The work of a batch is a line of rows, one per (sequence, KV head),
   each as long as its sequence's tokens; the line is cut into n_threads equal
   shares (tokens x KV heads), each cut moved to the nearest tile boundary of
   its row. A row that one thread runs whole is written to out directly, as
   kvq_attention writes it; a row that a cut splits runs as partial states
   (token ranges) that the thread holding the row's last piece merges after
   the caller's barrier. Each thread starts at one cut, so it ends at most one
   split row: merging is one row per thread at most. n_threads - 1 cuts split
   at most n_threads - 1 rows into at most 2 (n_threads - 1) pieces.
   --------------------------------------------------------------------------- */

#define KVQ__BATCH_MAGIC 0x6b767162u   /* "kvqb": a planned batch */
#define KVQ__BATCH_MAX_THREADS (1 << 16)

typedef struct kvq__piece {
    int seq, h, t0, t1; /* tokens [t0, t1) of KV head h of sequence seq */
    int thread;
    int state;          /* its partial state; -1: the whole row, written to out directly */
} kvq__piece;

typedef struct kvq__merge_job {
    int seq, h, piece0, n_pieces; /* the row's pieces [piece0, piece0 + n_pieces); 0: no job */
} kvq__merge_job;

struct kvq_batch {
    uint32_t magic;
    int n_seqs, n_threads, n_states, D, H, group;
    kvq_attn_params p;
    size_t state_floats;           /* one piece's state: [n_queries][group][D + 2] */
    const kvq_cache **caches;      /* [n_seqs] */
    const float **q;               /* [n_seqs] */
    float **out;                   /* [n_seqs] */
    int *tokens;                   /* [n_seqs] tokens at planning; the calls check they still hold */
    kvq__piece *pieces;            /* in line order, so by thread */
    int *first_piece;              /* [n_threads + 1]: thread k runs pieces [first[k], first[k + 1]) */
    kvq__merge_job *merge;         /* [n_threads] */
    const float **state_at;        /* [n_states] */
    float *states;                 /* [n_states][state_floats] */
};

typedef struct kvq__batch_layout {
    size_t off_caches, off_q, off_out, off_tokens, off_pieces, off_first, off_merge, off_state_at, off_states;
    size_t state_floats, total;
    int max_pieces, max_states;
} kvq__batch_layout;

/* The plan's arrays after its struct; 0 when the arguments are out of range or a size
   overflows. */
static int kvq__batch_plan_layout(const kvq_config *shape, const kvq_attn_params *p, int n_seqs, int n_threads,
                                  kvq__batch_layout *L) {
    size_t end = sizeof(struct kvq_batch), pieces;
    int ok = 1;
    if (!shape || !p || n_seqs < 1 || n_threads < 1 || n_threads > KVQ__BATCH_MAX_THREADS) return 0;
    if (shape->head_dim < 8 || shape->head_dim > 512 || shape->head_dim % 8 || shape->n_kv_heads < 1) return 0;
    if (p->n_q_heads < shape->n_kv_heads || p->n_q_heads % shape->n_kv_heads || p->n_q_heads > 1 << 20 ||
        p->n_queries < 1 || p->n_queries > KVQ__MAX_TOKENS)
        return 0;
    pieces = kvq__add(kvq__mul((size_t)n_seqs, (size_t)shape->n_kv_heads, &ok), (size_t)n_threads - 1, &ok);
    if (!ok || pieces > INT_MAX) return 0;
    L->max_pieces = (int)pieces;       /* every row once, plus one piece per cut */
    L->max_states = 2 * (n_threads - 1); /* a split row has one piece more than the cuts inside it */
    L->state_floats = kvq__mul(kvq__mul((size_t)p->n_queries, (size_t)(p->n_q_heads / shape->n_kv_heads), &ok),
                               (size_t)shape->head_dim + 2, &ok);
    L->off_caches = kvq__place(&end, (size_t)n_seqs, sizeof(kvq_cache *), &ok);
    L->off_q = kvq__place(&end, (size_t)n_seqs, sizeof(float *), &ok);
    L->off_out = kvq__place(&end, (size_t)n_seqs, sizeof(float *), &ok);
    L->off_tokens = kvq__place(&end, (size_t)n_seqs, sizeof(int), &ok);
    L->off_pieces = kvq__place(&end, pieces, sizeof(kvq__piece), &ok);
    L->off_first = kvq__place(&end, (size_t)n_threads + 1, sizeof(int), &ok);
    L->off_merge = kvq__place(&end, (size_t)n_threads, sizeof(kvq__merge_job), &ok);
    L->off_state_at = kvq__place(&end, (size_t)L->max_states, sizeof(float *), &ok);
    L->off_states = kvq__place(&end, (size_t)L->max_states, kvq__mul(L->state_floats, sizeof(float), &ok), &ok);
    L->total = kvq__add(end, KVQ__ALIGN, &ok); /* slack to align the caller's pointer */
    return ok;
}

KVQ_API size_t kvq_batch_plan_bytes(const kvq_config *shape, const kvq_attn_params *p, int n_seqs, int n_threads) {
    kvq__batch_layout L;
    return kvq__batch_plan_layout(shape, p, n_seqs, n_threads, &L) ? L.total : 0;
}

/* Every argument of a plan, before anything is written: the caches share head_dim and
   n_kv_heads, each sequence's queries pass kvq_attention's checks, and no output overlaps
   another output, any query, any cache or the plan's memory [mem, mem + bytes), which no
   query, cache or pointer array may overlap either. Pairs are compared: O(n_seqs^2). */
static kvq_status kvq__check_batch(void *mem, size_t bytes, kvq_cache *const *caches, const float *const *q,
                                   float *const *out, int n_seqs, const kvq_attn_params *p) {
    const size_t arr = (size_t)n_seqs * sizeof(void *);
    kvq_status st;
    int s, u;
    if (kvq__overlap(mem, bytes, caches, arr) || kvq__overlap(mem, bytes, q, arr) || kvq__overlap(mem, bytes, out, arr))
        return KVQ_ERR_INVALID;
    for (s = 0; s < n_seqs; s++) {
        const kvq_cache *c = caches[s];
        if (!c || !out[s] || c->cfg.head_dim != caches[0]->cfg.head_dim ||
            c->cfg.n_kv_heads != caches[0]->cfg.n_kv_heads)
            return KVQ_ERR_INVALID;
        if ((st = kvq__check_attn(c, q[s], p)) != KVQ_OK) return st;
        if (kvq__overlaps_cache(c, mem, bytes) || kvq__overlap(q[s], kvq__q_bytes(c, p), mem, bytes) ||
            kvq__overlap(out[s], kvq__q_bytes(c, p), mem, bytes))
            return KVQ_ERR_INVALID;
    }
    for (s = 0; s < n_seqs; s++) { /* one size for all: the shapes agree */
        const size_t n = kvq__q_bytes(caches[0], p);
        for (u = 0; u < n_seqs; u++)
            if (kvq__overlap(out[s], n, q[u], n) || (u != s && kvq__overlap(out[s], n, out[u], n)) ||
                kvq__overlaps_cache(caches[u], out[s], n))
                return KVQ_ERR_INVALID;
    }
    return KVQ_OK;
}

/* The tile boundary nearest token t of a T-token row of cache c (kvq__tile_end's): every G tokens
   from 0 inside the sinks, at the sinks' end, every span (kvq__block_span) from there inside the
   key blocks, at their end, every G tokens after it (the ring), and at T. Boundaries lie at most
   a span apart, so a cut moves by at most half a span, no piece starts inside a key block (which
   the kernels score whole: each piece would pay for all of it), and a split row tiles as the
   whole row does (the integer scheme quantizes weights per tile). Monotone in t. */
static int kvq__snap_cut(const kvq_cache *c, int t, int T) {
    const int S = c->cfg.sink_tokens, G = c->kb, B = S + c->n_kblocks * G;
    const int step = t < S ? G : t < B ? kvq__block_span(c) : G, base = t < S ? 0 : t < B ? S : B;
    const int a = base + (t - base) / step * step;
    int b = a + step;
    if (t < S && b > S) b = S;
    if (t >= S && t < B && b > B) b = B;
    if (b > T) b = T;
    return t - a <= b - t ? a : b;
}

/* Cut k of n on a line of W units: floor(k W / n), without overflowing k W. */
static uint64_t kvq__ideal_cut(uint64_t W, int k, int n) {
    return W / (uint64_t)n * (uint64_t)k + W % (uint64_t)n * (uint64_t)k / (uint64_t)n;
}

static void kvq__add_piece(kvq_batch *b, int *n, int seq, int h, int t0, int t1, int thread) {
    kvq__piece *pc = &b->pieces[(*n)++];
    pc->seq = seq;
    pc->h = h;
    pc->t0 = t0;
    pc->t1 = t1;
    pc->thread = thread;
    pc->state = -1;
}

/* The pieces of the line, in order, each given to the thread whose share holds it. */
static void kvq__batch_cut(kvq_batch *b) {
    uint64_t W = 0, o = 0;
    int s, h, k = 1, thread = 0, n = 0, u;
    for (s = 0; s < b->n_seqs; s++) W += (uint64_t)b->H * (uint64_t)b->tokens[s];
    b->first_piece[0] = 0;
    for (s = 0; s < b->n_seqs; s++)
        for (h = 0; h < b->H; h++) {
            const int T = b->tokens[s];
            int t = 0, row0 = n;
            for (; k < b->n_threads && kvq__ideal_cut(W, k, b->n_threads) < o + (uint64_t)T; k++) {
                const int x = kvq__snap_cut(b->caches[s], (int)(kvq__ideal_cut(W, k, b->n_threads) - o), T);
                if (x > t) { /* the part of the row before the cut, to the thread before it */
                    kvq__add_piece(b, &n, s, h, t, x, thread);
                    t = x;
                }
                for (u = thread + 1; u <= k; u++) b->first_piece[u] = n;
                thread = k;
            }
            if (t < T) kvq__add_piece(b, &n, s, h, t, T, thread);
            if (n - row0 > 1) { /* split: partial states, merged by the thread of the last piece */
                kvq__merge_job *job = &b->merge[b->pieces[n - 1].thread];
                KVQ_ASSERT(job->n_pieces == 0 && b->n_states + n - row0 <= 2 * (b->n_threads - 1));
                job->seq = s;
                job->h = h;
                job->piece0 = row0;
                job->n_pieces = n - row0;
                for (u = row0; u < n; u++) b->pieces[u].state = b->n_states++;
            }
            o += (uint64_t)T;
        }
    for (u = thread + 1; u <= b->n_threads; u++) b->first_piece[u] = n;
}

KVQ_API kvq_status kvq_batch_plan(kvq_batch **plan, void *mem, size_t mem_bytes, kvq_cache *const *caches,
                                  const float *const *q, float *const *out, int n_seqs, const kvq_attn_params *p,
                                  int n_threads) {
    kvq__batch_layout L;
    kvq_status st;
    uint8_t *base;
    kvq_batch *b;
    int s, k;
    if (!plan || !mem || !caches || !q || !out || !p || n_seqs < 1 || !caches[0]) return KVQ_ERR_INVALID;
    if (!kvq__batch_plan_layout(&caches[0]->cfg, p, n_seqs, n_threads, &L)) return KVQ_ERR_INVALID;
    if (mem_bytes < L.total) return KVQ_ERR_BUFFER;
    if ((st = kvq__check_batch(mem, L.total, caches, q, out, n_seqs, p)) != KVQ_OK) return st;
    base = (uint8_t *)mem + ((KVQ__ALIGN - ((uintptr_t)mem & (KVQ__ALIGN - 1))) & (KVQ__ALIGN - 1));
    b = (kvq_batch *)(void *)base;
    memset(b, 0, sizeof *b);
    b->n_seqs = n_seqs;
    b->n_threads = n_threads;
    b->D = caches[0]->cfg.head_dim;
    b->H = caches[0]->cfg.n_kv_heads;
    b->group = p->n_q_heads / b->H;
    b->p = *p;
    b->state_floats = L.state_floats;
    b->caches = (const kvq_cache **)(void *)(base + L.off_caches);
    b->q = (const float **)(void *)(base + L.off_q);
    b->out = (float **)(void *)(base + L.off_out);
    b->tokens = (int *)(void *)(base + L.off_tokens);
    b->pieces = (kvq__piece *)(void *)(base + L.off_pieces);
    b->first_piece = (int *)(void *)(base + L.off_first);
    b->merge = (kvq__merge_job *)(void *)(base + L.off_merge);
    b->state_at = (const float **)(void *)(base + L.off_state_at);
    b->states = (float *)(void *)(base + L.off_states);
    for (s = 0; s < n_seqs; s++) {
        b->caches[s] = caches[s];
        b->q[s] = q[s];
        b->out[s] = out[s];
        b->tokens[s] = caches[s]->n_tokens;
    }
    memset(b->merge, 0, (size_t)n_threads * sizeof(kvq__merge_job));
    kvq__batch_cut(b);
    for (k = 0; k < b->n_states; k++) { /* empty rows (m = -inf, l = 0) until a thread fills them */
        float *sk = b->states + (size_t)k * b->state_floats;
        size_t r;
        b->state_at[k] = sk;
        for (r = 0; r < b->state_floats; r += (size_t)b->D + 2) {
            sk[r] = -INFINITY;
            memset(sk + r + 1, 0, ((size_t)b->D + 1) * sizeof(float));
        }
    }
    b->magic = KVQ__BATCH_MAGIC;
    *plan = b;
    return KVQ_OK;
}

/* A planned batch, a thread of it, and caches that hold the tokens they held at planning
   (for thread k's pieces from piece p0 to p1). */
static int kvq__batch_thread_ok(const kvq_batch *b, int k) {
    int i;
    if (!b || b->magic != KVQ__BATCH_MAGIC || k < 0 || k >= b->n_threads) return 0;
    for (i = b->first_piece[k]; i < b->first_piece[k + 1]; i++)
        if (b->caches[b->pieces[i].seq]->n_tokens != b->tokens[b->pieces[i].seq]) return 0;
    return 1;
}

/* Rows i * n_q_heads + h * group .. + group of out: the query heads of KV head h, query i. */
static float *kvq__batch_rows(const kvq_batch *b, int seq, int h, int i) {
    return b->out[seq] + ((size_t)i * b->p.n_q_heads + (size_t)h * b->group) * b->D;
}

KVQ_API kvq_status kvq_batch_attention(kvq_batch *b, int thread_index) {
    int n, i;
    if (!b || !kvq__batch_thread_ok(b, thread_index)) return KVQ_ERR_INVALID;
    for (n = b->first_piece[thread_index]; n < b->first_piece[thread_index + 1]; n++) {
        const kvq__piece *pc = &b->pieces[n];
        const kvq_cache *c = b->caches[pc->seq];
        if (pc->state < 0) { /* the whole row: kvq_attention's code for it, then back to the caller's space */
            kvq__attend_head(c, b->q[pc->seq], b->out[pc->seq], &b->p, pc->h, NULL);
            for (i = 0; i < b->p.n_queries; i++)
                kvq__unrotate_rows(c, kvq__batch_rows(b, pc->seq, pc->h, i), (size_t)b->group);
        } else {
            kvq__partial_head(c, b->q[pc->seq], &b->p, pc->h, pc->t0, pc->t1,
                              b->states + (size_t)pc->state * b->state_floats, (size_t)b->group * (b->D + 2));
        }
    }
    return KVQ_OK;
}

/* Whether every piece of a merge job that sees a token of a query has run: its state rows of
   that query have l > 0 (planning left them at 0). Piece [t0, t1) sees a token of query i
   when t0 < T - n_queries + i + 1 (the query's causal limit). */
static int kvq__batch_job_ran(const kvq_batch *b, const kvq__merge_job *job) {
    const size_t stride = (size_t)b->D + 2;
    int u, i, j;
    for (u = job->piece0; u < job->piece0 + job->n_pieces; u++) {
        const kvq__piece *pc = &b->pieces[u];
        const float *st = b->state_at[pc->state];
        for (i = 0; i < b->p.n_queries; i++)
            for (j = 0; j < b->group && pc->t0 < b->tokens[pc->seq] - b->p.n_queries + i + 1; j++)
                if (!(st[((size_t)i * b->group + j) * stride + 1] > 0.0f)) return 0;
    }
    return 1;
}

KVQ_API kvq_status kvq_batch_merge(kvq_batch *b, int thread_index) {
    const kvq__merge_job *job;
    const float *const *states;
    size_t stride;
    int i, j;
    /* the job's row ends in this thread's first piece, whose cache the check covers */
    if (!b || !kvq__batch_thread_ok(b, thread_index)) return KVQ_ERR_INVALID;
    job = &b->merge[thread_index];
    if (job->n_pieces == 0) return KVQ_OK;
    if (!kvq__batch_job_ran(b, job)) return KVQ_ERR_INVALID; /* merged before an attention call */
    stride = (size_t)b->D + 2;
    states = b->state_at + b->pieces[job->piece0].state; /* a row's pieces have consecutive states */
    for (i = 0; i < b->p.n_queries; i++) {
        float *rows = kvq__batch_rows(b, job->seq, job->h, i);
        for (j = 0; j < b->group; j++)
            kvq__merge_row(states, job->n_pieces, ((size_t)i * b->group + j) * stride, b->D, rows + (size_t)j * b->D);
        kvq__unrotate_rows(b->caches[job->seq], rows, (size_t)b->group);
    }
    return KVQ_OK;
}

/* ---------------------------------------------------------------------------
   Serialization. Image (format version 2), all integers little-endian:
     0   char[8]  "KVQCACHE"
     8   u32      format version (2)
     12  u32      header bytes (160)
     16  i32[24]  config: head_dim, n_kv_heads, max_tokens, key_bits, value_bits,
                  group_size, residual_tokens, sink_tokens, rotation, seed,
                  salient_ratio (f32 bits), salient_bits, salient_policy, key_axis,
                  range_search, key_block, value_param_bits, rollback_tokens, then 0s
     112 i32      tokens stored
     116 i32      quantized key blocks per head, 120 i32 quantized values per head
     124 u32      0
     128 u64      payload bytes
     136 u32      CRC32C of the payload
     140 u32[4]   0
     156 u32      CRC32C of bytes [0, 156)
     160 payload: per KV head: sink K rows, sink V rows, key blocks, waiting keys
         (oldest first), quantized values (params then codes per token), waiting
         values; every fp16 as u16 little-endian. docs/format.md draws each record.
   The rollback history is not in the image (it holds no token): a loaded cache starts with
   none, so truncating it is a deep cut until it has appended.
   Version 1 images (kvq 0.2, 128-byte header, 3-bit codes straddling bytes) are refused
   with KVQ_ERR_UNSUPPORTED: save them again from the cache that made them.
   The block counts are derived again from the token count and checked, so an
   image can only describe a state that appending could have produced.
   --------------------------------------------------------------------------- */

static const uint8_t kvq__magic[8] = {'K', 'V', 'Q', 'C', 'A', 'C', 'H', 'E'}; /* no NUL: 8 bytes */
/* Fuzzing builds skip the checksums, so the fuzzer reaches the checks behind them. */
#ifdef FUZZING_BUILD_MODE_UNSAFE_FOR_PRODUCTION
#define KVQ__FUZZING 1
#else
#define KVQ__FUZZING 0
#endif
#define KVQ__FORMAT_VERSION 2u
#define KVQ__HEADER_BYTES 160u
enum { KVQ__H_CONFIG = 16, KVQ__H_CONFIG_USED = 18 * 4, KVQ__H_TOKENS = 112, KVQ__H_KBLOCKS = 116,
       KVQ__H_VQUANT = 120, KVQ__H_PAYLOAD = 128, KVQ__H_PAYLOAD_CRC = 136, KVQ__H_CRC = 156 };

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
    int after = n > cfg->sink_tokens ? n - cfg->sink_tokens : 0, G = kvq__kb(cfg), R = cfg->residual_tokens;
    int k = 0;
    if (after > R && after >= G) k = (after - (R > G - 1 ? R : G - 1) + G - 1) / G;
    if (cfg->key_axis == KVQ_KEYS_PER_TOKEN) k = 0; /* no blocks: keys leave with their values */
    *nkb = k;
    *nvq = kvq__salient_count(cfg) ? k * G : (after > R ? after - R : 0);
}

/* The payload, per KV head, in image order: runs of records of these kinds. Each record is
   one to three parts, n elements of 1, 2 or 4 bytes (little-endian in the image); the same
   list of records serves writing, reading, checking and sizing an image. */
enum { KVQ__R_SINK_K, KVQ__R_SINK_V, KVQ__R_KEY_BLOCK, KVQ__R_KEY_TOKEN, KVQ__R_RING_K, KVQ__R_VALUE,
       KVQ__R_RING_V, KVQ__R_SIDE, KVQ__R_SALIENCE, KVQ__R_KINDS };
enum { KVQ__COUNT, KVQ__TO_IMAGE, KVQ__FROM_IMAGE, KVQ__CHECK };

typedef struct kvq__part { void *p; size_t n; int width; } kvq__part;

/* Records [*first, *end) of a kind, for the counts of c (the same for every head). */
static void kvq__record_range(const kvq_cache *c, int kind, int *first, int *end) {
    const int after = kvq__after_sinks(c), waiting_keys = c->n_kblocks * c->kb;
    *first = 0;
    switch (kind) {
    case KVQ__R_SINK_K: case KVQ__R_SINK_V: *end = c->n_tokens - after; break;
    case KVQ__R_KEY_BLOCK: *end = c->n_kblocks; break;
    case KVQ__R_KEY_TOKEN: *end = c->n_ktok; break;
    case KVQ__R_RING_K: *first = kvq__keys_quantized(c); *end = after; break;
    case KVQ__R_VALUE: *end = c->n_vquant; break;
    case KVQ__R_RING_V: *first = c->n_vquant; *end = after; break;
    case KVQ__R_SIDE: *end = c->n_kblocks * c->n_salient; break;
    default: /* attention received by the waiting keys (salient caches) */
        *first = c->n_salient ? waiting_keys : 0;
        *end = c->n_salient ? after : 0;
        break;
    }
}

/* The parts of record i of head h of a kind. Without locate (a probe cache with no memory)
   only the sizes are filled: the pointers, never computed, stay NULL. */
#define KVQ__PART(ptr, count, w) (pt[np].p = locate ? (void *)(ptr) : NULL, pt[np].n = (count), pt[np].width = (w), np++)
static int kvq__record_parts(const kvq_cache *c, int kind, int h, int i, int locate, kvq__part *pt) {
    const size_t D = (size_t)c->cfg.head_dim;
    const size_t slot = (size_t)h * c->kcap + (size_t)(i % (c->kcap ? c->kcap : 1));
    const kvq__format *kf = kvq__fmt(c->cfg.key_bits), *vf = kvq__fmt(c->cfg.value_bits);
    const kvq__format *sf = kvq__fmt(c->cfg.salient_bits);
    size_t n16, kpar;
    int np = 0;
    switch (kind) {
    case KVQ__R_SINK_K: KVQ__PART(kvq__sink_row(c, c->sink_k, h, i), D, 2); break;
    case KVQ__R_SINK_V: KVQ__PART(kvq__sink_row(c, c->sink_v, h, i), D, 2); break;
    case KVQ__R_RING_K: KVQ__PART(kvq__ring_k_row(c, h, i), D, 2); break;
    case KVQ__R_RING_V: KVQ__PART(kvq__ring_v_row(c, h, i), D, 2); break;
    case KVQ__R_KEY_BLOCK: /* fp16 scale[D], min[D], then codes; at 16 bits no params, G fp16 rows */
        kpar = D * (size_t)kf->param_bytes;
        KVQ__PART(kvq__key_block(c, h, i), kpar / 2, 2);
        KVQ__PART(kvq__key_block(c, h, i) + kpar, (c->kblock_bytes - kpar) / (size_t)kf->width, kf->width);
        break;
    case KVQ__R_KEY_TOKEN: /* params then codes, like values */
        KVQ__PART(kvq__key_token_params(c, h, i), c->ktparam_bytes / 2, 2);
        KVQ__PART(kvq__key_token_codes(c, h, i), c->ktcode_bytes / (size_t)kf->width, kf->width);
        break;
    case KVQ__R_VALUE:
        KVQ__PART(kvq__value_params(c, h, i), c->vparam_bytes / 2, 2);
        KVQ__PART(kvq__value_codes(c, h, i), c->vcode_bytes / (size_t)vf->width, vf->width);
        break;
    case KVQ__R_SIDE: /* u16 index and params (or fp16 rows), then code bytes */
        n16 = (sf->width == 2 ? c->side_bytes : kvq__side_codes_at(c, 0)) / 2;
        KVQ__PART(kvq__side_entry(c, h, i / c->n_salient, i % c->n_salient), n16, 2);
        KVQ__PART(kvq__side_entry(c, h, i / c->n_salient, i % c->n_salient) + 2 * n16, c->side_bytes - 2 * n16, 1);
        break;
    default: /* f32 score, u32 count of queries */
        KVQ__PART(c->sal_score + slot, 1, 4);
        KVQ__PART(c->sal_seen + slot, 1, 4);
        break;
    }
    return np;
}
#undef KVQ__PART

/* Copies one part from the cache into an image, or (out NULL) from image in into the cache;
   little-endian in the image. */
static void kvq__xfer_part(const kvq__part *pt, uint8_t *out, const uint8_t *in) {
    uint8_t *a = (uint8_t *)pt->p;
    size_t i;
    int b;
    if (pt->width == 1) {
        if (out) memcpy(out, a, pt->n);
        else memcpy(a, in, pt->n);
        return;
    }
    for (i = 0; i < pt->n; i++, a += pt->width) {
        uint32_t u = 0;
        if (out) {
            if (pt->width == 2) { uint16_t x; memcpy(&x, a, 2); u = x; } else memcpy(&u, a, 4);
            for (b = 0; b < pt->width; b++) out[i * pt->width + b] = (uint8_t)(u >> 8 * b);
        } else {
            for (b = 0; b < pt->width; b++) u |= (uint32_t)in[i * pt->width + b] << 8 * b;
            if (pt->width == 2) { uint16_t x = (uint16_t)u; memcpy(a, &x, 2); } else memcpy(a, &u, 4);
        }
    }
}

/* Validation of an image's records: only a state that appending could have produced loads.
   fp16 rows are finite; a group's fp16 scale is >= 0 and at most what the widest range
   append accepts gives, (65504 - -65504) / (2^b - 1), its min finite, and min + scale *
   (2^b - 1) <= 2 * 65504; side-store indices lie in the block and ascend; salience scores
   are finite and >= 0, and 0 where no query has seen the key. So every dequantized element
   has |x| <= 2^17, which bounds attention's arithmetic (see kvq__check_attn). */
static uint16_t kvq__img_u16(const uint8_t *p) { return (uint16_t)(p[0] | p[1] << 8); }
static int kvq__f16_finite(uint16_t h) { return (h & 0x7c00u) != 0x7c00u; }
static int kvq__img_rows_ok(const uint8_t *p, size_t n) {
    size_t i;
    for (i = 0; i < n; i++)
        if (!kvq__f16_finite(kvq__img_u16(p + 2 * i))) return 0;
    return 1;
}
/* n scales then n mins of b-bit groups */
static int kvq__img_params_ok(const uint8_t *p, size_t n, int bits) {
    const float levels = (float)kvq__fmt(bits)->levels;
    const uint16_t top = kvq__f32_to_f16(2.0f * KVQ__FP16_MAX / levels);
    size_t g;
    for (g = 0; g < n; g++) {
        uint16_t s = kvq__img_u16(p + 2 * g), m = kvq__img_u16(p + 2 * (n + g));
        if (s > top || !kvq__f16_finite(m)) return 0; /* s > top also catches a sign bit, inf, NaN */
        if ((double)kvq__f16_to_f32(m) + (double)kvq__f16_to_f32(s) * (double)levels > 2.0 * (double)KVQ__FP16_MAX)
            return 0;
    }
    return 1;
}
/* n packed 16-bit params of b-bit groups: a finite scale and |x'| <= 2 * 65504 at both ends. */
static int kvq__img_params16_ok(const uint8_t *p, size_t n, int bits) {
    size_t g;
    for (g = 0; g < n; g++) {
        const unsigned e = p[2 * g], m8 = p[2 * g + 1];
        double m, top;
        if (e > 0xf7u) return 0;
        m = (double)kvq__min16(e, m8);
        top = m + (double)kvq__e5m3(e) * (double)kvq__fmt(bits)->levels;
        if (m < -2.0 * (double)KVQ__FP16_MAX || top > 2.0 * (double)KVQ__FP16_MAX) return 0;
    }
    return 1;
}
static int kvq__record_ok(const kvq_cache *c, int kind, int i, const uint8_t *p, int *prev_index) {
    const size_t D = (size_t)c->cfg.head_dim, G = (size_t)c->kb;
    const size_t ng = (size_t)kvq__value_groups(&c->cfg);
    const int kbits = c->cfg.key_bits, vbits = c->cfg.value_bits, sbits = c->cfg.salient_bits;
    switch (kind) { /* quantized records start with their params, plain ones are fp16 rows */
    case KVQ__R_KEY_BLOCK:
        return kvq__fmt(kbits)->quantized ? kvq__img_params_ok(p, D, kbits) : kvq__img_rows_ok(p, G * D);
    case KVQ__R_KEY_TOKEN:
        return kvq__fmt(kbits)->quantized ? kvq__img_params_ok(p, ng, kbits) : kvq__img_rows_ok(p, D);
    case KVQ__R_VALUE:
        if (!kvq__fmt(vbits)->quantized) return kvq__img_rows_ok(p, D);
        return kvq__vpb(&c->cfg) == 16 ? kvq__img_params16_ok(p, ng, vbits) : kvq__img_params_ok(p, ng, vbits);
    case KVQ__R_SIDE: {
        int idx = kvq__img_u16(p);
        if (idx >= (int)G || (i % c->n_salient && idx <= *prev_index)) return 0;
        *prev_index = idx;
        if (!kvq__fmt(sbits)->quantized) return kvq__img_rows_ok(p + 2, 2 * D);
        return kvq__img_params_ok(p + 2, ng, sbits) && kvq__img_params_ok(p + kvq__side_params_at(c, 1), ng, sbits);
    }
    case KVQ__R_SALIENCE: {
        uint32_t score = kvq__get_u32(p), seen = kvq__get_u32(p + 4);
        return score < 0x7f800000u && (seen || score == 0); /* finite, no sign bit */
    }
    default: return kvq__img_rows_ok(p, D); /* sinks and waiting rows */
    }
}

/* Walks the payload of c in image order: copies it into out (KVQ__TO_IMAGE) or from in
   (KVQ__FROM_IMAGE), checks in's records (KVQ__CHECK: *ok cleared at the first bad one), or
   only counts the bytes (KVQ__COUNT). */
static size_t kvq__walk_payload(const kvq_cache *c, uint8_t *out, const uint8_t *in, int mode, int *ok) {
    const int locate = mode == KVQ__TO_IMAGE || mode == KVQ__FROM_IMAGE;
    kvq__part pt[3];
    size_t at = 0, bytes;
    int h, kind, i, k, np, first, end, prev_index = -1;
    for (h = 0; h < c->cfg.n_kv_heads; h++)
        for (kind = 0; kind < KVQ__R_KINDS; kind++) {
            kvq__record_range(c, kind, &first, &end);
            if (first >= end) continue;
            np = kvq__record_parts(c, kind, h, first, locate, pt);
            for (k = 0, bytes = 0; k < np; k++) bytes += pt[k].n * (size_t)pt[k].width;
            if (mode == KVQ__COUNT) { /* every record of a kind has one size */
                at += bytes * (size_t)(end - first);
                continue;
            }
            for (i = first; i < end; i++) {
                if (mode == KVQ__CHECK && !kvq__record_ok(c, kind, i, in + at, &prev_index)) {
                    *ok = 0;
                    return at;
                }
                if (locate) {
                    np = kvq__record_parts(c, kind, h, i, 1, pt);
                    for (k = 0; k < np; k++) {
                        kvq__xfer_part(&pt[k], out ? out + at : NULL, in ? in + at : NULL);
                        at += pt[k].n * (size_t)pt[k].width;
                    }
                } else {
                    at += bytes;
                }
            }
        }
    return at;
}

/* Streams the payload of cache c to (to_image) or from an image; with img == NULL it only
   counts the bytes. */
static size_t kvq__xfer_payload(const kvq_cache *c, uint8_t *img, int to_image) {
    if (!img) return kvq__walk_payload(c, NULL, NULL, KVQ__COUNT, NULL);
    return to_image ? kvq__walk_payload(c, img, NULL, KVQ__TO_IMAGE, NULL)
                    : kvq__walk_payload(c, NULL, img, KVQ__FROM_IMAGE, NULL);
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
    kvq__put_u32(p + 56, (uint32_t)cfg->range_search);
    kvq__put_u32(p + 60, (uint32_t)cfg->key_block);
    kvq__put_u32(p + 64, (uint32_t)cfg->value_param_bits);
    kvq__put_u32(p + 68, (uint32_t)cfg->rollback_tokens);
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
    cfg.range_search = kvq__i32(p + 56);
    cfg.key_block = kvq__i32(p + 60);
    cfg.value_param_bits = kvq__i32(p + 64);
    cfg.rollback_tokens = kvq__i32(p + 68);
    return cfg;
}

KVQ_API kvq_status kvq_cache_serialize(const kvq_cache *c, void *buf, size_t buf_bytes, size_t *written) {
    uint8_t *p = (uint8_t *)buf;
    size_t need, payload;
    if (!c || !buf) return KVQ_ERR_INVALID;
    need = kvq_cache_serialized_bytes(c);
    if (buf_bytes < need) return KVQ_ERR_BUFFER;
    if (kvq__overlaps_cache(c, buf, need)) return KVQ_ERR_INVALID;
    payload = need - KVQ__HEADER_BYTES;
    memset(p, 0, KVQ__HEADER_BYTES);
    memcpy(p, kvq__magic, 8);
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
    if (n < 16 || memcmp(p, kvq__magic, 8) != 0) return KVQ_ERR_CORRUPT;
    if (kvq__get_u32(p + 8) == 0) return KVQ_ERR_CORRUPT;
    if (kvq__get_u32(p + 8) != KVQ__FORMAT_VERSION) return KVQ_ERR_UNSUPPORTED; /* 1: kvq 0.2's; 3+: a newer kvq's */
    if (n < KVQ__HEADER_BYTES) return KVQ_ERR_CORRUPT;
    if (kvq__crc32c(0, p, KVQ__H_CRC) != kvq__get_u32(p + KVQ__H_CRC) && !KVQ__FUZZING) return KVQ_ERR_CORRUPT;
    if (kvq__get_u32(p + 12) != KVQ__HEADER_BYTES) return KVQ_ERR_CORRUPT;
    for (i = KVQ__H_CONFIG + KVQ__H_CONFIG_USED; i < KVQ__H_CRC; i += 4) /* the zero fields */
        if ((i < KVQ__H_TOKENS || i == KVQ__H_VQUANT + 4 || i > KVQ__H_PAYLOAD_CRC) && kvq__get_u32(p + i) != 0)
            return KVQ_ERR_CORRUPT;
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

KVQ_API kvq_status kvq_serialized_info(const void *bytes, size_t n_bytes, kvq_config *cfg, int *n_tokens) {
    int tokens;
    kvq_config tmp;
    kvq_status st;
    if (!bytes || !cfg || !n_tokens) return KVQ_ERR_INVALID;
    if ((st = kvq__check_header((const uint8_t *)bytes, n_bytes, &tmp, &tokens)) != KVQ_OK) return st;
    *cfg = tmp;
    *n_tokens = tokens;
    return KVQ_OK;
}

KVQ_API kvq_status kvq_serialized_config(const void *bytes, size_t n_bytes, kvq_config *cfg) {
    int tokens;
    return kvq_serialized_info(bytes, n_bytes, cfg, &tokens);
}

/* The sizes and counts of a cache of cfg holding tokens, with no memory: what an image must hold. */
static void kvq__probe(kvq_cache *probe, const kvq_config *cfg, int tokens) {
    memset(probe, 0, sizeof *probe);
    probe->cfg = *cfg;
    probe->n_tokens = tokens;
    kvq__counts_after(cfg, tokens, &probe->n_kblocks, &probe->n_vquant);
    kvq__record_sizes(probe, cfg);
    probe->n_ktok = cfg->key_axis == KVQ_KEYS_PER_TOKEN ? probe->n_vquant : 0;
}

KVQ_API kvq_status kvq_cache_load(kvq_cache **out, const void *bytes, size_t n_bytes, int max_tokens, void *mem,
                                  size_t mem_bytes) {
    const uint8_t *p = (const uint8_t *)bytes;
    kvq_config cfg;
    kvq_cache probe, *c;
    kvq_status st;
    size_t payload;
    int tokens, ok = 1;
    if (!out || !bytes || !mem || max_tokens < 0) return KVQ_ERR_INVALID;
    if (kvq__overlap(bytes, n_bytes, mem, mem_bytes)) return KVQ_ERR_INVALID;
    if ((st = kvq__check_header(p, n_bytes, &cfg, &tokens)) != KVQ_OK) return st;
    if (max_tokens) { /* the caller's capacity; the layout of the payload does not depend on it */
        if (max_tokens < tokens) return KVQ_ERR_FULL;
        cfg.max_tokens = max_tokens;
        if ((st = kvq_config_check(&cfg)) != KVQ_OK) return st; /* e.g. fewer than sink_tokens */
    }
    if (mem_bytes < kvq_cache_bytes(&cfg)) return KVQ_ERR_BUFFER;
    /* the payload size implied by the header must match the one stated, then the checksum,
       then every record's contents */
    kvq__probe(&probe, &cfg, tokens);
    payload = kvq__xfer_payload(&probe, NULL, 0);
    if ((uint64_t)payload != kvq__get_u64(p + KVQ__H_PAYLOAD)) return KVQ_ERR_CORRUPT;
    if (n_bytes - KVQ__HEADER_BYTES < payload) return KVQ_ERR_CORRUPT;
    if (kvq__crc32c(0, p + KVQ__HEADER_BYTES, payload) != kvq__get_u32(p + KVQ__H_PAYLOAD_CRC) && !KVQ__FUZZING)
        return KVQ_ERR_CORRUPT;
    kvq__walk_payload(&probe, NULL, p + KVQ__HEADER_BYTES, KVQ__CHECK, &ok);
    if (!ok) return KVQ_ERR_CORRUPT;
    /* only now is the caller's memory written */
    if ((st = kvq_cache_init(&c, &cfg, mem, mem_bytes)) != KVQ_OK) return st;
    c->n_tokens = tokens;
    c->n_kblocks = probe.n_kblocks;
    c->n_ktok = probe.n_ktok;
    c->n_vquant = probe.n_vquant;
    kvq__walk_payload(c, NULL, p + KVQ__HEADER_BYTES, KVQ__FROM_IMAGE, NULL);
    *out = c;
    return KVQ_OK;
}

KVQ_API kvq_status kvq_cache_deserialize(kvq_cache **out, const void *bytes, size_t n_bytes, void *mem,
                                         size_t mem_bytes) {
    return kvq_cache_load(out, bytes, n_bytes, 0, mem, mem_bytes);
}

/* ---------------------------------------------------------------------------
   Truncate and copy. An append only adds: it stores its rows and quantizes what it pushes
   out of the window into new records, while the pushed-out fp16 rows stay in the rings for
   rollback_tokens more appends (kvq__plan). So cutting the newest n_hist tokens (the
   history) only uncounts: the counts become kvq__counts_after's for the tokens kept, and
   the rows of the tokens that return to the window are still in the rings, bit for bit.
   Between appends only attention changes the cache, through the salience of the waiting
   keys: caches that record it snapshot it before each append of the history, and a
   rollback puts back the snapshot taken before its first cut token. A deeper cut
   re-expresses each kept token that had left the window from its record: dequantized in
   storage space, rounded to fp16 (clamped: a loaded record may reach 2 * 65504), with no
   recorded attention. A copy is the same cut written into another cache, records first.
   --------------------------------------------------------------------------- */

/* The counts of a cache holding n tokens, as appending them one by one leaves them. */
static void kvq__set_tokens(kvq_cache *c, int n) {
    c->n_tokens = n;
    kvq__counts_after(&c->cfg, n, &c->n_kblocks, &c->n_vquant);
    c->n_ktok = kvq__per_token_keys(c) ? c->n_vquant : 0;
}

/* Ring row pos (past the sinks) of dst for a cut of src: src's ring row where src still holds
   it (in_ring: a row still waiting, or any row of a rollback), else the token's record
   re-expressed. dst may be src: a row already in place is left alone. */
static void kvq__cut_row(kvq_cache *dst, const kvq_cache *src, int h, int pos, int is_key, int in_ring) {
    const int D = src->cfg.head_dim;
    uint16_t *to = is_key ? kvq__ring_k_row(dst, h, pos) : kvq__ring_v_row(dst, h, pos);
    float x[512];
    int i;
    if (in_ring) {
        if (dst != src) memcpy(to, is_key ? kvq__ring_k_row(src, h, pos) : kvq__ring_v_row(src, h, pos), (size_t)D * 2);
        return;
    }
    if (is_key) kvq__read_key(src, h, src->cfg.sink_tokens + pos, x);
    else kvq__read_value(src, h, src->cfg.sink_tokens + pos, x);
    for (i = 0; i < D; i++) x[i] = x[i] > KVQ__FP16_MAX ? KVQ__FP16_MAX : x[i] < -KVQ__FP16_MAX ? -KVQ__FP16_MAX : x[i];
    kvq__f16_row(to, x, D);
}

/* Salience of waiting key pos of dst for a cut of src to n tokens: in a rollback (exact), as
   src had it before token n was appended (its snapshot, unless nothing was cut); a key that
   stayed waiting keeps its score; a key re-expressed from its block has none. */
static void kvq__cut_salience(kvq_cache *dst, const kvq_cache *src, int h, int pos, int n, int exact, int in_ring) {
    const size_t from = (size_t)h * src->kcap + (size_t)(pos % src->kcap);
    const size_t to = (size_t)h * dst->kcap + (size_t)(pos % dst->kcap);
    const float *score = src->sal_score;
    const uint32_t *seen = src->sal_seen;
    if (exact && n < src->n_tokens && src->snap_score) {
        const size_t at = (size_t)(n % src->cfg.rollback_tokens) * src->cfg.n_kv_heads * src->kcap;
        score = src->snap_score + at;
        seen = src->snap_seen + at;
    }
    dst->sal_score[to] = in_ring ? score[from] : 0.0f;
    dst->sal_seen[to] = in_ring ? seen[from] : 0u;
}

/* The fp16 window of dst after a cut of src to its first n tokens (exact: within src's
   history): the ring rows of the keys and values past the sinks that wait, and the keys'
   salience. Only a deep cut re-expresses the tokens of records it splits or removes. */
static void kvq__cut_window(kvq_cache *dst, const kvq_cache *src, int n, int exact) {
    const int S = src->cfg.sink_tokens, after = n > S ? n - S : 0, kq_src = kvq__keys_quantized(src);
    int nkb, nvq, kq, h, pos;
    kvq__counts_after(&src->cfg, n, &nkb, &nvq);
    kq = kvq__per_token_keys(src) ? nvq : nkb * src->kb;
    for (h = 0; h < src->cfg.n_kv_heads; h++) {
        for (pos = kq; pos < after; pos++) {
            kvq__cut_row(dst, src, h, pos, 1, exact || pos >= kq_src);
            if (src->n_salient) kvq__cut_salience(dst, src, h, pos, n, exact, exact || pos >= kq_src);
        }
        for (pos = nvq; pos < after; pos++) kvq__cut_row(dst, src, h, pos, 0, exact || pos >= src->n_vquant);
    }
}

KVQ_API kvq_status kvq_cache_truncate(kvq_cache *c, int n_tokens) {
    int cut;
    if (!c || n_tokens < 0 || n_tokens > c->n_tokens) return KVQ_ERR_INVALID;
    cut = c->n_tokens - n_tokens;
    if (cut == 0) return KVQ_OK;
    kvq__cut_window(c, c, n_tokens, cut <= c->n_hist);
    c->n_hist = cut <= c->n_hist ? c->n_hist - cut : 0;
    kvq__set_tokens(c, n_tokens);
    return KVQ_OK;
}

/* Equal configs but for the capacity and the rollback history (the layout of the records and
   of what they mean does not depend on either). */
static int kvq__same_format(const kvq_config *a, const kvq_config *b) {
    return a->head_dim == b->head_dim && a->n_kv_heads == b->n_kv_heads && a->key_bits == b->key_bits &&
           a->value_bits == b->value_bits && a->group_size == b->group_size &&
           a->residual_tokens == b->residual_tokens && a->sink_tokens == b->sink_tokens && a->rotation == b->rotation &&
           a->seed == b->seed && a->salient_ratio == b->salient_ratio && a->salient_bits == b->salient_bits &&
           a->salient_policy == b->salient_policy && a->key_axis == b->key_axis &&
           a->range_search == b->range_search && a->key_block == b->key_block &&
           a->value_param_bits == b->value_param_bits;
}

static void kvq__copy_bytes(void *dst, const void *src, size_t n) {
    if (n) memcpy(dst, src, n); /* an empty array may sit at the end of the cache's memory */
}

/* The records of src's first n tokens into dst: sinks, key blocks and their side stores,
   quantized values and keys per token (each head's are contiguous in both caches). */
static void kvq__copy_records(kvq_cache *dst, const kvq_cache *src, int n) {
    const size_t sink_bytes = (size_t)(n < src->cfg.sink_tokens ? n : src->cfg.sink_tokens) * src->cfg.head_dim * 2;
    int nkb, nvq, h;
    kvq__counts_after(&src->cfg, n, &nkb, &nvq);
    for (h = 0; h < src->cfg.n_kv_heads; h++) {
        kvq__copy_bytes(kvq__sink_row(dst, dst->sink_k, h, 0), kvq__sink_row(src, src->sink_k, h, 0), sink_bytes);
        kvq__copy_bytes(kvq__sink_row(dst, dst->sink_v, h, 0), kvq__sink_row(src, src->sink_v, h, 0), sink_bytes);
        kvq__copy_bytes(kvq__key_block(dst, h, 0), kvq__key_block(src, h, 0), (size_t)nkb * src->kblock_bytes);
        if (src->n_salient)
            kvq__copy_bytes(kvq__side_entry(dst, h, 0, 0), kvq__side_entry(src, h, 0, 0),
                            (size_t)nkb * src->n_salient * src->side_bytes);
        kvq__copy_bytes(kvq__value_params(dst, h, 0), kvq__value_params(src, h, 0), (size_t)nvq * src->vparam_bytes);
        kvq__copy_bytes(kvq__value_codes(dst, h, 0), kvq__value_codes(src, h, 0), (size_t)nvq * src->vcode_bytes);
        if (kvq__per_token_keys(src)) {
            kvq__copy_bytes(kvq__key_token_params(dst, h, 0), kvq__key_token_params(src, h, 0),
                            (size_t)nvq * src->ktparam_bytes);
            kvq__copy_bytes(kvq__key_token_codes(dst, h, 0), kvq__key_token_codes(src, h, 0),
                            (size_t)nvq * src->ktcode_bytes);
        }
    }
}

KVQ_API kvq_status kvq_cache_copy(kvq_cache *dst, const kvq_cache *src, int n_tokens) {
    if (!dst || !src || n_tokens < 0 || n_tokens > src->n_tokens) return KVQ_ERR_INVALID;
    if (kvq__overlap(dst, dst->span, src, src->span) || !kvq__same_format(&dst->cfg, &src->cfg))
        return KVQ_ERR_INVALID;
    if (n_tokens > dst->cfg.max_tokens) return KVQ_ERR_FULL;
    kvq__copy_records(dst, src, n_tokens);
    kvq__cut_window(dst, src, n_tokens, src->n_tokens - n_tokens <= src->n_hist);
    kvq__set_tokens(dst, n_tokens);
    dst->n_hist = 0;
    return KVQ_OK;
}

/* ---------------------------------------------------------------------------
   ISA kernels. One set per ISA, side by side, behind the Dispatch functions:
   scalar (the reference, always compiled), AVX2 (+FMA, F16C), AVX-512
   (F/BW/DQ/VL) and NEON (aarch64). Quantize kernels must give the scalar's
   bytes exactly: the same fp16 rounding (F16C / FCVT round to nearest even,
   as kvq__f32_to_f16), the same division (x - m) / s, round half to even, no
   FMA contraction. Attention kernels may reorder sums (NMSE <= 1e-6 against
   scalar, tests/test_simd.c). Codes are unpacked 8 at a time from a byte
   boundary (a run: 8 codes = bits bytes; at 3 bits 2 bytes of the low plane and
   1 of the high, section "Formats"), which every shape allows: D and G are
   multiples of 8. The shared scalar tails below do what SIMD does not pay for.
   AVX-512 uses the AVX2 quantize and conversion kernels (one copy to keep
   bit-exact) but has its own range search, the bulk of append's time.
   Attention has two kernel sets: the
   float ones (the reference) and the integer scheme of "Integer attention"
   (section Attention), whose integer sums every ISA computes exactly; its
   float parts may differ in rounding (NMSE <= 1e-6 against scalar's integer
   scheme). A query in one int8 byte was measured at squared relative error
   1.7e-3 on zero-mean values, hence the two-byte (16-bit) query.
   --------------------------------------------------------------------------- */

#if KVQ__HAVE_AVX2 || KVQ__HAVE_AVX512
#include <immintrin.h>
#if defined(__GNUC__) || defined(__clang__)
/* target attributes: a build without -march flags still compiles the kernels (runtime dispatch) */
#define KVQ__TARGET_AVX2 __attribute__((target("avx2,fma,f16c")))
#define KVQ__TARGET_AVX512 __attribute__((target("avx2,fma,f16c,avx512f,avx512bw,avx512dq,avx512vl")))
#define KVQ__TARGET_AVX512_INT \
    __attribute__((target("avx2,fma,f16c,avx512f,avx512bw,avx512dq,avx512vl,avx512vnni,avx512vbmi")))
#else
#define KVQ__TARGET_AVX512_INT
#define KVQ__TARGET_AVX2
#define KVQ__TARGET_AVX512
#endif
#endif
#if KVQ__HAVE_NEON
#include <arm_neon.h>
#endif

#if KVQ__HAVE_SIMD /* the shared tails */
/* Where the run of 8 codes from i (a multiple of 8) starts in a packed row (section "Formats"):
   i * bits / 8, or at 3 bits its low plane's two bytes, i / 4 (the high byte: kvq__hi_at). */
static KVQ__INLINE size_t kvq__run_at(int i, int bits) { return (size_t)i * (size_t)(bits == 3 ? 2 : bits) / 8; }
/* The high-plane byte of that run at 3 bits; otherwise the run itself (a pointer the kernels
   carry along unused, kept inside the row). */
static KVQ__INLINE const uint8_t *kvq__hi_ptr(const uint8_t *row, int n, int i, int bits) {
    return row + (bits == 3 ? kvq__hi_at(n, i) : kvq__run_at(i, bits));
}

/* A 3-bit run as one word: the low plane's 2 bytes at lo, the high plane's byte at hi, so code t
   has its low bits at 2t, 2t+1 and its high bit at 16 + t. */
static KVQ__INLINE uint32_t kvq__planes8(const uint8_t *lo, const uint8_t *hi) {
    return (uint32_t)lo[0] | (uint32_t)lo[1] << 8 | (uint32_t)hi[0] << 16;
}

/* Packs 8 codes (one per byte) into bits bytes, code i at bits [i*bits, (i+1)*bits):
   three steps each merge neighbouring fields of a 64-bit word (8 -> 16 -> 32 -> 64 bit lanes). */
static KVQ__INLINE void kvq__pack8(uint8_t *dst, uint64_t x, int bits) {
    int i, b = bits;
    if (b != 8) {
        x = (x | x >> (8 - b)) & (0x0001000100010001ull * ((1u << 2 * b) - 1u));
        x = (x | x >> (16 - 2 * b)) & (0x0000000100000001ull * ((1ull << 4 * b) - 1u));
        x = (x | x >> (32 - 4 * b)) & ((1ull << 8 * b) - 1u);
    }
    for (i = 0; i < b; i++) dst[i] = (uint8_t)(x >> 8 * i);
}

/* Stores 8 codes (byte k of x holds code i + k) as the run from i of a packed row of n codes.
   3 bits: the low bits through the 2-bit packer; the high bits (y: bit 8k = code k's bit 2) into
   one byte by a multiply: y * sum_j 2^(7j + 7) puts bit 8k at 8k + 7j + 7, positions distinct for
   all j, k < 8 (no carries), and j = 7 - k puts it at 56 + k. */
static KVQ__INLINE void kvq__store_run(uint8_t *row, int n, int i, uint64_t x, int bits) {
    if (bits == 3) {
        kvq__pack8(row + (size_t)i / 4, x & 0x0303030303030303ull, 2);
        row[kvq__hi_at(n, i)] = (uint8_t)(((x >> 2 & 0x0101010101010101ull) * 0x0102040810204080ull) >> 56);
        return;
    }
    kvq__pack8(row + (size_t)i * bits / 8, x, bits);
}

/* Eight bytes with stride as one little-endian word. */
static KVQ__INLINE uint64_t kvq__gather8(const uint8_t *p, size_t stride) {
    uint64_t x = 0;
    int i;
#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__
    if (stride == 1) {
        memcpy(&x, p, 8);
        return x;
    }
#endif
    for (i = 0; i < 8; i++) x |= (uint64_t)p[(size_t)i * stride] << 8 * i;
    return x;
}

/* The scalar's min/max scan keeps the first of equal values, which matters only for
   the sign of a zero: a SIMD min/max that found 0 takes the first zero's sign. */
static float kvq__first_zero(const float *x, int n, float v) {
    int i;
    if (v != 0.0f) return v;
    for (i = 0; i < n; i++)
        if (x[i] == 0.0f) return x[i];
    return v;
}

/* Value quantize for SIMD paths: minmax and codes come from the ISA, the rest is shared. */
static void kvq__quantize_value_simd(const uint16_t *row, int D, int G, int bits, int pbits, int grid,
                                     uint16_t *par, uint8_t *codes,
                                     void (*to_f32)(float *, const uint16_t *, int),
                                     void (*minmax)(const float *, int, float *, float *),
                                     void (*code_run)(const float *, int, float, float, int, uint8_t *)) {
    float x[512], lo[64], hi[64];
    uint8_t cb[512];
    kvq__qparams qp[64];
    int ng = (D + G - 1) / G, g, c0;
    to_f32(x, row, D);
    for (g = 0; g < ng; g++) {
        const int n = kvq__group_n(D, G, g);
        minmax(x + g * G, n, &lo[g], &hi[g]);
        lo[g] = kvq__first_zero(x + g * G, n, lo[g]);
        hi[g] = kvq__first_zero(x + g * G, n, hi[g]);
    }
    kvq__row_params(x, D, G, bits, pbits, grid, lo, hi, qp);
    for (g = 0; g < ng; g++) {
        float m, s;
        kvq__put_params(par, ng, g, qp[g], pbits);
        kvq__params_f32(qp[g], pbits, &m, &s);
        code_run(x + g * G, kvq__group_n(D, G, g), m, s, bits, cb + g * G);
    }
    for (c0 = 0; c0 < D; c0 += 8) {
        if (bits == 8) memcpy(codes + c0, cb + c0, 8);
        else kvq__store_run(codes, D, c0, kvq__gather8(cb + c0, 1), bits);
    }
}

#endif

/* ---- scalar: the reference kernels live beside their callers (Cache, Attention) ---- */

/* An ISA's kvq__dot_codes: its kvq__dot_pass_<isa> over groups of four heads, with constant bits
   and heads for the side store's 8-bit records and four heads (GQA). */
#define KVQ__DEFINE_DOT_CODES(FN, isa)                                                                     \
    FN void kvq__dot_codes_##isa(const uint8_t *codes, size_t stride, const float *par, int n, int D, int G, \
                                 int bits, const float *q, int nh, float *scores) {                         \
        int j0;                                                                                              \
        for (j0 = 0; j0 < nh; j0 += 4) {                                                                     \
            const int nj = nh - j0 < 4 ? nh - j0 : 4;                                                        \
            const float *q0 = q + (size_t)j0 * D;                                                            \
            float *s0 = scores + (size_t)j0 * KVQ__TILE;                                                     \
            if (nj == 4 && bits == 8) kvq__dot_pass_##isa(codes, stride, par, n, D, G, 8, q0, 4, s0);        \
            else kvq__dot_pass_##isa(codes, stride, par, n, D, G, bits, q0, nj, s0);                         \
        }                                                                                                    \
    }

/* ---- AVX2 (+FMA, F16C): 8 lanes ------------------------------------------------ */
#if KVQ__HAVE_AVX2
#define KVQ__AVX2_FN static KVQ__TARGET_AVX2
#define KVQ__AVX2_INLINE static KVQ__INLINE KVQ__TARGET_AVX2

/* The run at p as 8 floats; at 3 bits p is its low plane and hp its high byte. sh, mask: from
   kvq__shifts_avx2 and kvq__mask_avx2 (a 3-bit run's low plane is unpacked as a 2-bit run). */
KVQ__AVX2_FN __m256 kvq__codes8_avx2(const uint8_t *p, const uint8_t *hp, int bits, __m256i sh, __m256i mask) {
    __m256i v;
    if (bits == 8) {
        v = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(const void *)p));
    } else if (bits == 3) { /* lane t: bits 2t, 2t+1 of the word, then bit 16 + t moved to bit 2 */
        const __m256i w = _mm256_set1_epi32((int)kvq__planes8(p, hp));
        const __m256i hsh = _mm256_add_epi32(_mm256_srli_epi32(sh, 1), _mm256_set1_epi32(14)); /* 14 + t */
        v = _mm256_or_si256(_mm256_and_si256(_mm256_srlv_epi32(w, sh), mask),
                            _mm256_and_si256(_mm256_srlv_epi32(w, hsh), _mm256_set1_epi32(4)));
    } else {
        uint32_t w = 0;
        if (bits == 2) memcpy(&w, p, 2); /* x86: little-endian */
        else memcpy(&w, p, 4);
        v = _mm256_and_si256(_mm256_srlv_epi32(_mm256_set1_epi32((int)w), sh), mask);
    }
    return _mm256_cvtepi32_ps(v);
}
/* lane * bits, and the low bits' mask (2 bits for the low plane of a 3-bit run) */
KVQ__AVX2_FN __m256i kvq__shifts_avx2(int bits) {
    return _mm256_mullo_epi32(_mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7), _mm256_set1_epi32(bits == 3 ? 2 : bits));
}
KVQ__AVX2_FN __m256i kvq__mask_avx2(int bits) { return _mm256_set1_epi32((1 << (bits == 3 ? 2 : bits)) - 1); }
KVQ__AVX2_FN __m256 kvq__f16x8_avx2(const uint16_t *p) {
    return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(const void *)p));
}
KVQ__AVX2_FN float kvq__hsum_avx2(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}
/* 8 codes (floats in [0, top]) to bytes */
KVQ__AVX2_FN void kvq__store_codes8_avx2(uint8_t *dst, __m256 v) {
    __m256i i = _mm256_cvttps_epi32(v);
    __m128i w = _mm_packus_epi32(_mm256_castsi256_si128(i), _mm256_extracti128_si256(i, 1));
    _mm_storel_epi64((__m128i *)(void *)dst, _mm_packus_epi16(w, w));
}
/* round_half_even((x - m) / s) clamped to [0, top]; 0 where s == 0. No FMA: bytes equal scalar's. */
KVQ__AVX2_FN __m256 kvq__code_avx2(__m256 x, __m256 m, __m256 s, __m256 top, __m256 s_zero) {
    __m256 v = _mm256_round_ps(_mm256_div_ps(_mm256_sub_ps(x, m), s), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    v = _mm256_min_ps(_mm256_max_ps(v, _mm256_setzero_ps()), top);
    return _mm256_andnot_ps(s_zero, v);
}

KVQ__AVX2_FN void kvq__to_f16_avx2(uint16_t *dst, const float *src, int n) {
    int i = 0;
    for (; i + 8 <= n; i += 8)
        _mm_storeu_si128((__m128i *)(void *)(dst + i), _mm256_cvtps_ph(_mm256_loadu_ps(src + i), _MM_FROUND_TO_NEAREST_INT));
    for (; i < n; i++) dst[i] = kvq__f32_to_f16(src[i]);
}
/* kvq__fits_fp16_scalar, 8 lanes a step. */
KVQ__AVX2_FN int kvq__fits_fp16_avx2(const float *x, size_t n) {
    const __m256i abs = _mm256_set1_epi32(0x7fffffff), most = _mm256_set1_epi32(0x477fe000);
    __m256i over = _mm256_setzero_si256();
    size_t i = 0;
    for (; i + 8 <= n; i += 8)
        over = _mm256_or_si256(over, _mm256_sub_epi32(most, _mm256_and_si256(_mm256_loadu_si256(
                                                                  (const __m256i *)(const void *)(x + i)), abs)));
    return _mm256_movemask_ps(_mm256_castsi256_ps(over)) == 0 && kvq__fits_fp16_scalar(x + i, n - i);
}
KVQ__AVX2_FN void kvq__to_f32_avx2(float *dst, const uint16_t *src, int n) {
    int i = 0;
    for (; i + 8 <= n; i += 8) _mm256_storeu_ps(dst + i, kvq__f16x8_avx2(src + i));
    for (; i < n; i++) dst[i] = kvq__f16_to_f32(src[i]);
}

/* n: a multiple of 8. Operand order as the scalar scan (x < lo ? x : lo). */
KVQ__AVX2_FN void kvq__minmax_avx2(const float *x, int n, float *lo, float *hi) {
    __m256 a = _mm256_loadu_ps(x), b = a;
    __m128 l, h;
    int i;
    for (i = 8; i < n; i += 8) {
        __m256 v = _mm256_loadu_ps(x + i);
        a = _mm256_min_ps(v, a);
        b = _mm256_max_ps(v, b);
    }
    l = _mm_min_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
    h = _mm_max_ps(_mm256_castps256_ps128(b), _mm256_extractf128_ps(b, 1));
    l = _mm_min_ps(l, _mm_movehl_ps(l, l));
    h = _mm_max_ps(h, _mm_movehl_ps(h, h));
    *lo = _mm_cvtss_f32(_mm_min_ss(l, _mm_movehdup_ps(l)));
    *hi = _mm_cvtss_f32(_mm_max_ss(h, _mm_movehdup_ps(h)));
}
KVQ__AVX2_FN void kvq__code_run_avx2(const float *x, int n, float m, float s, int bits, uint8_t *out) {
    const __m256 vm = _mm256_set1_ps(m), vs = _mm256_set1_ps(s), top = _mm256_set1_ps((float)((1 << bits) - 1));
    const __m256 sz = _mm256_cmp_ps(vs, _mm256_setzero_ps(), _CMP_EQ_OQ);
    int i;
    for (i = 0; i < n; i += 8) kvq__store_codes8_avx2(out + i, kvq__code_avx2(_mm256_loadu_ps(x + i), vm, vs, top, sz));
}
KVQ__AVX2_FN void kvq__search_row_avx2(const float *x, int D, int G, int bits, int pbits, int steps, const float *lo,
                                      const float *hi, kvq__qparams *best) {
    kvq__search_row_with(x, D, G, bits, pbits, steps, lo, hi, best, kvq__search_cands, kvq__search_sums);
}
KVQ__AVX2_FN void kvq__search_columns_avx2(const float *xb, int G, const uint8_t *w, int bits, int steps,
                                           const float *lo, const float *hi, kvq__qparams *best) {
    kvq__search_columns_body(xb, G, w, bits, steps, lo, hi, best);
}
KVQ__AVX2_FN void kvq__quantize_value_avx2(const uint16_t *row, int D, int G, int bits, int pbits, int grid,
                                           uint16_t *par, uint8_t *codes) {
    kvq__quantize_value_simd(row, D, G, bits, pbits, grid, par, codes, kvq__to_f32_avx2, kvq__minmax_avx2,
                             kvq__code_run_avx2);
}

/* Writes n bytes of each 32-bit lane of *w to p + lane * stride (8 channel rows), then zeroes *w. */
KVQ__AVX2_FN void kvq__store_lanes_avx2(uint8_t *p, size_t stride, __m256i *w, int n) {
    uint32_t u[8];
    int lane;
    _mm256_storeu_si256((__m256i *)(void *)u, *w);
    for (lane = 0; lane < 8; lane++) memcpy(p + (size_t)lane * stride, &u[lane], (size_t)n);
    *w = _mm256_setzero_si256();
}
/* Vectors over 8 channels, scans over the G tokens. A channel's codes fill 32-bit words, built in
   the lanes and stored per channel: 32/bits tokens a word at 2, 4 and 8 bits; at 3 bits two
   words, the low plane's (16 tokens of 2 bits) and the high plane's (32 tokens of 1 bit). */
KVQ__AVX2_FN void kvq__quantize_keys_avx2(const uint16_t *rows, int D, int G, int bits, uint8_t *blk, int keep_params) {
    uint16_t *scale = (uint16_t *)(void *)blk, *mins = scale + D;
    uint8_t *codes = kvq__block_codes_rw(blk, D);
    const size_t rb = (size_t)G * bits / 8;
    const int per = 32 / bits; /* tokens per 32-bit word (2, 4, 8 bits) */
    const __m256 top = _mm256_set1_ps((float)((1 << bits) - 1));
    int cc, t;
    for (cc = 0; cc < D; cc += 8) {
        __m256 lo = kvq__f16x8_avx2(rows + cc), hi = lo, m, s, sz;
        __m256i word = _mm256_setzero_si256(), hiword = word;
        __m128i mh, sh;
        if (keep_params) {
            mh = _mm_loadu_si128((const __m128i *)(const void *)(mins + cc));
            sh = _mm_loadu_si128((const __m128i *)(const void *)(scale + cc));
        } else {
            for (t = 1; t < G; t++) {
                __m256 x = kvq__f16x8_avx2(rows + (size_t)t * D + cc);
                lo = _mm256_min_ps(x, lo);
                hi = _mm256_max_ps(x, hi);
            }
            mh = _mm256_cvtps_ph(lo, _MM_FROUND_TO_NEAREST_INT);
            sh = _mm256_cvtps_ph(_mm256_div_ps(_mm256_sub_ps(hi, lo), top), _MM_FROUND_TO_NEAREST_INT);
            _mm_storeu_si128((__m128i *)(void *)(mins + cc), mh);
            _mm_storeu_si128((__m128i *)(void *)(scale + cc), sh);
        }
        m = _mm256_cvtph_ps(mh);
        s = _mm256_cvtph_ps(sh);
        sz = _mm256_cmp_ps(s, _mm256_setzero_ps(), _CMP_EQ_OQ);
        for (t = 0; t < G; t++) {
            const __m256i v = _mm256_cvttps_epi32(kvq__code_avx2(kvq__f16x8_avx2(rows + (size_t)t * D + cc), m, s, top, sz));
            if (bits == 3) { /* the planes: 2 low bits at 2 (t % 16) of a word, the high bit at t % 32 */
                word = _mm256_or_si256(word, _mm256_sll_epi32(_mm256_and_si256(v, _mm256_set1_epi32(3)),
                                                              _mm_cvtsi32_si128(2 * (t % 16))));
                hiword = _mm256_or_si256(hiword, _mm256_sll_epi32(_mm256_srli_epi32(v, 2), _mm_cvtsi32_si128(t % 32)));
                if (t % 16 == 15) kvq__store_lanes_avx2(codes + (size_t)cc * rb + (size_t)(t / 16) * 4, rb, &word, 4);
                if (t % 32 == 31 || t == G - 1) /* G 16: a half word */
                    kvq__store_lanes_avx2(codes + (size_t)cc * rb + (size_t)G / 4 + (size_t)(t / 32) * 4, rb, &hiword,
                                          t % 32 == 31 ? 4 : 2);
                continue;
            }
            word = _mm256_or_si256(word, _mm256_sll_epi32(v, _mm_cvtsi32_si128(t % per * bits)));
            if (t % per == per - 1) kvq__store_lanes_avx2(codes + (size_t)cc * rb + (size_t)(t / per) * 4, rb, &word, 4);
        }
    }
}

/* One pass over the block for nj <= 4 heads; bits and nj are constants where inlined. */
KVQ__AVX2_INLINE void kvq__scores_pass_avx2(const uint8_t *codes, int D, int G, const int bits, const float *q0,
                                            const float *bias, const int nj, float *s0) {
    const size_t rb = (size_t)G * bits / 8;
    const __m256i sh = kvq__shifts_avx2(bits), mask = kvq__mask_avx2(bits);
    int ch, t0;
    for (t0 = 0; t0 < G; t0 += 8) {
        const uint8_t *cp = codes + kvq__run_at(t0, bits), *hp = kvq__hi_ptr(codes, G, t0, bits);
        __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
        for (ch = 0; ch < D; ch++, cp += rb, hp += rb) {
            __m256 v = kvq__codes8_avx2(cp, hp, bits, sh, mask);
            a0 = _mm256_fmadd_ps(_mm256_set1_ps(q0[ch]), v, a0);
            if (nj > 1) a1 = _mm256_fmadd_ps(_mm256_set1_ps(q0[D + ch]), v, a1);
            if (nj > 2) a2 = _mm256_fmadd_ps(_mm256_set1_ps(q0[2 * D + ch]), v, a2);
            if (nj > 3) a3 = _mm256_fmadd_ps(_mm256_set1_ps(q0[3 * D + ch]), v, a3);
        }
        _mm256_storeu_ps(s0 + t0, _mm256_add_ps(a0, _mm256_set1_ps(bias[0])));
        if (nj > 1) _mm256_storeu_ps(s0 + KVQ__TILE + t0, _mm256_add_ps(a1, _mm256_set1_ps(bias[1])));
        if (nj > 2) _mm256_storeu_ps(s0 + 2 * KVQ__TILE + t0, _mm256_add_ps(a2, _mm256_set1_ps(bias[2])));
        if (nj > 3) _mm256_storeu_ps(s0 + 3 * KVQ__TILE + t0, _mm256_add_ps(a3, _mm256_set1_ps(bias[3])));
    }
}
KVQ__AVX2_FN void kvq__scores_codes_avx2(const uint8_t *blk, int D, int G, int bits, const float *q, int nh,
                                         float *scores) {
    const uint16_t *sc = (const uint16_t *)(const void *)blk, *mn = sc + D;
    const uint8_t *codes = kvq__block_codes(blk, D);
    float qs[KVQ__HEAD_CHUNK * 512], bias[KVQ__HEAD_CHUNK];
    int j, j0, ch;
    for (j = 0; j < nh; j++) { /* fold the channel scales into the query; the mins are one bias */
        __m256 b = _mm256_setzero_ps();
        for (ch = 0; ch < D; ch += 8) {
            __m256 qv = _mm256_loadu_ps(q + (size_t)j * D + ch);
            _mm256_storeu_ps(qs + (size_t)j * D + ch, _mm256_mul_ps(qv, kvq__f16x8_avx2(sc + ch)));
            b = _mm256_fmadd_ps(qv, kvq__f16x8_avx2(mn + ch), b);
        }
        bias[j] = kvq__hsum_avx2(b);
    }
    for (j0 = 0; j0 < nh; j0 += 4) {
        const int nj = nh - j0 < 4 ? nh - j0 : 4;
        const float *q0 = qs + (size_t)j0 * D;
        float *s0 = scores + (size_t)j0 * KVQ__TILE;
        switch (bits * 8 + (nj == 4)) { /* constant bits and head count in the hot loops */
        case 17: kvq__scores_pass_avx2(codes, D, G, 2, q0, bias + j0, 4, s0); break;
        case 25: kvq__scores_pass_avx2(codes, D, G, 3, q0, bias + j0, 4, s0); break;
        case 33: kvq__scores_pass_avx2(codes, D, G, 4, q0, bias + j0, 4, s0); break;
        case 16: kvq__scores_pass_avx2(codes, D, G, 2, q0, bias + j0, nj, s0); break;
        case 24: kvq__scores_pass_avx2(codes, D, G, 3, q0, bias + j0, nj, s0); break;
        case 32: kvq__scores_pass_avx2(codes, D, G, 4, q0, bias + j0, nj, s0); break;
        default: kvq__scores_pass_avx2(codes, D, G, bits, q0, bias + j0, nj, s0); break;
        }
    }
}

/* Starts every cache line of a tile's fp16 rows at once: the kernels walk them column-wise
   (values) or right after the other stream (keys), and single misses in a row stall them. */
KVQ__AVX2_FN void kvq__prefetch_rows_avx2(const uint16_t *const *rows, int n, int D) {
    int t, c;
    for (t = 0; t < n; t++) { /* the next tile, where rows run on contiguously (prefetches never fault;
                                 the address is formed as an integer: it may lie past the array) */
        uintptr_t next = (uintptr_t)(const void *)rows[t] + (uintptr_t)n * (uintptr_t)D * 2u;
        for (c = 0; c < D; c += 32)
            _mm_prefetch((const char *)(next + (uintptr_t)c * 2u), _MM_HINT_T0); /* NOLINT(performance-no-int-to-ptr) */
    }
}
/* Four sums at once: [sum a0, sum a1, sum a2, sum a3]. */
KVQ__AVX2_FN __m128 kvq__hsum4_avx2(__m256 a0, __m256 a1, __m256 a2, __m256 a3) {
    __m256 h = _mm256_hadd_ps(_mm256_hadd_ps(a0, a1), _mm256_hadd_ps(a2, a3));
    return _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1));
}
KVQ__AVX2_INLINE void kvq__scores_f16_pass_avx2(const uint16_t *const *rows, int n, int D, const float *q0,
                                                const int nj, float *s0) {
    int t, ch;
    for (t = 0; t < n; t++) {
        __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
        for (ch = 0; ch < D; ch += 8) {
            __m256 v = kvq__f16x8_avx2(rows[t] + ch);
            a0 = _mm256_fmadd_ps(_mm256_loadu_ps(q0 + ch), v, a0);
            if (nj > 1) a1 = _mm256_fmadd_ps(_mm256_loadu_ps(q0 + D + ch), v, a1);
            if (nj > 2) a2 = _mm256_fmadd_ps(_mm256_loadu_ps(q0 + 2 * D + ch), v, a2);
            if (nj > 3) a3 = _mm256_fmadd_ps(_mm256_loadu_ps(q0 + 3 * D + ch), v, a3);
        }
        if (nj == 4) {
            __m128 s = kvq__hsum4_avx2(a0, a1, a2, a3);
            _mm_store_ss(s0 + t, s);
            _mm_store_ss(s0 + KVQ__TILE + t, _mm_movehdup_ps(s));
            _mm_store_ss(s0 + 2 * KVQ__TILE + t, _mm_movehl_ps(s, s));
            _mm_store_ss(s0 + 3 * KVQ__TILE + t, _mm_shuffle_ps(s, s, 3));
            continue;
        }
        s0[t] = kvq__hsum_avx2(a0);
        if (nj > 1) s0[KVQ__TILE + t] = kvq__hsum_avx2(a1);
        if (nj > 2) s0[2 * KVQ__TILE + t] = kvq__hsum_avx2(a2);
    }
}
KVQ__AVX2_FN void kvq__scores_f16_avx2(const uint16_t *const *rows, int n, int D, const float *q, int nh,
                                       float *scores) {
    int j0;
    kvq__prefetch_rows_avx2(rows, n, D);
    for (j0 = 0; j0 < nh; j0 += 4) {
        const int nj = nh - j0 < 4 ? nh - j0 : 4;
        if (nj == 4) kvq__scores_f16_pass_avx2(rows, n, D, q + (size_t)j0 * D, 4, scores + (size_t)j0 * KVQ__TILE);
        else kvq__scores_f16_pass_avx2(rows, n, D, q + (size_t)j0 * D, nj, scores + (size_t)j0 * KVQ__TILE);
    }
}

/* exp(x) for x <= 0: 2^n * e^r, |r| <= ln2/2, degree-6 polynomial (relative error ~1e-7). */
KVQ__AVX2_FN __m256 kvq__exp_avx2(__m256 x) {
    const __m256 l2e = _mm256_set1_ps(1.44269504f), c1 = _mm256_set1_ps(0.693359375f),
                 c2 = _mm256_set1_ps(-2.12194440e-4f);
    __m256 n, r, p;
    x = _mm256_max_ps(x, _mm256_set1_ps(-87.0f));
    n = _mm256_round_ps(_mm256_mul_ps(x, l2e), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    r = _mm256_fnmadd_ps(n, c1, x);
    r = _mm256_fnmadd_ps(n, c2, r);
    p = _mm256_set1_ps(1.9875691500e-4f);
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
    p = _mm256_fmadd_ps(p, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.0f)));
    return _mm256_castsi256_ps(_mm256_add_epi32(_mm256_castps_si256(p),
                                                _mm256_slli_epi32(_mm256_cvtps_epi32(n), 23)));
}
KVQ__AVX2_FN float kvq__exp_sum_avx2(float *x, int n, float mx) {
    const __m256 vm = _mm256_set1_ps(mx);
    __m256 acc = _mm256_setzero_ps();
    float sum;
    int t = 0;
    for (; t + 8 <= n; t += 8) {
        __m256 e = kvq__exp_avx2(_mm256_sub_ps(_mm256_loadu_ps(x + t), vm));
        _mm256_storeu_ps(x + t, e);
        acc = _mm256_add_ps(acc, e);
    }
    sum = kvq__hsum_avx2(acc);
    return sum + kvq__exp_sum_scalar(x + t, n - t, mx);
}

/* acc[j][c] += p[j][t] * (s_t,g code_t,c + m_t,g): each token's dequantized value, once for all heads. */
KVQ__AVX2_INLINE void kvq__acc_pass_avx2(const uint8_t *codes, size_t stride, const float *par, int n, int D,
                                         int G, const int bits, const float *p0, const int nj, float *const *acc) {
    const int ng = (D + G - 1) / G;
    const __m256i sh = kvq__shifts_avx2(bits), mask = kvq__mask_avx2(bits);
    int cc, t;
    for (cc = 0; cc < D; cc += 8) {
        const float *pt = par + cc / G;
        const uint8_t *cp = codes + kvq__run_at(cc, bits), *hp = kvq__hi_ptr(codes, D, cc, bits);
        __m256 a0 = _mm256_loadu_ps(acc[0] + cc), a1 = a0, a2 = a0, a3 = a0;
        if (nj > 1) a1 = _mm256_loadu_ps(acc[1] + cc);
        if (nj > 2) a2 = _mm256_loadu_ps(acc[2] + cc);
        if (nj > 3) a3 = _mm256_loadu_ps(acc[3] + cc);
        for (t = 0; t < n; t++, cp += stride, hp += stride, pt += 2 * ng) {
            __m256 v = _mm256_fmadd_ps(_mm256_set1_ps(pt[0]), kvq__codes8_avx2(cp, hp, bits, sh, mask),
                                       _mm256_set1_ps(pt[ng]));
            a0 = _mm256_fmadd_ps(_mm256_set1_ps(p0[t]), v, a0);
            if (nj > 1) a1 = _mm256_fmadd_ps(_mm256_set1_ps(p0[KVQ__TILE + t]), v, a1);
            if (nj > 2) a2 = _mm256_fmadd_ps(_mm256_set1_ps(p0[2 * KVQ__TILE + t]), v, a2);
            if (nj > 3) a3 = _mm256_fmadd_ps(_mm256_set1_ps(p0[3 * KVQ__TILE + t]), v, a3);
        }
        _mm256_storeu_ps(acc[0] + cc, a0);
        if (nj > 1) _mm256_storeu_ps(acc[1] + cc, a1);
        if (nj > 2) _mm256_storeu_ps(acc[2] + cc, a2);
        if (nj > 3) _mm256_storeu_ps(acc[3] + cc, a3);
    }
}
KVQ__AVX2_FN void kvq__acc_codes_avx2(const uint8_t *codes, size_t stride, const float *par, int n, int D, int G,
                                      int bits, const float *p, int nh, float *const *acc) {
    int j0;
    for (j0 = 0; j0 < nh; j0 += 4) {
        const int nj = nh - j0 < 4 ? nh - j0 : 4;
        const float *p0 = p + (size_t)j0 * KVQ__TILE;
        switch (bits * 8 + (nj == 4)) {
        case 17: kvq__acc_pass_avx2(codes, stride, par, n, D, G, 2, p0, 4, acc + j0); break;
        case 25: kvq__acc_pass_avx2(codes, stride, par, n, D, G, 3, p0, 4, acc + j0); break;
        case 33: kvq__acc_pass_avx2(codes, stride, par, n, D, G, 4, p0, 4, acc + j0); break;
        case 16: kvq__acc_pass_avx2(codes, stride, par, n, D, G, 2, p0, nj, acc + j0); break;
        case 24: kvq__acc_pass_avx2(codes, stride, par, n, D, G, 3, p0, nj, acc + j0); break;
        case 32: kvq__acc_pass_avx2(codes, stride, par, n, D, G, 4, p0, nj, acc + j0); break;
        default: kvq__acc_pass_avx2(codes, stride, par, n, D, G, bits, p0, nj, acc + j0); break;
        }
    }
}

/* scores[j][t] = q_j . x_t, each record x_t dequantized once for up to four heads; chunk c of 8
   channels is in group c >> gs (G = 8 << gs). */
KVQ__AVX2_INLINE void kvq__dot_pass_avx2(const uint8_t *codes, size_t stride, const float *par, int n, int D, int G,
                                         const int bits, const float *q0, const int nj, float *s0) {
    const int ng = (D + G - 1) / G;
    const __m256i sh = kvq__shifts_avx2(bits), mask = kvq__mask_avx2(bits);
    int gs = 0, c, t;
    while ((8 << gs) < G) gs++;
    for (t = 0; t < n; t++) {
        const uint8_t *ct = codes + stride * t;
        const float *pt = par + (size_t)t * 2 * ng;
        __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
        for (c = 0; c < D / 8; c++) {
            const int cc = 8 * c;
            const __m256 v = _mm256_fmadd_ps(
                _mm256_set1_ps(pt[c >> gs]),
                kvq__codes8_avx2(ct + kvq__run_at(cc, bits), kvq__hi_ptr(ct, D, cc, bits), bits, sh, mask),
                _mm256_set1_ps(pt[ng + (c >> gs)]));
            a0 = _mm256_fmadd_ps(_mm256_loadu_ps(q0 + cc), v, a0);
            if (nj > 1) a1 = _mm256_fmadd_ps(_mm256_loadu_ps(q0 + D + cc), v, a1);
            if (nj > 2) a2 = _mm256_fmadd_ps(_mm256_loadu_ps(q0 + 2 * D + cc), v, a2);
            if (nj > 3) a3 = _mm256_fmadd_ps(_mm256_loadu_ps(q0 + 3 * D + cc), v, a3);
        }
        s0[t] = kvq__hsum_avx2(a0);
        if (nj > 1) s0[KVQ__TILE + t] = kvq__hsum_avx2(a1);
        if (nj > 2) s0[2 * KVQ__TILE + t] = kvq__hsum_avx2(a2);
        if (nj > 3) s0[3 * KVQ__TILE + t] = kvq__hsum_avx2(a3);
    }
}
KVQ__DEFINE_DOT_CODES(KVQ__AVX2_FN, avx2)

/* 64 channels from c0 for one head, tokens outside (rows in address order; see the AVX-512 kernel). */
KVQ__AVX2_FN void kvq__acc_f16_64_avx2(const uint16_t *const *rows, int n, int c0, const float *pa, float *o) {
    __m256 a0 = _mm256_loadu_ps(o), a1 = _mm256_loadu_ps(o + 8), a2 = _mm256_loadu_ps(o + 16),
           a3 = _mm256_loadu_ps(o + 24), a4 = _mm256_loadu_ps(o + 32), a5 = _mm256_loadu_ps(o + 40),
           a6 = _mm256_loadu_ps(o + 48), a7 = _mm256_loadu_ps(o + 56);
    int t;
    for (t = 0; t < n; t++) {
        const uint16_t *r = rows[t] + c0;
        const __m256 w = _mm256_set1_ps(pa[t]);
        a0 = _mm256_fmadd_ps(w, kvq__f16x8_avx2(r), a0);
        a1 = _mm256_fmadd_ps(w, kvq__f16x8_avx2(r + 8), a1);
        a2 = _mm256_fmadd_ps(w, kvq__f16x8_avx2(r + 16), a2);
        a3 = _mm256_fmadd_ps(w, kvq__f16x8_avx2(r + 24), a3);
        a4 = _mm256_fmadd_ps(w, kvq__f16x8_avx2(r + 32), a4);
        a5 = _mm256_fmadd_ps(w, kvq__f16x8_avx2(r + 40), a5);
        a6 = _mm256_fmadd_ps(w, kvq__f16x8_avx2(r + 48), a6);
        a7 = _mm256_fmadd_ps(w, kvq__f16x8_avx2(r + 56), a7);
    }
    _mm256_storeu_ps(o, a0); _mm256_storeu_ps(o + 8, a1); _mm256_storeu_ps(o + 16, a2);
    _mm256_storeu_ps(o + 24, a3); _mm256_storeu_ps(o + 32, a4); _mm256_storeu_ps(o + 40, a5);
    _mm256_storeu_ps(o + 48, a6); _mm256_storeu_ps(o + 56, a7);
}
KVQ__AVX2_FN void kvq__acc_f16_avx2(const uint16_t *const *rows, int n, int D, const float *p, int nh,
                                    float *const *acc) {
    int j0, cc, t;
    kvq__prefetch_rows_avx2(rows, n, D);
    if (D % 64 == 0) {
        for (cc = 0; cc < D; cc += 64)
            for (j0 = 0; j0 < nh; j0++) kvq__acc_f16_64_avx2(rows, n, cc, p + (size_t)j0 * KVQ__TILE, acc[j0] + cc);
        return;
    }
    for (j0 = 0; j0 < nh; j0 += 4) {
        const int nj = nh - j0 < 4 ? nh - j0 : 4;
        const float *p0 = p + (size_t)j0 * KVQ__TILE;
        for (cc = 0; cc < D; cc += 8) {
            __m256 a0 = _mm256_loadu_ps(acc[j0] + cc), a1 = a0, a2 = a0, a3 = a0;
            if (nj > 1) a1 = _mm256_loadu_ps(acc[j0 + 1] + cc);
            if (nj > 2) a2 = _mm256_loadu_ps(acc[j0 + 2] + cc);
            if (nj > 3) a3 = _mm256_loadu_ps(acc[j0 + 3] + cc);
            for (t = 0; t < n; t++) {
                __m256 v = kvq__f16x8_avx2(rows[t] + cc);
                a0 = _mm256_fmadd_ps(_mm256_set1_ps(p0[t]), v, a0);
                if (nj > 1) a1 = _mm256_fmadd_ps(_mm256_set1_ps(p0[KVQ__TILE + t]), v, a1);
                if (nj > 2) a2 = _mm256_fmadd_ps(_mm256_set1_ps(p0[2 * KVQ__TILE + t]), v, a2);
                if (nj > 3) a3 = _mm256_fmadd_ps(_mm256_set1_ps(p0[3 * KVQ__TILE + t]), v, a3);
            }
            _mm256_storeu_ps(acc[j0] + cc, a0);
            if (nj > 1) _mm256_storeu_ps(acc[j0 + 1] + cc, a1);
            if (nj > 2) _mm256_storeu_ps(acc[j0 + 2] + cc, a2);
            if (nj > 3) _mm256_storeu_ps(acc[j0 + 3] + cc, a3);
        }
    }
}

/* Rotation butterflies, len >= 8. */
KVQ__AVX2_FN void kvq__butterflies_avx2(float *x, int n, int len) {
    int i, j;
    for (i = 0; i < n; i += 2 * len)
        for (j = i; j < i + len; j += 8) {
            __m256 a = _mm256_loadu_ps(x + j), b = _mm256_loadu_ps(x + j + len);
            _mm256_storeu_ps(x + j, _mm256_add_ps(a, b));
            _mm256_storeu_ps(x + j + len, _mm256_sub_ps(a, b));
        }
}
/* 16-bit value params (kvq__params16_scalar), 8 groups a step: the scale is the fp16 whose bits
   are e << 7 (vcvtph2ps, subnormals included), the min m8 * s / 16 (exact). ng 4 (two tokens a
   step) and multiples of 8 here; other counts, and a last odd token, take the scalar decode. */
KVQ__AVX2_FN void kvq__params16_avx2(const uint16_t *par, int n, int ng, float *out) {
    const int total = n * ng;
    int i = 0;
    if (ng == 4 || ng % 8 == 0)
        for (; i + 8 <= total; i += 8) {
            const __m128i u = _mm_loadu_si128((const __m128i *)(const void *)(par + i));
            const __m256 s = _mm256_cvtph_ps(_mm_slli_epi16(_mm_and_si128(u, _mm_set1_epi16(0xff)), 7));
            const __m256 m = _mm256_mul_ps(_mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi16_epi32(_mm_srai_epi16(u, 8))), s),
                                           _mm256_set1_ps(0.0625f));
            float *o = out + (size_t)(i / ng) * 2 * ng + i % ng; /* group i % ng of token i / ng */
            if (ng == 4) { /* tokens i / 4 and i / 4 + 1: scale[4], min[4] each */
                _mm256_storeu_ps(o, _mm256_permute2f128_ps(s, m, 0x20));
                _mm256_storeu_ps(o + 8, _mm256_permute2f128_ps(s, m, 0x31));
            } else {
                _mm256_storeu_ps(o, s);
                _mm256_storeu_ps(o + ng, m);
            }
        }
    kvq__params16_scalar(par + i, (total - i) / ng, ng, out + (size_t)(i / ng) * 2 * ng);
}
#if !defined(KVQ__ANALYZER) /* make lint's gcc -fanalyzer: the integer kernels are the reference there */
/* ---- AVX2 integer attention, the scheme of "Integer attention". No vpdpbusd here: vpmaddubsw
   (u8 x s8, adjacent products summed to 16 bits) on word lanes that each hold two codes of one
   token (keys: channels c, c + 1) or of one channel (values: tokens t, t + 1), summed in 16 bits
   for K = 8 << (4 - bits) pairs (the bounds below), then widened to 32. Two codes a lane, not
   the AVX-512 kernels' four: two rows make a vector with one blend (four rows, of a key block
   up to 128 bytes apart, would need a gather), and 16 lanes of 16 bits take 16 tokens or
   channels a step. ---- */

/* Two packed rows of n codes, a and b, as 16 word lanes: codes [i, i + 16) (i a multiple of 16),
   dword d = bytes (a_{i+d}, b_{i+d}, a_{i+8+d}, b_{i+8+d}). Each row's bytes of those codes are read
   exactly (8, 4, or 4 + 2 bytes); one broadcast per row, a blend, a byte shuffle gathers each
   lane's bytes and a per-lane shift brings its codes to bit 0 (a 3-bit high plane's bit d to 2). */
KVQ__AVX2_INLINE __m256i kvq__pair16_avx2(const uint8_t *a, const uint8_t *b, int n, int i, const int bits) {
    __m256i v;
    int32_t x, y;
    if (bits == 4) { /* byte k holds codes 2k, 2k + 1; qwords (a, b, a, b) */
        long long x8, y8;
        memcpy(&x8, a + i / 2, 8);
        memcpy(&y8, b + i / 2, 8);
        v = _mm256_blend_epi32(_mm256_set1_epi64x(x8), _mm256_set1_epi64x(y8), 0xcc);
        v = _mm256_shuffle_epi8(v, _mm256_setr_epi8(0, 8, 4, 12, 0, 8, 4, 12, 1, 9, 5, 13, 1, 9, 5, 13, 2, 10, 6, 14, 2,
                                                    10, 6, 14, 3, 11, 7, 15, 3, 11, 7, 15));
        return _mm256_and_si256(_mm256_srlv_epi32(v, _mm256_setr_epi32(0, 4, 0, 4, 0, 4, 0, 4)), _mm256_set1_epi8(15));
    }
    memcpy(&x, a + i / 4, 4); /* 2 bits, or a 3-bit low plane: byte k holds codes 4k..4k+3 */
    memcpy(&y, b + i / 4, 4);
    v = _mm256_blend_epi32(_mm256_set1_epi32(x), _mm256_set1_epi32(y), 0xaa); /* dwords (a, b, ...) */
    v = _mm256_shuffle_epi8(v, _mm256_setr_epi8(0, 4, 2, 6, 0, 4, 2, 6, 0, 4, 2, 6, 0, 4, 2, 6, 1, 5, 3, 7, 1, 5, 3,
                                                7, 1, 5, 3, 7, 1, 5, 3, 7));
    v = _mm256_and_si256(_mm256_srlv_epi32(v, _mm256_setr_epi32(0, 2, 4, 6, 0, 2, 4, 6)), _mm256_set1_epi8(3));
    if (bits == 3) { /* high planes: byte k holds bit 2 of codes 8k..8k+7 */
        uint16_t ha, hb;
        __m256i h;
        memcpy(&ha, a + kvq__hi_at(n, i), 2);
        memcpy(&hb, b + kvq__hi_at(n, i), 2);
        h = _mm256_shuffle_epi8(_mm256_set1_epi32((int)((uint32_t)ha | (uint32_t)hb << 16)), /* (a0, b0, a1, b1) */
                                _mm256_setr_epi8(0, 2, 1, 3, 4, 6, 5, 7, 8, 10, 9, 11, 12, 14, 13, 15, 0, 2, 1, 3, 4, 6,
                                                 5, 7, 8, 10, 9, 11, 12, 14, 13, 15));
        h = _mm256_slli_epi32(_mm256_srlv_epi32(h, _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7)), 2);
        v = _mm256_or_si256(v, _mm256_and_si256(h, _mm256_set1_epi8(4)));
    }
    return v;
}
/* 32-bit sums of kvq__pair16_avx2's lanes, a from its words' unpacklo (codes 0, 8, 1, 9 | 4, 12,
   5, 13), b from unpackhi (2, 10, 3, 11 | 6, 14, 7, 15), as codes 0-7 and 8-15. */
KVQ__AVX2_INLINE void kvq__pair_order_avx2(__m256 a, __m256 b, __m256 *lo, __m256 *hi) {
    *lo = _mm256_shuffle_ps(a, b, _MM_SHUFFLE(2, 0, 2, 0));
    *hi = _mm256_shuffle_ps(a, b, _MM_SHUFFLE(3, 1, 3, 1));
}
KVQ__AVX2_FN float kvq__hmax_avx2(__m256 v) {
    __m128 m = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    m = _mm_max_ps(m, _mm_movehl_ps(m, m));
    m = _mm_max_ss(m, _mm_movehdup_ps(m));
    return _mm_cvtss_f32(m);
}

/* kvq__query_q16's bytes of qs[D] x inv (cvtps rounds to nearest even, as rintf), 16 channels a
   step, as pair words for the key lanes: qh[p] = (hi_2p, hi_2p+1) twice, ql[p] likewise lo. With
   x = q16 + 128 (in int16: |q16| <= 32639), hi is x's high byte and lo its low byte less 128. */
KVQ__AVX2_FN void kvq__query_pairs_avx2(const float *qs, int D, float inv, int32_t *qh, int32_t *ql) {
    const __m256 vi = _mm256_set1_ps(inv);
    const __m256i hb = _mm256_setr_epi8(1, 3, 1, 3, 5, 7, 5, 7, 9, 11, 9, 11, 13, 15, 13, 15, 1, 3, 1, 3, 5, 7, 5, 7, 9,
                                        11, 9, 11, 13, 15, 13, 15);
    const __m256i lb = _mm256_setr_epi8(0, 2, 0, 2, 4, 6, 4, 6, 8, 10, 8, 10, 12, 14, 12, 14, 0, 2, 0, 2, 4, 6, 4, 6, 8,
                                        10, 8, 10, 12, 14, 12, 14);
    int c;
    for (c = 0; c < D; c += 16) { /* D % 16 == 8: the last step's second half is zeros, not stored */
        const __m256i v0 = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(qs + c), vi));
        const __m256i v1 = c + 8 < D ? _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(qs + c + 8), vi))
                                     : _mm256_setzero_si256();
        const __m256i x = _mm256_add_epi16(_mm256_permute4x64_epi64(_mm256_packs_epi32(v0, v1), 0xd8),
                                           _mm256_set1_epi16(128)); /* channels c..c+15 in order */
        const __m256i h = _mm256_shuffle_epi8(x, hb);
        const __m256i l = _mm256_xor_si256(_mm256_shuffle_epi8(x, lb), _mm256_set1_epi8(-128));
        if (c + 8 < D) {
            _mm256_storeu_si256((__m256i *)(void *)(qh + c / 2), h);
            _mm256_storeu_si256((__m256i *)(void *)(ql + c / 2), l);
        } else {
            _mm_storeu_si128((__m128i *)(void *)(qh + c / 2), _mm256_castsi256_si128(h));
            _mm_storeu_si128((__m128i *)(void *)(ql + c / 2), _mm256_castsi256_si128(l));
        }
    }
}

KVQ__AVX2_INLINE __m256i kvq__load8_avx2(const int32_t *e) {
    return _mm256_loadu_si256((const __m256i *)(const void *)e);
}
/* e[0..8) += x: a 32-bit sum kept in memory (not in registers across the loops that feed it). */
KVQ__AVX2_INLINE void kvq__add8_avx2(int32_t *e, __m256i x) {
    _mm256_storeu_si256((__m256i *)(void *)e, _mm256_add_epi32(kvq__load8_avx2(e), x));
}

/* Scores of nj <= 4 heads, 16 tokens a vector (bits and nj constant where inlined). A channel pair
   adds code x hi and code x lo to 16-bit lanes, |each| <= 2 top 128: K pairs stay within int16
   (30720 at 4 bits), then (lo, hi) x (1, 256) widens them to 256 hi + lo, summed in sum[t0][j]. */
KVQ__AVX2_INLINE void kvq__scores_int_pass_avx2(const uint8_t *codes, int D, int G, const int bits, const int32_t *qh,
                                                const int32_t *ql, const float *unit, const float *bias, const int nj,
                                                float *s0) {
    const size_t rb = (size_t)G * bits / 8;
    const int np = D / 2, K = 8 << (4 - bits);
    const __m256i z = _mm256_setzero_si256(), w = _mm256_set1_epi32(0x01000001);
    int32_t sum[KVQ__TILE * 4]; /* [t0 / 16][j][16] */
    int t0, p0, p, j;
    for (t0 = 0; t0 < 4 * G; t0 += 8) _mm256_storeu_si256((__m256i *)(void *)(sum + t0), z);
    for (p0 = 0; p0 < np; p0 += K) {
        const int p1 = np - p0 < K ? np : p0 + K;
        for (t0 = 0; t0 < G; t0 += 16) {
            int32_t *e = sum + 4 * t0;
            __m256i h0 = z, l0 = z, h1 = z, l1 = z, h2 = z, l2 = z, h3 = z, l3 = z;
            for (p = p0; p < p1; p++) {
                const uint8_t *r = codes + 2 * rb * (size_t)p;
                const __m256i v = kvq__pair16_avx2(r, r + rb, G, t0, bits);
#define KVQ__PAIR_DOT(j, h, l)                                                                                    \
                (h) = _mm256_add_epi16(h, _mm256_maddubs_epi16(v, _mm256_set1_epi32(qh[(j) * np + p])));          \
                (l) = _mm256_add_epi16(l, _mm256_maddubs_epi16(v, _mm256_set1_epi32(ql[(j) * np + p])));
                KVQ__PAIR_DOT(0, h0, l0)
                if (nj > 1) { KVQ__PAIR_DOT(1, h1, l1) }
                if (nj > 2) { KVQ__PAIR_DOT(2, h2, l2) }
                if (nj > 3) { KVQ__PAIR_DOT(3, h3, l3) }
#undef KVQ__PAIR_DOT
            }
#define KVQ__WIDEN(j, h, l)                                                                                       \
            kvq__add8_avx2(e + 16 * (j), _mm256_madd_epi16(_mm256_unpacklo_epi16(l, h), w));                      \
            kvq__add8_avx2(e + 16 * (j) + 8, _mm256_madd_epi16(_mm256_unpackhi_epi16(l, h), w));
            KVQ__WIDEN(0, h0, l0)
            if (nj > 1) { KVQ__WIDEN(1, h1, l1) }
            if (nj > 2) { KVQ__WIDEN(2, h2, l2) }
            if (nj > 3) { KVQ__WIDEN(3, h3, l3) }
#undef KVQ__WIDEN
        }
    }
    for (t0 = 0; t0 < G; t0 += 16)
        for (j = 0; j < nj; j++) {
            const int32_t *e = sum + 4 * t0 + 16 * j;
            const __m256 u = _mm256_set1_ps(unit[j]), c = _mm256_set1_ps(bias[j]);
            __m256 lo, hi;
            kvq__pair_order_avx2(_mm256_fmadd_ps(_mm256_cvtepi32_ps(kvq__load8_avx2(e)), u, c),
                                 _mm256_fmadd_ps(_mm256_cvtepi32_ps(kvq__load8_avx2(e + 8)), u, c), &lo, &hi);
            _mm256_storeu_ps(s0 + (size_t)j * KVQ__TILE + t0, lo);
            _mm256_storeu_ps(s0 + (size_t)j * KVQ__TILE + t0 + 8, hi);
        }
}
KVQ__AVX2_FN void kvq__scores_int_avx2(const uint8_t *blk, int D, int G, int bits, const float *q, int nh,
                                       float *scores) {
    const uint16_t *sc = (const uint16_t *)(const void *)blk;
    const uint8_t *codes = kvq__block_codes(blk, D);
    const __m256 mag = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff)); /* |x|: the sign bit off */
    float qs[KVQ__HEAD_CHUNK * 512], scale[512], mins[512], amax[KVQ__HEAD_CHUNK + 7] = {0}, inv[KVQ__HEAD_CHUNK + 7],
          unit[KVQ__HEAD_CHUNK + 7], bias[KVQ__HEAD_CHUNK];
    int32_t qh[KVQ__HEAD_CHUNK * 256], ql[KVQ__HEAD_CHUNK * 256];
    int j, j0, ch;
    kvq__to_f32_avx2(scale, sc, D);
    kvq__to_f32_avx2(mins, sc + D, D);
    for (j = 0; j < nh; j++) { /* the scaled query and its largest magnitude; the mins are one bias */
        const float *qj = q + (size_t)j * D;
        float *sj = qs + (size_t)j * D;
        __m256 b0 = _mm256_setzero_ps(), b1 = b0, m0 = b0, m1 = b0, v;
        for (ch = 0; ch < D; ch += 16) { /* two chains: the sums' latency, not the work, bounds this loop */
            v = _mm256_loadu_ps(qj + ch);
            b0 = _mm256_fmadd_ps(v, _mm256_loadu_ps(mins + ch), b0);
            _mm256_storeu_ps(sj + ch, v = _mm256_mul_ps(v, _mm256_loadu_ps(scale + ch)));
            m0 = _mm256_max_ps(m0, _mm256_and_ps(v, mag));
            if (ch + 8 == D) break;
            v = _mm256_loadu_ps(qj + ch + 8);
            b1 = _mm256_fmadd_ps(v, _mm256_loadu_ps(mins + ch + 8), b1);
            _mm256_storeu_ps(sj + ch + 8, v = _mm256_mul_ps(v, _mm256_loadu_ps(scale + ch + 8)));
            m1 = _mm256_max_ps(m1, _mm256_and_ps(v, mag));
        }
        bias[j] = kvq__hsum_avx2(_mm256_add_ps(b0, b1));
        amax[j] = kvq__hmax_avx2(_mm256_max_ps(m0, m1));
    }
    for (j = 0; j < nh; j += 8) { /* inv = 32639 / amax (0 where amax is 0), unit = amax / 32639: 8 heads a division */
        const __m256 a = _mm256_loadu_ps(amax + j);
        _mm256_storeu_ps(inv + j, _mm256_and_ps(_mm256_div_ps(_mm256_set1_ps(KVQ__Q16), a),
                                                _mm256_cmp_ps(a, _mm256_setzero_ps(), _CMP_GT_OQ)));
        _mm256_storeu_ps(unit + j, _mm256_div_ps(a, _mm256_set1_ps(KVQ__Q16)));
    }
    for (j = 0; j < nh; j++)
        kvq__query_pairs_avx2(qs + (size_t)j * D, D, inv[j], qh + (size_t)j * D / 2, ql + (size_t)j * D / 2);
    for (j0 = 0; j0 < nh; j0 += 4) {
        const int nj = nh - j0 < 4 ? nh - j0 : 4;
        const int32_t *h = qh + (size_t)j0 * D / 2, *l = ql + (size_t)j0 * D / 2;
        float *s0 = scores + (size_t)j0 * KVQ__TILE;
#define KVQ__PASS(b, n) kvq__scores_int_pass_avx2(codes, D, G, b, h, l, unit + j0, bias + j0, n, s0)
        KVQ__INT_CASES(bits, nj, KVQ__PASS)
#undef KVQ__PASS
    }
}

/* Byte weights of one token for 8 groups: rint(p s x inv), w = p s first (the scalar's rounding). */
KVQ__AVX2_INLINE __m256i kvq__w8_avx2(__m256 s, float p, __m256 inv) {
    return _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_mul_ps(_mm256_set1_ps(p), s), inv));
}
/* Weights w0 (token t) and w1 (t + 1) of head j as its pair words (w0, w1) twice at wd + j hs. */
#define KVQ__PAIR_WORDS(j, inv, sum)                                                                              \
    {                                                                                                             \
        const __m256i w0 = kvq__w8_avx2(s0, p[(j) * KVQ__TILE + t], inv);                                         \
        const __m256i w1 = t + 1 < n ? kvq__w8_avx2(s1, p[(j) * KVQ__TILE + t + 1], inv) : _mm256_setzero_si256(); \
        const __m256i x = _mm256_or_si256(w0, _mm256_slli_epi32(w1, 8));                                         \
        (sum) = _mm256_add_epi32(sum, _mm256_add_epi32(w0, w1));                                                  \
        _mm256_storeu_si256((__m256i *)(void *)(wp + (j) * hs), _mm256_or_si256(x, _mm256_slli_epi32(x, 16)));    \
    }
/* The weights of nj <= 4 query heads (kvq__value_weights' bytes) for n tokens, a lane per group, 8
   groups a vector (masked past ng; params rows [t][scale[ng], min[ng]]): head j's pair words
   wd[j hs + k gs + g] = (w8_2k, w8_2k+1) twice for the value lanes, and at [j gs + g] its unit,
   bias (summed in the scalar's order, the heads side by side) and W = sum w8. A token past n
   weighs 0. */
KVQ__AVX2_INLINE void kvq__value_weights_avx2(const float *par, int n, int ng, int gs, int top, const float *p,
                                              const int nj, int32_t *wd, size_t hs, int32_t *wsum, float *unit,
                                              float *bias) {
    const __m256 half = _mm256_set1_ps(0.5f * (float)top), zero = _mm256_setzero_ps();
    const size_t row = 2 * (size_t)ng;
    int g0, t;
    for (g0 = 0; g0 < ng; g0 += 8) {
        const __m256i m = _mm256_cmpgt_epi32(_mm256_set1_epi32(ng - g0), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
        const float *pg = par + g0;
        __m256 x0 = _mm256_set1_ps(KVQ__W_MIN), x1 = x0, x2 = x0, x3 = x0, b0 = zero, b1 = zero, b2 = zero, b3 = zero;
        __m256i u0 = _mm256_setzero_si256(), u1 = u0, u2 = u0, u3 = u0;
        for (t = 0; t < n; t++) { /* wmax = max p s, bias = sum p (m + s top / 2) */
            const __m256 s = _mm256_maskload_ps(pg + row * (size_t)t, m);
            const __m256 mv = _mm256_fmadd_ps(s, half, _mm256_maskload_ps(pg + row * (size_t)t + ng, m));
#define KVQ__MAX_BIAS(j, x, b)                                                                                    \
            {                                                                                                     \
                const __m256 pv = _mm256_set1_ps(p[(j) * KVQ__TILE + t]);                                         \
                (x) = _mm256_max_ps(x, _mm256_mul_ps(pv, s));                                                     \
                (b) = _mm256_fmadd_ps(pv, mv, b);                                                                 \
            }
            KVQ__MAX_BIAS(0, x0, b0)
            if (nj > 1) KVQ__MAX_BIAS(1, x1, b1)
            if (nj > 2) KVQ__MAX_BIAS(2, x2, b2)
            if (nj > 3) KVQ__MAX_BIAS(3, x3, b3)
#undef KVQ__MAX_BIAS
        }
#define KVQ__UNIT_INV(j, x, b) /* unit = wmax / 510, then x = 255 / wmax in place */                          \
        {                                                                                                         \
            _mm256_storeu_ps(unit + (j) * gs + g0, _mm256_div_ps(x, _mm256_set1_ps(510.0f)));                     \
            _mm256_storeu_ps(bias + (j) * gs + g0, b);                                                            \
            (x) = _mm256_div_ps(_mm256_set1_ps(255.0f), x);                                                       \
        }
        KVQ__UNIT_INV(0, x0, b0)
        if (nj > 1) KVQ__UNIT_INV(1, x1, b1)
        if (nj > 2) KVQ__UNIT_INV(2, x2, b2)
        if (nj > 3) KVQ__UNIT_INV(3, x3, b3)
#undef KVQ__UNIT_INV
        for (t = 0; t < n; t += 2) {
            int32_t *wp = wd + (size_t)(t / 2) * gs + g0;
            const __m256 s0 = _mm256_maskload_ps(pg + row * (size_t)t, m);
            const __m256 s1 = t + 1 < n ? _mm256_maskload_ps(pg + row * (size_t)(t + 1), m) : zero;
            KVQ__PAIR_WORDS(0, x0, u0)
            if (nj > 1) KVQ__PAIR_WORDS(1, x1, u1)
            if (nj > 2) KVQ__PAIR_WORDS(2, x2, u2)
            if (nj > 3) KVQ__PAIR_WORDS(3, x3, u3)
        }
        _mm256_storeu_si256((__m256i *)(void *)(wsum + g0), u0);
        if (nj > 1) _mm256_storeu_si256((__m256i *)(void *)(wsum + gs + g0), u1);
        if (nj > 2) _mm256_storeu_si256((__m256i *)(void *)(wsum + 2 * gs + g0), u2);
        if (nj > 3) _mm256_storeu_si256((__m256i *)(void *)(wsum + 3 * gs + g0), u3);
    }
}
#undef KVQ__PAIR_WORDS

/* Values, 16 channels a vector (one group: G % 16 == 0), over token pairs for nj <= 4 heads: the
   16-bit sums of w8 x code, unsigned, stay below 2^16 for K pairs (8 x 2 x 255 x 15 = 61200 at 4
   bits), then widen; one float step per vector. A pair's second row past n is a zero row. */
KVQ__AVX2_INLINE void kvq__acc_int_pass_avx2(const uint8_t *codes, size_t stride, int n, int D, int G, const int bits,
                                             const int32_t *wd, size_t hs, int gs, const int32_t *wsum,
                                             const float *unit, const float *bias, const int nj, float *const *acc) {
    static const uint8_t zero[256] = {0}; /* D <= 512 codes of 4 bits */
    const int np = (n + 1) / 2, K = 8 << (4 - bits), top = (1 << bits) - 1;
    const __m256i z = _mm256_setzero_si256();
    int c0, p0, p;
    for (c0 = 0; c0 < D; c0 += 16) {
        const int g = c0 / G;
        const int32_t *wg = wd + g; /* head j, pair p: wg[j * hs + p * gs] */
        __m256i a0 = z, b0 = z, a1 = z, b1 = z, a2 = z, b2 = z, a3 = z, b3 = z;
        for (p0 = 0; p0 < np; p0 += K) {
            const int p1 = np - p0 < K ? np : p0 + K;
            __m256i s0 = z, s1 = z, s2 = z, s3 = z;
            for (p = p0; p < p1; p++) {
                const uint8_t *ra = codes + stride * (size_t)(2 * p), *rb = 2 * p + 1 < n ? ra + stride : zero;
                const __m256i v = kvq__pair16_avx2(ra, rb, D, c0, bits);
                const int32_t *w = wg + (size_t)p * gs;
                s0 = _mm256_add_epi16(s0, _mm256_maddubs_epi16(_mm256_set1_epi32(w[0]), v));
                if (nj > 1) s1 = _mm256_add_epi16(s1, _mm256_maddubs_epi16(_mm256_set1_epi32(w[hs]), v));
                if (nj > 2) s2 = _mm256_add_epi16(s2, _mm256_maddubs_epi16(_mm256_set1_epi32(w[2 * hs]), v));
                if (nj > 3) s3 = _mm256_add_epi16(s3, _mm256_maddubs_epi16(_mm256_set1_epi32(w[3 * hs]), v));
            }
#define KVQ__WIDEN(a, b, s)                                                                                       \
            (a) = _mm256_add_epi32(a, _mm256_unpacklo_epi16(s, z));                                                \
            (b) = _mm256_add_epi32(b, _mm256_unpackhi_epi16(s, z));
            KVQ__WIDEN(a0, b0, s0)
            if (nj > 1) { KVQ__WIDEN(a1, b1, s1) }
            if (nj > 2) { KVQ__WIDEN(a2, b2, s2) }
            if (nj > 3) { KVQ__WIDEN(a3, b3, s3) }
#undef KVQ__WIDEN
        }
#define KVQ__VALUES16(j, a, b)                                                                                    \
        { /* acc += unit (2 sum - top W) + bias */                                                                \
            const int i = (j) * gs + g;                                                                           \
            const __m256i tw = _mm256_set1_epi32(top * wsum[i]);                                                  \
            const __m256 u = _mm256_set1_ps(unit[i]), c = _mm256_set1_ps(bias[i]);                                \
            const __m256 ea = _mm256_cvtepi32_ps(_mm256_sub_epi32(_mm256_add_epi32(a, a), tw));                   \
            const __m256 eb = _mm256_cvtepi32_ps(_mm256_sub_epi32(_mm256_add_epi32(b, b), tw));                   \
            __m256 lo, hi;                                                                                        \
            kvq__pair_order_avx2(_mm256_fmadd_ps(ea, u, c), _mm256_fmadd_ps(eb, u, c), &lo, &hi);                 \
            _mm256_storeu_ps(acc[j] + c0, _mm256_add_ps(_mm256_loadu_ps(acc[j] + c0), lo));                       \
            _mm256_storeu_ps(acc[j] + c0 + 8, _mm256_add_ps(_mm256_loadu_ps(acc[j] + c0 + 8), hi));               \
        }
        KVQ__VALUES16(0, a0, b0)
        if (nj > 1) KVQ__VALUES16(1, a1, b1)
        if (nj > 2) KVQ__VALUES16(2, a2, b2)
        if (nj > 3) KVQ__VALUES16(3, a3, b3)
#undef KVQ__VALUES16
    }
}
/* n x ng <= KVQ__WMAX (the caller's params, kvq__value_chunk), n <= KVQ__TILE: a head's pair words
   (n + 1) / 2 x (ng rounded up to 8) fit wd's share. */
KVQ__AVX2_FN void kvq__acc_int_avx2(const uint8_t *codes, size_t stride, const float *par, int n, int D, int G,
                                    int bits, const float *p, int nh, float *const *acc) {
    const int ng = D / G, gs = (ng + 7) & ~7, top = (1 << bits) - 1;
    const size_t hs = (size_t)(n + 1) / 2 * (size_t)gs;
    float unit[4 * 32], bias[4 * 32]; /* ng <= 32: G >= 16, D <= 512 */
    int32_t wd[4 * (KVQ__WMAX / 2 + 4 * KVQ__TILE)], wsum[4 * 32];
    int j0;
    for (j0 = 0; j0 < nh; j0 += 4) {
        const int nj = nh - j0 < 4 ? nh - j0 : 4;
        const float *p0 = p + (size_t)j0 * KVQ__TILE;
        if (nj == 4) kvq__value_weights_avx2(par, n, ng, gs, top, p0, 4, wd, hs, wsum, unit, bias);
        else kvq__value_weights_avx2(par, n, ng, gs, top, p0, nj, wd, hs, wsum, unit, bias);
#define KVQ__PASS(b, k) kvq__acc_int_pass_avx2(codes, stride, n, D, G, b, wd, hs, gs, wsum, unit, bias, k, acc + j0)
        KVQ__INT_CASES(bits, nj, KVQ__PASS)
#undef KVQ__PASS
    }
}
#else
#define kvq__scores_int_avx2 kvq__scores_int_scalar
#define kvq__acc_int_avx2 kvq__acc_int_scalar
#endif /* !KVQ__ANALYZER */
#endif /* KVQ__HAVE_AVX2 */

/* ---- AVX-512 (F/BW/DQ/VL): 16 lanes; a D % 16 == 8 tail is masked. Quantize and
   conversions are the AVX2 kernels (memory-bound, and one copy to keep bit-exact). ---- */
#if KVQ__HAVE_AVX512
#if defined(__GNUC__) && !defined(__clang__) /* g++ 12 warns inside its own AVX-512 intrinsics (PR105593) */
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC diagnostic ignored "-Wuninitialized"
#endif
#define KVQ__AVX512_FN static KVQ__TARGET_AVX512
#define KVQ__AVX512_INLINE static KVQ__INLINE KVQ__TARGET_AVX512

/* 16 codes from a run (two runs), or 8 (half = 1; the upper lanes hold what the shifts leave),
   each code in the low bits of its lane with higher codes above it (bits <= 4): ready for vpermps,
   which reads the low 4 (a table repeats every 2^bits entries). At 3 bits p is the low plane and
   hp the high plane. x86 is little-endian. */
KVQ__AVX512_FN __m512i kvq__index16_avx512(const uint8_t *p, const uint8_t *hp, int bits, int half, __m512i sh) {
    if (bits == 4) { /* byte i twice, shifted by 0 and 4: codes 2i and 2i+1 (sh = 0, 4, 0, 4, ...) */
        __m128i x;
        if (half) {
            uint32_t h;
            memcpy(&h, p, 4);
            x = _mm_cvtsi32_si128((int)h);
        } else {
            x = _mm_loadl_epi64((const __m128i *)(const void *)p);
        }
        return _mm512_srlv_epi32(_mm512_cvtepu8_epi32(_mm_unpacklo_epi8(x, x)), sh);
    }
    { /* 2 bits, or a 3-bit low plane: sh = 0, 2, ..., 30, one word holds all 16 */
        uint32_t w = 0, h = 0;
        __m512i v;
        if (half) memcpy(&w, p, 2); /* constant sizes: one load each */
        else memcpy(&w, p, 4);
        v = _mm512_srlv_epi32(_mm512_set1_epi32((int)w), sh);
        if (bits != 3) return v;
        if (half) h = hp[0]; /* the high plane: code t's bit t to bit 2 of lane t (sh / 2 = t) */
        else memcpy(&h, hp, 2);
        h <<= 2;
        /* ternary logic 0xd8 = c ? b : a, bitwise: bit 2 from the high plane, the others from v */
        return _mm512_ternarylogic_epi32(v, _mm512_srlv_epi32(_mm512_set1_epi32((int)h), _mm512_srli_epi32(sh, 1)),
                                         _mm512_set1_epi32(4), 0xd8);
    }
}
/* tab[i] = s * (i & (2^bits - 1)) + m: one vpermps turns an index vector into dequantized values. */
KVQ__AVX512_FN __m512 kvq__table_avx512(int bits, __m512 s, __m512 m) {
    const __m512i i = _mm512_and_si512(_mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
                                       _mm512_set1_epi32((1 << bits) - 1));
    return _mm512_fmadd_ps(s, _mm512_cvtepi32_ps(i), m);
}
KVQ__AVX512_FN __m512 kvq__codes16_avx512(const uint8_t *p, const uint8_t *hp, int bits, int half, __m512i sh,
                                          __m512 tab) {
    if (bits == 8)
        return _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(half ? _mm_loadl_epi64((const __m128i *)(const void *)p)
                                                              : _mm_loadu_si128((const __m128i *)(const void *)p)));
    return _mm512_permutexvar_ps(kvq__index16_avx512(p, hp, bits, half, sh), tab);
}
KVQ__AVX512_FN __m512i kvq__shifts_avx512(int bits) { /* 8 bits: unused */
    if (bits == 4) return _mm512_setr_epi32(0, 4, 0, 4, 0, 4, 0, 4, 0, 4, 0, 4, 0, 4, 0, 4);
    return _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
}
/* fp16 -> f32; the zero-masked form avoids g++ 12's false maybe-uninitialized in _mm512_cvtph_ps */
KVQ__AVX512_FN __m512 kvq__cvtph_avx512(__m256i h) { return _mm512_maskz_cvtph_ps((__mmask16)0xffff, h); }
/* Plain loads where the chunk is full (masked loads measured slower from DRAM here). */
KVQ__AVX512_FN __m512 kvq__f16x16_avx512(const uint16_t *p, __mmask16 k) {
    if (k == 0xffff) return kvq__cvtph_avx512(_mm256_loadu_si256((const __m256i *)(const void *)p));
    return kvq__cvtph_avx512(_mm256_maskz_loadu_epi16(k, p));
}
KVQ__AVX512_FN __m512 kvq__load16_avx512(const float *p, __mmask16 k) {
    if (k == 0xffff) return _mm512_loadu_ps(p);
    return _mm512_maskz_loadu_ps(k, p);
}
KVQ__AVX512_FN __mmask16 kvq__mask_avx512(int left) { return (__mmask16)(left >= 16 ? 0xffff : 0x00ff); }

KVQ__AVX512_INLINE void kvq__scores_pass_avx512(const uint8_t *codes, int D, int G, const int bits,
                                                const float *q0, const float *bias, const int nj, float *s0) {
    const size_t rb = (size_t)G * bits / 8;
    const __m512i sh = kvq__shifts_avx512(bits);
    const __m512 tab = kvq__table_avx512(bits, _mm512_set1_ps(1.0f), _mm512_setzero_ps()); /* code as float */
    int ch, t0;
    for (t0 = 0; t0 < G; t0 += 16) {
        const uint8_t *cp = codes + kvq__run_at(t0, bits), *hp = kvq__hi_ptr(codes, G, t0, bits);
        __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
        for (ch = 0; ch < D; ch++, cp += rb, hp += rb) {
            __m512 v = kvq__codes16_avx512(cp, hp, bits, 0, sh, tab);
            a0 = _mm512_fmadd_ps(_mm512_set1_ps(q0[ch]), v, a0);
            if (nj > 1) a1 = _mm512_fmadd_ps(_mm512_set1_ps(q0[D + ch]), v, a1);
            if (nj > 2) a2 = _mm512_fmadd_ps(_mm512_set1_ps(q0[2 * D + ch]), v, a2);
            if (nj > 3) a3 = _mm512_fmadd_ps(_mm512_set1_ps(q0[3 * D + ch]), v, a3);
        }
        _mm512_storeu_ps(s0 + t0, _mm512_add_ps(a0, _mm512_set1_ps(bias[0])));
        if (nj > 1) _mm512_storeu_ps(s0 + KVQ__TILE + t0, _mm512_add_ps(a1, _mm512_set1_ps(bias[1])));
        if (nj > 2) _mm512_storeu_ps(s0 + 2 * KVQ__TILE + t0, _mm512_add_ps(a2, _mm512_set1_ps(bias[2])));
        if (nj > 3) _mm512_storeu_ps(s0 + 3 * KVQ__TILE + t0, _mm512_add_ps(a3, _mm512_set1_ps(bias[3])));
    }
}
KVQ__AVX512_FN void kvq__scores_codes_avx512(const uint8_t *blk, int D, int G, int bits, const float *q, int nh,
                                             float *scores) {
    const uint16_t *sc = (const uint16_t *)(const void *)blk, *mn = sc + D;
    const uint8_t *codes = kvq__block_codes(blk, D);
    float qs[KVQ__HEAD_CHUNK * 512], bias[KVQ__HEAD_CHUNK];
    int j, j0, ch;
    for (j = 0; j < nh; j++) { /* fold the channel scales into the query; the mins are one bias */
        __m512 b = _mm512_setzero_ps();
        for (ch = 0; ch < D; ch += 16) {
            __mmask16 k = kvq__mask_avx512(D - ch);
            __m512 qv = _mm512_maskz_loadu_ps(k, q + (size_t)j * D + ch);
            _mm512_mask_storeu_ps(qs + (size_t)j * D + ch, k, _mm512_mul_ps(qv, kvq__f16x16_avx512(sc + ch, k)));
            b = _mm512_fmadd_ps(qv, kvq__f16x16_avx512(mn + ch, k), b);
        }
        bias[j] = _mm512_reduce_add_ps(b);
    }
    for (j0 = 0; j0 < nh; j0 += 4) {
        const int nj = nh - j0 < 4 ? nh - j0 : 4;
        const float *q0 = qs + (size_t)j0 * D;
        float *s0 = scores + (size_t)j0 * KVQ__TILE;
        /* constant bits and head count in the hot loops; 3 bits runs the general copy (copies of its
           own, here and in the value pass, measured no faster and the 2- and 4-bit ones 5-8% slower) */
        switch (bits * 8 + (nj == 4)) {
        case 17: kvq__scores_pass_avx512(codes, D, G, 2, q0, bias + j0, 4, s0); break;
        case 33: kvq__scores_pass_avx512(codes, D, G, 4, q0, bias + j0, 4, s0); break;
        case 16: kvq__scores_pass_avx512(codes, D, G, 2, q0, bias + j0, nj, s0); break;
        case 32: kvq__scores_pass_avx512(codes, D, G, 4, q0, bias + j0, nj, s0); break;
        default: kvq__scores_pass_avx512(codes, D, G, bits, q0, bias + j0, nj, s0); break;
        }
    }
}

KVQ__AVX512_INLINE void kvq__scores_f16_pass_avx512(const uint16_t *const *rows, int n, int D, const float *q0,
                                                    const int nj, float *s0) {
    int t, ch;
    for (t = 0; t < n; t++) {
        __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
        for (ch = 0; ch < D; ch += 16) {
            __mmask16 k = kvq__mask_avx512(D - ch);
            __m512 v = kvq__f16x16_avx512(rows[t] + ch, k);
            a0 = _mm512_fmadd_ps(kvq__load16_avx512(q0 + ch, k), v, a0);
            if (nj > 1) a1 = _mm512_fmadd_ps(kvq__load16_avx512(q0 + D + ch, k), v, a1);
            if (nj > 2) a2 = _mm512_fmadd_ps(kvq__load16_avx512(q0 + 2 * D + ch, k), v, a2);
            if (nj > 3) a3 = _mm512_fmadd_ps(kvq__load16_avx512(q0 + 3 * D + ch, k), v, a3);
        }
        if (nj == 4) { /* 16 -> 8 lanes, then the AVX2 four-way sum */
            __m128 s = kvq__hsum4_avx2(_mm256_add_ps(_mm512_castps512_ps256(a0), _mm512_extractf32x8_ps(a0, 1)),
                                       _mm256_add_ps(_mm512_castps512_ps256(a1), _mm512_extractf32x8_ps(a1, 1)),
                                       _mm256_add_ps(_mm512_castps512_ps256(a2), _mm512_extractf32x8_ps(a2, 1)),
                                       _mm256_add_ps(_mm512_castps512_ps256(a3), _mm512_extractf32x8_ps(a3, 1)));
            _mm_store_ss(s0 + t, s);
            _mm_store_ss(s0 + KVQ__TILE + t, _mm_movehdup_ps(s));
            _mm_store_ss(s0 + 2 * KVQ__TILE + t, _mm_movehl_ps(s, s));
            _mm_store_ss(s0 + 3 * KVQ__TILE + t, _mm_shuffle_ps(s, s, 3));
            continue;
        }
        s0[t] = _mm512_reduce_add_ps(a0);
        if (nj > 1) s0[KVQ__TILE + t] = _mm512_reduce_add_ps(a1);
        if (nj > 2) s0[2 * KVQ__TILE + t] = _mm512_reduce_add_ps(a2);
    }
}
KVQ__AVX512_FN void kvq__scores_f16_avx512(const uint16_t *const *rows, int n, int D, const float *q, int nh,
                                           float *scores) {
    int j0;
    kvq__prefetch_rows_avx2(rows, n, D);
    for (j0 = 0; j0 < nh; j0 += 4) {
        const int nj = nh - j0 < 4 ? nh - j0 : 4;
        if (nj == 4) kvq__scores_f16_pass_avx512(rows, n, D, q + (size_t)j0 * D, 4, scores + (size_t)j0 * KVQ__TILE);
        else kvq__scores_f16_pass_avx512(rows, n, D, q + (size_t)j0 * D, nj, scores + (size_t)j0 * KVQ__TILE);
    }
}

/* The AVX2 kernel's exp, 16 lanes. */
KVQ__AVX512_FN __m512 kvq__exp_avx512(__m512 x) {
    const __m512 l2e = _mm512_set1_ps(1.44269504f), c1 = _mm512_set1_ps(0.693359375f),
                 c2 = _mm512_set1_ps(-2.12194440e-4f);
    __m512 n, r, p;
    x = _mm512_max_ps(x, _mm512_set1_ps(-87.0f));
    n = _mm512_roundscale_ps(_mm512_mul_ps(x, l2e), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    r = _mm512_fnmadd_ps(n, c1, x);
    r = _mm512_fnmadd_ps(n, c2, r);
    p = _mm512_set1_ps(1.9875691500e-4f);
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
    p = _mm512_fmadd_ps(p, _mm512_mul_ps(r, r), _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
    return _mm512_castsi512_ps(_mm512_add_epi32(_mm512_castps_si512(p),
                                                _mm512_slli_epi32(_mm512_cvtps_epi32(n), 23)));
}
KVQ__AVX512_FN float kvq__exp_sum_avx512(float *x, int n, float mx) {
    const __m512 vm = _mm512_set1_ps(mx);
    __m512 acc = _mm512_setzero_ps();
    int t;
    for (t = 0; t < n; t += 16) {
        __mmask16 k = (__mmask16)(n - t >= 16 ? 0xffff : (1u << (n - t)) - 1u);
        __m512 e = kvq__exp_avx512(_mm512_sub_ps(_mm512_maskz_loadu_ps(k, x + t), vm));
        _mm512_mask_storeu_ps(x + t, k, e);
        acc = _mm512_mask_add_ps(acc, k, acc, e);
    }
    return _mm512_reduce_add_ps(acc);
}

KVQ__AVX512_INLINE void kvq__acc_pass_avx512(const uint8_t *codes, size_t stride, const float *par, int n, int D,
                                             int G, const int bits, const float *p0, const int nj,
                                             float *const *acc) {
    const int ng = (D + G - 1) / G;
    const __m512i sh = kvq__shifts_avx512(bits);
    const __m512 one = _mm512_set1_ps(1.0f);
    int cc, t;
    for (cc = 0; cc < D;) {
        /* two chunks of one group share each token's table (bits < 8) */
        const int pair = bits < 8 && D - cc >= 32 && cc / G == (cc + 16) / G, half = D - cc < 16;
        const __mmask16 k = kvq__mask_avx512(D - cc);
        const float *pt = par + cc / G;
        const uint8_t *cp = codes + kvq__run_at(cc, bits), *hp = kvq__hi_ptr(codes, D, cc, bits);
        __m512 a0 = _mm512_maskz_loadu_ps(k, acc[0] + cc), a1 = a0, a2 = a0, a3 = a0;
        __m512 b0 = a0, b1 = a0, b2 = a0, b3 = a0;
        if (nj > 1) a1 = _mm512_maskz_loadu_ps(k, acc[1] + cc);
        if (nj > 2) a2 = _mm512_maskz_loadu_ps(k, acc[2] + cc);
        if (nj > 3) a3 = _mm512_maskz_loadu_ps(k, acc[3] + cc);
        if (pair) {
            b0 = _mm512_loadu_ps(acc[0] + cc + 16);
            if (nj > 1) b1 = _mm512_loadu_ps(acc[1] + cc + 16);
            if (nj > 2) b2 = _mm512_loadu_ps(acc[2] + cc + 16);
            if (nj > 3) b3 = _mm512_loadu_ps(acc[3] + cc + 16);
        }
        for (t = 0; t < n; t++, cp += stride, hp += stride, pt += 2 * ng) {
            __m512 v, u, tab = one; /* this token's dequantized values: by table below 8 bits */
            if (bits == 8) {
                v = _mm512_fmadd_ps(_mm512_set1_ps(pt[0]), kvq__codes16_avx512(cp, hp, 8, half, sh, one),
                                    _mm512_set1_ps(pt[ng]));
            } else {
                tab = kvq__table_avx512(bits, _mm512_set1_ps(pt[0]), _mm512_set1_ps(pt[ng]));
                v = kvq__codes16_avx512(cp, hp, bits, half, sh, tab);
            }
            a0 = _mm512_fmadd_ps(_mm512_set1_ps(p0[t]), v, a0);
            if (nj > 1) a1 = _mm512_fmadd_ps(_mm512_set1_ps(p0[KVQ__TILE + t]), v, a1);
            if (nj > 2) a2 = _mm512_fmadd_ps(_mm512_set1_ps(p0[2 * KVQ__TILE + t]), v, a2);
            if (nj > 3) a3 = _mm512_fmadd_ps(_mm512_set1_ps(p0[3 * KVQ__TILE + t]), v, a3);
            if (!pair) continue;
            u = kvq__codes16_avx512(cp + kvq__run_at(16, bits), hp + 2, bits, 0, sh, tab); /* channels cc + 16.. */
            b0 = _mm512_fmadd_ps(_mm512_set1_ps(p0[t]), u, b0);
            if (nj > 1) b1 = _mm512_fmadd_ps(_mm512_set1_ps(p0[KVQ__TILE + t]), u, b1);
            if (nj > 2) b2 = _mm512_fmadd_ps(_mm512_set1_ps(p0[2 * KVQ__TILE + t]), u, b2);
            if (nj > 3) b3 = _mm512_fmadd_ps(_mm512_set1_ps(p0[3 * KVQ__TILE + t]), u, b3);
        }
        _mm512_mask_storeu_ps(acc[0] + cc, k, a0);
        if (nj > 1) _mm512_mask_storeu_ps(acc[1] + cc, k, a1);
        if (nj > 2) _mm512_mask_storeu_ps(acc[2] + cc, k, a2);
        if (nj > 3) _mm512_mask_storeu_ps(acc[3] + cc, k, a3);
        if (pair) {
            _mm512_storeu_ps(acc[0] + cc + 16, b0);
            if (nj > 1) _mm512_storeu_ps(acc[1] + cc + 16, b1);
            if (nj > 2) _mm512_storeu_ps(acc[2] + cc + 16, b2);
            if (nj > 3) _mm512_storeu_ps(acc[3] + cc + 16, b3);
        }
        cc += pair ? 32 : 16;
    }
}
KVQ__AVX512_FN void kvq__acc_codes_avx512(const uint8_t *codes, size_t stride, const float *par, int n, int D,
                                          int G, int bits, const float *p, int nh, float *const *acc) {
    int j0;
    for (j0 = 0; j0 < nh; j0 += 4) {
        const int nj = nh - j0 < 4 ? nh - j0 : 4;
        const float *p0 = p + (size_t)j0 * KVQ__TILE;
        switch (bits * 8 + (nj == 4)) {
        case 17: kvq__acc_pass_avx512(codes, stride, par, n, D, G, 2, p0, 4, acc + j0); break;
        case 33: kvq__acc_pass_avx512(codes, stride, par, n, D, G, 4, p0, 4, acc + j0); break;
        case 16: kvq__acc_pass_avx512(codes, stride, par, n, D, G, 2, p0, nj, acc + j0); break;
        case 32: kvq__acc_pass_avx512(codes, stride, par, n, D, G, 4, p0, nj, acc + j0); break;
        case 65: kvq__acc_pass_avx512(codes, stride, par, n, D, G, 8, p0, 4, acc + j0); break; /* side store */
        case 64: kvq__acc_pass_avx512(codes, stride, par, n, D, G, 8, p0, nj, acc + j0); break;
        default: kvq__acc_pass_avx512(codes, stride, par, n, D, G, bits, p0, nj, acc + j0); break;
        }
    }
}

/* Max (is_max) or sum of the 16 lanes of each of a, b, c, d, in every lane of 128-bit chunk 0, 1,
   2, 3 of the result: halves of two vectors meet (vshuff32x4), then the lanes within a chunk. */
KVQ__AVX512_INLINE __m512 kvq__op_avx512(__m512 x, __m512 y, int is_max) { return is_max ? _mm512_max_ps(x, y) : _mm512_add_ps(x, y); }
KVQ__AVX512_INLINE __m512 kvq__reduce4_avx512(__m512 a, __m512 b, __m512 c, __m512 d, int is_max) {
    const __m512 ab = kvq__op_avx512(_mm512_shuffle_f32x4(a, b, 0x44), _mm512_shuffle_f32x4(a, b, 0xee), is_max);
    const __m512 cd = kvq__op_avx512(_mm512_shuffle_f32x4(c, d, 0x44), _mm512_shuffle_f32x4(c, d, 0xee), is_max);
    __m512 m = kvq__op_avx512(_mm512_shuffle_f32x4(ab, cd, 0x88), _mm512_shuffle_f32x4(ab, cd, 0xdd), is_max);
    m = kvq__op_avx512(m, _mm512_permute_ps(m, 0x4e), is_max);
    return kvq__op_avx512(m, _mm512_permute_ps(m, 0xb1), is_max);
}

/* a[j] += q_j . x over 16 channels from cc of a record (ct, params pt), in group g; half: the last
   chunk of a D % 16 == 8 row, whose masked query lanes are 0, so the value's do not count. */
KVQ__AVX512_INLINE void kvq__dot_chunk_avx512(const uint8_t *ct, const float *pt, int g, int ng, int cc, int D,
                                              const int bits, const int half, __m512i sh, const float *q0,
                                              const int nj, __m512 *a) {
    const __mmask16 k = half ? 0x00ff : 0xffff;
    const __m512 s = _mm512_set1_ps(pt[g]), m = _mm512_set1_ps(pt[ng + g]);
    const uint8_t *cp = ct + kvq__run_at(cc, bits), *hp = kvq__hi_ptr(ct, D, cc, bits);
    const __m512 v = bits == 8 ? _mm512_fmadd_ps(s, kvq__codes16_avx512(cp, hp, 8, half, sh, s), m)
                               : kvq__codes16_avx512(cp, hp, bits, half, sh, kvq__table_avx512(bits, s, m));
    a[0] = _mm512_fmadd_ps(kvq__load16_avx512(q0 + cc, k), v, a[0]);
    if (nj > 1) a[1] = _mm512_fmadd_ps(kvq__load16_avx512(q0 + D + cc, k), v, a[1]);
    if (nj > 2) a[2] = _mm512_fmadd_ps(kvq__load16_avx512(q0 + 2 * D + cc, k), v, a[2]);
    if (nj > 3) a[3] = _mm512_fmadd_ps(kvq__load16_avx512(q0 + 3 * D + cc, k), v, a[3]);
}
/* scores[j][t] = q_j . x_t, each record x_t dequantized once for up to four heads; chunk c of 16
   channels is in group c >> gs (G = 16 << gs). */
KVQ__AVX512_INLINE void kvq__dot_pass_avx512(const uint8_t *codes, size_t stride, const float *par, int n, int D,
                                             int G, const int bits, const float *q0, const int nj, float *s0) {
    const int ng = (D + G - 1) / G;
    const __m512i sh = kvq__shifts_avx512(bits);
    int gs = 0, c, t;
    while ((16 << gs) < G) gs++;
    for (t = 0; t < n; t++) {
        const uint8_t *ct = codes + stride * t;
        const float *pt = par + (size_t)t * 2 * ng;
        __m512 a[4];
        a[0] = a[1] = a[2] = a[3] = _mm512_setzero_ps();
        for (c = 0; c < D / 16; c++) kvq__dot_chunk_avx512(ct, pt, c >> gs, ng, 16 * c, D, bits, 0, sh, q0, nj, a);
        if (D % 16) kvq__dot_chunk_avx512(ct, pt, c >> gs, ng, 16 * c, D, bits, 1, sh, q0, nj, a);
        a[0] = kvq__reduce4_avx512(a[0], a[1], a[2], a[3], 0); /* head j's sum in 128-bit chunk j */
        s0[t] = _mm512_cvtss_f32(a[0]); /* not through memory: a 4-byte load of a 64-byte store stalls */
        if (nj > 1) s0[KVQ__TILE + t] = _mm_cvtss_f32(_mm512_extractf32x4_ps(a[0], 1));
        if (nj > 2) s0[2 * KVQ__TILE + t] = _mm_cvtss_f32(_mm512_extractf32x4_ps(a[0], 2));
        if (nj > 3) s0[3 * KVQ__TILE + t] = _mm_cvtss_f32(_mm512_extractf32x4_ps(a[0], 3));
    }
}
KVQ__DEFINE_DOT_CODES(KVQ__AVX512_FN, avx512)

/* 128 channels from c0 for one or two heads, tokens outside: the rows stream in address order
   (walking them column-wise measured 3x slower from DRAM). 16 accumulators stay in registers. */
KVQ__AVX512_INLINE void kvq__acc_f16_128_avx512(const uint16_t *const *rows, int n, int c0, const float *pa,
                                               const float *pb, float *oa, float *ob, const int two) {
    __m512 a0 = _mm512_loadu_ps(oa), a1 = _mm512_loadu_ps(oa + 16), a2 = _mm512_loadu_ps(oa + 32),
           a3 = _mm512_loadu_ps(oa + 48), a4 = _mm512_loadu_ps(oa + 64), a5 = _mm512_loadu_ps(oa + 80),
           a6 = _mm512_loadu_ps(oa + 96), a7 = _mm512_loadu_ps(oa + 112);
    __m512 b0 = a0, b1 = a1, b2 = a2, b3 = a3, b4 = a4, b5 = a5, b6 = a6, b7 = a7;
    int t;
    if (two) {
        b0 = _mm512_loadu_ps(ob); b1 = _mm512_loadu_ps(ob + 16); b2 = _mm512_loadu_ps(ob + 32);
        b3 = _mm512_loadu_ps(ob + 48); b4 = _mm512_loadu_ps(ob + 64); b5 = _mm512_loadu_ps(ob + 80);
        b6 = _mm512_loadu_ps(ob + 96); b7 = _mm512_loadu_ps(ob + 112);
    }
    for (t = 0; t < n; t++) {
        const uint16_t *r = rows[t] + c0;
        const __m512 wa = _mm512_set1_ps(pa[t]), wb = two ? _mm512_set1_ps(pb[t]) : wa;
        __m512 v;
#define KVQ__ACC_CHUNK(i)                                                                   \
        v = kvq__cvtph_avx512(_mm256_loadu_si256((const __m256i *)(const void *)(r + 16 * (i)))); \
        a##i = _mm512_fmadd_ps(wa, v, a##i);                                                \
        if (two) b##i = _mm512_fmadd_ps(wb, v, b##i);
        KVQ__ACC_CHUNK(0) KVQ__ACC_CHUNK(1) KVQ__ACC_CHUNK(2) KVQ__ACC_CHUNK(3)
        KVQ__ACC_CHUNK(4) KVQ__ACC_CHUNK(5) KVQ__ACC_CHUNK(6) KVQ__ACC_CHUNK(7)
#undef KVQ__ACC_CHUNK
    }
    _mm512_storeu_ps(oa, a0); _mm512_storeu_ps(oa + 16, a1); _mm512_storeu_ps(oa + 32, a2);
    _mm512_storeu_ps(oa + 48, a3); _mm512_storeu_ps(oa + 64, a4); _mm512_storeu_ps(oa + 80, a5);
    _mm512_storeu_ps(oa + 96, a6); _mm512_storeu_ps(oa + 112, a7);
    if (two) {
        _mm512_storeu_ps(ob, b0); _mm512_storeu_ps(ob + 16, b1); _mm512_storeu_ps(ob + 32, b2);
        _mm512_storeu_ps(ob + 48, b3); _mm512_storeu_ps(ob + 64, b4); _mm512_storeu_ps(ob + 80, b5);
        _mm512_storeu_ps(ob + 96, b6); _mm512_storeu_ps(ob + 112, b7);
    }
}
KVQ__AVX512_FN void kvq__acc_f16_avx512(const uint16_t *const *rows, int n, int D, const float *p, int nh,
                                        float *const *acc) {
    int j0, cc, t;
    kvq__prefetch_rows_avx2(rows, n, D);
    if (D % 128 == 0) {
        for (cc = 0; cc < D; cc += 128)
            for (j0 = 0; j0 < nh; j0 += 2) {
                const float *pa = p + (size_t)j0 * KVQ__TILE;
                if (j0 + 1 < nh)
                    kvq__acc_f16_128_avx512(rows, n, cc, pa, pa + KVQ__TILE, acc[j0] + cc, acc[j0 + 1] + cc, 1);
                else
                    kvq__acc_f16_128_avx512(rows, n, cc, pa, pa, acc[j0] + cc, acc[j0] + cc, 0);
            }
        return;
    }
    for (j0 = 0; j0 < nh; j0 += 4) {
        const int nj = nh - j0 < 4 ? nh - j0 : 4;
        const float *p0 = p + (size_t)j0 * KVQ__TILE;
        for (cc = 0; cc < D; cc += 16) {
            const __mmask16 k = kvq__mask_avx512(D - cc);
            __m512 a0 = _mm512_maskz_loadu_ps(k, acc[j0] + cc), a1 = a0, a2 = a0, a3 = a0;
            if (nj > 1) a1 = _mm512_maskz_loadu_ps(k, acc[j0 + 1] + cc);
            if (nj > 2) a2 = _mm512_maskz_loadu_ps(k, acc[j0 + 2] + cc);
            if (nj > 3) a3 = _mm512_maskz_loadu_ps(k, acc[j0 + 3] + cc);
            for (t = 0; t < n; t++) {
                __m512 v = kvq__f16x16_avx512(rows[t] + cc, k);
                a0 = _mm512_fmadd_ps(_mm512_set1_ps(p0[t]), v, a0);
                if (nj > 1) a1 = _mm512_fmadd_ps(_mm512_set1_ps(p0[KVQ__TILE + t]), v, a1);
                if (nj > 2) a2 = _mm512_fmadd_ps(_mm512_set1_ps(p0[2 * KVQ__TILE + t]), v, a2);
                if (nj > 3) a3 = _mm512_fmadd_ps(_mm512_set1_ps(p0[3 * KVQ__TILE + t]), v, a3);
            }
            _mm512_mask_storeu_ps(acc[j0] + cc, k, a0);
            if (nj > 1) _mm512_mask_storeu_ps(acc[j0 + 1] + cc, k, a1);
            if (nj > 2) _mm512_mask_storeu_ps(acc[j0 + 2] + cc, k, a2);
            if (nj > 3) _mm512_mask_storeu_ps(acc[j0 + 3] + cc, k, a3);
        }
    }
}

/* acc + kvq__search_term on 16 lanes, with the same bits: max/min give the C's clamps (they
   differ only at u = -0, which rounds to c = +0 either way), vrndscaleps its round to nearest
   even; d keeps its sign through the 9-bit rounding (the carry stops in the exponent), and
   d * d < 2^-80 is |d| < 2^-40 (d * d is exact above it). */
KVQ__AVX512_FN __m512 kvq__search_add512(__m512 acc, __m512 x, __m512 m, __m512 r, __m512 top, const __m512 *w) {
    const __m512 u = _mm512_mul_ps(_mm512_sub_ps(x, m), r);
    const __m512 c = _mm512_roundscale_ps(_mm512_min_ps(_mm512_max_ps(u, _mm512_setzero_ps()), top),
                                          _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    const __m512i b = _mm512_add_epi32(_mm512_castps_si512(_mm512_sub_ps(u, c)), _mm512_set1_epi32(0x2000));
    const __m512 d = _mm512_castsi512_ps(_mm512_and_si512(b, _mm512_set1_epi32((int)0xffffc000u)));
    const __m512 dd = _mm512_mul_ps(d, d);
    return _mm512_mask_add_ps(acc, _mm512_cmp_ps_mask(dd, _mm512_set1_ps(8.271806125530277e-25f), _CMP_GE_OQ), acc,
                              w ? _mm512_mul_ps(*w, dd) : dd); /* 2^-80; w * d * d is exact (w < 32) */
}
/* Candidates k and k + 1 (k again past nk) in the low and high halves of a register. */
KVQ__AVX512_FN __m512 kvq__cand_pair512(float a, float b) {
    return _mm512_insertf32x8(_mm512_set1_ps(a), _mm256_set1_ps(b), 1);
}
/* kvq__search_sums with two candidates a register and two registers a pass over x (independent
   chains), each lane's terms added in the order of the C. */
KVQ__AVX512_FN void kvq__search_sums512(const float *x, int n, const kvq__cands *c, int nk, float top,
                                        float (*acc)[8]) {
    const __m512 vtop = _mm512_set1_ps(top);
    int k, t;
    for (k = 0; k < nk; k += 4) {
        const int k1 = k + 1 < nk ? k + 1 : k, k2 = k + 2 < nk ? k + 2 : k, k3 = k + 3 < nk ? k + 3 : k;
        const __m512 m0 = kvq__cand_pair512(c->m[k], c->m[k1]), r0 = kvq__cand_pair512(c->r[k], c->r[k1]);
        const __m512 m1 = kvq__cand_pair512(c->m[k2], c->m[k3]), r1 = kvq__cand_pair512(c->r[k2], c->r[k3]);
        __m512 a0 = _mm512_setzero_ps(), a1 = _mm512_setzero_ps();
        for (t = 0; t < n; t += 8) {
            const __m512 xv = _mm512_broadcast_f32x8(_mm256_loadu_ps(x + t));
            a0 = kvq__search_add512(a0, xv, m0, r0, vtop, NULL);
            a1 = kvq__search_add512(a1, xv, m1, r1, vtop, NULL);
        }
        _mm512_storeu_ps(acc[k], a0); /* rows k, k + 1 */
        if (k + 2 < nk) _mm512_storeu_ps(acc[k + 2], a1); /* rows k + 2, k + 3 (acc has a row spare) */
    }
}
/* kvq__e5m3 on 8 lanes. */
KVQ__AVX512_FN __m256 kvq__e5m3_256(__m256i e) {
    const __m256i at = _mm256_slli_epi32(e, 20);
    const __m256 normal = _mm256_castsi256_ps(_mm256_add_epi32(at, _mm256_set1_epi32(112 << 23)));
    const __m256 sub = _mm256_sub_ps(_mm256_castsi256_ps(_mm256_add_epi32(at, _mm256_set1_epi32(113 << 23))),
                                     _mm256_set1_ps(6.103515625e-5f));
    return _mm256_mask_blend_ps(_mm256_cmpge_epu32_mask(e, _mm256_set1_epi32(8)), sub, normal);
}
/* kvq__fit_range16 then kvq__params_f32 on 8 lanes, the same operations: *s and *m as stored. */
KVQ__AVX512_FN void kvq__fit16_256(__m256 lo, __m256 hi, int bits, __mmask8 live, __m256 *s, __m256 *m) {
    const __m256i top_e = _mm256_set1_epi32(0xf7);
    __m256 need = _mm256_div_ps(_mm256_sub_ps(hi, lo), _mm256_set1_ps((float)((1 << bits) - 1))), k, m8;
    __m256i x, e, e_sub;
    __mmask8 todo;
    need = _mm256_max_ps(_mm256_mul_ps(_mm256_set1_ps(-0.125f), lo), need); /* a > b ? a : b */
    need = _mm256_max_ps(_mm256_div_ps(lo, _mm256_set1_ps(7.9375f)), need);
    /* kvq__e5m3_ceil: k * 2^-17 below fp16's normals, else the exponent and 3 mantissa bits, rounded up */
    k = _mm256_mul_ps(need, _mm256_set1_ps(131072.0f));
    e_sub = _mm256_cvttps_epu32(k);
    e_sub = _mm256_mask_add_epi32(e_sub, _mm256_cmp_ps_mask(_mm256_cvtepu32_ps(e_sub), k, _CMP_LT_OQ), e_sub,
                                  _mm256_set1_epi32(1));
    x = _mm256_castps_si256(need);
    e = _mm256_or_si256(_mm256_slli_epi32(_mm256_sub_epi32(_mm256_srli_epi32(x, 23), _mm256_set1_epi32(112)), 3),
                        _mm256_and_si256(_mm256_srli_epi32(x, 20), _mm256_set1_epi32(7)));
    e = _mm256_mask_add_epi32(e, _mm256_test_epi32_mask(x, _mm256_set1_epi32(0xfffff)), e, _mm256_set1_epi32(1));
    e = _mm256_mask_blend_epi32(_mm256_cmp_ps_mask(need, _mm256_set1_ps(6.103515625e-5f), _CMP_LT_OQ), e, e_sub);
    e = _mm256_min_epu32(e, top_e);
    for (;;) { /* raised until lo lies in [-8 s, 127 s / 16] */
        const __m256 sc = kvq__e5m3_256(e);
        const __mmask8 in = _mm256_cmp_ps_mask(lo, _mm256_mul_ps(_mm256_set1_ps(-8.0f), sc), _CMP_GE_OQ) &
                            _mm256_cmp_ps_mask(lo, _mm256_mul_ps(_mm256_set1_ps(7.9375f), sc), _CMP_LE_OQ);
        todo = (__mmask8)(live & ~in & _mm256_cmplt_epu32_mask(e, top_e));
        if (!todo) break;
        e = _mm256_mask_add_epi32(e, todo, e, _mm256_set1_epi32(1));
    }
    *s = kvq__e5m3_256(e);
    m8 = _mm256_roundscale_ps(_mm256_div_ps(_mm256_mul_ps(lo, _mm256_set1_ps(16.0f)), *s),
                              _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    m8 = _mm256_maskz_mov_ps(_mm256_cmp_ps_mask(*s, _mm256_setzero_ps(), _CMP_NEQ_UQ), m8); /* s == 0: 0 */
    m8 = _mm256_min_ps(_mm256_max_ps(m8, _mm256_set1_ps(-128.0f)), _mm256_set1_ps(127.0f));
    m8 = _mm256_cvtepi32_ps(_mm256_cvtps_epi32(m8)); /* the stored int8: -0 becomes 0 */
    *m = _mm256_mul_ps(_mm256_mul_ps(m8, *s), _mm256_set1_ps(0.0625f)); /* kvq__min16 */
}
/* A candidate's bound in 8 lanes, as kvq__search_candidate computes it: base -/+ the rounded
   double range * (n * step) (the top when top_side, else the bottom), to float; base itself
   where n is 0. */
KVQ__AVX512_FN __m256 kvq__cand_bound256(__m256 lo, __m256 hi, __m256 base, __m256i n, double step, int top_side) {
    const __m512d range = _mm512_sub_pd(_mm512_cvtps_pd(hi), _mm512_cvtps_pd(lo));
    const __m512d off = _mm512_mul_pd(range, _mm512_mul_pd(_mm512_cvtepi32_pd(n), _mm512_set1_pd(step)));
    const __m512d b = _mm512_cvtps_pd(base);
    const __m256 v = _mm512_cvtpd_ps(top_side ? _mm512_sub_pd(b, off) : _mm512_add_pd(b, off));
    return _mm256_mask_blend_ps(_mm256_test_epi32_mask(n, n), base, v);
}
/* 1/s where s > 0, else 0 (a candidate with no range left). */
KVQ__AVX512_FN __m256 kvq__recip256(__m256 s) {
    return _mm256_maskz_div_ps(_mm256_cmp_ps_mask(s, _mm256_setzero_ps(), _CMP_GT_OQ), _mm256_set1_ps(1.0f), s);
}
/* kvq__search_cands on 8 lanes (one candidate a lane): the same operations. */
KVQ__AVX512_FN void kvq__search_cands512(float lo, float hi, int bits, int pbits, double step, int steps, int side,
                                         int i_best, kvq__cands *c) {
    const int nk = side ? steps - 1 : steps;
    const __mmask8 live = (__mmask8)((1u << nk) - 1u);
    const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    const __m256i vi = side ? _mm256_set1_epi32(i_best) : lane;
    const __m256i vj = side ? _mm256_add_epi32(lane, _mm256_set1_epi32(1)) : _mm256_setzero_si256();
    const __m256 vlo = _mm256_set1_ps(lo), vhi = _mm256_set1_ps(hi);
    const __m256 clo = kvq__cand_bound256(vlo, vhi, vlo, vi, step, 0), chi = kvq__cand_bound256(vlo, vhi, vhi, vj, step, 1);
    __m256 s = _mm256_div_ps(_mm256_sub_ps(chi, clo), _mm256_set1_ps((float)((1 << bits) - 1))), m = clo;
    if (pbits == 16) kvq__fit16_256(clo, chi, bits, live, &s, &m); /* scored as they will be stored */
    _mm256_storeu_ps(c->lo, clo); /* lanes past nk are never read */
    _mm256_storeu_ps(c->hi, chi);
    _mm256_storeu_ps(c->m, m);
    _mm256_storeu_ps(c->r, kvq__recip256(s));
    _mm256_storeu_ps(c->s2, _mm256_mul_ps(s, s));
}
KVQ__AVX512_FN void kvq__search_row_avx512(const float *x, int D, int G, int bits, int pbits, int steps,
                                          const float *lo, const float *hi, kvq__qparams *best) {
    kvq__search_row_with(x, D, G, bits, pbits, steps, lo, hi, best, kvq__search_cands512, kvq__search_sums512);
}
/* kvq__search_columns_body with the columns in lanes (8 a register for the candidates, 16 for
   the sums: two chains): the same operations, in the same order per column. */
KVQ__AVX512_FN void kvq__search_columns_avx512(const float *xb, int G, const uint8_t *w, int bits, int steps,
                                               const float *lo, const float *hi, kvq__qparams *best) {
    enum { R = 4 }; /* KVQ__COLS (32) / 8 */
    const float topf = (float)((1 << bits) - 1);
    const __m512 top = _mm512_set1_ps(topf);
    const double step = kvq__search_step(bits, steps);
    __m256 vlo[R], vhi[R], err[R], win_lo[R], win_hi[R];
    __m256i i_best[R];
    uint16_t sc[KVQ__COLS], mn[KVQ__COLS];
    int k, t, h;
    for (h = 0; h < R; h++) { /* candidate (0, 0), min/max, wins unless beaten */
        win_lo[h] = vlo[h] = _mm256_loadu_ps(lo + 8 * h);
        win_hi[h] = vhi[h] = _mm256_loadu_ps(hi + 8 * h);
        err[h] = _mm256_setzero_ps();
        i_best[h] = _mm256_setzero_si256();
    }
    for (k = 0; k < 2 * steps - 1; k++) {
        const int j = k < steps ? 0 : k - steps + 1;
        __m256 clo[R], chi[R], s2[R], rh[R];
        __m512 m0, m1, r0, r1, acc0 = _mm512_setzero_ps(), acc1 = acc0; /* columns 0-15, 16-31 */
        __m256i ci[R];
        for (h = 0; h < R; h++) {
            __m256 s;
            ci[h] = k < steps ? _mm256_set1_epi32(k) : i_best[h];
            clo[h] = kvq__cand_bound256(vlo[h], vhi[h], vlo[h], ci[h], step, 0);
            chi[h] = kvq__cand_bound256(vlo[h], vhi[h], vhi[h], _mm256_set1_epi32(j), step, 1);
            s = _mm256_div_ps(_mm256_sub_ps(chi[h], clo[h]), _mm256_set1_ps(topf));
            s2[h] = _mm256_mul_ps(s, s);
            rh[h] = kvq__recip256(s);
        }
        m0 = _mm512_insertf32x8(_mm512_castps256_ps512(clo[0]), clo[1], 1); /* two of 8 make one of 16 */
        m1 = _mm512_insertf32x8(_mm512_castps256_ps512(clo[2]), clo[3], 1);
        r0 = _mm512_insertf32x8(_mm512_castps256_ps512(rh[0]), rh[1], 1);
        r1 = _mm512_insertf32x8(_mm512_castps256_ps512(rh[2]), rh[3], 1);
        for (t = 0; t < G; t++) { /* two chains in registers */
            const __m512 wt = _mm512_set1_ps((float)w[t]);
            if (!w[t]) continue;
            acc0 = kvq__search_add512(acc0, _mm512_loadu_ps(xb + (size_t)t * KVQ__COLS), m0, r0, top, &wt);
            acc1 = kvq__search_add512(acc1, _mm512_loadu_ps(xb + (size_t)t * KVQ__COLS + 16), m1, r1, top, &wt);
        }
        for (h = 0; h < R; h++) {
            const __m512 a = h < 2 ? acc0 : acc1;
            const __m256 e = _mm256_mul_ps(h % 2 ? _mm512_extractf32x8_ps(a, 1) : _mm512_castps512_ps256(a), s2[h]);
            const __mmask8 win = k == 0 ? (__mmask8)0xff
                                        : (__mmask8)(_mm256_cmp_ps_mask(rh[h], _mm256_setzero_ps(), _CMP_NEQ_UQ) &
                                                     _mm256_cmp_ps_mask(e, err[h], _CMP_LT_OQ));
            err[h] = _mm256_mask_blend_ps(win, err[h], e);
            win_lo[h] = _mm256_mask_blend_ps(win, win_lo[h], clo[h]);
            win_hi[h] = _mm256_mask_blend_ps(win, win_hi[h], chi[h]);
            i_best[h] = _mm256_mask_blend_epi32(win, i_best[h], ci[h]);
        }
    }
    for (h = 0; h < R; h++) { /* kvq__fit_range: vcvtps2ph rounds as kvq__f32_to_f16 */
        _mm_storeu_si128((__m128i *)(void *)(sc + 8 * h),
                         _mm256_cvtps_ph(_mm256_div_ps(_mm256_sub_ps(win_hi[h], win_lo[h]), _mm256_set1_ps(topf)),
                                         _MM_FROUND_TO_NEAREST_INT));
        _mm_storeu_si128((__m128i *)(void *)(mn + 8 * h), _mm256_cvtps_ph(win_lo[h], _MM_FROUND_TO_NEAREST_INT));
    }
    for (k = 0; k < KVQ__COLS; k++) {
        best[k].scale = sc[k];
        best[k].min = mn[k];
    }
}
/* 16-bit value params (kvq__params16), 16 at a time where ng is a power of two <= 16: lanes
   (token, group), T = 16 / ng tokens, decoded exactly as kvq__e5m3 and kvq__min16 do, then
   two permutes write the T tokens' rows [scale[ng], min[ng]]. */
KVQ__AVX512_FN void kvq__params16_avx512(const uint16_t *par, int n, int ng, float *out) {
    const int T = 16 / ng;
    __m512i lo, hi;
    int t, o;
    if (ng > 16 || (ng & (ng - 1))) {
        kvq__params16_scalar(par, n, ng, out);
        return;
    }
    { /* out lane o of a 32-float run: row o / 2ng, field f = o % 2ng: scale f (< ng) or min f - ng (+16) */
        int32_t ix[32];
        for (o = 0; o < 32; o++) {
            const int r = o / (2 * ng), f = o % (2 * ng);
            ix[o] = f < ng ? r * ng + f : 16 + r * ng + f - ng;
        }
        lo = _mm512_loadu_si512((const void *)ix);
        hi = _mm512_loadu_si512((const void *)(ix + 16));
    }
    for (t = 0; t < n; t += T) {
        const int left = (n - t) * ng; /* u16 left */
        const __mmask16 k = (__mmask16)(left >= 16 ? 0xffff : (1u << left) - 1u);
        const __m256i u = _mm256_maskz_loadu_epi16(k, par + (size_t)t * ng);
        /* the scale is the fp16 whose bits are e << 7 (subnormals included), the min m8 * s / 16 (exact) */
        const __m512 sc = kvq__cvtph_avx512(_mm256_slli_epi16(_mm256_and_si256(u, _mm256_set1_epi16(0xff)), 7));
        const __m512i m8 = _mm512_cvtepi16_epi32(_mm256_srai_epi16(u, 8)); /* the high byte, sign-extended */
        const __m512 mn = _mm512_mul_ps(_mm512_mul_ps(_mm512_cvtepi32_ps(m8), sc), _mm512_set1_ps(0.0625f));
        const int rows = n - t < T ? n - t : T, nf = rows * 2 * ng; /* floats to write */
        _mm512_mask_storeu_ps(out + (size_t)t * 2 * ng, (__mmask16)(nf >= 16 ? 0xffff : (1u << nf) - 1u),
                              _mm512_permutex2var_ps(sc, lo, mn));
        if (nf > 16)
            _mm512_mask_storeu_ps(out + (size_t)t * 2 * ng + 16, (__mmask16)(nf >= 32 ? 0xffff : (1u << (nf - 16)) - 1u),
                                  _mm512_permutex2var_ps(sc, hi, mn));
    }
}
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic pop
#endif
/* AVX-512 shares the AVX2 conversions and quantizers */
#define kvq__to_f16_avx512 kvq__to_f16_avx2
#define kvq__to_f32_avx512 kvq__to_f32_avx2
#define kvq__fits_fp16_avx512 kvq__fits_fp16_avx2
#define kvq__quantize_keys_avx512 kvq__quantize_keys_avx2
#define kvq__quantize_value_avx512 kvq__quantize_value_avx2
/* Rotation butterflies: 16 lanes from len 16, the AVX2 kernel at len 8. */
KVQ__AVX512_FN void kvq__butterflies_avx512(float *x, int n, int len) {
    int i, j;
    if (len < 16) {
        kvq__butterflies_avx2(x, n, len);
        return;
    }
    for (i = 0; i < n; i += 2 * len)
        for (j = i; j < i + len; j += 16) {
            __m512 a = _mm512_loadu_ps(x + j), b = _mm512_loadu_ps(x + j + len);
            _mm512_storeu_ps(x + j, _mm512_add_ps(a, b));
            _mm512_storeu_ps(x + j + len, _mm512_sub_ps(a, b));
        }
}

/* ---- AVX-512 integer attention (VNNI vpdpbusd, VBMI vpermb), the scheme of "Integer attention".
   Keys: a 32-bit lane holds one token's codes of 4 channels (u8) and meets 4 query bytes (s8);
   values: a lane holds one channel's codes of 4 tokens (s8) and meets 4 weight bytes (u8). The
   lanes are built in registers from the stored rows: one vpermb gathers each lane's bytes, a
   per-lane shift (or rotate, for a 3-bit high plane) brings its codes to bit 0. ---- */
#if KVQ__HAVE_AVX512_INT
#if defined(__GNUC__) && !defined(__clang__) /* g++ 12 warns inside its own AVX-512 intrinsics (PR105593) */
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC diagnostic ignored "-Wuninitialized"
#endif
#define KVQ__INT512_FN static KVQ__TARGET_AVX512_INT
#define KVQ__INT512_INLINE static KVQ__INLINE KVQ__TARGET_AVX512_INT

KVQ__INT512_FN __m512i kvq__word_int512(const int8_t *p) { /* 4 bytes to every lane */
    int32_t w;
    memcpy(&w, p, 4);
    return _mm512_set1_epi32(w);
}
/* vpermb indices: byte k of lane i = c_i + k * step (lane i's four rows, step bytes apart). */
KVQ__INT512_FN __m512i kvq__rows_index_int512(__m512i c, int step) { /* c < 256: vpshufb copies its low byte */
    const __m512i low4 = _mm512_set4_epi32(0x0c0c0c0c, 0x08080808, 0x04040404, 0); /* in each 128-bit lane */
    return _mm512_add_epi32(_mm512_shuffle_epi8(c, low4), _mm512_set1_epi32(step * 0x03020100));
}
#define KVQ__IOTA16 _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15)
/* Lane i's shift of a b-bit code i of a run to bit 0 (b 2 or 4), and rotate of high-plane bit i % 8 to bit 2. */
#define KVQ__SHIFTS(b) _mm512_and_si512(_mm512_slli_epi32(KVQ__IOTA16, (b) == 4 ? 2 : 1), _mm512_set1_epi32(7))
#define KVQ__ROTATES _mm512_and_si512(_mm512_sub_epi32(_mm512_set1_epi32(2), _mm512_and_si512(KVQ__IOTA16, _mm512_set1_epi32(7))), _mm512_set1_epi32(31))


/* Scores of 16 tokens at a time over quads of 4 channel rows (rb bytes each, 4 rb <= 128):
   lane t, byte k = the code of token t0 + t in channel c + k. */
KVQ__INT512_INLINE void kvq__scores_int_pass512(const uint8_t *codes, int D, int G, const int bits, const int8_t *qb,
                                                const float *unit, const float *bias, const int nj, float *s0) {
    const size_t qstride = 32 * (size_t)((D + 15) / 16); /* one head's query bytes */
    const int rb = G * bits / 8, quad = 4 * rb, b = bits == 4 ? 4 : 2;
    const __mmask64 m0 = quad >= 64 ? ~(__mmask64)0 : ((__mmask64)1 << quad) - 1u;
    const __mmask64 m1 = quad >= 128 ? ~(__mmask64)0 : quad > 64 ? ((__mmask64)1 << (quad - 64)) - 1u : 0;
    const __m512i t_b8 = _mm512_srli_epi32(KVQ__IOTA16, b == 4 ? 1 : 2); /* token t's byte in a row: t b / 8 */
    const __m512i idx0 = kvq__rows_index_int512(t_b8, rb);       /* row k's byte of token t's code */
    const __m512i hidx0 = kvq__rows_index_int512(_mm512_add_epi32(_mm512_srli_epi32(KVQ__IOTA16, 3), /* 3 bits: */
                                                                  _mm512_set1_epi32(G / 4)), rb); /* high plane */
    const __m512i sh = KVQ__SHIFTS(b), ro = KVQ__ROTATES;
    const __m512i low = _mm512_set1_epi8((char)(bits == 4 ? 15 : 3)), four = _mm512_set1_epi8(4);
    int t0, c4;
    for (t0 = 0; t0 < G; t0 += 16) {
        const __m512i idx = _mm512_add_epi8(idx0, _mm512_set1_epi8((char)(t0 * b / 8)));
        const __m512i hidx = _mm512_add_epi8(hidx0, _mm512_set1_epi8((char)(t0 / 8)));
        __m512i h0 = _mm512_setzero_si512(), h1 = h0, h2 = h0, h3 = h0, l0 = h0, l1 = h0, l2 = h0, l3 = h0;
        const uint8_t *qp = codes;
        for (c4 = 0; c4 < D / 4; c4++, qp += quad) {
            const int8_t *ql = qb + (c4 / 4) * 32 + (c4 % 4) * 4, *qh = ql + 16; /* channels 4 c4.. */
            const __m512i x0 = _mm512_maskz_loadu_epi8(m0, qp), x1 = quad > 64 ? _mm512_maskz_loadu_epi8(m1, qp + 64) : x0;
            __m512i v = _mm512_and_si512(_mm512_srlv_epi32(_mm512_permutex2var_epi8(x0, idx, x1), sh), low);
            if (bits == 3) /* ternary logic 0xf8 = a | (b & c) */
                v = _mm512_ternarylogic_epi32(v, _mm512_rolv_epi32(_mm512_permutex2var_epi8(x0, hidx, x1), ro), four, 0xf8);
            h0 = _mm512_dpbusd_epi32(h0, v, kvq__word_int512(qh));
            l0 = _mm512_dpbusd_epi32(l0, v, kvq__word_int512(ql));
            if (nj > 1) h1 = _mm512_dpbusd_epi32(h1, v, kvq__word_int512(qh + qstride));
            if (nj > 1) l1 = _mm512_dpbusd_epi32(l1, v, kvq__word_int512(ql + qstride));
            if (nj > 2) h2 = _mm512_dpbusd_epi32(h2, v, kvq__word_int512(qh + 2 * qstride));
            if (nj > 2) l2 = _mm512_dpbusd_epi32(l2, v, kvq__word_int512(ql + 2 * qstride));
            if (nj > 3) h3 = _mm512_dpbusd_epi32(h3, v, kvq__word_int512(qh + 3 * qstride));
            if (nj > 3) l3 = _mm512_dpbusd_epi32(l3, v, kvq__word_int512(ql + 3 * qstride));
        }
#define KVQ__SCORE16(j, h, l)                                                                                     \
        _mm512_storeu_ps(s0 + (j) * KVQ__TILE + t0,                                                                 \
                         _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_add_epi32(_mm512_slli_epi32(h, 8), l)),         \
                                         _mm512_set1_ps(unit[j]), _mm512_set1_ps(bias[j])));
        KVQ__SCORE16(0, h0, l0)
        if (nj > 1) KVQ__SCORE16(1, h1, l1)
        if (nj > 2) KVQ__SCORE16(2, h2, l2)
        if (nj > 3) KVQ__SCORE16(3, h3, l3)
#undef KVQ__SCORE16
    }
}
/* The query bytes (kvq__query_q16) of nj <= 4 heads, laid out [head][16-channel chunk][lo 16, hi 16],
   with their units and biases. Channels outside, heads inside, so each 16 channels' scales and mins
   are converted once and the heads' chains interleave: pass 1 q s (kept), its largest |q s|
   (vrangeps) and the bias sum_c q_c m_c by lane, one reduction tree for all heads, one vdivps;
   pass 2 q16 = rint(q s * 32639 / amax): lo is the low byte of q16 (q16 - 256 hi, in [-128, 127]),
   hi the high byte of q16 + 128, one vpermt2b picks both. nj is a constant where this is inlined
   (kvq__scores_int_avx512). */
KVQ__INT512_INLINE void kvq__query_int512(const uint16_t *sc, const uint16_t *mn, const float *q, int D, const int nj,
                                          int8_t *qb, size_t qstride, float *unit, float *bias) {
    /* byte 0 of each lane of the first source, then byte 1 of each lane of the second */
    const __m512i pick = _mm512_setr_epi32(0x0c080400, 0x1c181410, 0x2c282420, 0x3c383430, 0x4d494541, 0x5d595551,
                                           0x6d696561, 0x7d797571, 0, 0, 0, 0, 0, 0, 0, 0);
    const __m512i r128 = _mm512_set1_epi32(128);
    float qs[4 * 512], uv[16], bv[16];
    __m512 a[4], b[4], av, inv[4];
    int ch, k;
    for (k = 0; k < 4; k++) a[k] = b[k] = _mm512_setzero_ps();
    for (ch = 0; ch < D; ch += 16) {
        const __mmask16 m = kvq__mask_avx512(D - ch);
        const __m512 s = kvq__f16x16_avx512(sc + ch, m), mf = kvq__f16x16_avx512(mn + ch, m);
        for (k = 0; k < nj; k++) {
            const __m512 qv = _mm512_maskz_loadu_ps(m, q + (size_t)k * D + ch), x = _mm512_mul_ps(qv, s);
            _mm512_storeu_ps(qs + k * 512 + ch, x);
            a[k] = _mm512_range_ps(a[k], x, 0x0b); /* max(|a|, |x|) */
            b[k] = _mm512_fmadd_ps(qv, mf, b[k]);
        }
    }
    av = kvq__reduce4_avx512(a[0], a[1], a[2], a[3], 1); /* head k's in lanes 4k.. */
    _mm512_storeu_ps(uv, _mm512_div_ps(av, _mm512_set1_ps(KVQ__Q16)));
    _mm512_storeu_ps(bv, kvq__reduce4_avx512(b[0], b[1], b[2], b[3], 0));
    av = _mm512_maskz_div_ps(_mm512_cmp_ps_mask(av, _mm512_setzero_ps(), _CMP_GT_OQ), _mm512_set1_ps(KVQ__Q16), av);
    for (k = 0; k < nj; k++) {
        inv[k] = _mm512_permutexvar_ps(_mm512_set1_epi32(4 * k), av);
        unit[k] = uv[4 * k];
        bias[k] = bv[4 * k];
    }
    for (ch = 0; ch < D; ch += 16)
        for (k = 0; k < nj; k++) {
            const __m512i v = _mm512_cvtps_epi32(_mm512_mul_ps(_mm512_loadu_ps(qs + k * 512 + ch), inv[k]));
            _mm256_storeu_si256((__m256i *)(void *)(qb + (size_t)k * qstride + (size_t)ch * 2),
                                _mm512_castsi512_si256(_mm512_permutex2var_epi8(v, pick, _mm512_add_epi32(v, r128))));
        }
}

/* Scores of a key block, the integer scheme, four query heads at a time: their query bytes
   (kvq__query_int512), then the pass over the codes. */
KVQ__INT512_FN void kvq__scores_int_avx512(const uint8_t *blk, int D, int G, int bits, const float *q, int nh,
                                           float *scores) {
    const uint16_t *sc = (const uint16_t *)(const void *)blk, *mn = sc + D;
    const uint8_t *codes = kvq__block_codes(blk, D);
    const size_t qstride = 32 * (size_t)((D + 15) / 16);
    float unit[4], bias[4];
    int8_t qb[4 * 32 * 32];
    int j0;
    for (j0 = 0; j0 < nh; j0 += 4) {
        const int nj = nh - j0 < 4 ? nh - j0 : 4;
        const float *qj = q + (size_t)j0 * D;
        float *s0 = scores + (size_t)j0 * KVQ__TILE;
        switch (nj) { /* a constant head count in the loops */
        case 4: kvq__query_int512(sc, mn, qj, D, 4, qb, qstride, unit, bias); break;
        case 3: kvq__query_int512(sc, mn, qj, D, 3, qb, qstride, unit, bias); break;
        case 2: kvq__query_int512(sc, mn, qj, D, 2, qb, qstride, unit, bias); break;
        default: kvq__query_int512(sc, mn, qj, D, 1, qb, qstride, unit, bias); break;
        }
#define KVQ__PASS(b, n) kvq__scores_int_pass512(codes, D, G, b, qb, unit, bias, n, s0)
        KVQ__INT_CASES(bits, nj, KVQ__PASS)
#undef KVQ__PASS
    }
}

/* Weight vector v's 16 bytes (zeros past the nv vectors), their sum by lane added to *sum. */
KVQ__INT512_INLINE __m128i kvq__wbytes_int512(const float *wb, int v, int nv, __m512 inv, __m512i *sum) {
    __m512i w;
    if (v >= nv) return _mm_setzero_si128();
    w = _mm512_cvtps_epi32(_mm512_mul_ps(_mm512_loadu_ps(wb + 16 * v), inv));
    *sum = _mm512_add_epi32(*sum, w);
    return _mm512_cvtepi32_epi8(w);
}
/* The weight bytes (kvq__value_weights) of nj <= 4 query heads, laid out for the value pass:
   w8[j * KVQ__TILE * ng + (t / 4) * 4 ng + 4 g + t % 4] (a dword per group and 4 tokens), with
   unit and bias at [j * ng + g]. Sixteen weights a vector, lane = (token t, group g) = t ng + g, so
   T = 16 / ng tokens a vector and the params of those tokens are one 32-float run of par: no
   transposition. Per head: pass 1 w = p s, its max and the bias by lane, reduced over the lanes of
   each group by rotations; pass 2 the bytes, token-major, then each 4 tokens' bytes group-major
   (one vpermb per 64 bytes). ng a power of two <= 16; other counts take the scalar weights. */
KVQ__INT512_FN void kvq__weights_int512(const float *par, int n, int ng, int top, const float *p, int nj,
                                        uint8_t *w8, int32_t *wsum, float *unit, float *bias) {
    const int T = 16 / ng, nv = (n + T - 1) / T, lg = ng == 1 ? 0 : ng == 2 ? 1 : ng == 4 ? 2 : ng == 8 ? 3 : 4;
    const __m512i lane = KVQ__IOTA16, tok = _mm512_srli_epi32(lane, (unsigned)lg);
    const __m512i grp = _mm512_and_si512(lane, _mm512_set1_epi32(ng - 1));
    const __m512i sidx = _mm512_add_epi32(_mm512_slli_epi32(tok, (unsigned)lg + 1), grp); /* s of (t, g) in par */
    const __m512i midx = _mm512_add_epi32(sidx, _mm512_set1_epi32(ng));
    const __m512 half = _mm512_set1_ps(0.5f * (float)top);
    float sv[16 * KVQ__TILE], mv[16 * KVQ__TILE], wb[16 * KVQ__TILE];
    uint8_t ix[64];
    __m512i tix;
    int v, j, s, o;
    for (v = 0; v < nv; v++) { /* the params of tokens [vT, vT + T): 2 T ng = 32 floats */
        const int left = (n - v * T) * 2 * ng;
        const float *pr = par + (size_t)v * 32;
        const __m512 a = _mm512_maskz_loadu_ps((__mmask16)(left >= 16 ? 0xffff : (1u << left) - 1u), pr);
        const __m512 b = _mm512_maskz_loadu_ps((__mmask16)(left >= 32 ? 0xffff : left > 16 ? (1u << (left - 16)) - 1u : 0u), pr + 16);
        const __m512 sc = _mm512_permutex2var_ps(a, sidx, b);
        _mm512_storeu_ps(sv + 16 * v, sc);
        _mm512_storeu_ps(mv + 16 * v, _mm512_fmadd_ps(sc, half, _mm512_permutex2var_ps(a, midx, b)));
    }
    for (o = 0; o < 64; o += 16) { /* byte o of 64 from o - r + (r % 4) ng + r / 4: group r / 4, token r % 4 */
        const __m512i ov = _mm512_add_epi32(lane, _mm512_set1_epi32(o)), r = _mm512_and_si512(ov, _mm512_set1_epi32(4 * ng - 1));
        const __m512i src = _mm512_add_epi32(_mm512_sub_epi32(ov, r), _mm512_add_epi32(_mm512_slli_epi32(_mm512_and_si512(r, _mm512_set1_epi32(3)), (unsigned)lg),
                                                                                      _mm512_srli_epi32(r, 2)));
        _mm_storeu_si128((__m128i *)(void *)(ix + o), _mm512_cvtepi32_epi8(src));
    }
    tix = _mm512_loadu_si512((const void *)ix);
    for (j = 0; j < nj; j++) {
        const float *pj = p + (size_t)j * KVQ__TILE;
        uint8_t *wj = w8 + (size_t)j * KVQ__TILE * ng;
        __m512 mx = _mm512_set1_ps(KVQ__W_MIN), bv = _mm512_setzero_ps(), inv;
        for (v = 0; v < nv; v++) {
            const int left = n - v * T;
            const __m512 pv = _mm512_permutexvar_ps(tok, _mm512_maskz_loadu_ps((__mmask16)(left >= 16 ? 0xffff : (1u << left) - 1u), pj + v * T));
            const __m512 w = _mm512_mul_ps(pv, _mm512_loadu_ps(sv + 16 * v));
            mx = _mm512_max_ps(mx, w);
            bv = _mm512_fmadd_ps(pv, _mm512_loadu_ps(mv + 16 * v), bv);
            _mm512_storeu_ps(wb + 16 * v, w);
        }
        for (s = ng; s < 16; s *= 2) { /* every lane of a group: its group's max and sum */
            const __m512i rot = _mm512_and_si512(_mm512_add_epi32(lane, _mm512_set1_epi32(s)), _mm512_set1_epi32(15));
            mx = _mm512_max_ps(mx, _mm512_permutexvar_ps(rot, mx));
            bv = _mm512_add_ps(bv, _mm512_permutexvar_ps(rot, bv));
        }
        inv = _mm512_div_ps(_mm512_set1_ps(255.0f), mx);
        _mm512_mask_storeu_ps(unit + j * ng, (__mmask16)((1u << ng) - 1u), _mm512_div_ps(mx, _mm512_set1_ps(510.0f)));
        _mm512_mask_storeu_ps(bias + j * ng, (__mmask16)((1u << ng) - 1u), bv);
        __m512i ws = _mm512_setzero_si512();
        for (v = 0; v < nv; v += 4) { /* four vectors' bytes (64: whole quads), made group-major in registers */
            const __m128i b0 = kvq__wbytes_int512(wb, v, nv, inv, &ws), b1 = kvq__wbytes_int512(wb, v + 1, nv, inv, &ws);
            const __m128i b2 = kvq__wbytes_int512(wb, v + 2, nv, inv, &ws), b3 = kvq__wbytes_int512(wb, v + 3, nv, inv, &ws);
            const __m512i z = _mm512_inserti32x4(
                _mm512_inserti32x4(_mm512_inserti32x4(_mm512_castsi128_si512(b0), b1, 1), b2, 2), b3, 3);
            _mm512_storeu_si512((void *)(wj + 16 * v), _mm512_permutexvar_epi8(tix, z));
        }
        for (s = ng; s < 16; s *= 2) /* W of each group */
            ws = _mm512_add_epi32(ws, _mm512_permutexvar_epi32(_mm512_and_si512(_mm512_add_epi32(lane, _mm512_set1_epi32(s)),
                                                                               _mm512_set1_epi32(15)), ws));
        _mm512_mask_storeu_epi32(wsum + j * ng, (__mmask16)((1u << ng) - 1u), ws);
    }
}

/* Four tokens' 16 code bytes from byte off of their rows (len <= 16 of them), token k in 128-bit
   lane k; rows past n read as zeros (their weights are 0). */
KVQ__INT512_INLINE __m128i kvq__row16_int512(const uint8_t *row, int len) {
    if (len == 16) return _mm_loadu_si128((const __m128i *)(const void *)row);
    return _mm_maskz_loadu_epi8((__mmask16)((1u << len) - 1u), row);
}
KVQ__INT512_INLINE __m512i kvq__rows4_int512(const uint8_t *codes, size_t stride, int t, int n, size_t off, int len) {
    static const uint8_t zero[16] = {0};
    const uint8_t *r0 = codes + stride * (size_t)t + off, *r1 = t + 1 < n ? r0 + stride : zero,
                  *r2 = t + 2 < n ? r0 + 2 * stride : zero, *r3 = t + 3 < n ? r0 + 3 * stride : zero;
    const __m512i x = _mm512_castsi128_si512(kvq__row16_int512(r0, len));
    return _mm512_inserti32x4(_mm512_inserti32x4(_mm512_inserti32x4(x, kvq__row16_int512(r1, len), 1),
                                                 kvq__row16_int512(r2, len), 2),
                              kvq__row16_int512(r3, len), 3);
}

/* Values, 16 channels a vector: per chunk of 16 (low-plane) bytes of the rows, `per` vectors of
   lane r = channel c0 + 16 m + r, byte k = its code in token t + k, so sum_t w8_t code_t is one
   vpdpbusd per 4 tokens (u8 weights, codes <= 15 as s8). Integer sums per call (accumulators
   a<m><j> in registers), then one float step. A chunk shorter than 16 bytes (head_dim 80, ...)
   reads zeros past its end and keeps only its own channels. */
KVQ__INT512_INLINE void kvq__acc_int_pass512(const uint8_t *codes, size_t stride, int n, int D, int G, const int bits,
                                             const uint8_t *w8, const int32_t *wsum, const float *unit,
                                             const float *bias, const int nj, float *const *acc) {
    const int ng = D / G, b = bits == 4 ? 4 : 2, rowb = D * b / 8, per = 128 / b / 16;
    const size_t wstride = (size_t)KVQ__TILE * ng; /* one head's weight bytes */
    const __m512i sh = KVQ__SHIFTS(b), ro = KVQ__ROTATES, four = _mm512_set1_epi8(4);
    const __m512i low = _mm512_set1_epi8((char)((1 << bits) - 1));
    __m512i idx[4], hidx[4];
    int m, k, off, t;
    for (m = 0; m < 4; m++) { /* token k's byte of channel 16 m + r, in 128-bit lane k */
        const __m512i ch = _mm512_add_epi32(KVQ__IOTA16, _mm512_set1_epi32(16 * m));
        idx[m] = kvq__rows_index_int512(_mm512_srli_epi32(ch, b == 4 ? 1 : 2), 16);
        hidx[m] = kvq__rows_index_int512(_mm512_srli_epi32(ch, 3), 16);
    }
    for (off = 0; off < rowb; off += 16) {
        const int len = rowb - off < 16 ? rowb - off : 16, nm = len * 8 / b / 16, c0 = off * 8 / b;
        const uint8_t *wp[4];
        __m512i a00 = _mm512_setzero_si512(), a01 = a00, a02 = a00, a03 = a00, a10 = a00, a11 = a00, a12 = a00,
                a13 = a00, a20 = a00, a21 = a00, a22 = a00, a23 = a00, a30 = a00, a31 = a00, a32 = a00, a33 = a00;
        for (m = 0; m < 4; m++) /* each vector's group (the last real one for vectors past the chunk) */
            wp[m] = w8 + 4 * (size_t)((c0 + 16 * (m < nm ? m : nm - 1)) / G);
        for (t = 0; t < n; t += 4) {
            const __m512i x = kvq__rows4_int512(codes, stride, t, n, (size_t)off, len);
            const __m512i xh = bits == 3 ? kvq__rows4_int512(codes, stride, t, n, (size_t)D / 4 + (size_t)off / 2, len / 2) : x;
            const size_t wt = (size_t)t * ng; /* token quad t / 4: 4 ng bytes */
            __m512i v;
#define KVQ__W(m, j) kvq__word_int512((const int8_t *)(const void *)(wp[(m)] + (j) * wstride + wt))
#define KVQ__VALUE_VECTOR(m, A0, A1, A2, A3)                                                                       \
            v = _mm512_srlv_epi32(_mm512_permutexvar_epi8(idx[(m)], x), sh);                                         \
            if (bits == 3) /* ternary logic 0xd8 = c ? b : a, bitwise: bit 2 from the high plane */               \
                v = _mm512_ternarylogic_epi32(v, _mm512_rolv_epi32(_mm512_permutexvar_epi8(hidx[(m)], xh), ro), four, 0xd8); \
            v = _mm512_and_si512(v, low);                                                                          \
            (A0) = _mm512_dpbusd_epi32(A0, KVQ__W(m, 0), v);                                                       \
            if (nj > 1) (A1) = _mm512_dpbusd_epi32(A1, KVQ__W(m, 1), v);                                           \
            if (nj > 2) (A2) = _mm512_dpbusd_epi32(A2, KVQ__W(m, 2), v);                                           \
            if (nj > 3) (A3) = _mm512_dpbusd_epi32(A3, KVQ__W(m, 3), v);
            KVQ__VALUE_VECTOR(0, a00, a01, a02, a03)
            KVQ__VALUE_VECTOR(1, a10, a11, a12, a13)
            if (per > 2) {
                KVQ__VALUE_VECTOR(2, a20, a21, a22, a23)
                KVQ__VALUE_VECTOR(3, a30, a31, a32, a33)
            }
#undef KVQ__VALUE_VECTOR
#undef KVQ__W
        }
        for (m = 0; m < nm; m++) {
            const __m512i am[4][4] = {{a00, a01, a02, a03}, {a10, a11, a12, a13}, {a20, a21, a22, a23}, {a30, a31, a32, a33}};
            for (k = 0; k < nj; k++) { /* acc += unit (2 sum - top W) + bias */
                const int ch = c0 + 16 * m, i = k * ng + ch / G;
                const __m512i e = _mm512_sub_epi32(_mm512_add_epi32(am[m][k], am[m][k]), _mm512_set1_epi32(((1 << bits) - 1) * wsum[i]));
                _mm512_storeu_ps(acc[k] + ch, _mm512_add_ps(_mm512_loadu_ps(acc[k] + ch),
                                                            _mm512_fmadd_ps(_mm512_cvtepi32_ps(e), _mm512_set1_ps(unit[i]),
                                                                            _mm512_set1_ps(bias[i]))));
            }
        }
    }
}
KVQ__INT512_FN void kvq__acc_int_avx512(const uint8_t *codes, size_t stride, const float *par, int n, int D, int G,
                                        int bits, const float *p, int nh, float *const *acc) {
    const int ng = D / G, top = (1 << bits) - 1;
    uint8_t w8[4 * 32 * KVQ__TILE + 64];
    int32_t wsum[4 * 32];
    float unit[4 * 32], bias[4 * 32];
    int j0, j, g, t;
    for (j0 = 0; j0 < nh; j0 += 4) {
        const int nj = nh - j0 < 4 ? nh - j0 : 4;
        if (ng <= 16 && (ng & (ng - 1)) == 0) {
            kvq__weights_int512(par, n, ng, top, p + (size_t)j0 * KVQ__TILE, nj, w8, wsum, unit, bias);
        } else { /* 3, 5, 6, ... groups: the reference's weights, in the pass's layout */
            uint8_t wg[KVQ__TILE + 3];
            for (j = 0; j < nj; j++)
                for (g = 0; g < ng; g++) {
                    wsum[j * ng + g] = kvq__value_weights(par, n, ng, g, top, p + (size_t)(j0 + j) * KVQ__TILE, wg,
                                                          unit + j * ng + g, bias + j * ng + g);
                    for (t = 0; t < (n + 3) / 4 * 4; t++)
                        w8[(size_t)j * KVQ__TILE * ng + (size_t)(t / 4) * 4 * ng + 4 * g + t % 4] = wg[t];
                }
        }
#define KVQ__PASS(b, k) kvq__acc_int_pass512(codes, stride, n, D, G, b, w8, wsum, unit, bias, k, acc + j0)
        KVQ__INT_CASES(bits, nj, KVQ__PASS)
#undef KVQ__PASS
    }
}
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic pop
#endif
#else
#define kvq__scores_int_avx512 kvq__scores_int_avx2 /* AVX-512 without VNNI or VBMI */
#define kvq__acc_int_avx512 kvq__acc_int_avx2
#endif /* KVQ__HAVE_AVX512_INT */
#endif /* KVQ__HAVE_AVX512 */

/* ---- NEON (aarch64): 4 lanes, two vectors per step of 8 --------------------------- */
#if KVQ__HAVE_NEON
typedef struct kvq__f32x8 { float32x4_t lo, hi; } kvq__f32x8;
#define kvq__search_row_neon kvq__search_row_scalar /* aarch64's baseline has NEON already */
#define kvq__fits_fp16_neon kvq__fits_fp16_scalar
#if !KVQ__HAVE_NEON_INT /* the integer kernels need Armv8.2's sdot/udot: the reference */
#define kvq__scores_int_neon kvq__scores_int_scalar
#define kvq__acc_int_neon kvq__acc_int_scalar
#endif
#define kvq__search_columns_neon kvq__search_columns_scalar

/* A run of 2 or 4 bits as one word. */
static uint32_t kvq__load8(const uint8_t *p, int bits) {
    uint32_t w = (uint32_t)p[0] | (uint32_t)p[1] << 8;
    if (bits == 4) w |= (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24;
    return w;
}
/* The run at p as 8 floats; at 3 bits p is its low plane (unpacked as 2 bits: sh_lo, sh_hi and
   mask from kvq__shifts_neon) and hp its high byte, whose bit 16 + t of the word goes to bit 2. */
static kvq__f32x8 kvq__codes8_neon(const uint8_t *p, const uint8_t *hp, int bits, int32x4_t sh_lo, int32x4_t sh_hi,
                                   uint32x4_t mask) {
    kvq__f32x8 r;
    if (bits == 8) {
        uint16x8_t w = vmovl_u8(vld1_u8(p));
        r.lo = vcvtq_f32_u32(vmovl_u16(vget_low_u16(w)));
        r.hi = vcvtq_f32_u32(vmovl_u16(vget_high_u16(w)));
    } else {
        uint32x4_t v = vdupq_n_u32(bits == 3 ? kvq__planes8(p, hp) : kvq__load8(p, bits));
        uint32x4_t lo = vandq_u32(vshlq_u32(v, sh_lo), mask), hi = vandq_u32(vshlq_u32(v, sh_hi), mask);
        if (bits == 3) { /* counts sh / 2 - 14 = -(14 + t): bit 16 + t to bit 2 */
            const uint32x4_t four = vdupq_n_u32(4u);
            const int32x4_t d = vdupq_n_s32(14);
            lo = vorrq_u32(lo, vandq_u32(vshlq_u32(v, vsubq_s32(vshrq_n_s32(sh_lo, 1), d)), four));
            hi = vorrq_u32(hi, vandq_u32(vshlq_u32(v, vsubq_s32(vshrq_n_s32(sh_hi, 1), d)), four));
        }
        r.lo = vcvtq_f32_u32(lo); /* negative counts shift right */
        r.hi = vcvtq_f32_u32(hi);
    }
    return r;
}
static float32x4_t kvq__f16x4_neon(const uint16_t *p) { return vcvt_f32_f16(vreinterpret_f16_u16(vld1_u16(p))); }
/* 16-bit value params (kvq__params16_scalar), 4 groups a step where ng is a multiple of 4 (the
   scalar decode otherwise): the scale is the fp16 whose bits are e << 7 (subnormals included),
   the min m8 * s / 16 (exact). */
static void kvq__params16_neon(const uint16_t *par, int n, int ng, float *out) {
    int t, g;
    if (ng % 4) {
        kvq__params16_scalar(par, n, ng, out);
        return;
    }
    for (t = 0; t < n; t++, par += ng, out += 2 * ng)
        for (g = 0; g < ng; g += 4) {
            const uint16x4_t u = vld1_u16(par + g);
            const float32x4_t s = vcvt_f32_f16(vreinterpret_f16_u16(vshl_n_u16(vand_u16(u, vdup_n_u16(0xff)), 7)));
            const float32x4_t m8 = vcvtq_f32_s32(vmovl_s16(vshr_n_s16(vreinterpret_s16_u16(u), 8)));
            vst1q_f32(out + g, s);
            vst1q_f32(out + ng + g, vmulq_f32(vmulq_f32(m8, s), vdupq_n_f32(0.0625f)));
        }
}
/* -lane * bits (right shifts), 2 for a 3-bit run's low plane; the mask of those low bits */
static void kvq__shifts_neon(int bits, int32x4_t *lo, int32x4_t *hi, uint32x4_t *mask) {
    const int32_t s[8] = {0, -1, -2, -3, -4, -5, -6, -7};
    const int b = bits == 3 ? 2 : bits;
    *lo = vmulq_n_s32(vld1q_s32(s), b);
    *hi = vmulq_n_s32(vld1q_s32(s + 4), b);
    *mask = vdupq_n_u32((1u << b) - 1u);
}

static void kvq__to_f16_neon(uint16_t *dst, const float *src, int n) {
    int i = 0;
    for (; i + 4 <= n; i += 4) vst1_u16(dst + i, vreinterpret_u16_f16(vcvt_f16_f32(vld1q_f32(src + i))));
    for (; i < n; i++) dst[i] = kvq__f32_to_f16(src[i]);
}
static void kvq__to_f32_neon(float *dst, const uint16_t *src, int n) {
    int i = 0;
    for (; i + 4 <= n; i += 4) vst1q_f32(dst + i, kvq__f16x4_neon(src + i));
    for (; i < n; i++) dst[i] = kvq__f16_to_f32(src[i]);
}

/* x < lo ? x : lo, as the scalar scan (FMIN would order -0 below +0) */
static float32x4_t kvq__min_neon(float32x4_t x, float32x4_t lo) { return vbslq_f32(vcltq_f32(x, lo), x, lo); }
static float32x4_t kvq__max_neon(float32x4_t x, float32x4_t hi) { return vbslq_f32(vcgtq_f32(x, hi), x, hi); }
static float32x4_t kvq__code_neon(float32x4_t x, float32x4_t m, float32x4_t s, float32x4_t top, uint32x4_t s_zero) {
    float32x4_t v = vrndnq_f32(vdivq_f32(vsubq_f32(x, m), s));
    v = vminq_f32(vmaxq_f32(v, vdupq_n_f32(0.0f)), top);
    return vreinterpretq_f32_u32(vbicq_u32(vreinterpretq_u32_f32(v), s_zero));
}
static void kvq__store_codes4_neon(uint8_t *dst, float32x4_t v) {
    uint32x4_t i = vcvtq_u32_f32(v);
    dst[0] = (uint8_t)vgetq_lane_u32(i, 0);
    dst[1] = (uint8_t)vgetq_lane_u32(i, 1);
    dst[2] = (uint8_t)vgetq_lane_u32(i, 2);
    dst[3] = (uint8_t)vgetq_lane_u32(i, 3);
}

static void kvq__minmax_neon(const float *x, int n, float *lo, float *hi) {
    float32x4_t a = vld1q_f32(x), b = a;
    int i;
    for (i = 4; i < n; i += 4) {
        float32x4_t v = vld1q_f32(x + i);
        a = kvq__min_neon(v, a);
        b = kvq__max_neon(v, b);
    }
    *lo = vminvq_f32(a);
    *hi = vmaxvq_f32(b);
}
static void kvq__code_run_neon(const float *x, int n, float m, float s, int bits, uint8_t *out) {
    const float32x4_t vm = vdupq_n_f32(m), vs = vdupq_n_f32(s), top = vdupq_n_f32((float)((1 << bits) - 1));
    const uint32x4_t sz = vceqq_f32(vs, vdupq_n_f32(0.0f));
    int i;
    for (i = 0; i < n; i += 4) kvq__store_codes4_neon(out + i, kvq__code_neon(vld1q_f32(x + i), vm, vs, top, sz));
}
static void kvq__quantize_value_neon(const uint16_t *row, int D, int G, int bits, int pbits, int grid,
                                     uint16_t *par, uint8_t *codes) {
    kvq__quantize_value_simd(row, D, G, bits, pbits, grid, par, codes, kvq__to_f32_neon, kvq__minmax_neon,
                             kvq__code_run_neon);
}

static void kvq__quantize_keys_neon(const uint16_t *rows, int D, int G, int bits, uint8_t *blk, int keep_params) {
    uint16_t *scale = (uint16_t *)(void *)blk, *mins = scale + D;
    uint8_t *codes = kvq__block_codes_rw(blk, D), cb[KVQ__TILE * 4];
    const size_t rb = (size_t)G * bits / 8;
    const float32x4_t top = vdupq_n_f32((float)((1 << bits) - 1));
    int cc, t, lane;
    for (cc = 0; cc < D; cc += 4) {
        float32x4_t lo = kvq__f16x4_neon(rows + cc), hi = lo, m, s;
        float16x4_t mh, sh;
        uint32x4_t sz;
        if (keep_params) {
            mh = vreinterpret_f16_u16(vld1_u16(mins + cc));
            sh = vreinterpret_f16_u16(vld1_u16(scale + cc));
        } else {
            for (t = 1; t < G; t++) {
                float32x4_t x = kvq__f16x4_neon(rows + (size_t)t * D + cc);
                lo = kvq__min_neon(x, lo);
                hi = kvq__max_neon(x, hi);
            }
            mh = vcvt_f16_f32(lo);
            sh = vcvt_f16_f32(vdivq_f32(vsubq_f32(hi, lo), top));
            vst1_u16(mins + cc, vreinterpret_u16_f16(mh));
            vst1_u16(scale + cc, vreinterpret_u16_f16(sh));
        }
        m = vcvt_f32_f16(mh);
        s = vcvt_f32_f16(sh);
        sz = vceqq_f32(s, vdupq_n_f32(0.0f));
        for (t = 0; t < G; t++)
            kvq__store_codes4_neon(cb + t * 4, kvq__code_neon(kvq__f16x4_neon(rows + (size_t)t * D + cc), m, s, top, sz));
        for (lane = 0; lane < 4; lane++)
            for (t = 0; t < G; t += 8)
                kvq__store_run(codes + (size_t)(cc + lane) * rb, G, t, kvq__gather8(cb + t * 4 + lane, 4), bits);
    }
}

static void kvq__scores_codes_neon(const uint8_t *blk, int D, int G, int bits, const float *q, int nh,
                                   float *scores) {
    const uint16_t *sc = (const uint16_t *)(const void *)blk, *mn = sc + D;
    const uint8_t *codes = kvq__block_codes(blk, D);
    const size_t rb = (size_t)G * bits / 8;
    uint32x4_t mask;
    int32x4_t sl, sh;
    float qs[KVQ__HEAD_CHUNK * 512], bias[KVQ__HEAD_CHUNK];
    int j, j0, ch, t0;
    kvq__shifts_neon(bits, &sl, &sh, &mask);
    for (j = 0; j < nh; j++) { /* fold the channel scales into the query; the mins are one bias */
        float32x4_t b = vdupq_n_f32(0.0f);
        for (ch = 0; ch < D; ch += 4) {
            float32x4_t qv = vld1q_f32(q + (size_t)j * D + ch);
            vst1q_f32(qs + (size_t)j * D + ch, vmulq_f32(qv, kvq__f16x4_neon(sc + ch)));
            b = vfmaq_f32(b, qv, kvq__f16x4_neon(mn + ch));
        }
        bias[j] = vaddvq_f32(b);
    }
    for (j0 = 0; j0 < nh; j0 += 2) {
        const int nj = nh - j0 < 2 ? nh - j0 : 2;
        const float *q0 = qs + (size_t)j0 * D;
        for (t0 = 0; t0 < G; t0 += 8) {
            const uint8_t *cp = codes + kvq__run_at(t0, bits), *hp = kvq__hi_ptr(codes, G, t0, bits);
            float32x4_t a0 = vdupq_n_f32(0.0f), b0 = a0, a1 = a0, b1 = a0;
            float *s0 = scores + (size_t)j0 * KVQ__TILE + t0;
            for (ch = 0; ch < D; ch++, cp += rb, hp += rb) {
                kvq__f32x8 v = kvq__codes8_neon(cp, hp, bits, sl, sh, mask);
                a0 = vfmaq_n_f32(a0, v.lo, q0[ch]);
                b0 = vfmaq_n_f32(b0, v.hi, q0[ch]);
                if (nj > 1) {
                    a1 = vfmaq_n_f32(a1, v.lo, q0[D + ch]);
                    b1 = vfmaq_n_f32(b1, v.hi, q0[D + ch]);
                }
            }
            vst1q_f32(s0, vaddq_f32(a0, vdupq_n_f32(bias[j0])));
            vst1q_f32(s0 + 4, vaddq_f32(b0, vdupq_n_f32(bias[j0])));
            if (nj > 1) {
                vst1q_f32(s0 + KVQ__TILE, vaddq_f32(a1, vdupq_n_f32(bias[j0 + 1])));
                vst1q_f32(s0 + KVQ__TILE + 4, vaddq_f32(b1, vdupq_n_f32(bias[j0 + 1])));
            }
        }
    }
}

static void kvq__scores_f16_neon(const uint16_t *const *rows, int n, int D, const float *q, int nh, float *scores) {
    int j0, t, ch;
    for (j0 = 0; j0 < nh; j0 += 2) {
        const int nj = nh - j0 < 2 ? nh - j0 : 2;
        const float *q0 = q + (size_t)j0 * D;
        float *s0 = scores + (size_t)j0 * KVQ__TILE;
        for (t = 0; t < n; t++) {
            float32x4_t a0 = vdupq_n_f32(0.0f), a1 = a0;
            for (ch = 0; ch < D; ch += 4) {
                float32x4_t v = kvq__f16x4_neon(rows[t] + ch);
                a0 = vfmaq_f32(a0, vld1q_f32(q0 + ch), v);
                if (nj > 1) a1 = vfmaq_f32(a1, vld1q_f32(q0 + D + ch), v);
            }
            s0[t] = vaddvq_f32(a0);
            if (nj > 1) s0[KVQ__TILE + t] = vaddvq_f32(a1);
        }
    }
}

/* The AVX2 kernel's exp, 4 lanes. */
static float32x4_t kvq__exp_neon(float32x4_t x) {
    float32x4_t n, r, p;
    x = vmaxq_f32(x, vdupq_n_f32(-87.0f));
    n = vrndnq_f32(vmulq_n_f32(x, 1.44269504f));
    r = vfmsq_f32(x, n, vdupq_n_f32(0.693359375f));
    r = vfmsq_f32(r, n, vdupq_n_f32(-2.12194440e-4f));
    p = vdupq_n_f32(1.9875691500e-4f);
    p = vfmaq_f32(vdupq_n_f32(1.3981999507e-3f), p, r);
    p = vfmaq_f32(vdupq_n_f32(8.3334519073e-3f), p, r);
    p = vfmaq_f32(vdupq_n_f32(4.1665795894e-2f), p, r);
    p = vfmaq_f32(vdupq_n_f32(1.6666665459e-1f), p, r);
    p = vfmaq_f32(vdupq_n_f32(5.0000001201e-1f), p, r);
    p = vfmaq_f32(vaddq_f32(r, vdupq_n_f32(1.0f)), p, vmulq_f32(r, r));
    return vreinterpretq_f32_s32(vaddq_s32(vreinterpretq_s32_f32(p), vshlq_n_s32(vcvtq_s32_f32(n), 23)));
}
static float kvq__exp_sum_neon(float *x, int n, float mx) {
    float32x4_t acc = vdupq_n_f32(0.0f);
    int t = 0;
    for (; t + 4 <= n; t += 4) {
        float32x4_t e = kvq__exp_neon(vsubq_f32(vld1q_f32(x + t), vdupq_n_f32(mx)));
        vst1q_f32(x + t, e);
        acc = vaddq_f32(acc, e);
    }
    return vaddvq_f32(acc) + kvq__exp_sum_scalar(x + t, n - t, mx);
}

static void kvq__acc_codes_neon(const uint8_t *codes, size_t stride, const float *par, int n, int D, int G,
                                int bits, const float *p, int nh, float *const *acc) {
    const int ng = (D + G - 1) / G;
    uint32x4_t mask;
    int32x4_t sl, sh;
    int j0, cc, t;
    kvq__shifts_neon(bits, &sl, &sh, &mask);
    for (j0 = 0; j0 < nh; j0 += 2) {
        const int nj = nh - j0 < 2 ? nh - j0 : 2;
        const float *p0 = p + (size_t)j0 * KVQ__TILE;
        for (cc = 0; cc < D; cc += 8) {
            const float *pt = par + cc / G;
            const uint8_t *cp = codes + kvq__run_at(cc, bits), *hp = kvq__hi_ptr(codes, D, cc, bits);
            float *o0 = acc[j0] + cc, *o1 = nj > 1 ? acc[j0 + 1] + cc : o0;
            float32x4_t a0 = vld1q_f32(o0), b0 = vld1q_f32(o0 + 4), a1 = vld1q_f32(o1), b1 = vld1q_f32(o1 + 4);
            for (t = 0; t < n; t++, cp += stride, hp += stride, pt += 2 * ng) {
                kvq__f32x8 v = kvq__codes8_neon(cp, hp, bits, sl, sh, mask);
                float32x4_t m = vdupq_n_f32(pt[ng]);
                float32x4_t vl = vfmaq_n_f32(m, v.lo, pt[0]), vh = vfmaq_n_f32(m, v.hi, pt[0]);
                a0 = vfmaq_n_f32(a0, vl, p0[t]);
                b0 = vfmaq_n_f32(b0, vh, p0[t]);
                if (nj > 1) {
                    a1 = vfmaq_n_f32(a1, vl, p0[KVQ__TILE + t]);
                    b1 = vfmaq_n_f32(b1, vh, p0[KVQ__TILE + t]);
                }
            }
            vst1q_f32(o0, a0);
            vst1q_f32(o0 + 4, b0);
            if (nj > 1) {
                vst1q_f32(o1, a1);
                vst1q_f32(o1 + 4, b1);
            }
        }
    }
}

static void kvq__dot_codes_neon(const uint8_t *codes, size_t stride, const float *par, int n, int D, int G,
                                int bits, const float *q, int nh, float *scores) {
    const int ng = (D + G - 1) / G;
    uint32x4_t mask;
    int32x4_t sl, sh;
    int j, cc, t;
    kvq__shifts_neon(bits, &sl, &sh, &mask);
    for (t = 0; t < n; t++) {
        const uint8_t *ct = codes + stride * t;
        const float *pt = par + (size_t)t * 2 * ng;
        for (j = 0; j < nh; j++) { /* a head at a time: a tile holds a few side-store records */
            const float *qj = q + (size_t)j * D;
            float32x4_t a = vdupq_n_f32(0.0f), b = a;
            for (cc = 0; cc < D; cc += 8) {
                kvq__f32x8 v = kvq__codes8_neon(ct + kvq__run_at(cc, bits), kvq__hi_ptr(ct, D, cc, bits), bits, sl, sh,
                                                mask);
                float32x4_t m = vdupq_n_f32(pt[ng + cc / G]);
                a = vfmaq_f32(a, vld1q_f32(qj + cc), vfmaq_n_f32(m, v.lo, pt[cc / G]));
                b = vfmaq_f32(b, vld1q_f32(qj + cc + 4), vfmaq_n_f32(m, v.hi, pt[cc / G]));
            }
            scores[(size_t)j * KVQ__TILE + t] = vaddvq_f32(vaddq_f32(a, b));
        }
    }
}

static void kvq__acc_f16_neon(const uint16_t *const *rows, int n, int D, const float *p, int nh, float *const *acc) {
    int j0, cc, t;
    for (j0 = 0; j0 < nh; j0 += 2) {
        const int nj = nh - j0 < 2 ? nh - j0 : 2;
        const float *p0 = p + (size_t)j0 * KVQ__TILE;
        for (cc = 0; cc < D; cc += 8) {
            float *o0 = acc[j0] + cc, *o1 = nj > 1 ? acc[j0 + 1] + cc : o0;
            float32x4_t a0 = vld1q_f32(o0), b0 = vld1q_f32(o0 + 4), a1 = vld1q_f32(o1), b1 = vld1q_f32(o1 + 4);
            for (t = 0; t < n; t++) {
                float32x4_t vl = kvq__f16x4_neon(rows[t] + cc), vh = kvq__f16x4_neon(rows[t] + cc + 4);
                a0 = vfmaq_n_f32(a0, vl, p0[t]);
                b0 = vfmaq_n_f32(b0, vh, p0[t]);
                if (nj > 1) {
                    a1 = vfmaq_n_f32(a1, vl, p0[KVQ__TILE + t]);
                    b1 = vfmaq_n_f32(b1, vh, p0[KVQ__TILE + t]);
                }
            }
            vst1q_f32(o0, a0);
            vst1q_f32(o0 + 4, b0);
            if (nj > 1) {
                vst1q_f32(o1, a1);
                vst1q_f32(o1 + 4, b1);
            }
        }
    }
}

/* Rotation butterflies, len >= 8 (so a multiple of 4). */
static void kvq__butterflies_neon(float *x, int n, int len) {
    int i, j;
    for (i = 0; i < n; i += 2 * len)
        for (j = i; j < i + len; j += 4) {
            float32x4_t a = vld1q_f32(x + j), b = vld1q_f32(x + j + len);
            vst1q_f32(x + j, vaddq_f32(a, b));
            vst1q_f32(x + j + len, vsubq_f32(a, b));
        }
}

/* ---- NEON integer attention (Armv8.2 dot product: sdot for keys, udot for values), the scheme of
   "Integer attention", the AVX-512 kernels' design in 128 bits. A 32-bit lane holds 4 bytes: for keys
   one token's codes of 4 channels (s8, against 4 query bytes), for values one channel's codes of 4
   tokens (u8, against 4 weight bytes). kvq__lanes16_neon builds them from 16 codes of 4 rows: a table
   lookup transposes the rows' bytes (lane m = byte m of each row) and a byte shift by 2 s brings
   the code at 4 m + s to bit 0, so vector s holds positions 4 m + s (4 bits: 8 (s/2) + 2 m + s%2),
   which vst4q / vld4q (vst2q / vld2q) put back in order. The shifted bytes keep the row's higher
   codes above: a dot product is linear, so sum(code_s) = sum(v_s) - 4 sum(v_{s+1}) takes them out
   once per call (kvq__unmask_neon) rather than a mask per vector; a key byte must stay below 128
   (sdot reads it signed), so keys mask their lowest code. Without __ARM_FEATURE_DOTPROD (plain
   armv8-a) the scalar kernels run. ---- */
#if KVQ__HAVE_NEON_INT
/* tbl indices, lane m byte k = row k's byte m: of 4 rows of 4 bytes (row k at 4 k); of 4 rows of 2
   high-plane bytes (row k at 2 k; lane m takes byte m / 2, whose nibble m % 2 it keeps) */
static const uint8_t kvq__tr4_neon[16] = {0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15};
static const uint8_t kvq__tr2_neon[16] = {0, 2, 4, 6, 0, 2, 4, 6, 1, 3, 5, 7, 1, 3, 5, 7};
static const int8_t kvq__nib_neon[16] = {0, 0, 0, 0, -4, -4, -4, -4, 0, 0, 0, 0, -4, -4, -4, -4};

/* 4 bytes of 4 rows rs apart, row k in lane k (ld1r, then ld1 to lanes 1-3). */
static KVQ__INLINE uint8x16_t kvq__rows4x4_neon(const uint8_t *p, size_t rs) {
    uint32_t w0, w1, w2, w3;
    memcpy(&w0, p, 4);
    memcpy(&w1, p + rs, 4);
    memcpy(&w2, p + 2 * rs, 4);
    memcpy(&w3, p + 3 * rs, 4);
    return vreinterpretq_u8_u32(vsetq_lane_u32(w3, vsetq_lane_u32(w2, vsetq_lane_u32(w1, vdupq_n_u32(w0), 1), 2), 3));
}
/* 2 bytes of 4 rows, row k at bytes 2 k, 2 k + 1 (the upper half repeats row 0). */
static KVQ__INLINE uint8x16_t kvq__rows4x2_neon(const uint8_t *p, size_t rs) {
    uint16_t h0, h1, h2, h3;
    memcpy(&h0, p, 2);
    memcpy(&h1, p + rs, 2);
    memcpy(&h2, p + 2 * rs, 2);
    memcpy(&h3, p + 3 * rs, 2);
    return vreinterpretq_u8_u16(vsetq_lane_u16(h3, vsetq_lane_u16(h2, vsetq_lane_u16(h1, vdupq_n_u16(h0), 1), 2), 3));
}

/* The 16 codes from position i (a multiple of 16) of 4 packed rows rs bytes apart, as 4 vectors:
   lane m, byte k of v[s] = row k's code at i + 4 m + s (4 bits: i + 8 (s/2) + 2 m + s%2). p is the
   run at i (i * bits / 8; at 3 bits its low plane's, i / 4), hp the high plane's 2 bytes (3 bits).
   The codes are exact but for those v[s] that still carry the higher codes of their byte (unmasked:
   2 bits: v[1..3], and v[0] with raw; 4 bits with raw: v[0], v[2]), whose sums kvq__unmask_neon
   fixes. raw (values): every byte may reach 255; otherwise (keys) each stays below 64. */
static KVQ__INLINE uint8x16x4_t kvq__lanes16_neon(const uint8_t *p, const uint8_t *hp, size_t rs, const int bits,
                                                  const int raw) {
    uint8x16x4_t v;
    if (bits == 4) { /* 8 bytes a row: bytes 0-3 hold positions 0-7, bytes 4-7 positions 8-15 */
        const uint8x16_t r02 = vcombine_u8(vld1_u8(p), vld1_u8(p + 2 * rs));
        const uint8x16_t r13 = vcombine_u8(vld1_u8(p + rs), vld1_u8(p + 3 * rs));
        const uint8x16_t r01 = vzip1q_u8(r02, r13), r23 = vzip2q_u8(r02, r13); /* byte pairs of rows 0 1, 2 3 */
        const uint8x16_t w0 = vreinterpretq_u8_u16(vzip1q_u16(vreinterpretq_u16_u8(r01), vreinterpretq_u16_u8(r23)));
        const uint8x16_t w1 = vreinterpretq_u8_u16(vzip2q_u16(vreinterpretq_u16_u8(r01), vreinterpretq_u16_u8(r23)));
        v.val[0] = raw ? w0 : vandq_u8(w0, vdupq_n_u8(15));
        v.val[1] = vshrq_n_u8(w0, 4);
        v.val[2] = raw ? w1 : vandq_u8(w1, vdupq_n_u8(15));
        v.val[3] = vshrq_n_u8(w1, 4);
    } else {
        const uint8x16_t w = vqtbl1q_u8(kvq__rows4x4_neon(p, rs), vld1q_u8(kvq__tr4_neon));
        v.val[0] = raw || bits == 3 ? w : vandq_u8(w, vdupq_n_u8(3));
        v.val[1] = vshrq_n_u8(w, 2);
        v.val[2] = vshrq_n_u8(w, 4);
        v.val[3] = vshrq_n_u8(w, 6);
        if (bits == 3) { /* bit s of h = the high bit at 4 m + s (odd lanes: their byte's upper nibble, shifted
                            down); (h << (7 - s)) >> 7 isolates it; shift left and insert sets it above 2 bits */
            const uint8x16_t h = vshlq_u8(vqtbl1q_u8(kvq__rows4x2_neon(hp, rs), vld1q_u8(kvq__tr2_neon)),
                                          vld1q_s8(kvq__nib_neon));
            v.val[0] = vsliq_n_u8(v.val[0], vshrq_n_u8(vshlq_n_u8(h, 7), 7), 2);
            v.val[1] = vsliq_n_u8(v.val[1], vshrq_n_u8(vshlq_n_u8(h, 6), 7), 2);
            v.val[2] = vsliq_n_u8(v.val[2], vshrq_n_u8(vshlq_n_u8(h, 5), 7), 2);
            v.val[3] = vsliq_n_u8(v.val[3], vshrq_n_u8(vshlq_n_u8(h, 4), 7), 2);
        }
    }
    return v;
}

/* Sums d[s] over kvq__lanes16_neon's vectors as sums over the codes: an unmasked 2-bit byte is
   code_s + 4 code_{s+1} + ..., so sum(code_s) = d[s] - 4 d[s+1] (4 bits: d[s] - 16 d[s+1]); lowest
   first, so each step reads its d[s+1] unchanged. Exact in int32 (mod 2^32 for the u32 sums). */
static KVQ__INLINE int32x4x4_t kvq__unmask_neon(int32x4x4_t d, const int bits, const int raw) {
    if (bits == 2) {
        if (raw) d.val[0] = vmlsq_n_s32(d.val[0], d.val[1], 4);
        d.val[1] = vmlsq_n_s32(d.val[1], d.val[2], 4);
        d.val[2] = vmlsq_n_s32(d.val[2], d.val[3], 4);
    } else if (bits == 4 && raw) {
        d.val[0] = vmlsq_n_s32(d.val[0], d.val[1], 16);
        d.val[2] = vmlsq_n_s32(d.val[2], d.val[3], 16);
    }
    return d;
}

/* 16 floats at o in the order of kvq__lanes16_neon's vectors, and back. */
static KVQ__INLINE float32x4x4_t kvq__load16_neon(const float *o, const int bits) {
    float32x4x4_t f;
    if (bits == 4) {
        const float32x4x2_t a = vld2q_f32(o), b = vld2q_f32(o + 8);
        f.val[0] = a.val[0];
        f.val[1] = a.val[1];
        f.val[2] = b.val[0];
        f.val[3] = b.val[1];
        return f;
    }
    return vld4q_f32(o);
}
static KVQ__INLINE void kvq__store16_neon(float *o, float32x4x4_t f, const int bits) {
    if (bits == 4) {
        float32x4x2_t a, b;
        a.val[0] = f.val[0];
        a.val[1] = f.val[1];
        b.val[0] = f.val[2];
        b.val[1] = f.val[3];
        vst2q_f32(o, a);
        vst2q_f32(o + 8, b);
    } else {
        vst4q_f32(o, f);
    }
}

/* One head's query for the integer keys: the bytes hi, lo of kvq__query_q16 (vcvtnq rounds to
   nearest even, as rintf), per 8 channels 16 bytes in qb: hi of the 8, then lo (one vector, the
   4-byte words of two channel quads); *bias = sum_c q_c m_c. Returns the unit amax / 32639. */
static float kvq__query_int_neon(const float *q, const uint16_t *sc, const uint16_t *mn, int D, int8_t *qb,
                                 float *bias) {
    float qs[512], amax;
    float32x4_t mx = vdupq_n_f32(0.0f), b = mx, inv;
    int c;
    for (c = 0; c < D; c += 8) {
        const float32x4_t q0 = vld1q_f32(q + c), v0 = vmulq_f32(q0, kvq__f16x4_neon(sc + c));
        const float32x4_t q1 = vld1q_f32(q + c + 4), v1 = vmulq_f32(q1, kvq__f16x4_neon(sc + c + 4));
        vst1q_f32(qs + c, v0);
        vst1q_f32(qs + c + 4, v1);
        mx = vmaxq_f32(mx, vmaxq_f32(vabsq_f32(v0), vabsq_f32(v1)));
        b = vfmaq_f32(vfmaq_f32(b, q0, kvq__f16x4_neon(mn + c)), q1, kvq__f16x4_neon(mn + c + 4));
    }
    amax = vmaxvq_f32(mx);
    *bias = vaddvq_f32(b);
    inv = vdupq_n_f32(amax > 0.0f ? KVQ__Q16 / amax : 0.0f);
    /* per 8 channels v = rint(qs inv), |v| <= 32639 (int16); hi = floor((v + 128) / 256), a rounding
       narrowing shift, and lo = v - 256 hi, v's low byte */
    for (c = 0; c < D; c += 8) {
        const int16x8_t v = vcombine_s16(vmovn_s32(vcvtnq_s32_f32(vmulq_f32(vld1q_f32(qs + c), inv))),
                                         vmovn_s32(vcvtnq_s32_f32(vmulq_f32(vld1q_f32(qs + c + 4), inv))));
        vst1q_s8(qb + 2 * c, vcombine_s8(vrshrn_n_s16(v, 8), vmovn_s16(v)));
    }
    return amax / KVQ__Q16;
}

/* Scores of a block, 16 tokens at a time for nj <= 2 heads: per 8 channels the two quads of rows
   x (channels c..c+3) and y (c+4..c+7) against the words of qb's vector, lanes 0-1 hi, 2-3 lo;
   per head the sums H.val[s] (hi) and L.val[s] (lo) of vector s, then score = (256 H + L) unit + bias.
   (Written out, not looped: gcc keeps looped-over accumulator arrays in memory.) */
#define KVQ__SDOT4(A, v, qv, lane) /* A.val[s] += v.val[s] . qv's word lane */                                        \
    (A).val[0] = vdotq_laneq_s32((A).val[0], vreinterpretq_s8_u8((v).val[0]), qv, lane);                              \
    (A).val[1] = vdotq_laneq_s32((A).val[1], vreinterpretq_s8_u8((v).val[1]), qv, lane);                              \
    (A).val[2] = vdotq_laneq_s32((A).val[2], vreinterpretq_s8_u8((v).val[2]), qv, lane);                              \
    (A).val[3] = vdotq_laneq_s32((A).val[3], vreinterpretq_s8_u8((v).val[3]), qv, lane);
#define KVQ__SDOT8(H, L, qv)                                                                                          \
    KVQ__SDOT4(H, x, qv, 0) KVQ__SDOT4(H, y, qv, 1) KVQ__SDOT4(L, x, qv, 2) KVQ__SDOT4(L, y, qv, 3)
static KVQ__INLINE float32x4_t kvq__score4_neon(int32x4_t h, int32x4_t l, float unit, float bias) {
    return vfmaq_n_f32(vdupq_n_f32(bias), vcvtq_f32_s32(vmlaq_n_s32(l, h, 256)), unit);
}
static KVQ__INLINE void kvq__scores16_neon(int32x4x4_t h, int32x4x4_t l, const int bits, float unit, float bias,
                                           float *o) {
    float32x4x4_t f;
    h = kvq__unmask_neon(h, bits, 0);
    l = kvq__unmask_neon(l, bits, 0);
    f.val[0] = kvq__score4_neon(h.val[0], l.val[0], unit, bias);
    f.val[1] = kvq__score4_neon(h.val[1], l.val[1], unit, bias);
    f.val[2] = kvq__score4_neon(h.val[2], l.val[2], unit, bias);
    f.val[3] = kvq__score4_neon(h.val[3], l.val[3], unit, bias);
    kvq__store16_neon(o, f, bits);
}
static KVQ__INLINE void kvq__scores_int_pass_neon(const uint8_t *codes, int D, int G, const int bits, const int8_t *qb,
                                                  const float *unit, const float *bias, const int nj, float *s0) {
    const size_t rb = (size_t)G * bits / 8;
    const int32x4_t z = vdupq_n_s32(0);
    int t0, c;
    for (t0 = 0; t0 < G; t0 += 16) {
        const uint8_t *p = codes + kvq__run_at(t0, bits), *hp = kvq__hi_ptr(codes, G, t0, bits);
        int32x4x4_t h0 = {{z, z, z, z}}, l0 = h0, h1 = h0, l1 = h0;
        for (c = 0; c < D; c += 8) {
            const int8x16_t q0 = vld1q_s8(qb + 2 * c), q1 = nj > 1 ? vld1q_s8(qb + 2 * D + 2 * c) : q0;
            const size_t at = (size_t)c * rb;
            const uint8x16x4_t x = kvq__lanes16_neon(p + at, hp + at, rb, bits, 0);
            const uint8x16x4_t y = kvq__lanes16_neon(p + at + 4 * rb, hp + at + 4 * rb, rb, bits, 0);
            KVQ__SDOT8(h0, l0, q0)
            if (nj > 1) {
                KVQ__SDOT8(h1, l1, q1)
            }
        }
        kvq__scores16_neon(h0, l0, bits, unit[0], bias[0], s0 + t0);
        if (nj > 1) kvq__scores16_neon(h1, l1, bits, unit[1], bias[1], s0 + KVQ__TILE + t0);
    }
}
#undef KVQ__SDOT8
#undef KVQ__SDOT4
static void kvq__scores_int_neon(const uint8_t *blk, int D, int G, int bits, const float *q, int nh, float *scores) {
    const uint16_t *sc = (const uint16_t *)(const void *)blk, *mn = sc + D;
    const uint8_t *codes = kvq__block_codes(blk, D);
    int8_t qb[KVQ__HEAD_CHUNK * 2 * 512];
    float unit[KVQ__HEAD_CHUNK], bias[KVQ__HEAD_CHUNK];
    int j, j0;
    KVQ_ASSERT(kvq__int_keys(bits, G) && nh <= KVQ__HEAD_CHUNK && D <= 512);
    for (j = 0; j < nh; j++)
        unit[j] = kvq__query_int_neon(q + (size_t)j * D, sc, mn, D, qb + (size_t)j * 2 * D, &bias[j]);
    for (j0 = 0; j0 < nh; j0 += 2) {
        const int8_t *qj = qb + (size_t)j0 * 2 * D;
        float *s0 = scores + (size_t)j0 * KVQ__TILE;
        switch (bits * 8 + (nh - j0 < 2 ? 1 : 2)) { /* constant bits and head count in the hot loop */
        case 17: kvq__scores_int_pass_neon(codes, D, G, 2, qj, unit + j0, bias + j0, 1, s0); break;
        case 18: kvq__scores_int_pass_neon(codes, D, G, 2, qj, unit + j0, bias + j0, 2, s0); break;
        case 25: kvq__scores_int_pass_neon(codes, D, G, 3, qj, unit + j0, bias + j0, 1, s0); break;
        case 26: kvq__scores_int_pass_neon(codes, D, G, 3, qj, unit + j0, bias + j0, 2, s0); break;
        case 33: kvq__scores_int_pass_neon(codes, D, G, 4, qj, unit + j0, bias + j0, 1, s0); break;
        default: kvq__scores_int_pass_neon(codes, D, G, 4, qj, unit + j0, bias + j0, 2, s0); break;
        }
    }
}

/* 4 rows of 4 floats, rs apart, transposed: lane k of vector i = row k's float i. */
static KVQ__INLINE float32x4x4_t kvq__tr4x4_neon(const float *p, size_t rs) {
    const float32x4_t r0 = vld1q_f32(p), r1 = vld1q_f32(p + rs), r2 = vld1q_f32(p + 2 * rs), r3 = vld1q_f32(p + 3 * rs);
    const float64x2_t a = vreinterpretq_f64_f32(vtrn1q_f32(r0, r1)), b = vreinterpretq_f64_f32(vtrn2q_f32(r0, r1));
    const float64x2_t c = vreinterpretq_f64_f32(vtrn1q_f32(r2, r3)), d = vreinterpretq_f64_f32(vtrn2q_f32(r2, r3));
    float32x4x4_t v;
    v.val[0] = vreinterpretq_f32_f64(vtrn1q_f64(a, c));
    v.val[1] = vreinterpretq_f32_f64(vtrn1q_f64(b, d));
    v.val[2] = vreinterpretq_f32_f64(vtrn2q_f64(a, c));
    v.val[3] = vreinterpretq_f32_f64(vtrn2q_f64(b, d));
    return v;
}
/* The params of n tokens by group, sv[g n16 + t] = s and mv[g n16 + t] = m + s top / 2, zero from n
   to n16 (those tokens weigh 0), from their [t][scale[ng], min[ng]] rows once for all heads: 4
   tokens x 4 groups a transpose (ng % 4 == 0), the rest one by one. m + s top / 2 unfused, as the
   reference's (the bias sums its terms in another order). */
static void kvq__params_by_group_neon(const float *par, int n, int n16, int ng, int top, float *sv, float *mv) {
    const size_t rs = 2 * (size_t)ng;
    const float half = 0.5f * (float)top;
    int g, t = 0, i;
    if (ng % 4 == 0)
        for (; t + 4 <= n; t += 4)
            for (g = 0; g < ng; g += 4) {
                const float32x4x4_t s = kvq__tr4x4_neon(par + (size_t)t * rs + g, rs);
                const float32x4x4_t m = kvq__tr4x4_neon(par + (size_t)t * rs + ng + g, rs);
                float *so = sv + (size_t)g * n16 + t, *mo = mv + (size_t)g * n16 + t;
                vst1q_f32(so, s.val[0]);
                vst1q_f32(so + n16, s.val[1]);
                vst1q_f32(so + 2 * n16, s.val[2]);
                vst1q_f32(so + 3 * n16, s.val[3]);
                vst1q_f32(mo, vaddq_f32(m.val[0], vmulq_n_f32(s.val[0], half)));
                vst1q_f32(mo + n16, vaddq_f32(m.val[1], vmulq_n_f32(s.val[1], half)));
                vst1q_f32(mo + 2 * n16, vaddq_f32(m.val[2], vmulq_n_f32(s.val[2], half)));
                vst1q_f32(mo + 3 * n16, vaddq_f32(m.val[3], vmulq_n_f32(s.val[3], half)));
            }
    for (g = 0; g < ng; g++)
        for (i = t; i < n16; i++) {
            sv[(size_t)g * n16 + i] = i < n ? par[(size_t)i * rs + g] : 0.0f;
            mv[(size_t)g * n16 + i] = i < n ? par[(size_t)i * rs + ng + g] + sv[(size_t)g * n16 + i] * half : 0.0f;
        }
}
/* rint(w inv) of 4 weights, as int16 (values 0-255). */
static KVQ__INLINE int16x4_t kvq__w8x4_neon(const float *w, float32x4_t inv) {
    return vmovn_s32(vcvtnq_s32_f32(vmulq_f32(vld1q_f32(w), inv)));
}
/* One head's weights pj[n16] (zero past n) as the bytes of kvq__value_weights, group by group:
   w8[g n16 + t], their sum wsum[g], unit[g] = wmax / 510, bias[g] = sum_t p_t mv_t. */
#define KVQ__WEIGHTS4(i) /* w = p s of tokens i..i+3, their max and bias */                                   \
    {                                                                                                             \
        const float32x4_t p = vld1q_f32(pj + (i)), wv = vmulq_f32(p, vld1q_f32(sv + (i)));                        \
        mx = vmaxq_f32(mx, wv);                                                                                   \
        b = vfmaq_f32(b, p, vld1q_f32(mv + (i)));                                                                 \
        vst1q_f32(w + (i), wv);                                                                                   \
    }
static void kvq__value_weights_neon(const float *sv, const float *mv, int n16, int ng, const float *pj, uint8_t *w8,
                                    int32_t *wsum, float *unit, float *bias) {
    float w[KVQ__TILE];
    int g, t;
    for (g = 0; g < ng; g++, sv += n16, mv += n16, w8 += n16) {
        float32x4_t mx = vdupq_n_f32(KVQ__W_MIN), b = vdupq_n_f32(0.0f), inv;
        uint32_t sum = 0;
        for (t = 0; t < n16; t += 16) { /* w = p s first, as the reference */
            KVQ__WEIGHTS4(t)
            KVQ__WEIGHTS4(t + 4)
            KVQ__WEIGHTS4(t + 8)
            KVQ__WEIGHTS4(t + 12)
        }
        unit[g] = vmaxvq_f32(mx);
        inv = vdupq_n_f32(255.0f / unit[g]);
        unit[g] /= 510.0f;
        bias[g] = vaddvq_f32(b);
        for (t = 0; t < n16; t += 16) { /* rint(w 255 / wmax), its low byte as (uint8_t)(int) */
            const int16x8_t h0 = vcombine_s16(kvq__w8x4_neon(w + t, inv), kvq__w8x4_neon(w + t + 4, inv));
            const int16x8_t h1 = vcombine_s16(kvq__w8x4_neon(w + t + 8, inv), kvq__w8x4_neon(w + t + 12, inv));
            const uint8x16_t w16 =
                vcombine_u8(vmovn_u16(vreinterpretq_u16_s16(h0)), vmovn_u16(vreinterpretq_u16_s16(h1)));
            vst1q_u8(w8 + t, w16);
            sum += vaddlvq_u8(w16);
        }
        wsum[g] = (int32_t)sum;
    }
}
#undef KVQ__WEIGHTS4

/* acc[c] += unit (2 sum_c - top W) + bias for the 16 channels of a[] (kvq__lanes16_neon's order). */
static KVQ__INLINE float32x4_t kvq__flush4_neon(float32x4_t o, int32x4_t d, int32_t topw, float unit, float bias) {
    const float32x4_t e = vcvtq_f32_s32(vsubq_s32(vaddq_s32(d, d), vdupq_n_s32(topw)));
    return vaddq_f32(o, vfmaq_n_f32(vdupq_n_f32(bias), e, unit));
}
static KVQ__INLINE void kvq__flush16_neon(uint32x4x4_t a, const int bits, int32_t topw, float unit, float bias,
                                          float *o) {
    int32x4x4_t d;
    float32x4x4_t f = kvq__load16_neon(o, bits);
    d.val[0] = vreinterpretq_s32_u32(a.val[0]);
    d.val[1] = vreinterpretq_s32_u32(a.val[1]);
    d.val[2] = vreinterpretq_s32_u32(a.val[2]);
    d.val[3] = vreinterpretq_s32_u32(a.val[3]);
    d = kvq__unmask_neon(d, bits, 1);
    f.val[0] = kvq__flush4_neon(f.val[0], d.val[0], topw, unit, bias);
    f.val[1] = kvq__flush4_neon(f.val[1], d.val[1], topw, unit, bias);
    f.val[2] = kvq__flush4_neon(f.val[2], d.val[2], topw, unit, bias);
    f.val[3] = kvq__flush4_neon(f.val[3], d.val[3], topw, unit, bias);
    kvq__store16_neon(o, f, bits);
}
/* Values, 16 channels (of one group: G % 16 == 0) at a time for nj <= 4 heads: per 4 tokens a
   vector s of lanes = channels (kvq__lanes16_neon over the 4 token rows), dotted with the tokens'
   weight bytes, lane i of the head's weight vector of 16 tokens. The last 16 tokens past n read
   the zero-padded copy tail (rows rowb bytes apart; their weights are 0). */
#define KVQ__UDOT4(A, w, i) /* A.val[s] += x.val[s] . w's word i */                                                   \
    (A).val[0] = vdotq_laneq_u32((A).val[0], x.val[0], w, i);                                                         \
    (A).val[1] = vdotq_laneq_u32((A).val[1], x.val[1], w, i);                                                         \
    (A).val[2] = vdotq_laneq_u32((A).val[2], x.val[2], w, i);                                                         \
    (A).val[3] = vdotq_laneq_u32((A).val[3], x.val[3], w, i);
#define KVQ__VSTEP(i) /* tokens t + 4 i .. t + 4 i + 3 */                                                             \
    x = kvq__lanes16_neon(r + 4 * (i) * rs + lo, r + 4 * (i) * rs + hi, rs, bits, 1);                                 \
    KVQ__UDOT4(a0, w0, i)                                                                                             \
    if (nj > 1) {                                                                                                     \
        KVQ__UDOT4(a1, w1, i)                                                                                         \
    }                                                                                                                 \
    if (nj > 2) {                                                                                                     \
        KVQ__UDOT4(a2, w2, i)                                                                                         \
    }                                                                                                                 \
    if (nj > 3) {                                                                                                     \
        KVQ__UDOT4(a3, w3, i)                                                                                         \
    }
static KVQ__INLINE void kvq__acc_int_pass_neon(const uint8_t *codes, size_t stride, const uint8_t *tail, int n, int D,
                                               int G, const int bits, const uint8_t *w8, const int32_t *wsum,
                                               const float *unit, const float *bias, const int nj, float *const *acc) {
    const int ng = D / G, n16 = (n + 15) / 16 * 16, top = (1 << bits) - 1;
    const size_t rowb = (size_t)D * bits / 8, hw = (size_t)ng * (size_t)n16; /* a head's weights */
    const uint32x4_t z = vdupq_n_u32(0);
    int c0, t;
    for (c0 = 0; c0 < D; c0 += 16) {
        const int g = c0 / G;
        const size_t lo = kvq__run_at(c0, bits), hi = bits == 3 ? kvq__hi_at(D, c0) : lo;
        const uint8_t *w = w8 + (size_t)g * n16;
        uint32x4x4_t a0 = {{z, z, z, z}}, a1 = a0, a2 = a0, a3 = a0;
        for (t = 0; t < n16; t += 16) {
            const uint8_t *r = t + 16 <= n ? codes + stride * (size_t)t : tail;
            const size_t rs = t + 16 <= n ? stride : rowb;
            const uint8x16_t w0 = vld1q_u8(w + t), w1 = nj > 1 ? vld1q_u8(w + hw + t) : w0;
            const uint8x16_t w2 = nj > 2 ? vld1q_u8(w + 2 * hw + t) : w0, w3 = nj > 3 ? vld1q_u8(w + 3 * hw + t) : w0;
            uint8x16x4_t x;
            KVQ__VSTEP(0)
            KVQ__VSTEP(1)
            KVQ__VSTEP(2)
            KVQ__VSTEP(3)
        }
        kvq__flush16_neon(a0, bits, top * wsum[g], unit[g], bias[g], acc[0] + c0);
        if (nj > 1) kvq__flush16_neon(a1, bits, top * wsum[ng + g], unit[ng + g], bias[ng + g], acc[1] + c0);
        if (nj > 2) kvq__flush16_neon(a2, bits, top * wsum[2 * ng + g], unit[2 * ng + g], bias[2 * ng + g],
                                      acc[2] + c0);
        if (nj > 3) kvq__flush16_neon(a3, bits, top * wsum[3 * ng + g], unit[3 * ng + g], bias[3 * ng + g],
                                      acc[3] + c0);
    }
}
#undef KVQ__VSTEP
#undef KVQ__UDOT4
static void kvq__acc_int_neon(const uint8_t *codes, size_t stride, const float *par, int n, int D, int G, int bits,
                              const float *p, int nh, float *const *acc) {
    const int ng = D / G, n16 = (n + 15) / 16 * 16, top = (1 << bits) - 1;
    const size_t rowb = (size_t)D * bits / 8, hw = (size_t)ng * (size_t)n16;
    float sv[KVQ__WMAX + 15 * 32], mv[KVQ__WMAX + 15 * 32], pz[KVQ__TILE]; /* n ng <= KVQ__WMAX, ng <= 32 */
    float unit[4 * 32], bias[4 * 32];
    int32_t wsum[4 * 32];
    uint8_t w8[4 * (KVQ__WMAX + 15 * 32)], tail[16 * 256];
    int j0, j, t;
    KVQ_ASSERT(kvq__int_values(bits, D, G) && n >= 1 && n <= KVQ__TILE && n * ng <= KVQ__WMAX);
    if (n % 16) { /* the last rows and zeros, to 16 */
        memset(tail, 0, 16 * rowb);
        for (t = n / 16 * 16; t < n; t++) memcpy(tail + (size_t)(t % 16) * rowb, codes + stride * (size_t)t, rowb);
    }
    kvq__params_by_group_neon(par, n, n16, ng, top, sv, mv);
    memset(pz, 0, sizeof pz);
    for (j0 = 0; j0 < nh; j0 += 4) {
        const int nj = nh - j0 < 4 ? nh - j0 : 4;
        for (j = 0; j < nj; j++) {
            memcpy(pz, p + (size_t)(j0 + j) * KVQ__TILE, (size_t)n * sizeof(float));
            kvq__value_weights_neon(sv, mv, n16, ng, pz, w8 + j * hw, wsum + j * ng, unit + j * ng, bias + j * ng);
        }
        switch (bits * 8 + (nj == 4)) { /* constant bits (and 4 heads) in the hot loop */
        case 16: kvq__acc_int_pass_neon(codes, stride, tail, n, D, G, 2, w8, wsum, unit, bias, nj, acc + j0); break;
        case 17: kvq__acc_int_pass_neon(codes, stride, tail, n, D, G, 2, w8, wsum, unit, bias, 4, acc + j0); break;
        case 24: kvq__acc_int_pass_neon(codes, stride, tail, n, D, G, 3, w8, wsum, unit, bias, nj, acc + j0); break;
        case 25: kvq__acc_int_pass_neon(codes, stride, tail, n, D, G, 3, w8, wsum, unit, bias, 4, acc + j0); break;
        case 32: kvq__acc_int_pass_neon(codes, stride, tail, n, D, G, 4, w8, wsum, unit, bias, nj, acc + j0); break;
        default: kvq__acc_int_pass_neon(codes, stride, tail, n, D, G, 4, w8, wsum, unit, bias, 4, acc + j0); break;
        }
    }
}
#endif /* KVQ__HAVE_NEON_INT */
#endif /* KVQ__HAVE_NEON */

/* ---------------------------------------------------------------------------
   Dispatch. The active kernel set is one static enum, the library's only
   mutable state: chosen at compile time (the best ISA the compiler targets),
   or, in a baseline x86 build (gcc/clang without AVX2 flags, the default) or with
   KVQ_RUNTIME_DISPATCH, on first use from cpuid + xgetbv (the OS must
   save the wide registers). kvq_set_isa() switches it, for tests and
   benchmarks; it is not thread-safe: call it when no other kvq call runs.
   With KVQ_RUNTIME_DISPATCH the first kvq call detects the CPU and stores
   the result with a relaxed atomic (threads racing there all store the same
   value, and no data race is left for ThreadSanitizer to see).
   What bounds attention (Zen 4, one thread, D 128, GQA 32/8, AVX-512, per token per KV head and
   4 query heads): the float kernels issue 32 FMAs for 2-bit keys and 36 for values, at one
   512-bit FMA a cycle; the integer kernels (kvq_set_arith) 16 vpdpbusd for keys (a 16-bit query
   is two byte products) and 8 for values, at one a cycle, plus the per-block query bytes and the
   per-run weight bytes. The measured figures are in README.md's Speed section and `make bench`.
   --------------------------------------------------------------------------- */

#if KVQ__RUNTIME
#include <cpuid.h>
static int kvq__isa_state = -1; /* -1: not detected yet */
#define KVQ__ISA_LOAD() __atomic_load_n(&kvq__isa_state, __ATOMIC_RELAXED)
#define KVQ__ISA_STORE(v) __atomic_store_n(&kvq__isa_state, (v), __ATOMIC_RELAXED)
static int kvq__cpu_has(kvq_isa isa) {
    unsigned a, b, c, d, lo, hi;
    unsigned long long xcr0;
    if (isa == KVQ_ISA_SCALAR) return 1;
    if (!__get_cpuid(1, &a, &b, &c, &d)) return 0;
    /* OSXSAVE, AVX, FMA, F16C */
    if (!(c & (1u << 27)) || !(c & (1u << 28)) || !(c & (1u << 12)) || !(c & (1u << 29))) return 0;
    __asm__ volatile("xgetbv" : "=a"(lo), "=d"(hi) : "c"(0));
    xcr0 = ((unsigned long long)hi << 32) | lo;
    if ((xcr0 & 6u) != 6u) return 0; /* XMM and YMM state */
    if (!__get_cpuid_count(7, 0, &a, &b, &c, &d) || !(b & (1u << 5))) return 0; /* AVX2 */
    if (isa == KVQ_ISA_AVX2) return 1;
    if (isa != KVQ_ISA_AVX512 || (xcr0 & 0xe6u) != 0xe6u) return 0; /* + opmask, ZMM state */
    return (b & (1u << 16)) && (b & (1u << 17)) && (b & (1u << 30)) && (b & (1u << 31)) && /* F DQ BW VL */
           (c & (1u << 1)) && (c & (1u << 11)); /* VBMI, VNNI: the integer kernels */
}
#else
static int kvq__isa_state = KVQ__HAVE_AVX512 ? KVQ_ISA_AVX512 : KVQ__HAVE_AVX2 ? KVQ_ISA_AVX2
                          : KVQ__HAVE_NEON ? KVQ_ISA_NEON : KVQ_ISA_SCALAR;
static int kvq__cpu_has(kvq_isa isa) { (void)isa; return 1; } /* compiled in = the target has it */
#define KVQ__ISA_LOAD() kvq__isa_state
#define KVQ__ISA_STORE(v) (kvq__isa_state = (v))
#endif

/* Compiled in? (the CPU check is kvq__cpu_has) */
static int kvq__compiled(int isa) {
    return isa == KVQ_ISA_SCALAR || (isa == KVQ_ISA_AVX2 && KVQ__HAVE_AVX2) ||
           (isa == KVQ_ISA_AVX512 && KVQ__HAVE_AVX512) || (isa == KVQ_ISA_NEON && KVQ__HAVE_NEON);
}

/* The active ISA. */
static int kvq__kern(void) {
    int isa = KVQ__ISA_LOAD();
    if (isa < 0) { /* runtime dispatch, first use: the best the CPU has */
        isa = KVQ_ISA_NEON;
        while (isa > KVQ_ISA_SCALAR && !(kvq__compiled(isa) && kvq__cpu_has((kvq_isa)isa))) isa--;
        KVQ__ISA_STORE(isa);
    }
    return isa;
}

/* Calls go through a switch rather than function pointers: direct calls, and no kernel
   becomes an entry point with unknown arguments for static analysis. */
#if KVQ__HAVE_AVX512
#define KVQ__ON_AVX512(x) x
#else
#define KVQ__ON_AVX512(x)
#endif
#if KVQ__HAVE_AVX2
#define KVQ__ON_AVX2(x) x
#else
#define KVQ__ON_AVX2(x)
#endif
#if KVQ__HAVE_NEON
#define KVQ__ON_NEON(x) x
#else
#define KVQ__ON_NEON(x)
#endif
#define KVQ__DISPATCH(ret, fn, args)                                         \
    switch (kvq__kern()) {                                                   \
        KVQ__ON_AVX512(case KVQ_ISA_AVX512: ret fn##_avx512 args; break;)    \
        KVQ__ON_AVX2(case KVQ_ISA_AVX2: ret fn##_avx2 args; break;)          \
        KVQ__ON_NEON(case KVQ_ISA_NEON: ret fn##_neon args; break;)          \
    default: ret fn##_scalar args; break;                                    \
    }

/* The wrappers of the kernel list (KVQ__KERNELS, in "Formats"): one switch each. AVX-512
   reuses some AVX2 kernels and NEON some scalar ones (aliases), so two cases may call one. */
#if KVQ__HAVE_SIMD
#define KVQ__DEFINE_DISPATCH(wrapper, base, rtype, ret, params, args) \
    static rtype wrapper params { KVQ__DISPATCH(ret, base, args) }
#else
#define KVQ__DEFINE_DISPATCH(wrapper, base, rtype, ret, params, args) \
    static rtype wrapper params { ret base##_scalar args; }
#endif
KVQ__KERNELS(KVQ__DEFINE_DISPATCH) /* NOLINT(bugprone-branch-clone) */

KVQ_API kvq_status kvq_set_isa(kvq_isa isa) {
    if ((int)isa < KVQ_ISA_SCALAR || (int)isa > KVQ_ISA_NEON) return KVQ_ERR_INVALID;
    if (!kvq__compiled(isa) || !kvq__cpu_has(isa)) return KVQ_ERR_UNSUPPORTED;
    KVQ__ISA_STORE((int)isa);
    return KVQ_OK;
}

KVQ_API kvq_isa kvq_get_isa(void) { return (kvq_isa)kvq__kern(); }

/* kvq_set_arith's choice; read by every attention call, written only by kvq_set_arith. */
static int kvq__arith_state = KVQ_ARITH_AUTO;
static int kvq__native_int(int isa) {
    return isa == KVQ_ISA_AVX512 || isa == KVQ_ISA_AVX2 || (isa == KVQ_ISA_NEON && KVQ__HAVE_NEON_INT);
}
static int kvq__int_on(void) {
    return kvq__arith_state == KVQ_ARITH_INTEGER || (kvq__arith_state == KVQ_ARITH_AUTO && kvq__native_int(kvq__kern()));
}
KVQ_API kvq_status kvq_set_arith(kvq_arith a) {
    if ((int)a < KVQ_ARITH_AUTO || (int)a > KVQ_ARITH_INTEGER) return KVQ_ERR_INVALID;
    kvq__arith_state = (int)a;
    return KVQ_OK;
}
KVQ_API kvq_arith kvq_get_arith(void) { return (kvq_arith)kvq__arith_state; }
KVQ_API int kvq_integer_kernels(void) { return kvq__int_on(); }

KVQ_API const char *kvq_isa_name(kvq_isa isa) {
    switch (isa) {
    case KVQ_ISA_SCALAR: return "scalar";
    case KVQ_ISA_AVX2: return "avx2";
    case KVQ_ISA_AVX512: return "avx512";
    case KVQ_ISA_NEON: return "neon";
    }
    return "unknown";
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
