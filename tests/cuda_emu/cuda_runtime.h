/* CPU emulator of the CUDA subset kvq uses: this header stands in for <cuda_runtime.h>
   (compile with -Itests/cuda_emu), tests/cuda_emu/emu.cpp implements it. Kernels become
   plain C++ functions; tests/cuda_emu/launch.py rewrites `k<<<grid, block>>>(args)` into
   `kvq_emu_launch(k, ...)(args)`, which runs every CUDA thread of a block as a fiber.
   A test aid only: see README.md for what it can and cannot tell. */
#ifndef KVQ_CUDA_EMU_RUNTIME_H
#define KVQ_CUDA_EMU_RUNTIME_H

#ifndef __CUDACC__
#define __CUDACC__ 1 /* nvcc defines it for host and device code alike; kvq_cuda.h checks it */
#endif
#define KVQ_CUDA_EMU 1 /* lets code tell it runs on the emulator */

#include <math.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>

#include <tuple>
#include <type_traits>
#include <utility>

/* ---- qualifiers: everything is host code here -------------------------------------- */
#define __global__
#define __device__
#define __host__
#define __constant__
#define __forceinline__ inline
#define __restrict__ __restrict
#define __launch_bounds__(...)
#define __grid_constant__
#define __align__(n) __attribute__((aligned(n)))
/* Blocks run one at a time, so one static copy serves every block. Unlike the GPU it keeps
   the previous block's (or launch's) data, and starts zeroed, not garbage: code that reads
   shared memory before writing it is not caught. `extern __shared__ T x[];` (dynamic shared
   memory) is rewritten by launch.py into a buffer that is filled with 0xcd per block. */
#define __shared__ static

/* ---- types ------------------------------------------------------------------------------ */
struct uint3 { unsigned x, y, z; };
struct dim3 {
    unsigned x, y, z;
    constexpr dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
    constexpr dim3(uint3 v) : x(v.x), y(v.y), z(v.z) {}
    constexpr operator uint3() const { return uint3{x, y, z}; }
};
/* the vector types with the GPU's alignment (a misaligned 16-byte load faults there) */
struct __align__(8) int2 { int x, y; };
struct __align__(16) int4 { int x, y, z, w; };
struct __align__(8) uint2 { unsigned x, y; };
struct __align__(16) uint4 { unsigned x, y, z, w; };
struct __align__(8) float2 { float x, y; };
struct __align__(16) float4 { float x, y, z, w; };
inline float2 make_float2(float x, float y) { return float2{x, y}; }
inline float4 make_float4(float x, float y, float z, float w) { return float4{x, y, z, w}; }
inline uint4 make_uint4(unsigned x, unsigned y, unsigned z, unsigned w) { return uint4{x, y, z, w}; }
inline int4 make_int4(int x, int y, int z, int w) { return int4{x, y, z, w}; }

