"""Top-k selection breaking exact ties toward the higher block index (a max-heap that keeps
the last of equal scores)."""

from dataclasses import replace

import numpy as np

from dshal import reference
from dshal.hookspec import hookimpl
from tests.broken_backends._base import Wrapped


class TopkTiesHigh(Wrapped):
    """top-k ties to the higher block index"""

    name = "bb_topk_ties_high"

    @hookimpl
    def dshal_sparse_attention_run(self, call):
        if call.top_k is None:
            return super().dshal_sparse_attention_run(call)
        q, k = call.q, call.k
        Lq, Lk, bs = q.shape[2], k.shape[2], call.block_size
        scores = reference.selection_scores(q, k, bs, call.scale)
        nb = scores.shape[-1]
        # the bug: equal scores ordered by descending block index (a relative nudge far
        # below any tolerance, so near-ties rank as before)
        bumped = scores + np.abs(scores) * 1e-12 * np.arange(nb) + 1e-300 * np.arange(nb)
        sel = reference.select_blocks(bumped, call.top_k, Lq, Lk, bs, call.causal)
        return super().dshal_sparse_attention_run(replace(call, top_k=None, indices=sel))


plugin = TopkTiesHigh()
