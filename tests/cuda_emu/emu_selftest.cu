/* Checks the CPU emulator itself (built through launch.py like test_cuda.cu): barriers and
   shared memory, warp operations, atomics, grid indexing, fp16 and rounding intrinsics,
   launch errors, and that broken barriers are reported (in child processes, which must die
   with the emulator's message). */
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <math.h>
#include <signal.h>
#include <stdio.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

#include "test_util.h"

/* ---- kernels ------------------------------------------------------------------------------ */

/* Sum of x per block: a tree in shared memory, a __syncthreads per level. A local array
   lives across the barriers, so fiber stacks must survive the switches. */
__global__ void block_sum(const int *x, int *out) {
    __shared__ int s[256];
    int keep[16], i, t = threadIdx.x;
    for (i = 0; i < 16; i++) keep[i] = t * 16 + i;
    s[t] = x[blockIdx.x * blockDim.x + t];
    __syncthreads();
    for (i = blockDim.x / 2; i > 0; i >>= 1) {
        if (t < i) s[t] += s[t + i];
        __syncthreads();
    }
    for (i = 0; i < 16; i++)
        if (keep[i] != t * 16 + i) out[blockIdx.x] = -1;
    if (t == 0 && out[blockIdx.x] != -1) out[blockIdx.x] = s[0];
}

/* Per warp: xor and down reductions, a broadcast, a ballot, an up scan step; a block of
   48 threads leaves warp 1 with 16 lanes, which use mask 0xffff and width 16. */
__global__ void warp_ops(const float *x, float *out, unsigned *ballots) {
    int t = threadIdx.x, lane = t % 32, o;
    unsigned mask = t < 32 ? 0xffffffffu : 0xffffu;
    int width = t < 32 ? 32 : 16;
    float v = x[t], a = v, b = v;
    for (o = width / 2; o; o >>= 1) a += __shfl_xor_sync(mask, a, o, width);
    for (o = width / 2; o; o >>= 1) b += __shfl_down_sync(mask, b, (unsigned)o, width);
    out[t * 5 + 0] = a;                                      /* every lane: the warp's sum */
    out[t * 5 + 1] = b;                                      /* lane 0: the warp's sum */
    out[t * 5 + 2] = __shfl_sync(mask, v, 3, width);         /* lane 3's value */
    out[t * 5 + 3] = __shfl_up_sync(mask, v, 1u, width);     /* the lane below's (lane 0: its own) */
    out[t * 5 + 4] = (float)__shfl_sync(mask, lane * 2, lane ^ 1, width); /* an int through a shuffle */
    ballots[t] = __ballot_sync(mask, (lane & 3) == 0);
    __syncwarp(mask);
}

/* Lanes that return early do not hold up the rest of the warp (CUDA: exited lanes named
   in the mask are allowed), as long as nobody reads them. */
__global__ void warp_exit(int *out) {
    int lane = threadIdx.x;
    if (lane >= 16) return;
    out[lane] = __shfl_xor_sync(0xffffffffu, lane, 1);
}

__global__ void atomics(int *i, unsigned *u, float *f, int *mx, int *ex) {
    int t = (int)(blockIdx.x * blockDim.x + threadIdx.x);
    atomicAdd(i, 1);
    atomicAdd(u, 2u);
    atomicAdd(f, 0.5f); /* exact: every partial sum is a multiple of 0.5 below 2^24 */
    atomicMax(mx, (t * 37) % 1001);
    atomicExch(ex, t);
}

/* Every thread of a 3D grid of 3D blocks records its coordinates in its own slot. */
__global__ void indexing(unsigned *out) {
    unsigned bx = blockIdx.x + gridDim.x * (blockIdx.y + gridDim.y * blockIdx.z);
    unsigned tx = threadIdx.x + blockDim.x * (threadIdx.y + blockDim.y * threadIdx.z);
    unsigned *o = out + (bx * blockDim.x * blockDim.y * blockDim.z + tx) * 7;
    o[0]++; /* starts at 0: each slot written exactly once */
    o[1] = blockIdx.x, o[2] = blockIdx.y, o[3] = blockIdx.z;
    o[4] = threadIdx.x, o[5] = threadIdx.y, o[6] = threadIdx.z;
}

