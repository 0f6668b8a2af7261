"""Top-k selection scored with the first query head of each group instead of the sum over the
group's g heads (selection that ignores grouped-query attention)."""

from dataclasses import replace

import numpy as np

from dshal import reference
from dshal.hookspec import hookimpl
from tests.broken_backends._base import Wrapped


class GqaIgnored(Wrapped):
    """top-k selection ignoring GQA grouping"""

    name = "bb_gqa_ignored"

    @hookimpl
    def dshal_sparse_attention_run(self, call):
        if call.top_k is None:
            return super().dshal_sparse_attention_run(call)
        Hq, Lq = call.q.shape[1], call.q.shape[2]
        Hkv, Lk = call.k.shape[1], call.k.shape[2]
        first_heads = np.asarray(call.q)[:, :: Hq // Hkv]
        scores = reference.selection_scores(first_heads, call.k, call.block_size, call.scale)
        picked = reference.select_blocks(scores, call.top_k, Lq, Lk, call.block_size,
                                         call.causal)
        return super().dshal_sparse_attention_run(replace(call, top_k=None, indices=picked))


plugin = GqaIgnored()
