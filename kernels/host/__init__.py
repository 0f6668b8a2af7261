"""Host-side launch sequences of the portable kernels, written once for every device backend.

Each operator's sequence (which kernels, in which order, over which sizes, with which
arguments) is the same whether the kernels run through OpenCL or CuPy; only moving bytes and
launching differ. Those differences live behind :class:`~dshal_kernels.host.session.Session`,
which each backend implements (``dshal_opencl.device.Session``, ``dshal_cupy.device.Session``).

- :mod:`.attention`: ``sparse_attention`` (selection, then the online-softmax pass);
- :mod:`.backward`: its backward (delta, dq per query, dk/dv per key);
- :mod:`.forms`: its varlen, paged and block_keys forms (DESIGN 3.1a), one launch per stage;
- :mod:`.gemm`: ``quantize`` and the kernel path of ``gemm`` (packing, tiles, int8 groups);
- :mod:`.gated`: ``gated_channels`` (masks, gating, the open-channel product).

Nothing here imports a vendor library: arrays are created through the session's ``xp``
(numpy or cupy) and host-side decisions use numpy arrays from ``Session.host``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from dshal_kernels.host import attention, backward, forms, gated, gemm

__all__ = ["RUNNERS", "attention", "backward", "forms", "gated", "gemm"]

#: operator -> its launch sequence ``(session, call) -> results`` (the run hooks' results)
RUNNERS: dict[str, Callable[[Any, Any], Any]] = {
    "sparse_attention": forms.sparse_attention,
    "sparse_attention_backward": backward.sparse_attention_backward,
    "quantize": gemm.quantize,
    "gemm": gemm.gemm,
    "gated_channels": gated.gated_channels,
}