/* Dynamic shared memory: 0xcd in every block before it is written. */
__global__ void dyn_shared(unsigned *out) {
    extern __shared__ __align__(16) unsigned smem[];
    if (threadIdx.x == 0) out[blockIdx.x] = smem[5];
    __syncthreads();
    smem[threadIdx.x] = 7;
}

__global__ void fp16_round(const float *x, uint16_t *h, int *r, int n) {
    int i = (int)(blockIdx.x * blockDim.x + threadIdx.x);
    if (i < n) {
        h[i] = __half_as_ushort(__float2half_rn(x[i]));
        r[i] = __float2int_rn(x[i]);
    }
}

/* broken on purpose: the children below must die with a clear report */
__global__ void half_sync(void) {
    if (threadIdx.x < 16) __syncthreads();
}
__global__ void exit_then_sync(void) {
    if (threadIdx.x == 0) return; /* thread 0 runs first here: 1 finds it gone */
    __syncthreads();
}
__global__ void sync_vs_shfl(float *out) {
    if (threadIdx.x < 16) __syncthreads();
    else out[threadIdx.x] = __shfl_xor_sync(0xffffffffu, 1.0f, 1); /* needs lanes 0-15 too */
}
__global__ void read_exited_lane(float *out) {
    if (threadIdx.x == 1) return;
    out[threadIdx.x] = __shfl_xor_sync(0xffffffffu, 1.0f, 1);
}
__global__ void noop(void) {}
__global__ void wild_write(int *p) { p[threadIdx.x * 1024] = 1; }
__global__ void write_past(int *p, int n) { p[n + (int)threadIdx.x] = 1; }

/* ---- host ---------------------------------------------------------------------------------- */

template <class T> static T *dev(size_t n) {
    T *p = NULL;
    if (cudaMalloc(&p, n * sizeof(T)) != cudaSuccess) { fprintf(stderr, "cudaMalloc\n"); exit(2); }
    return p;
}

static void test_block_sum(void) {
    enum { NB = 5, NT = 256 };
    int h[NB * NT], sums[NB], *d_x = dev<int>(NB * NT), *d_out = dev<int>(NB), b, i;
    for (i = 0; i < NB * NT; i++) h[i] = (i * 7919) % 1000 - 300;
    cudaMemcpy(d_x, h, sizeof h, cudaMemcpyHostToDevice);
    cudaMemset(d_out, 0, NB * sizeof(int));
    block_sum<<<NB, NT>>>(d_x, d_out);
    CHECK(cudaGetLastError() == cudaSuccess, "block_sum launch");
    cudaMemcpy(sums, d_out, sizeof sums, cudaMemcpyDeviceToHost);
    for (b = 0; b < NB; b++) {
        int want = 0;
        for (i = 0; i < NT; i++) want += h[b * NT + i];
        CHECK(sums[b] == want, "block %d: sum %d, want %d", b, sums[b], want);
    }
    cudaFree(d_x);
    cudaFree(d_out);
}

