"""A paged cache read in pool order: each sequence's pages sorted by page number."""

from dataclasses import replace

import numpy as np

from dshal.hookspec import hookimpl
from tests.broken_backends._base import Wrapped


class PoolOrder(Wrapped):
    """pages read in pool order"""

    name = "bb_pages_in_pool_order"

    @hookimpl
    def dshal_sparse_attention_run(self, call):
        if call.block_table is None:
            return super().dshal_sparse_attention_run(call)
        table = np.array(call.block_table)
        ps = call.k.shape[2]
        used = -(-np.asarray(call.seqlens_k) // ps)
        for b, n in enumerate(used):
            table[b, :n] = np.sort(table[b, :n])
        return super().dshal_sparse_attention_run(replace(call, block_table=table))


plugin = PoolOrder()