enum cudaError_t { /* the runtime's numbers */
    cudaSuccess = 0,
    cudaErrorInvalidValue = 1,
    cudaErrorMemoryAllocation = 2,
    cudaErrorInitializationError = 3,
    cudaErrorInvalidConfiguration = 9,
    cudaErrorInvalidDevicePointer = 17,
    cudaErrorInvalidMemcpyDirection = 21,
    cudaErrorNoDevice = 100,
    cudaErrorInvalidDevice = 101,
    cudaErrorInvalidResourceHandle = 400,
    cudaErrorNotReady = 600,
    cudaErrorLaunchFailure = 719,
};
typedef cudaError_t cudaError;
enum cudaMemcpyKind {
    cudaMemcpyHostToHost = 0,
    cudaMemcpyHostToDevice = 1,
    cudaMemcpyDeviceToHost = 2,
    cudaMemcpyDeviceToDevice = 3,
    cudaMemcpyDefault = 4,
};
enum cudaDeviceAttr {
    cudaDevAttrMaxThreadsPerBlock = 1,
    cudaDevAttrMaxSharedMemoryPerBlock = 8,
    cudaDevAttrWarpSize = 10,
    cudaDevAttrMultiProcessorCount = 16,
    cudaDevAttrMemoryClockRate = 36,
    cudaDevAttrGlobalMemoryBusWidth = 37,
    cudaDevAttrComputeCapabilityMajor = 75,
    cudaDevAttrComputeCapabilityMinor = 76,
};
struct cudaDeviceProp {
    char name[256];
    size_t totalGlobalMem, sharedMemPerBlock;
    int regsPerBlock, warpSize, maxThreadsPerBlock, maxThreadsDim[3], maxGridSize[3];
    int major, minor, multiProcessorCount, memoryClockRate, memoryBusWidth, l2CacheSize;
};
enum cudaMemoryType { /* the runtime's numbers */
    cudaMemoryTypeUnregistered = 0,
    cudaMemoryTypeHost = 1,
    cudaMemoryTypeDevice = 2,
    cudaMemoryTypeManaged = 3,
};
struct cudaPointerAttributes {
    cudaMemoryType type;
    int device;
    void *devicePointer, *hostPointer;
};
typedef struct CUstream_st *cudaStream_t; /* work runs synchronously, at the call */
typedef struct CUevent_st *cudaEvent_t;
#define cudaHostAllocDefault 0u
#define cudaStreamNonBlocking 1u
#define cudaEventDefault 0u
#define cudaEventDisableTiming 2u
#define cudaMemAttachGlobal 1u

/* ---- the runtime API (emu.cpp) ---------------------------------------------------------- */
cudaError_t cudaGetDeviceCount(int *n);
cudaError_t cudaGetDevice(int *dev);
cudaError_t cudaSetDevice(int dev);
cudaError_t cudaGetDeviceProperties(cudaDeviceProp *p, int dev);
cudaError_t cudaDeviceGetAttribute(int *v, cudaDeviceAttr a, int dev);
cudaError_t cudaDeviceSynchronize(void);
cudaError_t cudaDeviceReset(void);
cudaError_t cudaGetLastError(void);
cudaError_t cudaPeekAtLastError(void);
const char *cudaGetErrorString(cudaError_t e);
const char *cudaGetErrorName(cudaError_t e);

/* Device memory is host memory (256-byte aligned, filled with 0xcd so reads of memory
   nothing wrote show up as wrong results). Copies check that the device side lies inside
   one live cudaMalloc/cudaHostAlloc block; the host side cannot be checked, so a host
   pointer passed where a device one belongs in a kernel argument just works here. */
cudaError_t cudaMalloc(void **p, size_t n);
cudaError_t cudaMallocManaged(void **p, size_t n, unsigned flags = cudaMemAttachGlobal);
cudaError_t cudaFree(void *p); /* device or managed memory */
cudaError_t cudaHostAlloc(void **p, size_t n, unsigned flags);
cudaError_t cudaMallocHost(void **p, size_t n);
cudaError_t cudaFreeHost(void *p);
cudaError_t cudaMemcpy(void *dst, const void *src, size_t n, cudaMemcpyKind kind);
cudaError_t cudaMemcpyAsync(void *dst, const void *src, size_t n, cudaMemcpyKind kind, cudaStream_t s = 0);
cudaError_t cudaMemset(void *dst, int value, size_t n);
cudaError_t cudaMemsetAsync(void *dst, int value, size_t n, cudaStream_t s = 0);
template <class T> cudaError_t cudaMalloc(T **p, size_t n) { return cudaMalloc((void **)p, n); }
template <class T> cudaError_t cudaMallocManaged(T **p, size_t n, unsigned flags = cudaMemAttachGlobal) {
    return cudaMallocManaged((void **)p, n, flags);
}
/* What the emulator knows of p, as CUDA 11 and later tell it: device (cudaMalloc), managed
   (cudaMallocManaged) or host (cudaHostAlloc/cudaMallocHost) memory, device 0, when p lies
   inside such a live block; any other pointer is cudaMemoryTypeUnregistered (success). */
