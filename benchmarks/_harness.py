"""Shared benchmark machinery: cases, the machine's measured peak, memory probes, the tables.

A benchmark module lists :class:`Case` records (``cases(tiny=False)``); its one test times each
with :func:`run`. Every case is a row of the table of its ``op``: implementation, median and
best time, GFLOP/s or GB/s, the fraction of this machine's peak (numpy sgemm 2048³ GFLOP/s, a
256 MiB ``np.copyto`` GB/s, both measured in the same run) and the ratio to a peer row
(``peer time / this time``: above 1 means faster than the peer). ``tiny=True`` gives the same
cases at toy sizes: ``tests/test_benchmarks_smoke.py`` runs them once so they cannot rot.
Nothing here asserts a timing.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np

#: the measured peak of this machine (filled once per session by :func:`measure_peak`)
PEAK: dict[str, float] = {}


@dataclass(frozen=True)
class Case:
    """One row of a table: ``make()`` builds the inputs and returns the call to time.

    :param op: the table (pytest-benchmark group) the row belongs to.
    :param impl: the row's label, unique within the table.
    :param flops: floating-point operations per call (0: report GB/s instead).
    :param nbytes: bytes read plus written per call (used when ``flops`` is 0).
    :param peer: the label of the row this one is compared with (``None``: no ratio).
    :param rounds: timed rounds (after one warm-up call).
    :param iterations: calls per round (the time shown is per call): above 1 for calls of a few
        µs, whose single timing would be mostly the timer's own cost.
    """

    op: str
    impl: str
    make: Callable[[], Callable[[], object]]
    flops: float = 0.0
    nbytes: float = 0.0
    peer: str | None = None
    rounds: int = 5
    iterations: int = 1

    @property
    def id(self) -> str:
        return self.impl.replace(" ", "_")


def ids(cases: Iterable[Case]) -> list[str]:
    """pytest ids for parametrising over ``cases``."""
    return [c.id for c in cases]


def run(benchmark: Any, case: Case) -> None:
    """Time ``case`` with pytest-benchmark: one warm-up call, then ``case.rounds`` rounds of
    ``case.iterations`` calls."""
    fn = case.make()
    benchmark.group = case.op
    benchmark.extra_info.update(impl=case.impl, flops=case.flops, bytes=case.nbytes,
                                peer=case.peer)
    benchmark.pedantic(fn, rounds=case.rounds, iterations=case.iterations, warmup_rounds=1)


def smoke(cases: Iterable[Case]) -> None:
    """Build and call every case once (the tiny sizes), without timing."""
    for case in cases:
        case.make()()


# --- the machine's peak -----------------------------------------------------------------------


def best_time(fn: Callable[[], object], repeat: int = 5) -> float:
    """Best of ``repeat`` wall-clock seconds of ``fn()`` after one warm-up call."""
    fn()
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def measure_peak(n: int = 2048, copy_mib: int = 256) -> dict[str, float]:
    """numpy sgemm GFLOP/s at ``n``³ and ``np.copyto`` GB/s (read + write) of ``copy_mib``."""
    rng = np.random.default_rng(0)
    a = rng.standard_normal((n, n), dtype=np.float32)
    b = rng.standard_normal((n, n), dtype=np.float32)
    t = best_time(lambda: a @ b)
    src = np.ones(copy_mib << 18, np.float32)
    dst = np.empty_like(src)
    c = best_time(lambda: np.copyto(dst, src))
    return {"sgemm_gflops": 2 * n**3 / t / 1e9, "copy_gbs": 2 * src.nbytes / c / 1e9}


# --- peak extra memory of one call, in a fresh process ----------------------------------------


def _rss_kib(field: str) -> int:
    with open("/proc/self/status", encoding="ascii") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise OSError(f"{field} is not in /proc/self/status")


def _measure_here(module: str, impl: str, tiny: bool) -> dict[str, float]:
    """Build the case in this process, reset the RSS high-water mark, call once, report."""
    import importlib

    mod = importlib.import_module(module)
    case = next(c for c in mod.cases(tiny=tiny) if c.impl == impl)
    fn = case.make()
    base = _rss_kib("VmRSS")
    try:  # "5" resets VmHWM to the current RSS (Linux >= 4.0)
        with open("/proc/self/clear_refs", "w", encoding="ascii") as f:
            f.write("5")
    except OSError:
        pass
    t0 = time.perf_counter()
    fn()
    seconds = time.perf_counter() - t0
    return {"extra_mib": (_rss_kib("VmHWM") - base) / 1024, "seconds": seconds}


def peak_memory(module: str, impl: str, tiny: bool = False) -> dict[str, float]:
    """Peak extra resident memory (MiB) and time of one call of a case, in a subprocess so the
    high-water mark is clean (BLAS and torch buffers included, which tracemalloc misses)."""
    code = ("import json, sys; from benchmarks._harness import _measure_here; "
            "print(json.dumps(_measure_here(sys.argv[1], sys.argv[2], sys.argv[3] == '1')))")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    res = subprocess.run([sys.executable, "-c", code, module, impl, "1" if tiny else "0"],
                         cwd=root, capture_output=True, text=True, check=True)
    return json.loads(res.stdout.strip().splitlines()[-1])


# --- the tables -------------------------------------------------------------------------------


def _fmt_time(s: float) -> str:
    if s >= 1:
        return f"{s:.3g} s"
    if s >= 1e-3:
        return f"{s * 1e3:.3g} ms"
    return f"{s * 1e6:.3g} µs"


def table_rows(records: list[dict[str, Any]], peak: dict[str, float]) -> list[list[str]]:
    """Formatted rows of one table from records (impl, median, min, flops, bytes, peer, ...)."""
    by_impl = {r["impl"]: r for r in records}
    rows = []
    for r in records:
        med = r["median"]
        rate, frac = "", ""
        if r.get("flops"):
            g = r["flops"] / med / 1e9
            rate = f"{g:.1f} GFLOP/s"
            if peak.get("sgemm_gflops"):
                frac = f"{g / peak['sgemm_gflops']:.0%}"
        elif r.get("bytes"):
            g = r["bytes"] / med / 1e9
            rate = f"{g:.1f} GB/s"
            if peak.get("copy_gbs"):
                frac = f"{g / peak['copy_gbs']:.0%}"
        ratio = ""
        peer = by_impl.get(r.get("peer") or "")
        if peer is not None:
            ratio = f"{peer['median'] / med:.2f}x vs {peer['impl']}"
        mem = f"{r['extra_mib']:.0f} MiB" if r.get("extra_mib") is not None else ""
        rows.append([r["impl"], _fmt_time(med), _fmt_time(r["min"]), rate, frac, ratio, mem])
    return rows


HEADER = ["implementation", "median", "best", "rate", "% peak", "ratio (peer/this)",
          "extra mem"]


def format_table(title: str, rows: list[list[str]]) -> str:
    """A plain-text table (also valid Markdown) under ``title``."""
    keep = [i for i in range(len(HEADER)) if any(r[i] for r in rows) or i < 3]
    head = [HEADER[i] for i in keep]
    body = [[r[i] for i in keep] for r in rows]
    widths = [max(len(x) for x in col) for col in zip(head, *body)]

    def line(cells: list[str]) -> str:
        return "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths)) + " |"

    out = [f"### {title}", line(head), "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
    out += [line(r) for r in body]
    return "\n".join(out)
