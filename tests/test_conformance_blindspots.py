"""The suite's former blind spots (issue 16): each backend of
:data:`tests.broken_backends.BLIND_SPOTS` has one realistic bug that ``dshal certify`` once
passed; each must now fail certification in quick mode. Cases run cheapest-first (the rule
cases of :mod:`dshal_conformance.rules`, then the operator's other quick cases) up to the first
failure, so the test costs about what finding the bug costs."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from dshal.registry import Backend, registry
from dshal_conformance import certificate
from dshal_conformance.report import failure_lines
from dshal_conformance.runner import FAIL, Runner
from tests.broken_backends import BLIND_SPOTS
from tests.fake_dist import installed

NOT_MEASURED = {"class": "not measured", "per_op": {}, "mismatches": [], "problems": []}
#: caught across processes, by certification's fresh-process reruns (tested in test_fresh)
CROSS_PROCESS = {"bb_split_k_per_process"}


@pytest.fixture(scope="module")
def blind(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Backend]]:
    entry_points = {name: f"tests.broken_backends.{module}:plugin"
                    for name, (module, _) in BLIND_SPOTS.items()}
    with installed(tmp_path_factory.mktemp("blind"), {}, entry_points,
                   dist="dshal-broken-test"):
        yield registry.backends()


@pytest.mark.parametrize("name", sorted(set(BLIND_SPOTS) - CROSS_PROCESS))
def test_blind_spot_now_fails_quick_certification(blind: dict[str, Backend], name: str
                                                  ) -> None:
    assert blind[name].available, blind[name].unavailable_reason()
    op = BLIND_SPOTS[name][1]
    runner = Runner(name, seed=0, mode="quick")
    mine = [c for c in runner.cases() if c.op == op]
    ordered = [c for c in mine if "rule" in c.params] + [c for c in mine
                                                         if "rule" not in c.params]
    results = runner.run(ordered, stop_at_first_failure=True)
    cert = certificate.build(runner, results, NOT_MEASURED, 0.0)
    assert cert["verdict"] == "fail", f"{name} passed {len(results)} {op} cases"
    first = next(r for r in results if r.status == FAIL)
    assert failure_lines(cert)[0].startswith(f"{op} case {first.case.id}: ")


def test_per_process_split_k_is_caught_in_a_fresh_process(blind: dict[str, Backend]) -> None:
    """The backend reruns bitwise inside one process; only the fresh-process reruns see that
    each process picks its own split (63 in 64 processes pick another factor: three fresh
    processes miss it with probability 64**-3)."""
    from dshal_conformance import determinism, fresh

    name = "bb_split_k_per_process"
    runner = Runner(name, seed=0, mode="full")
    results = runner.run([c for c in runner.cases() if c.id in (
        "gemm/basic/fp32", "gemm/long-k/fp32", "gemm/cancellation/fp32")])
    assert results and all(r.status != FAIL for r in results)
    for _ in range(3):
        det = determinism.measure(runner, results)
        if det["problems"]:
            break
    assert any("differ bitwise in a fresh process" in p for p in det["problems"]), det
    assert det["per_op"]["gemm"]["class"] == "not reproducible"
    assert len(fresh.chosen(results, "full")) == 3
    cert = certificate.build(runner, results, det, 0.0)
    assert cert["verdict"] == "fail"


def test_rule_cases_are_unique_quick_and_new() -> None:
    from dshal_conformance import rules
    from dshal_conformance.cases import fixed_cases

    ids = [c.id for c in rules.cases()]
    assert len(ids) == len(set(ids)) and all(c.quick for c in rules.cases())
    assert not set(ids) & {c.id for c in fixed_cases()}
    assert set(rules.MODULES) == {c.params["rule"] for c in rules.cases()}
