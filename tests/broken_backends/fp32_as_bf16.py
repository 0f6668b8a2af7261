"""fp32 gemm silently computed from bf16-rounded operands (a "fast path" left on)."""

from dataclasses import replace

from dshal.hookspec import hookimpl
from tests.broken_backends._base import Wrapped


class Fp32AsBf16(Wrapped):
    """fp32 gemm silently computed in bf16"""

    name = "bb_fp32_as_bf16"

    @hookimpl
    def dshal_gemm_run(self, call):
        if call.precision == "fp32":
            call = replace(call, precision="bf16")
        return super().dshal_gemm_run(call)


plugin = Fp32AsBf16()