static void test_warp_ops(void) {
    enum { NT = 48 };
    float x[NT], out[NT * 5], *d_x = dev<float>(NT), *d_out = dev<float>(NT * 5);
    unsigned bal[NT], *d_bal = dev<unsigned>(NT);
    int t;
    for (t = 0; t < NT; t++) x[t] = (float)(t * 3 % 17);
    cudaMemcpy(d_x, x, sizeof x, cudaMemcpyHostToDevice);
    warp_ops<<<1, NT>>>(d_x, d_out, d_bal);
    CHECK(cudaGetLastError() == cudaSuccess, "warp_ops launch");
    cudaMemcpy(out, d_out, sizeof out, cudaMemcpyDeviceToHost);
    cudaMemcpy(bal, d_bal, sizeof bal, cudaMemcpyDeviceToHost);
    for (t = 0; t < NT; t++) {
        int w0 = t < 32 ? 0 : 32, width = t < 32 ? 32 : 16, lane = t % 32, i;
        float sum = 0.0f;
        for (i = 0; i < width; i++) sum += x[w0 + i];
        CHECK(out[t * 5] == sum, "thread %d: xor sum %g, want %g", t, out[t * 5], sum);
        if (lane == 0) CHECK(out[t * 5 + 1] == sum, "thread %d: down sum %g, want %g", t, out[t * 5 + 1], sum);
        CHECK(out[t * 5 + 2] == x[w0 + 3], "thread %d: broadcast", t);
        CHECK(out[t * 5 + 3] == x[lane ? t - 1 : t], "thread %d: up", t);
        CHECK(out[t * 5 + 4] == (float)((lane ^ 1) * 2), "thread %d: int shuffle", t);
        CHECK(bal[t] == (t < 32 ? 0x11111111u : 0x1111u), "thread %d: ballot %08x", t, bal[t]);
    }
    {
        int o[16], *d_o = dev<int>(16), i;
        warp_exit<<<1, 32>>>(d_o);
        cudaMemcpy(o, d_o, sizeof o, cudaMemcpyDeviceToHost);
        for (i = 0; i < 16; i++) CHECK(o[i] == (i ^ 1), "warp_exit lane %d: %d", i, o[i]);
        cudaFree(d_o);
    }
    cudaFree(d_x);
    cudaFree(d_out);
    cudaFree(d_bal);
}

static void test_atomics(void) {
    int *d_i = dev<int>(1), *d_mx = dev<int>(1), *d_ex = dev<int>(1), i, mx, ex, want_mx = 0, t;
    unsigned *d_u = dev<unsigned>(1), u;
    float *d_f = dev<float>(1), f;
    cudaMemset(d_i, 0, 4);
    cudaMemset(d_u, 0, 4);
    cudaMemset(d_f, 0, 4);
    cudaMemset(d_mx, 0, 4);
    atomics<<<7, 96>>>(d_i, d_u, d_f, d_mx, d_ex);
    cudaMemcpy(&i, d_i, 4, cudaMemcpyDeviceToHost);
    cudaMemcpy(&u, d_u, 4, cudaMemcpyDeviceToHost);
    cudaMemcpy(&f, d_f, 4, cudaMemcpyDeviceToHost);
    cudaMemcpy(&mx, d_mx, 4, cudaMemcpyDeviceToHost);
    cudaMemcpy(&ex, d_ex, 4, cudaMemcpyDeviceToHost);
    for (t = 0; t < 7 * 96; t++) want_mx = (t * 37) % 1001 > want_mx ? (t * 37) % 1001 : want_mx;
    CHECK(i == 672 && u == 1344 && f == 336.0f, "atomicAdd: %d %u %g", i, u, f);
    CHECK(mx == want_mx, "atomicMax %d, want %d", mx, want_mx);
    CHECK(ex >= 0 && ex < 672, "atomicExch %d", ex);
    cudaFree(d_i);
    cudaFree(d_u);
    cudaFree(d_f);
    cudaFree(d_mx);
    cudaFree(d_ex);
}

static void test_indexing(void) {
    const dim3 grid(3, 2, 2), block(4, 3, 2);
    const unsigned n = 3 * 2 * 2 * 4 * 3 * 2;
    unsigned *h = (unsigned *)malloc(n * 7 * sizeof(unsigned)), *d = dev<unsigned>(n * 7), bad = 0, i;
    cudaMemset(d, 0, n * 7 * sizeof(unsigned));
    indexing<<<grid, block>>>(d);
    cudaMemcpy(h, d, n * 7 * sizeof(unsigned), cudaMemcpyDeviceToHost);
    for (i = 0; i < n; i++) {
        unsigned b = i / 24, t = i % 24, *o = h + i * 7;
        if (o[0] != 1 || o[1] != b % 3 || o[2] != b / 3 % 2 || o[3] != b / 6 || o[4] != t % 4 || o[5] != t / 4 % 3 ||
            o[6] != t / 12)
            bad++;
    }
    CHECK(bad == 0, "3D indexing: %u of %u slots wrong", bad, n);
    free(h);
    cudaFree(d);
}

