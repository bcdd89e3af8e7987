#!/usr/bin/env bash
# One device call (<= GPU_ALL_SECONDS, default 540 s) in three phases, so that every kernel compiles in parallel
# and only the benchmark has the GPU to itself:
# 1. correctness, all at once, nothing timed:
#    - gpu_check.sh without its benchmark (GPU_CHECK_BENCH=0): the warm-up of every kernel and of the fla /
#      titans-pytorch reference rows, then the bench-shape tests of titans, delta and the MLP memory;
#    - the MLP kernels' GPU test file at the defaults, its bf16 cases and CUDA-graphs test in one process, the rest
#      in another;
#    - for each MLP variant (GPU_ALL_MLP_VARIANTS, names of benchmarks/variants.py; default plainlaunch, Triton's
#      own launch path, the default before session 14; mlpfused, the backward passes fused; mlpgraphs, the backward
#      as CUDA graphs; sums3 / sums8, the hidden-dim contractions at 3 stages / 8 warps) its kernel settings' bf16
#      cases, CUDA-graphs test and fast-launch test. Variants that differ only in MIRAS_KERNEL_MLP_GRAPHS share one
#      run: the graphs test runs under each kernel setting anyway.
# 2. one benchmark process: bench_kernels.py for titans, delta and the MLP memory, with a row for every MLP variant
#    whose tests passed, in GPU_ALL_ROUNDS (3) alternating rounds; the chunked paths; the fla and titans-pytorch rows
#    (wheels from benchmarks/gpu_wheels.sh, carried as .whl/); RATIO lines for both issue-5 targets.
# 3. with the time left: gpu_train_graphs.sh (a full `miras train` of an MLP memory with train.kernel_graphs off
#    and auto, its kernels compiled during phase 1; GPU_ALL_TRAIN=0 skips both); profile_kernels.py mlp (device ms
#    per kernel, host issue vs wall, host us per launch) under GPU_ALL_PROFILE_VARIANT (plainlaunch) when it passed,
#    then at the defaults;
#    the linear kernels' float64-oracle GPU tests (bf16 cases, fp32 Huber at D=128).
# Knobs for a shorter call: GPU_ALL_CHECK=0 (no gpu_check.sh), GPU_ALL_REST=0 (only the MLP tests that gate the
# variants), GPU_ALL_BENCH_ARGS (default "--families titans,delta,mlp"), GPU_ALL_EXTRAS=0 (phase 3: only the variant's
# profile).
# Logs: $OUT/check.log, mlp.log, bench.log + bench_table.txt, profile.log, train_graphs.log, linear_oracle.log;
# every process's own log in $OUT/logs.tgz.
#   bash benchmarks/gpu_all.sh                        (GPU box, repository root)
#   GPU_CHECK_CPU=1 bash benchmarks/gpu_all.sh        (CPU dry run: interpreter, tiny shapes, the GPU tests skip)
cd "$(dirname "$0")/.." || exit 1
OUTDIR="${OUT:-/tmp/gpu_all}"
LOGS=/tmp/gpu_all_logs
rm -rf "$LOGS"; mkdir -p "$OUTDIR" "$LOGS"
END=$(( $(date +%s) + ${GPU_ALL_SECONDS:-540} ))
left() { echo $(( END - $(date +%s) )); }
cap() { local l; l=$(left); echo $(( l < $1 ? l : $1 )); }  # the smaller of the time left and $1 seconds
. benchmarks/gpu_site.sh
export PYTHONPATH="${PYTHONPATH:-$PWD}:$PWD" PYTHONUNBUFFERED=1 MIRAS_KERNEL_CONFIG="${MIRAS_KERNEL_CONFIG:-8,2}"
BENCH_ARGS="${GPU_ALL_BENCH_ARGS:---families titans,delta,mlp}"
if [ -n "${GPU_CHECK_CPU:-}" ]; then
  export TRITON_INTERPRET=1 OMP_NUM_THREADS=1
  BENCH_ARGS="--tiny --families mlp --no-chunked"
