"""What the suite tests: the :class:`Case` record and the fixed, seeded cases of every operator.

A case is data (op, label, kind, JSON-able parameters); :mod:`.data` turns its parameters into
arrays. Fixed cases cover every edge case DESIGN.md section 5 lists; :mod:`.properties` adds
hypothesis-drawn cases and :mod:`.invalid` the calls that must raise. In ``quick`` mode each
fixed scenario runs with one dtype (rotating through them), in ``full`` mode with all.

Ids are ``<op>/<scenario>/<label>`` (``sparse_attention/causal-cross/float16``); the label is the
dtype (attention, gated_channels) or the precision (gemm, quantize).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from dshal.dtypes import PRECISIONS, QUANTIZED_PRECISIONS

MODES = ("quick", "full")
KINDS = ("fixed", "property", "invalid", "limit")
FLOATS = ("float16", "bfloat16", "float32")


@dataclass(frozen=True)
class Case:
    """One test of one operator.

    :param id: unique, ``<op>/<scenario>/<label>``; ``dshal certify --case ID`` reruns it.
    :param op: the operator.
    :param label: the column of the summary table: dtype or precision.
    :param kind: ``fixed``, ``property`` (hypothesis), ``invalid`` (must raise) or ``limit``
        (beyond a declared limit: must be refused).
    :param params: JSON-able parameters: shapes, dtype, options, data variant, layout.
    :param quick: part of ``--quick`` runs.
    """

    id: str
    op: str
    label: str
    kind: str
    params: dict[str, Any] = field(hash=False)
    quick: bool = True

    def summary(self) -> dict[str, Any]:
        """The parameters as a certificate records them."""
        return {"id": self.id, "op": self.op, "label": self.label, "kind": self.kind,
                "params": self.params}


def _variants(op: str, name: str, labels: Sequence[str], index: int, make: Any,
              quick: str = "rotate") -> Iterator[Case]:
    """One case per label. In quick mode: ``rotate`` runs the one label ``index`` rotates to,
    ``all`` every label (scenarios whose bug hides in one precision), ``none`` no label
    (large shapes, full mode only)."""
    for i, label in enumerate(labels):
        chosen = quick == "all" or (quick == "rotate" and i == index % len(labels))
        yield Case(f"{op}/{name}/{label}", op, label, "fixed", make(label), quick=chosen)


# --- sparse_attention -------------------------------------------------------------------------

#: (scenario, shape and options); shape keys B, Hq, Hkv, Lq, Lk, D, Dv; every other key is an
#: option of the call, except data / layout / dtypes
ATTENTION: tuple[tuple[str, dict[str, Any]], ...] = (
    ("dense", dict(B=2, Hq=4, Hkv=4, Lq=97, Lk=97, D=64)),
    ("dense-causal-gqa2", dict(Hq=4, Hkv=2, Lq=129, Lk=129, D=64, causal=True,
                               return_lse=True)),
    ("causal-cross", dict(Hq=4, Hkv=2, Lq=17, Lk=129, D=32, causal=True, return_lse=True)),
    ("causal-more-queries", dict(Hq=2, Hkv=1, Lq=129, Lk=17, D=16, causal=True,
                                 return_lse=True)),
    ("decode-dense-gqa8", dict(Hq=8, Hkv=1, Lq=1, Lk=1025, D=64, causal=True)),
    ("decode-topk-gqa8", dict(B=2, Hq=8, Hkv=1, Lq=1, Lk=1025, D=64, top_k=4, block_size=64,
                              causal=True, return_indices=True, return_lse=True)),
    ("topk-gqa8-causal", dict(Hq=16, Hkv=2, Lq=257, Lk=257, D=32, top_k=3, block_size=32,
                              causal=True, return_indices=True)),
    ("topk-fraction", dict(Hq=4, Hkv=2, Lq=97, Lk=97, D=17, top_k=0.3, block_size=17,
                           return_indices=True)),
    ("topk-window-cross", dict(B=2, Hq=4, Hkv=2, Lq=33, Lk=129, D=32, top_k=2, block_size=16,
                               window=8, causal=True, return_indices=True, return_lse=True)),
    ("topk-own-block-only", dict(Hq=2, Hkv=1, Lq=40, Lk=100, D=16, top_k=0, block_size=10,
                                 return_indices=True)),
    ("topk-unreturned", dict(Hq=4, Hkv=1, Lq=64, Lk=256, D=32, top_k=3, block_size=32,
                             causal=True)),
    ("topk-all-is-dense", dict(Hq=2, Hkv=1, Lq=65, Lk=65, D=16, top_k=1000, block_size=8,
                               causal=True, return_indices=True)),
    ("topk-fraction-1", dict(Hq=2, Hkv=2, Lq=30, Lk=50, D=8, top_k=1.0, block_size=7,
                             causal=True, return_indices=True)),
    ("token-level", dict(Hq=2, Hkv=1, Lq=33, Lk=47, D=8, top_k=5, block_size=1, causal=True,
                         return_indices=True)),
    ("ties", dict(Hq=2, Hkv=1, Lq=64, Lk=256, D=16, top_k=4, block_size=16, data="ties",
                  return_indices=True)),
    ("window-1", dict(Hq=2, Hkv=1, Lq=50, Lk=50, D=16, window=1, causal=True)),
    ("window-3", dict(Hq=2, Hkv=1, Lq=20, Lk=50, D=16, window=3)),
    ("window-cross-causal", dict(Hq=2, Hkv=1, Lq=17, Lk=97, D=16, window=16, causal=True,
                                 return_lse=True)),
    ("window-ge-length", dict(Hq=2, Hkv=1, Lq=129, Lk=129, D=16, window=200, causal=True)),
    ("indices", dict(B=2, Hq=4, Hkv=2, Lq=17, Lk=97, D=16, block_size=16, indices="random",
                     window=2, return_indices=True)),
    ("nan-outside-topk", dict(Hq=4, Hkv=2, Lq=32, Lk=256, D=16, top_k=2, block_size=32,
                              causal=True, data="nan-outside", return_indices=True)),
    ("nan-outside-indices", dict(Hq=2, Hkv=1, Lq=16, Lk=128, D=16, block_size=16,
                                 indices="random", data="nan-outside")),
    ("nan-outside-window", dict(Hq=2, Hkv=1, Lq=8, Lk=64, D=16, window=4, data="nan-outside",
                                return_lse=True)),
    ("logits-1e4", dict(Hq=2, Hkv=1, Lq=64, Lk=64, D=64, causal=True, data="big-logits",
                        return_lse=True, dtypes=("bfloat16", "float32"))),
    # scores near 1e11: beyond float32's resolution of a shifted softmax (a reference folded
    # into the product loses the reference key itself), still finite everywhere
    ("logits-scale-3e9", dict(Hq=4, Hkv=2, Lq=200, Lk=200, D=32, top_k=2, block_size=16,
                              window=8, causal=True, scale=3e9, return_lse=True,
                              dtypes=("float32",))),
    ("odd-head-dims", dict(Hq=3, Hkv=1, Lq=3, Lk=3, D=3, Dv=17)),
    ("head-dim-160", dict(Hq=2, Hkv=1, Lq=17, Lk=33, D=160, Dv=160, causal=True)),
    ("explicit-scale", dict(Hq=2, Hkv=1, Lq=17, Lk=17, D=16, scale=0.5, top_k=1,
                            block_size=4, return_indices=True)),
    ("transposed", dict(B=2, Hq=4, Hkv=2, Lq=33, Lk=65, D=32, top_k=2, block_size=16,
                        layout="transposed", return_indices=True)),
    ("strided", dict(Hq=2, Hkv=1, Lq=17, Lk=33, D=16, window=5, layout="strided")),
    ("reversed", dict(Hq=2, Hkv=2, Lq=9, Lk=9, D=8, causal=True, layout="reversed")),
    ("no-queries", dict(Hq=2, Hkv=1, Lq=0, Lk=17, D=8, top_k=1, block_size=4,
                        return_indices=True, return_lse=True)),
    ("no-keys", dict(Hq=2, Hkv=1, Lq=5, Lk=0, D=8, causal=True, return_lse=True)),
    ("no-batch", dict(B=0, Hq=2, Hkv=1, Lq=5, Lk=5, D=8)),
    ("no-value-dim", dict(Hq=2, Hkv=1, Lq=5, Lk=7, D=8, Dv=0, window=2)),
    ("no-heads", dict(Hq=0, Hkv=0, Lq=5, Lk=7, D=8, window=3, causal=True, return_lse=True)),
    ("no-head-dim", dict(Hq=2, Hkv=1, Lq=5, Lk=7, D=0, Dv=8, causal=True, return_lse=True)),
    # valid counts and sizes far beyond the call's extents mean "all": clipped by dshal
    ("huge-counts", dict(Hq=2, Hkv=1, Lq=17, Lk=33, D=8, top_k=10**30, block_size=2**31,
                         window=2**31, causal=True, return_indices=True, return_lse=True)),
    ("float64", dict(Hq=4, Hkv=2, Lq=33, Lk=65, D=16, top_k=2, block_size=16, causal=True,
                     return_indices=True, return_lse=True, dtypes=("float64",))),
    ("large", dict(Hq=8, Hkv=2, Lq=1024, Lk=1024, D=128, top_k=8, block_size=64, window=128,
                   causal=True, return_indices=True, return_lse=True, quick="none")),
)

_ATTENTION_SHAPE = ("B", "Hq", "Hkv", "Lq", "Lk", "D", "Dv")
_META = ("data", "layout", "dtypes", "quick")


def _split(spec: dict[str, Any], shape_keys: Sequence[str]) -> tuple[dict, dict]:
    shape = {k: v for k, v in spec.items() if k in shape_keys or k in _META}
    opts = {k: v for k, v in spec.items() if k not in shape_keys and k not in _META}
    return shape, opts


def table_cases(op: str, table: Sequence[tuple[str, dict[str, Any]]],
                shape_keys: Sequence[str], defaults: dict[str, Any] | None = None
                ) -> Iterator[Case]:
    """One case per scenario of ``table`` and dtype (the scenario's ``dtypes``, else
    :data:`FLOATS`): its shape keys (after ``defaults``) and ``opts``, the call's options."""
    for index, (name, spec) in enumerate(table):
        shape, opts = _split(spec, shape_keys)
        dtypes, quick = shape.pop("dtypes", FLOATS), shape.pop("quick", "rotate")
        base = {**(defaults or {}), **shape, "opts": opts}

        def make(dtype: str, base: dict = base) -> dict[str, Any]:
            return {**base, "dtype": dtype}

        yield from _variants(op, name, dtypes, index, make, quick)


