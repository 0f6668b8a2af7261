"""``gated_channels`` in torch primitives: closed output channels are never computed.

Closed channels are 0 by selection (``torch.where``, or a zero output the open columns are
copied into), never by multiplying with a 0/1 gate, so NaN/Inf there cannot leak. With a weight
only the open channels' rows are gathered (``index_select``: closed rows are never read) and
multiplied in one matmul (IEEE fp32, or float64 for float64 inputs); per-row gates compute the
union of the channels open in any row and zero the rest per row. ``keep`` ranks each row with
a stable sort of ``-logit`` (ties to the lower index, NaN last).
"""

from __future__ import annotations

import math

import numpy as np
import torch

from dshal.calls import GatedCall, resolve_count
from dshal_torch.numerics import matmul_fp32


def gated_channels(call: GatedCall) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Run ``gated_channels``: ``(y, mask)``, y in x's dtype on x's device."""
    x = call.x
    cdt = torch.float64 if x.dtype == torch.float64 else torch.float32
    z = call.gate_logits  # compared in its own precision (float32 holds every narrower one)
    if z.dtype != torch.float64:
        z = z.to(torch.float32)
    mask = open_mask(z, call.mode, call.threshold, call.keep)
    gate = None if call.mode == "hard" else torch.sigmoid(z).to(cdt)
    if call.weight is not None:
        y = _weighted(x.to(cdt), call.weight, call.bias, mask, gate)
    elif gate is None:
        y = torch.where(mask, x, torch.zeros((), dtype=x.dtype, device=x.device))
    else:
        y = torch.where(mask, x.to(cdt) * gate, torch.zeros((), dtype=cdt, device=x.device))
    return y.to(x.dtype), (mask if call.return_mask else None)


def open_mask(z: torch.Tensor, mode: str, threshold: float, keep: int | float | None
              ) -> torch.Tensor:
    """Which channels are open: all (soft), ``logit > threshold`` (NaN closed), or the
    top-``keep`` logits per row along the last axis (ties to the lower index, NaN last)."""
    if mode == "soft":
        return torch.ones(z.shape, dtype=torch.bool, device=z.device)
    if keep is None:
        return z > _below(threshold, z.dtype)
    take = int(resolve_count(keep, z.shape[-1]))
    mask = torch.zeros(z.shape, dtype=torch.bool, device=z.device)
    if take:
        order = torch.sort(-z, dim=-1, stable=True).indices[..., :take]  # NaN sorts last
        mask.scatter_(-1, order, True)
    return mask


def _below(threshold: float, dtype: torch.dtype) -> float:
    """A threshold ``t`` that ``z > t`` compares exactly in ``dtype`` (torch rounds a Python
    scalar to the tensor's dtype first): for float32 z the largest float32 <= threshold, since
    for float32 z, ``z > threshold`` exactly when ``z > that``."""
    if dtype == torch.float64:
        return threshold
    with np.errstate(over="ignore"):
        t32 = np.float32(threshold)
    if float(t32) > threshold:  # compared in float64: numpy would compare in float32
        t32 = np.nextafter(t32, np.float32(-np.inf))
    return float(t32)


def _weighted(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
              mask: torch.Tensor, gate: torch.Tensor | None) -> torch.Tensor:
    """``gate * (x @ weight[c] + bias[c])`` on open channels c only, exactly 0 elsewhere."""
    c_out = weight.shape[0]
    lead = x.shape[:-1]
    rows = math.prod(lead)
    row_gates = mask.ndim > 1
    used = mask.reshape(rows, c_out).any(dim=0) if row_gates else mask
    cols = torch.nonzero(used).flatten()
    y = torch.zeros((rows, c_out), dtype=x.dtype, device=x.device)
    if cols.numel():
        part = matmul_fp32(x.reshape(rows, x.shape[-1]),
                           weight.index_select(0, cols).to(x.dtype).T)
        if bias is not None:
            part = part + bias.index_select(0, cols).to(x.dtype)
        if gate is not None:
            part = part * (gate.reshape(rows, c_out) if row_gates else gate)[..., cols]
        if row_gates:
            part = torch.where(mask.reshape(rows, c_out)[:, cols], part,
                               torch.zeros((), dtype=x.dtype, device=x.device))
        y.index_copy_(1, cols, part)
    return y.reshape(*lead, c_out)
