"""pytest integration: ``pytest conformance --dshal-backend NAME [--dshal-quick]``.

Every case of the suite becomes one test (``<backend>:<case id>``); a case the backend refuses
as declared is reported as skipped with its reasons. ``conformance/conftest.py`` loads these
hooks when pytest collects a checkout's ``conformance/``; against an installed wheel, load them
with ``pytest -p dshal_conformance.pytest_plugin --pyargs dshal_conformance``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from dshal_conformance.runner import NOT_SUPPORTED, PASS, Runner


def pytest_addoption(parser: pytest.Parser) -> None:
    """``--dshal-backend``, ``--dshal-quick``, ``--dshal-seed``, ``--dshal-device``."""
    group = parser.getgroup("dshal", "dshal conformance suite")
    group.addoption("--dshal-backend", action="append", default=[], metavar="NAME",
                    help="backend to certify (repeatable; default: every usable backend)")
    group.addoption("--dshal-quick", action="store_true", help="the quick subset of cases")
    group.addoption("--dshal-seed", type=int, default=0, help="seed of the case data")
    group.addoption("--dshal-device", type=int, default=None, help="device index")


_RUNNERS: dict[tuple, Runner] = {}


def _runner(config: pytest.Config, name: str) -> Runner:
    key = (name, config.getoption("dshal_seed"), config.getoption("dshal_quick"),
           config.getoption("dshal_device"))
    if key not in _RUNNERS:
        _RUNNERS[key] = Runner(name, seed=key[1], mode="quick" if key[2] else "full",
                               device=key[3])
    return _RUNNERS[key]


def _backends(config: pytest.Config) -> list[str]:
    names = config.getoption("dshal_backend")
    if names:
        return list(names)
    from dshal.registry import registry

    return sorted(n for n, b in registry.backends().items() if b.available)


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """One test per (backend, case), or per backend for backend-level tests."""
    config = metafunc.config
    if "conformance_case" in metafunc.fixturenames:
        params = [pytest.param((name, case), id=f"{name}:{case.id}")
                  for name in _backends(config) for case in _runner(config, name).cases()]
        metafunc.parametrize("conformance_case", params)
    elif "conformance_backend" in metafunc.fixturenames:
        metafunc.parametrize("conformance_backend", _backends(config))


@pytest.fixture
def conformance_runner(request: pytest.FixtureRequest) -> Callable[[str], Runner]:
    """``runner(name)``: the session's :class:`Runner` of a backend."""
    return lambda name: _runner(request.config, name)


def run_case_test(conformance_case: tuple[str, Any], runner: Runner) -> None:
    """The body of one case test: pass, skip (refused as declared) or fail with the reason."""
    _, case = conformance_case
    res = runner.run_case(case)
    if res.status == NOT_SUPPORTED:
        pytest.skip("not supported as declared: " + "; ".join(res.reasons))
    if res.status != PASS:
        pytest.fail(f"{case.op} case {case.id}: {res.message}\nreproduce: "
                    f"{runner.reproduce(case)}", pytrace=False)
