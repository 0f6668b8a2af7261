"""The conformance suite tests itself: each deliberately broken backend (tests/broken_backends/,
registered as real ``dshal.backends`` entry points) fails certification with a message naming
the operator and the case; the honest numpy backend passes one full certification."""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest

from dshal.cli import main
from dshal.registry import Backend, registry
from dshal_conformance import certificate, tolerance
from dshal_conformance.report import failure_lines
from dshal_conformance.runner import FAIL, Runner
from tests.broken_backends import BROKEN
from tests.fake_dist import installed

NOT_MEASURED = {"class": "not measured", "per_op": {}, "mismatches": [], "problems": []}


@pytest.fixture(scope="module")
def broken(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Backend]]:
    entry_points = {name: f"tests.broken_backends.{module}"
                          + ("" if ":" in module else ":plugin")
                    for name, (module, _) in BROKEN.items()}
    with installed(tmp_path_factory.mktemp("broken"), {}, entry_points,
                   dist="dshal-broken-test"):
        yield registry.backends()


def test_there_are_at_least_twelve_broken_backends() -> None:
    assert len(BROKEN) >= 12


@pytest.mark.parametrize("name", sorted(BROKEN))
def test_broken_backend_fails_certification(broken: dict[str, Backend], name: str) -> None:
    backend = broken[name]
    assert backend.available, backend.unavailable_reason()
    assert backend.distribution == "dshal-broken-test 0.0.0"  # a real entry point
    op = BROKEN[name][1]
    runner = Runner(name, seed=0, mode="quick")
    # the broken operator's cases, up to the first failure (other operators are the honest
    # numpy backend's and are certified by the test below)
    results = runner.run([c for c in runner.cases() if c.op == op], stop_at_first_failure=True)
    cert = certificate.build(runner, results, NOT_MEASURED, 0.0)
    assert cert["verdict"] == "fail"
    first = next(r for r in results if r.status == FAIL)
    line = failure_lines(cert)[0]
    assert first.case.op == op, line
    assert line.startswith(f"{op} case {first.case.id}: "), line
    assert f"dshal certify {name} --case {first.case.id} --seed 0" in line


def test_a_reported_failure_reproduces_with_one_command(broken: dict[str, Backend],
                                                        tmp_path, capsys) -> None:
    rc = main(["certify", "bb_window_off_by_one", "--case",
               "sparse_attention/window-1/float32", "--out", str(tmp_path)])
    out = capsys.readouterr().out
    assert rc == 1
    assert "sparse_attention case sparse_attention/window-1/float32" in " ".join(out.split())
    assert not list(tmp_path.iterdir())  # a filtered run writes no certificate


def test_numpy_backend_passes_full_certification(tmp_path, capsys) -> None:
    rc = main(["certify", "numpy", "--out", str(tmp_path), "--seed", "0"])
    out = capsys.readouterr().out
    path = tmp_path / "certificate-numpy.json"
    cert = json.loads(path.read_text())
    failures = [f"{c['id']}: {c['message']}" for c in cert["cases"] if c["status"] == "fail"]
    assert rc == 0, "\n".join(failures + cert["failures"]["problems"]) or out
    assert (tmp_path / "certificate-numpy.md").read_text().startswith("# dshal certificate")
    for field in ("suite", "dshal", "backend", "device", "host", "seed", "declared", "cases",
                  "statistics", "determinism", "coverage", "tolerance", "performance",
                  "digest"):
        assert field in cert, field
    assert cert["suite"]["mode"] == "full" and len(cert["suite"]["manifest_sha256"]) == 64
    assert cert["summary"]["not-supported"] == 0  # numpy declares everything
    assert cert["determinism"]["class"].startswith("bitwise reproducible")
    # the calibration's promise: at least HEADROOM below every bound on this run too
    for op, labels in cert["statistics"].items():
        for label, row in labels.items():
            for key in ("max_ratio", "max_aggregate_ratio"):
                assert (row[key] or 0) <= 1 / tolerance.HEADROOM, (op, label, key, row[key])
    assert main(["certify", "--verify", str(path)]) == 0
    cert["seed"] = 1  # tampering breaks the digest
    path.write_text(json.dumps(cert))
    assert main(["certify", "--verify", str(path)]) == 1
    assert "digest mismatch" in capsys.readouterr().out


@pytest.mark.parametrize("name", ["bb_nan_leak", "bb_pages_in_pool_order"])
def test_decode_with_summaries_and_nan_outside_fails_mutants(broken: dict[str, Backend],
                                                             name: str) -> None:
    """The paged decode given block_keys with NaN/inf in every key no query may attend: a
    backend that lets them leak or reads the wrong pages fails (the poison leaves only the
    selected blocks with finite means, so ranking from the keys is caught by other cases)."""
    runner = Runner(name, seed=0, mode="full")
    cases = [c for c in runner.cases()
             if c.id.startswith("sparse_attention/paged-decode-block-keys-nan-outside/")]
    assert len(cases) == 3
    assert all(r.status == FAIL for r in runner.run(cases))
