"""Plugin discovery, the API handshake, isolation of broken plugins and selection order, with
plugins installed as real distributions (see fake_dist.py)."""

from __future__ import annotations

import warnings

import numpy as np
import pytest

import dshal
from dshal import dispatch
from dshal.capabilities import Signature
from dshal.cli import info_rows
from dshal.registry import registry
from tests.fake_dist import installed

HEADER = """
import numpy as np
from dshal.hookspec import hookimpl
from dshal.capabilities import BackendSpec, OpCapability, DeviceInfo

GATED = OpCapability(dtypes={"float32"}, features={"hard", "return_mask"},
                     limits={"channels": 64})

def spec(name, api=(1, 1), priority=10):
    return BackendSpec(name=name, version="9.9", plugin_api=api, device_types={1},
                       array_kind="numpy", priority=priority,
                       capabilities={"gated_channels": GATED})

@hookimpl
def dshal_gated_channels_run(call):
    mask = call.gate_logits > call.threshold
    return np.where(mask, call.x, 0).astype(call.x.dtype), (mask if call.return_mask else None)
"""

PLUGINS = {
    "p_import_error": "raise ImportError('vendor runtime libfoo.so not found')\n",
    "p_future_api": HEADER + """
@hookimpl
def dshal_backend_declare():
    return spec("future_api", api=(3, 4))

@hookimpl
def dshal_device_probe():
    return DeviceInfo(present=True, name="x")
""",
    "p_probe_fails": HEADER + """
@hookimpl
def dshal_backend_declare():
    return spec("probe_fails")

@hookimpl
def dshal_device_probe():
    raise RuntimeError("cuInit failed: CUDA_ERROR_NO_DEVICE")
""",
    "p_no_device": HEADER + """
@hookimpl
def dshal_backend_declare():
    return spec("no_device")

@hookimpl
def dshal_device_probe():
    return DeviceInfo(present=False, reason="no accelerator found (0 devices)")
""",
    "p_typo_hook": HEADER + """
@hookimpl
def dshal_backend_declar():
    return spec("typo_hook")
""",
    "p_wrong_name": HEADER + """
@hookimpl
def dshal_backend_declare():
    return spec("someone_else")

@hookimpl
def dshal_device_probe():
    return DeviceInfo(present=True, name="x")
""",
    "p_picky": HEADER + """
@hookimpl
def dshal_backend_declare():
    return spec("picky")

@hookimpl
def dshal_device_probe():
    return DeviceInfo(present=True, name="picky device", driver="1.0")

@hookimpl
def dshal_call_check(signature):
    if dict(signature.sizes)["channels"] == 13:
        return ["channels=13 (this device only takes even channel counts)"]
""",
}
ENTRY_POINTS = {
    "import_error": "p_import_error",
    "future_api": "p_future_api",
    "probe_fails": "p_probe_fails",
    "no_device": "p_no_device",
    "typo_hook": "p_typo_hook",
    "wrong_name": "p_wrong_name",
    "picky": "p_picky",
}


@pytest.fixture
def plugins(tmp_path, monkeypatch):
    monkeypatch.delenv("DSHAL_BACKEND", raising=False)
    monkeypatch.delenv("DSHAL_PLUGINS", raising=False)
    with installed(tmp_path, PLUGINS, ENTRY_POINTS):
        yield registry.backends()
    monkeypatch.undo()
    dispatch.clear_cache()


def _gates(c=8, dtype=np.float32):
    x = np.arange(2 * c, dtype=dtype).reshape(2, c)
    logits = np.linspace(-1, 1, c).astype(np.float32)
    return x, logits


