"""The varlen, paged and block_keys forms of ``sparse_attention`` in torch (DESIGN 3.1a).

Two pieces:

- :func:`sparse_attention_forms`, the torch backend's forward for these forms: sequences with
  up to :data:`BATCHED_ROWS` queries (decode, short chunks) are served together by
  :mod:`dshal.torch.batched` (one set of tensor ops, no per-sequence loop); each longer one
  (prefill) runs as a contiguous call of :mod:`dshal.torch.attention` on its query rows and
  its keys (gathered from its pages when paged), with its block_keys.
- ``torch.ops.dshal.sparse_attention_forms``, the custom operator ``dshal.torch`` routes these
  forms to, with a fake implementation (validated by the same planner as ``dshal.ops``) and
  autograd: the backward runs ``torch.ops.dshal._sparse_attention_backward`` per sequence with
  the forward's selection. The paged form is inference only: a call that needs its gradient
  raises ``ValueError``; block_keys get no gradient (selection is not differentiated).

Schema::

    sparse_attention_forms(q, k, v, indices, cu_seqlens_q, cu_seqlens_k, block_table,
                           seqlens_k, block_keys, top_k_count, top_k_fraction, block_size,
                           window, causal, scale, backend) -> (out, indices, lse)

The returned indices are padded with -1 to a width known from shapes (so the fake tensor knows
it): ``min(top_k + 1, n_blocks)`` for a count, ``n_blocks`` for a fraction, where n_blocks
counts the blocks of the longest sequence the keys could hold; ``dshal.torch`` trims them to
the widest row when it runs eagerly.
"""

from __future__ import annotations

import dataclasses
import math
from types import SimpleNamespace
from typing import Any

import torch
from torch import Tensor

from dshal import ops
from dshal.calls import AttentionCall
from dshal.forms import (
    Seq,
    SeqArrays,
    padded_selections,
    seq_arrays,
    seq_keys,
    seq_summaries,
    sequences,
)
from dshal.torch import attention, batched

_LIB = "dshal"


#: the longest query run (rows per sequence) served by the batched path; longer sequences
#: (prefill) run one contiguous call each. 0 sends every sequence through the per-sequence
#: path (how tests and benchmarks compare the two). Measured on CPU (docs/performance.md,
#: B=8, cache 8192, top_k 16 of 64, window 256, one thread): batched is 10x faster at one row
#: per sequence and about even from 8 to 64 rows (where the rows of a sequence select
#: different blocks and both paths compute the same scores); with block_keys the batched path
#: never reads a whole cache, the per-sequence one gathers each paged sequence's keys.
BATCHED_ROWS = 16


def sparse_attention_forms(call: AttentionCall) -> tuple[Any, Any, Any]:
    """``(out, indices, lse)`` of a varlen, paged or block_keys call on torch tensors."""
    q, k, v = call.q, call.k, call.v
    B, Hq, Lq, _ = q.shape
    Hkv, Dv = k.shape[1], v.shape[3]
    seqs = seq_arrays(call)
    short = (seqs.lq > 0) & (seqs.lq <= BATCHED_ROWS)
    served = batched.attend(call, seqs.subset(short))
    if len(served) == 1 and served[0].b is None:  # a batch of decode steps, as laid out
        rows = served[0]
        return rows.out.to(q.dtype), rows.indices if call.return_indices else None, \
            rows.lse if call.return_lse else None
    out = torch.zeros(B, Hq, Lq, Dv, dtype=q.dtype, device=q.device)
    lse = torch.full((B, Hq, Lq), -math.inf, dtype=torch.float32, device=q.device)
    for rows in served:
        b, i = (torch.from_numpy(x).to(q.device) for x in (rows.b, rows.q))
        out[b, :, i] = rows.out.to(q.dtype)
        lse[b, :, i] = rows.lse
    picked = _per_sequence(call, seqs.subset(seqs.lq > BATCHED_ROWS), out, lse)
    indices = None
    if call.return_indices:
        indices = _place_indices(served, picked, (B, Hkv, Lq), q.device)
    return out, indices, lse if call.return_lse else None


