/* CPU emulator of the CUDA subset kvq uses: the runtime behind cuda_runtime.h.

   The blocks of a grid run one after another. Within a block, each CUDA thread runs as a
   cooperative fiber on its own stack, all in the calling OS thread: a thread runs until it
   waits at a barrier (__syncthreads, a warp operation) or returns. Fibers are started once
   with makecontext/setcontext and afterwards switched with _setjmp/_longjmp (about 15 ns,
   against 200 for swapcontext, which makes a system call for the signal mask). A thread that
   returns without having waited leaves its fiber free for the next thread, so kernels
   without barriers run with no switch at all. threadIdx/blockIdx are plain globals that
   the scheduler sets for the thread it runs. */
#undef _FORTIFY_SOURCE /* glibc's checked longjmp refuses jumps to another stack */
#include "cuda_runtime.h"

#include <setjmp.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/mman.h>
#include <ucontext.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <deque>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#if defined(__SANITIZE_ADDRESS__)
#include <sanitizer/common_interface_defs.h>
#define EMU_ASAN 1
#else
#define EMU_ASAN 0
#endif

namespace kvq_emu {
uint3 thread_idx, block_idx;
dim3 block_dim, grid_dim;
} // namespace kvq_emu

using namespace kvq_emu;

namespace {

/* ---- fibers ---------------------------------------------------------------------------- */

/* kvq's kernels keep float x[512] and more on the stack; ASan's redzones need room too */
constexpr size_t STACK_BYTES = (EMU_ASAN ? 256 : 64) * 1024;

struct fiber {
    jmp_buf jb;        /* where it waits, once started */
    ucontext_t boot;   /* its first entry */
    char *stack;       /* STACK_BYTES above a guard page */
    bool started;
    int tid;           /* linear index of the CUDA thread it runs, -1 when free */
    void *fake_stack;  /* ASan's bookkeeping across a switch */
};

jmp_buf sched_jb;                /* the scheduler, on the caller's stack */
fiber *cur;                      /* the fiber running, null on the scheduler */
std::vector<std::unique_ptr<fiber>> fibers; /* kept for reuse by later blocks and launches */
std::vector<fiber *> free_fibers;
void *sched_fake_stack;           /* (these three for ASan only) */
const void *sched_stack_bottom;
size_t sched_stack_size;

/* ASan must be told about every switch of stacks, or it reports false stack errors */
inline void asan_leave(void **fake, const void *to_bottom, size_t to_size) {
#if EMU_ASAN
    __sanitizer_start_switch_fiber(fake, to_bottom, to_size);
#else
    (void)fake, (void)to_bottom, (void)to_size;
#endif
}
inline void asan_arrive(void *fake, const void **from_bottom, size_t *from_size) {
#if EMU_ASAN
    __sanitizer_finish_switch_fiber(fake, from_bottom, from_size);
#else
    (void)fake, (void)from_bottom, (void)from_size;
#endif
}

/* ---- the block being run ------------------------------------------------------------- */

enum th_state : unsigned char { T_NEW, T_RUNNING, T_READY, T_AT_SYNC, T_AT_WARP, T_DONE };

struct warp_group { /* one warp operation in progress: the lanes of mask that have arrived */
    warp_kind kind;
    unsigned mask, arrived;
    int width;
};
struct warp {
    unsigned present, exited; /* lanes the block has; lanes that returned */
    unsigned long long in[32], out[32];
    int arg[32];
    std::vector<warp_group> ops; /* several when disjoint masks run separately */
};

struct block_run {
    const launch_site *site;
    void (*body)(void *);
    void *ctx;
    unsigned n, next_new, done, at_sync;
    std::vector<int> order; /* threads in the order they start and leave a __syncthreads */
    std::vector<th_state> st;
    std::vector<fiber *> fib; /* the fiber each started thread runs on */
    std::vector<warp> warps;
    std::deque<int> ready; /* released from a barrier, waiting to be resumed */
} B;

std::vector<unsigned char> dyn_shared; /* extern __shared__ of the running launch */

/* The order threads run in between barriers: a race that a missing barrier leaves shows
   up only when the reader runs before the writer, so tests run forward and reverse.
   KVQ_EMU_ORDER=forward (default), reverse, or random (KVQ_EMU_SEED, a new order per block). */
enum { FORWARD, REVERSE, RANDOM } order_mode;
uint64_t order_seed;

void init_order_mode() { /* read at every launch, so a program may change it between launches */
    static bool seeded;
    const char *o = getenv("KVQ_EMU_ORDER"), *seed = getenv("KVQ_EMU_SEED");
    order_mode = !o || !strcmp(o, "forward") ? FORWARD : !strcmp(o, "reverse") ? REVERSE : RANDOM;
    if (o && order_mode == RANDOM && strcmp(o, "random")) {
        fprintf(stderr, "kvq CUDA emulator: KVQ_EMU_ORDER=%s: want forward, reverse or random\n", o);
        exit(2);
    }
    if (!seeded) order_seed = seed ? strtoull(seed, nullptr, 0) : 1;
    seeded = true;
}

void block_order() {
    unsigned i;
    for (i = 0; i < B.n; i++) B.order[i] = order_mode == REVERSE ? (int)(B.n - 1 - i) : (int)i;
    if (order_mode == RANDOM)
        for (i = B.n - 1; i > 0; i--) { /* Fisher-Yates with splitmix64 */
            uint64_t z = (order_seed += 0x9e3779b97f4a7c15ull);
            z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
            z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
            std::swap(B.order[i], B.order[(z ^ (z >> 31)) % (i + 1)]);
        }
}

const char *kind_name(warp_kind k) {
    static const char *const names[] = {"__syncwarp", "__ballot_sync", "__shfl_sync", "__shfl_up_sync",
                                        "__shfl_down_sync", "__shfl_xor_sync"};
    return names[k];
}

/* "0-15,32": the threads of the block in state s */
std::string thread_list(th_state s) {
    std::string out;
    unsigned t = 0;
    while (t < B.n) {
        if (B.st[t] != s) { t++; continue; }
        unsigned e = t;
        while (e + 1 < B.n && B.st[e + 1] == s) e++;
        out += (out.empty() ? "" : ",") + std::to_string(t) + (e > t ? "-" + std::to_string(e) : "");
        t = e + 1;
    }
    return out;
}

[[noreturn]] void fail(const char *fmt, ...) {
    va_list ap;
    fprintf(stderr, "kvq CUDA emulator: ");
    if (B.site)
        fprintf(stderr, "kernel %s (launched at %s:%d), block (%u,%u,%u)", B.site->kernel, B.site->file, B.site->line,
                block_idx.x, block_idx.y, block_idx.z);
    if (cur && cur->tid >= 0) fprintf(stderr, ", thread (%u,%u,%u)", thread_idx.x, thread_idx.y, thread_idx.z);
    fprintf(stderr, ": ");
    va_start(ap, fmt);
    vfprintf(stderr, fmt, ap);
    va_end(ap);
    fputc('\n', stderr);
    fflush(stderr);
    abort();
}

void set_thread_idx(int tid) {
    unsigned t = (unsigned)tid;
    thread_idx.x = t % block_dim.x;
    thread_idx.y = t / block_dim.x % block_dim.y;
    thread_idx.z = t / (block_dim.x * block_dim.y);
}

/* Leaves the running fiber for the scheduler; returns when the scheduler resumes it. */
void to_scheduler(fiber *f) {
    if (!_setjmp(f->jb)) {
        asan_leave(&f->fake_stack, sched_stack_bottom, sched_stack_size);
        _longjmp(sched_jb, 1);
    }
    asan_arrive(f->fake_stack, nullptr, nullptr);
    set_thread_idx(f->tid);
}

void thread_exit(int tid);

/* A fiber's whole life: run the thread it was given; when that returns, take the next
   thread nobody started yet, or go back to the scheduler as a free fiber. */
fiber *booting;
void fiber_main() {
    fiber *f = booting;
    asan_arrive(nullptr, &sched_stack_bottom, &sched_stack_size); /* learns the caller's stack */
    for (;;) {
        set_thread_idx(f->tid);
        B.st[f->tid] = T_RUNNING;
        B.fib[f->tid] = f;
        B.body(B.ctx);
        thread_exit(f->tid);
        if (B.ready.empty() && B.next_new < B.n) { /* no switch needed */
            f->tid = B.order[B.next_new++];
            continue;
        }
        f->tid = -1;
        free_fibers.push_back(f);
        to_scheduler(f);
    }
}

fiber *new_fiber() {
    std::unique_ptr<fiber> f(new fiber());
    size_t page = (size_t)sysconf(_SC_PAGESIZE);
    char *m = (char *)mmap(nullptr, STACK_BYTES + page, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (m == MAP_FAILED) fail("out of memory for fiber stacks");
    mprotect(m, page, PROT_NONE); /* a guard page: overflowing a fiber stack faults */
    f->stack = m + page;
    f->tid = -1;
    getcontext(&f->boot);
    f->boot.uc_stack.ss_sp = f->stack;
    f->boot.uc_stack.ss_size = STACK_BYTES;
    f->boot.uc_link = nullptr;
    makecontext(&f->boot, fiber_main, 0);
    fibers.push_back(std::move(f));
    return fibers.back().get();
}

/* Runs fiber f (on the scheduler) until it waits or goes free. */
void resume(fiber *f) {
    cur = f;
    if (!_setjmp(sched_jb)) {
        asan_leave(&sched_fake_stack, f->stack, STACK_BYTES);
        if (f->started) _longjmp(f->jb, 1);
        f->started = true;
        booting = f;
        setcontext(&f->boot); /* the fiber comes back through sched_jb */
    }
    asan_arrive(sched_fake_stack, nullptr, nullptr);
    cur = nullptr;
}

void release(int tid) {
    B.st[tid] = T_READY;
    B.ready.push_back(tid);
}

/* ---- barriers ---------------------------------------------------------------------------- */

/* Completes warp group g of warp w if every lane it waits for has arrived. */
bool warp_try_complete(warp &w, size_t gi) {
    warp_group g = w.ops[gi];
    unsigned need = g.mask & w.present & ~w.exited, lanes = g.arrived;
    if ((g.arrived & need) != need) return false;
    unsigned long long ballot = 0;
    for (int l = 0; l < 32; l++)
        if ((lanes >> l & 1u) && w.in[l]) ballot |= 1ull << l;
    for (int l = 0; l < 32; l++) {
        if (!(lanes >> l & 1u)) continue;
        int seg = l & ~(g.width - 1), a = w.arg[l], src = l;
        switch (g.kind) {
        case W_SYNC: w.out[l] = 0; continue;
        case W_BALLOT: w.out[l] = ballot; continue;
        case W_IDX: src = seg + (a & (g.width - 1)); break;
        case W_UP: src = l - a >= seg ? l - a : l; break;
        case W_DOWN: src = l + a < seg + g.width ? l + a : l; break;
        case W_XOR: src = (l ^ a) < seg + g.width ? l ^ a : l; break; /* (earlier segments may be read) */
        }
        if (src < 0 || src > 31 || !(lanes >> src & 1u)) {
            cur = nullptr; /* the message is about lane l, not the thread that completed the group */
            fail("%s in warp %d: lane %d reads lane %d, which does not take part (exited, or not in mask 0x%08x); "
                 "the value is undefined on the GPU", kind_name(g.kind), (int)(&w - &B.warps[0]), l, src, g.mask);
        }
        w.out[l] = w.in[src];
    }
    w.ops.erase(w.ops.begin() + (long)gi);
    int base = (int)(&w - &B.warps[0]) * 32;
    for (int i = 0; i < 32; i++) {
        int l = order_mode == REVERSE ? 31 - i : i; /* (random: release order does not matter for a warp) */
        if ((lanes >> l & 1u) && B.st[base + l] == T_AT_WARP) release(base + l);
    }
    return true;
}

void thread_exit(int tid) {
    B.st[tid] = T_DONE;
    B.done++;
    if (B.at_sync)
        fail("thread %d returned while threads %s wait at __syncthreads (every thread of a block must reach it)", tid,
             thread_list(T_AT_SYNC).c_str());
    warp &w = B.warps[tid / 32];
    w.exited |= 1u << (tid % 32);
    for (size_t gi = 0; gi < w.ops.size();) /* a group may have waited only for this lane */
        if (!warp_try_complete(w, gi)) gi++;
}

/* Every live thread waits and nothing can release any: name who waits where. */
[[noreturn]] void deadlock() {
    std::string msg = "deadlock: ";
    if (B.at_sync) msg += "threads " + thread_list(T_AT_SYNC) + " wait at __syncthreads; ";
    for (size_t wi = 0; wi < B.warps.size(); wi++)
        for (const warp_group &g : B.warps[wi].ops) {
            char buf[160];
            snprintf(buf, sizeof buf, "warp %zu lanes 0x%08x wait at %s (mask 0x%08x); ", wi, g.arrived, kind_name(g.kind),
                     g.mask);
            msg += buf;
        }
    if (B.done) msg += "threads " + thread_list(T_DONE) + " have returned";
    cur = nullptr;
    fail("%s", msg.c_str());
}

/* ---- device memory ------------------------------------------------------------------- */

std::mutex mem_mu, launch_mu;
std::map<uintptr_t, size_t> device_blocks, host_blocks, managed_blocks; /* start -> bytes */
std::atomic<unsigned long long> n_allocs, n_frees, n_syncs; /* kvq_emu::counts() */
cudaError_t last_error = cudaSuccess;

cudaError_t set_error(cudaError_t e) {
    if (e != cudaSuccess) last_error = e;
    return e;
}

void *alloc(std::map<uintptr_t, size_t> &blocks, size_t n) {
    void *p = nullptr;
    n_allocs++;
    if (posix_memalign(&p, 256, n ? n : 1)) return nullptr; /* cudaMalloc aligns to 256 */
    memset(p, 0xcd, n ? n : 1);
    std::lock_guard<std::mutex> lk(mem_mu);
    blocks[(uintptr_t)p] = n;
    return p;
}

cudaError_t release_block(std::map<uintptr_t, size_t> &blocks, void *p) {
    n_frees++;
    if (!p) return cudaSuccess;
    {
        std::lock_guard<std::mutex> lk(mem_mu);
        if (!blocks.erase((uintptr_t)p)) return set_error(cudaErrorInvalidValue);
    }
    free(p);
    return cudaSuccess;
}

/* 1 when [p, p + n) lies inside one live block of blocks (mem_mu held) */
bool inside(const std::map<uintptr_t, size_t> &blocks, const void *p, size_t n) {
    auto it = blocks.upper_bound((uintptr_t)p);
    if (it == blocks.begin()) return false;
    --it;
    return (uintptr_t)p - it->first <= it->second && n <= it->second - ((uintptr_t)p - it->first);
}

/* 1 when [p, p + n) lies inside one live block of device, managed or pinned host memory */
bool device_range(const void *p, size_t n) {
    std::lock_guard<std::mutex> lk(mem_mu);
    return inside(device_blocks, p, n) || inside(managed_blocks, p, n) || inside(host_blocks, p, n);
}

cudaError_t copy(void *dst, const void *src, size_t n, cudaMemcpyKind kind) {
    if (!n) return cudaSuccess;
    if ((int)kind < 0 || kind > cudaMemcpyDefault) return set_error(cudaErrorInvalidMemcpyDirection);
    bool dst_dev = kind == cudaMemcpyHostToDevice || kind == cudaMemcpyDeviceToDevice;
    bool src_dev = kind == cudaMemcpyDeviceToHost || kind == cudaMemcpyDeviceToDevice;
    if ((dst_dev && !device_range(dst, n)) || (src_dev && !device_range(src, n))) {
        fprintf(stderr, "kvq CUDA emulator: cudaMemcpy of %zu bytes %s %p to %p: the device side is not inside one "
                        "allocation\n", n, kind == cudaMemcpyHostToDevice ? "host" : "device", src, dst);
        return set_error(cudaErrorInvalidValue);
    }
    memmove(dst, src, n);
    return cudaSuccess;
}

/* ---- a crash inside a kernel names the kernel and thread ------------------------------------ */
#if !EMU_ASAN /* ASan has its own, better report */
void on_fault(int sig) {
    char buf[512];
    int n = snprintf(buf, sizeof buf, "kvq CUDA emulator: signal %d", sig);
    if (cur && B.site)
        n += snprintf(buf + n, sizeof buf - (size_t)n, " in kernel %s (launched at %s:%d), block (%u,%u,%u), thread (%u,%u,%u)",
                      B.site->kernel, B.site->file, B.site->line, block_idx.x, block_idx.y, block_idx.z, thread_idx.x,
                      thread_idx.y, thread_idx.z);
    n += snprintf(buf + n, sizeof buf - (size_t)n, " (an out-of-bounds access, or a fiber stack overflow)\n");
    if (write(2, buf, (size_t)n) < 0) {}
    signal(sig, SIG_DFL);
    raise(sig);
}
void install_fault_handler() {
    static bool done;
    static char alt[64 * 1024]; /* the faulting stack may be the one that overflowed */
    if (done) return;
    done = true;
    stack_t ss = {};
    ss.ss_sp = alt;
    ss.ss_size = sizeof alt;
    sigaltstack(&ss, nullptr);
    struct sigaction sa = {};
    sa.sa_handler = on_fault;
    sa.sa_flags = SA_ONSTACK | SA_RESETHAND;
    sigaction(SIGSEGV, &sa, nullptr);
    sigaction(SIGBUS, &sa, nullptr);
}
#else
void on_sanitizer_death() { /* ASan and UBSan report the access; this says which CUDA thread */
    if (cur && B.site)
        fprintf(stderr, "kvq CUDA emulator: the report above is from kernel %s (launched at %s:%d), block (%u,%u,%u), "
                        "thread (%u,%u,%u)\n", B.site->kernel, B.site->file, B.site->line, block_idx.x, block_idx.y,
                block_idx.z, thread_idx.x, thread_idx.y, thread_idx.z);
}
void install_fault_handler() { __sanitizer_set_death_callback(on_sanitizer_death); }
#endif

} // namespace

/* ---- kernels' side ------------------------------------------------------------------------ */

void __syncthreads(void) {
    fiber *f = cur;
    if (!f) fail("__syncthreads outside a kernel");
    if (B.done)
        fail("__syncthreads reached after threads %s returned (every thread of a block must reach it)",
             thread_list(T_DONE).c_str());
    if (++B.at_sync == B.n) { /* the last to arrive releases the others and goes on */
        B.at_sync = 0;
        for (int t : B.order)
            if (B.st[t] == T_AT_SYNC) release(t);
        return;
    }
    B.st[f->tid] = T_AT_SYNC;
    to_scheduler(f);
}

unsigned long long kvq_emu::warp_op(warp_kind k, unsigned mask, unsigned long long v, int arg, int width) {
    fiber *f = cur;
    if (!f) fail("%s outside a kernel", kind_name(k));
    int tid = f->tid, lane = tid % 32;
    warp &w = B.warps[(size_t)tid / 32];
    if (!(mask >> lane & 1u)) fail("%s with mask 0x%08x, which leaves out the calling lane %d", kind_name(k), mask, lane);
    if (width < 1 || width > 32 || (width & (width - 1))) fail("%s with width %d (a power of 2 up to 32)", kind_name(k), width);
    size_t gi = 0;
    for (; gi < w.ops.size(); gi++) {
        const warp_group &g = w.ops[gi];
        if (g.mask == mask) break;
        if (g.mask & mask)
            fail("%s with mask 0x%08x while lanes 0x%08x of the warp wait at %s with mask 0x%08x", kind_name(k), mask,
                 g.arrived, kind_name(g.kind), g.mask);
    }
    if (gi == w.ops.size()) w.ops.push_back(warp_group{k, mask, 0u, width});
    warp_group &g = w.ops[gi];
    if (g.kind != k || g.width != width)
        fail("%s (width %d) while lanes 0x%08x of the warp wait at %s (width %d)", kind_name(k), width, g.arrived,
             kind_name(g.kind), g.width);
    if (g.arrived >> lane & 1u) fail("lane %d arrived twice at %s", lane, kind_name(k)); /* cannot happen */
    g.arrived |= 1u << lane;
    w.in[lane] = v;
    w.arg[lane] = arg;
    if (!warp_try_complete(w, gi)) {
        B.st[tid] = T_AT_WARP;
        to_scheduler(f);
    }
    return w.out[lane];
}

void *kvq_emu::dynamic_shared(void) {
    if (!cur) fail("extern __shared__ memory used outside a kernel");
    return dyn_shared.data();
}

/* Runs a launch: checks the configuration as the GPU would, then every block in turn. */
void kvq_emu::launch(const launch_site &site, dim3 grid, dim3 block, size_t shmem, void (*body)(void *), void *ctx) {
    uint64_t nt = (uint64_t)block.x * block.y * block.z;
    if (cur) fail("kernel %s launched from inside a kernel (dynamic parallelism is not emulated)", site.kernel);
    if (nt == 0 || nt > 1024 || block.z > 64 || grid.x == 0 || grid.y == 0 || grid.z == 0 || grid.x > 0x7fffffffu ||
        grid.y > 65535 || grid.z > 65535) {
        set_error(cudaErrorInvalidConfiguration); /* nothing runs, as on the GPU */
        return;
    }
    if (shmem > 48 * 1024) { /* beyond the default limit without cudaFuncSetAttribute */
        set_error(cudaErrorInvalidValue);
        return;
    }
    std::lock_guard<std::mutex> lk(launch_mu); /* one launch at a time, whatever host thread */
    install_fault_handler();
    init_order_mode();
    B.site = &site;
    B.body = body;
    B.ctx = ctx;
    B.n = (unsigned)nt;
    B.st.assign(B.n, T_NEW);
    B.fib.assign(B.n, nullptr);
    B.order.resize(B.n);
    if (order_mode != RANDOM) block_order();
    B.warps.assign((B.n + 31) / 32, warp());
    for (unsigned w = 0; w < B.warps.size(); w++)
        B.warps[w].present = B.n - w * 32 >= 32 ? 0xffffffffu : (1u << (B.n - w * 32)) - 1u;
    grid_dim = grid;
    block_dim = block;
    dyn_shared.assign(shmem ? shmem : 1, 0);
    for (unsigned z = 0; z < grid.z; z++)
        for (unsigned y = 0; y < grid.y; y++)
            for (unsigned x = 0; x < grid.x; x++) {
                block_idx = uint3{x, y, z};
                B.next_new = B.done = B.at_sync = 0;
                if (order_mode == RANDOM) block_order();
                B.ready.clear();
                std::fill(B.st.begin(), B.st.end(), T_NEW);
                for (warp &w : B.warps) w.exited = 0, w.ops.clear();
                memset(dyn_shared.data(), 0xcd, dyn_shared.size()); /* no block sees another's data */
                for (;;) {
                    if (!B.ready.empty()) { /* resume a thread a barrier released */
                        int t = B.ready.front();
                        B.ready.pop_front();
                        resume(B.fib[t]);
                    } else if (B.next_new < B.n) { /* start the next thread on a free fiber */
                        fiber *f;
                        if (free_fibers.empty()) {
                            f = new_fiber();
                        } else {
                            f = free_fibers.back();
                            free_fibers.pop_back();
                        }
                        f->tid = B.order[B.next_new++];
                        resume(f);
                    } else if (B.done == B.n) {
                        break;
                    } else {
                        deadlock();
                    }
                }
            }
    B.site = nullptr;
}

/* ---- the runtime API ---------------------------------------------------------------------- */

static const char EMU_NAME[] = "kvq CPU emulator (not a GPU)";

/* multiprocessors: an H100's 132 by default (kvq sizes its attention chunks by it) */
static int emu_sms() {
    const char *e = getenv("KVQ_EMU_SMS");
    int n = e ? atoi(e) : 0;
    return n > 0 ? n : 132;
}

cudaError_t cudaGetDeviceCount(int *n) { *n = 1; return cudaSuccess; }
cudaError_t cudaGetDevice(int *dev) { *dev = 0; return cudaSuccess; }
cudaError_t cudaSetDevice(int dev) { return dev == 0 ? cudaSuccess : set_error(cudaErrorInvalidDevice); }
cudaError_t cudaGetDeviceProperties(cudaDeviceProp *p, int dev) {
    if (dev != 0) return set_error(cudaErrorInvalidDevice);
    memset(p, 0, sizeof *p);
    memcpy(p->name, EMU_NAME, sizeof EMU_NAME);
    p->totalGlobalMem = (size_t)16 << 30;
    p->sharedMemPerBlock = 48 * 1024;
    p->regsPerBlock = 65536;
    p->warpSize = 32;
    p->maxThreadsPerBlock = 1024;
    p->maxThreadsDim[0] = p->maxThreadsDim[1] = 1024;
    p->maxThreadsDim[2] = 64;
    p->maxGridSize[0] = 0x7fffffff;
    p->maxGridSize[1] = p->maxGridSize[2] = 65535;
    p->major = 8; /* sm_80, the oldest architecture the Makefile builds for, so arch checks pass */
    p->minor = 0;
    p->multiProcessorCount = emu_sms();
    return cudaSuccess;
}
cudaError_t cudaDeviceGetAttribute(int *v, cudaDeviceAttr a, int dev) {
    if (dev != 0) return set_error(cudaErrorInvalidDevice);
    switch (a) {
    case cudaDevAttrMaxThreadsPerBlock: *v = 1024; break;
    case cudaDevAttrMaxSharedMemoryPerBlock: *v = 48 * 1024; break;
    case cudaDevAttrWarpSize: *v = 32; break;
    case cudaDevAttrMultiProcessorCount: *v = emu_sms(); break;
    case cudaDevAttrComputeCapabilityMajor: *v = 8; break;
    case cudaDevAttrComputeCapabilityMinor: *v = 0; break;
    default: *v = 0; /* memory clock, bus width: no such thing here */
    }
    return cudaSuccess;
}
cudaError_t cudaDeviceSynchronize(void) { n_syncs++; return cudaSuccess; } /* everything already ran */
cudaError_t cudaDeviceReset(void) { last_error = cudaSuccess; return cudaSuccess; }
cudaError_t cudaGetLastError(void) {
    cudaError_t e = last_error;
    last_error = cudaSuccess;
    return e;
}
cudaError_t cudaPeekAtLastError(void) { return last_error; }
const char *cudaGetErrorName(cudaError_t e) {
    switch (e) {
    case cudaSuccess: return "cudaSuccess";
    case cudaErrorInvalidValue: return "cudaErrorInvalidValue";
    case cudaErrorMemoryAllocation: return "cudaErrorMemoryAllocation";
    case cudaErrorInitializationError: return "cudaErrorInitializationError";
    case cudaErrorInvalidConfiguration: return "cudaErrorInvalidConfiguration";
    case cudaErrorInvalidDevicePointer: return "cudaErrorInvalidDevicePointer";
    case cudaErrorInvalidMemcpyDirection: return "cudaErrorInvalidMemcpyDirection";
    case cudaErrorNoDevice: return "cudaErrorNoDevice";
    case cudaErrorInvalidDevice: return "cudaErrorInvalidDevice";
    case cudaErrorInvalidResourceHandle: return "cudaErrorInvalidResourceHandle";
    case cudaErrorNotReady: return "cudaErrorNotReady";
    case cudaErrorLaunchFailure: return "cudaErrorLaunchFailure";
    }
    return "cudaErrorUnknown";
}
const char *cudaGetErrorString(cudaError_t e) { return cudaGetErrorName(e); }

cudaError_t cudaMalloc(void **p, size_t n) {
    *p = alloc(device_blocks, n);
    return *p ? cudaSuccess : set_error(cudaErrorMemoryAllocation);
}
cudaError_t cudaMallocManaged(void **p, size_t n, unsigned flags) {
    (void)flags;
    *p = alloc(managed_blocks, n);
    return *p ? cudaSuccess : set_error(cudaErrorMemoryAllocation);
}
cudaError_t cudaFree(void *p) {
    bool managed;
    {
        std::lock_guard<std::mutex> lk(mem_mu);
        managed = managed_blocks.count((uintptr_t)p) != 0;
    }
    return release_block(managed ? managed_blocks : device_blocks, p);
}
cudaError_t cudaPointerGetAttributes(cudaPointerAttributes *attr, const void *p) {
    if (!attr) return set_error(cudaErrorInvalidValue);
    std::lock_guard<std::mutex> lk(mem_mu);
    memset(attr, 0, sizeof *attr);
    attr->device = -2; /* what CUDA reports for unregistered memory */
    if (inside(device_blocks, p, 1)) attr->type = cudaMemoryTypeDevice;
    else if (inside(managed_blocks, p, 1)) attr->type = cudaMemoryTypeManaged;
    else if (inside(host_blocks, p, 1)) attr->type = cudaMemoryTypeHost;
    else attr->type = cudaMemoryTypeUnregistered;
    if (attr->type != cudaMemoryTypeUnregistered) {
        attr->device = 0;
        attr->devicePointer = const_cast<void *>(p);
        attr->hostPointer = attr->type == cudaMemoryTypeDevice ? nullptr : const_cast<void *>(p);
    } else {
        attr->hostPointer = const_cast<void *>(p);
    }
    return cudaSuccess;
}
cudaError_t cudaHostAlloc(void **p, size_t n, unsigned flags) {
    (void)flags;
    *p = alloc(host_blocks, n);
    return *p ? cudaSuccess : set_error(cudaErrorMemoryAllocation);
}
cudaError_t cudaMallocHost(void **p, size_t n) { return cudaHostAlloc(p, n, 0); }
cudaError_t cudaFreeHost(void *p) { return release_block(host_blocks, p); }
cudaError_t cudaMemcpy(void *dst, const void *src, size_t n, cudaMemcpyKind kind) {
    n_syncs++;
    return copy(dst, src, n, kind);
}
cudaError_t cudaMemcpyAsync(void *dst, const void *src, size_t n, cudaMemcpyKind kind, cudaStream_t) {
    return copy(dst, src, n, kind);
}
static cudaError_t set_memory(void *dst, int value, size_t n) {
    if (!n) return cudaSuccess;
    if (!device_range(dst, n)) return set_error(cudaErrorInvalidValue);
    memset(dst, value, n);
    return cudaSuccess;
}
cudaError_t cudaMemset(void *dst, int value, size_t n) {
    n_syncs++;
    return set_memory(dst, value, n);
}
cudaError_t cudaMemsetAsync(void *dst, int value, size_t n, cudaStream_t) { return set_memory(dst, value, n); }

struct CUstream_st { int unused; };
struct CUevent_st { double ms; };
cudaError_t cudaStreamCreate(cudaStream_t *s) { *s = new CUstream_st(); return cudaSuccess; }
cudaError_t cudaStreamCreateWithFlags(cudaStream_t *s, unsigned) { return cudaStreamCreate(s); }
cudaError_t cudaStreamDestroy(cudaStream_t s) { delete s; return cudaSuccess; }
cudaError_t cudaStreamSynchronize(cudaStream_t) { n_syncs++; return cudaSuccess; }
cudaError_t cudaEventCreate(cudaEvent_t *e) { *e = new CUevent_st(); return cudaSuccess; }
cudaError_t cudaEventCreateWithFlags(cudaEvent_t *e, unsigned) { return cudaEventCreate(e); }
cudaError_t cudaEventDestroy(cudaEvent_t e) { delete e; return cudaSuccess; }
cudaError_t cudaEventRecord(cudaEvent_t e, cudaStream_t) { /* work is done at the call: host time */
    e->ms = std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now().time_since_epoch()).count();
    return cudaSuccess;
}
cudaError_t cudaEventSynchronize(cudaEvent_t) { n_syncs++; return cudaSuccess; }
cudaError_t cudaStreamWaitEvent(cudaStream_t, cudaEvent_t, unsigned) { return cudaSuccess; }

kvq_emu::api_counts kvq_emu::counts(void) { return {n_allocs.load(), n_frees.load(), n_syncs.load()}; }
cudaError_t cudaEventElapsedTime(float *ms, cudaEvent_t start, cudaEvent_t end) {
    *ms = (float)(end->ms - start->ms);
    return cudaSuccess;
}
