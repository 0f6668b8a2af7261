"""``make kernels-check``: compile every kernel for every target, print a table, fail on errors.

Targets: OpenCL C on the first OpenCL device (PoCL's CPU device in CI, through pyopencl), CUDA
sm_80 and sm_90 through NVRTC (``cuda-bindings`` + ``nvidia-cuda-nvrtc``: cubins, no GPU
needed), HIP gfx90a through ``hipcc --genco`` (Debian's ``hipcc``) and through hiprtc (the
compiler CuPy's ROCm build uses; Debian's ``libamdhip64`` carries it). Each kernel is compiled
with every define set of :func:`dshal_kernels.check_variants`, so each ``#if`` path is seen by
each compiler. A missing compiler is an error, never a silent skip.

Usage: ``python -m dshal_kernels.check [--target NAME ...]``. The compile functions are the
ones the device backends build with (:func:`compile_nvrtc` returns the cubin).
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from dshal_kernels import KERNELS, Defines, Target, check_variants, source


class CompileError(Exception):
    """A kernel did not compile; the message holds the compiler's log."""


def compile_opencl(name: str, options: Sequence[str]) -> bytes:
    """Build ``name`` for the first OpenCL device (preferring PoCL); the program binary."""
    import pyopencl as cl

    platforms = cl.get_platforms()
    if not platforms:
        raise CompileError("no OpenCL platform found (pip install pocl-binary-distribution)")
    platforms.sort(key=lambda p: "Portable Computing Language" not in p.name)
    device = platforms[0].get_devices()[0]
    ctx = cl.Context([device])
    try:
        prg = cl.Program(ctx, source(name)).build(options=list(options))
    except cl.RuntimeError as exc:
        raise CompileError(str(exc)) from None
    return prg.get_info(cl.program_info.BINARIES)[0]


def compile_nvrtc(name: str, options: Sequence[str], arch: str) -> bytes:
    """Compile ``name`` with NVRTC for ``arch`` (e.g. ``"sm_80"``); the cubin."""
    try:
        from cuda.bindings import nvrtc
    except ImportError as exc:
        raise CompileError(f"NVRTC unavailable: {exc} (pip install cuda-bindings "
                           "nvidia-cuda-nvrtc)") from None

    def ok(result: tuple, what: str) -> tuple:
        if result[0] != nvrtc.nvrtcResult.NVRTC_SUCCESS:
            raise CompileError(f"{what}: {result[0]}")
        return result[1:]

    (prog,) = ok(nvrtc.nvrtcCreateProgram(source(name).encode(), f"{name}.cu".encode(), 0, [],
                                          []), "nvrtcCreateProgram")
    try:
        opts = [f"--gpu-architecture={arch}".encode(), *(o.encode() for o in options)]
        (status,) = nvrtc.nvrtcCompileProgram(prog, len(opts), opts)
        if status != nvrtc.nvrtcResult.NVRTC_SUCCESS:
            (size,) = ok(nvrtc.nvrtcGetProgramLogSize(prog), "nvrtcGetProgramLogSize")
            log = b" " * size
            ok(nvrtc.nvrtcGetProgramLog(prog, log), "nvrtcGetProgramLog")
            raise CompileError(log.decode(errors="replace").rstrip("\0 \n"))
        (size,) = ok(nvrtc.nvrtcGetCUBINSize(prog), "nvrtcGetCUBINSize")
        cubin = b" " * size
        ok(nvrtc.nvrtcGetCUBIN(prog, cubin), "nvrtcGetCUBIN")
        return cubin
    finally:
        nvrtc.nvrtcDestroyProgram(prog)


def compile_hip(name: str, options: Sequence[str], arch: str) -> bytes:
    """Compile ``name`` with ``hipcc --genco`` for ``arch`` (e.g. ``"gfx90a"``); the code
    object."""
    hipcc = shutil.which("hipcc")
    if hipcc is None:
        raise CompileError("hipcc not found: install it (apt-get install -y hipcc); the HIP "
                           "target cannot be checked without it")
    with tempfile.TemporaryDirectory(prefix="dshal-hip-") as tmp:
        src, out = Path(tmp, f"{name}.hip"), Path(tmp, f"{name}.hsaco")
        src.write_text(source(name))
        cmd = [hipcc, f"--offload-arch={arch}", "--genco", str(src), "-o", str(out), *options]
        run = subprocess.run(cmd, capture_output=True, text=True, timeout=600,
                             env={**os.environ, "HIP_PLATFORM": "amd"})
        if run.returncode != 0 or not out.exists():
            raise CompileError((run.stderr or run.stdout).strip() or f"exit {run.returncode}")
        return out.read_bytes()


#: libraries that export hiprtc: ROCm >= 6 ships libhiprtc, earlier ones (and Debian's
#: libamdhip64-5, installed with hipcc) keep it in libamdhip64
_HIPRTC_LIBS = ("libhiprtc.so", "libhiprtc.so.6", "libamdhip64.so", "libamdhip64.so.5")


