"""dshal's operators for JAX, with gradients: ``jax.custom_vjp`` over dshal's forward and
backward, run on the host through ``jax.pure_callback``.

``dshal.ops.*`` already takes jax arrays and returns jax arrays (DLPack; bfloat16 and float8
through numpy), but jax cannot differentiate or ``jit`` through it. The functions here can::

    import dshal.jax as dj
    out = dj.sparse_attention(q, k, v, top_k=4, block_size=64, causal=True)
    dq, dk, dv = jax.grad(lambda q, k, v: dj.sparse_attention(q, k, v, top_k=4).sum(),
                          argnums=(0, 1, 2))(q, k, v)

They take the arguments of :mod:`dshal.ops` (no ``backend``: dispatch picks the host
backend for the numpy arrays a callback receives) and validate them while tracing. Gradients
are those of :mod:`dshal.torch` (``docs/torch.md``): sparse_attention's with the forward's
selection held constant, gemm's straight-through, gated_channels' on the open channels;
quantize has none (its codes are integers, its rounding is a step).

The backward runs in :func:`host_vjp`, today through dshal's torch autograd on CPU tensors
(the one public backward on this version; it needs ``torch``: ``pip install 'dshal[torch]'``).
It is one function so that it can switch to the dispatched backward operator of plugin API 2.
Indices come back as int32 unless ``jax_enable_x64`` is on.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

from dshal.integrations import require

jax = require("jax", "jax")

import numpy as np  # noqa: E402

from dshal import arrays, ops  # noqa: E402
from dshal.calls import selection_width  # noqa: E402
from dshal.plans import quantize_result  # noqa: E402

__all__ = ["gated_channels", "gemm", "host_vjp", "quantize", "sparse_attention"]


def _index_dtype() -> np.dtype:
    return np.dtype(jax.dtypes.canonicalize_dtype(np.int64))


def _stand_in(x: Any) -> Any:
    """A zero-strided numpy array of ``x``'s shape and dtype: validation without values."""
    if x is None or not hasattr(x, "shape"):
        return x
    return np.broadcast_to(np.zeros((), np.dtype(x.dtype)), tuple(x.shape))


def _validate(op: str, args: tuple, kwargs: dict[str, Any]) -> None:
    """Raise dshal's argument errors while tracing, from shapes and dtypes alone."""
    ops.signature(op, *map(_stand_in, args), **{n: _stand_in(v) for n, v in kwargs.items()})


def _call(host: Callable[..., tuple], specs: tuple, *args: Any) -> tuple:
    return jax.pure_callback(host, specs, *args, vmap_method="sequential")


def _spec(shape: tuple[int, ...], dtype: Any) -> Any:
    return jax.ShapeDtypeStruct(tuple(shape), np.dtype(dtype))


def _numpy(x: Any) -> Any:
    return None if x is None else np.asarray(x)


# --- the backward -----------------------------------------------------------------------------


def host_vjp(op: str, primals: dict[str, np.ndarray], constants: dict[str, Any],
             cotangents: tuple[np.ndarray | None, ...]) -> list[np.ndarray]:
    """Gradients of ``dshal.ops.<op>`` with respect to ``primals`` (float numpy arrays), given
    the cotangents of its float results (None: zero), with the other arguments in
    ``constants``.

    Today this reruns the call through :mod:`dshal.torch` on CPU tensors and differentiates
    it with torch autograd (dshal's backward exists only there on this version; callers pass
    what fixes the forward's choices, e.g. attention's selection as ``indices``). When the
    dispatched backward operator (plugin API 2) is public, it replaces this body.
    """
    try:
        import torch

        import dshal.torch as dshal_torch
    except ImportError as exc:
        raise ImportError("dshal.jax's gradients run dshal's torch backward on the host: "
                          "pip install 'dshal[torch]'") from exc
    def tensor(x: np.ndarray) -> Any:  # a writable copy: callbacks get read-only buffers
        return arrays.to_kind(np.array(x, order="C"), "torch")

    leaves = {n: tensor(x).requires_grad_() for n, x in primals.items()}
    given = {n: tensor(x) if isinstance(x, np.ndarray) else x for n, x in constants.items()}
    with torch.enable_grad():
        outs = getattr(dshal_torch, op)(**leaves, **given)
        outs = outs if isinstance(outs, tuple) else (outs,)
        pairs = [(o, tensor(c).to(o.dtype))
                 for o, c in zip(outs, cotangents)
                 if c is not None and o.is_floating_point() and o.requires_grad]
        grads = torch.autograd.grad([o for o, _ in pairs], list(leaves.values()),
                                    [c for _, c in pairs], allow_unused=True) if pairs \
            else [None] * len(leaves)
    return [np.zeros_like(primals[n]) if g is None
            else arrays.to_kind(g.to(leaves[n].dtype), "numpy")
            for n, g in zip(leaves, grads)]


