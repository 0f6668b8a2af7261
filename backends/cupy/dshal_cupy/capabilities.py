"""The declaration of a CuPy backend: what it computes, as data."""

from __future__ import annotations

from dshal.capabilities import FEATURES, BackendSpec, OpCapability
from dshal.dtypes import PRECISIONS
from dshal_cupy import __version__
from dshal_cupy.vendor import Vendor

FLOATS = frozenset({"float16", "bfloat16", "float32"})
#: largest head dim: q and the accumulators of one head live in a thread's registers
MAX_HEAD_DIM = 256
#: quantize precisions: every one but fp8, whose codes CuPy cannot hold (it has no float8
#: dtype, and its DLPack import refuses float8), so fp8 exists only inside a gemm
QUANTIZE_PRECISIONS = tuple(p for p in PRECISIONS if not p.startswith("fp8"))


def declare(vendor: Vendor) -> BackendSpec:
    """Every operator on float16/bfloat16/float32 CuPy arrays of ``vendor``'s devices (the
    backward of sparse_attention included, plugin API 2, and the varlen, paged and block_keys
    forms through the portable kernels' attn_seq_* launches, certified on OpenCL; their run
    on a GPU is not yet certified); gemm also takes int8 storage and every precision (fp8
    quantised on the fly from floats)."""

    def cap(op: str, dtypes=FLOATS, precisions=(), auto_order=(), limits=None) -> OpCapability:
        return OpCapability(dtypes=dtypes, features=FEATURES[op],
                            precisions=precisions, auto_order=auto_order, limits=limits or {},
                            deterministic=True)

    blas = "cuBLAS" if not vendor.hip else "hipBLAS"
    return BackendSpec(
        name=vendor.name,
        version=__version__,
        plugin_api=(1, 2),
        device_types=frozenset({vendor.device_type}),
        array_kind="cupy",
        priority=50,
        capabilities={
            "sparse_attention": cap("sparse_attention", limits={"head_dim": MAX_HEAD_DIM}),
            "gemm": cap("gemm", FLOATS | {"int8"}, PRECISIONS, vendor.auto_order),
            "quantize": cap("quantize", precisions=QUANTIZE_PRECISIONS),
            "gated_channels": cap("gated_channels"),
            "sparse_attention_backward": cap("sparse_attention_backward",
                                             limits={"head_dim": MAX_HEAD_DIM}),
        },
        description=f"{vendor.label} GPUs through CuPy: {blas} gemm, portable kernels "
                    "compiled at run time",
    )
