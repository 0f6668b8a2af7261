"""Conformance of the varlen, paged and block_keys forms of sparse_attention (DESIGN 3.1a).

Cases are ragged sets of sequences (``lq``/``lk`` lists: zero-length sequences, sequences
shorter than a block, queries longer than their cache) laid out in a form:

- ``varlen``: packed q/k/v with ``cu_seqlens_q``/``cu_seqlens_k``;
- ``paged``: one query row per sequence (or packed queries with ``cu_seqlens_q``,
  ``paged-varlen``) over page pools whose pages are shuffled, with garbage (NaN, huge values)
  in the slots past ``seqlens_k``, in unused pages and in unused ``block_table`` entries
  (out-of-range page numbers);
- ``contiguous``: an ordinary batch, for ``block_keys`` alone.

``summaries`` adds ``block_keys``: ``means`` (the block means, as a serving cache keeps them),
``random`` (summaries that disagree with the means: the selection must follow them) or ``ties``
(one row repeated, with a NaN and an inf row: exact ties, judged exactly by
:mod:`.exact`'s ``forms-topk-ties``); ``data="ties"`` makes every key block a copy of its
sequence's first (the block means tie exactly).

A result is judged sequence by sequence: each sequence's rows, keys (gathered from its pages)
and summaries form a contiguous call, whose reference and bound terms
(:func:`.checks.attention_terms`) are put back in the packed layout and gated as one output.
"""

from __future__ import annotations

from collections.abc import Iterator
from types import SimpleNamespace
from typing import Any

import numpy as np

from dshal.forms import seq_keys, seq_summaries, sequences
from dshal_conformance import checks, data
from dshal_conformance.cases import FLOATS, Case, _variants
from dshal_conformance.gates import finfo

#: (scenario, parameters): lq/lk per sequence, form, page_size, summaries, data, options
FORMS: tuple[tuple[str, dict[str, Any]], ...] = (
    ("varlen-topk-window", dict(form="varlen", lq=[3, 0, 17, 1, 40], lk=[5, 0, 9, 31, 40],
                                opts=dict(top_k=2, block_size=8, window=4, causal=True,
                                          return_indices=True, return_lse=True))),
    ("varlen-dense-causal", dict(form="varlen", lq=[33, 1, 64, 0, 17], lk=[33, 5, 64, 3, 17],
                                 opts=dict(causal=True, return_lse=True))),
    ("varlen-window", dict(form="varlen", lq=[9, 20, 2], lk=[30, 20, 7],
                           opts=dict(window=5, return_lse=True))),
    ("varlen-fraction", dict(form="varlen", lq=[16, 40], lk=[50, 40],
                             opts=dict(top_k=0.4, block_size=6, return_indices=True))),
    ("varlen-block-keys", dict(form="varlen", lq=[5, 12, 1], lk=[40, 64, 33],
                               summaries="random", opts=dict(top_k=2, block_size=8,
                                                             causal=True,
                                                             return_indices=True))),
    ("varlen-nan-outside", dict(form="varlen", lq=[4, 8], lk=[64, 48], data="nan-outside",
                                opts=dict(top_k=1, block_size=8, window=3, causal=True,
                                          return_indices=True))),
    ("paged-decode", dict(form="paged", lq=[1] * 5, lk=[0, 5, 64, 200, 129], page_size=32,
                          summaries="means", opts=dict(top_k=3, block_size=16, window=16,
                                                       causal=True, return_indices=True,
                                                       return_lse=True))),
    ("paged-decode-means", dict(form="paged", lq=[1] * 3, lk=[77, 3, 130], page_size=32,
                                opts=dict(top_k=2, block_size=16, window=8, causal=True,
                                          return_indices=True))),
    ("paged-decode-block-keys", dict(form="paged", lq=[1] * 4, lk=[100, 64, 250, 17],
                                     page_size=64, summaries="random",
                                     opts=dict(top_k=2, block_size=16, causal=True,
                                               return_indices=True, return_lse=True))),
    ("paged-decode-window", dict(form="paged", lq=[1] * 3, lk=[50, 1, 90], page_size=16,
                                 opts=dict(window=20, block_size=16, causal=True,
                                           return_lse=True))),
    ("paged-mixed", dict(form="paged-varlen", lq=[5, 1, 20, 1, 0], lk=[5, 40, 20, 100, 7],
                         page_size=16, summaries="means",
                         opts=dict(top_k=2, block_size=8, window=8, causal=True,
                                   return_indices=True, return_lse=True))),
    ("paged-prefill-noncausal", dict(form="paged-varlen", lq=[7, 30], lk=[40, 30],
                                     page_size=16, opts=dict(top_k=1, block_size=16,
                                                             window=4, return_lse=True))),
    ("block-keys-contiguous", dict(form="contiguous", lq=[17, 17], lk=[97, 97],
                                   summaries="random", opts=dict(top_k=3, block_size=16,
                                                                 causal=True,
                                                                 return_indices=True))),
    # decode given summaries: NaN/inf in every key and value no query may attend (a backend
    # that ranks from the keys or reads past the allowed ones is caught)
    ("paged-decode-block-keys-nan-outside", dict(form="paged", lq=[1] * 4,
                                                 lk=[90, 33, 200, 64], page_size=32,
                                                 summaries="random", data="nan-outside",
                                                 opts=dict(top_k=2, block_size=16, window=8,
                                                           causal=True, return_indices=True,
                                                           return_lse=True))),
)