def _is_float(x: Any) -> bool:
    """Whether ``x`` is a float array (jax's inexact dtypes; integer results' cotangents are
    float0)."""
    return x is not None and bool(jax.numpy.issubdtype(x.dtype, jax.numpy.floating))


def _differentiable(op: str, names: tuple[str, ...], n_diff: int,
                    specs: Callable[..., tuple], forward: Callable[..., tuple],
                    backward_constants: Callable[..., dict[str, Any]],
                    rerun_outputs: tuple[int, ...] = (0,)) -> Callable[..., tuple]:
    """A ``jax.custom_vjp`` over the host ``forward`` and :func:`host_vjp`.

    The first ``n_diff`` of ``names`` are differentiated; the rest (arrays or None) are not.
    ``backward_constants(outputs, *constant_arrays)`` gives the constants the backward's rerun
    needs (options included); the rerun returns the forward's outputs ``rerun_outputs``.
    """

    @jax.custom_vjp
    def fn(*xs: Any) -> tuple:
        return _call(lambda *a: forward(*map(_numpy, a)), specs(*xs), *xs)

    def fwd(*xs: Any) -> tuple[tuple, tuple]:
        outs = fn(*xs)
        return outs, (xs, outs)

    def bwd(residuals: tuple, cts: tuple) -> tuple:
        xs, outs = residuals
        diff = xs[:n_diff]
        cts = tuple(cts[i] for i in rerun_outputs)
        mask = tuple(_is_float(c) for c in cts)

        def host(*a: Any) -> tuple:
            arrs = [_numpy(x) for x in a]
            primals = dict(zip(names, arrs[:n_diff]))
            rest, out_arrs = arrs[n_diff:len(xs)], arrs[len(xs):len(xs) + len(outs)]
            given = iter(arrs[len(xs) + len(outs):])
            cotangents = tuple(next(given) if m else None for m in mask)
            consts = backward_constants(out_arrs, *rest)
            return tuple(host_vjp(op, primals, consts, cotangents))

        present = [c for c, m in zip(cts, mask) if m]
        grads = _call(host, tuple(_spec(x.shape, x.dtype) for x in diff),
                      *xs, *outs, *present)
        return (*grads, *([None] * (len(xs) - n_diff)))

    fn.defvjp(fwd, bwd)
    return fn


# --- sparse_attention -------------------------------------------------------------------------


@functools.lru_cache(maxsize=256)
def _attention(top_k: Any, block_size: int, window: int, causal: bool, scale: float | None,
               with_indices: bool) -> Callable[..., tuple]:
    options = {"block_size": block_size, "window": window, "causal": causal, "scale": scale}
    selecting = top_k is not None or with_indices

    def specs(q: Any, k: Any, v: Any, *indices: Any) -> tuple:
        B, Hq, Lq, _ = q.shape
        width = indices[0].shape[-1] if with_indices else 0 if top_k is None else \
            selection_width(Lq, k.shape[2], block_size, causal, top_k)
        return (_spec((B, Hq, Lq, v.shape[3]), q.dtype),
                _spec((B, k.shape[1], Lq, width), _index_dtype()),
                _spec((B, Hq, Lq), np.float32))

    def forward(q: np.ndarray, k: np.ndarray, v: np.ndarray, *indices: np.ndarray) -> tuple:
        out, *sel, lse = ops.sparse_attention(
            q, k, v, top_k=top_k, indices=indices[0] if with_indices else None,
            return_indices=selecting, return_lse=True, **options)
        width = specs(q, k, v, *indices)[1].shape[-1]
        sel = sel[0] if sel else np.empty((*k.shape[:2], q.shape[2], 0), np.int64)
        sel = np.pad(sel, [(0, 0)] * 3 + [(0, width - sel.shape[-1])], constant_values=-1)
        return out, sel.astype(_index_dtype()), lse

    def constants(outs: list[np.ndarray], *indices: np.ndarray) -> dict[str, Any]:
        # the forward's selection, passed back as indices: the rerun attends the same keys
        sel = outs[1].astype(np.int64) if selecting else None
        return {"indices": sel, "return_lse": True, **options}

    return _differentiable("sparse_attention", ("q", "k", "v"), 3, specs, forward, constants,
                           rerun_outputs=(0, 2))  # (out, lse): the rerun needs no indices


def sparse_attention(q: Any, k: Any, v: Any, *, top_k: int | float | None = None,
                     block_size: int = 64, window: int = 0, causal: bool = False,
                     scale: float | None = None, indices: Any = None,
                     return_indices: bool = False, return_lse: bool = False) -> Any:
    """:func:`dshal.ops.sparse_attention` for jax, differentiable in q, k and v (the selection
    held constant; the gradient through lse is included when lse is used)."""
    _validate("sparse_attention", (q, k, v),
              {"top_k": top_k, "block_size": block_size, "window": window, "causal": causal,
               "scale": scale, "indices": indices, "return_indices": return_indices,
               "return_lse": return_lse})
    fn = _attention(top_k, block_size, window, causal, scale, indices is not None)
    out, sel, lse = fn(q, k, v, *(() if indices is None else (indices,)))
    extra = [x for x, wanted in ((sel, return_indices), (lse, return_lse)) if wanted]
    return (out, *extra) if extra else out


