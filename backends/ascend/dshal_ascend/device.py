"""Where the ascend backend runs: an Ascend NPU found through torch_npu, or, with
``DSHAL_ASCEND_DEVICE=cpu``, torch CPU tensors (to certify the generic path without an NPU).

The NPU probe needs torch_npu to import *and* ``torch.npu.device_count() > 0``; anything less
is "no device" with the reason. torch_npu is imported only when it is installed, so a machine
without it never imports torch here.
"""

from __future__ import annotations

import importlib.util
import os

from dshal.capabilities import DeviceInfo
from dshal_torch import device as torch_device

#: the switch between the NPU (default) and torch CPU tensors
ENV = "DSHAL_ASCEND_DEVICE"
MODES = ("npu", "cpu")


def mode() -> str:
    """``npu`` (unset or ``npu``), ``cpu``, or the unknown value as given (the probe says so)."""
    return os.environ.get(ENV, "").strip().lower() or "npu"


def probe() -> DeviceInfo:
    """The NPU (or the CPU under ``DSHAL_ASCEND_DEVICE=cpu``), else why there is none."""
    chosen = mode()
    if chosen not in MODES:
        return DeviceInfo(present=False, reason=f"{ENV}={os.environ.get(ENV)!r} (allowed: "
                                                f"{', '.join(MODES)}; unset means npu)")
    if chosen == "cpu":
        return _cpu()
    return _npu()


def _cpu() -> DeviceInfo:
    generic = torch_device.probe()
    if not generic.present:
        return generic
    return DeviceInfo(present=True, name=f"{torch_device.host_name()}, not an NPU: the "
                                         f"generic torch path ({ENV}=cpu)",
                      driver=generic.driver,
                      details={"mode": f"{ENV}=cpu: serves torch CPU tensors; NPU tensors "
                                       "are not served in this mode"})


def _npu() -> DeviceInfo:
    if importlib.util.find_spec("torch_npu") is None:
        return DeviceInfo(present=False, reason="torch_npu is not installed (pip install "
                                                "torch-npu, the build for your CANN and "
                                                "torch); set DSHAL_ASCEND_DEVICE=cpu to run "
                                                "the generic path on the CPU")
    try:
        import torch
        import torch_npu

        count = torch.npu.device_count()
    except (ImportError, OSError, RuntimeError) as exc:  # CANN libraries or driver missing
        return DeviceInfo(present=False, reason=f"torch_npu cannot reach an NPU: "
                                                f"{type(exc).__name__}: {exc}")
    if count == 0:
        return DeviceInfo(present=False, reason="torch_npu imports but torch.npu."
                                                "device_count() = 0 (no Ascend NPU visible: "
                                                "check npu-smi info and "
                                                "ASCEND_RT_VISIBLE_DEVICES)")
    names = sorted({torch.npu.get_device_name(i) for i in range(count)})
    return DeviceInfo(present=True, name=", ".join(names),
                      driver=f"torch_npu {torch_npu.__version__}, torch {torch.__version__}",
                      details={"devices": str(count),
                               "paths": "generic torch path (no fused NPU kernels)"})
