"""dshal for PyTorch training: the operators as ``torch.ops.dshal.*`` custom ops with autograd.

``import dshal.torch`` registers ``torch.ops.dshal.sparse_attention``, ``.gemm``, ``.quantize``
and ``.gated_channels`` with ``torch.library`` (each with a fake implementation, so
``torch.compile(fullgraph=True)`` traces them without a graph break, and an autograd formula).
The functions below have the signatures of :mod:`dshal.ops` and return what those return;
``dshal.ops.*`` itself routes here when a tensor requires grad or when ``torch.compile`` is
tracing. Each forward runs through dshal's dispatch (the backend serving the tensors' device);
the backward passes are torch primitives on the same device (``docs/torch.md``):

- sparse_attention: dq, dk, dv over each query's allowed set, the selection held constant;
  masked rows give zero gradients; no Lq x Lk matrix is formed.
- gemm: straight-through quantisation, gradients of the exact product in fp32.
- gated_channels: exact for ``soft``; straight-through (sigmoid'(logit)) on open channels for
  ``hard`` and ``soft_hard``; closed channels pass no gradient.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from dshal import clipping
from dshal.dtypes import PRECISIONS
from dshal.torch import forms, library  # registers torch.ops.dshal.*
from dshal.validate import check_count_or_fraction

__all__ = ["gated_channels", "gemm", "quantize", "sparse_attention"]


def _split(value: int | float | None) -> tuple[int | None, float | None]:
    """An int count or float fraction as the (count, fraction) pair of the op schemas."""
    value = check_count_or_fraction("top_k/keep", value)
    return (value, None) if isinstance(value, int) else (None, value)


def sparse_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *,
                     top_k: int | float | None = None, block_size: int = 64, window: int = 0,
                     causal: bool = False, scale: float | None = None,
                     indices: torch.Tensor | None = None, return_indices: bool = False,
                     return_lse: bool = False, backend: str | None = None,
                     **forms: torch.Tensor | None) -> Any:
    """:func:`dshal.ops.sparse_attention` with autograd (the 3.1a forms through
    :mod:`dshal.torch.forms`: varlen with autograd, paged for inference only)."""
    if any(x is not None for x in forms.values()):
        return _sparse_attention_forms(q, k, v, top_k=top_k, block_size=block_size,
                                       window=window, causal=causal, scale=scale,
                                       indices=indices, return_indices=return_indices,
                                       return_lse=return_lse, backend=backend, **forms)
    if _concrete_ints(q.shape[2], k.shape[2], block_size, window) and block_size >= 1 \
            and window >= 0 and (top_k is None or _concrete_ints(top_k)
                                 or isinstance(top_k, float)):
        # valid values clipped as dshal.ops clips them (dshal.clipping): the backward
        # allocates by block_size; invalid ones are left for validation to name
        top_k, block_size, window = clipping.attention(top_k, block_size, window,
                                                       q.shape[2], k.shape[2])
    count, fraction = _split(top_k)
    out, sel, lse = torch.ops.dshal.sparse_attention(q, k, v, indices, count, fraction,
                                                     block_size, window, causal, scale, backend)
    if return_indices and top_k is None and indices is None:
        raise ValueError("return_indices=True needs top_k or indices: without a selection "
                         "there are no indices to return")
    extra = [x for x, wanted in ((sel, return_indices), (lse, return_lse)) if wanted]
    return (out, *extra) if extra else out


_FORMS = ("cu_seqlens_q", "cu_seqlens_k", "block_table", "seqlens_k", "block_keys")


def _sparse_attention_forms(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *,
                            top_k: int | float | None, block_size: int, window: int,
                            causal: bool, scale: float | None, indices: torch.Tensor | None,
                            return_indices: bool, return_lse: bool, backend: str | None,
                            **given: torch.Tensor | None) -> Any:
    unknown = set(given) - set(_FORMS)
    if unknown:
        raise TypeError(f"sparse_attention() got unexpected keyword arguments {sorted(unknown)}")
    f = {n: given.get(n) for n in _FORMS}
    paged = f["block_table"] is not None or f["seqlens_k"] is not None
    if paged and forms.needs_grad(q, k, v):
        raise ValueError("a paged KV cache (block_table + seqlens_k) is inference only and "
                         "q, k or v requires grad: call it under torch.no_grad() (or detach "
                         "them), or train with the varlen form (cu_seqlens_q + cu_seqlens_k)")
    if return_indices and top_k is None and indices is None:
        raise ValueError("return_indices=True needs top_k or indices: without a selection "
                         "there are no indices to return")
    count, fraction = _split(top_k)
    out, sel, lse = torch.ops.dshal.sparse_attention_forms(
        q, k, v, indices, f["cu_seqlens_q"], f["cu_seqlens_k"], f["block_table"],
        f["seqlens_k"], f["block_keys"], count, fraction, block_size, window, causal, scale,
        backend)
    if return_indices and not torch.compiler.is_compiling() and sel.numel():
        used = int((sel >= 0).sum(-1).max())
        sel = sel[..., :used]
    extra = [x for x, wanted in ((sel, return_indices), (lse, return_lse)) if wanted]
    return (out, *extra) if extra else out


def quantize(x: torch.Tensor, precision: str, *, granularity: str = "row",
             group_size: int = 128, backend: str | None = None) -> tuple[Any, Any]:
    """:func:`dshal.ops.quantize`; float precisions pass gradients straight through."""
    values, scales = torch.ops.dshal.quantize(x, precision, granularity, group_size, backend)
    return values, (scales if values.dtype not in library._FLOATS else None)


def gemm(a: torch.Tensor, b: torch.Tensor, *, precision: str | None = None,
         a_scale: Any = None, b_scale: Any = None, group_size: int = 128,
         bias: torch.Tensor | None = None, out_dtype: torch.dtype | None = None,
         tolerance: float | None = None, candidates: Sequence[str] | None = None,
         return_info: bool = False, backend: str | None = None) -> Any:
    """:func:`dshal.ops.gemm` with straight-through gradients for a, b and bias."""
    a_arr, a_val = _scale(a_scale)
    b_arr, b_val = _scale(b_scale)
    joined = None
    if candidates is not None:
        if isinstance(candidates, str) or not all(isinstance(c, str) for c in candidates):
            raise TypeError(f"candidates must be a list of precisions, got {candidates!r}")
        joined = ",".join(candidates)
    out, chosen, err = torch.ops.dshal.gemm(a, b, bias, a_arr, b_arr, a_val, b_val, precision,
                                            group_size, out_dtype, tolerance, joined, backend)
    if not return_info:
        return out
    from dshal import ops

    sig = ops.signature("gemm", a.detach(), b.detach(), precision=PRECISIONS[int(chosen)],
                        bias=None if bias is None else bias.detach(), a_scale=a_arr,
                        b_scale=b_arr, group_size=group_size, out_dtype=out_dtype)
    from dshal import dispatch

    estimated = float(err)
    return out, {"precision": PRECISIONS[int(chosen)],
                 "estimated_error": None if estimated < 0 else estimated,
                 "backend": dispatch.decide(sig, backend).backend}


def gated_channels(x: torch.Tensor, gate_logits: torch.Tensor, *,
                   weight: torch.Tensor | None = None, bias: torch.Tensor | None = None,
                   mode: str = "hard", threshold: float = 0.0, keep: int | float | None = None,
                   return_mask: bool = False, backend: str | None = None) -> Any:
    """:func:`dshal.ops.gated_channels` with autograd (see the module docstring)."""
    if _concrete_ints(keep, gate_logits.shape[-1]):
        keep = clipping.count(keep, gate_logits.shape[-1])
    count, fraction = _split(keep)
    y, mask = torch.ops.dshal.gated_channels(x, gate_logits, weight, bias, mode,
                                             float(threshold), count, fraction, backend)
    return (y, mask) if return_mask else y


def _concrete_ints(*values: Any) -> bool:
    """Whether every value is a plain int (not bool, not a symbolic size under tracing)."""
    return all(type(v) is int for v in values)


def _scale(scale: Any) -> tuple[torch.Tensor | None, float | None]:
    if isinstance(scale, torch.Tensor):
        return scale, None
    return None, None if scale is None else float(scale)

