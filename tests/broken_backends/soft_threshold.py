"""mode="soft" thresholded like soft_hard: channels below the threshold are closed although
soft mode closes nothing."""

from dataclasses import replace

from dshal.hookspec import hookimpl
from tests.broken_backends._base import Wrapped


class SoftThreshold(Wrapped):
    """soft mode thresholding"""

    name = "bb_soft_threshold"

    @hookimpl
    def dshal_gated_channels_run(self, call):
        if call.mode == "soft":
            call = replace(call, mode="soft_hard")
        return super().dshal_gated_channels_run(call)


plugin = SoftThreshold()
