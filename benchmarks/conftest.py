"""pytest-benchmark glue: the machine's peak measured once per run, one table per operator.

``make bench`` runs every benchmark module; after pytest-benchmark's own tables this prints one
table per operator (see :mod:`benchmarks._harness`) and saves the peak in the JSON output.
"""

from __future__ import annotations

from typing import Any

import pytest

from benchmarks import _harness


@pytest.fixture(scope="session", autouse=True)
def machine_peak(request: pytest.FixtureRequest) -> dict[str, float]:
    """numpy sgemm GFLOP/s and copy GB/s of this machine, measured once (benchmark runs only)."""
    if not _harness.PEAK and not request.config.getoption("benchmark_disable", False):
        _harness.PEAK.update(_harness.measure_peak())
    return _harness.PEAK


def pytest_benchmark_update_json(config: pytest.Config, benchmarks: list, output_json: dict
                                 ) -> None:
    """Keep the measured peak with the timings, for ``pytest-benchmark compare``."""
    output_json["dshal_peak"] = dict(_harness.PEAK)


def _records(config: pytest.Config) -> dict[str, list[dict[str, Any]]]:
    session = getattr(config, "_benchmarksession", None)
    tables: dict[str, list[dict[str, Any]]] = {}
    for bench in getattr(session, "benchmarks", []) or []:
        if not bench or "impl" not in bench.extra_info:
            continue
        # memory rows time their subprocess; the call's own time is in call_s
        t = bench.extra_info.get("call_s")
        rec = dict(bench.extra_info, median=t or bench.stats.median, min=t or bench.stats.min)
        tables.setdefault(bench.group or "", []).append(rec)
    return tables


def pytest_terminal_summary(terminalreporter: Any, config: pytest.Config) -> None:
    """One table per operator: time, rate, fraction of the measured peak, ratio to the peer."""
    tables = _records(config)
    if not tables:
        return
    peak = _harness.PEAK
    tr = terminalreporter
    tr.write_sep("=", "dshal benchmarks (ratio = peer time / this time; >1 is faster)")
    if peak:
        tr.write_line(f"measured peak: numpy sgemm 2048³ {peak['sgemm_gflops']:.1f} GFLOP/s, "
                      f"np.copyto 256 MiB {peak['copy_gbs']:.1f} GB/s (read + write)")
    for title, records in tables.items():
        tr.write_line("")
        tr.write_line(_harness.format_table(title, _harness.table_rows(records, peak)))