def attention_cases() -> Iterator[Case]:
    """The fixed sparse_attention cases (:data:`ATTENTION` x dtypes)."""
    yield from table_cases("sparse_attention", ATTENTION, _ATTENTION_SHAPE, {"B": 1})
    from dshal_conformance.forms import form_cases  # the 3.1a forms (it builds on this module)

    yield from form_cases(len(ATTENTION))


# --- gemm -------------------------------------------------------------------------------------

#: scenarios at float inputs: (name, params); ``precisions`` lists the labels to run
GEMM: tuple[tuple[str, dict[str, Any]], ...] = (
    ("basic", dict(M=17, K=129, N=97, precisions=("fp32", "tf32", "bf16", "fp16"))),
    ("long-k", dict(M=33, K=1025, N=65, precisions=("fp32", "tf32", "bf16"))),
    ("batched-bias", dict(batch=[2, 3], M=17, K=65, N=33, bias=True,
                          precisions=("fp32", "bf16"))),
    ("transposed-b", dict(M=31, K=64, N=17, layout="transposed", precisions=("fp32", "fp16"))),
    ("strided", dict(M=9, K=33, N=17, layout="strided", precisions=("fp32",))),
    ("cancellation", dict(M=16, K=256, N=16, data="cancel", precisions=("fp32", "bf16"))),
    ("out-bfloat16", dict(M=17, K=65, N=33, out_dtype="bfloat16", precisions=("fp32",))),
    ("in-float16", dict(M=17, K=97, N=33, dtype="float16", bias=True, precisions=("fp32",),
                        default=True)),
    ("in-bfloat16", dict(M=17, K=97, N=33, dtype="bfloat16", precisions=("fp32", "bf16"),
                         default=True)),
    ("in-float64", dict(M=9, K=65, N=9, dtype="float64", precisions=("fp32",), default=True)),
    ("float16-overflow", dict(M=8, K=64, N=8, dtype="float16", data="overflow",
                              precisions=("fp16",))),
    ("on-the-fly", dict(M=17, K=97, N=33, group_size=32,
                        precisions=QUANTIZED_PRECISIONS)),
    ("on-the-fly-batched", dict(batch=[2], M=9, K=200, N=40, group_size=64, bias=True,
                                precisions=QUANTIZED_PRECISIONS)),
    ("wide-range", dict(M=16, K=256, N=64, group_size=32, data="wide-range",
                        precisions=QUANTIZED_PRECISIONS)),
    ("zero-groups", dict(M=8, K=96, N=64, group_size=32, data="zero-groups",
                         precisions=QUANTIZED_PRECISIONS)),
    ("saturation", dict(M=8, K=64, N=64, group_size=16, data="subnormal",
                        precisions=QUANTIZED_PRECISIONS, quick="all")),
    ("no-rows", dict(M=0, K=17, N=5, precisions=("fp32", "int8"))),
    ("no-depth", dict(M=3, K=0, N=5, bias=True, precisions=("fp32", "int8"))),
    ("no-columns", dict(M=3, K=17, N=0, precisions=("fp32",))),
    ("large", dict(M=256, K=4096, N=256, bias=True, quick="none",
                   precisions=("fp32", "tf32", "bf16", "int8"))),
)

