"""``dshal certify opencl --full`` passes on this machine's OpenCL device (PoCL in CI) and writes
its certificate: the one full OpenCL certification of the test suite. About 35 s with a warm
program cache, about 12 minutes on a fresh machine, where every kernel variant is compiled."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from dshal.registry import registry

pytest.importorskip("pyopencl")

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
@pytest.mark.xdist_group("opencl-certify")
def test_certify_opencl_full_passes(tmp_path):
    backend = registry.backends().get("opencl")
    assert backend is not None and backend.available, (
        "pyopencl is installed but the opencl backend is unusable: "
        + (backend.unavailable_reason() if backend else "dshal-opencl is not installed"))
    run = subprocess.run([sys.executable, "-m", "dshal.cli", "certify", "opencl", "--full",
                          "--out", str(tmp_path)], capture_output=True, text=True, timeout=1500,
                         cwd=ROOT)
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-4000:]
    cert = json.loads((tmp_path / "certificate-opencl.json").read_text())
    assert cert["verdict"] == "pass" and cert["summary"]["fail"] == 0
    assert (tmp_path / "certificate-opencl.md").exists()