# --- gemm and gated_channels ------------------------------------------------------------------


def _gemm_dtype(a: Any, out_dtype: Any) -> np.dtype:
    if out_dtype is not None:
        return np.dtype(out_dtype)
    dtype = np.dtype(a.dtype)
    return dtype if dtype.kind == "f" or dtype == jax.numpy.bfloat16 else np.dtype(np.float32)


@functools.lru_cache(maxsize=256)
def _gemm(options: tuple, with_bias: bool) -> Callable[..., tuple]:
    given = dict(options)

    def specs(a: Any, b: Any, *bias: Any) -> tuple:
        return (_spec((*a.shape[:-1], b.shape[-1]), _gemm_dtype(a, given["out_dtype"])),)

    def forward(a: np.ndarray, b: np.ndarray, *bias: np.ndarray) -> tuple:
        return (ops.gemm(a, b, bias=bias[0] if with_bias else None, **given),)

    names = ("a", "b", "bias") if with_bias else ("a", "b")
    return _differentiable("gemm", names, len(names), specs, forward,
                           lambda outs: dict(given))


def gemm(a: Any, b: Any, *, precision: str | None = None, bias: Any = None,
         out_dtype: Any = None, group_size: int = 128, tolerance: float | None = None,
         candidates: tuple[str, ...] | None = None) -> Any:
    """:func:`dshal.ops.gemm` of float inputs for jax, with straight-through gradients for a,
    b and bias (quantised inputs with scales: use :func:`dshal.ops.gemm`, which has no
    gradient)."""
    candidates = None if candidates is None else tuple(candidates)
    options = (("precision", precision), ("out_dtype", None if out_dtype is None
                                          else np.dtype(out_dtype).name),
               ("group_size", group_size), ("tolerance", tolerance),
               ("candidates", candidates))
    _validate("gemm", (a, b), {"bias": bias, **dict(options)})
    (out,) = _gemm(options, bias is not None)(a, b, *(() if bias is None else (bias,)))
    return out


@functools.lru_cache(maxsize=256)
def _gated(options: tuple, present: tuple[str, ...]) -> Callable[..., tuple]:
    given = dict(options)

    def specs(x: Any, logits: Any, *rest: Any) -> tuple:
        named = dict(zip(present, rest))
        c_out = named["weight"].shape[0] if "weight" in named else x.shape[-1]
        return (_spec((*x.shape[:-1], c_out), x.dtype), _spec(logits.shape, np.bool_))

    def forward(x: np.ndarray, logits: np.ndarray, *rest: np.ndarray) -> tuple:
        return ops.gated_channels(x, logits, **dict(zip(present, rest)), return_mask=True,
                                  **given)

    names = ("x", "gate_logits", *present)
    return _differentiable("gated_channels", names, len(names), specs, forward,
                           lambda outs: {"return_mask": True, **given}, rerun_outputs=(0, 1))


def gated_channels(x: Any, gate_logits: Any, *, weight: Any = None, bias: Any = None,
                   mode: str = "hard", threshold: float = 0.0, keep: int | float | None = None,
                   return_mask: bool = False) -> Any:
    """:func:`dshal.ops.gated_channels` for jax, with dshal's gradients for x, the logits,
    weight and bias (straight-through on open channels; closed channels pass none)."""
    options = (("mode", mode), ("threshold", threshold), ("keep", keep))
    _validate("gated_channels", (x, gate_logits), {"weight": weight, "bias": bias,
                                                   **dict(options)})
    present = tuple(n for n, a in (("weight", weight), ("bias", bias)) if a is not None)
    extra = tuple(a for a in (weight, bias) if a is not None)
    y, mask = _gated(options, present)(x, gate_logits, *extra)
    return (y, mask) if return_mask else y


def quantize(x: Any, precision: str, *, granularity: str = "row",
             group_size: int = 128) -> tuple[Any, Any]:
    """:func:`dshal.ops.quantize` for jax, usable under ``jit`` (no gradient: fp8/int8 codes
    are not differentiable)."""
    _validate("quantize", (x,), {"precision": precision, "granularity": granularity,
                                 "group_size": group_size})
    values_dtype, scales_shape = quantize_result(tuple(x.shape), precision, granularity,
                                                 group_size)
    from dshal.dtypes import numpy_dtype

    specs = (_spec(x.shape, numpy_dtype(values_dtype)),)
    if scales_shape is not None:
        specs += (_spec(scales_shape, np.float32),)

    def host(a: Any) -> tuple:
        values, scales = ops.quantize(np.asarray(a), precision, granularity=granularity,
                                      group_size=group_size)
        return (values,) if scales is None else (values, scales)

    result = _call(host, specs, x)
    return (result[0], None) if scales_shape is None else tuple(result)
