"""block_keys ignored: the block means are recomputed from the keys instead."""

from dataclasses import replace

from dshal.hookspec import hookimpl
from tests.broken_backends._base import Wrapped


class BlockKeysIgnored(Wrapped):
    """means recomputed instead of block_keys"""

    name = "bb_block_keys_ignored"

    @hookimpl
    def dshal_sparse_attention_run(self, call):
        return super().dshal_sparse_attention_run(replace(call, block_keys=None))


plugin = BlockKeysIgnored()
