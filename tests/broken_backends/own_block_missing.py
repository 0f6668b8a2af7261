"""Top-k selection without the forced block that contains the query's own position."""

from dataclasses import replace

import numpy as np

from dshal import reference
from dshal.hookspec import hookimpl
from tests.broken_backends._base import Wrapped


class OwnBlockMissing(Wrapped):
    """forced own block missing"""

    name = "bb_own_block_missing"

    @hookimpl
    def dshal_sparse_attention_run(self, call):
        if call.top_k is None:
            return super().dshal_sparse_attention_run(call)
        _, sel, _ = super().dshal_sparse_attention_run(replace(call, return_indices=True,
                                                                return_lse=False))
        own = reference.own_block(call.q.shape[2], call.k.shape[2], call.block_size)
        big = np.iinfo(np.int64).max
        dropped = np.where((sel == own[None, None, :, None]) | (sel < 0), big, sel)
        sel = np.sort(dropped, axis=-1)  # ascending, the dropped entries last
        sel = np.where(sel == big, -1, sel)
        return super().dshal_sparse_attention_run(replace(call, top_k=None, indices=sel))


plugin = OwnBlockMissing()
