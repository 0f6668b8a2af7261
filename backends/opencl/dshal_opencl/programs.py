"""Building kernels: the source of ``dshal_kernels`` plus a define record -> an OpenCL program,
through the on-disk :class:`~dshal_opencl.cache.ProgramCache` and an in-process table.

A compile error raises :class:`~dshal_opencl.errors.OpenCLBuildError` with the compiler log;
a cached binary the driver refuses, or one that lacks a kernel looked up from it, is evicted
and rebuilt from source.
"""

from __future__ import annotations

import threading
from typing import Any

from dshal_kernels import Defines, Target, source
from dshal_kernels.host.session import Program
from dshal_opencl import cache
from dshal_opencl.device import Runtime
from dshal_opencl.errors import OpenCLBuildError


class Programs:
    """Every program this process built for one :class:`Runtime`."""

    def __init__(self, rt: Runtime) -> None:
        self.rt = rt
        self.cache = cache.ProgramCache() if cache.enabled() else None
        self.source_builds = 0
        self._built: dict[tuple[str, tuple[str, ...]], Program] = {}
        self._lock = threading.Lock()
        target = Target(HAS_CR_DIV=rt.cr_div)
        self.base_options = [*target.options(),
                             *(["-cl-fp32-correctly-rounded-divide-sqrt"] if rt.cr_div else [])]

    def get(self, defines: Defines) -> Program:
        """The program of ``defines.kernel`` built with ``defines`` (cached)."""
        options = (*self.base_options, *defines.options())
        key = (defines.kernel, options)
        with self._lock:
            prg = self._built.get(key)
            if prg is None:
                import pyopencl as cl

                text = source(defines.kernel)
                built, cached = self.build(defines.kernel, text, list(options))
                state = {"program": built, "cached": cached}

                def lookup(name: str) -> Any:
                    try:
                        return cl.Kernel(state["program"], name)
                    except cl.Error:
                        if not state["cached"]:
                            raise
                    # a cached binary without this kernel (another program's): evict, rebuild
                    with self._lock:
                        if state["cached"]:
                            self.cache.discard(state["cached"])  # type: ignore[union-attr]
                            state["program"] = self._build_source(defines.kernel, text,
                                                                  list(options), state["cached"])
                            state["cached"] = ""
                    return cl.Kernel(state["program"], name)

                prg = self._built[key] = Program(lookup)
            return prg

    def build(self, name: str, text: str, options: list[str]) -> tuple[Any, str]:
        """Build ``text`` (kernel ``name``) with ``options``: from the cache when it holds a
        binary, else from source (storing the binary). Returns the program and its cache key
        when it came from the cache ('' when built from source)."""
        key = cache.ProgramCache.key(text, options, self.rt.identity) if self.cache else ""
        binary = self.cache.load(key) if self.cache else None
        if binary is not None:
            prg = self._from_binary(binary, options)
            if prg is not None:
                return prg, key
            self.cache.discard(key)  # type: ignore[union-attr]
        return self._build_source(name, text, options, key), ""

    def _build_source(self, name: str, text: str, options: list[str], key: str) -> Any:
        prg = self._from_source(name, text, options)
        if self.cache:
            import pyopencl as cl

            self.cache.store(key, prg.get_info(cl.program_info.BINARIES)[0])
        return prg

    def _from_binary(self, binary: bytes, options: list[str]) -> Any | None:
        import pyopencl as cl

        try:
            prg = cl.Program(self.rt.context, [self.rt.device], [binary])
            prg.build(options=options)
            return prg
        except cl.Error:
            return None

    def _from_source(self, name: str, text: str, options: list[str]) -> Any:
        import pyopencl as cl

        self.source_builds += 1
        prg = cl._cl._Program(self.rt.context, text)  # no pyopencl cache: we keep our own
        try:
            prg.build(" ".join(options).encode(), [self.rt.device])
        except cl.Error as exc:
            try:
                log = prg.get_build_info(self.rt.device, cl.program_build_info.LOG)
            except cl.Error:
                log = ""
            raise OpenCLBuildError(name, options, self.rt.name, log or str(exc)) from None
        return prg


_PROGRAMS: Programs | None = None
_LOCK = threading.Lock()


def programs() -> Programs:
    """The process's program table on the chosen device."""
    global _PROGRAMS
    with _LOCK:
        if _PROGRAMS is None:
            _PROGRAMS = Programs(Runtime.get())
        return _PROGRAMS
