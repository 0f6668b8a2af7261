"""Decode on the CPU: one query per sequence, reading only the keys it attends.

Serving's hot path (DESIGN 3.1a): every sequence of a batch has one new query and a long cache.
All sequences and kv heads are served at once, with no per-sequence Python loop:

1. **Selection** (``top_k``): the scores ``scale * (sum of the group's query heads) .
   block_keys[b]`` from the caller's summaries (only the summaries are read, never the keys),
   candidates the blocks before the query's own block (for a query at the end of its cache the
   causal and non-causal candidates coincide), a stable sort (ties to the lower block,
   non-finite scores last), plus the forced own block. With ``indices`` the caller's blocks
   (deduplicated) are used instead.
2. **Gather**: the key positions attended, padded to the widest sequence: the selected blocks'
   keys outside the window, then the window's keys (so nothing is counted twice), mapped to
   their pages (paged), key rows (varlen) or batch rows (contiguous).
3. **Attention**: one batched product for scores and one for values over the gathered keys,
   softmax in float32 (float64 for float64 inputs). Padding and masked keys get -inf scores and
   zero values before any product, so NaN/Inf in unused page slots or unattended keys never
   reach an output. For float32 C-contiguous pools the compiled loop of ``_decode.c`` does
   steps 2-3 in one pass over the attended pool rows (no gathered copies), its (sequence, kv
   head) pairs split over the backend's threads (each pair's result does not depend on which
   thread computes it).

The reads: (top_k + 1) * block_size + window keys and values per (sequence, kv head) and the
summaries of the sequence's blocks; the cache length enters only through the summaries.
"""

from __future__ import annotations

import os

import numpy as np

from dshal.backends.numpy.attention import parallel_spans
from dshal.calls import AttentionCall, resolve_count
from dshal.forms import Seq

NEG_INF = -np.inf
#: below this many (pair, attended key, head) scores a decode runs on the calling thread
_THREADING_MIN = 1 << 15


def _load_fused():
    """The compiled decode loop, unless missing or switched off (``DSHAL_NUMPY_NATIVE=0``)."""
    if os.environ.get("DSHAL_NUMPY_NATIVE", "1").strip() == "0":
        return None
    try:
        from dshal.backends.numpy import _decode
    except ImportError:
        return None
    return _decode


#: ``dshal.backends.numpy._decode`` (float32 pools: scores, softmax and values fused over the
#: attended pool rows, no gathered copies), or None: the numpy passes below run instead
_FUSED = _load_fused()
#: which decode path runs (``dshal info`` prints it)
STATUS = ("compiled loop (dshal.backends.numpy._decode) for float32 pools" if _FUSED is not None
          else "numpy passes (the compiled loop is not built or DSHAL_NUMPY_NATIVE=0)")


def serves(call: AttentionCall, seqs: list[Seq]) -> bool:
    """Whether the decode path takes this call: at most one query per sequence, and keys
    restricted by a selection from summaries, the caller's indices or a window."""
    if any(s.lq > 1 for s in seqs):
        return False
    if call.top_k is not None:
        return call.block_keys is not None
    return call.indices is not None or call.window > 0


def sparse_attention(call: AttentionCall, seqs: list[Seq]
                     ) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None]:
    """``(out, indices, lse)`` of a call :func:`serves` accepts."""
    q, k, v = call.q, call.k, call.v
    B, Hq, Lq, D = q.shape
    Hkv, Dv = k.shape[1], v.shape[3]
    cdt = np.dtype(np.float64 if q.dtype == np.float64 else np.float32)
    out = np.zeros((B, Hq, Lq, Dv), q.dtype)
    lse = np.full((B, Hq, Lq), NEG_INF, np.float32) if call.return_lse else None
    live = [s for s in seqs if s.lq == 1]
    indices = np.full((B, Hkv, Lq, 0), -1, np.int64) if call.return_indices else None
    if not live or Hkv == 0:
        return out, indices, lse
    g = Hq // Hkv
    qb = np.array([s.b for s in live])
    qr = np.array([s.q0 for s in live])
    lk = np.array([s.lk for s in live], np.int64)
    with np.errstate(all="ignore"):
        blocks = _blocks(call, live, qb, qr, lk)
        pos, valid = _positions(call, blocks, lk)
        o, row_lse = _attend(call, live, q[qb, :, qr].reshape(len(live), Hkv, g, D), pos, valid,
                             cdt)
    out[qb, :, qr] = o.reshape(len(live), Hq, Dv)
    if lse is not None:
        lse[qb, :, qr] = row_lse.reshape(len(live), Hq)
    if indices is not None and blocks is not None:
        picked = _ascending(blocks)
        indices = np.full((B, Hkv, Lq, picked.shape[-1]), -1, np.int64)
        indices[qb, :, qr] = picked
    return out, indices, lse


# --- selection --------------------------------------------------------------------------------


