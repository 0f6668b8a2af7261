"""Exact rules no error bound can enforce: output rounding, int8 exactness, exact ties.

The element and aggregate gates accept any result within a few ulps, so a rule that decides
*which* of two neighbouring results is right is never enforced by them: rounding to nearest
even (not truncation, not half away from zero), int8 sums computed exactly, top-k and ``keep``
ties sent to the lower index. Each case here builds inputs where the rule is observable
exactly and requires it bit for bit:

- ``round-output``: gemm of small integers (every float32 partial sum is an exact integer) to
  a bfloat16/float16 output, and attention whose queries are zero over a window of two keys
  (the float32 result is the exact mean of two values of the input dtype): the output must be
  the float64 result rounded to nearest even in the output dtype.
- ``int8-exact``: an unscaled int8 gemm at K = 65536 with partial sums far beyond 2**24: the
  output must be the exact integer product rounded once to float32 (DESIGN 3.2).
- ``topk-ties``: every key block a copy of the first, so all block scores tie exactly: the
  returned selection must be the reference's (ties to the lower block index).
- ``forms-topk-ties``: the same in the 3.1a forms (:mod:`.forms`; decode and short queries take
  the batched paths of serving backends): paged decode and varlen calls whose block_keys rows
  are equal, one NaN and one inf row among them (non-finite scores rank last); queries and
  summaries are small integers, so every score is exact in any summation order.
- ``keep-ties``: all gate logits equal: ``keep`` must open the lowest channel indices.

Quantisation ties (values exactly halfway between two codes at a power-of-two scale) are
required exactly by :func:`dshal_conformance.checks.check_quantize` on ``quantize/ties``.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from dshal import reference
from dshal.dtypes import numpy_dtype
from dshal_conformance import forms
from dshal_conformance.cases import Case
from dshal_conformance.data import Call, _cast

#: int8-exact's depth: float32 accumulation of its sums (about 8e8) rounds
INT8_EXACT_K = 65536


def cases() -> list[Case]:
    """The fixed cases of the exact rules (all cheap: every one runs in ``--quick``)."""
    out = []
    for dtype in ("bfloat16", "float16"):
        out.append(Case(f"gemm/round-out-{dtype}/fp32", "gemm", "fp32", "fixed",
                        {"rule": "round-output", "dtype": "float32", "M": 16, "K": 32, "N": 24,
                         "out_dtype": dtype, "precision": "fp32"}))
        out.append(Case(f"sparse_attention/round-pairs/{dtype}", "sparse_attention", dtype,
                        "fixed", {"rule": "round-output", "dtype": dtype, "B": 1, "Hq": 4,
                                  "Hkv": 2, "Lq": 96, "Lk": 96, "D": 16,
                                  "opts": {"window": 2, "causal": True}}))
    out.append(Case("gemm/int8-exact-k65536/int8", "gemm", "int8", "fixed",
                    {"rule": "int8-exact", "dtype": "float32", "M": 3, "K": INT8_EXACT_K,
                     "N": 4, "prequant": "int8"}))
    for dtype in ("float32", "bfloat16", "float16"):
        out.append(Case(f"sparse_attention/topk-exact-ties/{dtype}", "sparse_attention", dtype,
                        "fixed", {"rule": "topk-ties", "dtype": dtype, "B": 1, "Hq": 4,
                                  "Hkv": 2, "Lq": 80, "Lk": 128, "D": 16,
                                  "opts": {"top_k": 2, "block_size": 16, "causal": True,
                                           "return_indices": True}}))
    for dtype in ("float32", "bfloat16", "float16"):
        for form, lq in (("paged", [1] * 6), ("varlen", [1, 3, 0, 2, 1, 16])):
            out.append(Case(
                f"sparse_attention/{form}-topk-exact-ties/{dtype}", "sparse_attention", dtype,
                "fixed", {"rule": "forms-topk-ties", "form": form, "dtype": dtype, "Hq": 4,
                          "Hkv": 2, "D": 16, "lq": lq, "lk": [100, 5, 0, 129, 64, 144],
                          "page_size": 32, "summaries": "ties", "data": "ties",
                          "opts": {"top_k": 3, "block_size": 16, "window": 8, "causal": True,
                                   "return_indices": True}}))
    out.append(Case("gated_channels/keep-exact-ties/float32", "gated_channels", "float32",
                    "fixed", {"rule": "keep-ties", "dtype": "float32", "lead": [5], "C": 24,
                              "opts": {"keep": 7, "return_mask": True}}))
    return out


# --- inputs -----------------------------------------------------------------------------------


def _integers(rng: np.random.Generator, shape: tuple[int, ...], low: int, high: int
              ) -> np.ndarray:
    return rng.integers(low, high + 1, size=shape).astype(np.float64)


def build(p: dict[str, Any], rng: np.random.Generator) -> Call:
    """The inputs of an exact-rule case."""
    rule, dtype = p["rule"], p["dtype"]
    if rule == "round-output" and "out_dtype" in p:
        a = _integers(rng, (p["M"], p["K"]), -64, 64)
        b = _integers(rng, (p["K"], p["N"]), -64, 64)
        return Call((_cast(a, dtype), _cast(b, dtype)),
                    {"precision": p["precision"], "out_dtype": p["out_dtype"]})
    if rule == "int8-exact":
        a = rng.integers(96, 128, size=(p["M"], p["K"]))
        b = rng.integers(96, 128, size=(p["K"], p["N"]))
        a.reshape(-1)[::97] = -128  # the extreme value too (its products stay positive)
        b.reshape(-1)[::89] = -128
        a.reshape(-1)[1::97] = -128
        return Call((a.astype(np.int8), b.astype(np.int8)), {})
    if rule == "forms-topk-ties":
        return forms.build(p, rng)
    if rule == "keep-ties":
        x = rng.standard_normal((*p["lead"], p["C"]))
        logits = np.full((p["C"],), 0.75)
        return Call((_cast(x, dtype), _cast(logits, dtype)), dict(p["opts"]))
    B, Hq, Hkv, Lq, Lk, D = (p[n] for n in ("B", "Hq", "Hkv", "Lq", "Lk", "D"))
    opts = dict(p["opts"])
    q = rng.standard_normal((B, Hq, Lq, D))
    k = rng.standard_normal((B, Hkv, Lk, D))
    v = rng.standard_normal((B, Hkv, Lk, D))
    if rule == "round-output":  # every allowed score 0: out is the mean of the allowed values
        q[...] = 0.0
    elif rule == "topk-ties":  # every block a copy of the first: all block scores tie
        bs = opts["block_size"]
        k = np.tile(k[:, :, :bs], (1, 1, Lk // bs, 1))
    return Call((_cast(q, dtype), _cast(k, dtype), _cast(v, dtype)), opts)


# --- checks -----------------------------------------------------------------------------------


def _rounded(ref: np.ndarray, dtype: str) -> np.ndarray:
    """``ref`` (float64) rounded to nearest even in ``dtype``, as float64."""
    return ref.astype(numpy_dtype(dtype)).astype(np.float64)


def _first_difference(got: np.ndarray, want: np.ndarray, what: str) -> list[str]:
    got = np.asarray(got).astype(np.float64)
    if got.shape != want.shape:
        return [f"{what}: shape {list(got.shape)} != {list(want.shape)}"]
    bad = ~((got == want) | (np.isnan(got) & np.isnan(want)))
    if not bad.any():
        return []
    at = tuple(int(i) for i in np.argwhere(bad)[0])
    return [f"{what}: {int(bad.sum())} of {bad.size} elements differ, first at {list(at)}: "
            f"{got[at]!r} instead of {want[at]!r}"]


def problems(p: dict[str, Any], call: Call, result: Any) -> list[str]:
    """What an exact-rule case's result breaks (empty when it keeps the rule)."""
    rule = p["rule"]
    if rule == "round-output" and "out_dtype" in p:
        a, b = (np.asarray(x).astype(np.float64) for x in call.args)
        return _first_difference(result, _rounded(a @ b, p["out_dtype"]),
                                 "output not rounded to nearest even (exact float32 products)")
    if rule == "int8-exact":
        a, b = (np.asarray(x).astype(np.int64) for x in call.args)
        exact = (a @ b).astype(np.float64)  # below 2**31: exact in int64 and float64
        return _first_difference(result, _rounded(exact, "float32"),
                                 "int8 products not exact (the integer sum rounded once to "
                                 "float32)")
    if rule == "keep-ties":
        x, logits = call.args
        want = reference.gated_channels(x, logits, keep=call.kwargs["keep"])[1]
        mask = np.asarray(result[1])
        return _first_difference(mask, want.astype(np.float64),
                                 "keep with tied logits must open the lowest channel indices")
    q, k, v = call.args
    o = call.kwargs
    if rule == "forms-topk-ties":
        given = {n: x for n, x in o.items() if not n.startswith("return_")}
        want = reference.sparse_attention(q, k, v, **given)[1]
        return _first_difference(result[1], want.astype(np.float64),
                                 "exactly tied (and non-finite) block scores of a varlen or "
                                 "paged call must select as the reference: ties to the lower "
                                 "block index, non-finite scores last")
    if rule == "round-output":
        ref = reference.sparse_attention(q, k, v, window=o["window"], causal=o["causal"])[0]
        out = result[0] if isinstance(result, tuple) else result
        return _first_difference(out, _rounded(ref, p["dtype"]),
                                 "output not rounded to nearest even (exact float32 means)")
    scale = 1.0 / np.sqrt(q.shape[-1])
    scores = reference.selection_scores(q, k, o["block_size"], scale)
    want = reference.select_blocks(scores, o["top_k"], q.shape[2], k.shape[2],
                                   o["block_size"], o["causal"])
    sel = np.asarray(result[1])
    if sel.shape != want.shape or not np.array_equal(sel, want):
        return _first_difference(sel, want.astype(np.float64),
                                 "exactly tied block scores must select the lower block index")
    return []
