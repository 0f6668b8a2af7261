"""``dshal certify torch --full`` passes on torch's CPU device and writes its certificate (the one
full torch certification of the test suite), and the ascend backend's generic path, served on
torch CPU tensors under ``DSHAL_ASCEND_DEVICE=cpu``, passes its certification too."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from dshal.registry import registry

pytest.importorskip("torch")

ROOT = Path(__file__).resolve().parents[1]


def _certify(name: str, mode: str, out: Path, **env: str) -> dict:
    run = subprocess.run([sys.executable, "-m", "dshal.cli", "certify", name, mode,
                          "--out", str(out)], capture_output=True, text=True, timeout=1500,
                         cwd=ROOT, env={**os.environ, **env})
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-4000:]
    cert = json.loads((out / f"certificate-{name}.json").read_text())
    assert cert["verdict"] == "pass" and cert["summary"]["fail"] == 0
    assert (out / f"certificate-{name}.md").exists()
    return cert


@pytest.mark.slow
@pytest.mark.xdist_group("torch-certify")
def test_certify_torch_full_passes(tmp_path):
    backend = registry.backends().get("torch")
    assert backend is not None and backend.available, (
        "torch is installed but the torch backend is unusable: "
        + (backend.unavailable_reason() if backend else "dshal-torch is not installed"))
    cert = _certify("torch", "--full", tmp_path)
    assert cert["device"]["target"] == "torch arrays on cpu:0"


@pytest.mark.slow
@pytest.mark.xdist_group("torch-certify")
def test_certify_ascend_generic_path_on_the_cpu_passes(tmp_path):
    if "ascend" not in registry.backends():
        pytest.skip("dshal-ascend is not installed")
    cert = _certify("ascend", "--full", tmp_path, DSHAL_ASCEND_DEVICE="cpu")
    assert cert["device"]["target"] == "torch arrays on cpu:0"
    assert "not an NPU" in cert["device"]["name"]
