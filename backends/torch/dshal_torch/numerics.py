"""The arithmetic every operator of the torch backend builds on, exact wherever DESIGN §3 is.

- :func:`round_float`: rounding to fp32 / tf32 / bf16 / fp16, nearest even, through float32
  first (as :func:`dshal.reference.round_to_precision`); tf32 on the float32 bit pattern.
- :func:`true_divide`: IEEE division by a tensor on the dividend's device. torch's CUDA kernel
  computes ``a / s`` for a CPU scalar ``s`` (a Python number or a 0-d CPU tensor) as
  ``a * (1 / s)``, which is not correctly rounded; a divisor on the device is divided by.
- :func:`matmul_fp32`: float32 matmuls in IEEE fp32 whatever torch allows (TF32 on CUDA,
  bf16/TF32 in oneDNN on the CPU, HF32 on Ascend NPUs): the precision switches are raised to
  IEEE around the product and restored after (reference counted: concurrent calls restore
  once, when the last one leaves).
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager

import torch

#: torch dtypes by canonical dshal name
DTYPES = {name: getattr(torch, name) for name in
          ("float16", "bfloat16", "float32", "float64", "float8_e4m3fn", "float8_e5m2", "int8")}
#: the float precisions stored in a narrower dtype
_NARROW = {"bf16": torch.bfloat16, "fp16": torch.float16}
#: 0xFFFFE000 as int32: the sign, exponent and 10 mantissa bits TF32 keeps
_TF32_KEEP = -0x2000


def round_float(x: torch.Tensor, precision: str, *, copy: bool = True) -> torch.Tensor:
    """``x`` rounded to ``fp32`` / ``tf32`` / ``bf16`` / ``fp16``, nearest even, via float32.

    fp32 and tf32 come back as float32 (tf32: the mantissa rounded to 10 bits), bf16 as
    bfloat16, fp16 as float16; values beyond a format's range become +-inf, NaN/Inf stay.
    A new tensor, except that ``copy=False`` lets fp32 return a float32 ``x`` itself.
    """
    if precision in _NARROW:
        return x.to(torch.float32).to(_NARROW[precision])
    x32 = x.to(torch.float32, copy=copy or precision == "tf32")
    if precision == "fp32":
        return x32
    if precision != "tf32":
        raise ValueError(f"precision={precision!r} is not a float precision "
                         "(fp32, tf32, bf16, fp16)")
    # round half to even on the bits: add 0xFFF plus the lowest kept bit, clear the 13 below.
    # int32 arithmetic equals uint32 arithmetic here: only NaN patterns could overflow
    bits = x32.view(torch.int32)
    rounded = (bits + (0x0FFF + ((bits >> 13) & 1))) & _TF32_KEEP
    return torch.where(torch.isfinite(x32), rounded.view(torch.float32), x32)


def true_divide(a: torch.Tensor, b: torch.Tensor | float) -> torch.Tensor:
    """``a / b``, correctly rounded on every device: ``b`` is made a tensor on ``a``'s device
    (a CPU scalar divisor would let CUDA multiply by its reciprocal instead)."""
    if not isinstance(b, torch.Tensor):
        b = torch.full((), b, dtype=a.dtype, device=a.device)
    elif b.device != a.device:
        b = b.to(a.device)
    return torch.div(a, b)


# --- IEEE fp32 matmuls ------------------------------------------------------------------------

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
