"""A paged KV cache for serving loops: page pools, in-place appends, block summaries, freeing.

:class:`PagedKVCache` is what a serving loop needs around ``sparse_attention``'s paged form
(DESIGN 3.1a), at library size (FlashInfer's ``append_paged_kv_cache`` plus a block manager):

- page pools ``k_pages`` / ``v_pages`` [P, Hkv, page_size, D] and ``block_keys``
  [P, Hkv, page_size // block_size, D], allocated once in numpy or torch on the caller's device;
- :meth:`~PagedKVCache.append` writes a sequence's new keys and values into its pages in place
  (a prompt), :meth:`~PagedKVCache.append_step` one token for each of a batch of sequences (a
  decode step, no per-sequence array work), taking pages from the free list as sequences grow;
- ``block_keys`` holds the mean key of every filled (or partly filled) block, kept current
  incrementally: a running sum per block, updated with the new keys only, divided by the
  block's count, so decode never re-reads the cache to rank its blocks;
- :meth:`~PagedKVCache.free` returns a sequence's pages; :meth:`~PagedKVCache.attention_args`
  gives ``block_table``, ``seqlens_k`` and ``block_keys`` for a batch of sequences.

Bookkeeping (page lists, lengths) is host Python; array writes run where the pools live.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from dshal.dtypes import FLOAT_DTYPES, numpy_dtype
from dshal.errors import DshalValueError
from dshal.validate import check_choice, check_int

__all__ = ["PagedKVCache"]


@dataclass
class _Pages:
    pages: list[int] = field(default_factory=list)
    length: int = 0


class _Lib:
    """The few array operations the cache needs, in numpy or torch on one device."""

    def __init__(self, library: str, device: Any) -> None:
        self.torch = library == "torch"
        self.device = device
        if self.torch:
            import torch

            self.mod = torch

    def zeros(self, shape: tuple[int, ...], dtype: str) -> Any:
        if self.torch:
            return self.mod.zeros(shape, dtype=getattr(self.mod, dtype), device=self.device)
        return np.zeros(shape, numpy_dtype(dtype))

    def index(self, values: Sequence[int]) -> Any:
        if self.torch:
            return self.mod.as_tensor(list(values), dtype=self.mod.int64, device=self.device)
        return np.asarray(values, np.int64)

    def host_array(self, values: Sequence[Any] | np.ndarray, dtype: str = "int32") -> Any:
        """Small host values as an array of this library on the cache's device."""
        a = np.asarray(values, numpy_dtype(dtype))
        return self.mod.from_numpy(a).to(self.device) if self.torch else a

    def where(self, cond: Any, a: Any, b: Any) -> Any:
        return self.mod.where(cond, a, b) if self.torch else np.where(cond, a, b)

    def float32(self, x: Any) -> Any:
        return x.to(self.mod.float32) if self.torch else x.astype(np.float32)

    def sum_rows(self, x: Any) -> Any:
        """Sum over dim -2 in float32 (keys -> block sums)."""
        return self.float32(x).sum(-2)

    def like(self, x: Any, pool: Any) -> Any:
        """``x`` (no grad) in the pool's dtype and on its device."""
        if self.torch:
            return x.detach().to(device=pool.device, dtype=pool.dtype)
        return np.asarray(x).astype(pool.dtype, copy=False)


