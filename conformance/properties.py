"""Property-based cases: parameters drawn by hypothesis strategies, reproducible from the seed.

Hypothesis draws each operator's parameters (shapes, options, dtype, data variant, layout) from
the strategies below, seeded by the run's seed, with a bounded number of examples; each draw
becomes an ordinary :class:`~.cases.Case` (``<op>/property-NN/<label>``), so a failure is
reproduced with ``dshal certify NAME --case ID --seed N`` like any other case. The same seed and
hypothesis version always draw the same cases (the hypothesis version is in the certificate).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import seed as hypothesis_seed
from hypothesis import strategies as st

from dshal.dtypes import PRECISIONS, QUANTIZED_PRECISIONS
from dshal_conformance.cases import FLOATS, Case

#: examples drawn per operator
EXAMPLES = {"quick": 25, "full": 400}

_LAYOUTS = st.sampled_from(("contiguous", "contiguous", "transposed", "strided", "reversed"))


@st.composite
def attention_params(draw: Any) -> dict[str, Any]:
    """Shapes (GQA 1/2/8, empty and decode lengths), selection, window, dtype, data, layout."""
    Hkv, g, B = draw(st.integers(1, 2)), draw(st.sampled_from((1, 2, 8))), draw(st.integers(1, 2))
    Lk = draw(st.integers(0, 80))
    Lq = draw(st.one_of(st.just(Lk), st.just(1), st.integers(0, 40)))
    opts: dict[str, Any] = {
        "block_size": draw(st.sampled_from((1, 3, 8, 16, 17, 32))),
        "window": draw(st.one_of(st.just(0), st.integers(1, 8), st.integers(Lk, Lk + 3))),
        "causal": draw(st.booleans()),
        "return_lse": draw(st.booleans()),
    }
    selection = draw(st.sampled_from(("none", "count", "fraction", "indices")))
    if selection == "count":
        opts["top_k"] = draw(st.integers(0, 6))
    elif selection == "fraction":
        opts["top_k"] = draw(st.sampled_from((0.1, 0.25, 0.5, 0.75, 1.0)))
    elif selection == "indices":
        opts["indices"] = "random"
    if selection != "none":
        opts["return_indices"] = draw(st.sampled_from((True, True, False)))
    if draw(st.booleans()):
        opts["scale"] = draw(st.sampled_from((0.05, 0.5, 2.0)))
    data = draw(st.sampled_from(("normal", "normal", "nan-outside", "big-logits")))
    return {"B": B, "Hq": Hkv * g, "Hkv": Hkv, "Lq": Lq, "Lk": Lk,
            "D": draw(st.integers(1, 40)), "Dv": draw(st.integers(1, 24)),
            "dtype": draw(st.sampled_from(FLOATS)), "data": data, "layout": draw(_LAYOUTS),
            "opts": opts}


@st.composite
def gemm_params(draw: Any) -> dict[str, Any]:
    """Batch, sizes, group size, precision (float or prequantised inputs), bias, out dtype."""
    precision = draw(st.sampled_from(PRECISIONS))
    p: dict[str, Any] = {
        "batch": draw(st.lists(st.integers(1, 3), max_size=2)),
        "M": draw(st.integers(0, 40)), "K": draw(st.integers(0, 300)),
        "N": draw(st.integers(0, 40)),
        "group_size": draw(st.sampled_from((8, 16, 32, 128))),
        "bias": draw(st.booleans()), "layout": draw(_LAYOUTS),
        "out_dtype": draw(st.sampled_from((None, None, "float32", "bfloat16", "float16"))),
        "data": draw(st.sampled_from(("normal", "normal", "wide-range", "outliers",
                                      "zero-groups"))),
        "dtype": draw(st.sampled_from(FLOATS)),
    }
    if precision in QUANTIZED_PRECISIONS and draw(st.booleans()):
        p.update(prequant=precision, dtype="float32",
                 a_scale=draw(st.sampled_from((None, "tensor", "row", "group"))),
                 b_scale=draw(st.sampled_from((None, "tensor", "col", "block"))))
    else:
        p["precision"] = precision
    return p


@st.composite
def quantize_params(draw: Any) -> dict[str, Any]:
    """Shape, precision, granularity, group size, dtype, data and layout."""
    granularity = draw(st.sampled_from(("row", "block", "tensor")))
    ndim = 2 if granularity == "block" else draw(st.integers(1, 3))
    return {"shape": draw(st.lists(st.integers(0, 40), min_size=ndim, max_size=ndim)),
            "precision": draw(st.sampled_from(PRECISIONS)), "granularity": granularity,
            "group_size": draw(st.sampled_from((1, 4, 16, 128))),
            "dtype": draw(st.sampled_from(FLOATS)), "layout": draw(_LAYOUTS),
            "data": draw(st.sampled_from(("normal", "normal", "wide-range", "zero-groups",
                                          "subnormal")))}


@st.composite
def gated_params(draw: Any) -> dict[str, Any]:
    """Rows, channels, weight/bias, gate mode, threshold or keep, static or per-row gates."""
    mode = draw(st.sampled_from(("hard", "soft", "soft_hard")))
    opts: dict[str, Any] = {"mode": mode, "return_mask": draw(st.booleans())}
    keep = None if mode == "soft" else draw(st.one_of(
        st.none(), st.integers(0, 10), st.sampled_from((0.1, 0.5, 1.0))))
    if keep is None:
        opts["threshold"] = draw(st.sampled_from((0.0, 0.5, -1.0)))
    else:
        opts["keep"] = keep
    weighted = draw(st.booleans())
    return {"lead": draw(st.lists(st.integers(0, 6), max_size=2)),
            "C": draw(st.integers(0, 30)),
            "Cout": draw(st.integers(0, 20)) if weighted else None,
            "bias": weighted and draw(st.booleans()), "row_gates": draw(st.booleans()),
            "dtype": draw(st.sampled_from(FLOATS)), "layout": draw(_LAYOUTS),
            "data": draw(st.sampled_from(("normal", "ties", "nan-closed", "big-logits"))),
            "opts": opts}


STRATEGIES = {
    "quantize": (quantize_params(), "precision"),
    "gated_channels": (gated_params(), "dtype"),
    "gemm": (gemm_params(), "precision"),
    "sparse_attention": (attention_params(), "dtype"),
}


@contextlib.contextmanager
def _no_local_constants() -> Iterator[None]:
    """Keep hypothesis from mixing constants found in the source of the currently imported
    "local" modules into its draws: that pool depends on what the process has imported (a
    pytest session, a plugin's checkout), so the same seed would draw different cases in
    ``dshal certify`` and under pytest. Hypothesis has no setting for it; without the hook
    (another hypothesis version) draws stay correct but depend on the environment."""
    try:
        from hypothesis.internal.conjecture import providers
        from hypothesis.internal.constants_ast import Constants
    except ImportError:  # pragma: no cover - a hypothesis without the hook
        yield
        return
    original = getattr(providers, "_get_local_constants", None)
    if original is None:  # pragma: no cover
        yield
        return
    providers._get_local_constants = Constants
    try:
        yield
    finally:
        providers._get_local_constants = original


def draw_examples(strategy: st.SearchStrategy, n: int, seed: int) -> list[Any]:
    """``n`` examples of ``strategy``, the same for the same seed (and hypothesis version)."""
    found: list[Any] = []

    @hypothesis_seed(seed)
    @settings(max_examples=n, database=None, phases=[Phase.generate], deadline=None,
              suppress_health_check=list(HealthCheck))
    @given(strategy)
    def collect(example: Any) -> None:
        found.append(example)

    with _no_local_constants():
        collect()
    return found[:n]


def _label(op: str, params: dict[str, Any], key: str) -> str:
    if op == "gemm":
        return params.get("precision") or params.get("prequant") or "fp32"
    return params[key]


def property_cases(mode: str, seed: int) -> list[Case]:
    """hypothesis-drawn cases of every operator (all of them run in both modes)."""
    cases = []
    for op, (strategy, key) in STRATEGIES.items():
        for i, params in enumerate(draw_examples(strategy, EXAMPLES[mode], seed)):
            label = _label(op, params, key)
            cases.append(Case(f"{op}/property-{i:02d}/{label}", op, label, "property", params))
    return cases
