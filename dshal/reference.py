"""The float64 reference ("oracle") for dshal's operators.

Every backend is certified against these functions, so they are written for clarity first and
follow DESIGN.md section 3 literally. They take numpy arrays (bfloat16 and float8 from
``ml_dtypes``), upcast the inputs *as given* to float64 (exact for every supported dtype) and
compute in float64. They are not the user API: :mod:`dshal.ops` validates arguments; the functions
here raise ``ValueError`` only for what they cannot compute.

Semantic decisions where DESIGN.md is silent (each is repeated at the function it concerns):

- A fraction ``f`` of ``n`` items (``top_k``, ``keep``) is ``ceil(f * n)`` with the float64
  product snapped down when it lies within 1e-9 above an integer (``0.07`` of 100 is 7, not 8),
  at least 1 when ``n > 0``, at most ``n``: :func:`resolve_count`.
- Selection scores that are not finite (NaN or +-inf, e.g. from NaN/Inf keys poisoning a block
  mean) rank after every finite score; among themselves, lower block index first.
- ``scale=None`` with head dimension ``D == 0`` uses ``scale = 1`` (1/sqrt(0) is undefined).
- Rounding to a float precision (fp32/tf32/bf16/fp16) and quantisation go through float32 first:
  a float64 input is rounded to float32 (nearest even), then to the target format. This is what
  ``ml_dtypes`` and ``torch`` do for float64 -> bfloat16/float16.
- quantize: a group whose float32 ``amax / qmax`` is 0 (``amax == 0``, or so small that it
  underflows) gets scale 1.
- gated_channels with ``keep``: ``threshold`` is ignored; NaN logits rank last but are opened when
  ``keep`` reaches them (e.g. ``keep`` = all channels).
"""

from __future__ import annotations

import math
from typing import Any

import ml_dtypes
import numpy as np

from dshal.calls import resolve_count
from dshal.dtypes import (
    FLOAT_DTYPES,
    PRECISION_OF_STORAGE,
    PRECISIONS,
    QMAX,
    QUANTIZED_PRECISIONS,
    ROUNDED_PRECISIONS,
)
from dshal.validate import ceil_div

__all__ = [
    "allowed_mask",
    "attention_candidates",
    "dequantize_a",
    "dequantize_b",
    "gate_open",
    "gate_values",
    "gated_channels",
    "gemm",
    "gemm_operands",
    "n_blocks",
    "normalize_indices",
    "own_block",
    "quantize",
    "resolve_count",
    "round_to_precision",
    "select_blocks",
    "selection_scores",
    "sigmoid",
    "sparse_attention",
    "summary_scores",
    "visible_mask",
    "window_mask",
]

_FP8_NUMPY = {"fp8_e4m3": ml_dtypes.float8_e4m3fn, "fp8_e5m2": ml_dtypes.float8_e5m2}


# --------------------------------------------------------------------------------------------
# small helpers


def _f64(x: Any) -> np.ndarray:
    """``x`` as a float64 array (exact for every float, fp8 and integer storage dtype)."""
    return np.asarray(x).astype(np.float64)


def sigmoid(z: Any) -> np.ndarray:
    """Numerically stable logistic function in float64 (no overflow for logits like +-1e4)."""
    z = _f64(z)
    e = np.exp(-np.abs(z))  # in (0, 1]: never overflows
    return np.where(z >= 0, 1.0 / (1.0 + e), e / (1.0 + e))


def _rank_along_last(key: np.ndarray) -> np.ndarray:
    """Rank (0 = first) of every element when the last axis is sorted ascending by ``key``.

    The sort is stable (ties keep the lower index first) and NaN keys sort last.
    """
    order = np.argsort(key, axis=-1, kind="stable")
    rank = np.empty_like(order)
    positions = np.broadcast_to(np.arange(key.shape[-1]), key.shape)
    np.put_along_axis(rank, order, positions, axis=-1)
    return rank


# --------------------------------------------------------------------------------------------
# sparse attention: geometry


def n_blocks(Lk: int, block_size: int) -> int:
    """Number of key blocks: ``ceil(Lk / block_size)`` (the last block may be short)."""
    if block_size < 1:
        raise ValueError(f"block_size must be >= 1, got {block_size}")
    return ceil_div(Lk, block_size)


def _positions(Lq: int, Lk: int) -> np.ndarray:
    """Bottom-right alignment: query i sits at key position p = i + (Lk - Lq)."""
    return np.arange(Lq, dtype=np.int64) + (Lk - Lq)


def visible_mask(Lq: int, Lk: int, causal: bool) -> np.ndarray:
    """bool [Lq, Lk]: key j is visible to query i (all keys, or ``j <= p`` when causal)."""
    if not causal:
        return np.ones((Lq, Lk), dtype=bool)
    p = _positions(Lq, Lk)
    return np.arange(Lk)[None, :] <= p[:, None]


