"""``sparse_attention`` on a device (kernels/attention.cl), for any :class:`Session`.

The host only prepares what is cheap and exact: contiguous inputs, a zero column for a zero
head dim, and ``want[n]`` (how many of n candidate blocks ``top_k`` takes, by the float64 rule
of :func:`dshal.calls.resolve_count`). Selection, attention and the compaction of the returned
indices run as kernels.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from dshal import calls
from dshal.calls import AttentionCall, resolve_count
from dshal_kernels import AttentionDefines
from dshal_kernels.host.session import Session

#: most floats of per-work-item state (q and accumulators of HPW heads) the head tile may use
_STATE = 1024
_I32, _F32 = np.int32, np.float32


def heads_per_item(g: int, d: int, dv: int, cpu: bool) -> int:
    """Query heads one work-item serves: on a CPU the largest divisor of g (at most 8) whose
    state fits :data:`_STATE` floats, so each key is loaded once for them; on a GPU 1 (more
    work-items, fewer registers each)."""
    if not cpu:
        return 1
    return max(h for h in range(1, min(g, 8) + 1) if g % h == 0 and (h == 1 or
                                                                     h * (d + dv) <= _STATE))


def _padded(xp: Any, x: Any) -> Any:
    """x with a zero column when its last dim is 0 (kernels need a head dim >= 1)."""
    if x.shape[-1]:
        return x
    return xp.zeros((*x.shape[:-1], 1), x.dtype)


def sparse_attention(s: Session, call: AttentionCall) -> tuple[Any, Any, Any]:
    """Run ``sparse_attention`` (DESIGN 3.1) in session ``s``: ``(out, indices, lse)``."""
    xp, q, k, v = s.xp, call.q, call.k, call.v
    B, Hq, Lq, _ = q.shape
    Hkv, Lk, Dv = k.shape[1], k.shape[2], v.shape[3]
    dtype = np.dtype(q.dtype).name
    g = Hq // Hkv if Hkv else 1
    bs = call.block_size
    nb = -(-Lk // bs)
    BH = B * Hkv
    out = xp.zeros((B, Hq, Lq, Dv), q.dtype)
    lse = xp.full((B, Hq, Lq), -np.inf, np.float32) if call.return_lse else None
    has_sel = call.top_k is not None or call.indices is not None
    width = selection_width(call, Lq, Lk, nb, s.host)
    indices = xp.full((B, Hkv, Lq, width), -1, np.int64) if call.return_indices else None
    if BH * Lq == 0 or Hq == 0:
        return out, indices, lse
    qp, kp, vp = _padded(xp, q), _padded(xp, k), _padded(xp, v)
    hpw = heads_per_item(g, qp.shape[-1], vp.shape[-1], s.cpu)
    prg = s.program(AttentionDefines.make(dtype, qp.shape[-1], vp.shape[-1], hpw, has_sel))
    qb, kb, vb = s.upload(qp, "q"), s.upload(kp, "k"), s.upload(vp, "v")
    mask = s.alloc(BH * Lq * nb if has_sel else 1, "selection mask")
    if call.top_k is not None and nb:
        kmean = block_summaries(s, call, prg, kb, BH, Lk, nb, qp.shape[-1])
        scores = s.alloc(4 * BH * Lq * nb, "selection scores")
        s.run(prg.attn_scores, (Lq, BH), qb, kmean, scores, _I32(BH), _I32(Hkv), _I32(g),
              _I32(Lq), _I32(nb), _F32(call.scale))
        want = resolve_count(call.top_k, np.arange(nb + 1)).astype(np.int32)
        s.run(prg.attn_topk, (Lq, BH), scores, s.upload(want, "want"), mask, _I32(BH),
              _I32(Lq), _I32(Lk), _I32(nb), _I32(bs), _I32(call.causal))
    elif call.indices is not None and nb:
        idx = s.upload(call.indices, "indices", np.int32)
        s.run(prg.attn_idx_mask, (Lq, BH), idx, mask, _I32(BH), _I32(Lq),
              _I32(call.indices.shape[-1]), _I32(nb))
    if Lk:
        kc = AttentionDefines.KC
        chunks = -(-Lk // kc)
        kt = s.alloc(4 * BH * chunks * kc * qp.shape[-1], "keys as float32")
        convert = dtype != "float32"
        vf = s.alloc(4 * vp.size, "values as float32") if convert else vb
        s.run(prg.attn_prep, (chunks * kc, BH), kb, vb, kt, vf, _I32(convert), _I32(BH),
              _I32(Lk), _I32(chunks))
        ob = s.alloc(out.nbytes if Dv else q.dtype.itemsize * B * Hq * Lq, "out")
        lb = s.alloc(4 * B * Hq * Lq if lse is not None else 4, "lse")
        s.run(prg.attn_fwd, (Lq, BH * (g // hpw)), qb, kt, vf, mask, ob, lb,
              _I32(lse is not None), _I32(BH), _I32(g), _I32(Lq), _I32(Lk), _I32(nb),
              _I32(bs), _I32(call.window), _I32(call.causal), _F32(call.scale))
        if Dv:
            out = s.download(ob, out.shape, q.dtype)
        if lse is not None:
            lse = s.download(lb, lse.shape, np.float32)
    if indices is not None and width and nb:
        ib = s.alloc(4 * BH * Lq * width, "indices")
        s.run(prg.attn_compact, (Lq, BH), mask, ib, _I32(BH), _I32(Lq), _I32(nb), _I32(width))
        indices = s.download(ib, indices.shape, np.int32).astype(np.int64)
    return out, indices, lse


def block_summaries(s: Session, call: AttentionCall, prg: Any, kb: Any, BH: int, Lk: int,
                    nb: int, d: int) -> Any:
    """The float32 [BH, nb, d] block summaries top_k scores against: the caller's
    ``block_keys`` (DESIGN 3.1a; converted exactly to float32) or the block means of the keys
    (``attn_block_means``)."""
    if call.block_keys is not None:
        return s.upload(_padded(s.xp, call.block_keys), "block_keys", np.float32)
    kmean = s.alloc(4 * BH * nb * d, "block means")
    s.run(prg.attn_block_means, (nb, BH), kb, kmean, _I32(BH), _I32(Lk), _I32(nb),
          _I32(call.block_size))
    return kmean


def selection_width(call: AttentionCall, Lq: int, Lk: int, nb: int, host: Any = np.asarray
                    ) -> int:
    """The largest number of blocks any query attends through selection (the width of the
    returned indices); ``host`` brings the caller's indices to numpy."""
    if not call.return_indices or nb == 0:
        return 0
    if call.indices is not None:
        idx = host(call.indices)
        if idx.size == 0:
            return 0
        marked = np.zeros((*idx.shape[:-1], nb + 1), bool)
        np.put_along_axis(marked, np.where(idx < 0, nb, idx), True, axis=-1)
        return int(marked[..., :nb].sum(axis=-1).max())
    return calls.selection_width(Lq, Lk, call.block_size, call.causal, call.top_k)
