"""What a backend provides so the shared launch sequences can run on its device."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

from dshal_kernels import Defines


class Program:
    """A built program whose kernels are attributes (``prg.attn_fwd``), each looked up once
    through ``lookup(name)`` (``pyopencl.Kernel``, ``cupy.RawModule.get_function``...)."""

    def __init__(self, lookup: Callable[[str], Any]) -> None:
        self._lookup, self._kernels = lookup, {}

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_"):
            raise AttributeError(name)
        kernel = self._kernels.get(name)
        if kernel is None:
            kernel = self._kernels[name] = self._lookup(name)
        return kernel


class Session(Protocol):
    """One call's device work on one backend.

    ``xp`` is the array module of the backend's results (numpy or cupy); ``cpu`` says whether
    the device is a CPU (kernels may then keep more state per work-item). Buffers are opaque:
    whatever :meth:`alloc` and :meth:`upload` return, :meth:`run` accepts as a kernel argument.
    """

    xp: Any
    cpu: bool

    def program(self, defines: Defines) -> Program:
        """The built program of ``defines.kernel`` with ``defines`` (cached)."""

    def upload(self, x: Any, what: str, dtype: Any = None) -> Any:
        """``x`` (a host array, or an array of the backend's kind) as a contiguous device
        buffer, converted to ``dtype`` when given; ``what`` names it in errors."""

    def view(self, x: Any, what: str) -> Any:
        """Like :meth:`upload` for an input the kernels only read, without copying it where
        the device can read ``x`` in place (a CPU OpenCL device, a CuPy array): a call then
        costs what its kernels read, not the size of ``x`` (a paged cache's pool)."""

    def alloc(self, nbytes: int, what: str) -> Any:
        """An uninitialised device buffer of ``nbytes`` (at least 1)."""

    def zeros(self, nbytes: int, what: str) -> Any:
        """A zero-filled device buffer of ``nbytes``."""

    def download(self, buf: Any, shape: tuple[int, ...], dtype: Any) -> Any:
        """The buffer's first ``prod(shape)`` elements of ``dtype`` as a result array."""

    def download_corner(self, buf: Any, padded: tuple[int, int], shape: tuple[int, int],
                        dtype: Any) -> Any:
        """The [rows, cols] corner of a row-major [padded rows, padded cols] buffer."""

    def host(self, x: Any) -> Any:
        """``x`` as a numpy array (for small host-side decisions: index widths, open rows)."""

    def run(self, kernel: Any, size: tuple[int, ...], *args: Any) -> None:
        """Launch ``kernel`` over the global ``size`` (nothing when an extent is 0); kernels
        bounds-check every dimension, so launchers may pad the size to whole groups."""
