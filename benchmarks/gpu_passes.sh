#!/usr/bin/env bash
# GPU probe, one call (<= ~9 min): 1. the float32 oracle tests with autotuning ON (the default kernels), 2. where the
# time of the linear kernels goes, pass by pass (benchmarks/profile_passes.py), per variant (default: titans and
# delta-gd at the defaults; session 12 measured 1 stage and the one-kernel gradient pass slower), 3. the whole
# MLP-kernel GPU test file (tests/test_kernels_mlp_gpu.py) at the MLP kernels' default launch config (4 warps: at
# 8 warps they read shared memory out of bounds on an H200 with triton 3.6), 4. bench-shape correctness of every
# variant, 5. the MLP memory: Triton tiles vs walk layout vs the chunked PyTorch path (generic and one-node loop).
#   bash benchmarks/gpu_passes.sh      (on the GPU box, from the repository root; logs under $OUT)
# Knobs: GPU_PASSES_VARIANTS (space-separated family:BV:warps,stages[:ENV=value,ENV=value]), GPU_PASSES_PROBES=0
#   skips steps 1, 3, 4 and 5; GPU_PASSES_TESTS: extra pytest runs, "|"-separated, each "ENV=.. ENV=.. pytest-args".
VARIANTS="${GPU_PASSES_VARIANTS:-titans:128:8,2 delta:128:8,2}"
PROBES="${GPU_PASSES_PROBES:-1}"
cd "$(dirname "$0")/.." || exit 1
. benchmarks/gpu_site.sh
export PYTHONPATH="${PYTHONPATH:-$PWD}:$PWD" PYTHONUNBUFFERED=1
OUTDIR="${OUT:-/tmp/gpu_passes}"
mkdir -p "$OUTDIR"
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name())"
T0=$(date +%s)
PIDS=()
EXTRA=()
IFS='|' read -r -a EXTRA <<< "${GPU_PASSES_TESTS:-}"
for i in "${!EXTRA[@]}"; do
  read -r -a words <<< "${EXTRA[$i]}"
  envs=(); args=()
  for w in "${words[@]}"; do if [[ "$w" == *=* && ${#args[@]} == 0 ]]; then envs+=("$w"); else args+=("$w"); fi; done
  env "${envs[@]}" timeout 270 python3 -m pytest "${args[@]}" -q -s -p no:cacheprovider > "$OUTDIR/extra.$i.log" 2>&1 &
  PIDS+=($!)
done
# 1. fp32 vs float64 oracle, autotuned (no MIRAS_KERNEL_CONFIG), one process per case
[ "$PROBES" = 1 ] && for i in 0 1 2 3; do
  env -u MIRAS_KERNEL_CONFIG timeout 270 python3 -m pytest tests/test_kernels_gpu.py -q -p no:cacheprovider \
    -k "fp32 and $(python3 -c "import sys; sys.path.insert(0, 'tests'); import test_kernels_gpu as t; print(t.IDS[$i])")" \
    > "$OUTDIR/fp32.$i.log" 2>&1 &
  PIDS+=($!)
done
# 3. the MLP kernels' GPU tests (bf16 and fp32 vs the fp32 chunked path), default layout and launch config
[ "$PROBES" = 1 ] && { timeout 270 python3 -m pytest tests/test_kernels_mlp_gpu.py -q -s -p no:cacheprovider \
  > "$OUTDIR/mlp_gpu_tests.log" 2>&1 & PIDS+=($!); }
# 2. compile the profiled kernels in parallel (fixed config 8 warps, 1 stage), one process per kernel
WPIDS=()
for var in $VARIANTS; do
  IFS=: read -r fam bv cfg envs <<< "$var"
  kernels="fwd:1 fwd:2 bwd:3 bwd:1 bwd:2"
  # a sub-block variant at the default config changes only the gradient pass (the others are in the cache then)
  [[ "$envs" == *BV_LOOP* && "$cfg" == 8,1 ]] && kernels="bwd:2"
  [[ "$envs" == *BV_STATE* && "$cfg" == 8,1 ]] && kernels="fwd:1 bwd:1"  # only the state passes take that tile
  for kern in $kernels; do
    env ${envs//,/ } MIRAS_KERNEL_BV=$bv MIRAS_KERNEL_CONFIG=$cfg timeout 240 python3 benchmarks/warm_kernels.py \
      "$fam" "${kern%%:*}" "${kern#*:}" >> "$OUTDIR/warm.log" 2>&1 &
    WPIDS+=($!)
  done
done
# the MLP kernels of step 5, both layouts
[ "$PROBES" = 1 ] && for job in tiles:fwd:1 tiles:bwd:0 walk:fwd:1 walk:fwd:2 walk:bwd:0; do
  IFS=: read -r lay dir mode <<< "$job"
  MIRAS_KERNEL_MLP=1 MIRAS_KERNEL_MLP_LAYOUT=$lay MIRAS_KERNEL_CONFIG=8,1 timeout 240 python3 benchmarks/warm_kernels.py \
    mlp "$dir" "$mode" >> "$OUTDIR/warm.log" 2>&1 &
  WPIDS+=($!)
done
for pid in "${WPIDS[@]}"; do wait "$pid"; done
echo "== compiled $(grep -c '^warm ' "$OUTDIR/warm.log") of ${#WPIDS[@]} kernels after $(( $(date +%s) - T0 )) s"
# 4. correctness of every profiled variant at the bench shape (their kernels are compiled now)
for var in $VARIANTS; do
  IFS=: read -r fam bv cfg envs <<< "$var"
  [ "$fam" = titans ] && sel="momentum" || sel="gd"
  env ${envs//,/ } MIRAS_KERNEL_BV=$bv MIRAS_KERNEL_CONFIG=$cfg timeout 60 python3 -m pytest \
    "tests/test_kernels_gpu.py::test_bf16_bench_shape[$sel]" -q -s -p no:cacheprovider > "$OUTDIR/bench_shape.log" 2>&1
  echo "   $var bench-shape correctness: $(grep -hE "^large|passed|failed|^E .*Error" "$OUTDIR/bench_shape.log" | head -3 | tr '\n' ' ' | cut -c1-300)"
done
for pid in "${PIDS[@]}"; do wait "$pid"; done
echo "== tests done after $(( $(date +%s) - T0 )) s"
grep -hE "passed|failed|Error|relative errors" "$OUTDIR"/extra.*.log 2>/dev/null | sed 's/^/   extra: /' | cut -c1-400
grep -hE "passed|failed|Error|relative errors" "$OUTDIR"/fp32.*.log 2>/dev/null | sed 's/^/   fp32 autotuned: /' | cut -c1-400
grep -hE "passed|failed|^FAILED|Error" "$OUTDIR/mlp_gpu_tests.log" 2>/dev/null | sed 's/^/   mlp gpu tests: /' | cut -c1-400
# 2. the pass-by-pass timings, one after another (nothing else on the GPU now)
for var in $VARIANTS; do
  IFS=: read -r fam bv cfg envs <<< "$var"
  echo "-- $var"
  env ${envs//,/ } MIRAS_KERNEL_BV=$bv MIRAS_KERNEL_CONFIG=$cfg timeout 60 python3 benchmarks/profile_passes.py "$fam" \
    2>&1 | tee -a "$OUTDIR/passes.log" | grep -E "^\| (fwd|bwd|sum|autograd)|Error"
done
# 5. the MLP memory at the bench shape: Triton tiles layout (default) vs walk layout vs the chunked PyTorch path, then
#    the chunked path's one-node loop (miras/ops_chunked_mlp.py) instead of its generic loop
if [ "$PROBES" = 1 ]; then
  timeout 240 python3 benchmarks/bench_kernels.py --families mlp --variants walk 2>&1 \
    | grep -E "^ROW|Error" | sed "s/^/   /" | cut -c1-200
  MIRAS_MLP2_ONE_NODE=1 timeout 100 python3 benchmarks/bench_kernels.py --families mlp 2>&1 \
    | grep -E "^ROW chunked" | sed "s/^/   MIRAS_MLP2_ONE_NODE=1: /" | cut -c1-200
fi
echo "== total $(( $(date +%s) - T0 )) s"
