"""Typed failures of the CuPy backends: each carries what a user needs to act on it."""

from __future__ import annotations

from collections.abc import Sequence

from dshal.errors import BackendRuntimeError


class KernelBuildError(BackendRuntimeError):
    """NVRTC/hiprtc rejected a kernel: the kernel, the architecture, the options, the log."""

    def __init__(self, kernel: str, arch: str, options: Sequence[str], log: str) -> None:
        self.kernel, self.arch, self.options, self.log = kernel, arch, tuple(options), log
        flags = " ".join(options) or "none"
        super().__init__(f"compiling kernel {kernel!r} for {arch} failed (options: {flags}); "
                         f"compiler log:\n{log.strip()}")


class DeviceMemoryError(BackendRuntimeError, MemoryError):
    """A device allocation failed: the bytes asked for, what this call already holds, and the
    device's free and total memory (plus what CuPy's pool keeps cached)."""

    def __init__(self, what: str, requested: int, held: int, free: int, total: int,
                 pooled: int, device: str) -> None:
        self.requested, self.free, self.total = requested, free, total
        asked = f"{requested:,} bytes asked for, {held:,} bytes already held by this call"
        memory = f"device memory free {free:,} of {total:,} bytes"
        pool = (f"CuPy's pool caches {pooled:,} bytes (cupy.get_default_memory_pool()."
                "free_all_blocks() returns them)")
        super().__init__(f"out of memory on {device} allocating {what}: {asked}; {memory}, "
                         + pool)


class LaunchError(BackendRuntimeError):
    """A launch exceeds the device's grid limits."""