#: scenarios with already-quantised (fp8/int8 storage) inputs
PREQUANT: tuple[tuple[str, dict[str, Any]], ...] = (
    ("prequant-groups", dict(M=17, K=97, N=33, group_size=32, a_scale="group",
                             b_scale="block", bias=True)),
    ("prequant-row-col", dict(M=9, K=65, N=17, a_scale="row", b_scale="col")),
    ("prequant-scalar", dict(batch=[2], M=5, K=40, N=7, a_scale="tensor", b_scale="tensor")),
    ("prequant-unscaled", dict(M=5, K=33, N=9)),
    # K = 0 with per-group scales of a: a_scale [M, 0] (no group)
    ("prequant-no-depth", dict(M=3, K=0, N=5, group_size=32, a_scale="group",
                               b_scale="block")),
)

#: int8 only: sums that overflow 16-bit accumulators, -128 in both operands
EXTREME = ("int8-extreme-long-k", dict(M=4, K=4099, N=4, data="extreme", prequant="int8"))

#: precision="auto": the error promise on hostile data
AUTO: tuple[tuple[str, dict[str, Any]], ...] = (
    ("auto-default", dict(M=17, K=129, N=33)),
    ("auto-outliers", dict(M=16, K=256, N=32, data="outliers", tolerance=1e-2,
                           candidates=("int8", "fp8_e4m3", "bf16", "fp32"))),
    ("auto-wide-range", dict(M=16, K=256, N=32, data="wide-range", tolerance=1e-3,
                             candidates=("fp8_e4m3", "int8", "fp16", "bf16", "fp32"))),
)


