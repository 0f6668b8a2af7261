"""The OpenCL backend's typed failures: each carries what a user needs to act on it."""

from __future__ import annotations

from dshal.errors import BackendRuntimeError


class OpenCLBuildError(BackendRuntimeError):
    """A kernel failed to compile: names the kernel, the options and the device, with the
    compiler's log."""

    def __init__(self, kernel: str, options: list[str], device: str, log: str) -> None:
        self.kernel, self.options, self.device, self.log = kernel, options, device, log
        super().__init__(f"building kernel {kernel!r} for {device} failed (options: "
                         f"{' '.join(options) or 'none'}); compiler log:\n{log.strip()}")


class OpenCLAllocationError(BackendRuntimeError, MemoryError):
    """A device allocation failed: says how much was requested, how much the backend already
    holds for the call and the device's limits."""

    def __init__(self, what: str, requested: int, in_use: int, max_alloc: int, global_mem: int,
                 device: str, cause: str) -> None:
        self.requested, self.max_alloc, self.global_mem = requested, max_alloc, global_mem
        super().__init__(
            f"cannot allocate {what} on {device}: {requested:,} bytes requested with "
            f"{in_use:,} bytes already allocated for this call; device limits: max single "
            f"allocation {max_alloc:,} bytes, global memory {global_mem:,} bytes ({cause})")


class DeviceSelectionError(ValueError):
    """``DSHAL_OPENCL_DEVICE`` names no device; the message lists the valid ones."""
