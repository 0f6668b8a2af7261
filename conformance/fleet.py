"""Fleet certification: the certificates that ``dshal certify`` wrote on many nodes (one per
rank under ``torchrun``), checked and merged by ``dshal certify --merge FILES...``.

Each certificate's digest and internal consistency are verified
(:func:`dshal_conformance.certificate.verify`); one row per node gives its device, backend
and version, verdict and determinism class. The fleet fails when any certificate is damaged,
any node failed, or nodes that claim the same backend version (same suite, same seed)
disagree on the output of a case that both measured as deterministic.

What is compared per case is :func:`fingerprint`: the per-case output digest where a
certificate records one (``output_sha256``), compared exactly; certificates written before
output digests were recorded hold only each case's error ratios, which are compared instead
(to 1e-6 relative: the float64 reference itself may round differently on another CPU), a
weaker check that the merge report names.
"""

from __future__ import annotations

import json
import math
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dshal_conformance import certificate
from dshal_conformance.determinism import CLASSES
from dshal_conformance.runner import PASS

#: the case record field holding a digest of the case's output
OUTPUT_DIGEST = "output_sha256"
#: relative tolerance of the error-ratio comparison (certificates without output digests)
RATIO_RTOL = 1e-6


@dataclass
class Node:
    """One certificate of the fleet: where it came from and what it says."""

    path: str
    cert: dict[str, Any] = field(repr=False)
    problems: list[str]

    @property
    def ok(self) -> bool:
        return not self.problems and self.cert.get("verdict") == "pass"

    def row(self) -> dict[str, str]:
        """What the merge table shows for this node."""
        c = self.cert
        backend, device = c.get("backend", {}), c.get("device", {})
        result = c.get("verdict", "?") if not self.problems else "damaged"
        return {"node": c.get("host", {}).get("hostname", "?"), "certificate": self.path,
                "device": " ".join(x for x in (device.get("name", ""), device.get("driver", ""))
                                   if x) or "-",
                "backend": f"{backend.get('name', '?')} {backend.get('version', '?')}",
                "result": result,
                "determinism": c.get("determinism", {}).get("class", "?")}


def load(path: str) -> Node:
    """Read and verify one certificate (a file that cannot be read is a damaged node)."""
    try:
        cert = json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        return Node(path, {}, [f"cannot read {path}: {exc}"])
    if not isinstance(cert, dict):
        return Node(path, {}, [f"{path} is not a certificate (a JSON object)"])
    return Node(path, cert, certificate.verify(cert))


def deterministic_cases(cert: dict[str, Any]) -> list[dict[str, Any]]:
    """The passing cases of operators measured bitwise reproducible whose reruns matched."""
    det = cert.get("determinism", {})
    reproducible = {op for op, v in det.get("per_op", {}).items() if v.get("class") != CLASSES[2]}
    mismatched = set(det.get("mismatches", []))
    return [c for c in cert.get("cases", []) if c.get("status") == PASS
            and c.get("op") in reproducible and c.get("id") not in mismatched]


def fingerprint(case: dict[str, Any]) -> tuple[str, Any]:
    """What stands for a case's output: ``("output digest", hex)`` where recorded, else
    ``("error ratios", (ratio, aggregate_ratio))``."""
    if case.get(OUTPUT_DIGEST):
        return "output digest", case[OUTPUT_DIGEST]
    return "error ratios", (case.get("ratio"), case.get("aggregate_ratio"))


def _same(a: tuple[str, Any], b: tuple[str, Any]) -> bool:
    if a[0] != b[0]:
        return True  # one side has no digest: nothing comparable
    if a[0] == "output digest":
        return a[1] == b[1]
    return all(x == y or (isinstance(x, (int, float)) and isinstance(y, (int, float))
                          and math.isclose(x, y, rel_tol=RATIO_RTOL))
               for x, y in zip(a[1], b[1]))


def disagreements(nodes: list[Node]) -> tuple[list[str], set[str]]:
    """Cases on which nodes claiming one backend version disagree, and the kinds of
    comparison made (``"output digest"``, ``"error ratios"``)."""
    groups: dict[tuple, list[Node]] = defaultdict(list)
    for n in nodes:
        if n.cert and not n.problems:
            b = n.cert.get("backend", {})
            groups[(b.get("name"), b.get("version"), n.cert.get("seed"),
                    n.cert.get("suite", {}).get("manifest_sha256"))].append(n)
    problems, kinds = [], set()
    for (name, version, _, _), members in sorted(groups.items(), key=lambda kv: str(kv[0])):
        seen: dict[str, tuple[Node, tuple[str, Any]]] = {}
        for n in members:
            for case in deterministic_cases(n.cert):
                mine = fingerprint(case)
                first = seen.setdefault(case["id"], (n, mine))
                if first[0] is n:
                    continue
                if first[1][0] == mine[0]:
                    kinds.add(mine[0])
                if not _same(first[1], mine):
                    problems.append(f"{name} {version}: {first[0].path} and {n.path} disagree on "
                                    f"deterministic case {case['id']} ({mine[0]}: "
                                    f"{first[1][1]} vs {mine[1]})")
    return problems, kinds


def merge(paths: list[str]) -> tuple[list[Node], list[str], set[str]]:
    """Load and check a fleet's certificates: its nodes, every problem found (damaged or
    failed nodes, disagreements), and the kinds of output comparison made."""
    nodes = [load(p) for p in paths]
    problems = [f"{n.path}: {p}" for n in nodes for p in n.problems]
    problems += [f"{n.path}: {n.row()['backend']} failed certification on {n.row()['node']}"
                 for n in nodes
                 if not n.problems and n.cert.get("verdict") != "pass"]
    found, kinds = disagreements(nodes)
    return nodes, problems + found, kinds
