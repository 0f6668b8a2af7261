"""Huge but valid counts and sizes, clipped once in the core before any backend sees them.

``top_k=10**30``, ``keep=10**30``, ``window=2**40``, ``block_size=2**31`` or ``group_size=2**31``
are valid arguments (DESIGN 3): each means "all of them", and beyond the call's own sizes every
larger value means the same. The planners replace such a value by the smallest one that means
the same *for this call's shapes*, so backends (with int32 kernel arguments, or allocations that
scale with a size) never see more than the call's extents:

=============  ===========================================  ====================================
argument       clipped to                                   why nothing changes
=============  ===========================================  ====================================
block_size     max(Lk, 1)                                   every larger block holds all Lk keys:
                                                            one block, numbered 0
top_k (int)    the block count ceil(Lk / block_size)        a query has fewer candidates
window         max(Lq, Lk, 1)                               |p - j| < max(Lq, Lk) for every query
                                                            position p and key j
keep (int)     the channel count C_out                      a row has C_out logits
group_size     max(extent grouped, 1): quantize ``row``      one group spans the whole extent
               and ``tensor`` K; ``block`` and gemm
               max(K, N)
=============  ===========================================  ====================================

Fractions (float ``top_k`` / ``keep``) are never clipped: they are resolved per query or row.
Lk and Lq are the longest key and query sequences a call can have; a form where the key
extent of the arrays is not the sequence length (a paged KV cache) must pass its own, and
checks that constrain the value as given (``page_size % block_size == 0``) run before clipping.
"""

from __future__ import annotations

from dshal.validate import ceil_div


def attention(top_k: int | float | None, block_size: int, window: int, Lq: int,
              Lk: int) -> tuple[int | float | None, int, int]:
    """``(top_k, block_size, window)`` clipped for queries of up to ``Lq`` and keys of up to
    ``Lk`` per sequence (see the table above)."""
    block_size = min(block_size, max(Lk, 1))
    if isinstance(top_k, int):
        top_k = min(top_k, ceil_div(Lk, block_size))
    return top_k, block_size, min(window, max(Lq, Lk, 1))


def count(value: int | float | None, n: int) -> int | float | None:
    """An int count clipped to ``n`` items (fractions and None as they are)."""
    return min(value, n) if isinstance(value, int) else value


def group_size(group_size: int, *extents: int) -> int:
    """``group_size`` clipped to the longest extent it groups (at least 1)."""
    return min(group_size, max(*extents, 1))
