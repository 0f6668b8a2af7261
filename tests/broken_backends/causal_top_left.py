"""Causal mask aligned top-left (query i sees keys j <= i, SDPA's is_causal) instead of
bottom-right (j <= i + Lk - Lq): a kernel written for Lq == Lk."""

from dataclasses import replace

from dshal.hookspec import hookimpl
from tests.broken_backends._base import Wrapped


class TopLeftCausal(Wrapped):
    """top-left causal alignment"""

    name = "bb_causal_top_left"

    @hookimpl
    def dshal_sparse_attention_run(self, call):
        lq, lk = call.q.shape[2], call.k.shape[2]
        if call.causal and lq < lk and call.indices is None:
            # query i treated as position i: only the first Lq keys can ever be seen
            call = replace(call, k=call.k[:, :, :lq], v=call.v[:, :, :lq])
        return super().dshal_sparse_attention_run(call)


plugin = TopLeftCausal()