def _per_sequence(call: AttentionCall, seqs: SeqArrays, out: Tensor, lse: Tensor
                  ) -> list[tuple[Seq, Tensor]]:
    """Each sequence of ``seqs`` as a contiguous call (its keys gathered from its pages when
    paged), written into ``out`` and ``lse``; its selection [Hkv, lq, n] when it has one."""
    q, k, v = call.q, call.k, call.v
    page_size = k.shape[2]
    picked = []
    for s in seqs.as_list():
        rows = slice(s.q0, s.q0 + s.lq)
        bk = None if call.block_keys is None else \
            seq_summaries(call.block_keys, s, call.block_size, page_size)[None]
        sub = dataclasses.replace(
            call, q=q[s.b:s.b + 1, :, rows], k=seq_keys(k, s)[None], v=seq_keys(v, s)[None],
            indices=None if call.indices is None else call.indices[s.b:s.b + 1, :, rows],
            block_keys=bk, cu_seqlens_q=None, cu_seqlens_k=None, block_table=None,
            seqlens_k=None, return_lse=True)
        o, sel, seq_lse = attention.sparse_attention(sub)
        out[s.b, :, rows] = o[0]
        lse[s.b, :, rows] = seq_lse[0]
        if sel is not None:
            picked.append((s, sel[0]))
    return picked


def _place_indices(served: list[batched.Rows], picked: list[tuple[Seq, Tensor]],
                   shape: tuple[int, int, int], device: torch.device) -> Tensor:
    """The selections of both paths in the call's layout [B, Hkv, Lq, width], -1 padded to
    the widest row."""
    width = max([r.indices.shape[-1] for r in served if r.indices is not None]
                + [x.shape[-1] for _, x in picked], default=0)
    indices = padded_selections(picked, *shape, lambda s: torch.full(
        (*s[:3], width), -1, dtype=torch.int64, device=device))
    for rows in served:
        if rows.indices is not None:
            b, i = (torch.from_numpy(x).to(device) for x in (rows.b, rows.q))
            indices[b, :, i, :rows.indices.shape[-1]] = rows.indices
    return indices


# --- torch.ops.dshal.sparse_attention_forms ---------------------------------------------------


def _count(count: int | None, fraction: float | None) -> int | float | None:
    return count if count is not None else fraction


