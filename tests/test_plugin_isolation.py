"""Hostile plugins: loading that hangs or raises BaseException, names that collide with the
built-in backend or with each other, run hooks that break the result contract. Each plugin is
installed as a real distribution (tests/fake_dist.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import numpy as np
import pytest

import dshal
from dshal import dispatch, isolation, plugin_names
from dshal.cli import info_rows
from dshal.registry import registry
from tests.fake_dist import installed
from tests.test_plugins import HEADER

DECLARE = """
@hookimpl
def dshal_backend_declare():
    return spec({name!r})
"""
PROBE_OK = """
@hookimpl
def dshal_device_probe():
    return DeviceInfo(present=True, name="x")
"""


def _plugin(name: str, *, top: str = "", probe: str = PROBE_OK, run: str = "") -> str:
    return top + HEADER + run + DECLARE.format(name=name) + probe


HOSTILE = {
    "p_hang_import": _plugin("hang_import", top="import time\ntime.sleep(4)\n"),
    "p_hang_probe": _plugin("hang_probe", probe="""
@hookimpl
def dshal_device_probe():
    import time
    time.sleep(4)
    return DeviceInfo(present=True, name="late")
"""),
    "p_exit_import": _plugin("exit_import", top="raise SystemExit(3)\n"),
    "p_interrupt_probe": _plugin("interrupt_probe", probe="""
@hookimpl
def dshal_device_probe():
    raise KeyboardInterrupt
"""),
    "p_fine": _plugin("fine"),
}
HOSTILE_EPS = {name.removeprefix("p_"): name for name in HOSTILE}


@pytest.fixture
def hostile(tmp_path, monkeypatch):
    monkeypatch.delenv("DSHAL_PLUGINS", raising=False)
    monkeypatch.delenv("DSHAL_BACKEND", raising=False)
    monkeypatch.setenv(isolation.ENV, "0.5")
    with installed(tmp_path, HOSTILE, HOSTILE_EPS, dist="dshal-hostile"):
        started = time.monotonic()
        found = registry.backends()
        yield found, time.monotonic() - started, tmp_path
    monkeypatch.undo()
    dispatch.clear_cache()


def test_hangs_and_base_exceptions_are_isolated(hostile):
    found, took, _ = hostile
    assert took < 3.5  # two hangs of 4 s, each cut at 0.5 s
    for name, stage in (("hang_import", "import"), ("hang_probe", "probe")):
        b = found[name]
        assert (b.status, b.stage) == ("broken", stage), name
        assert "within 0.5 s" in b.error and isolation.ENV in b.error
    assert found["exit_import"].status == "broken"
    assert "SystemExit: 3" in found["exit_import"].error
    assert "isolated" in found["exit_import"].error
    assert found["interrupt_probe"].status == "broken"
    assert "KeyboardInterrupt" in found["interrupt_probe"].error
    assert found["fine"].available and found["numpy"].available
    x = np.arange(8, dtype=np.float32).reshape(2, 4)
    y = dshal.ops.gated_channels(x, np.float32([1, -1, 1, -1]), backend="numpy")
    np.testing.assert_array_equal(y, x * [1, 0, 1, 0])


def test_info_survives_hostile_plugins_in_a_fresh_process(hostile):
    _, _, root = hostile
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(root), *sys.path]),
           isolation.ENV: "0.5"}
    started = time.monotonic()
    done = subprocess.run([sys.executable, "-m", "dshal.cli", "info", "--json"], env=env,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert time.monotonic() - started < 30
    rows = {r["name"]: r for r in json.loads(done.stdout)}
    assert rows["exit_import"]["status"] == "broken"
    assert rows["hang_probe"]["status"] == "broken"
    assert rows["numpy"]["status"] == "available"


def test_timeout_setting(monkeypatch):
    monkeypatch.delenv(isolation.ENV, raising=False)
    assert isolation.timeout() == isolation.DEFAULT_TIMEOUT == 60.0
    monkeypatch.setenv(isolation.ENV, "0")
    assert isolation.timeout() is None
    for bad in ("soon", "-1", "nan", "inf"):
        monkeypatch.setenv(isolation.ENV, bad)
        with pytest.raises(ValueError, match=isolation.ENV):
            isolation.timeout()


def test_without_a_limit_a_keyboard_interrupt_propagates():
    def interrupted():
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        isolation.run_isolated(interrupted, "x", None)
    assert isinstance(isolation.run_isolated(interrupted, "x", 5.0).error, KeyboardInterrupt)
    exited = isolation.run_isolated(lambda: sys.exit(2), "x", None)
    assert isinstance(exited.error, SystemExit)


# --- names ------------------------------------------------------------------------------------

TAKEOVER = {"evil_numpy": HEADER + """
@hookimpl
def dshal_backend_declare():
    return spec("numpy", priority=100)

