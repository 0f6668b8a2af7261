"""Backward formulas of gemm and gated_channels in torch primitives (attention's is in
:mod:`dshal.torch.attention`). All run in float32 (float64 for float64 inputs) on the tensors'
device and return gradients in the inputs' dtypes.

gemm, straight through: the product of the (de)quantised operands ``A~ = Q(a)``, ``B~ = Q(b)``
is differentiated as if Q were the identity: ``da = g @ B~^T``, ``db = A~^T @ g``,
``dbias = sum(g)``. The operands are what the forward multiplied: the same ``dshal.ops.quantize``
(a by row, b by block) or rounding, or stored fp8/int8 values times their scales. Stored
fp8/int8 inputs and scale tensors get no gradient.

gated_channels: ``y = gate * pre`` on open channels (``pre = x``, or ``x . w[c] + bias[c]``).
``soft`` is differentiated exactly. ``hard`` and ``soft_hard`` use a straight-through estimator
on the open channels: the gate's derivative is taken as sigmoid'(logit) there (for ``hard``, as
if the gate were sigmoid(logit)); closed channels, whose output is a constant 0, pass no
gradient to anything: not to x, their logits, their weight rows or bias (so the backward never
reads a closed weight row either).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from dshal import ops
from dshal.dtypes import QUANTIZED_PRECISIONS
from dshal.torch.dequant import dequantize_a, dequantize_b

#: the float dtypes dshal computes on (fp8/int8 storage is not among them)
FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _cdt(*tensors: Tensor | None) -> torch.dtype:
    return torch.float64 if any(t is not None and t.dtype == torch.float64
                                for t in tensors) else torch.float32


def like(ref: Tensor, value: Tensor) -> Tensor:
    """``value`` laid out as ``ref`` (``torch.empty_like``): the gradient of an input has the
    input's strides, as the fake implementations state."""
    return torch.empty_like(ref).copy_(value)


# --- gemm -------------------------------------------------------------------------------------


def operand(x: Tensor, scale: Tensor | float | None, precision: str, granularity: str,
            g: int, cdt: torch.dtype) -> Tensor:
    """The operand gemm multiplied at ``precision``, in ``cdt``: stored fp8/int8 values times
    their scale, or a float input quantised (and dequantised) or rounded as the forward did."""
    dequantize = dequantize_a if granularity == "row" else dequantize_b
    if x.dtype not in FLOATS:
        return dequantize(x, scale, g, cdt)
    if precision in QUANTIZED_PRECISIONS:
        values, scales = ops.quantize(x, precision, granularity=granularity, group_size=g)
        return dequantize(values, scales, g, cdt)
    return ops.quantize(x, precision)[0].to(cdt)


def gemm_backward(grad: Tensor, a: Tensor, b: Tensor, a_scale: Tensor | float | None,
                  b_scale: Tensor | float | None, precision: str, g: int, has_bias: bool
                  ) -> tuple[Tensor, Tensor, Tensor]:
    """``(da, db, dbias)``: straight-through gradients (zeros for stored fp8/int8 inputs, an
    empty dbias without a bias)."""
    cdt = _cdt(a, b, grad)
    gc = grad.to(cdt)
    rows = gc.reshape(math.prod(gc.shape[:-1]), gc.shape[-1])
    da = a.new_zeros(a.shape)
    if a.dtype in FLOATS:
        b_op = operand(b, b_scale, precision, "block", g, cdt)
        da = (gc @ b_op.T).to(a.dtype)
    db = b.new_zeros(b.shape)
    if b.dtype in FLOATS:
        a_op = operand(a, a_scale, precision, "row", g, cdt)
        db = (a_op.reshape(rows.shape[0], a_op.shape[-1]).T @ rows).to(b.dtype)
    dbias = rows.sum(dim=0).to(grad.dtype) if has_bias else grad.new_empty(0)
    return da, db, dbias


# --- gated_channels ---------------------------------------------------------------------------


def gated_backward(grad_y: Tensor, x: Tensor, logits: Tensor, weight: Tensor | None,
                   bias: Tensor | None, y: Tensor, mask: Tensor, mode: str
                   ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(dx, dlogits, dweight, dbias)`` as the module docstring states (empty where absent)."""
    cdt = _cdt(x)
    gy = grad_y.to(cdt)
    z = logits.to(cdt)
    sig = torch.sigmoid(z)
    open_ = mask.expand(gy.shape)
    gate = torch.ones_like(sig) if mode == "hard" else sig
    g_open = torch.where(open_, gy * gate, 0)  # dL/dpre on open channels, 0 on closed
    xc = x.to(cdt)
    if weight is None:
        pre = xc
        dx = g_open
        dweight = x.new_empty(0)
        dbias = x.new_empty(0)
    else:
        lead = mask.reshape(math.prod(mask.shape[:-1]), mask.shape[-1]).any(dim=0)  # open in
        # some row
        cols = torch.nonzero(lead).flatten()
        w_open = weight.index_select(0, cols).to(cdt)  # closed rows are never read
        g_cols = g_open.index_select(-1, cols)
        pre = torch.zeros_like(gy)
        part = xc @ w_open.T
        if bias is not None:
            part = part + bias.index_select(0, cols).to(cdt)
        pre.index_copy_(-1, cols, part)
        dx = g_cols @ w_open
        rows = math.prod(x.shape[:-1])
        flat_g, flat_x = g_cols.reshape(rows, cols.numel()), xc.reshape(rows, x.shape[-1])
        dweight = torch.zeros(weight.shape, dtype=cdt, device=weight.device)
        dweight.index_copy_(0, cols, flat_g.T @ flat_x)
        dweight = dweight.to(weight.dtype)
        dbias = x.new_empty(0)
        if bias is not None:
            db = torch.zeros(bias.shape, dtype=cdt, device=bias.device)
            dbias = db.index_copy_(0, cols, flat_g.sum(dim=0)).to(bias.dtype)
    slope = gy * pre * sig * (1 - sig)
    dz = slope if mode == "soft" else torch.where(open_, slope, 0)
    if logits.ndim < dz.ndim:  # static gates: every row contributes
        dz = dz.reshape(math.prod(dz.shape[:-1]), dz.shape[-1]).sum(dim=0)
    return dx.to(x.dtype), dz.to(logits.dtype), dweight, dbias
