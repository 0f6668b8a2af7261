"""The varlen, paged and block_keys forms of ``sparse_attention`` (DESIGN 3.1a) on a device
:class:`Session`, in one launch per stage for the whole call (kernels/attention.cl,
``attn_seq_*``).

The host describes the call's sequences once, as small int32 arrays built with numpy (no loop
over sequences): :class:`SeqLayout` maps each query row to its sequence, gives each sequence
its rows, its key count and where its keys and block summaries live (a paged cache's
``block_table``, or one batch row and offset per sequence). Then the kernels run as in the
contiguous call: block means only when no ``block_keys`` are given, selection scores from the
summaries, top-k (the contiguous rule per sequence), and the attention pass, which reads k and v
through the pages and only at the keys each query may attend (window and selected blocks),
never at or past a sequence's length. Contiguous calls without ``block_keys`` go to
:func:`.attention.sparse_attention`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from dshal.calls import AttentionCall, resolve_count
from dshal.forms import seq_arrays
from dshal_kernels import AttentionDefines
from dshal_kernels.host import attention
from dshal_kernels.host.attention import _padded, heads_per_item
from dshal_kernels.host.session import Session

_I32, _F32 = np.int32, np.float32
#: the page size of keys that are not paged: larger than any sequence, so j // PS is 0
_UNPAGED = 2**30


def uses_sequences(call: AttentionCall) -> bool:
    """Whether the call packs several sequences (varlen), reads a paged KV cache or brings
    block summaries (then it runs on the ``attn_seq_*`` kernels)."""
    return call.cu_seqlens_q is not None or call.block_table is not None \
        or call.block_keys is not None


@dataclass(frozen=True)
class SeqLayout:
    """The sequences of a call as the ``attn_seq_*`` kernels read them (see attention.cl).

    ``rowseq`` int32 [B * Lq]: the sequence of each query row; ``seqs`` int32 [S, 7]: q0, lq,
    lk, k0, sb, so, kto; ``table`` int32 [S, tp]: the pages (or batch row) of each sequence;
    ``ps``: keys per page; ``nbm``: the most blocks of a sequence; ``nbs``: the blocks of all
    sequences (rows of the block means); ``nch``: the key chunks converted by
    ``attn_seq_prep`` (sequences with kto >= 0), ``pch`` the most of one sequence; ``i_s``
    int64 [B * Lq]: each row's query index within its sequence (for host-side widths)."""

    rowseq: np.ndarray
    seqs: np.ndarray
    table: np.ndarray
    ps: int
    nbm: int
    nbs: int
    nch: int
    pch: int
    i_s: np.ndarray

    @property
    def tp(self) -> int:
        return max(self.table.shape[1], 1)


