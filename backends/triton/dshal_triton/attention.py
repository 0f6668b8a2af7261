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

import numpy as np
import torch
import triton

from dshal.calls import AttentionCall, resolve_count
from dshal.torch.attention import (
    Geometry,
    block_means,
    candidates,
    indices_mask,
    mask_to_indices,
    own_blocks,
    pick,
)
from dshal_triton import config
from dshal_triton.device import upcast_bf16
from dshal_triton.kernels.attention import LOG2E, attention_fwd_kernel, block_scores_kernel

#: padding of the group's heads to the tensor cores' smallest tile side
_MIN_ROWS = 16


def _pow2(n: int, least: int = 16) -> int:
    return max(least, triton.next_power_of_2(max(n, 1)))


def select(q: torch.Tensor, k: torch.Tensor, geo: Geometry, top_k: int | float) -> torch.Tensor:
    """bool [B, Hkv, Lq, nb]: the forced own block plus the ``top_k`` best candidates, scored by
    the block-score kernel."""
    device = q.device
    cand = candidates(geo, device)
    take = torch.from_numpy(np.asarray(resolve_count(top_k, cand.sum(-1).cpu().numpy())))
    take = take.to(device)
    own = own_blocks(geo, device)
    kmean = block_means(k, geo).to(torch.float32).contiguous()  # [B, Hkv, nb, D]
    sel = torch.zeros(geo.B, geo.Hkv, geo.Lq, geo.nb, dtype=torch.bool, device=device)
    bm, bn = config.SCORE_TILE
    for i0 in range(0, geo.Lq, config.SCORE_ROWS):
        i1 = min(geo.Lq, i0 + config.SCORE_ROWS)
        qc = q[:, :, i0:i1]
        scores = torch.empty(geo.B, geo.Hkv, i1 - i0, geo.nb, dtype=torch.float32,
                             device=device)
        grid = (triton.cdiv(i1 - i0, bm), triton.cdiv(geo.nb, bn), geo.B * geo.Hkv)
        block_scores_kernel[grid](
            qc, kmean, scores, i1 - i0, geo.nb, geo.Hkv, geo.scale, *qc.stride(),
            *kmean.stride(), *scores.stride(), G=geo.g, D=geo.D, BD=_pow2(geo.D), BM=bm,
            BN=bn, LOWP=q.dtype != torch.float32)
        sel[:, :, i0:i1] = pick(scores, cand[i0:i1], take[i0:i1], own[i0:i1])
    return sel


def selection(call: AttentionCall, geo: Geometry) -> torch.Tensor | None:
    """The call's block selection mask, or None when it has none."""
    if call.top_k is not None and geo.nb:
        return select(call.q, call.k, geo, call.top_k)
    if call.indices is not None:
        return indices_mask(call.indices, geo)
    if call.top_k is not None:  # no keys, no blocks: an empty selection
        return torch.zeros(geo.B, geo.Hkv, geo.Lq, 0, dtype=torch.bool, device=call.q.device)
    return None


def sparse_attention(call: AttentionCall) -> tuple[Any, Any, Any]:
    """Run ``sparse_attention``: ``(out, indices, lse)``."""
    q, k, v = call.q, call.k, call.v
    geo = Geometry.of(q, k, v, block_size=call.block_size, window=call.window,
                      causal=call.causal, scale=call.scale)
    sel = selection(call, geo)
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