@hookimpl
def dshal_device_probe():
    return DeviceInfo(present=True, name="takeover")
"""}


def test_builtin_name_is_reserved(tmp_path):
    with installed(tmp_path, TAKEOVER, {"numpy": "evil_numpy"}, dist="evil-dist"):
        b = registry.backends()["numpy"]
        assert b.available and b.entry_point == "dshal.backends.numpy.plugin"
        assert b.distribution.startswith("dshal ")
        assert any("evil-dist" in n and "reserved" in n for n in b.notes)
        row = {r["name"]: r for r in info_rows()}["numpy"]
        assert any("evil-dist" in n for n in row["notes"])
        assert "evil_numpy" not in sys.modules  # never even imported


TWIN = HEADER + PROBE_OK + DECLARE.format(name="twin")


def test_a_name_from_two_distributions_loads_from_neither(tmp_path):
    with installed(tmp_path / "a", {"twin_a": TWIN}, {"twin": "twin_a"}, dist="vendor-a"), \
            installed(tmp_path / "b", {"twin_b": TWIN}, {"twin": "twin_b"}, dist="vendor-b"):
        b = registry.backends()["twin"]
        assert b.status == "conflict" and not b.available
        assert "vendor-a" in b.error and "vendor-b" in b.error
        assert "twin_a" not in sys.modules and "twin_b" not in sys.modules
        assert "conflict" in b.unavailable_reason()
        row = {r["name"]: r for r in info_rows()}["twin"]
        assert (row["status"], row["importable"], row["api_compatible"]) == ("conflict", None,
                                                                             None)
        with pytest.raises(dshal.UnsupportedError, match="registered by 2 distributions"):
            dshal.ops.gated_channels(np.ones((1, 4), np.float32), np.ones(4, np.float32),
                                     backend="twin")


def test_name_rule_is_independent_of_path_order(tmp_path):
    from importlib.metadata import entry_points

    with installed(tmp_path / "a", {"twin_a": TWIN}, {"twin": "twin_a"}, dist="vendor-a"), \
            installed(tmp_path / "b", {"twin_b": TWIN}, {"twin": "twin_b"}, dist="vendor-b"):
        eps = list(entry_points(group="dshal.backends"))
    forward = {c.name: (c.chosen, c.problem) for c in plugin_names.resolve(eps)}
    backward = {c.name: (c.chosen, c.problem) for c in plugin_names.resolve(eps[::-1])}
    assert forward["twin"][0] is None and backward["twin"][0] is None
    assert forward["numpy"][0] == backward["numpy"][0]


# --- the run hooks' result contract -------------------------------------------------------------

CONTRACT = {
    "p_one_tuple": HEADER.replace(
        "return np.where(mask, call.x, 0).astype(call.x.dtype), (mask if call.return_mask "
        "else None)", "return (np.where(mask, call.x, 0),)") + PROBE_OK
    + DECLARE.format(name="one_tuple"),
    "p_string": HEADER.replace(
        "return np.where(mask, call.x, 0).astype(call.x.dtype), (mask if call.return_mask "
        "else None)", "return 'y', None") + PROBE_OK + DECLARE.format(name="string"),
}


@pytest.mark.parametrize("name, expected", [
    ("one_tuple", "must return a 2-tuple \\(y, mask; None for results not asked for\\), got a "
                  "1-tuple"),
    ("string", "returned y as str, expected an array"),
])
def test_contract_breaks_name_the_plugin_and_the_contract(tmp_path, name, expected):
    with installed(tmp_path, CONTRACT, {n.removeprefix("p_"): n for n in CONTRACT},
                   dist="dshal-contract"):
        assert registry.backends()[name].available
        with pytest.raises(dshal.PluginError, match=f"backend '{name}' broke the plugin "
                                                    f"contract.*{expected}"):
            dshal.ops.gated_channels(np.ones((1, 4), np.float32), np.ones(4, np.float32),
                                     backend=name)
