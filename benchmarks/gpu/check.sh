#!/usr/bin/env bash
# GPU check of the cuda backend, from a checkout, on a machine with an NVIDIA GPU, CuPy, torch,
# pluggy and pytest-benchmark (the NVIDIA H200 image): install the backends editable without
# touching the network, `dshal info`, `dshal certify cuda --full`, then the benchmarks side by
# side with torch (benchmarks/gpu/bench.py). Everything printed is also written under $OUT
# (default ./gpu-check): info.txt, certificates/, certify.log, gpu-bench.{md,json}.
#
# Pure-Python dependencies the image may lack (ml_dtypes, rich, threadpoolctl, hypothesis and
# theirs) are installed from wheels carried in .whl/ (no index): fill it on a connected machine
# with `make gpu-wheels` and carry it along.
#
# BACKEND=triton checks the triton backend instead (backends/torch and backends/triton; torch
# and triton must come with the image): `dshal certify triton`, then benchmarks.gpu.triton_bench
# (sparse attention against flash SDPA and FlexAttention, bf16 and fp8 gemm against cuBLAS and
# torch._scaled_mm).
#
# Environment: BACKEND=cuda|triton (default cuda), PYTHON (default python3), OUT,
# CERTIFY=full|quick|skip (default full),
# CERTIFY_TIMEOUT seconds (default 900), BENCH_ARGS (extra arguments for bench.py).
# Exit status: 0 when every step passed, else the first failing step's status.
set -uo pipefail
cd "$(dirname "$0")/../.."
PY="${PYTHON:-python3}"
BACKEND="${BACKEND:-cuda}"
case "$BACKEND" in
    cuda) VENDOR=cupy; PLUGINS="-e backends/cupy -e backends/cuda"; BENCH=benchmarks.gpu.bench;;
    triton) VENDOR=triton; PLUGINS="-e backends/torch -e backends/triton"
            BENCH=benchmarks.gpu.triton_bench;;
    *) echo "BACKEND=$BACKEND (allowed: cuda, triton)" >&2; exit 2;;
esac
OUT="${OUT:-$PWD/gpu-check}"
mkdir -p "$OUT"
status=0
step() { echo; echo "=== $*"; }
fail() { echo "FAILED ($1): $2" >&2; [ "$status" -ne 0 ] || status=$1; }

step "dependencies"
missing=$(VENDOR="$VENDOR" "$PY" - <<'PYEOF'
import importlib.util, os
need = {"ml_dtypes": "ml_dtypes", "rich": "rich", "threadpoolctl": "threadpoolctl",
        "hypothesis": "hypothesis", "pluggy": "pluggy", os.environ["VENDOR"]: None,
        "torch": None}
gone = [pkg or mod for mod, pkg in need.items() if importlib.util.find_spec(mod) is None]
print(" ".join(gone))
PYEOF
)
if [ -n "$missing" ]; then
    case " $missing " in *" $VENDOR "*|*" torch "*)
        echo "$VENDOR and torch must come with the machine's image (missing: $missing)" >&2
        exit 2;;
    esac
    if ! ls .whl/*.whl >/dev/null 2>&1; then
        echo "missing Python packages: $missing; no wheels in .whl/ to install them from." >&2
        echo "On a connected machine run 'make gpu-wheels' and carry .whl/ along." >&2
        exit 2
    fi
    "$PY" -m pip install --quiet --no-index --find-links .whl $missing || exit 2
fi
# shellcheck disable=SC2086
"$PY" -m pip install --quiet --no-deps --no-build-isolation -e . $PLUGINS || exit 2

step "dshal info"
"$PY" -m dshal.cli info 2>&1 | tee "$OUT/info.txt"
"$PY" -c "import dshal, sys; b = dshal.ops.backends()['$BACKEND']; print(b.status, b.error); \
sys.exit(0 if b.available else 1)" || { fail 3 "the $BACKEND backend is not available"; exit 3; }

case "${CERTIFY:-full}" in
    skip) ;;
    *) step "dshal certify $BACKEND --${CERTIFY:-full}"
       timeout "${CERTIFY_TIMEOUT:-900}" "$PY" -m dshal.cli certify "$BACKEND" "--${CERTIFY:-full}" \
           --out "$OUT/certificates" 2>&1 | tee "$OUT/certify.log"
       rc=${PIPESTATUS[0]}
       [ "$rc" -eq 0 ] || fail 4 "dshal certify $BACKEND exited with $rc (see $OUT/certify.log)";;
esac

step "benchmarks (dshal $BACKEND vs torch)"
# shellcheck disable=SC2086
"$PY" -m "$BENCH" --out "$OUT" ${BENCH_ARGS:-} || fail 5 "benchmarks failed"
echo
[ "$status" -eq 0 ] && echo "gpu check: all steps passed; results in $OUT" \
    || echo "gpu check: FAILED with status $status; results in $OUT"
exit "$status"
