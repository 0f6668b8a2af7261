"""``gated_channels`` on the triton backend.

With a weight, the open output channels (the union over rows for per-row gates) are compacted
into an int32 list and :func:`.kernels.matmul.gated_linear_kernel` computes only those columns:
closed channels' weight rows are never loaded and cost no FLOP, and a per-row mask zeroes the
channels a row closes by selection (NaN/Inf cannot leak). Without a weight there is no product
to put on the tensor cores: the elementwise gate of the torch backend (``dshal_torch.gated``)
runs, and so does its gate rule (threshold or top-``keep``, ties to the lower index).
"""

from __future__ import annotations

import math

import torch
import triton

from dshal.calls import GatedCall
from dshal_torch.gated import gated_channels as gated_elementwise
from dshal_torch.gated import open_mask
from dshal_triton.config import gemm_tiles
from dshal_triton.device import family, upcast_bf16
from dshal_triton.gemm import launch_options
from dshal_triton.kernels.common import IEEE, STORED
from dshal_triton.kernels.matmul import gated_linear_kernel


def gated_channels(call: GatedCall) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Run ``gated_channels``: ``(y, mask)``, y in x's dtype on x's device."""
    if call.weight is None:
        return gated_elementwise(call)
    x, w = call.x, call.weight
    z = call.gate_logits.to(torch.float32)
    mask = open_mask(z, call.mode, call.threshold, call.keep)
    c_out, k = w.shape
    lead = x.shape[:-1]
    rows = math.prod(lead)
    y = torch.zeros((rows, c_out), dtype=x.dtype, device=x.device)
    row_gates = mask.ndim > 1
    used = mask.reshape(rows, c_out).any(dim=0) if row_gates else mask
    cols = torch.nonzero(used).flatten().to(torch.int32)
    n_open = cols.numel()
    if n_open and rows:
        x2 = x.reshape(rows, k)
        m2 = mask.reshape(rows, c_out) if row_gates else mask.reshape(1, c_out)
        gate = None if call.mode == "hard" else torch.sigmoid(z).reshape(-1, c_out)
        native = x.dtype == w.dtype and x.dtype in (torch.bfloat16, torch.float16)
        tiles = gemm_tiles(family(x), "16" if native else "fp32")
        gs = gate if gate is not None else y
        g_strides = (gs.stride(0) if gs.shape[0] > 1 else 0, gs.stride(1))
        m8 = m2.to(torch.int8)
        bias = call.bias if call.bias is not None else y
        grid = (triton.cdiv(rows, tiles.BM), triton.cdiv(n_open, tiles.BN))
        gated_linear_kernel[grid](
            x2, w, y, bias, gs, m8, cols, rows, n_open, k, *x2.stride(), *w.stride(),
            *y.stride(), *g_strides, *m8.stride(),
            MODE=STORED if native else IEEE, HAS_BIAS=call.bias is not None,
            HAS_GATE=gate is not None, ROW_MASK=row_gates, UPCAST=upcast_bf16(x),
            BM=tiles.BM, BN=tiles.BN, BK=tiles.BK,
            **launch_options(x, tiles.num_warps, tiles.num_stages))
    return y.reshape(*lead, c_out), (mask if call.return_mask else None)
