"""Fleet certification: ``dshal certify --merge`` checks each node's certificate and
compares same-version nodes on their deterministic cases."""

from __future__ import annotations

import copy
import json

import pytest

from dshal.cli import main
from dshal_conformance import certificate, determinism, fleet
from dshal_conformance.cli import expand
from dshal_conformance.runner import PASS, Runner


@pytest.fixture(scope="module")
def cert() -> dict:
    """A real (small) numpy certificate: a few quantize and gated_channels cases, with their
    determinism measured."""
    runner = Runner("numpy", seed=0, mode="quick")
    cases = [c for c in runner.cases() if c.op in ("quantize", "gated_channels")
             and c.kind == "fixed"]
    results = runner.run(cases[:4] + [c for c in cases if c.op == "gated_channels"][:4])
    assert all(r.status == PASS for r in results)
    return certificate.build(runner, results, determinism.measure(runner, results), 1.0)


def _node(cert: dict, host: str, edit=None) -> dict:
    """A copy of ``cert`` as node ``host`` wrote it (edited by ``edit``), sealed again."""
    body = {k: v for k, v in copy.deepcopy(cert).items() if k != "digest"}
    body["host"]["hostname"] = host
    if edit:
        edit(body)
    return {**body, "digest": {"algorithm": "sha256", "value": certificate.digest(body)}}


def _write(tmp_path, *certs) -> list[str]:
    paths = []
    for i, c in enumerate(certs):
        path = tmp_path / f"node{i}.json"
        path.write_text(json.dumps(c))
        paths.append(str(path))
    return paths


def _merge(capsys, paths) -> tuple[int, str]:
    status = main(["certify", "--merge", *paths])
    return status, capsys.readouterr().out


def test_a_healthy_fleet_passes_with_one_row_per_node(cert, tmp_path, capsys):
    assert fleet.deterministic_cases(cert)  # there is something to compare
    status, out = _merge(capsys, _write(tmp_path, _node(cert, "gpu-a"), _node(cert, "gpu-b")))
    assert status == 0, out
    assert "PASS" in out and "gpu-a" in out and "gpu-b" in out
    assert "compared by output digest" in out


def _without_digests(body):
    for case in body["cases"]:
        case.pop(fleet.OUTPUT_DIGEST, None)


def test_certificates_without_digests_are_compared_by_error_ratios(cert, tmp_path, capsys):
    """Certificates of suites before 1.1.0 record no per-case output digest."""
    old = [_node(cert, h, _without_digests) for h in ("a", "b")]
    status, out = _merge(capsys, _write(tmp_path, *old))
    assert status == 0, out
    assert "compared by error ratios (these certificates record no per-case output" in out

    def changed(body):
        _without_digests(body)
        _change_ratio(body)

    status, out = _merge(capsys, _write(tmp_path, old[0], _node(cert, "b", changed)))
    assert status == 1 and "disagree on deterministic case" in out


def test_damaged_and_failed_nodes_fail_the_fleet(cert, tmp_path, capsys):
    damaged = _node(cert, "b")
    damaged["verdict"] = "fail"  # edited after sealing: the digest no longer matches

    def failed(body):
        body["verdict"], body["failures"]["problems"] = "fail", ["a declared op refused"]

    status, out = _merge(capsys, _write(tmp_path, _node(cert, "a"), damaged,
                                        _node(cert, "c", failed)))
    assert status == 1
    assert "digest mismatch" in out and "damaged" in out
    assert "failed certification on c" in out


def _change_ratio(body):
    case = fleet.deterministic_cases(body)[0]
    case["ratio"] = case["ratio"] * 1.01 + 1e-3


def _change_output(body):
    case = fleet.deterministic_cases(body)[0]
    case[fleet.OUTPUT_DIGEST] = "0" * 64


def test_same_version_nodes_that_disagree_fail(cert, tmp_path, capsys):
    status, out = _merge(capsys, _write(tmp_path, _node(cert, "a"),
                                        _node(cert, "b", _change_output)))
    assert status == 1 and "disagree on deterministic case" in out

    def other_version(body):  # another version may compute differently: not compared
        _change_output(body)
        body["backend"]["version"] += "+other"

    status, out = _merge(capsys, _write(tmp_path, _node(cert, "a"),
                                        _node(cert, "b", other_version)))
    assert status == 0, out


def test_output_digests_are_compared_exactly_when_recorded(cert, tmp_path):
    def digests(value):
        def edit(body):
            for i, case in enumerate(fleet.deterministic_cases(body)):
                case[fleet.OUTPUT_DIGEST] = value if i == 0 else f"{i:064x}"
        return edit

    same = [_node(cert, h, digests("ab" * 32)) for h in ("a", "b")]
    nodes, problems, kinds = fleet.merge(_write(tmp_path, *same))
    assert [n.row()["node"] for n in nodes] == ["a", "b"]
    assert problems == [] and kinds == {"output digest"}
    differ = [same[0], _node(cert, "b", digests("cd" * 32))]
    _, problems, _ = fleet.merge(_write(tmp_path, *differ))
    assert len(problems) == 1 and "output digest" in problems[0]


def test_unreadable_file_and_rank_placeholders(tmp_path, monkeypatch):
    _, problems, _ = fleet.merge([str(tmp_path / "missing.json")])
    assert problems and "cannot read" in problems[0]
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert expand("certs/r{rank}") == "certs/r3" and expand("{local_rank}") == "1"
    assert expand(None) is None