def _hiprtc() -> Any:
    import ctypes

    for name in _HIPRTC_LIBS:
        try:
            lib = ctypes.CDLL(name)
        except OSError:
            continue
        if hasattr(lib, "hiprtcCreateProgram"):
            return lib
    raise CompileError(f"hiprtc not found (tried {', '.join(_HIPRTC_LIBS)}): install hipcc "
                       "(apt-get install -y hipcc) or ROCm")


def compile_hiprtc(name: str, options: Sequence[str], arch: str) -> bytes:
    """Compile ``name`` with hiprtc (what CuPy's ROCm build uses at run time) for ``arch``
    (e.g. ``"gfx90a"``); the code object. Needs the library, not a GPU."""
    import ctypes

    lib = _hiprtc()
    prog = ctypes.c_void_p()
    if lib.hiprtcCreateProgram(ctypes.byref(prog), source(name).encode(),
                               f"{name}.hip".encode(), 0, None, None) != 0:
        raise CompileError("hiprtcCreateProgram failed")
    try:
        opts = [f"--offload-arch={arch}".encode(), *(o.encode() for o in options)]
        status = lib.hiprtcCompileProgram(prog, len(opts), (ctypes.c_char_p * len(opts))(*opts))
        size = ctypes.c_size_t()
        if status != 0:
            lib.hiprtcGetProgramLogSize(prog, ctypes.byref(size))
            log = ctypes.create_string_buffer(size.value + 1)
            lib.hiprtcGetProgramLog(prog, log)
            raise CompileError(log.value.decode(errors="replace").strip()
                               or f"hiprtcCompileProgram returned {status}")
        lib.hiprtcGetCodeSize(prog, ctypes.byref(size))
        code = ctypes.create_string_buffer(size.value)
        lib.hiprtcGetCode(prog, code)
        return code.raw
    finally:
        lib.hiprtcDestroyProgram(ctypes.byref(prog))


#: target name -> compile(kernel name, options) -> binary
TARGETS: dict[str, Callable[[str, Sequence[str]], bytes]] = {
    "opencl": compile_opencl,
    "cuda-sm_80": lambda n, o: compile_nvrtc(n, o, "sm_80"),
    "cuda-sm_90": lambda n, o: compile_nvrtc(n, o, "sm_90"),
    "hip-gfx90a": lambda n, o: compile_hip(n, o, "gfx90a"),
    "hiprtc-gfx90a": lambda n, o: compile_hiprtc(n, o, "gfx90a"),
}


def check(targets: Sequence[str], kernels: Sequence[str] | None = None
          ) -> dict[tuple[str, str], str]:
    """Compile each kernel's variants for each target: ``{(kernel, target): "" or error}``."""
    variants: dict[str, list[Defines]] = check_variants()
    results = {}
    for kernel in kernels or list(KERNELS):
        for target in targets:
            error = ""
            # the device facts each backend passes: CUDA and HIP divide correctly rounded
            facts = Target(HAS_CR_DIV=not target.startswith("opencl"))
            for defines in variants[kernel]:
                options = [*defines.options(), *facts.options()]
                try:
                    TARGETS[target](kernel, options)
                except CompileError as exc:
                    error = f"{' '.join(defines.options())}\n{exc}"
                    break
                except Exception as exc:  # a broken toolchain is an error too
                    error = f"{type(exc).__name__}: {exc}"
                    break
            results[kernel, target] = error
    return results


def table(results: dict[tuple[str, str], str], targets: Sequence[str]) -> str:
    """The kernel x target table, ``ok`` / ``error``."""
    kernels = list(dict.fromkeys(k for k, _ in results))
    width = max(len(k) for k in [*kernels, "kernel"])
    cols = [max(len(t), 5) for t in targets]
    lines = ["  ".join(["kernel".ljust(width), *(t.ljust(c) for t, c in zip(targets, cols))])]
    for k in kernels:
        cells = ["ok" if not results[k, t] else "error" for t in targets]
        lines.append("  ".join([k.ljust(width), *(s.ljust(c) for s, c in zip(cells, cols))]))
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dshal_kernels.check",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--target", action="append", choices=list(TARGETS),
                        help="targets to compile for (default: all)")
    parser.add_argument("--kernel", action="append", choices=list(KERNELS))
    args = parser.parse_args(argv)
    targets = args.target or list(TARGETS)
    start = time.perf_counter()
    results = check(targets, args.kernel)
    print(table(results, targets))
    failed = {key: err for key, err in results.items() if err}
    for (kernel, target), err in failed.items():
        print(f"\n--- {kernel} for {target} FAILED:\n{err[:4000]}", file=sys.stderr)
    n = len(results)
    print(f"kernels-check: {n - len(failed)} of {n} kernel x target builds ok "
          f"({time.perf_counter() - start:.0f} s)")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
