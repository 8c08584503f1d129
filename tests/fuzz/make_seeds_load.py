#!/usr/bin/env python3
"""Writes the seeds of fuzz_load (tests/fuzz/seeds_load/): inputs that build deep caches
(salient side stores at 8 and 16 bits, both policies, rotation, keys per token, 16-bit keys
with salient tokens, wide heads), some loaded unchanged and some with fp16 Inf/NaN or a float
NaN written into the payload. The byte layout is the one fuzz_load.c reads, in order:

  isa           bits 0-1: ISA while building, bits 2-3: while loading (scalar, AVX2, AVX-512, NEON)
  config        head_dim (below 224: 8..64, else 72..512), n_kv_heads, max_tokens (u16, mod 320), bits (key: 0-2, value: 3-5 into
                2,3,4,8,16,2,4,8), shape (group 0-1 into 16,32,64,128, residual groups 2-3,
                sinks 4-6), mode (1 salient, 2 rotation, 4 keys per token, 8-16 ratio,
                32 salient 16 bits, 64 error policy, 128 prerotated), seed
  chunks        count (mod 6), then each: flags (1 attend after, 2 add 128 tokens), tokens (mod 128),
                k rows (seed, class), v rows (seed, class), [query: shape, seed, amplitude]
  mutations     count (mod 9), then each: offset (u24, mod payload), kind (mod 4: byte, fp16
                pattern, f32 pattern, two bytes), value (u16)
  steps         count (mod 4, plus 1), then each: op (mod 3: append, split attention, read) ...
  split         cuts, extra state, query (shape, seed, amplitude), cut points (u16 each),
                KV-head range lengths
"""
import os
import sys

SCALAR, AVX2, AVX512 = 0, 1, 2
BITS = {2: 0, 3: 1, 4: 2, 8: 3, 16: 4}
GROUPS = {16: 0, 32: 1, 64: 2, 128: 3}


def config(head_dim, heads, max_tokens, kbits, vbits, group, residual_groups, sinks, mode, seed=1):
    wide = [72, 80, 88, 96, 104, 112, 120, 128, 136, 160, 192, 200, 256, 320, 448, 512]
    d = (head_dim // 8 - 1) if head_dim <= 64 else 224 + wide.index(head_dim)
    return bytes([d, heads - 1, (max_tokens - 1) & 255, (max_tokens - 1) >> 8,
                  BITS[kbits] | BITS[vbits] << 3, GROUPS[group] | residual_groups << 2 | sinks << 4, mode, seed])


def rows(seed, cls):
    return bytes([seed, cls])


def query(shape=0x05, seed=7, amp=2):
    return bytes([shape, seed, amp])


def chunk(tokens, attend, kcls=2, vcls=3, seed=3):
    flags = (1 if attend else 0) | (2 if tokens >= 128 else 0)
    out = bytes([flags, tokens % 128]) + rows(seed, kcls) + rows(seed + 1, vcls)
    return out + (query(seed=seed) if attend else b"")


def mutations(*muts):
    out = bytes([len(muts)])
    for offset, kind, value in muts:
        out += bytes([offset & 255, (offset >> 8) & 255, offset >> 16, kind, value & 255, value >> 8])
    return out


def split(cuts=3, extra=1, points=(5, 40), heads=(0, 0, 0)):
    out = bytes([cuts - 1, extra]) + query(shape=0x16, seed=9, amp=3)
    for p in points[:cuts - 1]:
        out += bytes([p & 255, p >> 8])
    return out + bytes(heads) * (cuts + 1)


def steps(*ops):
    return bytes([len(ops) - 1]) + b"".join(ops)


def append_step(tokens, cls=4):
    return bytes([0, tokens]) + rows(11, cls) + rows(12, cls)


def split_step():
    return bytes([1]) + split(cuts=4, extra=0, points=(3, 17, 90), heads=(1, 0, 1))


def seed_file(isa, cfg, chunks, muts, tail):
    return bytes([isa]) + cfg + bytes([len(chunks)]) + b"".join(chunks) + muts + tail


SALIENT = 1
ROTATE = 2
PER_TOKEN = 4
SAL16 = 32
ERROR = 64
PREROT = 128


def ratio(i):
    return i << 3


def seeds():
    build = [chunk(40, True), chunk(50, True, kcls=7, vcls=4, seed=20), chunk(70, True, kcls=5, vcls=2, seed=30)]
    tail = steps(append_step(40), split_step(), bytes([2])) + split()
    s = {}
    # salient, attention policy, 8-bit side store, k2v2 G16 R16, 4 sinks
    sal8 = config(64, 2, 300, 2, 2, 16, 1, 4, SALIENT | ratio(2))
    s["salient8_attention"] = seed_file(SCALAR | AVX2 << 2, sal8, build, mutations(), tail)
    # the same image with fp16 Inf in a key block and NaN in a value record, and a NaN salience score
    s["salient8_fp16_inf_nan"] = seed_file(SCALAR, sal8, build,
                                           mutations((700, 1, 0), (9000, 1, 2), (30000, 2, 0)), tail)
    # 16-bit keys with 16-bit salient tokens, error policy, rotated by the cache
    s["k16_salient16_hadamard"] = seed_file(AVX512 | SCALAR << 2,
                                            config(96, 1, 260, 16, 4, 32, 1, 2, SALIENT | SAL16 | ERROR | ROTATE | ratio(1)),
                                            build, mutations(), tail)
    # 16-bit keys with 8-bit salient tokens, attention policy, a fp16 NaN written into the side store region
    s["k16_salient8_nan"] = seed_file(AVX2, config(32, 3, 200, 16, 3, 16, 0, 1, SALIENT | ratio(3)),
                                      build, mutations((12000, 1, 2), (12345, 0, 0x7e)), tail)
    # keys per token, rotated, k4v2 (QuaRot's pairing), head_dim 128
    s["keys_per_token_hadamard"] = seed_file(SCALAR | AVX512 << 2,
                                             config(128, 1, 240, 4, 2, 16, 1, 3, PER_TOKEN | ROTATE),
                                             build, mutations(), tail)
    # prerotated k3v8 G32 R0, a -Inf in the key scales
    s["prerotated_k3v8_inf"] = seed_file(AVX2 | AVX2 << 2, config(48, 2, 220, 3, 8, 32, 0, 0, ROTATE | PREROT),
                                         build, mutations((200, 1, 1)), tail)
    # a wide head: D 512, k8v3, G128, one KV head
    s["wide512_k8v3"] = seed_file(AVX512 | AVX512 << 2, config(512, 1, 300, 8, 3, 128, 0, 4, 0),
                                  [chunk(150, False), chunk(140, True, seed=40)], mutations(), tail)
    return s


def main():
    out = sys.argv[1] if len(sys.argv) > 1 else os.path.join(os.path.dirname(os.path.abspath(__file__)), "seeds_load")
    os.makedirs(out, exist_ok=True)
    for name, data in seeds().items():
        with open(os.path.join(out, name), "wb") as f:
            f.write(data)


if __name__ == "__main__":
    main()