cudaError_t cudaPointerGetAttributes(cudaPointerAttributes *attr, const void *p);
template <class T> cudaError_t cudaHostAlloc(T **p, size_t n, unsigned flags) { return cudaHostAlloc((void **)p, n, flags); }
template <class T> cudaError_t cudaMallocHost(T **p, size_t n) { return cudaMallocHost((void **)p, n); }

cudaError_t cudaStreamCreate(cudaStream_t *s);
cudaError_t cudaStreamCreateWithFlags(cudaStream_t *s, unsigned flags);
cudaError_t cudaStreamDestroy(cudaStream_t s);
cudaError_t cudaStreamSynchronize(cudaStream_t s);
cudaError_t cudaEventCreate(cudaEvent_t *e);
cudaError_t cudaEventCreateWithFlags(cudaEvent_t *e, unsigned flags);
cudaError_t cudaEventDestroy(cudaEvent_t e);
cudaError_t cudaEventRecord(cudaEvent_t e, cudaStream_t s = 0);
cudaError_t cudaStreamWaitEvent(cudaStream_t s, cudaEvent_t e, unsigned flags = 0); /* all done already */
cudaError_t cudaEventSynchronize(cudaEvent_t e);
cudaError_t cudaEventElapsedTime(float *ms, cudaEvent_t start, cudaEvent_t end);

/* ---- what tests may ask the emulator (not CUDA): counts of runtime calls since the start,
   so a test can tell that a call allocated, freed or synchronized nothing -------------------- */
namespace kvq_emu {
struct api_counts {
    unsigned long long allocs; /* cudaMalloc, cudaMallocManaged, cudaHostAlloc, cudaMallocHost */
    unsigned long long frees;  /* cudaFree, cudaFreeHost */
    unsigned long long syncs;  /* cudaDeviceSynchronize, cudaStreamSynchronize, cudaEventSynchronize,
                                  and the synchronous cudaMemcpy and cudaMemset */
};
api_counts counts(void);
} // namespace kvq_emu

/* ---- what kernels see -------------------------------------------------------------------- */
namespace kvq_emu {
extern uint3 thread_idx, block_idx; /* set by the scheduler for the thread it runs */
extern dim3 block_dim, grid_dim;
enum warp_kind { W_SYNC, W_BALLOT, W_IDX, W_UP, W_DOWN, W_XOR };
unsigned long long warp_op(warp_kind k, unsigned mask, unsigned long long v, int arg, int width);
void *dynamic_shared(void);
/* any trivially copyable value of up to 8 bytes goes through the warp's exchange buffer */
template <class T> T shfl(warp_kind k, unsigned mask, T v, int arg, int width) {
    static_assert(sizeof(T) <= 8 && std::is_trivially_copyable<T>::value, "shuffle of an unsupported type");
    unsigned long long u = 0;
    memcpy(&u, &v, sizeof v);
    u = warp_op(k, mask, u, arg, width);
    memcpy(&v, &u, sizeof v);
    return v;
}
/* read-modify-write: fibers switch only at barriers, so this is atomic */
template <class T, class F> T rmw(T *p, F f) {
    T old = *p;
    *p = f(old);
    return old;
}
} // namespace kvq_emu

inline const uint3 &threadIdx = kvq_emu::thread_idx; /* read-only, as on the GPU */
inline const uint3 &blockIdx = kvq_emu::block_idx;
inline const dim3 &blockDim = kvq_emu::block_dim;
inline const dim3 &gridDim = kvq_emu::grid_dim;
constexpr int warpSize = 32;

/* Waits until every thread of the block has arrived; a thread that exited first, or a
   barrier some threads never reach, is reported as an error with the kernel's name. */
void __syncthreads(void);
/* A warp operation waits for the lanes in mask that have not exited (lanes = linear thread
   index / 32); reading a lane that does not take part is reported (undefined on the GPU). */
