"""gemm outputs rounded toward zero: the float32 result truncated to float16/bfloat16."""

from dataclasses import replace

from dshal.hookspec import hookimpl
from tests.broken_backends._base import Wrapped
from tests.broken_backends._rounding import truncate


class TruncatedGemm(Wrapped):
    """gemm output truncated instead of rounded to nearest even"""

    name = "bb_truncated_gemm"

    @hookimpl
    def dshal_gemm_run(self, call):
        if call.out_dtype not in ("float16", "bfloat16"):
            return super().dshal_gemm_run(call)
        return truncate(super().dshal_gemm_run(replace(call, out_dtype="float32")),
                        call.out_dtype)


plugin = TruncatedGemm()
