#!/usr/bin/env bash
# One command for a lent GPU machine (no network), at most 10 minutes of wall time:
#   1. install the project in place, offline (no dependencies, no build isolation); fails loudly;
#   2. warm the Triton (and Inductor) caches: each headline case once through deeppcr, untimed;
#   3. the Triton tests on the GPU (compiled, not interpreted), three files in parallel processes;
#   4. benchmarks/kernel_bench.py: linear_recurrence and the fused Newton, triton vs torch vs sequential;
#   5. benchmarks/headline.py: eager vs Inductor vs reduce-overhead vs deeppcr on DeepMLP(1024, 16) batch 16
#      (forward, training step) and a DDIM sampler;
#   6. a short table, printed last.
# Every step has its own time budget; its failure or time-out has its own exit code (never 124, the code an
# outer time limit gives). Everything lands in $OUT (default ./gpu_out) in three files: gpu_check.log (all
# output), summary.txt (the final table) and artifacts.tar.gz (pytest.xml, kernel_bench.csv/json, headline.csv).
#
#   benchmarks/gpu_check.sh             # on the GPU
#   benchmarks/gpu_check.sh --dry-run   # the rehearsal on CPU: CUDA_VISIBLE_DEVICES= and the interpreter, tiny sizes
#
# Exit codes: 0 all passed; 2 no python; 10 install failed (11 timed out); 20 tests failed (21 timed out);
# 30 kernel benchmark wrong or failed (31 timed out); 40 headline wrong or failed (41 timed out);
# 50 warm-up failed (51 timed out). The first failing step in the order tests, bench, headline, warm-up,
# install decides; install failing stops the script at once.
set -u
cd "$(dirname "$0")/.."
DRY=0
[ "${1:-}" = "--dry-run" ] && DRY=1
OUT="${OUT:-./gpu_out}"
mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"
WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT
PY="${PYTHON:-}"
if [ -z "$PY" ]; then
    if command -v python3 >/dev/null 2>&1; then PY=python3
    elif command -v python >/dev/null 2>&1; then PY=python
    else echo "gpu_check: neither python3 nor python on PATH" >&2; exit 2; fi
fi
if [ $DRY -eq 1 ]; then
    export CUDA_VISIBLE_DEVICES= TRITON_INTERPRET=1
    B_INSTALL=120 B_WARM=300 B_TESTS=400 B_BENCH=200 B_HEAD=600
else
    unset TRITON_INTERPRET  # compile the kernels for the GPU
    B_INSTALL=45 B_WARM=75 B_TESTS=180 B_BENCH=75 B_HEAD=180
fi
export TRITON_DEFAULT_FP_FUSION=1
exec > >(tee -a "$OUT/gpu_check.log") 2>&1
start=$(date +%s)
stamp() { echo "== [$(( $(date +%s) - start ))s] $*"; }
# run_step NAME BUDGET FAIL_CODE LOG CMD...: the step's code is 0, FAIL_CODE, or FAIL_CODE + 1 on a time-out;
# LOG: a file for the command's output, or - for this script's output.
run_step() {
    local name=$1 budget=$2 code=$3 log=$4; shift 4
    stamp "$name (budget ${budget}s)"
    if [ "$log" = "-" ]; then timeout --kill-after=10 "$budget" "$@"; else timeout --kill-after=10 "$budget" "$@" >"$log" 2>&1; fi
    local rc=$?
    if [ $rc -eq 124 ] || [ $rc -eq 137 ]; then echo "$name TIMED OUT after ${budget}s"; return $((code + 1)); fi
    if [ $rc -ne 0 ]; then echo "$name FAILED (rc=$rc)"; return "$code"; fi
    return 0
}

stamp "device (dry run: $DRY)"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || echo "no nvidia-smi"
"$PY" -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, 'cuda', torch.cuda.is_available())"
git log --oneline -1 2>/dev/null || true

