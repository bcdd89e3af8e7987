#!/usr/bin/env bash
# A short device call that re-checks what a session changed after gpu_all.sh ran (session 12: the fixed-config
# fallback to 1 stage for Huber's backward state pass at D=128 in fp32, the Lp case of the MLP GPU tests with tamer
# learning rates, and the MLP kernel on by default): the pytest selections of GPU_RECHECK_TESTS ("|" between them)
# as parallel processes, so their kernels compile at once, each with the env settings before its first " :: "; then,
# if GPU_RECHECK_BENCH is set, bench_kernels.py with those arguments (rows only). Logs under $OUT.
#   GPU_RECHECK_BENCH="--families mlp --no-chunked --variants mlpbf16" bash benchmarks/gpu_recheck.sh
cd "$(dirname "$0")/.." || exit 1
. benchmarks/gpu_site.sh
export PYTHONPATH="${PYTHONPATH:-$PWD}:$PWD" PYTHONUNBUFFERED=1
OUTDIR="${OUT:-/tmp/gpu_recheck}"; mkdir -p "$OUTDIR"
GPU="tests/test_kernels_gpu.py -k fp32_huber_at_head_dim_128"
DEFAULT_TESTS="MIRAS_KERNEL_CONFIG=8,2 :: $GPU|MIRAS_KERNEL_CONFIG= :: $GPU|MIRAS_KERNEL_CONFIG= :: tests/test_kernels_mlp_gpu.py"
IFS='|' read -ra SELECTIONS <<< "${GPU_RECHECK_TESTS:-$DEFAULT_TESTS}"
for i in "${!SELECTIONS[@]}"; do
  settings="${SELECTIONS[$i]%% :: *}"; selection="${SELECTIONS[$i]#* :: }"
  # shellcheck disable=SC2086
  env $settings timeout "${GPU_RECHECK_TEST_TIMEOUT:-150}" python3 -m pytest $selection -q -s -p no:cacheprovider \
    > "$OUTDIR/tests.$i.log" 2>&1 &
done
wait
for i in "${!SELECTIONS[@]}"; do
  echo "== [${SELECTIONS[$i]}]"
  grep -E "torch\.|passed|failed|^FAILED|^E  |skipped|num_stages" "$OUTDIR/tests.$i.log" | cut -c1-300
done
if [ -n "${GPU_RECHECK_BENCH:-}" ]; then
  # shellcheck disable=SC2086
  timeout "${GPU_RECHECK_BENCH_TIMEOUT:-120}" python3 benchmarks/bench_kernels.py $GPU_RECHECK_BENCH 2>&1 \
    | tee "$OUTDIR/bench.log" | grep -E "^ROW|device=|f\+b ms"
fi
