"""``dshal certify opencl --quick`` passes on this machine's OpenCL device and writes its
certificate. Seconds with a warm program cache; about two minutes when every kernel is compiled
for the first time (a fresh machine). ``--full`` (every case) is ``make certify``'s."""

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
@pytest.mark.skipif(not getattr(registry.backends().get("opencl"), "available", False),
                    reason="the opencl backend is not installed or has no device")
def test_certify_opencl_quick_passes(tmp_path):
    run = subprocess.run([sys.executable, "-m", "dshal.cli", "certify", "opencl", "--quick",
                          "--out", str(tmp_path)], capture_output=True, text=True, timeout=1500,
                         cwd=ROOT)
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-4000:]
    cert = json.loads((tmp_path / "certificate-opencl.json").read_text())
    assert cert["verdict"] == "pass" and cert["summary"]["fail"] == 0
    assert (tmp_path / "certificate-opencl.md").exists()
