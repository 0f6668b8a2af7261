"""Certificates: the JSON record of a certification run, its Markdown rendering, and the digest
that ``dshal certify --verify`` checks.

The digest is sha256 over the canonical JSON of the body (sorted keys, no whitespace, ASCII)
— every field except ``digest`` and ``signature`` (:mod:`.trust`). Verification recomputes it
and checks that the summary, statistics and verdict agree with the per-case records
(:mod:`.verify` adds the structure and the per-case consistency).
"""

from __future__ import annotations

import datetime
import hashlib
import json
import math
import os
import platform
import socket
import sys
from collections import Counter
from collections.abc import Sequence
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np

import dshal
from dshal.capabilities import PLUGIN_API_VERSION, BackendSpec, device_type_name
from dshal_conformance import SUITE_NAME, SUITE_VERSION, accounting, manifest_sha256
from dshal_conformance import tolerance as tol
from dshal_conformance.runner import FAIL, PASS, STATUSES, CaseResult, Runner

FORMAT = "dshal-certificate/1"


def jsonable(x: Any) -> Any:
    """``x`` with numpy scalars, tuples and non-finite floats made JSON-safe (inf -> "inf")."""
    if isinstance(x, dict):
        return {str(k): jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple, set, frozenset)):
        items = sorted(x) if isinstance(x, (set, frozenset)) else x
        return [jsonable(v) for v in items]
    if isinstance(x, (bool, np.bool_)):
        return bool(x)
    if isinstance(x, (int, np.integer)):
        return int(x)
    if isinstance(x, (float, np.floating)):
        f = float(x)
        return f if math.isfinite(f) else str(f)
    if isinstance(x, np.ndarray):
        return jsonable(x.tolist())
    return x


def canonical(body: dict[str, Any]) -> bytes:
    """The canonical JSON of a certificate body: sorted keys, no whitespace, ASCII."""
    return json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True,
                      allow_nan=False).encode()


def digest(body: dict[str, Any]) -> str:
    """sha256 (hex) of the canonical JSON of ``body``."""
    return hashlib.sha256(canonical(body)).hexdigest()


def _version(dist: str) -> str:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return "not installed"


def _declaration(spec: BackendSpec) -> dict[str, Any]:
    return {op: {"dtypes": cap.dtypes, "features": cap.features, "precisions": cap.precisions,
                 "auto_order": cap.auto_order, "limits": dict(cap.limits),
                 "deterministic": cap.deterministic}
            for op, cap in sorted(spec.capabilities.items())}


def _host() -> dict[str, Any]:
    return {"hostname": socket.gethostname(), "platform": platform.platform(),
            "machine": platform.machine(), "cpu_count": os.cpu_count(),
            "python": sys.version.split()[0],
            "packages": {d: _version(d) for d in ("numpy", "ml_dtypes", "hypothesis",
                                                   "pluggy", "torch", "cupy")}}


def case_record(res: CaseResult, runner: Runner) -> dict[str, Any]:
    """One case as the certificate records it."""
    rec = {**res.case.summary(), "seed": runner.seed, "status": res.status,
           "declared": res.declared, "uses": res.uses, "ratio": res.ratio,
           "aggregate_ratio": res.agg_ratio, "seconds": round(res.seconds, 4)}
    if res.status == PASS and res.digest and res.case.kind in ("fixed", "property"):
        rec["output_sha256"] = res.digest  # what --verify --reproduce compares
    if res.status == FAIL:
        rec.update(message=res.message, worst=res.worst, reproduce=runner.reproduce(res.case))
    if res.reasons:
        rec["refusal"] = res.reasons
    if res.notes:
        rec["notes"] = res.notes
    return rec


