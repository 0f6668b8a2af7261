"""Inputs in the 3.1a forms built from per-sequence contiguous arrays, so that every form can be
compared with the contiguous call on each sequence (the definition of the forms)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class Ragged:
    """S sequences: queries qs[s] [Hq, lq_s, D], keys ks[s] / values vs[s] [Hkv, lk_s, D]."""

    qs: list[np.ndarray]
    ks: list[np.ndarray]
    vs: list[np.ndarray]

    @property
    def cu_q(self) -> np.ndarray:
        return np.concatenate(([0], np.cumsum([q.shape[1] for q in self.qs]))).astype(np.int32)

    @property
    def cu_k(self) -> np.ndarray:
        return np.concatenate(([0], np.cumsum([k.shape[1] for k in self.ks]))).astype(np.int32)

    def packed(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """q [1, Hq, Tq, D], k [1, Hkv, Tk, D], v [1, Hkv, Tk, Dv]."""
        return tuple(np.concatenate(xs, axis=1)[None] for xs in (self.qs, self.ks, self.vs))

    def paged(self, page_size: int, rng: np.random.Generator, spare: int = 3,
              extra_cols: int = 1, garbage: float = np.nan
              ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """(k pool, v pool, block_table int32, seqlens_k int32): pages in shuffled pool order,
        ``garbage`` in unused slots, unused pages and unused table entries (out of range)."""
        lens = [k.shape[1] for k in self.ks]
        used = [-(-n // page_size) for n in lens]
        P = sum(used) + spare
        Hkv, D, Dv = self.ks[0].shape[0], self.ks[0].shape[2], self.vs[0].shape[2]
        kp = np.full((P, Hkv, page_size, D), garbage, self.ks[0].dtype)
        vp = np.full((P, Hkv, page_size, Dv), garbage, self.vs[0].dtype)
        order = rng.permutation(P)
        table = np.full((len(lens), max(used, default=0) + extra_cols), P + 7, np.int32)
        c = 0
        for s, n in enumerate(lens):
            for j in range(used[s]):
                page = order[c]
                c += 1
                table[s, j] = page
                a, z = j * page_size, min(n, (j + 1) * page_size)
                kp[page, :, :z - a] = self.ks[s][:, a:z]
                vp[page, :, :z - a] = self.vs[s][:, a:z]
        return kp, vp, table, np.array(lens, np.int32)


def ragged(lq: list[int], lk: list[int], *, Hq: int = 4, Hkv: int = 2, D: int = 16,
           Dv: int = 16, seed: int = 0, dtype=np.float32) -> Ragged:
    rng = np.random.default_rng(seed)
    return Ragged([rng.standard_normal((Hq, n, D)).astype(dtype) for n in lq],
                  [rng.standard_normal((Hkv, n, D)).astype(dtype) for n in lk],
                  [rng.standard_normal((Hkv, n, Dv)).astype(dtype) for n in lk])


def block_means(k: np.ndarray, block_size: int) -> np.ndarray:
    """[..., H, L, D] -> [..., H, ceil(L / bs), D] block means (float64, then k's dtype)."""
    L = k.shape[-2]
    nb = -(-L // block_size)
    out = np.zeros((*k.shape[:-2], nb, k.shape[-1]))
    for b in range(nb):
        out[..., b, :] = k[..., b * block_size:(b + 1) * block_size, :].astype(np.float64
                                                                             ).mean(axis=-2)
    return out.astype(k.dtype)


def paged_block_keys(kp: np.ndarray, table: np.ndarray, seqlens: np.ndarray, block_size: int
                     ) -> np.ndarray:
    """block_keys [P, Hkv, page_size // bs, D]: the means of each used page's blocks over the
    keys in use; unused blocks hold NaN."""
    P, Hkv, ps, D = kp.shape
    bk = np.full((P, Hkv, ps // block_size, D), np.nan, kp.dtype)
    for s, n in enumerate(seqlens):
        for j in range(-(-int(n) // ps)):
            page = table[s, j]
            keys = kp[page, :, :min(ps, int(n) - j * ps)]
            m = block_means(keys, block_size)
            bk[page, :, :m.shape[1]] = m
    return bk