static void test_memory_and_launches(void) {
    unsigned out[3], *d = dev<unsigned>(3), first;
    cudaMemcpy(&first, d, 4, cudaMemcpyDeviceToHost);
    CHECK(first == 0xcdcdcdcdu, "cudaMalloc fills with 0xcd: %08x", first);
    dyn_shared<<<3, 64, 64 * sizeof(unsigned)>>>(d);
    CHECK(cudaGetLastError() == cudaSuccess, "dynamic shared launch");
    cudaMemcpy(out, d, sizeof out, cudaMemcpyDeviceToHost);
    CHECK(out[0] == 0xcdcdcdcdu && out[1] == 0xcdcdcdcdu && out[2] == 0xcdcdcdcdu, "dynamic shared memory: %08x %08x %08x",
          out[0], out[1], out[2]);
    noop<<<1, 1025>>>();
    CHECK(cudaGetLastError() == cudaErrorInvalidConfiguration, "1025 threads refused");
    noop<<<dim3(1, 65536), 32>>>();
    CHECK(cudaGetLastError() == cudaErrorInvalidConfiguration, "grid.y 65536 refused");
    CHECK(cudaGetLastError() == cudaSuccess, "the error is cleared once read");
    fprintf(stderr, "(a refused cudaMemcpy is expected next)\n");
    CHECK(cudaMemcpy(d + 1, out, sizeof out, cudaMemcpyHostToDevice) == cudaErrorInvalidValue, "copy past an allocation");
    (void)cudaGetLastError();
    cudaFree(d);
}

/* fp16: every value's neighbourhood (exact, midpoints, one float ulp either side) against
   a double-precision round-to-nearest-even; __float2int_rn ties to even and saturates. */
static uint16_t ref_f2h(float f) {
    double a = fabs((double)f), best = 0.0;
    uint16_t s = signbit(f) ? 0x8000 : 0, h = 0;
    int e;
    if (f != f) return 0x7fff;
    if (a >= 65520.0) return s | 0x7c00;
    for (e = 0; e < 0x7c00; e++) { /* nearest of all finite halves, ties to the even code */
        int ex = e >> 10, m = e & 0x3ff;
        double v = ex ? ldexp(1.0 + m / 1024.0, ex - 15) : ldexp(m, -24);
        if (e == 0 || fabs(v - a) < fabs(best - a) || (fabs(v - a) == fabs(best - a) && !(e & 1))) best = v, h = (uint16_t)e;
        if (v > a) break;
    }
    return s | h;
}