def gemm_cases() -> Iterator[Case]:
    """The fixed gemm cases: float inputs by precision, prequantised inputs, int8 extremes and
    ``auto``."""
    index = 0
    for name, spec in GEMM:
        spec = dict(spec)
        labels = spec.pop("precisions")
        quick = spec.pop("quick", "rotate")
        default = spec.pop("default", False)  # fp32 as precision=None, the default
        base = {"dtype": "float32", **spec}

        def make(p: str, base: dict = base, default: bool = default) -> dict[str, Any]:
            return {**base, "precision": None if default and p == "fp32" else p}

        yield from _variants("gemm", name, labels, index, make, quick)
        index += 1
    for name, spec in PREQUANT:
        def make_q(p: str, spec: dict = spec) -> dict[str, Any]:
            return {"dtype": "float32", **spec, "prequant": p}

        yield from _variants("gemm", name, QUANTIZED_PRECISIONS, index, make_q)
        index += 1
    name, spec = EXTREME
    yield Case(f"gemm/{name}/int8", "gemm", "int8", "fixed", {"dtype": "float32", **spec})
    for name, spec in AUTO:
        yield Case(f"gemm/{name}/auto", "gemm", "auto", "fixed",
                   {"dtype": "float32", **spec, "precision": "auto", "return_info": True})


# --- quantize ---------------------------------------------------------------------------------

QUANTIZE: tuple[tuple[str, dict[str, Any]], ...] = (
    ("row", dict(shape=[17, 97], group_size=32)),
    ("row-3d", dict(shape=[2, 3, 65], group_size=16, dtype="float16")),
    ("row-1d", dict(shape=[97], group_size=128, dtype="bfloat16")),
    ("block", dict(shape=[97, 33], granularity="block", group_size=32)),
    ("block-transposed", dict(shape=[40, 70], granularity="block", group_size=16,
                              layout="transposed")),
    ("tensor", dict(shape=[33, 17], granularity="tensor")),
    ("in-float64", dict(shape=[9, 40], group_size=16, dtype="float64")),
    ("zero-groups", dict(shape=[8, 96], group_size=32, data="zero-groups")),
    ("saturation", dict(shape=[8, 64], group_size=16, data="subnormal", quick="all")),
    ("wide-range", dict(shape=[16, 256], group_size=32, data="wide-range")),
    ("ties", dict(shape=[4, 300], group_size=300, data="ties", quick="all")),
    ("ties-block", dict(shape=[64, 64], granularity="block", group_size=32, data="ties")),
    ("strided", dict(shape=[9, 33], group_size=8, layout="strided")),
    ("no-rows", dict(shape=[0, 17], group_size=8)),
    ("no-columns", dict(shape=[3, 0], group_size=8)),
    ("group-beyond-extent", dict(shape=[5, 40], group_size=2**31)),  # clipped: one group
    ("large", dict(shape=[1024, 4096], group_size=128, quick="none")),
)

