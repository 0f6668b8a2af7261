"""Run ``dshal certify`` in a subprocess, as a user would, and return the certificate it wrote
(after checking that it passed and wrote both files)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from dshal.registry import registry

ROOT = Path(__file__).resolve().parents[1]


def certify_passes(name: str, mode: str, out: Path, **env: str) -> dict[str, Any]:
    """``dshal certify NAME MODE --out OUT`` with ``env`` added: its JSON certificate. Without
    ``env`` the backend must be usable in this process too (a clear message if it is not)."""
    if not env:
        backend = registry.backends().get(name)
        assert backend is not None and backend.available, (
            f"the {name} backend cannot be certified here: "
            + (backend.unavailable_reason() if backend else "it is not installed"))
    run = subprocess.run([sys.executable, "-m", "dshal.cli", "certify", name, mode,
                          "--out", str(out)], capture_output=True, text=True, timeout=1500,
                         cwd=ROOT, env={**os.environ, **env})
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-4000:]
    cert = json.loads((out / f"certificate-{name}.json").read_text())
    assert cert["verdict"] == "pass" and cert["summary"]["fail"] == 0
    assert (out / f"certificate-{name}.md").exists()
    return cert
