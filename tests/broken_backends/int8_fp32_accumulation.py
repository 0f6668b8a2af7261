"""int8 gemm accumulated in float32: the storage values converted to float32, scaled and
multiplied by float32 BLAS over the whole depth (sums beyond 2**24 round)."""

import numpy as np

from dshal import reference
from dshal.hookspec import hookimpl
from tests.broken_backends._base import Wrapped


class Int8Fp32Accumulation(Wrapped):
    """int8 products accumulated in float32"""

    name = "bb_int8_fp32_accumulation"

    @hookimpl
    def dshal_gemm_run(self, call):
        if call.precision != "int8" or call.a.dtype != np.int8 or call.b.dtype != np.int8:
            return super().dshal_gemm_run(call)
        a, b = reference.gemm_operands(call.a, call.b, "int8", a_scale=call.a_scale,
                                       b_scale=call.b_scale, group_size=call.group_size)
        out = a.astype(np.float32) @ b.astype(np.float32)  # the bug: float32 sums
        if call.bias is not None:
            out = out + np.asarray(call.bias, np.float32)
        return out.astype(call.out_dtype)


plugin = Int8Fp32Accumulation()
