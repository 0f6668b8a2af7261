"""Calls just beyond a backend's declared limits: they must be refused, never computed.

For every limit a backend declares (``OpCapability.limits``) whose size dshal knows how to
build, one case asks for ``limit + 1``. The arrays are zero-stride broadcasts, so a case costs
nothing even for a ``seq_len`` limit of millions: a conforming backend refuses at dispatch.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from dshal.capabilities import BackendSpec
from dshal.dtypes import numpy_dtype
from dshal_conformance.cases import Case
from dshal_conformance.data import Call


def _zeros(shape: tuple[int, ...], dtype: str) -> np.ndarray:
    return np.broadcast_to(np.zeros((), numpy_dtype(dtype)), shape)


def _attention(size: str, n: int, dtype: str) -> Call:
    d, lk, opts = 4, 4, {}
    if size == "head_dim":
        d = n
    elif size == "seq_len":
        lk = n
    else:  # block_size, window
        opts[size] = n
    return Call((_zeros((1, 1, 1, d), dtype), _zeros((1, 1, lk, d), dtype),
                 _zeros((1, 1, lk, d), dtype)), opts)


#: builders by (op, size name): (size value, dtype) -> call
BUILDERS: dict[tuple[str, str], Callable[[int, str], Call]] = {
    **{("sparse_attention", s): (lambda n, dt, s=s: _attention(s, n, dt))
       for s in ("head_dim", "seq_len", "block_size", "window")},
    ("gemm", "k"): lambda n, dt: Call((_zeros((1, n), dt), _zeros((n, 1), dt))),
    ("gated_channels", "channels"): lambda n, dt: Call((_zeros((1, n), dt),
                                                        _zeros((n,), dt))),
}


def limit_cases(spec: BackendSpec) -> list[Case]:
    """One case per declared limit whose size this module can build a call for."""
    cases = []
    for op, cap in sorted(spec.capabilities.items()):
        dtype = "float32" if "float32" in cap.dtypes else sorted(cap.dtypes)[0]
        for size, limit in sorted(cap.limits.items()):
            if (op, size) in BUILDERS:
                cases.append(Case(f"{op}/limit-{size}/{limit + 1}", op, "limits", "limit",
                                  {"size": size, "value": limit + 1, "dtype": dtype}))
    return cases


def build(case: Case, rng: Any = None) -> Call:
    """The call of a limit case (``rng`` unused: the arrays are zeros)."""
    p = case.params
    return BUILDERS[case.op, p["size"]](p["value"], p["dtype"])
