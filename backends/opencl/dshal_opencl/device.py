"""Finding the OpenCL device, opening it, and moving host arrays to and from it.

Choice: ``DSHAL_OPENCL_DEVICE=platform:device`` (each an index or a case-insensitive name
substring; ``platform`` alone means its first device), else the first GPU of any platform, else
the first device. :class:`Runtime` holds the context and queue of that device; a
:class:`Session` holds one call's buffers and turns OpenCL failures into dshal errors.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np

from dshal.errors import BackendRuntimeError
from dshal_kernels import Defines
from dshal_opencl.errors import DeviceSelectionError, OpenCLAllocationError

ENV = "DSHAL_OPENCL_DEVICE"


@dataclass(frozen=True)
class Found:
    """One OpenCL device as enumerated: indices, names, and the pyopencl objects."""

    pi: int
    di: int
    platform: Any
    device: Any

    @property
    def label(self) -> str:
        return f"{self.pi}:{self.di}"

    def describe(self) -> str:
        import pyopencl as cl

        d = self.device
        return (f"{d.name.strip()} ({cl.device_type.to_string(d.type)}, {d.version.strip()}, "
                f"{d.max_compute_units} CU, {d.global_mem_size / 2**30:.1f} GiB, max alloc "
                f"{d.max_mem_alloc_size / 2**30:.1f} GiB)")


def enumerate_devices() -> list[Found]:
    """Every device of every OpenCL platform (empty when no ICD is installed)."""
    import pyopencl as cl

    try:
        platforms = cl.get_platforms()
    except cl.Error:  # PLATFORM_NOT_FOUND_KHR: no ICD at all
        return []
    found = []
    for pi, p in enumerate(platforms):
        try:
            devices = p.get_devices()
        except cl.Error:  # DEVICE_NOT_FOUND on a platform without devices
            devices = []
        found.extend(Found(pi, di, p, d) for di, d in enumerate(devices))
    return found


def _match(text: str, index: int, name: str) -> bool:
    text = text.strip()
    return int(text) == index if text.isdigit() else text.lower() in name.lower()


def choose(found: list[Found], spec: str | None) -> Found:
    """The device ``spec`` names (``platform:device``), or the default choice."""
    import pyopencl as cl

    if not found:
        raise DeviceSelectionError("no OpenCL device found (install a driver, or "
                                   "pip install 'dshal-opencl[pocl]' for a CPU device)")
    if not spec:
        gpus = [f for f in found if f.device.type & cl.device_type.GPU]
        return (gpus or found)[0]
    plat, _, dev = spec.partition(":")
    for f in found:
        by_platform = _match(plat, f.pi, f.platform.name)
        if by_platform and (_match(dev, f.di, f.device.name) if dev else f.di == 0):
            return f
    valid = "; ".join(f"{f.label} = {f.platform.name.strip()}: {f.device.name.strip()}"
                      for f in found)
    raise DeviceSelectionError(f"{ENV}={spec!r} matches no OpenCL device (give "
                               f"platform:device as indices or name parts); valid: {valid}")


def probe_details(found: list[Found], chosen: Found | None) -> dict[str, str]:
    """``dshal info`` details: every platform and device, the chosen one marked."""
    details = {}
    for f in found:
        if f.di == 0:
            details[f"platform {f.pi}"] = f"{f.platform.name.strip()} ({f.platform.version})"
        mark = " [selected]" if chosen is not None and f.label == chosen.label else ""
        details[f"device {f.label}"] = f.describe() + mark
    details["selection"] = (f"{ENV}={os.environ[ENV]!r}" if os.environ.get(ENV)
                            else f"first GPU, else first device ({ENV}=platform:device "
                                 "overrides)")
    return details


class Runtime:
    """The chosen device's context and queue, opened once per process."""

    _lock = threading.Lock()
    _current: Runtime | None = None

    def __init__(self, found: Found) -> None:
        import pyopencl as cl

        self.found, self.device = found, found.device
        self.context = cl.Context([self.device])
        self.queue = cl.CommandQueue(self.context, self.device)
        self.name = self.device.name.strip()
        self.max_alloc = int(self.device.max_mem_alloc_size)
        self.global_mem = int(self.device.global_mem_size)
        self.cr_div = bool(self.device.single_fp_config
                           & cl.device_fp_config.CORRECTLY_ROUNDED_DIVIDE_SQRT)
        self.identity = (f"{found.platform.name.strip()} {found.platform.version.strip()} | "
                         f"{self.name} | {self.device.version.strip()} | driver "
                         f"{self.device.driver_version.strip()} | pyopencl {cl.VERSION_TEXT}")
        #: one call at a time: kernels hold their arguments between set_args and enqueue
        self.run_lock = threading.Lock()
        #: work-group width along dim 0, fixed so that a runtime which compiles per work-group
        #: size (PoCL) compiles each kernel once; kernels ignore the padding work-items
        self.group = 16 if self.device.type & cl.device_type.CPU else 64

    @classmethod
    def get(cls) -> Runtime:
        """The process's runtime on the chosen device (opened on first use)."""
        with cls._lock:
            if cls._current is None:
                cls._current = Runtime(choose(enumerate_devices(), os.environ.get(ENV)))
            return cls._current

    @contextmanager
    def session(self, op: str) -> Iterator[Session]:
        """One call's buffers, released at the end; OpenCL errors become dshal errors."""
        import pyopencl as cl

        with self.run_lock:
            s = Session(self, op)
            try:
                yield s
                self.queue.finish()
            except cl.MemoryError as exc:
                raise s.alloc_error("the call's buffers", 0, exc) from exc
            except cl.Error as exc:
                raise BackendRuntimeError(f"OpenCL failed in {op} on {self.name}: {exc} "
                                          f"({s.in_use:,} bytes allocated)") from exc
            finally:
                s.release()


