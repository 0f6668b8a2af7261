"""The conformance suite as pytest tests: ``pytest conformance --dshal-backend NAME``."""

from __future__ import annotations

from typing import Any

from dshal_conformance import determinism
from dshal_conformance.pytest_plugin import run_case_test
from dshal_conformance.runner import PASS


def test_case(conformance_case: tuple[str, Any], conformance_runner: Any) -> None:
    """One case of the suite on one backend."""
    run_case_test(conformance_case, conformance_runner(conformance_case[0]))


def test_determinism(conformance_backend: str, conformance_runner: Any) -> None:
    """Reruns of the first passing fixed cases per operator are bitwise identical where the
    backend declares determinism."""
    runner = conformance_runner(conformance_backend)
    cases = [c for c in runner.cases() if c.kind == "fixed"]
    per_op: dict[str, int] = {}
    results = []
    for case in cases:
        if per_op.get(case.op, 0) >= determinism.QUICK_RERUNS:
            continue
        res = runner.run_case(case)
        if res.status == PASS:
            per_op[case.op] = per_op.get(case.op, 0) + 1
            results.append(res)
    found = determinism.measure(runner, results)
    assert not found["problems"], found["problems"]