def form_cases(first_index: int = 0) -> Iterator[Case]:
    """The fixed cases of the forms (:data:`FORMS` x float dtypes)."""
    for index, (name, spec) in enumerate(FORMS, start=first_index):
        base = {"Hq": 4, "Hkv": 2, "D": 16, **spec}

        def make(dtype: str, base: dict = base) -> dict[str, Any]:
            return {**base, "dtype": dtype}

        yield from _variants("sparse_attention", name, FLOATS, index, make)


# --- inputs -----------------------------------------------------------------------------------


def _garbage(dtype: str) -> np.ndarray:
    """What fills unused slots: NaN, +-inf and the dtype's largest values."""
    big = float(finfo(dtype).max)
    return np.array([np.nan, big, -big, np.inf])


def _cu(xs: list[np.ndarray]) -> np.ndarray:
    return np.concatenate(([0], np.cumsum([x.shape[1] for x in xs]))).astype(np.int32)


def build(p: dict[str, Any], rng: np.random.Generator) -> data.Call:
    """q, k, v and the form's arguments of a case of :data:`FORMS`."""
    Hq, Hkv, D = p["Hq"], p["Hkv"], p["D"]
    Dv, dtype, form = p.get("Dv", D), p["dtype"], p["form"]
    opts = dict(p.get("opts", {}))
    bs = opts.get("block_size", 64)
    cast = data._cast
    qs = [cast(rng.standard_normal((Hq, n, D)), dtype) for n in p["lq"]]
    ks = [cast(rng.standard_normal((Hkv, n, D)), dtype) for n in p["lk"]]
    vs = [cast(rng.standard_normal((Hkv, n, Dv)), dtype) for n in p["lk"]]
    if p.get("data") == "ties":  # small integers: with integer summaries every score is exact
        qs = [cast(rng.integers(-3, 4, q.shape).astype(np.float64), dtype) for q in qs]
    bks = None
    if p.get("summaries") == "ties":
        bks = [cast(_tied_summaries(rng, Hkv, -(-k.shape[1] // bs), D), dtype) for k in ks]
    elif p.get("summaries") == "means":
        bks = [cast(_means(k, bs), dtype) for k in ks]
    elif p.get("summaries") == "random":
        bks = [cast(3 * rng.standard_normal((Hkv, -(-k.shape[1] // bs), D)), dtype) for k in ks]
    if p.get("data") == "nan-outside":
        for s, (q, k, v) in enumerate(zip(qs, ks, vs)):
            o = {**opts, "block_keys": None if bks is None else bks[s][None]}
            data._poison_unreachable(q[None], k[None], v[None], o)
    if form == "contiguous":
        args = (np.stack(qs), np.stack(ks), np.stack(vs))
        if bks is not None:
            opts["block_keys"] = np.stack(bks)
        return data.Call(args, opts)
    if form == "varlen":
        args = tuple(np.concatenate(xs, axis=1)[None] for xs in (qs, ks, vs))
        opts.update(cu_seqlens_q=_cu(qs), cu_seqlens_k=_cu(ks))
        if bks is not None:
            opts["block_keys"] = np.concatenate(bks, axis=1)[None]
        return data.Call(args, opts)
    ps = p["page_size"]
    kp, vp, table, bkp = _pages(ks, vs, bks, ps, bs, dtype, rng)
    opts.update(block_table=table, seqlens_k=np.array(p["lk"], np.int32))
    if bkp is not None:
        opts["block_keys"] = bkp
    if form == "paged-varlen":
        opts["cu_seqlens_q"] = _cu(qs)
        q = np.concatenate(qs, axis=1)[None]
    else:
        q = np.stack(qs)
    return data.Call((q, kp, vp), opts)


def _tied_summaries(rng: np.random.Generator, Hkv: int, nb: int, D: int) -> np.ndarray:
    """[Hkv, nb, D]: one row of small integers repeated (exactly tied scores, exact in any
    summation order with integer queries), blocks 1 and 2 NaN and +inf (non-finite scores rank
    after every finite one)."""
    bk = np.repeat(rng.integers(-3, 4, (Hkv, 1, D)).astype(np.float64), nb, axis=1)
    bk[:, 1:2], bk[:, 2:3] = np.nan, np.inf
    return bk


def _means(k: np.ndarray, bs: int) -> np.ndarray:
    H, L, D = k.shape
    nb = -(-L // bs)
    out = np.zeros((H, nb, D))
    for b in range(nb):
        out[:, b] = k[:, b * bs:(b + 1) * bs].astype(np.float64).mean(axis=1)
    return out


def _pages(ks: list[np.ndarray], vs: list[np.ndarray], bks: list[np.ndarray] | None, ps: int,
           bs: int, dtype: str, rng: np.random.Generator
           ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray | None]:
    """Page pools with shuffled pages, garbage everywhere unused, and the block table."""
    used = [-(-k.shape[1] // ps) for k in ks]
    P = sum(used) + 2
    Hkv, D, Dv = ks[0].shape[0], ks[0].shape[2], vs[0].shape[2]
    junk = _garbage(dtype)
    def fill(shape: tuple[int, ...]) -> np.ndarray:
        return data._cast(junk[rng.integers(0, junk.size, shape)], dtype)

    kp, vp = fill((P, Hkv, ps, D)), fill((P, Hkv, ps, Dv))
    bkp = None if bks is None else fill((P, Hkv, ps // bs, D))
    order = rng.permutation(P)
    table = np.full((len(ks), max(used, default=0) + 1), P + 5, np.int32)
    c = 0
    for s, k in enumerate(ks):
        n = k.shape[1]
        for j in range(used[s]):
            page = order[c]
            c += 1
            table[s, j] = page
            a, z = j * ps, min(n, (j + 1) * ps)
            kp[page, :, :z - a] = k[:, a:z]
            vp[page, :, :z - a] = vs[s][:, a:z]
            if bkp is not None:
                b0, b1 = a // bs, -(-z // bs)
                bkp[page, :, :b1 - b0] = bks[s][:, b0:b1]
    return kp, vp, table, bkp


# --- judging ----------------------------------------------------------------------------------


def check_forms(call: data.Call, result: Any, rng: np.random.Generator) -> checks.Verdict:
    """A varlen or paged result, judged sequence by sequence against the contiguous call."""
    q, k, v = (np.asarray(a) for a in call.args)
    o = call.kwargs
    bs = o.get("block_size", 64)
    out, sel, lse = checks._unpack(result, (bool(o.get("return_indices")),
                                            bool(o.get("return_lse"))))
    layout = SimpleNamespace(q=q, k=k, block_size=bs, **{n: o.get(n) for n in checks.FORM_CALLS})
    B, Hq, Lq, _ = q.shape
    Dv = v.shape[3]
    parts = dict(ref_out=np.zeros((B, Hq, Lq, Dv)), mag=np.zeros((B, Hq, Lq, Dv)),
                 pv2=np.zeros((B, Hq, Lq, Dv)), n_keys=np.zeros((B, Hq, Lq), np.int64),
                 delta=np.zeros((B, Hq, Lq)), p_max=np.zeros((B, Hq, Lq)),
                 ref_lse=np.full((B, Hq, Lq), -np.inf), ignore=np.zeros((B, Hq, Lq), bool))
    problems, notes = [], []
    plain = {n: x for n, x in o.items()
             if n not in (*checks.FORM_CALLS, "block_keys", "indices")}
    for n, s in enumerate(sequences(layout)):
        rows = slice(s.q0, s.q0 + s.lq)
        sub = dict(plain)
        if o.get("block_keys") is not None:
            sub["block_keys"] = seq_summaries(np.asarray(o["block_keys"]), s, bs, k.shape[2])[None]
        if o.get("indices") is not None:
            sub["indices"] = np.asarray(o["indices"])[s.b:s.b + 1, :, rows]
        seq_sel = None if sel is None else sel[s.b:s.b + 1, :, rows]
        t = checks.attention_terms(q[s.b:s.b + 1, :, rows], seq_keys(k, s)[None],
                                   seq_keys(v, s)[None], sub, seq_sel)
        for name, arr in parts.items():
            got = getattr(t, name)
            if got is not None:
                arr[s.b, :, rows] = got[0]
        problems += [f"sequence {n}: {x}" for x in t.problems]
        notes += [f"sequence {n}: {x}" for x in t.notes]
    terms = checks.AttentionTerms(**{**parts, "ignore": parts["ignore"] if parts["ignore"].any()
                                     else None}, problems=problems, notes=notes)
    return checks.attention_verdict(terms, out, lse, checks._dtype(q), rng)
