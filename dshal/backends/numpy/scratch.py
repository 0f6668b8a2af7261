"""Per-thread scratch buffers for the elementwise pipelines of the numpy backend.

A fresh numpy array of a few MiB costs a page fault per 4 KiB page on first touch, and on a
virtual machine that is expensive: measured here, a fresh 2 MiB temporary took 0.3-18 ms to
fill against 0.1 ms for a reused one, more than the arithmetic done in it. The chunked
pipelines (quantize, gemm's panels) therefore take their temporaries from buffers each thread
keeps between chunks and calls: at most a few chunk sizes (a few MiB) per thread.
"""

from __future__ import annotations

import math
import threading

import numpy as np

_LOCAL = threading.local()


def scratch(slot: str, shape: tuple[int, ...], dtype: np.dtype | type) -> np.ndarray:
    """An uninitialised C-contiguous ``shape`` array of ``dtype``, the calling thread's buffer
    ``slot`` (grown when too small). It stays valid until the same thread asks for ``slot``
    again: one slot per temporary that must live at the same time as the others."""
    dtype = np.dtype(dtype)
    nbytes = math.prod(shape) * dtype.itemsize
    buffers: dict[str, np.ndarray] = _LOCAL.__dict__.setdefault("buffers", {})
    buf = buffers.get(slot)
    if buf is None or buf.size < nbytes:
        buf = buffers[slot] = np.empty(max(nbytes, 64), np.uint8)
    return buf[:nbytes].view(dtype).reshape(shape)
