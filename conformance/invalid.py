"""Calls that must raise: invalid arguments give ``ValueError``/``TypeError`` naming the argument.

Each entry starts from a small valid call (built by :mod:`.data`) and breaks one thing. The call
is forced onto the backend under test, so whatever a backend does with it, the user must see the
documented error, never a result.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from dshal_conformance import data
from dshal_conformance.cases import Case


@dataclass(frozen=True)
class Invalid:
    """One invalid call: how to break a valid one, and the error it must raise."""

    name: str
    op: str
    base: dict[str, Any]
    breaks: Callable[[data.Call], None]
    error: type[Exception]
    mentions: str  # a word the message must contain (the argument's name)


ATT = {"B": 1, "Hq": 2, "Hkv": 1, "Lq": 5, "Lk": 9, "D": 4, "opts": {"block_size": 4}}
GEMM = {"M": 3, "K": 8, "N": 4, "group_size": 4}
QUANT = {"shape": [4, 8], "precision": "int8", "group_size": 4}
GATED = {"lead": [3], "C": 6}
VARLEN = {"form": "varlen", "Hq": 2, "Hkv": 1, "D": 4, "lq": [2, 3], "lk": [4, 5],
          "opts": {"block_size": 4}}
PAGED = {"form": "paged", "Hq": 2, "Hkv": 1, "D": 4, "lq": [1, 1], "lk": [5, 9],
         "page_size": 8, "opts": {"block_size": 4}}


def _set(**kw: Any) -> Callable[[data.Call], None]:
    return lambda call: call.kwargs.update(kw)


def _arg(i: int, f: Callable[[np.ndarray], Any]) -> Callable[[data.Call], None]:
    def breaks(call: data.Call) -> None:
        args = list(call.args)
        args[i] = f(args[i])
        call.args = tuple(args)
    return breaks


def _both(*fs: Callable[[data.Call], None]) -> Callable[[data.Call], None]:
    def breaks(call: data.Call) -> None:
        for f in fs:
            f(call)
    return breaks


def _edit(name: str, f: Callable[[np.ndarray], Any]) -> Callable[[data.Call], None]:
    """Replace keyword argument ``name`` by ``f`` of a copy of it (None removes it)."""
    def breaks(call: data.Call) -> None:
        value = f(np.array(call.kwargs[name]))
        if value is None:
            del call.kwargs[name]
        else:
            call.kwargs[name] = value
    return breaks


def _at(index: Any, value: int) -> Callable[[np.ndarray], np.ndarray]:
    def put(x: np.ndarray) -> np.ndarray:
        x[index] = value
        return x
    return put


def _nan(x: np.ndarray) -> np.ndarray:
    x = x.copy()
    x.reshape(-1)[0] = np.nan
    return x


INVALID: tuple[Invalid, ...] = (
    Invalid("top-k-bool", "sparse_attention", ATT, _set(top_k=True), TypeError, "top_k"),
    Invalid("top-k-fraction-above-1", "sparse_attention", ATT, _set(top_k=1.5), ValueError,
            "top_k"),
    Invalid("top-k-and-indices", "sparse_attention", ATT,
            _set(top_k=1, indices=np.zeros((1, 1, 5, 1), np.int64)), ValueError, "indices"),
    Invalid("indices-out-of-range", "sparse_attention", ATT,
            _set(indices=np.full((1, 1, 5, 1), 3, np.int64)), ValueError, "indices"),
    Invalid("heads-not-grouped", "sparse_attention", {**ATT, "Hq": 3, "Hkv": 2},
            lambda call: None, ValueError, "heads"),
    Invalid("mixed-dtypes", "sparse_attention", ATT, _arg(1, lambda k: k.astype(np.float16)),
            TypeError, "k"),
    Invalid("negative-window", "sparse_attention", ATT, _set(window=-1), ValueError, "window"),
    Invalid("zero-block-size", "sparse_attention", ATT, _set(block_size=0), ValueError,
            "block_size"),
    Invalid("indices-without-selection", "sparse_attention", ATT, _set(return_indices=True),
            ValueError, "return_indices"),
    Invalid("q-3d", "sparse_attention", ATT, _arg(0, lambda q: q[0]), ValueError, "q"),
    Invalid("causal-not-bool", "sparse_attention", ATT, _set(causal="yes"), TypeError,
            "causal"),
    Invalid("cu-seqlens-not-from-0", "sparse_attention", VARLEN,
            _edit("cu_seqlens_q", lambda c: c + 1), ValueError, "cu_seqlens_q"),
    Invalid("cu-seqlens-decreasing", "sparse_attention", VARLEN,
            _edit("cu_seqlens_k", _at(1, 10)), ValueError, "cu_seqlens_k"),
    Invalid("cu-seqlens-wrong-end", "sparse_attention", VARLEN,
            _edit("cu_seqlens_k", _at(-1, 8)), ValueError, "cu_seqlens_k"),
    Invalid("cu-seqlens-alone", "sparse_attention", VARLEN,
            _edit("cu_seqlens_k", lambda c: None), ValueError, "cu_seqlens_k"),
    Invalid("varlen-block-keys-rows", "sparse_attention", VARLEN,
            _set(top_k=1, block_keys=np.zeros((1, 1, 2, 4), np.float32)), ValueError,
            "block_keys"),
    Invalid("page-out-of-range", "sparse_attention", PAGED,
            _edit("block_table", _at((1, 1), 1000)), ValueError, "block_table"),
    Invalid("negative-page", "sparse_attention", PAGED,
            _edit("block_table", _at((0, 0), -1)), ValueError, "block_table"),
    Invalid("seqlens-beyond-table", "sparse_attention", PAGED,
            _edit("seqlens_k", _at(0, 100)), ValueError, "seqlens_k"),
    Invalid("page-size-not-block-multiple", "sparse_attention", PAGED, _set(block_size=3),
            ValueError, "page_size"),
    Invalid("paged-block-keys-shape", "sparse_attention", PAGED,
            _set(top_k=1, block_keys=np.zeros((1, 1, 2, 4), np.float32)), ValueError,
            "block_keys"),
    Invalid("paged-without-seqlens", "sparse_attention", PAGED,
            _edit("seqlens_k", lambda c: None), ValueError, "seqlens_k"),
    Invalid("paged-and-contiguous-mixed", "sparse_attention", PAGED,
            _set(cu_seqlens_q=np.array([0, 1, 2], np.int32),
                 cu_seqlens_k=np.array([0, 1, 2], np.int32)), ValueError, "cu_seqlens_k"),
    Invalid("k-mismatch", "gemm", GEMM, _arg(1, lambda b: b[:-1]), ValueError, "K"),
    Invalid("unknown-precision", "gemm", GEMM, _set(precision="fp4"), ValueError, "precision"),
    Invalid("scale-of-float-input", "gemm", GEMM, _set(a_scale=2.0), ValueError, "a_scale"),
    Invalid("precision-contradicts-storage", "gemm",
            {**GEMM, "prequant": "int8", "a_scale": "tensor", "b_scale": "tensor"},
            _set(precision="fp8_e4m3"), ValueError, "precision"),
    Invalid("tolerance-without-auto", "gemm", GEMM, _set(tolerance=1e-3), ValueError,
            "tolerance"),
    Invalid("bias-shape", "gemm", {**GEMM, "bias": True},
            lambda call: call.kwargs.update(bias=call.kwargs["bias"][:-1]), ValueError, "bias"),
    Invalid("scale-shape", "gemm", {**GEMM, "prequant": "int8", "a_scale": "group"},
            lambda call: call.kwargs.update(a_scale=call.kwargs["a_scale"][:, :1].T),
            ValueError, "a_scale"),
    Invalid("scale-not-finite", "gemm", {**GEMM, "prequant": "int8", "a_scale": "group"},
            lambda call: call.kwargs.update(a_scale=_nan(call.kwargs["a_scale"])), ValueError,
            "a_scale"),
    Invalid("nan-quantised-int8", "gemm", GEMM, _both(_set(precision="int8"), _arg(0, _nan)),
            ValueError, "a"),
    Invalid("nan-quantised-fp8", "gemm", GEMM,
            _both(_set(precision="fp8_e4m3"), _arg(1, _nan)), ValueError, "b"),
    Invalid("nan-measured-auto", "gemm", GEMM, _both(_set(precision="auto"), _arg(0, _nan)),
            ValueError, "a"),
    Invalid("not-finite", "quantize", QUANT, _arg(0, _nan), ValueError, "finite"),
    Invalid("block-of-3d", "quantize", {**QUANT, "shape": [2, 4, 8]},
            _set(granularity="block"), ValueError, "x"),
    Invalid("unknown-precision", "quantize", QUANT, _arg(1, lambda p: "int4"), ValueError,
            "precision"),
    Invalid("zero-group-size", "quantize", QUANT, _set(group_size=0), ValueError,
            "group_size"),
    Invalid("unknown-granularity", "quantize", QUANT, _set(granularity="column"), ValueError,
            "granularity"),
    Invalid("unknown-mode", "gated_channels", GATED, _set(mode="medium"), ValueError, "mode"),
    Invalid("keep-in-soft-mode", "gated_channels", GATED, _set(mode="soft", keep=2),
            ValueError, "keep"),
    Invalid("keep-and-threshold", "gated_channels", GATED, _set(keep=2, threshold=0.5),
            ValueError, "keep"),
    Invalid("keep-bool", "gated_channels", GATED, _set(keep=True), TypeError, "keep"),
    Invalid("threshold-nan", "gated_channels", GATED, _set(threshold=float("nan")), ValueError,
            "threshold"),
    Invalid("bias-without-weight", "gated_channels", GATED,
            lambda call: call.kwargs.update(bias=np.zeros(6, call.args[0].dtype)), ValueError,
            "bias"),
    Invalid("weight-shape", "gated_channels", {**GATED, "Cout": 4},
            lambda call: call.kwargs.update(weight=call.kwargs["weight"][:, :-1]), ValueError,
            "weight"),
    Invalid("gate-shape", "gated_channels", GATED, _arg(1, lambda g: g[:-1]), ValueError,
            "gate_logits"),
)

_BY_ID = {f"{i.op}/invalid-{i.name}/args": i for i in INVALID}


def invalid_cases(dtype_of: Callable[[str], str]) -> list[Case]:
    """One case per :data:`INVALID` entry, with the float dtype ``dtype_of(op)`` (a dtype the
    backend declares, so that only the broken argument is wrong)."""
    cases = []
    for i in INVALID:
        dtype = dtype_of(i.op)
        cases.append(Case(f"{i.op}/invalid-{i.name}/args", i.op, "args", "invalid",
                          {**i.base, "dtype": dtype, "raises": i.error.__name__,
                           "mentions": i.mentions}))
    return cases


def build(case: Case, rng: np.random.Generator) -> data.Call:
    """The broken call of an invalid case."""
    entry = _BY_ID[case.id]
    params = {k: v for k, v in case.params.items() if k not in ("raises", "mentions")}
    call = data.BUILDERS[case.op](params, rng)
    entry.breaks(call)
    return call


def expected(case: Case) -> tuple[type[Exception], str]:
    """The exception class an invalid case must raise and the word its message must contain."""
    entry = _BY_ID[case.id]
    return entry.error, entry.mentions
