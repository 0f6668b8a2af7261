"""GPU checks of the CuPy backends: ``check.sh`` (install, certify, benchmark) and ``bench``
(the benchmarks side by side with torch in one process)."""
