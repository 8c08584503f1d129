#!/usr/bin/env python3
"""Computes kvq's golden bytes from the format kvq.h documents (its Formats and
Quantize sections), independently of kvq.h's code.

Input (as in tests/test_core.c test_golden): head_dim 8, one KV head, G = 16,
no residual window, 16 tokens; 2-bit keys per channel over the block, 3-bit
values per token (one group of 8 channels). Writes tests/golden_k2.inc and
tests/golden_v3.inc (min/max ranges, range_search 0) and tests/golden_k2c4.inc
and tests/golden_v3c4.inc (range_search 4, the default); and 2-bit values with 16-bit params
(value_param_bits 16): tests/golden_v2p16.inc and tests/golden_v2p16c4.inc. Python's struct 'e'
format rounds to nearest even; f32() rounds a double to float as C's cast does.
"""
import struct, os

def f16(x):  return struct.unpack('<e', struct.pack('<e', x))[0]
def f32(x):  return struct.unpack('<f', struct.pack('<f', x))[0]
def h16(x):  return struct.pack('<e', x)

D, G, T = 8, 16, 16
k = [[((t * 7 + c * 3) % 13 - 6) * 0.375 * (c + 1) for c in range(D)] for t in range(T)]
v = [[f32(((t * 5 + c * 11) % 9 - 4) * 0.5 + f32(c * f32(0.1))) for c in range(D)] for t in range(T)]

def bits_of(x): return struct.unpack('<I', struct.pack('<f', x))[0]
def from_bits(b): return struct.unpack('<f', struct.pack('<I', b))[0]

def term(x, m, r, top):
    """the search's squared rounding error of x, in units of s^2, every step in float"""
    u = f32(f32(x - m) * r)
    c = 0.0 if u < 0 else u
    c = top if c > top else c
    c = f32(f32(c + 12582912.0) - 12582912.0)     # round to nearest even
    d = f32(u - c)
    b = ((bits_of(d) & 0x7fffffff) + 0x2000) & 0x7fffc000   # 9 significant bits
    if b < 0x2b800000: b = 0
    d = from_bits(b)
    return f32(d * d)

def e5m3(e):
    """a 16-bit value param's scale: the fp16 whose bits are e << 7"""
    return struct.unpack('<e', struct.pack('<H', e << 7))[0]

def fit16(lo, hi, bits):
    """16-bit value params (e, m8): the smallest scale >= the range's step, -lo/8 and lo/7.9375,
    raised until lo lies in [-8 s, 127 s / 16]; m8 = round(16 lo / s), an int8"""
    need = max(f32(f32(hi - lo) / ((1 << bits) - 1)), f32(-0.125 * lo), f32(lo / 7.9375))
    e = 0
    while e < 0xf7 and e5m3(e) < need: e += 1
    while e < 0xf7 and not (lo >= f32(-8.0 * e5m3(e)) and lo <= f32(7.9375 * e5m3(e))): e += 1
    s = e5m3(e)
    m8 = 0 if s == 0 else min(max(round(f32(f32(lo * 16.0) / s)), -128), 127)
    return e, m8, s, f32(f32(m8 * s) * 0.0625)

def candidate(lo, hi, bits, step, i, j, p16=False):
    rng = hi - lo                                  # exact in double
    l = f32(lo + rng * (i * step)) if i else lo
    h = f32(hi - rng * (j * step)) if j else hi
    s = f32(f32(h - l) / ((1 << bits) - 1))
    m = l
    if p16: _, _, s, m = fit16(l, h, bits)         # 16-bit params are scored as stored
    return l, h, m, (f32(1.0 / s) if s > 0 else 0.0), f32(s * s)

def error(xs, cand, top, lanes):
    l, h, m, r, s2 = cand
    if lanes:                                      # values: eight lanes, a fixed combination
        a = [0.0] * 8
        for t in range(0, len(xs), 8):
            for k in range(8): a[k] = f32(a[k] + term(xs[t + k], m, r, top))
        tot = f32(f32(f32(a[0] + a[4]) + f32(a[1] + a[5])) + f32(f32(a[2] + a[6]) + f32(a[3] + a[7])))
    else:                                          # key channels: one sum in token order, weight 1
        tot = 0.0
        for x in xs: tot = f32(tot + f32(1.0 * term(x, m, r, top)))
    return f32(tot * s2)

