"""A NaN gate logit opens its channel in threshold mode (``not (logit <= threshold)``)."""

from dataclasses import replace

import numpy as np

from dshal.hookspec import hookimpl
from tests.broken_backends._base import Wrapped


class NanOpens(Wrapped):
    """NaN logits open the channel"""

    name = "bb_nan_opens"

    @hookimpl
    def dshal_gated_channels_run(self, call):
        z = np.asarray(call.gate_logits)
        if call.mode == "soft" or call.keep is not None or not np.isnan(z).any():
            return super().dshal_gated_channels_run(call)
        opened = np.where(np.isnan(z), np.asarray(call.threshold + 8.0, z.dtype), z)
        return super().dshal_gated_channels_run(replace(call, gate_logits=opened))


plugin = NanOpens()
