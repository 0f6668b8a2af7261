"""The conformance suite's parts: error gates, exact checks with their tie and near-tie rules,
case generation, reproducibility, and certificate verification."""

from __future__ import annotations

import copy

import ml_dtypes
import numpy as np
import pytest

from dshal import reference
from dshal_conformance import certificate, checks, data, gates, properties
from dshal_conformance.cases import MODES, fixed_cases, select
from dshal_conformance.runner import PASS, Runner

RNG = np.random.default_rng(0)


# --- gates ------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", ["float16", "float32", "float64"])
def test_ulp_is_the_spacing_of_the_dtype(dtype: str) -> None:
    x = np.abs(RNG.standard_normal(1000) * 10.0 ** RNG.integers(-3, 4, 1000)).astype(dtype)
    np.testing.assert_array_equal(gates.ulp(x, dtype), np.spacing(x).astype(np.float64))


def test_ulp_of_bfloat16_and_overflow_thresholds() -> None:
    assert gates.ulp(np.float64(1.0), "bfloat16") == 2.0**-7
    assert gates.ulp(np.float64(0.0), "bfloat16") == float(
        ml_dtypes.finfo(ml_dtypes.bfloat16).smallest_subnormal)
    assert gates.overflow_threshold("float16") == 65520.0
    with np.errstate(over="ignore"):
        rounded = np.array([65519.0, 65520.0]).astype(np.float16)
    assert np.isfinite(rounded[0]) and np.isinf(rounded[1])


def _bound(ref, **kw) -> gates.Bound:
    return gates.Bound("out", np.asarray(ref, np.float64), kw.pop("mag", np.abs(ref)),
                       kw.pop("k", 1), kw.pop("u_in", 0.0), "float32",
                       kw.pop("dtype", "float32"), **kw)


def test_correct_rounding_passes_with_headroom_and_a_nan_fails() -> None:
    ref = RNG.standard_normal(1000)
    m = gates.measure(ref.astype(np.float32), _bound(ref), RNG)
    assert m.passed and m.max_ratio <= 0.25 and m.agg_ratio <= 0.25
    out = ref.astype(np.float32)
    out[7] = np.nan
    m = gates.measure(out, _bound(ref), RNG)
    assert not m.passed and m.worst["index"] == (7,) and np.isinf(m.max_ratio)


def test_overflow_to_infinity_is_accepted_only_beyond_the_threshold() -> None:
    ref = np.array([70000.0, -1e6, 60000.0])
    out = np.array([np.inf, -np.inf, np.inf], np.float16)
    m = gates.measure(out, _bound(ref, dtype="float16"), RNG)
    assert m.worst["index"] == (2,) and not m.passed


def test_exact_zeros_and_ignored_elements() -> None:
    ref = np.array([0.0, 1.0, 2.0])
    exact = np.array([True, False, False])
    assert not gates.measure(np.array([1e-30, 1.0, 2.0]), _bound(ref, exact=exact), RNG).passed
    assert gates.measure(np.array([-0.0, 1.0, 2.0]), _bound(ref, exact=exact), RNG).passed
    ignore = np.array([False, False, True])
    assert gates.measure(np.array([0.0, 1.0, 5.0]), _bound(ref, ignore=ignore), RNG).passed


def test_aggregate_gate_catches_a_systematic_downgrade_the_element_gate_allows() -> None:
    a = RNG.standard_normal((64, 512)).astype(np.float32)
    b = RNG.standard_normal((512, 64)).astype(np.float32)
    call = data.Call((a, b), {"precision": "fp32"})
    honest = checks.check_gemm(call, a @ b, RNG)
    assert honest.passed
    tf32 = reference.round_to_precision(a, "tf32") @ reference.round_to_precision(b, "tf32")
    downgraded = checks.check_gemm(call, tf32.astype(np.float32), RNG).measurements[0]
    assert downgraded.agg_ratio > 5


# --- exact checks -----------------------------------------------------------------------------


