"""The varlen and paged forms of ``sparse_attention`` on the numpy backend (DESIGN 3.1a).

Decode calls (at most one query per sequence, with block summaries, indices or a window) take
the batched path of :mod:`.decode`, which reads only the keys it attends. Every other call
runs each sequence as a task of :func:`.attention.run_tasks`: the same units of work and thread
pool as a contiguous batch, with query rows and key rows as views into the packed arrays (a
paged sequence's keys are gathered from its pages once per call).
"""

from __future__ import annotations

import numpy as np

from dshal.backends.numpy import decode
from dshal.backends.numpy.attention import NEG_INF, Task, run_tasks
from dshal.calls import AttentionCall
from dshal.forms import seq_keys, seq_summaries, sequences, uses_forms

__all__ = ["sparse_attention", "uses_forms"]


def sparse_attention(call: AttentionCall) -> tuple[np.ndarray, np.ndarray | None,
                                                   np.ndarray | None]:
    """``(out, indices, lse)`` of a varlen, paged or block_keys call."""
    seqs = sequences(call)
    if decode.serves(call, seqs):
        return decode.sparse_attention(call, seqs)
    q, k, v = call.q, call.k, call.v
    B, Hq, Lq, _ = q.shape
    Hkv, page_size, Dv = k.shape[1], k.shape[2], v.shape[3]
    out = np.zeros((B, Hq, Lq, Dv), q.dtype)
    lse = np.full((B, Hq, Lq), NEG_INF, np.float32) if call.return_lse else None
    tasks = []
    for s in seqs:
        rows = slice(s.q0, s.q0 + s.lq)
        bk = None if call.block_keys is None else \
            seq_summaries(call.block_keys, s, call.block_size, page_size)
        tasks.append(Task(q[s.b, :, rows], seq_keys(k, s), seq_keys(v, s), bk,
                          None if call.indices is None else call.indices[s.b, :, rows],
                          out[s.b, :, rows], None if lse is None else lse[s.b, :, rows]))
    picked = run_tasks(call, tasks)
    if not call.return_indices:
        return out, None, lse
    width = max((x.shape[1] for x in picked.values()), default=0)
    indices = np.full((B, Hkv, Lq, width), -1, np.int64)
    for (n, t, qa), x in picked.items():
        a = seqs[n].q0 + qa
        indices[seqs[n].b, t, a:a + x.shape[0], :x.shape[1]] = x
    return out, indices, lse
