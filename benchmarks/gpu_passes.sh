#!/usr/bin/env bash
# GPU probe, one call (<= ~6 min): 1. the float32 oracle tests with autotuning ON (the split backward's state pass is
# not idempotent; linear.BWD_IN_PLACE restores its buffers between timing runs), 2. where the time of the linear
# kernels goes, pass by pass (benchmarks/profile_passes.py) for the titans row at V-tiles 128 / 64 / 32 and delta-gd,
# 3. whether the MLP kernel's gd NaN comes from reading an unwritten (torch.empty) buffer, 4. BV=32 correctness.
#   bash benchmarks/gpu_passes.sh      (on the GPU box, from the repository root; logs under $OUT)
# Knobs: GPU_PASSES_VARIANTS (family:BV:warps,stages list; default the four above at 8,1), GPU_PASSES_PROBES=0 skips
#   steps 1, 3 and 4; GPU_PASSES_TESTS: extra pytest runs, "|"-separated, each "ENV=.. ENV=.. pytest-args".
VARIANTS="${GPU_PASSES_VARIANTS:-titans:128:8,1 titans:64:8,1 titans:32:8,1 delta:128:8,1}"
PROBES="${GPU_PASSES_PROBES:-1}"
if [ -z "${GPU_CHECK_CPU:-}" ]; then python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD; fi
cd "$(dirname "$0")/.." || exit 1
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
# 3. MLP gd at the bench shape, plain and with zeroed empty buffers
[ "$PROBES" = 1 ] && for z in "" "--zero-empty"; do
  MIRAS_KERNEL_MLP=1 MIRAS_KERNEL_CONFIG=8,1 timeout 270 python3 benchmarks/gpu_probe_mlp.py --D 128 --T 1024 --H 8 \
    --chunk 64 --learner gd --dtype bf16 --what bwd $z > "$OUTDIR/mlp_gd$z.log" 2>&1 &
  PIDS+=($!)
done
# 2. compile the profiled kernels in parallel (fixed config 8 warps, 1 stage), one process per kernel
WPIDS=()
for var in $VARIANTS; do
  IFS=: read -r fam bv cfg <<< "$var"
  for kern in fwd:1 fwd:2 bwd:3 bwd:1 bwd:2; do
    MIRAS_KERNEL_BV=$bv MIRAS_KERNEL_CONFIG=$cfg timeout 240 python3 benchmarks/warm_kernels.py "$fam" "${kern%%:*}" \
      "${kern#*:}" >> "$OUTDIR/warm.log" 2>&1 &
    WPIDS+=($!)
  done
done
for pid in "${WPIDS[@]}"; do wait "$pid"; done
echo "== compiled $(grep -c '^warm ' "$OUTDIR/warm.log") of ${#WPIDS[@]} kernels after $(( $(date +%s) - T0 )) s"
# 4. correctness of every profiled variant at the bench shape (their kernels are compiled now)
for var in $VARIANTS; do
  IFS=: read -r fam bv cfg <<< "$var"
  [ "$fam" = titans ] && sel="momentum" || sel="gd"
  MIRAS_KERNEL_BV=$bv MIRAS_KERNEL_CONFIG=$cfg timeout 60 python3 -m pytest \
    "tests/test_kernels_gpu.py::test_bf16_bench_shape[$sel]" -q -s -p no:cacheprovider > "$OUTDIR/bench_shape.log" 2>&1
  echo "   $var bench-shape correctness: $(grep -hE "^large|passed|failed|^E .*Error" "$OUTDIR/bench_shape.log" | head -3 | tr '\n' ' ' | cut -c1-300)"
done
for pid in "${PIDS[@]}"; do wait "$pid"; done
echo "== tests done after $(( $(date +%s) - T0 )) s"
grep -hE "passed|failed|Error|relative errors" "$OUTDIR"/extra.*.log 2>/dev/null | sed 's/^/   extra: /' | cut -c1-400
grep -hE "passed|failed|Error|relative errors" "$OUTDIR"/fp32.*.log 2>/dev/null | sed 's/^/   fp32 autotuned: /' | cut -c1-400
grep -hE "^(OK|FAIL)" "$OUTDIR"/mlp_gd*.log 2>/dev/null | sed 's/^/   /'
# 2. the pass-by-pass timings, one after another (nothing else on the GPU now)
for var in $VARIANTS; do
  IFS=: read -r fam bv cfg <<< "$var"
  echo "-- $var"
  MIRAS_KERNEL_BV=$bv MIRAS_KERNEL_CONFIG=$cfg timeout 60 python3 benchmarks/profile_passes.py "$fam" \
    2>&1 | tee -a "$OUTDIR/passes.log" | grep -E "^\| (fwd|bwd|sum|autograd)|Error"
done
echo "== total $(( $(date +%s) - T0 )) s"
