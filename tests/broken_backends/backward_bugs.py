"""Broken backwards of sparse_attention: each the numpy backend's with one realistic bug.

The entry points name one plugin object each (``backward_bugs:<attribute>``); see
:data:`tests.broken_backends.BROKEN`."""

from dataclasses import replace

import numpy as np

from dshal.hookspec import hookimpl
from tests.broken_backends._base import Wrapped


class DkNoScale(Wrapped):
    """dk without the softmax scale"""

    name = "bb_dk_no_scale"

    @hookimpl
    def dshal_sparse_attention_backward_run(self, call):
        dq, dk, dv = super().dshal_sparse_attention_backward_run(call)
        return dq, (dk.astype(np.float32) / call.scale).astype(dk.dtype), dv


class GradLeak(Wrapped):
    """gradients over every visible key: the selection and the window forgotten in dk/dv"""

    name = "bb_grad_leak"

    @hookimpl
    def dshal_sparse_attention_backward_run(self, call):
        dq, _, _ = super().dshal_sparse_attention_backward_run(call)
        _, dk, dv = super().dshal_sparse_attention_backward_run(
            replace(call, indices=None, window=0))
        return dq, dk, dv


class NanReachesDq(Wrapped):
    """masking by multiplication: dP = dO V^T over every key, times the 0/1 mask, so a NaN
    value no query may attend makes every delta, and every dq of its kv head, NaN"""

    name = "bb_nan_reaches_dq"

    @hookimpl
    def dshal_sparse_attention_backward_run(self, call):
        dq, dk, dv = super().dshal_sparse_attention_backward_run(call)
        dq = dq.copy()
        g = dq.shape[1] // max(1, call.v.shape[1])
        for b in range(call.v.shape[0]):
            for t in range(call.v.shape[1]):
                if not np.isfinite(np.asarray(call.v[b, t], np.float32)).all():
                    dq[b, t * g:(t + 1) * g] = np.nan
        return dq, dk, dv


class DvPerQueryHead(Wrapped):
    """dv written per query head (the group's first head wins) instead of summed over the
    heads of its kv head"""

    name = "bb_dv_per_query_head"

    @hookimpl
    def dshal_sparse_attention_backward_run(self, call):
        dq, dk, _ = super().dshal_sparse_attention_backward_run(call)
        go = np.zeros_like(call.grad_out)
        g = go.shape[1] // max(1, call.v.shape[1])
        go[:, ::g] = call.grad_out[:, ::g]
        _, _, dv = super().dshal_sparse_attention_backward_run(
            replace(call, grad_out=go, grad_lse=None))
        return dq, dk, dv


class LseGradIgnored(Wrapped):
    """the gradient of lse dropped"""

    name = "bb_lse_grad_ignored"

    @hookimpl
    def dshal_sparse_attention_backward_run(self, call):
        return super().dshal_sparse_attention_backward_run(replace(call, grad_lse=None))


dk_no_scale = DkNoScale()
grad_leak = GradLeak()
nan_reaches_dq = NanReachesDq()
dv_per_query_head = DvPerQueryHead()
lse_grad_ignored = LseGradIgnored()
