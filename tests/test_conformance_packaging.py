"""The suite as users get it: shipped in the wheel, runnable by pytest from a checkout, and the
backend author's example plugin installed with pip and certified."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from dshal.registry import registry
from dshal_conformance.runner import FAIL, NOT_SUPPORTED, PASS, Runner
from tests.fake_dist import on_sys_path

ROOT = Path(__file__).resolve().parents[1]
PIP = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]


def _run(cmd: list[str], cwd: Path, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=600,
                          env={**os.environ, **env})


def _setuptools_config() -> dict:
    from setuptools.config.pyprojecttoml import read_configuration

    return read_configuration(ROOT / "pyproject.toml")["tool"]["setuptools"]


def test_every_package_directory_is_in_the_distribution() -> None:
    config = _setuptools_config()
    found = {".".join(p.parent.relative_to(ROOT).parts)
             for p in (ROOT / "dshal").rglob("__init__.py")}
    found |= {".".join(("dshal_kernels", *p.parent.relative_to(ROOT / "kernels").parts))
              for p in (ROOT / "kernels").rglob("__init__.py")}
    assert found <= set(config["packages"])
    assert config["package-dir"]["dshal_conformance"] == "conformance"
    for package, directory in config["package-dir"].items():
        assert package in config["packages"] and (ROOT / directory / "__init__.py").exists()


@pytest.mark.slow
def test_wheel_ships_the_suite_and_certify_runs_from_it(tmp_path: Path) -> None:
    src = tmp_path / "src"  # a copy: building writes build/ and *.egg-info next to the source
    config = _setuptools_config()
    for package in (p for p in config["packages"] if "." not in p):
        directory = config.get("package-dir", {}).get(package, package)
        shutil.copytree(ROOT / directory, src / directory,
                        ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    built = _run([*PIP, "wheel", ".", "-w", str(tmp_path / "w"), "--no-deps",
                  "--no-build-isolation"], src)
    assert built.returncode == 0, built.stderr
    wheel = next((tmp_path / "w").glob("dshal-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    for module in ("runner", "cases", "tolerance", "cli", "conftest", "test_conformance"):
        assert f"dshal_conformance/{module}.py" in names
    assert "dshal/backends/numpy/plugin.py" in names
    assert "dshal_kernels/host/attention.py" in names and "dshal_kernels/gemm.cl" in names
    site = tmp_path / "site"
    installed = _run([*PIP, "install", "--no-deps", "--target", str(site), str(wheel)], tmp_path)
    assert installed.returncode == 0, installed.stderr
    probe = ("import dshal_conformance, dshal.cli, sys; print(dshal_conformance.__file__); "
             "sys.exit(dshal.cli.main(['certify', 'numpy', '--quick', '--out', 'certs']))")
    run = _run([sys.executable, "-c", probe], tmp_path, PYTHONPATH=str(site))
    assert run.returncode == 0, run.stdout + run.stderr
    assert run.stdout.splitlines()[0].startswith(str(site))
    assert (tmp_path / "certs" / "certificate-numpy.json").exists()
    tests = _run([sys.executable, "-m", "pytest", "-p", "dshal_conformance.pytest_plugin",
                  "--pyargs", "dshal_conformance", "--dshal-backend", "numpy", "--dshal-quick",
                  "-q", "-p", "no:cacheprovider", "-k", "quantize"], tmp_path,
                 PYTHONPATH=str(site))
    assert tests.returncode == 0 and " passed" in tests.stdout, tests.stdout[-2000:]


def test_suite_runs_under_pytest_from_a_checkout() -> None:
    run = _run([sys.executable, "-m", "pytest", "conformance", "--dshal-backend", "numpy",
                "--dshal-quick", "-q", "-p", "no:cacheprovider", "-k", "quantize or determinism"],
               ROOT)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert " passed" in run.stdout


@pytest.fixture
def minimal_plugin(tmp_path: Path):
    """examples/minimal_plugin installed by pip into a directory put on sys.path."""
    src = shutil.copytree(ROOT / "examples" / "minimal_plugin", tmp_path / "src")
    site = tmp_path / "site"
    done = _run([*PIP, "install", "--no-deps", "--no-build-isolation", "--target", str(site),
                 str(src)], tmp_path)
    assert done.returncode == 0, done.stderr
    with on_sys_path(site, ("dshal_minimal",)):
        yield site


def test_example_plugin_installs_and_passes_certification(minimal_plugin: Path,
                                                          tmp_path: Path) -> None:
    backend = registry.get("minimal")
    assert backend.available and backend.distribution == "dshal-minimal 0.1.0"
    runner = Runner("minimal", seed=0, mode="quick")
    results = runner.run(runner.cases())
    assert not [r.case.id for r in results if r.status == FAIL]
    by_op = {op: {r.status for r in results if r.case.op == op and r.case.kind == "fixed"}
             for op in ("sparse_attention", "gemm", "quantize", "gated_channels")}
    assert by_op["sparse_attention"] == by_op["gemm"] == {NOT_SUPPORTED}  # undeclared ops
    assert by_op["quantize"] == by_op["gated_channels"] == {PASS, NOT_SUPPORTED}
    refused = next(r for r in results if r.case.id.startswith("gated_channels/keep-count-ties/"))
    assert refused.status == NOT_SUPPORTED and any("keep" in r for r in refused.reasons)
    cli = _run([sys.executable, "-m", "dshal.cli", "certify", "minimal", "--quick", "--out",
                str(tmp_path / "certs")], ROOT, PYTHONPATH=str(minimal_plugin))
    assert cli.returncode == 0, cli.stdout + cli.stderr
    cert = tmp_path / "certs" / "certificate-minimal.json"
    verify = _run([sys.executable, "-m", "dshal.cli", "certify", "--verify", str(cert)], ROOT)
    assert verify.returncode == 0, verify.stdout
