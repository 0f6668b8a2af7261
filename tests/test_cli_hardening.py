"""What an operator and a plugin author read from the command line: exit statuses, refusal
reasons, what ``dshal info`` shows, what ``certify`` needs and says about itself."""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest

import dshal
from dshal.cli import build_parser, main


def test_explain_exits_non_zero_when_the_call_cannot_run(capsys, monkeypatch):
    monkeypatch.setenv("DSHAL_FALLBACK", "error")
    dshal.dispatch.clear_cache()
    try:
        code = main(["explain", "gemm", "--shape", "a=4,4", "--shape", "b=4,4",
                     "--device", "vulkan:0"])
    finally:
        monkeypatch.undo()
        dshal.dispatch.clear_cache()
    assert code == 1 and "cannot run" in capsys.readouterr().out
    assert main(["explain", "gemm", "--shape", "a=4,4", "--shape", "b=4,4"]) == 0


def test_a_forced_refusal_says_which_backends_accept():
    x = np.ones((2, 4), np.float64)
    g = np.ones(4, np.float64)
    refusing = [n for n, b in dshal.ops.backends().items()
                if b.available and n != "numpy"
                and "float64" not in b.spec.capabilities["gated_channels"].dtypes]
    if not refusing:
        pytest.skip("no installed backend refuses float64 gated_channels")
    with pytest.raises(dshal.UnsupportedError) as err:
        dshal.ops.gated_channels(x, g, backend=refusing[0])
    assert "  numpy: accepts this call" in str(err.value)
    assert "no reason given" not in str(err.value)
    assert err.value.reasons["numpy"] == []


def test_info_shows_precisions_and_features(capsys):
    assert main(["info", "--json"]) == 0
    numpy = {r["name"]: r for r in json.loads(capsys.readouterr().out)}["numpy"]
    assert "int8" in numpy["precisions"]["gemm"] and "auto" in numpy["features"]["gemm"]
    assert "gated_channels" not in numpy["precisions"]  # no precisions to show there
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    assert "precisions" in out and "fp8_e4m3" in out and "return_lse" in out


def test_certify_help_tells_the_truth():
    text = build_parser()._subparsers._group_actions[0].choices["certify"].format_help()
    assert "2 minutes" not in text and "seconds" in text
    assert "dshal[certify]" in text and "Markdown" in text


def test_certify_names_hypothesis_when_it_is_missing(monkeypatch, capsys):
    for name in [m for m in sys.modules if m.startswith("dshal_conformance")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "hypothesis", None)  # import hypothesis -> ImportError
    assert main(["certify", "numpy", "--quick"]) == 2
    assert "pip install 'dshal[certify]'" in capsys.readouterr().err
