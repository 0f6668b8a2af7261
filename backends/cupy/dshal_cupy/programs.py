"""Kernels of ``dshal_kernels`` built through ``cupy.RawModule``: NVRTC on CUDA, hiprtc on
ROCm, with the options of the kernel's define record.

CuPy caches the compiled binaries on disk (``CUPY_CACHE_DIR``, keyed by source, options,
architecture and compiler version) and per device in memory; this table keeps one module per
(kernel, options). A compile error raises :class:`~dshal_cupy.errors.KernelBuildError` with
the log and the architecture.
"""

from __future__ import annotations

import threading
from typing import Any

from dshal_cupy.errors import KernelBuildError
from dshal_cupy.vendor import Vendor
from dshal_kernels import Defines, Target, source
from dshal_kernels.host.session import Program


def build_options(defines: Defines) -> tuple[str, ...]:
    """The compiler options of ``defines``: the device facts, then the kernel's defines (the
    same list ``make kernels-check`` compiles). CUDA and HIP divide correctly rounded."""
    return (*Target(HAS_CR_DIV=True).options(), *defines.options())


class Programs:
    """Every module this process built for one device architecture."""

    def __init__(self, vendor: Vendor, arch: str) -> None:
        self.vendor, self.arch = vendor, arch
        self._built: dict[tuple[str, tuple[str, ...]], Program] = {}
        self._lock = threading.Lock()

    def get(self, defines: Defines) -> Program:
        """The module of ``defines.kernel`` compiled with ``defines`` (built once)."""
        options = build_options(defines)
        key = (defines.kernel, options)
        with self._lock:
            prg = self._built.get(key)
            if prg is None:
                module = self.compile(defines.kernel, options)
                prg = self._built[key] = Program(module.get_function)
            return prg

    def compile(self, kernel: str, options: tuple[str, ...]) -> Any:
        """Compile and load ``kernel`` on the current device; errors carry the log."""
        import cupy
        from cupy.cuda import compiler

        module = cupy.RawModule(code=source(kernel), options=options, backend="nvrtc")
        try:
            module.compile()
        except compiler.CompileException as exc:
            raise KernelBuildError(kernel, self.arch, options, exc.get_message()) from None
        return module