def window_mask(Lq: int, Lk: int, window: int) -> np.ndarray:
    """bool [Lq, Lk]: key j is in query i's sliding window, ``|p - j| < window`` (0: none)."""
    if window < 0:
        raise ValueError(f"window must be >= 0, got {window}")
    p = _positions(Lq, Lk)
    return np.abs(p[:, None] - np.arange(Lk)[None, :]) < window


def own_block(Lq: int, Lk: int, block_size: int) -> np.ndarray:
    """int64 [Lq]: the key block containing query i's position p, or -1 if p is outside [0, Lk)."""
    n_blocks(Lk, block_size)  # checks block_size
    p = _positions(Lq, Lk)
    inside = (p >= 0) & (p < Lk)
    return np.where(inside, p // block_size, -1).astype(np.int64)


def attention_candidates(Lq: int, Lk: int, block_size: int, causal: bool) -> np.ndarray:
    """bool [Lq, n_blocks]: block b is a top-k selection candidate for query i.

    A candidate has all its keys visible (always, or when causal: its last key <= p) and is not
    the block containing p (that one is forced, not ranked).
    """
    nb = n_blocks(Lk, block_size)
    blocks = np.arange(nb, dtype=np.int64)
    last_key = np.minimum((blocks + 1) * block_size, Lk) - 1
    if causal:
        visible = last_key[None, :] <= _positions(Lq, Lk)[:, None]
    else:
        visible = np.ones((Lq, nb), dtype=bool)
    return visible & (blocks[None, :] != own_block(Lq, Lk, block_size)[:, None])


def _mask_to_indices(selected: np.ndarray) -> np.ndarray:
    """bool [..., nb] -> int64 [..., n]: selected block indices ascending, -1 padded.

    ``n`` is the largest number of selected blocks in any row (0 for no rows).
    """
    nb = selected.shape[-1]
    n = int(selected.sum(axis=-1).max()) if selected.size else 0
    cols = np.where(selected, np.arange(nb, dtype=np.int64), nb)
    cols = np.sort(cols, axis=-1)[..., :n]
    return np.where(cols == nb, -1, cols).astype(np.int64)


def _indices_to_mask(indices: Any, nb: int) -> np.ndarray:
    """int [..., n] block indices (-1 ignored, duplicates once) -> bool [..., nb]."""
    idx = np.asarray(indices)
    if idx.ndim < 1 or not np.issubdtype(idx.dtype, np.integer):
        raise ValueError(f"indices must be an integer array [..., n], got {idx.dtype} {idx.shape}")
    idx = idx.astype(np.int64)
    if idx.size and (idx.min() < -1 or idx.max() >= nb):
        raise ValueError(
            f"indices must be -1 or a block index in [0, {nb}), got values in "
            f"[{idx.min()}, {idx.max()}]")
    mask = np.zeros((*idx.shape[:-1], nb + 1), dtype=bool)
    np.put_along_axis(mask, np.where(idx < 0, nb, idx), True, axis=-1)
    return mask[..., :nb]


def normalize_indices(indices: Any, nb: int) -> np.ndarray:
    """Caller's block indices in canonical form: sorted ascending, deduplicated, -1 padded.

    The width is the largest number of distinct blocks in any row. ValueError for entries other
    than -1 outside [0, nb).
    """
    return _mask_to_indices(_indices_to_mask(indices, nb))


# --------------------------------------------------------------------------------------------
# sparse attention: selection and masks


def _attention_shapes(q: np.ndarray, k: np.ndarray) -> tuple[int, int, int, int, int, int, int]:
    """(B, Hq, Hkv, g, Lq, Lk, D) of q [B,Hq,Lq,D] and k [B,Hkv,Lk,D]."""
    if q.ndim != 4 or k.ndim != 4:
        raise ValueError(f"q and k must be 4-D, got shapes {q.shape} and {k.shape}")
    B, Hq, Lq, D = q.shape
    Bk, Hkv, Lk, Dk = k.shape
    if Bk != B or Dk != D:
        raise ValueError(f"q {q.shape} and k {k.shape} disagree on batch or head dimension")
    if Hkv == 0:
        if Hq != 0:
            raise ValueError(f"k has 0 heads but q has {Hq}")
        return B, Hq, Hkv, 1, Lq, Lk, D
    if Hq % Hkv:
        raise ValueError(f"q heads ({Hq}) must be a multiple of k heads ({Hkv})")
    return B, Hq, Hkv, Hq // Hkv, Lq, Lk, D


def selection_scores(q: Any, k: Any, block_size: int, scale: float) -> np.ndarray:
    """float64 [B, Hkv, Lq, n_blocks]: the block selection scores of DESIGN 3.1.

    ``s(i, t, b) = scale * (sum over the g query heads h of kv head t of q[h, i])
    . mean(k[t, keys of b])``, the mean over the block's actual keys (the last block may be
    short). Non-finite keys give non-finite scores here; :func:`select_blocks` ranks those last.
    """
    q64, k64 = _f64(q), _f64(k)
    B, _, Hkv, g, Lq, Lk, D = _attention_shapes(q64, k64)
    nb = n_blocks(Lk, block_size)
    q_sum = q64.reshape(B, Hkv, g, Lq, D).sum(axis=2)  # [B, Hkv, Lq, D]
    if nb == 0:
        return np.zeros((B, Hkv, Lq, 0))
    starts = np.arange(nb, dtype=np.int64) * block_size
    counts = np.minimum(starts + block_size, Lk) - starts
    with np.errstate(all="ignore"):  # inf - inf in a block of poisoned keys is NaN: fine
        k_mean = np.add.reduceat(k64, starts, axis=2) / counts[:, None]  # [B, Hkv, nb, D]
        return scale * (q_sum @ np.swapaxes(k_mean, -1, -2))


def summary_scores(q: Any, block_keys: Any, scale: float) -> np.ndarray:
    """float64 [B, Hkv, Lq, n_blocks]: selection scores from the caller's block summaries
    (DESIGN 3.1a): ``scale * (sum over the group's query heads of q[h, i]) . block_keys[t, b]``.
    ``block_keys`` [B, Hkv, n_blocks, D] stands in for the block means of
    :func:`selection_scores`."""
    q64, bk = _f64(q), _f64(block_keys)
    B, Hq, Lq, D = q64.shape
    Hkv = bk.shape[1]
    if bk.ndim != 4 or bk.shape[0] != B or bk.shape[3] != D or Hkv == 0 or Hq % Hkv:
        raise ValueError(f"block_keys must be [{B}, Hkv, n_blocks, {D}], got {bk.shape}")
    q_sum = q64.reshape(B, Hkv, Hq // Hkv, Lq, D).sum(axis=2)
    with np.errstate(all="ignore"):
        return scale * (q_sum @ np.swapaxes(bk, -1, -2))


def select_blocks(scores: Any, top_k: int | float, Lq: int, Lk: int, block_size: int,
                  causal: bool) -> np.ndarray:
    """int64 [B, Hkv, Lq, n]: the blocks each query attends through selection (DESIGN 3.1).

    For query i: the block containing p (forced, if 0 <= p < Lk) plus the first ``top_k`` of its
    candidates (:func:`attention_candidates`) ranked by ``scores`` descending, ties to the lower
    block index. ``top_k`` is an int count or a float fraction of that query's candidate count
    rounded up (:func:`resolve_count`). A non-finite score (NaN, +-inf) ranks after every finite
    score (as if it were -inf); non-finite scores tie with each other (lower index first).
    Sorted ascending, -1 padded; ``n`` is the largest selection of any row (possibly 0).
    """
    scores = _f64(scores)
    nb = n_blocks(Lk, block_size)
    if scores.ndim < 2 or scores.shape[-2:] != (Lq, nb):
        raise ValueError(f"scores must be [..., {Lq}, {nb}], got {scores.shape}")
    candidates = attention_candidates(Lq, Lk, block_size, causal)  # [Lq, nb]
    take = resolve_count(top_k, candidates.sum(axis=-1))  # [Lq]
    # sort key: candidates with finite scores by -score, then non-finite candidates, then
    # non-candidates (NaN sorts last); the stable sort sends ties to the lower block index
    key = np.where(candidates, np.where(np.isfinite(scores), -scores, np.inf), np.nan)
    selected = candidates & (_rank_along_last(key) < take[:, None])
    selected |= np.arange(nb)[None, :] == own_block(Lq, Lk, block_size)[:, None]
    return _mask_to_indices(selected)


def allowed_mask(Lq: int, Lk: int, *, B: int, Hkv: int, block_size: int, window: int,
                 causal: bool, indices: Any | None = None) -> np.ndarray:
    """bool [B, Hkv, Lq, Lk]: the keys each query may attend (DESIGN 3.1).

    With block ``indices`` [B, Hkv, Lq, n] (-1 ignored, duplicates once):
    ``visible ∩ (keys of the selected blocks ∪ window)``. Without (no selection):
    ``visible ∩ window`` when ``window > 0``, else ``visible`` (dense attention).
    """
    visible = visible_mask(Lq, Lk, causal)
    in_window = window_mask(Lq, Lk, window)
    if indices is None:
        base = visible & in_window if window > 0 else visible
        return np.broadcast_to(base, (B, Hkv, Lq, Lk)).copy()
    nb = n_blocks(Lk, block_size)
    idx = np.asarray(indices)
    if idx.ndim != 4:
        raise ValueError(f"indices must be [B, Hkv, Lq, n], got shape {idx.shape}")
    idx = np.broadcast_to(idx, (B, Hkv, Lq, idx.shape[-1]))
    block_selected = _indices_to_mask(idx, nb)  # [B, Hkv, Lq, nb]
    key_selected = block_selected[..., np.arange(Lk) // block_size]  # [B, Hkv, Lq, Lk]
    return visible & (key_selected | in_window)


def _attend(q: np.ndarray, k: np.ndarray, v: np.ndarray, allowed: np.ndarray,
            scale: float) -> tuple[np.ndarray, np.ndarray]:
    """Masked softmax attention of one kv head: q [g, Lq, D], k [Lk, D], v [Lk, Dv].

    Returns (out [g, Lq, Dv], lse [g, Lq]). Disallowed keys are removed with ``np.where`` before
    anything is multiplied, so NaN/Inf in keys or values outside ``allowed`` cannot leak.
    """
    any_allowed = allowed.any(axis=-1)  # [Lq]
    with np.errstate(all="ignore"):
        logits = np.where(allowed, scale * (q @ k.T), -np.inf)  # [g, Lq, Lk]
        row_max = logits.max(axis=-1, initial=-np.inf, keepdims=True)
        row_max = np.where(any_allowed[:, None], row_max, 0.0)  # empty rows: anything finite
        weights = np.where(allowed, np.exp(logits - row_max), 0.0)  # [g, Lq, Lk]
        total = weights.sum(axis=-1)  # >= 1 on rows with something allowed (unless NaN)
        # values: finite rows go through a matmul (weights are exactly 0 where not allowed);
        # keys whose value row holds NaN/Inf contribute only where allowed (np.where, no 0*inf)
        bad = ~np.isfinite(v).all(axis=-1)  # [Lk]
        acc = weights @ np.where(bad[:, None], 0.0, v)
        if bad.any():
            cols = np.flatnonzero(bad)
            terms = weights[..., cols, None] * v[cols]  # [g, Lq, nbad, Dv]
            acc = acc + np.where(allowed[:, cols, None], terms, 0.0).sum(axis=-2)
        out = np.where(any_allowed[:, None], acc / total[..., None], 0.0)
        lse = np.where(any_allowed, row_max[..., 0] + np.log(total), -np.inf)
    return out, lse


def sparse_attention(q: Any, k: Any, v: Any, *, top_k: int | float | None = None,
                     block_size: int = 64, window: int = 0, causal: bool = False,
                     scale: float | None = None, indices: Any | None = None,
                     block_keys: Any | None = None, cu_seqlens_q: Any | None = None,
                     cu_seqlens_k: Any | None = None, block_table: Any | None = None,
                     seqlens_k: Any | None = None,
                     ) -> tuple[np.ndarray, np.ndarray | None, np.ndarray]:
    """Reference sparse attention (DESIGN 3.1), in float64.

    ``block_keys`` [B, Hkv, n_blocks, D] replace the block means in the selection score
    (:func:`summary_scores`). The varlen and paged forms (``cu_seqlens_*``, ``block_table`` +
    ``seqlens_k``, DESIGN 3.1a) run each sequence as this contiguous call:
    :func:`dshal.reference_forms.sparse_attention_forms`.

    q [B, Hq, Lq, D], k [B, Hkv, Lk, D], v [B, Hkv, Lk, Dv]; query head h uses kv head
    h // (Hq // Hkv). Positions are bottom-right aligned (p = i + Lk - Lq). ``scale`` defaults
    to 1/sqrt(D) (1 when D == 0).

    Returns ``(out, indices, lse)``: out float64 [B, Hq, Lq, Dv]; indices int64
    [B, Hkv, Lq, n] (the :func:`select_blocks` result with ``top_k``, the caller's ``indices``
    normalised by :func:`normalize_indices`, or None without either); lse float64 [B, Hq, Lq]
    (log-sum-exp of the scaled logits over the allowed keys). A row with nothing allowed gives
    out = 0 and lse = -inf. NaN/Inf in keys or values that are not allowed for a query never
    reach its output; a non-finite selection score (e.g. a block mean poisoned by NaN/Inf keys)
    ranks that block after every block with a finite score.
    """
    if cu_seqlens_q is not None or cu_seqlens_k is not None or block_table is not None \
            or seqlens_k is not None:
        from dshal.reference_forms import sparse_attention_forms

        return sparse_attention_forms(
            q, k, v, top_k=top_k, block_size=block_size, window=window, causal=causal,
            scale=scale, indices=indices, block_keys=block_keys, cu_seqlens_q=cu_seqlens_q,
            cu_seqlens_k=cu_seqlens_k, block_table=block_table, seqlens_k=seqlens_k)
    q64, k64, v64 = _f64(q), _f64(k), _f64(v)
    B, Hq, Hkv, g, Lq, Lk, D = _attention_shapes(q64, k64)
    if v64.ndim != 4 or v64.shape[:3] != (B, Hkv, Lk):
        raise ValueError(f"v must be [{B}, {Hkv}, {Lk}, Dv], got {v64.shape}")
    if top_k is not None and indices is not None:
        raise ValueError("give top_k or indices, not both")
    nb = n_blocks(Lk, block_size)
    if scale is None:
        scale = 1.0 / math.sqrt(D) if D > 0 else 1.0
    scale = float(scale)

    selection: np.ndarray | None = None
    if top_k is not None:
        scores = selection_scores(q64, k64, block_size, scale) if block_keys is None \
            else summary_scores(q64, block_keys, scale)
        selection = select_blocks(scores, top_k, Lq, Lk, block_size, causal)
    elif indices is not None:
        idx = np.asarray(indices)
        if idx.ndim != 4 or idx.shape[:3] != (B, Hkv, Lq):
            raise ValueError(f"indices must be [{B}, {Hkv}, {Lq}, n], got {idx.shape}")
        selection = normalize_indices(idx, nb)

    allowed = allowed_mask(Lq, Lk, B=B, Hkv=Hkv, block_size=block_size, window=window,
                           causal=causal, indices=selection)
    Dv = v64.shape[-1]
    out = np.zeros((B, Hq, Lq, Dv))
    lse = np.full((B, Hq, Lq), -np.inf)
    for b in range(B):
        for t in range(Hkv):
            heads = slice(t * g, (t + 1) * g)
            out[b, heads], lse[b, heads] = _attend(q64[b, heads], k64[b, t], v64[b, t],
                                                   allowed[b, t], scale)
    return out, selection, lse


# --------------------------------------------------------------------------------------------
# quantize and gemm


def _dtype_name(x: np.ndarray) -> str:
    return np.dtype(x.dtype).name


def _to_float32(x: Any) -> np.ndarray:
    """``x`` rounded to float32 (nearest even; exact for every dtype narrower than float64)."""
    return np.asarray(x).astype(np.float32)


def _tf32(x32: np.ndarray) -> np.ndarray:
    """float32 -> float32 whose mantissa is rounded to 10 bits, nearest even (TF32)."""
    bits = np.array(x32, dtype=np.float32, order="C").view(np.uint32)  # keeps 0-d as 0-d
    lsb = (bits >> np.uint32(13)) & np.uint32(1)
    rounded = (bits + np.uint32(0x0FFF) + lsb) & np.uint32(0xFFFFE000)
    # NaN/Inf are kept; a carry out of the largest finite values correctly gives +-inf
    return np.where(np.isfinite(x32), rounded, bits).view(np.float32)


def round_to_precision(x: Any, precision: str) -> np.ndarray:
    """``x`` rounded to a float precision, nearest even: fp32 -> float32, tf32 -> float32 with a
    10-bit mantissa, bf16 -> ml_dtypes.bfloat16, fp16 -> float16.

    The input is rounded to float32 first (exact unless it is float64), then to the format.
    NaN/Inf pass through; values beyond the format's range become +-inf.
    """
    if precision not in ROUNDED_PRECISIONS:
        raise ValueError(f"precision={precision!r} is not one of {ROUNDED_PRECISIONS}")
    with np.errstate(over="ignore"):  # out of range is +-inf, as the format says
        x32 = _to_float32(x)
        if precision == "fp32":
            return x32
        if precision == "tf32":
            return _tf32(x32)
        if precision == "bf16":
            return x32.astype(ml_dtypes.bfloat16)
        return x32.astype(np.float16)


def _group_amax_last(absx: np.ndarray, group_size: int) -> np.ndarray:
    """max over groups of ``group_size`` along the last axis: [..., K] -> [..., ceil(K/g)]."""
    K = absx.shape[-1]
    if K == 0:
        return np.zeros((*absx.shape[:-1], 0), dtype=absx.dtype)
    starts = np.arange(0, K, group_size)
    return np.maximum.reduceat(absx, starts, axis=-1)


def _scale_from_amax(amax: np.ndarray, qmax: float) -> np.ndarray:
    """float32 ``amax / qmax``, or 1 where that is 0 (amax == 0, or so tiny that it underflows)."""
    scale = np.asarray(amax, dtype=np.float32) / np.float32(qmax)
    return np.where(scale == 0, np.float32(1.0), scale).astype(np.float32)


def _encode(scaled: np.ndarray, precision: str) -> np.ndarray:
    """float32 ``x / scale`` -> storage values: saturate to +-qmax, round to nearest even."""
    qmax = np.float32(QMAX[precision])
    if precision == "int8":
        return np.clip(np.rint(scaled), -qmax, qmax).astype(np.int8)
    # qmax is representable, so clip-then-round equals round-then-saturate
    return np.clip(scaled, -qmax, qmax).astype(_FP8_NUMPY[precision])


def quantize(x: Any, precision: str, *, granularity: str = "row",
             group_size: int = 128) -> tuple[np.ndarray, np.ndarray | None]:
    """Reference ``quantize`` (DESIGN 3.2): ``(values, scales)``.

    fp8_e4m3 / fp8_e5m2 / int8: per group, ``scale = amax / qmax`` in float32 (qmax 448, 57344,
    127), 1 where that is 0; ``values = x / scale`` in float32, saturated to +-qmax and rounded to
    nearest even, stored as float8_e4m3fn / float8_e5m2 / int8. Groups: ``row`` = 1 x group_size
    along the last axis, scales [..., ceil(K/g)]; ``block`` = group_size x group_size of a 2-D
    [K, N], scales [ceil(K/g), ceil(N/g)]; ``tensor`` = one float32 scale of shape (). The input
    is first rounded to float32; non-finite input raises ValueError.

    fp32 / tf32 / bf16 / fp16: ``(round_to_precision(x, precision), None)``.
    """
    if precision in ROUNDED_PRECISIONS:
        return round_to_precision(x, precision), None
    if precision not in QUANTIZED_PRECISIONS:
        raise ValueError(f"precision={precision!r} is not one of {PRECISIONS}")
    if group_size < 1:
        raise ValueError(f"group_size must be >= 1, got {group_size}")
    with np.errstate(over="ignore"):
        x32 = _to_float32(x)
    if not np.isfinite(x32).all():
        raise ValueError("x holds NaN or Inf (or values beyond float32): cannot quantize")
    absx = np.abs(x32)
    qmax = QMAX[precision]
    if granularity == "row":
        if x32.ndim < 1:
            raise ValueError("row granularity needs an input with at least 1 dimension")
        scales = _scale_from_amax(_group_amax_last(absx, group_size), qmax)
        full = scales[..., np.arange(x32.shape[-1]) // group_size]
    elif granularity == "block":
        if x32.ndim != 2:
            raise ValueError(f"block granularity needs a 2-D input, got shape {x32.shape}")
        K, N = x32.shape
        amax = _group_amax_last(absx, group_size)  # [K, nN]
        amax = _group_amax_last(amax.T, group_size).T  # [nK, nN]
        scales = _scale_from_amax(amax, qmax)
        full = scales[np.arange(K) // group_size][:, np.arange(N) // group_size]
    elif granularity == "tensor":
        amax = absx.max() if absx.size else np.float32(0)
        scales = _scale_from_amax(amax, qmax).reshape(())
        full = scales
    else:
        raise ValueError(f"granularity={granularity!r} is not one of ('row', 'block', 'tensor')")
    scaled = x32 / full  # float32 division
    return _encode(scaled, precision), scales


def dequantize_a(values: Any, a_scale: Any | None, group_size: int) -> np.ndarray:
    """float64 ``values * a_scale`` for an activation ``a`` [..., M, K].

    ``a_scale``: None (1), a scalar, [..., M, 1] (per row) or [..., M, ceil(K/g)] (per group of
    ``group_size`` along K).
    """
    v = _f64(values)
    if a_scale is None:
        return v
    s = _f64(a_scale)
    if s.ndim > 0:
        K = v.shape[-1]
        if s.shape[-1] == ceil_div(K, group_size) and s.shape[-1] != 1:
            s = s[..., np.arange(K) // group_size]
        elif s.shape[-1] != 1:
            raise ValueError(
                f"a_scale must be a scalar, [..., M, 1] or [..., M, {ceil_div(K, group_size)}] "
                f"for a of shape {v.shape}, got {s.shape}")
    try:
        if np.broadcast_shapes(v.shape, s.shape) != v.shape:
            raise ValueError
    except ValueError:
        raise ValueError(f"a_scale of shape {s.shape} does not fit a of shape {v.shape}") from None
    return v * s


def dequantize_b(values: Any, b_scale: Any | None, group_size: int) -> np.ndarray:
    """float64 ``values * b_scale`` for a weight ``b`` [K, N].

    ``b_scale``: None (1), a scalar, [1, N] (per column) or [ceil(K/g), ceil(N/g)] (per
    group_size x group_size block).
    """
    v = _f64(values)
    if v.ndim != 2:
        raise ValueError(f"b must be 2-D [K, N], got shape {v.shape}")
    if b_scale is None:
        return v
    s = _f64(b_scale)
    if s.ndim == 0:
        return v * s
    K, N = v.shape
    blocks = (ceil_div(K, group_size), ceil_div(N, group_size))
    if s.shape == blocks:
        s = s[np.arange(K) // group_size][:, np.arange(N) // group_size]
    elif s.shape not in ((1, N), (1, 1)):
        raise ValueError(
            f"b_scale must be a scalar, [1, {N}] or {list(blocks)} for b of shape {v.shape}, "
            f"got {s.shape}")
    return v * s


def _operand(x: np.ndarray, name: str, precision: str, scale: Any | None, group_size: int,
             granularity: str) -> np.ndarray:
    """One gemm operand as DESIGN 3.2 defines it, in float64."""
    dtype = _dtype_name(x)
    if dtype in PRECISION_OF_STORAGE:
        if PRECISION_OF_STORAGE[dtype] != precision:
            raise ValueError(f"{name} is stored as {dtype} but precision={precision!r}")
        dequantize = dequantize_a if name == "a" else dequantize_b
        return dequantize(x, scale, group_size)
    if dtype not in FLOAT_DTYPES:
        raise ValueError(f"{name} has dtype {dtype}; expected a float or fp8/int8 dtype")
    if scale is not None:
        raise ValueError(f"{name}_scale is only for fp8/int8 {name}, but {name} is {dtype}")
    if precision in QUANTIZED_PRECISIONS:
        values, scales = quantize(x, precision, granularity=granularity, group_size=group_size)
        dequantize = dequantize_a if name == "a" else dequantize_b
        return dequantize(values, scales, group_size)
    return _f64(round_to_precision(x, precision))


def gemm_operand(x: np.ndarray, name: str, precision: str, group_size: int) -> np.ndarray:
    """One *float* gemm operand (``name`` "a": quantised by row, "b": by block) at
    ``precision``, as :func:`gemm_operands` forms it; a's rows, or b's rows starting at a
    multiple of ``group_size``, may be formed a slice at a time."""
    return _operand(x, name, precision, None, group_size, "row" if name == "a" else "block")


def gemm_operands(a: Any, b: Any, precision: str | None, *, a_scale: Any | None = None,
                  b_scale: Any | None = None, group_size: int = 128,
                  ) -> tuple[np.ndarray, np.ndarray]:
    """The float64 operands whose exact product ``gemm`` means (DESIGN 3.2).

    fp8/int8 inputs are dequantised by their scales (None = 1; shapes as :func:`dequantize_a`
    and :func:`dequantize_b`); float inputs at a quantised precision are quantised on the fly
    (a by row, b by block, exactly as :func:`quantize`) and dequantised; float inputs at
    fp32/tf32/bf16/fp16 are rounded to that format. ``precision=None`` means the storage format
    of the fp8/int8 input(s), else fp32. ValueError for a precision that contradicts a storage
    dtype, two different storage formats without a precision, or ``"auto"``.
    """
    a_arr, b_arr = np.asarray(a), np.asarray(b)
    storage = {PRECISION_OF_STORAGE[_dtype_name(x)] for x in (a_arr, b_arr)
               if _dtype_name(x) in PRECISION_OF_STORAGE}
    if precision is None:
        if len(storage) > 1:
            raise ValueError(f"a and b are stored in different formats {sorted(storage)}; "
                             "give precision")
        precision = storage.pop() if storage else "fp32"
    if precision not in PRECISIONS:
        raise ValueError(f"precision={precision!r} is not one of {PRECISIONS} (the reference "
                         "needs a concrete precision, not 'auto')")
    if group_size < 1:
        raise ValueError(f"group_size must be >= 1, got {group_size}")
    a64 = _operand(a_arr, "a", precision, a_scale, group_size, "row")
    b64 = _operand(b_arr, "b", precision, b_scale, group_size, "block")
    return a64, b64


def gemm(a: Any, b: Any, *, precision: str | None = None, a_scale: Any | None = None,
         b_scale: Any | None = None, group_size: int = 128, bias: Any | None = None,
         ) -> np.ndarray:
    """Reference ``gemm`` (DESIGN 3.2): float64 ``a @ b + bias`` of :func:`gemm_operands`.

    a [..., M, K], b [K, N], bias [N] (upcast to float64) -> [..., M, N]. int8 products are
    exact (integer sums below 2**53 are exact in float64) up to the final scaling.
    """
    a64, b64 = gemm_operands(a, b, precision, a_scale=a_scale, b_scale=b_scale,
                             group_size=group_size)
    if a64.ndim < 2 or b64.ndim != 2 or a64.shape[-1] != b64.shape[0]:
        raise ValueError(f"gemm needs a [..., M, K] and b [K, N], got {a64.shape} and "
                         f"{b64.shape}")
    out = a64 @ b64
    if bias is not None:
        bias64 = _f64(bias)
        if bias64.shape != (b64.shape[1],):
            raise ValueError(f"bias must be [{b64.shape[1]}], got {bias64.shape}")
        out = out + bias64
    return out


# --------------------------------------------------------------------------------------------
# gated channels

_GATE_MODES = ("hard", "soft", "soft_hard")


def gate_open(gate_logits: Any, *, mode: str = "hard", threshold: float = 0.0,
              keep: int | float | None = None) -> np.ndarray:
    """bool, shape of ``gate_logits``: which channels are open (DESIGN 3.3).

    ``soft``: every channel. Otherwise, without ``keep``: ``logit > threshold`` (strict; NaN is
    closed). With ``keep`` (int count, or float fraction of C rounded up by
    :func:`resolve_count`; ``threshold`` is then ignored): the top-``keep`` logits along the last
    axis, ties to the lower index, NaN ranked last (a NaN channel opens only when ``keep``
    reaches past every non-NaN channel).
    """
    z = _f64(gate_logits)
    if mode not in _GATE_MODES:
        raise ValueError(f"mode={mode!r} is not one of {_GATE_MODES}")
    if mode == "soft":
        return np.ones(z.shape, dtype=bool)
    if keep is None:
        return z > threshold
    if z.ndim < 1:
        raise ValueError("gate_logits must have at least one dimension")
    take = resolve_count(keep, z.shape[-1])
    key = np.where(np.isnan(z), np.nan, -z)  # descending logit; NaN sorts last
    return _rank_along_last(key) < take


def gate_values(gate_logits: Any, *, mode: str, open_mask: Any) -> np.ndarray:
    """float64 gate per channel: ``hard`` 1 on open; ``soft`` sigmoid(logit) everywhere;
    ``soft_hard`` sigmoid(logit) on open; 0 on closed channels."""
    z = _f64(gate_logits)
    is_open = np.broadcast_to(np.asarray(open_mask, dtype=bool), z.shape)
    if mode == "hard":
        return np.where(is_open, 1.0, 0.0)
    if mode == "soft":
        return sigmoid(z)
    if mode == "soft_hard":
        return np.where(is_open, sigmoid(z), 0.0)
    raise ValueError(f"mode={mode!r} is not one of {_GATE_MODES}")


def gated_channels(x: Any, gate_logits: Any, *, weight: Any | None = None,
                   bias: Any | None = None, mode: str = "hard", threshold: float = 0.0,
                   keep: int | float | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Reference ``gated_channels`` (DESIGN 3.3): ``(y float64, open mask)``.

    Without weight: ``y = gate * x`` on open channels, exactly 0 on closed ones. With weight
    [Cout, Cin] (+ bias [Cout]): ``y = gate * (x . weight[c] + bias[c])`` on open channels,
    exactly 0 on closed ones; weight rows of channels closed in every row are never read, and
    NaN/Inf in a closed channel's weight row, bias or input never reaches ``y``. ``gate_logits``
    is [C_out] (static) or ``x.shape[:-1] + [C_out]`` (per row); the mask has its shape.
    """
    x64 = _f64(x)
    z = _f64(gate_logits)
    if x64.ndim < 1:
        raise ValueError("x must have at least one dimension")
    if weight is None:
        if bias is not None:
            raise ValueError("bias needs weight")
        c_out = x64.shape[-1]
    else:
        w64 = _f64(weight)
        if w64.ndim != 2 or w64.shape[1] != x64.shape[-1]:
            raise ValueError(f"weight must be [Cout, {x64.shape[-1]}], got {w64.shape}")
        c_out = w64.shape[0]
        b64 = None if bias is None else _f64(bias)
        if b64 is not None and b64.shape != (c_out,):
            raise ValueError(f"bias must be [{c_out}], got {b64.shape}")
    out_shape = (*x64.shape[:-1], c_out)
    if z.shape not in ((c_out,), out_shape):
        raise ValueError(f"gate_logits must be [{c_out}] or {list(out_shape)}, got {z.shape}")

    is_open = gate_open(z, mode=mode, threshold=threshold, keep=keep)
    gate = gate_values(z, mode=mode, open_mask=is_open)
    with np.errstate(all="ignore"):
        if weight is None:
            pre = x64
        else:
            # channels open in at least one row: only their weight rows are read
            used = is_open.any(axis=tuple(range(is_open.ndim - 1)))
            cols = np.flatnonzero(used)
            pre = np.zeros(out_shape)
            if cols.size:
                pre[..., cols] = x64 @ w64[cols].T
                if b64 is not None:
                    pre[..., cols] += b64[cols]
        y = np.where(is_open, gate * pre, 0.0)
    return np.broadcast_to(y, out_shape).copy(), is_open
