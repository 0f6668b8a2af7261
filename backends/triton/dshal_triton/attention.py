"""``sparse_attention`` forward on the triton backend (DESIGN 3.1).

1. Selection (``top_k``): block means of the keys (torch, one pass over k), GQA-shared block
   scores in :func:`.kernels.attention.block_scores_kernel` (tensor-core tiles), then the
   ranking rule shared with the torch backend (:func:`dshal.torch.attention.pick`: descending,
   ties to the lower block, the query's own block forced). ``indices`` from the caller are
   deduplicated the same way. Both become a sorted, -1 padded list per (batch, kv head, query).
2. Attention: :func:`.kernels.attention.attention_fwd_kernel`, one program per (query, batch x
   kv head) over the window / dense range and the listed blocks, out and lse in one pass.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import triton

from dshal.calls import AttentionCall
from dshal.torch.attention import Geometry, mask_to_indices, selection
from dshal_triton import config
from dshal_triton.device import upcast_bf16
from dshal_triton.kernels.attention import LOG2E, attention_fwd_kernel, block_scores_kernel

#: padding of the group's heads to the tensor cores' smallest tile side
_MIN_ROWS = 16


def _pow2(n: int, least: int = 16) -> int:
    return max(least, triton.next_power_of_2(max(n, 1)))


def kernel_scores(q: torch.Tensor, keys: torch.Tensor, geo: Geometry) -> torch.Tensor:
    """float32 [B, Hkv, rows, nb]: the block scores of q's rows [B, Hq, rows, D] against the
    block means [B, Hkv, nb, D], by the block-score kernel (the scorer of
    :func:`dshal.torch.attention.select`)."""
    kmean = keys.to(torch.float32).contiguous()
    rows = q.shape[2]
    scores = torch.empty(geo.B, geo.Hkv, rows, geo.nb, dtype=torch.float32, device=q.device)
    bm, bn = config.SCORE_TILE
    grid = (triton.cdiv(rows, bm), triton.cdiv(geo.nb, bn), geo.B * geo.Hkv)
    block_scores_kernel[grid](
        q, kmean, scores, rows, geo.nb, geo.Hkv, geo.scale, *q.stride(), *kmean.stride(),
        *scores.stride(), G=geo.g, D=geo.D, BD=_pow2(geo.D), BM=bm, BN=bn,
        LOWP=q.dtype != torch.float32)
    return scores


def sparse_attention(call: AttentionCall) -> tuple[Any, Any, Any]:
    """Run ``sparse_attention``: ``(out, indices, lse)``."""
    q, k, v = call.q, call.k, call.v
    geo = Geometry.of(q, k, v, block_size=call.block_size, window=call.window,
                      causal=call.causal, scale=call.scale)
    sel = selection(call, geo, scores=kernel_scores, rows=config.SCORE_ROWS)
    listed = mask_to_indices(sel) if sel is not None else \
        torch.empty(geo.B, geo.Hkv, geo.Lq, 0, dtype=torch.int64, device=q.device)
    out = torch.zeros(geo.B, geo.Hq, geo.Lq, geo.Dv, dtype=q.dtype, device=q.device)
    lse = torch.full((geo.B, geo.Hq, geo.Lq), -math.inf, dtype=torch.float32, device=q.device)
    if geo.B * geo.Hq * geo.Lq and geo.Lk:
        forward(q, k, v, geo, listed.to(torch.int32), sel is None, out, lse)
    return out, (listed if call.return_indices else None), \
        (lse if call.return_lse else None)


def forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, geo: Geometry,
            listed: torch.Tensor, dense: bool, out: torch.Tensor, lse: torch.Tensor) -> None:
    """Fill ``out`` and ``lse`` for the listed blocks plus the window (or every visible key
    when ``dense`` and there is no window)."""
    span = 1 if geo.window > 0 else 2 if dense else 0
    grid = (geo.Lq, geo.B * geo.Hkv)
    attention_fwd_kernel[grid](
        q, k, v, out, lse, listed, geo.Lq, geo.Lk, listed.shape[-1], geo.Hkv, geo.block_size,
        geo.window, geo.scale * LOG2E, *q.stride(), *k.stride(), *v.stride(), *out.stride(),
        *lse.stride(), *listed.stride(),
        G=geo.g, BG=_pow2(geo.g), D=geo.D, BD=_pow2(geo.D), DV=geo.Dv, BDV=_pow2(geo.Dv),
        BN=min(config.ATTENTION_MAX_BLOCK_KEYS, _pow2(geo.block_size)),
        RN=config.ATTENTION_RANGE_KEYS, CAUSAL=geo.causal, RANGE=span,
        IEEE=q.dtype == torch.float32, UPCAST=upcast_bf16(q))