class PagedKVCache:
    """Page pools of a paged KV cache and their block summaries (see the module docstring).

    :param num_pages: P, pages in each pool.
    :param page_size: keys per page (a multiple of ``block_size``).
    :param kv_heads: Hkv.
    :param head_dim: D of the keys; ``value_dim`` Dv of the values (default D).
    :param block_size: the selection block size the summaries are for.
    :param dtype: of the key/value pools (``block_keys`` are float32).
    :param library: ``"numpy"`` or ``"torch"``; ``device`` the torch device of the pools.
    """

    def __init__(self, num_pages: int, page_size: int, kv_heads: int, head_dim: int, *,
                 value_dim: int | None = None, block_size: int = 64, dtype: str = "float32",
                 library: str = "numpy", device: Any = None) -> None:
        P = check_int("num_pages", num_pages, minimum=1)
        self.page_size = check_int("page_size", page_size, minimum=1)
        self.block_size = check_int("block_size", block_size, minimum=1)
        if page_size % block_size:
            raise DshalValueError(f"page_size ({page_size}) must be a multiple of block_size "
                                  f"({block_size})")
        H = check_int("kv_heads", kv_heads, minimum=1)
        D = check_int("head_dim", head_dim, minimum=1)
        Dv = D if value_dim is None else check_int("value_dim", value_dim, minimum=1)
        dtype = check_choice("dtype", str(dtype).removeprefix("torch."), FLOAT_DTYPES)
        self._lib = _Lib(check_choice("library", library, ("numpy", "torch")), device)
        per = page_size // block_size
        self.k_pages = self._lib.zeros((P, H, page_size, D), dtype)
        self.v_pages = self._lib.zeros((P, H, page_size, Dv), dtype)
        self.block_keys = self._lib.zeros((P, H, per, D), "float32")
        self._sums = self._lib.zeros((P, H, per, D), "float32")
        self._free = list(range(P - 1, -1, -1))  # a stack: page 0 is taken first
        self._seqs: dict[int, _Pages] = {}
        self._next_id = 0

    # --- sequences ----------------------------------------------------------------------------

    def add_sequence(self) -> int:
        """A new, empty sequence; returns its id."""
        sid = self._next_id
        self._next_id += 1
        self._seqs[sid] = _Pages()
        return sid

    def free(self, seq: int) -> None:
        """Return the sequence's pages to the pool and forget it."""
        self._free.extend(reversed(self._get(seq).pages))
        del self._seqs[seq]

    def length(self, seq: int) -> int:
        """Keys stored for ``seq``."""
        return self._get(seq).length

    @property
    def free_pages(self) -> int:
        return len(self._free)

    def _get(self, seq: int) -> _Pages:
        try:
            return self._seqs[seq]
        except KeyError:
            raise DshalValueError(f"seq={seq!r} is not a live sequence of this cache (live: "
                                  f"{sorted(self._seqs)})") from None

    def _reserve(self, entry: _Pages, new_length: int) -> None:
        need = -(-new_length // self.page_size) - len(entry.pages)
        if need > len(self._free):
            raise DshalValueError(f"the cache has {len(self._free)} free pages, {need} more are "
                                  f"needed to hold {new_length} keys (num_pages is too small)")
        for _ in range(need):
            entry.pages.append(self._free.pop())

    # --- writes -------------------------------------------------------------------------------

    def append(self, seq: int, k: Any, v: Any) -> None:
        """Append ``k`` [Hkv, n, D] and ``v`` [Hkv, n, Dv] to ``seq`` (a prompt or a chunk)."""
        entry = self._get(seq)
        k, v = self._lib.like(k, self.k_pages), self._lib.like(v, self.v_pages)
        self._check_rows("k", k, 3, self.k_pages)
        self._check_rows("v", v, 3, self.v_pages)
        n = k.shape[1]
        if v.shape[1] != n:
            raise DshalValueError(f"k and v must hold as many tokens: k {n}, v {v.shape[1]}")
        start = entry.length
        self._reserve(entry, start + n)
        ps, bs = self.page_size, self.block_size
        pos = start
        while pos < start + n:
            page, slot = entry.pages[pos // ps], pos % ps
            take = min(ps - slot, start + n - pos)
            a = pos - start
            self.k_pages[page, :, slot:slot + take] = k[:, a:a + take]
            self.v_pages[page, :, slot:slot + take] = v[:, a:a + take]
            # the blocks this write touched: their sums from the page (at most a block re-read
            # besides the new keys, for a block that was partly filled)
            b0, b1 = slot // bs, -(-(slot + take) // bs)
            for blk in range(b0, b1):
                lo, hi = blk * bs, min((blk + 1) * bs, slot + take)
                total = self._lib.sum_rows(self.k_pages[page, :, lo:hi])
                self._sums[page, :, blk] = total
                self.block_keys[page, :, blk] = total / (hi - lo)
            pos += take
        entry.length = start + n

    def append_step(self, seqs: Sequence[int], k: Any, v: Any) -> None:
        """Append one token to each of ``seqs``: ``k`` [B, Hkv, D] or [B, Hkv, 1, D] (and v),
        written and summarised for the whole batch at once (a decode step)."""
        entries = [self._get(s) for s in seqs]
        if len(set(seqs)) != len(seqs):
            raise DshalValueError("seqs must not repeat a sequence in one step")
        k, v = self._lib.like(k, self.k_pages), self._lib.like(v, self.v_pages)
        if k.ndim == 4:
            k, v = k[:, :, 0], v[:, :, 0]
        self._check_rows("k", k, 3, self.k_pages, batch=len(seqs))
        self._check_rows("v", v, 3, self.v_pages, batch=len(seqs))
        for e in entries:
            self._reserve(e, e.length + 1)
        lengths = [e.length for e in entries]
        ps, bs = self.page_size, self.block_size
        pages = self._lib.index([e.pages[n // ps] for e, n in zip(entries, lengths)])
        slots = self._lib.index([n % ps for n in lengths])
        blocks = self._lib.index([n % ps // bs for n in lengths])
        self.k_pages[pages, :, slots] = k
        self.v_pages[pages, :, slots] = v
        counts = self._lib.host_array([n % bs + 1 for n in lengths], "float32")[:, None, None]
        # a block's first key starts its sum afresh (the page may hold an old sequence's)
        more = self._lib.host_array([n % bs > 0 for n in lengths], "bool")[:, None, None]
        new = self._lib.float32(k)
        sums = self._lib.where(more, self._sums[pages, :, blocks] + new, new)
        self._sums[pages, :, blocks] = sums
        self.block_keys[pages, :, blocks] = sums / counts
        for e in entries:
            e.length += 1

    def _check_rows(self, name: str, x: Any, ndim: int, pool: Any, batch: int | None = None
                    ) -> None:
        H, D = pool.shape[1], pool.shape[3]
        ok = x.ndim == ndim and x.shape[-1] == D and x.shape[-2 if batch is not None else 0] == H
        if batch is not None:
            ok = ok and x.shape[0] == batch
        if not ok:
            want = f"[{batch}, {H}, {D}]" if batch is not None else f"[{H}, n, {D}]"
            raise DshalValueError(f"{name} must have shape {want}, got {list(x.shape)}")

    # --- reads --------------------------------------------------------------------------------

    def attention_args(self, seqs: Sequence[int]) -> dict[str, Any]:
        """``block_table`` (int32 [B, max_pages], -1 past each sequence's pages), ``seqlens_k``
        (int32 [B]) and ``block_keys`` for ``sparse_attention`` on the sequences ``seqs``."""
        entries = [self._get(s) for s in seqs]
        width = max((len(e.pages) for e in entries), default=0)
        table = np.full((len(entries), width), -1, np.int32)
        for r, e in enumerate(entries):
            table[r, :len(e.pages)] = e.pages
        return {"block_table": self._lib.host_array(table),
                "seqlens_k": self._lib.host_array([e.length for e in entries]),
                "block_keys": self.block_keys}

    def contiguous(self, seq: int) -> tuple[Any, Any]:
        """The sequence's keys and values gathered in order, [Hkv, length, D] (a copy)."""
        e = self._get(seq)
        parts_k = [self.k_pages[p] for p in e.pages]
        parts_v = [self.v_pages[p] for p in e.pages]
        if self._lib.torch:
            cat = self._lib.mod.cat
            k = cat(parts_k, dim=1) if parts_k else self.k_pages[:0].reshape(
                self.k_pages.shape[1], 0, self.k_pages.shape[3])
            v = cat(parts_v, dim=1) if parts_v else self.v_pages[:0].reshape(
                self.v_pages.shape[1], 0, self.v_pages.shape[3])
        else:
            H = self.k_pages.shape[1]
            k = np.concatenate(parts_k, axis=1) if parts_k else \
                np.zeros((H, 0, self.k_pages.shape[3]), self.k_pages.dtype)
            v = np.concatenate(parts_v, axis=1) if parts_v else \
                np.zeros((H, 0, self.v_pages.shape[3]), self.v_pages.dtype)
        return k[:, :e.length], v[:, :e.length]

    def block_summaries(self, seq: int) -> Any:
        """The sequence's block_keys in order, [Hkv, n_blocks, D] (the contiguous form's)."""
        e = self._get(seq)
        nb = -(-e.length // self.block_size)
        parts = [self.block_keys[p] for p in e.pages]
        if not parts:
            return self.block_keys[0, :, :0]
        cat = self._lib.mod.cat(parts, dim=1) if self._lib.torch else np.concatenate(parts, 1)
        return cat[:, :nb]
