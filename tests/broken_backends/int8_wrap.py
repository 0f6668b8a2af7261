"""int8 gemm accumulated in 16-bit integers: long sums of large products wrap around."""

import numpy as np

from dshal.backends.numpy.gemm import quantize_values
from dshal.hookspec import hookimpl
from tests.broken_backends._base import Wrapped


def _groups_a(scale, shape, gk):
    """a's scale (None, scalar, per row or per group) as [..., M, gk]."""
    return np.broadcast_to(np.asarray(1.0 if scale is None else scale, np.float64),
                           (*shape[:-1], gk))


def _groups_b(scale, n, gk, g):
    """b's scale (None, scalar, per column or per block) as [gk, N]."""
    s = np.asarray(1.0 if scale is None else scale, np.float64)
    if s.ndim == 2 and s.shape[1] != n:  # per block: expand the columns
        s = s[:, np.arange(n) // g]
    return np.broadcast_to(s, (gk, n))


class Int8Wrap(Wrapped):
    """int8 accumulation overflow (16-bit accumulator)"""

    name = "bb_int8_wrap"

    @hookimpl
    def dshal_gemm_run(self, call):
        if call.precision != "int8":
            return super().dshal_gemm_run(call)
        g = call.group_size
        a, b, sa, sb = call.a, call.b, call.a_scale, call.b_scale
        if a.dtype != np.int8:
            a, sa = quantize_values(np.asarray(a), "int8", "row", g)
        if b.dtype != np.int8:
            b, sb = quantize_values(np.asarray(b), "int8", "block", g)
        K, N = b.shape
        gk = max(1, -(-K // g))
        sa, sb = _groups_a(sa, a.shape, gk), _groups_b(sb, N, gk, g)
        out = np.zeros((*a.shape[:-1], N))
        for gi, k0 in enumerate(range(0, K, g)):
            part = a[..., k0:k0 + g].astype(np.int16) @ b[k0:k0 + g].astype(np.int16)  # wraps
            out += part * sa[..., gi, None] * sb[gi]
        if call.bias is not None:
            out += np.asarray(call.bias, np.float64)
        return out.astype(call.out_dtype)


plugin = Int8Wrap()
