"""The hook implementations of a CuPy backend, bound to one :class:`Vendor`.

A plugin module creates one instance and names it as its entry point's object, e.g.
``cuda = "dshal_cuda.plugin:hooks"``; pluggy registers the instance's marked methods. Run
hooks receive CuPy arrays on the backend's device (zero-copy from torch through DLPack) and
return CuPy arrays on that device; work goes to CuPy's current stream.
"""

from __future__ import annotations

from typing import Any

from dshal.calls import AttentionBackwardCall, AttentionCall, GatedCall, GemmCall, QuantizeCall
from dshal.capabilities import BackendSpec, DeviceInfo, Signature
from dshal.dtypes import QUANTIZED_PRECISIONS
from dshal.hookspec import hookimpl
from dshal_cupy.vendor import Vendor
from dshal_kernels.host import RUNNERS
from dshal_kernels.host.gemm import int8_k_reasons


def device_of(x: Any) -> int:
    """The device id of a CuPy array."""
    return int(x.device.id)


class CupyBackend:
    """dshal's hooks for the GPUs of ``vendor`` through CuPy."""

    def __init__(self, vendor: Vendor) -> None:
        self.vendor = vendor

    def __repr__(self) -> str:
        return f"CupyBackend({self.vendor.name})"

    @hookimpl
    def dshal_backend_declare(self) -> BackendSpec:
        """Every operator on float16/bfloat16/float32 (gemm also int8 storage)."""
        from dshal_cupy.capabilities import declare

        return declare(self.vendor)

    @hookimpl
    def dshal_device_probe(self) -> DeviceInfo:
        """The runtime's device count and every device's name, architecture and memory."""
        from dshal_cupy.device import probe

        return probe(self.vendor)

    @hookimpl
    def dshal_call_check(self, signature: Signature, device: DeviceInfo) -> list[str]:
        """int8 gemm sums exactly in int32 only up to K = 131071; bf16 gemm in cuBLAS needs
        compute capability 8.0."""
        from dshal_cupy.blas import arch_reasons

        reasons = int8_k_reasons(signature)
        if self.vendor.blas_low_precision:
            reasons += arch_reasons(signature, device)
        return reasons

    def _run(self, op: str, call: Any, like: Any) -> Any:
        from dshal_cupy.device import Runtime

        rt = Runtime.get(self.vendor, device_of(like))
        with rt.session(op) as s:
            if op == "gemm" and call.precision not in QUANTIZED_PRECISIONS:
                from dshal_cupy import blas

                return blas.gemm(s, call, self.vendor.blas_low_precision)
            return RUNNERS[op](s, call)

    @hookimpl
    def dshal_sparse_attention_run(self, call: AttentionCall) -> tuple[Any, Any, Any]:
        return self._run("sparse_attention", call, call.q)

    @hookimpl
    def dshal_sparse_attention_backward_run(self, call: AttentionBackwardCall
                                            ) -> tuple[Any, Any, Any]:
        return self._run("sparse_attention_backward", call, call.q)

    @hookimpl
    def dshal_quantize_run(self, call: QuantizeCall) -> tuple[Any, Any]:
        return self._run("quantize", call, call.x)

    @hookimpl
    def dshal_gemm_run(self, call: GemmCall) -> Any:
        return self._run("gemm", call, call.a)

    @hookimpl
    def dshal_gated_channels_run(self, call: GatedCall) -> tuple[Any, Any]:
        return self._run("gated_channels", call, call.x)
