"""Sliding window tested as |p - j| <= window instead of < window."""

from dataclasses import replace

from dshal.hookspec import hookimpl
from tests.broken_backends._base import Wrapped


class OffByOneWindow(Wrapped):
    """window off by one"""

    name = "bb_window_off_by_one"

    @hookimpl
    def dshal_sparse_attention_run(self, call):
        return super().dshal_sparse_attention_run(
            replace(call, window=call.window + 1) if call.window else call)


plugin = OffByOneWindow()