def build(runner: Runner, results: Sequence[CaseResult], determinism: dict[str, Any],
          seconds: float) -> dict[str, Any]:
    """The certificate of one run (with its digest)."""
    b, spec = runner.backend, runner.spec
    caps = accounting.capabilities(results, spec)
    failed_cases = [r.case.id for r in results if r.status == FAIL]
    problems = accounting.capability_problems(caps) + determinism["problems"]
    counts = Counter(r.status for r in results)
    per_op_seconds: Counter[str] = Counter()
    for r in results:
        per_op_seconds[r.case.op] += r.seconds
    body = {
        "format": FORMAT,
        "suite": {"name": SUITE_NAME, "version": SUITE_VERSION,
                  "manifest_sha256": manifest_sha256(), "mode": runner.mode},
        "dshal": {"version": dshal.__version__, "plugin_api": PLUGIN_API_VERSION},
        "backend": {"name": b.name, "version": spec.version, "distribution": b.distribution,
                    "entry_point": b.entry_point, "array_kind": spec.array_kind,
                    "priority": spec.priority, "plugin_api": list(spec.plugin_api),
                    "device_types": sorted(device_type_name(d) for d in spec.device_types),
                    "description": spec.description},
        "device": {"name": b.device.name if b.device else "",
                   "driver": b.device.driver if b.device else "",
                   "details": dict(b.device.details) if b.device else {},
                   "target": runner.target.describe()},
        "host": _host(),
        "seed": runner.seed,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "declared": _declaration(spec),
        "tolerance": tol.policy(),
        "summary": {"cases": len(results), **{s: counts.get(s, 0) for s in STATUSES},
                    "seconds": round(seconds, 2)},
        "statistics": accounting.statistics(results),
        "capabilities": caps,
        "coverage": accounting.coverage(caps, results, spec),
        "determinism": determinism,
        "performance": {"seconds_per_op": {op: round(s, 3) for op, s in
                                           sorted(per_op_seconds.items())},
                        "note": "wall time of running and checking the cases, not a benchmark"},
        "failures": {"cases": failed_cases, "problems": problems},
        "verdict": "pass" if not failed_cases and not problems else "fail",
        "cases": [case_record(r, runner) for r in results],
    }
    body = jsonable(body)
    return {**body, "digest": {"algorithm": "sha256", "value": digest(body)}}


def write(cert: dict[str, Any], out_dir: Path) -> tuple[Path, Path]:
    """Write ``certificate-<backend>.json`` and ``.md`` into ``out_dir``."""
    from dshal_conformance.report import markdown

    out_dir.mkdir(parents=True, exist_ok=True)
    stem = out_dir / f"certificate-{cert['backend']['name']}"
    json_path, md_path = stem.with_suffix(".json"), stem.with_suffix(".md")
    json_path.write_text(json.dumps(cert, indent=1, sort_keys=True) + "\n")
    md_path.write_text(markdown(cert))
    return json_path, md_path


def verify(cert: dict[str, Any]) -> list[str]:
    """Problems found in a certificate: digest mismatch or internal inconsistency (empty when
    it is intact)."""
    problems = []
    body = {k: v for k, v in cert.items() if k not in ("digest", "signature")}
    seal = cert.get("digest") or {}
    if seal.get("algorithm") != "sha256":
        return [f"unknown digest algorithm {seal.get('algorithm')!r}"]
    try:
        actual = digest(body)
    except (TypeError, ValueError) as exc:
        return [f"the body is not canonical JSON: {exc}"]
    if actual != seal.get("value"):
        problems.append(f"digest mismatch: recorded {seal.get('value')}, computed {actual} "
                        "(the certificate was modified)")
    cases = body.get("cases", [])
    counts = Counter(c.get("status") for c in cases)
    summary = body.get("summary", {})
    if summary.get("cases") != len(cases) or any(summary.get(s) != counts.get(s, 0)
                                                 for s in STATUSES):
        problems.append("summary counts disagree with the case records")
    for op, labels in body.get("statistics", {}).items():
        for label, row in labels.items():
            mine = [c for c in cases if c.get("op") == op and c.get("label") == label]
            if row.get("cases") != len(mine) or row.get(PASS) != sum(
                    c.get("status") == PASS for c in mine):
                problems.append(f"statistics of {op}/{label} disagree with the case records")
    failed = sorted(c["id"] for c in cases if c.get("status") == FAIL)
    if sorted(body.get("failures", {}).get("cases", [])) != failed:
        problems.append("the failure list disagrees with the case records")
    should = "pass" if not failed and not body.get("failures", {}).get("problems") else "fail"
    if body.get("verdict") != should:
        problems.append(f"verdict {body.get('verdict')!r} but the records say {should!r}")
    return problems