PIP=(install --no-build-isolation --no-deps --no-index -e .)
[ $DRY -eq 1 ] && PIP=(install --dry-run "${PIP[@]:1}")  # the rehearsal builds the editable wheel, installs nothing
run_step "pip ${PIP[*]} (offline)" $B_INSTALL 10 "$WORK/pip.log" "$PY" -m pip "${PIP[@]}"
rc_install=$?
if [ $rc_install -ne 0 ]; then tail -30 "$WORK/pip.log"; echo "INSTALL FAILED: stopping"; exit $rc_install; fi
HEAD_ARGS=(); [ $DRY -eq 1 ] && HEAD_ARGS=(--dry-run)

run_step "warm the Triton and Inductor caches" $B_WARM 50 - "$PY" benchmarks/headline.py --warm ${HEAD_ARGS[@]+"${HEAD_ARGS[@]}"}
rc_warm=$?

if [ $DRY -eq 1 ]; then
    TESTS=("tests/test_launch_planner.py" "tests/test_kernels.py -k L7-w8" "tests/test_fused_newton.py -k agree")
else
    TESTS=("tests/test_kernels.py" "tests/test_fused_newton.py"
           "tests/test_triton_path.py tests/test_launch_planner.py tests/test_backend.py::test_reduce_overhead_mode_with_a_chain_follows_each_input")
fi
tests_parallel() {  # the test groups in parallel processes (each compiles its own kernels); fails if any fails
    local i=0 pids=() rc=0
    trap 'kill "${pids[@]}" 2>/dev/null' TERM  # a time-out ends every test process, not only this shell
    for t in "${TESTS[@]}"; do
        # shellcheck disable=SC2086
        "$PY" -m pytest $t -q -m "not slow" -p no:cacheprovider --junitxml="$WORK/pytest$i.xml" >"$WORK/pytest$i.log" 2>&1 &
        pids+=($!); i=$((i + 1))
    done
    for p in "${pids[@]}"; do wait "$p" || rc=1; done
    for j in $(seq 0 $((i - 1))); do echo "-- ${TESTS[$j]}"; tail -4 "$WORK/pytest$j.log"; done
    return $rc
}
run_step "Triton tests" $B_TESTS 20 - bash -c "$(declare -p TESTS WORK PY); $(declare -f tests_parallel); tests_parallel"
rc_tests=$?

if [ $DRY -eq 1 ]; then BENCH=(--device cpu --quick); else BENCH=(--device cuda); fi
run_step "kernel benchmark" $B_BENCH 30 "$WORK/kernel_bench.log" "$PY" benchmarks/kernel_bench.py "${BENCH[@]}" --out "$WORK"
rc_bench=$?
tail -5 "$WORK/kernel_bench.log"

run_step "headline: eager vs inductor vs reduce-overhead vs deeppcr" $B_HEAD 40 "$WORK/headline.log" \
    "$PY" benchmarks/headline.py --out "$WORK" ${HEAD_ARGS[@]+"${HEAD_ARGS[@]}"}
rc_head=$?
grep -v "^case\|^---" "$WORK/headline.log" | tail -20

stamp "summary"
{
    echo "gpu_check (dry run: $DRY) at $(git log --oneline -1 2>/dev/null), $(( $(date +%s) - start ))s"
    echo "steps: install=$rc_install warm=$rc_warm tests=$rc_tests kernel_bench=$rc_bench headline=$rc_head"
    for j in "$WORK"/pytest*.log; do [ -f "$j" ] && grep -E '[0-9]+ (passed|failed|error)' "$j" | tail -1; done
    [ -f "$WORK/kernel_bench_table.txt" ] && cat "$WORK/kernel_bench_table.txt"
    [ -f "$WORK/headline.log" ] && sed -n '/^case /,$p' "$WORK/headline.log"
} >"$OUT/summary.txt"
( cd "$WORK" && tar czf "$OUT/artifacts.tar.gz" ./*.log ./*.xml ./*.csv ./*.json 2>/dev/null )  # pip.log too
cat "$OUT/summary.txt"

for rc in $rc_tests $rc_bench $rc_head $rc_warm; do
    if [ "$rc" -ne 0 ]; then exit "$rc"; fi
done
exit 0