fi
VARIANTS="${GPU_ALL_MLP_VARIANTS-plainlaunch,mlpfused,mlpgraphs,sums3,sums8}"
GATE="test_bf16_vs or bf16_layernorm or graphs or fast_launch"  # a variant must pass: bf16 cases, graphs, launch

echo "== phase 1: correctness, in parallel ($(left) s left)"
CHECK_PID=""
if [ "${GPU_ALL_CHECK:-1}" != 0 ]; then
  GPU_CHECK_BENCH=0 GPU_CHECK_WARM_TIMEOUT="${GPU_CHECK_WARM_TIMEOUT:-180}" \
    GPU_CHECK_TEST_TIMEOUT="${GPU_CHECK_TEST_TIMEOUT:-90}" GPU_CHECK_VARIANTS="${GPU_CHECK_VARIANTS-}" \
    OUT=/tmp/gpu_check timeout "$(cap 300)" bash benchmarks/gpu_check.sh > "$OUTDIR/check.log" 2>&1 &
  CHECK_PID=$!
fi
TRAIN_PID=""
if [ "${GPU_ALL_TRAIN:-1}" != 0 ]; then  # phase 3's training A/B: its kernels (2 heads) compiled now, in parallel
  GPU_TRAIN_STEPS=2 GPU_TRAIN_RUNS=off GPU_TRAIN_SECONDS="$(cap 240)" OUT=/tmp/gpu_train_warm \
    bash benchmarks/gpu_train_graphs.sh > "$LOGS/train_warm.log" 2>&1 &
  TRAIN_PID=$!
fi
REST_PID=""
if [ "${GPU_ALL_REST:-1}" != 0 ]; then
  timeout "$(cap 240)" python3 -m pytest tests/test_kernels_mlp_gpu.py -q -s -p no:cacheprovider -k "not ($GATE)" \
    > "$LOGS/mlp.rest.log" 2>&1 &
  REST_PID=$!
