"""Trusting a certificate (issue 16): signatures (ed25519), internal consistency, malformed
files, the suite version, and reproduction of recorded outputs on the verifier's machine."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest

from dshal.cli import main
from dshal_conformance import SUITE_VERSION, certificate, trust
from dshal_conformance.runner import PASS, Runner

DET = {"class": "n/a", "per_op": {}, "mismatches": [], "problems": []}


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("keys")
    key, pub = trust.keygen(root / "issuer")
    _, other = trust.keygen(root / "other")
    return {"key": key, "pub": pub, "other": other}


@pytest.fixture(scope="module")
def signed(keys: dict[str, Path]) -> dict[str, Any]:
    runner = Runner("numpy", seed=0, mode="quick")
    results = runner.run([c for c in runner.cases() if c.op == "quantize"
                          and c.kind in ("fixed", "invalid")][-10:])
    assert all(r.status == PASS for r in results)
    return trust.sign(certificate.build(runner, results, DET, 1.0), keys["key"])


def _verify(tmp_path: Path, cert: Any, *extra: str, raw: str | None = None) -> int:
    path = tmp_path / "cert.json"
    path.write_text(raw if raw is not None else json.dumps(cert))
    return main(["certify", "--verify", str(path), *extra])


def _reseal(cert: dict[str, Any]) -> dict[str, Any]:
    """What a forger can do without the key: edit, recompute the unkeyed digest."""
    body = {k: v for k, v in cert.items() if k not in ("digest", "signature")}
    return {**cert, "digest": {"algorithm": "sha256", "value": certificate.digest(body)}}


def test_signed_certificate_verifies_against_the_trusted_key(signed, keys, tmp_path, capsys):
    assert _verify(tmp_path, signed, "--trust", str(keys["pub"])) == 0
    assert "signed by the trusted key" in " ".join(capsys.readouterr().out.split())
    assert _verify(tmp_path, signed, "--trust", str(keys["other"])) == 1
    assert "not by the trusted key" in capsys.readouterr().out


def _forgeries(cert: dict[str, Any]) -> list[dict[str, Any]]:
    out = []
    for edit in ("device", "version", "ratio", "seed"):
        f = copy.deepcopy(cert)
        if edit == "device":
            f["device"]["name"] = "Forged GPU 9000"
        elif edit == "version":
            f["backend"]["version"] = "99.0"
        elif edit == "ratio":
            for c in f["cases"]:
                c["ratio"] = 0.5
        else:
            f["seed"] = 12345
        out.append(_reseal(f))
    return out


def test_resealed_forgeries_fail_the_signature(signed, keys, tmp_path, capsys):
    for forged in _forgeries(signed):
        assert _verify(tmp_path, forged) == 1  # the embedded key's signature breaks too
        assert _verify(tmp_path, forged, "--trust", str(keys["pub"])) == 1
        assert "signature does not verify" in capsys.readouterr().out
    unsigned = {k: v for k, v in _forgeries(signed)[0].items() if k != "signature"}
    assert _verify(tmp_path, unsigned, "--trust", str(keys["pub"])) == 1
    assert "not signed" in capsys.readouterr().out


def test_consistency_catches_resealed_unsigned_edits(signed, tmp_path, capsys):
    base = {k: v for k, v in signed.items() if k != "signature"}
    times_100 = copy.deepcopy(base)
    for c in times_100["cases"]:
        c["ratio"] = 100 * (c["ratio"] or 0) + 2
    passing_failure = copy.deepcopy(base)
    passing_failure["cases"][0].update(status="fail", message="x")
    loose = copy.deepcopy(base)
    loose["tolerance"]["constants"] = {"C_ULP": 250}
    for forged, word in ((times_100, "above 1"), (passing_failure, "disagree"),
                         (loose, "tolerance")):
        assert _verify(tmp_path, _reseal(forged)) == 1
        assert word in capsys.readouterr().out


@pytest.mark.parametrize("raw", [
    '{"format": "dshal-certificate/1", "suite": {',  # truncated
    "[1, 2, 3]", "", "\x00\xff garbage", '{"format": 1}', "null",
])
def test_malformed_files_are_one_line_errors(tmp_path, capsys, raw):
    assert _verify(tmp_path, None, raw=raw) == 1
    out = capsys.readouterr().out.strip()
    assert len(out.splitlines()) <= 2 and "Traceback" not in out, out  # rich may wrap


@pytest.mark.parametrize("edit", ["cases", "status", "summary", "id", "digest", "missing"])
def test_mistyped_fields_are_one_line_errors(signed, tmp_path, capsys, edit):
    bad = copy.deepcopy(signed)
    if edit == "cases":
        bad["cases"] = {"a": 1}
    elif edit == "status":
        bad["cases"][0]["status"] = 3
    elif edit == "summary":
        bad["summary"] = [1]
    elif edit == "id":
        bad["cases"][1]["id"] = None
    elif edit == "digest":
        bad["digest"] = "abc"
    else:
        del bad["statistics"]
    assert _verify(tmp_path, bad) == 1
    out = capsys.readouterr().out
    assert "not a dshal certificate" in out and "Traceback" not in out


def test_another_suite_version_is_reported(signed, tmp_path, capsys):
    old = _reseal({**{k: v for k, v in signed.items() if k != "signature"},
                   "suite": {**signed["suite"], "version": "0.9.0", "manifest_sha256": "0" * 64}})
    assert _verify(tmp_path, old) == 0
    assert f"not the installed {SUITE_VERSION}" in " ".join(capsys.readouterr().out.split())


def test_reproduce_reruns_recorded_outputs(signed, tmp_path, capsys):
    assert sum("output_sha256" in c for c in signed["cases"]) >= 8
    assert _verify(tmp_path, signed, "--reproduce", "4") == 0
    assert "reproduced 4/4" in capsys.readouterr().out
    wrong = copy.deepcopy({k: v for k, v in signed.items() if k != "signature"})
    wrong["cases"][0]["output_sha256"] = "0" * 64
    assert _verify(tmp_path, _reseal(wrong), "--reproduce", "8") == 1
    assert "not reproduced" in capsys.readouterr().out


def test_keygen_refuses_to_overwrite_and_bad_keys_fail_early(keys, tmp_path, capsys):
    assert main(["certify", "--keygen", str(keys["key"].parent)]) == 1
    assert "not overwritten" in capsys.readouterr().out
    assert main(["certify", "numpy", "--quick", "--sign", str(keys["pub"]),
                 "--out", str(tmp_path)]) == 2  # a public key cannot sign
    assert "cannot read the private key" in " ".join(capsys.readouterr().out.split())
    assert not list(tmp_path.iterdir())
    assert main(["certify", "numpy", "--trust", str(keys["pub"])]) == 2
