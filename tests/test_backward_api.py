"""Plugin API 2: the backward of sparse_attention as an operator of the plugin contract.

API-1 plugins keep loading (and serve no backward); a plugin declaring the backward must
support API 2; the backward is validated and dispatched like any operator, and ``dshal
explain`` / ``dshal info`` say which backend serves it."""

from __future__ import annotations

import numpy as np
import pytest

import dshal
from dshal.capabilities import OLDEST_PLUGIN_API, PLUGIN_API_VERSION
from dshal.cli import main
from dshal.errors import DshalValueError
from dshal.registry import registry
from tests.fake_dist import installed

HEADER = """
import numpy as np
from dshal.hookspec import hookimpl
from dshal.capabilities import BackendSpec, OpCapability, DeviceInfo, FEATURES

def spec(name, api, ops):
    caps = {op: OpCapability(dtypes={"float32"}, features=FEATURES[op]) for op in ops}
    return BackendSpec(name=name, version="1.0", plugin_api=api, device_types={1},
                       array_kind="numpy", priority=50, capabilities=caps)

@hookimpl
def dshal_device_probe():
    return DeviceInfo(present=True, name="x")

@hookimpl
def dshal_sparse_attention_run(call):
    raise RuntimeError("not in these tests")
"""

PLUGINS = {
    "p_api1": HEADER + """
@hookimpl
def dshal_backend_declare():
    return spec("api1", (1, 1), ["sparse_attention"])
""",
    "p_api1_backward": HEADER + """
@hookimpl
def dshal_backend_declare():
    return spec("api1_backward", (1, 1), ["sparse_attention", "sparse_attention_backward"])

@hookimpl
def dshal_sparse_attention_backward_run(call):
    return None
""",
    "p_api2": HEADER + """
@hookimpl
def dshal_backend_declare():
    return spec("api2", (1, 2), ["sparse_attention", "sparse_attention_backward"])

@hookimpl
def dshal_sparse_attention_backward_run(call):
    zeros = [np.zeros(x.shape, x.dtype) for x in (call.q, call.k, call.v)]
    zeros[0][...] = call.scale  # marks the call record's scale
    return tuple(zeros)
""",
    "p_api2_no_hook": HEADER + """
@hookimpl
def dshal_backend_declare():
    return spec("api2_no_hook", (2, 2), ["sparse_attention", "sparse_attention_backward"])
""",
}
ENTRY_POINTS = {name[2:]: name for name in PLUGINS}


@pytest.fixture
def plugins(tmp_path, monkeypatch):
    monkeypatch.delenv("DSHAL_BACKEND", raising=False)
    monkeypatch.delenv("DSHAL_PLUGINS", raising=False)
    with installed(tmp_path, PLUGINS, ENTRY_POINTS):
        yield registry.backends()


def _arrays(B=1, Hq=4, Hkv=2, Lq=8, Lk=8, D=4):
    rng = np.random.default_rng(0)
    q = rng.standard_normal((B, Hq, Lq, D), dtype=np.float32)
    k = rng.standard_normal((B, Hkv, Lk, D), dtype=np.float32)
    v = rng.standard_normal((B, Hkv, Lk, D), dtype=np.float32)
    lse = np.zeros((B, Hq, Lq), np.float32)
    return q, k, v, lse, np.ones_like(q)


def test_api_versions() -> None:
    assert PLUGIN_API_VERSION == 2 and OLDEST_PLUGIN_API == 1


def test_api1_plugin_loads_and_serves_no_backward(plugins) -> None:
    assert plugins["api1"].available, plugins["api1"].unavailable_reason()
    q, k, v, lse, go = _arrays()
    ex = dshal.explain("sparse_attention_backward", q, k, v, go, lse, go, backend="api1")
    assert ex.backend is None
    assert "op=sparse_attention_backward not implemented" in " ".join(ex.reasons["api1"])


def test_backward_needs_api2(plugins) -> None:
    b = plugins["api1_backward"]
    assert b.status == "broken"
    assert "plugin API 2 introduced" in b.error
    assert "without their run hooks" in plugins["api2_no_hook"].error


def test_backward_dispatches_to_the_declaring_backend(plugins) -> None:
    q, k, v, lse, go = _arrays()
    dq, dk, dv = dshal.ops.sparse_attention_backward(q, k, v, go, lse, go, scale=0.25,
                                                     backend="api2")
    assert dq.shape == q.shape and dk.shape == k.shape and dv.shape == v.shape
    assert np.all(dq == 0.25)
    ex = dshal.explain("sparse_attention", q, k, v, top_k=1, block_size=4, backend="api2")
    assert ex.backward == "api2"
    assert "backward (training)" in ex.text and "features=gqa,indices" in ex.text


def test_backward_validation() -> None:
    q, k, v, lse, go = _arrays()
    with pytest.raises(DshalValueError, match="grad_out must have shape"):
        dshal.ops.sparse_attention_backward(q, k, v, go, lse, go[:, :, :3])
    with pytest.raises(TypeError, match="lse"):
        dshal.ops.sparse_attention_backward(q, k, v, go, lse.astype(np.float64), go)
    idx = np.full((1, 2, 8, 1), 5, np.int64)
    with pytest.raises(DshalValueError, match=r"indices must lie in \[-1, 1\]"):
        dshal.ops.sparse_attention_backward(q, k, v, go, lse, go, indices=idx, block_size=4)
    with pytest.raises(DshalValueError, match="indices must have shape"):
        dshal.ops.sparse_attention_backward(q, k, v, go, lse, go, indices=idx[:, :1])


def test_cli_shows_the_backward(plugins, capsys) -> None:
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    assert "sparse_attention backward served by" in out
    assert main(["explain", "sparse_attention_backward", "--shape", "q=1,4,8,4",
                 "--shape", "k=1,2,8,4", "--shape", "v=1,2,8,4", "--shape", "out=1,4,8,4",
                 "--shape", "lse=1,4,8",
                 "--shape", "grad_out=1,4,8,4", "--backend", "api2"]) == 0
    assert "runs on 'api2'" in capsys.readouterr().out
