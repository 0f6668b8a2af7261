"""The ``opencl`` backend plugin: declaration, device probe, call check and the run hooks.

Entry point: ``opencl = "dshal_opencl.plugin"`` in the group ``dshal.backends``. It serves host
arrays (numpy, torch on the CPU: DLPack device type 1) and manages device buffers itself: inputs
are copied to the OpenCL device, results copied back. Priority -10: below the numpy backend,
which is faster on the same CPU for attention (see docs/backends/opencl.md), so the backend
runs when forced (``backend="opencl"``, ``use_backend``, ``DSHAL_BACKEND=opencl``).
"""

from __future__ import annotations

from typing import Any

from dshal.calls import AttentionBackwardCall, AttentionCall, GatedCall, GemmCall, QuantizeCall
from dshal.capabilities import (
    CPU,
    FEATURES,
    BackendSpec,
    DeviceInfo,
    OpCapability,
    Signature,
)
from dshal.dtypes import PRECISIONS, QUANT_DTYPES
from dshal.hookspec import hookimpl
from dshal_kernels.host import RUNNERS
from dshal_kernels.host.gemm import int8_k_reasons
from dshal_opencl import __version__

NAME = "opencl"
FLOATS = frozenset({"float16", "bfloat16", "float32"})
#: largest head dim: q and the accumulators of one head live in a work-item's registers
MAX_HEAD_DIM = 256


@hookimpl
def dshal_backend_declare() -> BackendSpec:
    """Every operator and feature on float16/bfloat16/float32 (plus fp8/int8 gemm inputs),
    with the varlen, paged and block_keys forms of plugin API 2 (one launch per stage for the
    whole call, dshal_kernels.host.forms: a decode given block_keys reads only the keys it
    attends); the backward of sparse_attention (plugin API 2) with every feature."""

    def cap(op: str, dtypes=FLOATS, precisions=(), auto_order=(), limits=None) -> OpCapability:
        return OpCapability(dtypes=dtypes, features=FEATURES[op],
                            precisions=precisions, auto_order=auto_order, limits=limits or {},
                            deterministic=True)

    return BackendSpec(
        name=NAME,
        version=__version__,
        plugin_api=(1, 2),
        device_types=frozenset({CPU}),
        array_kind="numpy",
        priority=-10,
        capabilities={
            "sparse_attention": cap("sparse_attention", limits={"head_dim": MAX_HEAD_DIM}),
            # every precision runs on fp32 FMAs here: low precision is not faster, so auto
            # takes fp32 unless the caller passes candidates
            "gemm": cap("gemm", FLOATS | frozenset(QUANT_DTYPES), PRECISIONS, ("fp32",)),
            "quantize": cap("quantize", precisions=PRECISIONS),
            "gated_channels": cap("gated_channels"),
            "sparse_attention_backward": cap("sparse_attention_backward",
                                             limits={"head_dim": MAX_HEAD_DIM}),
        },
        description="OpenCL 1.2+ devices through pyopencl: portable single-source kernels",
    )


@hookimpl
def dshal_device_probe() -> DeviceInfo:
    """The OpenCL device this process would use, and every platform and device seen."""
    import os

    try:
        import pyopencl  # noqa: F401
    except ImportError as exc:
        return DeviceInfo(present=False, reason=f"pyopencl cannot be imported: {exc}")
    from dshal_opencl import cache
    from dshal_opencl.device import ENV, choose, enumerate_devices, probe_details
    from dshal_opencl.errors import DeviceSelectionError

    found = enumerate_devices()
    try:
        chosen = choose(found, os.environ.get(ENV))
    except DeviceSelectionError as exc:
        return DeviceInfo(present=False, reason=str(exc), details=probe_details(found, None))
    details = probe_details(found, chosen)
    details["program cache"] = (str(cache.cache_root() / "opencl") if cache.enabled()
                                else "off (DSHAL_KERNEL_CACHE=off)")
    return DeviceInfo(present=True, name=chosen.device.name.strip(),
                      driver=f"{chosen.platform.name.strip()} {chosen.platform.version.strip()}"
                             f"; driver {chosen.device.driver_version.strip()}",
                      details=details)


@hookimpl
def dshal_call_check(signature: Signature, device: DeviceInfo) -> list[str]:
    """int8 gemm sums exactly in int32 only up to K = 131071
    (:data:`dshal_kernels.host.gemm.INT8_MAX_K`)."""
    return int8_k_reasons(signature)


def _run(op: str, call: Any) -> Any:
    """Run ``op`` through its shared launch sequence in one device session."""
    from dshal_opencl.device import Runtime

    with Runtime.get().session(op) as s:
        return RUNNERS[op](s, call)


@hookimpl
def dshal_sparse_attention_run(call: AttentionCall) -> tuple[Any, Any, Any]:
    return _run("sparse_attention", call)


@hookimpl
def dshal_sparse_attention_backward_run(call: AttentionBackwardCall) -> tuple[Any, Any, Any]:
    return _run("sparse_attention_backward", call)


@hookimpl
def dshal_quantize_run(call: QuantizeCall) -> tuple[Any, Any]:
    return _run("quantize", call)


@hookimpl
def dshal_gemm_run(call: GemmCall) -> Any:
    return _run("gemm", call)


@hookimpl
def dshal_gated_channels_run(call: GatedCall) -> tuple[Any, Any]:
    return _run("gated_channels", call)
