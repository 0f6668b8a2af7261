"""Closed channels computed: the whole product x @ weight.T is formed and then multiplied by
the 0/1 gate, so a closed channel's weight row is read and its NaN leaks (0 * NaN)."""

import numpy as np

from dshal.backends.numpy.gating import open_mask, sigmoid
from dshal.hookspec import hookimpl
from tests.broken_backends._base import Wrapped


class ClosedChannelsComputed(Wrapped):
    """closed gate channels computed"""

    name = "bb_closed_channels_computed"

    @hookimpl
    def dshal_gated_channels_run(self, call):
        if call.weight is None:
            return super().dshal_gated_channels_run(call)
        x = np.asarray(call.x, np.float32)
        z = np.asarray(call.gate_logits, np.float32)
        mask = open_mask(z, call.mode, call.threshold, call.keep)
        gate = mask.astype(np.float32) * (1 if call.mode == "hard" else sigmoid(z))
        with np.errstate(all="ignore"):
            pre = x @ np.asarray(call.weight, np.float32).T
            if call.bias is not None:
                pre = pre + np.asarray(call.bias, np.float32)
            y = gate * pre  # the bug: closed channels are computed, then multiplied by 0
        return y.astype(call.x.dtype), (mask if call.return_mask else None)


plugin = ClosedChannelsComputed()
