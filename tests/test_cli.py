"""The command line: ``dshal info`` and ``dshal explain``; the README's code runs."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from dshal.cli import main

ROOT = Path(__file__).resolve().parents[1]


def test_info_table(capsys):
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    assert "numpy" in out and "sparse_attention" in out


def test_info_json(capsys):
    assert main(["info", "--json"]) == 0
    rows = {r["name"]: r for r in json.loads(capsys.readouterr().out)}
    numpy = rows["numpy"]
    assert numpy["status"] == "available" and numpy["device_found"] is True
    assert "float32" in numpy["ops"]["gemm"] and numpy["api_compatible"] is True


def test_explain_attention(capsys):
    code = main(["explain", "sparse_attention", "--shape", "q=1,8,128,64",
                 "--shape", "k=1,2,128,64", "--shape", "v=1,2,128,64", "--dtype", "bfloat16",
                 "-o", "top_k=4", "-o", "causal=true"])
    out = capsys.readouterr().out
    assert code == 0
    assert "sparse_attention(q=bfloat16, k=bfloat16, v=bfloat16)" in out
    assert "runs on 'numpy'" in out


def test_explain_pretended_device_without_a_backend(capsys):
    code = main(["explain", "gemm", "--shape", "a=64,64", "--shape", "b=64,64",
                 "--device", "cuda:0", "-o", "precision=bf16"])
    out = capsys.readouterr().out
    assert code == 0
    assert "on cuda:0" in out and "device=cuda (serves: cpu)" in out


def test_explain_reports_argument_errors(capsys):
    code = main(["explain", "gated_channels", "--shape", "x=4,8", "--shape", "gate_logits=7"])
    assert code == 2
    assert "gate_logits must have shape" in capsys.readouterr().err


def test_explain_needs_shapes():
    with pytest.raises(SystemExit, match="give --shape for k, v"):
        main(["explain", "sparse_attention", "--shape", "q=1,1,4,4"])


def test_readme_python_blocks_run():
    blocks = re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), re.S)
    assert len(blocks) >= 2
    for block in blocks:
        exec(compile(block, "README.md", "exec"), {})