@pytest.mark.parametrize("precision", ["int8", "fp8_e4m3", "fp8_e5m2"])
def test_quantize_accepts_the_neighbour_code_only_across_a_tie(precision: str) -> None:
    # scale 3 (not a power of two: x / scale may round in a kernel): a tie's other code passes
    x = 3 * np.resize(data.tie_values(precision), (4, 64)).astype(np.float32)
    x[:, 0] = x[0, 0]  # every row's group holds 3 qmax: scale 3, the others are exact ties
    call = data.Call((x, precision), {"granularity": "row", "group_size": 64})
    values, scales = reference.quantize(x, precision, granularity="row", group_size=64)
    assert np.all(scales == 3)
    assert checks.check_quantize(call, (values, scales), RNG).passed
    table = checks._code_table(precision)
    pos = np.searchsorted(table, values.astype(np.float64))
    other = values.copy()
    flat, codes = other.reshape(-1), pos.reshape(-1)
    at = 5  # a tie: the neighbouring code on the other side is accepted
    neighbour = table[codes[at] + (1 if x.reshape(-1)[at] / 3 > table[codes[at]] else -1)]
    flat[at] = neighbour
    verdict = checks.check_quantize(call, (other, scales), RNG)
    assert verdict.passed and verdict.notes
    flat[0] = table[codes[0] - 1]  # qmax itself is no tie: any other code fails
    assert not checks.check_quantize(call, (other, scales), RNG).passed
    # scale 1: x / scale is exact however computed, so the tie must go to the even code
    x1 = (x / 3).astype(np.float32)
    call1 = data.Call((x1, precision), {"granularity": "row", "group_size": 64})
    values1, scales1 = reference.quantize(x1, precision, granularity="row", group_size=64)
    assert np.all(scales1 == 1)
    assert checks.check_quantize(call1, (values1, scales1), RNG).passed
    away = values1.copy()
    away.reshape(-1)[at] = neighbour
    assert not checks.check_quantize(call1, (away, scales1), RNG).passed


def _decode_call() -> data.Call:
    """One query at the last key (own block 3 of 8 keys); blocks 1 and 2 hold the same keys
    (an exact tie, both far above block 0)."""
    q = np.ones((1, 2, 1, 4), np.float32)
    k = RNG.standard_normal((1, 1, 32, 4)).astype(np.float32) * 0.1
    k[:, :, 0:8] -= 1.0
    k[:, :, 8:16] += 1.0
    k[:, :, 16:24] = k[:, :, 8:16]
    v = RNG.standard_normal((1, 1, 32, 4)).astype(np.float32)
    return data.Call((q, k, v), {"top_k": 1, "block_size": 8, "return_indices": True})


def _judge(call: data.Call, blocks: list[int]) -> checks.Verdict:
    """The check of a backend that attended ``blocks`` (and computed that correctly)."""
    q, k, v = call.args
    sel = np.array(sorted(blocks), np.int64).reshape(1, 1, 1, -1)
    out, _, _ = reference.sparse_attention(q, k, v, indices=sel, block_size=8)
    return checks.check_attention(call, (out.astype(np.float32), sel), RNG)


def test_selection_check_accepts_either_side_of_a_tie_and_rejects_wrong_selections() -> None:
    call = _decode_call()
    assert _judge(call, [1, 3]).passed  # what the reference picks (ties to the lower index)
    assert _judge(call, [2, 3]).passed  # the other side of the exact tie: as valid
    worse = _judge(call, [0, 3])
    assert any("outscores a selected one" in p for p in worse.problems)
    missing = _judge(call, [1, 2])
    assert any("own block is missing" in p for p in missing.problems)
    too_many = _judge(call, [0, 1, 3])
    assert any("wrong number of blocks" in p for p in too_many.problems)


# --- cases ------------------------------------------------------------------------------------

#: DESIGN.md section 5's edge cases and the scenarios that cover them
EDGE_CASES = {
    "odd sizes 1, 3, 17, 97, 129, 1025": ["sparse_attention/decode-dense-gqa8",
                                          "sparse_attention/odd-head-dims", "gemm/long-k"],
    "GQA ratios 1/2/8": ["sparse_attention/dense", "sparse_attention/dense-causal-gqa2",
                         "sparse_attention/topk-gqa8-causal"],
    "Lq != Lk and decode": ["sparse_attention/causal-cross", "sparse_attention/decode-topk-gqa8"],
    "fully masked rows": ["sparse_attention/causal-more-queries"],
    "windows 0/1/>=L": ["sparse_attention/window-1", "sparse_attention/window-ge-length",
                        "sparse_attention/topk-own-block-only"],
    "NaN/Inf outside the allowed set": ["sparse_attention/nan-outside-topk",
                                        "sparse_attention/nan-outside-window",
                                        "gated_channels/weight-nan-closed"],
    "logits around 1e4": ["sparse_attention/logits-1e4", "gated_channels/logits-1e4"],
    "cancellation": ["gemm/cancellation"],
    "amax = 0 groups": ["gemm/zero-groups", "quantize/zero-groups"],
    "saturation": ["gemm/saturation", "quantize/saturation"],
    "int8 -128": ["gemm/int8-extreme-long-k"],
    "fp16 overflow": ["gemm/float16-overflow"],
    "non-contiguous and transposed": ["sparse_attention/transposed", "gemm/transposed-b",
                                      "quantize/block-transposed", "gated_channels/transposed"],
    "zero-size dimensions": ["sparse_attention/no-keys", "gemm/no-depth", "quantize/no-rows",
                             "gated_channels/no-channels"],
    "top-k ties": ["sparse_attention/ties"],
}