ROUNDING: tuple[tuple[str, dict[str, Any]], ...] = (
    ("round", dict(shape=[17, 33])),
    ("round-specials", dict(shape=[8, 16], data="specials")),
    ("round-float64", dict(shape=[9, 17], dtype="float64")),
)


def quantize_cases() -> Iterator[Case]:
    """The fixed quantize cases: fp8/int8 quantisation and rounding to float precisions."""
    index = 0
    for scenarios, labels in ((QUANTIZE, QUANTIZED_PRECISIONS),
                              (ROUNDING, tuple(p for p in PRECISIONS
                                               if p not in QUANTIZED_PRECISIONS))):
        for name, spec in scenarios:
            spec = dict(spec)
            quick = spec.pop("quick", "rotate")

            def make(p: str, spec: dict = spec) -> dict[str, Any]:
                return {"dtype": "float32", "granularity": "row", **spec, "precision": p}

            yield from _variants("quantize", name, labels, index, make, quick)
            index += 1


# --- gated_channels ---------------------------------------------------------------------------

GATED: tuple[tuple[str, dict[str, Any]], ...] = (
    ("hard-static", dict(lead=[17], C=33)),
    ("hard-row-gates", dict(lead=[2, 9], C=31, row_gates=True, return_mask=True)),
    ("soft", dict(lead=[17], C=33, mode="soft", threshold=0.5, return_mask=True)),
    ("soft-hard", dict(lead=[5, 3], C=20, mode="soft_hard", threshold=-0.25,
                       row_gates=True, return_mask=True)),
    ("keep-count-ties", dict(lead=[7], C=40, keep=5, row_gates=True, data="ties",
                             return_mask=True)),
    ("keep-fraction", dict(lead=[9], C=25, keep=0.3, mode="soft_hard", data="ties",
                           return_mask=True)),
    ("keep-beyond-count", dict(lead=[4], C=9, keep=10**30, row_gates=True, return_mask=True)),
    ("threshold-inf", dict(lead=[4], C=9, threshold=float("-inf"), return_mask=True)),
    # logits exactly at the threshold (strict >) and NaN logits (never open without keep)
    ("threshold-ties", dict(lead=[6], C=24, data="ties", return_mask=True, quick="all")),
    ("threshold-ties-soft-hard", dict(lead=[4], C=20, row_gates=True, mode="soft_hard",
                                      threshold=1.0, data="ties", quick="all")),
    ("weight-bias", dict(lead=[17], C=65, Cout=33, bias=True, return_mask=True)),
    ("weight-nan-closed", dict(lead=[13], C=40, Cout=24, bias=True, data="nan-closed")),
    ("weight-row-gates", dict(lead=[3, 5], C=16, Cout=12, row_gates=True, bias=True,
                              data="nan-closed", mode="soft_hard")),
    ("weight-soft", dict(lead=[6], C=32, Cout=16, mode="soft", threshold=1.0)),
    ("x-nan-closed", dict(lead=[11], C=19, data="nan-closed")),
    ("logits-1e4", dict(lead=[8], C=16, mode="soft", data="big-logits")),
    ("transposed", dict(lead=[12], C=20, Cout=10, layout="transposed")),
    ("no-rows", dict(lead=[0], C=8, Cout=4, return_mask=True)),
    ("no-channels", dict(lead=[3], C=0)),
    ("float64", dict(lead=[9], C=20, Cout=10, bias=True, mode="soft_hard", row_gates=True,
                     return_mask=True, dtypes=("float64",))),
    ("large", dict(lead=[256], C=2048, Cout=1024, bias=True, row_gates=True, mode="soft_hard",
                   quick="none")),
)

_GATED_SHAPE = ("lead", "C", "Cout", "row_gates", "bias")


def gated_cases() -> Iterator[Case]:
    """The fixed gated_channels cases (:data:`GATED` x dtypes)."""
    yield from table_cases("gated_channels", GATED, _GATED_SHAPE)


def fixed_cases() -> list[Case]:
    """Every fixed case, cheap operators first (a failing run stops sooner)."""
    from dshal_conformance.backward import backward_cases  # built on this module's helpers

    return [*quantize_cases(), *gated_cases(), *gemm_cases(), *attention_cases(),
            *backward_cases()]


def select(cases: Sequence[Case], mode: str) -> list[Case]:
    """The cases of a mode: ``full`` runs all, ``quick`` those marked quick."""
    if mode not in MODES:
        raise ValueError(f"mode={mode!r} (allowed: {', '.join(MODES)})")
    return list(cases) if mode == "full" else [c for c in cases if c.quick]
