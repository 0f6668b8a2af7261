"""``keep`` breaking ties toward the higher channel index (channels ranked in reverse)."""

from dataclasses import replace

import numpy as np

from dshal.hookspec import hookimpl
from tests.broken_backends._base import Wrapped


def _rev(x):
    return None if x is None else np.ascontiguousarray(np.asarray(x)[..., ::-1])


class KeepTiesHigh(Wrapped):
    """keep ties to the higher channel index"""

    name = "bb_keep_ties_high"

    @hookimpl
    def dshal_gated_channels_run(self, call):
        if call.keep is None:
            return super().dshal_gated_channels_run(call)
        if call.weight is None:  # output channels are x's channels
            rev = replace(call, x=_rev(call.x), gate_logits=_rev(call.gate_logits))
        else:
            rev = replace(call, gate_logits=_rev(call.gate_logits),
                          weight=np.ascontiguousarray(np.asarray(call.weight)[::-1]),
                          bias=_rev(call.bias))
        y, mask = super().dshal_gated_channels_run(rev)
        return _rev(y), _rev(mask)


plugin = KeepTiesHigh()
