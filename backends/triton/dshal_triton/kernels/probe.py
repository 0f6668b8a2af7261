"""The probe's kernel: the smallest kernel that proves compile and launch work."""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def add_one_kernel(x, y, n, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    m = offs < n
    tl.store(y + offs, tl.load(x + offs, mask=m) + 1.0, mask=m)
