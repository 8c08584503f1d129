/* CPU emulator: the part of <cuda_fp16.h> kvq uses. Conversions are the GPU's: IEEE
   round-to-nearest-even with subnormals kept, and any NaN becomes the canonical 0x7fff
   that cvt.rn.f16.f32 produces. On x86 with F16C (-march=native) the conversion is the
   hardware's, independent of kvq.h's software one; elsewhere the portable code below. */
#ifndef KVQ_CUDA_EMU_FP16_H
#define KVQ_CUDA_EMU_FP16_H

#include "cuda_runtime.h"
#if defined(__F16C__)
#include <immintrin.h>
#endif

struct __half { unsigned short bits; };

namespace kvq_emu {
/* float -> fp16 bits, round to nearest even, without F16C */
inline unsigned short f2h_soft(float f) {
    uint32_t x, ax;
    unsigned short sign;
    memcpy(&x, &f, 4);
    sign = (unsigned short)((x >> 16) & 0x8000u);
    ax = x & 0x7fffffffu;
    if (ax > 0x7f800000u) return 0x7fff;                     /* NaN */
    if (ax >= 0x477ff000u) return sign | 0x7c00u;            /* >= 65520 (and inf): inf */
    if (ax < 0x38800000u)                                    /* below 2^-14: subnormal or 0 */
        return sign | (unsigned short)nearbyintf(fabsf(f) * 16777216.0f); /* units of 2^-24, exact scaling */
    {
        uint32_t h = (ax - 0x38000000u) >> 13, rest = ax & 0x1fffu; /* rebias 127 -> 15, drop 13 bits */
        if (rest > 0x1000u || (rest == 0x1000u && (h & 1u))) h++;   /* a carry may step the exponent */
        return sign | (unsigned short)h;
    }
}
inline float h2f_soft(unsigned short h) {
    uint32_t sign = (uint32_t)(h & 0x8000u) << 16, e = (h >> 10) & 0x1fu, m = h & 0x3ffu, x;
    float f;
    if (e == 0) { /* zero or subnormal: m * 2^-24, exact */
        f = (float)m * (1.0f / 16777216.0f);
        return sign ? -f : f;
    }
    x = sign | (e == 31 ? 0x7f800000u | (m << 13) : ((e + 112u) << 23) | (m << 13));
    memcpy(&f, &x, 4);
    return f;
}
} // namespace kvq_emu

inline __half __float2half_rn(float f) {
#if defined(__F16C__)
    if (f != f) return __half{0x7fff}; /* F16C keeps the payload; the GPU does not */
    return __half{(unsigned short)_cvtss_sh(f, _MM_FROUND_TO_NEAREST_INT)};
#else
    return __half{kvq_emu::f2h_soft(f)};
#endif
}
inline __half __float2half(float f) { return __float2half_rn(f); }
inline float __half2float(__half h) {
#if defined(__F16C__)
    return _cvtsh_ss(h.bits);
#else
    return kvq_emu::h2f_soft(h.bits);
#endif
}
inline unsigned short __half_as_ushort(__half h) { return h.bits; }
inline __half __ushort_as_half(unsigned short u) { return __half{u}; }
inline short __half_as_short(__half h) { return (short)h.bits; }
inline __half __short_as_half(short s) { return __half{(unsigned short)s}; }

#endif /* KVQ_CUDA_EMU_FP16_H */
