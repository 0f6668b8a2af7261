"""docs/backends.md's call-record table is the one generated from dshal.calls."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

GEN = Path(__file__).resolve().parents[1] / "docs" / "gen_calls_table.py"


@pytest.fixture(scope="module")
def gen():
    spec = importlib.util.spec_from_file_location("gen_calls_table", GEN)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_table_matches_the_records(gen):
    text = gen.DOC.read_text()
    assert gen.render(text) == text, "run: python docs/gen_calls_table.py"


def test_every_field_is_listed(gen):
    import dataclasses

    table = gen.table()
    for cls in gen.RECORDS.values():
        for f in dataclasses.fields(cls):
            assert f"| `{f.name}` | `{gen._type(f.type)}` |" in table


def test_a_drifted_table_is_detected(gen, tmp_path, monkeypatch):
    stale = gen.DOC.read_text().replace("| `block_size` |", "| `blocksize` |", 1)
    doc = tmp_path / "backends.md"
    doc.write_text(stale)
    monkeypatch.setattr(gen, "DOC", doc)
    assert gen.main(["--check"]) == 1
    assert gen.main([]) == 0 and gen.main(["--check"]) == 0
