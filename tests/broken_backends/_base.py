"""The numpy backend under another name: subclass :class:`Wrapped` and override one hook."""

from __future__ import annotations

import dataclasses
from typing import Any

from dshal.backends.numpy import plugin as honest
from dshal.capabilities import BackendSpec, DeviceInfo
from dshal.hookspec import hookimpl


class Wrapped:
    """Delegates every hook to the numpy backend; ``name`` is the entry-point name."""

    name = "wrapped"

    @hookimpl
    def dshal_backend_declare(self) -> BackendSpec:
        spec = honest.dshal_backend_declare()
        return dataclasses.replace(spec, name=self.name, version="0.0.0", priority=-10,
                                   description=f"broken on purpose: {type(self).__doc__}")

    @hookimpl
    def dshal_device_probe(self) -> DeviceInfo:
        return honest.dshal_device_probe()

    @hookimpl
    def dshal_sparse_attention_run(self, call: Any) -> Any:
        return honest.dshal_sparse_attention_run(call)

    @hookimpl
    def dshal_sparse_attention_backward_run(self, call: Any) -> Any:
        return honest.dshal_sparse_attention_backward_run(call)

    @hookimpl
    def dshal_quantize_run(self, call: Any) -> Any:
        return honest.dshal_quantize_run(call)

    @hookimpl
    def dshal_gemm_run(self, call: Any) -> Any:
        return honest.dshal_gemm_run(call)

    @hookimpl
    def dshal_gated_channels_run(self, call: Any) -> Any:
        return honest.dshal_gated_channels_run(call)