template <class T> T __shfl_sync(unsigned mask, T v, int src, int width = 32) {
    return kvq_emu::shfl(kvq_emu::W_IDX, mask, v, src, width);
}
template <class T> T __shfl_up_sync(unsigned mask, T v, unsigned delta, int width = 32) {
    return kvq_emu::shfl(kvq_emu::W_UP, mask, v, (int)delta, width);
}
template <class T> T __shfl_down_sync(unsigned mask, T v, unsigned delta, int width = 32) {
    return kvq_emu::shfl(kvq_emu::W_DOWN, mask, v, (int)delta, width);
}
template <class T> T __shfl_xor_sync(unsigned mask, T v, int lane_mask, int width = 32) {
    return kvq_emu::shfl(kvq_emu::W_XOR, mask, v, lane_mask, width);
}
inline unsigned __ballot_sync(unsigned mask, int pred) {
    return (unsigned)kvq_emu::warp_op(kvq_emu::W_BALLOT, mask, pred != 0, 0, 32);
}
inline int __all_sync(unsigned mask, int pred) { return __ballot_sync(mask, pred) == __ballot_sync(mask, 1); }
inline int __any_sync(unsigned mask, int pred) { return __ballot_sync(mask, pred) != 0; }
inline void __syncwarp(unsigned mask = 0xffffffffu) { kvq_emu::warp_op(kvq_emu::W_SYNC, mask, 0, 0, 32); }
inline void __threadfence(void) { __asm__ __volatile__("" ::: "memory"); } /* one OS thread: order is program order */
inline void __threadfence_block(void) { __threadfence(); }

inline int atomicAdd(int *p, int v) { return kvq_emu::rmw(p, [=](int o) { return (int)((unsigned)o + (unsigned)v); }); }
inline unsigned atomicAdd(unsigned *p, unsigned v) { return kvq_emu::rmw(p, [=](unsigned o) { return o + v; }); }
inline unsigned long long atomicAdd(unsigned long long *p, unsigned long long v) {
    return kvq_emu::rmw(p, [=](unsigned long long o) { return o + v; });
}
inline float atomicAdd(float *p, float v) { return kvq_emu::rmw(p, [=](float o) { return o + v; }); }
inline int atomicSub(int *p, int v) { return kvq_emu::rmw(p, [=](int o) { return (int)((unsigned)o - (unsigned)v); }); }
inline unsigned atomicSub(unsigned *p, unsigned v) { return kvq_emu::rmw(p, [=](unsigned o) { return o - v; }); }
inline int atomicMax(int *p, int v) { return kvq_emu::rmw(p, [=](int o) { return o > v ? o : v; }); }
inline unsigned atomicMax(unsigned *p, unsigned v) { return kvq_emu::rmw(p, [=](unsigned o) { return o > v ? o : v; }); }
inline int atomicMin(int *p, int v) { return kvq_emu::rmw(p, [=](int o) { return o < v ? o : v; }); }
inline unsigned atomicMin(unsigned *p, unsigned v) { return kvq_emu::rmw(p, [=](unsigned o) { return o < v ? o : v; }); }
inline int atomicOr(int *p, int v) { return kvq_emu::rmw(p, [=](int o) { return o | v; }); }
inline unsigned atomicOr(unsigned *p, unsigned v) { return kvq_emu::rmw(p, [=](unsigned o) { return o | v; }); }
inline int atomicAnd(int *p, int v) { return kvq_emu::rmw(p, [=](int o) { return o & v; }); }
inline unsigned atomicAnd(unsigned *p, unsigned v) { return kvq_emu::rmw(p, [=](unsigned o) { return o & v; }); }
template <class T> T atomicExch(T *p, T v) { return kvq_emu::rmw(p, [=](T) { return v; }); }
template <class T> T atomicCAS(T *p, T cmp, T v) { return kvq_emu::rmw(p, [=](T o) { return o == cmp ? v : o; }); }
template <class T> T __ldg(const T *p) { return *p; }

