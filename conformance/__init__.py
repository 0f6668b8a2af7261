"""dshal's conformance suite: certify a backend against the float64 reference.

Run it as ``dshal certify [BACKEND ...]`` (from a checkout or an installed wheel) or as
``pytest conformance --dshal-backend NAME`` from a checkout. ``docs/conformance.md`` explains
what certification means, the tolerance policy and how to read a certificate.

Modules, one job each: :mod:`.cases` (the fixed cases), :mod:`.properties` (hypothesis-drawn
cases), :mod:`.invalid` (calls that must raise), :mod:`.limits` (calls beyond declared limits),
:mod:`.data` (the inputs of a case), :mod:`.devices` (moving them to the backend's device),
:mod:`.tolerance` (every bound constant, its derivation and calibration), :mod:`.gates` (the
error gates), :mod:`.selection` (top-k validity), :mod:`.checks` (one check per operator),
:mod:`.rules` with :mod:`.exact` and :mod:`.edges` (exact rules, NaN at mask edges),
:mod:`.runner` (runs cases on a backend), :mod:`.determinism` with :mod:`.fresh` (reruns in
this process and a fresh one), :mod:`.accounting` (capabilities, coverage, statistics),
:mod:`.certificate` (JSON, digest), :mod:`.verify` (reading and checking a certificate),
:mod:`.trust` (ed25519 signatures),
:mod:`.report` (Markdown and tables), :mod:`.cli` (``dshal certify``), :mod:`.calibrate` and
:mod:`.pytest_plugin`.
"""

from __future__ import annotations

import hashlib
from functools import cache
from pathlib import Path

SUITE_NAME = "dshal-conformance"
SUITE_VERSION = "1.1.0"

__all__ = ["SUITE_NAME", "SUITE_VERSION", "manifest_sha256"]


@cache
def manifest_sha256() -> str:
    """sha256 over the suite's own source files (path and content), identifying the exact suite
    that wrote a certificate."""
    root = Path(__file__).resolve().parent
    h = hashlib.sha256()
    for path in sorted(root.glob("*.py")):
        h.update(path.name.encode() + b"\0" + hashlib.sha256(path.read_bytes()).digest())
    return h.hexdigest()
