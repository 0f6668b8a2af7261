"""float32 matmuls in IEEE fp32, whatever precision the caller allowed torch elsewhere.

torch lets a process trade float32 matmul accuracy for speed (TF32 on CUDA, bf16/TF32 in oneDNN
on the CPU, HF32 on Ascend NPUs). dshal's results are certified against bounds for fp32
accumulation, so the torch backend's products and the autograd backward passes run inside
:func:`ieee_fp32`: the precision switches are raised to IEEE around the product and restored
after (reference counted: concurrent calls restore once, when the last one leaves).
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager

import torch

_lock = threading.Lock()
_depth = 0
_saved: list[tuple[object, str, object]] = []


def _switches() -> list[tuple[object, str, object]]:
    """``(owner, attribute, IEEE value)`` of every float32-matmul precision switch this torch
    has: ``fp32_precision`` of CUDA and oneDNN matmuls (torch >= 2.9), and torch_npu's
    ``torch.npu.matmul.allow_hf32`` when torch_npu is loaded."""
    found: list[tuple[object, str, object]] = []
    for owner in (getattr(torch.backends.cuda, "matmul", None),
                  getattr(getattr(torch.backends, "mkldnn", None), "matmul", None)):
        if owner is not None and hasattr(owner, "fp32_precision"):
            found.append((owner, "fp32_precision", "ieee"))
    npu_matmul = getattr(getattr(torch, "npu", None), "matmul", None)
    if npu_matmul is not None and hasattr(npu_matmul, "allow_hf32"):
        found.append((npu_matmul, "allow_hf32", False))
    return found


def _effective(value: object) -> object:
    """A backend's ``fp32_precision`` with ``none`` resolved to the global setting."""
    if value == "none":
        value = getattr(torch.backends, "fp32_precision", "none")
    return "ieee" if value == "none" else value


def _raise_precision() -> list[tuple[object, str, object]]:
    saved = []
    switches = _switches()
    for owner, attr, ieee in switches:
        value = getattr(owner, attr)
        if (_effective(value) if attr == "fp32_precision" else value) != ieee:
            saved.append((owner, attr, value))
            setattr(owner, attr, ieee)
    if any(attr == "fp32_precision" for _, attr, _ in switches):
        return saved
    legacy = torch.get_float32_matmul_precision()  # torch < 2.9: one global setting
    if legacy != "highest":
        torch.set_float32_matmul_precision("highest")
        saved.append((torch, "float32_matmul_precision", legacy))
    return saved


def _restore(saved: list[tuple[object, str, object]]) -> None:
    for owner, attr, value in saved:
        if owner is torch:
            torch.set_float32_matmul_precision(value)
        else:
            setattr(owner, attr, value)


@contextmanager
def ieee_fp32() -> Iterator[None]:
    """float32 matmuls inside run in IEEE fp32 (the first entrant raises the setting, the last
    one out restores what the caller had)."""
    global _depth
    with _lock:
        if _depth == 0:
            _saved[:] = _raise_precision()
        _depth += 1
    try:
        yield
    finally:
        with _lock:
            _depth -= 1
            if _depth == 0:
                _restore(_saved)
                _saved.clear()


def matmul_fp32(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a @ b`` (float32 or float64 operands) with float32 products accumulated in IEEE fp32."""
    if a.dtype == torch.float64:
        return torch.matmul(a, b)
    with ieee_fp32():
        return torch.matmul(a, b)