def test_every_design_edge_case_has_a_fixed_case() -> None:
    ids = {c.id.rsplit("/", 1)[0] for c in fixed_cases()}
    missing = {edge: [s for s in scenarios if s not in ids]
               for edge, scenarios in EDGE_CASES.items()}
    assert not {e: s for e, s in missing.items() if s}


def test_case_ids_are_unique_and_quick_covers_every_scenario() -> None:
    cases = fixed_cases()
    assert len({c.id for c in cases}) == len(cases)
    quick = {c.id.rsplit("/", 1)[0] for c in select(cases, "quick")}
    full_only = {c.id.rsplit("/", 1)[0] for c in cases if c.id.split("/")[1] == "large"}
    assert {c.id.rsplit("/", 1)[0] for c in cases} - full_only == quick
    assert MODES == ("quick", "full")


def test_property_cases_are_reproducible_from_the_seed() -> None:
    first = properties.property_cases("quick", 7)
    again = properties.property_cases("quick", 7)
    other = properties.property_cases("quick", 8)
    assert [c.params for c in first] == [c.params for c in again]
    assert [c.params for c in first] != [c.params for c in other]
    assert len(first) == 4 * properties.EXAMPLES["quick"]


def test_property_cases_do_not_depend_on_the_modules_a_process_imported() -> None:
    """A case drawn under pytest (many modules loaded) is the case `dshal certify --case` draws
    in a fresh process."""
    import json
    import subprocess
    import sys

    code = ("import json; from dshal_conformance.properties import property_cases; "
            "print(json.dumps([c.params for c in property_cases('full', 5)]))")
    fresh = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                           check=True).stdout
    here = json.loads(json.dumps([c.params for c in properties.property_cases("full", 5)]))
    assert json.loads(fresh) == here


def test_case_inputs_depend_only_on_seed_and_id() -> None:
    runner = Runner("numpy", seed=3, mode="quick")
    case = next(c for c in runner.cases() if c.id == "gemm/basic/fp32")
    a1 = runner.build(case).args[0]
    a2 = Runner("numpy", seed=3, mode="full").build(case).args[0]
    np.testing.assert_array_equal(a1, a2)


# --- certificates -----------------------------------------------------------------------------


def test_verify_detects_tampering_and_inconsistency() -> None:
    runner = Runner("numpy", seed=0, mode="quick")
    results = runner.run([c for c in runner.cases() if c.op == "quantize"][:6])
    assert all(r.status == PASS for r in results)
    det = {"class": "n/a", "per_op": {}, "mismatches": [], "problems": []}
    cert = certificate.build(runner, results, det, 1.0)
    assert certificate.verify(cert) == []
    edited = copy.deepcopy(cert)
    edited["cases"][0]["status"] = "fail"
    assert any("digest" in p for p in certificate.verify(edited))
    resealed = {k: v for k, v in edited.items() if k != "digest"}
    resealed["digest"] = {"algorithm": "sha256", "value": certificate.digest(resealed)}
    problems = certificate.verify(resealed)
    assert problems and not any("digest" in p for p in problems)


def test_calibration_record_keeps_the_promised_headroom() -> None:
    from dshal_conformance import tolerance

    record = tolerance.CALIBRATION
    assert record["backend"] == "numpy" and len(record["seeds"]) >= 5
    assert set(record["max_ratio"]) == {"sparse_attention", "gemm", "quantize", "gated_channels"}
    for op, gates_ in record["max_ratio"].items():
        for gate, ratio in gates_.items():
            assert ratio <= 1 / tolerance.HEADROOM, (op, gate, ratio)