def _blocks(call: AttentionCall, live: list[Seq], qb: np.ndarray, qr: np.ndarray,
            lk: np.ndarray) -> np.ndarray | None:
    """int64 [n, Hkv, m]: blocks attended through selection (-1 = none, no duplicates)."""
    if call.indices is not None:
        idx = np.sort(np.asarray(call.indices)[qb, :, qr], axis=-1)  # [n, Hkv, m]
        dup = np.zeros(idx.shape, bool)
        dup[..., 1:] = idx[..., 1:] == idx[..., :-1]
        return np.where(dup, -1, idx)
    if call.top_k is None:
        return None
    bs = call.block_size
    own = np.where(lk > 0, (lk - 1) // bs, -1)
    want = resolve_count(call.top_k, np.maximum(own, 0))  # candidates: the blocks before own
    n, Hkv = len(live), call.k.shape[1]
    kmax = int(want.max(initial=0))
    chosen = np.full((n, Hkv, kmax), -1, np.int64)
    if kmax:
        nbm = int(own.max()) + 1
        g = call.q.shape[1] // Hkv
        qsum = call.q[qb, :, qr].reshape(n, Hkv, g, -1).sum(axis=2, dtype=np.float64)
        summaries = _summaries(call, live, nbm)  # [n, Hkv, nbm, D]
        scores = call.scale * np.matmul(summaries, qsum[..., None])[..., 0]  # [n, Hkv, nbm]
        cand = np.arange(nbm)[None, :] < own[:, None]
        key = np.where(cand[:, None, :], np.where(np.isfinite(scores), -scores, np.inf), np.nan)
        order = np.argsort(key, axis=-1, kind="stable")[..., :kmax]
        chosen = np.where(np.arange(kmax)[None, None, :] < want[:, None, None], order, -1)
    own_col = np.broadcast_to(own[:, None, None], (n, Hkv, 1))
    return np.concatenate([chosen, own_col], axis=-1)


def _summaries(call: AttentionCall, live: list[Seq], nbm: int) -> np.ndarray:
    """float64 [n, Hkv, nbm, D]: the first ``nbm`` block_keys rows of every sequence (rows
    past a sequence's own block are read but never candidates)."""
    bk = call.block_keys
    if live[0].pages is not None:  # paged: [P, Hkv, page_size // block_size, D]
        per = bk.shape[2]
        n_pages = -(-nbm // per)
        table = np.zeros((len(live), n_pages), np.int64)
        for r, s in enumerate(live):
            m = min(n_pages, len(s.pages))
            table[r, :m] = s.pages[:m]
        # whole pages as flat rows (np.take copies them with memcpy: ~7x faster than the
        # fancy index on the 4-D pool), then [n, Hkv, n_pages * per, D]
        flat = np.take(bk.reshape(bk.shape[0], -1), table.ravel(), axis=0)
        rows = flat.reshape(len(live), n_pages, bk.shape[1], per, bk.shape[3])
        return rows.transpose(0, 2, 1, 3, 4).reshape(len(live), bk.shape[1], -1,
                                                     bk.shape[3])[:, :, :nbm]
    if call.cu_seqlens_k is not None:  # varlen: [1, Hkv, sum of n_blocks, D]
        start = np.array([s.nb0 for s in live])
        rows = np.minimum(start[:, None] + np.arange(nbm)[None, :], max(bk.shape[2] - 1, 0))
        return bk[0][:, rows].transpose(1, 0, 2, 3)
    return bk[np.array([s.kb for s in live]), :, :nbm]


def _ascending(blocks: np.ndarray) -> np.ndarray:
    """Selected blocks sorted ascending, -1 padded to the widest row."""
    big = np.iinfo(np.int64).max
    s = np.sort(np.where(blocks < 0, big, blocks), axis=-1)
    width = int((s != big).sum(axis=-1).max(initial=0))
    s = s[..., :width]
    return np.where(s == big, -1, s)


# --- gather and attention ---------------------------------------------------------------------


def _positions(call: AttentionCall, blocks: np.ndarray | None, lk: np.ndarray
               ) -> tuple[np.ndarray, np.ndarray]:
    """Key positions [n, Hkv, N] each query attends and their validity: selected blocks' keys
    before the window, then the window (keys p - w < j <= p, p = lk - 1)."""
    n, Hkv = lk.size, call.k.shape[1]
    p = (lk - 1)[:, None, None]
    w = min(call.window, int(lk.max(initial=0)))
    parts, masks = [], []
    if blocks is not None:
        bs = call.block_size
        kpos = (blocks[..., None] * bs + np.arange(bs)).reshape(n, Hkv, -1)
        ok = np.repeat(blocks >= 0, bs, axis=-1) & (kpos <= p - w if w else kpos <= p)
        parts.append(kpos)
        masks.append(ok)
    if w:
        wpos = np.broadcast_to(p - w + 1 + np.arange(w), (n, Hkv, w))
        parts.append(wpos)
        masks.append(wpos >= 0)
    pos, valid = np.concatenate(parts, axis=-1), np.concatenate(masks, axis=-1)
    return np.where(valid, pos, 0), valid


def _gather(x: np.ndarray, call: AttentionCall, live: list[Seq], pos: np.ndarray
            ) -> np.ndarray:
    """Rows ``pos`` [n, Hkv, N] of every sequence's keys (or values): [n, Hkv, N, D]."""
    heads = np.arange(x.shape[1])[None, :, None]
    if live[0].pages is not None:
        ps = x.shape[2]
        width = max(1, max(len(s.pages) for s in live))
        table = np.zeros((len(live), width), np.int64)
        for r, s in enumerate(live):
            table[r, :len(s.pages)] = s.pages
        page = table[np.arange(len(live))[:, None, None], pos // ps]
        return x[page, heads, pos % ps]
    rows = np.array([s.kb for s in live])[:, None, None]
    start = np.array([s.k0 for s in live])[:, None, None]
    return x[rows, heads, np.minimum(start + pos, max(x.shape[2] - 1, 0))]


def _pool_rows(call: AttentionCall, live: list[Seq], pos: np.ndarray, valid: np.ndarray
               ) -> np.ndarray:
    """int64 [n, Hkv, N]: the row of k (viewed as [-1, D]) of every attended position, -1 for
    padding."""
    Hkv, L = call.k.shape[1], call.k.shape[2]
    heads = np.arange(Hkv)[None, :, None]
    if live[0].pages is not None:
        width = max(1, max(len(s.pages) for s in live))
        table = np.zeros((len(live), width), np.int64)
        for r, s in enumerate(live):
            table[r, :len(s.pages)] = s.pages
        page = table[np.arange(len(live))[:, None, None], pos // L]
        rows = (page * Hkv + heads) * L + pos % L
    else:
        b = np.array([s.kb for s in live])[:, None, None]
        start = np.array([s.k0 for s in live])[:, None, None]
        rows = (b * Hkv + heads) * L + start + pos
    return np.where(valid, rows, -1)


def _fused(call: AttentionCall, live: list[Seq], q: np.ndarray, pos: np.ndarray,
           valid: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
    """The compiled decode (``_decode.c``) for float32 C-contiguous pools, else None."""
    k, v = call.k, call.v
    if _FUSED is None or k.dtype != np.float32 or v.dtype != np.float32 \
            or not (k.flags.c_contiguous and v.flags.c_contiguous) or q.shape[2] > 64:
        return None
    n, Hkv, g, D = q.shape
    Dv = v.shape[3]
    qt = np.ascontiguousarray((q.astype(np.float32) * np.float32(call.scale)
                               ).transpose(0, 1, 3, 2)).reshape(n * Hkv, D, g)
    rows = np.ascontiguousarray(_pool_rows(call, live, pos, valid).reshape(n * Hkv, -1))
    out = np.empty((n * Hkv, g, Dv), np.float32)
    lse = np.empty((n * Hkv, g), np.float32)
    kp, vp = k.reshape(-1, D), v.reshape(-1, Dv)
    pairs = n * Hkv  # each pair's result is the same on whichever thread computes it
    parallel_spans(lambda a, z: _FUSED.decode(qt[a:z], kp, vp, rows[a:z], out[a:z], lse[a:z]),
                   pairs, pairs * rows.shape[1] * g, minimum=_THREADING_MIN, blas=False)
    return out.reshape(n, Hkv, g, Dv), lse.reshape(n, Hkv, g)


def _attend(call: AttentionCall, live: list[Seq], q: np.ndarray, pos: np.ndarray,
            valid: np.ndarray, cdt: np.dtype) -> tuple[np.ndarray, np.ndarray]:
    """Softmax attention of q [n, Hkv, g, D] over the gathered keys; (out [n, Hkv, g, Dv],
    lse [n, Hkv, g])."""
    n, Hkv, g, _ = q.shape
    Dv = call.v.shape[3]
    if pos.shape[-1] == 0 or not valid.any() or call.k.shape[0] == 0:
        return np.zeros((n, Hkv, g, Dv), cdt), np.full((n, Hkv, g), NEG_INF, np.float32)
    fused = _fused(call, live, q, pos, valid)
    if fused is not None:
        return fused
    kg = _gather(call.k, call, live, pos).astype(cdt, copy=False)
    vg = _gather(call.v, call, live, pos).astype(cdt, copy=False)
    vg[~valid] = 0
    s = np.matmul(q.astype(cdt) * cdt.type(call.scale), kg.swapaxes(-1, -2))  # [n, Hkv, g, N]
    s = np.where(valid[:, :, None, :], s, NEG_INF)
    has = valid.any(axis=-1)[:, :, None]  # [n, Hkv, 1]
    m = np.where(has, s.max(axis=-1), 0)
    e = np.exp(s - m[..., None])
    total = e.sum(axis=-1)
    o = np.matmul(e, vg) / total[..., None]
    o = np.where(has[..., None], o, 0)
    lse = np.where(has, m + np.log(total), NEG_INF).astype(np.float32)
    return o, lse

