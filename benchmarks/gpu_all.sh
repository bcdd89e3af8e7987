#!/usr/bin/env bash
# One device call (<= GPU_ALL_SECONDS, default 540 s) that runs, in order of importance, each step bounded by the time
# left: 1. gpu_check.sh (correctness on CUDA + the benchmark table), 2. profile_kernels.py for the MLP memory (device
# ms per kernel), 3. the MLP kernels' GPU test file, then the MLP variants (GPU_ALL_MLP_VARIANTS, default mlpbf16,
# bf16 dot operands, which ran 13-17% faster in session 12 but within the default's spread, and mlpgraphs, the
# backward replayed as a CUDA graph, not yet run on a GPU: the bf16 tests, then the default row and one per variant
# that passed, measured in GPU_ALL_ROUNDS (3) alternating rounds),
# 4. profile_kernels.py for titans linear, 5. the linear kernels' float64-oracle GPU tests (bf16 cases, fp32 Huber at
# D=128), 6. gpu_passes.sh without its probes (the linear kernels pass by pass, per variant).
# Logs: $OUT/check.log, profile.log, mlp.log, linear_oracle.log, passes.log, and every step's own logs in
# $OUT/logs.tgz.
#   bash benchmarks/gpu_all.sh          (GPU box, repository root; wheels in .whl/ as for gpu_check.sh)
cd "$(dirname "$0")/.." || exit 1
OUTDIR="${OUT:-/tmp/gpu_all}"
mkdir -p "$OUTDIR"
END=$(( $(date +%s) + ${GPU_ALL_SECONDS:-540} ))
left() { echo $(( END - $(date +%s) )); }

# (gpu_check.sh's linear-kernel variants: none by default, session 12 settled the last ones)
GPU_CHECK_WARM_TIMEOUT="${GPU_CHECK_WARM_TIMEOUT:-180}" GPU_CHECK_TEST_TIMEOUT="${GPU_CHECK_TEST_TIMEOUT:-80}" \
  GPU_CHECK_BENCH_TIMEOUT="${GPU_CHECK_BENCH_TIMEOUT:-150}" GPU_CHECK_VARIANTS="${GPU_CHECK_VARIANTS-}" \
  OUT=/tmp/gpu_check \
  timeout "$(left)" bash benchmarks/gpu_check.sh > "$OUTDIR/check.log" 2>&1
echo "gpu_check.sh rc=$? ($(left) s left)" | tee -a "$OUTDIR/check.log"
sed -n '/gpu_check summary/,$p' "$OUTDIR/check.log"

# gpu_check.sh installed the wheels into /tmp/site
export PYTHONPATH="/tmp/site:$PWD" PYTHONUNBUFFERED=1 MIRAS_KERNEL_CONFIG="${MIRAS_KERNEL_CONFIG:-8,2}"
profile() {  # device ms per kernel of one family (profile_kernels.py), within the time left
  [ "$(left)" -gt 60 ] || return
  timeout $(( $(left) < 90 ? $(left) : 90 )) python3 benchmarks/profile_kernels.py "$1" 2>&1 \
    | grep -vE "^(STAGE|USDT)" | tee -a "$OUTDIR/profile.log"
}
profile mlp

# the MLP kernels: the whole GPU test file at the defaults, then each MLP variant (benchmarks/variants.py) on every
# bf16 case (all four: a variant that passes them all could become the default) and, for those that pass, their
# benchmark rows
if [ "$(left)" -gt 150 ]; then
  timeout 150 python3 -m pytest tests/test_kernels_mlp_gpu.py -q -s -p no:cacheprovider 2>&1 \
    | grep -E "^\.*(l2|huber|lp|graphs)|passed|failed|^FAILED|^E  " | cut -c1-300 | tee "$OUTDIR/mlp.log"
  GOOD=""
  for var in $(echo "${GPU_ALL_MLP_VARIANTS-mlpbf16,mlpgraphs}" | tr , " "); do
    [ "$(left)" -gt 120 ] || break
    settings="$(python3 benchmarks/variants.py "$var")" || continue
    env $settings timeout 120 python3 -m pytest tests/test_kernels_mlp_gpu.py -q -s \
      -p no:cacheprovider -k "test_bf16_vs" > "/tmp/mlp_$var.log" 2>&1 && GOOD="$GOOD${GOOD:+,}$var"
    grep -E "^\.*(l2|huber|lp)|passed|failed|^E  " "/tmp/mlp_$var.log" | sed "s/^/$var: /" | cut -c1-300 \
      | tee -a "$OUTDIR/mlp.log"
  done
  [ -n "$GOOD" ] && [ "$(left)" -gt 60 ] && timeout $(( $(left) < 150 ? $(left) : 150 )) \
    python3 benchmarks/bench_kernels.py --families mlp --no-chunked --variants "$GOOD" --rounds "${GPU_ALL_ROUNDS:-3}" 2>&1 \
    | grep -E "^ROW (triton|sdpa)" | tee -a "$OUTDIR/mlp.log"
fi

profile titans

# the linear kernels against the float64 oracle at more shapes (bf16 cases; Huber at D=128 in fp32, which the
# session-11 gradient pass made fit in shared memory)
if [ "$(left)" -gt 100 ]; then
  timeout 90 python3 -m pytest tests/test_kernels_gpu.py -q -s -p no:cacheprovider \
    -k "fp32_huber_at_head_dim_128 or bf16_vs_float64" 2>&1 | grep -E "torch\.|passed|failed|^FAILED|^E  " \
    | cut -c1-300 | tee "$OUTDIR/linear_oracle.log"
fi

if [ "$(left)" -gt 90 ]; then
  GPU_PASSES_PROBES=0 OUT=/tmp/gpu_passes timeout "$(left)" bash benchmarks/gpu_passes.sh > "$OUTDIR/passes.log" 2>&1
  echo "gpu_passes.sh rc=$?" >> "$OUTDIR/passes.log"
  cat "$OUTDIR/passes.log"
fi
tar czf "$OUTDIR/logs.tgz" /tmp/gpu_check /tmp/gpu_passes 2>/dev/null
echo "== gpu_all done, $(left) s left"
