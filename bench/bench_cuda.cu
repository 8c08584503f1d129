/* Decode attention on the GPU: kvq_cuda.h at 2/4/8/16 bits and 2 bits with 5% salient tokens
   (8-bit side store, attention policy: each call also tracks salience), head_dim 128, GQA 32 query
   heads over 8 KV heads, N = 4K..128K tokens, batch 1 and 16 sequences (one batched launch).
   Median of timed runs (cudaEvent), GB/s of cache bytes read (payload bytes of every
   sequence) against the device's DRAM bandwidth, both the nominal peak (memory clock x bus
   width) and a measured device-to-device copy. Prints a table and CSV (--csv FILE).
   Without a CUDA device it prints "skipped: no CUDA device" and exits 0. */
#define KVQ_IMPLEMENTATION
#define KVQ_CUDA_IMPLEMENTATION
#define KVQ_CUDA_UNCHECKED_APPEND /* filling is not what is measured; skip the per-append sync */
#include "kvq_cuda.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define CUDA_OK(x)                                                                              \
    do {                                                                                        \
        cudaError_t e_ = (x);                                                                   \
        if (e_ != cudaSuccess) {                                                                \
            fprintf(stderr, "%s:%d: %s: %s\n", __FILE__, __LINE__, #x, cudaGetErrorString(e_)); \
            exit(2);                                                                            \
        }                                                                                       \
    } while (0)

enum { D = 128, HKV = 8, HQ = 32, MAX_BATCH = 16, REPS = 30 };

/* Roughly normal numbers from a hash of the index: no host traffic to fill 100s of MB. */
__global__ void fill_random(float *x, size_t n, uint32_t seed) {
    size_t i;
    for (i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x) {
        uint32_t h = (uint32_t)i * 0x9e3779b1u ^ seed, s = 0;
        int r;
        for (r = 0; r < 4; r++) {
            h ^= h >> 16;
            h *= 0x85ebca6bu;
            h ^= h >> 13;
            h *= 0xc2b2ae35u;
            h ^= h >> 16;
            s += h >> 20; /* 12 bits */
        }
        x[i] = ((float)s / 4096.0f - 2.0f) * 1.7f;
    }
}

static int cmp_float(const void *a, const void *b) {
    float x = *(const float *)a, y = *(const float *)b;
    return (x > y) - (x < y);
}

/* Device-to-device copy bandwidth (read + write bytes per second), median of 10. */
static double measured_bandwidth(void) {
    size_t bytes = (size_t)1 << 30;
    void *a, *b;
    cudaEvent_t e0, e1;
    float t[10];
    int r;
    if (cudaMalloc(&a, bytes) != cudaSuccess) { (void)cudaGetLastError(); bytes >>= 2; CUDA_OK(cudaMalloc(&a, bytes)); }
    CUDA_OK(cudaMalloc(&b, bytes));
    CUDA_OK(cudaMemset(a, 1, bytes));
    CUDA_OK(cudaEventCreate(&e0));
    CUDA_OK(cudaEventCreate(&e1));
    CUDA_OK(cudaMemcpy(b, a, bytes, cudaMemcpyDeviceToDevice));
    for (r = 0; r < 10; r++) {
        CUDA_OK(cudaEventRecord(e0, 0));
        CUDA_OK(cudaMemcpyAsync(b, a, bytes, cudaMemcpyDeviceToDevice, 0));
        CUDA_OK(cudaEventRecord(e1, 0));
        CUDA_OK(cudaEventSynchronize(e1));
        CUDA_OK(cudaEventElapsedTime(&t[r], e0, e1));
    }
    qsort(t, 10, sizeof(float), cmp_float);
    cudaFree(a);
    cudaFree(b);
    cudaEventDestroy(e0);
    cudaEventDestroy(e1);
    return 2.0 * (double)bytes / (t[5] * 1e-3);
}

typedef struct result {
    int bits, batch, n;
    float sal;
    double us, gbs, bytes;
} result;

int main(int argc, char **argv) {
    /* configs: key/value bits and salient ratio; plain 2-bit first, fp16 (the baseline) last */
    static const int bits_list[] = {2, 2, 4, 8, 16};
    static const float sal_list[] = {0.0f, 0.05f, 0.0f, 0.0f, 0.0f};
    static const int ns[] = {4096, 16384, 65536, 131072};
    enum { NB = 5, NN = 4 };
    const char *csv_path = NULL;
    result res[2][NB][NN];
    cudaDeviceProp prop;
    int devices = 0, dev = 0, clk = 0, bus = 0, a, bi, ni, bt, s, r;
    double peak, copy_bw;
    float *d_k, *d_v, *d_q[MAX_BATCH], *d_o[MAX_BATCH];
    const int chunk = 8192;
    cudaEvent_t e0, e1;
    FILE *csv = NULL;
    for (a = 1; a < argc; a++)
        if (strcmp(argv[a], "--csv") == 0 && a + 1 < argc) csv_path = argv[++a];
    if (cudaGetDeviceCount(&devices) != cudaSuccess || devices == 0) {
        (void)cudaGetLastError();
        printf("skipped: no CUDA device\n");
        return 0;
    }
    CUDA_OK(cudaGetDevice(&dev));
    CUDA_OK(cudaGetDeviceProperties(&prop, dev));
    CUDA_OK(cudaDeviceGetAttribute(&clk, cudaDevAttrMemoryClockRate, dev));  /* kHz */
    CUDA_OK(cudaDeviceGetAttribute(&bus, cudaDevAttrGlobalMemoryBusWidth, dev)); /* bits */
    peak = 2.0 * clk * 1e3 * (bus / 8.0); /* double data rate */
    copy_bw = measured_bandwidth();
    printf("device: %s, %d SMs; DRAM peak %.0f GB/s (%d kHz x %d bits x 2), measured copy %.0f GB/s\n", prop.name,
           prop.multiProcessorCount, peak / 1e9, clk, bus, copy_bw / 1e9);
    printf("decode attention: head_dim %d, %d query heads over %d KV heads, G 32, residual 128, 1 query\n\n", D, HQ, HKV);

    CUDA_OK(cudaMalloc((void **)&d_k, (size_t)chunk * HKV * D * sizeof(float)));
    CUDA_OK(cudaMalloc((void **)&d_v, (size_t)chunk * HKV * D * sizeof(float)));
    for (s = 0; s < MAX_BATCH; s++) {
        CUDA_OK(cudaMalloc((void **)&d_q[s], HQ * D * sizeof(float)));
        CUDA_OK(cudaMalloc((void **)&d_o[s], HQ * D * sizeof(float)));
        fill_random<<<16, 256>>>(d_q[s], HQ * D, 777u + s);
    }
    CUDA_OK(cudaEventCreate(&e0));
    CUDA_OK(cudaEventCreate(&e1));

    for (bt = 0; bt < 2; bt++) {
        int batch = bt ? MAX_BATCH : 1;
        for (bi = 0; bi < NB; bi++) {
            kvq_cuda_cache *caches[MAX_BATCH];
            kvq_config cfg = kvq_default_config(D, HKV, ns[NN - 1]);
            kvq_attn_params ap = {HQ, 1, 0.0f};
            int filled = 0;
            cfg.key_bits = cfg.value_bits = bits_list[bi];
            cfg.key_block = 0;         /* kNvN: blocks of G and fp16 value params, as the CPU bench's kvq-N */
            cfg.value_param_bits = 32;
            cfg.salient_ratio = sal_list[bi];
            for (s = 0; s < batch; s++) {
                kvq_status st = kvq_cuda_cache_create(&caches[s], &cfg);
                if (st != KVQ_OK) {
                    fprintf(stderr, "create: %s\n", kvq_status_string(st));
                    return 2;
                }
            }
            for (ni = 0; ni < NN; ni++) {
                float t[REPS];
                double bytes = 0.0;
                /* grow every sequence to ns[ni] tokens */
                while (filled < ns[ni]) {
                    int n = ns[ni] - filled < chunk ? ns[ni] - filled : chunk;
                    for (s = 0; s < batch; s++) {
                        fill_random<<<1024, 256>>>(d_k, (size_t)n * HKV * D, (uint32_t)(filled * 31 + s * 7 + 1));
                        fill_random<<<1024, 256>>>(d_v, (size_t)n * HKV * D, (uint32_t)(filled * 37 + s * 11 + 2));
                        if (kvq_cuda_cache_append(caches[s], d_k, d_v, n, 0) != KVQ_OK) {
                            fprintf(stderr, "append failed\n");
                            return 2;
                        }
                    }
                    filled += n;
                }
                CUDA_OK(cudaDeviceSynchronize());
                for (s = 0; s < batch; s++) bytes += (double)kvq_cuda_cache_payload_bytes(caches[s]);
                for (r = -3; r < REPS; r++) {
                    CUDA_OK(cudaEventRecord(e0, 0));
                    if (kvq_cuda_attention_batch(caches, batch, (const float *const *)d_q, d_o, &ap, 0) != KVQ_OK) {
                        fprintf(stderr, "attention failed\n");
                        return 2;
                    }
                    CUDA_OK(cudaEventRecord(e1, 0));
                    CUDA_OK(cudaEventSynchronize(e1));
                    if (r >= 0) CUDA_OK(cudaEventElapsedTime(&t[r], e0, e1));
                }
                qsort(t, REPS, sizeof(float), cmp_float);
                res[bt][bi][ni].bits = bits_list[bi];
                res[bt][bi][ni].sal = sal_list[bi];
                res[bt][bi][ni].batch = batch;
                res[bt][bi][ni].n = ns[ni];
                res[bt][bi][ni].us = t[REPS / 2] * 1e3;
                res[bt][bi][ni].bytes = bytes;
                res[bt][bi][ni].gbs = bytes / (t[REPS / 2] * 1e-3) / 1e9;
            }
            for (s = 0; s < batch; s++) kvq_cuda_cache_destroy(caches[s]);
        }
    }

    printf("%-5s %-5s %-7s %10s %10s %9s %7s %7s %9s\n", "batch", "bits", "N", "time_us", "MB_read", "GB/s", "%peak",
           "%copy", "vs_fp16");
    for (bt = 0; bt < 2; bt++)
        for (ni = 0; ni < NN; ni++)
            for (bi = 0; bi < NB; bi++) {
                const result *x = &res[bt][bi][ni];
                char label[16];
                if (x->sal > 0.0f) snprintf(label, sizeof label, "%d+%g%%", x->bits, 100.0 * x->sal);
                else snprintf(label, sizeof label, "%d", x->bits);
                printf("%-5d %-5s %-7d %10.1f %10.1f %9.1f %6.1f%% %6.1f%% %8.2fx\n", x->batch, label, x->n, x->us,
                       x->bytes / 1e6, x->gbs, 100.0 * x->gbs * 1e9 / peak, 100.0 * x->gbs * 1e9 / copy_bw,
                       res[bt][NB - 1][ni].us / x->us);
            }
    {
        /* the targets: 2-bit >= 3x faster than fp16 at 64K; >= 60% of DRAM bandwidth */
        double best = 0.0;
        for (bt = 0; bt < 2; bt++)
            for (bi = 0; bi < NB; bi++)
                for (ni = 0; ni < NN; ni++)
                    if (res[bt][bi][ni].gbs * 1e9 / peak > best) best = res[bt][bi][ni].gbs * 1e9 / peak;
        printf("\n2-bit vs fp16 at 64K: %.2fx (batch 1), %.2fx (batch 16); target >= 3x\n",
               res[0][NB - 1][2].us / res[0][0][2].us, res[1][NB - 1][2].us / res[1][0][2].us);
        printf("best fraction of DRAM peak: %.0f%%; target >= 60%%\n\n", 100.0 * best);
    }
    if (csv_path && !(csv = fopen(csv_path, "w"))) fprintf(stderr, "cannot write %s\n", csv_path);
    printf("csv:\n");
    for (a = 0; a < 2; a++) {
        FILE *f = a ? csv : stdout;
        if (!f) continue;
        fprintf(f, "device,batch,bits,n_tokens,time_us,bytes_read,gb_per_s,peak_gb_per_s,copy_gb_per_s,speedup_vs_fp16,"
                   "salient_ratio\n");
        for (bt = 0; bt < 2; bt++)
            for (ni = 0; ni < NN; ni++)
                for (bi = 0; bi < NB; bi++) {
                    const result *x = &res[bt][bi][ni];
                    fprintf(f, "\"%s\",%d,%d,%d,%.2f,%.0f,%.1f,%.1f,%.1f,%.3f,%g\n", prop.name, x->batch, x->bits, x->n,
                            x->us, x->bytes, x->gbs, peak / 1e9, copy_bw / 1e9, res[bt][NB - 1][ni].us / x->us, x->sal);
                }
    }
    if (csv) fclose(csv);
    for (s = 0; s < MAX_BATCH; s++) {
        cudaFree(d_q[s]);
        cudaFree(d_o[s]);
    }
    cudaFree(d_k);
    cudaFree(d_v);
    return 0;
}
