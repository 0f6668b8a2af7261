"""Argument checks shared by the operators. Every error names the argument, the value given and
what is allowed; argument errors are ``ValueError`` / ``TypeError`` subclasses."""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterable
from typing import Any

from dshal.arrays import ArrayMeta
from dshal.errors import DshalTypeError, DshalValueError


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def check_bool(name: str, value: Any) -> bool:
    """A real bool (numpy bools too); ints and strings are refused."""
    if isinstance(value, bool) or type(value).__name__ == "bool_":
        return bool(value)
    raise DshalTypeError(f"{name} must be a bool (True or False), got {_show(value)}")


def check_int(name: str, value: Any, *, minimum: int, maximum: int | None = None) -> int:
    """An integer (not bool) in [minimum, maximum]."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise DshalTypeError(f"{name} must be an int >= {minimum}, got {_show(value)}")
    value = int(value)
    if value < minimum or (maximum is not None and value > maximum):
        allowed = f">= {minimum}" if maximum is None else f"in [{minimum}, {maximum}]"
        raise DshalValueError(f"{name} must be an int {allowed}, got {value}")
    return value


def check_real(name: str, value: Any, *, positive: bool = False, allow_inf: bool = False) -> float:
    """A real number (not bool), finite unless ``allow_inf``, > 0 when ``positive``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise DshalTypeError(f"{name} must be a real number, got {_show(value)}")
    value = float(value)
    if math.isnan(value) or (math.isinf(value) and not allow_inf):
        raise DshalValueError(f"{name} must be a finite number, got {value}")
    if positive and not value > 0:
        raise DshalValueError(f"{name} must be > 0, got {value}")
    return value


def check_count_or_fraction(name: str, value: Any) -> int | float | None:
    """``None``, an int count >= 0, or a float fraction in (0, 1]; bool is refused."""
    if value is None:
        return None
    allowed = "None, an int >= 0 or a float in (0, 1]"
    if isinstance(value, bool):
        raise DshalTypeError(f"{name} must be {allowed}, got bool {value}")
    if isinstance(value, numbers.Integral):
        if value < 0:
            raise DshalValueError(f"{name} must be {allowed}, got {value}")
        return int(value)
    if isinstance(value, numbers.Real):
        value = float(value)
        if not 0.0 < value <= 1.0:  # NaN fails this too
            raise DshalValueError(f"{name} must be {allowed}, got {value}")
        return value
    raise DshalTypeError(f"{name} must be {allowed}, got {_show(value)}")


def check_choice(name: str, value: Any, allowed: Iterable[str]) -> str:
    """One of the ``allowed`` strings."""
    allowed = tuple(allowed)
    if not isinstance(value, str) or value not in allowed:
        raise DshalValueError(f"{name}={_show(value)} (allowed: {', '.join(allowed)})")
    return value


def check_dtype(name: str, meta: ArrayMeta, allowed: Iterable[str]) -> str:
    """The array's dtype is one of ``allowed``."""
    allowed = tuple(allowed)
    if meta.dtype not in allowed:
        raise DshalTypeError(f"{name} has dtype {meta.dtype} (allowed: {', '.join(allowed)})")
    return meta.dtype


def check_ndim(name: str, meta: ArrayMeta, ndim: int | None = None, *, minimum: int = 0) -> None:
    """The array has exactly ``ndim`` dimensions, or at least ``minimum``."""
    if ndim is not None and meta.ndim != ndim:
        raise DshalValueError(
            f"{name} must have {ndim} dimensions, got shape {list(meta.shape)}")
    if meta.ndim < minimum:
        raise DshalValueError(
            f"{name} must have at least {minimum} dimensions, got shape {list(meta.shape)}")


def check_shape(name: str, meta: ArrayMeta, expected: tuple[int, ...], what: str) -> None:
    """The array has exactly the ``expected`` shape (``what`` explains where it comes from)."""
    if meta.shape != tuple(expected):
        raise DshalValueError(
            f"{name} must have shape {list(expected)} ({what}), got {list(meta.shape)}")


def dtype_name(name: str, value: Any, allowed: Iterable[str]) -> str:
    """Normalise a dtype given as a string, numpy dtype or torch dtype to its canonical name."""
    allowed = tuple(allowed)
    text = str(value).removeprefix("torch.")
    if text.startswith("<class"):
        text = getattr(value, "__name__", text)
    if text not in allowed:
        raise DshalValueError(f"{name}={_show(value)} (allowed: {', '.join(allowed)})")
    return text


def ceil_div(a: int, b: int) -> int:
    return -(-a // b)
