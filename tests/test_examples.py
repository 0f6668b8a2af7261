"""The examples run: a shortened examples/train_tiny.py trains (its loss decreases)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("torch")

ROOT = Path(__file__).resolve().parents[1]


def test_train_tiny_loss_decreases():
    run = subprocess.run([sys.executable, str(ROOT / "examples" / "train_tiny.py"), "--steps",
                          "40"], capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    summary = run.stdout.strip().splitlines()[-1]
    assert summary.startswith("loss ") and "closed channels:" in summary
    first, last = (float(x) for x in summary.split()[1:4:2])
    assert last < first
