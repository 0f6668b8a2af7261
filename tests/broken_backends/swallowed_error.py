"""An argument error swallowed: the kernel only handles head_dim <= 128 and raises for larger
ones, but the plugin catches the error and returns zeros instead of refusing the call (it
should declare ``limits={"head_dim": 128}`` or let the error through)."""

import numpy as np

from dshal.hookspec import hookimpl
from tests.broken_backends._base import Wrapped

MAX_HEAD_DIM = 128


def kernel(call, run):
    if max(call.q.shape[3], call.v.shape[3]) > MAX_HEAD_DIM:
        raise ValueError(f"head_dim {call.q.shape[3]} exceeds {MAX_HEAD_DIM}")
    return run(call)


class SwallowedError(Wrapped):
    """argument error swallowed instead of raised"""

    name = "bb_swallowed_error"

    @hookimpl
    def dshal_sparse_attention_run(self, call):
        try:
            return kernel(call, super().dshal_sparse_attention_run)
        except ValueError:  # the bug: "never crash the training loop"
            B, Hq, Lq, _ = call.q.shape
            out = np.zeros((B, Hq, Lq, call.v.shape[3]), call.q.dtype)
            idx = np.full((B, call.k.shape[1], Lq, 0), -1, np.int64)
            lse = np.full((B, Hq, Lq), -np.inf, np.float32)
            return (out, idx if call.return_indices else None,
                    lse if call.return_lse else None)


plugin = SwallowedError()
