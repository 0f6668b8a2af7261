"""Varlen keys cut one row late: every inner sequence boundary of cu_seqlens_k is off by one."""

from dataclasses import replace

import numpy as np

from dshal.hookspec import hookimpl
from tests.broken_backends._base import Wrapped


class BoundaryOffByOne(Wrapped):
    """varlen sequence boundary off by one"""

    name = "bb_varlen_boundary_off_by_one"

    @hookimpl
    def dshal_sparse_attention_run(self, call):
        if call.cu_seqlens_k is None:
            return super().dshal_sparse_attention_run(call)
        cu = np.array(call.cu_seqlens_k)
        cu[1:-1] = np.minimum(cu[1:-1] + 1, cu[-1])
        return super().dshal_sparse_attention_run(replace(call, cu_seqlens_k=cu,
                                                          block_keys=None))


plugin = BoundaryOffByOne()
