"""The dshal operators: ``sparse_attention``, ``quantize``, ``gemm`` and ``gated_channels``.

Each call is validated here (argument errors never reach a backend), summarised as a
:class:`~dshal.capabilities.Signature`, dispatched to a backend (:mod:`dshal.dispatch`), run on
arrays of that backend's kind, and returned in the caller's library on the caller's device.
``../docs/operators.md`` states the semantics; :mod:`dshal.reference` is their float64 oracle.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any

from dshal import arrays, dispatch
from dshal.calls import AttentionCall, GatedCall, GemmCall, QuantizeCall
from dshal.capabilities import Signature
from dshal.dtypes import (
    FLOAT_DTYPES,
    GEMM_PRECISIONS,
    GRANULARITIES,
    INDEX_DTYPES,
    PRECISION_OF_STORAGE,
    PRECISIONS,
    QUANT_DTYPES,
    QUANTIZED_PRECISIONS,
    STORAGE_DTYPE,
)
from dshal.errors import DshalTypeError, DshalValueError, PluginError
from dshal.registry import Backend, registry
from dshal.validate import (
    ceil_div,
    check_bool,
    check_choice,
    check_count_or_fraction,
    check_dtype,
    check_int,
    check_ndim,
    check_real,
    check_shape,
    dtype_name,
)

__all__ = ["backends", "explain", "gated_channels", "gemm", "quantize", "sparse_attention"]

GATE_MODES = ("hard", "soft", "soft_hard")


@dataclass
class _Plan:
    """A validated call: its signature, and how to run it on a chosen backend."""

    sig: Signature
    library: str
    like: Any
    execute: Callable[[Backend, str], Any]


def _origin(named: dict[str, Any]) -> tuple[dict[str, arrays.ArrayMeta], str, Any]:
    metas = {n: arrays.inspect(n, x) for n, x in named.items() if x is not None}
    library, _ = arrays.common_origin(metas)
    return metas, library, next(x for x in named.values() if x is not None)


def _device(metas: dict[str, arrays.ArrayMeta]) -> tuple[int, int]:
    return next(iter(metas.values())).device


def _run(plan: _Plan, backend: str | None) -> Any:
    b, decision = dispatch.select(plan.sig, backend)
    kind = "numpy" if decision.fallback else b.spec.array_kind
    return plan.execute(b, kind)


def _expect(b: Backend, what: str, value: Any, shape: tuple[int, ...] | None, dtype: str) -> None:
    """A backend result has the documented shape and dtype, else the backend broke the contract."""
    meta = arrays.inspect(what, value)
    if (shape is not None and meta.shape != shape) or meta.dtype != dtype:
        raise PluginError(
            f"backend {b.name!r} returned {what} with shape {list(meta.shape)} dtype {meta.dtype}"
            f", expected shape {list(shape) if shape is not None else '(any)'} dtype {dtype}")


def _back(value: Any, plan: _Plan) -> Any:
    return arrays.from_kind(value, plan.library, plan.like)


# --- sparse_attention -------------------------------------------------------------------------


def _plan_attention(q, k, v, *, top_k=None, block_size=64, window=0, causal=False, scale=None,
                    indices=None, return_indices=False, return_lse=False) -> _Plan:
    metas, library, like = _origin({"q": q, "k": k, "v": v, "indices": indices})
    mq, mk, mv = metas["q"], metas["k"], metas["v"]
    for name in ("q", "k", "v"):
        check_ndim(name, metas[name], 4)
    dtype = check_dtype("q", mq, FLOAT_DTYPES)
    for name in ("k", "v"):
        if metas[name].dtype != dtype:
            raise DshalTypeError(f"{name} has dtype {metas[name].dtype} but q has {dtype}: "
                                 "q, k and v must share one dtype")
    B, Hq, Lq, D = mq.shape
    Hkv, Lk = mk.shape[1], mk.shape[2]
    Dv = mv.shape[3]
    if mk.shape[0] != B or mv.shape[0] != B:
        raise DshalValueError(f"batch sizes differ: q {B}, k {mk.shape[0]}, v {mv.shape[0]}")
    if mk.shape[3] != D:
        raise DshalValueError(f"k head dim {mk.shape[3]} must equal q head dim {D}")
    if mv.shape[1:3] != (Hkv, Lk):
        raise DshalValueError(f"v must have k's heads and length [{Hkv}, {Lk}] in dims 1-2, got "
                              f"shape {list(mv.shape)}")
    if Hkv == 0 or Hq % Hkv:
        raise DshalValueError(
            f"q heads ({Hq}) must be a multiple of k/v heads ({Hkv}) for grouped-query attention")
    top_k = check_count_or_fraction("top_k", top_k)
    block_size = check_int("block_size", block_size, minimum=1)
    window = check_int("window", window, minimum=0)
    causal = check_bool("causal", causal)
    return_indices = check_bool("return_indices", return_indices)
    return_lse = check_bool("return_lse", return_lse)
    scale = 1.0 / math.sqrt(D) if scale is None and D else 1.0 if scale is None else scale
    scale = check_real("scale", scale)
    if top_k is not None and indices is not None:
        raise DshalValueError("give top_k or indices, not both (top_k selects blocks, indices "
                              "are the caller's selection)")
    if return_indices and top_k is None and indices is None:
        raise DshalValueError("return_indices=True needs top_k or indices: without a selection "
                              "there are no indices to return")
    n_blocks = ceil_div(Lk, block_size)
    if indices is not None:
        mi = metas["indices"]
        check_ndim("indices", mi, 4)
        check_dtype("indices", mi, INDEX_DTYPES)
        if mi.shape[:3] != (B, Hkv, Lq):
            raise DshalValueError(f"indices must have shape [{B}, {Hkv}, {Lq}, n] (batch, kv "
                                  f"heads, queries, blocks), got {list(mi.shape)}")
        span = arrays.value_range(indices)
        if span is not None and (span[0] < -1 or span[1] >= n_blocks):
            raise DshalValueError(
                f"indices must lie in [-1, {n_blocks - 1}] (-1 = unused; Lk={Lk} keys in "
                f"{n_blocks} blocks of {block_size}), got values in [{span[0]}, {span[1]}]")
    features = {name for name, used in (
        ("top_k", top_k is not None), ("indices", indices is not None), ("window", window > 0),
        ("causal", causal), ("gqa", Hq != Hkv), ("cross_length", Lq != Lk),
        ("return_indices", return_indices), ("return_lse", return_lse)) if used}
    sig = Signature("sparse_attention", library, _device(metas),
                    tuple((n, m.dtype) for n, m in metas.items()), frozenset(features), None,
                    (("head_dim", max(D, Dv)), ("block_size", block_size),
                     ("seq_len", max(Lq, Lk)), ("window", window)))

    def execute(b: Backend, kind: str) -> Any:
        idx = None if indices is None else arrays.cast(arrays.to_kind(indices, kind), "int64")
        call = AttentionCall(arrays.to_kind(q, kind), arrays.to_kind(k, kind),
                             arrays.to_kind(v, kind), top_k, block_size, window, causal, scale,
                             idx, return_indices, return_lse)
        out, sel, lse = b.run("sparse_attention", call)
        _expect(b, "out", out, (B, Hq, Lq, Dv), dtype)
        result = [_back(out, plan)]
        if return_indices:
            _expect(b, "indices", sel, None, "int64")
            if tuple(sel.shape[:3]) != (B, Hkv, Lq):
                raise PluginError(f"backend {b.name!r} returned indices of shape "
                                  f"{list(sel.shape)}, expected [{B}, {Hkv}, {Lq}, n]")
            result.append(_back(sel, plan))
        if return_lse:
            _expect(b, "lse", lse, (B, Hq, Lq), "float32")
            result.append(_back(lse, plan))
        return result[0] if len(result) == 1 else tuple(result)

    plan = _Plan(sig, library, like, execute)
    return plan


def sparse_attention(q: Any, k: Any, v: Any, *, top_k: int | float | None = None,
                     block_size: int = 64, window: int = 0, causal: bool = False,
                     scale: float | None = None, indices: Any = None,
                     return_indices: bool = False, return_lse: bool = False,
                     backend: str | None = None) -> Any:
    """Attention where each query sees its top-k key blocks plus a sliding window.

    :param q: queries [B, Hq, Lq, D] (float16, bfloat16, float32; float64 where declared).
    :param k: keys [B, Hkv, Lk, D], ``Hq % Hkv == 0``; query head h uses kv head h // (Hq/Hkv).
    :param v: values [B, Hkv, Lk, Dv].
    :param top_k: blocks selected per query besides its own block: an int count, or a float in
        (0, 1] as a fraction of that query's candidate blocks (rounded up).
    :param block_size: keys per block (1 = token-level selection).
    :param window: sliding window: keys j with |p - j| < window, p = i + Lk - Lq (0 = none).
    :param causal: keys j <= p only (bottom-right aligned, as FlashAttention).
    :param scale: score scale, default 1/sqrt(D).
    :param indices: the caller's block selection [B, Hkv, Lq, n] (int), -1 = unused; exclusive
        with ``top_k``; no block is forced.
    :param return_indices: also return the selected blocks [B, Hkv, Lq, n] int64, -1 padded.
    :param return_lse: also return the log-sum-exp of the scaled scores [B, Hq, Lq] float32.
    :param backend: force a backend by name.
    :return: out [B, Hq, Lq, Dv] in q's dtype, or the tuple (out, indices, lse) holding what was
        asked for. A query with no allowed key gives out = 0 and lse = -inf.
    """
    return _run(_plan_attention(q, k, v, top_k=top_k, block_size=block_size, window=window,
                                causal=causal, scale=scale, indices=indices,
                                return_indices=return_indices, return_lse=return_lse), backend)


# --- quantize ---------------------------------------------------------------------------------


def _plan_quantize(x, precision, *, granularity="row", group_size=128) -> _Plan:
    metas, library, like = _origin({"x": x})
    mx = metas["x"]
    check_dtype("x", mx, FLOAT_DTYPES)
    precision = check_choice("precision", precision, PRECISIONS)
    granularity = check_choice("granularity", granularity, GRANULARITIES)
    group_size = check_int("group_size", group_size, minimum=1)
    quantized = precision in QUANTIZED_PRECISIONS
    check_ndim("x", mx, 2 if quantized and granularity == "block" else None,
               minimum=1 if quantized and granularity == "row" else 0)
    shape = mx.shape
    if not quantized:
        scales_shape, out_dtype = None, {"fp32": "float32", "tf32": "float32",
                                         "bf16": "bfloat16", "fp16": "float16"}[precision]
    else:
        out_dtype = STORAGE_DTYPE[precision]
        scales_shape = {
            "row": shape[:-1] + (ceil_div(shape[-1], group_size),) if shape else (),
            "block": (ceil_div(shape[0], group_size), ceil_div(shape[-1], group_size)),
            "tensor": (),
        }[granularity]
    if quantized and not arrays.all_finite(x):
        raise DshalValueError(f"x must be finite to quantize to {precision} (its scale is "
                              "amax / qmax); found NaN or Inf")
    features = frozenset({granularity}) if quantized else frozenset()
    sig = Signature("quantize", library, mx.device, (("x", mx.dtype),), features, precision)

    def execute(b: Backend, kind: str) -> Any:
        xk = arrays.to_kind(x, kind)
        values, scales = b.run("quantize", QuantizeCall(xk, precision, granularity, group_size))
        _expect(b, "values", values, shape, out_dtype)
        if scales_shape is not None:
            _expect(b, "scales", scales, scales_shape, "float32")
        return _back(values, plan), _back(scales, plan)

    plan = _Plan(sig, library, like, execute)
    return plan


def quantize(x: Any, precision: str, *, granularity: str = "row", group_size: int = 128,
             backend: str | None = None) -> tuple[Any, Any]:
    """Quantise ``x`` to ``precision`` with fine-grained float32 scales.

    fp8/int8: ``scale = amax / qmax`` per group (qmax 448, 57344, 127; 1 where amax = 0) and
    ``values = x / scale`` rounded to nearest even and saturated. Groups: ``"row"`` (1 x
    group_size along the last axis; scales [..., M, ceil(K/g)]), ``"block"`` (group_size x
    group_size of a 2-D [K, N]; scales [ceil(K/g), ceil(N/g)]), ``"tensor"`` (one scalar).
    fp32/tf32/bf16/fp16: ``x`` rounded to that format (nearest even), scales ``None``.

    :return: ``(values, scales)`` in the caller's library; values are float8_e4m3fn,
        float8_e5m2 or int8 (ml_dtypes for numpy). Non-finite input raises ``ValueError``.
    """
    return _run(_plan_quantize(x, precision, granularity=granularity, group_size=group_size),
                backend)


# --- gemm -------------------------------------------------------------------------------------


def _check_scale(name: str, meta: arrays.ArrayMeta | None, value: Any,
                 forms: dict[tuple[int, ...], str]) -> None:
    if meta is None:
        check_real(name, value)
        return
    if meta.shape not in forms:
        allowed = ", ".join(f"{list(s)} ({w})" for s, w in forms.items())
        raise DshalValueError(f"{name} has shape {list(meta.shape)} (allowed: {allowed})")
    check_dtype(name, meta, FLOAT_DTYPES)


def _resolve_precision(precision: Any, da: str, db: str) -> str:
    storage = {d for d in (da, db) if d in QUANT_DTYPES}
    if precision is None:
        if len(storage) > 1:
            raise DshalValueError(f"a is {da} and b is {db}: quantised inputs must share one "
                                  "format")
        return PRECISION_OF_STORAGE[storage.pop()] if storage else "fp32"
    precision = check_choice("precision", precision, GEMM_PRECISIONS)
    for name, d in (("a", da), ("b", db)):
        if d in QUANT_DTYPES and PRECISION_OF_STORAGE[d] != precision:
            raise DshalValueError(f"precision={precision!r} contradicts {name} stored as {d} "
                                  f"(use precision={PRECISION_OF_STORAGE[d]!r} or None)")
    return precision


def _plan_gemm(a, b, *, precision=None, a_scale=None, b_scale=None, group_size=128, bias=None,
               out_dtype=None, tolerance=None, candidates=None) -> tuple[_Plan, dict]:
    def as_array(s):
        return s if arrays.library_of(s) is not None else None

    metas, library, like = _origin({"a": a, "b": b, "bias": bias, "a_scale": as_array(a_scale),
                                    "b_scale": as_array(b_scale)})
    ma, mb = metas["a"], metas["b"]
    allowed_in = FLOAT_DTYPES + QUANT_DTYPES
    da, db = check_dtype("a", ma, allowed_in), check_dtype("b", mb, allowed_in)
    check_ndim("a", ma, minimum=2)
    check_ndim("b", mb, 2)
    *batch, M, K = ma.shape
    Kb, N = mb.shape
    if Kb != K:
        raise DshalValueError(f"a [..., M, K] and b [K, N] must agree on K: a has K={K} "
                              f"(shape {list(ma.shape)}), b has {Kb} (shape {list(mb.shape)})")
    if da in FLOAT_DTYPES and db in FLOAT_DTYPES and da != db:
        raise DshalTypeError(f"a has dtype {da} and b has {db}: float inputs must share a dtype")
    precision = _resolve_precision(precision, da, db)
    group_size = check_int("group_size", group_size, minimum=1)
    gk, gn = ceil_div(K, group_size), ceil_div(N, group_size)
    for name, d, value, forms in (
        ("a_scale", da, a_scale, {(): "scalar", (*batch, M, 1): "per row",
                                  (*batch, M, gk): "per row group of group_size"}),
        ("b_scale", db, b_scale, {(): "scalar", (1, N): "per column",
                                  (gk, gn): "per group_size x group_size block"}),
    ):
        if value is None:
            continue
        if d not in QUANT_DTYPES:
            raise DshalValueError(f"{name} is only for an already-quantised input, but "
                                  f"{name[0]} is {d} (float inputs are quantised on the fly)")
        _check_scale(name, metas.get(name), value, forms)
        if name in metas and not arrays.all_finite(value):
            raise DshalValueError(f"{name} must be finite, found NaN or Inf")
    if bias is not None:
        check_ndim("bias", metas["bias"], 1)
        check_shape("bias", metas["bias"], (N,), "one value per output column N")
        check_dtype("bias", metas["bias"], FLOAT_DTYPES)
    default_out = da if da in FLOAT_DTYPES else "float32"
    out = default_out if out_dtype is None else dtype_name("out_dtype", out_dtype, FLOAT_DTYPES)
    auto = precision == "auto"
    if not auto and (tolerance is not None or candidates is not None):
        given = "tolerance" if tolerance is not None else "candidates"
        raise DshalValueError(f"{given} only applies to precision='auto', got "
                              f"precision={precision!r}")
    options = {"auto": auto}
    if auto:
        options["tolerance"] = check_real("tolerance", 1e-3 if tolerance is None else tolerance,
                                          positive=True)
        if candidates is not None:
            if isinstance(candidates, str) or not isinstance(candidates, Sequence) \
                    or not candidates:
                raise DshalTypeError(f"candidates must be a non-empty list of precisions "
                                     f"({', '.join(PRECISIONS)}), got {candidates!r}")
            candidates = tuple(check_choice("candidates[]", c, PRECISIONS) for c in candidates)
        options["candidates"] = candidates
    features = {name for name, used in (
        ("bias", bias is not None), ("batched", bool(batch)), ("auto", auto),
        ("prequantized", da in QUANT_DTYPES or db in QUANT_DTYPES)) if used}
    sig = Signature("gemm", library, ma.device,
                    tuple((n, m.dtype) for n, m in metas.items()), frozenset(features),
                    None if auto else precision, (("k", K),))

    def execute(bk: Backend, kind: str, concrete: str | None = None) -> Any:
        def scale_arg(s):
            return None if s is None else arrays.to_kind(s, kind) if as_array(s) is not None \
                else float(s)

        sa, sb = scale_arg(a_scale), scale_arg(b_scale)
        call = GemmCall(arrays.to_kind(a, kind), arrays.to_kind(b, kind), concrete or precision,
                        sa, sb, group_size, None if bias is None else arrays.to_kind(bias, kind),
                        out)
        result = bk.run("gemm", call)
        _expect(bk, "out", result, (*batch, M, N), out)
        return _back(result, plan)

    plan = _Plan(sig, library, like, execute)
    return plan, options


def gemm(a: Any, b: Any, *, precision: str | None = None, a_scale: Any = None,
         b_scale: Any = None, group_size: int = 128, bias: Any = None, out_dtype: Any = None,
         tolerance: float | None = None, candidates: Sequence[str] | None = None,
         return_info: bool = False, backend: str | None = None) -> Any:
    """Mixed-precision matrix product ``a @ b (+ bias)`` with fp32 (int8: exact) accumulation.

    :param a: [..., M, K] float, or fp8/int8 values already quantised (with ``a_scale``).
    :param b: [K, N] float, or fp8/int8 values already quantised (with ``b_scale``).
    :param precision: ``fp32``, ``tf32``, ``bf16``, ``fp16``, ``fp8_e4m3``, ``fp8_e5m2``,
        ``int8`` or ``auto``. ``None``: fp32 for float inputs, the storage format for quantised
        ones. Float inputs at a quantised precision are quantised on the fly like
        :func:`quantize` (a by row, b by block); bf16/fp16/tf32 round the inputs.
    :param a_scale: scalar, [..., M, 1] or [..., M, ceil(K/g)] (quantised a only; None = 1).
    :param b_scale: scalar, [1, N] or [ceil(K/g), ceil(N/g)] (quantised b only; None = 1).
    :param group_size: g, the quantisation group size.
    :param bias: [N], added after the product.
    :param out_dtype: default a's dtype for float a, else float32.
    :param tolerance: ``auto`` only: relative Frobenius error budget against the exact product of
        the unrounded inputs (default 1e-3).
    :param candidates: ``auto`` only: precisions to try in order (default: the backend's
        declared order, fastest first).
    :param return_info: also return ``{"precision", "estimated_error", "backend"}``.
    """
    return_info = check_bool("return_info", return_info)
    plan, options = _plan_gemm(a, b, precision=precision, a_scale=a_scale, b_scale=b_scale,
                               group_size=group_size, bias=bias, out_dtype=out_dtype,
                               tolerance=tolerance, candidates=candidates)
    estimated = None
    if options["auto"]:
        from dshal.auto import choose_precision

        chooser, _ = dispatch.select(plan.sig, backend)
        order = options["candidates"] or chooser.spec.capabilities["gemm"].auto_order or ("fp32",)
        precision, estimated = choose_precision(
            arrays.to_kind(a, "numpy"), arrays.to_kind(b, "numpy"), order, options["tolerance"],
            group_size)
        concrete = replace(plan.sig, precision=precision,
                           features=plan.sig.features - {"auto"})
        bk, decision = dispatch.select(concrete, backend)
        out = plan.execute(bk, "numpy" if decision.fallback else bk.spec.array_kind, precision)
    else:
        bk, decision = dispatch.select(plan.sig, backend)
        out = plan.execute(bk, "numpy" if decision.fallback else bk.spec.array_kind)
        precision = plan.sig.precision
    if not return_info:
        return out
    return out, {"precision": precision, "estimated_error": estimated, "backend": bk.name}


# --- gated_channels ---------------------------------------------------------------------------


def _plan_gated(x, gate_logits, *, weight=None, bias=None, mode="hard", threshold=0.0,
                keep=None, return_mask=False) -> _Plan:
    metas, library, like = _origin({"x": x, "gate_logits": gate_logits, "weight": weight,
                                    "bias": bias})
    mx, mg = metas["x"], metas["gate_logits"]
    dtype = check_dtype("x", mx, FLOAT_DTYPES)
    check_ndim("x", mx, minimum=1)
    check_dtype("gate_logits", mg, FLOAT_DTYPES)
    mode = check_choice("mode", mode, GATE_MODES)
    threshold = check_real("threshold", threshold, allow_inf=True)
    keep = check_count_or_fraction("keep", keep)
    return_mask = check_bool("return_mask", return_mask)
    if keep is not None and mode == "soft":
        raise DshalValueError("keep has no effect in mode='soft' (every channel stays open); "
                              "use mode='hard' or 'soft_hard'")
    if keep is not None and threshold != 0.0:
        raise DshalValueError(f"give threshold or keep, not both (threshold={threshold}, "
                              f"keep={keep})")
    lead, c_in = mx.shape[:-1], mx.shape[-1]
    if weight is not None:
        mw = metas["weight"]
        check_ndim("weight", mw, 2)
        if mw.dtype != dtype:
            raise DshalTypeError(f"weight has dtype {mw.dtype} but x has {dtype}: they must match")
        if mw.shape[1] != c_in:
            raise DshalValueError(f"weight must have shape [C_out, {c_in}] (x's last dim is "
                                  f"{c_in}), got {list(mw.shape)}")
        c_out = mw.shape[0]
    else:
        c_out = c_in
    if bias is not None:
        if weight is None:
            raise DshalValueError("bias needs weight (without weight y = gate * x has no bias)")
        check_shape("bias", metas["bias"], (c_out,), "one value per output channel")
        if metas["bias"].dtype != dtype:
            raise DshalTypeError(f"bias has dtype {metas['bias'].dtype} but x has {dtype}")
    if mg.shape not in ((c_out,), (*lead, c_out)):
        raise DshalValueError(f"gate_logits must have shape [{c_out}] (static) or "
                              f"{list(lead) + [c_out]} (per row), got {list(mg.shape)}")
    row_gates = mg.ndim > 1
    features = {name for name, used in (
        (mode, True), ("keep", keep is not None), ("weight", weight is not None),
        ("bias", bias is not None), ("row_gates", row_gates), ("return_mask", return_mask))
        if used}
    sig = Signature("gated_channels", library, mx.device,
                    tuple((n, m.dtype) for n, m in metas.items()), frozenset(features), None,
                    (("channels", max(c_in, c_out)),))

    def execute(b: Backend, kind: str) -> Any:
        call = GatedCall(arrays.to_kind(x, kind), arrays.to_kind(gate_logits, kind),
                         None if weight is None else arrays.to_kind(weight, kind),
                         None if bias is None else arrays.to_kind(bias, kind),
                         mode, threshold, keep, return_mask)
        y, mask = b.run("gated_channels", call)
        _expect(b, "y", y, (*lead, c_out), dtype)
        if not return_mask:
            return _back(y, plan)
        _expect(b, "mask", mask, mg.shape, "bool")
        return _back(y, plan), _back(mask, plan)

    plan = _Plan(sig, library, like, execute)
    return plan


def gated_channels(x: Any, gate_logits: Any, *, weight: Any = None, bias: Any = None,
                   mode: str = "hard", threshold: float = 0.0, keep: int | float | None = None,
                   return_mask: bool = False, backend: str | None = None) -> Any:
    """Channel gates that switch channels off; closed channels cost nothing.

    :param x: [..., C] (no weight) or [..., Cin] with ``weight``.
    :param gate_logits: [C_out] (static gates) or ``x.shape[:-1] + [C_out]`` (per row).
    :param weight: [C_out, Cin]: y = gate * (x . weight[c] + bias[c]) on open channels; closed
        channels' rows are never read.
    :param bias: [C_out], with ``weight`` only.
    :param mode: ``hard`` (gate 1), ``soft`` (sigmoid(logit), nothing closed) or ``soft_hard``
        (sigmoid(logit) on open channels).
    :param threshold: open = logit > threshold (strict; NaN is closed).
    :param keep: instead of the threshold, keep the top-``keep`` logits per row (int count or
        float fraction rounded up; ties to the lower index, NaN last).
    :param return_mask: also return the open mask (bool, shape of ``gate_logits``).
    :return: y [..., C_out] in x's dtype, exactly 0 on closed channels (+ mask).
    """
    return _run(_plan_gated(x, gate_logits, weight=weight, bias=bias, mode=mode,
                            threshold=threshold, keep=keep, return_mask=return_mask), backend)


# --- introspection ----------------------------------------------------------------------------

_PLANNERS = {"sparse_attention": _plan_attention, "quantize": _plan_quantize,
             "gemm": lambda *a, return_info=False, **k: _plan_gemm(*a, **k)[0],
             "gated_channels": _plan_gated}


@dataclass(frozen=True)
class Explanation:
    """Which backend would run a call and why each other one would not."""

    backend: str | None
    source: str
    reasons: dict[str, list[str]]
    text: str

    def __str__(self) -> str:
        return self.text


def explain(op: str, *args: Any, backend: str | None = None,
            device: tuple[int, int] | None = None, **kwargs: Any) -> Explanation:
    """Explain the dispatch of ``dshal.ops.<op>(*args, **kwargs)`` without running it.

    :param device: pretend the inputs live on this ``(dlpack_device_type, id)`` (used by the
        ``dshal explain`` command line to ask about devices it has no arrays for).
    """
    op = check_choice("op", op, tuple(_PLANNERS))
    sig = _PLANNERS[op](*args, **kwargs).sig
    if device is not None:
        sig = replace(sig, device=device)
    decision = dispatch.decide(sig, backend)
    return Explanation(decision.backend, decision.source,
                       {n: list(r) for n, r in decision.reasons}, decision.explain(sig))


def backends() -> dict[str, Backend]:
    """Every installed backend plugin by name, with its status (loads them if needed)."""
    return dict(registry.backends())
