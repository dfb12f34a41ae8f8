#!/usr/bin/env bash
# One command for a lent GPU machine (H200, torch 2.11 / triton 3.6 preinstalled, no network), < 5 minutes:
#   1. install the project in place (no dependencies, no build isolation);
#   2. the kernel tests on the GPU (Triton compiled, not interpreted): tests/test_kernels.py, test_fused_newton.py,
#      the chain op through the Triton kernels (tests/test_triton_path.py), and a chain under CUDA graphs;
#   3. benchmarks/kernel_bench.py: linear_recurrence and the fused Newton solve, triton vs torch vs sequential,
#      with the bandwidth bound;
#   4. the project's benchmark harness, quick suite (another engineer's; its failure does not fail this script).
# Everything lands under $OUT (default ./gpu_out): gpu_check.log, pip.log, pytest.log, pytest.xml,
# kernel_bench.{csv,json,log}, kernel_bench_table.txt, bench.log, bench/. A short table is printed last.
# Exit status: that of the tests (0 = all passed), or 1 if the kernel benchmark found a wrong result.
set -u
cd "$(dirname "$0")/.."
OUT="${OUT:-./gpu_out}"
mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"
PY="${PYTHON:-python}"
unset TRITON_INTERPRET  # compile the kernels for the GPU
exec > >(tee -a "$OUT/gpu_check.log") 2>&1
start=$(date +%s)
stamp() { echo "== [$(( $(date +%s) - start ))s] $*"; }

stamp "device"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
"$PY" -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, 'cuda', torch.cuda.is_available())"
git log --oneline -1 2>/dev/null || true

stamp "pip install -e ."
"$PY" -m pip install --no-build-isolation --no-deps -e . >"$OUT/pip.log" 2>&1 || echo "pip install failed: see $OUT/pip.log"

stamp "kernel tests on the GPU (timeout 150 s)"
timeout 150 "$PY" -m pytest tests/test_kernels.py tests/test_fused_newton.py tests/test_triton_path.py -q \
    tests/test_backend.py::test_reduce_overhead_mode_with_a_chain_follows_each_input \
    -p no:cacheprovider \
    --durations=10 --junitxml="$OUT/pytest.xml" >"$OUT/pytest.log" 2>&1
rc_tests=$?
tail -25 "$OUT/pytest.log"
[ $rc_tests -eq 124 ] && echo "tests TIMED OUT after 150 s (partial log in $OUT/pytest.log)"

stamp "kernel benchmark (timeout 90 s)"
timeout 90 "$PY" benchmarks/kernel_bench.py --device cuda --out "$OUT" >"$OUT/kernel_bench.log" 2>&1
rc_bench=$?
tail -5 "$OUT/kernel_bench.log"

stamp "benchmark harness, quick suite (timeout 60 s; not fatal)"
timeout 60 "$PY" -m benchmarks run --suite all --quick --device cuda --out "$OUT/bench" >"$OUT/bench.log" 2>&1
rc_harness=$?
tail -5 "$OUT/bench.log"

stamp "summary"
echo "tests:   rc=$rc_tests  $(grep -E '[0-9]+ (passed|failed)' "$OUT/pytest.log" | tail -1)"
echo "bench:   rc=$rc_bench (kernel_bench.py; 1 = a provider returned a wrong or NaN result)"
echo "harness: rc=$rc_harness (python -m benchmarks run --suite all --quick)"
[ -f "$OUT/kernel_bench_table.txt" ] && cat "$OUT/kernel_bench_table.txt"
# The device tool returns at most 8 files from $OUT: everything goes into one archive beside the log.
( cd "$OUT" && tar czf gpu_results.tar.gz --exclude=gpu_results.tar.gz --exclude=gpu_check.log . ) \
    && find "$OUT" -mindepth 1 ! -name gpu_results.tar.gz ! -name gpu_check.log ! -name kernel_bench_table.txt \
       -delete 2>/dev/null

if [ $rc_tests -ne 0 ]; then exit "$rc_tests"; fi
if [ $rc_bench -ne 0 ]; then exit 1; fi
exit 0
