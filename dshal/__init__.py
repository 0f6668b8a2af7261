"""dshal: one operator API for sparse and mixed-precision AI kernels, many accelerators.

>>> import dshal
>>> out = dshal.ops.sparse_attention(q, k, v, top_k=16, window=128, causal=True)  # doctest: +SKIP

Submodules load on first use, so ``import dshal`` stays cheap: :mod:`dshal.ops` (the operators),
:mod:`dshal.reference` (the float64 oracle), :mod:`dshal.dispatch` (backend selection).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from dshal.errors import (
    BackendRuntimeError,
    DshalError,
    DshalTypeError,
    DshalValueError,
    NoBackendError,
    PluginError,
    UnsupportedError,
)

__version__ = "0.1.0"

__all__ = [
    "BackendRuntimeError",
    "DshalError",
    "DshalTypeError",
    "DshalValueError",
    "NoBackendError",
    "PluginError",
    "UnsupportedError",
    "__version__",
    "backends",
    "explain",
    "ops",
    "reference",
    "use_backend",
]

_SUBMODULES = {"ops", "reference", "dispatch", "registry", "hookspec", "capabilities", "calls",
               "arrays", "dtypes", "errors", "serving"}
_FROM = {"explain": "dshal.ops", "use_backend": "dshal.dispatch", "backends": "dshal.ops"}

if TYPE_CHECKING:
    from dshal import ops, reference
    from dshal.dispatch import use_backend
    from dshal.ops import backends, explain


def __getattr__(name: str) -> Any:
    if name in _SUBMODULES:
        return importlib.import_module(f"dshal.{name}")
    if name in _FROM:
        return getattr(importlib.import_module(_FROM[name]), name)
    raise AttributeError(f"module 'dshal' has no attribute {name!r}")
