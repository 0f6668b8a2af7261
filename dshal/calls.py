"""Validated, normalised calls handed to a backend's run hooks, and the count rule they share.

dshal checks every argument before a backend sees it: a backend receives one of these records
with arrays already converted to its ``array_kind`` and every option resolved (``scale`` is a
float, ``precision`` is never ``"auto"``...). Arrays may be non-contiguous. A record is built
for each call (a slotted dataclass: cheap to build, no stray attributes); a backend that needs
a variant makes one with :func:`dataclasses.replace`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

#: a fraction times a count that lies this little above an integer counts as that integer
FRACTION_SLACK = 1e-9


@dataclass(eq=False, slots=True)
class AttentionCall:
    """``sparse_attention``: q [B,Hq,Lq,D], k [B,Hkv,Lk,D], v [B,Hkv,Lk,Dv].

    ``top_k`` is ``None``, an ``int`` count (>= 0) or a ``float`` fraction in (0, 1];
    ``indices`` is ``None`` or an int64 array [B,Hkv,Lq,n] already range-checked (-1 = ignore).

    The serving and training forms (DESIGN 3.1a; :mod:`dshal.forms` describes each sequence):
    ``cu_seqlens_q``/``cu_seqlens_k`` int64 [S+1] (varlen: q [1,Hq,Tq,D]; ``cu_seqlens_k`` is
    ``None`` when the keys are paged), ``block_table`` int64 [S or B, max_pages] with
    ``seqlens_k`` int64 [S or B] (paged: k/v are page pools [P,Hkv,page_size,D]) and
    ``block_keys`` (summaries in the layout of k's form). All are validated: cu_seqlens
    start at 0, never decrease and end at the packed lengths, the used pages lie in [0, P).
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
    # --- serving and training forms (DESIGN 3.1a) ---
    cu_seqlens_q: Any | None = None
    cu_seqlens_k: Any | None = None
    block_table: Any | None = None
    seqlens_k: Any | None = None
    block_keys: Any | None = None


@dataclass(eq=False, slots=True)
class QuantizeCall:
    """``quantize``: x [..., K]; precision is one of :data:`dshal.dtypes.PRECISIONS`."""

    x: Any
    precision: str
    granularity: str
    group_size: int


@dataclass(eq=False, slots=True)
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


@dataclass(eq=False, slots=True)
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


def resolve_count(spec: int | float, n: Any) -> Any:
    """How many of ``n`` items a ``top_k``/``keep`` value asks for.

    An int is a count (clipped to ``n``); a float in (0, 1] is a fraction of ``n`` rounded up:
    ``ceil(spec * n)`` computed in float64, except that a product within ``FRACTION_SLACK``
    (1e-9) above an integer counts as that integer (float64 gives ``0.07 * 100 = 7.000000000000001``
    but the caller means 7), and at least 1 when ``n > 0``. ``n`` may be an int or an integer
    array (then an int64 array of the same shape is returned). bool is rejected.
    """
    n_arr = np.asarray(n, dtype=np.int64)
    if isinstance(spec, (bool, np.bool_)):
        raise ValueError(f"a count or fraction must not be a bool, got {spec!r}")
    if isinstance(spec, (int, np.integer)):
        if spec < 0:
            raise ValueError(f"a count must be >= 0, got {spec}")
        k = np.minimum(n_arr, min(int(spec), np.iinfo(np.int64).max))  # 10**30 is valid
    elif isinstance(spec, (float, np.floating)):
        f = float(spec)
        if not 0.0 < f <= 1.0:
            raise ValueError(f"a fraction must be in (0, 1], got {f}")
        k = np.ceil(f * n_arr - FRACTION_SLACK)
        k = np.clip(k, np.minimum(n_arr, 1), n_arr).astype(np.int64)
    else:
        raise ValueError(f"a count must be an int or a float fraction, got {spec!r}")
    return int(k) if np.ndim(n) == 0 else k


def selection_width(Lq: int, Lk: int, block_size: int, causal: bool, top_k: int | float) -> int:
    """How many blocks the busiest query attends through ``top_k`` selection (its own block
    included): the width of the indices ``sparse_attention`` returns, from shapes alone."""
    nb = -(-Lk // block_size)
    if Lq == 0 or nb == 0:
        return 0
    p = np.arange(Lq) + (Lk - Lq)
    own = np.where((p >= 0) & (p < Lk), p // block_size, -1)
    n_cand = np.maximum(own, 0) if causal else np.where(own >= 0, nb - 1, nb)
    return int(np.max(resolve_count(top_k, n_cand) + (own >= 0)))


# --- backward of sparse_attention (plugin API 2) ----------------------------------------------


@dataclass(eq=False, slots=True)
class AttentionBackwardCall:
    """The backward of ``sparse_attention`` (DESIGN 3.1b): q [B,Hq,Lq,D], k [B,Hkv,Lk,D],
    v [B,Hkv,Lk,Dv], the forward's out [B,Hq,Lq,Dv] and lse [B,Hq,Lq] float32, grad_out
    [B,Hq,Lq,Dv]; grad_lse [B,Hq,Lq] float32 or ``None`` (lse unused). A backend may take
    ``rowsum(grad_out * out)`` as FlashAttention-2's delta, or recompute it from the
    probabilities (out is rounded to q's dtype).

    ``indices`` is the forward's selection, int64 [B,Hkv,Lq,n] already range-checked (-1 =
    ignore; duplicates count once, any order), or ``None`` when the forward selected nothing
    (then window or dense attention). ``scale`` is a float.
    """

    q: Any
    k: Any
    v: Any
    out: Any
    lse: Any
    grad_out: Any
    grad_lse: Any | None
    indices: Any | None
    block_size: int
    window: int
    causal: bool
    scale: float