class Session:
    """Buffers of one call on one :class:`Runtime` (the
    :class:`dshal_kernels.host.session.Session` the shared launch sequences run in)."""

    xp = np

    def __init__(self, rt: Runtime, op: str) -> None:
        import pyopencl as cl

        self.rt, self.op, self.in_use = rt, op, 0
        self.cpu = bool(rt.device.type & cl.device_type.CPU)
        self._buffers: list[Any] = []

    def program(self, defines: Defines) -> Any:
        """The program of ``defines`` on this device (built once per process)."""
        from dshal_opencl.programs import programs

        return programs().get(defines)

    @staticmethod
    def host(x: Any) -> np.ndarray:
        return np.asarray(x)

    def alloc_error(self, what: str, nbytes: int, exc: Exception) -> OpenCLAllocationError:
        rt = self.rt
        return OpenCLAllocationError(what, nbytes, self.in_use, rt.max_alloc, rt.global_mem,
                                     rt.name, str(exc).strip() or type(exc).__name__)

    def alloc(self, nbytes: int, what: str, host: np.ndarray | None = None) -> Any:
        """A device buffer of ``nbytes`` (at least 1), filled from ``host`` when given."""
        import pyopencl as cl

        size = max(int(nbytes), 1)
        self.check_size(size, what)
        try:
            if host is not None and host.nbytes:
                buf = cl.Buffer(self.rt.context, cl.mem_flags.READ_WRITE
                                | cl.mem_flags.COPY_HOST_PTR, hostbuf=host)
            else:
                buf = cl.Buffer(self.rt.context, cl.mem_flags.READ_WRITE, size)
        except cl.Error as exc:
            raise self.alloc_error(what, size, exc) from exc
        self._buffers.append(buf)
        self.in_use += size
        return buf

    def check_size(self, nbytes: int, what: str) -> None:
        """Refuse a buffer above the device's allocation limit before anything is copied."""
        if nbytes > self.rt.max_alloc:
            raise self.alloc_error(what, nbytes, ValueError(
                "above the device's CL_DEVICE_MAX_MEM_ALLOC_SIZE"))

    def upload(self, x: Any, what: str, dtype: Any = None) -> Any:
        """A host array as a contiguous device buffer (converted to ``dtype`` if given); the
        size is checked first, so a huge broadcast (zero-stride) view is never copied."""
        x = np.asarray(x)
        self.check_size(x.size * np.dtype(x.dtype if dtype is None else dtype).itemsize, what)
        host = np.ascontiguousarray(x if dtype is None else x.astype(dtype))
        return self.alloc(host.nbytes, what, host)

    def view(self, x: Any, what: str) -> Any:
        """A buffer the kernels only read: on a CPU device, a contiguous host array is used in
        place (``CL_MEM_USE_HOST_PTR``, read-only: nothing is copied, so a call reads only the
        parts its kernels touch, e.g. a decode's pages); else :meth:`upload`."""
        import pyopencl as cl

        x = np.asarray(x)
        if not (self.cpu and x.nbytes and x.flags.c_contiguous):
            return self.upload(x, what)
        self.check_size(x.nbytes, what)
        try:
            buf = cl.Buffer(self.rt.context, cl.mem_flags.READ_ONLY | cl.mem_flags.USE_HOST_PTR,
                            hostbuf=x)
        except cl.Error as exc:
            raise self.alloc_error(what, x.nbytes, exc) from exc
        self._buffers.append(buf)
        return buf

    def zeros(self, nbytes: int, what: str) -> Any:
        buf = self.alloc(nbytes, what)
        if nbytes:
            import pyopencl as cl

            cl.enqueue_fill_buffer(self.rt.queue, buf, np.uint8(0), 0, int(nbytes))
        return buf

    def download(self, buf: Any, shape: tuple[int, ...], dtype: Any) -> np.ndarray:
        """The device buffer's first ``prod(shape)`` elements as a new host array."""
        import pyopencl as cl

        out = np.empty(shape, dtype)
        if out.nbytes:
            cl.enqueue_copy(self.rt.queue, out, buf)
        return out

    def download_corner(self, buf: Any, padded: tuple[int, int], shape: tuple[int, int],
                        dtype: Any) -> np.ndarray:
        """The [rows, cols] corner of a row-major [padded rows, padded cols] device matrix."""
        full = self.download(buf, padded, dtype)
        if padded == shape:
            return full
        return np.ascontiguousarray(full[: shape[0], : shape[1]])

    def run(self, kernel: Any, size: tuple[int, ...], *args: Any) -> None:
        """Enqueue ``kernel`` over the global ``size`` (nothing when any extent is 0), in
        work-groups of ``rt.group`` x 1 (x 1)."""
        import pyopencl as cl

        if min(size) <= 0:
            return
        local = (self.rt.group, *(1 for _ in size[1:]))
        padded = (-(-size[0] // local[0]) * local[0], *size[1:])
        kernel.set_args(*args)
        cl.enqueue_nd_range_kernel(self.rt.queue, kernel, padded, local)

    def release(self) -> None:
        for buf in self._buffers:
            buf.release()
        self._buffers.clear()