def seq_layout(call: AttentionCall) -> SeqLayout:
    """The :class:`SeqLayout` of a validated call in any 3.1a form (from the sequences of
    :func:`dshal.forms.seq_arrays`)."""
    seq = seq_arrays(call)
    Lq, bs = call.q.shape[2], call.block_size
    q0, lq, lk, k0 = seq.q0, seq.lq, seq.lk, seq.k0
    S = lq.size
    rowseq = np.repeat(np.arange(S), lq)
    sb = np.zeros(S, np.int64)
    if seq.table is not None:
        ps = seq.page_size
        used = -(-lk // ps)
        # entries past a sequence's used pages are never read: zero them so the table holds
        # only valid int32 page numbers
        table = np.where(np.arange(seq.table.shape[1])[None, :] < used[:, None], seq.table, 0)
    else:
        ps = _UNPAGED
        if call.cu_seqlens_k is not None:
            table = np.zeros((S, 1), np.int64)
        else:  # a contiguous batch: sequence b is batch row b (its keys and summaries)
            table = seq.kb[:, None]
            if call.block_keys is not None:
                sb = seq.kb
    nb = -(-lk // bs)
    so = np.concatenate(([0], np.cumsum(nb)[:-1])) if S else nb
    if call.block_keys is not None and call.cu_seqlens_k is None:
        so = np.zeros(S, np.int64)  # batched or paged summaries: no offset
    chunks = np.where(_converted(call, lq, lk, nb), -(-lk // AttentionDefines.KC), 0)
    kto = np.where(chunks > 0, np.cumsum(chunks) - chunks, -1)
    seqs = np.stack([q0, lq, lk, k0, sb, so, kto], axis=1).astype(np.int32)
    i_s = np.arange(rowseq.size) % max(Lq, 1) - q0[rowseq]  # row (b, i) is b * Lq + i
    return SeqLayout(rowseq.astype(np.int32), seqs, table.astype(np.int32), ps,
                     int(nb.max(initial=0)), int(nb.sum()), int(chunks.sum()),
                     int(chunks.max(initial=0)), i_s)


def _converted(call: AttentionCall, lq: np.ndarray, lk: np.ndarray, nb: np.ndarray
               ) -> np.ndarray:
    """Which sequences attn_seq_prep converts first: those whose queries read each key twice
    or more on average (prefill), where the chunked float32 pass pays for the conversion; a
    decode reads its few allowed keys in place."""
    w, bs = call.window, call.block_size
    if call.top_k is None and call.indices is None:
        per = lk if w == 0 else np.minimum(lk, 2 * w)
    else:
        blocks = nb if call.indices is not None or isinstance(call.top_k, float) \
            else np.minimum(nb, min(call.top_k, 2**40) + 1)
        per = np.minimum(lk, blocks * bs + 2 * w)
    return (lk > 0) & (lq * per >= 2 * lk)


def selection_width(call: AttentionCall, lay: SeqLayout, host: Any) -> int:
    """The widest selection of any query row (the width of the returned indices), computed
    for all rows at once: each row's sequence gives its alignment and candidate blocks."""
    if not call.return_indices or lay.nbm == 0 or lay.rowseq.size == 0:
        return 0
    if call.indices is not None:
        return attention.selection_width(call, 0, 0, lay.nbm, host)
    f = lay.seqs[lay.rowseq].astype(np.int64)
    lq, lk, bs = f[:, 1], f[:, 2], call.block_size
    p = lay.i_s + lk - lq
    own = np.where((p >= 0) & (p < lk), p // bs, -1)
    nb = -(-lk // bs)
    n_cand = np.maximum(own, 0) if call.causal else np.where(own >= 0, nb - 1, nb)
    return int(np.max(resolve_count(call.top_k, n_cand) + (own >= 0)))


def sparse_attention(s: Session, call: AttentionCall) -> tuple[Any, Any, Any]:
    """Run ``sparse_attention`` in any form in session ``s``: ``(out, indices, lse)``."""
    if not uses_sequences(call):
        return attention.sparse_attention(s, call)
    xp, q, k, v = s.xp, call.q, call.k, call.v
    B, Hq, Lq, _ = q.shape
    Hkv, lkp, Dv = k.shape[1], k.shape[2], v.shape[3]
    lay = seq_layout(call)
    out = xp.zeros((B, Hq, Lq, Dv), q.dtype)
    lse = xp.full((B, Hq, Lq), -np.inf, np.float32) if call.return_lse else None
    width = selection_width(call, lay, s.host)
    indices = xp.full((B, Hkv, Lq, width), -1, np.int64) if call.return_indices else None
    BH, nbm, bs = B * Hkv, lay.nbm, call.block_size
    if BH * Lq == 0 or Hq == 0:
        return out, indices, lse
    g = Hq // Hkv
    qp, kp, vp = _padded(xp, q), _padded(xp, k), _padded(xp, v)
    D = qp.shape[-1]
    has_sel = call.top_k is not None or call.indices is not None
    hpw = heads_per_item(g, D, vp.shape[-1], s.cpu)
    prg = s.program(AttentionDefines.make(np.dtype(q.dtype).name, D, vp.shape[-1], hpw,
                                          has_sel))
    # the pools are read in place where the device can (only the allowed rows are touched)
    qb, kb, vb = s.upload(qp, "q"), s.view(kp, "k"), s.view(vp, "v")
    tab = s.upload(lay.table, "block_table")
    rows, seqs = s.upload(lay.rowseq, "sequence of each row"), s.upload(lay.seqs, "sequences")
    geo = (_I32(lay.tp), _I32(lay.ps), _I32(lkp))
    mask = s.alloc(BH * Lq * nbm if has_sel else 1, "selection mask")
    if call.top_k is not None and nbm:
        summ, paged_summ, nbp = _summaries(s, prg, call, lay, (kb, tab, seqs), D)
        scores = s.alloc(4 * BH * Lq * nbm, "selection scores")
        s.run(prg.attn_seq_scores, (Lq, BH), qb, summ, tab, rows, seqs, scores, _I32(BH),
              _I32(Hkv), _I32(g), _I32(Lq), _I32(nbm), _I32(bs), _I32(lay.tp),
              _I32(paged_summ), _I32(max(lay.ps // bs, 1)), _I32(nbp), _F32(call.scale))
        want = resolve_count(call.top_k, np.arange(nbm + 1)).astype(np.int32)
        s.run(prg.attn_seq_topk, (Lq, BH), scores, s.upload(want, "want"), rows, seqs, mask,
              _I32(BH), _I32(Hkv), _I32(Lq), _I32(nbm), _I32(bs), _I32(call.causal))
    elif call.indices is not None and nbm:
        idx = s.upload(call.indices, "indices", np.int32)
        s.run(prg.attn_idx_mask, (Lq, BH), idx, mask, _I32(BH), _I32(Lq),
              _I32(call.indices.shape[-1]), _I32(nbm))
    kc = AttentionDefines.KC
    kt = s.alloc(4 * Hkv * lay.nch * kc * D, "keys as float32")
    vf = s.alloc(4 * Hkv * lay.nch * kc * vp.shape[-1], "values as float32")
    s.run(prg.attn_seq_prep, (lay.pch * kc, lay.seqs.shape[0] * Hkv), kb, vb, tab, seqs, kt,
          vf, _I32(lay.seqs.shape[0]), _I32(Hkv), *geo, _I32(lay.nch))
    ob = s.alloc(out.nbytes if Dv else q.dtype.itemsize * B * Hq * Lq, "out")
    lb = s.alloc(4 * B * Hq * Lq if lse is not None else 4, "lse")
    s.run(prg.attn_seq_fwd, (Lq, BH * (g // hpw)), qb, kb, vb, kt, vf, tab, rows, seqs, mask,
          ob, lb, _I32(lse is not None), _I32(BH), _I32(Hkv), _I32(g), _I32(Lq),
          _I32(max(nbm, 1)), _I32(bs), *geo, _I32(lay.nch), _I32(call.window),
          _I32(call.causal), _F32(call.scale))
    if Dv:
        out = s.download(ob, out.shape, q.dtype)
    if lse is not None:
        lse = s.download(lb, lse.shape, np.float32)
    if indices is not None and width:
        ib = s.alloc(4 * BH * Lq * width, "indices")
        s.run(prg.attn_compact, (Lq, BH), mask, ib, _I32(BH), _I32(Lq), _I32(nbm), _I32(width))
        indices = s.download(ib, indices.shape, np.int32).astype(np.int64)
    return out, indices, lse


def _summaries(s: Session, prg: Any, call: AttentionCall, lay: SeqLayout,
               bufs: tuple[Any, Any, Any], D: int) -> tuple[Any, bool, int]:
    """(float32 summaries buffer, laid out by pages, its rows per kv head): the caller's
    block_keys, else the block means of every sequence (the keys' one full read); ``bufs``:
    the device k, table and sequences."""
    if call.block_keys is not None:
        bk = _padded(s.xp, call.block_keys)
        return (s.upload(bk, "block_keys", np.float32), call.block_table is not None,
                bk.shape[2])
    Hkv, S = call.k.shape[1], lay.seqs.shape[0]
    means = s.alloc(4 * Hkv * max(lay.nbs, 1) * D, "block means")
    s.run(prg.attn_seq_means, (lay.nbm, S * Hkv), *bufs, means, _I32(S), _I32(Hkv), _I32(lay.tp),
          _I32(lay.ps), _I32(call.k.shape[2]), _I32(lay.nbs), _I32(lay.nbm),
          _I32(call.block_size))
    return means, False, lay.nbs
