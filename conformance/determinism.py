"""Determinism, measured: bitwise reruns of passing cases, and batch invariance.

Classes, strongest first: ``bitwise reproducible, batch invariant`` (reruns, in this process
and for a sample in a fresh one (:mod:`.fresh`), are bitwise equal and each batch element —
attention's B, a batched gemm's leading axis, a row of gated_channels — computed alone equals
its slice of the batched output),
``bitwise reproducible`` and ``not reproducible``. An operator declared deterministic
(``OpCapability.deterministic``) whose reruns differ fails certification.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from typing import Any

from dshal_conformance import fresh
from dshal_conformance.runner import PASS, CaseResult, Runner

#: reruns per operator in quick mode (full mode reruns every passing case)
QUICK_RERUNS = 10
CLASSES = ("bitwise reproducible, batch invariant", "bitwise reproducible", "not reproducible")


def _class(identical: bool, slices: list[bool]) -> str:
    """The class of reruns and batch slices (an operator without batch slices, like quantize,
    can at best be ``bitwise reproducible``)."""
    if not identical:
        return CLASSES[2]
    return CLASSES[0] if slices and all(slices) else CLASSES[1]


def measure(runner: Runner, results: Sequence[CaseResult]) -> dict[str, Any]:
    """Rerun the passing cases (all in full mode, the first few per operator in quick) and
    check batch invariance; returns the ``determinism`` section of a certificate."""
    chosen: dict[str, list[CaseResult]] = defaultdict(list)
    for res in results:
        eligible = res.status == PASS and res.digest and res.case.kind in ("fixed", "property")
        if eligible and (runner.mode == "full" or len(chosen[res.case.op]) < QUICK_RERUNS):
            chosen[res.case.op].append(res)
    per_op: dict[str, dict[str, Any]] = {}
    mismatches, problems, all_slices = [], [], []
    for op, group in sorted(chosen.items()):
        differ = [r.case.id for r in group if runner.rerun_digest(r.case) != r.digest]
        slices = [ok for r in group if r.case.kind == "fixed"
                  for ok in runner.batch_slices(r.case)]
        all_slices += slices
        cap = runner.spec.capabilities[op]
        per_op[op] = {
            "reruns": len(group), "identical": len(group) - len(differ),
            "batch_slices": f"{sum(slices)}/{len(slices)} bitwise equal" if slices else "n/a",
            "declared_deterministic": cap.deterministic,
            "class": _class(not differ, slices),
        }
        mismatches += differ
        if differ and cap.deterministic:
            problems.append(f"{op}: declared deterministic, but {len(differ)} of {len(group)} "
                            f"reruns differ bitwise (first: {differ[0]})")
    elsewhere = fresh.measure(runner, results)
    if elsewhere["error"]:
        problems.append(f"fresh-process reruns: {elsewhere['error']}")
    for op, row in per_op.items():
        row["fresh_process"] = elsewhere["per_op"].get(op, "n/a")
        differ = [i for i in elsewhere["mismatches"] if i.startswith(f"{op}/")]
        if differ:
            row["class"] = CLASSES[2]
            if runner.spec.capabilities[op].deterministic:
                problems.append(f"{op}: declared deterministic, but {len(differ)} cases differ "
                                f"bitwise in a fresh process (first: {differ[0]})")
    mismatches += [i for i in elsewhere["mismatches"] if i not in mismatches]
    overall = "n/a" if not per_op else _class(not mismatches, all_slices)
    return {"class": overall, "per_op": per_op, "mismatches": mismatches,
            "fresh_process_reruns": elsewhere["reruns"], "problems": problems}
