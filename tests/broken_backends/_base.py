"""The numpy backend under another name: subclass :class:`Wrapped` and override one hook."""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from dshal import reference
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

    def attention_with_mask(self, call: Any) -> tuple[Any, ...]:
        """The honest forward ``(out, selection, lse)`` (the selection is computed even when the
        call does not return it) followed by float32 ``q, k, v`` and the allowed mask
        [B, Hkv, Lq, Lk] (bool) of that selection: what a mutant rewriting the attention
        starts from."""
        selecting = call.top_k is not None
        out, sel, lse = honest.dshal_sparse_attention_run(
            dataclasses.replace(call, return_indices=call.return_indices or selecting))
        q, k, v = (np.asarray(x, np.float32) for x in (call.q, call.k, call.v))
        B, _, Lq, _ = q.shape
        Hkv, Lk = k.shape[1], k.shape[2]
        mask = reference.allowed_mask(Lq, Lk, B=B, Hkv=Hkv, block_size=call.block_size,
                                      window=call.window, causal=call.causal,
                                      indices=sel if selecting else call.indices)
        return out, sel, lse, q, k, v, mask

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
