"""The dshal operators: ``sparse_attention``, ``quantize``, ``gemm`` and ``gated_channels``.

Each call is validated (:mod:`dshal.plans`; argument errors never reach a backend), dispatched to
a backend (:mod:`dshal.dispatch`), run on arrays of that backend's kind, and returned in the
caller's library on the caller's device. ``docs/operators.md`` states the semantics;
:mod:`dshal.reference` is their float64 oracle.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from dshal import arrays, dispatch
from dshal.capabilities import Signature
from dshal.errors import DshalTypeError, UnsupportedError
from dshal.plans import PLANNERS, Plan
from dshal.registry import Backend, registry
from dshal.validate import check_bool, check_choice

__all__ = ["backends", "explain", "gated_channels", "gemm", "quantize", "signature",
           "sparse_attention", "sparse_attention_backward"]

_PLANS: dict[tuple, Plan] = {}
_MAX_PLANS = 4096


def _plan(op: str, arrs: dict[str, Any], options: dict[str, Any]) -> tuple[Plan, dict[str, Any]]:
    """The validated plan for this call signature (cached), and the arrays given.

    The cache key: numpy arrays by dtype and shape (their library and device are fixed;
    building their metadata costs a µs each), other arrays by their metadata, options by value
    and type (``True == 1`` must not reuse the plan validated for 1). Plain loops, not
    comprehensions: each of those costs a function call on a path of a few µs.
    """
    present: dict[str, Any] = {}
    described = []
    for n in _REQUIRED[op]:
        if arrs[n] is None:
            raise DshalTypeError(f"{n} is required: an array (numpy, torch, cupy or any object "
                                 "with __dlpack__), got None")
    for n, x in arrs.items():
        if x is not None:
            present[n] = x
            described.append((n, x.dtype, x.shape) if type(x) is np.ndarray
                             else (n, arrays.inspect(n, x)))
    key: tuple | None = (op, tuple(described), tuple(options.items()),
                         tuple(map(type, options.values())))
    try:
        plan = _PLANS.get(key)
    except TypeError:  # an unhashable option value (e.g. a list): validate without caching
        key, plan = None, None
    if plan is None:
        metas = {n: arrays.inspect(n, x) for n, x in present.items()}
        arrays.common_origin(metas)
        plan = PLANNERS[op](metas, **options)
        if key is not None:
            if len(_PLANS) >= _MAX_PLANS:
                _PLANS.clear()
            _PLANS[key] = plan
    return plan, present


def _execute(plan: Plan, present: dict[str, Any], backend: str | None,
             concrete: str | None = None) -> tuple[list[Any], Backend]:
    if concrete is None:
        sig, memo = plan.sig, plan.decisions
    else:
        sig = replace(plan.sig, precision=concrete, features=plan.sig.features - {"auto"})
        memo = None
    b, decision = dispatch.select(sig, backend, memo)
    kind = "numpy" if decision.fallback else b.spec.array_kind
    arrs = present if kind == sig.library else \
        {n: arrays.to_kind(x, kind) for n, x in present.items()}
    results = plan.run(b, arrs, concrete)
    like = next(iter(present.values()))
    converted = []
    for r in results:
        converted.append(arrays.from_kind(r, sig.library, like))
    return converted, b


def _autograd(*xs: Any) -> bool:
    """Whether a call belongs to :mod:`dshal.torch`: torch tensors while ``torch.compile``
    traces, or with grad enabled and a tensor that requires grad (never imports torch for
    other arrays)."""
    if type(xs[0]) is np.ndarray:
        return False
    if type(xs[0]).__module__.partition(".")[0] != "torch":
        return False
    import torch

    if torch.compiler.is_compiling():
        return True
    return torch.is_grad_enabled() and any(
        isinstance(x, torch.Tensor) and x.requires_grad for x in xs)


def _call(op: str, arrs: dict[str, Any], options: dict[str, Any], backend: str | None) -> Any:
    plan, present = _plan(op, arrs, options)
    plan.check(present)
    results, _ = _execute(plan, present, backend)
    return results[0] if len(results) == 1 else tuple(results)


def sparse_attention(q: Any, k: Any, v: Any, *, top_k: int | float | None = None,
                     block_size: int = 64, window: int = 0, causal: bool = False,
                     scale: float | None = None, indices: Any = None,
                     return_indices: bool = False, return_lse: bool = False,
                     backend: str | None = None, cu_seqlens_q: Any = None,
                     cu_seqlens_k: Any = None, block_table: Any = None, seqlens_k: Any = None,
                     block_keys: Any = None) -> Any:
    """Attention where each query sees its top-k key blocks plus a sliding window.

    :param q: queries [B, Hq, Lq, D] (float16, bfloat16, float32; float64 where declared).
    :param k: keys [B, Hkv, Lk, D], ``Hq % Hkv == 0``; query head h uses kv head h // (Hq/Hkv).
    :param v: values [B, Hkv, Lk, Dv].
    :param top_k: blocks selected per query besides its own block: an int count, or a float in
        (0, 1] as a fraction of that query's candidate blocks (rounded up).
    :param block_size: keys per block (1 = token-level selection).
    :param window: sliding window: keys j with |p - j| < window, p = i + Lk - Lq (0 = none).
    :param causal: keys j <= p only (bottom-right aligned, as FlashAttention; SDPA's
        ``is_causal`` is top-left aligned and differs when Lq != Lk).
    :param scale: score scale, default 1/sqrt(D).
    :param indices: the caller's block selection [B, Hkv, Lq, n] (int), -1 = unused; exclusive
        with ``top_k``; no block is forced.
    :param return_indices: also return the selected blocks [B, Hkv, Lq, n] int64, -1 padded.
    :param return_lse: also return the log-sum-exp of the scaled scores [B, Hq, Lq] float32.
    :param backend: force a backend by name.
    :param cu_seqlens_q: varlen (DESIGN 3.1a): int32/int64 [S+1], sequence s owns query rows
        ``cu_seqlens_q[s]:cu_seqlens_q[s+1]`` of q [1, Hq, Tq, D] (starts at 0, non-decreasing,
        ends at Tq). Each sequence is an independent call (own alignment, blocks, window).
    :param cu_seqlens_k: varlen: the same for the key rows of k/v [1, Hkv, Tk, D].
    :param block_table: paged KV cache: int32 [B or S, max_pages]; k/v are page pools
        [P, Hkv, page_size, D] and sequence b reads pages block_table[b, 0], [b, 1], ...
        (``page_size % block_size == 0``). Combinable with ``cu_seqlens_q``.
    :param seqlens_k: paged: int32 [B or S], each sequence's key count; its query i sits at
        p = i + seqlens_k[b] - Lq_b.
    :param block_keys: per-block key summaries that replace the block means in top_k's score:
        [B, Hkv, n_blocks, D], paged [P, Hkv, page_size // block_size, D], varlen
        [1, Hkv, sum of n_blocks(s), D]. Given them, decode reads only the keys it attends.
    :return: out [B, Hq, Lq, Dv] in q's dtype, or the tuple (out, indices, lse) holding what was
        asked for. A query with no allowed key gives out = 0 and lse = -inf.

    torch tensors that require grad (or a ``torch.compile`` trace) take the autograd path of
    :mod:`dshal.torch`, with the same arguments and results.
    """
    forms = {"cu_seqlens_q": cu_seqlens_q, "cu_seqlens_k": cu_seqlens_k,
             "block_table": block_table, "seqlens_k": seqlens_k, "block_keys": block_keys}
    if _autograd(q, k, v):
        from dshal import torch as dt

        extra = {n: x for n, x in forms.items() if x is not None}
        return dt.sparse_attention(q, k, v, top_k=top_k, block_size=block_size, window=window,
                                   causal=causal, scale=scale, indices=indices,
                                   return_indices=return_indices, return_lse=return_lse,
                                   backend=backend, **extra)
    return _call("sparse_attention", {"q": q, "k": k, "v": v, "indices": indices, **forms},
                 {"top_k": top_k, "block_size": block_size, "window": window, "causal": causal,
                  "scale": scale, "return_indices": return_indices, "return_lse": return_lse},
                 backend)


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
    if _autograd(x):
        from dshal import torch as dt

        return dt.quantize(x, precision, granularity=granularity, group_size=group_size,
                           backend=backend)
    return _call("quantize", {"x": x},
                 {"precision": precision, "granularity": granularity, "group_size": group_size},
                 backend)


def _split_scale(scale: Any) -> tuple[Any, Any]:
    """(array, scalar): a scale is either an array argument or a Python/numpy scalar option."""
    return (scale, None) if arrays.library_of(scale) is not None else (None, scale)


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
    if _autograd(a, b, bias):
        from dshal import torch as dt

        return dt.gemm(a, b, precision=precision, a_scale=a_scale, b_scale=b_scale,
                       group_size=group_size, bias=bias, out_dtype=out_dtype,
                       tolerance=tolerance, candidates=candidates, return_info=return_info,
                       backend=backend)
    return_info = check_bool("return_info", return_info)
    a_arr, a_scalar = _split_scale(a_scale)
    b_arr, b_scalar = _split_scale(b_scale)
    if isinstance(candidates, list):
        candidates = tuple(candidates)
    plan, present = _plan("gemm", {"a": a, "b": b, "bias": bias, "a_scale": a_arr,
                                   "b_scale": b_arr},
                          {"precision": precision, "a_scale": a_scalar, "b_scale": b_scalar,
                           "group_size": group_size, "out_dtype": out_dtype,
                           "tolerance": tolerance, "candidates": candidates})
    plan.check(present)
    estimated = None
    if "auto" in plan.sig.features:
        from dshal.auto import choose_precision

        options = dict(plan.options)
        chooser, _ = dispatch.select(plan.sig, backend)
        order = _auto_candidates(chooser, options["candidates"])
        chosen, estimated = choose_precision(arrays.to_kind(a, "numpy"),
                                             arrays.to_kind(b, "numpy"), order,
                                             options["tolerance"], group_size)
        (out,), bk = _execute(plan, present, backend, chosen)
    else:
        (out,), bk = _execute(plan, present, backend)
        chosen = plan.sig.precision
    if not return_info:
        return out
    return out, {"precision": chosen, "estimated_error": estimated, "backend": bk.name}


def _auto_candidates(chooser: Backend, given: tuple[str, ...] | None) -> tuple[str, ...]:
    """The precisions ``auto`` walks on ``chooser``: ``given`` (default: its declared
    ``auto_order``, else fp32) less those it does not declare, so a precision the backend would
    refuse is never picked. UnsupportedError when none is left."""
    cap = chooser.spec.capabilities["gemm"]
    order = given or cap.auto_order or ("fp32",)
    served = tuple(p for p in order if p in cap.precisions)
    if not served:
        raise UnsupportedError(
            f"gemm(precision='auto'): backend {chooser.name!r} declares none of the candidates "
            f"{list(order)} (its precisions: {', '.join(sorted(cap.precisions)) or 'none'})",
            {chooser.name: [f"candidates {list(order)} not among its precisions"]})
    return served


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
    if _autograd(x, gate_logits, weight, bias):
        from dshal import torch as dt

        return dt.gated_channels(x, gate_logits, weight=weight, bias=bias, mode=mode,
                                 threshold=threshold, keep=keep, return_mask=return_mask,
                                 backend=backend)
    return _call("gated_channels",
                 {"x": x, "gate_logits": gate_logits, "weight": weight, "bias": bias},
                 {"mode": mode, "threshold": threshold, "keep": keep,
                  "return_mask": return_mask}, backend)


# --- backward operators (plugin API 2) --------------------------------------------------------


def sparse_attention_backward(q: Any, k: Any, v: Any, out: Any, lse: Any, grad_out: Any, *,
                              grad_lse: Any = None, indices: Any = None, block_size: int = 64,
                              window: int = 0, causal: bool = False, scale: float | None = None,
                              backend: str | None = None) -> tuple[Any, Any, Any]:
    """Gradients of :func:`sparse_attention` with its selection held constant (DESIGN 3.1b).

    :param q: the forward's queries [B, Hq, Lq, D].
    :param k: its keys [B, Hkv, Lk, D].
    :param v: its values [B, Hkv, Lk, Dv].
    :param out: its output [B, Hq, Lq, Dv].
    :param lse: its log-sum-exp [B, Hq, Lq] float32 (``return_lse=True``).
    :param grad_out: the gradient of its out [B, Hq, Lq, Dv], in q's dtype.
    :param grad_lse: the gradient of its lse [B, Hq, Lq] float32, when lse was used.
    :param indices: its selection [B, Hkv, Lq, n] (the indices it returned, or the ones it was
        given), -1 = unused; ``None`` when it selected nothing (window or dense attention).
    :param block_size: as the forward's.
    :param window: as the forward's.
    :param causal: as the forward's.
    :param scale: as the forward's (default 1/sqrt(D)).
    :param backend: force a backend by name.
    :return: ``(dq, dk, dv)`` in the dtypes and shapes of q, k, v. Rows with nothing allowed
        get zero gradients; NaN/Inf in keys or values a query is not allowed reach none of its
        gradients.
    """
    return _call("sparse_attention_backward",
                 {"q": q, "k": k, "v": v, "out": out, "lse": lse, "grad_out": grad_out,
                  "grad_lse": grad_lse, "indices": indices},
                 {"block_size": block_size, "window": window, "causal": causal, "scale": scale},
                 backend)


# --- introspection ----------------------------------------------------------------------------

_ARRAY_ARGS = {
    "sparse_attention": ("q", "k", "v", "indices", "cu_seqlens_q", "cu_seqlens_k", "block_table",
                         "seqlens_k", "block_keys"),
    "quantize": ("x",),
    "gemm": ("a", "b", "bias", "a_scale", "b_scale"),
    "gated_channels": ("x", "gate_logits", "weight", "bias"),
    "sparse_attention_backward": ("q", "k", "v", "out", "lse", "grad_out", "grad_lse",
                                  "indices"),
}
_POSITIONAL = {"sparse_attention": 3, "quantize": 1, "gemm": 2, "gated_channels": 2,
               "sparse_attention_backward": 6}
#: the array arguments a call cannot do without
_REQUIRED = {op: names[:_POSITIONAL[op]] for op, names in _ARRAY_ARGS.items()}


@dataclass(frozen=True)
class Explanation:
    """Which backend would run a call and why each other one would not."""

    backend: str | None
    source: str
    reasons: dict[str, list[str]]
    text: str
    #: for sparse_attention: the backend that would run its backward (None: none would)
    backward: str | None = None

    def __str__(self) -> str:
        return self.text


def explain(op: str, *args: Any, backend: str | None = None,
            device: tuple[int, int] | None = None, **kwargs: Any) -> Explanation:
    """Explain the dispatch of ``dshal.ops.<op>(*args, **kwargs)`` without running it.

    :param device: pretend the inputs live on this ``(dlpack_device_type, id)`` (used by the
        ``dshal explain`` command line to ask about devices it has no arrays for).
    """
    sig = signature(op, *args, **kwargs)
    sig = sig if device is None else replace(sig, device=device)
    decision = dispatch.decide(sig, backend)
    text, backward = decision.explain(sig), None
    if op == "sparse_attention":  # training also runs the backward: say where
        from dshal.plans_backward import backward_signature

        bsig = backward_signature(sig)
        bdecision = dispatch.decide(bsig, backend)
        backward = bdecision.backend
        text += "\nbackward (training): " + bdecision.explain(bsig)
    return Explanation(decision.backend, decision.source,
                       {n: list(r) for n, r in decision.reasons}, text, backward)


def signature(op: str, *args: Any, **kwargs: Any) -> Signature:
    """The dispatch :class:`~dshal.capabilities.Signature` of ``dshal.ops.<op>(*args,
    **kwargs)``: the arguments are validated as the call would validate them (array values
    excepted); nothing runs. The conformance suite compares it with a backend's declaration.
    """
    op = check_choice("op", op, tuple(_ARRAY_ARGS))
    if op == "quantize" and len(args) > 1:
        kwargs["precision"], args = args[1], args[:1]
    names = _ARRAY_ARGS[op]
    if len(args) > _POSITIONAL[op]:
        raise TypeError(f"{op}() takes {_POSITIONAL[op]} positional arrays")
    arrs = dict(zip(names, args))
    arrs.update({n: kwargs.pop(n) for n in names if n in kwargs})
    kwargs.pop("return_info", None)
    if op == "gemm":
        for name in ("a_scale", "b_scale"):
            arrs[name], kwargs[name] = _split_scale(arrs.get(name))
    plan, _ = _plan(op, arrs, kwargs)
    return plan.sig


def backends() -> dict[str, Backend]:
    """Every installed backend plugin by name, with its status (loads them if needed)."""
    return dict(registry.backends())