def width_bound(k: Tensor, block_table: Tensor | None, indices: Tensor | None,
                top_k: int | float | None, block_size: int) -> int:
    """The width the operator pads its indices to (see the module docstring)."""
    if indices is not None:
        return indices.shape[-1]
    if top_k is None:
        return 0
    longest = k.shape[2] * (block_table.shape[1] if block_table is not None else 1)
    nb = -(-longest // block_size)
    return nb if isinstance(top_k, float) else min(top_k + 1, nb)


@torch.library.custom_op(f"{_LIB}::sparse_attention_forms", mutates_args=())
def forms_op(q: Tensor, k: Tensor, v: Tensor, indices: Tensor | None,
             cu_seqlens_q: Tensor | None, cu_seqlens_k: Tensor | None,
             block_table: Tensor | None, seqlens_k: Tensor | None, block_keys: Tensor | None,
             top_k_count: int | None, top_k_fraction: float | None, block_size: int,
             window: int, causal: bool, scale: float | None, backend: str | None
             ) -> tuple[Tensor, Tensor, Tensor]:
    """``sparse_attention`` in a 3.1a form; always returns the selection (padded) and lse."""
    top_k = _count(top_k_count, top_k_fraction)
    selecting = top_k is not None or indices is not None
    with torch.no_grad():
        out, *sel, lse = ops.sparse_attention(
            q.detach(), k.detach(), v.detach(), top_k=top_k, indices=indices,
            block_size=block_size, window=window, causal=causal, scale=scale,
            return_indices=selecting, return_lse=True, backend=backend,
            cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k, block_table=block_table,
            seqlens_k=seqlens_k, block_keys=None if block_keys is None else block_keys.detach())
    width = width_bound(k, block_table, indices, top_k, block_size)
    if selecting:
        (sel,) = sel
    else:
        sel = torch.empty(q.shape[0], k.shape[1], q.shape[2], 0, dtype=torch.int64,
                          device=q.device)
    if sel.shape[-1] < width:
        sel = torch.nn.functional.pad(sel, (0, width - sel.shape[-1]), value=-1)
    return out, sel, lse


@forms_op.register_fake
def _(q, k, v, indices, cu_seqlens_q, cu_seqlens_k, block_table, seqlens_k, block_keys,
      top_k_count, top_k_fraction, block_size, window, causal, scale, backend):
    from dshal.torch.library import _validate

    top_k = _count(top_k_count, top_k_fraction)
    _validate("sparse_attention", {"q": q, "k": k, "v": v, "indices": indices,
                                   "cu_seqlens_q": cu_seqlens_q, "cu_seqlens_k": cu_seqlens_k,
                                   "block_table": block_table, "seqlens_k": seqlens_k,
                                   "block_keys": block_keys},
              top_k=top_k, block_size=block_size, window=window, causal=causal, scale=scale,
              return_indices=top_k is not None or indices is not None, return_lse=True)
    B, Hq, Lq, _ = q.shape
    width = width_bound(k, block_table, indices, top_k, block_size)
    return (q.new_empty(B, Hq, Lq, v.shape[3]),
            q.new_empty(B, k.shape[1], Lq, width, dtype=torch.int64),
            q.new_empty(B, Hq, Lq, dtype=torch.float32))


def _setup(ctx, inputs, output) -> None:
    (q, k, v, indices, cu_q, cu_k, table, _, _, count, fraction, block_size, window,
     causal, scale, backend) = inputs
    ctx.selecting = _count(count, fraction) is not None or indices is not None
    ctx.paged = table is not None
    ctx.options = (block_size, window, causal, scale)
    ctx.backend = backend
    ctx.mark_non_differentiable(output[1])
    ctx.save_for_backward(q, k, v, cu_q, cu_k, output[0], output[1], output[2])


def _backward(ctx, grad_out, grad_indices, grad_lse):
    if ctx.paged:
        raise ValueError("a paged KV cache (block_table + seqlens_k) is inference only: its "
                         "call has no backward; use the varlen form (cu_seqlens_q + "
                         "cu_seqlens_k) to train on packed sequences")
    q, k, v, cu_q, cu_k, out, sel, lse = ctx.saved_tensors
    block_size, window, causal, scale = ctx.options
    dq, dk, dv = torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
    layout = SimpleNamespace(q=q, k=k, block_size=block_size, cu_seqlens_q=cu_q,
                             cu_seqlens_k=cu_k, block_table=None, seqlens_k=None)
    for s in sequences(layout):
        rows = slice(s.q0, s.q0 + s.lq)
        keys = slice(s.k0, s.k0 + s.lk)
        grads = torch.ops.dshal._sparse_attention_backward(
            _rows(grad_out, s.b, rows), _rows(grad_lse, s.b, rows), q[s.b:s.b + 1, :, rows],
            k[s.kb:s.kb + 1, :, keys], v[s.kb:s.kb + 1, :, keys], out[s.b:s.b + 1, :, rows],
            lse[s.b:s.b + 1, :, rows], _rows(sel, s.b, rows) if ctx.selecting else None,
            block_size, window, causal, scale, ctx.backend)
        dq[s.b:s.b + 1, :, rows] = grads[0]
        dk[s.kb:s.kb + 1, :, keys] += grads[1]
        dv[s.kb:s.kb + 1, :, keys] += grads[2]
    return dq, dk, dv, *([None] * 13)


def _rows(x: Tensor | None, b: int, rows: slice) -> Tensor | None:
    return None if x is None else x[b:b + 1, :, rows]


torch.library.register_autograd(f"{_LIB}::sparse_attention_forms", _backward,
                                setup_context=_setup)


def needs_grad(*tensors: Tensor | None) -> bool:
    """Whether autograd would record a call on these tensors."""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)
