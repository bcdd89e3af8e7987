#!/usr/bin/env bash
# GPU check of the Triton memory kernels in one call: correctness on CUDA, then the benchmark, then one table.
# On the GPU box (torch + triton preinstalled, python 3.12, no network, no pydantic): wheels from .whl/ first (fetch
# them here with benchmarks/gpu_wheels.sh: pydantic, and fla-core / titans-pytorch for the reference rows).
#   bash benchmarks/gpu_check.sh                  # GPU: warm-up <= 150 s, correctness <= 40 s, benchmark <= 90 s
#   GPU_CHECK_CPU=1 bash benchmarks/gpu_check.sh  # CPU: the same steps through Triton's interpreter, tiny shapes
# Steps (timeouts sum to 280 s): 1. compile every kernel at once, one process each (warm_kernels.py; fixed config
# MIRAS_KERNEL_CONFIG=8,2 so each kernel compiles once; also the benchmark's fla / titans-pytorch reference rows when
# their wheels are carried); 2. correctness of the benchmark's exact kernels (titans and
# delta, split, whole-V tile; the MLP memory's mlp2 titans row and its gd twin) against the fp32 chunked path, and of
# each variant, as parallel pytest processes;
# 3. the benchmark, with an extra titans row per variant that passed; 4. one summary table.
# Knobs: GPU_CHECK_WARM_TIMEOUT (150; 0 skips), GPU_CHECK_TEST_TIMEOUT (40), GPU_CHECK_BENCH_TIMEOUT (90),
#   GPU_CHECK_TESTS (pytest args, "|" between parallel runs),
#   GPU_CHECK_BENCH_ARGS ("--families titans,delta-gd,mlp": issue 5's rows; the online delta rule's row, "gated
#   deltanet", is gpu_tune.sh's phase 5, so that this benchmark stays within its time with its reference rows), GPU_CHECK_BENCH=0 (no benchmark: correctness only),
#   GPU_CHECK_QUICK=1 (bench at B=2 T=1024 H=4 D=64),
#   GPU_CHECK_VARIANTS (default none: comma-separated names of benchmarks/variants.py, checked in parallel, then
#   benchmarked as extra titans rows if correct; session 12 measured gradone (the one-kernel gradient pass), state32
#   (fp32 chunk-state slots) and grad81 (1 stage) slower than the defaults, RESULTS.md; 32-wide tiles crash or go
#   wrong on an H200 with triton 3.6),
#   MIRAS_KERNEL_CONFIG (warps,stages of the linear kernels; default 8,2, the faster of the two autotune configs on an
#   H200: one compile per kernel, shared by the tests and the benchmark
#   through Triton's cache), MIRAS_KERNEL_SPLIT=0 (fused kernels), MIRAS_KERNEL_BV (V-tile; default the whole V).
# The correctness step runs the benchmark's exact kernels (H=8, D=128, chunk 64, bf16) against the fp32 chunked path;
# if it FAILS (not a timeout), the benchmark runs the fused kernels instead (measured correct on H200 before).
set -u
cd "$(dirname "$0")/.." || exit 1
. benchmarks/gpu_site.sh
export PYTHONPATH="${PYTHONPATH:-$PWD}:$PWD" PYTHONUNBUFFERED=1
export MIRAS_KERNEL_CONFIG="${MIRAS_KERNEL_CONFIG:-8,2}"
OUTDIR="${OUT:-/tmp/gpu_check}"
mkdir -p "$OUTDIR"
rm -f "$OUTDIR/bench_table.txt"  # (a table from an earlier run must not pass for this one's)
python3 - <<'PY'
import torch, triton
print(f"torch {torch.__version__}, triton {triton.__version__}, cuda={torch.cuda.is_available()}",
      torch.cuda.get_device_name() if torch.cuda.is_available() else "")
PY

# correctness: the test selections ("|"-separated) and one test per variant run as parallel pytest processes, so
# their kernels compile at once; a variant (another V-tile, the fused kernels) gets a benchmark row only if it passed
if [ -n "${GPU_CHECK_CPU:-}" ]; then
  export TRITON_INTERPRET=1 OMP_NUM_THREADS=1
  TESTS="${GPU_CHECK_TESTS:-tests/test_kernels.py -k several_v_tiles}"
  VARIANT_TEST="${GPU_CHECK_VARIANT_TEST:-tests/test_kernels.py::test_learned_initial_state_without_batch_dim}"
  BENCH_ARGS="--tiny"
