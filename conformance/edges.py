"""NaN/Inf at mask edges: poison keys and values that some queries may attend and their
neighbours may not, and weights of channels open in some rows and closed in others.

``nan-outside`` (:mod:`.data`) poisons only keys no query may see, which a tiled kernel never
loads. A kernel that computes a whole tile and masks by multiplying (``0 * NaN``) passes it but
leaks here: a query whose window, causal diagonal or block selection excludes a poisoned key
shares a tile with one that includes it. The reference gives NaN where a query really attends a
poisoned key and a finite result elsewhere; the operator's usual check (:mod:`.checks`) then
requires the same NaN positions.

Keys are poisoned greedily, fewest attending queries first, so that every query attends at most
one poisoned key: most rows stay finite and each poisoned key has masked neighbours.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from dshal import reference
from dshal_conformance import data
from dshal_conformance.cases import Case

RULES = ("nan-edges",)

#: (scenario, attention shape and options): window edges, the causal diagonal, selected vs
#: unselected blocks, caller indices
ATTENTION: tuple[tuple[str, dict[str, Any]], ...] = (
    ("nan-edges-window", dict(Hq=2, Hkv=1, Lq=64, Lk=64, D=16, opts=dict(window=4))),
    ("nan-edges-window-causal", dict(Hq=4, Hkv=2, Lq=40, Lk=96, D=16,
                                     opts=dict(window=5, causal=True, return_lse=True))),
    ("nan-edges-causal", dict(Hq=2, Hkv=1, Lq=80, Lk=80, D=16,
                              opts=dict(causal=True, return_lse=True))),
    ("nan-edges-topk", dict(Hq=4, Hkv=2, Lq=64, Lk=256, D=16,
                            opts=dict(top_k=2, block_size=16, causal=True,
                                      return_indices=True))),
    ("nan-edges-indices", dict(B=2, Hq=2, Hkv=1, Lq=24, Lk=128, D=16,
                               opts=dict(block_size=16, indices="random"))),
)

#: gated_channels with row gates: channels open in some rows and closed in others
GATED: tuple[tuple[str, dict[str, Any]], ...] = (
    ("nan-edges-rows-weight", dict(lead=[12], C=24, Cout=16, row_gates=True, bias=True,
                                   opts=dict(return_mask=True))),
    ("nan-edges-rows-x", dict(lead=[3, 5], C=20, row_gates=True,
                              opts=dict(mode="soft_hard", threshold=0.5))),
)


def cases() -> list[Case]:
    """The mask-edge cases; each layout with one dtype (rotating), all in ``--quick``."""
    out = []
    floats = ("float32", "bfloat16", "float16")
    for i, (name, spec) in enumerate(ATTENTION):
        dtype = floats[i % 3]
        out.append(Case(f"sparse_attention/{name}/{dtype}", "sparse_attention", dtype, "fixed",
                        {"rule": "nan-edges", "B": 1, **spec, "dtype": dtype}))
    for i, (name, spec) in enumerate(GATED):
        dtype = floats[i % 3]
        out.append(Case(f"gated_channels/{name}/{dtype}", "gated_channels", dtype, "fixed",
                        {"rule": "nan-edges", **spec, "dtype": dtype}))
    return out


def _greedy_keys(allowed: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """bool [Lk]: keys to poison for one [Lq, Lk] mask: keys some query attends and another
    does not, fewest attending queries first, no query attending two of them."""
    seen_by = allowed.sum(axis=0)
    edge = (seen_by > 0) & (seen_by < allowed.shape[0])
    order = np.lexsort((rng.random(allowed.shape[1]), seen_by))
    spoiled = np.zeros(allowed.shape[0], bool)
    chosen = np.zeros(allowed.shape[1], bool)
    for j in order:
        if edge[j] and not spoiled[allowed[:, j]].any():
            chosen[j] = True
            spoiled |= allowed[:, j]
    return chosen


def _attention(p: dict[str, Any], rng: np.random.Generator) -> data.Call:
    call = data.attention({**p, "data": "normal"}, rng)
    q, k, v = (np.array(a) for a in call.args)
    opts = call.kwargs
    B, Hkv, Lk, D = k.shape
    Lq, bs = q.shape[2], opts.get("block_size", 64)
    causal = opts.get("causal", False)
    selection = opts.get("indices")
    if opts.get("top_k") is not None:  # poisoning values only keeps the selection unchanged
        scores = reference.selection_scores(q, k, bs, 1.0 / np.sqrt(D))
        selection = reference.select_blocks(scores, opts["top_k"], Lq, Lk, bs, causal)
    allowed = reference.allowed_mask(Lq, Lk, B=B, Hkv=Hkv, block_size=bs,
                                     window=opts.get("window", 0), causal=causal,
                                     indices=selection)
    specials = np.array([np.nan, np.inf, -np.inf])
    for b in range(B):
        for t in range(Hkv):
            keys = np.flatnonzero(_greedy_keys(allowed[b, t], rng))
            for n, j in enumerate(keys):
                v[b, t, j, n % max(1, v.shape[-1])] = specials[n % 3]
                if opts.get("top_k") is None and n % 2:
                    k[b, t, j, 0] = specials[(n // 2) % 3]
    return data.Call((q, k, v), opts)


def _gated(p: dict[str, Any], rng: np.random.Generator) -> data.Call:
    call = data.gated({**p, "data": "normal"}, rng)
    x, logits = (np.array(a) for a in call.args)
    kw = dict(call.kwargs)
    is_open = reference.gate_open(logits, mode=kw.get("mode", "hard"),
                                  threshold=kw.get("threshold", 0.0), keep=kw.get("keep"))
    width = is_open.shape[-1]
    rows = is_open.reshape(-1, width)
    edge = rows.any(axis=0) & ~rows.all(axis=0)
    if "weight" in kw:  # an edge channel's weights: NaN where open, must stay 0 where closed
        w = np.array(kw["weight"])
        for n, c in enumerate(np.flatnonzero(edge)[::2]):
            w[c, n % w.shape[1]] = (np.nan, np.inf, -np.inf)[n % 3]
        kw["weight"] = w
    else:  # x where its channel is closed in that row (and open in another row)
        closed_here = ~is_open & edge
        x[closed_here] = np.where(np.arange(int(closed_here.sum())) % 2, np.inf, np.nan)
    return data.Call((x, logits), kw)


def build(p: dict[str, Any], rng: np.random.Generator) -> data.Call:
    """The inputs of a mask-edge case."""
    return _attention(p, rng) if "Hq" in p else _gated(p, rng)


def problems(p: dict[str, Any], call: data.Call, result: Any) -> list[str]:
    """Nothing beyond the operator's check, which requires the reference's NaN positions."""
    return []
