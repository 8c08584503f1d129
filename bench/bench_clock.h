/* bench_clock.h: the benchmarks' clocks (bench/bench.c, bench/kernels.c): wall time, the
   process's CPU time, and the core clock measured by dependent adds. Static functions for one
   translation unit; needs _POSIX_C_SOURCE >= 199309L, <stdint.h> and <time.h>. */
#ifndef KVQ_BENCH_CLOCK_H
#define KVQ_BENCH_CLOCK_H

static double now_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

/* CPU time of the whole process (all its threads): beside wall time it shows what the
   machine's other work took from a row (wall >> CPU: waiting; CPU >> wall: threads). */
static double cpu_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

/* The core clock, from a chain of dependent integer adds (one cycle each on every x86 and
   Arm core since long ago): 100 per iteration, the loop's own work overlapped. Best of 5
   runs of about 20 ms; 0 where there is no inline asm for the ISA. */
static double measure_ghz(void) {
#if (defined(__x86_64__) || defined(__aarch64__)) && (defined(__GNUC__) || defined(__clang__))
    double best = 0.0;
    int run;
    for (run = 0; run < 5; run++) {
        uint64_t x = 0;
        long i, n = 600000;
        double t0 = now_s(), t;
        for (i = 0; i < n; i++) {
#if defined(__x86_64__)
#define KVQB_ADD10 "add $1, %0\n\tadd $1, %0\n\tadd $1, %0\n\tadd $1, %0\n\tadd $1, %0\n\t" \
                   "add $1, %0\n\tadd $1, %0\n\tadd $1, %0\n\tadd $1, %0\n\tadd $1, %0\n\t"
#else
#define KVQB_ADD10 "add %0, %0, #1\n\tadd %0, %0, #1\n\tadd %0, %0, #1\n\tadd %0, %0, #1\n\tadd %0, %0, #1\n\t" \
                   "add %0, %0, #1\n\tadd %0, %0, #1\n\tadd %0, %0, #1\n\tadd %0, %0, #1\n\tadd %0, %0, #1\n\t"
#endif
            __asm__ volatile(KVQB_ADD10 KVQB_ADD10 KVQB_ADD10 KVQB_ADD10 KVQB_ADD10 KVQB_ADD10 KVQB_ADD10 KVQB_ADD10
                             KVQB_ADD10 KVQB_ADD10
                             : "+r"(x));
        }
        t = now_s() - t0;
        if (x != (uint64_t)n * 100u) return 0.0; /* the asm did not run as written */
        if (100.0 * (double)n / t / 1e9 > best) best = 100.0 * (double)n / t / 1e9;
    }
    return best;
#else
    return 0.0;
#endif
}

#endif /* KVQ_BENCH_CLOCK_H */
