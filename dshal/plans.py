"""Validation of each operator's arguments, and how a validated call runs on a backend.

A planner sees only the arrays' metadata (library, device, dtype, shape) and the options, so its
outcome — a :class:`Plan` — depends on nothing else and is cached per call signature: repeated
calls of one shape skip validation entirely. What depends on array *values* (index ranges,
finiteness) is the plan's ``check`` and runs on every call.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from dshal import arrays, clipping
from dshal.arrays import ArrayMeta
from dshal.calls import (
    AttentionCall,
    GatedCall,
    GemmCall,
    QuantizeCall,
    selection_width,
)
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
    ROUNDED_DTYPE,
    STORAGE_DTYPE,
)
from dshal.errors import DshalTypeError, DshalValueError, PluginError
from dshal.forms import FORM_ARGS, form_arrays, plan_forms
from dshal.registry import Backend
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

GATE_MODES = ("hard", "soft", "soft_hard")
Arrays = dict[str, Any]


def _no_check(arrs: Arrays) -> None:
    return None


@dataclass(frozen=True)
class Plan:
    """A validated call signature: what dispatch needs, and how to run it.

    ``run(backend, arrs, precision)`` runs the backend on ``arrs`` (already of its
    ``array_kind``), checks what it returned and gives the results as a list;
    ``check(arrs)`` validates array values. ``options`` holds resolved options a caller needs
    (gemm's auto settings). ``decisions`` memoises this signature's dispatch decisions
    (:func:`dshal.dispatch.select` fills it), so a repeated call skips hashing the signature.
    """

    sig: Signature
    run: Callable[..., Any]
    check: Callable[[Arrays], None] = _no_check
    options: tuple[tuple[str, Any], ...] = ()
    decisions: dict[tuple, Any] = field(default_factory=dict, compare=False, repr=False)


def _features(*pairs: tuple[str, bool]) -> frozenset[str]:
    return frozenset(name for name, used in pairs if used)


def _expect(b: Backend, what: str, value: Any, shape: tuple[int, ...] | None, dtype: str) -> None:
    """A backend result has the documented shape and dtype, else the backend broke the contract."""
    if type(value) is np.ndarray and (shape is None or value.shape == shape) \
            and arrays.dtype_name_of(value) == dtype:
        return  # the common case, without building its metadata (a µs on tiny calls)
    try:
        meta = arrays.inspect(what, value)
    except TypeError:
        raise PluginError(f"backend {b.name!r} broke the plugin contract: it returned {what} "
                          f"as {type(value).__name__}, expected an array of its array_kind "
                          f"with shape {list(shape) if shape is not None else '(any)'} "
                          f"dtype {dtype}") from None
    if (shape is not None and tuple(meta.shape) != shape) or meta.dtype != dtype:
        raise PluginError(
            f"backend {b.name!r} returned {what} with shape {list(meta.shape)} dtype {meta.dtype}"
            f", expected shape {list(shape) if shape is not None else '(any)'} dtype {dtype}")


#: the arguments whose dtypes a capability table speaks for (indices, scales and biases are
#: converted by dshal or the backend and are not part of a declaration)
DATA_ARGS = {"sparse_attention": ("q", "k", "v"), "quantize": ("x",), "gemm": ("a", "b"),
             "gated_channels": ("x", "gate_logits"),
             "sparse_attention_backward": ("q", "k", "v")}


def _sig(op: str, metas: dict[str, ArrayMeta], features: frozenset[str],
         precision: str | None, sizes: tuple[tuple[str, int], ...]) -> Signature:
    first = next(iter(metas.values()))
    dtypes = tuple((n, metas[n].dtype) for n in DATA_ARGS[op])
    return Signature(op, first.library, first.device, dtypes, features, precision, sizes)


# --- sparse_attention -------------------------------------------------------------------------


def check_indices_range(indices: Any, n_blocks: int, Lk: int, block_size: int) -> None:
    """Block ``indices`` (a forward's argument, or the selection a backward is given) lie in
    [-1, n_blocks - 1]."""
    span = arrays.value_range(indices)
    if span is not None and (span[0] < -1 or span[1] >= n_blocks):
        raise DshalValueError(
            f"indices must lie in [-1, {n_blocks - 1}] (-1 = unused; Lk={Lk} keys in "
            f"{n_blocks} blocks of {block_size}), got values in [{span[0]}, {span[1]}]")


def plan_attention(metas: dict[str, ArrayMeta], *, top_k=None, block_size=64, window=0,
                   causal=False, scale=None, return_indices=False, return_lse=False) -> Plan:
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
    forms_given = any(n in metas for n in FORM_ARGS)
    if not forms_given and (mk.shape[0] != B or mv.shape[0] != B):
        raise DshalValueError(f"batch sizes differ: q {B}, k {mk.shape[0]}, v {mv.shape[0]}")
    if mk.shape[3] != D:
        raise DshalValueError(f"k head dim {mk.shape[3]} must equal q head dim {D}")
    if tuple(mv.shape[:3]) != tuple(mk.shape[:3]):
        raise DshalValueError(f"v must have k's batch (or pages), heads and length "
                              f"{list(mk.shape[:3])} in dims 0-2, got shape {list(mv.shape)}")
    if (Hkv == 0 and Hq != 0) or (Hkv and Hq % Hkv):
        raise DshalValueError(
            f"q heads ({Hq}) must be a multiple of k/v heads ({Hkv}) for grouped-query attention")
    top_k = check_count_or_fraction("top_k", top_k)
    block_size = check_int("block_size", block_size, minimum=1)
    forms = plan_forms(metas, block_size=block_size, has_top_k=top_k is not None) \
        if forms_given else None
    window = check_int("window", window, minimum=0)
    # clipped after plan_forms checked page_size % block_size on the caller's value; a paged
    # cache's sequences reach its capacity, packed varlen sequences at most the packed length
    top_k, block_size, window = clipping.attention(
        top_k, block_size, window, Lq, forms.capacity if forms is not None and forms.paged
        else Lk)
    causal = check_bool("causal", causal)
    return_indices = check_bool("return_indices", return_indices)
    return_lse = check_bool("return_lse", return_lse)
    scale = check_real("scale", (1.0 / math.sqrt(D) if D else 1.0) if scale is None else scale)
    has_indices = "indices" in metas
    if top_k is not None and has_indices:
        raise DshalValueError("give top_k or indices, not both (top_k selects blocks, indices "
                              "are the caller's selection)")
    if return_indices and top_k is None and not has_indices:
        raise DshalValueError("return_indices=True needs top_k or indices: without a selection "
                              "there are no indices to return")
    n_blocks = ceil_div(Lk, block_size)
    if has_indices:
        mi = metas["indices"]
        check_ndim("indices", mi, 4)
        check_dtype("indices", mi, INDEX_DTYPES)
        if tuple(mi.shape[:3]) != (B, Hkv, Lq):
            raise DshalValueError(f"indices must have shape [{B}, {Hkv}, {Lq}, n] (batch, kv "
                                  f"heads, queries, blocks), got {list(mi.shape)}")
    # varlen and paged calls may align any sequence's queries off the diagonal
    cross = Lq != Lk or (forms is not None and (forms.varlen or forms.paged))
    sig = _sig("sparse_attention", metas, _features(
        ("top_k", top_k is not None), ("indices", has_indices), ("window", window > 0),
        ("causal", causal), ("gqa", Hq != Hkv), ("cross_length", cross),
        ("return_indices", return_indices), ("return_lse", return_lse)
        ) | (forms.features if forms is not None else frozenset()), None,
        (("head_dim", max(D, Dv)), ("block_size", block_size),
         ("seq_len", max(Lq, forms.capacity if forms is not None and forms.paged else Lk)),
         ("window", window)))

    def check(arrs: Arrays) -> None:
        if forms is not None:
            forms.check(arrs)
            return
        if has_indices:
            check_indices_range(arrs["indices"], n_blocks, Lk, block_size)

    def run(b: Backend, arrs: Arrays, precision: str | None = None) -> list[Any]:
        get = arrs.get
        idx = get("indices")
        if Hkv == 0:  # no heads: nothing to compute (and no group size g = Hq / Hkv)
            width = mi.shape[3] if has_indices else \
                selection_width(Lq, Lk, block_size, causal, top_k) if top_k is not None else 0
            return arrays.zeros_like_kind(
                get("q"), [((B, Hq, Lq, Dv), dtype), ((B, Hkv, Lq, width), "int64"),
                           ((B, Hq, Lq), "float32")], (True, return_indices, return_lse))
        call = AttentionCall(get("q"), get("k"), get("v"), top_k, block_size, window, causal,
                             scale, None if idx is None else arrays.cast(idx, "int64"),
                             return_indices, return_lse)
        if forms is not None:
            form_arrays(call, arrs)
        out, sel, lse = b.run("sparse_attention", call)
        _expect(b, "out", out, (B, Hq, Lq, Dv), dtype)
        result = [out]
        if return_indices:
            _expect(b, "indices", sel, None, "int64")
            if tuple(sel.shape[:3]) != (B, Hkv, Lq):
                raise PluginError(f"backend {b.name!r} returned indices of shape "
                                  f"{list(sel.shape)}, expected [{B}, {Hkv}, {Lq}, n]")
            result.append(sel)
        if return_lse:
            _expect(b, "lse", lse, (B, Hq, Lq), "float32")
            result.append(lse)
        return result

    return Plan(sig, run, check)


# --- quantize ---------------------------------------------------------------------------------


def quantize_result(shape: tuple[Any, ...], precision: str, granularity: str,
                    group_size: int) -> tuple[str, tuple[Any, ...] | None]:
    """``(values dtype, scales shape)`` of a valid ``quantize`` call on an input of ``shape``;
    the shape is None for the float precisions (no scales). Shape entries may be symbolic
    (torch's fake tensors describe results with it)."""
    if precision not in QUANTIZED_PRECISIONS:
        return ROUNDED_DTYPE[precision], None
    scales = {
        "row": (*shape[:-1], ceil_div(shape[-1], group_size)) if shape else (),
        "block": (ceil_div(shape[0], group_size), ceil_div(shape[-1], group_size)),
        "tensor": (),
    }[granularity]
    return STORAGE_DTYPE[precision], scales


def plan_quantize(metas: dict[str, ArrayMeta], *, precision, granularity="row",
                  group_size=128) -> Plan:
    mx = metas["x"]
    check_dtype("x", mx, FLOAT_DTYPES)
    precision = check_choice("precision", precision, PRECISIONS)
    granularity = check_choice("granularity", granularity, GRANULARITIES)
    group_size = check_int("group_size", group_size, minimum=1)
    quantized = precision in QUANTIZED_PRECISIONS
    check_ndim("x", mx, 2 if quantized and granularity == "block" else None,
               minimum=1 if quantized and granularity == "row" else 0)
    shape = tuple(mx.shape)
    group_size = clipping.group_size(
        group_size, *(shape[-1:] if granularity == "row" else shape))
    out_dtype, scales_shape = quantize_result(shape, precision, granularity, group_size)
    sig = _sig("quantize", metas, frozenset({granularity}) if quantized else frozenset(),
               precision, ())

    def check(arrs: Arrays) -> None:
        if quantized and not arrays.all_finite(arrs["x"]):
            raise DshalValueError(f"x must be finite to quantize to {precision} (its scale is "
                                  "amax / qmax); found NaN or Inf")

    def run(b: Backend, arrs: Arrays, _: str | None = None) -> list[Any]:
        call = QuantizeCall(arrs["x"], precision, granularity, group_size)
        values, scales = b.run("quantize", call)
        _expect(b, "values", values, shape, out_dtype)
        if scales_shape is not None:
            _expect(b, "scales", scales, scales_shape, "float32")
        return [values, scales]

    return Plan(sig, run, check)


# --- gemm -------------------------------------------------------------------------------------


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


def _check_scales(metas: dict[str, ArrayMeta], scalars: dict[str, Any], group_size: int) -> None:
    ma, mb = metas["a"], metas["b"]
    *batch, M, K = ma.shape
    N = mb.shape[1]
    gk, gn = ceil_div(K, group_size), ceil_div(N, group_size)
    forms = {
        "a_scale": {(): "scalar", (*batch, M, 1): "per row",
                    (*batch, M, gk): "per row group of group_size"},
        "b_scale": {(): "scalar", (1, N): "per column",
                    (gk, gn): "per group_size x group_size block"},
    }
    for name, owner in (("a_scale", ma), ("b_scale", mb)):
        meta, scalar = metas.get(name), scalars.get(name)
        if meta is None and scalar is None:
            continue
        if owner.dtype not in QUANT_DTYPES:
            raise DshalValueError(f"{name} is only for an already-quantised input, but "
                                  f"{name[0]} is {owner.dtype} (float inputs are quantised on "
                                  "the fly)")
        if meta is None:
            check_real(name, scalar)
        elif tuple(meta.shape) not in forms[name]:
            allowed = ", ".join(f"{list(s)} ({w})" for s, w in forms[name].items())
            raise DshalValueError(f"{name} has shape {list(meta.shape)} (allowed: {allowed})")
        else:
            check_dtype(name, meta, FLOAT_DTYPES)


def plan_gemm(metas: dict[str, ArrayMeta], *, precision=None, a_scale=None, b_scale=None,
              group_size=128, out_dtype=None, tolerance=None, candidates=None) -> Plan:
    """``a_scale``/``b_scale`` here are the *scalar* scales (array scales are in ``metas``)."""
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
    group_size = clipping.group_size(check_int("group_size", group_size, minimum=1), K, N)
    _check_scales(metas, {"a_scale": a_scale, "b_scale": b_scale}, group_size)
    if "bias" in metas:
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
    options: tuple[tuple[str, Any], ...] = ()
    if auto:
        tolerance = check_real("tolerance", 1e-3 if tolerance is None else tolerance,
                               positive=True)
        if candidates is not None:
            if isinstance(candidates, str) or not isinstance(candidates, Sequence) \
                    or not candidates:
                raise DshalTypeError(f"candidates must be a non-empty list of precisions "
                                     f"({', '.join(PRECISIONS)}), got {candidates!r}")
            candidates = tuple(check_choice("candidates[]", c, PRECISIONS) for c in candidates)
        options = (("tolerance", tolerance), ("candidates", candidates))
    sig = _sig("gemm", metas, _features(
        ("bias", "bias" in metas), ("batched", bool(batch)), ("auto", auto),
        ("prequantized", da in QUANT_DTYPES or db in QUANT_DTYPES)),
        None if auto else precision, (("k", K),))
    scalars = {"a_scale": a_scale, "b_scale": b_scale}

    # float operands quantised on the fly (or measured by auto) must be finite, as quantize's x
    quantised_floats = tuple(name for name, d in (("a", da), ("b", db)) if d in FLOAT_DTYPES) \
        if auto or precision in QUANTIZED_PRECISIONS else ()

    def check(arrs: Arrays) -> None:
        for name in ("a_scale", "b_scale"):
            if arrs.get(name) is not None and not arrays.all_finite(arrs[name]):
                raise DshalValueError(f"{name} must be finite, found NaN or Inf")
        for name in quantised_floats:
            if not arrays.all_finite(arrs[name]):
                why = "measures each candidate's error against the exact product" if auto \
                    else "quantises it on the fly (scale = amax / qmax)"
                raise DshalValueError(
                    f"{name} holds NaN or Inf: gemm(precision={precision!r}) {why}, which "
                    "needs finite values; use precision='fp32' (or bf16/fp16/tf32) to "
                    "propagate them")

    def run(bk: Backend, arrs: Arrays, concrete: str | None = None) -> list[Any]:
        get = arrs.get

        def scale(name: str) -> Any:
            array = get(name)
            return array if array is not None else \
                None if scalars[name] is None else float(scalars[name])

        call = GemmCall(get("a"), get("b"), concrete or precision, scale("a_scale"),
                        scale("b_scale"), group_size, get("bias"), out)
        result = bk.run("gemm", call)
        _expect(bk, "out", result, (*batch, M, N), out)
        return [result]

    return Plan(sig, run, check, options)


# --- gated_channels ---------------------------------------------------------------------------


def plan_gated(metas: dict[str, ArrayMeta], *, mode="hard", threshold=0.0, keep=None,
               return_mask=False) -> Plan:
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
    lead, c_in = tuple(mx.shape[:-1]), mx.shape[-1]
    has_weight, has_bias = "weight" in metas, "bias" in metas
    c_out = c_in
    if has_weight:
        mw = metas["weight"]
        check_ndim("weight", mw, 2)
        if mw.dtype != dtype:
            raise DshalTypeError(f"weight has dtype {mw.dtype} but x has {dtype}: they must match")
        if mw.shape[1] != c_in:
            raise DshalValueError(f"weight must have shape [C_out, {c_in}] (x's last dim is "
                                  f"{c_in}), got {list(mw.shape)}")
        c_out = mw.shape[0]
    if has_bias:
        if not has_weight:
            raise DshalValueError("bias needs weight (without weight y = gate * x has no bias)")
        check_shape("bias", metas["bias"], (c_out,), "one value per output channel")
        if metas["bias"].dtype != dtype:
            raise DshalTypeError(f"bias has dtype {metas['bias'].dtype} but x has {dtype}")
    keep = clipping.count(keep, c_out)
    gate_shape = tuple(mg.shape)
    if gate_shape not in ((c_out,), (*lead, c_out)):
        raise DshalValueError(f"gate_logits must have shape [{c_out}] (static) or "
                              f"{[*list(lead), c_out]} (per row), got {list(gate_shape)}")
    sig = _sig("gated_channels", metas, _features(
        (mode, True), ("keep", keep is not None), ("weight", has_weight), ("bias", has_bias),
        ("row_gates", len(gate_shape) > 1), ("return_mask", return_mask)), None,
        (("channels", max(c_in, c_out)),))
    out_shape = (*lead, c_out)

    def run(b: Backend, arrs: Arrays, _: str | None = None) -> list[Any]:
        get = arrs.get
        call = GatedCall(get("x"), get("gate_logits"), get("weight"), get("bias"), mode,
                         threshold, keep, return_mask)
        y, mask = b.run("gated_channels", call)
        _expect(b, "y", y, out_shape, dtype)
        if not return_mask:
            return [y]
        _expect(b, "mask", mask, gate_shape, "bool")
        return [y, mask]

    return Plan(sig, run)


PLANNERS: dict[str, Callable[..., Plan]] = {
    "sparse_attention": plan_attention,
    "quantize": plan_quantize,
    "gemm": plan_gemm,
    "gated_channels": plan_gated,
}

# the backward of sparse_attention (plugin API 2) lives in a module of its own, built on the
# helpers above
from dshal.plans_backward import plan_attention_backward  # noqa: E402

PLANNERS["sparse_attention_backward"] = plan_attention_backward
