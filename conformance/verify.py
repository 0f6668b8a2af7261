"""``dshal certify --verify``: read a certificate file defensively and check what it claims.

What each check proves (``docs/conformance.md``, "Trusting a certificate"):

- the **structure**: every field the checks below read is present with its type; a malformed
  file is one :class:`CertificateError` line, never a traceback;
- the **digest** (:func:`dshal_conformance.certificate.verify`): the file is the one the suite
  wrote, unless someone recomputed the digest after editing it (it is unkeyed);
- **internal consistency** (:func:`consistency_problems`): every case's recorded errors against
  its recorded bounds and status, the statistics, summary, failure list and verdict against
  the cases, and, for a certificate of the installed suite, the tolerance constants;
- the **suite**: whether it was made by this suite version and case manifest.

A signature (:mod:`.trust`) proves who issued it; a reproduction (:mod:`.fresh`) that the
verifier's machine computes the same outputs.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from dshal_conformance import SUITE_VERSION, manifest_sha256
from dshal_conformance import tolerance as tol
from dshal_conformance.certificate import jsonable
from dshal_conformance.runner import FAIL, PASS, STATUSES


class CertificateError(ValueError):
    """A certificate file that cannot be read or lacks what verification needs (one line)."""


#: field -> type of the top level; nested requirements in :data:`NESTED`
TOP = {"format": str, "suite": dict, "backend": dict, "seed": int, "summary": dict,
       "statistics": dict, "failures": dict, "verdict": str, "cases": list, "digest": dict,
       "tolerance": dict, "determinism": dict}
NESTED = {"suite": {"name": str, "version": str, "manifest_sha256": str, "mode": str},
          "backend": {"name": str}, "failures": {"cases": list, "problems": list},
          "digest": {"algorithm": str, "value": str}, "summary": {"cases": int},
          "determinism": {"problems": list}}
CASE = {"id": str, "op": str, "label": str, "kind": str, "status": str}
#: relative slack when comparing a recorded ratio with its recorded err / bound
RATIO_SLACK = 1e-6


def load(path: str | Path) -> dict[str, Any]:
    """The certificate at ``path``, structurally checked; :class:`CertificateError` otherwise."""
    try:
        text = Path(path).read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise CertificateError(f"cannot read {path}: {exc}") from None
    try:
        cert = json.loads(text)
    except ValueError as exc:
        raise CertificateError(f"{path} is not JSON: {exc}") from None
    problem = structure_problem(cert)
    if problem:
        raise CertificateError(f"{path} is not a dshal certificate: {problem}")
    return cert


def _type_problem(where: str, value: Any, want: type) -> str | None:
    ok = isinstance(value, want) and not (want is int and isinstance(value, bool))
    return None if ok else f"{where} is {type(value).__name__}, expected {want.__name__}"


def structure_problem(cert: Any) -> str | None:
    """The first missing or mistyped field verification relies on (None when complete)."""
    if not isinstance(cert, dict):
        return f"the top level is {type(cert).__name__}, expected an object"
    for name, want in TOP.items():
        if name not in cert:
            return f"missing field {name!r}"
        if problem := _type_problem(name, cert[name], want):
            return problem
    for section, fields in NESTED.items():
        for name, want in fields.items():
            if name not in cert[section]:
                return f"missing field {section}.{name}"
            if problem := _type_problem(f"{section}.{name}", cert[section][name], want):
                return problem
    for i, case in enumerate(cert["cases"]):
        if not isinstance(case, dict):
            return f"cases[{i}] is {type(case).__name__}, expected an object"
        for name, want in CASE.items():
            if name not in case:
                return f"missing field cases[{i}].{name}"
            if problem := _type_problem(f"cases[{i}].{name}", case[name], want):
                return problem
        if case["status"] not in STATUSES:
            return f"cases[{i}].status {case['status']!r} (allowed: {', '.join(STATUSES)})"
    return None


def _number(x: Any) -> float | None:
    """A recorded ratio as a float ("inf" is how JSON holds infinity); None when absent."""
    if x is None:
        return None
    if isinstance(x, str):
        try:
            return float(x)
        except ValueError:
            return math.nan
    return float(x) if isinstance(x, (int, float)) and not isinstance(x, bool) else math.nan


def _case_problems(case: dict[str, Any]) -> list[str]:
    """One case's records against each other: ratios against the gates and the status."""
    problems = []
    cid = case["id"]
    ratios = [_number(case.get(k)) for k in ("ratio", "aggregate_ratio")]
    if any(r is not None and (math.isnan(r) or r < 0) for r in ratios):
        problems.append(f"{cid}: a ratio is not a non-negative number")
    elif case["status"] == PASS and any(r is not None and r > 1 for r in ratios):
        problems.append(f"{cid}: marked pass with an err/bound ratio above 1 ({ratios})")
    worst = case.get("worst")
    if isinstance(worst, dict) and case["status"] == FAIL:
        err, bound, ratio = (_number(worst.get(k)) for k in ("err", "bound", "ratio"))
        if None not in (err, bound, ratio) and bound and math.isfinite(err) and \
                abs(err / bound - ratio) > RATIO_SLACK * max(1.0, ratio):
            problems.append(f"{cid}: worst element err/bound {err / bound:.6g} is not its "
                            f"recorded ratio {ratio:.6g}")
    if case["status"] == FAIL and not case.get("message"):
        problems.append(f"{cid}: marked fail without a message")
    return problems


def consistency_problems(cert: dict[str, Any]) -> list[str]:
    """Every internal inconsistency found (beyond the counts :func:`certificate.verify`
    checks): per-case ratios, statistics' worst ratios, determinism problems in the verdict,
    the tolerance constants of the installed suite."""
    problems = []
    cases = cert["cases"]
    for case in cases:
        problems += _case_problems(case)
    for op, labels in cert["statistics"].items():
        if not isinstance(labels, dict):
            problems.append(f"statistics of {op} is not an object")
            continue
        for label, row in labels.items():
            mine = [_number(c.get("ratio")) for c in cases
                    if c["op"] == op and c["label"] == label]
            mine = [r for r in mine if r is not None]
            recorded = _number(row.get("max_ratio")) if isinstance(row, dict) else math.nan
            want = max(mine) if mine else None
            if (recorded is None) != (want is None) or (
                    want is not None and recorded is not None
                    and abs(recorded - want) > RATIO_SLACK * max(1.0, want)):
                problems.append(f"statistics of {op}/{label}: worst ratio {recorded} but the "
                                f"cases say {want}")
    if cert["determinism"]["problems"] and cert["verdict"] == "pass":
        problems.append("verdict 'pass' despite determinism problems")
    if cert["suite"]["manifest_sha256"] == manifest_sha256() and \
            jsonable(tol.policy()) != cert["tolerance"]:
        problems.append("the tolerance section differs from this suite's constants")
    return problems


def suite_note(cert: dict[str, Any]) -> str:
    """Which suite made the certificate, against the installed one."""
    suite = cert["suite"]
    if suite["manifest_sha256"] == manifest_sha256():
        return f"suite {suite['version']} (the installed suite)"
    if suite["version"] != SUITE_VERSION:
        return (f"made by suite version {suite['version']}, not the installed {SUITE_VERSION}: "
                "its cases and bounds may differ")
    return (f"suite {suite['version']} with another case manifest than the installed suite "
            f"({suite['manifest_sha256'][:12]}...): modified or development sources")
