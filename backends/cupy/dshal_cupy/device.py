"""The GPU as CuPy sees it: the probe, one runtime per device, launch shapes, and the
:class:`Session` the shared launch sequences (``dshal_kernels.host``) run in.

Work is queued on CuPy's current stream (``cupy.cuda.get_current_stream()``), never
synchronised by the backend except where the host must read a result (the open channels of a
weighted ``gated_channels``, the caller's indices for ``return_indices``). A torch caller's
stream is ordered against it by the DLPack exchange (``__dlpack__(stream=...)``).
"""

from __future__ import annotations

import math
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, ClassVar

import numpy as np

from dshal.capabilities import DeviceInfo
from dshal.errors import BackendRuntimeError
from dshal_cupy.errors import DeviceMemoryError, LaunchError
from dshal_cupy.vendor import Vendor
from dshal_kernels import Defines

#: CUDA and HIP limits: threads per block, grid extents along x, y, z
MAX_THREADS = 1024
MAX_GRID = (2**31 - 1, 65535, 65535)


def launch_shape(size: tuple[int, ...], width: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """``(grid, block)`` covering the global ``size`` (1-3 extents, each >= 1).

    Blocks are ``width`` threads along x; along y and z a block grows by powers of two only
    when the grid would exceed its limit (65535), as long as the block keeps <= 1024 threads.
    Kernels bounds-check every dimension, so the padding is harmless.
    """
    if not 1 <= len(size) <= 3 or min(size) < 1:
        raise ValueError(f"size={size} (1 to 3 extents, each >= 1)")
    block, grid = [width], [-(-size[0] // width)]
    for d, extent in enumerate(size[1:], start=1):
        b = 1
        while -(-extent // b) > MAX_GRID[d] and math.prod(block) * b * 2 <= MAX_THREADS:
            b *= 2
        block.append(b)
        grid.append(-(-extent // b))
    if any(g > m for g, m in zip(grid, MAX_GRID)):
        raise LaunchError(f"a launch over {list(size)} work-items needs a grid of {grid} "
                          f"blocks of {block} threads, beyond the limits {list(MAX_GRID)}")
    return tuple(grid), tuple(block)


def probe(vendor: Vendor) -> DeviceInfo:
    """Is a ``vendor`` GPU usable through CuPy? Asks the runtime for a device count."""
    try:
        import cupy
    except ImportError as exc:
        return DeviceInfo(present=False, reason=f"cupy cannot be imported: {exc} "
                                                f"({vendor.install})")
    from cupy.cuda import runtime

    if bool(runtime.is_hip) != vendor.hip:
        build = "ROCm (HIP)" if runtime.is_hip else "CUDA"
        return DeviceInfo(present=False, reason=f"the installed CuPy {cupy.__version__} is its "
                                                f"{build} build; {vendor.install}")
    try:
        count = runtime.getDeviceCount()
    except runtime.CUDARuntimeError as exc:
        return DeviceInfo(present=False, reason=f"no {vendor.label} device: the runtime's "
                                                f"device count failed: {exc}")
    if count == 0:
        return DeviceInfo(present=False, reason=f"no {vendor.label} device (device count 0)")
    props = [runtime.getDeviceProperties(i) for i in range(count)]
    details = {f"device {i}": describe(vendor, p) for i, p in enumerate(props)}
    if not vendor.hip:
        from dshal_cupy.blas import CC_KEY

        details[CC_KEY] = ", ".join(f"{p['major']}.{p['minor']}" for p in props)
    details["streams"] = "CuPy's current stream; torch streams through DLPack"
    details["kernel cache"] = "CuPy's (CUPY_CACHE_DIR, default ~/.cupy/kernel_cache)"
    return DeviceInfo(present=True, name=_text(props[0]["name"]),
                      driver=f"driver {vendor.version_text(runtime.driverGetVersion())}, "
                             f"runtime {vendor.version_text(runtime.runtimeGetVersion())}, "
                             f"CuPy {cupy.__version__}",
                      details=details)


def _text(raw: Any) -> str:
    return raw.decode(errors="replace").strip() if isinstance(raw, bytes) else str(raw).strip()


def describe(vendor: Vendor, props: dict[str, Any]) -> str:
    """One line per device for ``dshal info``: name, architecture, units, memory."""
    return (f"{_text(props['name'])} ({vendor.arch(props)}, {props['multiProcessorCount']} "
            f"{'CU' if vendor.hip else 'SM'}, {props['totalGlobalMem'] / 2**30:.1f} GiB)")


class Runtime:
    """One device's facts and program table, opened once per process and device."""

    _lock = threading.Lock()
    _open: ClassVar[dict[tuple[str, int], Runtime]] = {}

    def __init__(self, vendor: Vendor, device_id: int) -> None:
        from cupy.cuda import runtime

        from dshal_cupy.programs import Programs

        props = runtime.getDeviceProperties(device_id)
        self.vendor, self.device_id = vendor, device_id
        self.arch = vendor.arch(props)
        self.name = f"{_text(props['name'])} ({vendor.label} device {device_id}, {self.arch})"
        self.programs = Programs(vendor, self.arch)

    @classmethod
    def get(cls, vendor: Vendor, device_id: int) -> Runtime:
        """The runtime of ``vendor``'s device ``device_id`` (opened on first use)."""
        key = (vendor.name, device_id)
        with cls._lock:
            if key not in cls._open:
                cls._open[key] = Runtime(vendor, device_id)
            return cls._open[key]

    @contextmanager
    def session(self, op: str) -> Iterator[Session]:
        """One call's work on this device; CuPy failures become dshal errors."""
        import cupy
        from cupy.cuda import driver, runtime

        s = Session(self, op)
        with cupy.cuda.Device(self.device_id):
            try:
                yield s
            except cupy.cuda.memory.OutOfMemoryError as exc:
                raise s.memory_error("the call's arrays", _asked(exc)) from exc
            except (driver.CUDADriverError, runtime.CUDARuntimeError) as exc:
                raise BackendRuntimeError(f"{self.vendor.label} failed in {op} on "
                                          f"{self.name}: {exc}") from exc


def _asked(exc: Exception) -> int:
    """The bytes an ``OutOfMemoryError`` was allocating (its first argument)."""
    size = exc.args[0] if exc.args else 0
    return size if isinstance(size, int) else 0


class Session:
    """One call's device work (a :class:`dshal_kernels.host.session.Session` over CuPy)."""

    cpu = False

    def __init__(self, rt: Runtime, op: str) -> None:
        import cupy

        self.rt, self.op, self.xp, self.held = rt, op, cupy, 0

    def memory_error(self, what: str, nbytes: int) -> DeviceMemoryError:
        import cupy

        free, total = cupy.cuda.runtime.memGetInfo()
        pool = cupy.get_default_memory_pool()
        return DeviceMemoryError(what, nbytes, self.held, free, total,
                                 pool.total_bytes() - pool.used_bytes(), self.rt.name)

    def program(self, defines: Defines) -> Any:
        return self.rt.programs.get(defines)

    def _new(self, make: Any, nbytes: int, what: str) -> Any:
        import cupy

        try:
            arr = make()
        except cupy.cuda.memory.OutOfMemoryError as exc:
            raise self.memory_error(what, nbytes) from exc
        self.held += nbytes
        return arr

    def upload(self, x: Any, what: str, dtype: Any = None) -> Any:
        xp = self.xp
        nbytes = int(np.prod(x.shape)) * np.dtype(dtype or x.dtype).itemsize
        return self._new(lambda: xp.ascontiguousarray(xp.asarray(x, dtype)), nbytes, what)

    def view(self, x: Any, what: str) -> Any:
        """A buffer the kernels only read: a contiguous CuPy array is used as it is."""
        return self.upload(x, what)

    def alloc(self, nbytes: int, what: str) -> Any:
        size = max(int(nbytes), 1)
        return self._new(lambda: self.xp.empty(size, np.uint8), size, what)

    def zeros(self, nbytes: int, what: str) -> Any:
        size = max(int(nbytes), 1)
        return self._new(lambda: self.xp.zeros(size, np.uint8), size, what)

    def download(self, buf: Any, shape: tuple[int, ...], dtype: Any) -> Any:
        dt = np.dtype(dtype)
        raw = buf.reshape(-1).view(np.uint8)[: math.prod(shape) * dt.itemsize]
        return raw.view(dt).reshape(shape)

    def download_corner(self, buf: Any, padded: tuple[int, int], shape: tuple[int, int],
                        dtype: Any) -> Any:
        full = self.download(buf, padded, dtype)
        if padded == shape:
            return full
        return self.xp.ascontiguousarray(full[: shape[0], : shape[1]])

    def host(self, x: Any) -> np.ndarray:
        return self.xp.asnumpy(x)

    def run(self, kernel: Any, size: tuple[int, ...], *args: Any) -> None:
        if min(size) <= 0:
            return
        grid, block = launch_shape(size, self.rt.vendor.launch_width)
        kernel(grid, block, args)
