"""MKL VML initialised in one thread before dshal's first parallel ``exp`` / ``log`` on the CPU.

torch's CPU ``exp`` and ``log`` of float32/float64 call Intel MKL's vector math library (VML,
high-accuracy mode) on each OpenMP thread's chunk. Measured with torch 2.13.0+cpu (MKL 2024.2)
on the 2-core development machine: when VML's first call in a process comes from two threads
at once (a tensor large enough to be split across threads, in a process where another thread
had already run torch), one thread's chunk is sometimes computed by a low-accuracy path, about
1.5e-4 relative error (~1770 ulp) instead of under 1 ulp, and only in that first call: 11 of
225 fresh processes over five runs, for ``exp`` of a [2, 4, 97, 97] tensor. CI saw it as a
``dshal certify torch --full`` whose first run of a case differed bitwise from its rerun. A
first VML call made by a single thread (a tensor below torch's parallel grain) leaves every
later call exact: 0 anomalies in 280 fresh processes. :func:`ensure` makes that call once per
process, before dshal's torch kernels use ``exp`` or ``log`` on CPU tensors.
"""

from __future__ import annotations

import threading

import torch

_lock = threading.Lock()
_done = False


def ensure(device: torch.device) -> None:
    """Initialise VML single-threaded once per process (a no-op off the CPU and after the first
    call)."""
    global _done
    if _done or device.type != "cpu":
        return
    with _lock:
        if not _done:
            tiny = torch.ones(8, dtype=torch.float32)  # far below the parallel grain
            torch.exp(tiny)
            torch.log(tiny)
            torch.exp(tiny.double())
            torch.log(tiny.double())
            _done = True
