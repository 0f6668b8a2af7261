"""Varlen queries aligned from the packed start instead of their sequence's start.

Query i of sequence s sits at p = cu_seqlens_q[s] + i - cu_seqlens_k[s] (its row in the packed
queries, counted from the sequence's first key) instead of i + Lk_s - Lq_s, the bottom-right
alignment within the sequence. Emulated on the honest backend by giving each sequence the key
count that alignment implies (its keys cut, or extended into the next sequence's rows).
"""

from dataclasses import replace

import numpy as np

from dshal.hookspec import hookimpl
from tests.broken_backends._base import Wrapped


class PackedAlignment(Wrapped):
    """varlen alignment from the packed start"""

    name = "bb_varlen_packed_alignment"

    @hookimpl
    def dshal_sparse_attention_run(self, call):
        if call.cu_seqlens_k is None:
            return super().dshal_sparse_attention_run(call)
        cq, ck = np.array(call.cu_seqlens_q), np.array(call.cu_seqlens_k)
        Tk, sel = ck[-1], None
        # each sequence alone, with Lk' - Lq = cu_q[s] - cu_k[s] keys from its first key
        outs, lses, sels = [], [], []
        for s in range(len(cq) - 1):
            lq = cq[s + 1] - cq[s]
            lk = int(np.clip(lq + cq[s] - ck[s], 0, Tk - ck[s]))
            rows, keys = slice(cq[s], cq[s + 1]), slice(ck[s], ck[s] + lk)
            sub = replace(call, q=call.q[:, :, rows], k=call.k[:, :, keys],
                          v=call.v[:, :, keys], cu_seqlens_q=None, cu_seqlens_k=None,
                          block_keys=None, return_lse=True, return_indices=True,
                          indices=None if call.indices is None else call.indices[:, :, rows])
            o, i, ls = super().dshal_sparse_attention_run(sub)
            outs.append(o)
            lses.append(ls)
            sels.append(i)
        out = np.concatenate(outs, axis=2)
        lse = np.concatenate(lses, axis=2)
        if call.return_indices:
            width = max((x.shape[-1] for x in sels if x is not None), default=0)
            sel = np.concatenate([np.pad(x, [(0, 0)] * 3 + [(0, width - x.shape[-1])],
                                         constant_values=-1) for x in sels], axis=2)
        return out, sel, lse if call.return_lse else None


plugin = PackedAlignment()