def search(xs, lo, hi, bits, steps, lanes, p16=False):
    """the bottom side first (i, 0), then the top from the best bottom (i_best, j)"""
    top = float((1 << bits) - 1)
    step = round(96.0 / (1 << (bits - 2)) / (steps - 1)) / 256.0
    best, best_lo, best_hi, i_best = 0.0, lo, hi, 0
    for side in range(2):
        for k in range(steps if side == 0 else steps - 1):
            i, j = (k, 0) if side == 0 else (i_best, k + 1)
            cand = candidate(lo, hi, bits, step, i, j, p16)
            if cand[3] == 0.0: continue
            e = error(xs, cand, top, lanes)
            if (side == 0 and k == 0) or e < best:
                best, best_lo, best_hi = e, cand[0], cand[1]
                if side == 0: i_best = i
    return best_lo, best_hi

def quantize(xs, bits, steps=0, lanes=False):
    """fp16 inputs -> (scale16, min16, codes); codes use the stored (rounded) scale and min."""
    xs = [f16(x) for x in xs]                      # the residual window stores fp16
    lo, hi = min(xs), max(xs)
    if steps > 1 and bits <= (3 if lanes else 2): lo, hi = search(xs, lo, hi, bits, steps, lanes)  # values 2-3 bits, keys 2
    m = f16(lo)
    s = f16(f32(f32(hi - lo) / ((1 << bits) - 1)))
    codes = []
    for x in xs:
        if s == 0: codes.append(0); continue
        q = round(f32(f32(x - m) / s))             # round() is half-to-even
        codes.append(min(max(q, 0), (1 << bits) - 1))
    return s, m, codes

def pack(codes, bits):
    if bits == 3:                                  # two bit planes: the low 2 bits as a 2-bit row,
        return pack([c & 3 for c in codes], 2) + pack([c >> 2 for c in codes], 1)   # then the high bits
    n = len(codes) * bits
    acc = 0
    for i, c in enumerate(codes):
        acc |= c << (i * bits)                     # lowest bits first
    return acc.to_bytes(n // 8, 'little')

def golden(steps):
    # key block: fp16 scale[D], fp16 min[D], then per channel G codes packed along tokens
    scales, mins, rows = b'', b'', b''
    for c in range(D):
        s, m, codes = quantize([k[t][c] for t in range(T)], 2, steps, False)
        scales += h16(s); mins += h16(m); rows += pack(codes, 2)
    # values: per token fp16 scale, fp16 min (one group), then 8 codes of 3 bits as planes:
    # 2 bytes of low bits, 1 byte of high bits
    val = b''
    for t in range(T):
        s, m, codes = quantize(v[t], 3, steps, True)
        val += h16(s) + h16(m) + pack(codes, 3)
    return scales + mins + rows, val

def golden_p16(steps):
    """2-bit values with 16-bit params: per token one u16 (e | m8 << 8), then 8 codes (2 bytes)"""
    val = b''
    for t in range(T):
        xs = [f16(x) for x in v[t]]
        lo, hi = min(xs), max(xs)
        if steps > 1: lo, hi = search(xs, lo, hi, 2, steps, True, True)
        e, m8, s, m = fit16(lo, hi, 2)
        codes = [0 if s == 0 else min(max(round(f32(f32(x - m) / s)), 0), 3) for x in xs]
        val += bytes([e, m8 & 0xff]) + pack(codes, 2)
    return val

key, val = golden(0)
key4, val4 = golden(4)
vp, vp4 = golden_p16(0), golden_p16(4)
here = os.path.dirname(os.path.abspath(__file__))
for name, data in (('golden_k2.inc', key), ('golden_v3.inc', val), ('golden_k2c4.inc', key4), ('golden_v3c4.inc', val4),
                   ('golden_v2p16.inc', vp), ('golden_v2p16c4.inc', vp4)):
    with open(os.path.join(here, name), 'w') as f:
        f.write('/* generated by tests/golden.py */\n')
        for i in range(0, len(data), 16):
            f.write(' '.join('%d,' % b for b in data[i:i + 16]) + '\n')
print(len(key), len(val), key4 != key, val4 != val, len(vp), vp4 != vp)
