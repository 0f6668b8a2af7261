"""The triton backend's device probe, architecture facts and per-architecture refusals.

Normal mode: a GPU must be there (torch reports a cuda/ROCm, xpu or npu device), triton must
import, and a tiny kernel must compile and run on it and give the right answer. Without any GPU
device node the probe says so without importing torch or triton (a numpy-only program does not
pay for them). Interpreter mode (:mod:`dshal_triton.mode`): the host CPU, under Triton's
interpreter, after the same tiny kernel ran there.

Capabilities are declared for the union of architectures; :func:`refusals` narrows them per
device from the architecture the probe recorded (``arch:<index>`` in the details), each reason
naming the architecture and what it lacks.
"""

from __future__ import annotations

import glob
import sys
from importlib import metadata
from typing import Any

from dshal.capabilities import DeviceInfo, Signature
from dshal.dtypes import FP8_DTYPES
from dshal_triton import mode

#: device nodes of the GPU families Triton reaches (NVIDIA, ROCm, Intel/AMD DRM, Ascend)
DEVICE_NODES = ("/dev/nvidia[0-9]*", "/dev/kfd", "/dev/dri/renderD*", "/dev/davinci[0-9]*")
#: torch device type names the backend serves, in probe order
TORCH_KINDS = ("cuda", "xpu", "npu")
#: tile of the probe's kernel
_PROBE_N = 64


def family(x: Any) -> str:
    """``interpreter`` in interpreter mode, else the torch device type of ``x`` (ROCm builds
    of torch call their devices ``cuda``)."""
    return "interpreter" if mode.interpreting() else x.device.type


def upcast_bf16(x: Any) -> bool:
    """Whether bf16 tiles must be upcast before ``tl.dot`` (under the interpreter only:
    :mod:`dshal_triton.kernels.common`)."""
    return mode.interpreting()


def _version(name: str) -> str:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return "unknown version"


def arch_name(torch: Any, kind: str, index: int) -> str:
    """``sm_90``, ``gfx942``, or the device's name where there is no such notion."""
    if kind == "cuda":
        props = torch.cuda.get_device_properties(index)
        gcn = getattr(props, "gcnArchName", "")
        if torch.version.hip and gcn:
            return gcn.split(":")[0]
        return f"sm_{props.major}{props.minor}"
    module = getattr(torch, kind)
    return str(module.get_device_name(index))


def probe() -> DeviceInfo:
    """Present when a GPU (or, in interpreter mode, the interpreter) runs a tiny kernel."""
    why = mode.prepare()
    if why:
        return DeviceInfo(present=False, reason=why)
    interp = mode.interpreting()
    if not interp and "torch" not in sys.modules \
            and not any(glob.glob(p) for p in DEVICE_NODES):
        return DeviceInfo(present=False, reason="no GPU: no device node "
                          f"({', '.join(DEVICE_NODES)}); set {mode.ENV}=1 to run the "
                          "kernels under Triton's interpreter on CPU tensors")
    try:
        import torch
        import triton  # noqa: F401
    except ImportError as exc:
        return DeviceInfo(present=False, reason=f"{exc} (pip install torch triton, the builds "
                          "for your accelerator)")
    if interp:
        kind, count = "cpu", 1
    else:
        found = [(k, getattr(torch, k).device_count()) for k in TORCH_KINDS
                 if getattr(torch, k, None) is not None and getattr(torch, k).is_available()]
        if not found:
            return DeviceInfo(present=False, reason="torch reports no cuda, ROCm, xpu or npu "
                              "device")
        kind, count = found[0]
    error = _tiny_kernel(torch, kind)
    if error:
        return DeviceInfo(present=False, reason=f"the probe kernel failed on {kind}: {error}")
    versions = f"triton {_version('triton')}, torch {_version('torch')}"
    if interp:
        return DeviceInfo(present=True, name="Triton interpreter on the host CPU (not a GPU)",
                          driver=versions, details={
                              "serves": "torch CPU tensors, because DSHAL_TRITON_INTERPRET=1",
                              "arch:0": "interpreter"})
    archs = {f"arch:{i}": arch_name(torch, kind, i) for i in range(count)}
    runtime = f"HIP {torch.version.hip}" if kind == "cuda" and torch.version.hip else \
        f"CUDA {torch.version.cuda}" if kind == "cuda" else kind
    return DeviceInfo(present=True, name=f"{kind}: " + ", ".join(sorted(set(archs.values()))),
                      driver=f"{versions}, {runtime}",
                      details={"serves": f"torch tensors on {kind}", **archs})


def _tiny_kernel(torch: Any, kind: str) -> str:
    """Compile and run the probe kernel on ``kind``; ``""`` when it gave x + 1."""
    from dshal_triton.kernels.probe import add_one_kernel

    try:
        x = torch.arange(_PROBE_N, dtype=torch.float32, device=kind)
        y = torch.empty_like(x)
        add_one_kernel[(1,)](x, y, _PROBE_N, BLOCK=_PROBE_N)
        if not bool(torch.equal(y.cpu(), x.cpu() + 1)):
            return "it ran but returned a wrong result"
    except Exception as exc:  # any compiler or driver failure makes the backend unusable
        return f"{type(exc).__name__}: {str(exc).strip()[:500]}"
    return ""


# --- per-architecture refusals ----------------------------------------------------------------


def _nvidia(arch: str) -> int | None:
    return int(arch[3:]) if arch.startswith("sm_") and arch[3:].isdigit() else None


def lacks(arch: str) -> dict[str, str]:
    """What ``arch`` cannot run on tensor cores: {"bf16": why, "fp8": why, "tf32": why}."""
    sm = _nvidia(arch)
    missing = {}
    if sm is not None:
        if sm < 80:
            for what in ("bf16", "tf32"):
                missing[what] = f"{arch} has no {what} tensor cores (sm_80 or newer)"
        if sm < 89:
            missing["fp8"] = f"{arch} has no fp8 tensor cores (sm_89 or newer)"
    elif arch.startswith("gfx"):
        if arch not in ("gfx942", "gfx950"):
            missing["fp8"] = f"{arch} has no fp8 matrix cores (gfx942 or gfx950)"
        if arch < "gfx90a" and arch.startswith("gfx9"):
            missing["bf16"] = f"{arch} has no bf16 matrix cores (gfx90a or newer)"
    return missing


def refusals(signature: Signature, device: DeviceInfo) -> list[str]:
    """Reasons the device's architecture cannot take a call (bf16 before sm_80, fp8 before
    sm_89 / gfx942), and non-torch callers (CuPy arrays go to the cuda/rocm backends)."""
    reasons = []
    if signature.library != "torch":
        reasons.append(f"library={signature.library} (serves: torch tensors; CuPy arrays are "
                       "served by the cuda and rocm backends)")
    arch = device.details.get(f"arch:{signature.device[1]}", "")
    missing = lacks(arch)
    uses = {"bf16": any(d == "bfloat16" for _, d in signature.dtypes)
            or signature.precision == "bf16",
            "fp8": any(d in FP8_DTYPES for _, d in signature.dtypes)
            or (signature.precision or "").startswith("fp8"),
            "tf32": signature.precision == "tf32"}
    reasons += [missing[what] for what, used in uses.items() if used and what in missing]
    return reasons