fi
KEYS=("")           # kernel settings under test ("" = the defaults), each run once...
declare -A KEY_OF   # ...and each variant's (its settings without MIRAS_KERNEL_MLP_GRAPHS)
for var in ${VARIANTS//,/ }; do
  settings="$(python3 benchmarks/variants.py "$var")" || continue
  key="$(echo "$settings" | tr ' ' '\n' | grep -v '^MIRAS_KERNEL_MLP_GRAPHS=' | tr '\n' ' ' | sed 's/ *$//')"
  KEY_OF[$var]="$key"
  printf '%s\n' "${KEYS[@]}" | grep -qxF -- "$key" || KEYS+=("$key")
done
PIDS=()
for i in "${!KEYS[@]}"; do
  # shellcheck disable=SC2086  # the settings are words for env
  env ${KEYS[$i]} timeout "$(cap 240)" python3 -m pytest tests/test_kernels_mlp_gpu.py -q -s -p no:cacheprovider \
    -k "$GATE" > "$LOGS/mlp.$i.log" 2>&1 &
  PIDS+=($!)
done
declare -A RC_OF
for i in "${!KEYS[@]}"; do
  wait "${PIDS[$i]}"
  RC_OF[${KEYS[$i]:-default}]=$?
done
REST_RC=skipped
[ -n "$REST_PID" ] && { wait "$REST_PID"; REST_RC=$?; }
[ -n "$TRAIN_PID" ] && wait "$TRAIN_PID"
if [ -n "$CHECK_PID" ]; then
  wait "$CHECK_PID"; echo "gpu_check.sh (no benchmark) rc=$?" >> "$OUTDIR/check.log"
  sed -n '/gpu_check summary/,$p' "$OUTDIR/check.log"
fi
{
  for i in "${!KEYS[@]}"; do
    name="${KEYS[$i]:-defaults}"
    echo "-- MLP [$name] -k '$GATE': rc=${RC_OF[${KEYS[$i]:-default}]}"
    grep -E "^\.*(l2|huber|lp|graphs)|passed|failed|^FAILED|^E  " "$LOGS/mlp.$i.log" | cut -c1-300
  done
  echo "-- MLP [defaults] the rest of the file: rc=$REST_RC"
  grep -sE "^\.*(l2|huber|lp|graphs|fp32)|passed|failed|^FAILED|^E  " "$LOGS/mlp.rest.log" | cut -c1-300
} | tee "$OUTDIR/mlp.log"
GOOD=""
for var in ${VARIANTS//,/ }; do
  key="${KEY_OF[$var]-missing}"
  [ "$key" = missing ] && continue
  [ "${RC_OF[${key:-default}]}" = 0 ] && GOOD="$GOOD${GOOD:+,}$var"
done
echo "MLP variants that passed: ${GOOD:-none} (of $VARIANTS)" | tee -a "$OUTDIR/mlp.log"
if [ "${RC_OF[default]}" != 0 ] && [ -z "${GPU_CHECK_CPU:-}" ]; then  # (a broken launch path must not take the table)
  echo "the defaults' gate failed: phases 2 and 3 run with MIRAS_KERNEL_FAST_LAUNCH=0" | tee -a "$OUTDIR/mlp.log"
  export MIRAS_KERNEL_FAST_LAUNCH=0
fi

echo "== phase 2: the benchmark ($(left) s left)"
if [ "$(left)" -gt 60 ]; then
  # shellcheck disable=SC2086
  timeout "$(cap 270)" python3 benchmarks/bench_kernels.py $BENCH_ARGS ${GOOD:+--variants "$GOOD"} \
    --rounds "${GPU_ALL_ROUNDS:-3}" --table "$OUTDIR/bench_table.txt" > "$OUTDIR/bench.log" 2>&1
  bench_report $? "$OUTDIR/bench.log" "$OUTDIR/bench_table.txt"
fi

echo "== phase 3: the training A/B, profiles and the linear oracle tests ($(left) s left)"
if [ "${GPU_ALL_TRAIN:-1}" != 0 ] && [ "$(left)" -gt 100 ]; then  # a full `miras train` with graphs off / auto
  GPU_TRAIN_SECONDS=$(( $(left) / 2 - 5 < 120 ? $(left) / 2 - 5 : 120 )) OUT=/tmp/gpu_train_graphs \
    bash benchmarks/gpu_train_graphs.sh 2>&1 | tee "$OUTDIR/train_graphs.log"
fi
profile() {  # device ms per kernel of the MLP memory under the settings $1 (within the time left)
  [ "$(left)" -gt 45 ] || return
  echo "-- profile_kernels.py mlp [${1:-defaults}]" | tee -a "$OUTDIR/profile.log"
  # shellcheck disable=SC2086
  env $1 timeout "$(cap 90)" python3 benchmarks/profile_kernels.py mlp 2>&1 | grep -vE "^(STAGE|USDT)" \
    | tee -a "$OUTDIR/profile.log"
}
PROFILE_VARIANT="${GPU_ALL_PROFILE_VARIANT:-plainlaunch}"
if [[ ",$GOOD," == *",$PROFILE_VARIANT,"* ]]; then profile "$(python3 benchmarks/variants.py "$PROFILE_VARIANT")"; fi
[ "${GPU_ALL_EXTRAS:-1}" != 0 ] && profile ""
if [ "${GPU_ALL_EXTRAS:-1}" != 0 ] && [ "$(left)" -gt 60 ]; then
  timeout "$(cap 90)" python3 -m pytest tests/test_kernels_gpu.py -q -s -p no:cacheprovider \
    -k "fp32_huber_at_head_dim_128 or bf16_vs_float64" 2>&1 | grep -E "torch\.|passed|failed|^FAILED|^E  " \
    | cut -c1-300 | tee "$OUTDIR/linear_oracle.log"
fi
tar czf "$OUTDIR/logs.tgz" /tmp/gpu_check "$LOGS" /tmp/gpu_train_graphs /tmp/gpu_train_warm 2>/dev/null
echo "== gpu_all done, $(left) s left"
