"""The serving and training forms of ``sparse_attention`` (DESIGN 3.1a): validation and layout.

Three keyword arguments change how a call's arrays are laid out, and may be combined:

- **varlen** (``cu_seqlens_q``, ``cu_seqlens_k``): q [1, Hq, Tq, D] and k [1, Hkv, Tk, D] pack
  S sequences along L; sequence s owns query rows ``cu_seqlens_q[s]:cu_seqlens_q[s+1]`` and key
  rows ``cu_seqlens_k[s]:cu_seqlens_k[s+1]``.
- **paged** (``block_table`` + ``seqlens_k``): k/v [P, Hkv, page_size, D] are page pools;
  sequence b reads pages ``block_table[b, 0], block_table[b, 1], ...`` truncated to
  ``seqlens_k[b]`` keys. With ``cu_seqlens_q`` too, the sequences are those of the packed
  queries (mixed prefill and decode batches).
- **block_keys**: per-block key summaries that replace the block means in top-k's score, laid out
  like k: [B, Hkv, n_blocks, D], [P, Hkv, page_size // block_size, D] (paged), or
  [1, Hkv, sum of n_blocks(s), D] (varlen, sequence by sequence).

:func:`plan_forms` checks what shapes alone decide (once per call signature); its
:class:`Forms` ``check`` validates the values (every call). :func:`sequences` then describes
each sequence of a validated call as a :class:`Seq`, and :func:`seq_keys` /
:func:`seq_summaries` give its keys, values and summaries as contiguous-form arrays, so the
reference and the backends' general paths run each sequence as a contiguous call;
:func:`seq_arrays` gives the same description as arrays, for batched paths that serve every
sequence at once.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from dshal import arrays
from dshal.arrays import ArrayMeta
from dshal.dtypes import FLOAT_DTYPES, INDEX_DTYPES
from dshal.errors import DshalValueError
from dshal.validate import ceil_div, check_dtype, check_ndim

#: the keyword arguments of the forms, in the order the call record holds them
FORM_ARGS = ("cu_seqlens_q", "cu_seqlens_k", "block_table", "seqlens_k", "block_keys")


@dataclass(frozen=True)
class Forms:
    """What a call's shapes say about its form: the features it uses, the number of sequences
    (S for varlen queries, else q's batch), the page size (paged) and ``check(arrs)``, the
    value checks of every call (cu_seqlens, page indices, capacities, block_keys rows,
    indices ranges per sequence)."""

    varlen: bool
    paged: bool
    block_keys: bool
    n_seqs: int
    page_size: int
    capacity: int
    check: Callable[[dict[str, Any]], None]

    @property
    def features(self) -> frozenset[str]:
        used = (("varlen", self.varlen), ("paged", self.paged), ("block_keys", self.block_keys))
        return frozenset(name for name, on in used if on)


def host_ints(x: Any) -> np.ndarray:
    """An index array of any library as int64 numpy (small: cu_seqlens, tables, lengths)."""
    return np.asarray(arrays.to_kind(x, "numpy")).astype(np.int64, copy=False)


def _index_meta(metas: dict[str, ArrayMeta], name: str, ndim: int) -> ArrayMeta:
    meta = metas[name]
    check_ndim(name, meta, ndim)
    check_dtype(name, meta, INDEX_DTYPES)
    return meta


def plan_forms(metas: dict[str, ArrayMeta], *, block_size: int, has_top_k: bool
               ) -> Forms | None:
    """Shape checks of the 3.1a forms (``None`` when the call uses none of them).

    ``q``, ``k``, ``v`` are already 4-D with matching heads and head dims; ``block_size`` is
    the caller's value (``page_size % block_size`` is checked on it).
    """
    given = {n for n in FORM_ARGS if n in metas}
    if not given:
        return None
    mq, mk = metas["q"], metas["k"]
    B, Lk = mq.shape[0], mk.shape[2]
    varlen = "cu_seqlens_q" in given
    paged = "block_table" in given or "seqlens_k" in given
    if paged and not {"block_table", "seqlens_k"} <= given:
        missing = "seqlens_k" if "block_table" in given else "block_table"
        raise DshalValueError(f"a paged KV cache needs block_table and seqlens_k together; "
                              f"{missing} is missing")
    if "cu_seqlens_k" in given and paged:
        raise DshalValueError("cu_seqlens_k cannot be combined with a paged KV cache "
                              "(block_table + seqlens_k give each sequence's keys): paged and "
                              "contiguous key arguments are mixed")
    if "cu_seqlens_k" in given and not varlen:
        raise DshalValueError("cu_seqlens_k was given without cu_seqlens_q: a varlen call "
                              "needs both")
    if varlen and not paged and "cu_seqlens_k" not in given:
        raise DshalValueError("cu_seqlens_q was given without cu_seqlens_k: a varlen call needs "
                              "both (or block_table + seqlens_k for paged keys)")
    n_seqs, page_size, capacity = B, 0, 0
    if varlen:
        mc = _index_meta(metas, "cu_seqlens_q", 1)
        if mc.shape[0] < 1:
            raise DshalValueError("cu_seqlens_q must have S + 1 >= 1 entries, got shape [0]")
        if B != 1:
            raise DshalValueError(f"with cu_seqlens_q, q packs its sequences along L and must "
                                  f"have batch 1 ([1, Hq, Tq, D]), got shape {list(mq.shape)}")
        n_seqs = mc.shape[0] - 1
        if not paged:
            mck = _index_meta(metas, "cu_seqlens_k", 1)
            if mck.shape != mc.shape:
                raise DshalValueError(f"cu_seqlens_k must have cu_seqlens_q's shape "
                                      f"{list(mc.shape)} (one entry per sequence + 1), got "
                                      f"{list(mck.shape)}")
            if mk.shape[0] != 1:
                raise DshalValueError(f"with cu_seqlens_k, k and v pack their sequences along "
                                      f"L and must have batch 1, got k shape {list(mk.shape)}")
    elif mk.shape[0] != B and not paged:
        raise DshalValueError(f"batch sizes differ: q {B}, k {mk.shape[0]}")
    if paged:
        mt = _index_meta(metas, "block_table", 2)
        ms = _index_meta(metas, "seqlens_k", 1)
        who = "cu_seqlens_q's sequences" if varlen else "q's batch"
        if mt.shape[0] != n_seqs or ms.shape[0] != n_seqs:
            raise DshalValueError(f"block_table [n, max_pages] and seqlens_k [n] need one row "
                                  f"per sequence (n = {n_seqs}, {who}), got block_table "
                                  f"{list(mt.shape)} and seqlens_k {list(ms.shape)}")
        page_size = Lk
        if page_size < 1:
            raise DshalValueError(f"paged k must be a page pool [P, Hkv, page_size, D] with "
                                  f"page_size >= 1, got shape {list(mk.shape)}")
        if page_size % block_size:
            raise DshalValueError(f"page_size ({page_size}, k's dim 2) must be a multiple of "
                                  f"block_size ({block_size}): a block may not straddle pages")
        capacity = mt.shape[1] * page_size
    has_bk = "block_keys" in given
    if has_bk:
        _check_block_keys_shape(metas, varlen and not paged, paged, block_size, has_top_k)
    check = _value_checks(metas, varlen, paged, has_bk and varlen and not paged, block_size,
                          page_size, n_seqs)
    return Forms(varlen, paged, has_bk, n_seqs, page_size, capacity, check)


def _check_block_keys_shape(metas: dict[str, ArrayMeta], varlen_keys: bool, paged: bool,
                            block_size: int, has_top_k: bool) -> None:
    mb, mk = metas["block_keys"], metas["k"]
    if not has_top_k:
        raise DshalValueError("block_keys replace the block means in top_k's selection score: "
                              "give top_k with them (they do nothing without it)")
    check_ndim("block_keys", mb, 4)
    check_dtype("block_keys", mb, FLOAT_DTYPES)
    P, Hkv, Lk, D = mk.shape
    if paged:
        want, what = [P, Hkv, Lk // block_size, D], "paged: [P, Hkv, page_size // block_size, D]"
    elif varlen_keys:
        want = [1, Hkv, mb.shape[2], D]
        what = "varlen: [1, Hkv, sum over sequences of n_blocks, D]"
    else:
        want = [P, Hkv, ceil_div(Lk, block_size), D]
        what = "[B, Hkv, ceil(Lk / block_size), D]"
    if list(mb.shape) != want:
        raise DshalValueError(f"block_keys must have shape {want} ({what}), got "
                              f"{list(mb.shape)}")


def _check_cu(name: str, cu: np.ndarray, total: int, what: str) -> None:
    if cu[0] != 0:
        raise DshalValueError(f"{name} must start at 0, got {name}[0] = {cu[0]}")
    steps = np.diff(cu)
    if steps.size and steps.min() < 0:
        s = int(np.argmax(steps < 0))
        raise DshalValueError(f"{name} must be non-decreasing, got {name}[{s}] = {cu[s]} > "
                              f"{name}[{s + 1}] = {cu[s + 1]}")
    if cu[-1] != total:
        raise DshalValueError(f"{name} must end at {what} ({total}), got {name}[-1] = "
                              f"{cu[-1]}")


def _value_checks(metas: dict[str, ArrayMeta], varlen: bool, paged: bool, varlen_bk: bool,
                  block_size: int, page_size: int, n_seqs: int
                  ) -> Callable[[dict[str, Any]], None]:
    Tq, Tk, P = metas["q"].shape[2], metas["k"].shape[2], metas["k"].shape[0]
    has_indices = "indices" in metas

    def check(arrs: dict[str, Any]) -> None:
        if varlen:
            _check_cu("cu_seqlens_q", host_ints(arrs["cu_seqlens_q"]), Tq,
                      "q's packed length Tq")
        if varlen and not paged:
            _check_cu("cu_seqlens_k", host_ints(arrs["cu_seqlens_k"]), Tk,
                      "k's packed length Tk")
        if paged:
            _check_pages(host_ints(arrs["block_table"]), host_ints(arrs["seqlens_k"]), P,
                         page_size)
        if varlen_bk:
            nb = ceil_div(np.diff(host_ints(arrs["cu_seqlens_k"])), block_size).sum()
            rows = arrays.inspect("block_keys", arrs["block_keys"]).shape[2]
            if rows != nb:
                raise DshalValueError(f"block_keys must have {nb} rows in dim 2 (the sum of "
                                      f"each sequence's n_blocks = ceil(len / {block_size})), "
                                      f"got {rows}")
        if has_indices:
            _check_indices(arrs, varlen, paged, block_size)

    return check


def _check_pages(table: np.ndarray, seqlens: np.ndarray, P: int, page_size: int) -> None:
    capacity = table.shape[1] * page_size
    if seqlens.size and (seqlens.min() < 0 or seqlens.max() > capacity):
        b = int(np.argmax((seqlens < 0) | (seqlens > capacity)))
        raise DshalValueError(f"seqlens_k[{b}] = {seqlens[b]} must lie in [0, {capacity}] "
                              f"(block_table's capacity: {table.shape[1]} pages of "
                              f"{page_size} keys)")
    used = np.arange(table.shape[1])[None, :] < ceil_div(seqlens, page_size)[:, None]
    bad = used & ((table < 0) | (table >= P))
    if bad.any():
        b, j = (int(x[0]) for x in np.nonzero(bad))
        raise DshalValueError(f"block_table[{b}, {j}] = {table[b, j]} is a used page "
                              f"(seqlens_k[{b}] = {seqlens[b]}) and must lie in [0, {P}) "
                              f"(the pool has {P} pages)")


def query_blocks(arrs: dict[str, Any], varlen: bool, paged: bool, block_size: int,
                 q_shape: tuple[int, ...], k_shape: tuple[int, ...]) -> np.ndarray:
    """int64 [B, Lq]: the number of key blocks of the sequence each query row belongs to."""
    B, Lq = q_shape[0], q_shape[2]
    if paged:
        lens = host_ints(arrs["seqlens_k"])
    elif varlen:
        lens = np.diff(host_ints(arrs["cu_seqlens_k"]))
    else:
        lens = np.full(B, k_shape[2], np.int64)
    nb = ceil_div(lens, block_size)
    if varlen:
        return np.repeat(nb, np.diff(host_ints(arrs["cu_seqlens_q"])))[None, :]
    return np.broadcast_to(nb[:, None], (B, Lq))


def _check_indices(arrs: dict[str, Any], varlen: bool, paged: bool, block_size: int) -> None:
    idx = host_ints(arrs["indices"])
    if not idx.size:
        return
    nb = query_blocks(arrs, varlen, paged, block_size, arrays.inspect("q", arrs["q"]).shape,
                      arrays.inspect("k", arrs["k"]).shape)[:, None, :, None]
    bad = (idx < -1) | (idx >= nb)
    if bad.any():
        b, t, i, j = (int(x[0]) for x in np.nonzero(bad))
        raise DshalValueError(f"indices[{b}, {t}, {i}, {j}] = {idx[b, t, i, j]} must lie in "
                              f"[-1, {int(nb[b, 0, i, 0]) - 1}] (-1 = unused; the query's "
                              f"sequence has {int(nb[b, 0, i, 0])} blocks of {block_size})")


def uses_forms(call: Any) -> bool:
    """Whether a call record uses a 3.1a form (its backend takes the per-sequence path)."""
    return call.cu_seqlens_q is not None or call.block_table is not None \
        or call.block_keys is not None


def form_arrays(call: Any, arrs: dict[str, Any]) -> None:
    """Put the forms' arrays of ``arrs`` into the call record (index arrays as int64)."""
    for name in FORM_ARGS[:4]:
        x = arrs.get(name)
        if x is not None:
            setattr(call, name, arrays.cast(x, "int64"))
    call.block_keys = arrs.get("block_keys")


# --- sequences of a validated call (numpy) ----------------------------------------------------


@dataclass(frozen=True, slots=True)
class Seq:
    """One sequence of a call: query rows ``q[b, :, q0:q0 + lq]`` (and the same rows of out,
    indices and lse), ``lk`` keys: ``k[kb, :, k0:k0 + lk]`` when contiguous, else the first
    ``lk`` keys of ``pages``; varlen block_keys rows from ``nb0``."""

    b: int
    q0: int
    lq: int
    lk: int
    kb: int
    k0: int
    pages: np.ndarray | None
    nb0: int


@dataclass(frozen=True)
class SeqArrays:
    """Every sequence of a validated call as int64 host arrays [S] (the fields of :class:`Seq`,
    built without a per-sequence loop) and, when paged, the block table [S, max_pages] and the
    page size."""

    b: np.ndarray
    q0: np.ndarray
    lq: np.ndarray
    lk: np.ndarray
    kb: np.ndarray
    k0: np.ndarray
    nb0: np.ndarray
    table: np.ndarray | None
    page_size: int

    def subset(self, keep: np.ndarray) -> SeqArrays:
        """The sequences where ``keep`` (bool [S]) holds, in order."""
        return SeqArrays(self.b[keep], self.q0[keep], self.lq[keep], self.lk[keep],
                         self.kb[keep], self.k0[keep], self.nb0[keep],
                         None if self.table is None else self.table[keep], self.page_size)

    def as_list(self) -> list[Seq]:
        """One :class:`Seq` per sequence."""
        used = None if self.table is None else ceil_div(self.lk, self.page_size)
        return [Seq(int(self.b[s]), int(self.q0[s]), int(self.lq[s]), int(self.lk[s]),
                    int(self.kb[s]), int(self.k0[s]),
                    None if used is None else self.table[s, :used[s]], int(self.nb0[s]))
                for s in range(self.lq.size)]


def seq_arrays(call: Any) -> SeqArrays:
    """Every sequence of a validated :class:`~dshal.calls.AttentionCall` (any form) as arrays;
    index arrays are read on the host."""
    B, _, Lq, _ = arrays.inspect("q", call.q).shape
    Lk = arrays.inspect("k", call.k).shape[2]
    if call.cu_seqlens_q is not None:
        cq = host_ints(call.cu_seqlens_q)
        q0, lq = cq[:-1], np.diff(cq)
        b = np.zeros(lq.size, np.int64)
    else:
        q0, lq, b = np.zeros(B, np.int64), np.full(B, Lq, np.int64), np.arange(B)
    zeros = np.zeros(lq.size, np.int64)
    if call.block_table is not None:
        return SeqArrays(b, q0, lq, host_ints(call.seqlens_k), zeros, zeros, zeros,
                         host_ints(call.block_table), Lk)
    if call.cu_seqlens_k is not None:
        ck = host_ints(call.cu_seqlens_k)
        lk = np.diff(ck)
        nb0 = np.concatenate(([0], np.cumsum(ceil_div(lk, call.block_size))))[:-1]
        return SeqArrays(b, q0, lq, lk, zeros, ck[:-1], nb0.astype(np.int64), None, 0)
    return SeqArrays(b, q0, lq, np.full(lq.size, Lk, np.int64), b, zeros, zeros, None, 0)


def sequences(call: Any) -> list[Seq]:
    """Every sequence of a validated :class:`~dshal.calls.AttentionCall` (any form; index
    arrays are read on the host), one :class:`Seq` each."""
    return seq_arrays(call).as_list()


def seq_keys(x: Any, seq: Seq) -> Any:
    """Sequence ``seq``'s rows of a key or value array, [H, lk, D] (a view unless paged)."""
    if seq.pages is None:
        return x[seq.kb, :, seq.k0:seq.k0 + seq.lk]
    H, D = x.shape[1], x.shape[3]
    if arrays.library_of(x) == "torch":
        import torch

        pages = x[torch.as_tensor(seq.pages, device=x.device)].permute(1, 0, 2, 3)
    else:
        pages = x[seq.pages].transpose(1, 0, 2, 3)  # [H, n_pages, page_size, D]
    return pages.reshape(H, -1, D)[:, :seq.lk]


def seq_summaries(bk: Any, seq: Seq, block_size: int, page_size: int) -> Any:
    """Sequence ``seq``'s block_keys, [Hkv, n_blocks, D]."""
    nb = ceil_div(seq.lk, block_size)
    if seq.pages is None:
        return bk[seq.kb, :, seq.nb0:seq.nb0 + nb]
    return seq_keys(bk, Seq(0, 0, 0, nb, 0, 0, seq.pages, 0))


def padded_selections(picked: Sequence[tuple[Seq, Any]], B: int, Hkv: int, Lq: int,
                      full: Callable[[tuple[int, int, int, int]], Any]) -> Any:
    """The sequences' selections (``picked``: (sequence, [Hkv, lq, n]) pairs) at their rows of
    the call's layout [B, Hkv, Lq, width], -1 padded to the widest; ``full(shape)`` makes the
    -1 filled int64 array in the caller's library and device."""
    width = max((x.shape[-1] for _, x in picked), default=0)
    out = full((B, Hkv, Lq, width))
    for seq, x in picked:
        out[seq.b, :, seq.q0:seq.q0 + seq.lq, :x.shape[-1]] = x
    return out
