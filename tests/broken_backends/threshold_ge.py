"""Gates opened by ``logit >= threshold`` instead of the strict ``>``."""

from dataclasses import replace

import numpy as np

from dshal.hookspec import hookimpl
from tests.broken_backends._base import Wrapped


class ThresholdGe(Wrapped):
    """threshold compared with >= instead of >"""

    name = "bb_threshold_ge"

    @hookimpl
    def dshal_gated_channels_run(self, call):
        if call.mode == "soft" or call.keep is not None:
            return super().dshal_gated_channels_run(call)
        z = np.asarray(call.gate_logits)
        at = z == np.asarray(call.threshold, z.dtype)
        if not at.any():
            return super().dshal_gated_channels_run(call)
        above = call.threshold + max(abs(call.threshold), 1.0) * 2.0**-6  # the bug: at opens
        z = np.where(at, np.asarray(above, z.dtype), z)
        return super().dshal_gated_channels_run(replace(call, gate_logits=z))


plugin = ThresholdGe()
