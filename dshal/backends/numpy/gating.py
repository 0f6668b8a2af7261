"""``gated_channels`` on the CPU: closed output channels are never computed.

With a weight matrix only the open channels' weight rows are gathered and multiplied (one BLAS
call); closed rows are never read, so NaN there cannot leak and costs nothing. With per-row
gates the union of the open channels is computed and the closed positions are zeroed per row
with ``np.where`` (never a multiplication, which would let NaN/Inf through).
"""

from __future__ import annotations

import numpy as np

from dshal.backends.numpy.attention import resolve_count
from dshal.calls import GatedCall


def sigmoid(z: np.ndarray) -> np.ndarray:
    """Logistic function without overflow (``exp`` only of ``-|z|``)."""
    e = np.exp(-np.abs(z))
    return np.where(z >= 0, 1 / (1 + e), e / (1 + e))


def open_mask(logits: np.ndarray, mode: str, threshold: float, keep: int | float | None
              ) -> np.ndarray:
    """Which channels are open: all (soft), ``logit > threshold``, or the top-``keep`` per row
    along the last axis (ties to the lower index, NaN last)."""
    if mode == "soft":
        return np.ones(logits.shape, bool)
    if keep is None:
        return logits > threshold  # comparisons with NaN are False and raise no warning
    c = logits.shape[-1]
    take = int(resolve_count(keep, c))
    mask = np.zeros(logits.shape, bool)
    if take:
        order = np.argsort(-logits, axis=-1, kind="stable")[..., :take]  # NaN sorts last
        np.put_along_axis(mask, order, True, axis=-1)
    return mask


def gated_channels(call: GatedCall) -> tuple[np.ndarray, np.ndarray | None]:
    """Run ``gated_channels``: ``(y, mask)``, y in x's dtype."""
    x = np.asarray(call.x)
    cdt = np.float64 if x.dtype == np.float64 else np.float32
    z = np.asarray(call.gate_logits).astype(cdt, copy=False)
    mask = open_mask(z, call.mode, call.threshold, call.keep)
    gate = None if call.mode == "hard" else sigmoid(z)
    if call.weight is None and gate is None:  # the common hard gate: one select, no arithmetic
        y = np.where(mask, x, x.dtype.type(0))
        return y, (mask if call.return_mask else None)
    with np.errstate(all="ignore"):
        if call.weight is None:
            y = np.where(mask, x.astype(cdt, copy=False) * gate, 0)
        else:
            y = _weighted(x.astype(cdt, copy=False), np.asarray(call.weight), call.bias, mask,
                          gate, cdt)
    return y.astype(x.dtype, copy=False), (mask if call.return_mask else None)


def _weighted(x: np.ndarray, weight: np.ndarray, bias, mask: np.ndarray,
              gate: np.ndarray | None, cdt) -> np.ndarray:
    """``gate * (x @ weight[c] + bias[c])`` on open channels c only, 0 elsewhere."""
    c_out = weight.shape[0]
    y = np.zeros((*x.shape[:-1], c_out), cdt)
    row_gates = mask.ndim > 1
    cols = np.flatnonzero(mask.any(axis=tuple(range(mask.ndim - 1))) if row_gates else mask)
    if cols.size == 0:
        return y
    part = x @ weight[cols].astype(cdt).T
    if bias is not None:
        part += np.asarray(bias)[cols].astype(cdt)
    if gate is not None:
        part *= gate[..., cols]
    y[..., cols] = np.where(mask[..., cols], part, 0) if row_gates else part
    return y
