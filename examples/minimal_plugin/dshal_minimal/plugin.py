"""The ``minimal`` backend: ``gated_channels`` and int8 ``quantize`` on the host, plain numpy.

A complete dshal plugin is a module with hook implementations (``dshal.hookspec``): a
declaration of what it computes, a device probe, and one run hook per declared operator.
dshal validates every argument before a run hook sees it and refuses, with reasons, any call
outside the declaration, so the hooks below only compute.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from dshal.calls import GatedCall, QuantizeCall
from dshal.capabilities import CPU, BackendSpec, DeviceInfo, OpCapability
from dshal.hookspec import hookimpl

GATED = OpCapability(
    dtypes={"float32"},
    features={"hard", "soft", "soft_hard", "weight", "bias", "row_gates", "return_mask"},
    limits={"channels": 4096},
)
QUANTIZE = OpCapability(dtypes={"float32"}, features={"row", "tensor"}, precisions={"int8"})


@hookimpl
def dshal_backend_declare() -> BackendSpec:
    return BackendSpec(
        name="minimal", version="0.1.0", plugin_api=(1, 1), device_types={CPU},
        array_kind="numpy", priority=-1,
        capabilities={"gated_channels": GATED, "quantize": QUANTIZE},
        description="example plugin: gated_channels and int8 quantize in plain numpy")


@hookimpl
def dshal_device_probe() -> DeviceInfo:
    return DeviceInfo(present=True, name="host cpu", driver=f"numpy {np.__version__}")


def _sigmoid(z: np.ndarray) -> np.ndarray:
    e = np.exp(-np.abs(z))  # never overflows
    return np.where(z >= 0, 1 / (1 + e), e / (1 + e))


@hookimpl
def dshal_gated_channels_run(call: GatedCall) -> tuple[Any, Any]:
    z = np.asarray(call.gate_logits, np.float32)
    is_open = np.ones(z.shape, bool) if call.mode == "soft" else z > call.threshold
    gate = np.ones_like(z) if call.mode == "hard" else _sigmoid(z)
    x = np.asarray(call.x, np.float32)
    if call.weight is None:
        pre = x
    else:  # only channels open somewhere are computed: closed weight rows are never read
        c_out = call.weight.shape[0]
        cols = np.flatnonzero(is_open.reshape(-1, c_out).any(axis=0)) if is_open.size else []
        pre = np.zeros((*x.shape[:-1], c_out), np.float32)
        if len(cols):
            pre[..., cols] = x @ np.asarray(call.weight, np.float32)[cols].T
            if call.bias is not None:
                pre[..., cols] += np.asarray(call.bias, np.float32)[cols]
    with np.errstate(invalid="ignore"):
        y = np.where(is_open, gate * pre, np.float32(0))  # where, not *: NaN cannot leak
    return y.astype(np.float32), (is_open if call.return_mask else None)


@hookimpl
def dshal_quantize_run(call: QuantizeCall) -> tuple[Any, Any]:
    x = np.asarray(call.x, np.float32)
    g = call.group_size
    if call.granularity == "tensor":
        amax = np.abs(x).max() if x.size else np.float32(0)
        scales = _scale(np.asarray(amax, np.float32))
        full = scales
    else:  # "row": groups of g along the last axis
        k = x.shape[-1]
        n = -(-k // g)
        padded = np.zeros((*x.shape[:-1], n * g), np.float32)
        padded[..., :k] = np.abs(x)
        scales = _scale(padded.reshape(*x.shape[:-1], n, g).max(axis=-1, initial=0))
        full = np.repeat(scales, g, axis=-1)[..., :k]
    values = np.clip(np.rint(x / full), -127, 127).astype(np.int8)
    return values, scales


def _scale(amax: np.ndarray) -> np.ndarray:
    """float32 amax / 127, 1 where that is 0."""
    s = (amax / np.float32(127)).astype(np.float32)
    return np.where(s == 0, np.float32(1), s).astype(np.float32)
