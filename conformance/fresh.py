"""Determinism across processes: rerun passing cases in a fresh Python process and compare
output digests.

Reruns inside one process cannot see a choice made once per process (an "autotuned" split-K
factor, a kernel picked by a timing race, a per-process random seed). Certification therefore
reruns a sample of the passing cases in a child process (``python -m dshal_conformance.fresh``,
which reads the backend, seed, mode and case ids as JSON on stdin and prints their digests),
and every passing case's digest is recorded in the certificate (``output_sha256``, NaNs made
canonical first) so that ``dshal certify --verify FILE --reproduce N`` can rerun a sample on
the verifier's machine (:func:`reproduce`).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import defaultdict
from collections.abc import Sequence
from typing import Any

from dshal_conformance.runner import PASS, CaseResult, Runner, output_digest

#: cases per operator rerun in the fresh process
PER_OP = {"quick": 10, "full": 40}
#: seconds a fresh process may take
TIMEOUT = 600


def _spread(items: Sequence[Any], n: int) -> list[Any]:
    """``n`` items spread evenly over ``items`` (all when there are fewer)."""
    if len(items) <= n:
        return list(items)
    step = len(items) / n
    return [items[int(i * step)] for i in range(n)]


def chosen(results: Sequence[CaseResult], mode: str) -> list[CaseResult]:
    """The passing fixed and property cases rerun in a fresh process."""
    per_op: dict[str, list[CaseResult]] = defaultdict(list)
    for r in results:
        if r.status == PASS and r.digest and r.case.kind in ("fixed", "property"):
            per_op[r.case.op].append(r)
    return [r for op in sorted(per_op) for r in _spread(per_op[op], PER_OP[mode])]


def digests_elsewhere(backend: str, seed: int, mode: str, device: int | None,
                      ids: Sequence[str]) -> dict[str, str]:
    """Digests of ``ids`` computed by a fresh Python process (same ``sys.path``)."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
    request = json.dumps({"backend": backend, "seed": seed, "mode": mode, "device": device,
                          "ids": list(ids)})
    proc = subprocess.run([sys.executable, "-m", "dshal_conformance.fresh"], input=request,
                          capture_output=True, text=True, env=env, timeout=TIMEOUT,
                          check=False)
    if proc.returncode != 0:
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise RuntimeError(f"the fresh process failed (exit {proc.returncode}): {tail}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def compute(runner: Runner, ids: Sequence[str]) -> dict[str, str]:
    """Digests of ``ids`` computed by ``runner`` in this process (an exception's type and
    message stand in for a digest)."""
    known = {c.id: c for c in runner.cases()}
    out = {}
    for cid in ids:
        case = known.get(cid)
        if case is None:
            out[cid] = "unknown case id"
            continue
        try:
            out[cid] = output_digest(runner.call(case.op, runner.build(case)))
        except Exception as exc:  # reported as a mismatch, never a crash
            out[cid] = f"raised {type(exc).__name__}: {exc}"
    return out


def measure(runner: Runner, results: Sequence[CaseResult]) -> dict[str, Any]:
    """Rerun :func:`chosen` cases in a fresh process: per operator ``identical/reruns`` and
    the ids that differ."""
    picks = chosen(results, runner.mode)
    if not picks:
        return {"reruns": 0, "per_op": {}, "mismatches": [], "error": None}
    try:
        theirs = digests_elsewhere(runner.name, runner.seed, runner.mode, runner.device,
                                   [r.case.id for r in picks])
    except (RuntimeError, OSError, ValueError, subprocess.TimeoutExpired) as exc:
        return {"reruns": 0, "per_op": {}, "mismatches": [], "error": str(exc)}
    per_op: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    mismatches = []
    for r in picks:
        same = theirs.get(r.case.id) == r.digest
        per_op[r.case.op][0] += same
        per_op[r.case.op][1] += 1
        if not same:
            mismatches.append(r.case.id)
    return {"reruns": len(picks), "mismatches": mismatches, "error": None,
            "per_op": {op: f"{s}/{n} bitwise equal" for op, (s, n) in sorted(per_op.items())}}


def reproduce(cert: dict[str, Any], n: int) -> tuple[int, list[str]]:
    """Rerun ``n`` of a certificate's recorded cases (spread over them) on this machine:
    (cases rerun, lines describing each that differs)."""
    recorded = [c for c in cert["cases"] if isinstance(c.get("output_sha256"), str)]
    picks = _spread(recorded, n)
    if not picks:
        return 0, []
    runner = Runner(cert["backend"]["name"], seed=cert["seed"], mode=cert["suite"]["mode"])
    mine = compute(runner, [c["id"] for c in picks])
    return len(picks), [f"{c['id']}: recorded {c['output_sha256'][:16]}..., computed here "
                        f"{mine[c['id']][:40]}" for c in picks
                        if mine[c["id"]] != c["output_sha256"]]


def main() -> int:
    """The fresh process: a JSON request on stdin, the digests as one JSON line on stdout."""
    request = json.loads(sys.stdin.read())
    runner = Runner(request["backend"], seed=request["seed"], mode=request["mode"],
                    device=request["device"])
    print(json.dumps(compute(runner, request["ids"])))
    return 0


if __name__ == "__main__":
    sys.exit(main())