else
  MLP_TEST="tests/test_kernels_mlp_gpu.py::test_bf16_vs_chunked_fp32 -k"
  TESTS="${GPU_CHECK_TESTS:-tests/test_kernels_gpu.py::test_bf16_bench_shape[momentum]|tests/test_kernels_gpu.py::test_bf16_bench_shape[gd]|$MLP_TEST momentum-previous-64-gelu-1-1024|$MLP_TEST gd-previous-64-gelu-1-1024}"
  VARIANT_TEST="${GPU_CHECK_VARIANT_TEST:-tests/test_kernels_gpu.py::test_bf16_bench_shape[momentum]}"
  BENCH_ARGS="${GPU_CHECK_QUICK:+--quick} ${GPU_CHECK_BENCH_ARGS:---families titans,delta-gd,mlp}"
fi
VARIANTS="${GPU_CHECK_VARIANTS-}"

variant_env() {  # the kernel settings of a benchmark variant (the table: benchmarks/variants.py)
  python3 benchmarks/variants.py "$1" || echo "UNKNOWN_VARIANT=$1"
}

# warm-up: every kernel the tests and the benchmark launch, compiled at once (one process per kernel, Triton's disk
# cache keeps them), so the compile phase lasts about as long as the slowest single kernel
WARM_TIMEOUT="${GPU_CHECK_WARM_TIMEOUT:-150}"
if [ "$WARM_TIMEOUT" != 0 ]; then
  echo "== warm-up: compiling the kernels in parallel (<= $WARM_TIMEOUT s)"
  WPIDS=()
  for job in "titans" "delta" "mlp" "mlp-gd" $(for var in ${VARIANTS//,/ }; do echo "titans:$var"; done); do
    fam="${job%%:*}"; var="${job#*:}"; [ "$var" = "$job" ] && var=""
    if [ "${fam%%-*}" = mlp ]; then kernels="fwd:1 fwd:2 bwd:0"
    elif [ "$var" = fused ]; then kernels="fwd:0 bwd:0"; else kernels="fwd:1 fwd:2 bwd:3 bwd:1 bwd:2"; fi
    for kern in $kernels; do
      # shellcheck disable=SC2046
      env $( [ -n "$var" ] && variant_env "$var") timeout "$WARM_TIMEOUT" \
        python3 benchmarks/warm_kernels.py "$fam" "${kern%%:*}" "${kern#*:}" ${GPU_CHECK_CPU:+--tiny} >> "$OUTDIR/warm.log" 2>&1 &
      WPIDS+=($!)
    done
  done
  timeout "$WARM_TIMEOUT" python3 benchmarks/warm_kernels.py row "LN head" ${GPU_CHECK_CPU:+--tiny} \
    >> "$OUTDIR/warm.log" 2>&1 &  # (the LayerNorm-head row's kernels: its expansion 4 is the bench's alone)
  WPIDS+=($!)
  if [ -z "${GPU_CHECK_CPU:-}" ]; then  # the benchmark's reference rows (fla-core, titans-pytorch) when carried
    while IFS= read -r ref; do
      timeout "$WARM_TIMEOUT" python3 benchmarks/warm_kernels.py ref "$ref" >> "$OUTDIR/warm.log" 2>&1 &
      WPIDS+=($!)
    done < <(python3 benchmarks/warm_kernels.py ref --list)
  fi
  for pid in "${WPIDS[@]}"; do wait "$pid"; done
  echo "   $(grep -c '^warm ' "$OUTDIR/warm.log") of ${#WPIDS[@]} kernels compiled: $(grep '^warm ' "$OUTDIR/warm.log" | sed 's/^warm //' | tr '\n' ';')"
  grep -E "Error|error" "$OUTDIR/warm.log" | sort | uniq -c | head -5
fi

echo "== correctness: pytest $TESTS  (MIRAS_KERNEL_SPLIT=${MIRAS_KERNEL_SPLIT:-1} MIRAS_KERNEL_CONFIG=$MIRAS_KERNEL_CONFIG)"
echo "   variants [$VARIANTS]: pytest $VARIANT_TEST"
IFS='|' read -r -a PARTS <<< "$TESTS"
IFS=',' read -r -a VARS <<< "$VARIANTS"
PIDS=()
for i in "${!PARTS[@]}"; do
  # shellcheck disable=SC2086  # word splitting of the pytest arguments is intended
  timeout "${GPU_CHECK_TEST_TIMEOUT:-40}" python3 -m pytest ${PARTS[$i]} -q -s -p no:cacheprovider > "$OUTDIR/tests.$i.log" 2>&1 &
  PIDS+=($!)
done
VPIDS=()
for var in "${VARS[@]}"; do
  # shellcheck disable=SC2046,SC2086
  env $(variant_env "$var") timeout "${GPU_CHECK_TEST_TIMEOUT:-40}" python3 -m pytest $VARIANT_TEST -q -s \
    -p no:cacheprovider > "$OUTDIR/variant.$var.log" 2>&1 &
  VPIDS+=($!)
done
TEST_RC=0
LINEAR_RC=0  # the linear kernels' parts alone decide the split -> fused fallback (the MLP kernel is separate)
for i in "${!PIDS[@]}"; do
  wait "${PIDS[$i]}"
  rc=$?
  if [ "$rc" != 0 ] && { [ "$TEST_RC" = 0 ] || [ "$TEST_RC" = 124 ]; }; then TEST_RC=$rc; fi
  if [ "$rc" != 0 ] && [[ "${PARTS[$i]}" != *mlp* ]] && { [ "$LINEAR_RC" = 0 ] || [ "$LINEAR_RC" = 124 ]; }; then
    LINEAR_RC=$rc
  fi
done
GOOD_VARS=()
VAR_LINES=()
for j in "${!VPIDS[@]}"; do
  wait "${VPIDS[$j]}"
  rc=$?
  var="${VARS[$j]}"
  [ "$rc" = 0 ] && GOOD_VARS+=("$var")
  VAR_LINES+=("variant $var ($(variant_env "$var")): rc=$rc $(grep -hE "(passed|failed|error).* in |Error" "$OUTDIR/variant.$var.log" | tail -2 | tr '\n' ' ')")
done
cat "$OUTDIR"/tests.*.log > "$OUTDIR/tests.log"
cat "$OUTDIR/tests.log"
SUMMARY=$(grep -hE "(passed|failed|error).* in " "$OUTDIR"/tests.*.log | tr '\n' ';')
if [ "${#GOOD_VARS[@]}" -gt 0 ] && [ -z "${GPU_CHECK_CPU:-}" ]; then
  BENCH_ARGS="$BENCH_ARGS --variants $(IFS=,; echo "${GOOD_VARS[*]}")"
fi
NOTE=""
if [ "$LINEAR_RC" != 0 ] && [ "$LINEAR_RC" != 124 ] && [ "${MIRAS_KERNEL_SPLIT:-1}" != 0 ]; then
  export MIRAS_KERNEL_SPLIT=0
  NOTE="split kernels FAILED the correctness step: the benchmark below ran the fused kernels (MIRAS_KERNEL_SPLIT=0)"
  echo "== $NOTE"
fi

if [ "${GPU_CHECK_BENCH:-1}" = 0 ]; then  # (gpu_all.sh runs the benchmark itself, once its other tests are done)
  echo "== benchmark: skipped (GPU_CHECK_BENCH=0)" | tee "$OUTDIR/bench.log"
  BENCH_RC=0
else
  echo "== benchmark: bench_kernels.py $BENCH_ARGS"
  timeout "${GPU_CHECK_BENCH_TIMEOUT:-90}" python3 benchmarks/bench_kernels.py $BENCH_ARGS --table "$OUTDIR/bench_table.txt" 2>&1 | tee "$OUTDIR/bench.log"
  BENCH_RC=${PIPESTATUS[0]}
fi

echo
echo "================================ gpu_check summary ================================"
echo "correctness (rc=$TEST_RC$([ "$TEST_RC" = 124 ] && echo ', TIMEOUT')): ${SUMMARY:-no pytest summary (timeout?)}"
grep -hsE "^(l2|huber|lp|dot|large)" "$OUTDIR/tests.log" "$OUTDIR"/variant.*.log | sed 's/^/  /' || true
for line in "${VAR_LINES[@]}"; do echo "  $line"; done
grep -E "^(FAILED|E  )" "$OUTDIR/tests.log" | head -8 | sed 's/^/  /' || true
[ -n "$NOTE" ] && echo "NOTE: $NOTE"
if [ "${GPU_CHECK_BENCH:-1}" != 0 ]; then
  echo "benchmark (rc=$BENCH_RC$([ "$BENCH_RC" = 124 ] && echo ', TIMEOUT')):"
  grep -E "^device=" "$OUTDIR/bench.log" | sed 's/^/  /'
  cat "$OUTDIR/bench_table.txt" 2>/dev/null || { echo "  no table; partial rows:"; grep -E "^(ROW|ROUND) " "$OUTDIR/bench.log" | sed 's/^/  /'; }
  grep -E "^RATIO " "$OUTDIR/bench.log" | sed 's/^/  /'  # titans vs fla's chunk_delta_rule, titans-pytorch vs mlp2
fi
[ "$TEST_RC" = 0 ] && [ "$BENCH_RC" = 0 ]
