#!/usr/bin/env bash
# GPU check of the Triton memory kernels: correctness on CUDA (tests/test_kernels_gpu.py), then the benchmark.
# On the GPU box (torch + triton preinstalled, python 3.12, no network, no pydantic): wheels from .whl/ first.
#   bash benchmarks/gpu_check.sh            # GPU: ~1-2 min correctness + ~2 min benchmark, 5 min cap
#   GPU_CHECK_CPU=1 bash benchmarks/gpu_check.sh   # CPU: the same steps through Triton's interpreter, tiny shapes
#   GPU_CHECK_QUICK=1 ...                   # benchmark at the --quick shape (B=2, T=1024, H=4, D=64)
#   GPU_CHECK_BENCH_ARGS="--families titans,delta" GPU_CHECK_TEST_TIMEOUT=150 GPU_CHECK_BENCH_TIMEOUT=130 (defaults)
if [ -z "${GPU_CHECK_CPU:-}" ]; then python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD; fi
set -u
cd "$(dirname "$0")/.." || exit 1
export PYTHONPATH="${PYTHONPATH:-$PWD}:$PWD" PYTHONUNBUFFERED=1
OUTDIR="${OUT:-/tmp/gpu_check}"
mkdir -p "$OUTDIR"
python3 - <<'EOF'
import torch, triton
print(f"torch {torch.__version__}, triton {triton.__version__}, cuda={torch.cuda.is_available()}",
      torch.cuda.get_device_name() if torch.cuda.is_available() else "")
EOF

if [ -n "${GPU_CHECK_CPU:-}" ]; then
  export TRITON_INTERPRET=1 OMP_NUM_THREADS=1
  TESTS="tests/test_kernels.py -k every_linear_combination"
  BENCH_ARGS="--tiny"
else
  # fixed config for the correctness pass: one compile per kernel instead of four (the benchmark autotunes)
  TESTS="tests/test_kernels_gpu.py"
  BENCH_ARGS="${GPU_CHECK_QUICK:+--quick} ${GPU_CHECK_BENCH_ARGS:-}"
fi

echo "== correctness: pytest $TESTS"
MIRAS_KERNEL_CONFIG="${MIRAS_KERNEL_CONFIG:-8,1}" timeout "${GPU_CHECK_TEST_TIMEOUT:-150}" python3 -m pytest $TESTS -q -s -p no:cacheprovider \
  2>&1 | tee "$OUTDIR/tests.log"
TEST_RC=${PIPESTATUS[0]}
SUMMARY=$(grep -E "passed|failed|error" "$OUTDIR/tests.log" | tail -1)

echo "== benchmark: bench_kernels.py $BENCH_ARGS"
timeout "${GPU_CHECK_BENCH_TIMEOUT:-130}" python3 benchmarks/bench_kernels.py $BENCH_ARGS --table "$OUTDIR/bench_table.txt" 2>&1 | tee "$OUTDIR/bench.log"
BENCH_RC=${PIPESTATUS[0]}

echo
echo "================================ gpu_check summary ================================"
echo "correctness (rc=$TEST_RC): ${SUMMARY:-no pytest summary (timeout?)}"
grep -E "^(l2|huber|lp|dot|large)" "$OUTDIR/tests.log" | sed 's/^/  /' || true
echo "benchmark (rc=$BENCH_RC):"
cat "$OUTDIR/bench_table.txt" 2>/dev/null || echo "  no table (see $OUTDIR/bench.log)"
[ "$TEST_RC" = 0 ] && [ "$BENCH_RC" = 0 ]
