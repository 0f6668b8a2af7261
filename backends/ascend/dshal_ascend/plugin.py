"""The ``ascend`` backend plugin: Ascend NPUs through torch_npu, on dshal-torch's generic path.

Entry point: ``ascend = "dshal_ascend.plugin"`` in the group ``dshal.backends``. It serves
torch ``npu`` tensors (device type 1001) at priority 20, above the ``torch`` backend (-5),
which serves them too. Its run hooks *are* :mod:`dshal_torch.plugin`'s (imported, so pluggy
registers them here): every operator runs the same torch primitives; no NPU fused kernel is
used (see docs/backends/ascend.md for why). With ``DSHAL_ASCEND_DEVICE=cpu`` it serves torch
CPU tensors instead (priority -20, so automatic dispatch never prefers it): the documented
way to certify the generic path on a machine without an NPU.

Declared: float16, bfloat16, float32 and the precisions fp32, tf32, bf16, fp16 and int8 —
not float64 (Ascend's AI cores have no float64 units; such ops, where they exist, run on the
AI CPU) and not fp8 (the float8 dtypes are not supported across torch_npu versions and
chips). The CPU mode declares the same, so its certificate covers exactly the NPU
declaration.
"""

from __future__ import annotations

from dshal.arrays import TORCH_DEVICE_TYPES
from dshal.capabilities import CPU, BackendSpec, DeviceInfo
from dshal.hookspec import hookimpl
from dshal_ascend import __version__, device
from dshal_torch.plugin import (
    capabilities,
    dshal_gated_channels_run,
    dshal_gemm_run,
    dshal_quantize_run,
    dshal_sparse_attention_backward_run,
    dshal_sparse_attention_run,
)

__all__ = ["dshal_backend_declare", "dshal_device_probe", "dshal_gated_channels_run",
           "dshal_gemm_run", "dshal_quantize_run", "dshal_sparse_attention_backward_run",
           "dshal_sparse_attention_run"]

NAME = "ascend"
NPU = TORCH_DEVICE_TYPES["npu"]
FLOATS = ("float16", "bfloat16", "float32")
PRECISIONS = ("fp32", "tf32", "bf16", "fp16", "int8")
#: priority by mode: above the torch backend on the NPU, below every backend on the CPU
PRIORITY = {"npu": 20, "cpu": -20}


@hookimpl
def dshal_backend_declare() -> BackendSpec:
    """Every operator on float16/bfloat16/float32, on the NPU (or the CPU in cpu mode)."""
    cpu = device.mode() == "cpu"
    return BackendSpec(
        name=NAME,
        version=__version__,
        plugin_api=(1, 2),
        device_types=frozenset({CPU if cpu else NPU}),
        array_kind="torch",
        priority=PRIORITY["cpu" if cpu else "npu"],
        capabilities=capabilities(FLOATS, PRECISIONS),
        description="Huawei Ascend NPUs via torch_npu (generic torch path)"
                    + (f"; {device.ENV}=cpu: on torch CPU tensors" if cpu else ""),
    )


@hookimpl
def dshal_device_probe() -> DeviceInfo:
    """An NPU through torch_npu (or the CPU in cpu mode); see :mod:`dshal_ascend.device`."""
    return device.probe()
