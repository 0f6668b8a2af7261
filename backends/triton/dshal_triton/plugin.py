"""The ``triton`` backend plugin: declaration, device probe, call check and the run hooks.

Entry point: ``triton = "dshal_triton.plugin"`` in the group ``dshal.backends``. It serves
torch tensors on the devices Triton compiles for (CUDA, ROCm, XPU, Ascend NPUs with
triton-ascend) at priority 60: above the cuda/rocm backends (50, whose scalar portable kernels
serve CuPy arrays; torch callers are refused there by nothing, so the order decides) and the
torch backend (-5). With ``DSHAL_TRITON_INTERPRET=1`` it serves torch CPU tensors only, under
Triton's interpreter, at priority -20 (below numpy and torch: it is for certification, taken
when forced). This module imports neither torch nor triton; the probe and run hooks do.
"""

from __future__ import annotations

from typing import Any

from dshal.arrays import TORCH_DEVICE_TYPES
from dshal.calls import AttentionCall, GatedCall, GemmCall, QuantizeCall
from dshal.capabilities import CPU, FEATURES, BackendSpec, DeviceInfo, OpCapability, Signature
from dshal.dtypes import PRECISIONS, STORAGE_DTYPE
from dshal.hookspec import hookimpl
from dshal_triton import __version__, device, mode

NAME = "triton"
PRIORITY = {"gpu": 60, "interpreter": -20}
#: cuda, ROCm (torch calls it cuda), xpu, npu
GPU_TYPES = frozenset({TORCH_DEVICE_TYPES["cuda"], 10, TORCH_DEVICE_TYPES["xpu"],
                       TORCH_DEVICE_TYPES["npu"]})
FLOATS = frozenset({"float16", "bfloat16", "float32"})
#: the largest head dimension one attention tile holds
MAX_HEAD_DIM = 256
#: gemm's ``auto`` order, fastest first: tensor-core formats before fp32
AUTO_ORDER = ("fp8_e4m3", "int8", "bf16", "fp16", "tf32", "fp32")


def capabilities() -> dict[str, OpCapability]:
    """Every operator and feature on float16, bfloat16 and float32 (fp8/int8 gemm inputs too);
    per-architecture limits are refusals (:func:`dshal_triton.device.refusals`)."""
    storage = frozenset(STORAGE_DTYPE.values())

    def cap(op: str, dtypes: frozenset[str] = FLOATS, **kw: Any) -> OpCapability:
        return OpCapability(dtypes=dtypes, features=FEATURES[op], deterministic=True, **kw)

    return {
        "sparse_attention": cap("sparse_attention", limits={"head_dim": MAX_HEAD_DIM}),
        "gemm": cap("gemm", FLOATS | storage, precisions=frozenset(PRECISIONS),
                    auto_order=AUTO_ORDER),
        "quantize": cap("quantize", precisions=frozenset(PRECISIONS)),
        "gated_channels": cap("gated_channels"),
    }


@hookimpl
def dshal_backend_declare() -> BackendSpec:
    interp = mode.interpreting()
    return BackendSpec(
        name=NAME,
        version=__version__,
        plugin_api=(1, 1),
        device_types=frozenset({CPU}) if interp else GPU_TYPES,
        array_kind="torch",
        priority=PRIORITY["interpreter" if interp else "gpu"],
        capabilities=capabilities(),
        description="Triton tensor-core kernels (CUDA, ROCm, XPU, Ascend)" + (
            "; now under Triton's interpreter on CPU tensors" if interp else ""),
    )


@hookimpl
def dshal_device_probe() -> DeviceInfo:
    """A GPU that runs a tiny Triton kernel (see :mod:`dshal_triton.device`)."""
    return device.probe()


@hookimpl
def dshal_call_check(signature: Signature, device: DeviceInfo) -> list[str]:
    """Refuse non-torch callers and what the device's architecture lacks."""
    from dshal_triton.device import refusals

    return refusals(signature, device)


@hookimpl
def dshal_sparse_attention_run(call: AttentionCall) -> tuple[Any, Any, Any]:
    from dshal_triton.attention import sparse_attention

    return sparse_attention(call)


@hookimpl
def dshal_quantize_run(call: QuantizeCall) -> tuple[Any, Any]:
    from dshal_triton.quantize import quantize

    return quantize(call)


@hookimpl
def dshal_gemm_run(call: GemmCall) -> Any:
    from dshal_triton.gemm import gemm

    return gemm(call)


@hookimpl
def dshal_gated_channels_run(call: GatedCall) -> tuple[Any, Any]:
    from dshal_triton.gated import gated_channels

    return gated_channels(call)
