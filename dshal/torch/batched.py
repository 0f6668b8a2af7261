"""Short-query sequences of a 3.1a call in one set of torch ops: batched decode (DESIGN 3.1a).

Serving's hot path is a batch of sequences with one (or a few) new queries each and long
caches. :func:`attend` serves all of them at once, with no per-sequence Python loop; the
layout comes from :func:`dshal.forms.seq_arrays` (host arrays, no loop either):

1. **Queries**: each sequence's rows, padded to the longest (``lqm`` rows), gathered from q.
2. **Selection** (``top_k``): scores ``scale * (sum of the group's query heads) . summary``
   where the summaries are the caller's ``block_keys`` (only they are read, never the keys) or
   the block means of the sequence's keys (every key read, exactly as 3.1 defines them);
   candidates, counts and the forced own block per row as in :func:`.attention.select`, ranked
   by :func:`.attention.pick` (the same tie-break). With ``indices``, the caller's blocks.
3. **Gather**: per (sequence, kv head) the blocks any of its rows selected plus the blocks its
   window touches (one row per sequence: padded to a width known from the options, no device
   sync; several: to the widest union), read block by block through ``block_table`` (paged)
   or from the packed / batched rows, never past a page the sequence owns.
4. **Attention**: one batched softmax over the gathered keys with the exact allowed mask
   (:func:`.attention._softmax`: slots past ``seqlens_k``, padding and keys a row may not see
   get -inf before the exponential), values zeroed where no row of the sequence may see them
   before the product, and where rows differ the NaN-safe product of
   :func:`.attention._safe_mm`, so garbage in unused slots or unattended keys never reaches an
   output.

The reads per (sequence, kv head): the selected blocks and the window's, plus the summaries of
its blocks; the cache length enters only through the summaries (with ``block_keys``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from dshal.calls import AttentionCall, resolve_count
from dshal.forms import SeqArrays
from dshal.torch import attention
from dshal.torch.attention import Geometry, Tile, compute_dtype

#: score elements (rows x gathered keys, all heads) one batch of sequences may hold
_BUDGET = 1 << 24


@dataclass(frozen=True)
class Rows:
    """The results of the served query rows: ``out`` [m, Hq, Dv] (compute dtype), ``lse``
    [m, Hq] and the selection ``indices`` [m, Hkv, width] (or None) of rows
    ``(b[r], :, q[r])`` of the call's layout (int64 host arrays [m]). With ``b`` and ``q``
    None the rows are the call's whole layout, as it holds them: out [B, Hq, Lq, Dv], lse
    [B, Hq, Lq], indices [B, Hkv, Lq, width] (a batch of decode steps: nothing to scatter)."""

    b: np.ndarray | None
    q: np.ndarray | None
    out: torch.Tensor
    lse: torch.Tensor
    indices: torch.Tensor | None


def attend(call: AttentionCall, seqs: SeqArrays) -> list[Rows]:
    """Every query row of ``seqs`` (sequences with at least one query), in batches of
    sequences whose score matrices (and keys read for block means) fit :data:`_BUDGET` (one
    batch for a decode step)."""
    q = call.q
    Hq, Hkv = q.shape[1], call.k.shape[1]
    if seqs.lq.size == 0 or Hkv == 0:
        return []
    per_seq = Hq * int(seqs.lq.max()) * max(1, _width(call, seqs)) * call.block_size
    if call.top_k is not None and call.block_keys is None:  # block means read every key
        per_seq = max(per_seq, Hkv * int(seqs.lk.max()) * q.shape[3])
    step = max(1, _BUDGET // max(1, per_seq))
    return [_attend(call, seqs.subset(np.arange(seqs.lq.size)[s:s + step]))
            for s in range(0, seqs.lq.size, step)]


def _width(call: AttentionCall, seqs: SeqArrays) -> int:
    """How many blocks a (sequence, kv head) may gather at most: its rows' selections and its
    window's blocks (an upper bound from the options and shapes alone)."""
    bs, w = call.block_size, call.window
    lqm = int(seqs.lq.max())
    nbm = int(-(-seqs.lk.max() // bs)) if seqs.lk.size else 0
    if call.top_k is None and call.indices is None and w == 0:
        return nbm  # dense
    span = 0 if w == 0 else (lqm - 1 + w if call.causal else lqm + 2 * w - 2)
    blocks = 0 if w == 0 else -(-span // bs) + 1
    if call.indices is not None:
        blocks += lqm * call.indices.shape[-1]
    elif call.top_k is not None:
        top = call.top_k if isinstance(call.top_k, int) else nbm
        blocks += lqm * (min(top, nbm) + 1)
    return min(nbm, blocks)


def _attend(call: AttentionCall, seqs: SeqArrays) -> Rows:
    q, k, v = call.q, call.k, call.v
    dev, cdt = q.device, compute_dtype(q.dtype)
    Hq, D = q.shape[1], q.shape[3]
    Hkv, Dv = k.shape[1], v.shape[3]
    g, bs = Hq // Hkv, call.block_size
    n, lqm = seqs.lq.size, int(seqs.lq.max())
    nb = -(-seqs.lk // bs)
    nbm = int(nb.max())
    rows = np.arange(lqm)
    real = rows[None, :] < seqs.lq[:, None]  # [n, lqm]: rows that exist
    qrow = seqs.q0[:, None] + np.minimum(rows[None, :], seqs.lq[:, None] - 1)
    pos = rows[None, :] + (seqs.lk - seqs.lq)[:, None]  # [n, lqm]: key position of each row
    qb = np.broadcast_to(seqs.b[:, None], (n, lqm))
    geo = Geometry(n, Hq, Hkv, lqm, nbm * bs, D, Dv, bs, call.window, call.causal, call.scale)
    whole = n == q.shape[0] and lqm == q.shape[2] and bool(real.all()) and \
        bool((seqs.b == np.arange(n)).all())  # rows = the call's layout [B, Hq, Lq]
    qg = q.to(cdt) if whole else \
        q[_dev(qb, dev), :, _dev(qrow, dev)].to(cdt).permute(0, 2, 1, 3)  # [n, Hq, lqm, D]
    sel = _selection(call, seqs, qg, geo, qb, qrow, pos, real)
    blocks = _blocks(call, seqs, sel, pos, real, _width(call, seqs), dev)  # nbm = none
    W = blocks.shape[-1]
    rows_of = _RowsOf(None if whole else _dev(real, dev))
    indices = None if sel is None else rows_of(attention.mask_to_indices(sel))
    if W == 0 or nbm == 0:  # no keys anywhere: nothing allowed
        return Rows(*rows_of.where(qb, qrow, real),
                    rows_of(torch.zeros(n, Hq, lqm, Dv, dtype=cdt, device=dev)),
                    rows_of(torch.full((n, Hq, lqm), -math.inf, dtype=torch.float32,
                                       device=dev)), indices)
    j = blocks[..., None] * bs + torch.arange(bs, device=dev)  # [n, Hkv, W, bs]
    present = j < _dev(seqs.lk, dev)[:, None, None, None]  # padding blocks lie past lk too
    j, present = j.flatten(-2), present.flatten(-2)  # [n, Hkv, N]
    kg = _gather(k, call, seqs, blocks, j, present).to(cdt)  # masked in the scores
    allowed = _allowed(call, sel, blocks, j, present, _dev(pos, dev), _dev(real, dev), nbm)
    tile = Tile((slice(None), slice(None)), 0, lqm, slice(None), allowed)
    seen = allowed.any(dim=2)  # [n, Hkv, N]: keys some row may see
    vg = _gather(v, call, seqs, blocks, j, present).to(cdt)
    vg = vg.masked_fill_(~seen[..., None], 0)  # no NaN * 0 in the product below
    qr = qg.reshape(n, Hkv, g * lqm, D)
    p, lse = attention._softmax(qr, kg, tile, geo)
    bad = None if lqm == 1 else attention._bad_rows(vg)  # one row: vg is 0 where not seen
    o = attention._safe_mm(p, vg, bad, tile, geo)  # [n, Hkv, g * lqm, Dv]
    return Rows(*rows_of.where(qb, qrow, real), rows_of(o.reshape(n, Hq, lqm, Dv)),
                rows_of(lse.reshape(n, Hq, lqm).to(torch.float32)), indices)


class _RowsOf:
    """Cuts the real rows out of [n, H, lqm, ...] results as [m, H, ...] (``keep``: bool
    [n, lqm]), or with ``keep`` None leaves them in the call's layout."""

    def __init__(self, keep: torch.Tensor | None) -> None:
        self.keep = keep

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return x if self.keep is None else x.transpose(1, 2)[self.keep]

    def where(self, qb: np.ndarray, qrow: np.ndarray, real: np.ndarray
              ) -> tuple[np.ndarray | None, np.ndarray | None]:
        """The destinations ``(b, q)`` of the cut rows (None, None in the call's layout)."""
        return (None, None) if self.keep is None else (qb[real], qrow[real])


def _dev(x: np.ndarray, dev: torch.device) -> torch.Tensor:
    """A host array on the device (int64 or bool)."""
    return torch.from_numpy(np.array(x)).to(dev)


# --- selection --------------------------------------------------------------------------------


def _selection(call: AttentionCall, seqs: SeqArrays, qg: torch.Tensor, geo: Geometry,
               qb: np.ndarray, qrow: np.ndarray, pos: np.ndarray, real: np.ndarray
               ) -> torch.Tensor | None:
    """bool [n, Hkv, lqm, nbm]: every row's selected blocks (False on padded rows), or None
    without top_k and indices."""
    dev, n, lqm, nbm = qg.device, qg.shape[0], qg.shape[2], geo.nb
    if call.indices is not None:
        idx = call.indices[_dev(qb, dev), :, _dev(qrow, dev)].permute(0, 2, 1, 3)
        idx = torch.where(_dev(real, dev)[:, None, :, None], idx, -1)
        return attention.indices_mask(idx, geo)
    if call.top_k is None:
        return None
    if nbm == 0:
        return torch.zeros(n, geo.Hkv, lqm, 0, dtype=torch.bool, device=dev)
    cand, take, own = _candidates(seqs, pos, real, geo, call.top_k)
    summaries = _summaries(call, seqs, geo, dev)  # [n, Hkv, nbm, D]
    scores = attention.product_scores(qg, summaries, geo)  # [n, Hkv, lqm, nbm]
    return attention.pick(scores, _dev(cand, dev)[:, None], _dev(take, dev)[:, None],
                          _dev(own, dev)[:, None])


def _candidates(seqs: SeqArrays, pos: np.ndarray, real: np.ndarray, geo: Geometry,
                top_k: int | float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Host ``(cand [n, lqm, nbm], take [n, lqm], own [n, lqm])`` of every row, as
    :func:`.attention.candidates` / ``own_blocks`` give them for its sequence alone."""
    bs = geo.block_size
    lk = seqs.lk[:, None]
    own = np.where(real & (pos >= 0) & (pos < lk), pos // bs, -1)
    blocks = np.arange(geo.nb)
    nb = -(-seqs.lk // bs)
    cand = (blocks[None, None, :] < nb[:, None, None]) & (blocks != own[..., None])
    cand &= real[..., None]
    if geo.causal:
        last = np.minimum((blocks[None, :] + 1) * bs, lk) - 1  # [n, nbm]
        cand &= last[:, None, :] <= pos[..., None]
    take = np.asarray(resolve_count(top_k, cand.sum(axis=-1)), np.int64)
    return cand, take, own


def _summaries(call: AttentionCall, seqs: SeqArrays, geo: Geometry, dev: torch.device
               ) -> torch.Tensor:
    """[n, Hkv, nbm, D] in the compute dtype: the first nbm block_keys rows of every sequence
    (rows past its blocks are read but never candidates), or the block means of its keys."""
    bk, n, nbm, bs = call.block_keys, seqs.lq.size, geo.nb, geo.block_size
    cdt = compute_dtype(call.q.dtype)
    if bk is None:
        blocks = torch.arange(nbm, device=dev).expand(n, geo.Hkv, nbm)
        j = (blocks[..., None] * bs + torch.arange(bs, device=dev)).flatten(-2)
        present = j < _dev(seqs.lk, dev)[:, None, None]
        keys = torch.where(present[..., None],
                           _gather(call.k, call, seqs, blocks, j, present).to(cdt), 0)
        sums = keys.view(n, geo.Hkv, nbm, bs, geo.D).sum(dim=3)
        counts = np.clip(seqs.lk[:, None] - np.arange(nbm)[None, :] * bs, 1, bs)
        return sums / _dev(counts, dev).to(cdt)[:, None, :, None]
    if seqs.table is not None:  # paged: [P, Hkv, page_size // block_size, D]
        per = bk.shape[2]
        n_pages = -(-nbm // per)
        table = np.where(np.arange(n_pages)[None, :] < -(-seqs.lk // seqs.page_size)[:, None],
                         _columns(seqs.table, n_pages), 0)
        rows = bk[_dev(table, dev)].permute(0, 2, 1, 3, 4)  # [n, Hkv, n_pages, per, D]
        return rows.reshape(n, geo.Hkv, n_pages * per, geo.D)[:, :, :nbm].to(cdt)
    if call.cu_seqlens_k is not None:  # varlen: [1, Hkv, sum of n_blocks, D]
        last = max(bk.shape[2] - 1, 0)
        rows = np.minimum(seqs.nb0[:, None] + np.arange(nbm)[None, :], last)
        return bk[0][:, _dev(rows, dev)].permute(1, 0, 2, 3).to(cdt)
    return bk[_dev(seqs.kb, dev), :, :nbm].to(cdt)


def _columns(table: np.ndarray, width: int) -> np.ndarray:
    """The first ``width`` columns of a block table (zero-padded past its own)."""
    out = np.zeros((table.shape[0], width), np.int64)
    m = min(width, table.shape[1])
    out[:, :m] = table[:, :m]
    return out


# --- gather and mask --------------------------------------------------------------------------


def _blocks(call: AttentionCall, seqs: SeqArrays, sel: torch.Tensor | None, pos: np.ndarray,
            real: np.ndarray, W: int, dev: torch.device) -> torch.Tensor:
    """int64 [n, Hkv, W']: the blocks each (sequence, kv head) gathers, ascending, padded with
    nbm: those any of its rows selected and those its window (or, dense, its visible keys)
    touches. W' is the bound ``W`` for one row per sequence (decode: no device sync), else the
    widest union (rows of a sequence mostly select the same blocks)."""
    bs, w, n = call.block_size, call.window, seqs.lq.size
    Hkv = call.k.shape[1]
    nb = -(-seqs.lk // bs)
    nbm = int(nb.max())
    blocks = np.arange(nbm)
    first = np.where(real, pos, np.iinfo(np.int64).max).min(axis=1)  # [n]
    last = np.where(real, pos, np.iinfo(np.int64).min).max(axis=1)
    exists = blocks[None, :] < nb[:, None]
    if w > 0 or (sel is None):
        lo = first - w + 1 if w > 0 else np.zeros(n, np.int64)
        hi = last if call.causal else (last + w - 1 if w > 0 else seqs.lk - 1)
        touched = exists & (blocks[None, :] * bs <= hi[:, None]) & \
            (np.minimum((blocks[None, :] + 1) * bs, seqs.lk[:, None]) - 1 >= lo[:, None])
        used = _dev(touched, dev)[:, None, :].expand(n, Hkv, nbm)
        if sel is not None:
            used = used | sel.any(dim=2)
    else:
        used = sel.any(dim=2)
    if W > 0 and pos.shape[1] > 1:  # rows of a sequence share blocks: the exact width (a sync)
        W = min(W, int(used.sum(dim=-1).max()))
    cols = torch.where(used, torch.arange(nbm, device=dev), nbm)
    return torch.sort(cols, dim=-1).values[..., :W]


def _gather(x: torch.Tensor, call: AttentionCall, seqs: SeqArrays, blocks: torch.Tensor,
            j: torch.Tensor, present: torch.Tensor) -> torch.Tensor:
    """Keys (or values) of positions ``j`` [n, Hkv, N] (whole blocks ``blocks`` [n, Hkv, W])
    of every sequence: [n, Hkv, N, E]; rows not ``present`` hold some row of x (never read
    past a page the sequence owns: the caller zeroes them). A contiguous x is read with one
    ``index_select`` of whole rows (a block of a page, or a key), else by advanced indexing."""
    dev = x.device
    n, Hkv = blocks.shape[:2]
    E = x.shape[3]
    heads = torch.arange(Hkv, device=dev)[None, :, None]
    bs = call.block_size
    if E == 0:
        return x.new_zeros(n, Hkv, j.shape[-1], 0)
    if seqs.table is not None:  # whole blocks of pages
        per = x.shape[2] // bs
        col = torch.clamp(blocks // per, max=seqs.table.shape[1] - 1)
        owned = blocks < _dev(-(-seqs.lk // bs), dev)[:, None, None]  # [n, Hkv, W]
        table = _dev(seqs.table, dev)[:, None, :].expand(n, Hkv, -1)
        page = torch.where(owned, torch.gather(table, 2, col), 0)
        if x.is_contiguous():  # rows of bs * E elements
            row = ((page * Hkv + heads) * per + blocks % per).flatten()
            return x.view(-1, bs * E).index_select(0, row).view(n, Hkv, -1, E)
        return x.unflatten(2, (per, bs))[page, heads, blocks % per].flatten(2, 3)
    last = max(x.shape[2] - 1, 0)
    pos = torch.where(present, torch.clamp(_dev(seqs.k0, dev)[:, None, None] + j, max=last), 0)
    b = _dev(seqs.kb, dev)[:, None, None]
    if x.is_contiguous():  # rows of E elements
        row = ((b * Hkv + heads) * x.shape[2] + pos).flatten()
        return x.view(-1, E).index_select(0, row).view(n, Hkv, -1, E)
    return x[b, heads, pos]


def _allowed(call: AttentionCall, sel: torch.Tensor | None, blocks: torch.Tensor,
             j: torch.Tensor, present: torch.Tensor, pos: torch.Tensor, real: torch.Tensor,
             nbm: int) -> torch.Tensor:
    """bool [n, Hkv, lqm, N]: key j allowed for row i (DESIGN 3.1 per sequence)."""
    bs, w = call.block_size, call.window
    n, Hkv, W = blocks.shape
    lqm = pos.shape[1]
    p = pos[:, None, :, None, None]  # [n, 1, lqm, 1, 1]
    jj = j.view(n, Hkv, 1, W, bs)
    allowed = present.view(n, Hkv, 1, W, bs) & real[:, None, :, None, None]
    if call.causal:
        allowed = allowed & (jj <= p)
    if sel is not None:
        blk = torch.clamp(blocks, max=max(nbm - 1, 0))[:, :, None, :].expand(-1, -1, lqm, -1)
        chosen = torch.gather(sel, 3, blk)[..., None]  # [n, Hkv, lqm, W, 1]
        allowed = allowed & (((p - jj).abs() < w) | chosen if w > 0 else chosen)
    elif w > 0:
        allowed = allowed & ((p - jj).abs() < w)
    return allowed.flatten(-2)
