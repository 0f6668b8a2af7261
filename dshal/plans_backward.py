"""Validation of the backward of ``sparse_attention`` (DESIGN 3.1b), and how it runs on a
backend: the planner of the ``sparse_attention_backward`` operator (plugin API 2).

The arrays are the forward's inputs (q, k, v), what it returned (lse, and its selection as
``indices``) and the gradients of its outputs (grad_out, grad_lse). Shapes are checked against
q, k and v as the forward checked them; the selection's values against the number of blocks.
"""

from __future__ import annotations

import math
from dataclasses import replace
from typing import Any

from dshal import arrays
from dshal.arrays import ArrayMeta
from dshal.calls import AttentionBackwardCall
from dshal.capabilities import FEATURES, Signature
from dshal.dtypes import FLOAT_DTYPES, INDEX_DTYPES
from dshal.errors import DshalTypeError, DshalValueError
from dshal.plans import Arrays, Plan, _expect, _features, _sig, check_indices_range
from dshal.registry import Backend
from dshal.validate import ceil_div, check_bool, check_dtype, check_int, check_ndim, check_real

OP = "sparse_attention_backward"


def _same_shape(name: str, meta: ArrayMeta, shape: tuple[int, ...], what: str) -> None:
    check_ndim(name, meta, len(shape))
    if tuple(meta.shape) != shape:
        raise DshalValueError(f"{name} must have shape {list(shape)} ({what}), got "
                              f"{list(meta.shape)}")


def plan_attention_backward(metas: dict[str, ArrayMeta], *, block_size=64, window=0,
                            causal=False, scale=None) -> Plan:
    """The plan of ``dshal.ops.sparse_attention_backward`` (see there for the arguments)."""
    mq, mk, mv = metas["q"], metas["k"], metas["v"]
    for name in ("q", "k", "v"):
        check_ndim(name, metas[name], 4)
    dtype = check_dtype("q", mq, FLOAT_DTYPES)
    for name in ("k", "v", "out", "grad_out"):
        if metas[name].dtype != dtype:
            raise DshalTypeError(f"{name} has dtype {metas[name].dtype} but q has {dtype}: "
                                 "q, k, v, out and grad_out must share one dtype")
    B, Hq, Lq, D = mq.shape
    Hkv, Lk, Dv = mk.shape[1], mk.shape[2], mv.shape[3]
    if tuple(mk.shape) != (B, Hkv, Lk, D) or tuple(mv.shape[:3]) != (B, Hkv, Lk):
        raise DshalValueError(f"k [B, Hkv, Lk, D] and v [B, Hkv, Lk, Dv] must match q "
                              f"{list(mq.shape)}: got k {list(mk.shape)}, v {list(mv.shape)}")
    if Hkv == 0 or Hq % Hkv:
        raise DshalValueError(
            f"q heads ({Hq}) must be a multiple of k/v heads ({Hkv}) for grouped-query attention")
    for name in ("out", "grad_out"):
        _same_shape(name, metas[name], (B, Hq, Lq, Dv), "the forward's out")
    for name in ("lse", "grad_lse"):
        if name in metas:
            _same_shape(name, metas[name], (B, Hq, Lq), "the forward's lse")
            check_dtype(name, metas[name], ("float32",))
    block_size = check_int("block_size", block_size, minimum=1)
    window = check_int("window", window, minimum=0)
    causal = check_bool("causal", causal)
    scale = check_real("scale", (1.0 / math.sqrt(D) if D else 1.0) if scale is None else scale)
    has_indices = "indices" in metas
    n_blocks = ceil_div(Lk, block_size)
    if has_indices:
        mi = metas["indices"]
        check_ndim("indices", mi, 4)
        check_dtype("indices", mi, INDEX_DTYPES)
        if tuple(mi.shape[:3]) != (B, Hkv, Lq):
            raise DshalValueError(f"indices must have shape [{B}, {Hkv}, {Lq}, n] (the "
                                  f"forward's selection), got {list(mi.shape)}")
    has_grad_lse = "grad_lse" in metas
    sig = _sig(OP, metas, _features(
        ("indices", has_indices), ("window", window > 0), ("causal", causal),
        ("gqa", Hq != Hkv), ("cross_length", Lq != Lk), ("grad_lse", has_grad_lse)), None,
        (("head_dim", max(D, Dv)), ("block_size", block_size), ("seq_len", max(Lq, Lk)),
         ("window", window)))

    def check(arrs: Arrays) -> None:
        if has_indices:
            check_indices_range(arrs["indices"], n_blocks, Lk, block_size)

    def run(b: Backend, arrs: Arrays, _: str | None = None) -> list[Any]:
        get = arrs.get
        idx = get("indices")
        call = AttentionBackwardCall(get("q"), get("k"), get("v"), get("out"), get("lse"),
                                     get("grad_out"),
                                     get("grad_lse"),
                                     None if idx is None else arrays.cast(idx, "int64"),
                                     block_size, window, causal, scale)
        dq, dk, dv = b.run(OP, call)
        _expect(b, "dq", dq, (B, Hq, Lq, D), dtype)
        _expect(b, "dk", dk, (B, Hkv, Lk, D), dtype)
        _expect(b, "dv", dv, (B, Hkv, Lk, Dv), dtype)
        return [dq, dk, dv]

    return Plan(sig, run, check)


def backward_signature(forward: Signature) -> Signature:
    """The signature of the backward of the ``sparse_attention`` call ``forward`` (what
    ``dshal explain`` shows for it): the forward's selection (``top_k`` or ``indices``) becomes
    the backward's ``indices``; the lse gradient is not known from the forward alone."""
    features = {f for f in forward.features if f in FEATURES[OP]}
    if forward.features & {"top_k", "indices"}:
        features.add("indices")
    return replace(forward, op=OP, features=frozenset(features))
