"""The ``numpy`` backend plugin: declaration, device probe and the four run hooks.

Entry point: ``numpy = "dshal.backends.numpy.plugin"`` in the group ``dshal.backends``. It serves
host (DLPack CPU) arrays, computes on numpy arrays and is the host fallback of dispatch.
"""

from __future__ import annotations

import os
import platform
from typing import Any

from dshal.backends.numpy import attention, backward, decode, forms, gating, gemm, native
from dshal.calls import AttentionBackwardCall, AttentionCall, GatedCall, GemmCall, QuantizeCall
from dshal.capabilities import CPU, FEATURES, BackendSpec, DeviceInfo, OpCapability
from dshal.dtypes import FLOAT_DTYPES, PRECISIONS, QUANT_DTYPES
from dshal.hookspec import hookimpl

NAME = "numpy"


def _version() -> str:
    try:
        from dshal import __version__

        return __version__
    except ImportError:  # pragma: no cover - dshal always has one
        return "0.1.0"


@hookimpl
def dshal_backend_declare() -> BackendSpec:
    """Every operator, every feature (the 3.1a forms of plugin API 2 included),
    float16..float64 (plus fp8/int8 gemm inputs); the backward of sparse_attention
    (plugin API 2) on float16..float32 where its compiled kernel is built."""
    floats = frozenset(FLOAT_DTYPES)

    def cap(op: str, dtypes=floats, precisions=(), auto_order=()) -> OpCapability:
        return OpCapability(dtypes=dtypes, features=FEATURES[op], precisions=precisions,
                            auto_order=auto_order, deterministic=True)

    capabilities = {
        "sparse_attention": cap("sparse_attention"),
        # fp32 alone for auto: emulated low precision is not faster on a CPU
        "gemm": cap("gemm", floats | frozenset(QUANT_DTYPES), PRECISIONS, ("fp32",)),
        "quantize": cap("quantize", precisions=PRECISIONS),
        "gated_channels": cap("gated_channels"),
    }
    if native.ATTENTION is not None:  # float32 kernel: float64 is left to a float64 backend
        capabilities["sparse_attention_backward"] = cap("sparse_attention_backward",
                                                        floats - {"float64"})
    return BackendSpec(
        name=NAME,
        version=_version(),
        plugin_api=(1, 2),
        device_types=frozenset({CPU}),
        array_kind="numpy",
        priority=0,
        capabilities=capabilities,
        description="built-in CPU backend on numpy and its BLAS",
    )


def _blas() -> str:
    try:
        import numpy as np

        config = np.show_config(mode="dicts")
        blas = config["Build Dependencies"]["blas"]
        return f"{blas.get('name', 'unknown')} {blas.get('version', '')}".strip()
    except Exception:  # older numpy, or a build without the information
        return "unknown"


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


@hookimpl
def dshal_device_probe() -> DeviceInfo:
    """The host CPU is always there."""
    import numpy as np

    cores = os.cpu_count() or 1
    name = f"cpu ({platform.machine() or 'unknown'}, {cores} cores)"
    try:
        import threadpoolctl  # noqa: F401

        threads = "one per CPU or DSHAL_NUM_THREADS (BLAS held to one thread meanwhile)"
    except ImportError:
        threads = "one (install threadpoolctl to use every CPU)"
    return DeviceInfo(present=True, name=name, driver=f"numpy {np.__version__}, BLAS: {_blas()}",
                      details={"processor": _cpu_model(), "attention threads": threads,
                               "quantize and rounding": native.STATUS,
                               "int8 gemm products": native.INT8_STATUS,
                               "attention kernels (float32)": native.ATTENTION_STATUS,
                               "serving decode": decode.STATUS})


@hookimpl
def dshal_sparse_attention_run(call: AttentionCall) -> tuple[Any, Any, Any]:
    if forms.uses_forms(call):
        return forms.sparse_attention(call)
    return attention.sparse_attention(call)


@hookimpl
def dshal_sparse_attention_backward_run(call: AttentionBackwardCall) -> tuple[Any, Any, Any]:
    return backward.sparse_attention_backward(call)


@hookimpl
def dshal_quantize_run(call: QuantizeCall) -> tuple[Any, Any]:
    return gemm.quantize(call)


@hookimpl
def dshal_gemm_run(call: GemmCall) -> Any:
    return gemm.gemm(call)


@hookimpl
def dshal_gated_channels_run(call: GatedCall) -> tuple[Any, Any]:
    return gating.gated_channels(call)
