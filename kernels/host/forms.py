"""The varlen and paged forms of ``sparse_attention`` (DESIGN 3.1a) on a device :class:`Session`.

Each sequence of the call (:func:`dshal.forms.sequences`) runs as one contiguous call of
:func:`.attention.sparse_attention`: its query rows, its keys and values (a view into the packed
arrays, or gathered from its pages in ``block_table`` order, never past ``seqlens_k``) and its
``block_keys`` summaries. The kernels therefore see exactly the contiguous problem of each
sequence, with alignment (causal offset, blocks, window) from the sequence start; the results
are put back in the packed layout, indices -1 padded to the widest sequence. Contiguous calls go
straight to :func:`.attention.sparse_attention`. ``block_keys`` are not served (the backends do
not declare them): the kernels convert each sequence's keys whole, and DESIGN 3.1a forbids a
decode given summaries to read every key.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from dshal.calls import AttentionCall
from dshal.forms import padded_selections, seq_keys, sequences
from dshal_kernels.host import attention
from dshal_kernels.host.session import Session


def uses_sequences(call: AttentionCall) -> bool:
    """Whether the call packs several sequences (varlen) or reads a paged KV cache."""
    return call.cu_seqlens_q is not None or call.block_table is not None


def sparse_attention(s: Session, call: AttentionCall) -> tuple[Any, Any, Any]:
    """Run ``sparse_attention`` in any form in session ``s``: ``(out, indices, lse)``."""
    if not uses_sequences(call):
        return attention.sparse_attention(s, call)
    xp, q, k, v = s.xp, call.q, call.k, call.v
    B, Hq, Lq, _ = q.shape
    Hkv, Dv = k.shape[1], v.shape[3]
    out = xp.zeros((B, Hq, Lq, Dv), q.dtype)
    lse = xp.full((B, Hq, Lq), -np.inf, np.float32) if call.return_lse else None
    picked: list[tuple[Any, Any]] = []
    for seq in sequences(call):
        rows = slice(seq.q0, seq.q0 + seq.lq)
        sub = dataclasses.replace(
            call, q=q[seq.b:seq.b + 1, :, rows], k=seq_keys(k, seq)[None],
            v=seq_keys(v, seq)[None],
            indices=None if call.indices is None else call.indices[seq.b:seq.b + 1, :, rows],
            cu_seqlens_q=None, cu_seqlens_k=None, block_table=None, seqlens_k=None)
        o, sel, s_lse = attention.sparse_attention(s, sub)
        out[seq.b, :, rows] = o[0]
        if lse is not None:
            lse[seq.b, :, rows] = s_lse[0]
        if sel is not None:
            picked.append((seq, sel[0]))
    if not call.return_indices:
        return out, None, lse
    indices = padded_selections(picked, B, Hkv, Lq, lambda shape: xp.full(shape, -1, np.int64))
    return out, indices, lse