static void test_fp16(void) {
    enum { N = 4096 };
    static float x[N];
    static uint16_t h[N];
    static int r[N];
    float *d_x = dev<float>(N);
    uint16_t *d_h = dev<uint16_t>(N);
    int *d_r = dev<int>(N), n = 0, i, bad = 0, e;
    const float special[] = {0.0f, -0.0f, 65504.0f, 65519.99f, 65520.0f, 1e9f, -1e9f, INFINITY, -INFINITY, NAN,
                             5.960464477539063e-08f, 2.980232238769531e-08f, 2.9802326e-08f, 6.103515625e-05f,
                             0.5f, 1.5f, 2.5f, -2.5f, -0.5f, 3e9f, -3e9f, 1.0000001f, 2047.5f, 2048.5f};
    for (i = 0; i < (int)(sizeof special / sizeof special[0]); i++) x[n++] = special[i];
    for (e = 0; e < 0x7c00 && n + 4 < N; e += 37) { /* a spread of halves: value, midpoint up, +-1 ulp */
        float v = __half2float(__ushort_as_half((uint16_t)e)), up = __half2float(__ushort_as_half((uint16_t)(e + 1)));
        float mid = (float)(((double)v + (double)up) / 2.0);
        x[n++] = v;
        x[n++] = mid;
        x[n++] = nextafterf(mid, 0.0f);
        x[n++] = -nextafterf(mid, 1e9f);
    }
    cudaMemcpy(d_x, x, n * sizeof(float), cudaMemcpyHostToDevice);
    fp16_round<<<(n + 127) / 128, 128>>>(d_x, d_h, d_r, n);
    cudaMemcpy(h, d_h, n * sizeof(uint16_t), cudaMemcpyDeviceToHost);
    cudaMemcpy(r, d_r, n * sizeof(int), cudaMemcpyDeviceToHost);
    for (i = 0; i < n; i++) {
        uint16_t want = ref_f2h(x[i]);
        if (h[i] != want || kvq_emu::f2h_soft(x[i]) != want) {
            if (bad++ < 5) fprintf(stderr, "  fp16(%.9g) = %04x, soft %04x, want %04x\n", x[i], h[i], kvq_emu::f2h_soft(x[i]), want);
        }
        if (x[i] == x[i] && kvq_emu::h2f_soft(want) != __half2float(__ushort_as_half(want))) bad++;
    }
    CHECK(bad == 0, "%d fp16 conversions differ from round-to-nearest-even", bad);
    CHECK(r[14] == 0 && r[15] == 2 && r[16] == 2 && r[17] == -2 && r[18] == 0, "__float2int_rn ties: %d %d %d %d %d",
          r[14], r[15], r[16], r[17], r[18]);
    CHECK(r[9] == 0 && r[19] == 2147483647 && r[20] == -2147483647 - 1 && r[22] == 2048 && r[23] == 2048,
          "__float2int_rn NaN / saturation / ties: %d %d %d %d %d", r[9], r[19], r[20], r[22], r[23]);
    cudaFree(d_x);
    cudaFree(d_h);
    cudaFree(d_r);
}

/* Runs fn in a child; it must die (not exit 0) with msg in its stderr. */
static void expect_report(const char *what, void (*fn)(void), const char *msg) {
    char buf[4096] = {0};
    int fds[2], status = 0;
    size_t got = 0;
    ssize_t r;
    pid_t pid;
    fflush(NULL);
    if (pipe(fds) != 0 || (pid = fork()) < 0) { CHECK(0, "%s: fork", what); return; }
    if (pid == 0) {
        dup2(fds[1], 2);
        close(fds[0]);
        signal(SIGABRT, SIG_DFL);
        fn();
        _exit(0);
    }
    close(fds[1]);
    while (got < sizeof buf - 1 && (r = read(fds[0], buf + got, sizeof buf - 1 - got)) > 0) got += (size_t)r;
    close(fds[0]);
    waitpid(pid, &status, 0);
    CHECK(!(WIFEXITED(status) && WEXITSTATUS(status) == 0) && strstr(buf, msg), "%s: want a report with \"%s\", got: %s",
          what, msg, buf);
}
static void run_half_sync(void) { half_sync<<<2, 32>>>(); }
static void run_exit_then_sync(void) { exit_then_sync<<<1, 64>>>(); }
static void run_sync_vs_shfl(void) { sync_vs_shfl<<<1, 32>>>(dev<float>(32)); }
static void run_read_exited_lane(void) { read_exited_lane<<<1, 32>>>(dev<float>(32)); }
static void run_wild_write(void) { wild_write<<<1, 64>>>((int *)16); }
static void run_write_past(void) { write_past<<<1, 32>>>(dev<int>(100), 100); }

/* cudaPointerGetAttributes knows the emulator's blocks (their first and last byte, not one
   past); managed memory copies like device memory; the counters see allocations, frees and
   synchronizations, and nothing else. */
