"""Per-row gates applied by multiplication: channels closed in every row are skipped, but a
channel open in some rows is computed for all of them and multiplied by the 0/1 gate, so NaN in
its weights (or in x where it is closed) leaks into the rows where it is closed (0 * NaN)."""

import numpy as np

from dshal.backends.numpy.gating import open_mask, sigmoid
from dshal.hookspec import hookimpl
from tests.broken_backends._base import Wrapped


class GatedRowsMultiply(Wrapped):
    """rows where a channel is closed computed and multiplied by 0"""

    name = "bb_gated_rows_multiply"

    @hookimpl
    def dshal_gated_channels_run(self, call):
        x = np.asarray(call.x, np.float32)
        z = np.asarray(call.gate_logits, np.float32)
        mask = open_mask(z, call.mode, call.threshold, call.keep)
        if mask.ndim < 2 or call.x.dtype == np.float64:  # static gates; the float32 kernel only
            return super().dshal_gated_channels_run(call)
        somewhere = mask.reshape(-1, mask.shape[-1]).any(axis=0)
        gate = np.where(mask, 1 if call.mode == "hard" else sigmoid(z), 0).astype(np.float32)
        with np.errstate(all="ignore"):
            if call.weight is None:
                pre = x
            else:
                pre = x @ np.asarray(call.weight, np.float32).T
                if call.bias is not None:
                    pre = pre + np.asarray(call.bias, np.float32)
            y = np.where(somewhere, gate * pre, 0.0)  # the bug: 0 * NaN in open channels
        return y.astype(call.x.dtype), (mask if call.return_mask else None)


plugin = GatedRowsMultiply()