def test_each_failure_is_reported_and_isolated(plugins):
    status = {n: (b.status, b.stage, b.error) for n, b in plugins.items()}
    assert status["import_error"][:2] == ("broken", "import")
    assert "libfoo.so" in status["import_error"][2]
    assert status["future_api"][0] == "incompatible"
    assert "upgrade dshal" in status["future_api"][2]
    assert status["probe_fails"][:2] == ("broken", "probe")
    assert "CUDA_ERROR_NO_DEVICE" in status["probe_fails"][2]
    assert status["no_device"][0] == "no-device"
    assert "0 devices" in status["no_device"][2]
    assert status["typo_hook"][:2] == ("broken", "register")
    assert "dshal_backend_declar" in status["typo_hook"][2]
    assert status["wrong_name"][0] == "broken"
    assert "someone_else" in status["wrong_name"][2]
    assert status["picky"][0] == "available"
    assert status["numpy"][0] == "available"
    # nothing above breaks the built-in backend
    x, g = _gates()
    y = dshal.ops.gated_channels(x, g, backend="numpy")
    np.testing.assert_array_equal(y, np.where(g > 0, x, 0))


def test_info_rows_describe_every_plugin(plugins):
    rows = {r["name"]: r for r in info_rows()}
    assert rows["import_error"]["importable"] is False
    assert rows["future_api"]["api_compatible"] is False
    assert rows["no_device"]["device_found"] is False
    assert rows["picky"]["device_found"] is True
    assert rows["picky"]["ops"] == {"gated_channels": ["float32"]}
    for name in ("import_error", "future_api", "probe_fails", "no_device", "typo_hook"):
        assert rows[name]["error"], name


def test_automatic_selection_prefers_priority_then_falls_through(plugins):
    x, g = _gates()
    assert dshal.explain("gated_channels", x, g).backend == "picky"
    # outside picky's declared dtypes: the numpy backend takes it, and explain says why
    ex = dshal.explain("gated_channels", x.astype(np.float64), g)
    assert ex.backend == "numpy"
    assert any("dtype x=float64" in r for r in ex.reasons["picky"])
    # picky's own finer check refuses 13 channels
    ex = dshal.explain("gated_channels", *_gates(13))
    assert ex.backend == "numpy"
    assert ex.reasons["picky"] == ["channels=13 (this device only takes even channel counts)"]
    # limits are data: 100 channels exceed picky's declared limit of 64
    ex = dshal.explain("gated_channels", *_gates(100))
    assert "channels=100 exceeds the limit 64" in ex.reasons["picky"]


def test_forced_backend_that_cannot_take_the_call_raises_with_reasons(plugins):
    x, g = _gates()
    with pytest.raises(dshal.UnsupportedError) as err:
        dshal.ops.gated_channels(x.astype(np.float64), g, backend="picky")
    assert "picky" in err.value.reasons
    assert "dtype x=float64 (supported: float32)" in str(err.value)
    with pytest.raises(dshal.UnsupportedError, match="CUDA_ERROR_NO_DEVICE"):
        dshal.ops.gated_channels(x, g, backend="probe_fails")
    with pytest.raises(dshal.UnsupportedError, match="upgrade dshal"):
        dshal.ops.gated_channels(x, g, backend="future_api")
    with pytest.raises(ValueError, match="not installed"):
        dshal.ops.gated_channels(x, g, backend="nope")


def test_selection_order(plugins, monkeypatch):
    x, g = _gates()
    assert dshal.explain("gated_channels", x, g).source == "automatic"
    monkeypatch.setenv("DSHAL_BACKEND", "numpy")
    dispatch.clear_cache()
    assert dshal.explain("gated_channels", x, g).backend == "numpy"
    assert dshal.explain("gated_channels", x, g).source == "DSHAL_BACKEND"
    with dshal.use_backend("picky"):
        ex = dshal.explain("gated_channels", x, g)
        assert (ex.backend, ex.source) == ("picky", "use_backend")
        ex = dshal.explain("gated_channels", x, g, backend="numpy")
        assert (ex.backend, ex.source) == ("numpy", "argument")
    with pytest.raises(ValueError, match="not installed"), dshal.use_backend("nope"):
        pass


