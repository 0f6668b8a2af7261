"""Attention outputs rounded toward zero: the float32 result truncated to float16/bfloat16
(half of all outputs one ulp too small in magnitude, every one within the error bound)."""

from dataclasses import replace

import numpy as np

from dshal.hookspec import hookimpl
from tests.broken_backends._base import Wrapped
from tests.broken_backends._rounding import truncate


class TruncatedAttention(Wrapped):
    """attention output truncated instead of rounded to nearest even"""

    name = "bb_truncated_attention"

    @hookimpl
    def dshal_sparse_attention_run(self, call):
        dtype = str(call.q.dtype)
        if dtype not in ("float16", "bfloat16"):
            return super().dshal_sparse_attention_run(call)
        up = replace(call, **{n: np.asarray(getattr(call, n), np.float32) for n in "qkv"})
        out, sel, lse = super().dshal_sparse_attention_run(up)
        return truncate(out, dtype), sel, lse


plugin = TruncatedAttention()
