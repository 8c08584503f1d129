#!/usr/bin/env python3
"""Rewrites a CUDA source for the CPU emulator (tests/cuda_emu): usage launch.py IN OUT.

  k<<<grid, block[, shmem[, stream]]>>>(args)  ->  kvq_emu_launch(k, "k", __FILE__, __LINE__, grid, block...)(args)
  extern __shared__ T x[];                     ->  T *const x = static_cast<T *>(kvq_emu::dynamic_shared());
  #pragma unroll [n]                           ->  (dropped: g++ does not know it and would warn)

k may be a template-id (k<1, 2>); the configuration and the arguments may span lines.
Comments and string literals are left alone. Line numbers are kept and a #line names the
original file, so compiler messages point at it. Writes OUT only, never IN."""
import re
import sys


def code_mask(src):
    """src with comments and string/char literals blanked (newlines kept): where to look."""
    out, i, n = list(src), 0, len(src)
    while i < n:
        if src.startswith('//', i):
            j = src.find('\n', i)
            j = n if j < 0 else j
        elif src.startswith('/*', i):
            j = src.find('*/', i + 2)
            j = n if j < 0 else j + 2
        elif src[i] in '"\'':
            j = i + 1
            while j < n and src[j] != src[i]:
                j += 2 if src[j] == '\\' else 1
            j += 1
        else:
            i += 1
            continue
        for k in range(i, min(j, n)):
            if out[k] != '\n':
                out[k] = ' '
        i = j
    return ''.join(out)


def kernel_start(m, p):
    """Start of the kernel expression that ends just before m[p] (the '<<<')."""
    i = p
    while i > 0 and m[i - 1].isspace():
        i -= 1
    if i > 0 and m[i - 1] == '>':  # a template argument list: back to its '<'
        depth, i = 0, i - 1
        while i >= 0:
            depth += {'>': 1, '<': -1}.get(m[i], 0)
            if depth == 0:
                break
            i -= 1
        while i > 0 and m[i - 1].isspace():
            i -= 1
    while i > 0 and (m[i - 1].isalnum() or m[i - 1] in '_:'):
        i -= 1
    return i


def config_end(m, p):
    """Index of the '>>>' closing the configuration that starts at p (outside brackets)."""
    depth = 0
    for i in range(p, len(m)):
        if m[i] in '([{':
            depth += 1
        elif m[i] in ')]}':
            depth -= 1
        elif depth == 0 and m.startswith('>>>', i):
            return i
    sys.exit('launch.py: unterminated <<<')


def rewrite(src, path):
    m = code_mask(src)
    out, last = [], 0
    for hit in re.finditer('<<<', m):
        p = hit.start()
        if p < last:
            continue
        s, e = kernel_start(m, p), config_end(m, p + 3)
        if s == p:
            sys.exit('%s:%d: launch.py: no kernel before <<<' % (path, src.count('\n', 0, p) + 1))
        name = ' '.join(src[s:p].split()).replace('\\', '')
        out += [src[last:s], 'kvq_emu_launch(%s, "%s", __FILE__, __LINE__, %s)' % (src[s:p].rstrip(), name, src[p + 3:e])]
        last = e + 3
    out.append(src[last:])
    src = ''.join(out)

    def dyn_shared(mt):
        t = re.sub(r'__align__\s*\(\s*\d+\s*\)', '', mt.group(1)).strip()
        return '%s *const %s = static_cast<%s *>(kvq_emu::dynamic_shared());%s' % (
            t, mt.group(2), t, '\n' * mt.group(0).count('\n'))
    m = code_mask(src)
    out, last = [], 0
    for mt in re.finditer(r'\bextern\s+__shared__\b([^;]*?)\b(\w+)\s*\[\s*\]\s*;', m):
        out += [src[last:mt.start()], dyn_shared(re.match(r'extern\s+__shared__\b(.*?)\b(\w+)\s*\[\s*\]\s*;',
                                                         src[mt.start():mt.end()], re.S))]
        last = mt.end()
    out.append(src[last:])
    src = ''.join(out)
    src = re.sub(r'(?m)^[ \t]*#[ \t]*pragma[ \t]+unroll\b.*$', '', src)
    return '#include "cuda_runtime.h"\n#line 1 "%s"\n%s' % (path, src)


if __name__ == '__main__':
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    with open(sys.argv[1]) as f:
        text = f.read()
    with open(sys.argv[2], 'w') as f:
        f.write(rewrite(text, sys.argv[1]))
