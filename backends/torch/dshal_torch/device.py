"""The torch backend's device probe, and the calls some torch device types cannot compute.

The probe does not import torch: dshal probes every installed backend when it first
dispatches, and a numpy-only program must not pay for importing torch. The torch backend runs
only on tensors (or host arrays handed to it when forced), so the CPU is always there once
torch is installed; accelerators are whatever device the tensors are on. When torch is already
imported, the probe also lists the accelerator torch reports.
"""

from __future__ import annotations

import importlib.util
import os
import platform
import sys
from importlib import metadata
from types import ModuleType

from dshal.capabilities import DeviceInfo, Signature, device_type_name
from dshal.dtypes import FP8_DTYPES

#: device types (DLPack codes) that lack float64 or float8 in torch, and why. Conservative:
#: these devices are not certified; a refused call falls back to the host or raises.
NO_FLOAT64 = {8: "MPS has no float64"}
NO_FLOAT8 = {8: "MPS has no float8 dtypes"}


def host_name() -> str:
    """``cpu (x86_64, 2 cores)``."""
    return f"cpu ({platform.machine() or 'unknown'}, {os.cpu_count() or 1} cores)"


def torch_version() -> str | None:
    """The installed torch's version (from its metadata: no import), or None."""
    if importlib.util.find_spec("torch") is None:
        return None
    try:
        return metadata.version("torch")
    except metadata.PackageNotFoundError:  # a source tree on sys.path
        return "unknown version"


def accelerator(torch: ModuleType) -> str:
    """What accelerator an imported torch reports, e.g. ``cuda: 1 device (NVIDIA H200)``."""
    acc = getattr(torch, "accelerator", None)
    if acc is None or not acc.is_available():
        return "none"
    kind = acc.current_accelerator().type
    count = acc.device_count()
    text = f"{kind}: {count} device{'s' if count != 1 else ''}"
    if kind == "cuda":
        names = sorted({torch.cuda.get_device_name(i) for i in range(count)})
        runtime = f"HIP {torch.version.hip}" if torch.version.hip else \
            f"CUDA {torch.version.cuda}"
        text += f" ({', '.join(names)}; {runtime})"
    return text


def probe() -> DeviceInfo:
    """torch installed: present (the host always, accelerators per tensor); else no device."""
    version = torch_version()
    if version is None:
        return DeviceInfo(present=False, reason="torch is not installed (pip install torch, "
                                                "the build for your accelerator)")
    torch = sys.modules.get("torch")
    details = {"serves": "torch tensors on their own device (cpu, cuda, rocm, mps, xpu, "
                         "privateuse1...), host arrays when forced"}
    if torch is None:
        details["accelerator"] = ("not queried: torch was not imported yet when dshal loaded "
                                  "its backends (each call runs on its tensors' device)")
    else:
        details["accelerator"] = accelerator(torch)
    return DeviceInfo(present=True, name=f"torch devices; host {host_name()}",
                      driver=f"torch {version}", details=details)


def refusals(signature: Signature) -> list[str]:
    """Reasons a device type cannot take a call: float64 or float8 where torch has none."""
    kind = signature.device[0]
    where = device_type_name(kind)
    reasons = []
    if kind in NO_FLOAT64:
        reasons += [f"dtype {arg}=float64 on {where} ({NO_FLOAT64[kind]}; supported there: "
                    "float16, bfloat16, float32)"
                    for arg, dtype in signature.dtypes if dtype == "float64"]
    if kind in NO_FLOAT8:
        fp8 = [f"dtype {arg}={dtype}" for arg, dtype in signature.dtypes if dtype in FP8_DTYPES]
        if signature.precision in ("fp8_e4m3", "fp8_e5m2"):
            fp8.append(f"precision={signature.precision}")
        reasons += [f"{what} on {where} ({NO_FLOAT8[kind]})" for what in fp8]
    return reasons
