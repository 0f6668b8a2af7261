"""The float64 reference of the varlen and paged forms of ``sparse_attention`` (DESIGN 3.1a).

Literally the definition: each sequence is cut out of the packed queries, its keys and values
are gathered (from its key rows, or from its pages in ``block_table`` order truncated to
``seqlens_k``) and the contiguous reference :func:`dshal.reference.sparse_attention` runs on
it; the results are put back in the packed layout. Returned indices are block numbers within
each sequence, -1 padded to the widest row of the whole call.
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import numpy as np

from dshal import reference
from dshal.forms import Seq, padded_selections, seq_keys, seq_summaries, sequences


def _as_call(q: np.ndarray, k: np.ndarray, block_size: int, **forms: Any) -> SimpleNamespace:
    """What :func:`dshal.forms.sequences` reads from a call record."""
    return SimpleNamespace(q=q, k=k, block_size=block_size, **forms)


def sparse_attention_forms(q: Any, k: Any, v: Any, *, top_k: int | float | None = None,
                           block_size: int = 64, window: int = 0, causal: bool = False,
                           scale: float | None = None, indices: Any | None = None,
                           block_keys: Any | None = None, cu_seqlens_q: Any | None = None,
                           cu_seqlens_k: Any | None = None, block_table: Any | None = None,
                           seqlens_k: Any | None = None,
                           ) -> tuple[np.ndarray, np.ndarray | None, np.ndarray]:
    """``(out, indices, lse)`` of a varlen and/or paged call, shaped like the contiguous
    reference's (q's batch and length; indices [B, Hkv, Lq, n] or None)."""
    q, k, v = np.asarray(q), np.asarray(k), np.asarray(v)
    B, Hq, Lq, D = q.shape
    Hkv, page_size, Dv = k.shape[1], k.shape[2], v.shape[3]
    if scale is None:
        scale = 1.0 / np.sqrt(D) if D > 0 else 1.0
    call = _as_call(q, k, block_size, cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k,
                    block_table=block_table, seqlens_k=seqlens_k)
    out = np.zeros((B, Hq, Lq, Dv))
    lse = np.full((B, Hq, Lq), -np.inf)
    picked: list[tuple[Seq, np.ndarray]] = []
    for seq in sequences(call):
        rows = slice(seq.q0, seq.q0 + seq.lq)
        bk = None if block_keys is None else \
            seq_summaries(np.asarray(block_keys), seq, block_size, page_size)[None]
        idx = None if indices is None else np.asarray(indices)[seq.b:seq.b + 1, :, rows]
        o, sel, s_lse = reference.sparse_attention(
            q[seq.b:seq.b + 1, :, rows], seq_keys(k, seq)[None], seq_keys(v, seq)[None],
            top_k=top_k, block_size=block_size, window=window, causal=causal, scale=scale,
            indices=idx, block_keys=bk)
        out[seq.b, :, rows], lse[seq.b, :, rows] = o[0], s_lse[0]
        if sel is not None:
            picked.append((seq, sel[0]))
    if top_k is None and indices is None:
        return out, None, lse
    selection = padded_selections(picked, B, Hkv, Lq, lambda shape: np.full(shape, -1, np.int64))
    return out, selection, lse
