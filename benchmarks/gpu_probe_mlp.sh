#!/usr/bin/env bash
# Probe matrix for the MLP-memory kernel on a GPU (one process per case; CUDA_LAUNCH_BLOCKING=1).
cd "$(dirname "$0")/.." || exit 1
export CUDA_LAUNCH_BLOCKING=1 PYTHONUNBUFFERED=1
p() { timeout 60 env "$@" 2>&1 | grep -E "^(OK|FAIL)" || echo "NOLINE $*"; }
P="python3 benchmarks/gpu_probe_mlp.py"
p MIRAS_KERNEL_SPLIT=0 MIRAS_KERNEL_CONFIG=8,1 $P --D 16 --T 40 --what fwd &
p MIRAS_KERNEL_SPLIT=1 MIRAS_KERNEL_CONFIG=8,1 $P --D 16 --T 40 --what fwd &
p MIRAS_KERNEL_SPLIT=0 MIRAS_KERNEL_CONFIG=4,1 $P --D 16 --T 40 --what fwd &
p MIRAS_KERNEL_SPLIT=0 MIRAS_KERNEL_CONFIG=8,1 $P --D 64 --T 100 --what fwd &
p MIRAS_KERNEL_SPLIT=1 MIRAS_KERNEL_CONFIG=8,1 $P --D 64 --T 100 --what fwd &
p MIRAS_KERNEL_SPLIT=0 MIRAS_KERNEL_CONFIG=8,1 MIRAS_KERNEL_BH=64 $P --D 64 --T 100 --what fwd &
p MIRAS_KERNEL_SPLIT=0 MIRAS_KERNEL_CONFIG=8,1 $P --D 64 --T 100 --what fwd --dtype bf16 &
p MIRAS_KERNEL_SPLIT=0 MIRAS_KERNEL_CONFIG=8,1 $P --D 16 --T 40 --what bwd &
p MIRAS_KERNEL_SPLIT=0 MIRAS_KERNEL_CONFIG=4,1 $P --D 16 --T 40 --what bwd &
p MIRAS_KERNEL_SPLIT=0 MIRAS_KERNEL_CONFIG=8,1 $P --D 64 --T 100 --what bwd --dtype bf16 &
p MIRAS_KERNEL_SPLIT=1 MIRAS_KERNEL_CONFIG=8,1 $P --D 128 --T 256 --chunk 64 --learner momentum --what bwd --dtype bf16 &
wait
if command -v compute-sanitizer >/dev/null; then
  echo "== compute-sanitizer, smallest forward"
  MIRAS_KERNEL_SPLIT=0 timeout 90 compute-sanitizer --print-limit 3 python3 benchmarks/gpu_probe_mlp.py --D 16 --T 40 2>&1 | grep -vE "^\s*$" | head -30
else
  echo "no compute-sanitizer"; ls /usr/local/cuda*/bin 2>/dev/null | head
fi