static void test_pointers_and_counts(void) {
    kvq_emu::api_counts c0 = kvq_emu::counts(), c1, c2;
    cudaPointerAttributes at;
    int *d, *h, *m, stack = 0, back = 0;
    CHECK(cudaMalloc((void **)&d, 64) == cudaSuccess && cudaMallocHost((void **)&h, 64) == cudaSuccess &&
              cudaMallocManaged((void **)&m, 64) == cudaSuccess,
          "allocations");
    c1 = kvq_emu::counts();
    CHECK(c1.allocs == c0.allocs + 3 && c1.frees == c0.frees && c1.syncs == c0.syncs, "3 allocations counted");
    CHECK(cudaPointerGetAttributes(&at, d + 15) == cudaSuccess && at.type == cudaMemoryTypeDevice && at.device == 0,
          "device memory");
    CHECK(cudaPointerGetAttributes(&at, d + 16) == cudaSuccess && at.type != cudaMemoryTypeDevice, "one past the end");
    CHECK(cudaPointerGetAttributes(&at, h) == cudaSuccess && at.type == cudaMemoryTypeHost, "pinned host memory");
    CHECK(cudaPointerGetAttributes(&at, m + 3) == cudaSuccess && at.type == cudaMemoryTypeManaged, "managed memory");
    CHECK(cudaPointerGetAttributes(&at, &stack) == cudaSuccess && at.type == cudaMemoryTypeUnregistered,
          "unregistered host memory");
    CHECK(cudaMemcpyAsync(m, &stack, sizeof stack, cudaMemcpyHostToDevice, 0) == cudaSuccess &&
              cudaMemcpyAsync(&back, m, sizeof back, cudaMemcpyDeviceToHost, 0) == cudaSuccess && back == 0,
          "managed memory copies as device memory");
    CHECK(kvq_emu::counts().syncs == c1.syncs, "asynchronous copies are not synchronizations");
    CHECK(cudaStreamSynchronize(0) == cudaSuccess && cudaMemset(d, 0, 4) == cudaSuccess, "sync and memset");
    CHECK(cudaFree(d) == cudaSuccess && cudaFreeHost(h) == cudaSuccess && cudaFree(m) == cudaSuccess, "frees");
    c2 = kvq_emu::counts();
    CHECK(c2.allocs == c1.allocs && c2.frees == c1.frees + 3 && c2.syncs == c1.syncs + 2, "frees and syncs counted");
    CHECK(cudaPointerGetAttributes(&at, m) == cudaSuccess && at.type == cudaMemoryTypeUnregistered, "freed memory");
    CHECK(cudaGetLastError() == cudaSuccess, "no error left");
}

int main(void) {
    static const char *const orders[] = {"reverse", "random", "forward"};
    int o;
    for (o = 0; o < 3; o++) { /* the kernels must not care in which order threads run */
        setenv("KVQ_EMU_ORDER", orders[o], 1);
        test_block_sum();
        test_warp_ops();
        test_atomics();
        test_indexing();
    }
    test_memory_and_launches();
    test_pointers_and_counts();
    test_fp16();
    /* forward order (set last above): thread 0 runs first, which the messages below name */
    expect_report("half the block at __syncthreads", run_half_sync, "kernel half_sync (launched at");
    expect_report("half the block at __syncthreads", run_half_sync,
                  "thread 16 returned while threads 0-15 wait at __syncthreads");
    expect_report("a thread returned", run_exit_then_sync, "__syncthreads reached after threads 0 returned");
    expect_report("__syncthreads against a shuffle", run_sync_vs_shfl,
                  "deadlock: threads 0-15 wait at __syncthreads; warp 0 lanes 0xffff0000 wait at __shfl_xor_sync");
    expect_report("a shuffle reading an exited lane", run_read_exited_lane, "lane 0 reads lane 1, which does not take part");
#if defined(__SANITIZE_ADDRESS__)
    expect_report("a kernel writing past its buffer", run_write_past, "heap-buffer-overflow");
    expect_report("a kernel writing to a wild address", run_wild_write, "SEGV");
#else
    (void)run_write_past; /* inside the allocator's slack: only ASan sees it */
    expect_report("a kernel writing to a wild address", run_wild_write, "signal 11 in kernel wild_write");
#endif
    return tu_finish("emu_selftest");
}
