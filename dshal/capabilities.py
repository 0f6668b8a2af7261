"""Capabilities are data: what a backend declares, what a call needs, and the reasons they differ.

A backend declares a :class:`BackendSpec` (identity, plugin API range, devices served, priority and
one :class:`OpCapability` per operator). Every call is summarised by a :class:`Signature` (op,
library, device, dtypes, the features it uses and the sizes that limits apply to). The generic
refusal reasons come from comparing the two in :func:`capability_reasons`; a backend may add finer
ones through the ``dshal_call_check`` hook. Every reason states the actual value against the
allowed one, e.g. ``dtype q=float64 (supported: bfloat16, float16, float32)``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

#: version of the plugin API this dshal provides (see :mod:`dshal.hookspec`)
PLUGIN_API_VERSION = 2
#: the oldest plugin API a plugin may still declare: an API-1 plugin keeps loading and simply
#: does not serve what API 2 added
OLDEST_PLUGIN_API = 1

OPS = ("sparse_attention", "gemm", "quantize", "gated_channels", "sparse_attention_backward")

#: the plugin API that introduced an operator (operators not listed: API 1); a plugin that
#: declares one must support that API
OP_SINCE: Mapping[str, int] = MappingProxyType({"sparse_attention_backward": 2})

#: features a call may use, per operator; a backend lists the ones it supports
FEATURES: Mapping[str, frozenset[str]] = MappingProxyType(
    {
        "sparse_attention": frozenset(
            {"top_k", "indices", "window", "causal", "gqa", "cross_length", "return_indices",
             "return_lse", "varlen", "paged", "block_keys"}
        ),
        "gemm": frozenset({"bias", "batched", "prequantized", "auto"}),
        "quantize": frozenset({"row", "block", "tensor"}),
        "gated_channels": frozenset(
            {"hard", "soft", "soft_hard", "keep", "weight", "bias", "row_gates", "return_mask"}
        ),
        # the backward of sparse_attention (plugin API 2): "indices" = the forward's selection
        # is given, "grad_lse" = the lse output was used and carries a gradient
        "sparse_attention_backward": frozenset(
            {"indices", "window", "causal", "gqa", "cross_length", "grad_lse"}
        ),
    }
)

#: the serving and training forms of sparse_attention (DESIGN 3.1a): ragged batches
#: (``cu_seqlens_q``/``cu_seqlens_k``), a paged KV cache (``block_table`` + ``seqlens_k``) and
#: per-block key summaries (``block_keys``). They are features of plugin API 2: a plugin whose
#: declared API range stops at 1 is refused them whatever its feature set says
SERVING_FEATURES = frozenset({"varlen", "paged", "block_keys"})
SERVING_API = 2

#: DLPack device type codes (dlpack.h ``DLDeviceType``)
DLPACK_DEVICE_TYPES: Mapping[int, str] = MappingProxyType(
    {1: "cpu", 2: "cuda", 3: "cuda_host", 4: "opencl", 7: "vulkan", 8: "metal", 9: "vpi",
     10: "rocm", 11: "rocm_host", 13: "cuda_managed", 14: "oneapi", 15: "webgpu", 16: "hexagon",
     17: "maia"}
)
CPU = 1


def device_type_name(code: int) -> str:
    """Readable name of a DLPack device type code (``1 -> "cpu"``)."""
    return DLPACK_DEVICE_TYPES.get(code, f"device_type_{code}")


def _frozen_map(m: Mapping | None) -> Mapping:
    return MappingProxyType(dict(m or {}))


@dataclass(frozen=True)
class OpCapability:
    """What a backend accepts for one operator.

    :param dtypes: input dtypes accepted (canonical names, e.g. ``"bfloat16"``, ``"int8"``).
    :param features: optional features supported (names from :data:`FEATURES`).
    :param precisions: gemm/quantize precisions supported (e.g. ``"bf16"``, ``"int8"``).
    :param auto_order: gemm only: the precisions ``auto`` walks by default, fastest first.
    :param limits: upper bounds on call sizes, e.g. ``{"head_dim": 256}``; a call whose size
        exceeds a limit is refused with a reason.
    :param deterministic: whether reruns are bitwise identical (verified by certification).
    """

    dtypes: frozenset[str]
    features: frozenset[str] = frozenset()
    precisions: frozenset[str] = frozenset()
    auto_order: tuple[str, ...] = ()
    limits: Mapping[str, int] = field(default_factory=dict)
    deterministic: bool = True

    def __post_init__(self) -> None:
        object.__setattr__(self, "dtypes", frozenset(self.dtypes))
        object.__setattr__(self, "features", frozenset(self.features))
        object.__setattr__(self, "precisions", frozenset(self.precisions))
        object.__setattr__(self, "auto_order", tuple(self.auto_order))
        object.__setattr__(self, "limits", _frozen_map(self.limits))


@dataclass(frozen=True)
class BackendSpec:
    """A backend's declaration, returned by its ``dshal_backend_declare`` hook.

    :param name: backend name; must equal the entry-point name in ``dshal.backends``.
    :param version: the plugin distribution's version.
    :param plugin_api: inclusive range ``(min, max)`` of dshal plugin API versions supported.
    :param device_types: DLPack device type codes whose arrays this backend serves.
    :param array_kind: the array library the backend computes on: ``"numpy"`` (host arrays),
        ``"torch"`` or ``"cupy"``; dshal converts inputs to it and results back.
    :param priority: higher wins in automatic selection among backends that accept a call.
    :param capabilities: one :class:`OpCapability` per supported operator.
    :param description: one line shown by ``dshal info``.
    """

    name: str
    version: str
    plugin_api: tuple[int, int]
    device_types: frozenset[int]
    array_kind: str
    priority: int
    capabilities: Mapping[str, OpCapability]
    description: str = ""

    def __post_init__(self) -> None:
        object.__setattr__(self, "device_types", frozenset(self.device_types))
        object.__setattr__(self, "capabilities", _frozen_map(self.capabilities))


@dataclass(frozen=True)
class DeviceInfo:
    """What a backend's device probe found.

    :param present: hardware is there and usable (not merely "the vendor package imports").
    :param name: device name, e.g. ``"NVIDIA H200"`` or ``"cpu (x86_64, 2 cores)"``.
    :param driver: driver/runtime identity, recorded in certificates.
    :param reason: when not present, why (shown by ``dshal info``).
    :param details: further facts (compute capability, memory...), shown by ``dshal info``.
    """

    present: bool
    name: str = ""
    driver: str = ""
    reason: str = ""
    details: Mapping[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        object.__setattr__(self, "details", _frozen_map(self.details))


@dataclass(frozen=True)
class Signature:
    """Everything about a call that decides which backend may run it (hashable: the cache key).

    :param op: operator name.
    :param library: caller's array library (``"numpy"``, ``"torch"``, ``"cupy"``, ``"dlpack"``).
    :param device: ``(dlpack_device_type, device_id)`` of the inputs.
    :param dtypes: ``(argument, dtype)`` pairs of the array arguments.
    :param features: features the call uses (names from :data:`FEATURES`).
    :param precision: gemm/quantize precision (``None`` for other ops).
    :param sizes: ``(name, value)`` pairs that backend limits apply to.
    """

    op: str
    library: str
    device: tuple[int, int]
    dtypes: tuple[tuple[str, str], ...]
    features: frozenset[str] = frozenset()
    precision: str | None = None
    sizes: tuple[tuple[str, int], ...] = ()

    def describe(self) -> str:
        """One line naming the call, for error messages and ``explain``."""
        dtypes = ", ".join(f"{a}={d}" for a, d in self.dtypes)
        parts = [f"{self.op}({dtypes})", f"on {device_type_name(self.device[0])}:{self.device[1]}"]
        if self.precision:
            parts.append(f"precision={self.precision}")
        if self.features:
            parts.append("features=" + ",".join(sorted(self.features)))
        return " ".join(parts)


def _allowed(values) -> str:
    return ", ".join(sorted(values)) or "none"


def served_features(spec: BackendSpec, op: str) -> frozenset[str]:
    """The features of ``op`` that ``spec`` serves: its declared ones, less the serving forms
    when its plugin API range stops before :data:`SERVING_API`."""
    cap = spec.capabilities.get(op)
    if cap is None:
        return frozenset()
    return cap.features if spec.plugin_api[1] >= SERVING_API else cap.features - SERVING_FEATURES


def capability_reasons(spec: BackendSpec, sig: Signature) -> list[str]:
    """The generic reasons ``spec`` refuses ``sig`` (empty when it accepts).

    Pure: no device queries; device facts arrive through the probe's :class:`DeviceInfo`.
    """
    reasons: list[str] = []
    if sig.device[0] not in spec.device_types:
        served = ", ".join(sorted(device_type_name(d) for d in spec.device_types))
        reasons.append(f"device={device_type_name(sig.device[0])} (serves: {served})")
    cap = spec.capabilities.get(sig.op)
    if cap is None:
        reasons.append(f"op={sig.op} not implemented (implements: {_allowed(spec.capabilities)})")
        return reasons
    for arg, dtype in sig.dtypes:
        if dtype not in cap.dtypes:
            reasons.append(f"dtype {arg}={dtype} (supported: {_allowed(cap.dtypes)})")
    if sig.precision is not None and sig.precision not in cap.precisions:
        reasons.append(f"precision={sig.precision} (supported: {_allowed(cap.precisions)})")
    missing = sig.features - cap.features
    serving = sig.features & SERVING_FEATURES - missing
    if serving and spec.plugin_api[1] < SERVING_API:
        reasons.append(f"features {_allowed(serving)} need plugin API {SERVING_API} (the "
                       f"plugin declares {spec.plugin_api[0]}..{spec.plugin_api[1]})")
    if missing:
        reasons.append(
            f"features {_allowed(missing)} not supported (supported: {_allowed(cap.features)})"
        )
    for name, value in sig.sizes:
        limit = cap.limits.get(name)
        if limit is not None and value > limit:
            reasons.append(f"{name}={value} exceeds the limit {limit}")
    return reasons
