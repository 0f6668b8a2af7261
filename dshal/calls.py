"""Validated, normalised calls handed to a backend's run hooks.

dshal checks every argument before a backend sees it: a backend receives one of these records
with arrays already converted to its ``array_kind`` and every option resolved (``scale`` is a
float, ``precision`` is never ``"auto"``...). Arrays may be non-contiguous.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True, eq=False)
class AttentionCall:
    """``sparse_attention``: q [B,Hq,Lq,D], k [B,Hkv,Lk,D], v [B,Hkv,Lk,Dv].

    ``top_k`` is ``None``, an ``int`` count (>= 0) or a ``float`` fraction in (0, 1];
    ``indices`` is ``None`` or an int64 array [B,Hkv,Lq,n] already range-checked (-1 = ignore).
    """

    q: Any
    k: Any
    v: Any
    top_k: int | float | None
    block_size: int
    window: int
    causal: bool
    scale: float
    indices: Any | None
    return_indices: bool
    return_lse: bool


@dataclass(frozen=True, eq=False)
class QuantizeCall:
    """``quantize``: x [..., K]; precision is one of :data:`dshal.dtypes.PRECISIONS`."""

    x: Any
    precision: str
    granularity: str
    group_size: int


@dataclass(frozen=True, eq=False)
class GemmCall:
    """``gemm``: a [..., M, K] @ b [K, N] (+ bias [N]) -> [..., M, N] in ``out_dtype``.

    ``precision`` is concrete (never ``"auto"``). For quantised precisions ``a``/``b`` are
    either float arrays to quantise on the fly (``a_scale``/``b_scale`` are ``None``) or
    already-quantised storage arrays with their scales, shaped as ``dshal.ops.gemm`` documents.
    """

    a: Any
    b: Any
    precision: str
    a_scale: Any | None
    b_scale: Any | None
    group_size: int
    bias: Any | None
    out_dtype: str


@dataclass(frozen=True, eq=False)
class GatedCall:
    """``gated_channels``: x [..., C] or [..., Cin] with weight [Cout, Cin] (+ bias [Cout]).

    ``keep`` is ``None``, an ``int`` count or a ``float`` fraction in (0, 1]; ``gate_logits``
    is [C_out] (static) or ``x.shape[:-1] + [C_out]`` (per row).
    """

    x: Any
    gate_logits: Any
    weight: Any | None
    bias: Any | None
    mode: str
    threshold: float
    keep: int | float | None
    return_mask: bool
