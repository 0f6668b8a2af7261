"""The ``torch`` backend plugin: declaration, device probe, call check and the run hooks.

Entry point: ``torch = "dshal_torch.plugin"`` in the group ``dshal.backends``. It serves torch
tensors on every torch device type (DLPack codes of :data:`dshal.arrays.TORCH_DEVICE_TYPES`,
ROCm as 10) and computes on them where they are. Priority -5: below the numpy backend (0), so
host arrays and CPU tensors go to numpy by default, and below the dedicated GPU backends
(about 50), so the torch backend is the generic path for every device they do not serve or
refuse. This module imports torch only inside the run hooks.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from dshal.arrays import TORCH_DEVICE_TYPES
from dshal.calls import AttentionBackwardCall, AttentionCall, GatedCall, GemmCall, QuantizeCall
from dshal.capabilities import FEATURES, BackendSpec, DeviceInfo, OpCapability, Signature
from dshal.dtypes import FLOAT_DTYPES, PRECISIONS, QUANTIZED_PRECISIONS, STORAGE_DTYPE
from dshal.hookspec import hookimpl
from dshal_torch import __version__, device

NAME = "torch"
PRIORITY = -5
#: every torch device type but ``meta`` (no data), plus ROCm (torch calls it "cuda")
DEVICE_TYPES = frozenset({code for kind, code in TORCH_DEVICE_TYPES.items() if kind != "meta"}
                         | {10})


def capabilities(floats: Iterable[str] = FLOAT_DTYPES,
                 precisions: Iterable[str] = PRECISIONS) -> dict[str, OpCapability]:
    """Every operator and feature on ``floats`` (float16 to float64 by default) and, for gemm
    and quantize, ``precisions`` (gemm also takes their fp8/int8 storage dtypes). ``auto``
    walks fp32 alone: every precision here runs as an fp32 matmul (after rounding or
    dequantising), so a lower one is never faster. With the backward of sparse_attention
    (plugin API 2)."""
    floats, precisions = frozenset(floats), frozenset(precisions)
    storage = frozenset(STORAGE_DTYPE[p] for p in precisions if p in QUANTIZED_PRECISIONS)

    def cap(op: str, dtypes: frozenset[str] = floats, **kw: Any) -> OpCapability:
        return OpCapability(dtypes=dtypes, features=FEATURES[op], deterministic=True, **kw)

    return {
        "sparse_attention": cap("sparse_attention"),
        "gemm": cap("gemm", floats | storage, precisions=precisions, auto_order=("fp32",)),
        "quantize": cap("quantize", precisions=precisions),
        "gated_channels": cap("gated_channels"),
        "sparse_attention_backward": cap("sparse_attention_backward"),
    }


@hookimpl
def dshal_backend_declare() -> BackendSpec:
    """Every operator and feature, float16 to float64 (plus fp8/int8 gemm inputs)."""
    return BackendSpec(
        name=NAME,
        version=__version__,
        plugin_api=(1, 2),
        device_types=DEVICE_TYPES,
        array_kind="torch",
        priority=PRIORITY,
        capabilities=capabilities(),
        description="any PyTorch device: every operator in torch primitives",
    )


@hookimpl
def dshal_device_probe() -> DeviceInfo:
    """Present when torch is installed (see :mod:`dshal_torch.device`)."""
    return device.probe()


@hookimpl
def dshal_call_check(signature: Signature) -> list[str]:
    """Refuse what a device type cannot hold (MPS: float64, float8)."""
    return device.refusals(signature)


@hookimpl
def dshal_sparse_attention_run(call: AttentionCall) -> tuple[Any, Any, Any]:
    """dshal's torch attention (:mod:`dshal.torch.attention`), its float32 products in IEEE
    fp32 whatever TF32/HF32 settings the caller made."""
    from dshal.forms import uses_forms
    from dshal.torch.attention import sparse_attention
    from dshal.torch.forms import sparse_attention_forms
    from dshal_torch.numerics import ieee_fp32

    with ieee_fp32():
        return sparse_attention_forms(call) if uses_forms(call) else sparse_attention(call)


@hookimpl
def dshal_sparse_attention_backward_run(call: AttentionBackwardCall) -> tuple[Any, Any, Any]:
    """The torch-primitive backward (:func:`dshal.torch.attention.backward_call`): the
    portable one, on any torch device; float32 products in IEEE fp32."""
    from dshal.torch.attention import backward_call
    from dshal_torch.numerics import ieee_fp32

    with ieee_fp32():
        return backward_call(call)


@hookimpl
def dshal_quantize_run(call: QuantizeCall) -> tuple[Any, Any]:
    from dshal_torch.quantize import quantize

    return quantize(call)


@hookimpl
def dshal_gemm_run(call: GemmCall) -> Any:
    from dshal_torch.gemm import gemm

    return gemm(call)


@hookimpl
def dshal_gated_channels_run(call: GatedCall) -> tuple[Any, Any]:
    from dshal_torch.gated import gated_channels

    return gated_channels(call)