def test_allow_list(plugins, monkeypatch):
    monkeypatch.setenv("DSHAL_PLUGINS", "numpy, picky")
    registry.reload()
    found = registry.backends()
    assert found["picky"].status == "available"
    assert found["import_error"].status == "disabled"
    assert "DSHAL_PLUGINS" in found["future_api"].unavailable_reason()
    assert "p_import_error" not in __import__("sys").modules


def _remote_sig():
    # arrays on a device no installed backend serves (dshal-torch serves every torch device)
    return Signature("gated_channels", "dlpack", (7, 0), (("x", "float32"), ("gate_logits",
                     "float32")), frozenset({"hard"}), None, (("channels", 8),))


def test_environment_is_read_once_until_clear_cache(plugins, monkeypatch):
    x, g = _gates()
    assert dshal.explain("gated_channels", x, g).backend == "picky"
    monkeypatch.setenv("DSHAL_BACKEND", "numpy")
    assert dshal.explain("gated_channels", x, g).backend == "picky"
    dispatch.clear_cache()
    assert dshal.explain("gated_channels", x, g).backend == "numpy"


def test_fallback_policy(plugins, monkeypatch):
    sig = _remote_sig()
    monkeypatch.setenv("DSHAL_FALLBACK", "error")
    dispatch.clear_cache()
    with pytest.raises(dshal.NoBackendError, match="no backend accepts"):
        dispatch.select(sig)
    monkeypatch.setenv("DSHAL_FALLBACK", "warn")
    dispatch.clear_cache()
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        b, decision = dispatch.select(sig)
        dispatch.select(sig)
    assert (b.name, decision.fallback) == ("numpy", True)
    assert len([w for w in seen if issubclass(w.category, dispatch.FallbackWarning)]) == 1
    monkeypatch.setenv("DSHAL_FALLBACK", "allow")
    dispatch.clear_cache()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert dispatch.select(sig)[0].name == "numpy"
    monkeypatch.setenv("DSHAL_FALLBACK", "sometimes")
    dispatch.clear_cache()
    with pytest.raises(ValueError, match="DSHAL_FALLBACK"):
        dispatch.select(sig)


def test_decisions_are_cached(plugins):
    x, g = _gates()
    sig = dshal.explain("gated_channels", x, g)
    assert sig.backend == "picky"
    before = len(dispatch._cache)
    for _ in range(5):
        dshal.ops.gated_channels(x, g)
    assert len(dispatch._cache) <= before + 1


def test_repeated_calls_follow_every_change_of_selection(plugins, monkeypatch):
    """A plan memoises its dispatch decisions; forcing, the environment after clear_cache and a
    plugin reload still decide the very next call."""
    x, g = _gates()
    ran: list[str] = []
    select = dispatch.select

    def spy(sig, backend=None, memo=None):
        chosen, decision = select(sig, backend, memo)
        ran.append(chosen.name)
        return chosen, decision

    monkeypatch.setattr(dispatch, "select", spy)

    def runs_on(**kwargs) -> str:
        dshal.ops.gated_channels(x, g, **kwargs)
        return ran[-1]

    assert runs_on() == runs_on() == "picky"
    assert runs_on(backend="numpy") == "numpy"
    assert runs_on() == "picky"
    with dshal.use_backend("numpy"):
        assert runs_on() == "numpy"
    assert runs_on() == "picky"
    monkeypatch.setenv("DSHAL_BACKEND", "numpy")
    assert runs_on() == "picky"  # the environment is read once...
    dispatch.clear_cache()
    assert runs_on() == "numpy"  # ...until clear_cache
    monkeypatch.delenv("DSHAL_BACKEND")
    dispatch.clear_cache()
    assert runs_on() == "picky"
    monkeypatch.setenv("DSHAL_PLUGINS", "numpy")
    registry.reload()
    assert runs_on() == "numpy"
