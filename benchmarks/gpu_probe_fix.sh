#!/usr/bin/env bash
# One device call (GPU session 8; RESULTS.md has its tables): 1. workarounds for the MLP tiles kernels' illegal
# shared-memory read at chunk 64 (hidden tile 16, wgmma, 8 warps) -- mma v2 instead of wgmma (DISABLE_MMA_V3=1, read
# by Triton at compile time), 4 warps (the default since), 8 warps (the control) -- each case in its own process,
# launches blocking; 2. the MLP benchmark row under each setting that passed; 3. the linear kernels at 2 pipeline
# stages and with the gradient pass in V sub-blocks (bench rows). Logs under $OUT.
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
OUTDIR="${OUT:-/tmp/probe_fix}"; mkdir -p "$OUTDIR"
ENVS=("MIRAS_KERNEL_MLP_CONFIG=8,1 DISABLE_MMA_V3=1" "MIRAS_KERNEL_MLP_CONFIG=4,1" "MIRAS_KERNEL_MLP_CONFIG=8,1")
CASES=("--D 64 --T 256 --chunk 64 --what bwd" "--D 128 --T 1024 --H 8 --chunk 64 --what bwd --learner momentum --dtype bf16"
       "--D 128 --T 1024 --H 8 --chunk 64 --what bwd --learner gd --dtype bf16")
n=0
for e in "${!ENVS[@]}"; do for c in "${!CASES[@]}"; do
  # shellcheck disable=SC2086
  env CUDA_LAUNCH_BLOCKING=1 ${ENVS[$e]} timeout 150 python3 benchmarks/gpu_probe_mlp.py ${CASES[$c]} > "$OUTDIR/p$e$c.log" 2>&1 &
  n=$((n + 1))
done; done
env CUDA_LAUNCH_BLOCKING=1 MIRAS_KERNEL_MLP_CONFIG=8,1 DISABLE_MMA_V3=1 MIRAS_KERNEL_MLP_LAYOUT=walk timeout 150 python3 benchmarks/gpu_probe_mlp.py \
  --D 128 --T 1024 --H 8 --chunk 64 --what bwd --learner gd --dtype bf16 > "$OUTDIR/pwalk.log" 2>&1 &
wait
GOOD=()
for e in "${!ENVS[@]}"; do
  ok=1
  for c in "${!CASES[@]}"; do
    line=$(grep -hE "^(OK|FAIL)" "$OUTDIR/p$e$c.log" | cut -c1-330)
    echo "[${ENVS[$e]}] ${line:-no result: $(tail -1 "$OUTDIR/p$e$c.log" | cut -c1-200)}"
    [[ "$line" == OK* ]] || ok=0
  done
  [ $ok = 1 ] && GOOD+=("${ENVS[$e]}")
done
echo "[walk, DISABLE_MMA_V3=1] $(grep -hE "^(OK|FAIL)" "$OUTDIR/pwalk.log" | cut -c1-330)"
for e in "${GOOD[@]}"; do
  echo "== MLP bench row with $e"
  env $e timeout 150 python3 benchmarks/bench_kernels.py --families mlp --no-chunked 2>&1 | grep -E "^ROW|Error" | cut -c1-200
done
for cfg in 8,2 8,1; do
  echo "== linear rows, MIRAS_KERNEL_CONFIG=$cfg"
  MIRAS_KERNEL_CONFIG=$cfg timeout 150 python3 benchmarks/bench_kernels.py --families titans,delta --no-chunked \
    --variants bvl128,bvl32 2>&1 | grep -E "^ROW|Error" | cut -c1-200
done
