"""Top-k selection, checked as DESIGN.md section 5 says: a returned selection is valid when it
is well formed, holds the forced own block and only candidate blocks, has the right count, and
no unselected candidate outscores a selected one by more than the score tolerance (so near-ties
never fail); the output is then judged against the reference computed *with that selection*.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from dshal import reference
from dshal_conformance import tolerance as tol
from dshal_conformance.gates import finite_abs, first_index


def as_mask(indices: np.ndarray, nb: int) -> np.ndarray:
    """int [..., n] block indices (-1 ignored) -> bool [..., nb]."""
    mask = np.zeros((*indices.shape[:-1], nb + 1), bool)
    np.put_along_axis(mask, np.where(indices < 0, nb, indices), True, axis=-1)
    return mask[..., :nb]


def format_problem(sel: np.ndarray, nb: int) -> str:
    """'' when ``sel`` is sorted ascending, in range and -1 padded at the end."""
    if sel.size == 0:
        return ""
    outside = (sel < -1) | (sel >= nb)
    if outside.any():
        return f"indices hold values outside [-1, {nb - 1}] (at {first_index(outside)})"
    used = sel >= 0
    if (~used[..., :-1] & used[..., 1:]).any():
        return "indices are not -1 padded at the end of each row"
    if (used[..., 1:] & (sel[..., 1:] <= sel[..., :-1])).any():
        return ("indices are not sorted strictly ascending "
                f"(at {first_index(used[..., 1:] & (sel[..., 1:] <= sel[..., :-1]))})")
    return ""


def gap(eff: np.ndarray, chosen: np.ndarray, rest: np.ndarray) -> np.ndarray:
    """Worst selected score minus best unselected one, per row (inf when either is empty)."""
    with np.errstate(invalid="ignore"):
        low = np.where(chosen, eff, np.inf).min(axis=-1, initial=np.inf)
        high = np.where(rest, eff, -np.inf).max(axis=-1, initial=-np.inf)
        gap = low - high
    return np.where(np.isnan(gap), np.inf, gap)


@dataclass(frozen=True)
class Geometry:
    """Selection facts of one attention case."""

    scores: np.ndarray  # [B, Hkv, Lq, nb], non-finite as -inf
    tol: np.ndarray  # [B, Hkv, Lq] score tolerance
    cand: np.ndarray  # [Lq, nb]
    own: np.ndarray  # [Lq]
    take: np.ndarray  # [Lq]


def geometry(q: np.ndarray, k: np.ndarray, top_k: Any, bs: int, scale: float, causal: bool,
              u_in: float, u_acc: float, block_keys: np.ndarray | None = None) -> Geometry:
    """Selection facts; scores from ``block_keys`` [B, Hkv, nb, D] when given (DESIGN 3.1a),
    else from the block means."""
    _, Hq, Lq, D = q.shape
    Hkv, Lk = k.shape[1], k.shape[2]
    if block_keys is None:
        scores = reference.selection_scores(q, k, bs, scale)
        size = reference.selection_scores(finite_abs(q), finite_abs(k), bs, abs(scale))
    else:
        scores = reference.summary_scores(q, block_keys, scale)
        size = reference.summary_scores(finite_abs(q), finite_abs(block_keys), abs(scale))
    g = Hq // Hkv
    row_tol = tol.C_SCORE * (u_in + u_acc * math.sqrt(D + g + bs)) * size.max(
        axis=-1, initial=0.0)
    cand = reference.attention_candidates(Lq, Lk, bs, causal)
    return Geometry(np.where(np.isfinite(scores), scores, -np.inf), row_tol, cand,
                     reference.own_block(Lq, Lk, bs),
                     np.asarray(reference.resolve_count(top_k, cand.sum(axis=-1))))


def problems(sel: np.ndarray, geo: Geometry) -> list[str]:
    """Why a returned selection is not a valid top-k selection (DESIGN 3.1 and 5)."""
    nb = geo.cand.shape[1]
    problem = format_problem(sel, nb)
    if problem:
        return [f"selection: {problem}"]
    mask = as_mask(sel, nb)
    own_hot = np.arange(nb)[None, :] == geo.own[:, None]  # [Lq, nb]
    rows = "[batch, kv head, query]"
    found = []
    missing = (geo.own >= 0) & ~(mask & own_hot).any(axis=-1)
    if missing.any():
        found.append(f"selection: the forced own block is missing in {int(missing.sum())} rows, "
                     f"first {rows} = {first_index(missing)}")
    stray = mask & ~geo.cand & ~own_hot
    if stray.any():
        found.append(f"selection: {int(stray.any(-1).sum())} rows select a block that is not a "
                     f"candidate (not fully visible), first [.., block] = {first_index(stray)}")
    count = (mask & geo.cand).sum(axis=-1)
    wrong = count != geo.take
    if wrong.any():
        at = tuple(np.argwhere(wrong)[0])
        found.append(f"selection: {int(wrong.sum())} rows select the wrong number of blocks, "
                     f"first {rows} = {list(map(int, at))}: {int(count[at])} instead of "
                     f"{int(geo.take[at[-1]])}")
    margin = gap(geo.scores, mask & geo.cand, geo.cand & ~mask)
    bad = margin < -geo.tol
    if bad.any():
        at = tuple(np.argwhere(bad)[0])
        found.append(f"selection: {int(bad.sum())} rows leave a candidate unselected that "
                     f"outscores a selected one by {float(-margin[at]):.3g} (> tolerance "
                     f"{float(geo.tol[at]):.3g}), first {rows} = {list(map(int, at))}")
    return found




def ambiguous(blocks: np.ndarray, geo: Geometry) -> np.ndarray:
    """[B, Hkv, Lq]: rows whose top-k cut in ``blocks`` is a near-tie (within tolerance)."""
    chosen = as_mask(blocks, geo.cand.shape[1])
    return gap(geo.scores, chosen & geo.cand, geo.cand & ~chosen) <= geo.tol


def differs_from(returned: np.ndarray, given: np.ndarray, nb: int) -> bool:
    """Returned indices are not the caller's (sorted, deduplicated, -1 padded)."""
    want = as_mask(reference.normalize_indices(given, nb), nb)
    return (returned.shape[:3] != want.shape[:3] or bool(format_problem(returned, nb))
            or not np.array_equal(as_mask(returned, nb), want))
