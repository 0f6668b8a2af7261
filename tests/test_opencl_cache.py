"""The OpenCL program cache as an attacker meets it: untrusted directories, planted and moved
binaries, a binary the driver loads but that lacks the kernel, modes of others' directories."""

from __future__ import annotations

import hashlib
import os
import stat
import warnings

import numpy as np
import pytest

pytest.importorskip("pyopencl")

from dshal_kernels import GemmDefines, QuantizeDefines
from tests.requirements import require_backend

require_backend("opencl")
pytestmark = pytest.mark.xdist_group("opencl")

from dshal_opencl import cache  # noqa: E402
from dshal_opencl.device import Runtime  # noqa: E402
from dshal_opencl.programs import Programs  # noqa: E402

GEMM = GemmDefines.make("float16", "float16", "fp16", "float16", "float16")
QUANT = QuantizeDefines.make("float32", "bf16")


@pytest.fixture
def root(tmp_path, monkeypatch):
    monkeypatch.setenv("DSHAL_CACHE_DIR", str(tmp_path / "dshal"))
    monkeypatch.delenv("DSHAL_KERNEL_CACHE", raising=False)
    cache._warned.clear()
    return tmp_path / "dshal"


def _entry(root):
    (entry,) = (root / "opencl").glob(f"*{cache.SUFFIX}")
    return entry


def test_a_planted_binary_with_a_valid_checksum_is_not_run(root):
    Programs(Runtime.get()).get(GEMM)
    entry = _entry(root)
    key = entry.name.removesuffix(cache.SUFFIX)
    other = Programs(Runtime.get())
    other.get(QUANT)
    binary = next(p for p in (root / "opencl").glob(f"*{cache.SUFFIX}") if p != entry)
    planted = binary.read_bytes()[8 + 32:]
    # the old format: magic, sha256 of the binary, the binary, under the real key
    (root / "opencl" / f"{key}.bin").write_bytes(
        b"DSHALCL1" + hashlib.sha256(planted).digest() + planted)
    # this format with a checksum in place of the MAC, and a valid entry moved from its key
    for forged in (cache.MAGIC + hashlib.sha256(planted).digest() + planted,
                   binary.read_bytes()):
        entry.write_bytes(forged)
        again = Programs(Runtime.get())
        prg = again.get(GEMM)
        assert (again.cache.hits, again.cache.corrupt, again.source_builds) == (0, 1, 1)
        assert prg.gemm_tile is not None
        assert entry.read_bytes()[8 + 32:] != planted


def test_a_loadable_binary_missing_the_kernel_is_evicted_and_rebuilt(root):
    first = Programs(Runtime.get())
    first.get(GEMM)
    first.get(QUANT)
    entries = sorted((root / "opencl").glob(f"*{cache.SUFFIX}"))
    store = cache.ProgramCache()
    # the gemm entry replaced by the quantize binary under a valid MAC (what a driver-level
    # mix-up would look like): it loads, but has no gemm kernels
    gemm_key = Programs(Runtime.get())
    key = cache.ProgramCache.key(*_source_and_options(gemm_key, GEMM), Runtime.get().identity)
    quant = next(e for e in entries if not e.name.startswith(key)).read_bytes()[8 + 32:]
    store.store(key, quant)
    again = Programs(Runtime.get())
    prg = again.get(GEMM)
    assert again.cache.hits == 1
    assert prg.gemm_tile is not None  # lookup failed, entry evicted, rebuilt from source
    assert (again.cache.corrupt, again.source_builds) == (1, 1)
    third = Programs(Runtime.get())
    assert third.get(GEMM).gemm_tile is not None and third.source_builds == 0


def _source_and_options(programs, defines):
    from dshal_kernels import source

    return source(defines.kernel), [*programs.base_options, *defines.options()]


def test_untrusted_directories_are_refused_with_one_warning(root, monkeypatch):
    (root / "opencl").mkdir(parents=True, mode=0o700)
    os.chmod(root / "opencl", 0o777)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        p = Programs(Runtime.get())
        p.get(GEMM)
        p.get(QUANT)
    assert [str(w.message) for w in seen if w.category is cache.CacheWarning] == [
        f"dshal kernel cache not used: {root / 'opencl'} is writable by group or others "
        f"(mode 777). Kernels are compiled without it; point DSHAL_CACHE_DIR at a directory "
        f"only you can write"]
    assert p.source_builds == 2 and not list((root / "opencl").iterdir())
    assert stat.S_IMODE((root / "opencl").stat().st_mode) == 0o777  # not ours to change
    os.chmod(root / "opencl", 0o700)
    monkeypatch.setattr(os, "getuid", lambda: os.stat(root).st_uid + 1)  # someone else's
    cache._warned.clear()
    with pytest.warns(cache.CacheWarning, match="not by the current user"):
        q = Programs(Runtime.get())
        q.get(GEMM)
    assert q.source_builds == 1 and not list((root / "opencl").iterdir())


def test_the_modes_of_existing_directories_are_left_alone(root):
    root.mkdir()
    os.chmod(root, 0o1777)  # a shared sticky directory, as /tmp
    p = Programs(Runtime.get())
    p.get(GEMM)
    assert stat.S_IMODE(root.stat().st_mode) == 0o1777
    assert stat.S_IMODE((root / "opencl").stat().st_mode) == 0o700  # created by dshal
    secret = root / "opencl" / cache.SECRET
    assert stat.S_IMODE(secret.stat().st_mode) == 0o600 and len(secret.read_bytes()) == 32
    again = Programs(Runtime.get())
    again.get(GEMM)
    assert (again.cache.hits, again.source_builds) == (1, 0)
    # a group-writable, non-sticky parent is refused
    os.chmod(root, 0o775)
    cache._warned.clear()
    with pytest.warns(cache.CacheWarning, match="writable by group or others"):
        Programs(Runtime.get()).get(GEMM)
    assert stat.S_IMODE(root.stat().st_mode) == 0o775


def test_results_are_right_without_a_cache(root):
    import dshal

    (root / "opencl").mkdir(parents=True)
    os.chmod(root / "opencl", 0o777)
    a = np.arange(12, dtype=np.float32).reshape(3, 4)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", cache.CacheWarning)
        from dshal_opencl import programs as mod

        mod._PROGRAMS = None
        try:
            out = dshal.ops.gemm(a, a.T.copy(), precision="bf16", backend="opencl")
        finally:
            mod._PROGRAMS = None
    np.testing.assert_allclose(out, a @ a.T, rtol=1e-2)


def test_a_huge_broadcast_input_is_refused_before_it_is_copied():
    import tracemalloc

    import dshal
    from dshal_opencl.errors import OpenCLAllocationError

    limit = Runtime.get().max_alloc
    rows = limit // (4 * 256) + 1  # one row more than the limit holds, as a zero-stride view
    a = np.broadcast_to(np.float32(1), (rows, 256))
    b = np.ones((256, 4), np.float32)
    tracemalloc.start()
    try:
        with pytest.raises(OpenCLAllocationError, match="MAX_MEM_ALLOC_SIZE"):
            dshal.ops.gemm(a, b, backend="opencl")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 64 << 20, peak  # nothing of the size of a was copied
