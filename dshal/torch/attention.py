"""Block-sparse attention in torch primitives, forward and backward, on any torch device.

This is the attention of the ``torch`` backend plugin (``dshal-torch``) and the backward pass of
``torch.ops.dshal.sparse_attention``; both walk the same tiles, so they live together.

The work is cut into tiles of query rows. For each tile the keys it may touch are gathered once
(the window's range, the blocks any of its queries selected, or every visible key for dense
attention), scores are computed for that tile only and masked by the exact allowed set of
DESIGN 3.1, so memory is ``rows x gathered keys`` per tile and never ``Lq x Lk``. Softmax and
accumulation run in float32 (float64 for float64 inputs). Disallowed entries are removed with
``torch.where`` before anything is summed, and contractions over keys (or queries) whose
operand rows hold NaN/Inf treat those rows apart (:func:`_safe_mm`), so a non-finite key,
value or query never reaches a row it is not allowed in, forward or backward.

Selection is a bool mask ``[B, Hkv, Lq, n_blocks]`` (Lq x n_blocks, never Lq x Lk): top-k by
:func:`select` or the caller's indices by :func:`indices_mask`. The backward treats the
selection as a constant (as NSA/DSA do).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from dshal.calls import AttentionBackwardCall, AttentionCall, resolve_count
from dshal.torch import vml

#: score elements (rows x keys) one tile may hold
_TILE_ELEMS = 1 << 22
#: query rows per tile of a call with a selection
_SEL_ROWS = 64
#: the fixed cost of one tile (Python, kernel launches), counted in score elements
_TILE_OVERHEAD = 1 << 15
#: query rows per selection-score chunk
_SCORE_ROWS = 2048


@dataclass(frozen=True)
class Geometry:
    """Shapes and options of one call (DESIGN 3.1 names)."""

    B: int
    Hq: int
    Hkv: int
    Lq: int
    Lk: int
    D: int
    Dv: int
    block_size: int
    window: int
    causal: bool
    scale: float

    @classmethod
    def of(cls, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, block_size: int,
           window: int, causal: bool, scale: float) -> Geometry:
        B, Hq, Lq, D = q.shape
        return cls(B, Hq, k.shape[1], Lq, k.shape[2], D, v.shape[3], block_size, window,
                   causal, float(scale))

    @property
    def g(self) -> int:
        return self.Hq // self.Hkv if self.Hkv else 1

    @property
    def nb(self) -> int:
        return -(-self.Lk // self.block_size)

    @property
    def offset(self) -> int:
        """Query i sits at key position i + offset (bottom-right alignment)."""
        return self.Lk - self.Lq


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 for float64 inputs, else float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


# --- selection --------------------------------------------------------------------------------


def own_blocks(geo: Geometry, device: torch.device) -> torch.Tensor:
    """int64 [Lq]: the block holding each query's position, -1 when it lies outside [0, Lk)."""
    p = torch.arange(geo.Lq, device=device) + geo.offset
    return torch.where((p >= 0) & (p < geo.Lk), p // geo.block_size, -1)


def candidates(geo: Geometry, device: torch.device) -> torch.Tensor:
    """bool [Lq, nb]: block b may be ranked for query i (all its keys visible, not its own)."""
    blocks = torch.arange(geo.nb, device=device)
    own = own_blocks(geo, device)
    cand = blocks[None, :] != own[:, None]
    if geo.causal:
        last = torch.clamp((blocks + 1) * geo.block_size, max=geo.Lk) - 1
        p = torch.arange(geo.Lq, device=device) + geo.offset
        cand &= last[None, :] <= p[:, None]
    return cand


def block_means(k: torch.Tensor, geo: Geometry) -> torch.Tensor:
    """Mean key of every block in the compute dtype: [B, Hkv, nb, D] (short last block)."""
    cdt = compute_dtype(k.dtype)
    pad = geo.nb * geo.block_size - geo.Lk
    kc = torch.nn.functional.pad(k.to(cdt), (0, 0, 0, pad))
    sums = kc.view(geo.B, geo.Hkv, geo.nb, geo.block_size, geo.D).sum(dim=3)
    starts = torch.arange(geo.nb, device=k.device) * geo.block_size
    counts = torch.clamp(starts + geo.block_size, max=geo.Lk) - starts
    return sums / counts.to(cdt)[:, None]


Scorer = Callable[[torch.Tensor, torch.Tensor, Geometry], torch.Tensor]


def product_scores(q: torch.Tensor, keys: torch.Tensor, geo: Geometry) -> torch.Tensor:
    """``scale * (sum of the g query heads) . key`` in the compute dtype: q's rows
    [B, Hq, rows, D] against the blocks' keys [B, Hkv, nb, D] (means or summaries), as
    [B, Hkv, rows, nb]."""
    rows = q.shape[2]
    qs = q.to(keys.dtype).reshape(geo.B, geo.Hkv, geo.g, rows, geo.D).sum(dim=2)
    return geo.scale * (qs @ keys.transpose(-1, -2))


def select(q: torch.Tensor, k: torch.Tensor, geo: Geometry, top_k: int | float,
           summaries: torch.Tensor | None = None, *, scores: Scorer = product_scores,
           rows: int = _SCORE_ROWS) -> torch.Tensor:
    """bool [B, Hkv, Lq, nb]: the forced own block plus the ``top_k`` best candidates.

    Scores ``scale * (sum of the g query heads) . block mean`` (or . ``summaries``
    [B, Hkv, nb, D], the caller's block_keys), ranked descending with ties to the lower block,
    non-finite scores after every finite one (lower block first among them). ``scores``
    computes them ``rows`` queries at a time (:func:`product_scores` by default; dshal-triton
    gives its block-score kernel).
    """
    device, cdt = q.device, compute_dtype(q.dtype)
    cand = candidates(geo, device)
    take = torch.from_numpy(np.asarray(resolve_count(top_k, cand.sum(-1).cpu().numpy())))
    take = take.to(device)
    own = own_blocks(geo, device)
    keys = block_means(k, geo) if summaries is None else summaries.to(cdt)  # [B, Hkv, nb, D]
    sel = torch.zeros(geo.B, geo.Hkv, geo.Lq, geo.nb, dtype=torch.bool, device=device)
    for i0 in range(0, geo.Lq, rows):
        i1 = min(geo.Lq, i0 + rows)
        sel[:, :, i0:i1] = pick(scores(q[:, :, i0:i1], keys, geo), cand[i0:i1], take[i0:i1],
                                own[i0:i1])
    return sel


def pick(scores: torch.Tensor, cand: torch.Tensor, take: torch.Tensor, own: torch.Tensor
         ) -> torch.Tensor:
    """bool [..., rows, nb]: the forced own block plus the ``take`` best candidates of each row
    of ``scores`` [..., rows, nb] (``cand`` [rows, nb], ``take`` and ``own`` [rows], or with
    leading dims that broadcast against the scores' (batched sequences)), ranked
    descending with ties to the lower block, non-finite scores after every finite one (lower
    block first among them). Shared with backends that compute the scores in their own
    kernels (dshal-triton)."""
    positions = torch.arange(scores.shape[-1], device=scores.device)
    good = cand & torch.isfinite(scores)
    # rank: stable sort by score (descending), then stable sort by class (good first, then
    # non-finite candidates, then non-candidates): ties keep the lower block first
    by_score = torch.sort(torch.where(good, scores, 0), dim=-1, descending=True,
                          stable=True).indices
    klass = torch.where(good, 0, torch.where(cand, 1, 2)).expand_as(scores)
    by_class = torch.sort(klass.gather(-1, by_score), dim=-1, stable=True).indices
    order = by_score.gather(-1, by_class)
    rank = torch.empty_like(order).scatter_(-1, order, positions.expand_as(order))
    picked = cand & (rank < take[..., None])
    picked |= positions == own[..., None]
    return picked


def indices_mask(indices: torch.Tensor, geo: Geometry) -> torch.Tensor:
    """bool [B, Hkv, Lq, nb] from the caller's block indices (-1 ignored, duplicates once)."""
    idx = indices.to(torch.int64)
    idx = torch.where(idx < 0, geo.nb, idx)
    mask = torch.zeros(*idx.shape[:3], geo.nb + 1, dtype=torch.bool, device=idx.device)
    mask.scatter_(-1, idx, True)
    return mask[..., : geo.nb]


def mask_to_indices(sel: torch.Tensor, width: int | None = None) -> torch.Tensor:
    """Selected blocks ascending, -1 padded: int64 [B, Hkv, Lq, width] (default: the widest
    row)."""
    nb = sel.shape[-1]
    if width is None:
        width = int(sel.sum(-1).max()) if sel.numel() else 0
    cols = torch.where(sel, torch.arange(nb, device=sel.device), nb)
    cols = torch.sort(cols, dim=-1).values[..., :width]
    cols = torch.where(cols == nb, -1, cols)
    if cols.shape[-1] < width:
        cols = torch.nn.functional.pad(cols, (0, width - cols.shape[-1]), value=-1)
    return cols


# --- tiles ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Tile:
    """Query rows [i0, i1) of the (batch, kv head) pairs ``lead`` (two slices), the keys they may
    touch (a slice or an index tensor) and the allowed mask: [rows, keys] when it is the same
    for every pair, else [lead..., rows, keys]."""

    lead: tuple[slice, slice]
    i0: int
    i1: int
    keys: slice | torch.Tensor
    allowed: torch.Tensor

    @property
    def rows(self) -> int:
        return self.i1 - self.i0

    def per_head(self) -> torch.Tensor:
        """The allowed mask broadcastable over the heads of a tile's scores viewed as
        [lead..., g, rows, keys]."""
        return self.allowed if self.allowed.ndim == 2 else self.allowed.unsqueeze(2)


_EVERY = (slice(None), slice(None))


def tiles(geo: Geometry, sel: torch.Tensor | None, device: torch.device) -> Iterator[Tile]:
    """Every tile of a call. Without a selection a tile spans every (batch, kv head) pair (they
    share their keys). With one, a row range is one tile over every pair when the union of the
    pairs' blocks costs less than a tile per pair would, else one tile per pair."""
    if geo.Lq == 0 or geo.Lk == 0 or geo.B * geo.Hkv == 0:
        return
    if sel is None:
        span = geo.Lk if geo.window == 0 else min(geo.Lk, 2 * geo.window)
        rows = max(1, min(geo.Lq, _TILE_ELEMS // max(1, geo.B * geo.Hq * span)))
        for i0 in range(0, geo.Lq, rows):
            tile = _tile(geo, _EVERY, i0, min(geo.Lq, i0 + rows), None, device)
            if tile is not None:
                yield tile
        return
    pairs = geo.B * geo.Hkv
    for i0 in range(0, geo.Lq, _SEL_ROWS):
        i1 = min(geo.Lq, i0 + _SEL_ROWS)
        part = sel[:, :, i0:i1].any(dim=2)  # [B, Hkv, nb]: blocks each pair's rows use
        union, each = int(part.any(dim=(0, 1)).sum()), int(part.sum())
        if pairs * union * geo.block_size * (i1 - i0) <= \
                each * geo.block_size * (i1 - i0) + (pairs - 1) * _TILE_OVERHEAD:
            leads = [_EVERY]
        else:
            leads = [(slice(b, b + 1), slice(t, t + 1)) for b in range(geo.B)
                     for t in range(geo.Hkv)]
        for lead in leads:
            tile = _tile(geo, lead, i0, i1, sel[lead][:, :, i0:i1], device)
            if tile is not None:
                yield tile


def _tile(geo: Geometry, lead: tuple[slice, slice], i0: int, i1: int,
          sel: torch.Tensor | None, device: torch.device) -> Tile | None:
    """The tile of rows [i0, i1) of ``lead`` (``sel``: their selection [lead..., rows, nb]);
    None when none of its queries may see any key."""
    p0, p1 = i0 + geo.offset, i1 - 1 + geo.offset  # first and last position
    vis_end = min(geo.Lk, p1 + 1) if geo.causal else geo.Lk  # keys [0, vis_end) visible
    if geo.window > 0:
        w_lo, w_hi = max(0, p0 - geo.window + 1), min(vis_end, p1 + geo.window)
    elif sel is None:
        w_lo, w_hi = 0, vis_end  # dense
    else:
        w_lo, w_hi = 0, 0
    bs = geo.block_size
    if sel is None:
        if w_hi <= w_lo:
            return None
        keys: slice | torch.Tensor = slice(w_lo, w_hi)
        j = torch.arange(w_lo, w_hi, device=device)
    else:
        used = sel.any(dim=2).any(dim=1).any(dim=0)
        if w_hi > w_lo:
            used[w_lo // bs: (w_hi - 1) // bs + 1] = True
        blocks = torch.nonzero(used).flatten().tolist()
        if not blocks:
            return None
        if blocks[-1] - blocks[0] + 1 == len(blocks):  # contiguous: a slice, no gather
            j_lo, j_hi = blocks[0] * bs, min(vis_end, (blocks[-1] + 1) * bs)
            if j_hi <= j_lo:
                return None
            keys = slice(j_lo, j_hi)
            j = torch.arange(j_lo, j_hi, device=device)
        else:
            b_idx = torch.tensor(blocks, device=device)
            j = (b_idx[:, None] * bs + torch.arange(bs, device=device)).flatten()
            j = j[j < vis_end]
            if j.numel() == 0:
                return None
            keys = j
    p = torch.arange(p0, p1 + 1, device=device)
    allowed = torch.ones(p.numel(), j.numel(), dtype=torch.bool, device=device)
    if geo.causal:
        allowed &= j[None, :] <= p[:, None]
    in_window = (p[:, None] - j[None, :]).abs() < geo.window
    if sel is not None:
        allowed = allowed & (in_window | sel[..., j // bs])
    elif geo.window > 0:
        allowed &= in_window
    return Tile(lead, i0, i1, keys, allowed)


def _rows(x: torch.Tensor, tile: Tile, geo: Geometry, cdt: torch.dtype) -> torch.Tensor:
    """The tile's query rows of x [B, Hq, Lq, E] as [lead..., g * rows, E] in ``cdt``."""
    b, t = tile.lead
    heads = slice(None) if t.start is None else slice(t.start * geo.g, t.stop * geo.g)
    x = x[b, heads, tile.i0:tile.i1].to(cdt)
    # the kv-head count spelled out: -1 cannot be inferred when E = 0 (D = 0 is valid)
    return x.reshape(x.shape[0], x.shape[1] // geo.g, geo.g * (tile.i1 - tile.i0), x.shape[-1])


def _keys(x: torch.Tensor, tile: Tile, cdt: torch.dtype) -> torch.Tensor:
    """The tile's keys of x [B, Hkv, Lk, E] as [lead..., keys, E] in ``cdt``."""
    return x[tile.lead][:, :, tile.keys].to(cdt)


def _bad_rows(x: torch.Tensor | None) -> torch.Tensor | None:
    """bool [..., rows]: rows of x holding NaN/Inf, or None when x is finite (checked once per
    call, so that tiles of finite inputs skip the careful path)."""
    if x is None:
        return None
    bad = ~torch.isfinite(x).all(dim=-1)
    return bad if bool(bad.any()) else None


def _safe_mm(w: torch.Tensor, x: torch.Tensor, bad: torch.Tensor | None, tile: Tile,
             geo: Geometry, transposed: bool = False) -> torch.Tensor:
    """``w @ x`` where ``w`` (a tile's probabilities or score gradients, [lead..., R, N], or
    their transpose) is 0 wherever the tile does not allow, without 0 * NaN: the rows of x
    marked ``bad`` (NaN/Inf; [lead..., N] or None) contribute only where allowed."""
    if bad is None or not bool(bad.any()):
        return w @ x
    allowed = _expand(tile.allowed, geo.g)
    allowed = allowed.transpose(-1, -2) if transposed else allowed
    out = w @ torch.where(bad[..., None], 0, x)
    cols = torch.nonzero(bad.flatten(0, -2).any(dim=0)).flatten()
    ok = allowed.expand_as(w)[..., cols] & bad[..., None, cols]  # [..., R, nbad]
    terms = w[..., cols, None] * x[..., cols, :][..., None, :, :]  # [..., R, nbad, E]
    return out + torch.where(ok[..., None], terms, 0).sum(dim=-2)


def _expand(allowed: torch.Tensor, g: int) -> torch.Tensor:
    """The tile's allowed mask for its g heads' rows: [..., g * rows, keys]."""
    return allowed.repeat(*([1] * (allowed.ndim - 2)), g, 1)


def _row_flags(bad: torch.Tensor | None, tile: Tile, geo: Geometry) -> torch.Tensor | None:
    """A [B, Hq, Lq] bad-row mask as the tile's rows [lead..., g * rows]."""
    return None if bad is None else _rows(bad[..., None], tile, geo, torch.bool)[..., 0]


def _key_flags(bad: torch.Tensor | None, tile: Tile) -> torch.Tensor | None:
    """A [B, Hkv, Lk] bad-row mask as the tile's keys [lead..., keys]."""
    return None if bad is None else bad[tile.lead][:, :, tile.keys]


def _scores(q: torch.Tensor, k: torch.Tensor, geo: Geometry) -> torch.Tensor:
    """A tile's scaled scores [lead..., g * rows, keys] (fresh: callers work in place)."""
    return (q * geo.scale) @ k.transpose(-1, -2)


def _by_head(x: torch.Tensor, tile: Tile, geo: Geometry) -> torch.Tensor:
    """[lead..., g * rows, keys] viewed as [lead..., g, rows, keys]."""
    return x.unflatten(-2, (geo.g, tile.rows))


def _softmax(q: torch.Tensor, k: torch.Tensor, tile: Tile, geo: Geometry
             ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(p, lse)`` of a tile: probabilities [lead..., g * rows, keys], exactly 0 where not
    allowed, and lse [lead..., g * rows]. As the reference: a row with nothing allowed gives
    p = 0 and lse = -inf; an allowed row whose best score is +-inf gives NaN."""
    s = _scores(q, k, geo)
    s5 = _by_head(s, tile, geo)
    allowed = tile.per_head()
    s5.masked_fill_(~allowed, -math.inf)
    some = allowed.any(dim=-1, keepdim=True)
    m = torch.where(some, s5.amax(dim=-1, keepdim=True), 0)
    s5.sub_(m).exp_()  # disallowed: exp(-inf) = 0
    total = s5.sum(dim=-1, keepdim=True)
    lse = torch.where(some, m + torch.log(total), -math.inf)[..., 0]
    s5.div_(torch.where(total == 0, 1, total))
    return s, lse.flatten(-2)


def _recomputed(q: torch.Tensor, k: torch.Tensor, lse: torch.Tensor, tile: Tile,
                geo: Geometry) -> torch.Tensor:
    """A tile's probabilities [lead..., g * rows, keys] from its saved ``lse`` (0 where not
    allowed, whatever the scores hold there)."""
    s = _scores(q, k, geo)
    s.sub_(torch.where(torch.isfinite(lse), lse, 0)[..., None]).exp_()
    _by_head(s, tile, geo).masked_fill_(~tile.per_head(), 0)
    return s


# --- forward and backward ---------------------------------------------------------------------


def forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, geo: Geometry,
            sel: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(out [B, Hq, Lq, Dv] in q's dtype, lse [B, Hq, Lq] float32)`` over the allowed set."""
    cdt, device = compute_dtype(q.dtype), q.device
    vml.ensure(device)
    out = torch.zeros(geo.B, geo.Hq, geo.Lq, geo.Dv, dtype=cdt, device=device)
    lse = torch.full((geo.B, geo.Hq, geo.Lq), -math.inf, dtype=cdt, device=device)
    out5 = out.view(geo.B, geo.Hkv, geo.g, geo.Lq, geo.Dv)
    lse4 = lse.view(geo.B, geo.Hkv, geo.g, geo.Lq)
    v_bad = _bad_rows(v)
    for tile in tiles(geo, sel, device):
        p, lse_t = _softmax(_rows(q, tile, geo, cdt), _keys(k, tile, cdt), tile, geo)
        o = _safe_mm(p, _keys(v, tile, cdt), _key_flags(v_bad, tile), tile, geo)
        out5[tile.lead][:, :, :, tile.i0:tile.i1] = _by_head(o, tile, geo)
        lse4[tile.lead][:, :, :, tile.i0:tile.i1] = lse_t.unflatten(-1, (geo.g, tile.rows))
    return out.to(q.dtype), lse.to(torch.float32)


def backward(grad_out: torch.Tensor | None, grad_lse: torch.Tensor | None, q: torch.Tensor,
             k: torch.Tensor, v: torch.Tensor, lse: torch.Tensor, geo: Geometry,
             sel: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients ``(dq, dk, dv)`` of out and lse over each query's allowed set (selection held
    constant), recomputing each tile's probabilities from ``lse``; in q's dtype."""
    cdt, device = compute_dtype(q.dtype), q.device
    vml.ensure(device)
    dq = torch.zeros(q.shape, dtype=cdt, device=device)
    dk = torch.zeros(k.shape, dtype=cdt, device=device)
    dv = torch.zeros(v.shape, dtype=cdt, device=device)
    dq5 = dq.view(geo.B, geo.Hkv, geo.g, geo.Lq, geo.D)
    q_bad, k_bad, go_bad = _bad_rows(q), _bad_rows(k), _bad_rows(grad_out)
    for tile in tiles(geo, sel, device):
        qt, kt = _rows(q, tile, geo, cdt), _keys(k, tile, cdt)
        p = _recomputed(qt, kt, _rows(lse[..., None], tile, geo, cdt)[..., 0], tile, geo)
        if grad_out is not None:
            go = _rows(grad_out, tile, geo, cdt)
            ds = go @ _keys(v, tile, cdt).transpose(-1, -2)  # dp, then ds in place
            _by_head(ds, tile, geo).masked_fill_(~tile.per_head(), 0)
            delta = (p * ds).sum(dim=-1, keepdim=True)
            ds.sub_(delta).mul_(p)
            if not bool(torch.isfinite(delta).all()):  # a NaN row: keep 0 where masked
                _by_head(ds, tile, geo).masked_fill_(~tile.per_head(), 0)
            _accumulate(dv, tile, _safe_mm(p.transpose(-1, -2), go,
                                           _row_flags(go_bad, tile, geo), tile, geo, True))
        else:
            ds = torch.zeros_like(p)
        if grad_lse is not None:  # p is 0 where masked, so is its product
            ds.addcmul_(p, _rows(grad_lse[..., None], tile, geo, cdt))
        dq_t = _safe_mm(ds, kt, _key_flags(k_bad, tile), tile, geo).mul_(geo.scale)
        dq5[tile.lead][:, :, :, tile.i0:tile.i1] = _by_head(dq_t, tile, geo)
        _accumulate(dk, tile, _safe_mm(ds.transpose(-1, -2), qt, _row_flags(q_bad, tile, geo),
                                       tile, geo, True).mul_(geo.scale))
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


def _accumulate(acc: torch.Tensor, tile: Tile, part: torch.Tensor) -> None:
    """acc[lead][:, :, keys] += part (keys a slice or an index tensor without repeats)."""
    view = acc[tile.lead]
    if isinstance(tile.keys, slice):
        view[:, :, tile.keys] += part
    else:
        view.index_add_(2, tile.keys, part)


# --- the backend entry point ------------------------------------------------------------------


def selection(call: AttentionCall, geo: Geometry, **select_options: Any
              ) -> torch.Tensor | None:
    """The call's block selection mask, or None when it has none (``select_options``: how
    :func:`select` scores the blocks)."""
    if call.top_k is not None and geo.nb:
        return select(call.q, call.k, geo, call.top_k, call.block_keys, **select_options)
    if call.indices is not None:
        return indices_mask(call.indices, geo)
    if call.top_k is not None:  # no keys, no blocks: an empty selection
        return torch.zeros(geo.B, geo.Hkv, geo.Lq, 0, dtype=torch.bool, device=call.q.device)
    return None


def sparse_attention(call: AttentionCall) -> tuple[Any, Any, Any]:
    """Run ``sparse_attention`` (DESIGN 3.1) on torch tensors: ``(out, indices, lse)``."""
    geo = Geometry.of(call.q, call.k, call.v, block_size=call.block_size, window=call.window,
                      causal=call.causal, scale=call.scale)
    sel = selection(call, geo)
    out, lse = forward(call.q, call.k, call.v, geo, sel)
    indices = None
    if call.return_indices:
        assert sel is not None  # validation requires top_k or indices for return_indices
        indices = mask_to_indices(sel)
    return out, indices, lse if call.return_lse else None


def backward_call(call: AttentionBackwardCall) -> tuple[Any, Any, Any]:
    """Run the backward of ``sparse_attention`` (DESIGN 3.1b) on torch tensors: the torch
    backend's ``dshal_sparse_attention_backward_run``. ``(dq, dk, dv)`` in q's dtype."""
    geo = Geometry.of(call.q, call.k, call.v, block_size=call.block_size, window=call.window,
                      causal=call.causal, scale=call.scale)
    sel = None if call.indices is None else indices_mask(call.indices, geo)
    return backward(call.grad_out, call.grad_lse, call.q, call.k, call.v, call.lse, geo, sel)