/* ---- math: IEEE round-to-nearest intrinsics. Exact only without FMA contraction, so
   compile with -ffp-contract=off (nvcc would contract a*b+c in plain expressions; these
   explicit ones it keeps apart). ----------------------------------------------------------- */
inline float __fadd_rn(float a, float b) { return a + b; }
inline float __fsub_rn(float a, float b) { return a - b; }
inline float __fmul_rn(float a, float b) { return a * b; }
inline float __fdiv_rn(float a, float b) { return a / b; }
inline float __frcp_rn(float a) { return 1.0f / a; }
inline float __fsqrt_rn(float a) { return sqrtf(a); }
inline float __fmaf_rn(float a, float b, float c) { return fmaf(a, b, c); }
inline double __dadd_rn(double a, double b) { return a + b; }
inline double __dsub_rn(double a, double b) { return a - b; }
inline double __dmul_rn(double a, double b) { return a * b; }
inline double __ddiv_rn(double a, double b) { return a / b; }
inline float __double2float_rn(double x) { return (float)x; } /* the default mode: to nearest even */
/* cvt.rni.s32.f32: ties to even, saturating, NaN -> 0 */
inline int __float2int_rn(float x) {
    if (x != x) return 0;
    if (x >= 2147483648.0f) return 2147483647;
    if (x <= -2147483648.0f) return -2147483647 - 1;
    return (int)nearbyintf(x); /* the default rounding mode: to nearest even */
}
inline int __float_as_int(float x) { int i; memcpy(&i, &x, 4); return i; }
inline unsigned __float_as_uint(float x) { unsigned i; memcpy(&i, &x, 4); return i; }
inline float __int_as_float(int i) { float x; memcpy(&x, &i, 4); return x; }
inline float __uint_as_float(unsigned i) { float x; memcpy(&x, &i, 4); return x; }
inline int __popc(unsigned x) { return __builtin_popcount(x); }
inline int __clz(int x) { return x ? __builtin_clz((unsigned)x) : 32; }
inline int __ffs(int x) { return __builtin_ffs(x); }
/* CUDA declares min/max for device and host code alike */
inline int min(int a, int b) { return a < b ? a : b; }
inline int max(int a, int b) { return a > b ? a : b; }
inline unsigned min(unsigned a, unsigned b) { return a < b ? a : b; }
inline unsigned max(unsigned a, unsigned b) { return a > b ? a : b; }
inline float min(float a, float b) { return fminf(a, b); }
inline float max(float a, float b) { return fmaxf(a, b); }

/* ---- launches ---------------------------------------------------------------------------- */
namespace kvq_emu {
struct launch_site { const char *kernel, *file; int line; };
void launch(const launch_site &site, dim3 grid, dim3 block, size_t shmem, void (*body)(void *), void *ctx);

/* k<<<grid, block, shmem, stream>>>(args) becomes kvq_emu_launch(k, ...)(args): the
   arguments convert to the kernel's parameter types as in a call, are stored once (the
   GPU's parameter space), and every thread calls the kernel with copies of them. */
template <class... P> struct launcher {
    void (*kernel)(P...);
    launch_site site;
    dim3 grid, block;
    size_t shmem;
    void operator()(P... args) const {
        std::tuple<P...> params(args...);
        auto call = [&] { std::apply(kernel, params); };
        launch(site, grid, block, shmem, [](void *c) { (*static_cast<decltype(call) *>(c))(); }, &call);
    }
};
} // namespace kvq_emu

template <class... P>
kvq_emu::launcher<P...> kvq_emu_launch(void (*kernel)(P...), const char *name, const char *file, int line, dim3 grid,
                                       dim3 block, size_t shmem = 0, cudaStream_t stream = 0) {
    (void)stream; /* every stream is the same synchronous one */
    return kvq_emu::launcher<P...>{kernel, {name, file, line}, grid, block, shmem};
}

#endif /* KVQ_CUDA_EMU_RUNTIME_H */
